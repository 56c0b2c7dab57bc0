/**
 * `verify`: a clean cache passes; a chunk damaged on disk (same size, so only its content
 * tells) and a chunk deleted are found, with the paths whose NARs they break; `--repair`
 * removes those paths' narinfos and the damaged chunks, and leaves the rest serving.
 * @module
 */

import assert from "node:assert/strict";
import { encodeNar } from "../../src/cache/nar.ts";
import { verifyCache } from "../../src/cache/verify.ts";
import {
  fakeStorePath,
  type ImportedFixture,
  importFixture,
  makeCacheFixture,
  pseudoRandomBytes,
} from "../helpers/cache_fixture.ts";

Deno.test("verify: finds damaged and missing chunks and the paths they break; --repair removes them", async () => {
  for (const backend of ["kv", "filesystem"] as const) {
    await using fixture = await makeCacheFixture({ backend });
    const { cache } = fixture;
    const imported: ImportedFixture[] = [];
    for (const [i, size] of [300_000, 200_000, 100_000].entries()) {
      imported.push(
        await importFixture(
          cache,
          encodeNar({ type: "regular", contents: pseudoRandomBytes(size, i + 1) }),
          {
            storePath: fakeStorePath(`verify-${i}`),
          },
        ),
      );
    }
    const clean = await verifyCache(cache);
    assert.deepEqual([clean.badChunks, clean.badPaths], [[], []]);
    assert.equal(clean.pathsChecked, 3);

    // Damage one chunk of path 0 in place (same size) and delete one chunk of path 1.
    const damaged = (await cache.narOfPath(imported[0].hashPart))!.manifest.chunks[1];
    const file = cache.chunks.chunkPath(damaged.id, "zstd");
    const bytes = await Deno.readFile(file);
    bytes[bytes.length - 5] ^= 0xff;
    await Deno.writeFile(file, bytes);
    const deleted = (await cache.narOfPath(imported[1].hashPart))!.manifest.chunks[0];
    await cache.chunks.delete(deleted.id, "zstd");

    const report = await verifyCache(cache);
    assert.deepEqual(report.badChunks.map((c) => c.id), [damaged.id]);
    assert.deepEqual(
      report.badPaths.map((p) => p.storePath).sort(),
      [imported[0].storePath, imported[1].storePath].sort(),
    );
    assert.match(
      report.badPaths.find((p) => p.storePath === imported[1].storePath)!.reason,
      /missing/,
    );
    assert.ok(await cache.getPath(imported[0].hashPart), "without --repair nothing is removed");

    const repaired = await verifyCache(cache, { repair: true });
    assert.equal(repaired.repaired, true);
    assert.equal(await cache.getPath(imported[0].hashPart), null);
    assert.equal(await cache.getPath(imported[1].hashPart), null);
    assert.ok(await cache.getPath(imported[2].hashPart));
    const after = await verifyCache(cache);
    assert.deepEqual([after.badChunks, after.badPaths, after.pathsChecked], [[], [], 1]);
    // Re-importing the damaged content stores its chunk again, whole.
    await importFixture(cache, imported[0].nar, { storePath: imported[0].storePath });
    const reimported = await verifyCache(cache);
    assert.deepEqual([reimported.badPaths, reimported.pathsChecked], [[], 2]);
  }
});
