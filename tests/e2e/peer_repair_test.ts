/**
 * `arca verify --repair` with a swarm running (the "one substituter" issue's "a chunk
 * corrupted on disk is found by verify, repaired from a peer"): B and its peer A hold the
 * same path; one of B's chunk files is corrupted in place (same size, so serving's
 * presence checks cannot see it). `verify` finds it; `verify --repair` deletes the chunk
 * and gets the path back from A through B's running `swarm --also-serve`; Nix then copies
 * the right NAR from B, and a second `verify` finds nothing wrong.
 * @module
 */

import assert from "node:assert/strict";
import { parseNarInfo } from "../../src/cache/narinfo.ts";
import { freePort, runArca } from "../helpers/arca.ts";
import { HAVE_NIX, pathInfo } from "../helpers/nix.ts";
import { copyFrom, makeTeam } from "../helpers/team.ts";
import { buildBigPath } from "./fixtures.ts";

Deno.test({
  name: "e2e verify --repair: a corrupted chunk is found and the path refetched from a peer",
  ignore: !HAVE_NIX,
  async fn() {
    const team = await makeTeam();
    try {
      const path = await buildBigPath("arca-peer-repair", { sizeMiB: 4, seed: 77 });
      await team.importInto("a", [path]);
      await team.importInto("b", [path]);
      await team.start("a");
      const httpPort = freePort();
      await team.start("b", { peers: ["a"], httpPort });
      await team.waitForPeers("b", 1);
      const narinfoUrl = `http://127.0.0.1:${httpPort}/${
        path.slice("/nix/store/".length, "/nix/store/".length + 32)
      }.narinfo`;
      const before = parseNarInfo(await (await fetch(narinfoUrl)).text());

      // Corrupt one of B's chunk files in place, keeping its size.
      const chunksDir = `${team.dir("b")}/objects/chunks`;
      let corrupted = "";
      for await (const fan of Deno.readDir(chunksDir)) {
        if (!fan.isDirectory || corrupted) continue;
        for await (const file of Deno.readDir(`${chunksDir}/${fan.name}`)) {
          corrupted = `${chunksDir}/${fan.name}/${file.name}`;
          break;
        }
      }
      const bytes = await Deno.readFile(corrupted);
      bytes[bytes.length >> 1] ^= 0xff;
      await Deno.writeFile(corrupted, bytes);

      const global = ["--cache-dir", team.dir("b")];
      const found = await runArca([...global, "verify", "--json"], { env: team.env });
      assert.equal(found.code, 1, "verify fails while something is broken");
      const report = JSON.parse(found.stdout);
      assert.equal(report.badChunks.length, 1);
      assert.deepEqual(report.badPaths.map((p: { storePath: string }) => p.storePath), [path]);

      const repaired = await runArca([...global, "verify", "--repair", "--json"], {
        env: team.env,
      });
      assert.equal(repaired.code, 0, repaired.stderr);
      const repair = JSON.parse(repaired.stdout);
      assert.deepEqual(repair.refetched.map((r: { storePath: string }) => r.storePath), [path]);
      assert.match(repair.refetched[0].from, /peer/);
      // The record is back as it was: signatures, references, deriver.
      const after = parseNarInfo(await (await fetch(narinfoUrl)).text());
      assert.deepEqual(after.sigs, before.sigs);
      assert.deepEqual(after.references, before.references);
      assert.equal(after.deriver, before.deriver);
      assert.equal(after.narHash, before.narHash);

      const store = `${team.home.dir}/store`;
      await copyFrom(`http://127.0.0.1:${httpPort}`, store, team.publicKey, [path]);
      const [copied] = await pathInfo([path], { store });
      const [source] = await pathInfo([path]);
      assert.equal(copied.narHash, source.narHash);

      const clean = await runArca([...global, "verify", "--json"], { env: team.env });
      assert.equal(clean.code, 0, clean.stdout);
      assert.deepEqual(JSON.parse(clean.stdout).badPaths, []);
    } finally {
      await team.cleanup();
    }
  },
});
