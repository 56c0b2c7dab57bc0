/**
 * The import pipeline of cache.ts (`importNar`) end to end, without Nix: NARs
 * made in memory go through the Workers (hashing, lookup, compression, temporary files)
 * and the commit rounds (flush, link, flush) of chunk_store.ts. Checks what a crash-safe,
 * deduplicating import must leave: every chunk at its final name, no temporary file, a
 * manifest whose chunks rebuild the NAR and whose FileHash is that of the chunk files; and
 * that two processes importing the same chunks at once both succeed.
 * @module
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { Cache } from "../../src/cache/cache.ts";
import { ChunkCompressor, decompressChunk } from "../../src/cache/compression.ts";
import type { Manifest } from "../../src/cache/manifest.ts";
import { encodeNar, type NarTree } from "../../src/cache/nar.ts";
import { FormatError, IntegrityError } from "../../src/errors.ts";
import {
  fakeStorePath,
  hashPartOf,
  makeCacheFixture,
  pseudoRandomBytes,
} from "../helpers/cache_fixture.ts";

const REPO_ROOT = new URL("../../", import.meta.url);

function sha256(bytes: Uint8Array): Uint8Array {
  return new Uint8Array(createHash("sha256").update(bytes).digest());
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

/** A NAR of many chunks: random files, a block repeated many times, some text. */
function mixedTree(seed: number): NarTree {
  const block = pseudoRandomBytes(64 * 1024, seed + 100);
  const repeated = new Uint8Array(3 * 1024 * 1024);
  for (let at = 0; at < repeated.length; at += block.length) repeated.set(block, at);
  const text = new TextEncoder().encode(`line ${seed} of a text file\n`.repeat(60_000));
  return {
    type: "directory",
    entries: {
      "random": { type: "regular", contents: pseudoRandomBytes(3_000_000, seed) },
      "repeated": { type: "regular", contents: repeated },
      "text": { type: "regular", contents: text },
      "small": { type: "regular", executable: true, contents: new Uint8Array([1, 2, 3]) },
    },
  };
}

/** The NAR as a byte stream (dumpNar's kind) or a plain stream, in `piece`-byte pieces. */
function narStream(nar: Uint8Array, byteStream: boolean, piece = 100_000) {
  if (!byteStream) {
    const pieces: Uint8Array[] = [];
    for (let at = 0; at < nar.length; at += piece) pieces.push(nar.slice(at, at + piece));
    return ReadableStream.from(pieces);
  }
  let at = 0;
  return new ReadableStream({
    type: "bytes",
    pull(controller) {
      if (at >= nar.length) {
        controller.close();
        controller.byobRequest?.respond(0);
        return;
      }
      const chunk = nar.slice(at, at + piece);
      at += chunk.length;
      controller.enqueue(chunk);
    },
  }) as ReadableStream<Uint8Array>;
}

/** Every file under `dir`, relative to it. */
async function listFiles(dir: string, prefix = ""): Promise<string[]> {
  const out: string[] = [];
  try {
    for await (const entry of Deno.readDir(dir)) {
      const rel = prefix ? `${prefix}/${entry.name}` : entry.name;
      if (entry.isDirectory) out.push(...await listFiles(`${dir}/${entry.name}`, rel));
      else out.push(rel);
    }
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
  return out.sort();
}

/** Checks a manifest against the NAR and the chunk files; returns the distinct ids. */
async function checkStored(cache: Cache, manifest: Manifest, nar: Uint8Array) {
  const files: Uint8Array[] = [];
  const chunks: Uint8Array[] = [];
  for (const entry of manifest.chunks) {
    const file = await cache.chunks.read(entry.id, manifest.compression);
    assert.equal(file.length, entry.storedSize);
    const chunk = decompressChunk(file, manifest.compression);
    assert.equal(chunk.length, entry.size);
    assert.equal(createHash("sha256").update(chunk).digest("hex"), entry.id);
    files.push(file);
    chunks.push(chunk);
  }
  assert.deepEqual(concat(chunks), nar);
  const served = concat(files);
  assert.equal(manifest.fileSize, served.length);
  assert.deepEqual(manifest.fileHash, sha256(served));
  assert.deepEqual(manifest.narHash, sha256(nar));
  assert.equal(manifest.narSize, nar.length);
  const stored = await listFiles(cache.chunks.root);
  assert.deepEqual(stored.filter((f) => f.includes(".tmp-")), [], "no temporary files left");
  return new Set(manifest.chunks.map((c) => c.id));
}

for (const [compression, workers] of [["zstd", 2], ["zstd", 0], ["none", 2], ["xz", 2]] as const) {
  Deno.test(`import: ${compression}, ${workers} Workers: chunks, FileHash, dedup, no temporaries`, async () => {
    await using fixture = await makeCacheFixture({ prefix: "arca-import-" });
    const { cache } = fixture;
    using compressor = new ChunkCompressor({ compression, workers });
    const nar = encodeNar(xzSized(mixedTree(1), compression));
    const first = await cache.importNar(narStream(nar, true), {
      storePath: fakeStorePath("mixed-a"),
      references: [],
      sigs: [],
      narHash: `sha256:${createHash("sha256").update(nar).digest("hex")}`,
      narSize: nar.length,
    }, { compression, compressor });
    const manifest = (await cache.narOfPath(hashPartOf(fakeStorePath("mixed-a"))))!.manifest;
    const ids = await checkStored(cache, manifest, nar);
    assert.ok(manifest.chunks.length > ids.size, "the NAR repeats chunks");
    assert.equal(first.newChunks, ids.size);
    const sizes = new Map(manifest.chunks.map((c) => [c.id, c.storedSize]));
    assert.equal(first.newStoredBytes, [...sizes.values()].reduce((a, b) => a + b, 0));
    assert.equal((await cache.chunks.stats()).chunks, ids.size);

    // The same NAR again, from a plain stream: nothing new, the same served bytes.
    const second = await cache.importNar(narStream(nar, false), {
      storePath: fakeStorePath("mixed-b"),
      references: [],
      sigs: [],
    }, { compression, compressor });
    assert.equal(second.newChunks, 0);
    assert.equal(second.newStoredBytes, 0);
    assert.equal(second.record.narInfo.fileHash, first.record.narInfo.fileHash);
    assert.equal((await cache.chunks.stats()).chunks, ids.size);
  });
}

/** xz is slow: a smaller tree for it (still with a repeated block). */
function xzSized(tree: NarTree, compression: string): NarTree {
  if (compression !== "xz" || tree.type !== "directory") return tree;
  const contents = (name: string, size: number) => {
    const node = tree.entries[name] as { contents: Uint8Array };
    return { type: "regular" as const, contents: node.contents.slice(0, size) };
  };
  return {
    type: "directory",
    entries: { random: contents("random", 300_000), repeated: contents("repeated", 1 << 20) },
  };
}

Deno.test("import: a bad NAR or a wrong claimed hash records nothing and leaves no temporary file", async () => {
  await using fixture = await makeCacheFixture({ prefix: "arca-import-bad-" });
  const { cache } = fixture;
  const nar = encodeNar(mixedTree(2));
  const broken = nar.slice();
  broken[broken.length - 20] ^= 0xff; // inside the closing tokens
  const storePath = fakeStorePath("broken");
  await assert.rejects(
    cache.importNar(narStream(broken, true), { storePath, references: [], sigs: [] }, {
      compression: "zstd",
    }),
    FormatError,
  );
  await assert.rejects(
    cache.importNar(narStream(nar, true), {
      storePath,
      references: [],
      sigs: [],
      narHash: `sha256:${"0".repeat(64)}`,
    }, { compression: "zstd" }),
    IntegrityError,
  );
  assert.equal(await cache.getPath(hashPartOf(storePath)), null);
  const files = await listFiles(cache.chunks.root);
  assert.deepEqual(files.filter((f) => f.includes(".tmp-")), [], "no temporary files left");
});

Deno.test("import: two processes importing the same chunks at once both succeed", async () => {
  const dir = await Deno.makeTempDir({ prefix: "arca-import-race-" });
  try {
    const narPath = `${dir}/nar`;
    const nar = encodeNar(mixedTree(4));
    await Deno.writeFile(narPath, nar);
    const cacheUrl = new URL("src/cache/cache.ts", REPO_ROOT).href;
    const script = `
      import { Cache } from ${JSON.stringify(cacheUrl)};
      const [cacheDir, narPath, storePath, startAt] = Deno.args;
      const cache = await Cache.open(cacheDir, { backend: "kv" });
      const file = await Deno.open(narPath);
      // start together, so that the two writers really race
      await new Promise((resolve) => setTimeout(resolve, Number(startAt) - Date.now()));
      const result = await cache.importNar(file.readable, { storePath, references: [], sigs: [] },
        { compression: "zstd" });
      cache.close();
      console.log(JSON.stringify([result.record.narInfo.fileHash, result.newChunks]));
    `;
    const startAt = String(Date.now() + 2500);
    const run = (name: string) =>
      new Deno.Command(Deno.execPath(), {
        args: ["eval", "--quiet", script, `${dir}/cache`, narPath, fakeStorePath(name), startAt],
        cwd: REPO_ROOT,
        stdout: "piped",
        stderr: "piped",
      }).output();
    const outputs = await Promise.all([run("race-a"), run("race-b")]);
    const results = outputs.map((out) => {
      assert.ok(out.success, new TextDecoder().decode(out.stderr));
      return JSON.parse(new TextDecoder().decode(out.stdout)) as [string, number];
    });
    assert.equal(results[0][0], results[1][0], "the same FileHash");
    const cache = await Cache.open(`${dir}/cache`, { backend: "kv" });
    try {
      const manifest = (await cache.narOfPath(hashPartOf(fakeStorePath("race-a"))))!.manifest;
      const ids = await checkStored(cache, manifest, nar);
      assert.equal(results[0][1] + results[1][1], ids.size, "each chunk created once");
      assert.equal((await cache.chunks.stats()).chunks, ids.size);
      assert.ok(await cache.getPath(hashPartOf(fakeStorePath("race-b"))));
    } finally {
      cache.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
