import assert from "node:assert/strict";
import { join } from "node:path";
import { FormatError } from "../../src/errors.ts";
import {
  formatNarInfo,
  type NarInfo,
  narInfoFingerprint,
  narInfoReferencePaths,
  parseNarInfo,
} from "../../src/cache/narinfo.ts";
import { normalizeNixHash } from "../../src/cache/hash.ts";
import { HAVE_NIX, nixEnv, pathInfo, runNix } from "../helpers/nix.ts";

// Narinfo files written by Nix 2.8 itself. Made with (key from
// `nix key generate-secret --key-name test-1`, see signing_test.ts):
//   nix-build --no-out-link f.nix   # a "top" output with a symlink, referring to itself and "dep"
// and for the base16 spelling: nix hash to-base16 sha256-IdG8iH0NmSWAHx2mXyya92OWeZ7BobIWubKWaWpbtNI=
//   nix store sign --key-file sk -r <top>
//   nix copy --to "file:///tmp/nv/cache?compression=xz" <top>
//   nix-store --add d && nix store sign --key-file sk <d>
//   nix copy --to "file:///tmp/nv/cache2?compression=zstd" <d>
//   nix store sign --derivation --key-file sk <top.drv>
//   nix copy --derivation --to "file:///tmp/nv/cache4?compression=none" <top.drv>
// where f.nix is
//   let dep = derivation { name = "arca-narinfo-dep"; system = builtins.currentSystem;
//     builder = "/bin/sh"; args = ["-c" "echo dep > $out"]; };
//   in derivation { name = "arca-narinfo-top"; system = builtins.currentSystem; builder = "/bin/sh";
//     args = ["-c" "export PATH=/bin:/usr/bin; mkdir $out; echo ${dep} > $out/ref; ln -s $out/ref $out/self"]; }
const NIX_NARINFO_TOP = `StorePath: /nix/store/8zpyg12iibf96h5bn2chid4qwy47qc86-arca-narinfo-top
URL: nar/0x62i92vk21zr17sgdbw9i0rxhw8ymg09z2fc8kxaz4m4k0xpjww.nar.xz
Compression: xz
FileHash: sha256:0x62i92vk21zr17sgdbw9i0rxhw8ymg09z2fc8kxaz4m4k0xpjww
FileSize: 284
NarHash: sha256:1lmlbdm6k5mjp4bb58f1krwrcqzpk8n5z9hx3y02b68dgn4brl91
NarSize: 592
References: 8zpyg12iibf96h5bn2chid4qwy47qc86-arca-narinfo-top jph49rz6j1b4f6hlvsx2prn3p3fkcadp-arca-narinfo-dep
Deriver: fglmwi6zxq0m0lzn1wn1lm87xkxlkgiw-arca-narinfo-top.drv
Sig: test-1:19PUJPqWDabvjQpbrxUtmZfu7dmpSNv4wPzhmCSlMWx/F40vIopyD37hoPZX5bn7eX8A2UjvOdT+/PaRnZH5BA==
`;
const NIX_NARINFO_DEP = `StorePath: /nix/store/jph49rz6j1b4f6hlvsx2prn3p3fkcadp-arca-narinfo-dep
URL: nar/1xsjkazpfgyyy38br89kz2plvdb4dkqcjl5mh0n2py3ndf0sc48j.nar.xz
Compression: xz
FileHash: sha256:1xsjkazpfgyyy38br89kz2plvdb4dkqcjl5mh0n2py3ndf0sc48j
FileSize: 128
NarHash: sha256:00kjynz8n03652qccs76ivsvark3pr3dfr6w1ba3x7bx83kcknvv
NarSize: 120
References: 
Deriver: g6jwfmv2zvzpilklypj81s0p8wbars9v-arca-narinfo-dep.drv
Sig: test-1:9zJpN9CcFcIq20yO4JKARaXe8FV0O7cZTUaTyIhW409Ws0Rir/B6zyrRyW6YuixtLoqmd+GGTGBaBwG/Bg7DCw==
`;
const NIX_NARINFO_FIXED_CA = `StorePath: /nix/store/zznqhb4nlqa4b6kcwz6kzjply875cjg3-d
URL: nar/0irdw5h6l49dwn2mvsz6xad8w67icglfxxs6c5swi2wiry90kk7n.nar.zst
Compression: zstd
FileHash: sha256:0irdw5h6l49dwn2mvsz6xad8w67icglfxxs6c5swi2wiry90kk7n
FileSize: 149
NarHash: sha256:0kv5x8bqbr4i1siay1bl5y9rcihr7440y7ivrmy6n3hf84yfrpqw
NarSize: 456
References: 
Sig: test-1:umeno4SOJIZuh76FQD54MzXCi0uywMJOSuPVQzMvp/iTyMQmtPJokmNYlREfrxNjULBbqZ9gRmXy4zNKXbPfAA==
CA: fixed:r:sha256:0kv5x8bqbr4i1siay1bl5y9rcihr7440y7ivrmy6n3hf84yfrpqw
`;
const NIX_NARINFO_TEXT_CA =
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
`;

const TOP: NarInfo = {
  storePath: "/nix/store/8zpyg12iibf96h5bn2chid4qwy47qc86-arca-narinfo-top",
  url: "nar/0x62i92vk21zr17sgdbw9i0rxhw8ymg09z2fc8kxaz4m4k0xpjww.nar.xz",
  compression: "xz",
  fileHash: "sha256:0x62i92vk21zr17sgdbw9i0rxhw8ymg09z2fc8kxaz4m4k0xpjww",
  fileSize: 284,
  narHash: "sha256:1lmlbdm6k5mjp4bb58f1krwrcqzpk8n5z9hx3y02b68dgn4brl91",
  narSize: 592,
  references: [
    "8zpyg12iibf96h5bn2chid4qwy47qc86-arca-narinfo-top",
    "jph49rz6j1b4f6hlvsx2prn3p3fkcadp-arca-narinfo-dep",
  ],
  deriver: "fglmwi6zxq0m0lzn1wn1lm87xkxlkgiw-arca-narinfo-top.drv",
  sigs: [
    "test-1:19PUJPqWDabvjQpbrxUtmZfu7dmpSNv4wPzhmCSlMWx/F40vIopyD37hoPZX5bn7eX8A2UjvOdT+/PaRnZH5BA==",
  ],
};

function assertFormatError(fn: () => unknown, pattern: RegExp | string): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof FormatError, `expected FormatError, got ${e}`);
    if (typeof pattern === "string") assert.equal(e.message, pattern);
    else assert.match(e.message, pattern);
    return true;
  });
}

Deno.test("narinfo: parses what nix writes", () => {
  assert.deepEqual(parseNarInfo(NIX_NARINFO_TOP), TOP);
  assert.deepEqual(parseNarInfo(new TextEncoder().encode(NIX_NARINFO_TOP)), TOP);
  const dep = parseNarInfo(NIX_NARINFO_DEP);
  assert.deepEqual(dep.references, []);
  assert.equal(dep.deriver, "g6jwfmv2zvzpilklypj81s0p8wbars9v-arca-narinfo-dep.drv");
  assert.equal(dep.ca, undefined);
  const fixed = parseNarInfo(NIX_NARINFO_FIXED_CA);
  assert.equal(fixed.deriver, undefined);
  assert.equal(fixed.compression, "zstd");
  assert.equal(fixed.ca, "fixed:r:sha256:0kv5x8bqbr4i1siay1bl5y9rcihr7440y7ivrmy6n3hf84yfrpqw");
  const text = parseNarInfo(NIX_NARINFO_TEXT_CA);
  assert.equal(text.compression, "none");
  assert.equal(text.ca, "text:sha256:0lg5mlndrv8qhr8g90v8gq2xz44pqdfc1071v4paqkc91qrjpi0w");
  assert.deepEqual(text.references, ["g6jwfmv2zvzpilklypj81s0p8wbars9v-arca-narinfo-dep.drv"]);
});

Deno.test("narinfo: formatting what nix wrote gives the same bytes", () => {
  for (
    const text of [NIX_NARINFO_TOP, NIX_NARINFO_DEP, NIX_NARINFO_FIXED_CA, NIX_NARINFO_TEXT_CA]
  ) {
    assert.equal(formatNarInfo(parseNarInfo(text)), text);
  }
  assert.ok(formatNarInfo(parseNarInfo(NIX_NARINFO_DEP)).includes("\nReferences: \n"));
});

Deno.test("narinfo: fingerprint is Nix's", () => {
  assert.equal(
    narInfoFingerprint(TOP),
    "1;/nix/store/8zpyg12iibf96h5bn2chid4qwy47qc86-arca-narinfo-top;" +
      "sha256:1lmlbdm6k5mjp4bb58f1krwrcqzpk8n5z9hx3y02b68dgn4brl91;592;" +
      "/nix/store/8zpyg12iibf96h5bn2chid4qwy47qc86-arca-narinfo-top," +
      "/nix/store/jph49rz6j1b4f6hlvsx2prn3p3fkcadp-arca-narinfo-dep",
  );
  assert.equal(
    narInfoFingerprint(parseNarInfo(NIX_NARINFO_DEP)),
    "1;/nix/store/jph49rz6j1b4f6hlvsx2prn3p3fkcadp-arca-narinfo-dep;" +
      "sha256:00kjynz8n03652qccs76ivsvark3pr3dfr6w1ba3x7bx83kcknvv;120;",
  );
  // Order, duplicates and hash spelling do not change it; URL, FileHash, Deriver, CA are not in it.
  const shuffled: NarInfo = {
    ...TOP,
    narHash: "sha256-IdG8iH0NmSWAHx2mXyya92OWeZ7BobIWubKWaWpbtNI=",
    references: [TOP.references[1], TOP.references[0], TOP.references[1]],
    url: "nar/other.nar.zst",
    compression: "zstd",
    fileHash: undefined,
    fileSize: undefined,
    deriver: undefined,
    ca: "fixed:r:sha256:0kv5x8bqbr4i1siay1bl5y9rcihr7440y7ivrmy6n3hf84yfrpqw",
  };
  assert.equal(narInfoFingerprint(shuffled), narInfoFingerprint(TOP));
  assert.deepEqual(narInfoReferencePaths(shuffled), [
    "/nix/store/8zpyg12iibf96h5bn2chid4qwy47qc86-arca-narinfo-top",
    "/nix/store/jph49rz6j1b4f6hlvsx2prn3p3fkcadp-arca-narinfo-dep",
  ]);
  assertFormatError(() => narInfoFingerprint({ ...TOP, narSize: 0 }), /NarSize .*must be positive/);
  assertFormatError(() => narInfoFingerprint({ ...TOP, narHash: "md5:x" }), /invalid NarHash/);
});

Deno.test("narinfo: follows Nix's rules for defaults, sets and unknown keys", () => {
  const lines = [
    "StorePath: /nix/store/8zpyg12iibf96h5bn2chid4qwy47qc86-arca-narinfo-top",
    "URL: nar/x.nar.bz2",
    "System: x86_64-linux", // Nix 2.8 knows it; we ignore it
    "X-Unknown: whatever: with colons",
    // base16 and SRI are accepted and normalized to nix32
    "FileHash: sha256:21d1bc887d0d9925801f1da65f2c9af76396799ec1a1b216b9b296696a5bb4d2",
    "NarHash: sha256-IdG8iH0NmSWAHx2mXyya92OWeZ7BobIWubKWaWpbtNI=",
    "NarSize: 592",
    // unsorted, a duplicate and a double space: a set, as Nix parses it
    "References: jph49rz6j1b4f6hlvsx2prn3p3fkcadp-arca-narinfo-dep  " +
    "8zpyg12iibf96h5bn2chid4qwy47qc86-arca-narinfo-top jph49rz6j1b4f6hlvsx2prn3p3fkcadp-arca-narinfo-dep",
    "Deriver: unknown-deriver",
    "Sig: b:2",
    "Sig: a:1",
    "Sig: b:2",
    "CA: ",
  ];
  const info = parseNarInfo(lines.join("\n") + "\n");
  assert.deepEqual(info, {
    storePath: "/nix/store/8zpyg12iibf96h5bn2chid4qwy47qc86-arca-narinfo-top",
    url: "nar/x.nar.bz2",
    compression: "bzip2", // absent: Nix's default
    fileHash: "sha256:1lmlbdm6k5mjp4bb58f1krwrcqzpk8n5z9hx3y02b68dgn4brl91",
    narHash: "sha256:1lmlbdm6k5mjp4bb58f1krwrcqzpk8n5z9hx3y02b68dgn4brl91",
    narSize: 592,
    references: [
      "8zpyg12iibf96h5bn2chid4qwy47qc86-arca-narinfo-top",
      "jph49rz6j1b4f6hlvsx2prn3p3fkcadp-arca-narinfo-dep",
    ],
    sigs: ["a:1", "b:2"],
  });
  const empty = parseNarInfo(NIX_NARINFO_DEP.replace("Compression: xz", "Compression: "));
  assert.equal(empty.compression, "bzip2");
  // CA in base16 or with another hash type (fixed-output fetches use sha1, md5, sha512)
  const ca = (value: string) => parseNarInfo(`${NIX_NARINFO_DEP}CA: ${value}\n`).ca;
  assert.equal(
    ca("fixed:r:sha256:21d1bc887d0d9925801f1da65f2c9af76396799ec1a1b216b9b296696a5bb4d2"),
    "fixed:r:sha256:1lmlbdm6k5mjp4bb58f1krwrcqzpk8n5z9hx3y02b68dgn4brl91",
  );
  assert.equal(
    ca("fixed:sha1:da39a3ee5e6b4b0d3255bfef95601890afd80709"),
    "fixed:sha1:143xibwh31h9bvxzalr0sjvbbvpa6ffs",
  );
  assert.equal(ca("fixed:md5:3y8bwfr609h3lh9ch0izcqq7fl"), "fixed:md5:3y8bwfr609h3lh9ch0izcqq7fl");
});

// One malformed line in an otherwise valid narinfo: the error must name that line.
const BASE_LINES = NIX_NARINFO_TOP.trimEnd().split("\n");

function withLine(index: number, line: string | null, insert = false): string {
  const lines = [...BASE_LINES];
  if (line === null) lines.splice(index, 1);
  else lines.splice(index, insert ? 0 : 1, line);
  return lines.join("\n") + "\n";
}

Deno.test("narinfo: each malformed line is reported with its number", () => {
  const hash = "sha256:1lmlbdm6k5mjp4bb58f1krwrcqzpk8n5z9hx3y02b68dgn4brl91";
  const ref = "jph49rz6j1b4f6hlvsx2prn3p3fkcadp-arca-narinfo-dep";
  const cases: [string, string | RegExp][] = [
    [withLine(2, "Compression xz"), "Cannot parse narinfo line 3: missing ':'"],
    [
      withLine(2, "Compression:xz"),
      "Cannot parse narinfo line 3: missing space after 'Compression:'",
    ],
    [withLine(1, "", true), "Cannot parse narinfo line 2: empty line"],
    [withLine(1, "URL: nar/x.nar.xz\r"), "Cannot parse narinfo line 2: carriage return"],
    [withLine(1, "URL: nar/\x00.nar.xz"), "Cannot parse narinfo line 2: control character"],
    [
      withLine(0, "StorePath: /nix/store/8zpyg12iibf96h5bn2chid4qwy47qc86"),
      /^Cannot parse narinfo line 1: invalid StorePath .*too short/,
    ],
    [
      withLine(0, "StorePath: /tmp/8zpyg12iibf96h5bn2chid4qwy47qc86-x"),
      /^Cannot parse narinfo line 1: invalid StorePath .*not in \/nix\/store/,
    ],
    [
      withLine(0, "StorePath: /nix/store/8zpyg12iibf96h5bn2chid4qwy47qc86-x/bin"),
      /^Cannot parse narinfo line 1: invalid StorePath .*inside a store object/,
    ],
    [withLine(1, "URL: "), /^Cannot parse narinfo line 2: invalid URL '': empty/],
    [withLine(1, "URL: nar/a b.nar"), /^Cannot parse narinfo line 2: invalid URL .*whitespace/],
    [withLine(2, "Compression: x z"), /^Cannot parse narinfo line 3: invalid Compression/],
    [
      withLine(3, "FileHash: md5:3y8bwfr609h3lh9ch0izcqq7fl"),
      /^Cannot parse narinfo line 4: invalid FileHash .*only sha256/,
    ],
    [
      withLine(4, "FileSize: 1e3"),
      /^Cannot parse narinfo line 5: invalid FileSize '1e3': expected a non-negative decimal integer/,
    ],
    [withLine(4, "FileSize: +284"), /^Cannot parse narinfo line 5: invalid FileSize/],
    [withLine(4, "FileSize: -1"), /^Cannot parse narinfo line 5: invalid FileSize/],
    [withLine(4, "FileSize: 0284"), /^Cannot parse narinfo line 5: invalid FileSize/],
    [withLine(4, "FileSize: 284 "), /^Cannot parse narinfo line 5: invalid FileSize/],
    [
      withLine(4, "FileSize: 99999999999999999999"),
      /^Cannot parse narinfo line 5: invalid FileSize .*too large/,
    ],
    [withLine(5, `NarHash: ${hash.slice(0, -1)}`), /^Cannot parse narinfo line 6: invalid NarHash/],
    [withLine(5, `NarHash: ${hash.slice(7)}`), /^Cannot parse narinfo line 6: invalid NarHash/],
    [
      withLine(6, "NarSize: 0"),
      /^Cannot parse narinfo line 7: invalid NarSize '0': must be positive/,
    ],
    [withLine(6, "NarSize: 5.5"), /^Cannot parse narinfo line 7: invalid NarSize/],
    [
      withLine(7, `References: ${ref} ${ref.slice(1)}`),
      /^Cannot parse narinfo line 8: invalid reference 'ph49/,
    ],
    [
      withLine(7, `References: /nix/store/${ref}`),
      /^Cannot parse narinfo line 8: invalid reference/,
    ],
    [withLine(8, "Deriver: "), /^Cannot parse narinfo line 9: invalid Deriver '': too short/],
    [
      withLine(8, "Deriver: /nix/store/fglmwi6zxq0m0lzn1wn1lm87xkxlkgiw-x.drv"),
      /^Cannot parse narinfo line 9: invalid Deriver/,
    ],
    [withLine(9, "Sig: "), /^Cannot parse narinfo line 10: invalid Sig '': empty/],
    [withLine(9, "Sig: a b"), /^Cannot parse narinfo line 10: invalid Sig/],
    [
      withLine(9, "CA: fixed:r:sha256:abc"),
      /^Cannot parse narinfo line 10: invalid CA .*invalid sha256 hash/,
    ],
    [
      withLine(9, "CA: fixed:r:crc32:abc"),
      /^Cannot parse narinfo line 10: invalid CA .*unknown hash type 'crc32'/,
    ],
    [
      withLine(9, "CA: text:sha1:143xibwh31h9bvxzalr0sjvbbvpa6ffs"),
      /^Cannot parse narinfo line 10: invalid CA .*text content address uses sha256/,
    ],
    [
      withLine(9, "CA: fixed:git:sha1:143xibwh31h9bvxzalr0sjvbbvpa6ffs"),
      /^Cannot parse narinfo line 10: invalid CA/,
    ],
    [
      withLine(9, "CA: sha256:0kv5x8bqbr4i1siay1bl5y9rcihr7440y7ivrmy6n3hf84yfrpqw"),
      /^Cannot parse narinfo line 10: invalid CA/,
    ],
    [withLine(2, "NarSize: 592", true), "Cannot parse narinfo line 8: duplicate NarSize"],
    [
      withLine(9, "StorePath: /nix/store/8zpyg12iibf96h5bn2chid4qwy47qc86-arca-narinfo-top", true),
      "Cannot parse narinfo line 10: duplicate StorePath",
    ],
    [
      withLine(9, "Deriver: unknown-deriver", true),
      "Cannot parse narinfo line 10: duplicate Deriver",
    ],
    [withLine(9, "References: ", true), "Cannot parse narinfo line 10: duplicate References"],
    [withLine(9, "CA: ", true) + "CA: \n", "Cannot parse narinfo line 12: duplicate CA"],
    [NIX_NARINFO_TOP.trimEnd(), "Cannot parse narinfo line 10: missing newline at end of line"],
    [withLine(0, null), "Cannot parse narinfo: missing StorePath"],
    [withLine(1, null), "Cannot parse narinfo: missing URL"],
    [withLine(5, null), "Cannot parse narinfo: missing NarHash"],
    [withLine(6, null), "Cannot parse narinfo: missing NarSize"],
    ["", "Cannot parse narinfo: missing StorePath"],
  ];
  for (const [text, expected] of cases) {
    assertFormatError(() => parseNarInfo(text), expected);
  }
});

Deno.test("narinfo: limits input size, references and signatures", () => {
  const big = NIX_NARINFO_DEP + `X-Padding: ${"x".repeat(1 << 20)}\n`;
  assertFormatError(() => parseNarInfo(big), "Cannot parse narinfo: larger than 1048576 bytes");
  assertFormatError(
    () => parseNarInfo(new TextEncoder().encode(big)),
    "Cannot parse narinfo: larger than 1048576 bytes",
  );
  // Non-ASCII counts in UTF-8 bytes.
  const wide = NIX_NARINFO_DEP + `X-Padding: ${"é".repeat(600_000)}\n`;
  assertFormatError(() => parseNarInfo(wide), "Cannot parse narinfo: larger than 1048576 bytes");
  assertFormatError(
    () => parseNarInfo(NIX_NARINFO_DEP, { maxBytes: 100 }),
    /larger than 100 bytes/,
  );

  const refs = Array.from(
    { length: 6 },
    (_, i) => `${"0".repeat(31)}${i}-r`,
  ).join(" ");
  const withRefs = NIX_NARINFO_DEP.replace("References: ", `References: ${refs}`);
  assert.equal(parseNarInfo(withRefs, { maxReferences: 6 }).references.length, 6);
  assertFormatError(
    () => parseNarInfo(withRefs, { maxReferences: 5 }),
    "Cannot parse narinfo line 8: more than 5 references",
  );
  const sigs = NIX_NARINFO_DEP + "Sig: a:1\nSig: b:2\n";
  assert.equal(parseNarInfo(sigs, { maxSignatures: 3 }).sigs.length, 3);
  assertFormatError(
    () => parseNarInfo(sigs, { maxSignatures: 2 }),
    "Cannot parse narinfo line 12: more than 2 signatures",
  );
  assertFormatError(
    () => parseNarInfo(Uint8Array.from([0x53, 0xff, 0x0a])),
    "Cannot parse narinfo: not valid UTF-8",
  );
});

Deno.test("narinfo: formatting validates, so no value can inject a line", () => {
  const bad: [Partial<NarInfo>, RegExp][] = [
    [{ url: "nar/x\nStorePath: /nix/store/evil" }, /invalid URL/],
    [{ compression: "" }, /invalid Compression '': empty/],
    [{ storePath: "/nix/store/x" }, /invalid StorePath/],
    [{ narHash: "sha256:xyz" }, /invalid NarHash/],
    [{ fileHash: "sha1:143xibwh31h9bvxzalr0sjvbbvpa6ffs" }, /invalid FileHash/],
    [{ fileSize: -1 }, /invalid FileSize/],
    [{ fileSize: 1.5 }, /invalid FileSize/],
    [{ narSize: 0 }, /invalid NarSize/],
    [{ references: ["x y"] }, /invalid reference/],
    [{ deriver: "unknown-deriver" }, /invalid Deriver/],
    [{ sigs: ["a:1\nCA: x"] }, /invalid Sig/],
    [{ ca: "fixed:r:sha256:x" }, /invalid CA/],
  ];
  for (const [patch, pattern] of bad) {
    assertFormatError(() => formatNarInfo({ ...TOP, ...patch }), pattern);
  }
  // Unsorted input is written as Nix writes it: sorted, unique, nix32 hashes.
  const text = formatNarInfo({
    ...TOP,
    narHash: "sha256-IdG8iH0NmSWAHx2mXyya92OWeZ7BobIWubKWaWpbtNI=",
    references: [...TOP.references].reverse(),
  });
  assert.equal(text, NIX_NARINFO_TOP);
  // Optional fields are left out when absent.
  assert.equal(
    formatNarInfo({
      storePath: TOP.storePath,
      url: "nar/a.nar",
      compression: "none",
      narHash: TOP.narHash,
      narSize: 1,
      references: [],
      sigs: [],
    }),
    `StorePath: ${TOP.storePath}\nURL: nar/a.nar\nCompression: none\nNarHash: ${TOP.narHash}\n` +
      "NarSize: 1\nReferences: \n",
  );
});

Deno.test({
  name: "narinfo: round-trips the narinfos `nix copy --to file://` writes, matching path-info",
  ignore: !HAVE_NIX,
  fn: async () => {
    const dir = await Deno.makeTempDir({ prefix: "arca-narinfo-test-" });
    const env = nixEnv();
    try {
      const tag = crypto.randomUUID().slice(0, 8);
      // buildFixture's script is a plain string, so it cannot refer to another path; this
      // expression interpolates `dep` to make a real reference.
      const expr = join(dir, "fixture.nix");
      await Deno.writeTextFile(
        expr,
        `let
          sh = script: name: derivation {
            inherit name; system = builtins.currentSystem; builder = "/bin/sh";
            args = [ "-c" ("export PATH=/bin:/usr/bin; " + script) ];
          };
          dep = sh "echo dep > $out" "arca-narinfo-dep-${tag}";
        in sh "mkdir -p $out/d; echo \${dep} > $out/d/ref; ln -s $out/d/ref $out/self; : > $out/e"
          "arca-narinfo-top-${tag}"`,
      );
      const top = (await runNix("nix-build", ["--no-out-link", expr], { env })).trim();
      const [{ references }] = await pathInfo([top], { env });
      const dep = references.find((r) => r.endsWith(`-arca-narinfo-dep-${tag}`))!;
      assert.ok(dep, "the fixture refers to its dependency");
      const src = join(dir, "src");
      await Deno.mkdir(src);
      await Deno.writeTextFile(join(src, "data"), "content-addressed " + tag);
      const ca = (await runNix("nix-store", ["--add", src], { env })).trim();
      for (const compression of ["xz", "zstd", "none"]) {
        const cache = join(dir, `cache-${compression}`);
        await runNix("nix", [
          "copy",
          "--to",
          `file://${cache}?compression=${compression}`,
          top,
          ca,
        ], { env });
        const infos = await pathInfo([top, dep, ca], { env });
        for (const expected of infos) {
          const hashPart = expected.path.slice("/nix/store/".length, "/nix/store/".length + 32);
          const text = await Deno.readTextFile(join(cache, `${hashPart}.narinfo`));
          const info = parseNarInfo(text);
          assert.equal(formatNarInfo(info), text);
          assert.equal(info.storePath, expected.path);
          assert.equal(info.compression, compression);
          assert.equal(info.narHash, normalizeNixHash(expected.narHash));
          assert.equal(info.narSize, expected.narSize);
          assert.deepEqual(narInfoReferencePaths(info), [...expected.references].sort());
          assert.equal(
            info.deriver && `/nix/store/${info.deriver}`,
            expected.deriver,
          );
          assert.equal(info.ca, expected.ca);
          const nar = await Deno.stat(join(cache, info.url));
          assert.equal(nar.size, info.fileSize);
        }
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
      await Deno.remove(env.XDG_CACHE_HOME, { recursive: true });
    }
  },
});
