/**
 * The one way every command (`generate`, `chat`, `serve`, `eval`, training's
 * `--init`) loads a model: a checkpoint directory (ours, or a Hugging Face
 * model directory; `loadCheckpoint`), or a PyTorch state dict file
 * (`.pth` / `.pt` / `.bin`, read by the restricted reader of `io/pth.ts`), as
 * MiniMind saves them: `torch.save({k: v.half() for k, v in
 * model.state_dict().items()})`, Hugging Face tensor names, the tied head
 * saved twice (`model.embed_tokens.weight` and `lm_head.weight`, equal).
 *
 * A state dict holds tensors only. What the tensors say is taken from them:
 * `vocab_size` and `hidden_size` (the embedding), `num_hidden_layers` (the
 * layer indices), `intermediate_size` (gate_proj), QK-norm (q_norm present),
 * a tied head (`lm_head.weight` absent, or equal to the embedding), and, when
 * q_norm gives head_dim, `num_attention_heads` and `num_key_value_heads` (q
 * and k rows over head_dim). What they cannot say comes from `--preset` /
 * `--model-config`, or else MiniMind's defaults (`MiniMindConfig`):
 * `rope_theta` 1e6, `rms_norm_eps` 1e-6, `max_position_embeddings` 32768.
 * Without q_norm (MiniMind2, Llama) the head count is not in any shape
 * (q_proj is `[heads * head_dim, hidden]` whatever the split), so such a file
 * needs `--preset` or `--model-config`. Given a shape, every tensor is checked
 * against it, and a mismatch names the tensor, both shapes and the field.
 *
 * The tokenizer is not in a state dict either: it is given (`--tokenizer`),
 * or `tokenizer.json` + `tokenizer_config.json` beside the file are used.
 * The special ids are the tokenizer's, and there is no
 * `generation_config.json`, so generation is greedy unless asked otherwise
 * (as Transformers does without one).
 *
 * @module
 */
import {
  bitwiseEqual,
  checkedTokenizerIds,
  loadCheckpoint,
  type LoadedCheckpoint,
  shapeMismatch,
} from "./checkpoint.ts";
import type { RequestedShape } from "./model_config.ts";
import { loadPth } from "./pth.ts";
import { MODEL_CONFIG_FIELDS, type ModelConfig, validateConfig } from "../model/config.ts";
import { parameterSpecs, tensorNames } from "../model/params.ts";
import { UserError } from "../util/errors.ts";

/** The tokenizer files' contents, as a checkpoint holds them. */
export interface TokenizerFiles {
  /** `tokenizer.json`'s text. */
  tokenizerJson: string;
  /** `tokenizer_config.json`'s text. */
  tokenizerConfigJson: string;
}

/** Options of `loadModel`. */
export interface LoadModelOptions {
  /**
   * The shape asked for (`--preset` / `--model-config`). A state dict is read
   * as this shape (its vocabulary follows the tensors unless the request sets
   * it); a directory's `config.json` must describe the same model.
   */
  shape?: RequestedShape;
  /** Tokenizer files to use instead of the checkpoint's (required for a state dict, unless beside it). */
  tokenizer?: TokenizerFiles;
  /** How messages name the model (default: its path), e.g. "the --init checkpoint out/x". */
  describe?: string;
}

/** What `loadModel` returns: a loaded checkpoint, and what was inferred or assumed. */
export interface LoadedModel extends LoadedCheckpoint {
  /** Lines for the user: shape fields read from tensors or defaulted (state dicts only). */
  notes: string[];
}

/** MiniMind's defaults (`MiniMindConfig`) for what a state dict cannot show. */
export const STATE_DICT_DEFAULTS = {
  rope_theta: 1e6,
  rms_norm_eps: 1e-6,
  max_position_embeddings: 32768,
} as const;

/** Whether `path` names a PyTorch state dict file rather than a checkpoint directory. */
export function isStateDictPath(path: string): boolean {
  return /\.(pth|pt|bin)$/i.test(path);
}

async function statOrUndefined(path: string): Promise<Deno.FileInfo | undefined> {
  try {
    return await Deno.stat(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return undefined;
    throw new UserError(`${path}: cannot read: ${(e as Error).message}`);
  }
}

/**
 * Loads a model for any command: a checkpoint directory or a PyTorch state
 * dict file (see the module comment).
 *
 * @example
 * ```ts
 * import { loadModel } from "./model_files.ts";
 * const tok = "../shared/fixtures/minimind-tokenizer";
 * const m = await loadModel("tests/fixtures/pth/minimind3_v6400.pth", {
 *   tokenizer: {
 *     tokenizerJson: await Deno.readTextFile(`${tok}/tokenizer.json`),
 *     tokenizerConfigJson: await Deno.readTextFile(`${tok}/tokenizer_config.json`),
 *   },
 * });
 * // MiniMind's tokenizer: bos <|im_start|> = 1, eos <|im_end|> = 2.
 * if (m.config.vocab_size !== 6400 || m.special.eos !== 2) throw new Error("loaded");
 * ```
 */
export async function loadModel(
  path: string,
  opts: LoadModelOptions = {},
): Promise<LoadedModel> {
  const st = await statOrUndefined(path);
  if (st?.isFile || (!st && isStateDictPath(path))) {
    if (!isStateDictPath(path)) {
      throw new UserError(
        `${path}: a file; a model is a checkpoint directory (config.json, model.safetensors, tokenizer files) or a PyTorch state dict file (.pth, .pt, .bin)`,
      );
    }
    return await loadStateDictModel(path, opts);
  }
  if (st?.isDirectory && !(await statOrUndefined(`${path}/config.json`))) {
    // MiniMind's out/ holds .pth files only: point at them.
    const dicts: string[] = [];
    for await (const e of Deno.readDir(path)) {
      if (e.isFile && isStateDictPath(e.name)) dicts.push(e.name);
    }
    if (dicts.length > 0) {
      throw new UserError(
        `${path}: not a checkpoint directory (no config.json); it holds PyTorch state dict${
          dicts.length > 1 ? "s" : ""
        }: pass the file itself (${
          dicts.sort().map((n) => `${path.replace(/\/+$/, "")}/${n}`).join(", ")
        })`,
      );
    }
  }
  const ckpt = await loadCheckpoint(path);
  const describe = opts.describe ?? ckpt.source;
  if (opts.shape) checkSameShape(opts.shape, ckpt.config, describe);
  if (opts.tokenizer) {
    ckpt.tokenizer = {
      tokenizerJson: opts.tokenizer.tokenizerJson,
      tokenizerConfigJson: opts.tokenizer.tokenizerConfigJson,
    };
    // The model's own ids stay; the tokenizer's must at least be its tokens.
    checkedTokenizerIds(ckpt.tokenizer, "--tokenizer", ckpt.config.vocab_size);
  }
  return { ...ckpt, notes: [] };
}

/**
 * Refuses a requested shape that differs from a checkpoint's, naming the
 * first field. The vocabulary counts only when the request sets it.
 */
export function checkSameShape(shape: RequestedShape, have: ModelConfig, where: string): void {
  for (const field of MODEL_CONFIG_FIELDS) {
    if (field === "vocab_size" && !shape.setsVocab) continue;
    if (shape.config[field] !== have[field]) {
      throw new UserError(
        `${shape.flag} asks for ${field} = ${shape.config[field]}, but ${where} has ${field} = ${
          have[field]
        }; drop ${shape.flag} to use the checkpoint's model`,
      );
    }
  }
}

/** The tokenizer of a state dict: given, or the two files beside it. */
async function stateDictTokenizer(path: string, given?: TokenizerFiles): Promise<TokenizerFiles> {
  if (given) {
    return { tokenizerJson: given.tokenizerJson, tokenizerConfigJson: given.tokenizerConfigJson };
  }
  const cut = Math.max(path.lastIndexOf("/"), path.lastIndexOf("\\"));
  const dir = cut < 0 ? "." : path.slice(0, cut) || "/";
  try {
    return {
      tokenizerJson: await Deno.readTextFile(`${dir}/tokenizer.json`),
      tokenizerConfigJson: await Deno.readTextFile(`${dir}/tokenizer_config.json`),
    };
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) {
      throw new UserError(`${dir}: cannot read the tokenizer files: ${(e as Error).message}`);
    }
    throw new UserError(
      `${path} holds weights only, no tokenizer: pass --tokenizer DIR (a directory with tokenizer.json and tokenizer_config.json; MiniMind's is model/ in its repository), or put those two files beside the .pth`,
    );
  }
}

/** The shape fields a state dict's tensors give, and what they leave open. */
interface InferredShape {
  config: ModelConfig;
  notes: string[];
}

/** 1e6 and 1e-6 as written in configs, not 1000000 and 0.000001. */
function short(x: number): string {
  return x >= 1e5 || x < 1e-3 ? x.toExponential().replace("e+", "e") : String(x);
}

/**
 * Reads the shape from a state dict's tensors (see the module comment);
 * throws when the head count cannot be known.
 */
export function inferStateDictShape(
  tensors: Map<string, { shape: number[] }>,
  path: string,
): InferredShape {
  // Names by role from the one place that spells them; a probe config with
  // every optional tensor, so each role has its name.
  const probe = (layers: number) =>
    tensorNames({
      hidden_size: 2,
      num_hidden_layers: layers,
      num_attention_heads: 1,
      num_key_value_heads: 1,
      intermediate_size: 1,
      vocab_size: 1,
      max_position_embeddings: 1,
      rope_theta: 1,
      rms_norm_eps: 1,
      tie_word_embeddings: false,
      qk_norm: true,
    });
  const names = probe(1);
  const shapeOf = (name: string) => tensors.get(name)?.shape;
  const need = (name: string, rank: number): number[] => {
    const s = shapeOf(name);
    if (!s) {
      throw new UserError(
        `${path}: no tensor ${name}; is this a state dict of a Llama / MiniMind model (Hugging Face names)?`,
      );
    }
    if (s.length !== rank) {
      throw new UserError(
        `${path}: tensor ${name} has shape [${s.join(", ")}], expected ${rank} dimensions`,
      );
    }
    return s;
  };
  const [vocab, hidden] = need(names.embed, 2);
  let layers = 0;
  while (tensors.has(probe(layers + 1).layers[layers].q)) layers++;
  if (layers === 0) need(names.layers[0].q, 2);
  const L0 = names.layers[0];
  const [inter] = need(L0.gate, 2);
  const [qRows] = need(L0.q, 2);
  const [kRows] = need(L0.k, 2);
  const qNorm = shapeOf(L0.qNorm!);
  const qk = qNorm !== undefined;
  const head = tensors.get(names.head);
  const notes: string[] = [];
  if (!qk) {
    throw new UserError(
      `${path}: the tensors do not say how many attention heads the model has (q_proj is [heads * head_dim, ${hidden}] = [${qRows}, ${hidden}] for any split, and there is no q_norm to give head_dim): pass --preset (minimind2-small is MiniMind2's 26M shape) or --model-config FILE with num_attention_heads and num_key_value_heads`,
    );
  }
  if (qNorm.length !== 1) {
    throw new UserError(
      `${path}: tensor ${L0.qNorm} has shape [${qNorm.join(", ")}], expected [head_dim]`,
    );
  }
  const hd = qNorm[0];
  if (hd < 1 || qRows % hd !== 0 || kRows % hd !== 0) {
    throw new UserError(
      `${path}: q_norm says head_dim = ${hd}, which does not divide q_proj's ${qRows} or k_proj's ${kRows} rows`,
    );
  }
  const heads = qRows / hd;
  if (qRows !== hidden) {
    throw new UserError(
      `${path}: ${L0.q} has ${qRows} rows = ${heads} heads x head_dim ${hd}, not hidden_size ${hidden}: head_dim must equal hidden_size / num_attention_heads here`,
    );
  }
  const config: ModelConfig = {
    hidden_size: hidden,
    num_hidden_layers: layers,
    num_attention_heads: heads,
    num_key_value_heads: kRows / hd,
    intermediate_size: inter,
    vocab_size: vocab,
    ...STATE_DICT_DEFAULTS,
    tie_word_embeddings: head === undefined, // refined by the caller (a head equal to the embedding)
    qk_norm: true,
  };
  notes.push(
    `read from the tensors: vocab_size ${vocab}, hidden_size ${hidden}, num_hidden_layers ${layers}, ` +
      `num_attention_heads ${heads}, num_key_value_heads ${config.num_key_value_heads} (head_dim ${hd} from q_norm), ` +
      `intermediate_size ${inter}, QK-norm`,
    `not in the tensors, MiniMind's defaults: rope_theta ${
      short(STATE_DICT_DEFAULTS.rope_theta)
    }, rms_norm_eps ${
      short(STATE_DICT_DEFAULTS.rms_norm_eps)
    }, max_position_embeddings ${STATE_DICT_DEFAULTS.max_position_embeddings} (pass --model-config to set them)`,
  );
  return { config, notes };
}

async function loadStateDictModel(path: string, opts: LoadModelOptions): Promise<LoadedModel> {
  const tensors = await loadPth(path);
  // Older Transformers saved RoPE's inverse frequencies as a buffer; they follow
  // from rope_theta and head_dim, so they are not weights.
  for (const name of [...tensors.keys()]) {
    if (name.endsWith(".rotary_emb.inv_freq")) tensors.delete(name);
  }
  const describe = opts.describe ?? path;
  const notes: string[] = [];
  let config: ModelConfig;
  let against: string;
  if (opts.shape) {
    config = { ...opts.shape.config };
    against = `${opts.shape.flag} ${opts.shape.value}`;
    const emb = tensors.get("model.embed_tokens.weight");
    if (!opts.shape.setsVocab && emb && emb.shape.length === 2) {
      // A preset's vocabulary follows the data; here the data is the tensors.
      config.vocab_size = emb.shape[0];
    }
    validateConfig(config, against);
  } else {
    const inferred = inferStateDictShape(tensors, path);
    config = inferred.config;
    notes.splice(0, notes.length, ...inferred.notes);
    against = "the shape read from the tensors";
  }

  // The head: tied means no lm_head.weight, or one equal to the embedding
  // (MiniMind saves both); untied needs one.
  const names = tensorNames({ ...config, tie_word_embeddings: false });
  const head = tensors.get(names.head);
  const embed = tensors.get(names.embed);
  const headEqualsEmbed = head !== undefined && embed !== undefined &&
    head.shape.join() === embed.shape.join() && bitwiseEqual(head.data, embed.data);
  if (!opts.shape) {
    config.tie_word_embeddings = head === undefined || headEqualsEmbed;
    notes[0] += config.tie_word_embeddings
      ? head === undefined
        ? ", tied head (no lm_head.weight)"
        : ", tied head (lm_head.weight equals the embedding)"
      : ", untied head";
  } else if (config.tie_word_embeddings && head !== undefined && !headEqualsEmbed) {
    throw new UserError(
      `${describe}: ${against} says tie_word_embeddings = true, but lm_head.weight differs from model.embed_tokens.weight; use a --model-config with tie_word_embeddings false`,
    );
  }
  if (!config.tie_word_embeddings && head === undefined) {
    throw new UserError(
      `${describe}: ${against} says tie_word_embeddings = false but there is no lm_head.weight`,
    );
  }

  // Shapes first: a wrong shape says more than the missing tensors it implies.
  const specs = parameterSpecs(config);
  for (const s of specs) {
    const t = tensors.get(s.name);
    if (t && (t.shape.length !== s.shape.length || t.shape.some((d, i) => d !== s.shape[i]))) {
      throw shapeMismatch(describe, against, s.name, t.shape, s.shape);
    }
  }
  const expected = new Set(specs.map((s) => s.name));
  const missing = specs.filter((s) => !tensors.has(s.name)).map((s) => s.name);
  if (missing.length > 0) {
    throw new UserError(
      `${describe}: missing tensor${missing.length > 1 ? "s" : ""} ${
        missing.slice(0, 5).join(", ")
      }${missing.length > 5 ? ` and ${missing.length - 5} more` : ""} that ${against} implies`,
    );
  }
  const unexpected = [...tensors.keys()].filter((n) =>
    !expected.has(n) && !(n === names.head && config.tie_word_embeddings)
  );
  if (unexpected.length > 0) {
    throw new UserError(
      `${describe}: unexpected tensor${unexpected.length > 1 ? "s" : ""} ${
        unexpected.slice(0, 5).join(", ")
      }${
        unexpected.length > 5 ? ` and ${unexpected.length - 5} more` : ""
      }, which ${against} does not imply`,
    );
  }
  const params = new Map<string, Float32Array>();
  for (const s of specs) {
    const t = tensors.get(s.name)!;
    // Tensors that were one view of one storage share an array; parameters must not.
    params.set(s.name, [...params.values()].includes(t.data) ? t.data.slice() : t.data);
  }

  const tokenizer = await stateDictTokenizer(path, opts.tokenizer);
  const special = checkedTokenizerIds(
    tokenizer,
    opts.tokenizer ? "--tokenizer" : describe,
    config.vocab_size,
  );
  if (opts.shape) notes.push(`shape from ${against} (checked against every tensor)`);
  return { config, params, tokenizer, special, source: path, generation: {}, notes };
}
