/**
 * RoPE kernels (kernels/rope.ts) against the float64 reference (model/reference.ts).
 *
 * Tolerance: atol 2e-6, rtol 1e-6. Each output is x1 cos - x2 sin with inputs
 * that are exact float32 values (the reference gets the same float32 inputs
 * widened to float64), cos/sin rounded once to float32 (relative 2^-24), two
 * products and a sum in f32: the error is below ~4 * 2^-24 * (|x1| + |x2|),
 * i.e. < 1e-6 for the N(0,1) inputs used here (|x| < 6). An angle computed in
 * f32 at position 30000 would be off by up to ~1e-3 rad, i.e. errors of ~1e-3,
 * so the large-pos0 cases check that the table really is float64-derived.
 */
import { assertClose } from "./assert.ts";
import { GPU_TEST, randomF32 } from "./helpers.ts";
import { Gpu, PassRecorder } from "../kernels/runtime.ts";
import { ropeBackward, ropeForward } from "../kernels/rope.ts";
import * as ref from "../model/reference.ts";
import { Rng } from "../util/random.ts";

const gpu = await Gpu.request();
const TOL = { atol: 2e-6, rtol: 1e-6 };

const cases = [
  { B: 1, T: 1, nHeads: 1, hd: 16, theta: 1e4, pos0: 0 },
  { B: 2, T: 7, nHeads: 3, hd: 32, theta: 1e4, pos0: 0 },
  { B: 1, T: 33, nHeads: 2, hd: 64, theta: 1e6, pos0: 0 },
  { B: 2, T: 33, nHeads: 4, hd: 96, theta: 1e6, pos0: 5 },
  { B: 1, T: 130, nHeads: 2, hd: 64, theta: 1e4, pos0: 30000 },
  { B: 2, T: 7, nHeads: 2, hd: 128, theta: 1e6, pos0: 32760 },
];

for (const c of cases) {
  const name = `B=${c.B} T=${c.T} heads=${c.nHeads} hd=${c.hd} theta=${c.theta} pos0=${c.pos0}`;
  // The device outlives each test (one Gpu per file), so its async ops and
  // resources are not this test's leaks.
  Deno.test({
    name: `rope forward and backward match the reference: ${name}`,
    ...GPU_TEST,
    fn: async () => {
      const rng = new Rng(1234 + c.T * 7 + c.hd);
      const n = c.B * c.T * c.nHeads * c.hd;
      const x = randomF32(rng, n);
      const dy = randomF32(rng, n);
      const xBuf = gpu.createBuffer(x, "x"); // [B, T, nHeads, hd]
      const dyBuf = gpu.createBuffer(dy, "dy"); // [B, T, nHeads, hd]
      const fwd = await ropeForward(gpu, { x: xBuf, ...c });
      const bwd = await ropeBackward(gpu, { dx: dyBuf, ...c });
      gpu.submit((enc) => {
        const pass = new PassRecorder(gpu, enc);
        pass.record([fwd, bwd]);
        pass.end();
      });
      const y = await gpu.readF32(xBuf);
      const dx = await gpu.readF32(dyBuf);
      const { B, T, nHeads, hd, theta, pos0 } = c;
      assertClose(y, ref.ropeForward(Float64Array.from(x), B, T, nHeads, hd, theta, pos0), TOL);
      assertClose(dx, ref.ropeBackward(Float64Array.from(dy), B, T, nHeads, hd, theta, pos0), TOL);
      xBuf.destroy();
      dyBuf.destroy();
    },
  });
}

Deno.test({
  name: "rope: re-recording the same dispatch rotates again (forward then backward is identity)",
  ...GPU_TEST,
  fn: async () => {
    const c = { B: 1, T: 9, nHeads: 2, hd: 32, theta: 1e6, pos0: 100 };
    const x = randomF32(new Rng(7), c.B * c.T * c.nHeads * c.hd);
    const buf = gpu.createBuffer(x, "x");
    const fwd = await ropeForward(gpu, { x: buf, ...c });
    const bwd = await ropeBackward(gpu, { dx: buf, ...c });
    gpu.submit((enc) => {
      const pass = new PassRecorder(gpu, enc);
      pass.record([fwd, fwd, bwd, bwd]);
      pass.end();
    });
    // R(-a) R(-a) R(a) R(a) = I up to four f32 roundings per element.
    assertClose(await gpu.readF32(buf), x, { atol: 4e-6, rtol: 4e-6 });
    buf.destroy();
  },
});

Deno.test({
  name: "rope: destroy the shared device",
  ...GPU_TEST,
  fn: () => gpu.destroy(),
});
