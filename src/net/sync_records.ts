/**
 * What swarm peers exchange about a store path, and how a received one is judged (pure).
 *
 * A record's id, the key of set reconciliation, is the SHA-256 of its narinfo fingerprint
 * and its sorted signatures: two nodes holding the same path with the same signatures hold
 * the same id; when their signatures differ they exchange the records and each keeps the
 * union of the valid signatures, after which the ids agree.
 *
 * A received record is accepted only when it is well formed, carries a valid signature of
 * a key the segment trusts, and passes the segment's filter. A refusal says whether it is
 * hostile: a signature under the name of a trusted key that does not verify is something
 * no honest peer sends (a forgery or corruption), while a record signed only by keys this
 * segment does not trust, or outside its filter, is a difference of configuration between
 * honest peers (another node trusts more keys). Malformed records are hostile too; that is
 * the caller's to count, as {@link parseSyncRecord} throws for them.
 * @module
 */

import { createHash } from "node:crypto";
import type { SyncRecord } from "../cache/remote_records.ts";
import { normalizeNixHash } from "../cache/hash.ts";
import {
  formatNarInfo,
  MAX_NARINFO_REFERENCES,
  MAX_NARINFO_SIGNATURES,
  type NarInfo,
  narInfoFingerprint,
} from "../cache/narinfo.ts";
import { matchesFilter } from "../cache/segments.ts";
import {
  type PublicKey,
  signatureKeyName,
  validSignatureKeys,
  verifyFingerprint,
} from "../cache/signing.ts";
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
 * as in a narinfo (store path, hashes, sizes, reference names, signatures), with at most
 * as many references and signatures as a narinfo may have. Unknown fields are dropped.
 */
export function parseSyncRecord(raw: unknown): SyncRecord {
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) {
    throw new FormatError("Invalid sync record: not an object");
  }
  const value = raw as Record<string, unknown>;
  const strings = (field: string, max: number) => {
    const list = value[field];
    if (!Array.isArray(list) || list.some((s) => typeof s !== "string")) {
      throw new FormatError(`Invalid sync record: '${field}' must be a list of strings`);
    }
    if (list.length > max) {
      throw new FormatError(`Invalid sync record: more than ${max} ${field}`);
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
    references: [...new Set(strings("references", MAX_NARINFO_REFERENCES))].sort(),
    sigs: [...new Set(strings("sigs", MAX_NARINFO_SIGNATURES))].sort(),
  };
  const deriver = optional("deriver");
  const ca = optional("ca");
  if (deriver !== undefined) record.deriver = deriver;
  if (ca !== undefined) record.ca = ca;
  formatNarInfo(narInfoOfRecord(record)); // checks every field the way a narinfo is checked
  return record;
}

/** Why {@link judgeRecord} refused a record. */
export interface Refusal {
  /** A few words, for logs. */
  reason: string;
  /**
   * True when no honest peer sends such a record: a signature under a trusted key's name
   * that does not verify. False for records that are only not for this segment (unsigned,
   * signed by keys it does not trust, outside its filter).
   */
  hostile: boolean;
}

/** Why a (well-formed) record is refused for a segment, or null when it is accepted. */
export function judgeRecord(
  record: SyncRecord,
  segment: { filter: SegmentFilter; trustedKeys: readonly PublicKey[] },
): Refusal | null {
  if (validSignatureKeys(narInfoOfRecord(record), segment.trustedKeys).length === 0) {
    const trustedNames = new Set(segment.trustedKeys.map((key) => key.name));
    const forged = record.sigs.some((sig) => trustedNames.has(signatureKeyName(sig) ?? ""));
    if (forged) return { reason: "a trusted key's signature does not verify", hostile: true };
    return {
      reason: record.sigs.length === 0 ? "not signed" : "no signature from a trusted key",
      hostile: false,
    };
  }
  if (!matchesFilter(segment.filter, record)) {
    return { reason: `does not pass the ${segment.filter} filter`, hostile: false };
  }
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
