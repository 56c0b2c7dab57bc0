/**
 * The sync protocol of one segment over one secure channel (src/net/secure_channel.ts):
 * range-based set reconciliation of the segment's records (src/net/reconcile.ts), then
 * each side sends the records the other lacks; new records are pushed as they appear.
 *
 * Messages are JSON objects, one per channel message:
 * - `{"t":"rc","start":true,"m":"<base64>"}` starts a reconciliation round (the side that
 *   connected starts one at once and then periodically); `{"t":"rc","m":…}` continues it;
 * - `{"t":"records","records":[…]}` carries at most {@link MAX_RECORDS_PER_MESSAGE}
 *   records (src/net/sync_records.ts), sent for the ids the other side lacks and pushed
 *   for new local paths.
 * Anything else, malformed JSON or a reconciliation error is a ProtocolError that ends the
 * session. What to do with received records is the caller's (it judges them).
 * @module
 */

import type { SyncRecord } from "../cache/remote_records.ts";
import { decodeBase64, encodeBase64, formatBase16 } from "../cache/hash.ts";
import { ProtocolError } from "../errors.ts";
import { Reconciler, ReconcileStorage } from "./reconcile.ts";
import type { SecureChannel } from "./secure_channel.ts";
import { recordId } from "./sync_records.ts";

/** Records per `records` message. */
export const MAX_RECORDS_PER_MESSAGE = 256;

/** What a session needs from its segment. */
export interface SegmentSource {
  /** The segment's records as this node knows them now (local and remote). */
  records(): Promise<SyncRecord[]>;
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
  #byId = new Map<string, SyncRecord>();
  #sending: Promise<void> = Promise.resolve();

  constructor(channel: SecureChannel, options: { initiator: boolean; source: SegmentSource }) {
    this.channel = channel;
    this.initiator = options.initiator;
    this.#source = options.source;
  }

  /** Starts a reconciliation round (the initiator's job); no-op while one is running. */
  async startRound(): Promise<void> {
    if (this.#reconciler !== null) return;
    const reconciler = await this.#newReconciler();
    this.#reconciler = reconciler;
    this.stats.rounds++;
    await this.#send({ t: "rc", start: true, m: encodeBase64(reconciler.initiate()) });
  }

  /** Sends records to the peer (new local paths), in batches. */
  async push(records: SyncRecord[]): Promise<void> {
    for (let i = 0; i < records.length; i += MAX_RECORDS_PER_MESSAGE) {
      const batch = records.slice(i, i + MAX_RECORDS_PER_MESSAGE);
      this.stats.recordsSent += batch.length;
      await this.#send({ t: "records", records: batch });
    }
  }

  /** Handles messages until the channel closes; rejects with ProtocolError on misbehaviour. */
  async run(): Promise<void> {
    for (;;) {
      const message = await this.channel.receive();
      if (message === null) return;
      this.stats.lastSeen = Date.now();
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
    this.#byId = new Map();
    const items = records.map((record) => {
      const id = recordId(record);
      this.#byId.set(formatBase16(id), record);
      return { timestamp: 0, id };
    });
    return new Reconciler(new ReconcileStorage(items));
  }

  /** Sends one message; sends are serialized so messages never interleave. */
  #send(message: unknown): Promise<void> {
    const bytes = new TextEncoder().encode(JSON.stringify(message));
    this.#sending = this.#sending.then(() => this.channel.send(bytes));
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
