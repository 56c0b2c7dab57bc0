/**
 * `arca keygen` (a random 256-bit topic key, hex, for the swarm) and
 * `arca sign-keygen --name <name>` (a Nix signing key pair under the config directory).
 * @module
 */

import type { Command } from "commander";
import {
  formatPublicKey,
  formatSecretKey,
  generateSecretKey,
  publicKeyOf,
} from "../cache/signing.ts";
import { ArcaError, FormatError, UsageError } from "../errors.ts";
import { settingsOf } from "./common.ts";

/** Registers `keygen` and `sign-keygen`. */
export function registerKeygen(program: Command): void {
  program.command("keygen")
    .description("print a new random 256-bit topic key (hex) for a swarm segment")
    .action(() => {
      const key = crypto.getRandomValues(new Uint8Array(32));
      console.log(Array.from(key, (b) => b.toString(16).padStart(2, "0")).join(""));
    });

  program.command("sign-keygen")
    .description("create a Nix signing key pair <name>.secret / <name>.pub in the config directory")
    .requiredOption("--name <name>", "key name, e.g. my-cache-1 (it prefixes every signature)")
    .option("--output-dir <dir>", "write the key files here instead of the config directory")
    .action(async (flags: { name: string; outputDir?: string }, command: Command) => {
      const settings = await settingsOf(command);
      let secret;
      try {
        secret = generateSecretKey(flags.name);
      } catch (error) {
        if (error instanceof FormatError) throw new UsageError(error.message);
        throw error;
      }
      if (flags.name.includes("/")) throw new UsageError("Key name must not contain '/'");
      const dir = flags.outputDir ?? settings.configDir;
      await Deno.mkdir(dir, { recursive: true });
      const secretPath = `${dir}/${flags.name}.secret`;
      const publicPath = `${dir}/${flags.name}.pub`;
      const publicLine = formatPublicKey(publicKeyOf(secret));
      try {
        await Deno.writeTextFile(secretPath, formatSecretKey(secret), {
          createNew: true,
          mode: 0o600,
        });
      } catch (error) {
        if (error instanceof Deno.errors.AlreadyExists) {
          throw new ArcaError(
            "exists",
            `Key file already exists, not overwriting it: ${secretPath}`,
          );
        }
        throw error;
      }
      await Deno.chmod(secretPath, 0o600);
      await Deno.writeTextFile(publicPath, publicLine + "\n");
      console.error(`Wrote ${secretPath} (secret, mode 0600) and ${publicPath}`);
      console.error("Add this line to nix.conf on machines that use the cache:");
      console.log(`extra-trusted-public-keys = ${publicLine}`);
    });
}
