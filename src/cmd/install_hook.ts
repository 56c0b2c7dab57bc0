/**
 * `arca install-hook [--prefix <dir>] [--spool-dir <dir>]`: installs the post-build hook
 * that hands every path Nix builds to arca. It writes `<prefix>/etc/nix/post-build-hook`
 * (mode 0755; the script of src/cache/spool.ts, which spools the built paths into
 * `<spool-dir>`, default `<cache-dir>/spool`), adds `post-build-hook = <that file>` to
 * `<prefix>/etc/nix/nix.conf`, and creates the spool directory. Idempotent: a second run
 * changes nothing. It refuses (exit 1) to replace a different `post-build-hook` setting or
 * a hook file it did not write.
 *
 * Speaks nix.conf as Nix 2.8 reads it: `name = value` lines, split on whitespace, with
 * everything from a `#` on a comment; a setting given twice takes the last value.
 * @module
 */

import type { Command } from "commander";
import { dirname, join, resolve } from "node:path";
import { ensureSpoolDir, HOOK_MARKER, postBuildHookScript } from "../cache/spool.ts";
import { ArcaError, FormatError, UsageError } from "../errors.ts";
import { settingsOf } from "./common.ts";

/** The nix.conf setting the hook is installed under. */
export const HOOK_SETTING = "post-build-hook";

/** Registers `install-hook`. */
export function registerInstallHook(program: Command): void {
  program.command("install-hook")
    .description("install the Nix post-build hook that spools built paths for arca to import")
    .option("--prefix <dir>", "write <dir>/etc/nix/post-build-hook and <dir>/etc/nix/nix.conf", "/")
    .option("--spool-dir <dir>", "where the hook spools built paths (default <cache-dir>/spool)")
    .action(async (flags: { prefix: string; spoolDir?: string }, command: Command) => {
      const settings = await settingsOf(command);
      const lines = await installHook(resolve(flags.prefix), {
        spoolDir: resolve(flags.spoolDir ?? join(settings.cacheDir, "spool")),
      });
      for (const line of lines) console.log(line);
    });
}

/**
 * Installs the hook under `prefix` (an absolute path) for the given spool directory;
 * returns what it did, one line each. ArcaError (code `conflict`, exit 1) when nix.conf
 * already sets another post-build hook, when nix.conf is a symlink (as NixOS makes it), or
 * when the hook file exists and was not written by arca; nothing is written then.
 */
export async function installHook(
  prefix: string,
  options: { spoolDir: string },
): Promise<string[]> {
  const etc = join(prefix, "etc", "nix");
  const hookPath = join(etc, "post-build-hook");
  const confPath = join(etc, "nix.conf");
  // deno-lint-ignore no-control-regex
  if (/[\s#\x00-\x1f\x7f]/.test(hookPath)) {
    throw new UsageError(
      `Invalid --prefix '${prefix}': nix.conf cannot name a hook path with whitespace or '#'`,
    );
  }
  let script: string;
  try {
    script = postBuildHookScript(options.spoolDir);
  } catch (error) {
    if (error instanceof FormatError) throw new UsageError(error.message);
    throw error;
  }

  // Check everything before writing anything.
  const conf = await readIfPresent(confPath);
  if (conf !== null && (await Deno.lstat(confPath)).isSymlink) {
    throw conflict(
      `Cannot edit ${confPath}: it is a symlink (on NixOS, set nix.settings.${HOOK_SETTING} = "${hookPath}" instead)`,
    );
  }
  const current = conf === null ? [] : hookSettings(conf);
  const other = current.find((value) => value !== hookPath);
  if (other !== undefined) {
    throw conflict(
      `${confPath} already sets ${HOOK_SETTING} = ${other}: not replacing it (remove that line, or chain the hooks yourself)`,
    );
  }
  const oldScript = await readIfPresent(hookPath);
  if (oldScript !== null && !oldScript.includes(HOOK_MARKER)) {
    throw conflict(`${hookPath} exists and was not written by arca: not replacing it`);
  }

  const done: string[] = [];
  if (await ensureSpoolDir(options.spoolDir)) {
    done.push(`Created the spool directory ${options.spoolDir} (mode 0755)`);
  }
  await Deno.mkdir(etc, { recursive: true });
  const hookMode = oldScript === null ? null : (await Deno.stat(hookPath)).mode! & 0o7777;
  if (oldScript === script && hookMode === 0o755) {
    done.push(`Unchanged: ${hookPath}`);
  } else {
    await writeAtomically(hookPath, script, 0o755);
    done.push(
      `${
        oldScript === null ? "Wrote" : "Updated"
      } ${hookPath} (mode 0755): it spools built paths to ${options.spoolDir}`,
    );
  }
  const line = `${HOOK_SETTING} = ${hookPath}`;
  if (current.length > 0) {
    done.push(`Unchanged: ${confPath} already has ${line}`);
  } else {
    const mode = conf === null ? 0o644 : (await Deno.stat(confPath)).mode! & 0o7777;
    const before = conf === null || conf === "" || conf.endsWith("\n") ? conf ?? "" : conf + "\n";
    await writeAtomically(confPath, `${before}${line}\n`, mode);
    done.push(`${conf === null ? "Created" : "Added to"} ${confPath}: ${line}`);
    done.push(
      "Restart nix-daemon (if one runs) so that it reads nix.conf; `arca serve` imports the spooled paths",
    );
  }
  return done;
}

/** The values of every `post-build-hook` setting in nix.conf text, in order. */
export function hookSettings(text: string): string[] {
  const values: string[] = [];
  for (const raw of text.split("\n")) {
    const hash = raw.indexOf("#");
    const tokens = (hash === -1 ? raw : raw.slice(0, hash)).split(/[ \t\r]+/).filter(Boolean);
    if (tokens[0] === HOOK_SETTING && tokens[1] === "=") values.push(tokens.slice(2).join(" "));
  }
  return values;
}

function conflict(message: string): ArcaError {
  return new ArcaError("conflict", message);
}

async function readIfPresent(path: string): Promise<string | null> {
  try {
    return await Deno.readTextFile(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return null;
    throw error;
  }
}

/** Writes `<path>` durably via a temporary file in the same directory and a rename. */
async function writeAtomically(path: string, text: string, mode: number): Promise<void> {
  const tmp = join(dirname(path), `.${crypto.randomUUID()}.tmp`);
  try {
    const file = await Deno.open(tmp, { write: true, createNew: true, mode });
    try {
      const bytes = new TextEncoder().encode(text);
      for (let done = 0; done < bytes.length;) done += await file.write(bytes.subarray(done));
      await file.syncData();
    } finally {
      file.close();
    }
    await Deno.chmod(tmp, mode);
    await Deno.rename(tmp, path);
  } catch (error) {
    await Deno.remove(tmp).catch(() => {});
    throw error;
  }
}
