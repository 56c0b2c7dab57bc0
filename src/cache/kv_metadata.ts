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
 *
 * Reads are cached in process. A Deno KV read is a round trip to KV's SQLite thread (~40–100
 * µs), more than the rest of serving a narinfo, so a store keeps the records it read, with
 * their versionstamps, and trusts them without asking KV while nothing changed. "Nothing
 * changed" is the file `<kv file>.changes` (e.g. `db/arca.kv.changes`): 16 random bytes
 * that every `putPath` and `deletePath` rewrites in place after its commit, and that a read
 * compares with what it saw last (one `pread` on a file kept open, ~1 µs). When they
 * differ, every cached record is checked again on its next read: a `kv.get` of the head,
 * whose versionstamp either matches (kept, no parse) or not (read and parsed again). A
 * record another process committed is therefore seen by every read that starts after that
 * process's `putPath`/`deletePath` returned, whether it added, replaced or deleted it.
 * Records are also checked at least every {@link KV_TRUST_MS} ms, so that a writer that
 * died between its commit and its rewrite of the change file is noticed anyway. Misses
 * (no record) are never cached.
 * @module
 */

import { dirname } from "node:path";
import { ArcaError, FormatError } from "../errors.ts";
import {
  BoundedCache,
  checkHashPart,
  fileHashKey,
  freezeRecord,
  type MetadataStore,
  type PathRecord,
  preparePathRecord,
  readStoredRecord,
  type StoredPath,
} from "./metadata.ts";
import { isValidHashPart } from "./store_path.ts";
import { type RetryOptions, withRetry } from "./retry.ts";

/** Largest narinfo the KV backend stores, in serialized bytes (see the module comment). */
export const KV_MAX_NARINFO_BYTES = 720_000;

/** Default records per `kv.list` batch of `listPaths`. */
export const DEFAULT_KV_LIST_BATCH_SIZE = 500;

/**
 * Longest time (ms) a cached record is served without asking Deno KV, even when the change
 * file says nothing changed.
 */
export const KV_TRUST_MS = 5000;

/** Suffix of the change file next to the KV file (see the module comment). */
export const KV_CHANGES_SUFFIX = ".changes";

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
const TOKEN_BYTES = 16;
/** Limits of the in-process record cache: entries, and characters of narinfo text. */
const CACHE_LIMITS = { maxEntries: 8192, maxWeight: 8 * 1024 * 1024 };

interface Head {
  narinfo: string;
  registeredAt: number;
  parts: number;
  fileHash?: string;
  segment?: string;
}

type Entry = Deno.KvEntry<unknown>;

/** A record in the in-process cache. */
interface CachedRecord {
  stored: StoredPath;
  versionstamp: string;
  /** The change generation (see #generation) in which it was last found current. */
  generation: number;
  /** When it was last found current (performance.now()). */
  checkedAt: number;
}

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
  return new KvMetadataStore(kv, batchSize, options.retry ?? {}, openChanges(path));
}

/**
 * Opens (creating it) the change file of the KV file `path`; read-only when it cannot be
 * written; null when it cannot be opened at all (then no read is ever served from cache).
 */
function openChanges(path: string): Deno.FsFile | null {
  const changes = path + KV_CHANGES_SUFFIX;
  try {
    const file = Deno.openSync(changes, { read: true, write: true, create: true });
    try {
      // Whoever may write the KV file must be able to announce changes: same permissions.
      const kvMode = Deno.statSync(path).mode;
      const mode = file.statSync().mode;
      if (kvMode !== null && mode !== null && (kvMode & 0o666) !== (mode & 0o666)) {
        Deno.chmodSync(changes, kvMode & 0o666);
      }
    } catch {
      // Not ours to change: the owner's permissions stay.
    }
    return file;
  } catch {
    try {
      return Deno.openSync(changes, { read: true });
    } catch {
      return null;
    }
  }
}

class KvMetadataStore implements MetadataStore {
  #kv: Deno.Kv;
  #batchSize: number;
  #retry: RetryOptions;
  #closed = false;
  /** The change file, kept open (null: unavailable, nothing is trusted from cache). */
  #changes: Deno.FsFile | null;
  /** The change file's content when last read, and a buffer to read it into. */
  #token = new Uint8Array(TOKEN_BYTES);
  #readBuffer = new Uint8Array(TOKEN_BYTES);
  /** Counts the changes of the change file this store has seen. */
  #generation = 0;
  #records = new BoundedCache<string, CachedRecord>(CACHE_LIMITS);
  /** FileHash index lookups: nix32 FileHash → hash part (checked against the record). */
  #fileHashes = new BoundedCache<string, string>(CACHE_LIMITS);

  constructor(
    kv: Deno.Kv,
    batchSize: number,
    retry: RetryOptions,
    changes: Deno.FsFile | null,
  ) {
    this.#kv = kv;
    this.#batchSize = batchSize;
    this.#retry = retry;
    this.#changes = changes;
  }

  async getPath(hashPart: string): Promise<PathRecord | null> {
    return (await this.getStoredPath(hashPart))?.record ?? null;
  }

  peekStoredPath(hashPart: string): StoredPath | null | undefined {
    if (this.#closed || !isValidHashPart(hashPart)) return undefined;
    const cached = this.#records.get(hashPart);
    if (cached === undefined) return undefined;
    const generation = this.#currentGeneration();
    return isTrusted(cached, generation, performance.now()) ? cached.stored : undefined;
  }

  async getStoredPath(hashPart: string): Promise<StoredPath | null> {
    this.#checkOpen();
    checkHashPart(hashPart);
    // The generation is read BEFORE Deno KV: what KV gives afterwards is at least as new.
    const generation = this.#currentGeneration();
    const now = performance.now();
    const cached = this.#records.get(hashPart);
    if (cached !== undefined && isTrusted(cached, generation, now)) return cached.stored;
    const head = await this.#call(() => this.#kv.get([PATH, hashPart]));
    if (head.versionstamp === null) {
      this.#records.delete(hashPart);
      return null;
    }
    if (cached !== undefined && cached.versionstamp === head.versionstamp) {
      cached.generation = generation;
      cached.checkedAt = now;
      return cached.stored;
    }
    let entries: Entry[] = [head];
    let whole = assemble(hashPart, entries);
    if (whole === "inconsistent") {
      // Split over parts: read head and parts again, in one snapshot.
      entries = await this.#readEntries(hashPart);
      whole = assemble(hashPart, entries);
      if (whole === "inconsistent") {
        throw new FormatError(`Corrupt metadata record ${hashPart}: parts missing or mismatched`);
      }
    }
    if (whole === null) {
      this.#records.delete(hashPart);
      return null;
    }
    const stored: StoredPath = Object.freeze({
      record: freezeRecord(whole.record),
      text: whole.text,
    });
    this.#records.set(hashPart, {
      stored,
      versionstamp: entries[0].versionstamp,
      generation,
      checkedAt: now,
    }, whole.text.length);
    return stored;
  }

  async findByFileHash(fileHash: string): Promise<string | null> {
    this.#checkOpen();
    const key = fileHashKey(fileHash);
    const known = this.#fileHashes.get(key);
    if (known !== undefined) {
      // Still right if that path's (current) record has this FileHash.
      const stored = await this.getStoredPath(known);
      if (stored?.record.narInfo.fileHash === `sha256:${key}`) return known;
      this.#fileHashes.delete(key);
    }
    const entry = await this.#call(async () => {
      for await (const e of this.#kv.list({ prefix: [FILE_HASH, key] }, { limit: 1 })) return e;
      return null;
    });
    if (entry === null) return null;
    const hashPart = entry.key[2];
    if (typeof hashPart !== "string" || !isValidHashPart(hashPart)) {
      throw new FormatError(`Corrupt metadata index entry for FileHash sha256:${key}`);
    }
    this.#fileHashes.set(key, hashPart);
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
      if (result.ok) {
        this.#announceChange(hashPart);
        return;
      }
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
      if (result.ok) {
        this.#announceChange(hashPart);
        return current.versionstamp !== null;
      }
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
    this.#changes?.close();
    this.#changes = null;
    this.#records.clear();
    this.#fileHashes.clear();
  }

  /**
   * The change generation now: reads the change file and counts one more generation when
   * it differs from what this store saw last. -1 when there is no change file.
   */
  #currentGeneration(): number {
    const file = this.#changes;
    if (file === null) return -1;
    const bytes = this.#readBuffer;
    bytes.fill(0);
    try {
      file.seekSync(0, Deno.SeekMode.Start);
      file.readSync(bytes);
    } catch {
      return -1;
    }
    const token = this.#token;
    for (let i = 0; i < TOKEN_BYTES; i++) {
      if (bytes[i] !== token[i]) {
        token.set(bytes);
        return ++this.#generation;
      }
    }
    return this.#generation;
  }

  /**
   * After a commit: rewrites the change file with new random bytes, so that every store on
   * this KV file (other processes' included) checks its cached records again.
   */
  #announceChange(hashPart: string): void {
    this.#records.delete(hashPart);
    const file = this.#changes;
    if (file === null) return;
    const token = crypto.getRandomValues(new Uint8Array(TOKEN_BYTES));
    try {
      file.seekSync(0, Deno.SeekMode.Start);
      let written = 0;
      while (written < token.length) written += file.writeSync(token.subarray(written));
    } catch {
      // Read-only change file (a reader without write access cannot commit either) or a
      // failing disk: other stores notice within KV_TRUST_MS.
    }
  }

  /** A record from listed entries; read again when a batch boundary split a changing one. */
  async #finish(entries: Entry[]): Promise<PathRecord | null> {
    const hashPart = entries[0].key[1];
    if (entries[0].key.length !== 2 || typeof hashPart !== "string") return null;
    checkStoredHashPart(hashPart);
    const whole = assemble(hashPart, entries);
    if (whole !== "inconsistent") return whole && whole.record;
    const stored = await this.getStoredPath(hashPart);
    return stored && structuredClone(stored.record);
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

/**
 * True when a cached record may be served without asking Deno KV: nothing was announced
 * since it was last found current (`generation`, -1 meaning "no change file": never), and
 * that was less than {@link KV_TRUST_MS} ago.
 */
function isTrusted(cached: CachedRecord, generation: number, now: number): boolean {
  return generation >= 0 && cached.generation === generation &&
    now - cached.checkedAt < KV_TRUST_MS;
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
 * The record in `entries` (head first, then parts 1…n-1 in order) and its text, null when
 * there is no head, or "inconsistent" when parts are missing or from another commit.
 */
function assemble(
  hashPart: string,
  entries: Entry[],
): { record: PathRecord; text: string } | null | "inconsistent" {
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
  const record = readStoredRecord(hashPart, { text, registeredAt: head.registeredAt, segment });
  return { record, text };
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
