/**
 * Range-based set reconciliation (src/net/reconcile.ts): fingerprints against an
 * independent BigInt computation, the wire format against hand-written bytes, convergence
 * of seeded random sets (0 to 100 000 items; 0, 1, 10 and 1000 differences on one or both
 * sides; disjoint sets; one side empty; equal timestamps; ids sharing long prefixes; a
 * small message limit), loose structural bounds on round trips and bytes, hostile
 * messages, and a seeded fuzzer that may only ever see a ProtocolError.
 * @module
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { FormatError, ProtocolError } from "../../src/errors.ts";
import {
  decodeReconcileMessage,
  encodeReconcileMessage,
  RECONCILE_PROTOCOL_VERSION,
  type ReconcileItem,
  Reconciler,
  type ReconcileRange,
  type ReconcilerOptions,
  ReconcileStorage,
} from "../../src/net/reconcile.ts";

// ---------------------------------------------------------------------------------------
// Seeded data

/** A small seeded PRNG (xorshift128+ on two 32-bit halves is overkill; this is splitmix32). */
function prng(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x9e3779b9) >>> 0;
    let z = state;
    z = Math.imul(z ^ (z >>> 16), 0x21f0aaad);
    z = Math.imul(z ^ (z >>> 15), 0x735a2d97);
    return ((z ^ (z >>> 15)) >>> 0) / 4294967296;
  };
}

function randomInt(rand: () => number, below: number): number {
  return Math.floor(rand() * below);
}

function randomBytes(rand: () => number, length: number): Uint8Array {
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i += 4) {
    const word = Math.floor(rand() * 4294967296);
    for (let j = 0; j < 4 && i + j < length; j++) out[i + j] = (word >>> (8 * j)) & 0xff;
  }
  return out;
}

function hex(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

type TimestampMode = "spread" | "same" | "few" | "extremes";

interface SetsSpec {
  seed: number;
  shared: number;
  onlyA: number;
  onlyB: number;
  timestamps?: TimestampMode;
  /** Ids share their first `commonPrefix` bytes (bounds then need long id prefixes). */
  commonPrefix?: number;
  shuffle?: boolean;
}

interface Sets {
  a: ReconcileItem[];
  b: ReconcileItem[];
  onlyA: Set<string>;
  onlyB: Set<string>;
}

function makeSets(spec: SetsSpec): Sets {
  const rand = prng(spec.seed);
  const total = spec.shared + spec.onlyA + spec.onlyB;
  const prefix = randomBytes(rand, spec.commonPrefix ?? 0);
  // Random 32-byte ids do not collide; ids with a long common prefix might.
  const seen = (spec.commonPrefix ?? 0) > 16 ? new Set<string>() : null;
  const item = (): ReconcileItem => {
    for (;;) {
      const id = randomBytes(rand, 32);
      id.set(prefix);
      if (seen) {
        const key = hex(id);
        if (seen.has(key)) continue;
        seen.add(key);
      }
      return { timestamp: timestamp(spec.timestamps ?? "spread", rand, total), id };
    }
  };
  const shared = Array.from({ length: spec.shared }, item);
  const onlyA = Array.from({ length: spec.onlyA }, item);
  const onlyB = Array.from({ length: spec.onlyB }, item);
  const order = (items: ReconcileItem[]) => {
    if (spec.shuffle === false) return items;
    for (let i = items.length - 1; i > 0; i--) {
      const j = randomInt(rand, i + 1);
      [items[i], items[j]] = [items[j], items[i]];
    }
    return items;
  };
  return {
    a: order([...shared, ...onlyA]),
    b: order([...shared, ...onlyB]),
    onlyA: new Set(onlyA.map((x) => hex(x.id))),
    onlyB: new Set(onlyB.map((x) => hex(x.id))),
  };
}

function timestamp(mode: TimestampMode, rand: () => number, total: number): number {
  switch (mode) {
    case "spread":
      return 1_700_000_000_000 + randomInt(rand, Math.max(1, total) * 10);
    case "same":
      return 42;
    case "few":
      return randomInt(rand, 4);
    case "extremes":
      return [0, 1, Number.MAX_SAFE_INTEGER - 1, Number.MAX_SAFE_INTEGER][randomInt(rand, 4)];
  }
}

// ---------------------------------------------------------------------------------------
// Running a session

interface Outcome {
  aHave: Set<string>;
  aNeed: Set<string>;
  bHave: Set<string>;
  bNeed: Set<string>;
  messages: Uint8Array[];
  bytes: number;
  roundTrips: number;
}

/** Runs a whole session in memory, A initiating; every reported id must be new. */
function runSession(
  a: ReconcileItem[] | ReconcileStorage,
  b: ReconcileItem[] | ReconcileStorage,
  options: ReconcilerOptions = {},
): Outcome {
  const storage = (x: ReconcileItem[] | ReconcileStorage) =>
    x instanceof ReconcileStorage ? x : new ReconcileStorage(x);
  const peerA = new Reconciler(storage(a), options);
  const peerB = new Reconciler(storage(b), options);
  const outcome: Outcome = {
    aHave: new Set(),
    aNeed: new Set(),
    bHave: new Set(),
    bNeed: new Set(),
    messages: [],
    bytes: 0,
    roundTrips: 0,
  };
  const collect = (into: Set<string>, ids: Uint8Array[]) => {
    for (const id of ids) {
      assert.equal(id.length, 32);
      const key = hex(id);
      assert.ok(!into.has(key), `id ${key} reported twice`);
      into.add(key);
    }
  };
  let message: Uint8Array | null = peerA.initiate();
  let receiver = peerB;
  while (message !== null) {
    outcome.messages.push(message);
    outcome.bytes += message.length;
    // What we send must pass our own strict decoder.
    decodeReconcileMessage(message, { maxMessageBytes: options.maxMessageBytes });
    assert.ok(outcome.messages.length < 500, "session does not end");
    const step = receiver.reconcile(message);
    collect(receiver === peerA ? outcome.aHave : outcome.bHave, step.have);
    collect(receiver === peerA ? outcome.aNeed : outcome.bNeed, step.need);
    if (step.done) {
      if (step.reply !== null) {
        outcome.messages.push(step.reply);
        outcome.bytes += step.reply.length;
        // The last message needs no answer and reports the rest to the other side.
        const other = receiver === peerA ? peerB : peerA;
        const last = other.reconcile(step.reply);
        assert.equal(last.reply, null);
        assert.ok(last.done);
        collect(other === peerA ? outcome.aHave : outcome.bHave, last.have);
        collect(other === peerA ? outcome.aNeed : outcome.bNeed, last.need);
      }
      break;
    }
    assert.notEqual(step.reply, null, "a side that is not done must reply");
    message = step.reply;
    receiver = receiver === peerA ? peerB : peerA;
  }
  assert.ok(peerA.done && peerB.done, "both sides finish");
  outcome.roundTrips = Math.ceil(outcome.messages.length / 2);
  return outcome;
}

function assertConverges(sets: Sets, outcome: Outcome, label: string): void {
  assert.deepEqual(outcome.aHave, sets.onlyA, `${label}: A's have`);
  assert.deepEqual(outcome.bNeed, sets.onlyA, `${label}: B's need`);
  assert.deepEqual(outcome.aNeed, sets.onlyB, `${label}: A's need`);
  assert.deepEqual(outcome.bHave, sets.onlyB, `${label}: B's have`);
}

// ---------------------------------------------------------------------------------------
// Fingerprints and storage

/** The fingerprint computed the slow, obvious way. */
function referenceFingerprint(ids: Uint8Array[]): Uint8Array {
  let sum = 0n;
  for (const id of ids) {
    let value = 0n;
    for (let i = 31; i >= 0; i--) value = (value << 8n) | BigInt(id[i]);
    sum = (sum + value) % (1n << 256n);
  }
  const bytes: number[] = [];
  for (let i = 0; i < 32; i++) bytes.push(Number((sum >> BigInt(8 * i)) & 0xffn));
  const digits: number[] = [];
  let count = ids.length;
  do {
    digits.unshift(count % 128);
    count = Math.floor(count / 128);
  } while (count > 0);
  for (let i = 0; i < digits.length - 1; i++) digits[i] |= 0x80;
  const digest = createHash("sha256").update(new Uint8Array([...bytes, ...digits])).digest();
  return new Uint8Array(digest.subarray(0, 16));
}

Deno.test("fingerprints match a BigInt sum mod 2^256 for random ranges", () => {
  const rand = prng(1);
  // Ids of all 0xff bytes make every limb carry; 300 items make the count varint 2 bytes.
  const items: ReconcileItem[] = [];
  for (let i = 0; i < 300; i++) {
    const id = i % 7 === 0 ? new Uint8Array(32).fill(0xff) : randomBytes(rand, 32);
    if (i % 7 === 0) id[31] = i;
    items.push({ timestamp: i, id });
  }
  const storage = new ReconcileStorage(items);
  assert.equal(storage.size, 300);
  const ids = Array.from({ length: storage.size }, (_, i) => storage.idAt(i));
  for (const [lo, hi] of [[0, 0], [0, 300], [0, 1], [5, 6], [7, 150], [299, 300], [0, 130]]) {
    assert.deepEqual(storage.fingerprint(lo, hi), referenceFingerprint(ids.slice(lo, hi)));
  }
  for (let k = 0; k < 50; k++) {
    const lo = randomInt(rand, 301);
    const hi = lo + randomInt(rand, 301 - lo);
    assert.deepEqual(storage.fingerprint(lo, hi), referenceFingerprint(ids.slice(lo, hi)));
  }
  // The empty fingerprint: SHA-256 of 32 zero bytes and a 0 count.
  const empty = createHash("sha256").update(new Uint8Array(33)).digest().subarray(0, 16);
  assert.deepEqual(storage.fingerprint(3, 3), new Uint8Array(empty));
  assert.throws(() => storage.fingerprint(2, 1), RangeError);
  assert.throws(() => storage.fingerprint(0, 301), RangeError);
});

Deno.test("storage sorts by timestamp then id, drops exact duplicates, rejects bad items", () => {
  const id = (b: number) => new Uint8Array(32).fill(b);
  const storage = new ReconcileStorage([
    { timestamp: 5, id: id(1) },
    { timestamp: 3, id: id(9) },
    { timestamp: 5, id: id(0) },
    { timestamp: 3, id: id(9) },
  ]);
  assert.equal(storage.size, 3);
  assert.deepEqual(
    [0, 1, 2].map((i) => [storage.timestampAt(i), storage.idAt(i)[0]]),
    [[3, 9], [5, 0], [5, 1]],
  );
  assert.throws(
    () => new ReconcileStorage([{ timestamp: 1, id: new Uint8Array(31) }]),
    (e) => e instanceof FormatError && /item 0 has an id of 31 bytes/.test(e.message),
  );
  for (const bad of [-1, 1.5, 2 ** 53, NaN, Infinity]) {
    assert.throws(
      () => new ReconcileStorage([{ timestamp: bad, id: id(0) }]),
      (e) => e instanceof FormatError && /not a non-negative safe integer/.test(e.message),
    );
  }
});

Deno.test("bounds between items are minimal and separate them; lower-bound search", () => {
  const id = (...head: number[]) => {
    const out = new Uint8Array(32);
    out.set(head);
    return out;
  };
  const storage = new ReconcileStorage([
    { timestamp: 1, id: id(7, 7) },
    { timestamp: 2, id: id(1, 2, 3) },
    { timestamp: 2, id: id(1, 2, 4) },
    { timestamp: 2, id: id(1, 2, 4, 0, 1) },
  ]);
  assert.deepEqual(storage.boundBefore(1), { timestamp: 2, idPrefix: new Uint8Array(0) });
  assert.deepEqual(storage.boundBefore(2), { timestamp: 2, idPrefix: new Uint8Array([1, 2, 4]) });
  assert.deepEqual(
    storage.boundBefore(3),
    { timestamp: 2, idPrefix: new Uint8Array([1, 2, 4, 0, 1]) },
  );
  for (let i = 1; i < storage.size; i++) {
    assert.equal(storage.findLowerBound(storage.boundBefore(i)), i);
  }
  assert.equal(storage.findLowerBound({ timestamp: 0, idPrefix: new Uint8Array(0) }), 0);
  assert.equal(storage.findLowerBound({ timestamp: Infinity, idPrefix: new Uint8Array(0) }), 4);
  assert.equal(storage.findLowerBound({ timestamp: 2, idPrefix: new Uint8Array([1, 3]) }), 4);
});

// ---------------------------------------------------------------------------------------
// Wire format

Deno.test("messages encode to the documented bytes and decode back", () => {
  const fingerprint = new Uint8Array(16).fill(0xee);
  const id = new Uint8Array(32).fill(0x11);
  const ranges: ReconcileRange[] = [
    { upper: { timestamp: 5, idPrefix: new Uint8Array(0) }, mode: "skip" },
    {
      upper: { timestamp: 300, idPrefix: new Uint8Array([0xab]) },
      mode: "fingerprint",
      fingerprint,
    },
    { upper: { timestamp: 300, idPrefix: new Uint8Array([0xac]) }, mode: "idList", ids: [id] },
    {
      upper: { timestamp: Infinity, idPrefix: new Uint8Array(0) },
      mode: "diff",
      listed: 10,
      missing: [0, 9],
      extra: [id],
    },
  ];
  const bytes = encodeReconcileMessage(ranges);
  const expected = [
    RECONCILE_PROTOCOL_VERSION,
    ...[0x06, 0x00, 0x00], // 1 + (5 - 0), empty prefix, Skip
    ...[0x82, 0x28, 0x01, 0xab, 0x01, ...fingerprint], // 1 + 295 = 296 = 0x82 0x28
    ...[0x01, 0x01, 0xac, 0x02, 0x01, ...id], // same timestamp: delta 0 encodes as 1
    ...[0x00, 0x00, 0x03, 0x0a, 0x01, 0x02, 0x01, ...id], // infinity; bits 0 and 9
  ];
  assert.deepEqual(Array.from(bytes), expected);
  assert.deepEqual(decodeReconcileMessage(bytes), ranges);
  assert.deepEqual(decodeReconcileMessage(new Uint8Array([RECONCILE_PROTOCOL_VERSION])), []);
  // The largest timestamp encodes as 1 + (2^53 − 1) = 2^53, which must still decode.
  const top: ReconcileRange[] = [
    { upper: { timestamp: Number.MAX_SAFE_INTEGER, idPrefix: new Uint8Array([1]) }, mode: "skip" },
  ];
  const topBytes = encodeReconcileMessage(top);
  assert.deepEqual(Array.from(topBytes.subarray(1, 9)), [
    0x90,
    0x80,
    0x80,
    0x80,
    0x80,
    0x80,
    0x80,
    0x00,
  ]);
  assert.deepEqual(decodeReconcileMessage(topBytes), top);
});

/** Builds a message from raw parts after the version byte. */
function raw(...parts: (number | number[] | Uint8Array)[]): Uint8Array {
  const out: number[] = [RECONCILE_PROTOCOL_VERSION];
  for (const part of parts) {
    if (typeof part === "number") out.push(part);
    else out.push(...part);
  }
  return new Uint8Array(out);
}

Deno.test("malformed messages are ProtocolErrors with a clear message", () => {
  const fp = new Array(16).fill(0);
  const cases: [string, Uint8Array, RegExp][] = [
    ["empty", new Uint8Array(0), /empty message/],
    ["wrong version", new Uint8Array([0x61]), /Unsupported reconciliation protocol version: 0x61/],
    ["truncated varint", raw(0x81), /truncated varint \(timestamp of range 0\)/],
    ["non-minimal varint", raw(0x80, 0x01, 0x00, 0x00), /not minimal/],
    ["huge varint", raw([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]), /too large/],
    [
      "timestamp past 2^53",
      raw([0x8f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f], 0, 0, 0x03, 0, 0),
      /timestamp of range 1 is too large/,
    ],
    ["bad mode", raw(0x02, 0x00, 0x07), /unknown mode 7 in range 0/],
    ["mode missing", raw(0x02, 0x00), /truncated varint \(mode of range 0\)/],
    ["prefix over 32", raw(0x02, 33, new Array(33).fill(1), 0), /33 bytes, at most 32/],
    ["prefix truncated", raw(0x02, 5, 1, 2), /truncated id prefix of range 0/],
    ["bound equal to start", raw(0x01, 0x00, 0x00), /not above the previous bound/],
    ["bounds equal", raw(0x02, 0x00, 0x00, 0x01, 0x00, 0x00), /range 1 is not above/],
    [
      "prefix bounds out of order",
      raw(0x02, 0x01, 0x09, 0x00, 0x01, 0x02, 0x09, 0x00, 0x00),
      /range 1 is not above/,
    ],
    ["after infinity", raw(0x00, 0x00, 0x00, 0x02, 0x00, 0x00), /range 1 follows the infinity/],
    ["infinity with prefix", raw(0x00, 0x01, 0x05, 0x00), /infinity bound of range 0 has an id/],
    ["fingerprint truncated", raw(0x02, 0x00, 0x01, fp.slice(0, 15)), /truncated fingerprint/],
    ["id list too long", raw(0x02, 0x00, 0x02, [0x82, 0x01]), /257 ids, at most 256/],
    ["id of 31 bytes", raw(0x02, 0x00, 0x02, 0x01, new Array(31).fill(3)), /truncated id list/],
    ["absurd id count", raw(0x02, 0x00, 0x02, [0x81, 0x80, 0x00]), /16384 ids, at most 256/],
    ["diff stray bits", raw(0x00, 0x00, 0x03, 0x03, 0x08, 0x00), /bits past its 3 ids/],
    ["diff absurd extras", raw(0x00, 0x00, 0x03, 0x00, [0xff, 0x7f]), /truncated extra ids/],
    ["diff too many listed", raw(0x00, 0x00, 0x03, [0x84, 0x00]), /answers 512 ids/],
  ];
  for (const [label, message, pattern] of cases) {
    assert.throws(
      () => decodeReconcileMessage(message),
      (e) => e instanceof ProtocolError && pattern.test(e.message),
      label,
    );
    // The same through a fresh responder.
    const responder = new Reconciler(new ReconcileStorage([]));
    assert.throws(() => responder.reconcile(message), ProtocolError, label);
    assert.ok(responder.done, `${label}: a failed session is over`);
    assert.throws(() => responder.reconcile(raw()), /failed earlier/, label);
  }
  assert.throws(
    () => decodeReconcileMessage(new Uint8Array(5000).fill(0x61), { maxMessageBytes: 4096 }),
    /5000 bytes exceed the limit of 4096/,
  );
  const skips = raw(0x02, 0x00, 0x00, 0x02, 0x00, 0x00, 0x02, 0x00, 0x00);
  assert.throws(() => decodeReconcileMessage(skips, { maxRanges: 2 }), /more than 2 ranges/);
  assert.throws(() => decodeReconcileMessage("x" as unknown as Uint8Array), ProtocolError);
});

Deno.test("answers that do not fit the session are ProtocolErrors", () => {
  const sets = makeSets({ seed: 7, shared: 20, onlyA: 0, onlyB: 0 });
  const storage = new ReconcileStorage(sets.a);
  const infinity = { timestamp: Infinity, idPrefix: new Uint8Array(0) };

  // A Diff we never asked for.
  const unsolicited = encodeReconcileMessage([
    { upper: infinity, mode: "diff", listed: 0, missing: [], extra: [] },
  ]);
  assert.throws(
    () => new Reconciler(storage).reconcile(unsolicited),
    (e) => e instanceof ProtocolError && /did not send as an id list/.test(e.message),
  );

  // A Diff answering our 20-id list with the wrong length, or claiming we lack our own id.
  const ask = () => {
    const initiator = new Reconciler(storage);
    const first = decodeReconcileMessage(initiator.initiate());
    assert.equal(first.length, 1);
    assert.equal(first[0].mode, "idList");
    return initiator;
  };
  const wrongLength = encodeReconcileMessage([
    { upper: infinity, mode: "diff", listed: 19, missing: [], extra: [] },
  ]);
  assert.throws(() => ask().reconcile(wrongLength), /answers 19 ids, but we listed 20/);
  const ownId = encodeReconcileMessage([
    { upper: infinity, mode: "diff", listed: 20, missing: [], extra: [storage.idAt(3)] },
  ]);
  assert.throws(() => ask().reconcile(ownId), /claims we lack an id we listed/);

  // A proper answer is accepted and ends the session; anything after that is refused.
  const stranger = new Uint8Array(32).fill(0x5a);
  const fine = encodeReconcileMessage([
    { upper: infinity, mode: "diff", listed: 20, missing: [2], extra: [stranger] },
  ]);
  const initiator = ask();
  const step = initiator.reconcile(fine);
  assert.deepEqual(step, {
    reply: null,
    have: [storage.idAt(2)],
    need: [stranger],
    done: true,
  });
  assert.throws(() => initiator.reconcile(fine), /already complete/);
  assert.throws(() => initiator.initiate(), /already started/);

  // Too many differences for the session's limit.
  const limited = new Reconciler(storage, { maxIds: 1 });
  limited.initiate();
  const two = encodeReconcileMessage([
    {
      upper: infinity,
      mode: "diff",
      listed: 20,
      missing: [],
      extra: [stranger, stranger.map((b) => b ^ 1)],
    },
  ]);
  assert.throws(() => limited.reconcile(two), /more than 1 differing ids/);

  assert.throws(() => new Reconciler(storage, { maxMessageBytes: 100 }), RangeError);
});

Deno.test("a peer that never agrees is cut off after maxRounds", () => {
  const sets = makeSets({ seed: 8, shared: 5000, onlyA: 0, onlyB: 0 });
  const honest = new Reconciler(new ReconcileStorage(sets.a), { maxRounds: 20 });
  const rand = prng(8);
  let message = honest.initiate();
  let rounds = 0;
  assert.throws(() => {
    for (;;) {
      // Answer every range with a random fingerprint under the same bounds.
      const liar = decodeReconcileMessage(message).map((range): ReconcileRange => ({
        upper: range.upper,
        mode: "fingerprint",
        fingerprint: randomBytes(rand, 16),
      }));
      const step = honest.reconcile(encodeReconcileMessage(liar));
      rounds++;
      assert.ok(step.reply !== null && !step.done);
      message = step.reply;
    }
  }, /more than 20 messages from peer/);
  assert.equal(rounds, 20);
});

// ---------------------------------------------------------------------------------------
// Convergence

Deno.test("small sets converge to the union (0, 1, 2 and 100 items)", () => {
  let seed = 100;
  for (const shared of [0, 1, 2, 100]) {
    for (const [onlyA, onlyB] of [[0, 0], [1, 0], [0, 1], [1, 1], [2, 0], [10, 0], [10, 10]]) {
      for (const timestamps of ["spread", "same", "extremes"] as const) {
        const sets = makeSets({ seed: seed++, shared, onlyA, onlyB, timestamps });
        const label = `${shared} shared, ${onlyA}/${onlyB} differences, ${timestamps}`;
        assertConverges(sets, runSession(sets.a, sets.b), label);
        // The other side initiating gives the mirror image.
        const swapped = runSession(sets.b, sets.a);
        assert.deepEqual(swapped.aHave, sets.onlyB, `${label}, swapped`);
        assert.deepEqual(swapped.aNeed, sets.onlyA, `${label}, swapped`);
      }
    }
  }
});

Deno.test("10 000 items: 0, 1, 10, 1000 differences on one and on both sides", () => {
  let seed = 200;
  for (
    const [onlyA, onlyB] of [[0, 0], [1, 0], [0, 1], [10, 0], [10, 10], [1000, 0], [0, 1000], [
      1000,
      1000,
    ]]
  ) {
    const sets = makeSets({ seed: seed++, shared: 10_000, onlyA, onlyB });
    assertConverges(sets, runSession(sets.a, sets.b), `10k, ${onlyA}/${onlyB}`);
  }
});

Deno.test("100 000 items: a single difference takes few round trips and few bytes", () => {
  const sets = makeSets({ seed: 300, shared: 100_000, onlyA: 0, onlyB: 1 });
  const a = new ReconcileStorage(sets.a);
  const b = new ReconcileStorage(sets.b);
  const outcome = runSession(a, b);
  assertConverges(sets, outcome, "100k, 0/1");
  assert.ok(outcome.roundTrips < 10, `${outcome.roundTrips} round trips`);
  assert.ok(outcome.roundTrips <= 4, `${outcome.roundTrips} round trips`);
  assert.ok(outcome.bytes < 0.01 * 100_000 * 32, `${outcome.bytes} bytes`);
  for (const message of outcome.messages) assert.ok(message.length < 1024, `${message.length} B`);

  // Identical sets: one fingerprint message and an empty answer.
  const same = runSession(a, a);
  assert.equal(same.messages.length, 2);
  assert.deepEqual(same.messages[1], new Uint8Array([RECONCILE_PROTOCOL_VERSION]));
  assert.equal(same.aHave.size + same.aNeed.size + same.bHave.size + same.bNeed.size, 0);
});

Deno.test("100 000 items: 10 and 1000 differences, one and both sides", () => {
  let seed = 400;
  for (const [onlyA, onlyB] of [[10, 0], [5, 5], [1000, 0], [500, 500], [1000, 1000]]) {
    const sets = makeSets({ seed: seed++, shared: 100_000, onlyA, onlyB });
    const outcome = runSession(sets.a, sets.b);
    assertConverges(sets, outcome, `100k, ${onlyA}/${onlyB}`);
    assert.ok(outcome.roundTrips < 10, `${outcome.roundTrips} round trips`);
    if (onlyA + onlyB <= 10) assert.ok(outcome.bytes < 0.01 * 100_000 * 32, `${outcome.bytes} B`);
  }
});

Deno.test("disjoint sets and one side empty", () => {
  const cases: [number, number][] = [[1000, 1000], [100, 10_000], [0, 10_000], [100_000, 0]];
  let seed = 500;
  for (const [onlyA, onlyB] of cases) {
    const sets = makeSets({ seed: seed++, shared: 0, onlyA, onlyB, shuffle: onlyA < 100_000 });
    const outcome = runSession(sets.a, sets.b);
    assertConverges(sets, outcome, `disjoint ${onlyA}/${onlyB}`);
    for (const message of outcome.messages) assert.ok(message.length <= 512 * 1024);
  }
});

Deno.test("equal timestamps (ties broken by id) and ids sharing long prefixes", () => {
  let seed = 600;
  const specs: Omit<SetsSpec, "seed">[] = [
    { shared: 10_000, onlyA: 10, onlyB: 10, timestamps: "same" },
    { shared: 10_000, onlyA: 300, onlyB: 0, timestamps: "few" },
    { shared: 3000, onlyA: 30, onlyB: 30, timestamps: "same", commonPrefix: 28 },
    { shared: 3000, onlyA: 0, onlyB: 100, timestamps: "few", commonPrefix: 30 },
    { shared: 2000, onlyA: 50, onlyB: 50, timestamps: "extremes", commonPrefix: 16 },
  ];
  for (const spec of specs) {
    const sets = makeSets({ seed: seed++, ...spec });
    assertConverges(sets, runSession(sets.a, sets.b), JSON.stringify(spec));
  }
});

Deno.test("messages stay under a small maxMessageBytes and still converge", () => {
  const limit = 4096;
  let seed = 700;
  for (const [shared, onlyA, onlyB] of [[0, 0, 5000], [5000, 300, 300], [20_000, 1000, 0]]) {
    const sets = makeSets({ seed: seed++, shared, onlyA, onlyB });
    const outcome = runSession(sets.a, sets.b, { maxMessageBytes: limit });
    assertConverges(sets, outcome, `limit ${limit}, ${shared} + ${onlyA}/${onlyB}`);
    for (const message of outcome.messages) assert.ok(message.length <= limit, `${message.length}`);
    assert.ok(outcome.messages.length > 2, "the limit forced several rounds");
  }
});

// ---------------------------------------------------------------------------------------
// Fuzzing

function mutate(rand: () => number, input: Uint8Array): Uint8Array {
  const bytes = Array.from(input);
  const edits = 1 + randomInt(rand, 4);
  for (let e = 0; e < edits; e++) {
    const at = randomInt(rand, bytes.length + 1);
    switch (randomInt(rand, 7)) {
      case 0:
        if (at < bytes.length) bytes[at] ^= 1 << randomInt(rand, 8);
        break;
      case 1:
        if (at < bytes.length) bytes[at] = [0, 0x7f, 0x80, 0xff, 1, 2, 3, 0x20][randomInt(rand, 8)];
        break;
      case 2:
        bytes.length = at;
        break;
      case 3:
        bytes.splice(at, 0, ...randomBytes(rand, 1 + randomInt(rand, 40)));
        break;
      case 4:
        bytes.splice(at, 1 + randomInt(rand, 40));
        break;
      case 5: {
        const from = randomInt(rand, bytes.length + 1);
        bytes.splice(at, 0, ...bytes.slice(from, from + 1 + randomInt(rand, 60)));
        break;
      }
      case 6:
        bytes.splice(at, 0, 0xff, 0xff, 0xff, 0x7f);
        break;
    }
  }
  return new Uint8Array(bytes);
}

/** Feeds `message` to `reconciler`: it must succeed with a sane reply or throw ProtocolError. */
function feed(reconciler: Reconciler, message: Uint8Array, label: string): void {
  try {
    const step = reconciler.reconcile(message);
    if (step.reply !== null) {
      assert.ok(step.reply.length <= 16 * 1024, `${label}: reply of ${step.reply.length} bytes`);
      decodeReconcileMessage(step.reply);
    }
    for (const id of [...step.have, ...step.need]) assert.equal(id.length, 32, label);
  } catch (error) {
    if (!(error instanceof ProtocolError)) {
      throw new Error(`${label}: ${(error as Error)?.stack ?? error}`);
    }
    assert.ok(!/\.$/.test(error.message), `${label}: message ends with a period`);
  }
}

Deno.test("fuzzed messages only ever cause ProtocolError", () => {
  const options = { maxMessageBytes: 16 * 1024 };
  const sets = makeSets({ seed: 800, shared: 400, onlyA: 40, onlyB: 40, timestamps: "few" });
  const storageA = new ReconcileStorage(sets.a);
  const storageB = new ReconcileStorage(sets.b);

  // A real session's messages, and how to reach the state just before each one.
  const transcript: Uint8Array[] = [];
  {
    const a = new Reconciler(storageA, options);
    const b = new Reconciler(storageB, options);
    let message: Uint8Array | null = a.initiate();
    let receiver = b;
    while (message !== null) {
      transcript.push(message);
      message = receiver.reconcile(message).reply;
      receiver = receiver === a ? b : a;
    }
  }
  assert.ok(transcript.length >= 3);
  const stateBefore = (k: number): Reconciler => {
    const a = new Reconciler(storageA, options);
    const b = new Reconciler(storageB, options);
    a.initiate();
    for (let i = 0; i < k; i++) (i % 2 === 0 ? b : a).reconcile(transcript[i]);
    return k % 2 === 0 ? b : a;
  };

  const rand = prng(801);
  for (let round = 0; round < 1500; round++) {
    const k = randomInt(rand, transcript.length);
    const kind = randomInt(rand, 4);
    const message = kind === 0
      ? randomBytes(rand, randomInt(rand, 200))
      : kind === 1
      ? new Uint8Array([RECONCILE_PROTOCOL_VERSION, ...randomBytes(rand, randomInt(rand, 200))])
      : mutate(rand, transcript[k]);
    const label = `round ${round}, kind ${kind}, step ${k}`;
    try {
      decodeReconcileMessage(message, options);
    } catch (error) {
      if (!(error instanceof ProtocolError)) throw new Error(`${label}: ${error}`);
    }
    feed(new Reconciler(storageA, options), message, `${label}, fresh`);
    feed(stateBefore(k), message, `${label}, mid-session`);
  }
});

Deno.test("an id learnt twice is reported once, and needed ids outlive the message", () => {
  const rand = prng(900);
  const items = Array.from(
    { length: 40 },
    (_, i) => ({ timestamp: i + 1, id: randomBytes(rand, 32) }),
  );
  const storage = new ReconcileStorage(items);
  const initiator = new Reconciler(storage);
  const buckets = decodeReconcileMessage(initiator.initiate());
  assert.equal(buckets.length, 16);
  const lower1 = storage.findLowerBound(buckets[0].upper);
  const upper1 = storage.findLowerBound(buckets[1].upper);
  const foreign = new Uint8Array(32).fill(0x42);

  // Bucket 0: an IdList of one id A lacks; bucket 1: a fingerprint that cannot match.
  const first = encodeReconcileMessage([
    { upper: buckets[0].upper, mode: "idList", ids: [foreign] },
    { upper: buckets[1].upper, mode: "fingerprint", fingerprint: new Uint8Array(16) },
  ]);
  const step1 = initiator.reconcile(first);
  first.fill(0); // the caller may reuse its buffer
  assert.deepEqual(step1.need, [new Uint8Array(32).fill(0x42)]);
  assert.equal(step1.have.length, lower1);
  assert.ok(!step1.done && step1.reply !== null);
  const answer = decodeReconcileMessage(step1.reply);
  assert.deepEqual(answer.map((r) => r.mode), ["diff", "idList"]);

  // The peer answers A's IdList for bucket 1, naming the same foreign id again.
  const second = encodeReconcileMessage([
    { upper: buckets[0].upper, mode: "skip" },
    {
      upper: buckets[1].upper,
      mode: "diff",
      listed: upper1 - lower1,
      missing: [0],
      extra: [foreign],
    },
  ]);
  const step2 = initiator.reconcile(second);
  assert.deepEqual(step2, { reply: null, have: [storage.idAt(lower1)], need: [], done: true });
});
