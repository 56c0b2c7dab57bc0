/**
 * Pull-through benchmark (the issue "One substituter for everything", section "Speed"):
 * `nix copy --from` arca with a cold cache, pulling the path through from an upstream,
 * against `nix copy --from` the upstream directly, in the same run, on loopback; then
 * `nix copy --from` the same arca again, warm.
 *
 * The path is the mixed-content path of DESIGN.md §8 (bench/common.ts `ensureMixedPath`,
 * `--size-mib`, default 256 MiB; reused when already in the store). The upstream is a cache
 * Nix wrote itself (`nix copy --to 'file://<dir>?compression=zstd&secret-key=<key>'`, or the
 * `--compression` given: xz is what cache.nixos.org serves; key from
 * `nix key generate-secret`), served by nginx (`/usr/sbin/nginx`, bench/common.ts
 * `startNginx`: sendfile, `worker_processes auto`). Each round, in alternating order:
 * - direct: `nix copy --from <nginx> --to <fresh store> --option trusted-public-keys <pub>`;
 * - cold: a fresh `arca --cache-dir <fresh> serve --upstream <nginx> --trusted-public-key <pub>`,
 *   then `nix copy --from <arca> --to <fresh store> …` (arca passes a zstd upstream's file
 *   through as it is; an xz one it decompresses and streams to Nix uncompressed; either is
 *   chunked and stored once Nix is done);
 *   the time until arca holds the path (its narinfo is served from the cache, compressed) is
 *   reported too;
 * - warm: `nix copy --from <the same arca> --to <fresh store> …`, now served from its chunks.
 * Every `nix copy` gets a fresh XDG_CACHE_HOME. Nix checks NarHash and the signature.
 *
 * Reported: wall-clock seconds of each `nix copy`, MB/s of NAR, direct / cold and direct /
 * warm (medians of the per-round ratios; target cold ≥ 0.8×), arca's CPU seconds and peak
 * RSS, nix's CPU seconds, and the load average at the start and the end (the machine is
 * shared).
 *
 * Usage: `deno run -A bench/upstream.ts [--size-mib 256] [--runs 3] [--compression zstd|xz|none]
 * [--keep] [--main <main.ts>]`
 * @module
 */

import {
  arcaRevision,
  benchEnv,
  type BenchServer,
  ensureMixedPath,
  fixed,
  formatTable,
  loadAverage,
  machineInfo,
  makeScratchDir,
  mbPerSecond,
  median,
  megabytes,
  parseFlags,
  type ProcessStats,
  removeTree,
  resolveMain,
  run,
  startArcaServe,
  startNginx,
  warmPageCache,
} from "./common.ts";

function log(line: string): void {
  console.error(`[upstream] ${line}`);
}

function hashPartOf(storePath: string): string {
  return storePath.slice("/nix/store/".length, "/nix/store/".length + 32);
}

/** One timed `nix copy --from`. */
interface Copy {
  seconds: number;
  cpu: { user: number; system: number };
}

/** One round. */
interface Round {
  direct: Copy;
  cold: Copy;
  /** From the start of the cold copy until arca served the path from its own cache. */
  coldLocalSeconds: number;
  warm: Copy;
  arca: ProcessStats;
}

/** `nix copy --from <base>` of the path into a fresh store, timed. */
async function copyFrom(
  base: string,
  storePath: string,
  publicKey: string,
  scratch: string,
  label: string,
): Promise<Copy> {
  const env = benchEnv(scratch);
  const store = `${scratch}/store-${label}-${crypto.randomUUID().slice(0, 8)}`;
  try {
    const result = await run("nix", [
      "copy",
      "--from",
      base,
      "--to",
      store,
      "--option",
      "trusted-public-keys",
      publicKey,
      storePath,
    ], { env, measureRss: true });
    return {
      seconds: result.seconds,
      cpu: { user: result.cpuSeconds?.user ?? NaN, system: result.cpuSeconds?.system ?? NaN },
    };
  } finally {
    await removeTree(store);
    await removeTree(env.XDG_CACHE_HOME);
  }
}

/** Waits until arca serves the path's narinfo from its own cache (compressed chunks). */
async function untilLocal(
  arca: BenchServer,
  storePath: string,
  upstreamDir: string,
): Promise<void> {
  // While arca only passes the upstream's file through, its narinfo names that file.
  const upstreamUrl = /^URL: (.*)$/m.exec(
    await Deno.readTextFile(`${upstreamDir}/${hashPartOf(storePath)}.narinfo`),
  )![1];
  const deadline = Date.now() + 600_000;
  for (;;) {
    const response = await fetch(`${arca.base}/${hashPartOf(storePath)}.narinfo`);
    const text = await response.text();
    const url = /^URL: (.*)$/m.exec(text)?.[1];
    if (response.ok && /^Compression: (zstd|xz)$/m.test(text) && url !== upstreamUrl) return;
    if (Date.now() > deadline) throw new Error(`arca never held ${storePath}: ${text}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

async function main(): Promise<void> {
  const flags = parseFlags(Deno.args, {
    sizeMib: 256,
    runs: 3,
    keep: false,
    main: "",
    compression: "zstd",
  });
  if (!["zstd", "xz", "none"].includes(flags.compression)) {
    throw new Error(`--compression must be zstd, xz or none, not ${flags.compression}`);
  }
  const arcaMain = resolveMain(flags.main);
  const machine = await machineInfo();
  const loadAtStart = loadAverage();
  const scratch = makeScratchDir("upstream");
  let nginx: BenchServer | undefined;
  try {
    const env = benchEnv(scratch);
    log(`machine: ${machine}`);
    const mixed = await ensureMixedPath(flags.sizeMib, { env, scratch, log });
    log(`${mixed.reused ? "reusing" : "made"} ${mixed.storePath} (NAR ${mixed.narSize} bytes)`);
    const secret = (await run("nix", ["key", "generate-secret", "--key-name", "bench-upstream-1"], {
      env,
    })).stdout;
    const keyFile = `${scratch}/bench-upstream-1.secret`;
    await Deno.writeTextFile(keyFile, secret);
    const converted = await new Deno.Command("nix", {
      args: ["key", "convert-secret-to-public"],
      env,
      clearEnv: true,
      stdin: "piped",
      stdout: "piped",
    }).spawn();
    const writer = converted.stdin.getWriter();
    await writer.write(new TextEncoder().encode(secret));
    await writer.close();
    const publicKey = new TextDecoder().decode((await converted.output()).stdout).trim();
    const upstreamDir = `${scratch}/upstream`;
    log(
      `nix copy --to file://${upstreamDir}?compression=${flags.compression}&secret-key=… (signed)`,
    );
    await warmPageCache(mixed.storePath, env);
    await run("nix", [
      "copy",
      "--to",
      `file://${upstreamDir}?compression=${flags.compression}&secret-key=${keyFile}`,
      mixed.storePath,
    ], { env });
    nginx = await startNginx(upstreamDir, scratch, { log });

    const rounds: Round[] = [];
    for (let round = 0; round < flags.runs; round++) {
      const cacheDir = `${scratch}/arca-cache-${round}`;
      const arca = await startArcaServe(cacheDir, {
        env: benchEnv(scratch),
        main: arcaMain,
        serveArgs: ["--upstream", nginx.base, "--trusted-public-key", publicKey],
        log,
      });
      try {
        let direct: Copy | undefined;
        if (round % 2 === 0) {
          direct = await copyFrom(nginx.base, mixed.storePath, publicKey, scratch, "direct");
        }
        const coldStart = performance.now();
        const cold = await copyFrom(arca.base, mixed.storePath, publicKey, scratch, "cold");
        await untilLocal(arca, mixed.storePath, upstreamDir);
        const coldLocalSeconds = (performance.now() - coldStart) / 1000;
        const warm = await copyFrom(arca.base, mixed.storePath, publicKey, scratch, "warm");
        if (round % 2 === 1) {
          direct = await copyFrom(nginx.base, mixed.storePath, publicKey, scratch, "direct");
        }
        const stats = arca.stats();
        const requests = await arca.requests();
        rounds.push({ direct: direct!, cold, coldLocalSeconds, warm, arca: stats });
        log(
          `round ${round + 1}: direct ${fixed(direct!.seconds)} s, cold ${
            fixed(cold.seconds)
          } s (local after ${fixed(coldLocalSeconds)} s), warm ${fixed(warm.seconds)} s; arca ${
            megabytes(stats.peakRss)
          } peak RSS; load ${loadAverage()}`,
        );
        if (round === 0) {
          log(`arca saw: ${requests.map((r) => `${r.method} ${r.path} ${r.status}`).join("; ")}`);
        }
      } finally {
        await arca.stop();
        await removeTree(cacheDir);
      }
    }
    const upstreamRequests = await nginx.requests();

    const narSize = mixed.narSize;
    const coldRatio = median(rounds.map((r) => r.direct.seconds / r.cold.seconds));
    const warmRatio = median(rounds.map((r) => r.direct.seconds / r.warm.seconds));
    const cpu = (copies: Copy[]) =>
      `${fixed(median(copies.map((c) => c.cpu.user)), 1)} + ${
        fixed(median(copies.map((c) => c.cpu.system)), 1)
      }`;
    const row = (name: string, copies: Copy[], ratio: string, extra = "") => {
      const seconds = median(copies.map((c) => c.seconds));
      return [
        name,
        fixed(seconds),
        fixed(mbPerSecond(narSize, seconds), 1),
        ratio,
        cpu(copies),
        copies.map((c) => fixed(c.seconds)).join(", ") + extra,
      ];
    };

    console.log(`\n## Pull-through: nix copy --from arca (upstream behind it) vs the upstream`);
    console.log(`${mixed.storePath}: NAR ${narSize} bytes (${megabytes(narSize)})`);
    console.log(machine);
    console.log(
      `arca: ${await arcaRevision(
        arcaMain,
      )}; load average at start ${loadAtStart}, at end ${loadAverage()}`,
    );
    console.log(
      `upstream: nix copy --to file://…?compression=${flags.compression} (signed), served by nginx; ` +
        `median of ${flags.runs} rounds (direct first in odd rounds, last in even ones); ` +
        `ratios: medians of per-round direct s / arca s\n`,
    );
    console.log(formatTable(
      ["from", "seconds", "MB/s of NAR", "vs direct", "nix CPU s user + sys", "runs (s)"],
      [
        row("upstream directly (nginx)", rounds.map((r) => r.direct), "1.00×"),
        row("arca, cold (pull-through)", rounds.map((r) => r.cold), `${fixed(coldRatio)}×`),
        row("arca, warm", rounds.map((r) => r.warm), `${fixed(warmRatio)}×`),
      ],
    ));
    console.log(
      `\ncold: arca held the path ${
        fixed(median(rounds.map((r) => r.coldLocalSeconds)))
      } s after the copy started (median; ${
        rounds.map((r) => fixed(r.coldLocalSeconds)).join(", ")
      }); arca per process (cold + warm): peak RSS ${
        megabytes(Math.max(...rounds.map((r) => r.arca.peakRss)))
      }, CPU ${fixed(median(rounds.map((r) => r.arca.cpuUser)), 1)} + ${
        fixed(median(rounds.map((r) => r.arca.cpuSystem)), 1)
      } s user + sys`,
    );
    const narRequests = upstreamRequests.filter((r) => r.path.startsWith("/nar/"));
    console.log(
      `upstream NAR requests: ${narRequests.length} (${flags.runs} direct + ${flags.runs} cold)`,
    );
    console.log(
      `\ntarget: cold ≥ 0.8× direct: ${fixed(coldRatio)}× ${
        coldRatio >= 0.8 ? "MET" : "MISSED"
      }; ` +
        `warm: ${fixed(warmRatio)}× direct`,
    );
  } finally {
    await nginx?.stop();
    if (flags.keep) log(`kept ${scratch}`);
    else await removeTree(scratch);
  }
}

if (import.meta.main) await main();
