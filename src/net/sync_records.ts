/**
 * What swarm peers exchange about a store path, and how a received one is judged (pure).
 *
 * A record's id, the key of set reconciliation, is the SHA-256 of its narinfo fingerprint
 * and its sorted signatures: two nodes holding the same path with the same signatures hold
 * the same id; when their signatures differ they exchange the records and each keeps the
 * union of the valid signatures, after which the ids agree.
 *
 * A received record is accepted only when it is well formed, carries a valid signature of
 * a key the segment trusts, and passes the segment's filter.
 * @module
 */

import { createHash } from "node:crypto";
import type { SyncRecord } from "../cache/remote_records.ts";
import { normalizeNixHash } from "../cache/hash.ts";
import { formatNarInfo, type NarInfo, narInfoFingerprint } from "../cache/narinfo.ts";
import { matchesFilter } from "../cache/segments.ts";
import { type PublicKey, validSignatureKeys, verifyFingerprint } from "../cache/signing.ts";
import type { SegmentFilter } from "../config.ts";
import { FormatError } from "../errors.ts";

/** The NarInfo shape of a record (URL and compression are not exchanged). */
export function narInfoOfRecord(record: SyncRecord): NarInfo {
  return { ...record, url: "nar/unknown.nar", compression: "none" };
}

/** The record of a narinfo. */
export function recordOfNarInfo(info: NarInfo): SyncRecord {
  const record: SyncRecord = {
    storePath: info.storePath,
    narHash: info.narHash,
    narSize: info.narSize,
    references: [...info.references].sort(),
    sigs: [...new Set(info.sigs)].sort(),
  };
  if (info.deriver !== undefined) record.deriver = info.deriver;
  if (info.ca !== undefined) record.ca = info.ca;
  return record;
}

/** The reconciliation id of a record. */
export function recordId(record: SyncRecord): Uint8Array {
  const hash = createHash("sha256");
  hash.update(narInfoFingerprint(narInfoOfRecord(record)));
  for (const sig of [...new Set(record.sigs)].sort()) hash.update("\n" + sig);
  return new Uint8Array(hash.digest());
}

/**
 * A record from untrusted JSON: FormatError unless every field is present, typed and valid
 * as in a narinfo (store path, hashes, sizes, reference names, signatures).
 */
export function parseSyncRecord(raw: unknown): SyncRecord {
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) {
    throw new FormatError("Invalid sync record: not an object");
  }
  const value = raw as Record<string, unknown>;
  const strings = (field: string) => {
    const list = value[field];
    if (!Array.isArray(list) || list.length > 20_000 || list.some((s) => typeof s !== "string")) {
      throw new FormatError(`Invalid sync record: '${field}' must be a list of strings`);
    }
    return list as string[];
  };
  const optional = (field: string) => {
    const text = value[field];
    if (text !== undefined && typeof text !== "string") {
      throw new FormatError(`Invalid sync record: '${field}' must be a string`);
    }
    return text as string | undefined;
  };
  if (typeof value.storePath !== "string" || typeof value.narHash !== "string") {
    throw new FormatError("Invalid sync record: storePath and narHash are required");
  }
  if (typeof value.narSize !== "number") throw new FormatError("Invalid sync record: narSize");
  const record: SyncRecord = {
    storePath: value.storePath,
    narHash: normalizeNixHash(value.narHash),
    narSize: value.narSize,
    references: [...new Set(strings("references"))].sort(),
    sigs: [...new Set(strings("sigs"))].sort(),
  };
  const deriver = optional("deriver");
  const ca = optional("ca");
  if (deriver !== undefined) record.deriver = deriver;
  if (ca !== undefined) record.ca = ca;
  formatNarInfo(narInfoOfRecord(record)); // checks every field the way a narinfo is checked
  return record;
}

/** Why a record was refused, or null when it is accepted. */
export function judgeRecord(
  record: SyncRecord,
  segment: { filter: SegmentFilter; trustedKeys: readonly PublicKey[] },
): string | null {
  if (validSignatureKeys(narInfoOfRecord(record), segment.trustedKeys).length === 0) {
    return "no valid signature from a trusted key";
  }
  if (!matchesFilter(segment.filter, record)) return `does not pass the ${segment.filter} filter`;
  return null;
}

/**
 * The record with only the signatures that verify against `trustedKeys`, merged with
 * `existing` (so a peer's junk signatures never spread).
 */
export function mergeSignatures(
  record: SyncRecord,
  existing: readonly string[],
  trustedKeys: readonly PublicKey[],
): string[] {
  const fingerprint = narInfoFingerprint(narInfoOfRecord(record));
  const kept = record.sigs.filter((sig) => verifyFingerprint(fingerprint, sig, trustedKeys));
  return [...new Set([...existing, ...kept])].sort();
}
