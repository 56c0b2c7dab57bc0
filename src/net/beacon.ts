/**
 * Discovery beacons: their wire format, their MAC and the checks a receiver applies (pure:
 * the clock and the nonces are injected, no I/O). The UDP driver is src/net/discovery.ts.
 *
 * A beacon says "node N of some topic has its sync port at S and its HTTP port at H" and
 * proves knowledge of the topic's beacon key (`deriveTopicKeys(topic).beaconKey`) with a
 * MAC under a key that rotates every {@link WINDOW_SECONDS} seconds. Layout (95 bytes,
 * integers big-endian):
 *
 * | offset | size | field |
 * |---|---|---|
 * | 0 | 4 | magic `ARCB` |
 * | 4 | 1 | version, 1 |
 * | 5 | 1 | kind: 1 announce, 2 reply (a static peer's answer to a unicast announce) |
 * | 6 | 1 | channel the sender used: 1 multicast, 2 unicast (a reply is always unicast) |
 * | 7 | 4 | window = floor(unix seconds / 30) |
 * | 11 | 32 | node id (the node's Noise static public key) |
 * | 43 | 2 | sync port (1–65535) |
 * | 45 | 2 | HTTP port (0: the node serves no HTTP) |
 * | 47 | 16 | nonce, random per beacon |
 * | 63 | 32 | mac = HMAC-SHA256(windowKey, bytes 0..62) |
 *
 * with windowKey = HMAC-SHA256(beaconKey, "pares-arca beacon v1" ‖ u32be(window)).
 *
 * Privacy: a beacon carries neither the key nor anything derived from it except the MAC,
 * which changes with every window and nonce; every other byte is the same for every topic
 * (magic, version, kind, channel, window) or belongs to the node (id, ports). So an observer
 * cannot tell which team a beacon belongs to, nor link two beacons of different windows
 * through their topic. The node id IS constant per node: an observer can follow one machine
 * across windows (as it can by its IP address); it is the node's Noise static key, which
 * the node reveals to any handshake partner anyway. A receiver holding several topics finds
 * the beacon's topic by trying each topic key's MAC (a few HMACs; topics are few).
 *
 * Checks on receipt, in order, each drop counted under its {@link DropReason}: exact length,
 * magic, version and field values (`malformed`); not our own node id (`self`); a window
 * within one of the receiver's current window, i.e. clocks up to ±30 s apart (`window`);
 * the MAC under one of the topics (`mac`); the channel the socket expects (`channel`); per
 * (topic, node): a window older than the newest seen (`stale`), a nonce already seen in
 * that window (`replay`), more than `rate.count` beacons in `rate.intervalMs` (`rate`); and
 * a cap on tracked (topic, node) pairs, so that spoofed ids cannot grow memory (`capacity`).
 * @module
 */

import { createHmac, timingSafeEqual } from "node:crypto";
import { FormatError } from "../errors.ts";

/** Seconds per MAC window. */
export const WINDOW_SECONDS = 30;
/** Size of every beacon on the wire, in bytes. */
export const BEACON_SIZE = 95;
/** Size of a node id, in bytes. */
export const NODE_ID_SIZE = 32;
/** Size of a beacon nonce, in bytes. */
export const NONCE_SIZE = 16;

const MAGIC = [0x41, 0x52, 0x43, 0x42]; // "ARCB"
const VERSION = 1;
const MAC_OFFSET = 63;
const MAC_SIZE = 32;
const WINDOW_LABEL = new TextEncoder().encode("pares-arca beacon v1");

const KIND_CODES = { announce: 1, reply: 2 } as const;
const CHANNEL_CODES = { multicast: 1, unicast: 2 } as const;

/** What a beacon is: a periodic announce, or a static peer's answer to a unicast announce. */
export type BeaconKind = keyof typeof KIND_CODES;
/** How the sender sent a beacon. */
export type BeaconChannel = keyof typeof CHANNEL_CODES;

/** The fields of a beacon, as decoded (the MAC is checked by {@link BeaconVerifier}). */
export interface Beacon {
  kind: BeaconKind;
  channel: BeaconChannel;
  /** The sender's MAC window, floor(unix seconds / 30). */
  window: number;
  /** 32 bytes: the node's Noise static public key. */
  nodeId: Uint8Array;
  syncPort: number;
  /** 0 when the node serves no HTTP. */
  httpPort: number;
  nonce: Uint8Array;
  mac: Uint8Array;
}

/** A topic a node holds: its name (local, for results) and its 32-byte beacon key. */
export interface BeaconTopic {
  name: string;
  beaconKey: Uint8Array;
}

/** Options of {@link encodeBeacon}. */
export interface EncodeBeaconOptions {
  kind: BeaconKind;
  /** How the beacon will be sent; a reply must be `unicast`. */
  channel: BeaconChannel;
  nodeId: Uint8Array;
  syncPort: number;
  /** 0 when the node serves no HTTP. */
  httpPort: number;
  /** The topic's beacon key (never sent). */
  beaconKey: Uint8Array;
  /** The sender's clock, in milliseconds since the Unix epoch. */
  now: number;
  /** 16 fresh random bytes. */
  nonce: Uint8Array;
}

/** The window (floor(unix seconds / 30)) of a time in milliseconds since the epoch. */
export function beaconWindow(nowMs: number): number {
  return Math.floor(nowMs / 1000 / WINDOW_SECONDS);
}

function windowKey(beaconKey: Uint8Array, window: number): Uint8Array {
  const suffix = new Uint8Array(4);
  new DataView(suffix.buffer).setUint32(0, window);
  return new Uint8Array(
    createHmac("sha256", beaconKey).update(WINDOW_LABEL).update(suffix).digest(),
  );
}

function computeMac(key: Uint8Array, message: Uint8Array): Uint8Array {
  return new Uint8Array(createHmac("sha256", key).update(message).digest());
}

function checkPort(name: string, port: number, allowZero: boolean): void {
  if (!Number.isInteger(port) || port < (allowZero ? 0 : 1) || port > 65535) {
    throw new FormatError(`Invalid beacon ${name}: ${port}`);
  }
}

/** Encodes and MACs a beacon: {@link BEACON_SIZE} bytes. */
export function encodeBeacon(options: EncodeBeaconOptions): Uint8Array {
  const { kind, channel, nodeId, syncPort, httpPort, beaconKey, nonce } = options;
  if (!(kind in KIND_CODES)) throw new FormatError(`Invalid beacon kind: ${kind}`);
  if (!(channel in CHANNEL_CODES)) throw new FormatError(`Invalid beacon channel: ${channel}`);
  if (kind === "reply" && channel !== "unicast") {
    throw new FormatError("Invalid beacon: a reply must be sent by unicast");
  }
  if (nodeId.length !== NODE_ID_SIZE) {
    throw new FormatError(`Invalid beacon node id: ${nodeId.length} bytes, expected 32`);
  }
  if (nonce.length !== NONCE_SIZE) {
    throw new FormatError(`Invalid beacon nonce: ${nonce.length} bytes, expected 16`);
  }
  if (beaconKey.length !== 32) {
    throw new FormatError(`Invalid beacon key: ${beaconKey.length} bytes, expected 32`);
  }
  checkPort("sync port", syncPort, false);
  checkPort("HTTP port", httpPort, true);
  const window = beaconWindow(options.now);
  const out = new Uint8Array(BEACON_SIZE);
  const view = new DataView(out.buffer);
  out.set(MAGIC, 0);
  out[4] = VERSION;
  out[5] = KIND_CODES[kind];
  out[6] = CHANNEL_CODES[channel];
  view.setUint32(7, window);
  out.set(nodeId, 11);
  view.setUint16(43, syncPort);
  view.setUint16(45, httpPort);
  out.set(nonce, 47);
  out.set(computeMac(windowKey(beaconKey, window), out.subarray(0, MAC_OFFSET)), MAC_OFFSET);
  return out;
}

function codeName<T extends string>(codes: Record<T, number>, code: number): T | undefined {
  for (const [name, value] of Object.entries(codes) as [T, number][]) {
    if (value === code) return name;
  }
  return undefined;
}

/**
 * Decodes the fields of a beacon without checking its MAC.
 * @throws {FormatError} on a wrong length, magic, version or field value
 */
export function decodeBeacon(bytes: Uint8Array): Beacon {
  if (bytes.length !== BEACON_SIZE) {
    throw new FormatError(`Invalid beacon: ${bytes.length} bytes, expected ${BEACON_SIZE}`);
  }
  if (MAGIC.some((b, i) => bytes[i] !== b)) throw new FormatError("Invalid beacon: bad magic");
  if (bytes[4] !== VERSION) throw new FormatError(`Unsupported beacon version: ${bytes[4]}`);
  const kind = codeName(KIND_CODES, bytes[5]);
  if (kind === undefined) throw new FormatError(`Invalid beacon kind: ${bytes[5]}`);
  const channel = codeName(CHANNEL_CODES, bytes[6]);
  if (channel === undefined) throw new FormatError(`Invalid beacon channel: ${bytes[6]}`);
  if (kind === "reply" && channel !== "unicast") {
    throw new FormatError("Invalid beacon: a reply must be sent by unicast");
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const syncPort = view.getUint16(43);
  if (syncPort === 0) throw new FormatError("Invalid beacon sync port: 0");
  return {
    kind,
    channel,
    window: view.getUint32(7),
    nodeId: bytes.slice(11, 43),
    syncPort,
    httpPort: view.getUint16(45),
    nonce: bytes.slice(47, 63),
    mac: bytes.slice(MAC_OFFSET, MAC_OFFSET + MAC_SIZE),
  };
}

/** Why {@link BeaconVerifier.verify} dropped a beacon (see the module comment). */
export type DropReason =
  | "malformed"
  | "self"
  | "window"
  | "mac"
  | "channel"
  | "stale"
  | "replay"
  | "rate"
  | "capacity";

/** Counts of accepted and dropped beacons, by reason. */
export type BeaconCounters = Record<DropReason | "accepted", number>;

/** A beacon that passed every check, with the name of the topic whose key MACs it. */
export interface VerifiedBeacon {
  topic: string;
  beacon: Beacon;
}

/** Options of {@link BeaconVerifier}. */
export interface BeaconVerifierOptions {
  /** The topics this node holds; a beacon is accepted for the first whose MAC matches. */
  topics: BeaconTopic[];
  /** The receiver's clock, in milliseconds since the Unix epoch. */
  now: () => number;
  /** Our own node id: beacons carrying it are dropped (`self`). */
  selfId?: Uint8Array;
  /** At most `count` beacons per (topic, node) in any `intervalMs` (default 10 per 10 s). */
  rate?: { count: number; intervalMs: number };
  /** At most this many (topic, node) pairs tracked at once (default 4096). */
  maxTracked?: number;
}

/** Options of {@link BeaconVerifier.verify}. */
export interface VerifyOptions {
  /** Drop beacons the sender sent by another channel (`channel`), e.g. multicast copies
   * that a wildcard-bound unicast socket also receives. */
  channel?: BeaconChannel;
}

interface NodeState {
  newestWindow: number;
  /** Nonces (hex) accepted in `newestWindow`; older windows are refused outright. */
  nonces: Set<string>;
  /** Times (ms) of the accepted beacons within the rate interval, oldest first. */
  times: number[];
}

function hex(bytes: Uint8Array): string {
  let out = "";
  for (const b of bytes) out += b.toString(16).padStart(2, "0");
  return out;
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}

/**
 * Checks received beacons: format, time window, MAC (trying each topic), channel, replay,
 * rate and memory bound. Keeps per-(topic, node) state; pure apart from that state.
 */
export class BeaconVerifier {
  #topics: BeaconTopic[];
  #now: () => number;
  #selfId?: Uint8Array;
  #rateCount: number;
  #rateIntervalMs: number;
  #maxTracked: number;
  #state = new Map<string, NodeState>();
  #windowKeys = new Map<string, Uint8Array>();
  #counters: BeaconCounters = {
    accepted: 0,
    malformed: 0,
    self: 0,
    window: 0,
    mac: 0,
    channel: 0,
    stale: 0,
    replay: 0,
    rate: 0,
    capacity: 0,
  };
  #lastDrop: DropReason | null = null;

  constructor(options: BeaconVerifierOptions) {
    for (const topic of options.topics) {
      if (topic.beaconKey.length !== 32) {
        throw new FormatError(`Invalid beacon key of topic ${topic.name}: expected 32 bytes`);
      }
    }
    this.#topics = options.topics.map((t) => ({ name: t.name, beaconKey: t.beaconKey.slice() }));
    this.#now = options.now;
    this.#selfId = options.selfId?.slice();
    this.#rateCount = options.rate?.count ?? 10;
    this.#rateIntervalMs = options.rate?.intervalMs ?? 10_000;
    this.#maxTracked = options.maxTracked ?? 4096;
  }

  /** Counts of accepted beacons and of drops by reason (a copy). */
  get counters(): BeaconCounters {
    return { ...this.#counters };
  }

  /** The reason of the last drop, or null if the last beacon was accepted. */
  get lastDrop(): DropReason | null {
    return this.#lastDrop;
  }

  /** How many (topic, node) pairs are tracked. */
  get tracked(): number {
    return this.#state.size;
  }

  /** Returns the beacon and its topic if it passes every check, else null (see `lastDrop`). */
  verify(bytes: Uint8Array, options: VerifyOptions = {}): VerifiedBeacon | null {
    let beacon: Beacon;
    try {
      beacon = decodeBeacon(bytes);
    } catch {
      return this.#drop("malformed");
    }
    if (this.#selfId !== undefined && equalBytes(beacon.nodeId, this.#selfId)) {
      return this.#drop("self");
    }
    const now = this.#now();
    const current = beaconWindow(now);
    if (Math.abs(beacon.window - current) > 1) return this.#drop("window");
    const message = bytes.subarray(0, MAC_OFFSET);
    let topic: string | undefined;
    for (let i = 0; i < this.#topics.length; i++) {
      const expected = computeMac(this.#windowKey(i, beacon.window, current), message);
      if (equalBytes(expected, beacon.mac)) {
        topic = this.#topics[i].name;
        break;
      }
    }
    if (topic === undefined) return this.#drop("mac");
    if (options.channel !== undefined && options.channel !== beacon.channel) {
      return this.#drop("channel");
    }
    const id = `${topic}\0${hex(beacon.nodeId)}`;
    let state = this.#state.get(id);
    const nonce = hex(beacon.nonce);
    if (state !== undefined) {
      if (beacon.window < state.newestWindow) return this.#drop("stale");
      if (beacon.window === state.newestWindow && state.nonces.has(nonce)) {
        return this.#drop("replay");
      }
      while (state.times.length > 0 && state.times[0] <= now - this.#rateIntervalMs) {
        state.times.shift();
      }
      if (state.times.length >= this.#rateCount) return this.#drop("rate");
    } else {
      if (this.#state.size >= this.#maxTracked) this.#prune(current);
      if (this.#state.size >= this.#maxTracked) return this.#drop("capacity");
      state = { newestWindow: beacon.window, nonces: new Set(), times: [] };
      this.#state.set(id, state);
    }
    if (beacon.window > state.newestWindow) {
      state.newestWindow = beacon.window;
      state.nonces.clear();
    }
    state.nonces.add(nonce);
    state.times.push(now);
    this.#counters.accepted++;
    this.#lastDrop = null;
    return { topic, beacon };
  }

  #drop(reason: DropReason): null {
    this.#counters[reason]++;
    this.#lastDrop = reason;
    return null;
  }

  /** Forgets pairs whose newest window can no longer be accepted: replays of their beacons
   * fail the window check anyway. */
  #prune(current: number): void {
    for (const [id, state] of this.#state) {
      if (state.newestWindow < current - 1) this.#state.delete(id);
    }
  }

  /** The MAC key of topic `index` in `window`, cached for the windows around `current`. */
  #windowKey(index: number, window: number, current: number): Uint8Array {
    const id = `${index}:${window}`;
    let key = this.#windowKeys.get(id);
    if (key === undefined) {
      if (this.#windowKeys.size >= 3 * this.#topics.length) {
        for (const k of this.#windowKeys.keys()) {
          const w = Number(k.slice(k.indexOf(":") + 1));
          if (Math.abs(w - current) > 1) this.#windowKeys.delete(k);
        }
      }
      key = windowKey(this.#topics[index].beaconKey, window);
      this.#windowKeys.set(id, key);
    }
    return key;
  }
}
