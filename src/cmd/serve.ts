/**
 * `arca serve`: the HTTP substituter on `--bind` (default 127.0.0.1:5555) until SIGINT or
 * SIGTERM.
 * @module
 */

import type { Command } from "commander";
import { parseBindAddress } from "../config.ts";
import { createHandler } from "../net/server.ts";
import { type GlobalOptions, openCache, settingsOf, signingKeyOf } from "./common.ts";

/** Registers `serve`. */
export function registerServe(program: Command): void {
  program.command("serve")
    .description("serve the cache to Nix as an HTTP binary cache (substituter)")
    .option("--bind <host:port>", "listen address (default from config: 127.0.0.1:5555)")
    .option("--priority <n>", "Priority in /nix-cache-info; lower is preferred (default 30)")
    .option("--signing-key <file>", "sign served narinfos that lack a signature from this key")
    .action(
      async (
        flags: { bind?: string; priority?: string; signingKey?: string },
        command: Command,
      ) => {
        const settings = await settingsOf(command, flags);
        const verbose = (command.optsWithGlobals() as GlobalOptions).verbose === true;
        const signingKey = await signingKeyOf(settings);
        const { hostname, port } = parseBindAddress(settings.bind);
        const cache = await openCache(settings);
        const handler = createHandler(cache, {
          priority: settings.priority,
          signingKey,
          log: (message) => console.error(message),
          logRequests: verbose,
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
          Deno.removeSignalListener("SIGINT", stop);
          Deno.removeSignalListener("SIGTERM", stop);
          cache.close();
        }
      },
    );
}
