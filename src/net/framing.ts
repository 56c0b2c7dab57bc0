/**
 * Length-prefixed frames over a byte stream, as pure code: an encoder and a push decoder
 * that a driver feeds with whatever chunks the socket delivers.
 *
 * Format: `u32 big-endian length ‖ payload`. A frame may be empty.
 *
 * Size limit: the decoder refuses a length over `maxFrameSize` as soon as the 4 length bytes
 * are in, before buffering anything of the payload, so a hostile peer cannot make us
 * allocate more than the limit per connection. The default is 65535 bytes, the largest Noise
 * message (a frame carries exactly one Noise handshake or transport message; larger
 * application messages are split into several transport messages by the secure channel,
 * src/net/secure_channel.ts). The same limit also holds before authentication, which is
 * what matters: an unauthenticated client can pin at most 64 KiB.
 * @module
 */

import { ProtocolError } from "../errors.ts";

/** Size of the length prefix. */
export const FRAME_HEADER_SIZE = 4;
/** Default and usual frame size limit: one Noise message (65535 bytes). */
export const DEFAULT_MAX_FRAME_SIZE = 65535;
/** The largest length a u32 prefix can express. */
const U32_MAX = 0xffff_ffff;

/** Options of {@link encodeFrame}. */
export interface EncodeFrameOptions {
  /** Refuse payloads larger than this (default {@link DEFAULT_MAX_FRAME_SIZE}). */
  maxFrameSize?: number;
}

/**
 * Encodes one frame: the 4-byte big-endian length, then `payload`.
 *
 * @example
 * ```ts
 * encodeFrame(Uint8Array.of(7)); // Uint8Array [0, 0, 0, 1, 7]
 * ```
 */
export function encodeFrame(payload: Uint8Array, options: EncodeFrameOptions = {}): Uint8Array {
  const limit = Math.min(options.maxFrameSize ?? DEFAULT_MAX_FRAME_SIZE, U32_MAX);
  if (payload.length > limit) {
    throw new ProtocolError(`Frame too large: ${payload.length} bytes, limit ${limit}`);
  }
  const frame = new Uint8Array(FRAME_HEADER_SIZE + payload.length);
  new DataView(frame.buffer).setUint32(0, payload.length);
  frame.set(payload, FRAME_HEADER_SIZE);
  return frame;
}

/** Options of {@link FrameDecoder}. */
export interface FrameDecoderOptions {
  /** Largest payload accepted (default {@link DEFAULT_MAX_FRAME_SIZE}). */
  maxFrameSize?: number;
}

/**
 * A push decoder: feed it chunks with {@link push}, get back the frames they complete.
 * Chunks may split frames anywhere, including inside the length prefix. After it has
 * thrown, the decoder refuses further input.
 *
 * @example
 * ```ts
 * const decoder = new FrameDecoder({ maxFrameSize: 1024 });
 * decoder.push(Uint8Array.of(0, 0)); // []
 * decoder.push(Uint8Array.of(0, 1, 7, 0)); // [Uint8Array [7]]
 * ```
 */
export class FrameDecoder {
  readonly #maxFrameSize: number;
  readonly #header = new Uint8Array(FRAME_HEADER_SIZE);
  #headerFill = 0;
  /** The payload being filled, allocated once its (accepted) length is known. */
  #payload: Uint8Array | null = null;
  #payloadFill = 0;
  #failed: ProtocolError | null = null;

  /** Creates a decoder with the given size limit. */
  constructor(options: FrameDecoderOptions = {}) {
    const limit = options.maxFrameSize ?? DEFAULT_MAX_FRAME_SIZE;
    if (!Number.isInteger(limit) || limit < 0 || limit > U32_MAX) {
      throw new RangeError(`Invalid maximum frame size: ${limit}`);
    }
    this.#maxFrameSize = limit;
  }

  /** The frame size limit. */
  get maxFrameSize(): number {
    return this.#maxFrameSize;
  }

  /** Bytes received of the frame in progress, header included (0 between frames). */
  get buffered(): number {
    return this.#payload === null ? this.#headerFill : FRAME_HEADER_SIZE + this.#payloadFill;
  }

  /** Whether the decoder stands at a frame boundary (an end of stream here is clean). */
  get idle(): boolean {
    return this.#headerFill === 0 && this.#payload === null;
  }

  /**
   * Consumes `bytes` and returns every frame completed by them, in order. Throws
   * {@link ProtocolError} on a length over the limit (before buffering its payload).
   */
  push(bytes: Uint8Array): Uint8Array[] {
    if (this.#failed !== null) {
      throw new ProtocolError(`Frame decoder failed earlier: ${this.#failed.message}`);
    }
    const frames: Uint8Array[] = [];
    let offset = 0;
    while (offset < bytes.length) {
      if (this.#payload === null) {
        const take = Math.min(FRAME_HEADER_SIZE - this.#headerFill, bytes.length - offset);
        this.#header.set(bytes.subarray(offset, offset + take), this.#headerFill);
        this.#headerFill += take;
        offset += take;
        if (this.#headerFill < FRAME_HEADER_SIZE) break;
        const length = new DataView(this.#header.buffer).getUint32(0);
        if (length > this.#maxFrameSize) {
          this.#failed = new ProtocolError(
            `Frame too large: ${length} bytes announced, limit ${this.#maxFrameSize}`,
          );
          throw this.#failed;
        }
        this.#headerFill = 0;
        this.#payload = new Uint8Array(length);
        this.#payloadFill = 0;
      }
      const payload = this.#payload;
      const take = Math.min(payload.length - this.#payloadFill, bytes.length - offset);
      payload.set(bytes.subarray(offset, offset + take), this.#payloadFill);
      this.#payloadFill += take;
      offset += take;
      if (this.#payloadFill === payload.length) {
        frames.push(payload);
        this.#payload = null;
        this.#payloadFill = 0;
      }
    }
    // A frame of length 0 whose header ends the chunk is complete too.
    if (this.#payload !== null && this.#payload.length === 0) {
      frames.push(this.#payload);
      this.#payload = null;
    }
    return frames;
  }

  /** Checks that the stream ended at a frame boundary; throws {@link ProtocolError} if not. */
  end(): void {
    if (this.#failed !== null) {
      throw new ProtocolError(`Frame decoder failed earlier: ${this.#failed.message}`);
    }
    if (!this.idle) {
      throw new ProtocolError(
        `Stream ended inside a frame: ${this.buffered} bytes of an incomplete frame`,
      );
    }
  }
}
