/**
 * The Deno KV backend of the metadata store (`--backend kv`, the default), in
 * `<cacheDir>/db/arca.kv`. Keys and values:
 *
 * ```text
 * ["path", <hash>]               { narinfo: string, registeredAt: number, parts: number,
 *                                  fileHash?: string,      the record (fileHash: nix32 body)
 *                                  segment?: string }
 * ["path", <hash>, <i>]          string                    i = 1 … parts-1: rest of the narinfo
 * ["fileHash", <nix32>, <hash>]  <hash>                    index: FileHash → paths
 * ```
 *
 * `narinfo` is the text `formatNarInfo` (narinfo.ts) writes. A Deno KV value holds at most 64 KiB,
 * and a narinfo with a thousand references or more does not fit, so the text is SPLIT into
 * parts of at most 60 000 bytes each (as V8 serializes them: one byte a character for
 * Latin-1 text, else two), all written in the head's atomic commit: parts of a record
 * therefore share the head's versionstamp, which is how a reader checks it has one whole
 * record. A commit holds at most 800 KiB, so a narinfo larger than {@link KV_MAX_NARINFO_BYTES}
 * (about 9 000 references) is rejected with a {@link FormatError}; the filesystem backend has
 * no such limit.
 *
 * `putPath` and `deletePath` are one `kv.atomic()` commit each, checked against the
 * versionstamp of the record they read (optimistic concurrency: a conflicting writer makes
 * them read again), so the record, its parts and its index entry change together. Every KV
 * call goes through {@link withRetry} (SQLite's `database is locked` under contention).
 * @module
 */

import { dirname } from "node:path";
import { ArcaError, FormatError } from "../errors.ts";
import {
  checkHashPart,
  fileHashKey,
  type MetadataStore,
  type PathRecord,
  preparePathRecord,
  readStoredRecord,
} from "./metadata.ts";
import { isValidHashPart } from "./store_path.ts";
import { type RetryOptions, withRetry } from "./retry.ts";

/** Largest narinfo the KV backend stores, in serialized bytes (see the module comment). */
export const KV_MAX_NARINFO_BYTES = 720_000;

/** Default records per `kv.list` batch of `listPaths`. */
export const DEFAULT_KV_LIST_BATCH_SIZE = 500;

/** Options of {@link openKvMetadata}. */
export interface KvMetadataOptions {
  /** Entries fetched per `kv.list` batch while listing; default 500 (at most 1000). */
  listBatchSize?: number;
  /** Retry policy of every KV call; default {@link withRetry}'s. */
  retry?: RetryOptions;
}

const PATH = "path";
const FILE_HASH = "fileHash";
const PART_BYTES = 60_000;
const MAX_PARTS = KV_MAX_NARINFO_BYTES / PART_BYTES;
const MAX_COMMIT_ROUNDS = 1000;
const NOT_LATIN1_RE = /[\u0100-\uffff]/; // any UTF-16 code unit above Latin-1

interface Head {
  narinfo: string;
  registeredAt: number;
  parts: number;
  fileHash?: string;
  segment?: string;
}

type Entry = Deno.KvEntry<unknown>;

/**
 * Opens (creating it and its directory) the KV metadata store in the file `path`, e.g.
 * `<cacheDir>/db/arca.kv`. Several processes may open the same file.
 */
export async function openKvMetadata(
  path: string,
  options: KvMetadataOptions = {},
): Promise<MetadataStore> {
  const batchSize = options.listBatchSize ?? DEFAULT_KV_LIST_BATCH_SIZE;
  if (!Number.isInteger(batchSize) || batchSize < 1 || batchSize > 1000) {
    throw new RangeError(`Invalid KV list batch size ${batchSize}: expected 1 to 1000`);
  }
  await Deno.mkdir(dirname(path), { recursive: true });
  const kv = await withRetry(() => Deno.openKv(path), options.retry);
  return new KvMetadataStore(kv, batchSize, options.retry ?? {});
}

class KvMetadataStore implements MetadataStore {
  #kv: Deno.Kv;
  #batchSize: number;
  #retry: RetryOptions;
  #closed = false;

  constructor(kv: Deno.Kv, batchSize: number, retry: RetryOptions) {
    this.#kv = kv;
    this.#batchSize = batchSize;
    this.#retry = retry;
  }

  async getPath(hashPart: string): Promise<PathRecord | null> {
    this.#checkOpen();
    checkHashPart(hashPart);
    const entries = await this.#readEntries(hashPart);
    const whole = assemble(hashPart, entries);
    if (whole === "inconsistent") {
      throw new FormatError(`Corrupt metadata record ${hashPart}: parts missing or mismatched`);
    }
    return whole && whole.record;
  }

  async findByFileHash(fileHash: string): Promise<string | null> {
    this.#checkOpen();
    const key = fileHashKey(fileHash);
    const entry = await this.#call(async () => {
      for await (const e of this.#kv.list({ prefix: [FILE_HASH, key] }, { limit: 1 })) return e;
      return null;
    });
    if (entry === null) return null;
    const hashPart = entry.key[2];
    if (typeof hashPart !== "string" || !isValidHashPart(hashPart)) {
      throw new FormatError(`Corrupt metadata index entry for FileHash sha256:${key}`);
    }
    return hashPart;
  }

  async putPath(record: PathRecord): Promise<void> {
    this.#checkOpen();
    const prepared = preparePathRecord(record);
    const { hashPart, fileHashKey: newIndex } = prepared;
    const pieces = splitText(prepared.text, record.narInfo.storePath);
    const head: Head = {
      narinfo: pieces[0],
      registeredAt: prepared.registeredAt,
      parts: pieces.length,
    };
    if (newIndex !== undefined) head.fileHash = newIndex;
    if (prepared.segment !== undefined) head.segment = prepared.segment;
    for (let round = 0; round < MAX_COMMIT_ROUNDS; round++) {
      const entries = await this.#readEntries(hashPart);
      const current = currentState(entries);
      const result = await this.#call(() => {
        const op = this.#kv.atomic()
          .check({ key: [PATH, hashPart], versionstamp: current.versionstamp })
          .set([PATH, hashPart], head);
        for (let i = 1; i < pieces.length; i++) op.set([PATH, hashPart, i], pieces[i]);
        for (const key of current.partKeys) {
          if ((key[2] as number) >= pieces.length) op.delete(key);
        }
        if (current.fileHash !== undefined && current.fileHash !== newIndex) {
          op.delete([FILE_HASH, current.fileHash, hashPart]);
        }
        if (newIndex !== undefined) op.set([FILE_HASH, newIndex, hashPart], hashPart);
        return op.commit();
      });
      if (result.ok) return;
    }
    throw conflict("store", record.narInfo.storePath);
  }

  async deletePath(hashPart: string): Promise<boolean> {
    this.#checkOpen();
    checkHashPart(hashPart);
    for (let round = 0; round < MAX_COMMIT_ROUNDS; round++) {
      const entries = await this.#readEntries(hashPart);
      const current = currentState(entries);
      if (current.versionstamp === null) {
        // No record. Stray parts (never written without a head) would be removed here.
        if (current.partKeys.length === 0) return false;
      }
      const result = await this.#call(() => {
        const op = this.#kv.atomic()
          .check({ key: [PATH, hashPart], versionstamp: current.versionstamp })
          .delete([PATH, hashPart]);
        for (const key of current.partKeys) op.delete(key);
        if (current.fileHash !== undefined) op.delete([FILE_HASH, current.fileHash, hashPart]);
        return op.commit();
      });
      if (result.ok) return current.versionstamp !== null;
    }
    throw conflict("delete", hashPart);
  }

  async *listPaths(): AsyncIterable<PathRecord> {
    this.#checkOpen();
    const batchSize = this.#batchSize;
    let cursor: string | undefined;
    let pending: Entry[] = [];
    for (;;) {
      const batch = await this.#call(async () => {
        const iter = this.#kv.list({ prefix: [PATH] }, { limit: batchSize, batchSize, cursor });
        const entries: Entry[] = [];
        for await (const entry of iter) entries.push(entry);
        return { entries, cursor: entries.length > 0 ? iter.cursor : cursor };
      });
      for (const entry of batch.entries) {
        if (entry.key.length === 2 && pending.length > 0) {
          const record = await this.#finish(pending);
          if (record) yield record;
          pending = [];
        }
        pending.push(entry);
      }
      if (batch.entries.length < batchSize) break;
      cursor = batch.cursor;
      this.#checkOpen();
    }
    if (pending.length > 0) {
      const record = await this.#finish(pending);
      if (record) yield record;
    }
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#kv.close();
  }

  /** A record from listed entries; read again when a batch boundary split a changing one. */
  async #finish(entries: Entry[]): Promise<PathRecord | null> {
    const hashPart = entries[0].key[1];
    if (entries[0].key.length !== 2 || typeof hashPart !== "string") return null;
    checkStoredHashPart(hashPart);
    const whole = assemble(hashPart, entries);
    if (whole !== "inconsistent") return whole && whole.record;
    return await this.getPath(hashPart);
  }

  /** The head and parts of one record, read in one snapshot. */
  #readEntries(hashPart: string): Promise<Entry[]> {
    return this.#call(async () => {
      const entries: Entry[] = [];
      const iter = this.#kv.list(
        { start: [PATH, hashPart], end: [PATH, hashPart, MAX_PARTS] },
        { limit: MAX_PARTS, batchSize: MAX_PARTS },
      );
      for await (const entry of iter) entries.push(entry);
      return entries;
    });
  }

  #call<T>(fn: () => Promise<T>): Promise<T> {
    return withRetry(fn, this.#retry);
  }

  #checkOpen(): void {
    if (this.#closed) throw new Error("Metadata store is closed");
  }
}

/** What a writer must replace: the head's versionstamp, its parts' keys, its index key. */
function currentState(
  entries: Entry[],
): { versionstamp: string | null; partKeys: Deno.KvKey[]; fileHash?: string } {
  const head = entries.length > 0 && entries[0].key.length === 2 ? entries[0] : null;
  const partKeys = entries.filter((e) => e.key.length === 3).map((e) => e.key);
  const value = head?.value as Partial<Head> | null | undefined;
  const fileHash = typeof value?.fileHash === "string" ? value.fileHash : undefined;
  return { versionstamp: head?.versionstamp ?? null, partKeys, fileHash };
}

/**
 * The record in `entries` (head first, then parts 1…n-1 in order), null when there is no
 * head, or "inconsistent" when parts are missing or from another commit.
 */
function assemble(
  hashPart: string,
  entries: Entry[],
): { record: PathRecord } | null | "inconsistent" {
  const [first, ...rest] = entries;
  if (first === undefined || first.key.length !== 2) return null;
  const head = first.value as Partial<Head> | null;
  if (
    head === null || typeof head !== "object" || typeof head.narinfo !== "string" ||
    typeof head.registeredAt !== "number" || !Number.isInteger(head.parts) ||
    (head.parts as number) < 1
  ) {
    throw new FormatError(`Corrupt metadata record ${hashPart}: unexpected value in Deno KV`);
  }
  if (rest.length !== (head.parts as number) - 1) return "inconsistent";
  let text = head.narinfo;
  for (let i = 0; i < rest.length; i++) {
    const part = rest[i];
    if (
      part.key[2] !== i + 1 || part.versionstamp !== first.versionstamp ||
      typeof part.value !== "string"
    ) {
      return "inconsistent";
    }
    text += part.value;
  }
  const segment = typeof head.segment === "string" ? head.segment : undefined;
  return { record: readStoredRecord(hashPart, { text, registeredAt: head.registeredAt, segment }) };
}

/** Splits narinfo text into KV values of at most {@link PART_BYTES} serialized bytes. */
function splitText(text: string, storePath: string): string[] {
  // V8 serializes a string one byte a character when all are Latin-1, else two.
  const bytesPerChar = NOT_LATIN1_RE.test(text) ? 2 : 1;
  const size = text.length * bytesPerChar;
  if (size > KV_MAX_NARINFO_BYTES) {
    throw new FormatError(
      `Cannot store the narinfo of ${storePath} in Deno KV: ${size} bytes, more than the ${KV_MAX_NARINFO_BYTES} the kv backend holds (use the filesystem backend)`,
    );
  }
  const partChars = PART_BYTES / bytesPerChar;
  const pieces: string[] = [];
  for (let i = 0; i < text.length; i += partChars) pieces.push(text.slice(i, i + partChars));
  return pieces;
}

function checkStoredHashPart(hashPart: string): void {
  if (!isValidHashPart(hashPart)) {
    throw new FormatError(`Corrupt metadata key: invalid hash part '${hashPart.slice(0, 40)}'`);
  }
}

function conflict(what: string, subject: string): ArcaError {
  return new ArcaError(
    "conflict",
    `Cannot ${what} metadata of ${subject}: concurrent writers kept changing it`,
  );
}
