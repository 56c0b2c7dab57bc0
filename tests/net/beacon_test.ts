/**
 * Discovery beacons, pure (injected clock and nonces): encode/decode, acceptance in the
 * current, previous and next window and refusal beyond, replay, stale windows, rate limit,
 * the memory cap, wrong keys, any flipped bit, malformed input, and unlinkability: nothing
 * in a beacon but its MAC depends on the topic, and the MAC changes with every window.
 * @module
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import {
  BEACON_SIZE,
  BeaconVerifier,
  beaconWindow,
  decodeBeacon,
  encodeBeacon,
  type EncodeBeaconOptions,
  WINDOW_SECONDS,
} from "../../src/net/beacon.ts";
import { deriveTopicKeys } from "../../src/net/topic.ts";

const WINDOW_MS = WINDOW_SECONDS * 1000;
/** The start of a window in 2025, as milliseconds. */
const T0 = 58_137_131 * WINDOW_MS;
const TOPIC_A = "team-a topic";
const TOPIC_B = "team-b topic";
const KEY_A = deriveTopicKeys(TOPIC_A).beaconKey;
const KEY_B = deriveTopicKeys(TOPIC_B).beaconKey;

/** Deterministic pseudo-random bytes: SHA-256 of a label and a counter. */
function bytesOf(label: string, size: number): Uint8Array {
  const out = new Uint8Array(size);
  for (let i = 0; i * 32 < size; i++) {
    const block = createHash("sha256").update(`${label}/${i}`).digest();
    out.set(block.subarray(0, Math.min(32, size - i * 32)), i * 32);
  }
  return out;
}

const NODE_1 = bytesOf("node 1", 32);
const NODE_2 = bytesOf("node 2", 32);

let nonceCounter = 0;
function freshNonce(): Uint8Array {
  return bytesOf(`nonce ${nonceCounter++}`, 16);
}

function beacon(overrides: Partial<EncodeBeaconOptions> = {}): Uint8Array {
  return encodeBeacon({
    kind: "announce",
    channel: "multicast",
    nodeId: NODE_1,
    syncPort: 7071,
    httpPort: 5555,
    beaconKey: KEY_A,
    now: T0 + 1000,
    nonce: freshNonce(),
    ...overrides,
  });
}

/** A verifier for topics A and B with a settable clock. */
function verifier(
  options: { rate?: { count: number; intervalMs: number }; maxTracked?: number } = {},
) {
  const clock = { now: T0 + 2000 };
  const v = new BeaconVerifier({
    topics: [{ name: "a", beaconKey: KEY_A }, { name: "b", beaconKey: KEY_B }],
    now: () => clock.now,
    ...options,
  });
  return { v, clock };
}

Deno.test("beacon: encodes to the documented layout and decodes back", () => {
  const nonce = bytesOf("fixed nonce", 16);
  const bytes = beacon({ kind: "reply", channel: "unicast", nonce, syncPort: 40001, httpPort: 0 });
  assert.equal(bytes.length, BEACON_SIZE);
  assert.equal(new TextDecoder().decode(bytes.subarray(0, 4)), "ARCB");
  const decoded = decodeBeacon(bytes);
  assert.equal(decoded.kind, "reply");
  assert.equal(decoded.channel, "unicast");
  assert.equal(decoded.window, beaconWindow(T0 + 1000));
  assert.deepEqual(decoded.nodeId, NODE_1);
  assert.equal(decoded.syncPort, 40001);
  assert.equal(decoded.httpPort, 0);
  assert.deepEqual(decoded.nonce, nonce);
  assert.equal(decoded.mac.length, 32);
});

Deno.test("beacon: encoding refuses invalid fields", () => {
  assert.throws(() => beacon({ nodeId: new Uint8Array(31) }), /node id/);
  assert.throws(() => beacon({ nonce: new Uint8Array(15) }), /nonce/);
  assert.throws(() => beacon({ beaconKey: new Uint8Array(16) }), /key/);
  assert.throws(() => beacon({ syncPort: 0 }), /sync port/);
  assert.throws(() => beacon({ syncPort: 65536 }), /sync port/);
  assert.throws(() => beacon({ httpPort: -1 }), /HTTP port/);
  assert.throws(() => beacon({ kind: "reply", channel: "multicast" }), /reply/);
});

Deno.test("beacon: a valid beacon is accepted for the topic whose key MACs it", () => {
  const { v } = verifier();
  const a = v.verify(beacon());
  assert.ok(a);
  assert.equal(a.topic, "a");
  assert.equal(a.beacon.syncPort, 7071);
  assert.equal(a.beacon.httpPort, 5555);
  assert.deepEqual(a.beacon.nodeId, NODE_1);
  const b = v.verify(beacon({ beaconKey: KEY_B, nodeId: NODE_2 }));
  assert.equal(b?.topic, "b");
  assert.equal(v.counters.accepted, 2);
  assert.equal(v.lastDrop, null);
});

Deno.test("beacon: previous and next windows are accepted, two windows away are not", () => {
  const now = T0 + 10 * WINDOW_MS + 5;
  const cases: [string, number, boolean][] = [
    ["current window", now, true],
    ["previous window (sent before the boundary, or clock behind)", now - WINDOW_MS, true],
    ["next window (sender's clock ahead)", now + WINDOW_MS, true],
    ["two windows old", now - 2 * WINDOW_MS, false],
    ["two windows ahead", now + 2 * WINDOW_MS, false],
  ];
  for (const [name, sentAt, accepted] of cases) {
    const { v, clock } = verifier();
    clock.now = now;
    assert.equal(v.verify(beacon({ now: sentAt })) !== null, accepted, name);
    if (!accepted) assert.equal(v.lastDrop, "window", name);
  }
});

Deno.test("beacon: a beacon goes stale as the receiver's clock moves on", () => {
  const { v, clock } = verifier();
  const bytes = beacon({ now: T0 + 1000 });
  clock.now = T0 + 2 * WINDOW_MS + 1000;
  assert.equal(v.verify(bytes), null);
  assert.equal(v.lastDrop, "window");
});

Deno.test("beacon: a replayed beacon is dropped, a fresh nonce is accepted", () => {
  const { v } = verifier();
  const bytes = beacon();
  assert.ok(v.verify(bytes));
  assert.equal(v.verify(bytes), null);
  assert.equal(v.lastDrop, "replay");
  assert.equal(v.verify(bytes.slice()), null, "a copy of the bytes is the same beacon");
  assert.ok(v.verify(beacon()), "same node, new nonce");
  assert.equal(v.counters.replay, 2);
});

Deno.test("beacon: replay is tracked across windows (an older window than the newest is stale)", () => {
  const { v, clock } = verifier();
  clock.now = T0 + WINDOW_MS + 10;
  const old = beacon({ now: T0 + 10 });
  const newer = beacon({ now: T0 + WINDOW_MS + 10 });
  assert.ok(v.verify(newer));
  assert.equal(v.verify(old), null, "previous window, but older than the newest from that node");
  assert.equal(v.lastDrop, "stale");
  // The same old beacon is fine for a verifier that had not seen the newer one.
  const { v: other, clock: c2 } = verifier();
  c2.now = clock.now;
  assert.ok(other.verify(old));
  assert.equal(other.verify(old), null);
  assert.equal(other.lastDrop, "replay");
});

Deno.test("beacon: more than the rate per node and topic is dropped until time passes", () => {
  const { v, clock } = verifier({ rate: { count: 5, intervalMs: 10_000 } });
  for (let i = 0; i < 5; i++) {
    clock.now = T0 + 1000 + i;
    assert.ok(v.verify(beacon({ now: clock.now })), `beacon ${i}`);
  }
  assert.equal(v.verify(beacon({ now: clock.now })), null);
  assert.equal(v.lastDrop, "rate");
  assert.ok(
    v.verify(beacon({ now: clock.now, nodeId: NODE_2 })),
    "another node has its own budget",
  );
  assert.ok(v.verify(beacon({ now: clock.now, beaconKey: KEY_B })), "another topic too");
  clock.now = T0 + 1000 + 10_000;
  assert.ok(v.verify(beacon({ now: clock.now })), "the oldest slot has expired");
  assert.equal(v.verify(beacon({ now: clock.now })), null);
  assert.equal(v.counters.rate, 2);
});

Deno.test("beacon: the number of tracked nodes is capped; expired ones make room", () => {
  const { v, clock } = verifier({ maxTracked: 3 });
  for (let i = 0; i < 3; i++) assert.ok(v.verify(beacon({ nodeId: bytesOf(`id ${i}`, 32) })));
  assert.equal(v.verify(beacon({ nodeId: bytesOf("id 3", 32) })), null);
  assert.equal(v.lastDrop, "capacity");
  assert.ok(v.verify(beacon({ nodeId: bytesOf("id 0", 32) })), "known nodes still pass");
  assert.equal(v.tracked, 3);
  clock.now = T0 + 2 * WINDOW_MS + 5;
  assert.ok(v.verify(beacon({ now: clock.now, nodeId: bytesOf("id 3", 32) })));
  assert.equal(v.tracked, 1, "the expired pairs were forgotten");
});

Deno.test("beacon: a beacon under another topic's key is dropped", () => {
  const { v } = verifier();
  assert.equal(v.verify(beacon({ beaconKey: deriveTopicKeys("team-c topic").beaconKey })), null);
  assert.equal(v.lastDrop, "mac");
  const onlyA = new BeaconVerifier({ topics: [{ name: "a", beaconKey: KEY_A }], now: () => T0 });
  assert.equal(onlyA.verify(beacon({ beaconKey: KEY_B })), null);
  assert.equal(onlyA.lastDrop, "mac");
  const none = new BeaconVerifier({ topics: [], now: () => T0 });
  assert.equal(none.verify(beacon()), null);
  assert.equal(none.lastDrop, "mac");
});

Deno.test("beacon: every single flipped bit is dropped", () => {
  const original = beacon();
  for (let i = 0; i < BEACON_SIZE; i++) {
    for (let bit = 0; bit < 8; bit++) {
      const { v } = verifier();
      const bytes = original.slice();
      bytes[i] ^= 1 << bit;
      assert.equal(v.verify(bytes), null, `byte ${i} bit ${bit}`);
      assert.ok(["malformed", "window", "mac"].includes(v.lastDrop!), `${i}/${bit}: ${v.lastDrop}`);
    }
  }
});

Deno.test("beacon: malformed input is dropped", () => {
  const { v } = verifier();
  const good = beacon();
  const cases: [string, Uint8Array][] = [
    ["empty", new Uint8Array(0)],
    ["truncated", good.subarray(0, BEACON_SIZE - 1)],
    ["oversize", new Uint8Array([...good, 0])],
    ["huge", new Uint8Array(65_000)],
    ["garbage", bytesOf("garbage", BEACON_SIZE)],
  ];
  for (
    const [name, offset, value] of [
      ["magic", 0, 0x61],
      ["version", 4, 2],
      ["kind", 5, 3],
      ["channel", 6, 0],
      ["reply by multicast", 5, 2],
    ] as const
  ) {
    const bytes = good.slice();
    bytes[offset] = value;
    cases.push([name, bytes]);
  }
  const zeroPort = good.slice();
  zeroPort[43] = zeroPort[44] = 0;
  cases.push(["sync port 0", zeroPort]);
  for (const [name, bytes] of cases) {
    assert.equal(v.verify(bytes), null, name);
    assert.equal(v.lastDrop, "malformed", name);
    assert.throws(() => decodeBeacon(bytes), /beacon/, name);
  }
  assert.ok(v.verify(good), "the good one still passes");
});

Deno.test("beacon: our own node id is dropped", () => {
  const v = new BeaconVerifier({
    topics: [{ name: "a", beaconKey: KEY_A }],
    now: () => T0 + 2000,
    selfId: NODE_1,
  });
  assert.equal(v.verify(beacon()), null);
  assert.equal(v.lastDrop, "self");
  assert.ok(v.verify(beacon({ nodeId: NODE_2 })));
});

Deno.test("beacon: a beacon from the wrong channel is dropped without being recorded", () => {
  const { v } = verifier();
  const bytes = beacon({ channel: "multicast" });
  assert.equal(v.verify(bytes, { channel: "unicast" }), null);
  assert.equal(v.lastDrop, "channel");
  assert.ok(v.verify(bytes, { channel: "multicast" }), "not counted as seen");
  const reply = beacon({ kind: "reply", channel: "unicast" });
  assert.ok(v.verify(reply, { channel: "unicast" }));
});

Deno.test("beacon: nothing but the MAC depends on the topic", () => {
  // Same node, ports, kind, window and nonce; different topics: only the MAC differs.
  const nonce = bytesOf("shared nonce", 16);
  const a = beacon({ nonce });
  const b = beacon({ nonce, beaconKey: KEY_B });
  const differing = [...a.keys()].filter((i) => a[i] !== b[i]);
  assert.ok(differing.length > 0);
  assert.ok(differing.every((i) => i >= 63), `topic-dependent bytes outside the MAC: ${differing}`);
  // No derived key of the topic, nor a hash of the topic or of its keys, shows up.
  const keys = deriveTopicKeys(TOPIC_A);
  const secrets = [
    keys.beaconKey,
    keys.psk,
    keys.segmentTag,
    createHash("sha256").update(TOPIC_A).digest(),
    createHash("sha256").update(keys.beaconKey).digest(),
  ];
  for (const secret of secrets) assert.equal(commonRun(a, new Uint8Array(secret), 4), null);
});

Deno.test("beacon: two beacons of one node and topic in different windows share only node fields", () => {
  const w1 = 58_137_131; // 0x0377_1A2B
  const w2 = 0x0488_2b3c;
  const n1 = new Uint8Array(16).fill(0x11);
  const n2 = new Uint8Array(16).fill(0x22);
  const a = beacon({ now: w1 * WINDOW_MS + 7, nonce: n1 });
  const b = beacon({ now: w2 * WINDOW_MS + 7, nonce: n2 });
  const nodeFields = new Set([...range(0, 7), ...range(11, 47)]); // header, node id, ports
  for (const i of range(7, 63)) {
    if (!nodeFields.has(i)) assert.notEqual(a[i], b[i], `byte ${i} (window or nonce)`);
  }
  assert.equal(commonRun(a.subarray(63), b.subarray(63), 4), null, "the MACs share no 4-byte run");

  // Over many windows (spread out so every window byte varies) with random nonces, the
  // byte positions that never change are exactly the topic-independent node fields.
  const samples: Uint8Array[] = [];
  for (let i = 0; i < 200; i++) {
    const window = 40_000_000 + i * 1_234_567;
    samples.push(beacon({ now: window * WINDOW_MS + i, nonce: freshNonce() }));
  }
  const constant = range(0, BEACON_SIZE).filter((i) =>
    samples.every((s) => s[i] === samples[0][i])
  );
  assert.deepEqual(constant, [...nodeFields]);
});

function range(from: number, to: number): number[] {
  return Array.from({ length: to - from }, (_, i) => from + i);
}

/** The first run of `length` bytes of `needle` found anywhere in `haystack`, or null. */
function commonRun(haystack: Uint8Array, needle: Uint8Array, length: number): string | null {
  const seen = new Set<string>();
  for (let i = 0; i + length <= haystack.length; i++) {
    seen.add(haystack.subarray(i, i + length).join(","));
  }
  for (let i = 0; i + length <= needle.length; i++) {
    const run = needle.subarray(i, i + length).join(",");
    if (seen.has(run)) return run;
  }
  return null;
}
