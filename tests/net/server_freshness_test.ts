/**
 * The substituter handler reads through in-process caches (records, FileHash lookups,
 * manifests, signed narinfos); these cases check that what another Cache object on the same
 * directory does (as another `arca` process would) is served at once: a narinfo asked for
 * before an import is found right after it, a garbage-collected path is a 404 for its
 * narinfo and its NAR right after the collection, and a record replaced with more
 * signatures is served with them. Unsigned narinfos are the stored text byte for byte.
 * Both metadata backends.
 * @module
 */

import assert from "node:assert/strict";
import { Cache } from "../../src/cache/cache.ts";
import { collectGarbage } from "../../src/cache/gc.ts";
import { formatNixHash, sha256 } from "../../src/cache/hash.ts";
import type { MetadataBackend } from "../../src/cache/metadata.ts";
import { formatNarInfo, parseNarInfo } from "../../src/cache/narinfo.ts";
import {
  generateSecretKey,
  publicKeyOf,
  signatureKeyName,
  signNarInfo,
  verifyNarInfoSignatures,
} from "../../src/cache/signing.ts";
import { createHandler, type Handler } from "../../src/net/server.ts";
import {
  fakeStorePath,
  hashPartOf,
  importFixture,
  makeCacheFixture,
  pseudoRandomBytes,
} from "../helpers/cache_fixture.ts";

const BASE = "http://cache.test";
const BACKENDS: MetadataBackend[] = ["kv", "filesystem"];

async function fetchText(
  handler: Handler,
  path: string,
): Promise<{ status: number; text: string }> {
  const response = await handler(new Request(BASE + path));
  return { status: response.status, text: await response.text() };
}

async function fetchBytes(handler: Handler, path: string) {
  const response = await handler(new Request(BASE + path));
  return { status: response.status, body: new Uint8Array(await response.arrayBuffer()) };
}

const tree = (seed: number) => ({
  type: "directory" as const,
  entries: {
    "data": { type: "regular" as const, contents: pseudoRandomBytes(700 * 1024 + seed, seed) },
  },
});

for (const backend of BACKENDS) {
  Deno.test(`${backend} server freshness: imports and collections by another process are served at once`, async () => {
    await using fx = await makeCacheFixture({ backend });
    const handler = createHandler(fx.cache, { priority: 30 });
    const writer = await Cache.open(fx.dir, { backend });
    try {
      const storePath = fakeStorePath("fresh-1.0");
      const hashPart = hashPartOf(storePath);
      // Asked for before the import: a 404 that must not be remembered.
      assert.equal((await fetchText(handler, `/${hashPart}.narinfo`)).status, 404);

      const imported = await importFixture(writer, tree(1), { storePath });
      const narinfo = await fetchText(handler, `/${hashPart}.narinfo`);
      assert.equal(narinfo.status, 200);
      // Unsigned: exactly the stored text.
      assert.equal(narinfo.text, formatNarInfo(imported.result.record.narInfo));
      const info = parseNarInfo(narinfo.text);
      for (let i = 0; i < 3; i++) {
        const nar = await fetchBytes(handler, `/${info.url}`);
        assert.equal(nar.status, 200);
        assert.equal(formatNixHash(sha256(nar.body)), info.fileHash);
      }

      // Collected by the other process: narinfo and NAR are gone at once.
      const report = await collectGarbage(writer, { maxAgeMs: 0, now: Date.now() + 1000 });
      assert.deepEqual(report.evicted.map((e) => e.storePath), [storePath]);
      assert.equal((await fetchText(handler, `/${hashPart}.narinfo`)).status, 404);
      assert.equal((await fetchText(handler, `/${info.url}`)).status, 404);
      assert.equal((await fetchText(handler, `/${hashPart}.ls`)).status, 404);

      // Imported again: served again.
      await importFixture(writer, tree(1), { storePath });
      assert.equal((await fetchText(handler, `/${hashPart}.narinfo`)).text, narinfo.text);
      const nar = await fetchBytes(handler, `/${info.url}`);
      assert.equal(nar.status, 200);
      assert.equal(formatNixHash(sha256(nar.body)), info.fileHash);
    } finally {
      writer.close();
      await handler.close();
    }
  });

  Deno.test(`${backend} server freshness: signed on the fly from the current record`, async () => {
    await using fx = await makeCacheFixture({ backend });
    const key = generateSecretKey("arca-fresh-1");
    const other = generateSecretKey("other-1");
    const handler = createHandler(fx.cache, { priority: 30, signingKey: key });
    const writer = await Cache.open(fx.dir, { backend });
    try {
      const storePath = fakeStorePath("signed-1.0");
      const hashPart = hashPartOf(storePath);
      const imported = await importFixture(writer, tree(2), { storePath });
      const first = parseNarInfo((await fetchText(handler, `/${hashPart}.narinfo`)).text);
      assert.deepEqual(first.sigs.map(signatureKeyName), ["arca-fresh-1"]);
      assert.ok(verifyNarInfoSignatures(first, [publicKeyOf(key)]));
      // Served again (from the cache of signed narinfos): the same.
      assert.deepEqual(
        parseNarInfo((await fetchText(handler, `/${hashPart}.narinfo`)).text),
        first,
      );

      // The other process adds a signature to the record: served with both.
      const record = imported.result.record;
      const narInfo = { ...record.narInfo, sigs: [signNarInfo(record.narInfo, other)] };
      await writer.metadata.putPath({ ...record, narInfo });
      const second = parseNarInfo((await fetchText(handler, `/${hashPart}.narinfo`)).text);
      assert.deepEqual(second.sigs.map(signatureKeyName).sort(), ["arca-fresh-1", "other-1"]);
      assert.ok(verifyNarInfoSignatures(second, [publicKeyOf(key)]));
      assert.ok(verifyNarInfoSignatures(second, [publicKeyOf(other)]));

      // Deleted: a 404, signed or not.
      await writer.metadata.deletePath(hashPart);
      assert.equal((await fetchText(handler, `/${hashPart}.narinfo`)).status, 404);
    } finally {
      writer.close();
      await handler.close();
    }
  });
}

Deno.test("server: a narinfo served from memory still needs the read token", async () => {
  await using fx = await makeCacheFixture();
  const token = "read-token-0123456789";
  const handler = createHandler(fx.cache, { priority: 30, readToken: token });
  try {
    const storePath = fakeStorePath("guarded-1.0");
    const hashPart = hashPartOf(storePath);
    await importFixture(fx.cache, tree(3), { storePath });
    const authorized = { authorization: `Bearer ${token}` };
    for (let i = 0; i < 3; i++) {
      const ok = await handler(new Request(`${BASE}/${hashPart}.narinfo`, { headers: authorized }));
      assert.equal(ok.status, 200);
      await ok.body?.cancel();
      const refused = await handler(new Request(`${BASE}/${hashPart}.narinfo`));
      assert.equal(refused.status, 401);
      await refused.body?.cancel();
      const wrong = await handler(
        new Request(`${BASE}/${hashPart}.narinfo`, { headers: { authorization: "Bearer nope" } }),
      );
      assert.equal(wrong.status, 401);
      await wrong.body?.cancel();
    }
  } finally {
    await handler.close();
  }
});
