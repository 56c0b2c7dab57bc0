/**
 * `arca list`: the cached store paths, one a line, or `--json` records.
 * @module
 */

import type { Command } from "commander";
import { RemoteRecords } from "../cache/remote_records.ts";
import { findSegment } from "../cache/segments.ts";
import { openCache, settingsOf } from "./common.ts";

/** Registers `list`. */
export function registerList(program: Command): void {
  program.command("list")
    .description("list cached store paths")
    .option("--json", "print a JSON array of path records")
    .option("--segment <name>", "only paths of this segment")
    .option("--remote", "list the paths known from swarm peers instead")
    .action(
      async (flags: { json?: boolean; segment?: string; remote?: boolean }, command: Command) => {
        const settings = await settingsOf(command);
        if (flags.segment !== undefined && !flags.remote) {
          findSegment(settings.segments, flags.segment);
        }
        if (flags.remote) {
          const records = [];
          for await (const record of new RemoteRecords(settings.cacheDir).list(flags.segment)) {
            if (flags.json) records.push(record);
            else console.log(record.storePath);
          }
          if (flags.json) console.log(JSON.stringify(records, null, 2));
          return;
        }
        const cache = await openCache(settings);
        try {
          const records = [];
          for await (const { narInfo, registeredAt, segment } of cache.listPaths()) {
            if (flags.segment !== undefined && segment !== flags.segment) continue;
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
              segment: segment ?? null,
              registeredAt: new Date(registeredAt).toISOString(),
            });
          }
          if (flags.json) console.log(JSON.stringify(records, null, 2));
        } finally {
          cache.close();
        }
      },
    );
}
