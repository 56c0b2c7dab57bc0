/**
 * A NAR wrapped, without compressing it, in the container a narinfo promised: one zstd
 * frame of raw blocks, or one xz stream of uncompressed LZMA2 chunks. Both have a length
 * known in advance (a `Content-Length`), cost a copy and no compression, and are read by
 * any decoder (Nix's, the `zstd` and `xz` tools). The substituter sends a local copy this
 * way under a passed-through file's URL when the copy is stored in another compression.
 * @module
 */

import { crc32 } from "node:zlib";
import { IntegrityError } from "../errors.ts";

/** Bytes of a raw zstd block at most (the frame's window is as large). */
const RAW_ZSTD_BLOCK_BYTES = 128 * 1024;

/** The length of {@link rawZstdFrame}'s output for `size` bytes. */
export function rawZstdFrameSize(size: number): number {
  return 6 + size + 3 * Math.max(1, Math.ceil(size / RAW_ZSTD_BLOCK_BYTES));
}

/**
 * A transform that wraps exactly `size` bytes into one zstd frame of raw blocks (RFC 8878:
 * magic, a descriptor without content size or checksum, a 128 KiB window, then blocks of
 * up to 128 KiB, each with a 3-byte header).
 */
export function rawZstdFrame(size: number): TransformStream<Uint8Array, Uint8Array> {
  const block = (length: number, last: boolean) => {
    const bytes = new Uint8Array(3 + length);
    const value = (length << 3) | (last ? 1 : 0);
    bytes[0] = value & 0xff;
    bytes[1] = (value >> 8) & 0xff;
    bytes[2] = (value >> 16) & 0xff;
    return { bytes, offset: 3 };
  };
  return framed(size, RAW_ZSTD_BLOCK_BYTES, {
    head: new Uint8Array([0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x38]),
    // An empty NAR is one empty last block.
    empty: () => block(0, true).bytes,
    block: (length, _first, last) => block(length, last),
    tail: () => new Uint8Array(0),
  });
}

/** Bytes of an uncompressed LZMA2 chunk at most. */
const LZMA2_CHUNK_BYTES = 64 * 1024;
/** Stream flags: no integrity check (the NAR's own NarHash is what Nix checks). */
const XZ_STREAM_FLAGS = new Uint8Array([0x00, 0x00]);
/**
 * The one block's header: size byte ((12 / 4) - 1), flags (one filter, no sizes), LZMA2
 * (filter 0x21) with a 1-byte property (dictionary 64 KiB: code 8), padding; CRC32 after.
 */
const XZ_BLOCK_HEADER = withCrc32(new Uint8Array([0x02, 0x00, 0x21, 0x01, 0x08, 0, 0, 0]));

/** The length of {@link rawXzStream}'s output for `size` bytes. */
export function rawXzStreamSize(size: number): number {
  const layout = xzLayout(size);
  return 12 + layout.unpadded + layout.blockPadding + layout.index.length + 12;
}

/**
 * A transform that wraps exactly `size` bytes into one xz stream (the .xz file format 1.1:
 * stream header, one block of uncompressed LZMA2 chunks of up to 64 KiB, the index, the
 * stream footer), check type None.
 */
export function rawXzStream(size: number): TransformStream<Uint8Array, Uint8Array> {
  const layout = xzLayout(size);
  const head = new Uint8Array(12 + XZ_BLOCK_HEADER.length);
  head.set([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]);
  head.set(withCrc32(XZ_STREAM_FLAGS), 6);
  head.set(XZ_BLOCK_HEADER, 12);
  const footer = new Uint8Array(12);
  const footerFields = new Uint8Array(6);
  new DataView(footerFields.buffer).setUint32(0, layout.index.length / 4 - 1, true);
  footerFields.set(XZ_STREAM_FLAGS, 4);
  footer.set(withCrc32(footerFields).subarray(6), 0); // the CRC32 comes first here
  footer.set(footerFields, 4);
  footer.set([0x59, 0x5a], 10);
  return framed(size, LZMA2_CHUNK_BYTES, {
    head,
    empty: () => new Uint8Array(0),
    block: (length, first) => {
      // Control 0x01: uncompressed, dictionary reset (the first); 0x02: no reset.
      const bytes = new Uint8Array(3 + length);
      bytes[0] = first ? 0x01 : 0x02;
      bytes[1] = ((length - 1) >> 8) & 0xff;
      bytes[2] = (length - 1) & 0xff;
      return { bytes, offset: 3 };
    },
    // The end of the LZMA2 data, the block padding, then the index and the footer.
    tail: () => {
      const tail = new Uint8Array(1 + layout.blockPadding + layout.index.length + 12);
      tail.set(layout.index, 1 + layout.blockPadding);
      tail.set(footer, tail.length - 12);
      return tail;
    },
  });
}

/** The sizes of {@link rawXzStream}'s block and its index for `size` bytes. */
function xzLayout(size: number): { unpadded: number; blockPadding: number; index: Uint8Array } {
  const data = size + 3 * Math.ceil(size / LZMA2_CHUNK_BYTES) + 1;
  const unpadded = XZ_BLOCK_HEADER.length + data;
  const blockPadding = (4 - (unpadded % 4)) % 4;
  const fields = [0x00, ...varint(1), ...varint(unpadded), ...varint(size)];
  while (fields.length % 4 !== 0) fields.push(0);
  return { unpadded, blockPadding, index: withCrc32(new Uint8Array(fields)) };
}

/** The xz format's variable-length integer. */
function varint(value: number): number[] {
  const out: number[] = [];
  while (value >= 0x80) {
    out.push((value % 0x80) | 0x80);
    value = Math.floor(value / 0x80);
  }
  out.push(value);
  return out;
}

/** `bytes` followed by their CRC32, little-endian. */
function withCrc32(bytes: Uint8Array): Uint8Array {
  const out = new Uint8Array(bytes.length + 4);
  out.set(bytes);
  new DataView(out.buffer).setUint32(bytes.length, crc32(bytes), true);
  return out;
}

/** How a container frames the NAR's bytes. */
interface Framing {
  head: Uint8Array;
  /** What follows the head when the NAR is empty (no blocks). */
  empty: () => Uint8Array;
  /** A new block of `length` payload bytes, its payload to be written from `offset`. */
  block: (length: number, first: boolean, last: boolean) => { bytes: Uint8Array; offset: number };
  tail: () => Uint8Array;
}

/**
 * A transform that cuts exactly `size` bytes into blocks of `blockBytes` at most, each
 * framed by `framing`, between its head and its tail; IntegrityError when the input is
 * longer or shorter than `size`.
 */
function framed(
  size: number,
  blockBytes: number,
  framing: Framing,
): TransformStream<Uint8Array, Uint8Array> {
  let left = size;
  let first = true;
  let current: { bytes: Uint8Array; offset: number } | null = null;
  let filled = 0;
  const next = () => {
    const length = Math.min(blockBytes, left);
    current = framing.block(length, first, left === length);
    first = false;
    filled = 0;
  };
  return new TransformStream({
    start(controller) {
      controller.enqueue(framing.head);
      if (size === 0) controller.enqueue(framing.empty());
    },
    transform(piece, controller) {
      if (piece.length > left) throw new IntegrityError("NAR is longer than its NarSize");
      for (let at = 0; at < piece.length;) {
        if (current === null) next();
        const block: { bytes: Uint8Array; offset: number } = current!;
        const room = block.bytes.length - block.offset - filled;
        const take = Math.min(room, piece.length - at);
        block.bytes.set(piece.subarray(at, at + take), block.offset + filled);
        filled += take;
        at += take;
        left -= take;
        if (filled === block.bytes.length - block.offset) {
          controller.enqueue(block.bytes);
          current = null;
        }
      }
    },
    flush(controller) {
      if (left !== 0) throw new IntegrityError("NAR is shorter than its NarSize");
      const tail = framing.tail();
      if (tail.length > 0) controller.enqueue(tail);
    },
  });
}
