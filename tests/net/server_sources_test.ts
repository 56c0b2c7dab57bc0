/**
 * The substituter's path sources (peers, upstreams) in-process: narinfos of paths this
 * cache lacks are served uncompressed at `nar/<NarHash>.nar` with the origin's signatures,
 * their NARs stream through the NarHash check (a wrong NAR never ends as a complete body),
 * the same URL serves the path decompressed once it is local, and a failing source is
 * skipped; a source's zstd file is passed through, checked against its FileHash, and its URL
 * serves the local copy once the path is local. The sources here are small in-memory ones;
 * the real ones have their own tests.
 * @module
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { encodeNar } from "../../src/cache/nar.ts";
import { formatNixHash } from "../../src/cache/hash.ts";
import { parseNarInfo } from "../../src/cache/narinfo.ts";
import {
  generateSecretKey,
  publicKeyOf,
  signNarInfo,
  verifyNarInfoSignatures,
} from "../../src/cache/signing.ts";
import { createHandler, type PathSource, type SourcePath } from "../../src/net/server.ts";
import { verifyNarStream } from "../../src/cache/verified_nar.ts";
import { compressChunk } from "../../src/cache/compression.ts";
import { decompressStream } from "../../src/cache/decompress_stream.ts";
import {
  fakeStorePath,
  hashPartOf,
  importFixture,
  makeCacheFixture,
  pseudoRandomBytes,
} from "../helpers/cache_fixture.ts";

const BASE = "http://cache.test";

function sha256Nix(bytes: Uint8Array): string {
  return formatNixHash(new Uint8Array(createHash("sha256").update(bytes).digest()));
}

/** A NAR of one regular file of `size` pseudo-random bytes. */
function narOf(size: number, seed: number): Uint8Array {
  return encodeNar({ type: "regular", contents: pseudoRandomBytes(size, seed) });
}

/** A source holding `nars` (by hash part); `corrupt` flips a byte of what it sends. */
function memorySource(
  paths: Map<string, { path: SourcePath; nar: Uint8Array }>,
  options: { corrupt?: boolean; kind?: "peer" | "upstream"; fail?: boolean } = {},
): PathSource & { opened: number } {
  return {
    kind: options.kind ?? "peer",
    opened: 0,
    lookup(hashPart) {
      if (options.fail) return Promise.reject(new Error("source is down"));
      return Promise.resolve(paths.get(hashPart)?.path ?? null);
    },
    openNar(hashPart) {
      this.opened++;
      const nar = paths.get(hashPart)!.nar.slice();
      if (options.corrupt) nar[nar.length - 100] ^= 1;
      // Several pieces, as a network source would deliver them.
      const pieces: Uint8Array[] = [];
      for (let i = 0; i < nar.length; i += 10_000) pieces.push(nar.subarray(i, i + 10_000));
      return Promise.resolve(ReadableStream.from(pieces));
    },
  };
}

function signedPath(storePath: string, nar: Uint8Array, key = generateSecretKey("origin-1")) {
  const path: SourcePath = {
    storePath,
    narHash: sha256Nix(nar),
    narSize: nar.length,
    references: [],
    sigs: [],
  };
  path.sigs = [signNarInfo({ ...path, url: "x", compression: "none" }, key)];
  return { path, key };
}

Deno.test("a path from a source is served uncompressed, with its signatures, and checked", async () => {
  const fixture = await makeCacheFixture();
  try {
    const storePath = fakeStorePath("from-peer");
    const nar = narOf(300_000, 7);
    const { path, key } = signedPath(storePath, nar);
    const source = memorySource(new Map([[hashPartOf(storePath), { path, nar }]]));
    const handler = createHandler(fixture.cache, { priority: 40, sources: [source] });
    try {
      const response = await handler(new Request(`${BASE}/${hashPartOf(storePath)}.narinfo`));
      assert.equal(response.status, 200);
      const info = parseNarInfo(await response.text());
      assert.equal(info.compression, "none");
      assert.equal(info.narHash, path.narHash);
      assert.equal(info.fileHash, path.narHash);
      assert.equal(info.fileSize, nar.length);
      assert.equal(info.url, `nar/${path.narHash.slice("sha256:".length)}.nar`);
      assert.equal(verifyNarInfoSignatures(info, [publicKeyOf(key)]), true);
      assert.equal(source.opened, 0, "a narinfo request fetches no NAR");

      const head = await handler(new Request(`${BASE}/${info.url}`, { method: "HEAD" }));
      assert.equal(head.status, 200);
      assert.equal(head.headers.get("content-length"), String(nar.length));
      assert.equal(source.opened, 0, "a HEAD fetches no NAR");

      const got = await handler(new Request(`${BASE}/${info.url}`));
      assert.equal(got.status, 200);
      assert.deepEqual(new Uint8Array(await got.arrayBuffer()), nar);
      assert.match(
        await handler.metrics.render(fixture.cache),
        /arca_cache_hits_total\{source="peer"\} 1/,
      );
    } finally {
      await handler.close();
    }
  } finally {
    await fixture.close();
  }
});

Deno.test("a source's wrong NAR never ends as a complete body", async () => {
  const fixture = await makeCacheFixture();
  try {
    const storePath = fakeStorePath("corrupted");
    const nar = narOf(200_000, 8);
    const { path } = signedPath(storePath, nar);
    const source = memorySource(new Map([[hashPartOf(storePath), { path, nar }]]), {
      corrupt: true,
    });
    const handler = createHandler(fixture.cache, { priority: 40, sources: [source] });
    try {
      const info = parseNarInfo(
        await (await handler(new Request(`${BASE}/${hashPartOf(storePath)}.narinfo`))).text(),
      );
      const response = await handler(new Request(`${BASE}/${info.url}`));
      assert.equal(response.status, 200);
      const reader = response.body!.getReader();
      let received = 0;
      await assert.rejects(async () => {
        for (;;) {
          const { done, value } = await reader.read();
          if (done) return;
          received += value.length;
        }
      }, /hashes to/);
      assert.ok(received < nar.length, `only ${received} of ${nar.length} bytes were sent`);
    } finally {
      await handler.close();
    }
  } finally {
    await fixture.close();
  }
});

Deno.test("sources: a failing one is skipped, none that knows the path is a 404", async () => {
  const fixture = await makeCacheFixture();
  try {
    const storePath = fakeStorePath("second-source");
    const nar = narOf(1000, 9);
    const { path } = signedPath(storePath, nar);
    const down = memorySource(new Map(), { fail: true });
    const upstream = memorySource(new Map([[hashPartOf(storePath), { path, nar }]]), {
      kind: "upstream",
    });
    const logged: string[] = [];
    const handler = createHandler(fixture.cache, {
      priority: 40,
      sources: [down, upstream],
      log: (line) => logged.push(line),
    });
    try {
      const response = await handler(new Request(`${BASE}/${hashPartOf(storePath)}.narinfo`));
      assert.equal(response.status, 200);
      const info = parseNarInfo(await response.text());
      const got = await handler(new Request(`${BASE}/${info.url}`));
      assert.deepEqual(new Uint8Array(await got.arrayBuffer()), nar);
      assert.ok(logged.some((line) => line.includes("source is down")));
      const other = fakeStorePath("nowhere");
      const missing = await handler(new Request(`${BASE}/${hashPartOf(other)}.narinfo`));
      assert.equal(missing.status, 404);
      await missing.body?.cancel();
      const unknownNar = await handler(new Request(`${BASE}/nar/${"0".repeat(52)}.nar`));
      assert.equal(unknownNar.status, 404);
      await unknownNar.body?.cancel();
    } finally {
      await handler.close();
    }
  } finally {
    await fixture.close();
  }
});

Deno.test("a NarHash URL keeps working once the path is local, served decompressed", async () => {
  const fixture = await makeCacheFixture();
  try {
    const nar = narOf(500_000, 10);
    const imported = await importFixture(fixture.cache, nar, { storePath: fakeStorePath("local") });
    // A fresh handler (as after a restart): it never served this path's source narinfo.
    const handler = createHandler(fixture.cache, { priority: 40, sources: [] });
    try {
      const url = `nar/${sha256Nix(nar).slice("sha256:".length)}.nar`;
      const response = await handler(new Request(`${BASE}/${url}`));
      assert.equal(response.status, 200);
      assert.equal(response.headers.get("content-length"), String(nar.length));
      assert.deepEqual(new Uint8Array(await response.arrayBuffer()), nar);
      assert.equal(imported.nar.length, nar.length);
    } finally {
      await handler.close();
    }
  } finally {
    await fixture.close();
  }
});

Deno.test("verifyNarStream: passes a right NAR whole, refuses a long, short or wrong one", async () => {
  const nar = narOf(100_000, 11);
  const claims = { narHash: sha256Nix(nar), narSize: nar.length };
  const pieces = (bytes: Uint8Array) =>
    ReadableStream.from([bytes.subarray(0, 40_000), bytes.subarray(40_000)]);
  const read = async (stream: ReadableStream<Uint8Array>) =>
    new Uint8Array(await new Response(stream).arrayBuffer());
  assert.deepEqual(await read(pieces(nar).pipeThrough(verifyNarStream(claims))), nar);
  const longer = new Uint8Array(nar.length + 1);
  longer.set(nar);
  await assert.rejects(read(pieces(longer).pipeThrough(verifyNarStream(claims))), /longer/);
  await assert.rejects(
    read(pieces(nar.subarray(0, nar.length - 1)).pipeThrough(verifyNarStream(claims))),
    /bytes, its NarSize/,
  );
  const wrong = nar.slice();
  wrong[5] ^= 1;
  await assert.rejects(read(pieces(wrong).pipeThrough(verifyNarStream(claims))), /hashes to/);
});

Deno.test("a source's zstd file is passed through as it is, checked, and its URL outlives it", async () => {
  const fixture = await makeCacheFixture();
  try {
    const storePath = fakeStorePath("passed-through");
    const nar = narOf(400_000, 12);
    const { path } = signedPath(storePath, nar);
    const file = compressChunk(nar, "zstd");
    path.file = { fileHash: sha256Nix(file), fileSize: file.length, compression: "zstd" };
    let corrupt = false;
    let opened = 0;
    const source: PathSource = {
      kind: "upstream",
      lookup: (hashPart) => Promise.resolve(hashPart === hashPartOf(storePath) ? path : null),
      openNar: () => Promise.reject(new Error("the file is what is asked for")),
      openFile() {
        opened++;
        const bytes = file.slice();
        if (corrupt) bytes[bytes.length >> 1] ^= 1;
        return Promise.resolve(
          ReadableStream.from([bytes.subarray(0, 1000), bytes.subarray(1000)]),
        );
      },
    };
    const handler = createHandler(fixture.cache, { priority: 40, sources: [source] });
    try {
      const info = parseNarInfo(
        await (await handler(new Request(`${BASE}/${hashPartOf(storePath)}.narinfo`))).text(),
      );
      assert.equal(info.compression, "zstd");
      assert.equal(info.fileHash, path.file.fileHash);
      assert.equal(info.fileSize, file.length);
      assert.equal(info.url, `nar/${path.file.fileHash.slice("sha256:".length)}.nar.zst`);
      const got = await handler(new Request(`${BASE}/${info.url}`));
      assert.equal(got.status, 200);
      assert.deepEqual(new Uint8Array(await got.arrayBuffer()), file);

      corrupt = true;
      const bad = await handler(new Request(`${BASE}/${info.url}`));
      await assert.rejects(bad.arrayBuffer(), /its FileHash/);

      // Once the path is local, the same URL serves it from here (any zstd frames do).
      await importFixture(fixture.cache, nar, { storePath });
      const before = opened;
      const local = await handler(new Request(`${BASE}/${info.url}`));
      assert.equal(local.status, 200);
      const unpacked = local.body!.pipeThrough(decompressStream("zstd"));
      assert.deepEqual(new Uint8Array(await new Response(unpacked).arrayBuffer()), nar);
      assert.equal(opened, before, "the source is not asked again");
    } finally {
      await handler.close();
    }
  } finally {
    await fixture.close();
  }
});

Deno.test("a passed-through file's URL serves its compression also when the local copy is stored otherwise", async () => {
  const cases = [
    ["zstd", "none"],
    ["zstd", "xz"],
    ["xz", "none"],
    ["xz", "zstd"],
    ["xz", "xz"],
  ] as const;
  for (const [passed, compression] of cases) {
    const fixture = await makeCacheFixture();
    try {
      const storePath = fakeStorePath(`passed-${passed}-${compression}`);
      const nar = narOf(300_000, 13);
      const { path } = signedPath(storePath, nar);
      const file = compressChunk(nar, passed);
      path.file = { fileHash: sha256Nix(file), fileSize: file.length, compression: passed };
      const source: PathSource = {
        kind: "upstream",
        lookup: (hashPart) => Promise.resolve(hashPart === hashPartOf(storePath) ? path : null),
        openNar: () => Promise.reject(new Error("the file is what is asked for")),
        openFile: () => Promise.resolve(ReadableStream.from([file.slice()])),
      };
      const handler = createHandler(fixture.cache, { priority: 40, sources: [source] });
      try {
        const info = parseNarInfo(
          await (await handler(new Request(`${BASE}/${hashPartOf(storePath)}.narinfo`))).text(),
        );
        assert.equal(info.compression, passed);
        assert.equal(
          info.url,
          `nar/${info.fileHash!.slice("sha256:".length)}.nar.${passed === "xz" ? "xz" : "zst"}`,
        );
        const what = `passed as ${passed}, stored as ${compression}`;
        const before = await handler(new Request(`${BASE}/${info.url}`));
        assert.deepEqual(new Uint8Array(await before.arrayBuffer()), file, what);
        // Imported meanwhile, stored otherwise: Nix still decompresses what it gets as promised.
        await importFixture(fixture.cache, nar, { storePath, compression });
        const local = await handler(new Request(`${BASE}/${info.url}`));
        assert.equal(local.status, 200);
        const sent = new Uint8Array(await local.arrayBuffer());
        assert.equal(local.headers.get("content-length"), String(sent.length));
        const unpacked = ReadableStream.from([sent]).pipeThrough(decompressStream(passed));
        assert.deepEqual(new Uint8Array(await new Response(unpacked).arrayBuffer()), nar, what);
        // The zstd or xz tool reads it too.
        const child = new Deno.Command(passed, {
          args: ["-dc"],
          stdin: "piped",
          stdout: "piped",
        }).spawn();
        const output = child.output();
        const writer = child.stdin.getWriter();
        await writer.write(sent);
        await writer.close();
        assert.ok((await output).success, what);
        assert.deepEqual((await output).stdout, nar, what);
        const head = await handler(new Request(`${BASE}/${info.url}`, { method: "HEAD" }));
        assert.equal(head.status, 200);
        assert.equal(head.headers.get("content-length"), String(sent.length));
        await head.body?.cancel();
      } finally {
        await handler.close();
      }
    } finally {
      await fixture.close();
    }
  }
});

Deno.test("a FileHash that is another path's NarHash does not take that path's NAR URL", async () => {
  const fixture = await makeCacheFixture();
  try {
    // FileHash is not signed: an upstream (or a man in the middle) can claim any.
    const x = { storePath: fakeStorePath("victim"), nar: narOf(100_000, 21) };
    const y = { storePath: fakeStorePath("claimer"), nar: narOf(100_000, 22) };
    const pathX = signedPath(x.storePath, x.nar).path;
    const pathY = signedPath(y.storePath, y.nar).path;
    const yFile = compressChunk(y.nar, "zstd");
    pathY.file = { fileHash: pathX.narHash, fileSize: yFile.length, compression: "zstd" };
    const byHashPart = new Map([
      [hashPartOf(x.storePath), { path: pathX, nar: x.nar }],
      [hashPartOf(y.storePath), { path: pathY, nar: y.nar }],
    ]);
    const source: PathSource = {
      kind: "upstream",
      lookup: (hashPart) => Promise.resolve(byHashPart.get(hashPart)?.path ?? null),
      lookupByNarHash(narHash) {
        for (const [hashPart, { path }] of byHashPart) {
          if (path.narHash === narHash) return Promise.resolve({ hashPart, path });
        }
        return Promise.resolve(null);
      },
      openNar: (hashPart) => Promise.resolve(ReadableStream.from([byHashPart.get(hashPart)!.nar])),
      openFile: () => Promise.resolve(ReadableStream.from([yFile.slice()])),
    };
    const handler = createHandler(fixture.cache, { priority: 40, sources: [source] });
    try {
      const infoX = parseNarInfo(
        await (await handler(new Request(`${BASE}/${hashPartOf(x.storePath)}.narinfo`))).text(),
      );
      const infoY = await handler(new Request(`${BASE}/${hashPartOf(y.storePath)}.narinfo`));
      assert.equal(infoY.status, 200);
      await infoY.body?.cancel();
      const got = await handler(new Request(`${BASE}/${infoX.url}`));
      assert.equal(got.status, 200);
      assert.deepEqual(new Uint8Array(await got.arrayBuffer()), x.nar);
    } finally {
      await handler.close();
    }
  } finally {
    await fixture.close();
  }
});

Deno.test("a passed-through file's URL outlives a restart, before and after the path is local", async () => {
  const fixture = await makeCacheFixture();
  try {
    const storePath = fakeStorePath("restarted");
    const nar = narOf(300_000, 14);
    const { path } = signedPath(storePath, nar);
    const file = compressChunk(nar, "zstd");
    path.file = { fileHash: sha256Nix(file), fileSize: file.length, compression: "zstd" };
    let opened = 0;
    const source: PathSource = {
      kind: "upstream",
      lookup: (hashPart) => Promise.resolve(hashPart === hashPartOf(storePath) ? path : null),
      openNar: () => Promise.reject(new Error("the file is what is asked for")),
      openFile() {
        opened++;
        return Promise.resolve(ReadableStream.from([file.slice()]));
      },
    };
    const url = `${BASE}/nar/${path.file.fileHash.slice("sha256:".length)}.nar.zst`;
    const first = createHandler(fixture.cache, { priority: 40, sources: [source] });
    try {
      await (await first(new Request(`${BASE}/${hashPartOf(storePath)}.narinfo`))).text();
      assert.deepEqual(new Uint8Array(await (await first(new Request(url))).arrayBuffer()), file);
    } finally {
      await first.close();
    }
    // A new process that never served the narinfo (Nix kept it): the source again.
    const second = createHandler(fixture.cache, { priority: 40, sources: [source] });
    try {
      const response = await second(new Request(url));
      assert.equal(response.status, 200);
      assert.deepEqual(new Uint8Array(await response.arrayBuffer()), file);
      assert.equal(opened, 2);
    } finally {
      await second.close();
    }
    // And once the path is local: from here, without the source.
    await importFixture(fixture.cache, nar, { storePath });
    const third = createHandler(fixture.cache, { priority: 40, sources: [source] });
    try {
      const response = await third(new Request(url));
      assert.equal(response.status, 200);
      const unpacked = response.body!.pipeThrough(decompressStream("zstd"));
      assert.deepEqual(new Uint8Array(await new Response(unpacked).arrayBuffer()), nar);
      assert.equal(opened, 2, "the source is not asked");
      // Also with no source left (the upstream removed from the config).
      const bare = createHandler(fixture.cache, { priority: 40 });
      try {
        const alone = await bare(new Request(url));
        assert.equal(alone.status, 200);
        const again = alone.body!.pipeThrough(decompressStream("zstd"));
        assert.deepEqual(new Uint8Array(await new Response(again).arrayBuffer()), nar);
      } finally {
        await bare.close();
      }
      // A URL no narinfo named is still a 404.
      const unknown = await third(new Request(`${BASE}/nar/${"1".repeat(52)}.nar.zst`));
      assert.equal(unknown.status, 404);
      await unknown.body?.cancel();
    } finally {
      await third.close();
    }
  } finally {
    await fixture.close();
  }
});
