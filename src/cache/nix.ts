/**
 * The local Nix, queried through its command-line tools: path-info of store paths (NAR
 * hash and size, references, deriver, CA, signatures) and runtime closures.
 *
 * Speaks `nix path-info --json` (Nix 2.8: an array of objects, SRI hashes, full reference
 * paths) and converts it into the narinfo conventions of this code base (`sha256:<nix32>`,
 * base names).
 * @module
 */

import { ExternalCommandError, NotFoundError } from "../errors.ts";
import { normalizeNixHash } from "./hash.ts";
import { parseStorePath } from "./store_path.ts";

/** A store path as the local Nix describes it. */
export interface LocalPathInfo {
  storePath: string;
  /** `sha256:<nix32>`. */
  narHash: string;
  narSize: number;
  /** Base names, sorted. */
  references: string[];
  /** Base name of the deriver. */
  deriver?: string;
  ca?: string;
  sigs: string[];
}

const NIX_FLAGS = ["--extra-experimental-features", "nix-command"];

async function runNix(args: string[]): Promise<string> {
  let output: Deno.CommandOutput;
  try {
    output = await new Deno.Command("nix", {
      args: [...NIX_FLAGS, ...args],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      throw new ExternalCommandError("Cannot run nix: it is not on PATH");
    }
    throw error;
  }
  if (!output.success) {
    const stderr = new TextDecoder().decode(output.stderr).trim();
    const message = stderr.split("\n").filter((line) => line.trim()).at(-1) ?? "";
    if (/is not valid|does not exist|don't know how to build|not a store path/i.test(stderr)) {
      throw new NotFoundError(`nix ${args[0]} failed: ${message.replace(/^error: /, "")}`);
    }
    throw new ExternalCommandError(`nix ${args[0]} failed: ${message.replace(/^error: /, "")}`);
  }
  return new TextDecoder().decode(output.stdout);
}

function baseName(path: string): string {
  return parseStorePath(path).baseName;
}

function toLocalPathInfo(raw: Record<string, unknown>): LocalPathInfo {
  const storePath = String(raw.path);
  parseStorePath(storePath);
  if (raw.valid === false) {
    throw new NotFoundError(`Path is not valid in the local store: ${storePath}`);
  }
  return {
    storePath,
    narHash: normalizeNixHash(String(raw.narHash)),
    narSize: Number(raw.narSize),
    references: ((raw.references as string[] | undefined) ?? []).map(baseName).sort(),
    deriver: typeof raw.deriver === "string" ? baseName(raw.deriver) : undefined,
    ca: typeof raw.ca === "string" ? raw.ca : undefined,
    sigs: ((raw.signatures as string[] | undefined) ?? []).slice().sort(),
  };
}

/** `nix path-info --json` of the given store paths, in the order given. */
export async function queryPathInfo(paths: string[]): Promise<LocalPathInfo[]> {
  if (paths.length === 0) return [];
  const raw = JSON.parse(await runNix(["path-info", "--json", "--", ...paths])) as Record<
    string,
    unknown
  >[];
  const byPath = new Map(raw.map((entry) => [String(entry.path), toLocalPathInfo(entry)]));
  return paths.map((path) => {
    const info = byPath.get(path);
    if (!info) throw new NotFoundError(`Nix returned no path-info for ${path}`);
    return info;
  });
}

/**
 * The runtime closure of an installable (a store path, or anything `nix path-info`
 * accepts), dependencies before the paths that reference them.
 */
export async function queryClosure(installable: string): Promise<LocalPathInfo[]> {
  const raw = JSON.parse(
    await runNix(["path-info", "--json", "--recursive", "--", installable]),
  ) as Record<string, unknown>[];
  return sortDependenciesFirst(raw.map(toLocalPathInfo));
}

/** Orders paths so that every path comes after the paths it references (self-references aside). */
export function sortDependenciesFirst(infos: LocalPathInfo[]): LocalPathInfo[] {
  const byBase = new Map(infos.map((info) => [baseName(info.storePath), info]));
  const done = new Set<string>();
  const out: LocalPathInfo[] = [];
  const visit = (base: string) => {
    // Iterative DFS: closures can be deep chains.
    const stack: [string, number][] = [[base, 0]];
    while (stack.length) {
      const top = stack[stack.length - 1];
      const info = byBase.get(top[0])!;
      if (top[1] === 0 && done.has(top[0])) {
        stack.pop();
        continue;
      }
      if (top[1] < info.references.length) {
        const ref = info.references[top[1]++];
        if (ref !== top[0] && byBase.has(ref) && !done.has(ref)) {
          if (!stack.some(([b]) => b === ref)) stack.push([ref, 0]);
        }
        continue;
      }
      stack.pop();
      if (!done.has(top[0])) {
        done.add(top[0]);
        out.push(info);
      }
    }
  };
  for (const base of [...byBase.keys()].sort()) visit(base);
  return out;
}
