/**
 * {@link BoundedCache}, the least-recently-used map behind the in-process read caches:
 * limits on entries and on total weight, promotion on `get`, entries heavier than the
 * whole limit.
 * @module
 */

import assert from "node:assert/strict";
import { BoundedCache } from "../../src/cache/metadata.ts";

Deno.test("BoundedCache forgets the least recently used entries beyond maxEntries", () => {
  const cache = new BoundedCache<string, number>({ maxEntries: 3, maxWeight: 100 });
  cache.set("a", 1);
  cache.set("b", 2);
  cache.set("c", 3);
  assert.equal(cache.get("a"), 1); // a is now the most recently used
  cache.set("d", 4);
  assert.equal(cache.size, 3);
  assert.equal(cache.get("b"), undefined);
  assert.deepEqual(["a", "c", "d"].map((k) => cache.get(k)), [1, 3, 4]);
});

Deno.test("BoundedCache keeps the total weight within maxWeight", () => {
  const cache = new BoundedCache<string, string>({ maxEntries: 100, maxWeight: 10 });
  cache.set("a", "aaaa", 4);
  cache.set("b", "bbbb", 4);
  cache.set("c", "cc", 2);
  assert.equal(cache.size, 3);
  cache.set("d", "ddd", 3); // 13 > 10: a goes
  assert.equal(cache.get("a"), undefined);
  assert.equal(cache.size, 3);
  // Replacing an entry replaces its weight.
  cache.set("b", "b", 1);
  cache.set("e", "eeee", 4); // 2 + 3 + 1 + 4 = 10
  assert.deepEqual(["b", "c", "d", "e"].map((k) => cache.get(k)), ["b", "cc", "ddd", "eeee"]);
  // Heavier than the whole limit: not kept, and nothing else is lost for it.
  cache.set("huge", "x", 11);
  assert.equal(cache.get("huge"), undefined);
  assert.equal(cache.size, 4);
});

Deno.test("BoundedCache delete and clear", () => {
  const cache = new BoundedCache<number, number>({ maxEntries: 2, maxWeight: 2 });
  cache.set(1, 1);
  cache.set(2, 2);
  cache.delete(1);
  cache.delete(99);
  assert.equal(cache.size, 1);
  cache.set(3, 3); // weight freed by the delete is usable again
  assert.deepEqual([cache.get(2), cache.get(3)], [2, 3]);
  cache.clear();
  assert.equal(cache.size, 0);
  cache.set(4, 4);
  cache.set(5, 5);
  assert.deepEqual([cache.get(4), cache.get(5)], [4, 5]);
});
