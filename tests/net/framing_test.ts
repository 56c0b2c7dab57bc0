/**
 * Length-prefixed framing: encoding, decoding across every possible chunk split, empty
 * frames, the size limit enforced from the header alone (no 4 GiB allocation for a
 * 0xffffffff prefix), and ends of stream inside a frame.
 * @module
 */

import assert from "node:assert/strict";
import { ProtocolError } from "../../src/errors.ts";
import {
  DEFAULT_MAX_FRAME_SIZE,
  encodeFrame,
  FRAME_HEADER_SIZE,
  FrameDecoder,
} from "../../src/net/framing.ts";

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}

Deno.test("framing: encodeFrame writes a u32 big-endian length", () => {
  assert.deepEqual(encodeFrame(new Uint8Array(0)), Uint8Array.of(0, 0, 0, 0));
  assert.deepEqual(encodeFrame(Uint8Array.of(7, 8)), Uint8Array.of(0, 0, 0, 2, 7, 8));
  const big = encodeFrame(new Uint8Array(0x01_02_03), { maxFrameSize: 1 << 20 });
  assert.deepEqual(big.subarray(0, 4), Uint8Array.of(0, 0x01, 0x02, 0x03));
  assert.equal(big.length, FRAME_HEADER_SIZE + 0x010203);
  assert.equal(DEFAULT_MAX_FRAME_SIZE, 65535);
  assert.equal(encodeFrame(new Uint8Array(65535)).length, 65539);
  assert.throws(() => encodeFrame(new Uint8Array(65536)), ProtocolError);
  assert.throws(() => encodeFrame(new Uint8Array(11), { maxFrameSize: 10 }), /Frame too large/);
});

Deno.test("framing: frames survive every split of the stream", () => {
  const payloads = [
    new Uint8Array(0),
    Uint8Array.of(1),
    new Uint8Array(0),
    new Uint8Array(300).map((_, i) => i & 0xff),
    Uint8Array.of(0, 0, 0, 0),
    new Uint8Array(0),
  ];
  const stream = concat(payloads.map((p) => encodeFrame(p)));
  // One chunk, byte by byte, and every two-way split.
  const check = (chunks: Uint8Array[]) => {
    const decoder = new FrameDecoder();
    const frames = chunks.flatMap((chunk) => decoder.push(chunk));
    assert.deepEqual(frames, payloads);
    assert.ok(decoder.idle);
    decoder.end();
  };
  check([stream]);
  check(Array.from(stream, (b) => Uint8Array.of(b)));
  for (let cut = 0; cut <= stream.length; cut++) {
    check([stream.subarray(0, cut), new Uint8Array(0), stream.subarray(cut)]);
  }
  // Random chunkings.
  for (let round = 0; round < 50; round++) {
    const chunks: Uint8Array[] = [];
    let offset = 0;
    while (offset < stream.length) {
      const n = Math.floor(Math.random() * 40);
      chunks.push(stream.subarray(offset, offset + n));
      offset += n;
    }
    check(chunks);
  }
});

Deno.test("framing: decoded frames do not alias the input chunks", () => {
  const decoder = new FrameDecoder();
  const chunk = encodeFrame(Uint8Array.of(1, 2, 3));
  const [frame] = decoder.push(chunk);
  chunk.fill(9);
  assert.deepEqual(frame, Uint8Array.of(1, 2, 3));
});

Deno.test("framing: an oversize length is refused from its header alone", () => {
  // 0xffffffff would be a 4 GiB frame: refused with the 4 header bytes, nothing allocated.
  const decoder = new FrameDecoder();
  assert.throws(
    () => decoder.push(Uint8Array.of(0xff, 0xff, 0xff, 0xff)),
    (e) => e instanceof ProtocolError && /Frame too large: 4294967295 bytes/.test(e.message),
  );
  assert.equal(decoder.buffered, FRAME_HEADER_SIZE, "only the header is held");
  // The decoder stays failed.
  assert.throws(() => decoder.push(Uint8Array.of(0)), /failed earlier/);
  assert.throws(() => decoder.end(), /failed earlier/);

  // Split header: the error comes as soon as the 4th byte arrives.
  const split = new FrameDecoder({ maxFrameSize: 100 });
  assert.deepEqual(split.push(Uint8Array.of(0, 0)), []);
  assert.deepEqual(split.push(Uint8Array.of(0)), []);
  assert.throws(() => split.push(Uint8Array.of(101)), ProtocolError);

  // Exactly the limit is fine, after a good frame in the same chunk.
  const exact = new FrameDecoder({ maxFrameSize: 100 });
  const frames = exact.push(
    concat([encodeFrame(Uint8Array.of(5)), encodeFrame(new Uint8Array(100))]),
  );
  assert.equal(frames.length, 2);
  assert.equal(frames[1].length, 100);

  assert.throws(() => new FrameDecoder({ maxFrameSize: -1 }), RangeError);
  assert.throws(() => new FrameDecoder({ maxFrameSize: 2 ** 32 }), RangeError);
});

Deno.test("framing: an end of stream inside a frame is a ProtocolError", () => {
  const frame = encodeFrame(new Uint8Array(10));
  for (let cut = 1; cut < frame.length; cut++) {
    const decoder = new FrameDecoder();
    assert.deepEqual(decoder.push(frame.subarray(0, cut)), []);
    assert.equal(decoder.idle, false);
    assert.equal(decoder.buffered, cut);
    assert.throws(() => decoder.end(), /Stream ended inside a frame/);
  }
  const clean = new FrameDecoder();
  clean.push(frame);
  clean.end();
});
