/**
 * The chunk protocol's codec (src/net/chunk_protocol.ts): every message type round-trips
 * (and encodes to the documented layout); decoding refuses, with a ProtocolError that says
 * what is wrong, every malformed form a hostile peer could send (too short, unknown type,
 * bad lengths, a manifest whose chunk sizes do not add up to NarSize, zero or oversize
 * chunk sizes, a chunk count over the limit, a bad hash part, an unknown compression code,
 * a chunk request of 0 or too many ids); a seeded fuzz loop over random bytes and random
 * mutations of valid messages throws nothing but ProtocolError, and whatever it decodes
 * encodes back to the same bytes.
 * @module
 */

import assert from "node:assert/strict";
import type { ChunkCompression } from "../../src/cache/compression.ts";
import { formatBase16, sha256 } from "../../src/cache/hash.ts";
import { NIX_BASE32_ALPHABET } from "../../src/cache/nixbase32.ts";
import { ProtocolError } from "../../src/errors.ts";
import {
  type ChunkMessage,
  decodeChunkMessage,
  encodeChunk,
  encodeChunksRequest,
  encodeManifest,
  encodeManifestRequest,
  encodeNoChunk,
  isChunkMessage,
  MAX_CHUNK_SIZE,
  MAX_IDS_PER_REQUEST,
  MAX_MANIFEST_CHUNKS,
  MessageType,
  type PeerManifest,
} from "../../src/net/chunk_protocol.ts";

const COMPRESSIONS: ChunkCompression[] = ["none", "zstd", "xz"];
const CODE_OF: Record<ChunkCompression, number> = { none: 0, zstd: 1, xz: 2 };

/** A deterministic PRNG (mulberry32), so a failing fuzz case can be replayed. */
function prng(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function randomBytes(random: () => number, length: number): Uint8Array {
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i++) out[i] = Math.floor(random() * 256);
  return out;
}

function chunkId(seed: string): string {
  return formatBase16(sha256(new TextEncoder().encode(seed)));
}

function hashPart(random: () => number): string {
  let out = "";
  for (let i = 0; i < 32; i++) out += NIX_BASE32_ALPHABET[Math.floor(random() * 32)];
  return out;
}

function sampleManifest(
  compression: ChunkCompression,
  sizes: number[],
  seed = "m",
): PeerManifest {
  return {
    narHash: sha256(new TextEncoder().encode(`nar ${seed}`)),
    narSize: sizes.reduce((a, b) => a + b, 0),
    compression,
    chunks: sizes.map((size, i) => ({ id: chunkId(`${seed} ${i}`), size })),
  };
}

/** Decoding `bytes` fails with a ProtocolError whose message matches `pattern`. */
function assertRefused(bytes: Uint8Array, pattern: RegExp): void {
  assert.throws(() => decodeChunkMessage(bytes), (error: unknown) => {
    assert.ok(error instanceof ProtocolError, `not a ProtocolError: ${error}`);
    assert.match(error.message, /^Invalid chunk message: /);
    assert.match(error.message, pattern);
    return true;
  });
}

/** Encodes a decoded message again (the codec is canonical: same bytes back). */
function encodeMessage(message: ChunkMessage): Uint8Array {
  switch (message.type) {
    case "manifest?":
      return encodeManifestRequest(message.rid, message.hashPart);
    case "manifest":
      return encodeManifest(message.rid, message.manifest);
    case "chunks?":
      return encodeChunksRequest(message.rid, message.ids);
    case "chunk":
      return encodeChunk(message.rid, message.id, message.compression, message.data);
    case "no chunk":
      return encodeNoChunk(message.rid, message.id);
  }
}

/** A valid manifest message with explicit fields, for building malformed variants. */
function rawManifest(fields: {
  rid?: number;
  status?: number;
  narSize?: bigint;
  compression?: number;
  count?: number;
  sizes: number[];
  extra?: number;
}): Uint8Array {
  const sizes = fields.sizes;
  const out = new Uint8Array(5 + 46 + sizes.length * 36 + (fields.extra ?? 0));
  const view = new DataView(out.buffer);
  out[0] = MessageType.Manifest;
  view.setUint32(1, fields.rid ?? 7);
  out[5] = fields.status ?? 0;
  out.set(sha256(new TextEncoder().encode("raw")), 6);
  view.setBigUint64(38, fields.narSize ?? BigInt(sizes.reduce((a, b) => a + b, 0)));
  out[46] = fields.compression ?? 1;
  view.setUint32(47, fields.count ?? sizes.length);
  sizes.forEach((size, i) => {
    out.set(sha256(new Uint8Array([i])), 51 + 36 * i);
    view.setUint32(51 + 36 * i + 32, size);
  });
  return out;
}

Deno.test("chunk protocol: a manifest request round-trips, with the documented layout", () => {
  const random = prng(1);
  for (const rid of [0, 1, 0x12345678, 0xffffffff]) {
    const part = hashPart(random);
    const bytes = encodeManifestRequest(rid, part);
    assert.equal(bytes.length, 5 + 32);
    assert.equal(bytes[0], 0x01);
    assert.equal(new DataView(bytes.buffer).getUint32(1), rid);
    assert.equal(new TextDecoder().decode(bytes.subarray(5)), part);
    assert.ok(isChunkMessage(bytes));
    assert.deepEqual(decodeChunkMessage(bytes), { type: "manifest?", rid, hashPart: part });
  }
});

Deno.test("chunk protocol: manifests round-trip (not held, and held in each compression)", () => {
  const notHeld = encodeManifest(42, null);
  assert.deepEqual([...notHeld], [0x02, 0, 0, 0, 42, 1]);
  assert.deepEqual(decodeChunkMessage(notHeld), { type: "manifest", rid: 42, manifest: null });

  const cases: [ChunkCompression, number[]][] = [
    ["none", [1]],
    ["zstd", [65536, 16384, MAX_CHUNK_SIZE, 3]],
    ["xz", Array.from({ length: 300 }, (_, i) => 1 + i * 17)],
    ["zstd", []], // an empty manifest is well-formed (NarSize 0); the fetcher judges it
  ];
  for (const [compression, sizes] of cases) {
    const manifest = sampleManifest(compression, sizes, `${compression}${sizes.length}`);
    const bytes = encodeManifest(0xfffffffe, manifest);
    assert.equal(bytes.length, 5 + 46 + 36 * sizes.length);
    assert.equal(bytes[5], 0, "status: held");
    assert.deepEqual(bytes.subarray(6, 38), manifest.narHash);
    assert.equal(new DataView(bytes.buffer).getBigUint64(38), BigInt(manifest.narSize));
    assert.equal(bytes[46], CODE_OF[compression]);
    assert.equal(new DataView(bytes.buffer).getUint32(47), sizes.length);
    const decoded = decodeChunkMessage(bytes);
    assert.deepEqual(decoded, { type: "manifest", rid: 0xfffffffe, manifest });
  }
});

Deno.test("chunk protocol: chunk requests round-trip from 1 to MAX_IDS_PER_REQUEST ids", () => {
  for (const count of [1, 2, MAX_IDS_PER_REQUEST]) {
    const ids = Array.from({ length: count }, (_, i) => chunkId(`req ${count} ${i}`));
    const bytes = encodeChunksRequest(9, ids);
    assert.equal(bytes.length, 5 + 2 + 32 * count);
    assert.equal(bytes[0], 0x03);
    assert.equal(new DataView(bytes.buffer).getUint16(5), count);
    assert.deepEqual(decodeChunkMessage(bytes), { type: "chunks?", rid: 9, ids });
  }
  // The same id twice is a valid request (a NAR may repeat a chunk).
  const twice = [chunkId("a"), chunkId("a")];
  assert.deepEqual(decodeChunkMessage(encodeChunksRequest(1, twice)), {
    type: "chunks?",
    rid: 1,
    ids: twice,
  });
});

Deno.test("chunk protocol: encoding a chunk request of 0 or too many ids is refused", () => {
  for (const count of [0, MAX_IDS_PER_REQUEST + 1]) {
    const ids = Array.from({ length: count }, (_, i) => chunkId(`${i}`));
    assert.throws(() => encodeChunksRequest(1, ids), ProtocolError);
  }
  assert.throws(() => encodeChunksRequest(1, ["not hex"]), /Invalid chunk id 'not hex'/);
  assert.throws(() => encodeNoChunk(1, chunkId("x").toUpperCase()), ProtocolError);
});

Deno.test("chunk protocol: chunks and no-chunks round-trip, data as given", () => {
  const random = prng(2);
  for (const compression of COMPRESSIONS) {
    for (const length of [1, 100, 70_000]) {
      const data = randomBytes(random, length);
      const id = chunkId(`${compression} ${length}`);
      const bytes = encodeChunk(77, id, compression, data);
      assert.equal(bytes.length, 5 + 32 + 1 + length);
      assert.equal(bytes[0], 0x04);
      assert.equal(bytes[37], CODE_OF[compression]);
      const decoded = decodeChunkMessage(bytes);
      assert.equal(decoded.type, "chunk");
      assert.deepEqual(decoded, { type: "chunk", rid: 77, id, compression, data });
    }
  }
  const id = chunkId("gone");
  const bytes = encodeNoChunk(5, id);
  assert.equal(bytes.length, 5 + 32);
  assert.equal(bytes[0], 0x05);
  assert.deepEqual(decodeChunkMessage(bytes), { type: "no chunk", rid: 5, id });
});

Deno.test("chunk protocol: a message in the middle of a larger buffer decodes", () => {
  const id = chunkId("offset");
  const inner = encodeChunk(3, id, "zstd", new Uint8Array([1, 2, 3]));
  const outer = new Uint8Array(inner.length + 11);
  outer.set(inner, 7);
  const decoded = decodeChunkMessage(outer.subarray(7, 7 + inner.length));
  assert.deepEqual(decoded, {
    type: "chunk",
    rid: 3,
    id,
    compression: "zstd",
    data: new Uint8Array([1, 2, 3]),
  });
});

Deno.test("chunk protocol: isChunkMessage tells binary chunk messages from sync JSON", () => {
  assert.equal(isChunkMessage(new Uint8Array(0)), false);
  assert.equal(isChunkMessage(new TextEncoder().encode('{"t":"rc"}')), false);
  assert.equal(isChunkMessage(new Uint8Array([0x1f])), true);
  assert.equal(isChunkMessage(new Uint8Array([0x20])), false);
  assert.equal(isChunkMessage(encodeNoChunk(1, chunkId("x"))), true);
});

Deno.test("chunk protocol: too short and unknown types are refused", () => {
  for (let length = 0; length < 5; length++) {
    assertRefused(new Uint8Array(length).fill(MessageType.Chunk), /too short/);
  }
  for (const type of [0x00, 0x06, 0x1f, 0x7b, 0xff]) {
    const bytes = new Uint8Array(5 + 32);
    bytes[0] = type;
    assertRefused(bytes, new RegExp(`unknown type ${type}$`));
  }
});

Deno.test("chunk protocol: manifest requests with a bad length or hash part are refused", () => {
  const good = encodeManifestRequest(1, "0".repeat(32));
  assertRefused(good.subarray(0, 36), /bad manifest request length/);
  const long = new Uint8Array(38);
  long.set(good);
  long[37] = 0x30;
  assertRefused(long, /bad manifest request length/);
  assertRefused(good.subarray(0, 5), /bad manifest request length/);
  // Letters nix32 lacks (e, o, u, t), upper case, a slash, a NUL, a non-UTF-8 byte.
  for (const bad of ["e", "o", "u", "t", "A", "/", "\0"]) {
    const part = "0".repeat(31) + bad;
    assertRefused(encodeManifestRequest(1, part), /bad store path hash/);
  }
  const nonUtf8 = good.slice();
  nonUtf8[20] = 0xff;
  assertRefused(nonUtf8, /bad store path hash/);
});

Deno.test("chunk protocol: malformed manifests are refused", () => {
  // Status and header.
  assertRefused(new Uint8Array([0x02, 0, 0, 0, 1]), /bad manifest header/);
  assertRefused(new Uint8Array([0x02, 0, 0, 0, 1, 1, 0]), /bad manifest header/);
  assertRefused(new Uint8Array([0x02, 0, 0, 0, 1, 2]), /bad manifest header/);
  assertRefused(rawManifest({ sizes: [10], status: 1 }), /bad manifest header/);
  assertRefused(rawManifest({ sizes: [10], status: 2 }), /bad manifest header/);
  assertRefused(rawManifest({ sizes: [] }).subarray(0, 5 + 45), /bad manifest header/);
  // Compression codes.
  for (const code of [3, 0x7f, 0xff]) {
    assertRefused(rawManifest({ sizes: [10], compression: code }), /unknown compression code/);
  }
  // Count against length.
  assertRefused(rawManifest({ sizes: [10, 20], count: 3 }), /does not match its count/);
  assertRefused(rawManifest({ sizes: [10, 20], count: 1 }), /does not match its count/);
  assertRefused(rawManifest({ sizes: [10], extra: 1 }), /does not match its count/);
  assertRefused(rawManifest({ sizes: [10], extra: 35 }), /does not match its count/);
  assertRefused(rawManifest({ sizes: [10, 20] }).subarray(0, 5 + 46 + 36 + 35), /count/);
  // A count over the limit is refused from the header (no allocation, no length needed).
  for (const count of [MAX_MANIFEST_CHUNKS + 1, 0xffffffff]) {
    assertRefused(rawManifest({ sizes: [], count }), new RegExp(`${count} chunks is too many`));
  }
  // Chunk sizes.
  assertRefused(rawManifest({ sizes: [10, 0, 5] }), /chunk 1 has size 0/);
  assertRefused(
    rawManifest({ sizes: [MAX_CHUNK_SIZE + 1] }),
    new RegExp(`chunk 0 has size ${MAX_CHUNK_SIZE + 1}`),
  );
  assertRefused(rawManifest({ sizes: [1, 0xffffffff] }), /chunk 1 has size 4294967295/);
  // Sizes that do not add up to NarSize, including NarSize beyond 2^53.
  assertRefused(rawManifest({ sizes: [10, 20], narSize: 31n }), /add up to 30, NarSize is 31/);
  assertRefused(rawManifest({ sizes: [10, 20], narSize: 29n }), /add up to 30, NarSize is 29/);
  assertRefused(rawManifest({ sizes: [], narSize: 1n }), /add up to 0, NarSize is 1/);
  assertRefused(rawManifest({ sizes: [10], narSize: (1n << 64n) - 1n }), /add up to 10/);
  assertRefused(rawManifest({ sizes: [10], narSize: (1n << 53n) + 10n }), /add up to 10/);
  // Control: the builder makes valid manifests.
  const valid = decodeChunkMessage(rawManifest({ sizes: [10, 20] }));
  assert.equal(valid.type, "manifest");
});

Deno.test("chunk protocol: malformed chunk requests are refused", () => {
  const ids = [chunkId("1"), chunkId("2")];
  const good = encodeChunksRequest(1, ids);
  assertRefused(good.subarray(0, 5), /bad chunk request/);
  assertRefused(good.subarray(0, 6), /bad chunk request/);
  // 0 ids, and more than MAX_IDS_PER_REQUEST (with the bytes for all of them).
  const zero = new Uint8Array(7);
  zero[0] = MessageType.ChunksRequest;
  assertRefused(zero, /bad chunk request length/);
  for (const count of [MAX_IDS_PER_REQUEST + 1, 0xffff]) {
    const many = new Uint8Array(7 + 32 * count);
    many[0] = MessageType.ChunksRequest;
    new DataView(many.buffer).setUint16(5, count);
    assertRefused(many, /bad chunk request length/);
  }
  // The count does not match the ids that follow.
  assertRefused(good.subarray(0, good.length - 1), /bad chunk request length/);
  const longer = new Uint8Array(good.length + 32);
  longer.set(good);
  assertRefused(longer, /bad chunk request length/);
  const wrongCount = good.slice();
  new DataView(wrongCount.buffer).setUint16(5, 1);
  assertRefused(wrongCount, /bad chunk request length/);
});

Deno.test("chunk protocol: malformed chunks and no-chunks are refused", () => {
  const id = chunkId("c");
  const good = encodeChunk(1, id, "zstd", new Uint8Array([9]));
  assertRefused(good.subarray(0, good.length - 1), /bad chunk length/); // no data at all
  assertRefused(good.subarray(0, 20), /bad chunk length/);
  for (const code of [3, 0xff]) {
    const bad = good.slice();
    bad[37] = code;
    assertRefused(bad, new RegExp(`unknown compression code ${code}`));
  }
  const none = encodeNoChunk(1, id);
  assertRefused(none.subarray(0, none.length - 1), /bad no-chunk length/);
  const longer = new Uint8Array(none.length + 1);
  longer.set(none);
  assertRefused(longer, /bad no-chunk length/);
});

/** Valid messages of every type, for the fuzzer to mutate. */
function validMessages(random: () => number): Uint8Array[] {
  const ids = Array.from({ length: 5 }, (_, i) => chunkId(`fuzz ${i}`));
  return [
    encodeManifestRequest(1, hashPart(random)),
    encodeManifest(2, null),
    encodeManifest(3, sampleManifest("zstd", [100, 200, 300])),
    encodeManifest(4, sampleManifest("xz", [MAX_CHUNK_SIZE])),
    encodeChunksRequest(5, ids),
    encodeChunksRequest(6, [ids[0]]),
    encodeChunk(7, ids[1], "none", randomBytes(random, 40)),
    encodeChunk(8, ids[2], "zstd", new Uint8Array([0])),
    encodeNoChunk(9, ids[3]),
  ];
}

function mutate(random: () => number, source: Uint8Array): Uint8Array {
  let bytes = source.slice();
  const steps = 1 + Math.floor(random() * 4);
  for (let s = 0; s < steps; s++) {
    const at = Math.floor(random() * Math.max(bytes.length, 1));
    switch (Math.floor(random() * 7)) {
      case 0: // flip a bit
        if (bytes.length > 0) bytes[at] ^= 1 << Math.floor(random() * 8);
        break;
      case 1: // a random byte
        if (bytes.length > 0) bytes[at] = Math.floor(random() * 256);
        break;
      case 2: // truncate
        bytes = bytes.slice(0, at);
        break;
      case 3: { // append random bytes
        const more = randomBytes(random, 1 + Math.floor(random() * 80));
        const out = new Uint8Array(bytes.length + more.length);
        out.set(bytes);
        out.set(more, bytes.length);
        bytes = out;
        break;
      }
      case 4: // the type byte
        if (bytes.length > 0) bytes[0] = Math.floor(random() * 8);
        break;
      case 5: // a u32 or u16 field set to an edge value
        if (bytes.length >= 4) {
          const view = new DataView(bytes.buffer);
          const edge = [0, 1, 0xffff, 0xffffffff, MAX_MANIFEST_CHUNKS + 1][
            Math.floor(random() * 5)
          ];
          const where = Math.floor(random() * (bytes.length - 3));
          if (random() < 0.5) view.setUint32(where, edge >>> 0);
          else view.setUint16(where, edge & 0xffff);
        }
        break;
      default: { // delete a span
        const end = at + Math.floor(random() * 40);
        const out = new Uint8Array(bytes.length - Math.min(end, bytes.length) + at);
        out.set(bytes.subarray(0, at));
        out.set(bytes.subarray(Math.min(end, bytes.length)), at);
        bytes = out;
      }
    }
  }
  return bytes;
}

Deno.test("chunk protocol: fuzzing throws only ProtocolError; what decodes re-encodes the same", () => {
  const seed = 0x5eed_c0de;
  const random = prng(seed);
  const valid = validMessages(random);
  const outcomes = { decoded: 0, refused: 0 };
  for (let i = 0; i < 40_000; i++) {
    let input: Uint8Array;
    if (i % 2 === 0) {
      input = randomBytes(random, Math.floor(random() * 120));
      if (input.length > 0 && random() < 0.8) input[0] = Math.floor(random() * 7);
    } else {
      input = mutate(random, valid[Math.floor(random() * valid.length)]);
    }
    let decoded: ChunkMessage;
    try {
      decoded = decodeChunkMessage(input);
    } catch (error) {
      if (!(error instanceof ProtocolError)) {
        throw new Error(
          `Iteration ${i} (seed ${seed}) threw ${error} for ${formatBase16(input)}`,
        );
      }
      outcomes.refused++;
      continue;
    }
    outcomes.decoded++;
    assert.deepEqual(encodeMessage(decoded), input, `iteration ${i}: not canonical`);
  }
  // Both outcomes happen (the mutations are neither all fatal nor all harmless).
  assert.ok(outcomes.decoded > 100, `decoded ${outcomes.decoded}`);
  assert.ok(outcomes.refused > 10_000, `refused ${outcomes.refused}`);
  for (const message of valid) {
    assert.deepEqual(encodeMessage(decodeChunkMessage(message)), message);
  }
});
