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
 * A transform that passes a NAR through while checking it against `claims`; the final
 * piece is released only if the NAR is right. Errors with {@link IntegrityError} as soon
 * as more than NarSize bytes arrive, and at the end on a hash or size mismatch.
 */
export function verifyNarStream(claims: NarClaims): TransformStream<Uint8Array, Uint8Array> {
  const expected = formatBase16(parseNixHash(claims.narHash));
  const name = claims.name ?? "NAR";
  const [hashName, sizeName] = claims.file ? ["FileHash", "FileSize"] : ["NarHash", "NarSize"];
  const hasher = new Sha256Stream();
  let held: Uint8Array | null = null;
  return new TransformStream<Uint8Array, Uint8Array>({
    transform(piece, controller) {
      if (piece.length === 0) return;
      hasher.update(piece);
      if (hasher.byteLength > claims.narSize) {
        throw new IntegrityError(
          `${name} is longer than its ${sizeName} ${claims.narSize}: refused`,
        );
      }
      if (held !== null) controller.enqueue(held);
      held = piece;
    },
    flush(controller) {
      const size = hasher.byteLength;
      if (size !== claims.narSize) {
        throw new IntegrityError(
          `${name} has ${size} bytes, its ${sizeName} is ${claims.narSize}: refused`,
        );
      }
      const actual = hasher.digest();
      if (formatBase16(actual) !== expected) {
        throw new IntegrityError(
          `${name} hashes to ${
            formatNixHash(actual)
          }, its ${hashName} is ${claims.narHash}: refused`,
        );
      }
      if (held !== null) controller.enqueue(held);
    },
  });
}
