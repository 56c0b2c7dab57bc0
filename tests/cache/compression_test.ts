import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import zlib from "node:zlib";
import { FormatError, IntegrityError } from "../../src/errors.ts";
import {
  type ChunkCompression,
  ChunkCompressor,
  chunkFileExtension,
  compressChunk,
  compressZstdInto,
  decompressChunk,
  FOUND_NEW,
  narFileExtension,
  nixCompressionName,
  parseChunkCompression,
  zstdBound,
} from "../../src/cache/compression.ts";
import { StreamChunker } from "../../src/cache/chunker.ts";

const ALL: ChunkCompression[] = ["zstd", "xz", "none"];

function haveCommand(name: string): boolean {
  try {
    return new Deno.Command(name, { args: ["--version"], stdout: "null", stderr: "null" })
      .outputSync().success;
  } catch {
    console.warn(`SKIPPING ${name} CLI checks: \`${name}\` is not on PATH`);
    return false;
  }
}

const HAVE_ZSTD = haveCommand("zstd");
const HAVE_XZ = haveCommand("xz");

/** Runs a command with `input` on stdin; returns stdout, throws with stderr on failure. */
async function pipeThrough(cmd: string, args: string[], input: Uint8Array): Promise<Uint8Array> {
  const child = new Deno.Command(cmd, {
    args,
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const writer = child.stdin.getWriter();
  const writing = writer.write(input).then(() => writer.close());
  const [out] = await Promise.all([child.output(), writing]);
  if (!out.success) {
    throw new Error(`${cmd} ${args.join(" ")} failed: ${new TextDecoder().decode(out.stderr)}`);
  }
  return out.stdout;
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((sum, p) => sum + p.length, 0));
  let offset = 0;
  for (const p of parts) {
    out.set(p, offset);
    offset += p.length;
  }
  return out;
}

function rng(seed: number): () => number {
  let state = seed >>> 0 || 1;
  return () => {
    state ^= state << 13;
    state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5;
    state >>>= 0;
    return state / 2 ** 32;
  };
}

/** Half text-like, half random bytes. */
function sampleData(length: number, seed: number): Uint8Array {
  const next = rng(seed);
  const out = new Uint8Array(length);
  const text = new TextEncoder().encode("store path closure narinfo chunk lib bin share ");
  for (let i = 0; i < length; i++) {
    out[i] = i % 65536 < 32768 ? text[(i + ((next() * 3) | 0)) % text.length] : next() * 256;
  }
  return out;
}

/** Splits `data` into FastCDC chunks with small sizes (many chunks from little data). */
function chunksOf(data: Uint8Array): Uint8Array[] {
  const chunker = new StreamChunker({ minSize: 2048, avgSize: 8192, maxSize: 32768 });
  return [...chunker.push(data), ...chunker.finish()];
}

Deno.test("compression names, extensions and parsing", () => {
  assert.deepEqual(ALL.map(chunkFileExtension), ["zst", "xz", "raw"]);
  assert.deepEqual(ALL.map(narFileExtension), ["nar.zst", "nar.xz", "nar"]);
  assert.deepEqual(ALL.map(nixCompressionName), ["zstd", "xz", "none"]);
  assert.deepEqual(ALL.map(parseChunkCompression), ALL);
  for (const bad of ["", "zst", "ZSTD", "bzip2", "br", " xz", "raw"]) {
    assert.throws(() => parseChunkCompression(bad), FormatError);
  }
});

Deno.test("round trip of single chunks in every compression", () => {
  const samples = [
    new Uint8Array(0),
    new Uint8Array([42]),
    sampleData(100_000, 1),
    new Uint8Array(262_144),
  ];
  for (const compression of ALL) {
    for (const sample of samples) {
      const frame = compressChunk(sample, compression);
      assert.deepEqual(
        decompressChunk(frame, compression),
        sample,
        `${compression} ${sample.length}`,
      );
    }
  }
  const text = sampleData(200_000, 2);
  for (const level of [1, 19]) {
    assert.deepEqual(decompressChunk(compressChunk(text, "zstd", { level }), "zstd"), text);
  }
  assert.ok(compressChunk(text, "zstd", { level: 19 }).length < text.length);
  assert.ok(compressChunk(text, "xz").length < text.length);
});

Deno.test("every zstd chunk is exactly one frame, whatever its size and content", () => {
  // Deno's zstdCompressSync can append an empty second frame (seen at 16 KiB of random data)
  const next = rng(13);
  for (const size of [16_383, 16_384, 16_385, 32_768, 65_536, 100_000, 131_072, 262_144]) {
    const random = Uint8Array.from({ length: size }, () => next() * 256);
    for (const data of [random, new Uint8Array(size), sampleData(size, size)]) {
      assert.deepEqual(decompressChunk(compressChunk(data, "zstd"), "zstd"), data, `${size}`);
    }
  }
});

Deno.test("zstd chunks declare their content size", () => {
  const data = sampleData(70_000, 3);
  const frame = compressChunk(data, "zstd");
  const descriptor = frame[4];
  assert.notEqual(descriptor >> 6, 0, "frame content size flag is set");
  // FCS_Field_Size 4 for this size: after magic (4), descriptor (1), window descriptor (1)
  const singleSegment = (descriptor >> 5) & 1;
  const view = new DataView(frame.buffer, frame.byteOffset);
  assert.equal(view.getUint32(5 + (singleSegment ? 0 : 1), true), data.length);
});

Deno.test("compression levels are validated", () => {
  const data = new Uint8Array(10);
  assert.throws(() => compressChunk(data, "zstd", { level: 23 }), RangeError);
  assert.throws(() => compressChunk(data, "zstd", { level: 2.5 }), RangeError);
  assert.throws(() => compressChunk(data, "xz", { level: 9 }), RangeError);
  assert.ok(compressChunk(data, "xz", { level: 6 }).length > 0);
  assert.equal(compressChunk(data, "none", { level: 99 }), data);
});

for (
  const [compression, cli, have] of [["zstd", "zstd", HAVE_ZSTD], ["xz", "xz", HAVE_XZ]] as const
) {
  Deno.test({
    name: `concatenated ${compression} chunks decode with the ${cli} CLI to the whole`,
    ignore: !have,
    fn: async () => {
      const data = sampleData(600_000, 4);
      const chunks = chunksOf(data);
      assert.ok(chunks.length > 20);
      const file = concat(chunks.map((chunk) => compressChunk(chunk, compression)));
      assert.deepEqual(await pipeThrough(cli, ["-d", "-c"], file), data);
    },
  });

  Deno.test({
    name: `a chunk made by the ${cli} CLI decodes with decompressChunk`,
    ignore: !have,
    fn: async () => {
      const data = sampleData(50_000, 5);
      const args = cli === "zstd" ? ["-c", "-q", "--check"] : ["-c", "-q"];
      assert.deepEqual(decompressChunk(await pipeThrough(cli, args, data), compression), data);
    },
  });
}

Deno.test("decompressChunk rejects garbage", () => {
  const garbage = [
    new Uint8Array(0),
    new Uint8Array(3),
    new TextEncoder().encode("definitely not a compressed chunk at all"),
    crypto.getRandomValues(new Uint8Array(1000)),
  ];
  for (const compression of ["zstd", "xz"] as const) {
    for (const bytes of garbage) {
      assert.throws(() => decompressChunk(bytes, compression), FormatError, compression);
    }
    // the other format's frame
    const other = compressChunk(new Uint8Array(100), compression === "zstd" ? "xz" : "zstd");
    assert.throws(() => decompressChunk(other, compression), FormatError);
  }
});

Deno.test("decompressChunk rejects several frames, trailing data and truncation", () => {
  const a = sampleData(30_000, 6);
  const b = sampleData(30_000, 7);
  for (const compression of ["zstd", "xz"] as const) {
    const fa = compressChunk(a, compression);
    const fb = compressChunk(b, compression);
    assert.throws(() => decompressChunk(concat([fa, fb]), compression), FormatError);
    assert.throws(() => decompressChunk(concat([fa, new Uint8Array(4)]), compression), FormatError);
    assert.throws(
      () => decompressChunk(concat([fa, new Uint8Array([1])]), compression),
      FormatError,
    );
    assert.throws(() => decompressChunk(fa.subarray(0, fa.length - 1), compression));
    assert.throws(() => decompressChunk(fa.subarray(0, fa.length >> 1), compression));
  }
});

Deno.test("decompressChunk reports corrupt content as an integrity error", () => {
  const data = sampleData(80_000, 8);
  for (const compression of ["zstd", "xz"] as const) {
    const frame = compressChunk(data, compression);
    let integrity = 0;
    for (const position of [0.3, 0.5, 0.7]) {
      const bad = frame.slice();
      bad[Math.floor(frame.length * position)] ^= 0x55;
      try {
        const out = decompressChunk(bad, compression);
        // zstd without a checksum may decode a flipped literal: the chunk id catches that
        assert.notDeepEqual(out, data);
      } catch (error) {
        assert.ok(error instanceof IntegrityError || error instanceof FormatError, String(error));
        if (error instanceof IntegrityError) integrity++;
      }
    }
    if (compression === "xz") assert.ok(integrity > 0, "xz's CRC64 catches corruption");
  }
});

Deno.test("decompressChunk enforces maxSize before decoding", () => {
  const data = new Uint8Array(300_000);
  for (const compression of ALL) {
    const frame = compressChunk(data, compression);
    assert.throws(() => decompressChunk(frame, compression, { maxSize: 262_144 }), FormatError);
    assert.equal(decompressChunk(frame, compression, { maxSize: 300_000 }).length, 300_000);
  }
});

Deno.test("ChunkCompressor with Workers gives the same frames' content as compressChunk", async () => {
  const data = sampleData(3_000_000, 9);
  for (const compression of ["zstd", "none"] as const) {
    const compressor = new ChunkCompressor({ compression, workers: 2 });
    try {
      const chunks = chunksOf(data);
      const originals = chunks.map((chunk) => chunk.slice());
      const frames = await Promise.all(chunks.map((chunk) => compressor.compress(chunk)));
      assert.equal(compressor.pending, 0);
      frames.forEach((frame, i) => {
        assert.equal(frame.byteLength, frame.buffer.byteLength, "a frame owns its buffer");
        assert.deepEqual(frame, compressChunk(originals[i], compression));
        assert.deepEqual(decompressChunk(frame, compression), originals[i]);
      });
      // the inputs were copied, not detached
      assert.deepEqual(chunks, originals);
    } finally {
      compressor.close();
    }
  }
});

Deno.test("ChunkCompressor: xz on Workers, sequential use, a chunk larger than a batch", async () => {
  using compressor = new ChunkCompressor({ compression: "xz", workers: 1 });
  const small = sampleData(20_000, 10);
  assert.deepEqual(decompressChunk(await compressor.compress(small), "xz"), small);
  const big = sampleData(1_500_000, 11);
  const frame = await compressor.compress(big);
  assert.deepEqual(decompressChunk(frame, "xz"), big);
});

Deno.test("ChunkCompressor: workers 0 compresses in-thread", async () => {
  const compressor = new ChunkCompressor({ compression: "zstd", workers: 0, level: 5 });
  assert.equal(compressor.workers, 0);
  const data = sampleData(40_000, 12);
  const frame = await compressor.compress(data);
  assert.deepEqual(frame, compressChunk(data, "zstd", { level: 5 }));
  compressor.close();
  await assert.rejects(compressor.compress(data));
});

Deno.test("ChunkCompressor: close rejects pending chunks and later calls", async () => {
  const compressor = new ChunkCompressor({ compression: "zstd", workers: 2 });
  const pending = [1, 2, 3].map((seed) => compressor.compress(sampleData(500_000, seed)));
  compressor.close();
  for (const p of pending) await assert.rejects(p, /closed/);
  await assert.rejects(compressor.compress(new Uint8Array(1)), /closed/);
  compressor.close(); // idempotent
});

Deno.test("ChunkCompressor: invalid options are rejected", () => {
  assert.throws(() => new ChunkCompressor({ compression: "zstd", workers: -1 }), RangeError);
  assert.throws(() => new ChunkCompressor({ compression: "zstd", level: 40 }), RangeError);
  assert.throws(
    () => new ChunkCompressor({ compression: "gzip" as ChunkCompression }),
    FormatError,
  );
});

Deno.test("a process using ChunkCompressor exits by itself after close()", async () => {
  const url = new URL("../../src/cache/compression.ts", import.meta.url).href;
  const script = `
    import { ChunkCompressor } from ${JSON.stringify(url)};
    const compressor = new ChunkCompressor({ compression: "zstd", workers: 2 });
    const frames = await Promise.all(
      [1, 2, 3, 4].map((n) => compressor.compress(new Uint8Array(200000).fill(n))),
    );
    compressor.close();
    console.log(frames.length);
  `;
  const forgetful = `
    import { ChunkCompressor } from ${JSON.stringify(url)};
    const compressor = new ChunkCompressor({ compression: "zstd", idleTimeoutMs: 50 });
    await compressor.compress(new Uint8Array(1000));
    console.log(1); // no close(): idle Workers retire, then the process exits
  `;
  for (const [code, expected] of [[script, "4"], [forgetful, "1"]]) {
    const child = new Deno.Command(Deno.execPath(), {
      args: ["eval", "--quiet", code],
      cwd: new URL("../../", import.meta.url),
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    // a safety net only: a process kept alive by a Worker would never exit
    const timer = setTimeout(() => child.kill("SIGKILL"), 60_000);
    const out = await child.output();
    clearTimeout(timer);
    assert.ok(out.success, `exit ${out.code}: ${new TextDecoder().decode(out.stderr)}`);
    assert.equal(new TextDecoder().decode(out.stdout).trim(), expected);
  }
});

Deno.test("ChunkCompressor: Workers retired when idle are respawned on demand", async () => {
  using compressor = new ChunkCompressor({ compression: "zstd", workers: 1, idleTimeoutMs: 1 });
  for (let round = 0; round < 3; round++) {
    const data = sampleData(50_000, round);
    assert.deepEqual(decompressChunk(await compressor.compress(data), "zstd"), data);
    await new Promise((resolve) => setTimeout(resolve, 30));
  }
});

Deno.test("zstd chunks are byte for byte those of zstdCompressSync, in place or not", () => {
  const next = rng(21);
  const inputs = [
    new Uint8Array(0),
    new Uint8Array([1]),
    sampleData(16_384, 22),
    Uint8Array.from({ length: 70_000 }, () => next() * 256),
    new Uint8Array(262_144),
    sampleData(262_144, 23),
  ];
  for (const level of [1, 3, 9, 19]) {
    for (const input of inputs) {
      const reference = zlib.zstdCompressSync(input, {
        params: {
          [zlib.constants.ZSTD_c_compressionLevel]: level,
          [zlib.constants.ZSTD_c_contentSizeFlag]: 1,
          [zlib.constants.ZSTD_c_checksumFlag]: 0,
        },
        pledgedSrcSize: input.length,
        chunkSize: zstdBound(input.length),
      } as zlib.ZstdOptions);
      const frame = compressChunk(input, "zstd", { level });
      // zstdCompressSync may add an empty frame (9 bytes) that compressChunk drops
      assert.deepEqual(frame, new Uint8Array(reference.subarray(0, frame.length)));
      assert.ok(reference.length === frame.length || reference.length === frame.length + 9);
      const out = new Uint8Array(zstdBound(input.length) + 100).fill(0xee);
      const length = compressZstdInto(input, level, out, 100);
      assert.deepEqual(out.subarray(100, 100 + length), frame, `level ${level}, ${input.length}`);
      assert.ok(out.subarray(0, 100).every((b) => b === 0xee), "nothing written before offset");
    }
  }
});

/** Chunks of `data` back to back in one ArrayBuffer, and their lengths. */
function batchOf(chunks: Uint8Array[]): { data: ArrayBuffer; lengths: Uint32Array } {
  const data = concat(chunks);
  return { data: data.buffer as ArrayBuffer, lengths: Uint32Array.from(chunks, (c) => c.length) };
}

for (const workers of [2, 0]) {
  Deno.test(`ChunkCompressor.storeBatch and linkFiles with ${workers} Workers`, async () => {
    const root = await Deno.makeTempDir({ prefix: "arca-store-batch-" });
    using compressor = new ChunkCompressor({ compression: "zstd", workers });
    try {
      const text = sampleData(400_000, 31);
      const chunks = chunksOf(text);
      chunks.push(chunks[0], chunks[1]); // repeated within the batch
      const ids = chunks.map((c) => createHash("sha256").update(c).digest("hex"));
      const target = { lookIn: [root], writeTo: root, tmpSuffix: "t1" };
      const { data, lengths } = batchOf(chunks);
      const size = data.byteLength;
      const { batch, data: back } = await compressor.storeBatch(data, lengths, target);
      assert.equal(back.byteLength, size, "the batch buffer comes back for reuse");
      assert.equal(batch.ids, ids.join(""));
      const frameLengths = new Uint32Array(batch.frameLengths);
      const found = new Uint8Array(batch.found);
      assert.ok(found.every((f) => f === FOUND_NEW));
      let offset = 0;
      const pairs: string[] = [];
      for (let i = 0; i < chunks.length; i++) {
        const frame = new Uint8Array(batch.frames, offset, frameLengths[i]);
        offset += frameLengths[i];
        assert.deepEqual(decompressChunk(frame, "zstd"), chunks[i]);
        const path = `${root}/${ids[i].slice(0, 2)}/${ids[i]}.zst`;
        const temporary = `${path}.tmp-${batch.tmpSuffix}`;
        assert.ok(batch.tmpSuffix.startsWith("t1-"), batch.tmpSuffix);
        assert.deepEqual(await Deno.readFile(temporary), frame);
        if (!pairs.includes(temporary)) pairs.push(temporary, path);
      }
      const created = await compressor.linkFiles(pairs);
      assert.deepEqual([...created], pairs.filter((_, i) => i % 2 === 0).map(() => 1));
      // a second import finds them all
      const again = batchOf(chunks);
      const second = await compressor.storeBatch(again.data, again.lengths, {
        ...target,
        tmpSuffix: "t2",
      });
      assert.ok(new Uint8Array(second.batch.found).every((f) => f === 0));
      assert.deepEqual(
        new Uint8Array(second.batch.frames, 0, offset),
        new Uint8Array(batch.frames, 0, offset),
      );
      for await (const dir of Deno.readDir(root)) {
        for await (const file of Deno.readDir(`${root}/${dir.name}`)) {
          assert.ok(!file.name.includes(".tmp-"), `no temporary file left: ${file.name}`);
        }
      }
    } finally {
      await Deno.remove(root, { recursive: true });
    }
  });
}
