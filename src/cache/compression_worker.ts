/**
 * The Worker side of `ChunkCompressor` (compression.ts). The first message is a
 * `CompressionConfig`; every later one is answered in order, its buffers transferred:
 * - a compression batch `[data, lengths]` (chunks concatenated in one ArrayBuffer, their
 *   lengths in a Uint32Array's buffer) with the batch's frames/streams in the same shape;
 * - a `StoreRequest` with `{ op: "store", batch, data }`: the chunks hashed, looked up,
 *   compressed and written as temporary files by chunk_store.ts `ChunkBatchStorer` (this
 *   Worker does file I/O), and the request's `data` buffer handed back for reuse;
 * - a `LinkRequest` with `{ op: "link", created }` (chunk_store.ts `linkTemporaryFiles`);
 * or, when a request fails, with `{ error: { name, message } }` for the whole request.
 * @module
 */

import { ChunkBatchStorer, linkTemporaryFiles } from "./chunk_store.ts";
import {
  compressChunk,
  type CompressionBatch,
  type CompressionConfig,
  type CompressionReply,
  type CompressionRequest,
} from "./compression.ts";

/** The part of the Worker global scope this module uses. */
interface WorkerScope {
  onmessage: ((event: MessageEvent<CompressionRequest>) => void) | null;
  postMessage(message: CompressionReply, transfer: Transferable[]): void;
}

const scope = globalThis as unknown as WorkerScope;
let config: CompressionConfig | undefined;
let storer: ChunkBatchStorer | undefined;

function compressBatch(message: CompressionBatch, config: CompressionConfig): void {
  const { compression, level } = config;
  const data = new Uint8Array(message[0]);
  const lengths = new Uint32Array(message[1]);
  const frames: Uint8Array[] = [];
  let offset = 0;
  let total = 0;
  for (const length of lengths) {
    const frame = compressChunk(data.subarray(offset, offset + length), compression, { level });
    offset += length;
    total += frame.length;
    frames.push(frame);
  }
  const out = new Uint8Array(total);
  const outLengths = new Uint32Array(frames.length);
  offset = 0;
  frames.forEach((frame, i) => {
    out.set(frame, offset);
    offset += frame.length;
    outLengths[i] = frame.length;
  });
  const reply: CompressionBatch = [out.buffer, outLengths.buffer];
  scope.postMessage(reply, reply);
}

scope.onmessage = (event) => {
  const message = event.data;
  if (!Array.isArray(message) && !("op" in message)) {
    config = message;
    storer = undefined;
    return;
  }
  try {
    if (config === undefined) throw new Error("No compression configured");
    if (Array.isArray(message)) {
      compressBatch(message, config);
    } else if (message.op === "store") {
      storer ??= new ChunkBatchStorer(config.compression, config.level);
      const batch = storer.store(
        new Uint8Array(message.data),
        new Uint32Array(message.lengths),
        message.target,
        message.spare,
      );
      scope.postMessage({ op: "store", batch, data: message.data }, [
        batch.frames,
        batch.frameLengths,
        batch.found,
        message.data,
      ]);
    } else {
      const created = linkTemporaryFiles(message.pairs);
      scope.postMessage({ op: "link", created: created.buffer }, [created.buffer]);
    }
  } catch (error) {
    const e = error instanceof Error ? error : new Error(String(error));
    scope.postMessage({ error: { name: e.name, message: e.message } }, []);
  }
};
