/**
 * The shared case suite of {@link MetadataStore}: every backend runs the same cases
 * (tests/cache/kv_metadata_test.ts, tests/cache/fs_metadata_test.ts), in the spirit of
 * hono's `common.case.test.ts`. Also exports the record builders the backend and
 * concurrency tests use.
 * @module
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { FormatError } from "../../src/errors.ts";
import type { MetadataStore, PathRecord } from "../../src/cache/metadata.ts";
import { formatNarInfo, type NarInfo, parseNarInfo } from "../../src/cache/narinfo.ts";
import { encodeNixBase32 } from "../../src/cache/nixbase32.ts";

/** A store under test, how to open another store object on its data, and how to remove it. */
export interface MetadataFixture {
  /** A fresh, empty store. */
  store: MetadataStore;
  /** Opens another store object on the same data (the first may be open or closed). */
  reopen: () => Promise<MetadataStore>;
  /** Removes the data (after every store object is closed). */
  cleanup: () => Promise<void>;
}

function digest(text: string): Uint8Array {
  return new Uint8Array(createHash("sha256").update(text).digest());
}

/** A deterministic store path hash part (32 nix32 characters) for `seed`. */
export function testHashPart(seed: string): string {
  return encodeNixBase32(digest(`path:${seed}`).subarray(0, 20));
}

/** A deterministic `sha256:<nix32>` hash for `seed`. */
export function testHash(seed: string): string {
  return `sha256:${encodeNixBase32(digest(seed))}`;
}

/** The SRI form (`sha256-<base64>`) of {@link testHash}. */
export function testSriHash(seed: string): string {
  return `sha256-${btoa(String.fromCharCode(...digest(seed)))}`;
}

/** A valid narinfo for the path of `seed`, with every optional field set unless overridden. */
export function testNarInfo(seed: string, overrides: Partial<NarInfo> = {}): NarInfo {
  const fileHash = testHash(`file:${seed}`);
  return {
    storePath: `/nix/store/${testHashPart(seed)}-${seed.replace(/[^A-Za-z0-9+\-._?=]/g, "_")}`,
    url: `nar/${fileHash.slice("sha256:".length)}.nar.zst`,
    compression: "zstd",
    fileHash,
    fileSize: 1234,
    narHash: testHash(`nar:${seed}`),
    narSize: 5678,
    references: [],
    sigs: [`test-1:${btoa("s".repeat(64))}`],
    ...overrides,
  };
}

/** What a store gives back for `info`: the narinfo normalized as text round-trips it. */
export function normalized(info: NarInfo): NarInfo {
  return parseNarInfo(formatNarInfo(info));
}

function hashOf(info: NarInfo): string {
  return info.storePath.slice("/nix/store/".length, "/nix/store/".length + 32);
}

async function collect(store: MetadataStore): Promise<PathRecord[]> {
  const out: PathRecord[] = [];
  for await (const record of store.listPaths()) out.push(record);
  return out;
}

/**
 * Registers the contract's Deno.test cases for one backend. `open` gives a fresh store in
 * its own temporary place each time.
 */
export function metadataContract(name: string, open: () => Promise<MetadataFixture>): void {
  function test(caseName: string, fn: (fixture: MetadataFixture) => Promise<void>): void {
    Deno.test(`${name} metadata: ${caseName}`, async () => {
      const fixture = await open();
      try {
        await fn(fixture);
      } finally {
        fixture.store.close();
        await fixture.cleanup();
      }
    });
  }

  test("put and get round-trip every field", async ({ store }) => {
    const full = testNarInfo("full", {
      references: [
        `${testHashPart("zlib")}-zlib-1.3`,
        `${testHashPart("glibc")}-glibc-2.40`,
        `${testHashPart("full")}-full`, // a self-reference
        `${testHashPart("zlib")}-zlib-1.3`, // a duplicate: references are a set
      ],
      deriver: `${testHashPart("full.drv")}-full.drv`,
      sigs: [`zz-key-2:${btoa("b".repeat(64))}`, `aa-key-1:${btoa("a".repeat(64))}`],
      ca: `fixed:r:${testHash("ca")}`,
      narHash: testSriHash("nar:full"), // stored and served as sha256:<nix32>
    });
    const minimal: NarInfo = {
      storePath: `/nix/store/${testHashPart("minimal")}-minimal`,
      url: "nar/minimal.nar",
      compression: "none",
      narHash: testHash("nar:minimal"),
      narSize: 1,
      references: [],
      sigs: [],
    };
    await store.putPath({ narInfo: full, registeredAt: 1_732_547_123_457 });
    await store.putPath({ narInfo: minimal, registeredAt: 0 });

    const gotFull = await store.getPath(hashOf(full));
    assert.deepEqual(gotFull, { narInfo: normalized(full), registeredAt: 1_732_547_123_457 });
    assert.deepEqual(
      gotFull!.narInfo.references,
      [
        `${testHashPart("full")}-full`,
        `${testHashPart("glibc")}-glibc-2.40`,
        `${testHashPart("zlib")}-zlib-1.3`,
      ].sort(),
    );
    assert.deepEqual(gotFull!.narInfo.sigs, [
      `aa-key-1:${btoa("a".repeat(64))}`,
      `zz-key-2:${btoa("b".repeat(64))}`,
    ]);
    assert.equal(gotFull!.narInfo.narHash, testHash("nar:full"));
    assert.equal(gotFull!.narInfo.ca, `fixed:r:${testHash("ca")}`);
    assert.equal(gotFull!.narInfo.deriver, `${testHashPart("full.drv")}-full.drv`);
    assert.equal(gotFull!.narInfo.fileHash, testHash("file:full"));
    assert.equal(gotFull!.narInfo.fileSize, 1234);

    const gotMinimal = await store.getPath(hashOf(minimal));
    assert.deepEqual(gotMinimal, { narInfo: normalized(minimal), registeredAt: 0 });
    for (const key of ["deriver", "ca", "fileHash", "fileSize"]) {
      assert.equal(key in gotMinimal!.narInfo, false, `${key} should be absent`);
    }
  });

  test("the segment round-trips, changes with a replace and goes with a delete", async ({ store, reopen }) => {
    const info = testNarInfo("segmented");
    const hashPart = hashOf(info);
    await store.putPath({ narInfo: info, registeredAt: 5, segment: "team-a" });
    assert.equal((await store.getPath(hashPart))?.segment, "team-a");
    const other = await reopen();
    try {
      assert.equal((await other.getPath(hashPart))?.segment, "team-a");
    } finally {
      other.close();
    }
    await store.putPath({ narInfo: info, registeredAt: 5, segment: "universal" });
    assert.equal((await store.getPath(hashPart))?.segment, "universal");
    assert.deepEqual((await collect(store)).map((r) => r.segment), ["universal"]);
    await store.putPath({ narInfo: info, registeredAt: 5 });
    assert.equal((await store.getPath(hashPart))?.segment, undefined);
    await store.putPath({ narInfo: info, registeredAt: 5, segment: "team-a" });
    assert.equal(await store.deletePath(hashPart), true);
    await store.putPath({ narInfo: info, registeredAt: 5 });
    assert.equal((await store.getPath(hashPart))?.segment, undefined);
    await assert.rejects(
      store.putPath({ narInfo: info, registeredAt: 5, segment: "../etc" }),
      FormatError,
    );
  });

  test("a missing path is null, deleting it is false", async ({ store }) => {
    assert.equal(await store.getPath(testHashPart("nothing")), null);
    assert.equal(await store.findByFileHash(testHash("nothing")), null);
    assert.equal(await store.deletePath(testHashPart("nothing")), false);
    assert.deepEqual(await collect(store), []);
  });

  test("findByFileHash finds the path, in any SHA-256 form", async ({ store }) => {
    const a = testNarInfo("a");
    await store.putPath({ narInfo: testNarInfo("b"), registeredAt: 1 });
    await store.putPath({ narInfo: a, registeredAt: 2 });
    assert.equal(await store.findByFileHash(testHash("file:a")), hashOf(a));
    assert.equal(await store.findByFileHash(testSriHash("file:a")), hashOf(a));
    assert.equal(await store.findByFileHash(testHash("file:b")), testHashPart("b"));
    assert.equal(await store.findByFileHash(testHash("file:c")), null);
    // A NarHash is not a FileHash.
    assert.equal(await store.findByFileHash(testHash("nar:a")), null);
  });

  test("putPath replaces a record and its index entry", async ({ store }) => {
    const first = testNarInfo("r", { fileHash: testHash("f1"), url: "nar/one.nar.zst" });
    const second = testNarInfo("r", {
      fileHash: testHash("f2"),
      url: "nar/two.nar.xz",
      compression: "xz",
      fileSize: 99,
      references: [`${testHashPart("dep")}-dep`],
      sigs: [`k1:${btoa("x".repeat(64))}`, `k2:${btoa("y".repeat(64))}`],
    });
    await store.putPath({ narInfo: first, registeredAt: 10 });
    await store.putPath({ narInfo: second, registeredAt: 20 });
    assert.deepEqual(await store.getPath(hashOf(first)), {
      narInfo: normalized(second),
      registeredAt: 20,
    });
    assert.equal(await store.findByFileHash(testHash("f1")), null);
    assert.equal(await store.findByFileHash(testHash("f2")), hashOf(first));
    assert.equal((await collect(store)).length, 1);

    // The same FileHash again (e.g. a new signature): still indexed.
    await store.putPath({ narInfo: { ...second, sigs: [] }, registeredAt: 30 });
    assert.equal(await store.findByFileHash(testHash("f2")), hashOf(first));
    assert.deepEqual((await store.getPath(hashOf(first)))?.narInfo.sigs, []);

    // A record without FileHash drops the index entry.
    const noFileHash = { ...second };
    delete noFileHash.fileHash;
    await store.putPath({ narInfo: noFileHash, registeredAt: 40 });
    assert.equal(await store.findByFileHash(testHash("f2")), null);
    assert.equal((await store.getPath(hashOf(first)))?.registeredAt, 40);
  });

  test("paths sharing a FileHash stay findable until the last is deleted", async ({ store }) => {
    const shared = testHash("shared file");
    const a = testNarInfo("twin-a", { fileHash: shared });
    const b = testNarInfo("twin-b", { fileHash: shared });
    await store.putPath({ narInfo: a, registeredAt: 1 });
    await store.putPath({ narInfo: b, registeredAt: 2 });
    assert.ok([hashOf(a), hashOf(b)].includes((await store.findByFileHash(shared))!));
    assert.equal(await store.deletePath(hashOf(a)), true);
    assert.equal(await store.findByFileHash(shared), hashOf(b));
    assert.equal(await store.deletePath(hashOf(b)), true);
    assert.equal(await store.findByFileHash(shared), null);
  });

  test("deletePath removes the record and its index entry", async ({ store }) => {
    const d = testNarInfo("d");
    const keep = testNarInfo("keep");
    await store.putPath({ narInfo: d, registeredAt: 5 });
    await store.putPath({ narInfo: keep, registeredAt: 6 });
    assert.equal(await store.deletePath(hashOf(d)), true);
    assert.equal(await store.getPath(hashOf(d)), null);
    assert.equal(await store.findByFileHash(testHash("file:d")), null);
    assert.equal(await store.deletePath(hashOf(d)), false);
    assert.deepEqual((await collect(store)).map((r) => r.narInfo.storePath), [keep.storePath]);
    assert.equal(await store.findByFileHash(testHash("file:keep")), hashOf(keep));
    // Deleted paths can come back.
    await store.putPath({ narInfo: d, registeredAt: 7 });
    assert.equal((await store.getPath(hashOf(d)))?.registeredAt, 7);
    assert.equal(await store.findByFileHash(testHash("file:d")), hashOf(d));
  });

  test("listPaths is sorted and complete over 1500 records", async ({ store }) => {
    const infos = Array.from({ length: 1500 }, (_, i) => testNarInfo(`many-${i}`));
    for (let i = 0; i < infos.length; i += 100) {
      await Promise.all(
        infos.slice(i, i + 100).map((narInfo, j) =>
          store.putPath({ narInfo, registeredAt: i + j })
        ),
      );
    }
    const expected = new Map(infos.map((info, i) => [hashOf(info), { info, registeredAt: i }]));
    const listed = await collect(store);
    const hashes = listed.map((r) => hashOf(r.narInfo));
    assert.equal(listed.length, 1500);
    assert.deepEqual(hashes, [...expected.keys()].sort());
    for (const record of listed) {
      const want = expected.get(hashOf(record.narInfo))!;
      assert.deepEqual(record, { narInfo: normalized(want.info), registeredAt: want.registeredAt });
    }
  });

  test("invalid hash parts and records are FormatError", async ({ store }) => {
    const badHashParts = [
      "",
      "short",
      "0".repeat(33),
      "e".repeat(32), // 'e' is not in the nix32 alphabet
      "A".repeat(32),
      "../".repeat(10) + "ab", // 32 characters of path traversal
      "../../../../../../../../etc/passwd",
      "0".repeat(31) + "\0",
      "0".repeat(31) + "/",
    ];
    for (const bad of badHashParts) {
      await assert.rejects(store.getPath(bad), FormatError, `getPath(${JSON.stringify(bad)})`);
      await assert.rejects(
        store.deletePath(bad),
        FormatError,
        `deletePath(${JSON.stringify(bad)})`,
      );
    }
    for (const bad of ["", "sha256:", "sha256:../../etc", "md5:" + "0".repeat(32), "x"]) {
      await assert.rejects(store.findByFileHash(bad), FormatError, `findByFileHash(${bad})`);
    }
    const good = testNarInfo("good");
    const badRecords: PathRecord[] = [
      { narInfo: { ...good, storePath: "/nix/store/../../etc/passwd" }, registeredAt: 1 },
      { narInfo: { ...good, storePath: `/tmp/${testHashPart("x")}-x` }, registeredAt: 1 },
      { narInfo: { ...good, fileHash: "sha256:nonsense" }, registeredAt: 1 },
      { narInfo: { ...good, narSize: 0 }, registeredAt: 1 },
      { narInfo: { ...good, references: ["not a base name"] }, registeredAt: 1 },
      { narInfo: { ...good, url: "nar/x\nStorePath: /nix/store/evil" }, registeredAt: 1 },
      { narInfo: good, registeredAt: -1 },
      { narInfo: good, registeredAt: 1.5 },
      { narInfo: good, registeredAt: NaN },
    ];
    for (const record of badRecords) {
      await assert.rejects(store.putPath(record), FormatError, JSON.stringify(record));
    }
    assert.deepEqual(await collect(store), []);
    // The store still works.
    await store.putPath({ narInfo: good, registeredAt: 3 });
    assert.equal((await store.getPath(hashOf(good)))?.registeredAt, 3);
  });

  test("records persist when the store is reopened", async ({ store, reopen }) => {
    const a = testNarInfo("persist-a", { deriver: `${testHashPart("pa.drv")}-pa.drv` });
    const b = testNarInfo("persist-b");
    await store.putPath({ narInfo: a, registeredAt: 100 });
    await store.putPath({ narInfo: b, registeredAt: 200 });
    await store.deletePath(hashOf(b));
    store.close();
    const again = await reopen();
    try {
      assert.deepEqual(await again.getPath(hashOf(a)), {
        narInfo: normalized(a),
        registeredAt: 100,
      });
      assert.equal(await again.getPath(hashOf(b)), null);
      assert.equal(await again.findByFileHash(testHash("file:persist-a")), hashOf(a));
      assert.equal((await collect(again)).length, 1);
    } finally {
      again.close();
    }
  });

  test("a second store object on the same data sees every change", async ({ store, reopen }) => {
    const other = await reopen();
    try {
      const a = testNarInfo("seen-a");
      await store.putPath({ narInfo: a, registeredAt: 1 });
      assert.deepEqual(await other.getPath(hashOf(a)), { narInfo: normalized(a), registeredAt: 1 });
      assert.equal(await other.findByFileHash(testHash("file:seen-a")), hashOf(a));

      await other.putPath({ narInfo: testNarInfo("seen-a", { sigs: [] }), registeredAt: 2 });
      assert.deepEqual((await store.getPath(hashOf(a)))?.narInfo.sigs, []);

      assert.equal(await other.deletePath(hashOf(a)), true);
      assert.equal(await store.getPath(hashOf(a)), null);
      assert.equal(await store.findByFileHash(testHash("file:seen-a")), null);
    } finally {
      other.close();
    }
  });

  test("a narinfo with thousands of references round-trips", async ({ store }) => {
    const references = Array.from(
      { length: 3000 },
      (_, i) => `${testHashPart(`ref-${i}`)}-some-library-with-a-long-name-${i}`,
    );
    const big = testNarInfo("big", { references });
    assert.ok(formatNarInfo(big).length > 150_000);
    const small = testNarInfo("big", { fileHash: testHash("small") });
    await store.putPath({ narInfo: big, registeredAt: 1 });
    assert.deepEqual(await store.getPath(hashOf(big)), {
      narInfo: normalized(big),
      registeredAt: 1,
    });
    await store.putPath({ narInfo: small, registeredAt: 2 });
    assert.deepEqual(await store.getPath(hashOf(big)), {
      narInfo: normalized(small),
      registeredAt: 2,
    });
    await store.putPath({ narInfo: big, registeredAt: 3 });
    assert.deepEqual(await collect(store), [{ narInfo: normalized(big), registeredAt: 3 }]);
    assert.equal(await store.findByFileHash(testHash("file:big")), hashOf(big));
    assert.equal(await store.findByFileHash(testHash("small")), null);
    assert.equal(await store.deletePath(hashOf(big)), true);
    assert.deepEqual(await collect(store), []);
  });

  test("a closed store rejects calls", async ({ store }) => {
    store.close();
    await assert.rejects(store.getPath(testHashPart("x")));
    await assert.rejects(store.putPath({ narInfo: testNarInfo("x"), registeredAt: 1 }));
    store.close(); // closing twice is harmless
  });
}
