/**
 * The few libc calls the cache makes through FFI (Linux, with `--allow-ffi`), where Deno's
 * own API has no equivalent (`syncfs`, `ioctl`) or costs more per call than the system
 * call itself (reading a small file whole: `open`, `read`, `close` without a resource
 * object per file). Everything here is optional: {@link loadLibc} returns null where FFI
 * is unavailable, and callers fall back to Deno's API.
 * @module
 */

/** The libc symbols in use. */
export interface Libc {
  symbols: {
    open(path: Uint8Array, flags: number): number;
    close(fd: number): number;
    read(fd: number, buffer: Uint8Array, count: bigint): number | bigint;
    syncfs(fd: number): Promise<number>;
    ioctl(fd: number, request: bigint, argument: Uint8Array): number;
  };
}

/** O_RDONLY | O_CLOEXEC (the same value on every Linux architecture Deno runs on). */
export const O_RDONLY_CLOEXEC = 0o2000000;

/** libc through FFI (null when it cannot be loaded: no --allow-ffi, not Linux, …). */
let libc: Libc | null | undefined;

/** True when `descriptor` is granted already (never prompts). */
export function granted(descriptor: Deno.PermissionDescriptor): boolean {
  try {
    return Deno.permissions.querySync(descriptor).state === "granted";
  } catch {
    return false;
  }
}

/** libc, loaded once; null where it cannot be. */
export function loadLibc(): Libc | null {
  if (libc !== undefined) return libc;
  libc = null;
  if (Deno.build.os === "linux" && granted({ name: "ffi" })) {
    try {
      libc = Deno.dlopen("libc.so.6", {
        open: { parameters: ["buffer", "i32"], result: "i32" },
        close: { parameters: ["i32"], result: "i32" },
        read: { parameters: ["i32", "buffer", "usize"], result: "isize" },
        syncfs: { parameters: ["i32"], result: "i32", nonblocking: true },
        ioctl: { parameters: ["i32", "u64", "buffer"], result: "i32" },
      }) as unknown as Libc;
    } catch {
      libc = null;
    }
  }
  return libc;
}

/** Scratch space of {@link readWholeFileSync}'s end-of-file check. */
const ONE_BYTE = new Uint8Array(1);

/**
 * Reads the file at `path` (a NUL-terminated byte string) into `target`, which must be
 * exactly its size: true when the file was opened, filled `target` and ended right there;
 * false for anything else (absent, shorter, longer, unreadable), when the caller should
 * look again with Deno's API to say what is wrong. Requires {@link loadLibc}.
 */
export function readWholeFileSync(lib: Libc, path: Uint8Array, target: Uint8Array): boolean {
  const fd = lib.symbols.open(path, O_RDONLY_CLOEXEC);
  if (fd < 0) return false;
  try {
    let filled = 0;
    while (filled < target.length) {
      const n = Number(
        lib.symbols.read(fd, target.subarray(filled), BigInt(target.length - filled)),
      );
      if (n <= 0) return false;
      filled += n;
    }
    return Number(lib.symbols.read(fd, ONE_BYTE, 1n)) === 0;
  } finally {
    lib.symbols.close(fd);
  }
}
