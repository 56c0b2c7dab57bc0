import assert from "node:assert/strict";
import { join } from "node:path";
import { FormatError, SignatureError } from "../../src/errors.ts";
import { decodeBase64, encodeBase64, normalizeNixHash } from "../../src/cache/hash.ts";
import { formatNarInfo, type NarInfo, parseNarInfo } from "../../src/cache/narinfo.ts";
import {
  formatPublicKey,
  formatSecretKey,
  generateSecretKey,
  parsePublicKey,
  parseSecretKey,
  type PublicKey,
  publicKeyOf,
  signatureKeyName,
  signFingerprint,
  signNarInfo,
  validSignatureKeys,
  verifyFingerprint,
  verifyNarInfoSignatures,
} from "../../src/cache/signing.ts";
import { HAVE_NIX, nixEnv, type NixPathInfo, pathInfo, runNix } from "../helpers/nix.ts";

// A throwaway key made by Nix 2.8:
//   nix key generate-secret --key-name test-1 > sk
//   nix key convert-secret-to-public < sk > pk
const NIX_SECRET =
  "test-1:q0kM6zJB8qeOC5BEZoBfeam0hl+pS5egxPvhfqQ9bg5zwurOB3uBx7Pwb5Vfp03knH/g9cM4QOATHNg0TTzmpA==";
const NIX_PUBLIC = "test-1:c8Lqzgd7gcez8G+VX6dN5Jx/4PXDOEDgExzYNE085qQ=";

// Narinfos Nix wrote after `nix store sign --key-file sk` (provenance in narinfo_test.ts):
// the Sig lines are Nix's signatures with the key above.
const NIX_SIGNED = [
  `StorePath: /nix/store/8zpyg12iibf96h5bn2chid4qwy47qc86-arca-narinfo-top
URL: nar/0x62i92vk21zr17sgdbw9i0rxhw8ymg09z2fc8kxaz4m4k0xpjww.nar.xz
Compression: xz
FileHash: sha256:0x62i92vk21zr17sgdbw9i0rxhw8ymg09z2fc8kxaz4m4k0xpjww
FileSize: 284
NarHash: sha256:1lmlbdm6k5mjp4bb58f1krwrcqzpk8n5z9hx3y02b68dgn4brl91
NarSize: 592
References: 8zpyg12iibf96h5bn2chid4qwy47qc86-arca-narinfo-top jph49rz6j1b4f6hlvsx2prn3p3fkcadp-arca-narinfo-dep
Deriver: fglmwi6zxq0m0lzn1wn1lm87xkxlkgiw-arca-narinfo-top.drv
Sig: test-1:19PUJPqWDabvjQpbrxUtmZfu7dmpSNv4wPzhmCSlMWx/F40vIopyD37hoPZX5bn7eX8A2UjvOdT+/PaRnZH5BA==
`,
  `StorePath: /nix/store/jph49rz6j1b4f6hlvsx2prn3p3fkcadp-arca-narinfo-dep
URL: nar/1xsjkazpfgyyy38br89kz2plvdb4dkqcjl5mh0n2py3ndf0sc48j.nar.xz
Compression: xz
FileHash: sha256:1xsjkazpfgyyy38br89kz2plvdb4dkqcjl5mh0n2py3ndf0sc48j
FileSize: 128
NarHash: sha256:00kjynz8n03652qccs76ivsvark3pr3dfr6w1ba3x7bx83kcknvv
NarSize: 120
References: 
Deriver: g6jwfmv2zvzpilklypj81s0p8wbars9v-arca-narinfo-dep.drv
Sig: test-1:9zJpN9CcFcIq20yO4JKARaXe8FV0O7cZTUaTyIhW409Ws0Rir/B6zyrRyW6YuixtLoqmd+GGTGBaBwG/Bg7DCw==
`,
  `StorePath: /nix/store/zznqhb4nlqa4b6kcwz6kzjply875cjg3-d
URL: nar/0irdw5h6l49dwn2mvsz6xad8w67icglfxxs6c5swi2wiry90kk7n.nar.zst
Compression: zstd
FileHash: sha256:0irdw5h6l49dwn2mvsz6xad8w67icglfxxs6c5swi2wiry90kk7n
FileSize: 149
NarHash: sha256:0kv5x8bqbr4i1siay1bl5y9rcihr7440y7ivrmy6n3hf84yfrpqw
NarSize: 456
References: 
Sig: test-1:umeno4SOJIZuh76FQD54MzXCi0uywMJOSuPVQzMvp/iTyMQmtPJokmNYlREfrxNjULBbqZ9gRmXy4zNKXbPfAA==
CA: fixed:r:sha256:0kv5x8bqbr4i1siay1bl5y9rcihr7440y7ivrmy6n3hf84yfrpqw
`,
  `StorePath: /nix/store/fglmwi6zxq0m0lzn1wn1lm87xkxlkgiw-arca-narinfo-top.drv
URL: nar/1iq92par50r67cg0naciz3m82gjw3bl3fj087d9h6xaflzjmsp37.nar
Compression: none
FileHash: sha256:1iq92par50r67cg0naciz3m82gjw3bl3fj087d9h6xaflzjmsp37
FileSize: 608
NarHash: sha256:1iq92par50r67cg0naciz3m82gjw3bl3fj087d9h6xaflzjmsp37
NarSize: 608
References: g6jwfmv2zvzpilklypj81s0p8wbars9v-arca-narinfo-dep.drv
Sig: test-1:S0aqtsChNwPqraN8eRCuj8vf9heUze13nnptMn73HmGR1YZ4ka/V8fc1PfAjcwb11fYONuQoHbXnNtwdM1HlBg==
CA: text:sha256:0lg5mlndrv8qhr8g90v8gq2xz44pqdfc1071v4paqkc91qrjpi0w
`,
];

function hex(text: string): Uint8Array {
  return Uint8Array.from(text.match(/../g) ?? [], (byte) => parseInt(byte, 16));
}

function assertThrows(fn: () => unknown, type: typeof FormatError, pattern: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof type, `expected ${type.name}, got ${e}`);
    assert.match(e.message, pattern);
    return true;
  });
}

Deno.test("signing: reads and writes Nix's key files", () => {
  const secret = parseSecretKey(`  ${NIX_SECRET}\n`);
  assert.equal(secret.name, "test-1");
  assert.equal(secret.seed.length, 32);
  assert.equal(formatSecretKey(secret), NIX_SECRET);
  assert.equal(formatPublicKey(publicKeyOf(secret)), NIX_PUBLIC);
  const pub = parsePublicKey(`${NIX_PUBLIC}\n`);
  assert.deepEqual(pub, publicKeyOf(secret));
  assert.equal(formatPublicKey(pub), NIX_PUBLIC);
});

Deno.test("signing: our signatures are the ones nix made", () => {
  const secret = parseSecretKey(NIX_SECRET);
  const trusted = [parsePublicKey(NIX_PUBLIC)];
  for (const text of NIX_SIGNED) {
    const info = parseNarInfo(text);
    assert.equal(info.sigs.length, 1);
    assert.equal(signNarInfo(info, secret), info.sigs[0]);
    assert.equal(verifyNarInfoSignatures(info, trusted), true);
    assert.deepEqual(validSignatureKeys(info, trusted), ["test-1"]);
  }
});

Deno.test("signing: RFC 8032 Ed25519 test vectors 1 and 2", () => {
  // RFC 8032 §7.1 TEST 1 (empty message) and TEST 2 (one byte 0x72 = "r").
  const vectors = [
    {
      seed: "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
      pub: "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
      msg: "",
      sig: "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155" +
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    },
    {
      seed: "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
      pub: "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
      msg: "r",
      sig: "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da" +
        "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    },
  ];
  for (const v of vectors) {
    const key = generateSecretKey("rfc", { seed: hex(v.seed) });
    assert.deepEqual(key.publicKey, hex(v.pub));
    const sig = signFingerprint(v.msg, key);
    assert.equal(sig, `rfc:${encodeBase64(hex(v.sig))}`);
    assert.equal(verifyFingerprint(v.msg, sig, [publicKeyOf(key)]), true);
    assert.equal(verifyFingerprint(v.msg + "x", sig, [publicKeyOf(key)]), false);
  }
});

Deno.test("signing: verification matches keys by name and ignores malformed signatures", () => {
  const info = parseNarInfo(NIX_SIGNED[0]);
  const good = info.sigs[0];
  const pub = parsePublicKey(NIX_PUBLIC);
  const other = publicKeyOf(generateSecretKey("test-1"));
  const renamed: PublicKey = { name: "test-2", key: pub.key };
  assert.equal(verifyNarInfoSignatures(info, [pub]), true);
  assert.equal(verifyNarInfoSignatures(info, [other, renamed, pub]), true);
  assert.equal(verifyNarInfoSignatures(info, []), false);
  assert.equal(verifyNarInfoSignatures(info, [other]), false, "same name, other key");
  assert.equal(verifyNarInfoSignatures(info, [renamed]), false, "same key, other name");
  assert.equal(verifyNarInfoSignatures({ ...info, sigs: [] }, [pub]), false);

  // The covered fields: store path, NarHash, NarSize, references.
  const other32 = "sha256:00kjynz8n03652qccs76ivsvark3pr3dfr6w1ba3x7bx83kcknvv";
  for (
    const tampered of [
      { narSize: info.narSize + 1 },
      { narHash: other32 },
      { references: info.references.slice(1) },
      { storePath: "/nix/store/8zpyg12iibf96h5bn2chid4qwy47qc86-arca-narinfo-toq" },
    ]
  ) {
    assert.equal(verifyNarInfoSignatures({ ...info, ...tampered }, [pub]), false);
  }
  // Not covered: where and how the NAR is stored, the deriver and the CA.
  const moved: NarInfo = {
    ...info,
    url: "nar/elsewhere.nar.zst",
    compression: "zstd",
    fileHash: other32,
    fileSize: 1,
    deriver: undefined,
  };
  assert.equal(verifyNarInfoSignatures(moved, [pub]), true);

  const sigBytes = good.slice("test-1:".length);
  const flipped = encodeBase64(decodeBase64(sigBytes).map((b, i) => (i === 0 ? b ^ 1 : b)));
  const malformed = [
    "",
    ":",
    "test-1",
    "test-1:",
    `:${sigBytes}`,
    `test-1:${sigBytes.slice(0, -2)}`,
    `test-1:${sigBytes}AAAA`,
    `test-1:${sigBytes.replace("+", "-")}`,
    `test-1:${"!".repeat(88)}`,
    `test-1:${encodeBase64(new Uint8Array(64))}`,
    `test-1:${flipped}`,
  ];
  for (const sig of malformed) {
    assert.equal(verifyNarInfoSignatures({ ...info, sigs: [sig] }, [pub]), false, sig);
    assert.equal(verifyFingerprint("x", sig, [pub]), false, sig);
  }
  // A good signature among malformed ones still counts.
  assert.equal(verifyNarInfoSignatures({ ...info, sigs: [...malformed, good] }, [pub]), true);
  // A trusted key that is not a valid point verifies nothing rather than throwing.
  const junk: PublicKey = { name: "test-1", key: new Uint8Array(32).fill(0xff) };
  assert.equal(verifyNarInfoSignatures(info, [junk]), false);
  assert.equal(verifyNarInfoSignatures(info, [{ name: "test-1", key: new Uint8Array(3) }]), false);
  assert.equal(signatureKeyName(good), "test-1");
  assert.equal(signatureKeyName(":abc"), undefined);
});

Deno.test("signing: rejects malformed keys and names", () => {
  const secret = parseSecretKey(NIX_SECRET);
  const [, b64] = NIX_SECRET.split(":");
  const bytes = decodeBase64(b64);
  const mismatched = bytes.slice();
  mismatched[40] ^= 1;
  assertThrows(
    () => parseSecretKey(`test-1:${encodeBase64(mismatched)}`),
    SignatureError,
    /public half does not belong to its seed/,
  );
  const formatCases: [string, RegExp][] = [
    ["", /expected 'name:base64'/],
    [b64, /expected 'name:base64'/],
    [`:${b64}`, /expected 'name:base64'/],
    [`test 1:${b64}`, /invalid key name/],
    [`test-1:${b64.slice(0, -2)}`, /Cannot decode secret key 'test-1': invalid base64/],
    [`test-1:${encodeBase64(bytes.slice(0, 32))}`, /expected 64 bytes, got 32/],
    [NIX_PUBLIC, /expected 64 bytes, got 32/],
  ];
  for (const [text, pattern] of formatCases) {
    assertThrows(() => parseSecretKey(text), FormatError, pattern);
  }
  assertThrows(() => parsePublicKey(NIX_SECRET), FormatError, /expected 32 bytes, got 64/);
  assertThrows(() => parsePublicKey("test-1:"), FormatError, /expected 32 bytes, got 0/);
  assertThrows(() => parsePublicKey("test-1"), FormatError, /expected 'name:base64'/);
  for (const name of ["", "a:b", "a b", "a\nb", "é"]) {
    assertThrows(() => generateSecretKey(name), FormatError, /Invalid key name/);
    assertThrows(() => formatSecretKey({ ...secret, name }), FormatError, /Invalid key name/);
  }
  assertThrows(
    () => generateSecretKey("x", { seed: new Uint8Array(31) }),
    FormatError,
    /expected 32 bytes/,
  );
  const fresh = generateSecretKey("cache.example.org-1");
  assert.deepEqual(parseSecretKey(formatSecretKey(fresh)), fresh);
  assert.notDeepEqual(generateSecretKey("x").seed, generateSecretKey("x").seed);
});

function narInfoFromPathInfo(info: NixPathInfo): NarInfo {
  const base = (path: string) => path.slice("/nix/store/".length);
  const result: NarInfo = {
    storePath: info.path,
    url: "nar/unused.nar",
    compression: "none",
    narHash: normalizeNixHash(info.narHash),
    narSize: info.narSize,
    references: info.references.map(base),
    sigs: info.signatures ?? [],
  };
  if (info.deriver) result.deriver = base(info.deriver);
  if (info.ca) result.ca = info.ca;
  return result;
}

/** Builds a fresh fixture referring to a fresh dependency; returns [top, dep]. */
async function buildPair(dir: string, env: Record<string, string>): Promise<[string, string]> {
  const tag = crypto.randomUUID().slice(0, 8);
  const expr = join(dir, "fixture.nix");
  await Deno.writeTextFile(
    expr,
    `let
      sh = script: name: derivation {
        inherit name; system = builtins.currentSystem; builder = "/bin/sh";
        args = [ "-c" ("export PATH=/bin:/usr/bin; " + script) ];
      };
      dep = sh "echo dep > $out" "arca-signing-dep-${tag}";
    in sh "mkdir $out; echo \${dep} > $out/ref" "arca-signing-top-${tag}"`,
  );
  const top = (await runNix("nix-build", ["--no-out-link", expr], { env })).trim();
  const [{ references }] = await pathInfo([top], { env });
  const dep = references.find((r) => r.endsWith(`-arca-signing-dep-${tag}`));
  assert.ok(dep);
  return [top, dep];
}

Deno.test({
  name: "signing: a key from `nix key generate-secret` signs exactly as `nix store sign`",
  ignore: !HAVE_NIX,
  fn: async () => {
    const dir = await Deno.makeTempDir({ prefix: "arca-signing-test-" });
    const env = nixEnv();
    try {
      const keyFile = join(dir, "secret.key");
      const secretText = await runNix("nix", ["key", "generate-secret", "--key-name", "test-1"], {
        env,
      });
      await Deno.writeTextFile(keyFile, secretText);
      const publicText = await runNix("nix", ["key", "convert-secret-to-public"], {
        env,
        stdin: new TextEncoder().encode(secretText),
      });
      const secret = parseSecretKey(secretText);
      assert.equal(formatPublicKey(publicKeyOf(secret)), publicText.trim());

      const [top, dep] = await buildPair(dir, env);
      await runNix("nix", ["store", "sign", "--key-file", keyFile, top, dep], { env });
      for (const info of await pathInfo([top, dep], { env })) {
        assert.equal(info.signatures?.length, 1);
        const narInfo = narInfoFromPathInfo(info);
        assert.equal(signNarInfo(narInfo, secret), info.signatures![0]);
        assert.equal(verifyNarInfoSignatures(narInfo, [parsePublicKey(publicText)]), true);
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
      await Deno.remove(env.XDG_CACHE_HOME, { recursive: true });
    }
  },
});

Deno.test({
  name: "signing: nix accepts our keys and the narinfos we sign",
  ignore: !HAVE_NIX,
  fn: async () => {
    const dir = await Deno.makeTempDir({ prefix: "arca-signing-test-" });
    const env = nixEnv();
    const copyEnvs: Record<string, string>[] = [];
    try {
      const secret = generateSecretKey("arca-test-1");
      const publicKey = formatPublicKey(publicKeyOf(secret));
      const keyFile = join(dir, "secret.key");
      await Deno.writeTextFile(keyFile, formatSecretKey(secret));
      const converted = await runNix("nix", ["key", "convert-secret-to-public"], {
        env,
        stdin: new TextEncoder().encode(formatSecretKey(secret)),
      });
      assert.equal(converted.trim(), publicKey);

      // 1. `nix store sign` with our key file; `nix store verify` with our public key.
      const [top, dep] = await buildPair(dir, env);
      await runNix("nix", ["store", "sign", "--key-file", keyFile, top], { env });
      await runNix("nix", [
        "store",
        "verify",
        "--no-contents",
        "--sigs-needed",
        "1",
        "--trusted-public-keys",
        publicKey,
        top,
      ], { env });
      const [signedTop] = await pathInfo([top], { env });
      assert.equal(
        verifyNarInfoSignatures(narInfoFromPathInfo(signedTop), [publicKeyOf(secret)]),
        true,
      );

      // 2. A binary cache whose narinfos we wrote and signed: nix copies from it only with
      // our key trusted, checking our signatures.
      const cache = join(dir, "cache");
      await runNix("nix", ["copy", "--to", `file://${cache}?compression=none`, top], { env });
      for (const path of [top, dep]) {
        const file = join(cache, `${path.slice(11, 43)}.narinfo`);
        const nixInfo = parseNarInfo(await Deno.readTextFile(file));
        const ours: NarInfo = { ...nixInfo, sigs: [] };
        ours.sigs = [signNarInfo(ours, secret)];
        await Deno.writeTextFile(file, formatNarInfo(ours));
      }
      const store = join(dir, "store2");
      // A fresh XDG cache per copy: Nix caches narinfo lookups.
      const copyFrom = (trusted: string, into: string) => {
        copyEnvs.push(nixEnv());
        return runNix("nix", [
          "copy",
          "--from",
          `file://${cache}`,
          "--to",
          into,
          "--option",
          "trusted-public-keys",
          trusted,
          top,
        ], { env: copyEnvs.at(-1) });
      };
      const otherKey = formatPublicKey(publicKeyOf(generateSecretKey("arca-test-1")));
      await assert.rejects(
        copyFrom(otherKey, join(dir, "store-untrusted")),
        /lacks a valid signature/,
      );
      await copyFrom(publicKey, store);
      const copied = await pathInfo([top, dep], { store, env });
      for (const info of copied) {
        assert.deepEqual(info.signatures, [
          signNarInfo(narInfoFromPathInfo({ ...info, signatures: [] }), secret),
        ]);
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
      for (const e of [env, ...copyEnvs]) {
        await Deno.remove(e.XDG_CACHE_HOME, { recursive: true });
      }
    }
  },
});
