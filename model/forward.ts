/**
 * The decoder's forward pass on the GPU, written once: the list of dispatches
 * from the token ids to the final norm, for N rows. The training model and the
 * inference model both build their forward here; they differ only in the
 * buffers they hand in (per-layer activations kept for the backward, or one
 * scratch set reused by every layer), the linear kernel (matmul, or the
 * matrix-vector kernel for one decode row) and the attention step they plug in
 * (RoPE + flash attention over the batch, or RoPE + KV-cache append +
 * attention over the cache).
 *
 * Per layer l (`x_l` is the residual stream entering it; `h1` its norm, made
 * by the previous layer's fused add + norm, or by the first norm for l = 0):
 *
 *   qkv  = h1 [Wq; Wk; Wv]^T, split into q, k, v     (one matmul, model/layout.ts)
 *   q, k = rmsnorm_hd(q) * w_qn, rmsnorm_hd(k) * w_kn   (QK-norm only, per head over hd)
 *   a    = attention(rope(q), rope(k), v)            (the plugged-in step; without
 *                                                     QK-norm the split may rotate)
 *   m_l  = a Wo^T + x_l;  h2 = rmsnorm(m_l) * w_post  (one fused add + norm)
 *   gu   = h2 [Wg; Wu]^T;  act = silu(gate) * up     (one matmul, then SwiGLU)
 *   x_l+1 = act Wd^T + m_l;  h1' = rmsnorm(x_l+1) * w_in'   (or the final norm)
 *
 * The projection that closes each residual branch writes into the buffer
 * that becomes the next stream (`next`), and the fused kernel adds the
 * previous stream into it in place (float addition is commutative, so
 * `a Wo^T + x_l` is bitwise `x_l + a Wo^T`). The training model points `next`
 * at a fresh buffer per layer so that every `x_l` and `m_l` survives for the
 * backward; the inference model points it back at `x`.
 *
 * @module
 */
import type { Binding, Dispatch, Gpu } from "../kernels/runtime.ts";
import { embeddingForward } from "../kernels/embedding.ts";
import { addRmsnormForward, rmsnormForward } from "../kernels/rmsnorm.ts";
import { swigluForward } from "../kernels/swiglu.ts";
import { splitQkv } from "../kernels/qkv.ts";
import type { ReadPath } from "../kernels/texels.ts";
import { headDim, type ModelConfig } from "./config.ts";
import type { FloatRange, ParamLayout } from "./layout.ts";

/** One layer's weights as the forward binds them (the projections fused). */
export interface DecoderLayerWeights {
  inputNorm: Binding;
  /** `[Wq; Wk; Wv]` `[nH*hd + 2 nKV*hd, H]`. */
  qkv: Binding;
  o: Binding;
  qNorm?: Binding;
  kNorm?: Binding;
  postNorm: Binding;
  /** `[Wgate; Wup]` `[2 I, H]`. */
  gateUp: Binding;
  down: Binding;
}

/** Every weight of the model as the forward binds them. */
export interface DecoderWeights {
  embed: Binding;
  layers: DecoderLayerWeights[];
  norm: Binding;
  /** The output head (the embedding when tied). */
  head: Binding;
}

/** Bindings of `layout`'s roles in `buffer` (a flat parameter or gradient buffer). */
export function bindLayout(layout: ParamLayout, buffer: GPUBuffer): DecoderWeights {
  const bind = (r: FloatRange): Binding => ({ buffer, offset: r.offset * 4, size: r.size * 4 });
  const opt = (r: FloatRange | undefined) => (r ? bind(r) : undefined);
  return {
    embed: bind(layout.embed),
    layers: layout.layers.map((l) => ({
      inputNorm: bind(l.inputNorm),
      qkv: bind(l.qkv),
      o: bind(l.o),
      qNorm: opt(l.qNorm),
      kNorm: opt(l.kNorm),
      postNorm: bind(l.postNorm),
      gateUp: bind(l.gateUp),
      down: bind(l.down),
    })),
    norm: bind(layout.norm),
    head: bind(layout.head),
  };
}

/** The buffers one layer's forward reads and writes (bindings of N rows). */
export interface LayerBuffers {
  /** The residual stream entering the layer `[N, H]`. */
  x: Binding;
  /** Its norm `[N, H]` and rstd `[N]` (written by the previous layer, or the first norm). */
  h1: Binding;
  rstd1: Binding;
  /** The fused projection `[N, nH*hd + 2 nKV*hd]` (scratch: split at once). */
  qkv: Binding;
  /** q and k projections before QK-norm `[N, nH*hd]`, `[N, nKV*hd]`, and the per-head rstd. */
  qProj?: Binding;
  kProj?: Binding;
  rstdQ?: Binding;
  rstdK?: Binding;
  /** q `[N, nH*hd]`, k and v `[N, nKV*hd]` as the attention step takes them. */
  q: Binding;
  k: Binding;
  v: Binding;
  /** The attention output `[N, nH*hd]`. */
  attn: Binding;
  /** The stream after attention `[N, H]`, its norm and rstd. */
  xMid: Binding;
  h2: Binding;
  rstd2: Binding;
  /** MLP projections `[N, 2I]` (row: gate then up) and `silu(gate) * up` `[N, I]`. */
  gateUp: Binding;
  act: Binding;
  /** Where `act Wd^T + xMid` goes: the next layer's `x` (or the last stream). */
  next: Binding;
  /** The norm of `next` `[N, H]` and its rstd: the next layer's h1/rstd1, or the final norm. */
  nextNorm: Binding;
  nextRstd: Binding;
}

/** What a model plugs into the shared forward. */
export interface DecoderForwardSpec {
  config: ModelConfig;
  /** Rows of this forward (B*T for training, a prefill bucket, or 1). */
  N: number;
  /** Every weight, by role. */
  weights: DecoderWeights;
  /** Token ids `[N]`. */
  ids: Binding;
  /** Layer l's buffers. */
  layer(l: number): LayerBuffers;
  /** `y = x W^T` over the N rows (K inputs, `out` outputs). */
  linear(x: Binding, w: Binding, y: Binding, K: number, out: number): Promise<Dispatch>;
  /**
   * RoPE the split applies to q and k when the model has no QK-norm (rows
   * are whole `[B, T]` sequences), or none (then `attention` rotates).
   */
  ropeInSplit?: { T: number; theta: number };
  /**
   * Where the norms, the q|k|v split and SwiGLU read their inputs
   * (kernels/texels.ts); default `auto`: textures on CPU drivers.
   */
  reads?: ReadPath;
  /** Attention of layer l: from q, k, v (after QK-norm, and RoPE if split applied it) to `attn`. */
  attention(l: number, buffers: LayerBuffers): Promise<Dispatch[]>;
  /**
   * Dispatches run right after projection `proj` of layer l wrote `y` from
   * `x` (low-rank adapters add their delta there, `model/lora.ts`). Absent: none.
   */
  afterLinear?(
    l: number,
    proj: "qkv" | "o" | "gateUp" | "down",
    x: Binding,
    y: Binding,
  ): Promise<Dispatch[]>;
}

/**
 * The forward of `spec.N` rows from the ids to the final norm (in the last
 * layer's `nextNorm`), in execution order.
 */
export async function decoderForward(gpu: Gpu, spec: DecoderForwardSpec): Promise<Dispatch[]> {
  const c = spec.config;
  const { N, weights: w } = spec;
  const H = c.hidden_size;
  const hd = headDim(c);
  const nH = c.num_attention_heads;
  const nKV = c.num_key_value_heads;
  const qDim = nH * hd;
  const kvDim = nKV * hd;
  const I = c.intermediate_size;
  const L = c.num_hidden_layers;
  const eps = c.rms_norm_eps;
  const reads = spec.reads;
  const options = { reads };
  const first = spec.layer(0);
  const after = async (
    l: number,
    proj: "qkv" | "o" | "gateUp" | "down",
    x: Binding,
    y: Binding,
  ): Promise<Dispatch[]> => spec.afterLinear ? await spec.afterLinear(l, proj, x, y) : [];
  const out: Dispatch[] = [
    await embeddingForward(gpu, { weight: w.embed, ids: spec.ids, out: first.x, N, H }),
    await rmsnormForward(gpu, {
      x: first.x,
      w: w.layers[0].inputNorm,
      y: first.h1,
      rstd: first.rstd1,
      N,
      H,
      eps,
      options,
    }),
  ];
  for (let l = 0; l < L; l++) {
    const a = spec.layer(l);
    const W = w.layers[l];
    const heads = { N, nH, nKV, hd, reads };
    out.push(
      await spec.linear(a.h1, W.qkv, a.qkv, H, qDim + 2 * kvDim),
      ...await after(l, "qkv", a.h1, a.qkv),
      c.qk_norm
        ? await splitQkv(gpu, { ...heads, qkv: a.qkv, q: a.qProj!, k: a.kProj!, v: a.v })
        : await splitQkv(gpu, {
          ...heads,
          qkv: a.qkv,
          q: a.q,
          k: a.k,
          v: a.v,
          rope: spec.ropeInSplit,
        }),
    );
    if (c.qk_norm) {
      // Per-head RMSNorm: each (row, head) vector of hd values is one norm row.
      out.push(
        await rmsnormForward(gpu, {
          x: a.qProj!,
          w: W.qNorm!,
          y: a.q,
          rstd: a.rstdQ!,
          N: N * nH,
          H: hd,
          eps,
          options,
        }),
        await rmsnormForward(gpu, {
          x: a.kProj!,
          w: W.kNorm!,
          y: a.k,
          rstd: a.rstdK!,
          N: N * nKV,
          H: hd,
          eps,
          options,
        }),
      );
    }
    const last = l === L - 1;
    out.push(
      ...await spec.attention(l, a),
      // xMid = a Wo^T, then += x with the post-attention norm fused.
      await spec.linear(a.attn, W.o, a.xMid, qDim, H),
      ...await after(l, "o", a.attn, a.xMid),
      await addRmsnormForward(gpu, {
        x: a.xMid,
        delta: a.x,
        w: W.postNorm,
        y: a.h2,
        rstd: a.rstd2,
        N,
        H,
        eps,
        options,
      }),
      await spec.linear(a.h2, W.gateUp, a.gateUp, H, 2 * I),
      ...await after(l, "gateUp", a.h2, a.gateUp),
      await swigluForward(gpu, { gateUp: a.gateUp, h: a.act, N, I, options }),
      // next = act Wd^T, then += xMid with the next norm (or the final norm) fused.
      await spec.linear(a.act, W.down, a.next, I, H),
      ...await after(l, "down", a.act, a.next),
      await addRmsnormForward(gpu, {
        x: a.next,
        delta: a.xMid,
        w: last ? w.norm : w.layers[l + 1].inputNorm,
        y: a.nextNorm,
        rstd: a.nextRstd,
        N,
        H,
        eps,
        options,
      }),
    );
  }
  return out;
}
