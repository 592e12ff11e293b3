/**
 * Generation speed with the KV cache at the presets' shapes, random weights:
 * the prefill of a prompt, then greedy decode steps timed end to end as a
 * user sees them (write the token, submit, read back the logits `[V]`,
 * argmax on the CPU), and greedy steps chained on the GPU (argmax there,
 * 16 steps per submit, one readback of the 16 tokens), which is what
 * `generate` does at temperature 0: each readback costs ~11 ms in Deno's
 * WebGPU (it polls mapped buffers every 10 ms), a floor per token otherwise.
 * Batch 1.
 *
 * Per decode token the model reads every weight once (4 bytes per parameter)
 * plus the cached k and v of the visible positions; the row's `bytes` is that
 * minimum, so GB/s says how close decode is to the memory-bound limit.
 * FLOP per token ~ 2 x parameters (one multiply-add per weight) plus attention.
 *
 * Run alone: `deno run -A bench/decode_bench.ts [--quick]`.
 */
import { type BenchRow, median, rates } from "./harness.ts";
import { Gpu } from "../kernels/runtime.ts";
import { InferenceModel } from "../model/inference.ts";
import { argmax } from "../model/sampling.ts";
import { headDim, presetConfig } from "../model/config.ts";
import { initParameters, parameterSpecs, totalParameters } from "../model/params.ts";
import { Rng } from "../util/random.ts";

/** Greedy steps per submit in the chained-decode row (as `generate` does at most). */
const CHAIN = 16;

/**
 * Prefill (prompt 64 tokens; quick: 16) and decode tokens/s, one readback
 * per token and greedy-chained (64 steps, the median of 3 runs; quick: 16
 * steps, 1 run) for `tiny` and `minimind2-small`.
 */
export async function benchDecode(gpu: Gpu, opts: { quick: boolean }): Promise<BenchRow[]> {
  const promptLen = opts.quick ? 16 : 64;
  const steps = opts.quick ? 16 : 64;
  const runs = opts.quick ? 1 : 3;
  const rows: BenchRow[] = [];
  for (const preset of ["tiny", "minimind2-small"]) {
    const config = presetConfig(preset);
    const params = initParameters(config, 1);
    const nParams = totalParameters(parameterSpecs(config));
    const model = await InferenceModel.create(gpu, config, params, {
      capacity: promptLen + steps + 1,
    });
    try {
      const rng = new Rng(2);
      const prompt = Array.from({ length: promptLen }, () => rng.nextInt(config.vocab_size));
      await model.prefill(prompt); // warm-up: builds the bucket's dispatches
      const prefillMs: number[] = [];
      const decodeMs: number[] = [];
      const chainedMs: number[] = [];
      for (let r = 0; r < runs; r++) {
        const t0 = performance.now();
        let logits = await model.prefill(prompt);
        const t1 = performance.now();
        for (let i = 0; i < steps; i++) logits = await model.decode(argmax(logits));
        decodeMs.push((performance.now() - t1) / steps);
        prefillMs.push(t1 - t0);
        // Greedy with the argmax on the GPU, CHAIN steps per submit.
        const first = argmax(await model.prefill(prompt));
        const t2 = performance.now();
        let next = first;
        for (let done = 0; done < steps; done += CHAIN) {
          const got = await model.decodeGreedy(next, Math.min(CHAIN, steps - done));
          next = got[got.length - 1];
        }
        chainedMs.push((performance.now() - t2) / steps);
      }
      const kvBytesPerPos = 2 * config.num_hidden_layers * config.num_key_value_heads *
        headDim(config) * 4;
      const meanContext = promptLen + steps / 2;
      const msPerToken = median(decodeMs);
      rows.push({
        name: "decode (KV cache)",
        shape: `${preset}, prompt ${promptLen}, ${steps} steps`,
        ms: msPerToken,
        flop: 2 * nParams,
        bytes: 4 * nParams + kvBytesPerPos * meanContext,
        extra: { "tokens/s": 1000 / msPerToken },
      });
      const chained = median(chainedMs);
      rows.push({
        name: `decode greedy x${CHAIN}`,
        shape: `${preset}, prompt ${promptLen}, ${steps} steps`,
        ms: chained,
        flop: 2 * nParams,
        bytes: 4 * nParams + kvBytesPerPos * meanContext,
        extra: { "tokens/s": 1000 / chained },
      });
      const pf = median(prefillMs);
      rows.push({
        name: "prefill",
        shape: `${preset}, ${promptLen} tokens`,
        ms: pf,
        flop: 2 * nParams * promptLen,
        extra: { "tokens/s": (1000 * promptLen) / pf },
      });
    } finally {
      model.destroy();
    }
  }
  return rows;
}

if (import.meta.main) {
  const quick = Deno.args.includes("--quick");
  const gpu = await Gpu.request();
  console.log(`adapter: ${gpu.adapterSummary.name} (${gpu.adapterSummary.backend})`);
  for (const row of await benchDecode(gpu, { quick })) {
    const r = rates(row);
    console.log(
      `${row.name.padEnd(18)} ${row.shape.padEnd(40)} ${row.ms.toFixed(2).padStart(9)} ms` +
        `  ${(row.extra?.["tokens/s"] ?? 0).toFixed(1).padStart(8)} tokens/s` +
        (r.gbps !== undefined ? `  ${r.gbps.toFixed(2).padStart(7)} GB/s` : ""),
    );
  }
  gpu.destroy();
}
