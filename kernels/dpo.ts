/**
 * Direct Preference Optimization (DPO) on top of the fused cross-entropy: the
 * per-sequence masked log-probabilities, the DPO loss and its statistics, and
 * the per-row weights that turn the cross-entropy's gradient into the DPO
 * gradient.
 *
 * A batch holds S = 2P sequences of T rows: pairs p = 0..P-1 are the chosen
 * answers (sequences 0..P-1) and the rejected ones (P..2P-1), MiniMind's
 * `cat([chosen, rejected])` order. The cross-entropy (`kernels/cross_entropy.ts`)
 * with the 0/1 assistant mask m already gives, per row, rowLoss_r = m_r (lse_r -
 * z_{r,t_r}) = -m_r log softmax(z_r)[t_r]. So the log-probability of sequence s
 * is
 *
 *   logp_s = sum_{r in s} log softmax(z_r)[t_r] m_r = -sum_{r in s} rowLoss_r
 *
 * for the policy (π_s) and the frozen reference (ρ_s). With rewards
 * c_p = β (π_p - ρ_p) and j_p = β (π_{P+p} - ρ_{P+p}) and h_p = c_p - j_p:
 *
 *   L = (1 / P_step) sum_p -log σ(h_p) = (1 / P_step) sum_p softplus(-h_p)
 *
 * dL/dπ_chosen = -β σ(-h) / P_step, dL/dπ_rejected = +β σ(-h) / P_step, and
 * d logp_s / d z_{r,v} = m_r ([v = t_r] - softmax(z_r)_v). Hence
 *
 *   dL/dz_{r,v} = w_r (softmax(z_r)_v - [v = t_r]),  w_r = g_s m_r,
 *   g_chosen = β σ(-h) / P_step,  g_rejected = -g_chosen,
 *
 * which is exactly the cross-entropy's gradient with the row weight w_r in
 * place of the mask (scale 1). `dpoLoss` computes the sums, the loss, the
 * statistics and g_s (one workgroup: the reductions run in a fixed order, so
 * results are bitwise reproducible); `dpoRowWeights` writes w. softplus(-h) is
 * evaluated as max(-h, 0) + log(1 + exp(-|h|)) and σ(-h) as 1 / (1 + exp(h)):
 * neither overflows to NaN for any finite h.
 *
 * A pair counts only when both its sequences have a masked-in target (the
 * last batch of an eval pass is padded with empty rows); others get g = 0 and
 * add nothing. P_step (the caller's `scale` = 1 / real pairs of the whole
 * step) makes micro-batches of gradient accumulation sum to the step's mean.
 *
 * Cost: reads 3 floats per row twice-ish (sums, then weights): ~20 N bytes, no
 * matmul; negligible beside the head's logits.
 *
 * @module
 */
import { type Binding, type Dispatch, type Gpu, LINEAR_WORKGROUP_WGSL } from "./runtime.ts";

/** Threads of the one-workgroup reduction (a fixed shape: part of the summation order). */
const WG = 64;
/** Threads per workgroup of the row-weight kernel. */
const ROWS_WG = 64;

/** Floats in the statistics buffer `dpoLoss` adds into: see `DPO_STATS`. */
export const DPO_STATS_FLOATS = 3;

/** Slots of the statistics buffer (each a sum over pairs times `scale`). */
export const DPO_STATS = {
  /** β (π - ρ) of the chosen answers. */
  chosenReward: 0,
  /** β (π - ρ) of the rejected answers. */
  rejectedReward: 1,
  /** 1 where the chosen reward exceeds the rejected one, else 0. */
  accuracy: 2,
} as const;

function lossWgsl(S: number): string {
  return `
const WG: u32 = ${WG}u;
const S: u32 = ${S}u;
const P: u32 = ${S / 2}u;
struct Params { T: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> policyRowLoss: array<f32>; // [S, T]
@group(0) @binding(2) var<storage, read> referenceRowLoss: array<f32>; // [S, T]
@group(0) @binding(3) var<storage, read> mask: array<f32>; // [S, T]
@group(0) @binding(4) var<storage, read> hyper: array<f32>; // [beta, scale]
@group(0) @binding(5) var<storage, read_write> seqLogp: array<f32>; // [2, S]: policy, reference
@group(0) @binding(6) var<storage, read_write> coef: array<f32>; // [S]: g_s
@group(0) @binding(7) var<storage, read_write> loss: array<f32>; // [1], added into
@group(0) @binding(8) var<storage, read_write> stats: array<f32>; // [${DPO_STATS_FLOATS}], added into
var<workgroup> ra: array<f32, WG>;
var<workgroup> rb: array<f32, WG>;
var<workgroup> rc: array<f32, WG>;
var<workgroup> rd: array<f32, WG>;
var<workgroup> pol: array<f32, S>;
var<workgroup> ref_: array<f32, S>;
var<workgroup> cnt: array<f32, S>;

fn tree(t: u32) {
  for (var k = WG / 2u; k > 0u; k = k >> 1u) {
    if (t < k) {
      ra[t] = ra[t] + ra[t + k];
      rb[t] = rb[t] + rb[t + k];
      rc[t] = rc[t] + rc[t + k];
      rd[t] = rd[t] + rd[t + k];
    }
    workgroupBarrier();
  }
}

@compute @workgroup_size(${WG})
fn main(@builtin(local_invocation_index) t: u32) {
  let T = p.T;
  for (var s = 0u; s < S; s++) {
    var a = 0.0;
    var b = 0.0;
    var c = 0.0;
    for (var i = t; i < T; i += WG) {
      let r = s * T + i;
      a += policyRowLoss[r];
      b += referenceRowLoss[r];
      c += mask[r];
    }
    ra[t] = a;
    rb[t] = b;
    rc[t] = c;
    rd[t] = 0.0;
    workgroupBarrier();
    tree(t);
    if (t == 0u) {
      pol[s] = -ra[0];
      ref_[s] = -rb[0];
      cnt[s] = rc[0];
      seqLogp[s] = -ra[0];
      seqLogp[S + s] = -rb[0];
    }
    workgroupBarrier();
  }
  let beta = hyper[0];
  let scale = hyper[1];
  var l = 0.0;
  var cr = 0.0;
  var rr = 0.0;
  var acc = 0.0;
  for (var q = t; q < P; q += WG) {
    let c = q;
    let j = q + P;
    if (cnt[c] > 0.0 && cnt[j] > 0.0) {
      let rc_ = beta * (pol[c] - ref_[c]);
      let rj = beta * (pol[j] - ref_[j]);
      let h = rc_ - rj;
      l += max(-h, 0.0) + log(1.0 + exp(-abs(h)));
      let g = beta * scale / (1.0 + exp(h));
      coef[c] = g;
      coef[j] = -g;
      cr += rc_;
      rr += rj;
      acc += select(0.0, 1.0, h > 0.0);
    } else {
      coef[c] = 0.0;
      coef[j] = 0.0;
    }
  }
  ra[t] = l;
  rb[t] = cr;
  rc[t] = rr;
  rd[t] = acc;
  workgroupBarrier();
  tree(t);
  if (t == 0u) {
    loss[0] = loss[0] + scale * ra[0];
    stats[0] = stats[0] + scale * rb[0];
    stats[1] = stats[1] + scale * rc[0];
    stats[2] = stats[2] + scale * rd[0];
  }
}`;
}

const weightsWgsl = `${LINEAR_WORKGROUP_WGSL}
struct Params { n: u32, T: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> coef: array<f32>; // [S]
@group(0) @binding(2) var<storage, read> mask: array<f32>; // [S, T]
@group(0) @binding(3) var<storage, read_write> weights: array<f32>; // [S, T]
@compute @workgroup_size(${ROWS_WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) t: u32) {
  let i = linear_workgroup(wid, nwg) * ${ROWS_WG}u + t;
  if (i >= p.n) { return; }
  weights[i] = coef[i / p.T] * mask[i];
}`;

/**
 * The DPO loss of a batch of `S = 2P` sequences of `T` rows from the policy's
 * and the reference's cross-entropy rowLoss `[S, T]` (taken with the 0/1
 * `mask` and scale 1): writes seqLogp `[2, S]` (policy, then reference), coef
 * `[S]` (g_s above) and adds scale * the sum over counted pairs into loss[0]
 * and into stats (`DPO_STATS`). `hyper` holds [β, scale], written by the
 * caller (scale = 1 / the step's counted pairs).
 *
 * @example
 * ```ts ignore
 * const d = await dpoLoss(gpu, { policyRowLoss, referenceRowLoss, mask, hyper, seqLogp, coef,
 *   loss, stats, S: 8, T: 128 });
 * ```
 */
export async function dpoLoss(
  gpu: Gpu,
  args: {
    policyRowLoss: Binding;
    referenceRowLoss: Binding;
    mask: Binding;
    hyper: Binding;
    seqLogp: Binding;
    coef: Binding;
    loss: Binding;
    stats: Binding;
    S: number;
    T: number;
  },
): Promise<Dispatch> {
  const { S, T } = args;
  if (!Number.isInteger(S) || S < 2 || S % 2 !== 0) {
    throw new RangeError(`dpoLoss: S = ${S} sequences must be a positive even number`);
  }
  if (!Number.isInteger(T) || T < 1) throw new RangeError(`dpoLoss: bad T ${T}`);
  const u = gpu.createUniform(new Uint32Array([T]), "dpo loss params");
  const pipeline = await gpu.pipeline(`dpo-loss-S${S}`, lossWgsl(S));
  return {
    label: `dpo loss S=${S} T=${T}`,
    pipeline,
    bindGroup: gpu.bindGroup(pipeline, [
      u,
      args.policyRowLoss,
      args.referenceRowLoss,
      args.mask,
      args.hyper,
      args.seqLogp,
      args.coef,
      args.loss,
      args.stats,
    ], "dpo loss"),
    workgroups: 1,
    owned: [u],
  };
}

/**
 * weights[s, t] = coef[s] * mask[s, t]: the row weights that make the
 * cross-entropy (mask = weights, scale 1) write dL/dlogits of the DPO loss.
 *
 * @example
 * ```ts ignore
 * const d = await dpoRowWeights(gpu, { coef, mask, weights, S: 8, T: 128 });
 * ```
 */
export async function dpoRowWeights(
  gpu: Gpu,
  args: { coef: Binding; mask: Binding; weights: Binding; S: number; T: number },
): Promise<Dispatch> {
  const { S, T } = args;
  const n = S * T;
  const u = gpu.createUniform(new Uint32Array([n, T]), "dpo row weights params");
  const pipeline = await gpu.pipeline("dpo-row-weights", weightsWgsl);
  return {
    label: `dpo row weights S=${S} T=${T}`,
    pipeline,
    bindGroup: gpu.bindGroup(pipeline, [u, args.coef, args.mask, args.weights], "dpo row weights"),
    workgroups: Math.ceil(n / ROWS_WG),
    owned: [u],
  };
}
