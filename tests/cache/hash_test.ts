import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { FormatError } from "../../src/errors.ts";
import {
  createSha256,
  decodeBase64,
  encodeBase64,
  formatBase16,
  formatNixHash,
  formatSriHash,
  normalizeNixHash,
  parseNixHash,
  sha256,
  Sha256Stream,
  tryParseNixHash,
} from "../../src/cache/hash.ts";
import { HAVE_NIX, runNix } from "../helpers/nix.ts";

const enc = new TextEncoder();

// sha256("abc") in every form Nix 2.8 prints. Made with:
//   nix hash to-base32 sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
//   nix hash to-sri sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s
const ABC_BASE16 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
const ABC_NIX32 = "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";
const ABC_SRI = "sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=";

function assertFormatError(fn: () => unknown, pattern: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof FormatError, `expected FormatError, got ${e}`);
    assert.match(e.message, pattern);
    return true;
  });
}

Deno.test("hash: sha256 and the incremental hasher agree", () => {
  const digest = sha256(enc.encode("abc"));
  assert.equal(formatBase16(digest), ABC_BASE16);
  assert.equal(formatNixHash(digest), ABC_NIX32);
  assert.equal(formatSriHash(digest), ABC_SRI);

  const h = createSha256();
  h.update(enc.encode("a")).update(enc.encode("")).update(enc.encode("bc"));
  assert.deepEqual(h.digest(), digest);

  const data = new Uint8Array(randomBytes(100_000));
  const stream = new Sha256Stream();
  for (let i = 0; i < data.length; i += 7777) stream.update(data.subarray(i, i + 7777));
  assert.equal(stream.byteLength, data.length);
  assert.deepEqual(stream.digest(), sha256(data));
});

Deno.test("hash: parses nix32, base16, base64 and SRI forms", () => {
  const expected = sha256(enc.encode("abc"));
  for (
    const text of [
      ABC_NIX32,
      `sha256:${ABC_BASE16}`,
      `sha256:${ABC_BASE16.toUpperCase()}`,
      `sha256:${encodeBase64(expected)}`,
      ABC_SRI,
    ]
  ) {
    assert.deepEqual(parseNixHash(text), expected, text);
    assert.equal(normalizeNixHash(text), ABC_NIX32, text);
  }
});

Deno.test("hash: rejects other hash types, saying only sha256 is supported", () => {
  for (
    const text of [
      "md5:3y8bwfr609h3lh9ch0izcqq7fl",
      "sha1:143xibwh31h9bvxzalr0sjvbbvpa6ffs",
      "sha512-z4PhNX7vuL3xVChQ1m2AB9Yg5AULVxXcg/SpIdNs6c5H0NE8XYXysP+DGNKHfuwvY7kxvUdBeoGlODJ6+SfaPg==",
    ]
  ) {
    assertFormatError(() => parseNixHash(text), /not supported, only sha256 is/);
  }
});

Deno.test("hash: rejects malformed hashes", () => {
  const cases: [string, RegExp][] = [
    ["", /expected 'sha256:<hash>'/],
    ["1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s", /expected 'sha256:<hash>'/],
    ["sha256:", /expected 52 nix32/],
    ["sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5", /expected 52 nix32/],
    ["sha256:eb8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s", /expected 52 nix32/],
    ["sha256:2zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz", /expected 52 nix32/],
    [`sha256:${ABC_BASE16.slice(1)}g`, /expected 52 nix32/],
    ["sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0", /invalid SRI/], // no padding
    ["sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa1=", /invalid SRI/], // stray bits
    ["sha256-ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0=", /invalid SRI/], // base64url
    ["sha256-AAAA", /invalid SRI/], // wrong length
    [` ${ABC_NIX32}`, /expected 'sha256:<hash>'/],
    [`${ABC_NIX32}\n`, /expected 52 nix32/],
  ];
  for (const [text, pattern] of cases) {
    assertFormatError(() => parseNixHash(text), pattern);
    assert.equal(typeof tryParseNixHash(text), "string");
  }
  assertFormatError(() => formatNixHash(new Uint8Array(20)), /32 bytes/);
});

Deno.test("hash: strict base64", () => {
  assert.deepEqual(decodeBase64("AAEC"), Uint8Array.from([0, 1, 2]));
  assert.deepEqual(decodeBase64(""), new Uint8Array());
  for (const bad of ["AAE", "AAE=A", "AA==AA==", "AAF=", "A B=", "AA-_"]) {
    assertFormatError(() => decodeBase64(bad, "public key"), /Cannot decode public key/);
  }
});

Deno.test({
  name: "hash: agrees with `nix hash file` and `nix hash to-sri`",
  ignore: !HAVE_NIX,
  fn: async () => {
    const dir = await Deno.makeTempDir({ prefix: "arca-hash-test-" });
    try {
      const files: string[] = [];
      const digests: Uint8Array[] = [];
      for (const size of [0, 1, 55, 56, 64, 1000, 100_000]) {
        const data = new Uint8Array(randomBytes(size));
        const file = join(dir, `f${size}`);
        await Deno.writeFile(file, data);
        files.push(file);
        digests.push(sha256(data));
      }
      const nix32 = await runNix("nix", ["hash", "file", "--base32", ...files]);
      assert.deepEqual(
        nix32.trim().split("\n"),
        digests.map((d) => formatNixHash(d).slice("sha256:".length)),
      );
      const sri = await runNix("nix", ["hash", "file", "--sri", ...files]);
      assert.deepEqual(sri.trim().split("\n"), digests.map(formatSriHash));
      const toSri = await runNix("nix", ["hash", "to-sri", ...digests.map(formatNixHash)]);
      assert.deepEqual(toSri.trim().split("\n"), digests.map(formatSriHash));
      for (const text of sri.trim().split("\n")) {
        assert.equal(formatSriHash(parseNixHash(text)), text);
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
