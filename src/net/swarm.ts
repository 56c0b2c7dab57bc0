/**
 * The swarm node: finds peers per segment (src/net/discovery.ts), connects to them over
 * Noise (src/net/secure_channel.ts) on the sync port, and keeps each segment's signed
 * records in step with theirs (src/net/sync.ts).
 *
 * - Identity: the node's X25519 static key in `<cacheDir>/identity.key` (hex, mode 0600);
 *   its public half is the node id in beacons and handshakes.
 * - Connections: at most one session per (segment, peer). Either side may dial a peer it
 *   has discovered and is not connected to. Before its handshake a dialer sends a 32-byte
 *   hint (random nonce ‖ HMAC of the segment's hint key over it) so that the listener,
 *   which may serve several segments on one port, knows which pre-shared key to use;
 *   without a valid hint the connection is dropped. Failed or lost peers are retried with
 *   exponential backoff (1 s … 60 s); a dial gives up after 10 s. When both sides dialed
 *   at once, the session the smaller node id initiated stays; when the same side dials
 *   again, its new session replaces the old one (which the dialer has lost, even if we
 *   have not noticed yet). Stopping closes connections still in their handshake at once.
 * - Listener: at most 128 accepted connections (16 per address) may be waiting for their
 *   hint and handshake (5 s each at most); more are closed at once. A failing accept (out
 *   of file descriptors) is logged and retried, never the end of listening.
 * - Refusals: a peer that sends more than {@link REFUSED_LIMIT} hostile records (malformed,
 *   or with a trusted key's name on a signature that does not verify) is disconnected and
 *   ignored for 5 minutes. Records that are only not for this segment (signed by keys it
 *   does not trust, outside its filter) are refused without counting towards that limit:
 *   honest peers may trust more keys. Their ids, and those of records stored in another
 *   form (fewer signatures) or conflicting with what we hold, are remembered per peer and
 *   reconciled as held, so the peer does not offer them again every round.
 * - Records: a received record is stored (as remote, or merged into the local path's
 *   signatures) only when src/net/sync_records.ts accepts it for the segment: well formed,
 *   signed by a key the segment trusts, passing its filter. Accepted records are audited as
 *   SyncReceive. Unsigned local paths are never offered: no peer could accept them.
 * - Push: the audit log is the change feed: new Import/Upload/Fetch lines are pushed to the
 *   segment's sessions within a second; every session also reconciles periodically.
 * - Chunks: each session also carries the chunk protocol (src/net/chunk_session.ts): peers
 *   may fetch the NARs of this segment's local paths; the peer fetcher
 *   (src/net/peer_fetch.ts) uses {@link Swarm.connectedPeers} to fetch from them. A peer
 *   that sends a chunk that is not what it claims is dropped and banned for 5 minutes.
 * - Status: `<cacheDir>/swarm-status.json` is rewritten every 2 s for `arca status`.
 * @module
 */

import { createHmac, timingSafeEqual } from "node:crypto";
import { join } from "node:path";
import type { Cache } from "../cache/cache.ts";
import { formatBase16 } from "../cache/hash.ts";
import type { PathRecord } from "../cache/metadata.ts";
import { RemoteRecords, type SyncRecord } from "../cache/remote_records.ts";
import type { PublicKey } from "../cache/signing.ts";
import { parseStorePath } from "../cache/store_path.ts";
import type { SegmentFilter } from "../config.ts";
import { ArcaError, ProtocolError } from "../errors.ts";
import { type DiscoveredPeer, Discovery } from "./discovery.ts";
import { generateStaticKeyPair, type KeyPair, x25519PublicKey } from "./noise.ts";
import { openSecureChannel } from "./secure_channel.ts";
import { SyncSession } from "./sync.ts";
import { type ChunkProvider, ChunkSession, type ChunkSessionStats } from "./chunk_session.ts";
import type { PeerFetchStats, PeerHandle } from "./peer_fetch.ts";
import {
  judgeRecord,
  mergeSignatures,
  parseSyncRecord,
  recordId,
  recordOfNarInfo,
  type Refusal,
} from "./sync_records.ts";
import { deriveTopicKeys, type TopicKeys } from "./topic.ts";

/** One segment the node shares. */
export interface SwarmSegment {
  name: string;
  /** The topic key (or ad-hoc topic string). */
  topic: string;
  filter: SegmentFilter;
  /** Keys whose signatures make a peer's record acceptable. */
  trustedKeys: PublicKey[];
  /** Which local paths belong: those of this segment, or (ad-hoc topic) all. */
  localPaths: "segment" | "all";
}

/** Options of {@link Swarm}. */
export interface SwarmOptions {
  segments: SwarmSegment[];
  identity: KeyPair;
  bindAddress: string;
  discoveryPort: number;
  /** Multicast port, default the discovery port. */
  multicastPort?: number;
  multicast: boolean;
  /** Interface address multicast uses (default 0.0.0.0; on loopback 127.0.0.1). */
  multicastInterface?: string;
  syncPort: number;
  /** Advertised HTTP port (0 when this node serves no HTTP). */
  httpPort: number;
  staticPeers: string[];
  /** Time between reconciliation rounds of a session (default 30 s). */
  reconcileIntervalMs?: number;
  /** Time between discovery announces (default 5 s). */
  announceIntervalMs?: number;
  log: (message: string) => void;
}

interface PeerState {
  segment: string;
  nodeId: string;
  address?: string;
  syncPort?: number;
  lastSeen: number;
  session?: SyncSession;
  /** The chunk protocol on the session's channel, with the handle the fetcher uses. */
  chunks?: { session: ChunkSession; handle: PeerHandle };
  /** Chunk counters of ended sessions. */
  chunkStats: ChunkSessionStats;
  sessionInitiator?: string;
  dialing: boolean;
  failures: number;
  retryAt: number;
  /** Records refused, for any reason. */
  refused: number;
  /** Hostile records since the last ban. */
  hostile: number;
  bannedUntil: number;
  /** Ids (hex → bytes) of this peer's records we do not hold as they are; see the module comment. */
  known: Map<string, Uint8Array>;
  recordsSent: number;
  recordsReceived: number;
  recordsAccepted: number;
}

/** Hostile records (see the module comment) tolerated before a peer is disconnected and banned. */
export const REFUSED_LIMIT = 20;
/**
 * Most accepted connections still before their session (hint and handshake, 5 s each at
 * most), in all and from one address; more are closed at once, so a flood of idle
 * connections costs a bounded number of sockets.
 */
const MAX_PENDING = 128;
const MAX_PENDING_PER_ADDRESS = 16;
/** Most remembered ids per peer (32 bytes each); the set starts over when full. */
const MAX_KNOWN_IDS = 100_000;
const BAN_MS = 5 * 60 * 1000;
const HINT_SIZE = 32;
/** A dial that has not connected in this time fails (a firewall that drops SYNs). */
const CONNECT_TIMEOUT_MS = 10_000;

/** Reads (or creates, mode 0600) the node's static key. */
export async function loadIdentity(cacheDir: string): Promise<KeyPair> {
  const path = join(cacheDir, "identity.key");
  try {
    const hex = (await Deno.readTextFile(path)).trim();
    if (!/^[0-9a-f]{64}$/.test(hex)) {
      throw new ArcaError("identity", `Invalid node identity file ${path}`);
    }
    const privateKey = Uint8Array.from(hex.match(/../g)!, (b) => parseInt(b, 16));
    return { privateKey, publicKey: x25519PublicKey(privateKey) };
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
  const pair = generateStaticKeyPair();
  await Deno.mkdir(cacheDir, { recursive: true });
  try {
    await Deno.writeTextFile(path, formatBase16(pair.privateKey) + "\n", {
      createNew: true,
      mode: 0o600,
    });
  } catch (error) {
    if (error instanceof Deno.errors.AlreadyExists) return loadIdentity(cacheDir);
    throw error;
  }
  await Deno.chmod(path, 0o600);
  return pair;
}

function syncHint(keys: TopicKeys, nonce: Uint8Array): Uint8Array {
  const mac = createHmac("sha256", keys.syncHintKey).update("arca sync hint").update(nonce)
    .digest();
  return new Uint8Array(mac.subarray(0, 16));
}

async function readExactly(conn: Deno.Conn, size: number, timeoutMs: number): Promise<Uint8Array> {
  const out = new Uint8Array(size);
  let filled = 0;
  const timer = setTimeout(() => conn.close(), timeoutMs);
  try {
    while (filled < size) {
      const n = await conn.read(out.subarray(filled));
      if (n === null) throw new ProtocolError("Connection closed before the sync hint");
      filled += n;
    }
    return out;
  } catch (error) {
    if (error instanceof Deno.errors.BadResource || error instanceof Deno.errors.Interrupted) {
      throw new ProtocolError("No sync hint in time");
    }
    throw error;
  } finally {
    clearTimeout(timer);
  }
}

/** A running swarm node. */
export class Swarm {
  #cache: Cache;
  #options: SwarmOptions;
  #keys = new Map<string, TopicKeys>();
  #segments = new Map<string, SwarmSegment>();
  #peers = new Map<string, PeerState>();
  #remote: RemoteRecords;
  #discovery?: Discovery;
  #listener?: Deno.Listener;
  #timers: ReturnType<typeof setInterval>[] = [];
  #auditOffset = 0;
  #stopped = false;
  #tasks = new Set<Promise<unknown>>();
  /** Accepted connections that have not become sessions yet, in all and per address. */
  #pendingTotal = 0;
  /** Connections (accepted or dialed) before their session; closed by stop(). */
  #connecting = new Set<Deno.Conn>();
  #abort = new AbortController();
  #pendingByAddress = new Map<string, number>();
  #droppedPending = 0;
  #droppedLoggedAt = 0;
  #fetchStatus?: () => FetchStatus;
  readonly nodeId: string;

  constructor(cache: Cache, options: SwarmOptions) {
    this.#cache = cache;
    this.#options = options;
    this.#remote = new RemoteRecords(cache.cacheDir);
    this.nodeId = formatBase16(options.identity.publicKey);
    for (const segment of options.segments) {
      this.#segments.set(segment.name, segment);
      this.#keys.set(segment.name, deriveTopicKeys(segment.topic));
    }
  }

  /** Binds the sync listener and discovery, and starts the timers. */
  async start(): Promise<void> {
    const options = this.#options;
    try {
      this.#listener = Deno.listen({ hostname: options.bindAddress, port: options.syncPort });
    } catch (error) {
      throw new ArcaError(
        "bind",
        `Cannot listen for sync on ${options.bindAddress}:${options.syncPort}: ${
          (error as Error).message
        }`,
      );
    }
    this.#track(this.#acceptLoop(this.#listener));
    this.#auditOffset = await this.#auditSize();
    this.#discovery = new Discovery({
      topics: options.segments.map((s) => ({
        name: s.name,
        beaconKey: this.#keys.get(s.name)!.beaconKey,
      })),
      nodeId: options.identity.publicKey,
      syncPort: (this.#listener.addr as Deno.NetAddr).port,
      httpPort: options.httpPort,
      discoveryPort: options.discoveryPort,
      bindAddress: options.bindAddress,
      multicast: {
        enabled: options.multicast,
        interfaceAddress: options.multicastInterface,
        port: options.multicastPort,
      },
      staticPeers: options.staticPeers,
      intervalMs: options.announceIntervalMs,
      onPeer: (peer) => this.#onPeer(peer),
      log: options.log,
    });
    await this.#discovery.start();
    this.#every(1000, () => this.#pushNewPaths());
    this.#every(1000, () => this.#redial());
    this.#every(options.reconcileIntervalMs ?? 30_000, () => this.#reconcileAll());
    this.#every(2000, () => this.writeStatus());
    await this.writeStatus();
  }

  /** Stops everything and closes every session. */
  async stop(): Promise<void> {
    this.#stopped = true;
    this.#abort.abort();
    for (const timer of this.#timers) clearInterval(timer);
    await this.#discovery?.stop();
    try {
      this.#listener?.close();
    } catch { /* already closed */ }
    // Connections still in their hint or handshake: no need to wait for their timeouts.
    for (const conn of this.#connecting) {
      try {
        conn.close();
      } catch { /* already closed */ }
    }
    await Promise.allSettled([...this.#peers.values()].map((p) => p.session?.channel.close()));
    await Promise.allSettled([...this.#tasks]);
    await Deno.remove(join(this.#cache.cacheDir, "swarm-status.json")).catch(() => {});
  }

  #every(ms: number, fn: () => Promise<void>): void {
    let running = false;
    this.#timers.push(setInterval(() => {
      if (running || this.#stopped) return;
      running = true;
      fn().catch((error) => this.#options.log(`swarm: ${(error as Error).message}`))
        .finally(() => (running = false));
    }, ms));
  }

  #track(task: Promise<unknown>): void {
    this.#tasks.add(task);
    task.catch(() => {}).finally(() => this.#tasks.delete(task));
  }

  #peer(segment: string, nodeId: string): PeerState {
    const key = `${segment}/${nodeId}`;
    let peer = this.#peers.get(key);
    if (!peer) {
      peer = {
        segment,
        nodeId,
        lastSeen: 0,
        dialing: false,
        failures: 0,
        retryAt: 0,
        refused: 0,
        hostile: 0,
        bannedUntil: 0,
        known: new Map(),
        recordsSent: 0,
        recordsReceived: 0,
        recordsAccepted: 0,
        chunkStats: { chunksServed: 0, bytesServed: 0, chunksReceived: 0, bytesReceived: 0 },
      };
      this.#peers.set(key, peer);
    }
    return peer;
  }

  #onPeer(found: DiscoveredPeer): void {
    const peer = this.#peer(found.topic, formatBase16(found.nodeId));
    peer.address = found.address;
    peer.syncPort = found.syncPort;
    peer.lastSeen = Date.now();
    this.#maybeDial(peer);
  }

  #redial(): Promise<void> {
    for (const peer of this.#peers.values()) this.#maybeDial(peer);
    return Promise.resolve();
  }

  #maybeDial(peer: PeerState): void {
    const now = Date.now();
    if (
      this.#stopped || peer.session || peer.dialing || peer.address === undefined ||
      peer.syncPort === undefined || now < peer.retryAt || now < peer.bannedUntil
    ) return;
    peer.dialing = true;
    this.#track(this.#dial(peer).finally(() => (peer.dialing = false)));
  }

  async #dial(peer: PeerState): Promise<void> {
    const keys = this.#keys.get(peer.segment)!;
    let conn: Deno.TcpConn | undefined;
    try {
      conn = await Deno.connect({
        hostname: peer.address!,
        port: peer.syncPort!,
        signal: AbortSignal.any([this.#abort.signal, AbortSignal.timeout(CONNECT_TIMEOUT_MS)]),
      });
      this.#connecting.add(conn);
      const nonce = crypto.getRandomValues(new Uint8Array(16));
      const hint = new Uint8Array(HINT_SIZE);
      hint.set(nonce);
      hint.set(syncHint(keys, nonce), 16);
      await conn.write(hint);
      const channel = await openSecureChannel(conn, {
        initiator: true,
        staticKey: this.#options.identity,
        psk: keys.psk,
      });
      if (formatBase16(channel.remoteStatic) !== peer.nodeId) {
        await channel.close();
        throw new ProtocolError("Peer's static key is not the one it announced");
      }
      peer.failures = 0;
      this.#adopt(peer.segment, channel, true);
    } catch (error) {
      try {
        conn?.close();
      } catch { /* closed by the channel */ }
      if (this.#stopped) return;
      peer.failures++;
      peer.retryAt = Date.now() + Math.min(60_000, 1000 * 2 ** Math.min(peer.failures - 1, 6));
      this.#options.log(
        `swarm: cannot connect to ${peer.address}:${peer.syncPort} (${peer.segment}): ${
          (error as Error).message
        }`,
      );
    } finally {
      if (conn) this.#connecting.delete(conn);
    }
  }

  async #acceptLoop(listener: Deno.Listener): Promise<void> {
    for (;;) {
      let conn: Deno.Conn;
      try {
        conn = await listener.accept();
      } catch (error) {
        if (
          this.#stopped || error instanceof Deno.errors.BadResource ||
          error instanceof Deno.errors.Interrupted
        ) {
          return; // closed
        }
        // Transient (out of file descriptors, say): keep listening.
        this.#options.log(`swarm: cannot accept a sync connection: ${(error as Error).message}`);
        await new Promise((resolve) => setTimeout(resolve, 500));
        continue;
      }
      const address = (conn.remoteAddr as Deno.NetAddr).hostname;
      const fromAddress = this.#pendingByAddress.get(address) ?? 0;
      if (this.#pendingTotal >= MAX_PENDING || fromAddress >= MAX_PENDING_PER_ADDRESS) {
        try {
          conn.close();
        } catch { /* already closed */ }
        this.#droppedPending++;
        if (Date.now() - this.#droppedLoggedAt > 10_000) {
          this.#droppedLoggedAt = Date.now();
          this.#options.log(
            `swarm: refused a sync connection from ${address}: too many connections before their handshake (${this.#droppedPending} refused so far)`,
          );
        }
        continue;
      }
      this.#pendingTotal++;
      this.#pendingByAddress.set(address, fromAddress + 1);
      this.#connecting.add(conn);
      this.#track(
        this.#accept(conn).finally(() => {
          this.#connecting.delete(conn);
          this.#pendingTotal--;
          const left = this.#pendingByAddress.get(address)! - 1;
          if (left === 0) this.#pendingByAddress.delete(address);
          else this.#pendingByAddress.set(address, left);
        }),
      );
    }
  }

  async #accept(conn: Deno.Conn): Promise<void> {
    try {
      const hint = await readExactly(conn, HINT_SIZE, 5000);
      const nonce = hint.subarray(0, 16);
      let segment: string | undefined;
      for (const [name, keys] of this.#keys) {
        if (timingSafeEqual(syncHint(keys, nonce), hint.subarray(16))) segment = name;
      }
      if (segment === undefined) throw new ProtocolError("Unknown sync hint (another topic?)");
      const channel = await openSecureChannel(conn, {
        initiator: false,
        staticKey: this.#options.identity,
        psk: this.#keys.get(segment)!.psk,
      });
      const peer = this.#peer(segment, formatBase16(channel.remoteStatic));
      if (Date.now() < peer.bannedUntil) {
        this.#options.log(
          `swarm: refused a sync connection from ${
            peer.nodeId.slice(0, 16)
          }: banned for sending refused records`,
        );
        await channel.close();
        return;
      }
      const remote = conn.remoteAddr as Deno.NetAddr;
      peer.address ??= remote.hostname;
      peer.lastSeen = Date.now();
      this.#adopt(segment, channel, false);
    } catch (error) {
      try {
        conn.close();
      } catch { /* closed by the channel */ }
      this.#options.log(`swarm: refused a sync connection: ${(error as Error).message}`);
    }
  }

  #adopt(
    segment: string,
    channel: import("./secure_channel.ts").SecureChannel,
    initiator: boolean,
  ): void {
    if (this.#stopped) {
      this.#track(channel.close());
      return;
    }
    const nodeId = formatBase16(channel.remoteStatic);
    const peer = this.#peer(segment, nodeId);
    const initiatorId = initiator ? this.nodeId : nodeId;
    if (peer.session) {
      // Both sides dialed at once: both keep the session the smaller node id initiated. The
      // same side dialing again has lost its old session: the new one replaces it.
      const keepOld = peer.sessionInitiator !== initiatorId &&
        peer.sessionInitiator! < initiatorId;
      if (keepOld) {
        this.#track(channel.close());
        return;
      }
      this.#track(peer.session.channel.close());
    }
    const chunkSession = new ChunkSession(channel, this.#chunkProvider(segment));
    const session = new SyncSession(channel, {
      initiator,
      source: {
        records: () => this.#segmentRecords(segment),
        knownIds: () => peer.known.values(),
        receive: (records) => this.#receive(peer, records),
      },
      chunks: (message) => chunkSession.handle(message),
    });
    peer.session = session;
    const chunks = {
      session: chunkSession,
      handle: {
        nodeId,
        segment,
        chunks: chunkSession,
        drop: (reason: string) => {
          this.#options.log(`swarm: dropping ${nodeId.slice(0, 16)} (${segment}): ${reason}`);
          peer.bannedUntil = Date.now() + BAN_MS;
          chunkSession.close(`Dropped: ${reason}`);
          this.#track(channel.close());
        },
      },
    };
    peer.chunks = chunks;
    peer.sessionInitiator = initiatorId;
    this.#options.log(`swarm: connected to ${nodeId.slice(0, 16)} for ${segment}`);
    const running = session.run().catch(async (error) => {
      this.#options.log(
        `swarm: session with ${nodeId.slice(0, 16)} (${segment}) ended: ${
          (error as Error).message
        }`,
      );
      await channel.close().catch(() => {});
    }).finally(() => {
      peer.recordsSent += session.stats.recordsSent;
      peer.recordsReceived += session.stats.recordsReceived;
      chunkSession.close();
      addChunkStats(peer.chunkStats, chunkSession.stats);
      if (peer.chunks === chunks) peer.chunks = undefined;
      if (peer.session === session) peer.session = undefined;
      peer.retryAt = Date.now() + 1000;
    });
    this.#track(running);
    if (initiator) this.#track(session.startRound().catch(() => channel.close()));
  }

  /** The segments this node shares (for the peer fetcher). */
  segmentNames(): string[] {
    return [...this.#segments.keys()];
  }

  /** The peers of a segment connected now (for the peer fetcher). */
  connectedPeers(segment: string): PeerHandle[] {
    const peers: PeerHandle[] = [];
    for (const peer of this.#peers.values()) {
      if (peer.segment === segment && peer.chunks && !peer.chunks.session.closed) {
        peers.push(peer.chunks.handle);
      }
    }
    return peers;
  }

  /** Reports the peer fetcher's counters in the status file. */
  setFetchStatus(status: () => FetchStatus): void {
    this.#fetchStatus = status;
  }

  /**
   * What a segment's peers may fetch: manifests of the local paths of this segment whose
   * chunks are all here, and chunk files as stored.
   */
  #chunkProvider(segment: string): ChunkProvider {
    const config = this.#segments.get(segment)!;
    const cache = this.#cache;
    return {
      async manifestOf(hashPart) {
        const record = await cache.getPath(hashPart);
        if (record === null) return null;
        if (config.localPaths === "segment" && record.segment !== segment) return null;
        const stored = await cache.narOfPath(hashPart);
        if (stored === null || (await cache.missingChunks(stored.manifest)).length > 0) {
          return null;
        }
        const { manifest } = stored;
        return {
          narHash: manifest.narHash,
          narSize: manifest.narSize,
          compression: manifest.compression,
          chunks: manifest.chunks.map(({ id, size }) => ({ id, size })),
        };
      },
      readChunk(id, compression) {
        try {
          return Deno.readFileSync(cache.chunks.chunkPath(id, compression));
        } catch (error) {
          if (error instanceof Deno.errors.NotFound) return null;
          throw error;
        }
      },
    };
  }

  /** The records a segment shares: its local paths and the remote records it knows. */
  async #segmentRecords(segment: string): Promise<SyncRecord[]> {
    const config = this.#segments.get(segment)!;
    const records: SyncRecord[] = [];
    const local = new Set<string>();
    for await (const record of this.#cache.listPaths()) {
      if (config.localPaths === "segment" && record.segment !== segment) continue;
      local.add(record.narInfo.storePath);
      // Unsigned paths are useless to peers (they accept only signed records).
      if (record.narInfo.sigs.length > 0) records.push(recordOfNarInfo(record.narInfo));
    }
    for await (const record of this.#remote.list(segment)) {
      if (local.has(record.storePath)) continue;
      const { segment: _s, receivedAt: _r, peers: _p, ...sync } = record;
      records.push(sync);
    }
    return records;
  }

  async #receive(peer: PeerState, raw: unknown[]): Promise<void> {
    const config = this.#segments.get(peer.segment)!;
    const accepted: SyncRecord[] = [];
    const ignored = new Map<string, number>();
    try {
      for (const item of raw) {
        let record: SyncRecord;
        let refusal: Refusal | null;
        try {
          record = parseSyncRecord(item);
          refusal = judgeRecord(record, config);
        } catch (error) {
          this.#refuse(peer, { reason: (error as Error).message, hostile: true });
          continue;
        }
        const id = recordId(record);
        if (refusal !== null) {
          this.#remember(peer, id);
          if (refusal.hostile) this.#refuse(peer, refusal);
          else {
            peer.refused++;
            ignored.set(refusal.reason, (ignored.get(refusal.reason) ?? 0) + 1);
          }
          continue;
        }
        const { news, held } = await this.#store(peer, record, config);
        if (news) accepted.push(record);
        if (held === null || formatBase16(recordId(held)) !== formatBase16(id)) {
          this.#remember(peer, id);
        }
      }
    } finally {
      for (const [reason, count] of ignored) {
        this.#options.log(
          `swarm: refused ${count} record(s) from ${peer.nodeId.slice(0, 16)}: ${reason}`,
        );
      }
      peer.recordsAccepted += accepted.length;
      if (accepted.length > 0) {
        await this.#cache.audit.append(accepted.map((record) => ({
          type: "SyncReceive" as const,
          storePath: record.storePath,
          segment: peer.segment,
          detail: `from peer ${peer.nodeId.slice(0, 16)}`,
        })));
      }
    }
  }

  /** Counts a hostile record; past the limit, bans the peer and ends its session. */
  #refuse(peer: PeerState, refusal: Refusal): void {
    peer.refused++;
    peer.hostile++;
    this.#options.log(
      `swarm: refused a record from ${peer.nodeId.slice(0, 16)}: ${refusal.reason}`,
    );
    if (peer.hostile > REFUSED_LIMIT) {
      peer.bannedUntil = Date.now() + BAN_MS;
      peer.hostile = 0;
      throw new ProtocolError(`Peer sent more than ${REFUSED_LIMIT} refused records`);
    }
  }

  /** Remembers a peer's record id to reconcile as held. */
  #remember(peer: PeerState, id: Uint8Array): void {
    if (peer.known.size >= MAX_KNOWN_IDS) peer.known.clear();
    peer.known.set(formatBase16(id), id.slice());
  }

  /**
   * Stores an accepted record. `news`: it told us something new (a path or a signature);
   * `held`: the record we hold for its path now, or null when we keep a different one.
   */
  async #store(
    peer: PeerState,
    record: SyncRecord,
    config: SwarmSegment,
  ): Promise<{ news: boolean; held: SyncRecord | null }> {
    const { hash } = parseStorePath(record.storePath);
    const local = await this.#cache.getPath(hash);
    if (local) {
      if (local.narInfo.narHash !== record.narHash || local.narInfo.narSize !== record.narSize) {
        return { news: false, held: null };
      }
      const sigs = mergeSignatures(record, local.narInfo.sigs, config.trustedKeys);
      if (sigs.length === local.narInfo.sigs.length) {
        return { news: false, held: recordOfNarInfo(local.narInfo) };
      }
      const updated: PathRecord = { ...local, narInfo: { ...local.narInfo, sigs } };
      await this.#cache.metadata.putPath(updated);
      return { news: true, held: recordOfNarInfo(updated.narInfo) };
    }
    const existing = await this.#remote.get(peer.segment, hash);
    if (existing && existing.narHash !== record.narHash) {
      return { news: false, held: null }; // keep the first version
    }
    const sigs = mergeSignatures(record, existing?.sigs ?? [], config.trustedKeys);
    const peers = [...new Set([...(existing?.peers ?? []), peer.nodeId])].sort();
    const held: SyncRecord = { ...record, sigs };
    if (existing) {
      const { segment: _s, receivedAt: _r, peers: _p, ...current } = existing;
      if (sigs.length === existing.sigs.length) {
        if (peers.length !== existing.peers.length) {
          await this.#remote.put({ ...existing, peers });
        }
        return { news: false, held: current };
      }
    }
    await this.#remote.put({
      ...held,
      segment: peer.segment,
      receivedAt: existing?.receivedAt ?? Date.now(),
      peers,
    });
    return { news: true, held };
  }

  #reconcileAll(): Promise<void> {
    for (const peer of this.#peers.values()) {
      const session = peer.session;
      if (session?.initiator) {
        this.#track(session.startRound().catch(() => session.channel.close()));
      }
    }
    return Promise.resolve();
  }

  async #auditSize(): Promise<number> {
    try {
      return (await Deno.stat(this.#cache.audit.path)).size;
    } catch {
      return 0;
    }
  }

  /** Pushes paths imported or uploaded since the last look (the audit log is the feed). */
  async #pushNewPaths(): Promise<void> {
    const size = await this.#auditSize();
    if (size <= this.#auditOffset) {
      this.#auditOffset = Math.min(this.#auditOffset, size);
      return;
    }
    const file = await Deno.open(this.#cache.audit.path, { read: true });
    let text: string;
    try {
      await file.seek(this.#auditOffset, Deno.SeekMode.Start);
      const bytes = new Uint8Array(size - this.#auditOffset);
      let filled = 0;
      while (filled < bytes.length) {
        const n = await file.read(bytes.subarray(filled));
        if (n === null) break;
        filled += n;
      }
      text = new TextDecoder().decode(bytes.subarray(0, filled));
    } finally {
      file.close();
    }
    const end = text.lastIndexOf("\n") + 1; // a line still being written waits
    this.#auditOffset += new TextEncoder().encode(text.slice(0, end)).length;
    const paths = new Set<string>();
    for (const line of text.slice(0, end).split("\n")) {
      try {
        const event = JSON.parse(line);
        if (
          (event.type === "Import" || event.type === "Upload" || event.type === "Fetch") &&
          typeof event.storePath === "string"
        ) {
          paths.add(event.storePath);
        }
      } catch { /* blank or torn */ }
    }
    const bySegment = new Map<string, SyncRecord[]>();
    for (const storePath of paths) {
      const record = await this.#cache.getPath(parseStorePath(storePath).hash);
      if (!record || record.narInfo.sigs.length === 0) continue;
      for (const segment of this.#segments.values()) {
        if (segment.localPaths === "segment" && record.segment !== segment.name) continue;
        const list = bySegment.get(segment.name) ?? [];
        list.push(recordOfNarInfo(record.narInfo));
        bySegment.set(segment.name, list);
      }
    }
    for (const peer of this.#peers.values()) {
      const records = bySegment.get(peer.segment);
      const session = peer.session;
      if (records && session) {
        this.#track(session.push(records).catch(() => session.channel.close()));
      }
    }
  }

  /** The swarm's state, as `arca status` shows it. */
  status(): SwarmStatus {
    const { httpPort, bindAddress } = this.#options;
    return {
      pid: Deno.pid,
      nodeId: this.nodeId,
      updatedAt: Date.now(),
      // Where this process serves HTTP (`--also-serve`), for local tools such as `verify`.
      http: httpPort === 0 ? null : {
        host: bindAddress === "0.0.0.0" ? "127.0.0.1" : bindAddress === "::" ? "::1" : bindAddress,
        port: httpPort,
      },
      segments: this.#options.segments.map((segment) => ({
        name: segment.name,
        peers: [...this.#peers.values()].filter((p) => p.segment === segment.name && p.lastSeen > 0)
          .map((p) => ({
            id: p.nodeId,
            address: p.address ?? null,
            syncPort: p.syncPort ?? null,
            connected: p.session !== undefined,
            lastSeen: new Date(p.lastSeen).toISOString(),
            recordsSent: p.recordsSent + (p.session?.stats.recordsSent ?? 0),
            recordsReceived: p.recordsReceived + (p.session?.stats.recordsReceived ?? 0),
            recordsAccepted: p.recordsAccepted,
            recordsRefused: p.refused,
            ...addChunkStats(
              { ...p.chunkStats },
              p.chunks?.session.stats ??
                { chunksServed: 0, bytesServed: 0, chunksReceived: 0, bytesReceived: 0 },
            ),
          })),
      })),
      fetch: this.#fetchStatus?.(),
    };
  }

  /** Writes the status file (tmp + rename). */
  async writeStatus(): Promise<void> {
    const path = join(this.#cache.cacheDir, "swarm-status.json");
    const temp = `${path}.${Deno.pid}.tmp`;
    await Deno.writeTextFile(temp, JSON.stringify(this.status(), null, 2));
    await Deno.rename(temp, path);
  }
}

/** What `swarm-status.json` holds. */
export interface SwarmStatus {
  pid: number;
  nodeId: string;
  updatedAt: number;
  /** The substituter of this process (`--also-serve`), reachable from this machine. */
  http?: { host: string; port: number } | null;
  segments: {
    name: string;
    peers: {
      id: string;
      address: string | null;
      syncPort: number | null;
      connected: boolean;
      lastSeen: string;
      recordsSent: number;
      recordsReceived: number;
      recordsAccepted: number;
      recordsRefused: number;
      /** Chunks (and bytes) this node sent the peer, and received from it. */
      chunksServed: number;
      bytesServed: number;
      chunksReceived: number;
      bytesReceived: number;
    }[];
  }[];
  /** Peer fetch and where served NARs came from (with `--also-serve`). */
  fetch?: FetchStatus;
}

/** The peer fetcher's counters and the substituter's NAR hits by source. */
export interface FetchStatus extends PeerFetchStats {
  /** NAR responses served from the local store, and through a peer fetch. */
  narsServedLocal: number;
  narsServedFromPeers: number;
}

function addChunkStats(into: ChunkSessionStats, more: ChunkSessionStats): ChunkSessionStats {
  into.chunksServed += more.chunksServed;
  into.bytesServed += more.bytesServed;
  into.chunksReceived += more.chunksReceived;
  into.bytesReceived += more.bytesReceived;
  return into;
}
