import assert from "node:assert/strict";
import { FormatError } from "../../src/errors.ts";
import {
  isStorePath,
  isValidHashPart,
  isValidStorePathName,
  parseStorePath,
  parseStorePathBaseName,
  STORE_DIR,
  storePathFromBaseName,
  validateStorePathName,
} from "../../src/cache/store_path.ts";
import { HAVE_NIX, nixEnv, runNix } from "../helpers/nix.ts";

// A real path: `nix-instantiate --readonly-mode --eval -E 'builtins.toFile "zz-readonly-probe" "x"'`
// printed "/nix/store/vmmnzh8bdwakmkgc1mgwpqjmcjlhpw9q-zz-readonly-probe" (Nix 2.8).
const HASH = "vmmnzh8bdwakmkgc1mgwpqjmcjlhpw9q";
const PATH = `/nix/store/${HASH}-zz-readonly-probe`;

function assertFormatError(fn: () => unknown, pattern: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof FormatError, `expected FormatError, got ${e}`);
    assert.match(e.message, pattern);
    return true;
  });
}

Deno.test("store_path: parses a store path and its base name", () => {
  const expected = {
    hash: HASH,
    name: "zz-readonly-probe",
    path: PATH,
    baseName: `${HASH}-zz-readonly-probe`,
  };
  assert.equal(STORE_DIR, "/nix/store");
  assert.deepEqual(parseStorePath(PATH), expected);
  assert.deepEqual(parseStorePathBaseName(`${HASH}-zz-readonly-probe`), expected);
  assert.equal(storePathFromBaseName(`${HASH}-zz-readonly-probe`), PATH);
  assert.equal(isStorePath(PATH), true);
  // Names may contain '-' and start with '.', as in Nix.
  assert.equal(parseStorePath(`/nix/store/${HASH}-.foo-1.2-bin`).name, ".foo-1.2-bin");
  assert.equal(parseStorePath(`/nix/store/${HASH}-${"x".repeat(211)}`).name.length, 211);
});

Deno.test("store_path: rejects malformed paths, saying what is wrong", () => {
  const cases: [string, RegExp][] = [
    ["", /not an absolute path/],
    [`nix/store/${HASH}-x`, /not an absolute path/],
    [`/nix/store2/${HASH}-x`, /not in \/nix\/store/],
    [`/gnu/store/${HASH}-x`, /not in \/nix\/store/],
    ["/nix/store", /the store directory itself/],
    ["/nix/store/", /the store directory itself/],
    [`/nix/store//${HASH}-x`, /empty path segment/],
    [`${PATH}/`, /trailing '\/'/],
    [`${PATH}/bin/hello`, /a path inside a store object/],
    [`/nix/store/../etc/passwd`, /a path inside a store object/],
    [`/nix/store/${HASH}`, /too short/],
    [`/nix/store/${HASH}-`, /empty name/],
    [`/nix/store/${HASH}_x`, /not followed by '-'/],
    [`/nix/store/${HASH.slice(1)}-x`, /illegal character '-'/],
    [`/nix/store/e${HASH.slice(1)}-x`, /hash part contains illegal character 'e'/],
    [`/nix/store/${HASH.slice(0, -1)}T-x`, /hash part contains illegal character 'T'/],
    [`/nix/store/${HASH}-a b`, /illegal character " "/],
    [`/nix/store/${HASH}-a\nb`, /illegal character "\\n"/],
    [`/nix/store/${HASH}-${"x".repeat(212)}`, /longer than 211 characters/],
    [`/nix/store/${HASH}-..`, /'\.\.' is not allowed/],
  ];
  for (const [path, pattern] of cases) {
    assertFormatError(() => parseStorePath(path), pattern);
    assert.equal(isStorePath(path), false, path);
  }
  assertFormatError(
    () => parseStorePathBaseName(PATH),
    /hash part contains illegal character '\/'/,
  );
  assertFormatError(
    () => parseStorePathBaseName(`${HASH}-x/y`),
    /Invalid store path base name .*illegal character "\/"/,
  );
});

Deno.test("store_path: hash parts", () => {
  assert.equal(isValidHashPart(HASH), true);
  assert.equal(isValidHashPart("0".repeat(32)), true);
  assert.equal(isValidHashPart("z".repeat(32)), true);
  assert.equal(isValidHashPart("0".repeat(31)), false);
  assert.equal(isValidHashPart("0".repeat(33)), false);
  for (const c of "eoutAZ-_.") {
    assert.equal(isValidHashPart(c + "0".repeat(31)), false, c);
  }
});

// Names checked against `builtins.toFile <name> "x"` in Nix 2.8 (--readonly-mode: computes
// the path, writes nothing). Accepted by Nix 2.8 unless marked.
const NAMES_NIX_ACCEPTS = [
  "hello",
  "hello-2.12.1",
  "a",
  "A-Z_a.z+0=9?",
  "+-._?=",
  ".foo",
  "..foo",
  ".foo-bar",
  "-",
  "--",
  "x".repeat(211),
  "source.drv",
];
const NAMES_NIX_REJECTS = [
  "",
  "x".repeat(212),
  "a b",
  "a\tb",
  "a/b",
  "a:b",
  "a@b",
  "a~b",
  "a%b",
  "a'b",
  'a"b',
  "a,b",
  "a;b",
  "a*b",
  "a$b",
  "a!b",
  "é",
  "a\\b",
];
// Nix 2.8 accepts these, but Nix 2.20+ rejects them ("." and ".." as the first
// dash-separated component); we follow the newer rule so no client gets a path it refuses.
const NAMES_NEWER_NIX_REJECTS = [".", "..", ".-x", "..-x"];

Deno.test("store_path: name rules", () => {
  for (const name of NAMES_NIX_ACCEPTS) {
    validateStorePathName(name);
    assert.equal(isValidStorePathName(name), true, name);
  }
  for (const name of [...NAMES_NIX_REJECTS, ...NAMES_NEWER_NIX_REJECTS]) {
    assertFormatError(() => validateStorePathName(name), /Invalid store path name/);
    assert.equal(isValidStorePathName(name), false, name);
  }
});

async function nixAcceptsName(name: string, env: Record<string, string>): Promise<boolean> {
  try {
    await runNix("nix-instantiate", [
      "--readonly-mode",
      "--eval",
      "--argstr",
      "name",
      name,
      "-E",
      '{ name }: builtins.toFile name "x"',
    ], { env });
    return true;
  } catch (e) {
    // Anything but a store path name error would be a broken test, not a verdict.
    assert.match(
      String(e),
      /store path .* (contains illegal character|has an empty name|has a name longer than)/,
    );
    return false;
  }
}

Deno.test({
  name: "store_path: name rules agree with nix (builtins.toFile)",
  ignore: !HAVE_NIX,
  fn: async () => {
    const env = nixEnv();
    try {
      for (const name of NAMES_NIX_ACCEPTS) {
        assert.equal(await nixAcceptsName(name, env), true, `nix should accept '${name}'`);
      }
      for (const name of NAMES_NIX_REJECTS) {
        assert.equal(await nixAcceptsName(name, env), false, `nix should reject '${name}'`);
      }
      // Nix 2.8 still accepts what newer Nix rejects; if this starts failing, the Nix on
      // PATH is newer and NAMES_NEWER_NIX_REJECTS can move to NAMES_NIX_REJECTS.
      const version = await runNix("nix", ["--version"], { env });
      if (/ 2\.([0-9]|1[0-9])\./.test(version)) {
        for (const name of NAMES_NEWER_NIX_REJECTS) {
          assert.equal(await nixAcceptsName(name, env), true, `nix 2.8 accepts '${name}'`);
        }
      }
      // And a path Nix prints parses.
      const out = await runNix("nix-instantiate", [
        "--readonly-mode",
        "--eval",
        "-E",
        'builtins.toFile "arca-store-path-test-+._?=" "x"',
      ], { env });
      const path = JSON.parse(out.trim());
      assert.equal(parseStorePath(path).name, "arca-store-path-test-+._?=");
    } finally {
      await Deno.remove(env.XDG_CACHE_HOME, { recursive: true });
    }
  },
});
