/**
 * The filesystem metadata backend: the shared contract, its on-disk layout (clean narinfo
 * text, registeredAt as mtime, the FileHash index), visibility rules and path safety.
 */

import assert from "node:assert/strict";
import { FormatError } from "../../src/errors.ts";
import { openMetadata } from "../../src/cache/metadata.ts";
import { formatNarInfo } from "../../src/cache/narinfo.ts";
import { metadataContract, testHash, testHashPart, testNarInfo } from "./metadata_contract.ts";

metadataContract("filesystem", async () => {
  const cacheDir = await Deno.makeTempDir({ prefix: "arca-fs-metadata-" });
  return {
    store: await openMetadata(cacheDir, "filesystem"),
    reopen: () => openMetadata(cacheDir, "filesystem"),
    cleanup: () => Deno.remove(cacheDir, { recursive: true }),
  };
});

async function withCacheDir(fn: (cacheDir: string) => Promise<void>): Promise<void> {
  const cacheDir = await Deno.makeTempDir({ prefix: "arca-fs-metadata-" });
  try {
    await fn(cacheDir);
  } finally {
    await Deno.remove(cacheDir, { recursive: true });
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}

async function names(dir: string): Promise<string[]> {
  const out: string[] = [];
  for await (const entry of Deno.readDir(dir)) out.push(entry.name);
  return out.sort();
}

Deno.test("filesystem metadata: the narinfo file is exactly the served text, mtime is registeredAt", async () => {
  await withCacheDir(async (cacheDir) => {
    const store = await openMetadata(cacheDir, "filesystem");
    const info = testNarInfo("layout", {
      references: [`${testHashPart("dep")}-dep`],
      deriver: `${testHashPart("layout.drv")}-layout.drv`,
    });
    const hash = testHashPart("layout");
    const nix32 = testHash("file:layout").slice("sha256:".length);
    try {
      await store.putPath({ narInfo: info, registeredAt: 1_732_547_123_457 });
    } finally {
      store.close();
    }
    const file = `${cacheDir}/narinfo/${hash}.narinfo`;
    assert.equal(await Deno.readTextFile(file), formatNarInfo(info));
    assert.equal((await Deno.stat(file)).mtime?.getTime(), 1_732_547_123_457);
    assert.deepEqual(
      await names(`${cacheDir}/narinfo`),
      [`${hash}.narinfo`, "by-file-hash"].sort(),
    );
    assert.deepEqual(await names(`${cacheDir}/narinfo/by-file-hash`), [nix32]);
    assert.deepEqual(await names(`${cacheDir}/narinfo/by-file-hash/${nix32}`), [hash]);
  });
});

Deno.test("filesystem metadata: deleting removes the narinfo, the index entry and its directory", async () => {
  await withCacheDir(async (cacheDir) => {
    const store = await openMetadata(cacheDir, "filesystem");
    try {
      await store.putPath({ narInfo: testNarInfo("gone"), registeredAt: 1 });
      assert.equal(await store.deletePath(testHashPart("gone")), true);
      assert.deepEqual(await names(`${cacheDir}/narinfo`), ["by-file-hash"]);
      assert.deepEqual(await names(`${cacheDir}/narinfo/by-file-hash`), []);
    } finally {
      store.close();
    }
  });
});

Deno.test("filesystem metadata: an index entry counts only when its narinfo has that FileHash", async () => {
  await withCacheDir(async (cacheDir) => {
    const store = await openMetadata(cacheDir, "filesystem");
    const index = `${cacheDir}/narinfo/by-file-hash`;
    try {
      // An entry whose narinfo is missing (a crash between the two writes of putPath).
      const orphan = testHash("orphan").slice(7);
      await Deno.mkdir(`${index}/${orphan}`);
      await Deno.writeTextFile(`${index}/${orphan}/${testHashPart("orphan")}`, "");
      assert.equal(await store.findByFileHash(`sha256:${orphan}`), null);

      // An entry left by a replaced record (concurrent writers of one path).
      await store.putPath({ narInfo: testNarInfo("moved"), registeredAt: 1 });
      const stale = testHash("stale").slice(7);
      await Deno.mkdir(`${index}/${stale}`);
      await Deno.writeTextFile(`${index}/${stale}/${testHashPart("moved")}`, "");
      assert.equal(await store.findByFileHash(`sha256:${stale}`), null);
      assert.equal(await store.findByFileHash(testHash("file:moved")), testHashPart("moved"));

      // Junk names in an index directory are ignored.
      await Deno.writeTextFile(`${index}/${stale}/not-a-hash`, "");
      assert.equal(await store.findByFileHash(`sha256:${stale}`), null);
    } finally {
      store.close();
    }
  });
});

Deno.test("filesystem metadata: invalid hash parts never reach the filesystem", async () => {
  await withCacheDir(async (cacheDir) => {
    // What `narinfo/../victim.narinfo` and `narinfo/<32 chars of ../>.narinfo` would hit.
    const victim = `${cacheDir}/victim.narinfo`;
    await Deno.writeTextFile(victim, formatNarInfo(testNarInfo("victim")));
    const store = await openMetadata(cacheDir, "filesystem");
    try {
      for (const bad of ["../victim", "../".repeat(10) + "ab", "/etc/passwd", "..", ""]) {
        await assert.rejects(store.getPath(bad), FormatError);
        await assert.rejects(store.deletePath(bad), FormatError);
      }
      await assert.rejects(store.findByFileHash("sha256:../../victim"), FormatError);
    } finally {
      store.close();
    }
    assert.ok(await exists(victim));
    assert.deepEqual(await names(`${cacheDir}/narinfo`), ["by-file-hash"]);
  });
});

Deno.test("filesystem metadata: temporary files and foreign names are not records", async () => {
  await withCacheDir(async (cacheDir) => {
    const store = await openMetadata(cacheDir, "filesystem");
    const dir = `${cacheDir}/narinfo`;
    try {
      await store.putPath({ narInfo: testNarInfo("real"), registeredAt: 1 });
      // A write in progress (or one a crash left less than an hour ago), and other files.
      const temp = `${dir}/.${testHashPart("half")}.0123456789abcdef.tmp`;
      await Deno.writeTextFile(temp, "StorePath: /nix/store/");
      await Deno.writeTextFile(`${dir}/README`, "hello");
      await Deno.mkdir(`${dir}/${testHashPart("dir")}.narinfo`);
      const listed = [];
      for await (const record of store.listPaths()) listed.push(record.narInfo.storePath);
      assert.deepEqual(listed, [testNarInfo("real").storePath]);
      // Reopening keeps a recent temporary file: another process may be writing it.
      const again = await openMetadata(cacheDir, "filesystem");
      again.close();
      assert.ok(await exists(temp));
    } finally {
      store.close();
    }
  });
});

Deno.test("filesystem metadata: a corrupt narinfo file is a FormatError naming the record", async () => {
  await withCacheDir(async (cacheDir) => {
    const store = await openMetadata(cacheDir, "filesystem");
    const dir = `${cacheDir}/narinfo`;
    const bad = testHashPart("bad");
    const wrong = testHashPart("wrong");
    try {
      await Deno.writeTextFile(`${dir}/${bad}.narinfo`, "this is not a narinfo\n");
      await assert.rejects(
        store.getPath(bad),
        (e: unknown) =>
          e instanceof FormatError &&
          e.message.startsWith(`Corrupt metadata record ${bad}: Cannot parse narinfo line 1`),
      );
      // A valid narinfo of another path under this name.
      await Deno.writeTextFile(`${dir}/${wrong}.narinfo`, formatNarInfo(testNarInfo("other")));
      await assert.rejects(
        store.getPath(wrong),
        (e: unknown) =>
          e instanceof FormatError &&
          e.message ===
            `Corrupt metadata record ${wrong}: it holds the narinfo of ${
              testNarInfo("other").storePath
            }`,
      );
      // Replacing or deleting a corrupt record still works.
      await store.putPath({ narInfo: testNarInfo("bad"), registeredAt: 9 });
      assert.equal((await store.getPath(bad))?.registeredAt, 9);
      assert.equal(await store.deletePath(wrong), true);
      assert.equal(await store.getPath(wrong), null);
    } finally {
      store.close();
    }
  });
});
