/**
 * Tests of the filesystem NAR encoder (src/cache/nar_dump.ts) against the real
 * `nix-store --dump`: byte-identical output for store paths built by Nix and for
 * temporary directories, bounded chunking, unsupported file types and cancellation.
 * @module
 */

import assert from "node:assert/strict";
import { buildFixture, HAVE_NIX, narDump } from "../helpers/nix.ts";
import { DEFAULT_DUMP_BUFFER_SIZE, dumpNar } from "../../src/cache/nar_dump.ts";
import { NarParser } from "../../src/cache/nar.ts";
import { FormatError, NotFoundError } from "../../src/errors.ts";

async function collectChunks(stream: ReadableStream<Uint8Array>): Promise<Uint8Array[]> {
  const chunks: Uint8Array[] = [];
  for await (const chunk of stream) chunks.push(chunk);
  return chunks;
}

/** Reads a byte stream with a BYOB reader into one reused buffer of `viewSize` bytes. */
async function readByob(stream: ReadableStream<Uint8Array>, viewSize: number): Promise<Uint8Array> {
  const reader = stream.getReader({ mode: "byob" });
  const parts: Uint8Array[] = [];
  let buffer = new ArrayBuffer(viewSize);
  for (;;) {
    const { value, done } = await reader.read(new Uint8Array(buffer));
    if (done) break;
    assert.ok(value.length > 0 && value.length <= viewSize);
    parts.push(value.slice());
    buffer = value.buffer as ArrayBuffer;
    new Uint8Array(buffer).fill(0xee); // the reader reuses its buffer
  }
  return concat(parts);
}

function concat(chunks: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const chunk of chunks) {
    out.set(chunk, at);
    at += chunk.length;
  }
  return out;
}

function assertSameBytes(actual: Uint8Array, expected: Uint8Array, what: string): void {
  const n = Math.min(actual.length, expected.length);
  let i = 0;
  while (i < n && actual[i] === expected[i]) i++;
  if (i < n || actual.length !== expected.length) {
    assert.fail(
      `${what}: ${actual.length} bytes vs nix's ${expected.length}, first difference at byte ${i}`,
    );
  }
}

/** dumpNar(path) must equal `nix-store --dump path` for each buffer size. */
async function assertDumpsLikeNix(path: string, bufferSizes: (number | undefined)[]) {
  const expected = await narDump(path);
  for (const bufferSize of bufferSizes) {
    const chunks = await collectChunks(dumpNar(path, { bufferSize }));
    assertSameBytes(concat(chunks), expected, `dumpNar(${path}, ${bufferSize})`);
    const size = bufferSize ?? DEFAULT_DUMP_BUFFER_SIZE;
    chunks.forEach((chunk, i) => {
      if (i < chunks.length - 1) assert.equal(chunk.length, size, `chunk ${i} of ${path}`);
      else assert.ok(chunk.length > 0 && chunk.length <= size, `last chunk of ${path}`);
    });
    const small = expected.length < 100_000 ? [1, 7] : [4093];
    for (const viewSize of new Set([...small, size, 3 * size + 5, 1 << 20])) {
      assertSameBytes(
        await readByob(dumpNar(path, { bufferSize }), viewSize),
        expected,
        `dumpNar(${path}, ${bufferSize}) read into ${viewSize}-byte views`,
      );
    }
  }
  // Nix's own dump is a valid NAR for our parser, too.
  const parser = new NarParser();
  parser.push(expected);
  parser.end();
  return expected;
}

// The fixture builder runs /bin/sh; printf octal escapes make the non-ASCII names.
const TREE_SCRIPT = [
  "mkdir -p $out/dir/nested/deeper $out/emptydir $out/names",
  ": > $out/empty",
  "printf x > $out/size1",
  "printf 1234567 > $out/size7",
  "printf 12345678 > $out/size8",
  "printf 123456789 > $out/size9",
  "yes 'the quick brown fox jumps' | head -c 3145739 > $out/big",
  "printf '#!/bin/sh\\necho hi\\n' > $out/exe && chmod +x $out/exe",
  ": > $out/emptyexe && chmod +x $out/emptyexe",
  "ln -s size1 $out/rel",
  "ln -s /etc/passwd $out/abs",
  "ln -s does/not/exist $out/dangling",
  "ln -s ../../size1 $out/dir/nested/up",
  "printf deep > $out/dir/nested/deeper/file",
  "for n in B a a.b a-b ab a_b A Z z 10 9 __proto__ constructor '~'; do printf %s $n > $out/names/$n; done",
  // é, 中, U+FF5E, U+1F600 (byte order differs from UTF-16 order for the last two)
  "for n in '\\303\\251' '\\344\\270\\255' '\\357\\275\\236' '\\360\\237\\230\\200'; do printf x > $out/names/$(printf $n); done",
  "printf x > \"$out/names/$(printf 'tab\\011x')\"",
  "printf x > \"$out/names/$(printf 'new\\012line')\"",
  "printf x > \"$out/names/$(printf 'q\\042uote')\"",
  "printf x > \"$out/names/$(printf 'back\\134slash')\"",
].join(" && ");

Deno.test({
  name: "dumpNar equals nix-store --dump for a tree built by Nix",
  ignore: !HAVE_NIX,
  async fn() {
    const out = await buildFixture("arca-nar-dump-tree", TREE_SCRIPT);
    await assertDumpsLikeNix(out, [undefined, 64 * 1024, 4093]);
    // Tiny buffers exercise every split of the framing (on the small parts only).
    await assertDumpsLikeNix(`${out}/dir`, [1, 7, 8, 9]);
    await assertDumpsLikeNix(`${out}/names`, [1, 13]);
  },
});

Deno.test({
  name: "dumpNar equals nix-store --dump for file, executable, symlink and empty roots",
  ignore: !HAVE_NIX,
  async fn() {
    const file = await buildFixture("arca-nar-dump-file", "printf 'hello world' > $out");
    const exe = await buildFixture(
      "arca-nar-dump-exe",
      "printf '#!/bin/sh\\n' > $out && chmod +x $out",
    );
    const empty = await buildFixture("arca-nar-dump-emptyfile", ": > $out");
    const link = await buildFixture("arca-nar-dump-link", "ln -s /nix/store/nonexistent $out");
    const dir = await buildFixture("arca-nar-dump-emptydir", "mkdir $out");
    for (const path of [file, exe, empty, link, dir]) {
      await assertDumpsLikeNix(path, [undefined, 1, 5]);
    }
  },
});

Deno.test({
  name: "dumpNar equals nix-store --dump for temporary directories (mode bits, sizes, names)",
  ignore: !HAVE_NIX,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "arca-nar-dump-" });
    try {
      const root = `${dir}/root`;
      await Deno.mkdir(`${root}/sub/subsub`, { recursive: true });
      await Deno.mkdir(`${root}/empty`);
      for (const size of [0, 1, 7, 8, 9, 15, 16, 17, 4096, 65537]) {
        const bytes = new Uint8Array(size).map((_, i) => (i * 31 + size) & 0xff);
        await Deno.writeFile(`${root}/size-${size}`, bytes);
      }
      // Nix only looks at the owner's execute bit (S_IXUSR).
      await Deno.writeTextFile(`${root}/owner-exec`, "a", { mode: 0o744 });
      await Deno.chmod(`${root}/owner-exec`, 0o744);
      await Deno.writeTextFile(`${root}/group-exec`, "b");
      await Deno.chmod(`${root}/group-exec`, 0o654);
      await Deno.writeTextFile(`${root}/read-only`, "c");
      await Deno.chmod(`${root}/read-only`, 0o400);
      for (const name of ["😀", "～", "é", "Ä", "a", "B", "\uFFFD", "x y", "-", "." + "hidden"]) {
        await Deno.writeTextFile(`${root}/sub/${name}`, name);
      }
      await Deno.symlink("../size-1", `${root}/sub/up`);
      await Deno.symlink("héllo wörld", `${root}/sub/unicode-link`);
      await Deno.writeTextFile(`${root}/sub/subsub/x`, "x");
      await assertDumpsLikeNix(root, [undefined, 3, 64]);
      await assertDumpsLikeNix(`${root}/size-65537`, [undefined, 1000]);
      await assertDumpsLikeNix(`${root}/sub/up`, [undefined]);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test("dumpNar streams a large file in bounded chunks", async () => {
  const dir = await Deno.makeTempDir({ prefix: "arca-nar-dump-" });
  try {
    const size = 5 * 1024 * 1024 + 3;
    const bytes = new Uint8Array(size).map((_, i) => (i * 7) & 0xff);
    await Deno.writeFile(`${dir}/big`, bytes);
    const bufferSize = 256 * 1024;
    const seen: number[] = [];
    const parser = new NarParser({
      onContents: (piece) => {
        for (const b of piece) seen.push(b);
      },
    });
    let chunks = 0;
    for await (const chunk of dumpNar(`${dir}/big`, { bufferSize })) {
      assert.ok(chunk.length <= bufferSize);
      parser.push(chunk);
      chunks++;
    }
    parser.end();
    assert.equal(chunks, Math.ceil(parser.offset / bufferSize));
    assert.equal(seen.length, size);
    assert.ok(seen.every((b, i) => b === bytes[i]));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("dumpNar rejects FIFOs and sockets with a FormatError naming the path", async () => {
  const dir = await Deno.makeTempDir({ prefix: "arca-nar-dump-" });
  try {
    await Deno.mkdir(`${dir}/tree/sub`, { recursive: true });
    await Deno.writeTextFile(`${dir}/tree/a`, "a");
    const mkfifo = await new Deno.Command("mkfifo", { args: [`${dir}/tree/sub/pipe`] }).output();
    assert.ok(mkfifo.success, "mkfifo");
    await assert.rejects(collectChunks(dumpNar(`${dir}/tree`)), (error: Error) => {
      assert.ok(error instanceof FormatError, String(error));
      assert.match(error.message, /sub\/pipe: unsupported file type FIFO/);
      return true;
    });
    await assert.rejects(collectChunks(dumpNar(`${dir}/tree/sub/pipe`)), FormatError);

    const listener = Deno.listen({ transport: "unix", path: `${dir}/sock` });
    try {
      await assert.rejects(collectChunks(dumpNar(`${dir}/sock`)), (error: Error) => {
        assert.ok(error instanceof FormatError, String(error));
        assert.match(error.message, /sock: unsupported file type socket/);
        return true;
      });
    } finally {
      listener.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("dumpNar rejects a name that is not UTF-8 and a missing path", async () => {
  const dir = await Deno.makeTempDir({ prefix: "arca-nar-dump-" });
  try {
    await Deno.mkdir(`${dir}/tree`);
    const touch = await new Deno.Command("sh", {
      args: ["-c", `touch "$1/tree/$(printf 'x\\377y')"`, "sh", dir],
    }).output();
    assert.ok(touch.success, "touch");
    await assert.rejects(collectChunks(dumpNar(`${dir}/tree`)), (error: Error) => {
      assert.ok(error instanceof FormatError, String(error));
      assert.match(error.message, /not valid UTF-8/);
      return true;
    });
    await assert.rejects(collectChunks(dumpNar(`${dir}/missing`)), (error: Error) => {
      assert.ok(error instanceof NotFoundError, String(error));
      assert.match(error.message, /missing: no such file/);
      return true;
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("dumpNar closes its file when the stream is cancelled mid-file", async () => {
  const dir = await Deno.makeTempDir({ prefix: "arca-nar-dump-" });
  try {
    await Deno.writeFile(`${dir}/big`, new Uint8Array(4 * 1024 * 1024));
    const reader = dumpNar(`${dir}/big`, { bufferSize: 64 * 1024 }).getReader();
    const first = await reader.read();
    assert.equal(first.value?.length, 64 * 1024);
    await reader.cancel();
    // The test's resource sanitizer fails if the file were left open.
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("dumpNar rejects an invalid buffer size", () => {
  assert.throws(() => dumpNar("/", { bufferSize: 0 }), RangeError);
  assert.throws(() => dumpNar("/", { bufferSize: 1.5 }), RangeError);
});
