/**
 * Upstream pull-through with the swarm running (the "one substituter" issue, item 3): an
 * upstream cache made the way real ones are (`nix copy --to file://…?secret-key=…`, served
 * by a static file server process). A and B run `swarm --also-serve` with that upstream in
 * their config.toml and trust its key. Nix copies a closure from A, which pulls it through
 * from the upstream; A shares the fetched paths with B like any import (B accepts them on
 * the upstream's signatures); then Nix copies the closure from B, which asks its peer A
 * before the upstream: the upstream sees no second NAR download.
 * @module
 */

import assert from "node:assert/strict";
import { arcaOk, freePort } from "../helpers/arca.ts";
import { HAVE_NIX, pathInfo, runNix } from "../helpers/nix.ts";
import { startStaticServer, type StaticServer } from "../helpers/static_server.ts";
import { copyFrom, essentials, makeTeam, waitFor } from "../helpers/team.ts";
import { buildFixtures } from "./fixtures.ts";

Deno.test({
  name: "e2e swarm + upstream: A pulls through and shares; B gets it from A, not the upstream",
  ignore: !HAVE_NIX,
  async fn() {
    const team = await makeTeam();
    let upstream: StaticServer | undefined;
    try {
      const fixtures = await buildFixtures();
      const closure = [fixtures.dep, fixtures.top];
      const secret = await runNix("nix", ["key", "generate-secret", "--key-name", "up-e2e-1"]);
      const secretFile = `${team.home.dir}/up-e2e-1.secret`;
      await Deno.writeTextFile(secretFile, secret);
      const upstreamKey = (await runNix("nix", ["key", "convert-secret-to-public"], {
        stdin: new TextEncoder().encode(secret),
      })).trim();
      const upstreamDir = `${team.home.dir}/upstream`;
      await runNix("nix", [
        "copy",
        "--to",
        `file://${upstreamDir}?secret-key=${secretFile}&compression=zstd`,
        ...closure,
      ]);
      upstream = await startStaticServer(upstreamDir);
      const config = [
        "[[upstreams]]",
        `url = "${upstream.url}"`,
        `trusted_public_keys = ["${upstreamKey}"]`,
        "",
      ].join("\n");

      const portA = freePort();
      const portB = freePort();
      await team.start("a", { httpPort: portA, config, trust: [upstreamKey] });
      await team.start("b", { peers: ["a"], httpPort: portB, config, trust: [upstreamKey] });
      await team.waitForPeers("b", 1);

      const store1 = `${team.home.dir}/store1`;
      await copyFrom(`http://127.0.0.1:${portA}`, store1, upstreamKey, [fixtures.top]);
      const source = (await pathInfo(closure)).map(essentials);
      assert.deepEqual((await pathInfo(closure, { store: store1 })).map(essentials), source);
      assert.equal(await upstream.countMatching(/^\/nar\//), 2, "A fetched each NAR once");
      // A imports what it passed through once Nix is done with it.
      await waitFor("A holds the closure", 20_000, async () => {
        const listed = (await arcaOk(["--cache-dir", team.dir("a"), "list"], { env: team.env }))
          .trim().split("\n").sort();
        return listed.join("\n") === [...closure].sort().join("\n") ? true : undefined;
      });

      // A pushes what it fetched; B accepts it on the upstream's signature.
      await team.waitForRecords("b", closure);

      const store2 = `${team.home.dir}/store2`;
      await copyFrom(`http://127.0.0.1:${portB}`, store2, upstreamKey, [fixtures.top]);
      assert.deepEqual((await pathInfo(closure, { store: store2 })).map(essentials), source);
      assert.equal(await upstream.countMatching(/^\/nar\//), 2, "B asked its peer, not upstream");
      const audit = (await arcaOk(["--cache-dir", team.dir("b"), "audit", "--json"], {
        env: team.env,
      })).trim().split("\n").map((line) => JSON.parse(line));
      const fetched = audit.filter((event) => event.type === "Fetch");
      assert.deepEqual(fetched.map((event) => event.storePath).sort(), [...closure].sort());
      assert.ok(fetched.every((event) => event.detail.includes("from peer(s)")));
    } finally {
      await upstream?.stop();
      await team.cleanup();
    }
  },
});
