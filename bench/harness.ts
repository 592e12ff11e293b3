/**
 * Timing helpers for `deno task bench`. GPU work is timed from submit to
 * `onSubmittedWorkDone` over several iterations after a warm-up, so the
 * figure includes queue overhead, as a training step sees it.
 */
import type { Gpu } from "../kernels/runtime.ts";

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
 * Milliseconds per call of `record` (median over `iterations` timed runs, each
 * a submit of `repeat` recordings followed by a wait), after `warmup` runs.
 */
export async function timeGpu(
  gpu: Gpu,
  record: (encoder: GPUCommandEncoder) => void,
  opts: { warmup?: number; iterations?: number; repeat?: number } = {},
): Promise<number> {
  const warmup = opts.warmup ?? 1;
  const iterations = opts.iterations ?? 3;
  const repeat = opts.repeat ?? 1;
  const run = async () => {
    const encoder = gpu.device.createCommandEncoder();
    for (let i = 0; i < repeat; i++) record(encoder);
    gpu.device.queue.submit([encoder.finish()]);
    await gpu.device.queue.onSubmittedWorkDone();
  };
  for (let i = 0; i < warmup; i++) await run();
  const times: number[] = [];
  for (let i = 0; i < iterations; i++) {
    const t0 = performance.now();
    await run();
    times.push((performance.now() - t0) / repeat);
  }
  return median(times);
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
