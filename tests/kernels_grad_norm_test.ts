/**
 * Global gradient norm and clip factor (kernels/grad_norm.ts) against the
 * float64 reference (`gradNorm`, `clipScale`), over tensors of odd sizes
 * (scalar and vec4 loads, partial blocks, a size past one block).
 *
 * Tolerance: rtol 1e-5 on the sum of squares. Each of the ~1.1e5 squares is
 * rounded once (2^-24 relative) and summed in f32 along a path of at most
 * 16 (per thread) + 8 (tree) + 24 (final) additions of positive terms, so
 * the relative error is below ~48 * 2^-24 ~ 3e-6. The clip factor adds a
 * sqrt and a division: rtol 1e-5 as well. Dropping one tensor or one block
 * changes the sum by far more than 1e-5 relative (each tensor's last entry is 1,
 * against a total of ~300).
 */
import { assertClose, assertEquals } from "./assert.ts";
import { GPU_TEST, gpuTest, submitPass } from "./helpers.ts";
import { Gpu } from "../kernels/runtime.ts";
import { clipScale, gradNormPartialsSize, gradNormSquared } from "../kernels/grad_norm.ts";
import { ADAMW_HYPER_FLOATS, adamwHyper } from "../kernels/adamw.ts";
import * as ref from "../model/reference.ts";
import { Rng } from "../util/random.ts";

const gpu = await Gpu.request();

Deno.test("gradNormPartialsSize counts 4096-entry blocks per tensor", () => {
  assertEquals(gradNormPartialsSize([]), 0);
  assertEquals(gradNormPartialsSize([{ n: 1 }, { n: 4096 }, { n: 4097 }]), 1 + 1 + 2);
});

gpuTest(
  "grad norm over tensors of odd sizes matches the reference, bit for bit on reruns",
  async () => {
    const rng = new Rng(2024);
    const sizes = [1, 7, 4097, 33 * 130, 10000, 65536 + 3, 12];
    const grads = sizes.map((n, k) => new Float32Array(n).map(() => rng.normal() * (k + 1) * 0.01));
    // The last entry of every tensor (so the last block, partial or not) is large
    // enough that dropping it moves the sum by > 1e-3 relative.
    for (const g of grads) g[g.length - 1] = 1;
    // One tensor lives in a bigger buffer than its n: only n entries count.
    const tensors = grads.map((g, k) => {
      const buffer = k === 1
        ? gpu.createBuffer(new Float32Array([...g, 1e3, 1e3]))
        : gpu.createBuffer(g);
      return { buffer, n: g.length };
    });
    const partials = gpu.createBuffer(gradNormPartialsSize(tensors) * 4, "partials");
    const total = gpu.createBuffer(4, "total");
    const ds = await gradNormSquared(gpu, { tensors, partials, total });
    submitPass(gpu, ds);
    const first = (await gpu.readF32(total))[0];
    const norm = ref.gradNorm(grads.map((g) => Float64Array.from(g)));
    assertClose([first], [norm * norm], { atol: 0, rtol: 1e-5 }, "sum of squares");
    gpu.write(total, new Float32Array([123]));
    submitPass(gpu, ds);
    const second = await gpu.readF32(total);
    assertEquals(
      new Uint32Array(second.buffer)[0],
      new Uint32Array(new Float32Array([first]).buffer)[0],
    );
  },
);

gpuTest("clip scale on the GPU matches the reference (clipping, no clipping, off)", async () => {
  const rng = new Rng(9);
  const g = new Float32Array(5000).map(() => rng.normal());
  const tensors = [{ buffer: gpu.createBuffer(g), n: g.length }];
  const partials = gpu.createBuffer(gradNormPartialsSize(tensors) * 4);
  const total = gpu.createBuffer(4, "total");
  const scale = gpu.createBuffer(4, "scale");
  const hyper = gpu.createBuffer(ADAMW_HYPER_FLOATS * 4, "adamw hyper");
  const norm = ref.gradNorm([Float64Array.from(g)]); // ~70
  // One prepared dispatch serves every threshold: it reads it from the hyper buffer.
  const ds = [
    ...await gradNormSquared(gpu, { tensors, partials, total }),
    await clipScale(gpu, { total, hyper, scale }),
  ];
  for (const maxNorm of [1, 0.5 * norm, norm * 2, 0]) {
    const settings = { lr: 1, beta1: 0.9, beta2: 0.99, eps: 1e-8, weightDecay: 0, step: 1 };
    gpu.write(hyper, adamwHyper({ ...settings, gradClip: maxNorm }));
    gpu.write(scale, new Float32Array([-1]));
    submitPass(gpu, ds);
    const s = await gpu.readF32(scale);
    assertClose(s, [ref.clipScale(norm, maxNorm)], { atol: 0, rtol: 1e-5 }, `maxNorm ${maxNorm}`);
  }
});

Deno.test({
  name: "grad-norm: destroy the shared device",
  ...GPU_TEST,
  fn: () => gpu.destroy(),
});
