/**
 * What swarm peers exchange (src/net/sync_records.ts): parseSyncRecord refuses every field
 * that is missing, mistyped, invalid or too long a list; recordId is stable under order and
 * duplicates and changes with the signed fields and the signatures; judgeRecord refuses
 * unsigned, untrusted, forged and tampered records and filter mismatches (telling hostile
 * from merely not ours); mergeSignatures keeps only valid trusted signatures. Signatures
 * are made with generated keys (src/cache/signing.ts) and, for the nixpkgs filter, a real
 * cache.nixos.org narinfo.
 * @module
 */

import assert from "node:assert/strict";
import { formatBase16, formatNixHash, formatSriHash, sha256 } from "../../src/cache/hash.ts";
import {
  MAX_NARINFO_REFERENCES,
  MAX_NARINFO_SIGNATURES,
  parseNarInfo,
} from "../../src/cache/narinfo.ts";
import type { SyncRecord } from "../../src/cache/remote_records.ts";
import { NIXPKGS_PUBLIC_KEY } from "../../src/cache/segments.ts";
import {
  generateSecretKey,
  publicKeyOf,
  type SecretKey,
  signNarInfo,
} from "../../src/cache/signing.ts";
import { FormatError } from "../../src/errors.ts";
import {
  judgeRecord,
  mergeSignatures,
  narInfoOfRecord,
  parseSyncRecord,
  recordId,
  recordOfNarInfo,
} from "../../src/net/sync_records.ts";

const TEAM = generateSecretKey("team-1");
const OTHER = generateSecretKey("other-1");
/** Another key under the team key's name: its signatures are forgeries to us. */
const IMPOSTOR = generateSecretKey("team-1");
const TRUSTED = [publicKeyOf(TEAM)];

const NIX32 = "0123456789abcdfghijklmnpqrsvwxyz";

/** A valid store path hash part derived from `seed`. */
function hashPart(seed: string): string {
  const digest = sha256(new TextEncoder().encode(seed));
  return Array.from(digest.subarray(0, 32), (b) => NIX32[b % 32]).join("");
}

function unsigned(name: string, extra: Partial<SyncRecord> = {}): SyncRecord {
  return {
    storePath: `/nix/store/${hashPart(name)}-${name}`,
    narHash: formatNixHash(sha256(new TextEncoder().encode(`nar of ${name}`))),
    narSize: 1234,
    references: [`${hashPart("glibc")}-glibc-2.37`, `${hashPart(name)}-${name}`].sort(),
    deriver: `${hashPart(name + ".drv")}-${name}.drv`,
    sigs: [],
    ...extra,
  };
}

function signed(record: SyncRecord, ...keys: SecretKey[]): SyncRecord {
  const sigs = keys.map((key) => signNarInfo(narInfoOfRecord(record), key));
  return { ...record, sigs: [...new Set([...record.sigs, ...sigs])].sort() };
}

/** The record as JSON text, parsed back: what arrives from a peer. */
function overTheWire(record: unknown): unknown {
  return JSON.parse(JSON.stringify(record));
}

const VALID = signed(unsigned("hello-2.12"), TEAM);

Deno.test("sync records: a valid record survives the wire unchanged", () => {
  assert.deepEqual(parseSyncRecord(overTheWire(VALID)), VALID);
  const withCa = signed(
    unsigned("ca-path", { ca: `fixed:r:${VALID.narHash}`, deriver: undefined }),
    TEAM,
  );
  delete withCa.deriver;
  assert.deepEqual(parseSyncRecord(overTheWire(withCa)), withCa);
  const noRefs = signed(unsigned("leaf", { references: [] }), TEAM);
  assert.deepEqual(parseSyncRecord(overTheWire(noRefs)), noRefs);
});

Deno.test("sync records: parsing normalizes hashes and lists, drops unknown fields", () => {
  const digest = sha256(new TextEncoder().encode("nar of hello-2.12"));
  const raw = {
    ...VALID,
    narHash: formatSriHash(digest),
    references: [...VALID.references].reverse().concat(VALID.references[0]),
    sigs: [VALID.sigs[0], VALID.sigs[0]],
    url: "nar/evil.nar",
    peers: ["x"],
  };
  const text = JSON.stringify(raw).replace(/^\{/, '{"__proto__":{"injected":true},');
  const parsed = parseSyncRecord(JSON.parse(text));
  assert.deepEqual(parsed, VALID);
  assert.equal(parsed.narHash, formatNixHash(digest));
  assert.deepEqual(Object.keys(parsed).sort(), [
    "deriver",
    "narHash",
    "narSize",
    "references",
    "sigs",
    "storePath",
  ]);
  assert.equal((parsed as unknown as Record<string, unknown>).injected, undefined);
});

Deno.test("sync records: parseSyncRecord refuses malformed records field by field", () => {
  const good = overTheWire(VALID) as Record<string, unknown>;
  const without = (field: string) => {
    const copy = { ...good };
    delete copy[field];
    return copy;
  };
  const cases: [string, unknown][] = [
    ["null", null],
    ["a string", "StorePath: /nix/store/x"],
    ["a number", 42],
    ["an array", [good]],
    ["true", true],
    ["no storePath", without("storePath")],
    ["storePath a number", { ...good, storePath: 7 }],
    ["storePath outside the store", { ...good, storePath: "/tmp/evil" }],
    ["storePath with a bad hash", { ...good, storePath: "/nix/store/eeee-x" }],
    ["storePath with a slash in the name", { ...good, storePath: `${VALID.storePath}/../etc` }],
    ["storePath with a newline", { ...good, storePath: `${VALID.storePath}\nSig: x` }],
    ["storePath huge", { ...good, storePath: `${VALID.storePath}${"x".repeat(100_000)}` }],
    ["no narHash", without("narHash")],
    ["narHash a list", { ...good, narHash: [VALID.narHash] }],
    ["narHash md5", { ...good, narHash: "md5:00000000000000000000000000000000" }],
    ["narHash short", { ...good, narHash: "sha256:abc" }],
    ["narHash empty", { ...good, narHash: "" }],
    ["no narSize", without("narSize")],
    ["narSize a string", { ...good, narSize: "1234" }],
    ["narSize negative", { ...good, narSize: -1 }],
    ["narSize zero", { ...good, narSize: 0 }],
    ["narSize fractional", { ...good, narSize: 1.5 }],
    ["narSize NaN", { ...good, narSize: NaN }],
    ["narSize Infinity", { ...good, narSize: Infinity }],
    ["narSize beyond 2^53", { ...good, narSize: 2 ** 60 }],
    ["no references", without("references")],
    ["references a string", { ...good, references: VALID.references.join(" ") }],
    ["references an object", { ...good, references: { 0: VALID.references[0] } }],
    ["references holding a number", { ...good, references: [1] }],
    ["references holding null", { ...good, references: [null] }],
    ["a full path as reference", { ...good, references: [`/nix/store/${VALID.references[0]}`] }],
    ["a reference with a space", { ...good, references: ["aaaa bbbb"] }],
    ["no sigs", without("sigs")],
    ["sigs a string", { ...good, sigs: VALID.sigs[0] }],
    ["sigs holding an object", { ...good, sigs: [{ name: "team-1" }] }],
    ["an empty signature", { ...good, sigs: [""] }],
    ["a signature with a space", { ...good, sigs: ["team-1: abc"] }],
    ["a signature with a newline", { ...good, sigs: ["team-1:abc\nStorePath: x"] }],
    ["deriver a number", { ...good, deriver: 5 }],
    ["deriver a full path", { ...good, deriver: `/nix/store/${VALID.deriver}` }],
    ["deriver null", { ...good, deriver: null }],
    ["ca a number", { ...good, ca: 1 }],
    ["ca not a content address", { ...good, ca: "bogus" }],
    ["ca with an unknown hash type", { ...good, ca: "fixed:r:crc32:00000000" }],
    ["ca with a bad hash", { ...good, ca: "fixed:r:sha256:zz" }],
    ["ca text with sha1", { ...good, ca: `text:sha1:${"0".repeat(40)}` }],
  ];
  for (const [what, raw] of cases) {
    assert.throws(() => parseSyncRecord(raw), FormatError, what);
  }
});

Deno.test("sync records: lists longer than a narinfo may have are refused", () => {
  const good = overTheWire(VALID) as Record<string, unknown>;
  const refs = Array.from(
    { length: MAX_NARINFO_REFERENCES + 1 },
    (_, i) => `${hashPart(`r${i}`)}-r${i}`,
  );
  assert.throws(
    () => parseSyncRecord({ ...good, references: refs }),
    /more than 20000 references/,
  );
  const exactly = refs.slice(0, MAX_NARINFO_REFERENCES);
  assert.equal(
    parseSyncRecord({ ...good, references: exactly }).references.length,
    MAX_NARINFO_REFERENCES,
  );
  const sigs = Array.from(
    { length: MAX_NARINFO_SIGNATURES + 1 },
    (_, i) => `key-${i}:${"A".repeat(86)}==`,
  );
  assert.throws(() => parseSyncRecord({ ...good, sigs }), /more than 100 sigs/);
  assert.equal(
    parseSyncRecord({ ...good, sigs: sigs.slice(1) }).sigs.length,
    MAX_NARINFO_SIGNATURES,
  );
  // A million-entry list of junk fails on its length, not after checking each entry.
  assert.throws(
    () => parseSyncRecord({ ...good, sigs: new Array(1_000_000).fill("x:y") }),
    /more than 100 sigs/,
  );
});

Deno.test("sync records: recordId is stable and covers the signed fields and signatures", () => {
  const id = recordId(VALID);
  assert.equal(id.length, 32);
  assert.deepEqual(recordId(structuredClone(VALID)), id);
  assert.deepEqual(recordId(parseSyncRecord(overTheWire(VALID))), id);
  // Order and duplicates of lists do not matter.
  assert.deepEqual(
    recordId({
      ...VALID,
      references: [...VALID.references].reverse(),
      sigs: [...VALID.sigs, ...VALID.sigs],
    }),
    id,
  );
  // The same path from a narinfo gives the same id.
  const narInfo = { ...narInfoOfRecord(VALID), url: "nar/x.nar.zst", compression: "zstd" };
  assert.deepEqual(recordId(recordOfNarInfo(narInfo)), id);
  // Deriver and CA are not signed, and not part of the id.
  assert.deepEqual(recordId({ ...VALID, deriver: undefined }), id);

  const distinct = new Map<string, string>([[formatBase16(id), "original"]]);
  const variants: [string, SyncRecord][] = [
    ["another signature added", signed(VALID, OTHER)],
    ["a signature removed", { ...VALID, sigs: [] }],
    ["another signature instead", signed({ ...VALID, sigs: [] }, OTHER)],
    ["narSize", { ...VALID, narSize: VALID.narSize + 1 }],
    ["narHash", { ...VALID, narHash: formatNixHash(sha256(new Uint8Array(1))) }],
    ["references", { ...VALID, references: VALID.references.slice(1) }],
    ["storePath", { ...VALID, storePath: unsigned("hello-2.13").storePath }],
  ];
  for (const [what, variant] of variants) {
    const hex = formatBase16(recordId(variant));
    assert.ok(!distinct.has(hex), `${what} changes the id (same as ${distinct.get(hex)})`);
    distinct.set(hex, what);
  }
});

Deno.test("sync records: judgeRecord accepts only valid trusted signatures in the filter", () => {
  const segment = { filter: "all" as const, trustedKeys: TRUSTED };
  assert.equal(judgeRecord(VALID, segment), null);
  // One valid trusted signature among junk and untrusted ones is enough.
  assert.equal(
    judgeRecord({ ...signed(VALID, OTHER), sigs: [...VALID.sigs, "junk-1:AAAA"] }, segment),
    null,
  );

  const refusals: [string, SyncRecord, boolean][] = [
    ["unsigned", unsigned("hello-2.12"), false],
    ["signed by an untrusted key", signed(unsigned("hello-2.12"), OTHER), false],
    ["a malformed signature of an untrusted name", { ...VALID, sigs: ["nobody:AAAA"] }, false],
    [
      "signed by another key under the trusted name",
      signed(unsigned("hello-2.12"), IMPOSTOR),
      true,
    ],
    ["tampered after signing", { ...VALID, narSize: VALID.narSize + 1 }, true],
    ["a trusted name with garbage", { ...VALID, sigs: ["team-1:garbage"] }, true],
    [
      "a trusted name on another path's signature",
      { ...unsigned("other-path"), sigs: VALID.sigs },
      true,
    ],
  ];
  for (const [what, record, hostile] of refusals) {
    const refusal = judgeRecord(record, segment);
    assert.ok(refusal !== null, `${what} is refused`);
    assert.equal(refusal.hostile, hostile, `${what}: hostile is ${hostile}`);
    assert.match(refusal.reason, /signature|signed/, what);
  }
  assert.equal(judgeRecord(unsigned("x"), segment)?.reason, "not signed");
  assert.deepEqual(judgeRecord(VALID, { filter: "all", trustedKeys: [] }), {
    reason: "no signature from a trusted key",
    hostile: false,
  });
});

Deno.test("sync records: judgeRecord applies the segment's filter", () => {
  // A real cache.nixos.org narinfo (published in nixpkgs' and Nix's documentation).
  const hello = recordOfNarInfo(
    parseNarInfo(`StorePath: /nix/store/gdh8165b7rg4y53v64chjys7mbbw89f9-hello-2.10
URL: nar/0i6ardx43rdg24ab1nc3mq7f5ykyiamymh1v37gxdv5xh5cm0cmb.nar.xz
Compression: xz
FileHash: sha256:0i6ardx43rdg24ab1nc3mq7f5ykyiamymh1v37gxdv5xh5cm0cmb
FileSize: 40360
NarHash: sha256:1ddv0iqq47j0awyw7a8dmm8bz71c6ifrliq53kmmsfzjxf3rwvb8
NarSize: 197528
References: 7gx4kiv5m0i7d7qkixq2cwzbr10lvxwc-glibc-2.27 gdh8165b7rg4y53v64chjys7mbbw89f9-hello-2.10
Deriver: 5sj6fdfym58sdaf3r5p87v4l8sj2zlvn-hello-2.10.drv
Sig: cache.nixos.org-1:K0thQEG60rzAK8ZS9f1whb7eRlIshlMDJAm7xvX1oF284H+PTqlicv/wGW6BIj+wWWONHvUZ2MYc+KDArekjDA==
`),
  );
  const nixpkgsAndTeam = signed(hello, TEAM);
  const trustBoth = [...TRUSTED, NIXPKGS_PUBLIC_KEY];

  assert.equal(judgeRecord(nixpkgsAndTeam, { filter: "nixpkgs", trustedKeys: TRUSTED }), null);
  assert.equal(judgeRecord(hello, { filter: "nixpkgs", trustedKeys: [NIXPKGS_PUBLIC_KEY] }), null);
  assert.deepEqual(judgeRecord(VALID, { filter: "nixpkgs", trustedKeys: trustBoth }), {
    reason: "does not pass the nixpkgs filter",
    hostile: false,
  });
  assert.equal(judgeRecord(VALID, { filter: "custom", trustedKeys: TRUSTED }), null);
  assert.deepEqual(judgeRecord(nixpkgsAndTeam, { filter: "custom", trustedKeys: TRUSTED }), {
    reason: "does not pass the custom filter",
    hostile: false,
  });
  // The signature is checked before the filter: a forged cache.nixos.org signature on a
  // team-trusted record is only "custom".
  const impostor = generateSecretKey("cache.nixos.org-1");
  const fakeNixpkgs = signed(VALID, impostor);
  assert.equal(judgeRecord(fakeNixpkgs, { filter: "custom", trustedKeys: TRUSTED }), null);
  assert.equal(
    judgeRecord(fakeNixpkgs, { filter: "nixpkgs", trustedKeys: TRUSTED })?.reason,
    "does not pass the nixpkgs filter",
  );
});

Deno.test("sync records: mergeSignatures keeps only valid trusted signatures", () => {
  const second = generateSecretKey("team-2");
  const trusted = [...TRUSTED, publicKeyOf(second)];
  const teamSig = VALID.sigs[0];
  const secondSig = signNarInfo(narInfoOfRecord(VALID), second);
  const otherSig = signNarInfo(narInfoOfRecord(VALID), OTHER);
  const forgedSig = signNarInfo(narInfoOfRecord(VALID), IMPOSTOR);
  const elsewhereSig = signed(unsigned("elsewhere"), TEAM).sigs[0];
  const offered: SyncRecord = {
    ...VALID,
    sigs: [teamSig, secondSig, otherSig, forgedSig, elsewhereSig, "team-2:AAAA", "junk"].sort(),
  };

  assert.deepEqual(mergeSignatures(offered, [], trusted), [secondSig, teamSig].sort());
  assert.deepEqual(mergeSignatures(offered, [], TRUSTED), [teamSig]);
  assert.deepEqual(mergeSignatures(offered, [], []), []);
  // What we hold already is kept as it is (it was judged when it came), merged and sorted.
  assert.deepEqual(
    mergeSignatures(offered, ["local-1:xyz"], TRUSTED),
    ["local-1:xyz", teamSig].sort(),
  );
  assert.deepEqual(mergeSignatures(offered, [teamSig], trusted), [secondSig, teamSig].sort());
  assert.deepEqual(mergeSignatures({ ...offered, sigs: [] }, [teamSig], trusted), [teamSig]);
  // Signatures of a tampered record do not verify: nothing is added.
  assert.deepEqual(
    mergeSignatures({ ...offered, narSize: VALID.narSize + 1 }, [], trusted),
    [],
  );
});
