/**
 * Low-rank adapters: the column-slice kernels (kernels/lora.ts) against a CPU
 * loop, and the training model with adapters (model/train_model.ts +
 * model/lora.ts) against the float64 reference (model/reference.ts).
 *
 * The model check uses the identity the adapter rests on: the adapted model
 * is the base model with `W' = W + s B A`, and `dA = s B^T dW'`,
 * `dB = s dW' A^T`. So the reference runs the merged weights (an independent
 * forward and backward), and the adapter's expected gradients follow from its
 * dense gradients (`loraGradsFromDense`). Shapes: the shared tiny model
 * (hidden 32, 2 layers, 4/2 heads, MLP 48, vocab 67, B=2, T=7) with rank 3 on
 * every projection, so every slice of the fused q|k|v and gate|up outputs is
 * exercised at sizes that are multiples of no tile.
 */
import { assert, assertClose, assertEquals } from "./assert.ts";
import { GPU_TEST, gpuTest, randomF32, submitPassAndWait, tinyConfig } from "./helpers.ts";
import { Gpu } from "../kernels/runtime.ts";
import {
  columnsAddScaled,
  columnsGatherScaled,
  dropoutApply,
  dropoutKeeps,
  dropoutState,
} from "../kernels/lora.ts";
import {
  initLora,
  LORA_TARGETS,
  type LoraConfig,
  loraGradsFromDense,
  loraLayout,
  loraParameterCount,
  mergeLora,
  parseLoraTargets,
} from "../model/lora.ts";
import { TrainingModel } from "../model/train_model.ts";
import { AdamW } from "../optim/adamw.ts";
import type { ModelConfig } from "../model/config.ts";
import { initParameters, parameterSpecs } from "../model/params.ts";
import { modelLossAndGrads, toFloat64Params } from "../model/reference.ts";
import type { Batch } from "../data/batch.ts";
import { Rng } from "../util/random.ts";
import { UserError } from "../util/errors.ts";

const gpu = await Gpu.request();

// ---------------------------------------------------------------------------
// Kernels.

for (const [N, ld, off, width] of [[7, 37, 5, 13], [1, 9, 0, 9], [300, 70, 61, 9]]) {
  gpuTest(
    `columnsAddScaled / columnsGatherScaled: N=${N} ld=${ld} cols ${off}+${width}`,
    async () => {
      const rng = new Rng(N * 31 + ld);
      const y0 = randomF32(rng, N * ld);
      const u = randomF32(rng, N * width);
      const scale = 1.75;
      const yBuf = gpu.createBuffer(y0, "y");
      const uBuf = gpu.createBuffer(u, "u");
      const dBuf = gpu.createBuffer(N * width * 4, "d");
      const slice = { N, ld, off, width };
      await submitPassAndWait(gpu, [
        await columnsGatherScaled(gpu, { ...slice, y: yBuf, d: dBuf, scale }),
        await columnsAddScaled(gpu, { ...slice, u: uBuf, y: yBuf, scale }),
      ]);
      const y = await gpu.readF32(yBuf, 0, N * ld);
      const d = await gpu.readF32(dBuf, 0, N * width);
      const wantY = Float64Array.from(y0);
      const wantD = new Float64Array(N * width);
      for (let n = 0; n < N; n++) {
        for (let j = 0; j < width; j++) {
          wantD[n * width + j] = scale * y0[n * ld + off + j];
          wantY[n * ld + off + j] += scale * u[n * width + j];
        }
      }
      // One multiply (gather) or one multiply-add (add, possibly fused) of f32
      // values: within 1 ulp of the float64 result (2^-23 relative, plus the
      // ulp of values near 0 after cancellation: atol 2^-23 for O(1) data).
      const tol = { atol: 2 ** -23, rtol: 2 ** -23 };
      assertClose(d, wantD, tol, "gather");
      assertClose(y, wantY, tol, "add");
      // Columns outside the slice are untouched, bit for bit.
      for (let n = 0; n < N; n++) {
        for (let c = 0; c < ld; c++) {
          if (c < off || c >= off + width) assertEquals(y[n * ld + c], y0[n * ld + c]);
        }
      }
      for (const b of [yBuf, uBuf, dBuf]) b.destroy();
    },
  );
}

gpuTest(
  "dropoutApply: the mask of dropoutKeeps, scaled by 1 / (1 - p), set and accumulated",
  async () => {
    const count = 5000; // not a multiple of the 256-wide workgroup
    const p = 0.3;
    const rng = new Rng(3);
    const src = randomF32(rng, count);
    const dst0 = randomF32(rng, count);
    const state = dropoutState(1234567, p);
    const stateBuf = gpu.createBuffer(state, "state");
    const srcBuf = gpu.createBuffer(src, "src");
    const setBuf = gpu.createBuffer(count * 4, "set");
    const accBuf = gpu.createBuffer(dst0, "acc");
    await submitPassAndWait(gpu, [
      await dropoutApply(gpu, {
        src: srcBuf,
        dst: setBuf,
        state: stateBuf,
        count,
        stream: 7,
        accumulate: false,
      }),
      await dropoutApply(gpu, {
        src: srcBuf,
        dst: accBuf,
        state: stateBuf,
        count,
        stream: 7,
        accumulate: true,
      }),
    ]);
    const set = await gpu.readF32(setBuf, 0, count);
    const acc = await gpu.readF32(accBuf, 0, count);
    const scale = Math.fround(1 / (1 - p));
    let kept = 0;
    const wantSet = new Float64Array(count);
    const wantAcc = Float64Array.from(dst0);
    for (let i = 0; i < count; i++) {
      if (!dropoutKeeps(state, 7, i)) continue;
      kept++;
      wantSet[i] = src[i] * scale;
      wantAcc[i] += src[i] * scale;
    }
    // Dropped elements are exactly 0 (set) or untouched (accumulate); kept ones
    // one multiply (or multiply-add) of f32 values: within 1 ulp.
    const tol = { atol: 2 ** -23, rtol: 2 ** -23 };
    assertClose(set, wantSet, tol, "set");
    assertClose(acc, wantAcc, tol, "accumulate");
    // The keep rate is 1 - p: 3500 expected, binomial sd 32; 5 sd either way.
    assert(Math.abs(kept - count * (1 - p)) < 5 * Math.sqrt(count * p * (1 - p)), `kept ${kept}`);
    // Another stream or seed gives another mask.
    let same = 0;
    for (let i = 0; i < count; i++) {
      if (dropoutKeeps(state, 7, i) === dropoutKeeps(state, 8, i)) same++;
    }
    assert(same < 0.7 * count, `streams 7 and 8 agree on ${same} of ${count}`);
    for (const b of [stateBuf, srcBuf, setBuf, accBuf]) b.destroy();
  },
);

Deno.test("parseLoraTargets: order, PEFT names, and an unknown name is an error", () => {
  assertEquals(parseLoraTargets(["v", "q_proj", "down"]), ["q", "v", "down"]);
  let msg = "";
  try {
    parseLoraTargets(["q", "lm_head"]);
  } catch (e) {
    assert(e instanceof UserError);
    msg = e.message;
  }
  assert(msg.includes("lm_head") && msg.includes("q,k,v,o,gate,up,down"), msg);
});

// ---------------------------------------------------------------------------
// The model with adapters against the reference.

/** Base parameters spread wider than the init (as in train_model_test.ts). */
function testParameters(config: ModelConfig, seed: number): Map<string, Float32Array> {
  const rng = new Rng(seed + 1000);
  const params = initParameters(config, seed);
  for (const s of parameterSpecs(config)) {
    const t = params.get(s.name)!;
    for (let i = 0; i < t.length; i++) {
      t[i] = s.init === "ones" ? 1 + 0.3 * rng.normal() : t[i] * 7.5;
    }
  }
  return params;
}

/** An adapter with B non-zero (a fresh one has B = 0, which would leave dA = 0 untested). */
function testAdapter(config: ModelConfig, lora: LoraConfig, seed: number) {
  const layout = loraLayout(config, lora);
  const adapter = initLora(layout, seed);
  const rng = new Rng(seed + 7);
  for (const s of layout.sites) {
    adapter.set(s.b.name, randomF32(rng, s.b.size, 0.3));
  }
  return { layout, adapter };
}

function randomBatch(rng: Rng, B: number, T: number, V: number): Batch {
  const N = B * T;
  const ids = new Int32Array(N);
  const targets = new Int32Array(N);
  const mask = new Float32Array(N);
  for (let i = 0; i < N; i++) {
    ids[i] = rng.nextInt(V);
    targets[i] = rng.nextInt(V);
    mask[i] = i === 0 || rng.nextFloat() < 0.25 ? 0 : 1;
  }
  return { ids, targets, mask, B, T };
}

function maxAbs(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
}

const B = 2;
const T = 7;

for (const [qkNorm, tied] of [[false, true], [true, false]]) {
  const tag = `${qkNorm ? "QK-norm" : "no QK-norm"}, ${tied ? "tied" : "untied"}`;
  gpuTest(
    `LoRA on every projection: loss and adapter gradients match the reference (${tag})`,
    async () => {
      const config = tinyConfig({ qk_norm: qkNorm, tie_word_embeddings: tied });
      const lora: LoraConfig = { rank: 3, alpha: 5, dropout: 0, targets: [...LORA_TARGETS] };
      const params = testParameters(config, 3);
      const { layout, adapter } = testAdapter(config, lora, 4);
      const model = await TrainingModel.create(gpu, config, {
        batchSize: B,
        seqLen: T,
        params,
        lora,
        adapter,
      });
      try {
        const batch = randomBatch(new Rng(qkNorm ? 21 : 22), B, T, config.vocab_size);
        const ref = modelLossAndGrads(
          config,
          toFloat64Params(mergeLora(params, layout, adapter)),
          batch,
        );
        const want = loraGradsFromDense(layout, adapter, ref.grads);
        const got = await model.lossAndGrads(batch);
        // The GPU computes x W^T + s (x A^T) B^T, the reference x W'^T with W'
        // rounded once to f32: both ~1e-7 relative per projection. Measured
        // here (lavapipe, 2026-12-03): loss 0.9e-7..1.5e-7 relative, gradients
        // 1.8e-6..2.4e-6 x max|ref| per tensor. Tolerances as in
        // train_model_test.ts (1e-6; 2e-5 x max|ref|) leave ~7x; a wrong slice,
        // scale or missing term shows as >= 1e-2.
        assert(
          Math.abs(got.loss - ref.loss) < 1e-6 * ref.loss,
          `loss ${got.loss} vs ${ref.loss}`,
        );
        assertEquals([...got.grads.keys()], layout.tensors.map((t) => t.name));
        for (const t of layout.tensors) {
          const e = want.get(t.name)!;
          assert(maxAbs(e) > 0, `${t.name}: a zero reference gradient tests nothing`);
          assertClose(got.grads.get(t.name)!, e, { atol: 2e-5 * maxAbs(e), rtol: 0 }, t.name);
        }
      } finally {
        model.destroy();
      }
    },
  );
}

gpuTest(
  "LoRA training: base frozen, adapter updated, optimizer state only for the adapter",
  async () => {
    const config = tinyConfig();
    const lora: LoraConfig = { rank: 2, alpha: 4, dropout: 0, targets: ["q", "v", "down"] };
    const params = testParameters(config, 5);
    const model = await TrainingModel.create(gpu, config, {
      batchSize: B,
      seqLen: T,
      params,
      lora,
      seed: 9,
    });
    const full = await TrainingModel.create(gpu, config, { batchSize: B, seqLen: T, params });
    let adamw: AdamW | undefined;
    try {
      const layout = loraLayout(config, lora);
      const trainable = model.trainable();
      assertEquals(trainable.floats, layout.floats);
      assertEquals(trainable.tensors.map((t) => t.name), layout.tensors.map((t) => t.name));
      // rank 2 on q [32 -> 32], v [32 -> 16], down [48 -> 32] in 2 layers.
      assertEquals(
        loraParameterCount(layout),
        2 * (2 * 32 + 32 * 2 + 2 * 32 + 16 * 2 + 2 * 48 + 32 * 2),
      );
      // No base gradient buffer: the full model holds more, by the base's
      // gradients less what the adapter adds (its tensors and gradients, t and
      // dt, a scratch, the uniforms of its ~50 dispatches: ~12 KB here against
      // 71 KB of gradients). 80% of the gradients' size fails if they exist.
      const baseFloats = full.trainable().floats;
      assert(
        full.gpuBytes - model.gpuBytes >= 0.8 * 4 * baseFloats,
        `LoRA model ${model.gpuBytes} bytes vs full ${full.gpuBytes} (gradients ${4 * baseFloats})`,
      );
      const before = await model.getAdapter();
      adamw = await AdamW.create(gpu, trainable, {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weightDecay: 0.01,
        gradClip: 1,
      });
      assertEquals(adamw.gpuBytes >= 2 * layout.floats * 4, true);
      assert(adamw.gpuBytes < baseFloats * 4, `optimizer ${adamw.gpuBytes} bytes`);
      const batch = randomBatch(new Rng(1), B, T, config.vocab_size);
      const losses: number[] = [];
      for (let i = 0; i < 5; i++) {
        model.forwardBackward([batch]);
        adamw.step(1e-2);
        losses.push(await model.readLoss());
      }
      assert(losses[4] < losses[0], `loss did not fall: ${losses}`);
      const after = await model.getAdapter();
      const base = await model.getParameters();
      for (const [name, t] of params) assertEquals(base.get(name), t, `${name} changed`);
      let moved = 0;
      for (const [name, t] of after) {
        for (let i = 0; i < t.length; i++) if (t[i] !== before.get(name)![i]) moved++;
      }
      assert(moved > loraParameterCount(layout) / 2, `only ${moved} adapter values moved`);
    } finally {
      adamw?.destroy();
      model.destroy();
      full.destroy();
    }
  },
);

gpuTest(
  "LoRA dropout: evaluation sees the whole adapter; the gradient is the masked loss's",
  async () => {
    const config = tinyConfig();
    const lora: LoraConfig = { rank: 3, alpha: 5, dropout: 0.3, targets: [...LORA_TARGETS] };
    const params = testParameters(config, 3);
    const { layout, adapter } = testAdapter(config, lora, 4);
    const model = await TrainingModel.create(gpu, config, {
      batchSize: B,
      seqLen: T,
      params,
      lora,
      adapter,
    });
    try {
      const batch = randomBatch(new Rng(31), B, T, config.vocab_size);
      // Evaluation: no dropout, so the merged reference's loss.
      const ref = modelLossAndGrads(
        config,
        toFloat64Params(mergeLora(params, layout, adapter)),
        batch,
      );
      const { lossSum, count } = await model.evalLoss(batch);
      const evalLoss = lossSum / count;
      assert(Math.abs(evalLoss - ref.loss) < 1e-6 * ref.loss, `eval ${evalLoss} vs ${ref.loss}`);
      // Training drops inputs: another loss, the same for the same step, another for the next.
      const lossAt = async (step: number) => {
        model.forwardBackward([batch], { dropoutStep: step });
        return await model.readLoss();
      };
      const l5 = await lossAt(5);
      assert(Math.abs(l5 - evalLoss) > 1e-4, `dropout changed nothing: ${l5} vs ${evalLoss}`);
      assertEquals(await lossAt(5), l5);
      assert(await lossAt(6) !== l5, "step 6 drew step 5's mask");

      // The gradient at step 5's mask against central differences of that
      // loss along a random direction v in layer 0's adapters (whose gradient
      // passes through every later layer's dropout backward).
      model.forwardBackward([batch], { dropoutStep: 5 });
      const flat = await model.readGradients();
      const rng = new Rng(77);
      const v = new Map<string, Float32Array>();
      let slope = 0;
      for (const t of layout.tensors) {
        const dir = new Float32Array(t.size);
        if (t.name.includes("layers.0.")) {
          for (let i = 0; i < t.size; i++) {
            dir[i] = rng.normal();
            slope += dir[i] * flat[t.offset + i];
          }
        }
        v.set(t.name, dir);
      }
      // Step so the loss moves by ~0.01: f32 rounding of the loss (~4e-7) is
      // then 4e-5 of the difference, and the curvature term O(eps^2) is below
      // that at these scales; 1e-2 relative leaves room while a mask missed in
      // the backward changes the slope by tens of percent.
      const eps = 0.01 / Math.abs(slope);
      const shifted = (sign: number) =>
        new Map([...adapter].map(([n, a]) => [n, a.map((x, i) => x + sign * eps * v.get(n)![i])]));
      model.setAdapter(shifted(1));
      const up = await lossAt(5);
      model.setAdapter(shifted(-1));
      const down = await lossAt(5);
      const fd = (up - down) / (2 * eps);
      assert(Math.abs(fd - slope) < 1e-2 * Math.abs(slope), `slope ${slope} vs differences ${fd}`);
    } finally {
      model.destroy();
    }
  },
);

Deno.test({
  name: "LoRA: the device is released",
  ...GPU_TEST,
  fn: () => gpu.destroy(),
});
