/**
 * The Noise protocol framework (revision 34), as a pure state machine: no sockets, no
 * timers, randomness only through {@link generateStaticKeyPair} and the ephemeral key a
 * caller may inject (the published test vectors pin it).
 *
 * Speaks `Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b` (the swarm's handshake; the PSK comes from
 * the segment's topic key, so only topic holders complete it) and plain
 * `Noise_XX_25519_ChaChaPoly_BLAKE2b` (for the vectors):
 *
 * ```
 * XX:                       XXpsk3:
 *   -> e                      -> e
 *   <- e, ee, s, es           <- e, ee, s, es
 *   -> s, se                  -> s, se, psk
 * ```
 *
 * Primitives, all from node:crypto: X25519 (DHLEN 32), ChaCha20-Poly1305 with the 96-bit
 * nonce `32 zero bits ‖ 64-bit little-endian counter` and a 16-byte tag, BLAKE2b-512
 * (HASHLEN 64, BLOCKLEN 128) with HMAC (node's `createHmac("blake2b512")`, checked against a
 * hand-written HMAC) and the spec's HKDF over it. In psk mode an `e`
 * token also calls `MixKey(e.public_key)` (spec §9.2). A Noise message is at most 65535
 * bytes. `CipherState.rekey()` is the spec's default REKEY: the first 32 bytes of
 * `ENCRYPT(k, 2^64 - 1, "", 32 zero bytes)`.
 *
 * Hostile input (short or long messages, failed authentication, low-order public keys,
 * calls out of turn) throws {@link ProtocolError}; after an error a handshake refuses every
 * further call. Key material of the wrong size in options throws {@link FormatError}.
 * @module
 */

import {
  createCipheriv,
  createDecipheriv,
  createHash,
  createHmac,
  createPrivateKey,
  createPublicKey,
  diffieHellman,
  generateKeyPairSync,
  type KeyObject,
} from "node:crypto";
import { Buffer } from "node:buffer";
import { FormatError, ProtocolError } from "../errors.ts";

/** Largest Noise message (handshake or transport), in bytes (spec §3). */
export const NOISE_MAX_MESSAGE_SIZE = 65535;
/** Size of the ChaChaPoly authentication tag appended to every ciphertext. */
export const NOISE_TAG_SIZE = 16;
/** Size of an X25519 public key, private key and shared secret (DHLEN). */
export const NOISE_DH_SIZE = 32;
/** Size of a BLAKE2b digest (HASHLEN). */
export const NOISE_HASH_SIZE = 64;
/** Size of a pre-shared key. */
export const NOISE_PSK_SIZE = 32;

/** The handshake patterns this module implements. */
export type NoisePattern = "XX" | "XXpsk3";

/** An X25519 key pair as raw 32-byte strings. */
export interface KeyPair {
  publicKey: Uint8Array;
  privateKey: Uint8Array;
}

/** A key pair whose public half may be left out (it is then derived from the private key). */
export interface PrivateKeyInput {
  privateKey: Uint8Array;
  publicKey?: Uint8Array;
}

const EMPTY = new Uint8Array(0);
const HASH = "blake2b512";
const CIPHER_KEY_SIZE = 32;
const MAX_NONCE = 0xffff_ffff_ffff_ffffn;
/** DER prefixes that turn raw X25519 keys into SPKI / PKCS#8 structures (RFC 8410). */
const SPKI_PREFIX = Buffer.from("302a300506032b656e032100", "hex");
const PKCS8_PREFIX = Buffer.from("302e020100300506032b656e04220420", "hex");

// ---------------------------------------------------------------------------------------
// X25519

interface PrivateKeyEntry {
  bytes: Uint8Array;
  key: KeyObject;
  publicKey: Uint8Array;
}

/** Imported private keys, by the identity of the caller's array (static keys repeat). */
const privateKeyCache = new WeakMap<Uint8Array, PrivateKeyEntry>();

function checkKeySize(bytes: Uint8Array, what: string): void {
  if (!(bytes instanceof Uint8Array) || bytes.length !== NOISE_DH_SIZE) {
    throw new FormatError(
      `Invalid X25519 ${what}: expected ${NOISE_DH_SIZE} bytes, got ${bytes?.length}`,
    );
  }
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function rawPublicKey(key: KeyObject): Uint8Array {
  const der = key.export({ format: "der", type: "spki" });
  return new Uint8Array(der.subarray(der.length - NOISE_DH_SIZE));
}

function privateKeyEntry(privateKey: Uint8Array): PrivateKeyEntry {
  const cached = privateKeyCache.get(privateKey);
  if (cached && sameBytes(cached.bytes, privateKey)) return cached;
  checkKeySize(privateKey, "private key");
  const key = createPrivateKey({
    key: Buffer.concat([PKCS8_PREFIX, privateKey]),
    format: "der",
    type: "pkcs8",
  });
  const entry = { bytes: privateKey.slice(), key, publicKey: rawPublicKey(createPublicKey(key)) };
  privateKeyCache.set(privateKey, entry);
  return entry;
}

/** Imports a peer's public key; malformed input is the peer's fault. */
function importRemote(publicKey: Uint8Array): KeyObject {
  try {
    return importPublicKey(publicKey);
  } catch (error) {
    throw new ProtocolError("Noise handshake failed: invalid public key", { cause: error });
  }
}

function importPublicKey(publicKey: Uint8Array): KeyObject {
  return createPublicKey({
    key: Buffer.concat([SPKI_PREFIX, publicKey]),
    format: "der",
    type: "spki",
  });
}

/** Generates a fresh X25519 key pair (a node's static identity, or an ephemeral key). */
export function generateStaticKeyPair(): KeyPair {
  const { privateKey, publicKey } = generateKeyPairSync("x25519");
  const der = privateKey.export({ format: "der", type: "pkcs8" });
  const raw = new Uint8Array(der.subarray(der.length - NOISE_DH_SIZE));
  const entry = { bytes: raw.slice(), key: privateKey, publicKey: rawPublicKey(publicKey) };
  privateKeyCache.set(raw, entry);
  return { publicKey: entry.publicKey.slice(), privateKey: raw };
}

/** The raw X25519 public key of a raw 32-byte private key. */
export function x25519PublicKey(privateKey: Uint8Array): Uint8Array {
  return privateKeyEntry(privateKey).publicKey.slice();
}

/**
 * Raw X25519: the 32-byte shared secret of a private and a public key. Throws
 * {@link ProtocolError} when the public key is of low order (the secret would be zero).
 */
export function x25519(privateKey: Uint8Array, publicKey: Uint8Array): Uint8Array {
  checkKeySize(publicKey, "public key");
  return dh(privateKeyEntry(privateKey).key, publicKey);
}

function dh(privateKey: KeyObject, publicKey: Uint8Array | KeyObject): Uint8Array {
  try {
    const key = publicKey instanceof Uint8Array ? importPublicKey(publicKey) : publicKey;
    return new Uint8Array(diffieHellman({ privateKey, publicKey: key }));
  } catch (error) {
    throw new ProtocolError("Noise DH failed: invalid or low-order public key", { cause: error });
  }
}

// ---------------------------------------------------------------------------------------
// Hash, HMAC, HKDF

function hash(...parts: Uint8Array[]): Uint8Array {
  const h = createHash(HASH);
  for (const part of parts) h.update(part);
  return new Uint8Array(h.digest());
}

function hmac(key: Uint8Array, ...parts: Uint8Array[]): Uint8Array {
  const h = createHmac(HASH, key);
  for (const part of parts) h.update(part);
  return new Uint8Array(h.digest());
}

/** The spec's HKDF (§4.3) with HMAC-BLAKE2b: 2 or 3 outputs of HASHLEN bytes. */
function hkdf(chainingKey: Uint8Array, ikm: Uint8Array, outputs: 2 | 3): Uint8Array[] {
  const tempKey = hmac(chainingKey, ikm);
  const out1 = hmac(tempKey, Uint8Array.of(1));
  const out2 = hmac(tempKey, out1, Uint8Array.of(2));
  if (outputs === 2) return [out1, out2];
  return [out1, out2, hmac(tempKey, out2, Uint8Array.of(3))];
}

// ---------------------------------------------------------------------------------------
// CipherState

/**
 * A Noise CipherState (spec §5.1): a ChaCha20-Poly1305 key and a 64-bit nonce counter.
 * Without a key, encryption and decryption pass data through unchanged (handshake only).
 */
export class CipherState {
  #key: Uint8Array | null;
  #nonce = 0n;
  readonly #iv = new Uint8Array(12);
  readonly #ivView = new DataView(this.#iv.buffer);

  /** Starts with `key` (32 bytes) or with no key, nonce 0. */
  constructor(key: Uint8Array | null = null) {
    if (key !== null && key.length !== CIPHER_KEY_SIZE) {
      throw new FormatError(`Invalid cipher key: expected 32 bytes, got ${key.length}`);
    }
    this.#key = key === null ? null : key.slice();
  }

  /** Whether a key is set. */
  hasKey(): boolean {
    return this.#key !== null;
  }

  /** The next nonce to be used. */
  get nonce(): bigint {
    return this.#nonce;
  }

  /** Sets the nonce (spec SetNonce; for tests and resumption). */
  setNonce(nonce: bigint): void {
    if (nonce < 0n || nonce > MAX_NONCE) throw new RangeError(`Nonce out of range: ${nonce}`);
    this.#nonce = nonce;
  }

  #checkNonce(): void {
    // 2^64 - 1 is reserved (spec §5.1): a key must never be used with it for messages.
    if (this.#nonce >= MAX_NONCE) {
      throw new ProtocolError("Noise nonce exhausted: the key must not be used again");
    }
  }

  #ivFor(nonce: bigint): Uint8Array {
    this.#ivView.setUint32(0, 0);
    this.#ivView.setBigUint64(4, nonce, true);
    return this.#iv;
  }

  /** Encrypts `plaintext` with associated data `ad`: ciphertext ‖ 16-byte tag. */
  encryptWithAd(ad: Uint8Array, plaintext: Uint8Array): Uint8Array {
    if (this.#key === null) return plaintext.slice();
    this.#checkNonce();
    const out = seal(this.#key, this.#ivFor(this.#nonce), ad, plaintext);
    this.#nonce++;
    return out;
  }

  /**
   * Decrypts and authenticates `ciphertext` (with its tag) under `ad`. Throws
   * {@link ProtocolError} when authentication fails; the nonce then stays unchanged.
   */
  decryptWithAd(ad: Uint8Array, ciphertext: Uint8Array): Uint8Array {
    if (this.#key === null) return ciphertext.slice();
    this.#checkNonce();
    if (ciphertext.length < NOISE_TAG_SIZE) {
      throw new ProtocolError(
        `Noise ciphertext too short: ${ciphertext.length} bytes, the tag alone is 16`,
      );
    }
    const out = open(this.#key, this.#ivFor(this.#nonce), ad, ciphertext);
    this.#nonce++;
    return out;
  }

  /** Noise Rekey(): replaces the key by REKEY(k); the nonce is unchanged (spec §11.3). */
  rekey(): void {
    if (this.#key === null) throw new ProtocolError("Cannot rekey a cipher state without a key");
    const block = seal(this.#key, this.#ivFor(MAX_NONCE), EMPTY, new Uint8Array(32));
    this.#key = block.slice(0, CIPHER_KEY_SIZE);
  }
}

function seal(key: Uint8Array, iv: Uint8Array, ad: Uint8Array, plaintext: Uint8Array): Uint8Array {
  const cipher = createCipheriv("chacha20-poly1305", key, iv, { authTagLength: NOISE_TAG_SIZE });
  cipher.setAAD(ad, { plaintextLength: plaintext.length });
  const body = cipher.update(plaintext);
  const tail = cipher.final();
  const tag = cipher.getAuthTag();
  const out = new Uint8Array(body.length + tail.length + NOISE_TAG_SIZE);
  out.set(body, 0);
  out.set(tail, body.length);
  out.set(tag, body.length + tail.length);
  return out;
}

function open(key: Uint8Array, iv: Uint8Array, ad: Uint8Array, ciphertext: Uint8Array): Uint8Array {
  const split = ciphertext.length - NOISE_TAG_SIZE;
  try {
    const decipher = createDecipheriv("chacha20-poly1305", key, iv, {
      authTagLength: NOISE_TAG_SIZE,
    });
    decipher.setAAD(ad, { plaintextLength: split });
    decipher.setAuthTag(ciphertext.subarray(split));
    const body = decipher.update(ciphertext.subarray(0, split));
    const tail = decipher.final();
    const out = new Uint8Array(body.length + tail.length);
    out.set(body, 0);
    out.set(tail, body.length);
    return out;
  } catch (error) {
    throw new ProtocolError("Noise decryption failed: message not authentic", { cause: error });
  }
}

// ---------------------------------------------------------------------------------------
// SymmetricState

/** A Noise SymmetricState (spec §5.2): chaining key, handshake hash and a CipherState. */
class SymmetricState {
  cipher = new CipherState();
  #ck: Uint8Array;
  #h: Uint8Array;

  constructor(protocolName: string) {
    const name = new TextEncoder().encode(protocolName);
    if (name.length <= NOISE_HASH_SIZE) {
      this.#h = new Uint8Array(NOISE_HASH_SIZE);
      this.#h.set(name);
    } else {
      this.#h = hash(name);
    }
    this.#ck = this.#h.slice();
  }

  get handshakeHash(): Uint8Array {
    return this.#h.slice();
  }

  mixKey(ikm: Uint8Array): void {
    const [ck, tempK] = hkdf(this.#ck, ikm, 2);
    this.#ck = ck;
    this.cipher = new CipherState(tempK.subarray(0, CIPHER_KEY_SIZE));
  }

  mixHash(data: Uint8Array): void {
    this.#h = hash(this.#h, data);
  }

  mixKeyAndHash(ikm: Uint8Array): void {
    const [ck, tempH, tempK] = hkdf(this.#ck, ikm, 3);
    this.#ck = ck;
    this.mixHash(tempH);
    this.cipher = new CipherState(tempK.subarray(0, CIPHER_KEY_SIZE));
  }

  encryptAndHash(plaintext: Uint8Array): Uint8Array {
    const ciphertext = this.cipher.encryptWithAd(this.#h, plaintext);
    this.mixHash(ciphertext);
    return ciphertext;
  }

  decryptAndHash(ciphertext: Uint8Array): Uint8Array {
    const plaintext = this.cipher.decryptWithAd(this.#h, ciphertext);
    this.mixHash(ciphertext);
    return plaintext;
  }

  split(): [CipherState, CipherState] {
    const [k1, k2] = hkdf(this.#ck, EMPTY, 2);
    return [
      new CipherState(k1.subarray(0, CIPHER_KEY_SIZE)),
      new CipherState(k2.subarray(0, CIPHER_KEY_SIZE)),
    ];
  }
}

// ---------------------------------------------------------------------------------------
// HandshakeState

type Token = "e" | "s" | "ee" | "es" | "se" | "ss" | "psk";

const PATTERNS: Record<NoisePattern, { messages: Token[][]; psk: boolean }> = {
  XX: { messages: [["e"], ["e", "ee", "s", "es"], ["s", "se"]], psk: false },
  XXpsk3: { messages: [["e"], ["e", "ee", "s", "es"], ["s", "se", "psk"]], psk: true },
};

/** The full Noise protocol name of a pattern, e.g. `Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b`. */
export function noiseProtocolName(pattern: NoisePattern): string {
  return `Noise_${pattern}_25519_ChaChaPoly_BLAKE2b`;
}

/** Options of {@link NoiseHandshake}. */
export interface NoiseHandshakeOptions {
  /** Whether this side sends the first message. */
  initiator: boolean;
  /** Our static key pair (the node identity). */
  staticKey: PrivateKeyInput;
  /** The handshake pattern (default `XXpsk3`). */
  pattern?: NoisePattern;
  /** Data both sides must agree on, mixed into the handshake hash (default empty). */
  prologue?: Uint8Array;
  /** The 32-byte pre-shared key; required by `XXpsk3`, refused by `XX`. */
  psk?: Uint8Array;
  /** A fixed ephemeral key (test vectors only); a fresh one is generated otherwise. */
  ephemeral?: PrivateKeyInput;
}

/** The two transport cipher states of a completed handshake, from this side's view. */
export interface TransportCiphers {
  /** Encrypts what this side sends. */
  send: CipherState;
  /** Decrypts what this side receives. */
  receive: CipherState;
}

/**
 * A Noise HandshakeState (spec §5.3) for XX or XXpsk3. Call {@link writeMessage} and
 * {@link readMessage} in turn (the initiator writes first) until {@link complete}, then
 * {@link split} for the transport ciphers.
 *
 * @example
 * ```ts
 * const psk = new Uint8Array(32);
 * const a = new NoiseHandshake({ initiator: true, staticKey: generateStaticKeyPair(), psk });
 * const b = new NoiseHandshake({ initiator: false, staticKey: generateStaticKeyPair(), psk });
 * b.readMessage(a.writeMessage());
 * a.readMessage(b.writeMessage());
 * b.readMessage(a.writeMessage());
 * const { send } = a.split();
 * const { receive } = b.split();
 * receive.decryptWithAd(new Uint8Array(), send.encryptWithAd(new Uint8Array(), payload));
 * ```
 */
export class NoiseHandshake {
  readonly #initiator: boolean;
  readonly #pattern: (typeof PATTERNS)[NoisePattern];
  readonly #state: SymmetricState;
  readonly #s: PrivateKeyEntry;
  readonly #psk: Uint8Array | null;
  #e: { key: KeyObject; publicKey: Uint8Array } | null = null;
  #presetEphemeral: PrivateKeyInput | undefined;
  #rs: Uint8Array | null = null;
  #re: Uint8Array | null = null;
  /** The remote keys imported once, each used in two DHs. */
  #rsKey: KeyObject | null = null;
  #reKey: KeyObject | null = null;
  #index = 0;
  #failed: ProtocolError | null = null;
  #ciphers: [CipherState, CipherState] | null = null;
  #splitDone = false;

  /** Initializes the handshake (spec Initialize(); XX has no pre-messages). */
  constructor(options: NoiseHandshakeOptions) {
    const patternName = options.pattern ?? "XXpsk3";
    const pattern = PATTERNS[patternName];
    if (pattern === undefined) throw new FormatError(`Unknown Noise pattern: ${patternName}`);
    this.#pattern = pattern;
    this.#initiator = options.initiator;
    if (pattern.psk) {
      if (!(options.psk instanceof Uint8Array) || options.psk.length !== NOISE_PSK_SIZE) {
        throw new FormatError(
          `Invalid Noise PSK: expected ${NOISE_PSK_SIZE} bytes, got ${options.psk?.length}`,
        );
      }
      this.#psk = options.psk.slice();
    } else {
      if (options.psk !== undefined) {
        throw new FormatError(`Noise pattern ${patternName} takes no PSK`);
      }
      this.#psk = null;
    }
    this.#s = privateKeyEntry(options.staticKey.privateKey);
    if (options.ephemeral !== undefined) {
      checkKeySize(options.ephemeral.privateKey, "private key");
      this.#presetEphemeral = options.ephemeral;
    }
    this.#state = new SymmetricState(noiseProtocolName(patternName));
    this.#state.mixHash(options.prologue ?? EMPTY);
  }

  /** Whether every handshake message has been written or read. */
  get complete(): boolean {
    return this.#failed === null && this.#index === this.#pattern.messages.length;
  }

  /** What the caller must do next. */
  get nextAction(): "write" | "read" | "done" | "failed" {
    if (this.#failed !== null) return "failed";
    if (this.#index === this.#pattern.messages.length) return "done";
    return this.#isOurTurn() ? "write" : "read";
  }

  /** The peer's static public key, once its `s` token has been read (else null). */
  get remoteStatic(): Uint8Array | null {
    return this.#rs === null ? null : this.#rs.slice();
  }

  /** Our static public key. */
  get localStatic(): Uint8Array {
    return this.#s.publicKey.slice();
  }

  /** The handshake hash `h` (final once {@link complete}; a channel-binding value). */
  get handshakeHash(): Uint8Array {
    return this.#state.handshakeHash;
  }

  #isOurTurn(): boolean {
    return (this.#index % 2 === 0) === this.#initiator;
  }

  #checkTurn(action: "write" | "read"): Token[] {
    if (this.#failed !== null) {
      throw new ProtocolError(`Noise handshake failed earlier: ${this.#failed.message}`);
    }
    if (this.#index >= this.#pattern.messages.length) {
      throw new ProtocolError(`Cannot ${action} a Noise handshake message: handshake complete`);
    }
    if (this.#isOurTurn() !== (action === "write")) {
      const expected = action === "write" ? "read" : "write";
      throw new ProtocolError(
        `Noise handshake out of order: expected to ${expected} message ${this.#index + 1}`,
      );
    }
    return this.#pattern.messages[this.#index];
  }

  #fail(error: unknown): never {
    const failure = error instanceof ProtocolError
      ? error
      : new ProtocolError(`Noise handshake failed: ${String(error)}`, { cause: error });
    this.#failed = failure;
    throw failure;
  }

  /** Writes the next handshake message carrying `payload` (encrypted when a key is set). */
  writeMessage(payload: Uint8Array = EMPTY): Uint8Array {
    const tokens = this.#checkTurn("write");
    try {
      const parts: Uint8Array[] = [];
      for (const token of tokens) parts.push(this.#writeToken(token));
      parts.push(this.#state.encryptAndHash(payload));
      const message = concat(parts);
      if (message.length > NOISE_MAX_MESSAGE_SIZE) {
        throw new ProtocolError(
          `Noise message too long: ${message.length} bytes, limit ${NOISE_MAX_MESSAGE_SIZE}`,
        );
      }
      this.#advance();
      return message;
    } catch (error) {
      this.#fail(error);
    }
  }

  /** Reads the peer's next handshake message and returns its payload. */
  readMessage(message: Uint8Array): Uint8Array {
    const tokens = this.#checkTurn("read");
    try {
      if (message.length > NOISE_MAX_MESSAGE_SIZE) {
        throw new ProtocolError(
          `Noise message too long: ${message.length} bytes, limit ${NOISE_MAX_MESSAGE_SIZE}`,
        );
      }
      let offset = 0;
      const take = (n: number, what: string): Uint8Array => {
        if (message.length - offset < n) {
          throw new ProtocolError(
            `Noise handshake message ${this.#index + 1} too short: ${message.length} bytes, ` +
              `no room for ${what}`,
          );
        }
        const part = message.subarray(offset, offset + n);
        offset += n;
        return part;
      };
      for (const token of tokens) this.#readToken(token, take);
      if (this.#state.cipher.hasKey() && message.length - offset < NOISE_TAG_SIZE) {
        take(NOISE_TAG_SIZE, "the payload tag");
      }
      const payload = this.#state.decryptAndHash(message.subarray(offset));
      this.#advance();
      return payload;
    } catch (error) {
      this.#fail(error);
    }
  }

  #advance(): void {
    this.#index++;
    if (this.#index === this.#pattern.messages.length) {
      const [c1, c2] = this.#state.split();
      this.#ciphers = this.#initiator ? [c1, c2] : [c2, c1];
    }
  }

  #ephemeral(): { key: KeyObject; publicKey: Uint8Array } {
    const preset = this.#presetEphemeral;
    if (preset !== undefined) {
      const entry = privateKeyEntry(preset.privateKey);
      return { key: entry.key, publicKey: entry.publicKey };
    }
    const { privateKey, publicKey } = generateKeyPairSync("x25519");
    return { key: privateKey, publicKey: rawPublicKey(publicKey) };
  }

  #writeToken(token: Token): Uint8Array {
    const state = this.#state;
    switch (token) {
      case "e": {
        this.#e = this.#ephemeral();
        state.mixHash(this.#e.publicKey);
        if (this.#pattern.psk) state.mixKey(this.#e.publicKey);
        return this.#e.publicKey.slice();
      }
      case "s":
        return state.encryptAndHash(this.#s.publicKey);
      case "psk":
        state.mixKeyAndHash(this.#psk!);
        return EMPTY;
      default:
        state.mixKey(this.#dhFor(token));
        return EMPTY;
    }
  }

  #readToken(token: Token, take: (n: number, what: string) => Uint8Array): void {
    const state = this.#state;
    switch (token) {
      case "e": {
        const re = take(NOISE_DH_SIZE, "the ephemeral key").slice();
        this.#re = re;
        state.mixHash(re);
        if (this.#pattern.psk) state.mixKey(re);
        return;
      }
      case "s": {
        const size = NOISE_DH_SIZE + (state.cipher.hasKey() ? NOISE_TAG_SIZE : 0);
        this.#rs = state.decryptAndHash(take(size, "the static key"));
        return;
      }
      case "psk":
        state.mixKeyAndHash(this.#psk!);
        return;
      default:
        state.mixKey(this.#dhFor(token));
    }
  }

  /** DH for ee/es/se/ss from this side's view (spec §5.3 token rules). */
  #dhFor(token: Token): Uint8Array {
    const e = this.#e;
    const fail = (): never => {
      throw new ProtocolError(`Noise handshake state broken: missing key for ${token}`);
    };
    const re = (): KeyObject => (this.#reKey ??= importRemote(this.#re ?? fail()));
    const rs = (): KeyObject => (this.#rsKey ??= importRemote(this.#rs ?? fail()));
    switch (token) {
      case "ee":
        return dh(e?.key ?? fail(), re());
      case "es":
        return this.#initiator ? dh(e?.key ?? fail(), rs()) : dh(this.#s.key, re());
      case "se":
        return this.#initiator ? dh(this.#s.key, re()) : dh(e?.key ?? fail(), rs());
      case "ss":
        return dh(this.#s.key, rs());
      default:
        return fail();
    }
  }

  /**
   * The transport cipher states (spec Split()), once the handshake is complete. May be
   * called once: the states are mutable and belong to the caller.
   */
  split(): TransportCiphers {
    if (this.#failed !== null) {
      throw new ProtocolError(`Noise handshake failed earlier: ${this.#failed.message}`);
    }
    if (this.#ciphers === null) throw new ProtocolError("Noise handshake is not complete");
    if (this.#splitDone) throw new ProtocolError("Noise handshake was already split");
    this.#splitDone = true;
    return { send: this.#ciphers[0], receive: this.#ciphers[1] };
  }
}

function concat(parts: Uint8Array[]): Uint8Array {
  let size = 0;
  for (const part of parts) size += part.length;
  const out = new Uint8Array(size);
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}
