/**
 * Fused AdamW (kernels/adamw.ts): three steps against the float64 reference
 * `adamwStep`, with and without weight decay, with a clip factor != 1, over
 * sizes that take scalar and vec4 lanes.
 *
 * Tolerances. Per step each quantity takes a few f32 roundings (2^-24
 * relative each). v is a sum of positive terms: rtol 1e-5 (atol 1e-9 for
 * v near 0). m sums (1 - b1) b1^k g_k of both signs, which may cancel, so its
 * error is absolute: a few ulp of the terms (|0.1 g| < ~0.5): atol 1e-7,
 * rtol 1e-5. The update
 * lr * mhat / (sqrt(vhat) + eps) is O(lr) with relative error ~1e-6, and p
 * itself (|p| ~ 1) is rounded each step, so after three steps p is within a few
 * ulp: atol 1e-6, rtol 1e-6. A wrong bias correction or a missing decay moves
 * p by ~lr * wd ~ 1e-3 or more; a wrong gradScale changes m by its ratio.
 */
import { assertClose, assertEquals } from "./assert.ts";
import { GPU_TEST, gpuTest, submitPass } from "./helpers.ts";
import { Gpu } from "../kernels/runtime.ts";
import { adamw, adamwHyper } from "../kernels/adamw.ts";
import * as ref from "../model/reference.ts";
import { Rng } from "../util/random.ts";

const gpu = await Gpu.request();
const P_TOL = { atol: 1e-6, rtol: 1e-6 };
const M_TOL = { atol: 1e-7, rtol: 1e-5 };
const V_TOL = { atol: 1e-9, rtol: 1e-5 };

Deno.test("adamwHyper computes the bias corrections in float64", () => {
  const h = adamwHyper({
    lr: 3e-4,
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weightDecay: 0.1,
    step: 2,
  });
  assertEquals(h.length, 12, "10 settings, padded to whole vec4s");
  assertEquals(
    Array.from(h),
    Array.from(
      new Float32Array([3e-4, 0.9, 0.999, 1e-8, 0.1, 0.19, 1 - 0.999 ** 2, 0.1, 0.001, 0, 0, 0]),
    ),
  );
});

const cases = [
  { n: 1, decay: true, gradScale: 1 },
  { n: 7, decay: false, gradScale: 0.37 },
  { n: 33 * 130, decay: true, gradScale: 0.37 },
  { n: 4096, decay: false, gradScale: 1 },
  { n: 4096, decay: true, gradScale: 0.37, vec: 1 as const },
];

for (const c of cases) {
  const name = `n=${c.n} ${c.decay ? "decay" : "no decay"} gradScale=${c.gradScale}${
    c.vec ? " scalar" : ""
  }`;
  gpuTest(`adamw: three steps match the reference: ${name}`, async () => {
    const { n } = c;
    const rng = new Rng(n + (c.decay ? 1 : 0));
    const p0 = new Float32Array(n).map(() => rng.normal());
    const param = gpu.createBuffer(p0, "param");
    const grad = gpu.createBuffer(n * 4, "grad");
    const m = gpu.createBuffer(n * 4, "m");
    const v = gpu.createBuffer(n * 4, "v");
    const hyper = gpu.createBuffer(
      adamwHyper({ lr: 1, beta1: 0, beta2: 0, eps: 0, weightDecay: 0, step: 1 }),
    );
    const gradScale = gpu.createBuffer(new Float32Array([c.gradScale]), "gradScale");
    const d = await adamw(gpu, {
      param,
      grad,
      m,
      v,
      n,
      decay: c.decay,
      hyper,
      gradScale,
      options: c.vec ? { vec: c.vec } : undefined,
    });
    const pRef = Float64Array.from(p0);
    const mRef = new Float64Array(n);
    const vRef = new Float64Array(n);
    for (let step = 1; step <= 3; step++) {
      // Gradients of mixed magnitudes, some exactly zero (eps then dominates).
      const g = new Float32Array(n).map((
        _,
        i,
      ) => (i % 5 === 4 ? 0 : rng.normal() * 10 ** -(i % 3)));
      const o = {
        step,
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weightDecay: c.decay ? 0.1 : 0,
      };
      gpu.write(grad, g);
      gpu.write(hyper, adamwHyper({ ...o, weightDecay: 0.1 })); // ignored without decay
      submitPass(gpu, d);
      const gScaled = Float64Array.from(g, (x) => x * Math.fround(c.gradScale));
      ref.adamwStep(pRef, gScaled, mRef, vRef, o);
    }
    assertClose(await gpu.readF32(param), pRef, P_TOL, "param");
    assertClose(await gpu.readF32(m), mRef, M_TOL, "m");
    assertClose(await gpu.readF32(v), vRef, V_TOL, "v");
  });
}

gpuTest("adamw with beta2 = 0.999 uses the float64 1 - beta2", async () => {
  // With 1 - f32(0.999) computed in f32 (1.2e-5 off), v would miss rtol 1e-5.
  const n = 64;
  const rng = new Rng(1);
  const g = new Float32Array(n).map(() => rng.normal());
  const param = gpu.createBuffer(n * 4);
  const m = gpu.createBuffer(n * 4);
  const v = gpu.createBuffer(n * 4);
  const o = { step: 1, lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0 };
  const d = await adamw(gpu, {
    param,
    grad: gpu.createBuffer(g),
    m,
    v,
    n,
    decay: false,
    hyper: gpu.createBuffer(adamwHyper(o)),
    gradScale: gpu.createBuffer(new Float32Array([1])),
  });
  submitPass(gpu, d);
  const pRef = new Float64Array(n);
  const mRef = new Float64Array(n);
  const vRef = new Float64Array(n);
  ref.adamwStep(pRef, Float64Array.from(g), mRef, vRef, o);
  assertClose(await gpu.readF32(v), vRef, { atol: 0, rtol: 1e-6 }, "v");
  assertClose(await gpu.readF32(param), pRef, { atol: 1e-9, rtol: 1e-5 }, "param");
});

Deno.test({
  name: "adamw: destroy the shared device",
  ...GPU_TEST,
  fn: () => gpu.destroy(),
});
