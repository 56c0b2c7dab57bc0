/**
 * `arca serve`: the HTTP substituter on `--bind` (default 127.0.0.1:5555) until SIGINT or
 * SIGTERM.
 * @module
 */

import type { Command } from "commander";
import { parseBindAddress } from "../config.ts";
import { join } from "node:path";
import { startSpoolDrainer } from "../cache/spool.ts";
import { readTokenFile } from "../net/auth.ts";
import { segmentChooser } from "./import.ts";
import { createHandler } from "../net/server.ts";
import { type GlobalOptions, openCache, settingsOf, signingKeyOf } from "./common.ts";

/** Registers `serve`. */
export function registerServe(program: Command): void {
  program.command("serve")
    .description("serve the cache to Nix as an HTTP binary cache (substituter)")
    .option("--bind <host:port>", "listen address (default from config: 127.0.0.1:5555)")
    .option("--priority <n>", "Priority in /nix-cache-info; lower is preferred (default 30)")
    .option(
      "--signing-key <file>",
      "sign served narinfos lacking this key's signature, and uploaded paths",
    )
    .option("--upload-token-file <file>", "accept uploads (nix copy --to) carrying this token")
    .option("--read-token-file <file>", "require this token (or the upload token) for reads")
    .action(
      async (
        flags: {
          bind?: string;
          priority?: string;
          signingKey?: string;
          uploadTokenFile?: string;
          readTokenFile?: string;
        },
        command: Command,
      ) => {
        const settings = await settingsOf(command, flags);
        const verbose = (command.optsWithGlobals() as GlobalOptions).verbose === true;
        const signingKey = await signingKeyOf(settings);
        const { hostname, port } = parseBindAddress(settings.bind);
        const uploadToken = settings.uploadTokenFile === undefined
          ? undefined
          : await readTokenFile(settings.uploadTokenFile);
        const readToken = settings.readTokenFile === undefined
          ? undefined
          : await readTokenFile(settings.readTokenFile);
        const cache = await openCache(settings);
        // Paths the post-build hook spooled (arca install-hook) are imported as they come.
        const drainer = startSpoolDrainer(cache, join(settings.cacheDir, "spool"), {
          compression: settings.compression,
          signingKey,
          segmentOf: segmentChooser(settings),
          log: (message) => console.error(message),
        });
        const handler = createHandler(cache, {
          priority: settings.priority,
          signingKey,
          log: (message) => console.error(message),
          logRequests: verbose,
          readToken,
          upload: uploadToken === undefined ? undefined : {
            token: uploadToken,
            compression: settings.compression,
            segments: settings.segments,
          },
        });
        const server = Deno.serve({
          hostname,
          port,
          onListen: (address) => {
            const host = address.hostname.includes(":")
              ? `[${address.hostname}]`
              : address.hostname;
            console.log(`Serving ${settings.cacheDir} on http://${host}:${address.port}`);
          },
        }, handler);
        const stop = () => server.shutdown();
        Deno.addSignalListener("SIGINT", stop);
        Deno.addSignalListener("SIGTERM", stop);
        try {
          await server.finished;
        } finally {
          await handler.close();
          await drainer.stop();
          Deno.removeSignalListener("SIGINT", stop);
          Deno.removeSignalListener("SIGTERM", stop);
          cache.close();
        }
      },
    );
}
