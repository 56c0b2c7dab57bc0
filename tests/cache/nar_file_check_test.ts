import assert from "node:assert/strict";
import { compressChunk } from "../../src/cache/compression.ts";
import { formatNixHash, sha256 } from "../../src/cache/hash.ts";
import { encodeNar } from "../../src/cache/nar.ts";
import { checkNarFile, WORKER_CHECK_BYTES } from "../../src/cache/nar_file_check.ts";
import { FormatError, IntegrityError } from "../../src/errors.ts";
import { pseudoRandomBytes } from "../helpers/cache_fixture.ts";

/** A NAR of a directory with a random file and a repetitive one, `size` bytes of contents. */
function narOf(size: number): Uint8Array {
  const text = new TextEncoder().encode("arca ".repeat(Math.ceil(size / 10))).subarray(0, size / 2);
  return encodeNar({
    type: "directory",
    entries: {
      "random": { type: "regular", contents: pseudoRandomBytes(size / 2, 7) },
      "text": { type: "regular", executable: true, contents: text },
    },
  });
}

/** `file` through a checker, in pieces of 64 KiB (the pieces are handed over: copies). */
async function check(file: Uint8Array, compression: "zstd" | "xz" | "none", sizeHint?: number) {
  const checker = checkNarFile(compression, sizeHint);
  try {
    for (let at = 0; at < file.length; at += 65536) {
      await checker.push(file.slice(at, at + 65536));
    }
    return await checker.finish();
  } finally {
    checker.close();
  }
}

const MODES = [
  { name: "in-thread", hint: undefined },
  { name: "on a Worker", hint: WORKER_CHECK_BYTES },
] as const;

for (const { name, hint } of MODES) {
  Deno.test(`NAR file check ${name}: the file's and the NAR's hashes and sizes, in each compression`, async () => {
    const nar = narOf(6 * 1024 * 1024);
    for (const compression of ["zstd", "xz", "none"] as const) {
      const file = compression === "none" ? nar : compressChunk(nar, compression);
      const checked = await check(file, compression, hint);
      assert.deepEqual(checked, {
        fileHash: formatNixHash(sha256(file)),
        fileSize: file.length,
        narHash: formatNixHash(sha256(nar)),
        narSize: nar.length,
      }, compression);
    }
  });

  Deno.test(`NAR file check ${name}: a truncated file, garbage, and a file of no NAR are refused`, async () => {
    const refused = (error: unknown) =>
      error instanceof FormatError || error instanceof IntegrityError;
    const nar = narOf(6 * 1024 * 1024);
    const file = compressChunk(nar, "zstd");
    await assert.rejects(check(file.subarray(0, file.length - 1000), "zstd", hint), refused);
    await assert.rejects(check(pseudoRandomBytes(5_000_000, 3), "xz", hint), refused);
    const notNar = compressChunk(pseudoRandomBytes(5_000_000, 4), "zstd");
    await assert.rejects(check(notNar, "zstd", hint), refused);
    // A NAR cut short, well compressed.
    await assert.rejects(
      check(compressChunk(nar.subarray(0, nar.length - 8), "zstd"), "zstd", hint),
      FormatError,
    );
  });
}
