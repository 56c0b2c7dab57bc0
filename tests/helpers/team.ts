/**
 * A team of `arca swarm` nodes on 127.0.0.1 for end-to-end tests: one ad-hoc topic, one
 * signing key, static peers, `--also-serve` where asked; and the Nix side (`nix copy --from`).
 * @module
 */

import { arcaOk, type ArcaSwarm, freePort, freeUdpPort, makeArcaHome, startSwarm } from "./arca.ts";
import { runNix } from "./nix.ts";

/** Polls `check` every 100 ms until it returns a value other than undefined. */
export async function waitFor<T>(
  what: string,
  timeoutMs: number,
  check: () => Promise<T | undefined>,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`Timed out after ${timeoutMs} ms: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** The hash part of a store path. */
export function hashOf(storePath: string): string {
  return storePath.slice("/nix/store/".length, "/nix/store/".length + 32);
}

/**
 * A team of swarm nodes on 127.0.0.1 sharing one ad-hoc topic and one signing key; nodes are
 * named (`a`, `b`, …), each with its cache dir under the team's home.
 */
export async function makeTeam() {
  const home = await makeArcaHome();
  const env = home.env;
  const keyDir = `${home.dir}/keys`;
  const out = await arcaOk(
    ["sign-keygen", "--name", "peer-fetch-e2e-1", "--output-dir", keyDir],
    { env },
  );
  const publicKey = /extra-trusted-public-keys = (\S+)/.exec(out)![1];
  const secretKey = `${keyDir}/peer-fetch-e2e-1.secret`;
  const topic = `peer fetch e2e ${crypto.randomUUID()}`;
  const dir = (name: string) => `${home.dir}/node-${name}`;
  const discovery = new Map<string, number>();
  const nodes: ArcaSwarm[] = [];
  return {
    home,
    env,
    publicKey,
    secretKey,
    dir,
    nodes,
    async importInto(name: string, paths: string[]) {
      await arcaOk(["--cache-dir", dir(name), "import", "--signing-key", secretKey, ...paths], {
        env,
      });
    },
    /**
     * Starts node `name`, dialing the named peers; with an HTTP port, it also serves. With
     * `config`, that text is its config.toml; `trust` adds trusted public keys.
     */
    async start(
      name: string,
      options: { peers?: string[]; httpPort?: number; config?: string; trust?: string[] } = {},
    ): Promise<ArcaSwarm> {
      if (!discovery.has(name)) discovery.set(name, freeUdpPort());
      const configArgs: string[] = [];
      if (options.config !== undefined) {
        await Deno.mkdir(dir(name), { recursive: true });
        await Deno.writeTextFile(`${dir(name)}.toml`, options.config);
        configArgs.push("--config", `${dir(name)}.toml`);
      }
      const args = [
        ...configArgs,
        "--cache-dir",
        dir(name),
        "swarm",
        "--topic",
        topic,
        "--bind-address",
        "127.0.0.1",
        "--discovery-port",
        String(discovery.get(name)),
        "--sync-port",
        String(freePort()),
        "--no-multicast",
        "--announce-interval",
        "1",
        "--reconcile-interval",
        "2",
        "--trusted-public-key",
        publicKey,
      ];
      for (const key of options.trust ?? []) args.push("--trusted-public-key", key);
      for (const peer of options.peers ?? []) {
        if (!discovery.has(peer)) discovery.set(peer, freeUdpPort());
        args.push("--static-peer", `127.0.0.1:${discovery.get(peer)}`);
      }
      if (options.httpPort !== undefined) {
        args.push("--also-serve", "--http-port", String(options.httpPort));
      }
      const node = await startSwarm(args, { env });
      nodes.push(node);
      return node;
    },
    /** Waits until node `name` holds remote records for all `paths`. */
    async waitForRecords(name: string, paths: string[]) {
      await waitFor(`${name} holds the records`, 20_000, async () => {
        for (const path of paths) {
          try {
            await Deno.stat(`${dir(name)}/remote/adhoc/${hashOf(path)}.json`);
          } catch {
            return undefined;
          }
        }
        return true;
      });
    },
    /** Waits until node `name` has a connected session with `count` peers. */
    async waitForPeers(name: string, count: number) {
      await waitFor(`${name} connected to ${count} peers`, 20_000, async () => {
        const status = JSON.parse(
          await arcaOk(["--cache-dir", dir(name), "status", "--json"], { env }),
        );
        return status.peers.filter((p: { connected: boolean }) => p.connected).length >= count
          ? true
          : undefined;
      });
    },
    async status(name: string) {
      return JSON.parse(await arcaOk(["--cache-dir", dir(name), "status", "--json"], { env }));
    },
    async cleanup() {
      await Promise.allSettled(nodes.map((node) => node.stop()));
      await home.cleanup();
    },
  };
}

/** `nix copy --from <url>` of `paths` into a fresh store; returns the store. */
export async function copyFrom(url: string, store: string, publicKey: string, paths: string[]) {
  await runNix("nix", [
    "copy",
    "--from",
    url,
    "--to",
    store,
    "--option",
    "trusted-public-keys",
    publicKey,
    ...paths,
  ]);
}

/** What must match between two stores for a path: hash, size, references. */
export function essentials(
  info: { path: string; narHash: string; narSize: number; references: string[] },
) {
  return {
    path: info.path,
    narHash: info.narHash,
    narSize: info.narSize,
    references: [...info.references].sort(),
  };
}
