/**
 * `arca verify [--repair] [--json]`: checks every chunk and every NAR; exits 1 when
 * something is broken (and not repaired).
 * @module
 */

import type { Command } from "commander";
import { verifyCache } from "../cache/verify.ts";
import { ArcaError } from "../errors.ts";
import { openCache, settingsOf } from "./common.ts";

/** Registers `verify`. */
export function registerVerify(program: Command): void {
  program.command("verify")
    .description("check every chunk against its id and every NAR against its NarHash")
    .option("--repair", "remove the narinfo of broken paths and the broken chunk files")
    .option("--json", "print the report as JSON")
    .action(async (flags: { repair?: boolean; json?: boolean }, command: Command) => {
      const settings = await settingsOf(command);
      const cache = await openCache(settings);
      let report;
      try {
        report = await verifyCache(cache, {
          repair: flags.repair,
          onProgress: Deno.stderr.isTerminal() ? (m) => console.error(m) : undefined,
        });
      } finally {
        cache.close();
      }
      if (flags.json) {
        console.log(JSON.stringify(report, null, 2));
      } else {
        for (const chunk of report.badChunks) {
          console.log(`damaged chunk ${chunk.id}.${chunk.compression}: ${chunk.reason}`);
        }
        for (const path of report.badPaths) {
          console.log(
            `${report.repaired ? "removed" : "broken"} ${path.storePath}: ${path.reason}`,
          );
        }
        console.log(
          `${report.chunksChecked} chunks, ${report.pathsChecked} paths checked: ${report.badChunks.length} damaged chunks, ${report.badPaths.length} broken paths${
            report.repaired && report.badPaths.length + report.badChunks.length > 0
              ? " (removed)"
              : ""
          }`,
        );
      }
      if (!report.repaired && report.badChunks.length + report.badPaths.length > 0) {
        throw new ArcaError("broken", "The cache has damaged data (run `arca verify --repair`)");
      }
    });
}
