/**
 * The narinfo format: the `<hash>.narinfo` text a binary cache serves for each store path,
 * and the fingerprint its signatures cover.
 *
 * ```text
 * StorePath: /nix/store/<hash>-<name>
 * URL: nar/<nix32 file hash>.nar.zst
 * Compression: zstd
 * FileHash: sha256:<nix32>
 * FileSize: 1234
 * NarHash: sha256:<nix32>
 * NarSize: 5678
 * References: <hash>-<name> <hash>-<name>
 * Deriver: <hash>-<name>.drv
 * Sig: <key name>:<base64 signature>
 * CA: fixed:r:sha256:<nix32>
 * ```
 *
 * Each line is `<Key>: <value>\n`. Parsing follows Nix 2.8 (`NarInfo::NarInfo` in libstore
 * `nar-info.cc`) and is stricter where Nix is sloppy: every error names its line, a
 * single-valued field may appear once, sizes are plain decimal. Unknown keys (e.g. `System`)
 * are ignored, as Nix does. `Compression` defaults to `bzip2` when absent or empty, `Deriver:
 * unknown-deriver` and `CA: ` (empty) mean none, and References and Sig are sets (sorted,
 * duplicates dropped), as in Nix. Hashes are normalized to `sha256:<nix32>`.
 *
 * Writing uses Nix's field order (`StorePath, URL, Compression, FileHash, FileSize, NarHash,
 * NarSize, References, Deriver, Sig*, CA`), with `References: ` (trailing space) when empty.
 * The fingerprint is `1;<StorePath>;<NarHash>;<NarSize>;<comma-joined full reference paths>`.
 * Pure: no I/O.
 * @module
 */

import { FormatError } from "../errors.ts";
import { decodeHashBody, formatNixHash, NIX_HASH_TYPES, tryParseNixHash } from "./hash.ts";
import { encodeNixBase32 } from "./nixbase32.ts";
import { STORE_DIR, storePathBaseNameProblem, storePathProblem } from "./store_path.ts";

/** A parsed narinfo. */
export interface NarInfo {
  /** Full store path, `/nix/store/<hash>-<name>`. */
  storePath: string;
  /** Where the (compressed) NAR is, relative to the cache root, e.g. `nar/<hash>.nar.zst`. */
  url: string;
  /** `none`, `xz`, `zstd`, `bzip2`, `br`, … */
  compression: string;
  /** SHA-256 of the compressed NAR file, `sha256:<nix32>`. */
  fileHash?: string;
  /** Length of the compressed NAR file in bytes. */
  fileSize?: number;
  /** SHA-256 of the uncompressed NAR, `sha256:<nix32>`. */
  narHash: string;
  /** Length of the uncompressed NAR in bytes (positive). */
  narSize: number;
  /** References as base names `<hash>-<name>` (sorted, unique once parsed). */
  references: string[];
  /** The deriver as a base name `<hash>-<name>.drv`, if known. */
  deriver?: string;
  /** Signatures, `<key name>:<base64>` (sorted, unique once parsed). */
  sigs: string[];
  /** Content address, e.g. `fixed:r:sha256:<nix32>` or `text:sha256:<nix32>`. */
  ca?: string;
}

/** Options of {@link parseNarInfo}. */
export interface ParseNarInfoOptions {
  /** Largest accepted input in bytes; default {@link MAX_NARINFO_BYTES}. */
  maxBytes?: number;
  /** Most references accepted; default {@link MAX_NARINFO_REFERENCES}. */
  maxReferences?: number;
  /** Most signatures accepted; default {@link MAX_NARINFO_SIGNATURES}. */
  maxSignatures?: number;
}

/** Default input size limit of {@link parseNarInfo}: 1 MiB. */
export const MAX_NARINFO_BYTES = 1 << 20;
/** Default limit on References of {@link parseNarInfo}. */
export const MAX_NARINFO_REFERENCES = 20_000;
/** Default limit on Sig lines of {@link parseNarInfo}. */
export const MAX_NARINFO_SIGNATURES = 100;

/** Compression Nix assumes when a narinfo has none. */
export const DEFAULT_COMPRESSION = "bzip2";

const SINGLE_VALUED = new Set([
  "StorePath",
  "URL",
  "Compression",
  "FileHash",
  "FileSize",
  "NarHash",
  "NarSize",
  "References",
  "Deriver",
  "CA",
]);

const COMPRESSION_RE = /^[A-Za-z0-9._+-]+$/;
// deno-lint-ignore no-control-regex -- rejecting control characters is the point
const NO_SPACE_RE = /^[^\s\x00-\x1f\x7f]+$/;
const SIG_RE = /^[\x21-\x7e]+$/;
// deno-lint-ignore no-control-regex -- rejecting control characters is the point
const CONTROL_RE = /[\x00-\x09\x0b-\x1f\x7f]/;
const SIZE_RE = /^(0|[1-9][0-9]*)$/;
const CA_RE = /^(text:|fixed:(?:r:)?)([a-z0-9]+):(.*)$/;

/**
 * Parses narinfo text (or its UTF-8 bytes). Throws {@link FormatError} naming the line:
 * `Cannot parse narinfo line 3: missing ':'`, or `Cannot parse narinfo: missing NarHash`
 * for a required field (StorePath, URL, NarHash, NarSize) that never appears.
 */
export function parseNarInfo(
  input: string | Uint8Array,
  options: ParseNarInfoOptions = {},
): NarInfo {
  const maxBytes = options.maxBytes ?? MAX_NARINFO_BYTES;
  const maxReferences = options.maxReferences ?? MAX_NARINFO_REFERENCES;
  const maxSignatures = options.maxSignatures ?? MAX_NARINFO_SIGNATURES;
  const text = decodeInput(input, maxBytes);

  const seen = new Set<string>();
  let storePath: string | undefined;
  let url: string | undefined;
  let compression = "";
  let fileHash: string | undefined;
  let fileSize: number | undefined;
  let narHash: string | undefined;
  let narSize: number | undefined;
  let references: string[] = [];
  let deriver: string | undefined;
  let ca: string | undefined;
  const sigs = new Set<string>();

  const lines = text.split("\n");
  for (let index = 0; index < lines.length; index++) {
    const lineNo = index + 1;
    const line = lines[index];
    if (index === lines.length - 1) {
      // What follows the last '\n': nothing, or a line Nix would reject as unterminated.
      if (line !== "") fail(lineNo, "missing newline at end of line");
      break;
    }
    if (line === "") fail(lineNo, "empty line");
    const control = CONTROL_RE.exec(line);
    if (control) {
      fail(lineNo, control[0] === "\r" ? "carriage return" : "control character");
    }
    const colon = line.indexOf(":");
    if (colon < 0) fail(lineNo, "missing ':'");
    const key = line.slice(0, colon);
    if (line[colon + 1] !== " ") fail(lineNo, `missing space after '${shorten(key)}:'`);
    const value = line.slice(colon + 2);
    if (SINGLE_VALUED.has(key)) {
      if (seen.has(key)) fail(lineNo, `duplicate ${key}`);
      seen.add(key);
    }
    const invalid = (detail: string): never =>
      fail(lineNo, `invalid ${key} '${shorten(value)}': ${detail}`);
    switch (key) {
      case "StorePath":
        ensure(storePathProblem(value), invalid);
        storePath = value;
        break;
      case "URL":
        ensure(urlProblem(value), invalid);
        url = value;
        break;
      case "Compression":
        ensure(compressionProblem(value, true), invalid);
        compression = value;
        break;
      case "FileHash":
        fileHash = hashField(value, invalid);
        break;
      case "FileSize":
        fileSize = sizeField(value, invalid);
        break;
      case "NarHash":
        narHash = hashField(value, invalid);
        break;
      case "NarSize":
        narSize = sizeField(value, invalid);
        if (narSize === 0) invalid("must be positive");
        break;
      case "References": {
        const refs = value.split(" ").filter((ref) => ref !== "");
        if (refs.length > maxReferences) {
          fail(lineNo, `more than ${maxReferences} references`);
        }
        for (const ref of refs) {
          const detail = storePathBaseNameProblem(ref);
          if (detail) fail(lineNo, `invalid reference '${shorten(ref)}': ${detail}`);
        }
        references = sortedUnique(refs);
        break;
      }
      case "Deriver":
        if (value !== "unknown-deriver") {
          ensure(storePathBaseNameProblem(value), invalid);
          deriver = value;
        }
        break;
      case "Sig":
        ensure(signatureProblem(value), invalid);
        sigs.add(value);
        if (sigs.size > maxSignatures) fail(lineNo, `more than ${maxSignatures} signatures`);
        break;
      case "CA":
        if (value !== "") ca = caField(value, invalid);
        break;
      default:
        // Nix ignores keys it does not know (e.g. System); so do we.
        break;
    }
  }

  if (storePath === undefined) failMissing("StorePath");
  if (url === undefined) failMissing("URL");
  if (narHash === undefined) failMissing("NarHash");
  if (narSize === undefined) failMissing("NarSize");

  const info: NarInfo = {
    storePath,
    url,
    compression: compression === "" ? DEFAULT_COMPRESSION : compression,
    narHash,
    narSize,
    references,
    sigs: [...sigs].sort(),
  };
  if (fileHash !== undefined) info.fileHash = fileHash;
  if (fileSize !== undefined) info.fileSize = fileSize;
  if (deriver !== undefined) info.deriver = deriver;
  if (ca !== undefined) info.ca = ca;
  return info;
}

/**
 * Writes a narinfo in Nix's field order; every line ends in `\n`. Hashes are written as
 * `sha256:<nix32>` whatever form `info` holds them in; References and Sig are written
 * sorted and without duplicates, as Nix does. Throws {@link FormatError} when a field is
 * invalid (so a value can never inject a line).
 *
 * @example
 * ```ts
 * formatNarInfo({
 *   storePath: "/nix/store/jph49rz6j1b4f6hlvsx2prn3p3fkcadp-arca-narinfo-dep",
 *   url: "nar/x.nar",
 *   compression: "none",
 *   narHash: "sha256-e9vJ5kB9nT7UCtxk10a+Y2a19Y7maMawKGYAi771cgI=",
 *   narSize: 120,
 *   references: [],
 *   sigs: [],
 * });
 * // StorePath: /nix/store/jph49rz6j1b4f6hlvsx2prn3p3fkcadp-arca-narinfo-dep
 * // URL: nar/x.nar
 * // Compression: none
 * // NarHash: sha256:00kjynz8n03652qccs76ivsvark3pr3dfr6w1ba3x7bx83kcknvv
 * // NarSize: 120
 * // References: (with a trailing space)
 * ```
 */
export function formatNarInfo(info: NarInfo): string {
  const invalid = (key: string, value: string) => (detail: string): never => {
    throw new FormatError(`Cannot format narinfo: invalid ${key} '${shorten(value)}': ${detail}`);
  };
  const check = (key: string, value: string, detail: string | undefined): void =>
    ensure(detail, invalid(key, value));
  check("StorePath", info.storePath, storePathProblem(info.storePath));
  check("URL", info.url, urlProblem(info.url));
  check("Compression", info.compression, compressionProblem(info.compression, false));
  let out = `StorePath: ${info.storePath}\nURL: ${info.url}\nCompression: ${info.compression}\n`;
  if (info.fileHash !== undefined) {
    out += `FileHash: ${hashField(info.fileHash, invalid("FileHash", info.fileHash))}\n`;
  }
  if (info.fileSize !== undefined) {
    check("FileSize", String(info.fileSize), numberProblem(info.fileSize));
    out += `FileSize: ${info.fileSize}\n`;
  }
  out += `NarHash: ${hashField(info.narHash, invalid("NarHash", info.narHash))}\n`;
  check("NarSize", String(info.narSize), numberProblem(info.narSize, true));
  out += `NarSize: ${info.narSize}\n`;
  for (const ref of info.references) {
    check("reference", ref, storePathBaseNameProblem(ref));
  }
  out += `References: ${sortedUnique(info.references).join(" ")}\n`;
  if (info.deriver !== undefined) {
    check("Deriver", info.deriver, storePathBaseNameProblem(info.deriver));
    out += `Deriver: ${info.deriver}\n`;
  }
  for (const sig of sortedUnique(info.sigs)) {
    check("Sig", sig, signatureProblem(sig));
    out += `Sig: ${sig}\n`;
  }
  if (info.ca !== undefined) {
    out += `CA: ${caField(info.ca, invalid("CA", info.ca))}\n`;
  }
  return out;
}

/**
 * The string a narinfo signature covers, as Nix 2.8 computes it
 * (`ValidPathInfo::fingerprint`): `1;<StorePath>;<NarHash as sha256:nix32>;<NarSize>;`
 * followed by the full paths of the references, sorted, unique, comma-joined. URL,
 * Compression, FileHash, FileSize, Deriver and CA are not covered. Throws
 * {@link FormatError} when a covered field is invalid.
 */
export function narInfoFingerprint(info: NarInfo): string {
  const invalid = (key: string, value: string) => (detail: string): never => {
    throw new FormatError(
      `Cannot compute narinfo fingerprint: invalid ${key} '${shorten(value)}': ${detail}`,
    );
  };
  const check = (key: string, value: string, detail: string | undefined): void =>
    ensure(detail, invalid(key, value));
  check("StorePath", info.storePath, storePathProblem(info.storePath));
  const narHash = hashField(info.narHash, invalid("NarHash", info.narHash));
  check("NarSize", String(info.narSize), numberProblem(info.narSize, true));
  for (const ref of info.references) check("reference", ref, storePathBaseNameProblem(ref));
  const refs = sortedUnique(info.references).map((ref) => `${STORE_DIR}/${ref}`);
  return `1;${info.storePath};${narHash};${info.narSize};${refs.join(",")}`;
}

/** The references of `info` as full store paths, sorted and unique. */
export function narInfoReferencePaths(info: NarInfo): string[] {
  return sortedUnique(info.references).map((ref) => `${STORE_DIR}/${ref}`);
}

function decodeInput(input: string | Uint8Array, maxBytes: number): string {
  const tooBig = () => new FormatError(`Cannot parse narinfo: larger than ${maxBytes} bytes`);
  if (typeof input !== "string") {
    if (input.length > maxBytes) throw tooBig();
    try {
      return new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(input);
    } catch (cause) {
      throw new FormatError("Cannot parse narinfo: not valid UTF-8", { cause });
    }
  }
  // Cheap bound first; count UTF-8 bytes only when it could matter.
  if (input.length > maxBytes) throw tooBig();
  if (input.length * 3 > maxBytes && new TextEncoder().encode(input).length > maxBytes) {
    throw tooBig();
  }
  return input;
}

function fail(line: number, detail: string): never {
  throw new FormatError(`Cannot parse narinfo line ${line}: ${detail}`);
}

function failMissing(key: string): never {
  throw new FormatError(`Cannot parse narinfo: missing ${key}`);
}

function ensure(detail: string | undefined, invalid: (detail: string) => never): void {
  if (detail !== undefined) invalid(detail);
}

function hashField(value: string, invalid: (detail: string) => never): string {
  const digest = tryParseNixHash(value);
  return typeof digest === "string" ? invalid(digest) : formatNixHash(digest);
}

function sizeField(value: string, invalid: (detail: string) => never): number {
  if (!SIZE_RE.test(value)) invalid("expected a non-negative decimal integer");
  const n = Number(value);
  if (!Number.isSafeInteger(n)) invalid("too large");
  return n;
}

/** Validates a content address and rewrites its hash in nix32, as Nix renders it. */
function caField(value: string, invalid: (detail: string) => never): string {
  const m = CA_RE.exec(value) ??
    invalid("expected 'text:sha256:<hash>' or 'fixed:[r:]<type>:<hash>'");
  const [, method, type, body] = m;
  const size = Object.hasOwn(NIX_HASH_TYPES, type)
    ? NIX_HASH_TYPES[type]
    : invalid(`unknown hash type '${type}'`);
  if (method === "text:" && type !== "sha256") invalid("a text content address uses sha256");
  const digest = decodeHashBody(body, size) ?? invalid(`invalid ${type} hash`);
  return `${method}${type}:${encodeNixBase32(digest)}`;
}

function urlProblem(value: string): string | undefined {
  if (value === "") return "empty";
  if (!NO_SPACE_RE.test(value)) return "contains whitespace or control characters";
  return undefined;
}

function compressionProblem(value: string, allowEmpty: boolean): string | undefined {
  if (value === "") return allowEmpty ? undefined : "empty";
  if (!COMPRESSION_RE.test(value)) return "expected a compression method such as xz or zstd";
  return undefined;
}

function signatureProblem(value: string): string | undefined {
  if (value === "") return "empty";
  if (!SIG_RE.test(value)) return "expected printable ASCII without spaces";
  return undefined;
}

function numberProblem(value: number, positive = false): string | undefined {
  if (!Number.isSafeInteger(value) || value < 0) return "expected a non-negative integer";
  if (positive && value === 0) return "must be positive";
  return undefined;
}

function sortedUnique(items: readonly string[]): string[] {
  return [...new Set(items)].sort();
}

// deno-lint-ignore no-control-regex -- escaping control characters in messages is the point
const CONTROL_GLOBAL_RE = /[\x00-\x1f\x7f]/g;

function shorten(text: string): string {
  const clean = text.replace(
    CONTROL_GLOBAL_RE,
    (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}`,
  );
  return clean.length > 120 ? `${clean.slice(0, 117)}...` : clean;
}
