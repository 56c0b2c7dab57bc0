/**
 * The substituter handler in-process (no socket): nix-cache-info, narinfo GET/HEAD and
 * on-the-fly signing, NAR bodies (checked with the zstd/xz CLIs and against FileHash and
 * FileSize), Range requests, `.ls` listings, and what happens when data is missing. Every
 * case runs for both metadata backends and both chunk compressions.
 * @module
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import type { ChunkCompression } from "../../src/cache/compression.ts";
import { formatNixHash, parseNixHash } from "../../src/cache/hash.ts";
import type { MetadataBackend } from "../../src/cache/metadata.ts";
import { formatNarListing, listNar, type NarTree } from "../../src/cache/nar.ts";
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
  sampleTree,
} from "../helpers/cache_fixture.ts";

const BASE = "http://cache.test";
const BACKENDS: MetadataBackend[] = ["kv", "filesystem"];
const COMPRESSIONS: ChunkCompression[] = ["zstd", "xz"];
/** Large enough that FastCDC (avg 64 KiB, max 256 KiB) cuts dozens of chunks. */
const BIG_SIZE = 3 * 1024 * 1024 + 12345;

function get(handler: Handler, path: string, headers: HeadersInit = {}): Promise<Response> {
  return handler(new Request(BASE + path, { headers }));
}

function head(handler: Handler, path: string): Promise<Response> {
  return handler(new Request(BASE + path, { method: "HEAD" }));
}

async function bytesOf(response: Response): Promise<Uint8Array> {
  return new Uint8Array(await response.arrayBuffer());
}

function bytesEqual(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((byte, i) => byte === b[i]);
}

function sha256Nix(bytes: Uint8Array): string {
  return formatNixHash(new Uint8Array(createHash("sha256").update(bytes).digest()));
}

/** Decompresses concatenated frames/streams with the real `zstd` or `xz` CLI. */
async function decompressWithCli(body: Uint8Array, compression: ChunkCompression) {
  const child = new Deno.Command(compression === "zstd" ? "zstd" : "xz", {
    args: ["-d", "-c", "-q"],
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const writing = (async () => {
    const writer = child.stdin.getWriter();
    await writer.write(body);
    await writer.close();
  })();
  const [out] = await Promise.all([child.output(), writing]);
  assert.equal(out.code, 0, `${compression} -d failed: ${new TextDecoder().decode(out.stderr)}`);
  return out.stdout;
}

function bigTree(seed: number): NarTree {
  return {
    type: "directory",
    entries: {
      "data.bin": { type: "regular", contents: pseudoRandomBytes(BIG_SIZE, seed) },
      "small": { type: "regular", contents: new TextEncoder().encode("small\n") },
    },
  };
}

async function narinfoOf(handler: Handler, hashPart: string) {
  const response = await get(handler, `/${hashPart}.narinfo`);
  assert.equal(response.status, 200);
  return parseNarInfo(await response.text());
}

async function expectStatus(response: Response, status: number): Promise<string> {
  const body = await response.text();
  assert.equal(response.status, status, `expected ${status}, got ${response.status}: ${body}`);
  return body;
}

for (const backend of BACKENDS) {
  for (const compression of COMPRESSIONS) {
    const label = `server (${backend}, ${compression})`;

    Deno.test(`${label}: nix-cache-info and narinfo GET/HEAD`, async (t) => {
      await using fx = await makeCacheFixture({ backend });
      const handler = createHandler(fx.cache, { priority: 42 });
      const small = await importFixture(fx.cache, sampleTree(), {
        compression,
        storePath: fakeStorePath("small-1.0"),
        references: [fakeStorePath("dep-1.0").slice(11)],
        deriver: fakeStorePath("small-1.0.drv").slice(11),
      });

      await t.step("nix-cache-info", async () => {
        const response = await get(handler, "/nix-cache-info");
        assert.equal(response.status, 200);
        assert.equal(response.headers.get("content-type"), "text/x-nix-cache-info");
        assert.equal(
          await response.text(),
          "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 42\n",
        );
        const headResponse = await head(handler, "/nix-cache-info");
        assert.equal(headResponse.status, 200);
        assert.equal((await bytesOf(headResponse)).length, 0);
      });

      await t.step("narinfo GET is the stored record, with its length", async () => {
        const response = await get(handler, `/${small.hashPart}.narinfo`);
        assert.equal(response.status, 200);
        assert.equal(response.headers.get("content-type"), "text/x-nix-narinfo");
        const body = await bytesOf(response);
        assert.equal(response.headers.get("content-length"), String(body.length));
        const info = parseNarInfo(body);
        assert.deepEqual(info, parseNarInfo(formatNarInfo(small.result.record.narInfo)));
        assert.equal(info.storePath, small.storePath);
        assert.equal(info.narHash, sha256Nix(small.nar));
        assert.equal(info.narSize, small.nar.length);
        assert.equal(info.compression, compression);
        assert.match(
          info.url,
          new RegExp(`^nar/[0-9a-z]{52}\\.nar\\.${compression === "zstd" ? "zst" : "xz"}$`),
        );
        assert.deepEqual(info.references, small.result.record.narInfo.references);
        assert.equal(info.deriver, fakeStorePath("small-1.0.drv").slice(11));
      });

      await t.step("narinfo HEAD: same status and headers, no body", async () => {
        const full = await get(handler, `/${small.hashPart}.narinfo`);
        const fullBody = await bytesOf(full);
        const response = await head(handler, `/${small.hashPart}.narinfo`);
        assert.equal(response.status, 200);
        assert.equal((await bytesOf(response)).length, 0);
        assert.deepEqual([...response.headers], [...full.headers]);
        assert.equal(response.headers.get("content-length"), String(fullBody.length));
      });

      await t.step("a valid but unknown hash is a 404 (GET, HEAD, .ls)", async () => {
        const missing = hashPartOf(fakeStorePath("not-there"));
        await expectStatus(await get(handler, `/${missing}.narinfo`), 404);
        const headResponse = await head(handler, `/${missing}.narinfo`);
        assert.equal(headResponse.status, 404);
        await headResponse.body?.cancel();
        await expectStatus(await get(handler, `/${missing}.ls`), 404);
        const unknownNar = "0".repeat(52);
        await expectStatus(await get(handler, `/nar/${unknownNar}.nar.zst`), 404);
        await expectStatus(await get(handler, `/nar/${unknownNar}.nar.xz`), 404);
        await expectStatus(await get(handler, "/nothing-here"), 404);
      });
    });

    Deno.test(`${label}: narinfos are signed on the fly, once per key name`, async () => {
      await using fx = await makeCacheFixture({ backend });
      const key = generateSecretKey("arca-test-1");
      const other = generateSecretKey("other-cache-1");
      const handler = createHandler(fx.cache, { priority: 30, signingKey: key });
      const plain = createHandler(fx.cache, { priority: 30 });

      // Unsigned in the cache: signed when served, not when served without a key.
      const unsigned = await importFixture(fx.cache, sampleTree("unsigned"), {
        compression,
        storePath: fakeStorePath("unsigned-1"),
      });
      assert.deepEqual((await narinfoOf(plain, unsigned.hashPart)).sigs, []);
      const signed = await narinfoOf(handler, unsigned.hashPart);
      assert.equal(signed.sigs.length, 1);
      assert.equal(signatureKeyName(signed.sigs[0]), "arca-test-1");
      assert.ok(verifyNarInfoSignatures(signed, [publicKeyOf(key)]));
      assert.ok(!verifyNarInfoSignatures(signed, [{ ...publicKeyOf(other), name: "arca-test-1" }]));
      // Signing on the fly does not write the signature back.
      assert.deepEqual((await fx.cache.getPath(unsigned.hashPart))!.narInfo.sigs, []);

      // Signed at import by the same key name: not duplicated.
      const imported = await importFixture(fx.cache, sampleTree("signed"), {
        compression,
        storePath: fakeStorePath("signed-1"),
        signingKey: key,
      });
      const served = await narinfoOf(handler, imported.hashPart);
      assert.deepEqual(served.sigs, imported.result.record.narInfo.sigs);
      assert.equal(served.sigs.length, 1);
      assert.ok(verifyNarInfoSignatures(served, [publicKeyOf(key)]));

      // A stale signature under our key name is kept as is, not joined by a second one.
      const stale = await importFixture(fx.cache, sampleTree("stale"), {
        compression,
        storePath: fakeStorePath("stale-1"),
        sigs: [signNarInfo(unsigned.result.record.narInfo, key)],
      });
      assert.equal((await narinfoOf(handler, stale.hashPart)).sigs.length, 1);

      // Another key's signature is kept and ours is added beside it.
      const foreignInfo = await importFixture(fx.cache, sampleTree("foreign"), {
        compression,
        storePath: fakeStorePath("foreign-1"),
      });
      const foreign = await importFixture(fx.cache, sampleTree("foreign"), {
        compression,
        storePath: fakeStorePath("foreign-2"),
        sigs: [
          signNarInfo({
            ...foreignInfo.result.record.narInfo,
            storePath: fakeStorePath("foreign-2"),
          }, other),
        ],
      });
      const both = await narinfoOf(handler, foreign.hashPart);
      assert.deepEqual(both.sigs.map(signatureKeyName).sort(), ["arca-test-1", "other-cache-1"]);
      assert.ok(verifyNarInfoSignatures(both, [publicKeyOf(key)]));
      assert.ok(verifyNarInfoSignatures(both, [publicKeyOf(other)]));

      // HEAD reports the length of the signed body.
      const body = await bytesOf(await get(handler, `/${unsigned.hashPart}.narinfo`));
      const headResponse = await head(handler, `/${unsigned.hashPart}.narinfo`);
      assert.equal(headResponse.headers.get("content-length"), String(body.length));
      await headResponse.body?.cancel();
    });

    Deno.test(`${label}: NAR bodies, Range requests, .ls and missing data`, async (t) => {
      await using fx = await makeCacheFixture({ backend });
      const handler = createHandler(fx.cache, { priority: 30 });
      const small = await importFixture(fx.cache, sampleTree(), {
        compression,
        storePath: fakeStorePath("small-1.0"),
      });
      const big = await importFixture(fx.cache, bigTree(7), {
        compression,
        storePath: fakeStorePath("big-1.0"),
      });
      assert.ok(big.result.chunks >= 20, `only ${big.result.chunks} chunks`);

      async function fetchNar(imported: typeof small) {
        const info = await narinfoOf(handler, imported.hashPart);
        const response = await get(handler, `/${info.url}`);
        assert.equal(response.status, 200);
        assert.equal(response.headers.get("content-type"), "application/x-nix-nar");
        const body = await bytesOf(response);
        return { info, response, body };
      }

      for (const [name, imported] of [["small", small], ["multi-chunk", big]] as const) {
        await t.step(
          `${name} NAR: FileHash, FileSize, Content-Length, decompresses to the NAR`,
          async () => {
            const { info, response, body } = await fetchNar(imported);
            assert.equal(body.length, info.fileSize);
            assert.equal(response.headers.get("content-length"), String(info.fileSize));
            assert.equal(sha256Nix(body), info.fileHash);
            const nar = await decompressWithCli(body, compression);
            assert.equal(nar.length, imported.nar.length);
            assert.ok(bytesEqual(nar, imported.nar), "decompressed NAR differs");
            assert.equal(sha256Nix(nar), info.narHash);

            const headResponse = await head(handler, `/${info.url}`);
            assert.equal(headResponse.status, 200);
            assert.equal(headResponse.headers.get("content-length"), String(info.fileSize));
            assert.equal((await bytesOf(headResponse)).length, 0);
          },
        );
      }

      await t.step("Range requests", async () => {
        const { info, body: full } = await fetchNar(big);
        const size = full.length;
        const stored = await fx.cache.findNar(info.fileHash!);
        assert.ok(stored);
        // Chunk boundaries in the served body.
        const boundaries: number[] = [];
        let offset = 0;
        for (const chunk of stored.manifest.chunks) {
          offset += chunk.storedSize;
          boundaries.push(offset);
        }
        assert.equal(offset, size);
        const b1 = boundaries[2];
        const b3 = boundaries[5];
        const cases: [string, number, number][] = [
          ["bytes=0-99", 0, 100],
          ["bytes=100-", 100, size],
          ["bytes=-50", size - 50, size],
          [`bytes=${b1 - 10}-${b1 + 9}`, b1 - 10, b1 + 10], // across one boundary
          [`bytes=${b1 - 1}-${b3}`, b1 - 1, b3 + 1], // across several
          [`bytes=${b1}-${b1}`, b1, b1 + 1], // first byte of a chunk
          [`bytes=${b1 - 1}-${b1 - 1}`, b1 - 1, b1], // last byte of a chunk
          [`bytes=${size - 1}-`, size - 1, size],
          [`bytes=10-${size * 2}`, 10, size], // end clamped
          [`bytes=-${size * 2}`, 0, size], // suffix longer than the body
        ];
        for (const [range, start, end] of cases) {
          const response = await get(handler, `/${info.url}`, { range });
          const part = await bytesOf(response);
          assert.equal(response.status, 206, range);
          assert.equal(response.headers.get("content-range"), `bytes ${start}-${end - 1}/${size}`);
          assert.equal(response.headers.get("content-length"), String(end - start), range);
          assert.equal(part.length, end - start, range);
          assert.ok(bytesEqual(part, full.subarray(start, end)), `${range}: wrong bytes`);
        }
        for (const range of [`bytes=${size}-`, `bytes=${size + 100}-${size + 200}`, "bytes=-0"]) {
          const response = await get(handler, `/${info.url}`, { range });
          await expectStatus(response, 416);
          assert.equal(response.headers.get("content-range"), `bytes */${size}`, range);
        }
        // Malformed or multiple ranges are ignored: the whole body.
        for (const range of ["bytes=5-1", "items=0-1", "bytes=0-1,5-6", "bytes=abc"]) {
          const response = await get(handler, `/${info.url}`, { range });
          const body = await bytesOf(response);
          assert.equal(response.status, 200, range);
          assert.equal(body.length, size, range);
        }
        const headResponse = await handler(
          new Request(`${BASE}/${info.url}`, { method: "HEAD", headers: { range: "bytes=0-99" } }),
        );
        assert.equal(headResponse.status, 206);
        assert.equal(headResponse.headers.get("content-length"), "100");
        assert.equal((await bytesOf(headResponse)).length, 0);
      });

      await t.step("wrong extension is a 404", async () => {
        const info = await narinfoOf(handler, small.hashPart);
        const base = info.url.slice(0, info.url.indexOf(".nar"));
        const wrong = compression === "zstd" ? [".nar.xz", ".nar"] : [".nar.zst", ".nar"];
        for (const ext of wrong) await expectStatus(await get(handler, `/${base}${ext}`), 404);
        await expectStatus(await get(handler, `/${base}.nar.bz2`), 404);
      });

      await t.step(".ls is the NAR listing", async () => {
        for (const imported of [small, big]) {
          const response = await get(handler, `/${imported.hashPart}.ls`);
          assert.equal(response.status, 200);
          assert.equal(response.headers.get("content-type"), "application/json");
          const text = await response.text();
          const expected = await listNar([imported.nar]);
          assert.equal(text, formatNarListing(expected));
          assert.deepEqual(JSON.parse(text), JSON.parse(JSON.stringify(expected)));
          assert.equal(
            response.headers.get("content-length"),
            String(new TextEncoder().encode(text).length),
          );
        }
      });

      await t.step("two store paths with the same NAR both serve", async () => {
        const twin = await importFixture(fx.cache, big.nar, {
          compression,
          storePath: fakeStorePath("big-twin-2.0"),
        });
        assert.equal(twin.result.newChunks, 0);
        const a = await narinfoOf(handler, big.hashPart);
        const b = await narinfoOf(handler, twin.hashPart);
        assert.equal(b.storePath, twin.storePath);
        assert.equal(a.url, b.url);
        assert.equal(a.fileHash, b.fileHash);
        const { body } = await fetchNar(twin);
        assert.equal(sha256Nix(body), b.fileHash);
        for (const hashPart of [big.hashPart, twin.hashPart]) {
          await expectStatus(await get(handler, `/${hashPart}.ls`), 200);
        }
      });

      await t.step("a chunk file of the wrong size: 404, never a 200 cut short", async () => {
        const info = await narinfoOf(handler, big.hashPart);
        const stored = await fx.cache.findNar(info.fileHash!);
        const victim = stored!.manifest.chunks[1];
        const path = fx.cache.chunks.chunkPath(victim.id, compression);
        const original = await Deno.readFile(path);
        await Deno.writeFile(path, original.subarray(0, original.length - 1));
        await expectStatus(await get(handler, `/${info.url}`), 404);
        await expectStatus(await get(handler, `/${info.url}`, { range: "bytes=-10" }), 404);
        await Deno.writeFile(path, original);
        const { body } = await fetchNar(big);
        assert.equal(sha256Nix(body), info.fileHash);
      });

      await t.step("a chunk file missing from disk: 404, never a 200", async () => {
        const info = await narinfoOf(handler, big.hashPart);
        const stored = await fx.cache.findNar(info.fileHash!);
        assert.ok(stored);
        const victim = stored.manifest.chunks[Math.floor(stored.manifest.chunks.length / 2)];
        await Deno.remove(fx.cache.chunks.chunkPath(victim.id, compression));
        await expectStatus(await get(handler, `/${info.url}`), 404);
        await expectStatus(await get(handler, `/${info.url}`, { range: "bytes=0-99" }), 404);
        const headResponse = await head(handler, `/${info.url}`);
        assert.equal(headResponse.status, 404);
        await headResponse.body?.cancel();
        await expectStatus(await get(handler, `/${big.hashPart}.ls`), 404);
        // The other NAR is untouched.
        const { body } = await fetchNar(small);
        assert.equal(sha256Nix(body), (await narinfoOf(handler, small.hashPart)).fileHash);
      });

      await t.step("a missing manifest: 404", async () => {
        const info = await narinfoOf(handler, small.hashPart);
        await Deno.remove(fx.cache.manifests.manifestPath(parseNixHash(info.fileHash!)));
        await expectStatus(await get(handler, `/${info.url}`), 404);
        await expectStatus(await get(handler, `/${small.hashPart}.ls`), 404);
      });
    });
  }
}

Deno.test("server: an unexpected error is a 500 without details, and logged", async () => {
  await using fx = await makeCacheFixture();
  const logs: string[] = [];
  const handler = createHandler(fx.cache, { priority: 30, log: (m) => logs.push(m) });
  const small = await importFixture(fx.cache, sampleTree());
  fx.cache.close(); // every metadata read now fails
  const response = await get(handler, `/${small.hashPart}.narinfo`);
  assert.equal(await expectStatus(response, 500), "Internal server error\n");
  assert.ok(logs.some((line) => line.startsWith("Internal error")), logs.join("\n"));
});

Deno.test("server: logRequests logs method, raw path and status", async () => {
  await using fx = await makeCacheFixture();
  const logs: string[] = [];
  const handler = createHandler(fx.cache, {
    priority: 30,
    log: (m) => logs.push(m),
    logRequests: true,
  });
  await expectStatus(await get(handler, "/nix-cache-info"), 200);
  await expectStatus(await get(handler, "/x.narinfo"), 400);
  assert.deepEqual(logs, ["GET /nix-cache-info 200", "GET /x.narinfo 400"]);
});
