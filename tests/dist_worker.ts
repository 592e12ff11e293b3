/**
 * One rank of the MPI tests in `tests/dist_test.ts`, started there by
 * `mpirun -np N deno run --allow-ffi --allow-env tests/dist_worker.ts MODE`.
 * Every rank prints one line `RESULT <json>` on stdout; the test parses them.
 *
 * Modes:
 * - `probe` (no mpirun): loads libmpi without initializing it and prints what loaded.
 * - `collectives`: all-reduce of awkward lengths (with buckets of 5 floats, so
 *   long arrays span many), broadcast, allgather, sumF64, agree, barrier.
 * - `fail`: rank 1 hits a UserError and aborts while rank 0 waits in a collective.
 * - `crash`: rank 1 exits with status 3 without finalizing while rank 0 waits.
 * - `kill`: rank 1 is killed by SIGKILL while rank 0 waits.
 * - `stop`: trains fake steps until a signal (SIGINT, SIGTERM, SIGUSR2) on any
 *   rank; every rank agrees each step whether to stop, so all stop at the same
 *   step, and rank 0 alone "saves".
 * - `bench BYTES`: allreduceBandwidth.
 */
import { allreduceBandwidth } from "../dist/bandwidth.ts";
import { openCommunicator } from "../dist/comm.ts";
import { Libmpi } from "../dist/mpi.ts";
import { UserError } from "../util/errors.ts";
import { Rng } from "../util/random.ts";

/** Lengths that are 0, 1, below and above the rank count, not multiples of the bucket (5). */
export const LENGTHS = [0, 1, 2, 7, 23, 1000];

/**
 * Rank r's values for an array of `length`: magnitudes from 1e-3 to 1e5 and
 * both signs, so that float32 addition is far from associative and another
 * summation order would change many bits.
 */
export function rankData(rank: number, length: number): Float32Array {
  const rng = new Rng(1000 * length + rank);
  const a = new Float32Array(length);
  for (let i = 0; i < length; i++) a[i] = rng.normal() * 10 ** ((i + rank) % 9 - 3);
  return a;
}

function result(value: unknown): void {
  console.log(`RESULT ${JSON.stringify(value)}`);
}

/**
 * SHA-256 of the array's bytes, in hex: mpirun interleaves long output lines
 * of different ranks, so results travel as digests.
 */
export async function digest(a: Float32Array): Promise<string> {
  const bytes = new Uint8Array(a.buffer, a.byteOffset, a.byteLength).slice();
  const hash = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(hash, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function main(mode: string): Promise<void> {
  if (mode === "probe") {
    try {
      const lib = Libmpi.load(Deno.env);
      result({ ok: true, ...lib.info });
    } catch (e) {
      result({ ok: false, error: (e as Error).message });
    }
    Deno.exit(0);
  }

  // Buckets of 5 floats make every length above 5 span several; the benchmark
  // uses the default.
  const comm = openCommunicator(mode === "bench" ? {} : { bucketElements: 5 });
  const { rank, size } = comm;

  if (mode === "collectives") {
    const sums: Record<number, string> = {};
    for (const n of LENGTHS) {
      const a = rankData(rank, n);
      await comm.allreduceSum(a);
      sums[n] = await digest(a);
    }
    const payload = rank === 0 ? new TextEncoder().encode("checkpoint manifest ✓") : undefined;
    const got = new TextDecoder().decode(await comm.broadcast(payload));
    const empty = (await comm.broadcast(rank === 0 ? new Uint8Array(0) : undefined)).length;
    // Rank r reports r + 1 values, so the lengths differ.
    const gathered = await comm.allgatherF64(
      Float64Array.from({ length: rank + 1 }, (_, i) => rank * 10 + i),
    );
    const summed = await comm.sumF64(new Float64Array([rank + 0.5, 1]));
    const agreeNone = await comm.agree(false);
    const agreeLast = await comm.agree(rank === size - 1);
    const agreeAll = await comm.agree(true);
    await comm.barrier();
    result({
      rank,
      size,
      localRank: comm.localRank,
      description: comm.description,
      sums,
      broadcast: got,
      emptyBroadcast: empty,
      gathered: gathered.map((g) => Array.from(g)),
      summed: Array.from(summed),
      agree: [agreeNone, agreeLast, agreeAll],
    });
    await comm.finalize();
  } else if (mode === "fail" || mode === "crash" || mode === "kill") {
    result({ rank, started: Date.now() });
    if (rank === 1) {
      await new Promise((r) => setTimeout(r, 300));
      if (mode === "kill") Deno.kill(Deno.pid, "SIGKILL");
      if (mode === "crash") Deno.exit(3);
      try {
        throw new UserError("data/shard-7.jsonl:12: not JSON (rank 1's bad line)");
      } catch (e) {
        comm.abort((e as Error).message, 1);
      }
    }
    await comm.agree(false); // rank 0 waits here for a rank that never comes
    result({ rank, error: "the collective returned" });
  } else if (mode === "stop") {
    let stop = false;
    let signal = "";
    for (const s of ["SIGINT", "SIGTERM", "SIGUSR2"] as const) {
      Deno.addSignalListener(s, () => {
        stop = true;
        signal ||= s;
      });
    }
    result({ rank, ready: true });
    for (let step = 0;; step++) {
      await new Promise((r) => setTimeout(r, 50)); // the step's compute
      const grads = rankData(rank, 1000);
      await comm.allreduceSum(grads);
      if (await comm.agree(stop)) {
        result({ rank, stoppedAt: step, signal, saved: rank === 0 });
        await comm.finalize();
        Deno.exit(0);
      }
    }
  } else if (mode === "bench") {
    const r = await allreduceBandwidth(comm, Number(Deno.args[1]));
    result({ rank, ...r });
    await comm.finalize();
  } else {
    throw new Error(`unknown mode ${mode}`);
  }
}

if (import.meta.main) await main(Deno.args[0]);
