/**
 * A NAR stream that can never hand out wrong data whole: bytes pass through as they come,
 * but the last piece is held back until the end of the input, and is released only when
 * the whole NAR hashes to the NarHash and has the NarSize it must have. Otherwise the
 * stream errors, so an HTTP client sees a body cut short (Nix fails the substitution; it
 * never installs it) instead of a complete body with wrong bytes.
 *
 * Used where arca serves a NAR while it is still arriving from elsewhere (peers, upstream
 * caches), before it could check it.
 * @module
 */

import { IntegrityError } from "../errors.ts";
import { formatBase16, formatNixHash, parseNixHash, Sha256Stream } from "./hash.ts";

/** What the NAR must be. */
export interface NarClaims {
  /** Any SHA-256 form {@link parseNixHash} reads. */
  narHash: string;
  narSize: number;
  /** Names the NAR in errors (e.g. its store path). */
  name?: string;
  /**
   * The stream is a NAR file (compressed) and the claims are its FileHash and FileSize:
   * errors say so.
   */
  file?: boolean;
}

/**
 * Checks a NAR (or NAR file) fed piece by piece against `claims`: {@link NarCheck.update}
 * throws {@link IntegrityError} as soon as more than the claimed size has come, and
 * {@link NarCheck.finish} on a size or hash mismatch at the end.
 */
export class NarCheck {
  #expected: string;
  #claims: NarClaims;
  #hasher = new Sha256Stream();

  constructor(claims: NarClaims) {
    this.#expected = formatBase16(parseNixHash(claims.narHash));
    this.#claims = claims;
  }

  /** Feeds a piece; throws once the input is longer than claimed. */
  update(piece: Uint8Array): void {
    this.#hasher.update(piece);
    if (this.#hasher.byteLength > this.#claims.narSize) {
      throw new IntegrityError(
        `${this.#name} is longer than its ${this.#names[1]} ${this.#claims.narSize}: refused`,
      );
    }
  }

  /** Throws unless everything fed has the claimed size and hash. */
  finish(): void {
    const claims = this.#claims;
    const [hashName, sizeName] = this.#names;
    const size = this.#hasher.byteLength;
    if (size !== claims.narSize) {
      throw new IntegrityError(
        `${this.#name} has ${size} bytes, its ${sizeName} is ${claims.narSize}: refused`,
      );
    }
    const actual = this.#hasher.digest();
    if (formatBase16(actual) !== this.#expected) {
      throw new IntegrityError(
        `${this.#name} hashes to ${
          formatNixHash(actual)
        }, its ${hashName} is ${claims.narHash}: refused`,
      );
    }
  }

  get #name(): string {
    return this.#claims.name ?? "NAR";
  }

  get #names(): [string, string] {
    return this.#claims.file ? ["FileHash", "FileSize"] : ["NarHash", "NarSize"];
  }
}

/**
 * A transform that passes a NAR through while checking it against `claims` ({@link NarCheck});
 * the final piece is released only if the NAR is right. Errors with {@link IntegrityError}
 * as soon as more than NarSize bytes arrive, and at the end on a hash or size mismatch.
 */
export function verifyNarStream(claims: NarClaims): TransformStream<Uint8Array, Uint8Array> {
  const check = new NarCheck(claims);
  let held: Uint8Array | null = null;
  return new TransformStream<Uint8Array, Uint8Array>({
    transform(piece, controller) {
      if (piece.length === 0) return;
      check.update(piece);
      if (held !== null) controller.enqueue(held);
      held = piece;
    },
    flush(controller) {
      check.finish();
      if (held !== null) controller.enqueue(held);
    },
  });
}
