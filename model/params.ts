/**
 * The parameter layout: every tensor of the model with its Hugging Face name,
 * shape, whether AdamW decays it, and how it is initialized.
 *
 * This order is the model's one canonical order: the GPU model allocates its
 * buffers in it, checkpoints list tensors in it, and `initParameters` draws its
 * random numbers in it.
 *
 * @module
 */

import { headDim, type ModelConfig } from "./config.ts";
import { Rng } from "../util/random.ts";

/** How a tensor is initialized (see `initStd`). */
export type ParamInit = "normal" | "residual" | "ones";

/** One parameter tensor. */
export interface ParamSpec {
  /** Hugging Face tensor name, e.g. `model.layers.0.self_attn.q_proj.weight`. */
  name: string;
  /** Row-major shape; linear weights are `[out, in]`. */
  shape: number[];
  /** Number of elements (product of `shape`). */
  size: number;
  /** Whether AdamW applies weight decay: true for matrices, false for norm weights. */
  decay: boolean;
  /** `normal`: N(0, 0.02); `residual`: N(0, 0.02 / sqrt(2 L)); `ones`: all 1. */
  init: ParamInit;
}

/** Standard deviation of the `normal` init (GPT-2 / MiniMind / HF Llama `initializer_range`). */
export const INIT_STD = 0.02;

/**
 * The standard deviation a spec's values are drawn with, 0 for `ones`.
 * Projections that write into the residual stream (`o_proj`, `down_proj`) are
 * scaled by `1 / sqrt(2 L)` as in GPT-2: each of the 2 L residual branches adds
 * variance, so the stream's variance at the output stays O(1) with depth.
 */
export function initStd(init: ParamInit, config: ModelConfig): number {
  switch (init) {
    case "normal":
      return INIT_STD;
    case "residual":
      return INIT_STD / Math.sqrt(2 * config.num_hidden_layers);
    case "ones":
      return 0;
  }
}

function spec(name: string, shape: number[], init: ParamInit): ParamSpec {
  return {
    name,
    shape,
    size: shape.reduce((a, b) => a * b, 1),
    decay: shape.length === 2,
    init,
  };
}

/**
 * Every parameter tensor of a model, in the canonical order: embedding; per
 * layer input norm, q, k, v, o, (q_norm, k_norm), post-attention norm, gate,
 * up, down; final norm; `lm_head` (untied only).
 *
 * @example
 * ```ts
 * import { parameterSpecs, totalParameters } from "./params.ts";
 * import { presetConfig } from "./config.ts";
 * const specs = parameterSpecs(presetConfig("minimind2-small"));
 * if (specs[0].name !== "model.embed_tokens.weight") throw new Error("order");
 * if (totalParameters(specs) !== 25_829_888) throw new Error("count");
 * ```
 */
export function parameterSpecs(config: ModelConfig): ParamSpec[] {
  const H = config.hidden_size;
  const V = config.vocab_size;
  const I = config.intermediate_size;
  const hd = headDim(config);
  const qDim = config.num_attention_heads * hd;
  const kvDim = config.num_key_value_heads * hd;
  const specs: ParamSpec[] = [spec("model.embed_tokens.weight", [V, H], "normal")];
  for (let i = 0; i < config.num_hidden_layers; i++) {
    const p = `model.layers.${i}.`;
    specs.push(spec(`${p}input_layernorm.weight`, [H], "ones"));
    specs.push(spec(`${p}self_attn.q_proj.weight`, [qDim, H], "normal"));
    specs.push(spec(`${p}self_attn.k_proj.weight`, [kvDim, H], "normal"));
    specs.push(spec(`${p}self_attn.v_proj.weight`, [kvDim, H], "normal"));
    specs.push(spec(`${p}self_attn.o_proj.weight`, [H, qDim], "residual"));
    if (config.qk_norm) {
      specs.push(spec(`${p}self_attn.q_norm.weight`, [hd], "ones"));
      specs.push(spec(`${p}self_attn.k_norm.weight`, [hd], "ones"));
    }
    specs.push(spec(`${p}post_attention_layernorm.weight`, [H], "ones"));
    specs.push(spec(`${p}mlp.gate_proj.weight`, [I, H], "normal"));
    specs.push(spec(`${p}mlp.up_proj.weight`, [I, H], "normal"));
    specs.push(spec(`${p}mlp.down_proj.weight`, [H, I], "residual"));
  }
  specs.push(spec("model.norm.weight", [H], "ones"));
  if (!config.tie_word_embeddings) specs.push(spec("lm_head.weight", [V, H], "normal"));
  return specs;
}

/** Sum of the specs' sizes. */
export function totalParameters(specs: readonly ParamSpec[]): number {
  return specs.reduce((a, s) => a + s.size, 0);
}

/**
 * Fresh parameters for a seed.
 *
 * What a seed gives is defined exactly as: one `Rng(seed)`; the tensors in
 * `parameterSpecs` order; within a tensor, elements in row-major order; each
 * `normal`/`residual` element is `Math.fround(rng.normal() * initStd(...))`;
 * `ones` tensors are 1 and draw nothing. Changing any of this changes the
 * model every seed names, so it is part of the reproducibility contract.
 */
export function initParameters(config: ModelConfig, seed: number): Map<string, Float32Array> {
  const rng = new Rng(seed);
  const out = new Map<string, Float32Array>();
  for (const s of parameterSpecs(config)) {
    const t = new Float32Array(s.size);
    if (s.init === "ones") {
      t.fill(1);
    } else {
      const std = initStd(s.init, config);
      for (let i = 0; i < s.size; i++) t[i] = rng.normal() * std;
    }
    out.set(s.name, t);
  }
  return out;
}
