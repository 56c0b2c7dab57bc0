/**
 * The post-build spool: how built paths get from Nix's post-build hook into the cache
 * without ever slowing or failing a build, even while arca is stopped.
 *
 * This module owns both ends of the spool directory:
 * - the writer, {@link postBuildHookScript}: a POSIX `sh` script Nix runs (as root, once per
 *   built derivation, synchronously) with `DRV_PATH` and `OUT_PATHS` set. It writes the
 *   output paths, one a line, to `<spool>/.tmp.<random>`, then renames that file to
 *   `<spool>/<unix seconds>-<pid>-<random>.paths`, so a reader never sees a partial file.
 *   Nix 2.8 leaves `OUT_PATHS` empty (NixOS/nix#6446); the script then asks
 *   `nix-store -q --outputs "$DRV_PATH"`. It takes no lock, uses no network and exits 0
 *   whatever happens (a failing hook fails the build): a path it could not spool is only
 *   missing from the cache, never a broken build.
 * - the reader, {@link drainSpool} / {@link startSpoolDrainer}: imports each spooled path
 *   and its runtime closure (dependencies first, cached paths skipped) and deletes a spool
 *   file once each of its paths is imported or definitively unimportable. A transient
 *   failure (disk full, `nix` failing) keeps the file for the next round.
 *
 * Spool file format: UTF-8 text, one absolute store path a line; blank lines and lines
 * starting with `#` are ignored; any other line that is not a store path is logged and
 * skipped. Files whose names start with `.` (`.tmp.*`: being written) are not read.
 *
 * Permissions. The hook runs as root; the arca service may run as another user. The spool
 * directory is mode 0755 and owned by the service's user (it is `<cache-dir>/spool`, and
 * `arca install-hook`, the drainer and the hook all create it owned like its parent, the
 * cache directory). Root writes into it regardless of its mode, so it need not be
 * world-writable (a world-writable spool would let any local user queue imports, and a
 * sticky one would stop the service from deleting root's files). Spool files are mode 0644
 * and owned by root; the service deletes them because deleting needs write permission on
 * the directory, not on the file.
 * @module
 */

import { join } from "node:path";
import { FormatError, IntegrityError, NotFoundError } from "../errors.ts";
import type { Cache } from "./cache.ts";
import type { ChunkCompression } from "./compression.ts";
import { importLocalPaths } from "./importer.ts";
import { type LocalPathInfo, queryClosure, sortDependenciesFirst } from "./nix.ts";
import type { SecretKey } from "./signing.ts";
import { parseStorePath } from "./store_path.ts";

/** Suffix of a complete spool file. */
export const SPOOL_FILE_SUFFIX = ".paths";

/** Prefix of a spool file being written (never read by the drainer). */
export const SPOOL_TMP_PREFIX = ".tmp.";

/** The line every hook script written by {@link postBuildHookScript} carries. */
export const HOOK_MARKER = "# pares-arca post-build hook";

/** Default pause between two drains of {@link startSpoolDrainer}, in milliseconds. */
export const DEFAULT_DRAIN_INTERVAL_MS = 2000;

/** Default age after which a `.tmp.*` file is a left-over of a killed hook, in milliseconds. */
export const DEFAULT_STALE_TMP_MS = 60 * 60 * 1000;

/** At most this many "ignoring line" messages per spool file; then one summary. */
const MAX_LINE_MESSAGES = 5;

/** `'text'` for sh, with embedded single quotes escaped. */
function shellQuote(text: string): string {
  return `'${text.replaceAll("'", `'\\''`)}'`;
}

/**
 * The post-build hook script (POSIX sh) that spools built paths into `spoolDir`. See the
 * module comment for what it does. FormatError unless `spoolDir` is an absolute path
 * without control characters.
 */
export function postBuildHookScript(spoolDir: string): string {
  // deno-lint-ignore no-control-regex
  if (!spoolDir.startsWith("/") || /[\x00-\x1f\x7f]/.test(spoolDir)) {
    throw new FormatError(
      `Invalid spool directory '${spoolDir}': must be an absolute path without control characters`,
    );
  }
  const spool = spoolDir.length > 1 ? spoolDir.replace(/\/+$/, "") : spoolDir;
  return `#!/bin/sh
${HOOK_MARKER}, written by \`arca install-hook\` (run it again to update this file).
#
# Nix runs this as root after each build, with DRV_PATH and OUT_PATHS set. It writes the
# built output paths, one a line, to a new file in the spool directory below; arca imports
# them from there (its serve command drains the spool) and deletes the file. It takes no
# lock and uses no network, and it exits 0 whatever happens: a failing post-build hook
# would fail the build, and a path it cannot spool is only missing from the cache.
spool=${shellQuote(spool)}

arca_spool() {
  set -f
  umask 022
  PATH="\${PATH:+$PATH:}/run/current-system/sw/bin:/nix/var/nix/profiles/default/bin:/usr/local/bin:/usr/bin:/bin"
  export PATH
  paths=\${OUT_PATHS:-}
  if [ -z "$paths" ]; then
    # Nix 2.8 leaves OUT_PATHS empty (NixOS/nix#6446): ask the store.
    [ -n "\${DRV_PATH:-}" ] || return 0
    if command -v timeout >/dev/null 2>&1; then
      paths=$(timeout 5 nix-store -q --outputs "$DRV_PATH") || return 1
    else
      paths=$(nix-store -q --outputs "$DRV_PATH") || return 1
    fi
    [ -n "$paths" ] || return 0
  fi
  if [ ! -d "$spool" ]; then
    # Recreate a removed spool directory, owned like its parent (arca's cache directory),
    # so that the arca service may delete the files it has imported.
    mkdir -m 0755 "$spool" || return 1
    set -- $(ls -ldn "\${spool%/*}/")
    chown "$3:$4" "$spool" 2>/dev/null
  fi
  tmp=$(mktemp "$spool/${SPOOL_TMP_PREFIX}XXXXXXXXXX") || return 1
  if { for p in $paths; do printf '%s\\n' "$p"; done; } >"$tmp" && chmod 0644 "$tmp" &&
    mv -f "$tmp" "$spool/$(date +%s)-$$-\${tmp##*/${SPOOL_TMP_PREFIX}}${SPOOL_FILE_SUFFIX}"; then
    return 0
  fi
  rm -f "$tmp"
  return 1
}

if ! arca_spool </dev/null >/dev/null 2>&1; then
  echo "arca post-build hook: cannot spool the outputs of \${DRV_PATH:-?} to $spool" >&2 || :
fi
exit 0
`;
}

/** Options of {@link drainSpool}. */
export interface DrainSpoolOptions {
  /** Compression of new chunks. */
  compression: ChunkCompression;
  /** Adds this key's signature to imported paths. */
  signingKey?: SecretKey;
  /** The segment a path goes to (passed to the importer; undefined: none). */
  segmentOf?: (info: LocalPathInfo) => string | undefined;
  /** Where progress and problems go, one line each (nothing is logged by default). */
  log?: (message: string) => void;
  /** Stops the drain between two paths; unfinished spool files are kept. */
  signal?: AbortSignal;
  /**
   * `.tmp.*` files older than this (milliseconds) are left-overs of a killed hook and are
   * deleted (default one hour).
   */
  staleTmpMs?: number;
  /**
   * Asks for the runtime closure of a spooled path (default: the local `nix`, {@link queryClosure}).
   * Tests inject failures here: the process environment (PATH) is shared by parallel tests.
   */
  queryClosure?: (installable: string) => Promise<LocalPathInfo[]>;
}

/** What one {@link drainSpool} did. */
export interface DrainSpoolResult {
  /** Paths stored in the cache: spooled paths and the dependencies they needed. */
  imported: number;
  /**
   * Failures: each path dropped after an integrity error (with each path depending on it),
   * plus one when a transient error (the cache or `nix` failing) stopped the round.
   */
  failed: number;
  /** Spooled lines dropped: not a store path, or no longer in the Nix store. */
  skipped: number;
  /** Spool files done with and deleted. */
  removedFiles: number;
  /** Spool files kept for the next round (transient failure, or the drain was stopped). */
  keptFiles: number;
}

/** Thrown through the importer's progress callback when the drain is stopped. */
class DrainAborted extends Error {}

/** The per-round state of a store path: handled for good, one way or the other. */
type PathState = "done" | "gone" | "failed";

/**
 * Imports what the post-build hook spooled in `spoolDir`: every `*.paths` file, oldest
 * first. Each valid path that is not cached and still in the Nix store is imported with
 * its runtime closure (dependencies first; cached paths skipped). A file is deleted once
 * each of its paths is imported, already cached, gone from the Nix store, not a store path,
 * or failed an integrity check; after a transient failure (the cache or `nix` failing) the
 * round stops and the remaining files are kept. A missing spool directory is an empty one.
 */
export async function drainSpool(
  cache: Cache,
  spoolDir: string,
  options: DrainSpoolOptions,
): Promise<DrainSpoolResult> {
  const drain = new SpoolDrain(cache, options);
  const names = await listSpoolFiles(
    spoolDir,
    options.staleTmpMs ?? DEFAULT_STALE_TMP_MS,
    drain.log,
  );
  const result = drain.result;
  let halted = false;
  for (const name of names) {
    if (halted || options.signal?.aborted) {
      result.keptFiles++;
      continue;
    }
    const file = join(spoolDir, name);
    let text: string;
    try {
      text = await Deno.readTextFile(file);
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) continue; // drained by someone else
      drain.log(`Cannot read spool file ${file}: ${messageOf(error)}`);
      result.keptFiles++;
      continue;
    }
    try {
      await drain.drainPaths(parseSpoolFile(text, file, drain), file);
    } catch (error) {
      if (!(error instanceof DrainAborted)) {
        drain.log(`Spool file ${file} kept for the next round: ${messageOf(error)}`);
        result.failed++;
      }
      halted = true;
      result.keptFiles++;
      continue;
    }
    try {
      await Deno.remove(file);
      result.removedFiles++;
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) continue;
      drain.log(`Cannot delete spool file ${file}: ${messageOf(error)}`);
      result.keptFiles++;
    }
  }
  return result;
}

/** One drain round: the path states and counters it accumulates. */
class SpoolDrain {
  readonly result: DrainSpoolResult = {
    imported: 0,
    failed: 0,
    skipped: 0,
    removedFiles: 0,
    keptFiles: 0,
  };
  readonly log: (message: string) => void;
  #cache: Cache;
  #options: DrainSpoolOptions;
  #states = new Map<string, PathState>();

  constructor(cache: Cache, options: DrainSpoolOptions) {
    this.#cache = cache;
    this.#options = options;
    this.log = options.log ?? (() => {});
  }

  /**
   * Imports the given store paths with their closures; returns once every path is handled
   * for good, throws on a transient failure (or DrainAborted).
   */
  async drainPaths(paths: string[], file: string): Promise<void> {
    const pending: string[] = [];
    for (const path of paths) {
      if (this.#states.has(path)) continue;
      if (await this.#isCached(path)) {
        this.#states.set(path, "done");
      } else if (!(await existsOnDisk(path))) {
        // Checked before asking nix: for a path it does not have, nix asks its substituters.
        this.#gone(path, file);
      } else {
        pending.push(path);
      }
    }
    const closure = new Map<string, LocalPathInfo>();
    for (const path of pending) {
      this.#checkAborted();
      if (closure.has(path)) continue;
      try {
        const query = this.#options.queryClosure ?? queryClosure;
        for (const info of await query(path)) closure.set(info.storePath, info);
      } catch (error) {
        if (!(error instanceof NotFoundError)) throw error;
        this.#gone(path, file);
      }
    }
    const missing: LocalPathInfo[] = [];
    for (const info of closure.values()) {
      if (this.#states.has(info.storePath)) continue;
      if (await this.#isCached(info.storePath)) this.#states.set(info.storePath, "done");
      else missing.push(info);
    }
    await this.#importAll(sortDependenciesFirst(missing));
  }

  #gone(path: string, file: string): void {
    this.log(`Skipping ${path} (from ${file}): it is no longer in the Nix store`);
    this.#states.set(path, "gone");
    this.result.skipped++;
  }

  async #isCached(path: string): Promise<boolean> {
    return await this.#cache.getPath(parseStorePath(path).hash) !== null;
  }

  #checkAborted(): void {
    if (this.#options.signal?.aborted) throw new DrainAborted();
  }

  /**
   * Imports paths given dependencies first. A path failing for a definitive reason is
   * dropped with every path that depends on it; any other failure is thrown.
   */
  async #importAll(ordered: LocalPathInfo[]): Promise<void> {
    let queue = ordered;
    while (queue.length > 0) {
      const batch = queue;
      let current = -1;
      try {
        await importLocalPaths(this.#cache, batch, {
          compression: this.#options.compression,
          signingKey: this.#options.signingKey,
          segmentOf: this.#options.segmentOf,
          onProgress: (index) => {
            if (current >= 0) this.#imported(batch[current]);
            current = index;
            this.#checkAborted();
          },
        });
        if (current >= 0) this.#imported(batch[current]);
        return;
      } catch (error) {
        if (error instanceof DrainAborted) throw error;
        if (!(error instanceof IntegrityError || error instanceof FormatError) || current < 0) {
          throw error;
        }
        queue = this.#dropFailed(batch.slice(current), error);
      }
    }
  }

  #imported(info: LocalPathInfo): void {
    if (this.#states.has(info.storePath)) return;
    this.#states.set(info.storePath, "done");
    this.result.imported++;
    this.log(`Imported ${info.storePath} from the spool`);
  }

  /** Drops `queue[0]` (which failed) and the paths that depend on it; returns the rest. */
  #dropFailed(queue: LocalPathInfo[], error: unknown): LocalPathInfo[] {
    const [bad, ...rest] = queue;
    this.log(`Cannot import ${bad.storePath}, dropping it: ${messageOf(error)}`);
    this.#states.set(bad.storePath, "failed");
    this.result.failed++;
    const failedBases = new Set([parseStorePath(bad.storePath).baseName]);
    const kept: LocalPathInfo[] = [];
    for (const info of rest) {
      const dependency = info.references.find((ref) => failedBases.has(ref));
      if (dependency === undefined) {
        kept.push(info);
        continue;
      }
      this.log(`Cannot import ${info.storePath}, dropping it: its dependency ${dependency} failed`);
      failedBases.add(parseStorePath(info.storePath).baseName);
      this.#states.set(info.storePath, "failed");
      this.result.failed++;
    }
    return kept;
  }
}

/** The valid store paths of a spool file, unique, in order; other lines are logged and counted. */
function parseSpoolFile(text: string, file: string, drain: SpoolDrain): string[] {
  const paths = new Set<string>();
  let bad = 0;
  for (const [index, raw] of text.split("\n").entries()) {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) continue;
    try {
      paths.add(parseStorePath(line).path);
    } catch (error) {
      if (!(error instanceof FormatError)) throw error;
      if (bad++ < MAX_LINE_MESSAGES) {
        drain.log(`Ignoring line ${index + 1} of spool file ${file}: ${error.message}`);
      }
      drain.result.skipped++;
    }
  }
  if (bad > MAX_LINE_MESSAGES) {
    drain.log(`Ignored ${bad} lines of spool file ${file} in all`);
  }
  return [...paths];
}

/**
 * The names of the complete spool files in `spoolDir`, oldest first (names start with the
 * time). Deletes `.tmp.*` files older than `staleTmpMs`. A missing directory has none.
 */
async function listSpoolFiles(
  spoolDir: string,
  staleTmpMs: number,
  log: (message: string) => void,
): Promise<string[]> {
  const names: string[] = [];
  try {
    for await (const entry of Deno.readDir(spoolDir)) {
      if (!entry.isFile) continue;
      if (entry.name.startsWith(SPOOL_TMP_PREFIX)) {
        await removeIfStale(join(spoolDir, entry.name), staleTmpMs, log);
      } else if (!entry.name.startsWith(".") && entry.name.endsWith(SPOOL_FILE_SUFFIX)) {
        names.push(entry.name);
      }
    }
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return [];
    throw error;
  }
  return names.sort();
}

async function removeIfStale(
  path: string,
  staleTmpMs: number,
  log: (message: string) => void,
): Promise<void> {
  try {
    const { mtime } = await Deno.stat(path);
    if (mtime === null || Date.now() - mtime.getTime() < staleTmpMs) return;
    await Deno.remove(path);
    log(`Deleted ${path}: a post-build hook left it unfinished`);
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) {
      log(`Cannot delete stale spool file ${path}: ${messageOf(error)}`);
    }
  }
}

/** False only when the path is certainly absent (lstat: not found). */
async function existsOnDisk(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch (error) {
    return !(error instanceof Deno.errors.NotFound);
  }
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/**
 * Creates the spool directory if it is missing: mode 0755, and (when run as root) owned
 * like its parent, the cache directory, so that a service running as that user may delete
 * the files root's hook writes. Returns whether it was created.
 */
export async function ensureSpoolDir(spoolDir: string): Promise<boolean> {
  try {
    await Deno.mkdir(spoolDir, { mode: 0o755 });
  } catch (error) {
    if (error instanceof Deno.errors.AlreadyExists) return false;
    if (!(error instanceof Deno.errors.NotFound)) throw error;
    await Deno.mkdir(join(spoolDir, ".."), { recursive: true });
    return await ensureSpoolDir(spoolDir);
  }
  await Deno.chmod(spoolDir, 0o755);
  if (Deno.uid() === 0) {
    const parent = await Deno.stat(join(spoolDir, ".."));
    if (parent.uid !== null && parent.gid !== null && parent.uid !== 0) {
      await Deno.chown(spoolDir, parent.uid, parent.gid);
    }
  }
  return true;
}

/** Options of {@link startSpoolDrainer}: those of {@link drainSpool} plus the interval. */
export interface SpoolDrainerOptions extends Omit<DrainSpoolOptions, "signal"> {
  /** Pause between the end of one drain and the start of the next (default 2000 ms). */
  intervalMs?: number;
}

/** A running spool drainer. */
export interface SpoolDrainer {
  /** Stops the drainer: interrupts the current drain between two paths and waits for it. */
  stop(): Promise<void>;
}

/**
 * Drains `spoolDir` into `cache` now and then every `intervalMs` after the previous drain
 * ended (so never two at once), until stopped. Creates the spool directory first (see
 * {@link ensureSpoolDir}). Errors are logged, never thrown; a round that did something
 * logs a summary.
 */
export function startSpoolDrainer(
  cache: Cache,
  spoolDir: string,
  options: SpoolDrainerOptions,
): SpoolDrainer {
  const { intervalMs = DEFAULT_DRAIN_INTERVAL_MS, ...drainOptions } = options;
  const log = options.log ?? (() => {});
  const controller = new AbortController();
  let timer: ReturnType<typeof setTimeout> | undefined;
  let stopped = false;

  const round = async () => {
    try {
      const result = await drainSpool(cache, spoolDir, {
        ...drainOptions,
        signal: controller.signal,
      });
      if (result.imported + result.failed + result.skipped > 0) {
        log(
          `Spool ${spoolDir}: ${result.imported} paths imported, ${result.failed} failed, ${result.skipped} skipped`,
        );
      }
    } catch (error) {
      log(`Cannot drain the spool ${spoolDir}: ${messageOf(error)}`);
    }
  };
  const run = (first: boolean): Promise<void> =>
    (async () => {
      if (first) {
        await ensureSpoolDir(spoolDir).catch((error) =>
          log(`Cannot create the spool directory ${spoolDir}: ${messageOf(error)}`)
        );
      }
      if (!stopped) await round();
    })().finally(() => {
      if (stopped) return;
      timer = setTimeout(() => {
        timer = undefined;
        running = run(false);
      }, intervalMs);
    });
  let running = run(true);

  return {
    async stop() {
      stopped = true;
      controller.abort();
      if (timer !== undefined) clearTimeout(timer);
      timer = undefined;
      await running;
    },
  };
}
