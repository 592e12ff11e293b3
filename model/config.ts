/**
 * Model configuration with Hugging Face field names, the presets, validation
 * and the parameter count.
 *
 * The architecture is Llama / MiniMind: decoder-only, pre-norm, no biases,
 * RMSNorm, rotate-half RoPE, causal GQA attention, SwiGLU MLP, optional
 * per-head QK-norm (MiniMind-3 / Qwen3), head tied to the embedding by default.
 */
import { UserError } from "../util/errors.ts";

/** A model's shape, in Hugging Face `config.json` field names (plus `qk_norm`). */
export interface ModelConfig {
  /** Model width H: embedding and residual-stream size; a multiple of `num_attention_heads`. */
  hidden_size: number;
  /** Transformer blocks L. */
  num_hidden_layers: number;
  /** Query heads; head_dim = `hidden_size / num_attention_heads`, which must be even (RoPE). */
  num_attention_heads: number;
  /** Key/value heads (GQA); divides `num_attention_heads`, each serves that many query heads. */
  num_key_value_heads: number;
  /** SwiGLU MLP width I (`gate_proj`, `up_proj`: `[I, H]`; `down_proj`: `[H, I]`). */
  intermediate_size: number;
  /** Vocabulary size V: rows of the embedding and of the head. */
  vocab_size: number;
  /** Longest sequence (training T, prompt plus generated tokens) the model accepts. */
  max_position_embeddings: number;
  /** RoPE base: dimension pair i rotates by `pos * rope_theta^(-2i / head_dim)`. */
  rope_theta: number;
  /** Epsilon added to the mean square inside every RMSNorm. */
  rms_norm_eps: number;
  /** The head reuses the embedding matrix (no separate `lm_head.weight`). */
  tie_word_embeddings: boolean;
  /** Per-head RMSNorm on q and k before RoPE (Qwen3 / MiniMind-3). */
  qk_norm: boolean;
}

/** The names `--preset` accepts. */
export type PresetName = "tiny" | "minimind2-small" | "minimind-3";

/**
 * Presets. `minimind2-small` and `minimind-3` are MiniMind's published shapes
 * (25.8M and 63.9M parameters); MiniMind sets the MLP width to
 * `ceil(hidden * 8/3 / 64) * 64` in MiniMind2 and `ceil(hidden * pi / 64) * 64`
 * in MiniMind-3, which gives 1408 and 2432 here. MiniMind-3's `MiniMindConfig`
 * sets `rms_norm_eps` 1e-6; MiniMind2's was 1e-5.
 *
 * `tiny` is the embedded default: sized so that a CPU software driver trains it
 * visibly in minutes (loads, not math, are the cost there), with a vocabulary
 * of 1558 to match the embedded tokenizer.
 */
export const PRESETS: Readonly<Record<PresetName, Readonly<ModelConfig>>> = {
  "tiny": {
    hidden_size: 128,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    intermediate_size: 384,
    vocab_size: 1558,
    max_position_embeddings: 512,
    rope_theta: 1e6,
    rms_norm_eps: 1e-5,
    tie_word_embeddings: true,
    qk_norm: false,
  },
  "minimind2-small": {
    hidden_size: 512,
    num_hidden_layers: 8,
    num_attention_heads: 8,
    num_key_value_heads: 2,
    intermediate_size: 1408,
    vocab_size: 6400,
    max_position_embeddings: 32768,
    rope_theta: 1e6,
    rms_norm_eps: 1e-5,
    tie_word_embeddings: true,
    qk_norm: false,
  },
  "minimind-3": {
    hidden_size: 768,
    num_hidden_layers: 8,
    num_attention_heads: 8,
    num_key_value_heads: 4,
    intermediate_size: 2432,
    vocab_size: 6400,
    max_position_embeddings: 32768,
    rope_theta: 1e6,
    rms_norm_eps: 1e-6,
    tie_word_embeddings: true,
    qk_norm: true,
  },
};

/** The preset of that name, as a fresh object; an unknown name is an error that lists the known ones. */
export function presetConfig(name: string): ModelConfig {
  if (!(name in PRESETS)) {
    throw new UserError(
      `unknown preset '${name}'; presets: ${Object.keys(PRESETS).join(", ")}`,
    );
  }
  return { ...PRESETS[name as PresetName] };
}

/** `hidden_size / num_attention_heads`. */
export function headDim(config: ModelConfig): number {
  return config.hidden_size / config.num_attention_heads;
}

const INTEGER_FIELDS = [
  "hidden_size",
  "num_hidden_layers",
  "num_attention_heads",
  "num_key_value_heads",
  "intermediate_size",
  "vocab_size",
  "max_position_embeddings",
] as const;

/** Every field of `ModelConfig`, for readers of config files. */
export const MODEL_CONFIG_FIELDS: readonly (keyof ModelConfig)[] = [
  ...INTEGER_FIELDS,
  "rope_theta",
  "rms_norm_eps",
  "tie_word_embeddings",
  "qk_norm",
];

/**
 * Checks a config and throws a `UserError` that names the field at the first
 * problem. `source` (a file name) prefixes the message when given.
 */
export function validateConfig(config: ModelConfig, source = "model config"): void {
  const fail = (msg: string): never => {
    throw new UserError(`${source}: ${msg}`);
  };
  for (const f of INTEGER_FIELDS) {
    const v = config[f];
    if (typeof v !== "number" || !Number.isInteger(v) || v < 1) {
      fail(`${f} must be a positive integer, got ${JSON.stringify(v)}`);
    }
  }
  for (const f of ["rope_theta", "rms_norm_eps"] as const) {
    const v = config[f];
    if (typeof v !== "number" || !Number.isFinite(v) || v <= 0) {
      fail(`${f} must be a positive number, got ${JSON.stringify(v)}`);
    }
  }
  for (const f of ["tie_word_embeddings", "qk_norm"] as const) {
    if (typeof config[f] !== "boolean") {
      fail(`${f} must be true or false, got ${JSON.stringify(config[f])}`);
    }
  }
  if (config.hidden_size % config.num_attention_heads !== 0) {
    fail(
      `hidden_size (${config.hidden_size}) must be divisible by num_attention_heads (${config.num_attention_heads})`,
    );
  }
  if (config.num_attention_heads % config.num_key_value_heads !== 0) {
    fail(
      `num_attention_heads (${config.num_attention_heads}) must be divisible by num_key_value_heads (${config.num_key_value_heads})`,
    );
  }
  const hd = headDim(config);
  if (hd % 2 !== 0) {
    fail(
      `head_dim = hidden_size / num_attention_heads = ${hd} must be even for RoPE (rotate-half pairs dimension i with i + head_dim/2)`,
    );
  }
}

/** Parameter count of each kind, and the total (the tied head counts once). */
export function parameterCount(config: ModelConfig): {
  embedding: number;
  perLayer: number;
  head: number;
  total: number;
} {
  const h = config.hidden_size;
  const hd = headDim(config);
  const kvDim = config.num_key_value_heads * hd;
  const attention = h * h /* q */ + 2 * h * kvDim /* k, v */ + h * h; /* o */
  const mlp = 3 * h * config.intermediate_size;
  const norms = 2 * h + (config.qk_norm ? 2 * hd : 0);
  const perLayer = attention + mlp + norms;
  const embedding = config.vocab_size * h;
  const head = config.tie_word_embeddings ? 0 : config.vocab_size * h;
  return {
    embedding,
    perLayer,
    head,
    total: embedding + config.num_hidden_layers * perLayer + h /* final norm */ + head,
  };
}

/**
 * Model FLOPs of one training step per token, in the PaLM / nanoGPT
 * convention so MFU compares with theirs: `6 * P_matmul + 12 * L * H * T`.
 * `P_matmul` is every parameter that takes part in a matmul (a tied embedding
 * counts once, as the head's matrix; an untied table's lookup is free); 6 is 2
 * (multiply-add) x 3 (forward, dX, dW). `12 * L * H * T` is attention's two
 * T x T products, forward and backward, over the full square as PaLM counts
 * them although causal masking needs only half. Recomputation is not counted.
 */
export function trainFlopsPerToken(config: ModelConfig, seqLen: number): number {
  const count = parameterCount(config);
  const matmulParams = count.total - (config.tie_word_embeddings ? 0 : count.embedding);
  return 6 * matmulParams + 12 * config.num_hidden_layers * config.hidden_size * seqLen;
}
