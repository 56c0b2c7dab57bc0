import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { join } from "node:path";
import { FormatError, NotFoundError } from "../../src/errors.ts";
import {
  ChunkBatchStorer,
  ChunkFileCommitter,
  ChunkStore,
  linkTemporaryFiles,
  syncFilesystem,
  validateChunkId,
} from "../../src/cache/chunk_store.ts";
import { compressChunk, decompressChunk, FOUND_NEW } from "../../src/cache/compression.ts";

const REPO_ROOT = new URL("../../", import.meta.url);

function sha256Hex(bytes: Uint8Array): string {
  return createHash("sha256").update(bytes).digest("hex");
}

function chunkData(n: number): Uint8Array {
  return new TextEncoder().encode(`chunk number ${n} `.repeat(50 + n));
}

async function withStore(fn: (store: ChunkStore, cacheDir: string) => Promise<void>) {
  const cacheDir = await Deno.makeTempDir({ prefix: "arca-chunk-store-" });
  try {
    await fn(new ChunkStore(cacheDir), cacheDir);
  } finally {
    await Deno.remove(cacheDir, { recursive: true });
  }
}

/** Every file under `dir`, relative to it. */
async function listFiles(dir: string, prefix = ""): Promise<string[]> {
  const out: string[] = [];
  try {
    for await (const entry of Deno.readDir(dir)) {
      const rel = prefix ? `${prefix}/${entry.name}` : entry.name;
      if (entry.isDirectory) out.push(...await listFiles(join(dir, entry.name), rel));
      else out.push(rel);
    }
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
  return out.sort();
}

Deno.test("chunk paths follow objects/chunks/<2 hex>/<id>.<ext>", () => {
  const store = new ChunkStore("/var/cache/arca");
  const id = "ab".repeat(32);
  assert.equal(store.root, "/var/cache/arca/objects/chunks");
  assert.equal(store.chunkPath(id, "zstd"), `/var/cache/arca/objects/chunks/ab/${id}.zst`);
  assert.equal(store.chunkPath(id, "xz"), `/var/cache/arca/objects/chunks/ab/${id}.xz`);
  assert.equal(store.chunkPath(id, "none"), `/var/cache/arca/objects/chunks/ab/${id}.raw`);
});

Deno.test("bad chunk ids are rejected before any file access", async () => {
  const store = new ChunkStore("/nonexistent-arca-dir");
  const bad = [
    "../x",
    "",
    "AB".repeat(32),
    "ab".repeat(31),
    "ab".repeat(33),
    "ab".repeat(31) + "a/",
    "../" + "a".repeat(61),
    "g".repeat(64),
    "a".repeat(64) + "\n",
    " " + "a".repeat(63),
  ];
  for (const id of bad) {
    assert.throws(() => validateChunkId(id), FormatError, JSON.stringify(id));
    assert.throws(() => store.chunkPath(id, "zstd"), FormatError);
    await assert.rejects(store.has(id, "zstd"), FormatError);
    await assert.rejects(store.put(id, new Uint8Array(1), "zstd"), FormatError);
    await assert.rejects(store.read(id, "zstd"), FormatError);
    await assert.rejects(store.openRead(id, "zstd"), FormatError);
    await assert.rejects(store.delete(id, "zstd"), FormatError);
  }
});

Deno.test("put, has, read, openRead, storedSize, stats, delete", async () => {
  await withStore(async (store) => {
    const data = chunkData(1);
    const id = sha256Hex(data);
    const frame = compressChunk(data, "zstd");

    assert.equal(await store.has(id, "zstd"), false);
    assert.equal(await store.storedSize(id, "zstd"), null);
    assert.deepEqual(await store.stats(), { chunks: 0, storedBytes: 0 });
    await assert.rejects(store.read(id, "zstd"), NotFoundError);
    await assert.rejects(store.openRead(id, "zstd"), NotFoundError);

    assert.equal(await store.put(id, frame, "zstd"), true);
    assert.equal(await store.has(id, "zstd"), true);
    assert.equal(await store.has(id, "xz"), false, "other compressions are other files");
    assert.equal(await store.storedSize(id, "zstd"), frame.length);
    assert.deepEqual(await store.read(id, "zstd"), frame);
    assert.deepEqual(decompressChunk(await store.read(id, "zstd"), "zstd"), data);

    const file = await store.openRead(id, "zstd");
    try {
      const buffer = new Uint8Array(frame.length + 10);
      let got = 0;
      for (;;) {
        const n = await file.read(buffer.subarray(got));
        if (n === null) break;
        got += n;
      }
      assert.deepEqual(buffer.subarray(0, got), frame);
    } finally {
      file.close();
    }

    // dedup: a second put writes nothing
    assert.equal(await store.put(id, frame, "zstd"), false);
    const raw = chunkData(2);
    const rawId = sha256Hex(raw);
    assert.equal(await store.put(rawId, raw, "none"), true);
    assert.equal(await store.put(id, compressChunk(data, "xz"), "xz"), true);
    const stats = await store.stats();
    assert.equal(stats.chunks, 3);
    assert.equal(
      stats.storedBytes,
      frame.length + raw.length + (await store.storedSize(id, "xz"))!,
    );
    const entries = [];
    for await (const entry of store.entries()) entries.push(entry);
    assert.deepEqual(
      entries.map((e) => `${e.id}.${e.compression}`).sort(),
      [`${id}.xz`, `${id}.zstd`, `${rawId}.none`].sort(),
    );

    assert.equal(await store.delete(id, "zstd"), true);
    assert.equal(await store.delete(id, "zstd"), false);
    assert.equal(await store.has(id, "zstd"), false);
    assert.equal((await store.stats()).chunks, 2);
  });
});

Deno.test("an empty chunk and a chunk written in pieces round-trip", async () => {
  await withStore(async (store) => {
    const id = sha256Hex(new Uint8Array(0));
    assert.equal(await store.put(id, new Uint8Array(0), "none"), true);
    assert.deepEqual(await store.read(id, "none"), new Uint8Array(0));
    const big = new Uint8Array(3 << 20).map((_, i) => i * 31);
    const bigId = sha256Hex(big);
    assert.equal(await store.put(bigId, big, "none"), true);
    assert.deepEqual(await store.read(bigId, "none"), big);
  });
});

Deno.test("temporary files are ignored by readers and cleaned when old", async () => {
  await withStore(async (store) => {
    const data = chunkData(3);
    const id = sha256Hex(data);
    await store.put(id, data, "none");
    const other = sha256Hex(chunkData(4));
    const stale = `${store.chunkPath(other, "zstd")}.tmp-deadbeef`;
    await Deno.mkdir(join(store.root, other.slice(0, 2)), { recursive: true });
    await Deno.writeFile(stale, new Uint8Array(100));
    const oldTime = new Date(Date.now() - 2 * 3600_000);
    await Deno.utime(stale, oldTime, oldTime);
    const fresh = `${store.chunkPath(other, "none")}.tmp-cafe`;
    await Deno.writeFile(fresh, new Uint8Array(10));
    // strays that are not chunk files are ignored too
    await Deno.writeFile(join(store.root, other.slice(0, 2), "README"), new Uint8Array(5));
    await Deno.writeFile(join(store.root, other.slice(0, 2), `${id}.zst`), new Uint8Array(5));

    assert.equal(await store.has(other, "zstd"), false);
    assert.deepEqual(await store.stats(), { chunks: 1, storedBytes: data.length });
    assert.equal(await store.cleanTemporaryFiles(3600_000), 1);
    assert.equal(await store.cleanTemporaryFiles(3600_000), 0);
    const left = await listFiles(store.root);
    assert.ok(left.some((f) => f.endsWith(".tmp-cafe")), "the fresh temporary file stays");
    assert.ok(!left.some((f) => f.endsWith(".tmp-deadbeef")));
    assert.equal(await store.cleanTemporaryFiles(0), 1);
  });
});

Deno.test("stats and cleaning of a store that does not exist yet", async () => {
  await withStore(async (store) => {
    assert.deepEqual(await store.stats(), { chunks: 0, storedBytes: 0 });
    assert.equal(await store.cleanTemporaryFiles(0), 0);
    assert.equal(await store.delete("0".repeat(64), "zstd"), false);
  });
});

Deno.test("concurrent puts of the same id in one process: both succeed, one file", async () => {
  await withStore(async (store) => {
    const data = chunkData(5);
    const id = sha256Hex(data);
    const frame = compressChunk(data, "zstd");
    const results = await Promise.all([1, 2, 3, 4].map(() => store.put(id, frame, "zstd")));
    assert.equal(results.filter((created) => created).length, 1);
    assert.deepEqual(await listFiles(store.root), [`${id.slice(0, 2)}/${id}.zst`]);
    assert.deepEqual(await store.read(id, "zstd"), frame);
  });
});

Deno.test("concurrent puts of the same ids from two processes: both succeed, one file each", async () => {
  await withStore(async (store, cacheDir) => {
    const count = 150;
    const storeUrl = new URL("../../src/cache/chunk_store.ts", import.meta.url).href;
    const script = `
      import { ChunkStore } from ${JSON.stringify(storeUrl)};
      import { createHash } from "node:crypto";
      const store = new ChunkStore(Deno.args[0]);
      // start together, so that the two writers really race
      await new Promise((resolve) => setTimeout(resolve, Number(Deno.args[1]) - Date.now()));
      let created = 0;
      for (let n = 0; n < ${count}; n++) {
        const data = new TextEncoder().encode(("shared chunk " + n + " ").repeat(500));
        const id = createHash("sha256").update(data).digest("hex");
        if (await store.put(id, data, "none")) created++;
      }
      console.log(created);
    `;
    const startAt = String(Date.now() + 1500);
    const run = () =>
      new Deno.Command(Deno.execPath(), {
        args: ["eval", "--quiet", script, cacheDir, startAt],
        cwd: REPO_ROOT,
        stdout: "piped",
        stderr: "piped",
      }).output();
    const outputs = await Promise.all([run(), run()]);
    let created = 0;
    for (const out of outputs) {
      assert.ok(out.success, new TextDecoder().decode(out.stderr));
      created += Number(new TextDecoder().decode(out.stdout).trim());
    }
    assert.equal(created, count, "each chunk was created by exactly one process");
    const files = await listFiles(store.root);
    assert.equal(files.length, count);
    assert.ok(files.every((f) => /^[0-9a-f]{2}\/[0-9a-f]{64}\.raw$/.test(f)), "no temporaries");
    for (let n = 0; n < count; n += 37) {
      const data = new TextEncoder().encode(`shared chunk ${n} `.repeat(500));
      assert.deepEqual(await store.read(sha256Hex(data), "none"), data);
    }
  });
});

/** Chunks back to back in one buffer, and their lengths. */
function batchOf(chunks: Uint8Array[]): { data: Uint8Array; lengths: Uint32Array } {
  const data = new Uint8Array(chunks.reduce((sum, c) => sum + c.length, 0));
  let offset = 0;
  for (const chunk of chunks) {
    data.set(chunk, offset);
    offset += chunk.length;
  }
  return { data, lengths: Uint32Array.from(chunks, (c) => c.length) };
}

/** The frames of a stored batch, one per chunk. */
function framesOf(stored: { frames: ArrayBuffer; frameLengths: ArrayBuffer }): Uint8Array[] {
  const lengths = new Uint32Array(stored.frameLengths);
  const frames: Uint8Array[] = [];
  let offset = 0;
  for (const length of lengths) {
    frames.push(new Uint8Array(stored.frames, offset, length));
    offset += length;
  }
  return frames;
}

Deno.test("ChunkBatchStorer: ids, stored chunks reused from the first root that has them, new ones as temporary files", async () => {
  await withStore(async (store, cacheDir) => {
    const staging = new ChunkStore(join(cacheDir, "staging"));
    const [a, b, c, d] = [1, 2, 3, 4].map(chunkData);
    const ids = [a, b, c, d].map(sha256Hex);
    await store.put(ids[0], compressChunk(a, "zstd"), "zstd");
    await staging.put(ids[1], compressChunk(b, "zstd"), "zstd");
    const storer = new ChunkBatchStorer("zstd");
    const target = { lookIn: [store.root, staging.root], writeTo: staging.root, tmpSuffix: "s1" };
    const { data, lengths } = batchOf([a, b, c, d, c]);
    const stored = storer.store(data, lengths, target);
    assert.equal(stored.ids, [...ids, ids[2]].join(""));
    assert.deepEqual([...new Uint8Array(stored.found)], [0, 1, FOUND_NEW, FOUND_NEW, FOUND_NEW]);
    const frames = framesOf(stored);
    assert.deepEqual(frames.map((f) => decompressChunk(f, "zstd")), [a, b, c, d, c]);
    assert.deepEqual(frames[0], await store.read(ids[0], "zstd"));
    assert.deepEqual(frames[4], frames[2], "a repeated chunk has the bytes of its file");
    // new chunks are temporary files in the staging store, once each
    const files = await listFiles(staging.root);
    assert.deepEqual(
      files,
      [
        `${ids[1].slice(0, 2)}/${ids[1]}.zst`,
        `${ids[2].slice(0, 2)}/${ids[2]}.zst.tmp-s1`,
        `${ids[3].slice(0, 2)}/${ids[3]}.zst.tmp-s1`,
      ].sort(),
    );
    assert.equal(await staging.has(ids[2], "zstd"), false, "not visible before its link");
    // a round links one meanwhile: the repeat is read from the final name
    linkTemporaryFiles([
      `${staging.chunkPath(ids[2], "zstd")}.tmp-s1`,
      staging.chunkPath(ids[2], "zstd"),
    ]);
    const next = batchOf([c, d]);
    const again = storer.store(next.data, next.lengths, target, stored.frames);
    assert.deepEqual([...new Uint8Array(again.found)], [1, FOUND_NEW]);
    assert.deepEqual(framesOf(again), [frames[2], frames[3]]);
    // a new import (another suffix) compresses nothing it can find
    const fresh = storer.store(next.data, next.lengths, { ...target, tmpSuffix: "s2" });
    assert.deepEqual([...new Uint8Array(fresh.found)], [1, FOUND_NEW]);
    assert.ok((await listFiles(staging.root)).some((f) => f.endsWith(".tmp-s2")));
  });
});

Deno.test("ChunkBatchStorer: raw and xz chunks, and a batch larger than its spare buffer", async () => {
  await withStore(async (store) => {
    for (const compression of ["none", "xz"] as const) {
      const chunks = [5, 6, 7].map(chunkData);
      const storer = new ChunkBatchStorer(compression);
      const { data, lengths } = batchOf(chunks);
      const stored = storer.store(data, lengths, {
        lookIn: [store.root],
        writeTo: store.root,
        tmpSuffix: compression,
      }, new ArrayBuffer(10));
      assert.deepEqual(framesOf(stored).map((f) => decompressChunk(f, compression)), chunks);
      const files = await listFiles(store.root);
      assert.equal(files.filter((f) => f.endsWith(`.tmp-${compression}`)).length, 3);
    }
  });
});

Deno.test("linkTemporaryFiles: creates final names once, removes the temporary ones", async () => {
  await withStore(async (store) => {
    const data = chunkData(8);
    const id = sha256Hex(data);
    const path = store.chunkPath(id, "none");
    await Deno.mkdir(join(store.root, id.slice(0, 2)), { recursive: true });
    await Deno.writeFile(`${path}.tmp-a`, data);
    await Deno.writeFile(`${path}.tmp-b`, data);
    const created = linkTemporaryFiles([`${path}.tmp-a`, path, `${path}.tmp-b`, path]);
    assert.deepEqual([...created], [1, 0]);
    assert.deepEqual(await listFiles(store.root), [`${id.slice(0, 2)}/${id}.raw`]);
    assert.deepEqual(await store.read(id, "none"), data);
  });
});

Deno.test("syncFilesystem flushes the filesystem of a path (syncfs on Linux)", async () => {
  const dir = await Deno.makeTempDir({ prefix: "arca-syncfs-" });
  try {
    const flushed = await syncFilesystem(dir);
    assert.equal(typeof flushed, "boolean");
    if (Deno.build.os === "linux") assert.equal(flushed, true);
    assert.equal(await syncFilesystem(join(dir, "missing")), false);
    if (Deno.build.os === "linux") assert.equal(await syncFilesystem(dir), true, "still works");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** Writes `count` temporary chunk files (raw) and returns [temporary, final, size] each. */
async function writeTemporaries(
  store: ChunkStore,
  count: number,
  suffix: string,
): Promise<[string, string, number][]> {
  const out: [string, string, number][] = [];
  for (let n = 0; n < count; n++) {
    const data = chunkData(100 + n);
    const id = sha256Hex(data);
    const path = store.chunkPath(id, "none");
    await Deno.mkdir(join(store.root, id.slice(0, 2)), { recursive: true });
    await Deno.writeFile(`${path}.tmp-${suffix}`, data);
    out.push([`${path}.tmp-${suffix}`, path, data.length]);
  }
  return out;
}

Deno.test("ChunkFileCommitter: a few files the fsync way, many in rounds; counts what it created", async () => {
  await withStore(async (store) => {
    const noFlush = { flush: () => Promise.resolve(false) };
    const cases = [
      [3, {}],
      [40, { roundBytes: 2000 }],
      [40, {}],
      [40, { ...noFlush, roundBytes: 2000 }], // no syncfs: fsync file by file, in rounds
      [40, noFlush],
    ] as const;
    for (const [count, options] of cases) {
      const files = await writeTemporaries(store, count, `c${count}${Object.keys(options)}`);
      // one of them exists already (another importer linked it first)
      await Deno.link(files[0][0], files[0][1]).catch(() => {});
      const committer = new ChunkFileCommitter(store.root, options);
      for (const [temporary, path, size] of files) {
        committer.add(temporary, path, size);
        committer.add(temporary, path, size); // reported twice: counted once
      }
      for (const [temporary, path, size] of files.slice(0, 5)) {
        committer.add(temporary, path, size); // and again later, maybe after its link
      }
      const { created, createdBytes } = await committer.commit();
      const expected = files.slice(1).filter(([, path]) => path !== files[0][1]);
      assert.equal(created, expected.length);
      assert.equal(createdBytes, expected.reduce((sum, [, , size]) => sum + size, 0));
      assert.equal(committer.pending, 0);
      const left = await listFiles(store.root);
      assert.ok(!left.some((f) => f.includes(".tmp-")), "no temporary files left");
      for (const [, path] of files) await Deno.lstat(path);
      for (const [, path] of files) await Deno.remove(path); // the next case uses the same ids
    }
  });
});

Deno.test("ChunkFileCommitter: abort removes the files not linked yet", async () => {
  await withStore(async (store) => {
    const files = await writeTemporaries(store, 5, "abort");
    const committer = new ChunkFileCommitter(store.root);
    for (const [temporary, path, size] of files) committer.add(temporary, path, size);
    await committer.abort();
    assert.deepEqual(await listFiles(store.root), []);
  });
});
