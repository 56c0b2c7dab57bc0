/**
 * The filesystem backend of the metadata store (`--backend filesystem`): flat files under
 * `<cacheDir>/narinfo/`, which a plain static web server could serve as they are.
 *
 * ```text
 * <hash>.narinfo                    exactly the narinfo text served for the path (as
 *                                   `formatNarInfo` writes it); the file's mtime is the
 *                                   record's registeredAt, in milliseconds
 * <hash>.segment                    the name of the path's segment (written before the
 *                                   narinfo, removed after it)
 * by-file-hash/<nix32>/<hash>       empty file: index entry FileHash → path
 * .<hash>.<random>.tmp              a narinfo being written (ignored by readers)
 * ```
 *
 * registeredAt lives in the mtime so that the served text stays clean (Nix would ignore an
 * extra `X-Arca-…:` line, but other tools may not) and so that text and time change in the
 * same rename, with no second file to keep in step. Copy a cache with `cp -a` or
 * `rsync -a`, which keep mtimes; a plain `cp` resets every registeredAt to the copy's time.
 *
 * Writes are `tmp + fsync + rename + fsync(dir)`. The narinfo file is the point of
 * visibility: `putPath` writes the index entry first, then the narinfo; `deletePath`
 * removes the narinfo first, then the index entry. There are no locks, so concurrent
 * writers of the SAME path (or a crash between the steps) can leave an index entry whose
 * narinfo is gone or has another FileHash; {@link MetadataStore.findByFileHash} therefore
 * returns a path only after reading its narinfo and finding that FileHash in it. The other
 * way round, the narinfo that wins such a race always keeps its index entry: a writer
 * checks its entry after writing the narinfo, and whoever removes an entry reads the
 * narinfo again afterwards and restores the entry if it matches. Hash
 * parts are validated (32 nix32 characters) before they become file names, and FileHash
 * directory names are nix32 too, so no name can reach outside the directory.
 *
 * Reads are cached in process: a record read is kept with the identity of the narinfo file
 * it came from (device, inode, size, mtime, ctime, as `fstat` gave them on the file read),
 * and served again while a `stat` of the narinfo name gives the same identity. Every write
 * renames a new file into place (a new inode and ctime), and a delete makes the name
 * disappear, so a record another process replaced or deleted is noticed by the next read.
 * Misses (no narinfo) are never cached.
 * @module
 */

import { join } from "node:path";
import { FormatError } from "../errors.ts";
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
import { MAX_NARINFO_BYTES } from "./narinfo.ts";
import { isValidHashPart } from "./store_path.ts";

/** Name of the FileHash index directory inside the narinfo directory. */
export const FILE_HASH_INDEX_DIR = "by-file-hash";

/** Temporary files older than this (by ctime) are removed when a store opens: a crashed write. */
const STALE_TEMP_MS = 60 * 60 * 1000;

/** Limits of the in-process record cache: entries, and characters of narinfo text. */
const CACHE_LIMITS = { maxEntries: 8192, maxWeight: 8 * 1024 * 1024 };

const NARINFO_NAME_RE = /^([0-9a-df-np-sv-z]{32})\.narinfo$/;
const TEMP_NAME_RE = /^\.[0-9a-df-np-sv-z]{32}\.[0-9a-f]+\.tmp$/;

/**
 * Opens (creating it) the filesystem metadata store in `dir`, e.g. `<cacheDir>/narinfo`.
 * Several processes may open the same directory. Removes temporary files that a crashed
 * writer left behind more than an hour ago.
 */
export async function openFsMetadata(dir: string): Promise<MetadataStore> {
  await Deno.mkdir(join(dir, FILE_HASH_INDEX_DIR), { recursive: true });
  await removeStaleTemps(dir);
  return new FsMetadataStore(dir);
}

/** A cached record and the identity of the narinfo file it was read from. */
interface CachedRecord {
  stored: StoredPath;
  identity: string;
}

class FsMetadataStore implements MetadataStore {
  #dir: string;
  #indexDir: string;
  #closed = false;
  #records = new BoundedCache<string, CachedRecord>(CACHE_LIMITS);
  /** FileHash index lookups: nix32 FileHash → hash part (checked against the record). */
  #fileHashes = new BoundedCache<string, string>(CACHE_LIMITS);

  constructor(dir: string) {
    this.#dir = dir;
    this.#indexDir = join(dir, FILE_HASH_INDEX_DIR);
  }

  async getPath(hashPart: string): Promise<PathRecord | null> {
    return (await this.getStoredPath(hashPart))?.record ?? null;
  }

  peekStoredPath(hashPart: string): StoredPath | null | undefined {
    if (this.#closed || !isValidHashPart(hashPart)) return undefined;
    const cached = this.#records.get(hashPart);
    if (cached === undefined) return undefined;
    // One stat (synchronous: ~2–10 µs, cheaper than a round trip to the blocking pool).
    let info: Deno.FileInfo;
    try {
      info = Deno.statSync(this.#narinfoPath(hashPart));
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) return undefined;
      this.#records.delete(hashPart);
      return null;
    }
    return fileIdentity(info) === cached.identity ? cached.stored : undefined;
  }

  async getStoredPath(hashPart: string): Promise<StoredPath | null> {
    this.#checkOpen();
    checkHashPart(hashPart);
    const known = this.peekStoredPath(hashPart);
    if (known !== undefined) return known;
    const path = this.#narinfoPath(hashPart);
    const file = await readNarinfoFile(path);
    if (file === null) {
      this.#records.delete(hashPart);
      return null;
    }
    const segment = await readSegmentFile(this.#segmentPath(hashPart));
    const record = readStoredRecord(hashPart, { ...file, segment });
    const stored: StoredPath = Object.freeze({ record: freezeRecord(record), text: file.text });
    this.#records.set(hashPart, { stored, identity: file.identity }, file.text.length);
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
    const candidates: string[] = [];
    try {
      for await (const entry of Deno.readDir(join(this.#indexDir, key))) {
        if (isValidHashPart(entry.name)) candidates.push(entry.name);
      }
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) return null;
      throw error;
    }
    candidates.sort();
    for (const hashPart of candidates) {
      // The narinfo is the point of visibility: an entry counts only when it leads to one
      // that has this FileHash.
      const record = await this.#tryGetPath(hashPart);
      if (record && record.narInfo.fileHash === `sha256:${key}`) {
        this.#fileHashes.set(key, hashPart);
        return hashPart;
      }
    }
    return null;
  }

  async putPath(record: PathRecord): Promise<void> {
    this.#checkOpen();
    const { hashPart, text, fileHashKey: newIndex, registeredAt, segment } = preparePathRecord(
      record,
    );
    const oldIndex = await this.#currentIndexKey(hashPart);
    if (segment !== undefined) {
      await this.#writeFile(this.#segmentPath(hashPart), hashPart, segment + "\n");
    } else {
      await removeIfPresent(this.#segmentPath(hashPart));
    }
    if (newIndex !== undefined) await this.#addIndexEntry(newIndex, hashPart);
    await this.#writeNarinfo(hashPart, text, registeredAt);
    if (newIndex !== undefined && !(await exists(this.#indexEntryPath(newIndex, hashPart)))) {
      // A concurrent writer of this path removed it as its old entry; it is ours again.
      await this.#addIndexEntry(newIndex, hashPart);
    }
    if (oldIndex !== undefined && oldIndex !== newIndex) {
      await this.#removeIndexEntry(oldIndex, hashPart);
    }
  }

  async deletePath(hashPart: string): Promise<boolean> {
    this.#checkOpen();
    checkHashPart(hashPart);
    const index = await this.#currentIndexKey(hashPart);
    try {
      await Deno.remove(this.#narinfoPath(hashPart));
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) return false;
      throw error;
    }
    await syncDir(this.#dir);
    await removeIfPresent(this.#segmentPath(hashPart));
    if (index !== undefined) await this.#removeIndexEntry(index, hashPart);
    return true;
  }

  async *listPaths(): AsyncIterable<PathRecord> {
    this.#checkOpen();
    // Names only (33 bytes a path) are held in memory, to sort them; records are read one
    // at a time.
    const hashParts: string[] = [];
    for await (const entry of Deno.readDir(this.#dir)) {
      const m = entry.isFile ? NARINFO_NAME_RE.exec(entry.name) : null;
      if (m) hashParts.push(m[1]);
    }
    hashParts.sort();
    for (const hashPart of hashParts) {
      const record = await this.getPath(hashPart);
      if (record) yield record; // null: deleted since the directory was read
    }
  }

  close(): void {
    this.#closed = true;
    this.#records.clear();
    this.#fileHashes.clear();
  }

  #narinfoPath(hashPart: string): string {
    return join(this.#dir, `${hashPart}.narinfo`);
  }

  #segmentPath(hashPart: string): string {
    return join(this.#dir, `${hashPart}.segment`);
  }

  async #tryGetPath(hashPart: string): Promise<PathRecord | null> {
    try {
      return await this.getPath(hashPart);
    } catch (error) {
      if (error instanceof FormatError) return null;
      throw error;
    }
  }

  /** The index key of the path's current narinfo, if it has one (and parses). */
  async #currentIndexKey(hashPart: string): Promise<string | undefined> {
    const fileHash = (await this.#tryGetPath(hashPart))?.narInfo.fileHash;
    return fileHash === undefined ? undefined : fileHashKey(fileHash);
  }

  async #addIndexEntry(key: string, hashPart: string): Promise<void> {
    const dir = join(this.#indexDir, key);
    for (let attempt = 1;; attempt++) {
      let created = false;
      try {
        await Deno.mkdir(dir);
        created = true;
      } catch (error) {
        if (!(error instanceof Deno.errors.AlreadyExists)) throw error;
      }
      if (created) await syncDir(this.#indexDir);
      try {
        const file = await Deno.open(this.#indexEntryPath(key, hashPart), {
          write: true,
          create: true,
        });
        file.close();
      } catch (error) {
        // A deleter removed the directory after it emptied it; make it again.
        if (error instanceof Deno.errors.NotFound && attempt < 100) continue;
        throw error;
      }
      await syncDir(dir);
      return;
    }
  }

  /**
   * Removes an index entry, and its directory once empty. Not synced: an entry that comes
   * back after a crash leads to no narinfo with its FileHash, and is ignored.
   *
   * Then it reads the narinfo again and puts the entry back if the path has that FileHash
   * now (a concurrent `putPath` of the same path wrote it in between). With `putPath`
   * checking its own entry after its write, the last narinfo written always keeps its
   * index entry, whatever the interleaving of writers.
   */
  async #removeIndexEntry(key: string, hashPart: string): Promise<void> {
    const dir = join(this.#indexDir, key);
    await removeIfPresent(join(dir, hashPart));
    try {
      await Deno.remove(dir);
    } catch (error) {
      // Another path shares the FileHash (or a writer is adding one), or it is gone already.
      if (!(error instanceof Deno.errors.NotFound) && !isDirectoryNotEmpty(error)) throw error;
    }
    if ((await this.#currentIndexKey(hashPart)) === key) await this.#addIndexEntry(key, hashPart);
  }

  #indexEntryPath(key: string, hashPart: string): string {
    return join(this.#indexDir, key, hashPart);
  }

  #writeNarinfo(hashPart: string, text: string, registeredAt: number): Promise<void> {
    return this.#writeFile(this.#narinfoPath(hashPart), hashPart, text, new Date(registeredAt));
  }

  /** Writes `text` to `path` durably: tmp + fsync + rename + fsync(dir); optional mtime. */
  async #writeFile(path: string, hashPart: string, text: string, mtime?: Date): Promise<void> {
    const random = crypto.getRandomValues(new Uint8Array(8));
    const suffix = Array.from(random, (b) => b.toString(16).padStart(2, "0")).join("");
    const temp = join(this.#dir, `.${hashPart}.${suffix}.tmp`);
    const file = await Deno.open(temp, { write: true, createNew: true, mode: 0o644 });
    try {
      try {
        await writeAll(file, new TextEncoder().encode(text));
        if (mtime) await file.utime(mtime, mtime);
        await file.sync();
      } finally {
        file.close();
      }
      await Deno.rename(temp, path);
    } catch (error) {
      await removeIfPresent(temp);
      throw error;
    }
    await syncDir(this.#dir);
  }

  #checkOpen(): void {
    if (this.#closed) throw new Error("Metadata store is closed");
  }
}

/**
 * What identifies one version of a file: device, inode, size, mtime and ctime. A write
 * renames a new file into place (new inode, new ctime), so a changed identity means a
 * changed file.
 */
function fileIdentity(info: Deno.FileInfo): string {
  return `${info.dev}:${info.ino}:${info.size}:${info.mtime?.getTime()}:${info.ctime?.getTime()}`;
}

/**
 * The text and mtime of a narinfo file, and the file's identity, from one open file (so
 * all are of one version).
 */
async function readNarinfoFile(
  path: string,
): Promise<{ text: string; registeredAt: number; identity: string } | null> {
  let file: Deno.FsFile;
  try {
    file = await Deno.open(path, { read: true });
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return null;
    throw error;
  }
  try {
    const info = await file.stat();
    if (!info.isFile || info.size > MAX_NARINFO_BYTES || info.mtime === null) {
      throw new FormatError(`Corrupt metadata file ${path}: not a narinfo file`);
    }
    const bytes = new Uint8Array(info.size);
    let filled = 0;
    while (filled < bytes.length) {
      const n = await file.read(bytes.subarray(filled));
      if (n === null) break;
      filled += n;
    }
    let text: string;
    try {
      text = new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(0, filled));
    } catch (cause) {
      throw new FormatError(`Corrupt metadata file ${path}: not valid UTF-8`, { cause });
    }
    return { text, registeredAt: info.mtime.getTime(), identity: fileIdentity(info) };
  } finally {
    file.close();
  }
}

/** The segment name in a `<hash>.segment` file, or undefined when there is none. */
async function readSegmentFile(path: string): Promise<string | undefined> {
  try {
    return (await Deno.readTextFile(path)).trim();
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return undefined;
    throw error;
  }
}

async function writeAll(file: Deno.FsFile, bytes: Uint8Array): Promise<void> {
  let written = 0;
  while (written < bytes.length) written += await file.write(bytes.subarray(written));
}

async function syncDir(path: string): Promise<void> {
  const dir = await Deno.open(path, { read: true });
  try {
    await dir.sync();
  } finally {
    dir.close();
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}

async function removeIfPresent(path: string): Promise<void> {
  try {
    await Deno.remove(path);
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
}

function isDirectoryNotEmpty(error: unknown): boolean {
  return error instanceof Error && (error as { code?: string }).code === "ENOTEMPTY";
}

async function removeStaleTemps(dir: string): Promise<void> {
  const now = Date.now();
  for await (const entry of Deno.readDir(dir)) {
    if (!entry.isFile || !TEMP_NAME_RE.test(entry.name)) continue;
    const path = join(dir, entry.name);
    try {
      // ctime, not mtime: a temporary file's mtime is already the record's registeredAt.
      const ctime = (await Deno.stat(path)).ctime;
      if (ctime !== null && now - ctime.getTime() > STALE_TEMP_MS) await removeIfPresent(path);
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
    }
  }
}
