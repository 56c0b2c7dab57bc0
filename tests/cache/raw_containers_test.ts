import assert from "node:assert/strict";
import { decompressStream } from "../../src/cache/decompress_stream.ts";
import {
  rawXzStream,
  rawXzStreamSize,
  rawZstdFrame,
  rawZstdFrameSize,
} from "../../src/cache/raw_containers.ts";

/** `size` bytes of a fixed pattern. */
function pattern(size: number): Uint8Array {
  const bytes = new Uint8Array(size);
  for (let i = 0; i < size; i++) bytes[i] = (i * 7919 + (i >> 11)) & 0xff;
  return bytes;
}

/** `bytes` through the command `tool -dc`. */
async function throughTool(tool: string, bytes: Uint8Array): Promise<Uint8Array> {
  const child = new Deno.Command(tool, {
    args: ["-dc"],
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const output = child.output();
  const writer = child.stdin.getWriter();
  await writer.write(bytes);
  await writer.close();
  const result = await output;
  assert.ok(result.success, new TextDecoder().decode(result.stderr));
  return result.stdout;
}

const containers = [
  { name: "zstd", wrap: rawZstdFrame, size: rawZstdFrameSize },
  { name: "xz", wrap: rawXzStream, size: rawXzStreamSize },
] as const;

// Around the block sizes (64 KiB LZMA2 chunks, 128 KiB zstd blocks) and an empty input.
const SIZES = [0, 1, 65_535, 65_536, 65_537, 131_071, 131_072, 131_073, 1_000_003];

for (const { name, wrap, size } of containers) {
  Deno.test(`raw ${name}: any split of the input, its announced size, read by the ${name} tool and by arca`, async () => {
    for (const length of SIZES) {
      const data = pattern(length);
      const third = Math.floor(length / 3);
      const pieces = [
        data.subarray(0, third),
        data.subarray(third, third + 7),
        data.subarray(third + 7),
      ];
      const wrapped = new Uint8Array(
        await new Response(ReadableStream.from(pieces).pipeThrough(wrap(length))).arrayBuffer(),
      );
      assert.equal(wrapped.length, size(length), `${name} ${length}: length`);
      assert.deepEqual(await throughTool(name, wrapped), data, `${name} ${length}: tool`);
      const ours = ReadableStream.from([wrapped]).pipeThrough(decompressStream(name));
      assert.deepEqual(
        new Uint8Array(await new Response(ours).arrayBuffer()),
        data,
        `${name} ${length}: decompressStream`,
      );
    }
  });

  Deno.test(`raw ${name}: an input longer or shorter than announced errors`, async () => {
    const data = pattern(100_000);
    const longer = ReadableStream.from([data]).pipeThrough(wrap(99_999));
    await assert.rejects(new Response(longer).arrayBuffer(), /longer than its NarSize/);
    const shorter = ReadableStream.from([data]).pipeThrough(wrap(100_001));
    await assert.rejects(new Response(shorter).arrayBuffer(), /shorter than its NarSize/);
  });
}
