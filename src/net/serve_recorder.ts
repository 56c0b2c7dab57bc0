/**
 * Records NAR downloads without writing per request: counts them in memory and, every
 * interval (and on close), touches the paths' access times (for LRU garbage collection)
 * and appends one aggregated `Serve` audit event per path served in that interval.
 * @module
 */

import type { Cache } from "../cache/cache.ts";
import type { PathRecord } from "../cache/metadata.ts";
import { parseStorePath } from "../cache/store_path.ts";

/** Default flush interval. */
export const DEFAULT_SERVE_LOG_INTERVAL_MS = 60_000;

interface Served {
  storePath: string;
  segment?: string;
  count: number;
}

/** Batches serve records of one server. */
export class ServeRecorder {
  #cache: Cache;
  #served = new Map<string, Served>();
  #timer: ReturnType<typeof setTimeout> | undefined;
  #intervalMs: number;
  #flushing: Promise<void> = Promise.resolve();

  constructor(cache: Cache, options: { intervalMs?: number } = {}) {
    this.#cache = cache;
    this.#intervalMs = options.intervalMs ?? DEFAULT_SERVE_LOG_INTERVAL_MS;
  }

  /** Notes one NAR download of a path. */
  record(record: PathRecord): void {
    const { hash } = parseStorePath(record.narInfo.storePath);
    const served = this.#served.get(hash);
    if (served) {
      served.count++;
    } else {
      this.#served.set(hash, {
        storePath: record.narInfo.storePath,
        segment: record.segment,
        count: 1,
      });
    }
    if (this.#timer === undefined) {
      this.#timer = setTimeout(() => {
        this.#timer = undefined;
        this.flush().catch(() => {});
      }, this.#intervalMs);
      Deno.unrefTimer(this.#timer as unknown as number);
    }
  }

  /** Writes what was recorded since the last flush. */
  flush(): Promise<void> {
    const batch = this.#served;
    this.#served = new Map();
    this.#flushing = this.#flushing.then(async () => {
      if (batch.size === 0) return;
      await this.#cache.accessTimes.touch(batch.keys());
      await this.#cache.audit.append([...batch.values()].map((served) => ({
        type: "Serve" as const,
        storePath: served.storePath,
        segment: served.segment,
        detail: `${served.count} NAR download${served.count === 1 ? "" : "s"}`,
      })));
    });
    return this.#flushing;
  }

  /** Flushes and stops the timer. */
  async close(): Promise<void> {
    if (this.#timer !== undefined) clearTimeout(this.#timer);
    this.#timer = undefined;
    await this.flush();
  }
}
