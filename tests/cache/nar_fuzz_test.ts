/**
 * Deterministic fuzzing of the NAR parser (src/cache/nar.ts): seeded random mutations of
 * valid NARs (bit flips, byte sets, truncations, insertions, deletions, duplicated and
 * oversized fields). The parser must accept or throw a NarFormatError (never another
 * exception), give the same result whatever the push() split points, and accept only
 * canonical NARs (an accepted NAR re-encodes to the same bytes).
 * @module
 */

import assert from "node:assert/strict";
import {
  encodeNar,
  type NarEntry,
  NarFormatError,
  NarParser,
  type NarTree,
} from "../../src/cache/nar.ts";

/** mulberry32: a small seeded PRNG, so failures reproduce. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const te = new TextEncoder();

function corpus(): Uint8Array[] {
  const bytes = (n: number, k: number) => new Uint8Array(n).map((_, i) => (i * k + 3) & 0xff);
  const trees: NarTree[] = [
    { type: "regular", contents: te.encode("hello") },
    { type: "symlink", target: "../lib/libfoo.so.1" },
    { type: "directory", entries: {} },
    {
      type: "directory",
      entries: {
        "bin": {
          type: "directory",
          entries: {
            "hello": { type: "regular", contents: bytes(37, 5), executable: true },
            "hi": { type: "symlink", target: "hello" },
          },
        },
        "empty": { type: "regular", contents: new Uint8Array(0) },
        "share": {
          type: "directory",
          entries: {
            "a": { type: "regular", contents: bytes(8, 3) },
            "a-b": { type: "regular", contents: bytes(9, 7) },
            "a.b": { type: "directory", entries: {} },
            "é": { type: "regular", contents: bytes(300, 11) },
          },
        },
      },
    },
  ];
  return trees.map(encodeNar);
}

interface Outcome {
  entries: NarEntry[];
  contents: number[][];
  error: string | null;
  offset: number | null;
}

/** Parses `bytes` pushed in the pieces given by `cuts`; any other exception propagates. */
function run(bytes: Uint8Array, cuts: number[]): Outcome {
  const entries: NarEntry[] = [];
  const contents: number[][] = [];
  const parser = new NarParser({
    onEntry: (e) => {
      entries.push(e);
      if (e.type === "regular") contents.push([]);
    },
    onContents: (piece) => contents[contents.length - 1].push(...piece),
  });
  try {
    let from = 0;
    for (const cut of [...cuts, bytes.length]) {
      parser.push(bytes.subarray(from, cut));
      from = cut;
    }
    parser.end();
    assert.equal(parser.offset, bytes.length);
    return { entries, contents, error: null, offset: null };
  } catch (error) {
    if (!(error instanceof NarFormatError)) throw error;
    return { entries, contents, error: error.message, offset: error.offset };
  }
}

/** Rebuilds the tree an accepted NAR describes. */
function rebuild(outcome: Outcome): NarTree {
  const nodes = new Map<string, NarTree>();
  let file = 0;
  for (const e of outcome.entries) {
    const node: NarTree = e.type === "directory"
      ? { type: "directory", entries: Object.create(null) }
      : e.type === "symlink"
      ? { type: "symlink", target: e.target }
      : {
        type: "regular",
        contents: new Uint8Array(outcome.contents[file++]),
        executable: e.executable,
      };
    nodes.set(e.path, node);
    if (e.path !== "") {
      const slash = e.path.lastIndexOf("/");
      const parent = nodes.get(e.path.slice(0, slash));
      assert.ok(parent?.type === "directory");
      parent.entries[e.path.slice(slash + 1)] = node;
    }
  }
  return nodes.get("")!;
}

function mutate(base: Uint8Array, random: () => number): Uint8Array {
  let bytes = base.slice();
  const pick = (n: number) => Math.floor(random() * n);
  const rounds = 1 + pick(3);
  for (let r = 0; r < rounds; r++) {
    const at = pick(bytes.length + 1);
    switch (pick(8)) {
      case 0: // flip a bit
        if (at < bytes.length) bytes[at] ^= 1 << pick(8);
        break;
      case 1: // set a byte
        if (at < bytes.length) bytes[at] = [0, 1, 0x2f, 0x2e, 0x7f, 0x80, 0xff, pick(256)][pick(8)];
        break;
      case 2: // truncate
        bytes = bytes.slice(0, at);
        break;
      case 3: { // insert random bytes
        const extra = new Uint8Array(1 + pick(16)).map(() => pick(256));
        bytes = new Uint8Array([...bytes.subarray(0, at), ...extra, ...bytes.subarray(at)]);
        break;
      }
      case 4: { // delete a range
        const end = Math.min(bytes.length, at + 1 + pick(24));
        bytes = new Uint8Array([...bytes.subarray(0, at), ...bytes.subarray(end)]);
        break;
      }
      case 5: { // duplicate an aligned block of strings (repeated entries, fields)
        const start = at & ~7;
        const block = bytes.slice(start, Math.min(bytes.length, start + 8 * (1 + pick(12))));
        bytes = new Uint8Array([...bytes.subarray(0, start), ...block, ...bytes.subarray(start)]);
        break;
      }
      case 6: { // overwrite an aligned word with a small or huge length
        const start = Math.min(at & ~7, Math.max(0, bytes.length - 8));
        const words = [0, 1, 7, 8, 255, 256, 4096, 2 ** 31, 2 ** 32, 2 ** 53 - 1];
        const value = pick(2) === 0 ? words[pick(words.length)] : pick(2 ** 32);
        const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
        if (start + 8 <= bytes.length) {
          view.setUint32(start, value % 2 ** 32, true);
          view.setUint32(start + 4, Math.floor(value / 2 ** 32), true);
        }
        break;
      }
      default: // swap two aligned blocks (reorders entries)
      {
        const a = at & ~7;
        const b = pick(bytes.length + 1) & ~7;
        const len = 8 * (1 + pick(6));
        if (a + len <= bytes.length && b + len <= bytes.length && Math.abs(a - b) >= len) {
          const tmp = bytes.slice(a, a + len);
          bytes.copyWithin(a, b, b + len);
          bytes.set(tmp, b);
        }
      }
    }
  }
  return bytes;
}

function randomCuts(length: number, random: () => number): number[] {
  const cuts: number[] = [];
  const count = Math.floor(random() * 12);
  for (let i = 0; i < count; i++) cuts.push(Math.floor(random() * (length + 1)));
  return cuts.sort((a, b) => a - b);
}

Deno.test("fuzz: mutated NARs are accepted or rejected with a NarFormatError, split-invariant", () => {
  const random = prng(0x5eed_1a5);
  const bases = corpus();
  let accepted = 0;
  let rejected = 0;
  for (let iteration = 0; iteration < 4000; iteration++) {
    const base = bases[iteration % bases.length];
    const bytes = mutate(base, random);
    const context = `iteration ${iteration}`;
    const whole = run(bytes, []);
    const split = run(bytes, randomCuts(bytes.length, random));
    assert.deepEqual(split, whole, context);
    const bytewise = iteration % 50 === 0
      ? run(bytes, Array.from({ length: bytes.length }, (_, i) => i))
      : whole;
    assert.deepEqual(bytewise, whole, context);
    if (whole.error === null) {
      accepted++;
      // Only canonical NARs pass: the tree re-encodes to the same bytes (unless a name
      // became invalid UTF-8, which the string paths cannot carry).
      const lossy = whole.entries.some((e) =>
        e.path.includes("\uFFFD") || (e.type === "symlink" && e.target.includes("\uFFFD"))
      );
      if (!lossy) assert.deepEqual(encodeNar(rebuild(whole)), bytes, context);
    } else {
      rejected++;
      assert.ok(whole.offset! >= 0 && whole.offset! <= bytes.length, context);
    }
  }
  // The mutations reach both outcomes.
  assert.ok(accepted > 50, `accepted ${accepted}`);
  assert.ok(rejected > 2000, `rejected ${rejected}`);
});

Deno.test("fuzz: random split points of valid NARs give the same entries as one push", () => {
  const random = prng(42);
  for (const bytes of corpus()) {
    const whole = run(bytes, []);
    assert.equal(whole.error, null);
    assert.deepEqual(encodeNar(rebuild(whole)), bytes);
    for (let i = 0; i < 200; i++) {
      assert.deepEqual(run(bytes, randomCuts(bytes.length, random)), whole);
    }
  }
});

Deno.test("fuzz: random bytes after a valid magic never throw anything but NarFormatError", () => {
  const random = prng(7);
  const magic = encodeNar({ type: "directory", entries: {} }).subarray(0, 24);
  for (let i = 0; i < 2000; i++) {
    const tail = new Uint8Array(Math.floor(random() * 200)).map(() =>
      random() < 0.6 ? 0 : Math.floor(random() * 256)
    );
    const outcome = run(new Uint8Array([...magic, ...tail]), []);
    assert.notEqual(outcome.error, null);
  }
});
