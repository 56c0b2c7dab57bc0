/**
 * Several processes on one metadata store: two real `deno run` writer processes (this
 * file, run with `writer` arguments) each register 500 paths of their own and keep
 * replacing a few shared paths, while the test process reads, lists and looks up
 * FileHashes. At the end every path is there, each shared path is indexed under the
 * FileHash of the version that won and only that one, and no `database is locked` (or any
 * other error) escaped in any process. Run against both backends.
 */

import assert from "node:assert/strict";
import {
  type MetadataBackend,
  type MetadataStore,
  openMetadata,
} from "../../src/cache/metadata.ts";
import type { NarInfo } from "../../src/cache/narinfo.ts";
import { testHash, testHashPart, testNarInfo } from "./metadata_contract.ts";

const PER_WRITER = 500;
const SHARED = 10;
const WRITERS = 2;
/** Upper bound on the whole exchange; the writers are killed after it. */
const DEADLINE_MS = 180_000;

function ownInfo(writer: number, i: number): NarInfo {
  return testNarInfo(`w${writer}-${i}`, {
    references: i > 0 ? [`${testHashPart(`w${writer}-${i - 1}`)}-w${writer}-${i - 1}`] : [],
  });
}

function sharedInfo(writer: number, k: number): NarInfo {
  const fileHash = testHash(`shared-${k}-by-${writer}`);
  return testNarInfo(`shared-${k}`, {
    fileHash,
    url: `nar/${fileHash.slice(7)}.nar.zst`,
  });
}

/** The writer process: registers its paths, replacing a shared one every 25 writes. */
async function writerMain(args: string[]): Promise<void> {
  const [cacheDir, backend, writerText] = args;
  const writer = Number(writerText);
  const store = await openMetadata(cacheDir, backend as MetadataBackend);
  try {
    for (let i = 0; i < PER_WRITER; i++) {
      await store.putPath({ narInfo: ownInfo(writer, i), registeredAt: i });
      const back = await store.getPath(testHashPart(`w${writer}-${i}`));
      if (back?.registeredAt !== i) throw new Error(`Writer ${writer} lost its record ${i}`);
      if (i % 25 === 0) {
        const k = (i / 25) % SHARED;
        await store.putPath({ narInfo: sharedInfo(writer, k), registeredAt: writer });
      }
    }
  } finally {
    store.close();
  }
  console.log(JSON.stringify({ writer, written: PER_WRITER }));
}

if (import.meta.main && Deno.args[0] === "writer") {
  await writerMain(Deno.args.slice(1));
}

interface ReaderStats {
  lists: number;
  reads: number;
  maxListed: number;
}

/** Reads while `running`: every listing sorted, every record readable, no errors. */
async function readWhileWriting(
  store: MetadataStore,
  running: () => boolean,
): Promise<ReaderStats> {
  const stats: ReaderStats = { lists: 0, reads: 0, maxListed: 0 };
  let round = 0;
  while (running()) {
    round++;
    let previous = "";
    let count = 0;
    for await (const record of store.listPaths()) {
      const storePath = record.narInfo.storePath;
      assert.ok(storePath > previous, `listing out of order: ${previous} then ${storePath}`);
      previous = storePath;
      count++;
    }
    stats.lists++;
    stats.maxListed = Math.max(stats.maxListed, count);
    for (let writer = 0; writer < WRITERS; writer++) {
      const i = (round * 37) % PER_WRITER;
      const record = await store.getPath(testHashPart(`w${writer}-${i}`));
      if (record) assert.deepEqual(record.narInfo.storePath, ownInfo(writer, i).storePath);
      await store.findByFileHash(testHash(`file:w${writer}-${i}`));
      stats.reads++;
    }
  }
  return stats;
}

async function runConcurrently(backend: MetadataBackend): Promise<void> {
  const cacheDir = await Deno.makeTempDir({ prefix: `arca-concurrency-${backend}-` });
  const deadline = new AbortController();
  const timer = setTimeout(() => deadline.abort(), DEADLINE_MS);
  const children: Deno.ChildProcess[] = [];
  const outputs: Promise<Deno.CommandOutput>[] = [];
  let finished = 0;
  let store: MetadataStore | undefined;
  try {
    for (let writer = 0; writer < WRITERS; writer++) {
      const child = new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "--unstable-kv",
          "-A",
          import.meta.filename!,
          "writer",
          cacheDir,
          backend,
          String(writer),
        ],
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
        signal: deadline.signal,
      }).spawn();
      children.push(child);
      outputs.push(child.output().finally(() => finished++));
    }
    const reader = await openMetadata(cacheDir, backend);
    store = reader;
    const stats = await readWhileWriting(reader, () => finished < children.length);
    const results = await Promise.all(outputs);
    assert.ok(!deadline.signal.aborted, `writers did not finish within ${DEADLINE_MS} ms`);
    for (const [writer, result] of results.entries()) {
      const stderr = new TextDecoder().decode(result.stderr);
      assert.doesNotMatch(stderr, /database is locked|busy/i);
      assert.equal(result.code, 0, `writer ${writer} failed: ${stderr}`);
      assert.deepEqual(JSON.parse(new TextDecoder().decode(result.stdout)), {
        writer,
        written: PER_WRITER,
      });
    }
    assert.ok(stats.lists > 0);

    // Everything is there, complete and sorted.
    const listed: string[] = [];
    for await (const record of reader.listPaths()) listed.push(record.narInfo.storePath);
    const expected: string[] = [];
    for (let writer = 0; writer < WRITERS; writer++) {
      for (let i = 0; i < PER_WRITER; i++) expected.push(ownInfo(writer, i).storePath);
    }
    for (let k = 0; k < SHARED; k++) expected.push(sharedInfo(0, k).storePath);
    assert.equal(listed.length, WRITERS * PER_WRITER + SHARED);
    assert.deepEqual(listed, expected.sort());

    for (let writer = 0; writer < WRITERS; writer++) {
      for (let i = 0; i < PER_WRITER; i++) {
        const hash = testHashPart(`w${writer}-${i}`);
        const record = await reader.getPath(hash);
        assert.equal(record?.registeredAt, i);
        assert.equal(await reader.findByFileHash(testHash(`file:w${writer}-${i}`)), hash);
      }
    }
    // Each shared path: the version that won is indexed, the one that lost is not.
    for (let k = 0; k < SHARED; k++) {
      const hash = testHashPart(`shared-${k}`);
      const record = await reader.getPath(hash);
      const winner = record!.registeredAt;
      assert.equal(record!.narInfo.fileHash, sharedInfo(winner, k).fileHash);
      assert.equal(await reader.findByFileHash(sharedInfo(winner, k).fileHash!), hash);
      assert.equal(await reader.findByFileHash(sharedInfo(1 - winner, k).fileHash!), null);
    }
  } finally {
    clearTimeout(timer);
    store?.close();
    for (const child of children) {
      try {
        child.kill("SIGKILL");
      } catch {
        // Already exited.
      }
    }
    await Promise.allSettled(outputs);
    await Deno.remove(cacheDir, { recursive: true });
  }
}

Deno.test("kv metadata: two writer processes and a reader share one store", async () => {
  await runConcurrently("kv");
});

Deno.test("filesystem metadata: two writer processes and a reader share one store", async () => {
  await runConcurrently("filesystem");
});
