/**
 * Uploaded paths whose narinfo was accepted, kept as the file Nix uploaded until they are
 * chunked into the cache in the background: `nix copy --to` waits only for arca to write
 * and check the file (FileHash, NarHash, NarSize), not for the re-chunking and
 * compression, which cost several times more (docs/BENCHMARKS.md, "Upload").
 *
 * Each accepted upload is two files in `<cacheDir>/uploads/pending/`: the uploaded file
 * (`<nix32 FileHash>.nar[.xz|.zst|…]`) and its record (`<hash part>.json`: the narinfo's
 * fields, the segment, when it was accepted), written and synced in that order, the record
 * last. Meanwhile the substituter serves the path from here ({@link PendingUploads} is a
 * {@link PathSource} asked before any other): its narinfo names the uploaded file as Nix
 * wrote it (zstd or xz; other compressions are served uncompressed). Its URL keeps working
 * after the import (`<cacheDir>/nar-aliases/`), also for Nix's own narinfo cache, which
 * `nix copy --to` fills with what it uploaded.
 *
 * The imports run one at a time, in the order the narinfos came (dependencies first, as
 * Nix uploads them), once no upload has been received for {@link IMPORT_SETTLE_MS} (or
 * {@link IMPORT_WAIT_MS} after acceptance): the uploading clients first. An imported path
 * gets the uploaded signatures (and arca's own with a signing key), is audited as
 * `Upload`, and its two files are removed. After a crash, the records left are imported at
 * the next start. A file that no longer matches its record (damaged on disk) is dropped
 * with its record and logged; a path already in the cache with that NarHash just has its
 * files removed.
 * @module
 */

import { join } from "node:path";
import type { Cache, PathMetadata } from "../cache/cache.ts";
import {
  pendingDir,
  type PendingUpload,
  readPendingUploads,
  removePendingUpload,
  writePendingUpload,
} from "../cache/pending_records.ts";
import type { ChunkCompression, ChunkCompressor } from "../cache/compression.ts";
import { decompressStream } from "../cache/decompress_stream.ts";
import { nix32Digest, normalizeNixHash } from "../cache/hash.ts";
import type { SecretKey } from "../cache/signing.ts";
import { ArcaError, FormatError, IntegrityError, NotFoundError } from "../errors.ts";
import { NarAliases } from "./nar_aliases.ts";
import type { PathSource, SourcePath } from "./server.ts";

/** How pending uploads are imported. */
export interface PendingUploadsOptions {
  compression: ChunkCompression;
  signingKey?: SecretKey;
  compressor?: ChunkCompressor;
  log?: (message: string) => void;
}

/** No upload received for this long before an import starts. */
const IMPORT_SETTLE_MS = 1_000;
/** The longest an accepted upload waits for quiet before its import starts anyway. */
const IMPORT_WAIT_MS = 30_000;
const SETTLE_POLL_MS = 50;
/** A failed import (not a damaged file) is tried again after this long. */
const RETRY_MS = 60_000;

/** The pending uploads of one cache, served and imported by one process. */
export class PendingUploads implements PathSource {
  readonly kind = "local";
  #cache: Cache;
  #options: PendingUploadsOptions;
  #dir: string;
  #aliases: NarAliases;
  #pending = new Map<string, PendingUpload>();
  /** Uploads being received now. */
  #receiving = 0;
  #lastReceived = 0;
  #wake = Promise.withResolvers<void>();
  #closed = false;
  #loop: Promise<void>;
  #idle = Promise.withResolvers<void>();

  #loaded: Promise<void>;

  /** Loads what a previous run left (in the background) and imports it. */
  constructor(cache: Cache, options: PendingUploadsOptions) {
    this.#cache = cache;
    this.#options = options;
    const dir = pendingDir(cache.cacheDir);
    this.#dir = dir;
    this.#aliases = new NarAliases(cache.cacheDir);
    this.#loaded = (async () => {
      for (const upload of await readPendingUploads(cache.cacheDir, options.log)) {
        this.#pending.set(upload.hashPart, upload);
        // The alias of its file's URL may have been lost with a crash.
        await this.#remember(upload);
      }
    })().catch((error) => options.log?.(`Pending uploads not read: ${error.message}`));
    this.#loop = this.#loaded.then(() => this.#run());
  }

  /** The path's pending upload, if it is accepted and not imported yet. */
  async get(hashPart: string): Promise<PendingUpload | undefined> {
    await this.#loaded;
    return this.#pending.get(hashPart);
  }

  /** Marks an upload being received (imports wait for quiet); call the result when done. */
  receiving(): () => void {
    this.#receiving++;
    let done = false;
    return () => {
      if (done) return;
      done = true;
      this.#receiving--;
      this.#lastReceived = Date.now();
    };
  }

  /**
   * A pending upload of this file (FileHash) with this NAR, if any: another path with the
   * same NAR may reuse it (Nix does not upload a NAR file a HEAD says is there).
   */
  async withFile(fileHash: string, narHash: string, narSize: number) {
    await this.#loaded;
    for (const upload of this.#pending.values()) {
      if (
        upload.fileHash === fileHash && upload.narHash === narHash && upload.narSize === narSize
      ) {
        return upload;
      }
    }
    return undefined;
  }

  /**
   * Makes an upload pending: moves its checked file (`from.move`, synced) into the pending
   * directory, or links the file of another pending upload (`from.link`), then writes its
   * record (synced): from then on it is served, and imported.
   */
  async accept(
    upload: Omit<PendingUpload, "file" | "acceptedAt">,
    from: { move: string } | { link: string },
  ) {
    if (this.#closed) throw new ArcaError("stopping", "The server is stopping");
    await this.#loaded;
    const record = await writePendingUpload(this.#cache.cacheDir, upload, from);
    await this.#remember(record);
    this.#pending.set(upload.hashPart, record);
    this.#wake.resolve();
  }

  /** Records which path a zstd or xz upload's file URL belongs to (it outlives the import). */
  async #remember(upload: PendingUpload): Promise<void> {
    if (upload.compression === "zstd" || upload.compression === "xz") {
      await this.#aliases.remember(nix32Digest(upload.fileHash), upload.hashPart);
    }
  }

  async lookup(hashPart: string): Promise<SourcePath | null> {
    const upload = await this.get(hashPart);
    return upload === undefined ? null : sourcePathOf(upload);
  }

  /** A pending path by its NarHash (a `.nar` URL of an upload in no zstd or xz). */
  async lookupByNarHash(
    narHash: string,
  ): Promise<{ hashPart: string; path: SourcePath } | null> {
    await this.#loaded;
    let wanted: string;
    try {
      wanted = normalizeNixHash(narHash);
    } catch {
      return null;
    }
    for (const upload of this.#pending.values()) {
      if (upload.narHash === wanted) {
        return { hashPart: upload.hashPart, path: sourcePathOf(upload) };
      }
    }
    return null;
  }

  async openNar(hashPart: string): Promise<ReadableStream<Uint8Array>> {
    return await this.#openNarOf(this.#pending.get(hashPart));
  }

  async openFile(hashPart: string): Promise<ReadableStream<Uint8Array>> {
    return await this.#open(this.#pending.get(hashPart));
  }

  /** Resolves once nothing is pending (each import done or dropped). */
  async idle(): Promise<void> {
    await this.#loaded;
    while (this.#pending.size > 0 && !this.#closed) await this.#idle.promise;
  }

  /** Stops after the import in progress; what is left is imported at the next start. */
  async close(): Promise<void> {
    this.#closed = true;
    this.#wake.resolve();
    await this.#loop;
  }

  /** The upload's file; NotFoundError when it is imported (or gone) meanwhile. */
  async #open(upload: PendingUpload | undefined): Promise<ReadableStream<Uint8Array>> {
    if (upload === undefined) throw new NotFoundError("The upload was imported meanwhile");
    try {
      return (await Deno.open(join(this.#dir, upload.file), { read: true })).readable;
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
      throw new NotFoundError(`The file of the upload of ${upload.storePath} is gone`);
    }
  }

  async #openNarOf(upload: PendingUpload | undefined): Promise<ReadableStream<Uint8Array>> {
    const file = await this.#open(upload);
    const { compression, narSize } = upload!;
    return compression === "none"
      ? file
      : file.pipeThrough(decompressStream(compression, { maxOutputBytes: narSize }));
  }

  async #run(): Promise<void> {
    const retryAt = new Map<string, number>();
    while (!this.#closed) {
      const now = Date.now();
      const next = [...this.#pending.values()]
        .filter((upload) => (retryAt.get(upload.hashPart) ?? 0) <= now)
        .sort((a, b) => a.acceptedAt - b.acceptedAt)[0];
      if (next === undefined) {
        this.#idle.resolve();
        this.#idle = Promise.withResolvers();
        this.#wake = Promise.withResolvers();
        const waits = [...retryAt.values()].map((at) => at - now).filter((ms) => ms > 0);
        await Promise.race([
          this.#wake.promise,
          ...(waits.length > 0 ? [delay(Math.min(...waits))] : []),
        ]);
        continue;
      }
      await this.#settled(next.acceptedAt + IMPORT_WAIT_MS);
      if (this.#closed) break;
      try {
        await this.#import(next);
        retryAt.delete(next.hashPart);
      } catch (error) {
        this.#options.log?.(
          `Upload of ${next.storePath} not imported yet (tried again in ${RETRY_MS / 1000} s): ${
            (error as Error).message
          }`,
        );
        retryAt.set(next.hashPart, Date.now() + RETRY_MS);
      }
    }
    this.#idle.resolve();
  }

  /** Resolves once no upload has been received for {@link IMPORT_SETTLE_MS}, or at `deadline`. */
  async #settled(deadline: number): Promise<void> {
    while (!this.#closed && Date.now() < deadline) {
      const quiet = this.#receiving === 0 && Date.now() - this.#lastReceived >= IMPORT_SETTLE_MS;
      if (quiet) return;
      await delay(SETTLE_POLL_MS);
    }
  }

  /** Imports one upload, or drops it when its file is damaged; then removes its files. */
  async #import(upload: PendingUpload): Promise<void> {
    const existing = await this.#cache.getPath(upload.hashPart);
    if (existing === null || existing.narInfo.narHash !== upload.narHash) {
      const meta: PathMetadata = {
        storePath: upload.storePath,
        references: upload.references,
        deriver: upload.deriver,
        ca: upload.ca,
        sigs: upload.sigs,
        narHash: upload.narHash,
        narSize: upload.narSize,
      };
      try {
        await this.#cache.importNar(await this.#openNarOf(upload), meta, {
          compression: this.#options.compression,
          compressor: this.#options.compressor,
          signingKey: this.#options.signingKey,
          segment: upload.segment,
          auditAs: "Upload",
        });
      } catch (error) {
        const damaged = error instanceof IntegrityError || error instanceof FormatError ||
          error instanceof NotFoundError;
        if (!damaged) throw error;
        this.#options.log?.(
          `Upload of ${upload.storePath} dropped: its file is gone or no longer matches (${error.message})`,
        );
      }
    }
    // Accepted again meanwhile: the newer record (and its file) stay for their own import.
    if (this.#pending.get(upload.hashPart) !== upload) return;
    this.#pending.delete(upload.hashPart);
    await removePendingUpload(this.#cache.cacheDir, upload);
  }
}

/** What the substituter serves for a pending upload. */
function sourcePathOf(upload: PendingUpload): SourcePath {
  return {
    storePath: upload.storePath,
    narHash: upload.narHash,
    narSize: upload.narSize,
    references: [...upload.references],
    deriver: upload.deriver,
    ca: upload.ca,
    sigs: [...upload.sigs],
    ...(upload.compression === "zstd" || upload.compression === "xz"
      ? {
        file: {
          fileHash: upload.fileHash,
          fileSize: upload.fileSize,
          compression: upload.compression,
        },
      }
      : {}),
  };
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
