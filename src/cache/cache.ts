/**
 * The cache facade: imports a NAR stream into the deduplicated chunk store, opens stored
 * NARs as streams (compressed as served, or decompressed), lists paths and reports sizes.
 * It wires the pure codecs (NAR validator, FastCDC, narinfo, signing) to the I/O modules
 * (chunk store, manifest store, metadata backend).
 *
 * Import order, for crash safety (DESIGN.md §3): chunks (each durable), then the manifest,
 * then the narinfo record in one atomic metadata commit. A narinfo is never visible before
 * all its data is durable, and a failed import (bad NAR, hash mismatch) records nothing;
 * chunks it wrote stay unreferenced until garbage collection.
 * @module
 */

import { IntegrityError } from "../errors.ts";
import { AccessTimes } from "./access_times.ts";
import { type AuditEventType, AuditLog } from "./audit.ts";
import { withWriterLock } from "./cache_lock.ts";
import { ChunkFileCommitter, ChunkStore } from "./chunk_store.ts";
import { loadLibc, regularFileSizeSync } from "./libc.ts";
import {
  type NarPieceOptions,
  openNarPieces,
  PIECE_BYTES,
  readChunkRange,
  readNarFile,
} from "./nar_pieces.ts";
import { StreamChunker } from "./chunker.ts";
import {
  type ChunkBatchTarget,
  type ChunkCompression,
  ChunkCompressor,
  chunkFileExtension,
  decompressChunk,
  FOUND_NEW,
  narFileExtension,
  nixCompressionName,
} from "./compression.ts";
import {
  createSha256,
  formatBase16,
  formatNixHash,
  normalizeNixHash,
  parseNixHash,
  sha256,
} from "./hash.ts";
import { decodeManifest, type Manifest, type ManifestEntry, ManifestStore } from "./manifest.ts";
import {
  BoundedCache,
  type MetadataBackend,
  type MetadataStore,
  openMetadata,
  type PathRecord,
} from "./metadata.ts";
import { NarParser } from "./nar.ts";
import type { NarInfo } from "./narinfo.ts";
import { encodeNixBase32 } from "./nixbase32.ts";
import { type SecretKey, signatureKeyName, signNarInfo } from "./signing.ts";
import { parseStorePath } from "./store_path.ts";

/** What an import needs to know about a path besides its NAR. */
export interface PathMetadata {
  /** Full store path. */
  storePath: string;
  /** Base names of the referenced paths. */
  references: string[];
  /** Base name of the deriver. */
  deriver?: string;
  ca?: string;
  /** Signatures the path already carries (`name:base64`). */
  sigs: string[];
  /** The NAR hash the origin claims (any SHA-256 form); the import fails if ours differs. */
  narHash?: string;
  /** The NAR size the origin claims; the import fails if ours differs. */
  narSize?: number;
}

/** Options of {@link Cache.importNar}. */
export interface ImportOptions {
  compression: ChunkCompression;
  /** Adds this key's signature to the narinfo. */
  signingKey?: SecretKey;
  /** A compressor pool to reuse across imports; one is made (and closed) otherwise. */
  compressor?: ChunkCompressor;
  /** The segment the path goes to (see segments.ts). */
  segment?: string;
  /** How the audit log names the event; default "Import". */
  auditAs?: AuditEventType;
  /** Said before the NAR's size in the audit event's detail (e.g. where it came from). */
  auditDetail?: string;
}

/** What an import did. */
export interface ImportResult {
  record: PathRecord;
  chunks: number;
  /** Chunks this import wrote (the rest were already stored). */
  newChunks: number;
  /** Bytes of chunk files this import wrote. */
  newStoredBytes: number;
}

/** Sizes of the whole cache, for `status`. */
export interface CacheStats {
  paths: number;
  narBytes: number;
  storedBytes: number;
  chunks: number;
  /** narBytes / storedBytes (1 when empty). */
  dedupRatio: number;
  /** Paths and NAR bytes by segment name ("" for paths of no segment). */
  segments: Record<string, { paths: number; narBytes: number }>;
}

/** A stored NAR ready to be served. */
export interface StoredNar {
  record: PathRecord;
  manifest: Manifest;
}

/**
 * Uncompressed bytes of chunks an import keeps in flight (being compressed and written)
 * before it waits for the oldest: bounds memory while keeping both cores busy.
 */
const IMPORT_WINDOW_BYTES = 12 * 1024 * 1024;

/** Bytes of each piece of {@link Cache.openStoredNar}'s stream (nar_pieces.ts). */
export { PIECE_BYTES };

/** Chunks {@link Cache.missingChunks} checks between two turns of the event loop. */
const STAT_BATCH = 1024;

/** Limits of the in-process manifest cache: manifests, and their chunk entries in all. */
const MANIFEST_CACHE_LIMITS = { maxEntries: 4096, maxWeight: 64 * 1024 };

/** The local cache: chunk store + manifests + metadata, under one cache directory. */
export class Cache {
  readonly cacheDir: string;
  readonly backend: MetadataBackend;
  readonly metadata: MetadataStore;
  readonly chunks: ChunkStore;
  readonly manifests: ManifestStore;
  readonly accessTimes: AccessTimes;
  readonly audit: AuditLog;
  /** Manifests read for serving, by FileHash, with their file's path and identity. */
  #manifestCache = new BoundedCache<string, { manifest: Manifest; path: string; identity: string }>(
    MANIFEST_CACHE_LIMITS,
  );
  /** Chunk file paths of manifests, in manifest order (computed once per manifest object). */
  #chunkPaths = new WeakMap<Manifest, { paths: string[]; cPaths: Uint8Array[] }>();

  private constructor(cacheDir: string, backend: MetadataBackend, metadata: MetadataStore) {
    this.cacheDir = cacheDir;
    this.backend = backend;
    this.metadata = metadata;
    this.chunks = new ChunkStore(cacheDir);
    this.manifests = new ManifestStore(cacheDir);
    this.accessTimes = new AccessTimes(cacheDir);
    this.audit = new AuditLog(cacheDir);
  }

  /** Opens (creating if needed) the cache in `cacheDir` with the given metadata backend. */
  static async open(cacheDir: string, options: { backend: MetadataBackend }): Promise<Cache> {
    await Deno.mkdir(cacheDir, { recursive: true });
    const metadata = await openMetadata(cacheDir, options.backend);
    return new Cache(cacheDir, options.backend, metadata);
  }

  /** Releases the metadata store. */
  close(): void {
    this.metadata.close();
  }

  /** The record of a path by hash part, or null. */
  getPath(hashPart: string): Promise<PathRecord | null> {
    return this.metadata.getPath(hashPart);
  }

  /** Every path record, sorted by hash part. */
  listPaths(): AsyncIterable<PathRecord> {
    return this.metadata.listPaths();
  }

  /**
   * Imports one NAR: validates it as it streams, splits it into chunks, stores the chunks
   * not yet present (compressed), writes the manifest and then the narinfo record.
   * IntegrityError when the NAR does not match `meta.narHash`/`meta.narSize`; FormatError
   * when it is not a valid NAR. Nothing becomes visible unless everything succeeded.
   */
  importNar(
    nar: ReadableStream<Uint8Array>,
    meta: PathMetadata,
    options: ImportOptions,
  ): Promise<ImportResult> {
    parseStorePath(meta.storePath);
    return withWriterLock(this.cacheDir, async () => {
      const compressor = options.compressor ??
        new ChunkCompressor({ compression: options.compression });
      try {
        const stored = await this.#storeChunks(nar, options.compression, compressor, this.chunks);
        checkClaims(meta, stored.manifest);
        const record = await this.#commit(stored.manifest, meta, options);
        return {
          record,
          chunks: stored.manifest.chunks.length,
          newChunks: stored.newChunks,
          newStoredBytes: stored.newStoredBytes,
        };
      } finally {
        if (!options.compressor) compressor.close();
      }
    });
  }

  /**
   * Commits a NAR whose chunk files are already durable in this cache's store (fetched from
   * peers): checks `meta`'s claims against `manifest`, writes the manifest, then the
   * record. The caller holds the writer lock ({@link withWriterLock}) from before it wrote
   * the first chunk file until this returns, so that no sweep removes them in between.
   */
  commitFetchedNar(
    manifest: Manifest,
    meta: PathMetadata,
    options: Omit<ImportOptions, "compressor" | "compression">,
  ): Promise<PathRecord> {
    checkClaims(meta, manifest);
    return this.#commit(manifest, meta, { ...options, compression: manifest.compression });
  }

  /** Writes the manifest, then commits the narinfo record (the point of visibility). */
  async #commit(
    manifest: Manifest,
    meta: PathMetadata,
    options: ImportOptions,
  ): Promise<PathRecord> {
    await this.manifests.write(manifest);
    const narInfo: NarInfo = {
      storePath: meta.storePath,
      url: `nar/${encodeNixBase32(manifest.fileHash)}.${narFileExtension(manifest.compression)}`,
      compression: nixCompressionName(manifest.compression),
      fileHash: formatNixHash(manifest.fileHash),
      fileSize: manifest.fileSize,
      narHash: formatNixHash(manifest.narHash),
      narSize: manifest.narSize,
      references: [...meta.references],
      deriver: meta.deriver,
      sigs: [...meta.sigs],
      ca: meta.ca,
    };
    if (options.signingKey) addSignature(narInfo, options.signingKey);
    const record: PathRecord = { narInfo, registeredAt: Date.now() };
    if (options.segment !== undefined) record.segment = options.segment;
    await this.metadata.putPath(record);
    const { hash } = parseStorePath(meta.storePath);
    await this.accessTimes.touch([hash], record.registeredAt);
    await this.audit.append([{
      type: options.auditAs ?? "Import",
      storePath: meta.storePath,
      segment: record.segment,
      detail: `${
        options.auditDetail ? `${options.auditDetail}: ` : ""
      }${manifest.narSize} NAR bytes in ${manifest.chunks.length} chunks`,
    }]);
    return record;
  }

  /**
   * Chunks a NAR stream, writing the chunks that neither this cache nor `target` holds into
   * `target` (the cache's own store, or a staging one), and returns its manifest.
   *
   * The main thread reads the NAR (into one reused buffer when it is a byte stream, such as
   * dumpNar's), validates and hashes it, cuts it into chunks and packs them into
   * ~1 MiB batches; the compressor's Workers hash, look up, compress and write each batch
   * (temporary files, ChunkBatchStorer) and hand back its frames, which are hashed into
   * FileHash in order here; a ChunkFileCommitter makes the new files durable in rounds
   * (one filesystem flush each) and links them to their final names, and once more at the
   * end, before the caller commits anything that references them (chunk_store.ts says
   * why that is crash-safe). Batch and frame buffers go round between the threads.
   */
  async #storeChunks(
    nar: ReadableStream<Uint8Array>,
    compression: ChunkCompression,
    compressor: ChunkCompressor,
    target: ChunkStore,
  ): Promise<{ manifest: Manifest; newChunks: number; newStoredBytes: number }> {
    const BATCH_BYTES = 2 * 1024 * 1024;
    const BATCH_CAPACITY = BATCH_BYTES + 256 * 1024;
    const narHash = createSha256();
    const fileHash = createSha256();
    const chunker = new StreamChunker();
    const entries: ManifestEntry[] = [];
    const extension = chunkFileExtension(compression);
    const batchTarget: ChunkBatchTarget = {
      lookIn: target === this.chunks ? [target.root] : [this.chunks.root, target.root],
      writeTo: target.root,
      tmpSuffix: Array.from(
        crypto.getRandomValues(new Uint8Array(8)),
        (b) => b.toString(16).padStart(2, "0"),
      ).join(""),
    };
    compressor.warm();
    const committer = new ChunkFileCommitter(target.root, {
      link: (pairs) => compressor.linkFiles(pairs),
    });
    type Reply = Awaited<ReturnType<ChunkCompressor["storeBatch"]>>;
    // Batches in flight, oldest first, with their chunks' sizes.
    const window: { sizes: Uint32Array; reply: Promise<Reply> }[] = [];
    let windowBytes = 0;
    // Buffers back from the Workers, for the next batches and frames.
    const batchBuffers: ArrayBuffer[] = [];
    const frameBuffers: ArrayBuffer[] = [];
    let batch = new Uint8Array(BATCH_CAPACITY);
    let batchUsed = 0;
    let batchLengths: number[] = [];
    let narSize = 0;
    let fileSize = 0;

    const send = () => {
      if (batchLengths.length === 0) return;
      const sizes = Uint32Array.from(batchLengths);
      const reply = compressor.storeBatch(
        batch.buffer,
        sizes,
        batchTarget,
        frameBuffers.pop(),
      );
      reply.catch(() => {}); // handled where the window is drained
      window.push({ sizes, reply });
      windowBytes += batchUsed;
      const spare = batchBuffers.pop();
      batch = spare ? new Uint8Array(spare) : new Uint8Array(BATCH_CAPACITY);
      batchUsed = 0;
      batchLengths = [];
    };
    const add = (chunk: Uint8Array) => {
      if (batchUsed + chunk.length > batch.length) send();
      batch.set(chunk, batchUsed);
      batchUsed += chunk.length;
      batchLengths.push(chunk.length);
      if (batchUsed >= BATCH_BYTES) send();
    };
    // Takes the oldest batch's reply: manifest entries, FileHash, new files to commit.
    const take = (sizes: Uint32Array, { batch: stored, data }: Reply) => {
      batchBuffers.push(data);
      const frameLengths = new Uint32Array(stored.frameLengths);
      const found = new Uint8Array(stored.found);
      let total = 0;
      for (let i = 0; i < sizes.length; i++) {
        const id = stored.ids.slice(64 * i, 64 * i + 64);
        const storedSize = frameLengths[i];
        entries.push({ id, size: sizes[i], storedSize });
        if (found[i] === FOUND_NEW) {
          const path = `${target.root}/${id.slice(0, 2)}/${id}.${extension}`;
          committer.add(`${path}.tmp-${stored.tmpSuffix}`, path, storedSize);
        }
        total += storedSize;
      }
      fileHash.update(new Uint8Array(stored.frames, 0, total));
      fileSize += total;
      frameBuffers.push(stored.frames);
    };
    const finishOldest = async () => {
      const { sizes, reply } = window.shift()!;
      for (const size of sizes) windowBytes -= size;
      take(sizes, await reply);
    };

    // A byte stream (dumpNar, request bodies) is read into one reused buffer.
    let byob: ReadableStreamBYOBReader | null = null;
    try {
      byob = nar.getReader({ mode: "byob" });
    } catch {
      byob = null;
    }
    const reader = byob ?? nar.getReader();
    let piece = new ArrayBuffer(BATCH_BYTES);
    const parser = new NarParser();
    let committed: { created: number; createdBytes: number };
    try {
      for (;;) {
        const { value, done } = byob !== null
          ? await byob.read(new Uint8Array(piece))
          : await (reader as ReadableStreamDefaultReader<Uint8Array>).read();
        if (done) break;
        if (byob !== null) piece = value.buffer as ArrayBuffer;
        parser.push(value);
        narHash.update(value);
        narSize += value.length;
        chunker.pushTo(value, add);
        while (windowBytes > IMPORT_WINDOW_BYTES) await finishOldest();
      }
      parser.end();
      chunker.finishTo(add);
      send();
      while (window.length) await finishOldest();
      committed = await committer.commit();
    } catch (error) {
      await reader.cancel().catch(() => {});
      // Settle what is in flight before reporting, so no write outlives the import, and
      // remove the temporary files of the batches that were written.
      const settled = await Promise.allSettled(window.map((w) => w.reply));
      settled.forEach((result, i) => {
        if (result.status === "fulfilled") take(window[i].sizes, result.value);
      });
      await committer.abort();
      throw error;
    }
    return {
      manifest: {
        compression,
        narHash: narHash.digest(),
        narSize,
        fileHash: fileHash.digest(),
        fileSize,
        chunks: entries,
      },
      newChunks: committed.created,
      newStoredBytes: committed.createdBytes,
    };
  }

  /**
   * The stored NAR whose FileHash is `fileHash` (`sha256:<nix32>`, or any SHA-256 form
   * {@link normalizeNixHash} accepts), with its manifest; null when no path has it.
   */
  async findNar(fileHash: string): Promise<StoredNar | null> {
    const hashPart = await this.metadata.findByFileHash(fileHash);
    if (hashPart === null) return null;
    const found = await this.narOfPath(hashPart);
    // The index and the record are two reads: serve only a record that has this FileHash.
    const recorded = found?.record.narInfo.fileHash;
    if (recorded === undefined) return null;
    return recorded === fileHash || recorded === normalizeNixHash(fileHash) ? found : null;
  }

  /**
   * The stored NAR of a path (by hash part), or null when the path is not cached. The
   * record and the manifest are frozen: manifests are cached in process, keyed by FileHash
   * and checked against their file's identity (a `stat`) on every call.
   */
  async narOfPath(hashPart: string): Promise<StoredNar | null> {
    const record = await this.metadata.getPath(hashPart);
    if (record === null || record.narInfo.fileHash === undefined) return null;
    const manifest = await this.#readManifest(record.narInfo.fileHash);
    return manifest === null ? null : { record, manifest };
  }

  /** The manifest of a FileHash (`sha256:<nix32>`), from the in-process cache if current. */
  async #readManifest(fileHash: string): Promise<Manifest | null> {
    const cached = this.#manifestCache.get(fileHash);
    if (cached !== undefined) {
      try {
        if (fileIdentity(Deno.statSync(cached.path)) === cached.identity) return cached.manifest;
      } catch (error) {
        if (!(error instanceof Deno.errors.NotFound)) throw error;
        this.#manifestCache.delete(fileHash);
        return null;
      }
    }
    const path = this.manifests.manifestPath(parseNixHash(fileHash));
    let file: Deno.FsFile;
    try {
      file = await Deno.open(path, { read: true });
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) return null;
      throw error;
    }
    let bytes: Uint8Array;
    let identity: string;
    try {
      const info = await file.stat();
      identity = fileIdentity(info);
      bytes = new Uint8Array(info.size);
      let filled = 0;
      while (filled < bytes.length) {
        const n = await file.read(bytes.subarray(filled));
        if (n === null) break;
        filled += n;
      }
      bytes = bytes.subarray(0, filled);
    } finally {
      file.close();
    }
    const manifest = decodeManifest(bytes);
    for (const chunk of manifest.chunks) Object.freeze(chunk);
    Object.freeze(manifest.chunks);
    Object.freeze(manifest);
    this.#manifestCache.set(fileHash, { manifest, path, identity }, manifest.chunks.length + 1);
    return manifest;
  }

  /**
   * Ids of the manifest's chunks that cannot be served as they are: absent, not a regular
   * file, or not of the size the manifest records (empty when the NAR is whole). Checked
   * before a NAR is served with a 200, so that a body is never cut short (DESIGN.md §7).
   * One synchronous `statx` through libc per distinct chunk (~2 µs from the dentry cache;
   * `Deno.lstatSync`, ~5 µs, where libc is unavailable; an asynchronous one ~15 µs),
   * letting other tasks run every {@link STAT_BATCH} chunks.
   */
  async missingChunks(manifest: Manifest): Promise<string[]> {
    const { paths, cPaths } = this.#chunkPathsOf(manifest);
    const lib = loadLibc();
    const seen = new Set<string>();
    const missing: string[] = [];
    for (let i = 0; i < paths.length; i++) {
      const { id, storedSize: size } = manifest.chunks[i];
      if (seen.has(id)) continue;
      seen.add(id);
      if (seen.size % STAT_BATCH === 0) await new Promise((resolve) => setTimeout(resolve, 0));
      const found = lib === null ? null : regularFileSizeSync(lib, cPaths[i]);
      if (found !== null) {
        if (found !== size) missing.push(id);
        continue;
      }
      let info: Deno.FileInfo;
      try {
        info = Deno.lstatSync(paths[i]);
      } catch (error) {
        if (!(error instanceof Deno.errors.NotFound)) throw error;
        missing.push(id);
        continue;
      }
      if (!info.isFile || info.size !== size) missing.push(id);
    }
    return missing;
  }

  /**
   * The NAR as served (the concatenated chunk files), optionally only a byte range of it,
   * in pieces of {@link PIECE_BYTES} (nar_pieces.ts; `reusePieces` only for `Deno.serve`).
   * Errors the stream if a chunk is missing or has the wrong size, so a cut-short body
   * never looks complete.
   */
  openStoredNar(manifest: Manifest, options: NarPieceOptions = {}): ReadableStream<Uint8Array> {
    return openNarPieces(manifest, this.#chunkPathsOf(manifest), options);
  }

  /**
   * The whole NAR as served (its chunk files concatenated), read now, for NARs of at most
   * {@link PIECE_BYTES} (one piece of {@link Cache.openStoredNar}'s stream, so no more
   * memory): a plain body is cheaper to send than a stream. NotFoundError or IntegrityError
   * when a chunk file is absent or of the wrong size; RangeError for a larger NAR.
   */
  readSmallStoredNar(manifest: Manifest): Uint8Array<ArrayBuffer> {
    if (manifest.fileSize > PIECE_BYTES) {
      throw new RangeError(`NAR file of ${manifest.fileSize} bytes is not small`);
    }
    return readNarFile(manifest, this.#chunkPathsOf(manifest));
  }

  /**
   * The chunk files of a manifest, in order, also as NUL-terminated bytes for libc
   * (remembered for cached manifests).
   */
  #chunkPathsOf(manifest: Manifest): { paths: string[]; cPaths: Uint8Array[] } {
    let known = this.#chunkPaths.get(manifest);
    if (known === undefined) {
      const paths = manifest.chunks.map((chunk) =>
        this.chunks.chunkPath(chunk.id, manifest.compression)
      );
      const encoder = new TextEncoder();
      known = { paths, cPaths: paths.map((path) => encoder.encode(`${path}\0`)) };
      this.#chunkPaths.set(manifest, known);
    }
    return known;
  }

  /**
   * The NAR itself (decompressed chunk by chunk), each chunk checked against its id.
   */
  openNar(manifest: Manifest): ReadableStream<Uint8Array> {
    const { paths, cPaths } = this.#chunkPathsOf(manifest);
    let index = 0;
    return new ReadableStream<Uint8Array>({
      pull(controller) {
        if (index >= manifest.chunks.length) {
          controller.close();
          return;
        }
        const entry = manifest.chunks[index];
        const file = new Uint8Array(entry.storedSize + 1);
        readChunkRange(paths[index], entry, file, {
          from: 0,
          to: entry.storedSize,
          cPath: cPaths[index],
        });
        index++;
        const chunk = decompressChunk(file.subarray(0, entry.storedSize), manifest.compression);
        if (formatBase16(sha256(chunk)) !== entry.id) {
          throw new IntegrityError(`Chunk ${entry.id} does not match its hash`);
        }
        controller.enqueue(chunk);
      },
    }, { highWaterMark: 2 });
  }

  /** Totals over the whole cache, and paths and NAR bytes per segment. */
  async stats(): Promise<CacheStats> {
    let paths = 0;
    let narBytes = 0;
    const segments: Record<string, { paths: number; narBytes: number }> = {};
    for await (const record of this.metadata.listPaths()) {
      paths++;
      narBytes += record.narInfo.narSize;
      const segment = (segments[record.segment ?? ""] ??= { paths: 0, narBytes: 0 });
      segment.paths++;
      segment.narBytes += record.narInfo.narSize;
    }
    const { chunks, storedBytes } = await this.chunks.stats();
    return {
      paths,
      narBytes,
      storedBytes,
      chunks,
      dedupRatio: storedBytes === 0 ? 1 : narBytes / storedBytes,
      segments,
    };
  }
}

/** What identifies one version of a file: device, inode, size, mtime, ctime. */
function fileIdentity(info: Deno.FileInfo): string {
  return `${info.dev}:${info.ino}:${info.size}:${info.mtime?.getTime()}:${info.ctime?.getTime()}`;
}

/** Throws IntegrityError when the NAR is not the one `meta` claims (hash or size). */
function checkClaims(meta: PathMetadata, manifest: Manifest): void {
  if (meta.narHash !== undefined) {
    const expected = parseNixHash(meta.narHash);
    if (formatBase16(expected) !== formatBase16(manifest.narHash)) {
      throw new IntegrityError(
        `NAR hash mismatch for ${meta.storePath}: expected ${formatNixHash(expected)}, got ${
          formatNixHash(manifest.narHash)
        }`,
      );
    }
  }
  if (meta.narSize !== undefined && meta.narSize !== manifest.narSize) {
    throw new IntegrityError(
      `NAR size mismatch for ${meta.storePath}: expected ${meta.narSize}, got ${manifest.narSize}`,
    );
  }
}

/** Adds `key`'s signature to `narInfo` unless it already carries one from that key name. */
export function addSignature(narInfo: NarInfo, key: SecretKey): boolean {
  if (narInfo.sigs.some((sig) => signatureKeyName(sig) === key.name)) return false;
  narInfo.sigs = [...narInfo.sigs, signNarInfo(narInfo, key)].sort();
  return true;
}
