/**
 * The Worker side of `ChunkCompressor` (compression.ts). The first message is a
 * `CompressionConfig`; every later one is a batch `[data, lengths]` (chunks concatenated in
 * one ArrayBuffer, their lengths in a Uint32Array's buffer), answered in order with the
 * batch's frames/streams in the same shape, both buffers transferred, or with
 * `{ error: { name, message } }` for the whole batch.
 * @module
 */

import {
  compressChunk,
  type CompressionBatch,
  type CompressionConfig,
  type CompressionReply,
} from "./compression.ts";

/** The part of the Worker global scope this module uses. */
interface WorkerScope {
  onmessage: ((event: MessageEvent<CompressionConfig | CompressionBatch>) => void) | null;
  postMessage(message: CompressionReply, transfer: Transferable[]): void;
}

const scope = globalThis as unknown as WorkerScope;
let config: CompressionConfig | undefined;

scope.onmessage = (event) => {
  const message = event.data;
  if (!Array.isArray(message)) {
    config = message;
    return;
  }
  try {
    if (config === undefined) throw new Error("No compression configured");
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
  } catch (error) {
    const e = error instanceof Error ? error : new Error(String(error));
    scope.postMessage({ error: { name: e.name, message: e.message } }, []);
  }
};
