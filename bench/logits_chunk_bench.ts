/**
 * The logits chunk budget on this adapter: whole training steps (forward,
 * backward, AdamW; submit to done) of one model at several head-chunk sizes,
 * the models built once and timed in interleaved rounds whose order is
 * shuffled each round, so drifting machine load falls on every size alike.
 * Prints per budget the rows per chunk, the chunks per step and the minimum
 * and median step time. This is the measurement behind
 * `LOGITS_CHUNK_BYTES_CPU` (model/plan.ts; figures in docs/benchmarks.md).
 *
 *   deno run -A bench/logits_chunk_bench.ts [--preset tiny] [--batch 16] [--seq 128]
 *       [--rounds 6] [--mib 1,2,4,8,16]
 */
import { Gpu } from "../kernels/runtime.ts";
import type { TrainingModel } from "../model/train_model.ts";
import type { AdamW } from "../optim/adamw.ts";
import { logitsChunkRows } from "../model/plan.ts";
import { Rng } from "../util/random.ts";
import { interleavedSteps, median } from "./harness.ts";
import { parseStepShape, randomBatch, stepModel } from "./step_setup.ts";

const { preset, config, B, T, rounds, values } = parseStepShape(6, { mib: "1,2,4,8,16" });
const budgets = values.mib.split(",").map((s) => Number(s) * 2 ** 20);
const V = config.vocab_size, N = B * T;

const gpu = await Gpu.request();
const rng = new Rng(2);
const batch = () => randomBatch(rng, B, T, V);

interface Arm {
  bytes: number;
  rows: number;
  chunks: number;
  model: TrainingModel;
  optimizer: AdamW;
  times: number[];
}
const arms: Arm[] = [];
for (const bytes of budgets) {
  const rows = logitsChunkRows(gpu.limits, V, N, undefined, bytes);
  const { model, optimizer } = await stepModel(gpu, config, B, T, { logitsChunkRows: rows });
  arms.push({ bytes, rows, chunks: Math.ceil(N / rows), model, optimizer, times: [] });
}
const step = async (a: Arm) => {
  const b = batch();
  const t0 = performance.now();
  a.model.forwardBackward([b]);
  a.optimizer.step(1e-4);
  await gpu.finish();
  return performance.now() - t0;
};
const times = await interleavedSteps(
  arms.map((a) => ({ name: `${a.bytes}`, step: () => step(a) })),
  rounds,
  (n) => rng.nextInt(n),
);
arms.forEach((a, i) => a.times = times[i]);
console.log(
  `${preset} B=${B} T=${T} V=${V} on ${gpu.adapterSummary.name}; ${rounds} rounds, ` +
    `load average ${Deno.loadavg()[0].toFixed(1)} at the end`,
);
console.log("budget MiB | rows/chunk | chunks | min ms | median ms");
for (const a of arms) {
  console.log(
    `${(a.bytes / 2 ** 20).toString().padStart(10)} | ${String(a.rows).padStart(10)} | ` +
      `${String(a.chunks).padStart(6)} | ${Math.min(...a.times).toFixed(0).padStart(6)} | ` +
      `${median(a.times).toFixed(0).padStart(9)}`,
  );
  a.optimizer.destroy();
  a.model.destroy();
}
