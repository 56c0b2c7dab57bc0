/**
 * The read side of the cache that `arca serve` uses: `findNar`, `narOfPath`,
 * `missingChunks`, `openStoredNar` and `openNar`. Served bytes are exactly the chunk files
 * in manifest order (whole and by ranges), a damaged chunk errors the stream instead of
 * ending it early, cached manifests follow their files (deleted, replaced), and paths that
 * another Cache object on the same directory adds or garbage-collects are found or gone at
 * once. Both metadata backends.
 * @module
 */

import assert from "node:assert/strict";
import { collectGarbage } from "../../src/cache/gc.ts";
import { formatNixHash, parseNixHash, sha256 } from "../../src/cache/hash.ts";
import { Cache, PIECE_BYTES } from "../../src/cache/cache.ts";
import { IntegrityError, NotFoundError } from "../../src/errors.ts";
import type { MetadataBackend } from "../../src/cache/metadata.ts";
import type { NarTree } from "../../src/cache/nar.ts";
import {
  fakeStorePath,
  importFixture,
  makeCacheFixture,
  pseudoRandomBytes,
  sampleTree,
} from "../helpers/cache_fixture.ts";

const BACKENDS: MetadataBackend[] = ["kv", "filesystem"];

function bigTree(seed: number): NarTree {
  return {
    type: "directory",
    entries: {
      "data": { type: "regular", contents: pseudoRandomBytes(3 * 1024 * 1024 + 777, seed) },
    },
  };
}

async function collect(stream: ReadableStream<Uint8Array>): Promise<Uint8Array[]> {
  const pieces: Uint8Array[] = [];
  for await (const piece of stream) pieces.push(piece);
  return pieces;
}

function concat(pieces: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(pieces.reduce((sum, p) => sum + p.length, 0));
  let offset = 0;
  for (const piece of pieces) {
    out.set(piece, offset);
    offset += piece.length;
  }
  return out;
}

async function streamError(stream: ReadableStream<Uint8Array>): Promise<unknown> {
  try {
    await collect(stream);
  } catch (error) {
    return error;
  }
  return undefined;
}

for (const backend of BACKENDS) {
  Deno.test(`${backend} cache serving: stored NAR bytes, whole and by ranges`, async () => {
    await using fx = await makeCacheFixture({ backend });
    const big = await importFixture(fx.cache, bigTree(3), { storePath: fakeStorePath("big") });
    const found = await fx.cache.findNar(big.result.record.narInfo.fileHash!);
    assert.ok(found);
    const { manifest } = found;
    assert.ok(manifest.chunks.length > 20, `only ${manifest.chunks.length} chunks`);

    const files = await Promise.all(
      manifest.chunks.map((c) => fx.cache.chunks.read(c.id, manifest.compression)),
    );
    const expected = concat(files);
    const pieces = await collect(fx.cache.openStoredNar(manifest));
    assert.ok(pieces.length < manifest.chunks.length, "chunks are sent in larger pieces");
    // Every piece but the last is full (chunk files are split across pieces).
    pieces.slice(0, -1).forEach((piece) => assert.equal(piece.length, PIECE_BYTES));
    const whole = concat(pieces);
    assert.deepEqual(whole, expected);
    assert.equal(whole.length, manifest.fileSize);
    assert.equal(formatNixHash(sha256(whole)), big.result.record.narInfo.fileHash);

    // Ranges: inside one chunk, across boundaries, the first and last byte, the tail.
    const size = whole.length;
    const first = manifest.chunks[0].storedSize;
    const ranges: [number, number][] = [
      [0, 1],
      [size - 1, size],
      [0, size],
      [3, first - 3],
      [first - 5, first + 5],
      [first, first + manifest.chunks[1].storedSize],
      [first + 1, size - 1],
      [Math.floor(size / 3), Math.floor((2 * size) / 3)],
    ];
    for (const [start, end] of ranges) {
      const got = concat(
        await collect(fx.cache.openStoredNar(manifest, { range: { start, end } })),
      );
      assert.deepEqual(got, whole.subarray(start, end), `range ${start}-${end}`);
    }

    // openNar gives the NAR itself.
    assert.deepEqual(concat(await collect(fx.cache.openNar(manifest))), big.nar);
  });

  Deno.test(`${backend} cache serving: a damaged chunk errors the stream, never ends it early`, async () => {
    await using fx = await makeCacheFixture({ backend });
    const big = await importFixture(fx.cache, bigTree(4), { storePath: fakeStorePath("big") });
    const { manifest } = (await fx.cache.narOfPath(big.hashPart))!;
    const victim = manifest.chunks[manifest.chunks.length - 2];
    const path = fx.cache.chunks.chunkPath(victim.id, manifest.compression);
    const original = await Deno.readFile(path);

    // Longer than the manifest says.
    await Deno.writeFile(path, new Uint8Array([...original, 0]));
    assert.deepEqual(await fx.cache.missingChunks(manifest), [victim.id]);
    assert.ok((await streamError(fx.cache.openStoredNar(manifest))) instanceof IntegrityError);
    assert.ok((await streamError(fx.cache.openNar(manifest))) instanceof IntegrityError);

    // Shorter.
    await Deno.writeFile(path, original.subarray(0, original.length - 1));
    assert.deepEqual(await fx.cache.missingChunks(manifest), [victim.id]);
    assert.ok((await streamError(fx.cache.openStoredNar(manifest))) instanceof IntegrityError);

    // Missing.
    await Deno.remove(path);
    assert.deepEqual(await fx.cache.missingChunks(manifest), [victim.id]);
    assert.ok((await streamError(fx.cache.openStoredNar(manifest))) instanceof NotFoundError);

    // A symlink to a file of the right size is not a chunk file.
    const elsewhere = `${fx.dir}/elsewhere`;
    await Deno.writeFile(elsewhere, original);
    await Deno.symlink(elsewhere, path);
    assert.deepEqual(await fx.cache.missingChunks(manifest), [victim.id]);

    await Deno.remove(path);
    await Deno.writeFile(path, original);
    assert.deepEqual(await fx.cache.missingChunks(manifest), []);
    const whole = concat(await collect(fx.cache.openStoredNar(manifest)));
    assert.equal(formatNixHash(sha256(whole)), big.result.record.narInfo.fileHash);
  });

  Deno.test(`${backend} cache serving: cached manifests follow their files`, async () => {
    await using fx = await makeCacheFixture({ backend });
    const small = await importFixture(fx.cache, sampleTree(), {
      storePath: fakeStorePath("small"),
    });
    const fileHash = small.result.record.narInfo.fileHash!;
    const first = (await fx.cache.narOfPath(small.hashPart))!;
    assert.equal(formatNixHash(first.manifest.narHash), small.result.record.narInfo.narHash);
    assert.ok(Object.isFrozen(first.manifest) && Object.isFrozen(first.manifest.chunks));

    // Replaced (a manifest is written by rename): the new content is read.
    const otherNarHash = sha256(new TextEncoder().encode("another"));
    await fx.cache.manifests.write({ ...first.manifest, narHash: otherNarHash });
    const replaced = await fx.cache.findNar(fileHash);
    assert.deepEqual(replaced?.manifest.narHash, otherNarHash);

    // Deleted: no NAR, though the record is there.
    await fx.cache.manifests.delete(parseNixHash(fileHash));
    assert.equal(await fx.cache.narOfPath(small.hashPart), null);
    assert.equal(await fx.cache.findNar(fileHash), null);

    await fx.cache.manifests.write(first.manifest);
    assert.deepEqual((await fx.cache.findNar(fileHash))?.manifest, first.manifest);
  });

  Deno.test(`${backend} cache serving: another Cache's imports and garbage collection are seen at once`, async () => {
    await using fx = await makeCacheFixture({ backend });
    const other = await Cache.open(fx.dir, { backend });
    try {
      const storePath = fakeStorePath("shared");
      const hashPart = storePath.slice(11, 43);
      assert.equal(await fx.cache.narOfPath(hashPart), null);

      const imported = await importFixture(other, bigTree(5), { storePath });
      const fileHash = imported.result.record.narInfo.fileHash!;
      const found = await fx.cache.findNar(fileHash);
      assert.equal(found?.record.narInfo.storePath, storePath);
      assert.deepEqual(await fx.cache.missingChunks(found!.manifest), []);
      assert.ok(await fx.cache.narOfPath(hashPart));

      // Collected by the other Cache (record, manifest and chunks).
      const report = await collectGarbage(other, { maxAgeMs: 0, now: Date.now() + 1000 });
      assert.equal(report.evicted.length, 1);
      assert.ok(report.deletedChunks > 0);
      assert.equal(await fx.cache.getPath(hashPart), null);
      assert.equal(await fx.cache.findNar(fileHash), null);
      assert.equal(await fx.cache.narOfPath(hashPart), null);
      // A manifest obtained before the collection no longer passes the check.
      assert.ok((await fx.cache.missingChunks(found!.manifest)).length > 0);

      // And imported again.
      await importFixture(other, bigTree(5), { storePath });
      const again = await fx.cache.findNar(fileHash);
      assert.ok(again);
      assert.deepEqual(await fx.cache.missingChunks(again.manifest), []);
      const whole = concat(await collect(fx.cache.openStoredNar(again.manifest)));
      assert.equal(formatNixHash(sha256(whole)), fileHash);
    } finally {
      other.close();
    }
  });

  Deno.test(`${backend} cache serving: findNar only returns a record with that FileHash`, async () => {
    await using fx = await makeCacheFixture({ backend });
    const small = await importFixture(fx.cache, sampleTree(), {
      storePath: fakeStorePath("small"),
    });
    const fileHash = small.result.record.narInfo.fileHash!;
    // Any spelling of the same SHA-256.
    const sri = `sha256-${btoa(String.fromCharCode(...parseNixHash(fileHash)))}`;
    assert.equal((await fx.cache.findNar(sri))?.record.narInfo.storePath, small.storePath);
    assert.equal(await fx.cache.findNar(formatNixHash(sha256(new Uint8Array([1])))), null);
  });
}
