/**
 * Configuration: the commented default file written on first run, precedence
 * (flag > PARES_ARCA_DIR > config > default for cache_dir; flag > config > default for the
 * rest), and errors that name the file, the key and the line while leaving the file as it
 * was. Every case uses its own temporary HOME/XDG directories and an explicit `env`.
 * @module
 */

import assert from "node:assert/strict";
import {
  DEFAULT_BIND,
  DEFAULT_PRIORITY,
  defaultConfigText,
  type Environment,
  loadSettings,
  parseBindAddress,
  parseConfigText,
} from "../src/config.ts";
import { ConfigError, NotFoundError, UsageError } from "../src/errors.ts";

interface Home {
  root: string;
  env: Environment;
  /** The default config file path under this home. */
  configPath: string;
  defaultCacheDir: string;
}

async function withHome(fn: (home: Home) => Promise<void>): Promise<void> {
  const root = await Deno.makeTempDir({ prefix: "arca-config-test-" });
  try {
    await fn({
      root,
      env: {
        HOME: `${root}/home`,
        XDG_CONFIG_HOME: `${root}/config`,
        XDG_CACHE_HOME: `${root}/cache`,
      },
      configPath: `${root}/config/pares-arca/config.toml`,
      defaultCacheDir: `${root}/cache/pares-arca`,
    });
  } finally {
    await Deno.remove(root, { recursive: true });
  }
}

async function writeConfig(home: Home, text: string): Promise<void> {
  await Deno.mkdir(`${home.root}/config/pares-arca`, { recursive: true });
  await Deno.writeTextFile(home.configPath, text);
}

/** Asserts that loading fails with `errorClass` and a message containing every part. */
async function assertLoadFails(
  promise: Promise<unknown>,
  errorClass: typeof UsageError | typeof ConfigError | typeof NotFoundError,
  parts: string[],
): Promise<Error> {
  const error = await promise.then(
    () => assert.fail("expected an error"),
    (error: unknown) => error,
  );
  assert.ok(error instanceof errorClass, `expected ${errorClass.name}, got ${error}`);
  for (const part of parts) {
    assert.ok(
      error.message.includes(part),
      `message ${JSON.stringify(error.message)} lacks ${part}`,
    );
  }
  assert.ok(!error.message.endsWith("."), "messages have no trailing period");
  return error;
}

Deno.test("config: first run writes the commented default file, which parses to {}", async () => {
  await withHome(async (home) => {
    const settings = await loadSettings({}, { env: home.env });
    const text = await Deno.readTextFile(home.configPath);
    assert.equal(text, defaultConfigText(home.env));
    assert.deepEqual(parseConfigText(text, home.configPath), {});
    // Every setting is there, commented out.
    for (
      const key of ["cache_dir", "backend", "compression", "signing_key_path", "bind", "priority"]
    ) {
      assert.match(text, new RegExp(`^# ${key} = `, "m"), key);
    }
    assert.ok(
      text.split("\n").every((line) => line === "" || line.startsWith("#")),
      "only comments and blank lines",
    );
    assert.deepEqual(settings, {
      configPath: home.configPath,
      configDir: `${home.root}/config/pares-arca`,
      cacheDir: home.defaultCacheDir,
      backend: "kv",
      compression: "zstd",
      signingKeyPath: undefined,
      bind: DEFAULT_BIND,
      priority: DEFAULT_PRIORITY,
      uploadTokenFile: undefined,
      readTokenFile: undefined,
      segments: [{ name: "universal", description: "every path this cache holds", filter: "all" }],
      staticPeers: [],
      trustedPublicKeys: [],
      upstreams: [],
      upstreamTimeoutMs: 5000,
      upstreamNegativeTtlMs: 60_000,
    });
  });
});

Deno.test("config: the commented values are the defaults", async () => {
  await withHome(async (home) => {
    const text = defaultConfigText(home.env)
      .split("\n")
      .map((line) =>
        /^# (cache_dir|backend|compression|bind|priority) = /.test(line) ? line.slice(2) : line
      )
      .join("\n");
    await writeConfig(home, text);
    const uncommented = parseConfigText(text, home.configPath);
    assert.deepEqual(Object.keys(uncommented).sort(), [
      "backend",
      "bind",
      "cache_dir",
      "compression",
      "priority",
    ]);
    const fromFile = await loadSettings({}, { env: home.env });
    await Deno.remove(home.configPath);
    const defaults = await loadSettings({}, { env: home.env });
    assert.deepEqual(fromFile, defaults);
  });
});

Deno.test("config: an existing file is read, never rewritten", async () => {
  await withHome(async (home) => {
    const text = `# mine\nbackend = "filesystem" # trailing comment\n\n`;
    await writeConfig(home, text);
    const before = await Deno.stat(home.configPath);
    const settings = await loadSettings({}, { env: home.env });
    assert.equal(settings.backend, "filesystem");
    assert.equal(await Deno.readTextFile(home.configPath), text);
    assert.equal((await Deno.stat(home.configPath)).mtime?.getTime(), before.mtime?.getTime());
  });
});

Deno.test("config: cache_dir precedence is flag > PARES_ARCA_DIR > config > default", async () => {
  await withHome(async (home) => {
    const load = (flags: { cacheDir?: string }, extra: Environment = {}) =>
      loadSettings(flags, { env: { ...home.env, ...extra } }).then((s) => s.cacheDir);
    assert.equal(await load({}), home.defaultCacheDir);
    await writeConfig(home, `cache_dir = "/from/config"\n`);
    assert.equal(await load({}), "/from/config");
    assert.equal(await load({}, { PARES_ARCA_DIR: "/from/env" }), "/from/env");
    assert.equal(await load({}, { PARES_ARCA_DIR: "" }), "/from/config", "empty env is unset");
    assert.equal(
      await load({ cacheDir: "/from/flag" }, { PARES_ARCA_DIR: "/from/env" }),
      "/from/flag",
    );
    assert.equal(await load({ cacheDir: "/from/flag" }), "/from/flag");
    // ~ expands to HOME, in the file and in flags.
    await writeConfig(home, `cache_dir = "~/arca"\n`);
    assert.equal(await load({}), `${home.env.HOME}/arca`);
    assert.equal(await load({ cacheDir: "~/flag" }), `${home.env.HOME}/flag`);
    // XDG_CACHE_HOME unset: ~/.cache.
    await Deno.remove(home.configPath);
    const env = { ...home.env, XDG_CACHE_HOME: undefined };
    assert.equal((await loadSettings({}, { env })).cacheDir, `${home.env.HOME}/.cache/pares-arca`);
  });
});

Deno.test("config: other settings are flag > config > default, env does not touch them", async () => {
  await withHome(async (home) => {
    const env = { ...home.env, PARES_ARCA_DIR: "/env/dir" };
    let settings = await loadSettings({}, { env });
    assert.equal(settings.backend, "kv");
    assert.equal(settings.compression, "zstd");
    assert.equal(settings.bind, DEFAULT_BIND);
    assert.equal(settings.priority, DEFAULT_PRIORITY);
    assert.equal(settings.signingKeyPath, undefined);

    await writeConfig(
      home,
      [
        `backend = "filesystem"`,
        `compression = "xz"`,
        `bind = "0.0.0.0:8080"`,
        `priority = 10`,
        `signing_key_path = "~/keys/cache.secret"`,
        ``,
      ].join("\n"),
    );
    settings = await loadSettings({}, { env });
    assert.equal(settings.backend, "filesystem");
    assert.equal(settings.compression, "xz");
    assert.equal(settings.bind, "0.0.0.0:8080");
    assert.equal(settings.priority, 10);
    assert.equal(settings.signingKeyPath, `${home.env.HOME}/keys/cache.secret`);
    assert.equal(settings.cacheDir, "/env/dir");

    settings = await loadSettings({
      backend: "kv",
      compression: "zstd",
      bind: "[::1]:9000",
      priority: "0",
      signingKey: "/flag/key.secret",
    }, { env });
    assert.equal(settings.backend, "kv");
    assert.equal(settings.compression, "zstd");
    assert.equal(settings.bind, "[::1]:9000");
    assert.equal(settings.priority, 0);
    assert.equal(settings.signingKeyPath, "/flag/key.secret");
    assert.equal((await loadSettings({ priority: 7 }, { env })).priority, 7);
  });
});

Deno.test("config: --config names the file; a missing one is an error", async () => {
  await withHome(async (home) => {
    const other = `${home.root}/elsewhere/arca.toml`;
    await Deno.mkdir(`${home.root}/elsewhere`);
    await Deno.writeTextFile(other, `backend = "filesystem"\n`);
    const settings = await loadSettings({ config: other }, { env: home.env });
    assert.equal(settings.backend, "filesystem");
    assert.equal(settings.configPath, other);
    assert.equal(settings.configDir, `${home.root}/elsewhere`);
    // The default file is not created when another one is named.
    await assert.rejects(Deno.stat(home.configPath), Deno.errors.NotFound);

    const missing = `${home.root}/nope/arca.toml`;
    await assertLoadFails(loadSettings({ config: missing }, { env: home.env }), ConfigError, [
      missing,
    ]);
    await assert.rejects(Deno.stat(missing), Deno.errors.NotFound);

    // PARES_ARCA_CONFIG names it too; the flag wins.
    const env = { ...home.env, PARES_ARCA_CONFIG: other };
    assert.equal((await loadSettings({}, { env })).configPath, other);
    await Deno.writeTextFile(`${home.root}/flag.toml`, "");
    assert.equal(
      (await loadSettings({ config: `${home.root}/flag.toml` }, { env })).backend,
      "kv",
    );
  });
});

Deno.test("config: invalid TOML is a ConfigError naming the file and line", async () => {
  await withHome(async (home) => {
    const cases: [string, number][] = [
      [`backend = "kv"\npriority = = 3\n`, 2],
      [`# comment\n\nbackend = "kv"\nbackend = "filesystem"\n`, 4],
      [`bind = "127.0.0.1:1\n`, 1],
      [`[server\n`, 1],
    ];
    for (const [text, line] of cases) {
      await writeConfig(home, text);
      const error = await assertLoadFails(loadSettings({}, { env: home.env }), ConfigError, [
        home.configPath,
        `line ${line}`,
      ]);
      assert.ok(!error.message.includes("\n"), "one line");
      assert.equal(await Deno.readTextFile(home.configPath), text, "file left as it was");
    }
  });
});

Deno.test("config: wrong type, unknown key or bad value names the key and line", async () => {
  await withHome(async (home) => {
    const cases: [string, string, number][] = [
      [`backend = "kv"\n\npriority = "high"\n`, "priority", 3],
      [`priority = 1.5\n`, "priority", 1],
      [`priority = 5000\n`, "priority", 1],
      [`priority = -1\n`, "priority", 1],
      [`# c\ncache_dir = 42\n`, "cache_dir", 2],
      [`cache_dir = ""\n`, "cache_dir", 1],
      [`backend = "sqlite"\n`, "backend", 1],
      [`compression = "bzip2"\n`, "compression", 1],
      [`compression = ["zstd"]\n`, "compression", 1],
      [`bind = "localhost"\n`, "bind", 1],
      [`bind = "127.0.0.1:99999"\n`, "bind", 1],
      [`signing_key_path = true\n`, "signing_key_path", 1],
      [`backend = "kv"\ncolour = "blue"\n`, "colour", 2],
      [`  "cache-dir" = "/x"\n`, "cache-dir", 1],
      [`backend = "kv"\n[server]\nbind = "127.0.0.1:1"\n`, "server", 2],
      [`\nserver.bind = "127.0.0.1:1"\n`, "server", 2],
      [`"a(b" = 1\n`, "a(b", 1],
      [`"[x]*" = 1\n`, "[x]*", 1],
    ];
    for (const [text, key, line] of cases) {
      await writeConfig(home, text);
      const bytes = await Deno.readFile(home.configPath);
      await assertLoadFails(loadSettings({}, { env: home.env }), ConfigError, [
        home.configPath,
        `line ${line}`,
        `'${key}'`,
      ]);
      assert.deepEqual(await Deno.readFile(home.configPath), bytes, "file left byte-identical");
    }
  });
});

Deno.test("config: bad flag values are usage errors naming the option", async () => {
  await withHome(async (home) => {
    const cases: [Record<string, string>, string][] = [
      [{ backend: "bogus" }, "backend"],
      [{ compression: "gzip" }, "compression"],
      [{ bind: "nowhere" }, "nowhere"],
      [{ priority: "high" }, "priority"],
      [{ priority: "1001" }, "priority"],
      [{ priority: "-3" }, "priority"],
      [{ cacheDir: "" }, "cache-dir"],
    ];
    for (const [flags, part] of cases) {
      await assertLoadFails(loadSettings(flags, { env: home.env }), UsageError, [part]);
    }
  });
});

Deno.test("config: no HOME and no XDG directories is a usage error", async () => {
  await assertLoadFails(loadSettings({}, { env: {} }), UsageError, ["HOME"]);
});

Deno.test("config: parseBindAddress", () => {
  assert.deepEqual(parseBindAddress("127.0.0.1:5555"), { hostname: "127.0.0.1", port: 5555 });
  assert.deepEqual(parseBindAddress("[::1]:80"), { hostname: "::1", port: 80 });
  assert.deepEqual(parseBindAddress("example.org:0"), { hostname: "example.org", port: 0 });
  for (const bad of ["", "127.0.0.1", ":80", "host:65536", "a b:1", "[::1:80", "h:-1"]) {
    assert.throws(() => parseBindAddress(bad), UsageError, bad);
  }
});

Deno.test("config: [[segments]] are read in order; bad ones name the table's line", async () => {
  await withHome(async (home) => {
    const text = [
      "# teams",
      "[[segments]]",
      'name = "team"',
      'filter = "custom"',
      'topic_key = "' + "ab".repeat(32) + '"',
      "",
      "[[segments]]",
      'name = "universal"',
      'description = "the rest"',
      "",
    ].join("\n");
    await writeConfig(home, text);
    const settings = await loadSettings({}, { env: home.env });
    assert.deepEqual(settings.segments, [
      { name: "team", filter: "custom", topicKey: "ab".repeat(32) },
      { name: "universal", filter: "all", description: "the rest" },
    ]);
    const cases: [string, number, string][] = [
      ['[[segments]]\nname = "a"\n\n[[segments]]\nname = "b"\nfilter = "some"\n', 4, "filter"],
      ['[[segments]]\nname = "a"\n[[segments]]\nname = "a"\n', 3, "defined twice"],
      ['[[segments]]\nfilter = "all"\n', 1, "'name' is required"],
      ['[[segments]]\nname = "../x"\n', 1, "'name'"],
      ['[[segments]]\nname = "a"\ncolour = "red"\n', 1, "unknown key 'colour'"],
      ['segments = "x"\n', 1, "array of tables"],
    ];
    for (const [bad, line, detail] of cases) {
      await writeConfig(home, bad);
      await assert.rejects(loadSettings({}, { env: home.env }), (error: Error) => {
        assert.ok(error instanceof ConfigError, String(error));
        assert.match(error.message, new RegExp(`line ${line}\\b`), error.message);
        assert.ok(error.message.includes(detail), error.message);
        return true;
      });
      assert.equal(await Deno.readTextFile(home.configPath), bad, "the file is left as it was");
    }
  });
});
