/**
 * `arca import <store-path>...`: imports store paths of the local Nix store, each checked
 * against the NAR hash Nix recorded. Paths already cached are skipped.
 * @module
 */

import type { Command } from "commander";
import { importLocalPaths, type ImportOutcome } from "../cache/importer.ts";
import { type LocalPathInfo, queryPathInfo } from "../cache/nix.ts";
import { findSegment, segmentFor } from "../cache/segments.ts";
import type { Settings } from "../config.ts";
import { parseStorePath } from "../cache/store_path.ts";
import { FormatError, UsageError } from "../errors.ts";
import { formatBytes, openCache, settingsOf, signingKeyOf } from "./common.ts";

/** Options of `import` and `import-closure`. */
export interface ImportFlags {
  compression?: string;
  signingKey?: string;
  segment?: string;
}

/**
 * How imported paths choose their segment: `override` (which must be configured), else
 * the first segment whose filter matches the signatures Nix reports.
 */
export function segmentChooser(
  settings: Settings,
  override?: string,
): (info: LocalPathInfo) => string | undefined {
  if (override !== undefined) findSegment(settings.segments, override);
  return (info) => segmentFor(settings.segments, info, override);
}

/** Registers `import`. */
export function registerImport(program: Command): void {
  program.command("import")
    .description("import store paths (not their dependencies) into the cache")
    .argument("<store-path...>", "store paths, or symlinks to them such as ./result")
    .option("--compression <zstd|xz>", "compression of new chunks (default from config: zstd)")
    .option("--signing-key <file>", "secret key file: add its signature to imported paths")
    .option(
      "--segment <name>",
      "put the paths in this segment (default: the first whose filter matches)",
    )
    .action(async (paths: string[], flags: ImportFlags, command: Command) => {
      const settings = await settingsOf(command, flags);
      const segmentOf = segmentChooser(settings, flags.segment);
      const storePaths = await Promise.all(paths.map(resolveStorePath));
      const signingKey = await signingKeyOf(settings);
      const infos = await queryPathInfo(storePaths);
      const cache = await openCache(settings);
      try {
        const outcomes = await importLocalPaths(cache, infos, {
          compression: settings.compression,
          signingKey,
          segmentOf,
        });
        for (const outcome of outcomes) console.log(describeOutcome(outcome));
      } finally {
        cache.close();
      }
    });
}

/** One line about an import outcome. */
export function describeOutcome(outcome: ImportOutcome): string {
  if (outcome.status === "skipped") return `already cached: ${outcome.storePath}`;
  const { result } = outcome;
  return `imported ${outcome.storePath} (${
    formatBytes(result.record.narInfo.narSize)
  } NAR, ${result.chunks} chunks, ${result.newChunks} new, ${
    formatBytes(result.newStoredBytes)
  } stored)`;
}

/**
 * A store path from a command-line argument: the path itself, or what a symlink to a
 * store path (like `./result`) points at. UsageError otherwise.
 */
export async function resolveStorePath(argument: string): Promise<string> {
  let path = argument;
  if (!argument.startsWith("/nix/store/")) {
    try {
      path = await Deno.realPath(argument);
    } catch {
      throw new UsageError(`Not a store path: ${argument}`);
    }
  }
  try {
    return parseStorePath(path).path;
  } catch (error) {
    if (error instanceof FormatError) {
      throw new UsageError(`Not a store path: ${argument}: ${error.message}`);
    }
    throw error;
  }
}
