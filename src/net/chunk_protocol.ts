/**
 * The chunk protocol: how peers move NAR data over a segment's secure channel, next to the
 * sync protocol's JSON messages (src/net/sync.ts). Pure: encoding, decoding and limits.
 *
 * Its messages are binary and start with a type byte below 0x20 (a JSON message starts
 * with `{`). Integers are big-endian; `rid` is the requester's u32 request id.
 *
 * | type | name | body |
 * |---|---|---|
 * | 0x01 | `MANIFEST?` | `rid ‖ hash part (32 ASCII bytes)` |
 * | 0x02 | `MANIFEST`  | `rid ‖ status u8` (0 held, 1 not held); if held: `NarHash (32) ‖ NarSize u64 ‖ compression u8 ‖ count u32 ‖ count × (chunk id (32) ‖ size u32)` |
 * | 0x03 | `CHUNKS?`   | `rid ‖ count u16 ‖ count × chunk id (32)` |
 * | 0x04 | `CHUNK`     | `rid ‖ chunk id (32) ‖ compression u8 ‖ the chunk file as stored` |
 * | 0x05 | `NO CHUNK`  | `rid ‖ chunk id (32)` |
 *
 * Compression codes: 0 none, 1 zstd, 2 xz. A `MANIFEST` lists the NAR's chunks in order,
 * with their uncompressed sizes; they must add up to NarSize. A `CHUNKS?` names at most
 * {@link MAX_IDS_PER_REQUEST} ids, and is answered with one `CHUNK` or `NO CHUNK` per id,
 * in order. The limits a responder enforces on a peer (requests waiting, chunks asked and
 * not yet answered) are here too; breaking them is a protocol error.
 * @module
 */

import type { ChunkCompression } from "../cache/compression.ts";
import { formatBase16 } from "../cache/hash.ts";
import { isValidHashPart } from "../cache/store_path.ts";
import { DEFAULT_CHUNKER_OPTIONS } from "../cache/chunker.ts";
import { ProtocolError } from "../errors.ts";

/** Message type bytes. */
export const MessageType = {
  ManifestRequest: 0x01,
  Manifest: 0x02,
  ChunksRequest: 0x03,
  Chunk: 0x04,
  NoChunk: 0x05,
} as const;

/** Most chunk ids in one `CHUNKS?`. */
export const MAX_IDS_PER_REQUEST = 64;
/** Most chunks a peer may have asked for and not yet been sent (responder's limit). */
export const MAX_CHUNKS_OUTSTANDING = 1024;
/** Most `MANIFEST?` a peer may have waiting (responder's limit). */
export const MAX_MANIFESTS_OUTSTANDING = 64;
/** Largest uncompressed chunk a manifest may list (the chunker's maximum). */
export const MAX_CHUNK_SIZE = DEFAULT_CHUNKER_OPTIONS.maxSize;
/** Most chunks in one manifest (a NAR of ~1 TiB at the smallest chunks). */
export const MAX_MANIFEST_CHUNKS = (1 << 24) / 36 | 0;

const COMPRESSION_CODES: readonly ChunkCompression[] = ["none", "zstd", "xz"];
const ID_BYTES = 32;

/** A NAR as a peer holds it: what the chunk protocol's `MANIFEST` carries. */
export interface PeerManifest {
  narHash: Uint8Array;
  narSize: number;
  /** How the peer stores its chunks (what its `CHUNK` messages carry). */
  compression: ChunkCompression;
  /** The NAR's chunks in order: hex SHA-256 of the uncompressed chunk, and its size. */
  chunks: { id: string; size: number }[];
}

/** A decoded chunk-protocol message. */
export type ChunkMessage =
  | { type: "manifest?"; rid: number; hashPart: string }
  | { type: "manifest"; rid: number; manifest: PeerManifest | null }
  | { type: "chunks?"; rid: number; ids: string[] }
  | { type: "chunk"; rid: number; id: string; compression: ChunkCompression; data: Uint8Array }
  | { type: "no chunk"; rid: number; id: string };

/** True when a channel message belongs to this protocol (not a sync JSON message). */
export function isChunkMessage(bytes: Uint8Array): boolean {
  return bytes.length > 0 && bytes[0] < 0x20;
}

function header(type: number, rid: number, bodySize: number): [Uint8Array, DataView] {
  const out = new Uint8Array(5 + bodySize);
  const view = new DataView(out.buffer);
  out[0] = type;
  view.setUint32(1, rid);
  return [out, view];
}

function idBytes(id: string): Uint8Array {
  if (!/^[0-9a-f]{64}$/.test(id)) throw new ProtocolError(`Invalid chunk id '${id}'`);
  const out = new Uint8Array(ID_BYTES);
  for (let i = 0; i < ID_BYTES; i++) out[i] = parseInt(id.slice(2 * i, 2 * i + 2), 16);
  return out;
}

/** Encodes a `MANIFEST?`. */
export function encodeManifestRequest(rid: number, hashPart: string): Uint8Array {
  const [out] = header(MessageType.ManifestRequest, rid, 32);
  out.set(new TextEncoder().encode(hashPart), 5);
  return out;
}

/** Encodes a `MANIFEST` (null: not held). */
export function encodeManifest(rid: number, manifest: PeerManifest | null): Uint8Array {
  if (manifest === null) {
    const [out] = header(MessageType.Manifest, rid, 1);
    out[5] = 1;
    return out;
  }
  const count = manifest.chunks.length;
  const [out, view] = header(MessageType.Manifest, rid, 1 + 32 + 8 + 1 + 4 + count * 36);
  let offset = 5;
  out[offset++] = 0;
  out.set(manifest.narHash, offset);
  offset += 32;
  view.setBigUint64(offset, BigInt(manifest.narSize));
  offset += 8;
  out[offset++] = COMPRESSION_CODES.indexOf(manifest.compression);
  view.setUint32(offset, count);
  offset += 4;
  for (const chunk of manifest.chunks) {
    out.set(idBytes(chunk.id), offset);
    view.setUint32(offset + 32, chunk.size);
    offset += 36;
  }
  return out;
}

/** Encodes a `CHUNKS?`. */
export function encodeChunksRequest(rid: number, ids: readonly string[]): Uint8Array {
  if (ids.length === 0 || ids.length > MAX_IDS_PER_REQUEST) {
    throw new ProtocolError(`A chunk request names 1 to ${MAX_IDS_PER_REQUEST} ids`);
  }
  const [out, view] = header(MessageType.ChunksRequest, rid, 2 + ids.length * 32);
  view.setUint16(5, ids.length);
  ids.forEach((id, i) => out.set(idBytes(id), 7 + 32 * i));
  return out;
}

/** Encodes a `CHUNK` carrying a chunk file as stored. */
export function encodeChunk(
  rid: number,
  id: string,
  compression: ChunkCompression,
  data: Uint8Array,
): Uint8Array {
  const [out] = header(MessageType.Chunk, rid, 32 + 1 + data.length);
  out.set(idBytes(id), 5);
  out[37] = COMPRESSION_CODES.indexOf(compression);
  out.set(data, 38);
  return out;
}

/** Encodes a `NO CHUNK`. */
export function encodeNoChunk(rid: number, id: string): Uint8Array {
  const [out] = header(MessageType.NoChunk, rid, 32);
  out.set(idBytes(id), 5);
  return out;
}

/** Decodes one chunk-protocol message; {@link ProtocolError} for anything malformed. */
export function decodeChunkMessage(bytes: Uint8Array): ChunkMessage {
  const fail = (detail: string): never => {
    throw new ProtocolError(`Invalid chunk message: ${detail}`);
  };
  if (bytes.length < 5) fail("too short");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const rid = view.getUint32(1);
  const body = bytes.subarray(5);
  const compressionOf = (code: number) =>
    COMPRESSION_CODES[code] ?? fail(`unknown compression code ${code}`);
  switch (bytes[0]) {
    case MessageType.ManifestRequest: {
      if (body.length !== 32) fail("bad manifest request length");
      const hashPart = new TextDecoder().decode(body);
      if (!isValidHashPart(hashPart)) fail("bad store path hash");
      return { type: "manifest?", rid, hashPart };
    }
    case MessageType.Manifest: {
      if (body.length === 1 && body[0] === 1) return { type: "manifest", rid, manifest: null };
      if (body.length < 46 || body[0] !== 0) fail("bad manifest header");
      const narHash = body.slice(1, 33);
      const narSize = Number(view.getBigUint64(5 + 33));
      const compression = compressionOf(body[41]);
      const count = view.getUint32(5 + 42);
      if (count > MAX_MANIFEST_CHUNKS) fail(`${count} chunks is too many`);
      if (body.length !== 46 + count * 36) fail("manifest length does not match its count");
      const chunks: { id: string; size: number }[] = new Array(count);
      let total = 0;
      for (let i = 0, offset = 46; i < count; i++, offset += 36) {
        const size = view.getUint32(5 + offset + 32);
        if (size === 0 || size > MAX_CHUNK_SIZE) fail(`chunk ${i} has size ${size}`);
        total += size;
        chunks[i] = { id: formatBase16(body.subarray(offset, offset + 32)), size };
      }
      if (total !== narSize) fail(`chunk sizes add up to ${total}, NarSize is ${narSize}`);
      return { type: "manifest", rid, manifest: { narHash, narSize, compression, chunks } };
    }
    case MessageType.ChunksRequest: {
      if (body.length < 2) fail("bad chunk request");
      const count = view.getUint16(5);
      if (count === 0 || count > MAX_IDS_PER_REQUEST || body.length !== 2 + 32 * count) {
        fail("bad chunk request length");
      }
      const ids: string[] = [];
      for (let i = 0; i < count; i++) {
        ids.push(formatBase16(body.subarray(2 + 32 * i, 34 + 32 * i)));
      }
      return { type: "chunks?", rid, ids };
    }
    case MessageType.Chunk: {
      if (body.length < 34) fail("bad chunk length");
      return {
        type: "chunk",
        rid,
        id: formatBase16(body.subarray(0, 32)),
        compression: compressionOf(body[32]),
        data: body.subarray(33),
      };
    }
    case MessageType.NoChunk: {
      if (body.length !== 32) fail("bad no-chunk length");
      return { type: "no chunk", rid, id: formatBase16(body) };
    }
    default:
      return fail(`unknown type ${bytes[0]}`);
  }
}
