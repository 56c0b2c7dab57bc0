/**
 * The metadata store: one narinfo record per store path, plus an index from the FileHash of
 * our encoding of its NAR to the path (so `GET /nar/<nix32 FileHash>.nar.zst` finds its
 * manifest). Two backends implement {@link MetadataStore}:
 *
 * - `kv` (default): Deno KV at `<cacheDir>/db/arca.kv` (src/cache/kv_metadata.ts);
 * - `filesystem`: one `<cacheDir>/narinfo/<hash>.narinfo` file per path, holding exactly
 *   the served narinfo text, plus `<cacheDir>/narinfo/by-file-hash/<nix32>/<hash>` index
 *   entries (src/cache/fs_metadata.ts).
 *
 * Both store a record as the text {@link formatNarInfo} writes and give it back parsed by
 * {@link parseNarInfo}, so what a reader gets is normalized: hashes `sha256:<nix32>`,
 * References and Sig sorted and unique. Hash parts are validated (32 nix32 characters)
 * before they become keys or file names; invalid input is a {@link FormatError}.
 *
 * Several store paths may share one FileHash (identical NARs under different names), so
 * the index maps a FileHash to a set of paths; {@link MetadataStore.findByFileHash} returns
 * one of them, and deleting one path leaves the others findable.
 *
 * Reads are served from a small in-process cache of parsed records ({@link BoundedCache}),
 * checked against the store on every read by something much cheaper than reading the
 * record: a change token file the KV backend's writers rewrite after each commit, the
 * narinfo file's stat for the filesystem backend. So several processes share a cache
 * with no stale reads: a record another process stored or deleted is seen by the next
 * read after its `putPath`/`deletePath` returned. Records a read returns are shared and
 * frozen ({@link freezeRecord}): copy them to change them.
 * @module
 */

import { SEGMENT_NAME_RE } from "../config.ts";
import { FormatError, UsageError } from "../errors.ts";
import { normalizeNixHash } from "./hash.ts";
import { formatNarInfo, type NarInfo, parseNarInfo } from "./narinfo.ts";
import { isValidHashPart, parseStorePath } from "./store_path.ts";
import { openKvMetadata } from "./kv_metadata.ts";
import { openFsMetadata } from "./fs_metadata.ts";

export type { NarInfo };

/** The metadata backends, as `--backend` names them. */
export type MetadataBackend = "kv" | "filesystem";

/** The backends {@link openMetadata} knows, in `--backend` spelling. */
export const METADATA_BACKENDS: readonly MetadataBackend[] = Object.freeze(["kv", "filesystem"]);

/** What the cache knows about one store path. */
export interface PathRecord {
  /**
   * The narinfo the substituter serves for this path: URL, Compression, FileHash and
   * FileSize of OUR encoding of the NAR; the NAR's hash and size, references, deriver, CA
   * and signatures as the path's origin gave them.
   */
  narInfo: NarInfo;
  /** When this node registered the path, in milliseconds since the epoch (a safe integer ≥ 0). */
  registeredAt: number;
  /** The segment the path belongs to (config `[[segments]]`); absent in records written before segments existed. */
  segment?: string;
}

/** A record as stored: parsed, and the narinfo text it was stored as. */
export interface StoredPath {
  /** The record (frozen: shared between readers). */
  record: PathRecord;
  /**
   * The stored narinfo text, exactly as {@link formatNarInfo} wrote it when the record was
   * stored (so it is what a substituter serves, unless it adds a signature), and checked
   * by {@link parseNarInfo} when it was read.
   */
  text: string;
}

/** Storage of {@link PathRecord}s, one per store path, keyed by hash part. */
export interface MetadataStore {
  /**
   * The record of the path with this hash part, or null. FormatError for an invalid hash
   * part. The record is frozen (shared with other readers).
   */
  getPath(hashPart: string): Promise<PathRecord | null>;
  /**
   * The record of the path with this hash part and its stored narinfo text, or null; as
   * fresh as {@link MetadataStore.getPath}. FormatError for an invalid hash part.
   */
  getStoredPath(hashPart: string): Promise<StoredPath | null>;
  /**
   * What {@link MetadataStore.getStoredPath} would give, when this store can tell without
   * waiting (synchronously, from its in-process cache checked as `getStoredPath` checks it):
   * the record, or null when the path is known to be absent; undefined when only
   * `getStoredPath` can tell (not cached, to be checked against the store, invalid hash
   * part, closed store). For hot paths that want no promise when the answer is at hand.
   */
  peekStoredPath(hashPart: string): StoredPath | null | undefined;
  /**
   * The hash part of a path whose record has this FileHash (`sha256:<nix32>`; any SHA-256
   * form {@link normalizeNixHash} accepts), or null. When several paths share the FileHash,
   * any one of them.
   */
  findByFileHash(fileHash: string): Promise<string | null>;
  /**
   * Stores `record`, replacing any record of the same path. Atomic as seen by readers: the
   * record and its FileHash index entry become visible together, and a replaced record's
   * old index entry stops leading to it. FormatError when the record is invalid.
   */
  putPath(record: PathRecord): Promise<void>;
  /** Removes a path's record and its index entry; false when there was none. */
  deletePath(hashPart: string): Promise<boolean>;
  /**
   * Every record, sorted by hash part, streamed (the KV backend reads in batches; records
   * written or deleted during the iteration may or may not appear).
   */
  listPaths(): AsyncIterable<PathRecord>;
  /** Releases the store; later calls reject. */
  close(): void;
}

/** Options of {@link openMetadata}. */
export interface OpenMetadataOptions {
  /** KV backend: records fetched per `kv.list` batch while listing; default 500. */
  listBatchSize?: number;
}

/**
 * Opens the metadata store of the cache in `cacheDir`, creating its directories: Deno KV at
 * `<cacheDir>/db/arca.kv`, or the `filesystem` backend under `<cacheDir>/narinfo/`.
 * Throws {@link UsageError} for an unknown backend name.
 *
 * @example
 * ```ts
 * const store = await openMetadata("/var/cache/pares-arca", "kv");
 * try {
 *   const record = await store.getPath("0c0s1ilpbrzc4c8yrbrzsk4n0jhqba8m");
 * } finally {
 *   store.close();
 * }
 * ```
 */
export function openMetadata(
  cacheDir: string,
  backend: MetadataBackend,
  options: OpenMetadataOptions = {},
): Promise<MetadataStore> {
  switch (backend) {
    case "kv":
      return openKvMetadata(`${cacheDir}/db/arca.kv`, options);
    case "filesystem":
      return openFsMetadata(`${cacheDir}/narinfo`);
    default:
      return Promise.reject(
        new UsageError(
          `Unknown metadata backend '${String(backend)}': expected ${
            METADATA_BACKENDS.join(" or ")
          }`,
        ),
      );
  }
}

/** A {@link PathRecord} checked and rendered for storage by a backend. */
export interface PreparedRecord {
  /** Hash part of the record's store path. */
  hashPart: string;
  /** The narinfo text, as {@link formatNarInfo} writes it. */
  text: string;
  /** The nix32 body of the normalized FileHash, if the narinfo has one. */
  fileHashKey?: string;
  /** As in the record. */
  registeredAt: number;
  /** As in the record. */
  segment?: string;
}

/**
 * Checks `record` and renders its narinfo text; for backends. Throws {@link FormatError}
 * when the store path, a narinfo field or `registeredAt` is invalid, or when the text would
 * not parse back (e.g. larger than the parser's limit).
 */
export function preparePathRecord(record: PathRecord): PreparedRecord {
  const { narInfo, registeredAt } = record;
  const hashPart = parseStorePath(narInfo.storePath).hash;
  if (!Number.isSafeInteger(registeredAt) || registeredAt < 0) {
    throw new FormatError(
      `Invalid registration time of ${narInfo.storePath}: expected milliseconds since the epoch, got ${
        String(registeredAt)
      }`,
    );
  }
  const text = formatNarInfo(narInfo);
  const normalized = parseNarInfo(text);
  const prepared: PreparedRecord = { hashPart, text, registeredAt };
  if (record.segment !== undefined) {
    checkSegmentName(record.segment);
    prepared.segment = record.segment;
  }
  if (normalized.fileHash !== undefined) prepared.fileHashKey = fileHashKey(normalized.fileHash);
  return prepared;
}

/** Throws {@link FormatError} unless `name` is a valid segment name. */
export function checkSegmentName(name: string): void {
  if (typeof name !== "string" || !SEGMENT_NAME_RE.test(name)) {
    throw new FormatError(
      `Invalid segment name '${shorten(String(name))}': expected letters, digits, '.', '_' or '-'`,
    );
  }
}

/**
 * Throws {@link FormatError} unless `hashPart` is a store path hash part (32 nix32
 * characters): checked before a hash part becomes a key or a file name.
 */
export function checkHashPart(hashPart: string): void {
  if (typeof hashPart !== "string" || !isValidHashPart(hashPart)) {
    throw new FormatError(
      `Invalid store path hash part '${shorten(String(hashPart))}': expected 32 nix32 characters`,
    );
  }
}

/**
 * The nix32 body of a SHA-256 FileHash (any form {@link normalizeNixHash} accepts), as the
 * index keys it. Throws {@link FormatError} when `fileHash` is not a SHA-256 hash.
 */
export function fileHashKey(fileHash: string): string {
  if (typeof fileHash !== "string") {
    throw new FormatError(`Invalid FileHash: expected a string, got ${typeof fileHash}`);
  }
  // Already `sha256:<nix32>` (every request for a NAR): no need to decode and encode.
  if (CANONICAL_SHA256_RE.test(fileHash)) return fileHash.slice("sha256:".length);
  return normalizeNixHash(fileHash).slice("sha256:".length);
}

/**
 * A SHA-256 as `sha256:<nix32>`, exactly as {@link normalizeNixHash} writes it: 52 nix32
 * digits, the first one 0 or 1 (52 digits hold 260 bits, of which the top 4 are zero).
 */
const CANONICAL_SHA256_RE = /^sha256:[01][0-9a-df-np-sv-z]{51}$/;

/**
 * Parses stored narinfo text back into a record, checking that it belongs to `hashPart`.
 * Throws {@link FormatError} naming the record when the stored data is corrupt.
 */
export function readStoredRecord(
  hashPart: string,
  stored: { text: string; registeredAt: number; segment?: string },
): PathRecord {
  const { text, registeredAt } = stored;
  let narInfo: NarInfo;
  try {
    narInfo = parseNarInfo(text);
  } catch (cause) {
    throw new FormatError(
      `Corrupt metadata record ${hashPart}: ${cause instanceof Error ? cause.message : cause}`,
      { cause },
    );
  }
  if (parseStorePath(narInfo.storePath).hash !== hashPart) {
    throw new FormatError(
      `Corrupt metadata record ${hashPart}: it holds the narinfo of ${narInfo.storePath}`,
    );
  }
  const record: PathRecord = { narInfo, registeredAt };
  if (stored.segment !== undefined) {
    try {
      checkSegmentName(stored.segment);
    } catch (cause) {
      throw new FormatError(`Corrupt metadata record ${hashPart}: bad segment name`, { cause });
    }
    record.segment = stored.segment;
  }
  return record;
}

/**
 * Freezes a record, its narinfo and the narinfo's arrays, so that a record shared by an
 * in-process cache cannot be changed by one of its readers. Returns `record`.
 */
export function freezeRecord(record: PathRecord): PathRecord {
  Object.freeze(record.narInfo.references);
  Object.freeze(record.narInfo.sigs);
  Object.freeze(record.narInfo);
  return Object.freeze(record);
}

/** Limits of a {@link BoundedCache}. */
export interface BoundedCacheOptions {
  /** Most entries kept. */
  maxEntries: number;
  /** Most total weight kept (e.g. bytes of text); an entry heavier than this is not kept. */
  maxWeight: number;
}

/**
 * A map that forgets its least recently used entries beyond a number of entries and a
 * total weight; for the in-process read caches of the metadata backends and the cache.
 */
export class BoundedCache<K, V> {
  #entries = new Map<K, { value: V; weight: number }>();
  #weight = 0;
  #maxEntries: number;
  #maxWeight: number;

  /** An empty cache with these limits. */
  constructor(options: BoundedCacheOptions) {
    this.#maxEntries = options.maxEntries;
    this.#maxWeight = options.maxWeight;
  }

  /** Number of entries. */
  get size(): number {
    return this.#entries.size;
  }

  /** The value of `key`, made the most recently used; undefined when absent. */
  get(key: K): V | undefined {
    const entry = this.#entries.get(key);
    if (entry === undefined) return undefined;
    this.#entries.delete(key);
    this.#entries.set(key, entry);
    return entry.value;
  }

  /** Sets `key` (most recently used), then forgets the least recently used over the limits. */
  set(key: K, value: V, weight = 1): void {
    this.delete(key);
    if (weight > this.#maxWeight) return;
    this.#entries.set(key, { value, weight });
    this.#weight += weight;
    for (const [oldest, entry] of this.#entries) {
      if (this.#entries.size <= this.#maxEntries && this.#weight <= this.#maxWeight) break;
      this.#entries.delete(oldest);
      this.#weight -= entry.weight;
    }
  }

  /** Forgets `key`. */
  delete(key: K): void {
    const entry = this.#entries.get(key);
    if (entry === undefined) return;
    this.#entries.delete(key);
    this.#weight -= entry.weight;
  }

  /** Forgets everything. */
  clear(): void {
    this.#entries.clear();
    this.#weight = 0;
  }
}

function shorten(text: string): string {
  const clean = text.replace(
    CONTROL_GLOBAL_RE,
    (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}`,
  );
  return clean.length > 80 ? `${clean.slice(0, 77)}...` : clean;
}

// deno-lint-ignore no-control-regex -- escaping control characters in messages is the point
const CONTROL_GLOBAL_RE = /[\x00-\x1f\x7f]/g;
