/**
 * Timing helpers for `deno task bench`: kernels by GPU timestamps on GPUs
 * (`timestamp-query`), by submit-to-done wall time on CPU drivers; several
 * iterations after a warm-up, the median.
 */
import { type Dispatch, type Gpu, PassRecorder } from "../kernels/runtime.ts";

/** One row of the benchmark table. */
export interface BenchRow {
  /** What ran, e.g. `matmul X W^T`. */
  name: string;
  /** The shape, e.g. `M=4096 K=512 N=1408`. */
  shape: string;
  /** Milliseconds per run (median of the timed runs). */
  ms: number;
  /** Useful FLOP per run (0 when not a compute figure). */
  flop?: number;
  /** Bytes that must cross memory at least once per run (0 when not a bandwidth figure). */
  bytes?: number;
  /** Extra figures, e.g. `{ "tokens/s": 1234 }`. */
  extra?: Record<string, number>;
}

/** Median of `values`. */
export function median(values: number[]): number {
  const s = [...values].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/**
 * Whether `timeGpu` reads GPU timestamps here: on GPUs with `timestamp-query`
 * (kernel time only, no host round trip in the figure). CPU drivers run the
 * GPU's work on the host threads, where wall time from submit to completion
 * is what a step costs, so they are timed by the clock.
 */
export function usesTimestamps(gpu: Gpu): boolean {
  return gpu.features.timestampQuery && !gpu.adapterSummary.isFallback;
}

/**
 * Milliseconds per recording of `dispatches` (median over `iterations` timed
 * runs, each one compute pass of `repeat` recordings in one submit), after
 * `warmup` runs. GPU timestamps bracket the pass where `usesTimestamps`;
 * elsewhere submit-to-done wall time.
 */
export async function timeGpu(
  gpu: Gpu,
  dispatches: Dispatch | Dispatch[],
  opts: { warmup?: number; iterations?: number; repeat?: number } = {},
): Promise<number> {
  const warmup = opts.warmup ?? 1;
  const iterations = opts.iterations ?? 3;
  const repeat = opts.repeat ?? 1;
  const stamps = usesTimestamps(gpu);
  const querySet = stamps ? gpu.device.createQuerySet({ type: "timestamp", count: 2 }) : undefined;
  const resolve = stamps
    ? gpu.device.createBuffer({ size: 16, usage: 0x200 /* QUERY_RESOLVE */ | 0x04 /* COPY_SRC */ })
    : undefined;
  const run = async (): Promise<number> => {
    const t0 = performance.now();
    const encoder = gpu.device.createCommandEncoder();
    const recorder = new PassRecorder(
      gpu,
      encoder,
      querySet ? { querySet, beginIndex: 0, endIndex: 1 } : undefined,
    );
    for (let i = 0; i < repeat; i++) recorder.record(dispatches);
    recorder.end();
    if (querySet && resolve) encoder.resolveQuerySet(querySet, 0, 2, resolve, 0);
    gpu.device.queue.submit([encoder.finish()]);
    await gpu.device.queue.onSubmittedWorkDone();
    if (!resolve) return performance.now() - t0;
    const ticks = new BigUint64Array(await gpu.read(resolve, 0, 16));
    return Number(ticks[1] - ticks[0]) / 1e6;
  };
  try {
    for (let i = 0; i < warmup; i++) await run();
    const times: number[] = [];
    for (let i = 0; i < iterations; i++) times.push((await run()) / repeat);
    return median(times);
  } finally {
    querySet?.destroy();
    resolve?.destroy();
  }
}

/** `GFLOP/s` and `GB/s` of a row. */
export function rates(row: BenchRow): { gflops?: number; gbps?: number } {
  const s = row.ms / 1000;
  return {
    gflops: row.flop ? row.flop / s / 1e9 : undefined,
    gbps: row.bytes ? row.bytes / s / 1e9 : undefined,
  };
}

/** A CPU-side throughput figure (data pipeline, tokenizer). */
export interface ThroughputRow {
  name: string;
  value: number;
  /** e.g. `MB/s`, `tokens/s`. */
  unit: string;
}

/** One model of a whole-step comparison: its name and one timed step (ms). */
export interface StepArm {
  name: string;
  step: () => Promise<number>;
}

/**
 * Times `arms` in interleaved rounds: one warm-up step each (pipelines
 * compiled, caches filled), then `rounds` rounds that run every arm once in an
 * order shuffled by `shuffle` (a random integer below its argument) each
 * round, so drifting machine load falls on every arm alike. Returns each
 * arm's step times (ms), in the arms' order.
 */
export async function interleavedSteps(
  arms: StepArm[],
  rounds: number,
  shuffle: (below: number) => number,
): Promise<number[][]> {
  for (const a of arms) await a.step();
  const times = arms.map(() => [] as number[]);
  const order = arms.map((_, i) => i);
  for (let r = 0; r < rounds; r++) {
    for (let i = order.length - 1; i > 0; i--) {
      const j = shuffle(i + 1);
      [order[i], order[j]] = [order[j], order[i]];
    }
    for (const i of order) times[i].push(await arms[i].step());
  }
  return times;
}
