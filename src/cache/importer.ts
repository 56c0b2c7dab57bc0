/**
 * Imports paths of the local Nix store into the cache: NAR-encodes each path with our own
 * dumper, checks it against the NAR hash and size Nix recorded, and stores it with the
 * references, deriver, CA and signatures Nix reports. Paths already cached are skipped.
 * @module
 */

import { type Cache, type ImportResult } from "./cache.ts";
import { type ChunkCompression, ChunkCompressor } from "./compression.ts";
import { dumpNar } from "./nar_dump.ts";
import type { LocalPathInfo } from "./nix.ts";
import type { SecretKey } from "./signing.ts";
import { parseStorePath } from "./store_path.ts";

/** Options of {@link importLocalPaths}. */
export interface ImportLocalOptions {
  compression: ChunkCompression;
  signingKey?: SecretKey;
  /** The segment of each path (undefined: none). */
  segmentOf?: (info: LocalPathInfo) => string | undefined;
  /** Called before each path is handled: index (0-based), total, path. */
  onProgress?: (index: number, total: number, storePath: string) => void;
}

/** What happened to one path. */
export type ImportOutcome =
  | { storePath: string; status: "skipped" }
  | { storePath: string; status: "imported"; result: ImportResult };

/**
 * Imports the given paths in order (give dependencies first). Stops at the first failure,
 * which is thrown; paths imported before it stay imported.
 */
export async function importLocalPaths(
  cache: Cache,
  paths: LocalPathInfo[],
  options: ImportLocalOptions,
): Promise<ImportOutcome[]> {
  const outcomes: ImportOutcome[] = [];
  const compressor = new ChunkCompressor({ compression: options.compression });
  try {
    for (const [index, info] of paths.entries()) {
      options.onProgress?.(index, paths.length, info.storePath);
      const { hash } = parseStorePath(info.storePath);
      if (await cache.getPath(hash) !== null) {
        outcomes.push({ storePath: info.storePath, status: "skipped" });
        continue;
      }
      const result = await cache.importNar(dumpNar(info.storePath), {
        storePath: info.storePath,
        references: info.references,
        deriver: info.deriver,
        ca: info.ca,
        sigs: info.sigs,
        narHash: info.narHash,
        narSize: info.narSize,
      }, {
        compression: options.compression,
        signingKey: options.signingKey,
        compressor,
        segment: options.segmentOf?.(info),
      });
      outcomes.push({ storePath: info.storePath, status: "imported", result });
    }
  } finally {
    compressor.close();
  }
  return outcomes;
}
