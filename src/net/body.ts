/**
 * Small HTTP bodies read whole (narinfos, uploaded or fetched), with a limit.
 * @module
 */

import { FormatError } from "../errors.ts";

/** Reads a small body as text, refusing more than `limit` bytes. */
export async function readLimited(
  body: ReadableStream<Uint8Array>,
  limit: number,
): Promise<string> {
  const parts: Uint8Array[] = [];
  let size = 0;
  for await (const piece of body) {
    size += piece.length;
    if (size > limit) throw new FormatError(`Request body is larger than ${limit} bytes`);
    parts.push(piece);
  }
  const bytes = new Uint8Array(size);
  let offset = 0;
  for (const part of parts) {
    bytes.set(part, offset);
    offset += part.length;
  }
  return new TextDecoder().decode(bytes);
}
