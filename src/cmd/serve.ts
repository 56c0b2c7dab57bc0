/**
 * `arca serve`: the HTTP substituter on `--bind` (default 127.0.0.1:5555) until SIGINT or
 * SIGTERM, importing what the post-build hook spools, and pulling paths it lacks through
 * from the upstream caches (`--upstream`, `[[upstreams]]`). {@link startSubstituter} is
 * shared with `arca swarm --also-serve`.
 * @module
 */

import type { Command } from "commander";
import { join } from "node:path";
import type { Cache } from "../cache/cache.ts";
import { startSpoolDrainer } from "../cache/spool.ts";
import { parsePublicKey, type PublicKey, type SecretKey } from "../cache/signing.ts";
import { type BindAddress, parseBindAddress, type Settings } from "../config.ts";
import { FormatError, UsageError } from "../errors.ts";
import { UpstreamSource } from "../net/upstream.ts";
import { readTokenFile } from "../net/auth.ts";
import { createHandler, type PathSource } from "../net/server.ts";
import type { Metrics } from "../net/metrics.ts";
import { type GlobalOptions, openCache, settingsOf, signingKeyOf } from "./common.ts";
import { segmentChooser } from "./import.ts";

/** A running substituter. */
export interface Substituter {
  server: Deno.HttpServer;
  /** What the substituter counted. */
  metrics: Metrics;
  /** Stops serving, writes pending serve records, stops draining the spool. */
  stop(): Promise<void>;
}

/** Collects a repeatable option's values (commander's option argument parser). */
export function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

/** Parses trusted public keys (`name:base64`); UsageError naming `where` for a bad one. */
export function parseTrustedKeys(texts: readonly string[], where: string): PublicKey[] {
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

/**
 * The settings' upstream caches as one path source (undefined when there are none). It
 * imports what it fetches with the settings' compression and segments; close it when done.
 */
export function upstreamSourceOf(
  cache: Cache,
  settings: Settings,
  options: { log?: (message: string) => void } = {},
): UpstreamSource | undefined {
  if (settings.upstreams.length === 0) return undefined;
  return new UpstreamSource(cache, {
    upstreams: settings.upstreams.map((upstream) => ({
      url: upstream.url,
      trustedKeys: parseTrustedKeys(upstream.trustedPublicKeys, `upstream ${upstream.url}`),
    })),
    compression: settings.compression,
    segments: settings.segments,
    timeoutMs: settings.upstreamTimeoutMs,
    negativeTtlMs: settings.upstreamNegativeTtlMs,
    log: options.log,
  });
}

/**
 * Starts the substituter on `address` with the settings' tokens (uploads, reads), signing
 * key and upstreams, and the spool drainer of the post-build hook. Paths this cache lacks
 * are asked of `peerSources` first, then of the upstreams.
 */
export async function startSubstituter(
  cache: Cache,
  settings: Settings,
  options: {
    address: BindAddress;
    signingKey?: SecretKey;
    verbose: boolean;
    /** Serve `GET /metrics` (Prometheus) on this address; nowhere when unset. */
    metricsAddress?: BindAddress;
    /** Swarm peers, asked for paths this cache lacks before any upstream. */
    peerSources?: PathSource[];
  },
): Promise<Substituter> {
  const log = (message: string) => console.error(message);
  const uploadToken = settings.uploadTokenFile === undefined
    ? undefined
    : await readTokenFile(settings.uploadTokenFile);
  const readToken = settings.readTokenFile === undefined
    ? undefined
    : await readTokenFile(settings.readTokenFile);
  const upstream = upstreamSourceOf(cache, settings, { log });
  if (upstream) console.log(`Pulling through from ${upstream.urls.join(", ")}`);
  const handler = createHandler(cache, {
    priority: settings.priority,
    signingKey: options.signingKey,
    log,
    logRequests: options.verbose,
    readToken,
    sources: [...(options.peerSources ?? []), ...(upstream ? [upstream] : [])],
    upload: uploadToken === undefined ? undefined : {
      token: uploadToken,
      compression: settings.compression,
      segments: settings.segments,
    },
    // Its responses go straight to Deno.serve below.
    reusePieces: true,
  });
  const metricsResponse = async () =>
    new Response(await handler.metrics.render(cache), {
      headers: { "content-type": "text/plain; version=0.0.4; charset=utf-8" },
    });
  // Metrics are served only where --metrics-bind says: on their own address, or on the
  // substituter's when it names that one.
  const metrics = options.metricsAddress;
  const sameAddress = metrics !== undefined && metrics.hostname === options.address.hostname &&
    metrics.port === options.address.port;
  const server = Deno.serve(
    {
      hostname: options.address.hostname,
      port: options.address.port,
      onListen: (address) => {
        const host = address.hostname.includes(":") ? `[${address.hostname}]` : address.hostname;
        console.log(`Serving ${settings.cacheDir} on http://${host}:${address.port}`);
      },
    },
    (request) =>
      sameAddress && request.method === "GET" && new URL(request.url).pathname === "/metrics"
        ? metricsResponse()
        : handler(request),
  );
  const metricsServer = metrics && !sameAddress
    ? Deno.serve({
      hostname: metrics.hostname,
      port: metrics.port,
      onListen: (address) =>
        console.log(`Metrics on http://${address.hostname}:${address.port}/metrics`),
    }, (request) =>
      request.method === "GET" && new URL(request.url).pathname === "/metrics"
        ? metricsResponse()
        : Promise.resolve(new Response("Not found\n", { status: 404 })))
    : undefined;
  // Paths the post-build hook spooled (arca install-hook) are imported as they come.
  const drainer = startSpoolDrainer(cache, join(settings.cacheDir, "spool"), {
    compression: settings.compression,
    signingKey: options.signingKey,
    segmentOf: segmentChooser(settings),
    log,
  });
  let stopped: Promise<void> | undefined;
  return {
    server,
    metrics: handler.metrics,
    stop() {
      stopped ??= (async () => {
        await server.shutdown();
        await metricsServer?.shutdown();
        await handler.close();
        await upstream?.close();
        await drainer.stop();
      })();
      return stopped;
    },
  };
}

/** Registers `serve`. */
export function registerServe(program: Command): void {
  program.command("serve")
    .description("serve the cache to Nix as an HTTP binary cache (substituter)")
    .option("--bind <host:port>", "listen address (default from config: 127.0.0.1:5555)")
    .option("--priority <n>", "Priority in /nix-cache-info; lower is preferred (default 30)")
    .option(
      "--signing-key <file>",
      "sign served narinfos lacking this key's signature, and uploaded paths",
    )
    .option("--upload-token-file <file>", "accept uploads (nix copy --to) carrying this token")
    .option("--read-token-file <file>", "require this token (or the upload token) for reads")
    .option(
      "--metrics-bind <host:port>",
      "serve Prometheus /metrics on this address (off otherwise)",
    )
    .option(
      "--upstream <url>",
      "pull paths this cache lacks through from this binary cache (repeatable, in priority order)",
      collect,
      [],
    )
    .option(
      "--trusted-public-key <name:key>",
      "accept --upstream narinfos signed by this key (repeatable)",
      collect,
      [],
    )
    .option(
      "--upstream-timeout <duration>",
      "skip an upstream that takes longer to answer, or a NAR that stalls (default from config: 5s)",
    )
    .option(
      "--upstream-negative-ttl <duration>",
      "remember paths no upstream has for this long (default from config: 1m)",
    )
    .action(
      async (
        flags: {
          bind?: string;
          priority?: string;
          signingKey?: string;
          uploadTokenFile?: string;
          readTokenFile?: string;
          metricsBind?: string;
          upstream: string[];
          trustedPublicKey: string[];
          upstreamTimeout?: string;
          upstreamNegativeTtl?: string;
        },
        command: Command,
      ) => {
        const settings = await settingsOf(command, {
          ...flags,
          upstreams: flags.upstream,
          upstreamTrustedKeys: flags.trustedPublicKey,
        });
        const verbose = (command.optsWithGlobals() as GlobalOptions).verbose === true;
        const signingKey = await signingKeyOf(settings);
        const address = parseBindAddress(settings.bind);
        const cache = await openCache(settings);
        let substituter: Substituter | undefined;
        const stop = () => void substituter?.stop();
        Deno.addSignalListener("SIGINT", stop);
        Deno.addSignalListener("SIGTERM", stop);
        try {
          const metricsAddress = flags.metricsBind === undefined
            ? undefined
            : parseBindAddress(flags.metricsBind);
          substituter = await startSubstituter(cache, settings, {
            address,
            signingKey,
            verbose,
            metricsAddress,
          });
          await substituter.server.finished;
          await substituter.stop();
        } finally {
          Deno.removeSignalListener("SIGINT", stop);
          Deno.removeSignalListener("SIGTERM", stop);
          cache.close();
        }
      },
    );
}
