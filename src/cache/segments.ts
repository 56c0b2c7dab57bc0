/**
 * Segments: named subsets of the cache, each shared with its own swarm topic. A path
 * belongs to the first configured segment whose filter matches it:
 *
 * - `nixpkgs`: the path carries a VALID `cache.nixos.org-1` signature (checked against
 *   that key: a signature line anyone can append proves nothing), i.e. it came from
 *   nixpkgs' official cache, so every team can share it;
 * - `custom`: any other path (built here, or signed only by private keys);
 * - `all`: every path.
 *
 * An explicit segment name (e.g. `import --segment`) overrides the filters; it must be a
 * configured segment.
 * @module
 */

import type { SegmentConfig, SegmentFilter } from "../config.ts";
import { UsageError } from "../errors.ts";
import type { NarInfo } from "./narinfo.ts";
import { parsePublicKey, type PublicKey, verifyNarInfoSignatures } from "./signing.ts";

/** The public key of nixpkgs' official cache, cache.nixos.org. */
export const NIXPKGS_PUBLIC_KEY: PublicKey = parsePublicKey(
  "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=",
);

/** What a filter looks at: the signed fields of a path and its signatures. */
export type SegmentSubject = Pick<
  NarInfo,
  "storePath" | "narHash" | "narSize" | "references" | "sigs"
>;

/** True when the path carries a valid signature of cache.nixos.org. */
export function signedByNixpkgs(subject: SegmentSubject): boolean {
  if (subject.sigs.length === 0) return false;
  try {
    return verifyNarInfoSignatures({ ...subject, url: "", compression: "" }, [NIXPKGS_PUBLIC_KEY]);
  } catch {
    return false; // fields that do not even make a fingerprint
  }
}

/** True when the path passes `filter`. */
export function matchesFilter(filter: SegmentFilter, subject: SegmentSubject): boolean {
  if (filter === "all") return true;
  return filter === "nixpkgs" ? signedByNixpkgs(subject) : !signedByNixpkgs(subject);
}

/** The configured segment called `name`; UsageError naming the known ones otherwise. */
export function findSegment(segments: readonly SegmentConfig[], name: string): SegmentConfig {
  const segment = segments.find((s) => s.name === name);
  if (!segment) {
    throw new UsageError(
      `Unknown segment '${name}': configured segments are ${
        segments.map((s) => s.name).join(", ") || "(none)"
      }`,
    );
  }
  return segment;
}

/**
 * The segment of a path: `override` if given (it must exist), else the first segment whose
 * filter matches; undefined when none does.
 */
export function segmentFor(
  segments: readonly SegmentConfig[],
  subject: SegmentSubject,
  override?: string,
): string | undefined {
  if (override !== undefined) return findSegment(segments, override).name;
  if (segments.every((segment) => segment.filter === "all")) return segments[0]?.name;
  const fromNixpkgs = signedByNixpkgs(subject); // one verification for all the filters
  return segments.find((segment) =>
    segment.filter === "all" || (segment.filter === "nixpkgs") === fromNixpkgs
  )?.name;
}
