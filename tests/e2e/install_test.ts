/**
 * The installed `arca` (README "Install"): `deno install -g -A --config deno.json --name arca
 * main.ts` into a temp `--root` gives a command that runs from any directory, prints the
 * version of src/version.ts, and passes the same end-to-end substitution case as
 * `deno run main.ts` (tests/e2e/substitution_suite.ts, the real Nix as the oracle).
 * Children get this process's DENO_DIR, so nothing is downloaded again.
 * @module
 */

import assert from "node:assert/strict";
import { dirname } from "node:path";
import { type ArcaCommand, denoDir, REPO_ROOT } from "../helpers/arca.ts";
import { HAVE_NIX } from "../helpers/nix.ts";
import { VERSION } from "../../src/version.ts";
import { runSubstitutionCase } from "./substitution_suite.ts";

/** PATH with this process's Deno first: the installed shim runs `deno` from PATH. */
function pathWithDeno(): string {
  return `${dirname(Deno.execPath())}:${Deno.env.get("PATH") ?? "/usr/bin:/bin"}`;
}

async function run(
  program: string,
  args: string[],
  options: { cwd: string; env: Record<string, string> },
): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command(program, {
    args,
    cwd: options.cwd,
    env: options.env,
    clearEnv: true,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decoder = new TextDecoder();
  return { code: out.code, stdout: decoder.decode(out.stdout), stderr: decoder.decode(out.stderr) };
}

Deno.test("deno install gives an arca command that works from anywhere and passes the e2e substitution case", async (t) => {
  const dir = await Deno.makeTempDir({ prefix: "arca-install-" });
  const root = `${dir}/root`;
  const elsewhere = `${dir}/elsewhere`;
  await Deno.mkdir(elsewhere);
  const env = {
    HOME: dir,
    XDG_CONFIG_HOME: `${dir}/config`,
    PATH: pathWithDeno(),
    DENO_DIR: denoDir(),
    NO_COLOR: "1",
  };
  try {
    await t.step("install with the README's command", async () => {
      // Run elsewhere, naming the config and entry point, as from outside the checkout.
      const installed = await run(Deno.execPath(), [
        "install",
        "-g",
        "-A",
        "--config",
        `${REPO_ROOT}deno.json`,
        "--name",
        "arca",
        "--root",
        root,
        `${REPO_ROOT}main.ts`,
      ], { cwd: elsewhere, env });
      assert.equal(installed.code, 0, `deno install failed: ${installed.stderr}`);
      const shim = await Deno.stat(`${root}/bin/arca`);
      assert(shim.isFile && (shim.mode! & 0o111) !== 0, "bin/arca is an executable file");
    });

    await t.step("arca --version, from another directory and found on PATH", async () => {
      const onPath = { ...env, PATH: `${root}/bin:${env.PATH}` };
      const version = await run("arca", ["--version"], { cwd: elsewhere, env: onPath });
      assert.equal(version.code, 0, version.stderr);
      assert.equal(version.stdout.trim(), VERSION);
      const help = await run("arca", ["--help"], { cwd: "/", env: onPath });
      assert.equal(help.code, 0, help.stderr);
      assert.match(help.stdout, /serve/);
      const usage = await run("arca", ["no-such-command"], { cwd: elsewhere, env: onPath });
      assert.equal(usage.code, 2, "unknown command: usage error");
    });

    // The shim runs `deno` from PATH, so the children's PATH gets this Deno first.
    const command: ArcaCommand = ["/usr/bin/env", `PATH=${env.PATH}`, `${root}/bin/arca`];
    await t.step({
      name: "e2e kv/xz with the installed arca",
      ignore: !HAVE_NIX,
      fn: () => runSubstitutionCase("kv", "xz", { command }),
    });
    await t.step({
      name: "e2e filesystem/zstd with the installed arca",
      ignore: !HAVE_NIX,
      fn: () => runSubstitutionCase("filesystem", "zstd", { command }),
    });
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
});
