/**
 * Pull-through from upstream binary caches (cache.nixos.org, another arca, any Nix HTTP
 * cache): a {@link PathSource} the substituter asks for paths it does not hold.
 *
 * Lookups (`GET <url>/<hash>.narinfo`, never a NAR: a mass of `nix copy` existence checks
 * must not become a mass of NAR downloads, ncps #907) go to the upstreams in priority order.
 * A narinfo is accepted only when it parses, names the store path asked for, points at a
 * NAR under the upstream's URL (a relative `URL:` without `..`, as Nix writes them), in a
 * compression arca decodes (xz, zstd, bzip2, br, none), and carries a valid signature from
 * one of that upstream's trusted keys. Answers are remembered in memory: accepted paths for
 * an hour, misses (404, refused narinfos, an upstream that failed) for the negative TTL
 * (60 s by default). An upstream that times out (5 s by default, for the headers and for
 * any stall of a body) or refuses connections is skipped for 30 s.
 *
 * {@link UpstreamSource.openNar} fetches the NAR file and decompresses it as a stream into a
 * {@link Spool} (in memory up to 8 MiB, else a file under `<cache-dir>/upstream-spool/`),
 * keeping pace with its fastest reader (at most 4 MiB ahead); {@link UpstreamSource.openFile}
 * spools the upstream's zstd or xz file as it is. The spool checks what it holds (NarHash and
 * NarSize, or FileHash and FileSize) and keeps its last piece back until that passed, so a
 * wrong NAR never ends whole for a client. The client reads the spool as it grows; so does
 * any other request for the same NAR meanwhile, each at its own pace: one path is fetched
 * once, and no client waits for another.
 *
 * The clients come first: once the NAR is whole, its readers are done and no client has
 * read any spool of this source for {@link IMPORT_SETTLE_MS} (or 30 s later, or at once
 * when the spools waiting hold more than {@link SPOOLS_MEMORY_BYTES} in memory),
 * {@link Cache.importNar} reads it from the spool (with the upstream's references, deriver,
 * CA and signatures, its NarHash and NarSize as claims, the segment the configured filters
 * choose, audited as `Fetch` naming the upstream), and the spool is removed. The import's
 * chunking, compression and synced chunk files would otherwise compete with the clients for
 * the same cores and disk: on two cores, importing while streaming made `nix copy` through
 * arca 1.6× slower, and importing right after the last byte, while Nix still restores the
 * path into its store (0.5–1.2 s for 256 MiB), 1.3× slower (docs/BENCHMARKS.md). A client
 * that goes away does not stop the fetch, so the path becomes local all the same. An
 * upstream that cuts the NAR short, stalls or sends what does not decompress or check errors
 * the clients' streams and stores nothing.
 * {@link UpstreamSource.refetch} imports straight from the stream.
 * @module
 */

import { join } from "node:path";
import type { Cache, ImportResult, PathMetadata } from "../cache/cache.ts";
import { type ChunkCompression, ChunkCompressor } from "../cache/compression.ts";
import {
  decompressStream,
  parseUploadCompression,
  type UploadCompression,
} from "../cache/decompress_stream.ts";
import { formatNixHash, nix32Digest, parseNixHash } from "../cache/hash.ts";
import { BoundedCache, type PathRecord } from "../cache/metadata.ts";
import { MAX_NARINFO_BYTES, type NarInfo, parseNarInfo } from "../cache/narinfo.ts";
import { segmentFor } from "../cache/segments.ts";
import { type PublicKey, validSignatureKeys } from "../cache/signing.ts";
import { parseStorePath } from "../cache/store_path.ts";
import { parseUpstreamUrl, type SegmentConfig } from "../config.ts";
import { FormatError, NotFoundError } from "../errors.ts";
import { readLimited } from "./body.ts";
import { NarCheck } from "../cache/verified_nar.ts";
import type { PathSource, SourcePath } from "./server.ts";

/** One upstream cache. */
export interface Upstream {
  /** Its base URL (`http://` or `https://`), e.g. `https://cache.nixos.org`. */
  url: string;
  /** A narinfo of this upstream is accepted only with a valid signature from one of these. */
  trustedKeys: readonly PublicKey[];
}

/** Options of {@link UpstreamSource}. */
export interface UpstreamSourceOptions {
  /** The upstreams, asked in this order (sort them by priority first). */
  upstreams: readonly Upstream[];
  /** Compression of the chunks fetched paths are stored in. */
  compression: ChunkCompression;
  /** The configured segments; a fetched path goes to the first whose filter matches. */
  segments: readonly SegmentConfig[];
  /**
   * How long an upstream may take to answer (narinfo: the whole answer; NAR: the headers),
   * and the longest a NAR body may stall (ms; default {@link DEFAULT_UPSTREAM_TIMEOUT_MS}).
   */
  timeoutMs?: number;
  /** How long a miss is remembered (ms; default {@link DEFAULT_NEGATIVE_TTL_MS}). */
  negativeTtlMs?: number;
  /** How long an upstream that timed out or refused a connection is skipped (ms; 30 s). */
  downForMs?: number;
  /** How long an accepted narinfo is remembered (ms; one hour). */
  positiveTtlMs?: number;
  /** Where failures are reported (an upstream down, a refused narinfo, a failed fetch). */
  log?: (message: string) => void;
  /**
   * Imports stop waiting for quiet once the spools waiting keep this many bytes in memory
   * (default {@link SPOOLS_MEMORY_BYTES}).
   */
  spoolsMemoryBytes?: number;
}

/** Default of {@link UpstreamSourceOptions.timeoutMs}: 5 s. */
export const DEFAULT_UPSTREAM_TIMEOUT_MS = 5_000;
/** Default of {@link UpstreamSourceOptions.negativeTtlMs}: 60 s. */
export const DEFAULT_NEGATIVE_TTL_MS = 60_000;
const DEFAULT_DOWN_FOR_MS = 30_000;
const DEFAULT_POSITIVE_TTL_MS = 3_600_000;

/** Most bytes a reader of a file spool reads from the file at a time. */
const PIPE_BYTES = 1024 * 1024;

/** Limits of the memory of found paths (each weighs 1; a narinfo's fields, ~1 KiB). */
const FOUND_LIMITS = { maxEntries: 16_384, maxWeight: 16_384 };
/** Limits of the memory of misses (each weighs 1). */
const MISSING_LIMITS = { maxEntries: 65_536, maxWeight: 65_536 };

/** A relative NAR URL as Nix writes them: no scheme, no leading `/`, no `..`, no `//`. */
const SAFE_NAR_URL = /^(?!\/)(?!.*\.\.)(?!.*\/\/)[A-Za-z0-9._+=\/-]{1,400}$/;

/** A path an upstream has, and where its NAR is. */
interface Found {
  path: SourcePath;
  upstream: Upstream;
  /** The absolute URL of the NAR file. */
  narUrl: string;
  compression: UploadCompression;
  expiresAt: number;
}

/** A NAR being fetched from an upstream and imported. */
interface FetchJob {
  /** The spool its NAR goes to, once the upstream answered (null: fetched without one). */
  spool: Promise<Spool | null>;
  /** The spool holds the upstream's (zstd or xz) file, not the NAR. */
  raw: boolean;
  /** Settles with the import. */
  done: Promise<ImportResult>;
  /** The NAR (and, raw, the file) it fetches: a request for another one does not join it. */
  narHash: string;
  fileHash?: string;
}

/** Why a request to an upstream failed; `down` when the upstream should be skipped a while. */
class UpstreamFailure extends Error {
  constructor(message: string, readonly down: boolean) {
    super(message);
  }
}

/**
 * The upstream caches as one {@link PathSource} (`kind: "upstream"`). Call
 * {@link UpstreamSource.close} when done: it waits for imports in flight.
 */
export class UpstreamSource implements PathSource {
  readonly kind = "upstream";
  /** What it streams comes from a spool that checked it (or from the cache). */
  readonly checksNars = true;
  #cache: Cache;
  #upstreams: readonly Upstream[];
  #compression: ChunkCompression;
  #segments: readonly SegmentConfig[];
  #timeoutMs: number;
  #negativeTtlMs: number;
  #downForMs: number;
  #positiveTtlMs: number;
  #log: (message: string) => void;
  #compressor: ChunkCompressor | null = null;
  #found = new BoundedCache<string, Found>(FOUND_LIMITS);
  #missing = new BoundedCache<string, number>(MISSING_LIMITS);
  #byNarHash = new BoundedCache<string, string>(FOUND_LIMITS);
  #lookups = new Map<string, Promise<Found | null>>();
  #downUntil = new Map<string, number>();
  /** Fetches in flight (until imported), by hash part. */
  #fetches = new Map<string, FetchJob>();
  /** Spools not discarded yet: their readers are the clients an import waits for. */
  #spools = new Set<Spool>();
  #closed = false;
  #spoolSwept = false;
  #spoolsMemoryBytes: number;

  /**
   * A source over `options.upstreams` that imports what it fetches into `cache`; UsageError
   * for an upstream URL that is not `http(s)://…` without query or credentials.
   */
  constructor(cache: Cache, options: UpstreamSourceOptions) {
    this.#cache = cache;
    this.#upstreams = options.upstreams.map((upstream) => ({
      url: parseUpstreamUrl(upstream.url),
      trustedKeys: upstream.trustedKeys,
    }));
    this.#compression = options.compression;
    this.#segments = options.segments;
    this.#timeoutMs = options.timeoutMs ?? DEFAULT_UPSTREAM_TIMEOUT_MS;
    this.#negativeTtlMs = options.negativeTtlMs ?? DEFAULT_NEGATIVE_TTL_MS;
    this.#downForMs = options.downForMs ?? DEFAULT_DOWN_FOR_MS;
    this.#positiveTtlMs = options.positiveTtlMs ?? DEFAULT_POSITIVE_TTL_MS;
    this.#log = options.log ?? (() => {});
    this.#spoolsMemoryBytes = options.spoolsMemoryBytes ?? SPOOLS_MEMORY_BYTES;
  }

  /** The upstreams' base URLs, in the order they are asked. */
  get urls(): string[] {
    return this.#upstreams.map((upstream) => upstream.url);
  }

  /**
   * The path with this hash part from the first upstream that has it with a trusted
   * signature, or null (remembered for the negative TTL). Only narinfos are requested.
   */
  async lookup(hashPart: string): Promise<SourcePath | null> {
    return (await this.#lookup(hashPart, false))?.path ?? null;
  }

  /** A path an earlier lookup found, by its NarHash (`sha256:<nix32>`). */
  lookupByNarHash(narHash: string): Promise<{ hashPart: string; path: SourcePath } | null> {
    const hashPart = this.#byNarHash.get(nix32Digest(narHash));
    const found = hashPart === undefined ? undefined : this.#found.get(hashPart);
    return Promise.resolve(
      found === undefined || hashPart === undefined ? null : { hashPart, path: found.path },
    );
  }

  /**
   * The uncompressed NAR of a path {@link UpstreamSource.lookup} found, streamed from the
   * upstream as it arrives, and imported into the cache once whole (see the module comment);
   * from the cache when it is local already. NotFoundError when no upstream can deliver it
   * now (the reason is logged).
   */
  async openNar(hashPart: string, path: SourcePath): Promise<ReadableStream<Uint8Array>> {
    const local = await this.#localNar(hashPart, path.narHash);
    if (local !== null) return local;
    const running = this.#fetches.get(hashPart);
    if (running !== undefined) return await this.#join(hashPart, path, running);
    const found = await this.#lookup(hashPart, false);
    if (found === null || !sameHash(found.path.narHash, path.narHash)) {
      throw new NotFoundError(`No upstream has ${path.storePath} with NarHash ${path.narHash}`);
    }
    const again = this.#fetches.get(hashPart);
    if (again !== undefined) return await this.#join(hashPart, path, again);
    return await this.#spooled(hashPart, found, false);
  }

  /**
   * The upstream's zstd or xz file of a path whose lookup found one (`path.file`), streamed
   * as it arrives (checked against its FileHash and FileSize by the spool), while it is
   * spooled and then decompressed into the cache like {@link UpstreamSource.openNar}'s. The
   * path is served without arca decompressing, hashing and re-sending 2–5× the bytes.
   * NotFoundError when the path is local already or cannot be had from upstream as that
   * file (the server then serves the local copy, or a 404).
   */
  async openFile(hashPart: string, path: SourcePath): Promise<ReadableStream<Uint8Array>> {
    const join = async (running: FetchJob) => {
      const spool = await running.spool.catch(() => null);
      const same = running.fileHash !== undefined && path.file !== undefined &&
        sameHash(running.fileHash, path.file.fileHash) && sameHash(running.narHash, path.narHash);
      if (running.raw && same && spool?.readable) return spool.reader();
      await running.done.catch(() => {});
      throw new NotFoundError(`${path.storePath} was being fetched another way`);
    };
    const running = this.#fetches.get(hashPart);
    if (running !== undefined) return await join(running);
    if ((await this.#cache.getPath(hashPart)) !== null) {
      throw new NotFoundError(`${path.storePath} is local already`);
    }
    const found = await this.#lookup(hashPart, false);
    const again = this.#fetches.get(hashPart);
    if (again !== undefined) return await join(again);
    if (
      found === null || !sameHash(found.path.narHash, path.narHash) ||
      found.path.file === undefined || path.file === undefined ||
      !sameHash(found.path.file.fileHash, path.file.fileHash) ||
      found.path.file.compression !== path.file.compression
    ) {
      throw new NotFoundError(`No upstream has the file of ${path.storePath}`);
    }
    return await this.#spooled(hashPart, found, true);
  }

  /**
   * Starts fetching `found` (`raw`: its file as it is) into a spool and reads it;
   * NotFoundError when the upstream does not deliver.
   */
  async #spooled(hashPart: string, found: Found, raw: boolean) {
    const job = this.#fetch(hashPart, found, fetchedMeta(found.path), {
      spool: true,
      raw,
      segment: segmentFor(this.#segments, narInfoOf(found.path)),
    });
    const spool = await job.spool;
    if (spool?.readable !== true) {
      throw new NotFoundError(`The fetch of ${found.path.storePath} from upstream failed`);
    }
    return spool.reader();
  }

  /**
   * Fetches a cached path's NAR again from the upstreams and imports it under the record's
   * own metadata (references, signatures, segment): `verify --repair`'s refetch. Resolves to
   * the upstream's URL, or null when no upstream has a NAR with the record's NarHash;
   * rejects when the fetch or the import failed (nothing is stored then).
   */
  async refetch(record: PathRecord): Promise<string | null> {
    const { narInfo } = record;
    const hashPart = parseStorePath(narInfo.storePath).hash;
    const found = await this.#lookup(hashPart, true);
    if (found === null || !sameHash(found.path.narHash, narInfo.narHash)) return null;
    const running = this.#fetches.get(hashPart);
    if (running !== undefined) await running.done.catch(() => {});
    const meta: PathMetadata = {
      storePath: narInfo.storePath,
      references: [...narInfo.references],
      deriver: narInfo.deriver,
      ca: narInfo.ca,
      sigs: [...narInfo.sigs],
      narHash: narInfo.narHash,
      narSize: narInfo.narSize,
    };
    const job = this.#fetch(hashPart, found, meta, { spool: false, segment: record.segment });
    await job.spool;
    await job.done;
    return found.upstream.url;
  }

  /**
   * Resolves once no spool of this source has had a reader for {@link IMPORT_SETTLE_MS}
   * (checked every {@link SETTLE_POLL_MS}), at `deadline`, or at once when closing.
   */
  async #settled(deadline: number): Promise<void> {
    let quietSince = Date.now();
    while (!this.#closed && Date.now() < deadline) {
      let readers = 0;
      let held = 0;
      for (const spool of this.#spools) {
        readers += spool.readers;
        held += spool.memoryBytes;
      }
      // Spools waiting for their imports keep their NARs (up to 8 MiB each) in memory.
      if (held > this.#spoolsMemoryBytes) return;
      if (readers > 0) quietSince = Date.now();
      else if (Date.now() - quietSince >= IMPORT_SETTLE_MS) return;
      await new Promise((resolve) => setTimeout(resolve, SETTLE_POLL_MS));
    }
  }

  /** Resolves when no import is in flight (each settled, whatever its outcome). */
  async idle(): Promise<void> {
    while (this.#fetches.size > 0) {
      await Promise.allSettled([...this.#fetches.values()].map((job) => job.done));
    }
  }

  /** Waits for the imports in flight, then releases the compression Workers. */
  async close(): Promise<void> {
    this.#closed = true;
    await this.idle();
    this.#compressor?.close();
    this.#compressor = null;
  }

  /** The NAR of a path already in the cache with this NarHash, decompressed; else null. */
  async #localNar(
    hashPart: string,
    narHash: string,
  ): Promise<ReadableStream<Uint8Array> | null> {
    const stored = await this.#cache.narOfPath(hashPart);
    if (stored === null || !sameHash(stored.record.narInfo.narHash, narHash)) return null;
    if ((await this.#cache.missingChunks(stored.manifest)).length > 0) return null;
    return this.#cache.openNar(stored.manifest);
  }

  /**
   * A request for a NAR already being fetched: it reads the same spool, following the
   * download; or, when the fetch has no spool (a refetch) or it is gone already, waits for
   * the import and is served from the cache (or fetches it again if that failed).
   */
  async #join(
    hashPart: string,
    path: SourcePath,
    job: FetchJob,
  ): Promise<ReadableStream<Uint8Array>> {
    const spool = await job.spool.catch(() => null);
    if (spool?.readable && !job.raw && sameHash(job.narHash, path.narHash)) return spool.reader();
    await job.done.catch(() => {});
    const local = await this.#localNar(hashPart, path.narHash);
    if (local !== null) return local;
    if (this.#fetches.get(hashPart) === job) this.#fetches.delete(hashPart);
    return await this.openNar(hashPart, path);
  }

  async #lookup(hashPart: string, fresh: boolean): Promise<Found | null> {
    const now = Date.now();
    if (!fresh) {
      const found = this.#found.get(hashPart);
      if (found !== undefined && found.expiresAt > now) return found;
      const missing = this.#missing.get(hashPart);
      if (missing !== undefined && missing > now) return null;
    }
    let pending = this.#lookups.get(hashPart);
    if (pending === undefined) {
      pending = this.#ask(hashPart).finally(() => this.#lookups.delete(hashPart));
      this.#lookups.set(hashPart, pending);
    }
    return await pending;
  }

  /** Asks each upstream in turn (skipping those marked down); remembers the answer. */
  async #ask(hashPart: string): Promise<Found | null> {
    for (const upstream of this.#upstreams) {
      if ((this.#downUntil.get(upstream.url) ?? 0) > Date.now()) continue;
      let found: Found | null;
      try {
        found = await this.#askOne(upstream, hashPart);
      } catch (error) {
        this.#failed(upstream, error);
        continue;
      }
      if (found === null) continue;
      this.#found.set(hashPart, found, 1);
      this.#byNarHash.set(nix32Digest(found.path.narHash), hashPart, 1);
      this.#missing.delete(hashPart);
      return found;
    }
    this.#missing.set(hashPart, Date.now() + this.#negativeTtlMs, 1);
    return null;
  }

  /** One upstream's narinfo of `hashPart`, checked; null when it has none (or a bad one). */
  async #askOne(upstream: Upstream, hashPart: string): Promise<Found | null> {
    const url = `${upstream.url}/${hashPart}.narinfo`;
    const text = await this.#request(upstream, url, `narinfo of ${hashPart}`, async (response) => {
      if (response.status === 404 || response.status === 403 || response.status === 410) {
        await response.body?.cancel();
        return null;
      }
      if (!response.ok) {
        await response.body?.cancel();
        throw new UpstreamFailure(
          `Upstream ${upstream.url}: narinfo of ${hashPart}: HTTP ${response.status}`,
          false,
        );
      }
      try {
        return await readLimited(
          response.body ?? ReadableStream.from<Uint8Array>([]),
          MAX_NARINFO_BYTES,
        );
      } catch (error) {
        if (!(error instanceof FormatError)) throw error;
        throw new UpstreamFailure(`narinfo is larger than ${MAX_NARINFO_BYTES} bytes`, false);
      }
    });
    if (text === null) return null;
    const refuse = (why: string) => {
      this.#log(`Upstream ${upstream.url}: narinfo of ${hashPart} refused: ${why}`);
      return null;
    };
    let info: NarInfo;
    try {
      info = parseNarInfo(text);
    } catch (error) {
      return refuse((error as Error).message);
    }
    if (parseStorePath(info.storePath).hash !== hashPart) {
      return refuse(`it is for another path, ${info.storePath}`);
    }
    if (!SAFE_NAR_URL.test(info.url)) {
      return refuse(`its URL ${JSON.stringify(info.url.slice(0, 100))} leaves the upstream`);
    }
    let compression: UploadCompression;
    try {
      compression = parseUploadCompression(info.compression);
    } catch {
      return refuse(`unsupported compression ${JSON.stringify(info.compression)}`);
    }
    if (validSignatureKeys(info, upstream.trustedKeys).length === 0) {
      return refuse(
        info.sigs.length === 0
          ? "it is not signed"
          : `no valid signature from a trusted key (${
            upstream.trustedKeys.map((key) => key.name).join(", ")
          })`,
      );
    }
    return {
      path: {
        storePath: info.storePath,
        narHash: info.narHash,
        narSize: info.narSize,
        references: info.references,
        deriver: info.deriver,
        ca: info.ca,
        sigs: info.sigs,
        // A zstd or xz file can be passed through to Nix as it is (see openFile).
        ...((compression === "zstd" || compression === "xz") && info.fileHash !== undefined &&
            info.fileSize !== undefined
          ? { file: { fileHash: info.fileHash, fileSize: info.fileSize, compression } }
          : {}),
      },
      upstream,
      narUrl: `${upstream.url}/${info.url}`,
      compression,
      expiresAt: Date.now() + this.#positiveTtlMs,
    };
  }

  /**
   * GETs `url` (following redirects) and hands the response to `use` within the timeout
   * (headers and `use` together); a timeout or a connection failure is an
   * {@link UpstreamFailure} that marks the upstream down. `controller` aborts the request,
   * its body included, also after this returned.
   */
  async #request<T>(
    upstream: Upstream,
    url: string,
    what: string,
    use: (response: Response) => Promise<T>,
    controller: AbortController = new AbortController(),
  ): Promise<T> {
    const timedOut = new UpstreamFailure(
      `Upstream ${upstream.url}: ${what}: no answer within ${seconds(this.#timeoutMs)}`,
      true,
    );
    const timer = setTimeout(() => controller.abort(timedOut), this.#timeoutMs);
    try {
      const response = await fetch(url, { signal: controller.signal });
      return await use(response);
    } catch (error) {
      if (controller.signal.aborted) throw timedOut;
      if (error instanceof UpstreamFailure) throw error;
      throw new UpstreamFailure(
        `Upstream ${upstream.url}: ${what}: ${(error as Error).message}`,
        error instanceof TypeError, // fetch's network errors (refused, reset, DNS)
      );
    } finally {
      clearTimeout(timer);
    }
  }

  #failed(upstream: Upstream, error: unknown): void {
    const message = error instanceof Error ? error.message : String(error);
    if (error instanceof UpstreamFailure && error.down) {
      this.#downUntil.set(upstream.url, Date.now() + this.#downForMs);
      this.#log(`${message}: skipped for ${seconds(this.#downForMs)}`);
    } else {
      this.#log(message);
    }
  }

  /** Where NARs streamed to clients are spooled for their import (stale files removed once). */
  #spoolDir(): string {
    const dir = join(this.#cache.cacheDir, "upstream-spool");
    if (!this.#spoolSwept) {
      this.#spoolSwept = true;
      removeStaleFiles(dir, STALE_SPOOL_MS).catch(() => {});
    }
    return dir;
  }

  #compressorOf(): ChunkCompressor {
    return this.#compressor ??= new ChunkCompressor({ compression: this.#compression });
  }

  /**
   * Starts fetching a path and importing it; registered at once, so that another request
   * for it joins this one. With `spool`, the NAR is read from the upstream at its own pace
   * into a {@link Spool} that clients read as it grows, and imported from the spool once it
   * is whole and its readers are done (or {@link IMPORT_WAIT_MS} later): the clients first.
   * Without, it is imported as it streams. `spool` rejects with NotFoundError when the
   * upstream does not deliver; `done` settles with the import.
   */
  #fetch(
    hashPart: string,
    found: Found,
    meta: PathMetadata,
    options: { spool: boolean; raw?: boolean; segment?: string },
  ): FetchJob {
    const raw = options.raw === true && found.path.file !== undefined;
    const { upstream, path } = found;
    const result = Promise.withResolvers<ImportResult>();
    result.promise.catch(() => {});
    const what = `NAR of ${path.storePath}`;
    const spool = (async (): Promise<Spool | null> => {
      if (this.#closed) throw new NotFoundError("Upstream source is closed");
      const controller = new AbortController();
      let response: Response;
      try {
        response = await this.#request(
          upstream,
          found.narUrl,
          what,
          (response) => Promise.resolve(response),
          controller,
        );
      } catch (error) {
        this.#failed(upstream, error);
        throw new NotFoundError((error as Error).message);
      }
      if (!response.ok || response.body === null) {
        await response.body?.cancel();
        const message = `Upstream ${upstream.url}: ${what}: HTTP ${response.status}`;
        this.#log(message);
        throw new NotFoundError(message);
      }
      const body = stallGuard(response.body, {
        timeoutMs: this.#timeoutMs,
        onStall: () => {
          const error = new UpstreamFailure(
            `Upstream ${upstream.url}: ${what} stalled for ${seconds(this.#timeoutMs)}`,
            true,
          );
          controller.abort(error);
          return error;
        },
      });
      const decompress = (stream: ReadableStream<Uint8Array>) =>
        stream.pipeThrough(decompressStream(found.compression, { maxOutputBytes: path.narSize }));
      // Raw: the spool keeps the upstream's file (what the clients get); else the NAR.
      // The spool checks it as it fills; a FileSize (not signed) exceeded ends the fetch.
      const nar = raw ? body : decompress(body);
      const check = new NarCheck(
        raw
          ? {
            narHash: path.file!.fileHash,
            narSize: path.file!.fileSize,
            name: `${what}'s file`,
            file: true,
          }
          : { narHash: path.narHash, narSize: path.narSize, name: what },
      );
      const importNar = (stream: ReadableStream<Uint8Array>) =>
        this.#cache.importNar(stream, meta, {
          compression: this.#compression,
          compressor: this.#compressorOf(),
          segment: options.segment,
          auditAs: "Fetch",
          auditDetail: `from ${upstream.url}`,
        });
      let importing: Promise<ImportResult>;
      let spool: Spool | null = null;
      if (options.spool) {
        let created: Spool;
        try {
          created = await Spool.create(
            this.#spoolDir(),
            raw ? path.file!.fileSize : path.narSize,
          );
        } catch (error) {
          await nar.cancel(error).catch(() => {});
          throw error;
        }
        spool = created;
        this.#spools.add(created);
        importing = (async () => {
          try {
            await created.fill(nar, check);
            // The clients first: the import (chunking, compression) waits for its readers.
            const deadline = Date.now() + IMPORT_WAIT_MS;
            await created.unread(IMPORT_WAIT_MS);
            await this.#settled(deadline);
            // The import's own reading is no client the other imports wait for.
            this.#spools.delete(created);
            return await importNar(raw ? decompress(created.reader()) : created.reader());
          } finally {
            this.#spools.delete(created);
            await created.discard();
          }
        })();
      } else {
        importing = importNar(nar);
      }
      importing.then((imported) => result.resolve(imported), (error) => {
        this.#log(`Upstream ${upstream.url}: ${what} not imported: ${(error as Error).message}`);
        result.reject(error);
      });
      return spool;
    })();
    spool.catch((error) => result.reject(error));
    const job: FetchJob = {
      spool,
      raw,
      done: result.promise,
      narHash: path.narHash,
      fileHash: raw ? path.file!.fileHash : undefined,
    };
    this.#fetches.set(hashPart, job);
    const forget = () => {
      if (this.#fetches.get(hashPart) === job) this.#fetches.delete(hashPart);
    };
    result.promise.then(forget, forget);
    return job;
  }
}

/**
 * The metadata a fetched path is imported with: what the upstream's narinfo says, its
 * NarHash and NarSize as claims.
 */
function fetchedMeta(path: SourcePath): PathMetadata {
  return {
    storePath: path.storePath,
    references: [...path.references],
    deriver: path.deriver,
    ca: path.ca,
    sigs: [...path.sigs],
    narHash: path.narHash,
    narSize: path.narSize,
  };
}

/** The fields a segment filter looks at, as a narinfo. */
function narInfoOf(path: SourcePath): NarInfo {
  return {
    storePath: path.storePath,
    url: "",
    compression: "",
    narHash: path.narHash,
    narSize: path.narSize,
    references: path.references,
    sigs: path.sigs,
  };
}

/** True when two SHA-256 hashes (any form) are the same. */
function sameHash(a: string, b: string): boolean {
  return formatNixHash(parseNixHash(a)) === formatNixHash(parseNixHash(b));
}

function seconds(ms: number): string {
  return ms % 1000 === 0 ? `${ms / 1000} s` : `${ms} ms`;
}

/**
 * `body` as a stream that errors with `onStall()`'s error when a read waits longer than
 * `timeoutMs` for the next bytes. Time is counted only while a consumer waits: a body held
 * back by a slow consumer is not stalled.
 */
export function stallGuard(
  body: ReadableStream<Uint8Array>,
  options: { timeoutMs: number; onStall: () => Error },
): ReadableStream<Uint8Array> {
  const reader = body.getReader();
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const stalled = new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(options.onStall()), options.timeoutMs);
      });
      try {
        const { value, done } = await Promise.race([reader.read(), stalled]);
        if (done) controller.close();
        else controller.enqueue(value);
      } finally {
        clearTimeout(timer);
      }
    },
    async cancel(reason) {
      await reader.cancel(reason);
    },
  }, { highWaterMark: 0 });
}

/** NARs up to this size are spooled in memory, larger ones in a file. */
const MEMORY_SPOOL_BYTES = 8 * 1024 * 1024;
/** The newest bytes of a file spool kept in memory too, for readers that keep up. */
const RECENT_BYTES = 8 * 1024 * 1024;
/**
 * How far the spool may run ahead of its fastest reader (while it has one): the download
 * keeps pace with the client instead of taking the CPU from it, and it never waits for a
 * reader that lags behind another.
 */
const AHEAD_BYTES = 4 * 1024 * 1024;
/** A spool stops waiting for its readers once the fastest one has not moved for this long. */
const PACE_PATIENCE_MS = 5_000;
/** Spool files older than this are left from a crash. */
const STALE_SPOOL_MS = 24 * 3_600_000;
/** The longest an import waits for the clients still reading its spool (or any spool). */
const IMPORT_WAIT_MS = 30_000;
/**
 * How long no client must have read a spool before an import starts: Nix is still
 * restoring the path it just received (docs/BENCHMARKS.md, "Pull-through").
 */
const IMPORT_SETTLE_MS = 1_000;
/** Imports stop waiting for quiet once the spools keep this much in memory. */
const SPOOLS_MEMORY_BYTES = 128 * 1024 * 1024;
const SETTLE_POLL_MS = 50;

/**
 * A NAR fetched from an upstream, kept while clients read it and until its import did:
 * in memory when small, else in a file of the spool directory (each piece written as it
 * comes), whose newest {@link RECENT_BYTES} stay in memory too. {@link Spool.fill} can check
 * what it spools (hash and size) and then holds the last piece back until it did. Any number of readers follow it as it grows
 * ({@link Spool.reader}), each at its own pace, from memory while they keep up and from the
 * file when they lag. The writer keeps at most {@link AHEAD_BYTES} ahead of the fastest
 * reader, so that a download keeps pace with its client rather than taking the CPU from it;
 * it never waits for a reader that lags behind another, nor for readers that stopped
 * reading ({@link PACE_PATIENCE_MS}). A file spool's readers open it at once, so
 * {@link Spool.discard} may remove it under them.
 */
export class Spool {
  #path: string | null;
  #file: Deno.FsFile | null;
  /** Pieces in memory with their offsets: all of them, or (file spool) the newest. */
  #recent: { start: number; piece: Uint8Array }[] = [];
  #recentBytes = 0;
  /** Bytes appended so far. */
  #appended = 0;
  /** Bytes of a file spool written to its file so far. */
  #written = 0;
  #state: "filling" | "complete" | "failed" | "discarded" = "filling";
  /** True once the whole NAR is in (it stays true when discarded). */
  #complete = false;
  #error: unknown = undefined;
  #progress = Promise.withResolvers<void>();
  #readers = 0;
  /** Where each active reader is. */
  #positions = new Set<{ position: number }>();
  #consumed = Promise.withResolvers<void>();
  #unpaced = false;
  #unread = Promise.withResolvers<void>();

  private constructor(path: string | null, file: Deno.FsFile | null) {
    this.#path = path;
    this.#file = file;
  }

  /** A spool for a NAR of `size` bytes; a file in `dir` unless it is small. */
  static async create(dir: string, size: number): Promise<Spool> {
    if (size <= MEMORY_SPOOL_BYTES) return new Spool(null, null);
    await Deno.mkdir(dir, { recursive: true });
    const path = join(dir, `${crypto.randomUUID()}.nar`);
    const file = await Deno.open(path, { write: true, createNew: true, mode: 0o600 });
    return new Spool(path, file);
  }

  /** True while new readers may join (not failed, not discarded). */
  get readable(): boolean {
    return this.#state === "filling" || this.#state === "complete";
  }

  /** Readers that have not finished or cancelled. */
  get readers(): number {
    return this.#readers;
  }

  /** Bytes of the NAR held in memory. */
  get memoryBytes(): number {
    return this.#recentBytes;
  }

  /**
   * Appends all of `source`, then marks the spool complete; on an error (the source's, or
   * a failed write), fails the spool (its readers error) and rethrows.
   */
  async fill(source: ReadableStream<Uint8Array>, check?: NarCheck): Promise<void> {
    const reader = source.getReader();
    try {
      // With a check, the last piece waits for it: no reader ever ends with wrong bytes.
      let held: Uint8Array | null = null;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        if (check === undefined) {
          await this.append(value);
          continue;
        }
        check.update(value);
        if (held !== null) await this.append(held);
        held = value;
      }
      check?.finish();
      if (held !== null) await this.append(held);
      this.#file?.close();
      this.#file = null;
      this.#state = "complete";
      this.#complete = true;
      this.#notify();
    } catch (error) {
      await reader.cancel(error).catch(() => {});
      this.#fail(error);
      throw error;
    }
  }

  /**
   * Appends a piece (not copied: it must not change), written to the file at once
   * (synchronously: into the page cache, about 3× cheaper than asynchronous writes of the
   * same pieces, docs/BENCHMARKS.md); waits while the spool is ahead of its readers.
   */
  async append(piece: Uint8Array): Promise<void> {
    if (this.#error !== undefined) throw this.#error;
    if (piece.length === 0) return;
    const file = this.#file;
    if (file !== null) {
      for (let at = 0; at < piece.length;) at += file.writeSync(piece.subarray(at));
      this.#written += piece.length;
    }
    this.#recent.push({ start: this.#appended, piece });
    this.#recentBytes += piece.length;
    this.#appended += piece.length;
    if (file !== null) this.#trim();
    this.#notify();
    while (!this.#unpaced && this.#appended - this.#fastestReader() > AHEAD_BYTES) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const moved = await Promise.race([
        this.#consumed.promise.then(() => true),
        new Promise<false>((resolve) => timer = setTimeout(() => resolve(false), PACE_PATIENCE_MS)),
      ]);
      clearTimeout(timer);
      // Readers that stopped reading (a stuck client) do not hold the download.
      if (!moved) this.#unpaced = true;
    }
  }

  /** The position of the reader furthest ahead (Infinity without readers). */
  #fastestReader(): number {
    let fastest = -1;
    for (const { position } of this.#positions) fastest = Math.max(fastest, position);
    return fastest === -1 ? Infinity : fastest;
  }

  /** Drops the oldest pieces in memory that are in the file, beyond {@link RECENT_BYTES}. */
  #trim(): void {
    let drop = 0;
    while (
      drop < this.#recent.length && this.#recentBytes > RECENT_BYTES &&
      this.#recent[drop].start + this.#recent[drop].piece.length <= this.#written
    ) {
      this.#recentBytes -= this.#recent[drop].piece.length;
      drop++;
    }
    if (drop > 0) this.#recent.splice(0, drop);
  }

  /** Resolves when no reader is left (at once when there is none), or after `ms`. */
  async unread(ms: number): Promise<void> {
    if (this.#readers === 0) return;
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([
      this.#unread.promise,
      new Promise<void>((resolve) => timer = setTimeout(resolve, ms)),
    ]);
    clearTimeout(timer);
  }

  /**
   * The spooled NAR from its start, following the spool as it grows: it ends when the spool
   * is complete and read, and errors if the spool fails. Its pieces are views of the
   * spool's: they must not change. Throws when the spool is not {@link Spool.readable}.
   */
  reader(): ReadableStream<Uint8Array> {
    if (!this.readable) throw new Error("The spool is gone");
    // deno-lint-ignore no-this-alias
    const spool = this;
    const file = this.#path === null ? null : Deno.openSync(this.#path, { read: true });
    let position = 0;
    let filePosition = 0;
    let finished = false;
    const where = { position: 0 };
    this.#readers++;
    this.#positions.add(where);
    const finish = () => {
      if (finished) return;
      finished = true;
      file?.close();
      spool.#positions.delete(where);
      spool.#wake();
      if (--spool.#readers === 0) {
        spool.#unread.resolve();
        spool.#unread = Promise.withResolvers<void>();
      }
    };
    return new ReadableStream<Uint8Array>({
      async pull(controller) {
        for (;;) {
          if (position < spool.#appended) {
            const piece = await spool.#read(position, file, filePosition);
            if (piece.fromFile) filePosition = position + piece.bytes.length;
            position += piece.bytes.length;
            where.position = position;
            spool.#wake();
            controller.enqueue(piece.bytes);
            return;
          }
          if (spool.#complete) {
            finish();
            controller.close();
            return;
          }
          if (spool.#state !== "filling") {
            finish();
            throw spool.#error ?? new Error("The spool is gone");
          }
          await spool.#progress.promise;
        }
      },
      cancel() {
        finish();
      },
    }, { highWaterMark: 0 });
  }

  /** Bytes from `position` (< appended): from memory if still there, else from `file`. */
  async #read(
    position: number,
    file: Deno.FsFile | null,
    filePosition: number,
  ): Promise<{ bytes: Uint8Array; fromFile: boolean }> {
    const recent = this.#recent;
    const first = recent[0];
    if (first !== undefined && position >= first.start) {
      // Binary search for the piece holding `position`.
      let low = 0;
      let high = recent.length - 1;
      while (low < high) {
        const mid = (low + high + 1) >> 1;
        if (recent[mid].start <= position) low = mid;
        else high = mid - 1;
      }
      const { start, piece } = recent[low];
      return { bytes: piece.subarray(position - start), fromFile: false };
    }
    // Older than what memory holds: in the file (trimmed pieces were written first).
    const end = first?.start ?? this.#written;
    const bytes = new Uint8Array(Math.min(end - position, PIPE_BYTES));
    if (filePosition !== position) await file!.seek(position, Deno.SeekMode.Start);
    let filled = 0;
    while (filled < bytes.length) {
      const n = await file!.read(bytes.subarray(filled));
      if (n === null) throw new Error("Spool file ended early");
      filled += n;
    }
    return { bytes, fromFile: true };
  }

  /** Releases the spooled bytes (removes the file; readers of a file spool keep reading). */
  async discard(): Promise<void> {
    if (this.#state === "filling") this.#fail(new Error("The spool was discarded"));
    else if (this.#state === "complete") this.#state = "discarded";
    this.#notify();
    try {
      this.#file?.close();
    } catch { /* closed */ }
    this.#file = null;
    if (this.#path !== null) await Deno.remove(this.#path).catch(() => {});
  }

  #fail(error: unknown): void {
    if (this.#state !== "filling") return;
    this.#error ??= error;
    this.#state = "failed";
    this.#notify();
  }

  #notify(): void {
    this.#progress.resolve();
    this.#progress = Promise.withResolvers<void>();
  }

  /** Tells the writer a reader moved (or left). */
  #wake(): void {
    this.#consumed.resolve();
    this.#consumed = Promise.withResolvers<void>();
  }
}

/** Removes the files of `dir` older than `ms` (spool files left by a crash). */
async function removeStaleFiles(dir: string, ms: number): Promise<void> {
  const cutoff = Date.now() - ms;
  for await (const entry of Deno.readDir(dir)) {
    if (!entry.isFile) continue;
    const path = join(dir, entry.name);
    const info = await Deno.stat(path);
    if ((info.mtime?.getTime() ?? Infinity) < cutoff) await Deno.remove(path).catch(() => {});
  }
}
