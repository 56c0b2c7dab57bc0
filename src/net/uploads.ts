/**
 * Uploads through the substituter, as Nix's HTTP binary cache client sends them
 * (`nix copy --to http://…`, DESIGN.md §4): `PUT /nar/<nix32 FileHash>.nar[.xz|.zst|.bz2]`
 * then `PUT /<hash>.narinfo`, dependencies first.
 *
 * A NAR upload is written as it comes to `<cacheDir>/uploads/incoming/` (synced), while
 * it is hashed (it must hash to the FileHash in its name) and decompressed as a stream
 * (multi-frame zstd, multi-stream xz, bzip2, br, none) to compute its NarHash and NarSize;
 * nothing is held whole in memory. Its narinfo is accepted only if it names an uploaded NAR
 * (or a path already cached with the same NAR), its NarHash and NarSize match what arca
 * computed, its FileHash/FileSize (when given) match the upload, its store path is well
 * formed and each reference is cached or accepted before. Then the upload becomes pending
 * ({@link PendingUploads}: served at once from the uploaded file, chunked into the cache in
 * the background), so `nix copy --to` does not wait for the re-chunking. A refused narinfo
 * removes its uploaded file, so a refused upload leaves nothing behind; uploaded files
 * whose narinfo never comes are removed after an hour.
 * @module
 */

import type { Cache } from "../cache/cache.ts";
import { parseUploadCompression } from "../cache/decompress_stream.ts";
import { type CheckedNarFile, checkNarFile } from "../cache/nar_file_check.ts";
import type { UploadCompression } from "../cache/decompress_stream.ts";
import { normalizeNixHash } from "../cache/hash.ts";
import { type NarInfo, parseNarInfo } from "../cache/narinfo.ts";
import { withWriterLock } from "../cache/cache_lock.ts";
import type { PathRecord } from "../cache/metadata.ts";
import { segmentFor } from "../cache/segments.ts";
import { parseStorePath, parseStorePathBaseName } from "../cache/store_path.ts";
import type { SegmentConfig } from "../config.ts";
import { FormatError, IntegrityError } from "../errors.ts";
import { readLimited } from "./body.ts";
import { NarAliases } from "./nar_aliases.ts";
import { incomingDir } from "../cache/pending_records.ts";
import type { PendingUploads } from "./pending_uploads.ts";

/** How uploads are checked. */
export interface UploadOptions {
  segments: readonly SegmentConfig[];
  /** How long an uploaded NAR waits for its narinfo; default one hour. */
  stagedTtlMs?: number;
}

/** An uploaded NAR file waiting for its narinfo. */
interface Staged {
  /** Its file under `uploads/incoming/`. */
  path: string;
  compression: UploadCompression;
  /** `sha256:<nix32>` of the file as uploaded (compressed). */
  fileHash: string;
  fileSize: number;
  /** `sha256:<nix32>` of the NAR. */
  narHash: string;
  narSize: number;
  createdAt: number;
}

/** Bytes of an upload's body gathered before they are written and checked. */
const GATHER_BYTES = 1024 * 1024;

/** Largest narinfo body accepted. */
const MAX_NARINFO_UPLOAD = 1024 * 1024;

/** Receives uploads for one cache; one instance per server. */
export class UploadReceiver {
  #cache: Cache;
  #options: UploadOptions;
  #pending: PendingUploads;
  #aliases: NarAliases;
  #staged = new Map<string, Staged>();

  constructor(cache: Cache, pending: PendingUploads, options: UploadOptions) {
    this.#cache = cache;
    this.#pending = pending;
    this.#aliases = new NarAliases(cache.cacheDir);
    this.#options = options;
  }

  /** True when a NAR of this name (`<nix32>.nar.xz` …) is uploaded and waits for its narinfo. */
  isStaged(fileName: string): boolean {
    return this.#staged.has(fileName);
  }

  /**
   * Receives `PUT /nar/<fileName>` (`sizeHint`: its Content-Length, if any): FormatError
   * when the name or the NAR is malformed, IntegrityError when the file does not hash to
   * its name.
   */
  async putNar(
    fileName: string,
    body: ReadableStream<Uint8Array>,
    sizeHint?: number,
  ): Promise<void> {
    await this.discardExpired();
    const match = /^([0-9a-df-np-sv-z]{52})\.(nar(?:\.[a-z0-9]+)?)$/.exec(fileName);
    if (!match) {
      await body.cancel();
      throw new FormatError(`Invalid NAR file name '${fileName.slice(0, 80)}'`);
    }
    const compression = parseUploadCompression(match[2]);
    const dir = incomingDir(this.#cache.cacheDir);
    await Deno.mkdir(dir, { recursive: true });
    const path = `${dir}/${crypto.randomUUID()}`;
    const done = this.#pending.receiving();
    try {
      const received = await receive(body, path, compression, sizeHint);
      if (received.fileHash !== `sha256:${match[1]}`) {
        throw new IntegrityError(
          `Uploaded file ${fileName} does not match its name: its SHA-256 is ${received.fileHash}`,
        );
      }
      if (this.#staged.has(fileName)) {
        // The same bytes (same hash) uploaded for another path: the first copy serves both.
        await Deno.remove(path).catch(() => {});
        return;
      }
      this.#staged.set(fileName, { path, compression, ...received, createdAt: Date.now() });
    } catch (error) {
      await Deno.remove(path).catch(() => {});
      throw error;
    } finally {
      done();
    }
  }

  /**
   * Receives `PUT /<hashPart>.narinfo`: checks it against the uploaded NAR and the cache and
   * makes the path pending (served now, imported soon). FormatError/IntegrityError say why a
   * narinfo is refused.
   */
  async putNarInfo(hashPart: string, body: ReadableStream<Uint8Array>): Promise<void> {
    const text = await readLimited(body, MAX_NARINFO_UPLOAD);
    const info = parseNarInfo(text);
    const { hash, baseName } = parseStorePath(info.storePath);
    if (hash !== hashPart) {
      throw new FormatError(`Narinfo of ${info.storePath} uploaded as ${hashPart}.narinfo`);
    }
    const fileName = info.url.startsWith("nar/") ? info.url.slice(4) : undefined;
    const entry = fileName === undefined ? undefined : this.#staged.get(fileName);
    if (fileName !== undefined) this.#staged.delete(fileName);
    try {
      // The writer lock keeps the garbage collector from evicting a reference between the
      // check and the acceptance (it keeps what pending uploads reference).
      await withWriterLock(this.#cache.cacheDir, async () => {
        for (const reference of info.references) {
          if (reference === baseName) continue;
          const referenced = parseStorePathBaseName(reference);
          if (
            (await this.#cache.getPath(referenced.hash)) === null &&
            (await this.#pending.get(referenced.hash)) === undefined
          ) {
            throw new IntegrityError(
              `Refusing ${info.storePath}: its reference ${referenced.path} is not in the cache (upload dependencies first)`,
            );
          }
        }
        await this.#accept(hashPart, info, entry);
      });
    } catch (error) {
      if (entry) await Deno.remove(entry.path).catch(() => {});
      throw error;
    }
  }

  /** Accepts a checked narinfo: the path becomes pending, or (cached) gets its signatures. */
  async #accept(hashPart: string, info: NarInfo, entry: Staged | undefined): Promise<void> {
    const segment = segmentFor(this.#options.segments, info);
    const narHash = normalizeNixHash(info.narHash);
    if (entry === undefined) {
      const pending = await this.#pending.get(hashPart);
      if (pending?.narHash === narHash && pending.narSize === info.narSize) return;
      // Nix skips a NAR file a HEAD finds: another path with the same NAR uploaded it.
      const named = /^nar\/([0-9a-df-np-sv-z]{52})\.nar/.exec(info.url)?.[1];
      if (named !== undefined) {
        const fileHash = `sha256:${named}`;
        const same = await this.#pending.withFile(fileHash, narHash, info.narSize);
        if (same !== undefined) {
          const { fileSize, compression } = same;
          await this.#pending.accept({
            ...this.#fields(hashPart, info, narHash, segment),
            fileHash,
            fileSize,
            compression,
          }, { link: same.file });
          return;
        }
        if (await this.#commitFromLocalCopy(named, info, narHash, segment)) return;
      }
      await this.#recordForCachedNar(info.storePath, { ...info, narHash }, { segment });
      return;
    }
    if (narHash !== entry.narHash || info.narSize !== entry.narSize) {
      throw new IntegrityError(
        `Refusing ${info.storePath}: NAR hash mismatch: the narinfo says ${narHash} (${info.narSize} bytes), the uploaded NAR is ${entry.narHash} (${entry.narSize} bytes)`,
      );
    }
    if (info.fileHash !== undefined && normalizeNixHash(info.fileHash) !== entry.fileHash) {
      throw new IntegrityError(
        `Refusing ${info.storePath}: FileHash ${info.fileHash} is not the uploaded file's`,
      );
    }
    if (info.fileSize !== undefined && info.fileSize !== entry.fileSize) {
      throw new IntegrityError(
        `Refusing ${info.storePath}: FileSize ${info.fileSize} is not the uploaded file's (${entry.fileSize})`,
      );
    }
    await this.#pending.accept({
      ...this.#fields(hashPart, info, narHash, segment),
      fileHash: entry.fileHash,
      fileSize: entry.fileSize,
      compression: entry.compression,
    }, { move: entry.path });
  }

  /** A pending upload's fields from its narinfo. */
  #fields(hashPart: string, info: NarInfo, narHash: string, segment: string | undefined) {
    return {
      hashPart,
      storePath: info.storePath,
      narHash,
      narSize: info.narSize,
      references: info.references,
      deriver: info.deriver,
      ca: info.ca,
      sigs: info.sigs,
      segment,
    };
  }

  /**
   * Commits a path whose NAR file (`nix32` FileHash) was uploaded for another path that is
   * in the cache now (its file's URL is an alias of it), when their NARs are the same; false
   * otherwise. The caller holds the writer lock.
   */
  async #commitFromLocalCopy(
    nix32: string,
    info: NarInfo,
    narHash: string,
    segment: string | undefined,
  ): Promise<boolean> {
    const other = await this.#aliases.get(nix32);
    const stored = other === null ? null : await this.#cache.narOfPath(other);
    if (
      stored === null || stored.record.narInfo.narHash !== narHash ||
      stored.record.narInfo.narSize !== info.narSize ||
      (await this.#cache.missingChunks(stored.manifest)).length > 0
    ) {
      return false;
    }
    await this.#cache.commitFetchedNar(stored.manifest, {
      storePath: info.storePath,
      references: info.references,
      deriver: info.deriver,
      ca: info.ca,
      sigs: info.sigs,
      narHash,
      narSize: info.narSize,
    }, { segment, auditAs: "Upload" });
    return true;
  }

  /** A narinfo for a path already cached with the same NAR: keeps the data, merges signatures. */
  async #recordForCachedNar(
    storePath: string,
    meta: { narHash: string; narSize: number; sigs: string[] },
    options: { segment?: string },
  ): Promise<PathRecord> {
    const existing = await this.#cache.getPath(parseStorePath(storePath).hash);
    if (
      existing === null || existing.narInfo.narHash !== meta.narHash ||
      existing.narInfo.narSize !== meta.narSize
    ) {
      throw new IntegrityError(`Refusing ${storePath}: its NAR was not uploaded`);
    }
    const sigs = [...new Set([...existing.narInfo.sigs, ...meta.sigs])].sort();
    const record: PathRecord = { ...existing, narInfo: { ...existing.narInfo, sigs } };
    if (record.segment === undefined && options.segment !== undefined) {
      record.segment = options.segment;
    }
    await this.#cache.metadata.putPath(record);
    return record;
  }

  /** Removes uploaded NARs older than the time to live (their narinfo never came). */
  async discardExpired(now: number = Date.now()): Promise<void> {
    const ttl = this.#options.stagedTtlMs ?? 60 * 60 * 1000;
    for (const [name, entry] of this.#staged) {
      if (now - entry.createdAt <= ttl) continue;
      this.#staged.delete(name);
      await Deno.remove(entry.path).catch(() => {});
    }
  }

  /** Removes every uploaded NAR still waiting for its narinfo (when the server stops). */
  async close(): Promise<void> {
    for (const entry of this.#staged.values()) await Deno.remove(entry.path).catch(() => {});
    this.#staged.clear();
  }
}

/**
 * Writes `body` to a new file at `path` (synced) while hashing it, and checks the NAR it
 * holds (`compression`; src/cache/nar_file_check.ts, on a Worker when `sizeHint` says the
 * file is large); FormatError when it does not decompress or is no valid NAR.
 */
async function receive(
  body: ReadableStream<Uint8Array>,
  path: string,
  compression: UploadCompression,
  sizeHint: number | undefined,
): Promise<CheckedNarFile> {
  const file = await Deno.open(path, { write: true, createNew: true, mode: 0o600 });
  const check = checkNarFile(compression, sizeHint);
  // The body comes in pieces of up to 64 KiB: gathered into larger ones, each write, hash
  // update and message to the checking Worker costs ~16 times less in all.
  let gathered = new Uint8Array(GATHER_BYTES);
  let filled = 0;
  const flush = async () => {
    if (filled === 0) return;
    const piece = gathered.subarray(0, filled);
    for (let at = 0; at < piece.length;) at += file.writeSync(piece.subarray(at));
    gathered = new Uint8Array(GATHER_BYTES);
    filled = 0;
    await check.push(piece);
  };
  try {
    for await (const piece of body) {
      for (let at = 0; at < piece.length;) {
        const take = Math.min(piece.length - at, GATHER_BYTES - filled);
        gathered.set(piece.subarray(at, at + take), filled);
        filled += take;
        at += take;
        if (filled === GATHER_BYTES) await flush();
      }
    }
    await flush();
    const checked = await check.finish();
    await file.syncData();
    return checked;
  } finally {
    check.close();
    file.close();
  }
}
