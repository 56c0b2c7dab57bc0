/**
 * The cache's writer lock, `<cacheDir>/gc.lock`, held with `flock` so it works between
 * processes: writers (imports, uploads) hold it SHARED while they store chunks and commit
 * a narinfo; the garbage collector's sweep holds it EXCLUSIVE while it decides which chunks
 * no narinfo references and deletes them. So a chunk an in-flight import has just found
 * present (and will reference) is never deleted under it, and the sweep never sees a
 * half-made import. The lock is released when the process dies, so a crash never leaves it
 * held.
 * @module
 */

import { join } from "node:path";

async function withLock<T>(cacheDir: string, exclusive: boolean, fn: () => Promise<T>): Promise<T> {
  await Deno.mkdir(cacheDir, { recursive: true });
  const file = await Deno.open(join(cacheDir, "gc.lock"), {
    read: true,
    write: true,
    create: true,
  });
  try {
    await file.lock(exclusive);
    return await fn();
  } finally {
    file.close(); // closing releases the lock
  }
}

/** Runs `fn` holding the cache's writer lock shared (imports, uploads). */
export function withWriterLock<T>(cacheDir: string, fn: () => Promise<T>): Promise<T> {
  return withLock(cacheDir, false, fn);
}

/** Runs `fn` holding the cache's writer lock exclusively (the garbage collector's sweep). */
export function withSweepLock<T>(cacheDir: string, fn: () => Promise<T>): Promise<T> {
  return withLock(cacheDir, true, fn);
}
