/**
 * The `arca` entry point: builds the command line, runs one command, and turns errors into
 * messages and exit codes (0 ok, 1 failure, 2 usage). Users see a stack trace only with
 * `--verbose`.
 * @module
 */

import { Command, CommanderError } from "commander";
import { ArcaError } from "./src/errors.ts";
import { VERSION } from "./src/version.ts";
import { registerImport } from "./src/cmd/import.ts";
import { registerImportClosure } from "./src/cmd/import_closure.ts";
import { registerInstallHook } from "./src/cmd/install_hook.ts";
import { registerKeygen } from "./src/cmd/keygen.ts";
import { registerList } from "./src/cmd/list.ts";
import { registerServe } from "./src/cmd/serve.ts";
import { registerStatus } from "./src/cmd/status.ts";
import { registerGc } from "./src/cmd/gc.ts";
import { registerAudit } from "./src/cmd/audit.ts";
import { registerSwarm } from "./src/cmd/swarm.ts";
import { registerPin } from "./src/cmd/pin.ts";
import { registerVerify } from "./src/cmd/verify.ts";

/** Builds the `arca` program with every finished subcommand registered. */
export function buildProgram(): Command {
  const program = new Command("arca")
    .description("pares-arca: a peer-to-peer Nix binary cache")
    .version(VERSION, "--version", "print the version")
    .option(
      "--cache-dir <path>",
      "cache directory (env PARES_ARCA_DIR; default $XDG_CACHE_HOME/pares-arca)",
    )
    .option("--backend <kv|filesystem>", "metadata backend (default kv)")
    .option("--config <file>", "config file (default $XDG_CONFIG_HOME/pares-arca/config.toml)")
    .option("--verbose", "log requests and show stack traces on errors")
    .showHelpAfterError("(run with --help for usage)")
    .exitOverride();
  registerServe(program);
  registerImport(program);
  registerImportClosure(program);
  registerList(program);
  registerStatus(program);
  registerKeygen(program);
  registerGc(program);
  registerAudit(program);
  registerSwarm(program);
  registerPin(program);
  registerVerify(program);
  registerInstallHook(program);
  return program;
}

/** Runs arca with the given arguments; returns the exit code. */
export async function main(args: string[]): Promise<number> {
  const program = buildProgram();
  if (args.length === 0) {
    program.outputHelp({ error: true });
    return 2;
  }
  try {
    await program.parseAsync(args, { from: "user" });
    return 0;
  } catch (error) {
    if (error instanceof CommanderError) {
      // Commander has already printed its message (or the help/version).
      const ok = ["commander.helpDisplayed", "commander.version", "commander.help"];
      return ok.includes(error.code) && error.exitCode === 0 ? 0 : 2;
    }
    const verbose = args.includes("--verbose");
    if (error instanceof ArcaError) {
      console.error(`arca: ${error.message}`);
      if (verbose) console.error(error.stack);
      return error.exitCode;
    }
    if (error instanceof Deno.errors.PermissionDenied) {
      console.error(`arca: Permission denied: ${error.message}`);
    } else {
      console.error(`arca: ${error instanceof Error ? error.message : String(error)}`);
    }
    if (verbose && error instanceof Error) console.error(error.stack);
    return 1;
  }
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
