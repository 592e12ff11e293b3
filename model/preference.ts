/**
 * The training model's DPO step, planned: which dispatches run, in which
 * order, on which buffers (the math is in `kernels/dpo.ts`). The training
 * model (`model/train_model.ts`) owns the buffers and records the plan.
 *
 * One micro-batch of a DPO step, in one compute pass:
 *
 *   reference forward (the same activation buffers, the reference's weights)
 *   reference head per chunk: logits, cross-entropy rowLoss -> referenceRowLoss [N]
 *   policy forward (the training forward, activations kept)
 *   policy head per chunk: logits, cross-entropy rowLoss -> policyRowLoss [N]
 *   dpo loss: sequence sums, loss, rewards, coefficients; row weights [N]
 *   per chunk: logits again, cross-entropy with mask = row weights (dlogits
 *     in place), head backward
 *   decoder backward and embedding backward (the training step's, unchanged)
 *
 * The policy's head runs twice because a row's weight depends on its whole
 * sequence's log-probability, which may span logits chunks, and only one
 * chunk of logits exists at a time: recomputing it costs one `[rows, H] x
 * [H, V]` matmul per chunk, while keeping `[N, V]` would cost its memory
 * (210 MB for minimind2-small at B = 16, T = 512). The reference forward
 * costs one more decoder forward per micro-batch: its log-probabilities are
 * computed once per batch on the GPU, and its weights never change.
 *
 * @module
 */
import type { Binding, Dispatch, Gpu } from "../kernels/runtime.ts";
import { crossEntropy } from "../kernels/cross_entropy.ts";
import { dpoLoss, dpoRowWeights } from "../kernels/dpo.ts";
import { matmulXWt } from "../kernels/matmul.ts";
import type { Batch } from "../data/batch.ts";
import type { ModelConfig } from "./config.ts";
import type { bindLayout } from "./forward.ts";

/** The DPO figures of a step or an evaluation: means over the counted pairs. */
export interface DpoStats {
  /** Mean -log σ(β((π_c - ρ_c) - (π_r - ρ_r))). */
  loss: number;
  /** Mean β (π - ρ) of the chosen answers. */
  chosenReward: number;
  /** Mean β (π - ρ) of the rejected answers. */
  rejectedReward: number;
  /** Share of pairs whose chosen reward exceeds the rejected one. */
  accuracy: number;
}

/** The DPO step's dispatches. */
export interface PreferencePlan {
  /** The reference model's forward and head, rowLoss into the reference rowLoss. */
  reference: Dispatch[];
  /** The policy's head forward (after the training forward), rowLoss into the policy rowLoss. */
  policyHead: Dispatch[];
  /** Sequence sums, loss and statistics into the training cells, then the row weights. */
  lossTrain: Dispatch[];
  /** The same into the evaluation cells (no weights). */
  lossEval: Dispatch[];
  /** Per chunk: logits again, the cross-entropy weighted by the row weights, the head backward. */
  headBackward: Dispatch[];
  /** Dispatches this plan created (the others belong to the training model). */
  own: Dispatch[];
}

type Weights = ReturnType<typeof bindLayout>;

/** What the plan is built on: the training model's buffers and dispatches. */
export interface PreferenceSpec {
  config: ModelConfig;
  /** Rows of a micro-batch: 2 x pairs. */
  batchSize: number;
  seqLen: number;
  /** The training forward with other weights bound (same activation buffers). */
  forwardWith: (weights: Weights) => Promise<Dispatch[]>;
  referenceWeights: Weights;
  /** Final norm output `[N, H]`, the head's input. */
  xFinal: GPUBuffer;
  /** The logits chunk `[chunkRows, V]`. */
  logits: GPUBuffer;
  /**
   * Where the head's backward reads d logits: `logits` itself, or (CPU
   * drivers) a buffer of its own, in rows padded to `dLogitsStride`.
   */
  dLogits: GPUBuffer;
  /** Elements between rows of `dLogits` (V unless padded). */
  dLogitsStride: number;
  chunkRows: number;
  /** The training head's chunks: logits = xf_c W^T, and its backward. */
  headChunks: readonly { logits: Dispatch; backward: Dispatch[] }[];
  targets: GPUBuffer;
  /** The 0/1 assistant mask `[N]`. */
  mask: GPUBuffer;
  /** A 1-float buffer holding 1. */
  one: GPUBuffer;
  /** [β, 1 / the step's pairs]. */
  hyper: GPUBuffer;
  loss: GPUBuffer;
  stats: GPUBuffer;
  evalLoss: GPUBuffer;
  evalStats: GPUBuffer;
  /** Allocates a buffer the training model owns. */
  buffer: (bytes: number, label: string) => GPUBuffer;
  /** Where the kernels read their inputs (`TrainingModelOptions.reads`); default `auto`. */
  reads?: "auto" | "storage";
}

/** Builds every dispatch of the DPO step (see the module comment for the order). */
export async function buildPreferencePlan(
  gpu: Gpu,
  spec: PreferenceSpec,
): Promise<PreferencePlan> {
  const S = spec.batchSize;
  const T = spec.seqLen;
  const N = S * T;
  const V = spec.config.vocab_size;
  const H = spec.config.hidden_size;
  const f32 = (n: number) => n * 4;
  const referenceRowLoss = spec.buffer(f32(N), "dpo reference rowLoss [B, T]");
  const policyRowLoss = spec.buffer(f32(N), "dpo policy rowLoss [B, T]");
  const weights = spec.buffer(f32(N), "dpo row weights [B, T]");
  const seqLogp = spec.buffer(f32(2 * S), "dpo sequence log-probs [2, B]");
  const coef = spec.buffer(f32(S), "dpo sequence coefficients [B]");
  const discard = spec.buffer(f32(1), "dpo unused cross-entropy loss");
  const chunkRowLoss = spec.buffer(f32(spec.chunkRows), "dpo weighted rowLoss chunk");
  const own: Dispatch[] = [];
  const mine = <D extends Dispatch | Dispatch[]>(d: D): D => {
    own.push(...(Array.isArray(d) ? d : [d]));
    return d;
  };
  const plan: PreferencePlan = {
    reference: mine(await spec.forwardWith(spec.referenceWeights)),
    policyHead: [],
    lossTrain: [],
    lossEval: [],
    headBackward: [],
    own,
  };
  for (let c = 0; c < spec.headChunks.length; c++) {
    const r0 = c * spec.chunkRows;
    const R = Math.min(spec.chunkRows, N - r0);
    const rows = (buffer: GPUBuffer, width = 1): Binding => ({
      buffer,
      offset: f32(r0 * width),
      size: f32(R * width),
    });
    const lg: Binding = { buffer: spec.logits, offset: 0, size: f32(R * V) };
    // The weighted cross-entropy's gradient goes where the head's backward
    // reads it (`dLogits`, rows `dLogitsStride` apart); the other two only
    // need their row losses and write their gradients in place.
    const ce = async (mask: Binding, rowLoss: Binding, gradient = false) =>
      mine(
        await crossEntropy(gpu, {
          logits: lg,
          targets: rows(spec.targets),
          mask,
          scale: spec.one,
          dlogits: gradient
            ? { buffer: spec.dLogits, offset: 0, size: f32(R * spec.dLogitsStride) }
            : lg,
          dlogitsStride: gradient ? spec.dLogitsStride : undefined,
          rowLoss,
          loss: discard,
          N: R,
          V,
          options: { reads: spec.reads },
        }),
      );
    const refLogits = mine(
      await matmulXWt(gpu, {
        x: rows(spec.xFinal, H),
        w: spec.referenceWeights.head,
        y: lg,
        M: R,
        K: H,
        N: V,
        options: { reads: spec.reads },
      }),
    );
    const h = spec.headChunks[c];
    plan.reference.push(refLogits, ...await ce(rows(spec.mask), rows(referenceRowLoss)));
    plan.policyHead.push(h.logits, ...await ce(rows(spec.mask), rows(policyRowLoss)));
    plan.headBackward.push(
      h.logits,
      ...await ce(rows(weights), { buffer: chunkRowLoss, offset: 0, size: f32(R) }, true),
      ...h.backward,
    );
  }
  const loss = (lossCell: GPUBuffer, stats: GPUBuffer) =>
    dpoLoss(gpu, {
      policyRowLoss,
      referenceRowLoss,
      mask: spec.mask,
      hyper: spec.hyper,
      seqLogp,
      coef,
      loss: lossCell,
      stats,
      S,
      T,
    });
  plan.lossTrain.push(
    mine(await loss(spec.loss, spec.stats)),
    mine(await dpoRowWeights(gpu, { coef, mask: spec.mask, weights, S, T })),
  );
  plan.lossEval.push(mine(await loss(spec.evalLoss, spec.evalStats)));
  return plan;
}

/**
 * Pairs of a DPO batch (`B / 2` chosen rows, then the rejected ones) that
 * count: both rows have a target. The last batch of an eval pass is padded
 * with empty rows, which do not.
 */
export function dpoPairs(b: Batch): number {
  const P = b.B / 2;
  const has = (row: number) => {
    for (let t = 0; t < b.T; t++) if (b.mask[row * b.T + t] !== 0) return true;
    return false;
  };
  let n = 0;
  for (let p = 0; p < P; p++) if (has(p) && has(P + p)) n++;
  return n;
}
