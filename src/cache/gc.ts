/**
 * Garbage collection: evicts least-recently-used paths (last import, upload or serve)
 * under an age and/or size limit, then deletes the manifests and chunks no remaining path
 * references.
 *
 * Closure-consistent: a path is evicted only when no remaining path references it, so
 * every path that stays keeps its whole closure. Among the paths nothing references, the
 * least recently used goes first; evicting it may free the paths it referenced.
 *
 * Safe against concurrent writers and crashes, in two phases:
 * 1. narinfo records of the evicted paths are deleted (each atomically), holding the
 *    writer lock exclusively; what paths committed since the listing reference, and what
 *    pending uploads reference, is kept. From then on Nix no longer sees them;
 * 2. the sweep, holding the cache's writer lock exclusively (cache_lock.ts: no import or
 *    upload is between "chunk found present" and "narinfo committed"), lists the paths
 *    that exist NOW, and deletes every manifest and chunk none of them references.
 *    Uploads live apart (uploads/): files whose narinfo never came are removed after a
 *    grace period; accepted ones waiting for their import (uploads/pending/) keep what they
 *    reference, also when accepted during the collection (both hold the writer lock).
 * A crash anywhere leaves at worst unreferenced files, which the next run sweeps; no
 * narinfo ever points at a missing chunk.
 * @module
 */

import { join } from "node:path";
import type { Cache } from "./cache.ts";
import { withSweepLock } from "./cache_lock.ts";
import { parseNixHash } from "./hash.ts";
import type { Manifest } from "./manifest.ts";
import type { PathRecord } from "./metadata.ts";
import { decodeNixBase32 } from "./nixbase32.ts";
import {
  incomingDir,
  pendingDir,
  pendingReferences,
  readPendingUploads,
} from "./pending_records.ts";
import { Pins } from "./pins.ts";
import { parseStorePath, parseStorePathBaseName } from "./store_path.ts";

/** Limits and mode of a collection. */
export interface GcOptions {
  /** Evict paths not used for longer than this (ms). */
  maxAgeMs?: number;
  /** Evict until the chunks still referenced take at most this many bytes. */
  maxSizeBytes?: number;
  /** Report what would go, change nothing. */
  dryRun?: boolean;
  /** The current time (ms); default now. */
  now?: number;
  /** Paths never evicted, with their closures (hash parts), besides the pinned ones. */
  keep?: ReadonlySet<string>;
  /** Staged uploads and temporary files younger than this are kept (ms; default 1 hour). */
  graceMs?: number;
}

/** What a collection did (or, dry, would do). */
export interface GcReport {
  evicted: { storePath: string; narSize: number; lastUsed: number }[];
  /** Paths left. */
  remainingPaths: number;
  /** Bytes of chunk files deleted (dry run: that would be freed by the eviction). */
  freedBytes: number;
  deletedChunks: number;
  deletedManifests: number;
  /** Bytes of the chunks the remaining paths reference. */
  liveBytes: number;
}

interface Node {
  record: PathRecord;
  hash: string;
  lastUsed: number;
  /** Hash parts of the cached paths it references (not itself). */
  references: string[];
  referrers: number;
  manifestKey?: string;
}

/** Runs a collection. */
export async function collectGarbage(cache: Cache, options: GcOptions): Promise<GcReport> {
  const now = options.now ?? Date.now();
  const graceMs = options.graceMs ?? 60 * 60 * 1000;
  const nodes = await loadNodes(cache);
  const manifests = await loadManifests(cache, nodes);

  // Chunk reference counts over the manifests of cached paths (a manifest shared by two
  // paths counts once per path, so it goes when its last path goes).
  const chunkRefs = new Map<string, number>();
  const chunkSize = new Map<string, number>();
  let liveBytes = 0;
  const addRefs = (key: string | undefined, delta: 1 | -1): number => {
    const manifest = key === undefined ? undefined : manifests.get(key);
    let changed = 0;
    for (const id of new Set(manifest?.chunks.map((c) => c.id) ?? [])) {
      const count = (chunkRefs.get(id) ?? 0) + delta;
      chunkRefs.set(id, count);
      if (delta === 1 && count === 1) changed += chunkSize.get(id)!;
      if (delta === -1 && count === 0) changed += chunkSize.get(id)!;
    }
    return changed;
  };
  for (const manifest of manifests.values()) {
    for (const chunk of manifest.chunks) chunkSize.set(chunk.id, chunk.storedSize);
  }
  for (const node of nodes.values()) liveBytes += addRefs(node.manifestKey, 1);

  const pinned = await new Pins(cache.cacheDir).all();
  // Accepted uploads not imported yet were accepted because their references are cached.
  const pendingRefs = await pendingReferences(cache.cacheDir);
  const keep = closureOf(nodes, new Set([...pinned, ...pendingRefs, ...(options.keep ?? [])]));
  const heap = new MinHeap<Node>((a, b) => a.lastUsed - b.lastUsed || (a.hash < b.hash ? -1 : 1));
  for (const node of nodes.values()) {
    if (node.referrers === 0 && !keep.has(node.hash)) heap.push(node);
  }
  const evicted: Node[] = [];
  const cutoff = options.maxAgeMs === undefined ? -Infinity : now - options.maxAgeMs;
  for (let node = heap.pop(); node !== undefined; node = heap.pop()) {
    const tooOld = node.lastUsed < cutoff;
    const tooBig = options.maxSizeBytes !== undefined && liveBytes > options.maxSizeBytes;
    if (!tooOld && !tooBig) {
      // The oldest root is young enough and the size is fine: so is every other root,
      // unless only the size limit applies, which is met.
      break;
    }
    evicted.push(node);
    liveBytes -= addRefs(node.manifestKey, -1);
    for (const reference of node.references) {
      const referenced = nodes.get(reference)!;
      if (--referenced.referrers === 0 && !keep.has(referenced.hash)) heap.push(referenced);
    }
  }

  const reportOf = (gone: Node[]): GcReport => ({
    evicted: gone.map((node) => ({
      storePath: node.record.narInfo.storePath,
      narSize: node.record.narInfo.narSize,
      lastUsed: node.lastUsed,
    })),
    remainingPaths: nodes.size - gone.length,
    freedBytes: 0,
    deletedChunks: 0,
    deletedManifests: 0,
    liveBytes,
  });
  if (options.dryRun) {
    const report = reportOf(evicted);
    report.freedBytes = [...chunkRefs].filter(([, count]) => count === 0)
      .reduce((sum, [id]) => sum + chunkSize.get(id)!, 0);
    return report;
  }

  // Under the writer lock, which an upload holds from its reference check to its
  // acceptance, and an import until its commit: what paths committed since the listing
  // and uploads accepted meanwhile reference stays too.
  const deleted = await withSweepLock(cache.cacheDir, async () => {
    const roots = await pendingReferences(cache.cacheDir);
    for await (const record of cache.listPaths()) {
      if (nodes.has(parseStorePath(record.narInfo.storePath).hash)) continue;
      for (const reference of record.narInfo.references) {
        roots.add(parseStorePathBaseName(reference).hash);
      }
    }
    const late = closureOf(nodes, roots);
    const going = evicted.filter((node) => !late.has(node.hash));
    for (const node of going) {
      await cache.metadata.deletePath(node.hash);
      await cache.accessTimes.remove(node.hash);
    }
    return going;
  });
  const report = reportOf(deleted);
  if (deleted.length > 0) {
    await cache.audit.append(deleted.map((node) => ({
      type: "GarbageCollect" as const,
      storePath: node.record.narInfo.storePath,
      segment: node.record.segment,
      detail: `evicted, last used ${new Date(node.lastUsed).toISOString()}`,
    })));
  }
  await withSweepLock(cache.cacheDir, () => sweep(cache, report, graceMs));
  return report;
}

async function loadNodes(cache: Cache): Promise<Map<string, Node>> {
  const accessed = await cache.accessTimes.all();
  const nodes = new Map<string, Node>();
  for await (const record of cache.listPaths()) {
    const { hash, baseName } = parseStorePath(record.narInfo.storePath);
    nodes.set(hash, {
      record,
      hash,
      lastUsed: Math.max(record.registeredAt, accessed.get(hash) ?? 0),
      references: record.narInfo.references.filter((ref) => ref !== baseName)
        .map((ref) => parseStorePathBaseName(ref).hash),
      referrers: 0,
      manifestKey: record.narInfo.fileHash,
    });
  }
  for (const node of nodes.values()) {
    // References to paths this cache does not hold do not constrain eviction.
    node.references = node.references.filter((ref) => nodes.has(ref));
    for (const ref of node.references) nodes.get(ref)!.referrers++;
  }
  return nodes;
}

async function loadManifests(
  cache: Cache,
  nodes: Map<string, Node>,
): Promise<Map<string, Manifest>> {
  const manifests = new Map<string, Manifest>();
  for (const node of nodes.values()) {
    const key = node.manifestKey;
    if (key === undefined || manifests.has(key)) continue;
    try {
      manifests.set(key, await cache.manifests.read(parseNixHash(key)));
    } catch {
      node.manifestKey = undefined; // a damaged path: `verify` reports it; GC keeps going
    }
  }
  return manifests;
}

/** The paths in `roots` and everything they reference, transitively. */
function closureOf(nodes: Map<string, Node>, roots: ReadonlySet<string>): Set<string> {
  const closure = new Set<string>();
  const stack = [...roots].filter((hash) => nodes.has(hash));
  while (stack.length) {
    const hash = stack.pop()!;
    if (closure.has(hash)) continue;
    closure.add(hash);
    stack.push(...nodes.get(hash)!.references);
  }
  return closure;
}

/** Deletes manifests and chunks the paths that exist now do not reference. */
async function sweep(cache: Cache, report: GcReport, graceMs: number): Promise<void> {
  const liveManifests = new Set<string>();
  const liveChunks = new Set<string>();
  for await (const record of cache.listPaths()) {
    const key = record.narInfo.fileHash;
    if (key === undefined || liveManifests.has(key)) continue;
    liveManifests.add(key);
    try {
      const manifest = await cache.manifests.read(parseNixHash(key));
      for (const chunk of manifest.chunks) liveChunks.add(`${chunk.id}.${manifest.compression}`);
    } catch {
      // Missing or damaged: nothing of it to keep.
    }
  }
  for await (const { fileHash } of cache.manifests.list()) {
    if (liveManifests.has(`sha256:${fileHash}`)) continue;
    if (await cache.manifests.delete(decodeNixBase32(fileHash))) report.deletedManifests++;
  }
  for await (const chunk of cache.chunks.entries()) {
    if (liveChunks.has(`${chunk.id}.${chunk.compression}`)) continue;
    if (await cache.chunks.delete(chunk.id, chunk.compression)) {
      report.deletedChunks++;
      report.freedBytes += chunk.size;
    }
  }
  await cache.chunks.cleanTemporaryFiles(graceMs);
  await removeStaleUploads(cache.cacheDir, Date.now() - graceMs);
}

/**
 * Removes what uploads left older than `cutoff`: staging directories of versions that
 * chunked uploads on arrival (`uploads/staged-*`), uploaded files whose narinfo never came
 * (`uploads/incoming/`), and files in `uploads/pending/` that no record names (a crash
 * between moving an accepted file there and writing its record, or a record's temporary
 * file).
 */
async function removeStaleUploads(cacheDir: string, cutoff: number): Promise<void> {
  const named = new Set((await readPendingUploads(cacheDir)).map((upload) => upload.file));
  const sweeps: [string, (entry: Deno.DirEntry) => boolean][] = [
    [join(cacheDir, "uploads"), (entry) => entry.isDirectory && entry.name.startsWith("staged-")],
    [incomingDir(cacheDir), (entry) => entry.isFile],
    [
      pendingDir(cacheDir),
      (entry) => entry.isFile && !named.has(entry.name) && !/^[0-9a-z]{32}\.json$/.test(entry.name),
    ],
  ];
  for (const [dir, removable] of sweeps) {
    let entries: Deno.DirEntry[];
    try {
      entries = await Array.fromAsync(Deno.readDir(dir));
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) continue;
      throw error;
    }
    for (const entry of entries.filter(removable)) {
      const path = join(dir, entry.name);
      const info = await Deno.lstat(path).catch(() => null);
      if (info?.mtime && info.mtime.getTime() < cutoff) {
        await Deno.remove(path, { recursive: true }).catch(() => {});
      }
    }
  }
}

/** A binary min-heap. */
class MinHeap<T> {
  #items: T[] = [];
  #less: (a: T, b: T) => number;

  constructor(compare: (a: T, b: T) => number) {
    this.#less = compare;
  }

  push(item: T): void {
    const items = this.#items;
    items.push(item);
    let i = items.length - 1;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (this.#less(items[i], items[parent]) >= 0) break;
      [items[i], items[parent]] = [items[parent], items[i]];
      i = parent;
    }
  }

  pop(): T | undefined {
    const items = this.#items;
    if (items.length === 0) return undefined;
    const top = items[0];
    const last = items.pop()!;
    if (items.length > 0) {
      items[0] = last;
      let i = 0;
      for (;;) {
        const left = 2 * i + 1;
        const right = left + 1;
        let smallest = i;
        if (left < items.length && this.#less(items[left], items[smallest]) < 0) smallest = left;
        if (right < items.length && this.#less(items[right], items[smallest]) < 0) smallest = right;
        if (smallest === i) break;
        [items[i], items[smallest]] = [items[smallest], items[i]];
        i = smallest;
      }
    }
    return top;
  }
}
