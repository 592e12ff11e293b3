/**
 * Tests of `dist/`: launch detection from fake environments, the chunking and
 * the rank-ordered sum, the single-process communicator (no MPI needed), and,
 * where `mpirun` and libmpi are installed, real runs of `tests/dist_worker.ts`
 * under `mpirun`: all-reduce results bitwise equal to the rank-ordered
 * reference on every rank and in two runs, broadcast, gathers, agree, a rank
 * that fails / exits / is killed ending the job within seconds, and a stop
 * signal that every rank agrees on.
 *
 * The mpirun is `mpirun` on PATH, or `TRAINER_TEST_MPIRUN` (e.g. MPICH's
 * `mpiexec.hydra`, with `TRAINER_LIBMPI` naming its library).
 */
import { gpuForRank } from "../dist/gpu.ts";
import {
  chunkBounds,
  detectLaunch,
  DIST_ENV_VARS,
  LAUNCH_ENV_VARS,
  openCommunicator,
  singleProcess,
  sumInRankOrder,
} from "../dist/comm.ts";
import { Libmpi, libmpiCandidates } from "../dist/mpi.ts";
import { UserError } from "../util/errors.ts";
import { assert, assertEquals, assertNotEquals, assertThrows } from "./assert.ts";
import { digest, LENGTHS, rankData } from "./dist_worker.ts";

const env = (vars: Record<string, string>) => new Map(Object.entries(vars));

Deno.test("detectLaunch: no launcher variables is a plain launch", () => {
  assertEquals(detectLaunch(env({})), undefined);
  assertEquals(detectLaunch(env({ PATH: "/usr/bin", HOME: "/root" })), undefined);
});

Deno.test("detectLaunch: Open MPI's mpirun", () => {
  assertEquals(
    detectLaunch(env({
      OMPI_COMM_WORLD_SIZE: "4",
      OMPI_COMM_WORLD_RANK: "3",
      OMPI_COMM_WORLD_LOCAL_RANK: "1",
    })),
    { launcher: "openmpi", rank: 3, size: 4, localRank: 1 },
  );
  // mpirun inside an sbatch script: Open MPI's variables win over the batch step's.
  assertEquals(
    detectLaunch(env({
      OMPI_COMM_WORLD_SIZE: "2",
      OMPI_COMM_WORLD_RANK: "1",
      SLURM_PROCID: "0",
      SLURM_NTASKS: "8",
      SLURM_STEP_ID: "-5",
      SLURM_LOCALID: "0",
    })),
    { launcher: "openmpi", rank: 1, size: 2, localRank: undefined },
  );
});

Deno.test("detectLaunch: MPICH / Intel MPI Hydra", () => {
  assertEquals(
    detectLaunch(env({ PMI_SIZE: "3", PMI_RANK: "2", MPI_LOCALRANKID: "2", PMI_FD: "6" })),
    { launcher: "mpich", rank: 2, size: 3, localRank: 2 },
  );
});

Deno.test("detectLaunch: srun steps count, the batch, interactive and extern steps do not", () => {
  const srun = {
    SLURM_PROCID: "5",
    SLURM_STEP_ID: "0",
    SLURM_STEP_NUM_TASKS: "8",
    SLURM_NTASKS: "16",
    SLURM_LOCALID: "1",
  };
  assertEquals(detectLaunch(env(srun)), { launcher: "slurm", rank: 5, size: 8, localRank: 1 });
  const { SLURM_STEP_NUM_TASKS: _, ...older } = srun;
  assertEquals(detectLaunch(env(older))?.size, 16, "SLURM_NTASKS when the step count is absent");
  // sbatch's batch step has SLURM_PROCID=0 and the job's SLURM_NTASKS too: a
  // process run there directly is alone.
  const batch = { SLURM_PROCID: "0", SLURM_NTASKS: "8", SLURM_LOCALID: "0", SLURM_JOB_ID: "9" };
  assertEquals(detectLaunch(env(batch)), undefined, "no step id");
  for (const step of ["-5", "4294967291", "-6", "4294967290", "-4", "4294967292", "x"]) {
    assertEquals(
      detectLaunch(env({ ...batch, SLURM_STEP_ID: step, SLURM_STEP_NUM_TASKS: "8" })),
      undefined,
      `SLURM_STEP_ID=${step}`,
    );
  }
  // srun --mpi=pmix: PMIx's rank, the step's size.
  assertEquals(
    detectLaunch(env({ ...srun, PMIX_RANK: "5" })),
    { launcher: "pmix", rank: 5, size: 8, localRank: 1 },
  );
  assertEquals(
    detectLaunch(env({ PMIX_RANK: "0" })),
    { launcher: "pmix", rank: 0, size: undefined, localRank: undefined },
    "PMIx alone: the size is MPI's to tell",
  );
});

Deno.test("detectLaunch: a launch of one is reported; nonsense is a UserError", () => {
  assertEquals(
    detectLaunch(env({ OMPI_COMM_WORLD_SIZE: "1", OMPI_COMM_WORLD_RANK: "0" }))?.size,
    1,
  );
  assertThrows(
    () => detectLaunch(env({ OMPI_COMM_WORLD_SIZE: "two", OMPI_COMM_WORLD_RANK: "0" })),
    UserError,
    "OMPI_COMM_WORLD_SIZE=two",
  );
  assertThrows(
    () => detectLaunch(env({ PMI_SIZE: "2", PMI_RANK: "2" })),
    UserError,
    "rank 2 of 2",
  );
  for (const name of ["OMPI_COMM_WORLD_SIZE", "PMI_RANK", "SLURM_STEP_ID", "SLURM_LOCALID"]) {
    assert(LAUNCH_ENV_VARS.includes(name), `${name} is listed for --allow-env`);
  }
});

Deno.test("libmpiCandidates: the override alone, else the launcher's MPI first", () => {
  assertEquals(libmpiCandidates(env({ TRAINER_LIBMPI: "/opt/x/libmpi.so" }), "linux"), [
    "/opt/x/libmpi.so",
  ]);
  assertEquals(libmpiCandidates(env({}), "linux"), [
    "libmpi.so.40",
    "libmpi.so.12",
    "libmpich.so.12",
    "libmpi.so",
  ]);
  assertEquals(libmpiCandidates(env({}), "linux", "mpich")[0], "libmpi.so.12");
  assertEquals(libmpiCandidates(env({}), "darwin")[0], "libmpi.40.dylib");
});

Deno.test("chunkBounds: balanced, covering, a function of length and ranks only", () => {
  assertEquals(Array.from(chunkBounds(7, 3)), [0, 2, 4, 7]);
  assertEquals(Array.from(chunkBounds(1, 3)), [0, 0, 0, 1]);
  assertEquals(Array.from(chunkBounds(0, 2)), [0, 0, 0]);
  for (const [len, n] of [[1000, 7], [5, 5], [2, 8]]) {
    const b = chunkBounds(len, n);
    assertEquals([b[0], b[n]], [0, len]);
    for (let j = 0; j < n; j++) assert(b[j + 1] - b[j] >= Math.floor(len / n));
  }
});

Deno.test("sumInRankOrder: ((g0 + g1) + g2) in float32, which another order does not give", () => {
  const g = [
    new Float32Array([1e8, 0.1]),
    new Float32Array([-1e8, 0.2]),
    new Float32Array([1, 0.3]),
  ];
  const out = new Float32Array(2);
  sumInRankOrder(g, out);
  const f = Math.fround;
  assertEquals(Array.from(out), [f(f(1e8 - 1e8) + 1), f(f(f(0.1) + f(0.2)) + f(0.3))]);
  assertEquals(out[0], 1);
  // g0 + (g1 + g2): -1e8 + 1 rounds back to -1e8 in float32, so the 1 is lost.
  assertEquals(f(f(1e8) + f(-1e8 + 1)), 0);
});

Deno.test("singleProcess: size 1, sums are the data, agree is the flag", async () => {
  const c = singleProcess();
  assertEquals([c.rank, c.size, c.localRank], [0, 1, 0]);
  const a = new Float32Array([1.5, -2, 3]);
  await c.allreduceSum(a);
  assertEquals(Array.from(a), [1.5, -2, 3]);
  assertEquals(await c.agree(false), false);
  assertEquals(await c.agree(true), true);
  assertEquals(await c.allgatherF64(new Float64Array([4, 5])), [new Float64Array([4, 5])]);
  assertEquals(await c.sumF64(new Float64Array([2])), new Float64Array([2]));
  assertEquals(await c.broadcast(new Uint8Array([7])), new Uint8Array([7]));
  await c.barrier();
  await c.finalize();
});

Deno.test("openCommunicator: a plain launch or a launch of one loads no MPI", () => {
  // Under `deno task test` there is no --allow-ffi: loading libmpi would throw.
  assertEquals(openCommunicator({ env: env({}) }).description, "single");
  const one = env({ OMPI_COMM_WORLD_SIZE: "1", OMPI_COMM_WORLD_RANK: "0" });
  assertEquals(openCommunicator({ env: one }).size, 1);
});

Deno.test("Libmpi.load: a TRAINER_LIBMPI that does not load is a UserError naming it", () => {
  const bad = env({ TRAINER_LIBMPI: "/nonexistent/libmpi.so" });
  // Without --allow-ffi (as under `deno task test`) the error says to add it.
  const ffi = Deno.permissions.querySync({ name: "ffi" }).state === "granted";
  assertThrows(
    () => Libmpi.load(bad),
    UserError,
    ffi ? "TRAINER_LIBMPI=/nonexistent" : "--allow-ffi",
  );
});

// ---------------------------------------------------------------------------
// Under mpirun.

const DENO = Deno.execPath();
const WORKER = new URL("./dist_worker.ts", import.meta.url).pathname;
const MPIRUN = Deno.env.get("TRAINER_TEST_MPIRUN") ?? "mpirun";
/** The worker runs with exactly the permissions the distributed path needs. */
const WORKER_FLAGS = ["--allow-ffi", `--allow-env=${DIST_ENV_VARS.join(",")}`];

function mpiAvailability(): { skip?: string; openmpi: boolean } {
  let version: string;
  try {
    const out = new Deno.Command(MPIRUN, { args: ["--version"], stdout: "piped", stderr: "piped" })
      .outputSync();
    version = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  } catch (e) {
    return { skip: `${MPIRUN} is not runnable (${(e as Error).message})`, openmpi: false };
  }
  const probe = new Deno.Command(DENO, {
    args: ["run", ...WORKER_FLAGS, WORKER, "probe"],
    stdout: "piped",
    stderr: "piped",
  }).outputSync();
  const line = new TextDecoder().decode(probe.stdout).split("\n").find((l) =>
    l.startsWith("RESULT ")
  );
  const info = line ? JSON.parse(line.slice(7)) : { ok: false, error: "no answer from the probe" };
  if (!info.ok) return { skip: `no libmpi: ${info.error}`, openmpi: false };
  return { openmpi: /Open MPI|OpenRTE/.test(version) };
}

const mpi = mpiAvailability();
if (mpi.skip) console.log(`dist_test: skipping the tests under mpirun: ${mpi.skip}`);

interface RunResult {
  code: number;
  /** stdout and stderr together. */
  output: string;
  /** The workers' RESULT lines, parsed. */
  results: Record<string, unknown>[];
  seconds: number;
}

/** `mpirun -np <ranks> deno run <WORKER_FLAGS> tests/dist_worker.ts <args>`. */
async function mpirun(ranks: number, ...args: string[]): Promise<RunResult> {
  // Open MPI refuses root without --allow-run-as-root (CI runs as root) and
  // more ranks than cores without --oversubscribe; Hydra needs neither.
  const flags = mpi.openmpi ? ["--allow-run-as-root", "--oversubscribe"] : [];
  const t0 = performance.now();
  const out = await new Deno.Command(MPIRUN, {
    args: [
      ...flags,
      "-np",
      String(ranks),
      DENO,
      "run",
      "--allow-ffi",
      "--allow-env",
      WORKER,
      ...args,
    ],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const seconds = (performance.now() - t0) / 1e3;
  const stdout = new TextDecoder().decode(out.stdout);
  const output = stdout + new TextDecoder().decode(out.stderr);
  const results = stdout.split("\n").filter((l) => l.startsWith("RESULT ")).map((l) =>
    JSON.parse(l.slice(7))
  );
  return { code: out.code, output, results, seconds };
}

const MPI_TEST = { ignore: mpi.skip !== undefined, sanitizeResources: false, sanitizeOps: false };

/** The reference: rank data summed in rank order on one process. */
function reference(ranks: number, n: number): Float32Array {
  const out = new Float32Array(n);
  sumInRankOrder(Array.from({ length: ranks }, (_, r) => rankData(r, n)), out);
  return out;
}

Deno.test({
  name: "mpi: all-reduce is the rank-ordered sum, bitwise, on every rank and in two runs",
  ...MPI_TEST,
  fn: async () => {
    const ranks = 3; // with 2, float addition's commutativity would hide the order
    const runs = [await mpirun(ranks, "collectives"), await mpirun(ranks, "collectives")];
    for (const run of runs) {
      assertEquals(run.code, 0, run.output);
      assertEquals(run.results.length, ranks, run.output);
      for (const res of run.results) {
        const rank = res.rank as number;
        const sums = res.sums as Record<string, string>;
        for (const n of LENGTHS) {
          assertEquals(sums[n], await digest(reference(ranks, n)), `rank ${rank}, length ${n}`);
        }
        assertEquals(res.size, ranks);
        assertEquals(res.broadcast, "checkpoint manifest ✓");
        assertEquals(res.emptyBroadcast, 0);
        assertEquals(res.gathered, [[0], [10, 11], [20, 21, 22]]);
        assertEquals(res.summed, [0.5 + 1.5 + 2.5, 3]);
        assertEquals(res.agree, [false, true, true]);
      }
    }
    assertEquals(runs[0].results.map((r) => r.sums), runs[1].results.map((r) => r.sums));
    // The test can fail: another order gives other bits for this data.
    const n = 1000;
    const reversed = new Float32Array(n);
    sumInRankOrder(Array.from({ length: ranks }, (_, r) => rankData(ranks - 1 - r, n)), reversed);
    const ref = reference(ranks, n);
    assert(reversed.some((v, i) => v !== ref[i]), "the reverse order changes some sums");
  },
});

Deno.test({
  name: "mpi: a rank's UserError aborts the job within seconds, its message printed once",
  ...MPI_TEST,
  fn: async () => {
    const r = await mpirun(2, "fail");
    assertNotEquals(r.code, 0, r.output);
    assert(r.seconds < 10, `the job took ${r.seconds.toFixed(1)} s to end`);
    const message = "[rank 1] data/shard-7.jsonl:12: not JSON (rank 1's bad line)";
    assertEquals(r.output.split(message).length - 1, 1, r.output);
    assert(!r.results.some((x) => x.error), "no rank got past the collective");
  },
});

Deno.test({
  name: "mpi: a rank that exits without finalizing, or is killed, ends the job within seconds",
  ...MPI_TEST,
  fn: async () => {
    const crash = await mpirun(2, "crash");
    assertEquals(crash.code, 3, crash.output);
    assert(crash.seconds < 10, `the job took ${crash.seconds.toFixed(1)} s to end`);
    const kill = await mpirun(2, "kill");
    assertNotEquals(kill.code, 0, kill.output);
    assert(kill.seconds < 10, `the job took ${kill.seconds.toFixed(1)} s to end`);
    if (mpi.openmpi) assert(kill.output.includes("exited on signal 9 (Killed)"), kill.output);
    for (const r of [crash, kill]) assert(!r.results.some((x) => x.error), r.output);
  },
});

Deno.test({
  name: "mpi: SIGUSR2 to mpirun stops every rank at the same step; rank 0 alone saves",
  ...MPI_TEST,
  ignore: MPI_TEST.ignore || !mpi.openmpi, // Open MPI's mpirun forwards SIGUSR2 by default
  fn: async () => {
    const flags = ["--allow-run-as-root", "--oversubscribe", "-np", "2"];
    const child = new Deno.Command(MPIRUN, {
      args: [...flags, DENO, "run", ...WORKER_FLAGS, WORKER, "stop"],
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const stderr = new Response(child.stderr).text();
    const guard = setTimeout(() => child.kill("SIGKILL"), 30_000); // a hang fails, not blocks
    const lines: Record<string, unknown>[] = [];
    let buffered = "";
    const decoder = new TextDecoder();
    let signalled = false;
    for await (const chunk of child.stdout) {
      buffered += decoder.decode(chunk, { stream: true });
      const parts = buffered.split("\n");
      buffered = parts.pop()!;
      for (const l of parts) if (l.startsWith("RESULT ")) lines.push(JSON.parse(l.slice(7)));
      if (!signalled && lines.filter((l) => l.ready).length === 2) {
        child.kill("SIGUSR2");
        signalled = true;
      }
    }
    const status = await child.status;
    clearTimeout(guard);
    const stops = lines.filter((l) => l.stoppedAt !== undefined);
    assertEquals(status.code, 0, await stderr);
    assertEquals(stops.length, 2, JSON.stringify(lines));
    assertEquals(stops[0].stoppedAt, stops[1].stoppedAt);
    assertEquals(stops.filter((s) => s.saved).map((s) => s.rank), [0]);
    assertEquals(stops.map((s) => s.signal), ["SIGUSR2", "SIGUSR2"]);
  },
});

Deno.test({
  name: "mpi: allreduceBandwidth reports one figure on every rank",
  ...MPI_TEST,
  fn: async () => {
    const r = await mpirun(2, "bench", String(4 << 20));
    assertEquals(r.code, 0, r.output);
    assertEquals(r.results.length, 2, r.output);
    const [a, b] = r.results;
    assert((a.mbPerSecond as number) > 0, r.output);
    assertEquals(a.bytes, 4 << 20);
    assertEquals({ ...a, rank: 0 }, { ...b, rank: 0 }, "the slowest rank's figure, everywhere");
  },
});

Deno.test("gpuForRank: TRAINER_GPUS entry by local rank, as DRI_PRIME with '!'", () => {
  const env = (v?: string) => new Map(v === undefined ? [] : [["TRAINER_GPUS", v]]);
  const launch = (localRank?: number) => ({
    launcher: "openmpi" as const,
    rank: 3,
    size: 4,
    localRank,
  });
  assertEquals(
    gpuForRank(env("pci-0000_41_00_0, pci-0000_42_00_0"), launch(1)),
    "pci-0000_42_00_0!",
  );
  assertEquals(
    gpuForRank(env("pci-0000_41_00_0,pci-0000_42_00_0"), launch(2)),
    "pci-0000_41_00_0!",
  );
  assertEquals(gpuForRank(env("1!"), launch(0)), "1!");
  assertEquals(gpuForRank(env(), launch(0)), undefined);
  assertEquals(gpuForRank(env("a,b"), launch(undefined)), undefined);
  assertEquals(gpuForRank(env("a,b"), undefined), undefined);
});
