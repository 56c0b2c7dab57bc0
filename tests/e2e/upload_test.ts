/**
 * Uploads end to end: the real `nix copy --to http://…` (with a netrc holding the upload
 * token) in xz, zstd, bzip2 and none, then `nix copy --from` the same arca into a fresh
 * store; without the token nothing is stored; forged uploads are refused and leave no trace.
 * @module
 */

import assert from "node:assert/strict";
import { arcaOk, makeArcaHome, startServe } from "../helpers/arca.ts";
import { addToStore, HAVE_NIX, nixEnv, pathInfo, runNix } from "../helpers/nix.ts";
import { buildFixtures, pseudoRandomBytes } from "./fixtures.ts";
import { encodeNar } from "../../src/cache/nar.ts";
import { formatNixHash, sha256 } from "../../src/cache/hash.ts";
import { encodeNixBase32 } from "../../src/cache/nixbase32.ts";

const TOKEN = "s3cret-upload-token";

async function caPath(name: string, seed: number): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix: "arca-upload-" });
  try {
    await Deno.mkdir(`${dir}/${name}`);
    await Deno.writeFile(`${dir}/${name}/data`, pseudoRandomBytes(200_000, seed));
    return await addToStore(`${dir}/${name}`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function xz(bytes: Uint8Array): Promise<Uint8Array> {
  const child = new Deno.Command("xz", { args: ["-c"], stdin: "piped", stdout: "piped" }).spawn();
  const output = child.output(); // read while writing: the pipes would fill up otherwise
  const writer = child.stdin.getWriter();
  await writer.write(bytes);
  await writer.close();
  return (await output).stdout;
}

/** Files left under `<cacheDir>/uploads` (uploaded, pending), recursively. */
async function uploadsLeft(cacheDir: string, dir = `${cacheDir}/uploads`): Promise<string[]> {
  const files: string[] = [];
  try {
    for await (const entry of Deno.readDir(dir)) {
      if (entry.isDirectory) files.push(...await uploadsLeft(cacheDir, `${dir}/${entry.name}`));
      else files.push(`${dir}/${entry.name}`.slice(cacheDir.length + 1));
    }
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
  return files;
}

/** {@link uploadsLeft} once nothing is left (the files go right after each import), or after 30 s. */
async function uploadsLeftEventually(cacheDir: string): Promise<string[]> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const left = await uploadsLeft(cacheDir);
    if (left.length === 0 || Date.now() > deadline) return left;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** `arca list` once it lists exactly `paths` (imports run in the background), sorted. */
async function listedEventually(global: string[], env: Record<string, string>, paths: string[]) {
  const expected = [...paths].sort().join("\n");
  const deadline = Date.now() + 30_000;
  for (;;) {
    const listed = (await arcaOk([...global, "list"], { env })).trim().split("\n").sort();
    if (listed.join("\n") === expected || Date.now() > deadline) return listed;
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

Deno.test({
  name: "e2e upload: nix copy --to with a netrc token, every compression, then nix copy --from",
  ignore: !HAVE_NIX,
  async fn() {
    const home = await makeArcaHome();
    const env = home.env;
    const global = ["--cache-dir", home.cacheDir];
    await Deno.writeTextFile(`${home.dir}/token`, TOKEN + "\n");
    await arcaOk(["sign-keygen", "--name", "arca-upload-1"], { env });
    const arcaKey = (await Deno.readTextFile(`${home.configDir}/arca-upload-1.pub`)).trim();
    const server = await startServe([
      ...global,
      "--upload-token-file",
      `${home.dir}/token`,
      "--signing-key",
      `${home.configDir}/arca-upload-1.secret`,
    ], { env });
    try {
      const fixtures = await buildFixtures();
      // Sign the source paths with a key of their own: uploaded signatures are kept.
      const ownerSecret = `${home.dir}/owner.secret`;
      await Deno.writeTextFile(
        ownerSecret,
        await runNix("nix", ["key", "generate-secret", "--key-name", "owner-1"]),
      );
      const ownerKey = (await runNix("nix", ["key", "convert-secret-to-public"], {
        stdin: await Deno.readFile(ownerSecret),
      })).trim();
      await runNix("nix", ["store", "sign", "--key-file", ownerSecret, "-r", fixtures.top]);
      const netrc = `${home.dir}/netrc`;
      await Deno.writeTextFile(netrc, `machine 127.0.0.1 login arca password ${TOKEN}\n`);

      // Without the token: refused, nothing stored.
      const refused = await new Deno.Command("nix", {
        args: ["copy", "--to", server.url, fixtures.caSmall],
        env: nixEnv(),
        stdout: "piped",
        stderr: "piped",
      }).output();
      assert.ok(!refused.success, "an upload without the token fails");
      assert.equal((await arcaOk([...global, "list"], { env })).trim(), "");
      const put = await fetch(`${server.url}/nix-cache-info`, { method: "PUT", body: "x" });
      await put.body?.cancel();
      assert.equal(put.status, 401);
      const wrong = await fetch(`${server.url}/nix-cache-info`, {
        method: "PUT",
        body: "x",
        headers: { authorization: "Bearer not-the-token" },
      });
      await wrong.body?.cancel();
      assert.equal(wrong.status, 401);

      const bz2Path = await caPath("arca-upload-bz2", 11);
      const nonePath = await caPath("arca-upload-none", 12);
      const uploads: [string, string[]][] = [
        ["", [fixtures.top]], // Nix's default: xz; the closure, dependencies first
        ["?compression=zstd", [fixtures.caSmall]],
        ["?compression=bzip2", [bz2Path]],
        ["?compression=none", [nonePath]],
      ];
      for (const [query, paths] of uploads) {
        await runNix("nix", [
          "copy",
          "--to",
          `${server.url}/${query}`,
          "--option",
          "netrc-file",
          netrc,
          ...paths,
        ]);
      }
      const all = [fixtures.dep, fixtures.top, fixtures.caSmall, bz2Path, nonePath];
      const source = await pathInfo(all);
      const checkCopy = async (store: string) => {
        await runNix("nix", [
          "copy",
          "--from",
          server.url,
          "--to",
          store,
          "--option",
          "trusted-public-keys",
          arcaKey,
          ...all,
        ]);
        const copied = await pathInfo(all, { store });
        for (const [i, info] of copied.entries()) {
          assert.equal(info.narHash, source[i].narHash, info.path);
          assert.deepEqual(info.references.sort(), source[i].references.sort(), info.path);
          assert.ok(info.signatures?.some((s) => s.startsWith("arca-upload-1:")), info.path);
        }
      };
      // Served at once, from the uploaded files, while they are chunked in the background.
      await checkCopy(`${home.dir}/store-right-away`);
      const listed = await listedEventually(global, env, all);
      assert.deepEqual(listed, [...all].sort());
      assert.deepEqual(
        await uploadsLeftEventually(home.cacheDir),
        [],
        "no upload is left behind",
      );
      const audit = await arcaOk([...global, "audit", "--json"], { env });
      assert.equal(audit.split("\n").filter((l) => l.includes('"Upload"')).length, all.length);

      // Then from arca's own chunks, signed by arca when imported.
      await checkCopy(`${home.dir}/store2`);
      const records = JSON.parse(await arcaOk([...global, "list", "--json"], { env }));
      for (const record of records) {
        assert.ok(
          record.signatures.some((s: string) => s.startsWith("arca-upload-1:")),
          record.storePath,
        );
      }
      // Build logs: `nix store copy-log --to` uploads them, `nix log --store` reads them back.
      const drv = (await runNix("nix-store", ["-q", "--deriver", fixtures.dep])).trim();
      await runNix("nix", [
        "store",
        "copy-log",
        "--to",
        server.url,
        "--option",
        "netrc-file",
        netrc,
        drv,
      ]);
      const expected = await runNix("nix", ["log", drv]);
      // By output path: Nix finds the deriver in the narinfo, then GETs /log/<drv>.
      assert.equal(await runNix("nix", ["log", "--store", server.url, fixtures.dep]), expected);
      const direct = await fetch(`${server.url}/log/${drv.slice("/nix/store/".length)}`);
      assert.equal(direct.status, 200);
      await direct.body?.cancel();
      // The owner's signatures came through the upload: Nix trusts them on their own.
      const store3 = `${home.dir}/store3`;
      await runNix("nix", [
        "copy",
        "--from",
        server.url,
        "--to",
        store3,
        "--option",
        "trusted-public-keys",
        ownerKey,
        fixtures.top,
      ]);
    } finally {
      await server.stop();
      await home.cleanup();
    }
  },
});

Deno.test({
  name: "e2e upload: forged uploads are refused and leave no trace",
  ignore: !HAVE_NIX,
  async fn() {
    const home = await makeArcaHome();
    const env = home.env;
    const global = ["--cache-dir", home.cacheDir];
    await Deno.writeTextFile(`${home.dir}/token`, TOKEN);
    const server = await startServe([...global, "--upload-token-file", `${home.dir}/token`], {
      env,
    });
    const auth = { authorization: `Bearer ${TOKEN}` };
    const put = async (path: string, body: string | Uint8Array) => {
      const response = await fetch(`${server.url}${path}`, {
        method: "PUT",
        body: typeof body === "string" ? body : new Blob([body as Uint8Array<ArrayBuffer>]),
        headers: auth,
      });
      return { status: response.status, text: await response.text() };
    };
    try {
      const nar = encodeNar({ type: "regular", contents: pseudoRandomBytes(300_000, 5) });
      const compressed = await xz(nar);
      const name = `${encodeNixBase32(sha256(compressed))}.nar.xz`;
      const storePath = "/nix/store/0c0s1ilpbrzc4c8yrbrzsk4n0jhqba8m-forged";
      const narinfo = (fields: Record<string, string>) =>
        Object.entries({
          StorePath: storePath,
          URL: `nar/${name}`,
          Compression: "xz",
          FileHash: formatNixHash(sha256(compressed)),
          FileSize: String(compressed.length),
          NarHash: formatNixHash(sha256(nar)),
          NarSize: String(nar.length),
          References: "",
          ...fields,
        }).map(([k, v]) => `${k}: ${v}\n`).join("");
      const hashPart = "0c0s1ilpbrzc4c8yrbrzsk4n0jhqba8m";

      // A NarHash that is not the uploaded NAR's.
      assert.equal((await put(`/nar/${name}`, compressed)).status, 204);
      const badHash = await put(
        `/${hashPart}.narinfo`,
        narinfo({ NarHash: formatNixHash(sha256(new Uint8Array([1]))) }),
      );
      assert.equal(badHash.status, 400);
      assert.match(badHash.text, /hash mismatch/i);
      // A reference the cache does not hold.
      assert.equal((await put(`/nar/${name}`, compressed)).status, 204);
      const missingRef = await put(
        `/${hashPart}.narinfo`,
        narinfo({ References: "1b8m03r63zqhnjf7l5wnldhh7c134ap5-missing" }),
      );
      assert.equal(missingRef.status, 400);
      assert.match(missingRef.text, /not in the cache/);
      // A truncated NAR.
      const truncated = await xz(nar.subarray(0, nar.length - 100));
      const truncatedName = `${encodeNixBase32(sha256(truncated))}.nar.xz`;
      assert.equal((await put(`/nar/${truncatedName}`, truncated)).status, 400);
      // A file that does not hash to its name.
      const misnamed = `${encodeNixBase32(sha256(new Uint8Array([9])))}.nar.xz`;
      assert.equal((await put(`/nar/${misnamed}`, compressed)).status, 400);
      // A narinfo for a NAR never uploaded.
      const never = await put(`/${hashPart}.narinfo`, narinfo({}));
      assert.equal(never.status, 400);
      // A narinfo under another path's name, and a malformed one.
      assert.equal(
        (await put(`/1b8m03r63zqhnjf7l5wnldhh7c134ap5.narinfo`, narinfo({}))).status,
        400,
      );
      assert.equal((await put(`/${hashPart}.narinfo`, "StorePath: /etc/passwd\n")).status, 400);
      // Path traversal in the URL (raw, as fetch would normalize it).
      const conn = await Deno.connect({
        hostname: "127.0.0.1",
        port: Number(new URL(server.url).port),
      });
      await conn.write(new TextEncoder().encode(
        `PUT /nar/../../../tmp/x.nar HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${TOKEN}\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc`,
      ));
      const reply = new TextDecoder().decode(await new Response(conn.readable).arrayBuffer());
      assert.match(reply, /^HTTP\/1\.1 400/);

      assert.equal((await arcaOk([...global, "list"], { env })).trim(), "");
      assert.deepEqual(await uploadsLeft(home.cacheDir), []);
      const status = JSON.parse(await arcaOk([...global, "status", "--json"], { env }));
      assert.equal(status.paths, 0);
      assert.equal(status.chunks, 0, "no chunk of a refused upload is in the store");
      // The server keeps serving, and a correct upload still works.
      assert.equal((await put(`/nar/${name}`, compressed)).status, 204);
      assert.equal((await put(`/${hashPart}.narinfo`, narinfo({}))).status, 204);
      assert.deepEqual(await listedEventually(global, env, [storePath]), [storePath]);
    } finally {
      await server.stop();
      await home.cleanup();
    }
  },
});
