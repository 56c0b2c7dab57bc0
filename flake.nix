# pares-arca as a flake: the arca package (nixpkgs' Deno running this source, with the npm
# dependencies of deno.lock fetched by their lockfile integrity hashes, so the build itself
# needs no network), an app, a dev shell, an overlay and the NixOS module, for x86_64-linux
# and aarch64-linux.
#
# Our own machines cannot reach nixpkgs, so the build is checked only where it can be
# fetched; tests/nix/flake_test.ts evaluates these outputs against a stand-in for nixpkgs.
{
  description = "pares-arca: a peer-to-peer Nix binary cache in one program, arca";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});

      # The one place the version is written is src/version.ts.
      version = builtins.head (
        builtins.match ''.*export const VERSION = "([^"]+)".*'' (builtins.readFile ./src/version.ts)
      );

      # The npm packages of deno.lock (lockfile version 5) that Deno loads on `system`: those
      # whose `os` and `cpu` fields, when present, name Linux and the system's CPU. A key is
      # `name@version`, with `_peer@version…` appended when peer dependencies differ.
      npmPackagesFor =
        system:
        let
          lock = builtins.fromJSON (builtins.readFile ./deno.lock);
          cpu =
            {
              x86_64-linux = "x64";
              aarch64-linux = "arm64";
            }
            .${system};
          fits =
            meta:
            (!(meta ? os) || builtins.elem "linux" meta.os) && (!(meta ? cpu) || builtins.elem cpu meta.cpu);
          parse =
            key:
            let
              match = builtins.match "(@?[^@]+)@([^_]+)(_.*)?" key;
              name = builtins.elemAt match 0;
              version = builtins.elemAt match 1;
            in
            {
              inherit name version;
              url = "https://registry.npmjs.org/${name}/-/${baseNameOf name}-${version}.tgz";
              hash = lock.npm.${key}.integrity;
            };
          keys = builtins.filter (key: fits lock.npm.${key}) (builtins.attrNames (lock.npm or { }));
          # One entry per name@version: peer-dependency variants share the package files.
          byId = builtins.listToAttrs (
            map (package: {
              name = "${package.name}@${package.version}";
              value = package;
            }) (map parse keys)
          );
        in
        if lock.version or null != "5" then
          throw "flake.nix reads deno.lock version 5, not ${toString (lock.version or "unknown")}"
        else
          builtins.attrValues byId;

      # Deno's npm cache (DENO_DIR/npm/registry.npmjs.org/<name>/<version>/) built from the
      # lockfile's tarballs. Native Node-API addons get their library paths patched.
      denoNpmCacheFor =
        system: pkgs:
        let
          packages = npmPackagesFor system;
          unpack =
            package:
            let
              tarball = pkgs.fetchurl { inherit (package) url hash; };
              dir = "$out/npm/registry.npmjs.org/${package.name}/${package.version}";
            in
            ''
              mkdir -p "${dir}"
              tar -xzf ${tarball} --strip-components=1 --no-same-owner --no-same-permissions -C "${dir}"
            '';
        in
        pkgs.stdenv.mkDerivation {
          pname = "pares-arca-deno-npm-cache";
          inherit version;
          dontUnpack = true;
          dontConfigure = true;
          dontBuild = true;
          nativeBuildInputs = [ pkgs.autoPatchelfHook ];
          # libgcc_s for the glibc addons; the musl variants (never loaded on glibc) need a
          # musl libc.so that is not there.
          buildInputs = [ pkgs.stdenv.cc.cc.lib ];
          autoPatchelfIgnoreMissingDeps = [ "libc.so" ];
          # Keep the packages' files as published, but for the addons' library paths.
          dontPatchShebangs = true;
          dontStrip = true;
          installPhase = ''
            runHook preInstall
            ${lib.concatMapStrings unpack packages}
            chmod -R u+w,a+rX "$out"
            runHook postInstall
          '';
          passthru = { inherit packages; };
        };

      arcaFor =
        system: pkgs:
        let
          npmCache = denoNpmCacheFor system pkgs;
          share = "$out/share/pares-arca";
        in
        pkgs.stdenvNoCC.mkDerivation {
          pname = "pares-arca";
          inherit version;
          src = lib.fileset.toSource {
            root = ./.;
            fileset = lib.fileset.unions [
              ./main.ts
              ./src
              ./deno.json
              ./deno.lock
            ];
          };
          nativeBuildInputs = [ pkgs.makeBinaryWrapper ];
          dontConfigure = true;
          dontBuild = true;
          # `arca` runs `deno run` on the source in the store: every permission, the unstable
          # kv and net APIs (deno.json), the npm packages from the read-only cache above,
          # and the lockfile as it is (--frozen).
          installPhase = ''
            runHook preInstall
            mkdir -p ${share} $out/bin
            cp -r main.ts src deno.json deno.lock ${share}/
            makeWrapper ${pkgs.deno}/bin/deno $out/bin/arca \
              --set DENO_DIR ${npmCache} \
              --set-default DENO_NO_UPDATE_CHECK 1 \
              --add-flags "run --cached-only --frozen --allow-all --config ${share}/deno.json ${share}/main.ts"
            runHook postInstall
          '';
          doInstallCheck = true;
          installCheckPhase = ''
            runHook preInstallCheck
            [ "$(HOME=$TMPDIR $out/bin/arca --version)" = ${version} ]
            runHook postInstallCheck
          '';
          passthru.denoNpmCache = npmCache;
          meta = {
            description = "Peer-to-peer Nix binary cache: a deduplicated, signed substituter";
            mainProgram = "arca";
            platforms = systems;
          };
        };
    in
    {
      packages = forAllSystems (
        system: pkgs: {
          default = arcaFor system pkgs;
          pares-arca = self.packages.${system}.default;
        }
      );

      apps = forAllSystems (
        system: _pkgs: {
          default = {
            type = "app";
            program = "${self.packages.${system}.default}/bin/arca";
            meta.description = "arca, the pares-arca command";
          };
        }
      );

      devShells = forAllSystems (
        _system: pkgs: {
          default = pkgs.mkShell {
            packages = [
              pkgs.deno
              pkgs.nix
              pkgs.zstd
              pkgs.xz
            ];
          };
        }
      );

      overlays.default = final: _prev: {
        pares-arca = arcaFor final.stdenv.hostPlatform.system final;
      };

      nixosModules.default =
        { lib, pkgs, ... }:
        {
          imports = [ ./nixos-module.nix ];
          config.services.pares-arca.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        };
    };
}
