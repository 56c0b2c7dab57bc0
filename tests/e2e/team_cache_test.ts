/**
 * The team cache's bookkeeping end to end, with real processes and the real Nix:
 * segments from config.toml (`import --segment`, `list --segment`, `status`), the audit
 * log (Import, Serve, GarbageCollect), and `gc --max-size` on a cache of several closures
 * leaving it under the limit with every remaining path substitutable, closure and all.
 * @module
 */

import assert from "node:assert/strict";
import { arcaOk, makeArcaHome, runArca, startServe } from "../helpers/arca.ts";
import { HAVE_NIX, pathInfo, runNix } from "../helpers/nix.ts";
import { buildFixtures } from "./fixtures.ts";
import { buildFixture } from "../helpers/nix.ts";

Deno.test({
  name: "e2e team cache: segments, audit log and gc --max-size with Nix as the judge",
  ignore: !HAVE_NIX,
  async fn() {
    const home = await makeArcaHome();
    const env = home.env;
    await Deno.mkdir(home.configDir, { recursive: true });
    await Deno.writeTextFile(
      `${home.configDir}/config.toml`,
      [
        "[[segments]]",
        'name = "nixpkgs"',
        'filter = "nixpkgs"',
        "",
        "[[segments]]",
        'name = "team"',
        'filter = "custom"',
        "",
        "[[segments]]",
        'name = "scratch"',
        'filter = "all"',
        "",
      ].join("\n"),
    );
    const global = ["--cache-dir", home.cacheDir];
    try {
      const fixtures = await buildFixtures();
      // Three more closures of a few paths each, each ~1 MB of its own.
      const closures: string[] = [];
      for (const n of [1, 2, 3]) {
        closures.push(
          await buildFixture(
            `arca-gc-${n}`,
            `mkdir $out; head -c ${
              n * 400000
            } /dev/urandom > $out/data; echo ${fixtures.dep} > $out/dep`,
          ),
        );
      }
      await arcaOk([...global, "import-closure", fixtures.top], { env });
      await arcaOk([...global, "import", "--segment", "scratch", fixtures.caSmall], { env });
      const unknown = await runArca([...global, "import", "--segment", "nope", fixtures.caSmall], {
        env,
      });
      assert.equal(unknown.code, 2);
      assert.match(unknown.stderr, /Unknown segment 'nope'/);

      const team = (await arcaOk([...global, "list", "--segment", "team"], { env })).trim();
      assert.deepEqual(team.split("\n").sort(), [fixtures.dep, fixtures.top].sort());
      const scratch = (await arcaOk([...global, "list", "--segment", "scratch"], { env })).trim();
      assert.equal(scratch, fixtures.caSmall);
      const status = JSON.parse(await arcaOk([...global, "status", "--json"], { env }));
      assert.deepEqual(
        status.segments.map((s: { name: string; paths: number }) => [s.name, s.paths]),
        [["nixpkgs", 0], ["team", 2], ["scratch", 1]],
      );

      // Serving is audited per path, aggregated, when the server flushes (at the latest on stop).
      const server = await startServe(global, { env });
      const hashPart = fixtures.top.slice(11, 43);
      const narinfo = await (await fetch(`${server.url}/${hashPart}.narinfo`)).text();
      const url = /^URL: (.*)$/m.exec(narinfo)![1];
      for (let i = 0; i < 3; i++) await (await fetch(`${server.url}/${url}`)).arrayBuffer();
      await server.stop();
      const events = (await arcaOk([...global, "audit", "--json"], { env })).trim().split("\n")
        .map((line) => JSON.parse(line));
      const imports = events.filter((e) => e.type === "Import");
      assert.deepEqual(
        imports.map((e) => [e.storePath, e.segment]).sort(),
        [[fixtures.dep, "team"], [fixtures.top, "team"], [fixtures.caSmall, "scratch"]].sort(),
      );
      const serves = events.filter((e) => e.type === "Serve");
      assert.deepEqual(serves.map((e) => [e.storePath, e.detail]), [[
        fixtures.top,
        "3 NAR downloads",
      ]]);
      assert.equal(
        (await arcaOk([...global, "audit", "--since", "1h"], { env })).trim().split("\n").length,
        events.length,
      );
      assert.equal((await runArca([...global, "audit", "--since", "soon"], { env })).code, 2);

      // gc --max-size on a cache of several closures.
      for (const path of closures) await arcaOk([...global, "import-closure", path], { env });
      const before = JSON.parse(await arcaOk([...global, "status", "--json"], { env }));
      const limit = Math.floor(before.storedBytes * 0.6);
      const gcOut = await arcaOk([...global, "gc", "--max-size", String(limit)], { env });
      assert.match(gcOut, /Evicted \d+ paths/);
      const after = JSON.parse(await arcaOk([...global, "status", "--json"], { env }));
      assert.ok(after.storedBytes <= limit, `${after.storedBytes} <= ${limit}`);
      assert.ok(after.paths < before.paths && after.paths > 0);
      const remaining = (await arcaOk([...global, "list"], { env })).trim().split("\n");
      // The least recently used root went first (top was served after caSmall's import);
      // what remains is whole: Nix substitutes it all.
      assert.ok(!remaining.includes(fixtures.caSmall), "the least recently used root was evicted");
      const server2 = await startServe(global, { env });
      try {
        const store2 = `${home.dir}/store2`;
        await runNix("nix", [
          "copy",
          "--no-check-sigs",
          "--from",
          server2.url,
          "--to",
          store2,
          ...remaining,
        ]);
        const copied = await pathInfo(remaining, { store: store2 });
        const source = await pathInfo(remaining);
        assert.deepEqual(copied.map((i) => i.narHash), source.map((i) => i.narHash));
      } finally {
        await server2.stop();
      }
      const gcEvents = (await arcaOk([...global, "audit", "--json"], { env })).trim().split("\n")
        .map((line) => JSON.parse(line)).filter((e) => e.type === "GarbageCollect");
      assert.equal(gcEvents.length, before.paths - after.paths);
      // A dry run changes nothing.
      const dry = await arcaOk([...global, "gc", "--max-size", "0", "--dry-run"], { env });
      assert.match(dry, /Would evict/);
      assert.deepEqual(JSON.parse(await arcaOk([...global, "status", "--json"], { env })), after);
    } finally {
      await home.cleanup();
    }
  },
});
