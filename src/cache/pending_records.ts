/**
 * The records of accepted uploads not yet chunked into the cache (src/net/pending_uploads.ts
 * serves and imports them): `<cacheDir>/uploads/pending/` holds each one's uploaded file
 * (`<hash part>.nar[.xz|.zst|…]`: two paths with the same NAR file have a file each) and its
 * record (`<hash part>.json`), written and synced in that order. The garbage collector keeps what they reference
 * ({@link pendingReferences}).
 * @module
 */

import { join } from "node:path";
import { syncDirectory } from "./chunk_store.ts";
import { parseUploadCompression, type UploadCompression } from "./decompress_stream.ts";
import { parseNixHash } from "./hash.ts";
import { isValidHashPart, parseStorePath, parseStorePathBaseName } from "./store_path.ts";
import { FormatError } from "../errors.ts";

/** An accepted upload waiting for its import. */
export interface PendingUpload {
  hashPart: string;
  storePath: string;
  /** `sha256:<nix32>`. */
  narHash: string;
  narSize: number;
  /** `sha256:<nix32>` of the uploaded file. */
  fileHash: string;
  fileSize: number;
  compression: UploadCompression;
  /** Base names. */
  references: string[];
  deriver?: string;
  ca?: string;
  sigs: string[];
  segment?: string;
  /** The uploaded file's name in the pending directory. */
  file: string;
  /** When the narinfo was accepted (ms since the epoch). */
  acceptedAt: number;
}

/** `<cacheDir>/uploads/pending`. */
export function pendingDir(cacheDir: string): string {
  return join(cacheDir, "uploads", "pending");
}

/** `<cacheDir>/uploads/incoming`: uploaded files until their narinfo is accepted. */
export function incomingDir(cacheDir: string): string {
  return join(cacheDir, "uploads", "incoming");
}

/**
 * The hash parts that pending uploads reference (the garbage collector keeps them and
 * their closures: an upload was accepted because they were cached).
 */
export async function pendingReferences(cacheDir: string): Promise<Set<string>> {
  const referenced = new Set<string>();
  for (const upload of await readPendingUploads(cacheDir)) {
    for (const reference of upload.references) {
      referenced.add(reference.slice(0, 32));
    }
  }
  return referenced;
}

/** The pending uploads' records, oldest first; unreadable ones are skipped (and logged). */
export async function readPendingUploads(
  cacheDir: string,
  log?: (message: string) => void,
): Promise<PendingUpload[]> {
  const dir = pendingDir(cacheDir);
  const uploads: PendingUpload[] = [];
  let entries: Deno.DirEntry[];
  try {
    entries = await Array.fromAsync(Deno.readDir(dir));
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return [];
    throw error;
  }
  for (const entry of entries) {
    if (!entry.isFile || !/^[0-9a-z]{32}\.json$/.test(entry.name)) continue;
    try {
      const upload = JSON.parse(await Deno.readTextFile(join(dir, entry.name))) as PendingUpload;
      if (!isValidHashPart(upload.hashPart) || `${upload.hashPart}.json` !== entry.name) {
        throw new FormatError("not a pending upload record");
      }
      checkRecord(upload);
      uploads.push(upload);
    } catch (error) {
      log?.(`Pending upload ${entry.name} skipped: ${(error as Error).message}`);
    }
  }
  return uploads.sort((a, b) => a.acceptedAt - b.acceptedAt);
}

/** Throws FormatError unless `upload` (read from disk) is a well-formed record. */
function checkRecord(upload: PendingUpload): void {
  const fail = (what: string) => {
    throw new FormatError(`not a pending upload record: ${what}`);
  };
  const optionalString = (value: unknown) => value === undefined || typeof value === "string";
  if (parseStorePath(upload.storePath).hash !== upload.hashPart) fail("store path");
  if (
    typeof upload.file !== "string" || upload.file !== pendingFileName(upload) ||
    parseUploadCompression(upload.file) !== upload.compression
  ) fail("file");
  parseNixHash(upload.narHash);
  parseNixHash(upload.fileHash);
  for (const size of [upload.narSize, upload.fileSize]) {
    if (!Number.isSafeInteger(size) || size < 0) fail("size");
  }
  if (!Number.isFinite(upload.acceptedAt)) fail("acceptedAt");
  if (!Array.isArray(upload.references)) fail("references");
  for (const reference of upload.references) parseStorePathBaseName(reference);
  if (!Array.isArray(upload.sigs) || !upload.sigs.every((sig) => typeof sig === "string")) {
    fail("sigs");
  }
  if (![upload.deriver, upload.ca, upload.segment].every(optionalString)) fail("fields");
}

/** The name of a pending upload's file: its hash part and the upload's extension. */
function pendingFileName(upload: { hashPart: string; compression: UploadCompression }): string {
  return `${upload.hashPart}.${
    upload.compression === "none" ? "nar" : `nar.${upload.compression}`
  }`;
}

/**
 * Makes an upload pending: moves its checked file (`from.move`, synced) into the pending
 * directory, or links the file of another pending upload of the same NAR file
 * (`from.link`), then writes its record (synced); returns the record.
 */
export async function writePendingUpload(
  cacheDir: string,
  upload: Omit<PendingUpload, "file" | "acceptedAt">,
  from: { move: string } | { link: string },
): Promise<PendingUpload> {
  const dir = pendingDir(cacheDir);
  await Deno.mkdir(dir, { recursive: true });
  const file = pendingFileName(upload);
  const record: PendingUpload = { ...upload, file, acceptedAt: Date.now() };
  if ("move" in from) {
    await Deno.rename(from.move, join(dir, file));
  } else {
    const linked = join(dir, `${file}.${crypto.randomUUID()}.tmp`);
    await Deno.link(join(dir, from.link), linked);
    await Deno.rename(linked, join(dir, file));
  }
  const json = join(dir, `${upload.hashPart}.json`);
  const temporary = `${json}.${crypto.randomUUID()}.tmp`;
  const handle = await Deno.open(temporary, { write: true, createNew: true, mode: 0o600 });
  try {
    await handle.write(new TextEncoder().encode(JSON.stringify(record)));
    await handle.sync();
  } finally {
    handle.close();
  }
  await Deno.rename(temporary, json);
  await syncDirectory(dir);
  return record;
}

/** Removes a pending upload's record, then its file (after its import). */
export async function removePendingUpload(cacheDir: string, upload: PendingUpload): Promise<void> {
  const dir = pendingDir(cacheDir);
  await Deno.remove(join(dir, `${upload.hashPart}.json`)).catch(() => {});
  await Deno.remove(join(dir, upload.file)).catch(() => {});
}
