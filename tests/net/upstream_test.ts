/**
 * Pull-through from upstream caches (src/net/upstream.ts) against real upstreams: binary
 * caches written by `nix copy --to file://…` and signed by a key from
 * `nix key generate-secret`, each served by a separate static file server process on
 * 127.0.0.1 (tests/helpers/static_server.ts) that counts requests and can hang, stall or go
 * down. The substituter's handler (in-process) is the client, as Nix would be.
 * @module
 */

import assert from "node:assert/strict";
import { decompressStream, parseUploadCompression } from "../../src/cache/decompress_stream.ts";
import { formatNixHash, sha256 } from "../../src/cache/hash.ts";
import { parseNarInfo } from "../../src/cache/narinfo.ts";
import { parsePublicKey } from "../../src/cache/signing.ts";
import { verifyCache } from "../../src/cache/verify.ts";
import { UNIVERSAL_SEGMENT } from "../../src/config.ts";
import { createHandler, type Handler } from "../../src/net/server.ts";
import { Spool, UpstreamSource, type UpstreamSourceOptions } from "../../src/net/upstream.ts";
import {
  fakeStorePath,
  hashPartOf,
  makeCacheFixture,
  pseudoRandomBytes,
} from "../helpers/cache_fixture.ts";
import { addToStore, HAVE_NIX, narDump, runNix } from "../helpers/nix.ts";
import { startStaticServer, type StaticServer } from "../helpers/static_server.ts";

const BASE = "http://arca.test";

/** The upstream caches the tests serve, made once per run. */
interface World {
  dir: string;
  /** Built: `top` references `dep` (a few MiB over many chunks). */
  dep: string;
  top: string;
  /** Content-addressed paths of the other caches. */
  unsignedPath: string;
  wrongKeyPath: string;
  tamperedPath: string;
  badUrlPath: string;
  /** Content-addressed, 12 MiB of pseudo-random bytes: spooled in a file, not in memory. */
  bigPath: string;
  publicKey: string;
  /** xz, signed: dep and top. */
  good: string;
  /** zstd, signed: dep, top and the big path. */
  goodZstd: string;
  /** Not signed. */
  unsigned: string;
  /** Signed by another key. */
  wrongKey: string;
  /** Compression none, signed, one byte of the NAR flipped. */
  tampered: string;
  /** Signed, its narinfo's URL pointing outside the cache. */
  badUrl: string;
}

let world: Promise<World> | undefined;

function getWorld(): Promise<World> {
  return world ??= makeWorld();
}

globalThis.addEventListener("unload", () => {
  world?.then((w) => Deno.removeSync(w.dir, { recursive: true })).catch(() => {});
});

async function secretKey(dir: string, name: string): Promise<{ file: string; pub: string }> {
  const secret = await runNix("nix", ["key", "generate-secret", "--key-name", name]);
  const file = `${dir}/${name}.secret`;
  await Deno.writeTextFile(file, secret);
  const pub = await runNix("nix", ["key", "convert-secret-to-public"], {
    stdin: new TextEncoder().encode(secret),
  });
  return { file, pub: pub.trim() };
}

async function copyTo(
  dir: string,
  paths: string[],
  options: { key?: string; compression: string },
): Promise<void> {
  const params = [`compression=${options.compression}`];
  if (options.key) params.push(`secret-key=${options.key}`);
  await runNix("nix", ["copy", "--to", `file://${dir}?${params.join("&")}`, ...paths]);
}

async function contentPath(dir: string, name: string, text: string): Promise<string> {
  const source = `${dir}/src-${name}/${name}`;
  await Deno.mkdir(source, { recursive: true });
  await Deno.writeTextFile(`${source}/data`, text);
  return await addToStore(source);
}

const CLOSURE_EXPR = `
let
  dep = derivation {
    name = "arca-upstream-dep";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" ''
      export PATH=/bin:/usr/bin
      mkdir -p $out/bin $out/share
      seq 1 600000 > $out/share/numbers
      printf '#!/bin/sh\\necho hi\\n' > $out/bin/hi
      chmod +x $out/bin/hi
      ln -s ../share/numbers $out/bin/link
    '' ];
  };
in derivation {
  name = "arca-upstream-top";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "export PATH=/bin:/usr/bin; mkdir $out; echo \${dep} > $out/dep" ];
}`;

async function makeWorld(): Promise<World> {
  const dir = await Deno.makeTempDir({ prefix: "arca-upstream-test-" });
  const closure = (await runNix("nix-build", ["--no-out-link", "-E", CLOSURE_EXPR])).trim();
  const top = closure.split("\n").at(-1)!;
  const dep = (await runNix("nix-store", ["-qR", top])).trim().split("\n")
    .find((path) => path.endsWith("-arca-upstream-dep"))!;
  const key = await secretKey(dir, "upstream-test-1");
  const other = await secretKey(dir, "other-test-1");
  const unsignedPath = await contentPath(dir, "arca-upstream-unsigned", "unsigned\n");
  const wrongKeyPath = await contentPath(dir, "arca-upstream-wrong-key", "wrong key\n");
  const tamperedPath = await contentPath(
    dir,
    "arca-upstream-tampered",
    "tampered\n".repeat(50_000),
  );
  const badUrlPath = await contentPath(dir, "arca-upstream-bad-url", "bad url\n");
  const bigSource = `${dir}/src-big/arca-upstream-big`;
  await Deno.mkdir(bigSource, { recursive: true });
  await Deno.writeFile(`${bigSource}/random`, pseudoRandomBytes(12 << 20, 12));
  const bigPath = await addToStore(bigSource);
  const w: World = {
    dir,
    dep,
    top,
    unsignedPath,
    wrongKeyPath,
    tamperedPath,
    badUrlPath,
    bigPath,
    publicKey: key.pub,
    good: `${dir}/good`,
    goodZstd: `${dir}/good-zstd`,
    unsigned: `${dir}/unsigned`,
    wrongKey: `${dir}/wrong-key`,
    tampered: `${dir}/tampered`,
    badUrl: `${dir}/bad-url`,
  };
  await copyTo(w.good, [top], { key: key.file, compression: "xz" });
  await copyTo(w.goodZstd, [top, bigPath], { key: key.file, compression: "zstd" });
  await copyTo(w.unsigned, [unsignedPath], { compression: "xz" });
  await copyTo(w.wrongKey, [wrongKeyPath], { key: other.file, compression: "xz" });
  await copyTo(w.tampered, [tamperedPath], { key: key.file, compression: "none" });
  await copyTo(w.badUrl, [badUrlPath], { key: key.file, compression: "xz" });
  // Flip one byte inside the file contents of the tampered NAR: still a valid NAR, wrong hash.
  const info = parseNarInfo(
    await Deno.readTextFile(`${w.tampered}/${hashPartOf(tamperedPath)}.narinfo`),
  );
  const narFile = `${w.tampered}/${info.url}`;
  const nar = await Deno.readFile(narFile);
  nar[Math.floor(nar.length / 2)] ^= 0x01;
  await Deno.writeFile(narFile, nar);
  // A narinfo whose URL leaves the upstream (the URL is not signed, so the Sig stays valid).
  const badInfo = `${w.badUrl}/${hashPartOf(badUrlPath)}.narinfo`;
  const text = await Deno.readTextFile(badInfo);
  await Deno.writeTextFile(badInfo, text.replace(/^URL: .*$/m, "URL: ../good/nix-cache-info"));
  return w;
}

/** A cache, upstream servers over `roots`, and a source + handler over them. */
async function setup(
  roots: string[],
  options: Partial<UpstreamSourceOptions> = {},
) {
  const w = await getWorld();
  const fixture = await makeCacheFixture({ prefix: "arca-upstream-cache-" });
  const servers: StaticServer[] = [];
  try {
    for (const root of roots) servers.push(await startStaticServer(root));
  } catch (error) {
    for (const server of servers) await server.stop();
    await fixture.close();
    throw error;
  }
  const logged: string[] = [];
  const source = new UpstreamSource(fixture.cache, {
    upstreams: servers.map((server) => ({
      url: server.url,
      trustedKeys: [parsePublicKey(w.publicKey)],
    })),
    compression: "zstd",
    segments: [UNIVERSAL_SEGMENT],
    log: (line) => logged.push(line),
    ...options,
  });
  const handler = createHandler(fixture.cache, {
    priority: 40,
    sources: [source],
    log: (line) => logged.push(line),
  });
  return {
    w,
    cache: fixture.cache,
    servers,
    source,
    handler,
    logged,
    async close() {
      await handler.close();
      await source.close();
      for (const server of servers) await server.stop();
      await fixture.close();
    },
  };
}

async function get(handler: Handler, path: string, method = "GET"): Promise<Response> {
  return await handler(new Request(`${BASE}/${path}`, { method }));
}

/**
 * The NAR of a path through the handler, as Nix gets it: narinfo, then its URL (served
 * uncompressed while the path comes from upstream; decompressed here once it is local).
 */
async function narThrough(handler: Handler, storePath: string): Promise<Uint8Array> {
  const response = await get(handler, `${hashPartOf(storePath)}.narinfo`);
  assert.equal(response.status, 200, `narinfo of ${storePath}`);
  const info = parseNarInfo(await response.text());
  const nar = await get(handler, info.url);
  assert.equal(nar.status, 200, `NAR of ${storePath}`);
  const body = nar.body!.pipeThrough(decompressStream(parseUploadCompression(info.compression)));
  return new Uint8Array(await new Response(body).arrayBuffer());
}

/** Asserts two NARs are the same bytes (by length and hash: no huge diff on failure). */
function assertSameNar(actual: Uint8Array, expected: Uint8Array, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  assert.equal(formatNixHash(sha256(actual)), formatNixHash(sha256(expected)), `${what}: hash`);
}

/** Rejects when `promise` takes longer than `ms` (a bound proving "does not hang"). */
async function within<T>(ms: number, what: string, promise: Promise<T>): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} took longer than ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([promise, late]);
  } finally {
    clearTimeout(timer);
  }
}

function test(name: string, fn: () => Promise<void>): void {
  Deno.test({ name: `upstream: ${name}`, ignore: !HAVE_NIX, fn });
}

test("lookups fetch narinfos only, and remember hits and misses", async () => {
  const t = await setup([(await getWorld()).good]);
  try {
    const [server] = t.servers;
    const path = await t.source.lookup(hashPartOf(t.w.top));
    assert.ok(path);
    assert.equal(path.storePath, t.w.top);
    assert.deepEqual(path.references, [t.w.dep.slice("/nix/store/".length)]);
    const expected = parseNarInfo(
      await Deno.readTextFile(`${t.w.good}/${hashPartOf(t.w.top)}.narinfo`),
    );
    assert.deepEqual(path.sigs, expected.sigs);
    assert.equal(path.narHash, expected.narHash);
    assert.ok(path.deriver?.endsWith(".drv"));
    assert.equal(await t.source.lookup(hashPartOf(t.w.top)), path, "remembered");
    const nowhere = hashPartOf(fakeStorePath("nowhere-upstream"));
    assert.equal(await t.source.lookup(nowhere), null);
    assert.equal(await t.source.lookup(nowhere), null);
    // Concurrent lookups of one path are one request.
    const dep = hashPartOf(t.w.dep);
    await Promise.all([t.source.lookup(dep), t.source.lookup(dep), t.source.lookup(dep)]);
    const counts = await server.counts();
    assert.equal(counts[`/${hashPartOf(t.w.top)}.narinfo`], 1);
    assert.equal(counts[`/${nowhere}.narinfo`], 1, "a miss is remembered");
    assert.equal(counts[`/${dep}.narinfo`], 1);
    assert.equal(await server.countMatching(/^\/nar\//), 0, "no NAR was requested");
  } finally {
    await t.close();
  }
  // With no negative TTL to speak of, a miss is asked again.
  const again = await setup([(await getWorld()).good], { negativeTtlMs: 1 });
  try {
    const nowhere = hashPartOf(fakeStorePath("nowhere-upstream-2"));
    assert.equal(await again.source.lookup(nowhere), null);
    await new Promise((resolve) => setTimeout(resolve, 5));
    assert.equal(await again.source.lookup(nowhere), null);
    assert.equal((await again.servers[0].counts())[`/${nowhere}.narinfo`], 2);
  } finally {
    await again.close();
  }
});

for (const [name, root] of [["xz", "good"], ["zstd", "goodZstd"]] as const) {
  test(`a NAR (${name}) streams to the client and is imported, with the upstream's signatures`, async () => {
    const w = await getWorld();
    const t = await setup([w[root]], {
      segments: [{ name: "nixpkgs", filter: "nixpkgs" }, { name: "team", filter: "custom" }],
    });
    try {
      const [server] = t.servers;
      for (const storePath of [w.top, w.dep]) {
        assertSameNar(await narThrough(t.handler, storePath), await narDump(storePath), storePath);
      }
      await t.source.idle();
      for (const storePath of [w.top, w.dep]) {
        const record = await t.cache.getPath(hashPartOf(storePath));
        assert.ok(record, `${storePath} is local`);
        const upstream = parseNarInfo(
          await Deno.readTextFile(`${w[root]}/${hashPartOf(storePath)}.narinfo`),
        );
        assert.deepEqual(record.narInfo.sigs, upstream.sigs);
        assert.deepEqual(record.narInfo.references, upstream.references);
        assert.equal(record.narInfo.deriver, upstream.deriver);
        assert.equal(record.narInfo.narHash, upstream.narHash);
        assert.equal(record.segment, "team");
      }
      const events = [];
      for await (const event of t.cache.audit.read()) events.push(event);
      const fetches = events.filter((e) => e.type === "Fetch");
      assert.deepEqual(fetches.map((e) => e.storePath).sort(), [w.dep, w.top].sort());
      assert.ok(
        fetches.every((e) => e.detail?.startsWith(`from ${server.url}`)),
        fetches[0].detail,
      );
      // Served from here now: no new upstream request for the NAR.
      const nars = await server.countMatching(/^\/nar\//);
      assert.equal(nars, 2);
      assertSameNar(await narThrough(t.handler, w.dep), await narDump(w.dep), "local NAR");
      assert.equal(await server.countMatching(/^\/nar\//), nars);
      const metrics = await t.handler.metrics.render(t.cache);
      assert.match(metrics, /arca_cache_hits_total\{source="upstream"\} 2/);
    } finally {
      await t.close();
    }
  });
}

test("a client that goes away does not stop the import (memory and file spools)", async () => {
  const w = await getWorld();
  const t = await setup([w.goodZstd]);
  try {
    for (const storePath of [w.dep, w.bigPath]) {
      const response = await get(t.handler, `${hashPartOf(storePath)}.narinfo`);
      const info = parseNarInfo(await response.text());
      const nar = await get(t.handler, info.url);
      const reader = nar.body!.getReader();
      const first = await reader.read();
      assert.ok(!first.done && first.value.length > 0);
      await reader.cancel();
      await within(20_000, "the import", t.source.idle());
      const stored = await t.cache.narOfPath(hashPartOf(storePath));
      assert.ok(stored, `${storePath} is local`);
      const whole = new Uint8Array(
        await new Response(t.cache.openNar(stored.manifest)).arrayBuffer(),
      );
      assert.equal(formatNixHash(sha256(whole)), stored.record.narInfo.narHash);
    }
    const spoolDir = `${t.cache.cacheDir}/upstream-spool`;
    assert.deepEqual([...Deno.readDirSync(spoolDir)], [], "the spool file is removed");
  } finally {
    await t.close();
  }
});

test("an import waits while a client still reads another NAR from upstream", async () => {
  const w = await getWorld();
  const t = await setup([w.goodZstd]);
  try {
    const open = async (storePath: string) => {
      const response = await get(t.handler, `${hashPartOf(storePath)}.narinfo`);
      const info = parseNarInfo(await response.text());
      return (await get(t.handler, info.url)).body!.getReader();
    };
    // A client reads the big path slowly while another gets dep whole.
    const slow = await open(w.bigPath);
    assert.ok(!(await slow.read()).done);
    const quick = await open(w.dep);
    while (!(await quick.read()).done) { /* the whole file */ }
    // dep is not imported while the big path is still being read.
    await new Promise((resolve) => setTimeout(resolve, 2500));
    assert.equal(await t.cache.getPath(hashPartOf(w.dep)), null, "dep waits for the reader");
    while (!(await slow.read()).done) { /* the rest */ }
    await within(20_000, "both imports", t.source.idle());
    assert.ok(await t.cache.getPath(hashPartOf(w.dep)), "dep is local");
    assert.ok(await t.cache.getPath(hashPartOf(w.bigPath)), "the big path is local");
  } finally {
    await t.close();
  }
});

test("imports stop waiting for quiet once the waiting spools hold too much memory", async () => {
  const w = await getWorld();
  const t = await setup([w.goodZstd], { spoolsMemoryBytes: 1 });
  try {
    const open = async (storePath: string) => {
      const response = await get(t.handler, `${hashPartOf(storePath)}.narinfo`);
      const info = parseNarInfo(await response.text());
      return (await get(t.handler, info.url)).body!.getReader();
    };
    const slow = await open(w.bigPath);
    assert.ok(!(await slow.read()).done);
    const quick = await open(w.dep);
    while (!(await quick.read()).done) { /* the whole file */ }
    // dep's spool alone is over the budget: its import does not wait for the slow reader.
    for (let i = 0; i < 200 && (await t.cache.getPath(hashPartOf(w.dep))) === null; i++) {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    assert.ok(await t.cache.getPath(hashPartOf(w.dep)), "dep is imported meanwhile");
    await slow.cancel();
    await within(20_000, "the imports", t.source.idle());
  } finally {
    await t.close();
  }
});

test("requests for one NAR fetch it once, and none waits for another", async () => {
  const w = await getWorld();
  const t = await setup([w.goodZstd]);
  try {
    for (const storePath of [w.dep, w.bigPath]) {
      const response = await get(t.handler, `${hashPartOf(storePath)}.narinfo`);
      const info = parseNarInfo(await response.text());
      const nars = await Promise.all([
        get(t.handler, info.url),
        get(t.handler, info.url),
        get(t.handler, info.url),
      ]);
      const expected = await narDump(storePath);
      // A zstd upstream's file is passed through as it is: what its narinfo names.
      assert.equal(info.compression, "zstd");
      assert.match(info.url, /^nar\/[0-9a-z]{52}\.nar\.zst$/);
      // Read one after another, the last first: each reads the spool at its own pace.
      for (const nar of nars.reverse()) {
        assert.equal(nar.status, 200);
        const file = new Uint8Array(await nar.arrayBuffer());
        assert.equal(file.length, info.fileSize);
        assert.equal(formatNixHash(sha256(file)), info.fileHash);
        const unpacked = ReadableStream.from([file]).pipeThrough(decompressStream("zstd"));
        assertSameNar(
          new Uint8Array(await new Response(unpacked).arrayBuffer()),
          expected,
          storePath,
        );
      }
      await t.source.idle();
      assert.ok(await t.cache.getPath(hashPartOf(storePath)), `${storePath} is local`);
    }
    assert.equal(await t.servers[0].countMatching(/^\/nar\//), 2, "each NAR fetched once");
  } finally {
    await t.close();
  }
});

test("an upstream that hangs is skipped after its timeout, and the next one answers", async () => {
  const w = await getWorld();
  const t = await setup([w.good, w.good], { timeoutMs: 1000 });
  try {
    const [hanging, good] = t.servers;
    await hanging.setMode({ hang: "." });
    const response = await within(
      20_000,
      "a narinfo with the first upstream hanging",
      get(t.handler, `${hashPartOf(w.top)}.narinfo`),
    );
    assert.equal(response.status, 200);
    await response.body?.cancel();
    assert.equal(await hanging.countMatching(/\.narinfo$/), 1);
    assert.equal(await good.countMatching(/\.narinfo$/), 1);
    assert.ok(t.logged.some((line) => line.includes(hanging.url) && /no answer within/.test(line)));
    // Marked down: the next lookups skip it.
    const missing = await get(t.handler, `${hashPartOf(fakeStorePath("hang-miss"))}.narinfo`);
    assert.equal(missing.status, 404);
    await missing.body?.cancel();
    assert.equal(await hanging.countMatching(/\.narinfo$/), 1);
    // A NAR that stalls: the client's body is cut off, nothing is stored.
    await good.setMode({ stallAfter: 2000 });
    const info = await get(t.handler, `${hashPartOf(w.dep)}.narinfo`);
    const url = parseNarInfo(await info.text()).url;
    const nar = await get(t.handler, url);
    assert.equal(nar.status, 200);
    await within(20_000, "a stalled NAR", assert.rejects(nar.arrayBuffer()));
    await within(20_000, "the failed import", t.source.idle());
    assert.equal(await t.cache.getPath(hashPartOf(w.dep)), null);
    assert.ok(t.logged.some((line) => /stalled/.test(line)), t.logged.join("\n"));
  } finally {
    await t.close();
  }
});

test("an upstream that is down is skipped; none left is a 404", async () => {
  const w = await getWorld();
  const t = await setup([w.good], { timeoutMs: 1000 });
  try {
    await t.servers[0].stop();
    const response = await within(
      20_000,
      "a narinfo with the upstream down",
      get(t.handler, `${hashPartOf(w.top)}.narinfo`),
    );
    assert.equal(response.status, 404);
    await response.body?.cancel();
    assert.ok(t.logged.some((line) => line.includes(t.servers[0].url)), t.logged.join("\n"));
  } finally {
    await t.close();
  }
});

test("unsigned, wrongly signed and outward-pointing narinfos are refused", async () => {
  const w = await getWorld();
  const t = await setup([w.unsigned, w.wrongKey, w.badUrl]);
  try {
    for (const storePath of [w.unsignedPath, w.wrongKeyPath, w.badUrlPath]) {
      const response = await get(t.handler, `${hashPartOf(storePath)}.narinfo`);
      assert.equal(response.status, 404, storePath);
      await response.body?.cancel();
    }
    const log = t.logged.join("\n");
    assert.match(log, /not signed/);
    assert.match(log, /no valid signature from a trusted key \(upstream-test-1\)/);
    assert.match(log, /leaves the upstream/);
    for (const server of t.servers) assert.equal(await server.countMatching(/^\/nar\//), 0);
  } finally {
    await t.close();
  }
});

test("a NAR that does not match its NarHash is never a complete body, and is not stored", async () => {
  const w = await getWorld();
  const t = await setup([w.tampered]);
  try {
    const response = await get(t.handler, `${hashPartOf(w.tamperedPath)}.narinfo`);
    const info = parseNarInfo(await response.text());
    const nar = await get(t.handler, info.url);
    assert.equal(nar.status, 200);
    await assert.rejects(nar.arrayBuffer());
    await t.source.idle();
    assert.equal(await t.cache.getPath(hashPartOf(w.tamperedPath)), null);
    const paths = [];
    for await (const record of t.cache.listPaths()) paths.push(record);
    assert.deepEqual(paths, []);
    assert.match(
      t.logged.join("\n"),
      /not imported: .* hashes to sha256:\w+, its NarHash is sha256:\w+: refused/,
    );
  } finally {
    await t.close();
  }
});

test("1000 existence checks cause no NAR download", async () => {
  const w = await getWorld();
  const t = await setup([w.good]);
  try {
    const hashes = Array.from({ length: 998 }, (_, i) => hashPartOf(fakeStorePath(`exist-${i}`)));
    hashes.push(hashPartOf(w.top), hashPartOf(w.dep));
    const statuses: number[] = [];
    for (let i = 0; i < hashes.length; i += 25) {
      const batch = await Promise.all(
        hashes.slice(i, i + 25).map(async (hash, j) => {
          const response = await get(t.handler, `${hash}.narinfo`, j % 2 ? "HEAD" : "GET");
          await response.body?.cancel();
          return response.status;
        }),
      );
      statuses.push(...batch);
    }
    assert.deepEqual(statuses.slice(-2), [200, 200]);
    assert.equal(statuses.filter((s) => s === 404).length, 998);
    const [server] = t.servers;
    assert.equal(await server.countMatching(/\.narinfo$/), 1000);
    assert.equal(await server.countMatching(/^\/nar\//), 0);
  } finally {
    await t.close();
  }
});

test("verify --repair refetches a path whose chunk was damaged", async () => {
  const w = await getWorld();
  const t = await setup([w.good]);
  try {
    await narThrough(t.handler, w.dep);
    await t.source.idle();
    const hashPart = hashPartOf(w.dep);
    const { manifest } = (await t.cache.narOfPath(hashPart))!;
    const chunk = manifest.chunks[Math.floor(manifest.chunks.length / 2)];
    const file = t.cache.chunks.chunkPath(chunk.id, manifest.compression);
    const bytes = await Deno.readFile(file);
    bytes[bytes.length - 3] ^= 0xff;
    await Deno.writeFile(file, bytes);
    const found = await verifyCache(t.cache);
    assert.deepEqual(found.badPaths.map((p) => p.storePath), [w.dep]);
    const repaired = await verifyCache(t.cache, {
      repair: true,
      refetchers: [(record) => t.source.refetch(record)],
    });
    assert.deepEqual(repaired.refetched, [{ storePath: w.dep, from: t.servers[0].url }]);
    const clean = await verifyCache(t.cache);
    assert.deepEqual([clean.badChunks, clean.badPaths], [[], []]);
    assert.ok(await t.cache.getPath(hashPart), "the narinfo stays");
    assertSameNar(await narThrough(t.handler, w.dep), await narDump(w.dep), "repaired NAR");
  } finally {
    await t.close();
  }
});

Deno.test("Spool: readers follow it as it grows, each at its own pace; it ends whole, or errors with the source", async () => {
  const pieces = Array.from({ length: 100 }, (_, i) => new Uint8Array(100_000).fill(i));
  const whole = new Uint8Array(10_000_000);
  pieces.forEach((piece, i) => whole.set(piece, i * 100_000));
  const read = async (stream: ReadableStream<Uint8Array>) =>
    new Uint8Array(await new Response(stream).arrayBuffer());
  const dir = await Deno.makeTempDir({ prefix: "arca-spool-test-" });
  try {
    for (const size of [whole.length, 1000]) { // a file spool, and a memory one
      const spool = await Spool.create(dir, size);
      // A source that gives a piece each time it is let go: readers wait for it.
      let release!: () => void;
      const source = new ReadableStream<Uint8Array>({
        async pull(controller) {
          await new Promise<void>((resolve) => release = resolve);
          const piece = pieces.shift();
          if (piece) controller.enqueue(piece);
          else controller.close();
        },
      });
      const all = [...pieces];
      const early = spool.reader();
      const filling = spool.fill(source);
      const earlyRead = read(early);
      let lateRead: Promise<Uint8Array> | undefined;
      for (let i = 0; i <= 100; i++) {
        while (release === undefined) await new Promise((resolve) => setTimeout(resolve, 1));
        const go = release;
        release = undefined!;
        go();
        if (i === 50) {
          // A reader that joins halfway still gets the NAR from its start.
          const late = spool.reader();
          lateRead = read(late);
        }
        await new Promise((resolve) => setTimeout(resolve, 0));
      }
      await filling;
      pieces.push(...all);
      assertSameNar(await earlyRead, whole, "early reader");
      assertSameNar(await lateRead!, whole, "late reader");
      // A reader that leaves does not hold the others (nor the import's wait).
      const leaving = spool.reader().getReader();
      await leaving.read();
      await leaving.cancel();
      await spool.unread(20_000);
      assert.equal(spool.readers, 0);
      const last = spool.reader();
      await spool.discard();
      assert.equal(spool.readable, false);
      assertSameNar(await read(last), whole, "a reader opened before the discard");
      assert.throws(() => spool.reader(), /gone/);
    }
    assert.deepEqual([...Deno.readDirSync(dir)], [], "spool files are removed");

    // A source that fails errors the readers and the fill.
    const failing = await Spool.create(dir, whole.length);
    const reader = failing.reader();
    const filling = failing.fill(
      new ReadableStream({
        pull(controller) {
          controller.enqueue(new Uint8Array(1000));
          controller.error(new Error("upstream cut short"));
        },
      }),
    );
    await assert.rejects(filling, /upstream cut short/);
    await assert.rejects(read(reader), /upstream cut short/);
    await failing.discard();
    assert.deepEqual([...Deno.readDirSync(dir)], []);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

test("a passed-through file longer than its FileSize is cut at it, not spooled whole", async () => {
  const w = await getWorld();
  const root = await Deno.makeTempDir({ prefix: "arca-upstream-long-file-" });
  try {
    // FileSize is not signed: an upstream can send more than it claims.
    const copied = await new Deno.Command("cp", { args: ["-r", `${w.goodZstd}/.`, root] })
      .output();
    assert.ok(copied.success);
    const hashPart = hashPartOf(w.dep);
    const info = parseNarInfo(await Deno.readTextFile(`${root}/${hashPart}.narinfo`));
    const file = await Deno.open(`${root}/${info.url}`, { append: true });
    await file.write(pseudoRandomBytes(1 << 20, 31));
    file.close();
    const t = await setup([root]);
    try {
      const path = await t.source.lookup(hashPart);
      assert.ok(path?.file);
      const stream = await t.source.openFile(hashPart, path);
      const read = new Response(stream).arrayBuffer();
      await assert.rejects(read, /FileSize/);
      await t.source.idle();
      assert.equal(await t.cache.getPath(hashPart), null);
    } finally {
      await t.close();
    }
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});
