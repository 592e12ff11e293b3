/**
 * Where a training step's GPU time goes: every dispatch of one micro-batch's
 * forward, loss and backward and of the optimizer step, each timed in its own
 * compute pass with timestamp queries (`profileDispatches`), summed by kind
 * (the dispatch label's leading words: "matmul xWt", "attention", ...) and
 * printed as shares. Texture copies and the submit round trip are outside the
 * figures, and one pass per dispatch adds overhead a real step does not pay,
 * so the shares are what to read, not the sum. Needs `timestamp-query`.
 *
 *   deno run -A bench/step_profile_bench.ts [--preset tiny] [--batch 16] [--seq 128] [--rounds 3]
 */
import { Gpu, profileDispatches } from "../kernels/runtime.ts";
import { Rng } from "../util/random.ts";
import { parseStepShape, randomBatch, stepModel } from "./step_setup.ts";

const { preset, config, B, T, rounds } = parseStepShape(3);

const gpu = await Gpu.request();
if (!gpu.features.timestampQuery) {
  console.log(`${gpu.adapterSummary.name} has no timestamp-query: nothing to profile`);
  Deno.exit(0);
}
const { model, optimizer } = await stepModel(gpu, config, B, T);
model.forwardBackward([randomBatch(new Rng(2), B, T, config.vocab_size)]);
optimizer.step(1e-4);
await gpu.finish();

const dispatches = [...model.stepDispatches(), ...optimizer.stepDispatches()];
/** The kind of a dispatch: its label up to the first shape figure or parenthesis. */
const kind = (label: string) => label.split(/ [A-Za-z]+=|\(| \[/)[0].trim();
const totals = new Map<string, number>();
for (let r = 0; r < rounds + 1; r++) {
  const timings = await profileDispatches(gpu, dispatches);
  if (!timings || r === 0) continue; // the first round compiles nothing but warms caches
  for (const t of timings) totals.set(kind(t.label), (totals.get(kind(t.label)) ?? 0) + t.ms);
}
const sum = [...totals.values()].reduce((a, b) => a + b, 0);
console.log(
  `${preset} B=${B} T=${T} on ${gpu.adapterSummary.name}: ${dispatches.length} dispatches, ` +
    `${(sum / rounds).toFixed(0)} ms of kernel time per step (mean of ${rounds} rounds)`,
);
for (const [k, ms] of [...totals].sort((a, b) => b[1] - a[1])) {
  console.log(
    `${k.padEnd(40)} ${(ms / rounds).toFixed(1).padStart(8)} ms ${
      (100 * ms / sum).toFixed(1).padStart(5)
    }%`,
  );
}
optimizer.destroy();
model.destroy();
