/**
 * Import benchmark (the "local cache" issue, DESIGN.md §8): how fast `arca import` turns a
 * store path into cache storage, against Nix's own binary-cache writer, in the same run.
 *
 * The path is the 1 GiB mixed-content path of DESIGN.md §8 (128 files × 8 MiB: half
 * word-like text, a quarter random, a quarter a repeated 64 KiB block), generated
 * deterministically and added with `nix-store --add`, reused when already in the store.
 * Each round, alternating:
 * - nix:  `nix copy --to file://<fresh dir>?compression=zstd <path>`
 * - arca: `arca --cache-dir <fresh dir> --backend kv import --compression zstd <path>`
 * both timed wall-clock (process start to exit) with peak RSS, MB/s of NAR (10^6 bytes).
 * The table reports the median of the rounds.
 *
 * Usage: `deno run -A bench/import.ts [--size-mib 1024] [--runs 3] [--keep] [--main <main.ts>]`
 * (`--main` benchmarks another checkout, e.g. a `git archive` of a commit.)
 * @module
 */

import {
  arcaArgs,
  arcaRevision,
  benchEnv,
  diskUsage,
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
  removeTree,
  resolveMain,
  RSS_METHOD,
  run,
  warmPageCache,
} from "./common.ts";

/** One timed run of one tool. */
interface Sample {
  seconds: number;
  peakRss?: number;
  storedBytes: number;
  /** User + system CPU seconds, when /usr/bin/time measured them. */
  cpu?: { user: number; system: number };
}

function log(line: string): void {
  console.error(`[import] ${line}`);
}

async function nixCopyRun(storePath: string, scratch: string, round: number): Promise<Sample> {
  const dest = `${scratch}/nix-cache-${round}`;
  const env = benchEnv(scratch);
  const result = await run(
    "nix",
    ["copy", "--to", `file://${dest}?compression=zstd`, storePath],
    { env, measureRss: true },
  );
  const storedBytes = await diskUsage(`${dest}/nar`);
  await removeTree(dest);
  await removeTree(env.XDG_CACHE_HOME);
  return { seconds: result.seconds, peakRss: result.peakRss, storedBytes, cpu: result.cpuSeconds };
}

async function arcaImportRun(
  storePath: string,
  scratch: string,
  round: number,
  main: string,
): Promise<Sample> {
  const cacheDir = `${scratch}/arca-cache-${round}`;
  const env = benchEnv(scratch);
  const result = await run(
    Deno.execPath(),
    arcaArgs([
      "--cache-dir",
      cacheDir,
      "--backend",
      "kv",
      "import",
      "--compression",
      "zstd",
      storePath,
    ], main),
    { env, measureRss: true },
  );
  if (!result.stdout.includes(`imported ${storePath}`)) {
    throw new Error(`arca import did not import ${storePath}: ${result.stdout}`);
  }
  const storedBytes = await diskUsage(`${cacheDir}/objects`);
  await removeTree(cacheDir);
  await removeTree(env.XDG_CACHE_HOME);
  return { seconds: result.seconds, peakRss: result.peakRss, storedBytes, cpu: result.cpuSeconds };
}

async function main(): Promise<void> {
  const flags = parseFlags(Deno.args, { sizeMib: 1024, runs: 3, keep: false, main: "" });
  const arcaMain = resolveMain(flags.main);
  const machine = await machineInfo();
  const scratch = makeScratchDir("import");
  try {
    const env = benchEnv(scratch);
    log(`machine: ${machine}`);
    const mixed = await ensureMixedPath(flags.sizeMib, { env, scratch, log });
    log(`${mixed.reused ? "reusing" : "made"} ${mixed.storePath} (NAR ${mixed.narSize} bytes)`);
    await warmPageCache(mixed.storePath, env);

    const nix: Sample[] = [];
    const arca: Sample[] = [];
    for (let round = 0; round < flags.runs; round++) {
      const n = await nixCopyRun(mixed.storePath, scratch, round);
      nix.push(n);
      log(`round ${round + 1}: nix copy ${fixed(n.seconds)} s, ${megabytes(n.peakRss)} RSS`);
      const a = await arcaImportRun(mixed.storePath, scratch, round, arcaMain);
      arca.push(a);
      log(`round ${round + 1}: arca import ${fixed(a.seconds)} s, ${megabytes(a.peakRss)} RSS`);
    }

    const nixSeconds = median(nix.map((s) => s.seconds));
    const tools: [string, Sample[]][] = [
      ["nix copy --to file://…?compression=zstd", nix],
      ["arca import (kv, zstd)", arca],
    ];
    const rows = tools.map(([name, list]) => {
      const seconds = median(list.map((s) => s.seconds));
      const rss = Math.max(...list.map((s) => s.peakRss ?? 0));
      const cpu = list.every((s) => s.cpu)
        ? `${fixed(median(list.map((s) => s.cpu!.user)), 1)} + ${
          fixed(median(list.map((s) => s.cpu!.system)), 1)
        }`
        : "n/a";
      return [
        name,
        fixed(seconds),
        fixed(mbPerSecond(mixed.narSize, seconds), 1),
        `${fixed(nixSeconds / seconds)}×`,
        rss ? megabytes(rss) : "n/a",
        cpu,
        megabytes(median(list.map((s) => s.storedBytes))),
        list.map((s) => fixed(s.seconds)).join(", "),
      ];
    });
    const arcaSeconds = median(arca.map((s) => s.seconds));
    const arcaRss = Math.max(...arca.map((s) => s.peakRss ?? 0));
    const speedup = nixSeconds / arcaSeconds;

    console.log(`\n## Import: ${mixed.storePath}`);
    console.log(`NAR ${mixed.narSize} bytes (${megabytes(mixed.narSize)}); ${machine}`);
    console.log(`arca: ${await arcaRevision(arcaMain)}; load average at end: ${loadAverage()}`);
    console.log(
      `median of ${flags.runs} runs, wall clock; peak RSS (max of runs) by ${RSS_METHOD}\n`,
    );
    console.log(formatTable(
      [
        "tool",
        "seconds",
        "MB/s of NAR",
        "speed vs nix",
        "peak RSS",
        "CPU s user + sys",
        "stored",
        "runs (s)",
      ],
      rows,
    ));
    console.log(
      `\ntargets: speed ≥ 1.0× nix (goal 1.5×): ${fixed(speedup)}× ${
        speedup >= 1.5 ? "MET (goal too)" : speedup >= 1.0 ? "MET (goal not)" : "MISSED"
      }; peak RSS < 256 MB: ${megabytes(arcaRss)} ${
        arcaRss > 0 && arcaRss < 256e6 ? "MET" : "MISSED"
      }`,
    );
  } finally {
    if (flags.keep) log(`kept ${scratch}`);
    else await removeTree(scratch);
  }
}

if (import.meta.main) await main();
