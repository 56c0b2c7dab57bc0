/**
 * Test helpers for running the real Nix as an oracle (DESIGN.md §5): a daemon-less
 * environment with a fresh XDG_CACHE_HOME per call site, fixture builders and
 * `nix path-info` queries.
 * @module
 */

/** True when `nix` is on PATH. CI (.ci/run) sets ARCA_REQUIRE_NIX=1 so a missing Nix fails. */
export const HAVE_NIX: boolean = (() => {
  try {
    const out = new Deno.Command("nix", { args: ["--version"], stdout: "null", stderr: "null" })
      .outputSync();
    return out.success;
  } catch {
    if (Deno.env.get("ARCA_REQUIRE_NIX") === "1") {
      throw new Error("Nix is required (ARCA_REQUIRE_NIX=1) but `nix` is not on PATH");
    }
    console.warn("SKIPPING Nix oracle tests: `nix` is not on PATH");
    return false;
  }
})();

/** The environment of DESIGN.md §5 with a fresh XDG_CACHE_HOME. */
export function nixEnv(extra: Record<string, string> = {}): Record<string, string> {
  const cacheHome = Deno.makeTempDirSync({ prefix: "arca-nix-xdg-" });
  return {
    NIX_REMOTE: "local",
    XDG_CACHE_HOME: cacheHome,
    NIX_CONFIG: [
      "experimental-features = nix-command",
      "build-users-group =",
      "sandbox = false",
      "substituters =",
    ].join("\n"),
    ...extra,
  };
}

/** Runs a Nix command; returns stdout as text, throws with stderr on failure. */
export async function runNix(
  cmd: string,
  args: string[],
  options: { env?: Record<string, string>; stdin?: Uint8Array } = {},
): Promise<string> {
  const child = new Deno.Command(cmd, {
    args,
    env: options.env ?? nixEnv(),
    stdin: options.stdin ? "piped" : "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  if (options.stdin) {
    const writer = child.stdin.getWriter();
    await writer.write(options.stdin);
    await writer.close();
  }
  const out = await child.output();
  if (!out.success) {
    throw new Error(
      `${cmd} ${args.join(" ")} failed (${out.code}): ${new TextDecoder().decode(out.stderr)}`,
    );
  }
  return new TextDecoder().decode(out.stdout);
}

/**
 * Builds a derivation whose builder is /bin/sh running `script` (with $out set).
 * Returns the output store path.
 */
export async function buildFixture(
  name: string,
  script: string,
  options: { env?: Record<string, string> } = {},
): Promise<string> {
  const expr = `derivation {
    name = ${JSON.stringify(name)};
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" ${JSON.stringify("export PATH=/bin:/usr/bin; " + script)} ];
  }`;
  const out = await runNix("nix-build", ["--no-out-link", "-E", expr], options);
  return out.trim().split("\n").at(-1)!;
}

/** `nix-store --add <dir>`: a content-addressed path. */
export async function addToStore(dir: string): Promise<string> {
  return (await runNix("nix-store", ["--add", dir])).trim();
}

/** One entry of `nix path-info --json`. */
export interface NixPathInfo {
  path: string;
  narHash: string;
  narSize: number;
  references: string[];
  deriver?: string;
  ca?: string;
  signatures?: string[];
}

/** `nix path-info --json` for the given paths, in an optional other store. */
export async function pathInfo(
  paths: string[],
  options: { store?: string; env?: Record<string, string> } = {},
): Promise<NixPathInfo[]> {
  const args = [
    "path-info",
    "--json",
    ...(options.store ? ["--store", options.store] : []),
    ...paths,
  ];
  return JSON.parse(await runNix("nix", args, options));
}

/** `nix-store --dump <path>` as bytes (for small fixtures only). */
export async function narDump(path: string): Promise<Uint8Array> {
  const out = await new Deno.Command("nix-store", {
    args: ["--dump", path],
    env: nixEnv(),
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!out.success) throw new Error(new TextDecoder().decode(out.stderr));
  return out.stdout;
}
