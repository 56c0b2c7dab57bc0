/**
 * Tokens for the substituter: read from files (secrets never on the command line) and
 * checked in constant time against what a client sends, either as the HTTP Basic
 * password (what Nix sends from a `netrc-file`; the user name is ignored) or as
 * `Authorization: Bearer <token>`.
 * @module
 */

import { createHash, timingSafeEqual } from "node:crypto";
import { NotFoundError, UsageError } from "../errors.ts";

/** Reads a token file: its content without surrounding whitespace; UsageError if empty. */
export async function readTokenFile(path: string): Promise<string> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      throw new NotFoundError(`Token file not found: ${path}`);
    }
    throw error;
  }
  const token = text.trim();
  if (token.length === 0) throw new UsageError(`Token file is empty: ${path}`);
  return token;
}

/** The token a request carries (Basic password or Bearer), or null. */
export function requestToken(request: Request): string | null {
  const header = request.headers.get("authorization");
  if (header === null) return null;
  const match = /^(Basic|Bearer)\s+(\S+)\s*$/i.exec(header);
  if (!match) return null;
  if (match[1].toLowerCase() === "bearer") return match[2];
  let decoded: string;
  try {
    decoded = new TextDecoder("utf-8", { fatal: true }).decode(
      Uint8Array.from(atob(match[2]), (c) => c.charCodeAt(0)),
    );
  } catch {
    return null;
  }
  const colon = decoded.indexOf(":");
  return colon === -1 ? null : decoded.slice(colon + 1);
}

function digest(text: string): Uint8Array {
  return new Uint8Array(createHash("sha256").update(text).digest());
}

/**
 * True when the request carries one of the tokens. Compares SHA-256 digests with
 * `timingSafeEqual`, so the time taken says nothing about the tokens or their lengths.
 */
export function hasToken(request: Request, tokens: readonly string[]): boolean {
  const given = requestToken(request);
  if (given === null) return false;
  const givenDigest = digest(given);
  let ok = false;
  for (const token of tokens) ok = timingSafeEqual(givenDigest, digest(token)) || ok;
  return ok;
}
