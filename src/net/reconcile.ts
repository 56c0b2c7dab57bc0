/**
 * Range-based set reconciliation (in the spirit of Negentropy, hoytech/negentropy
 * `docs/negentropy-protocol-v1.md`): two peers that each hold a set of items learn which
 * items the other lacks, with traffic proportional to the differences, not to the sets.
 * A pure state machine over bytes: no I/O, no clocks; the sync layer carries the messages.
 *
 * Items are `(timestamp, id)` pairs (a safe integer and 32 bytes) sorted by timestamp,
 * then id bytewise. {@link ReconcileStorage} seals a set and answers range fingerprints in
 * O(1) from prefix sums. {@link Reconciler} drives one session: the initiator calls
 * `initiate()`, then both sides feed each received message to `reconcile()` and send back
 * its `reply`, until `done`.
 *
 * Wire format (version byte 0xa1; not Negentropy's 0x61, because of mode 3 below):
 * ```
 * Message     := 0xa1 Range*
 * Range       := Bound Varint(mode) Payload         ranges are adjacent, bounds ascending
 * Bound       := Varint(0 = infinity | 1 + ts - previous ts) Varint(len ≤ 32) IdPrefix{len}
 * mode 0 Skip        :=                              nothing to do in this range
 * mode 1 Fingerprint := Byte{16}                     SHA-256(sum ‖ Varint(count))[:16]
 * mode 2 IdList      := Varint(n ≤ 256) Id{n}        all the sender's ids in the range
 * mode 3 Diff        := Varint(k) Bitmap{⌈k/8⌉} Varint(m) Id{m}
 * ```
 * Varints are base-128, most significant digit first, high bit on all but the last byte,
 * minimal. A bound's id prefix is padded with zero bytes; a range runs from the previous
 * range's upper bound (the first from timestamp 0, empty prefix) up to its own, exclusive;
 * after the last range an implicit Skip runs to infinity. `sum` is the sum of the range's
 * ids read as 256-bit little-endian integers, mod 2^256, written as 32 little-endian bytes.
 *
 * A Diff answers an IdList of k ids: bit i (LSB first) set means the answering side lacks
 * the i-th listed id; the m ids are those it holds in the range that the list lacked. So
 * both sides learn every difference (Negentropy tells only the initiator), and a Diff needs
 * no answer. A side answers a mismatching Fingerprint by splitting its items in the range
 * into 16 fingerprinted buckets, or an IdList under 32 items; an IdList by a Diff (or a
 * Skip when nothing differs, or a split when it holds too many items for one message).
 * A message that holds a Fingerprint or IdList expects a reply; the session is over when
 * one does not. Messages stay under `maxMessageBytes` (Negentropy's frame size limit): when
 * the answers grow too large, the sender answers the remaining ranges with its own
 * fingerprints (so they are refined next round at the same granularity), and when even
 * those do not fit, with one Fingerprint for everything from there to infinity.
 *
 * Hostile input: every malformed message, unsolicited Diff, or session that runs past its
 * limits (messages, ranges per message, differing ids) is a {@link ProtocolError}; work
 * and allocation per message are bounded by the message size limit.
 * @module
 */

import { createHash } from "node:crypto";
import { FormatError, ProtocolError } from "../errors.ts";

/** The protocol version byte that starts every message. */
export const RECONCILE_PROTOCOL_VERSION = 0xa1;
/** Length of an item id in bytes. */
export const RECONCILE_ID_BYTES = 32;
/** Length of a range fingerprint in bytes. */
export const RECONCILE_FINGERPRINT_BYTES = 16;
/** Number of buckets a mismatching range is split into. */
export const RECONCILE_BUCKETS = 16;
/** Ranges with fewer items than this are sent as an IdList instead of being split. */
export const RECONCILE_ID_LIST_THRESHOLD = 2 * RECONCILE_BUCKETS;
/** The most ids an IdList (and so a Diff's bitmap) may hold. */
export const RECONCILE_MAX_ID_LIST_IDS = 256;
/** Default limit of a message's size in either direction (fits a 1 MiB frame with room). */
export const RECONCILE_DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024;
/** Smallest accepted `maxMessageBytes`: room for any single range's answer. */
export const RECONCILE_MIN_MAX_MESSAGE_BYTES = 4096;

const MODE_SKIP = 0;
const MODE_FINGERPRINT = 1;
const MODE_ID_LIST = 2;
const MODE_DIFF = 3;
const MAX_TIMESTAMP = Number.MAX_SAFE_INTEGER;
const MAX_VARINT = 2 ** 53;
/** Most bytes one bound takes: 8-digit varint, 1-byte length, 32-byte prefix. */
const MAX_BOUND_BYTES = 8 + 1 + RECONCILE_ID_BYTES;
/** Room kept for the closing ranges of a cut-short message (a Skip and a Fingerprint). */
const REMAINDER_RESERVE = 2 * MAX_BOUND_BYTES + 2 + RECONCILE_FINGERPRINT_BYTES;
const DEFAULT_MAX_RANGES = 100_000;
const DEFAULT_MAX_ROUNDS = 1024;
const DEFAULT_MAX_IDS = 2_000_000;
const EMPTY = new Uint8Array(0);

/** One item of a reconciled set. */
export interface ReconcileItem {
  /** A non-negative safe integer, e.g. a record's registration time in milliseconds. */
  timestamp: number;
  /**
   * 32 bytes, e.g. the SHA-256 of the record; the caller decides. Give each id one
   * timestamp: the same id under two timestamps counts as two items, which makes the
   * reported differences hard to read.
   */
  id: Uint8Array;
}

/**
 * The exclusive upper bound of a range: `timestamp` (or `Infinity`, the end of the space)
 * and an id prefix of 0–32 bytes, implicitly padded with zero bytes.
 */
export interface ReconcileBound {
  timestamp: number;
  idPrefix: Uint8Array;
}

/** One decoded range of a message; ids are views into the message bytes. */
export type ReconcileRange =
  | { upper: ReconcileBound; mode: "skip" }
  | { upper: ReconcileBound; mode: "fingerprint"; fingerprint: Uint8Array }
  | { upper: ReconcileBound; mode: "idList"; ids: Uint8Array[] }
  | {
    upper: ReconcileBound;
    mode: "diff";
    /** Length of the IdList this Diff answers. */
    listed: number;
    /** Indexes into that IdList of the ids the sender lacks, ascending. */
    missing: number[];
    /** Ids the sender holds in the range that the IdList lacked. */
    extra: Uint8Array[];
  };

/** Limits applied when decoding a message. */
export interface DecodeReconcileOptions {
  /** Longest accepted message in bytes (default {@link RECONCILE_DEFAULT_MAX_MESSAGE_BYTES}). */
  maxMessageBytes?: number;
  /** Most ranges accepted in one message (default 100 000). */
  maxRanges?: number;
}

const INFINITY_BOUND: ReconcileBound = Object.freeze({ timestamp: Infinity, idPrefix: EMPTY });
const MIN_BOUND: ReconcileBound = Object.freeze({ timestamp: 0, idPrefix: EMPTY });

// ---------------------------------------------------------------------------------------
// Varints and ordering

function varintLength(value: number): number {
  let length = 1;
  while (value >= 128) {
    value = Math.floor(value / 128);
    length++;
  }
  return length;
}

function compareBytes(a: Uint8Array, b: Uint8Array): number {
  const length = Math.min(a.length, b.length);
  for (let i = 0; i < length; i++) {
    if (a[i] !== b[i]) return a[i] - b[i];
  }
  return a.length - b.length;
}

/** Orders two bounds (zero padding of the prefixes included); Infinity sorts last. */
function compareBounds(a: ReconcileBound, b: ReconcileBound): number {
  if (a.timestamp !== b.timestamp) return a.timestamp < b.timestamp ? -1 : 1;
  for (let i = 0; i < RECONCILE_ID_BYTES; i++) {
    const x = i < a.idPrefix.length ? a.idPrefix[i] : 0;
    const y = i < b.idPrefix.length ? b.idPrefix[i] : 0;
    if (x !== y) return x - y;
  }
  return 0;
}

/**
 * A set of 32-byte ids bucketed by a 48-bit number mixed from all their bytes with a
 * random salt (no strings are made; within a bucket the full bytes are compared). Honest
 * ids never fill a bucket; a peer cannot aim at one without knowing the salt, and a full
 * bucket only ends that peer's session.
 */
class IdSet {
  #buckets = new Map<number, Uint8Array | Uint8Array[]>();
  #salt = crypto.getRandomValues(new Uint32Array(2));
  #size = 0;

  get size(): number {
    return this.#size;
  }

  /** Adds `id` (kept by reference); false when an equal id is already present. */
  add(id: Uint8Array): boolean {
    let h1 = this.#salt[0];
    let h2 = this.#salt[1];
    for (let o = 0; o < RECONCILE_ID_BYTES; o += 4) {
      const word = id[o] | (id[o + 1] << 8) | (id[o + 2] << 16) | (id[o + 3] << 24);
      h1 = Math.imul(h1 ^ word, 0x85ebca6b);
      h1 ^= h1 >>> 13;
      h2 = Math.imul(h2 ^ word, 0xc2b2ae35);
      h2 ^= h2 >>> 16;
    }
    const key = (h1 >>> 0) * 65536 + (h2 >>> 16);
    const bucket = this.#buckets.get(key);
    if (bucket === undefined) {
      this.#buckets.set(key, id);
    } else if (bucket instanceof Uint8Array) {
      if (bytesEqual(bucket, id)) return false;
      this.#buckets.set(key, [bucket, id]);
    } else {
      for (const other of bucket) if (bytesEqual(other, id)) return false;
      if (bucket.length >= 16) throw new ProtocolError("Peer sent ids that collide in our set");
      bucket.push(id);
    }
    this.#size++;
    return true;
  }
}

/** `ids` ordered bytewise (returns indexes into `ids`). */
function sortedIndexes(ids: Uint8Array[]): number[] {
  return Array.from(ids.keys()).sort((a, b) => compareBytes(ids[a], ids[b]));
}

/**
 * Matches two lists of ids by value: `leftFound[i]` / `rightFound[j]` become 1 for the ids
 * present in both (an id repeated in one list matches every copy).
 */
function matchIds(
  left: Uint8Array[],
  right: Uint8Array[],
): { leftFound: Uint8Array; rightFound: Uint8Array } {
  const leftFound = new Uint8Array(left.length);
  const rightFound = new Uint8Array(right.length);
  if (left.length === 0 || right.length === 0) return { leftFound, rightFound };
  const l = sortedIndexes(left);
  const r = sortedIndexes(right);
  let i = 0;
  let j = 0;
  while (i < l.length && j < r.length) {
    const order = compareBytes(left[l[i]], right[r[j]]);
    if (order < 0) i++;
    else if (order > 0) j++;
    else {
      const id = left[l[i]];
      while (i < l.length && compareBytes(left[l[i]], id) === 0) leftFound[l[i++]] = 1;
      while (j < r.length && compareBytes(right[r[j]], id) === 0) rightFound[r[j++]] = 1;
    }
  }
  return { leftFound, rightFound };
}

function bytesEqual(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

// ---------------------------------------------------------------------------------------
// Storage

/**
 * A sealed, sorted set of items with prefix sums of their ids, so the fingerprint of any
 * index range costs O(1) (one 256-bit subtraction and one SHA-256 of ≤ 40 bytes). Exact
 * duplicates are dropped; the same id at two timestamps counts as two items.
 *
 * @example
 * ```ts
 * const storage = new ReconcileStorage([{ timestamp: 1, id: new Uint8Array(32) }]);
 * storage.fingerprint(0, storage.size); // 16 bytes
 * ```
 */
export class ReconcileStorage {
  #timestamps: Float64Array;
  #ids: Uint8Array;
  /** (size + 1) × 8 little-endian u32 limbs: the sum of the first i ids mod 2^256. */
  #sums: Uint32Array;
  #size: number;
  #scratch = new Uint8Array(RECONCILE_ID_BYTES + 8);

  /**
   * Copies, validates and sorts `items`.
   * @throws {FormatError} when a timestamp is not a non-negative safe integer or an id is
   * not 32 bytes
   */
  constructor(items: Iterable<ReconcileItem>) {
    const list = Array.from(items);
    const count = list.length;
    const keys = new Float64Array(count);
    /** First 4 id bytes, big-endian: settles almost every tie of timestamps at once. */
    const heads = new Uint32Array(count);
    const compare = (a: number, b: number) =>
      keys[a] - keys[b] || heads[a] - heads[b] || compareBytes(list[a].id, list[b].id);
    let sorted = true;
    for (let i = 0; i < count; i++) {
      const { timestamp, id } = list[i];
      if (!Number.isSafeInteger(timestamp) || timestamp < 0) {
        throw new FormatError(
          `Cannot build reconciliation storage: item ${i} has timestamp ${timestamp}, not a non-negative safe integer`,
        );
      }
      if (!(id instanceof Uint8Array) || id.length !== RECONCILE_ID_BYTES) {
        throw new FormatError(
          `Cannot build reconciliation storage: item ${i} has an id of ${
            id instanceof Uint8Array ? id.length : typeof id
          } bytes, expected ${RECONCILE_ID_BYTES}`,
        );
      }
      keys[i] = timestamp;
      heads[i] = ((id[0] << 24) | (id[1] << 16) | (id[2] << 8) | id[3]) >>> 0;
      if (sorted && i > 0 && compare(i - 1, i) > 0) sorted = false;
    }
    const order = new Uint32Array(count);
    for (let i = 0; i < count; i++) order[i] = i;
    if (!sorted) order.sort(compare);

    const timestamps = new Float64Array(count);
    const ids = new Uint8Array(count * RECONCILE_ID_BYTES);
    let size = 0;
    for (let k = 0; k < count; k++) {
      const i = order[k];
      if (k > 0 && compare(order[k - 1], i) === 0) continue;
      timestamps[size] = list[i].timestamp;
      ids.set(list[i].id, size * RECONCILE_ID_BYTES);
      size++;
    }
    const words = new DataView(ids.buffer);
    const sums = new Uint32Array((size + 1) * 8);
    for (let item = 0; item < size; item++) {
      const base = item * RECONCILE_ID_BYTES;
      const at = item * 8;
      let carry = 0;
      for (let limb = 0; limb < 8; limb++) {
        const total = sums[at + limb] + words.getUint32(base + limb * 4, true) + carry;
        sums[at + 8 + limb] = total >>> 0;
        carry = total > 0xffffffff ? 1 : 0;
      }
    }
    this.#size = size;
    this.#timestamps = timestamps.subarray(0, size);
    this.#ids = ids.subarray(0, size * RECONCILE_ID_BYTES);
    this.#sums = sums;
  }

  /** Number of (distinct) items. */
  get size(): number {
    return this.#size;
  }

  /** Timestamp of the item at `index` (0 ≤ index < size). */
  timestampAt(index: number): number {
    return this.#timestamps[index];
  }

  /** Id of the item at `index`: a read-only view into the storage (do not modify). */
  idAt(index: number): Uint8Array {
    return this.#ids.subarray(index * RECONCILE_ID_BYTES, (index + 1) * RECONCILE_ID_BYTES);
  }

  /**
   * Fingerprint of the items with index in [lower, upper):
   * SHA-256(sum of ids mod 2^256 as 32 LE bytes ‖ Varint(count))[:16].
   */
  fingerprint(lower: number, upper: number): Uint8Array {
    if (!(0 <= lower && lower <= upper && upper <= this.#size)) {
      throw new RangeError(`Fingerprint range [${lower}, ${upper}) is outside [0, ${this.#size}]`);
    }
    const sums = this.#sums;
    const scratch = this.#scratch;
    let borrow = 0;
    for (let limb = 0; limb < 8; limb++) {
      let word = sums[upper * 8 + limb] - sums[lower * 8 + limb] - borrow;
      borrow = word < 0 ? 1 : 0;
      if (word < 0) word += 0x100000000;
      const o = limb * 4;
      scratch[o] = word & 0xff;
      scratch[o + 1] = (word >>> 8) & 0xff;
      scratch[o + 2] = (word >>> 16) & 0xff;
      scratch[o + 3] = (word >>> 24) & 0xff;
    }
    const end = writeVarint(scratch, RECONCILE_ID_BYTES, upper - lower);
    const digest = createHash("sha256").update(scratch.subarray(0, end)).digest();
    return new Uint8Array(digest.buffer, digest.byteOffset, RECONCILE_FINGERPRINT_BYTES).slice();
  }

  /** Index of the first item at or above `bound`, searching [from, to]. */
  findLowerBound(bound: ReconcileBound, from = 0, to: number = this.#size): number {
    if (bound.timestamp === Infinity) return to;
    let lo = from;
    let hi = to;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.#itemBelow(mid, bound)) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  #itemBelow(index: number, bound: ReconcileBound): boolean {
    const timestamp = this.#timestamps[index];
    if (timestamp !== bound.timestamp) return timestamp < bound.timestamp;
    const ids = this.#ids;
    const base = index * RECONCILE_ID_BYTES;
    const prefix = bound.idPrefix;
    for (let i = 0; i < RECONCILE_ID_BYTES; i++) {
      const b = i < prefix.length ? prefix[i] : 0;
      if (ids[base + i] !== b) return ids[base + i] < b;
    }
    return false;
  }

  /**
   * The shortest bound above item index−1 and at or below item `index` (0 < index < size):
   * the later timestamp with an empty prefix, or on a tie the id prefix one byte past the
   * common prefix.
   */
  boundBefore(index: number): ReconcileBound {
    const timestamp = this.#timestamps[index];
    const id = this.idAt(index);
    if (this.#timestamps[index - 1] !== timestamp) return { timestamp, idPrefix: EMPTY };
    const previous = this.idAt(index - 1);
    let shared = 0;
    while (shared < RECONCILE_ID_BYTES && previous[shared] === id[shared]) shared++;
    return { timestamp, idPrefix: id.subarray(0, Math.min(shared + 1, RECONCILE_ID_BYTES)) };
  }
}

// ---------------------------------------------------------------------------------------
// Encoding

function writeVarint(target: Uint8Array, offset: number, value: number): number {
  const length = varintLength(value);
  for (let i = length - 1; i >= 0; i--) {
    target[offset + i] = (value % 128) | (i === length - 1 ? 0 : 0x80);
    value = Math.floor(value / 128);
  }
  return offset + length;
}

interface WriterState {
  length: number;
  lastTimestamp: number;
  pendingSkip: boolean;
  open: number;
  diffs: number;
}

/** A growable message buffer that delta-encodes bounds and merges adjacent Skips. */
class MessageWriter {
  #buffer = new Uint8Array(1024);
  #length = 0;
  #lastTimestamp = 0;
  #pendingSkip = false;
  /** Fingerprint and IdList ranges written: the message expects a reply. */
  #open = 0;
  #diffs = 0;

  constructor() {
    this.#byte(RECONCILE_PROTOCOL_VERSION);
  }

  get length(): number {
    return this.#length;
  }

  get open(): number {
    return this.#open;
  }

  get diffs(): number {
    return this.#diffs;
  }

  snapshot(): WriterState {
    return {
      length: this.#length,
      lastTimestamp: this.#lastTimestamp,
      pendingSkip: this.#pendingSkip,
      open: this.#open,
      diffs: this.#diffs,
    };
  }

  restore(state: WriterState): void {
    this.#length = state.length;
    this.#lastTimestamp = state.lastTimestamp;
    this.#pendingSkip = state.pendingSkip;
    this.#open = state.open;
    this.#diffs = state.diffs;
  }

  /** Marks the current range as skipped; written lazily, merged with its neighbours. */
  skip(): void {
    this.#pendingSkip = true;
  }

  /** Writes a pending Skip up to `lower`, the lower bound of the range about to follow. */
  beginRange(lower: ReconcileBound): void {
    if (!this.#pendingSkip) return;
    this.#pendingSkip = false;
    this.#bound(lower);
    this.varint(MODE_SKIP);
  }

  explicitSkip(upper: ReconcileBound): void {
    this.#bound(upper);
    this.varint(MODE_SKIP);
  }

  fingerprint(upper: ReconcileBound, fingerprint: Uint8Array): void {
    this.#bound(upper);
    this.varint(MODE_FINGERPRINT);
    this.bytes(fingerprint);
    this.#open++;
  }

  idList(upper: ReconcileBound, ids: Uint8Array[]): void {
    this.#bound(upper);
    this.varint(MODE_ID_LIST);
    this.varint(ids.length);
    for (const id of ids) this.bytes(id);
    this.#open++;
  }

  diff(upper: ReconcileBound, listed: number, missing: number[], extra: Uint8Array[]): void {
    this.#bound(upper);
    this.varint(MODE_DIFF);
    this.varint(listed);
    const bitmap = new Uint8Array(Math.ceil(listed / 8));
    for (const index of missing) bitmap[index >> 3] |= 1 << (index & 7);
    this.bytes(bitmap);
    this.varint(extra.length);
    for (const id of extra) this.bytes(id);
    this.#diffs++;
  }

  varint(value: number): void {
    this.#reserve(8);
    this.#length = writeVarint(this.#buffer, this.#length, value);
  }

  bytes(bytes: Uint8Array): void {
    this.#reserve(bytes.length);
    this.#buffer.set(bytes, this.#length);
    this.#length += bytes.length;
  }

  /** The message; a trailing Skip is implicit and left out. */
  finish(): Uint8Array {
    return this.#buffer.slice(0, this.#length);
  }

  #bound(bound: ReconcileBound): void {
    if (bound.timestamp === Infinity) {
      this.varint(0);
    } else {
      this.varint(1 + bound.timestamp - this.#lastTimestamp);
      this.#lastTimestamp = bound.timestamp;
    }
    this.varint(bound.idPrefix.length);
    this.bytes(bound.idPrefix);
  }

  #byte(value: number): void {
    this.#reserve(1);
    this.#buffer[this.#length++] = value;
  }

  #reserve(extra: number): void {
    if (this.#length + extra <= this.#buffer.length) return;
    let capacity = this.#buffer.length * 2;
    while (capacity < this.#length + extra) capacity *= 2;
    const grown = new Uint8Array(capacity);
    grown.set(this.#buffer.subarray(0, this.#length));
    this.#buffer = grown;
  }
}

/**
 * Encodes ranges as a message, exactly as given (no merging of Skips, no validation of
 * order beyond what the bound encoding needs). For tests and tools; {@link Reconciler}
 * writes its own messages.
 */
export function encodeReconcileMessage(ranges: readonly ReconcileRange[]): Uint8Array {
  const writer = new MessageWriter();
  let last = 0;
  for (const range of ranges) {
    const { timestamp } = range.upper;
    if (timestamp !== Infinity && (!Number.isSafeInteger(timestamp) || timestamp < last)) {
      throw new RangeError(`Cannot encode bound timestamp ${timestamp} after ${last}`);
    }
    if (timestamp !== Infinity) last = timestamp;
    switch (range.mode) {
      case "skip":
        writer.explicitSkip(range.upper);
        break;
      case "fingerprint":
        writer.fingerprint(range.upper, range.fingerprint);
        break;
      case "idList":
        writer.idList(range.upper, range.ids);
        break;
      case "diff":
        writer.diff(range.upper, range.listed, range.missing, range.extra);
        break;
    }
  }
  return writer.finish();
}

// ---------------------------------------------------------------------------------------
// Decoding

class MessageReader {
  #bytes: Uint8Array;
  #offset: number;

  constructor(bytes: Uint8Array, offset: number) {
    this.#bytes = bytes;
    this.#offset = offset;
  }

  get atEnd(): boolean {
    return this.#offset >= this.#bytes.length;
  }

  get remaining(): number {
    return this.#bytes.length - this.#offset;
  }

  varint(what: string): number {
    const start = this.#offset;
    let value = 0;
    for (let digits = 1;; digits++) {
      if (this.#offset >= this.#bytes.length) fail(`truncated varint (${what}) at byte ${start}`);
      const byte = this.#bytes[this.#offset++];
      if (digits === 1 && byte === 0x80) fail(`varint (${what}) at byte ${start} is not minimal`);
      value = value * 128 + (byte & 0x7f);
      // 2^53 itself is exact, and needed: the bound after timestamp 2^53 − 1 encodes as 2^53.
      if (value > MAX_VARINT) fail(`varint (${what}) at byte ${start} is too large`);
      if ((byte & 0x80) === 0) return value;
    }
  }

  bytes(length: number, what: string): Uint8Array {
    if (length > this.remaining) {
      fail(
        `truncated ${what} at byte ${this.#offset}: needs ${length} bytes, ${this.remaining} left`,
      );
    }
    const out = this.#bytes.subarray(this.#offset, this.#offset + length);
    this.#offset += length;
    return out;
  }
}

function fail(detail: string): never {
  throw new ProtocolError(`Cannot decode reconciliation message: ${detail}`);
}

/**
 * Decodes and validates a message: version, varints, modes, bounds strictly ascending,
 * Infinity only last and with an empty prefix, IdLists of at most
 * {@link RECONCILE_MAX_ID_LIST_IDS} ids, Diff bitmaps without stray bits, no truncation,
 * at most `maxRanges` ranges and `maxMessageBytes` bytes. Ids in the result are views into
 * `message`.
 * @throws {ProtocolError} on any malformed message
 */
export function decodeReconcileMessage(
  message: Uint8Array,
  options: DecodeReconcileOptions = {},
): ReconcileRange[] {
  const maxBytes = options.maxMessageBytes ?? RECONCILE_DEFAULT_MAX_MESSAGE_BYTES;
  const maxRanges = options.maxRanges ?? DEFAULT_MAX_RANGES;
  if (!(message instanceof Uint8Array)) fail("not a byte array");
  if (message.length === 0) fail("empty message");
  if (message.length > maxBytes) {
    fail(`${message.length} bytes exceed the limit of ${maxBytes}`);
  }
  if (message[0] !== RECONCILE_PROTOCOL_VERSION) {
    throw new ProtocolError(
      `Unsupported reconciliation protocol version: 0x${
        message[0].toString(16).padStart(2, "0")
      }, expected 0x${RECONCILE_PROTOCOL_VERSION.toString(16)}`,
    );
  }
  const reader = new MessageReader(message, 1);
  const ranges: ReconcileRange[] = [];
  let previous = MIN_BOUND;
  let lastTimestamp = 0;
  while (!reader.atEnd) {
    const n = ranges.length;
    if (previous.timestamp === Infinity) fail(`range ${n} follows the infinity bound`);
    if (n >= maxRanges) fail(`more than ${maxRanges} ranges`);

    const encoded = reader.varint(`timestamp of range ${n}`);
    let timestamp = Infinity;
    if (encoded !== 0) {
      if (encoded - 1 > MAX_TIMESTAMP - lastTimestamp) {
        fail(`timestamp of range ${n} is too large`);
      }
      timestamp = lastTimestamp + (encoded - 1);
      lastTimestamp = timestamp;
    }
    const prefixLength = reader.varint(`id prefix length of range ${n}`);
    if (prefixLength > RECONCILE_ID_BYTES) {
      fail(`id prefix of range ${n} has ${prefixLength} bytes, at most ${RECONCILE_ID_BYTES}`);
    }
    if (timestamp === Infinity && prefixLength !== 0) {
      fail(`infinity bound of range ${n} has an id prefix`);
    }
    const upper = { timestamp, idPrefix: reader.bytes(prefixLength, `id prefix of range ${n}`) };
    if (compareBounds(upper, previous) <= 0) {
      fail(`bound of range ${n} is not above the previous bound`);
    }
    previous = upper;

    const mode = reader.varint(`mode of range ${n}`);
    switch (mode) {
      case MODE_SKIP:
        ranges.push({ upper, mode: "skip" });
        break;
      case MODE_FINGERPRINT:
        ranges.push({
          upper,
          mode: "fingerprint",
          fingerprint: reader.bytes(RECONCILE_FINGERPRINT_BYTES, `fingerprint of range ${n}`),
        });
        break;
      case MODE_ID_LIST: {
        const count = reader.varint(`id count of range ${n}`);
        if (count > RECONCILE_MAX_ID_LIST_IDS) {
          fail(`id list of range ${n} has ${count} ids, at most ${RECONCILE_MAX_ID_LIST_IDS}`);
        }
        const block = reader.bytes(count * RECONCILE_ID_BYTES, `id list of range ${n}`);
        ranges.push({ upper, mode: "idList", ids: splitIds(block) });
        break;
      }
      case MODE_DIFF: {
        const listed = reader.varint(`listed count of range ${n}`);
        if (listed > RECONCILE_MAX_ID_LIST_IDS) {
          fail(`diff of range ${n} answers ${listed} ids, at most ${RECONCILE_MAX_ID_LIST_IDS}`);
        }
        const bitmap = reader.bytes(Math.ceil(listed / 8), `diff bitmap of range ${n}`);
        const missing: number[] = [];
        for (let i = 0; i < bitmap.length * 8; i++) {
          if ((bitmap[i >> 3] >> (i & 7)) & 1) {
            if (i >= listed) fail(`diff bitmap of range ${n} has bits past its ${listed} ids`);
            missing.push(i);
          }
        }
        const count = reader.varint(`extra id count of range ${n}`);
        if (count * RECONCILE_ID_BYTES > reader.remaining) {
          fail(`truncated extra ids of range ${n}: ${count} ids, ${reader.remaining} bytes left`);
        }
        const block = reader.bytes(count * RECONCILE_ID_BYTES, `extra ids of range ${n}`);
        ranges.push({ upper, mode: "diff", listed, missing, extra: splitIds(block) });
        break;
      }
      default:
        fail(`unknown mode ${mode} in range ${n}`);
    }
  }
  return ranges;
}

function splitIds(block: Uint8Array): Uint8Array[] {
  const ids: Uint8Array[] = [];
  for (let o = 0; o < block.length; o += RECONCILE_ID_BYTES) {
    ids.push(block.subarray(o, o + RECONCILE_ID_BYTES));
  }
  return ids;
}

// ---------------------------------------------------------------------------------------
// The state machine

/**
 * cost[i]: about the bytes needed to answer ranges i… with our fingerprints (each a Skip
 * plus a Fingerprint range at most), capped at `cap`.
 */
function postponeCosts(ranges: ReconcileRange[], cap: number): Float64Array {
  const cost = new Float64Array(ranges.length + 1);
  let last = 0;
  const estimate: number[] = [];
  for (const { upper } of ranges) {
    const delta = upper.timestamp === Infinity ? 0 : upper.timestamp - last + 1;
    if (upper.timestamp !== Infinity) last = upper.timestamp;
    estimate.push(varintLength(delta) + 1 + upper.idPrefix.length);
  }
  for (let i = ranges.length - 1; i >= 0; i--) {
    const { mode } = ranges[i];
    const own = mode === "fingerprint" || mode === "idList"
      ? 2 * estimate[i] + 2 + RECONCILE_FINGERPRINT_BYTES
      : 0;
    cost[i] = Math.min(cap, cost[i + 1] + own);
  }
  return cost;
}

/** Limits of a {@link Reconciler}. */
export interface ReconcilerOptions {
  /**
   * Largest message sent or accepted, in bytes (default 512 KiB, at least 4096). Both
   * peers should use the same value.
   */
  maxMessageBytes?: number;
  /** Most messages accepted in one session before giving up (default 1024). */
  maxRounds?: number;
  /** Most differing ids (have + need) accepted in one session (default 2 000 000). */
  maxIds?: number;
  /** Most ranges accepted in one message (default 100 000, or maxMessageBytes / 16 if more). */
  maxRanges?: number;
}

/** What one step of a session yields. */
export interface ReconcileStep {
  /** The message to send to the peer, or null when there is nothing to send. */
  reply: Uint8Array | null;
  /**
   * Ids we hold that the peer lacks, learnt in this step (each reported once a session).
   * Views into the storage: read-only.
   */
  have: Uint8Array[];
  /**
   * Ids the peer holds that we lack, learnt in this step (each reported once a session).
   * Copies, independent of the message bytes.
   */
  need: Uint8Array[];
  /**
   * True when the session is over: send `reply` if there is one, then expect no further
   * message. Both sides get here; all differences have then been reported on both sides.
   */
  done: boolean;
}

/**
 * One reconciliation session over a sealed {@link ReconcileStorage}. The initiator sends
 * `initiate()`; then each side passes every message it receives to `reconcile()`, sends
 * the `reply` when there is one, and stops once `done` is true. Use a new Reconciler per
 * session; after a {@link ProtocolError} the session is dead.
 *
 * @example
 * ```ts
 * const a = new Reconciler(new ReconcileStorage(mine));
 * const b = new Reconciler(new ReconcileStorage(theirs));
 * let message: Uint8Array | null = a.initiate();
 * for (let side = b; message !== null; side = side === a ? b : a) {
 *   const step = side.reconcile(message);
 *   // step.have: send these records; step.need: ask for these
 *   message = step.reply;
 * }
 * ```
 */
export class Reconciler {
  #storage: ReconcileStorage;
  #maxBytes: number;
  #maxRounds: number;
  #maxIds: number;
  #maxRanges: number;
  /** Most extra ids one Diff may carry, so that it fits an otherwise empty message. */
  #maxExtra: number;
  #state: "idle" | "running" | "done" | "failed" = "idle";
  #initiator = false;
  #rounds = 0;
  /** `lower:upper` index ranges we sent as IdLists in our last message. */
  #sentIdLists = new Set<string>();
  /** Per storage index: already reported as `have`. */
  #reportedHave: Uint8Array;
  #haveCount = 0;
  #reportedNeed = new IdSet();

  /** Starts a session over `storage` (which may be shared by several sessions). */
  constructor(storage: ReconcileStorage, options: ReconcilerOptions = {}) {
    const maxBytes = options.maxMessageBytes ?? RECONCILE_DEFAULT_MAX_MESSAGE_BYTES;
    if (!Number.isSafeInteger(maxBytes) || maxBytes < RECONCILE_MIN_MAX_MESSAGE_BYTES) {
      throw new RangeError(
        `maxMessageBytes must be an integer of at least ${RECONCILE_MIN_MAX_MESSAGE_BYTES}: ${maxBytes}`,
      );
    }
    this.#storage = storage;
    this.#reportedHave = new Uint8Array(storage.size);
    this.#maxBytes = maxBytes;
    this.#maxRounds = options.maxRounds ?? DEFAULT_MAX_ROUNDS;
    this.#maxIds = options.maxIds ?? DEFAULT_MAX_IDS;
    this.#maxRanges = options.maxRanges ?? Math.max(DEFAULT_MAX_RANGES, Math.ceil(maxBytes / 16));
    const diffOverhead = 1 + 2 * MAX_BOUND_BYTES + 1 + 4 + RECONCILE_MAX_ID_LIST_IDS / 8 + 4;
    this.#maxExtra = Math.floor(
      (maxBytes - diffOverhead - REMAINDER_RESERVE) / RECONCILE_ID_BYTES,
    );
  }

  /** True once `initiate()` was called. */
  get isInitiator(): boolean {
    return this.#initiator;
  }

  /** True when the session is over (or failed). */
  get done(): boolean {
    return this.#state === "done" || this.#state === "failed";
  }

  /** Messages received so far. */
  get rounds(): number {
    return this.#rounds;
  }

  /** The initiator's first message: fingerprints of 16 buckets, or an IdList of few items. */
  initiate(): Uint8Array {
    if (this.#state !== "idle") throw new Error("Reconciliation already started");
    this.#state = "running";
    this.#initiator = true;
    const writer = new MessageWriter();
    const sent = new Set<string>();
    this.#split(writer, 0, this.#storage.size, INFINITY_BOUND, sent);
    this.#sentIdLists = sent;
    return writer.finish();
  }

  /**
   * Processes one message from the peer.
   * @throws {ProtocolError} when the message is malformed, answers something we did not
   * ask, arrives after the session is over, or a session limit is exceeded
   */
  reconcile(message: Uint8Array): ReconcileStep {
    if (this.#state === "failed") {
      throw new ProtocolError("Reconciliation session failed earlier: start a new one");
    }
    if (this.#state === "done") {
      throw new ProtocolError("Reconciliation is already complete: unexpected message from peer");
    }
    this.#state = "running";
    try {
      if (++this.#rounds > this.#maxRounds) {
        throw new ProtocolError(
          `Reconciliation did not finish: more than ${this.#maxRounds} messages from peer`,
        );
      }
      const ranges = decodeReconcileMessage(message, {
        maxMessageBytes: this.#maxBytes,
        maxRanges: this.#maxRanges,
      });
      const step = this.#process(ranges);
      if (step.done) this.#state = "done";
      return step;
    } catch (error) {
      this.#state = "failed";
      throw error;
    }
  }

  #process(ranges: ReconcileRange[]): ReconcileStep {
    const storage = this.#storage;
    const writer = new MessageWriter();
    const have: Uint8Array[] = [];
    const need: Uint8Array[] = [];
    const expected = this.#sentIdLists;
    const sent = new Set<string>();
    let lowerBound = MIN_BOUND;
    let lower = 0;
    let peerWaits = false;
    // "answer": full answers; "postpone": the message is nearly full, so ranges that need
    // work get our fingerprint back (refined next round at the same granularity);
    // "closed": one Fingerprint to infinity was written, only Diffs are still applied.
    let phase: "answer" | "postpone" | "closed" = "answer";
    const tooLong = () => writer.length + REMAINDER_RESERVE > this.#maxBytes;
    // A full answer must leave room to postpone the ranges after it (up to a quarter of
    // the message), so a cut message rarely has to fall back to one Fingerprint to infinity.
    const postponeCost = postponeCosts(ranges, this.#maxBytes / 4);

    for (let r = 0; r < ranges.length; r++) {
      const range = ranges[r];
      const upper = storage.findLowerBound(range.upper, lower);
      if (range.mode === "diff") {
        this.#applyDiff(range, lower, upper, expected, have, need);
        if (phase !== "closed") writer.skip();
      } else if (range.mode === "skip") {
        if (phase !== "closed") writer.skip();
      } else if (phase !== "closed") {
        peerWaits = true;
        const before = writer.snapshot();
        let answered = false;
        if (phase === "answer") {
          const sentHere = new Set<string>();
          const commit = range.mode === "fingerprint"
            ? this.#answerFingerprint(writer, range, lowerBound, lower, upper, sentHere)
            : this.#answerIdList(writer, range, lowerBound, lower, upper, sentHere);
          // The first answer always fits (maxExtra and the minimum message size see to it).
          const room = this.#maxBytes - REMAINDER_RESERVE - postponeCost[r + 1];
          if (before.open + before.diffs > 0 && writer.length > room) {
            writer.restore(before);
            phase = "postpone";
          } else {
            commit?.(have, need);
            for (const key of sentHere) sent.add(key);
            answered = true;
          }
        }
        if (!answered) {
          const ours = storage.fingerprint(lower, upper);
          if (range.mode === "fingerprint" && bytesEqual(ours, range.fingerprint)) {
            writer.skip();
          } else {
            writer.beginRange(lowerBound);
            writer.fingerprint(range.upper, ours);
          }
          if (tooLong()) {
            writer.restore(before);
            writer.beginRange(lowerBound);
            writer.fingerprint(INFINITY_BOUND, storage.fingerprint(lower, storage.size));
            phase = "closed";
          }
        }
      }
      lowerBound = range.upper;
      lower = upper;
    }
    this.#sentIdLists = sent;

    const needed = this.#keepNeeded(need);
    if (writer.open > 0) return { reply: writer.finish(), have, need: needed, done: false };
    const reply = writer.diffs > 0 || peerWaits ? writer.finish() : null;
    return { reply, have, need: needed, done: true };
  }

  /** Skip on a match, else split our items in the range. */
  #answerFingerprint(
    writer: MessageWriter,
    range: { upper: ReconcileBound; fingerprint: Uint8Array },
    lowerBound: ReconcileBound,
    lower: number,
    upper: number,
    sent: Set<string>,
  ): null {
    if (bytesEqual(this.#storage.fingerprint(lower, upper), range.fingerprint)) {
      writer.skip();
    } else {
      writer.beginRange(lowerBound);
      this.#split(writer, lower, upper, range.upper, sent);
    }
    return null;
  }

  /** A Diff against the peer's list (Skip when equal), or a split if we hold too many. */
  #answerIdList(
    writer: MessageWriter,
    range: { upper: ReconcileBound; ids: Uint8Array[] },
    lowerBound: ReconcileBound,
    lower: number,
    upper: number,
    sent: Set<string>,
  ): ((have: Uint8Array[], need: Uint8Array[]) => void) | null {
    const storage = this.#storage;
    const theirs = range.ids;
    let extra: number[] | null = null;
    let found: Uint8Array = new Uint8Array(0);
    if (upper - lower - theirs.length <= this.#maxExtra) {
      const ours: Uint8Array[] = [];
      for (let i = lower; i < upper; i++) ours.push(storage.idAt(i));
      const match = matchIds(theirs, ours);
      found = match.leftFound;
      extra = [];
      for (let i = 0; i < ours.length; i++) if (!match.rightFound[i]) extra.push(lower + i);
      if (extra.length > this.#maxExtra) extra = null;
    }
    if (extra === null) {
      writer.beginRange(lowerBound);
      this.#split(writer, lower, upper, range.upper, sent);
      return null;
    }
    const missing: number[] = [];
    for (let i = 0; i < theirs.length; i++) if (!found[i]) missing.push(i);
    if (missing.length === 0 && extra.length === 0) {
      writer.skip();
      return null;
    }
    writer.beginRange(lowerBound);
    writer.diff(range.upper, theirs.length, missing, extra.map((i) => storage.idAt(i)));
    return (have, need) => {
      for (const index of extra) this.#reportHave(index, have);
      for (const i of missing) this.#reportNeed(theirs[i], need);
    };
  }

  /** Applies the peer's answer to one of our IdLists. */
  #applyDiff(
    range: { listed: number; missing: number[]; extra: Uint8Array[] },
    lower: number,
    upper: number,
    expected: Set<string>,
    have: Uint8Array[],
    need: Uint8Array[],
  ): void {
    if (!expected.has(`${lower}:${upper}`)) {
      throw new ProtocolError("Peer sent a diff for a range we did not send as an id list");
    }
    if (range.listed !== upper - lower) {
      throw new ProtocolError(
        `Peer's diff answers ${range.listed} ids, but we listed ${upper - lower} in that range`,
      );
    }
    for (const i of range.missing) this.#reportHave(lower + i, have);
    if (range.extra.length === 0) return;
    const ours: Uint8Array[] = [];
    for (let i = lower; i < upper; i++) ours.push(this.#storage.idAt(i));
    if (matchIds(range.extra, ours).leftFound.includes(1)) {
      throw new ProtocolError("Peer's diff claims we lack an id we listed");
    }
    for (const id of range.extra) this.#reportNeed(id, need);
  }

  /** Our items [lower, upper) as an IdList, or as 16 fingerprinted buckets. */
  #split(
    writer: MessageWriter,
    lower: number,
    upper: number,
    upperBound: ReconcileBound,
    sent: Set<string>,
  ): void {
    const storage = this.#storage;
    const count = upper - lower;
    if (count < RECONCILE_ID_LIST_THRESHOLD) {
      const ids: Uint8Array[] = [];
      for (let i = lower; i < upper; i++) ids.push(storage.idAt(i));
      writer.idList(upperBound, ids);
      sent.add(`${lower}:${upper}`);
      return;
    }
    const base = Math.floor(count / RECONCILE_BUCKETS);
    const rest = count % RECONCILE_BUCKETS;
    let start = lower;
    for (let bucket = 0; bucket < RECONCILE_BUCKETS; bucket++) {
      const end = start + base + (bucket < rest ? 1 : 0);
      const bound = bucket === RECONCILE_BUCKETS - 1 ? upperBound : storage.boundBefore(end);
      writer.fingerprint(bound, storage.fingerprint(start, end));
      start = end;
    }
  }

  /** Records that the peer lacks our item `index` (once a session). */
  #reportHave(index: number, out: Uint8Array[]): void {
    if (this.#reportedHave[index]) return;
    this.#checkIdLimit(out.length);
    this.#reportedHave[index] = 1;
    this.#haveCount++;
    out.push(this.#storage.idAt(index));
  }

  /** Records that we lack `id`, a view into the message (copied by #keepNeeded). */
  #reportNeed(id: Uint8Array, out: Uint8Array[]): void {
    this.#checkIdLimit(out.length);
    out.push(id);
  }

  #checkIdLimit(pending: number): void {
    if (this.#haveCount + this.#reportedNeed.size + pending >= this.#maxIds) {
      throw new ProtocolError(
        `Reconciliation found more than ${this.#maxIds} differing ids: giving up`,
      );
    }
  }

  /** Copies this step's needed ids out of the message (one block) and drops repeats. */
  #keepNeeded(views: Uint8Array[]): Uint8Array[] {
    const block = new Uint8Array(views.length * RECONCILE_ID_BYTES);
    const kept: Uint8Array[] = [];
    for (let i = 0; i < views.length; i++) {
      block.set(views[i], i * RECONCILE_ID_BYTES);
      const copy = block.subarray(i * RECONCILE_ID_BYTES, (i + 1) * RECONCILE_ID_BYTES);
      if (this.#reportedNeed.add(copy)) kept.push(copy);
    }
    return kept;
  }
}
