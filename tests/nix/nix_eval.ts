/**
 * Helpers for the tests of flake.nix, nixos-module.nix and the systemd units: evaluating
 * Nix expressions with the real `nix-instantiate` (against tests/nix/lib-stub.nix, the
 * stand-in for nixpkgs), reading systemd's ExecStart quoting, rendering a NixOS service
 * definition as a unit file, and `systemd-analyze verify`.
 * @module
 */

import { REPO_ROOT } from "../helpers/arca.ts";
import { nixEnv, runNix } from "../helpers/nix.ts";

/** The stand-in for nixpkgs' lib, pkgs and module system. */
export const LIB_STUB = `${REPO_ROOT}tests/nix/lib-stub.nix`;

/** A Nix expression for the absolute path `path` (no path-literal quoting pitfalls). */
export function nixPath(path: string): string {
  return `(/. + ${JSON.stringify(path)})`;
}

/**
 * Evaluates `expr` with `nix-instantiate --eval --strict --json` and parses the result.
 * With `readWrite`, files made by builtins.toFile (the stand-in's scripts and config
 * templates) are written to the store, so tests can read and run them.
 */
export async function evalJson<T = unknown>(
  expr: string,
  options: { readWrite?: boolean } = {},
): Promise<T> {
  const args = [
    "--eval",
    "--strict",
    "--json",
    ...(options.readWrite ? ["--read-write-mode"] : []),
  ];
  const out = await runNix("nix-instantiate", [...args, "-E", expr]);
  return JSON.parse(out) as T;
}

/** Runs `nix-instantiate --parse <file>`; throws with Nix's message when it fails. */
export async function parseNixFile(path: string): Promise<void> {
  await runNix("nix-instantiate", ["--parse", path], { env: nixEnv() });
}

/**
 * The arguments of an ExecStart line written by NixOS' utils.escapeSystemdExecArgs: each
 * a JSON string with `%` and `$` doubled.
 */
export function parseExecArgs(line: string): string[] {
  const args: string[] = [];
  const token = /"(?:[^"\\]|\\.)*"/y;
  let at = 0;
  while (at < line.length) {
    token.lastIndex = at;
    const match = token.exec(line);
    if (!match) throw new Error(`Cannot read ExecStart at ${at}: ${line}`);
    args.push((JSON.parse(match[0]) as string).replaceAll("%%", "%").replaceAll("$$", "$"));
    at = token.lastIndex;
    if (at < line.length) {
      if (line[at] !== " ") throw new Error(`Cannot read ExecStart at ${at}: ${line}`);
      at++;
    }
  }
  return args;
}

/** The part of a NixOS `systemd.services.<name>` definition the module sets. */
export interface NixosService {
  description?: string;
  wantedBy?: string[];
  wants?: string[];
  after?: string[];
  path?: string[];
  environment?: Record<string, string>;
  serviceConfig: Record<string, string | number | boolean | string[]>;
}

function unitValue(value: string | number | boolean): string {
  return typeof value === "boolean" ? (value ? "true" : "false") : String(value);
}

/** The unit file NixOS writes for a service definition (the keys the module uses). */
export function renderUnit(service: NixosService): string {
  const lines = ["[Unit]"];
  if (service.description) lines.push(`Description=${service.description}`);
  for (const target of service.wants ?? []) lines.push(`Wants=${target}`);
  for (const target of service.after ?? []) lines.push(`After=${target}`);
  lines.push("", "[Service]");
  const environment = { ...service.environment };
  if (service.path?.length) {
    environment.PATH = service.path.map((dir) => `${dir}/bin`).join(":");
  }
  for (const [name, value] of Object.entries(environment)) {
    lines.push(`Environment=${JSON.stringify(`${name}=${value}`)}`);
  }
  for (const [key, value] of Object.entries(service.serviceConfig)) {
    for (const item of Array.isArray(value) ? value : [value]) {
      lines.push(`${key}=${unitValue(item)}`);
    }
  }
  lines.push("", "[Install]");
  for (const target of service.wantedBy ?? []) lines.push(`WantedBy=${target}`);
  return lines.join("\n") + "\n";
}

/** True when `systemd-analyze` runs here; CI (ARCA_REQUIRE_NIX=1) needs it (.ci/run installs it). */
export const HAVE_SYSTEMD_ANALYZE: boolean = (() => {
  try {
    return new Deno.Command("systemd-analyze", {
      args: ["--version"],
      stdout: "null",
      stderr: "null",
    }).outputSync().success;
  } catch {
    if (Deno.env.get("ARCA_REQUIRE_NIX") === "1") {
      throw new Error("systemd-analyze is required (ARCA_REQUIRE_NIX=1) but is not on PATH");
    }
    console.warn("SKIPPING systemd-analyze verify tests: `systemd-analyze` is not on PATH");
    return false;
  }
})();

/**
 * Runs `systemd-analyze verify` on `unitPath`; returns its exit code and everything it
 * printed (a unit it accepts without complaint gives code 0 and no output: unknown keys
 * and bad values are only warnings, so callers check the output too).
 */
export async function verifyUnit(unitPath: string): Promise<{ code: number; output: string }> {
  const out = await new Deno.Command("systemd-analyze", {
    args: ["verify", "--man=no", unitPath],
    env: { SYSTEMD_LOG_COLOR: "0", NO_COLOR: "1" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decoder = new TextDecoder();
  return {
    code: out.code,
    output: (decoder.decode(out.stdout) + decoder.decode(out.stderr)).trim(),
  };
}

/** Writes an executable `#!/bin/sh` stub at `path` (for units whose binary must exist). */
export async function writeStubExecutable(path: string): Promise<void> {
  await Deno.writeTextFile(path, "#!/bin/sh\nexit 0\n", { mode: 0o755 });
  await Deno.chmod(path, 0o755);
}
