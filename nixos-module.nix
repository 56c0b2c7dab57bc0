# NixOS module `services.pares-arca`: runs arca, the pares-arca Nix binary cache, as a
# hardened systemd service (`arca serve`, or `arca swarm --also-serve` with swarm.enable),
# and wires the local Nix to it (substituter, trusted public key, post-build hook) through
# nix.settings, so nix.conf is never edited by hand.
#
# Secrets (signing key, upload token, swarm topic key) are files outside the Nix store. The
# unit reads them with systemd's LoadCredential=, and ExecStartPre writes the runtime
# config.toml (/run/pares-arca/config.toml, mode 0600) from a template in the store (the
# `settings` plus what the options set) with the credentials directory and the topic key
# filled in. So the topic key, which config.toml holds as `topic_key`, never enters the store.
#
# The post-build hook is the script of src/cache/spool.ts `postBuildHookScript` (what
# `arca install-hook` writes), spooling into <cacheDir>/spool; `arca serve` drains it.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:

let
  cfg = config.services.pares-arca;

  inherit (lib)
    mkOption
    mkEnableOption
    mkIf
    mkMerge
    types
    literalExpression
    optional
    optionalAttrs
    optionalString
    escapeShellArg
    hasInfix
    hasPrefix
    removeSuffix
    ;

  settingsFormat = pkgs.formats.toml { };

  stateDir = "/var/lib/pares-arca";
  runtimeDir = "/run/pares-arca";
  runtimeConfig = "${runtimeDir}/config.toml";
  cacheDir = removeSuffix "/" cfg.cacheDir;
  spoolDir = "${cacheDir}/spool";
  cacheDirIsState = cacheDir == stateDir || hasPrefix "${stateDir}/" cacheDir;

  # Replaced by ExecStartPre in the config template.
  credentialsPlaceholder = "@CREDENTIALS_DIRECTORY@";
  topicKeyPlaceholder = "@TOPIC_KEY@";

  bracket = host: if hasInfix ":" host then "[${host}]" else host;
  bindAddress = "${bracket cfg.bind}:${toString cfg.port}";
  # The address the local Nix reaches the substituter on.
  localHost =
    if cfg.bind == "0.0.0.0" then
      "127.0.0.1"
    else if cfg.bind == "::" then
      "[::1]"
    else
      bracket cfg.bind;
  substituterUrl = "http://${localHost}:${toString cfg.port}";

  # arca's default segment (src/config.ts UNIVERSAL_SEGMENT), used when settings has none.
  universalSegment = {
    name = "universal";
    description = "every path this cache holds";
    filter = "all";
  };
  segments = cfg.settings.segments or [ universalSegment ];
  segmentsWithTopicKey = map (segment: { topic_key = topicKeyPlaceholder; } // segment) segments;
  settingsHaveTopicKey = builtins.any (segment: segment ? topic_key) (cfg.settings.segments or [ ]);

  credentials =
    optional (cfg.signingKeyFile != null) "signing-key:${cfg.signingKeyFile}"
    ++ optional (cfg.uploadTokenFile != null) "upload-token:${cfg.uploadTokenFile}"
    ++ optional (cfg.swarm.topicKeyFile != null) "topic-key:${cfg.swarm.topicKeyFile}";

  # config.toml as arca reads it (src/config.ts): the free-form settings, then what the
  # options set (the options win).
  configValue =
    cfg.settings
    // {
      cache_dir = cacheDir;
      bind = bindAddress;
    }
    // optionalAttrs (cfg.signingKeyFile != null) {
      signing_key_path = "${credentialsPlaceholder}/signing-key";
    }
    // optionalAttrs (cfg.uploadTokenFile != null) {
      upload_token_file = "${credentialsPlaceholder}/upload-token";
    }
    // optionalAttrs (cfg.swarm.topicKeyFile != null) { segments = segmentsWithTopicKey; }
    // optionalAttrs (cfg.swarm.staticPeers != [ ]) {
      static_peers = (cfg.settings.static_peers or [ ]) ++ cfg.swarm.staticPeers;
    }
    // optionalAttrs (cfg.swarm.trustedPublicKeys != [ ]) {
      trusted_public_keys = (cfg.settings.trusted_public_keys or [ ]) ++ cfg.swarm.trustedPublicKeys;
    };

  configTemplate = settingsFormat.generate "pares-arca-config.toml" configValue;

  # ExecStartPre: the runtime config.toml, mode 0600, in the runtime directory.
  writeConfig = pkgs.writeShellScript "pares-arca-write-config" ''
    set -eu
    umask 077
    text=$(< ${configTemplate})
    ${optionalString (cfg.swarm.topicKeyFile != null) ''
      key=$(< "$CREDENTIALS_DIRECTORY/topic-key")
      case $key in
        "" | *[!A-Za-z0-9._:+/=-]*)
          echo "pares-arca: ${cfg.swarm.topicKeyFile} must hold one topic key (from arca keygen)" >&2
          exit 1
          ;;
      esac
      text=''${text//"${topicKeyPlaceholder}"/"$key"}
    ''}
    text=''${text//"${credentialsPlaceholder}"/"''${CREDENTIALS_DIRECTORY:-}"}
    printf '%s\n' "$text" > "''${RUNTIME_DIRECTORY:-${runtimeDir}}/config.toml"
  '';

  # The same script as src/cache/spool.ts postBuildHookScript writes (tests/nix/module_test.ts
  # checks that they stay the same), spooling into <cacheDir>/spool.
  postBuildHookScript = pkgs.writeShellScript "pares-arca-post-build-hook" ''
    # pares-arca post-build hook, written by the NixOS module services.pares-arca.
    #
    # Nix runs this as root after each build, with DRV_PATH and OUT_PATHS set. It writes the
    # built output paths, one a line, to a new file in the spool directory below; arca imports
    # them from there (its serve command drains the spool) and deletes the file. It takes no
    # lock and uses no network, and it exits 0 whatever happens: a failing post-build hook
    # would fail the build, and a path it cannot spool is only missing from the cache.
    spool=${escapeShellArg spoolDir}

    arca_spool() {
      set -f
      umask 022
      PATH="''${PATH:+$PATH:}/run/current-system/sw/bin:/nix/var/nix/profiles/default/bin:/usr/local/bin:/usr/bin:/bin"
      export PATH
      paths=''${OUT_PATHS:-}
      if [ -z "$paths" ]; then
        # Nix 2.8 leaves OUT_PATHS empty (NixOS/nix#6446): ask the store.
        [ -n "''${DRV_PATH:-}" ] || return 0
        if command -v timeout >/dev/null 2>&1; then
          paths=$(timeout 5 nix-store -q --outputs "$DRV_PATH") || return 1
        else
          paths=$(nix-store -q --outputs "$DRV_PATH") || return 1
        fi
        [ -n "$paths" ] || return 0
      fi
      if [ ! -d "$spool" ]; then
        # Recreate a removed spool directory, owned like its parent (arca's cache directory),
        # so that the arca service may delete the files it has imported.
        mkdir -m 0755 "$spool" || return 1
        set -- $(ls -ldn "''${spool%/*}/")
        chown "$3:$4" "$spool" 2>/dev/null
      fi
      tmp=$(mktemp "$spool/.tmp.XXXXXXXXXX") || return 1
      if { for p in $paths; do printf '%s\n' "$p"; done; } >"$tmp" && chmod 0644 "$tmp" &&
        mv -f "$tmp" "$spool/$(date +%s)-$$-''${tmp##*/.tmp.}.paths"; then
        return 0
      fi
      rm -f "$tmp"
      return 1
    }

    if ! arca_spool </dev/null >/dev/null 2>&1; then
      echo "arca post-build hook: cannot spool the outputs of ''${DRV_PATH:-?} to $spool" >&2 || :
    fi
    exit 0
  '';

  commandArgs =
    [
      "--config"
      runtimeConfig
    ]
    ++ (
      if cfg.swarm.enable then
        [
          "swarm"
          "--also-serve"
          "--bind-address"
          cfg.bind
          "--http-port"
          (toString cfg.port)
          "--discovery-port"
          (toString cfg.swarm.discoveryPort)
          "--sync-port"
          (toString cfg.swarm.syncPort)
        ]
      else
        [
          "serve"
          "--bind"
          bindAddress
        ]
    )
    ++ cfg.extraArgs;

  lowPorts = builtins.any (port: port < 1024) (
    [ cfg.port ]
    ++ optional cfg.swarm.enable cfg.swarm.discoveryPort
    ++ optional cfg.swarm.enable cfg.swarm.syncPort
  );

  secretFileOption =
    what: description:
    mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/pares-arca-${what}";
      description = ''
        ${description} Absolute path outside the Nix store (a string, not a Nix path
        literal, which would copy the secret into the world-readable store). It may be
        readable by root only: the service reads it through systemd's LoadCredential=.
      '';
    };
in
{
  options.services.pares-arca = {
    enable = mkEnableOption "pares-arca, a peer-to-peer Nix binary cache (arca)";

    package = mkOption {
      type = types.package;
      default = pkgs.pares-arca;
      defaultText = literalExpression "pkgs.pares-arca";
      description = "The arca package (the flake's `packages.<system>.default`).";
    };

    bind = mkOption {
      type = types.str;
      default = if cfg.swarm.enable then "0.0.0.0" else "127.0.0.1";
      defaultText = literalExpression ''if config.services.pares-arca.swarm.enable then "0.0.0.0" else "127.0.0.1"'';
      example = "0.0.0.0";
      description = ''
        Address the substituter listens on (with swarm.enable, the discovery and sync
        sockets too). An IPv6 address is written without brackets.
      '';
    };

    port = mkOption {
      type = types.port;
      default = 5555;
      description = "TCP port of the HTTP substituter.";
    };

    cacheDir = mkOption {
      type = types.str;
      default = stateDir;
      description = ''
        Where arca keeps its chunks, manifests and metadata. The default is the service's
        StateDirectory; another directory is created (owned by the pares-arca user) and
        made writable for the service.
      '';
    };

    signingKeyFile = secretFileOption "signing-key" ''
      Secret key (Nix format, from `arca sign-keygen` or `nix key generate-secret`) that
      signs imported and uploaded paths, and served narinfos lacking its signature.
    '';

    publicKey = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "my-cache-1:kZ5Ci0EAmqRnC6dNdcc8UfFhzVRjHcGvF1K9TqNdcmc=";
      description = ''
        The public key of signingKeyFile (`name:base64`, printed by `arca sign-keygen`).
        With addToSubstituters it goes to nix.settings.trusted-public-keys.
      '';
    };

    uploadTokenFile = secretFileOption "upload-token" ''
      File holding the token that `nix copy --to http://…` clients must send (as the netrc
      password); uploads are off when null.
    '';

    postBuildHook = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Install the post-build hook through nix.settings.post-build-hook: every path this
        machine builds is spooled into `<cacheDir>/spool` and imported by `arca serve`.
      '';
    };

    swarm = {
      enable = mkEnableOption "the swarm: run `arca swarm --also-serve` instead of `arca serve`";

      topicKeyFile = secretFileOption "topic-key" ''
        File holding the swarm topic key (from `arca keygen`). It becomes the `topic_key` of
        every segment of `settings.segments` that has none (of arca's default "universal"
        segment when there are none) in the runtime config.toml, never in the Nix store.
      '';

      staticPeers = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "build1.example:7070" ];
        description = "Peers' discovery addresses (`host:port`), added to config.toml `static_peers`.";
      };

      trustedPublicKeys = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "team-cache-1:kZ5Ci0EAmqRnC6dNdcc8UfFhzVRjHcGvF1K9TqNdcmc=" ];
        description = ''
          Keys whose signatures make a peer's record acceptable in every segment, added to
          config.toml `trusted_public_keys`. The key of signingKeyFile is always trusted.
        '';
      };

      discoveryPort = mkOption {
        type = types.port;
        default = 7070;
        description = "UDP port of discovery beacons (unicast and multicast).";
      };

      syncPort = mkOption {
        type = types.port;
        default = 7071;
        description = "TCP port of the Noise-encrypted sync connections.";
      };
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Open the substituter's TCP port, and with swarm.enable the sync TCP port and the
        discovery UDP port.
      '';
    };

    addToSubstituters = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Make this machine's Nix use the cache: adds its URL to nix.settings.substituters and
        publicKey to nix.settings.trusted-public-keys.
      '';
    };

    settings = mkOption {
      type = settingsFormat.type;
      default = { };
      example = literalExpression ''
        {
          backend = "kv";
          compression = "zstd";
          priority = 30;
          segments = [ { name = "team"; filter = "all"; } ];
        }
      '';
      description = ''
        Free-form config.toml (see arca's README, "Config reference"). What the other
        options set wins: cache_dir, bind, signing_key_path, upload_token_file, and the
        segments' topic_key. Put no secret here: this file is in the Nix store.
      '';
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--verbose" ];
      description = "Extra arguments appended to the `arca serve` or `arca swarm` command line.";
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions =
        [
          {
            assertion = hasPrefix "/" cfg.cacheDir;
            message = "services.pares-arca.cacheDir must be an absolute path";
          }
          {
            assertion = !cfg.swarm.enable || cfg.swarm.topicKeyFile != null || settingsHaveTopicKey;
            message = "services.pares-arca.swarm.enable needs swarm.topicKeyFile (a file holding the output of `arca keygen`)";
          }
        ]
        ++ map
          (file: {
            assertion = hasPrefix "/" file && !hasPrefix "/nix/store/" file;
            message = "services.pares-arca: secret files must be absolute paths outside the Nix store, not ${file}";
          })
          (
            builtins.filter (file: file != null) [
              cfg.signingKeyFile
              cfg.uploadTokenFile
              cfg.swarm.topicKeyFile
            ]
          );

      warnings =
        optional settingsHaveTopicKey "services.pares-arca.settings.segments holds a topic_key, which ends up in the world-readable Nix store: use swarm.topicKeyFile"
        ++ optional (cfg.addToSubstituters && cfg.publicKey == null) "services.pares-arca.addToSubstituters without publicKey: Nix will accept only paths signed by keys it already trusts";

      users.users.pares-arca = {
        isSystemUser = true;
        group = "pares-arca";
        home = stateDir;
        description = "pares-arca Nix binary cache";
      };
      users.groups.pares-arca = { };

      environment.systemPackages = [ cfg.package ];

      systemd.tmpfiles.rules = optional (!cacheDirIsState) "d ${cacheDir} 0750 pares-arca pares-arca - -";

      systemd.services.pares-arca = {
        description = "pares-arca Nix binary cache (arca ${if cfg.swarm.enable then "swarm" else "serve"})";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ];
        # Imports (the post-build hook's spool) ask the local Nix for path info.
        path = [ config.nix.package ];
        environment = {
          HOME = stateDir;
          DENO_NO_UPDATE_CHECK = "1";
          NO_COLOR = "1";
        };
        serviceConfig = {
          Type = "simple";
          User = "pares-arca";
          Group = "pares-arca";
          ExecStartPre = "${writeConfig}";
          ExecStart = utils.escapeSystemdExecArgs ([ "${cfg.package}/bin/arca" ] ++ commandArgs);
          Restart = "on-failure";
          RestartSec = 5;
          WorkingDirectory = stateDir;
          StateDirectory = "pares-arca";
          StateDirectoryMode = "0750";
          RuntimeDirectory = "pares-arca";
          RuntimeDirectoryMode = "0700";
          LoadCredential = credentials;
          ReadWritePaths = optional (!cacheDirIsState) cacheDir;

          # Hardening. No MemoryDenyWriteExecute: V8's JIT needs writable code pages.
          NoNewPrivileges = true;
          ProtectSystem = "strict";
          ProtectHome = true;
          PrivateTmp = true;
          PrivateDevices = true;
          ProtectKernelTunables = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectControlGroups = true;
          ProtectClock = true;
          ProtectHostname = true;
          ProtectProc = "invisible";
          RestrictNamespaces = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          LockPersonality = true;
          RemoveIPC = true;
          SystemCallArchitectures = "native";
          RestrictAddressFamilies = [
            "AF_INET"
            "AF_INET6"
            "AF_UNIX"
          ] ++ optional cfg.swarm.enable "AF_NETLINK";
          # Empty (no capability at all) unless a port below 1024 needs binding.
          CapabilityBoundingSet = if lowPorts then "CAP_NET_BIND_SERVICE" else "";
          AmbientCapabilities = if lowPorts then "CAP_NET_BIND_SERVICE" else "";
        };
      };
    }

    (mkIf cfg.openFirewall {
      networking.firewall.allowedTCPPorts = [ cfg.port ] ++ optional cfg.swarm.enable cfg.swarm.syncPort;
      networking.firewall.allowedUDPPorts = optional cfg.swarm.enable cfg.swarm.discoveryPort;
    })

    (mkIf cfg.addToSubstituters {
      nix.settings.substituters = [ substituterUrl ];
      nix.settings.trusted-public-keys = optional (cfg.publicKey != null) cfg.publicKey;
    })

    (mkIf cfg.postBuildHook { nix.settings.post-build-hook = postBuildHookScript; })
  ]);
}
