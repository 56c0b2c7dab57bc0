/**
 * The NAR (Nix ARchive) codec, pure: no I/O.
 *
 * Speaks Nix's `nix-archive-1` serialisation (the bytes `nix-store --dump` writes and
 * `NarHash`/`NarSize` are computed over) and the `.ls` listing JSON Nix's binary caches
 * serve (`{"version":1,"root":…}`, as written by Nix 2.8 with `write-nar-listing`).
 *
 * A NAR is a sequence of strings, each an 8-byte little-endian length, the bytes, and
 * zero padding to a multiple of 8:
 *
 * ```
 * nar       = "nix-archive-1" node
 * node      = "(" "type" ( regular | symlink | directory ) ")"
 * regular   = "regular" [ "executable" "" ] "contents" <bytes>
 * symlink   = "symlink" "target" <target>
 * directory = "directory" { "entry" "(" "name" <name> "node" node ")" }
 * ```
 *
 * Directory entries are sorted by byte-wise comparison of their (UTF-8) names.
 *
 * This module owns:
 * - {@link NarParser}, a push parser and strict validator with O(depth) memory that never
 *   buffers file contents, and the {@link narValidator} stream around it;
 * - {@link listNar} / {@link NarListingBuilder} / {@link formatNarListing} for `.ls`;
 * - the framing shared with the filesystem encoder (src/cache/nar_dump.ts):
 *   {@link NarWriter}, {@link encodeNarString}, {@link encodeNar}.
 * @module
 */

import { FormatError } from "../errors.ts";

/** The magic string every NAR starts with. */
export const NAR_MAGIC = "nix-archive-1";

/** Default limits {@link NarParser} enforces; each can be changed through its options. */
export const NAR_LIMITS: Readonly<{
  maxNameLength: number;
  maxTargetLength: number;
  maxDepth: number;
}> = Object.freeze({
  /** Longest file name, in bytes (NAME_MAX on Linux and macOS). */
  maxNameLength: 255,
  /** Longest symlink target, in bytes (PATH_MAX minus the terminating NUL). */
  maxTargetLength: 4095,
  /** Deepest nesting of directories below (and including) the root. */
  maxDepth: 256,
});

/** Longest token (a keyword such as `directory`); the longest real one is the magic. */
const MAX_TOKEN_LENGTH = 16;

/** One file-system object in a NAR, as {@link NarParser} reports it. */
export type NarEntry =
  | { type: "directory"; path: string }
  | {
    type: "regular";
    path: string;
    executable: boolean;
    /** Size of the contents in bytes. */
    size: number;
    /** Offset of the contents in the NAR (the `narOffset` of `.ls` listings). */
    offset: number;
  }
  | { type: "symlink"; path: string; target: string };

/** A node of a `.ls` listing (Nix's `listNar` JSON). */
export type NarListingNode =
  | { type: "directory"; entries: Record<string, NarListingNode> }
  | { type: "regular"; size: number; executable?: true; narOffset: number }
  | { type: "symlink"; target: string };

/** The `.ls` document Nix's binary caches serve next to a narinfo. */
export interface NarListing {
  /** Always 1. */
  version: 1;
  /** The NAR's root node. */
  root: NarListingNode;
}

/**
 * A {@link FormatError} for an invalid NAR, with where it failed: the byte offset in the
 * NAR and the path of the entry being read (`""` is the root).
 */
export class NarFormatError extends FormatError {
  /** Byte offset in the NAR where the problem is. */
  readonly offset: number;
  /** Path of the entry being read, `""` for the root, `/a/b` below it. */
  readonly path: string;

  /** Makes the message `Cannot parse NAR at byte <offset> in <path>: <detail>`. */
  constructor(offset: number, path: string, detail: string) {
    super(
      `Cannot parse NAR at byte ${offset} in ${
        path === "" ? "the root" : quotePath(path)
      }: ${detail}`,
    );
    this.offset = offset;
    this.path = path;
  }
}

/** Options of {@link NarParser}. */
export interface NarParserOptions {
  /** Called for every entry, in NAR order (a regular file before its contents). */
  onEntry?: (entry: NarEntry) => void;
  /**
   * Called with each piece of a regular file's contents, after its entry. The bytes are a
   * view of the pushed buffer, valid only during the call.
   */
  onContents?: (bytes: Uint8Array) => void;
  /** Longest file name in bytes; default {@link NAR_LIMITS}.maxNameLength. */
  maxNameLength?: number;
  /** Longest symlink target in bytes; default {@link NAR_LIMITS}.maxTargetLength. */
  maxTargetLength?: number;
  /** Deepest directory nesting; default {@link NAR_LIMITS}.maxDepth. */
  maxDepth?: number;
}

const encoder = new TextEncoder();
const lossyDecoder = new TextDecoder();

const T_MAGIC = encoder.encode(NAR_MAGIC);
const T_OPEN = encoder.encode("(");
const T_CLOSE = encoder.encode(")");
const T_TYPE = encoder.encode("type");
const T_REGULAR = encoder.encode("regular");
const T_SYMLINK = encoder.encode("symlink");
const T_DIRECTORY = encoder.encode("directory");
const T_EXECUTABLE = encoder.encode("executable");
const T_CONTENTS = encoder.encode("contents");
const T_TARGET = encoder.encode("target");
const T_ENTRY = encoder.encode("entry");
const T_NAME = encoder.encode("name");
const T_NODE = encoder.encode("node");
const T_EMPTY = new Uint8Array(0);

// What the next string in the NAR is (grammar states).
const S_MAGIC = 0;
const S_OPEN = 1; // "(" opening a node
const S_TYPE_KW = 2; // "type"
const S_TYPE = 3; // "regular" | "symlink" | "directory"
const S_REG_ATTR = 4; // "executable" | "contents"
const S_EXEC_VALUE = 5; // ""
const S_CONTENTS_KW = 6; // "contents" after the executable marker
const S_CONTENTS = 7; // file contents
const S_NODE_CLOSE = 8; // ")" closing a regular file or symlink
const S_TARGET_KW = 9; // "target"
const S_TARGET = 10; // symlink target
const S_DIR_ITEM = 11; // "entry" | ")"
const S_ENTRY_OPEN = 12; // "(" opening an entry
const S_NAME_KW = 13; // "name"
const S_NAME = 14; // entry name
const S_NODE_KW = 15; // "node"
const S_ENTRY_CLOSE = 16; // ")" closing an entry
const S_DONE = 17;
const S_FAILED = 18;

const EXPECTED: Record<number, string> = {
  [S_MAGIC]: `the magic ${quote(NAR_MAGIC)}`,
  [S_OPEN]: `"("`,
  [S_TYPE_KW]: `"type"`,
  [S_TYPE]: `"regular", "symlink" or "directory"`,
  [S_REG_ATTR]: `"executable" or "contents"`,
  [S_EXEC_VALUE]: `an empty executable marker value`,
  [S_CONTENTS_KW]: `"contents"`,
  [S_CONTENTS]: `file contents`,
  [S_NODE_CLOSE]: `")"`,
  [S_TARGET_KW]: `"target"`,
  [S_TARGET]: `a symlink target`,
  [S_DIR_ITEM]: `"entry" or ")"`,
  [S_ENTRY_OPEN]: `"("`,
  [S_NAME_KW]: `"name"`,
  [S_NAME]: `an entry name`,
  [S_NODE_KW]: `"node"`,
  [S_ENTRY_CLOSE]: `")"`,
};

// Where in a string the byte reader is.
const P_LENGTH = 0;
const P_DATA = 1;
const P_PADDING = 2;

/** 2^21: a high word at or above this makes a length of 2^53 or more. */
const HIGH_WORD_LIMIT = 0x200000;

interface DirectoryFrame {
  path: string;
  previousName: Uint8Array | null;
}

/**
 * A push parser and strict validator of NARs. Feed it bytes with {@link NarParser.push}
 * in pieces of any size and call {@link NarParser.end} at the end; entries are reported
 * through `onEntry`. It accepts exactly the canonical serialisation `nix-store --dump`
 * writes and throws a {@link NarFormatError} (a FormatError naming the byte offset and the
 * entry path) on anything else: bad magic, unknown tokens, unsorted or duplicate entries,
 * invalid names, non-zero padding, oversize fields, too deep nesting, truncation and data
 * after the root. After an error every call throws the same error.
 *
 * File contents are counted, never buffered: memory is O(depth).
 *
 * @example
 * ```ts
 * const parser = new NarParser({ onEntry: (e) => console.log(e.type, e.path) });
 * parser.push(encodeNar({ type: "regular", contents: new Uint8Array(3) }));
 * parser.end(); // prints "regular "
 * ```
 */
export class NarParser {
  #onEntry: ((entry: NarEntry) => void) | undefined;
  #onContents: ((bytes: Uint8Array) => void) | undefined;
  #maxName: number;
  #maxTarget: number;
  #maxDepth: number;

  #state = S_MAGIC;
  #phase = P_LENGTH;
  #offset = 0;
  #error: NarFormatError | null = null;

  // The string being read.
  #stringStart = 0;
  #lengthBytes = new Uint8Array(8);
  #lengthHave = 0;
  #length = 0;
  #have = 0;
  #padding = 0;
  #scratch = new Uint8Array(MAX_TOKEN_LENGTH);

  // Where in the tree.
  #stack: DirectoryFrame[] = [];
  #path = "";
  #childPath = "";
  #executable = false;

  /** Creates a parser; see {@link NarParserOptions}. */
  constructor(options: NarParserOptions = {}) {
    this.#onEntry = options.onEntry;
    this.#onContents = options.onContents;
    this.#maxName = options.maxNameLength ?? NAR_LIMITS.maxNameLength;
    this.#maxTarget = options.maxTargetLength ?? NAR_LIMITS.maxTargetLength;
    this.#maxDepth = options.maxDepth ?? NAR_LIMITS.maxDepth;
  }

  /** Number of bytes consumed so far (the NAR size once {@link NarParser.done}). */
  get offset(): number {
    return this.#offset;
  }

  /** True once the root node has been read completely. */
  get done(): boolean {
    return this.#state === S_DONE;
  }

  /** Parses the next piece of the NAR; throws a {@link NarFormatError} on invalid input. */
  push(bytes: Uint8Array): void {
    if (this.#error) throw this.#error;
    try {
      this.#push(bytes);
    } catch (error) {
      if (error instanceof NarFormatError) {
        this.#error = error;
        this.#state = S_FAILED;
      }
      throw error;
    }
  }

  /** Declares the end of input; throws a {@link NarFormatError} if the NAR is incomplete. */
  end(): void {
    if (this.#error) throw this.#error;
    if (this.#state === S_DONE) return;
    let detail: string;
    if (this.#phase === P_LENGTH && this.#lengthHave === 0) {
      detail = `expected ${EXPECTED[this.#state]}`;
    } else if (this.#phase === P_PADDING) {
      detail = "inside padding";
    } else {
      detail = `inside ${EXPECTED[this.#state]}`;
    }
    this.#error = new NarFormatError(this.#offset, this.#path, `truncated: ${detail}`);
    this.#state = S_FAILED;
    throw this.#error;
  }

  #fail(offset: number, detail: string): never {
    throw new NarFormatError(offset, this.#path, detail);
  }

  #push(bytes: Uint8Array): void {
    const n = bytes.length;
    let i = 0;
    while (i < n) {
      if (this.#state === S_DONE) {
        this.#fail(this.#offset, "trailing data after the root");
      }
      if (this.#phase === P_LENGTH) {
        let lo: number;
        let hi: number;
        if (this.#lengthHave === 0 && n - i >= 8) {
          this.#stringStart = this.#offset;
          lo = (bytes[i] | (bytes[i + 1] << 8) | (bytes[i + 2] << 16) | (bytes[i + 3] << 24)) >>>
            0;
          hi = (bytes[i + 4] | (bytes[i + 5] << 8) | (bytes[i + 6] << 16) |
            (bytes[i + 7] << 24)) >>> 0;
          i += 8;
          this.#offset += 8;
        } else {
          if (this.#lengthHave === 0) this.#stringStart = this.#offset;
          const take = Math.min(8 - this.#lengthHave, n - i);
          this.#lengthBytes.set(bytes.subarray(i, i + take), this.#lengthHave);
          this.#lengthHave += take;
          i += take;
          this.#offset += take;
          if (this.#lengthHave < 8) return;
          this.#lengthHave = 0;
          const b = this.#lengthBytes;
          lo = (b[0] | (b[1] << 8) | (b[2] << 16) | (b[3] << 24)) >>> 0;
          hi = (b[4] | (b[5] << 8) | (b[6] << 16) | (b[7] << 24)) >>> 0;
        }
        if (hi >= HIGH_WORD_LIMIT) {
          this.#fail(this.#stringStart, `length field ${lengthText(hi, lo)} is absurd (≥ 2^53)`);
        }
        this.#startString(hi * 0x100000000 + lo);
        continue;
      }
      if (this.#phase === P_DATA) {
        const take = Math.min(this.#length - this.#have, n - i);
        if (this.#state === S_CONTENTS) {
          if (this.#onContents && take > 0) this.#onContents(bytes.subarray(i, i + take));
        } else {
          this.#scratch.set(bytes.subarray(i, i + take), this.#have);
        }
        this.#have += take;
        i += take;
        this.#offset += take;
        if (this.#have < this.#length) return;
        this.#endData();
        continue;
      }
      // P_PADDING
      while (this.#padding > 0 && i < n) {
        if (bytes[i] !== 0) this.#fail(this.#offset, `non-zero padding byte ${bytes[i]}`);
        i++;
        this.#offset++;
        this.#padding--;
      }
      if (this.#padding === 0) {
        this.#phase = P_LENGTH;
        this.#complete();
      }
    }
  }

  /** A length field has been read: check it against the state's limit. */
  #startString(length: number): void {
    const state = this.#state;
    let limit: number;
    if (state === S_CONTENTS) {
      const end = this.#offset + length + 8;
      if (end > Number.MAX_SAFE_INTEGER) {
        this.#fail(this.#stringStart, `file contents of ${length} bytes are too large`);
      }
      this.#onEntry?.({
        type: "regular",
        path: this.#path,
        executable: this.#executable,
        size: length,
        offset: this.#offset,
      });
      limit = length;
    } else if (state === S_NAME) {
      limit = this.#maxName;
      if (length > limit) {
        this.#fail(
          this.#stringStart,
          `entry name of ${length} bytes exceeds the limit of ${limit} bytes`,
        );
      }
    } else if (state === S_TARGET) {
      limit = this.#maxTarget;
      if (length > limit) {
        this.#fail(
          this.#stringStart,
          `symlink target of ${length} bytes exceeds the limit of ${limit} bytes`,
        );
      }
    } else {
      if (length > MAX_TOKEN_LENGTH) {
        this.#fail(
          this.#stringStart,
          `expected ${EXPECTED[state]}, got a string of ${length} bytes`,
        );
      }
      limit = MAX_TOKEN_LENGTH;
    }
    if (state !== S_CONTENTS && this.#scratch.length < length) {
      this.#scratch = new Uint8Array(Math.max(length, this.#scratch.length * 2));
    }
    this.#length = length;
    this.#have = 0;
    if (length === 0) {
      this.#phase = P_LENGTH;
      this.#complete();
    } else {
      this.#phase = P_DATA;
    }
  }

  /** The data of a string is in: padding next, or the string is complete. */
  #endData(): void {
    const rest = this.#length % 8;
    if (rest === 0) {
      this.#phase = P_LENGTH;
      this.#complete();
    } else {
      this.#padding = 8 - rest;
      this.#phase = P_PADDING;
    }
  }

  #unexpected(value: Uint8Array): never {
    this.#fail(this.#stringStart, `expected ${EXPECTED[this.#state]}, got ${quoteBytes(value)}`);
  }

  /** A whole string (with its padding) has been read: advance the grammar. */
  #complete(): void {
    const s = this.#scratch.subarray(0, this.#state === S_CONTENTS ? 0 : this.#length);
    switch (this.#state) {
      case S_MAGIC:
        if (!equalBytes(s, T_MAGIC)) {
          this.#fail(
            this.#stringStart,
            `bad magic: expected ${quote(NAR_MAGIC)}, got ${quoteBytes(s)}`,
          );
        }
        this.#state = S_OPEN;
        return;
      case S_OPEN:
        if (!equalBytes(s, T_OPEN)) this.#unexpected(s);
        this.#state = S_TYPE_KW;
        return;
      case S_TYPE_KW:
        if (!equalBytes(s, T_TYPE)) this.#unexpected(s);
        this.#state = S_TYPE;
        return;
      case S_TYPE:
        if (equalBytes(s, T_REGULAR)) {
          this.#executable = false;
          this.#state = S_REG_ATTR;
        } else if (equalBytes(s, T_SYMLINK)) {
          this.#state = S_TARGET_KW;
        } else if (equalBytes(s, T_DIRECTORY)) {
          if (this.#stack.length >= this.#maxDepth) {
            this.#fail(
              this.#stringStart,
              `directories nested deeper than the limit of ${this.#maxDepth}`,
            );
          }
          this.#onEntry?.({ type: "directory", path: this.#path });
          this.#stack.push({ path: this.#path, previousName: null });
          this.#state = S_DIR_ITEM;
        } else {
          this.#fail(this.#stringStart, `unknown file type ${quoteBytes(s)}`);
        }
        return;
      case S_REG_ATTR:
        if (equalBytes(s, T_EXECUTABLE)) {
          this.#executable = true;
          this.#state = S_EXEC_VALUE;
        } else if (equalBytes(s, T_CONTENTS)) {
          this.#state = S_CONTENTS;
        } else {
          this.#unexpected(s);
        }
        return;
      case S_EXEC_VALUE:
        if (!equalBytes(s, T_EMPTY)) {
          this.#fail(this.#stringStart, `executable marker has a non-empty value ${quoteBytes(s)}`);
        }
        this.#state = S_CONTENTS_KW;
        return;
      case S_CONTENTS_KW:
        if (!equalBytes(s, T_CONTENTS)) this.#unexpected(s);
        this.#state = S_CONTENTS;
        return;
      case S_CONTENTS:
        this.#state = S_NODE_CLOSE;
        return;
      case S_NODE_CLOSE:
        if (!equalBytes(s, T_CLOSE)) this.#unexpected(s);
        this.#nodeDone();
        return;
      case S_TARGET_KW:
        if (!equalBytes(s, T_TARGET)) this.#unexpected(s);
        this.#state = S_TARGET;
        return;
      case S_TARGET:
        if (s.includes(0)) this.#fail(this.#stringStart, "symlink target contains a NUL byte");
        this.#onEntry?.({ type: "symlink", path: this.#path, target: lossyDecoder.decode(s) });
        this.#state = S_NODE_CLOSE;
        return;
      case S_DIR_ITEM:
        if (equalBytes(s, T_ENTRY)) {
          this.#state = S_ENTRY_OPEN;
        } else if (equalBytes(s, T_CLOSE)) {
          this.#stack.pop();
          this.#nodeDone();
        } else {
          this.#unexpected(s);
        }
        return;
      case S_ENTRY_OPEN:
        if (!equalBytes(s, T_OPEN)) this.#unexpected(s);
        this.#state = S_NAME_KW;
        return;
      case S_NAME_KW:
        if (!equalBytes(s, T_NAME)) this.#unexpected(s);
        this.#state = S_NAME;
        return;
      case S_NAME:
        this.#name(s);
        this.#state = S_NODE_KW;
        return;
      case S_NODE_KW:
        if (!equalBytes(s, T_NODE)) this.#unexpected(s);
        this.#path = this.#childPath;
        this.#state = S_OPEN;
        return;
      case S_ENTRY_CLOSE:
        if (!equalBytes(s, T_CLOSE)) this.#unexpected(s);
        this.#state = S_DIR_ITEM;
        return;
    }
  }

  #name(name: Uint8Array): void {
    const at = this.#stringStart;
    if (name.length === 0) this.#fail(at, "empty entry name");
    if (name.length === 1 && name[0] === 0x2e) this.#fail(at, `invalid entry name "."`);
    if (name.length === 2 && name[0] === 0x2e && name[1] === 0x2e) {
      this.#fail(at, `invalid entry name ".."`);
    }
    if (name.includes(0x2f)) this.#fail(at, `entry name ${quoteBytes(name)} contains '/'`);
    if (name.includes(0)) this.#fail(at, `entry name ${quoteBytes(name)} contains a NUL byte`);
    const frame = this.#stack[this.#stack.length - 1];
    if (frame.previousName !== null) {
      const order = compareNarNames(frame.previousName, name);
      if (order === 0) this.#fail(at, `duplicate entry name ${quoteBytes(name)}`);
      if (order > 0) {
        this.#fail(
          at,
          `entries not sorted: ${quoteBytes(name)} after ${quoteBytes(frame.previousName)}`,
        );
      }
    }
    frame.previousName = name.slice();
    this.#childPath = frame.path + "/" + lossyDecoder.decode(name);
  }

  /** A node's closing ")" has been read. */
  #nodeDone(): void {
    const stack = this.#stack;
    if (stack.length === 0) {
      this.#state = S_DONE;
    } else {
      this.#path = stack[stack.length - 1].path;
      this.#state = S_ENTRY_CLOSE;
    }
  }
}

/**
 * Validates a NAR as it streams through: bytes pass unchanged (a chunk is passed on
 * only after it has been validated); the stream errors with the {@link NarFormatError}
 * on invalid input, or on truncation when the input ends.
 *
 * @example
 * ```ts
 * const checked = narStream.pipeThrough(narValidator());
 * ```
 */
export function narValidator(
  options: NarParserOptions = {},
): TransformStream<Uint8Array, Uint8Array> {
  const parser = new NarParser(options);
  return new TransformStream<Uint8Array, Uint8Array>({
    transform(chunk, controller) {
      parser.push(chunk);
      controller.enqueue(chunk);
    },
    flush() {
      parser.end();
    },
  });
}

/**
 * Builds a `.ls` listing from the entries of a {@link NarParser}, in NAR order. Use it
 * to list a NAR while it streams elsewhere:
 * `narValidator({ onEntry: (e) => builder.add(e) })`.
 */
export class NarListingBuilder {
  #root: NarListingNode | null = null;
  #stack: { path: string; entries: Record<string, NarListingNode> }[] = [];

  /** Adds the next entry (they must come in NAR order, as NarParser reports them). */
  add(entry: NarEntry): void {
    let node: NarListingNode;
    if (entry.type === "directory") {
      node = { type: "directory", entries: Object.create(null) };
    } else if (entry.type === "regular") {
      node = entry.executable
        ? { type: "regular", size: entry.size, executable: true, narOffset: entry.offset }
        : { type: "regular", size: entry.size, narOffset: entry.offset };
    } else {
      node = { type: "symlink", target: entry.target };
    }
    if (entry.path === "") {
      if (this.#root !== null) throw new Error("NarListingBuilder: a second root entry");
      this.#root = node;
    } else {
      const slash = entry.path.lastIndexOf("/");
      const parentPath = entry.path.slice(0, slash);
      const stack = this.#stack;
      while (stack.length > 0 && stack[stack.length - 1].path !== parentPath) stack.pop();
      if (stack.length === 0) {
        throw new Error(`NarListingBuilder: entry ${entry.path} out of order`);
      }
      stack[stack.length - 1].entries[entry.path.slice(slash + 1)] = node;
    }
    if (node.type === "directory") this.#stack.push({ path: entry.path, entries: node.entries });
  }

  /** The listing so far (complete once the parser has ended without error). */
  get listing(): NarListing {
    if (this.#root === null) throw new Error("NarListingBuilder: no entries");
    return { version: 1, root: this.#root };
  }
}

/**
 * Reads and validates a whole NAR and returns its `.ls` listing, the shape Nix 2.8's
 * binary caches write (`regular` nodes carry `size`, `executable: true` when set, and
 * `narOffset`). Entry objects have no prototype, so any file name is a safe key.
 * File names that are not valid UTF-8 are decoded with U+FFFD replacements.
 * Throws a {@link NarFormatError} on invalid input.
 */
export async function listNar(
  source: AsyncIterable<Uint8Array> | Iterable<Uint8Array> | ReadableStream<Uint8Array>,
  options: Omit<NarParserOptions, "onEntry"> = {},
): Promise<NarListing> {
  const builder = new NarListingBuilder();
  const parser = new NarParser({ ...options, onEntry: (entry) => builder.add(entry) });
  for await (const chunk of source as AsyncIterable<Uint8Array>) parser.push(chunk);
  parser.end();
  return builder.listing;
}

/**
 * Serialises a listing exactly as Nix 2.8 writes `.ls` files: no whitespace, keys in
 * Nix's order, directory entries in NAR (byte-wise) order, and Nix's string escaping
 * (`\"`, `\\`, `\n`, `\r`, `\t`, other control characters as `\u00XX`, the rest raw).
 */
export function formatNarListing(listing: NarListing): string {
  const parts: string[] = [`{"version":${listing.version},"root":`];
  formatNode(listing.root, parts);
  parts.push("}");
  return parts.join("");
}

function formatNode(node: NarListingNode, parts: string[]): void {
  if (node.type === "regular") {
    parts.push(`{"type":"regular","size":${node.size}`);
    if (node.executable) parts.push(`,"executable":true`);
    if (node.narOffset) parts.push(`,"narOffset":${node.narOffset}`);
    parts.push("}");
  } else if (node.type === "symlink") {
    parts.push(`{"type":"symlink","target":${jsonString(node.target)}}`);
  } else {
    parts.push(`{"type":"directory","entries":{`);
    const names = Object.keys(node.entries).map((name) => ({ name, bytes: encoder.encode(name) }));
    names.sort((a, b) => compareNarNames(a.bytes, b.bytes));
    names.forEach(({ name }, index) => {
      if (index > 0) parts.push(",");
      parts.push(jsonString(name), ":");
      formatNode(node.entries[name], parts);
    });
    parts.push("}}");
  }
}

function jsonString(value: string): string {
  let out = '"';
  for (let i = 0; i < value.length; i++) {
    const c = value.charCodeAt(i);
    if (c === 0x22) out += '\\"';
    else if (c === 0x5c) out += "\\\\";
    else if (c === 0x0a) out += "\\n";
    else if (c === 0x0d) out += "\\r";
    else if (c === 0x09) out += "\\t";
    else if (c < 0x20) out += "\\u00" + c.toString(16).padStart(2, "0");
    else out += value[i];
  }
  return out + '"';
}

/** Number of zero bytes that pad a string of `length` bytes to a multiple of 8. */
export function narPadding(length: number): number {
  const rest = length % 8;
  return rest === 0 ? 0 : 8 - rest;
}

/** Size of a NAR string of `length` bytes: length field, bytes and padding. */
export function narStringSize(length: number): number {
  return 8 + length + narPadding(length);
}

/** Writes `length` as an 8-byte little-endian integer at `offset` of `target`. */
export function writeNarLength(target: Uint8Array, offset: number, length: number): void {
  const lo = length % 0x100000000;
  const hi = Math.floor(length / 0x100000000);
  target[offset] = lo & 0xff;
  target[offset + 1] = (lo >>> 8) & 0xff;
  target[offset + 2] = (lo >>> 16) & 0xff;
  target[offset + 3] = (lo >>> 24) & 0xff;
  target[offset + 4] = hi & 0xff;
  target[offset + 5] = (hi >>> 8) & 0xff;
  target[offset + 6] = (hi >>> 16) & 0xff;
  target[offset + 7] = (hi >>> 24) & 0xff;
}

/** Encodes one NAR string: length field, bytes (UTF-8 for a string) and zero padding. */
export function encodeNarString(value: string | Uint8Array): Uint8Array {
  const bytes = typeof value === "string" ? encoder.encode(value) : value;
  const out = new Uint8Array(narStringSize(bytes.length));
  writeNarLength(out, 0, bytes.length);
  out.set(bytes, 8);
  return out;
}

/**
 * Byte-wise comparison of two entry names, the order of directory entries in a NAR
 * (Nix sorts names as `std::string`s, i.e. by unsigned bytes).
 */
export function compareNarNames(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    if (a[i] !== b[i]) return a[i] - b[i];
  }
  return a.length - b.length;
}

/** Options of {@link NarWriter}. */
export interface NarWriterOptions {
  /** Size of the output chunks in bytes (the last one may be shorter); default 1 MiB. */
  chunkSize?: number;
}

/**
 * The NAR encoder's framing, pure: callers describe the tree in NAR order and take the
 * output as large coalesced chunks. Regular-file contents can be written straight into
 * the output buffer ({@link NarWriter.contentsBuffer} + {@link NarWriter.commitContents})
 * so a file reader copies nothing. Chunks handed out are never written again, unless the
 * caller gives one back with {@link NarWriter.recycle} (then later chunks reuse its memory).
 *
 * Order of calls: `regular(...)` then exactly `size` bytes of contents (the node is closed
 * automatically when they are complete); `symlink(target)`; `directory()`, then for each
 * entry in sorted order `entry(name)`, the child node, `endEntry()`; then `endDirectory()`.
 * The magic is written by the constructor.
 */
export class NarWriter {
  #chunkSize: number;
  #buffer: Uint8Array;
  #position = 0;
  #ready: Uint8Array[] = [];
  /** Chunks given back, for #rotate to reuse. */
  #spare: Uint8Array[] = [];
  /** The current buffer is someone else's ({@link NarWriter.redirect}). */
  #redirected = false;
  #contentsLeft = 0;
  #contentsSize = 0;
  #written = 0;

  /** Starts a NAR (writes the magic). */
  constructor(options: NarWriterOptions = {}) {
    const size = options.chunkSize ?? 1 << 20;
    if (!Number.isSafeInteger(size) || size < 1) {
      throw new RangeError(`Invalid NAR chunk size: ${size}`);
    }
    this.#chunkSize = size;
    this.#buffer = new Uint8Array(size);
    this.#string(T_MAGIC);
  }

  /** Bytes written so far (the NAR size once complete). */
  get size(): number {
    return this.#written;
  }

  /** Bytes of regular-file contents still expected. */
  get contentsLeft(): number {
    return this.#contentsLeft;
  }

  /** Starts a regular file of `size` bytes; its contents must follow. */
  regular(size: number, options: { executable?: boolean } = {}): void {
    this.#token(T_OPEN, T_TYPE, T_REGULAR);
    if (options.executable) this.#token(T_EXECUTABLE, T_EMPTY);
    this.#token(T_CONTENTS);
    this.#lengthField(size);
    this.#contentsSize = size;
    this.#contentsLeft = size;
    if (size === 0) this.#endContents();
  }

  /** Writes a symlink node. */
  symlink(target: string | Uint8Array): void {
    this.#token(T_OPEN, T_TYPE, T_SYMLINK, T_TARGET);
    this.#string(typeof target === "string" ? encoder.encode(target) : target);
    this.#token(T_CLOSE);
  }

  /** Opens a directory node. */
  directory(): void {
    this.#token(T_OPEN, T_TYPE, T_DIRECTORY);
  }

  /** Opens a directory entry; the child node comes next. */
  entry(name: string | Uint8Array): void {
    this.#token(T_ENTRY, T_OPEN, T_NAME);
    this.#string(typeof name === "string" ? encoder.encode(name) : name);
    this.#token(T_NODE);
  }

  /** Closes a directory entry. */
  endEntry(): void {
    this.#token(T_CLOSE);
  }

  /** Closes a directory node. */
  endDirectory(): void {
    this.#token(T_CLOSE);
  }

  /** Writes (part of) the current regular file's contents. */
  contents(bytes: Uint8Array): void {
    if (bytes.length > this.#contentsLeft) {
      throw new RangeError(
        `NarWriter: ${bytes.length} bytes of contents, ${this.#contentsLeft} left`,
      );
    }
    let done = 0;
    while (done < bytes.length) {
      const target = this.contentsBuffer();
      const take = Math.min(target.length, bytes.length - done);
      target.set(bytes.subarray(done, done + take));
      this.commitContents(take);
      done += take;
    }
  }

  /**
   * A writable view of the output buffer for the current file's contents (never empty
   * while contents are expected, never longer than what is left). Fill a prefix of it,
   * then call {@link NarWriter.commitContents}.
   */
  contentsBuffer(): Uint8Array {
    if (this.#position === this.#buffer.length) this.#rotate();
    const end = Math.min(this.#buffer.length, this.#position + this.#contentsLeft);
    return this.#buffer.subarray(this.#position, end);
  }

  /** Declares that `count` bytes were written at the start of {@link NarWriter.contentsBuffer}. */
  commitContents(count: number): void {
    if (count > this.#contentsLeft || this.#position + count > this.#buffer.length) {
      throw new RangeError(`NarWriter: commit of ${count} bytes is out of range`);
    }
    this.#position += count;
    this.#written += count;
    this.#contentsLeft -= count;
    if (this.#position === this.#buffer.length) this.#rotate();
    if (this.#contentsLeft === 0) this.#endContents();
  }

  /** Takes the completed chunks (each a full `chunkSize`), leaving the current one. */
  takeChunks(): Uint8Array[] {
    const ready = this.#ready;
    this.#ready = [];
    return ready;
  }

  /**
   * Makes `target` (someone else's buffer) the current output buffer, so that what comes
   * next is written straight into it: the bytes already written to the current, not yet
   * complete chunk are copied to its start. It is handed out, like any chunk, by
   * {@link NarWriter.takeChunks} once full (or by {@link NarWriter.finish}, as a prefix
   * view), and never touched after that. Returns false, changing nothing, unless chunks
   * are all taken and `target` has room beyond those bytes.
   */
  redirect(target: Uint8Array): boolean {
    if (this.#ready.length > 0 || target.length <= this.#position || this.#buffer.length === 0) {
      return false;
    }
    target.set(this.#buffer.subarray(0, this.#position));
    const previous = this.#buffer;
    if (!this.#redirected && previous.length === this.#chunkSize) this.#spare.push(previous);
    this.#buffer = target;
    this.#redirected = true;
    return true;
  }

  /**
   * Gives back a full chunk taken from this writer once its bytes are no longer needed;
   * later chunks reuse its memory instead of allocating (a few are kept). Anything that
   * is not a whole chunk of this writer is ignored.
   */
  recycle(chunk: Uint8Array): void {
    if (
      chunk.byteOffset === 0 && chunk.byteLength === this.#chunkSize &&
      chunk.buffer.byteLength === this.#chunkSize && this.#spare.length < 4 &&
      chunk.buffer !== this.#buffer.buffer &&
      !this.#spare.some((spare) => spare.buffer === chunk.buffer) &&
      !this.#ready.some((ready) => ready.buffer === chunk.buffer)
    ) {
      this.#spare.push(chunk);
    }
  }

  /** Takes all remaining output, including the partial last chunk. */
  finish(): Uint8Array[] {
    if (this.#contentsLeft > 0) {
      throw new Error(`NarWriter: ${this.#contentsLeft} bytes of contents missing`);
    }
    const ready = this.takeChunks();
    if (this.#position > 0) {
      const used = this.#position;
      // A mostly empty buffer of ours is copied so its unused memory can be freed.
      ready.push(
        used * 2 < this.#buffer.length && !this.#redirected
          ? this.#buffer.slice(0, used)
          : this.#buffer.subarray(0, used),
      );
    }
    this.#buffer = new Uint8Array(0);
    this.#spare = [];
    this.#position = 0;
    this.#redirected = false;
    return ready;
  }

  #rotate(): void {
    if (this.#buffer.length > 0) this.#ready.push(this.#buffer);
    this.#redirected = false;
    this.#buffer = this.#spare.pop() ?? new Uint8Array(this.#chunkSize);
    this.#position = 0;
  }

  #endContents(): void {
    this.#zeros(narPadding(this.#contentsSize));
    this.#token(T_CLOSE);
  }

  #token(...tokens: Uint8Array[]): void {
    if (this.#contentsLeft > 0) throw new Error("NarWriter: file contents are incomplete");
    for (const token of tokens) this.#string(token);
  }

  #string(bytes: Uint8Array): void {
    this.#lengthField(bytes.length);
    this.#raw(bytes);
    this.#zeros(narPadding(bytes.length));
  }

  #lengthField(length: number): void {
    if (this.#buffer.length - this.#position >= 8) {
      writeNarLength(this.#buffer, this.#position, length);
      this.#position += 8;
      this.#written += 8;
    } else {
      const field = new Uint8Array(8);
      writeNarLength(field, 0, length);
      this.#raw(field);
    }
  }

  #raw(bytes: Uint8Array): void {
    let done = 0;
    while (done < bytes.length) {
      if (this.#position === this.#buffer.length) this.#rotate();
      const take = Math.min(this.#buffer.length - this.#position, bytes.length - done);
      this.#buffer.set(bytes.subarray(done, done + take), this.#position);
      this.#position += take;
      this.#written += take;
      done += take;
    }
    if (this.#position === this.#buffer.length) this.#rotate();
  }

  #zeros(count: number): void {
    let left = count;
    while (left > 0) {
      if (this.#position === this.#buffer.length) this.#rotate();
      const take = Math.min(this.#buffer.length - this.#position, left);
      // Explicit: a caller may have scribbled past its commit in contentsBuffer().
      this.#buffer.fill(0, this.#position, this.#position + take);
      this.#position += take;
      this.#written += take;
      left -= take;
    }
    if (this.#position === this.#buffer.length) this.#rotate();
  }
}

/** An in-memory file-system tree, for {@link encodeNar}. */
export type NarTree =
  | { type: "regular"; contents: Uint8Array; executable?: boolean }
  | { type: "symlink"; target: string }
  | { type: "directory"; entries: Record<string, NarTree> };

/**
 * Encodes an in-memory tree as one NAR (entries are sorted the NAR way). For tests and
 * small NARs; stream large ones with nar_dump.ts's `dumpNar`.
 */
export function encodeNar(tree: NarTree): Uint8Array {
  const writer = new NarWriter({ chunkSize: 64 * 1024 });
  encodeTree(writer, tree);
  const chunks = writer.finish();
  const out = new Uint8Array(writer.size);
  let at = 0;
  for (const chunk of chunks) {
    out.set(chunk, at);
    at += chunk.length;
  }
  return out;
}

function encodeTree(writer: NarWriter, tree: NarTree): void {
  if (tree.type === "regular") {
    writer.regular(tree.contents.length, { executable: tree.executable });
    writer.contents(tree.contents);
  } else if (tree.type === "symlink") {
    writer.symlink(tree.target);
  } else {
    writer.directory();
    const names = Object.keys(tree.entries).map((name) => ({ name, bytes: encoder.encode(name) }));
    names.sort((a, b) => compareNarNames(a.bytes, b.bytes));
    for (const { name, bytes } of names) {
      writer.entry(bytes);
      encodeTree(writer, tree.entries[name]);
      writer.endEntry();
    }
    writer.endDirectory();
  }
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function quote(text: string): string {
  return JSON.stringify(text.length > 80 ? text.slice(0, 80) + "…" : text);
}

/** A path for a message: long ones keep their last 200 characters. */
function quotePath(path: string): string {
  return JSON.stringify(path.length > 200 ? "…" + path.slice(-200) : path);
}

function quoteBytes(bytes: Uint8Array): string {
  return quote(lossyDecoder.decode(bytes.subarray(0, 120)));
}

function lengthText(hi: number, lo: number): string {
  return (BigInt(hi) * 0x100000000n + BigInt(lo)).toString();
}
