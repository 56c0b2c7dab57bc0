/**
 * `arca serve` keeps in-process caches of what it reads; this end-to-end case checks, with
 * real processes and the real Nix as the client, that it still serves the cache as other
 * processes leave it: a narinfo asked for before `arca import` is found right after it
 * (no remembered 404), a path `arca gc` evicted is a 404 for its narinfo and its NAR right
 * after gc returns (never a narinfo whose NAR is gone), and a path imported again is
 * served and substituted again. Both metadata backends.
 * @module
 */

import assert from "node:assert/strict";
import { arcaOk, makeArcaHome, startServe } from "../helpers/arca.ts";
import { buildFixture, HAVE_NIX, nixEnv, pathInfo, runNix } from "../helpers/nix.ts";
import { formatNixHash, sha256 } from "../../src/cache/hash.ts";
import { parseNarInfo } from "../../src/cache/narinfo.ts";

for (const backend of ["kv", "filesystem"]) {
  Deno.test({
    name: `e2e ${backend}: serve sees imports and gc of other arca processes at once`,
    ignore: !HAVE_NIX,
    async fn() {
      const home = await makeArcaHome();
      const env = home.env;
      const global = ["--cache-dir", home.cacheDir, "--backend", backend];
      const path = await buildFixture(
        `arca-e2e-fresh-${backend}`,
        "mkdir $out; echo fresh > $out/README; seq 1 200000 > $out/numbers",
        { env: nixEnv() },
      );
      const hashPart = path.slice("/nix/store/".length, "/nix/store/".length + 32);
      // The cache directory exists before serve starts, as after a first import.
      await arcaOk([...global, "status"], { env });
      const server = await startServe(global, { env });
      const narinfoUrl = `${server.url}/${hashPart}.narinfo`;
      const get = async (url: string) => {
        const response = await fetch(url);
        return { status: response.status, body: new Uint8Array(await response.arrayBuffer()) };
      };
      const substitute = async (round: number) => {
        const store = `${home.dir}/store-${round}`;
        await runNix(
          "nix",
          ["copy", "--from", server.url, "--to", store, "--no-check-sigs", path],
          {
            env: nixEnv(),
          },
        );
        const [copied] = await pathInfo([path], { store, env: nixEnv() });
        const [source] = await pathInfo([path], { env: nixEnv() });
        assert.equal(copied.narHash, source.narHash);
      };
      try {
        // Asked before the import: 404, and not remembered.
        assert.equal((await get(narinfoUrl)).status, 404);
        await arcaOk([...global, "import", path], { env });
        const first = await get(narinfoUrl);
        assert.equal(first.status, 200);
        const info = parseNarInfo(first.body);
        const nar = await get(`${server.url}/${info.url}`);
        assert.equal(nar.status, 200);
        assert.equal(formatNixHash(sha256(nar.body)), info.fileHash);
        await substitute(1);

        // Evicted by `arca gc` in another process: gone at once, narinfo and NAR.
        const gc = await arcaOk([...global, "gc", "--max-age", "0s"], { env });
        assert.match(gc, /Evicted 1 paths/);
        assert.equal((await get(narinfoUrl)).status, 404);
        assert.equal((await get(`${server.url}/${info.url}`)).status, 404);

        // Imported again: served and substituted again.
        await arcaOk([...global, "import", path], { env });
        const again = await get(narinfoUrl);
        assert.equal(again.status, 200);
        assert.deepEqual(parseNarInfo(again.body), info);
        await substitute(2);
      } finally {
        await server.stop();
        await home.cleanup();
      }
    },
  });
}
