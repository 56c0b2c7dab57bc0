/**
 * nixos-module.nix, evaluated by the real `nix-instantiate --eval --strict --json` against
 * tests/nix/lib-stub.nix (the stand-in for nixpkgs' lib, pkgs and module system), for a
 * few option sets: the generated systemd service (ExecStart flags, hardening, credentials),
 * nix.settings (substituters, trusted-public-keys, post-build-hook), the firewall, the
 * assertions and warnings. Then what the module generates is run for real: ExecStartPre
 * writes the runtime config.toml, which arca's own parser accepts; arca serve and arca swarm
 * start with the module's command lines; the post-build hook spools what Nix built and serve
 * imports it; and `systemd-analyze verify` accepts the generated unit.
 * @module
 */

import assert from "node:assert/strict";
import {
  freePort,
  freeUdpPort,
  makeArcaHome,
  REPO_ROOT,
  runArca,
  startArcaProcess,
  startSwarm,
} from "../helpers/arca.ts";
import { addToStore, HAVE_NIX } from "../helpers/nix.ts";
import { parseConfigText } from "../../src/config.ts";
import { postBuildHookScript } from "../../src/cache/spool.ts";
import {
  evalJson,
  HAVE_SYSTEMD_ANALYZE,
  LIB_STUB,
  type NixosService,
  nixPath,
  parseExecArgs,
  parseNixFile,
  renderUnit,
  verifyUnit,
  writeStubExecutable,
} from "./nix_eval.ts";

const MODULE = `${REPO_ROOT}nixos-module.nix`;
const RUNTIME_CONFIG = "/run/pares-arca/config.toml";
const PUBLIC_KEY = "mod-test-1:kZ5Ci0EAmqRnC6dNdcc8UfFhzVRjHcGvF1K9TqNdcmc=";
const TOPIC_KEY = "0123456789abcdef".repeat(4);

/** What evalModule of lib-stub.nix returns for the module. */
interface ModuleEval {
  config: {
    systemd?: { services: { "pares-arca": NixosService }; tmpfiles: { rules: string[] } };
    nix?: { settings: Record<string, string | string[]> };
    networking?: { firewall: { allowedTCPPorts: number[]; allowedUDPPorts: number[] } };
    users?: {
      users: Record<string, { isSystemUser: boolean; group: string }>;
      groups: Record<string, unknown>;
    };
    environment?: { systemPackages: string[] };
  };
  cfg: { services: { "pares-arca": { package: string; bind: string } } };
  failedAssertions: string[];
  warnings: string[];
}

/** Evaluates the module with `services.pares-arca = options`. */
async function evalModule(
  options: Record<string, unknown>,
  evalOptions: { readWrite?: boolean } = {},
): Promise<ModuleEval> {
  const file = await Deno.makeTempFile({ prefix: "arca-module-", suffix: ".json" });
  try {
    await Deno.writeTextFile(file, JSON.stringify({ services: { "pares-arca": options } }));
    return await evalJson<ModuleEval>(
      `let
        stub = import ${nixPath(LIB_STUB)} { };
        definitions = builtins.fromJSON (builtins.readFile ${nixPath(file)});
      in
      stub.evalModule (import ${nixPath(MODULE)})
        (definitions // { nix.package = stub.fakePackage "nix-2.8.0"; })`,
      evalOptions,
    );
  } finally {
    await Deno.remove(file);
  }
}

function serviceOf(result: ModuleEval): NixosService {
  const service = result.config.systemd?.services["pares-arca"];
  assert(service, "systemd.services.pares-arca is defined");
  return service;
}

function execStart(result: ModuleEval): string[] {
  return parseExecArgs(serviceOf(result).serviceConfig.ExecStart as string);
}

/** ExecStartPre's script (a store file written by the stand-in), run like systemd does. */
async function writeRuntimeConfig(
  result: ModuleEval,
  dirs: { credentials: string; runtime: string },
): Promise<{ code: number; stderr: string; text?: string }> {
  const script = serviceOf(result).serviceConfig.ExecStartPre as string;
  const out = await new Deno.Command("bash", {
    args: [script],
    env: { CREDENTIALS_DIRECTORY: dirs.credentials, RUNTIME_DIRECTORY: dirs.runtime },
    clearEnv: true,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stderr = new TextDecoder().decode(out.stderr);
  if (!out.success) return { code: out.code, stderr };
  const path = `${dirs.runtime}/config.toml`;
  assert.equal((await Deno.stat(path)).mode! & 0o777, 0o600, "the runtime config is private");
  return { code: 0, stderr, text: await Deno.readTextFile(path) };
}

/** The module's command line with arca started our way and the runtime config swapped in. */
function localArgv(argv: string[], configPath: string): string[] {
  const args = argv.slice(1);
  const at = args.indexOf("--config");
  assert.equal(args[at + 1], RUNTIME_CONFIG);
  args[at + 1] = configPath;
  return args;
}

/** Polls `check` every 100 ms until it holds or `attempts` run out. */
async function eventually(check: () => Promise<boolean>, attempts = 300): Promise<boolean> {
  for (let i = 0; i < attempts; i++) {
    if (await check()) return true;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  return false;
}

async function listDir(dir: string): Promise<string[]> {
  const names: string[] = [];
  for await (const entry of Deno.readDir(dir)) names.push(entry.name);
  return names.sort();
}

Deno.test({
  name: "nix-instantiate --parse accepts flake.nix and nixos-module.nix",
  ignore: !HAVE_NIX,
  async fn() {
    await parseNixFile(`${REPO_ROOT}flake.nix`);
    await parseNixFile(MODULE);
  },
});

Deno.test({
  name: "module: disabled, it defines nothing",
  ignore: !HAVE_NIX,
  async fn() {
    const result = await evalModule({});
    assert.deepEqual(result.config, {});
    assert.deepEqual(result.failedAssertions, []);
  },
});

Deno.test({
  name: "module: enabled with defaults, a hardened arca serve on 127.0.0.1:5555 and nothing else",
  ignore: !HAVE_NIX,
  async fn() {
    const result = await evalModule({ enable: true });
    const pkg = result.cfg.services["pares-arca"].package;
    assert.deepEqual(execStart(result), [
      `${pkg}/bin/arca`,
      "--config",
      RUNTIME_CONFIG,
      "serve",
      "--bind",
      "127.0.0.1:5555",
    ]);
    const service = serviceOf(result);
    const config = service.serviceConfig;
    assert.deepEqual(service.wantedBy, ["multi-user.target"]);
    assert.equal(config.User, "pares-arca");
    assert.equal(config.StateDirectory, "pares-arca");
    assert.equal(config.RuntimeDirectory, "pares-arca");
    assert.equal(config.RuntimeDirectoryMode, "0700");
    assert.equal(config.Restart, "on-failure");
    assert.equal(config.ProtectSystem, "strict");
    assert.equal(config.PrivateTmp, true);
    assert.equal(config.NoNewPrivileges, true);
    assert.equal(config.ProtectHome, true);
    assert.equal(config.CapabilityBoundingSet, "");
    assert.equal(config.AmbientCapabilities, "");
    assert.deepEqual(config.RestrictAddressFamilies, ["AF_INET", "AF_INET6", "AF_UNIX"]);
    assert(!("MemoryDenyWriteExecute" in config), "V8's JIT needs W+X pages");
    assert(!("DynamicUser" in config), "a dedicated user owns the cache and the spool");
    assert.deepEqual(config.LoadCredential, []);
    assert.deepEqual(config.ReadWritePaths, []);
    assert.equal(service.path?.length, 1, "the local Nix, for imports");
    assert.match(service.path![0], /-nix-2\.8\.0$/);
    assert.equal(service.environment?.HOME, "/var/lib/pares-arca");
    assert.equal(result.config.users?.users["pares-arca"].isSystemUser, true);
    assert.deepEqual(result.config.environment?.systemPackages, [pkg]);
    assert.equal(result.config.nix, undefined, "nix.settings untouched");
    assert.equal(result.config.networking, undefined, "firewall untouched");
    assert.deepEqual(result.failedAssertions, []);
    assert.deepEqual(result.warnings, []);
  },
});

Deno.test({
  name:
    "module: serve with keys, uploads, hook, substituter and firewall; ExecStartPre's config, serve and the hook run for real",
  ignore: !HAVE_NIX,
  async fn() {
    const home = await makeArcaHome();
    try {
      const cacheDir = `${home.dir}/cache`;
      const port = freePort();
      const result = await evalModule({
        enable: true,
        bind: "127.0.0.1",
        port,
        cacheDir,
        signingKeyFile: "/run/keys/arca-signing",
        publicKey: PUBLIC_KEY,
        uploadTokenFile: "/run/keys/arca-upload",
        postBuildHook: true,
        addToSubstituters: true,
        openFirewall: true,
        settings: { compression: "xz", priority: 20 },
      }, { readWrite: true });
      assert.deepEqual(result.failedAssertions, []);
      assert.deepEqual(result.warnings, []);
      const argv = execStart(result);
      assert.deepEqual(argv.slice(1), [
        "--config",
        RUNTIME_CONFIG,
        "serve",
        "--bind",
        `127.0.0.1:${port}`,
      ]);
      const config = serviceOf(result).serviceConfig;
      assert.deepEqual(config.LoadCredential, [
        "signing-key:/run/keys/arca-signing",
        "upload-token:/run/keys/arca-upload",
      ]);
      assert.deepEqual(config.ReadWritePaths, [cacheDir], "a cache outside the state dir");
      assert.deepEqual(result.config.systemd?.tmpfiles.rules, [
        `d ${cacheDir} 0750 pares-arca pares-arca - -`,
      ]);
      const settings = result.config.nix!.settings;
      assert.deepEqual(settings.substituters, [`http://127.0.0.1:${port}`]);
      assert.deepEqual(settings["trusted-public-keys"], [PUBLIC_KEY]);
      assert.equal(typeof settings["post-build-hook"], "string");
      assert.deepEqual(result.config.networking?.firewall, {
        allowedTCPPorts: [port],
        allowedUDPPorts: [],
      });

      // ExecStartPre, with the credentials systemd would load.
      const credentials = `${home.dir}/credentials`;
      const runtime = `${home.dir}/run`;
      await Deno.mkdir(credentials);
      await Deno.mkdir(runtime);
      const keygen = await runArca(
        ["sign-keygen", "--name", "mod-test-1", "--output-dir", credentials],
        { env: home.env },
      );
      assert.equal(keygen.code, 0, keygen.stderr);
      await Deno.rename(`${credentials}/mod-test-1.secret`, `${credentials}/signing-key`);
      await Deno.writeTextFile(`${credentials}/upload-token`, "module-test-token\n");
      const written = await writeRuntimeConfig(result, { credentials, runtime });
      assert.equal(written.code, 0, written.stderr);
      const parsed = parseConfigText(written.text!, `${runtime}/config.toml`);
      assert.deepEqual(parsed, {
        bind: `127.0.0.1:${port}`,
        cache_dir: cacheDir,
        compression: "xz",
        priority: 20,
        signing_key_path: `${credentials}/signing-key`,
        upload_token_file: `${credentials}/upload-token`,
      });

      // The post-build hook: the script of spool.ts, spooling into <cacheDir>/spool.
      const hookPath = settings["post-build-hook"] as string;
      const hook = await Deno.readTextFile(hookPath);
      const spoolDir = `${cacheDir}/spool`;
      const afterSpoolLine = (script: string) => {
        const lines = script.split("\n");
        const at = lines.findIndex((line) => line.startsWith("spool="));
        assert(at > 0, "the script sets spool=");
        return { spool: lines[at], rest: lines.slice(at + 1).join("\n") };
      };
      const ours = afterSpoolLine(hook);
      const arcas = afterSpoolLine(postBuildHookScript(spoolDir));
      assert.equal(ours.rest, arcas.rest, "the module's hook is spool.ts postBuildHookScript");
      assert.match(ours.spool, new RegExp(`^spool='?${spoolDir}'?$`));
      assert(hook.includes("# pares-arca post-build hook"), "it carries the hook marker");

      // The hook, as Nix runs it, spools a real store path...
      await Deno.mkdir(cacheDir);
      const source = await Deno.makeTempDir({ dir: home.dir, prefix: "arca-module-hook-" });
      await Deno.writeTextFile(`${source}/greeting`, `hello ${crypto.randomUUID()}\n`);
      const storePath = await addToStore(source);
      const spooled = await new Deno.Command("bash", {
        args: [hookPath],
        env: { ...home.env, OUT_PATHS: storePath, DRV_PATH: "" },
        stdout: "piped",
        stderr: "piped",
      }).output();
      assert.equal(spooled.code, 0);
      const files = await listDir(spoolDir);
      assert.equal(files.length, 1);
      assert.equal(await Deno.readTextFile(`${spoolDir}/${files[0]}`), `${storePath}\n`);

      // ...and arca serve, started with the module's command line and config, imports it.
      const server = await startArcaProcess(localArgv(argv, `${runtime}/config.toml`), {
        env: home.env,
        ready: /Serving /,
      });
      try {
        const info = await fetch(`http://127.0.0.1:${port}/nix-cache-info`);
        assert.equal(info.status, 200);
        assert.match(await info.text(), /^Priority: 20$/m);
        const upload = await fetch(`http://127.0.0.1:${port}/nix-cache-info`, {
          method: "PUT",
          body: "StoreDir: /nix/store\n",
        });
        await upload.body?.cancel();
        assert.equal(upload.status, 401, "uploads are on, and need the token");
        assert(
          await eventually(async () => (await listDir(spoolDir)).length === 0),
          `serve drains the spool: ${server.stderr()}`,
        );
      } finally {
        await server.stop();
      }
      const listed = await runArca(["--config", `${runtime}/config.toml`, "list"], {
        env: home.env,
      });
      assert.equal(listed.code, 0, listed.stderr);
      assert(listed.stdout.split("\n").includes(storePath), "the hooked path is cached");
    } finally {
      await home.cleanup();
    }
  },
});

Deno.test({
  name:
    "module: swarm with a topic key file; the key reaches config.toml at runtime only, and arca swarm starts with the module's flags",
  ignore: !HAVE_NIX,
  async fn() {
    const home = await makeArcaHome();
    try {
      const cacheDir = `${home.dir}/cache`;
      const port = freePort();
      const syncPort = freePort();
      const discoveryPort = freeUdpPort();
      const peerKey = "peer-1:kZ5Ci0EAmqRnC6dNdcc8UfFhzVRjHcGvF1K9TqNdcmc=";
      const result = await evalModule({
        enable: true,
        bind: "127.0.0.1",
        port,
        cacheDir,
        openFirewall: true,
        extraArgs: ["--no-multicast"],
        swarm: {
          enable: true,
          topicKeyFile: "/run/keys/arca-topic",
          staticPeers: ["127.0.0.1:1"],
          trustedPublicKeys: [peerKey],
          discoveryPort,
          syncPort,
        },
        settings: {
          segments: [{ name: "team", filter: "all" }],
          static_peers: ["build1.example:7070"],
        },
      }, { readWrite: true });
      assert.deepEqual(result.failedAssertions, []);
      assert.deepEqual(result.warnings, []);
      const argv = execStart(result);
      assert.deepEqual(argv.slice(1), [
        "--config",
        RUNTIME_CONFIG,
        "swarm",
        "--also-serve",
        "--bind-address",
        "127.0.0.1",
        "--http-port",
        String(port),
        "--discovery-port",
        String(discoveryPort),
        "--sync-port",
        String(syncPort),
        "--no-multicast",
      ]);
      const service = serviceOf(result);
      assert.match(service.description!, /swarm/);
      assert.deepEqual(service.serviceConfig.RestrictAddressFamilies, [
        "AF_INET",
        "AF_INET6",
        "AF_UNIX",
        "AF_NETLINK",
      ]);
      assert.deepEqual(service.serviceConfig.LoadCredential, ["topic-key:/run/keys/arca-topic"]);
      assert.deepEqual(result.config.networking?.firewall, {
        allowedTCPPorts: [port, syncPort],
        allowedUDPPorts: [discoveryPort],
      });

      // The store holds a placeholder; the key comes from the credential at start.
      const script = await Deno.readTextFile(service.serviceConfig.ExecStartPre as string);
      const template = /\$\(< (\/nix\/store\/[^)\s]+)\)/.exec(script)?.[1];
      assert(template, "ExecStartPre reads a template from the store");
      const templateText = await Deno.readTextFile(template);
      assert(!templateText.includes(TOPIC_KEY));
      assert(!script.includes(TOPIC_KEY));

      const credentials = `${home.dir}/credentials`;
      const runtime = `${home.dir}/run`;
      await Deno.mkdir(credentials);
      await Deno.mkdir(runtime);
      await Deno.writeTextFile(`${credentials}/topic-key`, `${TOPIC_KEY}\n`);
      const written = await writeRuntimeConfig(result, { credentials, runtime });
      assert.equal(written.code, 0, written.stderr);
      const parsed = parseConfigText(written.text!, `${runtime}/config.toml`);
      assert.deepEqual(parsed.segments, [{ name: "team", filter: "all", topicKey: TOPIC_KEY }]);
      assert.deepEqual(parsed.static_peers, ["build1.example:7070", "127.0.0.1:1"]);
      assert.deepEqual(parsed.trusted_public_keys, [peerKey]);
      assert.equal(parsed.cache_dir, cacheDir);

      const swarm = await startSwarm(localArgv(argv, `${runtime}/config.toml`), {
        env: home.env,
      });
      try {
        assert.match(swarm.nodeId, /^[0-9a-f]{16}$/);
        const info = await fetch(`http://127.0.0.1:${port}/nix-cache-info`);
        assert.equal(info.status, 200, "--also-serve serves on the module's port");
        await info.body?.cancel();
      } finally {
        await swarm.stop();
      }

      // A key file holding something else stops the start, naming the file.
      for (const bad of ["", 'quote"d', "two words", "a\\b"]) {
        await Deno.writeTextFile(`${credentials}/topic-key`, bad);
        const refused = await writeRuntimeConfig(result, { credentials, runtime });
        assert.notEqual(refused.code, 0, `refused: ${JSON.stringify(bad)}`);
        assert.match(refused.stderr, /\/run\/keys\/arca-topic must hold one topic key/);
      }
    } finally {
      await home.cleanup();
    }
  },
});

Deno.test({
  name: "module: the default segment gets the topic key; swarm binds 0.0.0.0 by default",
  ignore: !HAVE_NIX,
  async fn() {
    const result = await evalModule({
      enable: true,
      swarm: { enable: true, topicKeyFile: "/run/keys/arca-topic" },
    }, { readWrite: true });
    assert.equal(result.cfg.services["pares-arca"].bind, "0.0.0.0");
    assert.deepEqual(execStart(result).slice(3, 7), [
      "swarm",
      "--also-serve",
      "--bind-address",
      "0.0.0.0",
    ]);
    const dir = await Deno.makeTempDir({ prefix: "arca-module-" });
    try {
      await Deno.mkdir(`${dir}/credentials`);
      await Deno.mkdir(`${dir}/run`);
      await Deno.writeTextFile(`${dir}/credentials/topic-key`, TOPIC_KEY);
      const written = await writeRuntimeConfig(result, {
        credentials: `${dir}/credentials`,
        runtime: `${dir}/run`,
      });
      assert.equal(written.code, 0, written.stderr);
      const parsed = parseConfigText(written.text!, "config.toml");
      assert.deepEqual(parsed.segments, [{
        name: "universal",
        description: "every path this cache holds",
        filter: "all",
        topicKey: TOPIC_KEY,
      }]);
      assert.equal(parsed.bind, "0.0.0.0:5555");
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "module: addresses, low ports and the substituter URL",
  ignore: !HAVE_NIX,
  async fn() {
    const any4 = await evalModule({ enable: true, bind: "0.0.0.0", addToSubstituters: true });
    assert.deepEqual(any4.config.nix?.settings.substituters, ["http://127.0.0.1:5555"]);
    assert.deepEqual(any4.config.nix?.settings["trusted-public-keys"], []);
    assert.equal(any4.config.nix?.settings["post-build-hook"], undefined);
    assert.match(any4.warnings.join("\n"), /addToSubstituters without publicKey/);

    const any6 = await evalModule({ enable: true, bind: "::", addToSubstituters: true });
    assert.deepEqual(execStart(any6).slice(-2), ["--bind", "[::]:5555"]);
    assert.deepEqual(any6.config.nix?.settings.substituters, ["http://[::1]:5555"]);

    const v6 = await evalModule({
      enable: true,
      bind: "fd00::1",
      port: 80,
      addToSubstituters: true,
      publicKey: PUBLIC_KEY,
    });
    assert.deepEqual(execStart(v6).slice(-2), ["--bind", "[fd00::1]:80"]);
    assert.deepEqual(v6.config.nix?.settings.substituters, ["http://[fd00::1]:80"]);
    const config = serviceOf(v6).serviceConfig;
    assert.equal(config.CapabilityBoundingSet, "CAP_NET_BIND_SERVICE", "port 80 needs it");
    assert.equal(config.AmbientCapabilities, "CAP_NET_BIND_SERVICE");
    assert.deepEqual(v6.warnings, []);
  },
});

Deno.test({
  name: "module: assertions and warnings",
  ignore: !HAVE_NIX,
  async fn() {
    const noKey = await evalModule({ enable: true, swarm: { enable: true } });
    assert.match(noKey.failedAssertions.join("\n"), /swarm\.enable needs swarm\.topicKeyFile/);

    const inStore = await evalModule({
      enable: true,
      signingKeyFile: "/nix/store/00000000000000000000000000000000-key",
      uploadTokenFile: "relative/token",
      cacheDir: "cache",
    });
    const failed = inStore.failedAssertions.join("\n");
    assert.match(failed, /outside the Nix store, not \/nix\/store\/0+-key/);
    assert.match(failed, /not relative\/token/);
    assert.match(failed, /cacheDir must be an absolute path/);

    const swarmAndUploads = await evalModule({
      enable: true,
      uploadTokenFile: "/run/keys/upload",
      postBuildHook: true,
      swarm: { enable: true, topicKeyFile: "/run/keys/topic" },
    });
    assert.deepEqual(swarmAndUploads.failedAssertions, []);
    // `arca swarm --also-serve` serves exactly as `arca serve`: uploads and the spool too.
    assert.deepEqual(swarmAndUploads.warnings, []);

    const keyInSettings = await evalModule({
      enable: true,
      swarm: { enable: true },
      settings: { segments: [{ name: "team", topic_key: TOPIC_KEY }] },
    });
    assert.deepEqual(keyInSettings.failedAssertions, []);
    assert.match(keyInSettings.warnings.join("\n"), /world-readable Nix store/);

    await assert.rejects(
      () => evalModule({ enable: true, port: 70000 }),
      /not of type 16 bit unsigned integer/,
    );
    await assert.rejects(() => evalModule({ enable: true, nosuch: 1 }), /does not exist/);
  },
});

Deno.test({
  name: "module: systemd-analyze verify accepts the units it generates",
  ignore: !HAVE_NIX || !HAVE_SYSTEMD_ANALYZE,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "arca-module-unit-" });
    try {
      const stub = `${dir}/arca`;
      await writeStubExecutable(stub);
      const sets: Record<string, unknown>[] = [
        { enable: true },
        {
          enable: true,
          cacheDir: "/srv/arca",
          signingKeyFile: "/run/keys/sign",
          uploadTokenFile: "/run/keys/upload",
          port: 443,
        },
        {
          enable: true,
          swarm: { enable: true, topicKeyFile: "/run/keys/topic", staticPeers: ["a:7070"] },
        },
      ];
      for (const [index, options] of sets.entries()) {
        const result = await evalModule(options);
        const service = serviceOf(result);
        // The unit's programs must exist: the stub stands in for the package and scripts.
        const argv = parseExecArgs(service.serviceConfig.ExecStart as string);
        service.serviceConfig.ExecStart = [stub, ...argv.slice(1)].map((arg) => JSON.stringify(arg))
          .join(" ");
        service.serviceConfig.ExecStartPre = stub;
        const unit = `${dir}/pares-arca-${index}.service`;
        await Deno.writeTextFile(unit, renderUnit(service));
        const verified = await verifyUnit(unit);
        assert.equal(verified.code, 0, verified.output);
        assert.equal(verified.output, "", `no warnings for ${JSON.stringify(options)}`);
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
