/**
 * When each cached path was last used (imported, uploaded or served), for least-recently-
 * used garbage collection. One empty file per path, `<cacheDir>/access/<hash>`, whose mtime
 * is the time: touching is one `utime` call, safe from any number of processes, and the
 * same for both metadata backends. A path without a file was last used when it was
 * registered.
 * @module
 */

import { join } from "node:path";
import { checkHashPart } from "./metadata.ts";
import { isValidHashPart } from "./store_path.ts";

/** Last-use times of cached paths. */
export class AccessTimes {
  #dir: string;

  /** Times kept under `<cacheDir>/access`. */
  constructor(cacheDir: string) {
    this.#dir = join(cacheDir, "access");
  }

  /** Records that these paths were used at `time` (ms since the epoch). */
  async touch(hashParts: Iterable<string>, time: number = Date.now()): Promise<void> {
    const date = new Date(time);
    for (const hashPart of hashParts) {
      checkHashPart(hashPart);
      const path = join(this.#dir, hashPart);
      try {
        await Deno.utime(path, date, date);
      } catch (error) {
        if (!(error instanceof Deno.errors.NotFound)) throw error;
        await Deno.mkdir(this.#dir, { recursive: true });
        await Deno.writeFile(path, new Uint8Array(0));
        await Deno.utime(path, date, date);
      }
    }
  }

  /** Every recorded time, by hash part. */
  async all(): Promise<Map<string, number>> {
    const times = new Map<string, number>();
    try {
      for await (const entry of Deno.readDir(this.#dir)) {
        if (!entry.isFile || !isValidHashPart(entry.name)) continue;
        try {
          const info = await Deno.lstat(join(this.#dir, entry.name));
          if (info.mtime) times.set(entry.name, info.mtime.getTime());
        } catch (error) {
          if (!(error instanceof Deno.errors.NotFound)) throw error;
        }
      }
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
    }
    return times;
  }

  /** Forgets a path's time (when the path is removed). */
  async remove(hashPart: string): Promise<void> {
    checkHashPart(hashPart);
    try {
      await Deno.remove(join(this.#dir, hashPart));
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
    }
  }
}
