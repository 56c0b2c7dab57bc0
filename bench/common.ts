/**
 * Shared helpers of the benchmark scripts (bench/import.ts, bench/serve.ts): scratch
 * directories under `.bench-tmp/`, the daemon-less Nix environment of DESIGN.md §5,
 * running and timing subprocesses (with peak RSS from `/usr/bin/time -v`, or by polling
 * `/proc/<pid>/status` VmHWM when that is missing), the deterministic 1 GiB mixed-content
 * store path of DESIGN.md §8, free ports, HTTP readiness, medians and Markdown tables;
 * long-running servers (nginx, also as a WebDAV upload target, and `arca serve`) with
 * their request times, peak RSS and CPU seconds from `/proc`, and summaries of V8 CPU
 * profiles (`deno run --cpu-prof`).
 *
 * Benchmarks are not tests: they print tables and never assert timings. Everything big
 * they make lives in a scratch directory that the caller removes at the end.
 * @module
 */

/** The repository root (the directory holding main.ts), without a trailing slash. */
export const REPO_ROOT: string = new URL("..", import.meta.url).pathname.replace(/\/$/, "");

/** The `arca` entry point. */
export const MAIN_TS = `${REPO_ROOT}/main.ts`;

/** Gitignored scratch root of the benchmarks. */
export const BENCH_TMP = `${REPO_ROOT}/.bench-tmp`;

/** Generator version of the mixed-content path; bump it when the content changes. */
const MIXED_VERSION = "v1";

/** A fresh scratch directory under `.bench-tmp/` (the caller removes it). */
export function makeScratchDir(prefix: string): string {
  Deno.mkdirSync(BENCH_TMP, { recursive: true });
  return Deno.makeTempDirSync({ dir: BENCH_TMP, prefix: `${prefix}-` });
}

/** Removes a file or directory tree if it exists (store copies are read-only: chmod first). */
export async function removeTree(path: string): Promise<void> {
  try {
    await Deno.remove(path, { recursive: true });
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return;
    // Nix makes store directories read-only; root can still remove them, others chmod.
    await new Deno.Command("chmod", { args: ["-R", "u+w", path], stderr: "null" }).output();
    await Deno.remove(path, { recursive: true });
  }
}

/**
 * The environment of DESIGN.md §5 (NIX_REMOTE=local, no substituters, no sandbox) with a
 * fresh XDG_CACHE_HOME under `scratch` (Nix caches narinfo lookups, 404s included) and an
 * XDG_CONFIG_HOME there too, so `arca` writes its first-run config into the scratch dir.
 */
export function benchEnv(scratch: string, extra: Record<string, string> = {}): Record<
  string,
  string
> {
  const cacheHome = Deno.makeTempDirSync({ dir: scratch, prefix: "xdg-cache-" });
  const configHome = `${scratch}/xdg-config`;
  Deno.mkdirSync(configHome, { recursive: true });
  return {
    PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin",
    HOME: Deno.env.get("HOME") ?? "/root",
    NIX_REMOTE: "local",
    XDG_CACHE_HOME: cacheHome,
    XDG_CONFIG_HOME: configHome,
    // Deno finds its module cache under XDG_CACHE_HOME unless told: keep the real one.
    DENO_DIR: denoDir(),
    NIX_CONFIG: [
      "experimental-features = nix-command",
      "build-users-group =",
      "sandbox = false",
      "substituters =",
    ].join("\n"),
    ...extra,
  };
}

let cachedDenoDir: string | undefined;

/** Deno's module cache directory (DENO_DIR, or what `deno info` reports). */
export function denoDir(): string {
  if (cachedDenoDir !== undefined) return cachedDenoDir;
  const fromEnv = Deno.env.get("DENO_DIR");
  if (fromEnv) return cachedDenoDir = fromEnv;
  const out = new Deno.Command(Deno.execPath(), { args: ["info", "--json"], stderr: "null" })
    .outputSync();
  cachedDenoDir = String(JSON.parse(new TextDecoder().decode(out.stdout)).denoDir);
  return cachedDenoDir;
}

/** How the peak RSS of a run was measured. */
export type RssMethod = "/usr/bin/time -v" | "/proc VmHWM polling";

/** The outcome of {@link run}. */
export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
  /** Wall-clock seconds from spawn to exit. */
  seconds: number;
  /** Peak resident set size in bytes, when asked for. */
  peakRss?: number;
  rssMethod?: RssMethod;
  /** User and system CPU seconds of the command (only under `/usr/bin/time -v`). */
  cpuSeconds?: { user: number; system: number };
}

/** Options of {@link run}. */
export interface RunOptions {
  env?: Record<string, string>;
  cwd?: string;
  /** Measure peak RSS (of the command itself, not of its children). */
  measureRss?: boolean;
  /** Throw when the exit code is not 0 (default true). */
  check?: boolean;
  /** Drop stdout instead of collecting it (for commands that print a lot). */
  discardStdout?: boolean;
}

const TIME_BIN = "/usr/bin/time";

function haveTimeBinary(): boolean {
  try {
    return Deno.statSync(TIME_BIN).isFile;
  } catch {
    return false;
  }
}

/** The peak-RSS method this machine allows. */
export const RSS_METHOD: RssMethod = haveTimeBinary() ? "/usr/bin/time -v" : "/proc VmHWM polling";

function readVmHwm(pid: number): number | undefined {
  try {
    const status = Deno.readTextFileSync(`/proc/${pid}/status`);
    const match = /^VmHWM:\s+(\d+)\s+kB/m.exec(status);
    return match ? Number(match[1]) * 1024 : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Runs a command to completion and times it. With `measureRss`, the command runs under
 * `/usr/bin/time -v` (its "Maximum resident set size"), or, without that binary, its
 * `/proc/<pid>/status` VmHWM is polled every 20 ms until it exits.
 */
export async function run(cmd: string, args: string[], options: RunOptions = {}): Promise<
  RunResult
> {
  const useTime = options.measureRss === true && RSS_METHOD === "/usr/bin/time -v";
  const timeFile = useTime ? Deno.makeTempFileSync({ prefix: "arca-bench-time-" }) : "";
  const [program, argv] = useTime ? [TIME_BIN, ["-v", "-o", timeFile, cmd, ...args]] : [cmd, args];
  const started = performance.now();
  const child = new Deno.Command(program, {
    args: argv,
    env: options.env,
    clearEnv: options.env !== undefined,
    cwd: options.cwd,
    stdin: "null",
    stdout: options.discardStdout ? "null" : "piped",
    stderr: "piped",
  }).spawn();
  let peakRss: number | undefined;
  let polling: ReturnType<typeof setInterval> | undefined;
  if (options.measureRss && !useTime) {
    polling = setInterval(() => {
      const hwm = readVmHwm(child.pid);
      if (hwm !== undefined) peakRss = Math.max(peakRss ?? 0, hwm);
    }, 20);
  }
  const out = await child.output();
  const seconds = (performance.now() - started) / 1000;
  if (polling !== undefined) clearInterval(polling);
  const decoder = new TextDecoder();
  const result: RunResult = {
    code: out.code,
    stdout: options.discardStdout ? "" : decoder.decode(out.stdout),
    stderr: decoder.decode(out.stderr),
    seconds,
  };
  if (useTime) {
    const report = Deno.readTextFileSync(timeFile);
    Deno.removeSync(timeFile);
    const match = /Maximum resident set size \(kbytes\): (\d+)/.exec(report);
    if (match) result.peakRss = Number(match[1]) * 1024;
    const user = /User time \(seconds\): ([\d.]+)/.exec(report);
    const system = /System time \(seconds\): ([\d.]+)/.exec(report);
    if (user && system) result.cpuSeconds = { user: Number(user[1]), system: Number(system[1]) };
    result.rssMethod = "/usr/bin/time -v";
  } else if (options.measureRss) {
    result.peakRss = peakRss;
    result.rssMethod = "/proc VmHWM polling";
  }
  if ((options.check ?? true) && out.code !== 0) {
    throw new Error(
      `${cmd} ${args.join(" ")} failed (exit ${out.code}): ${result.stderr.trim().slice(-2000)}`,
    );
  }
  return result;
}

/**
 * Arguments that run `arca` (`deno run -A main.ts`) with the given arguments; `main` names
 * another checkout's main.ts (its deno.json is found next to it); `denoFlags` go to
 * `deno run` (e.g. `--cpu-prof`).
 */
export function arcaArgs(
  args: string[],
  main: string = MAIN_TS,
  denoFlags: string[] = [],
): string[] {
  return ["run", "-A", ...denoFlags, main, ...args];
}

/** The main.ts a `--main` flag names (default this checkout's), made absolute and checked. */
export function resolveMain(flag: string): string {
  if (flag === "") return MAIN_TS;
  const path = flag.startsWith("/") ? flag : `${Deno.cwd()}/${flag}`;
  Deno.statSync(path);
  return path;
}

/** The median of some numbers (mean of the middle two for an even count). */
export function median(values: number[]): number {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

/** Megabytes (10^6 bytes) per second. */
export function mbPerSecond(bytes: number, seconds: number): number {
  return bytes / 1e6 / seconds;
}

/** A number with `digits` decimals. */
export function fixed(value: number, digits = 2): string {
  return Number.isFinite(value) ? value.toFixed(digits) : "n/a";
}

/** Bytes as MB (10^6) with one decimal. */
export function megabytes(bytes: number | undefined): string {
  return bytes === undefined ? "n/a" : `${(bytes / 1e6).toFixed(1)} MB`;
}

/** A Markdown table (columns padded for reading in a terminal). */
export function formatTable(headers: string[], rows: string[][]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (cells: string[]) =>
    `| ${cells.map((c, i) => (c ?? "").padEnd(widths[i])).join(" | ")} |`;
  return [
    line(headers),
    `|${widths.map((w) => "-".repeat(w + 2)).join("|")}|`,
    ...rows.map(line),
  ].join("\n");
}

/** Bytes used by a directory tree (`du -sb`). */
export async function diskUsage(path: string): Promise<number> {
  const result = await run("du", ["-sb", path]);
  return Number(result.stdout.split(/\s/)[0]);
}

/** A short description of this machine and the tool versions, for the report. */
export async function machineInfo(): Promise<string> {
  const cpuinfo = await Deno.readTextFile("/proc/cpuinfo");
  const model = /^model name\s*:\s*(.*)$/m.exec(cpuinfo)?.[1] ?? "unknown CPU";
  const cores = navigator.hardwareConcurrency;
  const memKiB = Number(/^MemTotal:\s+(\d+)/m.exec(await Deno.readTextFile("/proc/meminfo"))?.[1]);
  const load = loadAverage();
  const nix = (await run("nix", ["--version"], { check: false })).stdout.trim();
  return [
    `${model}, ${cores} cores, ${(memKiB / 1024 / 1024).toFixed(1)} GiB RAM`,
    `deno ${Deno.version.deno}, ${nix || "nix not found"}`,
    `load average at start: ${load}`,
  ].join("; ");
}

/** The 1-, 5- and 15-minute load averages, as /proc/loadavg prints them. */
export function loadAverage(): string {
  return Deno.readTextFileSync("/proc/loadavg").split(" ").slice(0, 3).join(" ");
}

/** Which arca is measured: this checkout's commit (`-dirty` when src/ has changes) or a path. */
export async function arcaRevision(main: string): Promise<string> {
  if (main !== MAIN_TS) return main;
  const head = await run("git", ["-C", REPO_ROOT, "rev-parse", "--short", "HEAD"], {
    check: false,
  });
  // A snapshot (`git archive`) is no checkout: name it by its path.
  if (head.code !== 0 || head.stdout.trim() === "") return `${REPO_ROOT} (not a git checkout)`;
  const dirty = await run(
    "git",
    ["-C", REPO_ROOT, "status", "--porcelain", "--", "src", "main.ts"],
    {
      check: false,
    },
  );
  return `commit ${head.stdout.trim()}${
    dirty.stdout.trim() ? " + uncommitted changes in src/" : ""
  }`;
}

/** A TCP port that was free a moment ago on 127.0.0.1. */
export function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

/**
 * Waits until `url` answers 200 (polling every 50 ms), or throws after `timeoutMs`; with
 * `anyStatus`, any HTTP answer will do (a server whose root is still empty).
 */
export async function waitForHttp(
  url: string,
  timeoutMs = 30_000,
  options: { anyStatus?: boolean } = {},
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const response = await fetch(url);
      await response.body?.cancel();
      if (response.ok || options.anyStatus) return;
    } catch {
      // Not listening yet.
    }
    if (Date.now() > deadline) throw new Error(`Server at ${url} did not come up`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** `nix path-info --json` of some paths (NAR size, references, ...), optionally in another store. */
export async function pathInfos(
  paths: string[],
  env: Record<string, string>,
  options: { recursive?: boolean; store?: string } = {},
): Promise<{ path: string; narSize: number; narHash: string; references: string[] }[]> {
  const args = [
    "path-info",
    "--json",
    ...(options.recursive ? ["--recursive"] : []),
    ...(options.store ? ["--store", options.store] : []),
    ...paths,
  ];
  return JSON.parse((await run("nix", args, { env })).stdout);
}

// ---------------------------------------------------------------------------------------
// The mixed-content path of DESIGN.md §8.

/** xorshift32: a small deterministic generator (seed must not be 0). */
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

/** Fills `out` with pseudo-random bytes from `seed`. */
function fillRandom(out: Uint8Array, seed: number): void {
  const next = xorshift32(seed);
  const words = new Uint32Array(out.buffer, out.byteOffset, out.length >>> 2);
  for (let i = 0; i < words.length; i++) words[i] = next();
  for (let i = words.length * 4; i < out.length; i++) out[i] = next() & 0xff;
}

const SYLLABLES = [
  "ar",
  "ca",
  "nix",
  "sto",
  "re",
  "pa",
  "th",
  "in",
  "de",
  "ri",
  "va",
  "tion",
  "el",
  "on",
  "ma",
  "ke",
  "li",
  "bu",
  "ild",
  "er",
  "sh",
  "al",
  "ge",
  "ne",
  "ra",
  "te",
  "co",
  "mp",
  "ress",
  "ed",
  "io",
  "us",
  "lo",
  "ad",
  "ha",
  "sh",
  "fi",
  "le",
  "op",
  "ti",
  "mo",
  "du",
];

/** Fills `out` with word-like text: Zipf-ish words from a fixed vocabulary, lines, punctuation. */
function fillText(out: Uint8Array, seed: number): void {
  const vocabRandom = xorshift32(0x5eed);
  const encoder = new TextEncoder();
  const vocabulary: Uint8Array[] = [];
  for (let i = 0; i < 4096; i++) {
    let word = "";
    const syllables = 1 + (vocabRandom() % 4);
    for (let s = 0; s < syllables; s++) word += SYLLABLES[vocabRandom() % SYLLABLES.length];
    vocabulary.push(encoder.encode(word));
  }
  const next = xorshift32(seed);
  let pos = 0;
  let wordsInLine = 0;
  while (pos < out.length) {
    const r = (next() % 65536) / 65536;
    const word = vocabulary[Math.floor(r * r * r * vocabulary.length)];
    for (let i = 0; i < word.length && pos < out.length; i++) out[pos++] = word[i];
    if (pos >= out.length) break;
    const mark = next() % 32;
    if (mark === 0 && pos < out.length) out[pos++] = 0x2e; // "."
    else if (mark === 1 && pos < out.length) out[pos++] = 0x2c; // ","
    if (pos >= out.length) break;
    if (++wordsInLine >= 8 + (next() % 8)) {
      out[pos++] = 0x0a;
      wordsInLine = 0;
    } else {
      out[pos++] = 0x20;
    }
  }
}

/** Fills `out` with one pseudo-random 64 KiB block, repeated. */
function fillRepeated(out: Uint8Array, seed: number): void {
  const block = new Uint8Array(64 * 1024);
  fillRandom(block, seed);
  for (let pos = 0; pos < out.length; pos += block.length) {
    out.set(block.subarray(0, Math.min(block.length, out.length - pos)), pos);
  }
}

/** The layout of the mixed-content path for a total size. */
export function mixedLayout(sizeMiB: number): { files: number; fileBytes: number } {
  const total = sizeMiB * 1024 * 1024;
  const files = Math.max(4, Math.round(sizeMiB / 8) - (Math.round(sizeMiB / 8) % 4));
  return { files, fileBytes: Math.floor(total / files) };
}

/** The store name of the mixed-content path of a size. */
export function mixedName(sizeMiB: number): string {
  return `arca-bench-mixed-${MIXED_VERSION}-${sizeMiB}MiB`;
}

/**
 * The mixed-content path of DESIGN.md §8 (for 1024 MiB: 128 files × 8 MiB; files 4k and
 * 4k+1 word-like text, 4k+2 random, 4k+3 a repeated 64 KiB block), generated
 * deterministically and added with `nix-store --add`. An existing valid path of the same
 * name is reused (the name carries the generator version).
 */
export async function ensureMixedPath(
  sizeMiB: number,
  options: { env: Record<string, string>; scratch: string; log?: (line: string) => void },
): Promise<{ storePath: string; narSize: number; reused: boolean }> {
  const name = mixedName(sizeMiB);
  for await (const entry of Deno.readDir("/nix/store")) {
    if (!entry.name.endsWith(`-${name}`)) continue;
    const storePath = `/nix/store/${entry.name}`;
    const check = await run("nix-store", ["--check-validity", storePath], {
      env: options.env,
      check: false,
    });
    if (check.code === 0) {
      const [info] = await pathInfos([storePath], options.env);
      return { storePath, narSize: info.narSize, reused: true };
    }
  }
  const { files, fileBytes } = mixedLayout(sizeMiB);
  const dir = `${options.scratch}/${name}`;
  await Deno.mkdir(dir, { recursive: true });
  options.log?.(`generating ${files} files × ${fileBytes} bytes in ${dir}`);
  const buffer = new Uint8Array(fileBytes);
  for (let i = 0; i < files; i++) {
    const kind = i % 4;
    if (kind < 2) fillText(buffer, 1 + i);
    else if (kind === 2) fillRandom(buffer, 1 + i);
    else fillRepeated(buffer, 1 + i);
    const suffix = kind < 2 ? "txt" : kind === 2 ? "rand" : "rep";
    await Deno.writeFile(`${dir}/f${String(i).padStart(3, "0")}.${suffix}`, buffer);
  }
  options.log?.(`nix-store --add ${dir}`);
  const storePath = (await run("nix-store", ["--add", dir], { env: options.env })).stdout.trim();
  await removeTree(dir);
  const [info] = await pathInfos([storePath], options.env);
  return { storePath, narSize: info.narSize, reused: false };
}

/** Reads a path's NAR once into /dev/null so later runs start with a warm page cache. */
export async function warmPageCache(storePath: string, env: Record<string, string>): Promise<void> {
  await run("nix-store", ["--dump", storePath], { env, discardStdout: true });
}

/** Parses `--name value` / `--name=value` / `--flag` arguments against defaults. */
export function parseFlags<T extends Record<string, string | number | boolean>>(
  args: string[],
  defaults: T,
): T {
  const out: Record<string, string | number | boolean> = { ...defaults };
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    if (!arg.startsWith("--")) throw new Error(`Unexpected argument: ${arg}`);
    const eq = arg.indexOf("=");
    const key = (eq === -1 ? arg.slice(2) : arg.slice(2, eq)).replace(
      /-([a-z])/g,
      (_, c: string) => c.toUpperCase(),
    );
    if (!(key in defaults)) throw new Error(`Unknown option: ${arg}`);
    const kind = typeof defaults[key];
    if (kind === "boolean") {
      out[key] = eq === -1 ? true : arg.slice(eq + 1) !== "false";
      continue;
    }
    const value = eq === -1 ? args[++i] : arg.slice(eq + 1);
    if (value === undefined) throw new Error(`Option ${arg} needs a value`);
    if (kind === "number") {
      const number = Number(value);
      if (!Number.isFinite(number) || number <= 0) throw new Error(`Invalid ${arg}: ${value}`);
      out[key] = number;
    } else {
      out[key] = value;
    }
  }
  return out as T;
}

// ---------------------------------------------------------------------------------------
// Long-running servers: nginx and `arca serve`, with their requests and resource use.

/** A request a benchmark server finished. */
export interface RequestRecord {
  method: string;
  /** The request path (with query). */
  path: string;
  status: number;
  /** When the server logged it, in ms since the epoch (nginx: at the end of the request). */
  endMs: number;
  /** How long the server took, when it says (nginx `$request_time`). */
  seconds?: number;
}

/** CPU seconds and peak RSS of a process (with its descendants), read from `/proc`. */
export interface ProcessStats {
  /** Largest VmHWM of the processes (peak resident set size, bytes). */
  peakRss: number;
  /** Sum of VmHWM over the processes (bytes): an upper bound of their peak together. */
  peakRssSum: number;
  /** User CPU seconds of all threads of the processes. */
  cpuUser: number;
  /** System CPU seconds. */
  cpuSystem: number;
  /** How many processes were counted. */
  processes: number;
}

/** A server started by a benchmark. */
export interface BenchServer {
  /** "nginx", "arca", … */
  name: string;
  /** `http://127.0.0.1:<port>`. */
  base: string;
  /** The process id (nginx: the master). */
  pid: number;
  /** The requests the server has finished so far, in order. */
  requests(): Promise<RequestRecord[]>;
  /** CPU and memory of the server so far (nginx: master and workers). */
  stats(): ProcessStats;
  /** Stops it (SIGTERM) and waits for it to exit. */
  stop(): Promise<void>;
}

let clockTicks: number | undefined;

function ticksPerSecond(): number {
  if (clockTicks !== undefined) return clockTicks;
  const out = new Deno.Command("getconf", { args: ["CLK_TCK"], stderr: "null" }).outputSync();
  const value = Number(new TextDecoder().decode(out.stdout).trim());
  return clockTicks = Number.isFinite(value) && value > 0 ? value : 100;
}

function childPids(pid: number): number[] {
  const out: number[] = [];
  try {
    for (const task of Deno.readDirSync(`/proc/${pid}/task`)) {
      const text = Deno.readTextFileSync(`/proc/${pid}/task/${task.name}/children`).trim();
      if (text) out.push(...text.split(/\s+/).map(Number));
    }
  } catch {
    // Gone.
  }
  return out;
}

/**
 * CPU seconds (utime, stime of every thread) and peak RSS (VmHWM) of a process and its
 * descendants, as `/proc` shows them now: read it before the process exits.
 */
export function processStats(pid: number): ProcessStats {
  const stats: ProcessStats = { peakRss: 0, peakRssSum: 0, cpuUser: 0, cpuSystem: 0, processes: 0 };
  const pending = [pid];
  while (pending.length > 0) {
    const current = pending.pop()!;
    try {
      const stat = Deno.readTextFileSync(`/proc/${current}/stat`);
      // Fields after "pid (comm) ": state is field 3, utime 14, stime 15.
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      stats.cpuUser += Number(fields[11]) / ticksPerSecond();
      stats.cpuSystem += Number(fields[12]) / ticksPerSecond();
      const hwm = readVmHwm(current) ?? 0;
      stats.peakRss = Math.max(stats.peakRss, hwm);
      stats.peakRssSum += hwm;
      stats.processes++;
    } catch {
      continue; // gone meanwhile
    }
    pending.push(...childPids(current));
  }
  return stats;
}

/** Options of {@link startNginx}. */
export interface NginxOptions {
  /** Accept WebDAV writes (`dav_methods PUT DELETE MKCOL`, `create_full_put_path`, no body limit). */
  dav?: boolean;
  /** Log requests (default true; {@link BenchServer.requests} is empty without). */
  accessLog?: boolean;
  /** Progress lines. */
  log?: (line: string) => void;
}

/**
 * Starts `/usr/sbin/nginx` in the foreground (`-p <scratch>/nginx-<random>`, a generated
 * config, `daemon off`) on 127.0.0.1 and a free port, serving `root`: `sendfile`,
 * `worker_processes auto`, Nix's content types. Every request is logged with `$msec` and
 * `$request_time` so {@link BenchServer.requests} can say when each ended. With `dav`,
 * the WebDAV module (built into Debian's nginx: `nginx -V` lists `--with-http_dav_module`)
 * takes PUTs into `root`, creating directories, with no body size limit; request bodies
 * are buffered in a temporary directory on the same filesystem and renamed into place.
 */
export async function startNginx(
  root: string,
  scratch: string,
  options: NginxOptions = {},
): Promise<BenchServer> {
  const port = freePort();
  const prefix = Deno.makeTempDirSync({ dir: scratch, prefix: "nginx-" });
  await Deno.mkdir(`${prefix}/tmp`, { recursive: true });
  const conf = `${prefix}/nginx.conf`;
  const accessLog = `${prefix}/access.log`;
  const temps = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
    .map((t) => `  ${t}_temp_path ${prefix}/tmp/${t};`).join("\n");
  const dav = options.dav
    ? `    dav_methods PUT DELETE MKCOL;
    create_full_put_path on;
    dav_access user:rw group:r all:r;
    client_max_body_size 0;
`
    : "";
  await Deno.writeTextFile(
    conf,
    `${Deno.uid() === 0 ? "user root;\n" : ""}worker_processes auto;
error_log ${prefix}/error.log warn;
pid ${prefix}/nginx.pid;
events { worker_connections 1024; }
http {
  log_format timed '$msec $request_time $status "$request"';
  access_log ${options.accessLog === false ? "off" : `${accessLog} timed`};
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
${temps}
  types {
    text/x-nix-narinfo narinfo;
    text/x-nix-cache-info nix-cache-info;
    application/x-nix-nar nar zst xz;
  }
  default_type application/octet-stream;
  server {
    listen 127.0.0.1:${port};
    root ${root};
${dav}  }
}
`,
  );
  // As root, workers would drop to "nobody": the config keeps them as the current user.
  const child = new Deno.Command("/usr/sbin/nginx", {
    args: ["-p", prefix, "-c", conf, "-g", "daemon off;"],
    stdin: "null",
    stdout: "null",
    stderr: "inherit",
  }).spawn();
  const base = `http://127.0.0.1:${port}`;
  try {
    await waitForHttp(`${base}/nix-cache-info`, 30_000, { anyStatus: true });
  } catch (error) {
    child.kill("SIGTERM");
    await child.status;
    throw error;
  }
  // Forget the readiness probes.
  if (options.accessLog !== false) await Deno.writeTextFile(accessLog, "");
  options.log?.(
    `nginx${options.dav ? " (WebDAV)" : ""} (pid ${child.pid}) on ${base}, root ${root}`,
  );
  let stopped = false;
  return {
    name: "nginx",
    base,
    pid: child.pid,
    async requests() {
      const text = await Deno.readTextFile(accessLog).catch(() => "");
      const out: RequestRecord[] = [];
      for (const line of text.split("\n")) {
        const match = /^([\d.]+) ([\d.]+) (\d{3}) "(\S+) (\S+)[^"]*"$/.exec(line);
        if (!match) continue;
        out.push({
          method: match[4],
          path: match[5],
          status: Number(match[3]),
          endMs: Number(match[1]) * 1000,
          seconds: Number(match[2]),
        });
      }
      return out;
    },
    stats: () => processStats(child.pid),
    async stop() {
      if (stopped) return;
      stopped = true;
      child.kill("SIGTERM");
      await child.status;
    },
  };
}

/** Options of {@link startArcaServe}. */
export interface ArcaServeOptions {
  /** Environment (e.g. {@link benchEnv}); the process gets only this. */
  env: Record<string, string>;
  /** main.ts to run (default this checkout's). */
  main?: string;
  /** Metadata backend (default kv). */
  backend?: string;
  /** More `serve` arguments (e.g. `--upload-token-file <f>`). */
  serveArgs?: string[];
  /** Flags for `deno run` (e.g. `--cpu-prof`, `--cpu-prof-dir=<dir>`). */
  denoFlags?: string[];
  /** Progress lines, and whatever arca prints that is not a request line. */
  log?: (line: string) => void;
}

/**
 * Starts `arca --cache-dir <cacheDir> serve --bind 127.0.0.1:<free port> --verbose` and
 * waits until it answers. `--verbose` makes arca log each finished request as
 * `METHOD path status` on stderr; each line is timed as it arrives, for
 * {@link BenchServer.requests}. Stopping sends SIGTERM, on which arca shuts down cleanly
 * (so `--cpu-prof` profiles get written).
 */
export async function startArcaServe(
  cacheDir: string,
  options: ArcaServeOptions,
): Promise<BenchServer> {
  const port = freePort();
  const child = new Deno.Command(Deno.execPath(), {
    args: arcaArgs(
      [
        "--cache-dir",
        cacheDir,
        "--backend",
        options.backend ?? "kv",
        "--verbose",
        "serve",
        "--bind",
        `127.0.0.1:${port}`,
        ...(options.serveArgs ?? []),
      ],
      options.main ?? MAIN_TS,
      options.denoFlags ?? [],
    ),
    env: options.env,
    clearEnv: true,
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const records: RequestRecord[] = [];
  const reading = (async () => {
    let rest = "";
    const decoder = new TextDecoder();
    for await (const piece of child.stderr) {
      const now = Date.now();
      rest += decoder.decode(piece, { stream: true });
      const lines = rest.split("\n");
      rest = lines.pop()!;
      for (const line of lines) {
        const match = /^([A-Z]+) (\S+) (\d{3})$/.exec(line);
        if (match) {
          records.push({ method: match[1], path: match[2], status: Number(match[3]), endMs: now });
        } else if (line.trim()) {
          options.log?.(`arca: ${line}`);
        }
      }
    }
  })();
  const base = `http://127.0.0.1:${port}`;
  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    try {
      child.kill("SIGTERM");
    } catch {
      // Exited already.
    }
    await child.status;
    await reading;
  };
  try {
    await waitForHttp(`${base}/nix-cache-info`);
  } catch (error) {
    await stop();
    throw error;
  }
  records.length = 0; // the readiness probes
  options.log?.(`arca serve (pid ${child.pid}) on ${base}, cache ${cacheDir}`);
  return {
    name: "arca",
    base,
    pid: child.pid,
    requests: () => Promise.resolve([...records]),
    stats: () => processStats(child.pid),
    stop,
  };
}

// ---------------------------------------------------------------------------------------
// V8 CPU profiles (`deno run --cpu-prof --cpu-prof-dir=<dir>`: one file per isolate).

/** Self time of one function (or file) in a CPU profile. */
export interface ProfileEntry {
  /** `function file:line`, `(idle)`, `(garbage collector)`, `(program)`; or a file. */
  name: string;
  seconds: number;
  /** Fraction of the profile's duration. */
  share: number;
}

/** A summary of one `.cpuprofile` file (or of a time window of it). */
export interface ProfileSummary {
  file: string;
  /** Wall-clock seconds summarized (the profile's span, or the window's part of it). */
  seconds: number;
  /** Seconds not idle. */
  busySeconds: number;
  /** Functions by self time, largest first. */
  functions: ProfileEntry[];
  /** Source files by self time, largest first (V8 and runtime entries by their name). */
  files: ProfileEntry[];
}

/** Options of {@link summarizeCpuProfile}. */
export interface CpuProfileOptions {
  /** How many functions and files to list (default 15). */
  top?: number;
  /**
   * Only the samples taken in this window, in ms on the profile's clock (V8 TimeTicks, µs,
   * divided by 1000) plus `clockOffsetMs`: give epoch times and the offset that maps the
   * profile's clock to the epoch (see {@link cpuProfileSpan}).
   */
  window?: { fromMs: number; toMs: number };
  /** Added to the profile's clock (ms) to compare it with `window`. */
  clockOffsetMs?: number;
}

interface CpuProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
}

interface CpuProfile {
  nodes: CpuProfileNode[];
  samples: number[];
  timeDeltas: number[];
  startTime: number;
  endTime: number;
}

function shortUrl(url: string): string {
  if (url === "") return "";
  const path = url.replace(/^file:\/\//, "");
  if (path.startsWith(`${REPO_ROOT}/`)) return path.slice(REPO_ROOT.length + 1);
  const parts = path.split("/");
  return parts.slice(-2).join("/");
}

/**
 * Start and end of a `.cpuprofile`, in ms on the profile's clock. All isolates of one
 * process share that clock (monotonic), so the offset that maps one profile to the epoch
 * (e.g. the main isolate's end ≈ when the process was told to stop) maps them all.
 */
export function cpuProfileSpan(file: string): { startMs: number; endMs: number } {
  const profile = JSON.parse(Deno.readTextFileSync(file)) as CpuProfile;
  return { startMs: profile.startTime / 1000, endMs: profile.endTime / 1000 };
}

/**
 * Self time by function and by file of a V8 `.cpuprofile` (as `deno --cpu-prof` writes),
 * optionally of a time window only. A sample is charged the interval until the next one.
 */
export function summarizeCpuProfile(file: string, options: CpuProfileOptions = {}): ProfileSummary {
  const profile = JSON.parse(Deno.readTextFileSync(file)) as CpuProfile;
  const byId = new Map(profile.nodes.map((node) => [node.id, node]));
  const byFunction = new Map<string, number>();
  const byFile = new Map<string, number>();
  const offsetMicros = (options.clockOffsetMs ?? 0) * 1000;
  const from = options.window ? options.window.fromMs * 1000 - offsetMicros : -Infinity;
  const to = options.window ? options.window.toMs * 1000 - offsetMicros : Infinity;
  let idle = 0;
  let time = profile.startTime;
  profile.samples.forEach((id, i) => {
    time += profile.timeDeltas[i] ?? 0;
    const until = i + 1 < profile.samples.length
      ? time + (profile.timeDeltas[i + 1] ?? 0)
      : profile.endTime;
    // The part of [time, until) inside the window.
    const micros = Math.max(0, Math.min(until, to) - Math.max(time, from));
    if (micros === 0) return;
    const frame = byId.get(id)?.callFrame;
    const name = frame?.functionName || "(anonymous)";
    const url = shortUrl(frame?.url ?? "");
    // A Worker started under --cpu-prof waits here until the profiler attaches: idle too.
    if (name === "(idle)" || name === "op_worker_maybe_wait_for_debugger") idle += micros;
    const fn = url ? `${name} ${url}:${(frame?.lineNumber ?? 0) + 1}` : name;
    byFunction.set(fn, (byFunction.get(fn) ?? 0) + micros);
    const key = url || name;
    byFile.set(key, (byFile.get(key) ?? 0) + micros);
  });
  const span = Math.max(0, Math.min(profile.endTime, to) - Math.max(profile.startTime, from));
  const total = span / 1e6;
  const entries = (map: Map<string, number>) =>
    [...map].map(([name, micros]) => ({
      name,
      seconds: micros / 1e6,
      share: total > 0 ? micros / 1e6 / total : 0,
    })).sort((a, b) => b.seconds - a.seconds).slice(0, options.top ?? 15);
  return {
    file,
    seconds: total,
    busySeconds: total - idle / 1e6,
    functions: entries(byFunction),
    files: entries(byFile),
  };
}
