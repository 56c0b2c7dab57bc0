/**
 * SHA-256 hashes in the textual forms Nix uses, and hashing itself (node:crypto).
 *
 * Formats read: `sha256:<nix32>` (52 chars, what narinfo files hold), `sha256:<base16>`
 * (64 hex digits), `sha256:<base64>` (44 chars) and SRI `sha256-<base64>` (what
 * `nix path-info --json` prints). Formats written: `sha256:<nix32>` and SRI. Only SHA-256
 * is supported: it is the only hash Nix puts in NarHash, FileHash and signature
 * fingerprints. Also owns strict padded base64, which the key and signature formats share.
 * Pure apart from hashing: no I/O.
 * @module
 */

import { Buffer } from "node:buffer";
import { createHash, type Hash } from "node:crypto";
import { FormatError } from "../errors.ts";
import { decodeNixBase32, encodeNixBase32, isNixBase32 } from "./nixbase32.ts";

/** Length of a SHA-256 digest in bytes. */
export const SHA256_BYTES = 32;

/**
 * Hash types Nix knows, with digest sizes in bytes. Content addresses (`CA: fixed:…`) may
 * use any of them; everything else here is SHA-256.
 */
export const NIX_HASH_TYPES: Readonly<Record<string, number>> = Object.freeze({
  md5: 16,
  sha1: 20,
  sha256: 32,
  sha512: 64,
});

const BASE64_RE = /^[A-Za-z0-9+/]*={0,2}$/;
const HEX_RE = /^[0-9a-fA-F]*$/;

/** SHA-256 of `bytes` (node:crypto). */
export function sha256(bytes: Uint8Array): Uint8Array {
  return new Uint8Array(createHash("sha256").update(bytes).digest());
}

/** An incremental SHA-256, as returned by {@link createSha256}. */
export interface Sha256Hasher {
  /** Feeds more bytes; returns the hasher for chaining. */
  update(bytes: Uint8Array): Sha256Hasher;
  /** Finishes and returns the 32-byte digest. The hasher cannot be used afterwards. */
  digest(): Uint8Array;
}

/**
 * Starts an incremental SHA-256 (node:crypto `createHash`), for hashing streams without
 * holding them in memory.
 *
 * @example
 * ```ts
 * const h = createSha256();
 * h.update(new TextEncoder().encode("ab")).update(new TextEncoder().encode("c"));
 * formatNixHash(h.digest()); // "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"
 * ```
 */
export function createSha256(): Sha256Hasher {
  return new Sha256Stream();
}

/** Class form of {@link createSha256}. */
export class Sha256Stream implements Sha256Hasher {
  #hash: Hash = createHash("sha256");
  #bytes = 0;

  /** Number of bytes fed so far. */
  get byteLength(): number {
    return this.#bytes;
  }

  /** Feeds more bytes; returns this for chaining. */
  update(bytes: Uint8Array): this {
    this.#hash.update(bytes);
    this.#bytes += bytes.length;
    return this;
  }

  /** Finishes and returns the 32-byte digest. */
  digest(): Uint8Array {
    return new Uint8Array(this.#hash.digest());
  }
}

/**
 * Parses a SHA-256 hash written as `sha256:<nix32>`, `sha256:<base16>`, `sha256:<base64>`
 * or SRI `sha256-<base64>`; returns the 32-byte digest. Throws {@link FormatError}
 * otherwise, including for other hash types (only sha256 is supported).
 *
 * @example
 * ```ts
 * const digest = parseNixHash("sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=");
 * formatNixHash(digest); // "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"
 * ```
 */
export function parseNixHash(text: string): Uint8Array {
  const result = tryParseNixHash(text);
  if (typeof result === "string") {
    throw new FormatError(`Cannot parse hash '${abbreviate(text)}': ${result}`);
  }
  return result;
}

/**
 * Like {@link parseNixHash}, but returns what is wrong (a few words, e.g. `hash type 'md5'
 * is not supported, only sha256 is`) instead of throwing, for callers that wrap the detail
 * in their own error.
 */
export function tryParseNixHash(text: string): Uint8Array | string {
  const sep = /^[a-z0-9]+([:-])/.exec(text);
  if (!sep) return "expected 'sha256:<hash>' or 'sha256-<base64>'";
  const type = text.slice(0, sep[0].length - 1);
  if (type !== "sha256") return `hash type '${type}' is not supported, only sha256 is`;
  const body = text.slice(sep[0].length);
  if (sep[1] === "-") {
    const digest = tryDecodeBase64(body);
    return digest?.length === SHA256_BYTES ? digest : "invalid SRI base64 digest";
  }
  return decodeHashBody(body, SHA256_BYTES) ??
    "expected 52 nix32, 64 base16 or 44 base64 characters after 'sha256:'";
}

/**
 * Decodes the part of a Nix hash after `<type>:` for a digest of `size` bytes, choosing
 * the encoding by length as Nix does (base16, nix32 or base64). Returns undefined when
 * `body` is none of them.
 */
export function decodeHashBody(body: string, size: number): Uint8Array | undefined {
  if (body.length === size * 2) {
    if (!HEX_RE.test(body)) return undefined;
    const out = new Uint8Array(size);
    for (let i = 0; i < size; i++) out[i] = parseInt(body.slice(2 * i, 2 * i + 2), 16);
    return out;
  }
  if (isNixBase32(body, size)) return decodeNixBase32(body);
  const digest = tryDecodeBase64(body);
  return digest?.length === size ? digest : undefined;
}

/** Formats a SHA-256 digest as Nix writes it in narinfo files: `sha256:<nix32>`. */
export function formatNixHash(digest: Uint8Array): string {
  checkDigest(digest);
  return `sha256:${encodeNixBase32(digest)}`;
}

/** Formats a SHA-256 digest as an SRI hash, `sha256-<base64>`, as `nix path-info --json` does. */
export function formatSriHash(digest: Uint8Array): string {
  checkDigest(digest);
  return `sha256-${encodeBase64(digest)}`;
}

/** Formats a SHA-256 digest as 64 lowercase hex digits (no prefix). */
export function formatBase16(digest: Uint8Array): string {
  let out = "";
  for (const byte of digest) out += byte.toString(16).padStart(2, "0");
  return out;
}

/**
 * Rewrites any SHA-256 form {@link parseNixHash} accepts as `sha256:<nix32>`.
 * Throws {@link FormatError} when `text` is not one.
 */
export function normalizeNixHash(text: string): string {
  return formatNixHash(parseNixHash(text));
}

/**
 * The nix32 digest alone of any SHA-256 form {@link parseNixHash} accepts (what NAR file
 * names and their URLs use). Throws {@link FormatError} when `text` is not one.
 */
export function nix32Digest(text: string): string {
  return encodeNixBase32(parseNixHash(text));
}

/** Standard padded base64 (RFC 4648 §4), as Nix writes keys, signatures and SRI hashes. */
export function encodeBase64(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("base64");
}

/**
 * Strict standard padded base64: only the base64 alphabet, correct padding, and zero
 * unused bits (so every byte string has exactly one accepted text). Throws
 * {@link FormatError} naming `what` (e.g. "public key") otherwise.
 */
export function decodeBase64(text: string, what = "base64 text"): Uint8Array {
  const bytes = tryDecodeBase64(text);
  if (!bytes) throw new FormatError(`Cannot decode ${what}: invalid base64`);
  return bytes;
}

function tryDecodeBase64(text: string): Uint8Array | undefined {
  if (text.length % 4 !== 0 || !BASE64_RE.test(text)) return undefined;
  const bytes = Buffer.from(text, "base64");
  // Round-trip to reject non-zero padding bits and misplaced '='.
  if (bytes.toString("base64") !== text) return undefined;
  return new Uint8Array(bytes); // a copy: small Buffers share a pool
}

function checkDigest(digest: Uint8Array): void {
  if (digest.length !== SHA256_BYTES) {
    throw new FormatError(
      `Cannot format hash: a SHA-256 digest has ${SHA256_BYTES} bytes, got ${digest.length}`,
    );
  }
}

function abbreviate(text: string): string {
  return text.length > 100 ? `${text.slice(0, 97)}...` : text;
}
