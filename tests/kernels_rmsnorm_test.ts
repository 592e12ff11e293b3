/**
 * RMSNorm kernels (kernels/rmsnorm.ts) against the float64 reference
 * (model/reference.ts), over H = 16, 96, 130, 512 (scalar and vec4 lanes, one
 * or several lanes per thread) and N = 1, 7, 33.
 *
 * Tolerances. Inputs are exact float32 values that the reference widens to
 * float64, so only the kernel's own rounding counts:
 * - forward: the sum of H squares in f32 (strided partial sums, then a tree) is
 *   off by at most ~log2(H) * 2^-24 relative, rstd by about half that plus a
 *   sqrt and a division, y by ~3 more roundings: well below 1e-6 relative;
 *   atol 1e-6, rtol 1e-5 (y is O(1)).
 * - backward dx = r (g - xhat dot / H): dot is a sum of H products of O(1)
 *   terms, absolute error ~ sqrt(H) 2^-24 * |terms|, and the subtraction may
 *   cancel, so the bound is absolute: atol 1e-5 for O(1) values, rtol 1e-5.
 * - dw sums N rows of O(1) products plus the previous dw: atol 1e-5, rtol 1e-5.
 * A real mistake (a missing r, a wrong mean, a wrong row) is off by O(0.1).
 */
import { assertClose, assertEquals } from "./assert.ts";
import { GPU_TEST, gpuTest, randomF32, submitPass } from "./helpers.ts";
import { Gpu } from "../kernels/runtime.ts";
import { addRmsnormForward, rmsnormBackward, rmsnormForward } from "../kernels/rmsnorm.ts";
import * as ref from "../model/reference.ts";
import { Rng } from "../util/random.ts";

const gpu = await Gpu.request();
const FWD_TOL = { atol: 1e-6, rtol: 1e-5 };
const BWD_TOL = { atol: 1e-5, rtol: 1e-5 };
const EPS = 1e-5;

const f64 = (a: Float32Array) => Float64Array.from(a);

for (const H of [16, 96, 130, 512]) {
  for (const N of [1, 7, 33]) {
    // Both layouts (GPU workgroups of 32..256 threads, the CPU driver's 8)
    // with scalar and, where H allows, vec4 lanes: one or several lanes per
    // thread, idle threads, partial last rounds.
    const paths = (["gpu", "fallback"] as const).flatMap((tuning) =>
      (H % 4 === 0 ? [1, 4] as const : [1] as const).map((vec) => ({ tuning, vec }))
    );
    for (const options of paths) {
      const tag = `N=${N} H=${H} ${options.tuning} vec${options.vec}`;
      gpuTest(`rmsnorm forward and backward match the reference: ${tag}`, async () => {
        const rng = new Rng(17 + N * 1000 + H);
        const x = randomF32(rng, N * H, 2, 0.3); // [N, H]
        const w = randomF32(rng, H, 0.5, 1); // [H]
        const dy = randomF32(rng, N * H); // [N, H]
        const dw0 = randomF32(rng, H); // previous dw: the kernel adds to it
        const xBuf = gpu.createBuffer(x, "x");
        const wBuf = gpu.createBuffer(w, "w");
        const yBuf = gpu.createBuffer(N * H * 4, "y");
        const rstdBuf = gpu.createBuffer(N * 4, "rstd");
        const dyBuf = gpu.createBuffer(dy, "dy");
        const dxBuf = gpu.createBuffer(N * H * 4, "dx");
        const dwBuf = gpu.createBuffer(dw0, "dw");
        const fwd = await rmsnormForward(gpu, {
          x: xBuf,
          w: wBuf,
          y: yBuf,
          rstd: rstdBuf,
          N,
          H,
          eps: EPS,
          options,
        });
        const bwd = await rmsnormBackward(gpu, {
          dy: dyBuf,
          x: xBuf,
          w: wBuf,
          rstd: rstdBuf,
          dx: dxBuf,
          dw: dwBuf,
          N,
          H,
          accumulateDx: false,
          options,
        });
        submitPass(gpu, [fwd, ...bwd]);
        const expected = ref.rmsnormForward(f64(x), f64(w), N, H, EPS);
        assertClose(await gpu.readF32(yBuf), expected.y, FWD_TOL, "y");
        assertClose(await gpu.readF32(rstdBuf), expected.rstd, FWD_TOL, "rstd");
        const g = ref.rmsnormBackward(f64(dy), f64(x), f64(w), expected.rstd, N, H);
        assertClose(await gpu.readF32(dxBuf), g.dx, BWD_TOL, "dx");
        assertClose(await gpu.readF32(dwBuf), g.dw.map((v, j) => v + dw0[j]), BWD_TOL, "dw");
      });
    }
  }
}

gpuTest("fused residual add + rmsnorm, dx accumulation, and bitwise determinism", async () => {
  const cases = [[7, 130, "gpu"], [7, 130, "fallback"], [33, 512, "gpu"], [
    33,
    512,
    "fallback",
  ]] as const;
  for (const [N, H, tuning] of cases) {
    const options = { tuning };
    const rng = new Rng(99 + H);
    const x = randomF32(rng, N * H);
    const delta = randomF32(rng, N * H);
    const w = randomF32(rng, H, 0.5, 1);
    const dy = randomF32(rng, N * H);
    const dx0 = randomF32(rng, N * H); // the kernel adds to this with accumulateDx
    const xBuf = gpu.createBuffer(x, "x");
    const deltaBuf = gpu.createBuffer(delta, "delta");
    const wBuf = gpu.createBuffer(w, "w");
    const yBuf = gpu.createBuffer(N * H * 4, "y");
    const rstdBuf = gpu.createBuffer(N * 4, "rstd");
    const dyBuf = gpu.createBuffer(dy, "dy");
    const dxBuf = gpu.createBuffer(dx0, "dx");
    const dwBuf = gpu.createBuffer(H * 4, "dw");
    const fwd = await addRmsnormForward(gpu, {
      x: xBuf,
      delta: deltaBuf,
      w: wBuf,
      y: yBuf,
      rstd: rstdBuf,
      N,
      H,
      eps: EPS,
      options,
    });
    const bwd = await rmsnormBackward(gpu, {
      dy: dyBuf,
      x: xBuf,
      w: wBuf,
      rstd: rstdBuf,
      dx: dxBuf,
      dw: dwBuf,
      N,
      H,
      accumulateDx: true,
      options,
    });
    submitPass(gpu, [fwd, ...bwd]);
    // x + delta is one f32 rounding, exactly what the kernel stores in place.
    const sum = x.map((v, i) => v + delta[i]);
    assertEquals(await gpu.readF32(xBuf), sum, "x += delta in place");
    const expected = ref.rmsnormForward(f64(sum), f64(w), N, H, EPS);
    const y1 = await gpu.readF32(yBuf);
    assertClose(y1, expected.y, FWD_TOL, "y");
    const g = ref.rmsnormBackward(f64(dy), f64(sum), f64(w), expected.rstd, N, H);
    const dx1 = await gpu.readF32(dxBuf);
    assertClose(dx1, g.dx.map((v, i) => v + dx0[i]), BWD_TOL, "dx accumulated");
    const dw1 = await gpu.readF32(dwBuf);
    assertClose(dw1, g.dw, BWD_TOL, "dw");

    // Same inputs again: bitwise the same outputs (fixed reduction order).
    gpu.write(xBuf, x);
    gpu.write(dxBuf, dx0);
    gpu.write(dwBuf, new Float32Array(H));
    submitPass(gpu, [fwd, ...bwd]);
    assertEquals(await gpu.readF32(yBuf), y1, "y bits");
    assertEquals(await gpu.readF32(dxBuf), dx1, "dx bits");
    assertEquals(await gpu.readF32(dwBuf), dw1, "dw bits");
  }
});

gpuTest(
  "rmsnorm backward over many rows uses several row chunks (dw adds across chunks)",
  async () => {
    // N = 2100 gives 3 rows per chunk and 700 chunks: stage two sums many partials.
    const N = 2100, H = 64;
    const rng = new Rng(5);
    const x = randomF32(rng, N * H);
    const w = randomF32(rng, H, 0.5, 1);
    const dy = randomF32(rng, N * H);
    const xBuf = gpu.createBuffer(x, "x");
    const wBuf = gpu.createBuffer(w, "w");
    const yBuf = gpu.createBuffer(N * H * 4, "y");
    const rstdBuf = gpu.createBuffer(N * 4, "rstd");
    const dyBuf = gpu.createBuffer(dy, "dy");
    const dxBuf = gpu.createBuffer(N * H * 4, "dx");
    const dwBuf = gpu.createBuffer(H * 4, "dw");
    const fwd = await rmsnormForward(gpu, {
      x: xBuf,
      w: wBuf,
      y: yBuf,
      rstd: rstdBuf,
      N,
      H,
      eps: EPS,
    });
    const bwd = await rmsnormBackward(gpu, {
      dy: dyBuf,
      x: xBuf,
      w: wBuf,
      rstd: rstdBuf,
      dx: dxBuf,
      dw: dwBuf,
      N,
      H,
      accumulateDx: false,
    });
    submitPass(gpu, [fwd, ...bwd]);
    const expected = ref.rmsnormForward(f64(x), f64(w), N, H, EPS);
    const g = ref.rmsnormBackward(f64(dy), f64(x), f64(w), expected.rstd, N, H);
    assertClose(await gpu.readF32(dxBuf), g.dx, BWD_TOL, "dx");
    // dw sums 2100 O(1) products: error ~ sqrt(2100) * 2^-24 * |terms| ~ 1e-5 at worst.
    assertClose(await gpu.readF32(dwBuf), g.dw, { atol: 5e-5, rtol: 1e-5 }, "dw");
  },
);

Deno.test({
  name: "rmsnorm: destroy the shared device",
  ...GPU_TEST,
  fn: () => gpu.destroy(),
});
