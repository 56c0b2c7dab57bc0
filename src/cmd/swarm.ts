/**
 * `arca swarm`: shares the cache's signed records with the peers of each segment (LAN
 * multicast and/or static peers, Noise-encrypted connections, set reconciliation), and
 * with `--also-serve` runs the substituter in the same process.
 * @module
 */

import type { Command } from "commander";
import { NIXPKGS_PUBLIC_KEY } from "../cache/segments.ts";
import { parsePublicKey, type PublicKey } from "../cache/signing.ts";
import { parseBindAddress } from "../config.ts";
import { FormatError, UsageError } from "../errors.ts";
import { DEFAULT_DISCOVERY_PORT, parseHostPort } from "../net/discovery.ts";
import { loadIdentity, Swarm, type SwarmSegment } from "../net/swarm.ts";
import { type GlobalOptions, openCache, settingsOf, signingKeyOf } from "./common.ts";
import { startSubstituter } from "./serve.ts";
import { PeerFetcher } from "../net/peer_fetch.ts";

interface SwarmFlags {
  topic?: string;
  discoveryPort: string;
  multicastPort?: string;
  syncPort: string;
  httpPort: string;
  bindAddress: string;
  alsoServe?: boolean;
  metricsBind?: string;
  staticPeer: string[];
  trustedPublicKey: string[];
  multicast: boolean;
  multicastInterface: string;
  reconcileInterval: string;
  announceInterval: string;
}

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

function port(name: string, text: string, allowZero = true): number {
  const value = Number(text);
  if (!/^\d{1,5}$/.test(text) || value > 65535 || (!allowZero && value === 0)) {
    throw new UsageError(`Invalid ${name} '${text}': expected a port number`);
  }
  return value;
}

function keys(texts: readonly string[], where: string): PublicKey[] {
  return texts.map((text) => {
    try {
      return parsePublicKey(text);
    } catch (error) {
      if (error instanceof FormatError) {
        throw new UsageError(`Invalid trusted key in ${where}: ${error.message}`);
      }
      throw error;
    }
  });
}

/** Registers `swarm`. */
export function registerSwarm(program: Command): void {
  program.command("swarm")
    .description(
      "share signed records with the peers of each segment (LAN multicast, static peers)",
    )
    .option(
      "--topic <string>",
      "an ad-hoc segment sharing every path, instead of the configured segments' topic keys",
    )
    .option(
      "--discovery-port <port>",
      "UDP port of discovery beacons",
      String(DEFAULT_DISCOVERY_PORT),
    )
    .option(
      "--multicast-port <port>",
      "UDP port of multicast beacons (default: the discovery port)",
    )
    .option("--sync-port <port>", "TCP port of Noise sync connections", "7071")
    .option(
      "--http-port <port>",
      "port of the substituter with --also-serve (advertised to peers)",
      "5555",
    )
    .option(
      "--bind-address <address>",
      "address to bind discovery, sync and --also-serve",
      "0.0.0.0",
    )
    .option("--also-serve", "run the HTTP substituter in the same process")
    .option("--metrics-bind <host:port>", "with --also-serve: Prometheus /metrics on this address")
    .option("--static-peer <host:port>", "a peer's discovery address (repeatable)", collect, [])
    .option(
      "--trusted-public-key <name:key>",
      "accept peers' records signed by this key (repeatable)",
      collect,
      [],
    )
    .option("--no-multicast", "static peers only: send and accept no multicast beacons")
    .option("--multicast-interface <address>", "interface address for multicast", "0.0.0.0")
    .option("--reconcile-interval <seconds>", "time between reconciliation rounds", "30")
    .option("--announce-interval <seconds>", "time between discovery announces", "5")
    .action(async (flags: SwarmFlags, command: Command) => {
      const settings = await settingsOf(command);
      if (flags.metricsBind !== undefined && !flags.alsoServe) {
        throw new UsageError("--metrics-bind needs --also-serve");
      }
      const verbose = (command.optsWithGlobals() as GlobalOptions).verbose === true;
      const staticPeers = [...settings.staticPeers, ...flags.staticPeer];
      for (const peer of staticPeers) {
        try {
          parseHostPort(peer);
        } catch (error) {
          throw new UsageError((error as Error).message);
        }
      }
      const globalKeys = [
        ...keys(settings.trustedPublicKeys, "config trusted_public_keys"),
        ...keys(flags.trustedPublicKey, "--trusted-public-key"),
      ];
      const signingKey = await signingKeyOf(settings);
      // A node trusts its own signing key: its own records are acceptable to itself.
      if (signingKey) globalKeys.push({ name: signingKey.name, key: signingKey.publicKey });
      let segments: SwarmSegment[];
      if (flags.topic !== undefined) {
        if (flags.topic.length < 8) throw new UsageError("--topic must be at least 8 characters");
        segments = [{
          name: "adhoc",
          topic: flags.topic,
          filter: "all",
          trustedKeys: globalKeys,
          localPaths: "all",
        }];
      } else {
        segments = settings.segments.filter((s) => s.topicKey !== undefined).map((s) => ({
          name: s.name,
          topic: s.topicKey!,
          filter: s.filter,
          // A nixpkgs segment takes exactly the paths cache.nixos.org signed: its
          // signature is enough to accept them.
          trustedKeys: [
            ...globalKeys,
            ...keys(s.trustedPublicKeys ?? [], `segment ${s.name}`),
            ...(s.filter === "nixpkgs" ? [NIXPKGS_PUBLIC_KEY] : []),
          ],
          localPaths: "segment" as const,
        }));
        if (segments.length === 0) {
          throw new UsageError(
            "No segment has a topic_key: give --topic, or set topic_key (from `arca keygen`) in a [[segments]] table",
          );
        }
      }
      for (const segment of segments) {
        if (segment.trustedKeys.length === 0) {
          console.error(
            `warning: segment ${segment.name} trusts no key: peers' records will all be refused (use --trusted-public-key)`,
          );
        }
      }
      const interval = (name: string, text: string) => {
        const seconds = Number(text);
        if (!(seconds > 0 && seconds <= 86400)) throw new UsageError(`Invalid ${name} '${text}'`);
        return seconds * 1000;
      };
      const log = (message: string) => console.error(message);
      const cache = await openCache(settings);
      const identity = await loadIdentity(settings.cacheDir);
      const httpPort = port("--http-port", flags.httpPort);
      const swarm = new Swarm(cache, {
        segments,
        identity,
        bindAddress: flags.bindAddress,
        discoveryPort: port("--discovery-port", flags.discoveryPort),
        multicastPort: flags.multicastPort === undefined
          ? undefined
          : port("--multicast-port", flags.multicastPort),
        multicast: flags.multicast,
        multicastInterface: flags.multicastInterface,
        syncPort: port("--sync-port", flags.syncPort),
        httpPort: flags.alsoServe ? httpPort : 0,
        staticPeers,
        reconcileIntervalMs: interval("--reconcile-interval", flags.reconcileInterval),
        announceIntervalMs: interval("--announce-interval", flags.announceInterval),
        log: verbose ? log : (message) => {
          if (!message.startsWith("swarm: cannot connect")) log(message);
        },
      });
      // The same substituter as `serve` (uploads and reads per the tokens, the spool
      // drained), which also serves what peers hold, fetching it from them.
      const fetcher = new PeerFetcher(cache, swarm, {
        compression: settings.compression,
        segments: settings.segments,
        log,
      });
      const substituter = flags.alsoServe
        ? await startSubstituter(cache, settings, {
          address: parseBindAddress(`${flags.bindAddress}:${httpPort}`),
          signingKey,
          verbose,
          metricsAddress: flags.metricsBind === undefined
            ? undefined
            : parseBindAddress(flags.metricsBind),
          peerSources: [fetcher],
        })
        : undefined;
      if (substituter) {
        swarm.setFetchStatus(() => {
          const hits = substituter.metrics.hits();
          return { ...fetcher.stats, narsServedLocal: hits.local, narsServedFromPeers: hits.peer };
        });
      }
      await swarm.start();
      console.log(
        `Swarm node ${swarm.nodeId.slice(0, 16)} sharing ${segments.map((s) => s.name).join(", ")}`,
      );
      let stop!: () => void;
      const stopped = new Promise<void>((resolve) => (stop = resolve));
      Deno.addSignalListener("SIGINT", stop);
      Deno.addSignalListener("SIGTERM", stop);
      try {
        await stopped;
      } finally {
        Deno.removeSignalListener("SIGINT", stop);
        Deno.removeSignalListener("SIGTERM", stop);
        await substituter?.stop();
        await fetcher.settle();
        await swarm.stop();
        cache.close();
      }
    });
}
