/**
 * `arca verify [--repair] [--json]`: checks every chunk and every NAR; exits 1 when
 * something is broken (and not repaired). With `--repair`, broken paths are fetched again
 * from swarm peers (through this cache's running `swarm --also-serve`) or from the upstream
 * caches (`[[upstreams]]`, `--upstream`) when one has them, and removed otherwise.
 * @module
 */

import type { Command } from "commander";
import { type Refetcher, verifyCache } from "../cache/verify.ts";
import { ArcaError } from "../errors.ts";
import { openCache, settingsOf } from "./common.ts";
import { swarmRefetcher } from "../net/peer_refetch.ts";
import { collect, upstreamSourceOf } from "./serve.ts";

interface VerifyFlags {
  repair?: boolean;
  json?: boolean;
  upstream: string[];
  trustedPublicKey: string[];
  upstreamTimeout?: string;
}

/** Registers `verify`. */
export function registerVerify(program: Command): void {
  program.command("verify")
    .description("check every chunk against its id and every NAR against its NarHash")
    .option(
      "--repair",
      "delete broken chunks; fetch broken paths again from peers or an upstream, or remove their narinfo",
    )
    .option("--json", "print the report as JSON")
    .option(
      "--upstream <url>",
      "with --repair: fetch broken paths from this binary cache (repeatable, in priority order)",
      collect,
      [],
    )
    .option(
      "--trusted-public-key <name:key>",
      "accept --upstream narinfos signed by this key (repeatable)",
      collect,
      [],
    )
    .option("--upstream-timeout <duration>", "skip an upstream that takes longer (default 5s)")
    .action(async (flags: VerifyFlags, command: Command) => {
      const settings = await settingsOf(command, {
        upstreams: flags.upstream,
        upstreamTrustedKeys: flags.trustedPublicKey,
        upstreamTimeout: flags.upstreamTimeout,
      });
      const log = (message: string) => console.error(message);
      const cache = await openCache(settings);
      const upstream = flags.repair ? upstreamSourceOf(cache, settings, { log }) : undefined;
      // Peers first (through this cache's running swarm, if any), then upstreams.
      const refetchers: Refetcher[] = [];
      if (flags.repair) refetchers.push(swarmRefetcher(cache, { log }));
      if (upstream) refetchers.push((record) => upstream.refetch(record));
      let report;
      try {
        report = await verifyCache(cache, {
          repair: flags.repair,
          refetchers,
          onProgress: Deno.stderr.isTerminal() || upstream !== undefined ? log : undefined,
        });
      } finally {
        await upstream?.close();
        cache.close();
      }
      if (flags.json) {
        console.log(JSON.stringify(report, null, 2));
      } else {
        for (const chunk of report.badChunks) {
          console.log(`damaged chunk ${chunk.id}.${chunk.compression}: ${chunk.reason}`);
        }
        const refetched = new Map(report.refetched.map((r) => [r.storePath, r.from]));
        for (const path of report.badPaths) {
          const from = refetched.get(path.storePath);
          console.log(
            from !== undefined
              ? `refetched ${path.storePath} (${path.reason}) from ${from}`
              : `${report.repaired ? "removed" : "broken"} ${path.storePath}: ${path.reason}`,
          );
        }
        const removed = report.badPaths.length - report.refetched.length;
        const broken = report.badPaths.length + report.badChunks.length > 0;
        console.log(
          `${report.chunksChecked} chunks, ${report.pathsChecked} paths checked: ${report.badChunks.length} damaged chunks, ${report.badPaths.length} broken paths${
            report.repaired && broken
              ? ` (${report.refetched.length} refetched, ${removed} removed)`
              : ""
          }`,
        );
      }
      if (!report.repaired && report.badChunks.length + report.badPaths.length > 0) {
        throw new ArcaError("broken", "The cache has damaged data (run `arca verify --repair`)");
      }
    });
}
