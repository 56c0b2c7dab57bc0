/**
 * Retrying operations that fail transiently, with exponential backoff and jitter.
 *
 * Its main use is Deno KV shared by several processes (`arca serve` next to `arca import`,
 * the post-build hook): SQLite underneath reports contention as `database is locked`
 * (SQLITE_BUSY). Deno KV retries most of that itself, but not everywhere: `Deno.openKv`
 * on a file another process holds locked throws a plain `Error` whose message is exactly
 * `database is locked` (provoked with Deno 2.9.6 by holding `BEGIN EXCLUSIVE` on the file
 * from `node:sqlite`; see tests/cache/kv_metadata_test.ts). {@link isDatabaseBusyError}
 * recognizes those messages, and every KV read and write in src/cache goes through
 * {@link withRetry}.
 * @module
 */

/** Options of {@link withRetry}. */
export interface RetryOptions {
  /** How many times `fn` is called at most (the first call included); default 10. */
  attempts?: number;
  /** Delay before the first retry in milliseconds; doubles on each retry; default 10. */
  baseDelayMs?: number;
  /** Upper bound of one delay in milliseconds; default 2000. */
  maxDelayMs?: number;
  /** Which errors are worth another attempt; default {@link isDatabaseBusyError}. */
  isRetryable?: (error: unknown) => boolean;
}

/** Default number of attempts of {@link withRetry}. */
export const DEFAULT_RETRY_ATTEMPTS = 10;
/** Default delay before the first retry of {@link withRetry}, in milliseconds. */
export const DEFAULT_RETRY_BASE_DELAY_MS = 10;
/** Default upper bound of one delay of {@link withRetry}, in milliseconds. */
export const DEFAULT_RETRY_MAX_DELAY_MS = 2000;

// SQLite's texts for SQLITE_BUSY ("database is locked") and SQLITE_LOCKED ("database table
// is locked", "database schema is locked"), and the names the rusqlite wrapper may print.
const BUSY_RE =
  /database (?:table |schema )?is locked|database is busy|\bSQLITE_(?:BUSY|LOCKED)\b|\bDatabaseBusy\b/i;

/**
 * True when `error` (or an error in its `cause` chain) says that a SQLite database, such as
 * the one under Deno KV, is locked or busy: `database is locked`, `database table is
 * locked`, `database is busy`, `SQLITE_BUSY`. Such an operation can succeed when retried.
 */
export function isDatabaseBusyError(error: unknown): boolean {
  for (let e: unknown = error, depth = 0; e instanceof Error && depth < 8; depth++) {
    if (BUSY_RE.test(e.message)) return true;
    e = e.cause;
  }
  return false;
}

/**
 * Calls `fn` until it resolves, at most `attempts` times, while it rejects with an error
 * `isRetryable` accepts. Between attempts it waits a random time between half and all of
 * `baseDelayMs · 2^retry` (capped at `maxDelayMs`), so that processes contending for the
 * same lock spread out. The last error is rethrown unchanged; errors `isRetryable` rejects
 * are rethrown at once.
 *
 * @example
 * ```ts
 * const kv = await withRetry(() => Deno.openKv(path));
 * const entry = await withRetry(() => kv.get(["path", hashPart]));
 * ```
 */
export async function withRetry<T>(
  fn: () => Promise<T>,
  options: RetryOptions = {},
): Promise<T> {
  const attempts = Math.max(1, Math.floor(options.attempts ?? DEFAULT_RETRY_ATTEMPTS));
  const baseDelayMs = Math.max(0, options.baseDelayMs ?? DEFAULT_RETRY_BASE_DELAY_MS);
  const maxDelayMs = Math.max(0, options.maxDelayMs ?? DEFAULT_RETRY_MAX_DELAY_MS);
  const isRetryable = options.isRetryable ?? isDatabaseBusyError;
  for (let attempt = 1;; attempt++) {
    try {
      return await fn();
    } catch (error) {
      if (attempt >= attempts || !isRetryable(error)) throw error;
      const ceiling = Math.min(maxDelayMs, baseDelayMs * 2 ** (attempt - 1));
      await sleep(ceiling / 2 + Math.random() * ceiling / 2);
    }
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
