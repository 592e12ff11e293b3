/**
 * The FFI binding to the system's MPI library (`libmpi`), loaded only when a
 * run is launched by `mpirun`/`srun` (see `detectLaunch` in `dist/comm.ts`).
 *
 * Two binary interfaces exist and are bound here:
 *
 * - Open MPI (`libmpi.so.40`): handles are pointers, and the predefined ones
 *   (`MPI_COMM_WORLD`, `MPI_FLOAT`, `MPI_SUM`, ...) are the ADDRESSES of global
 *   objects (`ompi_mpi_comm_world`, `ompi_mpi_float`, `ompi_mpi_op_sum`, ...).
 *   The addresses come from `dlsym`, called through libc. (Deno 2.9.6 also
 *   returns a symbol's address for a static declared `type: "pointer"`, while
 *   numeric statics read the value, as denoland/deno#28111 describes; `dlsym`
 *   is the documented C semantics, so we use that.) Tested here with Open MPI
 *   4.1.4 (Debian 12).
 * - MPICH and its derivatives (Intel MPI, MVAPICH; `libmpi.so.12`, Debian's
 *   `libmpich.so.12`): handles are C `int`s with fixed values from MPICH's
 *   `mpi.h` (`MPI_COMM_WORLD = 0x44000000`, ...). Tested here by hand with
 *   MPICH 4.0.2 (Debian 12 packages unpacked into a private directory), not in
 *   CI.
 *
 * The library is opened twice: once through libc's `dlopen` with
 * `RTLD_NOW | RTLD_GLOBAL`, which makes its symbols visible to the plugins MPI
 * itself loads later (Open MPI's components and mpi4py rely on this; Deno's
 * own `dlopen` uses `RTLD_LOCAL` and takes no flags, denoland/deno#13508) and
 * gives the handle for `dlsym`; then through `Deno.dlopen` for the typed calls.
 *
 * Deno 2.9.6 needs only `--allow-ffi` for this (no `--unstable-ffi`). Calls
 * that wait on other ranks are declared `nonblocking: true`: Deno runs them on
 * a thread of its blocking pool and returns a promise, so the event loop keeps
 * running (signal listeners, WebGPU readbacks) while a collective waits. That
 * needs MPI's `MPI_THREAD_SERIALIZED` level (calls from several threads, never
 * two at once); the communicator serializes every call. Where the library
 * gives less, the same calls run synchronously on the main thread.
 *
 * @module
 */
import { UserError } from "../util/errors.ts";

/** The two binary interfaces we can bind. */
export type MpiAbi = "openmpi" | "mpich";

/** Reads an environment variable; `Deno.env` and a `Map` both fit. */
export interface EnvReader {
  /** The variable's value, or undefined when it is not set. */
  get(name: string): string | undefined;
}

/** The environment variable that names the MPI library to load, overriding the search. */
export const LIBMPI_ENV = "TRAINER_LIBMPI";

/** MPI's thread-support levels (the same numbers in Open MPI and MPICH). */
const MPI_THREAD_SERIALIZED = 2;

/** Errors MPI returns (with `MPI_ERRORS_RETURN` set) become this, with MPI's own text. */
export class MpiError extends Error {
  /** MPI's error code. */
  readonly code: number;
  /** `call` names the MPI function, `text` is `MPI_Error_string`'s description. */
  constructor(call: string, code: number, text: string) {
    super(`${call} failed with MPI error ${code}: ${text}`);
    this.name = "MpiError";
    this.code = code;
  }
}

/**
 * The file names to try, in order: `TRAINER_LIBMPI` alone when it is set;
 * otherwise the versioned sonames of the platform, the one that matches the
 * launcher first (a process started by MPICH's `mpiexec` cannot join through
 * Open MPI's library, and the reverse), then the unversioned development link.
 */
export function libmpiCandidates(
  env: EnvReader,
  os: typeof Deno.build.os = Deno.build.os,
  prefer?: MpiAbi,
): string[] {
  const override = env.get(LIBMPI_ENV);
  if (override) return [override];
  let openmpi: string[];
  let mpich: string[];
  let generic: string[];
  if (os === "darwin") {
    // dyld's default fallback path is ~/lib:/usr/local/lib:/usr/lib; Homebrew
    // on Apple silicon installs to /opt/homebrew/lib, which is not on it.
    openmpi = ["libmpi.40.dylib", "/opt/homebrew/lib/libmpi.40.dylib"];
    mpich = ["libmpi.12.dylib", "/opt/homebrew/lib/libmpi.12.dylib"];
    generic = ["libmpi.dylib", "/opt/homebrew/lib/libmpi.dylib"];
  } else {
    openmpi = ["libmpi.so.40"];
    mpich = ["libmpi.so.12", "libmpich.so.12"];
    generic = ["libmpi.so"];
  }
  return prefer === "mpich"
    ? [...mpich, ...openmpi, ...generic]
    : [...openmpi, ...mpich, ...generic];
}

/** How to get an MPI library, for error messages. */
export const INSTALL_HINT =
  "install Open MPI (Debian/Ubuntu: sudo apt-get install openmpi-bin; Fedora: sudo dnf install " +
  "openmpi, then module load mpi/openmpi-x86_64; macOS: brew install open-mpi), or set " +
  `${LIBMPI_ENV}=/path/to/libmpi.so to the library your mpirun belongs to`;

// ---------------------------------------------------------------------------
// libc's dlopen/dlsym: RTLD_GLOBAL and symbol addresses.

interface Dl {
  dlopen(path: string): Deno.PointerValue;
  dlsym(handle: Deno.PointerObject, name: string): Deno.PointerValue;
  dlerror(): string;
}

const DL_SYMBOLS = {
  dlopen: { parameters: ["buffer", "i32"], result: "pointer" },
  dlsym: { parameters: ["pointer", "buffer"], result: "pointer" },
  dlerror: { parameters: [], result: "pointer" },
} as const;

function cString(s: string): Uint8Array<ArrayBuffer> {
  return new TextEncoder().encode(s + "\0");
}

/** libc's dynamic loader, or a UserError where it cannot be reached. */
function openDl(os: typeof Deno.build.os): Dl {
  // RTLD_NOW | RTLD_GLOBAL: 0x2 | 0x100 on Linux (glibc, musl), 0x2 | 0x8 on macOS.
  const [libs, flags] = os === "darwin"
    ? [["/usr/lib/libSystem.B.dylib"], 0x2 | 0x8]
    : [["libc.so.6", "libdl.so.2", "libc.so"], 0x2 | 0x100];
  const errors: string[] = [];
  for (const name of libs) {
    try {
      const lib = Deno.dlopen(name, DL_SYMBOLS);
      const s = lib.symbols;
      return {
        dlopen: (path) => s.dlopen(cString(path), flags),
        dlsym: (handle, sym) => s.dlsym(handle, cString(sym)),
        dlerror: () => {
          const p = s.dlerror();
          return p === null ? "" : Deno.UnsafePointerView.getCString(p);
        },
      };
    } catch (e) {
      if (e instanceof Deno.errors.NotCapable) throw ffiPermission(e);
      errors.push(`${name}: ${(e as Error).message}`);
    }
  }
  throw new UserError(
    `cannot reach the system's dynamic loader (dlopen) to load MPI: ${errors.join("; ")}`,
  );
}

function ffiPermission(e: Error): UserError {
  return new UserError(
    `running under MPI needs FFI permission to load libmpi: run deno with --allow-ffi ` +
      `(unscoped: Deno resolves a scoped name as a path, which defeats the library search) ` +
      `(${e.message})`,
  );
}

// ---------------------------------------------------------------------------
// The typed calls.

/** Symbol table for handles of type `H`: "pointer" (Open MPI) or "i32" (MPICH). */
function mpiSymbols<H extends "pointer" | "i32">(h: H) {
  // Calls that wait on other ranks exist twice: synchronous, and `_nb`
  // (nonblocking: run on a Deno blocking-pool thread, returns a promise).
  return {
    MPI_Get_library_version: { parameters: ["buffer", "buffer"], result: "i32" },
    MPI_Initialized: { parameters: ["buffer"], result: "i32" },
    MPI_Finalized: { parameters: ["buffer"], result: "i32" },
    MPI_Init_thread: { parameters: ["pointer", "pointer", "i32", "buffer"], result: "i32" },
    MPI_Comm_rank: { parameters: [h, "buffer"], result: "i32" },
    MPI_Comm_size: { parameters: [h, "buffer"], result: "i32" },
    MPI_Comm_set_errhandler: { parameters: [h, h], result: "i32" },
    MPI_Error_string: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
    MPI_Abort: { parameters: [h, "i32"], result: "i32" },
    MPI_Finalize: { parameters: [], result: "i32" },
    MPI_Finalize_nb: { name: "MPI_Finalize", parameters: [], result: "i32", nonblocking: true },
    MPI_Barrier: { parameters: [h], result: "i32" },
    MPI_Barrier_nb: { name: "MPI_Barrier", parameters: [h], result: "i32", nonblocking: true },
    // (buffer, count, datatype, root, comm)
    MPI_Bcast: { parameters: ["buffer", "i32", h, "i32", h], result: "i32" },
    MPI_Bcast_nb: {
      name: "MPI_Bcast",
      parameters: ["buffer", "i32", h, "i32", h],
      result: "i32",
      nonblocking: true,
    },
    // (sendbuf, recvbuf, count, datatype, op, comm)
    MPI_Allreduce: { parameters: ["buffer", "buffer", "i32", h, h, h], result: "i32" },
    MPI_Allreduce_nb: {
      name: "MPI_Allreduce",
      parameters: ["buffer", "buffer", "i32", h, h, h],
      result: "i32",
      nonblocking: true,
    },
    // (sendbuf, sendcount, sendtype, recvbuf, recvcounts[], displs[], recvtype, comm)
    MPI_Allgatherv: {
      parameters: ["buffer", "i32", h, "buffer", "buffer", "buffer", h, h],
      result: "i32",
    },
    MPI_Allgatherv_nb: {
      name: "MPI_Allgatherv",
      parameters: ["buffer", "i32", h, "buffer", "buffer", "buffer", h, h],
      result: "i32",
      nonblocking: true,
    },
    // (sendbuf, sendcounts[], sdispls[], sendtype, recvbuf, recvcounts[], rdispls[], recvtype, comm)
    MPI_Alltoallv: {
      parameters: ["buffer", "buffer", "buffer", h, "buffer", "buffer", "buffer", h, h],
      result: "i32",
    },
    MPI_Alltoallv_nb: {
      name: "MPI_Alltoallv",
      parameters: ["buffer", "buffer", "buffer", h, "buffer", "buffer", "buffer", h, h],
      result: "i32",
      nonblocking: true,
    },
  } as const;
}

type MpiLib = Deno.DynamicLibrary<ReturnType<typeof mpiSymbols<"pointer" | "i32">>>;

/** An MPI handle: a pointer (Open MPI) or an int (MPICH). */
type Handle = Deno.PointerValue | number;

/** The predefined handles the communicator uses. */
interface Handles {
  commWorld: Handle;
  errorsReturn: Handle;
  byte: Handle;
  int: Handle;
  float: Handle;
  double: Handle;
  opMax: Handle;
}

/** MPICH's `mpi.h` (4.0.2; unchanged since MPICH 3): the predefined handles are these ints. */
const MPICH_HANDLES: Handles = {
  commWorld: 0x44000000,
  errorsReturn: 0x54000001,
  byte: 0x4c00010d,
  int: 0x4c000405,
  float: 0x4c00040a,
  double: 0x4c00080b,
  opMax: 0x58000001,
};

/** Open MPI's `mpi.h`: each predefined handle is `&global`, these globals. */
const OPENMPI_GLOBALS: Record<keyof Handles, string> = {
  commWorld: "ompi_mpi_comm_world",
  errorsReturn: "ompi_mpi_errors_return",
  byte: "ompi_mpi_byte",
  int: "ompi_mpi_int",
  float: "ompi_mpi_float",
  double: "ompi_mpi_double",
  opMax: "ompi_mpi_op_max",
};

/** The typed arrays that cross MPI, each with its MPI datatype. */
export type MpiArray = Uint8Array | Int32Array | Float32Array | Float64Array;

/** What `loadLibmpi` found, before `init`. */
export interface LibmpiInfo {
  /** The name or path that loaded. */
  path: string;
  /** Its binary interface. */
  abi: MpiAbi;
  /** `MPI_Get_library_version`'s first line, e.g. "Open MPI v4.1.4, package: ...". */
  version: string;
}

/**
 * A loaded MPI library. `init` once, then the collectives over
 * `MPI_COMM_WORLD`; every method but `abort` must be called one at a time
 * (awaited before the next), in the same order on every rank, which is MPI's
 * rule for collectives and `MPI_THREAD_SERIALIZED`'s.
 */
export class Libmpi {
  /** Where it came from, its ABI and version. */
  readonly info: LibmpiInfo;
  readonly #lib: MpiLib;
  readonly #h: Handles;
  #threaded = false;
  #initialized = false;

  private constructor(info: LibmpiInfo, lib: MpiLib, handles: Handles) {
    this.info = info;
    this.#lib = lib;
    this.#h = handles;
  }

  /**
   * Finds and opens libmpi (`libmpiCandidates`), tells its ABI, and binds
   * it. Throws a UserError that says how to install MPI or set
   * `TRAINER_LIBMPI` when nothing loads, and one for an MPI whose ABI is
   * neither Open MPI's nor MPICH's.
   */
  static load(env: EnvReader, prefer?: MpiAbi): Libmpi {
    const os = Deno.build.os;
    if (os === "windows") {
      throw new UserError(
        "running under MPI on Windows is not supported (MS-MPI's library is not bound); " +
          "run one process, or use Linux or macOS",
      );
    }
    const dl = openDl(os);
    const tried: string[] = [];
    for (const path of libmpiCandidates(env, os, prefer)) {
      const handle = dl.dlopen(path);
      if (handle === null) {
        tried.push(`${path} (${dl.dlerror() || "not found"})`);
        continue;
      }
      const ompiWorld = dl.dlsym(handle, OPENMPI_GLOBALS.commWorld);
      const abi: MpiAbi = ompiWorld !== null ? "openmpi" : "mpich";
      let lib: MpiLib;
      try {
        lib = Deno.dlopen(path, mpiSymbols(abi === "openmpi" ? "pointer" : "i32"));
      } catch (e) {
        if (e instanceof Deno.errors.NotCapable) throw ffiPermission(e);
        tried.push(`${path} (loads, but lacks MPI-3 functions: ${(e as Error).message})`);
        continue;
      }
      const version = libraryVersion(lib);
      if (abi === "mpich" && !/MPICH|Intel\(R\) MPI|MVAPICH/i.test(version)) {
        lib.close();
        throw new UserError(
          `${path} is an MPI whose binary interface we do not know ("${version}"); ` +
            `trainer binds Open MPI's and MPICH's (also Intel MPI, MVAPICH). Set ${LIBMPI_ENV} ` +
            `to one of those, the library your mpirun belongs to`,
        );
      }
      let handles: Handles;
      if (abi === "openmpi") {
        const h: Partial<Handles> = {};
        for (const [key, sym] of Object.entries(OPENMPI_GLOBALS) as [keyof Handles, string][]) {
          const addr = dl.dlsym(handle, sym);
          if (addr === null) {
            lib.close();
            throw new UserError(`${path} looks like Open MPI but has no symbol ${sym}`);
          }
          h[key] = addr;
        }
        handles = h as Handles;
      } else {
        handles = MPICH_HANDLES;
      }
      return new Libmpi({ path, abi, version }, lib, handles);
    }
    const override = env.get(LIBMPI_ENV);
    throw new UserError(
      override
        ? `${LIBMPI_ENV}=${override} cannot be loaded: ${tried.join("; ")}`
        : `this process was launched by mpirun/srun, but no MPI library could be loaded ` +
          `(tried ${tried.join(", ")}): ${INSTALL_HINT}`,
    );
  }

  /** Whether collectives run on a Deno thread (true) or block the main thread (false). */
  get threaded(): boolean {
    return this.#threaded;
  }

  /**
   * `MPI_Init_thread` asking for `MPI_THREAD_SERIALIZED`, then errors set to
   * return (so they become `MpiError`s with MPI's text instead of MPI's own
   * abort). Returns this rank and the world size.
   */
  init(): { rank: number; size: number } {
    const s = this.#lib.symbols;
    const flag = new Int32Array(1);
    this.#check("MPI_Initialized", s.MPI_Initialized(flag));
    if (flag[0]) throw new Error("MPI is already initialized in this process");
    const provided = new Int32Array(1);
    const rc = s.MPI_Init_thread(null, null, MPI_THREAD_SERIALIZED, provided);
    if (rc !== 0) {
      throw new UserError(`MPI_Init_thread failed (error ${rc}) with ${this.info.path}`);
    }
    this.#initialized = true;
    this.#threaded = provided[0] >= MPI_THREAD_SERIALIZED;
    const w = this.#h.commWorld;
    this.#check("MPI_Comm_set_errhandler", s.MPI_Comm_set_errhandler(w, this.#h.errorsReturn));
    const rank = new Int32Array(1);
    const size = new Int32Array(1);
    this.#check("MPI_Comm_rank", s.MPI_Comm_rank(w, rank));
    this.#check("MPI_Comm_size", s.MPI_Comm_size(w, size));
    return { rank: rank[0], size: size[0] };
  }

  /** `MPI_Barrier` on the world. */
  async barrier(): Promise<void> {
    const s = this.#lib.symbols;
    const w = this.#h.commWorld;
    this.#check("MPI_Barrier", this.#threaded ? await s.MPI_Barrier_nb(w) : s.MPI_Barrier(w));
  }

  /** `MPI_Bcast` of `buf` (whole) from `root`; `buf.length` must be below 2^31. */
  async bcast(buf: MpiArray, root: number): Promise<void> {
    const s = this.#lib.symbols;
    const args = [buf, buf.length, this.#type(buf), root, this.#h.commWorld] as const;
    this.#check("MPI_Bcast", this.#threaded ? await s.MPI_Bcast_nb(...args) : s.MPI_Bcast(...args));
  }

  /** `MPI_Allreduce` with `MPI_MAX` of int32 values: exact, so any order gives the same. */
  async allreduceMaxInt32(send: Int32Array, recv: Int32Array): Promise<void> {
    const s = this.#lib.symbols;
    const h = this.#h;
    const args = [send, recv, send.length, h.int, h.opMax, h.commWorld] as const;
    this.#check(
      "MPI_Allreduce",
      this.#threaded ? await s.MPI_Allreduce_nb(...args) : s.MPI_Allreduce(...args),
    );
  }

  /**
   * `MPI_Allgatherv`: this rank's `send` lands in every rank's `recv` at
   * `displs[rank]`; counts and displacements are in elements. `send` must not
   * overlap `recv`.
   */
  async allgatherv<T extends MpiArray>(
    send: T,
    recv: T,
    counts: Int32Array,
    displs: Int32Array,
  ): Promise<void> {
    const s = this.#lib.symbols;
    const t = this.#type(send);
    const args = [send, send.length, t, recv, counts, displs, t, this.#h.commWorld] as const;
    this.#check(
      "MPI_Allgatherv",
      this.#threaded ? await s.MPI_Allgatherv_nb(...args) : s.MPI_Allgatherv(...args),
    );
  }

  /**
   * `MPI_Alltoallv`: the block `send[sendDispls[j], + sendCounts[j])` goes to
   * rank j, and rank j's block for us lands at `recv[recvDispls[j]...]`. A pure
   * copy: no arithmetic, so the algorithm MPI picks cannot change a bit.
   */
  async alltoallv<T extends MpiArray>(
    send: T,
    sendCounts: Int32Array,
    sendDispls: Int32Array,
    recv: T,
    recvCounts: Int32Array,
    recvDispls: Int32Array,
  ): Promise<void> {
    const s = this.#lib.symbols;
    const t = this.#type(send);
    const w = this.#h.commWorld;
    const args = [send, sendCounts, sendDispls, t, recv, recvCounts, recvDispls, t, w] as const;
    this.#check(
      "MPI_Alltoallv",
      this.#threaded ? await s.MPI_Alltoallv_nb(...args) : s.MPI_Alltoallv(...args),
    );
  }

  /**
   * `MPI_Abort` on the world: mpirun (or srun) ends every rank. Synchronous,
   * and callable while another call is in flight: it is the way out.
   */
  abort(exitCode: number): void {
    this.#lib.symbols.MPI_Abort(this.#h.commWorld, exitCode);
  }

  /** `MPI_Finalize` (waits for the other ranks' finalize where MPI needs to). */
  async finalize(): Promise<void> {
    if (!this.#initialized) return;
    const s = this.#lib.symbols;
    const done = new Int32Array(1);
    this.#check("MPI_Finalized", s.MPI_Finalized(done));
    if (done[0]) return;
    this.#check("MPI_Finalize", this.#threaded ? await s.MPI_Finalize_nb() : s.MPI_Finalize());
  }

  #type(a: MpiArray): Handle {
    if (a instanceof Float32Array) return this.#h.float;
    if (a instanceof Float64Array) return this.#h.double;
    if (a instanceof Int32Array) return this.#h.int;
    return this.#h.byte;
  }

  #check(call: string, rc: number): void {
    if (rc === 0) return;
    const text = new Uint8Array(1024); // MPI_MAX_ERROR_STRING: 256 (Open MPI), 512 (MPICH)
    const len = new Int32Array(1);
    const ok = this.#lib.symbols.MPI_Error_string(rc, text, len) === 0;
    throw new MpiError(
      call,
      rc,
      ok ? new TextDecoder().decode(text.subarray(0, len[0])) : "(no description)",
    );
  }
}

/** `MPI_Get_library_version`'s first line (an MPI-3 call, valid before init). */
function libraryVersion(lib: MpiLib): string {
  const buf = new Uint8Array(8192); // MPI_MAX_LIBRARY_VERSION_STRING: 256 (Open MPI), 8192 (MPICH)
  const len = new Int32Array(1);
  if (lib.symbols.MPI_Get_library_version(buf, len) !== 0) return "unknown MPI";
  const text = new TextDecoder().decode(buf.subarray(0, Math.min(len[0], buf.length)));
  return text.replace(/\0.*$/s, "").split("\n")[0].replace(/\s+/g, " ").trim();
}
