/**
 * Discovery over real UDP sockets on 127.0.0.1: static peers (the reply teaches the caller
 * the static peer's ports), multicast on loopback (probed first with raw sockets: if the
 * sandbox cannot do it the test is skipped with the reason in its name), another topic
 * learning nothing, port clashes, and a raw socket sending garbage, truncated, oversize,
 * replayed, wrong-channel and wrong-MAC datagrams while the node keeps discovering.
 * Waits are bounded loops on events, never timing assertions; every socket is closed.
 * @module
 */

import assert from "node:assert/strict";
import {
  BEACON_SIZE,
  BeaconVerifier,
  decodeBeacon,
  encodeBeacon,
  type EncodeBeaconOptions,
} from "../../src/net/beacon.ts";
import {
  type DiscoveredPeer,
  Discovery,
  type DiscoveryOptions,
  parseHostPort,
} from "../../src/net/discovery.ts";
import { UsageError } from "../../src/errors.ts";
import { deriveTopicKeys } from "../../src/net/topic.ts";

const TOPIC = { name: "team", beaconKey: deriveTopicKeys("discovery test topic").beaconKey };
const OTHER = { name: "other", beaconKey: deriveTopicKeys("another team's topic").beaconKey };
const GROUP = "239.255.70.70";
const WAIT_MS = 15_000;

function randomId(): Uint8Array {
  return crypto.getRandomValues(new Uint8Array(32));
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

/** Polls `condition` until it holds; fails after a generous bound. */
async function waitFor(what: string, condition: () => boolean): Promise<void> {
  const deadline = Date.now() + WAIT_MS;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`Timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** A free UDP port on this host (bound then released). */
function freeUdpPort(): number {
  const conn = Deno.listenDatagram({ transport: "udp", hostname: "0.0.0.0", port: 0 });
  const port = (conn.addr as Deno.NetAddr).port;
  conn.close();
  return port;
}

interface Node {
  discovery: Discovery;
  nodeId: Uint8Array;
  peers: DiscoveredPeer[];
  logs: string[];
}

/** A node on 127.0.0.1 with multicast off unless asked, a short interval. */
function makeNode(options: Partial<DiscoveryOptions> & { syncPort: number }): Node {
  const nodeId = options.nodeId ?? randomId();
  const peers: DiscoveredPeer[] = [];
  const logs: string[] = [];
  const discovery = new Discovery({
    topics: [TOPIC],
    discoveryPort: 0,
    bindAddress: "127.0.0.1",
    multicast: { enabled: false },
    intervalMs: 100,
    ...options,
    nodeId,
    onPeer: (peer) => peers.push(peer),
    log: (message) => logs.push(message),
  });
  return { discovery, nodeId, peers, logs };
}

function peerOf(node: Node, other: Node): DiscoveredPeer | undefined {
  return node.peers.find((p) => sameBytes(p.nodeId, other.nodeId));
}

async function stopAll(...nodes: Node[]): Promise<void> {
  await Promise.all(nodes.map((n) => n.discovery.stop()));
}

/** Whether a datagram sent to a group from 127.0.0.1 reaches a socket joined on 127.0.0.1. */
async function probeLoopbackMulticast(): Promise<string | null> {
  const port = freeUdpPort();
  let receiver: Deno.DatagramConn | undefined;
  let sender: Deno.DatagramConn | undefined;
  try {
    receiver = Deno.listenDatagram({
      transport: "udp",
      hostname: GROUP,
      port,
      reuseAddress: true,
    });
    await receiver.joinMulticastV4(GROUP, "127.0.0.1");
    sender = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
    const received = receiver.receive();
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<null>((resolve) => timer = setTimeout(() => resolve(null), 3000));
    for (let i = 0; i < 3; i++) {
      await sender.send(new Uint8Array([i]), { transport: "udp", hostname: GROUP, port });
    }
    const result = await Promise.race([received, timeout]);
    clearTimeout(timer);
    receiver.close();
    receiver = undefined;
    await received.catch(() => {});
    return result === null ? "no datagram arrived within 3 s" : null;
  } catch (error) {
    return String(error);
  } finally {
    receiver?.close();
    sender?.close();
  }
}

const multicastProblem = await probeLoopbackMulticast();
if (multicastProblem !== null) {
  console.warn(`MULTICAST ON LOOPBACK DOES NOT WORK HERE (${multicastProblem}): test skipped`);
}

Deno.test("discovery: parses host:port", () => {
  assert.deepEqual(parseHostPort("127.0.0.1:7070"), { hostname: "127.0.0.1", port: 7070 });
  assert.deepEqual(parseHostPort("build-1.lan:1"), { hostname: "build-1.lan", port: 1 });
  assert.deepEqual(parseHostPort("[::1]:7070"), { hostname: "::1", port: 7070 });
  for (const bad of ["127.0.0.1", "host:", ":7070", "host:0", "host:65536", "a:b:7070", ""]) {
    assert.throws(() => parseHostPort(bad), /expected host:port/, bad);
  }
});

Deno.test("discovery: two nodes find each other through a static peer", async () => {
  const a = makeNode({ syncPort: 40001, httpPort: 40002 });
  await a.discovery.start();
  const b = makeNode({
    syncPort: 40011,
    httpPort: 0,
    staticPeers: [`127.0.0.1:${a.discovery.port}`],
  });
  try {
    await b.discovery.start();
    await waitFor("both peers", () => !!peerOf(a, b) && !!peerOf(b, a));
    // A learned B from B's unicast announce; B learned A only from A's reply (A has no
    // static peers and multicast is off).
    assert.deepEqual(peerOf(a, b), {
      topic: "team",
      nodeId: b.nodeId,
      address: "127.0.0.1",
      syncPort: 40011,
      httpPort: 0,
      via: "static",
    });
    assert.deepEqual(peerOf(b, a), {
      topic: "team",
      nodeId: a.nodeId,
      address: "127.0.0.1",
      syncPort: 40001,
      httpPort: 40002,
      via: "static",
    });
    assert.ok(a.discovery.counters.replies >= 1);
    assert.equal(b.discovery.counters.replies, 0, "replies are not answered");
    assert.ok(a.peers.every((p) => !sameBytes(p.nodeId, a.nodeId)), "own beacons ignored");
  } finally {
    await stopAll(a, b);
  }
  assert.deepEqual(a.logs, []);
  assert.deepEqual(b.logs, []);
});

Deno.test("discovery: two nodes that list each other as static peers", async () => {
  const [portA, portB] = [freeUdpPort(), freeUdpPort()];
  const a = makeNode({
    syncPort: 41001,
    discoveryPort: portA,
    staticPeers: [`localhost:${portB}`],
  });
  const b = makeNode({
    syncPort: 41011,
    discoveryPort: portB,
    staticPeers: [`127.0.0.1:${portA}`],
  });
  try {
    await a.discovery.start();
    await b.discovery.start();
    await waitFor("both peers", () => !!peerOf(a, b) && !!peerOf(b, a));
    assert.equal(peerOf(a, b)?.syncPort, 41011);
    assert.equal(peerOf(b, a)?.syncPort, 41001);
  } finally {
    await stopAll(a, b);
  }
});

Deno.test("discovery: a second node on the same discovery port fails clearly", async () => {
  const a = makeNode({ syncPort: 42001 });
  await a.discovery.start();
  const b = makeNode({ syncPort: 42011, discoveryPort: a.discovery.port });
  try {
    await assert.rejects(() => b.discovery.start(), (error: unknown) => {
      assert.ok(error instanceof UsageError);
      assert.match(error.message, /^Cannot bind UDP 127\.0\.0\.1:\d+: address already in use/);
      return true;
    });
  } finally {
    await stopAll(a, b);
  }
});

Deno.test({
  name: multicastProblem === null
    ? "discovery: two nodes find each other by multicast on loopback"
    : `discovery: multicast on loopback SKIPPED: ${multicastProblem}`,
  ignore: multicastProblem !== null,
  fn: async () => {
    // The production arrangement: unicast and multicast share the discovery port, and both
    // nodes on one host use the same port (reuseAddress).
    const port = freeUdpPort();
    const multicast = { enabled: true, group: GROUP, interfaceAddress: "127.0.0.1" };
    const a = makeNode({ syncPort: 43001, httpPort: 43002, discoveryPort: port, multicast });
    const b = makeNode({ syncPort: 43011, httpPort: 43012, discoveryPort: port, multicast });
    try {
      await a.discovery.start();
      await b.discovery.start();
      await waitFor("both peers", () => !!peerOf(a, b) && !!peerOf(b, a));
      assert.deepEqual(peerOf(a, b), {
        topic: "team",
        nodeId: b.nodeId,
        address: "127.0.0.1",
        syncPort: 43011,
        httpPort: 43012,
        via: "multicast",
      });
      assert.equal(peerOf(b, a)?.syncPort, 43001);
      assert.equal(peerOf(b, a)?.via, "multicast");
      await waitFor("own beacons heard", () => a.discovery.counters.self > 0);
      assert.ok(a.peers.every((p) => !sameBytes(p.nodeId, a.nodeId)), "own beacons ignored");
      assert.equal(a.discovery.counters.replies, 0, "multicast announces get no reply");
    } finally {
      await stopAll(a, b);
    }
  },
});

Deno.test("discovery: a node with another topic learns nothing", async () => {
  const port = freeUdpPort();
  const multicast = {
    enabled: multicastProblem === null,
    group: GROUP,
    interfaceAddress: "127.0.0.1",
    port,
  };
  const a = makeNode({ syncPort: 44001, multicast });
  await a.discovery.start();
  const c = makeNode({
    syncPort: 44011,
    topics: [OTHER],
    multicast,
    staticPeers: [`127.0.0.1:${a.discovery.port}`],
  });
  try {
    await c.discovery.start();
    await waitFor("a's MAC drops", () => a.discovery.counters.mac >= 6);
    if (multicastProblem === null) {
      await waitFor("c's MAC drops", () => c.discovery.counters.mac >= 3);
    }
    assert.deepEqual(a.peers, []);
    assert.deepEqual(c.peers, []);
    assert.equal(a.discovery.counters.replies, 0);
    assert.equal(a.discovery.counters.accepted, 0);
  } finally {
    await stopAll(a, c);
  }
});

Deno.test("discovery: hostile datagrams are dropped and the node keeps discovering", async () => {
  const a = makeNode({ syncPort: 45001, httpPort: 45002 });
  await a.discovery.start();
  const raw = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  const target = { transport: "udp" as const, hostname: "127.0.0.1", port: a.discovery.port };
  const send = (bytes: Uint8Array) => raw.send(bytes, target);
  const fakeId = randomId();
  const craft = (overrides: Partial<EncodeBeaconOptions> = {}) =>
    encodeBeacon({
      kind: "announce",
      channel: "unicast",
      nodeId: fakeId,
      syncPort: 45101,
      httpPort: 0,
      beaconKey: TOPIC.beaconKey,
      now: Date.now(),
      nonce: crypto.getRandomValues(new Uint8Array(16)),
      ...overrides,
    });
  let b: Node | undefined;
  try {
    const valid = craft();
    const flipped = craft();
    flipped[50] ^= 0x01;
    const hostile: [string, Uint8Array][] = [
      ["empty", new Uint8Array(0)],
      ["garbage", crypto.getRandomValues(new Uint8Array(BEACON_SIZE))],
      ["short garbage", new TextEncoder().encode("GET / HTTP/1.1\r\n\r\n")],
      ["truncated", valid.subarray(0, BEACON_SIZE - 1)],
      ["oversize by one", new Uint8Array([...valid, 0])],
      ["oversize", new Uint8Array(9000).fill(0x41)],
      ["huge", new Uint8Array(65_000)],
      ["wrong MAC (other topic)", craft({ beaconKey: OTHER.beaconKey })],
      ["flipped bit", flipped],
      ["two windows old", craft({ now: Date.now() - 61_000 })],
      ["multicast beacon by unicast", craft({ channel: "multicast" })],
    ];
    for (const [, bytes] of hostile) await send(bytes);
    await send(valid);
    await send(valid); // replay
    await send(valid.slice()); // replay again
    // A marker from another id, sent last: once it is seen, everything before was handled.
    const markerId = randomId();
    await send(craft({ nodeId: markerId }));
    await waitFor("the marker", () => a.peers.some((p) => sameBytes(p.nodeId, markerId)));

    const counters = a.discovery.counters;
    assert.equal(counters.malformed, 7, "empty, garbage, short, truncated, 3 oversize");
    assert.equal(counters.mac, 2, "other topic, flipped bit");
    assert.equal(counters.window, 1);
    assert.equal(counters.channel, 1);
    assert.equal(counters.replay, 2);
    assert.equal(counters.accepted, 2, "the valid beacon once, the marker");
    assert.equal(a.peers.filter((p) => sameBytes(p.nodeId, fakeId)).length, 1);

    // The valid unicast announces were answered with replies that prove the topic key.
    const replies: Uint8Array[] = [];
    const verifier = new BeaconVerifier({ topics: [TOPIC], now: Date.now });
    while (replies.length < 2) {
      const [data] = await raw.receive();
      const result = verifier.verify(data, { channel: "unicast" });
      assert.ok(result, `reply verifies (${verifier.lastDrop})`);
      replies.push(data);
    }
    const reply = decodeBeacon(replies[0]);
    assert.equal(reply.kind, "reply");
    assert.deepEqual(reply.nodeId, a.nodeId);
    assert.equal(reply.syncPort, 45001);
    assert.equal(reply.httpPort, 45002);

    // Still discovering: a real node finds A and is found.
    b = makeNode({ syncPort: 45011, staticPeers: [`127.0.0.1:${a.discovery.port}`] });
    await b.discovery.start();
    await waitFor("both peers", () => !!peerOf(a, b!) && !!peerOf(b!, a));
  } finally {
    raw.close();
    await stopAll(a, ...(b ? [b] : []));
  }
});

Deno.test("discovery: stop closes the sockets and start can bind the port again", async () => {
  const a = makeNode({ syncPort: 46001 });
  await a.discovery.start();
  const port = a.discovery.port;
  await a.discovery.stop();
  await a.discovery.stop(); // idempotent
  const again = makeNode({ syncPort: 46001, discoveryPort: port });
  await again.discovery.start();
  assert.equal(again.discovery.port, port);
  await again.discovery.stop();
});

Deno.test("discovery: invalid options are refused", () => {
  const base = { topics: [TOPIC], nodeId: randomId(), syncPort: 1 };
  assert.throws(() => new Discovery({ ...base, nodeId: new Uint8Array(8) }), /node id/);
  assert.throws(() => new Discovery({ ...base, topics: [] }), /at least one topic/);
  assert.throws(() => new Discovery({ ...base, topics: [TOPIC, TOPIC] }), /distinct names/);
  assert.throws(() => new Discovery({ ...base, syncPort: 0 }), /sync port/);
  assert.throws(() => new Discovery({ ...base, staticPeers: ["nohost"] }), /host:port/);
  assert.throws(
    () => new Discovery({ ...base, multicast: { group: "10.0.0.1" } }),
    /not an IPv4 multicast address/,
  );
  assert.throws(
    () => new Discovery({ ...base, discoveryPort: 0 }),
    /multicast port/,
    "multicast needs a fixed port",
  );
});
