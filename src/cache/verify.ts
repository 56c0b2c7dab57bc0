/**
 * `arca verify`: checks every chunk file against its id (decompressed, hashed) and every
 * cached path's NAR against its NarHash and NarSize; with repair, removes the narinfo of
 * every path whose NAR is broken (so that Nix never gets a broken NAR with status 200; it
 * moves on to its next substituter) and deletes the broken chunk files (a later import or
 * upload of the same content stores them again).
 * @module
 */

import type { Cache } from "./cache.ts";
import { decompressChunk } from "./compression.ts";
import { createSha256, formatBase16, formatNixHash, parseNixHash, sha256 } from "./hash.ts";
import { parseStorePath } from "./store_path.ts";

/** What `verify` found (and, with repair, removed). */
export interface VerifyReport {
  chunksChecked: number;
  badChunks: { id: string; compression: string; reason: string }[];
  pathsChecked: number;
  badPaths: { storePath: string; reason: string }[];
  repaired: boolean;
}

/** Checks the whole cache; with `repair`, removes what is broken. */
export async function verifyCache(
  cache: Cache,
  options: { repair?: boolean; onProgress?: (message: string) => void } = {},
): Promise<VerifyReport> {
  const report: VerifyReport = {
    chunksChecked: 0,
    badChunks: [],
    pathsChecked: 0,
    badPaths: [],
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
    for (const { storePath, reason } of report.badPaths) {
      await cache.metadata.deletePath(parseStorePath(storePath).hash);
      await cache.audit.append([{
        type: "GarbageCollect",
        storePath,
        detail: `removed by verify --repair: ${reason}`,
      }]);
    }
    for (const chunk of report.badChunks) {
      await cache.chunks.delete(chunk.id, chunk.compression as "zstd" | "xz" | "none");
    }
    report.repaired = true;
  }
  return report;
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
