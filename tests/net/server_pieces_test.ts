/**
 * Large NARs through a real `Deno.serve` with reused body pieces (`reusePieces`, what
 * `arca serve` runs): every client gets exactly the NAR file its narinfo names (FileHash
 * and FileSize), whether it reads as fast as it can, slowly (curl --limit-rate, so the
 * server waits on a full socket), several at once over HTTP/1.1 and HTTP/2, by ranges, or
 * hangs up half way. The buffers of a body are written again while it is sent, so any
 * piece still held by Deno when it is reused would show here as a wrong hash.
 * @module
 */

import assert from "node:assert/strict";
import { formatNixHash, sha256 } from "../../src/cache/hash.ts";
import { PIECE_BYTES, PIECE_RING } from "../../src/cache/nar_pieces.ts";
import type { NarInfo } from "../../src/cache/narinfo.ts";
import { createHandler } from "../../src/net/server.ts";
import {
  fakeStorePath,
  importFixture,
  makeCacheFixture,
  pseudoRandomBytes,
} from "../helpers/cache_fixture.ts";

/** curl's body, its SHA-256 (Nix form) and length. */
async function curl(url: string, args: string[] = []): Promise<{ hash: string; size: number }> {
  const output = await new Deno.Command("curl", {
    args: ["-sS", "--fail", "--max-time", "120", ...args, url],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(output.code, 0, new TextDecoder().decode(output.stderr));
  return { hash: formatNixHash(sha256(output.stdout)), size: output.stdout.length };
}

Deno.test("server pieces: large NARs over a real socket, fast, slow, concurrent, by ranges", async () => {
  await using fx = await makeCacheFixture({ prefix: "arca-server-pieces-" });
  // Random, so chunks are stored as large as they come: ~3 rings of pieces per NAR.
  const size = 3 * PIECE_RING * PIECE_BYTES + 54321;
  const nars: NarInfo[] = [];
  for (const seed of [1, 2]) {
    const imported = await importFixture(fx.cache, {
      type: "directory",
      entries: { data: { type: "regular", contents: pseudoRandomBytes(size, seed) } },
    }, { storePath: fakeStorePath(`large-${seed}`) });
    nars.push(imported.result.record.narInfo);
  }
  const handler = createHandler(fx.cache, { priority: 30, reusePieces: true });
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, handler);
  const base = `http://127.0.0.1:${server.addr.port}`;
  try {
    const expect = (info: NarInfo) => ({ hash: info.fileHash, size: info.fileSize });
    for (const info of nars) {
      assert.ok(info.fileSize! > 3 * PIECE_RING * PIECE_BYTES);
      assert.deepEqual(await curl(`${base}/${info.url}`), expect(info));
      // ~1 s at 20 MB/s: the server waits on a full socket for most of it.
      assert.deepEqual(await curl(`${base}/${info.url}`, ["--limit-rate", "20M"]), expect(info));
    }

    // Both NARs, six clients each, at once: HTTP/1.1 and HTTP/2 (which Deno.serve speaks
    // to a client that opens with its preface, and which holds more pieces alive: a ring of
    // 4 was measured to break it, HTTP/1.1 at 3), some slow. One request per curl process:
    // curl 7.88 fails on a reused HTTP/2 connection to Deno.serve whatever the body.
    const h2 = "--http2-prior-knowledge";
    const clients = [[], [], ["--limit-rate", "40M"], [h2], [h2, "--limit-rate", "30M"], [
      h2,
      "--limit-rate",
      "60M",
    ]];
    const together = await Promise.all(
      nars.flatMap((info) => clients.map((args) => curl(`${base}/${info.url}`, args))),
    );
    together.forEach((got, i) =>
      assert.deepEqual(got, expect(nars[Math.floor(i / clients.length)]))
    );

    // Ranges, checked against the whole file.
    const whole = await fetch(`${base}/${nars[0].url}`).then((r) => r.bytes());
    for (const [start, end] of [[1, whole.length - 1], [PIECE_BYTES + 3, whole.length - 1]]) {
      const part = await fetch(`${base}/${nars[0].url}`, {
        headers: { range: `bytes=${start}-${end}` },
      });
      assert.equal(part.status, 206);
      assert.deepEqual(await part.bytes(), whole.subarray(start, end + 1));
    }

    // A client that hangs up half way leaves nothing behind for the next one.
    const partial = await fetch(`${base}/${nars[1].url}`);
    const reader = partial.body!.getReader();
    let read = 0;
    while (read < 2 * PIECE_BYTES) read += (await reader.read()).value?.length ?? Infinity;
    await reader.cancel();
    assert.deepEqual(await curl(`${base}/${nars[1].url}`), expect(nars[1]));
  } finally {
    await server.shutdown();
    await handler.close();
  }
});
