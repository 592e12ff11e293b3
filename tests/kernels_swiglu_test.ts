/**
 * SwiGLU kernels (kernels/swiglu.ts) against the float64 reference.
 *
 * Tolerance: atol 1e-6, rtol 1e-5. Inputs are exact float32 values; each
 * output is a handful of f32 roundings plus one exp, whose WGSL error bound is
 * (3 + 2|x|) ulp, i.e. < 2e-6 relative for the |x| <= ~8 of most data here, so
 * 1e-5 relative holds with margin. At the far ends (|g| = 20, 100) sigmoid
 * saturates to exactly 0 or 1 in f32 while the true value differs by < 2e-9
 * relative, well inside the tolerance. A wrong formula (s instead of silu', a
 * missing up) is off by O(1).
 */
import { assertClose, assertEquals } from "./assert.ts";
import { GPU_TEST, randomF32, submitPass } from "./helpers.ts";
import { Gpu } from "../kernels/runtime.ts";
import { swigluBackward, swigluForward } from "../kernels/swiglu.ts";
import * as ref from "../model/reference.ts";
import { Rng } from "../util/random.ts";

const gpu = await Gpu.request();
const TOL = { atol: 1e-6, rtol: 1e-5 };

const f64 = (a: Float32Array) => Float64Array.from(a);

// n = 910 is not a multiple of 4 (scalar lanes); 33 * 96 is (vec4), and is
// also run with forced scalar lanes; 70001 spans many workgroups.
const cases: { n: number; vec?: 1 | 4 }[] = [
  { n: 1 },
  { n: 7 },
  { n: 910 },
  { n: 33 * 96 },
  { n: 33 * 96, vec: 1 },
  { n: 70001 },
];

for (const { n, vec } of cases) {
  // The device outlives each test (one Gpu per file), so its async ops and
  // resources are not this test's leaks.
  Deno.test({
    name: `swiglu forward and backward match the reference: n=${n}${vec ? " scalar" : ""}`,
    ...GPU_TEST,
    fn: async () => {
      const rng = new Rng(3 + n);
      const gate = randomF32(rng, n, 3);
      // Saturated ends and zero, where a naive sigmoid would give NaN or inf.
      const ends = [0, -20, 20, -100, 100, -90];
      for (let i = 0; i < Math.min(n, ends.length); i++) gate[n - 1 - i] = ends[i];
      const up = randomF32(rng, n);
      const dh = randomF32(rng, n);
      const gateBuf = gpu.createBuffer(gate, "gate");
      const upBuf = gpu.createBuffer(up, "up");
      const hBuf = gpu.createBuffer(n * 4, "h");
      const dhBuf = gpu.createBuffer(dh, "dh");
      const dgateBuf = gpu.createBuffer(n * 4, "dgate");
      const dupBuf = gpu.createBuffer(n * 4, "dup");
      const options = vec ? { vec } : undefined;
      const fwd = await swigluForward(gpu, { gate: gateBuf, up: upBuf, h: hBuf, n, options });
      const bwd = await swigluBackward(gpu, {
        dh: dhBuf,
        gate: gateBuf,
        up: upBuf,
        dgate: dgateBuf,
        dup: dupBuf,
        n,
        options,
      });
      submitPass(gpu, [fwd, bwd]);
      const h = await gpu.readF32(hBuf);
      assertClose(h, ref.swigluForward(f64(gate), f64(up)), TOL, "h");
      const g = ref.swigluBackward(f64(dh), f64(gate), f64(up));
      assertClose(await gpu.readF32(dgateBuf), g.dgate, TOL, "dgate");
      assertClose(await gpu.readF32(dupBuf), g.dup, TOL, "dup");
      assertEquals(h.every(Number.isFinite), true, "finite at the saturated ends");
    },
  });
}

Deno.test({
  name: "swiglu: destroy the shared device",
  ...GPU_TEST,
  fn: () => gpu.destroy(),
});
