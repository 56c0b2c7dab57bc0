/**
 * contrib/systemd/arca.service and arca-swarm.service, the units for machines without
 * NixOS: `systemd-analyze verify` accepts them (with ExecStart pointed at a stub, since
 * verify needs the binary to exist), they carry the NixOS module's hardening, and the
 * command line and environment of arca.service run the real arca.
 * @module
 */

import assert from "node:assert/strict";
import { freePort, makeArcaHome, REPO_ROOT } from "../helpers/arca.ts";
import { HAVE_NIX } from "../helpers/nix.ts";
import {
  evalJson,
  HAVE_SYSTEMD_ANALYZE,
  LIB_STUB,
  nixPath,
  verifyUnit,
  writeStubExecutable,
} from "./nix_eval.ts";

const UNITS = ["arca.service", "arca-swarm.service"];
const BINARY = "/usr/local/bin/arca";
const CONFIG = "/etc/pares-arca/config.toml";

/** The settings the module and the units share, with the module's value for each. */
const HARDENING = [
  "NoNewPrivileges",
  "ProtectSystem",
  "ProtectHome",
  "PrivateTmp",
  "PrivateDevices",
  "ProtectKernelTunables",
  "ProtectKernelModules",
  "ProtectKernelLogs",
  "ProtectControlGroups",
  "ProtectClock",
  "ProtectHostname",
  "ProtectProc",
  "RestrictNamespaces",
  "RestrictRealtime",
  "RestrictSUIDSGID",
  "LockPersonality",
  "RemoveIPC",
  "SystemCallArchitectures",
  "RestrictAddressFamilies",
  "CapabilityBoundingSet",
  "AmbientCapabilities",
  "Restart",
];

function unitPath(name: string): string {
  return `${REPO_ROOT}contrib/systemd/${name}`;
}

/** The [Service] section as key → values (a key may repeat). */
async function serviceSection(name: string): Promise<Map<string, string[]>> {
  const section = new Map<string, string[]>();
  let current = "";
  for (const raw of (await Deno.readTextFile(unitPath(name))).split("\n")) {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) continue;
    const header = /^\[(.+)\]$/.exec(line);
    if (header) {
      current = header[1];
      continue;
    }
    if (current !== "Service") continue;
    const at = line.indexOf("=");
    const key = line.slice(0, at);
    section.set(key, [...(section.get(key) ?? []), line.slice(at + 1)]);
  }
  return section;
}

function one(section: Map<string, string[]>, key: string): string | undefined {
  const values = section.get(key);
  assert(values === undefined || values.length === 1, `${key} is set once`);
  return values?.[0];
}

Deno.test({
  name: "contrib units: systemd-analyze verify accepts both, without a warning",
  ignore: !HAVE_SYSTEMD_ANALYZE,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "arca-units-" });
    try {
      const stub = `${dir}/arca`;
      await writeStubExecutable(stub);
      for (const name of UNITS) {
        const text = await Deno.readTextFile(unitPath(name));
        assert(text.includes(`ExecStart=${BINARY} `), `${name} runs ${BINARY}`);
        // verify needs the binary to exist: point ExecStart at the stub.
        const copy = `${dir}/${name}`;
        await Deno.writeTextFile(copy, text.replaceAll(BINARY, stub));
        const verified = await verifyUnit(copy);
        assert.equal(verified.code, 0, verified.output);
        assert.equal(verified.output, "", `${name}: no warnings`);
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test("contrib units: commands, state directory and hardening", async () => {
  const serve = await serviceSection("arca.service");
  const swarm = await serviceSection("arca-swarm.service");
  assert.equal(one(serve, "ExecStart"), `${BINARY} --config ${CONFIG} serve`);
  assert.equal(one(swarm, "ExecStart"), `${BINARY} --config ${CONFIG} swarm --also-serve`);
  for (const section of [serve, swarm]) {
    assert(section.get("Environment")?.includes("PARES_ARCA_DIR=/var/lib/pares-arca"));
    assert.equal(one(section, "StateDirectory"), "pares-arca");
    assert.equal(one(section, "DynamicUser"), "yes");
    assert.equal(one(section, "User"), "pares-arca");
    assert.equal(one(section, "ProtectSystem"), "strict");
    assert.equal(one(section, "PrivateTmp"), "yes");
    assert.equal(one(section, "NoNewPrivileges"), "yes");
    assert.equal(one(section, "CapabilityBoundingSet"), "");
    assert.equal(one(section, "Restart"), "on-failure");
    assert.equal(one(section, "MemoryDenyWriteExecute"), undefined, "V8 needs W+X pages");
  }
  assert.equal(one(serve, "RestrictAddressFamilies"), "AF_INET AF_INET6 AF_UNIX");
  assert.equal(one(swarm, "RestrictAddressFamilies"), "AF_INET AF_INET6 AF_UNIX AF_NETLINK");
});

Deno.test({
  name: "contrib units: the same hardening as the NixOS module",
  ignore: !HAVE_NIX,
  async fn() {
    for (const [name, swarm] of [["arca.service", false], ["arca-swarm.service", true]] as const) {
      const moduleConfig = await evalJson<Record<string, unknown>>(
        `let stub = import ${nixPath(LIB_STUB)} { };
        in (stub.evalModule (import ${nixPath(`${REPO_ROOT}nixos-module.nix`)}) {
          services.pares-arca = {
            enable = true;
            swarm = { enable = ${swarm}; topicKeyFile = "/run/keys/topic"; };
          };
          nix.package = stub.fakePackage "nix";
        }).config.systemd.services.pares-arca.serviceConfig`,
      );
      const section = await serviceSection(name);
      for (const key of HARDENING) {
        const value = moduleConfig[key];
        const expected = typeof value === "boolean"
          ? (value ? "yes" : "no")
          : Array.isArray(value)
          ? value.join(" ")
          : String(value);
        assert.equal(one(section, key), expected, `${name} ${key}`);
      }
    }
  },
});

Deno.test({
  name: "contrib units: arca.service's command line and environment run arca serve",
  ignore: !HAVE_NIX,
  async fn() {
    const home = await makeArcaHome();
    try {
      const serve = await serviceSection("arca.service");
      const environment = Object.fromEntries(
        serve.get("Environment")!.map((pair) => pair.split("=", 2) as [string, string]),
      );
      const cacheDir = `${home.dir}/state`;
      const port = freePort();
      const config = `${home.dir}/config.toml`;
      await Deno.writeTextFile(config, `bind = "127.0.0.1:${port}"\n`);
      const args = one(serve, "ExecStart")!.split(" ").slice(1).map((arg) =>
        arg === CONFIG ? config : arg
      );
      const child = new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", "--quiet", `${REPO_ROOT}main.ts`, ...args],
        env: { ...home.env, ...environment, PARES_ARCA_DIR: cacheDir, HOME: home.dir },
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
      }).spawn();
      const stderr = new Response(child.stderr).text();
      const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
      let seen = "";
      const deadline = setTimeout(() => child.kill("SIGKILL"), 30_000);
      try {
        while (!seen.includes("\n")) {
          const { value, done } = await reader.read();
          if (done) throw new Error(`arca serve exited: ${await stderr}`);
          seen += value;
        }
        assert.equal(seen.split("\n")[0], `Serving ${cacheDir} on http://127.0.0.1:${port}`);
        const info = await fetch(`http://127.0.0.1:${port}/nix-cache-info`);
        assert.equal(info.status, 200);
        await info.body?.cancel();
      } finally {
        clearTimeout(deadline);
        child.kill("SIGTERM");
        await child.status;
        await stderr;
        await reader.cancel().catch(() => {});
      }
    } finally {
      await home.cleanup();
    }
  },
});
