/**
 * Tests of the streaming upload decompressors against the real `zstd`, `xz` and `bzip2` CLIs
 * and `nix copy --to file://…?compression=…` as oracles: random input piece sizes,
 * concatenated frames/streams, truncation, flipped bytes, trailing data, backpressure and
 * bounded memory.
 * @module
 */

import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import zlib from "node:zlib";
import { FormatError, IntegrityError } from "../../src/errors.ts";
import {
  decompressStream,
  parseUploadCompression,
  type UploadCompression,
} from "../../src/cache/decompress_stream.ts";
import { buildFixture, HAVE_NIX, narDump, nixEnv, runNix } from "../helpers/nix.ts";

const MiB = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Helpers

/** mulberry32: a small seeded PRNG, so failures reproduce. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function randomBytes(n: number, seed: number): Uint8Array {
  const words = new Uint32Array(Math.ceil(n / 4));
  let x = seed | 1;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x;
  }
  return new Uint8Array(words.buffer, 0, n);
}

/** Alternating 256 KiB runs of text lines and random bytes. */
function mixedData(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  const encoder = new TextEncoder();
  const random = randomBytes(Math.min(n, 256 * 1024), seed);
  let line = seed;
  for (let p = 0, run = 0; p < n; run++) {
    const end = Math.min(n, p + 256 * 1024);
    if (run % 2 === 1) {
      out.set(random.subarray(0, end - p), p);
      p = end;
      continue;
    }
    while (p < end) {
      const text = encoder.encode(`line ${line++}: ${"the quick brown fox ".repeat(line % 5)}\n`);
      const take = Math.min(text.length, end - p);
      out.set(text.subarray(0, take), p);
      p += take;
    }
  }
  return out;
}

function concat(...parts: Uint8Array[]): Uint8Array {
  return new Uint8Array(Buffer.concat(parts));
}

function sameBytes(actual: Uint8Array, expected: Uint8Array, what: string): void {
  if (actual.length !== expected.length) {
    assert.fail(`${what}: got ${actual.length} bytes, expected ${expected.length}`);
  }
  if (!Buffer.from(actual.buffer, actual.byteOffset, actual.length).equals(expected)) {
    let i = 0;
    while (actual[i] === expected[i]) i++;
    assert.fail(`${what}: bytes differ from offset ${i}`);
  }
}

/** Runs a CLI with `input` on stdin; returns its stdout. */
async function cli(cmd: string, args: string[], input: Uint8Array): Promise<Uint8Array> {
  const child = new Deno.Command(cmd, {
    args,
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const writing = (async () => {
    const writer = child.stdin.getWriter();
    await writer.write(input);
    await writer.close();
  })();
  const [out] = await Promise.all([child.output(), writing]);
  if (!out.success) {
    throw new Error(`${cmd} ${args.join(" ")}: ${new TextDecoder().decode(out.stderr)}`);
  }
  return out.stdout;
}

/** Splits `data` into pieces of log-uniform random sizes between 1 byte and 1 MiB. */
function randomPieces(data: Uint8Array, seed: number): Uint8Array[] {
  const random = prng(seed);
  const pieces: Uint8Array[] = [];
  for (let p = 0; p < data.length;) {
    const size = Math.max(1, Math.floor(Math.exp(random() * Math.log(MiB))));
    pieces.push(data.subarray(p, p + size));
    p += size;
  }
  return pieces;
}

/** Rejects if `promise` has not settled after a minute: a hang, reported instead of waited on. */
async function noHang<T>(promise: Promise<T>, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const hang = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no result after 60 s (hang)`)), 60_000);
  });
  try {
    return await Promise.race([promise, hang]);
  } finally {
    clearTimeout(timer);
  }
}

/** Decodes `data` fed in random pieces; returns the whole output. */
function decode(
  compression: UploadCompression,
  data: Uint8Array,
  options: { seed?: number; maxOutputBytes?: number } = {},
): Promise<Uint8Array> {
  const pieces = randomPieces(data, options.seed ?? data.length);
  const source = ReadableStream.from(pieces);
  const output = source.pipeThrough(
    decompressStream(compression, { maxOutputBytes: options.maxOutputBytes }),
  );
  return noHang(
    (async () => {
      const parts: Uint8Array[] = [];
      for await (const part of output) {
        assert.ok(part instanceof Uint8Array);
        parts.push(part);
      }
      return concat(...parts);
    })(),
    `${compression} decode of ${data.length} bytes`,
  );
}

/** Decoding `data` must fail with a FormatError or IntegrityError; returns it. */
async function decodeFails(
  compression: UploadCompression,
  data: Uint8Array,
  what: string,
  seed?: number,
): Promise<Error> {
  try {
    const out = await decode(compression, data, { seed });
    assert.fail(`${what}: decoded to ${out.length} bytes instead of failing`);
  } catch (error) {
    if (error instanceof FormatError || error instanceof IntegrityError) {
      assert.match(error.message, new RegExp(`^Cannot decompress ${compression} stream: `));
      return error;
    }
    throw error;
  }
}

/** A zstd skippable frame (magic 0x184D2A5X) carrying `payload`. */
function skippableFrame(payload: Uint8Array, nibble = 0xa): Uint8Array {
  const frame = new Uint8Array(8 + payload.length);
  const view = new DataView(frame.buffer);
  view.setUint32(0, 0x184d2a50 | nibble, true);
  view.setUint32(4, payload.length, true);
  frame.set(payload, 8);
  return frame;
}

const SIZES = [0, 1, MiB];
const text = new TextEncoder();

// ---------------------------------------------------------------------------------------------
// Names

Deno.test("parseUploadCompression maps narinfo names and NAR file names", () => {
  for (const name of ["xz", "zstd", "bzip2", "br", "none"] as const) {
    assert.equal(parseUploadCompression(name), name);
  }
  const cases: Array<[string, UploadCompression]> = [
    ["nar/0i7b4p4hl5fyhmg0jjq4wws3adb43lnxv7r7psvjvdx7qzw6dcin.nar.xz", "xz"],
    ["/nar/1alyn0zspnk8lhlmc6lb74kw31hafy58v2m7i05sbl204qw4adjj.nar.zst", "zstd"],
    ["x.nar.bz2", "bzip2"],
    ["x.nar.br", "br"],
    ["nar/17b65q2fy2zfr0ffqxc8296k8hf98h3kb86lv5fvdppiv65wsky0.nar", "none"],
    [".nar.xz", "xz"],
    ["nar.zst", "zstd"],
    ["X.NAR.XZ", "xz"],
  ];
  for (const [input, expected] of cases) assert.equal(parseUploadCompression(input), expected);
  for (const bad of ["", "gzip", "lz4", "zst", "x.nar.gz", "x.xz", "XZ", "nar.xz.tmp"]) {
    assert.throws(() => parseUploadCompression(bad), FormatError, bad);
  }
  assert.throws(() => decompressStream("gzip" as UploadCompression), FormatError);
  assert.throws(() => decompressStream("toString" as UploadCompression), FormatError);
});

// ---------------------------------------------------------------------------------------------
// Round trips against the CLIs

Deno.test("zstd: CLI frames of 0 B … 50 MiB (checksum, --no-check, --long, sizes) in random pieces", async () => {
  const big = mixedData(50 * MiB, 1);
  const dir = await Deno.makeTempDir({ prefix: "arca-dz-" });
  try {
    for (const size of SIZES) {
      const data = mixedData(size, size + 7);
      const file = `${dir}/data`;
      await Deno.writeFile(file, data);
      const variants: Array<[string, Promise<Uint8Array>]> = [
        ["default (stdin, checksum, no size)", cli("zstd", ["-q", "-c"], data)],
        ["--no-check", cli("zstd", ["-q", "-c", "--no-check"], data)],
        ["-19 --long", cli("zstd", ["-q", "-c", "-19", "--long"], data)],
        // A file argument makes the CLI write the content size into the header.
        ["file (content size)", cli("zstd", ["-q", "-c", file], new Uint8Array())],
      ];
      for (const [name, compressed] of variants) {
        sameBytes(await decode("zstd", await compressed), data, `zstd ${name} of ${size} B`);
      }
    }
    await Deno.writeFile(`${dir}/big`, big);
    const [checked, long, sized] = await Promise.all([
      cli("zstd", ["-q", "-c", "-T2"], big),
      cli("zstd", ["-q", "-c", "--long", "--no-check"], big),
      cli("zstd", ["-q", "-c", `${dir}/big`], new Uint8Array()),
    ]);
    sameBytes(await decode("zstd", checked), big, "zstd -T2 of 50 MiB");
    sameBytes(await decode("zstd", long, { seed: 2 }), big, "zstd --long of 50 MiB");
    sameBytes(await decode("zstd", sized, { seed: 3 }), big, "zstd with size of 50 MiB");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("zstd: concatenated frames and skippable frames decode to the concatenation", async () => {
  const a = mixedData(MiB + 12345, 11);
  const b = text.encode("b");
  const c = mixedData(300_000, 12);
  const [za, zb, zc, zEmpty] = await Promise.all([
    cli("zstd", ["-q", "-c"], a),
    cli("zstd", ["-q", "-c", "--no-check"], b),
    cli("zstd", ["-q", "-c", "-1"], c),
    cli("zstd", ["-q", "-c"], new Uint8Array()),
  ]);
  const skip = skippableFrame(text.encode("metadata that is not content"));
  const emptySkip = skippableFrame(new Uint8Array(), 0xf);
  sameBytes(await decode("zstd", concat(za, zb)), concat(a, b), "cat a.zst b.zst");
  sameBytes(
    await decode("zstd", concat(skip, za, emptySkip, zb, skip, zEmpty, zc, skip)),
    concat(a, b, c),
    "frames with skippable frames around and between",
  );
  // Many small frames, like an arca NAR made of chunks.
  const parts: Uint8Array[] = [];
  const frames: Uint8Array[] = [];
  for (let p = 0; p < a.length; p += 65536) parts.push(a.subarray(p, p + 65536));
  for (const part of parts) frames.push(await cli("zstd", ["-q", "-c", "--no-check"], part));
  for (const seed of [1, 2, 3]) {
    sameBytes(await decode("zstd", concat(...frames), { seed }), a, `17 frames, seed ${seed}`);
  }
  assert.deepEqual(await decode("zstd", skip), new Uint8Array(), "only a skippable frame");
});

Deno.test("xz: CLI streams (presets, -T2 blocks, check types) and concatenations", async () => {
  const inputs = SIZES.map((size) => mixedData(size, size + 3));
  for (const data of inputs) {
    const variants: Array<[string, string[]]> = [
      ["-6 (CRC64)", ["-c"]],
      ["-T2 blocks", ["-c", "-T2", "--block-size=256KiB"]],
      ["-0 crc32", ["-c", "-0", "--check=crc32"]],
      ["sha256", ["-c", "-1", "--check=sha256"]],
      ["no check", ["-c", "-1", "--check=none"]],
    ];
    const compressed = await Promise.all(variants.map(([, args]) => cli("xz", args, data)));
    for (const [i, [name]] of variants.entries()) {
      sameBytes(await decode("xz", compressed[i]), data, `xz ${name} of ${data.length} B`);
    }
  }
  // xz -6 runs at ~2 MB/s: the large input uses -1 (still LZMA2, 1 MiB blocks on 2 threads).
  const big = mixedData(8 * MiB, 4);
  const bigXz = await cli("xz", ["-c", "-1", "-T2", "--block-size=1MiB"], big);
  sameBytes(await decode("xz", bigXz), big, "xz -1 -T2 of 8 MiB");
  const a = inputs[2], b = inputs[1], c = mixedData(200_000, 9);
  const [xa, xb, xc, xEmpty] = await Promise.all([
    cli("xz", ["-c"], a),
    cli("xz", ["-c", "--check=crc32"], b),
    cli("xz", ["-c", "-T2", "--block-size=50000"], c),
    cli("xz", ["-c"], new Uint8Array()),
  ]);
  sameBytes(await decode("xz", concat(xa, xb)), concat(a, b), "cat a.xz b.xz");
  sameBytes(
    await decode("xz", concat(xEmpty, xa, new Uint8Array(8), xc, xb, new Uint8Array(4))),
    concat(a, c, b),
    "streams with stream padding",
  );
});

Deno.test("bzip2: CLI streams (-1, -9) and concatenated streams", async () => {
  const inputs = [...SIZES.map((size) => mixedData(size, size + 5)), mixedData(4 * MiB, 6)];
  // Runs longer than 4 bytes exercise the RLE stage; all 256 byte values the symbol map.
  const runs = new Uint8Array(300_000);
  for (let i = 0; i < runs.length; i++) runs[i] = Math.floor(i / ((i % 7) + 1)) % 256;
  inputs.push(runs, new Uint8Array(3 * MiB));
  for (const data of inputs) {
    const [fast, best] = await Promise.all([
      cli("bzip2", ["-c", "-1"], data),
      cli("bzip2", ["-c", "-9"], data),
    ]);
    sameBytes(await decode("bzip2", fast), data, `bzip2 -1 of ${data.length} B`);
    sameBytes(await decode("bzip2", best), data, `bzip2 -9 of ${data.length} B`);
  }
  // Like pbzip2: one stream per piece, concatenated.
  const data = inputs[3];
  const streams = await Promise.all(
    [0, 1, 2, 3].map((i) => cli("bzip2", ["-c"], data.subarray(i * MiB, (i + 1) * MiB))),
  );
  const empty = await cli("bzip2", ["-c"], new Uint8Array());
  sameBytes(await decode("bzip2", concat(...streams)), data, "4 concatenated streams");
  sameBytes(
    await decode("bzip2", concat(empty, streams[0], empty, streams[1])),
    data.subarray(0, 2 * MiB),
    "with empty streams",
  );
});

Deno.test("br and none decode in random pieces", async () => {
  for (const size of SIZES) {
    const data = mixedData(size, size + 13);
    const compressed = zlib.brotliCompressSync(data);
    sameBytes(await decode("br", compressed), data, `br of ${size} B`);
    sameBytes(await decode("none", data), data, `none of ${size} B`);
  }
  const big = mixedData(20 * MiB, 14);
  sameBytes(await decode("none", big), big, "none of 20 MiB");
  sameBytes(
    await decode(
      "br",
      zlib.brotliCompressSync(big, { params: { [zlib.constants.BROTLI_PARAM_QUALITY]: 4 } }),
    ),
    big,
    "br of 20 MiB",
  );
});

// ---------------------------------------------------------------------------------------------
// Damaged input

/** Samples of every compression of one ~400 kB input, each a single frame/stream. */
async function samples(): Promise<Array<[UploadCompression, string, Uint8Array, Uint8Array]>> {
  const data = mixedData(400_000, 21);
  const [zstd, zstdNoCheck, zstdSized, xz, xzBlocks, bzip2] = await Promise.all([
    cli("zstd", ["-q", "-c"], data),
    cli("zstd", ["-q", "-c", "--no-check"], data),
    cli("zstd", ["-q", "-c", "--no-check", "--stream-size=400000"], data),
    cli("xz", ["-c"], data),
    cli("xz", ["-c", "-T2", "--block-size=100000"], data),
    cli("bzip2", ["-c"], data),
  ]);
  return [
    ["zstd", "checksum", zstd, data],
    ["zstd", "no checksum", zstdNoCheck, data],
    ["zstd", "content size", zstdSized, data],
    ["xz", "one block", xz, data],
    ["xz", "blocks", xzBlocks, data],
    ["bzip2", "-9", bzip2, data],
    ["br", "quality 11", zlib.brotliCompressSync(data), data],
  ];
}

Deno.test("truncated input fails with an error, never a shorter output", async () => {
  for (const [compression, name, compressed] of await samples()) {
    const n = compressed.length;
    const random = prng(n);
    const cuts = new Set([0, 1, 3, 4, 5, 6, 9, 12, 13, 32, 100, n >> 1, n - 32, n - 12, n - 5]);
    for (const cut of [n - 4, n - 3, n - 2, n - 1]) cuts.add(cut);
    for (let i = 0; i < 12; i++) cuts.add(Math.floor(random() * n));
    for (const cut of cuts) {
      await decodeFails(
        compression,
        compressed.subarray(0, cut),
        `${compression} ${name} cut at ${cut}/${n}`,
        cut,
      );
    }
  }
  // A cut inside the second of two concatenated frames/streams.
  const a = mixedData(100_000, 1), b = mixedData(100_000, 2);
  for (
    const [compression, args] of [["zstd", ["-q", "-c"]], ["xz", ["-c"]], ["bzip2", [
      "-c",
    ]]] as const
  ) {
    const cmd = compression === "zstd" ? "zstd" : compression;
    const whole = concat(await cli(cmd, [...args], a), await cli(cmd, [...args], b));
    await decodeFails(
      compression,
      whole.subarray(0, whole.length - 7),
      `${compression} second stream cut`,
    );
  }
});

Deno.test("flipped bytes fail with an error or decode to the original, never to other bytes", async () => {
  for (const [compression, name, compressed, data] of await samples()) {
    // Without a checksum a flip inside compressed data may decode to other bytes: only the
    // NAR hash catches that, so those samples are checked for errors-or-no-hang only.
    const checked = !(compression === "br" || name === "no checksum" || name === "content size");
    const random = prng(compressed.length + 1);
    let failures = 0;
    const positions = [0, 1, 4, 5, 6, 7, 8, 12, 20, compressed.length - 1, compressed.length - 5];
    for (let i = 0; i < 30; i++) positions.push(Math.floor(random() * compressed.length));
    for (const position of positions) {
      const damaged = compressed.slice();
      damaged[position] ^= 1 << Math.floor(random() * 8);
      try {
        const out = await decode(compression, damaged, { seed: position });
        if (checked) sameBytes(out, data, `${compression} ${name} flip at ${position}`);
      } catch (error) {
        if (!(error instanceof FormatError || error instanceof IntegrityError)) throw error;
        failures++;
      }
    }
    if (checked) {
      assert.ok(failures > positions.length / 2, `${compression} ${name}: only ${failures} errors`);
    }
  }
});

Deno.test("a zstd content checksum or content size mismatch is an IntegrityError", async () => {
  const data = mixedData(200_000, 31);
  const checked = await cli("zstd", ["-q", "-c"], data);
  const badChecksum = checked.slice();
  badChecksum[badChecksum.length - 1] ^= 0x80;
  const error = await decodeFails("zstd", badChecksum, "checksum flipped");
  assert.ok(error instanceof IntegrityError);
  assert.match(error.message, /content checksum mismatch/);
  // A frame header declaring one byte more than the content: 4-byte content size field.
  const sized = await cli("zstd", ["-q", "-c", "--no-check", "--stream-size=200000"], data);
  assert.equal(sized[4] >> 6, 2, "expected a 4-byte content size field");
  const view = new DataView(sized.buffer, sized.byteOffset);
  const headerSize = 5 + ((sized[4] >> 5) & 1 ? 0 : 1);
  assert.equal(view.getUint32(headerSize, true), 200_000);
  view.setUint32(headerSize, 200_001, true);
  // (zstd itself notices this one: "Data corruption detected".)
  assert.ok((await decodeFails("zstd", sized, "content size long")) instanceof IntegrityError);
  view.setUint32(headerSize, 199_999, true);
  assert.ok((await decodeFails("zstd", sized, "content size short")) instanceof IntegrityError);
});

Deno.test("zstd frames needing a dictionary, a reserved bit or a > 128 MiB window are FormatErrors", async () => {
  const data = mixedData(10_000, 41);
  const frame = await cli("zstd", ["-q", "-c", "--no-check"], data);
  const reserved = frame.slice();
  reserved[4] |= 0x08;
  assert.match((await decodeFails("zstd", reserved, "reserved bit")).message, /reserved bit/);
  // Window descriptor (single-segment off): exponent 18 → 2^28 bytes.
  const stdinFrame = await cli("zstd", ["-q", "-c", "--no-check"], data);
  assert.equal((stdinFrame[4] >> 5) & 1, 0, "expected a window descriptor");
  const huge = stdinFrame.slice();
  huge[5] = 18 << 3;
  const error = await decodeFails("zstd", huge, "huge window");
  assert.ok(error instanceof FormatError);
  assert.match(error.message, /window of 268435456 bytes/);
  const dict = stdinFrame.slice(0, 6);
  dict[4] |= 0x01; // 1-byte dictionary id follows
  const withDict = concat(dict, new Uint8Array([7]), stdinFrame.subarray(6));
  assert.match((await decodeFails("zstd", withDict, "dictionary")).message, /dictionary 7/);
});

Deno.test("trailing data after the last frame/stream is a FormatError", async () => {
  const data = mixedData(50_000, 51);
  const garbage = [text.encode("x"), text.encode("GARBAGE!"), new Uint8Array([0, 0, 0, 1])];
  const [zstd, xz, bzip2] = await Promise.all([
    cli("zstd", ["-q", "-c"], data),
    cli("xz", ["-c"], data),
    cli("bzip2", ["-c"], data),
  ]);
  const br = zlib.brotliCompressSync(data);
  for (
    const [compression, compressed] of [["zstd", zstd], ["xz", xz], ["bzip2", bzip2], [
      "br",
      br,
    ]] as const
  ) {
    for (const tail of garbage) {
      const error = await decodeFails(
        compression,
        concat(compressed, tail),
        `${compression} + ${tail.length} bytes`,
      );
      assert.ok(error instanceof FormatError, `${compression}: ${error.name}: ${error.message}`);
    }
    const empty = await decodeFails(compression, new Uint8Array(), `${compression} empty input`);
    assert.ok(empty instanceof FormatError, `${compression} empty: ${empty.message}`);
  }
  // A bzip2 stream header alone after a stream is a truncated second stream.
  await decodeFails("bzip2", concat(bzip2, text.encode("BZh9")), "bzip2 + BZh9");
  await decodeFails("zstd", concat(zstd, new Uint8Array([0x28, 0xb5, 0x2f, 0xfd])), "zstd + magic");
});

Deno.test("maxOutputBytes stops the stream with a FormatError", async () => {
  const data = mixedData(300_000, 61);
  const zstd = await cli("zstd", ["-q", "-c"], data);
  sameBytes(await decode("zstd", zstd, { maxOutputBytes: 300_000 }), data, "at the limit");
  await assert.rejects(decode("zstd", zstd, { maxOutputBytes: 299_999 }), (error: Error) => {
    assert.ok(error instanceof FormatError);
    assert.match(error.message, /output exceeds 299999 bytes/);
    return true;
  });
  await assert.rejects(decode("none", data, { maxOutputBytes: 1000 }), FormatError);
  assert.throws(() => decompressStream("none", { maxOutputBytes: -1 }), RangeError);
});

// ---------------------------------------------------------------------------------------------
// Streams: errors on both sides, backpressure, memory

Deno.test("a decoding error reaches the writer; abort and cancel propagate", async () => {
  // Error: the writer's close() rejects with the same error the reader sees.
  {
    const stream = decompressStream("zstd");
    const writer = stream.writable.getWriter();
    const reading = (async () => {
      for await (const _ of stream.readable) { /* drain */ }
    })();
    await writer.write(text.encode("not zstd at all"));
    const closing = writer.close();
    await assert.rejects(reading, FormatError);
    await assert.rejects(closing, FormatError);
  }
  // Abort of the writable side errors the readable side with the reason.
  {
    const stream = decompressStream("xz");
    const writer = stream.writable.getWriter();
    const reader = stream.readable.getReader();
    const reason = new Error("client went away");
    const read = reader.read();
    await writer.abort(reason);
    await assert.rejects(read, (error) => error === reason);
  }
  // Cancel of the readable side errors the writable side.
  {
    const stream = decompressStream("bzip2");
    const writer = stream.writable.getWriter();
    const reason = new Error("consumer stopped");
    await stream.readable.cancel(reason);
    await assert.rejects(writer.write(text.encode("BZh9")), (error) => error === reason);
  }
  // A source error aborts through pipeThrough.
  {
    const failing = new ReadableStream<Uint8Array>({
      pull(controller) {
        controller.error(new Error("socket reset"));
      },
    });
    await assert.rejects(
      (async () => {
        for await (const _ of failing.pipeThrough(decompressStream("zstd"))) { /* drain */ }
      })(),
      /socket reset/,
    );
  }
});

Deno.test("a stopped reader stops the decoder and the writer (backpressure)", async () => {
  const data = randomBytes(16 * MiB, 71);
  const quality = { [zlib.constants.BROTLI_PARAM_QUALITY]: 1 };
  const inputs: Array<[UploadCompression, Uint8Array]> = [
    ["zstd", await cli("zstd", ["-q", "-c", "-1"], data)],
    ["xz", await cli("xz", ["-c", "-0"], data)],
    ["br", zlib.brotliCompressSync(data, { params: quality })],
    ["none", data],
  ];
  for (const [compression, compressed] of inputs) {
    for (const pieceSize of [65536, 2 * MiB]) {
      let taken = 0;
      const source = new ReadableStream<Uint8Array>({
        pull(controller) {
          if (taken >= compressed.length) return controller.close();
          const piece = compressed.subarray(taken, taken + pieceSize);
          taken += piece.length;
          controller.enqueue(piece);
        },
      }, { highWaterMark: 0 });
      const reader = source.pipeThrough(decompressStream(compression)).getReader();
      const first = await reader.read();
      assert.ok(!first.done);
      // Let every pending task run: an unbounded decoder would now read the whole input.
      for (let i = 0; i < 20; i++) await new Promise((resolve) => setTimeout(resolve, 5));
      // One piece in the decoder, one queued in the writable side, one in the pipe, and
      // for xz ~2.4 MB queued inside the binding.
      const bound = 3 * pieceSize + 3 * MiB;
      assert.ok(taken < bound, `${compression}, ${pieceSize} B pieces: ${taken} bytes taken`);
      await reader.cancel();
    }
  }
});

/**
 * Decodes each file with a slow reader in a child process (RSS is per process, and
 * `deno test --parallel` runs other test files in this one); prints one JSON line per file.
 */
const MEMORY_PROBE = `
declare function gc(): void;
import { decompressStream } from ${
  JSON.stringify(import.meta.resolve("../../src/cache/decompress_stream.ts"))
};
for (const [compression, file] of JSON.parse(Deno.args[0])) {
  const input = await Deno.readFile(file);
  const before = Deno.memoryUsage().rss;
  let peak = before, total = 0, pieces = 0, nonZero = -1;
  for await (const piece of ReadableStream.from([input]).pipeThrough(decompressStream(compression))) {
    for (let i = 0; i < piece.length && nonZero < 0; i += 4096) if (piece[i] !== 0) nonZero = total + i;
    total += piece.length;
    if (++pieces % 64 === 0) await new Promise((resolve) => setTimeout(resolve, 1));
    if (pieces % 256 === 0) {
      // Collect garbage first: what counts is what the stream retains, not V8's laziness.
      gc();
      peak = Math.max(peak, Deno.memoryUsage().rss);
    }
  }
  console.log(JSON.stringify({ compression, total, nonZero, growth: peak - before }));
}
`;

Deno.test("memory stays bounded: 200 MiB of output through a slow reader", async () => {
  const zeros = new Uint8Array(200 * MiB);
  const quarter = zeros.subarray(0, 50 * MiB);
  const quality = { [zlib.constants.BROTLI_PARAM_QUALITY]: 1 };
  // Four concatenated 50 MiB frames/streams (the CLIs take seconds for 200 MiB), one br stream.
  const [zstd, xz, bzip2] = await Promise.all([
    cli("zstd", ["-q", "-c"], quarter),
    cli("xz", ["-c", "-0"], quarter),
    cli("bzip2", ["-c"], quarter),
  ]);
  const inputs: Array<[UploadCompression, Uint8Array]> = [
    ["zstd", concat(zstd, zstd, zstd, zstd)],
    ["xz", concat(xz, xz, xz, xz)],
    ["bzip2", concat(bzip2, bzip2, bzip2, bzip2)],
    ["br", zlib.brotliCompressSync(zeros, { params: quality })],
  ];
  const dir = await Deno.makeTempDir({ prefix: "arca-dz-mem-" });
  try {
    const files: Array<[UploadCompression, string]> = [];
    for (const [compression, input] of inputs) {
      assert.ok(input.length < MiB, `${compression} input is ${input.length} bytes`);
      await Deno.writeFile(`${dir}/${compression}`, input);
      files.push([compression, `${dir}/${compression}`]);
    }
    await Deno.writeTextFile(`${dir}/probe.ts`, MEMORY_PROBE);
    const config = new URL("../../deno.json", import.meta.url).pathname;
    const out = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        "--no-lock",
        "--v8-flags=--expose-gc",
        "--config",
        config,
        `${dir}/probe.ts`,
        JSON.stringify(files),
      ],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const stderr = new TextDecoder().decode(out.stderr);
    assert.ok(out.success, stderr);
    const results = new TextDecoder().decode(out.stdout).trim().split("\n").map((line) =>
      JSON.parse(line)
    );
    assert.equal(results.length, inputs.length, stderr);
    for (const { compression, total, nonZero, growth } of results) {
      assert.equal(total, zeros.length, compression);
      assert.equal(nonZero, -1, `${compression}: non-zero byte at ${nonZero}`);
      const mib = growth / MiB;
      assert.ok(mib < 150, `${compression}: RSS grew by ${mib.toFixed(0)} MiB`);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---------------------------------------------------------------------------------------------
// Real Nix

Deno.test({
  name: "NAR files written by nix copy --to file:// decode to nix-store --dump",
  ignore: !HAVE_NIX,
  async fn() {
    const path = await buildFixture(
      "arca-decompress-fixture",
      "mkdir -p $out/d; seq 1 100000 > $out/numbers; ln -s numbers $out/link; " +
        "printf x > $out/d/x; head -c 300000 /dev/zero | tr '\\0' a > $out/d/as",
    );
    const expected = await narDump(path);
    for (const compression of ["xz", "zstd", "bzip2", "br", "none"]) {
      const dir = await Deno.makeTempDir({ prefix: "arca-dz-nix-" });
      try {
        await runNix("nix", ["copy", "--to", `file://${dir}?compression=${compression}`, path], {
          env: nixEnv(),
        });
        const hash = path.slice("/nix/store/".length, "/nix/store/".length + 32);
        const narinfo = await Deno.readTextFile(`${dir}/${hash}.narinfo`);
        const url = narinfo.match(/^URL: (.*)$/m)![1];
        const named = narinfo.match(/^Compression: (.*)$/m)![1];
        assert.equal(parseUploadCompression(named), compression);
        assert.equal(parseUploadCompression(url), compression);
        const file = await Deno.readFile(`${dir}/${url}`);
        sameBytes(await decode(parseUploadCompression(url), file), expected, `nix ${compression}`);
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    }
  },
});
