/**
 * Tests of the pure NAR codec (src/cache/nar.ts): the parser against dumps and `.ls`
 * listings written by the real Nix, the framing writer, and one rejection test per
 * kind of invalid input, each checking that the error says where (byte offset, path).
 * @module
 */

import assert from "node:assert/strict";
import { addToStore, HAVE_NIX, narDump, nixEnv, runNix } from "../helpers/nix.ts";
import {
  compareNarNames,
  encodeNar,
  encodeNarString,
  formatNarListing,
  listNar,
  NAR_MAGIC,
  type NarEntry,
  NarFormatError,
  type NarListing,
  NarListingBuilder,
  NarParser,
  narStringSize,
  narValidator,
  NarWriter,
} from "../../src/cache/nar.ts";
import { FormatError } from "../../src/errors.ts";

const te = new TextEncoder();

/** A NAR (or a piece of one) made of the given strings, each framed. */
function nar(...parts: (string | Uint8Array)[]): Uint8Array {
  const encoded = parts.map((p) => encodeNarString(p));
  const out = new Uint8Array(encoded.reduce((n, e) => n + e.length, 0));
  let at = 0;
  for (const e of encoded) {
    out.set(e, at);
    at += e.length;
  }
  return out;
}

/** Byte offset after the given strings: where the next one starts. */
function at(...parts: (string | Uint8Array)[]): number {
  return parts.reduce<number>(
    (n, p) => n + narStringSize(typeof p === "string" ? te.encode(p).length : p.length),
    0,
  );
}

function parse(bytes: Uint8Array, options: { maxDepth?: number } = {}): NarEntry[] {
  const entries: NarEntry[] = [];
  const parser = new NarParser({ ...options, onEntry: (e) => entries.push(e) });
  parser.push(bytes);
  parser.end();
  return entries;
}

/** Asserts that parsing fails with a NarFormatError at `offset` in `path`, matching `detail`. */
function assertRejects(
  bytes: Uint8Array,
  offset: number,
  path: string,
  detail: RegExp,
  options: { maxDepth?: number } = {},
): void {
  assert.throws(() => parse(bytes, options), (error: Error) => {
    assert.ok(error instanceof NarFormatError, `not a NarFormatError: ${error}`);
    assert.ok(error instanceof FormatError);
    assert.equal(error.code, "format");
    assert.equal(error.offset, offset, error.message);
    assert.equal(error.path, path, error.message);
    const where = path === "" ? "the root" : JSON.stringify(
      path.length > 200 ? "…" + path.slice(-200) : path,
    );
    assert.ok(
      error.message.startsWith(`Cannot parse NAR at byte ${offset} in ${where}: `),
      error.message,
    );
    assert.match(error.message, detail);
    return true;
  });
}

const HEAD = [NAR_MAGIC, "(", "type"];
const DIR = [...HEAD, "directory"];
const entry = (name: string | Uint8Array, ...node: (string | Uint8Array)[]) => [
  "entry",
  "(",
  "name",
  name,
  "node",
  "(",
  "type",
  ...node,
  ")",
  ")",
];
const file = (contents: string) => ["regular", "contents", contents];

Deno.test("encodeNar writes the canonical framing", () => {
  const tree = encodeNar({
    type: "directory",
    entries: {
      b: { type: "symlink", target: "a" },
      a: { type: "regular", contents: te.encode("hello"), executable: true },
      c: { type: "directory", entries: {} },
    },
  });
  const expected = nar(
    ...DIR,
    ...["entry", "(", "name", "a", "node", "(", "type", "regular", "executable", ""],
    ...["contents", "hello", ")", ")"],
    ...entry("b", "symlink", "target", "a"),
    ...entry("c", "directory"),
    ")",
  );
  assert.deepEqual(tree, expected);
  assert.deepEqual(
    encodeNarString("abc"),
    new Uint8Array([3, 0, 0, 0, 0, 0, 0, 0, 0x61, 0x62, 0x63, 0, 0, 0, 0, 0]),
  );
  assert.deepEqual(encodeNarString(""), new Uint8Array(8));
});

Deno.test("NarWriter hands out full chunks and copies contents straight into them", () => {
  const contents = new Uint8Array(1000).map((_, i) => i & 0xff);
  for (const chunkSize of [1, 3, 8, 64, 100, 4096]) {
    const writer = new NarWriter({ chunkSize });
    writer.regular(contents.length);
    let done = 0;
    const chunks: Uint8Array[] = [];
    while (writer.contentsLeft > 0) {
      const target = writer.contentsBuffer();
      assert.ok(target.length > 0 && target.length <= writer.contentsLeft);
      const take = Math.min(target.length, 37);
      target.set(contents.subarray(done, done + take));
      target.fill(0xee, take); // scribbles past the commit must not leak into the NAR
      writer.commitContents(take);
      done += take;
      chunks.push(...writer.takeChunks());
    }
    chunks.push(...writer.finish());
    chunks.slice(0, -1).forEach((c) => assert.equal(c.length, chunkSize));
    const bytes = new Uint8Array(writer.size);
    let offset = 0;
    for (const c of chunks) {
      bytes.set(c, offset);
      offset += c.length;
    }
    assert.deepEqual(bytes, encodeNar({ type: "regular", contents }), `chunkSize ${chunkSize}`);
  }
  const writer = new NarWriter();
  writer.regular(4);
  assert.throws(() => writer.symlink("x"), /contents are incomplete/);
  assert.throws(() => writer.contents(new Uint8Array(5)), RangeError);
  assert.throws(() => writer.finish(), /4 bytes of contents missing/);
});

Deno.test("NarWriter reuses recycled chunks and ignores what is not its own chunk", () => {
  const contents = new Uint8Array(5000).map((_, i) => (i * 7) & 0xff);
  const writer = new NarWriter({ chunkSize: 256 });
  writer.regular(contents.length);
  const out: Uint8Array[] = [];
  const buffers = new Set<ArrayBufferLike>();
  let done = 0;
  while (writer.contentsLeft > 0) {
    const target = writer.contentsBuffer();
    const take = Math.min(target.length, 100);
    target.set(contents.subarray(done, done + take));
    writer.commitContents(take);
    done += take;
    for (const chunk of writer.takeChunks()) {
      out.push(chunk.slice());
      buffers.add(chunk.buffer);
      chunk.fill(0xee); // the consumer is done with it...
      writer.recycle(chunk); // ...and gives it back
      writer.recycle(chunk); // twice is ignored
    }
    writer.recycle(new Uint8Array(256)); // not one of its chunks: a fresh buffer is fine too
    writer.recycle(new Uint8Array(300)); // wrong size: ignored
  }
  out.push(...writer.finish());
  const bytes = new Uint8Array(out.reduce((n, c) => n + c.length, 0));
  let offset = 0;
  for (const c of out) {
    bytes.set(c, offset);
    offset += c.length;
  }
  assert.deepEqual(bytes, encodeNar({ type: "regular", contents }));
  assert.ok(buffers.size < out.length / 2, `${buffers.size} buffers for ${out.length} chunks`);
});

Deno.test("NarWriter writes straight into buffers it is redirected to", () => {
  const tree = {
    type: "directory" as const,
    entries: {
      a: { type: "regular" as const, contents: new Uint8Array(3000).map((_, i) => i & 0xff) },
      b: { type: "symlink" as const, target: "a" },
      c: { type: "regular" as const, executable: true, contents: new Uint8Array(700).fill(9) },
    },
  };
  const expected = encodeNar(tree);
  for (const [chunkSize, targetSize] of [[64, 100], [256, 64], [1000, 4096], [8, 9]]) {
    const writer = new NarWriter({ chunkSize });
    const out: Uint8Array[] = [];
    const targets = new Set<ArrayBufferLike>();
    const drain = () => {
      for (const chunk of writer.takeChunks()) out.push(chunk.slice());
      const target = new Uint8Array(new ArrayBuffer(targetSize + 16), 16);
      if (writer.redirect(target)) targets.add(target.buffer);
    };
    const file = (contents: Uint8Array, executable = false) => {
      writer.regular(contents.length, { executable });
      let done = 0;
      while (writer.contentsLeft > 0) {
        const buffer = writer.contentsBuffer();
        const take = Math.min(buffer.length, 50);
        buffer.set(contents.subarray(done, done + take));
        writer.commitContents(take);
        done += take;
        drain();
      }
    };
    drain();
    writer.directory();
    writer.entry("a");
    file(tree.entries.a.contents);
    writer.endEntry();
    drain();
    writer.entry("b");
    writer.symlink("a");
    writer.endEntry();
    drain();
    writer.entry("c");
    file(tree.entries.c.contents, true);
    writer.endEntry();
    writer.endDirectory();
    const last = writer.finish();
    out.push(...last.map((c) => c.slice()));
    assert.ok(targets.size > 0, "some redirects were accepted");
    assert.equal(writer.redirect(new Uint8Array(100)), false, "not after finish");
    const bytes = new Uint8Array(out.reduce((n, c) => n + c.length, 0));
    let offset = 0;
    for (const c of out) {
      bytes.set(c, offset);
      offset += c.length;
    }
    assert.deepEqual(bytes, expected, `chunkSize ${chunkSize}, targets of ${targetSize}`);
  }
});

Deno.test("compareNarNames orders by bytes, not UTF-16 code units", () => {
  const names = ["😀", "～", "a", "B", "a.b", "a-b", "ab", "10", "9", "é"];
  const sorted = names.map((n) => te.encode(n)).sort(compareNarNames).map((b) =>
    new TextDecoder().decode(b)
  );
  assert.deepEqual(sorted, ["10", "9", "B", "a", "a-b", "a.b", "ab", "é", "～", "😀"]);
});

Deno.test("NarParser reports entries, offsets and sizes", () => {
  const bytes = encodeNar({
    type: "directory",
    entries: {
      "exe": { type: "regular", contents: te.encode("#!"), executable: true },
      "empty": { type: "regular", contents: new Uint8Array(0) },
      "d": { type: "directory", entries: { "l": { type: "symlink", target: "../exe" } } },
    },
  });
  const entries = parse(bytes);
  assert.deepEqual(entries.map((e) => [e.type, e.path]), [
    ["directory", ""],
    ["directory", "/d"],
    ["symlink", "/d/l"],
    ["regular", "/empty"],
    ["regular", "/exe"],
  ]);
  const exe = entries[4];
  assert.ok(exe.type === "regular");
  assert.equal(exe.executable, true);
  assert.equal(exe.size, 2);
  assert.equal(new TextDecoder().decode(bytes.subarray(exe.offset, exe.offset + 2)), "#!");
  assert.equal(entries[2].type === "symlink" && entries[2].target, "../exe");
  const empty = entries[3];
  assert.ok(empty.type === "regular" && empty.size === 0 && !empty.executable);
});

/** Writes a tree exercising sizes, names, modes and symlinks into `root`. */
async function writeTree(root: string): Promise<void> {
  await Deno.mkdir(`${root}/sub/deeper`, { recursive: true });
  await Deno.mkdir(`${root}/empty-dir`);
  for (const size of [0, 1, 7, 8, 9, 3 * 1024 * 1024 + 5]) {
    await Deno.writeFile(
      `${root}/size-${size}`,
      new Uint8Array(size).map((_, i) => (i * 13 + 1) & 0xff),
    );
  }
  await Deno.writeTextFile(`${root}/exe`, "#!/bin/sh\n");
  await Deno.chmod(`${root}/exe`, 0o755);
  const names = [
    "B",
    "a",
    "a.b",
    "a-b",
    "ab",
    "10",
    "9",
    "é",
    "～",
    "😀",
    "__proto__",
    "tab\tname",
    "new\nline",
    'q"uote',
    "back\\slash",
    "ctl\x01\x7f",
  ];
  for (const name of names) await Deno.writeTextFile(`${root}/sub/${name}`, name);
  await Deno.writeTextFile(`${root}/sub/deeper/x`, "x");
  await Deno.symlink("../size-1", `${root}/sub/relative`);
  await Deno.symlink("/etc/passwd", `${root}/absolute`);
  await Deno.symlink("does/not/exist", `${root}/dangling`);
}

type WalkedEntry = NarEntry extends infer E ? E extends NarEntry ? Omit<E, "offset"> : never
  : never;

/** The entries NarParser must report for `root`, from an independent walk with Deno. */
async function walk(root: string, path = ""): Promise<WalkedEntry[]> {
  const full = root + path;
  const info = await Deno.lstat(full);
  if (info.isSymlink) return [{ type: "symlink", path, target: await Deno.readLink(full) }];
  if (info.isFile) {
    return [{
      type: "regular",
      path,
      executable: ((info.mode ?? 0) & 0o100) !== 0,
      size: info.size,
    }];
  }
  const names: string[] = [];
  for await (const e of Deno.readDir(full)) names.push(e.name);
  names.sort((a, b) => compareNarNames(te.encode(a), te.encode(b)));
  const out: WalkedEntry[] = [{ type: "directory", path }];
  for (const name of names) out.push(...await walk(root, `${path}/${name}`));
  return out;
}

/** Copies store paths into a file:// cache with `.ls` listings; returns the cache dir. */
async function nixListings(paths: string[]): Promise<string> {
  const cache = await Deno.makeTempDir({ prefix: "arca-nar-ls-" });
  await runNix("nix", [
    "copy",
    "--to",
    `file://${cache}?compression=none&write-nar-listing=true`,
    ...paths,
  ], { env: nixEnv() });
  return cache;
}

Deno.test({
  name: "NarParser and listNar agree with Nix on its own dumps and .ls listings",
  ignore: !HAVE_NIX,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "arca-nar-test-" });
    let cache: string | undefined;
    try {
      await writeTree(`${dir}/tree`);
      await Deno.writeTextFile(`${dir}/single`, "a single file");
      await Deno.symlink("/etc/hosts", `${dir}/link`);
      const paths = [
        await addToStore(`${dir}/tree`),
        await addToStore(`${dir}/single`),
        await addToStore(`${dir}/link`),
      ];
      cache = await nixListings(paths);
      for (const path of paths) {
        const bytes = await narDump(path);
        // Entries match an independent walk of the store path; offsets point at the contents.
        const entries = parse(bytes);
        const withoutOffsets = entries.map((e) => {
          if (e.type !== "regular") return e;
          const { offset: _, ...rest } = e;
          return rest;
        });
        assert.deepEqual(withoutOffsets, await walk(path));
        for (const e of entries) {
          if (e.type !== "regular" || e.size > 4096) continue;
          const contents = await Deno.readFile(path + e.path);
          assert.deepEqual(bytes.subarray(e.offset, e.offset + e.size), contents, e.path);
        }
        // listNar equals the .ls Nix wrote, as JSON and byte for byte.
        const hash = path.split("/").at(-1)!.slice(0, 32);
        const nixLs = await Deno.readTextFile(`${cache}/${hash}.ls`);
        const ours = await listNar([bytes.subarray(0, 100), bytes.subarray(100)]);
        assert.deepEqual(JSON.parse(JSON.stringify(ours)), JSON.parse(nixLs));
        assert.equal(formatNarListing(ours), nixLs);
        // Also through a ReadableStream.
        assert.deepEqual(await listNar(ReadableStream.from([bytes])), ours);
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
      if (cache) await Deno.remove(cache, { recursive: true });
    }
  },
});

Deno.test("listNar builds a prototype-free listing in Nix's shape", async () => {
  const bytes = encodeNar({
    type: "directory",
    entries: {
      ["__proto__"]: { type: "regular", contents: te.encode("p") },
      "constructor": { type: "directory" as const, entries: {} },
      "x": { type: "regular", contents: te.encode("xx"), executable: true },
      "l": { type: "symlink", target: "x" },
    },
  });
  const listing: NarListing = await listNar([bytes]);
  assert.equal(listing.version, 1);
  assert.ok(listing.root.type === "directory");
  const entries = listing.root.entries;
  assert.equal(Object.getPrototypeOf(entries), null);
  assert.deepEqual(Object.keys(entries).sort(), ["__proto__", "constructor", "l", "x"]);
  assert.equal(entries["__proto__"].type, "regular");
  assert.deepEqual({ ...entries["x"] }, {
    type: "regular",
    size: 2,
    executable: true,
    narOffset: entries["x"].type === "regular" ? entries["x"].narOffset : -1,
  });
  assert.equal(
    formatNarListing(listing),
    `{"version":1,"root":{"type":"directory","entries":{` +
      `"__proto__":{"type":"regular","size":1,"narOffset":${
        (entries["__proto__"] as { narOffset: number }).narOffset
      }},` +
      `"constructor":{"type":"directory","entries":{}},` +
      `"l":{"type":"symlink","target":"x"},` +
      `"x":{"type":"regular","size":2,"executable":true,"narOffset":${
        (entries["x"] as { narOffset: number }).narOffset
      }}}}}`,
  );
  await assert.rejects(listNar([bytes.subarray(0, 50)]), NarFormatError);
  const builder = new NarListingBuilder();
  assert.throws(() => builder.listing, /no entries/);
});

Deno.test("narValidator passes bytes through unchanged and errors on bad input", async () => {
  const bytes = encodeNar({
    type: "directory",
    entries: { a: { type: "regular", contents: new Uint8Array(100).fill(7) } },
  });
  const pieces = [bytes.subarray(0, 13), bytes.subarray(13, 200), bytes.subarray(200)];
  const seen: NarEntry[] = [];
  const out: Uint8Array[] = [];
  for await (
    const chunk of ReadableStream.from(pieces).pipeThrough(
      narValidator({ onEntry: (e) => seen.push(e) }),
    )
  ) out.push(chunk);
  assert.deepEqual(out, pieces);
  assert.equal(seen.length, 2);

  const truncated = ReadableStream.from([bytes.subarray(0, bytes.length - 8)]);
  await assert.rejects(
    Array.fromAsync(truncated.pipeThrough(narValidator())),
    (e: Error) => e instanceof NarFormatError && /truncated/.test(e.message),
  );
  const bad = bytes.slice();
  bad[0] = 0x0e; // magic length 14
  await assert.rejects(
    Array.fromAsync(ReadableStream.from([bad]).pipeThrough(narValidator())),
    NarFormatError,
  );
});

Deno.test("NarParser rejects bad magic", () => {
  assertRejects(nar("nix-archive-2", "(", "type", "regular"), 0, "", /bad magic/);
  assertRejects(nar("(", "type"), 0, "", /bad magic: expected "nix-archive-1", got "\("/);
  assertRejects(new Uint8Array(16), 0, "", /bad magic/);
  assertRejects(nar("x".repeat(40)), 0, "", /expected the magic.*string of 40 bytes/);
});

Deno.test("NarParser rejects unknown and misplaced tokens", () => {
  assertRejects(nar(NAR_MAGIC, "["), at(NAR_MAGIC), "", /expected "\(", got "\["/);
  assertRejects(nar(...HEAD, "fifo"), at(...HEAD), "", /unknown file type "fifo"/);
  assertRejects(nar(NAR_MAGIC, "(", "name"), at(NAR_MAGIC, "("), "", /expected "type"/);
  // Fields in a non-canonical order or for the wrong type.
  assertRejects(
    nar(...HEAD, "regular", "contents", "x", "executable", ""),
    at(...HEAD, "regular", "contents", "x"),
    "",
    /expected "\)", got "executable"/,
  );
  assertRejects(
    nar(...HEAD, "regular", ")"),
    at(...HEAD, "regular"),
    "",
    /expected "executable" or "contents", got "\)"/,
  );
  assertRejects(
    nar(...HEAD, "symlink", "contents", "x"),
    at(...HEAD, "symlink"),
    "",
    /expected "target"/,
  );
  assertRejects(
    nar(...HEAD, "regular", "executable", "1", "contents", "", ")"),
    at(...HEAD, "regular", "executable"),
    "",
    /executable marker has a non-empty value "1"/,
  );
  assertRejects(
    nar(...DIR, "entry", "(", "node"),
    at(...DIR, "entry", "("),
    "",
    /expected "name", got "node"/,
  );
  assertRejects(
    nar(...DIR, "entry", "(", "name", "a", "name"),
    at(...DIR, "entry", "(", "name", "a"),
    "",
    /expected "node"/,
  );
  const inner = ["entry", "(", "name", "a", "node", "(", "type", ...file("x"), ")"];
  assertRejects(
    nar(...DIR, ...inner, "entry"),
    at(...DIR, ...inner),
    "",
    /expected "\)", got "entry"/,
  );
  assertRejects(nar(...DIR, "target"), at(...DIR), "", /expected "entry" or "\)", got "target"/);
  assertRejects(
    nar(...DIR, ...entry("a", "symlink", "target", "b"), "type", "regular"),
    at(...DIR, ...entry("a", "symlink", "target", "b")),
    "",
    /expected "entry" or "\)", got "type"/,
  );
  // An error deep inside names the entry being read.
  assertRejects(
    nar(
      ...DIR,
      "entry",
      "(",
      "name",
      "d",
      "node",
      "(",
      "type",
      "directory",
      "entry",
      "(",
      "name",
      "f",
      "node",
      "(",
      "type",
      "regular",
      "contents",
      "x",
      "bogus",
    ),
    at(
      ...DIR,
      "entry",
      "(",
      "name",
      "d",
      "node",
      "(",
      "type",
      "directory",
      "entry",
      "(",
      "name",
      "f",
      "node",
      "(",
      "type",
      "regular",
      "contents",
      "x",
    ),
    "/d/f",
    /expected "\)", got "bogus"/,
  );
});

Deno.test("NarParser rejects unsorted and duplicate entries", () => {
  const a = entry("a", ...file("1"));
  const b = entry("b", ...file("2"));
  assertRejects(
    nar(...DIR, ...b, ...a, ")"),
    at(...DIR, ...b, "entry", "(", "name"),
    "",
    /entries not sorted: "a" after "b"/,
  );
  assertRejects(
    nar(...DIR, ...a, ...a, ")"),
    at(...DIR, ...a, "entry", "(", "name"),
    "",
    /duplicate entry name "a"/,
  );
  // "B" < "a" < "a-b" < "a.b" < "ab" in byte order; the UTF-16 order of these two differs.
  parse(nar(...DIR, ...entry("B", ...file("")), ...entry("a", ...file("")), ")"));
  assertRejects(
    nar(...DIR, ...entry("a.b", ...file("")), ...entry("a-b", ...file("")), ")"),
    at(...DIR, ...entry("a.b", ...file("")), "entry", "(", "name"),
    "",
    /not sorted: "a-b" after "a.b"/,
  );
  assertRejects(
    nar(...DIR, ...entry("😀", ...file("")), ...entry("～", ...file("")), ")"),
    at(...DIR, ...entry("😀", ...file("")), "entry", "(", "name"),
    "",
    /not sorted/,
  );
  // Order is per directory: a sub-directory's names restart.
  const sub = ["entry", "(", "name", "z", "node", "(", "type", "directory", ...b, ...b, ")", ")"];
  assertRejects(
    nar(...DIR, ...sub, ")"),
    at(
      ...DIR,
      "entry",
      "(",
      "name",
      "z",
      "node",
      "(",
      "type",
      "directory",
      ...b,
      "entry",
      "(",
      "name",
    ),
    "/z",
    /duplicate entry name "b"/,
  );
  parse(nar(...DIR, ...entry("z", "directory", ...a), ")"));
});

Deno.test("NarParser rejects invalid entry names", () => {
  const where = at(...DIR, "entry", "(", "name");
  for (
    const [name, detail] of [
      ["", /empty entry name/],
      [".", /invalid entry name "\."/],
      ["..", /invalid entry name "\.\."/],
      ["a/b", /entry name "a\/b" contains '\/'/],
      ["/", /contains '\/'/],
      ["a\0b", /contains a NUL byte/],
    ] as const
  ) {
    assertRejects(nar(...DIR, ...entry(name, ...file("")), ")"), where, "", detail);
  }
  parse(nar(...DIR, ...entry("...", ...file("")), ...entry(".a", ...file("")), ")"));
  assertRejects(
    nar(...DIR, ...entry("x".repeat(256), ...file("")), ")"),
    where,
    "",
    /entry name of 256 bytes exceeds the limit of 255 bytes/,
  );
  parse(nar(...DIR, ...entry("x".repeat(255), ...file("")), ")"));
});

Deno.test("NarParser rejects oversize and absurd fields", () => {
  assertRejects(
    nar(...HEAD, "symlink", "target", "t".repeat(4096), ")"),
    at(...HEAD, "symlink", "target"),
    "",
    /symlink target of 4096 bytes exceeds the limit of 4095 bytes/,
  );
  parse(nar(...HEAD, "symlink", "target", "t".repeat(4095), ")"));
  assertRejects(
    nar(...HEAD, "symlink", "target", "a\0b", ")"),
    at(...HEAD, "symlink", "target"),
    "",
    /symlink target contains a NUL byte/,
  );
  assertRejects(nar(...HEAD, "x".repeat(17)), at(...HEAD), "", /got a string of 17 bytes/);
  // Length fields of 2^53 and 2^64-1: absurd, rejected before any data.
  const prefix = nar(...HEAD, "regular", "contents");
  for (
    const field of [
      [0, 0, 0, 0, 0, 0, 0x20, 0],
      [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    ]
  ) {
    const bytes = new Uint8Array([...prefix, ...field]);
    assertRejects(bytes, prefix.length, "", /length field \d+ is absurd/);
  }
  // 2^53 - 1: a valid field, but the contents would end beyond 2^53.
  const big = new Uint8Array([...prefix, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0]);
  assertRejects(big, prefix.length, "", /file contents of 9007199254740991 bytes are too large/);
  // A huge name length is refused at its length field, not after reading it.
  const nameField = nar(...DIR, "entry", "(", "name");
  assertRejects(
    new Uint8Array([...nameField, 0, 0, 0, 0x40, 0, 0, 0, 0]),
    nameField.length,
    "",
    /entry name of 1073741824 bytes exceeds/,
  );
});

Deno.test("NarParser rejects non-zero padding", () => {
  for (const parts of [[...HEAD, "symlink", "target", "abc"], [...HEAD, ...file("hello")]]) {
    const bytes = nar(...parts, ")");
    const end = at(...parts);
    for (let i = end - 1; bytes[i] === 0 && i >= end - 5; i--) {
      const bad = bytes.slice();
      bad[i] = 0x80;
      assertRejects(bad, i, "", /non-zero padding byte 128/);
    }
  }
  const bad = nar(NAR_MAGIC, "(");
  bad[at(NAR_MAGIC) - 1] = 1; // the magic's own padding
  assertRejects(bad, at(NAR_MAGIC) - 1, "", /non-zero padding/);
});

Deno.test("NarParser rejects nesting deeper than the limit", () => {
  function nested(depth: number): Uint8Array {
    const parts: string[] = [NAR_MAGIC];
    for (let i = 0; i < depth; i++) {
      parts.push("(", "type", "directory");
      if (i < depth - 1) parts.push("entry", "(", "name", "d", "node");
    }
    for (let i = 0; i < depth; i++) parts.push(")", ...(i < depth - 1 ? [")"] : []));
    return nar(...parts);
  }
  // The directory token of level limit + 1 is refused.
  const failAt = (limit: number) =>
    at(NAR_MAGIC) + limit * at("(", "type", "directory", "entry", "(", "name", "d", "node") +
    at("(", "type");
  assert.equal(parse(nested(256)).length, 256);
  assertRejects(nested(257), failAt(256), "/d".repeat(256), /deeper than the limit of 256/);
  assert.equal(parse(nested(10), { maxDepth: 10 }).length, 10);
  assertRejects(nested(11), failAt(10), "/d".repeat(10), /limit of 10/, { maxDepth: 10 });
});

Deno.test("NarParser rejects every truncation of a valid NAR, at end()", () => {
  const bytes = encodeNar({
    type: "directory",
    entries: {
      a: { type: "regular", contents: te.encode("hello"), executable: true },
      b: { type: "symlink", target: "a" },
      c: { type: "directory", entries: { d: { type: "regular", contents: new Uint8Array(0) } } },
    },
  });
  for (let n = 0; n < bytes.length; n++) {
    const parser = new NarParser();
    parser.push(bytes.subarray(0, n));
    assert.equal(parser.done, false);
    assert.throws(() => parser.end(), (error: Error) => {
      assert.ok(error instanceof NarFormatError, String(error));
      assert.equal(error.offset, n);
      assert.match(error.message, new RegExp(`^Cannot parse NAR at byte ${n} in .*: truncated`));
      return true;
    });
    // The error sticks.
    assert.throws(() => parser.push(new Uint8Array(1)), NarFormatError);
  }
  const parser = new NarParser();
  parser.push(bytes);
  assert.equal(parser.done, true);
  parser.end();
  assert.equal(parser.offset, bytes.length);
  // Truncation reports the entry being read.
  const contents = at(...DIR, ...["entry", "(", "name", "a", "node", "(", "type", "regular"]) +
    at("executable", "", "contents");
  assertRejects(bytes.subarray(0, contents + 9), contents + 9, "/a", /truncated: inside file/);
});

Deno.test("NarParser rejects trailing data after the root", () => {
  const bytes = encodeNar({ type: "regular", contents: te.encode("x") });
  assertRejects(new Uint8Array([...bytes, 0]), bytes.length, "", /trailing data after the root/);
  assertRejects(
    new Uint8Array([...bytes, ...bytes]),
    bytes.length,
    "",
    /trailing data after the root/,
  );
  const parser = new NarParser();
  parser.push(bytes);
  parser.push(new Uint8Array(0));
  assert.throws(
    () => parser.push(new Uint8Array(8)),
    new RegExp(`at byte ${bytes.length} in the root: trailing data`),
  );
});

Deno.test("NarParser streams contents without buffering them", () => {
  const size = 8 * 1024 * 1024 + 1;
  const header = nar(...HEAD, "regular", "contents");
  const length = new Uint8Array(8);
  new DataView(length.buffer).setUint32(0, size, true);
  let counted = 0;
  let entry: NarEntry | undefined;
  const parser = new NarParser({
    onEntry: (e) => entry = e,
    onContents: (piece) => counted += piece.length,
  });
  parser.push(header);
  parser.push(length);
  const piece = new Uint8Array(64 * 1024);
  for (let left = size; left > 0; left -= piece.length) {
    parser.push(piece.subarray(0, Math.min(piece.length, left)));
  }
  parser.push(new Uint8Array(7));
  parser.push(nar(")"));
  parser.end();
  assert.equal(counted, size);
  assert.deepEqual(entry, {
    type: "regular",
    path: "",
    executable: false,
    size,
    offset: header.length + 8,
  });
});
