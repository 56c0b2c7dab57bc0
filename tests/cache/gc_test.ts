/**
 * Garbage collection on a real cache directory: LRU order, closure consistency, the size
 * and age limits, dry runs, pins, and an import racing the collector.
 * @module
 */

import assert from "node:assert/strict";
import { collectGarbage } from "../../src/cache/gc.ts";
import { Pins } from "../../src/cache/pins.ts";
import { encodeNar } from "../../src/cache/nar.ts";
import {
  fakeStorePath,
  hashPartOf,
  importFixture,
  makeCacheFixture,
  pseudoRandomBytes,
} from "../helpers/cache_fixture.ts";
import type { Cache } from "../../src/cache/cache.ts";

const DAY = 86_400_000;

function randomFile(size: number, seed: number): Uint8Array {
  return encodeNar({ type: "regular", contents: pseudoRandomBytes(size, seed) });
}

/** Imports a path of `size` random bytes, referencing `references` (store paths). */
async function add(cache: Cache, name: string, size: number, references: string[] = []) {
  const storePath = fakeStorePath(name);
  const seed = [...name].reduce((h, c) => (h * 31 + c.charCodeAt(0)) >>> 0, size);
  await importFixture(cache, randomFile(size, seed), {
    storePath,
    references: references.map((path) => path.slice("/nix/store/".length)),
  });
  return storePath;
}

async function listed(cache: Cache): Promise<string[]> {
  const paths: string[] = [];
  for await (const record of cache.listPaths()) paths.push(record.narInfo.storePath);
  return paths.sort();
}

async function setLastUse(cache: Cache, storePath: string, time: number) {
  await cache.accessTimes.touch([hashPartOf(storePath)], time);
}

/** Every listed path's NAR is whole, and every reference of a listed path is listed. */
async function assertConsistent(cache: Cache) {
  const paths = new Set(await listed(cache));
  for await (const record of cache.listPaths()) {
    const nar = await cache.narOfPath(hashPartOf(record.narInfo.storePath));
    assert.ok(nar, `manifest of ${record.narInfo.storePath}`);
    assert.deepEqual(await cache.missingChunks(nar.manifest), [], record.narInfo.storePath);
    for (const ref of record.narInfo.references) {
      assert.ok(paths.has(`/nix/store/${ref}`), `${record.narInfo.storePath} keeps ${ref}`);
    }
  }
}

Deno.test("gc: --max-age evicts unused paths but never a reference of a kept path", async () => {
  await using fixture = await makeCacheFixture();
  const { cache } = fixture;
  const lib = await add(cache, "lib", 50_000);
  const oldApp = await add(cache, "old-app", 50_000, [lib]);
  const newApp = await add(cache, "new-app", 50_000, [lib]);
  const orphan = await add(cache, "orphan", 50_000);
  // Registration counts as a use: look from 40 days on, when only new-app was used again.
  const now = Date.now() + 40 * DAY;
  await setLastUse(cache, newApp, now - DAY);
  const report = await collectGarbage(cache, { maxAgeMs: 30 * DAY, now });
  assert.deepEqual(report.evicted.map((e) => e.storePath).sort(), [oldApp, orphan].sort());
  assert.deepEqual(await listed(cache), [lib, newApp].sort());
  await assertConsistent(cache);
  assert.ok(report.deletedChunks > 0 && report.freedBytes > 80_000, JSON.stringify(report));
  const stats = await cache.stats();
  assert.equal(stats.paths, 2);
});

Deno.test("gc: --max-size evicts least recently used roots first until under the limit", async () => {
  await using fixture = await makeCacheFixture({ backend: "filesystem" });
  const { cache } = fixture;
  const later = Date.now() + DAY;
  const base = await add(cache, "base", 200_000);
  const a = await add(cache, "a", 200_000, [base]);
  const b = await add(cache, "b", 200_000);
  const c = await add(cache, "c", 200_000);
  await setLastUse(cache, base, later + 1000); // oldest, but referenced by a: stays while a stays
  await setLastUse(cache, a, later + 2000);
  await setLastUse(cache, b, later + 3000);
  await setLastUse(cache, c, later + 4000);
  const before = (await cache.stats()).storedBytes;
  const limit = before - 300_000;
  const dry = await collectGarbage(cache, { maxSizeBytes: limit, dryRun: true });
  assert.deepEqual(await listed(cache), [a, b, base, c].sort(), "a dry run changes nothing");
  const report = await collectGarbage(cache, { maxSizeBytes: limit });
  assert.deepEqual(report.evicted.map((e) => e.storePath), dry.evicted.map((e) => e.storePath));
  // a goes first (oldest root), which frees nothing of base; then base, now a root.
  assert.deepEqual(report.evicted.map((e) => e.storePath), [a, base]);
  assert.deepEqual(await listed(cache), [b, c].sort());
  const after = await cache.stats();
  assert.ok(after.storedBytes <= limit, `${after.storedBytes} <= ${limit}`);
  assert.equal(after.storedBytes, report.liveBytes);
  assert.equal(dry.freedBytes, report.freedBytes);
  await assertConsistent(cache);
});

Deno.test("gc: kept paths (pins) and their closures are never evicted", async () => {
  await using fixture = await makeCacheFixture();
  const { cache } = fixture;
  const dep = await add(cache, "pinned-dep", 10_000);
  const top = await add(cache, "pinned-top", 10_000, [dep]);
  const other = await add(cache, "unpinned", 10_000);
  const report = await collectGarbage(cache, {
    maxSizeBytes: 0,
    keep: new Set([hashPartOf(top)]),
  });
  assert.deepEqual(report.evicted.map((e) => e.storePath), [other]);
  assert.deepEqual(await listed(cache), [dep, top].sort());
});

Deno.test("gc: an import racing the collector keeps every chunk it references", async () => {
  await using fixture = await makeCacheFixture();
  const { cache } = fixture;
  // The old path and the new one share most of their content (and so their chunks).
  const shared = pseudoRandomBytes(3_000_000, 42);
  const oldPath = fakeStorePath("racing-old");
  await importFixture(cache, encodeNar({ type: "regular", contents: shared }), {
    storePath: oldPath,
  });
  const newNar = encodeNar({
    type: "directory",
    entries: {
      data: { type: "regular", contents: shared },
      extra: { type: "regular", contents: pseudoRandomBytes(100_000, 7) },
    },
  });
  const newPath = fakeStorePath("racing-new");
  // Feed the new NAR slowly, so the collector runs while the import is in flight.
  let release!: () => void;
  const halfway = new Promise<void>((resolve) => (release = resolve));
  const pieces: Uint8Array[] = [];
  for (let at = 0; at < newNar.length; at += 256 * 1024) {
    pieces.push(newNar.subarray(at, at + 256 * 1024));
  }
  const half = Math.floor(pieces.length / 2);
  const slow = new ReadableStream<Uint8Array>({
    async pull(controller) {
      const piece = pieces.shift();
      if (!piece) return controller.close();
      controller.enqueue(piece);
      if (pieces.length === half) release();
      await new Promise((resolve) => setTimeout(resolve, 20));
    },
  });
  const importing = cache.importNar(slow, { storePath: newPath, references: [], sigs: [] }, {
    compression: "zstd",
  });
  await halfway;
  // From the future, everything the collector sees is too old: it evicts the old path.
  const report = await collectGarbage(cache, { maxAgeMs: DAY, now: Date.now() + 10 * DAY });
  await importing;
  assert.deepEqual(report.evicted.map((e) => e.storePath), [oldPath]);
  assert.deepEqual(await listed(cache), [newPath]);
  await assertConsistent(cache);
  // The NAR served is the NAR imported.
  const nar = await cache.narOfPath(hashPartOf(newPath));
  const bytes = new Uint8Array(await new Response(cache.openNar(nar!.manifest)).arrayBuffer());
  assert.deepEqual(bytes, newNar);
});

Deno.test("gc: a second run after an interrupted one finishes the sweep", async () => {
  await using fixture = await makeCacheFixture();
  const { cache } = fixture;
  const keep = await add(cache, "survivor", 30_000);
  const gone = await add(cache, "victim", 30_000);
  // Simulate a crash after phase 1: the narinfo is deleted, the sweep never ran.
  await cache.metadata.deletePath(hashPartOf(gone));
  const report = await collectGarbage(cache, { maxAgeMs: 365 * DAY });
  assert.equal(report.evicted.length, 0);
  assert.ok(report.deletedChunks > 0 && report.deletedManifests === 1, JSON.stringify(report));
  assert.deepEqual(await listed(cache), [keep]);
  await assertConsistent(cache);
  const stats = await cache.stats();
  assert.equal(stats.storedBytes, report.liveBytes);
});

Deno.test("gc: `arca pin` pins survive with their closures until unpinned", async () => {
  await using fixture = await makeCacheFixture();
  const { cache } = fixture;
  const pins = new Pins(cache.cacheDir);
  const dep = await add(cache, "pin-dep", 10_000);
  const top = await add(cache, "pin-top", 10_000, [dep]);
  const loose = await add(cache, "pin-loose", 10_000);
  assert.equal(await pins.add(hashPartOf(top)), true);
  assert.equal(await pins.add(hashPartOf(top)), false);
  const first = await collectGarbage(cache, { maxSizeBytes: 0 });
  assert.deepEqual(first.evicted.map((e) => e.storePath), [loose]);
  assert.deepEqual(await listed(cache), [dep, top].sort());
  assert.equal(await pins.remove(hashPartOf(top)), true);
  const second = await collectGarbage(cache, { maxSizeBytes: 0 });
  assert.deepEqual(second.evicted.map((e) => e.storePath), [top, dep]);
  assert.deepEqual(await listed(cache), []);
  assert.equal((await cache.stats()).chunks, 0);
});
