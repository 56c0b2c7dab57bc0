/**
 * Uploads are stored first and chunked in the background (src/net/uploads.ts,
 * src/net/pending_uploads.ts): served at once, imported later, also after a restart; the
 * garbage collector keeps what they reference.
 */
import assert from "node:assert/strict";
import { compressChunk } from "../../src/cache/compression.ts";
import { decompressStream } from "../../src/cache/decompress_stream.ts";
import { collectGarbage } from "../../src/cache/gc.ts";
import { formatNixHash, sha256 } from "../../src/cache/hash.ts";
import { encodeNar } from "../../src/cache/nar.ts";
import { parseNarInfo } from "../../src/cache/narinfo.ts";
import { encodeNixBase32 } from "../../src/cache/nixbase32.ts";
import { UNIVERSAL_SEGMENT } from "../../src/config.ts";
import { createHandler, type Handler } from "../../src/net/server.ts";
import {
  fakeStorePath,
  hashPartOf,
  importFixture,
  makeCacheFixture,
  pseudoRandomBytes,
} from "../helpers/cache_fixture.ts";
import type { Cache } from "../../src/cache/cache.ts";
import { readPendingUploads } from "../../src/cache/pending_records.ts";
import { PendingUploads } from "../../src/net/pending_uploads.ts";

const BASE = "http://arca.test";
const TOKEN = "pending-uploads-token";

function handlerOf(cache: Cache, log?: (line: string) => void): Handler {
  return createHandler(cache, {
    priority: 40,
    log,
    upload: { token: TOKEN, compression: "zstd", segments: [UNIVERSAL_SEGMENT] },
  });
}

/** Uploads a NAR (xz) and its narinfo as `nix copy --to` does; returns the NAR and file URL. */
async function upload(
  handler: Handler,
  storePath: string,
  options: { size?: number; seed?: number; references?: string[]; none?: boolean } = {},
) {
  const nar = encodeNar({
    type: "regular",
    contents: pseudoRandomBytes(options.size ?? 300_000, options.seed ?? 1),
  });
  const file = options.none ? nar : compressChunk(nar, "xz");
  const url = `nar/${encodeNixBase32(sha256(file))}.nar${options.none ? "" : ".xz"}`;
  const auth = { authorization: `Bearer ${TOKEN}` };
  const put = await handler(
    new Request(`${BASE}/${url}`, { method: "PUT", body: file.slice(), headers: auth }),
  );
  assert.equal(put.status, 204, await put.text());
  const narinfo = [
    `StorePath: ${storePath}`,
    `URL: ${url}`,
    `Compression: ${options.none ? "none" : "xz"}`,
    `FileHash: ${formatNixHash(sha256(file))}`,
    `FileSize: ${file.length}`,
    `NarHash: ${formatNixHash(sha256(nar))}`,
    `NarSize: ${nar.length}`,
    `References: ${(options.references ?? []).join(" ")}`,
    "",
  ].join("\n");
  const info = await handler(
    new Request(`${BASE}/${hashPartOf(storePath)}.narinfo`, {
      method: "PUT",
      body: narinfo,
      headers: auth,
    }),
  );
  assert.equal(info.status, 204, await info.text());
  return { nar, file, url };
}

async function narThrough(handler: Handler, url: string): Promise<Uint8Array> {
  const response = await handler(new Request(`${BASE}/${url}`));
  assert.equal(response.status, 200, url);
  const compression = url.endsWith(".xz") ? "xz" : url.endsWith(".zst") ? "zstd" : "none";
  const body = response.body!.pipeThrough(decompressStream(compression));
  return new Uint8Array(await new Response(body).arrayBuffer());
}

Deno.test("an upload is served at once from its file, then from the cache under the same URL", async () => {
  await using fixture = await makeCacheFixture();
  const handler = handlerOf(fixture.cache);
  try {
    const storePath = fakeStorePath("uploaded");
    const { nar, url } = await upload(handler, storePath);
    // Served before it is chunked: the narinfo names the uploaded file.
    const info = parseNarInfo(
      await (await handler(new Request(`${BASE}/${hashPartOf(storePath)}.narinfo`))).text(),
    );
    assert.equal(info.url, url);
    assert.equal(info.compression, "xz");
    assert.deepEqual(await narThrough(handler, url), nar);
    // Then imported in the background.
    await importedAll(fixture, [storePath]);
    const record = await fixture.cache.getPath(hashPartOf(storePath));
    assert.ok(record, "imported");
    assert.equal(record.narInfo.narHash, formatNixHash(sha256(nar)));
    // Nix keeps the narinfo it uploaded: the file's URL still serves the NAR.
    assert.deepEqual(await narThrough(handler, url), nar);
    const local = parseNarInfo(
      await (await handler(new Request(`${BASE}/${hashPartOf(storePath)}.narinfo`))).text(),
    );
    assert.notEqual(local.url, url);
    assert.deepEqual(await narThrough(handler, local.url), nar);
    assert.deepEqual(await Array.fromAsync(Deno.readDir(`${fixture.dir}/uploads/pending`)), []);
  } finally {
    await handler.close();
  }
});

Deno.test("accepted uploads left by a stop are imported at the next start", async () => {
  await using fixture = await makeCacheFixture();
  const storePath = fakeStorePath("left-pending");
  const first = handlerOf(fixture.cache);
  let nar: Uint8Array;
  try {
    ({ nar } = await upload(first, storePath));
  } finally {
    // Stopped within the second an import waits for quiet: it stays pending.
    await first.close();
  }
  assert.equal(await fixture.cache.getPath(hashPartOf(storePath)), null);
  const left = await readPendingUploads(fixture.dir);
  assert.deepEqual(left.map((upload) => [upload.storePath, upload.narSize]), [
    [storePath, nar.length],
  ]);
  const second = handlerOf(fixture.cache);
  try {
    await importedAll(fixture, [storePath]);
    const stored = await fixture.cache.narOfPath(hashPartOf(storePath));
    assert.ok(stored, "imported by the next server");
    const whole = new Uint8Array(
      await new Response(fixture.cache.openNar(stored.manifest)).arrayBuffer(),
    );
    assert.deepEqual(whole, nar);
  } finally {
    await second.close();
  }
});

Deno.test("gc keeps what a pending upload references, and the upload then imports whole", async () => {
  await using fixture = await makeCacheFixture();
  const dep = await importFixture(fixture.cache, {
    type: "regular",
    contents: pseudoRandomBytes(200_000, 9),
  }, {
    storePath: fakeStorePath("dep-of-pending"),
  });
  const storePath = fakeStorePath("pending-top");
  const first = handlerOf(fixture.cache);
  try {
    await upload(first, storePath, { references: [dep.storePath.slice("/nix/store/".length)] });
  } finally {
    await first.close();
  }
  // A file a crash left in pending/ without its record goes; the pending upload's stays.
  const orphan = `${fixture.dir}/uploads/pending/${"1".repeat(52)}.nar.xz`;
  await Deno.writeTextFile(orphan, "left by a crash");
  await new Promise((resolve) => setTimeout(resolve, 20));
  // Nothing cached references dep, and the size limit wants everything gone.
  const report = await collectGarbage(fixture.cache, { maxSizeBytes: 0, graceMs: 10 });
  assert.deepEqual(report.evicted, []);
  const left = (await Array.fromAsync(Deno.readDir(`${fixture.dir}/uploads/pending`)))
    .map((entry) => entry.name);
  assert.equal(left.length, 2, left.join(", "));
  assert.ok(!left.includes(orphan.split("/").pop()!), "the orphan is removed");
  assert.ok(await fixture.cache.getPath(dep.hashPart), "dep stays");
  const second = handlerOf(fixture.cache);
  try {
    await importedAll(fixture, [storePath]);
    assert.ok(await fixture.cache.getPath(hashPartOf(storePath)), "the upload is imported");
  } finally {
    await second.close();
  }
  // Once imported, the path itself holds dep; with both unused, both may go.
  const after = await collectGarbage(fixture.cache, { maxSizeBytes: 0 });
  assert.equal(after.evicted.length, 2);
});

Deno.test("an uncompressed upload's .nar URL works in a process that never served its narinfo", async () => {
  await using fixture = await makeCacheFixture();
  const storePath = fakeStorePath("uploaded-none");
  const first = handlerOf(fixture.cache);
  let nar: Uint8Array;
  let url: string;
  try {
    ({ nar, url } = await upload(first, storePath, { none: true }));
    assert.deepEqual(await narThrough(first, url), nar);
  } finally {
    await first.close();
  }
  // Nix kept the narinfo it uploaded; a server that starts without knowing its URL finds
  // the pending upload by the NarHash in it.
  const pending = new PendingUploads(fixture.cache, { compression: "zstd" });
  try {
    const found = await pending.lookupByNarHash(formatNixHash(sha256(nar)));
    assert.equal(found?.hashPart, hashPartOf(storePath));
  } finally {
    await pending.close();
  }
  const second = handlerOf(fixture.cache);
  try {
    assert.deepEqual(await narThrough(second, url), nar);
  } finally {
    await second.close();
  }
});

Deno.test("a pending record that is not one (a path outside, a wrong name) is skipped, not followed", async () => {
  await using fixture = await makeCacheFixture();
  const storePath = fakeStorePath("tampered-record");
  const hashPart = hashPartOf(storePath);
  await Deno.mkdir(`${fixture.dir}/uploads/pending`, { recursive: true });
  const record = {
    hashPart,
    storePath,
    narHash: formatNixHash(sha256(new Uint8Array([1]))),
    narSize: 1,
    fileHash: formatNixHash(sha256(new Uint8Array([1]))),
    fileSize: 1,
    compression: "none",
    references: [],
    sigs: [],
    file: "../../../etc/passwd",
    acceptedAt: 1,
  };
  await Deno.writeTextFile(
    `${fixture.dir}/uploads/pending/${hashPart}.json`,
    JSON.stringify(record),
  );
  await Deno.writeTextFile(`${fixture.dir}/uploads/pending/${"0".repeat(32)}.json`, "{not json");
  const logged: string[] = [];
  const handler = handlerOf(fixture.cache, (line) => logged.push(line));
  try {
    const response = await handler(new Request(`${BASE}/${hashPart}.narinfo`));
    assert.equal(response.status, 404);
    await response.body?.cancel();
    assert.equal(logged.filter((line) => /Pending upload .* skipped/.test(line)).length, 2);
  } finally {
    await handler.close();
  }
});

/**
 * Waits (bounded) until the cache holds `storePaths` and no pending upload is left (the
 * record and the file go right after the commit).
 */
async function importedAll(fixture: { cache: Cache; dir: string }, storePaths: string[]) {
  const pending = () =>
    Array.fromAsync(Deno.readDir(`${fixture.dir}/uploads/pending`)).catch(() => []);
  for (let i = 0; i < 300; i++) {
    const held = await Promise.all(storePaths.map((p) => fixture.cache.getPath(hashPartOf(p))));
    if (held.every((record) => record !== null) && (await pending()).length === 0) return;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`not imported: ${storePaths.join(", ")}`);
}

/** PUTs a narinfo for `storePath` naming `file` (no NAR upload: Nix's HEAD found it). */
async function putNarInfoOnly(
  handler: Handler,
  storePath: string,
  nar: Uint8Array,
  file: Uint8Array,
) {
  const url = `nar/${encodeNixBase32(sha256(file))}.nar.xz`;
  const narinfo = [
    `StorePath: ${storePath}`,
    `URL: ${url}`,
    "Compression: xz",
    `FileHash: ${formatNixHash(sha256(file))}`,
    `FileSize: ${file.length}`,
    `NarHash: ${formatNixHash(sha256(nar))}`,
    `NarSize: ${nar.length}`,
    "References: ",
    "",
  ].join("\n");
  return await handler(
    new Request(`${BASE}/${hashPartOf(storePath)}.narinfo`, {
      method: "PUT",
      body: narinfo,
      headers: { authorization: `Bearer ${TOKEN}` },
    }),
  );
}

Deno.test("two paths with the same NAR: uploaded side by side, or the second after a HEAD found the file", async () => {
  await using fixture = await makeCacheFixture();
  const handler = handlerOf(fixture.cache);
  try {
    // Side by side (two nix copy at once): both NAR PUTs, then both narinfos.
    const a = fakeStorePath("same-nar-a");
    const b = fakeStorePath("same-nar-b");
    const first = await upload(handler, a, { seed: 41 });
    const again = await handler(
      new Request(`${BASE}/${first.url}`, {
        method: "PUT",
        body: first.file.slice(),
        headers: { authorization: `Bearer ${TOKEN}` },
      }),
    );
    assert.equal(again.status, 204);
    await again.body?.cancel();
    const second = await putNarInfoOnly(handler, b, first.nar, first.file);
    assert.equal(second.status, 204, await second.text());
    await importedAll(fixture, [a, b]);

    // Later: Nix's HEAD finds the file (now arca's own copy of a), so it sends the narinfo only.
    const c = fakeStorePath("same-nar-c");
    const head = await handler(new Request(`${BASE}/${first.url}`, { method: "HEAD" }));
    assert.equal(head.status, 200);
    await head.body?.cancel();
    const third = await putNarInfoOnly(handler, c, first.nar, first.file);
    assert.equal(third.status, 204, await third.text());
    assert.ok(await fixture.cache.getPath(hashPartOf(c)), "c is in the cache at once");

    // While the first is still pending: the narinfo of the second reuses its file.
    const d = fakeStorePath("same-nar-d");
    const e = fakeStorePath("same-nar-e");
    const fourth = await upload(handler, d, { seed: 42 });
    const fifth = await putNarInfoOnly(handler, e, fourth.nar, fourth.file);
    assert.equal(fifth.status, 204, await fifth.text());
    await importedAll(fixture, [d, e]);

    for (
      const [path, nar] of [[a, first.nar], [b, first.nar], [c, first.nar], [d, fourth.nar], [
        e,
        fourth.nar,
      ]] as const
    ) {
      const info = parseNarInfo(
        await (await handler(new Request(`${BASE}/${hashPartOf(path)}.narinfo`))).text(),
      );
      assert.equal(info.storePath, path);
      assert.deepEqual(await narThrough(handler, info.url), nar, path);
    }
  } finally {
    await handler.close();
  }
});

Deno.test("a pending record with fields of the wrong kind is skipped, and gc still runs", async () => {
  await using fixture = await makeCacheFixture();
  const storePath = fakeStorePath("bad-fields");
  const hashPart = hashPartOf(storePath);
  await Deno.mkdir(`${fixture.dir}/uploads/pending`, { recursive: true });
  const hash = formatNixHash(sha256(new Uint8Array([2])));
  await Deno.writeTextFile(
    `${fixture.dir}/uploads/pending/${hashPart}.json`,
    JSON.stringify({
      hashPart,
      storePath,
      narHash: hash,
      narSize: 1,
      fileHash: hash,
      fileSize: 1,
      compression: "xz",
      references: null,
      sigs: [],
      file: `${hashPart}.nar.xz`,
      acceptedAt: 1,
    }),
  );
  const report = await collectGarbage(fixture.cache, { maxSizeBytes: 0 });
  assert.deepEqual(report.evicted, []);
});

Deno.test("gc keeps what a path committed during the collection references", async () => {
  await using fixture = await makeCacheFixture();
  const { cache } = fixture;
  const dep = await importFixture(cache, {
    type: "regular",
    contents: pseudoRandomBytes(50_000, 3),
  }, {
    storePath: fakeStorePath("dep-of-late"),
  });
  const late = fakeStorePath("late");
  // While gc reads the manifests of the paths it listed, a path referencing dep is committed
  // (an upload's background import, a fetch from a peer).
  const read = cache.manifests.read.bind(cache.manifests);
  let committed = false;
  cache.manifests.read = async (hash: Uint8Array) => {
    if (!committed) {
      committed = true;
      await importFixture(cache, { type: "regular", contents: pseudoRandomBytes(10_000, 4) }, {
        storePath: late,
        references: [dep.storePath.slice("/nix/store/".length)],
      });
    }
    return await read(hash);
  };
  try {
    const report = await collectGarbage(cache, { maxAgeMs: 0, now: Date.now() + 60_000 });
    assert.ok(committed);
    assert.deepEqual(report.evicted, []);
    assert.ok(await cache.getPath(dep.hashPart), "dep stays: late references it");
    assert.ok(await cache.getPath(hashPartOf(late)));
  } finally {
    cache.manifests.read = read;
  }
});
