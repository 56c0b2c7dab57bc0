/**
 * Crash order (DESIGN.md §3): an import killed with SIGKILL part-way leaves no narinfo
 * visible — not in `list`, not to `serve` — and the next import of the path succeeds and
 * serves the right NAR to Nix.
 * @module
 */

import assert from "node:assert/strict";
import { arcaOk, makeArcaHome, REPO_ROOT, startServe } from "../helpers/arca.ts";
import { HAVE_NIX, pathInfo, runNix } from "../helpers/nix.ts";
import { buildBigPath } from "./fixtures.ts";

async function countFiles(dir: string): Promise<number> {
  let count = 0;
  try {
    for await (const entry of Deno.readDir(dir)) {
      count += entry.isDirectory ? await countFiles(`${dir}/${entry.name}`) : 1;
    }
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
  return count;
}

Deno.test({
  name: "e2e crash: an import killed part-way shows nothing, the next one completes",
  ignore: !HAVE_NIX,
  async fn() {
    const home = await makeArcaHome();
    const env = home.env;
    const global = ["--cache-dir", home.cacheDir];
    try {
      const path = await buildBigPath("arca-e2e-big", { sizeMiB: 100, seed: 1 });
      const hashPart = path.slice("/nix/store/".length, "/nix/store/".length + 32);
      const child = new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", "--quiet", `${REPO_ROOT}main.ts`, ...global, "import", path],
        env,
        stdout: "null",
        stderr: "null",
      }).spawn();
      // Kill it once some chunks are on disk, before it could finish (bounded wait).
      let killedEarly = false;
      for (let i = 0; i < 400; i++) {
        if (await countFiles(`${home.cacheDir}/objects/chunks`) >= 20) {
          child.kill("SIGKILL");
          killedEarly = true;
          break;
        }
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
      const status = await child.status;
      assert.ok(killedEarly && status.signal === "SIGKILL", "the import was killed part-way");

      assert.equal((await arcaOk([...global, "list"], { env })).trim(), "");
      const server = await startServe(global, { env });
      try {
        const response = await fetch(`${server.url}/${hashPart}.narinfo`);
        await response.body?.cancel();
        assert.equal(response.status, 404);

        await arcaOk([...global, "import", path], { env });
        assert.equal((await arcaOk([...global, "list"], { env })).trim(), path);
        const store2 = `${home.dir}/store2`;
        await runNix("nix", [
          "copy",
          "--no-check-sigs",
          "--from",
          server.url,
          "--to",
          store2,
          path,
        ]);
        const [copied] = await pathInfo([path], { store: store2 });
        const [source] = await pathInfo([path]);
        assert.equal(copied.narHash, source.narHash);
      } finally {
        await server.stop();
      }
    } finally {
      await home.cleanup();
    }
  },
});
