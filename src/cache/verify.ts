/**
 * `arca verify`: checks every chunk file against its id (decompressed, hashed) and every
 * cached path's NAR against its NarHash and NarSize. With repair, it deletes the broken
 * chunk files, then, for every path whose NAR is broken, asks the refetchers in turn
 * (upstream caches, peers) to fetch its NAR again and re-import it under the recorded
 * metadata (the NAR must hash to the recorded NarHash); a path no refetcher restores loses
 * its narinfo, so that Nix never gets a broken NAR with status 200 (it moves on to its next
 * substituter). A later import or upload of the same content stores deleted chunks again.
 * @module
 */

import type { Cache } from "./cache.ts";
import type { PathRecord } from "./metadata.ts";
import { decompressChunk } from "./compression.ts";
import { createSha256, formatBase16, formatNixHash, parseNixHash, sha256 } from "./hash.ts";
import { parseStorePath } from "./store_path.ts";

/**
 * Fetches a broken path's NAR again and re-imports it under `record`'s metadata (the NAR
 * must hash to the recorded NarHash). Resolves to where it came from (e.g. an upstream's
 * URL), or null when this source does not have it; rejects when the fetch failed.
 */
export type Refetcher = (record: PathRecord) => Promise<string | null>;

/** What `verify` found (and, with repair, refetched or removed). */
export interface VerifyReport {
  chunksChecked: number;
  badChunks: { id: string; compression: string; reason: string }[];
  pathsChecked: number;
  badPaths: { storePath: string; reason: string }[];
  /** Broken paths a refetcher restored (with repair); the other broken paths were removed. */
  refetched: { storePath: string; from: string }[];
  repaired: boolean;
}

/** Options of {@link verifyCache}. */
export interface VerifyOptions {
  /** Delete broken chunks; refetch broken paths, or remove their narinfos. */
  repair?: boolean;
  /** Asked in order, with repair, for each broken path (upstreams, peers). */
  refetchers?: readonly Refetcher[];
  onProgress?: (message: string) => void;
}

/** Checks the whole cache; with `repair`, refetches or removes what is broken. */
export async function verifyCache(
  cache: Cache,
  options: VerifyOptions = {},
): Promise<VerifyReport> {
  const report: VerifyReport = {
    chunksChecked: 0,
    badChunks: [],
    pathsChecked: 0,
    badPaths: [],
    refetched: [],
    repaired: false,
  };
  const bad = new Set<string>();
  for await (const entry of cache.chunks.entries()) {
    report.chunksChecked++;
    if (report.chunksChecked % 1000 === 0) {
      options.onProgress?.(`${report.chunksChecked} chunks checked`);
    }
    let reason: string | undefined;
    try {
      const bytes = await cache.chunks.read(entry.id, entry.compression);
      const chunk = decompressChunk(bytes, entry.compression);
      if (formatBase16(sha256(chunk)) !== entry.id) reason = "content does not match its id";
    } catch (error) {
      reason = (error as Error).message;
    }
    if (reason !== undefined) {
      bad.add(`${entry.id}.${entry.compression}`);
      report.badChunks.push({ id: entry.id, compression: entry.compression, reason });
    }
  }
  for await (const record of cache.listPaths()) {
    report.pathsChecked++;
    const reason = await checkPath(cache, record.narInfo.storePath, bad);
    if (reason !== undefined) report.badPaths.push({ storePath: record.narInfo.storePath, reason });
  }
  if (options.repair) {
    // Damaged chunk files go first: an import finds a chunk it has by its file, and would
    // keep the damaged one.
    for (const chunk of report.badChunks) {
      await cache.chunks.delete(chunk.id, chunk.compression as "zstd" | "xz" | "none");
    }
    for (const { storePath, reason } of report.badPaths) {
      const from = await refetch(cache, storePath, options);
      if (from !== null) {
        report.refetched.push({ storePath, from });
        continue;
      }
      await cache.metadata.deletePath(parseStorePath(storePath).hash);
      await cache.audit.append([{
        type: "GarbageCollect",
        storePath,
        detail: `removed by verify --repair: ${reason}`,
      }]);
    }
    report.repaired = true;
  }
  return report;
}

/**
 * Restores a broken path with the first refetcher that has it, checking the result; where
 * it came from, or null when none restored it (failures are reported as progress).
 */
async function refetch(
  cache: Cache,
  storePath: string,
  options: VerifyOptions,
): Promise<string | null> {
  const hashPart = parseStorePath(storePath).hash;
  for (const refetcher of options.refetchers ?? []) {
    const record = await cache.getPath(hashPart);
    if (record === null) return null;
    // Another path's refetch may have restored the chunks this one shares with it.
    if (await checkPath(cache, storePath, new Set()) === undefined) {
      return "chunks restored with another path";
    }
    let from: string | null;
    try {
      from = await refetcher(record);
    } catch (error) {
      options.onProgress?.(`refetch of ${storePath} failed: ${(error as Error).message}`);
      continue;
    }
    if (from === null) continue;
    const still = await checkPath(cache, storePath, new Set());
    if (still === undefined) return from;
    options.onProgress?.(`${storePath} refetched from ${from} is still broken: ${still}`);
  }
  return null;
}

/** Why a path's NAR is broken, or undefined when it is whole and right. */
async function checkPath(
  cache: Cache,
  storePath: string,
  badChunks: Set<string>,
): Promise<string | undefined> {
  const stored = await cache.narOfPath(parseStorePath(storePath).hash).catch(() => null);
  if (stored === null) return "its NAR manifest is missing or damaged";
  const { manifest, record } = stored;
  const broken = manifest.chunks.find((c) => badChunks.has(`${c.id}.${manifest.compression}`));
  if (broken) return `chunk ${broken.id} is damaged`;
  const missing = await cache.missingChunks(manifest);
  if (missing.length > 0) return `${missing.length} chunk(s) missing, e.g. ${missing[0]}`;
  const hash = createSha256();
  let size = 0;
  try {
    for await (const piece of cache.openNar(manifest)) {
      hash.update(piece);
      size += piece.length;
    }
  } catch (error) {
    return (error as Error).message;
  }
  const narHash = formatNixHash(hash.digest());
  if (narHash !== formatNixHash(parseNixHash(record.narInfo.narHash))) {
    return `NAR hash ${narHash} is not the narinfo's ${record.narInfo.narHash}`;
  }
  if (size !== record.narInfo.narSize) {
    return `NAR size ${size} is not the narinfo's ${record.narInfo.narSize}`;
  }
  return undefined;
}
