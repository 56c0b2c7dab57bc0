/**
 * `arca status`: where the cache is and how big: paths, NAR bytes, stored bytes, chunks
 * and the dedup ratio (`--json` for scripts).
 * @module
 */

import type { Command } from "commander";
import { formatBytes, openCache, settingsOf } from "./common.ts";

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
        const status = {
          cacheDir: settings.cacheDir,
          backend: settings.backend,
          ...stats,
          segments,
          ...(unassigned ? { pathsWithoutSegment: unassigned.paths } : {}),
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
        if (unassigned) console.log(`  (no segment): ${unassigned.paths} paths`);
      } finally {
        cache.close();
      }
    });
}
