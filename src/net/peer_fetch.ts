/**
 * Peer fetch: the substituter's {@link PathSource} for paths only swarm peers hold (their
 * records are in src/cache/remote_records.ts). It moves deduplicated chunks, checked one by
 * one, from every peer that holds the NAR, over the segment's secure channels
 * (src/net/chunk_session.ts).
 *
 * - Lookup (a narinfo request): the path must have a remote record, and a connected peer of
 *   that record's segment must answer the `MANIFEST?` for it within the manifest timeout
 *   with a manifest of the record's NarHash and NarSize; otherwise the answer is "not
 *   here" (a 404 at once, so Nix moves on). Peers that answer the same manifest are the
 *   path's holders; the answer is remembered for a short while for the NAR request.
 * - Fetch (a NAR request): chunks already in the local store are read from it; the others
 *   are asked from the holders, spread over them (the least busy first, at most
 *   {@link PER_PEER_CHUNKS} chunks in flight each, in requests of up to
 *   {@link BATCH_CHUNKS}, at most {@link AHEAD_CHUNKS} chunks ahead of what has been
 *   streamed). A chunk that does not
 *   decompress to its id and size gets its peer dropped and banned; a chunk a peer lacks,
 *   a peer that goes away, or a request not answered within the chunk timeout, is asked
 *   again from another holder. The NAR streams out in order as it arrives, hashed; a chunk
 *   that comes again later in the NAR is kept in memory for those uses (within
 *   {@link KEEP_BYTES}); new chunk files are written as they come (temporary names, made
 *   durable in rounds).
 * - Commit: only when the whole NAR hashes to the record's NarHash are its chunk files
 *   made durable, its manifest written and the path committed (segment of the record, the
 *   record's signatures, audited as Fetch); then its remote record goes. The stream ends
 *   after that, so when Nix has the NAR, the path is local. The whole fetch holds the
 *   cache's writer lock shared, so no GC sweep removes its chunks meanwhile. A client that
 *   goes away does not stop the fetch: the path still becomes local.
 * @module
 */

import type { Cache } from "../cache/cache.ts";
import { withWriterLock } from "../cache/cache_lock.ts";
import { ChunkFileCommitter } from "../cache/chunk_store.ts";
import { type ChunkCompression, compressChunk, decompressChunk } from "../cache/compression.ts";
import { formatBase16, formatNixHash, parseNixHash, sha256, Sha256Stream } from "../cache/hash.ts";
import type { ManifestEntry } from "../cache/manifest.ts";
import { type RemoteRecord, RemoteRecords } from "../cache/remote_records.ts";
import { parseStorePath } from "../cache/store_path.ts";
import { BoundedCache } from "../cache/metadata.ts";
import { IntegrityError, NotFoundError } from "../errors.ts";
import type { PeerManifest } from "./chunk_protocol.ts";
import type { ChunkSession } from "./chunk_session.ts";
import type { PathSource, SourcePath } from "./server.ts";
import type { SegmentConfig } from "../config.ts";
import { segmentFor } from "../cache/segments.ts";

/** A connected peer of one segment, as the fetcher uses it. */
export interface PeerHandle {
  /** The peer's node id (hex). */
  readonly nodeId: string;
  readonly segment: string;
  readonly chunks: ChunkSession;
  /** Disconnects and bans the peer: it sent data that is not what it claimed. */
  drop(reason: string): void;
}

/** What the fetcher needs from the swarm. */
export interface PeerDirectory {
  /** The segments this node shares. */
  segmentNames(): string[];
  /** The peers of a segment connected now. */
  connectedPeers(segment: string): PeerHandle[];
}

/** Options of {@link PeerFetcher}. */
export interface PeerFetcherOptions {
  /** How this node stores chunks (fetched ones are recompressed if a peer differs). */
  compression: ChunkCompression;
  /**
   * The configured segments: a fetched path goes to the one named like the swarm segment
   * it came through, or else (an ad-hoc topic) to the first whose filter matches.
   */
  segments?: readonly SegmentConfig[];
  /** How long a lookup waits for peers' manifests (default 3 s). */
  manifestTimeoutMs?: number;
  /** A chunk request not answered in this time is asked from another peer (default 10 s). */
  chunkTimeoutMs?: number;
  /**
   * A client that reads nothing for this long is cut (its body errors) and the fetch goes
   * on without it, so that a stopped client does not hold it (and the writer lock) forever
   * (default 300 s, Nix's own stalled-download timeout).
   */
  clientPatienceMs?: number;
  log: (message: string) => void;
}

/** Counters of a {@link PeerFetcher}, for `arca status`. */
export interface PeerFetchStats {
  /** NARs fetched whole and committed, and fetches that failed. */
  narsFetched: number;
  narsFailed: number;
  /** NAR bytes of the committed fetches. */
  narBytes: number;
  /** Chunks received from peers (checked), and their bytes as sent. */
  chunksFetched: number;
  bytesFetched: number;
  /** Chunks of fetched NARs that were already in the local store. */
  chunksReused: number;
  /** Bytes received per peer (node id). */
  bytesByPeer: Record<string, number>;
}

/** Chunks in flight to one peer at most. */
export const PER_PEER_CHUNKS = 32;
/** Chunks in one request at most. */
export const BATCH_CHUNKS = 8;
/** Chunks fetched at most this far ahead of the stream. */
export const AHEAD_CHUNKS = 256;
/** Bytes of chunks that recur in a NAR kept in memory during its fetch, at most. */
export const KEEP_BYTES = 64 * 1024 * 1024;
/** How long a lookup's answer (manifest and holders) is kept for the NAR request. */
const FOUND_TTL_MS = 60_000;

/** A path found on peers: its record, the manifest, and the peers holding it. */
interface Found {
  record: RemoteRecord;
  segments: string[];
  manifest: PeerManifest;
  /** Peers that answered this manifest (grows while late answers come in). */
  holders: PeerHandle[];
  at: number;
}

/** The {@link PathSource} of swarm peers. */
export class PeerFetcher implements PathSource {
  readonly kind = "peer" as const;
  /** Its NARs are checked here, the last piece held back until they are whole and committed. */
  readonly checksNars = true;
  readonly stats: PeerFetchStats = {
    narsFetched: 0,
    narsFailed: 0,
    narBytes: 0,
    chunksFetched: 0,
    bytesFetched: 0,
    chunksReused: 0,
    bytesByPeer: {},
  };
  #cache: Cache;
  #directory: PeerDirectory;
  #remote: RemoteRecords;
  #options: Required<Omit<PeerFetcherOptions, "log">> & { log: (message: string) => void };
  #found = new BoundedCache<string, Found>({ maxEntries: 1024, maxWeight: 1024 });
  #fetches = new Set<Promise<unknown>>();

  /** A fetcher into `cache` from the peers `directory` knows. */
  constructor(cache: Cache, directory: PeerDirectory, options: PeerFetcherOptions) {
    this.#cache = cache;
    this.#directory = directory;
    this.#remote = new RemoteRecords(cache.cacheDir);
    this.#options = {
      manifestTimeoutMs: 3000,
      chunkTimeoutMs: 10_000,
      clientPatienceMs: 300_000,
      segments: [],
      ...options,
    };
  }

  /** The path, if a connected peer holds it now. */
  async lookup(hashPart: string): Promise<SourcePath | null> {
    const found = await this.#find(hashPart);
    return found === null ? null : sourcePathOf(found.record);
  }

  /** A remote path by NarHash (a `.nar` URL from a narinfo served before a restart). */
  async lookupByNarHash(
    narHash: string,
  ): Promise<{ hashPart: string; path: SourcePath } | null> {
    const wanted = formatBase16(parseNixHash(narHash));
    for (const segment of this.#directory.segmentNames()) {
      for await (const record of this.#remote.list(segment)) {
        if (formatBase16(parseNixHash(record.narHash)) !== wanted) continue;
        const hashPart = parseStorePath(record.storePath).hash;
        if (await this.#find(hashPart) === null) return null;
        return { hashPart, path: sourcePathOf(record) };
      }
    }
    return null;
  }

  /** Starts fetching the NAR; the stream carries it as it arrives. */
  async openNar(hashPart: string, path: SourcePath): Promise<ReadableStream<Uint8Array>> {
    const found = await this.#find(hashPart);
    if (found === null) throw new NotFoundError(`No connected peer holds ${hashPart}`);
    // The server does not check this source's NARs: the one promised (a narinfo served
    // earlier) must be the one the peers hold now, not another build of the same path.
    if (
      formatBase16(parseNixHash(found.record.narHash)) !== formatBase16(parseNixHash(path.narHash))
    ) {
      throw new NotFoundError(
        `Connected peers hold ${found.record.storePath} with NarHash ${found.record.narHash}, not ${path.narHash}`,
      );
    }
    const fetch = new NarFetch(this.#cache, found, {
      ...this.#options,
      stats: this.stats,
      remote: this.#remote,
    });
    const done = fetch.run().then(() => {
      this.#found.delete(hashPart);
    }, (error) => {
      this.stats.narsFailed++;
      this.#options.log(
        `peer fetch of ${found.record.storePath} failed: ${(error as Error).message}`,
      );
    });
    this.#fetches.add(done);
    done.finally(() => this.#fetches.delete(done));
    return fetch.output;
  }

  /** Waits for the fetches under way (when stopping). */
  async settle(): Promise<void> {
    await Promise.allSettled([...this.#fetches]);
  }

  /** Finds the path's record and asks the connected peers for its manifest. */
  async #find(hashPart: string): Promise<Found | null> {
    const known = this.#found.get(hashPart);
    if (
      known !== undefined && Date.now() - known.at < FOUND_TTL_MS &&
      known.holders.some((peer) => !peer.chunks.closed)
    ) {
      return known;
    }
    const records: RemoteRecord[] = [];
    for (const segment of this.#directory.segmentNames()) {
      const record = await this.#remote.get(segment, hashPart);
      if (record !== null) records.push(record);
    }
    if (records.length === 0) return null;
    const record = records[0];
    const same = records.filter((r) => r.narHash === record.narHash);
    const segments = same.map((r) => r.segment);
    const peers = segments.flatMap((segment) => this.#directory.connectedPeers(segment));
    if (peers.length === 0) return null;
    const narHash = formatBase16(parseNixHash(record.narHash));
    let found: Found | null = null;
    return await new Promise<Found | null>((resolve) => {
      let left = peers.length;
      const timer = setTimeout(() => resolve(found), this.#options.manifestTimeoutMs);
      for (const peer of peers) {
        peer.chunks.requestManifest(hashPart).then((manifest) => {
          if (
            manifest === null || formatBase16(manifest.narHash) !== narHash ||
            manifest.narSize !== record.narSize
          ) return;
          if (found === null) {
            found = { record, segments, manifest, holders: [], at: Date.now() };
            this.#found.set(hashPart, found);
          }
          if (sameChunks(manifest, found.manifest)) found.holders.push(peer);
          resolve(found);
        }, () => {}).finally(() => {
          if (--left === 0) {
            clearTimeout(timer);
            resolve(found);
          }
        });
      }
    });
  }
}

function sameChunks(a: PeerManifest, b: PeerManifest): boolean {
  return a.chunks.length === b.chunks.length &&
    a.chunks.every((chunk, i) => chunk.id === b.chunks[i].id && chunk.size === b.chunks[i].size);
}

function sourcePathOf(record: RemoteRecord): SourcePath {
  return {
    storePath: record.storePath,
    narHash: record.narHash,
    narSize: record.narSize,
    references: record.references,
    deriver: record.deriver,
    ca: record.ca,
    sigs: record.sigs,
  };
}

/** A fetched chunk: as stored here (compressed), and its data. */
interface Piece {
  stored: Uint8Array;
  data: Uint8Array;
}

/** One request to one peer, while it is answered. */
interface Batch {
  peer: PeerHandle;
  ids: string[];
  answered: number;
  expired: boolean;
  timer?: ReturnType<typeof setTimeout>;
}

/** The fetch of one NAR from peers; see the module comment. */
class NarFetch {
  /** The NAR as it arrives; ends once the path is committed, errors if the fetch fails. */
  readonly output: ReadableStream<Uint8Array>;
  #cache: Cache;
  #found: Found;
  #compression: ChunkCompression;
  #segments: readonly SegmentConfig[];
  #chunkTimeoutMs: number;
  #clientPatienceMs: number;
  #stats: PeerFetchStats;
  #remote: RemoteRecords;
  #log: (message: string) => void;
  #controller!: ReadableStreamDefaultController<Uint8Array>;
  #cancelled = false;
  #wantMore: (() => void) | null = null;
  #entries: { id: string; size: number }[];
  #firstIndex = new Map<string, number>();
  #local = new Set<string>();
  /** Missing ids in order of first use, and the next one to ask for. */
  #queue: string[] = [];
  #queued = 0;
  #retry: string[] = [];
  #failedOn = new Map<string, Set<PeerHandle>>();
  #excluded = new Set<PeerHandle>();
  #inflight = new Map<PeerHandle, number>();
  #ready = new Map<string, Piece>();
  /** Fetched chunks being written (or written) to the store, by id. */
  #written = new Map<string, Promise<void>>();
  #waiting = new Map<string, () => void>();
  #writes: Promise<void>[] = [];
  #committer: ChunkFileCommitter;
  #suffix: string;
  #cursor = 0;
  #failure: Error | null = null;
  #peersUsed = new Set<string>();
  /** References of each id not streamed yet. */
  #usesLeft = new Map<string, number>();
  /** Chunks that come again later in the NAR, kept (a private copy) up to {@link KEEP_BYTES}. */
  #kept = new Map<string, Piece>();
  #keptBytes = 0;
  /** Fan-out directories this fetch has written to, by the id's first two hex digits. */
  #dirs = new Map<string, Promise<void>>();

  constructor(
    cache: Cache,
    found: Found,
    options: {
      compression: ChunkCompression;
      segments: readonly SegmentConfig[];
      chunkTimeoutMs: number;
      clientPatienceMs: number;
      stats: PeerFetchStats;
      remote: RemoteRecords;
      log: (message: string) => void;
    },
  ) {
    this.#cache = cache;
    this.#found = found;
    this.#compression = options.compression;
    this.#segments = options.segments;
    this.#chunkTimeoutMs = options.chunkTimeoutMs;
    this.#clientPatienceMs = options.clientPatienceMs;
    this.#stats = options.stats;
    this.#remote = options.remote;
    this.#log = options.log;
    this.#entries = found.manifest.chunks;
    this.#committer = new ChunkFileCommitter(cache.chunks.root);
    this.#suffix = formatBase16(crypto.getRandomValues(new Uint8Array(8)));
    this.output = new ReadableStream<Uint8Array>({
      start: (controller) => {
        this.#controller = controller;
      },
      pull: () => this.#wake(),
      cancel: () => {
        this.#cancelled = true;
        this.#wake();
      },
    }, { highWaterMark: 4 });
  }

  #wake(): void {
    const wake = this.#wantMore;
    this.#wantMore = null;
    wake?.();
  }

  /** Fetches, streams and commits the NAR; rejects (and errors the stream) on failure. */
  async run(): Promise<void> {
    try {
      await withWriterLock(this.#cache.cacheDir, () => this.#run());
    } catch (error) {
      this.#fail(error as Error);
      for (const batch of this.#batches) clearTimeout(batch.timer);
      await Promise.allSettled(this.#writes);
      await this.#committer.abort();
      if (!this.#cancelled) {
        try {
          this.#controller.error(error);
        } catch { /* already closed */ }
      }
      throw error;
    }
  }

  #batches = new Set<Batch>();

  async #run(): Promise<void> {
    const chunks = this.#cache.chunks;
    for (let i = 0; i < this.#entries.length; i++) {
      const { id } = this.#entries[i];
      this.#usesLeft.set(id, (this.#usesLeft.get(id) ?? 0) + 1);
      if (this.#firstIndex.has(id)) continue;
      this.#firstIndex.set(id, i);
      let present = false;
      try {
        present = Deno.lstatSync(chunks.chunkPath(id, this.#compression)).isFile;
      } catch { /* not here */ }
      if (present) this.#local.add(id);
      else this.#queue.push(id);
    }
    this.#stats.chunksReused += this.#local.size;
    this.#pump();

    const narHash = new Sha256Stream();
    const fileHash = new Sha256Stream();
    const stored: ManifestEntry[] = [];
    let fileSize = 0;
    let held: Uint8Array | null = null;
    for (this.#cursor = 0; this.#cursor < this.#entries.length; this.#cursor++) {
      this.#pump();
      const entry = this.#entries[this.#cursor];
      const piece = await this.#piece(entry);
      narHash.update(piece.data);
      fileHash.update(piece.stored);
      fileSize += piece.stored.length;
      stored.push({ id: entry.id, size: entry.size, storedSize: piece.stored.length });
      // Each piece goes out when the next one is here: the last waits for the checks.
      if (held !== null) await this.#release(held);
      held = piece.data;
    }
    const { record, manifest } = this.#found;
    const digest = narHash.digest();
    if (formatBase16(digest) !== formatBase16(manifest.narHash)) {
      for (const peer of this.#found.holders) peer.drop("its manifest does not make its NAR");
      throw new IntegrityError(
        `NAR of ${record.storePath} from peers hashes to ${
          formatNixHash(digest)
        }, not ${record.narHash}`,
      );
    }
    await Promise.all(this.#writes);
    await this.#committer.commit();
    await this.#cache.commitFetchedNar({
      compression: this.#compression,
      narHash: digest,
      narSize: manifest.narSize,
      fileHash: fileHash.digest(),
      fileSize,
      chunks: stored,
    }, {
      storePath: record.storePath,
      references: record.references,
      deriver: record.deriver,
      ca: record.ca,
      sigs: record.sigs,
      narHash: record.narHash,
      narSize: record.narSize,
    }, {
      segment: this.#segments.some((segment) => segment.name === this.#found.segments[0])
        ? this.#found.segments[0]
        : segmentFor(this.#segments, record),
      auditAs: "Fetch",
      auditDetail: `from peer(s) ${
        [...this.#peersUsed].map((id) => id.slice(0, 16)).join(", ") || "none"
      }, ${this.#queue.length} chunks fetched, ${this.#local.size} reused`,
    });
    const { hash } = parseStorePath(record.storePath);
    for (const segment of this.#found.segments) await this.#remote.delete(segment, hash);
    this.#stats.narsFetched++;
    this.#stats.narBytes += manifest.narSize;
    if (held !== null) await this.#release(held);
    if (!this.#cancelled) this.#controller.close();
  }

  /**
   * Hands a piece to the client once it wants more (dropped if it went away); a client
   * that wants nothing for {@link PeerFetcherOptions.clientPatienceMs} is cut.
   */
  async #release(piece: Uint8Array): Promise<void> {
    while (!this.#cancelled && (this.#controller.desiredSize ?? 0) <= 0) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const pulled = await new Promise<boolean>((resolve) => {
        this.#wantMore = () => resolve(true);
        timer = setTimeout(() => resolve(false), this.#clientPatienceMs);
      });
      clearTimeout(timer);
      if (pulled) continue;
      this.#wantMore = null;
      this.#cancelled = true;
      this.#controller.error(
        new Error(`The client read nothing for ${this.#clientPatienceMs} ms: cut`),
      );
    }
    if (!this.#cancelled) this.#controller.enqueue(piece);
  }

  /**
   * The chunk at the stream's position: fetched, kept from an earlier use, or read from the
   * store. A chunk used again later is kept in memory (within {@link KEEP_BYTES}), so a NAR
   * with repeated chunks does not read and decompress them once per use; each use gets its
   * own copy, as the stream's consumer may keep or transfer what it is given.
   */
  async #piece(entry: { id: string; size: number }): Promise<Piece> {
    const { id } = entry;
    const left = this.#usesLeft.get(id)! - 1;
    this.#usesLeft.set(id, left);
    const kept = this.#kept.get(id);
    if (kept !== undefined) {
      if (left === 0) {
        this.#kept.delete(id);
        this.#keptBytes -= kept.data.length;
        return kept;
      }
      return { stored: kept.stored, data: kept.data.slice() };
    }
    const piece = await this.#load(entry);
    if (left > 0 && this.#keptBytes + piece.data.length <= KEEP_BYTES) {
      this.#kept.set(id, { stored: piece.stored, data: piece.data.slice() });
      this.#keptBytes += piece.data.length;
    }
    return piece;
  }

  /** A chunk as fetched, or read back from the store. */
  async #load(entry: { id: string; size: number }): Promise<Piece> {
    const { id } = entry;
    for (;;) {
      if (this.#failure) throw this.#failure;
      const ready = this.#ready.get(id);
      if (ready !== undefined) {
        this.#ready.delete(id);
        return ready;
      }
      const writing = this.#written.get(id);
      if (writing !== undefined) {
        // Fetched (and checked) by this fetch.
        await writing;
        const storedBytes = this.#readStored(id);
        const data = decompressChunk(storedBytes, this.#compression, { maxSize: entry.size });
        return { stored: storedBytes, data };
      }
      if (this.#local.has(id)) {
        const local = this.#checkedLocal(entry);
        if (local !== null) return local;
        // Damaged here: fetched like a missing one (the damaged file is gone).
        this.#local.delete(id);
        this.#retry.push(id);
        this.#pump();
        continue;
      }
      await new Promise<void>((resolve) => this.#waiting.set(id, resolve));
    }
  }

  /**
   * A chunk this cache held before the fetch, checked against its id and size (a damaged
   * one would fail the NarHash check and get honest peers blamed); null, having removed
   * the file, when it is damaged or gone.
   */
  #checkedLocal(entry: { id: string; size: number }): Piece | null {
    const path = this.#cache.chunks.chunkPath(entry.id, this.#compression);
    try {
      const stored = Deno.readFileSync(path);
      const data = decompressChunk(stored, this.#compression, { maxSize: entry.size });
      if (data.length === entry.size && formatBase16(sha256(data)) === entry.id) {
        return { stored, data };
      }
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) return null;
    }
    this.#log(`peer fetch: local chunk ${entry.id} is damaged; fetching it from peers`);
    try {
      Deno.removeSync(path);
    } catch { /* gone already */ }
    return null;
  }

  /** A chunk file of ours: at its final name, or still at its temporary one. */
  #readStored(id: string): Uint8Array {
    const path = this.#cache.chunks.chunkPath(id, this.#compression);
    for (let attempt = 0; attempt < 3; attempt++) {
      for (const candidate of [path, `${path}.tmp-${this.#suffix}`]) {
        try {
          return Deno.readFileSync(candidate);
        } catch (error) {
          if (!(error instanceof Deno.errors.NotFound)) throw error;
        }
      }
    }
    throw new NotFoundError(`Chunk ${id} vanished during a peer fetch`);
  }

  #fail(error: Error): void {
    this.#failure ??= error;
    for (const wake of this.#waiting.values()) wake();
    this.#waiting.clear();
  }

  /** Peers still worth asking. */
  #usablePeers(): PeerHandle[] {
    return this.#found.holders.filter((peer) => !this.#excluded.has(peer) && !peer.chunks.closed);
  }

  /** Hands out chunk requests while peers have room. */
  #pump(): void {
    if (this.#failure) return;
    // The least busy holder first, so that chunks coming due one by one (the stream is the
    // bottleneck) are spread over the holders rather than all going to the first.
    const peers = this.#usablePeers().sort((a, b) =>
      (this.#inflight.get(a) ?? 0) - (this.#inflight.get(b) ?? 0)
    );
    let progress = true;
    while (progress) {
      progress = false;
      for (const peer of peers) {
        const room = PER_PEER_CHUNKS - (this.#inflight.get(peer) ?? 0);
        if (room <= 0) continue;
        const ids = this.#take(peer, Math.min(room, BATCH_CHUNKS));
        if (ids.length === 0) continue;
        this.#send(peer, ids);
        progress = true;
      }
    }
    // Work due that no peer can take, and nothing in flight that could change it.
    const inflight = [...this.#inflight.values()].reduce((a, b) => a + b, 0);
    const due = this.#queued < this.#queue.length &&
      this.#firstIndex.get(this.#queue[this.#queued])! < this.#cursor + AHEAD_CHUNKS;
    if (inflight === 0 && (this.#retry.length > 0 || due)) {
      const id = this.#retry[0] ?? this.#queue[this.#queued];
      this.#fail(new NotFoundError(`No connected peer could send chunk ${id}`));
    }
  }

  /** Up to `count` ids for `peer`: retries it has not failed first, then new ones. */
  #take(peer: PeerHandle, count: number): string[] {
    const ids: string[] = [];
    for (let i = 0; i < this.#retry.length && ids.length < count;) {
      const id = this.#retry[i];
      if (this.#failedOn.get(id)?.has(peer)) {
        i++;
        continue;
      }
      this.#retry.splice(i, 1);
      ids.push(id);
    }
    while (
      ids.length < count && this.#queued < this.#queue.length &&
      this.#firstIndex.get(this.#queue[this.#queued])! < this.#cursor + AHEAD_CHUNKS
    ) {
      ids.push(this.#queue[this.#queued++]);
    }
    return ids;
  }

  #send(peer: PeerHandle, ids: string[]): void {
    this.#inflight.set(peer, (this.#inflight.get(peer) ?? 0) + ids.length);
    const batch: Batch = { peer, ids, answered: 0, expired: false };
    this.#batches.add(batch);
    const armTimer = () => {
      clearTimeout(batch.timer);
      batch.timer = setTimeout(() => this.#expire(batch), this.#chunkTimeoutMs);
    };
    armTimer();
    const answers = peer.chunks.requestChunks(ids);
    answers.forEach((answer, i) => {
      answer.then((received) => {
        // After a failure nothing is written: its temporary files are removed already.
        if (batch.expired || this.#failure) return;
        armTimer();
        this.#settle(batch, i);
        if (received === null) {
          this.#again(ids[i], peer);
        } else {
          this.#accept(peer, ids[i], received.compression, received.data);
        }
        this.#pump();
      }, () => {
        if (batch.expired) return;
        this.#settle(batch, i);
        this.#again(ids[i], peer);
        this.#pump();
      });
    });
  }

  /** One answer of a batch came (or will never come). */
  #settle(batch: Batch, _index: number): void {
    batch.answered++;
    this.#inflight.set(batch.peer, this.#inflight.get(batch.peer)! - 1);
    if (batch.answered === batch.ids.length) {
      clearTimeout(batch.timer);
      this.#batches.delete(batch);
    }
  }

  /** A batch not answered in time: its peer is skipped from now on, its chunks asked again. */
  #expire(batch: Batch): void {
    if (batch.expired || this.#failure) return;
    batch.expired = true;
    this.#batches.delete(batch);
    this.#excluded.add(batch.peer);
    this.#log(
      `peer fetch: ${
        batch.peer.nodeId.slice(0, 16)
      } did not answer in ${this.#chunkTimeoutMs} ms; asking other peers`,
    );
    const left = batch.ids.length - batch.answered;
    this.#inflight.set(batch.peer, this.#inflight.get(batch.peer)! - left);
    // Answers come in order: the unanswered ones are the last.
    for (const id of batch.ids.slice(batch.answered)) this.#again(id, batch.peer);
    this.#pump();
  }

  #again(id: string, peer: PeerHandle): void {
    let failed = this.#failedOn.get(id);
    if (!failed) this.#failedOn.set(id, failed = new Set());
    failed.add(peer);
    this.#retry.push(id);
  }

  /**
   * Writes a fetched chunk to its temporary name and hands it to the committer. The first
   * chunk of each fan-out directory goes through the chunk store, which creates the
   * directory (durably) if needed; the others are written synchronously, as that costs a
   * fraction of an asynchronous write (and of a directory check) per file.
   */
  #writeChunk(id: string, stored: Uint8Array): Promise<void> {
    const chunks = this.#cache.chunks;
    const path = chunks.chunkPath(id, this.#compression);
    const temporary = `${path}.tmp-${this.#suffix}`;
    const fanOut = id.slice(0, 2);
    const directory = this.#dirs.get(fanOut);
    if (directory === undefined) {
      const first = chunks.writeTemporary(id, this.#compression, stored, this.#suffix).then(
        () => this.#committer.add(temporary, path, stored.length),
      );
      this.#dirs.set(fanOut, first);
      return first;
    }
    return directory.then(() => {
      Deno.writeFileSync(temporary, stored);
      this.#committer.add(temporary, path, stored.length);
    });
  }

  /** Checks a received chunk; keeps it, or drops the peer that sent a wrong one. */
  #accept(
    peer: PeerHandle,
    id: string,
    compression: ChunkCompression,
    sent: Uint8Array,
  ): void {
    const size = this.#entries[this.#firstIndex.get(id)!].size;
    let data: Uint8Array;
    try {
      data = decompressChunk(sent, compression, { maxSize: size });
      if (data.length !== size || formatBase16(sha256(data)) !== id) {
        throw new IntegrityError(`chunk ${id} does not hash to its id`);
      }
    } catch (error) {
      this.#excluded.add(peer);
      this.#again(id, peer);
      this.#log(
        `peer fetch: dropping ${peer.nodeId.slice(0, 16)}: it sent a bad chunk (${
          (error as Error).message
        })`,
      );
      peer.drop(`it sent a chunk that does not match its id ${id}`);
      return;
    }
    this.#stats.chunksFetched++;
    this.#stats.bytesFetched += sent.length;
    this.#stats.bytesByPeer[peer.nodeId] = (this.#stats.bytesByPeer[peer.nodeId] ?? 0) +
      sent.length;
    this.#peersUsed.add(peer.nodeId);
    // `sent` views the decrypted message, which holds little more than this chunk.
    const stored = compression === this.#compression
      ? sent
      : compressChunk(data, this.#compression);
    this.#ready.set(id, { stored, data });
    const write = this.#writeChunk(id, stored);
    write.catch((error) => this.#fail(error));
    this.#written.set(id, write.catch(() => {}));
    this.#writes.push(write);
    const wake = this.#waiting.get(id);
    if (wake) {
      this.#waiting.delete(id);
      wake();
    }
  }
}
