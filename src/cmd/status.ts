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
        const status = { cacheDir: settings.cacheDir, backend: settings.backend, ...stats };
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
      } finally {
        cache.close();
      }
    });
}
