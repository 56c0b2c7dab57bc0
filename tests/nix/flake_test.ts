/**
 * flake.nix, evaluated by the real nix-instantiate with tests/nix/lib-stub.nix standing in
 * for nixpkgs (our machines cannot fetch it, so the build itself is not run here): its
 * outputs for both systems, the version from src/version.ts, the npm tarballs taken from
 * deno.lock, and, with the real Deno, that the npm cache the flake lays out and the flags
 * its wrapper passes are enough to run arca (and load the native xz addon) offline.
 * @module
 */

import assert from "node:assert/strict";
import { denoDir, REPO_ROOT } from "../helpers/arca.ts";
import { HAVE_NIX } from "../helpers/nix.ts";
import { VERSION } from "../../src/version.ts";
import { evalJson, LIB_STUB, nixPath } from "./nix_eval.ts";

interface NpmPackage {
  name: string;
  version: string;
  url: string;
  hash: string;
}

interface FlakeEval {
  description: string;
  nixpkgsUrl: string;
  systems: Record<string, string[]>;
  version: string;
  npm: Record<string, NpmPackage[]>;
  installPhase: string;
  cacheInstallPhase: string;
  meta: { mainProgram: string; platforms: string[] };
  apps: Record<string, { type: string; program: string }>;
  packagePaths: Record<string, string>;
  devShell: string[];
  overlay: string;
  moduleImports: string[];
  modulePackage: string;
}

const SYSTEMS = ["aarch64-linux", "x86_64-linux"];

function evalFlake(): Promise<FlakeEval> {
  return evalJson<FlakeEval>(`
    let
      stub = import ${nixPath(LIB_STUB)} { };
      flake = import ${nixPath(`${REPO_ROOT}flake.nix`)};
      self = flake.outputs { inherit self; nixpkgs = stub.nixpkgs; };
      pkg = system: self.packages.\${system}.default;
      x86 = stub.nixpkgs.legacyPackages.x86_64-linux;
      module = self.nixosModules.default { lib = stub.lib; pkgs = x86; };
    in {
      inherit (flake) description;
      nixpkgsUrl = flake.inputs.nixpkgs.url;
      systems = builtins.mapAttrs (_: builtins.attrNames) {
        inherit (self) packages apps devShells;
      };
      version = (pkg "x86_64-linux").version;
      npm = builtins.mapAttrs (_: p: p.default.denoNpmCache.packages) self.packages;
      inherit (pkg "x86_64-linux") installPhase meta;
      cacheInstallPhase = (pkg "x86_64-linux").denoNpmCache.installPhase;
      apps = builtins.mapAttrs (_: a: { inherit (a.default) type program; }) self.apps;
      packagePaths = builtins.mapAttrs (_: p: p.default.outPath) self.packages;
      devShell = map (p: p.name) self.devShells.x86_64-linux.default.packages;
      overlay = (self.overlays.default x86 x86).pares-arca.outPath;
      moduleImports = map toString module.imports;
      modulePackage = (stub.resolve module.config).services.pares-arca.package.outPath;
    }`);
}

/** The lockfile's npm entries by `name@version` (peer-dependency suffixes dropped). */
async function lockPackages(): Promise<Map<string, { integrity: string }>> {
  const lock = JSON.parse(await Deno.readTextFile(`${REPO_ROOT}deno.lock`));
  const byId = new Map<string, { integrity: string }>();
  for (const [key, meta] of Object.entries(lock.npm as Record<string, { integrity: string }>)) {
    byId.set(key.replace(/(.)_.*$/, "$1"), meta);
  }
  return byId;
}

Deno.test({
  name: "flake: outputs for x86_64-linux and aarch64-linux, version from src/version.ts",
  ignore: !HAVE_NIX,
  async fn() {
    const flake = await evalFlake();
    assert.match(flake.description, /pares-arca/);
    assert.match(flake.nixpkgsUrl, /^github:NixOS\/nixpkgs\//);
    assert.deepEqual(flake.systems, {
      packages: SYSTEMS,
      apps: SYSTEMS,
      devShells: SYSTEMS,
    });
    assert.equal(flake.version, VERSION);
    assert.equal(flake.meta.mainProgram, "arca");
    assert.deepEqual(flake.meta.platforms, ["x86_64-linux", "aarch64-linux"]);
    for (const system of SYSTEMS) {
      assert.equal(flake.apps[system].type, "app");
      assert.equal(flake.apps[system].program, `${flake.packagePaths[system]}/bin/arca`);
    }
    assert.deepEqual(flake.devShell, ["deno-2.9.6", "nix-2.8.0", "zstd-1.5.5", "xz-5.4.1"]);
    assert.equal(flake.overlay, flake.packagePaths["x86_64-linux"], "the overlay's pares-arca");
    assert.deepEqual(flake.moduleImports, [`${REPO_ROOT}nixos-module.nix`]);
    assert.equal(flake.modulePackage, flake.packagePaths["x86_64-linux"]);
    // The wrapper runs the store's source offline, with every permission, lockfile as is.
    assert.match(flake.installPhase, /--set DENO_DIR \/nix\/store\/\S+-pares-arca-deno-npm-cache-/);
    assert.match(
      flake.installPhase,
      /--add-flags "run --cached-only --frozen --allow-all --config \$out\/share\/pares-arca\/deno\.json \$out\/share\/pares-arca\/main\.ts"/,
    );
  },
});

Deno.test({
  name: "flake: npm tarballs are the lockfile's, by its integrity hashes, for each system's CPU",
  ignore: !HAVE_NIX,
  async fn() {
    const flake = await evalFlake();
    const lock = await lockPackages();
    for (const system of SYSTEMS) {
      const packages = flake.npm[system];
      const ids = packages.map((p) => `${p.name}@${p.version}`);
      assert.equal(new Set(ids).size, ids.length, "one entry per name@version");
      for (const p of packages) {
        const entry = lock.get(`${p.name}@${p.version}`);
        assert(entry, `${p.name}@${p.version} is in deno.lock`);
        assert.equal(p.hash, entry.integrity);
        const base = p.name.split("/").at(-1);
        assert.equal(p.url, `https://registry.npmjs.org/${p.name}/-/${base}-${p.version}.tgz`);
        if (system === "x86_64-linux") {
          const dir = `registry.npmjs.org/${p.name}/${p.version}`;
          assert(flake.cacheInstallPhase.includes(dir), `${p.name} is unpacked into the cache`);
        }
      }
      for (const name of ["commander", "smol-toml", "@napi-rs/lzma"]) {
        assert(packages.some((p) => p.name === name), `${system}: ${name}`);
      }
      const cpu = system === "x86_64-linux" ? "x64" : "arm64";
      const other = system === "x86_64-linux" ? "arm64" : "x64";
      for (const libc of ["gnu", "musl"]) {
        assert(
          ids.includes(`@napi-rs/lzma-linux-${cpu}-${libc}@1.5.3`),
          `${system}: ${libc} addon`,
        );
        assert(!ids.includes(`@napi-rs/lzma-linux-${other}-${libc}@1.5.3`));
      }
      for (const skipped of ["darwin", "win32", "android", "freebsd", "wasm32"]) {
        assert(!ids.some((id) => id.includes(`lzma-${skipped}`)), `${system}: no ${skipped}`);
      }
    }
  },
});

Deno.test({
  name:
    "flake: Deno runs arca offline from exactly the npm cache the flake lays out, with the wrapper's flags",
  ignore: !HAVE_NIX || !["x86_64", "aarch64"].includes(Deno.build.arch),
  async fn() {
    const flake = await evalFlake();
    const system = `${Deno.build.arch}-linux`;
    const dir = await Deno.makeTempDir({ prefix: "arca-flake-cache-" });
    try {
      // The flake's layout, filled from this machine's Deno cache: a package Deno needs and
      // the flake lacks makes the run below fail (--cached-only). Packages Deno never
      // unpacked here (not needed on this system) are skipped.
      const registry = `${denoDir()}/npm/registry.npmjs.org`;
      for (const p of flake.npm[system]) {
        const from = `${registry}/${p.name}/${p.version}`;
        const exists = await Deno.stat(from).then(() => true, () => false);
        if (!exists) continue;
        const to = `${dir}/deno/npm/registry.npmjs.org/${p.name}/${p.version}`;
        await Deno.mkdir(to, { recursive: true });
        const copied = await new Deno.Command("cp", { args: ["-R", `${from}/.`, to] }).output();
        assert(copied.success, `copy ${p.name}`);
      }
      const flags = /--add-flags "([^"]+)"/.exec(flake.installPhase)![1]
        .replaceAll("$out/share/pares-arca", REPO_ROOT.replace(/\/$/, ""))
        .split(" ");
      const env = {
        DENO_DIR: `${dir}/deno`,
        HOME: dir,
        PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin",
        NO_COLOR: "1",
      };
      const run = async (args: string[]) => {
        const out = await new Deno.Command(Deno.execPath(), {
          args,
          cwd: dir,
          env,
          clearEnv: true,
          stdout: "piped",
          stderr: "piped",
        }).output();
        const decoder = new TextDecoder();
        return { ...out, stdout: decoder.decode(out.stdout), stderr: decoder.decode(out.stderr) };
      };
      const version = await run([...flags, "--version"]);
      assert.equal(version.code, 0, version.stderr);
      assert.equal(version.stdout.trim(), VERSION);

      // The xz codec is a native Node-API addon, loaded on first use: it resolves too.
      const script = `${dir}/xz_check.ts`;
      await Deno.writeTextFile(
        script,
        `const { xz } = await import("@napi-rs/lzma");
        const packed = xz.compressSync(new TextEncoder().encode("arca"));
        console.log(new TextDecoder().decode(xz.decompressSync(packed)));`,
      );
      const withoutMain = flags.slice(0, -1);
      const xzRun = await run([...withoutMain, script]);
      assert.equal(xzRun.code, 0, xzRun.stderr);
      assert.equal(xzRun.stdout.trim(), "arca");
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
