/**
 * Pinned paths: `arca pin` marks a cached path so that garbage collection never evicts it
 * or anything in its closure. One empty file per pin, `<cacheDir>/pins/<hash>`, the same
 * for both metadata backends.
 * @module
 */

import { join } from "node:path";
import { checkHashPart } from "./metadata.ts";
import { isValidHashPart } from "./store_path.ts";

/** The pins of a cache directory. */
export class Pins {
  #dir: string;

  /** Pins kept in `<cacheDir>/pins`. */
  constructor(cacheDir: string) {
    this.#dir = join(cacheDir, "pins");
  }

  /** Pins a path (by hash part); false when it was pinned already. */
  async add(hashPart: string): Promise<boolean> {
    checkHashPart(hashPart);
    await Deno.mkdir(this.#dir, { recursive: true });
    try {
      await Deno.writeFile(join(this.#dir, hashPart), new Uint8Array(0), { createNew: true });
      return true;
    } catch (error) {
      if (error instanceof Deno.errors.AlreadyExists) return false;
      throw error;
    }
  }

  /** Unpins a path; false when it was not pinned. */
  async remove(hashPart: string): Promise<boolean> {
    checkHashPart(hashPart);
    try {
      await Deno.remove(join(this.#dir, hashPart));
      return true;
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) return false;
      throw error;
    }
  }

  /** Every pinned hash part. */
  async all(): Promise<Set<string>> {
    const pins = new Set<string>();
    try {
      for await (const entry of Deno.readDir(this.#dir)) {
        if (entry.isFile && isValidHashPart(entry.name)) pins.add(entry.name);
      }
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
    }
    return pins;
  }
}
