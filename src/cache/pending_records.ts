/**
 * The records of accepted uploads not yet chunked into the cache (src/net/pending_uploads.ts
 * serves and imports them): `<cacheDir>/uploads/pending/` holds each one's uploaded file
 * (`<nix32 FileHash>.nar[.xz|.zst|…]`) and its record (`<hash part>.json`), written and
 * synced in that order. The garbage collector keeps what they reference
 * ({@link pendingReferences}).
 * @module
 */

import { join } from "node:path";
import { parseUploadCompression, type UploadCompression } from "./decompress_stream.ts";
import { parseNixHash } from "./hash.ts";
import { encodeNixBase32 } from "./nixbase32.ts";
import { isValidHashPart, parseStorePath } from "./store_path.ts";
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
      if (
        !isValidHashPart(upload.hashPart) || `${upload.hashPart}.json` !== entry.name ||
        typeof upload.file !== "string" || !/^[0-9a-z]{52}\.nar(\.[a-z0-9]+)?$/.test(upload.file) ||
        parseUploadCompression(upload.file) !== upload.compression ||
        parseStorePath(upload.storePath).hash !== upload.hashPart
      ) {
        throw new FormatError("not a pending upload record");
      }
      uploads.push(upload);
    } catch (error) {
      log?.(`Pending upload ${entry.name} skipped: ${(error as Error).message}`);
    }
  }
  return uploads.sort((a, b) => a.acceptedAt - b.acceptedAt);
}

/**
 * Makes an upload pending: moves its checked file (`incoming`, synced) into the pending
 * directory, then writes its record (synced); returns the record.
 */
export async function writePendingUpload(
  cacheDir: string,
  upload: Omit<PendingUpload, "file" | "acceptedAt">,
  incoming: string,
): Promise<PendingUpload> {
  const dir = pendingDir(cacheDir);
  await Deno.mkdir(dir, { recursive: true });
  const file = `${encodeNixBase32(parseNixHash(upload.fileHash))}.${
    upload.compression === "none" ? "nar" : `nar.${upload.compression}`
  }`;
  const record: PendingUpload = { ...upload, file, acceptedAt: Date.now() };
  await Deno.rename(incoming, join(dir, file));
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
  await syncDir(dir);
  return record;
}

/** Removes a pending upload's record, then its file (after its import). */
export async function removePendingUpload(cacheDir: string, upload: PendingUpload): Promise<void> {
  const dir = pendingDir(cacheDir);
  await Deno.remove(join(dir, `${upload.hashPart}.json`)).catch(() => {});
  await Deno.remove(join(dir, upload.file)).catch(() => {});
}

async function syncDir(dir: string): Promise<void> {
  const handle = await Deno.open(dir, { read: true });
  try {
    await handle.sync();
  } catch {
    /* some file systems cannot sync a directory */
  } finally {
    handle.close();
  }
}
