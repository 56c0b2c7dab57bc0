/**
 * `arca status`: where the cache is and how big: paths, NAR bytes, stored bytes, chunks
 * and the dedup ratio (`--json` for scripts).
 * @module
 */

import { readPendingUploads } from "../cache/pending_records.ts";
import type { Command } from "commander";
import { RemoteRecords } from "../cache/remote_records.ts";
import { readSwarmStatus } from "../net/metrics.ts";
import type { FetchStatus } from "../net/swarm.ts";
import { formatBytes, openCache, settingsOf } from "./common.ts";

/** The peer fetch figures of a running swarm (with `--also-serve`), or null. */
function peerFetchOf(fetch: FetchStatus | undefined) {
  if (fetch === undefined) return null;
  const served = fetch.narsServedLocal + fetch.narsServedFromPeers;
  return { ...fetch, localHitRatio: served === 0 ? null : fetch.narsServedLocal / served };
}

/** The number of records known from peers. */
async function countRemote(cacheDir: string): Promise<number> {
  let count = 0;
  for await (const _ of new RemoteRecords(cacheDir).list()) count++;
  return count;
}

/** Registers `status`. */
export function registerStatus(program: Command): void {
  program.command("status")
    .description("show cache location, size and deduplication")
    .option("--json", "print JSON")
    .action(async (flags: { json?: boolean }, command: Command) => {
      const settings = await settingsOf(command);
      const cache = await openCache(settings);
      try {
        const stats = await cache.stats();
        // Every configured segment is listed, with zeros when it holds nothing yet.
        const segments = settings.segments.map((segment) => ({
          name: segment.name,
          filter: segment.filter,
          swarm: segment.topicKey !== undefined,
          ...(stats.segments[segment.name] ?? { paths: 0, narBytes: 0 }),
        }));
        const unassigned = stats.segments[""];
        const remoteRecords = await countRemote(settings.cacheDir);
        const pending = await readPendingUploads(settings.cacheDir);
        const swarm = await readSwarmStatus(settings.cacheDir);
        const status = {
          cacheDir: settings.cacheDir,
          backend: settings.backend,
          ...stats,
          segments,
          ...(unassigned ? { pathsWithoutSegment: unassigned.paths } : {}),
          remoteRecords,
          pendingUploads: {
            paths: pending.length,
            narBytes: pending.reduce((sum, upload) => sum + upload.narSize, 0),
          },
          swarm,
          peers: swarm?.segments.flatMap((segment) =>
            segment.peers.map((peer) => ({ segment: segment.name, ...peer }))
          ) ?? [],
          peerFetch: peerFetchOf(swarm?.fetch),
        };
        if (flags.json) {
          console.log(JSON.stringify(status, null, 2));
          return;
        }
        console.log(`cache dir:    ${status.cacheDir}`);
        console.log(`backend:      ${status.backend}`);
        console.log(`paths:        ${status.paths}`);
        console.log(`NAR bytes:    ${formatBytes(status.narBytes)} (${status.narBytes})`);
        console.log(`stored bytes: ${formatBytes(status.storedBytes)} (${status.storedBytes})`);
        console.log(`chunks:       ${status.chunks}`);
        console.log(`dedup ratio:  ${status.dedupRatio.toFixed(2)}`);
        console.log("segments:");
        for (const segment of segments) {
          console.log(
            `  ${segment.name} (${segment.filter}${
              segment.swarm ? ", swarm" : ""
            }): ${segment.paths} paths, ${formatBytes(segment.narBytes)}`,
          );
        }
        if (unassigned) {
          console.log(`  (no segment): ${unassigned.paths} paths`);
        }
        console.log(`remote records: ${remoteRecords}`);
        console.log(
          `pending uploads: ${status.pendingUploads.paths} (${
            formatBytes(status.pendingUploads.narBytes)
          } of NAR, not chunked yet; served meanwhile)`,
        );
        if (swarm === null) {
          console.log("swarm:        not running");
          return;
        }
        console.log(`swarm:        node ${swarm.nodeId.slice(0, 16)} (pid ${swarm.pid})`);
        for (const segment of swarm.segments) {
          console.log(`  ${segment.name}: ${segment.peers.length} peer(s)`);
          for (const peer of segment.peers) {
            console.log(
              `    ${peer.id.slice(0, 16)} ${peer.address ?? "?"}:${peer.syncPort ?? "?"} ${
                peer.connected ? "connected" : "disconnected"
              }, last seen ${peer.lastSeen}, records sent ${peer.recordsSent}, received ${peer.recordsReceived} (${peer.recordsAccepted} accepted), chunks sent ${peer.chunksServed} (${
                formatBytes(peer.bytesServed)
              }), received ${peer.chunksReceived} (${formatBytes(peer.bytesReceived)})`,
            );
          }
        }
        const fetched = status.peerFetch;
        if (fetched !== null) {
          console.log(
            `peer fetch:   ${fetched.narsFetched} NARs (${
              formatBytes(fetched.narBytes)
            }) fetched with ${
              formatBytes(fetched.bytesFetched)
            } from peers, ${fetched.chunksReused} chunks reused, ${fetched.narsFailed} failed`,
          );
          console.log(
            `NARs served:  ${fetched.narsServedLocal} local, ${fetched.narsServedFromPeers} via peers (local hit ratio ${
              fetched.localHitRatio === null ? "n/a" : fetched.localHitRatio.toFixed(2)
            })`,
          );
        }
      } finally {
        cache.close();
      }
    });
}
