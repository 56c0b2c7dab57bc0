/**
 * The end-to-end substitution case, run for every backend × compression by the
 * `substitute_*_test.ts` files: real `arca import`/`import-closure` and `arca serve`
 * processes, and the real `nix copy --from` as the client and oracle (DESIGN.md §5).
 * @module
 */

import assert from "node:assert/strict";
import { type ArcaCommand, arcaOk, makeArcaHome, startServe } from "../helpers/arca.ts";
import { HAVE_NIX, nixEnv, pathInfo, runNix } from "../helpers/nix.ts";
import { buildBigPath, buildFixtures } from "./fixtures.ts";
import { parseNarInfo } from "../../src/cache/narinfo.ts";
import { formatNixHash, sha256 } from "../../src/cache/hash.ts";

/** What a store path must keep when it goes through arca. */
function essentials(
  info: { narHash: string; narSize: number; references: string[]; deriver?: string; ca?: string },
) {
  return {
    narHash: info.narHash,
    narSize: info.narSize,
    references: [...info.references].sort(),
    deriver: info.deriver ?? null,
    ca: info.ca ?? null,
  };
}

/** Checks FileHash and FileSize of a served narinfo against the NAR body it points at. */
async function checkFileHash(url: string, storePath: string): Promise<void> {
  const hashPart = storePath.slice("/nix/store/".length, "/nix/store/".length + 32);
  const narInfo = parseNarInfo(await (await fetch(`${url}/${hashPart}.narinfo`)).text());
  const response = await fetch(`${url}/${narInfo.url}`);
  assert.equal(response.status, 200);
  const body = new Uint8Array(await response.arrayBuffer());
  assert.equal(Number(response.headers.get("content-length")), body.length);
  assert.equal(body.length, narInfo.fileSize, `FileSize of ${storePath}`);
  assert.equal(formatNixHash(sha256(body)), narInfo.fileHash, `FileHash of ${storePath}`);
}

/** Options of {@link runSubstitutionCase}. */
export interface SubstitutionCaseOptions {
  /** Also import a big path of this many MiB. */
  bigMiB?: number;
  /** How arca is started (default `deno run -A main.ts`; e.g. an installed `arca`). */
  command?: ArcaCommand;
}

/** Registers the substitution test for one backend and compression. */
export function substitutionSuite(
  backend: "kv" | "filesystem",
  compression: "zstd" | "xz",
  options: { bigMiB?: number } = {},
): void {
  Deno.test({
    name: `e2e ${backend}/${compression}: nix copy --from arca yields the source store's paths`,
    ignore: !HAVE_NIX,
    fn: () => runSubstitutionCase(backend, compression, options),
  });
}

/**
 * The substitution case for one backend and compression: arca imports fixtures and serves
 * them, `nix copy --from` substitutes them into another store, and the copies must equal
 * the source store's paths. Needs Nix.
 */
export async function runSubstitutionCase(
  backend: "kv" | "filesystem",
  compression: "zstd" | "xz",
  options: SubstitutionCaseOptions = {},
): Promise<void> {
  const home = await makeArcaHome();
  const env = home.env;
  const command = options.command;
  const global = ["--cache-dir", home.cacheDir, "--backend", backend];
  const keyName = `e2e-${backend}-${compression}-1`;
  const server = await startServe(global, { env, command });
  try {
    const keyLine = await arcaOk(["sign-keygen", "--name", keyName], { env, command });
    assert.match(keyLine, /^extra-trusted-public-keys = e2e-.*:[A-Za-z0-9+/]{43}=\n$/);
    const publicKey = (await Deno.readTextFile(`${home.configDir}/${keyName}.pub`)).trim();
    const secretPath = `${home.configDir}/${keyName}.secret`;

    const fixtures = await buildFixtures();
    const extra = [fixtures.caSmall];
    if (options.bigMiB) {
      extra.push(await buildBigPath("arca-e2e-big", { sizeMiB: options.bigMiB, seed: 1 }));
    }
    const importArgs = ["--compression", compression, "--signing-key", secretPath];
    // Imports run while `serve` is running on the same cache: two processes at once.
    const closureOut = await arcaOk(
      [...global, "import-closure", fixtures.top, ...importArgs],
      { env, command },
    );
    assert.match(closureOut, /2 imported, 0 already cached/);
    await arcaOk([...global, "import", ...extra, ...importArgs], { env, command });
    const again = await arcaOk([...global, "import", fixtures.top, ...importArgs], {
      env,
      command,
    });
    assert.match(again, /already cached/);

    const wanted = [fixtures.top, ...extra];
    const all = [fixtures.dep, ...wanted];
    const store2 = `${home.dir}/store2`;
    await runNix("nix", [
      "copy",
      "--from",
      server.url,
      "--to",
      store2,
      "--option",
      "trusted-public-keys",
      publicKey,
      ...wanted,
    ]);
    const source = await pathInfo(all);
    const copied = await pathInfo(all, { store: store2 });
    assert.deepEqual(copied.map(essentials), source.map(essentials));
    for (const info of copied) {
      assert(
        info.signatures?.some((sig) => sig.startsWith(`${keyName}:`)),
        `signed: ${info.path}`,
      );
    }
    // The copy's contents are right where it matters to users: run the program.
    const hello = await new Deno.Command(`${store2}${fixtures.dep}/bin/hello`).output().catch(
      () => null,
    );
    if (hello) assert.equal(new TextDecoder().decode(hello.stdout), "hi\n");

    for (const path of all) await checkFileHash(server.url, path);

    // With another key trusted, Nix refuses the path (an input-addressed one: Nix
    // accepts content-addressed paths without signatures, as it can check them).
    const otherSecret = await runNix("nix", [
      "key",
      "generate-secret",
      "--key-name",
      "other-1",
    ]);
    const otherPublic = (await runNix("nix", ["key", "convert-secret-to-public"], {
      stdin: new TextEncoder().encode(otherSecret),
    })).trim();
    const refused = await new Deno.Command("nix", {
      args: [
        "copy",
        "--from",
        server.url,
        "--to",
        `${home.dir}/store3`,
        "--option",
        "trusted-public-keys",
        otherPublic,
        fixtures.dep,
      ],
      env: nixEnv(),
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert(!refused.success, "nix copy must fail when no trusted key signed the path");
    assert.match(new TextDecoder().decode(refused.stderr), /lacks a valid signature/);
  } finally {
    await server.stop();
    await home.cleanup();
  }
}
