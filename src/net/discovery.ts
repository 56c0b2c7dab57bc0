/**
 * Peer discovery, the UDP driver around src/net/beacon.ts (which owns the beacon format and
 * every check). Needs `--unstable-net` (deno.json enables it) for `Deno.listenDatagram`.
 *
 * Every `intervalMs` (and once at start) a node sends, for each of its topics, an announce
 * beacon to the multicast group (if enabled) and one by unicast to each static peer
 * (`host:port`, the peer's discovery port). A node answers a valid unicast announce with a
 * unicast reply to the announce's source, so a node reached as a static peer learns of its
 * caller and the caller learns the static peer's sync and HTTP ports. Multicast announces
 * get no reply: every node announces itself. Each accepted beacon (our own are ignored)
 * calls `onPeer`, so it doubles as a heartbeat: consumers key peers by node id and topic.
 * The verifier's rate limit (default 10 per 10 s per topic and node) fits the default
 * interval: per 5 s a peer sends at most a multicast announce, a unicast announce and a
 * reply; with much shorter intervals some heartbeats are dropped (`rate`), not peers.
 * Our own multicast beacons come back to us and are counted as `self`.
 *
 * Sockets (measured with Deno 2.9.6 on Linux):
 * - unicast: `bindAddress:discoveryPort`. It sends announces to static peers and replies,
 *   and receives announces and replies. Exclusive (no `reuseAddress`) unless multicast uses
 *   the same port: then `reuseAddress` (both sockets must set it), so two nodes on one
 *   host can share the multicast port; but a unicast datagram to a shared port reaches
 *   only one of them (measured), so nodes on one host that are each other's static peers
 *   need their own discovery ports (or a separate `multicast.port`). When bound to
 *   0.0.0.0 it also receives copies of the group's datagrams (Linux's IP_MULTICAST_ALL,
 *   which Deno cannot turn off); those are dropped by their channel byte (`channel`).
 * - multicast receive: bound to `group:port` with `reuseAddress`, so it receives only the
 *   group's datagrams, and joined to the group on `multicast.interfaceAddress`
 *   (`joinMulticastV4`). If binding to the group address fails (not Linux/BSD), it binds
 *   0.0.0.0:port and accepts either channel.
 * - multicast send: bound to `interfaceAddress:0` with `loopback: true`. Binding the source
 *   address is what picks the outgoing interface (Deno has no IP_MULTICAST_IF): from
 *   127.0.0.1 the datagram goes over `lo`, which works in a sandbox without a LAN. Deno's
 *   `loopback` defaults to false, which sets IP_MULTICAST_LOOP off: then nodes on the same
 *   host never hear each other over a real interface (measured), hence true. TTL stays at
 *   the system default of 1: beacons never leave the link.
 *
 * The default group, 239.255.70.70, is in 239.255.0.0/16, the IPv4 organization-local
 * (administratively scoped) range of RFC 2365, which routers do not forward off-site;
 * 70.70 echoes the default port 7070.
 * @module
 */

import {
  BEACON_SIZE,
  type BeaconChannel,
  type BeaconCounters,
  type BeaconTopic,
  BeaconVerifier,
  encodeBeacon,
  NODE_ID_SIZE,
  NONCE_SIZE,
} from "./beacon.ts";
import { FormatError, UsageError } from "../errors.ts";

/** The default discovery port (UDP). */
export const DEFAULT_DISCOVERY_PORT = 7070;
/** The default multicast group: organization-local scope (RFC 2365). */
export const DEFAULT_MULTICAST_GROUP = "239.255.70.70";
/** The default time between two rounds of announces. */
export const DEFAULT_INTERVAL_MS = 5000;

/** A node learned from a beacon. */
export interface DiscoveredPeer {
  /** Name of our topic whose key MACs the beacon. */
  topic: string;
  /** 32 bytes: the peer's Noise static public key. */
  nodeId: Uint8Array;
  /** The beacon's source address. */
  address: string;
  syncPort: number;
  /** 0 when the peer serves no HTTP. */
  httpPort: number;
  /** `multicast` for a group announce; `static` for a unicast announce or reply. */
  via: "multicast" | "static";
}

/** Multicast options of {@link Discovery}. */
export interface MulticastOptions {
  /** Default true. */
  enabled?: boolean;
  /** IPv4 multicast group, default {@link DEFAULT_MULTICAST_GROUP}. */
  group?: string;
  /** Address of the interface to join on and send from: default 0.0.0.0 (the system's
   * choice); 127.0.0.1 for loopback. */
  interfaceAddress?: string;
  /** UDP port of the group, default the discovery port. */
  port?: number;
}

/** Options of {@link Discovery}. */
export interface DiscoveryOptions {
  /** Topics to announce and accept (name: local label; beaconKey: 32 bytes). */
  topics: BeaconTopic[];
  /** 32 bytes: this node's Noise static public key. */
  nodeId: Uint8Array;
  /** The port our Noise sync listener accepts on. */
  syncPort: number;
  /** The port our HTTP substituter serves on; 0 (default) when none. */
  httpPort?: number;
  /** UDP port for unicast beacons, default 7070; 0 picks a free one (see {@link Discovery.port}). */
  discoveryPort?: number;
  /** Address the unicast socket binds, default 0.0.0.0. */
  bindAddress?: string;
  multicast?: MulticastOptions;
  /** Discovery addresses (`host:port`, `[v6]:port`) to announce to by unicast. */
  staticPeers?: string[];
  /** Time between rounds of announces, default 5000 ms. */
  intervalMs?: number;
  /** Called for every accepted beacon of another node. */
  onPeer?: (peer: DiscoveredPeer) => void;
  /** Diagnostics (send failures, errors thrown by onPeer). */
  log?: (message: string) => void;
  /** Clock in ms since the epoch, default `Date.now`. */
  now?: () => number;
  /** Rate limit per (topic, node), default 10 beacons per 10 s. */
  rate?: { count: number; intervalMs: number };
  /** Cap on tracked (topic, node) pairs, default 4096. */
  maxTracked?: number;
}

/** Beacon counters plus what this node sent. */
export interface DiscoveryCounters extends BeaconCounters {
  /** Beacons sent (announces and replies). */
  sent: number;
  /** Replies sent to unicast announces. */
  replies: number;
  /** Sends that failed (unresolvable host, unreachable network, ...). */
  sendErrors: number;
}

/** A parsed `host:port`. */
export interface HostPort {
  hostname: string;
  port: number;
}

/**
 * Parses `host:port` or `[ipv6]:port`.
 * @throws {FormatError} when the port is missing or out of range
 */
export function parseHostPort(text: string): HostPort {
  const match = /^(?:\[([^\]]+)\]|([^:\[\]\s]+)):(\d{1,5})$/.exec(text);
  const port = match ? Number(match[3]) : NaN;
  if (!match || port < 1 || port > 65535) {
    throw new FormatError(`Invalid peer address ${JSON.stringify(text)}: expected host:port`);
  }
  return { hostname: match[1] ?? match[2], port };
}

function isMulticastV4(address: string): boolean {
  const parts = address.split(".");
  if (parts.length !== 4 || !parts.every((p) => /^\d{1,3}$/.test(p) && Number(p) <= 255)) {
    return false;
  }
  const first = Number(parts[0]);
  return first >= 224 && first <= 239;
}

function checkPort(name: string, port: number, allowZero: boolean): void {
  if (!Number.isInteger(port) || port < (allowZero ? 0 : 1) || port > 65535) {
    throw new UsageError(`Invalid ${name}: ${port}`);
  }
}

function listen(hostname: string, port: number, options: Deno.UdpListenOptions) {
  if (typeof Deno.listenDatagram !== "function") {
    throw new UsageError("Discovery needs UDP sockets: run deno with --unstable-net");
  }
  try {
    return Deno.listenDatagram({ transport: "udp", ...options, hostname, port });
  } catch (error) {
    const detail = error instanceof Deno.errors.AddrInUse
      ? "address already in use (give each node on a host its own discovery port)"
      : String(error instanceof Error ? error.message : error);
    throw new UsageError(`Cannot bind UDP ${hostname}:${port}: ${detail}`, { cause: error });
  }
}

function isClosedError(error: unknown): boolean {
  return error instanceof Deno.errors.BadResource || error instanceof Deno.errors.Interrupted;
}

/** Announces this node and reports the peers it hears of; see the module comment. */
export class Discovery {
  #topics: BeaconTopic[];
  #nodeId: Uint8Array;
  #syncPort: number;
  #httpPort: number;
  #discoveryPort: number;
  #bindAddress: string;
  #multicast: { group: string; interfaceAddress: string; port: number } | null;
  #staticPeers: HostPort[];
  #intervalMs: number;
  #onPeer?: (peer: DiscoveredPeer) => void;
  #log: (message: string) => void;
  #now: () => number;
  #verifier: BeaconVerifier;
  #unicast: Deno.DatagramConn | null = null;
  #groupReceiver: Deno.DatagramConn | null = null;
  #groupSender: Deno.DatagramConn | null = null;
  #loops: Promise<void>[] = [];
  #pending = new Set<Promise<unknown>>();
  #timer: ReturnType<typeof setTimeout> | undefined;
  #running = false;
  #sent = { sent: 0, replies: 0, sendErrors: 0 };

  constructor(options: DiscoveryOptions) {
    if (options.nodeId.length !== NODE_ID_SIZE) {
      throw new FormatError(`Invalid node id: ${options.nodeId.length} bytes, expected 32`);
    }
    if (options.topics.length === 0) throw new UsageError("Discovery needs at least one topic");
    if (new Set(options.topics.map((t) => t.name)).size !== options.topics.length) {
      throw new UsageError("Discovery topics must have distinct names");
    }
    this.#topics = options.topics;
    this.#nodeId = options.nodeId.slice();
    this.#syncPort = options.syncPort;
    this.#httpPort = options.httpPort ?? 0;
    this.#discoveryPort = options.discoveryPort ?? DEFAULT_DISCOVERY_PORT;
    this.#bindAddress = options.bindAddress ?? "0.0.0.0";
    checkPort("sync port", this.#syncPort, false);
    checkPort("HTTP port", this.#httpPort, true);
    checkPort("discovery port", this.#discoveryPort, true);
    const multicast = options.multicast ?? {};
    if (multicast.enabled ?? true) {
      const group = multicast.group ?? DEFAULT_MULTICAST_GROUP;
      if (!isMulticastV4(group)) {
        throw new UsageError(`Invalid multicast group: ${group} is not an IPv4 multicast address`);
      }
      const port = multicast.port ?? this.#discoveryPort;
      checkPort("multicast port", port, false);
      this.#multicast = { group, interfaceAddress: multicast.interfaceAddress ?? "0.0.0.0", port };
    } else {
      this.#multicast = null;
    }
    this.#staticPeers = (options.staticPeers ?? []).map(parseHostPort);
    this.#intervalMs = options.intervalMs ?? DEFAULT_INTERVAL_MS;
    if (!(this.#intervalMs > 0)) throw new UsageError(`Invalid interval: ${this.#intervalMs}`);
    this.#onPeer = options.onPeer;
    this.#log = options.log ?? (() => {});
    this.#now = options.now ?? Date.now;
    this.#verifier = new BeaconVerifier({
      topics: this.#topics,
      now: this.#now,
      selfId: this.#nodeId,
      rate: options.rate,
      maxTracked: options.maxTracked,
    });
  }

  /** The port the unicast socket is bound to (the one to give as a static peer). */
  get port(): number {
    if (this.#unicast === null) throw new UsageError("Discovery is not started");
    return (this.#unicast.addr as Deno.NetAddr).port;
  }

  /** Beacons accepted and dropped (by reason), and sent. */
  get counters(): DiscoveryCounters {
    return { ...this.#verifier.counters, ...this.#sent };
  }

  /**
   * Binds the sockets, joins the group, sends a first round of announces and schedules the
   * next ones.
   * @throws {UsageError} when a socket cannot be bound or the group joined
   */
  async start(): Promise<void> {
    if (this.#running || this.#unicast !== null) throw new UsageError("Discovery already started");
    const multicast = this.#multicast;
    try {
      this.#unicast = listen(this.#bindAddress, this.#discoveryPort, {
        reuseAddress: multicast !== null && multicast.port === this.#discoveryPort,
      });
      let groupChannel: BeaconChannel | undefined = "multicast";
      if (multicast !== null) {
        try {
          this.#groupReceiver = listen(multicast.group, multicast.port, { reuseAddress: true });
        } catch {
          this.#groupReceiver = listen("0.0.0.0", multicast.port, { reuseAddress: true });
          groupChannel = undefined;
        }
        try {
          await this.#groupReceiver.joinMulticastV4(multicast.group, multicast.interfaceAddress);
        } catch (error) {
          throw new UsageError(
            `Cannot join multicast group ${multicast.group} on ${multicast.interfaceAddress}: ${
              error instanceof Error ? error.message : error
            }`,
            { cause: error },
          );
        }
        this.#groupSender = listen(multicast.interfaceAddress, 0, { loopback: true });
      }
      this.#running = true;
      this.#loops.push(this.#receiveLoop(this.#unicast, "unicast"));
      if (this.#groupReceiver !== null) {
        this.#loops.push(this.#receiveLoop(this.#groupReceiver, groupChannel));
      }
    } catch (error) {
      this.#closeSockets();
      throw error;
    }
    await this.#round();
  }

  /** Closes the sockets, cancels the timer and waits for the receive loops to end. */
  async stop(): Promise<void> {
    this.#running = false;
    clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#closeSockets();
    await Promise.allSettled([...this.#loops, ...this.#pending]);
    this.#loops = [];
  }

  /** Sends one round of announces now (also done every `intervalMs`). */
  async announce(): Promise<void> {
    const sends: Promise<void>[] = [];
    for (const topic of this.#topics) {
      if (this.#multicast !== null && this.#groupSender !== null) {
        const { group, port } = this.#multicast;
        sends.push(this.#send(this.#groupSender, topic, "announce", "multicast", group, port));
      }
      for (const peer of this.#staticPeers) {
        if (this.#unicast === null) break;
        sends.push(
          this.#send(this.#unicast, topic, "announce", "unicast", peer.hostname, peer.port),
        );
      }
    }
    await Promise.all(sends);
  }

  async #round(): Promise<void> {
    if (!this.#running) return;
    await this.#track(this.announce());
    if (this.#running) this.#timer = setTimeout(() => this.#round(), this.#intervalMs);
  }

  /** Keeps a promise in the set that stop() waits for. */
  async #track<T>(promise: Promise<T>): Promise<T> {
    this.#pending.add(promise);
    try {
      return await promise;
    } finally {
      this.#pending.delete(promise);
    }
  }

  async #send(
    conn: Deno.DatagramConn,
    topic: BeaconTopic,
    kind: "announce" | "reply",
    channel: BeaconChannel,
    hostname: string,
    port: number,
  ): Promise<void> {
    const bytes = encodeBeacon({
      kind,
      channel,
      nodeId: this.#nodeId,
      syncPort: this.#syncPort,
      httpPort: this.#httpPort,
      beaconKey: topic.beaconKey,
      now: this.#now(),
      nonce: crypto.getRandomValues(new Uint8Array(NONCE_SIZE)),
    });
    try {
      await conn.send(bytes, { transport: "udp", hostname, port });
      this.#sent.sent++;
      if (kind === "reply") this.#sent.replies++;
    } catch (error) {
      if (!this.#running && isClosedError(error)) return;
      this.#sent.sendErrors++;
      this.#log(`Cannot send a beacon to ${hostname}:${port}: ${error}`);
    }
  }

  async #receiveLoop(conn: Deno.DatagramConn, channel: BeaconChannel | undefined): Promise<void> {
    while (this.#running) {
      let data: Uint8Array;
      let addr: Deno.Addr;
      try {
        // One byte more than a beacon: a longer datagram is truncated, and then too long.
        [data, addr] = await conn.receive(new Uint8Array(BEACON_SIZE + 1));
      } catch (error) {
        if (!this.#running || isClosedError(error)) return;
        this.#log(`Discovery receive failed: ${error}`);
        continue;
      }
      this.#handle(data, addr as Deno.NetAddr, channel);
    }
  }

  #handle(data: Uint8Array, from: Deno.NetAddr, channel: BeaconChannel | undefined): void {
    const verified = this.#verifier.verify(data, { channel });
    if (verified === null) return;
    const { topic, beacon } = verified;
    if (beacon.kind === "announce" && beacon.channel === "unicast" && this.#unicast !== null) {
      const ourTopic = this.#topics.find((t) => t.name === topic)!;
      this.#track(
        this.#send(this.#unicast, ourTopic, "reply", "unicast", from.hostname, from.port),
      );
    }
    try {
      this.#onPeer?.({
        topic,
        nodeId: beacon.nodeId,
        address: from.hostname,
        syncPort: beacon.syncPort,
        httpPort: beacon.httpPort,
        via: beacon.channel === "multicast" ? "multicast" : "static",
      });
    } catch (error) {
      this.#log(`Discovery onPeer callback failed: ${error}`);
    }
  }

  #closeSockets(): void {
    for (const conn of [this.#unicast, this.#groupReceiver, this.#groupSender]) {
      try {
        conn?.close();
      } catch {
        // already closed
      }
    }
    this.#unicast = this.#groupReceiver = this.#groupSender = null;
  }
}
