/**
 * The in-process read caches of the metadata backends never serve a stale record: a reader
 * store sees what another store on the same data (in this process, or in another process)
 * added, replaced or deleted as soon as that store's `putPath`/`deletePath` returned,
 * FileHash lookups follow replaced records, and the records handed out are frozen. Run
 * against both backends; plus the KV change file and the filesystem backend's file
 * identity check.
 * @module
 */

import assert from "node:assert/strict";
import { join } from "node:path";
import {
  type MetadataBackend,
  type MetadataStore,
  openMetadata,
  type PathRecord,
} from "../../src/cache/metadata.ts";
import { KV_CHANGES_SUFFIX } from "../../src/cache/kv_metadata.ts";
import { formatNarInfo, type NarInfo } from "../../src/cache/narinfo.ts";
import { normalized, testHash, testHashPart, testNarInfo } from "./metadata_contract.ts";

const BACKENDS: MetadataBackend[] = ["kv", "filesystem"];

/** A narinfo of path `seed` whose NAR is encoded as `variant` (FileHash, URL) and signed `sig`. */
function variantInfo(seed: string, variant: string, sig = "a"): NarInfo {
  const fileHash = testHash(`file:${seed}:${variant}`);
  return testNarInfo(seed, {
    fileHash,
    url: `nar/${fileHash.slice("sha256:".length)}.nar.zst`,
    sigs: [`test-1:${btoa(sig.repeat(64))}`],
  });
}

function record(narInfo: NarInfo, registeredAt = 1): PathRecord {
  return { narInfo, registeredAt };
}

async function withTwoStores(
  backend: MetadataBackend,
  fn: (reader: MetadataStore, writer: MetadataStore, cacheDir: string) => Promise<void>,
): Promise<void> {
  const cacheDir = await Deno.makeTempDir({ prefix: "arca-metadata-freshness-" });
  const reader = await openMetadata(cacheDir, backend);
  const writer = await openMetadata(cacheDir, backend);
  try {
    await fn(reader, writer, cacheDir);
  } finally {
    reader.close();
    writer.close();
    await Deno.remove(cacheDir, { recursive: true });
  }
}

/** The writer child process: one `put` or `delete` on the store, then exit. */
async function childMain(args: string[]): Promise<void> {
  const [cacheDir, backend, op, seed, variant, sig] = args;
  const store = await openMetadata(cacheDir, backend as MetadataBackend);
  try {
    if (op === "put") await store.putPath(record(variantInfo(seed, variant, sig), 7));
    else await store.deletePath(testHashPart(seed));
  } finally {
    store.close();
  }
}

if (import.meta.main && Deno.args[0] === "child") {
  await childMain(Deno.args.slice(1));
  Deno.exit(0);
}

/** Runs one writer operation in a separate `deno` process and waits for it. */
async function inChild(cacheDir: string, backend: MetadataBackend, ...args: string[]) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", import.meta.filename!, "child", cacheDir, backend, ...args],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
}

for (const backend of BACKENDS) {
  Deno.test(`${backend} metadata freshness: another store's add, replace and delete are seen at once`, async () => {
    await withTwoStores(backend, async (reader, writer) => {
      const hash = testHashPart("fresh");
      const v1 = variantInfo("fresh", "v1");
      const v2 = variantInfo("fresh", "v2", "b");

      // A miss is not remembered: the path is found right after it is added.
      assert.equal(await reader.getPath(hash), null);
      assert.equal(await reader.getStoredPath(hash), null);
      assert.equal(await reader.findByFileHash(v1.fileHash!), null);
      await writer.putPath(record(v1));
      assert.deepEqual(await reader.getPath(hash), record(normalized(v1)));
      assert.equal(await reader.findByFileHash(v1.fileHash!), hash);
      for (let i = 0; i < 3; i++) {
        const stored = await reader.getStoredPath(hash);
        assert.equal(stored?.text, formatNarInfo(v1));
        assert.deepEqual(stored?.record, record(normalized(v1)));
      }

      // Replaced with another NAR encoding and signature: the new record, and the FileHash
      // lookups follow it.
      await writer.putPath(record(v2, 2));
      assert.deepEqual(await reader.getPath(hash), record(normalized(v2), 2));
      assert.equal((await reader.getStoredPath(hash))?.text, formatNarInfo(v2));
      assert.equal(await reader.findByFileHash(v1.fileHash!), null);
      assert.equal(await reader.findByFileHash(v2.fileHash!), hash);

      // Deleted: gone for every kind of read.
      assert.equal(await writer.deletePath(hash), true);
      assert.equal(await reader.getPath(hash), null);
      assert.equal(await reader.getStoredPath(hash), null);
      assert.equal(await reader.findByFileHash(v2.fileHash!), null);

      // And back.
      await writer.putPath(record(v1, 3));
      assert.deepEqual(await reader.getPath(hash), record(normalized(v1), 3));
      assert.equal(await reader.findByFileHash(v1.fileHash!), hash);
    });
  });

  Deno.test(`${backend} metadata freshness: a FileHash shared by two paths leads to the one left`, async () => {
    await withTwoStores(backend, async (reader, writer) => {
      const shared = testHash("file:shared");
      const url = `nar/${shared.slice("sha256:".length)}.nar.zst`;
      const first = testNarInfo("first", { fileHash: shared, url });
      const second = testNarInfo("second", { fileHash: shared, url });
      await writer.putPath(record(first));
      await writer.putPath(record(second));
      const found = await reader.findByFileHash(shared);
      assert.ok(found === testHashPart("first") || found === testHashPart("second"));
      await writer.deletePath(found!);
      const other = found === testHashPart("first")
        ? testHashPart("second")
        : testHashPart("first");
      assert.equal(await reader.findByFileHash(shared), other);
      await writer.deletePath(other);
      assert.equal(await reader.findByFileHash(shared), null);
    });
  });

  Deno.test(`${backend} metadata freshness: records handed out are frozen`, async () => {
    await withTwoStores(backend, async (reader, writer) => {
      const info = testNarInfo("frozen", {
        references: [`${testHashPart("dep")}-dep`],
      });
      await writer.putPath(record(info));
      const got = (await reader.getPath(testHashPart("frozen")))!;
      assert.throws(() => got.narInfo.sigs.push("x:y"), TypeError);
      assert.throws(() => got.narInfo.references.pop(), TypeError);
      assert.throws(() => {
        (got.narInfo as { narSize: number }).narSize = 1;
      }, TypeError);
      assert.throws(() => {
        (got as { registeredAt: number }).registeredAt = 2;
      }, TypeError);
      // A copy is the way to change one, as writers do.
      const copy: PathRecord = { ...got, narInfo: { ...got.narInfo, sigs: [] } };
      await writer.putPath(copy);
      assert.deepEqual((await reader.getPath(testHashPart("frozen")))?.narInfo.sigs, []);
    });
  });

  Deno.test(`${backend} metadata freshness: peekStoredPath answers only what getStoredPath would`, async () => {
    await withTwoStores(backend, async (reader, writer) => {
      const hash = testHashPart("peek");
      const v1 = variantInfo("peek", "v1");
      const v2 = variantInfo("peek", "v2", "b");
      assert.equal(reader.peekStoredPath(hash), undefined); // never read: ask getStoredPath
      assert.equal(reader.peekStoredPath("not-a-hash-part"), undefined);
      await writer.putPath(record(v1));
      const first = await reader.getStoredPath(hash);
      assert.equal(first?.text, formatNarInfo(v1));
      assert.equal(reader.peekStoredPath(hash), first);

      // Replaced elsewhere: the old record is never the answer.
      await writer.putPath(record(v2, 2));
      assert.equal(reader.peekStoredPath(hash), undefined);
      const second = await reader.getStoredPath(hash);
      assert.equal(second?.text, formatNarInfo(v2));
      assert.equal(reader.peekStoredPath(hash), second);

      // Deleted elsewhere: absent or unknown, never the record.
      await writer.deletePath(hash);
      const peeked = reader.peekStoredPath(hash);
      assert.ok(peeked === undefined || peeked === null, "no stale record");
      assert.equal(await reader.getStoredPath(hash), null);
      assert.equal(reader.peekStoredPath(hash), undefined);
    });
  });

  Deno.test(`${backend} metadata freshness: writes by other processes are seen at once`, async () => {
    await withTwoStores(backend, async (reader, _writer, cacheDir) => {
      const hash = testHashPart("proc");
      assert.equal(await reader.getPath(hash), null);
      await inChild(cacheDir, backend, "put", "proc", "v1", "a");
      assert.equal(
        (await reader.getStoredPath(hash))?.text,
        formatNarInfo(variantInfo("proc", "v1")),
      );
      assert.equal(await reader.findByFileHash(variantInfo("proc", "v1").fileHash!), hash);

      await inChild(cacheDir, backend, "put", "proc", "v2", "c");
      const v2 = variantInfo("proc", "v2", "c");
      assert.deepEqual(await reader.getPath(hash), record(normalized(v2), 7));
      assert.equal(await reader.findByFileHash(variantInfo("proc", "v1").fileHash!), null);
      assert.equal(await reader.findByFileHash(v2.fileHash!), hash);

      await inChild(cacheDir, backend, "delete", "proc");
      assert.equal(await reader.getPath(hash), null);
      assert.equal(await reader.findByFileHash(v2.fileHash!), null);
    });
  });
}

Deno.test("kv metadata freshness: commits are announced in the change file, which readers check", async () => {
  await withTwoStores("kv", async (reader, writer, cacheDir) => {
    const kvPath = join(cacheDir, "db", "arca.kv");
    const changes = kvPath + KV_CHANGES_SUFFIX;
    const hash = testHashPart("announced");
    const before = await Deno.readFile(changes);
    await writer.putPath(record(testNarInfo("announced")));
    const after = await Deno.readFile(changes);
    assert.equal(after.length, 16);
    assert.notDeepEqual(after, before);
    assert.ok((await reader.getPath(hash)) !== null);

    // A change made behind the stores' back (no announcement, as by a writer that died
    // between its commit and the announcement) is seen once the change file changes (or
    // after KV_TRUST_MS).
    const kv = await Deno.openKv(kvPath);
    try {
      const head = await kv.get<{ narinfo: string }>(["path", hash]);
      const changed = formatNarInfo(testNarInfo("announced", { narSize: 99 }));
      await kv.set(["path", hash], { ...head.value, narinfo: changed });
    } finally {
      kv.close();
    }
    await Deno.writeFile(changes, crypto.getRandomValues(new Uint8Array(16)));
    assert.equal((await reader.getPath(hash))?.narInfo.narSize, 99);
  });
});

Deno.test("filesystem metadata freshness: a narinfo file replaced by another tool is noticed", async () => {
  await withTwoStores("filesystem", async (reader, writer, cacheDir) => {
    const hash = testHashPart("replaced");
    await writer.putPath(record(testNarInfo("replaced"), 1000));
    assert.equal((await reader.getPath(hash))?.narInfo.narSize, 5678);
    // Same length, same mtime: only the inode (and ctime) differ.
    const text = formatNarInfo(testNarInfo("replaced", { narSize: 8765 }));
    const file = join(cacheDir, "narinfo", `${hash}.narinfo`);
    const temp = `${file}.new`;
    await Deno.writeTextFile(temp, text);
    await Deno.utime(temp, new Date(1000), new Date(1000));
    await Deno.rename(temp, file);
    assert.equal((await reader.getPath(hash))?.narInfo.narSize, 8765);
    await Deno.remove(file);
    assert.equal(await reader.getPath(hash), null);
  });
});
