/**
 * Store-path fixtures for the end-to-end tests, built by the real Nix: a closure made by
 * `nix-build` (symlinks, executables, an empty file, an empty dir, a reference, a deriver)
 * and content-addressed paths made by `nix-store --add`, one of them ≥ 100 MB.
 * @module
 */

import { addToStore, runNix } from "../helpers/nix.ts";

/** The paths the end-to-end tests substitute. */
export interface Fixtures {
  /** Built: files, executables, symlinks (relative, absolute, dangling), empty file and dir. */
  dep: string;
  /** Built: references `dep`, has a deriver. */
  top: string;
  /** Content-addressed (nix-store --add), a few MiB over many chunks. */
  caSmall: string;
}

const CLOSURE_EXPR = `
let
  dep = derivation {
    name = "arca-e2e-dep";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" ''
      export PATH=/bin:/usr/bin
      mkdir -p $out/bin $out/share/empty-dir $out/nested/a/b/c
      echo hello > $out/share/greeting
      : > $out/share/empty-file
      printf '#!/bin/sh\\necho hi\\n' > $out/bin/hello
      chmod +x $out/bin/hello
      ln -s ../share/greeting $out/bin/relative-link
      ln -s /etc/passwd $out/share/absolute-link
      ln -s does-not-exist $out/share/dangling-link
      for n in B a a.b a-b ab 10 9; do echo $n > $out/nested/$n; done
      head -c 3000000 /dev/zero | tr '\\0' 'x' > $out/nested/a/b/c/big
    '' ];
  };
in derivation {
  name = "arca-e2e-top";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "export PATH=/bin:/usr/bin; mkdir $out; echo \${dep} > $out/dep-path; ln -s \${dep}/bin/hello $out/hello" ];
}`;

/** A deterministic pseudo-random byte generator (xorshift32), fast enough for 100 MB. */
export function pseudoRandomBytes(length: number, seed: number): Uint8Array {
  const words = new Uint32Array(Math.ceil(length / 4));
  let x = seed >>> 0 || 1;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    words[i] = x;
  }
  return new Uint8Array(words.buffer, 0, length);
}

/** Builds the small fixtures (idempotent: Nix reuses what exists). */
export async function buildFixtures(): Promise<Fixtures> {
  const top = (await runNix("nix-build", ["--no-out-link", "-E", CLOSURE_EXPR])).trim();
  const closure = (await runNix("nix-store", ["-qR", top])).trim().split("\n");
  const dep = closure.find((path) => path.endsWith("-arca-e2e-dep"))!;
  const dir = await Deno.makeTempDir({ prefix: "arca-ca-small-" });
  try {
    await Deno.mkdir(`${dir}/arca-e2e-ca-small/sub`, { recursive: true });
    await Deno.writeFile(`${dir}/arca-e2e-ca-small/random`, pseudoRandomBytes(3 << 20, 7));
    await Deno.writeTextFile(`${dir}/arca-e2e-ca-small/sub/text`, "text\n".repeat(100_000));
    const caSmall = await addToStore(`${dir}/arca-e2e-ca-small`);
    return { dep, top, caSmall };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/**
 * A content-addressed path holding `sizeMiB` MiB of pseudo-random data, optionally with
 * the MiB at `changedMiB` replaced (a "new version" sharing the rest).
 */
export async function buildBigPath(
  name: string,
  options: { sizeMiB: number; seed: number; changedMiB?: number },
): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix: "arca-big-" });
  try {
    await Deno.mkdir(`${dir}/${name}`);
    const bytes = pseudoRandomBytes(options.sizeMiB << 20, options.seed);
    if (options.changedMiB !== undefined) {
      bytes.set(pseudoRandomBytes(1 << 20, options.seed + 1000), options.changedMiB << 20);
    }
    await Deno.writeFile(`${dir}/${name}/data`, bytes);
    await Deno.writeTextFile(`${dir}/${name}/README`, `fixture ${name}\n`);
    return await addToStore(`${dir}/${name}`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}
