/**
 * The all-reduce micro-benchmark behind `deno task bench`'s all-reduce row.
 *
 * @module
 */
import type { Communicator } from "./comm.ts";

/** What `allreduceBandwidth` measured. */
export interface AllreduceBandwidth {
  /** Bytes summed per call (the gradient size). */
  bytes: number;
  /** Median seconds per `allreduceSum`, the slowest rank's. */
  seconds: number;
  /** `bytes / seconds / 1e6`: the "algorithm bandwidth" (nccl-tests' algbw). */
  mbPerSecond: number;
  /**
   * `mbPerSecond * 2 (N-1) / N`: what each rank's link carried (nccl-tests'
   * busbw), comparable across rank counts.
   */
  busMbPerSecond: number;
}

/**
 * Times `allreduceSum` of `bytes` bytes of float32 (rounded down to whole
 * floats): one warm-up call, then `repeats` timed calls; every rank reports
 * the median of the slowest rank's times. Collective: every rank calls it.
 * Returns undefined for a single process, where nothing crosses.
 */
export async function allreduceBandwidth(
  comm: Communicator,
  bytes: number,
  repeats = 5,
): Promise<AllreduceBandwidth | undefined> {
  if (comm.size === 1) return undefined;
  const data = new Float32Array(Math.floor(bytes / 4));
  for (let i = 0; i < data.length; i++) data[i] = (i % 251) * 1e-3;
  await comm.allreduceSum(data);
  const times = new Float64Array(repeats);
  for (let k = 0; k < repeats; k++) {
    await comm.barrier();
    const t0 = performance.now();
    await comm.allreduceSum(data);
    times[k] = (performance.now() - t0) / 1e3;
  }
  // The slowest rank's time per repeat, so that every rank reports one figure.
  const all = await comm.allgatherF64(times);
  const slowest = Array.from(times, (_, k) => Math.max(...all.map((t) => t[k])));
  slowest.sort((a, b) => a - b);
  const seconds = slowest[Math.floor(slowest.length / 2)];
  const used = data.length * 4;
  const mbPerSecond = used / seconds / 1e6;
  return {
    bytes: used,
    seconds,
    mbPerSecond,
    busMbPerSecond: (mbPerSecond * 2 * (comm.size - 1)) / comm.size,
  };
}
