/**
 * Peer fetch end to end (the peer fetch issue's "Done means"), with real `arca swarm`
 * processes on 127.0.0.1 and the real Nix as the client:
 * - A imports a closure; B (`swarm --also-serve`) syncs with A; `nix copy --from` B into a
 *   fresh store gets it, narHash, references and signatures as on A; B now holds it, and a
 *   second fresh store gets it from B with A stopped. With no peer left, a path B knows
 *   only as a record answers 404 at once.
 * - A 200 MiB path held by A and C: B fetches chunks from both; A is killed in the middle
 *   of the transfer and the copy still completes from C.
 * - A peer whose chunk file is corrupted (same size) is dropped: Nix gets the right NAR
 *   from the other peer.
 *
 * Waits are bounded polls. Every process is stopped by PID.
 * @module
 */

import assert from "node:assert/strict";
import { arcaOk, freePort } from "../helpers/arca.ts";
import { HAVE_NIX, nixEnv, pathInfo, runNix } from "../helpers/nix.ts";
import { copyFrom, essentials, hashOf, makeTeam, waitFor } from "../helpers/team.ts";
import { buildBigPath, buildFixtures } from "./fixtures.ts";

Deno.test({
  name: "e2e peer fetch: Nix gets from B what only A holds; B keeps it; no peer means 404",
  ignore: !HAVE_NIX,
  async fn() {
    const team = await makeTeam();
    try {
      const fixtures = await buildFixtures();
      const closure = [fixtures.dep, fixtures.top];
      await team.importInto("a", [...closure, fixtures.caSmall]);
      await team.start("a");
      const httpPort = freePort();
      const b = await team.start("b", { peers: ["a"], httpPort });
      const url = `http://127.0.0.1:${httpPort}`;
      await team.waitForRecords("b", [...closure, fixtures.caSmall]);
      await team.waitForPeers("b", 1);

      const store1 = `${team.home.dir}/store1`;
      await copyFrom(url, store1, team.publicKey, [fixtures.top]);
      const source = await pathInfo(closure);
      const copied = await pathInfo(closure, { store: store1 });
      assert.deepEqual(copied.map(essentials), source.map(essentials));
      for (const info of copied) {
        assert.ok(
          info.signatures?.some((sig) => sig.startsWith("peer-fetch-e2e-1:")),
          `${info.path} keeps A's signature`,
        );
      }
      // B holds the closure now, as local paths, and says where they came from.
      const listed = (await arcaOk(["--cache-dir", team.dir("b"), "list"], { env: team.env }))
        .trim().split("\n").sort();
      assert.deepEqual(listed, [...closure].sort());
      const audit = (await arcaOk(["--cache-dir", team.dir("b"), "audit", "--json"], {
        env: team.env,
      })).trim().split("\n").map((line) => JSON.parse(line));
      const fetched = audit.filter((event) => event.type === "Fetch");
      assert.deepEqual(fetched.map((event) => event.storePath).sort(), [...closure].sort());
      assert.ok(fetched.every((event) => event.detail.includes("from peer(s)")));
      const status = await waitFor("B's status counts the fetches", 10_000, async () => {
        const s = await team.status("b");
        return s.peerFetch?.narsFetched === 2 ? s : undefined;
      });
      assert.ok(status.peerFetch.bytesFetched > 0);
      assert.equal(status.peerFetch.narsServedFromPeers, 2);

      // With A stopped, a second fresh store still gets the closure from B.
      await team.nodes[0].stop();
      const store2 = `${team.home.dir}/store2`;
      await copyFrom(url, store2, team.publicKey, [fixtures.top]);
      assert.deepEqual(
        (await pathInfo(closure, { store: store2 })).map(essentials),
        source.map(essentials),
      );

      // caSmall is only a record on B, and no peer holding it is connected: 404 at once.
      await waitFor("B notices A is gone", 20_000, async () => {
        const s = await team.status("b");
        return s.peers.every((p: { connected: boolean }) => !p.connected) ? true : undefined;
      });
      const started = Date.now();
      const response = await fetch(`${url}/${hashOf(fixtures.caSmall)}.narinfo`);
      await response.body?.cancel();
      assert.equal(response.status, 404);
      assert.ok(Date.now() - started < 2000, "answered without waiting for peers");
      assert.match(b.stderr(), /connected to/);
    } finally {
      await team.cleanup();
    }
  },
});

Deno.test({
  name: "e2e peer fetch: a 200 MiB path comes from A and C; A killed midway, C completes it",
  ignore: !HAVE_NIX,
  async fn() {
    const team = await makeTeam();
    try {
      const big = await buildBigPath("arca-peer-fetch-big", { sizeMiB: 200, seed: 4242 });
      await team.importInto("a", [big]);
      await team.importInto("c", [big]);
      const a = await team.start("a");
      await team.start("c");
      const httpPort = freePort();
      await team.start("b", { peers: ["a", "c"], httpPort });
      await team.waitForRecords("b", [big]);
      await team.waitForPeers("b", 2);

      // Kill A once B has stored a few dozen chunk files (the transfer is under way).
      const chunkFiles = async () => {
        let count = 0;
        try {
          for await (const fan of Deno.readDir(`${team.dir("b")}/objects/chunks`)) {
            if (!fan.isDirectory) continue;
            for await (const _ of Deno.readDir(`${team.dir("b")}/objects/chunks/${fan.name}`)) {
              count++;
            }
          }
        } catch { /* not created yet */ }
        return count;
      };
      const store = `${team.home.dir}/store`;
      const copy = copyFrom(`http://127.0.0.1:${httpPort}`, store, team.publicKey, [big]);
      let killed = false;
      const killer = waitFor("the transfer to start", 120_000, async () => {
        if (await chunkFiles() < 64) return undefined;
        await a.stop(0);
        killed = true;
        return true;
      });
      await copy;
      await killer.catch(() => {});
      assert.ok(killed, "A was stopped during the transfer");
      const [info] = await pathInfo([big], { store });
      const [source] = await pathInfo([big]);
      assert.equal(info.narHash, source.narHash);

      const status = await waitFor("B's status shows the fetch", 10_000, async () => {
        const s = await team.status("b");
        return s.peerFetch?.narsFetched === 1 ? s : undefined;
      });
      const shares = Object.values(status.peerFetch.bytesByPeer as Record<string, number>);
      assert.equal(shares.length, 2, "both peers sent chunks");
      assert.ok(shares.every((bytes) => bytes > 0));
    } finally {
      await team.cleanup();
    }
  },
});

Deno.test({
  name: "e2e peer fetch: a peer serving a corrupted chunk is dropped; Nix gets the right NAR",
  ignore: !HAVE_NIX,
  async fn() {
    const team = await makeTeam();
    try {
      const path = await buildBigPath("arca-peer-fetch-corrupt", { sizeMiB: 8, seed: 99 });
      await team.importInto("a", [path]);
      await team.importInto("c", [path]);
      // Corrupt every chunk file of A's copy, keeping its size: A's presence checks pass.
      const chunksDir = `${team.dir("a")}/objects/chunks`;
      for await (const fan of Deno.readDir(chunksDir)) {
        if (!fan.isDirectory) continue;
        for await (const file of Deno.readDir(`${chunksDir}/${fan.name}`)) {
          const name = `${chunksDir}/${fan.name}/${file.name}`;
          const bytes = await Deno.readFile(name);
          bytes[bytes.length >> 1] ^= 0xff;
          await Deno.writeFile(name, bytes);
        }
      }
      await team.start("a");
      await team.start("c");
      const httpPort = freePort();
      const b = await team.start("b", { peers: ["a", "c"], httpPort });
      await team.waitForRecords("b", [path]);
      await team.waitForPeers("b", 2);
      const store = `${team.home.dir}/store`;
      await copyFrom(`http://127.0.0.1:${httpPort}`, store, team.publicKey, [path]);
      const [copied] = await pathInfo([path], { store });
      const [source] = await pathInfo([path]);
      assert.equal(copied.narHash, source.narHash);
      await waitFor(
        "B logs dropping A",
        10_000,
        () =>
          Promise.resolve(
            /dropping .*bad chunk|does not match its id/.test(b.stderr()) || undefined,
          ),
      );
      // A NAR read from B's store now matches too (it was committed only once verified).
      const again = await runNix("nix", [
        "store",
        "cat",
        "--store",
        `http://127.0.0.1:${httpPort}`,
        "--option",
        "trusted-public-keys",
        team.publicKey,
        `${path}/README`,
      ], { env: nixEnv() });
      assert.equal(again, "fixture arca-peer-fetch-corrupt\n");
    } finally {
      await team.cleanup();
    }
  },
});
