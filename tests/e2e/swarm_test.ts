/**
 * The swarm end to end (the swarm issue's "Done means"), with real `arca swarm` processes
 * on 127.0.0.1 and store paths made by the real Nix: node A imports signed paths (one also
 * signed by a key only A knows, and unsigned ones that no peer could accept); node C finds
 * A as a static peer, node B by multicast on loopback only; both hold A's records, as
 * `list --remote`, the record files, `status --json` and B's audit log show, and a path
 * imported on A later (a separate `arca import`) reaches them by push. Their traffic then
 * settles (no record goes back and forth every round). Node D, with another topic, learns
 * nothing and no session is made with it.
 *
 * Waits are bounded polls (200 ms); the bounds are the (10 s to converge, 5 s for a
 * new path) or generous ones for the rest. Every process is stopped by PID.
 * @module
 */

import assert from "node:assert/strict";
import {
  arcaOk,
  type ArcaSwarm,
  freePort,
  freeUdpPort,
  makeArcaHome,
  startSwarm,
} from "../helpers/arca.ts";
import { HAVE_NIX, runNix } from "../helpers/nix.ts";
import { buildFixtures } from "./fixtures.ts";

const GROUP = "239.255.70.70";

/** Whether a datagram sent to the group from 127.0.0.1 reaches a socket joined on 127.0.0.1. */
async function probeLoopbackMulticast(): Promise<string | null> {
  const port = freeUdpPort();
  let receiver: Deno.DatagramConn | undefined;
  let sender: Deno.DatagramConn | undefined;
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    receiver = Deno.listenDatagram({ transport: "udp", hostname: GROUP, port, reuseAddress: true });
    await receiver.joinMulticastV4(GROUP, "127.0.0.1");
    sender = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
    const received = receiver.receive();
    received.catch(() => {});
    const timeout = new Promise<null>((resolve) => timer = setTimeout(() => resolve(null), 3000));
    for (let i = 0; i < 3; i++) {
      await sender.send(Uint8Array.of(i), { transport: "udp", hostname: GROUP, port });
    }
    return (await Promise.race([received, timeout])) === null ? "no datagram within 3 s" : null;
  } catch (error) {
    return String(error);
  } finally {
    clearTimeout(timer);
    receiver?.close();
    sender?.close();
  }
}

const multicastProblem = HAVE_NIX ? await probeLoopbackMulticast() : null;
if (multicastProblem !== null) {
  console.warn(
    `MULTICAST ON LOOPBACK DOES NOT WORK HERE (${multicastProblem}): node B uses a static peer`,
  );
}

/** Polls `check` every 200 ms until it returns a value other than undefined. */
async function waitFor<T>(
  what: string,
  timeoutMs: number,
  check: () => Promise<T | undefined>,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`Timed out after ${timeoutMs} ms: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

function hashOf(storePath: string): string {
  return storePath.slice("/nix/store/".length, "/nix/store/".length + 32);
}

/** The remote record files a node holds for the ad-hoc segment, by store path. */
async function remoteFiles(cacheDir: string): Promise<Map<string, Record<string, unknown>>> {
  const out = new Map<string, Record<string, unknown>>();
  try {
    for await (const entry of Deno.readDir(`${cacheDir}/remote/adhoc`)) {
      if (!entry.name.endsWith(".json")) continue;
      try {
        const record = JSON.parse(
          await Deno.readTextFile(`${cacheDir}/remote/adhoc/${entry.name}`),
        );
        out.set(record.storePath, record);
      } catch { /* being renamed into place */ }
    }
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
  return out;
}

interface PeerStatus {
  segment: string;
  id: string;
  address: string | null;
  syncPort: number | null;
  connected: boolean;
  lastSeen: string;
  recordsSent: number;
  recordsReceived: number;
  recordsAccepted: number;
  recordsRefused: number;
}

interface Status {
  remoteRecords: number;
  swarm: { nodeId: string; pid: number; segments: { name: string; peers: unknown[] }[] } | null;
  peers: PeerStatus[];
}

/** Makes `count` small distinct directories and adds them to the store in one call. */
async function addPaths(root: string, prefix: string, count: number): Promise<string[]> {
  const dirs: string[] = [];
  for (let i = 0; i < count; i++) {
    const dir = `${root}/${prefix}-${i}`;
    await Deno.mkdir(dir, { recursive: true });
    await Deno.writeTextFile(`${dir}/content`, `${prefix} ${i} ${crypto.randomUUID()}\n`);
    dirs.push(dir);
  }
  return (await runNix("nix-store", ["--add", ...dirs])).trim().split("\n");
}

Deno.test({
  name: multicastProblem === null
    ? "e2e swarm: static and multicast peers converge on A's signed records, new paths follow"
    : `e2e swarm: static peers converge (MULTICAST SKIPPED: ${multicastProblem})`,
  ignore: !HAVE_NIX,
  async fn() {
    const home = await makeArcaHome();
    const env = home.env;
    const nodes: ArcaSwarm[] = [];
    try {
      const keyDir = `${home.dir}/keys`;
      const pubLine = (out: string) => /extra-trusted-public-keys = (\S+)/.exec(out)![1];
      const teamPub = pubLine(
        await arcaOk(["sign-keygen", "--name", "swarm-e2e-1", "--output-dir", keyDir], { env }),
      );
      const onlyAPub = pubLine(
        await arcaOk(["sign-keygen", "--name", "swarm-e2e-a-1", "--output-dir", keyDir], {
          env,
        }),
      );
      const teamKey = `${keyDir}/swarm-e2e-1.secret`;

      const fixtures = await buildFixtures();
      const scratch = `${home.dir}/paths`;
      const [extra] = await addPaths(scratch, "swarm-e2e-extra", 1);
      // A second signature, by a key B and C do not trust: it must not spread to them.
      await runNix("nix", ["store", "sign", "--key-file", `${keyDir}/swarm-e2e-a-1.secret`, extra]);
      const unsigned = await addPaths(scratch, "swarm-e2e-unsigned", 25);
      const [later] = await addPaths(scratch, "swarm-e2e-later", 1);

      const dir = (name: string) => `${home.dir}/node-${name}`;
      const signedPaths = [fixtures.dep, fixtures.top, fixtures.caSmall, extra].sort();
      await arcaOk(["--cache-dir", dir("a"), "import", "--signing-key", teamKey, ...signedPaths], {
        env,
      });
      await arcaOk(["--cache-dir", dir("a"), "import", ...unsigned], { env });
      const local = JSON.parse(await arcaOk(["--cache-dir", dir("a"), "list", "--json"], { env }));
      assert.equal(local.length, signedPaths.length + unsigned.length);
      const extraSigs = local.find((p: { storePath: string }) => p.storePath === extra).signatures;
      assert.equal(extraSigs.length, 2, "the extra path carries both signatures");

      const multicastPort = String(freeUdpPort());
      const discovery = { a: freeUdpPort(), b: freeUdpPort(), c: freeUdpPort(), d: freeUdpPort() };
      const swarmArgs = (name: keyof typeof discovery, topic: string, extraArgs: string[]) => [
        "--cache-dir",
        dir(name),
        "swarm",
        "--topic",
        topic,
        "--bind-address",
        "127.0.0.1",
        "--discovery-port",
        String(discovery[name]),
        "--sync-port",
        String(freePort()),
        "--multicast-port",
        multicastPort,
        "--multicast-interface",
        "127.0.0.1",
        "--announce-interval",
        "1",
        "--reconcile-interval",
        "2",
        "--trusted-public-key",
        teamPub,
        ...extraArgs,
      ];
      const topic = `swarm e2e ${crypto.randomUUID()}`;
      const staticA = ["--static-peer", `127.0.0.1:${discovery.a}`];
      const a = await startSwarm(swarmArgs("a", topic, ["--trusted-public-key", onlyAPub]), {
        env,
      });
      nodes.push(a);
      const [b, c, d] = await Promise.all([
        startSwarm(swarmArgs("b", topic, multicastProblem === null ? [] : staticA), { env }),
        startSwarm(swarmArgs("c", topic, ["--no-multicast", ...staticA]), { env }),
        startSwarm(swarmArgs("d", `another ${topic}`, staticA), { env }),
      ]);
      nodes.push(b, c, d);

      // B and C hold A's signed records within 10 s, and nothing else.
      const expected = new Set(signedPaths);
      for (const [name, node] of [["B", "b"], ["C", "c"]]) {
        await waitFor(`${name} holds A's records`, 10_000, async () => {
          const files = await remoteFiles(dir(node));
          return signedPaths.every((p) => files.has(p)) ? true : undefined;
        });
      }
      const status = async (name: string): Promise<Status> =>
        JSON.parse(await arcaOk(["--cache-dir", dir(name), "status", "--json"], { env }));
      const statusA = await status("a");
      const nodeIdA = statusA.swarm!.nodeId;
      assert.ok(nodeIdA.startsWith(a.nodeId));
      for (const name of ["b", "c"]) {
        const listed = (await arcaOk(["--cache-dir", dir(name), "list", "--remote"], { env }))
          .trim().split("\n").sort();
        assert.deepEqual(listed, signedPaths, `${name}: list --remote`);
        const files = await remoteFiles(dir(name));
        assert.deepEqual(new Set(files.keys()), expected, `${name}: no unsigned path arrived`);
        for (const path of signedPaths) {
          const mine = local.find((p: { storePath: string }) => p.storePath === path);
          const theirs = files.get(path)!;
          assert.equal(theirs.narHash, mine.narHash, `${name}: ${path} narHash`);
          assert.equal(theirs.narSize, mine.narSize);
          assert.deepEqual(theirs.references, mine.references);
          assert.equal(theirs.deriver ?? null, mine.deriver);
          assert.equal(theirs.ca ?? null, mine.ca);
          assert.equal(theirs.segment, "adhoc");
          assert.deepEqual(theirs.peers, [nodeIdA]);
          // Only the signature of the key they trust came along.
          assert.deepEqual(
            theirs.sigs,
            mine.signatures.filter((s: string) => s.startsWith("swarm-e2e-1:")),
          );
          assert.equal((theirs.sigs as string[]).length, 1);
        }
        const record = JSON.parse(
          await Deno.readTextFile(`${dir(name)}/remote/adhoc/${hashOf(extra)}.json`),
        );
        assert.equal(record.storePath, extra);
      }

      // status --json: the peers (connected, records exchanged) and the remote records.
      for (const name of ["b", "c"]) {
        const seen = await waitFor(`${name}'s status shows A`, 15_000, async () => {
          const s = await status(name);
          const peer = s.peers.find((p) => p.id === nodeIdA);
          return peer?.connected && peer.recordsAccepted === signedPaths.length
            ? { s, peer }
            : undefined;
        });
        assert.equal(seen.s.remoteRecords, signedPaths.length);
        assert.equal(seen.peer.segment, "adhoc");
        assert.equal(seen.peer.address, "127.0.0.1");
        assert.ok(seen.peer.recordsReceived >= signedPaths.length);
        assert.equal(seen.peer.recordsRefused, 0, `${name} refused nothing`);
        assert.ok(!isNaN(Date.parse(seen.peer.lastSeen)));
      }
      const seenByA = await waitFor("A's status shows B and C", 15_000, async () => {
        const s = await status("a");
        const connected = s.peers.filter((p) => p.connected);
        return connected.length === 2 &&
            connected.every((p) => p.recordsSent >= signedPaths.length)
          ? s
          : undefined;
      });
      const peerIds = seenByA.peers.map((p) => p.id.slice(0, 16)).sort();
      assert.deepEqual(peerIds, [b.nodeId, c.nodeId].sort());
      assert.equal(seenByA.remoteRecords, 0);

      // A path imported on A while its swarm runs reaches B and C within 5 s.
      await arcaOk(["--cache-dir", dir("a"), "import", "--signing-key", teamKey, later], { env });
      for (const name of ["b", "c"]) {
        await waitFor(`${name} holds the later path`, 5000, async () => {
          return (await remoteFiles(dir(name))).has(later) ? true : undefined;
        });
      }
      for (const name of ["b", "c"]) {
        const listed = (await arcaOk(["--cache-dir", dir(name), "list", "--remote"], { env }))
          .trim().split("\n").sort();
        assert.deepEqual(listed, [...signedPaths, later].sort());
      }

      // B's audit log shows each path received from A.
      const audit = (await arcaOk(["--cache-dir", dir("b"), "audit", "--json"], { env }))
        .trim().split("\n").map((line) => JSON.parse(line));
      const received = audit.filter((e) => e.type === "SyncReceive");
      assert.deepEqual(received.map((e) => e.storePath).sort(), [...signedPaths, later].sort());
      for (const event of received) {
        assert.equal(event.segment, "adhoc");
        assert.equal(event.detail, `from peer ${a.nodeId}`);
      }

      // Traffic settles: once converged, rounds (every 2 s) exchange no records, although
      // A holds a signature B and C dropped. Two status snapshots 5 s apart must agree.
      const counters = async () => {
        const all = await Promise.all(["b", "c"].map(status));
        return JSON.stringify(all.map((s) => {
          const p = s.peers.find((peer) => peer.id === nodeIdA)!;
          return [p.recordsSent, p.recordsReceived, p.recordsAccepted, p.recordsRefused];
        }));
      };
      let previous = await counters();
      await waitFor("record traffic to settle", 40_000, async () => {
        await new Promise((resolve) => setTimeout(resolve, 5000));
        const now = await counters();
        const settled = now === previous;
        previous = now;
        return settled ? true : undefined;
      });

      // D, with another topic, learnt nothing and has no session.
      assert.equal((await remoteFiles(dir("d"))).size, 0);
      assert.equal(
        (await arcaOk(["--cache-dir", dir("d"), "list", "--remote"], { env })).trim(),
        "",
      );
      const statusD = await status("d");
      assert.equal(statusD.remoteRecords, 0);
      assert.deepEqual(statusD.peers, []);
      assert.ok(statusD.swarm, "D's swarm is running");
      for (const name of ["a", "b", "c"]) {
        const s = await status(name);
        assert.ok(s.peers.every((p) => !p.id.startsWith(d.nodeId)), `${name} never saw D`);
      }
      assert.ok(!a.stderr().includes(d.nodeId), "A never connected to D");
      assert.ok(!d.stderr().includes("connected to"), "D never connected");

      // Every node stops cleanly on SIGTERM and removes its status file.
      for (const node of nodes.splice(0)) {
        const ended = await node.stop();
        assert.equal(ended.code, 0, `exit code, stderr: ${node.stderr()}`);
      }
      for (const name of ["a", "b", "c", "d"]) {
        const s = await status(name);
        assert.equal(s.swarm, null, `${name}: no swarm running`);
      }
    } finally {
      await Promise.all(nodes.map((node) => node.stop()));
      await home.cleanup();
    }
  },
});
