/**
 * The secure channel over both an in-memory duplex pair and real TCP on 127.0.0.1: the
 * handshake (each side sees the other's static key), a different PSK failing on both sides
 * with nothing delivered, messages of 0 B to 5 MiB in order, rekeying across a small cap
 * (and failing when the two caps differ, which proves the rekey happens), message size
 * limits, clean close, and the handshake timeout. Then a real listener attacked by raw
 * TCP clients (garbage, a 0xffffffff length prefix, half a frame then silence, silence,
 * an immediate close, a forged handshake) that keeps serving real clients afterwards.
 * @module
 */

import assert from "node:assert/strict";
import { ProtocolError } from "../../src/errors.ts";
import { encodeFrame } from "../../src/net/framing.ts";
import { generateStaticKeyPair, NoiseHandshake } from "../../src/net/noise.ts";
import {
  type DuplexConn,
  MAX_FRAGMENT_SIZE,
  memoryDuplexPair,
  openSecureChannel,
  SECURE_CHANNEL_PROLOGUE,
  type SecureChannel,
  type SecureChannelOptions,
} from "../../src/net/secure_channel.ts";
import { deriveTopicKeys } from "../../src/net/topic.ts";

const KEY_A = generateStaticKeyPair();
const KEY_B = generateStaticKeyPair();
const PSK = deriveTopicKeys("secure channel test topic").psk;
const OTHER_PSK = deriveTopicKeys("another topic").psk;

type Transport = () => Promise<{ client: DuplexConn; server: DuplexConn }>;

const TRANSPORTS: Record<string, Transport> = {
  memory: () => {
    const [client, server] = memoryDuplexPair();
    return Promise.resolve({ client, server });
  },
  tcp: async () => {
    const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    try {
      const [server, client] = await Promise.all([
        listener.accept(),
        Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port }),
      ]);
      return { client, server };
    } finally {
      listener.close();
    }
  },
};

type Overrides = Partial<SecureChannelOptions>;

async function openPair(
  transport: Transport,
  a: Overrides = {},
  b: Overrides = {},
): Promise<[PromiseSettledResult<SecureChannel>, PromiseSettledResult<SecureChannel>]> {
  const { client, server } = await transport();
  return await Promise.allSettled([
    openSecureChannel(client, { initiator: true, staticKey: KEY_A, psk: PSK, ...a }),
    openSecureChannel(server, { initiator: false, staticKey: KEY_B, psk: PSK, ...b }),
  ]);
}

async function openOk(
  transport: Transport,
  a: Overrides = {},
  b: Overrides = {},
): Promise<[SecureChannel, SecureChannel]> {
  const [ra, rb] = await openPair(transport, a, b);
  if (ra.status === "rejected" || rb.status === "rejected") {
    if (ra.status === "fulfilled") await ra.value.close();
    if (rb.status === "fulfilled") await rb.value.close();
    throw ra.status === "rejected" ? ra.reason : (rb as PromiseRejectedResult).reason;
  }
  return [ra.value, rb.value];
}

function pattern(size: number, seed: number): Uint8Array {
  const out = new Uint8Array(size);
  let x = seed * 2654435761 + 1;
  for (let i = 0; i < size; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    out[i] = x >>> 24;
  }
  return out;
}

/** Sends all `messages` from `from` while `to` receives them; checks every byte. */
async function exchange(from: SecureChannel, to: SecureChannel, messages: Uint8Array[]) {
  const sending = Promise.all(messages.map((m) => from.send(m)));
  for (const [i, expected] of messages.entries()) {
    const got = await to.receive();
    assert.ok(got !== null, `message ${i} missing`);
    assert.equal(got.length, expected.length, `message ${i} length`);
    assert.deepEqual(got, expected, `message ${i}`);
  }
  await sending;
}

async function assertProtocolError(promise: Promise<unknown>, pattern?: RegExp): Promise<void> {
  await assert.rejects(promise, (error) => {
    assert.ok(error instanceof ProtocolError, `expected ProtocolError, got ${error}`);
    if (pattern) assert.match(error.message, pattern);
    return true;
  });
}

for (const [name, transport] of Object.entries(TRANSPORTS)) {
  Deno.test(`secure channel (${name}): handshake, each side sees the other's key`, async () => {
    const [a, b] = await openOk(transport);
    assert.deepEqual(a.remoteStatic, KEY_B.publicKey);
    assert.deepEqual(b.remoteStatic, KEY_A.publicKey);
    assert.deepEqual(a.handshakeHash, b.handshakeHash);
    assert.equal(a.handshakeHash.length, 64);
    await Promise.all([a.close(), b.close()]);
  });

  Deno.test(`secure channel (${name}): a different PSK fails on both sides`, async () => {
    const [ra, rb] = await openPair(transport, { psk: OTHER_PSK });
    assert.equal(ra.status, "rejected");
    assert.equal(rb.status, "rejected");
    assert.ok(ra.reason instanceof ProtocolError);
    assert.ok(rb.reason instanceof ProtocolError);
    // The responder finds the bad message 3; the initiator gets no key confirmation.
    assert.match(rb.reason.message, /not authentic/);
    assert.match(ra.reason.message, /without confirming the keys/);
    // A different prologue (another protocol version) fails the same way.
    const [rc, rd] = await openPair(transport, { prologue: Uint8Array.of(1) });
    assert.equal(rc.status, "rejected");
    assert.equal(rd.status, "rejected");
  });

  Deno.test(`secure channel (${name}): messages of 0 B to 5 MiB round-trip in order`, async () => {
    const [a, b] = await openOk(transport);
    const sizes = [0, 1, 65 * 1024, MAX_FRAGMENT_SIZE, MAX_FRAGMENT_SIZE + 1, 5 * 1024 * 1024];
    const messages = sizes.map((size, i) => pattern(size, i));
    await exchange(a, b, messages);
    await exchange(b, a, messages);
    // Both directions at once, many small messages interleaved with large ones.
    const many = Array.from({ length: 200 }, (_, i) => pattern(i % 50 === 0 ? 200_000 : i, i));
    await Promise.all([exchange(a, b, many), exchange(b, a, many.slice().reverse())]);
    // The sender may reuse its buffer once send() has returned.
    const buffer = pattern(1000, 7);
    const expected = buffer.slice();
    const sent = a.send(buffer);
    buffer.fill(0);
    await sent;
    assert.deepEqual(await b.receive(), expected);
    await Promise.all([a.close(), b.close()]);
  });

  Deno.test(`secure channel (${name}): rekey across a small cap keeps working`, async () => {
    const [a, b] = await openOk(transport, { maxMessagesPerKey: 10 }, { maxMessagesPerKey: 10 });
    const messages = Array.from({ length: 95 }, (_, i) => pattern(i * 3, i));
    await exchange(a, b, messages);
    await exchange(b, a, messages);
    // A 5 MiB message is 81 transport messages: 8 rekeys inside one message.
    const big = [pattern(5 * 1024 * 1024, 1), pattern(3, 2)];
    await exchange(a, b, big);
    await exchange(b, a, big);
    await Promise.all([a.close(), b.close()]);
  });

  Deno.test(`secure channel (${name}): different rekey caps fail where they diverge`, async () => {
    const [a, b] = await openOk(transport, { maxMessagesPerKey: 10 }, { maxMessagesPerKey: 11 });
    // a's sending key changes after its 10th message; b keeps the old one for an 11th.
    const messages = Array.from({ length: 10 }, (_, i) => pattern(5, i));
    await exchange(a, b, messages);
    await a.send(pattern(5, 10)).catch(() => {});
    await assertProtocolError(b.receive(), /not authentic/);
    await b.closed;
    await a.close();
  });

  Deno.test(`secure channel (${name}): message size limits`, async () => {
    const [a, b] = await openOk(transport, { maxMessageSize: 100_000 }, {
      maxMessageSize: 70_000,
    });
    await assertProtocolError(a.send(new Uint8Array(100_001)), /Message too large/);
    await a.send(new Uint8Array(70_000));
    assert.equal((await b.receive())?.length, 70_000);
    // b refuses what it receives over its own limit and drops the connection.
    await a.send(new Uint8Array(70_001));
    await assertProtocolError(b.receive(), /Message too large/);
    await b.closed;
    await a.close();
  });

  Deno.test(`secure channel (${name}): clean close, the peer sees null`, async () => {
    const [a, b] = await openOk(transport);
    await a.send(Uint8Array.of(1));
    await a.send(Uint8Array.of(2));
    const receiving = b.receive();
    await a.close();
    // Messages sent before the close arrive first, then null, forever.
    assert.deepEqual(await receiving, Uint8Array.of(1));
    assert.deepEqual(await b.receive(), Uint8Array.of(2));
    assert.equal(await b.receive(), null);
    assert.equal(await b.receive(), null);
    await b.closed;
    await a.closed;
    assert.equal(await a.receive(), null);
    await assertProtocolError(a.send(Uint8Array.of(3)), /closed/);
    await assertProtocolError(b.send(Uint8Array.of(3)), /closed/);
    await b.close();
    await a.close();

    // Both sides closing at once; a pending receive on the closer gets null too.
    const [c, d] = await openOk(transport);
    const pending = c.receive();
    await Promise.all([c.close(), d.close()]);
    assert.equal(await pending, null);
    assert.equal(await d.receive(), null);
  });

  Deno.test(`secure channel (${name}): a silent peer is dropped after the timeout`, async () => {
    const { client, server } = await transport();
    // The client connects and sends nothing.
    await assertProtocolError(
      openSecureChannel(server, {
        initiator: false,
        staticKey: KEY_B,
        psk: PSK,
        handshakeTimeoutMs: 100,
      }),
      /timed out after 100 ms/,
    );
    // The client sees the connection end.
    const reader = client.readable.getReader();
    const end = await reader.read().catch(() => ({ done: true }));
    assert.equal(end.done, true);
    reader.releaseLock();
    closeQuietly(client);

    // Half a handshake: the responder answers message 1, the initiator never gets message 3
    // through (a raw initiator that stops after message 1).
    const pair = await transport();
    const hs = new NoiseHandshake({
      initiator: true,
      staticKey: KEY_A,
      psk: PSK,
      prologue: SECURE_CHANNEL_PROLOGUE,
    });
    const writer = pair.client.writable.getWriter();
    await writer.write(encodeFrame(hs.writeMessage()));
    await assertProtocolError(
      openSecureChannel(pair.server, {
        initiator: false,
        staticKey: KEY_B,
        psk: PSK,
        handshakeTimeoutMs: 150,
      }),
      /timed out/,
    );
    writer.releaseLock();
    closeQuietly(pair.client);
  });
}

// --- a real listener under attack ---------------------------------------------------------

interface Outcome {
  error?: unknown;
  remoteStatic?: Uint8Array;
  echoed?: number;
}

/** A TCP listener that runs a responder handshake per connection and echoes messages. */
function startEchoServer(options: Overrides) {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const outcomes: Promise<Outcome>[] = [];
  const arrivals: ((outcome: Promise<Outcome>) => void)[] = [];
  const pending: Promise<Outcome>[] = [];
  async function handle(conn: Deno.TcpConn): Promise<Outcome> {
    try {
      const channel = await openSecureChannel(conn, {
        initiator: false,
        staticKey: KEY_B,
        psk: PSK,
        ...options,
      });
      let echoed = 0;
      while (true) {
        const message = await channel.receive();
        if (message === null) break;
        await channel.send(message);
        echoed++;
      }
      await channel.close();
      return { remoteStatic: channel.remoteStatic, echoed };
    } catch (error) {
      return { error };
    }
  }
  const loop = (async () => {
    for await (const conn of listener) {
      const outcome = handle(conn);
      outcomes.push(outcome);
      const arrival = arrivals.shift();
      if (arrival) arrival(outcome);
      else pending.push(outcome);
    }
  })();
  return {
    port: listener.addr.port,
    /** The outcome of the next accepted connection. */
    next(): Promise<Outcome> {
      const ready = pending.shift();
      if (ready) return ready;
      return new Promise<Promise<Outcome>>((resolve) => arrivals.push(resolve)).then((p) => p);
    },
    async stop(): Promise<void> {
      listener.close();
      await loop;
      await Promise.all(outcomes);
    },
  };
}

/** Writes `bytes` raw, then reads until the server ends the connection. */
async function rawClient(
  port: number,
  bytes: Uint8Array[],
  options: { closeAfterWrite?: boolean } = {},
) {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    for (const chunk of bytes) await conn.write(chunk);
    if (options.closeAfterWrite) return;
    const buffer = new Uint8Array(4096);
    while (true) {
      const n = await conn.read(buffer).catch(() => null);
      if (n === null) break;
    }
  } finally {
    closeQuietly(conn);
  }
}

function closeQuietly(conn: DuplexConn): void {
  try {
    conn.close();
  } catch {
    // Deno closes a TcpConn by itself once it has read the end of stream.
  }
}

function assertRefused(outcome: Outcome, pattern: RegExp): void {
  assert.ok(outcome.error instanceof ProtocolError, `expected ProtocolError, got ${outcome.error}`);
  assert.match(outcome.error.message, pattern);
}

async function realClient(port: number): Promise<void> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  const channel = await openSecureChannel(conn, { initiator: true, staticKey: KEY_A, psk: PSK });
  assert.deepEqual(channel.remoteStatic, KEY_B.publicKey);
  for (const size of [0, 1, 100_000]) {
    const message = pattern(size, size);
    await channel.send(message);
    assert.deepEqual(await channel.receive(), message);
  }
  await channel.close();
}

Deno.test("secure channel (tcp): hostile raw clients leave the listener serving", async () => {
  const server = startEchoServer({ handshakeTimeoutMs: 300 });
  try {
    // A real client first.
    await realClient(server.port);
    const first = await server.next();
    assert.equal(first.error, undefined);
    assert.deepEqual(first.remoteStatic, KEY_A.publicKey);
    assert.equal(first.echoed, 3);

    // Text garbage: "GET / HTTP/1.1" reads as a 1.2 GB length.
    await rawClient(server.port, [new TextEncoder().encode("GET / HTTP/1.1\r\nHost: x\r\n\r\n")]);
    assertRefused(await server.next(), /Frame too large: 1195725856 bytes/);

    // The largest length prefix.
    await rawClient(server.port, [Uint8Array.of(0xff, 0xff, 0xff, 0xff)]);
    assertRefused(await server.next(), /Frame too large: 4294967295 bytes/);

    // Half a frame, then silence.
    await rawClient(server.port, [Uint8Array.of(0, 0, 0, 64, 1, 2, 3, 4, 5)]);
    assertRefused(await server.next(), /timed out after 300 ms/);

    // Nothing at all.
    await rawClient(server.port, []);
    assertRefused(await server.next(), /timed out/);

    // Connect and close at once.
    await rawClient(server.port, [], { closeAfterWrite: true });
    assertRefused(await server.next(), /closed the connection before message 1/);

    // A frame too short for message 1, and half a frame then close.
    await rawClient(server.port, [encodeFrame(new Uint8Array(10))]);
    assertRefused(await server.next(), /too short/);
    await rawClient(server.port, [Uint8Array.of(0, 0, 0, 64, 1)], { closeAfterWrite: true });
    assertRefused(await server.next(), /Stream ended inside a frame/);

    // Random garbage framed as message 1 (key and tag: the tag fails).
    await rawClient(server.port, [encodeFrame(crypto.getRandomValues(new Uint8Array(48)))]);
    assertRefused(await server.next(), /not authentic/);

    // A real message 1, then garbage as message 3 (the server has answered message 2).
    const opener = new NoiseHandshake({
      initiator: true,
      staticKey: KEY_A,
      psk: PSK,
      prologue: SECURE_CHANNEL_PROLOGUE,
    });
    await rawClient(server.port, [
      encodeFrame(opener.writeMessage()),
      encodeFrame(crypto.getRandomValues(new Uint8Array(64))),
    ]);
    assertRefused(await server.next(), /not authentic/);

    // A handshake with the wrong PSK, driven by hand.
    {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: server.port });
      const hs = new NoiseHandshake({
        initiator: true,
        staticKey: KEY_A,
        psk: OTHER_PSK,
        prologue: SECURE_CHANNEL_PROLOGUE,
      });
      await conn.write(encodeFrame(hs.writeMessage()));
      // Read message 2 (length-prefixed), answer with message 3 and a transport message.
      const header = new Uint8Array(4);
      let got = 0;
      const chunks: Uint8Array[] = [];
      const buffer = new Uint8Array(4096);
      while (true) {
        const n = await conn.read(buffer);
        assert.ok(n !== null);
        chunks.push(buffer.slice(0, n));
        got += n;
        if (got >= 4) {
          const all = new Uint8Array(got);
          let o = 0;
          for (const c of chunks) all.set(c, (o += c.length) - c.length);
          header.set(all.subarray(0, 4));
          const length = new DataView(header.buffer).getUint32(0);
          if (got >= 4 + length) {
            hs.readMessage(all.subarray(4, 4 + length));
            break;
          }
        }
      }
      await conn.write(encodeFrame(hs.writeMessage()));
      const { send } = hs.split();
      await conn.write(encodeFrame(send.encryptWithAd(new Uint8Array(0), Uint8Array.of(0, 42))))
        .catch(() => {});
      const n = await conn.read(buffer).catch(() => null);
      assert.equal(n, null, "the server answers nothing and closes");
      closeQuietly(conn);
      const outcome = await server.next();
      assertRefused(outcome, /not authentic/);
      assert.equal(outcome.echoed, undefined, "no application message was delivered");
    }

    // Still serving: several real clients at once.
    await Promise.all([1, 2, 3].map(() => realClient(server.port)));
    for (let i = 0; i < 3; i++) {
      const outcome = await server.next();
      assert.equal(outcome.error, undefined);
      assert.equal(outcome.echoed, 3);
    }
  } finally {
    await server.stop();
  }
});
