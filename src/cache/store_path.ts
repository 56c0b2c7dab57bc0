/**
 * Nix store paths: `/nix/store/<hash>-<name>`, where `<hash>` is 32 characters of Nix's
 * base-32 (160 bits) and `<name>` follows Nix's name rules.
 *
 * The rules are Nix's own (`StorePath` and `checkName` in libstore `path.cc`):
 * - hash part: exactly 32 characters of `0123456789abcdfghijklmnpqrsvwxyz`;
 * - name: 1 to 211 characters of `[A-Za-z0-9+\-._?=]`;
 * - and, as newer Nix (2.20+) adds, the name is not `.` or `..` and does not start with
 *   `.-` or `..-`. Nix 2.8 still accepts those four shapes, but every newer Nix rejects
 *   them, so a cache must not hand them out. Any other leading `.` (e.g. `.foo`) is valid
 *   in every Nix version.
 * - the separator after the hash part is `-` (Nix 2.8 does not check it; newer Nix does).
 *
 * Paths are parsed exactly: absolute, in `/nix/store`, no trailing slash, no `.`/`..`
 * segments, no subpath below the store object. Pure: no I/O.
 * @module
 */

import { FormatError } from "../errors.ts";
import { NIX_BASE32_ALPHABET } from "./nixbase32.ts";

/** The only store directory arca serves. */
export const STORE_DIR = "/nix/store";

/** Length of a store path hash part in characters. */
export const HASH_PART_LENGTH = 32;

/** Longest store path name Nix accepts. */
export const MAX_NAME_LENGTH = 211;

/** A parsed store path. */
export interface StorePath {
  /** The 32-character nix32 hash part. */
  hash: string;
  /** The name after `<hash>-`. */
  name: string;
  /** The full path, `/nix/store/<hash>-<name>`. */
  path: string;
  /** The last path component, `<hash>-<name>`. */
  baseName: string;
}

const HASH_PART_RE = new RegExp(`^[${NIX_BASE32_ALPHABET}]{${HASH_PART_LENGTH}}$`);
const NAME_CHAR_RE = /[^A-Za-z0-9+\-._?=]/;

/** True when `text` is a store path hash part: 32 characters of the nix32 alphabet. */
export function isValidHashPart(text: string): boolean {
  return HASH_PART_RE.test(text);
}

/**
 * Throws {@link FormatError} unless `name` is a valid store path name (see the module
 * comment for the rules).
 */
export function validateStorePathName(name: string): void {
  const problem = storePathNameProblem(name);
  if (problem) throw new FormatError(`Invalid store path name '${shorten(name)}': ${problem}`);
}

/** True when `name` is a valid store path name; never throws. */
export function isValidStorePathName(name: string): boolean {
  return storePathNameProblem(name) === undefined;
}

/**
 * Parses `/nix/store/<hash>-<name>`. Throws {@link FormatError} saying what is wrong:
 * not absolute, not in the store, a subpath, a bad hash part or a bad name.
 */
export function parseStorePath(path: string): StorePath {
  const problem = storePathProblem(path);
  if (problem) throw new FormatError(`Invalid store path '${shorten(path)}': ${problem}`);
  return makeStorePath(path.slice(STORE_DIR.length + 1));
}

/**
 * What is wrong with `path` as a store path, in a few words (e.g. `not in /nix/store`),
 * or undefined when it is a valid one. For callers that wrap the detail in their own error.
 */
export function storePathProblem(path: string): string | undefined {
  const prefix = `${STORE_DIR}/`;
  if (path === STORE_DIR || path === prefix) return "the store directory itself";
  if (!path.startsWith(prefix)) {
    return path.startsWith("/") ? `not in ${STORE_DIR}` : "not an absolute path";
  }
  const rest = path.slice(prefix.length);
  const slash = rest.indexOf("/");
  if (slash === 0) return "empty path segment";
  if (slash > 0 && slash === rest.length - 1) return "trailing '/'";
  if (slash > 0) return "a path inside a store object, not a store path";
  return storePathBaseNameProblem(rest);
}

/** True when `path` is exactly a store path (as {@link parseStorePath} accepts); never throws. */
export function isStorePath(path: string): boolean {
  return storePathProblem(path) === undefined;
}

/**
 * Parses a store path base name `<hash>-<name>` (as narinfo References and Deriver
 * hold them). Throws {@link FormatError} saying what is wrong.
 */
export function parseStorePathBaseName(baseName: string): StorePath {
  const problem = storePathBaseNameProblem(baseName);
  if (problem) {
    throw new FormatError(`Invalid store path base name '${shorten(baseName)}': ${problem}`);
  }
  return makeStorePath(baseName);
}

/** `/nix/store/<baseName>`, after checking `baseName`. */
export function storePathFromBaseName(baseName: string): string {
  return parseStorePathBaseName(baseName).path;
}

function makeStorePath(baseName: string): StorePath {
  return {
    hash: baseName.slice(0, HASH_PART_LENGTH),
    name: baseName.slice(HASH_PART_LENGTH + 1),
    path: `${STORE_DIR}/${baseName}`,
    baseName,
  };
}

/**
 * What is wrong with `baseName` as a store path base name `<hash>-<name>`, or undefined
 * when it is a valid one.
 */
export function storePathBaseNameProblem(baseName: string): string | undefined {
  if (baseName.length < HASH_PART_LENGTH + 1) {
    return `too short: expected '<32-character hash>-<name>'`;
  }
  const hash = baseName.slice(0, HASH_PART_LENGTH);
  if (!isValidHashPart(hash)) {
    const bad = [...hash].find((c) => !NIX_BASE32_ALPHABET.includes(c));
    return `hash part contains illegal character '${bad}'`;
  }
  if (baseName[HASH_PART_LENGTH] !== "-") return "hash part is not followed by '-'";
  const nameProblem = storePathNameProblem(baseName.slice(HASH_PART_LENGTH + 1));
  return nameProblem && `invalid name: ${nameProblem}`;
}

/** What is wrong with `name` as a store path name, or undefined when it is a valid one. */
export function storePathNameProblem(name: string): string | undefined {
  if (name.length === 0) return "empty name";
  if (name.length > MAX_NAME_LENGTH) {
    return `longer than ${MAX_NAME_LENGTH} characters`;
  }
  const bad = NAME_CHAR_RE.exec(name);
  if (bad) return `illegal character ${JSON.stringify(bad[0])}`;
  if (name === "." || name === "..") return `'${name}' is not allowed`;
  if (name.startsWith(".-") || name.startsWith("..-")) {
    return "first dash-separated component must not be '.' or '..'";
  }
  return undefined;
}

// deno-lint-ignore no-control-regex -- escaping control characters in messages is the point
const CONTROL_GLOBAL_RE = /[\x00-\x1f\x7f]/g;

function shorten(text: string): string {
  const clean = text.replace(
    CONTROL_GLOBAL_RE,
    (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}`,
  );
  return clean.length > 300 ? `${clean.slice(0, 297)}...` : clean;
}
