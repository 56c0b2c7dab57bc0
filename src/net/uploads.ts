/**
 * Uploads through the substituter, as Nix's HTTP binary cache client sends them
 * (`nix copy --to http://…`, DESIGN.md §4): `PUT /nar/<nix32 FileHash>.nar[.xz|.zst|.bz2]`
 * then `PUT /<hash>.narinfo`, dependencies first.
 *
 * A NAR upload is checked against its name (the SHA-256 of the uploaded file is the
 * FileHash in the URL), decompressed as a stream, validated, re-chunked and staged apart
 * from the cache (Cache.stageNar). Its narinfo is accepted only if it names a staged NAR
 * (or a path already cached with the same NAR), its NarHash and NarSize match what arca
 * computed, its FileHash/FileSize (when given) match the upload, its store path is well
 * formed and each reference is cached. Then the staged NAR becomes the cached path,
 * atomically, with the uploaded signatures (plus arca's own when a signing key is set).
 * A refused narinfo discards its staged NAR, so a refused upload leaves nothing behind;
 * staged NARs whose narinfo never comes are discarded after an hour.
 * @module
 */

import { type Cache, type StagedNar } from "../cache/cache.ts";
import type { ChunkCompression } from "../cache/compression.ts";
import { decompressStream, parseUploadCompression } from "../cache/decompress_stream.ts";
import { createSha256, formatNixHash, normalizeNixHash } from "../cache/hash.ts";
import { parseNarInfo } from "../cache/narinfo.ts";
import type { PathRecord } from "../cache/metadata.ts";
import { segmentFor } from "../cache/segments.ts";
import type { SecretKey } from "../cache/signing.ts";
import { parseStorePath, parseStorePathBaseName } from "../cache/store_path.ts";
import type { SegmentConfig } from "../config.ts";
import { FormatError, IntegrityError } from "../errors.ts";

/** How uploads are stored. */
export interface UploadOptions {
  /** Compression of the chunks arca stores (whatever the client sent). */
  compression: ChunkCompression;
  signingKey?: SecretKey;
  segments: readonly SegmentConfig[];
  /** How long a staged NAR waits for its narinfo; default one hour. */
  stagedTtlMs?: number;
}

interface Staged {
  staged: StagedNar;
  /** `sha256:<nix32>` of the file as uploaded (compressed). */
  uploadedFileHash: string;
  uploadedFileSize: number;
  createdAt: number;
}

/** Largest narinfo body accepted. */
const MAX_NARINFO_UPLOAD = 1024 * 1024;

/** Receives uploads for one cache; one instance per server. */
export class UploadReceiver {
  #cache: Cache;
  #options: UploadOptions;
  #staged = new Map<string, Staged>();

  constructor(cache: Cache, options: UploadOptions) {
    this.#cache = cache;
    this.#options = options;
  }

  /** True when a NAR of this name (`<nix32>.nar.xz` …) is staged. */
  isStaged(fileName: string): boolean {
    return this.#staged.has(fileName);
  }

  /**
   * Receives `PUT /nar/<fileName>`: FormatError when the name or the NAR is malformed,
   * IntegrityError when the file does not hash to its name.
   */
  async putNar(fileName: string, body: ReadableStream<Uint8Array>): Promise<void> {
    await this.discardExpired();
    const match = /^([0-9a-df-np-sv-z]{52})\.(nar(?:\.[a-z0-9]+)?)$/.exec(fileName);
    if (!match) throw new FormatError(`Invalid NAR file name '${fileName.slice(0, 80)}'`);
    const kind = parseUploadCompression(match[2]);
    const fileHash = createSha256();
    let fileSize = 0;
    const hashing = new TransformStream<Uint8Array, Uint8Array>({
      transform(piece, controller) {
        fileHash.update(piece);
        fileSize += piece.length;
        controller.enqueue(piece);
      },
    });
    const staged = await this.#cache.stageNar(
      body.pipeThrough(hashing).pipeThrough(decompressStream(kind)),
      { compression: this.#options.compression },
    );
    const uploadedFileHash = formatNixHash(fileHash.digest());
    if (uploadedFileHash !== `sha256:${match[1]}`) {
      await this.#cache.discardStaged(staged);
      throw new IntegrityError(
        `Uploaded file ${fileName} does not match its name: its SHA-256 is ${uploadedFileHash}`,
      );
    }
    const previous = this.#staged.get(fileName);
    this.#staged.set(fileName, {
      staged,
      uploadedFileHash,
      uploadedFileSize: fileSize,
      createdAt: Date.now(),
    });
    if (previous) await this.#cache.discardStaged(previous.staged);
  }

  /**
   * Receives `PUT /<hashPart>.narinfo`: checks it against the staged NAR and the cache and
   * commits the path. FormatError/IntegrityError say why a narinfo is refused.
   */
  async putNarInfo(hashPart: string, body: ReadableStream<Uint8Array>): Promise<PathRecord> {
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
      for (const reference of info.references) {
        if (reference === baseName) continue;
        const referenced = parseStorePathBaseName(reference);
        if ((await this.#cache.getPath(referenced.hash)) === null) {
          throw new IntegrityError(
            `Refusing ${info.storePath}: its reference ${referenced.path} is not in the cache (upload dependencies first)`,
          );
        }
      }
      const segment = segmentFor(this.#options.segments, info);
      const meta = {
        storePath: info.storePath,
        references: info.references,
        deriver: info.deriver,
        ca: info.ca,
        sigs: info.sigs,
        narHash: info.narHash,
        narSize: info.narSize,
      };
      const options = { signingKey: this.#options.signingKey, segment, auditAs: "Upload" as const };
      if (entry === undefined) return await this.#recordForCachedNar(info.storePath, meta, options);
      if (
        info.fileHash !== undefined && normalizeNixHash(info.fileHash) !== entry.uploadedFileHash
      ) {
        throw new IntegrityError(
          `Refusing ${info.storePath}: FileHash ${info.fileHash} is not the uploaded file's`,
        );
      }
      if (info.fileSize !== undefined && info.fileSize !== entry.uploadedFileSize) {
        throw new IntegrityError(
          `Refusing ${info.storePath}: FileSize ${info.fileSize} is not the uploaded file's (${entry.uploadedFileSize})`,
        );
      }
      return await this.#cache.commitStaged(entry.staged, meta, options);
    } catch (error) {
      if (entry) await this.#cache.discardStaged(entry.staged);
      throw error;
    }
  }

  /** A narinfo for a path already cached with the same NAR: keeps the data, merges signatures. */
  async #recordForCachedNar(
    storePath: string,
    meta: { narHash: string; narSize: number; sigs: string[] },
    options: { segment?: string },
  ): Promise<PathRecord> {
    const existing = await this.#cache.getPath(parseStorePath(storePath).hash);
    if (
      existing === null || existing.narInfo.narHash !== normalizeNixHash(meta.narHash) ||
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

  /** Discards staged NARs older than the time to live (their narinfo never came). */
  async discardExpired(now: number = Date.now()): Promise<void> {
    const ttl = this.#options.stagedTtlMs ?? 60 * 60 * 1000;
    for (const [name, entry] of this.#staged) {
      if (now - entry.createdAt <= ttl) continue;
      this.#staged.delete(name);
      await this.#cache.discardStaged(entry.staged);
    }
  }

  /** Discards every staged NAR (when the server stops). */
  async close(): Promise<void> {
    for (const entry of this.#staged.values()) await this.#cache.discardStaged(entry.staged);
    this.#staged.clear();
  }
}

/** Reads a small body as text, refusing more than `limit` bytes. */
export async function readLimited(
  body: ReadableStream<Uint8Array>,
  limit: number,
): Promise<string> {
  const parts: Uint8Array[] = [];
  let size = 0;
  for await (const piece of body) {
    size += piece.length;
    if (size > limit) throw new FormatError(`Request body is larger than ${limit} bytes`);
    parts.push(piece);
  }
  const bytes = new Uint8Array(size);
  let offset = 0;
  for (const part of parts) {
    bytes.set(part, offset);
    offset += part.length;
  }
  return new TextDecoder().decode(bytes);
}
