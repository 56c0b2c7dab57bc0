/**
 * What every subcommand shares: reading the global options into {@link Settings}, opening
 * the cache, loading a signing key, and formatting sizes for people.
 * @module
 */

import type { Command } from "commander";
import { Cache } from "../cache/cache.ts";
import { parseSecretKey, type SecretKey } from "../cache/signing.ts";
import { type FlagSettings, loadSettings, type Settings } from "../config.ts";
import { FormatError, NotFoundError, UsageError } from "../errors.ts";

/** Options every subcommand accepts (before or after its name). */
export interface GlobalOptions {
  cacheDir?: string;
  backend?: string;
  config?: string;
  verbose?: boolean;
}

/** The settings of a command: its own flags plus the global ones, config and environment. */
export function settingsOf(command: Command, flags: FlagSettings = {}): Promise<Settings> {
  const globals = command.optsWithGlobals() as GlobalOptions;
  return loadSettings({
    config: globals.config,
    cacheDir: globals.cacheDir,
    backend: globals.backend,
    ...flags,
  });
}

/** Opens the cache the settings name. */
export function openCache(settings: Settings): Promise<Cache> {
  return Cache.open(settings.cacheDir, { backend: settings.backend });
}

/** Reads a Nix secret key file (`name:base64`). */
export async function readSigningKey(path: string): Promise<SecretKey> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      throw new NotFoundError(`Signing key file not found: ${path}`);
    }
    throw error;
  }
  try {
    return parseSecretKey(text);
  } catch (error) {
    if (error instanceof FormatError) {
      throw new FormatError(`Invalid signing key file ${path}: ${error.message}`);
    }
    throw error;
  }
}

/** The signing key the settings name, if any. */
export function signingKeyOf(settings: Settings): Promise<SecretKey | undefined> {
  return settings.signingKeyPath === undefined
    ? Promise.resolve(undefined)
    : readSigningKey(settings.signingKeyPath);
}

/** `1.5 MiB`-style sizes. */
export function formatBytes(bytes: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${bytes} B` : `${value.toFixed(1)} ${units[unit]}`;
}

/** Parses an option value from a fixed set; UsageError naming the option otherwise. */
export function oneOf<T extends string>(option: string, value: string, allowed: readonly T[]): T {
  if (!(allowed as readonly string[]).includes(value)) {
    throw new UsageError(`Invalid ${option} '${value}': expected ${allowed.join(" or ")}`);
  }
  return value as T;
}
