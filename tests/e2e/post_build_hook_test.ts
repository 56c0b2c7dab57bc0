/**
 * The post-build hook end to end, with the real Nix (the team-cache issue's "Done means"):
 * `arca install-hook` writes the hook and the nix.conf line (idempotently, refusing to
 * replace another hook); `nix-build --option post-build-hook <hook>` of a fresh fixture
 * succeeds with arca not running and leaves a spool file naming its outputs; the hook,
 * run directly, exits 0 promptly whatever happens (Nix 2.8's empty OUT_PATHS, a bogus
 * DRV_PATH, a spool it cannot write); and once the spool is drained the outputs are in
 * `arca list`. The cost of the hook is measured and printed, not asserted.
 * @module
 */

import assert from "node:assert/strict";
import { arcaOk, makeArcaHome, runArca, startServe } from "../helpers/arca.ts";
import { HAVE_NIX, runNix } from "../helpers/nix.ts";

/** A two-output derivation no one built before (`tag` is fresh), so Nix really builds it. */
function fixtureExpr(tag: string): string {
  return `derivation {
    name = "arca-hook-${tag}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    outputs = [ "out" "doc" ];
    args = [ "-c" "export PATH=/bin:/usr/bin; mkdir -p $out/bin $doc; echo ${tag} > $out/tag; printf '#!/bin/sh\\\\necho ${tag}\\\\n' > $out/bin/hi; chmod +x $out/bin/hi; echo doc > $doc/README" ];
  }`;
}

function freshTag(): string {
  return crypto.randomUUID().slice(0, 8);
}

/** The derivation and its output paths, sorted. */
async function outputsOf(expr: string, env: Record<string, string>) {
  const drv = (await runNix("nix-instantiate", ["-E", expr], { env })).trim();
  const outputs = (await runNix("nix-store", ["-q", "--outputs", drv], { env })).trim().split("\n")
    .sort();
  return { drv, outputs };
}

async function spoolFiles(spool: string): Promise<string[]> {
  const names: string[] = [];
  for await (const entry of Deno.readDir(spool)) names.push(entry.name);
  return names.sort();
}

/** The paths in the spool files not in `before`, sorted. */
async function newSpooledPaths(spool: string, before: string[]): Promise<string[]> {
  const paths: string[] = [];
  for (const name of await spoolFiles(spool)) {
    if (before.includes(name)) continue;
    assert.match(name, /^\d+-\d+-[A-Za-z0-9]+\.paths$/, "only complete files are left");
    const { mode } = await Deno.stat(`${spool}/${name}`);
    assert.equal(mode! & 0o777, 0o644, `${name} is readable by the arca service`);
    paths.push(...(await Deno.readTextFile(`${spool}/${name}`)).trim().split("\n"));
  }
  return paths.sort();
}

interface HookRun {
  code: number;
  stderr: string;
  ms: number;
}

/**
 * Runs the hook as Nix would, with `vars` added to (or, as null, removed from) `env`; it
 * is killed after 2 s, which fails the run (a hook must never hold a build up).
 */
async function runHook(
  hook: string,
  env: Record<string, string>,
  vars: Record<string, string | null>,
  wrap: string[] = [],
): Promise<HookRun> {
  const merged: Record<string, string> = { ...env };
  for (const [key, value] of Object.entries(vars)) {
    if (value === null) delete merged[key];
    else merged[key] = value;
  }
  const [cmd, ...args] = [...wrap, hook];
  const start = performance.now();
  const child = new Deno.Command(cmd, {
    args,
    env: merged,
    clearEnv: true,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let killed = false;
  const timer = setTimeout(() => {
    killed = true;
    child.kill("SIGKILL");
  }, 2000);
  const out = await child.output();
  clearTimeout(timer);
  const ms = performance.now() - start;
  assert.ok(!killed, `the hook returned within 2 s (${hook})`);
  return { code: out.code, stderr: new TextDecoder().decode(out.stderr), ms };
}

async function timedBuild(expr: string, env: Record<string, string>, hook?: string) {
  const args = ["--no-out-link", ...(hook ? ["--option", "post-build-hook", hook] : [])];
  const start = performance.now();
  await runNix("nix-build", [...args, "-E", expr], { env });
  return performance.now() - start;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

Deno.test({
  name:
    "e2e post-build hook: install-hook, nix-build with arca stopped, then the outputs in arca list",
  ignore: !HAVE_NIX,
  async fn() {
    const home = await makeArcaHome();
    const env = home.env;
    const global = ["--cache-dir", home.cacheDir];
    const prefix = `${home.dir}/prefix`;
    const hook = `${prefix}/etc/nix/post-build-hook`;
    const conf = `${prefix}/etc/nix/nix.conf`;
    const spool = `${home.cacheDir}/spool`;
    try {
      // install-hook: the hook file, the nix.conf line, the spool directory.
      const first = await arcaOk(["install-hook", "--prefix", prefix, ...global], { env });
      assert.match(first, new RegExp(`Wrote ${hook} \\(mode 0755\\)`));
      assert.ok(first.includes(`post-build-hook = ${hook}`), first);
      const snapshot = async () =>
        await Promise.all([hook, conf].map(async (file) => {
          const stat = await Deno.stat(file);
          return {
            file,
            text: await Deno.readTextFile(file),
            mode: stat.mode! & 0o7777,
            mtime: stat.mtime?.getTime(),
          };
        }));
      const installed = await snapshot();
      assert.equal(installed[0].mode, 0o755);
      assert.ok(installed[0].text.startsWith("#!/bin/sh\n"));
      assert.ok(installed[0].text.includes(`spool='${spool}'`));
      assert.equal(installed[1].text, `post-build-hook = ${hook}\n`);
      assert.equal((await Deno.stat(spool)).mode! & 0o7777, 0o755);
      // Twice: nothing changes, not even a modification time.
      const second = await arcaOk(["install-hook", "--prefix", prefix, ...global], { env });
      assert.match(second, /Unchanged: .*post-build-hook\n/);
      assert.match(second, /Unchanged: .*nix\.conf already has/);
      assert.deepEqual(await snapshot(), installed);

      // Arca is not running. A real build with the hook succeeds and spools its outputs.
      const tag = freshTag();
      const { drv, outputs } = await outputsOf(fixtureExpr(tag), env);
      assert.equal(outputs.length, 2);
      await runNix(
        "nix-build",
        ["--no-out-link", "--option", "post-build-hook", hook, "-E", fixtureExpr(tag)],
        { env },
      );
      assert.deepEqual(await newSpooledPaths(spool, []), outputs);

      // What the hook costs a build: printed, not asserted.
      const withHook: number[] = [];
      const withoutHook: number[] = [];
      for (let i = 0; i < 3; i++) {
        withHook.push(await timedBuild(fixtureExpr(freshTag()), env, hook));
        withoutHook.push(await timedBuild(fixtureExpr(freshTag()), env));
      }
      console.log(
        `post-build hook cost: nix-build of a fresh two-output fixture, median of 3: ` +
          `${median(withHook).toFixed(0)} ms with the hook, ${
            median(withoutHook).toFixed(0)
          } ms without (with: ${withHook.map((t) => t.toFixed(0)).join(", ")}; without: ${
            withoutHook.map((t) => t.toFixed(0)).join(", ")
          })`,
      );

      // The hook run directly. Nix 2.8's empty OUT_PATHS: it asks nix-store.
      let before = await spoolFiles(spool);
      const direct = await runHook(hook, env, { DRV_PATH: drv, OUT_PATHS: "" });
      assert.equal(direct.code, 0, direct.stderr);
      assert.equal(direct.stderr, "");
      assert.deepEqual(await newSpooledPaths(spool, before), outputs);
      console.log(`post-build hook run directly (nix-store fallback): ${direct.ms.toFixed(0)} ms`);
      // OUT_PATHS given (newer Nix): used as is.
      before = await spoolFiles(spool);
      const given = await runHook(hook, env, { DRV_PATH: drv, OUT_PATHS: outputs.join(" ") });
      assert.equal(given.code, 0, given.stderr);
      assert.deepEqual(await newSpooledPaths(spool, before), outputs);
      // A bogus DRV_PATH: nothing spooled, a message, exit 0.
      before = await spoolFiles(spool);
      const bogus = "/nix/store/00000000000000000000000000000000-arca-bogus.drv";
      const bad = await runHook(hook, env, { DRV_PATH: bogus, OUT_PATHS: "" });
      assert.equal(bad.code, 0);
      assert.match(
        bad.stderr,
        /arca post-build hook: cannot spool the outputs of .*arca-bogus\.drv/,
      );
      assert.deepEqual(await spoolFiles(spool), before);
      // No DRV_PATH, no OUT_PATHS at all: nothing to do.
      const empty = await runHook(hook, env, { DRV_PATH: null, OUT_PATHS: null });
      assert.deepEqual([empty.code, empty.stderr], [0, ""]);
      assert.deepEqual(await spoolFiles(spool), before);

      // A spool it cannot write: its parent became a regular file.
      const blockedPrefix = `${home.dir}/blocked-prefix`;
      const blocked = `${home.dir}/blocked/spool`;
      await arcaOk(["install-hook", "--prefix", blockedPrefix, "--spool-dir", blocked, ...global], {
        env,
      });
      await Deno.remove(`${home.dir}/blocked`, { recursive: true });
      await Deno.writeTextFile(`${home.dir}/blocked`, "not a directory\n");
      const blockedHook = `${blockedPrefix}/etc/nix/post-build-hook`;
      for (
        const vars of [{ DRV_PATH: drv, OUT_PATHS: "" }, { DRV_PATH: drv, OUT_PATHS: outputs[0] }]
      ) {
        const run = await runHook(blockedHook, env, vars);
        assert.equal(run.code, 0);
        assert.match(run.stderr, /cannot spool the outputs of/);
      }
      // A nix.conf with another hook is left alone (exit 1, nothing written).
      const otherPrefix = `${home.dir}/other-prefix`;
      await Deno.mkdir(`${otherPrefix}/etc/nix`, { recursive: true });
      await Deno.writeTextFile(
        `${otherPrefix}/etc/nix/nix.conf`,
        "sandbox = false\npost-build-hook = /usr/local/bin/upload-to-s3 # ours\n",
      );
      const refused = await runArca(["install-hook", "--prefix", otherPrefix, ...global], { env });
      assert.equal(refused.code, 1);
      assert.match(
        refused.stderr,
        /already sets post-build-hook = \/usr\/local\/bin\/upload-to-s3/,
      );
      assert.ok(!refused.stderr.includes("    at "), "no stack trace");
      assert.deepEqual(await spoolFiles(`${otherPrefix}/etc/nix`), ["nix.conf"]);

      // Once arca runs (`serve` drains the spool every 2 s), the outputs are in `arca list`
      // and the spool files are gone.
      const server = await startServe(global, { env });
      try {
        let listed: string[] = [];
        for (let i = 0; i < 100; i++) {
          listed = (await arcaOk([...global, "list"], { env })).trim().split("\n");
          const drained = (await spoolFiles(spool)).length === 0;
          if (drained && outputs.every((output) => listed.includes(output))) break;
          await new Promise((resolve) => setTimeout(resolve, 200));
        }
        for (const output of outputs) assert.ok(listed.includes(output), `${output} in arca list`);
        assert.deepEqual(await spoolFiles(spool), []);
      } finally {
        await server.stop();
      }
    } finally {
      await home.cleanup();
    }
  },
});

Deno.test({
  name:
    "e2e post-build hook: a spool the hook's user may not write costs nothing and fails nothing",
  // Runs the hook as nobody against a root-owned spool: needs root and setpriv.
  ignore: !HAVE_NIX || Deno.uid() !== 0 || !hasSetpriv(),
  async fn() {
    const home = await makeArcaHome();
    // World-traversable, unlike the home: nobody must reach the hook and the spool.
    const pub = await Deno.makeTempDir({ prefix: "arca-hook-public-" });
    try {
      await Deno.chmod(pub, 0o755);
      const spool = `${pub}/spool`;
      await arcaOk(
        ["install-hook", "--prefix", `${pub}/prefix`, "--spool-dir", spool],
        { env: { ...home.env, PARES_ARCA_DIR: home.cacheDir } },
      );
      const hook = `${pub}/prefix/etc/nix/post-build-hook`;
      const stat = await Deno.stat(spool);
      assert.equal(stat.uid, 0);
      const run = await runHook(
        hook,
        home.env,
        {
          DRV_PATH: "/nix/store/00000000000000000000000000000000-x.drv",
          OUT_PATHS: "/nix/store/x",
        },
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"],
      );
      assert.equal(run.code, 0);
      assert.match(run.stderr, /cannot spool the outputs of/);
      assert.deepEqual(await spoolFiles(spool), []);
    } finally {
      await Deno.remove(pub, { recursive: true }).catch(() => {});
      await home.cleanup();
    }
  },
});

function hasSetpriv(): boolean {
  try {
    return new Deno.Command("setpriv", { args: ["--version"], stdout: "null", stderr: "null" })
      .outputSync().success;
  } catch {
    return false;
  }
}
