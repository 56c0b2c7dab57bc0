/**
 * The Worker of `NarFileCheck` (nar_file_check.ts): decompresses an uploaded NAR file as
 * its pieces come, validates the NAR and hashes it, off the thread that receives the file.
 * Messages in: `{ op: "start", compression }`, then `{ op: "piece", bytes }` (transferred)
 * and `{ op: "end" }`. Messages out: `{ op: "ack", bytes }` as each piece is consumed (the
 * sender's flow control), then `{ op: "done", narHash, narSize }` or
 * `{ op: "error", name, message }`.
 * @module
 */

import { decompressStream, type UploadCompression } from "./decompress_stream.ts";
import { hashAndValidateNar } from "./nar_file_check.ts";

/** A message to the Worker. */
export type NarCheckRequest =
  | { op: "start"; compression: UploadCompression }
  | { op: "piece"; bytes: Uint8Array }
  | { op: "end" };

/** A message from the Worker. */
export type NarCheckReply =
  | { op: "ack"; bytes: number }
  | { op: "done"; narHash: string; narSize: number }
  | { op: "error"; name: string; message: string };

interface WorkerScope {
  onmessage: ((event: MessageEvent<NarCheckRequest>) => void) | null;
  postMessage(message: NarCheckReply): void;
}

const scope = globalThis as unknown as WorkerScope;
let input: ReadableStreamDefaultController<Uint8Array> | undefined;

scope.onmessage = (event) => {
  const message = event.data;
  if (message.op === "start") {
    const source = new ReadableStream<Uint8Array>({
      start(controller) {
        input = controller;
      },
    });
    const acked = new TransformStream<Uint8Array, Uint8Array>({
      transform(piece, controller) {
        controller.enqueue(piece);
        scope.postMessage({ op: "ack", bytes: piece.length });
      },
    });
    check(source.pipeThrough(acked).pipeThrough(decompressStream(message.compression)));
    return;
  }
  // After a failure the stream is cancelled: what still comes is dropped.
  try {
    if (message.op === "piece") input?.enqueue(message.bytes);
    else input?.close();
  } catch { /* cancelled */ }
};

async function check(nar: ReadableStream<Uint8Array>): Promise<void> {
  try {
    const { narHash, narSize } = await hashAndValidateNar(nar);
    scope.postMessage({ op: "done", narHash, narSize });
  } catch (error) {
    const { name, message } = error instanceof Error ? error : new Error(String(error));
    scope.postMessage({ op: "error", name: error?.constructor?.name ?? name, message });
  }
}
