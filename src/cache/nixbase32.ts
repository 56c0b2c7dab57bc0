/**
 * Nix's base-32 ("nix32"): the encoding of store path hash parts and of `sha256:…` hashes
 * in narinfo files.
 *
 * It is not RFC 4648 base-32. The alphabet `0123456789abcdfghijklmnpqrsvwxyz` leaves out
 * `e`, `o`, `u` and `t`, and the bits are taken from the END of the byte string: the first
 * character holds the most significant bits of the last byte. A string of `n` bytes
 * encodes to `ceil(8n / 5)` characters; the unused high bits of the first character must
 * be zero. Pure: no I/O.
 *
 * @example
 * ```ts
 * import { decodeNixBase32, encodeNixBase32 } from "./nixbase32.ts";
 * const text = encodeNixBase32(new Uint8Array([0xff]));
 * // text === "7z"
 * decodeNixBase32(text); // Uint8Array [ 255 ]
 * ```
 * @module
 */

import { FormatError } from "../errors.ts";

/** The 32 characters of Nix's base-32 alphabet, in digit order. */
export const NIX_BASE32_ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz";

const DIGITS: Int8Array = (() => {
  const table = new Int8Array(128).fill(-1);
  for (let i = 0; i < NIX_BASE32_ALPHABET.length; i++) {
    table[NIX_BASE32_ALPHABET.charCodeAt(i)] = i;
  }
  return table;
})();

/**
 * Length of the nix32 encoding of `byteLength` bytes: `ceil(8 * byteLength / 5)`
 * (e.g. 52 for a SHA-256 digest, 32 for a store path hash part).
 */
export function nixBase32Length(byteLength: number): number {
  return Math.ceil((byteLength * 8) / 5);
}

/**
 * Encodes bytes in Nix's base-32, as `nix hash to-base32` prints them.
 *
 * @example
 * ```ts
 * import { createHash } from "node:crypto";
 * const digest = createHash("sha256").update("abc").digest();
 * encodeNixBase32(digest); // "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"
 * ```
 */
export function encodeNixBase32(bytes: Uint8Array): string {
  const length = nixBase32Length(bytes.length);
  let out = "";
  for (let n = length - 1; n >= 0; n--) {
    const bit = n * 5;
    const i = bit >> 3;
    const j = bit & 7;
    const low = bytes[i] >> j;
    const high = i + 1 < bytes.length ? bytes[i + 1] << (8 - j) : 0;
    out += NIX_BASE32_ALPHABET[(low | high) & 0x1f];
  }
  return out;
}

/**
 * Decodes Nix's base-32. Throws {@link FormatError} on a character outside the alphabet,
 * on a length no byte string encodes to, or when the unused high bits of the first
 * character are not zero (such a string is not what Nix would print).
 */
export function decodeNixBase32(text: string): Uint8Array {
  const byteLength = Math.floor((text.length * 5) / 8);
  if (nixBase32Length(byteLength) !== text.length) {
    throw new FormatError(
      `Cannot decode nix base-32 '${
        abbreviate(text)
      }': length ${text.length} is not a valid encoded length`,
    );
  }
  const out = new Uint8Array(byteLength);
  for (let n = 0; n < text.length; n++) {
    const code = text.charCodeAt(text.length - n - 1);
    const digit = code < 128 ? DIGITS[code] : -1;
    if (digit < 0) {
      throw new FormatError(
        `Cannot decode nix base-32 '${abbreviate(text)}': invalid character '${
          text[text.length - n - 1]
        }'`,
      );
    }
    const bit = n * 5;
    const i = bit >> 3;
    const j = bit & 7;
    out[i] |= (digit << j) & 0xff;
    const carry = digit >> (8 - j);
    if (i + 1 < byteLength) {
      out[i + 1] |= carry;
    } else if (carry !== 0) {
      throw new FormatError(
        `Cannot decode nix base-32 '${abbreviate(text)}': non-zero bits beyond the encoded length`,
      );
    }
  }
  return out;
}

/** True when `text` is nix32 text of exactly `byteLength` bytes (no exceptions thrown). */
export function isNixBase32(text: string, byteLength: number): boolean {
  if (text.length !== nixBase32Length(byteLength)) return false;
  try {
    decodeNixBase32(text);
    return true;
  } catch {
    return false;
  }
}

function abbreviate(text: string): string {
  return text.length > 80 ? `${text.slice(0, 77)}...` : text;
}
