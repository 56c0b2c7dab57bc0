/**
 * The sync protocol (src/net/sync.ts): two SyncSessions over an in-memory duplex pair with
 * real secure channels (Noise XXpsk3 on both sides), each over an in-memory segment of
 * random records signed by a generated key. One round converges both sides to the union,
 * and each side's receive() gets exactly the records it lacked, once; pushes deliver;
 * batches respect the record and byte limits; remembered ids are not offered again; a
 * hostile peer (garbage, non-objects, unknown types, a round it may not start, bad
 * reconciliation bytes, oversize record lists) makes run() reject with ProtocolError.
 *
 * A spy around each channel sees every message; "quiescent" means both sessions wait in
 * receive() and every message sent has been received: nothing more can happen until the
 * test acts, so the counts checked then are final. Waits are bounded polls.
 * @module
 */

import assert from "node:assert/strict";
import { encodeBase64, formatBase16, formatNixHash, sha256 } from "../../src/cache/hash.ts";
import type { SyncRecord } from "../../src/cache/remote_records.ts";
import { generateSecretKey, publicKeyOf, signNarInfo } from "../../src/cache/signing.ts";
import { ProtocolError } from "../../src/errors.ts";
import { generateStaticKeyPair } from "../../src/net/noise.ts";
import {
  memoryDuplexPair,
  openSecureChannel,
  type SecureChannel,
} from "../../src/net/secure_channel.ts";
import {
  MAX_RECORDS_PER_MESSAGE,
  RECORDS_MESSAGE_BYTES,
  type SegmentSource,
  SyncSession,
} from "../../src/net/sync.ts";
import {
  judgeRecord,
  narInfoOfRecord,
  parseSyncRecord,
  recordId,
} from "../../src/net/sync_records.ts";
import { deriveTopicKeys } from "../../src/net/topic.ts";

const SIGNER = generateSecretKey("sync-test-1");
const SEGMENT = { filter: "all" as const, trustedKeys: [publicKeyOf(SIGNER)] };
const PSK = deriveTopicKeys("sync test topic").psk;
const KEY_A = generateStaticKeyPair();
const KEY_B = generateStaticKeyPair();
const NIX32 = "0123456789abcdfghijklmnpqrsvwxyz";
const WAIT_MS = 20_000;

function randomHashPart(): string {
  return Array.from(crypto.getRandomValues(new Uint8Array(32)), (b) => NIX32[b % 32]).join("");
}

/** A random signed record; `references` extra references make it big. */
function randomRecord(name = "pkg", references = 1): SyncRecord {
  const hash = randomHashPart();
  const record: SyncRecord = {
    storePath: `/nix/store/${hash}-${name}`,
    narHash: formatNixHash(sha256(crypto.getRandomValues(new Uint8Array(16)))),
    narSize: 1 + Math.floor(Math.random() * 1e9),
    references: Array.from(
      { length: references },
      (_, i) => i === 0 ? `${hash}-${name}` : `${randomHashPart()}-dep-${i}`,
    ).sort(),
    sigs: [],
  };
  record.sigs = [signNarInfo(narInfoOfRecord(record), SIGNER)];
  return record;
}

function randomRecords(count: number, name = "pkg"): SyncRecord[] {
  return Array.from({ length: count }, (_, i) => randomRecord(`${name}-${i}`));
}

function hexId(record: SyncRecord): string {
  return formatBase16(recordId(record));
}

/** An in-memory segment: it takes what the peer sends if it is valid and signed. */
class MemorySegment implements SegmentSource {
  held = new Map<string, SyncRecord>();
  /** Every record receive() was given, in order. */
  received: unknown[] = [];
  known: Uint8Array[] = [];
  receiveCalls = 0;
  failReceive: Error | null = null;

  constructor(records: SyncRecord[]) {
    for (const record of records) this.held.set(hexId(record), record);
  }

  records(): Promise<SyncRecord[]> {
    return Promise.resolve([...this.held.values()]);
  }

  knownIds(): Iterable<Uint8Array> {
    return this.known;
  }

  receive(records: unknown[]): Promise<void> {
    this.receiveCalls++;
    if (this.failReceive) return Promise.reject(this.failReceive);
    for (const raw of records) {
      this.received.push(raw);
      const record = parseSyncRecord(raw);
      assert.equal(judgeRecord(record, SEGMENT), null, "only valid records are sent");
      this.held.set(hexId(record), record);
    }
    return Promise.resolve();
  }

  ids(): Set<string> {
    return new Set(this.held.keys());
  }

  receivedIds(): string[] {
    return this.received.map((raw) => hexId(parseSyncRecord(raw))).sort();
  }
}

/** A channel that records every message in both directions and whether it waits. */
class SpyChannel implements SecureChannel {
  readonly inner: SecureChannel;
  sent: Record<string, unknown>[] = [];
  sentBytes: number[] = [];
  received = 0;
  waiting = false;

  constructor(inner: SecureChannel) {
    this.inner = inner;
  }
  get remoteStatic(): Uint8Array {
    return this.inner.remoteStatic;
  }
  get handshakeHash(): Uint8Array {
    return this.inner.handshakeHash;
  }
  get closed(): Promise<void> {
    return this.inner.closed;
  }
  send(message: Uint8Array): Promise<void> {
    this.sent.push(JSON.parse(new TextDecoder().decode(message)));
    this.sentBytes.push(message.length);
    return this.inner.send(message);
  }
  async receive(): Promise<Uint8Array | null> {
    this.waiting = true;
    try {
      const message = await this.inner.receive();
      if (message !== null) this.received++;
      return message;
    } finally {
      this.waiting = false;
    }
  }
  close(): Promise<void> {
    return this.inner.close();
  }
  /** The `records` messages sent. */
  recordMessages(): unknown[][] {
    return this.sent.filter((m) => m.t === "records").map((m) => m.records as unknown[]);
  }
}

async function channelPair(): Promise<[SecureChannel, SecureChannel]> {
  const [left, right] = memoryDuplexPair();
  return await Promise.all([
    openSecureChannel(left, { initiator: true, staticKey: KEY_A, psk: PSK }),
    openSecureChannel(right, { initiator: false, staticKey: KEY_B, psk: PSK }),
  ]);
}

interface Pair {
  a: SyncSession;
  b: SyncSession;
  spyA: SpyChannel;
  spyB: SpyChannel;
  runA: Promise<void>;
  runB: Promise<void>;
  quiescent(): Promise<void>;
  close(): Promise<void>;
}

/** A (initiator) and B (responder) sessions running over one channel pair. */
async function sessionPair(sourceA: SegmentSource, sourceB: SegmentSource): Promise<Pair> {
  const [channelA, channelB] = await channelPair();
  const spyA = new SpyChannel(channelA);
  const spyB = new SpyChannel(channelB);
  const a = new SyncSession(spyA, { initiator: true, source: sourceA });
  const b = new SyncSession(spyB, { initiator: false, source: sourceB });
  const runA = a.run();
  const runB = b.run();
  return {
    a,
    b,
    spyA,
    spyB,
    runA,
    runB,
    async quiescent() {
      const deadline = Date.now() + WAIT_MS;
      for (;;) {
        // Checked at a timer boundary: if both wait and nothing is in flight, nothing moves.
        await new Promise((resolve) => setTimeout(resolve, 5));
        if (
          spyA.waiting && spyB.waiting && spyA.sent.length === spyB.received &&
          spyB.sent.length === spyA.received
        ) {
          return;
        }
        if (Date.now() > deadline) throw new Error("Sessions did not settle in time");
      }
    },
    async close() {
      await Promise.all([channelA.close(), channelB.close()]);
      await Promise.all([runA, runB]);
    },
  };
}

function union(...sets: Set<string>[]): Set<string> {
  return new Set(sets.flatMap((s) => [...s]));
}

const SCENARIOS: { label: string; shared: number; onlyA: number; onlyB: number }[] = [
  { label: "both empty", shared: 0, onlyA: 0, onlyB: 0 },
  { label: "identical sets", shared: 500, onlyA: 0, onlyB: 0 },
  { label: "one difference", shared: 500, onlyA: 1, onlyB: 0 },
  { label: "one difference on the responder", shared: 500, onlyA: 0, onlyB: 1 },
  { label: "differences on both sides", shared: 700, onlyA: 40, onlyB: 27 },
  { label: "a new node", shared: 0, onlyA: 0, onlyB: 600 },
  { label: "disjoint sets", shared: 0, onlyA: 300, onlyB: 290 },
];

for (const scenario of SCENARIOS) {
  Deno.test(`sync: one round converges to the union (${scenario.label})`, async () => {
    const shared = randomRecords(scenario.shared, "shared");
    const onlyA = randomRecords(scenario.onlyA, "only-a");
    const onlyB = randomRecords(scenario.onlyB, "only-b");
    const sourceA = new MemorySegment([...shared, ...onlyA]);
    const sourceB = new MemorySegment([...shared, ...onlyB]);
    const expected = union(sourceA.ids(), sourceB.ids());
    const pair = await sessionPair(sourceA, sourceB);
    try {
      await pair.a.startRound();
      await pair.quiescent();

      assert.deepEqual(sourceA.ids(), expected, "A holds the union");
      assert.deepEqual(sourceB.ids(), expected, "B holds the union");
      // Each side received exactly what it lacked, each record once.
      assert.deepEqual(sourceA.receivedIds(), onlyB.map(hexId).sort());
      assert.deepEqual(sourceB.receivedIds(), onlyA.map(hexId).sort());
      assert.equal(pair.a.stats.rounds, 1);
      assert.equal(pair.a.stats.recordsSent, onlyA.length);
      assert.equal(pair.b.stats.recordsSent, onlyB.length);
      assert.equal(pair.a.stats.recordsReceived, onlyB.length);
      assert.equal(pair.b.stats.recordsReceived, onlyA.length);
      for (const spy of [pair.spyA, pair.spyB]) {
        for (const batch of spy.recordMessages()) {
          assert.ok(batch.length >= 1 && batch.length <= MAX_RECORDS_PER_MESSAGE);
        }
      }
      // A start message only from the initiator, once.
      assert.equal(pair.spyA.sent.filter((m) => m.start === true).length, 1);
      assert.equal(pair.spyB.sent.filter((m) => m.start === true).length, 0);

      // A second round finds nothing to send.
      const sentBefore = pair.spyA.sent.length + pair.spyB.sent.length;
      await pair.a.startRound();
      await pair.quiescent();
      assert.equal(pair.spyA.recordMessages().flat().length, onlyA.length);
      assert.equal(pair.spyB.recordMessages().flat().length, onlyB.length);
      assert.ok(pair.spyA.sent.length + pair.spyB.sent.length > sentBefore);
      assert.equal(pair.a.stats.rounds, 2);
    } finally {
      await pair.close();
    }
  });
}

Deno.test("sync: push delivers new records at once, in batches", async () => {
  const shared = randomRecords(50);
  const sourceA = new MemorySegment(shared);
  const sourceB = new MemorySegment(shared);
  const pair = await sessionPair(sourceA, sourceB);
  try {
    await pair.a.startRound();
    await pair.quiescent();
    assert.equal(sourceB.received.length, 0);

    const fresh = randomRecord("fresh");
    await pair.a.push([fresh]);
    await pair.quiescent();
    assert.deepEqual(sourceB.receivedIds(), [hexId(fresh)]);
    assert.ok(sourceB.ids().has(hexId(fresh)));

    // The responder may push too; 600 records go in 3 messages of at most 256.
    const many = randomRecords(600, "many");
    await pair.b.push(many);
    await pair.quiescent();
    assert.deepEqual(sourceA.receivedIds(), many.map(hexId).sort());
    assert.deepEqual(pair.spyB.recordMessages().map((batch) => batch.length), [256, 256, 88]);
    assert.equal(pair.b.stats.recordsSent, 600);
    await pair.a.push([]);
    await pair.quiescent();
    assert.equal(pair.spyA.recordMessages().length, 1, "an empty push sends nothing");
  } finally {
    await pair.close();
  }
});

Deno.test("sync: big records are batched by size under the channel's limit", async () => {
  // ~75 KiB of JSON each: 256 of them would be 19 MiB, over the 16 MiB message limit.
  const big = Array.from({ length: 40 }, (_, i) => randomRecord(`big-${i}`, 1500));
  const size = JSON.stringify(big[0]).length;
  assert.ok(size > 60_000, `a big record is ${size} bytes`);
  const sourceA = new MemorySegment(big);
  const sourceB = new MemorySegment([]);
  const pair = await sessionPair(sourceA, sourceB);
  try {
    await pair.a.startRound();
    await pair.quiescent();
    assert.deepEqual(sourceB.ids(), sourceA.ids());
    const batches = pair.spyA.recordMessages();
    assert.ok(batches.length >= 3, `${batches.length} messages`);
    assert.equal(batches.flat().length, 40);
    pair.spyA.sent.forEach((message, i) => {
      if (message.t !== "records") return;
      assert.ok(
        pair.spyA.sentBytes[i] <= RECORDS_MESSAGE_BYTES + size + 100,
        `message of ${pair.spyA.sentBytes[i]} bytes`,
      );
    });
  } finally {
    await pair.close();
  }
});

Deno.test("sync: ids the source knows are reconciled as held and not sent", async () => {
  const shared = randomRecords(200);
  const refusedByB = randomRecords(5, "refused");
  const wanted = randomRecords(3, "wanted");
  const sourceA = new MemorySegment([...shared, ...refusedByB, ...wanted]);
  const sourceB = new MemorySegment(shared);
  sourceB.known = refusedByB.map((record) => recordId(record));
  // An id B knows that A does not hold changes nothing either.
  sourceB.known.push(recordId(randomRecord("phantom")));
  const pair = await sessionPair(sourceA, sourceB);
  try {
    await pair.a.startRound();
    await pair.quiescent();
    assert.deepEqual(sourceB.receivedIds(), wanted.map(hexId).sort());
    assert.equal(sourceA.received.length, 0, "B has no record for a known id to send");
  } finally {
    await pair.close();
  }
});

Deno.test("sync: concurrent startRound calls start one round", async () => {
  const sourceA = new MemorySegment(randomRecords(100));
  const sourceB = new MemorySegment(randomRecords(100));
  const pair = await sessionPair(sourceA, sourceB);
  try {
    await Promise.all([pair.a.startRound(), pair.a.startRound(), pair.a.startRound()]);
    await pair.quiescent();
    assert.equal(pair.spyA.sent.filter((m) => m.start === true).length, 1);
    assert.equal(pair.a.stats.rounds, 1);
    assert.equal(sourceA.received.length, 100);
    assert.equal(sourceB.received.length, 100);
    await assert.rejects(() => pair.b.startRound(), ProtocolError, "the responder starts none");
  } finally {
    await pair.close();
  }
});

Deno.test("sync: a peer that closes ends run() quietly", async () => {
  const pair = await sessionPair(new MemorySegment([]), new MemorySegment([]));
  await pair.spyB.close();
  await pair.runA;
  await pair.runB;
  await pair.close();
});

/** A SyncSession on one side; the test speaks raw messages on the other. */
async function againstRaw(
  options: { sessionIsInitiator: boolean; source?: MemorySegment },
): Promise<{ raw: SecureChannel; run: Promise<void>; source: MemorySegment }> {
  const [initiatorChannel, responderChannel] = await channelPair();
  const source = options.source ?? new MemorySegment(randomRecords(20));
  const session = new SyncSession(
    options.sessionIsInitiator ? initiatorChannel : responderChannel,
    { initiator: options.sessionIsInitiator, source },
  );
  const raw = options.sessionIsInitiator ? responderChannel : initiatorChannel;
  return { raw, run: session.run(), source };
}

function text(value: string): Uint8Array {
  return new TextEncoder().encode(value);
}

const HOSTILE: { label: string; message: Uint8Array; error: RegExp; initiator?: boolean }[] = [
  { label: "invalid UTF-8", message: Uint8Array.of(0xff, 0xfe, 0x80), error: /not JSON/ },
  {
    // A first byte of 0x20 or more: below, a message belongs to the chunk protocol.
    label: "garbage",
    message: Uint8Array.of(0xff, ...crypto.getRandomValues(new Uint8Array(299))),
    error: /not JSON/,
  },
  {
    label: "a binary message to a session without the chunk protocol",
    message: Uint8Array.of(0x01, 0, 0, 0, 1),
    error: /binary/,
  },
  { label: "not JSON", message: text("hello there"), error: /not JSON/ },
  { label: "truncated JSON", message: text('{"t":"records","records":['), error: /not JSON/ },
  { label: "an empty message", message: new Uint8Array(0), error: /not JSON/ },
  { label: "null", message: text("null"), error: /not an object/ },
  { label: "an array", message: text('[{"t":"records"}]'), error: /not an object/ },
  { label: "a string", message: text('"records"'), error: /not an object/ },
  { label: "a number", message: text("42"), error: /not an object/ },
  { label: "an unknown type", message: text('{"t":"hello","m":""}'), error: /unknown type/ },
  { label: "no type", message: text('{"records":[]}'), error: /unknown type/ },
  { label: "rc without m", message: text('{"t":"rc","start":true}'), error: /unknown type/ },
  { label: "rc with a numeric m", message: text('{"t":"rc","m":5}'), error: /unknown type/ },
  {
    label: "a round continued that never started",
    message: text(`{"t":"rc","m":"${encodeBase64(new Uint8Array(8))}"}`),
    error: /no round is running/,
  },
  {
    label: "bad base64",
    message: text('{"t":"rc","start":true,"m":"!!not base64!!"}'),
    error: /bad base64/,
  },
  {
    label: "garbage reconciliation bytes",
    message: text(
      `{"t":"rc","start":true,"m":"${encodeBase64(crypto.getRandomValues(new Uint8Array(64)))}"}`,
    ),
    error: /./,
  },
  {
    label: "a round started by the responder",
    message: text(`{"t":"rc","start":true,"m":"${encodeBase64(Uint8Array.of(0xa1))}"}`),
    error: /the responder started a round/,
    initiator: true,
  },
  {
    label: "records not a list",
    message: text('{"t":"records","records":"x"}'),
    error: /bad records list/,
  },
  { label: "records missing", message: text('{"t":"records"}'), error: /bad records list/ },
  {
    label: `more than ${MAX_RECORDS_PER_MESSAGE} records`,
    message: text(
      JSON.stringify({ t: "records", records: new Array(MAX_RECORDS_PER_MESSAGE + 1).fill({}) }),
    ),
    error: /bad records list/,
  },
];

for (const hostile of HOSTILE) {
  Deno.test(`sync: a hostile peer sending ${hostile.label} is a protocol error`, async () => {
    const { raw, run, source } = await againstRaw({
      sessionIsInitiator: hostile.initiator ?? false,
    });
    try {
      await raw.send(hostile.message);
      await assert.rejects(run, (error) => {
        assert.ok(error instanceof ProtocolError, `expected ProtocolError, got ${error}`);
        assert.match(error.message, hostile.error);
        return true;
      });
      assert.equal(source.receiveCalls, 0, "nothing reached the segment");
    } finally {
      await raw.close();
    }
  });
}

Deno.test("sync: records are handed over unparsed; the source's refusal ends the session", async () => {
  const { raw, run, source } = await againstRaw({ sessionIsInitiator: false });
  try {
    const good = randomRecord("good");
    await raw.send(text(JSON.stringify({ t: "records", records: [good] })));
    await raw.send(text(JSON.stringify({ t: "records", records: [] })));
    source.failReceive = null;
    // The source decides about contents: a ProtocolError from it ends run().
    const deadline = Date.now() + WAIT_MS;
    while (source.receiveCalls < 2) {
      if (Date.now() > deadline) throw new Error("records not received");
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    assert.deepEqual(source.received, [JSON.parse(JSON.stringify(good))]);
    source.failReceive = new ProtocolError("Peer sent more than 20 refused records");
    await raw.send(text(JSON.stringify({ t: "records", records: [{ junk: true }] })));
    await assert.rejects(run, /more than 20 refused records/);
  } finally {
    await raw.close();
  }
});
