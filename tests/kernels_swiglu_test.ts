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

// gate and up come fused, row n = gate[n, :] then up[n, :] (the [Wg; Wu]
// projection's layout). I = 910 is not a multiple of 4 (scalar lanes); 96 is
// (vec4), and is also run with forced scalar lanes; N * I = 70001 spans many
// workgroups.
const cases: { N: number; I: number; vec?: 1 | 4 }[] = [
  { N: 1, I: 1 },
  { N: 1, I: 7 },
  { N: 3, I: 910 },
  { N: 33, I: 96 },
  { N: 33, I: 96, vec: 1 },
  { N: 7, I: 10001 },
];

for (const { N, I, vec } of cases) {
  // The device outlives each test (one Gpu per file), so its async ops and
  // resources are not this test's leaks.
  Deno.test({
    name: `swiglu forward and backward match the reference: N=${N} I=${I}${vec ? " scalar" : ""}`,
    ...GPU_TEST,
    fn: async () => {
      const n = N * I;
      const rng = new Rng(3 + n);
      const gate = randomF32(rng, n, 3);
      // Saturated ends and zero, where a naive sigmoid would give NaN or inf.
      const ends = [0, -20, 20, -100, 100, -90];
      for (let i = 0; i < Math.min(n, ends.length); i++) gate[n - 1 - i] = ends[i];
      const up = randomF32(rng, n);
      const dh = randomF32(rng, n);
      // The fused layout: row r is gate row r, then up row r.
      const gateUp = new Float32Array(2 * n);
      for (let r = 0; r < N; r++) {
        gateUp.set(gate.subarray(r * I, (r + 1) * I), 2 * r * I);
        gateUp.set(up.subarray(r * I, (r + 1) * I), (2 * r + 1) * I);
      }
      const guBuf = gpu.createBuffer(gateUp, "gate|up");
      const hBuf = gpu.createBuffer(n * 4, "h");
      const dhBuf = gpu.createBuffer(dh, "dh");
      const dguBuf = gpu.createBuffer(2 * n * 4, "d gate|up");
      const options = vec ? { vec } : undefined;
      const fwd = await swigluForward(gpu, { gateUp: guBuf, h: hBuf, N, I, options });
      const bwd = await swigluBackward(gpu, {
        dh: dhBuf,
        gateUp: guBuf,
        dGateUp: dguBuf,
        N,
        I,
        options,
      });
      submitPass(gpu, [fwd, bwd]);
      const h = await gpu.readF32(hBuf);
      assertClose(h, ref.swigluForward(f64(gate), f64(up)), TOL, "h");
      const g = ref.swigluBackward(f64(dh), f64(gate), f64(up));
      const dgu = await gpu.readF32(dguBuf);
      const dgate = new Float32Array(n);
      const dup = new Float32Array(n);
      for (let r = 0; r < N; r++) {
        dgate.set(dgu.subarray(2 * r * I, (2 * r + 1) * I), r * I);
        dup.set(dgu.subarray((2 * r + 1) * I, (2 * r + 2) * I), r * I);
      }
      assertClose(dgate, g.dgate, TOL, "dgate");
      assertClose(dup, g.dup, TOL, "dup");
      assertEquals(h.every(Number.isFinite), true, "finite at the saturated ends");
    },
  });
}

Deno.test({
  name: "swiglu: destroy the shared device",
  ...GPU_TEST,
  fn: () => gpu.destroy(),
});
