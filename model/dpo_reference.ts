/**
 * The DPO loss in float64 on the CPU: the oracle that `kernels/dpo.ts` and the
 * training model's DPO step are tested against. Plain loops, no shortcuts:
 * log-softmax per row, masked sums per sequence, the loss of each pair, and
 * the gradient with respect to the policy's logits derived by hand (see
 * `kernels/dpo.ts` for the derivation; the tests also check it against finite
 * differences).
 *
 * @module
 */

/** Per-pair figures and the batch's means. */
export interface DpoReferenceResult {
  /** Mean over counted pairs of -log σ(β((π_c - ρ_c) - (π_r - ρ_r))). */
  loss: number;
  /** Mean over counted pairs of β (π - ρ) for the chosen answers. */
  chosenReward: number;
  /** Mean over counted pairs of β (π - ρ) for the rejected answers. */
  rejectedReward: number;
  /** Share of counted pairs whose chosen reward exceeds the rejected one. */
  accuracy: number;
  /** Per-sequence masked log-probabilities `[S]` of the policy. */
  policyLogp: Float64Array;
  /** Per-sequence masked log-probabilities `[S]` of the reference. */
  referenceLogp: Float64Array;
  /** Pairs that count (both sequences have a masked-in target). */
  pairs: number;
}

/**
 * log p(targets) per sequence: sum over rows r of sequence s of
 * mask_r * log softmax(logits_r)[target_r]. logits `[S * T, V]`.
 */
export function sequenceLogProbs(
  logits: ArrayLike<number>,
  targets: ArrayLike<number>,
  mask: ArrayLike<number>,
  S: number,
  T: number,
  V: number,
): Float64Array {
  const out = new Float64Array(S);
  for (let s = 0; s < S; s++) {
    let sum = 0;
    for (let t = 0; t < T; t++) {
      const r = s * T + t;
      if (mask[r] === 0) continue;
      let m = -Infinity;
      for (let v = 0; v < V; v++) m = Math.max(m, logits[r * V + v]);
      let z = 0;
      for (let v = 0; v < V; v++) z += Math.exp(logits[r * V + v] - m);
      sum += mask[r] * (logits[r * V + targets[r]] - m - Math.log(z));
    }
    out[s] = sum;
  }
  return out;
}

function counted(mask: ArrayLike<number>, S: number, T: number): boolean[] {
  const P = S / 2;
  const has = (s: number) => {
    for (let t = 0; t < T; t++) if (mask[s * T + t] !== 0) return true;
    return false;
  };
  return Array.from({ length: P }, (_, p) => has(p) && has(P + p));
}

/**
 * The DPO loss of a batch of S = 2P sequences (chosen 0..P-1, rejected
 * P..2P-1) from the policy's and reference's logits `[S * T, V]`.
 */
export function dpoLossReference(
  policyLogits: ArrayLike<number>,
  referenceLogits: ArrayLike<number>,
  targets: ArrayLike<number>,
  mask: ArrayLike<number>,
  S: number,
  T: number,
  V: number,
  beta: number,
): DpoReferenceResult {
  const P = S / 2;
  const pi = sequenceLogProbs(policyLogits, targets, mask, S, T, V);
  const rho = sequenceLogProbs(referenceLogits, targets, mask, S, T, V);
  const use = counted(mask, S, T);
  let loss = 0, cr = 0, rr = 0, acc = 0, n = 0;
  for (let p = 0; p < P; p++) {
    if (!use[p]) continue;
    const c = beta * (pi[p] - rho[p]);
    const r = beta * (pi[P + p] - rho[P + p]);
    const h = c - r;
    loss += Math.log1p(Math.exp(-h)); // -log σ(h)
    cr += c;
    rr += r;
    if (h > 0) acc++;
    n++;
  }
  const mean = (x: number) => (n > 0 ? x / n : 0);
  return {
    loss: mean(loss),
    chosenReward: mean(cr),
    rejectedReward: mean(rr),
    accuracy: mean(acc),
    policyLogp: pi,
    referenceLogp: rho,
    pairs: n,
  };
}

/**
 * d loss / d policyLogits `[S * T, V]` of `dpoLossReference`: for a row r of
 * sequence s, g_s m_r (softmax(z_r) - onehot(t_r)), with g_chosen = β σ(-h) /
 * pairs and g_rejected = -g_chosen.
 */
export function dpoLogitsGradReference(
  policyLogits: ArrayLike<number>,
  referenceLogits: ArrayLike<number>,
  targets: ArrayLike<number>,
  mask: ArrayLike<number>,
  S: number,
  T: number,
  V: number,
  beta: number,
): Float64Array {
  const r = dpoLossReference(policyLogits, referenceLogits, targets, mask, S, T, V, beta);
  const weights = dpoRowWeightsReference(r.policyLogp, r.referenceLogp, mask, S, T, beta);
  const out = new Float64Array(S * T * V);
  for (let row = 0; row < S * T; row++) {
    const w = weights[row];
    if (w === 0) continue;
    let m = -Infinity;
    for (let v = 0; v < V; v++) m = Math.max(m, policyLogits[row * V + v]);
    let z = 0;
    for (let v = 0; v < V; v++) z += Math.exp(policyLogits[row * V + v] - m);
    for (let v = 0; v < V; v++) {
      out[row * V + v] = w * (Math.exp(policyLogits[row * V + v] - m) / z -
        (v === targets[row] ? 1 : 0));
    }
  }
  return out;
}

/** The per-row weights w_r = g_s m_r (for tests of the model's DPO step against `modelLossAndGrads`). */
export function dpoRowWeightsReference(
  policyLogp: ArrayLike<number>,
  referenceLogp: ArrayLike<number>,
  mask: ArrayLike<number>,
  S: number,
  T: number,
  beta: number,
): Float64Array {
  const P = S / 2;
  const use = counted(mask, S, T);
  const pairs = use.filter((u) => u).length;
  const w = new Float64Array(S * T);
  for (let p = 0; p < P; p++) {
    if (!use[p]) continue;
    const h = beta * ((policyLogp[p] - referenceLogp[p]) -
      (policyLogp[P + p] - referenceLogp[P + p]));
    const g = beta / (1 + Math.exp(h)) / pairs;
    for (let t = 0; t < T; t++) {
      w[p * T + t] = g * mask[p * T + t];
      w[(P + p) * T + t] = -g * mask[(P + p) * T + t];
    }
  }
  return w;
}
