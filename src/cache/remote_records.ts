/**
 * Records learned from swarm peers: the signed metadata of store paths this node does not
 * hold (yet), per segment, with the peers that offered them. They are not served over
 * HTTP (their NARs are on the peers). One JSON file per record,
 * `<cacheDir>/remote/<segment>/<hash>.json`, written tmp + rename, the same for both
 * metadata backends, so `arca list --remote` and `arca status` read them while `swarm`
 * runs.
 *
 * A record here has been checked by the swarm before it is stored (well-formed, signed by
 * a key the segment trusts, passing the segment's filter; see src/net/sync_records.ts).
 * @module
 */

import { join } from "node:path";
import { SEGMENT_NAME_RE } from "../config.ts";
import { FormatError } from "../errors.ts";
import { checkHashPart } from "./metadata.ts";
import { parseStorePath } from "./store_path.ts";

/** The part of a narinfo that peers exchange: the signed fields, deriver, CA and signatures. */
export interface SyncRecord {
  storePath: string;
  /** `sha256:<nix32>`. */
  narHash: string;
  narSize: number;
  /** Base names. */
  references: string[];
  deriver?: string;
  ca?: string;
  sigs: string[];
}

/** A record held by peers. */
export interface RemoteRecord extends SyncRecord {
  segment: string;
  /** When it was first received (ms since the epoch). */
  receivedAt: number;
  /** Node ids (hex) of the peers that offered it. */
  peers: string[];
}

function checkSegment(segment: string): void {
  if (!SEGMENT_NAME_RE.test(segment)) throw new FormatError(`Invalid segment name '${segment}'`);
}

/** The remote records of a cache directory. */
export class RemoteRecords {
  #dir: string;

  /** Records kept under `<cacheDir>/remote`. */
  constructor(cacheDir: string) {
    this.#dir = join(cacheDir, "remote");
  }

  #path(segment: string, hashPart: string): string {
    checkSegment(segment);
    checkHashPart(hashPart);
    return join(this.#dir, segment, `${hashPart}.json`);
  }

  /** The record of a path in a segment, or null. */
  async get(segment: string, hashPart: string): Promise<RemoteRecord | null> {
    try {
      return JSON.parse(await Deno.readTextFile(this.#path(segment, hashPart)));
    } catch (error) {
      if (error instanceof Deno.errors.NotFound || error instanceof SyntaxError) return null;
      throw error;
    }
  }

  /** Stores (replaces) a record. */
  async put(record: RemoteRecord): Promise<void> {
    const path = this.#path(record.segment, parseStorePath(record.storePath).hash);
    await Deno.mkdir(join(this.#dir, record.segment), { recursive: true });
    const temp = `${path}.${crypto.randomUUID()}.tmp`;
    await Deno.writeTextFile(temp, JSON.stringify(record));
    await Deno.rename(temp, path);
  }

  /** Removes a record (when the path became local, say); false when there was none. */
  async delete(segment: string, hashPart: string): Promise<boolean> {
    try {
      await Deno.remove(this.#path(segment, hashPart));
      return true;
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) return false;
      throw error;
    }
  }

  /** Every record of a segment (or of all segments), in no particular order. */
  async *list(segment?: string): AsyncGenerator<RemoteRecord> {
    let segments: string[];
    if (segment !== undefined) {
      checkSegment(segment);
      segments = [segment];
    } else {
      try {
        segments = (await Array.fromAsync(Deno.readDir(this.#dir)))
          .filter((entry) => entry.isDirectory && SEGMENT_NAME_RE.test(entry.name))
          .map((entry) => entry.name);
      } catch (error) {
        if (error instanceof Deno.errors.NotFound) return;
        throw error;
      }
    }
    for (const name of segments) {
      let entries: Deno.DirEntry[];
      try {
        entries = await Array.fromAsync(Deno.readDir(join(this.#dir, name)));
      } catch (error) {
        if (error instanceof Deno.errors.NotFound) continue;
        throw error;
      }
      for (const entry of entries) {
        const match = /^([0-9a-df-np-sv-z]{32})\.json$/.exec(entry.name);
        if (!entry.isFile || !match) continue;
        const record = await this.get(name, match[1]);
        if (record) yield record;
      }
    }
  }
}
