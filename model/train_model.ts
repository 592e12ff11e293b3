/**
 * The transformer on the GPU for training: parameters and their gradients,
 * the activations of one `[B, T]` micro-batch kept for the backward, the
 * forward (`model/forward.ts`, shared with the inference model), the head and
 * loss in row chunks, and the backward. The optimizer (`optim/adamw.ts`) owns
 * the AdamW moments, the global norm and the clip, and updates the parameters
 * through `trainable()`.
 *
 * Everything lives in GPU buffers for the whole run: the parameters in one
 * flat buffer and the gradients in another at the same offsets
 * (`model/layout.ts`: q/k/v and gate/up adjacent, so each sibling group is one
 * matrix and one matmul), and the activations of one micro-batch, allocated
 * once. Every pipeline, bind
 * group and dispatch is created in `create`; `forwardBackward` only writes the
 * batch (ids, targets, mask, the embedding backward's token groups) and the
 * cross-entropy scale, then records the prepared dispatches into one command
 * encoder per micro-batch (each must see its own batch: queue writes land
 * between submits) and submits without waiting. The loss comes back only when
 * asked.
 *
 * What is stored for the backward and what is recomputed: per layer we keep
 * `x_l`, `h1`, `rstd1`, q and k after RoPE (and before QK-norm their raw
 * projections and the per-head rstd, which the norm's backward needs), v, the
 * attention output and its lse, `m_l`, `h2`, `rstd2`, and gate|up (one
 * `[N, 2I]` buffer). The fused q|k|v projection output is split at once, so
 * one scratch serves every layer (and, in the backward, holds d q|k|v). `x_l` and
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
 * at B=16, T=512: 210 MB), so the head runs in row chunks (`model/plan.ts`):
 * for each chunk, logits = xf_c Whead^T, the cross-entropy writes `dlogits` in
 * place over the logits, then `dWhead += dlogits^T xf_c` and
 * `dxf_c = dlogits Whead`. The head's forward and backward are adjacent, so
 * only one chunk of logits ever exists. With a tied head `dWhead` is the
 * embedding's gradient, which the embedding backward later adds its scatter to.
 *
 * The gradients are cleared at the start of a step (one clear of the flat
 * buffer) and every gradient kernel
 * adds into them (`accumulate: true` for the dW matmuls; rmsnorm dw and the
 * embedding backward always add), so micro-batches of one step simply sum,
 * with the cross-entropy scale 1 / (mask sum over the whole step) making the
 * sum the step's masked mean. No float atomics anywhere: same inputs, same bits.
 *
 * With low-rank adapters (`lora`, `model/lora.ts`) the base is frozen: no
 * gradient buffer and no weight-gradient dispatch for it (dW matmuls, RMSNorm
 * dw, the embedding scatter); the adapters add their delta after each
 * adapted projection in the forward, and their own backward beside the
 * projection's dX, and `trainable()` hands the optimizer their flat buffer.
 *
 * @module
 */

import {
  type Binding,
  type Dispatch,
  type Gpu,
  ownedBytes,
  PassRecorder,
  releaseDispatches,
} from "../kernels/runtime.ts";
import { matmulDyTXSplitK, matmulDyW, matmulXWt, splitKPartialsBytes } from "../kernels/matmul.ts";
import { attentionBackward, attentionForward } from "../kernels/attention/mod.ts";
import { ropeBackward, ropeForward } from "../kernels/rope.ts";
import { embeddingBackward, type EmbeddingGroups, groupByToken } from "../kernels/embedding.ts";
import { rmsnormBackward } from "../kernels/rmsnorm.ts";
import { swigluBackward, swigluForward } from "../kernels/swiglu.ts";
import { mergeQkv } from "../kernels/qkv.ts";
import { crossEntropy } from "../kernels/cross_entropy.ts";
import { DPO_STATS, DPO_STATS_FLOATS } from "../kernels/dpo.ts";
import type { Batch } from "../data/batch.ts";
import { headDim, type ModelConfig } from "./config.ts";
import { checkTensorSizes, initParameters, parameterSpecs, type ParamSpec } from "./params.ts";
import {
  flattenTensors,
  type FloatRange,
  type ParamLayout,
  paramLayout,
  type TensorSlot,
  unflattenTensors,
} from "./layout.ts";
import { bindLayout, decoderForward, type LayerBuffers } from "./forward.ts";
import { checkDeviceLimits, logitsChunkBudget, logitsChunkRows } from "./plan.ts";
import {
  flattenLora,
  initLora,
  type LoraConfig,
  LoraDispatches,
  type LoraLayout,
  loraLayout,
  unflattenLora,
} from "./lora.ts";
import { buildPreferencePlan, dpoPairs, type DpoStats, type PreferencePlan } from "./preference.ts";
import { UserError } from "../util/errors.ts";

/** Options of `TrainingModel.create`. */
export interface TrainingModelOptions {
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
   * `logitsChunkBudget` (smaller on CPU drivers) and the device's binding limit. Rounded up to the
   * device's storage offset alignment; tests use it to force several chunks.
   */
  logitsChunkRows?: number;
  /**
   * Train low-rank adapters (`model/lora.ts`) instead of the weights: the
   * base parameters are frozen (no gradient buffer, no weight-gradient
   * dispatches, and `trainable()` hands the optimizer the adapter alone).
   */
  lora?: LoraConfig;
  /** The adapter's initial tensors by PEFT name; default `initLora(layout, seed)`. */
  adapter?: Map<string, Float32Array>;
  /**
   * DPO: the frozen reference model's parameters (by name), kept on the GPU
   * beside the policy's; enables `dpoForwardBackward` and `dpoEval`, whose
   * batches hold `batchSize / 2` pairs (chosen rows first, then rejected).
   */
  reference?: Map<string, Float32Array>;
  /**
   * Where the kernels read their inputs on CPU drivers (kernels/texels.ts,
   * `MatmulOptions.reads`): `auto` (the default) copies them into textures
   * where they qualify, keeps d logits apart from the logits (so that
   * cross-entropy reads the logits from a texture) and pads its rows for an
   * odd vocabulary (so that the head's backward matmuls read it as vec4s);
   * `storage` does none of that. For benchmarks; the sums run in the same
   * order either way, so the results are the same.
   */
  reads?: "auto" | "storage";
}

/** The parameters and gradients as the optimizer sees them: two flat buffers and their layout. */
export interface TrainableParameters {
  /** Every parameter, at the layout's offsets; the optimizer updates it in place. */
  params: GPUBuffer;
  /** The gradients at the same offsets, filled by `forwardBackward`. */
  grads: GPUBuffer;
  /** Floats in each buffer. */
  floats: number;
  /** Each tensor's name and range (the optimizer saves its moments by name). */
  tensors: readonly TensorSlot[];
  /** The ranges to update, with or without weight decay. */
  runs: readonly (FloatRange & { decay: boolean })[];
}

/** Activations of one layer kept for the backward (the forward's buffers plus the lse). */
interface LayerActivations extends LayerBuffers {
  x: GPUBuffer;
  h1: GPUBuffer;
  rstd1: GPUBuffer;
  qProj?: GPUBuffer;
  kProj?: GPUBuffer;
  rstdQ?: GPUBuffer;
  rstdK?: GPUBuffer;
  q: GPUBuffer;
  k: GPUBuffer;
  v: GPUBuffer;
  attn: GPUBuffer;
  /** Attention log-sum-exp `[B, nH, T]`. */
  lse: GPUBuffer;
  xMid: GPUBuffer;
  h2: GPUBuffer;
  rstd2: GPUBuffer;
  gateUp: GPUBuffer;
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
 * The model on the GPU for training. Create with `TrainingModel.create`; a
 * step is `forwardBackward(microBatches)` then the optimizer's `step(lr)`.
 *
 * @example
 * ```ts ignore
 * const model = await TrainingModel.create(gpu, presetConfig("tiny"), { batchSize: 8, seqLen: 256 });
 * const adamw = await AdamW.create(gpu, model.trainable(), hyperparameters);
 * model.forwardBackward([batch]);
 * adamw.step(1e-3);
 * console.log(await model.readLoss());
 * ```
 */
export class TrainingModel {
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
  #layout: ParamLayout;
  #params!: GPUBuffer; // every parameter, flat (#layout)
  #grads?: GPUBuffer; // every gradient, at the same offsets (absent when the base is frozen)
  // Low-rank adapters (absent: full training): layout, flat tensors and gradients, dispatches.
  #lora?: { layout: LoraLayout; params: GPUBuffer; grads: GPUBuffer; dispatches: LoraDispatches };
  #seed = 0; // the adapters' dropout masks derive from it and the step
  #steps = 0; // forwardBackward calls so far (the dropout step when the caller gives none)
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

  #forward: Dispatch[] = [];
  #headChunks: HeadChunk[] = [];
  #backward: Dispatch[] = [];
  #embeddingBackward?: Dispatch; // absent when the base is frozen
  #uploadGroups!: (groups: EmbeddingGroups) => void;
  // DPO only (opts.reference).
  #reference?: GPUBuffer; // the reference model's parameters, flat (#layout)
  #dpoHyper?: GPUBuffer; // [beta, 1 / pairs of the step]
  #dpoStats?: GPUBuffer; // [DPO_STATS_FLOATS] of the step
  #dpoEvalStats?: GPUBuffer; // [DPO_STATS_FLOATS] of an evaluation batch
  #dpo?: PreferencePlan;

  private constructor(gpu: Gpu, config: ModelConfig, batchSize: number, seqLen: number) {
    this.#gpu = gpu;
    this.config = { ...config };
    this.batchSize = batchSize;
    this.seqLen = seqLen;
    this.#specs = parameterSpecs(config);
    this.#layout = paramLayout(config);
  }

  /**
   * Allocates parameters (uploaded from `opts.params` or a fresh
   * initialization), gradients and the activations of a `[batchSize, seqLen]`
   * micro-batch, and prepares every dispatch. Throws a `UserError` when the
   * device's limits cannot hold them.
   */
  static async create(
    gpu: Gpu,
    config: ModelConfig,
    opts: TrainingModelOptions,
  ): Promise<TrainingModel> {
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
    const model = new TrainingModel(gpu, config, B, T);
    try {
      model.#allocateParameters(
        opts.params ?? initParameters(config, opts.seed ?? 0),
        opts.lora === undefined,
      );
      if (opts.lora) model.#allocateAdapter(opts.lora, opts.adapter, opts.seed ?? 0);
      if (opts.reference) model.#allocateReference(opts.reference);
      model.#seed = opts.seed ?? 0;
      await model.#build(opts.logitsChunkRows, opts.reads ?? "auto");
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

  #allocateParameters(params: Map<string, Float32Array>, withGradients: boolean): void {
    checkTensorSizes(this.#specs, params, "parameters");
    const floats = this.#layout.floats;
    this.#params = this.#buffer(flattenTensors(this.#layout, params), `parameters [${floats}]`);
    if (withGradients) this.#grads = this.#buffer(floats * 4, `gradients [${floats}]`);
  }

  #allocateAdapter(lora: LoraConfig, adapter: Map<string, Float32Array> | undefined, seed: number) {
    const layout = loraLayout(this.config, lora);
    const flat = flattenLora(layout, adapter ?? initLora(layout, seed));
    const params = this.#buffer(flat, `adapter [${layout.floats}]`);
    const grads = this.#buffer(layout.floats * 4, `adapter gradients [${layout.floats}]`);
    const dispatches = LoraDispatches.create(this.#gpu, {
      layout,
      N: this.batchSize * this.seqLen,
      params,
      grads,
      buffer: (bytes, label) => this.#buffer(bytes, label),
    });
    this.#lora = { layout, params, grads, dispatches };
  }

  #allocateReference(params: Map<string, Float32Array>): void {
    if (this.batchSize % 2 !== 0) {
      throw new UserError(
        `DPO needs an even number of rows per micro-batch (chosen, then rejected), got ${this.batchSize}`,
      );
    }
    checkTensorSizes(this.#specs, params, "reference parameters");
    const floats = this.#layout.floats;
    this.#reference = this.#buffer(
      flattenTensors(this.#layout, params),
      `reference parameters [${floats}]`,
    );
  }

  /** The flat parameters and gradients with their layout: what the optimizer updates. */
  trainable(): TrainableParameters {
    if (this.#lora) {
      const { layout, params, grads } = this.#lora;
      return { params, grads, floats: layout.floats, tensors: layout.tensors, runs: layout.runs };
    }
    return {
      params: this.#params,
      grads: this.#grads!,
      floats: this.#layout.floats,
      tensors: this.#layout.tensors,
      runs: this.#layout.runs,
    };
  }

  /** The adapter's layout when training low-rank adapters. */
  get loraLayout(): LoraLayout | undefined {
    return this.#lora?.layout;
  }

  async #build(requestedChunkRows: number | undefined, reads: "auto" | "storage"): Promise<void> {
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
    const theta = c.rope_theta;
    const qk = c.qk_norm;
    const f32 = (n: number) => n * 4;
    // Every kernel's read path (kernels/texels.ts).
    const options = { reads };
    const texelReads = gpu.adapterSummary.isFallback && reads === "auto";
    const P = bindLayout(this.#layout, this.#params);
    // With a frozen base there are no weight gradients: every dispatch that
    // would write one is left out (`frozen` below), so nothing writes through
    // G (RMSNorm's dw dispatches are built against it, then dropped unrecorded).
    const lora = this.#lora?.dispatches;
    const frozen = this.#grads === undefined;
    const G = bindLayout(this.#layout, this.#grads ?? this.#params);
    const qkvDim = qDim + 2 * kvDim;

    this.#ids = this.#buffer(f32(N), "ids [B, T]");
    this.#targets = this.#buffer(f32(N), "targets [B, T]");
    this.#mask = this.#buffer(f32(N), "mask [B, T]");
    this.#ceScale = this.#buffer(f32(1), "cross-entropy scale");
    this.#one = this.#buffer(new Float32Array([1]), "one");
    this.#loss = this.#buffer(f32(1), "loss");
    this.#evalLoss = this.#buffer(f32(1), "eval loss sum");

    const xLast = this.#buffer(f32(N * H), "x after the last layer [N, H]");
    const xFinal = this.#buffer(f32(N * H), "final norm out [N, H]");
    const rstdFinal = this.#buffer(f32(N), "final rstd [N]");
    // act = silu(gate) * up for the layer at hand, rebuilt in the backward; then d act.
    const mlpScratch = this.#buffer(f32(N * I), "act / d act [N, I]");
    // The fused q|k|v projection, split at once; in the backward, d q|k|v.
    const qkvScratch = this.#buffer(f32(N * qkvDim), "q|k|v projection / its gradient [N, qkv]");
    // Activations kept for the backward, one set per layer; layer l's `next`
    // is layer l+1's x (the last layer's is xLast).
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
        gateUp: a(N * 2 * I, "gate|up [N, 2I]"),
        qkv: qkvScratch,
        act: mlpScratch,
        next: xLast,
        nextNorm: xFinal,
        nextRstd: rstdFinal,
      });
    }
    for (let l = 0; l + 1 < L; l++) {
      layers[l].next = layers[l + 1].x;
      layers[l].nextNorm = layers[l + 1].h1;
      layers[l].nextRstd = layers[l + 1].rstd1;
    }
    // Backward scratch shared by all layers.
    const dResid = this.#buffer(f32(N * H), "d residual [N, H]");
    const dH = this.#buffer(f32(N * H), "d normed input [N, H]"); // also d xf for the head
    const dGateUp = this.#buffer(f32(N * 2 * I), "d gate|up [N, 2I]");
    const dAttn = this.#buffer(f32(N * qDim), "d attention out [B, T, nH, hd]");
    const dq = this.#buffer(f32(N * qDim), "d q [B, T, nH, hd]");
    const dk = this.#buffer(f32(N * kvDim), "d k [B, T, nKV, hd]");
    const dv = this.#buffer(f32(N * kvDim), "d v [B, T, nKV, hd]");
    const dqProj = qk ? this.#buffer(f32(N * qDim), "d q proj [B, T, nH, hd]") : dq;
    const dkProj = qk ? this.#buffer(f32(N * kvDim), "d k proj [B, T, nKV, hd]") : dk;

    // The weight gradients' split-K partials (GPUs, small grids): one scratch
    // for the whole backward, whose dispatches run one after another.
    const chunkRows = logitsChunkRows(
      gpu.limits,
      V,
      N,
      requestedChunkRows,
      logitsChunkBudget(gpu.adapterSummary.isFallback),
    );
    const dwShapes: [number, number, number][] = [
      [N, qkvDim, H],
      [N, H, qDim],
      [N, 2 * I, H],
      [N, H, I],
      [chunkRows, V, H],
    ];
    let partialsBytes = 0;
    for (const [M, out, K] of frozen ? [] : dwShapes) {
      const need = await splitKPartialsBytes(gpu, {
        dy: dResid,
        x: dResid,
        dw: dResid,
        M,
        N: out,
        K,
        accumulate: true,
      });
      partialsBytes = Math.max(partialsBytes, need);
    }
    const partials = partialsBytes > 0
      ? this.#buffer(partialsBytes, "split-K partials (weight gradients)")
      : undefined;

    // Linear layer y = x W^T over the N rows and its two backward products
    // (dW += dy^T x, accumulated across micro-batches; dx (+)= dy W).
    const linear = (x: Binding, w: Binding, y: Binding, K: number, out: number) =>
      matmulXWt(gpu, { x, w, y, M: N, K, N: out, options });
    const linearDw = (dy: GPUBuffer, x: GPUBuffer, dw: Binding, out: number, K: number) =>
      frozen ? Promise.resolve([]) : matmulDyTXSplitK(gpu, {
        dy,
        x,
        dw,
        M: N,
        N: out,
        K,
        accumulate: true,
        partials,
        options,
      });
    // RMSNorm's backward is a dx dispatch then a dw dispatch; a frozen base keeps only dx.
    const normBackward = async (args: Parameters<typeof rmsnormBackward>[1]) => {
      const d = await rmsnormBackward(gpu, { ...args, options });
      if (!frozen) return d;
      releaseDispatches(d.slice(1));
      return d.slice(0, 1);
    };
    // Low-rank adapters: the weights part of a projection's backward runs where
    // its dW would, the input part right after its dX.
    type Proj = "qkv" | "o" | "gateUp" | "down";
    const loraWeights = (l: number, proj: Proj, dy: GPUBuffer, x: GPUBuffer) =>
      lora ? lora.backwardWeights(l, proj, dy, x) : Promise.resolve([]);
    const loraInput = (l: number, proj: Proj, dx: GPUBuffer) =>
      lora ? lora.backwardInput(l, proj, dx) : Promise.resolve([]);
    const linearDx = (
      dy: GPUBuffer,
      w: Binding,
      dx: GPUBuffer,
      out: number,
      K: number,
      accumulate = false,
    ) => matmulDyW(gpu, { dy, w, dx, M: N, N: out, K, accumulate, options });
    const rope = (x: GPUBuffer, nHeads: number) => ropeForward(gpu, { x, B, T, nHeads, hd, theta });
    // RoPE rotates each pair by R(a), so d(pre-rope) = R(-a) d(post-rope), in place.
    const ropeBack = (dx: GPUBuffer, nHeads: number) =>
      ropeBackward(gpu, { dx, B, T, nHeads, hd, theta });

    // ---- Forward: RoPE in the q|k|v split (or, with QK-norm, in place after
    // the norms), then flash attention over the batch.
    const attention = async (l: number): Promise<Dispatch[]> => {
      const a = layers[l];
      return [
        ...(qk ? [await rope(a.q, nH), await rope(a.k, nKV)] : []),
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
          reads,
        }),
      ];
    };
    // The reference model of DPO runs without adapters (`adapters` false).
    const forwardWith = (weights: typeof P, adapters = false) =>
      decoderForward(gpu, {
        config: c,
        N,
        weights,
        ids: this.#ids,
        layer: (l) => layers[l],
        linear,
        afterLinear: adapters && lora ? (l, proj, x, y) => lora.forward(l, proj, x, y) : undefined,
        ropeInSplit: qk ? undefined : { T, theta },
        reads,
        attention,
      });
    this.#forward = await forwardWith(P, true);

    // ---- Head and loss, in row chunks; each chunk's backward follows its
    // forward so one logits chunk serves all. d xf lands in dH.
    const logits = this.#buffer(f32(chunkRows * V), `logits chunk [${chunkRows}, V]`);
    // d logits: in place, or where inputs come from textures (CPU drivers)
    // in a buffer of its own, so that cross-entropy reads the logits from a
    // texture, in rows padded to a multiple of 4 (zeros after V), so that the
    // head's backward matmuls read it as vec4s from textures too.
    const Vd = texelReads ? Math.ceil(V / 4) * 4 : V;
    const dLogits = texelReads
      ? this.#buffer(f32(chunkRows * Vd), `d logits chunk [${chunkRows}, ${Vd}]`)
      : logits;
    const dyStride = Vd === V ? undefined : Vd;
    const rowLoss = this.#buffer(f32(chunkRows), `row loss chunk [${chunkRows}]`);
    for (let r0 = 0; r0 < N; r0 += chunkRows) {
      const R = Math.min(chunkRows, N - r0);
      const rowsOf = (buffer: GPUBuffer, width: number): Binding => ({
        buffer,
        offset: f32(r0 * width),
        size: f32(R * width),
      });
      const lg: Binding = { buffer: logits, offset: 0, size: f32(R * V) };
      const dlg: Binding = { buffer: dLogits, offset: 0, size: f32(R * Vd) };
      const rl: Binding = { buffer: rowLoss, offset: 0, size: f32(R) };
      const xf = rowsOf(xFinal, H);
      const ce = (scale: GPUBuffer, loss: GPUBuffer) =>
        crossEntropy(gpu, {
          logits: lg,
          targets: rowsOf(this.#targets, 1),
          mask: rowsOf(this.#mask, 1),
          scale,
          dlogits: dlg,
          dlogitsStride: dyStride,
          rowLoss: rl,
          loss,
          N: R,
          V,
          options,
        });
      this.#headChunks.push({
        logits: await matmulXWt(gpu, { x: xf, w: P.head, y: lg, M: R, K: H, N: V, options }),
        lossTrain: await ce(this.#ceScale, this.#loss),
        lossEval: await ce(this.#one, this.#evalLoss),
        backward: [
          ...frozen ? [] : await matmulDyTXSplitK(gpu, {
            dy: dlg,
            dyStride,
            x: xf,
            dw: G.head,
            M: R,
            N: V,
            K: H,
            accumulate: true,
            partials,
            options,
          }),
          await matmulDyW(gpu, {
            dy: dlg,
            dyStride,
            w: P.head,
            dx: rowsOf(dH, H),
            M: R,
            N: V,
            K: H,
            options,
          }),
        ],
      });
    }

    // ---- Backward, the forward in reverse.
    // Final norm: xf = rmsnorm(xLast) * w_f. d xLast overwrites dResid, which
    // from here on carries d(residual stream); each norm's backward adds its
    // branch into it (x_{l+1} = m_l + mlp(m_l) gives d m_l = d x_{l+1} + d through
    // the MLP's norm; likewise for m_l = x_l + attn(x_l)).
    const bwd: Dispatch[] = await normBackward({
      dy: dH,
      x: xLast,
      w: P.norm,
      rstd: rstdFinal,
      dx: dResid,
      dw: G.norm,
      N,
      H,
      accumulateDx: false,
    });
    for (let l = L - 1; l >= 0; l--) {
      const a = layers[l];
      const W = P.layers[l];
      const dW = G.layers[l];
      bwd.push(
        // MLP, y = act Wd^T: act is rebuilt, consumed by dWd, and its buffer
        // then takes d act = dy Wd.
        await swigluForward(gpu, { gateUp: a.gateUp, h: mlpScratch, N, I, options }),
        ...await linearDw(dResid, mlpScratch, dW.down, H, I),
        ...await loraWeights(l, "down", dResid, mlpScratch),
        await linearDx(dResid, W.down, mlpScratch, H, I),
        ...await loraInput(l, "down", mlpScratch),
        await swigluBackward(gpu, {
          dh: mlpScratch,
          gateUp: a.gateUp,
          dGateUp,
          N,
          I,
          options,
        }),
        // gate|up = h2 [Wg; Wu]^T: one weight gradient, and d h2 = d(gate|up) [Wg; Wu].
        ...await linearDw(dGateUp, a.h2, dW.gateUp, 2 * I, H),
        ...await loraWeights(l, "gateUp", dGateUp, a.h2),
        await linearDx(dGateUp, W.gateUp, dH, 2 * I, H),
        ...await loraInput(l, "gateUp", dH),
        ...await normBackward({
          dy: dH,
          x: a.xMid,
          w: W.postNorm,
          rstd: a.rstd2,
          dx: dResid,
          dw: dW.postNorm,
          N,
          H,
          accumulateDx: true,
        }),
        // Attention, xMid = x + a Wo^T.
        ...await linearDw(dResid, a.attn, dW.o, H, qDim),
        ...await loraWeights(l, "o", dResid, a.attn),
        await linearDx(dResid, W.o, dAttn, H, qDim),
        ...await loraInput(l, "o", dAttn),
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
          reads,
        }),
      );
      if (qk) {
        bwd.push(
          await ropeBack(dq, nH),
          await ropeBack(dk, nKV),
          ...await normBackward({
            dy: dq,
            x: a.qProj!,
            w: W.qNorm!,
            rstd: a.rstdQ!,
            dx: dqProj,
            dw: dW.qNorm!,
            N: N * nH,
            H: hd,
            accumulateDx: false,
          }),
          ...await normBackward({
            dy: dk,
            x: a.kProj!,
            w: W.kNorm!,
            rstd: a.rstdK!,
            dx: dkProj,
            dw: dW.kNorm!,
            N: N * nKV,
            H: hd,
            accumulateDx: false,
          }),
        );
      }
      bwd.push(
        // d q|k|v in the fused layout (through RoPE's backward unless QK-norm did it).
        await mergeQkv(gpu, {
          N,
          nH,
          nKV,
          hd,
          dqkv: qkvScratch,
          dq: dqProj,
          dk: dkProj,
          dv,
          rope: qk ? undefined : { T, theta },
          reads,
        }),
        // q|k|v = h1 [Wq; Wk; Wv]^T: one weight gradient, and d h1 = d(q|k|v) [Wq; Wk; Wv].
        ...await linearDw(qkvScratch, a.h1, dW.qkv, qkvDim, H),
        ...await loraWeights(l, "qkv", qkvScratch, a.h1),
        await linearDx(qkvScratch, W.qkv, dH, qkvDim, H),
        ...await loraInput(l, "qkv", dH),
        ...await normBackward({
          dy: dH,
          x: a.x,
          w: W.inputNorm,
          rstd: a.rstd1,
          dx: dResid,
          dw: dW.inputNorm,
          N,
          H,
          accumulateDx: true,
        }),
      );
    }
    this.#backward = bwd;
    if (frozen) return; // the embedding is frozen too: no scatter, no token groups
    // Embedding: dE[tok] += sum of d x_0 rows at its positions (adds to the
    // tied head's dW when tied).
    const emb = await embeddingBackward(gpu, { dOut: dResid, dWeight: G.embed, N, H });
    this.#embeddingBackward = emb.dispatch;
    this.#uploadGroups = (g) => emb.upload(g);
    if (this.#reference) {
      this.#dpoHyper = this.#buffer(4 * 2, "dpo [beta, scale]");
      this.#dpoStats = this.#buffer(4 * DPO_STATS_FLOATS, "dpo step stats");
      this.#dpoEvalStats = this.#buffer(4 * DPO_STATS_FLOATS, "dpo eval stats");
      this.#dpo = await buildPreferencePlan(gpu, {
        config: c,
        batchSize: B,
        seqLen: T,
        forwardWith,
        referenceWeights: bindLayout(this.#layout, this.#reference),
        xFinal,
        logits,
        dLogits,
        dLogitsStride: Vd,
        chunkRows,
        headChunks: this.#headChunks,
        targets: this.#targets,
        mask: this.#mask,
        one: this.#one,
        hyper: this.#dpoHyper,
        loss: this.#loss,
        stats: this.#dpoStats,
        evalLoss: this.#evalLoss,
        evalStats: this.#dpoEvalStats,
        buffer: (bytes, label) => this.#buffer(bytes, label),
        reads,
      });
    }
  }

  #checkBatch(b: Batch, what: string): void {
    const N = this.batchSize * this.seqLen;
    const V = this.config.vocab_size;
    if (b.B !== this.batchSize || b.T !== this.seqLen) {
      throw new UserError(
        `${what}: a batch of ${b.B} x ${b.T}, but the model was built for ${this.batchSize} x ${this.seqLen}`,
      );
    }
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

  #writeBatch(b: Batch, withGroups: boolean): void {
    this.#gpu.write(this.#ids, b.ids);
    this.#gpu.write(this.#targets, b.targets);
    this.#gpu.write(this.#mask, b.mask);
    if (withGroups && this.#embeddingBackward) {
      this.#uploadGroups(groupByToken(b.ids, this.config.vocab_size));
    }
  }

  #clearGradients(enc: GPUCommandEncoder): void {
    enc.clearBuffer(this.trainable().grads);
    enc.clearBuffer(this.#loss);
  }

  /** Forward, loss and backward of the batch now in the input buffers, adding into the gradients. */
  #recordForwardBackward(pass: PassRecorder): void {
    pass.record(this.#forward);
    for (const h of this.#headChunks) {
      pass.record(h.logits);
      pass.record(h.lossTrain);
      pass.record(h.backward);
    }
    pass.record(this.#backward);
    if (this.#embeddingBackward) pass.record(this.#embeddingBackward);
  }

  /** Writes the step's cross-entropy scale: 1 / (mask sum over all its micro-batches). */
  #writeScale(batches: Batch[], maskTotal?: number): void {
    let total = maskTotal ?? 0;
    if (maskTotal === undefined) {
      for (const b of batches) for (let i = 0; i < b.mask.length; i++) total += b.mask[i];
    }
    // A step with no masked-in target has loss 0 and zero gradients (as the reference).
    this.#gpu.write(this.#ceScale, new Float32Array([total > 0 ? 1 / total : 0]));
  }

  /**
   * Forward and backward of one optimizer step's `microBatches` (gradient
   * accumulation): clears the gradients and the loss, then for each
   * micro-batch writes it and submits its forward, loss and backward, the
   * gradients adding up. The loss is the masked mean over all of them. Returns
   * without waiting; the optimizer's `step` then reads the gradients.
   *
   * `maskTotal` replaces the mean's denominator (the mask sum of these
   * batches): data parallelism passes the whole step's, over every rank's
   * rows, so that the ranks' losses and gradients sum to the global mean's.
   * `dropoutStep` (the optimizer step) seeds the adapters' dropout masks
   * (default: the number of earlier calls).
   */
  forwardBackward(
    microBatches: Batch[],
    opts: { maskTotal?: number; dropoutStep?: number } = {},
  ): void {
    if (microBatches.length === 0) {
      throw new UserError("a training step needs at least one micro-batch");
    }
    microBatches.forEach((b, i) => this.#checkBatch(b, `micro-batch ${i}`));
    const gpu = this.#gpu;
    this.#writeScale(microBatches, opts.maskTotal);
    const step = opts.dropoutStep ?? this.#steps;
    this.#steps++;
    microBatches.forEach((b, i) => {
      this.#writeBatch(b, true);
      // Adapter dropout: one mask per (seed, step, micro-batch), so a resumed run draws the same.
      this.#lora?.dispatches.setDropout(
        (Math.imul(this.#seed, 0x9e3779b1) ^ Math.imul(step, 0x85ebca6b) ^
          Math.imul(i, 0xc2b2ae35)) >>> 0,
      );
      gpu.submit((enc) => {
        if (i === 0) this.#clearGradients(enc);
        const pass = new PassRecorder(gpu, enc);
        this.#recordForwardBackward(pass);
        pass.end();
      });
    });
  }

  /**
   * Every dispatch of one micro-batch's forward, loss and backward, in the
   * order a step records them (for profiling and counting; the batch in the
   * input buffers is whatever was written last).
   */
  stepDispatches(): Dispatch[] {
    return [
      ...this.#forward,
      ...this.#headChunks.flatMap((h) => [h.logits, ...h.lossTrain, ...h.backward]),
      ...this.#backward,
      ...this.#embeddingBackward ? [this.#embeddingBackward] : [],
    ];
  }

  /**
   * Bytes of GPU memory the model holds: its buffers and its dispatches'
   * scratch. On CPU drivers the input textures its kernels share with every
   * other owner on the device come on top (`inputTextureBytes`).
   */
  get gpuBytes(): number {
    let bytes = 0;
    for (const b of this.#owned) bytes += b.size;
    bytes += ownedBytes(this.stepDispatches());
    return bytes;
  }

  /** Bytes a micro-batch writes from the host: ids, targets, mask, the embedding groups, the scale. */
  get batchUploadBytes(): number {
    const N = this.batchSize * this.seqLen;
    return 3 * N * 4 + (3 * N + 2) * 4 + 4;
  }

  /** The one-float buffer holding the last step's mean masked loss (for `Gpu.readScalars`). */
  get lossCell(): GPUBuffer {
    return this.#loss;
  }

  /**
   * The mean masked loss of the last step submitted before this call (the
   * copy is queued now, so a later step does not change what it returns).
   */
  async readLoss(): Promise<number> {
    return (await this.#gpu.readF32(this.#loss, 0, 1))[0];
  }

  /**
   * For tests and diagnostics: one forward and backward of `batch` with no
   * update; returns the masked mean loss and every trained tensor's gradient
   * (the adapter's, by PEFT name, when training adapters). Leaves the
   * gradient buffers holding these gradients.
   */
  async lossAndGrads(
    batch: Batch,
  ): Promise<{ loss: number; grads: Map<string, Float32Array> }> {
    this.forwardBackward([batch]);
    const loss = await this.readLoss();
    const flat = await this.readGradients();
    const grads = new Map<string, Float32Array>();
    for (const t of this.trainable().tensors) {
      grads.set(t.name, flat.slice(t.offset, t.offset + t.size));
    }
    return { loss, grads };
  }

  /**
   * Forward only: the sum over rows of `mask * loss` and the mask sum (so the
   * caller can average over many batches). Touches no gradient and no
   * optimizer state, nor the training loss that `readLoss` returns.
   */
  async evalLoss(batch: Batch): Promise<{ lossSum: number; count: number }> {
    this.#checkBatch(batch, "eval batch");
    const gpu = this.#gpu;
    this.#writeBatch(batch, false);
    this.#lora?.dispatches.setDropout(undefined); // evaluation sees the whole adapter
    gpu.submit((enc) => {
      enc.clearBuffer(this.#evalLoss);
      const pass = new PassRecorder(gpu, enc);
      pass.record(this.#forward);
      for (const h of this.#headChunks) {
        pass.record(h.logits);
        pass.record(h.lossEval);
      }
      pass.end();
    });
    let count = 0;
    for (let i = 0; i < batch.mask.length; i++) count += batch.mask[i];
    const lossSum = (await gpu.readF32(this.#evalLoss, 0, 1))[0];
    return { lossSum, count };
  }

  // ---- DPO (a model created with `reference`) ----

  #preference(what: string): PreferencePlan {
    if (!this.#dpo) {
      throw new Error(`${what}: the model was created without reference parameters`);
    }
    return this.#dpo;
  }

  /**
   * One DPO step's forward and backward over `microBatches` (rows: `B / 2`
   * chosen answers, then their rejected answers, with the assistant mask):
   * the reference's and the policy's sequence log-probabilities, the loss
   * -log σ(β((π_c - ρ_c) - (π_r - ρ_r))) averaged over the step's pairs, and
   * its gradient in the gradient buffers (cleared first). Returns without
   * waiting; `readLoss` / `readDpoStats` give the figures.
   */
  dpoForwardBackward(microBatches: Batch[], beta: number): void {
    const plan = this.#preference("dpoForwardBackward");
    if (microBatches.length === 0) {
      throw new UserError("a training step needs at least one micro-batch");
    }
    microBatches.forEach((b, i) => this.#checkBatch(b, `micro-batch ${i}`));
    let pairs = 0;
    for (const b of microBatches) pairs += dpoPairs(b);
    const gpu = this.#gpu;
    // A step with no counted pair has loss 0 and zero gradients.
    gpu.write(this.#dpoHyper!, new Float32Array([beta, pairs > 0 ? 1 / pairs : 0]));
    microBatches.forEach((b, i) => {
      this.#writeBatch(b, true);
      gpu.submit((enc) => {
        if (i === 0) {
          this.#clearGradients(enc);
          enc.clearBuffer(this.#dpoStats!);
        }
        const pass = new PassRecorder(gpu, enc);
        pass.record(plan.reference);
        pass.record(this.#forward);
        pass.record(plan.policyHead);
        pass.record(plan.lossTrain);
        pass.record(plan.headBackward);
        pass.record(this.#backward);
        if (this.#embeddingBackward) pass.record(this.#embeddingBackward);
        pass.end();
      });
    });
  }

  /** The DPO figures of the last step submitted before this call (means over its pairs). */
  async readDpoStats(): Promise<DpoStats> {
    const gpu = this.#gpu;
    const [loss, stats] = await Promise.all([
      gpu.readF32(this.#loss, 0, 1),
      gpu.readF32(this.#dpoStats!, 0, DPO_STATS_FLOATS),
    ]);
    return {
      loss: loss[0],
      chosenReward: stats[DPO_STATS.chosenReward],
      rejectedReward: stats[DPO_STATS.rejectedReward],
      accuracy: stats[DPO_STATS.accuracy],
    };
  }

  /**
   * DPO forward only: the sums over the batch's counted pairs of the loss, the
   * rewards and the wins, and the number of pairs (average over many batches
   * by dividing). Touches no gradient and not the training figures.
   */
  async dpoEval(batch: Batch, beta: number): Promise<DpoStats & { pairs: number }> {
    const plan = this.#preference("dpoEval");
    this.#checkBatch(batch, "eval batch");
    const gpu = this.#gpu;
    this.#writeBatch(batch, false);
    gpu.write(this.#dpoHyper!, new Float32Array([beta, 1]));
    gpu.submit((enc) => {
      enc.clearBuffer(this.#evalLoss);
      enc.clearBuffer(this.#dpoEvalStats!);
      const pass = new PassRecorder(gpu, enc);
      pass.record(plan.reference);
      pass.record(this.#forward);
      pass.record(plan.policyHead);
      pass.record(plan.lossEval);
      pass.end();
    });
    const [loss, stats] = await Promise.all([
      gpu.readF32(this.#evalLoss, 0, 1),
      gpu.readF32(this.#dpoEvalStats!, 0, DPO_STATS_FLOATS),
    ]);
    return {
      loss: loss[0],
      chosenReward: stats[DPO_STATS.chosenReward],
      rejectedReward: stats[DPO_STATS.rejectedReward],
      accuracy: stats[DPO_STATS.accuracy],
      pairs: dpoPairs(batch),
    };
  }

  async #readFlat(buffer: GPUBuffer): Promise<Map<string, Float32Array>> {
    return unflattenTensors(this.#layout, await this.#gpu.readF32(buffer, 0, this.#layout.floats));
  }

  /** The flat gradient buffer's contents (`trainable().tensors` says where each tensor is). */
  readGradients(): Promise<Float32Array> {
    const t = this.trainable();
    return this.#gpu.readF32(t.grads, 0, t.floats);
  }

  /** Replaces the flat gradients (a data-parallel sum over ranks). */
  writeGradients(flat: Float32Array): void {
    const t = this.trainable();
    if (flat.length !== t.floats) {
      throw new Error(`writeGradients: ${flat.length} floats, expected ${t.floats}`);
    }
    this.#gpu.write(t.grads, flat);
  }

  /** Replaces the step's loss (a data-parallel sum over ranks), for the next `readLoss`. */
  writeLoss(loss: number): void {
    this.#gpu.write(this.#loss, new Float32Array([loss]));
  }

  /** Every parameter tensor, by Hugging Face name (a copy). */
  getParameters(): Promise<Map<string, Float32Array>> {
    return this.#readFlat(this.#params);
  }

  /** Replaces every parameter tensor (all names of `parameterSpecs` must be present). */
  setParameters(m: Map<string, Float32Array>): void {
    checkTensorSizes(this.#specs, m, "parameters");
    this.#gpu.write(this.#params, flattenTensors(this.#layout, m));
  }

  /** The adapter's tensors by PEFT name (a copy), when training adapters. */
  async getAdapter(): Promise<Map<string, Float32Array>> {
    if (!this.#lora) throw new Error("getAdapter: this model trains no adapter");
    const { layout, params } = this.#lora;
    return unflattenLora(layout, await this.#gpu.readF32(params, 0, layout.floats));
  }

  /** Replaces the adapter's tensors (every tensor of its layout must be present). */
  setAdapter(adapter: Map<string, Float32Array>): void {
    if (!this.#lora) throw new Error("setAdapter: this model trains no adapter");
    this.#gpu.write(this.#lora.params, flattenLora(this.#lora.layout, adapter));
  }

  /** Releases every buffer the model and its dispatches allocated. */
  destroy(): void {
    releaseDispatches(this.#forward);
    for (const h of this.#headChunks) {
      releaseDispatches([h.logits, ...h.lossTrain, ...h.lossEval, ...h.backward]);
    }
    releaseDispatches(this.#backward);
    if (this.#embeddingBackward) releaseDispatches([this.#embeddingBackward]);
    if (this.#dpo) releaseDispatches(this.#dpo.own);
    for (const b of this.#owned) b.destroy();
    this.#owned = [];
  }
}
