/**
 * Config of upstream caches: `[[upstreams]]` tables (url, trusted_public_keys, priority),
 * `upstream_timeout` and `upstream_negative_ttl`, and the `--upstream`,
 * `--trusted-public-key`, `--upstream-timeout` and `--upstream-negative-ttl` flags merged in.
 * Bad values are errors naming the table's line (config) or the option (flags), exit 2.
 * @module
 */

import assert from "node:assert/strict";
import {
  type FlagSettings,
  loadSettings,
  parseConfigText,
  parseUpstreamUrl,
} from "../src/config.ts";
import { ConfigError, UsageError } from "../src/errors.ts";

const KEY_A = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
const KEY_B = "team-1:" + "A".repeat(43) + "=";

async function load(text: string, flags: FlagSettings = {}) {
  const dir = await Deno.makeTempDir({ prefix: "arca-config-upstreams-" });
  try {
    await Deno.writeTextFile(`${dir}/config.toml`, text);
    return await loadSettings({ config: `${dir}/config.toml`, ...flags }, {
      env: { HOME: dir },
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("config: [[upstreams]] are read and ordered by priority, ties in file order", async () => {
  const settings = await load(`
upstream_timeout = "2s"
upstream_negative_ttl = "10m"

[[upstreams]]
url = "https://b.example/cache/"
trusted_public_keys = ["${KEY_B}"]

[[upstreams]]
url = "https://cache.nixos.org"
trusted_public_keys = ["${KEY_A}"]
priority = 40

[[upstreams]]
url = "http://c.example:8080"
trusted_public_keys = ["${KEY_B}", "${KEY_A}"]
`);
  assert.deepEqual(settings.upstreams, [
    { url: "https://cache.nixos.org", trustedPublicKeys: [KEY_A], priority: 40 },
    { url: "https://b.example/cache", trustedPublicKeys: [KEY_B], priority: 50 },
    { url: "http://c.example:8080", trustedPublicKeys: [KEY_B, KEY_A], priority: 50 },
  ]);
  assert.equal(settings.upstreamTimeoutMs, 2000);
  assert.equal(settings.upstreamNegativeTtlMs, 600_000);
});

Deno.test("config: --upstream URLs come first, with the --trusted-public-key keys; flags override durations", async () => {
  const settings = await load(
    `upstream_timeout = "2s"\n[[upstreams]]\nurl = "https://cache.nixos.org"\ntrusted_public_keys = ["${KEY_A}"]\n`,
    {
      upstreams: ["http://127.0.0.1:9000/", "http://127.0.0.1:9001"],
      upstreamTrustedKeys: [KEY_B],
      upstreamTimeout: "1s",
      upstreamNegativeTtl: "30s",
    },
  );
  assert.deepEqual(settings.upstreams.map((u) => [u.url, u.trustedPublicKeys]), [
    ["http://127.0.0.1:9000", [KEY_B]],
    ["http://127.0.0.1:9001", [KEY_B]],
    ["https://cache.nixos.org", [KEY_A]],
  ]);
  assert.equal(settings.upstreamTimeoutMs, 1000);
  assert.equal(settings.upstreamNegativeTtlMs, 30_000);
});

Deno.test("config: bad [[upstreams]] tables and durations name the line", () => {
  const cases: [string, number, RegExp][] = [
    [`[[upstreams]]\ntrusted_public_keys = ["${KEY_A}"]\n`, 1, /'url' is required/],
    [
      `# the upstreams\n[[upstreams]]\nurl = "ftp://example"\ntrusted_public_keys = ["${KEY_A}"]\n`,
      2,
      /\(\[\[upstreams\]\] #1\): Invalid upstream URL "ftp:\/\/example"/,
    ],
    [
      `[[upstreams]]\nurl = "ftp://example"\ntrusted_public_keys = ["${KEY_A}"]\n`,
      1,
      /expected http:\/\/ or https:\/\//,
    ],
    [
      `[[upstreams]]\nurl = "https://u:p@example"\ntrusted_public_keys = ["${KEY_A}"]\n`,
      1,
      /credentials/,
    ],
    [
      `[[upstreams]]\nurl = "https://example?x=1"\ntrusted_public_keys = ["${KEY_A}"]\n`,
      1,
      /query or fragment/,
    ],
    [`[[upstreams]]\nurl = "https://example"\n`, 1, /'trusted_public_keys' is required/],
    [
      `[[upstreams]]\nurl = "https://example"\ntrusted_public_keys = []\n`,
      1,
      /is empty: an upstream needs a trusted key/,
    ],
    [
      `[[upstreams]]\nurl = "https://example"\ntrusted_public_keys = ["nope"]\n`,
      1,
      /Invalid key in 'trusted_public_keys' "nope"/,
    ],
    [
      `[[upstreams]]\nurl = "https://a"\ntrusted_public_keys = ["${KEY_A}"]\n\n[[upstreams]]\nurl = "https://b"\ntrusted_public_keys = ["${KEY_A}"]\npriority = -1\n`,
      5,
      /#2\): 'priority' must be an integer from 0 to 10000/,
    ],
    [
      `[[upstreams]]\nurl = "https://a"\ntrusted_public_keys = ["${KEY_A}"]\ncolour = "red"\n`,
      1,
      /unknown key 'colour' \(known: url, trusted_public_keys, priority\)/,
    ],
    [`upstreams = "https://a"\n`, 1, /must be an array of tables/],
    [`upstream_timeout = "5"\n`, 1, /'upstream_timeout' must be a duration/],
    [`upstream_negative_ttl = "0s"\n`, 1, /'upstream_negative_ttl' must be longer than 0s/],
  ];
  for (const [text, line, pattern] of cases) {
    assert.throws(
      () => parseConfigText(text, "/etc/arca.toml"),
      (error: unknown) => {
        assert.ok(error instanceof ConfigError, String(error));
        assert.equal(error.exitCode, 2);
        assert.match(error.message, new RegExp(`^Invalid config /etc/arca.toml line ${line}\\b`));
        assert.match(error.message, pattern);
        return true;
      },
      text,
    );
  }
});

Deno.test("config: bad upstream flags are usage errors", async () => {
  const cases: [FlagSettings, RegExp][] = [
    [{ upstreams: ["http://a"] }, /--upstream needs --trusted-public-key/],
    [{ upstreamTrustedKeys: [KEY_A] }, /--trusted-public-key needs --upstream/],
    [{ upstreams: ["a.example"], upstreamTrustedKeys: [KEY_A] }, /Invalid upstream URL/],
    [
      { upstreams: ["http://a"], upstreamTrustedKeys: ["x:y"] },
      /Invalid key in --trusted-public-key/,
    ],
    [{ upstreamTimeout: "soon" }, /'upstream_timeout' must be a duration/],
  ];
  for (const [flags, pattern] of cases) {
    await assert.rejects(load("", flags), (error: unknown) => {
      assert.ok(error instanceof UsageError, String(error));
      assert.match(error.message, pattern);
      return true;
    });
  }
});

Deno.test("config: parseUpstreamUrl keeps a path and drops trailing slashes", () => {
  assert.equal(parseUpstreamUrl("https://cache.nixos.org/"), "https://cache.nixos.org");
  assert.equal(parseUpstreamUrl("http://[::1]:8080/a/b//"), "http://[::1]:8080/a/b");
  assert.throws(() => parseUpstreamUrl("file:///tmp/cache"), UsageError);
});
