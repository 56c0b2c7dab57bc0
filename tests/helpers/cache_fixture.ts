/**
 * Test helper: a {@link Cache} in a fresh temporary directory, and imports of in-memory
 * NARs into it WITHOUT Nix (NAR bytes from `encodeNar`, fed to `cache.importNar`). Also
 * deterministic pseudo-random bytes (so a multi-chunk NAR is the same on every run) and
 * made-up store paths with valid nix32 hash parts.
 * @module
 */

import { Cache, type ImportResult } from "../../src/cache/cache.ts";
import type { ChunkCompression } from "../../src/cache/compression.ts";
import type { MetadataBackend } from "../../src/cache/metadata.ts";
import { encodeNar, type NarTree } from "../../src/cache/nar.ts";
import { encodeNixBase32 } from "../../src/cache/nixbase32.ts";
import { sha256 } from "../../src/cache/hash.ts";
import type { SecretKey } from "../../src/cache/signing.ts";

/** A cache in its own temporary directory; `close()` closes it and removes the directory. */
export interface CacheFixture {
  /** The open cache. */
  cache: Cache;
  /** Its cache directory (a fresh temporary directory). */
  dir: string;
  /** Closes the cache and removes the directory (idempotent). */
  close(): Promise<void>;
  /** Same as `close()`, for `await using`. */
  [Symbol.asyncDispose](): Promise<void>;
}

/** Options of {@link makeCacheFixture}. */
export interface CacheFixtureOptions {
  /** Metadata backend (default "kv"). */
  backend?: MetadataBackend;
  /** Prefix of the temporary directory name. */
  prefix?: string;
}

/** Opens a cache in a fresh temporary directory. */
export async function makeCacheFixture(options: CacheFixtureOptions = {}): Promise<CacheFixture> {
  const dir = await Deno.makeTempDir({ prefix: options.prefix ?? "arca-cache-fixture-" });
  let cache: Cache;
  try {
    cache = await Cache.open(dir, { backend: options.backend ?? "kv" });
  } catch (error) {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
    throw error;
  }
  let closed = false;
  const close = async () => {
    if (closed) return;
    closed = true;
    try {
      cache.close();
    } catch {
      // A test closed it already.
    }
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  };
  return { cache, dir, close, [Symbol.asyncDispose]: close };
}

/**
 * Deterministic pseudo-random bytes (xorshift32 seeded by `seed`): incompressible enough
 * that FastCDC cuts many chunks, and identical on every run.
 */
export function pseudoRandomBytes(length: number, seed = 1): Uint8Array {
  const out = new Uint8Array(length);
  const view = new DataView(out.buffer);
  let state = (seed * 2654435761) >>> 0 || 0x9e3779b9;
  let i = 0;
  for (; i + 4 <= length; i += 4) {
    state ^= state << 13;
    state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5;
    state >>>= 0;
    view.setUint32(i, state, true);
  }
  for (; i < length; i++) {
    state ^= state << 13;
    state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5;
    state >>>= 0;
    out[i] = state & 0xff;
  }
  return out;
}

/**
 * A syntactically valid store path `/nix/store/<hash>-<name>` whose hash part is derived
 * from `name` and `seed` (so different names give different hash parts).
 */
export function fakeStorePath(name: string, seed = 0): string {
  const digest = sha256(new TextEncoder().encode(`${seed}:${name}`));
  return `/nix/store/${encodeNixBase32(digest.subarray(0, 20))}-${name}`;
}

/** The hash part of a store path. */
export function hashPartOf(storePath: string): string {
  return storePath.slice("/nix/store/".length, "/nix/store/".length + 32);
}

/** Options of {@link importFixture}. */
export interface ImportFixtureOptions {
  /** Chunk compression (default "zstd"). */
  compression?: ChunkCompression;
  /** Store path to import as (default: {@link fakeStorePath} of "fixture"). */
  storePath?: string;
  /** Base names of referenced paths. */
  references?: string[];
  /** Base name of the deriver. */
  deriver?: string;
  /** Signatures the path already carries. */
  sigs?: string[];
  /** Signs the imported path with this key. */
  signingKey?: SecretKey;
  /** Content address. */
  ca?: string;
}

/** What {@link importFixture} imported. */
export interface ImportedFixture {
  /** The NAR bytes that were imported. */
  nar: Uint8Array;
  /** The store path. */
  storePath: string;
  /** Its hash part. */
  hashPart: string;
  /** What `importNar` returned. */
  result: ImportResult;
}

/**
 * Imports a NAR into the cache: `source` is NAR bytes or an in-memory tree that is
 * encoded with `encodeNar`. The bytes are fed in 100 KiB pieces, as a stream would.
 */
export async function importFixture(
  cache: Cache,
  source: NarTree | Uint8Array,
  options: ImportFixtureOptions = {},
): Promise<ImportedFixture> {
  const nar = source instanceof Uint8Array ? source : encodeNar(source);
  const storePath = options.storePath ?? fakeStorePath("fixture");
  const pieces: Uint8Array[] = [];
  for (let at = 0; at < nar.length; at += 100 * 1024) {
    pieces.push(nar.subarray(at, Math.min(at + 100 * 1024, nar.length)));
  }
  const result = await cache.importNar(ReadableStream.from(pieces), {
    storePath,
    references: options.references ?? [],
    deriver: options.deriver,
    sigs: options.sigs ?? [],
    ca: options.ca,
  }, { compression: options.compression ?? "zstd", signingKey: options.signingKey });
  return { nar, storePath, hashPart: hashPartOf(storePath), result };
}

/** A small file tree with a regular file, an executable, a symlink and a subdirectory. */
export function sampleTree(marker = "hello"): NarTree {
  const enc = new TextEncoder();
  return {
    type: "directory",
    entries: {
      "README": { type: "regular", contents: enc.encode(`${marker}\n`) },
      "bin": {
        type: "directory",
        entries: {
          "run": {
            type: "regular",
            executable: true,
            contents: enc.encode(`#!/bin/sh\necho ${marker}\n`),
          },
        },
      },
      "empty": { type: "regular", contents: new Uint8Array(0) },
      "link": { type: "symlink", target: "bin/run" },
    },
  };
}
