/**
 * The Deno KV metadata backend: the shared contract, its key layout, splitting of large
 * narinfos, and the retry policy (including the real `database is locked` Deno KV throws).
 */

import assert from "node:assert/strict";
import { DatabaseSync } from "node:sqlite";
import { FormatError, UsageError } from "../../src/errors.ts";
import { type MetadataBackend, openMetadata } from "../../src/cache/metadata.ts";
import { KV_MAX_NARINFO_BYTES, openKvMetadata } from "../../src/cache/kv_metadata.ts";
import { isDatabaseBusyError, withRetry } from "../../src/cache/retry.ts";
import { formatNarInfo } from "../../src/cache/narinfo.ts";
import {
  metadataContract,
  normalized,
  testHash,
  testHashPart,
  testNarInfo,
} from "./metadata_contract.ts";

metadataContract("kv", async () => {
  const cacheDir = await Deno.makeTempDir({ prefix: "arca-kv-metadata-" });
  return {
    store: await openMetadata(cacheDir, "kv"),
    reopen: () => openMetadata(cacheDir, "kv"),
    cleanup: () => Deno.remove(cacheDir, { recursive: true }),
  };
});

async function withCacheDir(fn: (cacheDir: string) => Promise<void>): Promise<void> {
  const cacheDir = await Deno.makeTempDir({ prefix: "arca-kv-metadata-" });
  try {
    await fn(cacheDir);
  } finally {
    await Deno.remove(cacheDir, { recursive: true });
  }
}

async function rawKeys(path: string): Promise<Deno.KvKey[]> {
  const kv = await Deno.openKv(path);
  try {
    const keys: Deno.KvKey[] = [];
    for await (const entry of kv.list({ prefix: [] })) keys.push(entry.key);
    return keys;
  } finally {
    kv.close();
  }
}

function manyReferences(count: number): string[] {
  return Array.from({ length: count }, (_, i) => `${testHashPart(`r${i}`)}-library-number-${i}`);
}

Deno.test("kv metadata: lives in <cacheDir>/db/arca.kv with the documented keys", async () => {
  await withCacheDir(async (cacheDir) => {
    const store = await openMetadata(cacheDir, "kv");
    const info = testNarInfo("layout");
    const hash = testHashPart("layout");
    try {
      await store.putPath({ narInfo: info, registeredAt: 42 });
    } finally {
      store.close();
    }
    const path = `${cacheDir}/db/arca.kv`;
    assert.ok((await Deno.stat(path)).isFile);
    assert.deepEqual(await rawKeys(path), [
      ["fileHash", testHash("file:layout").slice(7), hash],
      ["path", hash],
    ]);
    const kv = await Deno.openKv(path);
    try {
      assert.deepEqual((await kv.get(["path", hash])).value, {
        narinfo: formatNarInfo(info),
        registeredAt: 42,
        parts: 1,
        fileHash: testHash("file:layout").slice(7),
      });
    } finally {
      kv.close();
    }
  });
});

Deno.test("kv metadata: a large narinfo is split, and its parts go with it", async () => {
  await withCacheDir(async (cacheDir) => {
    const path = `${cacheDir}/db/arca.kv`;
    const store = await openMetadata(cacheDir, "kv");
    const hash = testHashPart("split");
    const big = testNarInfo("split", { references: manyReferences(5000) });
    const text = formatNarInfo(big);
    assert.ok(text.length > 4 * 60_000 && text.length < KV_MAX_NARINFO_BYTES);
    try {
      await store.putPath({ narInfo: big, registeredAt: 1 });
      const parts = (await rawKeys(path)).filter((k) => k[0] === "path" && k.length === 3);
      assert.equal(parts.length, Math.ceil(text.length / 60_000) - 1);
      assert.deepEqual(await store.getPath(hash), { narInfo: normalized(big), registeredAt: 1 });

      // Replaced by a small one: the extra parts are gone.
      await store.putPath({ narInfo: testNarInfo("split"), registeredAt: 2 });
      assert.deepEqual((await rawKeys(path)).filter((k) => k[0] === "path"), [["path", hash]]);

      // Deleted: nothing is left, parts and index included.
      await store.putPath({ narInfo: big, registeredAt: 3 });
      assert.equal(await store.deletePath(hash), true);
      assert.deepEqual(await rawKeys(path), []);
    } finally {
      store.close();
    }
  });
});

Deno.test("kv metadata: a narinfo too large for one commit is rejected, not stored", async () => {
  await withCacheDir(async (cacheDir) => {
    const store = await openMetadata(cacheDir, "kv");
    const huge = testNarInfo("huge", { references: manyReferences(14_000) });
    assert.ok(formatNarInfo(huge).length > KV_MAX_NARINFO_BYTES);
    try {
      await assert.rejects(
        store.putPath({ narInfo: huge, registeredAt: 1 }),
        (error: unknown) =>
          error instanceof FormatError &&
          /^Cannot store the narinfo of \/nix\/store\/\S+-huge in Deno KV: \d+ bytes, more than the 720000/
            .test(error.message),
      );
      assert.equal(await store.getPath(testHashPart("huge")), null);
      assert.equal(await store.findByFileHash(testHash("file:huge")), null);
    } finally {
      store.close();
    }
    assert.deepEqual(await rawKeys(`${cacheDir}/db/arca.kv`), []);
  });
});

Deno.test("kv metadata: listing in small batches reassembles split records", async () => {
  await withCacheDir(async (cacheDir) => {
    const store = await openKvMetadata(`${cacheDir}/db/arca.kv`, { listBatchSize: 3 });
    try {
      const infos = Array.from({ length: 12 }, (_, i) =>
        testNarInfo(`batch-${i}`, {
          references: i % 3 === 0 ? manyReferences(1500 + i * 100) : [],
        }));
      for (const [i, narInfo] of infos.entries()) await store.putPath({ narInfo, registeredAt: i });
      const listed = [];
      for await (const record of store.listPaths()) listed.push(record);
      const want = infos.map((info, i) => ({ narInfo: normalized(info), registeredAt: i }))
        .sort((a, b) => a.narInfo.storePath < b.narInfo.storePath ? -1 : 1);
      assert.deepEqual(listed, want);
    } finally {
      store.close();
    }
  });
});

Deno.test("kv metadata: an unknown backend is a UsageError", async () => {
  await assert.rejects(
    openMetadata("/nonexistent", "sqlite" as MetadataBackend),
    (error: unknown) =>
      error instanceof UsageError &&
      error.message === "Unknown metadata backend 'sqlite': expected kv or filesystem",
  );
});

Deno.test("withRetry retries busy errors with backoff, then succeeds", async () => {
  let calls = 0;
  const result = await withRetry(() => {
    calls++;
    if (calls < 4) return Promise.reject(new Error("database is locked"));
    return Promise.resolve("done");
  }, { baseDelayMs: 1 });
  assert.equal(result, "done");
  assert.equal(calls, 4);
});

Deno.test("withRetry gives up after `attempts`, rethrowing the last error", async () => {
  let calls = 0;
  const last = new Error("database is locked");
  await assert.rejects(
    withRetry(() => {
      calls++;
      return Promise.reject(calls === 3 ? last : new Error("database is busy"));
    }, { attempts: 3, baseDelayMs: 1 }),
    (error: unknown) => error === last,
  );
  assert.equal(calls, 3);
});

Deno.test("withRetry does not retry other errors", async () => {
  let calls = 0;
  const other = new FormatError("Cannot parse narinfo line 1: missing ':'");
  await assert.rejects(
    withRetry(() => {
      calls++;
      return Promise.reject(other);
    }),
    (error: unknown) => error === other,
  );
  assert.equal(calls, 1);
  // A custom predicate decides instead.
  calls = 0;
  const value = await withRetry(() => {
    calls++;
    return calls === 1 ? Promise.reject(new Error("flaky")) : Promise.resolve(7);
  }, { isRetryable: (e) => e instanceof Error && e.message === "flaky", baseDelayMs: 1 });
  assert.equal(value, 7);
});

Deno.test("isDatabaseBusyError recognizes SQLite's busy and locked errors only", () => {
  for (
    const message of [
      "database is locked",
      'SqliteFailure(Error { code: DatabaseBusy, extended_code: 5 }, Some("database is locked"))',
      "database table is locked",
      "database is busy",
      "SQLITE_BUSY: database is locked",
    ]
  ) {
    assert.equal(isDatabaseBusyError(new Error(message)), true, message);
  }
  assert.equal(
    isDatabaseBusyError(new Error("commit failed", { cause: new TypeError("database is locked") })),
    true,
  );
  for (const other of [new Error("Database closed"), new TypeError("Value too large"), "x", null]) {
    assert.equal(isDatabaseBusyError(other), false, String(other));
  }
});

Deno.test({
  name: "kv metadata: the real 'database is locked' of Deno.openKv is retried",
  // Deno KV waits SQLite's busy timeout (5 s) before it throws.
  async fn() {
    await withCacheDir(async (cacheDir) => {
      const path = `${cacheDir}/arca.kv`;
      // A fresh SQLite file, not yet in WAL mode, locked exclusively: Deno.openKv cannot
      // switch it to WAL and fails with SQLite's own message.
      const db = new DatabaseSync(path);
      db.exec("BEGIN EXCLUSIVE");
      let locked = true;
      const seen: unknown[] = [];
      try {
        const kv = await withRetry(() => Deno.openKv(path), {
          isRetryable(error) {
            seen.push(error);
            if (locked) {
              db.exec("COMMIT");
              locked = false;
            }
            return isDatabaseBusyError(error);
          },
        });
        await kv.set(["ok"], true);
        kv.close();
      } finally {
        if (locked) db.exec("COMMIT");
        db.close();
      }
      assert.equal(seen.length, 1);
      assert.ok(seen[0] instanceof Error);
      assert.equal((seen[0] as Error).message, "database is locked");
    });
  },
});
