/**
 * NAR manifests: the ordered list of chunks that make up one NAR, with the NAR's hash and
 * size and the hash and size of our encoding of it (the concatenated chunk files).
 *
 * Binary format, little-endian (96-byte header, then 40 bytes per chunk):
 * ```
 * "ARCAMAN1"  u8 compression (0 none, 1 zstd, 2 xz)  3 zero bytes  u32 chunk count
 * narHash[32]  u64 narSize  fileHash[32]  u64 fileSize
 * per chunk: id[32] (SHA-256 of the uncompressed chunk)  u32 size  u32 storedSize
 * ```
 * A manifest is a file `objects/manifests/<2 chars>/<nix32 FileHash>.manifest`, written
 * tmp + fsync + rename before the narinfo that points at it becomes visible (DESIGN.md §3).
 * Decoding checks that the sizes add up, so a torn or foreign file is an error.
 * @module
 */

import { join } from "node:path";
import { FormatError, NotFoundError } from "../errors.ts";
import { encodeNixBase32 } from "./nixbase32.ts";
import { formatBase16 } from "./hash.ts";
import type { ChunkCompression } from "./compression.ts";

const MAGIC = new TextEncoder().encode("ARCAMAN1");
const HEADER_SIZE = 96;
const ENTRY_SIZE = 40;
const COMPRESSION_CODES: ChunkCompression[] = ["none", "zstd", "xz"];

/** One chunk of a NAR. */
export interface ManifestEntry {
  /** Lowercase hex SHA-256 of the uncompressed chunk. */
  id: string;
  /** Uncompressed size. */
  size: number;
  /** Size of the chunk file (compressed). */
  storedSize: number;
}

/** A NAR as a sequence of chunks. */
export interface Manifest {
  compression: ChunkCompression;
  /** SHA-256 of the NAR. */
  narHash: Uint8Array;
  narSize: number;
  /** SHA-256 of the concatenated chunk files, as served. */
  fileHash: Uint8Array;
  fileSize: number;
  chunks: ManifestEntry[];
}

function unhex(text: string): Uint8Array {
  const out = new Uint8Array(text.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(text.slice(2 * i, 2 * i + 2), 16);
  return out;
}

/** Serializes a manifest. */
export function encodeManifest(manifest: Manifest): Uint8Array {
  const out = new Uint8Array(HEADER_SIZE + ENTRY_SIZE * manifest.chunks.length);
  const view = new DataView(out.buffer);
  out.set(MAGIC, 0);
  out[8] = COMPRESSION_CODES.indexOf(manifest.compression);
  view.setUint32(12, manifest.chunks.length, true);
  out.set(manifest.narHash, 16);
  view.setBigUint64(48, BigInt(manifest.narSize), true);
  out.set(manifest.fileHash, 56);
  view.setBigUint64(88, BigInt(manifest.fileSize), true);
  let offset = HEADER_SIZE;
  for (const chunk of manifest.chunks) {
    out.set(unhex(chunk.id), offset);
    view.setUint32(offset + 32, chunk.size, true);
    view.setUint32(offset + 36, chunk.storedSize, true);
    offset += ENTRY_SIZE;
  }
  return out;
}

/** Parses a manifest; FormatError when it is malformed or its sizes do not add up. */
export function decodeManifest(bytes: Uint8Array): Manifest {
  const fail = (detail: string) => new FormatError(`Invalid NAR manifest: ${detail}`);
  if (bytes.length < HEADER_SIZE || !MAGIC.every((b, i) => bytes[i] === b)) {
    throw fail("bad magic");
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const compression = COMPRESSION_CODES[bytes[8]];
  if (compression === undefined) throw fail(`unknown compression code ${bytes[8]}`);
  const count = view.getUint32(12, true);
  if (bytes.length !== HEADER_SIZE + count * ENTRY_SIZE) {
    throw fail(`expected ${count} chunks, file has ${bytes.length} bytes`);
  }
  const narSize = Number(view.getBigUint64(48, true));
  const fileSize = Number(view.getBigUint64(88, true));
  const chunks: ManifestEntry[] = [];
  let narTotal = 0;
  let fileTotal = 0;
  for (let offset = HEADER_SIZE; offset < bytes.length; offset += ENTRY_SIZE) {
    const size = view.getUint32(offset + 32, true);
    const storedSize = view.getUint32(offset + 36, true);
    chunks.push({ id: formatBase16(bytes.subarray(offset, offset + 32)), size, storedSize });
    narTotal += size;
    fileTotal += storedSize;
  }
  if (narTotal !== narSize || fileTotal !== fileSize) {
    throw fail("chunk sizes do not add up to the NAR and file sizes");
  }
  return {
    compression,
    narHash: bytes.slice(16, 48),
    narSize,
    fileHash: bytes.slice(56, 88),
    fileSize,
    chunks,
  };
}

/** Reads and writes manifest files under `<cacheDir>/objects/manifests`. */
export class ManifestStore {
  #root: string;

  /** A store rooted at `${cacheDir}/objects/manifests`. */
  constructor(cacheDir: string) {
    this.#root = join(cacheDir, "objects", "manifests");
  }

  /** The file of the manifest whose FileHash is `fileHash`. */
  manifestPath(fileHash: Uint8Array): string {
    const name = encodeNixBase32(fileHash);
    return join(this.#root, name.slice(0, 2), `${name}.manifest`);
  }

  /** Writes a manifest durably (tmp + fsync + rename + fsync of the directory). */
  async write(manifest: Manifest): Promise<void> {
    const path = this.manifestPath(manifest.fileHash);
    const dir = path.slice(0, path.lastIndexOf("/"));
    await Deno.mkdir(dir, { recursive: true });
    const tmp = `${path}.tmp-${crypto.randomUUID()}`;
    const file = await Deno.open(tmp, { write: true, createNew: true });
    try {
      const bytes = encodeManifest(manifest);
      let written = 0;
      while (written < bytes.length) written += await file.write(bytes.subarray(written));
      await file.sync();
    } finally {
      file.close();
    }
    await Deno.rename(tmp, path);
    const dirHandle = await Deno.open(dir, { read: true });
    try {
      await dirHandle.sync();
    } finally {
      dirHandle.close();
    }
  }

  /** Reads the manifest of a FileHash; NotFoundError when there is none. */
  async read(fileHash: Uint8Array): Promise<Manifest> {
    const path = this.manifestPath(fileHash);
    let bytes: Uint8Array;
    try {
      bytes = await Deno.readFile(path);
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) {
        throw new NotFoundError(`NAR manifest not found: ${path}`);
      }
      throw error;
    }
    return decodeManifest(bytes);
  }

  /**
   * Every manifest file: its FileHash (nix32) and modification time. Temporary files and
   * anything else in the directory are skipped.
   */
  async *list(): AsyncGenerator<{ fileHash: string; mtime: number }> {
    let dirs: Deno.DirEntry[];
    try {
      dirs = await Array.fromAsync(Deno.readDir(this.#root));
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) return;
      throw error;
    }
    for (const dir of dirs) {
      if (!dir.isDirectory) continue;
      for await (const entry of Deno.readDir(join(this.#root, dir.name))) {
        const match = /^([0-9a-df-np-sv-z]{52})\.manifest$/.exec(entry.name);
        if (!entry.isFile || !match || match[1].slice(0, 2) !== dir.name) continue;
        try {
          const info = await Deno.lstat(join(this.#root, dir.name, entry.name));
          yield { fileHash: match[1], mtime: info.mtime?.getTime() ?? 0 };
        } catch (error) {
          if (!(error instanceof Deno.errors.NotFound)) throw error;
        }
      }
    }
  }

  /** Removes a manifest file (for garbage collection); false when it was not there. */
  async delete(fileHash: Uint8Array): Promise<boolean> {
    try {
      await Deno.remove(this.manifestPath(fileHash));
      return true;
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) return false;
      throw error;
    }
  }
}
