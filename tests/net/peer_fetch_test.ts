/**
 * The peer fetcher (src/net/peer_fetch.ts) with real caches and real chunk sessions: each
 * holder is a real {@link Cache} that imported a NAR, answering through the swarm's chunk
 * provider logic (manifests of whole local paths, chunk files as stored) on a
 * {@link ChunkSession} over a real secure channel (Noise over an in-memory duplex pair);
 * the fetching node is another real Cache with a remote record written by
 * {@link RemoteRecords.put}, and a fake swarm directory of {@link PeerHandle}s wrapping the
 * fetching side's sessions.
 *
 * Covered: a NAR fetched whole, byte-identical, committed (record with the remote record's
 * metadata and signatures, manifest, chunks, an audited Fetch) before the stream ends, and
 * the remote record removed, also when the NAR repeats chunks or the peer stores another
 * compression, and to two clients asking at once; lookup by NarHash; chunks already local are not asked for (a version sharing
 * ~90% moves ≤ 15% of the NAR); chunks spread over two holders; a holder sending a
 * corrupted chunk is dropped and the NAR completes from the other; chunks a holder lacks
 * are asked from the other (and with no other, the stream errors); a holder that stops
 * answering is given up after the chunk timeout and one whose connection ends is left,
 * both retried on the other; with only a bad or a silent holder the stream errors and
 * nothing is committed or left behind; a manifest whose chunks do not make the NAR drops
 * its holder and commits nothing; a client that goes away does not stop the fetch; lookup
 * is null with no record, no connected peer, no holder, no answer within the manifest
 * timeout, or a manifest of another NarHash or NarSize.
 *
 * No timing thresholds: waits are bounded, only to prove that nothing hangs.
 * @module
 */

import assert from "node:assert/strict";
import type { Cache } from "../../src/cache/cache.ts";
import type { ChunkCompression } from "../../src/cache/compression.ts";
import { formatBase16, formatNixHash, parseNixHash, sha256 } from "../../src/cache/hash.ts";
import { NotFoundError } from "../../src/errors.ts";
import { encodeNar } from "../../src/cache/nar.ts";
import { RemoteRecords } from "../../src/cache/remote_records.ts";
import { generateSecretKey } from "../../src/cache/signing.ts";
import { MessageType, type PeerManifest } from "../../src/net/chunk_protocol.ts";
import { type ChunkProvider, ChunkSession } from "../../src/net/chunk_session.ts";
import { generateStaticKeyPair } from "../../src/net/noise.ts";
import {
  type PeerDirectory,
  PeerFetcher,
  type PeerFetcherOptions,
  type PeerHandle,
} from "../../src/net/peer_fetch.ts";
import {
  memoryDuplexPair,
  openSecureChannel,
  type SecureChannel,
} from "../../src/net/secure_channel.ts";
import { deriveTopicKeys } from "../../src/net/topic.ts";
import {
  type CacheFixture,
  fakeStorePath,
  type ImportedFixture,
  importFixture,
  makeCacheFixture,
  pseudoRandomBytes,
} from "../helpers/cache_fixture.ts";

const SEGMENT = "team";
const KEY_A = generateStaticKeyPair();
const KEY_B = generateStaticKeyPair();
const PSK = deriveTopicKeys("peer fetch test topic").psk;
const SIGNER = generateSecretKey("peer-fetch-test-1");
const WAIT_MS = 60_000;
/**
 * Chunk timeout in the tests of silent holders: how long they take, and how long an
 * answering holder may be stalled there before it counts as silent too.
 */
const SHORT_TIMEOUT_MS = 2000;
const MiB = 1024 * 1024;

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

/** Polls until `check` holds (bounded). */
async function until(what: string, check: () => boolean): Promise<void> {
  const deadline = Date.now() + WAIT_MS;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`Timed out after ${WAIT_MS} ms: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

function concat(pieces: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(pieces.reduce((sum, piece) => sum + piece.length, 0));
  let at = 0;
  for (const piece of pieces) {
    out.set(piece, at);
    at += piece.length;
  }
  return out;
}

/** A NAR of one regular file of `size` pseudo-random bytes. */
function narOf(contents: Uint8Array): Uint8Array {
  return encodeNar({ type: "regular", contents });
}

/** The provider the swarm gives a segment's peers (src/net/swarm.ts), on a test cache. */
class CacheProvider implements ChunkProvider {
  readonly cache: Cache;
  /** Ids of the chunks read for a peer. */
  reads: string[] = [];
  constructor(cache: Cache) {
    this.cache = cache;
  }

  async manifestOf(hashPart: string): Promise<PeerManifest | null> {
    const stored = await this.cache.narOfPath(hashPart);
    if (stored === null || (await this.cache.missingChunks(stored.manifest)).length > 0) {
      return null;
    }
    const { manifest } = stored;
    return {
      narHash: manifest.narHash,
      narSize: manifest.narSize,
      compression: manifest.compression,
      chunks: manifest.chunks.map(({ id, size }) => ({ id, size })),
    };
  }

  readChunk(id: string, compression: ChunkCompression): Uint8Array | null {
    this.reads.push(id);
    try {
      return Deno.readFileSync(this.cache.chunks.chunkPath(id, compression));
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) return null;
      throw error;
    }
  }
}

/** A provider that sends every chunk with one byte changed. */
class CorruptingProvider extends CacheProvider {
  override readChunk(id: string, compression: ChunkCompression): Uint8Array | null {
    const data = super.readChunk(id, compression);
    if (data === null) return null;
    const bad = data.slice();
    bad[bad.length >> 1] ^= 0x40;
    return bad;
  }
}

const EMPTY_PROVIDER: ChunkProvider = {
  manifestOf: () => Promise.resolve(null),
  readChunk: () => null,
};

/** A connected peer: the fetching side's handle and the holder's end. */
interface Link {
  handle: PeerHandle;
  /** Reasons drop() was called with. */
  dropped: string[];
  /** Manifests the fetching side has received on this link. */
  manifests(): number;
  /** The holder's session. */
  remote: ChunkSession;
  /** The holder's channel (to cut the connection from its side). */
  remoteChannel: SecureChannel;
  close(): Promise<void>;
}

/** The swarm's receive loop: every message to the session; the session ends with it. */
function receiveLoop(
  channel: SecureChannel,
  session: ChunkSession,
  onMessage?: (m: Uint8Array) => void,
) {
  return (async () => {
    try {
      for (;;) {
        const message = await channel.receive();
        if (message === null) return;
        onMessage?.(message);
        session.handle(message);
      }
    } catch {
      await channel.close().catch(() => {});
    } finally {
      session.close();
    }
  })();
}

/**
 * Connects the fetching node to a holder answering from `provider`. `holderSend` may
 * replace how the holder's messages are sent (to make it go silent).
 */
async function connect(
  nodeId: string,
  provider: ChunkProvider,
  options: { holderSend?: (send: SecureChannel["send"], message: Uint8Array) => Promise<void> } =
    {},
): Promise<Link> {
  const [a, b] = memoryDuplexPair();
  const [local, remote] = await Promise.all([
    openSecureChannel(a, { initiator: true, staticKey: KEY_A, psk: PSK, closeTimeoutMs: 500 }),
    openSecureChannel(b, { initiator: false, staticKey: KEY_B, psk: PSK, closeTimeoutMs: 500 }),
  ]);
  const holderChannel: SecureChannel = options.holderSend === undefined ? remote : {
    get remoteStatic() {
      return remote.remoteStatic;
    },
    get handshakeHash() {
      return remote.handshakeHash;
    },
    closed: remote.closed,
    send: (message) => options.holderSend!((m) => remote.send(m), message),
    receive: () => remote.receive(),
    close: () => remote.close(),
  };
  const session = new ChunkSession(local, EMPTY_PROVIDER);
  const remoteSession = new ChunkSession(holderChannel, provider);
  let manifests = 0;
  const loops = [
    receiveLoop(local, session, (message) => {
      if (message[0] === MessageType.Manifest) manifests++;
    }),
    receiveLoop(remote, remoteSession),
  ];
  const dropped: string[] = [];
  const handle: PeerHandle = {
    nodeId,
    segment: SEGMENT,
    chunks: session,
    drop(reason: string) {
      dropped.push(reason);
      session.close(`Dropped: ${reason}`);
      local.close().catch(() => {});
    },
  };
  return {
    handle,
    dropped,
    manifests: () => manifests,
    remote: remoteSession,
    remoteChannel: remote,
    async close() {
      await Promise.all([local.close(), remote.close()].map((p) => p.catch(() => {})));
      await Promise.all([local.closed, remote.closed, ...loops]);
    },
  };
}

/** A fake swarm: the links given, for the test segment. */
function directoryOf(links: Link[]): PeerDirectory {
  return {
    segmentNames: () => [SEGMENT],
    connectedPeers: (segment) =>
      segment === SEGMENT
        ? links.map((link) => link.handle).filter((handle) => !handle.chunks.closed)
        : [],
  };
}

function nodeId(name: string): string {
  return formatBase16(sha256(new TextEncoder().encode(name)));
}

/** A node holding `nar` as `storePath` in its own cache. */
async function makeHolder(
  nar: Uint8Array,
  storePath: string,
  compression: ChunkCompression = "zstd",
): Promise<{ fixture: CacheFixture; imported: ImportedFixture }> {
  const fixture = await makeCacheFixture({ prefix: "arca-peer-fetch-holder-" });
  try {
    const imported = await importFixture(fixture.cache, nar, {
      storePath,
      compression,
      signingKey: SIGNER,
      references: [storePath.slice("/nix/store/".length)],
      deriver: "0000000000000000000000000000000d-x.drv",
    });
    return { fixture, imported };
  } catch (error) {
    await fixture.close();
    throw error;
  }
}

/** Writes the remote record of what a holder imported into the fetching cache. */
async function putRecord(
  cache: Cache,
  imported: ImportedFixture,
  overrides: { narHash?: string; narSize?: number } = {},
): Promise<void> {
  const info = imported.result.record.narInfo;
  await new RemoteRecords(cache.cacheDir).put({
    segment: SEGMENT,
    storePath: info.storePath,
    narHash: overrides.narHash ?? info.narHash,
    narSize: overrides.narSize ?? info.narSize,
    references: info.references,
    deriver: info.deriver,
    ca: info.ca,
    sigs: info.sigs,
    receivedAt: Date.now(),
    peers: [nodeId("holder")],
  });
}

/** The fetching node. */
async function makeFetcher(
  links: Link[],
  options: Partial<PeerFetcherOptions> = {},
): Promise<{ fixture: CacheFixture; fetcher: PeerFetcher; logs: string[] }> {
  const fixture = await makeCacheFixture({ prefix: "arca-peer-fetch-node-" });
  const logs: string[] = [];
  const fetcher = new PeerFetcher(fixture.cache, directoryOf(links), {
    compression: "zstd",
    segments: [{ name: SEGMENT, filter: "all" }],
    // Long unless a test is about them: answers that do come are never given up on.
    manifestTimeoutMs: WAIT_MS,
    chunkTimeoutMs: WAIT_MS,
    log: (message) => logs.push(message),
    ...options,
  });
  return { fixture, fetcher, logs };
}

/** Looks the path up (every link's manifest answer in) and reads the whole NAR stream. */
async function fetchNar(
  fetcher: PeerFetcher,
  hashPart: string,
  links: Link[],
): Promise<Uint8Array> {
  const path = await within("lookup", fetcher.lookup(hashPart));
  assert.ok(path !== null, "a connected peer holds the path");
  // Every holder's manifest is in before the NAR is asked for, so that all of them are
  // holders from the first chunk on (the fetcher takes late ones too, but later).
  await until("every peer's manifest", () => links.every((link) => link.manifests() > 0));
  const stream = await within("openNar", fetcher.openNar(hashPart, path));
  return concat(await within("the NAR", Array.fromAsync(stream)));
}

/** Temporary chunk files left in a cache. */
async function temporaryFiles(cache: Cache): Promise<string[]> {
  const found: string[] = [];
  const walk = async (dir: string) => {
    try {
      for await (const entry of Deno.readDir(dir)) {
        if (entry.isDirectory) await walk(`${dir}/${entry.name}`);
        else if (entry.name.includes(".tmp-")) found.push(entry.name);
      }
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
    }
  };
  await walk(cache.chunks.root);
  return found;
}

/** Checks that the fetched path is local, whole and as the remote record said. */
async function assertCommitted(
  cache: Cache,
  imported: ImportedFixture,
  nar: Uint8Array,
  segment = SEGMENT,
): Promise<void> {
  const original = imported.result.record.narInfo;
  const record = await cache.getPath(imported.hashPart);
  assert.ok(record !== null, "the path is local");
  assert.equal(record.segment, segment);
  assert.equal(record.narInfo.storePath, original.storePath);
  assert.equal(record.narInfo.narHash, original.narHash);
  assert.equal(record.narInfo.narSize, nar.length);
  assert.deepEqual(record.narInfo.references, original.references);
  assert.equal(record.narInfo.deriver, original.deriver);
  assert.deepEqual(record.narInfo.sigs, original.sigs, "the original signatures");
  assert.equal(record.narInfo.compression, "zstd", "stored in this node's compression");
  const stored = await cache.narOfPath(imported.hashPart);
  assert.ok(stored !== null, "its manifest is written");
  assert.deepEqual(await cache.missingChunks(stored.manifest), []);
  const served = concat(await Array.fromAsync(cache.openNar(stored.manifest)));
  assert.ok(
    served.length === nar.length && formatBase16(sha256(served)) === formatBase16(sha256(nar)),
  );
  const audit = await Array.fromAsync(cache.audit.read());
  const fetches = audit.filter((event) => event.type === "Fetch");
  assert.equal(fetches.length, 1);
  assert.equal(fetches[0].storePath, original.storePath);
  assert.equal(fetches[0].segment, segment);
  assert.equal(await new RemoteRecords(cache.cacheDir).get(SEGMENT, imported.hashPart), null);
  assert.deepEqual(await temporaryFiles(cache), []);
}

/** Checks that nothing of the path became local and its remote record is still there. */
async function assertNotCommitted(cache: Cache, imported: ImportedFixture): Promise<void> {
  assert.equal(await cache.getPath(imported.hashPart), null);
  assert.equal(await cache.narOfPath(imported.hashPart), null);
  const audit = await Array.fromAsync(cache.audit.read());
  assert.equal(audit.filter((event) => event.type === "Fetch").length, 0);
  assert.notEqual(await new RemoteRecords(cache.cacheDir).get(SEGMENT, imported.hashPart), null);
  assert.deepEqual(await temporaryFiles(cache), []);
}

function sameBytes(actual: Uint8Array, expected: Uint8Array, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  assert.equal(formatBase16(sha256(actual)), formatBase16(sha256(expected)), `${what}: bytes`);
}

/** Reads the stream, expecting it to error; returns the error. */
async function readFails(stream: ReadableStream<Uint8Array>): Promise<Error> {
  try {
    await within("the NAR stream to fail", Array.fromAsync(stream));
  } catch (error) {
    assert.doesNotMatch((error as Error).message, /Timed out/);
    return error as Error;
  }
  throw new Error("The NAR stream ended without an error");
}

for (const holderCompression of ["zstd", "none"] as const) {
  Deno.test(`peer fetch: a NAR only a peer holds is fetched whole and committed (peer stores ${holderCompression})`, async () => {
    const nar = narOf(pseudoRandomBytes(3 * MiB, 11));
    const storePath = fakeStorePath(`whole-${holderCompression}`, 1);
    const holder = await makeHolder(nar, storePath, holderCompression);
    const provider = new CacheProvider(holder.fixture.cache);
    const link = await connect(nodeId("a"), provider);
    const node = await makeFetcher([link]);
    try {
      await putRecord(node.fixture.cache, holder.imported);
      const manifest = (await holder.fixture.cache.narOfPath(holder.imported.hashPart))!.manifest;
      const path = await within("lookup", node.fetcher.lookup(holder.imported.hashPart));
      assert.ok(path !== null);
      assert.equal(path.storePath, storePath);
      assert.equal(path.narHash, holder.imported.result.record.narInfo.narHash);
      assert.equal(path.narSize, nar.length);
      assert.deepEqual(path.sigs, holder.imported.result.record.narInfo.sigs);
      const stream = await node.fetcher.openNar(holder.imported.hashPart, path);
      const pieces: Uint8Array[] = [];
      const reader = stream.getReader();
      for (;;) {
        const { value, done } = await within("a piece", reader.read());
        if (done) break;
        pieces.push(value);
      }
      sameBytes(concat(pieces), nar, "the streamed NAR");
      // The stream ends after the commit: the path is local already.
      await assertCommitted(node.fixture.cache, holder.imported, nar);
      await node.fetcher.settle();
      const distinct = new Set(manifest.chunks.map((chunk) => chunk.id)).size;
      assert.ok(distinct > 10, `a multi-chunk NAR (${distinct} chunks)`);
      const stats = node.fetcher.stats;
      assert.equal(stats.narsFetched, 1);
      assert.equal(stats.narsFailed, 0);
      assert.equal(stats.narBytes, nar.length);
      assert.equal(stats.chunksFetched, distinct);
      assert.equal(stats.chunksReused, 0);
      assert.equal(stats.bytesFetched, link.remote.stats.bytesServed);
      assert.deepEqual(stats.bytesByPeer, { [nodeId("a")]: stats.bytesFetched });
      assert.equal(provider.reads.length, distinct, "each chunk asked once");
      assert.deepEqual(link.dropped, []);
      // Now local: no longer a remote path.
      assert.equal(await node.fetcher.lookup(holder.imported.hashPart), null);
      const byHash = await node.fetcher.lookupByNarHash(path.narHash);
      assert.equal(byHash, null);
    } finally {
      await link.close();
      await node.fixture.close();
      await holder.fixture.close();
    }
  });
}

Deno.test("peer fetch: a NAR that repeats its chunks asks for each once and streams every copy", async () => {
  const block = pseudoRandomBytes(1 * MiB, 14);
  const contents = concat([block, block, pseudoRandomBytes(1000, 15), block]);
  const nar = narOf(contents);
  const holder = await makeHolder(nar, fakeStorePath("repeats", 14));
  const provider = new CacheProvider(holder.fixture.cache);
  const link = await connect(nodeId("a"), provider);
  const node = await makeFetcher([link]);
  try {
    await putRecord(node.fixture.cache, holder.imported);
    const manifest = (await holder.fixture.cache.narOfPath(holder.imported.hashPart))!.manifest;
    const distinct = new Set(manifest.chunks.map((chunk) => chunk.id)).size;
    assert.ok(distinct < manifest.chunks.length * 0.6, "the NAR repeats chunks");
    const got = await fetchNar(node.fetcher, holder.imported.hashPart, [link]);
    sameBytes(got, nar, "the NAR");
    await assertCommitted(node.fixture.cache, holder.imported, nar);
    await node.fetcher.settle();
    assert.equal(provider.reads.length, distinct);
    assert.equal(node.fetcher.stats.chunksFetched, distinct);
  } finally {
    await link.close();
    await node.fixture.close();
    await holder.fixture.close();
  }
});

Deno.test("peer fetch: two clients asking for the same NAR at once both get it whole", async () => {
  const nar = narOf(pseudoRandomBytes(3 * MiB, 16));
  const holder = await makeHolder(nar, fakeStorePath("twice", 16));
  const link = await connect(nodeId("a"), new CacheProvider(holder.fixture.cache));
  const node = await makeFetcher([link]);
  try {
    await putRecord(node.fixture.cache, holder.imported);
    const { hashPart } = holder.imported;
    const path = await within("lookup", node.fetcher.lookup(hashPart));
    assert.ok(path !== null);
    const streams = await Promise.all([
      node.fetcher.openNar(hashPart, path),
      node.fetcher.openNar(hashPart, path),
    ]);
    const [first, second] = await within(
      "both NARs",
      Promise.all(streams.map(async (stream) => concat(await Array.fromAsync(stream)))),
    );
    sameBytes(first, nar, "the first client's NAR");
    sameBytes(second, nar, "the second client's NAR");
    await within("settle", node.fetcher.settle());
    const record = await node.fixture.cache.getPath(hashPart);
    assert.ok(record !== null);
    const stored = await node.fixture.cache.narOfPath(hashPart);
    assert.ok(stored !== null);
    assert.deepEqual(await node.fixture.cache.missingChunks(stored.manifest), []);
    sameBytes(
      concat(await Array.fromAsync(node.fixture.cache.openNar(stored.manifest))),
      nar,
      "the committed NAR",
    );
    assert.equal(node.fetcher.stats.narsFailed, 0);
    assert.deepEqual(await temporaryFiles(node.fixture.cache), []);
  } finally {
    await link.close();
    await node.fixture.close();
    await holder.fixture.close();
  }
});

Deno.test("peer fetch: lookupByNarHash finds a remote path by its NarHash", async () => {
  const nar = narOf(pseudoRandomBytes(200_000, 12));
  const holder = await makeHolder(nar, fakeStorePath("by-hash", 1));
  const link = await connect(nodeId("a"), new CacheProvider(holder.fixture.cache));
  const node = await makeFetcher([link]);
  try {
    await putRecord(node.fixture.cache, holder.imported);
    const narHash = holder.imported.result.record.narInfo.narHash;
    // Any SHA-256 form of it.
    for (const form of [narHash, `sha256:${formatBase16(parseNixHash(narHash))}`]) {
      const found = await within("lookup", node.fetcher.lookupByNarHash(form));
      assert.ok(found !== null);
      assert.equal(found.hashPart, holder.imported.hashPart);
      assert.equal(found.path.storePath, holder.imported.storePath);
    }
    const other = `sha256:${formatBase16(sha256(new Uint8Array([1])))}`;
    assert.equal(await node.fetcher.lookupByNarHash(other), null);
  } finally {
    await link.close();
    await node.fixture.close();
    await holder.fixture.close();
  }
});

Deno.test("peer fetch: chunks already local are not fetched (a version sharing 90% moves ≤ 15%)", async () => {
  const size = 8 * MiB;
  const first = pseudoRandomBytes(size, 21);
  const second = first.slice();
  second.set(pseudoRandomBytes(size / 10, 22), size - size / 10); // the last 10% differ
  const nar1 = narOf(first);
  const nar2 = narOf(second);
  const holder = await makeHolder(nar2, fakeStorePath("app-2.0", 2));
  const provider = new CacheProvider(holder.fixture.cache);
  const link = await connect(nodeId("a"), provider);
  const node = await makeFetcher([link]);
  try {
    const local = await importFixture(node.fixture.cache, nar1, {
      storePath: fakeStorePath("app-1.0", 2),
    });
    await putRecord(node.fixture.cache, holder.imported);
    const got = await fetchNar(node.fetcher, holder.imported.hashPart, [link]);
    sameBytes(got, nar2, "the second version");
    await assertCommitted(node.fixture.cache, holder.imported, nar2);
    await node.fetcher.settle();

    const localIds = new Set(
      (await node.fixture.cache.narOfPath(local.hashPart))!.manifest.chunks.map((c) => c.id),
    );
    const wanted = new Set(
      (await holder.fixture.cache.narOfPath(holder.imported.hashPart))!.manifest.chunks.map((c) =>
        c.id
      ),
    );
    const shared = [...wanted].filter((id) => localIds.has(id));
    assert.ok(shared.length > wanted.size * 0.7, `${shared.length} of ${wanted.size} shared`);
    // Not one local chunk was asked for; the others each once.
    assert.deepEqual(provider.reads.filter((id) => localIds.has(id)), []);
    assert.equal(provider.reads.length, wanted.size - shared.length);
    const stats = node.fetcher.stats;
    assert.equal(stats.chunksReused, shared.length);
    assert.equal(stats.chunksFetched, wanted.size - shared.length);
    assert.ok(
      stats.bytesFetched <= 0.15 * nar2.length,
      `${stats.bytesFetched} bytes moved for a ${nar2.length}-byte NAR`,
    );
    assert.equal(stats.bytesFetched, link.remote.stats.bytesServed);
  } finally {
    await link.close();
    await node.fixture.close();
    await holder.fixture.close();
  }
});

Deno.test("peer fetch: a damaged local chunk is fetched again, and no honest peer is blamed", async () => {
  const size = 4 * MiB;
  const first = pseudoRandomBytes(size, 31);
  const second = first.slice();
  second.set(pseudoRandomBytes(size / 4, 32), size - size / 4);
  const holder = await makeHolder(narOf(second), fakeStorePath("app-2.0", 3));
  const link = await connect(nodeId("a"), new CacheProvider(holder.fixture.cache));
  const node = await makeFetcher([link]);
  try {
    const local = await importFixture(node.fixture.cache, narOf(first), {
      storePath: fakeStorePath("app-1.0", 3),
    });
    await putRecord(node.fixture.cache, holder.imported);
    // Damage, in place and keeping its size, a local chunk the new version shares.
    const wanted = new Set(
      (await holder.fixture.cache.narOfPath(holder.imported.hashPart))!.manifest.chunks.map((c) =>
        c.id
      ),
    );
    const shared = (await node.fixture.cache.narOfPath(local.hashPart))!.manifest.chunks
      .find((chunk) => wanted.has(chunk.id))!;
    const path = node.fixture.cache.chunks.chunkPath(shared.id, "zstd");
    const bytes = await Deno.readFile(path);
    bytes[bytes.length >> 1] ^= 0xff;
    await Deno.writeFile(path, bytes);

    const got = await fetchNar(node.fetcher, holder.imported.hashPart, [link]);
    sameBytes(got, holder.imported.nar, "the NAR");
    await assertCommitted(node.fixture.cache, holder.imported, holder.imported.nar);
    assert.deepEqual(link.dropped, [], "the peer sent nothing wrong");
    assert.ok(node.logs.some((line) => line.includes(`local chunk ${shared.id} is damaged`)));
    // The chunk file is whole again: fetched, checked and stored.
    const stored = await node.fixture.cache.chunks.read(shared.id, "zstd");
    assert.notDeepEqual(stored, bytes);
  } finally {
    await node.fetcher.settle();
    await link.close();
    await node.fixture.close();
    await holder.fixture.close();
  }
});

Deno.test("peer fetch: chunks are spread across two holders", async () => {
  const nar = narOf(pseudoRandomBytes(4 * MiB, 31));
  const storePath = fakeStorePath("spread", 3);
  const holderA = await makeHolder(nar, storePath);
  const holderB = await makeHolder(nar, storePath, "none");
  const linkA = await connect(nodeId("a"), new CacheProvider(holderA.fixture.cache));
  const linkB = await connect(nodeId("b"), new CacheProvider(holderB.fixture.cache));
  const links = [linkA, linkB];
  const node = await makeFetcher(links);
  try {
    await putRecord(node.fixture.cache, holderA.imported);
    const got = await fetchNar(node.fetcher, holderA.imported.hashPart, links);
    sameBytes(got, nar, "the NAR");
    await assertCommitted(node.fixture.cache, holderA.imported, nar);
    await node.fetcher.settle();
    const { bytesByPeer, bytesFetched, chunksFetched } = node.fetcher.stats;
    assert.ok(bytesByPeer[nodeId("a")] > 0, "A sent a share");
    assert.ok(bytesByPeer[nodeId("b")] > 0, "B sent a share");
    assert.equal(bytesByPeer[nodeId("a")] + bytesByPeer[nodeId("b")], bytesFetched);
    assert.equal(
      linkA.remote.stats.chunksServed + linkB.remote.stats.chunksServed,
      chunksFetched,
      "no chunk was asked twice",
    );
  } finally {
    await Promise.all(links.map((link) => link.close()));
    await node.fixture.close();
    await holderA.fixture.close();
    await holderB.fixture.close();
  }
});

Deno.test("peer fetch: a holder sending a corrupted chunk is dropped; the NAR completes from the other", async () => {
  const nar = narOf(pseudoRandomBytes(4 * MiB, 41));
  const storePath = fakeStorePath("corrupted", 4);
  const good = await makeHolder(nar, storePath);
  const bad = await makeHolder(nar, storePath, "none");
  const badLink = await connect(nodeId("bad"), new CorruptingProvider(bad.fixture.cache));
  const goodLink = await connect(nodeId("good"), new CacheProvider(good.fixture.cache));
  const links = [badLink, goodLink];
  const node = await makeFetcher(links);
  try {
    await putRecord(node.fixture.cache, good.imported);
    const got = await fetchNar(node.fetcher, good.imported.hashPart, links);
    sameBytes(got, nar, "the NAR");
    await assertCommitted(node.fixture.cache, good.imported, nar);
    await node.fetcher.settle();
    assert.equal(badLink.dropped.length, 1, "the bad holder is dropped once");
    assert.match(badLink.dropped[0], /does not match its id/);
    assert.ok(badLink.handle.chunks.closed);
    assert.ok(badLink.remote.stats.chunksServed > 0, "the bad holder did send chunks");
    assert.deepEqual(goodLink.dropped, []);
    const { bytesByPeer, bytesFetched } = node.fetcher.stats;
    assert.equal(bytesByPeer[nodeId("bad")], undefined, "no bad byte counted as fetched");
    assert.equal(bytesByPeer[nodeId("good")], bytesFetched);
    assert.ok(node.logs.some((line) => /dropping .*bad chunk/.test(line)));
  } finally {
    await Promise.all(links.map((link) => link.close()));
    await node.fixture.close();
    await good.fixture.close();
    await bad.fixture.close();
  }
});

/** Holder sends that never complete for chunk answers: the peer stops answering. */
function silentForChunks(send: SecureChannel["send"], message: Uint8Array): Promise<void> {
  if (message[0] === MessageType.Chunk || message[0] === MessageType.NoChunk) {
    return new Promise(() => {});
  }
  return send(message);
}

Deno.test("peer fetch: a holder that stops answering is given up after the chunk timeout", async () => {
  const nar = narOf(pseudoRandomBytes(3 * MiB, 51));
  const storePath = fakeStorePath("silent", 5);
  const good = await makeHolder(nar, storePath);
  const silent = await makeHolder(nar, storePath);
  const silentLink = await connect(nodeId("silent"), new CacheProvider(silent.fixture.cache), {
    holderSend: silentForChunks,
  });
  const goodLink = await connect(nodeId("good"), new CacheProvider(good.fixture.cache));
  const links = [silentLink, goodLink];
  const node = await makeFetcher(links, { chunkTimeoutMs: SHORT_TIMEOUT_MS });
  try {
    await putRecord(node.fixture.cache, good.imported);
    const got = await fetchNar(node.fetcher, good.imported.hashPart, links);
    sameBytes(got, nar, "the NAR");
    await assertCommitted(node.fixture.cache, good.imported, nar);
    await node.fetcher.settle();
    assert.ok(
      node.logs.some((line) => line.includes(`did not answer in ${SHORT_TIMEOUT_MS} ms`)),
      "the silent holder was given up",
    );
    const { bytesByPeer, bytesFetched } = node.fetcher.stats;
    assert.equal(bytesByPeer[nodeId("silent")], undefined);
    assert.equal(bytesByPeer[nodeId("good")], bytesFetched);
    // Slow is not dishonest: it is not banned.
    assert.deepEqual(silentLink.dropped, []);
  } finally {
    await Promise.all(links.map((link) => link.close()));
    await node.fixture.close();
    await good.fixture.close();
    await silent.fixture.close();
  }
});

Deno.test("peer fetch: a holder whose connection ends mid-transfer is left for the other", async () => {
  const nar = narOf(pseudoRandomBytes(4 * MiB, 61));
  const storePath = fakeStorePath("leaving", 6);
  const good = await makeHolder(nar, storePath);
  const leaving = await makeHolder(nar, storePath);
  // The leaving holder's connection goes away after it has sent 3 chunks.
  const cut: { channel?: SecureChannel } = {};
  const provider = new (class extends CacheProvider {
    override readChunk(id: string, compression: ChunkCompression): Uint8Array | null {
      if (this.reads.length === 3) cut.channel!.close().catch(() => {});
      return super.readChunk(id, compression);
    }
  })(leaving.fixture.cache);
  const leavingLink = await connect(nodeId("leaving"), provider);
  cut.channel = leavingLink.remoteChannel;
  const goodLink = await connect(nodeId("good"), new CacheProvider(good.fixture.cache));
  const links = [leavingLink, goodLink];
  const node = await makeFetcher(links);
  try {
    await putRecord(node.fixture.cache, good.imported);
    const got = await fetchNar(node.fetcher, good.imported.hashPart, links);
    sameBytes(got, nar, "the NAR");
    await assertCommitted(node.fixture.cache, good.imported, nar);
    await node.fetcher.settle();
    assert.ok(leavingLink.handle.chunks.closed, "the leaving holder's session ended");
    assert.deepEqual(leavingLink.dropped, [], "a peer that leaves is not banned");
    const { bytesByPeer, bytesFetched } = node.fetcher.stats;
    assert.ok(bytesByPeer[nodeId("good")] > 0, "the other holder sent the rest");
    assert.equal(
      (bytesByPeer[nodeId("leaving")] ?? 0) + bytesByPeer[nodeId("good")],
      bytesFetched,
    );
  } finally {
    await Promise.all(links.map((link) => link.close()));
    await node.fixture.close();
    await good.fixture.close();
    await leaving.fixture.close();
  }
});

/** A provider that has lost every other chunk since it sent its manifest (NO CHUNK). */
class ForgetfulProvider extends CacheProvider {
  answered = 0;
  override readChunk(id: string, compression: ChunkCompression): Uint8Array | null {
    return this.answered++ % 2 === 1 ? null : super.readChunk(id, compression);
  }
}

Deno.test("peer fetch: chunks a holder no longer has are asked from the other", async () => {
  const nar = narOf(pseudoRandomBytes(3 * MiB, 141));
  const storePath = fakeStorePath("forgetful", 14);
  const good = await makeHolder(nar, storePath);
  const forgetful = await makeHolder(nar, storePath);
  const forgetfulLink = await connect(
    nodeId("forgetful"),
    new ForgetfulProvider(forgetful.fixture.cache),
  );
  const goodLink = await connect(nodeId("good"), new CacheProvider(good.fixture.cache));
  const links = [forgetfulLink, goodLink];
  const node = await makeFetcher(links);
  try {
    await putRecord(node.fixture.cache, good.imported);
    const got = await fetchNar(node.fetcher, good.imported.hashPart, links);
    sameBytes(got, nar, "the NAR");
    await assertCommitted(node.fixture.cache, good.imported, nar);
    await node.fetcher.settle();
    assert.ok(node.fetcher.stats.bytesByPeer[nodeId("forgetful")] > 0, "it sent what it had");
    assert.ok(node.fetcher.stats.bytesByPeer[nodeId("good")] > 0);
    assert.deepEqual(forgetfulLink.dropped, [], "lacking a chunk is no offence");
  } finally {
    await Promise.all(links.map((link) => link.close()));
    await node.fixture.close();
    await good.fixture.close();
    await forgetful.fixture.close();
  }
});

Deno.test("peer fetch: chunks no holder has make the stream error; nothing is committed", async () => {
  const nar = narOf(pseudoRandomBytes(2 * MiB, 151));
  const forgetful = await makeHolder(nar, fakeStorePath("only-forgetful", 15));
  const link = await connect(nodeId("forgetful"), new ForgetfulProvider(forgetful.fixture.cache));
  const node = await makeFetcher([link]);
  try {
    await putRecord(node.fixture.cache, forgetful.imported);
    const path = await within("lookup", node.fetcher.lookup(forgetful.imported.hashPart));
    assert.ok(path !== null);
    const error = await readFails(await node.fetcher.openNar(forgetful.imported.hashPart, path));
    assert.match(error.message, /No connected peer could send chunk/);
    await within("settle", node.fetcher.settle());
    await assertNotCommitted(node.fixture.cache, forgetful.imported);
    assert.deepEqual(link.dropped, []);
    assert.equal(node.fetcher.stats.narsFailed, 1);
  } finally {
    await link.close();
    await node.fixture.close();
    await forgetful.fixture.close();
  }
});

Deno.test("peer fetch: with only a corrupting holder the stream errors and nothing is committed", async () => {
  const nar = narOf(pseudoRandomBytes(2 * MiB, 71));
  const bad = await makeHolder(nar, fakeStorePath("only-bad", 7));
  const link = await connect(nodeId("bad"), new CorruptingProvider(bad.fixture.cache));
  const node = await makeFetcher([link]);
  try {
    await putRecord(node.fixture.cache, bad.imported);
    const path = await within("lookup", node.fetcher.lookup(bad.imported.hashPart));
    assert.ok(path !== null);
    const stream = await node.fetcher.openNar(bad.imported.hashPart, path);
    const error = await readFails(stream);
    assert.match(error.message, /No connected peer could send chunk/);
    await within("settle", node.fetcher.settle());
    assert.equal(link.dropped.length, 1);
    await assertNotCommitted(node.fixture.cache, bad.imported);
    assert.equal(node.fetcher.stats.narsFailed, 1);
    assert.equal(node.fetcher.stats.narsFetched, 0);
    assert.equal(node.fetcher.stats.chunksFetched, 0);
    // The dropped peer is not a holder any more: the path is not found now.
    assert.equal(await node.fetcher.lookup(bad.imported.hashPart), null);
  } finally {
    await link.close();
    await node.fixture.close();
    await bad.fixture.close();
  }
});

Deno.test("peer fetch: with only a silent holder the stream errors after the chunk timeout", async () => {
  const nar = narOf(pseudoRandomBytes(1 * MiB, 81));
  const silent = await makeHolder(nar, fakeStorePath("only-silent", 8));
  const link = await connect(nodeId("silent"), new CacheProvider(silent.fixture.cache), {
    holderSend: silentForChunks,
  });
  const node = await makeFetcher([link], { chunkTimeoutMs: SHORT_TIMEOUT_MS });
  try {
    await putRecord(node.fixture.cache, silent.imported);
    const path = await within("lookup", node.fetcher.lookup(silent.imported.hashPart));
    assert.ok(path !== null);
    const error = await readFails(await node.fetcher.openNar(silent.imported.hashPart, path));
    assert.match(error.message, /No connected peer could send chunk/);
    await within("settle", node.fetcher.settle());
    await assertNotCommitted(node.fixture.cache, silent.imported);
    assert.equal(node.fetcher.stats.narsFailed, 1);
  } finally {
    await link.close();
    await node.fixture.close();
    await silent.fixture.close();
  }
});

Deno.test("peer fetch: a manifest whose chunks do not make the NarHash drops its holder; nothing is committed", async () => {
  // The holder claims the NarHash of version 1 for the chunks of version 2 (same size):
  // every chunk matches its id, only the whole NAR tells.
  const size = 2 * MiB;
  const first = pseudoRandomBytes(size, 91);
  const second = first.slice();
  second.set(pseudoRandomBytes(4096, 92), size / 2);
  const nar1 = narOf(first);
  const nar2 = narOf(second);
  const storePath = fakeStorePath("liar", 9);
  const real = await makeHolder(nar1, storePath); // only for the record's metadata
  const liar = await makeHolder(nar2, storePath);
  const realHash = real.imported.result.record.narInfo.narHash;
  const provider = new (class extends CacheProvider {
    override async manifestOf(hashPart: string): Promise<PeerManifest | null> {
      const manifest = await super.manifestOf(hashPart);
      return manifest && { ...manifest, narHash: parseNixHash(realHash) };
    }
  })(liar.fixture.cache);
  const link = await connect(nodeId("liar"), provider);
  const node = await makeFetcher([link]);
  try {
    await putRecord(node.fixture.cache, real.imported);
    const path = await within("lookup", node.fetcher.lookup(real.imported.hashPart));
    assert.ok(path !== null, "the manifest claims the right NarHash and NarSize");
    const error = await readFails(await node.fetcher.openNar(real.imported.hashPart, path));
    assert.match(error.message, /hashes to/);
    await within("settle", node.fetcher.settle());
    assert.equal(link.dropped.length, 1);
    await assertNotCommitted(node.fixture.cache, real.imported);
    // None of the fetched chunk files stayed (they were never made durable).
    const liarManifest = (await liar.fixture.cache.narOfPath(liar.imported.hashPart))!.manifest;
    for (const { id } of liarManifest.chunks) {
      assert.equal(await node.fixture.cache.chunks.has(id, "zstd"), false);
    }
    assert.equal(node.fetcher.stats.narsFailed, 1);
  } finally {
    await link.close();
    await node.fixture.close();
    await real.fixture.close();
    await liar.fixture.close();
  }
});

Deno.test("peer fetch: a client that goes away does not stop the fetch", async () => {
  const nar = narOf(pseudoRandomBytes(3 * MiB, 101));
  const holder = await makeHolder(nar, fakeStorePath("cancelled", 10));
  const link = await connect(nodeId("a"), new CacheProvider(holder.fixture.cache));
  // The swarm segment is not a configured one (an ad-hoc topic): the path goes to the
  // first configured segment whose filter takes it.
  const node = await makeFetcher([link], {
    segments: [{ name: "local", filter: "nixpkgs" }, { name: "main", filter: "all" }],
  });
  try {
    await putRecord(node.fixture.cache, holder.imported);
    const path = await within("lookup", node.fetcher.lookup(holder.imported.hashPart));
    assert.ok(path !== null);
    const reader = (await node.fetcher.openNar(holder.imported.hashPart, path)).getReader();
    const first = await within("a piece", reader.read());
    assert.equal(first.done, false);
    await reader.cancel();
    await within("settle", node.fetcher.settle());
    await assertCommitted(node.fixture.cache, holder.imported, nar, "main");
    assert.equal(node.fetcher.stats.narsFetched, 1);
  } finally {
    await link.close();
    await node.fixture.close();
    await holder.fixture.close();
  }
});

Deno.test("peer fetch: lookup is null without a record, a connected peer, or a holder", async () => {
  const nar = narOf(pseudoRandomBytes(100_000, 111));
  const holder = await makeHolder(nar, fakeStorePath("lookup", 11));
  const elsewhere = await makeCacheFixture({ prefix: "arca-peer-fetch-empty-" });
  const notHolding = await connect(nodeId("empty"), new CacheProvider(elsewhere.cache));
  const nobody = await makeFetcher([]);
  const node = await makeFetcher([notHolding]);
  try {
    const hashPart = holder.imported.hashPart;
    // No record: not even asked.
    assert.equal(await node.fetcher.lookup(hashPart), null);
    assert.equal(notHolding.manifests(), 0);
    // A record, but no peer connected.
    await putRecord(nobody.fixture.cache, holder.imported);
    assert.equal(await within("lookup", nobody.fetcher.lookup(hashPart)), null);
    await assert.rejects(
      nobody.fetcher.openNar(hashPart, {
        storePath: holder.imported.storePath,
        narHash: holder.imported.result.record.narInfo.narHash,
        narSize: nar.length,
        references: [],
        sigs: [],
      }),
      /No connected peer holds/,
    );
    // A record, and a connected peer that does not hold it.
    await putRecord(node.fixture.cache, holder.imported);
    assert.equal(await within("lookup", node.fetcher.lookup(hashPart)), null);
    assert.equal(notHolding.manifests(), 1, "the peer was asked and said no");
    // A record of another segment than the ones this node shares.
    const info = holder.imported.result.record.narInfo;
    const other = fakeStorePath("other-segment", 11);
    await new RemoteRecords(node.fixture.cache.cacheDir).put({
      segment: "other",
      storePath: other,
      narHash: info.narHash,
      narSize: info.narSize,
      references: [],
      sigs: info.sigs,
      receivedAt: Date.now(),
      peers: [],
    });
    assert.equal(await node.fetcher.lookup(other.slice(11, 43)), null);
    assert.equal(notHolding.manifests(), 1);
  } finally {
    await notHolding.close();
    await nobody.fixture.close();
    await node.fixture.close();
    await elsewhere.close();
    await holder.fixture.close();
  }
});

Deno.test("peer fetch: lookup is null when no peer answers within the manifest timeout", async () => {
  const nar = narOf(pseudoRandomBytes(100_000, 121));
  const holder = await makeHolder(nar, fakeStorePath("mute", 12));
  // The holder's manifest answers never leave it.
  const link = await connect(nodeId("mute"), new CacheProvider(holder.fixture.cache), {
    holderSend: () => new Promise(() => {}),
  });
  const node = await makeFetcher([link], { manifestTimeoutMs: 300 });
  try {
    await putRecord(node.fixture.cache, holder.imported);
    assert.equal(await within("lookup", node.fetcher.lookup(holder.imported.hashPart)), null);
    assert.equal(link.manifests(), 0);
    assert.equal(await node.fixture.cache.getPath(holder.imported.hashPart), null);
  } finally {
    await link.close();
    await node.fixture.close();
    await holder.fixture.close();
  }
});

Deno.test("peer fetch: a manifest of another NarHash or NarSize is ignored", async () => {
  const nar = narOf(pseudoRandomBytes(1 * MiB, 131));
  const storePath = fakeStorePath("wrong-hash", 13);
  const wrongHash = await makeHolder(nar, storePath);
  const right = await makeHolder(nar, storePath, "none");
  const otherHash = sha256(new TextEncoder().encode("another NAR"));
  const lyingProvider = new (class extends CacheProvider {
    override async manifestOf(hashPart: string): Promise<PeerManifest | null> {
      const manifest = await super.manifestOf(hashPart);
      return manifest && { ...manifest, narHash: otherHash };
    }
  })(wrongHash.fixture.cache);
  const wrongLink = await connect(nodeId("wrong"), lyingProvider);
  const rightLink = await connect(nodeId("right"), new CacheProvider(right.fixture.cache));
  const alone = await makeFetcher([wrongLink]);
  const both = await makeFetcher([wrongLink, rightLink]);
  try {
    // Only the wrong manifest: not found.
    await putRecord(alone.fixture.cache, wrongHash.imported);
    assert.equal(await within("lookup", alone.fetcher.lookup(wrongHash.imported.hashPart)), null);
    assert.equal(wrongLink.manifests(), 1, "it answered, and was not believed");
    // A record of another NarSize than every peer's manifest: not found either.
    const bigger = await makeFetcher([rightLink]);
    try {
      await putRecord(bigger.fixture.cache, right.imported, { narSize: nar.length + 1 });
      assert.equal(await within("lookup", bigger.fetcher.lookup(right.imported.hashPart)), null);
    } finally {
      await bigger.fixture.close();
    }
    // With a right holder too: only it is used.
    await putRecord(both.fixture.cache, right.imported);
    const got = await fetchNar(both.fetcher, right.imported.hashPart, [wrongLink, rightLink]);
    sameBytes(got, nar, "the NAR");
    await assertCommitted(both.fixture.cache, right.imported, nar);
    await both.fetcher.settle();
    const { bytesByPeer, bytesFetched } = both.fetcher.stats;
    assert.deepEqual(bytesByPeer, { [nodeId("right")]: bytesFetched });
    assert.equal(wrongLink.remote.stats.chunksServed, 0, "nothing was asked from it");
  } finally {
    await wrongLink.close();
    await rightLink.close();
    await alone.fixture.close();
    await both.fixture.close();
    await wrongHash.fixture.close();
    await right.fixture.close();
  }
});

Deno.test("peer fetch: a NAR asked for under another NarHash than the peers' is not streamed", async () => {
  // The same store path built twice, not reproducibly: the narinfo served (or cached by Nix)
  // promised one NarHash, the record now names another.
  const nar = narOf(pseudoRandomBytes(300_000, 141));
  const holder = await makeHolder(nar, fakeStorePath("rebuilt", 14));
  const link = await connect(nodeId("a"), new CacheProvider(holder.fixture.cache));
  const node = await makeFetcher([link]);
  try {
    await putRecord(node.fixture.cache, holder.imported);
    const path = await within("lookup", node.fetcher.lookup(holder.imported.hashPart));
    assert.ok(path !== null);
    const promised = { ...path, narHash: formatNixHash(sha256(new Uint8Array([2]))) };
    await assert.rejects(
      node.fetcher.openNar(holder.imported.hashPart, promised),
      NotFoundError,
    );
    await node.fetcher.settle();
    await assertNotCommitted(node.fixture.cache, holder.imported);
  } finally {
    await link.close();
    await node.fixture.close();
    await holder.fixture.close();
  }
});

Deno.test("peer fetch: chunks that come after the fetch failed leave no temporary files", async () => {
  const nar = narOf(pseudoRandomBytes(2 * MiB, 161));
  const holder = await makeHolder(nar, fakeStorePath("late-answers", 16));
  // The holder sends its first chunk, then holds the others back until the fetch failed.
  const gate = Promise.withResolvers<void>();
  let chunksSent = 0;
  const link = await connect(nodeId("late"), new CacheProvider(holder.fixture.cache), {
    holderSend: async (send, message) => {
      if (message[0] === MessageType.Chunk && chunksSent++ > 0) await gate.promise;
      await send(message);
    },
  });
  const node = await makeFetcher([link]);
  try {
    await putRecord(node.fixture.cache, holder.imported);
    const stored = await holder.fixture.cache.narOfPath(holder.imported.hashPart);
    assert.ok(stored !== null && stored.manifest.chunks.length > 8);
    // The first chunk cannot be written here: a file where its fan-out directory goes.
    const first = node.fixture.cache.chunks.chunkPath(stored.manifest.chunks[0].id, "zstd");
    const fanOut = first.slice(0, first.lastIndexOf("/"));
    await Deno.mkdir(fanOut.slice(0, fanOut.lastIndexOf("/")), { recursive: true });
    await Deno.writeTextFile(fanOut, "in the way");
    const path = await within("lookup", node.fetcher.lookup(holder.imported.hashPart));
    assert.ok(path !== null);
    await readFails(await node.fetcher.openNar(holder.imported.hashPart, path));
    await within("settle", node.fetcher.settle());
    gate.resolve();
    const session = link.handle.chunks;
    await until(
      "the held-back chunks",
      () => session.stats.chunksReceived > 1 && session.stats.chunksReceived === chunksSent,
    );
    // Let the answers' handlers and any writes they start run.
    for (let i = 0; i < 10; i++) await new Promise((resolve) => setTimeout(resolve, 0));
    assert.deepEqual(await temporaryFiles(node.fixture.cache), []);
  } finally {
    await link.close();
    await node.fixture.close();
    await holder.fixture.close();
  }
});

Deno.test("peer fetch: a client that stops reading is cut after its patience; the path still becomes local", async () => {
  const nar = narOf(pseudoRandomBytes(4 * MiB, 171));
  const holder = await makeHolder(nar, fakeStorePath("stuck-client", 17));
  const link = await connect(nodeId("a"), new CacheProvider(holder.fixture.cache));
  const node = await makeFetcher([link], { clientPatienceMs: 200 });
  try {
    await putRecord(node.fixture.cache, holder.imported);
    const path = await within("lookup", node.fetcher.lookup(holder.imported.hashPart));
    assert.ok(path !== null);
    // Opened, never read, never cancelled (a stopped client): the fetch does not wait forever.
    const stream = await node.fetcher.openNar(holder.imported.hashPart, path);
    await within("settle", node.fetcher.settle());
    await assertCommitted(node.fixture.cache, holder.imported, nar);
    // What the client reads now ends in an error, never as a complete NAR.
    await readFails(stream);
  } finally {
    await link.close();
    await node.fixture.close();
    await holder.fixture.close();
  }
});
