import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import {
  type ChunkerOptions,
  cutPoints,
  cutPointsV2016,
  DEFAULT_CHUNKER_OPTIONS,
  StreamChunker,
} from "../../src/cache/chunker.ts";

const VECTORS = new URL("../vectors/fastcdc/", import.meta.url);

interface VectorCase {
  variant: "v2016" | "v2020" | "ronomon";
  min: number;
  avg: number;
  max: number;
  normalization?: number;
  seed?: number;
  chunks: { offset: number; length: number }[];
}

interface Vectors {
  fixture: { size: number; sha256: string };
  cases: VectorCase[];
}

const vectors: Vectors = JSON.parse(await Deno.readTextFile(new URL("expected.json", VECTORS)));
const image = await Deno.readFile(new URL("SekienAkashita.jpg", VECTORS));

function optionsOf(c: VectorCase): ChunkerOptions {
  return {
    minSize: c.min,
    avgSize: c.avg,
    maxSize: c.max,
    normalization: c.normalization ?? 1,
    seed: BigInt(c.seed ?? 0),
  };
}

function expectedEnds(c: VectorCase): number[] {
  let offset = 0;
  return c.chunks.map((chunk) => {
    assert.equal(chunk.offset, offset, "vector chunks are contiguous");
    offset += chunk.length;
    return offset;
  });
}

/** Chunks by streaming `data` in pieces whose sizes come from `sizes()`. */
function streamEnds(
  data: Uint8Array,
  options: ChunkerOptions,
  sizes: () => number,
  webAssembly = true,
): number[] {
  const chunker = new StreamChunker(options, { webAssembly });
  const ends: number[] = [];
  let end = 0;
  const collect = (chunks: Uint8Array[]) => {
    for (const chunk of chunks) {
      assert.equal(chunk.byteOffset, 0);
      assert.equal(chunk.byteLength, chunk.buffer.byteLength, "a chunk owns its ArrayBuffer");
      assert.deepEqual(chunk, data.subarray(end, end + chunk.length));
      end += chunk.length;
      ends.push(end);
    }
  };
  let offset = 0;
  while (offset < data.length) {
    const size = Math.min(sizes(), data.length - offset);
    collect(chunker.push(data.subarray(offset, offset + size)));
    offset += size;
  }
  collect(chunker.finish());
  assert.equal(end, data.length);
  return ends;
}

/** Deterministic pseudo-random generator (xorshift32), so failures reproduce. */
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

function randomBytes(length: number, seed: number): Uint8Array {
  const next = rng(seed);
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i++) out[i] = (next() * 256) | 0;
  return out;
}

/** Text-like, random and repeated regions, like a NAR of mixed files. */
function mixedData(length: number, seed: number): Uint8Array {
  const next = rng(seed);
  const words = ["lib", "bin", "share", "the", "nix", "store", "path", "\n", "include", "a"];
  const out = new Uint8Array(length);
  const block = randomBytes(40_000, seed + 1);
  let offset = 0;
  while (offset < length) {
    const kind = (next() * 3) | 0;
    const size = Math.min(length - offset, 10_000 + ((next() * 300_000) | 0));
    if (kind === 0) {
      const text = new TextEncoder().encode(
        Array.from({ length: size }, () => words[(next() * words.length) | 0]).join(" "),
      );
      out.set(text.subarray(0, size), offset);
    } else if (kind === 1) {
      out.set(randomBytes(size, seed + offset), offset);
    } else {
      for (let i = 0; i < size; i += block.length) {
        out.set(block.subarray(0, Math.min(block.length, size - i)), offset + i);
      }
    }
    offset += size;
  }
  return out;
}

Deno.test("fixture image is the one the vectors were made from", () => {
  assert.equal(image.length, vectors.fixture.size);
  assert.equal(createHash("sha256").update(image).digest("hex"), vectors.fixture.sha256);
});

for (const c of vectors.cases) {
  if (c.variant === "ronomon") continue;
  const name = `${c.variant} cut points of fastcdc-rs: min ${c.min} avg ${c.avg} max ${c.max} ` +
    `normalization ${c.normalization ?? 1} seed ${c.seed ?? 0}`;
  Deno.test(name, () => {
    const options = optionsOf(c);
    if (c.variant === "v2016") {
      assert.deepEqual(cutPointsV2016(image, options), expectedEnds(c));
      return;
    }
    assert.deepEqual(cutPoints(image, options), expectedEnds(c));
    assert.deepEqual(streamEnds(image, options, () => image.length), expectedEnds(c));
    assert.deepEqual(streamEnds(image, options, () => 1), expectedEnds(c));
  });
}

Deno.test("every v2020 vector case is checked", () => {
  const v2020 = vectors.cases.filter((c) => c.variant === "v2020");
  assert.ok(v2020.length >= 6);
  assert.ok(v2020.some((c) => (c.seed ?? 0) !== 0), "a seeded case exists");
});

Deno.test("default options are 16/64/256 KiB", () => {
  assert.deepEqual(
    { ...DEFAULT_CHUNKER_OPTIONS },
    { minSize: 16384, avgSize: 65536, maxSize: 262144 },
  );
});

Deno.test("cutPoints: edge cases", () => {
  assert.deepEqual(cutPoints(new Uint8Array(0)), []);
  assert.deepEqual(cutPoints(new Uint8Array(1)), [1]);
  assert.deepEqual(cutPoints(new Uint8Array(16384)), [16384]);
  // all zeroes never match a mask: chunks of maxSize, then the rest
  assert.deepEqual(cutPoints(new Uint8Array(600_000)), [262144, 524288, 600_000]);
  assert.deepEqual(cutPoints(new Uint8Array(524288)), [262144, 524288]);
});

Deno.test("cutPoints: chunk sizes stay within min and max", () => {
  const data = mixedData(6_000_000, 7);
  const ends = cutPoints(data);
  let start = 0;
  ends.forEach((end, i) => {
    const size = end - start;
    assert.ok(size <= DEFAULT_CHUNKER_OPTIONS.maxSize, `chunk ${i} is ${size} bytes`);
    if (i < ends.length - 1) assert.ok(size >= DEFAULT_CHUNKER_OPTIONS.minSize);
    start = end;
  });
  assert.equal(start, data.length);
});

Deno.test("cutPoints: an insertion only moves the chunks around it", () => {
  const data = randomBytes(3_000_000, 11);
  const edited = new Uint8Array(data.length + 100);
  edited.set(data.subarray(0, 1_500_000));
  edited.set(randomBytes(100, 12), 1_500_000);
  edited.set(data.subarray(1_500_000), 1_500_100);
  const before = new Set(cutPoints(data).filter((end) => end > 1_800_000));
  const after = cutPoints(edited).filter((end) => end > 1_800_100).map((end) => end - 100);
  assert.ok(after.length > 5);
  assert.deepEqual(after.filter((end) => !before.has(end)), []);
});

Deno.test("StreamChunker: same cut points as cutPoints for random push sizes", () => {
  const data = mixedData(4_000_000, 3);
  const small: ChunkerOptions = { minSize: 2048, avgSize: 8192, maxSize: 32768 };
  for (const options of [DEFAULT_CHUNKER_OPTIONS, small]) {
    const expected = cutPoints(data, options);
    for (let seed = 1; seed <= 6; seed++) {
      const next = rng(seed * 7919);
      const maxPiece = [1, 100, 5000, 70_000, 300_000, 2_000_000][seed - 1];
      const ends = streamEnds(data, options, () => 1 + ((next() * maxPiece) | 0));
      assert.deepEqual(ends, expected, `seed ${seed}, pieces up to ${maxPiece} bytes`);
    }
  }
});

Deno.test("StreamChunker: zeroes, tiny and odd-sized inputs", () => {
  const odd: ChunkerOptions = { minSize: 1001, avgSize: 4000, maxSize: 12_345 };
  for (const data of [new Uint8Array(1_000_000), randomBytes(5, 1), randomBytes(20_001, 2)]) {
    for (const options of [DEFAULT_CHUNKER_OPTIONS, odd]) {
      const next = rng(data.length);
      assert.deepEqual(
        streamEnds(data, options, () => 1 + ((next() * 40_000) | 0)),
        cutPoints(data, options),
      );
    }
  }
  const empty = new StreamChunker();
  assert.deepEqual(empty.push(new Uint8Array(0)), []);
  assert.deepEqual(empty.finish(), []);
});

Deno.test("StreamChunker: chunks stay valid after further pushes and input reuse", () => {
  const data = randomBytes(1_000_000, 5);
  const chunker = new StreamChunker();
  const piece = new Uint8Array(50_000);
  const chunks: Uint8Array[] = [];
  for (let offset = 0; offset < data.length; offset += piece.length) {
    piece.set(data.subarray(offset, offset + piece.length));
    chunks.push(...chunker.push(piece));
    piece.fill(0xaa); // the caller reuses its buffer
  }
  chunks.push(...chunker.finish());
  let offset = 0;
  for (const chunk of chunks) {
    assert.deepEqual(chunk, data.subarray(offset, offset + chunk.length));
    offset += chunk.length;
  }
  assert.equal(offset, data.length);
  assert.ok(chunker.pending === 0);
  assert.throws(() => chunker.push(new Uint8Array(1)));
  assert.deepEqual(chunker.finish(), []);
});

Deno.test("StreamChunker: pending bytes stay below maxSize", () => {
  const chunker = new StreamChunker();
  const data = new Uint8Array(3_000_000); // zeroes: longest possible chunks
  for (let offset = 0; offset < data.length; offset += 100_000) {
    chunker.push(data.subarray(offset, offset + 100_000));
    assert.ok(chunker.pending < DEFAULT_CHUNKER_OPTIONS.maxSize);
  }
});

Deno.test("invalid chunker options are rejected", () => {
  const bad: ChunkerOptions[] = [
    { minSize: 10, avgSize: 65536, maxSize: 262144 },
    { minSize: 16384, avgSize: 100, maxSize: 262144 },
    { minSize: 16384, avgSize: 65536, maxSize: 32_000_000 },
    { minSize: 70000, avgSize: 65536, maxSize: 262144 },
    { minSize: 16384, avgSize: 65536, maxSize: 262144, normalization: 4 },
    { minSize: 1.5, avgSize: 65536, maxSize: 262144 },
  ];
  for (const options of bad) {
    assert.throws(() => cutPoints(new Uint8Array(10), options), RangeError);
    assert.throws(() => new StreamChunker(options), RangeError);
  }
});

Deno.test("StreamChunker: the JavaScript scan loop cuts where the WebAssembly one does", () => {
  const data = mixedData(3_000_000, 9);
  const small: ChunkerOptions = { minSize: 2048, avgSize: 8192, maxSize: 32768 };
  for (const options of [DEFAULT_CHUNKER_OPTIONS, small]) {
    const next = rng(77);
    assert.deepEqual(
      streamEnds(data, options, () => 1 + ((next() * 200_000) | 0), false),
      cutPoints(data, options),
    );
  }
});

Deno.test("StreamChunker: pushTo hands out views of the same chunks push copies", () => {
  const data = mixedData(2_500_000, 4);
  const copies = new StreamChunker();
  const views = new StreamChunker();
  const expected: Uint8Array[] = [];
  const seen: Uint8Array[] = [];
  for (let offset = 0; offset < data.length; offset += 333_333) {
    const piece = data.subarray(offset, offset + 333_333);
    expected.push(...copies.push(piece));
    views.pushTo(piece, (chunk) => {
      assert.ok(chunk.buffer !== piece.buffer, "a view of the chunker's buffer, not the input");
      seen.push(chunk.slice());
    });
  }
  expected.push(...copies.finish());
  views.finishTo((chunk) => seen.push(chunk.slice()));
  assert.deepEqual(seen, expected);
  assert.equal(seen.reduce((sum, c) => sum + c.length, 0), data.length);
  views.finishTo(() => assert.fail("finish twice emits nothing"));
});
