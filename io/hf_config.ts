/**
 * Hugging Face `config.json` and `generation_config.json` <-> our `ModelConfig`.
 *
 * Written: `LlamaForCausalLM` (model_type `llama`), or `Qwen3ForCausalLM`
 * (`qwen3`) when the model has QK-norm: Qwen3 is the Transformers architecture
 * whose attention is ours plus per-head RMSNorm on q and k before RoPE. Both
 * files carry every field current Transformers versions read, with the values
 * of the architecture we implement (no biases, SiLU, plain RoPE, no sliding
 * window), so `AutoModelForCausalLM.from_pretrained(dir)` builds the same model.
 *
 * Read: configs of those two architectures, and `MiniMindForCausalLM`
 * (MiniMind's own `model_type: "minimind"`, same tensor names). A field whose
 * value changes the model into something we do not implement (rope scaling,
 * biases, another activation, sliding window, experts, quantization, a head_dim
 * other than hidden_size / num_attention_heads) is a `UserError` that names the
 * field. Fields that only matter to training regularization (dropout) or to
 * Transformers' own bookkeeping are ignored. Absent fields take the defaults
 * of the Transformers config class, so a config reads here as it reads there.
 *
 * @module
 */

import { headDim, type ModelConfig, validateConfig } from "../model/config.ts";
import { UserError } from "../util/errors.ts";

/** Special token ids a checkpoint records. */
export interface SpecialTokenIds {
  /** Beginning-of-sequence id (`bos_token_id`). */
  bos: number;
  /** End-of-sequence id (`eos_token_id`). */
  eos: number;
  /** Padding id (`pad_token_id`). */
  pad: number;
}

/** The architectures `fromHfConfig` accepts. */
export type HfArchitecture = "LlamaForCausalLM" | "Qwen3ForCausalLM" | "MiniMindForCausalLM";

const MODEL_TYPES: Record<HfArchitecture, string> = {
  LlamaForCausalLM: "llama",
  Qwen3ForCausalLM: "qwen3",
  MiniMindForCausalLM: "minimind",
};

/** Defaults of the Transformers config classes for fields we let be absent. */
const DEFAULTS: Record<
  HfArchitecture,
  {
    max_position_embeddings: number;
    rope_theta: number;
    rms_norm_eps: number;
    tie_word_embeddings: boolean;
  }
> = {
  LlamaForCausalLM: {
    max_position_embeddings: 2048,
    rope_theta: 10000,
    rms_norm_eps: 1e-6,
    tie_word_embeddings: false,
  },
  Qwen3ForCausalLM: {
    max_position_embeddings: 32768,
    rope_theta: 10000,
    rms_norm_eps: 1e-6,
    tie_word_embeddings: false,
  },
  MiniMindForCausalLM: {
    max_position_embeddings: 32768,
    rope_theta: 1e6,
    rms_norm_eps: 1e-6,
    tie_word_embeddings: true,
  },
};

/** Qwen3Config's `head_dim` default when the field is absent (not hidden / heads!). */
const QWEN3_DEFAULT_HEAD_DIM = 128;

/** The architecture a config is written as: Qwen3 when it has QK-norm, else Llama. */
export function hfArchitecture(config: ModelConfig): HfArchitecture {
  return config.qk_norm ? "Qwen3ForCausalLM" : "LlamaForCausalLM";
}

/**
 * The `config.json` object of a model, with keys sorted as Transformers writes
 * them. `rope_theta` + `rope_scaling: null` is the form Transformers 4.x reads;
 * `rope_parameters` is the form 5.x reads (it also converts the 4.x form).
 *
 * @example
 * ```ts
 * import { toHfConfig } from "./hf_config.ts";
 * import { presetConfig } from "../model/config.ts";
 * const json = toHfConfig(presetConfig("minimind-3"), { bos: 1, eos: 2, pad: 0 });
 * if (json.model_type !== "qwen3" || json.head_dim !== 96) throw new Error("qwen3 config");
 * ```
 */
export function toHfConfig(
  config: ModelConfig,
  special: SpecialTokenIds,
): Record<string, unknown> {
  validateConfig(config);
  const arch = hfArchitecture(config);
  const L = config.num_hidden_layers;
  const json: Record<string, unknown> = {
    architectures: [arch],
    model_type: MODEL_TYPES[arch],
    attention_bias: false,
    attention_dropout: 0,
    bos_token_id: special.bos,
    eos_token_id: special.eos,
    pad_token_id: special.pad,
    head_dim: headDim(config),
    hidden_act: "silu",
    hidden_size: config.hidden_size,
    initializer_range: 0.02,
    intermediate_size: config.intermediate_size,
    max_position_embeddings: config.max_position_embeddings,
    num_attention_heads: config.num_attention_heads,
    num_hidden_layers: L,
    num_key_value_heads: config.num_key_value_heads,
    rms_norm_eps: config.rms_norm_eps,
    rope_scaling: null,
    rope_theta: config.rope_theta,
    rope_parameters: { rope_type: "default", rope_theta: config.rope_theta },
    tie_word_embeddings: config.tie_word_embeddings,
    torch_dtype: "float32",
    use_cache: true,
    vocab_size: config.vocab_size,
  };
  if (arch === "LlamaForCausalLM") {
    json.mlp_bias = false;
    json.pretraining_tp = 1;
  } else {
    // Qwen3's own fields: sliding-window attention is off on every layer.
    json.use_sliding_window = false;
    json.sliding_window = null;
    json.max_window_layers = L;
    json.layer_types = Array.from({ length: L }, () => "full_attention");
  }
  return Object.fromEntries(Object.entries(json).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
}

/** What `fromHfConfig` found. */
export interface ParsedHfConfig {
  config: ModelConfig;
  architecture: HfArchitecture;
  /** Token ids the config names (absent or null fields are left out; the first of an eos list). */
  special: Partial<SpecialTokenIds>;
}

/** Options of `fromHfConfig`. */
export interface FromHfConfigOptions {
  /**
   * Whether the weights have `q_norm` / `k_norm` tensors. MiniMind's own
   * config does not say (its newest model always has them, MiniMind2 had
   * none), so for `MiniMindForCausalLM` the weights decide; ignored otherwise.
   */
  weightsHaveQkNorm?: boolean;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/**
 * Reads a parsed `config.json` into our `ModelConfig`. `source` (the file's
 * path) prefixes every error message, which names the offending field.
 */
export function fromHfConfig(
  json: unknown,
  source: string,
  opts: FromHfConfigOptions = {},
): ParsedHfConfig {
  const fail = (msg: string): never => {
    throw new UserError(`${source}: ${msg}`);
  };
  if (!isObject(json)) return fail("expected a JSON object");
  const has = (k: string) => json[k] !== undefined && json[k] !== null;
  const unsupported = (field: string, why: string): never =>
    fail(`${field} = ${JSON.stringify(json[field])} is not supported: ${why}`);

  // Architecture: `architectures` when present, else `model_type`.
  const known = Object.keys(MODEL_TYPES) as HfArchitecture[];
  let arch: HfArchitecture | undefined;
  if (has("architectures")) {
    const a = json.architectures;
    if (!Array.isArray(a) || a.length !== 1 || typeof a[0] !== "string") {
      return fail(`architectures must be a list of one name, got ${JSON.stringify(a)}`);
    }
    if (!known.includes(a[0] as HfArchitecture)) {
      return fail(
        `architectures = ${JSON.stringify(a)} is not supported; this trainer implements ${
          known.join(", ")
        }`,
      );
    }
    arch = a[0] as HfArchitecture;
  }
  if (has("model_type")) {
    const byType = known.find((k) => MODEL_TYPES[k] === json.model_type);
    if (!byType) {
      return fail(
        `model_type = ${JSON.stringify(json.model_type)} is not supported; supported: ${
          known.map((k) => MODEL_TYPES[k]).join(", ")
        }`,
      );
    }
    if (arch && arch !== byType) {
      return fail(
        `model_type = ${
          JSON.stringify(json.model_type)
        } does not match architectures = ["${arch}"]`,
      );
    }
    arch = byType;
  }
  if (!arch) return fail("neither architectures nor model_type says what model this is");
  const defaults = DEFAULTS[arch];

  const int = (field: string, fallback?: number): number => {
    const v = json[field] ?? fallback;
    if (v === undefined) return fail(`${field} is missing`);
    if (typeof v !== "number" || !Number.isInteger(v) || v < 1) {
      return fail(`${field} must be a positive integer, got ${JSON.stringify(v)}`);
    }
    return v;
  };
  const positive = (field: string, fallback: number): number => {
    const v = json[field] ?? fallback;
    if (typeof v !== "number" || !Number.isFinite(v) || v <= 0) {
      return fail(`${field} must be a positive number, got ${JSON.stringify(v)}`);
    }
    return v;
  };
  const bool = (field: string, fallback: boolean): boolean => {
    const v = json[field] ?? fallback;
    if (typeof v !== "boolean") {
      return fail(`${field} must be true or false, got ${JSON.stringify(v)}`);
    }
    return v;
  };

  // Values that would make a different model.
  const act = json.hidden_act ?? "silu";
  if (act !== "silu" && act !== "swish") {
    unsupported("hidden_act", "the MLP is SwiGLU, down(silu(gate(x)) * up(x))");
  }
  for (const f of ["attention_bias", "mlp_bias"]) {
    if (json[f] !== undefined && json[f] !== false) unsupported(f, "the model has no biases");
  }
  let ropeTheta: number | undefined;
  if (has("rope_scaling")) {
    const rs = json.rope_scaling;
    const type = isObject(rs) ? rs.rope_type ?? rs.type : undefined;
    if (type !== "default") {
      unsupported("rope_scaling", "only plain RoPE is implemented; set it to null");
    }
  }
  if (has("rope_parameters")) {
    const rp = json.rope_parameters;
    if (!isObject(rp) || (rp.rope_type ?? rp.type) !== "default") {
      unsupported("rope_parameters", 'only rope_type "default" (plain RoPE) is implemented');
    }
    const t = (rp as Record<string, unknown>).rope_theta;
    if (t !== undefined) {
      if (typeof t !== "number" || !Number.isFinite(t) || t <= 0) {
        return fail(
          `rope_parameters.rope_theta must be a positive number, got ${JSON.stringify(t)}`,
        );
      }
      ropeTheta = t;
    }
  }
  if (arch === "MiniMindForCausalLM" && json.inference_rope_scaling === true) {
    unsupported("inference_rope_scaling", "YaRN rope scaling is not implemented");
  }
  if (json.use_sliding_window === true) {
    unsupported("use_sliding_window", "attention is full causal on every layer");
  }
  if (arch !== "Qwen3ForCausalLM" && has("sliding_window")) {
    unsupported("sliding_window", "attention is full causal on every layer; set it to null");
  }
  if (has("layer_types")) {
    const lt = json.layer_types;
    if (!Array.isArray(lt) || lt.some((t) => t !== "full_attention")) {
      unsupported("layer_types", 'every layer must be "full_attention"');
    }
  }
  if (json.use_moe === true) unsupported("use_moe", "mixture-of-experts MLPs are not implemented");
  for (const f of ["num_experts", "num_local_experts", "n_routed_experts"]) {
    if (arch !== "MiniMindForCausalLM" && typeof json[f] === "number" && (json[f] as number) > 0) {
      unsupported(f, "mixture-of-experts MLPs are not implemented");
    }
  }
  if (has("quantization_config")) {
    unsupported("quantization_config", "quantized weights are not supported; use float weights");
  }

  const hidden = int("hidden_size");
  const heads = int("num_attention_heads");
  const config: ModelConfig = {
    hidden_size: hidden,
    num_hidden_layers: int("num_hidden_layers"),
    num_attention_heads: heads,
    num_key_value_heads: int("num_key_value_heads", heads),
    intermediate_size: int("intermediate_size"),
    vocab_size: int("vocab_size"),
    max_position_embeddings: int("max_position_embeddings", defaults.max_position_embeddings),
    rope_theta: ropeTheta ?? positive("rope_theta", defaults.rope_theta),
    rms_norm_eps: positive("rms_norm_eps", defaults.rms_norm_eps),
    tie_word_embeddings: bool("tie_word_embeddings", defaults.tie_word_embeddings),
    qk_norm: arch === "Qwen3ForCausalLM" ||
      (arch === "MiniMindForCausalLM" && opts.weightsHaveQkNorm === true),
  };
  if (ropeTheta !== undefined && has("rope_theta") && json.rope_theta !== ropeTheta) {
    fail(
      `rope_theta = ${json.rope_theta} disagrees with rope_parameters.rope_theta = ${ropeTheta}`,
    );
  }
  const hdDefault = arch === "Qwen3ForCausalLM" ? QWEN3_DEFAULT_HEAD_DIM : hidden / heads;
  const hd = json.head_dim ?? hdDefault;
  if (hd !== hidden / heads) {
    fail(
      `head_dim = ${hd}${
        json.head_dim === undefined ? ` (the ${arch} default)` : ""
      } is not supported: head_dim must equal hidden_size / num_attention_heads = ${hidden} / ${heads}`,
    );
  }
  validateConfig(config, source);

  const special: Partial<SpecialTokenIds> = {};
  const ids: [keyof SpecialTokenIds, string][] = [
    ["bos", "bos_token_id"],
    ["eos", "eos_token_id"],
    ["pad", "pad_token_id"],
  ];
  for (const [key, field] of ids) {
    const id = tokenId(json[field], field, config.vocab_size, fail);
    if (id !== undefined) special[key] = id;
  }
  return { config, architecture: arch, special };
}

/** A token id field: an integer in [0, vocab), or a non-empty list of them (its first counts); null/absent is undefined. */
function tokenId(
  v: unknown,
  field: string,
  vocab: number | undefined,
  fail: (msg: string) => never,
): number | undefined {
  const ids = tokenIds(v, field, vocab, fail);
  return ids?.[0];
}

function tokenIds(
  v: unknown,
  field: string,
  vocab: number | undefined,
  fail: (msg: string) => never,
): number[] | undefined {
  if (v === undefined || v === null) return undefined;
  const list = Array.isArray(v) ? v : [v];
  if (list.length === 0) return undefined;
  for (const id of list) {
    if (typeof id !== "number" || !Number.isInteger(id) || id < 0) {
      fail(
        `${field} must be a token id (a non-negative integer) or a list of them, got ${
          JSON.stringify(v)
        }`,
      );
    }
    if (vocab !== undefined && id >= vocab) {
      fail(`${field} = ${id} is outside the vocabulary (vocab_size = ${vocab})`);
    }
  }
  return list as number[];
}

/** Sampling defaults a `generation_config.json` may carry. */
export interface SamplingDefaults {
  /** Logits are divided by it; 0 = greedy. */
  temperature?: number;
  /** Nucleus sampling mass in (0, 1]; 1 = off. */
  top_p?: number;
  /** Keep only the k most likely tokens; 0 = off. */
  top_k?: number;
  /** Tokens to generate at most. */
  max_new_tokens?: number;
  /** HF repetition penalty (> 0) on tokens already in the context; 1 = off. */
  repetition_penalty?: number;
}

/**
 * The `generation_config.json` object: the special ids, and sampling defaults
 * when given (then `do_sample: true`; without them Transformers decodes
 * greedily, and we say so with `do_sample: false`).
 */
export function toGenerationConfig(
  special: SpecialTokenIds,
  sampling?: SamplingDefaults,
): Record<string, unknown> {
  const json: Record<string, unknown> = {
    bos_token_id: special.bos,
    eos_token_id: special.eos,
    pad_token_id: special.pad,
    do_sample: sampling !== undefined,
  };
  for (const [k, v] of Object.entries(sampling ?? {})) if (v !== undefined) json[k] = v;
  return json;
}

/** What `parseGenerationConfig` found; absent fields are left out. */
export interface ParsedGenerationConfig extends SamplingDefaults {
  /** `bos_token_id`. */
  bos?: number;
  /** The first end-of-sequence id. */
  eos?: number;
  /** Every id that ends generation (`eos_token_id` may be a list). */
  eosIds?: number[];
  /** `pad_token_id`. */
  pad?: number;
  /** Whether Transformers samples (true) or decodes greedily (false). */
  do_sample?: boolean;
}

/**
 * Reads a parsed `generation_config.json`. `vocabSize`, when given, bounds the
 * ids. Unknown fields are ignored; a known field of the wrong type is a
 * `UserError` naming it.
 */
export function parseGenerationConfig(
  json: unknown,
  source: string,
  vocabSize?: number,
): ParsedGenerationConfig {
  const fail = (msg: string): never => {
    throw new UserError(`${source}: ${msg}`);
  };
  if (!isObject(json)) return fail("expected a JSON object");
  const out: ParsedGenerationConfig = {};
  const bos = tokenId(json.bos_token_id, "bos_token_id", vocabSize, fail);
  if (bos !== undefined) out.bos = bos;
  const eosIds = tokenIds(json.eos_token_id, "eos_token_id", vocabSize, fail);
  if (eosIds !== undefined) {
    out.eos = eosIds[0];
    out.eosIds = eosIds;
  }
  const pad = tokenId(json.pad_token_id, "pad_token_id", vocabSize, fail);
  if (pad !== undefined) out.pad = pad;
  if (json.do_sample !== undefined && json.do_sample !== null) {
    if (typeof json.do_sample !== "boolean") {
      fail(`do_sample must be true or false, got ${JSON.stringify(json.do_sample)}`);
    }
    out.do_sample = json.do_sample as boolean;
  }
  const numbers: [keyof SamplingDefaults, (x: number) => boolean, string][] = [
    ["temperature", (x) => x >= 0, "a number >= 0"],
    ["top_p", (x) => x > 0 && x <= 1, "a number in (0, 1]"],
    ["top_k", (x) => Number.isInteger(x) && x >= 0, "a non-negative integer"],
    ["max_new_tokens", (x) => Number.isInteger(x) && x >= 1, "a positive integer"],
    ["repetition_penalty", (x) => x > 0, "a positive number"],
  ];
  for (const [field, ok, what] of numbers) {
    const v = json[field];
    if (v === undefined || v === null) continue;
    if (typeof v !== "number" || !Number.isFinite(v) || !ok(v)) {
      fail(`${field} must be ${what}, got ${JSON.stringify(v)}`);
    }
    out[field] = v as number;
  }
  return out;
}

/** A special token's text in `tokenizer_config.json`: a string or `{"content": ...}`. */
function specialTokenText(v: unknown): string | undefined {
  if (typeof v === "string") return v;
  if (isObject(v) && typeof v.content === "string") return v.content;
  return undefined;
}

/**
 * The bos / eos / pad ids a tokenizer names (`bos_token`, `eos_token`,
 * `pad_token` of `tokenizer_config.json`, looked up in `tokenizer.json`'s
 * added tokens, then its vocabulary), with the tokenizer's own fallbacks: no
 * bos or pad means eos. The same ids `TextTokenizer` gives, read from the
 * files alone; `source` (the directory) prefixes errors.
 */
export function specialIdsFromTokenizerFiles(
  tokenizerJson: string,
  tokenizerConfigJson: string,
  source: string,
): SpecialTokenIds {
  const parse = (text: string, file: string): Record<string, unknown> => {
    let v: unknown;
    try {
      v = JSON.parse(text);
    } catch (e) {
      throw new UserError(`${source}/${file}: not valid JSON: ${(e as Error).message}`);
    }
    if (!isObject(v)) throw new UserError(`${source}/${file}: expected a JSON object`);
    return v;
  };
  const tok = parse(tokenizerJson, "tokenizer.json");
  const cfg = parse(tokenizerConfigJson, "tokenizer_config.json");
  const idOf = (key: string): number | undefined => {
    const raw = cfg[key];
    if (raw === undefined || raw === null) return undefined;
    const text = specialTokenText(raw);
    if (text === undefined) {
      throw new UserError(
        `${source}/tokenizer_config.json: "${key}" must be a string or {"content": ...}`,
      );
    }
    const added = Array.isArray(tok.added_tokens) ? tok.added_tokens : [];
    for (const t of added) {
      if (isObject(t) && t.content === text && typeof t.id === "number") return t.id;
    }
    const vocab = isObject(tok.model) ? tok.model.vocab : undefined;
    if (isObject(vocab) && typeof vocab[text] === "number") return vocab[text] as number;
    if (Array.isArray(vocab)) {
      // Unigram: a list of [piece, score]; the id is the index.
      const i = vocab.findIndex((p) => Array.isArray(p) && p[0] === text);
      if (i >= 0) return i;
    }
    throw new UserError(
      `${source}/tokenizer_config.json: ${key} "${text}" is not a token of tokenizer.json`,
    );
  };
  const eos = idOf("eos_token");
  if (eos === undefined) {
    throw new UserError(
      `${source}/tokenizer_config.json: no "eos_token"; the trainer needs one to end documents and turns`,
    );
  }
  return { bos: idOf("bos_token") ?? eos, eos, pad: idOf("pad_token") ?? eos };
}
