/**
 * Content-defined chunking with FastCDC (pure, no I/O).
 *
 * Owns the cut-point rule that splits an uncompressed NAR into chunks (DESIGN.md §3). It
 * follows FastCDC v2020 exactly as the Rust crate fastcdc-rs implements it (module `v2020`,
 * normalization level 1 by default), so that the cut points of
 * `vectors/fastcdc/expected.json` are reproduced byte for byte:
 *
 * - GEAR[i] is the big-endian u64 made of the first 8 bytes of MD5 over 64 bytes that all
 *   equal i; GEAR_LS[i] is GEAR[i] << 1 (mod 2^64). A non-zero seed XORs GEAR with `seed`
 *   and GEAR_LS with `seed << 1`.
 * - Masks come from the crate's MASKS table, indexed by round(log2(avg)) ± normalization;
 *   the "small" mask (more bits) applies before the average size, the "large" one after.
 * - The gear hash rolls two bytes per step, starting at `floor(min / 2)` pairs:
 *   `h = (h << 2) + GEAR_LS[b[2i]]`, test `h & (mask << 1)`, cut before byte 2i;
 *   `h = h + GEAR[b[2i + 1]]`, test `h & mask`, cut before byte 2i + 1. A buffer no longer
 *   than `min` is one chunk; a chunk never exceeds `max`.
 *
 * The 64-bit hash is kept as two int32 halves (no BigInt in the hot loop). The original
 * FastCDC 2016 rule of the same crate (`v2016`) is available as {@link cutPointsV2016} for
 * the vectors only.
 * @module
 */

import { createHash } from "node:crypto";

/** Sizes (bytes) that bound the chunks FastCDC produces, plus optional tuning. */
export interface ChunkerOptions {
  /** Smallest chunk, except for the last one of a stream (≥ 64). */
  minSize: number;
  /** Desired average chunk size (256 … 4 MiB); picks the masks. */
  avgSize: number;
  /** Largest chunk (1 KiB … 16 MiB, ≥ avgSize). */
  maxSize: number;
  /** Normalization level 0–3 (fastcdc-rs `Normalization`); default 1. */
  normalization?: number;
  /** Gear seed (fastcdc-rs `with_level_and_seed`); default 0n, which arca always uses. */
  seed?: bigint;
}

/** The chunk sizes arca uses: min 16 KiB, average 64 KiB, max 256 KiB. */
export const DEFAULT_CHUNKER_OPTIONS: Readonly<ChunkerOptions> = Object.freeze({
  minSize: 16384,
  avgSize: 65536,
  maxSize: 262144,
});

/** fastcdc-rs MASKS: index = number of bits of the target size (5 and 25 only for NC 3). */
const MASKS: readonly bigint[] = [
  0n,
  0n,
  0n,
  0n,
  0n,
  0x0000000001804110n,
  0x0000000001803110n,
  0x0000000018035100n,
  0x0000001800035300n,
  0x0000019000353000n,
  0x0000590003530000n,
  0x0000d90003530000n,
  0x0000d90103530000n,
  0x0000d90303530000n,
  0x0000d90313530000n,
  0x0000d90f03530000n,
  0x0000d90303537000n,
  0x0000d90703537000n,
  0x0000d90707537000n,
  0x0000d91707537000n,
  0x0000d91747537000n,
  0x0000d91767537000n,
  0x0000d93767537000n,
  0x0000d93777537000n,
  0x0000d93777577000n,
  0x0000db3777577000n,
];

const U64 = (1n << 64n) - 1n;

/** The unseeded GEAR table as 64-bit values (MD5 of 64 × byte i, first 8 bytes, big-endian). */
const GEAR: readonly bigint[] = (() => {
  const table: bigint[] = [];
  for (let i = 0; i < 256; i++) {
    const digest = createHash("md5").update(new Uint8Array(64).fill(i)).digest();
    table.push(digest.readBigUInt64BE(0));
  }
  return table;
})();

/** A gear table split into low and high 32-bit halves, as the hot loop reads it. */
interface SplitTable {
  lo: Int32Array;
  hi: Int32Array;
}

/** Everything the scan loop needs, derived once from {@link ChunkerOptions}. */
interface Params {
  min: number;
  avg: number;
  max: number;
  gear: SplitTable;
  gearLs: SplitTable;
  /** small mask, small mask << 1, large mask, large mask << 1: lo/hi halves each */
  sLo: number;
  sHi: number;
  sLsLo: number;
  sLsHi: number;
  lLo: number;
  lHi: number;
  lLsLo: number;
  lLsHi: number;
}

function splitTable(values: readonly bigint[]): SplitTable {
  const lo = new Int32Array(256);
  const hi = new Int32Array(256);
  for (let i = 0; i < 256; i++) {
    lo[i] = Number(BigInt.asIntN(32, values[i]));
    hi[i] = Number(BigInt.asIntN(32, values[i] >> 32n));
  }
  return { lo, hi };
}

function low32(value: bigint): number {
  return Number(BigInt.asIntN(32, value));
}

function high32(value: bigint): number {
  return Number(BigInt.asIntN(32, value >> 32n));
}

function log2Rounded(value: number): number {
  return Math.round(Math.log2(value));
}

const paramCache = new Map<string, Params>();

function checkOptions(options: ChunkerOptions): number {
  const { minSize, avgSize, maxSize } = options;
  const level = options.normalization ?? 1;
  for (const [name, value] of [["minSize", minSize], ["avgSize", avgSize], ["maxSize", maxSize]]) {
    if (!Number.isSafeInteger(value)) {
      throw new RangeError(`Invalid chunker option: ${name} must be an integer, got ${value}`);
    }
  }
  if (minSize < 64 || minSize > 1_048_576) {
    throw new RangeError(`Invalid chunker option: minSize ${minSize} is outside 64..1048576`);
  }
  if (avgSize < 256 || avgSize > 4_194_304) {
    throw new RangeError(`Invalid chunker option: avgSize ${avgSize} is outside 256..4194304`);
  }
  if (maxSize < 1024 || maxSize > 16_777_216) {
    throw new RangeError(`Invalid chunker option: maxSize ${maxSize} is outside 1024..16777216`);
  }
  if (minSize > avgSize || avgSize > maxSize) {
    throw new RangeError(
      `Invalid chunker options: need minSize <= avgSize <= maxSize, got ${minSize}/${avgSize}/${maxSize}`,
    );
  }
  if (!Number.isInteger(level) || level < 0 || level > 3) {
    throw new RangeError(`Invalid chunker option: normalization must be 0..3, got ${level}`);
  }
  return level;
}

function paramsFor(options: ChunkerOptions): Params {
  const level = checkOptions(options);
  const seed = BigInt.asUintN(64, options.seed ?? 0n);
  const key = `${options.minSize}/${options.avgSize}/${options.maxSize}/${level}/${seed}`;
  const cached = paramCache.get(key);
  if (cached !== undefined) return cached;
  const bits = log2Rounded(options.avgSize);
  const small = MASKS[bits + level];
  const large = MASKS[bits - level];
  const seedLs = (seed << 1n) & U64;
  const params: Params = {
    min: options.minSize,
    avg: options.avgSize,
    max: options.maxSize,
    gear: splitTable(GEAR.map((g) => g ^ seed)),
    gearLs: splitTable(GEAR.map((g) => ((g << 1n) & U64) ^ seedLs)),
    sLo: low32(small),
    sHi: high32(small),
    sLsLo: low32(small << 1n),
    sLsHi: high32(small << 1n),
    lLo: low32(large),
    lHi: high32(large),
    lLsLo: low32(large << 1n),
    lLsHi: high32(large << 1n),
  };
  if (paramCache.size > 64) paramCache.clear();
  paramCache.set(key, params);
  return params;
}

/** Hash state carried between {@link scanPairs} calls (low and high int32 halves). */
let stateLo = 0;
let stateHi = 0;

/**
 * Rolls the gear hash over byte pairs `from` … `to - 1` of the chunk starting at `base`,
 * testing `maskLo/maskHi` (and their << 1 twins). Starts from and leaves the hash in
 * stateLo/stateHi. Returns the cut offset relative to `base`, or -1 when no pair matched.
 */
function scanPairs(
  data: Uint8Array,
  base: number,
  from: number,
  to: number,
  p: Params,
  small: boolean,
): number {
  const gLo = p.gear.lo;
  const gHi = p.gear.hi;
  const lsLo = p.gearLs.lo;
  const lsHi = p.gearLs.hi;
  const mLo = small ? p.sLo : p.lLo;
  const mHi = small ? p.sHi : p.lHi;
  const mLsLo = small ? p.sLsLo : p.lLsLo;
  const mLsHi = small ? p.sLsHi : p.lLsHi;
  let lo = stateLo;
  let hi = stateHi;
  for (let i = from; i < to; i++) {
    const a = base + 2 * i;
    // h = (h << 2) + GEAR_LS[data[a]]
    const b0 = data[a];
    hi = (hi << 2) | (lo >>> 30);
    lo = lo << 2;
    let g = lsLo[b0];
    let sum = (lo + g) | 0;
    // carry out of the low half: the top bit of (lo & g) | ((lo | g) & ~sum)
    hi = (hi + lsHi[b0] + (((lo & g) | ((lo | g) & ~sum)) >>> 31)) | 0;
    lo = sum;
    if ((lo & mLsLo) === 0 && (hi & mLsHi) === 0) {
      stateLo = lo;
      stateHi = hi;
      return 2 * i;
    }
    // h = h + GEAR[data[a + 1]]
    const b1 = data[a + 1];
    g = gLo[b1];
    sum = (lo + g) | 0;
    hi = (hi + gHi[b1] + (((lo & g) | ((lo | g) & ~sum)) >>> 31)) | 0;
    lo = sum;
    if ((lo & mLo) === 0 && (hi & mHi) === 0) {
      stateLo = lo;
      stateHi = hi;
      return 2 * i + 1;
    }
  }
  stateLo = lo;
  stateHi = hi;
  return -1;
}

/** Length of the chunk that starts at `start` of a buffer whose data ends at `end`. */
function cutLength(data: Uint8Array, start: number, end: number, p: Params): number {
  let remaining = end - start;
  if (remaining <= p.min) return remaining;
  if (remaining > p.max) remaining = p.max;
  const center = remaining < p.avg ? remaining : p.avg;
  const limit1 = Math.floor(center / 2);
  const limit2 = Math.floor(remaining / 2);
  const first = Math.floor(p.min / 2);
  stateLo = 0;
  stateHi = 0;
  let cut = scanPairs(data, start, first, limit1, p, true);
  if (cut >= 0) return cut;
  cut = scanPairs(data, start, Math.max(first, limit1), limit2, p, false);
  return cut >= 0 ? cut : remaining;
}

/**
 * The end offsets of the FastCDC v2020 chunks of a whole buffer, in order; the last one is
 * `data.length` (an empty buffer has no chunks).
 *
 * @example
 * ```ts
 * const ends = cutPoints(new Uint8Array(1 << 20));
 * // all-zero data never matches a mask: chunks of maxSize
 * ends; // [262144, 524288, 786432, 1048576]
 * ```
 */
export function cutPoints(
  data: Uint8Array,
  options: ChunkerOptions = DEFAULT_CHUNKER_OPTIONS,
): number[] {
  const p = paramsFor(options);
  const ends: number[] = [];
  let start = 0;
  while (start < data.length) {
    start += cutLength(data, start, data.length, p);
    ends.push(start);
  }
  return ends;
}

/**
 * The end offsets of the chunks of fastcdc-rs's FastCDC 2016 rule (`v2016` module: one byte
 * per step, `h = (h << 1) + GEAR[b]`, cut before the matching byte). Only for the vectors:
 * arca chunks with {@link cutPoints} (v2020).
 */
export function cutPointsV2016(
  data: Uint8Array,
  options: ChunkerOptions = DEFAULT_CHUNKER_OPTIONS,
): number[] {
  const p = paramsFor(options);
  const mask = (small: boolean) =>
    (BigInt(small ? p.sHi >>> 0 : p.lHi >>> 0) << 32n) |
    BigInt(small ? p.sLo >>> 0 : p.lLo >>> 0);
  const maskS = mask(true);
  const maskL = mask(false);
  const gear = GEAR.map((g) => g ^ BigInt.asUintN(64, options.seed ?? 0n));
  const ends: number[] = [];
  let start = 0;
  while (start < data.length) {
    let remaining = data.length - start;
    let length = remaining;
    if (remaining > p.min) {
      if (remaining > p.max) remaining = p.max;
      const center = remaining < p.avg ? remaining : p.avg;
      let hash = 0n;
      length = remaining;
      for (let i = p.min; i < remaining; i++) {
        hash = ((hash << 1n) + gear[data[start + i]]) & U64;
        if ((hash & (i < center ? maskS : maskL)) === 0n) {
          length = i;
          break;
        }
      }
    }
    start += length;
    ends.push(start);
  }
  return ends;
}

/**
 * Streaming FastCDC v2020: push bytes in pieces of any size, get complete chunks back. The
 * boundaries are identical to {@link cutPoints} over the concatenation of everything pushed.
 *
 * Every returned chunk is a fresh copy that owns its whole `ArrayBuffer` (byteOffset 0,
 * byteLength = chunk length): it stays valid after further pushes, the pushed input may be
 * reused by the caller as soon as `push` returns, and a chunk may be transferred to a Worker.
 * Memory held: one buffer of maxSize bytes.
 *
 * @example
 * ```ts
 * const chunker = new StreamChunker();
 * for await (const piece of stream) for (const chunk of chunker.push(piece)) handle(chunk);
 * for (const chunk of chunker.finish()) handle(chunk);
 * ```
 */
export class StreamChunker {
  #p: Params;
  #buf: Uint8Array;
  #len = 0;
  /** Next byte pair to hash in the current chunk (pair i covers bytes 2i and 2i + 1). */
  #pair: number;
  #lo = 0;
  #hi = 0;
  #finished = false;

  /** Creates a chunker; options as for {@link cutPoints}. */
  constructor(options: ChunkerOptions = DEFAULT_CHUNKER_OPTIONS) {
    this.#p = paramsFor(options);
    this.#buf = new Uint8Array(this.#p.max);
    this.#pair = Math.floor(this.#p.min / 2);
  }

  /** Bytes pushed but not yet returned in a chunk. */
  get pending(): number {
    return this.#len;
  }

  /** Adds bytes; returns the chunks they completed (possibly none), in order. */
  push(bytes: Uint8Array): Uint8Array[] {
    if (this.#finished) throw new Error("StreamChunker.push called after finish");
    const out: Uint8Array[] = [];
    let offset = 0;
    while (offset < bytes.length) {
      const take = Math.min(this.#buf.length - this.#len, bytes.length - offset);
      this.#buf.set(bytes.subarray(offset, offset + take), this.#len);
      this.#len += take;
      offset += take;
      this.#cutAvailable(out);
    }
    return out;
  }

  /** Ends the stream: returns the remaining chunks (the last may be shorter than minSize). */
  finish(): Uint8Array[] {
    if (this.#finished) return [];
    this.#finished = true;
    const out: Uint8Array[] = [];
    this.#cutAvailable(out);
    // Every pair that fits in the data has been hashed without a match: the rest is one chunk.
    if (this.#len > 0) this.#emit(this.#len, out);
    this.#buf = new Uint8Array(0);
    return out;
  }

  /** Emits every chunk whose end is decided by the bytes buffered so far. */
  #cutAvailable(out: Uint8Array[]): void {
    const p = this.#p;
    for (;;) {
      // Hash the pairs that lie entirely within the buffered bytes (and within maxSize).
      const available = Math.min(Math.floor(this.#len / 2), Math.floor(p.max / 2));
      const limit1 = Math.floor(p.avg / 2);
      let cut = -1;
      stateLo = this.#lo;
      stateHi = this.#hi;
      if (this.#pair < limit1) {
        const to = Math.min(limit1, available);
        cut = scanPairs(this.#buf, 0, this.#pair, to, p, true);
        if (cut < 0 && to > this.#pair) this.#pair = to;
      }
      if (cut < 0 && this.#pair >= limit1 && this.#pair < available) {
        cut = scanPairs(this.#buf, 0, this.#pair, available, p, false);
        if (cut < 0) this.#pair = available;
      }
      this.#lo = stateLo;
      this.#hi = stateHi;
      if (cut < 0 && this.#len >= p.max) cut = p.max;
      if (cut < 0) return;
      this.#emit(cut, out);
    }
  }

  /** Emits the first `length` buffered bytes as a chunk and starts the next one. */
  #emit(length: number, out: Uint8Array[]): void {
    out.push(this.#buf.slice(0, length));
    this.#buf.copyWithin(0, length, this.#len);
    this.#len -= length;
    this.#pair = Math.floor(this.#p.min / 2);
    this.#lo = 0;
    this.#hi = 0;
  }
}
