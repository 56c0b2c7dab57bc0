/**
 * End to end, pull-through from an upstream cache made the way real ones are made:
 * `nix copy --to file://…?secret-key=…` (key from `nix key generate-secret`), served by a
 * separate static file server process on 127.0.0.1 (tests/helpers/static_server.ts), and
 * real `arca serve --upstream …` and `arca verify` processes, with the real `nix copy --from`
 * as the client and oracle (DESIGN.md §5).
 * @module
 */

import assert from "node:assert/strict";
import { parseNarInfo } from "../../src/cache/narinfo.ts";
import {
  arcaOk,
  type ArcaProcess,
  freePort,
  makeArcaHome,
  runArca,
  startArcaProcess,
} from "../helpers/arca.ts";
import { addToStore, HAVE_NIX, nixEnv, pathInfo, runNix } from "../helpers/nix.ts";
import { startStaticServer, type StaticServer } from "../helpers/static_server.ts";
import { buildFixtures, pseudoRandomBytes } from "./fixtures.ts";

const HASH_START = "/nix/store/".length;

function hashPartOf(storePath: string): string {
  return storePath.slice(HASH_START, HASH_START + 32);
}

/** What must survive a trip through arca. */
function essentials(
  info: { narHash: string; narSize: number; references: string[]; deriver?: string; ca?: string },
) {
  return {
    narHash: info.narHash,
    narSize: info.narSize,
    references: [...info.references].sort(),
    deriver: info.deriver ?? null,
    ca: info.ca ?? null,
  };
}

/** `arca serve` on a free port with `args`, its stderr kept. */
async function serve(
  args: string[],
  env: Record<string, string>,
): Promise<ArcaProcess & { url: string }> {
  const port = freePort();
  const process = await startArcaProcess(["serve", "--bind", `127.0.0.1:${port}`, ...args], {
    env,
    ready: /Serving /,
  });
  return Object.assign(process, { url: `http://127.0.0.1:${port}` });
}

/** Polls `check` every 200 ms until it is true, failing after `ms` (a bound, not a timing). */
async function until(ms: number, what: string, check: () => Promise<boolean>): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

/** Rejects when `promise` takes longer than `ms` (proves "does not hang"). */
async function within<T>(ms: number, what: string, promise: Promise<T>): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} took longer than ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([promise, late]);
  } finally {
    clearTimeout(timer);
  }
}

async function nixCopy(
  from: string,
  to: string,
  key: string,
  paths: string[],
  env: Record<string, string> = nixEnv(),
) {
  return await new Deno.Command("nix", {
    args: ["copy", "--from", from, "--to", to, "--option", "trusted-public-keys", key, ...paths],
    env,
    stdout: "piped",
    stderr: "piped",
  }).output();
}

async function generateKey(dir: string, name: string): Promise<{ file: string; pub: string }> {
  const secret = await runNix("nix", ["key", "generate-secret", "--key-name", name]);
  const file = `${dir}/${name}.secret`;
  await Deno.writeTextFile(file, secret);
  const pub = await runNix("nix", ["key", "convert-secret-to-public"], {
    stdin: new TextEncoder().encode(secret),
  });
  return { file, pub: pub.trim() };
}

async function copyToFileCache(dir: string, paths: string[], params: string): Promise<void> {
  await runNix("nix", ["copy", "--to", `file://${dir}?${params}`, ...paths]);
}

/** One regular chunk file of the cache (any), to damage. */
async function someChunkFile(cacheDir: string): Promise<string> {
  const root = `${cacheDir}/objects/chunks`;
  for await (const sub of Deno.readDir(root)) {
    if (!sub.isDirectory) continue;
    for await (const file of Deno.readDir(`${root}/${sub.name}`)) {
      if (file.isFile && file.name.endsWith(".zst")) return `${root}/${sub.name}/${file.name}`;
    }
  }
  throw new Error(`no chunk file under ${root}`);
}

Deno.test({
  name:
    "e2e upstream: nix copy --from arca pulls a closure through, arca keeps it (upstream's signatures), existence checks fetch no NAR, verify --repair refetches",
  ignore: !HAVE_NIX,
  async fn() {
    const home = await makeArcaHome();
    const servers: (StaticServer | ArcaProcess)[] = [];
    try {
      const fixtures = await buildFixtures();
      const wanted = [fixtures.top, fixtures.caSmall];
      const all = [fixtures.dep, ...wanted];
      const key = await generateKey(home.dir, "upstream-e2e-1");
      const upstreamDir = `${home.dir}/upstream`;
      await copyToFileCache(upstreamDir, wanted, `secret-key=${key.file}&compression=xz`);
      const upstream = await startStaticServer(upstreamDir);
      servers.push(upstream);
      const global = ["--cache-dir", home.cacheDir];
      const arca = await serve([
        ...global,
        "--upstream",
        upstream.url,
        "--trusted-public-key",
        key.pub,
        "--upstream-timeout",
        "5s",
      ], home.env);
      servers.push(arca);

      // Existence checks, as `nix copy` and `nix path-info` make them: narinfos only.
      const fakes = Array.from({ length: 997 }, (_, i) => {
        const bytes = pseudoRandomBytes(20, i + 1);
        const alphabet = "0123456789abcdfghijklmnpqrsvwxyz";
        return Array.from({ length: 32 }, (_, j) => alphabet[bytes[j % 20] % 32]).join("");
      });
      const hashes = [...fakes, ...all.map(hashPartOf)];
      const statuses: number[] = [];
      for (let i = 0; i < hashes.length; i += 50) {
        statuses.push(
          ...await Promise.all(
            hashes.slice(i, i + 50).map(async (hash, j) => {
              const response = await fetch(`${arca.url}/${hash}.narinfo`, {
                method: j % 2 ? "HEAD" : "GET",
              });
              await response.body?.cancel();
              return response.status;
            }),
          ),
        );
      }
      assert.deepEqual(statuses.slice(-3), [200, 200, 200]);
      assert.equal(statuses.filter((status) => status === 404).length, 997);
      const infos = JSON.parse(
        await runNix("nix", ["path-info", "--json", "--store", arca.url, ...all]),
      );
      assert.equal(infos.length, 3);
      assert.equal(await upstream.countMatching(/^\/nar\//), 0, "existence checks fetch no NAR");

      // Substitution through arca: the upstream's xz files are passed through as they are.
      for (const path of all) {
        const info = parseNarInfo(
          await (await fetch(`${arca.url}/${hashPartOf(path)}.narinfo`)).text(),
        );
        const upstreamInfo = parseNarInfo(
          await Deno.readTextFile(`${upstreamDir}/${hashPartOf(path)}.narinfo`),
        );
        assert.equal(info.compression, "xz", path);
        assert.equal(info.fileHash, upstreamInfo.fileHash, path);
        assert.match(info.url, /^nar\/[0-9a-z]{52}\.nar\.xz$/);
      }
      const store2 = `${home.dir}/store2`;
      const keptCache = nixEnv();
      const copied = await nixCopy(arca.url, store2, key.pub, wanted, keptCache);
      assert.ok(copied.success, new TextDecoder().decode(copied.stderr));
      const source = await pathInfo(all);
      const got = await pathInfo(all, { store: store2 });
      assert.deepEqual(got.map(essentials), source.map(essentials));
      for (const info of got) {
        const upstreamInfo = parseNarInfo(
          await Deno.readTextFile(`${upstreamDir}/${hashPartOf(info.path)}.narinfo`),
        );
        assert.deepEqual([...(info.signatures ?? [])].sort(), upstreamInfo.sigs, info.path);
      }

      // arca holds the closure now, with the upstream's signatures, audited as Fetch.
      await until(20_000, "arca list shows the closure", async () => {
        const listed = (await arcaOk([...global, "list"], { env: home.env })).trim().split("\n");
        return all.every((path) => listed.includes(path));
      });
      const records = JSON.parse(await arcaOk([...global, "list", "--json"], { env: home.env }));
      for (const record of records) {
        const upstreamInfo = parseNarInfo(
          await Deno.readTextFile(`${upstreamDir}/${hashPartOf(record.storePath)}.narinfo`),
        );
        assert.deepEqual(record.signatures, upstreamInfo.sigs, record.storePath);
      }
      const audit = await arcaOk([...global, "audit", "--json"], { env: home.env });
      const fetched = audit.trim().split("\n").map((line) => JSON.parse(line))
        .flat().filter((event: { type: string }) => event.type === "Fetch");
      assert.deepEqual(fetched.map((e: { storePath: string }) => e.storePath).sort(), all.sort());
      assert.equal(await upstream.countMatching(/^\/nar\//), 3, "each NAR fetched once");

      // Nix kept the narinfos naming the upstream's xz files: their URLs now serve arca's
      // own (zstd) copies as xz, and Nix installs them.
      const storeKept = `${home.dir}/store-kept`;
      const kept = await nixCopy(arca.url, storeKept, key.pub, wanted, keptCache);
      assert.ok(kept.success, new TextDecoder().decode(kept.stderr));
      const gotKept = await pathInfo(all, { store: storeKept });
      assert.deepEqual(gotKept.map(essentials), source.map(essentials));
      assert.equal(await upstream.countMatching(/^\/nar\//), 3, "served from arca's copies");

      // A chunk damaged on disk: verify finds it, --repair refetches from the upstream.
      const chunk = await someChunkFile(home.cacheDir);
      const bytes = await Deno.readFile(chunk);
      bytes[Math.floor(bytes.length / 2)] ^= 0xff;
      await Deno.writeFile(chunk, bytes);
      const broken = await runArca([...global, "verify"], { env: home.env });
      assert.equal(broken.code, 1, broken.stdout + broken.stderr);
      assert.match(broken.stdout, /damaged chunk/);
      const repair = await runArca([
        ...global,
        "verify",
        "--repair",
        "--upstream",
        upstream.url,
        "--trusted-public-key",
        key.pub,
      ], { env: home.env });
      assert.equal(repair.code, 0, repair.stdout + repair.stderr);
      assert.match(repair.stdout, new RegExp(`refetched /nix/store/\\S+ .* from ${upstream.url}`));
      assert.match(repair.stdout, /\(\d+ refetched, 0 removed\)/);
      const clean = await runArca([...global, "verify"], { env: home.env });
      assert.equal(clean.code, 0, clean.stdout + clean.stderr);

      // With the upstream stopped, a fresh store still gets everything from arca.
      await upstream.stop();
      const store3 = `${home.dir}/store3`;
      const again = await nixCopy(arca.url, store3, key.pub, wanted);
      assert.ok(again.success, new TextDecoder().decode(again.stderr));
      const got3 = await pathInfo(all, { store: store3 });
      assert.deepEqual(got3.map(essentials), source.map(essentials));
    } finally {
      for (const server of servers) await server.stop();
      await home.cleanup();
    }
  },
});

Deno.test({
  name:
    "e2e upstream: a hanging upstream is skipped after its timeout; unsigned and tampered paths are refused and never stored",
  ignore: !HAVE_NIX,
  async fn() {
    const home = await makeArcaHome();
    const servers: (StaticServer | ArcaProcess)[] = [];
    try {
      const fixtures = await buildFixtures();
      const key = await generateKey(home.dir, "upstream-e2e-2");
      const good = `${home.dir}/good`;
      await copyToFileCache(good, [fixtures.top], `secret-key=${key.file}&compression=zstd`);
      // An unsigned path, and a path whose NAR was altered after signing.
      const src = `${home.dir}/src`;
      await Deno.mkdir(`${src}/arca-e2e-upstream-unsigned`, { recursive: true });
      await Deno.writeTextFile(`${src}/arca-e2e-upstream-unsigned/data`, "unsigned\n");
      const unsignedPath = await addToStore(`${src}/arca-e2e-upstream-unsigned`);
      await Deno.mkdir(`${src}/arca-e2e-upstream-tampered`, { recursive: true });
      await Deno.writeTextFile(
        `${src}/arca-e2e-upstream-tampered/data`,
        "tampered\n".repeat(100_000),
      );
      const tamperedPath = await addToStore(`${src}/arca-e2e-upstream-tampered`);
      const bad = `${home.dir}/bad`;
      await copyToFileCache(bad, [unsignedPath], "compression=xz");
      await copyToFileCache(bad, [tamperedPath], `secret-key=${key.file}&compression=none`);
      const tamperedInfo = parseNarInfo(
        await Deno.readTextFile(`${bad}/${hashPartOf(tamperedPath)}.narinfo`),
      );
      const nar = await Deno.readFile(`${bad}/${tamperedInfo.url}`);
      nar[Math.floor(nar.length / 2)] ^= 0x01;
      await Deno.writeFile(`${bad}/${tamperedInfo.url}`, nar);

      const hanging = await startStaticServer(good);
      servers.push(hanging);
      await hanging.setMode({ hang: "." });
      const badServer = await startStaticServer(bad);
      servers.push(badServer);
      const goodServer = await startStaticServer(good);
      servers.push(goodServer);
      const global = ["--cache-dir", home.cacheDir];
      const arca = await serve([
        ...global,
        "--upstream",
        hanging.url,
        "--upstream",
        badServer.url,
        "--upstream",
        goodServer.url,
        "--trusted-public-key",
        key.pub,
        "--upstream-timeout",
        "1s",
      ], home.env);
      servers.push(arca);

      // The hanging upstream costs one timeout, then the next ones answer.
      const first = await within(
        20_000,
        "a narinfo behind a hanging upstream",
        fetch(`${arca.url}/${hashPartOf(fixtures.top)}.narinfo`),
      );
      assert.equal(first.status, 200);
      await first.body?.cancel();
      const missing = await within(
        20_000,
        "a missing narinfo",
        fetch(`${arca.url}/${"0".repeat(32)}.narinfo`),
      );
      assert.equal(missing.status, 404);
      await missing.body?.cancel();
      const copied = await within(
        60_000,
        "nix copy behind a hanging upstream",
        nixCopy(arca.url, `${home.dir}/store2`, key.pub, [fixtures.top]),
      );
      assert.ok(copied.success, new TextDecoder().decode(copied.stderr));
      assert.equal(await hanging.countMatching(/./), 1, "skipped once it timed out");

      // Unsigned: refused (404); Nix gets nothing.
      const unsigned = await fetch(`${arca.url}/${hashPartOf(unsignedPath)}.narinfo`);
      assert.equal(unsigned.status, 404);
      await unsigned.body?.cancel();
      // Tampered: the NAR never arrives whole, and nothing is stored.
      const tampered = await nixCopy(arca.url, `${home.dir}/store3`, key.pub, [tamperedPath]);
      assert.ok(!tampered.success, "nix copy of a tampered NAR must fail");
      await until(
        20_000,
        "the failed import is logged",
        () =>
          Promise.resolve(
            /not imported: .* hashes to sha256:\w+, its NarHash is sha256:\w+: refused/.test(
              arca.stderr(),
            ),
          ),
      );
      // What Nix got is imported once no client has read a spool for a moment.
      let listed: string[] = [];
      await until(20_000, "the copied closure is imported", async () => {
        listed = (await arcaOk([...global, "list"], { env: home.env })).trim().split("\n");
        return listed.includes(fixtures.top);
      });
      assert.ok(!listed.includes(tamperedPath), "the tampered path is not stored");
      assert.ok(!listed.includes(unsignedPath), "the unsigned path is not stored");
      assert.ok(listed.includes(fixtures.top), listed.join("\n"));
      assert.match(arca.stderr(), /refused: it is not signed/);
    } finally {
      for (const server of servers) await server.stop();
      await home.cleanup();
    }
  },
});

Deno.test({
  name: "e2e upstream: bad --upstream and --trusted-public-key values are usage errors",
  ignore: !HAVE_NIX,
  async fn() {
    const home = await makeArcaHome();
    try {
      const key = "good-1:" + "A".repeat(43) + "=";
      const cases: [string[], RegExp][] = [
        [["--upstream", "http://127.0.0.1:1"], /--upstream needs --trusted-public-key/],
        [
          ["--upstream", "ftp://example", "--trusted-public-key", key],
          /Invalid upstream URL "ftp:\/\/example": expected http:\/\/ or https:\/\//,
        ],
        [
          ["--upstream", "http://127.0.0.1:1", "--trusted-public-key", "nope"],
          /Invalid key in --trusted-public-key "nope"/,
        ],
        [["--trusted-public-key", key], /--trusted-public-key needs --upstream/],
        [
          [
            "--upstream",
            "http://127.0.0.1:1",
            "--trusted-public-key",
            key,
            "--upstream-timeout",
            "x",
          ],
          /must be a duration/,
        ],
      ];
      for (const [args, pattern] of cases) {
        const result = await runArca(["--cache-dir", home.cacheDir, "serve", ...args], {
          env: home.env,
        });
        assert.equal(result.code, 2, `${args.join(" ")}: ${result.stderr}`);
        assert.match(result.stderr, pattern);
        assert.doesNotMatch(result.stderr, /\n\s+at /, "no stack trace");
      }
    } finally {
      await home.cleanup();
    }
  },
});
