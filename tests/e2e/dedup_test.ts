/**
 * Deduplication end to end: a path imported twice is stored once, identical content
 * under another name costs no new chunks, and a 100 MiB path changed in 1 MiB
 * re-imports storing under 5 MB of new chunks.
 * @module
 */

import assert from "node:assert/strict";
import { arcaOk, makeArcaHome } from "../helpers/arca.ts";
import { HAVE_NIX } from "../helpers/nix.ts";
import { buildBigPath } from "./fixtures.ts";

interface Status {
  paths: number;
  narBytes: number;
  storedBytes: number;
  chunks: number;
  dedupRatio: number;
}

Deno.test({
  name: "e2e dedup: same path twice, same content renamed, and a 1 MiB change in 100 MiB",
  ignore: !HAVE_NIX,
  async fn() {
    const home = await makeArcaHome();
    const env = home.env;
    const global = ["--cache-dir", home.cacheDir];
    const status = async (): Promise<Status> =>
      JSON.parse(await arcaOk([...global, "status", "--json"], { env }));
    try {
      // Pseudo-random data: compression cannot hide what deduplication does not do.
      const v1 = await buildBigPath("arca-e2e-big", { sizeMiB: 100, seed: 1 });
      const renamed = await buildBigPath("arca-e2e-big-renamed", { sizeMiB: 100, seed: 1 });
      const v2 = await buildBigPath("arca-e2e-big-v2", { sizeMiB: 100, seed: 1, changedMiB: 50 });

      await arcaOk([...global, "import", v1], { env });
      const first = await status();
      assert.equal(first.paths, 1);
      assert.ok(first.storedBytes > 100e6, `random data stays ~100 MB: ${first.storedBytes}`);

      const again = await arcaOk([...global, "import", v1], { env });
      assert.match(again, /already cached/);
      assert.deepEqual(await status(), first);

      await arcaOk([...global, "import", renamed], { env });
      const afterRenamed = await status();
      assert.equal(afterRenamed.paths, 2);
      assert.ok(
        afterRenamed.storedBytes - first.storedBytes < 1e6,
        `same content under another name stores < 1 MB: ${
          afterRenamed.storedBytes - first.storedBytes
        }`,
      );

      await arcaOk([...global, "import", v2], { env });
      const afterV2 = await status();
      assert.equal(afterV2.paths, 3);
      const newBytes = afterV2.storedBytes - afterRenamed.storedBytes;
      assert.ok(newBytes < 5e6, `a 1 MiB change stores < 5 MB of new chunks, stored ${newBytes}`);
      assert.ok(newBytes > 1e6, `the changed MiB itself is stored: ${newBytes}`);
      assert.ok(afterV2.dedupRatio > 2.9, `three ~100 MB NARs in ~100 MB: ${afterV2.dedupRatio}`);
    } finally {
      await home.cleanup();
    }
  },
});
