/**
 * The post-build spool's reader (src/cache/spool.ts) against real Nix fixtures: spooled
 * paths are imported with their runtime closures, garbage lines and paths gone from the
 * store are skipped, `.tmp.*` and foreign files are left alone, files are deleted only
 * once handled for good and kept after a transient failure, an integrity failure drops the
 * path and its dependents, and the background drainer imports what appears and stops
 * cleanly. The hook script itself is exercised in tests/e2e/post_build_hook_test.ts.
 * @module
 */

import assert from "node:assert/strict";
import { Cache } from "../../src/cache/cache.ts";
import type { MetadataBackend } from "../../src/cache/metadata.ts";
import type { LocalPathInfo } from "../../src/cache/nix.ts";
import {
  drainSpool,
  ensureSpoolDir,
  postBuildHookScript,
  startSpoolDrainer,
} from "../../src/cache/spool.ts";
import { ExternalCommandError, FormatError } from "../../src/errors.ts";
import { HAVE_NIX, pathInfo, runNix } from "../helpers/nix.ts";

/** A derivation `top` whose output references `dep`'s; `tag` makes them unique. */
function closureExpr(tag: string): string {
  return `
let
  dep = derivation {
    name = "arca-spool-dep${tag}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "export PATH=/bin:/usr/bin; mkdir $out; echo dep${tag} > $out/data; head -c 200000 /dev/zero > $out/zeros" ];
  };
in derivation {
  name = "arca-spool-top${tag}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "export PATH=/bin:/usr/bin; mkdir $out; echo \${dep} > $out/dep-path" ];
}`;
}

/** Builds the closure; returns [dep, top]. */
async function buildClosure(tag = ""): Promise<[string, string]> {
  const top = (await runNix("nix-build", ["--no-out-link", "-E", closureExpr(tag)])).trim();
  const closure = (await runNix("nix-store", ["-qR", top])).trim().split("\n");
  const dep = closure.find((path) => path.endsWith(`-arca-spool-dep${tag}`));
  assert.ok(dep, `dep in the closure of ${top}: ${closure.join(", ")}`);
  return [dep, top];
}

interface Env {
  spool: string;
  cache: Cache;
  logs: string[];
  log: (message: string) => void;
}

async function withSpool(
  backend: MetadataBackend,
  fn: (env: Env) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "arca-spool-test-" });
  const cache = await Cache.open(`${dir}/cache`, { backend });
  const logs: string[] = [];
  try {
    await fn({ spool: `${dir}/cache/spool`, cache, logs, log: (m) => logs.push(m) });
  } finally {
    cache.close();
    await Deno.remove(dir, { recursive: true });
  }
}

async function cachedPaths(cache: Cache): Promise<string[]> {
  const paths: string[] = [];
  for await (const record of cache.listPaths()) paths.push(record.narInfo.storePath);
  return paths.sort();
}

async function spoolNames(spool: string): Promise<string[]> {
  const names: string[] = [];
  for await (const entry of Deno.readDir(spool)) names.push(entry.name);
  return names.sort();
}

/** A well-formed store path that is not in the store. */
function absentPath(): string {
  const alphabet = "0123456789abcdfghijklmnpqrsvwxyz";
  const hash = Array.from(
    crypto.getRandomValues(new Uint8Array(32)),
    (b) => alphabet[b % 32],
  ).join("");
  return `/nix/store/${hash}-arca-spool-gone`;
}

for (const backend of ["kv", "filesystem"] as const) {
  Deno.test({
    name:
      `drainSpool (${backend}): imports closures, skips garbage and gone paths, deletes handled files`,
    ignore: !HAVE_NIX,
    async fn() {
      const [dep, top] = await buildClosure();
      await withSpool(backend, async ({ spool, cache, logs, log }) => {
        await ensureSpoolDir(spool);
        const gone = absentPath();
        await Deno.writeTextFile(
          `${spool}/1000-1-aaaa.paths`,
          ["# a comment", "", `  ${top}  `, "not a store path", "/nix/store/tooshort-x", top]
            .join("\n") + "\n",
        );
        await Deno.writeTextFile(`${spool}/1001-2-bbbb.paths`, `${gone}\n`);
        await Deno.writeTextFile(`${spool}/1002-3-cccc.paths`, `${dep}\n`);
        // Being written by a hook right now: must be left alone, even though it names a path.
        await Deno.writeTextFile(`${spool}/.tmp.dddd`, `${top}\n`);
        // Left over by a hook killed long ago: deleted.
        await Deno.writeTextFile(`${spool}/.tmp.eeee`, `${top}\n`);
        await Deno.utime(`${spool}/.tmp.eeee`, 0, 0);
        // Not a spool file.
        await Deno.writeTextFile(`${spool}/README`, `${top}\n`);

        const segmentQueries: string[] = [];
        const result = await drainSpool(cache, spool, {
          compression: "zstd",
          log,
          segmentOf: (info: LocalPathInfo) => {
            segmentQueries.push(info.storePath);
            return undefined;
          },
        });

        assert.deepEqual(result, {
          imported: 2,
          failed: 0,
          skipped: 3,
          removedFiles: 3,
          keptFiles: 0,
        });
        assert.deepEqual(await cachedPaths(cache), [dep, top].sort());
        assert.deepEqual(await spoolNames(spool), [".tmp.dddd", "README"]);
        assert.deepEqual(segmentQueries.sort(), [dep, top].sort());

        // Dependencies first; each record agrees with Nix.
        const depRecord = await cache.getPath(dep.slice(11, 43));
        const topRecord = await cache.getPath(top.slice(11, 43));
        assert.ok(depRecord && topRecord);
        assert.ok(depRecord.registeredAt <= topRecord.registeredAt);
        const [nixTop] = await pathInfo([top]);
        assert.equal(topRecord.narInfo.narSize, nixTop.narSize);
        assert.deepEqual(topRecord.narInfo.references, [dep.slice(11)]);

        const text = logs.join("\n");
        assert.match(text, /line 4 of spool file .*1000-1-aaaa\.paths/);
        assert.match(text, /line 5 of spool file .*1000-1-aaaa\.paths/);
        assert.ok(text.includes(`Skipping ${gone}`), text);
        assert.ok(text.includes(`Imported ${top}`), text);
        assert.ok(text.includes(".tmp.eeee"), text);

        // Nothing left to do: a second round changes nothing.
        assert.deepEqual(await drainSpool(cache, spool, { compression: "zstd" }), {
          imported: 0,
          failed: 0,
          skipped: 0,
          removedFiles: 0,
          keptFiles: 0,
        });
        assert.deepEqual(await spoolNames(spool), [".tmp.dddd", "README"]);
      });
    },
  });
}

Deno.test({
  name: "drainSpool: a missing spool directory is an empty one",
  async fn() {
    await withSpool("kv", async ({ spool, cache }) => {
      const result = await drainSpool(cache, `${spool}/does-not-exist`, { compression: "zstd" });
      assert.deepEqual(result, {
        imported: 0,
        failed: 0,
        skipped: 0,
        removedFiles: 0,
        keptFiles: 0,
      });
    });
  },
});

Deno.test({
  name: "drainSpool: a transient failure (nix not on PATH) keeps the file for the next round",
  ignore: !HAVE_NIX,
  async fn() {
    const [dep, top] = await buildClosure();
    await withSpool("kv", async ({ spool, cache, logs, log }) => {
      await ensureSpoolDir(spool);
      await Deno.writeTextFile(`${spool}/1000-1-a.paths`, `${top}\n`);
      await Deno.writeTextFile(`${spool}/1001-1-b.paths`, `${dep}\n`);
      // What runNix throws when nix is not on PATH (PATH itself is shared by parallel tests).
      const noNix = () =>
        Promise.reject(new ExternalCommandError("Cannot run nix: it is not on PATH"));
      const result = await drainSpool(cache, spool, {
        compression: "zstd",
        log,
        queryClosure: noNix,
      });
      // The round stops at the first transient failure; both files stay.
      assert.deepEqual(result, {
        imported: 0,
        failed: 1,
        skipped: 0,
        removedFiles: 0,
        keptFiles: 2,
      });
      assert.deepEqual(await spoolNames(spool), ["1000-1-a.paths", "1001-1-b.paths"]);
      assert.match(logs.join("\n"), /1000-1-a\.paths kept for the next round: Cannot run nix/);
      assert.deepEqual(await cachedPaths(cache), []);

      // Next round, with nix back: imported, files gone.
      const again = await drainSpool(cache, spool, { compression: "zstd" });
      assert.equal(again.imported, 2);
      assert.equal(again.removedFiles, 2);
      assert.deepEqual(await spoolNames(spool), []);
      assert.deepEqual(await cachedPaths(cache), [dep, top].sort());
    });
  },
});

Deno.test({
  name: "drainSpool: a path failing its integrity check is dropped with its dependents",
  // Corrupts (and then restores) a store path of its own: needs root, as Nix's store is.
  ignore: !HAVE_NIX || Deno.uid() !== 0,
  async fn() {
    const tag = `-${crypto.randomUUID().slice(0, 8)}`;
    const [dep, top] = await buildClosure(tag);
    const other = absentPath();
    await withSpool("kv", async ({ spool, cache, logs, log }) => {
      await ensureSpoolDir(spool);
      await Deno.writeTextFile(`${spool}/1000-1-a.paths`, `${top}\n${other}\n`);
      const file = `${dep}/data`;
      const original = await Deno.readFile(file);
      const { mode } = await Deno.stat(file);
      try {
        // Same size, other bytes: the NAR no longer matches the hash Nix recorded.
        await Deno.chmod(file, 0o644);
        await Deno.writeFile(file, original.map((b) => b === 0x64 ? 0x44 : b));
        const result = await drainSpool(cache, spool, { compression: "zstd", log });
        assert.deepEqual(result, {
          imported: 0,
          failed: 2,
          skipped: 1,
          removedFiles: 1,
          keptFiles: 0,
        });
      } finally {
        await Deno.writeFile(file, original);
        await Deno.chmod(file, mode! & 0o7777);
        await Deno.utime(file, 1, 1);
      }
      assert.deepEqual(await cachedPaths(cache), []);
      const text = logs.join("\n");
      assert.ok(text.includes(`Cannot import ${dep}, dropping it: NAR hash mismatch`), text);
      assert.ok(text.includes(`Cannot import ${top}, dropping it: its dependency`), text);
      // The restored path is importable again.
      await Deno.writeTextFile(`${spool}/1001-1-b.paths`, `${top}\n`);
      assert.equal((await drainSpool(cache, spool, { compression: "zstd" })).imported, 2);
    });
  },
});

Deno.test({
  name: "startSpoolDrainer: creates the spool, drains at start and on its interval, stops cleanly",
  ignore: !HAVE_NIX,
  async fn() {
    const [dep, top] = await buildClosure();
    await withSpool("kv", async ({ spool, cache, logs, log }) => {
      const drainer = startSpoolDrainer(cache, spool, {
        compression: "zstd",
        intervalMs: 20,
        log,
      });
      try {
        // The first round creates the directory; then a file appears, as from the hook.
        for (let i = 0; i < 500; i++) {
          try {
            if ((await Deno.stat(spool)).isDirectory) break;
          } catch { /* not yet */ }
          await new Promise((resolve) => setTimeout(resolve, 10));
        }
        assert.equal((await Deno.stat(spool)).mode! & 0o777, 0o755);
        await Deno.writeTextFile(`${spool}/.tmp.x`, `${top}\n`);
        await Deno.rename(`${spool}/.tmp.x`, `${spool}/1000-1-x.paths`);
        let cached: string[] = [];
        for (let i = 0; i < 3000 && cached.length < 2; i++) {
          await new Promise((resolve) => setTimeout(resolve, 10));
          cached = await cachedPaths(cache);
        }
        assert.deepEqual(cached, [dep, top].sort());
        for (let i = 0; i < 500 && (await spoolNames(spool)).length > 0; i++) {
          await new Promise((resolve) => setTimeout(resolve, 10));
        }
        assert.deepEqual(await spoolNames(spool), []);
      } finally {
        await drainer.stop();
      }
      await drainer.stop(); // idempotent
      assert.ok(
        logs.some((line) => /2 paths imported, 0 failed, 0 skipped/.test(line)),
        logs.join("\n"),
      );
      // Stopped: a new file stays put.
      await Deno.writeTextFile(`${spool}/1001-1-y.paths`, `${top}\n`);
      await new Promise((resolve) => setTimeout(resolve, 100));
      assert.deepEqual(await spoolNames(spool), ["1001-1-y.paths"]);
    });
  },
});

Deno.test({
  name: "startSpoolDrainer: stop() interrupts a drain between two paths and keeps its file",
  ignore: !HAVE_NIX,
  async fn() {
    const [dep, top] = await buildClosure();
    await withSpool("kv", async ({ spool, cache }) => {
      await ensureSpoolDir(spool);
      await Deno.writeTextFile(`${spool}/1000-1-x.paths`, `${top}\n`);
      let stopping: Promise<void> | undefined;
      const drainer = startSpoolDrainer(cache, spool, {
        compression: "zstd",
        // Asked once per path to import, dependencies first: stop while on the first.
        segmentOf: () => {
          stopping ??= drainer.stop();
          return undefined;
        },
      });
      for (let i = 0; i < 3000 && stopping === undefined; i++) {
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
      assert.ok(stopping, "the drainer reached the import");
      await stopping;
      // The first path (dep) was being imported and completes; top was not started.
      assert.deepEqual(await cachedPaths(cache), [dep]);
      assert.deepEqual(await spoolNames(spool), ["1000-1-x.paths"]);
    });
  },
});

Deno.test("postBuildHookScript: quotes the spool directory, refuses relative ones", () => {
  const script = postBuildHookScript("/var/cache/it's here/spool/");
  assert.ok(script.startsWith("#!/bin/sh\n"));
  assert.ok(script.includes(`spool='/var/cache/it'\\''s here/spool'\n`), script);
  assert.ok(script.trimEnd().endsWith("exit 0"));
  assert.throws(() => postBuildHookScript("spool"), FormatError);
  assert.throws(() => postBuildHookScript("/a\nb"), FormatError);
});
