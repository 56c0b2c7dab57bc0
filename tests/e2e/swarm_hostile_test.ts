/**
 * A running `arca swarm` node under attack, end to end. A peer that holds the topic (this
 * test, speaking the sync protocol itself: TCP, the 32-byte hint, Noise XXpsk3 as
 * initiator, a SyncSession) sends records with a bad signature, an untrusted key's
 * signature and malformed records: none is stored, a valid record sent after them is; past
 * the refusal limit the node disconnects the peer and refuses it when it comes back. Raw
 * TCP clients send garbage, another topic's hint, a wrong pre-shared key, an oversize
 * length prefix, half a hint, half a handshake, or nothing, and then a flood of idle
 * connections; UDP garbage goes to the discovery port; the node runs out of file
 * descriptors for a moment. After all that a legitimate node (a real `arca swarm` process) still
 * syncs with it, and it stops cleanly.
 *
 * Waits are bounded polls (200 ms) or bounded reads; every process is stopped by PID and
 * every socket closed.
 * @module
 */

import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { formatNixHash, sha256 } from "../../src/cache/hash.ts";
import type { SyncRecord } from "../../src/cache/remote_records.ts";
import {
  formatPublicKey,
  formatSecretKey,
  generateSecretKey,
  publicKeyOf,
  type SecretKey,
  signNarInfo,
} from "../../src/cache/signing.ts";
import { ProtocolError } from "../../src/errors.ts";
import { encodeFrame } from "../../src/net/framing.ts";
import { generateStaticKeyPair, type KeyPair, NoiseHandshake } from "../../src/net/noise.ts";
import {
  openSecureChannel,
  SECURE_CHANNEL_PROLOGUE,
  type SecureChannel,
} from "../../src/net/secure_channel.ts";
import { REFUSED_LIMIT } from "../../src/net/swarm.ts";
import { SyncSession } from "../../src/net/sync.ts";
import { narInfoOfRecord } from "../../src/net/sync_records.ts";
import { deriveTopicKeys, type TopicKeys } from "../../src/net/topic.ts";
import {
  arcaOk,
  type ArcaSwarm,
  freePort,
  freeUdpPort,
  makeArcaHome,
  startSwarm,
} from "../helpers/arca.ts";
import { HAVE_NIX, runNix } from "../helpers/nix.ts";

const NIX32 = "0123456789abcdfghijklmnpqrsvwxyz";

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

/** Settles `promise` or fails after `ms`. */
async function within<T>(what: string, ms: number, promise: Promise<T>): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`Timed out after ${ms} ms: ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** The hint a dialer sends before its handshake: nonce ‖ HMAC-SHA256(hint key, label ‖ nonce)[:16]. */
function syncHint(keys: TopicKeys): Uint8Array {
  const nonce = crypto.getRandomValues(new Uint8Array(16));
  const mac = createHmac("sha256", keys.syncHintKey).update("arca sync hint").update(nonce)
    .digest();
  const hint = new Uint8Array(32);
  hint.set(nonce);
  hint.set(mac.subarray(0, 16), 16);
  return hint;
}

/** Reads until the node closes the connection (end of stream or reset); fails after `ms`. */
async function closedByNode(conn: Deno.Conn, what: string, ms: number): Promise<void> {
  const buffer = new Uint8Array(4096);
  await within(
    `the node closes ${what}`,
    ms,
    (async () => {
      try {
        while ((await conn.read(buffer)) !== null) { /* handshake bytes, then nothing */ }
      } catch { /* reset */ }
    })(),
  );
}

function randomHashPart(): string {
  return Array.from(crypto.getRandomValues(new Uint8Array(32)), (b) => NIX32[b % 32]).join("");
}

function record(name: string, ...keys: SecretKey[]): SyncRecord {
  const hash = randomHashPart();
  const out: SyncRecord = {
    storePath: `/nix/store/${hash}-${name}`,
    narHash: formatNixHash(sha256(new TextEncoder().encode(`${name} ${hash}`))),
    narSize: 4242,
    references: [],
    sigs: [],
  };
  out.sigs = keys.map((key) => signNarInfo(narInfoOfRecord(out), key)).sort();
  return out;
}

/** A peer of the topic, in this process: it dials the node's sync port and runs a session. */
async function dialPeer(
  port: number,
  keys: TopicKeys,
  identity: KeyPair,
): Promise<{ channel: SecureChannel; session: SyncSession; run: Promise<void>; got: unknown[] }> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  await conn.write(syncHint(keys));
  const channel = await openSecureChannel(conn, {
    initiator: true,
    staticKey: identity,
    psk: keys.psk,
  });
  const got: unknown[] = [];
  const session = new SyncSession(channel, {
    initiator: true,
    source: {
      records: () => Promise.resolve([]),
      receive: (records) => {
        got.push(...records);
        return Promise.resolve();
      },
    },
  });
  const run = session.run();
  run.catch(() => {});
  return { channel, session, run, got };
}

/** The soft and hard limits on open files of a process, or null without /proc or prlimit. */
async function nofileLimits(pid: number): Promise<{ soft: string; hard: string } | null> {
  try {
    const limits = await Deno.readTextFile(`/proc/${pid}/limits`);
    const match = /^Max open files\s+(\S+)\s+(\S+)/m.exec(limits);
    const probe = await new Deno.Command("prlimit", { args: ["--version"], stdout: "null" })
      .output();
    return match && probe.success ? { soft: match[1], hard: match[2] } : null;
  } catch {
    return null;
  }
}

async function setNofile(pid: number, value: string): Promise<void> {
  const out = await new Deno.Command("prlimit", {
    args: ["--pid", String(pid), `--nofile=${value}`],
    stdout: "null",
    stderr: "piped",
  }).output();
  if (!out.success) throw new Error(`prlimit failed: ${new TextDecoder().decode(out.stderr)}`);
}

Deno.test({
  name: "e2e swarm hostile: refused records, a ban, raw TCP and UDP abuse leave the node syncing",
  ignore: !HAVE_NIX,
  async fn() {
    const home = await makeArcaHome();
    const env = home.env;
    const processes: ArcaSwarm[] = [];
    const sockets: { close(): void }[] = [];
    try {
      const team = generateSecretKey("swarm-hostile-1");
      const untrusted = generateSecretKey("swarm-hostile-other-1");
      const impostor = generateSecretKey("swarm-hostile-1"); // the trusted name, another key
      const keyFile = `${home.dir}/team.secret`;
      await Deno.writeTextFile(keyFile, formatSecretKey(team), { mode: 0o600 });
      const teamPub = formatPublicKey(publicKeyOf(team));

      const pathDir = `${home.dir}/swarm-hostile-path`;
      await Deno.mkdir(pathDir);
      await Deno.writeTextFile(`${pathDir}/data`, `hostile test ${crypto.randomUUID()}\n`);
      const localPath = (await runNix("nix-store", ["--add", pathDir])).trim();
      const nodeDir = `${home.dir}/node`;
      await arcaOk(["--cache-dir", nodeDir, "import", "--signing-key", keyFile, localPath], {
        env,
      });

      const topic = `swarm hostile ${crypto.randomUUID()}`;
      const keys = deriveTopicKeys(topic);
      const other = deriveTopicKeys(`another ${topic}`);
      const syncPort = freePort();
      const discoveryPort = freeUdpPort();
      const common = [
        "swarm",
        "--topic",
        topic,
        "--bind-address",
        "127.0.0.1",
        "--no-multicast",
        "--announce-interval",
        "1",
        "--reconcile-interval",
        "2",
        "--trusted-public-key",
        teamPub,
      ];
      const node = await startSwarm([
        "--cache-dir",
        nodeDir,
        ...common,
        "--discovery-port",
        String(discoveryPort),
        "--sync-port",
        String(syncPort),
      ], { env });
      processes.push(node);
      const remoteList = async () =>
        (await arcaOk(["--cache-dir", nodeDir, "list", "--remote"], { env })).trim();

      // 1. A peer of the topic connects, reconciles, and gets the node's record.
      const hostileId = generateStaticKeyPair();
      const peer = await dialPeer(syncPort, keys, hostileId);
      await peer.session.startRound();
      await waitFor(
        "the node's record",
        15_000,
        () => Promise.resolve(peer.got.length === 1 ? true : undefined),
      );
      assert.equal((peer.got[0] as SyncRecord).storePath, localPath);

      // 2. Refused records: an untrusted key's signature (not counted towards the limit),
      // bad signatures and malformed records (counted); then a valid one, which is stored.
      const untrustedRecords = Array.from({ length: 5 }, (_, i) => record(`u-${i}`, untrusted));
      const forged = Array.from({ length: 3 }, (_, i) => record(`f-${i}`, impostor));
      const tampered = [record("t-0", team), record("t-1", team)].map((r) => ({
        ...r,
        narSize: r.narSize + 1,
      }));
      const malformed: unknown[] = [
        {},
        "a string",
        42,
        { ...record("m-3", team), narSize: -1 },
        { ...record("m-4", team), storePath: "/tmp/not-a-store-path" },
      ];
      await peer.session.push([...untrustedRecords, ...forged, ...tampered]);
      await peer.channel.send(
        new TextEncoder().encode(JSON.stringify({ t: "records", records: malformed })),
      );
      let hostileSoFar = forged.length + tampered.length + malformed.length;
      assert.ok(hostileSoFar < REFUSED_LIMIT);
      const valid = record("valid", team, untrusted);
      await peer.session.push([valid]);
      // Records are handled in order: once the valid one is listed, the rest were judged.
      await waitFor(
        "the valid record",
        15_000,
        async () => (await remoteList()) === valid.storePath ? true : undefined,
      );
      const stored = JSON.parse(
        await Deno.readTextFile(`${nodeDir}/remote/adhoc/${valid.storePath.slice(11, 43)}.json`),
      );
      assert.deepEqual(stored.sigs, [signNarInfo(narInfoOfRecord(valid), team)]);

      // 3. Past the limit the node disconnects the peer.
      const more = Array.from(
        { length: REFUSED_LIMIT + 1 - hostileSoFar },
        (_, i) => record(`g-${i}`, impostor),
      );
      hostileSoFar += more.length;
      await peer.session.push(more);
      await within("the node disconnects the peer", 15_000, peer.channel.closed);
      await within("the peer's session ends", 5000, peer.run);
      assert.equal(await remoteList(), valid.storePath, "no refused record was stored");
      assert.match(node.stderr(), new RegExp(`more than ${REFUSED_LIMIT} refused records`));
      const refusedTotal = untrustedRecords.length + hostileSoFar;
      const status = await waitFor("the node's status shows the refusals", 15_000, async () => {
        const s = JSON.parse(
          await arcaOk(["--cache-dir", nodeDir, "status", "--json"], { env }),
        );
        const p = s.peers.find((x: { id: string }) =>
          x.id.startsWith(
            Array.from(hostileId.publicKey, (b) => b.toString(16).padStart(2, "0")).join(""),
          )
        );
        return p && !p.connected && p.recordsRefused === refusedTotal ? p : undefined;
      });
      assert.equal(status.recordsAccepted, 1);

      // ... and refuses it when it comes back (the handshake completes, then it closes).
      const again = await dialPeer(syncPort, keys, hostileId);
      await within("the banned peer is dropped", 15_000, again.channel.closed);
      await again.run;

      // 4. Raw TCP abuse.
      const raw = async () => {
        const conn = await Deno.connect({ hostname: "127.0.0.1", port: syncPort });
        sockets.push(conn);
        return conn;
      };
      const attacks: Promise<void>[] = [];
      // Garbage instead of a hint.
      const garbage = await raw();
      await garbage.write(crypto.getRandomValues(new Uint8Array(4096))).catch(() => {});
      attacks.push(closedByNode(garbage, "a garbage connection", 10_000));
      // An HTTP request.
      const http = await raw();
      await http.write(new TextEncoder().encode("GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
      attacks.push(closedByNode(http, "an HTTP request", 10_000));
      // Another topic's hint.
      const wrongHint = await raw();
      await wrongHint.write(syncHint(other));
      attacks.push(closedByNode(wrongHint, "another topic's hint", 10_000));
      // The right hint, then another topic's pre-shared key: no handshake completes.
      const wrongPsk = await raw();
      await wrongPsk.write(syncHint(keys));
      attacks.push(
        assert.rejects(
          openSecureChannel(wrongPsk, {
            initiator: true,
            staticKey: generateStaticKeyPair(),
            psk: other.psk,
          }),
          ProtocolError,
        ),
      );
      // The right hint, then an oversize length prefix.
      const oversize = await raw();
      await oversize.write(syncHint(keys));
      await oversize.write(Uint8Array.of(0xff, 0xff, 0xff, 0xff, 1, 2, 3));
      attacks.push(closedByNode(oversize, "an oversize frame", 10_000));
      // Silence, half a hint, half a frame, and a first handshake message then silence:
      // each is dropped by a timeout (5 s), several at once (14 connections in this step
      // at most, under the node's bound of 16 per address before their handshake).
      for (let i = 0; i < 5; i++) {
        attacks.push(closedByNode(await raw(), "a silent connection", 20_000));
      }
      const halfHint = await raw();
      await halfHint.write(syncHint(keys).subarray(0, 10));
      attacks.push(closedByNode(halfHint, "half a hint", 20_000));
      const halfFrame = await raw();
      await halfFrame.write(syncHint(keys));
      await halfFrame.write(Uint8Array.of(0, 0, 0, 32, 1, 2, 3, 4, 5));
      attacks.push(closedByNode(halfFrame, "half a frame", 20_000));
      const halfHandshake = await raw();
      await halfHandshake.write(syncHint(keys));
      const handshake = new NoiseHandshake({
        initiator: true,
        staticKey: generateStaticKeyPair(),
        psk: keys.psk,
        prologue: SECURE_CHANNEL_PROLOGUE,
      });
      await halfHandshake.write(encodeFrame(handshake.writeMessage()));
      attacks.push(closedByNode(halfHandshake, "half a handshake", 20_000));

      // 5. UDP garbage to the discovery port.
      const udp = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
      sockets.push(udp);
      const target = { transport: "udp" as const, hostname: "127.0.0.1", port: discoveryPort };
      for (const size of [0, 1, 64, 100, 1000, 9000, 65_000]) {
        await udp.send(crypto.getRandomValues(new Uint8Array(size)), target).catch(() => {});
      }
      await udp.send(new TextEncoder().encode("M-SEARCH * HTTP/1.1\r\n\r\n"), target);

      await Promise.all(attacks);

      // 6. A flood of idle connections: past a bound, the node closes new ones at once
      // instead of holding a socket for each until its timeout.
      const flood: Promise<void>[] = [];
      for (let i = 0; i < 200; i++) {
        flood.push(closedByNode(await raw(), "a flood connection", 30_000));
      }
      await Promise.all(flood);
      assert.match(node.stderr(), /too many connections before their handshake/);

      // 7. Out of file descriptors (its soft limit lowered with prlimit to just above what
      // it holds): accepting fails for a while, and the node keeps listening.
      const limits = await nofileLimits(node.pid);
      if (limits === null) {
        console.warn("SKIPPED the file descriptor phase: no prlimit or /proc here");
      } else {
        const held = [...Deno.readDirSync(`/proc/${node.pid}/fd`)].length;
        await setNofile(node.pid, `${held + 3}:${limits.hard}`);
        const starved: Deno.Conn[] = [];
        try {
          for (let i = 0; i < 20; i++) starved.push(await raw());
          await waitFor("a failed accept", 15_000, () =>
            Promise.resolve(
              /cannot accept a sync connection: .*os error 24/.test(node.stderr())
                ? true
                : undefined,
            ));
        } finally {
          for (const conn of starved) conn.close();
          await setNofile(node.pid, `${limits.soft}:${limits.hard}`);
        }
      }

      // 8. A legitimate node still syncs with it: it gets the node's path and the valid
      // record the hostile peer gave it, and nothing else.
      const legitDir = `${home.dir}/legit`;
      const legit = await startSwarm([
        "--cache-dir",
        legitDir,
        ...common,
        "--discovery-port",
        String(freeUdpPort()),
        "--sync-port",
        String(freePort()),
        "--static-peer",
        `127.0.0.1:${discoveryPort}`,
      ], { env });
      processes.push(legit);
      const expected = [localPath, valid.storePath].sort().join("\n");
      await waitFor("the legitimate node syncs", 20_000, async () => {
        const listed = (await arcaOk(["--cache-dir", legitDir, "list", "--remote"], { env }))
          .trim().split("\n").sort().join("\n");
        return listed === expected ? true : undefined;
      });
      assert.equal(await remoteList(), valid.storePath, "the node stored nothing else");
      // The node dials the legitimate node as well, so a session does not prove that it
      // still accepts: a new peer dials in and reconciles. It may have to retry, as real
      // peers do: the node may still be draining its accept queue of the connections of
      // step 7 (dead by now), which count against the bound on connections per address.
      const newcomerKey = generateStaticKeyPair();
      const newcomer = await waitFor("a new peer's handshake", 15_000, async () => {
        try {
          return await dialPeer(syncPort, keys, newcomerKey);
        } catch (error) {
          if (error instanceof ProtocolError) return undefined;
          throw error;
        }
      });
      await newcomer.session.startRound();
      await waitFor(
        "the newcomer's records",
        15_000,
        () => Promise.resolve(newcomer.got.length === 2 ? true : undefined),
      );
      assert.deepEqual(
        newcomer.got.map((r) => (r as SyncRecord).storePath).sort(),
        [localPath, valid.storePath].sort(),
      );
      await newcomer.channel.close();

      // 9. It stops cleanly, and at once, with connections still in their hint and
      // handshake (whose timeouts are 5 s).
      const lingering = await raw();
      const lingeringHandshake = await raw();
      await lingeringHandshake.write(syncHint(keys));
      await lingeringHandshake.write(encodeFrame(
        new NoiseHandshake({
          initiator: true,
          staticKey: generateStaticKeyPair(),
          psk: keys.psk,
          prologue: SECURE_CHANNEL_PROLOGUE,
        }).writeMessage(),
      ));
      const answer = await within(
        "the node's handshake answer",
        10_000,
        lingeringHandshake.read(new Uint8Array(1024)),
      );
      assert.ok(answer !== null && answer > 0);
      const ended = await node.stop(4000);
      assert.equal(ended.signal, null, "not killed: it stopped before the 4 s grace period");
      assert.equal(ended.code, 0, `exit code, stderr: ${node.stderr()}`);
      await closedByNode(lingering, "a lingering connection on stop", 5000);
      const legitEnded = await legit.stop();
      assert.equal(legitEnded.code, 0, `exit code, stderr: ${legit.stderr()}`);
    } finally {
      for (const socket of sockets) {
        try {
          socket.close();
        } catch { /* already closed */ }
      }
      await Promise.all(processes.map((p) => p.stop()));
      await home.cleanup();
    }
  },
});
