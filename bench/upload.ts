/**
 * Upload benchmark (the "team cache" issue, section "Speed"): `nix copy --to http://…`
 * into `arca serve --upload-token-file <f>` against the same upload into nginx with its
 * WebDAV module, in the same run, on loopback.
 *
 * The path is the 1 GiB mixed-content path of DESIGN.md §8 (bench/common.ts
 * `ensureMixedPath`, reused when already in the store). Each round, both targets in
 * alternating order, each with a fresh destination and a fresh XDG_CACHE_HOME for Nix:
 * - nginx: `/usr/sbin/nginx` (`dav_methods PUT DELETE MKCOL; create_full_put_path on;
 *   client_max_body_size 0;`) writing into a fresh directory;
 *   `nix copy --to 'http://127.0.0.1:PORT/?compression=zstd' <path>`;
 * - arca: `arca --cache-dir <fresh dir> --backend kv serve --upload-token-file <f>`;
 *   `nix copy --to 'http://127.0.0.1:PORT/?compression=zstd' --option netrc-file <netrc> <path>`
 *   (the netrc holds the token as the password for 127.0.0.1).
 * Nix first GETs `nix-cache-info`: nginx answers 404 and Nix PUTs one; arca has its own.
 *
 * Reported: wall-clock seconds of `nix copy` (process start to exit; the upload is done
 * when it exits), MB/s of NAR (10^6 bytes), nginx time / arca time (median of the paired
 * per-round ratios; target ≥ 1.0), the server's peak RSS and CPU seconds (from /proc just
 * before it is stopped; arca is a fresh process each run), the Nix client's CPU seconds,
 * and where the time goes, from the servers' request logs (nginx `$msec`, arca's
 * `--verbose` lines timed as they arrive): until `HEAD /nar/…` Nix dumps, compresses and
 * hashes the NAR into a temporary file (client only); then `PUT /nar/…` streams it (for
 * arca: decompress, validate, chunk, compress, write); then `PUT /<hash>.narinfo`
 * (arca: the checks and the commit). Each upload is checked: nginx's narinfo names a NAR
 * file of its FileSize; arca serves the narinfo afterwards with the right NarSize.
 *
 * With `--profile`, one more arca upload runs under `deno run --cpu-prof` and the self
 * time of the main thread and of each Worker is summarized (by function and by file).
 *
 * Usage: `deno run -A bench/upload.ts [--size-mib 1024] [--runs 3] [--profile] [--keep]
 * [--main <main.ts>]` (`--main` runs another checkout's arca, e.g. a `git archive` of a
 * commit, when the working tree is mid-change.)
 * @module
 */

import {
  arcaRevision,
  benchEnv,
  type BenchServer,
  cpuProfileSpan,
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
  type ProcessStats,
  removeTree,
  type RequestRecord,
  resolveMain,
  run,
  startArcaServe,
  startNginx,
  summarizeCpuProfile,
  warmPageCache,
} from "./common.ts";

function log(line: string): void {
  console.error(`[upload] ${line}`);
}

/** Seconds from the start of `nix copy` to the end of each step (from the server's log). */
interface Phases {
  /** Until `HEAD /nar/…` ended: Nix start-up, nix-cache-info, the narinfo lookup, and
   * dumping + compressing + hashing the NAR on the client. */
  client: number;
  /** `PUT /nar/…`: the transfer and the server's work on it. */
  putNar: number;
  /** `PUT /<hash>.narinfo`. */
  putNarInfo: number;
  /** From the end of the narinfo PUT to Nix's exit. */
  exit: number;
}

/** One timed upload. */
interface Sample {
  seconds: number;
  /** When `nix copy` started (epoch ms). */
  startMs: number;
  /** When the server was told to stop (epoch ms; arca only). */
  stopMs?: number;
  /** From the start of `nix copy` until arca held the path in its chunk store (arca only). */
  importedSeconds?: number;
  phases?: Phases;
  server: ProcessStats;
  client: { user: number; system: number; peakRss?: number };
  storedBytes: number;
  requests: RequestRecord[];
}

function phasesOf(requests: RequestRecord[], startMs: number, endMs: number): Phases | undefined {
  const head = requests.find((r) => r.method === "HEAD" && r.path.startsWith("/nar/"));
  const putNar = requests.find((r) => r.method === "PUT" && r.path.startsWith("/nar/"));
  const putInfo = requests.find((r) => r.method === "PUT" && r.path.endsWith(".narinfo"));
  if (!head || !putNar || !putInfo) return undefined;
  return {
    client: (head.endMs - startMs) / 1000,
    putNar: (putNar.endMs - head.endMs) / 1000,
    putNarInfo: (putInfo.endMs - putNar.endMs) / 1000,
    exit: (endMs - putInfo.endMs) / 1000,
  };
}

function hashPartOf(storePath: string): string {
  return storePath.slice("/nix/store/".length, "/nix/store/".length + 32);
}

/** Runs `nix copy --to <server>` and measures it and the server (which keeps running). */
async function upload(
  server: BenchServer,
  storePath: string,
  scratch: string,
  nixOptions: string[],
): Promise<Omit<Sample, "storedBytes">> {
  const env = benchEnv(scratch);
  try {
    const startMs = Date.now();
    const result = await run(
      "nix",
      ["copy", "--to", `${server.base}/?compression=zstd`, ...nixOptions, storePath],
      { env, measureRss: true },
    );
    const endMs = Date.now();
    // Let arca's last log lines arrive.
    await new Promise((resolve) => setTimeout(resolve, 100));
    const stats = server.stats();
    const requests = await server.requests();
    return {
      seconds: result.seconds,
      startMs,
      phases: phasesOf(requests, startMs, endMs),
      server: stats,
      client: {
        user: result.cpuSeconds?.user ?? NaN,
        system: result.cpuSeconds?.system ?? NaN,
        peakRss: result.peakRss,
      },
      requests,
    };
  } finally {
    await removeTree(env.XDG_CACHE_HOME);
  }
}

async function nginxRun(
  storePath: string,
  narSize: number,
  scratch: string,
  round: number,
): Promise<Sample> {
  const root = `${scratch}/dav-root-${round}`;
  await Deno.mkdir(root, { recursive: true });
  const server = await startNginx(root, scratch, { dav: true });
  try {
    const sample = await upload(server, storePath, scratch, []);
    const narinfo = await Deno.readTextFile(`${root}/${hashPartOf(storePath)}.narinfo`);
    const url = /^URL: (.*)$/m.exec(narinfo)?.[1];
    const fileSize = Number(/^FileSize: (\d+)$/m.exec(narinfo)?.[1]);
    const narSizeSeen = Number(/^NarSize: (\d+)$/m.exec(narinfo)?.[1]);
    if (!url || (await Deno.stat(`${root}/${url}`)).size !== fileSize || narSizeSeen !== narSize) {
      throw new Error(`nginx upload incomplete: ${narinfo}`);
    }
    return { ...sample, storedBytes: await diskUsage(root) };
  } finally {
    await server.stop();
    await removeTree(root);
  }
}

async function arcaRun(
  storePath: string,
  narSize: number,
  scratch: string,
  round: number | string,
  main: string,
  denoFlags: string[] = [],
): Promise<Sample> {
  const cacheDir = `${scratch}/arca-cache-${round}`;
  const token = Array.from(crypto.getRandomValues(new Uint8Array(16)))
    .map((b) => b.toString(16).padStart(2, "0")).join("");
  const tokenFile = `${scratch}/upload-token`;
  const netrc = `${scratch}/netrc`;
  await Deno.writeTextFile(tokenFile, `${token}\n`);
  await Deno.writeTextFile(netrc, `machine 127.0.0.1 login arca password ${token}\n`);
  const server = await startArcaServe(cacheDir, {
    env: benchEnv(scratch),
    main,
    serveArgs: ["--upload-token-file", tokenFile],
    denoFlags,
    log,
  });
  try {
    const sample = await upload(server, storePath, scratch, ["--option", "netrc-file", netrc]);
    const response = await fetch(`${server.base}/${hashPartOf(storePath)}.narinfo`);
    const text = await response.text();
    if (!response.ok || Number(/^NarSize: (\d+)$/m.exec(text)?.[1]) !== narSize) {
      throw new Error(`arca upload incomplete: HTTP ${response.status} ${text}`);
    }
    // The upload is stored first and chunked in the background: wait for that (it is
    // measured too, and must not overlap the next round).
    await untilImported(cacheDir);
    const importedSeconds = (Date.now() - sample.startMs) / 1000;
    const stopMs = Date.now();
    await server.stop();
    return {
      ...sample,
      stopMs,
      importedSeconds,
      storedBytes: await diskUsage(`${cacheDir}/objects`),
    };
  } finally {
    await server.stop();
    await removeTree(cacheDir);
  }
}

/** Waits until arca has no pending upload left (its import finished). */
async function untilImported(cacheDir: string): Promise<void> {
  const deadline = Date.now() + 600_000;
  for (;;) {
    let pending = 0;
    try {
      for await (const entry of Deno.readDir(`${cacheDir}/uploads/pending`)) {
        if (entry.name.endsWith(".json")) pending++;
      }
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
    }
    if (pending === 0) return;
    if (Date.now() > deadline) throw new Error(`arca never imported its pending uploads`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

function cpuCell(samples: Sample[], of: (s: Sample) => { user: number; system: number }): string {
  return `${fixed(median(samples.map((s) => of(s).user)), 1)} + ${
    fixed(median(samples.map((s) => of(s).system)), 1)
  }`;
}

async function main(): Promise<void> {
  const flags = parseFlags(Deno.args, {
    sizeMib: 1024,
    runs: 3,
    profile: false,
    keep: false,
    main: "",
  });
  const arcaMain = resolveMain(flags.main);
  const machine = await machineInfo();
  const scratch = makeScratchDir("upload");
  try {
    const env = benchEnv(scratch);
    log(`machine: ${machine}`);
    const mixed = await ensureMixedPath(flags.sizeMib, { env, scratch, log });
    log(`${mixed.reused ? "reusing" : "made"} ${mixed.storePath} (NAR ${mixed.narSize} bytes)`);
    await warmPageCache(mixed.storePath, env);

    const nginx: Sample[] = [];
    const arca: Sample[] = [];
    for (let round = 0; round < flags.runs; round++) {
      const order = round % 2 === 0 ? ["nginx", "arca"] : ["arca", "nginx"];
      for (const target of order) {
        if (target === "nginx") {
          const s = await nginxRun(mixed.storePath, mixed.narSize, scratch, round);
          nginx.push(s);
          log(
            `round ${round + 1}: nginx ${fixed(s.seconds)} s (client ${
              fixed(s.phases?.client ?? NaN)
            }, PUT nar ${fixed(s.phases?.putNar ?? NaN)})`,
          );
        } else {
          // Uploads are checked: each one's narinfo must be served with the right NarSize.
          const s = await arcaRun(mixed.storePath, mixed.narSize, scratch, round, arcaMain);
          arca.push(s);
          log(
            `round ${round + 1}: arca ${fixed(s.seconds)} s (client ${
              fixed(s.phases?.client ?? NaN)
            }, PUT nar ${fixed(s.phases?.putNar ?? NaN)}), server ${
              megabytes(s.server.peakRss)
            } peak RSS`,
          );
        }
      }
    }

    const ratio = median(nginx.map((n, i) => n.seconds / arca[i].seconds));
    const row = (name: string, list: Sample[]) => {
      const seconds = median(list.map((s) => s.seconds));
      return [
        name,
        fixed(seconds),
        fixed(mbPerSecond(mixed.narSize, seconds), 1),
        name.startsWith("arca") ? `${fixed(ratio)}×` : "1.00×",
        megabytes(Math.max(...list.map((s) => s.server.peakRss))),
        cpuCell(list, (s) => ({ user: s.server.cpuUser, system: s.server.cpuSystem })),
        cpuCell(list, (s) => s.client),
        megabytes(median(list.map((s) => s.storedBytes))),
        list.map((s) => fixed(s.seconds)).join(", "),
      ];
    };
    const phaseRow = (name: string, list: Sample[]) => {
      const with_ = list.filter((s) => s.phases);
      const cell = (of: (p: Phases) => number) => fixed(median(with_.map((s) => of(s.phases!))));
      return [
        name,
        cell((p) => p.client),
        cell((p) => p.putNar),
        fixed(mbPerSecond(mixed.narSize, median(with_.map((s) => s.phases!.putNar))), 1),
        cell((p) => p.putNarInfo),
        cell((p) => p.exit),
      ];
    };

    console.log(`\n## Upload: nix copy --to http://…?compression=zstd, arca vs nginx WebDAV`);
    console.log(`${mixed.storePath}: NAR ${mixed.narSize} bytes (${megabytes(mixed.narSize)})`);
    console.log(machine);
    console.log(`arca: ${await arcaRevision(arcaMain)}; load average at end: ${loadAverage()}`);
    console.log(
      `median of ${flags.runs} rounds (order alternating), wall clock of nix copy; ` +
        `arca vs nginx: median of paired ratios nginx s / arca s; server peak RSS: max of ` +
        `runs (VmHWM; nginx: largest process); server CPU: /proc of the server process ` +
        `(nginx: master + workers); client CPU: nix, by /usr/bin/time\n`,
    );
    console.log(formatTable(
      [
        "target",
        "seconds",
        "MB/s of NAR",
        "arca vs nginx",
        "server peak RSS",
        "server CPU s user + sys",
        "nix CPU s user + sys",
        "stored",
        "runs (s)",
      ],
      [row("nginx WebDAV", nginx), row("arca serve (kv, zstd)", arca)],
    ));
    console.log(
      `\nphases (median seconds, from the servers' request logs): client = nix start to the ` +
        `end of HEAD /nar/… (dump + compress + hash into a temporary file); PUT nar = its ` +
        `transfer and the server's work; MB/s = NAR bytes / PUT nar seconds\n`,
    );
    console.log(formatTable(
      ["target", "client", "PUT nar", "PUT nar MB/s of NAR", "PUT narinfo", "nix exit"],
      [phaseRow("nginx WebDAV", nginx), phaseRow("arca serve", arca)],
    ));
    console.log(
      `\narca held the path in its chunk store ${
        fixed(median(arca.map((s) => s.importedSeconds ?? NaN)))
      } s after nix copy started (median; ${
        arca.map((s) => fixed(s.importedSeconds ?? NaN)).join(", ")
      }); the server CPU above is that of the upload alone`,
    );
    console.log(
      `\ntarget: arca ≥ 1.0× nginx: ${fixed(ratio)}× ${ratio >= 1.0 ? "MET" : "MISSED"}`,
    );
    const requests = arca[0]?.requests.map((r) => `${r.method} ${r.path} ${r.status}`);
    console.log(`arca saw: ${requests?.join("; ")}`);
    console.log(
      `nginx saw: ${nginx[0]?.requests.map((r) => `${r.method} ${r.path} ${r.status}`).join("; ")}`,
    );

    if (flags.profile) {
      const dir = `${scratch}/profile`;
      await Deno.mkdir(dir, { recursive: true });
      log(`profiling one more arca upload (deno --cpu-prof into ${dir})`);
      const s = await arcaRun(mixed.storePath, mixed.narSize, scratch, "profile", arcaMain, [
        "--cpu-prof",
        `--cpu-prof-dir=${dir}`,
      ]);
      const files = [...Deno.readDirSync(dir)].map((e) => `${dir}/${e.name}`).sort();
      const mainFile = files.find((f) => !f.includes(".worker-"));
      const find = (method: string, test: (path: string) => boolean) =>
        s.requests.find((r) => r.method === method && test(r.path))?.endMs;
      const headEnd = find("HEAD", (p) => p.startsWith("/nar/"));
      const putNarEnd = find("PUT", (p) => p.startsWith("/nar/"));
      const putInfoEnd = find("PUT", (p) => p.endsWith(".narinfo"));
      if (!mainFile || !headEnd || !putNarEnd || !putInfoEnd || !s.stopMs) {
        throw new Error(`Cannot place the profiles in time: ${files.join(", ")}`);
      }
      // The main isolate's profile ends when the process exits, just after SIGTERM.
      const clockOffsetMs = s.stopMs - cpuProfileSpan(mainFile).endMs;
      const windows: [string, number, number][] = [
        ["nix dumps and compresses (arca waits)", s.startMs, headEnd],
        ["PUT /nar/…", headEnd, putNarEnd],
        ["PUT /<hash>.narinfo", putNarEnd, putInfoEnd],
      ];
      const isolate = (file: string) => /\.(worker-\d+)\./.exec(file)?.[1] ?? "main";
      console.log(
        `\n### Profile of one arca upload under --cpu-prof: ${fixed(s.seconds)} s; server CPU ${
          fixed(s.server.cpuUser, 1)
        } + ${fixed(s.server.cpuSystem, 1)} s; ${files.length} isolates\n`,
      );
      console.log(
        "Self time per isolate in each phase (windows placed by aligning the main profile's " +
          "end with SIGTERM; ± ~0.1 s):\n",
      );
      console.log(formatTable(
        ["phase", "seconds", ...files.map((f) => `${isolate(f)} busy`)],
        windows.map(([name, fromMs, toMs]) => [
          name,
          fixed((toMs - fromMs) / 1000),
          ...files.map((f) => {
            const w = summarizeCpuProfile(f, { window: { fromMs, toMs }, clockOffsetMs });
            if (w.seconds < 0.01) return "— (not running)";
            return `${fixed(w.busySeconds)} s (${fixed(w.busySeconds / w.seconds * 100, 0)}%)`;
          }),
        ]),
      ));
      for (const [name, fromMs, toMs] of windows.slice(1)) {
        for (const file of files) {
          const w = summarizeCpuProfile(file, { top: 10, window: { fromMs, toMs }, clockOffsetMs });
          if (w.seconds < 0.01) continue;
          console.log(
            `\n${name}, ${isolate(file)}: ${fixed(w.busySeconds)} s busy of ${
              fixed(w.seconds)
            } s\n`,
          );
          console.log(formatTable(
            ["self time by function", "s", "share"],
            w.functions.map((e) => [e.name, fixed(e.seconds), `${fixed(e.share * 100, 1)}%`]),
          ));
        }
      }
      if (flags.keep) log(`profiles kept in ${dir}`);
    }
  } finally {
    if (flags.keep) log(`kept ${scratch}`);
    else await removeTree(scratch);
  }
}

if (import.meta.main) await main();
