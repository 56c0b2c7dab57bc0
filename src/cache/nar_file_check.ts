/**
 * Hashes a (compressed) NAR file and validates and hashes the NAR inside it as the file's
 * pieces come. For large files, decompressing, validating and hashing the NAR (two to three
 * times the work of receiving, writing and hashing the file) runs on a Worker
 * (nar_check_worker.ts), beside the thread that receives the upload; at most
 * {@link IN_FLIGHT_BYTES} of the file wait for it. Small files are checked in-thread (a
 * Worker takes ~30 ms to start).
 * @module
 */

import { decompressStream, type UploadCompression } from "./decompress_stream.ts";
import { createSha256, formatNixHash } from "./hash.ts";
import { NarParser } from "./nar.ts";
import type { NarCheckReply, NarCheckRequest } from "./nar_check_worker.ts";
import { FormatError, IntegrityError } from "../errors.ts";

/** Files at least this large (by their announced size) are checked on a Worker. */
export const WORKER_CHECK_BYTES = 4 * 1024 * 1024;

/** Bytes of file handed to the Worker and not yet consumed before a push waits. */
const IN_FLIGHT_BYTES = 16 * 1024 * 1024;

/** A NAR file, checked: its SHA-256 and size, and its NAR's (hashes as `sha256:<nix32>`). */
export interface CheckedNarFile {
  fileHash: string;
  fileSize: number;
  narHash: string;
  narSize: number;
}

/** A check of a NAR file fed piece by piece. */
export interface NarFileChecker {
  /** Feeds a piece (which the checker may take over: do not use it afterwards). */
  push(piece: Uint8Array): Promise<void>;
  /** Ends the file: its hashes, or FormatError when it holds no valid NAR. */
  finish(): Promise<CheckedNarFile>;
  /** Abandons the check. */
  close(): void;
}

/** Checks on Workers at once at most (more large uploads at a time are checked in-thread). */
const MAX_WORKER_CHECKS = Math.max(1, navigator.hardwareConcurrency ?? 1);
let workerChecks = 0;

/**
 * A checker for a file in `compression` of about `sizeHint` bytes: on a Worker when it is
 * large and fewer than {@link MAX_WORKER_CHECKS} run, else in-thread.
 */
export function checkNarFile(compression: UploadCompression, sizeHint?: number): NarFileChecker {
  const large = sizeHint !== undefined && sizeHint >= WORKER_CHECK_BYTES;
  return large && workerChecks < MAX_WORKER_CHECKS
    ? new WorkerNarFileCheck(compression)
    : new InlineNarFileCheck(compression);
}

/** Validates (NarParser) and hashes a NAR stream. */
export async function hashAndValidateNar(
  nar: ReadableStream<Uint8Array>,
): Promise<{ narHash: string; narSize: number }> {
  const parser = new NarParser();
  const hash = createSha256();
  let size = 0;
  for await (const piece of nar) {
    parser.push(piece);
    hash.update(piece);
    size += piece.length;
  }
  parser.end();
  return { narHash: formatNixHash(hash.digest()), narSize: size };
}

/** The file's own hash and size, counted as its pieces pass. */
class FileHash {
  #hash = createSha256();
  #size = 0;

  update(piece: Uint8Array): void {
    this.#hash.update(piece);
    this.#size += piece.length;
  }

  result(): { fileHash: string; fileSize: number } {
    return { fileHash: formatNixHash(this.#hash.digest()), fileSize: this.#size };
  }
}

/** The in-thread checker. */
class InlineNarFileCheck implements NarFileChecker {
  #writer: WritableStreamDefaultWriter<Uint8Array>;
  #result: Promise<{ narHash: string; narSize: number }>;
  #file = new FileHash();

  constructor(compression: UploadCompression) {
    const decompress = decompressStream(compression);
    this.#writer = decompress.writable.getWriter();
    this.#result = hashAndValidateNar(decompress.readable);
    this.#result.catch(() => {});
  }

  async push(piece: Uint8Array): Promise<void> {
    this.#file.update(piece);
    try {
      await this.#writer.write(piece);
    } catch (error) {
      // The write fails with the reason the reading side gave up, if any: say why.
      await this.#result;
      throw error;
    }
  }

  async finish(): Promise<CheckedNarFile> {
    await this.#writer.close().catch(() => {});
    return { ...this.#file.result(), ...await this.#result };
  }

  close(): void {
    this.#writer.abort().catch(() => {});
  }
}

/** The checker on a Worker; {@link WorkerNarFileCheck.finish} or `close` ends it. */
class WorkerNarFileCheck implements NarFileChecker {
  #worker: Worker;
  #file = new FileHash();
  #inFlight = 0;
  #moved = Promise.withResolvers<void>();
  #result = Promise.withResolvers<{ narHash: string; narSize: number }>();
  #settled = false;
  #closed = false;

  constructor(compression: UploadCompression) {
    workerChecks++;
    this.#worker = new Worker(new URL("./nar_check_worker.ts", import.meta.url), {
      type: "module",
    });
    this.#result.promise.catch(() => {});
    this.#worker.onmessage = (event: MessageEvent<NarCheckReply>) => {
      const reply = event.data;
      if (reply.op === "ack") {
        this.#inFlight -= reply.bytes;
      } else if (reply.op === "done") {
        const { narHash, narSize } = reply;
        this.#settle(() => this.#result.resolve({ narHash, narSize }));
      } else {
        const error = reply.name === "IntegrityError"
          ? new IntegrityError(reply.message)
          : new FormatError(reply.message);
        this.#settle(() => this.#result.reject(error));
      }
      this.#wake();
    };
    this.#worker.onerror = (event) => {
      event.preventDefault();
      this.#settle(() => this.#result.reject(new Error(`NAR check failed: ${event.message}`)));
      this.#wake();
    };
    this.#post({ op: "start", compression });
  }

  /**
   * Hashes a piece and hands it over (its buffer transferred when it can be: the caller
   * must not use the piece afterwards); waits while the Worker is behind. Rejects as soon
   * as the check failed.
   */
  async push(piece: Uint8Array): Promise<void> {
    while (!this.#settled && this.#inFlight > IN_FLIGHT_BYTES) await this.#moved.promise;
    if (this.#settled) {
      await this.#result.promise; // rejects, unless it already succeeded (too much input)
      throw new FormatError("The NAR ended before its file did");
    }
    this.#file.update(piece);
    this.#inFlight += piece.length;
    const whole = piece.byteOffset === 0 && piece.byteLength === piece.buffer.byteLength &&
      piece.buffer instanceof ArrayBuffer;
    const bytes = whole ? piece : piece.slice();
    this.#post({ op: "piece", bytes }, [bytes.buffer as ArrayBuffer]);
  }

  async finish(): Promise<CheckedNarFile> {
    this.#post({ op: "end" });
    try {
      return { ...this.#file.result(), ...await this.#result.promise };
    } finally {
      this.close();
    }
  }

  close(): void {
    this.#settle(() => this.#result.reject(new Error("The NAR check was stopped")));
    if (this.#closed) return;
    this.#closed = true;
    workerChecks--;
    this.#worker.terminate();
  }

  #post(message: NarCheckRequest, transfer: Transferable[] = []): void {
    this.#worker.postMessage(message, transfer);
  }

  #settle(settle: () => void): void {
    if (this.#settled) return;
    this.#settled = true;
    settle();
  }

  #wake(): void {
    this.#moved.resolve();
    this.#moved = Promise.withResolvers();
  }
}
