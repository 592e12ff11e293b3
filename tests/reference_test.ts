/**
 * Tests of the CPU oracle (`model/reference.ts`) and the parameter layout
 * (`model/params.ts`).
 *
 * Gradients are checked against central finite differences in float64,
 * `fd_i = (L(x + h e_i) - L(x - h e_i)) / (2h)` with `h = 1e-5`, at EVERY entry
 * of every tensor. The error is measured per tensor as
 *
 *   rel = ||g - fd||_2 / max(||g||_2, ||fd||_2, 1e-12)
 *
 * and must be below 1e-6. Why 1e-6 is safe and still strict: the truncation
 * error of a central difference is h^2 |L'''| / 6 ~ 1e-11 and the rounding
 * error eps |L| / h ~ 1e-16 * 3 / 1e-5 ~ 3e-11 per entry, against gradient
 * entries of 1e-3..1e-1 at the random points used here; so a correct backward
 * shows rel ~ 1e-9, while any real mistake (a missing term, a wrong index, a
 * wrong sign) shows rel > 1e-3.
 *
 * Op tests use the scalar loss `L = sum(out * R)` for a fixed random R, so
 * `dL/dout = R` exercises every output entry with a different weight.
 */
import {
  adamwStep,
  attentionBackward,
  attentionForward,
  clipScale,
  crossEntropyBackward,
  crossEntropyForward,
  embeddingBackward,
  embeddingForward,
  gradNorm,
  matmulDyTX,
  matmulDyW,
  matmulXWt,
  modelForward,
  modelLossAndGrads,
  rmsnormBackward,
  rmsnormForward,
  ropeBackward,
  ropeForward,
  swigluBackward,
  swigluForward,
  toFloat64Params,
} from "../model/reference.ts";
import { initParameters, initStd, parameterSpecs, totalParameters } from "../model/params.ts";
import { type ModelConfig, parameterCount, PRESETS } from "../model/config.ts";
import { Rng } from "../util/random.ts";
import type { Batch } from "../data/batch.ts";
import { assert, assertClose } from "./assert.ts";

const FD_STEP = 1e-5;
const FD_TOLERANCE = 1e-6;

/** Every |actual - expected| <= atol (absolute: each call states its scale). */
function assertNear(
  actual: ArrayLike<number>,
  expected: ArrayLike<number>,
  atol: number,
  what: string,
): void {
  assertClose(actual, expected, { atol, rtol: 0 }, what);
}

function randn(rng: Rng, n: number, std = 1, mean = 0): Float64Array {
  const a = new Float64Array(n);
  for (let i = 0; i < n; i++) a[i] = mean + std * rng.normal();
  return a;
}

function dot(a: Float64Array, b: Float64Array): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * b[i];
  return s;
}

function norm(a: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * a[i];
  return Math.sqrt(s);
}

/**
 * Central-difference gradient of `loss` with respect to every entry of `x`
 * (perturbed in place and restored), compared with `analytic` by the
 * per-tensor relative error described at the top. Returns that error.
 */
function checkGradient(
  what: string,
  x: Float64Array,
  analytic: Float64Array,
  loss: () => number,
): number {
  assert(
    x.length === analytic.length,
    `${what}: gradient length ${analytic.length} != ${x.length}`,
  );
  const fd = new Float64Array(x.length);
  for (let i = 0; i < x.length; i++) {
    const saved = x[i];
    x[i] = saved + FD_STEP;
    const lp = loss();
    x[i] = saved - FD_STEP;
    const lm = loss();
    x[i] = saved;
    fd[i] = (lp - lm) / (2 * FD_STEP);
  }
  const diff = new Float64Array(x.length);
  for (let i = 0; i < x.length; i++) diff[i] = analytic[i] - fd[i];
  const rel = norm(diff) / Math.max(norm(analytic), norm(fd), 1e-12);
  assert(
    rel < FD_TOLERANCE,
    `${what}: relative gradient error ${rel.toExponential(2)} >= ${FD_TOLERANCE} ` +
      `(|g| ${norm(analytic).toExponential(3)}, |fd| ${norm(fd).toExponential(3)})`,
  );
  return rel;
}

// ---------------------------------------------------------------------------
// Ops.

Deno.test("matmul: X W^T on a hand example, dY W and dY^T X against finite differences", () => {
  // x [2, 3], w [2, 3] -> y [2, 2]; y[m][n] = x[m] . w[n]
  const x = new Float64Array([1, 2, 3, 4, 5, 6]);
  const w = new Float64Array([1, 0, -1, 2, 1, 0]);
  assertNear(matmulXWt(x, w, 2, 3, 2), [-2, 4, -2, 13], 0, "y");

  const rng = new Rng(1);
  const M = 5, K = 7, N = 3;
  const a = randn(rng, M * K);
  const b = randn(rng, N * K);
  const R = randn(rng, M * N);
  const loss = () => dot(matmulXWt(a, b, M, K, N), R);
  checkGradient("matmul dx", a, matmulDyW(R, b, M, N, K), loss);
  checkGradient("matmul dw", b, matmulDyTX(R, a, M, N, K), loss);
});

Deno.test("embedding: lookup and scatter-add backward with repeated ids", () => {
  const V = 5, H = 3;
  const rng = new Rng(2);
  const w = randn(rng, V * H);
  const ids = [3, 1, 3, 0, 3];
  const out = embeddingForward(w, ids, H);
  assertNear(out.subarray(3, 6), w.subarray(3, 6), 0, "row 1 = w[1]");
  const R = randn(rng, ids.length * H);
  const dw = embeddingBackward(R, ids, V, H);
  assertNear(dw.subarray(2 * H, 3 * H), [0, 0, 0], 0, "unused token 2");
  checkGradient("embedding dw", w, dw, () => dot(embeddingForward(w, ids, H), R));
});

Deno.test("rmsnorm: hand value and gradients of x and w", () => {
  // x = [3, 4]: mean square 12.5, so y = x / sqrt(12.5) * w with eps = 0.
  const { y, rstd } = rmsnormForward(new Float64Array([3, 4]), new Float64Array([1, 2]), 1, 2, 0);
  assertNear(rstd, [1 / Math.sqrt(12.5)], 1e-15, "rstd");
  assertNear(y, [3 / Math.sqrt(12.5), 8 / Math.sqrt(12.5)], 1e-15, "y");

  const rng = new Rng(3);
  const N = 4, H = 6, eps = 1e-5;
  const x = randn(rng, N * H);
  const w = randn(rng, H, 0.3, 1);
  const R = randn(rng, N * H);
  const loss = () => dot(rmsnormForward(x, w, N, H, eps).y, R);
  const f = rmsnormForward(x, w, N, H, eps);
  const g = rmsnormBackward(R, x, w, f.rstd, N, H);
  checkGradient("rmsnorm dx", x, g.dx, loss);
  checkGradient("rmsnorm dw", w, g.dw, loss);
});

Deno.test("rope: hand values, position offset, and backward", () => {
  // hd = 4, theta = 100: pairs (0, 2) with freq 1 and (1, 3) with freq 100^(-1/2) = 0.1.
  const x = new Float64Array([1, 2, 3, 4, 1, 2, 3, 4]); // B=1, T=2, nHeads=1
  const y = ropeForward(x, 1, 2, 1, 4, 100);
  assertNear(y.subarray(0, 4), [1, 2, 3, 4], 1e-15, "position 0 is the identity");
  const c1 = Math.cos(1), s1 = Math.sin(1), c2 = Math.cos(0.1), s2 = Math.sin(0.1);
  assertNear(
    y.subarray(4, 8),
    [1 * c1 - 3 * s1, 2 * c2 - 4 * s2, 3 * c1 + 1 * s1, 4 * c2 + 2 * s2],
    1e-15,
    "position 1",
  );

  const rng = new Rng(4);
  const B = 2, T = 5, nHeads = 3, hd = 6, theta = 1e4;
  const a = randn(rng, B * T * nHeads * hd);
  // pos0 shifts every position: T = 2 at pos0 = 3 is rows t = 3, 4 of a run from 0.
  const full = ropeForward(a, B, T, nHeads, hd, theta);
  const tail = new Float64Array(2 * nHeads * hd);
  tail.set(a.subarray((3 * nHeads) * hd, (5 * nHeads) * hd));
  const shifted = ropeForward(tail, 1, 2, nHeads, hd, theta, 3);
  assertNear(shifted, full.subarray(3 * nHeads * hd, 5 * nHeads * hd), 1e-12, "pos0");

  const R = randn(rng, a.length);
  for (const pos0 of [0, 7]) {
    checkGradient(
      `rope dx pos0=${pos0}`,
      a,
      ropeBackward(R, B, T, nHeads, hd, theta, pos0),
      () => dot(ropeForward(a, B, T, nHeads, hd, theta, pos0), R),
    );
  }
});

Deno.test("attention: causal, GQA head mapping, lse, and gradients (nH = nKV, nH = 4 nKV; T = 1, 7)", () => {
  const rng = new Rng(5);
  for (const [nH, nKV] of [[2, 2], [4, 1]]) {
    for (const T of [1, 7]) {
      const B = 2, hd = 6;
      const q = randn(rng, B * T * nH * hd);
      const k = randn(rng, B * T * nKV * hd);
      const v = randn(rng, B * T * nKV * hd);
      const R = randn(rng, B * T * nH * hd);
      const f = attentionForward(q, k, v, B, T, nH, nKV, hd);
      const g = attentionBackward(R, q, k, v, f.out, f.lse, B, T, nH, nKV, hd);
      const loss = () => dot(attentionForward(q, k, v, B, T, nH, nKV, hd).out, R);
      // At T = 1 each row sees one key with weight 1, so dq and dk are exactly
      // zero (and checked to be); dv carries the gradient there.
      const tag = `nH=${nH} nKV=${nKV} T=${T}`;
      checkGradient(`attention dq ${tag}`, q, g.dq, loss);
      checkGradient(`attention dk ${tag}`, k, g.dk, loss);
      checkGradient(`attention dv ${tag}`, v, g.dv, loss);
    }
  }
});

Deno.test("attention: forward values", () => {
  const B = 1, T = 4, nH = 4, nKV = 2, hd = 2;
  // q = 0: uniform weights over the t + 1 visible keys, so lse = log(t + 1) and
  // out = the running mean of v; query heads 0, 1 read kv head 0, heads 2, 3 kv head 1.
  const q = new Float64Array(B * T * nH * hd);
  const rng = new Rng(6);
  const k = randn(rng, B * T * nKV * hd);
  const v = randn(rng, B * T * nKV * hd);
  const { out, lse } = attentionForward(q, k, v, B, T, nH, nKV, hd);
  for (let h = 0; h < nH; h++) {
    const kvh = Math.floor(h / 2);
    for (let t = 0; t < T; t++) {
      assertNear([lse[h * T + t]], [Math.log(t + 1)], 1e-15, `lse h=${h} t=${t}`);
      for (let d = 0; d < hd; d++) {
        let mean = 0;
        for (let j = 0; j <= t; j++) mean += v[(j * nKV + kvh) * hd + d] / (t + 1);
        assertNear([out[(t * nH + h) * hd + d]], [mean], 1e-15, `out h=${h} t=${t} d=${d}`);
      }
    }
  }

  // Two keys, hand softmax: q = [1, 0], k0 = [1, 0], k1 = [0, 2], hd = 2, scale 1/sqrt(2).
  const s0 = 1 / Math.SQRT2, s1 = 0;
  const p0 = Math.exp(s0) / (Math.exp(s0) + Math.exp(s1));
  const r = attentionForward(
    new Float64Array([0, 0, 1, 0]),
    new Float64Array([1, 0, 0, 2]),
    new Float64Array([10, 20, 30, 40]),
    1,
    2,
    1,
    1,
    2,
  );
  assertNear(r.out.subarray(2), [p0 * 10 + (1 - p0) * 30, p0 * 20 + (1 - p0) * 40], 1e-13, "t=1");
  assertNear([r.lse[1]], [Math.log(Math.exp(s0) + Math.exp(s1))], 1e-15, "lse t=1");

  // GQA equals full attention with each kv head copied to its query heads.
  const T2 = 5, hd2 = 4;
  const q2 = randn(rng, 2 * T2 * nH * hd2);
  const k2 = randn(rng, 2 * T2 * nKV * hd2);
  const v2 = randn(rng, 2 * T2 * nKV * hd2);
  const expand = (a: Float64Array) => {
    const e = new Float64Array(2 * T2 * nH * hd2);
    for (let bt = 0; bt < 2 * T2; bt++) {
      for (let h = 0; h < nH; h++) {
        for (let d = 0; d < hd2; d++) {
          e[(bt * nH + h) * hd2 + d] = a[(bt * nKV + Math.floor(h / 2)) * hd2 + d];
        }
      }
    }
    return e;
  };
  const gqa = attentionForward(q2, k2, v2, 2, T2, nH, nKV, hd2);
  const mha = attentionForward(q2, expand(k2), expand(v2), 2, T2, nH, nH, hd2);
  assertNear(gqa.out, mha.out, 1e-14, "GQA vs copied heads");

  // Causal: changing the last key and value leaves the earlier rows unchanged.
  k2[k2.length - 1] += 1;
  v2[v2.length - 1] += 1;
  const changed = attentionForward(q2, k2, v2, 2, T2, nH, nKV, hd2);
  const perRow = nH * hd2;
  for (let t = 0; t < T2 - 1; t++) {
    const o = (T2 + t) * perRow; // batch 1
    assertNear(changed.out.subarray(o, o + perRow), gqa.out.subarray(o, o + perRow), 0, `t=${t}`);
  }
});

Deno.test("swiglu: value and gradients", () => {
  const h = swigluForward(new Float64Array([0, 2]), new Float64Array([5, 3]));
  assertNear(h, [0, 3 * 2 / (1 + Math.exp(-2))], 1e-15, "silu(g) * up");
  const rng = new Rng(7);
  const gate = randn(rng, 20, 2);
  const up = randn(rng, 20);
  const R = randn(rng, 20);
  const g = swigluBackward(R, gate, up);
  const loss = () => dot(swigluForward(gate, up), R);
  checkGradient("swiglu dgate", gate, g.dgate, loss);
  checkGradient("swiglu dup", up, g.dup, loss);
});

Deno.test("cross-entropy: values, weighted mask, empty mask, gradient", () => {
  // Uniform logits: every row's loss is log V.
  const V = 7;
  const u = crossEntropyForward(new Float64Array(2 * V), [0, 6], [1, 1], 2, V);
  assertNear([u.loss], [Math.log(V)], 1e-15, "uniform");
  assertNear(u.rowLoss, [Math.log(V), Math.log(V)], 1e-15, "uniform rows");

  const rng = new Rng(8);
  const N = 6;
  const logits = randn(rng, N * V, 3);
  const targets = [1, 0, 6, 3, 3, 5];
  const mask = [1, 0, 2, 0.5, 0, 1];
  const f = crossEntropyForward(logits, targets, mask, N, V);
  let num = 0;
  for (let n = 0; n < N; n++) {
    let se = 0;
    for (let j = 0; j < V; j++) se += Math.exp(logits[n * V + j]);
    const row = Math.log(se) - logits[n * V + targets[n]];
    assertNear([f.rowLoss[n]], [row], 1e-13, `row ${n}`);
    num += mask[n] * row;
  }
  assertNear([f.loss], [num / 4.5], 1e-13, "masked mean");
  const d = crossEntropyBackward(logits, targets, mask, N, V);
  assertNear(d.subarray(V, 2 * V), new Float64Array(V), 0, "masked row has no gradient");
  checkGradient(
    "cross-entropy dlogits",
    logits,
    d,
    () => crossEntropyForward(logits, targets, mask, N, V).loss,
  );

  const none = [0, 0, 0, 0, 0, 0];
  assert(crossEntropyForward(logits, targets, none, N, V).loss === 0, "empty mask: loss 0");
  assert(norm(crossEntropyBackward(logits, targets, none, N, V)) === 0, "empty mask: no grad");
});

Deno.test("adamw: two steps on a 3-element tensor, with and without decay, match hand values", () => {
  // lr 0.1, betas (0.9, 0.999), eps 1e-8; p0 = [1, -2, 0.5];
  // g1 = [0.1, -0.2, 0.3], g2 = [-0.1, 0.4, 0].
  //
  // Step 1 (bias corrections 0.1 and 0.001): m = 0.1 g1 = [0.01, -0.02, 0.03],
  // v = 0.001 g1^2 = [1e-5, 4e-5, 9e-5], so mhat = g1 and sqrt(vhat) = |g1| and
  // the update is lr * g/(|g| + eps): 0.1 * 0.1 / 0.10000001 = 0.099999990000001
  // for entry 0, 0.1 * 0.2 / 0.20000001 = 0.0999999950000002 for entry 1 and
  // 0.1 * 0.3 / 0.30000001 = 0.0999999966666668 for entry 2.
  //   no decay:  p1 = [0.90000001, -1.90000000499999975, 0.400000003333333222]
  //   wd = 0.1:  p is first scaled by 1 - lr wd = 0.99 to [0.99, -1.98, 0.495],
  //              p1 = [0.89000001, -1.88000000499999975, 0.395000003333333222]
  //
  // Step 2 (bias corrections 0.19 and 0.001999):
  //   m = 0.9 m + 0.1 g2 = [-0.001, 0.022, 0.027]
  //   v = 0.999 v + 0.001 g2^2 = [1.999e-5, 1.9996e-4, 8.991e-5]
  //   mhat = m / 0.19 = [-0.00526315789, 0.115789474, 0.142105263]
  //   vhat = v / 0.001999 = [0.01, 0.100030015, 0.0449774887]
  //   update = 0.1 mhat / (sqrt(vhat) + 1e-8) = [-0.00526315737, 0.0366103565, 0.0670058222]
  //   no decay: p2 = p1 - update
  //   wd = 0.1: p2 = 0.99 p1 - update
  // (values below to 19 digits from a 40-digit decimal evaluation of these formulas)
  const cases = [
    {
      wd: 0,
      p1: [0.900000009999999, -1.9000000049999997, 0.4000000033333332],
      p2: [0.9052631673684201, -1.936610356546037, 0.332994181079154],
    },
    {
      wd: 0.1,
      p1: [0.890000009999999, -1.8800000049999997, 0.3950000033333332],
      p2: [0.8863631672684201, -1.897810356496037, 0.3240441810458207],
    },
  ];
  for (const c of cases) {
    const p = new Float64Array([1, -2, 0.5]);
    const m = new Float64Array(3);
    const v = new Float64Array(3);
    const o = { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: c.wd };
    adamwStep(p, new Float64Array([0.1, -0.2, 0.3]), m, v, { ...o, step: 1 });
    // Tolerances are a few float64 ulps of each quantity (ulp(1) = 2.2e-16,
    // ulp(0.03) = 3.5e-18, ulp(2e-4) = 2.7e-20); a wrong formula is off by > 1e-9.
    assertNear(p, c.p1, 1e-15, `wd=${c.wd} step 1`);
    assertNear(m, [0.01, -0.02, 0.03], 1e-17, "m after step 1");
    assertNear(v, [1e-5, 4e-5, 9e-5], 1e-18, "v after step 1");
    adamwStep(p, new Float64Array([-0.1, 0.4, 0]), m, v, { ...o, step: 2 });
    assertNear(p, c.p2, 1e-15, `wd=${c.wd} step 2`);
    assertNear(m, [-0.001, 0.022, 0.027], 1e-17, "m after step 2");
    assertNear(v, [1.999e-5, 1.9996e-4, 8.991e-5], 1e-18, "v after step 2");
  }
});

Deno.test("gradNorm and clipScale", () => {
  assertNear([gradNorm([new Float64Array([3]), new Float64Array([0, 4])])], [5], 0, "norm");
  assert(gradNorm([]) === 0, "empty norm");
  assertNear([clipScale(5, 1)], [1 / (5 + 1e-6)], 1e-16, "clip");
  assert(clipScale(0.5, 1) === 1, "below max: no clipping");
  assert(clipScale(100, 0) === 1, "maxNorm 0: clipping off");
});

// ---------------------------------------------------------------------------
// Parameter layout.

const TINY: ModelConfig = {
  hidden_size: 16,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  intermediate_size: 24,
  vocab_size: 11,
  max_position_embeddings: 64,
  rope_theta: 1e4,
  rms_norm_eps: 1e-5,
  tie_word_embeddings: true,
  qk_norm: false,
};

const VARIANTS: ModelConfig[] = [];
for (const qk_norm of [false, true]) {
  for (const tie_word_embeddings of [true, false]) {
    VARIANTS.push({ ...TINY, qk_norm, tie_word_embeddings });
  }
}

Deno.test("params: names, shapes, order and counts", () => {
  for (const c of [...VARIANTS, ...Object.values(PRESETS)]) {
    const specs = parameterSpecs(c);
    assert(totalParameters(specs) === parameterCount(c).total, `total for ${JSON.stringify(c)}`);
    assert(new Set(specs.map((s) => s.name)).size === specs.length, "names are unique");
    for (const s of specs) {
      assert(s.size === s.shape.reduce((a, b) => a * b, 1), `${s.name} size`);
      assert(s.decay === (s.shape.length === 2), `${s.name} decays iff a matrix`);
      assert((s.init === "ones") === (s.shape.length === 1), `${s.name} init`);
    }
  }
  const names = parameterSpecs({ ...TINY, qk_norm: true, tie_word_embeddings: false }).map(
    (s) => `${s.name} [${s.shape.join(",")}]`,
  );
  const layer = (i: number) => [
    `model.layers.${i}.input_layernorm.weight [16]`,
    `model.layers.${i}.self_attn.q_proj.weight [16,16]`,
    `model.layers.${i}.self_attn.k_proj.weight [8,16]`,
    `model.layers.${i}.self_attn.v_proj.weight [8,16]`,
    `model.layers.${i}.self_attn.o_proj.weight [16,16]`,
    `model.layers.${i}.self_attn.q_norm.weight [4]`,
    `model.layers.${i}.self_attn.k_norm.weight [4]`,
    `model.layers.${i}.post_attention_layernorm.weight [16]`,
    `model.layers.${i}.mlp.gate_proj.weight [24,16]`,
    `model.layers.${i}.mlp.up_proj.weight [24,16]`,
    `model.layers.${i}.mlp.down_proj.weight [16,24]`,
  ];
  const expected = [
    "model.embed_tokens.weight [11,16]",
    ...layer(0),
    ...layer(1),
    "model.norm.weight [16]",
    "lm_head.weight [11,16]",
  ];
  assert(JSON.stringify(names) === JSON.stringify(expected), `layout:\n${names.join("\n")}`);
  const tied = parameterSpecs(TINY).map((s) => s.name);
  assert(!tied.includes("lm_head.weight") && !tied.some((n) => n.includes("q_norm")), "tied");
});

Deno.test("params: initParameters is defined by the seed, in spec order, row-major", () => {
  const c = PRESETS.tiny;
  const a = initParameters(c, 42);
  const b = initParameters(c, 42);
  const other = initParameters(c, 43);
  const specs = parameterSpecs(c);
  assert([...a.keys()].join() === specs.map((s) => s.name).join(), "map order = spec order");
  for (const s of specs) {
    const t = a.get(s.name)!;
    assert(t.length === s.size, `${s.name} length`);
    assertNear(t, b.get(s.name)!, 0, `${s.name} reproducible`);
  }
  // The first draws of Rng(42) are the first entries of the embedding, then the
  // stream continues into the next drawn tensor (input_layernorm draws nothing).
  const rng = new Rng(42);
  const emb = a.get("model.embed_tokens.weight")!;
  for (let i = 0; i < 4; i++) {
    assert(emb[i] === Math.fround(rng.normal() * 0.02), `embedding[${i}] is draw ${i}`);
  }
  for (let i = 4; i < emb.length; i++) rng.normal();
  const q = a.get("model.layers.0.self_attn.q_proj.weight")!;
  assert(q[0] === Math.fround(rng.normal() * 0.02), "q_proj continues the stream");
  assert(other.get("model.embed_tokens.weight")![0] !== emb[0], "another seed differs");

  // Sample statistics of the large tensors: mean 0, std as specified. With
  // n >= 49152 draws the std estimate has relative sd 1/sqrt(2n) < 0.4%, so 3%
  // cannot fail by chance and still catches a wrong scale (the residual scale
  // here is 1/sqrt(4) = 0.5).
  for (const s of specs) {
    const t = a.get(s.name)!;
    if (s.init === "ones") {
      assert(t.every((x) => x === 1), `${s.name} ones`);
      continue;
    }
    const std = initStd(s.init, c);
    let ss = 0;
    let sum = 0;
    for (const x of t) {
      ss += x * x;
      sum += x;
    }
    const sampleStd = Math.sqrt(ss / t.length);
    assert(Math.abs(sampleStd / std - 1) < 0.03, `${s.name}: std ${sampleStd} vs ${std}`);
    assert(Math.abs(sum / t.length) < 5 * std / Math.sqrt(t.length), `${s.name}: mean`);
  }
  assert(initStd("residual", c) === 0.02 / 2, "residual std for 2 layers");
});

// ---------------------------------------------------------------------------
// The whole model.

/**
 * Parameters at a generic point, not the init: matrices N(0, 0.5^2) so that
 * attention and SwiGLU are far from linear, norm weights 1 + N(0, 0.3^2) so
 * their gradients are not those of the all-ones special case.
 */
function randomParams(config: ModelConfig, seed: number): Map<string, Float64Array> {
  const rng = new Rng(seed);
  const out = new Map<string, Float64Array>();
  for (const s of parameterSpecs(config)) {
    out.set(s.name, s.init === "ones" ? randn(rng, s.size, 0.3, 1) : randn(rng, s.size, 0.5));
  }
  return out;
}

function tinyBatch(config: ModelConfig): Batch {
  const B = 2, T = 5;
  const rng = new Rng(11);
  const ids: number[] = [];
  const targets: number[] = [];
  for (let i = 0; i < B * T; i++) {
    ids.push(rng.nextInt(config.vocab_size));
    targets.push(rng.nextInt(config.vocab_size));
  }
  ids[3] = ids[7]; // a repeated token: the embedding scatter must add
  // Zeros (masked prompt tokens), and one weight that is not 0/1.
  const mask = [0, 1, 1, 0, 1, 0, 0, 1, 2, 1];
  return {
    ids: Int32Array.from(ids),
    targets: Int32Array.from(targets),
    mask: Float32Array.from(mask),
    B,
    T,
  };
}

for (const config of VARIANTS) {
  const tag = `qk_norm=${config.qk_norm} tied=${config.tie_word_embeddings}`;
  Deno.test(`model: every parameter's gradient matches finite differences (${tag})`, () => {
    const params = randomParams(config, 10);
    const batch = tinyBatch(config);
    const { loss, grads } = modelLossAndGrads(config, params, batch);
    assert(Number.isFinite(loss) && loss > 0, `loss ${loss}`);
    assert(modelForward(config, params, batch).loss === loss, "modelForward gives the same loss");
    const specs = parameterSpecs(config);
    assert(grads.size === specs.length, `${grads.size} gradients for ${specs.length} tensors`);
    for (const s of specs) {
      const g = grads.get(s.name);
      assert(g !== undefined && g.length === s.size, `gradient of ${s.name}`);
      assert(norm(g) > 1e-6, `${s.name}: gradient is not all zero`);
      checkGradient(s.name, params.get(s.name)!, g, () => modelForward(config, params, batch).loss);
    }
  });
}

Deno.test("model: a tied head equals an untied head holding a copy of the embedding", () => {
  const tied = { ...TINY, qk_norm: true };
  const untied = { ...tied, tie_word_embeddings: false };
  const p = randomParams(tied, 12);
  const pu = new Map(p);
  pu.set("lm_head.weight", Float64Array.from(p.get("model.embed_tokens.weight")!));
  const batch = tinyBatch(tied);
  const a = modelLossAndGrads(tied, p, batch);
  const b = modelLossAndGrads(untied, pu, batch);
  assert(a.loss === b.loss, "same loss");
  const sum = Float64Array.from(b.grads.get("model.embed_tokens.weight")!);
  const head = b.grads.get("lm_head.weight")!;
  for (let i = 0; i < sum.length; i++) sum[i] += head[i];
  assertNear(a.grads.get("model.embed_tokens.weight")!, sum, 1e-14, "embedding + head grads");
  const logits = modelForward(tied, p, batch).logits;
  assert(logits.length === batch.B * batch.T * tied.vocab_size, "logits [B*T, V]");
});

Deno.test("model: at init the loss is near log(vocab) and float32 params convert exactly", () => {
  const c = { ...TINY, vocab_size: 64 };
  const p32 = initParameters(c, 1);
  const p = toFloat64Params(p32);
  for (const [n, t] of p32) assertNear(p.get(n)!, t, 0, n);
  const rng = new Rng(2);
  const ids = Int32Array.from({ length: 16 }, () => rng.nextInt(64));
  const targets = Int32Array.from({ length: 16 }, () => rng.nextInt(64));
  const mask = new Float32Array(16).fill(1);
  const { loss } = modelForward(c, p, { ids, targets, mask, B: 2, T: 8 });
  // Weights of std 0.02 give logits of order 0.1 (the embedding rows have norm
  // ~0.08 and the final norm rescales to rms 1): the loss is log 64 = 4.159
  // within a few hundredths; 0.1 still catches a broken init scale.
  assert(Math.abs(loss - Math.log(64)) < 0.1, `loss ${loss} vs log 64`);
});
