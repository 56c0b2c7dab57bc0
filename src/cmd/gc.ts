/**
 * `arca gc --max-age <dur> | --max-size <size> [--dry-run]`: evicts least-recently-used
 * paths, closure-consistently, then deletes unreferenced manifests and chunks.
 * @module
 */

import type { Command } from "commander";
import { collectGarbage } from "../cache/gc.ts";
import { parseDuration, parseSize } from "../units.ts";
import { UsageError } from "../errors.ts";
import { formatBytes, openCache, settingsOf } from "./common.ts";

/** Registers `gc`. */
export function registerGc(program: Command): void {
  program.command("gc")
    .description("evict least-recently-used paths under an age and/or size limit")
    .option("--max-age <duration>", "evict paths unused for longer than this (30d, 24h, 1h30m)")
    .option("--max-size <size>", "evict until the cache takes at most this much (500M, 10G, 1T)")
    .option("--dry-run", "print what would be evicted, change nothing")
    .option("--json", "print the report as JSON")
    .action(
      async (
        flags: { maxAge?: string; maxSize?: string; dryRun?: boolean; json?: boolean },
        command: Command,
      ) => {
        if (flags.maxAge === undefined && flags.maxSize === undefined) {
          throw new UsageError("gc needs --max-age and/or --max-size");
        }
        const maxAgeMs = flags.maxAge === undefined ? undefined : parseDuration(flags.maxAge);
        const maxSizeBytes = flags.maxSize === undefined ? undefined : parseSize(flags.maxSize);
        const settings = await settingsOf(command);
        const cache = await openCache(settings);
        try {
          const report = await collectGarbage(cache, {
            maxAgeMs,
            maxSizeBytes,
            dryRun: flags.dryRun,
          });
          if (flags.json) {
            console.log(JSON.stringify({ dryRun: flags.dryRun === true, ...report }, null, 2));
            return;
          }
          const verb = flags.dryRun ? "would evict" : "evicted";
          for (const path of report.evicted) {
            console.log(
              `${verb} ${path.storePath} (last used ${new Date(path.lastUsed).toISOString()})`,
            );
          }
          const narBytes = report.evicted.reduce((sum, p) => sum + p.narSize, 0);
          console.log(
            `${flags.dryRun ? "Would evict" : "Evicted"} ${report.evicted.length} paths (${
              formatBytes(narBytes)
            } of NAR), ${flags.dryRun ? "freeing" : "freed"} ${formatBytes(report.freedBytes)}` +
              (flags.dryRun ? "" : ` in ${report.deletedChunks} chunks`) +
              `; ${report.remainingPaths} paths remain, ${formatBytes(report.liveBytes)} in use`,
          );
        } finally {
          cache.close();
        }
      },
    );
}
