/**
 * `arca import-closure <installable>`: imports the whole runtime closure of a store path
 * (or anything `nix path-info` accepts), dependencies first, skipping cached paths.
 * @module
 */

import type { Command } from "commander";
import { importLocalPaths } from "../cache/importer.ts";
import { queryClosure } from "../cache/nix.ts";
import { openCache, settingsOf, signingKeyOf } from "./common.ts";
import { describeOutcome, type ImportFlags, segmentChooser } from "./import.ts";

/** Registers `import-closure`. */
export function registerImportClosure(program: Command): void {
  program.command("import-closure")
    .description("import the runtime closure of a store path or installable, dependencies first")
    .argument("<installable>", "a store path, a symlink to one (./result) or a Nix installable")
    .option("--compression <zstd|xz>", "compression of new chunks (default from config: zstd)")
    .option("--signing-key <file>", "secret key file: add its signature to imported paths")
    .option(
      "--segment <name>",
      "put the paths in this segment (default: the first whose filter matches)",
    )
    .action(async (installable: string, flags: ImportFlags, command: Command) => {
      const settings = await settingsOf(command, flags);
      const segmentOf = segmentChooser(settings, flags.segment);
      const signingKey = await signingKeyOf(settings);
      const closure = await queryClosure(installable);
      const cache = await openCache(settings);
      const onTerminal = Deno.stderr.isTerminal();
      const encoder = new TextEncoder();
      try {
        const outcomes = await importLocalPaths(cache, closure, {
          compression: settings.compression,
          signingKey,
          segmentOf,
          onProgress: onTerminal
            ? (index, total, path) =>
              Deno.stderr.writeSync(
                encoder.encode(`\r\x1b[K[${index + 1}/${total}] ${path.slice(0, 100)}`),
              )
            : undefined,
        });
        if (onTerminal) Deno.stderr.writeSync(encoder.encode("\r\x1b[K"));
        for (const outcome of outcomes) console.log(describeOutcome(outcome));
        const imported = outcomes.filter((o) => o.status === "imported").length;
        console.log(`${imported} imported, ${outcomes.length - imported} already cached`);
      } finally {
        cache.close();
      }
    });
}
