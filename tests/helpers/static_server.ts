/**
 * A tiny static file server for tests that need a real upstream cache (a directory written
 * by `nix copy --to file://…`), run as its own process:
 * `deno run --allow-net --allow-read tests/helpers/static_server.ts <dir>` prints
 * `Listening on http://127.0.0.1:<port>` and serves `<dir>` (GET and HEAD; 404 for anything
 * missing or outside it).
 *
 * It counts requests per path and misbehaves on demand, through its control routes:
 * - `GET /__control/counts`: `{ "<path>": <requests>, … }` (control routes not counted);
 * - `POST /__control/mode` with JSON `{ "hang": "<regex>" | null, "stallAfter": <bytes> | null }`:
 *   requests whose path matches `hang` never get an answer (until the client gives up), and
 *   bodies stop after `stallAfter` bytes without ending;
 * - `POST /__control/reset`: counts to zero, normal behaviour.
 *
 * {@link startStaticServer} runs it from a test and talks to it.
 * @module
 */

/** How the server misbehaves. */
export interface StaticServerMode {
  /** Requests whose path matches this regular expression are never answered. */
  hang?: string | null;
  /** Response bodies stop after this many bytes, and never end. */
  stallAfter?: number | null;
}

/** A running static server process. */
export interface StaticServer {
  /** `http://127.0.0.1:<port>`. */
  url: string;
  pid: number;
  /** Requests per path so far. */
  counts(): Promise<Record<string, number>>;
  /** Requests so far whose path matches `pattern`. */
  countMatching(pattern: RegExp): Promise<number>;
  setMode(mode: StaticServerMode): Promise<void>;
  reset(): Promise<void>;
  /** Kills the process (connections are refused from then on) and waits for it. */
  stop(): Promise<void>;
}

/** Starts the server on `root` as a child process and waits until it listens (at most 30 s). */
export async function startStaticServer(root: string): Promise<StaticServer> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-net=127.0.0.1", `--allow-read=${root}`, import.meta.filename!, root],
    stdin: "null",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let seen = "";
  let match: RegExpExecArray | null = null;
  const deadline = setTimeout(() => child.kill("SIGKILL"), 30_000);
  try {
    while ((match = /Listening on (http:\/\/\S+)/.exec(seen)) === null) {
      const { value, done } = await reader.read();
      if (done) throw new Error(`static server on ${root} exited before it listened`);
      seen += value;
    }
  } finally {
    clearTimeout(deadline);
  }
  (async () => {
    while (!(await reader.read()).done);
  })().catch(() => {});
  const url = match[1];
  const control = async (path: string, body?: unknown) => {
    const response = await fetch(`${url}/__control/${path}`, {
      method: body === undefined ? "GET" : "POST",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (!response.ok) throw new Error(`static server control ${path}: HTTP ${response.status}`);
    return await response.json();
  };
  let stopped: Promise<void> | undefined;
  const server: StaticServer = {
    url,
    pid: child.pid,
    counts: () => control("counts"),
    async countMatching(pattern) {
      const counts = await server.counts();
      return Object.entries(counts).filter(([path]) => pattern.test(path))
        .reduce((sum, [, n]) => sum + n, 0);
    },
    setMode: (mode) => control("mode", mode),
    reset: () => control("reset", {}),
    stop() {
      stopped ??= (async () => {
        try {
          child.kill("SIGKILL");
        } catch { /* already gone */ }
        await child.status;
      })();
      return stopped;
    },
  };
  return server;
}

function serve(root: string): void {
  const counts: Record<string, number> = {};
  let hang: RegExp | null = null;
  let stallAfter: number | null = null;
  // Never settles; Deno drops it when the client goes away.
  const never = () => new Promise<Response>(() => {});
  Deno.serve({
    hostname: "127.0.0.1",
    port: 0,
    onListen: ({ port }) => console.log(`Listening on http://127.0.0.1:${port}`),
  }, async (request) => {
    const path = new URL(request.url).pathname;
    if (path.startsWith("/__control/")) {
      const what = path.slice("/__control/".length);
      if (what === "counts") return Response.json(counts);
      if (what === "reset") {
        for (const key of Object.keys(counts)) delete counts[key];
        hang = null;
        stallAfter = null;
        return Response.json({});
      }
      if (what === "mode") {
        const mode = await request.json() as StaticServerMode;
        if (mode.hang !== undefined) hang = mode.hang === null ? null : new RegExp(mode.hang);
        if (mode.stallAfter !== undefined) stallAfter = mode.stallAfter;
        return Response.json({});
      }
      return new Response("unknown control\n", { status: 404 });
    }
    counts[path] = (counts[path] ?? 0) + 1;
    if (hang?.test(path)) return await never();
    if (request.method !== "GET" && request.method !== "HEAD") {
      return new Response("method not allowed\n", { status: 405 });
    }
    if (path.includes("..") || path.includes("//") || path.includes("\\")) {
      return new Response("bad path\n", { status: 400 });
    }
    let file: Deno.FsFile;
    let size: number;
    try {
      file = await Deno.open(`${root}${path}`, { read: true });
      const info = await file.stat();
      if (!info.isFile) {
        file.close();
        return new Response("not found\n", { status: 404 });
      }
      size = info.size;
    } catch {
      return new Response("not found\n", { status: 404 });
    }
    const headers = { "content-length": String(size) };
    if (request.method === "HEAD") {
      file.close();
      return new Response(null, { headers });
    }
    if (stallAfter === null) return new Response(file.readable, { headers });
    // Send the first `stallAfter` bytes, then nothing more until the client gives up.
    const limit = stallAfter;
    const bytes = new Uint8Array(Math.min(limit, size));
    let filled = 0;
    while (filled < bytes.length) {
      const n = await file.read(bytes.subarray(filled));
      if (n === null) break;
      filled += n;
    }
    file.close();
    // Never closed: the server cancels it when the client goes away.
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(bytes.subarray(0, filled));
      },
    });
    return new Response(body, { headers });
  });
}

if (import.meta.main) {
  const root = Deno.args[0];
  if (!root) {
    console.error("usage: static_server.ts <dir>");
    Deno.exit(2);
  }
  serve(root.replace(/\/+$/, ""));
}
