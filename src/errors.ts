/**
 * The error hierarchy of arca. Every error a user can see is an {@link ArcaError}
 * with a stable `code`; only main.ts turns one into an exit code, and only the HTTP
 * server turns one into a status.
 *
 * Messages are in sentence case, without a trailing period, detail after a colon:
 * `Cannot parse narinfo line 3: missing ':'`.
 * @module
 */

/** Base class of every error arca reports to a user. */
export class ArcaError extends Error {
  /** Stable machine-readable code, e.g. `usage`, `not_found`, `integrity`. */
  readonly code: string;
  /** Process exit code main.ts uses for this error. */
  readonly exitCode: number;

  constructor(code: string, message: string, options?: { cause?: unknown; exitCode?: number }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.code = code;
    this.exitCode = options?.exitCode ?? 1;
  }
}

/** Wrong command-line usage or configuration: exit code 2. */
export class UsageError extends ArcaError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("usage", message, { ...options, exitCode: 2 });
  }
}

/** Invalid configuration file contents (names the key and line). */
export class ConfigError extends ArcaError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("config", message, { ...options, exitCode: 2 });
  }
}

/** Something asked for is not there (a store path, a NAR, a key file). */
export class NotFoundError extends ArcaError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("not_found", message, options);
  }
}

/** Malformed input in one of the formats arca speaks (NAR, narinfo, store path, hash, key). */
export class FormatError extends ArcaError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("format", message, options);
  }
}

/** Data that does not match its hash or size. */
export class IntegrityError extends ArcaError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("integrity", message, options);
  }
}

/** A signature that is missing, malformed or not from a trusted key. */
export class SignatureError extends ArcaError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("signature", message, options);
  }
}

/** A peer or client that broke a protocol. */
export class ProtocolError extends ArcaError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("protocol", message, options);
  }
}

/** A subprocess (nix, nix-store) that failed or printed something unexpected. */
export class ExternalCommandError extends ArcaError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("external_command", message, options);
  }
}
