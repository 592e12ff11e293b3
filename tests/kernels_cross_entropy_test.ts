/**
 * Fused cross-entropy (kernels/cross_entropy.ts) against the float64
 * reference: V = 11, 100, 6400 and 2048 + 7 (scalar and vec4 lanes, fewer
 * elements than threads and many per thread), masks with zeros and fractional
 * weights, scale = 1 / sum(mask), in place and into a separate buffer, the
 * latter also with padded rows (`dlogitsStride`: the padding must come out 0).
 *
 * Tolerances, from the f32 arithmetic (logits ~ N(0, 2^2), so |z| < ~10):
 * - lse: a sum of V terms <= 1 merged by a tree, relative error ~ log2(V)
 *   2^-24, plus log and add: a few ulp of |lse| ~ 10, i.e. < 1e-5 absolute.
 *   rowLoss = m (lse - z_t) inherits that: atol 2e-5, rtol 1e-5; the loss is a
 *   weighted mean of those: atol 2e-5.
 * - dlogits = c m (exp(z - lse) - onehot): exp's WGSL bound (3 + 2|x|) ulp is
 *   < 1.5e-6 relative for |x| < 10, and the lse error adds ~1e-6; the
 *   subtraction at the target may cancel, so the bound is absolute in units
 *   of the row coefficient: atol 5e-6 * max(c m), rtol 1e-5.
 * A wrong normalization, a missing mask or a wrong target column is off by
 * O(c m) or more.
 */
import { assert, assertClose, assertEquals, assertRejects } from "./assert.ts";
import { GPU_TEST, gpuTest, submitPass } from "./helpers.ts";
import { Gpu } from "../kernels/runtime.ts";
import { crossEntropy } from "../kernels/cross_entropy.ts";
import * as ref from "../model/reference.ts";
import { Rng } from "../util/random.ts";

const gpu = await Gpu.request();

interface Case {
  N: number;
  V: number;
  inPlace: boolean;
  vec?: 1 | 4;
  /** dlogits row stride (padded rows). */
  stride?: number;
}

const cases: Case[] = [
  { N: 1, V: 11, inPlace: false },
  { N: 7, V: 11, inPlace: true },
  { N: 33, V: 100, inPlace: false },
  { N: 33, V: 100, inPlace: true, vec: 1 },
  { N: 7, V: 6400, inPlace: true },
  { N: 33, V: 6400, inPlace: false },
  { N: 7, V: 2048 + 7, inPlace: true },
  { N: 7, V: 11, inPlace: false, stride: 12 },
  { N: 33, V: 100, inPlace: false, stride: 108 },
  { N: 9, V: 2048 + 7, inPlace: false, stride: 2048 + 8 },
];

// Each case in both layouts: 256 threads per row (GPU) and 8 (CPU drivers).
for (
  const c of cases.flatMap((
    c,
  ) => [{ ...c, tuning: "gpu" as const }, { ...c, tuning: "fallback" as const }])
) {
  const { N, V, inPlace } = c;
  const S = c.stride ?? V;
  const name = `N=${N} V=${V}${inPlace ? " in place" : ""}${c.vec ? " scalar" : ""}` +
    `${c.stride ? ` stride ${S}` : ""} ${c.tuning}`;
  gpuTest(`cross-entropy matches the reference: ${name}`, async () => {
    const rng = new Rng(N * 7919 + V);
    const logits = new Float32Array(N * V).map(() => 2 * rng.normal()); // [N, V]
    const targets = new Uint32Array(N).map(() => rng.nextInt(V));
    // Weights: zeros (prompt tokens), ones, and fractional; at least one non-zero.
    const choices = [0, 1, 1, 0.25, 0.5];
    const mask = new Float32Array(N).map(() => choices[rng.nextInt(choices.length)]);
    mask[0] = 0.75;
    let count = 0;
    for (const m of mask) count += m;
    const scale = new Float32Array([1 / count]);
    const logitsBuf = gpu.createBuffer(logits, "logits");
    // Garbage first: every element, padding included, must be written.
    const dlogitsBuf = inPlace
      ? logitsBuf
      : gpu.createBuffer(new Float32Array(N * S).fill(NaN), "dlogits");
    const rowLossBuf = gpu.createBuffer(N * 4, "rowLoss");
    const lossBuf = gpu.createBuffer(new Float32Array([0.5]), "loss"); // the kernel adds to it
    const ds = await crossEntropy(gpu, {
      logits: logitsBuf,
      targets: gpu.createBuffer(targets, "targets"),
      mask: gpu.createBuffer(mask, "mask"),
      scale: gpu.createBuffer(scale, "scale"),
      dlogits: dlogitsBuf,
      rowLoss: rowLossBuf,
      loss: lossBuf,
      N,
      V,
      dlogitsStride: c.stride,
      options: { vec: c.vec, tuning: c.tuning },
    });
    submitPass(gpu, ds);

    const z = Float64Array.from(logits);
    const m64 = Float64Array.from(mask);
    const fwd = ref.crossEntropyForward(z, targets, m64, N, V);
    const rowLoss = await gpu.readF32(rowLossBuf);
    assertClose(rowLoss, fwd.rowLoss.map((l, i) => l * mask[i]), { atol: 2e-5, rtol: 1e-5 });
    const loss = (await gpu.readF32(lossBuf))[0];
    assertClose([loss], [0.5 + fwd.loss], { atol: 2e-5, rtol: 1e-6 }, "loss");
    const dzPadded = await gpu.readF32(dlogitsBuf, 0, N * S);
    const dz = new Float32Array(N * V);
    for (let i = 0; i < N; i++) {
      dz.set(dzPadded.subarray(i * S, i * S + V), i * V);
      const pad = dzPadded.subarray(i * S + V, (i + 1) * S);
      assert(pad.every((v) => Object.is(v, 0)), `row ${i}: padding written as zeros`);
    }
    const maxCoef = Math.max(...mask) * scale[0];
    assertClose(
      dz,
      ref.crossEntropyBackward(z, targets, m64, N, V),
      { atol: 5e-6 * maxCoef, rtol: 1e-5 },
      "dlogits",
    );
    for (let i = 0; i < N; i++) {
      if (mask[i] === 0) {
        assert(dz.subarray(i * V, (i + 1) * V).every((v) => v === 0), `row ${i} masked out`);
      }
    }
    if (inPlace) return;
    // Bitwise determinism: the same inputs again give the same bits.
    gpu.write(lossBuf, new Float32Array([0.5]));
    submitPass(gpu, ds);
    assertEquals(await gpu.readF32(rowLossBuf), rowLoss, "rowLoss bits");
    assertEquals((await gpu.readF32(lossBuf))[0], loss, "loss bits");
    assertEquals(await gpu.readF32(dlogitsBuf, 0, N * S), dzPadded, "dlogits bits");
    if (S % 4 !== 0 || (V % 4 === 0 && c.vec !== 1)) return;
    // Scalar lanes into rows a multiple of 4 wide store 4 elements at a time
    // (the default, taken above); one element a store gives the same bits.
    dlogitsBuf.destroy();
    const scalarBuf = gpu.createBuffer(new Float32Array(N * S).fill(NaN), "dlogits");
    const scalar = await crossEntropy(gpu, {
      logits: logitsBuf,
      targets: gpu.createBuffer(targets, "targets"),
      mask: gpu.createBuffer(mask, "mask"),
      scale: gpu.createBuffer(scale, "scale"),
      dlogits: scalarBuf,
      rowLoss: rowLossBuf,
      loss: lossBuf,
      N,
      V,
      dlogitsStride: c.stride,
      options: { vec: c.vec, tuning: c.tuning, store4: false },
    });
    submitPass(gpu, scalar);
    assertEquals(await gpu.readF32(scalarBuf, 0, N * S), dzPadded, "one element a store");
  });
}

gpuTest("cross-entropy loss adds across micro-batches and flags bad targets", async () => {
  const N = 5, V = 11;
  const rng = new Rng(8);
  const logits = new Float32Array(N * V).map(() => rng.normal());
  const targets = new Uint32Array([1, 2, 3, 4, 5]);
  const mask = new Float32Array([1, 1, 0, 1, 1]);
  const scale = new Float32Array([1 / 8]); // as if a second micro-batch held 4 more
  const logitsBuf = gpu.createBuffer(logits, "logits");
  const targetsBuf = gpu.createBuffer(targets, "targets");
  const lossBuf = gpu.createBuffer(4, "loss");
  const ds = await crossEntropy(gpu, {
    logits: logitsBuf,
    targets: targetsBuf,
    mask: gpu.createBuffer(mask, "mask"),
    scale: gpu.createBuffer(scale, "scale"),
    dlogits: gpu.createBuffer(N * V * 4, "dlogits"),
    rowLoss: gpu.createBuffer(N * 4, "rowLoss"),
    loss: lossBuf,
    N,
    V,
  });
  submitPass(gpu, ds);
  submitPass(gpu, ds);
  const fwd = ref.crossEntropyForward(Float64Array.from(logits), targets, mask, N, V);
  // Two micro-batches of 4 masked targets each, scale 1/8: the mean over 8.
  assertClose(await gpu.readF32(lossBuf), [fwd.loss], { atol: 2e-5, rtol: 1e-6 });
  // A target outside [0, V) on a masked-in row makes the loss NaN, not a silent value;
  // on a masked-out row it is ignored.
  gpu.write(targetsBuf, new Uint32Array([1, 2, 99, 4, 5]));
  gpu.write(lossBuf, new Float32Array([0]));
  submitPass(gpu, ds);
  assert(Number.isFinite((await gpu.readF32(lossBuf))[0]), "masked-out bad target ignored");
  gpu.write(targetsBuf, new Uint32Array([1, 2, 3, 4, 11]));
  submitPass(gpu, ds);
  assert(Number.isNaN((await gpu.readF32(lossBuf))[0]), "bad target gives NaN");
});

gpuTest("cross-entropy refuses vec4 lanes it cannot use, saying why", async () => {
  const b = gpu.createBuffer(4 * 8 * 12, "any");
  const args = { logits: b, targets: b, mask: b, scale: b, rowLoss: b, loss: b, N: 2, V: 8 };
  await assertRejects(
    () => crossEntropy(gpu, { ...args, V: 7, dlogits: b, options: { vec: 4 } }),
    RangeError,
    "vec4 needs V % 4 == 0",
  );
  const d = gpu.createBuffer(4 * 2 * 10, "dlogits");
  await assertRejects(
    () => crossEntropy(gpu, { ...args, dlogits: d, dlogitsStride: 10, options: { vec: 4 } }),
    RangeError,
    "vec4 needs dlogitsStride % 4 == 0 (got 10)",
  );
  b.destroy();
  d.destroy();
});

Deno.test({
  name: "cross-entropy: destroy the shared device",
  ...GPU_TEST,
  fn: () => gpu.destroy(),
});
