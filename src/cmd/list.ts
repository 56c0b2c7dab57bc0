/**
 * `arca list`: the cached store paths, one a line, or `--json` records.
 * @module
 */

import type { Command } from "commander";
import { openCache, settingsOf } from "./common.ts";

/** Registers `list`. */
export function registerList(program: Command): void {
  program.command("list")
    .description("list cached store paths")
    .option("--json", "print a JSON array of path records")
    .action(async (flags: { json?: boolean }, command: Command) => {
      const settings = await settingsOf(command);
      const cache = await openCache(settings);
      try {
        const records = [];
        for await (const { narInfo, registeredAt } of cache.listPaths()) {
          if (!flags.json) {
            console.log(narInfo.storePath);
            continue;
          }
          records.push({
            storePath: narInfo.storePath,
            narHash: narInfo.narHash,
            narSize: narInfo.narSize,
            fileHash: narInfo.fileHash,
            fileSize: narInfo.fileSize,
            compression: narInfo.compression,
            url: narInfo.url,
            references: narInfo.references,
            deriver: narInfo.deriver ?? null,
            ca: narInfo.ca ?? null,
            signatures: narInfo.sigs,
            registeredAt: new Date(registeredAt).toISOString(),
          });
        }
        if (flags.json) console.log(JSON.stringify(records, null, 2));
      } finally {
        cache.close();
      }
    });
}
