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
import { UserError } from "../util/errors.ts";

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

/** The weight tensors of one decoder layer, by role (values: names, buffers, arrays...). */
export interface LayerTensors<T> {
  /** RMSNorm weight before attention `[H]`. */
  inputNorm: T;
  /** Query projection `[nH*hd, H]`. */
  q: T;
  /** Key projection `[nKV*hd, H]`. */
  k: T;
  /** Value projection `[nKV*hd, H]`. */
  v: T;
  /** Output projection `[H, nH*hd]`. */
  o: T;
  /** Per-head RMSNorm weight of the queries `[hd]` (QK-norm models only). */
  qNorm?: T;
  /** Per-head RMSNorm weight of the keys `[hd]` (QK-norm models only). */
  kNorm?: T;
  /** RMSNorm weight before the MLP `[H]`. */
  postNorm: T;
  /** MLP gate projection `[I, H]`. */
  gate: T;
  /** MLP up projection `[I, H]`. */
  up: T;
  /** MLP down projection `[H, I]`. */
  down: T;
}

/** Every weight tensor of a model, by role. */
export interface ModelTensors<T> {
  /** Token embedding `[V, H]`. */
  embed: T;
  /** The decoder layers' tensors, in layer order. */
  layers: LayerTensors<T>[];
  /** Final RMSNorm weight `[H]`. */
  norm: T;
  /** The output head `[V, H]`: the embedding itself when the head is tied. */
  head: T;
}

/**
 * The Hugging Face name of every tensor, by role: the one place where
 * `model.layers.{l}.*` names are spelled. `head` is `model.embed_tokens.weight`
 * when the head is tied.
 *
 * @example
 * ```ts
 * import { tensorNames } from "./params.ts";
 * import { presetConfig } from "./config.ts";
 * const names = tensorNames(presetConfig("tiny"));
 * if (names.layers[1].q !== "model.layers.1.self_attn.q_proj.weight") throw new Error("name");
 * ```
 */
export function tensorNames(config: ModelConfig): ModelTensors<string> {
  const layers: LayerTensors<string>[] = [];
  for (let l = 0; l < config.num_hidden_layers; l++) {
    const p = `model.layers.${l}.`;
    layers.push({
      inputNorm: `${p}input_layernorm.weight`,
      q: `${p}self_attn.q_proj.weight`,
      k: `${p}self_attn.k_proj.weight`,
      v: `${p}self_attn.v_proj.weight`,
      o: `${p}self_attn.o_proj.weight`,
      qNorm: config.qk_norm ? `${p}self_attn.q_norm.weight` : undefined,
      kNorm: config.qk_norm ? `${p}self_attn.k_norm.weight` : undefined,
      postNorm: `${p}post_attention_layernorm.weight`,
      gate: `${p}mlp.gate_proj.weight`,
      up: `${p}mlp.up_proj.weight`,
      down: `${p}mlp.down_proj.weight`,
    });
  }
  const embed = "model.embed_tokens.weight";
  return {
    embed,
    layers,
    norm: "model.norm.weight",
    head: config.tie_word_embeddings ? embed : "lm_head.weight",
  };
}

/** `names` with every name replaced by `lookup(name)` (e.g. its GPU buffer). */
export function mapTensors<A, B>(names: ModelTensors<A>, lookup: (value: A) => B): ModelTensors<B> {
  const opt = (v: A | undefined) => (v === undefined ? undefined : lookup(v));
  return {
    embed: lookup(names.embed),
    layers: names.layers.map((l) => ({
      inputNorm: lookup(l.inputNorm),
      q: lookup(l.q),
      k: lookup(l.k),
      v: lookup(l.v),
      o: lookup(l.o),
      qNorm: opt(l.qNorm),
      kNorm: opt(l.kNorm),
      postNorm: lookup(l.postNorm),
      gate: lookup(l.gate),
      up: lookup(l.up),
      down: lookup(l.down),
    })),
    norm: lookup(names.norm),
    head: lookup(names.head),
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
  const n = tensorNames(config);
  const specs: ParamSpec[] = [spec(n.embed, [V, H], "normal")];
  for (const l of n.layers) {
    specs.push(spec(l.inputNorm, [H], "ones"));
    specs.push(spec(l.q, [qDim, H], "normal"));
    specs.push(spec(l.k, [kvDim, H], "normal"));
    specs.push(spec(l.v, [kvDim, H], "normal"));
    specs.push(spec(l.o, [H, qDim], "residual"));
    if (l.qNorm && l.kNorm) {
      specs.push(spec(l.qNorm, [hd], "ones"));
      specs.push(spec(l.kNorm, [hd], "ones"));
    }
    specs.push(spec(l.postNorm, [H], "ones"));
    specs.push(spec(l.gate, [I, H], "normal"));
    specs.push(spec(l.up, [I, H], "normal"));
    specs.push(spec(l.down, [H, I], "residual"));
  }
  specs.push(spec(n.norm, [H], "ones"));
  if (!config.tie_word_embeddings) specs.push(spec(n.head, [V, H], "normal"));
  return specs;
}

/**
 * Checks that `tensors` holds every tensor of `specs` with its size; throws a
 * `UserError` naming the first missing or mis-sized one (`what` says whose).
 */
export function checkTensorSizes(
  specs: readonly ParamSpec[],
  tensors: ReadonlyMap<string, ArrayLike<number>>,
  what: string,
): void {
  for (const s of specs) {
    const t = tensors.get(s.name);
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
