/**
 * End-to-end training step: forward, backward and AdamW of the whole model on
 * one micro-batch, timed from the first submit to `onSubmittedWorkDone`, as a
 * training loop sees it (the CPU side — batch upload, the embedding backward's
 * token grouping — included).
 *
 * Model FLOPs per token (the PaLM / nanoGPT convention, so MFU is comparable
 * with theirs):
 *
 *   6 * P_matmul + 12 * L * H * T
 *
 * - `P_matmul` = every parameter that takes part in a matmul: the total of
 *   `parameterCount` (a tied embedding counts once: it is the head's matrix,
 *   its lookup is free), minus the untied embedding table. Norm weights are
 *   included and are < 0.1% of it. 6 = 2 (multiply-add) x 3 (forward, dX, dW).
 * - `12 * L * H * T`: attention's two T x T products (QK^T and PV), forward
 *   (4 L H T per token) and backward (8 L H T), counted over the full square
 *   as PaLM does, although causal masking needs only half.
 *
 * MFU = achieved model FLOP/s / the device's peak, reported only when the
 * peak is given (`peakFlops`; WebGPU does not say what a device can do, and we
 * do not guess). Without it the row carries achieved FLOP/s (GFLOP/s in the
 * table). Recomputing `silu(gate) * up` in the backward is not counted, as
 * MFU does not count recomputation.
 */
import { Gpu, PassRecorder } from "../kernels/runtime.ts";
import { type BenchRow, median, rates } from "./harness.ts";
import { ADAMW_HYPER_FLOATS } from "../kernels/adamw.ts";
import { inputTextureBytes } from "../kernels/texels.ts";
import { randomBatch, stepModel } from "./step_setup.ts";
import { presetConfig, trainFlopsPerToken } from "../model/config.ts";
import { Rng } from "../util/random.ts";

/**
 * The training steps timed: on CPU drivers the shapes of the side-by-side
 * comparison with PyTorch on the CPU (`tiny` B16 T128, the default pretrain;
 * `minimind2-small` B4 T256); on GPUs `tiny` B16 T128 and the MiniMind
 * shapes at B16 T512 (`minimind2-small`, `minimind-3`). Quick: small shapes,
 * one timed step.
 */
export function trainStepCases(
  gpu: Gpu,
  quick: boolean,
): { preset: string; B: number; T: number; warmup: number; steps: number }[] {
  if (quick) {
    return [
      { preset: "tiny", B: 4, T: 64, warmup: 1, steps: 1 },
      { preset: "minimind2-small", B: 2, T: 64, warmup: 0, steps: 1 },
    ];
  }
  if (gpu.adapterSummary.isFallback) {
    return [
      { preset: "tiny", B: 16, T: 128, warmup: 2, steps: 5 },
      { preset: "minimind2-small", B: 4, T: 256, warmup: 1, steps: 3 },
    ];
  }
  return [
    { preset: "tiny", B: 16, T: 128, warmup: 3, steps: 10 },
    { preset: "minimind2-small", B: 16, T: 512, warmup: 2, steps: 5 },
    { preset: "minimind-3", B: 16, T: 512, warmup: 2, steps: 5 },
  ];
}

/**
 * Times whole training steps (forward, backward, clip, AdamW: submit to done)
 * at `trainStepCases`, and reports per step the dispatches recorded, the bytes
 * written from the host (batch, embedding groups, scalars) and the GPU memory
 * the model and optimizer hold. `peakFlops` (FLOP/s of the device, e.g.
 * 66.9e12 for an H100 SXM in FP32) adds MFU.
 */
export async function benchTrainStep(
  gpu: Gpu,
  opts: { quick: boolean; peakFlops?: number },
): Promise<BenchRow[]> {
  const cases = trainStepCases(gpu, opts.quick);
  const rows: BenchRow[] = [];
  for (const c of cases) {
    const config = presetConfig(c.preset);
    const { model, optimizer } = await stepModel(gpu, config, c.B, c.T);
    try {
      const rng = new Rng(2);
      const N = c.B * c.T;
      const runStep = async () => {
        const batch = randomBatch(rng, c.B, c.T, config.vocab_size);
        const t0 = performance.now();
        model.forwardBackward([batch]);
        optimizer.step(1e-4);
        await gpu.finish();
        return performance.now() - t0;
      };
      for (let i = 0; i < c.warmup; i++) await runStep();
      const times: number[] = [];
      for (let i = 0; i < c.steps; i++) times.push(await runStep());
      const loss = await model.readLoss();
      if (!Number.isFinite(loss)) throw new Error(`train step bench: loss ${loss} is not finite`);
      const ms = median(times);
      const flop = trainFlopsPerToken(config, c.T) * N;
      const extra: Record<string, number> = { "tokens/s": N / (ms / 1000) };
      if (opts.peakFlops) extra["MFU %"] = (100 * flop) / (ms / 1000) / opts.peakFlops;
      // The structure of a step: what is recorded, what crosses from the host, what is held.
      const dispatches = [...model.stepDispatches(), ...optimizer.stepDispatches()];
      extra["dispatches/step"] = dispatches.length;
      // Input copies into textures (CPU drivers), outside the compute passes: those a step
      // records (as it does: the model's dispatches, then the optimizer's, each recorder
      // leaving out copies whose texture holds the range already), counted on an encoder
      // that is never submitted.
      let copies = 0;
      for (const part of [model.stepDispatches(), optimizer.stepDispatches()]) {
        const recorder = new PassRecorder(gpu, gpu.device.createCommandEncoder());
        recorder.record(part);
        recorder.end();
        copies += recorder.copiesRecorded;
      }
      extra["texture copies/step"] = copies;
      extra["host KiB/step"] = (model.batchUploadBytes + ADAMW_HYPER_FLOATS * 4) / 1024;
      // The model's and the optimizer's own memory and the input textures they share.
      extra["GPU MiB"] = (model.gpuBytes + optimizer.gpuBytes + inputTextureBytes(gpu)) / 2 ** 20;
      rows.push({
        name: `train step ${c.preset}`,
        shape: `B=${c.B} T=${c.T} (${c.steps} timed, ${c.warmup} warm-up)`,
        ms,
        flop,
        extra,
      });
    } finally {
      optimizer.destroy();
      model.destroy();
    }
  }
  return rows;
}

if (import.meta.main) {
  const quick = Deno.args.includes("--quick");
  const peakArg = Deno.args.find((a) => a.startsWith("--peak-tflops="));
  const peakFlops = peakArg ? Number(peakArg.split("=")[1]) * 1e12 : undefined;
  if (peakFlops !== undefined && !(peakFlops > 0)) {
    console.error("--peak-tflops=X needs a positive number (the device's FP32 peak in TFLOP/s)");
    Deno.exit(2);
  }
  const gpu = await Gpu.request();
  console.log(`adapter: ${gpu.adapterSummary.name} (${gpu.adapterSummary.backend})`);
  for (const row of await benchTrainStep(gpu, { quick, peakFlops })) {
    const mfu = row.extra?.["MFU %"];
    console.log(
      `${row.name.padEnd(28)} ${row.shape.padEnd(34)} ${row.ms.toFixed(1).padStart(10)} ms  ` +
        `${row.extra!["tokens/s"].toFixed(0).padStart(8)} tokens/s  ` +
        `${rates(row).gflops!.toFixed(2).padStart(8)} GFLOP/s` +
        (mfu !== undefined ? `  MFU ${mfu.toFixed(1)}%` : ""),
    );
  }
  gpu.destroy();
}
