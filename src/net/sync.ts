/**
 * The sync protocol of one segment over one secure channel (src/net/secure_channel.ts):
 * range-based set reconciliation of the segment's records (src/net/reconcile.ts), then
 * each side sends the records the other lacks; new records are pushed as they appear.
 *
 * Messages are JSON objects, one per channel message:
 * - `{"t":"rc","start":true,"m":"<base64>"}` starts a reconciliation round (the side that
 *   connected starts one at once and then periodically); `{"t":"rc","m":…}` continues it;
 * - `{"t":"records","records":[…]}` carries at most {@link MAX_RECORDS_PER_MESSAGE}
 *   records (src/net/sync_records.ts), and a sender starts a new message once one holds
 *   {@link RECORDS_MESSAGE_BYTES} of JSON; records are sent for the ids the other side
 *   lacks and pushed for new local paths.
 * Binary messages (first byte below 0x20) belong to the chunk protocol
 * (src/net/chunk_protocol.ts) and go to the session's `chunks` handler. Anything else,
 * malformed JSON or a reconciliation error is a ProtocolError that ends the session. What
 * to do with received records is the caller's (it judges them).
 * @module
 */

import type { SyncRecord } from "../cache/remote_records.ts";
import { decodeBase64, encodeBase64, formatBase16 } from "../cache/hash.ts";
import { ProtocolError } from "../errors.ts";
import { Reconciler, ReconcileStorage } from "./reconcile.ts";
import type { SecureChannel } from "./secure_channel.ts";
import { recordId } from "./sync_records.ts";
import { isChunkMessage } from "./chunk_protocol.ts";

/** Records per `records` message. */
export const MAX_RECORDS_PER_MESSAGE = 256;
/**
 * A `records` message being sent is closed once its JSON reaches this size (a record with
 * thousands of references is tens of KiB: 256 of them would overflow the channel's 16 MiB
 * message limit).
 */
export const RECORDS_MESSAGE_BYTES = 1 << 20;

/** What a session needs from its segment. */
export interface SegmentSource {
  /** The segment's records as this node knows them now (local and remote). */
  records(): Promise<SyncRecord[]>;
  /**
   * Ids to count as held although no record is sent for them: records this peer offered
   * that were refused or stored in another form (fewer signatures), so that reconciliation
   * does not offer them again every round.
   */
  knownIds?(): Iterable<Uint8Array>;
  /** Called with the (untrusted, unparsed) records the peer sent. */
  receive(records: unknown[]): Promise<void>;
}

/** Counters of one session. */
export interface SessionStats {
  recordsSent: number;
  recordsReceived: number;
  rounds: number;
  lastSeen: number;
}

/** One peer, one segment. */
export class SyncSession {
  readonly channel: SecureChannel;
  readonly initiator: boolean;
  readonly stats: SessionStats = {
    recordsSent: 0,
    recordsReceived: 0,
    rounds: 0,
    lastSeen: Date.now(),
  };
  #source: SegmentSource;
  #reconciler: Reconciler | null = null;
  /** A round is being started (its records listed): startRound() is then a no-op too. */
  #starting = false;
  #byId = new Map<string, SyncRecord>();
  #sending: Promise<void> = Promise.resolve();

  #chunks?: (message: Uint8Array) => void;

  constructor(
    channel: SecureChannel,
    options: {
      initiator: boolean;
      source: SegmentSource;
      /** Takes chunk-protocol messages (throws ProtocolError to end the session). */
      chunks?: (message: Uint8Array) => void;
    },
  ) {
    this.channel = channel;
    this.initiator = options.initiator;
    this.#source = options.source;
    this.#chunks = options.chunks;
  }

  /**
   * Starts a reconciliation round (the initiator's job); no-op while one is running or
   * being started.
   */
  async startRound(): Promise<void> {
    if (this.#reconciler !== null || this.#starting) return;
    if (!this.initiator) throw new ProtocolError("Only the initiator starts reconciliation rounds");
    this.#starting = true;
    try {
      const reconciler = await this.#newReconciler();
      this.#reconciler = reconciler;
      this.stats.rounds++;
      await this.#send({ t: "rc", start: true, m: encodeBase64(reconciler.initiate()) });
    } finally {
      this.#starting = false;
    }
  }

  /** Sends records to the peer (new local paths), in batches. */
  async push(records: SyncRecord[]): Promise<void> {
    let batch: string[] = [];
    let size = 0;
    const flush = async () => {
      if (batch.length === 0) return;
      const text = `{"t":"records","records":[${batch.join(",")}]}`;
      this.stats.recordsSent += batch.length;
      batch = [];
      size = 0;
      await this.#sendText(text);
    };
    for (const record of records) {
      const json = JSON.stringify(record);
      if (
        batch.length === MAX_RECORDS_PER_MESSAGE ||
        (size > 0 && size + json.length > RECORDS_MESSAGE_BYTES)
      ) {
        await flush();
      }
      batch.push(json);
      size += json.length + 1;
    }
    await flush();
  }

  /** Handles messages until the channel closes; rejects with ProtocolError on misbehaviour. */
  async run(): Promise<void> {
    for (;;) {
      const message = await this.channel.receive();
      if (message === null) return;
      this.stats.lastSeen = Date.now();
      if (isChunkMessage(message)) {
        if (this.#chunks === undefined) throw new ProtocolError("Invalid sync message: binary");
        this.#chunks(message);
        continue;
      }
      await this.#handle(parseMessage(message));
    }
  }

  async #handle(message: Record<string, unknown>): Promise<void> {
    if (message.t === "records") {
      const records = message.records;
      if (!Array.isArray(records) || records.length > MAX_RECORDS_PER_MESSAGE) {
        throw new ProtocolError("Invalid sync message: bad records list");
      }
      this.stats.recordsReceived += records.length;
      await this.#source.receive(records);
      return;
    }
    if (message.t !== "rc" || typeof message.m !== "string") {
      throw new ProtocolError("Invalid sync message: unknown type");
    }
    if (message.start === true) {
      if (this.initiator) {
        throw new ProtocolError("Invalid sync message: the responder started a round");
      }
      this.#reconciler = await this.#newReconciler();
    }
    const reconciler = this.#reconciler;
    if (reconciler === null) throw new ProtocolError("Invalid sync message: no round is running");
    let bytes: Uint8Array;
    try {
      bytes = decodeBase64(message.m);
    } catch {
      throw new ProtocolError("Invalid sync message: bad base64");
    }
    const step = reconciler.reconcile(bytes);
    if (step.reply) await this.#send({ t: "rc", m: encodeBase64(step.reply) });
    const have = step.have.map((id) => this.#byId.get(formatBase16(id))).filter((r) =>
      r !== undefined
    );
    await this.push(have as SyncRecord[]);
    if (step.done) this.#reconciler = null;
  }

  async #newReconciler(): Promise<Reconciler> {
    const records = await this.#source.records();
    const byId = new Map<string, SyncRecord>();
    const items = records.map((record) => {
      const id = recordId(record);
      byId.set(formatBase16(id), record);
      return { timestamp: 0, id };
    });
    for (const id of this.#source.knownIds?.() ?? []) items.push({ timestamp: 0, id });
    this.#byId = byId;
    return new Reconciler(new ReconcileStorage(items));
  }

  /** Sends one message; sends are serialized so messages never interleave. */
  #send(message: unknown): Promise<void> {
    return this.#sendText(JSON.stringify(message));
  }

  #sendText(text: string): Promise<void> {
    const bytes = new TextEncoder().encode(text);
    this.#sending = this.#sending.catch(() => {}).then(() => this.channel.send(bytes));
    return this.#sending;
  }
}

function parseMessage(bytes: Uint8Array): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch {
    throw new ProtocolError("Invalid sync message: not JSON");
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new ProtocolError("Invalid sync message: not an object");
  }
  return value as Record<string, unknown>;
}
