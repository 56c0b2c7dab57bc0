/**
 * The chunk protocol (src/net/chunk_protocol.ts) on one peer's secure channel, both ways:
 * it answers the peer's requests from this node's store, and sends this node's requests
 * and matches the answers.
 *
 * The session's receive loop hands every chunk-protocol message to {@link ChunkSession.handle},
 * which never waits on the network: requests are queued and answered by a task of their
 * own, one at a time (so two nodes fetching from each other cannot block each other's
 * reading). The queue is bounded ({@link MAX_MANIFESTS_OUTSTANDING} manifests,
 * {@link MAX_CHUNKS_OUTSTANDING} chunks): a peer that asks for more has broken the
 * protocol. Scope: a peer may have only the chunks of manifests this session sent it, so a
 * connection proves its segment's topic key for everything it gets; other ids are
 * answered `NO CHUNK`.
 * @module
 */

import type { ChunkCompression } from "../cache/compression.ts";
import { ProtocolError } from "../errors.ts";
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
} from "./chunk_protocol.ts";
import type { SecureChannel } from "./secure_channel.ts";

/** What the responder side reads from the local store, for one segment. */
export interface ChunkProvider {
  /** The NAR of a local path of this segment, if held whole; null otherwise. */
  manifestOf(hashPart: string): Promise<PeerManifest | null>;
  /** A chunk file as stored (in `compression`), or null when it is not here. */
  readChunk(id: string, compression: ChunkCompression): Uint8Array | null;
}

/** A chunk as a peer sent it (not checked yet). */
export interface ReceivedChunk {
  compression: ChunkCompression;
  data: Uint8Array;
}

/** Counters of one chunk session. */
export interface ChunkSessionStats {
  /** Chunks and their bytes this node sent the peer. */
  chunksServed: number;
  bytesServed: number;
  /** Chunks and their bytes the peer sent this node. */
  chunksReceived: number;
  bytesReceived: number;
}

/** Most chunk ids one session lets its peer ask for (from manifests it sent). */
const MAX_ALLOWED_IDS = 1 << 18;

type Request =
  | { type: "manifest?"; rid: number; hashPart: string }
  | { type: "chunks?"; rid: number; ids: string[] };

interface PendingChunks {
  ids: string[];
  next: number;
  resolvers: {
    resolve: (chunk: ReceivedChunk | null) => void;
    reject: (error: Error) => void;
  }[];
}

/** The chunk protocol of one secure channel. */
export class ChunkSession {
  readonly stats: ChunkSessionStats = {
    chunksServed: 0,
    bytesServed: 0,
    chunksReceived: 0,
    bytesReceived: 0,
  };
  #channel: SecureChannel;
  #provider: ChunkProvider;
  #queue: Request[] = [];
  #queuedManifests = 0;
  #queuedChunks = 0;
  #serving = false;
  /** Ids of the manifests sent on this session, with their compression. */
  #allowed = new Map<string, ChunkCompression>();
  /**
   * Where eviction from {@link #allowed} goes on: one live iterator (`keys().next()` on a
   * fresh one walks over every deleted entry before it, quadratic once the map is full).
   */
  #evictFrom: Iterator<string> | null = null;
  #nextRid = 1;
  #manifestWaiters = new Map<number, (manifest: PeerManifest | null) => void>();
  #chunkWaiters = new Map<number, PendingChunks>();
  #closed: Error | null = null;

  /** A chunk session on `channel`, answering from `provider`. */
  constructor(channel: SecureChannel, provider: ChunkProvider) {
    this.#channel = channel;
    this.#provider = provider;
  }

  /** True once the session has ended. */
  get closed(): boolean {
    return this.#closed !== null;
  }

  /**
   * Takes one chunk-protocol message from the channel; throws {@link ProtocolError} for a
   * malformed one, an answer nobody asked for, or a peer over its limits.
   */
  handle(bytes: Uint8Array): void {
    const message = decodeChunkMessage(bytes);
    switch (message.type) {
      case "manifest?":
        if (this.#queuedManifests >= MAX_MANIFESTS_OUTSTANDING) {
          throw new ProtocolError("Peer has too many manifest requests waiting");
        }
        this.#queuedManifests++;
        this.#enqueue(message);
        return;
      case "chunks?":
        if (this.#queuedChunks + message.ids.length > MAX_CHUNKS_OUTSTANDING) {
          throw new ProtocolError("Peer has too many chunk requests waiting");
        }
        this.#queuedChunks += message.ids.length;
        this.#enqueue(message);
        return;
      default:
        this.#answer(message);
    }
  }

  /** Asks the peer for a path's manifest; null when it does not hold the path. */
  requestManifest(hashPart: string): Promise<PeerManifest | null> {
    if (this.#closed) return Promise.reject(this.#closed);
    const rid = this.#rid();
    const answer = new Promise<PeerManifest | null>((resolve) => {
      this.#manifestWaiters.set(rid, resolve);
    });
    this.#send(encodeManifestRequest(rid, hashPart));
    return answer;
  }

  /**
   * Asks the peer for chunks (at most {@link MAX_IDS_PER_REQUEST}); one promise per id,
   * resolving to the chunk as sent (unchecked) or null when the peer does not have it, and
   * rejecting when the session ends first.
   */
  requestChunks(ids: string[]): Promise<ReceivedChunk | null>[] {
    if (ids.length === 0 || ids.length > MAX_IDS_PER_REQUEST) {
      throw new RangeError(`A chunk request names 1 to ${MAX_IDS_PER_REQUEST} ids`);
    }
    if (this.#closed) return ids.map(() => Promise.reject(this.#closed));
    const rid = this.#rid();
    const pending: PendingChunks = { ids, next: 0, resolvers: [] };
    const promises = ids.map((_id) =>
      new Promise<ReceivedChunk | null>((resolve, reject) => {
        pending.resolvers.push({ resolve, reject });
      })
    );
    this.#chunkWaiters.set(rid, pending);
    this.#send(encodeChunksRequest(rid, ids));
    return promises;
  }

  /** Ends the session: pending requests reject, queued requests are dropped. */
  close(reason = "Peer session ended"): void {
    if (this.#closed) return;
    this.#closed = new ProtocolError(reason);
    this.#queue = [];
    for (const resolve of this.#manifestWaiters.values()) resolve(null);
    this.#manifestWaiters.clear();
    for (const pending of this.#chunkWaiters.values()) {
      for (let i = pending.next; i < pending.resolvers.length; i++) {
        pending.resolvers[i].reject(this.#closed);
      }
    }
    this.#chunkWaiters.clear();
  }

  #rid(): number {
    const rid = this.#nextRid;
    this.#nextRid = this.#nextRid >= 0xffffffff ? 1 : this.#nextRid + 1;
    return rid;
  }

  #send(bytes: Uint8Array): void {
    this.#channel.send(bytes).catch((error) => this.close(`Cannot send: ${error.message}`));
  }

  /** Matches an answer to its request. */
  #answer(message: ChunkMessage): void {
    if (message.type === "manifest") {
      const resolve = this.#manifestWaiters.get(message.rid);
      if (resolve === undefined) throw new ProtocolError("Unexpected manifest");
      this.#manifestWaiters.delete(message.rid);
      resolve(message.manifest);
      return;
    }
    if (message.type !== "chunk" && message.type !== "no chunk") return;
    const pending = this.#chunkWaiters.get(message.rid);
    if (pending === undefined || pending.ids[pending.next] !== message.id) {
      throw new ProtocolError("Unexpected chunk");
    }
    const { resolve } = pending.resolvers[pending.next++];
    if (pending.next === pending.ids.length) this.#chunkWaiters.delete(message.rid);
    if (message.type === "no chunk") {
      resolve(null);
      return;
    }
    this.stats.chunksReceived++;
    this.stats.bytesReceived += message.data.length;
    resolve({ compression: message.compression, data: message.data });
  }

  #enqueue(request: Request): void {
    if (this.#closed) return;
    this.#queue.push(request);
    if (!this.#serving) {
      this.#serving = true;
      this.#serve().catch((error) => this.close(`Cannot answer: ${error.message}`));
    }
  }

  /**
   * Answers queued requests in order, one message at a time. It stops serving in the same
   * turn as it finds the queue empty: a request queued a moment later (before a `finally`
   * callback would run) starts it again instead of waiting for the next request.
   */
  async #serve(): Promise<void> {
    try {
      while (this.#queue.length > 0 && !this.#closed) {
        const request = this.#queue.shift()!;
        if (request.type === "manifest?") {
          this.#queuedManifests--;
          const manifest = await this.#provider.manifestOf(request.hashPart);
          if (manifest !== null) this.#allow(manifest);
          await this.#channel.send(encodeManifest(request.rid, manifest));
          continue;
        }
        for (const id of request.ids) {
          this.#queuedChunks--;
          if (this.#closed) return;
          const compression = this.#allowed.get(id);
          const data = compression === undefined ? null : this.#provider.readChunk(id, compression);
          if (data === null || compression === undefined) {
            await this.#channel.send(encodeNoChunk(request.rid, id));
            continue;
          }
          this.stats.chunksServed++;
          this.stats.bytesServed += data.length;
          await this.#channel.send(encodeChunk(request.rid, id, compression, data));
        }
      }
    } finally {
      this.#serving = false;
    }
  }

  /** Lets the peer ask for a manifest's chunks (forgetting the oldest past the limit). */
  #allow(manifest: PeerManifest): void {
    for (const { id } of manifest.chunks) {
      this.#allowed.delete(id);
      this.#allowed.set(id, manifest.compression);
      if (this.#allowed.size > MAX_ALLOWED_IDS) {
        this.#evictFrom ??= this.#allowed.keys();
        this.#allowed.delete(this.#evictFrom.next().value!);
      }
    }
  }
}
