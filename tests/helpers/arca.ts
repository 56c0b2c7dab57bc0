/**
 * Test helpers that run arca as a real process (`deno run -A main.ts`), the way users do:
 * one-shot commands, and `serve` and `swarm` processes on 127.0.0.1 that the test stops by
 * PID.
 * @module
 */

import { nixEnv } from "./nix.ts";

/** The repository root. */
export const REPO_ROOT: string = new URL("../../", import.meta.url).pathname;
const MAIN = `${REPO_ROOT}main.ts`;

/** How arca is started: the program, then the arguments that come before arca's own. */
export type ArcaCommand = readonly [program: string, ...args: string[]];

/** `deno run -A --quiet main.ts` with this process's Deno: the default {@link ArcaCommand}. */
export function defaultArcaCommand(): ArcaCommand {
  return [Deno.execPath(), "run", "-A", "--quiet", MAIN];
}

/** A temp home for one test: config and cache dirs, plus the Nix environment. */
export interface ArcaHome {
  dir: string;
  cacheDir: string;
  configDir: string;
  env: Record<string, string>;
  cleanup(): Promise<void>;
}

/**
 * Deno's own cache directory as this process uses it. Children get it as DENO_DIR, so a
 * fresh HOME or XDG_CACHE_HOME does not make them download the npm packages again.
 */
export function denoDir(): string {
  const explicit = Deno.env.get("DENO_DIR");
  if (explicit) return explicit;
  const base = Deno.env.get("XDG_CACHE_HOME") || `${Deno.env.get("HOME")}/.cache`;
  return `${base}/deno`;
}

/** Makes a fresh home: XDG dirs in a temp dir, Nix env of DESIGN.md §5. */
export async function makeArcaHome(): Promise<ArcaHome> {
  const dir = await Deno.makeTempDir({ prefix: "arca-test-" });
  const env = nixEnv({
    HOME: dir,
    XDG_CONFIG_HOME: `${dir}/config`,
    PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin",
    DENO_DIR: denoDir(),
  });
  return {
    dir,
    cacheDir: `${dir}/cache`,
    configDir: `${dir}/config/pares-arca`,
    env,
    cleanup: () => Deno.remove(dir, { recursive: true }).catch(() => {}),
  };
}

/** Result of a one-shot arca command. */
export interface ArcaResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `arca <args>` to completion (with `command`, default {@link defaultArcaCommand}). */
export async function runArca(
  args: string[],
  options: { env?: Record<string, string>; cwd?: string; command?: ArcaCommand } = {},
): Promise<ArcaResult> {
  const [program, ...before] = options.command ?? defaultArcaCommand();
  const out = await new Deno.Command(program, {
    args: [...before, ...args],
    env: options.env,
    cwd: options.cwd,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  return {
    code: out.code,
    stdout: new TextDecoder().decode(out.stdout),
    stderr: new TextDecoder().decode(out.stderr),
  };
}

/** Runs `arca <args>` and throws with its stderr unless it exits 0; returns stdout. */
export async function arcaOk(
  args: string[],
  options: { env?: Record<string, string>; command?: ArcaCommand } = {},
): Promise<string> {
  const result = await runArca(args, options);
  if (result.code !== 0) {
    throw new Error(`arca ${args.join(" ")} exited ${result.code}: ${result.stderr}`);
  }
  return result.stdout;
}

/** A running `arca serve`. */
export interface ArcaServer {
  url: string;
  pid: number;
  /** Stops the server (SIGTERM, then SIGKILL after 5 s) and waits for it. */
  stop(): Promise<void>;
}

/** Picks a free TCP port on 127.0.0.1. */
export function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

/** A long-running arca process started by {@link startArcaProcess}. */
export interface ArcaProcess {
  pid: number;
  /** The match of `ready` on stdout. */
  ready: RegExpExecArray;
  /** What it printed on stderr so far. */
  stderr(): string;
  /** Stops it (SIGTERM, then SIGKILL after `graceMs`, default 5 s) and waits for it. */
  stop(graceMs?: number): Promise<Deno.CommandStatus>;
}

/**
 * Starts `arca <args>` (with `command`, default {@link defaultArcaCommand}) and waits, at
 * most 30 s, until its stdout matches `ready`; stdout and stderr keep being drained so the
 * child never blocks on a full pipe.
 */
export async function startArcaProcess(
  args: string[],
  options: { env?: Record<string, string>; command?: ArcaCommand; ready: RegExp },
): Promise<ArcaProcess> {
  const [program, ...before] = options.command ?? defaultArcaCommand();
  const child = new Deno.Command(program, {
    args: [...before, ...args],
    env: options.env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let errors = "";
  const stderrDone = child.stderr.pipeThrough(new TextDecoderStream()).pipeTo(
    new WritableStream({ write: (chunk) => void (errors += chunk) }),
  ).catch(() => {});
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let seen = "";
  let match: RegExpExecArray | null;
  const deadline = setTimeout(() => child.kill("SIGKILL"), 30_000);
  try {
    while ((match = options.ready.exec(seen)) === null) {
      const { value, done } = await reader.read();
      if (done) {
        await child.status;
        await stderrDone;
        throw new Error(`arca ${args.join(" ")} exited before it was ready: ${errors}`);
      }
      seen += value;
    }
  } finally {
    clearTimeout(deadline);
  }
  (async () => {
    while (!(await reader.read()).done);
  })().catch(() => {});
  let stopped: Promise<Deno.CommandStatus> | undefined;
  return {
    pid: child.pid,
    ready: match,
    stderr: () => errors,
    stop(graceMs = 5000) {
      stopped ??= (async () => {
        try {
          child.kill("SIGTERM");
        } catch { /* already gone */ }
        const timer = setTimeout(() => {
          try {
            child.kill("SIGKILL");
          } catch { /* already gone */ }
        }, graceMs);
        const status = await child.status;
        clearTimeout(timer);
        await stderrDone;
        return status;
      })();
      return stopped;
    },
  };
}

/** Starts `arca serve --bind 127.0.0.1:<free port> <args>` and waits until it listens. */
export async function startServe(
  args: string[],
  options: { env?: Record<string, string>; command?: ArcaCommand } = {},
): Promise<ArcaServer> {
  const port = freePort();
  const process = await startArcaProcess(["serve", "--bind", `127.0.0.1:${port}`, ...args], {
    ...options,
    ready: /Serving /,
  });
  return {
    url: `http://127.0.0.1:${port}`,
    pid: process.pid,
    stop: async () => void await process.stop(),
  };
}

export interface ArcaSwarm {
  pid: number;
  /** The node id prefix (16 hex digits) from its "Swarm node" line. */
  nodeId: string;
  /** What it wrote to stderr so far (its log lines). */
  stderr(): string;
  /**
   * Stops it (SIGTERM, then SIGKILL after `graceMs`, default 5000), waits for it, and
   * returns how it ended.
   */
  stop(graceMs?: number): Promise<Deno.CommandStatus>;
}

/**
 * Starts `arca <args>` (which should hold `swarm` and its options; with `command`, default
 * {@link defaultArcaCommand}) and waits, at most 30 s,
 * for its "Swarm node <id>" line: by then its sockets are bound and discovery has started.
 */
export async function startSwarm(
  args: string[],
  options: { env?: Record<string, string>; command?: ArcaCommand } = {},
): Promise<ArcaSwarm> {
  const process = await startArcaProcess(args, { ...options, ready: /Swarm node ([0-9a-f]{16})/ });
  return {
    pid: process.pid,
    nodeId: process.ready[1],
    stderr: process.stderr,
    stop: process.stop,
  };
}

/** A UDP port on 127.0.0.1 that was free a moment ago (bound, then released). */
export function freeUdpPort(): number {
  const conn = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  const port = (conn.addr as Deno.NetAddr).port;
  conn.close();
  return port;
}
