/**
 * The oracle: a plain CPU implementation of every op of the model and of the
 * whole model, forward and backward, in float64.
 *
 * Every GPU kernel and the GPU model are tested against these functions, and
 * these functions are tested against central finite differences
 * (`tests/reference_test.ts`). They are written to be obviously right: plain
 * loops, one op per function, forward and backward side by side, no fusion.
 *
 * Layouts (row-major throughout):
 * - activations `[B, T, C]`, flattened to `[N, C]` with `N = B * T` where an op
 *   does not care about sequence structure;
 * - q `[B, T, nH, hd]`, k and v `[B, T, nKV, hd]` (the output of the
 *   projections, reshaped without a copy);
 * - a linear layer's weight is `[out, in]` (Hugging Face), `y = x W^T`.
 *
 * @module
 */

import { headDim, type ModelConfig } from "./config.ts";
import { tensorNames } from "./params.ts";
import type { Batch } from "../data/batch.ts";

// ---------------------------------------------------------------------------
// Linear layers: the three matmuls a linear layer needs.
// Forward y = x W^T, so dy/dx gives dx = dy W and dy/dW gives dW = dy^T x.

/**
 * `y = x W^T`: x `[M, K]`, w `[N, K]` (Hugging Face `[out, in]`), returns y `[M, N]`.
 *
 * @example
 * ```ts
 * import { matmulXWt } from "./reference.ts";
 * // [1, 2] times the 2x2 identity
 * const y = matmulXWt(new Float64Array([1, 2]), new Float64Array([1, 0, 0, 1]), 1, 2, 2);
 * if (y[0] !== 1 || y[1] !== 2) throw new Error("identity");
 * ```
 */
export function matmulXWt(
  x: Float64Array,
  w: Float64Array,
  M: number,
  K: number,
  N: number,
): Float64Array {
  const y = new Float64Array(M * N); // [M, N]
  for (let m = 0; m < M; m++) {
    for (let n = 0; n < N; n++) {
      let acc = 0;
      for (let k = 0; k < K; k++) acc += x[m * K + k] * w[n * K + k];
      y[m * N + n] = acc;
    }
  }
  return y;
}

/**
 * Input gradient of `y = x W^T`: `dx = dy W`. dy `[M, N]`, w `[N, K]`, returns dx `[M, K]`.
 * (`y[m,n] = sum_k x[m,k] w[n,k]`, so `dL/dx[m,k] = sum_n dy[m,n] w[n,k]`.)
 */
export function matmulDyW(
  dy: Float64Array,
  w: Float64Array,
  M: number,
  N: number,
  K: number,
): Float64Array {
  const dx = new Float64Array(M * K); // [M, K]
  for (let m = 0; m < M; m++) {
    for (let k = 0; k < K; k++) {
      let acc = 0;
      for (let n = 0; n < N; n++) acc += dy[m * N + n] * w[n * K + k];
      dx[m * K + k] = acc;
    }
  }
  return dx;
}

/**
 * Weight gradient of `y = x W^T`: `dW = dy^T x`. dy `[M, N]`, x `[M, K]`, returns dw `[N, K]`.
 * (`dL/dw[n,k] = sum_m dy[m,n] x[m,k]`.)
 */
export function matmulDyTX(
  dy: Float64Array,
  x: Float64Array,
  M: number,
  N: number,
  K: number,
): Float64Array {
  const dw = new Float64Array(N * K); // [N, K]
  for (let n = 0; n < N; n++) {
    for (let k = 0; k < K; k++) {
      let acc = 0;
      for (let m = 0; m < M; m++) acc += dy[m * N + n] * x[m * K + k];
      dw[n * K + k] = acc;
    }
  }
  return dw;
}

// ---------------------------------------------------------------------------
// Embedding: out[n] = weight[ids[n]].

/** Embedding lookup: weight `[V, H]`, ids `[N]`, returns `[N, H]`. */
export function embeddingForward(
  weight: Float64Array,
  ids: ArrayLike<number>,
  H: number,
): Float64Array {
  const N = ids.length;
  const V = weight.length / H;
  const out = new Float64Array(N * H); // [N, H]
  for (let n = 0; n < N; n++) {
    const id = ids[n];
    if (!(Number.isInteger(id) && id >= 0 && id < V)) {
      throw new RangeError(`embeddingForward: id ${id} at ${n} is outside [0, ${V})`);
    }
    for (let j = 0; j < H; j++) out[n * H + j] = weight[id * H + j];
  }
  return out;
}

/**
 * Embedding gradient: `dW[v] = sum over n with ids[n] = v of dOut[n]`.
 * dOut `[N, H]`, returns dW `[V, H]` (rows of unused tokens are zero). Rows are
 * summed in increasing n, the order a deterministic GPU kernel should also use.
 */
export function embeddingBackward(
  dOut: Float64Array,
  ids: ArrayLike<number>,
  V: number,
  H: number,
): Float64Array {
  const dw = new Float64Array(V * H); // [V, H]
  for (let n = 0; n < ids.length; n++) {
    const id = ids[n];
    for (let j = 0; j < H; j++) dw[id * H + j] += dOut[n * H + j];
  }
  return dw;
}

// ---------------------------------------------------------------------------
// RMSNorm: y = x * r * w with r = 1 / sqrt(mean(x^2) + eps), per row of H.

/**
 * RMSNorm over rows: x `[N, H]`, w `[H]`. Returns y `[N, H]` and the
 * reciprocal RMS `rstd[n] = 1 / sqrt(mean_j x[n,j]^2 + eps)` `[N]`, which the
 * backward reuses.
 */
export function rmsnormForward(
  x: Float64Array,
  w: Float64Array,
  N: number,
  H: number,
  eps: number,
): { y: Float64Array; rstd: Float64Array } {
  const y = new Float64Array(N * H); // [N, H]
  const rstd = new Float64Array(N); // [N]
  for (let n = 0; n < N; n++) {
    let ss = 0;
    for (let j = 0; j < H; j++) ss += x[n * H + j] * x[n * H + j];
    const r = 1 / Math.sqrt(ss / H + eps);
    rstd[n] = r;
    for (let j = 0; j < H; j++) y[n * H + j] = x[n * H + j] * r * w[j];
  }
  return { y, rstd };
}

/**
 * RMSNorm backward. With `xhat = x r` and `g = dy * w` (elementwise):
 *
 *   dw[j] = sum_n dy[n,j] xhat[n,j]
 *
 * and, per row, since `r = (m + eps)^(-1/2)` with `m = sum_k x_k^2 / H`,
 * `dr/dx_k = -r^3 x_k / H`, so
 *
 *   dx_k = g_k r + sum_j g_j x_j (-r^3 x_k / H)
 *        = r (g_k - xhat_k * (sum_j g_j xhat_j) / H).
 */
export function rmsnormBackward(
  dy: Float64Array,
  x: Float64Array,
  w: Float64Array,
  rstd: Float64Array,
  N: number,
  H: number,
): { dx: Float64Array; dw: Float64Array } {
  const dx = new Float64Array(N * H); // [N, H]
  const dw = new Float64Array(H); // [H]
  for (let n = 0; n < N; n++) {
    const r = rstd[n];
    let dot = 0; // sum_j g_j xhat_j
    for (let j = 0; j < H; j++) {
      const xhat = x[n * H + j] * r;
      const g = dy[n * H + j] * w[j];
      dot += g * xhat;
      dw[j] += dy[n * H + j] * xhat;
    }
    for (let j = 0; j < H; j++) {
      const xhat = x[n * H + j] * r;
      const g = dy[n * H + j] * w[j];
      dx[n * H + j] = r * (g - xhat * dot / H);
    }
  }
  return { dx, dw };
}

// ---------------------------------------------------------------------------
// RoPE, rotate-half convention (Hugging Face Llama, MiniMind): dimension i is
// paired with i + hd/2 and the pair is rotated by angle p * theta^(-2i/hd).

/**
 * RoPE forward on x `[B, T, nHeads, hd]`; the token at t has position `pos0 + t`.
 * For `i < hd/2`, `a = p * theta^(-2i/hd)`:
 *
 *   y[i]        = x[i] cos a - x[i + hd/2] sin a
 *   y[i + hd/2] = x[i + hd/2] cos a + x[i] sin a
 */
export function ropeForward(
  x: Float64Array,
  B: number,
  T: number,
  nHeads: number,
  hd: number,
  theta: number,
  pos0 = 0,
): Float64Array {
  return ropeRotate(x, B, T, nHeads, hd, theta, pos0, 1);
}

/**
 * RoPE backward. Each pair is multiplied by the rotation matrix
 * `R(a) = [[cos, -sin], [sin, cos]]`, so the gradient is `R(a)^T dy = R(-a) dy`:
 *
 *   dx[i]        =  dy[i] cos a + dy[i + hd/2] sin a
 *   dx[i + hd/2] = -dy[i] sin a + dy[i + hd/2] cos a
 */
export function ropeBackward(
  dy: Float64Array,
  B: number,
  T: number,
  nHeads: number,
  hd: number,
  theta: number,
  pos0 = 0,
): Float64Array {
  return ropeRotate(dy, B, T, nHeads, hd, theta, pos0, -1);
}

/** Rotates each (i, i + hd/2) pair by `sign * angle`. */
function ropeRotate(
  x: Float64Array,
  B: number,
  T: number,
  nHeads: number,
  hd: number,
  theta: number,
  pos0: number,
  sign: 1 | -1,
): Float64Array {
  const half = hd / 2;
  const y = new Float64Array(x.length); // [B, T, nHeads, hd]
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < T; t++) {
      const p = pos0 + t;
      for (let h = 0; h < nHeads; h++) {
        const base = ((b * T + t) * nHeads + h) * hd;
        for (let i = 0; i < half; i++) {
          const angle = p * Math.pow(theta, -2 * i / hd);
          const c = Math.cos(angle);
          const s = sign * Math.sin(angle);
          const x1 = x[base + i];
          const x2 = x[base + i + half];
          y[base + i] = x1 * c - x2 * s;
          y[base + i + half] = x2 * c + x1 * s;
        }
      }
    }
  }
  return y;
}

// ---------------------------------------------------------------------------
// Causal grouped-query attention.

/**
 * Causal GQA attention. q `[B, T, nH, hd]`, k and v `[B, T, nKV, hd]`; query
 * head h reads kv head `floor(h / (nH / nKV))`. With `s_j = (q_t . k_j) / sqrt(hd)`
 * for `j <= t`, `lse = log sum_j exp(s_j)` and `p_j = exp(s_j - lse)`:
 * `out_t = sum_j p_j v_j`. Returns out `[B, T, nH, hd]` and lse `[B, nH, T]`.
 */
export function attentionForward(
  q: Float64Array,
  k: Float64Array,
  v: Float64Array,
  B: number,
  T: number,
  nH: number,
  nKV: number,
  hd: number,
): { out: Float64Array; lse: Float64Array } {
  const scale = 1 / Math.sqrt(hd);
  const group = nH / nKV;
  const out = new Float64Array(B * T * nH * hd); // [B, T, nH, hd]
  const lse = new Float64Array(B * nH * T); // [B, nH, T]
  const s = new Float64Array(T);
  for (let b = 0; b < B; b++) {
    for (let h = 0; h < nH; h++) {
      const kvh = Math.floor(h / group);
      for (let t = 0; t < T; t++) {
        const qo = ((b * T + t) * nH + h) * hd;
        let max = -Infinity;
        for (let j = 0; j <= t; j++) {
          const ko = ((b * T + j) * nKV + kvh) * hd;
          let dot = 0;
          for (let d = 0; d < hd; d++) dot += q[qo + d] * k[ko + d];
          s[j] = dot * scale;
          if (s[j] > max) max = s[j];
        }
        let sum = 0;
        for (let j = 0; j <= t; j++) sum += Math.exp(s[j] - max);
        const l = max + Math.log(sum);
        lse[(b * nH + h) * T + t] = l;
        for (let j = 0; j <= t; j++) {
          const p = Math.exp(s[j] - l);
          const vo = ((b * T + j) * nKV + kvh) * hd;
          for (let d = 0; d < hd; d++) out[qo + d] += p * v[vo + d];
        }
      }
    }
  }
  return { out, lse };
}

/**
 * Causal GQA attention backward, recomputing the probabilities from lse (as a
 * flash-style kernel does). For one query row t with `p_j = exp(s_j - lse)`:
 *
 *   dv_j += p_j dOut_t                         (out = sum_j p_j v_j)
 *   dp_j  = dOut_t . v_j
 *   ds_j  = p_j (dp_j - D),  D = sum_j p_j dp_j = dOut_t . out_t   (softmax Jacobian)
 *   dq_t += scale * sum_j ds_j k_j,   dk_j += scale * ds_j q_t     (s_j = scale q_t . k_j)
 *
 * A kv head's dk and dv sum over the `nH / nKV` query heads that read it.
 */
export function attentionBackward(
  dOut: Float64Array,
  q: Float64Array,
  k: Float64Array,
  v: Float64Array,
  out: Float64Array,
  lse: Float64Array,
  B: number,
  T: number,
  nH: number,
  nKV: number,
  hd: number,
): { dq: Float64Array; dk: Float64Array; dv: Float64Array } {
  const scale = 1 / Math.sqrt(hd);
  const group = nH / nKV;
  const dq = new Float64Array(q.length); // [B, T, nH, hd]
  const dk = new Float64Array(k.length); // [B, T, nKV, hd]
  const dv = new Float64Array(v.length); // [B, T, nKV, hd]
  for (let b = 0; b < B; b++) {
    for (let h = 0; h < nH; h++) {
      const kvh = Math.floor(h / group);
      for (let t = 0; t < T; t++) {
        const qo = ((b * T + t) * nH + h) * hd;
        const l = lse[(b * nH + h) * T + t];
        let D = 0;
        for (let d = 0; d < hd; d++) D += dOut[qo + d] * out[qo + d];
        for (let j = 0; j <= t; j++) {
          const ko = ((b * T + j) * nKV + kvh) * hd;
          let dot = 0;
          for (let d = 0; d < hd; d++) dot += q[qo + d] * k[ko + d];
          const p = Math.exp(dot * scale - l);
          let dp = 0;
          for (let d = 0; d < hd; d++) {
            dv[ko + d] += p * dOut[qo + d];
            dp += dOut[qo + d] * v[ko + d];
          }
          const ds = p * (dp - D);
          for (let d = 0; d < hd; d++) {
            dq[qo + d] += scale * ds * k[ko + d];
            dk[ko + d] += scale * ds * q[qo + d];
          }
        }
      }
    }
  }
  return { dq, dk, dv };
}

// ---------------------------------------------------------------------------
// SwiGLU: h = silu(gate) * up, silu(g) = g * sigmoid(g).

function sigmoid(x: number): number {
  return 1 / (1 + Math.exp(-x));
}

/** `silu(gate) * up`, elementwise (any shape; typically `[N, I]`). */
export function swigluForward(gate: Float64Array, up: Float64Array): Float64Array {
  const h = new Float64Array(gate.length);
  for (let i = 0; i < gate.length; i++) h[i] = gate[i] * sigmoid(gate[i]) * up[i];
  return h;
}

/**
 * SwiGLU backward. With `s = sigmoid(g)`, `silu'(g) = s + g s (1 - s) = s (1 + g (1 - s))`:
 * `dgate = dh * up * silu'(g)`, `dup = dh * silu(g)`.
 */
export function swigluBackward(
  dh: Float64Array,
  gate: Float64Array,
  up: Float64Array,
): { dgate: Float64Array; dup: Float64Array } {
  const dgate = new Float64Array(gate.length);
  const dup = new Float64Array(gate.length);
  for (let i = 0; i < gate.length; i++) {
    const g = gate[i];
    const s = sigmoid(g);
    dgate[i] = dh[i] * up[i] * s * (1 + g * (1 - s));
    dup[i] = dh[i] * g * s;
  }
  return { dgate, dup };
}

// ---------------------------------------------------------------------------
// Cross-entropy with a per-token loss mask (weights).

/** `log sum_v exp(row[v])` of row n of logits `[N, V]`, stabilized by the row max. */
function rowLogSumExp(logits: Float64Array, n: number, V: number): number {
  let max = -Infinity;
  for (let j = 0; j < V; j++) max = Math.max(max, logits[n * V + j]);
  let sum = 0;
  for (let j = 0; j < V; j++) sum += Math.exp(logits[n * V + j] - max);
  return max + Math.log(sum);
}

function checkTarget(t: number, n: number, V: number): void {
  if (!(Number.isInteger(t) && t >= 0 && t < V)) {
    throw new RangeError(`cross-entropy: target ${t} at row ${n} is outside [0, ${V})`);
  }
}

/**
 * Masked mean cross-entropy. logits `[N, V]`, targets `[N]` (each in `[0, V)`,
 * masked rows included), mask `[N]` (weights, usually 0/1).
 * `rowLoss[i] = lse_i - logits[i, t_i]` is the unweighted loss of every row;
 * `loss = sum_i mask_i rowLoss_i / sum_i mask_i`, and 0 when the mask sums to 0.
 */
export function crossEntropyForward(
  logits: Float64Array,
  targets: ArrayLike<number>,
  mask: ArrayLike<number>,
  N: number,
  V: number,
): { loss: number; rowLoss: Float64Array } {
  const rowLoss = new Float64Array(N); // [N]
  let num = 0;
  let den = 0;
  for (let n = 0; n < N; n++) {
    checkTarget(targets[n], n, V);
    rowLoss[n] = rowLogSumExp(logits, n, V) - logits[n * V + targets[n]];
    num += mask[n] * rowLoss[n];
    den += mask[n];
  }
  return { loss: den === 0 ? 0 : num / den, rowLoss };
}

/**
 * Cross-entropy backward: `d rowLoss_i / d logits[i, v] = softmax_i[v] - [v = t_i]`,
 * so `dlogits[i] = mask_i / sum(mask) * (softmax_i - onehot(t_i))`; all zeros
 * when the mask sums to 0. Returns `[N, V]`.
 */
export function crossEntropyBackward(
  logits: Float64Array,
  targets: ArrayLike<number>,
  mask: ArrayLike<number>,
  N: number,
  V: number,
): Float64Array {
  const dlogits = new Float64Array(N * V); // [N, V]
  let den = 0;
  for (let n = 0; n < N; n++) den += mask[n];
  if (den === 0) return dlogits;
  for (let n = 0; n < N; n++) {
    checkTarget(targets[n], n, V);
    const wgt = mask[n] / den;
    if (wgt === 0) continue;
    const l = rowLogSumExp(logits, n, V);
    for (let j = 0; j < V; j++) dlogits[n * V + j] = wgt * Math.exp(logits[n * V + j] - l);
    dlogits[n * V + targets[n]] -= wgt;
  }
  return dlogits;
}

// ---------------------------------------------------------------------------
// Optimizer.

/** AdamW hyperparameters for one step; `step` counts from 1. */
export interface AdamWStepOptions {
  step: number;
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  /** 0 for tensors without decay (norm weights by default). */
  weightDecay: number;
}

/**
 * One AdamW step, in place, in PyTorch's order (decoupled decay applied first):
 *
 *   p -= lr * wd * p
 *   m  = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
 *   p -= lr * (m / (1 - b1^step)) / (sqrt(v / (1 - b2^step)) + eps)
 */
export function adamwStep(
  param: Float64Array,
  grad: Float64Array,
  m: Float64Array,
  v: Float64Array,
  o: AdamWStepOptions,
): void {
  const bc1 = 1 - Math.pow(o.beta1, o.step);
  const bc2 = 1 - Math.pow(o.beta2, o.step);
  for (let i = 0; i < param.length; i++) {
    const g = grad[i];
    param[i] -= o.lr * o.weightDecay * param[i];
    m[i] = o.beta1 * m[i] + (1 - o.beta1) * g;
    v[i] = o.beta2 * v[i] + (1 - o.beta2) * g * g;
    const mhat = m[i] / bc1;
    const vhat = v[i] / bc2;
    param[i] -= o.lr * mhat / (Math.sqrt(vhat) + o.eps);
  }
}

/** Global L2 norm of all gradients: `sqrt(sum over tensors and entries of g^2)`. */
export function gradNorm(grads: Float64Array[]): number {
  let ss = 0;
  for (const g of grads) for (let i = 0; i < g.length; i++) ss += g[i] * g[i];
  return Math.sqrt(ss);
}

/**
 * The factor gradients are multiplied by for global-norm clipping:
 * `min(1, maxNorm / (norm + 1e-6))` (PyTorch's `clip_grad_norm_`); 1 when
 * `maxNorm` is 0 (clipping off).
 */
export function clipScale(norm: number, maxNorm: number): number {
  if (maxNorm === 0) return 1;
  return Math.min(1, maxNorm / (norm + 1e-6));
}

// ---------------------------------------------------------------------------
// The whole model.

/** Float64 copies of float32 parameters (exact: every float32 is a float64). */
export function toFloat64Params(m: Map<string, Float32Array>): Map<string, Float64Array> {
  const out = new Map<string, Float64Array>();
  for (const [name, t] of m) out.set(name, Float64Array.from(t));
  return out;
}

/** What the backward pass needs from one layer's forward. */
interface LayerActivations {
  /** Residual stream entering the layer `[N, H]`. */
  x: Float64Array;
  /** `rmsnorm(x)` `[N, H]` and its rstd `[N]`. */
  h1: Float64Array;
  rstd1: Float64Array;
  /** Projections before QK-norm: q `[B, T, nH, hd]`, k `[B, T, nKV, hd]`. */
  qProj: Float64Array;
  kProj: Float64Array;
  /** QK-norm rstd, `[N * nH]` and `[N * nKV]` (empty without QK-norm). */
  rstdQ: Float64Array;
  rstdK: Float64Array;
  /** q and k after QK-norm and RoPE (what attention sees), and v `[B, T, nKV, hd]`. */
  q: Float64Array;
  k: Float64Array;
  v: Float64Array;
  /** Attention output `[B, T, nH, hd]` and its lse `[B, nH, T]`. */
  attn: Float64Array;
  lse: Float64Array;
  /** Residual stream after attention `[N, H]`, `rmsnorm` of it and its rstd. */
  xMid: Float64Array;
  h2: Float64Array;
  rstd2: Float64Array;
  /** MLP gate and up projections `[N, I]` and `silu(gate) * up` `[N, I]`. */
  gate: Float64Array;
  up: Float64Array;
  act: Float64Array;
}

interface ForwardState {
  layers: LayerActivations[];
  /** Residual stream after the last layer `[N, H]`, its final norm and rstd. */
  xLast: Float64Array;
  xFinal: Float64Array;
  rstdFinal: Float64Array;
  /** `[N, V]`. */
  logits: Float64Array;
  loss: number;
}

function param(params: Map<string, Float64Array>, name: string): Float64Array {
  const p = params.get(name);
  if (!p) throw new Error(`reference model: missing parameter ${name}`);
  return p;
}

function addInto(a: Float64Array, b: Float64Array): void {
  for (let i = 0; i < a.length; i++) a[i] += b[i];
}

function added(a: Float64Array, b: Float64Array): Float64Array {
  const c = Float64Array.from(a);
  addInto(c, b);
  return c;
}

function forwardWithActivations(
  config: ModelConfig,
  params: Map<string, Float64Array>,
  batch: Batch,
): ForwardState {
  const { B, T } = batch;
  const N = B * T;
  const H = config.hidden_size;
  const nH = config.num_attention_heads;
  const nKV = config.num_key_value_heads;
  const hd = headDim(config);
  const I = config.intermediate_size;
  const V = config.vocab_size;
  const eps = config.rms_norm_eps;
  const theta = config.rope_theta;

  const names = tensorNames(config);
  let x = embeddingForward(param(params, names.embed), batch.ids, H); // [N, H]
  const layers: LayerActivations[] = [];
  for (let l = 0; l < config.num_hidden_layers; l++) {
    const w = names.layers[l];
    const p = (name: string | undefined) => param(params, name!);
    const n1 = rmsnormForward(x, p(w.inputNorm), N, H, eps);
    const qProj = matmulXWt(n1.y, p(w.q), N, H, nH * hd); // [B, T, nH, hd]
    const kProj = matmulXWt(n1.y, p(w.k), N, H, nKV * hd); // [B, T, nKV, hd]
    const v = matmulXWt(n1.y, p(w.v), N, H, nKV * hd); // [B, T, nKV, hd]
    let qn = qProj;
    let kn = kProj;
    let rstdQ: Float64Array = new Float64Array(0);
    let rstdK: Float64Array = new Float64Array(0);
    if (config.qk_norm) {
      // Per-head RMSNorm: each (token, head) vector of hd is a row.
      const nq = rmsnormForward(qProj, p(w.qNorm), N * nH, hd, eps);
      const nk = rmsnormForward(kProj, p(w.kNorm), N * nKV, hd, eps);
      qn = nq.y;
      kn = nk.y;
      rstdQ = nq.rstd;
      rstdK = nk.rstd;
    }
    const q = ropeForward(qn, B, T, nH, hd, theta);
    const k = ropeForward(kn, B, T, nKV, hd, theta);
    const a = attentionForward(q, k, v, B, T, nH, nKV, hd);
    const xMid = added(x, matmulXWt(a.out, p(w.o), N, nH * hd, H));
    const n2 = rmsnormForward(xMid, p(w.postNorm), N, H, eps);
    const gate = matmulXWt(n2.y, p(w.gate), N, H, I); // [N, I]
    const up = matmulXWt(n2.y, p(w.up), N, H, I); // [N, I]
    const act = swigluForward(gate, up);
    const xOut = added(xMid, matmulXWt(act, p(w.down), N, I, H));
    layers.push({
      x,
      h1: n1.y,
      rstd1: n1.rstd,
      qProj,
      kProj,
      rstdQ,
      rstdK,
      q,
      k,
      v,
      attn: a.out,
      lse: a.lse,
      xMid,
      h2: n2.y,
      rstd2: n2.rstd,
      gate,
      up,
      act,
    });
    x = xOut;
  }
  const nf = rmsnormForward(x, param(params, names.norm), N, H, eps);
  const logits = matmulXWt(nf.y, param(params, names.head), N, H, V); // [N, V]
  const { loss } = crossEntropyForward(logits, batch.targets, batch.mask, N, V);
  return { layers, xLast: x, xFinal: nf.y, rstdFinal: nf.rstd, logits, loss };
}

/**
 * The model's forward pass: embedding, the layers, final norm, head, masked
 * cross-entropy. Returns the loss and the logits `[B * T, V]`.
 */
export function modelForward(
  config: ModelConfig,
  params: Map<string, Float64Array>,
  batch: Batch,
): { loss: number; logits: Float64Array } {
  const s = forwardWithActivations(config, params, batch);
  return { loss: s.loss, logits: s.logits };
}

/**
 * Loss and the gradient of every parameter (same names as `params`), by the
 * backward of each op in reverse order. Residual connections add their
 * incoming gradients; with a tied head the embedding's gradient is the head's
 * `dlogits^T xFinal` plus the lookup's scatter.
 */
export function modelLossAndGrads(
  config: ModelConfig,
  params: Map<string, Float64Array>,
  batch: Batch,
): { loss: number; grads: Map<string, Float64Array> } {
  const { B, T } = batch;
  const N = B * T;
  const H = config.hidden_size;
  const nH = config.num_attention_heads;
  const nKV = config.num_key_value_heads;
  const hd = headDim(config);
  const I = config.intermediate_size;
  const V = config.vocab_size;
  const theta = config.rope_theta;
  const s = forwardWithActivations(config, params, batch);
  const grads = new Map<string, Float64Array>();
  const names = tensorNames(config);

  const dlogits = crossEntropyBackward(s.logits, batch.targets, batch.mask, N, V); // [N, V]
  const headW = param(params, names.head);
  const dHead = matmulDyTX(dlogits, s.xFinal, N, V, H); // [V, H]
  const nf = rmsnormBackward(
    matmulDyW(dlogits, headW, N, V, H),
    s.xLast,
    param(params, names.norm),
    s.rstdFinal,
    N,
    H,
  );
  grads.set(names.norm, nf.dw);
  let dx = nf.dx; // gradient of the residual stream, [N, H]

  for (let l = config.num_hidden_layers - 1; l >= 0; l--) {
    const a = s.layers[l];
    const w = names.layers[l];
    const p = (name: string | undefined) => param(params, name!);

    // MLP: x_out = x_mid + down(silu(gate(h2)) * up(h2)), h2 = rmsnorm(x_mid).
    grads.set(w.down, matmulDyTX(dx, a.act, N, H, I));
    const dact = matmulDyW(dx, p(w.down), N, H, I); // [N, I]
    const { dgate, dup } = swigluBackward(dact, a.gate, a.up);
    grads.set(w.gate, matmulDyTX(dgate, a.h2, N, I, H));
    grads.set(w.up, matmulDyTX(dup, a.h2, N, I, H));
    const dh2 = added(matmulDyW(dgate, p(w.gate), N, I, H), matmulDyW(dup, p(w.up), N, I, H));
    const n2 = rmsnormBackward(dh2, a.xMid, p(w.postNorm), a.rstd2, N, H);
    grads.set(w.postNorm, n2.dw);
    dx = added(dx, n2.dx); // residual: d x_mid = d x_out + through the MLP branch

    // Attention: x_mid = x + o(attn(rope(qknorm(q(h1))), rope(qknorm(k(h1))), v(h1))).
    grads.set(w.o, matmulDyTX(dx, a.attn, N, H, nH * hd));
    const dattn = matmulDyW(dx, p(w.o), N, H, nH * hd);
    const g = attentionBackward(dattn, a.q, a.k, a.v, a.attn, a.lse, B, T, nH, nKV, hd);
    let dq = ropeBackward(g.dq, B, T, nH, hd, theta);
    let dk = ropeBackward(g.dk, B, T, nKV, hd, theta);
    if (config.qk_norm) {
      const nq = rmsnormBackward(dq, a.qProj, p(w.qNorm), a.rstdQ, N * nH, hd);
      const nk = rmsnormBackward(dk, a.kProj, p(w.kNorm), a.rstdK, N * nKV, hd);
      grads.set(w.qNorm!, nq.dw);
      grads.set(w.kNorm!, nk.dw);
      dq = nq.dx;
      dk = nk.dx;
    }
    grads.set(w.q, matmulDyTX(dq, a.h1, N, nH * hd, H));
    grads.set(w.k, matmulDyTX(dk, a.h1, N, nKV * hd, H));
    grads.set(w.v, matmulDyTX(g.dv, a.h1, N, nKV * hd, H));
    const dh1 = matmulDyW(dq, p(w.q), N, nH * hd, H);
    addInto(dh1, matmulDyW(dk, p(w.k), N, nKV * hd, H));
    addInto(dh1, matmulDyW(g.dv, p(w.v), N, nKV * hd, H));
    const n1 = rmsnormBackward(dh1, a.x, p(w.inputNorm), a.rstd1, N, H);
    grads.set(w.inputNorm, n1.dw);
    dx = added(dx, n1.dx);
  }

  const dEmbed = embeddingBackward(dx, batch.ids, V, H);
  if (config.tie_word_embeddings) {
    addInto(dEmbed, dHead);
  } else {
    grads.set(names.head, dHead);
  }
  grads.set(names.embed, dEmbed);
  return { loss: s.loss, grads };
}
