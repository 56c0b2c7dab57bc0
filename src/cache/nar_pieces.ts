/**
 * Reading a stored NAR file as served: its chunk files concatenated in manifest order
 * (DESIGN.md §3), whole or by a byte range, as a stream of pieces for an HTTP body.
 *
 * Every piece but the last is exactly {@link PIECE_BYTES} long: a chunk file that crosses
 * a piece's end is read in two parts (`pread` at an offset). Each chunk file must be
 * exactly the size its manifest records: a file found shorter or longer errors the stream
 * ({@link IntegrityError}, or {@link NotFoundError} when it is gone), so a body is never
 * cut short while looking complete. With libc (libc.ts) a chunk costs one `open`, one
 * `pread` and one `close`: at a chunk's end one byte more than its rest is asked for, and
 * the short answer is the end-of-file check. (Through libc the size is checked where a
 * read reaches the chunk's end; Deno's API, the fallback, checks it on every read. The
 * server checks every chunk's size before its 200 anyway: `Cache.missingChunks`.)
 *
 * Reused pieces ({@link NarPieceOptions.reusePieces}): a new 256 KiB buffer per piece is
 * zero-filled, mapped, and collected by V8 again, which measured ~0.3 CPU-s per GiB served,
 * as much as sending it. So `arca serve` lets a stream write piece k's memory again for
 * piece k + {@link PIECE_RING}. That is safe only for a consumer that is done with a piece
 * before it has taken {@link PIECE_RING} - 1 more, which `Deno.serve` is: it writes one
 * piece at a time into its response channel (capacity one), and hyper holds a bounded
 * amount of unwritten body (~400 KiB for HTTP/1.1; HTTP/2's send buffer is of the same
 * order). Measured by reusing on purpose too early (docs/BENCHMARKS.md): bodies came out
 * wrong with a ring of 3 over HTTP/1.1 and of 4 over HTTP/2, and right from 4 and 5 on;
 * tests/net/server_pieces_test.ts sends NARs of many pieces to fast and slow clients over
 * both and fails with a ring of 3. Anything that collects pieces (`Response.arrayBuffer`,
 * `for await` into an array) must not ask for reuse. Rings take memory from one budget
 * ({@link RING_BUDGET_BYTES} in the process); a stream beyond it gets fresh pieces, and so
 * does a stream of no more than {@link PIECE_RING} pieces, which would never reuse one.
 * @module
 */

import { IntegrityError, NotFoundError } from "../errors.ts";
import { loadLibc, readFileRangeSync } from "./libc.ts";
import type { Manifest, ManifestEntry } from "./manifest.ts";

/** Bytes of each piece of a stored NAR's stream (but the last). */
export const PIECE_BYTES = 256 * 1024;

/** Pieces after which a stream with reused pieces writes a piece's memory again. */
export const PIECE_RING = 16;

/** Most bytes all streams' rings hold at once (16 streams of large NARs). */
const RING_BUDGET_BYTES = 16 * PIECE_RING * (PIECE_BYTES + 1);

/** Bytes the rings of open streams hold now. */
let ringBytes = 0;

/** Gives back the budget of a stream dropped without being finished or cancelled. */
const dropped = new FinalizationRegistry<{ bytes: number }>((ring) => {
  ringBytes -= ring.bytes;
});

/** The chunk files of a manifest, in its order, also NUL-terminated for libc. */
export interface ChunkFiles {
  paths: readonly string[];
  cPaths: readonly Uint8Array[];
}

/** How {@link openNarPieces} reads. */
export interface NarPieceOptions {
  /** Only bytes `[start, end)` of the NAR file (default: all of it). */
  range?: { start: number; end: number };
  /**
   * Write piece k's memory again for piece k + {@link PIECE_RING} (see the module comment):
   * only for a consumer done with each piece soon after, such as `Deno.serve`.
   */
  reusePieces?: boolean;
}

/**
 * The NAR file of `manifest` (or a range of it) as pieces of {@link PIECE_BYTES}, read
 * synchronously from its chunk files one piece per pull (from the page cache ~2 GB/s; like
 * nginx's blocking `sendfile`, a cold disk holds up the event loop while a piece is read).
 */
export function openNarPieces(
  manifest: Manifest,
  files: ChunkFiles,
  options: NarPieceOptions = {},
): ReadableStream<Uint8Array> {
  const entries = manifest.chunks;
  const { start, end } = options.range ?? { start: 0, end: manifest.fileSize };
  let index = 0;
  let chunkStart = 0;
  while (index < entries.length && chunkStart + entries[index].storedSize <= start) {
    chunkStart += entries[index].storedSize;
    index++;
  }
  let position = start;
  const ring: Uint8Array<ArrayBuffer>[] = [];
  // What this stream's ring counts against the budget (an object for the registry).
  const ringSize = { bytes: 0 };
  let pieces = 0;
  const release = () => {
    ringBytes -= ringSize.bytes;
    ringSize.bytes = 0;
    ring.length = 0;
  };
  // A ring only where it will be used again: more pieces than it holds.
  const useRing = options.reusePieces === true && end - start > PIECE_RING * PIECE_BYTES;
  /** The buffer of the next piece: one of the ring's, or a fresh one. */
  const bufferFor = (length: number): Uint8Array<ArrayBuffer> => {
    if (!useRing) return new Uint8Array(length + 1);
    const slot = pieces % PIECE_RING;
    const reused = ring[slot];
    if (reused !== undefined) return reused;
    const size = PIECE_BYTES + 1;
    if (ring.length !== slot || ringBytes + size > RING_BUDGET_BYTES) {
      return new Uint8Array(length + 1);
    }
    const buffer = new Uint8Array(size);
    ring.push(buffer);
    ringSize.bytes += size;
    ringBytes += size;
    return buffer;
  };
  const stream = new ReadableStream<Uint8Array>({
    pull(controller) {
      if (position >= end) {
        release();
        controller.close();
        return;
      }
      const length = Math.min(PIECE_BYTES, end - position);
      const buffer = bufferFor(length);
      pieces++;
      let filled = 0;
      try {
        while (filled < length) {
          const entry = entries[index];
          const from = position - chunkStart;
          const to = Math.min(entry.storedSize, from + length - filled);
          readChunkRange(files.paths[index], entry, buffer.subarray(filled), {
            from,
            to,
            cPath: files.cPaths[index],
          });
          filled += to - from;
          position += to - from;
          if (to === entry.storedSize) {
            chunkStart += entry.storedSize;
            index++;
          }
        }
      } catch (error) {
        release();
        throw error;
      }
      controller.enqueue(buffer.subarray(0, length));
    },
    cancel() {
      release();
    },
  }, { highWaterMark: 1 });
  if (useRing) dropped.register(stream, ringSize);
  return stream;
}

/**
 * The whole NAR file of `manifest`, read now into one buffer (for small NARs: a plain
 * HTTP body is cheaper than a stream). Errors as {@link openNarPieces}' stream does.
 */
export function readNarFile(manifest: Manifest, files: ChunkFiles): Uint8Array<ArrayBuffer> {
  // One spare byte: the last chunk's end-of-file check reads into it.
  const buffer = new Uint8Array(manifest.fileSize + 1);
  let offset = 0;
  manifest.chunks.forEach((entry, index) => {
    readChunkRange(files.paths[index], entry, buffer.subarray(offset), {
      from: 0,
      to: entry.storedSize,
      cPath: files.cPaths[index],
    });
    offset += entry.storedSize;
  });
  return buffer.subarray(0, manifest.fileSize);
}

/**
 * Reads bytes `[from, to)` of a chunk file into the start of `target`. When `to` is the
 * chunk's end, the file must end there too, and `target` must have one byte of room after
 * the range (scratch for that check). NotFoundError when the file is absent,
 * IntegrityError when it is shorter or longer than the manifest says. With `cPath` (the
 * path NUL-terminated), through libc where it can, with Deno's API saying what is wrong.
 */
export function readChunkRange(
  path: string,
  entry: ManifestEntry,
  target: Uint8Array,
  range: { from: number; to: number; cPath?: Uint8Array },
): void {
  const { from, to, cPath } = range;
  const atEnd = to === entry.storedSize;
  const lib = cPath === undefined ? null : loadLibc();
  if (
    lib !== null &&
    readFileRangeSync(lib, cPath!, target, { offset: from, length: to - from, atEnd })
  ) {
    return;
  }
  let file: Deno.FsFile;
  try {
    file = Deno.openSync(path, { read: true });
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      throw new NotFoundError(`Chunk not found: ${entry.id}`, { cause: error });
    }
    throw error;
  }
  try {
    const size = file.statSync().size;
    if (size !== entry.storedSize) {
      throw new IntegrityError(
        `Chunk ${entry.id} has ${size} bytes, manifest says ${entry.storedSize}`,
      );
    }
    file.seekSync(from, Deno.SeekMode.Start);
    let filled = 0;
    while (filled < to - from) {
      const n = file.readSync(target.subarray(filled, to - from));
      if (n === null) break;
      filled += n;
    }
    if (filled !== to - from) {
      throw new IntegrityError(`Chunk ${entry.id} ended after ${from + filled} bytes`);
    }
  } finally {
    file.close();
  }
}
