/**
 * Configuration: the `config.toml` schema, its defaults, first-run creation and the
 * precedence flag > environment > config file > default.
 *
 * The file lives at `$XDG_CONFIG_HOME/pares-arca/config.toml` (default
 * `~/.config/pares-arca/config.toml`) unless `--config` names another. On first run, when
 * the default file does not exist, it is created with every setting commented out at its
 * default. An invalid file is an error naming the key and the line; the file is never
 * rewritten, so nothing in it is lost.
 * @module
 */

import { parse as parseToml, TomlError } from "smol-toml";
import { ConfigError, UsageError } from "./errors.ts";
import { parseDuration } from "./units.ts";

/** Which paths a segment takes (see src/cache/segments.ts). */
export type SegmentFilter = "nixpkgs" | "custom" | "all";

/** One `[[segments]]` table. */
export interface SegmentConfig {
  name: string;
  /** The swarm topic key (64 hex digits from `arca keygen`); no swarm for this segment without it. */
  topicKey?: string;
  description?: string;
  filter: SegmentFilter;
  /** Keys (`name:base64`) whose signatures make a peer's record acceptable in this segment. */
  trustedPublicKeys?: string[];
}

/** One upstream cache (`[[upstreams]]`, or `--upstream` with `--trusted-public-key`). */
export interface UpstreamConfig {
  /** Base URL, `http(s)://host[:port][/path]`, without a trailing slash. */
  url: string;
  /** Keys (`name:base64`): a narinfo of this upstream is accepted only when one signed it. */
  trustedPublicKeys: string[];
  /** Lower is asked first, as Nix priorities ({@link DEFAULT_UPSTREAM_PRIORITY} when unset). */
  priority: number;
}

/** Settings a config file may hold (snake_case as in the file). */
export interface FileConfig {
  cache_dir?: string;
  backend?: string;
  compression?: string;
  signing_key_path?: string;
  bind?: string;
  priority?: number;
  upload_token_file?: string;
  read_token_file?: string;
  static_peers?: string[];
  trusted_public_keys?: string[];
  segments?: SegmentConfig[];
  upstreams?: UpstreamConfig[];
  /** Duration (`5s`): how long an upstream may take to answer, or a NAR from it stall. */
  upstream_timeout?: string;
  /** Duration (`1m`): how long a path no upstream has is remembered as missing. */
  upstream_negative_ttl?: string;
}

/** The effective settings after applying defaults, config, environment and flags. */
export interface Settings {
  /** The config file that was read (it may not exist when named by `--config`: it must). */
  configPath: string;
  /** The directory holding the config file; `sign-keygen` writes keys here. */
  configDir: string;
  cacheDir: string;
  backend: "kv" | "filesystem";
  compression: "zstd" | "xz";
  signingKeyPath?: string;
  bind: string;
  priority: number;
  /** Uploads are accepted only with the token in this file; off when unset. */
  uploadTokenFile?: string;
  /** Reads need the token in this file; open when unset. */
  readTokenFile?: string;
  /** The segments, in order: the first whose filter matches a path gets it. */
  segments: SegmentConfig[];
  /** Swarm peers to announce to by unicast (`host:discovery-port`). */
  staticPeers: string[];
  /** Keys trusted for swarm records in every segment. */
  trustedPublicKeys: string[];
  /**
   * Upstream caches in the order they are asked: those given by `--upstream` first (in
   * their order), then `[[upstreams]]` by priority (lower first; ties in file order).
   */
  upstreams: UpstreamConfig[];
  /** How long an upstream may take to answer, or a NAR from it stall (ms). */
  upstreamTimeoutMs: number;
  /** How long a path no upstream has is remembered as missing (ms). */
  upstreamNegativeTtlMs: number;
}

/** Values given on the command line; undefined means "not given". */
export interface FlagSettings {
  config?: string;
  cacheDir?: string;
  backend?: string;
  compression?: string;
  signingKey?: string;
  bind?: string;
  priority?: string | number;
  uploadTokenFile?: string;
  readTokenFile?: string;
  /** `--upstream` URLs, in priority order. */
  upstreams?: string[];
  /** `--trusted-public-key` keys, trusted for the `--upstream` URLs. */
  upstreamTrustedKeys?: string[];
  /** `--upstream-timeout` (a duration). */
  upstreamTimeout?: string;
  /** `--upstream-negative-ttl` (a duration). */
  upstreamNegativeTtl?: string;
}

/** Where the environment is read from; tests pass their own. */
export type Environment = Record<string, string | undefined>;

const KEY_TYPES: Record<
  Exclude<keyof FileConfig, "segments" | "upstreams">,
  "string" | "integer" | "strings"
> = {
  cache_dir: "string",
  backend: "string",
  compression: "string",
  signing_key_path: "string",
  bind: "string",
  priority: "integer",
  upload_token_file: "string",
  read_token_file: "string",
  static_peers: "strings",
  trusted_public_keys: "strings",
  upstream_timeout: "string",
  upstream_negative_ttl: "string",
};

/** The segment every default configuration has: all paths, shared under its topic key. */
export const UNIVERSAL_SEGMENT: SegmentConfig = Object.freeze({
  name: "universal",
  description: "every path this cache holds",
  filter: "all",
}) as SegmentConfig;

/** Segment names: a letter or digit, then up to 63 letters, digits, `.`, `_` or `-`. */
export const SEGMENT_NAME_RE: RegExp = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

const SEGMENT_KEYS = ["name", "topic_key", "description", "filter", "trusted_public_keys"];
const SEGMENT_FILTERS: SegmentFilter[] = ["nixpkgs", "custom", "all"];

const UPSTREAM_KEYS = ["url", "trusted_public_keys", "priority"];

/** Priority of an `[[upstreams]]` table without one (Nix's default for a store). */
export const DEFAULT_UPSTREAM_PRIORITY = 50;
/** Default `upstream_timeout`. */
export const DEFAULT_UPSTREAM_TIMEOUT = "5s";
/** Default `upstream_negative_ttl`. */
export const DEFAULT_UPSTREAM_NEGATIVE_TTL = "1m";

/** Default bind address of the substituter. */
export const DEFAULT_BIND = "127.0.0.1:5555";
/** Default `Priority` advertised in nix-cache-info (cache.nixos.org uses 40). */
export const DEFAULT_PRIORITY = 30;

function homeDir(env: Environment): string {
  const home = env.HOME;
  if (!home) throw new UsageError("Cannot find the home directory: HOME is not set");
  return home;
}

/** The default config file path: `$XDG_CONFIG_HOME/pares-arca/config.toml`. */
export function defaultConfigPath(env: Environment): string {
  const base = env.XDG_CONFIG_HOME || `${homeDir(env)}/.config`;
  return `${base}/pares-arca/config.toml`;
}

/** The default cache directory: `$XDG_CACHE_HOME/pares-arca`. */
export function defaultCacheDir(env: Environment): string {
  const base = env.XDG_CACHE_HOME || `${homeDir(env)}/.cache`;
  return `${base}/pares-arca`;
}

/** The text written on first run: every setting commented out at its default. */
export function defaultConfigText(env: Environment): string {
  return `# pares-arca configuration. Every setting below is commented out at its default.
# Precedence: command-line flag > environment (PARES_ARCA_DIR) > this file > default.

# Where chunks, manifests and metadata live (env PARES_ARCA_DIR, flag --cache-dir).
# cache_dir = ${JSON.stringify(defaultCacheDir(env))}

# Metadata backend: "kv" (Deno KV) or "filesystem" (flag --backend).
# backend = "kv"

# Compression of newly stored chunks: "zstd" (level 3) or "xz" (flag --compression).
# compression = "zstd"

# Secret key (Nix format, from \`arca sign-keygen\` or \`nix key generate-secret\`) used to
# sign imported paths and, in \`serve\`, narinfos lacking its signature (flag --signing-key).
# signing_key_path = "/path/to/my-cache.secret"

# Address the substituter listens on (flag --bind).
# bind = "${DEFAULT_BIND}"

# Priority advertised in /nix-cache-info; lower is preferred by Nix (flag --priority).
# priority = ${DEFAULT_PRIORITY}

# Uploads (\`nix copy --to http://…\`) are off unless this file holds a token; clients send
# it as the HTTP Basic password (netrc) or as "Authorization: Bearer" (flag --upload-token-file).
# upload_token_file = "/etc/pares-arca/upload-token"

# With this set, reads need a token too (flag --read-token-file).
# read_token_file = "/etc/pares-arca/read-token"

# Segments, in order: a path goes to the first whose filter matches ("nixpkgs": signed by
# cache.nixos.org-1; "custom": any other path; "all": everything); \`import --segment\`
# overrides. topic_key (from \`arca keygen\`) is what swarm peers of the segment share.
# Without any [[segments]] table, the one below is the default.
# [[segments]]
# name = "universal"
# description = "every path this cache holds"
# filter = "all"
# topic_key = "<64 hex digits from arca keygen>"
# trusted_public_keys = ["my-cache-1:…"]   # records signed by these keys are accepted from peers

# Swarm: peers to reach by unicast (host:discovery-port), and keys trusted in every segment.
# static_peers = ["build1.example:7070"]
# trusted_public_keys = ["my-cache-1:…"]

# Upstream caches (pull-through): a path neither this cache nor a swarm peer has is looked up
# in each, lower priority first. Its narinfo is accepted only with a valid signature from one
# of the upstream's trusted_public_keys; its NAR is stored here as it streams to the client.
# \`serve --upstream <url> --trusted-public-key <key>\` adds upstreams before these.
# [[upstreams]]
#   url = "https://cache.nixos.org"
#   trusted_public_keys = ["cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="]
#   priority = 40   # lower is asked first (default ${DEFAULT_UPSTREAM_PRIORITY})

# How long an upstream may take to answer (or a NAR from it stall) before it is skipped, and
# how long a path no upstream has is remembered as missing (flags --upstream-timeout,
# --upstream-negative-ttl).
# upstream_timeout = "${DEFAULT_UPSTREAM_TIMEOUT}"
# upstream_negative_ttl = "${DEFAULT_UPSTREAM_NEGATIVE_TTL}"
`;
}

/** The line where a top-level key is set: `key =`, `key.sub =`, `"key" =` or `[key…]`. */
function lineOfKey(text: string, key: string): number | undefined {
  const lines = text.split("\n");
  const name = key.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  const pattern = new RegExp(`^\\s*(?:\\[{1,2}\\s*)?(["']?)${name}\\1\\s*[=.\\]]`);
  const index = lines.findIndex((line) => pattern.test(line));
  return index === -1 ? undefined : index + 1;
}

/**
 * Parses and validates config file text. Errors name the file, the line and the key.
 */
export function parseConfigText(text: string, path: string): FileConfig {
  let raw: Record<string, unknown>;
  try {
    raw = parseToml(text) as Record<string, unknown>;
  } catch (error) {
    if (error instanceof TomlError) {
      const detail = error.message.split("\n")[0];
      throw new ConfigError(`Invalid config ${path} line ${error.line}: ${detail}`);
    }
    throw error;
  }
  const config: FileConfig = {};
  for (const [key, value] of Object.entries(raw)) {
    const where = `config ${path} line ${lineOfKey(text, key) ?? "?"}`;
    if (key === "segments") {
      config.segments = parseSegments(value, text, path);
      continue;
    }
    if (key === "upstreams") {
      config.upstreams = parseUpstreams(value, text, path);
      continue;
    }
    if (!(key in KEY_TYPES)) {
      throw new ConfigError(
        `Invalid ${where}: unknown key '${key}' (known: ${
          [...Object.keys(KEY_TYPES), "segments", "upstreams"].join(", ")
        })`,
      );
    }
    const configKey = key as keyof typeof KEY_TYPES;
    const expected = KEY_TYPES[configKey];
    if (expected === "string" && typeof value !== "string") {
      throw new ConfigError(`Invalid ${where}: '${key}' must be a string`);
    }
    if (expected === "integer" && (typeof value !== "number" || !Number.isSafeInteger(value))) {
      throw new ConfigError(`Invalid ${where}: '${key}' must be an integer`);
    }
    if (expected === "strings") {
      if (!Array.isArray(value) || value.some((item) => typeof item !== "string")) {
        throw new ConfigError(`Invalid ${where}: '${key}' must be a list of strings`);
      }
      (config as Record<string, unknown>)[key] = value;
      continue;
    }
    try {
      validateSetting(configKey, value as string | number);
    } catch (error) {
      if (error instanceof UsageError) {
        throw new ConfigError(`Invalid ${where}: ${error.message}`);
      }
      throw error;
    }
    (config as Record<string, unknown>)[key] = value;
  }
  return config;
}

function lineOfSegment(text: string, index: number): number | undefined {
  const lines = text.split("\n");
  let seen = -1;
  for (let i = 0; i < lines.length; i++) {
    if (/^\s*\[\[\s*segments\s*\]\]/.test(lines[i]) && ++seen === index) return i + 1;
  }
  return undefined;
}

function parseSegments(value: unknown, text: string, path: string): SegmentConfig[] {
  if (!Array.isArray(value)) {
    throw new ConfigError(
      `Invalid config ${path} line ${
        lineOfKey(text, "segments") ?? "?"
      }: 'segments' must be an array of tables ([[segments]])`,
    );
  }
  const names = new Set<string>();
  return value.map((table, index) => {
    const where = `config ${path} line ${lineOfSegment(text, index) ?? "?"} ([[segments]] #${
      index + 1
    })`;
    if (table === null || typeof table !== "object" || Array.isArray(table)) {
      throw new ConfigError(`Invalid ${where}: expected a table`);
    }
    const entries = table as Record<string, unknown>;
    for (const [key, field] of Object.entries(entries)) {
      if (!SEGMENT_KEYS.includes(key)) {
        throw new ConfigError(
          `Invalid ${where}: unknown key '${key}' (known: ${SEGMENT_KEYS.join(", ")})`,
        );
      }
      if (typeof field !== "string") {
        throw new ConfigError(`Invalid ${where}: '${key}' must be a string`);
      }
    }
    const name = entries.name as string | undefined;
    if (name === undefined) throw new ConfigError(`Invalid ${where}: 'name' is required`);
    if (!SEGMENT_NAME_RE.test(name)) {
      throw new ConfigError(
        `Invalid ${where}: 'name' must be letters, digits, '.', '_' or '-' (at most 64), not ${
          JSON.stringify(name)
        }`,
      );
    }
    if (names.has(name)) {
      throw new ConfigError(`Invalid ${where}: segment '${name}' is defined twice`);
    }
    names.add(name);
    const filter = (entries.filter ?? "all") as SegmentFilter;
    if (!SEGMENT_FILTERS.includes(filter)) {
      throw new ConfigError(
        `Invalid ${where}: 'filter' must be ${SEGMENT_FILTERS.join(", ")}, not ${
          JSON.stringify(filter)
        }`,
      );
    }
    const topicKey = entries.topic_key as string | undefined;
    if (topicKey !== undefined && topicKey.length === 0) {
      throw new ConfigError(`Invalid ${where}: 'topic_key' must not be empty`);
    }
    const segment: SegmentConfig = { name, filter };
    if (topicKey !== undefined) segment.topicKey = topicKey;
    if (entries.description !== undefined) segment.description = entries.description as string;
    if (entries.trusted_public_keys !== undefined) {
      segment.trustedPublicKeys = entries.trusted_public_keys as string[];
    }
    return segment;
  });
}

function lineOfUpstream(text: string, index: number): number | undefined {
  const lines = text.split("\n");
  let seen = -1;
  for (let i = 0; i < lines.length; i++) {
    if (/^\s*\[\[\s*upstreams\s*\]\]/.test(lines[i]) && ++seen === index) return i + 1;
  }
  return undefined;
}

function parseUpstreams(value: unknown, text: string, path: string): UpstreamConfig[] {
  if (!Array.isArray(value)) {
    throw new ConfigError(
      `Invalid config ${path} line ${
        lineOfKey(text, "upstreams") ?? "?"
      }: 'upstreams' must be an array of tables ([[upstreams]])`,
    );
  }
  const upstreams = value.map((table, index): UpstreamConfig => {
    const where = `config ${path} line ${lineOfUpstream(text, index) ?? "?"} ([[upstreams]] #${
      index + 1
    })`;
    if (table === null || typeof table !== "object" || Array.isArray(table)) {
      throw new ConfigError(`Invalid ${where}: expected a table`);
    }
    const entries = table as Record<string, unknown>;
    for (const key of Object.keys(entries)) {
      if (!UPSTREAM_KEYS.includes(key)) {
        throw new ConfigError(
          `Invalid ${where}: unknown key '${key}' (known: ${UPSTREAM_KEYS.join(", ")})`,
        );
      }
    }
    if (typeof entries.url !== "string") {
      throw new ConfigError(`Invalid ${where}: 'url' is required and must be a string`);
    }
    const keys = entries.trusted_public_keys;
    if (!Array.isArray(keys) || keys.some((key) => typeof key !== "string")) {
      throw new ConfigError(
        `Invalid ${where}: 'trusted_public_keys' is required and must be a list of strings`,
      );
    }
    const priority = entries.priority ?? DEFAULT_UPSTREAM_PRIORITY;
    if (
      typeof priority !== "number" || !Number.isSafeInteger(priority) || priority < 0 ||
      priority > 10_000
    ) {
      throw new ConfigError(`Invalid ${where}: 'priority' must be an integer from 0 to 10000`);
    }
    try {
      return {
        url: parseUpstreamUrl(entries.url),
        trustedPublicKeys: checkUpstreamKeys(keys as string[], "'trusted_public_keys'"),
        priority,
      };
    } catch (error) {
      if (error instanceof UsageError) throw new ConfigError(`Invalid ${where}: ${error.message}`);
      throw error;
    }
  });
  // A stable sort: equal priorities keep their order in the file.
  return upstreams.map((upstream, index) => ({ upstream, index }))
    .sort((a, b) => a.upstream.priority - b.upstream.priority || a.index - b.index)
    .map(({ upstream }) => upstream);
}

/**
 * An upstream cache URL as used: `http(s)://host[:port][/path]` without a trailing slash.
 * UsageError for anything else (another scheme, credentials, a query or fragment).
 */
export function parseUpstreamUrl(text: string): string {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new UsageError(`Invalid upstream URL ${JSON.stringify(text)}: not a URL`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw new UsageError(
      `Invalid upstream URL ${JSON.stringify(text)}: expected http:// or https://`,
    );
  }
  if (url.username !== "" || url.password !== "") {
    throw new UsageError(
      `Invalid upstream URL ${JSON.stringify(url.host)}: credentials in the URL are not supported`,
    );
  }
  if (url.search !== "" || url.hash !== "" || /[?#]/.test(text)) {
    throw new UsageError(
      `Invalid upstream URL ${JSON.stringify(text)}: a query or fragment is not allowed`,
    );
  }
  return url.href.replace(/\/+$/, "");
}

/** A Nix public key as text: `name:base64` of 32 bytes. */
const PUBLIC_KEY_RE = /^[^:\s]+:[A-Za-z0-9+/]{43}=$/;

/** Checks that an upstream has keys, each looking like `name:base64(32 bytes)`. */
function checkUpstreamKeys(keys: string[], what: string): string[] {
  if (keys.length === 0) {
    throw new UsageError(
      `${what} is empty: an upstream needs a trusted key (its paths are refused unsigned)`,
    );
  }
  for (const key of keys) {
    if (!PUBLIC_KEY_RE.test(key.trim())) {
      throw new UsageError(
        `Invalid key in ${what} ${JSON.stringify(key)}: expected name:base64 (a Nix public key)`,
      );
    }
  }
  return keys.map((key) => key.trim());
}

/** Parses a positive duration setting (`5s`, `1m`) into milliseconds. */
function parsePositiveDuration(name: string, text: string): number {
  let ms: number;
  try {
    ms = parseDuration(text);
  } catch {
    throw new UsageError(
      `'${name}' must be a duration such as 5s or 1m, not ${JSON.stringify(text)}`,
    );
  }
  if (ms <= 0) throw new UsageError(`'${name}' must be longer than 0s`);
  return ms;
}

/**
 * The upstreams of the settings: `--upstream` URLs (with the `--trusted-public-key` keys)
 * first, in their order, then the config's by priority.
 */
function mergeUpstreams(flags: FlagSettings, file: FileConfig): UpstreamConfig[] {
  const urls = flags.upstreams ?? [];
  const keys = flags.upstreamTrustedKeys ?? [];
  if (urls.length === 0 && keys.length > 0) {
    throw new UsageError("--trusted-public-key needs --upstream (the keys are the upstreams')");
  }
  const fromFlags = urls.map((url, index): UpstreamConfig => ({
    url: parseUpstreamUrl(url),
    trustedPublicKeys: keys,
    priority: index,
  }));
  if (urls.length > 0) {
    if (keys.length === 0) {
      throw new UsageError(
        "--upstream needs --trusted-public-key (paths without a trusted signature are refused)",
      );
    }
    checkUpstreamKeys(keys, "--trusted-public-key");
  }
  return [...fromFlags, ...(file.upstreams ?? [])];
}

function validateSetting(key: keyof typeof KEY_TYPES, value: string | number): void {
  switch (key) {
    case "backend":
      if (value !== "kv" && value !== "filesystem") {
        throw new UsageError(
          `'backend' must be "kv" or "filesystem", not ${JSON.stringify(value)}`,
        );
      }
      break;
    case "compression":
      if (value !== "zstd" && value !== "xz") {
        throw new UsageError(`'compression' must be "zstd" or "xz", not ${JSON.stringify(value)}`);
      }
      break;
    case "bind":
      try {
        parseBindAddress(String(value));
      } catch {
        throw new UsageError(
          `'bind' must be host:port, e.g. ${DEFAULT_BIND}, not ${JSON.stringify(value)}`,
        );
      }
      break;
    case "priority":
      if (typeof value !== "number" || !Number.isSafeInteger(value) || value < 0 || value > 1000) {
        throw new UsageError(`'priority' must be an integer from 0 to 1000, not ${value}`);
      }
      break;
    case "upstream_timeout":
    case "upstream_negative_ttl":
      parsePositiveDuration(key, String(value));
      break;
    case "cache_dir":
    case "signing_key_path":
    case "upload_token_file":
    case "read_token_file":
      if (String(value) === "") throw new UsageError(`'${key}' must not be empty`);
      break;
  }
}

/** A `host:port` listen address. */
export interface BindAddress {
  hostname: string;
  port: number;
}

/** Parses `host:port` or `[v6]:port`; UsageError when malformed. */
export function parseBindAddress(text: string): BindAddress {
  const match = /^(?:\[([0-9a-fA-F:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})$/.exec(text);
  const port = match ? Number(match[3]) : NaN;
  if (!match || port > 65535) {
    throw new UsageError(
      `Invalid bind address '${text}': expected host:port, e.g. ${DEFAULT_BIND}`,
    );
  }
  return { hostname: match[1] ?? match[2], port };
}

/**
 * Reads the config file (creating the default one on first run) and merges it with the
 * environment and flags.
 */
export async function loadSettings(
  flags: FlagSettings,
  options: { env?: Environment } = {},
): Promise<Settings> {
  const env = options.env ?? Deno.env.toObject();
  const configPath = flags.config ?? env.PARES_ARCA_CONFIG ?? defaultConfigPath(env);
  let text: string;
  try {
    text = await Deno.readTextFile(configPath);
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
    if (flags.config !== undefined) {
      throw new ConfigError(`Config file not found: ${configPath}`);
    }
    text = defaultConfigText(env);
    await writeDefaultConfig(configPath, text);
  }
  const file = parseConfigText(text, configPath);

  const flagOr = <T>(flag: T | undefined, key: keyof typeof KEY_TYPES): string | undefined => {
    if (flag === undefined) return undefined;
    const value = String(flag);
    validateSetting(key, key === "priority" ? parsePriority(value) : value);
    return value;
  };
  const backend = flagOr(flags.backend, "backend") ?? file.backend ?? "kv";
  const compression = flagOr(flags.compression, "compression") ?? file.compression ?? "zstd";
  const bind = flagOr(flags.bind, "bind") ?? file.bind ?? DEFAULT_BIND;
  const priority = flags.priority !== undefined
    ? parsePriority(String(flags.priority))
    : file.priority ?? DEFAULT_PRIORITY;
  validateSetting("priority", priority);
  const cacheDir = flags.cacheDir ?? (env.PARES_ARCA_DIR || undefined) ?? file.cache_dir ??
    defaultCacheDir(env);
  if (cacheDir === "") throw new UsageError("--cache-dir must not be empty");
  const signingKeyPath = flags.signingKey ?? file.signing_key_path;
  const uploadTokenFile = flags.uploadTokenFile ?? file.upload_token_file;
  const readTokenFile = flags.readTokenFile ?? file.read_token_file;
  return {
    configPath,
    configDir: configPath.slice(0, Math.max(configPath.lastIndexOf("/"), 0)) || ".",
    cacheDir: expandHome(cacheDir, env),
    backend: backend as Settings["backend"],
    compression: compression as Settings["compression"],
    signingKeyPath: signingKeyPath === undefined ? undefined : expandHome(signingKeyPath, env),
    bind,
    priority,
    uploadTokenFile: uploadTokenFile === undefined ? undefined : expandHome(uploadTokenFile, env),
    readTokenFile: readTokenFile === undefined ? undefined : expandHome(readTokenFile, env),
    segments: file.segments ?? [{ ...UNIVERSAL_SEGMENT }],
    staticPeers: file.static_peers ?? [],
    trustedPublicKeys: file.trusted_public_keys ?? [],
    upstreams: mergeUpstreams(flags, file),
    upstreamTimeoutMs: parsePositiveDuration(
      "upstream_timeout",
      flagOr(flags.upstreamTimeout, "upstream_timeout") ?? file.upstream_timeout ??
        DEFAULT_UPSTREAM_TIMEOUT,
    ),
    upstreamNegativeTtlMs: parsePositiveDuration(
      "upstream_negative_ttl",
      flagOr(flags.upstreamNegativeTtl, "upstream_negative_ttl") ?? file.upstream_negative_ttl ??
        DEFAULT_UPSTREAM_NEGATIVE_TTL,
    ),
  };
}

function parsePriority(text: string): number {
  if (!/^\d{1,4}$/.test(text)) {
    throw new UsageError(`'priority' must be an integer from 0 to 1000, not ${text}`);
  }
  return Number(text);
}

function expandHome(path: string, env: Environment): string {
  return path === "~" || path.startsWith("~/") ? homeDir(env) + path.slice(1) : path;
}

async function writeDefaultConfig(path: string, text: string): Promise<void> {
  const dir = path.slice(0, path.lastIndexOf("/"));
  if (dir) await Deno.mkdir(dir, { recursive: true });
  try {
    // createNew: never overwrite a file another process created meanwhile.
    await Deno.writeTextFile(path, text, { createNew: true });
  } catch (error) {
    if (!(error instanceof Deno.errors.AlreadyExists)) throw error;
  }
}
