/**
 * Streaming decompression of uploaded NARs (`PUT /nar/…`, DESIGN.md §4): xz, zstd, bzip2,
 * brotli or none, as `nix copy --to 'http://…?compression=X'` sends them, and as other tools
 * write them (several concatenated zstd frames, xz streams or bzip2 streams).
 *
 * {@link decompressStream} returns a readable/writable pair for `pipeThrough`. Output is
 * produced incrementally and on demand: nothing is decoded while the consumer does not read,
 * and at most two input chunks (small ones coalesced to 64 KiB) are held beyond the
 * decoder's own state. That state is a zstd window (2 MiB at level 3, as Nix writes; at
 * most 128 MiB, what `zstd --long` uses), an xz dictionary (8 MiB at preset 6, as Nix
 * writes; whatever the stream declares, up to 1.5 GiB, since the binding has no memory
 * limit) plus ~2.4 MB of input the xz binding queues, or a bzip2 block (at most 900 kB plus
 * 4.5 MB of tables). Corrupt, truncated or trailing input errors the
 * stream with a {@link FormatError} (bad structure, trailing data, unsupported feature) or an
 * {@link IntegrityError} (checksum mismatch, corrupt data, truncation); it never ends early
 * without an error.
 *
 * - zstd: a frame-boundary scanner (frame header, 3-byte block headers, optional 4-byte
 *   content checksum, skippable frames) feeds each frame to a fresh `node:zlib`
 *   `createZstdDecompress`, because Deno 2.9's binding decodes only the first frame of its
 *   input and silently accepts a truncated frame. Its content checksum check throws an
 *   uncatchable error, so the checksum flag is cleared in the header handed to zlib and the
 *   XXH64 checksum is verified here; the frame content size is checked here too.
 * - xz: the native streaming transform of `@napi-rs/lzma` (lzma-rust2): concatenated streams,
 *   stream padding, every check type (CRC32, CRC64, SHA-256) and the index are verified by it.
 *   Loading it needs `--allow-ffi`, only when an xz stream is decoded.
 * - bzip2: a decoder written here (Huffman + MTF + inverse BWT + RLE, block and stream
 *   CRCs), multi-stream (pbzip2 writes concatenated streams); randomised blocks (bzip2 < 0.9.5)
 *   are refused.
 * - br: `node:zlib` `createBrotliDecompress`. Deno's binding ignores both truncation and
 *   trailing data, so a sentinel byte is written after the input: a complete stream leaves it
 *   unconsumed (and its consumed byte count tells trailing data apart), a truncated one eats it.
 *   Brotli has no checksum: corrupt data that still decodes is only caught by the NAR hash.
 * - none: the input unchanged.
 * @module
 */

import zlib from "node:zlib";
import { ArcaError, FormatError, IntegrityError } from "../errors.ts";

/** A compression an uploaded NAR may come in (narinfo `Compression:` names). */
export type UploadCompression = "xz" | "zstd" | "bzip2" | "br" | "none";

/** Every {@link UploadCompression}, in Nix's order of popularity. */
export const UPLOAD_COMPRESSIONS: readonly UploadCompression[] = [
  "xz",
  "zstd",
  "bzip2",
  "br",
  "none",
];

/** Options of {@link decompressStream}. */
export interface DecompressStreamOptions {
  /**
   * Largest total output accepted; more errors the stream with a {@link FormatError}
   * (default: unlimited).
   */
  maxOutputBytes?: number;
}

/** NAR file extensions in narinfo URLs, as Nix's binary cache writer names them. */
const EXTENSIONS: ReadonlyArray<[string, UploadCompression]> = [
  [".nar.xz", "xz"],
  [".nar.zst", "zstd"],
  [".nar.bz2", "bzip2"],
  [".nar.br", "br"],
  [".nar", "none"],
];

/**
 * The compression named by a narinfo `Compression:` value (`xz`, `zstd`, `bzip2`, `br`,
 * `none`) or by a NAR file name, URL or extension ending in `.nar.xz`, `.nar.zst`,
 * `.nar.bz2`, `.nar.br` or `.nar` (a leading `nar.xz` without dot is accepted too). Throws
 * {@link FormatError} for anything else, including the empty string (Nix reads a narinfo
 * without `Compression:` as bzip2: that default is the caller's decision).
 *
 * @example
 * ```ts
 * parseUploadCompression("zstd"); // "zstd"
 * parseUploadCompression("nar/1abc….nar.xz"); // "xz"
 * ```
 */
export function parseUploadCompression(text: string): UploadCompression {
  if ((UPLOAD_COMPRESSIONS as readonly string[]).includes(text)) {
    return text as UploadCompression;
  }
  const lower = text.toLowerCase();
  for (const [extension, compression] of EXTENSIONS) {
    if (lower.endsWith(extension) || lower === extension.slice(1)) return compression;
  }
  throw new FormatError(
    `Unsupported NAR compression: ${JSON.stringify(text)} (expected xz, zstd, bzip2, br, none ` +
      "or a name ending in .nar.xz, .nar.zst, .nar.bz2, .nar.br or .nar)",
  );
}

/**
 * A streaming decompressor for one uploaded NAR: write compressed bytes to `writable`, read
 * the NAR from `readable` (use it with `pipeThrough`). It is a plain readable/writable pair,
 * not an instance of the `TransformStream` class, so that decoding follows the reader's pace:
 * a slow reader stops the decoder and, through the writable side, the producer.
 *
 * Errors: {@link FormatError} for input that is not in the format (bad magic, reserved
 * bits, trailing data after the last frame/stream, unsupported features, output above
 * `maxOutputBytes`), {@link IntegrityError} for truncated or corrupt input or a checksum
 * mismatch. The error reaches both sides: the reader's `read()` and the writer's
 * `write()`/`close()`. `close()` resolves once the last byte has been decoded and checked
 * (so it waits for the reader to consume the output). Aborting the writable side errors
 * the readable side with the abort reason; cancelling the readable side errors the
 * writable side with the cancel reason.
 *
 * @example
 * ```ts
 * const nar = request.body!.pipeThrough(decompressStream("zstd", { maxOutputBytes: 2 ** 40 }));
 * for await (const piece of nar) chunker.push(piece);
 * ```
 */
export function decompressStream(
  compression: UploadCompression,
  options: DecompressStreamOptions = {},
): TransformStream<Uint8Array, Uint8Array> {
  const decode = DECODERS[compression];
  if (decode === undefined || !Object.hasOwn(DECODERS, compression)) {
    throw new FormatError(`Unsupported NAR compression: ${JSON.stringify(compression)}`);
  }
  const maxOutputBytes = options.maxOutputBytes ?? Infinity;
  if (!(maxOutputBytes >= 0)) {
    throw new RangeError(`maxOutputBytes must be a non-negative number, got ${maxOutputBytes}`);
  }
  return pair(compression, decode, maxOutputBytes);
}

// ---------------------------------------------------------------------------------------------
// Plumbing: a writable side that hands chunks to a decoder one at a time, and a readable side
// that runs the decoder (an async generator) one output piece per pull.

/** A decoder reads input with `input.read()` (null at the end) and yields output pieces. */
type Decoder = (input: InputQueue) => AsyncGenerator<Uint8Array, void, undefined>;

interface Deferred {
  resolve(): void;
  reject(error: unknown): void;
}

/**
 * One-slot hand-over from the writable side to the decoder. `put` resolves when the decoder
 * asks for the next chunk (so it is done with this one), `read` waits for a chunk or the end.
 */
class InputQueue {
  #offered: { chunk: Uint8Array; done: Deferred } | null = null;
  #held: Deferred | null = null;
  #closed = false;
  #failed = false;
  #failure: unknown = undefined;
  #wake: (() => void) | null = null;
  /** Bytes handed to the decoder so far. */
  position = 0;

  /** The reason the queue failed with, if it did. */
  get failure(): { reason: unknown } | null {
    return this.#failed ? { reason: this.#failure } : null;
  }

  put(chunk: Uint8Array): Promise<void> {
    if (this.#failed) return Promise.reject(this.#failure);
    return new Promise((resolve, reject) => {
      this.#offered = { chunk, done: { resolve, reject } };
      this.#notify();
    });
  }

  close(): void {
    this.#closed = true;
    this.#notify();
  }

  /** Fails every pending and future operation on both sides with `reason`. */
  fail(reason: unknown): void {
    if (this.#failed) return;
    this.#failed = true;
    this.#failure = reason;
    this.#offered?.done.reject(reason);
    this.#held?.reject(reason);
    this.#offered = null;
    this.#held = null;
    this.#notify();
  }

  /** Releases the chunk the decoder holds (at the end of decoding). */
  release(): void {
    this.#held?.resolve();
    this.#held = null;
  }

  async read(): Promise<Uint8Array | null> {
    this.release();
    for (;;) {
      if (this.#failed) throw this.#failure;
      const offered = this.#offered;
      if (offered !== null) {
        this.#offered = null;
        if (offered.chunk.length === 0) {
          offered.done.resolve();
          continue;
        }
        this.#held = offered.done;
        this.position += offered.chunk.length;
        return offered.chunk;
      }
      if (this.#closed) return null;
      await new Promise<void>((resolve) => this.#wake = resolve);
    }
  }

  /**
   * Like {@link read}, but coalesces small chunks (copying them) until at least `min` bytes
   * are together or the input ends: decoders pay a fixed cost per write.
   */
  async readAtLeast(min: number): Promise<Uint8Array | null> {
    const first = await this.read();
    if (first === null || first.length >= min) return first;
    let buffer = new Uint8Array(min);
    buffer.set(first);
    let size = first.length;
    while (size < min) {
      const next = await this.read();
      if (next === null) break;
      if (size + next.length > buffer.length) {
        const grown = new Uint8Array(size + next.length);
        grown.set(buffer.subarray(0, size));
        buffer = grown;
      }
      buffer.set(next, size);
      size += next.length;
    }
    return buffer.subarray(0, size);
  }

  #notify(): void {
    const wake = this.#wake;
    this.#wake = null;
    wake?.();
  }
}

function pair(
  compression: UploadCompression,
  decode: Decoder,
  maxOutputBytes: number,
): TransformStream<Uint8Array, Uint8Array> {
  const input = new InputQueue();
  const generator = decode(input);
  let produced = 0;
  let settle!: { resolve(): void; reject(error: unknown): void };
  const finished = new Promise<void>((resolve, reject) => settle = { resolve, reject });
  finished.catch(() => {});

  const fail = (error: unknown): unknown => {
    const failure = input.failure;
    const reported = failure !== null ? failure.reason : describe(compression, error);
    input.fail(reported);
    settle.reject(reported);
    return reported;
  };

  const readable = new ReadableStream<Uint8Array>({
    async pull(controller) {
      try {
        for (;;) {
          const step = await generator.next();
          if (step.done) {
            input.release();
            controller.close();
            settle.resolve();
            return;
          }
          const piece = step.value;
          if (piece.length === 0) continue;
          produced += piece.length;
          if (produced > maxOutputBytes) {
            throw new FormatError(
              `Cannot decompress ${compression} stream: output exceeds ${maxOutputBytes} bytes`,
            );
          }
          controller.enqueue(piece);
          return;
        }
      } catch (error) {
        controller.error(fail(error));
        generator.return(undefined).catch(() => {});
      }
    },
    async cancel(reason) {
      input.fail(reason);
      settle.reject(reason);
      await generator.return(undefined).catch(() => {});
    },
  }, { highWaterMark: 1 });

  const writable = new WritableStream<Uint8Array>({
    write(chunk) {
      if (!(chunk instanceof Uint8Array)) {
        throw new TypeError("decompressStream accepts only Uint8Array chunks");
      }
      return input.put(chunk);
    },
    close() {
      input.close();
      return finished;
    },
    abort(reason) {
      input.fail(reason);
    },
  });

  return { readable, writable } as TransformStream<Uint8Array, Uint8Array>;
}

/** Turns a decoder failure into the error the stream reports. */
function describe(compression: UploadCompression, error: unknown): ArcaError {
  if (error instanceof ArcaError) return error;
  const message = error instanceof Error ? error.message : String(error);
  if (compression === "xz") {
    const format = /magic|after stream|padding|unsupported|reserved|flags/i.test(message);
    const detail = message === "failed to fill whole buffer"
      ? "truncated input (failed to fill whole buffer)"
      : message;
    const ErrorClass = format ? FormatError : IntegrityError;
    return new ErrorClass(`Cannot decompress xz stream: ${detail}`, { cause: error });
  }
  return new IntegrityError(`Cannot decompress ${compression} stream: ${message}`, {
    cause: error,
  });
}

const DECODERS: Record<UploadCompression, Decoder> = {
  none: decodeNone,
  zstd: decodeZstd,
  xz: decodeXz,
  bzip2: decodeBzip2,
  br: decodeBrotli,
};

/** Smallest piece of input handed to a decoder (but the last). */
const MIN_DECODER_INPUT = 64 * 1024;

function next(input: InputQueue): Promise<Uint8Array | null> {
  return input.readAtLeast(MIN_DECODER_INPUT);
}

async function* decodeNone(input: InputQueue): AsyncGenerator<Uint8Array, void, undefined> {
  for (let chunk = await input.read(); chunk !== null; chunk = await input.read()) {
    yield chunk;
  }
}

/** A plain Uint8Array view of a node Buffer (no copy). */
function view(bytes: Uint8Array): Uint8Array {
  return Object.getPrototypeOf(bytes) === Uint8Array.prototype
    ? bytes
    : new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

// ---------------------------------------------------------------------------------------------
// node:zlib streams driven with backpressure (Deno's zlib stops decoding while its readable
// side is full, and calls a write's callback only once the chunk has been consumed).

/** Output buffer size of the zlib decoders. */
const ZLIB_CHUNK_SIZE = 128 * 1024;

/** The part of a node:zlib Transform that {@link ZlibPump} uses. */
interface ZlibStream {
  readonly bytesWritten: number;
  on(event: "readable" | "end", listener: () => void): unknown;
  on(event: "error", listener: (error: Error) => void): unknown;
  write(bytes: Uint8Array, callback: () => void): boolean;
  read(): Uint8Array | null;
  end(): unknown;
  destroy(): unknown;
}

class ZlibPump {
  #stream: ZlibStream;
  #error: Error | null = null;
  #ended = false;
  #wake: (() => void) | null = null;

  constructor(stream: ZlibStream) {
    this.#stream = stream;
    const notify = () => {
      const wake = this.#wake;
      this.#wake = null;
      wake?.();
    };
    stream.on("readable", notify);
    stream.on("error", (error: Error) => {
      this.#error ??= error;
      notify();
    });
    stream.on("end", () => {
      this.#ended = true;
      notify();
    });
  }

  /** Bytes of input the decoder consumed. */
  get consumed(): number {
    return this.#stream.bytesWritten;
  }

  /** Writes `bytes` and yields the output until the decoder has consumed them. */
  async *write(bytes: Uint8Array): AsyncGenerator<Uint8Array, void, undefined> {
    let written = false;
    this.#stream.write(bytes, () => {
      written = true;
      const wake = this.#wake;
      this.#wake = null;
      wake?.();
    });
    yield* this.#drain(() => written);
  }

  /** Ends the input and yields the rest of the output. */
  async *end(): AsyncGenerator<Uint8Array, void, undefined> {
    this.#stream.end();
    yield* this.#drain(() => this.#ended);
  }

  destroy(): void {
    this.#stream.destroy();
  }

  async *#drain(done: () => boolean): AsyncGenerator<Uint8Array, void, undefined> {
    for (;;) {
      if (this.#error !== null) throw this.#error;
      const out: Uint8Array | null = this.#stream.read();
      if (out !== null) {
        yield view(out);
        continue;
      }
      if (done()) return;
      await new Promise<void>((resolve) => this.#wake = resolve);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// zstd

const ZSTD_MAGIC = 0xfd2fb528;
/** Largest window accepted: zstd's default decoder limit (`--long` uses exactly this). */
const ZSTD_MAX_WINDOW = 2 ** 27;
/** zstd's Block_Maximum_Size. */
const ZSTD_MAX_BLOCK = 128 * 1024;

/** What the frame scanner found in a piece of input. */
type ZstdPart =
  | { type: "start"; header: Uint8Array; contentSize: number | null; checksum: boolean }
  | { type: "data"; bytes: Uint8Array }
  | { type: "end"; checksum: number | null };

const enum Zs {
  Magic,
  SkipSize,
  Skip,
  FrameHeader,
  BlockHeader,
  BlockBody,
  Checksum,
}

/**
 * Splits a stream of concatenated zstd frames at frame boundaries without decoding: frame
 * header, block headers and sizes, checksum, skippable frames. Block bytes are passed through
 * as subarrays of the input; the frame header is passed as a copy with its checksum flag
 * cleared, and the checksum is reported in the `end` part instead of being passed on.
 */
class ZstdScanner {
  #state = Zs.Magic;
  /** Bytes of the current magic / header / size / checksum field. */
  #field = new Uint8Array(18);
  #fieldLength = 0;
  #need = 4;
  #remaining = 0;
  #lastBlock = false;
  #checksum = false;
  #windowSize = 0;
  #offset = 0;
  #frames = 0;

  /** The parts found in `chunk`, in order. */
  split(chunk: Uint8Array): ZstdPart[] {
    const parts: ZstdPart[] = [];
    let passStart = -1;
    const pass = (end: number) => {
      if (passStart >= 0 && end > passStart) {
        parts.push({ type: "data", bytes: chunk.subarray(passStart, end) });
      }
      passStart = -1;
    };
    let p = 0;
    while (p < chunk.length) {
      if (this.#state === Zs.Skip || this.#state === Zs.BlockBody) {
        const take = Math.min(this.#remaining, chunk.length - p);
        if (this.#state === Zs.BlockBody && passStart < 0) passStart = p;
        p += take;
        this.#remaining -= take;
        if (this.#remaining > 0) break;
        if (this.#state === Zs.Skip) {
          this.#expect(Zs.Magic, 4);
        } else {
          pass(p);
          this.#afterBlock(parts);
        }
        continue;
      }
      // A fixed-size field, possibly split across chunks.
      if (this.#state === Zs.BlockHeader && passStart < 0) passStart = p;
      const take = Math.min(this.#need - this.#fieldLength, chunk.length - p);
      this.#field.set(chunk.subarray(p, p + take), this.#fieldLength);
      this.#fieldLength += take;
      p += take;
      if (this.#fieldLength < this.#need) break;
      const fieldStart = this.#offset + p - this.#fieldLength;
      switch (this.#state) {
        case Zs.Magic:
          this.#onMagic(fieldStart);
          break;
        case Zs.SkipSize:
          this.#remaining = this.#u32(0);
          this.#state = Zs.Skip;
          if (this.#remaining === 0) this.#expect(Zs.Magic, 4);
          break;
        case Zs.FrameHeader:
          this.#onFrameHeader(parts, fieldStart);
          break;
        case Zs.BlockHeader:
          this.#onBlockHeader(parts, fieldStart, () => pass(p));
          break;
        case Zs.Checksum:
          parts.push({ type: "end", checksum: this.#u32(0) });
          this.#expect(Zs.Magic, 4);
          break;
      }
    }
    pass(p);
    this.#offset += chunk.length;
    return parts;
  }

  /** Checks that the input ended at a frame boundary. */
  finish(): void {
    if (this.#state === Zs.Magic && this.#fieldLength === 0) {
      if (this.#frames === 0) {
        throw new FormatError("Cannot decompress zstd stream: empty input");
      }
      return;
    }
    if (this.#state === Zs.Magic && this.#frames > 0) {
      throw new FormatError(
        `Cannot decompress zstd stream: ${this.#fieldLength} trailing bytes after the last frame`,
      );
    }
    const frame = this.#state === Zs.Magic || this.#state === Zs.FrameHeader
      ? this.#frames + 1
      : this.#frames;
    throw new IntegrityError(
      `Cannot decompress zstd stream: input truncated inside frame ${frame} ` +
        `(${this.#offset} bytes read)`,
    );
  }

  #u32(at: number): number {
    const f = this.#field;
    return (f[at] | (f[at + 1] << 8) | (f[at + 2] << 16) | (f[at + 3] << 24)) >>> 0;
  }

  #expect(state: Zs, need: number): void {
    this.#state = state;
    this.#need = need;
    this.#fieldLength = 0;
  }

  #onMagic(at: number): void {
    const magic = this.#u32(0);
    if (magic === ZSTD_MAGIC) {
      // The header is 6 … 18 bytes; its size is known after its descriptor (byte 4).
      this.#expect(Zs.FrameHeader, 5);
      this.#field.set([0x28, 0xb5, 0x2f, 0xfd]);
      this.#fieldLength = 4;
      return;
    }
    if ((magic & 0xfffffff0) === 0x184d2a50) {
      this.#frames++;
      this.#expect(Zs.SkipSize, 4);
      return;
    }
    const hex = `0x${magic.toString(16).padStart(8, "0")}`;
    throw new FormatError(
      this.#frames === 0
        ? `Cannot decompress zstd stream: bad magic ${hex} (not zstd)`
        : `Cannot decompress zstd stream: bad magic ${hex} at byte ${at} ` +
          `(trailing data after frame ${this.#frames})`,
    );
  }

  #onFrameHeader(parts: ZstdPart[], at: number): void {
    const f = this.#field;
    const descriptor = f[4];
    const fcsFlag = descriptor >> 6;
    const singleSegment = (descriptor >> 5) & 1;
    const dictIdSize = [0, 1, 2, 4][descriptor & 3];
    const fcsSize = [singleSegment ? 1 : 0, 2, 4, 8][fcsFlag];
    const size = 5 + (singleSegment ? 0 : 1) + dictIdSize + fcsSize;
    if (this.#need < size) {
      this.#need = size; // read the rest of the header first
      return;
    }
    const fail = (detail: string) =>
      new FormatError(`Cannot decompress zstd stream: frame at byte ${at - 4}: ${detail}`);
    if (descriptor & 0x08) throw fail("reserved bit set in the frame header");
    let pos = 5;
    let windowSize = 0;
    if (!singleSegment) {
      const exponent = f[5] >> 3;
      const base = 2 ** (10 + exponent);
      windowSize = base + (base / 8) * (f[5] & 7);
      pos = 6;
    }
    let dictId = 0;
    for (let i = dictIdSize - 1; i >= 0; i--) dictId = dictId * 256 + f[pos + i];
    if (dictId !== 0) throw fail(`needs dictionary ${dictId}`);
    pos += dictIdSize;
    let contentSize: number | null = null;
    if (fcsSize === 1) contentSize = f[pos];
    else if (fcsSize === 2) contentSize = (f[pos] | (f[pos + 1] << 8)) + 256;
    else if (fcsSize === 4) contentSize = this.#u32(pos);
    else if (fcsSize === 8) contentSize = this.#u32(pos) + this.#u32(pos + 4) * 2 ** 32;
    if (singleSegment) windowSize = contentSize!;
    if (windowSize > ZSTD_MAX_WINDOW) {
      throw fail(`window of ${windowSize} bytes exceeds the limit of ${ZSTD_MAX_WINDOW}`);
    }
    this.#windowSize = windowSize;
    this.#checksum = (descriptor & 0x04) !== 0;
    const header = f.slice(0, size);
    header[4] &= ~0x04; // Deno's zlib cannot report a checksum mismatch: we check it
    parts.push({ type: "start", header, contentSize, checksum: this.#checksum });
    this.#frames++;
    this.#expect(Zs.BlockHeader, 3);
  }

  #onBlockHeader(parts: ZstdPart[], at: number, flush: () => void): void {
    const f = this.#field;
    const header = f[0] | (f[1] << 8) | (f[2] << 16);
    const type = (header >> 1) & 3;
    const size = header >>> 3;
    this.#lastBlock = (header & 1) === 1;
    if (type === 3) {
      throw new FormatError(
        `Cannot decompress zstd stream: reserved block type at byte ${at}`,
      );
    }
    if (size > Math.min(ZSTD_MAX_BLOCK, Math.max(this.#windowSize, 1))) {
      throw new FormatError(
        `Cannot decompress zstd stream: block of ${size} bytes at byte ${at} exceeds the maximum`,
      );
    }
    this.#remaining = type === 1 ? 1 : size;
    this.#state = Zs.BlockBody;
    this.#fieldLength = 0;
    if (this.#remaining === 0) {
      flush();
      this.#afterBlock(parts);
    }
  }

  #afterBlock(parts: ZstdPart[]): void {
    if (!this.#lastBlock) {
      this.#expect(Zs.BlockHeader, 3);
    } else if (this.#checksum) {
      this.#expect(Zs.Checksum, 4);
    } else {
      parts.push({ type: "end", checksum: null });
      this.#expect(Zs.Magic, 4);
    }
  }
}

async function* decodeZstd(input: InputQueue): AsyncGenerator<Uint8Array, void, undefined> {
  const scanner = new ZstdScanner();
  let frame: ZlibPump | null = null;
  let hash: Xxh64 | null = null;
  let contentSize: number | null = null;
  let produced = 0;
  let frames = 0;
  try {
    for (let chunk = await next(input); chunk !== null; chunk = await next(input)) {
      for (const part of scanner.split(chunk)) {
        if (part.type === "start") {
          frames++;
          frame = new ZlibPump(
            zlib.createZstdDecompress({ chunkSize: ZLIB_CHUNK_SIZE }) as unknown as ZlibStream,
          );
          hash = part.checksum ? new Xxh64() : null;
          contentSize = part.contentSize;
          produced = 0;
          for await (const out of frame.write(part.header)) {
            produced += out.length;
            hash?.update(out);
            yield out;
          }
          continue;
        }
        const pieces = part.type === "data" ? frame!.write(part.bytes) : frame!.end();
        for await (const out of pieces) {
          produced += out.length;
          if (contentSize !== null && produced > contentSize) {
            throw new IntegrityError(
              `Cannot decompress zstd stream: frame ${frames} decodes to more than its ` +
                `declared ${contentSize} bytes`,
            );
          }
          hash?.update(out);
          yield out;
        }
        if (part.type === "end") {
          frame = null;
          if (contentSize !== null && produced !== contentSize) {
            throw new IntegrityError(
              `Cannot decompress zstd stream: frame ${frames} decodes to ${produced} bytes, ` +
                `its header declares ${contentSize}`,
            );
          }
          if (part.checksum !== null && hash !== null) {
            const actual = hash.digestLow32();
            if (actual !== part.checksum) {
              throw new IntegrityError(
                `Cannot decompress zstd stream: frame ${frames} content checksum mismatch ` +
                  `(stored ${hex32(part.checksum)}, computed ${hex32(actual)})`,
              );
            }
          }
        }
      }
    }
    scanner.finish();
  } finally {
    frame?.destroy();
  }
}

function hex32(value: number): string {
  return value.toString(16).padStart(8, "0");
}

// ---------------------------------------------------------------------------------------------
// XXH64 (seed 0), for zstd content checksums: 64-bit lanes as pairs of uint32 halves.

const P1H = 0x9e3779b1, P1L = 0x85ebca87;
const P2H = 0xc2b2ae3d, P2L = 0x27d4eb4f;
const P3H = 0x165667b1, P3L = 0x9e3779f9;
const P4H = 0x85ebca77, P4L = 0xc2b2ae63;
const P5H = 0x27d4eb2f, P5L = 0x165667c5;

/** High 32 bits of the 64-bit product of two uint32. */
function mulHigh(a: number, b: number): number {
  const a0 = a & 0xffff, a1 = a >>> 16, b0 = b & 0xffff, b1 = b >>> 16;
  const t = a1 * b0 + ((a0 * b0) >>> 16);
  const w = (t & 0xffff) + a0 * b1;
  return (a1 * b1 + (t >>> 16) + (w >>> 16)) >>> 0;
}

/** v1 = P1 + P2, v2 = P2, v3 = 0, v4 = -P1 (mod 2^64), as [hi, lo] pairs. */
const XXH64_INIT: readonly number[] = (() => {
  const out = { h: 0, l: 0 };
  add(P1H, P1L, P2H, P2L, out);
  const v1 = [out.h, out.l];
  add(~P1H >>> 0, ~P1L >>> 0, 0, 1, out);
  return [...v1, P2H, P2L, 0, 0, out.h, out.l];
})();

/** Streaming XXH64 with seed 0; {@link digestLow32} is zstd's content checksum. */
class Xxh64 {
  // Accumulators v1…v4 as [hi, lo] pairs.
  #v = new Uint32Array(XXH64_INIT);
  #tail = new Uint8Array(32);
  #tailLength = 0;
  #total = 0;

  update(bytes: Uint8Array): void {
    this.#total += bytes.length;
    let p = 0;
    if (this.#tailLength > 0) {
      const take = Math.min(32 - this.#tailLength, bytes.length);
      this.#tail.set(bytes.subarray(0, take), this.#tailLength);
      this.#tailLength += take;
      p = take;
      if (this.#tailLength < 32) return;
      this.#stripes(this.#tail, 0, 32);
      this.#tailLength = 0;
    }
    const end = p + ((bytes.length - p) & ~31);
    if (end > p) this.#stripes(bytes, p, end);
    if (end < bytes.length) {
      this.#tail.set(bytes.subarray(end), 0);
      this.#tailLength = bytes.length - end;
    }
  }

  #stripes(bytes: Uint8Array, start: number, end: number): void {
    const v = this.#v;
    let h1 = v[0], l1 = v[1], h2 = v[2], l2 = v[3], h3 = v[4], l3 = v[5], h4 = v[6], l4 = v[7];
    const d = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    for (let p = start; p < end; p += 32) {
      // Each lane: acc = rotl(acc + lane * P2, 31) * P1
      let ll = d.getUint32(p, true), lh = d.getUint32(p + 4, true);
      let mh = (Math.imul(lh, P2L) + Math.imul(ll, P2H) + mulHigh(ll, P2L)) >>> 0;
      let ml = Math.imul(ll, P2L) >>> 0;
      let sl = (l1 + ml) >>> 0;
      let sh = (h1 + mh + (sl < ml ? 1 : 0)) >>> 0;
      let rh = ((sh << 31) | (sl >>> 1)) >>> 0;
      let rl = ((sl << 31) | (sh >>> 1)) >>> 0;
      h1 = (Math.imul(rh, P1L) + Math.imul(rl, P1H) + mulHigh(rl, P1L)) >>> 0;
      l1 = Math.imul(rl, P1L) >>> 0;

      ll = d.getUint32(p + 8, true), lh = d.getUint32(p + 12, true);
      mh = (Math.imul(lh, P2L) + Math.imul(ll, P2H) + mulHigh(ll, P2L)) >>> 0;
      ml = Math.imul(ll, P2L) >>> 0;
      sl = (l2 + ml) >>> 0;
      sh = (h2 + mh + (sl < ml ? 1 : 0)) >>> 0;
      rh = ((sh << 31) | (sl >>> 1)) >>> 0;
      rl = ((sl << 31) | (sh >>> 1)) >>> 0;
      h2 = (Math.imul(rh, P1L) + Math.imul(rl, P1H) + mulHigh(rl, P1L)) >>> 0;
      l2 = Math.imul(rl, P1L) >>> 0;

      ll = d.getUint32(p + 16, true), lh = d.getUint32(p + 20, true);
      mh = (Math.imul(lh, P2L) + Math.imul(ll, P2H) + mulHigh(ll, P2L)) >>> 0;
      ml = Math.imul(ll, P2L) >>> 0;
      sl = (l3 + ml) >>> 0;
      sh = (h3 + mh + (sl < ml ? 1 : 0)) >>> 0;
      rh = ((sh << 31) | (sl >>> 1)) >>> 0;
      rl = ((sl << 31) | (sh >>> 1)) >>> 0;
      h3 = (Math.imul(rh, P1L) + Math.imul(rl, P1H) + mulHigh(rl, P1L)) >>> 0;
      l3 = Math.imul(rl, P1L) >>> 0;

      ll = d.getUint32(p + 24, true), lh = d.getUint32(p + 28, true);
      mh = (Math.imul(lh, P2L) + Math.imul(ll, P2H) + mulHigh(ll, P2L)) >>> 0;
      ml = Math.imul(ll, P2L) >>> 0;
      sl = (l4 + ml) >>> 0;
      sh = (h4 + mh + (sl < ml ? 1 : 0)) >>> 0;
      rh = ((sh << 31) | (sl >>> 1)) >>> 0;
      rl = ((sl << 31) | (sh >>> 1)) >>> 0;
      h4 = (Math.imul(rh, P1L) + Math.imul(rl, P1H) + mulHigh(rl, P1L)) >>> 0;
      l4 = Math.imul(rl, P1L) >>> 0;
    }
    v[0] = h1, v[1] = l1, v[2] = h2, v[3] = l2, v[4] = h3, v[5] = l3, v[6] = h4, v[7] = l4;
  }

  /** The low 32 bits of the hash of everything updated so far. */
  digestLow32(): number {
    let h: number, l: number;
    const v = this.#v;
    const out = { h: 0, l: 0 };
    if (this.#total >= 32) {
      // rotl(v1,1) + rotl(v2,7) + rotl(v3,12) + rotl(v4,18)
      h = 0, l = 0;
      for (const [i, r] of [[0, 1], [2, 7], [4, 12], [6, 18]]) {
        rotl(v[i], v[i + 1], r, out);
        add(h, l, out.h, out.l, out);
        h = out.h, l = out.l;
      }
      for (let i = 0; i < 8; i += 2) {
        // h = (h ^ round(0, v)) * P1 + P4
        round(0, 0, v[i], v[i + 1], out);
        mul(h ^ out.h, l ^ out.l, P1H, P1L, out);
        add(out.h, out.l, P4H, P4L, out);
        h = out.h, l = out.l;
      }
    } else {
      h = P5H, l = P5L;
    }
    add(h, l, Math.floor(this.#total / 2 ** 32), this.#total >>> 0, out);
    h = out.h, l = out.l;
    const t = this.#tail;
    let p = 0;
    const n = this.#tailLength;
    const u32 = (at: number) =>
      (t[at] | (t[at + 1] << 8) | (t[at + 2] << 16) | (t[at + 3] << 24)) >>> 0;
    for (; p + 8 <= n; p += 8) {
      round(0, 0, u32(p + 4), u32(p), out);
      rotl((h ^ out.h) >>> 0, (l ^ out.l) >>> 0, 27, out);
      mul(out.h, out.l, P1H, P1L, out);
      add(out.h, out.l, P4H, P4L, out);
      h = out.h, l = out.l;
    }
    if (p + 4 <= n) {
      mul(0, u32(p), P1H, P1L, out);
      rotl((h ^ out.h) >>> 0, (l ^ out.l) >>> 0, 23, out);
      mul(out.h, out.l, P2H, P2L, out);
      add(out.h, out.l, P3H, P3L, out);
      h = out.h, l = out.l;
      p += 4;
    }
    for (; p < n; p++) {
      mul(0, t[p], P5H, P5L, out);
      rotl((h ^ out.h) >>> 0, (l ^ out.l) >>> 0, 11, out);
      mul(out.h, out.l, P1H, P1L, out);
      h = out.h, l = out.l;
    }
    // avalanche: h ^= h >> 33; h *= P2; h ^= h >> 29; h *= P3; h ^= h >> 32
    mul(h, (l ^ (h >>> 1)) >>> 0, P2H, P2L, out);
    h = out.h, l = out.l;
    mul(h ^ (h >>> 29), (l ^ ((l >>> 29) | (h << 3))) >>> 0, P3H, P3L, out);
    h = out.h, l = out.l;
    return (l ^ h) >>> 0;
  }
}

function add(ah: number, al: number, bh: number, bl: number, out: { h: number; l: number }) {
  const l = (al + bl) >>> 0;
  out.h = (ah + bh + (l < al ? 1 : 0)) >>> 0;
  out.l = l;
}

function mul(ah: number, al: number, bh: number, bl: number, out: { h: number; l: number }) {
  out.h = (Math.imul(ah, bl) + Math.imul(al, bh) + mulHigh(al, bl)) >>> 0;
  out.l = Math.imul(al, bl) >>> 0;
}

function rotl(h: number, l: number, r: number, out: { h: number; l: number }) {
  if (r >= 32) {
    [h, l] = [l, h];
    r -= 32;
  }
  if (r === 0) {
    out.h = h >>> 0, out.l = l >>> 0;
    return;
  }
  out.h = ((h << r) | (l >>> (32 - r))) >>> 0;
  out.l = ((l << r) | (h >>> (32 - r))) >>> 0;
}

/** acc = rotl(acc + lane * P2, 31) * P1 */
function round(ah: number, al: number, lh: number, ll: number, out: { h: number; l: number }) {
  mul(lh, ll, P2H, P2L, out);
  add(ah, al, out.h, out.l, out);
  rotl(out.h, out.l, 31, out);
  mul(out.h, out.l, P1H, P1L, out);
}

// ---------------------------------------------------------------------------------------------
// xz: the native streaming transform of @napi-rs/lzma (lzma-rust2), loaded on first use.

interface XzNamespace {
  decompressStream(input: ReadableStream<Uint8Array>): ReadableStream<Uint8Array>;
  decompressSync(input: Uint8Array): Uint8Array;
}

let xzNamespace: Promise<XzNamespace> | undefined;

function loadXz(): Promise<XzNamespace> {
  xzNamespace ??= (async () => {
    let xz: XzNamespace;
    try {
      xz = (await import("@napi-rs/lzma")).xz as unknown as XzNamespace;
    } catch (error) {
      xzNamespace = undefined;
      throw new Error(
        `xz decompression is unavailable (the @napi-rs/lzma binding needs --allow-ffi): ${
          error instanceof Error ? error.message.split("\n")[0] : String(error)
        }`,
        { cause: error },
      );
    }
    // The WASM build replaces the native transform by one that buffers the whole input.
    if (!Object.hasOwn(xz, "decompressSync") || typeof xz.decompressStream !== "function") {
      throw new Error("xz decompression needs the native @napi-rs/lzma binding (not the WASM one)");
    }
    return xz;
  })();
  return xzNamespace;
}

/** Largest piece handed to the xz binding, which queues dozens of pieces of input ahead. */
const XZ_PIECE = 64 * 1024;

async function* decodeXz(input: InputQueue): AsyncGenerator<Uint8Array, void, undefined> {
  const xz = await loadXz();
  let chunk: Uint8Array | null = await next(input);
  if (chunk === null) throw new FormatError("Cannot decompress xz stream: empty input");
  let offset = 0;
  const source = new ReadableStream<Uint8Array>({
    async pull(controller) {
      if (chunk !== null && offset >= chunk.length) {
        chunk = await next(input);
        offset = 0;
      }
      if (chunk === null) {
        controller.close();
        return;
      }
      controller.enqueue(chunk.subarray(offset, offset + XZ_PIECE));
      offset += XZ_PIECE;
    },
  }, { highWaterMark: 0 });
  const reader = xz.decompressStream(source).getReader();
  let done = false;
  try {
    for (;;) {
      const step = await reader.read();
      if (step.done) {
        done = true;
        return;
      }
      yield view(step.value);
    }
  } finally {
    if (!done) reader.cancel().catch(() => {});
  }
}

// ---------------------------------------------------------------------------------------------
// brotli

/** Written after the input: a finished decoder leaves it unconsumed, a truncated one eats it. */
const BROTLI_SENTINEL = new Uint8Array([0xff]);

async function* decodeBrotli(input: InputQueue): AsyncGenerator<Uint8Array, void, undefined> {
  const pump = new ZlibPump(
    zlib.createBrotliDecompress({ chunkSize: ZLIB_CHUNK_SIZE }) as unknown as ZlibStream,
  );
  try {
    for (let chunk = await next(input); chunk !== null; chunk = await next(input)) {
      yield* pump.write(chunk);
      if (pump.consumed < input.position) {
        throw new FormatError(
          `Cannot decompress br stream: ${input.position - pump.consumed} bytes of trailing ` +
            `data after the stream (at byte ${pump.consumed})`,
        );
      }
    }
    if (input.position === 0) throw new FormatError("Cannot decompress br stream: empty input");
    yield* pump.write(BROTLI_SENTINEL);
    if (pump.consumed > input.position) {
      throw new IntegrityError(
        `Cannot decompress br stream: input truncated (${input.position} bytes read)`,
      );
    }
    yield* pump.end();
  } finally {
    pump.destroy();
  }
}

// ---------------------------------------------------------------------------------------------
// bzip2: "BZh" + level, then blocks (48-bit magic 0x314159265359, CRC, Huffman-coded MTF/RLE2
// symbols of a BWT, RLE1 on top) and an end marker (0x177245385090 + combined CRC), padded to
// a byte. Streams may be concatenated.

const BZ_MAX_CODE_LENGTH = 20;
const BZ_GROUP_SIZE = 50;
const BZ_MAX_SELECTORS = 18002;
/** Huffman codes up to this many bits are decoded with one table lookup. */
const BZ_LOOKUP_BITS = 10;
/** Output piece size. */
const BZ_OUTPUT_SIZE = 256 * 1024;

/** Thrown inside a block parse when the buffered input ends; the parse restarts later. */
const UNDERFLOW = Symbol("underflow");

const BZ_CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i << 24;
    for (let k = 0; k < 8; k++) c = c & 0x80000000 ? (c << 1) ^ 0x04c11db7 : c << 1;
    table[i] = c >>> 0;
  }
  return table;
})();

const enum Bz {
  StreamHeader,
  Block,
  Output,
}

/** One Huffman table of a bzip2 block. */
interface BzTable {
  /** `symbol << 5 | length` for codes of ≤ BZ_LOOKUP_BITS bits, -1 for longer ones. */
  lookup: Int32Array;
  /** Per length: first code, count and offset into `symbols` (canonical order). */
  first: Int32Array;
  count: Int32Array;
  offset: Int32Array;
  symbols: Uint16Array;
  maxLength: number;
}

/**
 * A bzip2 decoder over buffered input: `push` input, then call `step` until it asks for more
 * input or reports the end. Output is produced in pieces of at most 256 KiB.
 */
class Bzip2Decoder {
  #buf = new Uint8Array(1 << 16);
  #end = 0;
  /** Bit position of the next unread bit in `#buf`. */
  #bit = 0;
  /** Bytes dropped from the front of `#buf` so far (for error messages). */
  #dropped = 0;
  #state = Bz.StreamHeader;
  #streams = 0;
  #level = 0;
  #threshold = 1 << 16;
  #streamCrc = 0;
  // The current block.
  #tt = new Uint32Array(0);
  /** The block after the inverse BWT, before RLE1 decoding. */
  #bwt = new Uint8Array(0);
  #blockCrc = 0;
  #blocks = 0;
  #crc = 0;
  /** Next byte of `#bwt`. */
  #tPos = 0;
  #left = 0;
  #last = -1;
  #run = 0;
  #repeat = 0;

  push(chunk: Uint8Array): void {
    if (this.#end + chunk.length <= this.#buf.length) {
      this.#buf.set(chunk, this.#end);
      this.#end += chunk.length;
      return;
    }
    const keep = this.#bit >>> 3;
    const live = this.#end - keep;
    if (live + chunk.length > this.#buf.length) {
      let size = this.#buf.length;
      while (size < live + chunk.length) size *= 2;
      const grown = new Uint8Array(size);
      grown.set(this.#buf.subarray(keep, this.#end));
      this.#buf = grown;
    } else if (keep > 0) {
      this.#buf.copyWithin(0, keep, this.#end);
    }
    this.#buf.set(chunk, live);
    this.#end = live + chunk.length;
    this.#bit -= keep * 8;
    this.#dropped += keep;
  }

  /** The next output piece, `null` when more input is needed, or `true` at the end. */
  step(ended: boolean): Uint8Array | null | true {
    for (;;) {
      switch (this.#state) {
        case Bz.StreamHeader: {
          const at = this.#bit >>> 3;
          const available = this.#end - at;
          if (available < 4) {
            if (!ended) return null;
            if (available === 0 && this.#streams > 0) return true;
            if (available === 0) {
              throw new FormatError("Cannot decompress bzip2 stream: empty input");
            }
            if (this.#streams > 0) throw this.#trailing(at);
            throw new IntegrityError(
              "Cannot decompress bzip2 stream: input truncated in the header",
            );
          }
          const b = this.#buf;
          if (
            b[at] !== 0x42 || b[at + 1] !== 0x5a || b[at + 2] !== 0x68 || b[at + 3] < 0x31 ||
            b[at + 3] > 0x39
          ) {
            if (this.#streams > 0) throw this.#trailing(at);
            throw new FormatError("Cannot decompress bzip2 stream: bad magic (not bzip2)");
          }
          this.#level = b[at + 3] - 0x30;
          if (this.#tt.length < this.#level * 100000) {
            this.#tt = new Uint32Array(this.#level * 100000);
            this.#bwt = new Uint8Array(this.#level * 100000);
          }
          this.#bit += 32;
          this.#streams++;
          this.#streamCrc = 0;
          this.#state = Bz.Block;
          continue;
        }
        case Bz.Block: {
          const available = this.#end - (this.#bit >>> 3);
          if (!ended && available < this.#threshold) return null;
          const start = this.#bit;
          let parsed: boolean;
          try {
            parsed = this.#parseBlock();
          } catch (error) {
            if (error !== UNDERFLOW) throw error;
            this.#bit = start;
            if (ended) {
              throw new IntegrityError(
                `Cannot decompress bzip2 stream: input truncated in block ${this.#blocks + 1} ` +
                  `of stream ${this.#streams}`,
              );
            }
            this.#threshold = Math.max(this.#threshold, available * 2);
            return null;
          }
          const used = (this.#bit - start) >>> 3;
          this.#threshold = Math.max(1 << 16, used + (used >>> 2) + 4096);
          this.#state = parsed ? Bz.Output : Bz.StreamHeader;
          continue;
        }
        case Bz.Output: {
          const out = new Uint8Array(Math.min(BZ_OUTPUT_SIZE, this.#bound()));
          const n = this.#fill(out);
          if (this.#left === 0 && this.#repeat === 0) {
            const crc = ~this.#crc >>> 0;
            if (crc !== this.#blockCrc) {
              throw new IntegrityError(
                `Cannot decompress bzip2 stream: block ${this.#blocks} of stream ` +
                  `${this.#streams} CRC mismatch (stored ${hex32(this.#blockCrc)}, ` +
                  `computed ${hex32(crc)})`,
              );
            }
            this.#streamCrc = (((this.#streamCrc << 1) | (this.#streamCrc >>> 31)) ^ crc) >>> 0;
            this.#state = Bz.Block;
          }
          if (n > 0) return out.subarray(0, n);
          continue;
        }
      }
    }
  }

  #trailing(at: number): FormatError {
    return new FormatError(
      `Cannot decompress bzip2 stream: ${this.#end - at} bytes of trailing data after ` +
        `stream ${this.#streams} (at byte ${this.#dropped + at})`,
    );
  }

  /** An upper bound of the output left in this block. */
  #bound(): number {
    return this.#repeat + this.#left * 64;
  }

  /** Reads `n` ≤ 24 bits, big-endian. */
  #bits(n: number): number {
    const bit = this.#bit;
    if (bit + n > this.#end * 8) throw UNDERFLOW;
    const b = this.#buf;
    const at = bit >>> 3;
    // 32 bits starting at byte `at` (bytes past the end read as 0: they are never used).
    const word = ((b[at] << 24) | (b[at + 1] << 16) | (b[at + 2] << 8) | b[at + 3]) >>> 0;
    this.#bit = bit + n;
    return (word << (bit & 7)) >>> (32 - n);
  }

  /**
   * Parses the next block into `#tt` (true), or the end-of-stream marker (false), from the
   * buffered input; throws UNDERFLOW if the buffer ends first.
   */
  #parseBlock(): boolean {
    const fail = (detail: string) =>
      new IntegrityError(
        `Cannot decompress bzip2 stream: block ${this.#blocks + 1} of stream ${this.#streams}: ` +
          detail,
      );
    const magicHigh = this.#bits(24);
    const magicLow = this.#bits(24);
    if (magicHigh === 0x177245 && magicLow === 0x385090) {
      const stored = ((this.#bits(16) << 16) | this.#bits(16)) >>> 0;
      if (stored !== this.#streamCrc) {
        throw new IntegrityError(
          `Cannot decompress bzip2 stream: stream ${this.#streams} CRC mismatch ` +
            `(stored ${hex32(stored)}, computed ${hex32(this.#streamCrc)})`,
        );
      }
      this.#bit = (this.#bit + 7) & ~7;
      this.#blocks = 0;
      return false;
    }
    if (magicHigh !== 0x314159 || magicLow !== 0x265359) {
      throw new FormatError(
        `Cannot decompress bzip2 stream: bad block magic in stream ${this.#streams} ` +
          `after block ${this.#blocks}`,
      );
    }
    const blockCrc = ((this.#bits(16) << 16) | this.#bits(16)) >>> 0;
    if (this.#bits(1)) {
      throw new FormatError(
        "Cannot decompress bzip2 stream: randomised blocks (bzip2 before 0.9.5) are not supported",
      );
    }
    const origPtr = this.#bits(24);

    // Symbols in use.
    const used = this.#bits(16);
    const seqToUnseq = new Uint8Array(256);
    let inUse = 0;
    for (let i = 0; i < 16; i++) {
      if ((used & (0x8000 >>> i)) === 0) continue;
      const bits = this.#bits(16);
      for (let j = 0; j < 16; j++) {
        if (bits & (0x8000 >>> j)) seqToUnseq[inUse++] = i * 16 + j;
      }
    }
    if (inUse === 0) throw fail("no symbols in use");
    const alphaSize = inUse + 2;

    // Selectors.
    const groups = this.#bits(3);
    if (groups < 2 || groups > 6) throw fail(`bad number of Huffman tables ${groups}`);
    const selectorCount = this.#bits(15);
    if (selectorCount < 1) throw fail("no selectors");
    const selectors = new Uint8Array(Math.min(selectorCount, BZ_MAX_SELECTORS));
    const groupMtf = [0, 1, 2, 3, 4, 5];
    for (let i = 0; i < selectorCount; i++) {
      let j = 0;
      while (this.#bits(1)) {
        if (++j >= groups) throw fail("bad selector");
      }
      if (i < BZ_MAX_SELECTORS) {
        const g = groupMtf[j];
        for (; j > 0; j--) groupMtf[j] = groupMtf[j - 1];
        groupMtf[0] = g;
        selectors[i] = g;
      }
    }

    // Huffman tables.
    const tables: BzTable[] = [];
    const lengths = new Uint8Array(alphaSize);
    for (let t = 0; t < groups; t++) {
      let length = this.#bits(5);
      for (let i = 0; i < alphaSize; i++) {
        for (;;) {
          if (length < 1 || length > BZ_MAX_CODE_LENGTH) throw fail("bad Huffman code length");
          if (!this.#bits(1)) break;
          length += this.#bits(1) ? -1 : 1;
        }
        lengths[i] = length;
      }
      tables.push(bzTable(lengths, fail));
    }

    // MTF/RLE2 symbols into tt.
    const tt = this.#tt;
    const limit = this.#level * 100000;
    const counts = new Int32Array(256);
    const mtf = new Uint8Array(256);
    for (let i = 0; i < 256; i++) mtf[i] = i;
    const endOfBlock = inUse + 1;
    const buf = this.#buf;
    const end = this.#end;
    let pos = this.#bit >>> 3;
    let bitBuf = 0;
    let bitCount = 0;
    // Load the bits of the current partial byte.
    if (this.#bit & 7) {
      bitCount = 8 - (this.#bit & 7);
      bitBuf = buf[pos++] & ((1 << bitCount) - 1);
    }
    /** Whether the bits read so far run past the buffered input (zeros were read instead). */
    const overrun = () => pos * 8 - bitCount > end * 8;
    let nblock = 0;
    let group = -1;
    let groupLeft = 0;
    let table = tables[0];
    let runLength = 0;
    let runWeight = 0;
    for (;;) {
      if (groupLeft === 0) {
        // Bits past the real end were read as zeros: stop there.
        if (pos * 8 - bitCount > end * 8) throw UNDERFLOW;
        group++;
        if (group >= selectors.length) {
          throw overrun() ? UNDERFLOW : fail("more symbol groups than selectors");
        }
        table = tables[selectors[group]];
        groupLeft = BZ_GROUP_SIZE;
      }
      groupLeft--;
      while (bitCount <= 24) {
        bitBuf = (bitBuf << 8) | (pos < end ? buf[pos] : 0);
        pos++;
        bitCount += 8;
      }
      // Decode one symbol.
      let symbol: number;
      const entry =
        table.lookup[(bitBuf >>> (bitCount - BZ_LOOKUP_BITS)) & ((1 << BZ_LOOKUP_BITS) - 1)];
      if (entry >= 0) {
        symbol = entry >>> 5;
        bitCount -= entry & 31;
      } else {
        let length = BZ_LOOKUP_BITS + 1;
        for (;; length++) {
          if (length > table.maxLength) throw overrun() ? UNDERFLOW : fail("bad Huffman code");
          const code = (bitBuf >>> (bitCount - length)) & ((1 << length) - 1);
          const index = code - table.first[length];
          if (index >= 0 && index < table.count[length]) {
            symbol = table.symbols[table.offset[length] + index];
            break;
          }
        }
        bitCount -= length;
      }
      bitBuf &= (1 << bitCount) - 1;

      if (symbol <= 1) {
        // RUNA / RUNB: a bijective base-2 run length of the front MTF byte.
        if (runWeight === 0) runWeight = 1;
        runLength += runWeight << symbol;
        runWeight <<= 1;
        if (runLength > limit) throw overrun() ? UNDERFLOW : fail("run longer than the block");
        continue;
      }
      if (runWeight !== 0) {
        const byte = seqToUnseq[mtf[0]];
        if (nblock + runLength > limit) {
          throw overrun() ? UNDERFLOW : fail("block longer than its level allows");
        }
        tt.fill(byte, nblock, nblock + runLength);
        counts[byte] += runLength;
        nblock += runLength;
        runLength = 0;
        runWeight = 0;
      }
      if (symbol === endOfBlock) break;
      if (symbol > endOfBlock) throw overrun() ? UNDERFLOW : fail("bad symbol");
      // Move-to-front of index symbol - 1.
      let index = symbol - 1;
      const front = mtf[index];
      if (index < 16) {
        for (; index > 0; index--) mtf[index] = mtf[index - 1];
      } else {
        mtf.copyWithin(1, 0, index);
      }
      mtf[0] = front;
      const byte = seqToUnseq[front];
      if (nblock >= limit) throw overrun() ? UNDERFLOW : fail("block longer than its level allows");
      tt[nblock++] = byte;
      counts[byte]++;
    }
    if (pos * 8 - bitCount > end * 8) throw UNDERFLOW;
    this.#bit = pos * 8 - bitCount;
    if (origPtr >= nblock) throw fail(`origin pointer ${origPtr} outside the block of ${nblock}`);

    // Inverse BWT: link each position to the next one, the byte in the low 8 bits.
    const next = new Int32Array(256);
    for (let i = 0, sum = 0; i < 256; i++) {
      next[i] = sum;
      sum += counts[i];
    }
    for (let i = 0; i < nblock; i++) {
      const byte = tt[i] & 0xff;
      tt[next[byte]++] |= i << 8;
    }
    // Follow the links once into a byte array (one cache miss per byte, in a tight loop).
    const bwt = this.#bwt;
    for (let i = 0, p = tt[origPtr] >>> 8; i < nblock; i++) {
      const entry = tt[p];
      bwt[i] = entry;
      p = entry >>> 8;
    }
    this.#tPos = 0;
    this.#left = nblock;
    this.#last = -1;
    this.#run = 0;
    this.#repeat = 0;
    this.#crc = 0xffffffff;
    this.#blockCrc = blockCrc;
    this.#blocks++;
    return true;
  }

  /** Writes the next bytes of the block (RLE1 decoding) into `out`; returns the count. */
  #fill(out: Uint8Array): number {
    const bwt = this.#bwt;
    let tPos = this.#tPos, left = this.#left, last = this.#last, run = this.#run;
    let repeat = this.#repeat;
    let o = 0;
    const size = out.length;
    while (o < size) {
      if (repeat > 0) {
        const n = Math.min(repeat, size - o);
        out.fill(last, o, o + n);
        o += n;
        repeat -= n;
        continue;
      }
      if (left === 0) break;
      const byte = bwt[tPos++];
      left--;
      if (run === 4) {
        repeat = byte;
        run = 0;
        continue;
      }
      if (run > 0 && byte === last) {
        run++;
      } else {
        last = byte;
        run = 1;
      }
      out[o++] = byte;
    }
    this.#tPos = tPos, this.#left = left, this.#last = last, this.#run = run;
    this.#repeat = repeat;
    let crc = this.#crc;
    for (let i = 0; i < o; i++) crc = (crc << 8) ^ BZ_CRC_TABLE[(crc >>> 24) ^ out[i]];
    this.#crc = crc;
    return o;
  }
}

/** Builds the canonical Huffman decoding table of code `lengths` (bzip2 order). */
function bzTable(lengths: Uint8Array, fail: (detail: string) => Error): BzTable {
  const count = new Int32Array(BZ_MAX_CODE_LENGTH + 2);
  for (const length of lengths) count[length]++;
  let maxLength = 0;
  for (let l = BZ_MAX_CODE_LENGTH; l > 0; l--) {
    if (count[l] > 0) {
      maxLength = l;
      break;
    }
  }
  const first = new Int32Array(BZ_MAX_CODE_LENGTH + 2);
  const offset = new Int32Array(BZ_MAX_CODE_LENGTH + 2);
  let code = 0;
  let index = 0;
  for (let l = 1; l <= BZ_MAX_CODE_LENGTH; l++) {
    first[l] = code;
    offset[l] = index;
    code = (code + count[l]) << 1;
    index += count[l];
  }
  // Symbols in canonical order: by length, then by symbol value.
  const symbols = new Uint16Array(lengths.length);
  const fill = offset.slice();
  for (let s = 0; s < lengths.length; s++) symbols[fill[lengths[s]]++] = s;
  // Over-subscribed codes (more codes of a length than fit) cannot be decoded unambiguously.
  let space = 1;
  for (let l = 1; l <= BZ_MAX_CODE_LENGTH; l++) {
    space = space * 2 - count[l];
    if (space < 0) throw fail("over-subscribed Huffman code");
  }
  const lookup = new Int32Array(1 << BZ_LOOKUP_BITS).fill(-1);
  for (let l = 1; l <= Math.min(BZ_LOOKUP_BITS, maxLength); l++) {
    for (let i = 0; i < count[l]; i++) {
      const symbol = symbols[offset[l] + i];
      const shift = BZ_LOOKUP_BITS - l;
      const base = (first[l] + i) << shift;
      for (let k = 0; k < 1 << shift; k++) lookup[base + k] = (symbol << 5) | l;
    }
  }
  return { lookup, first, count, offset, symbols, maxLength };
}

async function* decodeBzip2(input: InputQueue): AsyncGenerator<Uint8Array, void, undefined> {
  const decoder = new Bzip2Decoder();
  let ended = false;
  for (;;) {
    const result = decoder.step(ended);
    if (result === true) return;
    if (result !== null) {
      yield result;
      continue;
    }
    const chunk = await next(input);
    if (chunk === null) ended = true;
    else decoder.push(chunk);
  }
}
