/**
 * The audit log: an append-only record of every change to the cache and of its use —
 * `Import`, `Upload`, `SyncReceive`, `Fetch` (a path made local from swarm peers or an
 * upstream cache), `Serve`, `GarbageCollect` — with time, store path, segment and detail.
 *
 * It is one JSON object per line in `<cacheDir>/audit.log`, for both metadata backends.
 * Each batch of events is appended with a single `write` on a file opened with O_APPEND, so
 * lines from concurrent processes never interleave. (DESIGN.md §3 suggested Deno KV entries;
 * a line file works the same with the filesystem backend, can be read with `tail -f` or
 * shipped by any log collector, and keeps the KV database small.) A torn last line left by
 * a crash is skipped when reading.
 * @module
 */

import { join } from "node:path";

/** The kinds of audited events. */
export type AuditEventType =
  | "Import"
  | "Upload"
  | "SyncReceive"
  | "Fetch"
  | "Serve"
  | "GarbageCollect";

/** One audited event. */
export interface AuditEvent {
  /** ISO 8601 time. */
  time: string;
  type: AuditEventType;
  storePath?: string;
  segment?: string;
  detail?: string;
}

const EVENT_TYPES: AuditEventType[] = [
  "Import",
  "Upload",
  "SyncReceive",
  "Fetch",
  "Serve",
  "GarbageCollect",
];

/** The audit log of one cache directory. */
export class AuditLog {
  readonly path: string;

  /** The log at `<cacheDir>/audit.log`. */
  constructor(cacheDir: string) {
    this.path = join(cacheDir, "audit.log");
  }

  /** Appends events (the time defaults to now). */
  async append(events: (Omit<AuditEvent, "time"> & { time?: string })[]): Promise<void> {
    if (events.length === 0) return;
    const now = new Date().toISOString();
    const text = events.map((event) => {
      const line: AuditEvent = { time: event.time ?? now, type: event.type };
      if (event.storePath !== undefined) line.storePath = event.storePath;
      if (event.segment !== undefined) line.segment = event.segment;
      if (event.detail !== undefined) line.detail = event.detail;
      return JSON.stringify(line) + "\n";
    }).join("");
    const file = await Deno.open(this.path, { append: true, create: true, mode: 0o640 });
    try {
      const bytes = new TextEncoder().encode(text);
      let written = 0;
      while (written < bytes.length) written += await file.write(bytes.subarray(written));
    } finally {
      file.close();
    }
  }

  /** The events at or after `since` (ms since the epoch), oldest first, streamed. */
  async *read(options: { since?: number } = {}): AsyncIterable<AuditEvent> {
    let file: Deno.FsFile;
    try {
      file = await Deno.open(this.path, { read: true });
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) return;
      throw error;
    }
    const lines = file.readable.pipeThrough(new TextDecoderStream()).pipeThrough(splitLines());
    for await (const line of lines) {
      const event = parseEvent(line);
      if (event === null) continue;
      if (options.since !== undefined && Date.parse(event.time) < options.since) continue;
      yield event;
    }
  }
}

function parseEvent(line: string): AuditEvent | null {
  try {
    const value = JSON.parse(line);
    if (
      typeof value !== "object" || value === null || typeof value.time !== "string" ||
      !EVENT_TYPES.includes(value.type) || Number.isNaN(Date.parse(value.time))
    ) {
      return null;
    }
    return value as AuditEvent;
  } catch {
    return null; // a torn line from a crash
  }
}

function splitLines(): TransformStream<string, string> {
  let rest = "";
  return new TransformStream({
    transform(text, controller) {
      const parts = (rest + text).split("\n");
      rest = parts.pop()!;
      for (const part of parts) if (part) controller.enqueue(part);
    },
    flush(controller) {
      if (rest) controller.enqueue(rest);
    },
  });
}
