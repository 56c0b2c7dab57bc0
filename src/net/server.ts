/**
 * The HTTP substituter: a plain `(Request) => Promise<Response>` handler over a
 * {@link Cache}, so tests need no socket; `arca serve` puts it behind `Deno.serve`.
 *
 * Routes (Nix's HTTP binary cache protocol, DESIGN.md §4):
 * - `GET|HEAD /nix-cache-info`
 * - `GET|HEAD /<hash>.narinfo` (signed on the fly when a signing key is given)
 * - `GET|HEAD /nar/<nix32 FileHash>.nar.zst|.nar.xz|.nar` streamed chunk file by chunk
 *   file, with Content-Length and single `Range` requests; never a 200 unless every chunk
 *   file is present, a regular file (no symlink) and of the size its manifest records
 * - `GET|HEAD /<hash>.ls` (the NAR listing)
 *
 * Paths this cache does not hold may come from {@link PathSource}s (swarm peers, upstream
 * caches), asked in order after the local cache. Their narinfos are served uncompressed:
 * `Compression: none`, `URL: nar/<nix32 NarHash>.nar`, FileHash = NarHash, FileSize =
 * NarSize (the encoding this node serves before it holds the NAR), with the origin's
 * signatures. That URL keeps working once the path is local (Nix caches narinfos): a
 * `.nar` URL not found by FileHash is looked up by NarHash and served decompressed. A NAR
 * streamed from a source passes through {@link verifyNarStream} (or the source checks it
 * itself, {@link PathSource.checksNars}), so a wrong NAR is never a complete 200 body. A
 * source that can pass the origin's zstd or xz file through ({@link PathSource.openFile})
 * has it named instead (`Compression: zstd|xz`, `nar/<nix32 FileHash>.nar.zst|.nar.xz`,
 * checked against FileHash and FileSize as it streams); that URL too serves the local copy
 * later, in that compression, also after a restart (`<cacheDir>/nar-aliases/`).
 *
 * Request paths are read raw (before URL normalization) and must consist of the few
 * characters these routes use: anything with `..`, `//`, `%`, NUL, a backslash or over
 * 512 bytes is a 400, an unknown route a 404. No file name is ever built from a request
 * except from a validated hash. Errors become statuses here and nowhere else: 400, 404,
 * 405 and 416 for the request, 500 (details only in the log) for damaged cache data.
 * @module
 */

import { addSignature, type Cache, PIECE_BYTES, type StoredNar } from "../cache/cache.ts";
import type { Manifest } from "../cache/manifest.ts";
import { narFileExtension } from "../cache/compression.ts";
import {
  ArcaError,
  FormatError,
  IntegrityError,
  NotFoundError,
  SignatureError,
} from "../errors.ts";
import { formatNarListing, listNar } from "../cache/nar.ts";
import { BoundedCache, type StoredPath } from "../cache/metadata.ts";
import { formatNarInfo } from "../cache/narinfo.ts";
import { isNixBase32 } from "../cache/nixbase32.ts";
import type { SecretKey } from "../cache/signing.ts";
import { isValidHashPart, parseStorePath } from "../cache/store_path.ts";
import { BuildLogs } from "../cache/build_logs.ts";
import type { ChunkCompression } from "../cache/compression.ts";
import type { SegmentConfig } from "../config.ts";
import { hasToken } from "./auth.ts";
import { ServeRecorder } from "./serve_recorder.ts";
import { UploadReceiver } from "./uploads.ts";
import { PendingUploads } from "./pending_uploads.ts";
import { Metrics, routeOf } from "./metrics.ts";
import type { NarInfo } from "../cache/narinfo.ts";
import { nix32Digest, normalizeNixHash } from "../cache/hash.ts";
import { verifyNarStream } from "../cache/verified_nar.ts";
import { NarAliases } from "./nar_aliases.ts";
import {
  rawXzStream,
  rawXzStreamSize,
  rawZstdFrame,
  rawZstdFrameSize,
} from "../cache/raw_containers.ts";

/** What a {@link PathSource} knows of a path this cache lacks: its signed metadata. */
export interface SourcePath {
  storePath: string;
  /** Any SHA-256 form. */
  narHash: string;
  narSize: number;
  /** Base names. */
  references: string[];
  deriver?: string;
  ca?: string;
  sigs: string[];
  /**
   * The origin's zstd or xz NAR file, when the source can pass it through unchanged
   * ({@link PathSource.openFile}): the narinfo then names it (its Compression, FileHash and
   * FileSize) and it is checked against them as it streams.
   */
  file?: { fileHash: string; fileSize: number; compression: PassedCompression };
}

/** Compressions a source's file may be passed through in. */
export type PassedCompression = "zstd" | "xz";

/**
 * Where paths this cache does not hold come from: swarm peers, upstream caches.
 * Implementations answer within their own timeouts, and only for paths they can deliver
 * now (a narinfo served is a promise that its NAR follows).
 */
export interface PathSource {
  /** Where hits are counted in the metrics. */
  readonly kind: "local" | "peer" | "upstream";
  /**
   * True when {@link PathSource.openNar}'s stream checks the NAR itself (NarHash and
   * NarSize, its last piece held back until then), and {@link PathSource.openFile}'s the
   * file (FileHash and FileSize); otherwise the server does.
   */
  readonly checksNars?: boolean;
  /** The path with this hash part, or null when this source cannot deliver it now. */
  lookup(hashPart: string): Promise<SourcePath | null>;
  /**
   * A path by its NarHash (`sha256:<nix32>`), for `.nar` requests whose narinfo this
   * process did not serve (Nix caches narinfos across runs); optional.
   */
  lookupByNarHash?(narHash: string): Promise<{ hashPart: string; path: SourcePath } | null>;
  /**
   * The uncompressed NAR of a path {@link PathSource.lookup} returned (the server checks
   * it against NarHash and NarSize as it streams). NotFoundError when it cannot be had
   * after all.
   */
  openNar(hashPart: string, path: SourcePath): Promise<ReadableStream<Uint8Array>>;
  /**
   * The origin's NAR file of a path whose {@link SourcePath.file} is set, as it arrives
   * (the server checks its FileHash and FileSize); NotFoundError when it cannot be had
   * (the path may have become local meanwhile).
   */
  openFile?(hashPart: string, path: SourcePath): Promise<ReadableStream<Uint8Array>>;
}

/** Options of {@link createHandler}. */
export interface HandlerOptions {
  /** Priority advertised in nix-cache-info. */
  priority: number;
  /** Signs narinfos that lack a signature from this key, as they are served. */
  signingKey?: SecretKey;
  /** Called for every request that failed with a server error (and, if set, all requests). */
  log?: (message: string) => void;
  /** Log every request, not only failures. */
  logRequests?: boolean;
  /**
   * Accept uploads (`nix copy --to`) from clients that send this token (HTTP Basic
   * password or Bearer). Without it, every write is refused with 403.
   */
  upload?: { token: string; compression: ChunkCompression; segments: readonly SegmentConfig[] };
  /** Require this token (or the upload token) for reads too. */
  readToken?: string;
  /** How often NAR downloads are written to the access times and the audit log (ms; 60 s). */
  serveLogIntervalMs?: number;
  /** Asked in order for paths this cache does not hold. */
  sources?: readonly PathSource[];
  /**
   * The responses go straight to `Deno.serve`, which is done with each piece of a body soon
   * after it takes it: large NARs are read into a few reused buffers
   * (src/cache/nar_pieces.ts). Leave it off where a body is collected (`arrayBuffer()`).
   */
  reusePieces?: boolean;
}

/**
 * A request handler as `Deno.serve` takes it; `close()` writes pending serve records and
 * discards staged uploads (call it when the server stops).
 */
export type Handler = ((request: Request) => Promise<Response>) & {
  close(): Promise<void>;
  /** What the handler counted, for `--metrics-bind`. */
  metrics: Metrics;
};

/** Limits of the cache of narinfos as served: entries, bytes. */
const SERVED_CACHE_LIMITS = { maxEntries: 8192, maxWeight: 8 * 1024 * 1024 };

/** A narinfo request path (whose hash part is then checked). */
const NARINFO_PATH = /^\/([^/]{32})\.narinfo$/;

const MAX_PATH_LENGTH = 512;
const SAFE_PATH = /^\/[A-Za-z0-9._+=\/-]*$/;

/** Error with an HTTP status, thrown inside the handler and turned into a response. */
class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

function text(status: number, body: string, headers: HeadersInit = {}): Response {
  return new Response(body, {
    status,
    headers: { "content-type": "text/plain; charset=utf-8", ...headers },
  });
}

/** The raw path of a request URL, before any normalization (`..` and `%2e` included). */
export function rawRequestPath(url: string): string {
  const scheme = url.indexOf("://");
  const slash = url.indexOf("/", scheme === -1 ? 0 : scheme + 3);
  if (slash === -1) return "/";
  const path = url.slice(slash);
  const end = path.search(/[?#]/);
  return end === -1 ? path : path.slice(0, end);
}

function checkPath(path: string): void {
  if (path.length > MAX_PATH_LENGTH) throw new HttpError(400, "Request path is too long");
  if (!SAFE_PATH.test(path) || path.includes("..") || path.includes("//")) {
    throw new HttpError(400, "Malformed request path");
  }
}

/** Parses a `Range` header against a body of `size` bytes: null for the whole body. */
export function parseRange(
  header: string | null,
  size: number,
): { start: number; end: number } | null {
  if (header === null) return null;
  const match = /^bytes=(\d*)-(\d*)$/.exec(header.trim());
  if (!match || (match[1] === "" && match[2] === "")) {
    // Multiple or malformed ranges: ignoring the header is allowed (RFC 9110 §14.2).
    return null;
  }
  let start: number;
  let end: number;
  if (match[1] === "") {
    const suffix = Number(match[2]);
    start = Math.max(size - suffix, 0);
    end = size;
    if (suffix === 0) throw rangeNotSatisfiable(size);
  } else {
    start = Number(match[1]);
    end = match[2] === "" ? size : Math.min(Number(match[2]) + 1, size);
    if (match[2] !== "" && Number(match[2]) < start) return null;
  }
  if (start >= size) throw rangeNotSatisfiable(size);
  return { start, end };
}

function rangeNotSatisfiable(size: number): HttpError {
  // RFC 9110 §14.4: a 416 names the current length as `bytes */<size>`.
  return new HttpError(416, "Range not satisfiable", { "content-range": `bytes */${size}` });
}

/** Builds the substituter's request handler. */
export function createHandler(cache: Cache, options: HandlerOptions): Handler {
  const cacheInfo = `StoreDir: /nix/store\nWantMassQuery: 1\nPriority: ${options.priority}\n`;
  const logs = new BuildLogs(cache.cacheDir);
  const recorder = new ServeRecorder(cache, { intervalMs: options.serveLogIntervalMs });
  const metrics = new Metrics();
  // Accepted uploads not chunked yet: served (before any other source) and imported here.
  const pending = new PendingUploads(cache, {
    // Without uploads on, only what an earlier run accepted is left: stored as zstd chunks.
    compression: options.upload?.compression ?? "zstd",
    signingKey: options.signingKey,
    log: options.log,
  });
  const uploads = options.upload
    ? new UploadReceiver(cache, pending, { segments: options.upload.segments })
    : undefined;
  const sources: readonly PathSource[] = [pending, ...(options.sources ?? [])];
  // Where the data of NAR responses not served from local chunk files came from.
  const hitSources = new WeakMap<Response, "local" | "peer" | "upstream">();
  const readTokens = [options.readToken, options.upload?.token].filter((t) => t !== undefined);

  // Narinfos as served (signed on the fly when there is a signing key), by hash part, with
  // the stored text they were made from and their length in bytes.
  const served = new BoundedCache<string, { text: string; body: string; length: number }>(
    SERVED_CACHE_LIMITS,
  );

  /** The narinfo as served: the stored text, or (with a signing key) that text signed. */
  function narinfoBody(hashPart: string, stored: StoredPath): { body: string; length: number } {
    const known = served.get(hashPart);
    // The metadata store hands out the same string while the record is unchanged.
    if (known !== undefined && known.text === stored.text) return known;
    let body = stored.text;
    if (options.signingKey !== undefined) {
      const narInfo = { ...stored.record.narInfo, sigs: [...stored.record.narInfo.sigs] };
      if (addSignature(narInfo, options.signingKey)) body = formatNarInfo(narInfo);
    }
    const entry = { text: stored.text, body, length: new TextEncoder().encode(body).length };
    served.set(hashPart, entry, entry.length);
    return entry;
  }

  function narinfoResponse(hashPart: string, stored: StoredPath, head: boolean): Response {
    const { body, length } = narinfoBody(hashPart, stored);
    return new Response(head ? null : body, {
      headers: { "content-type": "text/x-nix-narinfo", "content-length": String(length) },
    });
  }

  async function narinfo(hashPart: string, head: boolean): Promise<Response> {
    // The stored text is served as it is (it was checked when written and when read).
    const stored = await cache.metadata.getStoredPath(hashPart);
    if (stored === null) return await narinfoFromSources(hashPart, head);
    return narinfoResponse(hashPart, stored, head);
  }

  // Paths served from sources, by the nix32 NarHash of their `.nar` URL.
  const fromSources = new BoundedCache<string, SourceEntry>(SOURCE_ENTRY_LIMITS);
  const narHashIndex = new NarHashIndex(cache);
  const aliases = new NarAliases(cache.cacheDir);

  async function narinfoFromSources(hashPart: string, head: boolean): Promise<Response> {
    for (const source of sources) {
      let path: SourcePath | null;
      try {
        path = await source.lookup(hashPart);
      } catch (error) {
        options.log?.(`Lookup of ${hashPart} (${source.kind}) failed: ${errorText(error)}`);
        continue;
      }
      if (path === null) continue;
      const narInfo = sourceNarInfo(path, source.openFile !== undefined);
      if (options.signingKey !== undefined) addSignature(narInfo, options.signingKey);
      fromSources.set(nix32Digest(narInfo.narHash), { hashPart, path, source });
      if (narInfo.compression !== "none") {
        fromSources.set(nix32Digest(narInfo.fileHash!), { hashPart, path, source });
      }
      const body = new TextEncoder().encode(formatNarInfo(narInfo));
      return new Response(head ? null : body, {
        headers: { "content-type": "text/x-nix-narinfo", "content-length": String(body.length) },
      });
    }
    throw new HttpError(404, "No such path");
  }

  /** A `.nar` URL that is no FileHash here: a NAR by its NarHash, served uncompressed. */
  async function narByNarHash(nix32: string, request: Request): Promise<Response> {
    const narHash = `sha256:${nix32}`;
    let entry = fromSources.get(nix32);
    // The key may be another path's FileHash (unsigned: an upstream can claim any).
    if (entry !== undefined && nix32Digest(entry.path.narHash) !== nix32) entry = undefined;
    // A path fetched earlier (or imported since) is served from here.
    const localHashPart = entry?.hashPart ?? await narHashIndex.find(narHash);
    const here = localHashPart === undefined
      ? null
      : await localNar(localHashPart, narHash, request);
    if (here !== null) {
      return narResponse(request, here.narSize, () => cache.openNar(here), "local");
    }
    for (const source of sources) {
      if (entry !== undefined) break;
      const known = await source.lookupByNarHash?.(narHash).catch((error) => {
        options.log?.(`Lookup of NAR ${nix32} (${source.kind}) failed: ${errorText(error)}`);
        return null;
      });
      if (known) entry = { ...known, source };
    }
    if (entry === undefined) throw new HttpError(404, "No such NAR");
    const { hashPart, path, source } = entry;
    const open = async () => {
      const nar = await source.openNar(hashPart, path);
      return source.checksNars ? nar : nar.pipeThrough(
        verifyNarStream({ narHash, narSize: path.narSize, name: `NAR of ${path.storePath}` }),
      );
    };
    let body: ReadableStream<Uint8Array> | null = null;
    try {
      if (request.method !== "HEAD") body = await open();
    } catch (error) {
      if (!(error instanceof NotFoundError)) throw error;
      // Imported meanwhile (or gone): the local copy, if any.
      const now = await localNar(hashPart, narHash, request);
      if (now === null) throw new HttpError(404, "No such NAR");
      return narResponse(request, now.narSize, () => cache.openNar(now), "local");
    }
    return narResponse(request, path.narSize, () => body!, source.kind);
  }

  /**
   * A `.nar.zst` or `.nar.xz` URL that is no FileHash here: the origin's file of a path
   * served from a source ({@link SourcePath.file}), passed through and checked against its
   * FileHash and FileSize; once the path is local, its NAR as stored here, in that
   * compression (Nix decompresses any concatenation of zstd frames or xz streams; it does
   * not check FileHash). Null when no source path has this file.
   */
  async function narFromSourceFile(
    nix32: string,
    compression: PassedCompression,
    request: Request,
  ): Promise<Response | null> {
    let entry = fromSources.get(nix32);
    if (entry === undefined) {
      // A URL this process served no narinfo for (it restarted; Nix kept the narinfo).
      const hashPart = await aliases.get(nix32);
      if (hashPart === null) return null;
      const here = await localAs(compression, hashPart, undefined, request);
      if (here !== null) return here;
      entry = await entryOfFile(hashPart, nix32);
    }
    if (entry === undefined || entry.path.file === undefined) return null;
    if (nix32Digest(entry.path.file.fileHash) !== nix32) return null;
    if (entry.path.file.compression !== compression) return null;
    const { hashPart, path, source } = entry;
    const { fileHash, fileSize } = entry.path.file;
    await aliases.remember(nix32, hashPart);
    const local = () => localAs(compression, hashPart, path.narHash, request);
    const here = await local();
    if (here !== null) return here;
    if (source.openFile === undefined) return null;
    if (request.method === "HEAD") {
      return narResponse(request, fileSize, () => ReadableStream.from([]), source.kind);
    }
    let file: ReadableStream<Uint8Array>;
    try {
      file = await source.openFile(hashPart, path);
    } catch (error) {
      if (!(error instanceof NotFoundError)) throw error;
      // Imported meanwhile, or gone: the local copy, or the NAR uncompressed.
      return await local();
    }
    const body = source.checksNars ? file : file.pipeThrough(
      verifyNarStream({
        narHash: fileHash,
        narSize: fileSize,
        name: `NAR file of ${path.storePath}`,
        file: true,
      }),
    );
    return narResponse(request, fileSize, () => body, source.kind);
  }

  /** The path `hashPart` from a source that passes the file `nix32` through now, if any. */
  async function entryOfFile(hashPart: string, nix32: string): Promise<SourceEntry | undefined> {
    for (const source of sources) {
      if (source.openFile === undefined) continue;
      const path = await source.lookup(hashPart).catch(() => null);
      if (path?.file !== undefined && nix32Digest(path.file.fileHash) === nix32) {
        const entry = { hashPart, path, source };
        fromSources.set(nix32, entry);
        return entry;
      }
    }
    return undefined;
  }

  /**
   * The manifest of local path `hashPart` (with this NarHash, when given), every chunk
   * present, its GET recorded; null when the path is not here.
   */
  async function localNar(
    hashPart: string,
    narHash: string | undefined,
    request: Request,
  ): Promise<Manifest | null> {
    const stored = await cache.narOfPath(hashPart);
    if (
      stored === null ||
      (narHash !== undefined &&
        nix32Digest(stored.record.narInfo.narHash) !== nix32Digest(narHash))
    ) {
      return null;
    }
    const { manifest, record } = await storedNarOrThrow(stored);
    if (request.method === "GET") recorder.record(record);
    return manifest;
  }

  /**
   * The local copy of a path (with this NarHash, when given) as a zstd or xz file, what a
   * passed-through file's narinfo promised: a copy stored otherwise is sent as one zstd
   * frame of raw blocks or one xz stream of uncompressed LZMA2 chunks of its NAR
   * (src/cache/raw_containers.ts). Null when the path is not here.
   */
  async function localAs(
    compression: PassedCompression,
    hashPart: string,
    narHash: string | undefined,
    request: Request,
  ): Promise<Response | null> {
    const manifest = await localNar(hashPart, narHash, request);
    if (manifest === null) return null;
    if (manifest.compression === compression) {
      return narResponse(request, manifest.fileSize, () => openStored(manifest), "local");
    }
    const [size, wrap] = compression === "zstd"
      ? [rawZstdFrameSize, rawZstdFrame]
      : [rawXzStreamSize, rawXzStream];
    return narResponse(
      request,
      size(manifest.narSize),
      () => cache.openNar(manifest).pipeThrough(wrap(manifest.narSize)),
      "local",
    );
  }

  /** A stored NAR file's body (or a range of it). */
  function openStored(
    manifest: Manifest,
    range?: { start: number; end: number },
  ): ReadableStream<Uint8Array> {
    return cache.openStoredNar(manifest, { range, reusePieces: options.reusePieces });
  }

  function narResponse(
    request: Request,
    size: number,
    open: () => ReadableStream<Uint8Array>,
    hitSource: "local" | "peer" | "upstream",
  ): Response {
    const response = new Response(request.method === "HEAD" ? null : open(), {
      status: 200,
      headers: { "content-type": "application/x-nix-nar", "content-length": String(size) },
    });
    hitSources.set(response, hitSource);
    return response;
  }

  /**
   * The response to a GET or HEAD of a narinfo the metadata store can answer at once (from
   * its checked in-process cache), built without a promise chain: the most frequent request
   * of a substituter. Undefined for anything else, which {@link route} handles.
   */
  function cachedNarinfo(request: Request): Response | undefined {
    if (options.readToken !== undefined) return undefined;
    const method = request.method;
    if (method !== "GET" && method !== "HEAD") return undefined;
    const match = NARINFO_PATH.exec(rawRequestPath(request.url));
    if (match === null || !isValidHashPart(match[1])) return undefined;
    const stored = cache.metadata.peekStoredPath(match[1]);
    return stored ? narinfoResponse(match[1], stored, method === "HEAD") : undefined;
  }

  async function storedNarOrThrow(found: StoredNar | null): Promise<StoredNar> {
    if (found === null) throw new HttpError(404, "No such NAR");
    const missing = await cache.missingChunks(found.manifest);
    if (missing.length > 0) {
      options.log?.(
        `NAR of ${found.record.narInfo.storePath} has ${missing.length} missing or damaged chunk(s), e.g. ${
          missing[0]
        }: not served`,
      );
      throw new HttpError(
        404,
        `NAR is incomplete in this cache (${missing.length} chunks missing)`,
      );
    }
    return found;
  }

  /** {@link Cache.readSmallStoredNar}, with a damaged NAR answered as {@link storedNarOrThrow} does. */
  function readSmallOrThrow(found: StoredNar): Uint8Array<ArrayBuffer> {
    try {
      return cache.readSmallStoredNar(found.manifest);
    } catch (error) {
      if (!(error instanceof NotFoundError || error instanceof IntegrityError)) throw error;
      options.log?.(
        `NAR of ${found.record.narInfo.storePath} has a missing or damaged chunk: not served (${error.message})`,
      );
      throw new HttpError(404, "NAR is incomplete in this cache");
    }
  }

  async function nar(fileName: string, request: Request): Promise<Response> {
    const match = /^([^/.]+)\.(nar(?:\.[a-z0-9]+)?)$/.exec(fileName);
    if (!match) throw new HttpError(404, "Not found");
    if (!isNixBase32(match[1], 32)) throw new HttpError(400, "Malformed NAR file hash");
    if (request.method === "HEAD" && uploads?.isStaged(fileName)) {
      // `nix copy --to` asks whether its NAR is here before uploading it.
      return new Response(null, {
        status: 200,
        headers: { "content-type": "application/x-nix-nar" },
      });
    }
    const found = await cache.findNar(`sha256:${match[1]}`);
    if (found === null && match[2] === "nar") return await narByNarHash(match[1], request);
    if (found === null && (match[2] === "nar.zst" || match[2] === "nar.xz")) {
      const passed = await narFromSourceFile(
        match[1],
        match[2] === "nar.xz" ? "xz" : "zstd",
        request,
      );
      if (passed !== null) return passed;
    }
    if (found && narFileExtension(found.manifest.compression) !== match[2]) {
      throw new HttpError(404, "No such NAR in that compression");
    }
    const headers: Record<string, string> = {
      "content-type": "application/x-nix-nar",
      "accept-ranges": "bytes",
      "cache-control": "public, max-age=31536000, immutable",
    };
    const range = found === null
      ? null
      : parseRange(request.headers.get("range"), found.manifest.fileSize);
    if (
      found !== null && request.method === "GET" && range === null &&
      found.manifest.fileSize <= PIECE_BYTES
    ) {
      // A small NAR is read whole before the answer, which checks every chunk file's
      // presence and size as a whole: a plain body is cheaper than a stream.
      const body = readSmallOrThrow(found);
      recorder.record(found.record);
      headers["content-length"] = String(body.length);
      return new Response(body, { status: 200, headers });
    }
    const { manifest, record } = await storedNarOrThrow(found);
    if (request.method === "GET") recorder.record(record);
    const size = manifest.fileSize;
    if (range === null) {
      headers["content-length"] = String(size);
      const body = request.method === "HEAD" ? null : openStored(manifest);
      return new Response(body, { status: 200, headers });
    }
    headers["content-length"] = String(range.end - range.start);
    headers["content-range"] = `bytes ${range.start}-${range.end - 1}/${size}`;
    const body = request.method === "HEAD" ? null : openStored(manifest, range);
    return new Response(body, { status: 206, headers });
  }

  async function listing(hashPart: string, head: boolean): Promise<Response> {
    const found = await storedNarOrThrow(await cache.narOfPath(hashPart));
    const body = new TextEncoder().encode(
      formatNarListing(await listNar(cache.openNar(found.manifest))),
    );
    return new Response(head ? null : body, {
      headers: { "content-type": "application/json", "content-length": String(body.length) },
    });
  }

  async function buildLog(name: string, head: boolean): Promise<Response> {
    const log = await logs.open(name);
    if (log === null) throw new HttpError(404, "No such log");
    const headers: Record<string, string> = {
      "content-type": "text/plain; charset=utf-8",
      "content-length": String(log.size),
    };
    if (log.encoding) headers["content-encoding"] = log.encoding;
    if (head) log.file.close();
    return new Response(head ? null : log.file.readable, { headers });
  }

  async function write(request: Request, path: string): Promise<Response> {
    if (!uploads || !options.upload) {
      await request.body?.cancel();
      throw new HttpError(403, "Uploads are disabled (start serve with --upload-token-file)");
    }
    if (!hasToken(request, [options.upload.token])) {
      await request.body?.cancel();
      throw unauthorized();
    }
    const body = request.body ?? ReadableStream.from<Uint8Array>([]);
    let match = /^\/nar\/([^/]+)$/.exec(path);
    if (match) {
      const length = Number(request.headers.get("content-length") ?? NaN);
      await uploads.putNar(match[1], body, Number.isSafeInteger(length) ? length : undefined);
      return new Response(null, { status: 204 });
    }
    match = /^\/([^/]+)\.narinfo$/.exec(path);
    if (match) {
      if (!isValidHashPart(match[1])) throw new HttpError(400, "Malformed store path hash");
      await uploads.putNarInfo(match[1], body);
      return new Response(null, { status: 204 });
    }
    match = /^\/log\/([^/]+)$/.exec(path);
    if (match) {
      await logs.put(match[1], body, request.headers.get("content-encoding") ?? undefined);
      return new Response(null, { status: 204 });
    }
    await body.cancel();
    if (path === "/nix-cache-info") return new Response(null, { status: 204 });
    throw new HttpError(404, "Not found");
  }

  async function route(request: Request): Promise<Response> {
    const path = rawRequestPath(request.url);
    checkPath(path);
    if (request.method === "PUT") {
      try {
        return await write(request, path);
      } catch (error) {
        // Refusals of what the client sent: say why (the message is about its data).
        if (
          error instanceof FormatError || error instanceof IntegrityError ||
          error instanceof SignatureError
        ) {
          await request.body?.cancel().catch(() => {});
          throw new HttpError(400, error.message);
        }
        throw error;
      }
    }
    if (request.method !== "GET" && request.method !== "HEAD") {
      await request.body?.cancel();
      throw new HttpError(405, "Method not allowed");
    }
    if (readTokens.length > 0 && options.readToken && !hasToken(request, readTokens)) {
      throw unauthorized();
    }
    const head = request.method === "HEAD";
    if (path === "/nix-cache-info") {
      return new Response(head ? null : cacheInfo, {
        headers: { "content-type": "text/x-nix-cache-info" },
      });
    }
    let match = /^\/([^/]+)\.narinfo$/.exec(path);
    if (match) {
      if (!isValidHashPart(match[1])) throw new HttpError(400, "Malformed store path hash");
      return await narinfo(match[1], head);
    }
    match = /^\/([^/]+)\.ls$/.exec(path);
    if (match) {
      if (!isValidHashPart(match[1])) throw new HttpError(400, "Malformed store path hash");
      return await listing(match[1], head);
    }
    match = /^\/nar\/([^/]+)$/.exec(path);
    if (match) return await nar(match[1], request);
    match = /^\/log\/([^/]+)$/.exec(path);
    if (match) return await buildLog(match[1], head);
    throw new HttpError(404, "Not found");
  }

  function handle(request: Request): Promise<Response> {
    const started = performance.now();
    let fast: Response | undefined;
    try {
      fast = cachedNarinfo(request);
    } catch {
      fast = undefined; // route() says what went wrong
    }
    if (fast === undefined) {
      return handleRoute(request).then((response) => count(request, response, started));
    }
    if (options.logRequests) {
      options.log?.(`${request.method} ${rawRequestPath(request.url)} ${fast.status}`);
    }
    return Promise.resolve(count(request, fast, started));
  }

  function count(request: Request, response: Response, started: number): Response {
    metrics.countRequest(
      routeOf(rawRequestPath(request.url)),
      request.method,
      response.status,
      request.method === "HEAD" ? 0 : Number(response.headers.get("content-length") ?? 0),
      (performance.now() - started) / 1000,
      hitSources.get(response),
    );
    return response;
  }

  async function handleRoute(request: Request): Promise<Response> {
    let response: Response;
    try {
      response = await route(request);
    } catch (error) {
      response = errorResponse(error, options.log);
    }
    if (options.logRequests) {
      options.log?.(`${request.method} ${rawRequestPath(request.url)} ${response.status}`);
    }
    return response;
  }

  return Object.assign(handle, {
    metrics,
    async close() {
      await recorder.close();
      await uploads?.close();
      await pending.close();
    },
  });
}

/** A path served from a source: what it is, and where to get its NAR. */
interface SourceEntry {
  hashPart: string;
  path: SourcePath;
  source: PathSource;
}

/** Limits of the handler's memory of paths served from sources. */
const SOURCE_ENTRY_LIMITS = { maxEntries: 65536, maxWeight: 65536 };

/**
 * The narinfo served for a path from a source: uncompressed, at `nar/<nix32 NarHash>.nar`;
 * or, when the source passes its file through (`passFile` and {@link SourcePath.file}), that
 * zstd or xz file at `nar/<nix32 FileHash>.nar.zst` or `.nar.xz`.
 */
export function sourceNarInfo(path: SourcePath, passFile = false): NarInfo {
  const narHash = normalizeNixHash(path.narHash);
  const file = passFile && path.file !== undefined
    ? {
      url: `nar/${nix32Digest(path.file.fileHash)}.${narFileExtension(path.file.compression)}`,
      compression: path.file.compression,
      fileHash: normalizeNixHash(path.file.fileHash),
      fileSize: path.file.fileSize,
    }
    : {
      url: `nar/${nix32Digest(narHash)}.nar`,
      compression: "none",
      fileHash: narHash,
      fileSize: path.narSize,
    };
  return {
    storePath: path.storePath,
    ...file,
    narHash,
    narSize: path.narSize,
    references: [...path.references],
    deriver: path.deriver,
    sigs: [...path.sigs],
    ca: path.ca,
  };
}

function errorText(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/**
 * Local paths by NarHash, for `.nar` URLs of narinfos served before the path was local. Built
 * by listing the metadata on a miss, at most once a minute.
 */
class NarHashIndex {
  #cache: Cache;
  #byNarHash = new Map<string, string>();
  #builtAt = -Infinity;
  #building: Promise<void> | null = null;

  constructor(cache: Cache) {
    this.#cache = cache;
  }

  /** The hash part of a local path with this NarHash, if any. */
  async find(narHash: string): Promise<string | undefined> {
    const key = nix32Digest(narHash);
    const known = this.#byNarHash.get(key);
    if (known !== undefined || performance.now() - this.#builtAt < 60_000) return known;
    this.#building ??= this.#build().finally(() => this.#building = null);
    await this.#building;
    return this.#byNarHash.get(key);
  }

  async #build(): Promise<void> {
    const index = new Map<string, string>();
    for await (const record of this.#cache.listPaths()) {
      index.set(nix32Digest(record.narInfo.narHash), parseStorePath(record.narInfo.storePath).hash);
    }
    this.#byNarHash = index;
    this.#builtAt = performance.now();
  }
}

function unauthorized(): HttpError {
  return new HttpError(401, "Unauthorized", { "www-authenticate": 'Basic realm="pares-arca"' });
}

function errorResponse(error: unknown, log?: (message: string) => void): Response {
  if (error instanceof HttpError) {
    const headers = error.status === 405
      ? { allow: "GET, HEAD, PUT", ...error.headers }
      : error.headers;
    return text(error.status, error.message + "\n", headers);
  }
  // Details of the cache's own errors (file names, stored text) stay in the log: a request
  // is validated before it reaches the cache, so any other error means the stored data is
  // damaged, and its message may quote that data.
  if (error instanceof NotFoundError) return text(404, "Not found\n");
  const message = error instanceof ArcaError ? error.message : String(error);
  log?.(`Internal error: ${error instanceof Error ? error.stack ?? message : message}`);
  return text(500, "Internal server error\n");
}
