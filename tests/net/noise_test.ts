/**
 * The Noise state machine against the published test vectors in
 * tests/vectors/noise.json (cacophony and snow: XX and XXpsk3 with
 * 25519/ChaChaPoly/BLAKE2b), every handshake and transport ciphertext byte for byte with
 * our code playing both the initiator and the responder, plus hostile cases: wrong PSK,
 * tampered and truncated messages, calls out of turn, low-order keys, nonce exhaustion,
 * rekey.
 * @module
 */

import assert from "node:assert/strict";
import { createCipheriv, createHash, createHmac } from "node:crypto";
import { FormatError, ProtocolError } from "../../src/errors.ts";
import {
  CipherState,
  generateStaticKeyPair,
  NOISE_MAX_MESSAGE_SIZE,
  NoiseHandshake,
  type NoisePattern,
  type TransportCiphers,
  x25519,
  x25519PublicKey,
} from "../../src/net/noise.ts";

interface VectorMessage {
  payload: string;
  ciphertext: string;
}

interface Vector {
  protocol_name: string;
  init_prologue: string;
  init_psks?: string[];
  init_static: string;
  init_ephemeral: string;
  resp_prologue: string;
  resp_psks?: string[];
  resp_static: string;
  resp_ephemeral: string;
  handshake_hash?: string;
  messages: VectorMessage[];
}

/** The published vectors, copied verbatim from the team's shared/vectors (provenance inside). */
const VECTORS_PATH = new URL("../vectors/noise.json", import.meta.url);

function hex(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function unhex(text: string): Uint8Array {
  const out = new Uint8Array(text.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(text.slice(2 * i, 2 * i + 2), 16);
  return out;
}

async function loadVectors(): Promise<Vector[]> {
  return JSON.parse(await Deno.readTextFile(VECTORS_PATH)).vectors;
}

function patternOf(protocolName: string): NoisePattern {
  const match = /^Noise_(XX|XXpsk3)_25519_ChaChaPoly_BLAKE2b$/.exec(protocolName);
  assert.ok(match, `unexpected protocol ${protocolName}`);
  return match[1] as NoisePattern;
}

const EMPTY = new Uint8Array(0);

function runVector(vector: Vector): void {
  const pattern = patternOf(vector.protocol_name);
  const psk = (list?: string[]) => (list && list.length > 0 ? unhex(list[0]) : undefined);
  const initiator = new NoiseHandshake({
    initiator: true,
    pattern,
    prologue: unhex(vector.init_prologue),
    staticKey: { privateKey: unhex(vector.init_static) },
    ephemeral: { privateKey: unhex(vector.init_ephemeral) },
    psk: psk(vector.init_psks),
  });
  const responder = new NoiseHandshake({
    initiator: false,
    pattern,
    prologue: unhex(vector.resp_prologue),
    staticKey: { privateKey: unhex(vector.resp_static) },
    ephemeral: { privateKey: unhex(vector.resp_ephemeral) },
    psk: psk(vector.resp_psks),
  });
  const HANDSHAKE_MESSAGES = 3;
  assert.ok(vector.messages.length > HANDSHAKE_MESSAGES);
  let transport: { init: TransportCiphers; resp: TransportCiphers } | null = null;
  vector.messages.forEach((message, i) => {
    const fromInitiator = i % 2 === 0;
    const payload = unhex(message.payload);
    const expected = message.ciphertext;
    if (i < HANDSHAKE_MESSAGES) {
      const [writer, reader] = fromInitiator ? [initiator, responder] : [responder, initiator];
      assert.equal(writer.nextAction, "write");
      assert.equal(reader.nextAction, "read");
      const ciphertext = writer.writeMessage(payload);
      assert.equal(hex(ciphertext), expected, `handshake message ${i}`);
      assert.equal(hex(reader.readMessage(ciphertext)), message.payload, `payload ${i}`);
      if (i === HANDSHAKE_MESSAGES - 1) {
        assert.ok(initiator.complete && responder.complete);
        assert.deepEqual(initiator.handshakeHash, responder.handshakeHash);
        if (vector.handshake_hash !== undefined) {
          assert.equal(hex(initiator.handshakeHash), vector.handshake_hash);
        }
        assert.deepEqual(initiator.remoteStatic, x25519PublicKey(unhex(vector.resp_static)));
        assert.deepEqual(responder.remoteStatic, x25519PublicKey(unhex(vector.init_static)));
        transport = { init: initiator.split(), resp: responder.split() };
      } else {
        assert.ok(!initiator.complete && !responder.complete);
      }
    } else {
      assert.ok(transport);
      const [send, receive] = fromInitiator
        ? [transport.init.send, transport.resp.receive]
        : [transport.resp.send, transport.init.receive];
      const ciphertext = send.encryptWithAd(EMPTY, payload);
      assert.equal(hex(ciphertext), expected, `transport message ${i}`);
      assert.equal(hex(receive.decryptWithAd(EMPTY, ciphertext)), message.payload);
    }
  });
}

Deno.test("noise: every published vector, byte for byte, both roles", async (t) => {
  const vectors = await loadVectors();
  const names = new Set(vectors.map((v) => v.protocol_name));
  assert.ok(names.has("Noise_XX_25519_ChaChaPoly_BLAKE2b"));
  assert.ok(names.has("Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b"));
  for (const [i, vector] of vectors.entries()) {
    await t.step(`vector ${i}: ${vector.protocol_name}`, () => runVector(vector));
  }
});

Deno.test("noise: node's HMAC-BLAKE2b equals HMAC written out over BLAKE2b-512", () => {
  for (const keyLength of [0, 32, 64, 128, 129, 200]) {
    const key = new Uint8Array(keyLength).map((_, i) => (i * 31 + 7) & 0xff);
    const data = new TextEncoder().encode(`data for key of ${keyLength} bytes`);
    const block = new Uint8Array(128);
    block.set(keyLength > 128 ? createHash("blake2b512").update(key).digest() : key);
    const inner = createHash("blake2b512").update(block.map((b) => b ^ 0x36)).update(data)
      .digest();
    const manual = createHash("blake2b512").update(block.map((b) => b ^ 0x5c)).update(inner)
      .digest();
    assert.deepEqual(createHmac("blake2b512", key).update(data).digest(), manual);
  }
});

function pair(options: { pskA?: Uint8Array; pskB?: Uint8Array; pattern?: NoisePattern } = {}) {
  const psk = new Uint8Array(32).fill(1);
  const pattern = options.pattern ?? "XXpsk3";
  const usePsk = pattern === "XXpsk3";
  const a = new NoiseHandshake({
    initiator: true,
    pattern,
    staticKey: generateStaticKeyPair(),
    psk: usePsk ? options.pskA ?? psk : undefined,
  });
  const b = new NoiseHandshake({
    initiator: false,
    pattern,
    staticKey: generateStaticKeyPair(),
    psk: usePsk ? options.pskB ?? psk : undefined,
  });
  return { a, b };
}

Deno.test("noise: random keys complete a handshake and exchange transport messages", () => {
  const staticA = generateStaticKeyPair();
  const staticB = generateStaticKeyPair();
  assert.deepEqual(x25519PublicKey(staticA.privateKey), staticA.publicKey);
  assert.deepEqual(
    x25519(staticA.privateKey, staticB.publicKey),
    x25519(
      staticB.privateKey,
      staticA.publicKey,
    ),
  );
  const psk = new Uint8Array(32).fill(9);
  const a = new NoiseHandshake({ initiator: true, staticKey: staticA, psk });
  const b = new NoiseHandshake({ initiator: false, staticKey: staticB, psk });
  assert.equal(a.remoteStatic, null);
  assert.deepEqual(b.readMessage(a.writeMessage(Uint8Array.of(1))), Uint8Array.of(1));
  assert.deepEqual(a.readMessage(b.writeMessage(Uint8Array.of(2))), Uint8Array.of(2));
  assert.deepEqual(a.remoteStatic, staticB.publicKey);
  assert.deepEqual(b.readMessage(a.writeMessage(Uint8Array.of(3))), Uint8Array.of(3));
  assert.deepEqual(b.remoteStatic, staticA.publicKey);
  assert.equal(a.nextAction, "done");
  const ta = a.split();
  const tb = b.split();
  assert.throws(() => a.split(), ProtocolError);
  for (let i = 0; i < 5; i++) {
    const m = new Uint8Array(i * 100).fill(i);
    assert.deepEqual(tb.receive.decryptWithAd(EMPTY, ta.send.encryptWithAd(EMPTY, m)), m);
    assert.deepEqual(ta.receive.decryptWithAd(EMPTY, tb.send.encryptWithAd(EMPTY, m)), m);
  }
});

Deno.test("noise: a wrong PSK fails at message 3 on the responder", () => {
  const { a, b } = pair({ pskA: new Uint8Array(32).fill(1), pskB: new Uint8Array(32).fill(2) });
  // Messages 1 and 2 carry nothing that depends on the PSK (it is mixed in at the end of 3).
  b.readMessage(a.writeMessage());
  a.readMessage(b.writeMessage());
  const m3 = a.writeMessage();
  assert.ok(a.complete, "the initiator cannot tell: the channel needs a key confirmation");
  assert.throws(
    () => b.readMessage(m3),
    (e) => e instanceof ProtocolError && /authentic/.test(e.message),
  );
  assert.equal(b.complete, false);
  assert.equal(b.nextAction, "failed");
  assert.throws(() => b.readMessage(m3), /failed earlier/);
  assert.throws(() => b.split(), ProtocolError);
  // Same PSK but different prologue fails at once: in psk mode `e` calls MixKey, so even
  // message 1's payload is encrypted, with the handshake hash (prologue included) as AD.
  const psk = new Uint8Array(32);
  const c = new NoiseHandshake({
    initiator: true,
    staticKey: generateStaticKeyPair(),
    psk,
    prologue: Uint8Array.of(1),
  });
  const d = new NoiseHandshake({
    initiator: false,
    staticKey: generateStaticKeyPair(),
    psk,
    prologue: Uint8Array.of(2),
  });
  assert.throws(() => d.readMessage(c.writeMessage()), ProtocolError);
});

Deno.test("noise: tampered, truncated and oversized messages are ProtocolErrors", () => {
  for (const index of [1, 2]) {
    for (const position of ["first", "middle", "last"] as const) {
      const { a, b } = pair();
      b.readMessage(a.writeMessage(Uint8Array.of(5, 6, 7)));
      let message = b.writeMessage(Uint8Array.of(8));
      if (index === 2) {
        a.readMessage(message);
        message = a.writeMessage(Uint8Array.of(9));
      }
      const at = position === "first" ? 0 : position === "last" ? message.length - 1 : 40;
      message[at] ^= 0x01;
      const reader = index === 1 ? a : b;
      assert.throws(() => reader.readMessage(message), ProtocolError, `${index} ${position}`);
    }
  }
  // Every truncation of message 2 and 3 fails cleanly.
  {
    const { a, b } = pair();
    b.readMessage(a.writeMessage());
    const m2 = b.writeMessage();
    for (let n = 0; n < m2.length; n++) {
      const { a: a2, b: b2 } = pair();
      b2.readMessage(a2.writeMessage());
      b2.writeMessage();
      assert.throws(() => a2.readMessage(m2.subarray(0, n)), ProtocolError);
    }
    a.readMessage(m2);
    const m3 = a.writeMessage();
    for (const n of [0, 1, 31, 47, 48, 63, m3.length - 1]) {
      const { a: a3, b: b3 } = pair();
      b3.readMessage(a3.writeMessage());
      a3.readMessage(b3.writeMessage());
      assert.throws(() => b3.readMessage(m3.subarray(0, n)), ProtocolError);
    }
  }
  // Message 1 shorter than an ephemeral key, and a message over 65535 bytes.
  {
    const { b } = pair();
    assert.throws(() => b.readMessage(new Uint8Array(31)), /too short/);
  }
  {
    const { b } = pair();
    assert.throws(() => b.readMessage(new Uint8Array(NOISE_MAX_MESSAGE_SIZE + 1)), /too long/);
  }
  {
    const { a } = pair();
    assert.throws(() => a.writeMessage(new Uint8Array(NOISE_MAX_MESSAGE_SIZE)), /too long/);
  }
  // Random garbage of every size as message 1, 2, 3 never throws anything but ProtocolError
  // (message 1 takes any 32 bytes as a key unless it is of low order).
  for (let n = 0; n < 200; n += 7) {
    const garbage = crypto.getRandomValues(new Uint8Array(n));
    const { a, b } = pair();
    try {
      b.readMessage(garbage);
    } catch (error) {
      assert.ok(error instanceof ProtocolError);
    }
    a.writeMessage();
    assert.throws(() => a.readMessage(garbage), ProtocolError);
  }
});

Deno.test("noise: low-order public keys are refused", () => {
  const zero = new Uint8Array(32);
  assert.throws(() => x25519(generateStaticKeyPair().privateKey, zero), ProtocolError);
  // An all-zero ephemeral key from the initiator: the responder's ee DH fails.
  const { b } = pair();
  assert.throws(() => {
    b.readMessage(zero);
    b.writeMessage();
  }, ProtocolError);
});

Deno.test("noise: calls out of turn are ProtocolErrors", () => {
  const { a, b } = pair();
  assert.throws(() => a.readMessage(new Uint8Array(32)), /out of order/);
  assert.throws(() => b.writeMessage(), /out of order/);
  const { a: c, b: d } = pair();
  d.readMessage(c.writeMessage());
  c.readMessage(d.writeMessage());
  d.readMessage(c.writeMessage());
  assert.throws(() => c.writeMessage(), /handshake complete/);
  assert.throws(() => d.readMessage(new Uint8Array(64)), /handshake complete/);
  assert.throws(() => a.split(), /not complete/);
});

Deno.test("noise: option validation", () => {
  const staticKey = generateStaticKeyPair();
  assert.throws(() => new NoiseHandshake({ initiator: true, staticKey }), FormatError);
  assert.throws(
    () => new NoiseHandshake({ initiator: true, staticKey, psk: new Uint8Array(31) }),
    FormatError,
  );
  assert.throws(
    () =>
      new NoiseHandshake({ initiator: true, staticKey, pattern: "XX", psk: new Uint8Array(32) }),
    FormatError,
  );
  assert.throws(
    () =>
      new NoiseHandshake({
        initiator: true,
        staticKey: { privateKey: new Uint8Array(16) },
        pattern: "XX",
      }),
    FormatError,
  );
  const { a, b } = pair({ pattern: "XX" });
  b.readMessage(a.writeMessage());
  a.readMessage(b.writeMessage());
  b.readMessage(a.writeMessage());
  assert.ok(a.complete && b.complete);
});

Deno.test("noise: nonce exhaustion guard and rekey", () => {
  const key = new Uint8Array(32).fill(3);
  const send = new CipherState(key);
  const receive = new CipherState(key);
  send.setNonce(0xffff_ffff_ffff_fffdn);
  receive.setNonce(0xffff_ffff_ffff_fffdn);
  const m = Uint8Array.of(1, 2, 3);
  assert.deepEqual(receive.decryptWithAd(EMPTY, send.encryptWithAd(EMPTY, m)), m);
  assert.deepEqual(receive.decryptWithAd(EMPTY, send.encryptWithAd(EMPTY, m)), m);
  assert.equal(send.nonce, 0xffff_ffff_ffff_ffffn);
  assert.throws(() => send.encryptWithAd(EMPTY, m), /nonce exhausted/);
  assert.throws(() => receive.decryptWithAd(EMPTY, new Uint8Array(19)), /nonce exhausted/);
  assert.throws(() => send.setNonce(1n << 64n), RangeError);

  // Rekey keeps both sides in step; the nonce does not reset; a stale key fails.
  const x = new CipherState(key);
  const y = new CipherState(key);
  const z = new CipherState(key);
  x.encryptWithAd(EMPTY, m);
  y.decryptWithAd(EMPTY, z.encryptWithAd(EMPTY, m));
  x.rekey();
  y.rekey();
  assert.equal(x.nonce, 1n);
  const after = x.encryptWithAd(EMPTY, m);
  assert.deepEqual(y.decryptWithAd(EMPTY, after), m);
  assert.throws(() => z.decryptWithAd(EMPTY, after), ProtocolError);
  // A failed decryption leaves the nonce where it was.
  assert.equal(z.nonce, 1n);
  assert.throws(() => z.decryptWithAd(EMPTY, new Uint8Array(10)), /too short/);
  // The default REKEY: first 32 bytes of ENCRYPT(k, 2^64-1, "", zeros(32)), computed here
  // straight from node:crypto; a cipher state built from it encrypts exactly like the
  // rekeyed one.
  const iv = Uint8Array.of(0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff);
  const expectedKey = createCipheriv("chacha20-poly1305", key, iv, { authTagLength: 16 })
    .update(new Uint8Array(32));
  const rekeyed = new CipherState(key);
  rekeyed.rekey();
  assert.deepEqual(
    rekeyed.encryptWithAd(Uint8Array.of(1), m),
    new CipherState(new Uint8Array(expectedKey)).encryptWithAd(Uint8Array.of(1), m),
  );
  // No key: data passes through unchanged.
  const none = new CipherState();
  assert.equal(none.hasKey(), false);
  assert.deepEqual(none.encryptWithAd(EMPTY, m), m);
  assert.throws(() => none.rekey(), ProtocolError);
});
