/**
 * The `arca` command line as real processes (`deno run -A main.ts …`, cwd the repository
 * root) with HOME and the XDG directories in a temporary directory: version and help, exit
 * codes (0 ok, 1 failure, 2 usage) with a message and no stack trace, global options before
 * and after the subcommand, `status --json`, `keygen` and `sign-keygen` (checked with real
 * Nix when it is installed). Processes run in parallel where the cases are independent.
 * @module
 */

import assert from "node:assert/strict";
import { buildProgram } from "../../main.ts";
import { VERSION } from "../../src/version.ts";
import { HAVE_NIX, nixEnv, runNix } from "../helpers/nix.ts";

const REPO_ROOT = new URL("../../", import.meta.url).pathname;

/**
 * The parent's Deno cache directory. Children get it explicitly: Deno keeps its cache
 * under $XDG_CACHE_HOME, which each test points elsewhere, and would download again.
 */
const DENO_DIR: string = Deno.env.get("DENO_DIR") ?? (() => {
  const out = new Deno.Command(Deno.execPath(), {
    args: ["info", "--json"],
    cwd: REPO_ROOT,
    stdout: "piped",
    stderr: "null",
  }).outputSync();
  return JSON.parse(new TextDecoder().decode(out.stdout)).denoDir as string;
})();

interface Home {
  dir: string;
  env: Record<string, string>;
  configDir: string;
  defaultCacheDir: string;
}

async function withHome(fn: (home: Home) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "arca-cli-test-" });
  try {
    await fn({
      dir,
      env: {
        PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin",
        HOME: `${dir}/home`,
        XDG_CONFIG_HOME: `${dir}/config`,
        XDG_CACHE_HOME: `${dir}/cache`,
        DENO_DIR,
        NO_COLOR: "1",
      },
      configDir: `${dir}/config/pares-arca`,
      defaultCacheDir: `${dir}/cache/pares-arca`,
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

interface Result {
  code: number;
  stdout: string;
  stderr: string;
}

async function arca(
  home: Home,
  args: string[],
  env: Record<string, string> = {},
): Promise<Result> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--quiet", "main.ts", ...args],
    cwd: REPO_ROOT,
    env: { ...home.env, ...env },
    clearEnv: true,
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

function show(args: string[], result: Result): string {
  return `arca ${
    args.join(" ")
  } → ${result.code}\nstdout: ${result.stdout}\nstderr: ${result.stderr}`;
}

/** A failure: the exit code, something on stderr, and no stack trace. */
function assertFails(args: string[], result: Result, code: number, stderrPart?: string | RegExp) {
  assert.equal(result.code, code, show(args, result));
  assert.ok(result.stderr.trim().length > 0, `no message: ${show(args, result)}`);
  assert.ok(!/^\s+at /m.test(result.stderr), `stack trace: ${show(args, result)}`);
  assert.ok(!result.stderr.includes("Uncaught"), `uncaught: ${show(args, result)}`);
  if (typeof stderrPart === "string") {
    assert.ok(result.stderr.includes(stderrPart), `expected ${stderrPart}: ${show(args, result)}`);
  } else if (stderrPart) {
    assert.match(result.stderr, stderrPart, show(args, result));
  }
}

const SUBCOMMANDS = buildProgram().commands.map((command) => command.name());

Deno.test("cli: --version, --help and every subcommand's --help", async () => {
  assert.ok(SUBCOMMANDS.length >= 7, SUBCOMMANDS.join(" "));
  for (
    const name of ["serve", "import", "import-closure", "list", "status", "keygen", "sign-keygen"]
  ) {
    assert.ok(SUBCOMMANDS.includes(name), `${name} is registered`);
  }
  await withHome(async (home) => {
    const runs: [string[], (r: Result) => void][] = [
      [["--version"], (r) => assert.equal(r.stdout, `${VERSION}\n`)],
      [["--help"], (r) => {
        for (const name of SUBCOMMANDS) assert.ok(r.stdout.includes(name), name);
        for (const option of ["--cache-dir", "--backend", "--config", "--verbose", "--version"]) {
          assert.ok(r.stdout.includes(option), option);
        }
      }],
      [["help", "status"], (r) => assert.match(r.stdout, /Usage: arca status/)],
      ...SUBCOMMANDS.map((name): [string[], (r: Result) => void] => [
        [name, "--help"],
        (r) => assert.match(r.stdout, new RegExp(`Usage: arca ${name}\\b`)),
      ]),
    ];
    const results = await Promise.all(runs.map(([args]) => arca(home, args)));
    results.forEach((result, i) => {
      const [args, check] = runs[i];
      assert.equal(result.code, 0, show(args, result));
      check(result);
    });
  });
});

Deno.test("cli: usage errors exit 2 with a message and no stack trace", async () => {
  await withHome(async (home) => {
    const cases: [string[], string | RegExp][] = [
      [[], /Usage: arca/],
      [["bogus"], "unknown command 'bogus'"],
      [["status", "--bogus"], "unknown option '--bogus'"],
      [["--bogus", "status"], "unknown option '--bogus'"],
      [["import"], "missing required argument"],
      [["import-closure"], "missing required argument"],
      [["sign-keygen"], "--name"],
      [["keygen", "extra"], "too many arguments"],
      [["--cache-dir"], "argument missing"],
      [["import", "/not/a/store/path"], "Not a store path: /not/a/store/path"],
      [["import", "/nix/store/not-a-valid-hash-part"], "Not a store path"],
      [["--backend", "bogus", "status"], /backend.*bogus/],
      [["status", "--backend", "bogus"], /backend.*bogus/],
      [["serve", "--bind", "nowhere"], /bind.*nowhere/],
      [["serve", "--priority", "high"], /priority.*high/],
      [["import", "--compression", "gzip", "/nix/store/x"], /compression.*gzip/],
      [["sign-keygen", "--name", "has space"], /name/i],
      [["sign-keygen", "--name", "a/b"], /name/i],
    ];
    const results = await Promise.all(cases.map(([args]) => arca(home, args)));
    results.forEach((result, i) => assertFails(cases[i][0], result, 2, cases[i][1]));
  });
});

Deno.test("cli: a broken config file is exit 2 naming the line, and is left as it was", async () => {
  await withHome(async (home) => {
    await Deno.mkdir(home.configDir, { recursive: true });
    const path = `${home.configDir}/config.toml`;
    const cases: [string, RegExp][] = [
      [`backend = "kv"\n\npriority = = 1\n`, /line 3/],
      [`# ok\nbackend = "sqlite"\n`, /line 2.*backend/],
      [`colour = "blue"\n`, /line 1.*colour/],
    ];
    for (const [text, pattern] of cases) {
      await Deno.writeTextFile(path, text);
      const result = await arca(home, ["status"]);
      assertFails(["status"], result, 2, pattern);
      assert.ok(result.stderr.includes(path), show(["status"], result));
      assert.equal(await Deno.readTextFile(path), text);
    }
    // --config naming a missing file fails (and creates nothing).
    const missing = `${home.dir}/missing.toml`;
    const result = await arca(home, ["--config", missing, "status"]);
    assertFails(["--config", missing, "status"], result, 2, missing);
    await assert.rejects(Deno.stat(missing), Deno.errors.NotFound);
  });
});

Deno.test("cli: global options before and after the subcommand; status --json", async () => {
  await withHome(async (home) => {
    const a = `${home.dir}/cache-a`;
    const b = `${home.dir}/cache-b`;
    const c = `${home.dir}/cache-c`;
    const runs: [string[], Record<string, string>, string, string][] = [
      [["--cache-dir", a, "status", "--json"], {}, a, "kv"],
      [["status", "--json", "--cache-dir", b, "--backend", "filesystem"], {}, b, "filesystem"],
      [["--backend", "filesystem", "status", "--cache-dir", c, "--json"], {}, c, "filesystem"],
      [
        ["status", "--json"],
        { PARES_ARCA_DIR: `${home.dir}/from-env` },
        `${home.dir}/from-env`,
        "kv",
      ],
      [["status", "--json", "--cache-dir", a], { PARES_ARCA_DIR: `${home.dir}/from-env` }, a, "kv"],
    ];
    const results = await Promise.all(runs.map(([args, env]) => arca(home, args, env)));
    results.forEach((result, i) => {
      const [args, , cacheDir, backend] = runs[i];
      assert.equal(result.code, 0, show(args, result));
      const status = JSON.parse(result.stdout);
      assert.deepEqual(Object.keys(status).sort(), [
        "backend",
        "cacheDir",
        "chunks",
        "dedupRatio",
        "narBytes",
        "paths",
        "peerFetch",
        "peers",
        "pendingUploads",
        "remoteRecords",
        "segments",
        "storedBytes",
        "swarm",
      ]);
      assert.deepEqual(
        [status.peers, status.remoteRecords, status.swarm, status.peerFetch, status.pendingUploads],
        [[], 0, null, null, { paths: 0, narBytes: 0 }],
      );
      assert.deepEqual(status.segments, [
        { name: "universal", filter: "all", swarm: false, paths: 0, narBytes: 0 },
      ]);
      assert.equal(status.cacheDir, cacheDir, show(args, result));
      assert.equal(status.backend, backend, show(args, result));
      assert.deepEqual(
        { paths: status.paths, narBytes: status.narBytes, chunks: status.chunks },
        { paths: 0, narBytes: 0, chunks: 0 },
      );
      for (const key of ["storedBytes", "dedupRatio"]) assert.equal(typeof status[key], "number");
    });
    // No cache dir given: the default under XDG_CACHE_HOME, and the first run wrote the
    // commented config file.
    const result = await arca(home, ["status", "--json"]);
    assert.equal(result.code, 0, show(["status", "--json"], result));
    assert.equal(JSON.parse(result.stdout).cacheDir, home.defaultCacheDir);
    assert.match(await Deno.readTextFile(`${home.configDir}/config.toml`), /^# backend = "kv"$/m);
    const list = await arca(home, ["list", "--json"]);
    assert.equal(list.code, 0, show(["list", "--json"], list));
    assert.deepEqual(JSON.parse(list.stdout), []);
  });
});

Deno.test("cli: keygen prints a fresh 256-bit hex key each run", async () => {
  await withHome(async (home) => {
    const results = await Promise.all([arca(home, ["keygen"]), arca(home, ["keygen"])]);
    for (const result of results) {
      assert.equal(result.code, 0, show(["keygen"], result));
      assert.match(result.stdout, /^[0-9a-f]{64}\n$/);
    }
    assert.notEqual(results[0].stdout, results[1].stdout);
  });
});

Deno.test("cli: sign-keygen writes a Nix key pair and refuses to overwrite it", async () => {
  await withHome(async (home) => {
    const args = ["sign-keygen", "--name", "k1"];
    const result = await arca(home, args);
    assert.equal(result.code, 0, show(args, result));
    const secretPath = `${home.configDir}/k1.secret`;
    const publicPath = `${home.configDir}/k1.pub`;
    assert.equal((await Deno.stat(secretPath)).mode! & 0o777, 0o600);
    const secret = await Deno.readTextFile(secretPath);
    const publicKey = (await Deno.readTextFile(publicPath)).trim();
    assert.match(secret, /^k1:[A-Za-z0-9+/]{86}==$/);
    assert.match(publicKey, /^k1:[A-Za-z0-9+/]{43}=$/);
    assert.equal(result.stdout, `extra-trusted-public-keys = ${publicKey}\n`);

    const again = await arca(home, args);
    assertFails(args, again, 1, "already exists");
    assert.equal(await Deno.readTextFile(secretPath), secret);
    assert.equal((await Deno.readTextFile(publicPath)).trim(), publicKey);

    // --output-dir and --config both move the key files.
    const other = await arca(home, [...args, "--output-dir", `${home.dir}/keys`]);
    assert.equal(other.code, 0, show(args, other));
    assert.ok((await Deno.stat(`${home.dir}/keys/k1.secret`)).isFile);
    assert.notEqual(await Deno.readTextFile(`${home.dir}/keys/k1.secret`), secret);

    if (HAVE_NIX) {
      const converted = await runNix("nix", ["key", "convert-secret-to-public"], {
        env: nixEnv(),
        stdin: new TextEncoder().encode(secret),
      });
      assert.equal(converted.trim(), publicKey);
    }
  });
});

Deno.test("cli: --verbose shows the stack trace of a failure", async () => {
  await withHome(async (home) => {
    const args = ["--verbose", "import", "/not/a/store/path"];
    const result = await arca(home, args);
    assert.equal(result.code, 2, show(args, result));
    assert.match(result.stderr, /^arca: Not a store path: \/not\/a\/store\/path$/m);
    assert.match(result.stderr, /^\s+at /m, show(args, result));
  });
});

Deno.test("cli: serve listens where told, serves nix-cache-info, stops on SIGTERM", async () => {
  await withHome(async (home) => {
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        "--quiet",
        "main.ts",
        "serve",
        "--bind",
        "127.0.0.1:0",
        "--priority",
        "17",
      ],
      cwd: REPO_ROOT,
      env: home.env,
      clearEnv: true,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const stderr = new Response(child.stderr).text();
    const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
    const killer = setTimeout(() => child.kill("SIGKILL"), 30_000); // a safety net only
    try {
      let seen = "";
      let match: RegExpExecArray | null = null;
      while (!(match = /Serving (\S+) on (http:\/\/127\.0\.0\.1:\d+)\n/.exec(seen))) {
        const { value, done } = await reader.read();
        if (done) throw new Error(`serve exited early: ${seen} ${await stderr}`);
        seen += value;
      }
      assert.equal(match[1], home.defaultCacheDir);
      const response = await fetch(`${match[2]}/nix-cache-info`);
      assert.equal(await response.text(), "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 17\n");
      child.kill("SIGTERM");
      while (!(await reader.read()).done);
      const status = await child.status;
      assert.equal(status.code, 0, await stderr);
    } finally {
      clearTimeout(killer);
      await stderr;
    }
  });
});
