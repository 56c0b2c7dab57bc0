/**
 * The secure channel: runs a `Noise_XXpsk3_25519_ChaChaPoly_BLAKE2b` handshake
 * (src/net/noise.ts) over any byte duplex (a `Deno.TcpConn`, or {@link memoryDuplexPair}
 * in tests), then carries authenticated, encrypted application messages of any size up to
 * a limit. This is the I/O driver; the protocol state lives in noise.ts and framing.ts.
 *
 * Wire format. Every Noise message, handshake or transport, travels as one frame
 * (src/net/framing.ts: `u32 BE length ‖ bytes`, at most 65535 bytes). The three handshake
 * messages carry empty payloads; the prologue defaults to {@link SECURE_CHANNEL_PROLOGUE}.
 * Each transport message decrypts to a record `type (1 byte) ‖ body`:
 *
 * | type | name | body |
 * |---|---|---|
 * | 0 | `END`   | the last (or only) fragment of an application message |
 * | 1 | `MORE`  | a fragment; more of the same message follow |
 * | 2 | `CLOSE` | empty: the sender sends nothing more |
 * | 3 | `READY` | empty: the responder's key confirmation, its first transport message |
 *
 * A message is split into fragments of at most 65518 bytes (65535 - 16-byte tag - 1 type
 * byte); a 0-byte message is one empty `END` record. The receiver refuses a message that
 * grows over `maxMessageSize` (default 16 MiB).
 *
 * Key confirmation: in XXpsk3 the PSK is mixed in at the end of message 3, so only the
 * responder can tell a wrong PSK; the initiator's handshake resolves only once it has
 * decrypted the responder's `READY`. So with different topic keys both sides fail with
 * {@link ProtocolError} and no application message is ever delivered.
 *
 * Rekey: each direction counts its transport messages (`READY` and `CLOSE` included) and
 * both ends call Noise's `Rekey()` on that direction's cipher after every
 * `maxMessagesPerKey`-th message (default 65536), in lockstep since delivery is ordered.
 *
 * Close: {@link SecureChannel.close} sends `CLOSE` and waits (up to `closeTimeoutMs`) for
 * the peer's `CLOSE` or end of stream, then closes the connection. A peer receiving
 * `CLOSE` answers with its own `CLOSE` and closes: its `receive()` gives `null` after the
 * messages already delivered. An end of stream at a message boundary also reads as `null`;
 * one inside a frame or a fragmented message is a {@link ProtocolError}, as is any frame
 * that fails to decrypt. Protocol errors drop the connection at once.
 *
 * Limits against hostile peers: frames over 65535 bytes are refused from their length
 * prefix; a handshake not finished within `handshakeTimeoutMs` (default 5 s) is dropped.
 * Backpressure: the reader stops reading the socket while 1 MiB (or 256 messages) of
 * received messages wait for `receive()`.
 * @module
 */

import { ProtocolError } from "../errors.ts";
import { DEFAULT_MAX_FRAME_SIZE, encodeFrame, FRAME_HEADER_SIZE, FrameDecoder } from "./framing.ts";
import {
  type CipherState,
  NOISE_MAX_MESSAGE_SIZE,
  NOISE_TAG_SIZE,
  NoiseHandshake,
  type PrivateKeyInput,
} from "./noise.ts";

/** A byte duplex, as `Deno.TcpConn` provides one. */
export interface DuplexConn {
  readable: ReadableStream<Uint8Array>;
  writable: WritableStream<Uint8Array>;
  /** Closes both directions (pending reads end or reject). */
  close(): void;
}

/** Options of {@link openSecureChannel}. */
export interface SecureChannelOptions {
  /** Whether this side sends the first handshake message (the side that connected). */
  initiator: boolean;
  /** This node's static X25519 key pair (its identity). */
  staticKey: PrivateKeyInput;
  /** The 32-byte pre-shared key: `deriveTopicKeys(topic).psk` (src/net/topic.ts). */
  psk: Uint8Array;
  /** Handshake prologue; both sides must use the same (default {@link SECURE_CHANNEL_PROLOGUE}). */
  prologue?: Uint8Array;
  /** The whole handshake, key confirmation included, must finish in this time (default 5000). */
  handshakeTimeoutMs?: number;
  /** Rekey each direction after this many transport messages (default 65536). */
  maxMessagesPerKey?: number;
  /** Largest application message sent or accepted, in bytes (default 16 MiB). */
  maxMessageSize?: number;
  /** How long {@link SecureChannel.close} waits for the peer's CLOSE (default 2000 ms). */
  closeTimeoutMs?: number;
}

/** An open, authenticated, encrypted message channel. */
export interface SecureChannel {
  /** The peer's static X25519 public key (its node identity), authenticated by the handshake. */
  readonly remoteStatic: Uint8Array;
  /** The Noise handshake hash: the same on both ends, unique to this session. */
  readonly handshakeHash: Uint8Array;
  /**
   * Sends one message (any size up to `maxMessageSize`). Messages arrive whole and in order.
   * Encrypts at once, so `message` may be reused as soon as the call returns; the promise
   * resolves when the bytes are handed to the connection.
   */
  send(message: Uint8Array): Promise<void>;
  /** The next message, or `null` once the peer (or this side) has closed the channel. */
  receive(): Promise<Uint8Array | null>;
  /** Closes the channel cleanly (the peer's `receive()` gives `null`); idempotent. */
  close(): Promise<void>;
  /** Resolves once the channel is closed for any reason and its connection released. */
  readonly closed: Promise<void>;
}

/** Default handshake prologue: names the protocol and its version. */
export const SECURE_CHANNEL_PROLOGUE: Uint8Array = new TextEncoder().encode(
  "pares-arca secure channel v1",
);
/** Largest application bytes in one transport message. */
export const MAX_FRAGMENT_SIZE = NOISE_MAX_MESSAGE_SIZE - NOISE_TAG_SIZE - 1;
/** Bytes on the wire per transport message beyond its application bytes (header, type, tag). */
export const TRANSPORT_OVERHEAD = FRAME_HEADER_SIZE + 1 + NOISE_TAG_SIZE;
/** Default limit on one application message. */
export const DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024;
/** Default number of transport messages per key and direction before a rekey. */
export const DEFAULT_MAX_MESSAGES_PER_KEY = 65536;

const RECORD_END = 0;
const RECORD_MORE = 1;
const RECORD_CLOSE = 2;
const RECORD_READY = 3;
const EMPTY = new Uint8Array(0);
/** Writes are batched up to about this many bytes. */
const WRITE_BATCH = 256 * 1024;
const INBOX_HIGH_BYTES = 1024 * 1024;
const INBOX_HIGH_COUNT = 256;

/** Reads frames off a byte stream. */
class FrameReader {
  readonly #reader: ReadableStreamDefaultReader<Uint8Array>;
  readonly #decoder = new FrameDecoder({ maxFrameSize: DEFAULT_MAX_FRAME_SIZE });
  #queue: Uint8Array[] = [];
  #head = 0;

  constructor(reader: ReadableStreamDefaultReader<Uint8Array>) {
    this.#reader = reader;
  }

  /** The next frame, or null at a clean end of stream. */
  async next(): Promise<Uint8Array | null> {
    while (this.#head === this.#queue.length) {
      const { value, done } = await this.#reader.read();
      if (done) {
        this.#decoder.end();
        return null;
      }
      this.#queue = this.#decoder.push(value);
      this.#head = 0;
    }
    return this.#queue[this.#head++];
  }
}

function closeQuietly(conn: DuplexConn): void {
  try {
    conn.close();
  } catch {
    // Already closed (Deno closes a TcpConn by itself at end of stream).
  }
}

function asProtocolError(error: unknown, context: string): ProtocolError {
  if (error instanceof ProtocolError) return error;
  const detail = error instanceof Error ? error.message : String(error);
  return new ProtocolError(`${context}: ${detail}`, { cause: error });
}

function positiveInteger(value: number | undefined, fallback: number, name: string): number {
  const n = value ?? fallback;
  if (!Number.isSafeInteger(n) || n < 1) throw new RangeError(`Invalid ${name}: ${value}`);
  return n;
}

/**
 * Runs the Noise handshake over `conn` and returns the open channel. Rejects with
 * {@link ProtocolError} (and closes `conn`) when the handshake fails, the peer has another
 * PSK, sends garbage or oversize frames, or does not finish within `handshakeTimeoutMs`.
 *
 * @example
 * ```ts
 * const conn = await Deno.connect({ hostname: "127.0.0.1", port });
 * const channel = await openSecureChannel(conn, { initiator: true, staticKey, psk });
 * await channel.send(new TextEncoder().encode("hello"));
 * await channel.close();
 * ```
 */
export async function openSecureChannel(
  conn: DuplexConn,
  options: SecureChannelOptions,
): Promise<SecureChannel> {
  const handshakeTimeoutMs = positiveInteger(options.handshakeTimeoutMs, 5000, "handshake timeout");
  const settings = {
    maxMessagesPerKey: positiveInteger(
      options.maxMessagesPerKey,
      DEFAULT_MAX_MESSAGES_PER_KEY,
      "messages per key",
    ),
    maxMessageSize: positiveInteger(
      options.maxMessageSize,
      DEFAULT_MAX_MESSAGE_SIZE,
      "maximum message size",
    ),
    closeTimeoutMs: positiveInteger(options.closeTimeoutMs, 2000, "close timeout"),
  };
  let handshake: NoiseHandshake;
  try {
    handshake = new NoiseHandshake({
      initiator: options.initiator,
      pattern: "XXpsk3",
      staticKey: options.staticKey,
      psk: options.psk,
      prologue: options.prologue ?? SECURE_CHANNEL_PROLOGUE,
    });
  } catch (error) {
    closeQuietly(conn);
    throw error;
  }

  let reader: ReadableStreamDefaultReader<Uint8Array> | undefined;
  let writer: WritableStreamDefaultWriter<Uint8Array> | undefined;
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    closeQuietly(conn);
  }, handshakeTimeoutMs);
  try {
    reader = conn.readable.getReader();
    writer = conn.writable.getWriter();
    const frames = new FrameReader(reader);
    let index = 0;
    while (!handshake.complete) {
      index++;
      if (handshake.nextAction === "write") {
        await writer.write(encodeFrame(handshake.writeMessage()));
      } else {
        const frame = await frames.next();
        if (frame === null) {
          throw new ProtocolError(
            `Noise handshake failed: the peer closed the connection before message ${index}`,
          );
        }
        handshake.readMessage(frame);
      }
    }
    const remoteStatic = handshake.remoteStatic!;
    const channel = new Channel(conn, writer, frames, {
      ...settings,
      ciphers: handshake.split(),
      remoteStatic,
      handshakeHash: handshake.handshakeHash,
    });
    await channel.confirm(options.initiator);
    clearTimeout(timer);
    channel.start();
    return channel;
  } catch (error) {
    clearTimeout(timer);
    closeQuietly(conn);
    if (timedOut) {
      throw new ProtocolError(`Noise handshake timed out after ${handshakeTimeoutMs} ms`, {
        cause: error,
      });
    }
    throw asProtocolError(error, "Noise handshake failed");
  } finally {
    clearTimeout(timer);
  }
}

interface ChannelSettings {
  maxMessagesPerKey: number;
  maxMessageSize: number;
  closeTimeoutMs: number;
  ciphers: { send: CipherState; receive: CipherState };
  remoteStatic: Uint8Array;
  handshakeHash: Uint8Array;
}

class Channel implements SecureChannel {
  readonly #conn: DuplexConn;
  readonly #writer: WritableStreamDefaultWriter<Uint8Array>;
  readonly #frames: FrameReader;
  readonly #settings: ChannelSettings;
  readonly #send: CipherState;
  readonly #receive: CipherState;
  readonly #remoteStatic: Uint8Array;
  readonly #handshakeHash: Uint8Array;
  #sentCount = 0;
  #receivedCount = 0;

  #writeChain: Promise<void> = Promise.resolve();
  #writeError: ProtocolError | null = null;
  #sentClose = false;

  #inbox: Uint8Array[] = [];
  #inboxHead = 0;
  #inboxBytes = 0;
  #waiters: { resolve: (m: Uint8Array | null) => void; reject: (e: unknown) => void }[] = [];
  #roomWaiter: (() => void) | null = null;
  /** The read loop has ended; no more messages will arrive. */
  #ended = false;
  #error: ProtocolError | null = null;
  #closing = false;
  #connClosed = false;
  #loopDone: Promise<void> = Promise.resolve();
  readonly closed: Promise<void>;
  #resolveClosed!: () => void;

  constructor(
    conn: DuplexConn,
    writer: WritableStreamDefaultWriter<Uint8Array>,
    frames: FrameReader,
    settings: ChannelSettings,
  ) {
    this.#conn = conn;
    this.#writer = writer;
    this.#frames = frames;
    this.#settings = settings;
    this.#send = settings.ciphers.send;
    this.#receive = settings.ciphers.receive;
    this.#remoteStatic = settings.remoteStatic;
    this.#handshakeHash = settings.handshakeHash;
    this.closed = new Promise((resolve) => (this.#resolveClosed = resolve));
  }

  get remoteStatic(): Uint8Array {
    return this.#remoteStatic.slice();
  }

  get handshakeHash(): Uint8Array {
    return this.#handshakeHash.slice();
  }

  /** Key confirmation: the responder sends READY, the initiator must decrypt it. */
  async confirm(initiator: boolean): Promise<void> {
    if (!initiator) {
      await this.#writer.write(this.#seal(RECORD_READY, EMPTY));
      return;
    }
    const frame = await this.#frames.next();
    if (frame === null) {
      throw new ProtocolError(
        "Noise handshake failed: the peer closed the connection without confirming the keys " +
          "(a different topic key?)",
      );
    }
    const record = this.#open(frame);
    if (record[0] !== RECORD_READY || record.length !== 1) {
      throw new ProtocolError(
        `Noise handshake failed: expected READY, got record type ${record[0]}`,
      );
    }
  }

  start(): void {
    this.#loopDone = this.#readLoop();
  }

  // -- records -----------------------------------------------------------------------------

  /** Encrypts one record into a frame, rekeying on the schedule. */
  #seal(type: number, body: Uint8Array): Uint8Array {
    const plaintext = new Uint8Array(1 + body.length);
    plaintext[0] = type;
    plaintext.set(body, 1);
    const ciphertext = this.#send.encryptWithAd(EMPTY, plaintext);
    if (++this.#sentCount % this.#settings.maxMessagesPerKey === 0) this.#send.rekey();
    return encodeFrame(ciphertext);
  }

  /** Decrypts one frame into a record, rekeying on the schedule. */
  #open(frame: Uint8Array): Uint8Array {
    if (frame.length < NOISE_TAG_SIZE + 1) {
      throw new ProtocolError(`Secure channel frame too short: ${frame.length} bytes`);
    }
    const record = this.#receive.decryptWithAd(EMPTY, frame);
    if (++this.#receivedCount % this.#settings.maxMessagesPerKey === 0) this.#receive.rekey();
    return record;
  }

  // -- sending -----------------------------------------------------------------------------

  #enqueueWrite(frames: Uint8Array[]): Promise<void> {
    const run = this.#writeChain.then(async () => {
      if (this.#writeError !== null) throw this.#writeError;
      try {
        let batch: Uint8Array[] = [];
        let size = 0;
        for (const frame of frames) {
          batch.push(frame);
          size += frame.length;
          if (size >= WRITE_BATCH) {
            await this.#writer.write(concat(batch, size));
            batch = [];
            size = 0;
          }
        }
        if (batch.length > 0) await this.#writer.write(concat(batch, size));
      } catch (error) {
        this.#writeError ??= asProtocolError(error, "Secure channel write failed");
        throw this.#writeError;
      }
    });
    this.#writeChain = run.catch(() => {});
    return run;
  }

  send(message: Uint8Array): Promise<void> {
    if (this.#sentClose || this.#closing) {
      return Promise.reject(new ProtocolError("Cannot send on a closed secure channel"));
    }
    if (this.#writeError !== null) return Promise.reject(this.#writeError);
    if (message.length > this.#settings.maxMessageSize) {
      return Promise.reject(
        new ProtocolError(
          `Message too large: ${message.length} bytes, limit ${this.#settings.maxMessageSize}`,
        ),
      );
    }
    const frames: Uint8Array[] = [];
    let offset = 0;
    do {
      const end = Math.min(offset + MAX_FRAGMENT_SIZE, message.length);
      const type = end === message.length ? RECORD_END : RECORD_MORE;
      frames.push(this.#seal(type, message.subarray(offset, end)));
      offset = end;
    } while (offset < message.length);
    return this.#enqueueWrite(frames);
  }

  /** Sends CLOSE once; never rejects. */
  #sendClose(): Promise<void> {
    if (this.#sentClose) return this.#writeChain;
    this.#sentClose = true;
    if (this.#writeError !== null) return Promise.resolve();
    return this.#enqueueWrite([this.#seal(RECORD_CLOSE, EMPTY)]).catch(() => {});
  }

  // -- receiving ---------------------------------------------------------------------------

  receive(): Promise<Uint8Array | null> {
    if (this.#inboxHead < this.#inbox.length) {
      const message = this.#inbox[this.#inboxHead];
      this.#inbox[this.#inboxHead++] = EMPTY;
      if (this.#inboxHead === this.#inbox.length) {
        this.#inbox = [];
        this.#inboxHead = 0;
      }
      this.#inboxBytes -= message.length;
      this.#wakeReader();
      return Promise.resolve(message);
    }
    if (this.#ended || this.#closing) {
      return this.#error !== null && !this.#closing
        ? Promise.reject(this.#error)
        : Promise.resolve(null);
    }
    return new Promise((resolve, reject) => this.#waiters.push({ resolve, reject }));
  }

  #deliver(message: Uint8Array): void {
    const waiter = this.#waiters.shift();
    if (waiter !== undefined) {
      waiter.resolve(message);
      return;
    }
    this.#inbox.push(message);
    this.#inboxBytes += message.length;
  }

  #wakeReader(): void {
    const wake = this.#roomWaiter;
    this.#roomWaiter = null;
    wake?.();
  }

  #roomInInbox(): Promise<void> | undefined {
    const queued = this.#inbox.length - this.#inboxHead;
    if (this.#closing || (this.#inboxBytes < INBOX_HIGH_BYTES && queued < INBOX_HIGH_COUNT)) {
      return undefined;
    }
    return new Promise((resolve) => (this.#roomWaiter = resolve));
  }

  async #readLoop(): Promise<void> {
    let parts: Uint8Array[] = [];
    let size = 0;
    try {
      while (true) {
        while (true) {
          const room = this.#roomInInbox();
          if (room === undefined) break;
          await room;
        }
        const frame = await this.#frames.next();
        if (frame === null) {
          if (parts.length > 0) {
            throw new ProtocolError("Secure channel ended inside a fragmented message");
          }
          break;
        }
        const record = this.#open(frame);
        const type = record[0];
        if (type === RECORD_END || type === RECORD_MORE) {
          const body = record.subarray(1);
          size += body.length;
          if (size > this.#settings.maxMessageSize) {
            throw new ProtocolError(
              `Message too large: over ${this.#settings.maxMessageSize} bytes received`,
            );
          }
          if (this.#closing) {
            // Closing: drain and discard until the peer's CLOSE or end of stream.
          } else {
            parts.push(body);
          }
          if (type === RECORD_END) {
            if (!this.#closing) this.#deliver(concat(parts, size));
            parts = [];
            size = 0;
          }
        } else if (type === RECORD_CLOSE) {
          if (record.length !== 1) throw new ProtocolError("Malformed CLOSE record");
          if (parts.length > 0) {
            throw new ProtocolError("Secure channel closed inside a fragmented message");
          }
          break;
        } else {
          throw new ProtocolError(`Unknown secure channel record type: ${type}`);
        }
      }
    } catch (error) {
      if (!this.#closing) this.#error = asProtocolError(error, "Secure channel failed");
    }
    this.#ended = true;
    for (const waiter of this.#waiters.splice(0)) {
      if (this.#error !== null) waiter.reject(this.#error);
      else waiter.resolve(null);
    }
    if (this.#error === null) {
      // A clean end: answer the peer's CLOSE with ours (best effort), then release.
      await this.#sendClose();
    }
    this.#closeConn();
  }

  #closeConn(): void {
    if (this.#connClosed) return;
    this.#connClosed = true;
    closeQuietly(this.#conn);
    this.#writeChain.then(() => this.#loopDone).then(() => this.#resolveClosed());
  }

  async close(): Promise<void> {
    if (!this.#closing) {
      this.#closing = true;
      // Messages not yet received are dropped; pending receive() calls see null.
      this.#inbox = [];
      this.#inboxHead = 0;
      this.#inboxBytes = 0;
      for (const waiter of this.#waiters.splice(0)) waiter.resolve(null);
      this.#wakeReader();
      if (!this.#ended) {
        void this.#sendClose();
        let timer: ReturnType<typeof setTimeout> | undefined;
        const timeout = new Promise<void>((resolve) => {
          timer = setTimeout(resolve, this.#settings.closeTimeoutMs);
        });
        await Promise.race([this.#loopDone, timeout]);
        clearTimeout(timer);
      }
      this.#closeConn();
    }
    await this.closed;
  }
}

function concat(parts: Uint8Array[], size: number): Uint8Array {
  if (parts.length === 1 && parts[0].length === size) return parts[0];
  const out = new Uint8Array(size);
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}

/** One direction of an in-memory connection. */
function memoryPipe() {
  let controller!: TransformStreamDefaultController<Uint8Array>;
  const stream = new TransformStream<Uint8Array, Uint8Array>(
    {
      start(c) {
        controller = c;
      },
      transform(chunk, c) {
        // Copy, as a socket would: the writer may reuse its buffer.
        c.enqueue(chunk.slice());
      },
    },
    undefined,
    { highWaterMark: 64 * 1024, size: (chunk) => chunk.byteLength },
  );
  return {
    readable: stream.readable,
    writable: stream.writable,
    /** End of stream for the reader after what is queued (a FIN). */
    finish(): void {
      try {
        controller.terminate();
      } catch {
        // Already ended.
      }
    },
    /** Reads and writes fail from now on (the reading end went away). */
    abort(): void {
      try {
        controller.error(new Error("Connection closed"));
      } catch {
        // Already ended.
      }
    },
  };
}

/**
 * Two connected in-memory {@link DuplexConn}s, for tests: what one writes the other reads.
 * Closing one end gives the other end of stream after the bytes already written, and makes
 * the closed end's own reads and the other end's writes fail, like a TCP socket.
 */
export function memoryDuplexPair(): [DuplexConn, DuplexConn] {
  const ab = memoryPipe();
  const ba = memoryPipe();
  const a: DuplexConn = {
    readable: ba.readable,
    writable: ab.writable,
    close() {
      ab.finish();
      ba.abort();
    },
  };
  const b: DuplexConn = {
    readable: ab.readable,
    writable: ba.writable,
    close() {
      ba.finish();
      ab.abort();
    },
  };
  return [a, b];
}
