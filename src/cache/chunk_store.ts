/**
 * The on-disk chunk store: one file per compressed chunk under
 * `<cache-dir>/objects/chunks/<first 2 hex>/<sha256 hex>.<zst|xz|raw>` (DESIGN.md §3).
 *
 * A chunk's id is the lowercase hex SHA-256 of its UNCOMPRESSED bytes; the file holds one
 * zstd frame, one xz stream or the raw bytes (see compression.ts). Ids are validated
 * strictly (64 lowercase hex digits) because they may come from peers.
 *
 * Writes are crash-safe and safe between processes: the bytes go to
 * `<path>.tmp-<random>`, are fsynced, then hard-linked to the final name (which fails if
 * another writer got there first; filesystems without hard links fall back to rename), the
 * temporary name is removed and the directory fsynced. A file at its final name is
 * therefore always complete. Temporary files left by a crash are ignored by every reader
 * and removed by {@link ChunkStore.cleanTemporaryFiles}.
 *
 * This module checks neither hashes nor compression: callers verify chunks they receive.
 * @module
 */

import { join } from "node:path";
import { FormatError, NotFoundError } from "../errors.ts";
import { type ChunkCompression, chunkFileExtension } from "./compression.ts";

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
async function syncDirectory(path: string): Promise<void> {
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

  /**
   * Moves a chunk file written elsewhere on the same filesystem (a staged upload's, already
   * fsynced) into the store by hard link, then fsyncs the directory. False when the store
   * already had the chunk. The caller vouches that the file holds chunk `id`.
   */
  async adopt(id: string, compression: ChunkCompression, sourcePath: string): Promise<boolean> {
    const path = this.chunkPath(id, compression);
    const dir = join(this.#root, id.slice(0, 2));
    await this.#ensureDirectory(dir);
    try {
      await Deno.link(sourcePath, path);
    } catch (error) {
      if (error instanceof Deno.errors.AlreadyExists) return false;
      throw error;
    }
    await syncDirectory(dir);
    return true;
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

  /** Creates `dir` (and the store root) if needed, fsyncing the parent of what it creates. */
  async #ensureDirectory(dir: string): Promise<void> {
    try {
      await Deno.mkdir(dir);
    } catch (error) {
      if (error instanceof Deno.errors.AlreadyExists) return;
      if (!isNotFound(error)) throw error;
      await Deno.mkdir(this.#root, { recursive: true });
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
