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
 * {@link StreamChunker} (what imports use) runs the scan loop in a small WebAssembly module
 * written out here byte by byte (native 64-bit arithmetic, ~2 GB/s here), over its own
 * buffer in the module's memory. {@link cutPoints} and the JavaScript fallback keep the
 * 64-bit hash as two int32 halves (no BigInt in the hot loop, ~0.55 GB/s). The original
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

// ---------------------------------------------------------------------------------------------
// The scan loop in WebAssembly

/**
 * Byte offsets in a chunker's WebAssembly memory: GEAR (256 u64), GEAR_LS (256 u64), the
 * hash state (u64), the masks small, small << 1, large, large << 1 (u64 each), then the
 * data buffer.
 */
const WASM_GEAR = 0;
const WASM_GEAR_LS = 2048;
const WASM_STATE = 4096;
const WASM_MASKS = 4104;
const WASM_DATA = 4160;

function uleb(value: number): number[] {
  const out: number[] = [];
  do {
    let byte = value & 0x7f;
    value >>>= 7;
    if (value !== 0) byte |= 0x80;
    out.push(byte);
  } while (value !== 0);
  return out;
}

function sleb(value: number): number[] {
  const out: number[] = [];
  for (;;) {
    const byte = value & 0x7f;
    value >>= 7;
    if ((value === 0 && (byte & 0x40) === 0) || (value === -1 && (byte & 0x40) !== 0)) {
      out.push(byte);
      return out;
    }
    out.push(byte | 0x80);
  }
}

/**
 * The binary of a WebAssembly module, written here by hand, with one function
 * `scan(base, from, to, large) -> cut` that is {@link scanPairs} with native 64-bit
 * arithmetic (~2.5× faster than the int32-pair JavaScript here). It imports its memory
 * (`e.m`), laid out as the WASM_* offsets say; the hash state is read from and written back
 * to WASM_STATE, the masks are those at WASM_MASKS + 16 × large. In the text format:
 *
 * ```
 * (func (param $base i32) (param $from i32) (param $to i32) (param $large i32) (result i32)
 *   (local $h i64) (local $a i32) (local $end i32) (local $m i64) (local $mls i64)
 *   h = load64(STATE); m = load64(MASKS + 16 large); mls = load64(MASKS + 8 + 16 large)
 *   for (a = base + 2 from, end = base + 2 to; a < end; a += 2) {
 *     h = (h << 2) + load64(GEAR_LS + 8 load8(a));   if (h & mls) == 0: store h; return a - base
 *     h = h + load64(GEAR + 8 load8(a + 1));         if (h & m) == 0: store h; return a - base + 1
 *   }
 *   store64(STATE, h); return -1
 * ```
 */
function scanModuleBytes(): Uint8Array<ArrayBuffer> {
  const I32 = 0x7f;
  const I64 = 0x7e;
  const [base, from, to, large, h, a, end, m, mls] = [0, 1, 2, 3, 4, 5, 6, 7, 8];
  const get = (x: number) => [0x20, x];
  const set = (x: number) => [0x21, x];
  const tee = (x: number) => [0x22, x];
  const i32 = (n: number) => [0x41, ...sleb(n)];
  const i64 = (n: number) => [0x42, ...sleb(n)];
  const load64 = (offset: number) => [0x29, 3, ...uleb(offset)];
  const store64 = (offset: number) => [0x37, 3, ...uleb(offset)];
  const load8 = (offset: number) => [0x2d, 0, ...uleb(offset)];
  const [I32_ADD, I32_SUB, I32_SHL, I32_GE_U, I64_SHL, I64_ADD, I64_AND, I64_EQZ] = [
    0x6a,
    0x6b,
    0x74,
    0x4f,
    0x86,
    0x7c,
    0x83,
    0x50,
  ];
  const [BLOCK, LOOP, IF, END, BR, BR_IF, RETURN, VOID] = [
    0x02,
    0x03,
    0x04,
    0x0b,
    0x0c,
    0x0d,
    0x0f,
    0x40,
  ];
  const saveState = [...i32(0), ...get(h), ...store64(WASM_STATE)];
  const offsetOfA = [...get(a), ...get(base), I32_SUB];
  const body = [
    ...[3, 1, I64, 2, I32, 2, I64], // locals: h; a, end; m, mls
    ...i32(0),
    ...load64(WASM_STATE),
    ...set(h),
    ...get(large),
    ...i32(4),
    I32_SHL,
    ...load64(WASM_MASKS),
    ...set(m),
    ...get(large),
    ...i32(4),
    I32_SHL,
    ...load64(WASM_MASKS + 8),
    ...set(mls),
    ...[...get(base), ...get(from), ...i32(1), I32_SHL, I32_ADD, ...set(a)],
    ...[...get(base), ...get(to), ...i32(1), I32_SHL, I32_ADD, ...set(end)],
    ...[BLOCK, VOID, LOOP, VOID],
    ...[...get(a), ...get(end), I32_GE_U, BR_IF, 1],
    ...[...get(h), ...i64(2), I64_SHL],
    ...[...get(a), ...load8(0), ...i32(3), I32_SHL, ...load64(WASM_GEAR_LS), I64_ADD, ...tee(h)],
    ...[...get(mls), I64_AND, I64_EQZ, IF, VOID],
    ...[...saveState, ...offsetOfA, RETURN, END],
    ...get(h),
    ...[...get(a), ...load8(1), ...i32(3), I32_SHL, ...load64(WASM_GEAR), I64_ADD, ...tee(h)],
    ...[...get(m), I64_AND, I64_EQZ, IF, VOID],
    ...[...saveState, ...offsetOfA, ...i32(1), I32_ADD, RETURN, END],
    ...[...get(a), ...i32(2), I32_ADD, ...set(a), BR, 0],
    ...[END, END],
    ...saveState,
    ...i32(-1),
    END,
  ];
  const section = (id: number, content: number[]) => [id, ...uleb(content.length), ...content];
  const name = (text: string) => [...uleb(text.length), ...[...text].map((c) => c.charCodeAt(0))];
  return new Uint8Array([
    ...[0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00],
    ...section(1, [1, 0x60, 4, I32, I32, I32, I32, 1, I32]), // type 0: (i32 ×4) -> i32
    ...section(2, [1, ...name("e"), ...name("m"), 0x02, 0x00, 0x01]), // memory e.m, min 1 page
    ...section(3, [1, 0]), // one function of type 0
    ...section(7, [1, ...name("scan"), 0x00, 0]), // export it as "scan"
    ...section(10, [1, ...uleb(body.length), ...body]),
  ]);
}

/** The compiled scan module, or null where WebAssembly is unavailable (JS is used then). */
const scanModule: WebAssembly.Module | null = (() => {
  try {
    return new WebAssembly.Module(scanModuleBytes());
  } catch {
    return null;
  }
})();

/** A chunker's buffer and scan loop: in WebAssembly memory, or plain JavaScript. */
interface Scanner {
  /** The data buffer. */
  buf: Uint8Array;
  /** Resets the hash to 0 (a chunk starts). */
  reset(): void;
  /** {@link scanPairs} over `buf` from `base`, carrying the hash across calls. */
  scan(base: number, from: number, to: number, small: boolean): number;
}

function wasmScanner(p: Params, capacity: number): Scanner | null {
  if (scanModule === null) return null;
  try {
    const memory = new WebAssembly.Memory({ initial: Math.ceil((WASM_DATA + capacity) / 65536) });
    const instance = new WebAssembly.Instance(scanModule, { e: { m: memory } });
    const scan = instance.exports.scan as (b: number, f: number, t: number, l: number) => number;
    const words = new Int32Array(memory.buffer, 0, WASM_DATA / 4);
    for (let i = 0; i < 256; i++) {
      words[2 * i] = p.gear.lo[i];
      words[2 * i + 1] = p.gear.hi[i];
      words[(WASM_GEAR_LS >> 2) + 2 * i] = p.gearLs.lo[i];
      words[(WASM_GEAR_LS >> 2) + 2 * i + 1] = p.gearLs.hi[i];
    }
    const masks = [p.sLo, p.sHi, p.sLsLo, p.sLsHi, p.lLo, p.lHi, p.lLsLo, p.lLsHi];
    words.set(masks, WASM_MASKS >> 2);
    const state = WASM_STATE >> 2;
    return {
      buf: new Uint8Array(memory.buffer, WASM_DATA, capacity),
      reset() {
        words[state] = 0;
        words[state + 1] = 0;
      },
      scan(base, from, to, small) {
        return scan(WASM_DATA + base, from, to, small ? 0 : 1);
      },
    };
  } catch {
    return null;
  }
}

function jsScanner(p: Params, capacity: number): Scanner {
  let lo = 0;
  let hi = 0;
  const buf = new Uint8Array(capacity);
  return {
    buf,
    reset() {
      lo = 0;
      hi = 0;
    },
    scan(base, from, to, small) {
      stateLo = lo;
      stateHi = hi;
      const cut = scanPairs(buf, base, from, to, p, small);
      lo = stateLo;
      hi = stateHi;
      return cut;
    },
  };
}

/** Settings of {@link StreamChunker} that do not change its chunks. */
export interface StreamChunkerTuning {
  /** Run the scan loop in WebAssembly (default true); false: in plain JavaScript. */
  webAssembly?: boolean;
}

/**
 * Streaming FastCDC v2020: push bytes in pieces of any size, get complete chunks back. The
 * boundaries are identical to {@link cutPoints} over the concatenation of everything pushed.
 *
 * {@link StreamChunker.push} returns each chunk as a fresh copy that owns its whole
 * `ArrayBuffer` (byteOffset 0, byteLength = chunk length): it stays valid after further
 * pushes, and may be transferred to a Worker. {@link StreamChunker.pushTo} hands each
 * chunk to a callback as a view into the chunker's buffer instead (no copy, valid only
 * during the call). Either way the pushed input may be reused as soon as the call returns.
 * The scan loop runs in WebAssembly (plain JavaScript where that is unavailable).
 * Memory held: a buffer of maxSize + max(maxSize, 1 MiB) bytes.
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
  #scanner: Scanner;
  #buf: Uint8Array;
  /** Start of the current chunk, and end of the data, in #buf. */
  #start = 0;
  #end = 0;
  /** Next byte pair to hash in the current chunk (pair i covers bytes 2i and 2i + 1). */
  #pair: number;
  #finished = false;

  /** Creates a chunker; options as for {@link cutPoints}. */
  constructor(
    options: ChunkerOptions = DEFAULT_CHUNKER_OPTIONS,
    tuning: StreamChunkerTuning = {},
  ) {
    this.#p = paramsFor(options);
    const capacity = this.#p.max + Math.max(this.#p.max, 1 << 20);
    this.#scanner = (tuning.webAssembly === false ? null : wasmScanner(this.#p, capacity)) ??
      jsScanner(this.#p, capacity);
    this.#buf = this.#scanner.buf;
    this.#pair = Math.floor(this.#p.min / 2);
  }

  /** Bytes pushed but not yet returned in a chunk. */
  get pending(): number {
    return this.#end - this.#start;
  }

  /** Adds bytes; returns the chunks they completed (possibly none), in order, as copies. */
  push(bytes: Uint8Array): Uint8Array[] {
    const out: Uint8Array[] = [];
    this.pushTo(bytes, (chunk) => out.push(chunk.slice()));
    return out;
  }

  /**
   * Adds bytes; calls `onChunk` with each chunk they completed, in order, as a view into
   * the chunker's buffer that is valid only until `onChunk` returns.
   */
  pushTo(bytes: Uint8Array, onChunk: (chunk: Uint8Array) => void): void {
    if (this.#finished) throw new Error("StreamChunker.push called after finish");
    let offset = 0;
    while (offset < bytes.length) {
      if (this.#end === this.#buf.length) this.#compact();
      const take = Math.min(this.#buf.length - this.#end, bytes.length - offset);
      this.#buf.set(bytes.subarray(offset, offset + take), this.#end);
      this.#end += take;
      offset += take;
      this.#cutAvailable(onChunk);
    }
  }

  /** Ends the stream: returns the remaining chunks (the last may be shorter than minSize). */
  finish(): Uint8Array[] {
    const out: Uint8Array[] = [];
    this.finishTo((chunk) => out.push(chunk.slice()));
    return out;
  }

  /** Ends the stream, handing the remaining chunks to `onChunk` as views (see pushTo). */
  finishTo(onChunk: (chunk: Uint8Array) => void): void {
    if (this.#finished) return;
    this.#finished = true;
    this.#cutAvailable(onChunk);
    // Every pair that fits in the data has been hashed without a match: the rest is one chunk.
    if (this.#end > this.#start) this.#emit(this.#end - this.#start, onChunk);
  }

  /** Moves the current chunk's bytes to the start of the buffer. */
  #compact(): void {
    this.#buf.copyWithin(0, this.#start, this.#end);
    this.#end -= this.#start;
    this.#start = 0;
  }

  /** Emits every chunk whose end is decided by the bytes buffered so far. */
  #cutAvailable(onChunk: (chunk: Uint8Array) => void): void {
    const p = this.#p;
    const limit1 = Math.floor(p.avg / 2);
    const maxPairs = Math.floor(p.max / 2);
    for (;;) {
      // Hash the pairs that lie entirely within the buffered bytes (and within maxSize).
      const length = this.#end - this.#start;
      const available = Math.min(Math.floor(length / 2), maxPairs);
      let cut = -1;
      if (this.#pair < limit1) {
        const to = Math.min(limit1, available);
        if (to > this.#pair) {
          cut = this.#scanner.scan(this.#start, this.#pair, to, true);
          if (cut < 0) this.#pair = to;
        }
      }
      if (cut < 0 && this.#pair >= limit1 && this.#pair < available) {
        cut = this.#scanner.scan(this.#start, this.#pair, available, false);
        if (cut < 0) this.#pair = available;
      }
      if (cut < 0 && length >= p.max) cut = p.max;
      if (cut < 0) return;
      this.#emit(cut, onChunk);
    }
  }

  /** Emits the first `length` bytes of the current chunk and starts the next one. */
  #emit(length: number, onChunk: (chunk: Uint8Array) => void): void {
    const start = this.#start;
    this.#start += length;
    this.#pair = Math.floor(this.#p.min / 2);
    this.#scanner.reset();
    onChunk(this.#buf.subarray(start, start + length));
  }
}
