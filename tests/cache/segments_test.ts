/**
 * Segment filters: `nixpkgs` needs a VALID cache.nixos.org-1 signature (real narinfos
 * from cache.nixos.org as vectors), `custom` is everything else, the first match wins and
 * an explicit segment must exist.
 * @module
 */

import assert from "node:assert/strict";
import { parseNarInfo } from "../../src/cache/narinfo.ts";
import {
  findSegment,
  matchesFilter,
  segmentFor,
  signedByNixpkgs,
} from "../../src/cache/segments.ts";
import { generateSecretKey, signNarInfo } from "../../src/cache/signing.ts";
import type { SegmentConfig } from "../../src/config.ts";
import { UsageError } from "../../src/errors.ts";

// Served by cache.nixos.org (published in nixpkgs' and Nix's own documentation and tests).
const HELLO = parseNarInfo(`StorePath: /nix/store/gdh8165b7rg4y53v64chjys7mbbw89f9-hello-2.10
URL: nar/0i6ardx43rdg24ab1nc3mq7f5ykyiamymh1v37gxdv5xh5cm0cmb.nar.xz
Compression: xz
FileHash: sha256:0i6ardx43rdg24ab1nc3mq7f5ykyiamymh1v37gxdv5xh5cm0cmb
FileSize: 40360
NarHash: sha256:1ddv0iqq47j0awyw7a8dmm8bz71c6ifrliq53kmmsfzjxf3rwvb8
NarSize: 197528
References: 7gx4kiv5m0i7d7qkixq2cwzbr10lvxwc-glibc-2.27 gdh8165b7rg4y53v64chjys7mbbw89f9-hello-2.10
Deriver: 5sj6fdfym58sdaf3r5p87v4l8sj2zlvn-hello-2.10.drv
Sig: cache.nixos.org-1:K0thQEG60rzAK8ZS9f1whb7eRlIshlMDJAm7xvX1oF284H+PTqlicv/wGW6BIj+wWWONHvUZ2MYc+KDArekjDA==
`);
const CURL = parseNarInfo(`StorePath: /nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhwjr-curl-7.82.0-bin
URL: nar/05ra3y72i3qjri7xskf9qj8kb29r6naqy1sqpbs3azi3xcigmj56.nar.xz
Compression: xz
FileHash: sha256:05ra3y72i3qjri7xskf9qj8kb29r6naqy1sqpbs3azi3xcigmj56
FileSize: 68852
NarHash: sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0
NarSize: 196040
References: 0jqd0rlxzra1rs38rdxl43yh6rxchgc6-curl-7.82.0 6w8g7njm4mck5dmjxws0z1xnrxvl81xa-glibc-2.34-115 j5jxw3iy7bbz4a57fh9g2xm2gxmyal8h-zlib-1.2.12 yxvjs9drzsphm9pcf42a4byzj1kb9m7k-openssl-1.1.1n
Deriver: 5rwxzi7pal3qhpsyfc16gzkh939q1np6-curl-7.82.0.drv
Sig: cache.nixos.org-1:TsTTb3WGTZKphvYdBHXwo6weVILmTytUjLB+vcX89fOjjRicCHmKA4RCPMVLkj6TMJ4GMX3HPVWRdD1hkeKZBQ==
`);

const SEGMENTS: SegmentConfig[] = [
  { name: "nixpkgs", filter: "nixpkgs" },
  { name: "team", filter: "custom" },
  { name: "rest", filter: "all" },
];

Deno.test("segments: real cache.nixos.org signatures pass the nixpkgs filter", () => {
  for (const info of [HELLO, CURL]) {
    assert.ok(signedByNixpkgs(info), info.storePath);
    assert.ok(matchesFilter("nixpkgs", info));
    assert.ok(!matchesFilter("custom", info));
    assert.ok(matchesFilter("all", info));
    assert.equal(segmentFor(SEGMENTS, info), "nixpkgs");
  }
});

Deno.test("segments: a forged or misplaced cache.nixos.org-1 signature is custom", () => {
  const impostor = generateSecretKey("cache.nixos.org-1");
  const forged = { ...HELLO, sigs: [signNarInfo(HELLO, impostor)] };
  assert.ok(!signedByNixpkgs(forged), "signed by another key under the same name");
  // A real signature copied onto another path proves nothing about that path.
  const moved = { ...CURL, sigs: HELLO.sigs };
  assert.ok(!signedByNixpkgs(moved));
  // Another field changed: the signature no longer covers it.
  assert.ok(!signedByNixpkgs({ ...HELLO, narSize: HELLO.narSize + 1 }));
  assert.ok(!signedByNixpkgs({ ...HELLO, sigs: [] }));
  assert.ok(!signedByNixpkgs({ ...HELLO, sigs: ["cache.nixos.org-1:garbage"] }));
  for (const info of [forged, moved]) assert.equal(segmentFor(SEGMENTS, info), "team");
  // Junk appended next to a valid signature does not hurt it.
  assert.ok(signedByNixpkgs({ ...HELLO, sigs: [...HELLO.sigs, "x-1:AAAA"] }));
});

Deno.test("segments: the first match wins, an override must exist, none may match", () => {
  const custom = { ...HELLO, sigs: [] };
  assert.equal(segmentFor(SEGMENTS, custom), "team");
  assert.equal(segmentFor([{ name: "u", filter: "all" }], custom), "u");
  assert.equal(segmentFor([{ name: "only-nixpkgs", filter: "nixpkgs" }], custom), undefined);
  assert.equal(segmentFor(SEGMENTS, HELLO, "rest"), "rest");
  assert.throws(() => segmentFor(SEGMENTS, HELLO, "nope"), UsageError);
  assert.throws(() => findSegment(SEGMENTS, "nope"), /Unknown segment 'nope'.*nixpkgs, team, rest/);
  assert.equal(segmentFor([], custom), undefined);
});
