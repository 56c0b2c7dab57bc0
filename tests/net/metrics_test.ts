/**
 * `/metrics`: the exposition parses as Prometheus text (every sample line well formed, every
 * family typed), counters move with requests, and `serve --metrics-bind` exposes it on its
 * own address only, never on the public one.
 * @module
 */

import assert from "node:assert/strict";
import { createHandler } from "../../src/net/server.ts";
import { importFixture, makeCacheFixture, sampleTree } from "../helpers/cache_fixture.ts";
import { freePort, makeArcaHome, startServe } from "../helpers/arca.ts";

const SAMPLE =
  /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"\\\n]*",?)*\})? (-?[0-9.e+-]+|\+Inf|NaN)$/;

/** Parses the text format strictly: name{labels} → value; throws on any malformed line. */
function parseExposition(text: string): Map<string, number> {
  const samples = new Map<string, number>();
  const typed = new Set<string>();
  for (const line of text.trimEnd().split("\n")) {
    if (line.startsWith("# HELP ")) continue;
    const type = /^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram|summary|untyped)$/
      .exec(line);
    if (type) {
      typed.add(type[1]);
      continue;
    }
    const match = SAMPLE.exec(line);
    assert.ok(match, `malformed line: ${line}`);
    const family = match[1].replace(/_(bucket|sum|count)$/, "");
    assert.ok(typed.has(match[1]) || typed.has(family), `untyped sample: ${line}`);
    samples.set(
      line.slice(0, line.lastIndexOf(" ")),
      Number(line.slice(line.lastIndexOf(" ") + 1)),
    );
  }
  return samples;
}

Deno.test("metrics: counters move with requests and the text parses", async () => {
  await using fixture = await makeCacheFixture();
  const imported = await importFixture(fixture.cache, sampleTree("metrics"));
  const handler = createHandler(fixture.cache, { priority: 30 });
  try {
    const before = parseExposition(await handler.metrics.render(fixture.cache));
    assert.equal(before.get("arca_store_paths"), 1);
    assert.equal(before.get('arca_cache_hits_total{source="local"}'), 0);
    const get = async (path: string) => {
      const response = await handler(new Request(`http://arca${path}`));
      return { status: response.status, body: new Uint8Array(await response.arrayBuffer()) };
    };
    const narinfo = await get(`/${imported.hashPart}.narinfo`);
    const url = /^URL: (.*)$/m.exec(new TextDecoder().decode(narinfo.body))![1];
    const nar = await get(`/${url}`);
    await get(`/${imported.hashPart}.narinfo`);
    await get("/00000000000000000000000000000000.narinfo");
    await get("/nix-cache-info");
    const after = parseExposition(await handler.metrics.render(fixture.cache));
    assert.equal(
      after.get('arca_http_requests_total{route="narinfo",method="GET",status="200"}'),
      2,
    );
    assert.equal(
      after.get('arca_http_requests_total{route="narinfo",method="GET",status="404"}'),
      1,
    );
    assert.equal(after.get('arca_http_requests_total{route="nar",method="GET",status="200"}'), 1);
    assert.equal(after.get('arca_cache_hits_total{source="local"}'), 1);
    assert.equal(after.get('arca_http_response_bytes_total{route="nar"}'), nar.body.length);
    assert.equal(after.get('arca_http_request_duration_seconds_count{route="narinfo"}'), 3);
    assert.equal(after.get('arca_http_request_duration_seconds_bucket{route="nar",le="+Inf"}'), 1);
    assert.equal(after.get("arca_swarm_peers_connected"), 0);
  } finally {
    await handler.close();
  }
});

Deno.test("metrics: serve --metrics-bind exposes /metrics there only", async () => {
  const home = await makeArcaHome();
  const metricsPort = freePort();
  const server = await startServe(
    ["--cache-dir", home.cacheDir, "--metrics-bind", `127.0.0.1:${metricsPort}`],
    { env: home.env },
  );
  try {
    const publicMetrics = await fetch(`${server.url}/metrics`);
    await publicMetrics.body?.cancel();
    assert.equal(publicMetrics.status, 404, "not on the public address");
    await (await fetch(`${server.url}/nix-cache-info`)).arrayBuffer();
    let text = "";
    for (let i = 0; i < 50 && !text; i++) {
      try {
        const response = await fetch(`http://127.0.0.1:${metricsPort}/metrics`);
        text = await response.text();
        assert.match(response.headers.get("content-type") ?? "", /^text\/plain; version=0\.0\.4/);
      } catch {
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    }
    const samples = parseExposition(text);
    assert.equal(
      samples.get('arca_http_requests_total{route="nix-cache-info",method="GET",status="200"}'),
      1,
    );
    assert.equal(
      samples.get('arca_http_requests_total{route="other",method="GET",status="404"}'),
      1,
    );
  } finally {
    await server.stop();
    await home.cleanup();
  }
});
