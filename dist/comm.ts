/**
 * Communication between the ranks of a data-parallel run: the `Communicator`
 * interface, a single-process one (no MPI loaded) and the MPI one, and
 * `detectLaunch`, which tells from the environment alone whether this process
 * was started by `mpirun`/`mpiexec`/`srun`.
 *
 * Determinism. Gradients are summed in one fixed order on every rank,
 * `((g_0 + g_1) + g_2) + ... + g_{N-1}` in float32, whatever algorithm MPI
 * would pick for `MPI_Allreduce` (its summation order depends on the
 * algorithm, the message size and the number of ranks, so its result can
 * differ between ranks and runs). MPI only moves bytes here; the arithmetic
 * is ours:
 *
 * 1. reduce-scatter by `MPI_Alltoallv`: a bucket of L floats is cut into N
 *    chunks, chunk j = [floor(jL/N), floor((j+1)L/N)) (a function of L and N
 *    only); every rank sends chunk j to rank j, so rank j holds the N copies of
 *    its chunk, one per rank, in rank order;
 * 2. rank j sums them in rank order 0..N-1 into float32;
 * 3. `MPI_Allgatherv` copies each owner's sum to every rank.
 *
 * Each rank sends and receives (N-1)/N * L floats in each phase, 2(N-1)/N * L
 * in all: the same traffic as a ring all-reduce, the bandwidth optimum, and
 * unlike a ring the order of the sum does not depend on where a chunk starts
 * in the ring. The price: (N-1)/N * L additions on the CPU per rank and a
 * receive buffer of one bucket; latency is MPI's alltoall (N-1 pairwise steps
 * or fewer), fine for the few to few dozen ranks this trainer targets. For
 * ~100 MB of gradients on 8 ranks each rank moves 175 MB.
 *
 * Large arrays go in buckets (`bucketElements`, 8 Mi floats = 32 MiB by
 * default; MPI counts are C ints, so a bucket must stay below 2^31 elements).
 * Because the chunks of a bucket depend only on its length and N, the result
 * is bitwise the same on every rank and in every run with the same N; a
 * different N (or bucket size) may round differently.
 *
 * @module
 */
import { UserError } from "../util/errors.ts";
import { type EnvReader, Libmpi, LIBMPI_ENV, type MpiAbi } from "./mpi.ts";

export type { EnvReader } from "./mpi.ts";

/** How this process was launched as one rank of several. */
export interface LaunchInfo {
  /** Which launcher's variables said so. */
  launcher: "openmpi" | "mpich" | "pmix" | "slurm";
  /** This process's rank, 0-based. */
  rank: number;
  /** Number of ranks; undefined when only MPI can tell (PMIx without Slurm). */
  size: number | undefined;
  /** Rank among the ranks on this host (for picking a GPU), when the launcher says. */
  localRank: number | undefined;
}

/** Every environment variable `detectLaunch` reads (for `deno compile --allow-env=...`). */
export const LAUNCH_ENV_VARS: readonly string[] = [
  "OMPI_COMM_WORLD_SIZE",
  "OMPI_COMM_WORLD_RANK",
  "OMPI_COMM_WORLD_LOCAL_RANK",
  "PMI_SIZE",
  "PMI_RANK",
  "MPI_LOCALRANKID",
  "PMIX_RANK",
  "SLURM_PROCID",
  "SLURM_STEP_ID",
  "SLURM_STEP_NUM_TASKS",
  "SLURM_NTASKS",
  "SLURM_LOCALID",
];

/**
 * Every environment variable the distributed path reads: what a compiled
 * binary's `--allow-env=...` must list besides its own.
 */
export const DIST_ENV_VARS: readonly string[] = [
  ...LAUNCH_ENV_VARS,
  LIBMPI_ENV,
  "TRAINER_GPUS",
  "DRI_PRIME",
];

/** Slurm's step ids for the batch script, the interactive step and the extern step (`slurm.h`). */
const SLURM_SPECIAL_STEPS = new Set([0xfffffffb, 0xfffffffa, 0xfffffffc]);

function intVar(env: EnvReader, name: string, min: number): number | undefined {
  const v = env.get(name);
  if (v === undefined || v === "") return undefined;
  const n = Number(v.trim());
  if (!Number.isInteger(n) || n < min) {
    throw new UserError(`environment variable ${name}=${v} is not an integer >= ${min}`);
  }
  return n;
}

/**
 * Whether this process is one rank of an MPI launch, from the environment
 * only (libmpi is not touched). Checked in this order, the first that applies
 * wins:
 *
 * 1. Open MPI's `mpirun`: `OMPI_COMM_WORLD_SIZE` and `OMPI_COMM_WORLD_RANK`
 *    (local rank `OMPI_COMM_WORLD_LOCAL_RANK`).
 * 2. MPICH's / Intel MPI's Hydra `mpiexec`: `PMI_SIZE` and `PMI_RANK` (local
 *    rank `MPI_LOCALRANKID`, else `SLURM_LOCALID`).
 * 3. A PMIx launcher (`srun --mpi=pmix`, PRRTE): `PMIX_RANK`; the size comes
 *    from Slurm's step when there is one, else from MPI after init.
 * 4. `srun`: `SLURM_PROCID` with a job-step id `SLURM_STEP_ID` that is an
 *    ordinary step, and the step's task count `SLURM_STEP_NUM_TASKS` (else
 *    `SLURM_NTASKS`). A batch script (`sbatch`) also has `SLURM_PROCID=0`
 *    and the job's `SLURM_NTASKS`, but its step is the batch step
 *    (`SLURM_STEP_ID=-5`, i.e. 0xfffffffb; -6 is salloc's interactive step,
 *    -4 the extern step), and there no srun started us: a process run there
 *    directly is alone, and waiting for N-1 partners would hang. So only an
 *    ordinary step id (0 .. 0xffffffef) counts.
 *
 * Returns undefined when none applies (a plain launch). A launch of size 1
 * is reported too; `openCommunicator` runs it as a single process.
 */
export function detectLaunch(env: EnvReader): LaunchInfo | undefined {
  const checked = (info: LaunchInfo): LaunchInfo => {
    if (info.size !== undefined && info.rank >= info.size) {
      throw new UserError(
        `the launcher's environment says rank ${info.rank} of ${info.size} ranks (${info.launcher})`,
      );
    }
    return info;
  };
  const ompiSize = intVar(env, "OMPI_COMM_WORLD_SIZE", 1);
  const ompiRank = intVar(env, "OMPI_COMM_WORLD_RANK", 0);
  if (ompiSize !== undefined && ompiRank !== undefined) {
    return checked({
      launcher: "openmpi",
      rank: ompiRank,
      size: ompiSize,
      localRank: intVar(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0),
    });
  }
  const slurmLocal = intVar(env, "SLURM_LOCALID", 0);
  const pmiSize = intVar(env, "PMI_SIZE", 1);
  const pmiRank = intVar(env, "PMI_RANK", 0);
  if (pmiSize !== undefined && pmiRank !== undefined) {
    return checked({
      launcher: "mpich",
      rank: pmiRank,
      size: pmiSize,
      localRank: intVar(env, "MPI_LOCALRANKID", 0) ?? slurmLocal,
    });
  }
  const stepTasks = srunStepTasks(env);
  const pmixRank = intVar(env, "PMIX_RANK", 0);
  if (pmixRank !== undefined) {
    return checked({ launcher: "pmix", rank: pmixRank, size: stepTasks, localRank: slurmLocal });
  }
  const procId = intVar(env, "SLURM_PROCID", 0);
  if (procId !== undefined && stepTasks !== undefined) {
    return checked({ launcher: "slurm", rank: procId, size: stepTasks, localRank: slurmLocal });
  }
  return undefined;
}

/** The task count of the srun job step we run in, or undefined outside one (see `detectLaunch`). */
function srunStepTasks(env: EnvReader): number | undefined {
  const raw = env.get("SLURM_STEP_ID");
  if (raw === undefined || raw.trim() === "") return undefined;
  const step = Number(raw.trim());
  if (!Number.isInteger(step) || step < 0 || step > 0xffffffff) return undefined; // -5 (batch) ...
  if (SLURM_SPECIAL_STEPS.has(step) || step >= 0xfffffff0) return undefined;
  return intVar(env, "SLURM_STEP_NUM_TASKS", 1) ?? intVar(env, "SLURM_NTASKS", 1);
}

/**
 * The ranks of a data-parallel run. Every method except `abort` is
 * collective: every rank calls it, in the same order, and awaits it before the
 * next (MPI's rule; the MPI implementation also queues calls that overlap).
 */
export interface Communicator {
  /** This process's rank, 0 .. size-1; rank 0 writes checkpoints and logs. */
  readonly rank: number;
  /** Number of ranks. */
  readonly size: number;
  /** Rank among the ranks on this host (GPU choice), when the launcher tells it. */
  readonly localRank: number | undefined;
  /** "single" (no MPI loaded) or "mpi: <library version>". */
  readonly description: string;
  /**
   * Sums `data` over the ranks, in place, in rank order
   * `((g_0 + g_1) + g_2) + ...` in float32: bitwise the same on every rank
   * and in every run with the same number of ranks. Lengths must match
   * across ranks (0 is allowed).
   */
  allreduceSum(data: Float32Array): Promise<void>;
  /**
   * Rank 0's bytes, on every rank. Rank 0 passes them; the others' argument
   * is ignored (pass undefined).
   */
  broadcast(bytes: Uint8Array | undefined): Promise<Uint8Array>;
  /** Waits until every rank has called it. */
  barrier(): Promise<void>;
  /**
   * Every rank's `values` (small per-rank reports: losses, token counts), on
   * every rank, indexed by rank. Lengths may differ between ranks.
   */
  allgatherF64(values: Float64Array): Promise<Float64Array[]>;
  /** Element-wise sum over the ranks in rank order, in float64; lengths must match. */
  sumF64(values: Float64Array): Promise<Float64Array>;
  /**
   * Logical OR of `flag` over the ranks: the same answer on every rank, so
   * all stop at the same step when any rank was asked to stop.
   */
  agree(flag: boolean): Promise<boolean>;
  /**
   * Prints `message` on this rank's stderr and ends the whole job: MPI_Abort
   * under MPI (mpirun/srun then end the other ranks), exit otherwise.
   */
  abort(message: string, exitCode?: number): never;
  /** Ends MPI (MPI_Finalize) after the last collective; a no-op for one process. */
  finalize(): Promise<void>;
}

/** One process: sums and gathers are over itself, nothing is loaded. */
export function singleProcess(): Communicator {
  return {
    rank: 0,
    size: 1,
    localRank: 0,
    description: "single",
    allreduceSum: () => Promise.resolve(),
    broadcast: (bytes) => {
      if (bytes === undefined) throw new Error("broadcast: rank 0 must pass the bytes");
      return Promise.resolve(bytes);
    },
    barrier: () => Promise.resolve(),
    allgatherF64: (values) => Promise.resolve([values.slice()]),
    sumF64: (values) => Promise.resolve(values.slice()),
    agree: (flag) => Promise.resolve(flag),
    abort: (message, exitCode = 1) => {
      writeStderr(message);
      Deno.exit(exitCode);
    },
    finalize: () => Promise.resolve(),
  };
}

/** Options of `openCommunicator`. */
export interface CommunicatorOptions {
  /** Where to read the launcher's variables (default `Deno.env`). */
  env?: EnvReader;
  /** Floats per all-reduce bucket (default `DEFAULT_BUCKET_ELEMENTS`). */
  bucketElements?: number;
}

/** 8 Mi floats (32 MiB): a receive buffer of this size per rank, well below MPI's int counts. */
export const DEFAULT_BUCKET_ELEMENTS = 8 * 1024 * 1024;

/**
 * The communicator for this process: `singleProcess()` unless the
 * environment says we are one of several ranks (`detectLaunch`), then MPI:
 * libmpi loaded, initialized, and checked to see the world the launcher
 * announced (an `srun` without an MPI plugin starts N unrelated singletons,
 * each of which would train alone and write the same checkpoint).
 *
 * @example Sum gradients, agree on stopping, finish
 * ```ts
 * import { openCommunicator } from "./comm.ts";
 *
 * const comm = openCommunicator(); // one process here: nothing is loaded
 * const grads = new Float32Array([0.5, -1, 2]);
 * await comm.allreduceSum(grads); // in place; with one rank, unchanged
 * const stop = await comm.agree(false); // true on every rank if any rank passed true
 * if (!stop && comm.rank === 0) console.log(`rank 0 of ${comm.size}`);
 * await comm.finalize();
 * ```
 */
export function openCommunicator(options: CommunicatorOptions = {}): Communicator {
  const env = options.env ?? Deno.env;
  const launch = detectLaunch(env);
  if (launch === undefined || launch.size === 1) return singleProcess();
  return MpiCommunicator.open(launch, env, options.bucketElements ?? DEFAULT_BUCKET_ELEMENTS);
}

function writeStderr(text: string): void {
  const bytes = new TextEncoder().encode(text.endsWith("\n") ? text : text + "\n");
  for (let off = 0; off < bytes.length;) off += Deno.stderr.writeSync(bytes.subarray(off));
}

/** The split of `length` elements into `parts` chunks: chunk j = [floor(jL/P), floor((j+1)L/P)). */
export function chunkBounds(length: number, parts: number): Int32Array {
  const bounds = new Int32Array(parts + 1);
  for (let j = 0; j <= parts; j++) bounds[j] = Math.floor((j * length) / parts);
  return bounds;
}

/**
 * `out = parts[0] + parts[1] + ... + parts[N-1]` element-wise, left to right,
 * rounded to float32 after every addition: the order every rank uses. A
 * Float32Array store after a float64 add is IEEE float32 addition: the exact
 * sum of two floats rounded to 53 bits and then to 24 rounds the same as
 * rounding it to 24 directly (53 >= 2*24 + 2), so this equals `a + b` in f32.
 */
export function sumInRankOrder(parts: Float32Array[], out: Float32Array): void {
  out.set(parts[0]);
  for (let r = 1; r < parts.length; r++) {
    const p = parts[r];
    for (let i = 0; i < out.length; i++) out[i] += p[i];
  }
}

class MpiCommunicator implements Communicator {
  readonly rank: number;
  readonly size: number;
  readonly localRank: number | undefined;
  readonly description: string;
  readonly #mpi: Libmpi;
  readonly #bucket: number;
  #queue: Promise<unknown> = Promise.resolve();
  #finalized = false;
  #recv = new Float32Array(0);

  private constructor(mpi: Libmpi, rank: number, size: number, launch: LaunchInfo, bucket: number) {
    this.#mpi = mpi;
    this.rank = rank;
    this.size = size;
    this.localRank = launch.localRank;
    this.description = `mpi: ${mpi.info.version}`;
    this.#bucket = bucket;
  }

  static open(launch: LaunchInfo, env: EnvReader, bucket: number): MpiCommunicator {
    if (!Number.isInteger(bucket) || bucket < 1 || bucket >= 2 ** 31) {
      throw new Error(`bucketElements ${bucket} must be an integer in [1, 2^31)`);
    }
    const prefer: MpiAbi | undefined = launch.launcher === "openmpi"
      ? "openmpi"
      : launch.launcher === "mpich"
      ? "mpich"
      : undefined;
    const mpi = Libmpi.load(env, prefer);
    const { rank, size } = mpi.init();
    if ((launch.size !== undefined && size !== launch.size) || rank !== launch.rank) {
      const said = `rank ${launch.rank} of ${launch.size ?? "?"} (${launch.launcher})`;
      const msg = `the launcher said ${said}, but ${mpi.info.path} (${mpi.info.version}) ` +
        `sees rank ${rank} of ${size}: ` +
        (size === 1
          ? "each process started alone. Launch with the mpirun of this MPI, or with " +
            "srun --mpi=pmix (or pmi2), or set TRAINER_LIBMPI to the library of your mpirun"
          : "the launcher and the library disagree");
      if (size > 1) {
        writeStderr(`[rank ${rank}] ${msg}`);
        mpi.abort(1);
      }
      throw new UserError(msg);
    }
    return new MpiCommunicator(mpi, rank, size, launch, bucket);
  }

  /** Runs `op` after every call issued before it: one MPI call at a time. */
  #serial<T>(op: () => Promise<T>): Promise<T> {
    if (this.#finalized) return Promise.reject(new Error("communicator already finalized"));
    const run = this.#queue.then(op);
    this.#queue = run.catch(() => {});
    return run;
  }

  allreduceSum(data: Float32Array): Promise<void> {
    return this.#serial(async () => {
      const n = new Int32Array([data.length]);
      // Lengths must agree, or the exchange below would read past an array
      // or hang; one int per rank is cheap against the data.
      const all = new Int32Array(this.size);
      await this.#mpi.allgatherv(n, all, ones(this.size), iota(this.size));
      if (all.some((v) => v !== data.length)) {
        throw new Error(`allreduceSum: lengths differ between ranks: ${all.join(", ")}`);
      }
      for (let off = 0; off < data.length; off += this.#bucket) {
        await this.#allreduceBucket(data.subarray(off, Math.min(off + this.#bucket, data.length)));
      }
    });
  }

  async #allreduceBucket(bucket: Float32Array): Promise<void> {
    const N = this.size;
    const me = this.rank;
    const bounds = chunkBounds(bucket.length, N);
    const counts = new Int32Array(N);
    for (let j = 0; j < N; j++) counts[j] = bounds[j + 1] - bounds[j];
    const displs = bounds.subarray(0, N);
    const mine = counts[me];
    // [N, mine]: row r is rank r's copy of the chunk this rank owns.
    if (this.#recv.length < N * mine) this.#recv = new Float32Array(N * mine);
    const recv = this.#recv.subarray(0, N * mine);
    const recvCounts = new Int32Array(N).fill(mine);
    const recvDispls = iota(N, mine);
    await this.#mpi.alltoallv(bucket, counts, displs, recv, recvCounts, recvDispls);
    const parts = Array.from({ length: N }, (_, r) => recv.subarray(r * mine, (r + 1) * mine));
    const sum = new Float32Array(mine);
    sumInRankOrder(parts, sum);
    await this.#mpi.allgatherv(sum, bucket, counts, displs);
  }

  broadcast(bytes: Uint8Array | undefined): Promise<Uint8Array> {
    return this.#serial(async () => {
      if (this.rank === 0 && bytes === undefined) {
        throw new Error("broadcast: rank 0 must pass the bytes");
      }
      const len = new Float64Array([this.rank === 0 ? bytes!.length : 0]);
      await this.#mpi.bcast(len, 0);
      const out = this.rank === 0 ? bytes! : new Uint8Array(len[0]);
      const piece = 1 << 30; // MPI counts are C ints
      for (let off = 0; off < out.length; off += piece) {
        await this.#mpi.bcast(out.subarray(off, Math.min(off + piece, out.length)), 0);
      }
      return out;
    });
  }

  barrier(): Promise<void> {
    return this.#serial(() => this.#mpi.barrier());
  }

  allgatherF64(values: Float64Array): Promise<Float64Array[]> {
    return this.#serial(async () => {
      const N = this.size;
      const lengths = new Int32Array(N);
      await this.#mpi.allgatherv(new Int32Array([values.length]), lengths, ones(N), iota(N));
      const displs = new Int32Array(N);
      for (let r = 1; r < N; r++) displs[r] = displs[r - 1] + lengths[r - 1];
      const all = new Float64Array(displs[N - 1] + lengths[N - 1]);
      await this.#mpi.allgatherv(values, all, lengths, displs);
      return Array.from({ length: N }, (_, r) => all.slice(displs[r], displs[r] + lengths[r]));
    });
  }

  async sumF64(values: Float64Array): Promise<Float64Array> {
    const all = await this.allgatherF64(values);
    if (all.some((v) => v.length !== values.length)) {
      throw new Error(`sumF64: lengths differ between ranks: ${all.map((v) => v.length)}`);
    }
    const out = all[0].slice();
    for (let r = 1; r < all.length; r++) {
      for (let i = 0; i < out.length; i++) out[i] += all[r][i];
    }
    return out;
  }

  agree(flag: boolean): Promise<boolean> {
    return this.#serial(async () => {
      const out = new Int32Array(1);
      await this.#mpi.allreduceMaxInt32(new Int32Array([flag ? 1 : 0]), out);
      return out[0] !== 0;
    });
  }

  abort(message: string, exitCode = 1): never {
    writeStderr(`[rank ${this.rank}] ${message}`);
    this.#mpi.abort(exitCode);
    Deno.exit(exitCode); // MPI_Abort does not return; in case an MPI lets it
  }

  finalize(): Promise<void> {
    return this.#serial(async () => {
      await this.#mpi.finalize();
      this.#finalized = true;
    });
  }
}

function ones(n: number): Int32Array {
  return new Int32Array(n).fill(1);
}

/** [0, step, 2 step, ...], n values. */
function iota(n: number, step = 1): Int32Array {
  return Int32Array.from({ length: n }, (_, i) => i * step);
}
