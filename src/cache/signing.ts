/**
 * Nix's Ed25519 signing keys and narinfo signatures, on node:crypto.
 *
 * Formats (as `nix key generate-secret` and `nix key convert-secret-to-public` write them):
 * - secret key: `<name>:<base64(seed32 ‖ public32)>` (libsodium's 64-byte secret key);
 * - public key: `<name>:<base64(public32)>`;
 * - signature (a narinfo `Sig:` value): `<name>:<base64(signature64)>` over the narinfo
 *   fingerprint ({@link narInfoFingerprint}).
 *
 * Key names may hold any printable ASCII except `:` and spaces (Nix splits at the first `:`,
 * and `trusted-public-keys` is a space-separated list). Node KeyObjects are cached, so
 * verifying many narinfos against the same keys does not re-import them.
 * Pure: no I/O (randomness only in {@link generateSecretKey}).
 * @module
 */

import { Buffer } from "node:buffer";
import {
  createPrivateKey,
  createPublicKey,
  type KeyObject,
  randomBytes,
  sign as cryptoSign,
  verify as cryptoVerify,
} from "node:crypto";
import { FormatError, SignatureError } from "../errors.ts";
import { decodeBase64, encodeBase64 } from "./hash.ts";
import { type NarInfo, narInfoFingerprint } from "./narinfo.ts";

/** An Ed25519 secret key in Nix's form. */
export interface SecretKey {
  /** Key name, e.g. `cache.example.org-1`. */
  name: string;
  /** The 32-byte Ed25519 seed. */
  seed: Uint8Array;
  /** The 32-byte public key belonging to `seed`. */
  publicKey: Uint8Array;
}

/** An Ed25519 public key in Nix's form. */
export interface PublicKey {
  /** Key name, matched against the name in `Sig:` values. */
  name: string;
  /** The 32-byte public key. */
  key: Uint8Array;
}

/** Options of {@link generateSecretKey}. */
export interface GenerateSecretKeyOptions {
  /** The 32-byte seed to use instead of fresh random bytes (for test vectors). */
  seed?: Uint8Array;
}

const PKCS8_ED25519_PREFIX = Uint8Array.from([
  0x30,
  0x2e,
  0x02,
  0x01,
  0x00,
  0x30,
  0x05,
  0x06,
  0x03,
  0x2b,
  0x65,
  0x70,
  0x04,
  0x22,
  0x04,
  0x20,
]);
const SPKI_ED25519_PREFIX = Uint8Array.from([
  0x30,
  0x2a,
  0x30,
  0x05,
  0x06,
  0x03,
  0x2b,
  0x65,
  0x70,
  0x03,
  0x21,
  0x00,
]);
const KEY_NAME_RE = /^[\x21-\x39\x3b-\x7e]+$/; // printable ASCII, no space, no ':'
const CACHE_LIMIT = 1024;
const encoder = new TextEncoder();

// Secret KeyObjects hang off the SecretKey object (no secret material as map keys);
// public ones are shared by key bytes, bounded.
const privateKeyCache = new WeakMap<SecretKey, { seed: Uint8Array; object: KeyObject }>();
const publicKeyCache = new Map<string, KeyObject>();

/**
 * Throws {@link FormatError} unless `name` is a usable key name: non-empty printable ASCII
 * without `:` or spaces.
 */
export function validateKeyName(name: string): void {
  if (!KEY_NAME_RE.test(name)) {
    throw new FormatError(
      `Invalid key name '${name}': expected non-empty printable ASCII without ':' or spaces`,
    );
  }
}

/**
 * Parses a Nix secret key file's contents, `name:base64(seed ‖ public)`; surrounding
 * whitespace (the trailing newline) is ignored. Throws {@link FormatError} when it is
 * malformed and {@link SignatureError} when the public half does not belong to the seed.
 */
export function parseSecretKey(text: string): SecretKey {
  const [name, bytes] = splitKey(text.trim(), "secret key", 64);
  const seed = bytes.slice(0, 32);
  const publicKey = bytes.slice(32);
  if (!equalBytes(derivePublicKey(seed), publicKey)) {
    throw new SignatureError(
      `Invalid secret key '${name}': its public half does not belong to its seed`,
    );
  }
  return { name, seed, publicKey };
}

/** Writes a secret key as Nix does: `name:base64(seed ‖ public)` (no newline). */
export function formatSecretKey(key: SecretKey): string {
  validateKeyName(key.name);
  checkLength(key.seed, 32, "secret key seed");
  checkLength(key.publicKey, 32, "public key");
  const bytes = new Uint8Array(64);
  bytes.set(key.seed, 0);
  bytes.set(key.publicKey, 32);
  return `${key.name}:${encodeBase64(bytes)}`;
}

/**
 * Parses a Nix public key, `name:base64(public)` (as in `trusted-public-keys`);
 * surrounding whitespace is ignored. Throws {@link FormatError} when malformed.
 */
export function parsePublicKey(text: string): PublicKey {
  const [name, key] = splitKey(text.trim(), "public key", 32);
  return { name, key };
}

/** Writes a public key as Nix does: `name:base64(public)`. */
export function formatPublicKey(key: PublicKey): string {
  validateKeyName(key.name);
  checkLength(key.key, 32, "public key");
  return `${key.name}:${encodeBase64(key.key)}`;
}

/** The public key of a secret key (same name). */
export function publicKeyOf(secret: SecretKey): PublicKey {
  return { name: secret.name, key: secret.publicKey.slice() };
}

/**
 * Makes a new Ed25519 key named `name` (what `nix key generate-secret --key-name` does).
 * Throws {@link FormatError} for an unusable name (empty, `:` or spaces).
 */
export function generateSecretKey(
  name: string,
  options: GenerateSecretKeyOptions = {},
): SecretKey {
  validateKeyName(name);
  const seed = options.seed ? options.seed.slice() : new Uint8Array(randomBytes(32));
  checkLength(seed, 32, "secret key seed");
  return { name, seed, publicKey: derivePublicKey(seed) };
}

/** Signs `fingerprint` (any string) with `key`; returns `name:base64(signature)`. */
export function signFingerprint(fingerprint: string, key: SecretKey): string {
  const signature = cryptoSign(null, encoder.encode(fingerprint), privateKeyObject(key));
  return `${key.name}:${encodeBase64(signature)}`;
}

/**
 * Signs a narinfo as Nix does (`nix store sign`): an Ed25519 signature over
 * {@link narInfoFingerprint}. Returns the `Sig:` value, `name:base64(signature)`; it does
 * not add it to `info`.
 */
export function signNarInfo(info: NarInfo, key: SecretKey): string {
  return signFingerprint(narInfoFingerprint(info), key);
}

/**
 * True when `signature` (`name:base64(signature)`) is a valid signature of `fingerprint` by
 * one of `trusted` with the same name. A malformed signature is false, never an error.
 */
export function verifyFingerprint(
  fingerprint: string,
  signature: string,
  trusted: readonly PublicKey[],
): boolean {
  return verifyWith(encoder.encode(fingerprint), signature, trusted);
}

/**
 * True when any `Sig` of `info` is a valid signature from a key in `trusted` (matched by
 * name, as Nix does). Malformed signatures and unknown names are ignored, never thrown.
 * Throws {@link FormatError} only when `info` itself has no valid fingerprint.
 */
export function verifyNarInfoSignatures(info: NarInfo, trusted: readonly PublicKey[]): boolean {
  return validSignatureKeys(info, trusted).length > 0;
}

/**
 * The names of the trusted keys that validly signed `info` (empty when none did), for
 * callers that need more than one signature or want to report which key signed.
 */
export function validSignatureKeys(info: NarInfo, trusted: readonly PublicKey[]): string[] {
  if (info.sigs.length === 0 || trusted.length === 0) return [];
  const message = encoder.encode(narInfoFingerprint(info));
  const names = new Set<string>();
  for (const sig of info.sigs) {
    const name = signatureKeyName(sig);
    if (name === undefined || names.has(name)) continue;
    if (verifyWith(message, sig, trusted)) names.add(name);
  }
  return [...names];
}

/** The key name of a `name:base64` signature, or undefined when there is no name. */
export function signatureKeyName(signature: string): string | undefined {
  const colon = signature.indexOf(":");
  return colon > 0 ? signature.slice(0, colon) : undefined;
}

function verifyWith(message: Uint8Array, signature: string, trusted: readonly PublicKey[]) {
  const colon = signature.indexOf(":");
  if (colon <= 0) return false;
  const name = signature.slice(0, colon);
  const text = signature.slice(colon + 1);
  if (text.length !== 88) return false; // base64 of 64 bytes
  let sig: Uint8Array;
  try {
    sig = decodeBase64(text, "signature");
  } catch {
    return false;
  }
  if (sig.length !== 64) return false;
  for (const key of trusted) {
    if (key.name !== name || key.key.length !== 32) continue;
    try {
      if (cryptoVerify(null, message, publicKeyObject(key.key), sig)) return true;
    } catch {
      // A key node:crypto refuses (not a curve point) verifies nothing.
    }
  }
  return false;
}

function splitKey(text: string, what: string, size: number): [string, Uint8Array] {
  const colon = text.indexOf(":");
  if (colon <= 0) throw new FormatError(`Cannot parse ${what}: expected 'name:base64'`);
  const name = text.slice(0, colon);
  if (!KEY_NAME_RE.test(name)) {
    throw new FormatError(
      `Cannot parse ${what}: invalid key name '${name}': expected printable ASCII without spaces`,
    );
  }
  const bytes = decodeBase64(text.slice(colon + 1), `${what} '${name}'`);
  if (bytes.length !== size) {
    throw new FormatError(
      `Cannot parse ${what} '${name}': expected ${size} bytes, got ${bytes.length}`,
    );
  }
  return [name, bytes];
}

function derivePublicKey(seed: Uint8Array): Uint8Array {
  const spki = createPublicKey(privateKeyFromSeed(seed)).export({ format: "der", type: "spki" });
  return new Uint8Array(spki.subarray(SPKI_ED25519_PREFIX.length));
}

function privateKeyFromSeed(seed: Uint8Array): KeyObject {
  return createPrivateKey({
    key: Buffer.concat([PKCS8_ED25519_PREFIX, seed]),
    format: "der",
    type: "pkcs8",
  });
}

function privateKeyObject(key: SecretKey): KeyObject {
  checkLength(key.seed, 32, "secret key seed");
  const cached = privateKeyCache.get(key);
  if (cached && equalBytes(cached.seed, key.seed)) return cached.object;
  const object = privateKeyFromSeed(key.seed);
  privateKeyCache.set(key, { seed: key.seed.slice(), object });
  return object;
}

function publicKeyObject(key: Uint8Array): KeyObject {
  const id = encodeBase64(key);
  let object = publicKeyCache.get(id);
  if (!object) {
    object = createPublicKey({
      key: Buffer.concat([SPKI_ED25519_PREFIX, key]),
      format: "der",
      type: "spki",
    });
    if (publicKeyCache.size >= CACHE_LIMIT) {
      publicKeyCache.delete(publicKeyCache.keys().next().value!);
    }
    publicKeyCache.set(id, object);
  }
  return object;
}

function checkLength(bytes: Uint8Array, size: number, what: string): void {
  if (!(bytes instanceof Uint8Array) || bytes.length !== size) {
    throw new FormatError(`Invalid ${what}: expected ${size} bytes`);
  }
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a[i] ^ b[i];
  return diff === 0;
}
