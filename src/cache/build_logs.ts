/**
 * Build logs, as Nix uploads them with `nix store copy-log --to http://…` (`PUT
 * /log/<drv base name>`) and reads them with `nix log --store http://…` (`GET
 * /log/<drv base name>`). One file per derivation under `<cacheDir>/logs/`, written tmp +
 * rename; a `Content-Encoding` the client declared (Nix compresses logs per
 * `log-compression`) is kept beside it in `<name>.encoding` and sent back as it came.
 * @module
 */

import { join } from "node:path";
import { FormatError, IntegrityError } from "../errors.ts";
import { parseStorePathBaseName } from "./store_path.ts";

/** Largest log accepted. */
export const MAX_LOG_BYTES = 64 * 1024 * 1024;

const ENCODING_RE = /^[a-z0-9-]{1,20}$/;

/** Checks a log name: the base name of a derivation (`<hash>-<name>.drv`). */
export function checkLogName(name: string): void {
  parseStorePathBaseName(name);
  if (!name.endsWith(".drv")) {
    throw new FormatError(`Invalid log name '${name}': expected a derivation (….drv)`);
  }
}

/** The build logs of a cache. */
export class BuildLogs {
  #dir: string;

  /** Logs kept in `<cacheDir>/logs`. */
  constructor(cacheDir: string) {
    this.#dir = join(cacheDir, "logs");
  }

  /** Stores a log from a stream (at most {@link MAX_LOG_BYTES}), replacing an older one. */
  async put(name: string, body: ReadableStream<Uint8Array>, encoding?: string): Promise<number> {
    checkLogName(name);
    if (encoding !== undefined && !ENCODING_RE.test(encoding)) {
      throw new FormatError(`Invalid content encoding '${encoding.slice(0, 40)}'`);
    }
    await Deno.mkdir(this.#dir, { recursive: true });
    const temp = join(this.#dir, `.${name}.${crypto.randomUUID()}.tmp`);
    const file = await Deno.open(temp, { write: true, createNew: true, mode: 0o644 });
    let size = 0;
    try {
      try {
        for await (const piece of body) {
          size += piece.length;
          if (size > MAX_LOG_BYTES) {
            throw new IntegrityError(`Log is larger than ${MAX_LOG_BYTES} bytes`);
          }
          let written = 0;
          while (written < piece.length) written += await file.write(piece.subarray(written));
        }
        await file.sync();
      } finally {
        file.close();
      }
      const encodingPath = join(this.#dir, `${name}.encoding`);
      if (encoding === undefined || encoding === "identity") {
        await Deno.remove(encodingPath).catch(() => {});
      } else {
        await Deno.writeTextFile(encodingPath, encoding);
      }
      await Deno.rename(temp, join(this.#dir, name));
    } catch (error) {
      await Deno.remove(temp).catch(() => {});
      throw error;
    }
    return size;
  }

  /** Opens a log: its file and declared encoding, or null when there is none. */
  async open(name: string): Promise<{ file: Deno.FsFile; size: number; encoding?: string } | null> {
    checkLogName(name);
    const path = join(this.#dir, name);
    let file: Deno.FsFile;
    try {
      const info = await Deno.lstat(path);
      if (!info.isFile) return null;
      file = await Deno.open(path, { read: true });
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) return null;
      throw error;
    }
    const size = (await file.stat()).size;
    const encoding = await Deno.readTextFile(join(this.#dir, `${name}.encoding`))
      .then((text) => text.trim())
      .catch(() => undefined);
    return { file, size, encoding };
  }
}
