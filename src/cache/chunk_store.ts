/**
 * The on-disk chunk store: one file per compressed chunk under
 * `<cache-dir>/objects/chunks/<first 2 hex>/<sha256 hex>.<zst|xz|raw>` (DESIGN.md §3).
 *
 * A chunk's id is the lowercase hex SHA-256 of its UNCOMPRESSED bytes; the file holds one
 * zstd frame, one xz stream or the raw bytes (see compression.ts). Ids are validated
 * strictly (64 lowercase hex digits) because they may come from peers.
 *
 * Invariant: a file at its final name is always complete, and stays so across a crash.
 * Files are written under a temporary name `<final name>.tmp-<suffix>`, made durable, and
 * only then hard-linked to the final name (which fails if another writer got there first:
 * both succeed, the first file stays; filesystems without hard links fall back to rename).
 * Temporary files left by a crash are ignored by every reader and removed by
 * {@link ChunkStore.cleanTemporaryFiles} (the garbage collector calls it).
 *
 * Two ways to make chunk files durable:
 * - {@link ChunkStore.put}, one chunk at a time: write, fsync the file, link, fsync the
 *   directory (~2 ms a chunk on ext4: too slow for 16 000 chunks a GiB);
 * - imports ({@link storeChunkBatch} on the compression Workers, then
 *   {@link ChunkFileCommitter} on the main thread): write temporary files without fsync;
 *   then ONE filesystem-wide flush (`syncfs(2)`, see {@link syncFilesystem}); then link
 *   them to their final names and remove the temporary names; then, before the caller
 *   writes a manifest or narinfo that references them, one more flush. Large imports
 *   run this in rounds while they go (a round every 64 MiB of new files), so the data is
 *   written back while the import computes. Imports of a few new chunks, or where syncfs
 *   is unavailable, fsync each temporary file and directory instead.
 *
 * Crash states of the batched way, which is correct because nothing references a chunk
 * until the caller's commit, after the last flush:
 * - crash before a round's flush returns: temporary files, possibly torn, at temporary
 *   names only: ignored, then cleaned by GC;
 * - crash after the flush, during the links: every file linked so far has durable data
 *   (it was written before the flush began), so a final name never shows a torn file;
 *   links themselves may be lost, which loses nothing referenced;
 * - crash after the links, before the second flush: as above (a link whose temporary
 *   name's removal survived but which itself did not is impossible on a journalled
 *   filesystem, and would only lose an unreferenced file);
 * - the caller commits only after the last flush, so a narinfo never points at a chunk
 *   whose name or data is not durable. Chunks found already stored may have been linked
 *   by a concurrent import that has not flushed yet: the flush being filesystem-wide
 *   covers their names too (the fsync way relies on ext4 committing its whole journal
 *   on fsync, as the one-chunk way always has);
 * - two processes storing the same chunk: each writes its own temporary file (suffixes
 *   are random per import and Worker), the first link wins, the other sees
 *   AlreadyExists, removes its temporary file and uses the stored file.
 * Callers hold the cache's writer lock (cache_lock.ts) from the first lookup to their
 * commit, so the garbage collector never deletes a chunk found present meanwhile.
 *
 * This module checks neither hashes nor compression of what it is given: callers verify
 * chunks they receive. {@link storeChunkBatch} computes ids of the chunks it is handed.
 * @module
 */

import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { granted, loadLibc, O_RDONLY_CLOEXEC } from "./libc.ts";
import { FormatError, NotFoundError } from "../errors.ts";
import {
  type ChunkBatchTarget,
  type ChunkCompression,
  chunkFileExtension,
  compressChunk,
  compressZstdInto,
  FOUND_NEW,
  type StoredChunkBatch,
  zstdBound,
} from "./compression.ts";

const ID_PATTERN = /^[0-9a-f]{64}$/;
const FILE_PATTERN = /^([0-9a-f]{64})\.(zst|xz|raw)$/;
const TEMPORARY_MARKER = ".tmp-";

const COMPRESSION_OF_EXTENSION: Record<string, ChunkCompression> = {
  zst: "zstd",
  xz: "xz",
  raw: "none",
};

/** Throws {@link FormatError} unless `id` is 64 lowercase hex digits (a SHA-256). */
export function validateChunkId(id: string): void {
  if (typeof id !== "string" || !ID_PATTERN.test(id)) {
    const shown = typeof id === "string" ? JSON.stringify(id.slice(0, 80)) : String(id);
    throw new FormatError(`Invalid chunk id: ${shown} (expected 64 lowercase hex digits)`);
  }
}

/** Totals of a {@link ChunkStore}. */
export interface ChunkStoreStats {
  /** Chunk files (a chunk stored in two compressions counts twice). */
  chunks: number;
  /** Sum of their sizes in bytes. */
  storedBytes: number;
}

/** One stored chunk file, as listed by {@link ChunkStore.entries}. */
export interface ChunkEntry {
  id: string;
  compression: ChunkCompression;
  /** Size of the file (compressed bytes). */
  size: number;
}

function isNotFound(error: unknown): boolean {
  return error instanceof Deno.errors.NotFound;
}

function randomSuffix(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Fsyncs a directory so that entries created or renamed in it survive a crash. */
export async function syncDirectory(path: string): Promise<void> {
  let dir: Deno.FsFile | undefined;
  try {
    dir = await Deno.open(path, { read: true });
    await dir.sync();
  } catch (error) {
    // Some filesystems refuse fsync on directories; the data itself is already synced.
    if (!(error instanceof Deno.errors.PermissionDenied) && !isInvalid(error)) throw error;
  } finally {
    dir?.close();
  }
}

function isInvalid(error: unknown): boolean {
  return error instanceof Error && /EINVAL|Invalid argument|not supported/i.test(error.message);
}

/**
 * Compressed chunk files under `<cacheDir>/objects/chunks`.
 *
 * @example
 * ```ts
 * const store = new ChunkStore(cacheDir);
 * await store.put(id, compressChunk(chunk, "zstd"), "zstd"); // true: written now
 * await store.has(id, "zstd"); // true
 * ```
 */
export class ChunkStore {
  #root: string;

  /** A store rooted at `${cacheDir}/objects/chunks` (created on the first put). */
  constructor(cacheDir: string) {
    this.#root = join(cacheDir, "objects", "chunks");
  }

  /** The directory holding the chunk files. */
  get root(): string {
    return this.#root;
  }

  /** Path of a chunk's file; throws {@link FormatError} for an invalid id. */
  chunkPath(id: string, compression: ChunkCompression): string {
    validateChunkId(id);
    return join(this.#root, id.slice(0, 2), `${id}.${chunkFileExtension(compression)}`);
  }

  /** True when the chunk is stored in that compression. */
  async has(id: string, compression: ChunkCompression): Promise<boolean> {
    return (await this.storedSize(id, compression)) !== null;
  }

  /**
   * Size of the chunk's file in bytes, or null when it is not stored as a regular file (a
   * symlink planted in the store is never followed).
   */
  async storedSize(id: string, compression: ChunkCompression): Promise<number | null> {
    const path = this.chunkPath(id, compression);
    try {
      const info = await Deno.lstat(path);
      return info.isFile ? info.size : null;
    } catch (error) {
      if (isNotFound(error)) return null;
      throw error;
    }
  }

  /**
   * Stores a compressed chunk durably. Returns false when it was already there (nothing
   * written), true when this call created it. Concurrent puts of the same id, from this or
   * other processes, all succeed and leave one complete file.
   */
  async put(id: string, compressed: Uint8Array, compression: ChunkCompression): Promise<boolean> {
    const path = this.chunkPath(id, compression);
    if (await this.has(id, compression)) return false;
    const dir = join(this.#root, id.slice(0, 2));
    await this.#ensureDirectory(dir);
    const temporary = `${path}${TEMPORARY_MARKER}${randomSuffix()}`;
    const file = await Deno.open(temporary, { write: true, createNew: true });
    try {
      let written = 0;
      while (written < compressed.length) {
        written += await file.write(compressed.subarray(written));
      }
      await file.sync();
    } catch (error) {
      file.close();
      await Deno.remove(temporary).catch(() => {});
      throw error;
    }
    file.close();
    let created = true;
    try {
      await Deno.link(temporary, path);
    } catch (error) {
      if (error instanceof Deno.errors.AlreadyExists) {
        created = false;
      } else {
        // No hard links here (or another odd failure): an atomic rename still never
        // exposes a partial file; a concurrent writer's identical copy may be replaced.
        try {
          await Deno.rename(temporary, path);
        } catch (renameError) {
          await Deno.remove(temporary).catch(() => {});
          throw renameError;
        }
        await syncDirectory(dir);
        return true;
      }
    }
    await Deno.remove(temporary);
    await syncDirectory(dir);
    return created;
  }

  /** Opens a chunk's file for reading; the caller closes it. {@link NotFoundError} if absent. */
  async openRead(id: string, compression: ChunkCompression): Promise<Deno.FsFile> {
    const path = this.chunkPath(id, compression);
    try {
      return await Deno.open(path, { read: true });
    } catch (error) {
      if (isNotFound(error)) throw this.#notFound(id, compression, error);
      throw error;
    }
  }

  /** A chunk's stored (compressed) bytes. {@link NotFoundError} if absent. */
  async read(id: string, compression: ChunkCompression): Promise<Uint8Array> {
    const path = this.chunkPath(id, compression);
    try {
      return await Deno.readFile(path);
    } catch (error) {
      if (isNotFound(error)) throw this.#notFound(id, compression, error);
      throw error;
    }
  }

  /** Removes a chunk's file; returns false when it was not there. */
  async delete(id: string, compression: ChunkCompression): Promise<boolean> {
    const path = this.chunkPath(id, compression);
    try {
      await Deno.remove(path);
      return true;
    } catch (error) {
      if (isNotFound(error)) return false;
      throw error;
    }
  }

  /** Every stored chunk file (temporary files and stray names skipped), in no set order. */
  async *entries(): AsyncGenerator<ChunkEntry> {
    for await (const { dir, name } of this.#files()) {
      const match = FILE_PATTERN.exec(name);
      if (match === null || match[1].slice(0, 2) !== dir) continue;
      let size: number;
      try {
        const info = await Deno.lstat(join(this.#root, dir, name));
        if (!info.isFile) continue;
        size = info.size;
      } catch (error) {
        if (isNotFound(error)) continue; // deleted meanwhile
        throw error;
      }
      yield { id: match[1], compression: COMPRESSION_OF_EXTENSION[match[2]], size };
    }
  }

  /** Number and total size of the chunk files (walks the directory; ignores temporaries). */
  async stats(): Promise<ChunkStoreStats> {
    let chunks = 0;
    let storedBytes = 0;
    for await (const entry of this.entries()) {
      chunks++;
      storedBytes += entry.size;
    }
    return { chunks, storedBytes };
  }

  /**
   * Removes temporary files (`*.tmp-*`) last modified more than `olderThanMs` ago, left by
   * interrupted writes. Use a generous age (say an hour) while other processes may be
   * writing. Returns how many were removed.
   */
  async cleanTemporaryFiles(olderThanMs: number): Promise<number> {
    const cutoff = Date.now() - olderThanMs;
    let removed = 0;
    for await (const { dir, name } of this.#files()) {
      if (!name.includes(TEMPORARY_MARKER)) continue;
      const path = join(this.#root, dir, name);
      try {
        const info = await Deno.lstat(path);
        if (!info.isFile || (info.mtime?.getTime() ?? 0) > cutoff) continue;
        await Deno.remove(path);
        removed++;
      } catch (error) {
        if (!isNotFound(error)) throw error;
      }
    }
    return removed;
  }

  /** File names in the two-hex-digit subdirectories. */
  async *#files(): AsyncGenerator<{ dir: string; name: string }> {
    let dirs: string[];
    try {
      dirs = [];
      for await (const entry of Deno.readDir(this.#root)) {
        if (entry.isDirectory && /^[0-9a-f]{2}$/.test(entry.name)) dirs.push(entry.name);
      }
    } catch (error) {
      if (isNotFound(error)) return;
      throw error;
    }
    dirs.sort();
    for (const dir of dirs) {
      const names: string[] = [];
      try {
        for await (const entry of Deno.readDir(join(this.#root, dir))) {
          if (entry.isFile) names.push(entry.name);
        }
      } catch (error) {
        if (isNotFound(error)) continue;
        throw error;
      }
      for (const name of names) yield { dir, name };
    }
  }

  /**
   * Writes a chunk file under a temporary name next to its final one, without fsync, for a
   * {@link ChunkFileCommitter} to make durable and link (chunks fetched from peers).
   * `suffix` names the writer, as {@link ChunkBatchTarget.tmpSuffix} does.
   */
  async writeTemporary(
    id: string,
    compression: ChunkCompression,
    bytes: Uint8Array,
    suffix: string,
  ): Promise<{ temporary: string; path: string }> {
    const path = this.chunkPath(id, compression);
    await this.#ensureDirectory(join(this.#root, id.slice(0, 2)));
    const temporary = `${path}${TEMPORARY_MARKER}${suffix}`;
    await Deno.writeFile(temporary, bytes);
    return { temporary, path };
  }

  /** Creates `dir` (and the store root) if needed, fsyncing the parent of what it creates. */
  async #ensureDirectory(dir: string): Promise<void> {
    try {
      await Deno.mkdir(dir);
    } catch (error) {
      if (error instanceof Deno.errors.AlreadyExists) return;
      if (!isNotFound(error)) throw error;
      makeChunkRoot(this.#root);
      try {
        await Deno.mkdir(dir);
      } catch (again) {
        if (again instanceof Deno.errors.AlreadyExists) return;
        throw again;
      }
    }
    await syncDirectory(this.#root);
  }

  #notFound(id: string, compression: ChunkCompression, cause: unknown): NotFoundError {
    return new NotFoundError(`Chunk not found: ${id}.${chunkFileExtension(compression)}`, {
      cause,
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Batched writes (imports)

/** Ids of written chunks a {@link ChunkBatchStorer} remembers (bounds its memory). */
const WRITTEN_IDS = 65536;

/** The final path of a chunk under a chunk root (no validation: ids come from SHA-256 here). */
function chunkFilePath(root: string, id: string, extension: string): string {
  return `${root}/${id.slice(0, 2)}/${id}.${extension}`;
}

/**
 * Stores batches of chunks on one thread (a compression Worker, or the calling thread when
 * there are none), without fsync: for each chunk, computes its id (SHA-256), reuses the
 * file of the first chunk root in `target.lookIn` that holds it (reading its bytes), and
 * otherwise compresses it and writes `<final path in target.writeTo>.tmp-<tmpSuffix>`. A
 * chunk this thread already wrote in the same import is not compressed again: its file
 * is read back. The caller makes the temporary files durable and links them with a
 * {@link ChunkFileCommitter}, whose module comment says why that is crash-safe.
 *
 * Returns the frames of the batch concatenated (in `spare` when it is large enough), which
 * is the batch's share of the NAR as served.
 */
export class ChunkBatchStorer {
  #compression: ChunkCompression;
  #level: number | undefined;
  #extension: string;
  /** Fan-out directories known to exist. */
  #dirs = new Set<string>();
  /** Ids this thread wrote as temporary files, for the current `tmpSuffix` only. */
  #written = new Set<string>();
  /** Frames of written chunks that came again, read back once (a few, most recent last). */
  #repeated = new Map<string, Uint8Array>();
  #session = "";

  /** A storer that compresses new chunks as given. */
  constructor(compression: ChunkCompression, level?: number) {
    this.#compression = compression;
    this.#level = level;
    this.#extension = chunkFileExtension(compression);
  }

  /** Stores the chunks `data` holds back to back, of the given `lengths`. */
  store(
    data: Uint8Array,
    lengths: Uint32Array,
    target: ChunkBatchTarget,
    spare?: ArrayBuffer,
  ): StoredChunkBatch {
    if (target.tmpSuffix !== this.#session) {
      this.#written.clear();
      this.#repeated.clear();
      this.#session = target.tmpSuffix;
    }
    let bound = 0;
    for (const length of lengths) bound += zstdBound(length);
    let out = spare !== undefined && spare.byteLength >= bound
      ? new Uint8Array(spare)
      : new Uint8Array(bound);
    const frameLengths = new Uint32Array(lengths.length);
    const found = new Uint8Array(lengths.length);
    const ids: string[] = [];
    let used = 0;
    let offset = 0;
    const ensureRoom = (room: number) => {
      if (out.length - used >= room) return;
      const grown = new Uint8Array(Math.max(out.length * 2, used + room));
      grown.set(out.subarray(0, used));
      out = grown;
    };
    const place = (frame: Uint8Array) => {
      ensureRoom(frame.length);
      out.set(frame, used);
      return frame.length;
    };
    for (let i = 0; i < lengths.length; i++) {
      const chunk = data.subarray(offset, offset + lengths[i]);
      offset += lengths[i];
      const id = createHash("sha256").update(chunk).digest("hex");
      ids.push(id);
      let length: number;
      const stored = this.#lookUp(id, target.lookIn);
      if (stored !== null) {
        length = place(stored.frame);
        found[i] = stored.index;
      } else if (this.#written.has(id)) {
        length = place(this.#repeatedFrame(target, id));
        found[i] = FOUND_NEW;
      } else {
        ensureRoom(zstdBound(chunk.length));
        length = this.#compressInto(chunk, out, used);
        const frame = out.subarray(used, used + length);
        this.#writeTemporary(target.writeTo, id, target.tmpSuffix, frame);
        this.#written.add(id);
        if (this.#written.size > WRITTEN_IDS) {
          this.#written.delete(this.#written.values().next().value!);
        }
        found[i] = FOUND_NEW;
      }
      frameLengths[i] = length;
      used += length;
    }
    return {
      ids: ids.join(""),
      frames: out.buffer as ArrayBuffer,
      frameLengths: frameLengths.buffer,
      found: found.buffer,
      tmpSuffix: target.tmpSuffix,
    };
  }

  /** The stored file of chunk `id` in the first root that has it as a regular file. */
  #lookUp(id: string, roots: string[]): { frame: Uint8Array; index: number } | null {
    for (let index = 0; index < roots.length; index++) {
      const path = chunkFilePath(roots[index], id, this.#extension);
      // Most chunks of an import are absent: `existsSync` answers that without the cost of
      // a thrown NotFound (~4 µs instead of ~40 µs); lstat then rules out symlinks.
      if (!existsSync(path)) continue;
      try {
        if (!Deno.lstatSync(path).isFile) continue;
        return { frame: Deno.readFileSync(path), index };
      } catch (error) {
        if (isNotFound(error)) continue;
        throw error;
      }
    }
    return null;
  }

  /**
   * The frame of a chunk this thread wrote earlier in the import (a NAR repeats some
   * chunks many times): from memory when it came again recently, else read back from its
   * temporary file or, when a commit round linked and removed that meanwhile, its final
   * file.
   */
  #repeatedFrame(target: ChunkBatchTarget, id: string): Uint8Array {
    let frame = this.#repeated.get(id);
    if (frame !== undefined) {
      this.#repeated.delete(id);
    } else {
      const path = chunkFilePath(target.writeTo, id, this.#extension);
      try {
        frame = Deno.readFileSync(`${path}${TEMPORARY_MARKER}${target.tmpSuffix}`);
      } catch (error) {
        if (!isNotFound(error)) throw error;
        frame = Deno.readFileSync(path);
      }
      if (this.#repeated.size >= 32) {
        this.#repeated.delete(this.#repeated.keys().next().value!);
      }
    }
    this.#repeated.set(id, frame);
    return frame;
  }

  #compressInto(chunk: Uint8Array, out: Uint8Array, offset: number): number {
    if (this.#compression === "zstd") {
      return compressZstdInto(chunk, this.#level ?? 3, out, offset);
    }
    const frame = compressChunk(chunk, this.#compression, { level: this.#level });
    if (frame.length > out.length - offset) throw new RangeError("Frame exceeds its bound");
    out.set(frame, offset);
    return frame.length;
  }

  #writeTemporary(root: string, id: string, suffix: string, frame: Uint8Array): void {
    const dir = `${root}/${id.slice(0, 2)}`;
    const path = `${dir}/${id}.${this.#extension}${TEMPORARY_MARKER}${suffix}`;
    if (!this.#dirs.has(dir)) ensureDirectorySync(root, dir, this.#dirs);
    try {
      Deno.writeFileSync(path, frame, { createNew: true });
    } catch (error) {
      // This thread wrote it earlier in the import (the suffix is this thread's own), and
      // forgot: it is complete.
      if (error instanceof Deno.errors.AlreadyExists) return;
      if (!isNotFound(error)) throw error;
      // The directory went away since it was seen: make it again, once.
      this.#dirs.delete(dir);
      ensureDirectorySync(root, dir, this.#dirs);
      Deno.writeFileSync(path, frame, { createNew: true });
    }
  }
}

/** Creates `dir` (and `root` if needed) and records it in `known`. */
function ensureDirectorySync(root: string, dir: string, known: Set<string>): void {
  if (existsSync(dir)) {
    known.add(dir);
    return;
  }
  try {
    Deno.mkdirSync(dir);
  } catch (error) {
    if (isNotFound(error)) {
      makeChunkRoot(root);
      try {
        Deno.mkdirSync(dir);
      } catch (again) {
        if (!(again instanceof Deno.errors.AlreadyExists)) throw again;
      }
    } else if (!(error instanceof Deno.errors.AlreadyExists)) {
      throw error;
    }
  }
  known.add(dir);
}

/**
 * Links temporary chunk files to their final names and removes the temporary names:
 * `pairs` is `[temporary, final, temporary, final, …]`. Returns 1 per pair whose link
 * created the final name, 0 where it already existed (also when the temporary file is gone
 * because an earlier pair linked it). A temporary file must be durable before it is
 * linked (see the module comment). Without hard links, falls back to rename.
 */
export function linkTemporaryFiles(pairs: string[]): Uint8Array<ArrayBuffer> {
  const created = new Uint8Array(pairs.length / 2);
  for (let i = 0; i + 1 < pairs.length; i += 2) {
    const temporary = pairs[i];
    const path = pairs[i + 1];
    try {
      Deno.linkSync(temporary, path);
      created[i / 2] = 1;
    } catch (error) {
      // Given twice (a Worker reports a repeated chunk's file again): linked the first time.
      if (isNotFound(error) && existsSync(path)) continue;
      if (!(error instanceof Deno.errors.AlreadyExists)) {
        // No hard links here (or another odd failure): an atomic rename still never
        // exposes a partial file; a concurrent writer's identical copy may be replaced.
        Deno.renameSync(temporary, path);
        created[i / 2] = 1;
        continue;
      }
    }
    try {
      Deno.removeSync(temporary);
    } catch (error) {
      if (!isNotFound(error)) throw error;
    }
  }
  return created;
}

// ---------------------------------------------------------------------------------------------
// Filesystem-wide flush

/** Whether `sync -f` may work (false once it failed to run). */
let syncCommandWorks = true;

/** `FS_IOC_GETFLAGS` / `FS_IOC_SETFLAGS` (`_IOR/_IOW('f', 1/2, long)`), and `FS_TOPDIR_FL`. */
const FS_IOC_GETFLAGS = 0x80086601n;
const FS_IOC_SETFLAGS = 0x40086602n;
const FS_TOPDIR_FL = 0x00020000;

/**
 * Creates a chunk root (and its parents) and marks it, where the filesystem knows the
 * flag (ext2/3/4), as the top of a directory hierarchy (`chattr +T`): ext4's Orlov
 * allocator then spreads the 256 fan-out directories, and so the chunk files' inodes,
 * over the block groups, instead of packing them next to the cache directory. Measured
 * here (ext4): creating a file in a block group crowded with recently deleted inodes
 * took 0.4–1.1 ms of CPU, in a spread-out fan-out directory ~20 µs. Best effort.
 */
function makeChunkRoot(root: string): void {
  Deno.mkdirSync(root, { recursive: true });
  const lib = loadLibc();
  if (lib === null) return;
  const fd = lib.symbols.open(new TextEncoder().encode(`${root}\0`), O_RDONLY_CLOEXEC);
  if (fd < 0) return;
  try {
    const flags = new Uint8Array(8);
    if (lib.symbols.ioctl(fd, FS_IOC_GETFLAGS, flags) !== 0) return;
    const view = new DataView(flags.buffer);
    const value = view.getInt32(0, true);
    if (value & FS_TOPDIR_FL) return;
    view.setInt32(0, value | FS_TOPDIR_FL, true);
    lib.symbols.ioctl(fd, FS_IOC_SETFLAGS, flags);
  } finally {
    lib.symbols.close(fd);
  }
}

/**
 * Flushes every dirty page and metadata change of the filesystem holding `path` to disk,
 * like `syncfs(2)`: through libc (FFI, on Linux) or else by running `sync -f <path>`
 * (GNU coreutils). Returns false, having done nothing, when neither is available or
 * either failed; callers then fsync file by file.
 */
export async function syncFilesystem(path: string): Promise<boolean> {
  const lib = loadLibc();
  if (lib !== null) {
    const fd = lib.symbols.open(new TextEncoder().encode(`${path}\0`), O_RDONLY_CLOEXEC);
    if (fd >= 0) {
      try {
        if (await lib.symbols.syncfs(fd) === 0) return true;
      } finally {
        lib.symbols.close(fd);
      }
    }
  }
  if (!syncCommandWorks || !granted({ name: "run", command: "sync" })) return false;
  try {
    const out = await new Deno.Command("sync", {
      args: ["-f", path],
      stdin: "null",
      stdout: "null",
      stderr: "null",
    }).output();
    return out.success;
  } catch {
    // not installed, or not allowed to run
    syncCommandWorks = false;
    return false;
  }
}

/**
 * Fsyncs a file by path (opened read-only, which fsync accepts on Linux). A temporary file
 * that is gone was linked by an earlier round, after it was made durable.
 */
async function syncFile(path: string): Promise<void> {
  let file: Deno.FsFile;
  try {
    file = await Deno.open(path, { read: true });
  } catch (error) {
    if (isNotFound(error)) return;
    throw error;
  }
  try {
    await file.sync();
  } finally {
    file.close();
  }
}

/** Runs `fn` over `items` with at most `limit` calls in flight. */
async function forEachLimited<T>(
  items: T[],
  limit: number,
  fn: (item: T) => Promise<void>,
): Promise<void> {
  let next = 0;
  const run = async () => {
    while (next < items.length) await fn(items[next++]);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, run));
}

/** A temporary chunk file written by {@link ChunkBatchStorer}, waiting to be linked. */
interface PendingFile {
  temporary: string;
  path: string;
  size: number;
}

/** Options of {@link ChunkFileCommitter}. */
export interface ChunkFileCommitterOptions {
  /**
   * Runs {@link linkTemporaryFiles} (on a Worker, say); default: in this thread.
   */
  link?: (pairs: string[]) => Promise<Uint8Array>;
  /** Bytes of new files after which a round (flush, then links) starts; default 64 MiB. */
  roundBytes?: number;
  /**
   * Flushes the filesystem holding a path, false when it cannot (then files and
   * directories are fsynced one by one); default {@link syncFilesystem}.
   */
  flush?: (path: string) => Promise<boolean>;
  /**
   * Imports that wrote at most this many files, in no earlier round, fsync them one by one
   * instead of flushing the filesystem (cheaper when other processes have much unwritten
   * data); default 32.
   */
  fsyncMax?: number;
}

/** What {@link ChunkFileCommitter.commit} made. */
export interface CommittedFiles {
  /** Final names this import created (the others existed already). */
  created: number;
  /** Their total size. */
  createdBytes: number;
}

/**
 * Makes the temporary files of an import ({@link ChunkBatchStorer}) durable at their final
 * names under the chunk root `root`, in rounds while the import goes on and once more at
 * its end, as the module comment describes: flush, link, and at the end flush again.
 * Add files with {@link ChunkFileCommitter.add} once their writes have COMPLETED (the
 * Worker replied); call {@link ChunkFileCommitter.commit} before committing anything that
 * references them, or {@link ChunkFileCommitter.abort} to remove what is still temporary.
 */
export class ChunkFileCommitter {
  #root: string;
  #link: (pairs: string[]) => Promise<Uint8Array>;
  #flush: (path: string) => Promise<boolean>;
  #roundBytes: number;
  #fsyncMax: number;
  #pending: PendingFile[] = [];
  #pendingBytes = 0;
  /** The temporary name added last (repeats often come in a row). */
  #last = "";
  /** Directories holding linked files, for the fsync way. */
  #dirs = new Set<string>();
  #round: Promise<void> | null = null;
  #rounds = 0;
  #failure: unknown = null;
  #created = 0;
  #createdBytes = 0;

  /** A committer for files under the chunk root `root`. */
  constructor(root: string, options: ChunkFileCommitterOptions = {}) {
    this.#root = root;
    this.#link = options.link ?? ((pairs) => Promise.resolve(linkTemporaryFiles(pairs)));
    this.#flush = options.flush ?? syncFilesystem;
    this.#roundBytes = options.roundBytes ?? 64 * 1024 * 1024;
    this.#fsyncMax = options.fsyncMax ?? 32;
  }

  /** Files added and not yet linked. */
  get pending(): number {
    return this.#pending.length;
  }

  /**
   * Records a completely written temporary file; may start a round in the background. A
   * file added again (Workers report a repeated chunk's file each time) costs a failed
   * link and counts once.
   */
  add(temporary: string, path: string, size: number): void {
    if (this.#last === temporary) return;
    this.#last = temporary;
    this.#pending.push({ temporary, path, size });
    this.#pendingBytes += size;
    if (this.#pendingBytes >= this.#roundBytes && this.#round === null) {
      this.#round = this.#runRound(this.#takePending(), false)
        .catch((error) => {
          this.#failure ??= error;
        })
        .finally(() => {
          this.#round = null;
        });
    }
  }

  /**
   * Makes every added file durable at its final name (and the names themselves durable);
   * returns how many final names this import created. Throws if a round failed.
   */
  async commit(): Promise<CommittedFiles> {
    while (this.#round !== null) await this.#round;
    if (this.#failure !== null) throw this.#failure;
    const files = this.#takePending();
    if (files.length > 0 || this.#rounds > 0) {
      if (this.#rounds === 0 && files.length <= this.#fsyncMax) {
        await this.#durable(files, true);
        await this.#linkFiles(files);
        await this.#syncDirectories();
      } else {
        await this.#runRound(files, true);
      }
    }
    return { created: this.#created, createdBytes: this.#createdBytes };
  }

  /** Waits for a running round, then removes the files not linked yet (best effort). */
  async abort(): Promise<void> {
    while (this.#round !== null) await this.#round;
    const files = this.#takePending();
    await forEachLimited(files, 16, async (file) => {
      await Deno.remove(file.temporary).catch(() => {});
    });
  }

  #takePending(): PendingFile[] {
    const files = this.#pending;
    this.#pending = [];
    this.#pendingBytes = 0;
    return files;
  }

  /** Flush, link, and when `last`, flush again (each flush falling back to fsyncs). */
  async #runRound(files: PendingFile[], last: boolean): Promise<void> {
    this.#rounds++;
    await this.#durable(files, false);
    await this.#linkFiles(files);
    if (last && !(await this.#flush(this.#root))) await this.#syncDirectories();
  }

  /** Makes the files' data durable: one filesystem flush unless `fsync` (or unavailable). */
  async #durable(files: PendingFile[], fsync: boolean): Promise<void> {
    if (files.length === 0) return;
    if (!fsync && await this.#flush(this.#root)) return;
    await forEachLimited(files, 16, (file) => syncFile(file.temporary));
  }

  async #linkFiles(files: PendingFile[]): Promise<void> {
    if (files.length === 0) return;
    const pairs: string[] = [];
    for (const file of files) pairs.push(file.temporary, file.path);
    const created = await this.#link(pairs);
    files.forEach((file, i) => {
      this.#dirs.add(file.path.slice(0, file.path.lastIndexOf("/")));
      if (created[i]) {
        this.#created++;
        this.#createdBytes += file.size;
      }
    });
  }

  /** Fsyncs the directories of linked files and the chunk root (the fsync way). */
  async #syncDirectories(): Promise<void> {
    await forEachLimited([...this.#dirs, this.#root], 16, syncDirectory);
  }
}
