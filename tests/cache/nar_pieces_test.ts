/**
 * src/cache/nar_pieces.ts: a stored NAR file read in pieces from its chunk files, by libc
 * and by Deno's API (which the `.nar` decompression path and a failed libc read use): any
 * range of any chunk, the end-of-file check, and reused pieces, which must carry the same
 * bytes to a consumer that is done with each piece before it takes the next few.
 * @module
 */

import assert from "node:assert/strict";
import { formatNixHash, sha256 } from "../../src/cache/hash.ts";
import {
  openNarPieces,
  PIECE_BYTES,
  PIECE_RING,
  readChunkRange,
} from "../../src/cache/nar_pieces.ts";
import { IntegrityError, NotFoundError } from "../../src/errors.ts";
import {
  fakeStorePath,
  importFixture,
  makeCacheFixture,
  pseudoRandomBytes,
} from "../helpers/cache_fixture.ts";
import type { Cache } from "../../src/cache/cache.ts";
import type { Manifest } from "../../src/cache/manifest.ts";

/** A NAR of about `mib` MiB of incompressible data, imported; its manifest and files. */
async function storedNar(cache: Cache, mib: number, seed: number) {
  const imported = await importFixture(cache, {
    type: "directory",
    entries: {
      data: { type: "regular", contents: pseudoRandomBytes(mib * 1024 * 1024 + 4321, seed) },
    },
  }, { storePath: fakeStorePath(`nar-${seed}`) });
  const { manifest } = (await cache.narOfPath(imported.hashPart))!;
  const encoder = new TextEncoder();
  const paths = manifest.chunks.map((c) => cache.chunks.chunkPath(c.id, manifest.compression));
  const files = { paths, cPaths: paths.map((p) => encoder.encode(`${p}\0`)) };
  const whole = new Uint8Array(manifest.fileSize);
  let offset = 0;
  for (const path of paths) {
    const bytes = await Deno.readFile(path);
    whole.set(bytes, offset);
    offset += bytes.length;
  }
  assert.equal(formatNixHash(sha256(whole)), imported.result.record.narInfo.fileHash);
  return { manifest, files, whole };
}

/** Reads a stream the way a socket does: each piece copied out before the next is asked. */
async function copyOut(stream: ReadableStream<Uint8Array>): Promise<Uint8Array> {
  const copies: Uint8Array[] = [];
  for await (const piece of stream) copies.push(piece.slice());
  const out = new Uint8Array(copies.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const copy of copies) {
    out.set(copy, at);
    at += copy.length;
  }
  return out;
}

function chunkRangeError(
  path: string,
  manifest: Manifest,
  index: number,
  cPath?: Uint8Array,
): unknown {
  const entry = manifest.chunks[index];
  try {
    readChunkRange(path, entry, new Uint8Array(entry.storedSize + 1), {
      from: 0,
      to: entry.storedSize,
      cPath,
    });
  } catch (error) {
    return error;
  }
  return undefined;
}

Deno.test("nar pieces: any range of a chunk file, by libc and by Deno's API", async () => {
  await using fx = await makeCacheFixture();
  const { manifest, files, whole } = await storedNar(fx.cache, 1, 1);
  let chunkStart = 0;
  for (let i = 0; i < Math.min(manifest.chunks.length, 4); i++) {
    const entry = manifest.chunks[i];
    const size = entry.storedSize;
    for (const [from, to] of [[0, size], [0, 1], [size - 1, size], [7, size - 7], [5, size]]) {
      for (const cPath of [files.cPaths[i], undefined]) {
        const target = new Uint8Array(to - from + 1).fill(0xee);
        readChunkRange(files.paths[i], entry, target, { from, to, cPath });
        assert.deepEqual(
          target.subarray(0, to - from),
          whole.subarray(chunkStart + from, chunkStart + to),
          `chunk ${i} [${from}, ${to}) ${cPath ? "libc" : "Deno"}`,
        );
        // A range that stops before the chunk's end writes nothing after it.
        if (to < size) assert.equal(target[to - from], 0xee);
      }
    }
    chunkStart += size;
  }
});

Deno.test("nar pieces: a chunk file longer, shorter or missing is an error, by either way", async () => {
  await using fx = await makeCacheFixture();
  const { manifest, files } = await storedNar(fx.cache, 1, 2);
  const path = files.paths[1];
  const original = await Deno.readFile(path);
  for (const cPath of [files.cPaths[1], undefined]) {
    await Deno.writeFile(path, new Uint8Array([...original, 0]));
    assert.ok(chunkRangeError(path, manifest, 1, cPath) instanceof IntegrityError);
    await Deno.writeFile(path, original.subarray(0, original.length - 1));
    assert.ok(chunkRangeError(path, manifest, 1, cPath) instanceof IntegrityError);
    await Deno.remove(path);
    assert.ok(chunkRangeError(path, manifest, 1, cPath) instanceof NotFoundError);
    await Deno.writeFile(path, original);
    assert.equal(chunkRangeError(path, manifest, 1, cPath), undefined);
  }
});

Deno.test("nar pieces: reused pieces carry the same bytes, whole and by ranges", async () => {
  await using fx = await makeCacheFixture();
  // More than PIECE_RING pieces, so that every buffer is written several times.
  const mib = Math.ceil((3 * PIECE_RING * PIECE_BYTES) / (1024 * 1024));
  const { manifest, files, whole } = await storedNar(fx.cache, mib, 3);
  assert.ok(manifest.fileSize > 3 * PIECE_RING * PIECE_BYTES);

  const pieces: Uint8Array[] = [];
  for await (const piece of openNarPieces(manifest, files, { reusePieces: true })) {
    pieces.push(piece);
  }
  // The ring: piece k + PIECE_RING is written into piece k's memory.
  assert.equal(pieces[0].buffer, pieces[PIECE_RING].buffer);
  assert.notEqual(pieces[0].buffer, pieces[1].buffer);
  const fresh: Uint8Array[] = [];
  for await (const piece of openNarPieces(manifest, files)) fresh.push(piece);
  assert.notEqual(fresh[0].buffer, fresh[PIECE_RING].buffer);

  assert.deepEqual(await copyOut(openNarPieces(manifest, files, { reusePieces: true })), whole);
  const size = manifest.fileSize;
  for (
    const [start, end] of [
      [1, size],
      [PIECE_BYTES - 1, size - 1],
      [Math.floor(size / 5), Math.floor(size / 2)],
    ]
  ) {
    const got = await copyOut(
      openNarPieces(manifest, files, { range: { start, end }, reusePieces: true }),
    );
    assert.deepEqual(got, whole.subarray(start, end), `range ${start}-${end}`);
  }
});

Deno.test("nar pieces: a stream errors at a damaged chunk and can be cancelled", async () => {
  await using fx = await makeCacheFixture();
  const { manifest, files } = await storedNar(fx.cache, 6, 4);
  const reader = openNarPieces(manifest, files, { reusePieces: true }).getReader();
  assert.equal((await reader.read()).value?.length, PIECE_BYTES);
  await reader.cancel();

  await Deno.remove(files.paths[manifest.chunks.length - 1]);
  await assert.rejects(
    () => copyOut(openNarPieces(manifest, files, { reusePieces: true })),
    NotFoundError,
  );
});
