/**
 * Hostile requests against a real `Deno.serve` on 127.0.0.1 running the substituter
 * handler. Requests are written as raw HTTP/1.1 bytes over `Deno.connect` (fetch would
 * normalize `..`, `%2e` and `//` away): traversal in every spelling, NUL and backslashes,
 * overlong paths, malformed hashes, other methods. Each gets its exact 4xx, no response
 * carries /etc/passwd, symlinks planted in the cache directory are never served, and the
 * server keeps serving afterwards. Runs for both metadata backends.
 * @module
 */

import assert from "node:assert/strict";
import { parseNixHash } from "../../src/cache/hash.ts";
import type { MetadataBackend } from "../../src/cache/metadata.ts";
import { encodeNixBase32 } from "../../src/cache/nixbase32.ts";
import { createHandler } from "../../src/net/server.ts";
import {
  fakeStorePath,
  hashPartOf,
  importFixture,
  makeCacheFixture,
  sampleTree,
} from "../helpers/cache_fixture.ts";

interface RawResponse {
  status: number;
  headers: Map<string, string>;
  /** Everything after the header block (possibly chunked-encoded). */
  body: string;
  /** The whole response as text. */
  raw: string;
}

/** Sends `request` as raw bytes on a new connection and reads the response until close. */
async function rawRequest(port: number, request: string | Uint8Array): Promise<RawResponse> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  // A safety net so a hung server fails the test instead of hanging it.
  const timer = setTimeout(() => conn.close(), 20_000);
  const parts: Uint8Array[] = [];
  try {
    const bytes = typeof request === "string" ? new TextEncoder().encode(request) : request;
    let written = 0;
    while (written < bytes.length) written += await conn.write(bytes.subarray(written));
    const buffer = new Uint8Array(64 * 1024);
    for (;;) {
      const n = await conn.read(buffer);
      if (n === null) break;
      parts.push(buffer.slice(0, n));
    }
  } finally {
    clearTimeout(timer);
    try {
      conn.close();
    } catch {
      // Closed by the timer.
    }
  }
  const raw = new TextDecoder("latin1").decode(concat(parts));
  const [head, ...rest] = raw.split("\r\n\r\n");
  const [statusLine, ...headerLines] = head.split("\r\n");
  const match = /^HTTP\/1\.1 (\d{3}) /.exec(statusLine);
  assert.ok(match, `no HTTP status line in ${JSON.stringify(raw.slice(0, 200))}`);
  const headers = new Map<string, string>();
  for (const line of headerLines) {
    const colon = line.indexOf(":");
    headers.set(line.slice(0, colon).toLowerCase(), line.slice(colon + 1).trim());
  }
  return { status: Number(match[1]), headers, body: rest.join("\r\n\r\n"), raw };
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

function requestBytes(method: string, target: string, extra = ""): string {
  return `${method} ${target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n${extra}\r\n`;
}

/** A made-up but valid 32-character hash part. */
function validHash(name: string): string {
  return hashPartOf(fakeStorePath(name));
}

const PASSWD_MARKERS = ["root:", "/bin/sh", "/bin/bash", "nologin"];

function assertNoPasswd(response: RawResponse, what: string) {
  for (const marker of PASSWD_MARKERS) {
    assert.ok(!response.raw.includes(marker), `${what}: response contains ${marker}`);
  }
}

for (const backend of ["kv", "filesystem"] as MetadataBackend[]) {
  Deno.test(`server security (${backend}): hostile requests over a real socket`, async (t) => {
    await using fx = await makeCacheFixture({ backend, prefix: "arca-server-sec-" });
    const logs: string[] = [];
    const handler = createHandler(fx.cache, { priority: 30, log: (m) => logs.push(m) });
    const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, handler);
    const port = server.addr.port;
    try {
      const good = await importFixture(fx.cache, sampleTree("good"), {
        storePath: fakeStorePath("good-1.0"),
      });
      const goodInfo = good.result.record.narInfo;
      const fileHashPart = goodInfo.url.slice("nar/".length, "nar/".length + 52);
      const absentHash = validHash("absent");
      const absentNar = encodeNixBase32(new Uint8Array(32).fill(7));

      const checkAll = async (cases: [string, string, number][], extra = "") => {
        const results = await Promise.all(
          cases.map(([method, target]) => rawRequest(port, requestBytes(method, target, extra))),
        );
        results.forEach((response, i) => {
          const [method, target, status] = cases[i];
          const what = `${method} ${JSON.stringify(target.slice(0, 80))}`;
          assert.equal(response.status, status, `${what}: ${response.body.slice(0, 200)}`);
          assertNoPasswd(response, what);
          assert.ok(!response.raw.includes(fx.dir), `${what}: response names the cache dir`);
        });
      };

      await t.step("path traversal in every spelling: 400", async () => {
        await checkAll([
          ["GET", "/nar/../../etc/passwd", 400],
          ["GET", "/../../../../../../etc/passwd", 400],
          ["GET", "/%2e%2e/%2e%2e/etc/passwd", 400],
          ["GET", "/%2E%2E/%2E%2E/etc/passwd", 400],
          ["GET", "/nar/%2e%2e%2f%2e%2e%2fetc%2fpasswd", 400],
          ["GET", "/..%2f..%2fetc%2fpasswd", 400],
          ["GET", "//etc/passwd", 400],
          ["GET", "/nar//x", 400],
          ["GET", "http://x/../../etc/passwd", 400], // absolute-form
          ["GET", "http://127.0.0.1//etc/passwd", 400],
          ["GET", "http://x/%2e%2e/etc/passwd", 400],
          ["GET", `/../${good.hashPart}.narinfo`, 400],
          ["GET", `/nar/../${good.hashPart}.narinfo`, 400],
          ["GET", `/nar/${fileHashPart}.nar.zst/../../../etc/passwd`, 400],
          ["GET", "/nix-cache-info/../../passwd", 400],
          ["GET", "/a%00b.narinfo", 400],
          ["GET", `/${good.hashPart}%00.narinfo`, 400],
          ["GET", "/nar\\..\\..\\etc\\passwd", 400],
          ["GET", "/..\\..\\etc\\passwd", 400],
          ["GET", `/${"a".repeat(10_000)}`, 400],
          ["GET", `/${"a".repeat(10_000)}.narinfo`, 400],
          ["GET", `/nar/${"../".repeat(3000)}etc/passwd`, 400],
          ["GET", "/nix-cache-info%20", 400],
          ["GET", "/~root/.ssh/id_rsa", 400],
        ]);
      });

      await t.step("a raw NUL in the request target: 400", async () => {
        for (const target of ["/a\0b.narinfo", `/${good.hashPart}\0.narinfo`, "/\0"]) {
          const response = await rawRequest(port, requestBytes("GET", target));
          assert.equal(response.status, 400, JSON.stringify(target));
          assertNoPasswd(response, JSON.stringify(target));
        }
      });

      await t.step("malformed hashes: 400; unknown routes and hashes: 404", async () => {
        const upper = good.hashPart.toUpperCase();
        await checkAll([
          ["GET", `/${upper}.narinfo`, 400],
          ["GET", `/${good.hashPart.slice(0, 31)}.narinfo`, 400],
          ["GET", `/${good.hashPart}a.narinfo`, 400],
          ["GET", `/${"e".repeat(32)}.narinfo`, 400], // e, o, u, t are not nix32
          ["GET", `/${good.hashPart.slice(0, 31)}u.narinfo`, 400],
          ["GET", `/${good.hashPart.slice(0, 31)}_.narinfo`, 400],
          ["GET", `/${upper}.ls`, 400],
          ["GET", `/${"o".repeat(32)}.ls`, 400],
          ["GET", `/nar/${"u".repeat(52)}.nar.zst`, 400],
          ["GET", `/nar/${fileHashPart.slice(0, 51)}t.nar.zst`, 400],
          ["GET", `/nar/${"z".repeat(52)}.nar.zst`, 400], // bits beyond 256
          ["GET", `/nar/${fileHashPart.slice(0, 51)}.nar.zst`, 400],
          ["GET", `/nar/${fileHashPart}0.nar.xz`, 400],
          ["GET", `/nar/${fileHashPart.toUpperCase()}.nar`, 400],
          ["GET", `/${absentHash}.narinfo`, 404],
          ["GET", `/${absentHash}.ls`, 404],
          ["GET", `/nar/${absentNar}.nar.zst`, 404],
          ["GET", `/nar/${fileHashPart}.nar.gz`, 404],
          ["GET", `/nar/${fileHashPart}.nar.xz`, 404], // stored as zstd
          ["GET", `/${good.hashPart}.narinfo/`, 404],
          ["GET", `/./${good.hashPart}.narinfo`, 404],
          ["GET", "/etc/passwd", 404],
          ["GET", "/.narinfo", 404],
          ["GET", "/", 404],
          ["GET", "/?../../etc/passwd", 404],
        ]);
      });

      await t.step("other methods: 405 with Allow; PUT with uploads off: 403", async () => {
        const cases: [string, string, number][] = [
          ["POST", "/nix-cache-info", 405],
          ["PUT", "/nix-cache-info", 403],
          ["PUT", `/${good.hashPart}.narinfo`, 403],
          ["PUT", `/nar/${fileHashPart}.nar.zst`, 403],
          ["PUT", "/../../etc/passwd", 400],
          ["DELETE", `/${good.hashPart}.narinfo`, 405],
          ["DELETE", `/nar/${fileHashPart}.nar.zst`, 405],
          ["PATCH", `/${good.hashPart}.narinfo`, 405],
          ["OPTIONS", "/nix-cache-info", 405],
          ["POST", "/../../etc/passwd", 400], // malformed first
        ];
        await checkAll(cases, "Content-Length: 0\r\n");
        const put = await rawRequest(
          port,
          requestBytes("PUT", `/${validHash("upload")}.narinfo`, "Content-Length: 5\r\n") +
            "hello",
        );
        assert.equal(put.status, 403);
        assert.equal(await fx.cache.getPath(validHash("upload")), null);
        assert.ok(await fx.cache.getPath(good.hashPart), "DELETE removed nothing");
      });

      await t.step(
        "symlinks to /etc/passwd planted in the cache dir are never served",
        async () => {
          const planted = validHash("planted");
          await Deno.symlink("/etc/passwd", `${fx.dir}/passwd`);
          await Deno.mkdir(`${fx.dir}/nar`, { recursive: true });
          await Deno.symlink("/etc/passwd", `${fx.dir}/nar/${absentNar}.nar.zst`);
          await Deno.symlink("/etc/passwd", `${fx.dir}/${planted}.narinfo`);
          await Deno.symlink("/etc/passwd", `${fx.dir}/${planted}.ls`);
          await Deno.mkdir(`${fx.dir}/narinfo`, { recursive: true });
          if (backend === "kv") {
            // Not a file the kv backend reads: the path stays unknown.
            await Deno.symlink("/etc/passwd", `${fx.dir}/narinfo/${planted}.narinfo`);
          }
          await checkAll([
            ["GET", "/passwd", 404],
            ["GET", `/nar/${absentNar}.nar.zst`, 404],
            ["GET", `/${planted}.narinfo`, 404],
            ["GET", `/${planted}.ls`, 404],
            ["GET", "/nix-cache-info/passwd", 404],
            ["GET", "/objects/passwd", 404],
          ]);

          // Files of the store itself replaced by symlinks: never a 200.
          const chunkVictim = await importFixture(fx.cache, sampleTree("chunk-victim"), {
            storePath: fakeStorePath("chunk-victim-1"),
          });
          const manifestVictim = await importFixture(fx.cache, sampleTree("manifest-victim"), {
            storePath: fakeStorePath("manifest-victim-1"),
          });
          const narinfoVictim = await importFixture(fx.cache, sampleTree("narinfo-victim"), {
            storePath: fakeStorePath("narinfo-victim-1"),
          });
          const chunkNar = await fx.cache.findNar(chunkVictim.result.record.narInfo.fileHash!);
          for (const chunk of chunkNar!.manifest.chunks) {
            const path = fx.cache.chunks.chunkPath(chunk.id, "zstd");
            await Deno.remove(path);
            await Deno.symlink("/etc/passwd", path);
          }
          const manifestPath = fx.cache.manifests.manifestPath(
            parseNixHash(manifestVictim.result.record.narInfo.fileHash!),
          );
          await Deno.remove(manifestPath);
          await Deno.symlink("/etc/passwd", manifestPath);
          const victims: [string, number[]][] = [
            [`/${chunkVictim.result.record.narInfo.url}`, [404]],
            [`/${chunkVictim.hashPart}.ls`, [404]],
            [`/${manifestVictim.result.record.narInfo.url}`, [404, 500]],
            [`/${manifestVictim.hashPart}.ls`, [404, 500]],
          ];
          if (backend === "filesystem") {
            const narinfoPath = `${fx.dir}/narinfo/${narinfoVictim.hashPart}.narinfo`;
            await Deno.remove(narinfoPath);
            await Deno.symlink("/etc/passwd", narinfoPath);
            victims.push([`/${narinfoVictim.hashPart}.narinfo`, [404, 500]]);
            victims.push([`/${narinfoVictim.hashPart}.ls`, [404, 500]]);
          }
          for (const [target, statuses] of victims) {
            for (const method of ["GET", "HEAD"]) {
              const response = await rawRequest(port, requestBytes(method, target));
              assert.ok(
                statuses.includes(response.status),
                `${method} ${target}: ${response.status} ${response.body.slice(0, 200)}`,
              );
              assertNoPasswd(response, target);
              assert.ok(!response.raw.includes(fx.dir), `${target}: response names the cache dir`);
            }
          }
        },
      );

      await t.step("the server still serves normal requests", async () => {
        const info = await rawRequest(port, requestBytes("GET", "/nix-cache-info"));
        assert.equal(info.status, 200);
        assert.equal(info.body, "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n");
        const narinfo = await rawRequest(port, requestBytes("GET", `/${good.hashPart}.narinfo`));
        assert.equal(narinfo.status, 200);
        assert.ok(narinfo.body.startsWith(`StorePath: ${good.storePath}\n`), narinfo.body);
        assert.equal(narinfo.headers.get("content-length"), String(narinfo.body.length));
        const headResponse = await rawRequest(
          port,
          requestBytes("HEAD", `/${good.hashPart}.narinfo`),
        );
        assert.equal(headResponse.status, 200);
        assert.equal(headResponse.body, "");
        assert.equal(headResponse.headers.get("content-length"), String(narinfo.body.length));

        const response = await fetch(`http://127.0.0.1:${port}/${goodInfo.url}`);
        const body = new Uint8Array(await response.arrayBuffer());
        assert.equal(response.status, 200);
        assert.equal(body.length, goodInfo.fileSize);
      });
    } finally {
      await server.shutdown();
    }
  });
}
