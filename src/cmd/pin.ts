/**
 * `arca pin <store-path>...` and `arca unpin <store-path>...`: pinned paths and their
 * closures are never evicted by `arca gc`. `arca pin` without paths lists the pins.
 * @module
 */

import type { Command } from "commander";
import { Pins } from "../cache/pins.ts";
import { parseStorePath } from "../cache/store_path.ts";
import { NotFoundError } from "../errors.ts";
import { openCache, settingsOf } from "./common.ts";
import { resolveStorePath } from "./import.ts";

/** Registers `pin` and `unpin`. */
export function registerPin(program: Command): void {
  program.command("pin")
    .description(
      "keep cached paths (and their closures) from garbage collection; no paths: list pins",
    )
    .argument("[store-path...]", "cached store paths, or symlinks to them")
    .action(async (paths: string[], _flags: unknown, command: Command) => {
      const settings = await settingsOf(command);
      const cache = await openCache(settings);
      const pins = new Pins(settings.cacheDir);
      try {
        if (paths.length === 0) {
          for (const hashPart of [...await pins.all()].sort()) {
            const record = await cache.getPath(hashPart);
            console.log(record ? record.narInfo.storePath : `${hashPart} (not cached)`);
          }
          return;
        }
        const storePaths = await Promise.all(paths.map(resolveStorePath));
        for (const storePath of storePaths) {
          if ((await cache.getPath(parseStorePath(storePath).hash)) === null) {
            throw new NotFoundError(`Not in the cache, cannot pin: ${storePath}`);
          }
        }
        for (const storePath of storePaths) {
          const added = await pins.add(parseStorePath(storePath).hash);
          console.log(`${added ? "pinned" : "already pinned"} ${storePath}`);
        }
      } finally {
        cache.close();
      }
    });

  program.command("unpin")
    .description("let garbage collection evict paths again")
    .argument("<store-path...>", "pinned store paths")
    .action(async (paths: string[], _flags: unknown, command: Command) => {
      const settings = await settingsOf(command);
      const pins = new Pins(settings.cacheDir);
      for (const storePath of await Promise.all(paths.map(resolveStorePath))) {
        const removed = await pins.remove(parseStorePath(storePath).hash);
        console.log(`${removed ? "unpinned" : "was not pinned:"} ${storePath}`);
      }
    });
}
