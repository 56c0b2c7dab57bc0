/**
 * Sync benchmark (the swarm issue): range-based set reconciliation (src/net/reconcile.ts)
 * against the naive exchange, in one process, in the same run.
 *
 * Two peers hold `--records` (100 000) shared records plus d records only one of them
 * has (d = 0, 10, 1000 on one side; 10 and 1000 split over both sides; and a new node
 * with nothing against the full set). A record is an item (registration time in ms, spread
 * over a month, ties included; SHA-256 of a synthetic narinfo as the id), handed to the
 * storage in arbitrary order as a metadata backend would list them.
 *
 * - reconciliation: both storages built (sort + prefix sums), then messages passed back
 *   and forth until both sides are done; every message's bytes are counted (the sync
 *   layer adds its frame header and AEAD tag on top, 4 + 16 bytes, counted here too).
 *   The ids each side reports are checked against the true differences.
 * - naive: A sends every id it holds (32 bytes each) in one frame; B decodes them into a
 *   set, answers with the ids A lacks (32 bytes each) and the indexes (u32) of the ids it
 *   lacks itself: one round trip, timed the same way.
 *
 * Reported: round trips, bytes on the wire, their ratio to the naive bytes, and the wall
 * time to compare (median of `--runs`). Targets from the issue: under 1% of the naive
 * bytes for d = 10, and 100k records compared in under 2 s.
 *
 * Handshakes per second on one core (the last figure): full
 * `Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b` handshakes with both ends in this process, on the
 * one JavaScript thread (node:crypto's X25519 and ChaCha20-Poly1305 run synchronously on
 * it): the pure NoiseHandshake state machine (src/net/noise.ts: three messages, then
 * split), and openSecureChannel (src/net/secure_channel.ts: framing and the READY key
 * confirmation too) over real TCP on 127.0.0.1, one handshake at a time and several in
 * flight. A connection's two ends cost about the same, so one node alone completes about
 * twice the figure. CPU seconds (user + system, whole process) next to the wall time show
 * how much of a core the run got and how much more than one core the runtime used (socket
 * I/O runs on Deno's own threads); "per CPU s" is the figure on a machine that is busy
 * with other work. A reference row times one X25519 key generation plus one DH, the unit
 * a handshake is made of (each end: one key generation and three DHs).
 *
 * Usage: `deno run -A bench/sync.ts [--records 100000] [--runs 3]
 * [--max-message-bytes 524288] [--handshake-seconds 3] [--only all|reconcile|handshakes]`
 * (pin it to one core with `taskset -c 0` to be strict about it)
 * @module
 */

import { Buffer } from "node:buffer";
import { createHash, diffieHellman, generateKeyPairSync } from "node:crypto";
import process from "node:process";
import { fixed, formatTable, machineInfo, median, parseFlags } from "./common.ts";
import {
  RECONCILE_DEFAULT_MAX_MESSAGE_BYTES,
  type ReconcileItem,
  Reconciler,
  ReconcileStorage,
} from "../src/net/reconcile.ts";
import { generateStaticKeyPair, type KeyPair, NoiseHandshake } from "../src/net/noise.ts";
import { openSecureChannel } from "../src/net/secure_channel.ts";
import { deriveTopicKeys } from "../src/net/topic.ts";

/** Frame header + ChaCha20-Poly1305 tag the transport adds to every message. */
const FRAME_OVERHEAD = 4 + 16;

interface Scenario {
  label: string;
  onlyA: number;
  onlyB: number;
  shared: number;
}

interface Measurement {
  messages: number;
  roundTrips: number;
  bytes: number;
  largest: number;
  buildMs: number;
  sessionMs: number;
}

function log(line: string): void {
  console.error(`[sync] ${line}`);
}

function hex(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Deterministic records: SHA-256 of a narinfo-like text, registration times over 30 days. */
function records(prefix: string, count: number, seed: number): ReconcileItem[] {
  const start = 1_750_000_000_000;
  const month = 30 * 24 * 3600 * 1000;
  const out: ReconcileItem[] = [];
  let state = seed >>> 0;
  for (let i = 0; i < count; i++) {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    const text = `StorePath: /nix/store/${prefix}-${i}\nNarSize: ${state}\n`;
    const id = new Uint8Array(createHash("sha256").update(text).digest());
    // Seconds resolution for a few, so equal timestamps occur, as with batch imports.
    const time = start + Math.floor((state / 2 ** 32) * month);
    out.push({ timestamp: i % 10 === 0 ? time - (time % 1000) : time, id });
  }
  return out;
}

function shuffle<T>(items: T[], seed: number): T[] {
  let state = seed >>> 0;
  for (let i = items.length - 1; i > 0; i--) {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    const j = state % (i + 1);
    [items[i], items[j]] = [items[j], items[i]];
  }
  return items;
}

function reconcile(
  a: ReconcileItem[],
  b: ReconcileItem[],
  expected: { onlyA: Set<string>; onlyB: Set<string> },
  maxMessageBytes: number,
): Measurement {
  const t0 = performance.now();
  const storageA = new ReconcileStorage(a);
  const storageB = new ReconcileStorage(b);
  const t1 = performance.now();
  const peerA = new Reconciler(storageA, { maxMessageBytes });
  const peerB = new Reconciler(storageB, { maxMessageBytes });
  const learnt = {
    aHave: [] as Uint8Array[],
    aNeed: [] as Uint8Array[],
    bHave: [] as Uint8Array[],
    bNeed: [] as Uint8Array[],
  };
  let messages = 0;
  let bytes = 0;
  let largest = 0;
  let message: Uint8Array | null = peerA.initiate();
  let receiver = peerB;
  while (message !== null) {
    messages++;
    bytes += message.length + FRAME_OVERHEAD;
    largest = Math.max(largest, message.length);
    const step = receiver.reconcile(message);
    (receiver === peerA ? learnt.aHave : learnt.bHave).push(...step.have);
    (receiver === peerA ? learnt.aNeed : learnt.bNeed).push(...step.need);
    message = step.reply;
    receiver = receiver === peerA ? peerB : peerA;
  }
  const t2 = performance.now();
  const same = (ids: Uint8Array[], want: Set<string>) =>
    ids.length === want.size && ids.every((id) => want.has(hex(id)));
  if (
    !same(learnt.aHave, expected.onlyA) || !same(learnt.bNeed, expected.onlyA) ||
    !same(learnt.aNeed, expected.onlyB) || !same(learnt.bHave, expected.onlyB)
  ) {
    throw new Error("Reconciliation reported the wrong differences");
  }
  return {
    messages,
    roundTrips: Math.ceil(messages / 2),
    bytes,
    largest,
    buildMs: t1 - t0,
    sessionMs: t2 - t1,
  };
}

/** An id as a Map key (latin1 keeps it 32 chars, cheaper than hex). */
function key(id: Uint8Array): string {
  return Buffer.from(id.buffer, id.byteOffset, id.length).toString("latin1");
}

/** The naive exchange, done for real: A's full id list out, B's differences back. */
function naive(a: ReconcileItem[], b: ReconcileItem[]): Measurement {
  const t0 = performance.now();
  const request = new Uint8Array(4 + a.length * 32);
  new DataView(request.buffer).setUint32(0, a.length);
  a.forEach((item, i) => request.set(item.id, 4 + i * 32));

  // B: which of A's ids does it hold, and which of its own does A lack?
  const count = new DataView(request.buffer).getUint32(0);
  const theirs = new Map<string, number>();
  for (let i = 0; i < count; i++) {
    theirs.set(key(request.subarray(4 + i * 32, 36 + i * 32)), i);
  }
  const ownMissingOnA: Uint8Array[] = [];
  const seen = new Set<number>();
  for (const { id } of b) {
    const index = theirs.get(key(id));
    if (index === undefined) ownMissingOnA.push(id);
    else seen.add(index);
  }
  const lacking: number[] = [];
  for (let i = 0; i < count; i++) if (!seen.has(i)) lacking.push(i);
  const reply = new Uint8Array(8 + ownMissingOnA.length * 32 + lacking.length * 4);
  const view = new DataView(reply.buffer);
  view.setUint32(0, ownMissingOnA.length);
  ownMissingOnA.forEach((id, i) => reply.set(id, 4 + i * 32));
  const at = 4 + ownMissingOnA.length * 32;
  view.setUint32(at, lacking.length);
  lacking.forEach((index, i) => view.setUint32(at + 4 + i * 4, index));
  const t1 = performance.now();
  return {
    messages: 2,
    roundTrips: 1,
    bytes: request.length + reply.length + 2 * FRAME_OVERHEAD,
    largest: Math.max(request.length, reply.length),
    buildMs: 0,
    sessionMs: t1 - t0,
  };
}

function kib(bytes: number): string {
  return bytes < 10_000 ? `${bytes} B` : `${(bytes / 1024).toFixed(1)} KiB`;
}

// ---------------------------------------------------------------------------------------
// Handshakes

interface HandshakeMeasurement {
  count: number;
  wallMs: number;
  cpuMs: number;
  /** Bytes both ends wrote per handshake (frames included where there are frames). */
  bytes: number;
}

/** CPU time of this process so far, in ms (user + system, all threads). */
function cpuMs(): number {
  const usage = process.cpuUsage();
  return (usage.user + usage.system) / 1000;
}

/** Runs `one` repeatedly (`inFlight` at a time) for about `seconds`. */
async function repeat(
  seconds: number,
  inFlight: number,
  one: () => Promise<number> | number,
): Promise<HandshakeMeasurement> {
  // Warm-up: key imports, JIT, the first connection.
  for (let i = 0; i < 20; i++) await one();
  const wall0 = performance.now();
  const cpu0 = cpuMs();
  const deadline = wall0 + seconds * 1000;
  let count = 0;
  let bytes = 0;
  const worker = async () => {
    while (performance.now() < deadline) {
      bytes = await one();
      count++;
    }
  };
  await Promise.all(Array.from({ length: inFlight }, worker));
  return { count, wallMs: performance.now() - wall0, cpuMs: cpuMs() - cpu0, bytes };
}

/** One handshake of the pure state machines, both ends; returns the bytes exchanged. */
function stateMachineHandshake(a: KeyPair, b: KeyPair, psk: Uint8Array): number {
  const initiator = new NoiseHandshake({ initiator: true, staticKey: a, psk });
  const responder = new NoiseHandshake({ initiator: false, staticKey: b, psk });
  const m1 = initiator.writeMessage();
  responder.readMessage(m1);
  const m2 = responder.writeMessage();
  initiator.readMessage(m2);
  const m3 = initiator.writeMessage();
  responder.readMessage(m3);
  initiator.split();
  responder.split();
  return m1.length + m2.length + m3.length;
}

/** Counts the bytes a connection writes. */
function countingConn(conn: Deno.TcpConn, counter: { bytes: number }) {
  const writable = new WritableStream<Uint8Array>({
    async write(chunk) {
      counter.bytes += chunk.length;
      let written = 0;
      while (written < chunk.length) written += await conn.write(chunk.subarray(written));
    },
  });
  return { readable: conn.readable, writable, close: () => conn.close() };
}

async function handshakes(seconds: number): Promise<void> {
  const psk = deriveTopicKeys("bench topic").psk;
  const a = generateStaticKeyPair();
  const b = generateStaticKeyPair();
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = listener.addr.port;
  const accepted: ((conn: Deno.TcpConn) => void)[] = [];
  const acceptLoop = (async () => {
    for await (const conn of listener) accepted.shift()?.(conn);
  })();
  const overTcp = async (): Promise<number> => {
    const counter = { bytes: 0 };
    const server = new Promise<Deno.TcpConn>((resolve) => accepted.push(resolve));
    const client = await Deno.connect({ hostname: "127.0.0.1", port });
    const serverConn = await server;
    const [x, y] = await Promise.all([
      openSecureChannel(countingConn(client, counter), { initiator: true, staticKey: a, psk }),
      openSecureChannel(countingConn(serverConn, counter), {
        initiator: false,
        staticKey: b,
        psk,
      }),
    ]);
    const bytes = counter.bytes;
    // Not a clean close (that is a round trip more): drop both ends.
    client.close();
    serverConn.close();
    await Promise.allSettled([x.closed, y.closed]);
    return bytes;
  };

  const rows: [string, HandshakeMeasurement][] = [];
  log("handshakes: X25519 reference");
  const peerKey = generateKeyPairSync("x25519");
  rows.push([
    "reference: one X25519 key generation + one DH (node:crypto)",
    await repeat(seconds, 1, () => {
      const { privateKey } = generateKeyPairSync("x25519");
      diffieHellman({ privateKey, publicKey: peerKey.publicKey });
      return 0;
    }),
  ]);
  log("handshakes: state machine");
  rows.push([
    "NoiseHandshake state machines, both ends in memory",
    await repeat(seconds, 1, () => stateMachineHandshake(a, b, psk)),
  ]);
  log("handshakes: TCP, one at a time");
  rows.push([
    "openSecureChannel over TCP 127.0.0.1, one at a time",
    await repeat(seconds, 1, overTcp),
  ]);
  log("handshakes: TCP, 16 in flight");
  rows.push([
    "openSecureChannel over TCP 127.0.0.1, 16 in flight",
    await repeat(seconds, 16, overTcp),
  ]);
  listener.close();
  await acceptLoop.catch(() => {});

  console.log(`\n# Noise handshakes (Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b), ~${seconds} s each`);
  console.log(
    "Both ends of every handshake run in this process on its one JavaScript thread; one end alone costs about half.\n",
  );
  console.log(formatTable(
    [
      "what",
      "handshakes",
      "handshakes/s (wall)",
      "µs each",
      "CPU s / wall s",
      "per CPU s",
      "bytes on the wire",
    ],
    rows.map(([label, m]) => [
      label,
      String(m.count),
      fixed((m.count * 1000) / m.wallMs, 0),
      fixed((m.wallMs * 1000) / m.count, 0),
      fixed(m.cpuMs / m.wallMs, 2),
      fixed((m.count * 1000) / m.cpuMs, 0),
      m.bytes === 0 ? "" : String(m.bytes),
    ]),
  ));
}

// ---------------------------------------------------------------------------------------

async function main(): Promise<void> {
  const flags = parseFlags(Deno.args, {
    records: 100_000,
    runs: 3,
    maxMessageBytes: RECONCILE_DEFAULT_MAX_MESSAGE_BYTES,
    handshakeSeconds: 3,
    only: "all",
  });
  if (!["all", "reconcile", "handshakes"].includes(flags.only)) {
    throw new Error(`Invalid --only ${flags.only}: expected all, reconcile or handshakes`);
  }
  if (flags.only !== "handshakes") await reconciliation(flags);
  if (flags.only !== "reconcile") await handshakes(flags.handshakeSeconds);
}

async function reconciliation(
  flags: { records: number; runs: number; maxMessageBytes: number },
): Promise<void> {
  const n = flags.records;
  const scenarios: Scenario[] = [
    { label: "d = 0", shared: n, onlyA: 0, onlyB: 0 },
    { label: "d = 1 (one side)", shared: n, onlyA: 1, onlyB: 0 },
    { label: "d = 10 (one side)", shared: n, onlyA: 10, onlyB: 0 },
    { label: "d = 10 (5 + 5)", shared: n, onlyA: 5, onlyB: 5 },
    { label: "d = 1000 (one side)", shared: n, onlyA: 1000, onlyB: 0 },
    { label: "d = 1000 (500 + 500)", shared: n, onlyA: 500, onlyB: 500 },
    { label: `new node (0 vs ${n})`, shared: 0, onlyA: n, onlyB: 0 },
  ];
  console.log(`# Sync: reconciliation vs naive id exchange, ${n} records`);
  console.log(await machineInfo());
  console.log(
    `maxMessageBytes ${flags.maxMessageBytes}; bytes include ${FRAME_OVERHEAD} B of framing and AEAD tag per message; times are medians of ${flags.runs} runs\n`,
  );

  const rows: string[][] = [];
  let seed = 1;
  for (const scenario of scenarios) {
    log(scenario.label);
    const shared = records("shared", scenario.shared, seed++);
    const onlyA = records("only-a", scenario.onlyA, seed++);
    const onlyB = records("only-b", scenario.onlyB, seed++);
    const expected = {
      onlyA: new Set(onlyA.map((x) => hex(x.id))),
      onlyB: new Set(onlyB.map((x) => hex(x.id))),
    };
    const a = shuffle([...shared, ...onlyA], seed++);
    const b = shuffle([...shared, ...onlyB], seed++);
    const ours: Measurement[] = [];
    const theirs: Measurement[] = [];
    for (let run = 0; run < flags.runs; run++) {
      ours.push(reconcile(a, b, expected, flags.maxMessageBytes));
      theirs.push(naive(a, b));
    }
    const r = ours[0];
    const plain = theirs[0];
    const build = median(ours.map((m) => m.buildMs));
    const session = median(ours.map((m) => m.sessionMs));
    rows.push([
      scenario.label,
      String(r.roundTrips),
      String(r.messages),
      kib(r.bytes),
      kib(r.largest),
      kib(plain.bytes),
      `${fixed((100 * r.bytes) / plain.bytes, 2)} %`,
      `${fixed(build, 0)} + ${fixed(session, 0)} = ${fixed(build + session, 0)}`,
      fixed(median(theirs.map((m) => m.sessionMs)), 0),
    ]);
  }
  console.log(formatTable(
    [
      "differences",
      "round trips",
      "messages",
      "bytes (ours)",
      "largest message",
      "bytes (naive)",
      "ours / naive",
      "ms: build + session = compare",
      "ms (naive)",
    ],
    rows,
  ));
}

if (import.meta.main) await main();
