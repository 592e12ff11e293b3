/**
 * The DPO kernels (kernels/dpo.ts) chained with the cross-entropy as the
 * training model chains them — reference rowLoss, policy rowLoss, sequence
 * sums + loss + coefficients, row weights, the weighted cross-entropy's
 * dlogits — against the float64 oracle (model/dpo_reference.ts), whose own
 * gradient is first checked against central finite differences.
 *
 * Shapes are not tile multiples: P = 1, 2, 3, 5 pairs, T = 1, 7, 33 and 70
 * (more rows than the sums' 64 threads), V = 11, 100, 2048 + 7; masks with
 * zeros (prompt rows) and a padding pair that must not count.
 *
 * Tolerances, from the f32 arithmetic: each rowLoss is within 3e-5 of the
 * float64 value (the cross-entropy test's bound, 2e-5, plus the masked
 * lse's rounding), so a sequence's log-probability, a sum of T of them, is
 * within T * 3e-5 (the f32 sum's own rounding, T ulp of |logp| < 300, is
 * below that); h = β((π_c - ρ_c) - (π_r - ρ_r)) is within errH = 4 β T 3e-5.
 * The loss per pair, softplus(-h), has slope < 1: atol errH + 1e-6. The
 * coefficient g = β σ(-h) / P has slope < β / (4P): atol β errH / (4P), and
 * the dlogits w (softmax - onehot) add the cross-entropy's 5e-6 |w| on top.
 * A wrong sign, pair order, mask or normalization is off by O(g) or more.
 */
import { assert, assertClose, assertEquals } from "./assert.ts";
import { GPU_TEST, submitPass } from "./helpers.ts";
import { Gpu } from "../kernels/runtime.ts";
import { crossEntropy } from "../kernels/cross_entropy.ts";
import { DPO_STATS, DPO_STATS_FLOATS, dpoLoss, dpoRowWeights } from "../kernels/dpo.ts";
import {
  dpoLogitsGradReference,
  dpoLossReference,
  sequenceLogProbs,
} from "../model/dpo_reference.ts";
import { Rng } from "../util/random.ts";

const gpu = await Gpu.request();

Deno.test("dpo reference: the logits gradient matches central finite differences", () => {
  const P = 2, T = 3, V = 5, S = 2 * P, beta = 0.7;
  const rng = new Rng(3);
  const pol = Float64Array.from({ length: S * T * V }, () => rng.normal());
  const refl = Float64Array.from({ length: S * T * V }, () => rng.normal());
  const targets = Int32Array.from({ length: S * T }, () => rng.nextInt(V));
  const mask = Float64Array.from({ length: S * T }, (_, i) => (i % T === 0 ? 0 : 1));
  const grad = dpoLogitsGradReference(pol, refl, targets, mask, S, T, V, beta);
  const eps = 1e-6;
  const fd = new Float64Array(grad.length);
  for (let i = 0; i < pol.length; i++) {
    const x = pol[i];
    pol[i] = x + eps;
    const up = dpoLossReference(pol, refl, targets, mask, S, T, V, beta).loss;
    pol[i] = x - eps;
    const down = dpoLossReference(pol, refl, targets, mask, S, T, V, beta).loss;
    pol[i] = x;
    fd[i] = (up - down) / (2 * eps);
  }
  // Central differences in float64: truncation ~eps^2 * |L'''| and rounding ~1e-16 / eps.
  assertClose(grad, fd, { atol: 1e-8, rtol: 1e-6 }, "d loss / d logits");
  assert(grad.some((g) => Math.abs(g) > 1e-3), "the gradient is not trivially zero");
  // Masked-out rows have no gradient.
  for (let r = 0; r < S * T; r++) {
    if (mask[r] === 0) assert(grad.subarray(r * V, (r + 1) * V).every((g) => g === 0));
  }
});

Deno.test("dpo reference: policy = reference gives ln 2 and zero rewards; math by hand", () => {
  const P = 2, T = 2, V = 3, S = 2 * P;
  const logits = Float64Array.from({ length: S * T * V }, (_, i) => Math.sin(i));
  const targets = Int32Array.from({ length: S * T }, (_, i) => i % V);
  const mask = new Float64Array(S * T).fill(1);
  const r = dpoLossReference(logits, logits, targets, mask, S, T, V, 0.1);
  assertClose([r.loss, r.chosenReward, r.rejectedReward], [Math.LN2, 0, 0], {
    atol: 1e-15,
    rtol: 0,
  });
  assertEquals(r.accuracy, 0, "a tie is not a win");
  // One pair, by hand: π_c - ρ_c = 1, π_r - ρ_r = -1, β = 0.5: h = 1, loss = log(1 + e^-1).
  const one = dpoLossReference([0, 0], [0, 0], [0, 0], [1, 1], 2, 1, 1, 0.5);
  assertEquals(one.loss, Math.LN2, "a one-token vocabulary has log p = 0 everywhere");
  const pi = sequenceLogProbs([Math.log(3), 0], [0], [1], 1, 1, 2); // softmax [3/4, 1/4]
  assertClose(pi, [Math.log(0.75)], { atol: 1e-15, rtol: 0 });
});

interface Case {
  P: number;
  T: number;
  V: number;
  beta: number;
  padPair?: boolean;
  same?: boolean;
}

const cases: Case[] = [
  { P: 1, T: 1, V: 11, beta: 0.1 },
  { P: 3, T: 7, V: 100, beta: 0.5, padPair: true },
  { P: 5, T: 33, V: 2048 + 7, beta: 0.1 },
  { P: 2, T: 70, V: 100, beta: 2 },
  { P: 3, T: 7, V: 100, beta: 0.1, same: true },
];

for (const c of cases) {
  const { P, T, V, beta } = c;
  const S = 2 * P;
  const N = S * T;
  const name = `P=${P} T=${T} V=${V} beta=${beta}${c.padPair ? " padded pair" : ""}${
    c.same ? " policy = reference" : ""
  }`;
  Deno.test({
    name: `dpo kernels match the reference: ${name}`,
    ...GPU_TEST,
    fn: async () => {
      const rng = new Rng(P * 1000 + T * 10 + V);
      const policy = new Float32Array(N * V).map(() => 2 * rng.normal()); // [S*T, V]
      const reference = c.same ? policy.slice() : policy.map((z) => z + 0.5 * rng.normal()); // a nearby model
      const targets = new Uint32Array(N).map(() => rng.nextInt(V));
      // Prompt rows (mask 0) at the start of each sequence, answer rows after.
      const mask = new Float32Array(N).map((_, i) => (i % T < Math.floor(T / 3) ? 0 : 1));
      if (c.padPair) { for (const s of [P - 1, S - 1]) mask.fill(0, s * T, (s + 1) * T); }

      const buf = (data: Float32Array | Uint32Array | number, label: string) =>
        gpu.createBuffer(data, label);
      const policyBuf = buf(policy, "policy logits");
      const referenceBuf = buf(reference, "reference logits");
      const targetsBuf = buf(targets, "targets");
      const maskBuf = buf(mask, "mask");
      const one = buf(new Float32Array([1]), "one");
      const discard = buf(4, "discard loss");
      const scratch = buf(N * V * 4, "scratch dlogits");
      const dlogits = buf(N * V * 4, "dlogits");
      const refRowLoss = buf(N * 4, "reference rowLoss");
      const polRowLoss = buf(N * 4, "policy rowLoss");
      const rowLoss2 = buf(N * 4, "weighted rowLoss");
      const seqLogp = buf(2 * S * 4, "seqLogp");
      const coef = buf(S * 4, "coef");
      const weights = buf(N * 4, "weights");
      const loss = buf(new Float32Array([0.25]), "loss"); // the kernel adds to it
      const stats = buf(DPO_STATS_FLOATS * 4, "stats");
      const ref64 = dpoLossReference(policy, reference, targets, mask, S, T, V, beta);
      const pairs = ref64.pairs;
      assertEquals(pairs, c.padPair ? P - 1 : P, "counted pairs");
      const hyper = buf(new Float32Array([beta, 1 / pairs]), "hyper");
      const ce = (logits: GPUBuffer, m: GPUBuffer, out: GPUBuffer, rl: GPUBuffer) =>
        crossEntropy(gpu, {
          logits,
          targets: targetsBuf,
          mask: m,
          scale: one,
          dlogits: out,
          rowLoss: rl,
          loss: discard,
          N,
          V,
        });
      const dispatches = [
        ...await ce(referenceBuf, maskBuf, scratch, refRowLoss),
        ...await ce(policyBuf, maskBuf, scratch, polRowLoss),
        await dpoLoss(gpu, {
          policyRowLoss: polRowLoss,
          referenceRowLoss: refRowLoss,
          mask: maskBuf,
          hyper,
          seqLogp,
          coef,
          loss,
          stats,
          S,
          T,
        }),
        await dpoRowWeights(gpu, { coef, mask: maskBuf, weights, S, T }),
        ...await ce(policyBuf, weights, dlogits, rowLoss2),
      ];
      submitPass(gpu, dispatches);

      const errH = 4 * beta * T * 3e-5;
      const logp = await gpu.readF32(seqLogp);
      assertClose(
        logp.subarray(0, S),
        ref64.policyLogp,
        { atol: T * 3e-5, rtol: 0 },
        "policy logp",
      );
      assertClose(logp.subarray(S), ref64.referenceLogp, { atol: T * 3e-5, rtol: 0 }, "ref logp");
      const gotLoss = (await gpu.readF32(loss))[0] - 0.25;
      assertClose([gotLoss], [ref64.loss], { atol: errH + 1e-6, rtol: 0 }, "loss");
      if (c.same) {
        // The same logits through the same kernels: bitwise equal log-probs, h = 0 exactly.
        assertEquals(logp.subarray(0, S), logp.subarray(S), "policy = reference, bit for bit");
        assertClose([gotLoss], [Math.LN2], { atol: 1e-6, rtol: 0 }, "ln 2 at policy = reference");
      }
      const st = await gpu.readF32(stats);
      assertClose(
        [st[DPO_STATS.chosenReward], st[DPO_STATS.rejectedReward]],
        [ref64.chosenReward, ref64.rejectedReward],
        { atol: 2 * beta * T * 3e-5, rtol: 0 },
        "rewards",
      );
      assertClose([st[DPO_STATS.accuracy]], [ref64.accuracy], { atol: 1e-6, rtol: 0 }, "accuracy");

      const want = dpoLogitsGradReference(policy, reference, targets, mask, S, T, V, beta);
      let maxW = 0;
      for (const w of await gpu.readF32(weights)) maxW = Math.max(maxW, Math.abs(w));
      const atolG = (beta * errH) / (4 * pairs);
      const got = await gpu.readF32(dlogits);
      assertClose(got, want, { atol: atolG + 5e-6 * maxW, rtol: 1e-5 }, "dlogits");
      assert(maxW > 0, "some row has a weight");
      if (c.padPair) {
        for (const s of [P - 1, S - 1]) {
          assert(got.subarray(s * T * V, (s + 1) * T * V).every((v) => v === 0), `pad seq ${s}`);
        }
      }
      // Bitwise determinism: the same inputs again give the same bits.
      gpu.write(loss, new Float32Array([0.25]));
      gpu.write(stats, new Float32Array(DPO_STATS_FLOATS));
      submitPass(gpu, dispatches);
      assertEquals(await gpu.readF32(dlogits), got, "dlogits bits");
      assertEquals((await gpu.readF32(loss))[0] - 0.25, gotLoss, "loss bits");
    },
  });
}

Deno.test("dpo kernels refuse an odd number of sequences", async () => {
  const b = gpu.createBuffer(64, "b");
  let threw = false;
  try {
    await dpoLoss(gpu, {
      policyRowLoss: b,
      referenceRowLoss: b,
      mask: b,
      hyper: b,
      seqLogp: b,
      coef: b,
      loss: b,
      stats: b,
      S: 3,
      T: 2,
    });
  } catch (e) {
    threw = e instanceof RangeError;
  }
  assert(threw, "S = 3 is refused");
});

Deno.test({
  name: "dpo: destroy the shared device",
  ...GPU_TEST,
  fn: () => gpu.destroy(),
});
