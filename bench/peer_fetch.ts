/**
 * Peer fetch benchmark (the peer fetch issue's "Speed"): `nix copy --from` a node B that
 * fetches the path from its swarm peers (src/net/peer_fetch.ts, chunk by chunk over the
 * Noise channels) against `nix copy --from` the peer A that holds it, in the same run, on
 * 127.0.0.1 (static peers, an ad-hoc topic, one signing key; the set-up of
 * tests/e2e/peer_fetch_test.ts).
 *
 * Nodes, all `arca swarm` processes: A (`--also-serve`, holds the 1 GiB mixed path of
 * DESIGN.md §8 and the two versions below) and C (holds the mixed path) run for the whole
 * benchmark; B (`--also-serve`, static peers A, or A and C) is started on a fresh cache for
 * each copy and stopped after it. Every `nix copy` goes into a fresh store with a fresh
 * XDG_CACHE_HOME and checks the copy's narHash against the source (signatures checked by
 * Nix with the team's public key).
 *
 * Measurements, per round (`--runs`, default 3; the first three rotated each round so the
 * load of other processes hits them alike), after one unmeasured warm-up copy from A:
 * 1. direct: `nix copy --from http://<A>` of the mixed path (A serves it from its own cache);
 * 2. via B from A: B has synced A's records and connected; `nix copy --from http://<B>`
 *    while B fetches every chunk from A;
 * 3. via B from A and C: the same with two holders; B's `arca status --json`
 *    `peerFetch.bytesByPeer` gives each peer's share;
 * 4. version 2: a `--delta-size-mib` (default 1024) path of random bytes in 128 MiB files
 *    (version 1), and version 2 with every tenth MiB replaced (deterministic xorshift32
 *    content); B's fresh cache imports version 1, then `nix copy --from http://<B>` of
 *    version 2 makes B fetch from A what it lacks: B's `peerFetch.bytesFetched` (chunk
 *    files as sent) and the TCP bytes A sent meanwhile (`ss -tinp` tcp_info `bytes_sent` of
 *    its sockets: the encrypted stream, framing and sync included) as shares of version 2's
 *    NAR size.
 * CPU seconds of each process (Nix by `/usr/bin/time -v`, the arca nodes as deltas of
 * `/proc/<pid>/stat` utime + stime over the copy) say where the time went. With
 * `--profile`, one more (unmeasured) copy via B from A runs B under `deno --cpu-prof` and
 * prints its busiest functions and files (`--profile-only`: that copy alone, no rounds, and
 * A profiled too).
 *
 * Usage: `deno run -A bench/peer_fetch.ts [--runs 3] [--size-mib 1024]
 * [--delta-size-mib 1024] [--only direct,viaA,viaAC,delta] [--profile] [--profile-only]
 * [--keep] [--main <main.ts>]` (`--only` runs some of the four copies, e.g. `direct,viaA`)
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
  processStats,
  removeTree,
  resolveMain,
  run,
  summarizeCpuProfile,
  waitForHttp,
} from "./common.ts";

/** Generator version of the two-version path; bump it when the content changes. */
const VERSIONS_GENERATION = "g1";
/** Version 2 replaces MiB number i of version 1 where i % REPLACE_EVERY === REPLACE_AT. */
const REPLACE_EVERY = 10;
const REPLACE_AT = 5;
const MIB = 1024 * 1024;

function log(line: string): void {
  console.error(`[peer-fetch] ${line}`);
}

// ---------------------------------------------------------------------------------------
// The two versions of a random-content path.

/** Fills `out` with xorshift32 words from `seed` (not 0). */
function fillRandom(out: Uint8Array, seed: number): void {
  let state = seed >>> 0 || 0x9e3779b9;
  const words = new Uint32Array(out.buffer, out.byteOffset, out.length >>> 2);
  for (let i = 0; i < words.length; i++) {
    state ^= state << 13;
    state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5;
    state >>>= 0;
    words[i] = state;
  }
}

/** Store name of one version. */
function versionName(sizeMiB: number, version: 1 | 2): string {
  return `arca-bench-versions-${VERSIONS_GENERATION}-${sizeMiB}MiB-v${version}`;
}

/** An existing valid store path of this name, if any. */
async function findValidPath(name: string, env: Record<string, string>): Promise<string | null> {
  for await (const entry of Deno.readDir("/nix/store")) {
    if (!entry.name.endsWith(`-${name}`)) continue;
    const storePath = `/nix/store/${entry.name}`;
    const check = await run("nix-store", ["--check-validity", storePath], { env, check: false });
    if (check.code === 0) return storePath;
  }
  return null;
}

/**
 * Version 1 and 2 of a random-content path of `sizeMiB` MiB in files of at most 128 MiB:
 * MiB i (counted over all files) is xorshift32 from seed 1 + i; version 2 replaces every
 * tenth (i % 10 = 5) with seed 1,000,001 + i. Added with `nix-store --add`, reused when
 * present.
 */
async function ensureVersions(
  sizeMiB: number,
  env: Record<string, string>,
  scratch: string,
): Promise<{ v1: string; v2: string; narSize: number; replacedMiB: number }> {
  const paths: string[] = [];
  const filesMiB = Math.min(128, sizeMiB);
  let replacedMiB = 0;
  for (const version of [1, 2] as const) {
    const name = versionName(sizeMiB, version);
    const existing = await findValidPath(name, env);
    if (existing !== null) {
      paths.push(existing);
      continue;
    }
    const dir = `${scratch}/${name}`;
    await Deno.mkdir(dir, { recursive: true });
    log(`generating ${name} (${sizeMiB} MiB in files of ${filesMiB} MiB)`);
    const buffer = new Uint8Array(filesMiB * MIB);
    for (let start = 0, file = 0; start < sizeMiB; start += filesMiB, file++) {
      const count = Math.min(filesMiB, sizeMiB - start);
      for (let m = 0; m < count; m++) {
        const index = start + m;
        const replaced = version === 2 && index % REPLACE_EVERY === REPLACE_AT;
        fillRandom(buffer.subarray(m * MIB, (m + 1) * MIB), (replaced ? 1_000_001 : 1) + index);
      }
      await Deno.writeFile(
        `${dir}/part${String(file).padStart(3, "0")}.bin`,
        buffer.subarray(0, count * MIB),
      );
    }
    await Deno.writeTextFile(`${dir}/README`, `${name}\n`);
    paths.push((await run("nix-store", ["--add", dir], { env })).stdout.trim());
    await removeTree(dir);
  }
  for (let i = 0; i < sizeMiB; i++) if (i % REPLACE_EVERY === REPLACE_AT) replacedMiB++;
  const [info] = await pathInfos([paths[1]], env);
  return { v1: paths[0], v2: paths[1], narSize: info.narSize, replacedMiB };
}

// ---------------------------------------------------------------------------------------
// The team: swarm nodes on 127.0.0.1.

/** A UDP port on 127.0.0.1 that was free a moment ago. */
function freeUdpPort(): number {
  const conn = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  const port = (conn.addr as Deno.NetAddr).port;
  conn.close();
  return port;
}

/** A running `arca swarm`. */
interface SwarmNode {
  name: string;
  cacheDir: string;
  pid: number;
  /** First 16 hex digits of its node id (its "Swarm node" line). */
  nodeId: string;
  discoveryPort: number;
  /** `http://127.0.0.1:<port>` with `--also-serve`. */
  base?: string;
  /** The last lines it wrote on stderr. */
  stderrTail(): string;
  stop(): Promise<void>;
}

/** What the team shares: topic, signing key, environment. */
interface Team {
  scratch: string;
  env: Record<string, string>;
  main: string;
  topic: string;
  publicKey: string;
  secretKeyFile: string;
}

function hashOf(storePath: string): string {
  return storePath.slice("/nix/store/".length, "/nix/store/".length + 32);
}

/** Starts `arca swarm` on `cacheDir`, dialing `peers`; with `serve`, it also serves HTTP. */
async function startNode(
  team: Team,
  name: string,
  cacheDir: string,
  options: { peers?: SwarmNode[]; serve?: boolean; denoFlags?: string[] } = {},
): Promise<SwarmNode> {
  const discoveryPort = freeUdpPort();
  const httpPort = options.serve ? freePort() : undefined;
  const args = [
    "--cache-dir",
    cacheDir,
    "swarm",
    "--topic",
    team.topic,
    "--bind-address",
    "127.0.0.1",
    "--discovery-port",
    String(discoveryPort),
    "--sync-port",
    String(freePort()),
    "--no-multicast",
    "--announce-interval",
    "1",
    "--reconcile-interval",
    "2",
    "--trusted-public-key",
    team.publicKey,
  ];
  for (const peer of options.peers ?? []) {
    args.push("--static-peer", `127.0.0.1:${peer.discoveryPort}`);
  }
  if (httpPort !== undefined) args.push("--also-serve", "--http-port", String(httpPort));
  const child = new Deno.Command(Deno.execPath(), {
    args: arcaArgs(args, team.main, options.denoFlags ?? []),
    env: team.env,
    clearEnv: true,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const tail: string[] = [];
  const draining = child.stderr.pipeThrough(new TextDecoderStream()).pipeTo(
    new WritableStream({
      write(text) {
        tail.push(text);
        if (tail.length > 200) tail.splice(0, tail.length - 200);
      },
    }),
  ).catch(() => {});
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let seen = "";
  let match: RegExpExecArray | null = null;
  const deadline = setTimeout(() => child.kill("SIGKILL"), 60_000);
  try {
    while ((match = /Swarm node ([0-9a-f]{16})/.exec(seen)) === null) {
      const { value, done } = await reader.read();
      if (done) {
        await child.status;
        await draining;
        throw new Error(`arca swarm (${name}) exited before it was ready: ${tail.join("")}`);
      }
      seen += value;
    }
  } finally {
    clearTimeout(deadline);
  }
  (async () => {
    while (!(await reader.read()).done);
  })().catch(() => {});
  const base = httpPort === undefined ? undefined : `http://127.0.0.1:${httpPort}`;
  if (base !== undefined) await waitForHttp(`${base}/nix-cache-info`);
  let stopped: Promise<void> | undefined;
  return {
    name,
    cacheDir,
    pid: child.pid,
    nodeId: match[1],
    discoveryPort,
    base,
    stderrTail: () => tail.join("").slice(-4000),
    stop() {
      stopped ??= (async () => {
        try {
          child.kill("SIGTERM");
        } catch { /* gone */ }
        const timer = setTimeout(() => {
          try {
            child.kill("SIGKILL");
          } catch { /* gone */ }
        }, 20_000);
        await child.status;
        clearTimeout(timer);
        await draining;
      })();
      return stopped;
    },
  };
}

/** Polls `check` every 100 ms until it returns a value other than undefined. */
async function waitFor<T>(
  what: string,
  timeoutMs: number,
  check: () => Promise<T | undefined>,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`Timed out after ${timeoutMs} ms: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** `arca status --json` of a cache. */
async function arcaStatus(team: Team, cacheDir: string): Promise<ArcaStatus> {
  const out = await run(
    Deno.execPath(),
    arcaArgs(["--cache-dir", cacheDir, "status", "--json"], team.main),
    { env: team.env },
  );
  return JSON.parse(out.stdout);
}

/** The parts of `arca status --json` used here. */
interface ArcaStatus {
  peers: { id: string; connected: boolean; bytesReceived: number; chunksReceived: number }[];
  peerFetch: {
    narsFetched: number;
    narsFailed: number;
    chunksFetched: number;
    bytesFetched: number;
    chunksReused: number;
    bytesByPeer: Record<string, number>;
  } | null;
}

/** Reads `swarm-status.json` (rewritten every 2 s by the node), or null. */
async function swarmStatusFile(cacheDir: string): Promise<
  { segments: { peers: { connected: boolean }[] }[] } | null
> {
  try {
    return JSON.parse(await Deno.readTextFile(`${cacheDir}/swarm-status.json`));
  } catch {
    return null;
  }
}

/** Waits until node B holds the record of `storePath` and is connected to `peers` peers. */
async function waitUntilReady(node: SwarmNode, storePath: string, peers: number): Promise<void> {
  await waitFor(`${node.name} holds the record of ${storePath}`, 60_000, async () => {
    try {
      await Deno.stat(`${node.cacheDir}/remote/adhoc/${hashOf(storePath)}.json`);
      return true;
    } catch {
      return undefined;
    }
  });
  await waitFor(`${node.name} connected to ${peers} peer(s)`, 60_000, async () => {
    const status = await swarmStatusFile(node.cacheDir);
    const connected = status?.segments.flatMap((s) => s.peers).filter((p) => p.connected).length ??
      0;
    return connected >= peers ? true : undefined;
  });
}

/**
 * TCP payload bytes each established socket of a process has sent so far (`ss -tinp`
 * tcp_info `bytes_sent`), by local and peer address.
 */
async function socketBytesSent(pid: number): Promise<Map<string, number>> {
  const out = await run("ss", ["-tinpH", "state", "established"]);
  const sent = new Map<string, number>();
  const lines = out.stdout.split("\n");
  for (let i = 0; i + 1 < lines.length; i++) {
    const head = /^\s*\d+\s+\d+\s+(\S+)\s+(\S+)\s+users:.*pid=(\d+),/.exec(lines[i]);
    if (head === null || Number(head[3]) !== pid) continue;
    const bytes = /bytes_sent:(\d+)/.exec(lines[i + 1]);
    sent.set(`${head[1]} ${head[2]}`, bytes ? Number(bytes[1]) : 0);
  }
  return sent;
}

/** Bytes sent between two snapshots of {@link socketBytesSent} (new sockets from 0). */
function sentSince(before: Map<string, number>, after: Map<string, number>): number {
  let total = 0;
  for (const [key, bytes] of after) total += bytes - (before.get(key) ?? 0);
  return total;
}

/** CPU seconds (user + system) of a process so far. */
function cpuSeconds(pid: number): number {
  const stats = processStats(pid);
  return stats.cpuUser + stats.cpuSystem;
}

// ---------------------------------------------------------------------------------------
// One copy.

/** The outcome of one measured `nix copy`. */
interface CopySample {
  seconds: number;
  /** CPU seconds (user + system) of Nix, and of each arca node over the copy. */
  nixCpu: number;
  cpu: Record<string, number>;
  /** TCP bytes each node sent over the copy (its established sockets, `ss`). */
  sent: Record<string, number>;
  /** B's peer fetch counters after the copy (via B only). */
  fetch?: NonNullable<ArcaStatus["peerFetch"]>;
}

/**
 * `nix copy --from <server> --to <fresh store>` of `storePath`, timed; checks the copy's
 * narHash; measures the CPU and writes of `nodes` over it.
 */
async function copyOnce(
  team: Team,
  server: string,
  storePath: string,
  nodes: SwarmNode[],
): Promise<CopySample> {
  const store = Deno.makeTempDirSync({ dir: team.scratch, prefix: "store-" });
  const copyEnv = benchEnv(team.scratch);
  try {
    const cpu0 = nodes.map((node) => cpuSeconds(node.pid));
    const sent0 = await Promise.all(nodes.map((node) => socketBytesSent(node.pid)));
    const result = await run("nix", [
      "copy",
      "--from",
      server,
      "--to",
      store,
      "--option",
      "trusted-public-keys",
      team.publicKey,
      storePath,
    ], { env: copyEnv, measureRss: true });
    const cpu: Record<string, number> = {};
    const sent: Record<string, number> = {};
    for (const [i, node] of nodes.entries()) {
      cpu[node.name] = cpuSeconds(node.pid) - cpu0[i];
      sent[node.name] = sentSince(sent0[i], await socketBytesSent(node.pid));
    }
    const [copied] = await pathInfos([storePath], copyEnv, { store });
    const [original] = await pathInfos([storePath], team.env);
    if (copied.narHash !== original.narHash) throw new Error(`Copy of ${storePath} differs`);
    return {
      seconds: result.seconds,
      nixCpu: (result.cpuSeconds?.user ?? NaN) + (result.cpuSeconds?.system ?? NaN),
      cpu,
      sent,
    };
  } finally {
    await removeTree(store);
    await removeTree(copyEnv.XDG_CACHE_HOME);
  }
}

/**
 * Starts B on a fresh cache (after `prepare`, e.g. an import), dialing `peers`; waits for
 * the record of `storePath` and the connections; copies through B; returns the sample
 * with B's peer fetch counters, and stops B.
 */
async function copyViaB(
  team: Team,
  storePath: string,
  peers: SwarmNode[],
  options: { prepare?: (cacheDir: string) => Promise<void>; denoFlags?: string[] } = {},
): Promise<CopySample> {
  const cacheDir = Deno.makeTempDirSync({ dir: team.scratch, prefix: "b-" });
  await options.prepare?.(cacheDir);
  const b = await startNode(team, "B", cacheDir, {
    peers,
    serve: true,
    denoFlags: options.denoFlags,
  });
  try {
    await waitUntilReady(b, storePath, peers.length);
    const sample = await copyOnce(team, b.base!, storePath, [b, ...peers]);
    const status = await waitFor("B's status shows the fetch", 30_000, async () => {
      const s = await arcaStatus(team, cacheDir);
      return s.peerFetch && s.peerFetch.narsFetched + s.peerFetch.narsFailed >= 1 ? s : undefined;
    });
    if (status.peerFetch!.narsFetched !== 1) {
      throw new Error(`B's fetch failed: ${b.stderrTail()}`);
    }
    sample.fetch = status.peerFetch!;
    return sample;
  } catch (error) {
    log(`B's log: ${b.stderrTail()}`);
    throw error;
  } finally {
    await b.stop();
    await removeTree(cacheDir);
  }
}

// ---------------------------------------------------------------------------------------

/** Bytes a peer sent, by its short node id, from `bytesByPeer`. */
function bytesFrom(fetch: CopySample["fetch"], node: SwarmNode): number {
  let bytes = 0;
  for (const [id, value] of Object.entries(fetch?.bytesByPeer ?? {})) {
    if (id.startsWith(node.nodeId)) bytes += value;
  }
  return bytes;
}

/** The busiest functions and files of each `.cpuprofile` in `dir`, as tables. */
function summarizeProfiles(dir: string, label: string): string {
  const lines: string[] = [];
  for (const entry of Deno.readDirSync(dir)) {
    if (!entry.name.endsWith(".cpuprofile")) continue;
    const summary = summarizeCpuProfile(`${dir}/${entry.name}`, { top: 30 });
    lines.push(
      `\n${label}, ${entry.name}: ${fixed(summary.seconds)} s, busy ${
        fixed(summary.busySeconds)
      } s\n`,
    );
    lines.push(formatTable(
      ["function", "self s", "share"],
      summary.functions.map((f) => [f.name, fixed(f.seconds), percent(f.share, 1)]),
    ));
    lines.push("");
    lines.push(formatTable(
      ["file", "self s", "share"],
      summary.files.map((f) => [f.name, fixed(f.seconds), percent(f.share, 1)]),
    ));
  }
  return lines.join("\n");
}

function percent(part: number, whole: number): string {
  return `${fixed((100 * part) / whole, 1)} %`;
}

async function main(): Promise<void> {
  const flags = parseFlags(Deno.args, {
    runs: 3,
    sizeMib: 1024,
    deltaSizeMib: 1024,
    profile: false,
    profileOnly: false,
    only: "direct,viaA,viaAC,delta",
    keep: false,
    main: "",
  });
  const arcaMain = resolveMain(flags.main);
  const only = new Set(flags.only.split(",").map((kind) => kind.trim()));
  for (const kind of only) {
    if (!["direct", "viaA", "viaAC", "delta"].includes(kind)) {
      throw new Error(`Invalid --only ${flags.only}: expected some of direct,viaA,viaAC,delta`);
    }
  }
  const machine = await machineInfo();
  const scratch = makeScratchDir("peer-fetch");
  const nodes: SwarmNode[] = [];
  try {
    const env = benchEnv(scratch);
    log(`machine: ${machine}`);
    const mixed = await ensureMixedPath(flags.sizeMib, { env, scratch, log });
    log(`${mixed.reused ? "reusing" : "made"} ${mixed.storePath}`);
    const versions = await ensureVersions(flags.deltaSizeMib, env, scratch);
    log(`versions: ${versions.v1}, ${versions.v2}`);

    const keyDir = `${scratch}/keys`;
    const keygen = await run(
      Deno.execPath(),
      arcaArgs(
        ["sign-keygen", "--name", "arca-bench-peer-fetch-1", "--output-dir", keyDir],
        arcaMain,
      ),
      { env },
    );
    const publicKey = /extra-trusted-public-keys = (\S+)/.exec(keygen.stdout)?.[1];
    if (publicKey === undefined) throw new Error(`No public key in: ${keygen.stdout}`);
    const team: Team = {
      scratch,
      env,
      main: arcaMain,
      topic: `arca bench peer fetch ${crypto.randomUUID()}`,
      publicKey,
      secretKeyFile: `${keyDir}/arca-bench-peer-fetch-1.secret`,
    };
    const importInto = async (cacheDir: string, paths: string[]) => {
      await run(
        Deno.execPath(),
        arcaArgs([
          "--cache-dir",
          cacheDir,
          "import",
          "--signing-key",
          team.secretKeyFile,
          ...paths,
        ], arcaMain),
        { env },
      );
    };
    log("importing into A (mixed path, version 1, version 2) and C (mixed path)");
    await importInto(`${scratch}/a`, [mixed.storePath, versions.v1, versions.v2]);
    await importInto(`${scratch}/c`, [mixed.storePath]);
    // With --profile-only, A runs under --cpu-prof too (its profile covers the warm-up copy).
    const profileA = `${scratch}/prof-a`;
    if (flags.profileOnly) await Deno.mkdir(profileA, { recursive: true });
    const a = await startNode(team, "A", `${scratch}/a`, {
      serve: true,
      denoFlags: flags.profileOnly ? ["--cpu-prof", `--cpu-prof-dir=${profileA}`] : [],
    });
    nodes.push(a);
    const c = await startNode(team, "C", `${scratch}/c`);
    nodes.push(c);
    log(`A ${a.nodeId} (pid ${a.pid}) on ${a.base}; C ${c.nodeId} (pid ${c.pid})`);

    log("warm-up: one copy from A");
    await copyOnce(team, a.base!, mixed.storePath, [a]);

    type Kind = "direct" | "viaA" | "viaAC";
    const samples: Record<Kind | "delta", CopySample[]> = {
      direct: [],
      viaA: [],
      viaAC: [],
      delta: [],
    };
    const loads: string[] = [];
    const kinds = (["direct", "viaA", "viaAC"] as Kind[]).filter((kind) => only.has(kind));
    for (let round = 0; round < (flags.profileOnly ? 0 : flags.runs); round++) {
      loads.push(loadAverage());
      const turn = round % Math.max(1, kinds.length);
      const order = [...kinds.slice(turn), ...kinds.slice(0, turn)];
      for (const kind of order) {
        const sample = kind === "direct"
          ? await copyOnce(team, a.base!, mixed.storePath, [a, c])
          : await copyViaB(team, mixed.storePath, kind === "viaA" ? [a] : [a, c]);
        samples[kind].push(sample);
        const shares = kind === "viaAC"
          ? ` (A ${megabytes(bytesFrom(sample.fetch, a))}, C ${
            megabytes(bytesFrom(sample.fetch, c))
          })`
          : "";
        log(
          `round ${round + 1} ${kind}: ${fixed(sample.seconds)} s, CPU nix ${
            fixed(sample.nixCpu)
          } ${Object.entries(sample.cpu).map(([n, s]) => `${n} ${fixed(s)}`).join(" ")}${shares}`,
        );
      }
      if (!only.has("delta")) continue;
      const delta = await copyViaB(team, versions.v2, [a], {
        prepare: (cacheDir) => importInto(cacheDir, [versions.v1]),
      });
      samples.delta.push(delta);
      log(
        `round ${round + 1} version 2: ${fixed(delta.seconds)} s, fetched ${
          megabytes(delta.fetch!.bytesFetched)
        } (${delta.fetch!.chunksFetched} chunks, ${delta.fetch!.chunksReused} reused), A sent ${
          megabytes(delta.sent.A)
        }`,
      );
    }
    loads.push(loadAverage());

    let profileReport = "";
    if (flags.profile || flags.profileOnly) {
      log("profiled copy via B from A (not in the table)");
      const profDir = `${scratch}/prof`;
      await Deno.mkdir(profDir, { recursive: true });
      const sample = await copyViaB(team, mixed.storePath, [a], {
        denoFlags: ["--cpu-prof", `--cpu-prof-dir=${profDir}`],
      });
      const lines = [
        `\nProfile of B (deno --cpu-prof) over a copy via B from A: ${
          fixed(sample.seconds)
        } s, B CPU ${fixed(sample.cpu.B)} s, A CPU ${fixed(sample.cpu.A)} s, nix CPU ${
          fixed(sample.nixCpu)
        } s (whole profile, start-up and sync included)`,
      ];
      lines.push(summarizeProfiles(profDir, "B"));
      if (flags.profileOnly) {
        await a.stop();
        lines.push(summarizeProfiles(profileA, "A (warm-up direct copy and the copy via B)"));
      }
      profileReport = lines.join("\n");
    }
    if (flags.profileOnly) {
      console.log(profileReport);
      return;
    }

    // Report.
    const narMB = mixed.narSize;
    const time = (values: number[]) =>
      `${fixed(median(values))} (${fixed(Math.min(...values))}) s = ${
        fixed(mbPerSecond(narMB, median(values)), 1)
      } MB/s`;
    const seconds = (kind: Kind) => samples[kind].map((s) => s.seconds);
    /** Median of the per-round ratios x/y of times (y faster → above 1). */
    const paired = (x: number[], y: number[]) => median(x.map((v, i) => v / y[i]));
    const ratioA = paired(seconds("direct"), seconds("viaA"));
    const ratioAC = paired(seconds("direct"), seconds("viaAC"));
    const gain = paired(seconds("viaA"), seconds("viaAC"));
    const shareA = median(
      samples.viaAC.map((s) => bytesFrom(s.fetch, a) / (s.fetch!.bytesFetched || NaN)),
    );
    const fetched = median(samples.delta.map((s) => s.fetch!.bytesFetched));
    const wire = median(samples.delta.map((s) => s.sent.A));
    const deltaShare = fetched / versions.narSize;
    const verdict = (met: boolean, target: string) => `${target}: ${met ? "MET" : "MISSED"}`;

    const ran = (...list: (Kind | "delta")[]) => list.every((kind) => samples[kind].length > 0);
    const rows: string[][] = [
      ran("direct", "viaA") && [
        `nix copy --from B, B fetching from A (NAR ${megabytes(narMB)})`,
        time(seconds("direct")),
        time(seconds("viaA")),
        `${fixed(ratioA)}×`,
        verdict(ratioA >= 0.7, "≥ 0.7×"),
      ],
      ran("direct", "viaAC") && [
        "nix copy --from B, B fetching from A and C",
        "(same)",
        time(seconds("viaAC")),
        `${fixed(ratioAC)}×`,
        "—",
      ],
      ran("viaA", "viaAC") && [
        "gain of A + C over A alone (B's time A / A + C)",
        "",
        "",
        `${fixed(gain)}×`,
        "report",
      ],
      ran("viaAC") && [
        "shares of B's chunk bytes with A and C (bytesByPeer)",
        "",
        `A ${fixed(100 * shareA, 0)} %, C ${fixed(100 * (1 - shareA), 0)} %`,
        "",
        "report",
      ],
      ran("delta") && [
        `version 2 (${versions.replacedMiB} of ${flags.deltaSizeMib} MiB replaced), B holds version 1: bytes fetched / NAR`,
        `NAR ${megabytes(versions.narSize)}`,
        `${megabytes(fetched)} fetched; A sent ${megabytes(wire)} over TCP (${
          percent(wire, versions.narSize)
        })`,
        percent(fetched, versions.narSize),
        verdict(deltaShare <= 0.15, "≤ 15 %"),
      ],
    ].filter((row): row is string[] => row !== false);

    const ranKinds = (["direct", "viaA", "viaAC", "delta"] as const).filter((kind) => ran(kind));
    const cpuRows = ranKinds.map((kind) => {
      const list = samples[kind];
      const med = (f: (s: CopySample) => number) => median(list.map(f));
      const nodeCpu = (name: string) => {
        const values = list.map((s) => s.cpu[name]).filter((v) => v !== undefined);
        return values.length === 0 ? "" : fixed(median(values));
      };
      const total = med((s) => s.nixCpu + Object.values(s.cpu).reduce((x, y) => x + y, 0));
      return [
        {
          direct: "direct from A",
          viaA: "via B from A",
          viaAC: "via B from A and C",
          delta: "version 2 via B from A",
        }[kind],
        fixed(med((s) => s.seconds)),
        fixed(med((s) => s.nixCpu)),
        nodeCpu("A"),
        nodeCpu("C"),
        nodeCpu("B"),
        `${fixed(total)} (${fixed(total / med((s) => s.seconds))} cores)`,
        kind === "direct" ? "" : megabytes(med((s) => (s.sent.A ?? 0) + (s.sent.C ?? 0))),
        kind === "direct" ? "" : megabytes(med((s) => s.fetch!.bytesFetched)),
      ];
    });
    const deltaChunks = samples.delta.map((s) => s.fetch!);

    console.log(`\n## Peer fetch: nix copy --from B (fetching from peers) vs from A directly`);
    console.log(machine);
    console.log(
      `arca: ${await arcaRevision(arcaMain)}; load average at each round's start and at the end: ${
        loads.join(" | ")
      }`,
    );
    console.log(
      `path: ${mixed.storePath} (NAR ${megabytes(mixed.narSize)}); version 2: ${versions.v2} ` +
        `(NAR ${megabytes(versions.narSize)}); cells: median (best) of ${flags.runs} rounds; ` +
        `ratios: medians of the per-round paired ratios of times (direct / via B)\n`,
    );
    console.log(formatTable(["measure", "direct from A", "via B", "ratio", "target"], rows));
    console.log(
      "\nCPU seconds over each copy (medians; nix by /usr/bin/time, arca by /proc) and bytes moved between peers:\n",
    );
    console.log(formatTable(
      [
        "copy",
        "wall s",
        "nix CPU s",
        "A CPU s",
        "C CPU s",
        "B CPU s",
        "all CPU s",
        "A + C sent (TCP)",
        "B fetched (chunks)",
      ],
      cpuRows,
    ));
    const list = (values: (number | string)[]) => values.join(", ");
    const raw = [
      ran("direct") && `direct ${list(seconds("direct").map((x) => fixed(x)))} s`,
      ran("viaA") && `via B from A ${list(seconds("viaA").map((x) => fixed(x)))} s`,
      ran("viaAC") &&
      `from A and C ${list(seconds("viaAC").map((x) => fixed(x)))} s, A's share ${
        list(samples.viaAC.map((s) => percent(bytesFrom(s.fetch, a), s.fetch!.bytesFetched)))
      }`,
      ran("delta") &&
      `version 2 ${list(samples.delta.map((s) => fixed(s.seconds)))} s, chunks fetched ${
        list(deltaChunks.map((f) => f.chunksFetched))
      }, reused ${list(deltaChunks.map((f) => f.chunksReused))}, bytes fetched ${
        list(deltaChunks.map((f) => f.bytesFetched))
      }`,
    ].filter((part) => part !== false);
    console.log(`\nraw samples: ${raw.join("; ")}`);
    if (profileReport) console.log(profileReport);
  } finally {
    for (const node of nodes.reverse()) await node.stop().catch(() => {});
    if (flags.keep) log(`kept ${scratch}`);
    else await removeTree(scratch);
  }
}

if (import.meta.main) await main();
