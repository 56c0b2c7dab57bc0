/**
 * Serve benchmark (the "local cache" issue), after the method of Mic92/cache-shootout:
 * `arca serve` against nginx serving the same paths from a cache Nix wrote itself, in the
 * same run, on loopback.
 *
 * Setup (reused when present): a closure of `--paths` (300) small input-addressed
 * derivations built with /bin/sh builders (a binary tree of references plus a chain every
 * tenth path; text, random and half-and-half contents of 2 KiB to 4 MiB) under one root,
 * and the 1 GiB mixed-content path of bench/import.ts. Both go into
 * - a Nix-written cache: `nix copy --to file://<dir>?compression=zstd`, served by nginx
 *   (`/usr/sbin/nginx`, non-daemon, config generated in the scratch dir, sendfile,
 *   `worker_processes auto`, access log off), and
 * - an arca cache: `arca import-closure <root>` + `arca import <1 GiB path>`, served by
 *   `arca serve`.
 *
 * Measurements, on both servers back to back (order alternating), `--rounds` times, with
 * curl as the client (one process, URLs from a config file, so curl's own cost is small
 * and equal):
 * - every narinfo of the closure, one after another on ONE keep-alive connection
 *   (the list repeated `--narinfo-passes` times) → requests/s;
 * - every NAR (URL from each server's own narinfo), one after another on one connection,
 *   and with 16 concurrent transfers (`curl --parallel --parallel-max 16`) → MB/s of
 *   NAR files as served (compressed bytes);
 * - `nix copy --from http://127.0.0.1:<port> --to <fresh store> --no-check-sigs` of the
 *   1 GiB path, fresh XDG_CACHE_HOME each → seconds, MB/s of NAR.
 *
 * Usage: `deno run -A bench/serve.ts [--paths 300] [--size-mib 1024] [--rounds 5]
 * [--copy-runs 3] [--narinfo-passes 5] [--keep] [--main <main.ts>]` (`--main` runs another
 * checkout's arca, e.g. a `git archive` of a commit, when the working tree is mid-change.)
 * @module
 */

import {
  arcaArgs,
  arcaRevision,
  benchEnv,
  ensureMixedPath,
  fixed,
  formatTable,
  freePort,
  loadAverage,
  machineInfo,
  makeScratchDir,
  mbPerSecond,
  median,
  megabytes,
  parseFlags,
  pathInfos,
  type ProcessStats,
  processStats,
  removeTree,
  resolveMain,
  run,
  startNginx,
  waitForHttp,
  warmPageCache,
} from "./common.ts";

const CLOSURE_VERSION = "v1";

function log(line: string): void {
  console.error(`[serve] ${line}`);
}

/** xorshift32, the same small generator as the mixed path's. */
function xorshift32(seed: number): () => number {
  let state = seed >>> 0 || 1;
  return () => {
    state ^= state << 13;
    state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5;
    state >>>= 0;
    return state;
  };
}

/** The Nix expression of the benchmark closure: `count` paths under one root. */
function closureExpression(count: number): string {
  const next = xorshift32(0xc105e);
  const lines: string[] = [];
  for (let i = 0; i < count; i++) {
    // Log-uniform sizes from 2 KiB to 4 MiB.
    const u = next() / 2 ** 32;
    const size = Math.floor(2048 * Math.pow(2048, u));
    const deps: string[] = [];
    if (i > 0) deps.push(`p${Math.floor((i - 1) / 2)}`);
    if (i > 1 && i % 10 === 0) deps.push(`p${i - 1}`);
    const kind = ["text", "random", "mixed"][i % 3];
    lines.push(`  p${i} = mk "p${i}" ${size} "${kind}" [ ${deps.join(" ")} ];`);
  }
  const all = Array.from({ length: count }, (_, i) => `p${i}`).join(" ");
  const script = [
    "export PATH=/bin:/usr/bin",
    "mkdir $out",
    "for d in $deps; do echo $d >> $out/refs; done",
    "case $kind in text) seq 1 100000000 | head -c $size > $out/data ;;",
    "random) head -c $size /dev/urandom > $out/data ;;",
    "*) half=$((size / 2)); seq 1 100000000 | head -c $half > $out/data;" +
    " head -c $((size - half)) /dev/urandom >> $out/data ;; esac",
  ].join("\n");
  return `let
  mk = name: size: kind: deps: derivation {
    name = "arca-bench-${CLOSURE_VERSION}-" + name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" ${JSON.stringify(script).replaceAll("${", "\\${")} ];
    size = toString size;
    inherit kind deps;
  };
${lines.join("\n")}
in mk "root" 16 "text" [ ${all} ]
`;
}

/** Builds (or finds) the closure; returns the root path and every path of the closure. */
async function ensureClosure(
  count: number,
  scratch: string,
  env: Record<string, string>,
): Promise<{ root: string; paths: string[]; narBytes: number }> {
  const file = `${scratch}/closure.nix`;
  await Deno.writeTextFile(file, closureExpression(count));
  const built = await run(
    "nix-build",
    ["--no-out-link", "--max-jobs", "2", "--cores", "1", file],
    { env },
  );
  const root = built.stdout.trim().split("\n").at(-1)!;
  const infos = await pathInfos([root], env, { recursive: true });
  return {
    root,
    paths: infos.map((i) => i.path),
    narBytes: infos.reduce((sum, i) => sum + i.narSize, 0),
  };
}

/** A running HTTP server of the benchmark. */
interface Server {
  name: string;
  base: string;
  /** CPU and memory so far (nginx: master and workers). */
  stats(): ProcessStats;
  stop(): Promise<void>;
}

async function startArca(
  cacheDir: string,
  env: Record<string, string>,
  main: string,
): Promise<Server> {
  const port = freePort();
  const child = new Deno.Command(Deno.execPath(), {
    args: arcaArgs([
      "--cache-dir",
      cacheDir,
      "--backend",
      "kv",
      "serve",
      "--bind",
      `127.0.0.1:${port}`,
    ], main),
    env,
    clearEnv: true,
    stdin: "null",
    stdout: "null",
    stderr: "inherit",
  }).spawn();
  const base = `http://127.0.0.1:${port}`;
  await waitForHttp(`${base}/nix-cache-info`);
  log(`arca serve (pid ${child.pid}) serving ${cacheDir} on ${base}`);
  return {
    name: "arca",
    base,
    stats: () => processStats(child.pid),
    async stop() {
      child.kill("SIGTERM");
      await child.status;
    },
  };
}

/** What curl reported for a batch of transfers. */
interface CurlBatch {
  seconds: number;
  bytes: number;
  requests: number;
  connects: number;
}

/**
 * Fetches `urls` with one curl process: one after another on one keep-alive connection,
 * or with `parallel` concurrent transfers. Every response must be 200 and, when `sizes`
 * is given, exactly that long.
 */
async function curlBatch(
  urls: string[],
  scratch: string,
  options: { parallel?: number; sizes?: number[] } = {},
): Promise<CurlBatch> {
  const config = `${scratch}/curl-${crypto.randomUUID()}.cfg`;
  await Deno.writeTextFile(
    config,
    urls.map((url) => `url = "${url}"\noutput = "/dev/null"\n`).join(""),
  );
  const args = ["-sS", "-K", config, "-w", "%{http_code} %{size_download} %{num_connects}\\n"];
  if (options.parallel) {
    args.push("--parallel", "--parallel-max", String(options.parallel), "--parallel-immediate");
  }
  const result = await run("curl", args);
  await Deno.remove(config);
  const lines = result.stdout.trim().split("\n");
  if (lines.length !== urls.length) {
    throw new Error(`curl reported ${lines.length} transfers, expected ${urls.length}`);
  }
  let bytes = 0;
  let connects = 0;
  lines.forEach((line, i) => {
    const [code, size, conns] = line.split(" ").map(Number);
    if (code !== 200) throw new Error(`HTTP ${code} (transfer ${i})`);
    if (!options.parallel && options.sizes && size !== options.sizes[i]) {
      throw new Error(`${urls[i]}: ${size} bytes, expected ${options.sizes[i]}`);
    }
    bytes += size;
    connects += conns;
  });
  if (options.sizes) {
    const expected = options.sizes.reduce((a, b) => a + b, 0);
    if (bytes !== expected) throw new Error(`Got ${bytes} bytes in all, expected ${expected}`);
  }
  return { seconds: result.seconds, bytes, requests: urls.length, connects };
}

/** The NAR URLs and FileSizes a server's narinfos name, in closure order. */
async function narsOf(
  base: string,
  hashes: string[],
): Promise<{ urls: string[]; sizes: number[] }> {
  const urls: string[] = [];
  const sizes: number[] = [];
  for (const hash of hashes) {
    const response = await fetch(`${base}/${hash}.narinfo`);
    const text = await response.text();
    if (!response.ok) throw new Error(`${base}/${hash}.narinfo: HTTP ${response.status}`);
    const url = /^URL: (.*)$/m.exec(text)?.[1];
    const size = /^FileSize: (\d+)$/m.exec(text)?.[1];
    if (!url || !size) throw new Error(`${base}/${hash}.narinfo lacks URL or FileSize`);
    urls.push(`${base}/${url}`);
    sizes.push(Number(size));
  }
  return { urls, sizes };
}

/** Samples of one server. */
interface ServerSamples {
  narinfoRate: number[];
  narSeqRate: number[];
  narParRate: number[];
  copySeconds: number[];
  /** CPU seconds (user + system) of nix and of the server during each copy. */
  copyNixCpu: number[];
  copyServerCpu: number[];
  connects: number[];
}

async function main(): Promise<void> {
  const flags = parseFlags(Deno.args, {
    paths: 300,
    sizeMib: 1024,
    rounds: 5,
    copyRuns: 3,
    narinfoPasses: 5,
    keep: false,
    main: "",
  });
  const arcaMain = resolveMain(flags.main);
  const machine = await machineInfo();
  const scratch = makeScratchDir("serve");
  const servers: Server[] = [];
  try {
    const env = benchEnv(scratch);
    log(`machine: ${machine}`);
    log(`building (or reusing) a closure of ${flags.paths} paths`);
    const closure = await ensureClosure(flags.paths, scratch, env);
    log(`closure of ${closure.root}: ${closure.paths.length} paths, NAR ${closure.narBytes} bytes`);
    const mixed = await ensureMixedPath(flags.sizeMib, { env, scratch, log });
    log(`${mixed.reused ? "reusing" : "made"} ${mixed.storePath}`);

    const nixCache = `${scratch}/nix-cache`;
    log(`nix copy --to file://${nixCache}?compression=zstd (closure + 1 GiB path)`);
    await run("nix", [
      "copy",
      "--to",
      `file://${nixCache}?compression=zstd`,
      closure.root,
      mixed.storePath,
    ], { env });
    const arcaCache = `${scratch}/arca-cache`;
    log(`arca import-closure + import into ${arcaCache}`);
    const common = ["--cache-dir", arcaCache, "--backend", "kv"];
    await run(Deno.execPath(), arcaArgs([...common, "import-closure", closure.root], arcaMain), {
      env,
      discardStdout: true,
    });
    await run(Deno.execPath(), arcaArgs([...common, "import", mixed.storePath], arcaMain), { env });

    // No access log: the narinfo rate is the measure.
    const nginx = await startNginx(nixCache, scratch, { accessLog: false, log });
    servers.push(nginx);
    const arca = await startArca(arcaCache, benchEnv(scratch), arcaMain);
    servers.push(arca);

    const hashes = closure.paths.map((p) =>
      p.slice("/nix/store/".length, "/nix/store/".length + 32)
    );
    const samples = new Map<string, ServerSamples>();
    const nars = new Map<string, { urls: string[]; sizes: number[] }>();
    for (const server of servers) {
      samples.set(server.name, {
        narinfoRate: [],
        narSeqRate: [],
        narParRate: [],
        copySeconds: [],
        copyNixCpu: [],
        copyServerCpu: [],
        connects: [],
      });
      nars.set(server.name, await narsOf(server.base, hashes));
    }
    const narinfoUrls = (base: string) =>
      Array.from({ length: flags.narinfoPasses }, () => hashes.map((h) => `${base}/${h}.narinfo`))
        .flat();

    // Warm-up: one pass of everything on each server (page cache, JIT).
    for (const server of servers) {
      await curlBatch(narinfoUrls(server.base).slice(0, hashes.length), scratch);
      const { urls, sizes } = nars.get(server.name)!;
      await curlBatch(urls, scratch, { sizes });
    }

    // Each measurement is taken on both servers back to back, the order alternating by
    // round, so that load from other processes hits both about equally; the ratio is the
    // median of these paired ratios.
    for (let round = 0; round < flags.rounds; round++) {
      const order = round % 2 === 0 ? servers : [...servers].reverse();
      for (const server of order) {
        const s = samples.get(server.name)!;
        const info = await curlBatch(narinfoUrls(server.base), scratch);
        s.narinfoRate.push(info.requests / info.seconds);
        s.connects.push(info.connects);
      }
      for (const server of order) {
        const s = samples.get(server.name)!;
        const { urls, sizes } = nars.get(server.name)!;
        const seq = await curlBatch(urls, scratch, { sizes });
        s.narSeqRate.push(mbPerSecond(seq.bytes, seq.seconds));
        s.connects.push(seq.connects);
      }
      for (const server of order) {
        const s = samples.get(server.name)!;
        const { urls, sizes } = nars.get(server.name)!;
        const par = await curlBatch(urls, scratch, { sizes, parallel: 16 });
        s.narParRate.push(mbPerSecond(par.bytes, par.seconds));
      }
      for (const server of servers) {
        const s = samples.get(server.name)!;
        log(
          `round ${round + 1} ${server.name}: narinfo ${fixed(s.narinfoRate.at(-1)!, 0)}/s, ` +
            `NARs 1 conn ${fixed(s.narSeqRate.at(-1)!, 1)} MB/s, ` +
            `16 conns ${fixed(s.narParRate.at(-1)!, 1)} MB/s ` +
            `(connections opened: ${s.connects.slice(-2).join(" + ")})`,
        );
      }
    }

    await warmPageCache(mixed.storePath, env);
    for (let round = 0; round < flags.copyRuns; round++) {
      for (const server of round % 2 === 0 ? servers : [...servers].reverse()) {
        const store = `${scratch}/store-${server.name}-${round}`;
        const copyEnv = benchEnv(scratch);
        const before = server.stats();
        const result = await run("nix", [
          "copy",
          "--from",
          server.base,
          "--to",
          store,
          "--no-check-sigs",
          mixed.storePath,
        ], { env: copyEnv, measureRss: true });
        const after = server.stats();
        const [copied] = await pathInfos([mixed.storePath], copyEnv, { store });
        const [original] = await pathInfos([mixed.storePath], env);
        if (copied.narHash !== original.narHash) throw new Error("Copied path differs");
        samples.get(server.name)!.copySeconds.push(result.seconds);
        samples.get(server.name)!.copyNixCpu.push(
          (result.cpuSeconds?.user ?? NaN) + (result.cpuSeconds?.system ?? NaN),
        );
        samples.get(server.name)!.copyServerCpu.push(
          after.cpuUser + after.cpuSystem - before.cpuUser - before.cpuSystem,
        );
        log(`copy round ${round + 1} from ${server.name}: ${fixed(result.seconds)} s`);
        await removeTree(store);
        await removeTree(copyEnv.XDG_CACHE_HOME);
      }
    }

    const n = samples.get("nginx")!;
    const a = samples.get("arca")!;
    const narBytes = nars.get("nginx")!.sizes.reduce((x, y) => x + y, 0);
    const arcaNarBytes = nars.get("arca")!.sizes.reduce((x, y) => x + y, 0);
    const rows: string[][] = [];
    const verdict = (ratio: number, target?: number) =>
      target === undefined ? "—" : ratio >= target ? `≥ ${target}×: MET` : `≥ ${target}×: MISSED`;
    /** Median of the per-round ratios arca/nginx (`inverse` for times: nginx/arca). */
    const pairedRatio = (nv: number[], av: number[], inverse = false) =>
      median(nv.map((x, i) => inverse ? x / av[i] : av[i] / x));
    const add = (
      label: string,
      nv: number[],
      av: number[],
      unit: string,
      target?: number,
      digits = 1,
    ) => {
      const ratio = pairedRatio(nv, av);
      rows.push([
        label,
        `${fixed(median(nv), digits)} (${fixed(Math.max(...nv), digits)}) ${unit}`,
        `${fixed(median(av), digits)} (${fixed(Math.max(...av), digits)}) ${unit}`,
        `${fixed(ratio)}×`,
        verdict(ratio, target),
      ]);
    };
    add("narinfo, one by one, 1 connection", n.narinfoRate, a.narinfoRate, "req/s", 0.8, 0);
    add("all NARs, one by one, 1 connection", n.narSeqRate, a.narSeqRate, "MB/s", 0.5);
    add("all NARs, 16 concurrent", n.narParRate, a.narParRate, "MB/s");
    const copyRatio = pairedRatio(n.copySeconds, a.copySeconds, true);
    const copyCell = (seconds: number[]) =>
      `${fixed(median(seconds))} (${fixed(Math.min(...seconds))}) s = ${
        fixed(mbPerSecond(mixed.narSize, median(seconds)), 1)
      } MB/s`;
    rows.push([
      `nix copy --from http (1 path, NAR ${megabytes(mixed.narSize)})`,
      copyCell(n.copySeconds),
      copyCell(a.copySeconds),
      `${fixed(copyRatio)}×`,
      verdict(copyRatio, 0.9),
    ]);

    console.log(`\n## Serve: arca serve vs nginx (Nix-written file cache)`);
    console.log(machine);
    console.log(`arca: ${await arcaRevision(arcaMain)}; load average at end: ${loadAverage()}`);
    console.log(
      `closure: ${hashes.length} paths, NAR ${megabytes(closure.narBytes)}; NAR files as served: ` +
        `nginx ${megabytes(narBytes)}, arca ${megabytes(arcaNarBytes)} (zstd)`,
    );
    console.log(
      `client: curl, one process; narinfo ${flags.narinfoPasses} passes over the closure ` +
        `(${hashes.length * flags.narinfoPasses} requests); cells: median (best) of ` +
        `${flags.rounds} rounds, nix copy of ${flags.copyRuns}; arca/nginx: median of the ` +
        `paired per-round ratios (speed; for nix copy nginx time / arca time); ` +
        `connections opened per one-connection batch: ` +
        `nginx ${Math.max(...n.connects)}, arca ${Math.max(...a.connects)}\n`,
    );
    console.log(formatTable(["measure", "nginx", "arca", "arca/nginx", "target"], rows));
    console.log(
      `\nraw samples: nginx narinfo/s ${n.narinfoRate.map((x) => fixed(x, 0)).join(", ")}; ` +
        `arca narinfo/s ${a.narinfoRate.map((x) => fixed(x, 0)).join(", ")}; ` +
        `nginx NAR MB/s 1 conn ${n.narSeqRate.map((x) => fixed(x, 1)).join(", ")}; ` +
        `arca ${a.narSeqRate.map((x) => fixed(x, 1)).join(", ")}; ` +
        `16 conns nginx ${n.narParRate.map((x) => fixed(x, 1)).join(", ")}; ` +
        `arca ${a.narParRate.map((x) => fixed(x, 1)).join(", ")}; ` +
        `nix copy s nginx ${n.copySeconds.map((x) => fixed(x)).join(", ")}; ` +
        `arca ${a.copySeconds.map((x) => fixed(x)).join(", ")}`,
    );
    console.log(
      `nix copy, CPU seconds (user + system, median): nix from nginx ${
        fixed(median(n.copyNixCpu))
      }, from arca ${fixed(median(a.copyNixCpu))}; server: nginx ${
        fixed(median(n.copyServerCpu))
      }, arca ${fixed(median(a.copyServerCpu))}`,
    );
  } finally {
    for (const server of servers.reverse()) await server.stop().catch(() => {});
    if (flags.keep) log(`kept ${scratch}`);
    else await removeTree(scratch);
  }
}

if (import.meta.main) await main();
