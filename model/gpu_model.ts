/**
 * The whole transformer on the GPU: forward, backward and AdamW for a batch
 * `[B, T]`, built from the kernels in `kernels/`.
 *
 * Everything lives in GPU buffers for the whole run: one buffer per parameter
 * tensor, one per gradient, one per AdamW moment (names, shapes and order from
 * `parameterSpecs`), and the activations of one `[B, T]` micro-batch, allocated
 * once. Every pipeline, bind group and dispatch is created in `create`; a
 * training step only writes the batch (ids, targets, mask, the embedding
 * backward's token groups) and two tiny scalar buffers (the cross-entropy
 * scale, the AdamW hyperparameters), then records the prepared dispatches into
 * one command encoder per micro-batch (each must see its own batch: queue
 * writes land between submits) and submits without waiting. The loss and the
 * gradient norm come back only when asked. (`clipScale` bakes its threshold
 * into a uniform, so each clipping threshold gets its dispatch prepared ahead:
 * `create`'s `gradClip` option or `prepareGradClip`.)
 *
 * Forward (N = B*T rows, per layer l; `x_l` is the residual stream entering it):
 *
 *   x_0  = E[ids]                                   embedding
 *   h1   = rmsnorm(x_l) * w_in                      (fused into the previous layer's add)
 *   q, k, v = h1 Wq^T, h1 Wk^T, h1 Wv^T
 *   q, k = rmsnorm_hd(q) * w_qn, rmsnorm_hd(k) * w_kn    (QK-norm only, per head over hd)
 *   q, k = rope(q), rope(k)                          in place
 *   a    = attention(q, k, v)                        flash-style, lse kept
 *   m_l  = x_l + a Wo^T;  h2 = rmsnorm(m_l) * w_post   (one fused add + norm)
 *   act  = silu(h2 Wg^T) * (h2 Wu^T)
 *   x_l+1 = m_l + act Wd^T;  h1' = rmsnorm(x_l+1) * w_in'  (or the final norm)
 *   logits = xf Whead^T, loss = masked mean CE      in row chunks (see below)
 *
 * The residual adds are fused with the norm that follows them
 * (`addRmsnormForward`, which adds `delta` into `x` in place). To keep every
 * `x_l` and `m_l` for the backward without a copy, the projection writes its
 * output into the NEXT stream buffer and the fused kernel adds the previous
 * stream into it (`x = (a Wo^T) + x_l`; float addition is commutative, so this
 * is bitwise the same as `x_l + a Wo^T`).
 *
 * What is stored for the backward and what is recomputed: per layer we keep
 * `x_l`, `h1`, `rstd1`, q and k after RoPE (and before QK-norm their raw
 * projections and the per-head rstd, which the norm's backward needs), v, the
 * attention output and its lse, `m_l`, `h2`, `rstd2`, gate and up. `x_l` and
 * `m_l` cannot be recovered from the normed outputs (that would divide by the
 * norm weight, which may be 0). `act = silu(gate) * up` is the one tensor we
 * recompute: it is the largest activation ([N, I], I ~ 2.75 H) and costs one
 * elementwise pass to rebuild, so one shared scratch buffer serves every
 * layer's forward and backward (and then holds `d act`). The attention
 * probabilities are never stored (the kernel recomputes them from the lse).
 * Per layer that is (6 H + 2 kvDim + 2 I) N floats, plus (H + kvDim) N with
 * QK-norm: 101 MB for minimind2-small at B=8, T=512 (parameters, gradients
 * and moments: 4 x 103 MB).
 *
 * Logits: `[N, V]` can exceed `maxStorageBufferBindingSize` (minimind2-small
 * at B=16, T=512: 210 MB), so the head runs in row chunks: for each chunk,
 * logits = xf_c Whead^T, the cross-entropy writes `dlogits` in place over the
 * logits, then `dWhead += dlogits^T xf_c` and `dxf_c = dlogits Whead`. The
 * head's forward and backward are adjacent, so only one chunk of logits ever
 * exists. With a tied head `dWhead` is the embedding's gradient, which the
 * embedding backward later adds its scatter to.
 *
 * The gradients are cleared at the start of a step and every gradient kernel
 * adds into them (`accumulate: true` for the dW matmuls; rmsnorm dw and the
 * embedding backward always add), so micro-batches of one step simply sum,
 * with the cross-entropy scale 1 / (mask sum over the whole step) making the
 * sum the step's masked mean. No float atomics anywhere: same inputs, same bits.
 *
 * @module
 */

import {
  type Binding,
  type Dispatch,
  formatBytes,
  type Gpu,
  recordDispatches,
} from "../kernels/runtime.ts";
import { matmulDyTX, matmulDyW, matmulXWt } from "../kernels/matmul.ts";
import { attentionBackward, attentionForward } from "../kernels/attention.ts";
import { ropeBackward, ropeForward } from "../kernels/rope.ts";
import {
  embeddingBackward,
  embeddingForward,
  type EmbeddingGroups,
  groupByToken,
} from "../kernels/embedding.ts";
import { addRmsnormForward, rmsnormBackward, rmsnormForward } from "../kernels/rmsnorm.ts";
import { swigluBackward, swigluForward } from "../kernels/swiglu.ts";
import { crossEntropy } from "../kernels/cross_entropy.ts";
import { clipScale, gradNormPartialsSize, gradNormSquared } from "../kernels/grad_norm.ts";
import { adamw, adamwHyper } from "../kernels/adamw.ts";
import { headDim, type ModelConfig } from "./config.ts";
import { initParameters, parameterSpecs, type ParamSpec } from "./params.ts";
import { UserError } from "../util/errors.ts";

/** One micro-batch: token ids, next-token targets and the loss mask, each `[B, T]` row-major. */
export interface GpuBatch {
  /** Input token ids, each in `[0, vocab_size)`. */
  ids: Int32Array;
  /** Next-token targets, each in `[0, vocab_size)` (masked positions included). */
  targets: Int32Array;
  /** Per-token loss weight (0 = not trained on). */
  mask: Float32Array;
}

/** AdamW and clipping settings of one step. */
export interface AdamWSettings {
  /** Learning rate of this step (also scales the weight decay: `p -= lr * weightDecay * p`). */
  lr: number;
  /** First-moment decay rate (e.g. 0.9). */
  beta1: number;
  /** Second-moment decay rate (e.g. 0.95 or 0.999). */
  beta2: number;
  /** Added to `sqrt(v_hat)` in the update's denominator. */
  eps: number;
  /** Decoupled weight decay, applied to tensors whose `ParamSpec.decay` is true. */
  weightDecay: number;
  /** Global-norm clipping threshold; 0 = off. */
  gradClip: number;
}

/** Options of `GpuModel.create`. */
export interface GpuModelOptions {
  /** Rows B of every micro-batch. */
  batchSize: number;
  /** Columns T of every micro-batch. */
  seqLen: number;
  /** Initial parameters by name; default `initParameters(config, seed)`. */
  params?: Map<string, Float32Array>;
  /** Seed of the default initialization (default 0). */
  seed?: number;
  /**
   * Rows per head chunk (logits `[rows, V]`). Default: as many as fit in
   * `LOGITS_CHUNK_BYTES` and the device's binding limit. Rounded up to the
   * device's storage offset alignment; tests use it to force several chunks.
   */
  logitsChunkRows?: number;
  /**
   * Clipping thresholds `step` will be called with, prepared now (0 = off and
   * 1 are always prepared); others can be added with `prepareGradClip`.
   */
  gradClip?: number | number[];
}

/**
 * Bytes one chunk of logits may take by default. Beyond a few thousand rows
 * a bigger chunk buys nothing (the head matmul is already large) but memory.
 */
export const LOGITS_CHUNK_BYTES = 64 * 1024 * 1024;

/** A tensor the model allocates, for the up-front limit check. */
interface TensorPlan {
  name: string;
  shape: string;
  bytes: number;
  /** What the user can lower to shrink it. */
  lower: string;
}

const LOWER_BATCH = "lower --batch-size or --seq-len";
const LOWER_MODEL = "use a smaller model (hidden_size, intermediate_size, vocab_size)";

/** Byte alignment of storage binding offsets, as a row count of f32 rows of any width. */
function rowAlignment(limits: GPUSupportedLimits): number {
  return Math.max(1, Math.ceil(limits.minStorageBufferOffsetAlignment / 4));
}

/**
 * Rows per head chunk (logits `[rows, V]`) for `rows` = B*T: all of them when
 * they fit the byte budget (`LOGITS_CHUNK_BYTES`, or `requested` rows) and the
 * binding limits; otherwise a multiple of the storage offset alignment (chunk
 * c binds `xf[r0 .. r0 + chunk)` and `targets[r0 ..]`, and `r0 * 4` bytes must
 * be aligned) that fits. 0 when not even one aligned group of rows fits.
 */
export function logitsChunkRows(
  limits: GPUSupportedLimits,
  V: number,
  rows: number,
  requested?: number,
): number {
  const align = rowAlignment(limits);
  const bindLimit = Math.min(limits.maxStorageBufferBindingSize, limits.maxBufferSize);
  const fit = Math.floor(bindLimit / (V * 4));
  const wanted = requested ?? Math.floor(LOGITS_CHUNK_BYTES / (V * 4));
  if (rows <= fit && rows <= wanted) return rows;
  // Requested rows round up to the alignment; the byte budget, a cap, rounds
  // down. Either way no more than fits the binding.
  let r = requested !== undefined
    ? Math.ceil(requested / align) * align
    : Math.floor(wanted / align) * align;
  r = Math.min(Math.max(r, align), Math.floor(fit / align) * align);
  return r >= rows ? rows : r;
}

function planTensors(config: ModelConfig, B: number, T: number): TensorPlan[] {
  const N = B * T;
  const H = config.hidden_size;
  const hd = headDim(config);
  const nH = config.num_attention_heads;
  const nKV = config.num_key_value_heads;
  const I = config.intermediate_size;
  const plans: TensorPlan[] = [];
  for (const s of parameterSpecs(config)) {
    plans.push({
      name: `parameter ${s.name}`,
      shape: `[${s.shape.join(", ")}]`,
      bytes: s.size * 4,
      lower: LOWER_MODEL,
    });
  }
  const act = (name: string, dims: [string, number][]) =>
    plans.push({
      name,
      shape: `[${dims.map(([d, v]) => `${d}=${v}`).join(", ")}]`,
      bytes: dims.reduce((a, [, v]) => a * v, 4),
      lower: LOWER_BATCH,
    });
  act("residual stream / hidden activations", [["B*T", N], ["hidden_size", H]]);
  act("query activations", [["B*T", N], ["heads*head_dim", nH * hd]]);
  act("key/value activations", [["B*T", N], ["kv_heads*head_dim", nKV * hd]]);
  act("MLP activations (gate, up)", [["B*T", N], ["intermediate_size", I]]);
  act("attention log-sum-exp", [["B", B], ["heads", nH], ["T", T]]);
  return plans;
}

/**
 * Refuses, before anything is allocated, a model and batch that this device
 * cannot hold: every tensor is bound whole by some kernel, so each must fit
 * both `maxBufferSize` and `maxStorageBufferBindingSize`, except the logits,
 * which are computed in row chunks sized to fit (refused only when not even
 * one aligned group of rows fits). Throws a `UserError` naming the tensor, its
 * shape and size, the limit and what to lower.
 */
export function checkDeviceLimits(
  limits: GPUSupportedLimits,
  config: ModelConfig,
  batchSize: number,
  seqLen: number,
): void {
  const bindingIsSmaller = limits.maxStorageBufferBindingSize <= limits.maxBufferSize;
  const limit = bindingIsSmaller ? limits.maxStorageBufferBindingSize : limits.maxBufferSize;
  const limitName = bindingIsSmaller ? "maxStorageBufferBindingSize" : "maxBufferSize";
  for (const t of planTensors(config, batchSize, seqLen)) {
    if (t.bytes > limit) {
      throw new UserError(
        `this GPU cannot hold the model at batch ${batchSize} x ${seqLen}: tensor ${t.name} ` +
          `${t.shape} needs ${formatBytes(t.bytes)}, over the device's ${limitName} of ` +
          `${formatBytes(limit)}; ${t.lower}.`,
      );
    }
  }
  const V = config.vocab_size;
  if (logitsChunkRows(limits, V, batchSize * seqLen) < 1) {
    const align = rowAlignment(limits);
    throw new UserError(
      `this GPU cannot hold the model: one chunk of logits [${align} rows, vocab_size=${V}] ` +
        `needs ${formatBytes(align * V * 4)}, over the device's ${limitName} of ` +
        `${formatBytes(limit)}; use a smaller vocab_size.`,
    );
  }
}

/** The buffers of one layer's activations kept for the backward. */
interface LayerActivations {
  /** Residual stream entering the layer `[N, H]`. */
  x: GPUBuffer;
  /** `rmsnorm(x) * w_in` `[N, H]`, its rstd `[N]`. */
  h1: GPUBuffer;
  rstd1: GPUBuffer;
  /** Raw q/k projections `[N, nH*hd]`, `[N, nKV*hd]` and the per-head rstd (QK-norm only). */
  qProj?: GPUBuffer;
  kProj?: GPUBuffer;
  rstdQ?: GPUBuffer;
  rstdK?: GPUBuffer;
  /** q, k after (QK-norm and) RoPE, v: `[B, T, nH, hd]`, `[B, T, nKV, hd]`. */
  q: GPUBuffer;
  k: GPUBuffer;
  v: GPUBuffer;
  /** Attention output `[B, T, nH, hd]`, lse `[B, nH, T]`. */
  attn: GPUBuffer;
  lse: GPUBuffer;
  /** Residual stream after attention `[N, H]`, its norm and rstd. */
  xMid: GPUBuffer;
  h2: GPUBuffer;
  rstd2: GPUBuffer;
  /** MLP projections `[N, I]`. */
  gate: GPUBuffer;
  up: GPUBuffer;
}

/** Dispatches of one head chunk. */
interface HeadChunk {
  /** logits = xf_c Whead^T. */
  logits: Dispatch;
  /** Cross-entropy into the training loss (scale = 1 / step mask sum). */
  lossTrain: Dispatch[];
  /** Cross-entropy into the evaluation loss sum (scale 1). */
  lossEval: Dispatch[];
  /** dWhead += dlogits^T xf_c; dxf_c = dlogits Whead. */
  backward: Dispatch[];
}

/**
 * The model on the GPU. Create with `GpuModel.create`; a training step is
 * `step(microBatches, settings, stepNumber)`.
 *
 * @example
 * ```ts ignore
 * const model = await GpuModel.create(gpu, presetConfig("tiny"), { batchSize: 8, seqLen: 256 });
 * model.step([batch], { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1, gradClip: 1 }, 1);
 * console.log(await model.readLoss());
 * ```
 */
export class GpuModel {
  /** The model's shape. */
  readonly config: ModelConfig;
  /** Rows B of every micro-batch. */
  readonly batchSize: number;
  /** Columns T of every micro-batch. */
  readonly seqLen: number;

  /** Number of row chunks the head (logits + cross-entropy) runs in. */
  get headChunks(): number {
    return this.#headChunks.length;
  }

  #gpu: Gpu;
  #specs: ParamSpec[];
  #params = new Map<string, GPUBuffer>();
  #grads = new Map<string, GPUBuffer>();
  #m = new Map<string, GPUBuffer>();
  #v = new Map<string, GPUBuffer>();
  #owned: GPUBuffer[] = [];

  // Batch inputs [N].
  #ids!: GPUBuffer;
  #targets!: GPUBuffer;
  #mask!: GPUBuffer;
  // Per-step scalars.
  #ceScale!: GPUBuffer; // [1] 1 / mask sum of the step
  #one!: GPUBuffer; // [1] 1.0, the evaluation's CE scale
  #loss!: GPUBuffer; // [1] the step's mean masked loss
  #evalLoss!: GPUBuffer; // [1] evaluation: sum of mask * rowLoss
  #hyper!: GPUBuffer; // adamwHyper(...)
  #normSq!: GPUBuffer; // [1] sum of squares of all gradients
  #clip!: GPUBuffer; // [1] the clip factor AdamW multiplies gradients by

  #forward: Dispatch[] = [];
  #headChunks: HeadChunk[] = [];
  #backward: Dispatch[] = [];
  #embeddingBackward!: Dispatch;
  #uploadGroups!: (groups: EmbeddingGroups) => void;
  /** Global gradient norm squared (before clipping) into #normSq. */
  #gradNorm: Dispatch[] = [];
  /** The clip factor dispatch for each prepared threshold (the kernel bakes it in a uniform). */
  #clipScale = new Map<number, Dispatch>();
  #adamw: Dispatch[] = [];

  private constructor(gpu: Gpu, config: ModelConfig, batchSize: number, seqLen: number) {
    this.#gpu = gpu;
    this.config = { ...config };
    this.batchSize = batchSize;
    this.seqLen = seqLen;
    this.#specs = parameterSpecs(config);
  }

  /**
   * Allocates parameters (uploaded from `opts.params` or a fresh
   * initialization), gradients, AdamW moments (zero) and the activations of a
   * `[batchSize, seqLen]` micro-batch, and prepares every dispatch.
   * Throws a `UserError` when the device's limits cannot hold them.
   */
  static async create(gpu: Gpu, config: ModelConfig, opts: GpuModelOptions): Promise<GpuModel> {
    const { batchSize: B, seqLen: T } = opts;
    if (!Number.isInteger(B) || B < 1 || !Number.isInteger(T) || T < 1) {
      throw new UserError(
        `batch size and sequence length must be positive integers, got ${B} x ${T}`,
      );
    }
    if (T > config.max_position_embeddings) {
      throw new UserError(
        `sequence length ${T} exceeds the model's max_position_embeddings (${config.max_position_embeddings}); lower --seq-len`,
      );
    }
    checkDeviceLimits(gpu.limits, config, B, T);
    const model = new GpuModel(gpu, config, B, T);
    try {
      model.#allocateParameters(opts.params ?? initParameters(config, opts.seed ?? 0));
      await model.#build(opts.logitsChunkRows);
      for (const c of [0, 1, ...[opts.gradClip ?? []].flat()]) await model.prepareGradClip(c);
    } catch (e) {
      model.destroy();
      throw e;
    }
    return model;
  }

  #buffer(data: Float32Array | Int32Array | number, label: string): GPUBuffer {
    const b = this.#gpu.createBuffer(data, label);
    this.#owned.push(b);
    return b;
  }

  #allocateParameters(params: Map<string, Float32Array>): void {
    this.#checkTensorMap(params, "parameters");
    for (const s of this.#specs) {
      this.#params.set(s.name, this.#buffer(params.get(s.name)!, s.name));
      this.#grads.set(s.name, this.#buffer(s.size * 4, `grad ${s.name}`));
      this.#m.set(s.name, this.#buffer(s.size * 4, `adam m ${s.name}`));
      this.#v.set(s.name, this.#buffer(s.size * 4, `adam v ${s.name}`));
    }
  }

  #checkTensorMap(m: Map<string, Float32Array>, what: string): void {
    for (const s of this.#specs) {
      const t = m.get(s.name);
      if (!t) throw new UserError(`${what}: missing tensor ${s.name}`);
      if (t.length !== s.size) {
        throw new UserError(
          `${what}: tensor ${s.name} has ${t.length} values, expected ${s.size} ([${
            s.shape.join(", ")
          }])`,
        );
      }
    }
  }

  async #build(requestedChunkRows?: number): Promise<void> {
    const gpu = this.#gpu;
    const c = this.config;
    const B = this.batchSize;
    const T = this.seqLen;
    const N = B * T;
    const H = c.hidden_size;
    const nH = c.num_attention_heads;
    const nKV = c.num_key_value_heads;
    const hd = headDim(c);
    const qDim = nH * hd;
    const kvDim = nKV * hd;
    const I = c.intermediate_size;
    const V = c.vocab_size;
    const L = c.num_hidden_layers;
    const eps = c.rms_norm_eps;
    const theta = c.rope_theta;
    const qk = c.qk_norm;
    const f32 = (n: number) => n * 4;
    const P = (name: string) => this.#params.get(name)!;
    const G = (name: string) => this.#grads.get(name)!;
    const lp = (l: number, s: string) => `model.layers.${l}.${s}`;
    const headName = c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";

    this.#ids = this.#buffer(f32(N), "ids [B, T]");
    this.#targets = this.#buffer(f32(N), "targets [B, T]");
    this.#mask = this.#buffer(f32(N), "mask [B, T]");
    this.#ceScale = this.#buffer(f32(1), "cross-entropy scale");
    this.#one = this.#buffer(new Float32Array([1]), "one");
    this.#loss = this.#buffer(f32(1), "loss");
    this.#evalLoss = this.#buffer(f32(1), "eval loss sum");
    this.#normSq = this.#buffer(f32(1), "grad norm squared");
    this.#clip = this.#buffer(f32(1), "grad clip scale");
    this.#hyper = this.#buffer(
      adamwHyper({
        lr: 0,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weightDecay: 0,
        step: 1,
      }),
      "adamw hyper",
    );

    // Activations kept for the backward, one set per layer.
    const layers: LayerActivations[] = [];
    for (let l = 0; l < L; l++) {
      const a = (n: number, what: string) => this.#buffer(f32(n), `layer ${l} ${what}`);
      layers.push({
        x: a(N * H, "x [N, H]"),
        h1: a(N * H, "h1 [N, H]"),
        rstd1: a(N, "rstd1 [N]"),
        qProj: qk ? a(N * qDim, "q proj [B, T, nH, hd]") : undefined,
        kProj: qk ? a(N * kvDim, "k proj [B, T, nKV, hd]") : undefined,
        rstdQ: qk ? a(N * nH, "q-norm rstd [N * nH]") : undefined,
        rstdK: qk ? a(N * nKV, "k-norm rstd [N * nKV]") : undefined,
        q: a(N * qDim, "q [B, T, nH, hd]"),
        k: a(N * kvDim, "k [B, T, nKV, hd]"),
        v: a(N * kvDim, "v [B, T, nKV, hd]"),
        attn: a(N * qDim, "attention out [B, T, nH, hd]"),
        lse: a(B * nH * T, "attention lse [B, nH, T]"),
        xMid: a(N * H, "x mid [N, H]"),
        h2: a(N * H, "h2 [N, H]"),
        rstd2: a(N, "rstd2 [N]"),
        gate: a(N * I, "gate [N, I]"),
        up: a(N * I, "up [N, I]"),
      });
    }
    const xLast = this.#buffer(f32(N * H), "x after the last layer [N, H]");
    const xFinal = this.#buffer(f32(N * H), "final norm out [N, H]");
    const rstdFinal = this.#buffer(f32(N), "final rstd [N]");
    // act = silu(gate) * up for the layer at hand, rebuilt in the backward; then d act.
    const mlpScratch = this.#buffer(f32(N * I), "act / d act [N, I]");
    // Backward scratch shared by all layers.
    const dResid = this.#buffer(f32(N * H), "d residual [N, H]");
    const dH = this.#buffer(f32(N * H), "d normed input [N, H]"); // also d xf for the head
    const dGate = this.#buffer(f32(N * I), "d gate [N, I]");
    const dUp = this.#buffer(f32(N * I), "d up [N, I]");
    const dAttn = this.#buffer(f32(N * qDim), "d attention out [B, T, nH, hd]");
    const dq = this.#buffer(f32(N * qDim), "d q [B, T, nH, hd]");
    const dk = this.#buffer(f32(N * kvDim), "d k [B, T, nKV, hd]");
    const dv = this.#buffer(f32(N * kvDim), "d v [B, T, nKV, hd]");
    const dqProj = qk ? this.#buffer(f32(N * qDim), "d q proj [B, T, nH, hd]") : dq;
    const dkProj = qk ? this.#buffer(f32(N * kvDim), "d k proj [B, T, nKV, hd]") : dk;

    // Linear layer y = x W^T over the N rows and its two backward products
    // (dW += dy^T x, accumulated across micro-batches; dx (+)= dy W).
    const linear = (x: GPUBuffer, w: GPUBuffer, y: GPUBuffer, K: number, out: number) =>
      matmulXWt(gpu, { x, w, y, M: N, K, N: out });
    const linearDw = (dy: GPUBuffer, x: GPUBuffer, dw: GPUBuffer, out: number, K: number) =>
      matmulDyTX(gpu, { dy, x, dw, M: N, N: out, K, accumulate: true });
    const linearDx = (
      dy: GPUBuffer,
      w: GPUBuffer,
      dx: GPUBuffer,
      out: number,
      K: number,
      accumulate = false,
    ) => matmulDyW(gpu, { dy, w, dx, M: N, N: out, K, accumulate });
    const rope = (x: GPUBuffer, nHeads: number) => ropeForward(gpu, { x, B, T, nHeads, hd, theta });
    // RoPE rotates each pair by R(a), so d(pre-rope) = R(-a) d(post-rope), in place.
    const ropeBack = (dx: GPUBuffer, nHeads: number) =>
      ropeBackward(gpu, { dx, B, T, nHeads, hd, theta });

    // ---- Forward.
    const fwd: Dispatch[] = [
      await embeddingForward(gpu, {
        weight: P("model.embed_tokens.weight"),
        ids: this.#ids,
        out: layers[0].x,
        N,
        H,
      }),
      await rmsnormForward(gpu, {
        x: layers[0].x,
        w: P(lp(0, "input_layernorm.weight")),
        y: layers[0].h1,
        rstd: layers[0].rstd1,
        N,
        H,
        eps,
      }),
    ];
    for (let l = 0; l < L; l++) {
      const a = layers[l];
      const W = (s: string) => P(lp(l, s));
      fwd.push(
        await linear(a.h1, W("self_attn.q_proj.weight"), a.qProj ?? a.q, H, qDim),
        await linear(a.h1, W("self_attn.k_proj.weight"), a.kProj ?? a.k, H, kvDim),
        await linear(a.h1, W("self_attn.v_proj.weight"), a.v, H, kvDim),
      );
      if (qk) {
        // Per-head RMSNorm: each (token, head) vector of hd values is one row.
        fwd.push(
          await rmsnormForward(gpu, {
            x: a.qProj!,
            w: W("self_attn.q_norm.weight"),
            y: a.q,
            rstd: a.rstdQ!,
            N: N * nH,
            H: hd,
            eps,
          }),
          await rmsnormForward(gpu, {
            x: a.kProj!,
            w: W("self_attn.k_norm.weight"),
            y: a.k,
            rstd: a.rstdK!,
            N: N * nKV,
            H: hd,
            eps,
          }),
        );
      }
      const last = l === L - 1;
      const next = last ? xLast : layers[l + 1].x;
      fwd.push(
        await rope(a.q, nH),
        await rope(a.k, nKV),
        await attentionForward(gpu, {
          q: a.q,
          k: a.k,
          v: a.v,
          out: a.attn,
          lse: a.lse,
          B,
          T,
          nH,
          nKV,
          hd,
        }),
        // xMid = a Wo^T, then += x_l with the post-attention norm fused.
        await linear(a.attn, W("self_attn.o_proj.weight"), a.xMid, qDim, H),
        await addRmsnormForward(gpu, {
          x: a.xMid,
          delta: a.x,
          w: W("post_attention_layernorm.weight"),
          y: a.h2,
          rstd: a.rstd2,
          N,
          H,
          eps,
        }),
        await linear(a.h2, W("mlp.gate_proj.weight"), a.gate, H, I),
        await linear(a.h2, W("mlp.up_proj.weight"), a.up, H, I),
        await swigluForward(gpu, { gate: a.gate, up: a.up, h: mlpScratch, n: N * I }),
        // x_{l+1} = act Wd^T, then += xMid with the next norm (or the final norm) fused.
        await linear(mlpScratch, W("mlp.down_proj.weight"), next, I, H),
        await addRmsnormForward(gpu, {
          x: next,
          delta: a.xMid,
          w: P(last ? "model.norm.weight" : lp(l + 1, "input_layernorm.weight")),
          y: last ? xFinal : layers[l + 1].h1,
          rstd: last ? rstdFinal : layers[l + 1].rstd1,
          N,
          H,
          eps,
        }),
      );
    }
    this.#forward = fwd;

    // ---- Head and loss, in row chunks; each chunk's backward follows its
    // forward so one logits chunk serves all. d xf lands in dH.
    const chunkRows = logitsChunkRows(gpu.limits, V, N, requestedChunkRows);
    const logits = this.#buffer(f32(chunkRows * V), `logits chunk [${chunkRows}, V]`);
    const rowLoss = this.#buffer(f32(chunkRows), `row loss chunk [${chunkRows}]`);
    const headW = P(headName);
    const headGrad = G(headName);
    for (let r0 = 0; r0 < N; r0 += chunkRows) {
      const R = Math.min(chunkRows, N - r0);
      const rowsOf = (buffer: GPUBuffer, width: number): Binding => ({
        buffer,
        offset: f32(r0 * width),
        size: f32(R * width),
      });
      const lg: Binding = { buffer: logits, offset: 0, size: f32(R * V) };
      const rl: Binding = { buffer: rowLoss, offset: 0, size: f32(R) };
      const xf = rowsOf(xFinal, H);
      const ce = (scale: GPUBuffer, loss: GPUBuffer) =>
        crossEntropy(gpu, {
          logits: lg,
          targets: rowsOf(this.#targets, 1),
          mask: rowsOf(this.#mask, 1),
          scale,
          dlogits: lg,
          rowLoss: rl,
          loss,
          N: R,
          V,
        });
      this.#headChunks.push({
        logits: await matmulXWt(gpu, { x: xf, w: headW, y: lg, M: R, K: H, N: V }),
        lossTrain: await ce(this.#ceScale, this.#loss),
        lossEval: await ce(this.#one, this.#evalLoss),
        backward: [
          await matmulDyTX(gpu, {
            dy: lg,
            x: xf,
            dw: headGrad,
            M: R,
            N: V,
            K: H,
            accumulate: true,
          }),
          await matmulDyW(gpu, { dy: lg, w: headW, dx: rowsOf(dH, H), M: R, N: V, K: H }),
        ],
      });
    }

    // ---- Backward, the forward in reverse.
    // Final norm: xf = rmsnorm(xLast) * w_f. d xLast overwrites dResid, which
    // from here on carries d(residual stream); each norm's backward adds its
    // branch into it (x_{l+1} = m_l + mlp(m_l) gives d m_l = d x_{l+1} + d through
    // the MLP's norm; likewise for m_l = x_l + attn(x_l)).
    const bwd: Dispatch[] = await rmsnormBackward(gpu, {
      dy: dH,
      x: xLast,
      w: P("model.norm.weight"),
      rstd: rstdFinal,
      dx: dResid,
      dw: G("model.norm.weight"),
      N,
      H,
      accumulateDx: false,
    });
    for (let l = L - 1; l >= 0; l--) {
      const a = layers[l];
      const W = (s: string) => P(lp(l, s));
      const dW = (s: string) => G(lp(l, s));
      bwd.push(
        // MLP, y = act Wd^T: act is rebuilt, consumed by dWd, and its buffer
        // then takes d act = dy Wd.
        await swigluForward(gpu, { gate: a.gate, up: a.up, h: mlpScratch, n: N * I }),
        await linearDw(dResid, mlpScratch, dW("mlp.down_proj.weight"), H, I),
        await linearDx(dResid, W("mlp.down_proj.weight"), mlpScratch, H, I),
        await swigluBackward(gpu, {
          dh: mlpScratch,
          gate: a.gate,
          up: a.up,
          dgate: dGate,
          dup: dUp,
          n: N * I,
        }),
        await linearDw(dGate, a.h2, dW("mlp.gate_proj.weight"), I, H),
        await linearDw(dUp, a.h2, dW("mlp.up_proj.weight"), I, H),
        // h2 feeds both gate and up: d h2 = dgate Wg + dup Wu.
        await linearDx(dGate, W("mlp.gate_proj.weight"), dH, I, H),
        await linearDx(dUp, W("mlp.up_proj.weight"), dH, I, H, true),
        ...await rmsnormBackward(gpu, {
          dy: dH,
          x: a.xMid,
          w: W("post_attention_layernorm.weight"),
          rstd: a.rstd2,
          dx: dResid,
          dw: dW("post_attention_layernorm.weight"),
          N,
          H,
          accumulateDx: true,
        }),
        // Attention, xMid = x + a Wo^T.
        await linearDw(dResid, a.attn, dW("self_attn.o_proj.weight"), H, qDim),
        await linearDx(dResid, W("self_attn.o_proj.weight"), dAttn, H, qDim),
        ...await attentionBackward(gpu, {
          q: a.q,
          k: a.k,
          v: a.v,
          out: a.attn,
          lse: a.lse,
          dOut: dAttn,
          dq,
          dk,
          dv,
          B,
          T,
          nH,
          nKV,
          hd,
        }),
        await ropeBack(dq, nH),
        await ropeBack(dk, nKV),
      );
      if (qk) {
        bwd.push(
          ...await rmsnormBackward(gpu, {
            dy: dq,
            x: a.qProj!,
            w: W("self_attn.q_norm.weight"),
            rstd: a.rstdQ!,
            dx: dqProj,
            dw: dW("self_attn.q_norm.weight"),
            N: N * nH,
            H: hd,
            accumulateDx: false,
          }),
          ...await rmsnormBackward(gpu, {
            dy: dk,
            x: a.kProj!,
            w: W("self_attn.k_norm.weight"),
            rstd: a.rstdK!,
            dx: dkProj,
            dw: dW("self_attn.k_norm.weight"),
            N: N * nKV,
            H: hd,
            accumulateDx: false,
          }),
        );
      }
      bwd.push(
        await linearDw(dqProj, a.h1, dW("self_attn.q_proj.weight"), qDim, H),
        await linearDw(dkProj, a.h1, dW("self_attn.k_proj.weight"), kvDim, H),
        await linearDw(dv, a.h1, dW("self_attn.v_proj.weight"), kvDim, H),
        // h1 feeds q, k and v: d h1 = dq Wq + dk Wk + dv Wv.
        await linearDx(dqProj, W("self_attn.q_proj.weight"), dH, qDim, H),
        await linearDx(dkProj, W("self_attn.k_proj.weight"), dH, kvDim, H, true),
        await linearDx(dv, W("self_attn.v_proj.weight"), dH, kvDim, H, true),
        ...await rmsnormBackward(gpu, {
          dy: dH,
          x: a.x,
          w: W("input_layernorm.weight"),
          rstd: a.rstd1,
          dx: dResid,
          dw: dW("input_layernorm.weight"),
          N,
          H,
          accumulateDx: true,
        }),
      );
    }
    this.#backward = bwd;
    // Embedding: dE[tok] += sum of d x_0 rows at its positions (adds to the
    // tied head's dW when tied).
    const emb = await embeddingBackward(gpu, {
      dOut: dResid,
      dWeight: G("model.embed_tokens.weight"),
      N,
      H,
    });
    this.#embeddingBackward = emb.dispatch;
    this.#uploadGroups = (g) => emb.upload(g);

    // ---- Optimizer: global norm of the summed gradients, clip factor, AdamW.
    const tensors = this.#specs.map((s) => ({ buffer: G(s.name), n: s.size }));
    const partials = this.#buffer(f32(gradNormPartialsSize(tensors)), "grad norm partials");
    this.#gradNorm = await gradNormSquared(gpu, { tensors, partials, total: this.#normSq });
    for (const s of this.#specs) {
      this.#adamw.push(
        await adamw(gpu, {
          param: P(s.name),
          grad: G(s.name),
          m: this.#m.get(s.name)!,
          v: this.#v.get(s.name)!,
          n: s.size,
          decay: s.decay,
          hyper: this.#hyper,
          gradScale: this.#clip,
        }),
      );
    }
  }

  /**
   * Prepares the clip-factor dispatch for a clipping threshold (0 = off), so
   * that `step` can use it; `clipScale` bakes the threshold into its uniform,
   * and a step creates nothing.
   */
  async prepareGradClip(maxNorm: number): Promise<void> {
    if (!(Number.isFinite(maxNorm) && maxNorm >= 0)) {
      throw new UserError(`gradient clipping threshold must be >= 0 (0 = off), got ${maxNorm}`);
    }
    if (this.#clipScale.has(maxNorm)) return;
    this.#clipScale.set(
      maxNorm,
      await clipScale(this.#gpu, { total: this.#normSq, maxNorm, scale: this.#clip }),
    );
  }

  #checkBatch(b: GpuBatch, what: string): void {
    const N = this.batchSize * this.seqLen;
    const V = this.config.vocab_size;
    for (const [name, arr] of [["ids", b.ids], ["targets", b.targets], ["mask", b.mask]] as const) {
      if (arr.length !== N) {
        throw new UserError(
          `${what}: ${name} has ${arr.length} values, expected B*T = ${this.batchSize}*${this.seqLen} = ${N}`,
        );
      }
    }
    for (const [name, arr] of [["ids", b.ids], ["targets", b.targets]] as const) {
      for (let i = 0; i < N; i++) {
        const t = arr[i];
        if (t < 0 || t >= V) {
          throw new UserError(
            `${what}: token ${t} in ${name} at row ${Math.floor(i / this.seqLen)}, position ${
              i % this.seqLen
            } is outside the model's vocabulary [0, ${V}); the tokenizer and the model's vocab_size disagree`,
          );
        }
      }
    }
  }

  #writeBatch(b: GpuBatch, withGroups: boolean): void {
    this.#gpu.write(this.#ids, b.ids);
    this.#gpu.write(this.#targets, b.targets);
    this.#gpu.write(this.#mask, b.mask);
    if (withGroups) this.#uploadGroups(groupByToken(b.ids, this.config.vocab_size));
  }

  #clearGradients(enc: GPUCommandEncoder): void {
    for (const g of this.#grads.values()) enc.clearBuffer(g);
    enc.clearBuffer(this.#loss);
  }

  /** Forward, loss and backward of the batch now in the input buffers, adding into the gradients. */
  #recordForwardBackward(pass: GPUComputePassEncoder): void {
    const gpu = this.#gpu;
    recordDispatches(gpu, pass, this.#forward);
    for (const h of this.#headChunks) {
      recordDispatches(gpu, pass, h.logits);
      recordDispatches(gpu, pass, h.lossTrain);
      recordDispatches(gpu, pass, h.backward);
    }
    recordDispatches(gpu, pass, this.#backward);
    recordDispatches(gpu, pass, this.#embeddingBackward);
  }

  /** Writes the step's cross-entropy scale: 1 / (mask sum over all its micro-batches). */
  #writeScale(batches: GpuBatch[]): void {
    let total = 0;
    for (const b of batches) for (let i = 0; i < b.mask.length; i++) total += b.mask[i];
    // A step with no masked-in target has loss 0 and zero gradients (as the reference).
    this.#gpu.write(this.#ceScale, new Float32Array([total > 0 ? 1 / total : 0]));
  }

  /**
   * One optimizer step over `microBatches` (gradient accumulation): clears the
   * gradients and the loss, runs forward and backward of each micro-batch
   * (the loss is the masked mean over all of them), takes the global gradient
   * norm, the clip factor and AdamW (decay per `ParamSpec.decay`) with the
   * bias corrections of `step` (counted from 1). Records one command encoder
   * per micro-batch (each must see its own batch buffers, and queue writes
   * land before the next submit) and returns without waiting.
   */
  step(microBatches: GpuBatch[], settings: AdamWSettings, step: number): void {
    if (microBatches.length === 0) {
      throw new UserError("a training step needs at least one micro-batch");
    }
    if (!Number.isInteger(step) || step < 1) {
      throw new UserError(`AdamW step must be a positive integer (counted from 1), got ${step}`);
    }
    microBatches.forEach((b, i) => this.#checkBatch(b, `micro-batch ${i}`));
    const clip = this.#clipScale.get(settings.gradClip);
    if (!clip) {
      throw new Error(
        `GpuModel.step: gradient clipping threshold ${settings.gradClip} was not prepared; ` +
          "pass it as GpuModel.create's gradClip option or await prepareGradClip() first",
      );
    }
    const gpu = this.#gpu;
    this.#writeScale(microBatches);
    gpu.write(
      this.#hyper,
      adamwHyper({
        lr: settings.lr,
        beta1: settings.beta1,
        beta2: settings.beta2,
        eps: settings.eps,
        weightDecay: settings.weightDecay,
        step,
      }),
    );
    microBatches.forEach((b, i) => {
      this.#writeBatch(b, true);
      gpu.submit((enc) => {
        if (i === 0) this.#clearGradients(enc);
        const pass = enc.beginComputePass();
        this.#recordForwardBackward(pass);
        if (i === microBatches.length - 1) {
          recordDispatches(gpu, pass, this.#gradNorm);
          recordDispatches(gpu, pass, clip);
          recordDispatches(gpu, pass, this.#adamw);
        }
        pass.end();
      });
    });
  }

  /**
   * The mean masked loss of the last step submitted before this call (the
   * copy is queued now, so a later step does not change what it returns).
   */
  async readLoss(): Promise<number> {
    return (await this.#gpu.readF32(this.#loss, 0, 1))[0];
  }

  /** The global gradient norm of the last step submitted before this call, before clipping. */
  async readGradNorm(): Promise<number> {
    return Math.sqrt((await this.#gpu.readF32(this.#normSq, 0, 1))[0]);
  }

  /**
   * For tests and diagnostics: one forward and backward of `batch` with no
   * update; returns the masked mean loss and every parameter's gradient.
   * Leaves the gradient buffers holding these gradients.
   */
  async lossAndGrads(
    batch: GpuBatch,
  ): Promise<{ loss: number; grads: Map<string, Float32Array> }> {
    this.#checkBatch(batch, "batch");
    this.#writeScale([batch]);
    this.#writeBatch(batch, true);
    this.#gpu.submit((enc) => {
      this.#clearGradients(enc);
      const pass = enc.beginComputePass();
      this.#recordForwardBackward(pass);
      pass.end();
    });
    const loss = await this.readLoss();
    return { loss, grads: await this.#readAll(this.#grads) };
  }

  /**
   * Forward only: the sum over rows of `mask * loss` and the mask sum (so the
   * caller can average over many batches). Touches no gradient and no
   * optimizer state, nor the training loss that `readLoss` returns.
   */
  async evalLoss(batch: GpuBatch): Promise<{ lossSum: number; count: number }> {
    this.#checkBatch(batch, "eval batch");
    const gpu = this.#gpu;
    this.#writeBatch(batch, false);
    gpu.submit((enc) => {
      enc.clearBuffer(this.#evalLoss);
      const pass = enc.beginComputePass();
      recordDispatches(gpu, pass, this.#forward);
      for (const h of this.#headChunks) {
        recordDispatches(gpu, pass, h.logits);
        recordDispatches(gpu, pass, h.lossEval);
      }
      pass.end();
    });
    let count = 0;
    for (let i = 0; i < batch.mask.length; i++) count += batch.mask[i];
    const lossSum = (await gpu.readF32(this.#evalLoss, 0, 1))[0];
    return { lossSum, count };
  }

  async #readAll(buffers: Map<string, GPUBuffer>): Promise<Map<string, Float32Array>> {
    const out = new Map<string, Float32Array>();
    for (const s of this.#specs) {
      out.set(s.name, await this.#gpu.readF32(buffers.get(s.name)!, 0, s.size));
    }
    return out;
  }

  #writeAll(buffers: Map<string, GPUBuffer>, values: Map<string, Float32Array>, what: string) {
    this.#checkTensorMap(values, what);
    for (const s of this.#specs) this.#gpu.write(buffers.get(s.name)!, values.get(s.name)!);
  }

  /** Every parameter tensor, by Hugging Face name (a copy). */
  getParameters(): Promise<Map<string, Float32Array>> {
    return this.#readAll(this.#params);
  }

  /** Replaces every parameter tensor (all names of `parameterSpecs` must be present). */
  setParameters(m: Map<string, Float32Array>): void {
    this.#writeAll(this.#params, m, "parameters");
  }

  /** AdamW's first and second moments, by parameter name (copies). */
  async getOptimizerState(): Promise<
    { m: Map<string, Float32Array>; v: Map<string, Float32Array> }
  > {
    return { m: await this.#readAll(this.#m), v: await this.#readAll(this.#v) };
  }

  /** Replaces AdamW's moments (for resuming). */
  setOptimizerState(s: { m: Map<string, Float32Array>; v: Map<string, Float32Array> }): void {
    this.#writeAll(this.#m, s.m, "optimizer state m");
    this.#writeAll(this.#v, s.v, "optimizer state v");
  }

  /** Releases every buffer the model allocated. */
  destroy(): void {
    for (const b of this.#owned) b.destroy();
    this.#owned = [];
  }
}
