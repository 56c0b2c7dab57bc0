/**
 * `verify --repair`'s way to get a broken path back from swarm peers: through the running
 * `arca swarm --also-serve` of the same cache (its address is in `swarm-status.json`), whose
 * peer fetch (src/net/peer_fetch.ts) does the work. A second swarm node with the same
 * identity would disturb the running one's sessions, so verify never dials peers itself.
 *
 * The path is turned into a remote record of the swarm segment it belongs to, its narinfo
 * removed (its broken chunks are already gone), and its NAR requested from the running
 * substituter: the fetch verifies every chunk and the NarHash, and commits the path again
 * under the same metadata. If that does not bring it back, the remote record is removed
 * again and verify goes on (to remove the path for good).
 * @module
 */

import type { Cache } from "../cache/cache.ts";
import type { PathRecord } from "../cache/metadata.ts";
import { parseNarInfo } from "../cache/narinfo.ts";
import { RemoteRecords } from "../cache/remote_records.ts";
import { parseStorePath } from "../cache/store_path.ts";
import type { Refetcher } from "../cache/verify.ts";
import { readSwarmStatus } from "./metrics.ts";
import { recordOfNarInfo } from "./sync_records.ts";

/** Options of {@link swarmRefetcher}. */
export interface SwarmRefetcherOptions {
  /** Longest wait for one path's NAR (default 10 minutes). */
  timeoutMs?: number;
  log?: (message: string) => void;
}

/** A {@link Refetcher} through the running swarm of `cache`; null when none runs. */
export function swarmRefetcher(cache: Cache, options: SwarmRefetcherOptions = {}): Refetcher {
  const remote = new RemoteRecords(cache.cacheDir);
  return async (record: PathRecord) => {
    const status = await readSwarmStatus(cache.cacheDir);
    if (!status?.http) return null;
    const names = status.segments.map((segment) => segment.name);
    const segment = record.segment !== undefined && names.includes(record.segment)
      ? record.segment
      : names.includes("adhoc")
      ? "adhoc"
      : undefined;
    if (segment === undefined) return null;
    const { hash } = parseStorePath(record.narInfo.storePath);
    const host = status.http.host.includes(":") ? `[${status.http.host}]` : status.http.host;
    const base = `http://${host}:${status.http.port}`;
    await remote.put({
      ...recordOfNarInfo(record.narInfo),
      segment,
      receivedAt: Date.now(),
      peers: [],
    });
    await cache.metadata.deletePath(hash);
    const signal = AbortSignal.timeout(options.timeoutMs ?? 600_000);
    try {
      const info = await fetch(`${base}/${hash}.narinfo`, { signal });
      if (info.status !== 200) {
        await info.body?.cancel();
        return null;
      }
      const { url, narSize, compression, fileSize } = parseNarInfo(await info.text());
      // The whole body: the NAR, or (an upstream's file passed through) that file.
      const expected = compression === "none" ? narSize : fileSize;
      const nar = await fetch(`${base}/${url}`, { signal });
      if (nar.status !== 200 || nar.body === null) {
        await nar.body?.cancel();
        return null;
      }
      let received = 0;
      for await (const piece of nar.body) received += piece.length;
      if (expected !== undefined && received !== expected) return null;
      return (await cache.getPath(hash)) === null ? null : "peers (through the running swarm)";
    } catch (error) {
      options.log?.(
        `Cannot refetch ${record.narInfo.storePath} from peers: ${(error as Error).message}`,
      );
      return null;
    } finally {
      if ((await cache.getPath(hash)) === null) await remote.delete(segment, hash);
    }
  };
}
