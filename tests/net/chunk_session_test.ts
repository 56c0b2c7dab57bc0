/**
 * The chunk session (src/net/chunk_session.ts) over real secure channels (Noise XXpsk3 over
 * an in-memory duplex pair, and over TCP on 127.0.0.1 for the two-way transfer): manifest
 * requests answered from the provider (null when not held); chunks answered in order with
 * the bytes as stored; a chunk id of no manifest sent on THIS session answered `NO CHUNK`
 * (the provider is not even asked), and the ids remembered for that bounded; a peer over MAX_MANIFESTS_OUTSTANDING or
 * MAX_CHUNKS_OUTSTANDING, an answer nobody asked for, an answer out of order, or a malformed
 * message makes handle() throw ProtocolError; close() resolves pending manifests with null
 * and rejects pending chunks; a failed send closes the session; a request handed over in
 * any microtask turn after the answering task's last send is still answered (with a channel
 * whose sends the test completes by hand); two sessions fetching large chunks from each
 * other at once both complete.
 *
 * Each test side runs the receive loop the swarm runs (receive, handle, close the session
 * when it ends). A "raw" side is a bare secure channel the test drives by hand, as a
 * hostile peer would. Waits are bounded, only to prove that nothing hangs.
 * @module
 */

import assert from "node:assert/strict";
import type { ChunkCompression } from "../../src/cache/compression.ts";
import { formatBase16, sha256 } from "../../src/cache/hash.ts";
import { ProtocolError } from "../../src/errors.ts";
import {
  type ChunkMessage,
  decodeChunkMessage,
  encodeChunk,
  encodeChunksRequest,
  encodeManifest,
  encodeManifestRequest,
  encodeNoChunk,
  MAX_CHUNKS_OUTSTANDING,
  MAX_IDS_PER_REQUEST,
  MAX_MANIFESTS_OUTSTANDING,
  type PeerManifest,
} from "../../src/net/chunk_protocol.ts";
import { type ChunkProvider, ChunkSession } from "../../src/net/chunk_session.ts";
import { generateStaticKeyPair } from "../../src/net/noise.ts";
import {
  type DuplexConn,
  memoryDuplexPair,
  openSecureChannel,
  type SecureChannel,
} from "../../src/net/secure_channel.ts";
import { deriveTopicKeys } from "../../src/net/topic.ts";
import { pseudoRandomBytes } from "../helpers/cache_fixture.ts";

const KEY_A = generateStaticKeyPair();
const KEY_B = generateStaticKeyPair();
const PSK = deriveTopicKeys("chunk session test topic").psk;
const WAIT_MS = 60_000;
const HASH_A = "0123456789abcdfghijklmnpqrsvwxyz";
const HASH_B = "zyxwvsrqpnmlkjihgfdcba9876543210";
const HASH_C = "00000000000000000000000000000000";

type Transport = "memory" | "tcp";

async function connPair(transport: Transport): Promise<[DuplexConn, DuplexConn]> {
  if (transport === "memory") return memoryDuplexPair();
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  try {
    const [server, client] = await Promise.all([
      listener.accept(),
      Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
    ]);
    return [client, server];
  } finally {
    listener.close();
  }
}

/** Two ends of one secure channel. */
async function channelPair(
  transport: Transport = "memory",
): Promise<[SecureChannel, SecureChannel]> {
  const [a, b] = await connPair(transport);
  return await Promise.all([
    openSecureChannel(a, { initiator: true, staticKey: KEY_A, psk: PSK, closeTimeoutMs: 500 }),
    openSecureChannel(b, { initiator: false, staticKey: KEY_B, psk: PSK, closeTimeoutMs: 500 }),
  ]);
}

/** Rejects after `ms` (bounded waits only: to prove that something does not hang). */
async function within<T>(what: string, promise: Promise<T>, ms = WAIT_MS): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`Timed out after ${ms} ms: ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** A chunk as a provider stores it. */
interface StoredChunk {
  id: string;
  size: number;
  compression: ChunkCompression;
  stored: Uint8Array;
}

function makeChunks(count: number, seed: number, storedSize = 1000): StoredChunk[] {
  return Array.from({ length: count }, (_, i) => {
    // The "stored" bytes stand for a compressed chunk file; the session does not look in.
    const stored = pseudoRandomBytes(storedSize + i, seed * 1000 + i + 1);
    return {
      id: formatBase16(sha256(stored)),
      size: 4000 + i,
      compression: "zstd" as ChunkCompression,
      stored,
    };
  });
}

function manifestOf(chunks: StoredChunk[], seed = "nar"): PeerManifest {
  return {
    narHash: sha256(new TextEncoder().encode(seed)),
    narSize: chunks.reduce((sum, chunk) => sum + chunk.size, 0),
    compression: "zstd",
    chunks: chunks.map(({ id, size }) => ({ id, size })),
  };
}

/** An in-memory provider that records what it is asked; `gate` holds manifest answers. */
class MemoryProvider implements ChunkProvider {
  manifests = new Map<string, PeerManifest>();
  chunks = new Map<string, Uint8Array>();
  manifestCalls: string[] = [];
  readCalls: string[] = [];
  gate: Promise<void> | null = null;

  add(hashPart: string, chunks: StoredChunk[], seed = hashPart): PeerManifest {
    const manifest = manifestOf(chunks, seed);
    this.manifests.set(hashPart, manifest);
    for (const chunk of chunks) this.chunks.set(`${chunk.id}.${chunk.compression}`, chunk.stored);
    return manifest;
  }

  async manifestOf(hashPart: string): Promise<PeerManifest | null> {
    this.manifestCalls.push(hashPart);
    if (this.gate) await this.gate;
    return this.manifests.get(hashPart) ?? null;
  }

  readChunk(id: string, compression: ChunkCompression): Uint8Array | null {
    this.readCalls.push(id);
    return this.chunks.get(`${id}.${compression}`) ?? null;
  }
}

const EMPTY_PROVIDER: ChunkProvider = {
  manifestOf: () => Promise.resolve(null),
  readChunk: () => null,
};

/** One side: a session and the swarm's receive loop for it. */
interface Side {
  channel: SecureChannel;
  session: ChunkSession;
  /** Resolves when the loop ends: null at a clean end, or the error handle() threw. */
  ended: Promise<Error | null>;
}

function runSide(channel: SecureChannel, provider: ChunkProvider): Side {
  const session = new ChunkSession(channel, provider);
  const ended = (async () => {
    try {
      for (;;) {
        const message = await channel.receive();
        if (message === null) return null;
        session.handle(message);
      }
    } catch (error) {
      await channel.close().catch(() => {});
      return error as Error;
    } finally {
      session.close();
    }
  })();
  return { channel, session, ended };
}

async function closeAll(...channels: SecureChannel[]): Promise<void> {
  await Promise.all(channels.map((channel) => channel.close().catch(() => {})));
  await Promise.all(channels.map((channel) => channel.closed));
}

/** Two connected sides: `a` asks, `b` answers from `provider`. */
async function sessionPair(provider: ChunkProvider, transport: Transport = "memory") {
  const [ca, cb] = await channelPair(transport);
  const a = runSide(ca, EMPTY_PROVIDER);
  const b = runSide(cb, provider);
  return {
    a,
    b,
    async close() {
      await closeAll(ca, cb);
      assert.equal(await a.ended, null, "the asking side saw no protocol error");
      assert.equal(await b.ended, null, "the answering side saw no protocol error");
    },
  };
}

/** A channel that counts the messages its receive() delivered. */
function countingChannel(inner: SecureChannel): SecureChannel & { received: number } {
  const counting = {
    received: 0,
    get remoteStatic() {
      return inner.remoteStatic;
    },
    get handshakeHash() {
      return inner.handshakeHash;
    },
    closed: inner.closed,
    send: (message: Uint8Array) => inner.send(message),
    async receive() {
      const message = await inner.receive();
      if (message !== null) counting.received++;
      return message;
    },
    close: () => inner.close(),
  };
  return counting;
}

/** Polls until `check` holds (bounded: only to prove that it happens). */
async function until(what: string, check: () => boolean, ms = WAIT_MS): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`Timed out after ${ms} ms: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

/** A session facing a hostile peer driven by hand through a raw channel. */
async function hostilePair(provider: ChunkProvider) {
  const [raw, victimChannel] = await channelPair();
  const counted = countingChannel(victimChannel);
  const victim = runSide(counted, provider);
  return {
    raw,
    victim,
    /** Waits until the session has been handed `count` messages in all. */
    handled: (count: number) =>
      until(`the session to handle ${count} messages`, () => counted.received >= count),
    /** The next message the victim sent, decoded. */
    async next(): Promise<ChunkMessage> {
      const bytes = await within("a message from the session", raw.receive());
      assert.ok(bytes !== null, "the session sent a message");
      return decodeChunkMessage(bytes);
    },
    close: () => closeAll(raw, victimChannel),
  };
}

async function assertProtocolError(ended: Promise<Error | null>, pattern: RegExp): Promise<void> {
  const error = await within("the session to fail", ended);
  assert.ok(error instanceof ProtocolError, `expected a ProtocolError, got ${error}`);
  assert.match(error.message, pattern);
}

Deno.test("chunk session: a manifest request is answered from the provider; not held is null", async () => {
  const provider = new MemoryProvider();
  const held = provider.add(HASH_A, makeChunks(5, 1));
  const pair = await sessionPair(provider);
  try {
    const [found, missing, again] = await within(
      "manifests",
      Promise.all([
        pair.a.session.requestManifest(HASH_A),
        pair.a.session.requestManifest(HASH_B),
        pair.a.session.requestManifest(HASH_A),
      ]),
    );
    assert.deepEqual(found, held);
    assert.equal(missing, null);
    assert.deepEqual(again, held);
    assert.deepEqual(provider.manifestCalls, [HASH_A, HASH_B, HASH_A]);
  } finally {
    await pair.close();
  }
});

Deno.test("chunk session: chunks are answered in order with the bytes as stored", async () => {
  const provider = new MemoryProvider();
  const chunks = makeChunks(70, 2);
  provider.add(HASH_A, chunks);
  const pair = await sessionPair(provider);
  try {
    await within("manifest", pair.a.session.requestManifest(HASH_A));
    // Three requests in flight at once: a full one, one out of manifest order with a
    // repeated id, and a single id.
    const first = chunks.slice(0, MAX_IDS_PER_REQUEST);
    const second = [chunks[69], chunks[3], chunks[69], chunks[66]];
    const third = [chunks[10]];
    const answers = [first, second, third].map((group) =>
      Promise.all(pair.a.session.requestChunks(group.map((chunk) => chunk.id)))
    );
    const results = await within("chunks", Promise.all(answers));
    [first, second, third].forEach((group, g) => {
      group.forEach((chunk, i) => {
        assert.deepEqual(results[g][i], { compression: "zstd", data: chunk.stored });
      });
    });
    const all = [...first, ...second, ...third];
    const bytes = all.reduce((sum, chunk) => sum + chunk.stored.length, 0);
    assert.deepEqual(pair.b.session.stats, {
      chunksServed: all.length,
      bytesServed: bytes,
      chunksReceived: 0,
      bytesReceived: 0,
    });
    assert.deepEqual(pair.a.session.stats, {
      chunksServed: 0,
      bytesServed: 0,
      chunksReceived: all.length,
      bytesReceived: bytes,
    });
    assert.throws(() => pair.a.session.requestChunks([]), RangeError);
    assert.throws(
      () => pair.a.session.requestChunks(chunks.slice(0, MAX_IDS_PER_REQUEST + 1).map((c) => c.id)),
      RangeError,
    );
  } finally {
    await pair.close();
  }
});

Deno.test("chunk session: a chunk of no manifest sent on this session is answered NO CHUNK", async () => {
  const provider = new MemoryProvider();
  const chunksA = makeChunks(4, 3);
  const chunksB = makeChunks(4, 4);
  provider.add(HASH_A, chunksA);
  provider.add(HASH_B, chunksB);
  const pair = await sessionPair(provider);
  // A second connection to the same provider (another peer of the same node).
  const other = await sessionPair(provider);
  try {
    const ids = chunksA.map((chunk) => chunk.id);
    // Before any manifest: the provider holds them, but this peer proved nothing.
    assert.deepEqual(
      await within("chunks", Promise.all(pair.a.session.requestChunks(ids))),
      [null, null, null, null],
    );
    assert.equal(provider.readCalls.length, 0, "the provider is not asked for unproven ids");
    // A path not held grants nothing.
    assert.equal(await within("manifest", pair.a.session.requestManifest(HASH_C)), null);
    assert.deepEqual(
      await within("chunks", Promise.all(pair.a.session.requestChunks(ids.slice(0, 1)))),
      [null],
    );
    // A manifest sent on the OTHER session grants nothing on this one.
    await within("manifest", other.a.session.requestManifest(HASH_A));
    assert.deepEqual(
      await within("chunks", Promise.all(pair.a.session.requestChunks(ids))),
      [null, null, null, null],
    );
    // Once this session sent the manifest of A: A's chunks, and still not B's.
    await within("manifest", pair.a.session.requestManifest(HASH_A));
    const mixed = [ids[0], chunksB[0].id, ids[3]];
    const answers = await within("chunks", Promise.all(pair.a.session.requestChunks(mixed)));
    assert.deepEqual(answers[0], { compression: "zstd", data: chunksA[0].stored });
    assert.equal(answers[1], null);
    assert.deepEqual(answers[2], { compression: "zstd", data: chunksA[3].stored });
    assert.ok(!provider.readCalls.includes(chunksB[0].id));
    assert.equal(pair.b.session.stats.chunksServed, 2);
  } finally {
    await other.close();
    await pair.close();
  }
});

Deno.test("chunk session: the ids a peer may ask for are bounded (the oldest manifests' go first)", async () => {
  // 2^18 ids are remembered (chunk_session.ts): two manifests of 200k and 100k chunks
  // overflow it by 37,856, which are the first ones of the first manifest.
  const synthetic = (count: number, seed: number): PeerManifest => ({
    narHash: sha256(new Uint8Array([seed])),
    narSize: count,
    compression: "none",
    chunks: Array.from({ length: count }, (_, i) => ({
      id: (seed.toString(16).padStart(8, "0") + i.toString(16).padStart(8, "0")).repeat(4),
      size: 1,
    })),
  });
  const first = synthetic(200_000, 1);
  const second = synthetic(100_000, 2);
  const provider: ChunkProvider = {
    manifestOf: (hashPart) => Promise.resolve(hashPart === HASH_A ? first : second),
    readChunk: (id) => new TextEncoder().encode(id.slice(0, 16)),
  };
  const pair = await sessionPair(provider);
  try {
    await within("manifest", pair.a.session.requestManifest(HASH_A));
    await within("manifest", pair.a.session.requestManifest(HASH_B));
    const evicted = 200_000 + 100_000 - (1 << 18);
    const ids = [
      first.chunks[0].id,
      first.chunks[evicted - 1].id,
      first.chunks[evicted].id,
      first.chunks[199_999].id,
      second.chunks[0].id,
      second.chunks[99_999].id,
    ];
    const answers = await within("chunks", Promise.all(pair.a.session.requestChunks(ids)));
    assert.deepEqual(answers.map((answer) => answer !== null), [
      false,
      false,
      true,
      true,
      true,
      true,
    ]);
    // Asking for a manifest again allows its chunks again.
    await within("manifest", pair.a.session.requestManifest(HASH_A));
    const again = await within("chunk", pair.a.session.requestChunks([first.chunks[0].id])[0]);
    assert.notEqual(again, null);
  } finally {
    await pair.close();
  }
});

Deno.test("chunk session: a chunk of a manifest that the provider no longer has is NO CHUNK", async () => {
  const provider = new MemoryProvider();
  const chunks = makeChunks(3, 5);
  provider.add(HASH_A, chunks);
  const pair = await sessionPair(provider);
  try {
    await within("manifest", pair.a.session.requestManifest(HASH_A));
    provider.chunks.delete(`${chunks[1].id}.zstd`); // e.g. collected meanwhile
    const answers = await within(
      "chunks",
      Promise.all(pair.a.session.requestChunks(chunks.map((chunk) => chunk.id))),
    );
    assert.deepEqual(answers.map((answer) => answer?.data ?? null), [
      chunks[0].stored,
      null,
      chunks[2].stored,
    ]);
  } finally {
    await pair.close();
  }
});

Deno.test("chunk session: a peer over MAX_MANIFESTS_OUTSTANDING gets a ProtocolError", async () => {
  const provider = new MemoryProvider();
  let release!: () => void;
  provider.gate = new Promise((resolve) => (release = resolve));
  const hostile = await hostilePair(provider);
  try {
    // The provider holds the first answer, so every request stays waiting.
    for (let i = 0; i < MAX_MANIFESTS_OUTSTANDING + 2; i++) {
      await hostile.raw.send(encodeManifestRequest(i + 1, HASH_A));
    }
    await assertProtocolError(hostile.victim.ended, /too many manifest requests waiting/);
    // The limit is on waiting requests: the one being answered does not count.
    assert.equal(hostile.victim.session.closed, true);
    assert.equal(provider.manifestCalls.length, 1);
  } finally {
    release();
    await hostile.close();
  }
});

Deno.test("chunk session: exactly MAX_MANIFESTS_OUTSTANDING waiting manifests are accepted", async () => {
  const provider = new MemoryProvider();
  provider.add(HASH_A, makeChunks(2, 6));
  let release!: () => void;
  provider.gate = new Promise((resolve) => (release = resolve));
  const hostile = await hostilePair(provider);
  try {
    // One being answered (held by the gate) and MAX waiting.
    for (let i = 0; i < MAX_MANIFESTS_OUTSTANDING + 1; i++) {
      await hostile.raw.send(encodeManifestRequest(i + 1, HASH_A));
    }
    // All handled (none refused) while the provider still holds the first answer; then
    // every answer comes, in order.
    await hostile.handled(MAX_MANIFESTS_OUTSTANDING + 1);
    assert.equal(hostile.victim.session.closed, false);
    release();
    for (let i = 0; i < MAX_MANIFESTS_OUTSTANDING + 1; i++) {
      const message = await hostile.next();
      assert.equal(message.type, "manifest");
      assert.equal(message.rid, i + 1);
    }
    assert.equal(hostile.victim.session.closed, false);
  } finally {
    await hostile.close();
  }
  assert.equal(await hostile.victim.ended, null);
});

Deno.test("chunk session: a peer over MAX_CHUNKS_OUTSTANDING gets a ProtocolError", async () => {
  const provider = new MemoryProvider();
  let release!: () => void;
  provider.gate = new Promise((resolve) => (release = resolve));
  const hostile = await hostilePair(provider);
  const ids = makeChunks(MAX_IDS_PER_REQUEST, 7).map((chunk) => chunk.id);
  try {
    // A manifest request first holds the answering task, so no chunk is answered.
    await hostile.raw.send(encodeManifestRequest(1, HASH_A));
    const fit = MAX_CHUNKS_OUTSTANDING / MAX_IDS_PER_REQUEST;
    assert.ok(Number.isInteger(fit));
    for (let i = 0; i <= fit; i++) await hostile.raw.send(encodeChunksRequest(100 + i, ids));
    await assertProtocolError(hostile.victim.ended, /too many chunk requests waiting/);
  } finally {
    release();
    await hostile.close();
  }
});

Deno.test("chunk session: MAX_CHUNKS_OUTSTANDING waiting chunks are accepted and all answered", async () => {
  const provider = new MemoryProvider();
  let release!: () => void;
  provider.gate = new Promise((resolve) => (release = resolve));
  const hostile = await hostilePair(provider);
  const ids = makeChunks(MAX_IDS_PER_REQUEST, 8).map((chunk) => chunk.id);
  try {
    await hostile.raw.send(encodeManifestRequest(1, HASH_A));
    const fit = MAX_CHUNKS_OUTSTANDING / MAX_IDS_PER_REQUEST;
    for (let i = 0; i < fit; i++) await hostile.raw.send(encodeChunksRequest(100 + i, ids));
    await hostile.handled(fit + 1);
    assert.equal(hostile.victim.session.closed, false);
    release();
    assert.deepEqual(await hostile.next(), { type: "manifest", rid: 1, manifest: null });
    for (let i = 0; i < fit; i++) {
      for (const id of ids) {
        assert.deepEqual(await hostile.next(), { type: "no chunk", rid: 100 + i, id });
      }
    }
    // Answered requests no longer count: the same again is accepted.
    for (let i = 0; i < fit; i++) await hostile.raw.send(encodeChunksRequest(200 + i, ids));
    for (let i = 0; i < fit * ids.length; i++) {
      assert.equal((await hostile.next()).type, "no chunk");
    }
    assert.equal(hostile.victim.session.closed, false);
  } finally {
    await hostile.close();
  }
  assert.equal(await hostile.victim.ended, null);
});

Deno.test("chunk session: answers nobody asked for are protocol errors", async () => {
  const id = makeChunks(1, 9)[0].id;
  const unsolicited: [string, Uint8Array, RegExp][] = [
    ["chunk", encodeChunk(7, id, "zstd", new Uint8Array([1, 2, 3])), /Unexpected chunk/],
    ["no chunk", encodeNoChunk(7, id), /Unexpected chunk/],
    ["manifest", encodeManifest(7, null), /Unexpected manifest/],
    ["garbage", new Uint8Array([0x04, 1, 2]), /Invalid chunk message: too short/],
  ];
  for (const [what, bytes, pattern] of unsolicited) {
    const hostile = await hostilePair(new MemoryProvider());
    try {
      await hostile.raw.send(bytes);
      await assertProtocolError(hostile.victim.ended, pattern);
      assert.equal(hostile.victim.session.closed, true, what);
    } finally {
      await hostile.close();
    }
  }
});

Deno.test("chunk session: an answer out of order, or under another request id, is a protocol error", async () => {
  const [a, b, c] = makeChunks(3, 10).map((chunk) => chunk.id);
  for (const variant of ["wrong id", "wrong rid", "one too many"]) {
    const hostile = await hostilePair(new MemoryProvider());
    try {
      const answers = hostile.victim.session.requestChunks([a, b]);
      const request = await hostile.next();
      assert.deepEqual(request, { type: "chunks?", rid: request.rid, ids: [a, b] });
      const data = new Uint8Array([5]);
      if (variant === "wrong id") {
        await hostile.raw.send(encodeChunk(request.rid, b, "zstd", data));
      } else if (variant === "wrong rid") {
        await hostile.raw.send(encodeChunk(request.rid + 1, a, "zstd", data));
      } else {
        await hostile.raw.send(encodeChunk(request.rid, a, "zstd", data));
        await hostile.raw.send(encodeNoChunk(request.rid, b));
        await hostile.raw.send(encodeNoChunk(request.rid, c));
      }
      await assertProtocolError(hostile.victim.ended, /Unexpected chunk/);
      const settled = await within("answers", Promise.allSettled(answers));
      if (variant === "one too many") {
        assert.deepEqual(settled, [
          { status: "fulfilled", value: { compression: "zstd", data } },
          { status: "fulfilled", value: null },
        ]);
      } else {
        // The session ended: what was asked is rejected, never answered wrongly.
        for (const result of settled) {
          assert.equal(result.status, "rejected");
          assert.ok(result.reason instanceof ProtocolError);
        }
      }
    } finally {
      await hostile.close();
    }
  }
});

Deno.test("chunk session: close() resolves pending manifests with null and rejects pending chunks", async () => {
  const hostile = await hostilePair(new MemoryProvider());
  const [a, b, c] = makeChunks(3, 11).map((chunk) => chunk.id);
  try {
    const session = hostile.victim.session;
    const manifest = session.requestManifest(HASH_A);
    const chunks = session.requestChunks([a, b, c]);
    // The peer answers one chunk, then goes quiet.
    assert.equal((await hostile.next()).type, "manifest?");
    const request = await hostile.next();
    await hostile.raw.send(encodeChunk(request.rid, a, "none", new Uint8Array([1])));
    assert.deepEqual(await within("first chunk", chunks[0]), {
      compression: "none",
      data: new Uint8Array([1]),
    });
    assert.equal(session.closed, false);
    session.close("Test closes");
    assert.equal(session.closed, true);
    assert.equal(await within("manifest", manifest), null);
    for (const pending of chunks.slice(1)) {
      await assert.rejects(within("chunk", pending), (error: Error) => {
        assert.ok(error instanceof ProtocolError);
        assert.equal(error.message, "Test closes");
        return true;
      });
    }
    // After close: new requests fail at once.
    await assert.rejects(session.requestManifest(HASH_B), ProtocolError);
    const late = session.requestChunks([a]);
    assert.equal(late.length, 1);
    await assert.rejects(late[0], ProtocolError);
    session.close("Again"); // idempotent
  } finally {
    await hostile.close();
  }
});

Deno.test("chunk session: a send that fails closes the session and fails its requests", async () => {
  const [ca, cb] = await channelPair();
  const session = new ChunkSession(ca, EMPTY_PROVIDER);
  await closeAll(ca, cb);
  const manifest = session.requestManifest(HASH_A);
  const [chunk] = session.requestChunks([makeChunks(1, 12)[0].id]);
  assert.equal(await within("manifest", manifest), null);
  await assert.rejects(within("chunk", chunk), ProtocolError);
  assert.equal(session.closed, true);
});

Deno.test("chunk session: a request that comes just as the answering task finishes is answered", async () => {
  // The receive loop may hand over a request at any turn of the microtask queue, also
  // right after the answering task found its queue empty. A channel whose sends the test
  // completes by hand tries every turn from 0 to 10 after the last answer's send.
  for (let turns = 0; turns <= 10; turns++) {
    const sent: ChunkMessage[] = [];
    const releases: (() => void)[] = [];
    const channel: SecureChannel = {
      remoteStatic: new Uint8Array(32),
      handshakeHash: new Uint8Array(32),
      closed: Promise.resolve(),
      send(message) {
        sent.push(decodeChunkMessage(message));
        return new Promise<void>((resolve) => releases.push(resolve));
      },
      receive: () => Promise.resolve(null),
      close: () => Promise.resolve(),
    };
    const session = new ChunkSession(channel, EMPTY_PROVIDER);
    session.handle(encodeManifestRequest(1, HASH_A));
    await until("the first answer", () => sent.length === 1);
    releases[0]();
    for (let i = 0; i < turns; i++) await Promise.resolve();
    session.handle(encodeManifestRequest(2, HASH_B));
    await until(
      `the second answer (request ${turns} turns after the first answer)`,
      () => sent.length === 2,
      10_000,
    );
    assert.deepEqual(sent[1], { type: "manifest", rid: 2, manifest: null });
    releases[1]();
    session.close();
  }
});

for (const transport of ["memory", "tcp"] as const) {
  Deno.test(`chunk session: two sessions fetching large chunks from each other do not deadlock (${transport})`, async () => {
    // 1 MiB chunks, 40 MiB each way, all requested at once from both sides: each side's
    // answers fill the other's inbox while its own requests wait behind them.
    const chunkBytes = 1 << 20;
    const count = 40;
    const providerA = new MemoryProvider();
    const providerB = new MemoryProvider();
    const chunksA = makeChunks(count, 20, chunkBytes);
    const chunksB = makeChunks(count, 21, chunkBytes);
    providerA.add(HASH_A, chunksA);
    providerB.add(HASH_B, chunksB);
    const [ca, cb] = await channelPair(transport);
    const a = runSide(ca, providerA);
    const b = runSide(cb, providerB);
    try {
      const [manifestB, manifestA] = await within(
        "manifests",
        Promise.all([a.session.requestManifest(HASH_B), b.session.requestManifest(HASH_A)]),
      );
      assert.ok(manifestA !== null && manifestB !== null);
      const ask = (session: ChunkSession, manifest: PeerManifest) => {
        const ids = manifest.chunks.map((chunk) => chunk.id);
        const answers = [];
        for (let i = 0; i < ids.length; i += 16) {
          answers.push(...session.requestChunks(ids.slice(i, i + 16)));
        }
        return Promise.all(answers);
      };
      const [gotB, gotA] = await within(
        "both transfers",
        Promise.all([ask(a.session, manifestB), ask(b.session, manifestA)]),
      );
      gotB.forEach((chunk, i) => assert.deepEqual(chunk?.data, chunksB[i].stored));
      gotA.forEach((chunk, i) => assert.deepEqual(chunk?.data, chunksA[i].stored));
      assert.equal(a.session.stats.chunksServed, count);
      assert.equal(b.session.stats.chunksServed, count);
      assert.equal(a.session.stats.chunksReceived, count);
      assert.equal(b.session.stats.chunksReceived, count);
    } finally {
      await closeAll(ca, cb);
    }
    assert.equal(await a.ended, null);
    assert.equal(await b.ended, null);
  });
}
