/**
 * Prometheus metrics of the substituter, in the text exposition format (version 0.0.4):
 * requests by route, method and status; response bytes by route; narinfo and NAR latency
 * histograms (time to the response head); NAR hits by source; and, computed when scraped,
 * the store (paths, NAR bytes, stored bytes, chunks, dedup ratio) and the running swarm
 * (peers connected, records received and refused, from `swarm-status.json`).
 *
 * Counting costs a few map updates per request, so it is always on; the metrics are
 * served only on `--metrics-bind`, never on the public substituter address.
 * @module
 */

import { join } from "node:path";
import type { Cache, CacheStats } from "../cache/cache.ts";
import type { SwarmStatus } from "./swarm.ts";

/** The routes requests are counted by. */
export type MetricsRoute = "nix-cache-info" | "narinfo" | "nar" | "ls" | "log" | "other";

const BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];
/** How long store figures are reused between scrapes (listing a big cache is not free). */
const STORE_TTL_MS = 15_000;

/** The route of a raw request path, for labels. */
export function routeOf(path: string): MetricsRoute {
  if (path.endsWith(".narinfo")) return "narinfo";
  if (path.startsWith("/nar/")) return "nar";
  if (path === "/nix-cache-info") return "nix-cache-info";
  if (path.startsWith("/log/")) return "log";
  if (path.endsWith(".ls")) return "ls";
  return "other";
}

interface Histogram {
  counts: number[];
  sum: number;
  count: number;
}

/** Counters of one server. */
export class Metrics {
  #requests = new Map<string, number>();
  #bytes = new Map<string, number>();
  #latency = new Map<string, Histogram>();
  #hits = new Map<string, number>([["local", 0], ["peer", 0], ["upstream", 0]]);
  #store?: { at: number; stats: CacheStats };

  /** Counts one answered request. */
  countRequest(
    route: MetricsRoute,
    method: string,
    status: number,
    bytes: number,
    seconds: number,
    hitSource: "local" | "peer" | "upstream" = "local",
  ) {
    const key = `route="${route}",method="${
      method === "GET" || method === "HEAD" || method === "PUT" ? method : "other"
    }",status="${status}"`;
    this.#requests.set(key, (this.#requests.get(key) ?? 0) + 1);
    if (bytes > 0) this.#bytes.set(route, (this.#bytes.get(route) ?? 0) + bytes);
    if (route === "narinfo" || route === "nar") {
      let histogram = this.#latency.get(route);
      if (!histogram) {
        histogram = { counts: BUCKETS.map(() => 0), sum: 0, count: 0 };
        this.#latency.set(route, histogram);
      }
      for (let i = 0; i < BUCKETS.length; i++) if (seconds <= BUCKETS[i]) histogram.counts[i]++;
      histogram.sum += seconds;
      histogram.count++;
    }
    if (route === "nar" && method === "GET" && (status === 200 || status === 206)) {
      this.#hits.set(hitSource, this.#hits.get(hitSource)! + 1);
    }
  }

  /** NAR responses by where their data came from. */
  hits(): { local: number; peer: number; upstream: number } {
    return {
      local: this.#hits.get("local")!,
      peer: this.#hits.get("peer")!,
      upstream: this.#hits.get("upstream")!,
    };
  }

  /** The exposition text, with the store and swarm figures of `cache`. */
  async render(cache: Cache): Promise<string> {
    const lines: string[] = [];
    const family = (name: string, type: string, help: string) =>
      lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
    family("arca_http_requests_total", "counter", "HTTP requests by route, method and status.");
    for (const [labels, value] of this.#requests) {
      lines.push(`arca_http_requests_total{${labels}} ${value}`);
    }
    family(
      "arca_http_response_bytes_total",
      "counter",
      "Bytes of response bodies by route (Content-Length).",
    );
    for (const [route, value] of this.#bytes) {
      lines.push(`arca_http_response_bytes_total{route="${route}"} ${value}`);
    }
    family(
      "arca_http_request_duration_seconds",
      "histogram",
      "Time to the response head, narinfo and NAR requests.",
    );
    for (const [route, h] of this.#latency) {
      BUCKETS.forEach((bound, i) => {
        lines.push(
          `arca_http_request_duration_seconds_bucket{route="${route}",le="${bound}"} ${
            h.counts[i]
          }`,
        );
      });
      lines.push(
        `arca_http_request_duration_seconds_bucket{route="${route}",le="+Inf"} ${h.count}`,
      );
      lines.push(`arca_http_request_duration_seconds_sum{route="${route}"} ${h.sum}`);
      lines.push(`arca_http_request_duration_seconds_count{route="${route}"} ${h.count}`);
    }
    family("arca_cache_hits_total", "counter", "NARs served, by where their data came from.");
    for (const [source, value] of this.#hits) {
      lines.push(`arca_cache_hits_total{source="${source}"} ${value}`);
    }

    const now = Date.now();
    if (!this.#store || now - this.#store.at > STORE_TTL_MS) {
      this.#store = { at: now, stats: await cache.stats() };
    }
    const stats = this.#store.stats;
    const gauge = (name: string, help: string, value: number) => {
      family(name, "gauge", help);
      lines.push(`${name} ${value}`);
    };
    gauge("arca_store_paths", "Cached store paths.", stats.paths);
    gauge("arca_store_nar_bytes", "Bytes of the cached paths' NARs.", stats.narBytes);
    gauge("arca_store_stored_bytes", "Bytes of chunk files on disk.", stats.storedBytes);
    gauge("arca_store_chunks", "Chunk files on disk.", stats.chunks);
    gauge("arca_store_dedup_ratio", "NAR bytes per stored byte.", stats.dedupRatio);

    const swarm = await readSwarmStatus(cache.cacheDir);
    const peers = swarm?.segments.flatMap((s) => s.peers) ?? [];
    gauge(
      "arca_swarm_peers_connected",
      "Swarm peers with an open session (all segments).",
      peers.filter((p) => p.connected).length,
    );
    family("arca_sync_records_total", "counter", "Records received from swarm peers, by outcome.");
    lines.push(
      `arca_sync_records_total{outcome="accepted"} ${
        peers.reduce((n, p) => n + p.recordsAccepted, 0)
      }`,
    );
    lines.push(
      `arca_sync_records_total{outcome="refused"} ${
        peers.reduce((n, p) => n + ((p as { recordsRefused?: number }).recordsRefused ?? 0), 0)
      }`,
    );
    return lines.join("\n") + "\n";
  }
}

/** The running swarm's status file, or null when no swarm runs (or it died). */
export async function readSwarmStatus(cacheDir: string): Promise<SwarmStatus | null> {
  try {
    const status = JSON.parse(
      await Deno.readTextFile(join(cacheDir, "swarm-status.json")),
    ) as SwarmStatus;
    return Date.now() - status.updatedAt < 10_000 ? status : null;
  } catch {
    return null;
  }
}
