/**
 * Segments: named subsets of the cache, each shared with its own swarm topic. A path
 * belongs to the first configured segment whose filter matches it:
 *
 * - `nixpkgs`: the path carries a `cache.nixos.org-1` signature (it came from nixpkgs'
 *   official cache, so every team can share it);
 * - `custom`: any other path (built here, or signed only by private keys);
 * - `all`: every path.
 *
 * An explicit segment name (e.g. `import --segment`) overrides the filters; it must be a
 * configured segment.
 * @module
 */

import type { SegmentConfig, SegmentFilter } from "../config.ts";
import { UsageError } from "../errors.ts";
import { signatureKeyName } from "./signing.ts";

/** The key name whose signature marks a path as coming from nixpkgs' official cache. */
export const NIXPKGS_KEY_NAME = "cache.nixos.org-1";

/** True when a path with these signatures passes `filter`. */
export function matchesFilter(filter: SegmentFilter, sigs: readonly string[]): boolean {
  if (filter === "all") return true;
  const fromNixpkgs = sigs.some((sig) => signatureKeyName(sig) === NIXPKGS_KEY_NAME);
  return filter === "nixpkgs" ? fromNixpkgs : !fromNixpkgs;
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
 * The segment of a path with these signatures: `override` if given (it must exist), else
 * the first segment whose filter matches; undefined when none does.
 */
export function segmentFor(
  segments: readonly SegmentConfig[],
  sigs: readonly string[],
  override?: string,
): string | undefined {
  if (override !== undefined) return findSegment(segments, override).name;
  return segments.find((segment) => matchesFilter(segment.filter, sigs))?.name;
}
