/**
 * GC benchmark (the "team cache" issue, section "Speed": "GC of a 10k-path cache:
 * seconds, reported"): how long `arca gc` takes on a cache of 10,000 paths, for both
 * metadata backends, and what it evicts and frees.
 *
 * The cache is made WITHOUT Nix, in this process, through the cache's own API
 * (`Cache.open` + `Cache.importNar` of NARs made by `encodeNar`, several imports at a time
 * sharing one compressor pool), so it takes a minute or two rather than the hours of
 * building 10k derivations. Its shape, deterministic (xorshift32, fixed seeds):
 * - `--closures` (100) projects of `paths / closures` (100) paths each; in a project, path
 *   i references path (i-1)/2 (a binary tree: path 0 is the deepest dependency, the upper
 *   half are top-level paths nothing references) and, every tenth, path i-1 (a chain
 *   edge); in projects other than 0, every seventh path also references a path of
 *   project 0 (a shared base, like a standard environment);
 * - each NAR is a directory with `data` of log-uniform size 256 B – 128 KiB (half
 *   word-like text, a third random, the rest half and half), and in one path of five
 *   also `lib/shared.so`, one of 20 random blobs of 64–192 KiB shared by many paths
 *   (their chunks are stored once and referenced from many manifests); every fiftieth
 *   path is an exact copy of the previous one's NAR under another name (two narinfos,
 *   one manifest);
 * - last use: project k was last used k/closures × 60 days ago (± up to 6 hours per
 *   path), project 0 one hour ago; set by rewriting each record's `registeredAt` after
 *   its import (`metadata.putPath`) and its access time (`accessTimes.touch`), since
 *   `lastUsed = max(registeredAt, access time)`.
 *
 * Measured, with `arca --cache-dir <copy> --backend <b> gc … --json` as users run it (wall
 * clock from process start to exit, including Deno's start-up, given apart as `arca
 * --version`; peak RSS and CPU by /usr/bin/time), each on a fresh copy (`cp -a`, not
 * timed) of the generated cache, median of `--runs`:
 * - `gc --max-size <half> --dry-run` (half = half of `status --json` storedBytes);
 * - `gc --max-size <half>`, then the same again on its result (nothing left to evict:
 *   the cost of the scan and sweep alone);
 * - `gc --max-age 30d`.
 * After each real collection the result is checked: every remaining path's references
 * remain (`list --json`), and with `--max-size` the chunk files left (`status --json`
 * storedBytes) are at most the limit.
 *
 * Usage: `deno run -A bench/gc.ts [--paths 10000] [--closures 100] [--runs 3]
 * [--backends kv,filesystem] [--max-age 30d] [--concurrency 8] [--keep]`. It imports
 * this checkout's src/ and runs this checkout's main.ts; to measure a committed tree
 * while the working tree is mid-change, run it from a snapshot
 * (`git archive HEAD | tar -x -C /tmp/arca-head && cd /tmp/arca-head && deno run -A bench/gc.ts`).
 * @module
 */

import { Cache } from "../src/cache/cache.ts";
import { ChunkCompressor } from "../src/cache/compression.ts";
import { sha256 } from "../src/cache/hash.ts";
import type { MetadataBackend } from "../src/cache/metadata.ts";
import { encodeNar, type NarTree } from "../src/cache/nar.ts";
import { encodeNixBase32 } from "../src/cache/nixbase32.ts";
import {
  arcaArgs,
  arcaRevision,
  benchEnv,
  fixed,
  formatTable,
  loadAverage,
  machineInfo,
  MAIN_TS,
  makeScratchDir,
  median,
  megabytes,
  parseFlags,
  removeTree,
  RSS_METHOD,
  run,
} from "./common.ts";

const DAY = 86_400_000;
const HOUR = 3_600_000;

function log(line: string): void {
  console.error(`[gc] ${line}`);
}

/** xorshift32 (seed must not be 0). */
function xorshift32(seed: number): () => number {
  let state = (seed >>> 0) || 0x9e3779b9;
  return () => {
    state ^= state << 13;
    state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5;
    state >>>= 0;
    return state;
  };
}

function fillRandom(out: Uint8Array, seed: number): void {
  const next = xorshift32(seed);
  const view = new DataView(out.buffer, out.byteOffset, out.length);
  let i = 0;
  for (; i + 4 <= out.length; i += 4) view.setUint32(i, next(), true);
  for (; i < out.length; i++) out[i] = next() & 0xff;
}

const VOCABULARY = (() => {
  const next = xorshift32(0x70c4b);
  const letters = "etaoinshrdlucmfwypvbgkqjxz";
  const encoder = new TextEncoder();
  return Array.from({ length: 2048 }, () => {
    let word = "";
    const length = 2 + (next() % 9);
    for (let i = 0; i < length; i++) word += letters[Math.floor((next() % 1000) ** 2 / 38462)];
    return encoder.encode(word);
  });
})();

function fillText(out: Uint8Array, seed: number): void {
  const next = xorshift32(seed);
  let pos = 0;
  while (pos < out.length) {
    const r = (next() % 65536) / 65536;
    const word = VOCABULARY[Math.floor(r * r * VOCABULARY.length)];
    for (let i = 0; i < word.length && pos < out.length; i++) out[pos++] = word[i];
    if (pos < out.length) out[pos++] = next() % 12 === 0 ? 0x0a : 0x20;
  }
}

/** A syntactically valid store path whose hash part is derived from its name. */
function storePathOf(name: string): string {
  const digest = sha256(new TextEncoder().encode(`arca-bench-gc:${name}`));
  return `/nix/store/${encodeNixBase32(digest.subarray(0, 20))}-${name}`;
}

/** One path of the generated cache. */
interface PlannedPath {
  storePath: string;
  /** Indexes (into the plan) of the paths it references. */
  references: number[];
  /** Last use, ms before now. */
  ageMs: number;
  /** Seed of its contents; a copy has the seed of the path it copies. */
  seed: number;
  shared?: number;
}

/** The deterministic shape of the cache (see the module comment). */
function planCache(paths: number, closures: number): PlannedPath[] {
  const perClosure = Math.ceil(paths / closures);
  const next = xorshift32(0x6c0ffee);
  const plan: PlannedPath[] = [];
  for (let index = 0; index < paths; index++) {
    const project = Math.floor(index / perClosure);
    const i = index % perClosure;
    const first = project * perClosure;
    const references: number[] = [];
    if (i > 0) references.push(first + Math.floor((i - 1) / 2));
    if (i > 1 && i % 10 === 0) references.push(index - 1);
    if (project > 0 && i % 7 === 3) references.push((i * 13) % Math.min(perClosure, paths));
    const jitter = (next() % (6 * 60)) * 60_000;
    const ageMs = project === 0 ? HOUR : (project / closures) * 60 * DAY + jitter;
    const copy = index % 50 === 49;
    plan.push({
      storePath: storePathOf(`p${project}-${i}${copy ? "-copy" : ""}`),
      references: [...new Set(references)].sort((a, b) => a - b),
      ageMs,
      seed: copy ? plan[index - 1].seed : 1 + index,
      shared: copy ? plan[index - 1].shared : (next() % 5 === 0 ? next() % 20 : undefined),
    });
  }
  return plan;
}

const sharedBlobs = new Map<number, Uint8Array>();

function sharedBlob(n: number): Uint8Array {
  let blob = sharedBlobs.get(n);
  if (!blob) {
    const next = xorshift32(0x5a4ed + n);
    blob = new Uint8Array(64 * 1024 + (next() % (128 * 1024)));
    fillRandom(blob, 0xb10b + n);
    sharedBlobs.set(n, blob);
  }
  return blob;
}

/** The NAR of a planned path. */
function narOf(path: PlannedPath): Uint8Array {
  const next = xorshift32(path.seed * 2654435761);
  const size = Math.floor(256 * Math.pow(512, (next() % 1_000_000) / 1_000_000));
  const data = new Uint8Array(size);
  const kind = next() % 6;
  if (kind < 3) fillText(data, path.seed);
  else if (kind < 5) fillRandom(data, path.seed);
  else {
    fillText(data.subarray(0, size >>> 1), path.seed);
    fillRandom(data.subarray(size >>> 1), path.seed);
  }
  const entries: Record<string, NarTree> = { data: { type: "regular", contents: data } };
  if (path.shared !== undefined) {
    entries.lib = {
      type: "directory",
      entries: {
        "shared.so": { type: "regular", contents: sharedBlob(path.shared), executable: true },
      },
    };
  }
  return encodeNar({ type: "directory", entries });
}

/** What generating one cache took and made. */
interface Generated {
  dir: string;
  seconds: number;
  paths: number;
  narBytes: number;
  storedBytes: number;
  chunks: number;
}

/** Fills a fresh cache directory with the planned paths, through the cache's API. */
async function generate(
  dir: string,
  backend: MetadataBackend,
  plan: PlannedPath[],
  concurrency: number,
): Promise<Generated> {
  const started = performance.now();
  const cache = await Cache.open(dir, { backend });
  const compressor = new ChunkCompressor({ compression: "zstd" });
  const now = Date.now();
  let nextIndex = 0;
  let done = 0;
  const worker = async () => {
    for (let index = nextIndex++; index < plan.length; index = nextIndex++) {
      const path = plan[index];
      const nar = narOf(path);
      const result = await cache.importNar(ReadableStream.from([nar]), {
        storePath: path.storePath,
        references: path.references.map((r) => plan[r].storePath.slice("/nix/store/".length)),
        sigs: [],
      }, { compression: "zstd", compressor });
      const lastUsed = Math.round(now - path.ageMs);
      await cache.metadata.putPath({ ...result.record, registeredAt: lastUsed });
      await cache.accessTimes.touch([path.storePath.slice(11, 43)], lastUsed);
      if (++done % 1000 === 0) {
        log(`${backend}: ${done} paths (${fixed((performance.now() - started) / 1000, 1)} s)`);
      }
    }
  };
  try {
    await Promise.all(Array.from({ length: concurrency }, worker));
    const stats = await cache.stats();
    return {
      dir,
      seconds: (performance.now() - started) / 1000,
      paths: stats.paths,
      narBytes: stats.narBytes,
      storedBytes: stats.storedBytes,
      chunks: stats.chunks,
    };
  } finally {
    compressor.close();
    cache.close();
  }
}

/** The `gc --json` report. */
interface GcJson {
  dryRun: boolean;
  evicted: { storePath: string; narSize: number; lastUsed: number }[];
  remainingPaths: number;
  freedBytes: number;
  deletedChunks: number;
  deletedManifests: number;
  liveBytes: number;
}

/** One timed `arca gc`. */
interface GcSample {
  seconds: number;
  peakRss?: number;
  cpu?: { user: number; system: number };
  report: GcJson;
  /** After a real collection: status storedBytes and whether the closure check passed. */
  storedAfter?: number;
}

async function arca(
  dir: string,
  backend: string,
  args: string[],
  scratch: string,
  measure = false,
) {
  const env = benchEnv(scratch);
  try {
    return await run(
      Deno.execPath(),
      arcaArgs(["--cache-dir", dir, "--backend", backend, ...args], MAIN_TS),
      { env, measureRss: measure },
    );
  } finally {
    await removeTree(env.XDG_CACHE_HOME);
  }
}

async function timedGc(
  dir: string,
  backend: string,
  args: string[],
  scratch: string,
): Promise<GcSample> {
  const result = await arca(dir, backend, ["gc", ...args, "--json"], scratch, true);
  return {
    seconds: result.seconds,
    peakRss: result.peakRss,
    cpu: result.cpuSeconds,
    report: JSON.parse(result.stdout),
  };
}

/** Checks a collected cache: closures whole, and (with a limit) the chunk files within it. */
async function checkCollected(
  dir: string,
  backend: string,
  scratch: string,
  maxSize?: number,
): Promise<number> {
  const listed = JSON.parse((await arca(dir, backend, ["list", "--json"], scratch)).stdout) as {
    storePath: string;
    references: string[];
  }[];
  const present = new Set(listed.map((p) => p.storePath.slice("/nix/store/".length)));
  for (const path of listed) {
    for (const reference of path.references) {
      if (!present.has(reference)) {
        throw new Error(`After gc, ${path.storePath} lacks its reference ${reference}`);
      }
    }
  }
  const status = JSON.parse((await arca(dir, backend, ["status", "--json"], scratch)).stdout);
  if (status.paths !== listed.length) throw new Error("status and list disagree after gc");
  if (maxSize !== undefined && status.storedBytes > maxSize) {
    throw new Error(`After gc --max-size ${maxSize}, ${status.storedBytes} bytes remain`);
  }
  return status.storedBytes;
}

async function copyCache(from: string, to: string): Promise<void> {
  await removeTree(to);
  await run("cp", ["-a", from, to]);
}

function describe(samples: GcSample[], narBytesOf: (s: GcSample) => number): string[] {
  const last = samples[0].report;
  const cpu = samples.every((s) => s.cpu)
    ? `${fixed(median(samples.map((s) => s.cpu!.user)), 1)} + ${
      fixed(median(samples.map((s) => s.cpu!.system)), 1)
    }`
    : "n/a";
  return [
    fixed(median(samples.map((s) => s.seconds))),
    samples.map((s) => fixed(s.seconds)).join(", "),
    `${last.evicted.length} (${megabytes(narBytesOf(samples[0]))})`,
    last.dryRun ? `${megabytes(last.freedBytes)} (would)` : `${megabytes(last.freedBytes)}`,
    last.dryRun ? "—" : String(last.deletedChunks),
    String(last.remainingPaths),
    megabytes(last.liveBytes),
    megabytes(Math.max(...samples.map((s) => s.peakRss ?? 0))),
    cpu,
  ];
}

async function main(): Promise<void> {
  const flags = parseFlags(Deno.args, {
    paths: 10000,
    closures: 100,
    runs: 3,
    backends: "kv,filesystem",
    maxAge: "30d",
    concurrency: 8,
    keep: false,
  });
  const backends = flags.backends.split(",").map((b) => b.trim()) as MetadataBackend[];
  const machine = await machineInfo();
  const scratch = makeScratchDir("gc");
  const out: string[] = [];
  try {
    log(`machine: ${machine}`);
    const plan = planCache(flags.paths, flags.closures);
    const startup: number[] = [];
    for (let i = 0; i < 3; i++) {
      startup.push((await arca(`${scratch}/none`, "kv", ["--version"], scratch)).seconds);
    }
    const generation: string[][] = [];
    const results: string[][] = [];
    for (const backend of backends) {
      const pristine = `${scratch}/pristine-${backend}`;
      log(`${backend}: generating ${plan.length} paths in ${pristine}`);
      const generated = await generate(pristine, backend, plan, flags.concurrency);
      log(`${backend}: generated in ${fixed(generated.seconds, 1)} s`);
      generation.push([
        backend,
        String(generated.paths),
        megabytes(generated.narBytes),
        megabytes(generated.storedBytes),
        String(generated.chunks),
        fixed(generated.seconds, 1),
      ]);
      const half = Math.floor(generated.storedBytes / 2);
      const work = `${scratch}/work-${backend}`;
      const narOf = (s: GcSample) => s.report.evicted.reduce((sum, p) => sum + p.narSize, 0);

      const dry: GcSample[] = [];
      const sized: GcSample[] = [];
      const again: GcSample[] = [];
      const aged: GcSample[] = [];
      for (let round = 0; round < flags.runs; round++) {
        await copyCache(pristine, work);
        dry.push(await timedGc(work, backend, ["--max-size", String(half), "--dry-run"], scratch));
        await copyCache(pristine, work);
        const s = await timedGc(work, backend, ["--max-size", String(half)], scratch);
        s.storedAfter = await checkCollected(work, backend, scratch, half);
        sized.push(s);
        again.push(await timedGc(work, backend, ["--max-size", String(half)], scratch));
        await copyCache(pristine, work);
        const a = await timedGc(work, backend, ["--max-age", flags.maxAge], scratch);
        a.storedAfter = await checkCollected(work, backend, scratch);
        aged.push(a);
        log(
          `${backend} round ${round + 1}: dry ${fixed(dry.at(-1)!.seconds)} s, max-size ${
            fixed(s.seconds)
          } s (${s.report.evicted.length} evicted), again ${fixed(again.at(-1)!.seconds)} s, ` +
            `max-age ${fixed(a.seconds)} s (${a.report.evicted.length} evicted)`,
        );
      }
      await removeTree(work);
      const limit = `${megabytes(half)}`;
      results.push([backend, `--max-size ${limit} --dry-run`, ...describe(dry, narOf)]);
      results.push([
        backend,
        `--max-size ${limit} (stored after: ${megabytes(sized[0].storedAfter)})`,
        ...describe(sized, narOf),
      ]);
      results.push([backend, `--max-size ${limit}, again`, ...describe(again, narOf)]);
      results.push([
        backend,
        `--max-age ${flags.maxAge} (stored after: ${megabytes(aged[0].storedAfter)})`,
        ...describe(aged, narOf),
      ]);
      if (!flags.keep) await removeTree(pristine);
    }

    out.push(`\n## GC: arca gc on a ${flags.paths}-path cache`);
    out.push(machine);
    out.push(`arca: ${await arcaRevision(MAIN_TS)}; load average at end: ${loadAverage()}`);
    out.push(
      `${flags.closures} projects of ${Math.ceil(flags.paths / flags.closures)} paths ` +
        `(binary trees + chain edges + references into project 0), last use spread over 60 ` +
        `days; generated in-process through Cache.importNar, ${flags.concurrency} at a time\n`,
    );
    out.push(formatTable(
      ["backend", "paths", "NAR", "stored (chunk files)", "chunks", "generation s"],
      generation,
    ));
    out.push(
      `\n\`arca --cache-dir <copy> --backend <b> gc … --json\`, wall clock including Deno ` +
        `start-up (\`arca --version\`: ${fixed(median(startup))} s); median of ${flags.runs} ` +
        `runs, each on a fresh copy of the generated cache ("again": a second run on the ` +
        `result); peak RSS and CPU by ${RSS_METHOD}; "live": chunk bytes the remaining paths ` +
        `reference\n`,
    );
    out.push(formatTable(
      [
        "backend",
        "gc",
        "seconds",
        "runs (s)",
        "evicted paths (NAR)",
        "freed",
        "chunks deleted",
        "paths left",
        "live",
        "peak RSS",
        "CPU s user + sys",
      ],
      results,
    ));
    console.log(out.join("\n"));
  } finally {
    if (flags.keep) log(`kept ${scratch}`);
    else await removeTree(scratch);
  }
}

if (import.meta.main) await main();
