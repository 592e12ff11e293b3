/**
 * Where the CPU-driver kernels read their inputs, in whole training steps:
 * one model (and optimizer) whose kernels read every input from storage
 * buffers, one whose read-only inputs are copied into textures first where
 * they qualify (the default on CPU drivers: `auto`, kernels/texels.ts; the
 * matmuls' operands included, and the head's d logits then come in padded
 * rows for an odd vocabulary), timed in interleaved, shuffled rounds (see
 * `interleavedSteps`). Both start from the same parameters and see the same
 * batches, and their losses are printed beside the times: the sums run in
 * the same order, so they are the same. This is the measurement behind the
 * `auto` default (figures in docs/benchmarks.md).
 *
 *   deno run -A bench/operands_bench.ts [--preset tiny] [--batch 16] [--seq 128] [--rounds 6]
 */
import { Gpu } from "../kernels/runtime.ts";
import { Rng } from "../util/random.ts";
import { interleavedSteps, median } from "./harness.ts";
import { parseStepShape, randomBatch, stepModel } from "./step_setup.ts";

const { preset, config, B, T, rounds } = parseStepShape(6);
const V = config.vocab_size, N = B * T;

const gpu = await Gpu.request();
if (!gpu.adapterSummary.isFallback) {
  console.log(`${gpu.adapterSummary.name} is not a CPU driver: its matmuls never read textures`);
  Deno.exit(0);
}
/** Batch `i` of the run, the same for every arm. */
const batchAt = (i: number) => randomBatch(new Rng(1000 + i), B, T, V);

const arms = [];
for (const operands of ["storage", "auto"] as const) {
  const { model, optimizer } = await stepModel(gpu, config, B, T, { reads: operands });
  const losses: number[] = [];
  let steps = 0;
  const step = async () => {
    const b = batchAt(steps++);
    const t0 = performance.now();
    model.forwardBackward([b]);
    optimizer.step(1e-3);
    await gpu.finish();
    const ms = performance.now() - t0;
    losses.push(await model.readLoss());
    return ms;
  };
  arms.push({ name: operands === "auto" ? "textures" : operands, model, optimizer, losses, step });
}
const times = await interleavedSteps(arms, rounds, (n) => new Rng(rounds + n).nextInt(n));
console.log(
  `${preset} B=${B} T=${T} V=${V} on ${gpu.adapterSummary.name}; ${rounds} rounds, ` +
    `load average ${Deno.loadavg()[0].toFixed(1)} at the end`,
);
console.log("operands | min ms | median ms | tokens/s (min) | loss after each step");
arms.forEach((a, i) => {
  const min = Math.min(...times[i]);
  console.log(
    `${a.name.padEnd(8)} | ${min.toFixed(0).padStart(6)} | ${
      median(times[i]).toFixed(0).padStart(9)
    } | ` +
      `${(N / (min / 1000)).toFixed(0).padStart(14)} | ${
        a.losses.map((l) => l.toFixed(5)).join(" ")
      }`,
  );
  a.optimizer.destroy();
  a.model.destroy();
});
