/**
 * `arca audit [--since <dur>] [--json]`: the audit log (imports, uploads, sync receipts,
 * aggregated serves, garbage collection), oldest first.
 * @module
 */

import type { Command } from "commander";
import { parseDuration } from "../units.ts";
import { openCache, settingsOf } from "./common.ts";

/** Registers `audit`. */
export function registerAudit(program: Command): void {
  program.command("audit")
    .description("print the audit log")
    .option("--since <duration>", "only events of the last <duration> (e.g. 24h, 7d)")
    .option("--json", "print one JSON object per line")
    .action(async (flags: { since?: string; json?: boolean }, command: Command) => {
      const since = flags.since === undefined ? undefined : Date.now() - parseDuration(flags.since);
      const settings = await settingsOf(command);
      const cache = await openCache(settings);
      try {
        for await (const event of cache.audit.read({ since })) {
          if (flags.json) {
            console.log(JSON.stringify(event));
            continue;
          }
          const fields = [event.time, event.type.padEnd(14), event.storePath ?? "-"];
          if (event.segment) fields.push(`[${event.segment}]`);
          if (event.detail) fields.push(event.detail);
          console.log(fields.join("  "));
        }
      } finally {
        cache.close();
      }
    });
}
