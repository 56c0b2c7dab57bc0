/**
 * Which path a passed-through or uploaded file's URL (`nar/<nix32 FileHash>.nar.zst|.xz`)
 * belongs to, kept on disk (`<cacheDir>/nar-aliases/<nix32 FileHash>` holds the hash part)
 * so that the URL outlives a restart and the path's import: Nix keeps narinfos for weeks.
 * @module
 */

import { isNixBase32 } from "../cache/nixbase32.ts";
import { BoundedCache } from "../cache/metadata.ts";
import { isValidHashPart } from "../cache/store_path.ts";

/**
 * Which path a passed-through file's URL (`nar/<nix32 FileHash>.nar.zst|.xz`) belongs to, kept
 * on disk (`<cacheDir>/nar-aliases/<nix32 FileHash>` holds the hash part) so that the URL
 * outlives a restart: Nix keeps narinfos for weeks. One small file per file NAR served;
 * an alias whose path is gone leads to a 404.
 */
export class NarAliases {
  #dir: string;
  #known = new BoundedCache<string, true>({ maxEntries: 65536, maxWeight: 65536 });

  constructor(cacheDir: string) {
    this.#dir = `${cacheDir}/nar-aliases`;
  }

  /** Records that file `nix32` is path `hashPart`'s (best effort). */
  async remember(nix32: string, hashPart: string): Promise<void> {
    if (this.#known.get(nix32) !== undefined) return;
    try {
      await Deno.mkdir(this.#dir, { recursive: true });
      const path = `${this.#dir}/${nix32}`;
      const temporary = `${path}.${crypto.randomUUID()}.tmp`;
      await Deno.writeTextFile(temporary, hashPart);
      await Deno.rename(temporary, path);
      this.#known.set(nix32, true);
    } catch { /* an alias is a convenience: the URL works while this process runs */ }
  }

  /** The hash part file `nix32` belongs to, or null. */
  async get(nix32: string): Promise<string | null> {
    if (!isNixBase32(nix32, 32)) return null;
    try {
      const hashPart = (await Deno.readTextFile(`${this.#dir}/${nix32}`)).trim();
      return isValidHashPart(hashPart) ? hashPart : null;
    } catch {
      return null;
    }
  }
}
