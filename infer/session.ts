/**
 * What every way of talking to a trained model shares (`trainer generate`,
 * `trainer chat`, `trainer serve`): loading a checkpoint with its tokenizer
 * for generation, the sampling settings it asks for, the ids that end a
 * reply, chat prompts that fit the context, and text streamed token by token.
 * Typed options only: the command line lives in `cli/`.
 *
 * @module
 */
import type { LoadedCheckpoint } from "../io/checkpoint.ts";
import { type LoadedModel, loadModel } from "../io/model_files.ts";
import { requestedShape } from "../io/model_config.ts";
import { checkSamplingOptions, type SamplingOptions } from "../model/sampling.ts";
import { type ChatMessage, StreamingDecoder, TextTokenizer } from "../data/tokenizer.ts";
import { UserError } from "../util/errors.ts";
import { loadAdapter } from "../io/peft.ts";
import { loraLayout, mergeLora } from "../model/lora.ts";

/** Where generation looks for a model by default: the result of `deno task sft`. */
export const DEFAULT_MODEL_DIR = "out/sft";

/** Tokens to generate when neither the caller nor `generation_config.json` says. */
export const DEFAULT_MAX_NEW_TOKENS = 256;

/** Default cap of a chat's context (KV cache positions), below `max_position_embeddings`. */
export const DEFAULT_CHAT_CONTEXT = 2048;

/** A checkpoint and its tokenizer, ready to generate. */
export interface GenerationModel {
  /** The loaded checkpoint: config, parameters and generation settings. */
  ckpt: LoadedModel;
  /** The tokenizer: the checkpoint's, or the one given instead. */
  tokenizer: TextTokenizer;
  /** The directory (or state dict file) it was loaded from. */
  dir: string;
  /** The LoRA adapter applied on load, when one was given. */
  adapter?: string;
}

/** How to read a model that does not carry everything itself (a `.pth` state dict). */
export interface GenerationModelOptions {
  /** `--preset`: the shape of a state dict (checked against a directory's config). */
  preset?: string;
  /** `--model-config`: the same from a JSON/JSONC file. */
  modelConfig?: string;
  /** `--tokenizer`: a tokenizer directory, instead of the checkpoint's (a state dict has none). */
  tokenizer?: string;
  /**
   * A LoRA adapter directory (PEFT format) trained on this model: its delta
   * `s B A` is added to the adapted weights once, in memory, on load (the
   * files stay as they are; generation then runs at the base model's speed).
   */
  adapter?: string;
}

/**
 * Loads `dir` (a checkpoint or Hugging Face model directory, or a PyTorch
 * `.pth` state dict; default `DEFAULT_MODEL_DIR`, with a message that says
 * how to make one when it is missing) with its tokenizer, which must fit the
 * model's vocabulary. `opts` gives what a state dict lacks (see
 * `io/model_files.ts`).
 */
export async function loadGenerationModel(
  dir?: string,
  opts: GenerationModelOptions = {},
): Promise<GenerationModel> {
  const path = dir ?? DEFAULT_MODEL_DIR;
  if (dir === undefined) {
    try {
      await Deno.stat(path);
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
      throw new UserError(
        `no model at ${DEFAULT_MODEL_DIR} (the default): make one with \`deno task pretrain\` then \`deno task sft\`, or pass --model DIR (a checkpoint or Hugging Face model directory) or --model FILE.pth (a PyTorch state dict, as MiniMind saves)`,
      );
    }
  }
  const given = opts.tokenizer ? await TextTokenizer.load(opts.tokenizer) : undefined;
  const ckpt = await loadModel(path, { shape: await requestedShape(opts), tokenizer: given });
  const tokenizer = given ?? TextTokenizer.fromJson(
    ckpt.tokenizer.tokenizerJson,
    ckpt.tokenizer.tokenizerConfigJson,
    ckpt.source,
  );
  if (tokenizer.vocabSize > ckpt.config.vocab_size) {
    throw new UserError(
      `${ckpt.source}: the tokenizer${
        given ? ` (--tokenizer ${opts.tokenizer})` : ""
      } has ${tokenizer.vocabSize} tokens but the model's vocab_size is ${ckpt.config.vocab_size}`,
    );
  }
  if (opts.adapter !== undefined) {
    const adapter = await loadAdapter(opts.adapter, ckpt.config);
    ckpt.params = mergeLora(ckpt.params, loraLayout(ckpt.config, adapter.lora), adapter.tensors);
    return { ckpt, tokenizer, dir: path, adapter: opts.adapter };
  }
  return { ckpt, tokenizer, dir: path };
}

/**
 * Transformers' `GenerationConfig` defaults, which apply when a model's
 * `generation_config.json` asks to sample but leaves a setting out.
 */
export const TRANSFORMERS_SAMPLING: Readonly<SamplingOptions> = {
  temperature: 1,
  topK: 50,
  topP: 1,
  repetitionPenalty: 1,
};

/**
 * Sampling settings as Transformers reads `generation_config.json`: without
 * `do_sample: true` (absent, false, or no file at all) decoding is greedy and
 * the file's temperature / top_k / top_p are not used; with it, each setting
 * is the file's, else Transformers' default (`TRANSFORMERS_SAMPLING`).
 * Settings in `given` (the command line, a request) win over both; giving a
 * temperature above 0 samples whatever the file says. Our own checkpoints
 * write `do_sample: true` with their sampling defaults. Throws a `UserError`
 * for an out-of-range setting.
 */
export function resolveSampling(
  generation: LoadedCheckpoint["generation"],
  given: Partial<SamplingOptions> = {},
): SamplingOptions {
  const file = generation.do_sample === true ? generation : {};
  const s: SamplingOptions = {
    temperature: given.temperature ??
      (generation.do_sample === true ? file.temperature ?? TRANSFORMERS_SAMPLING.temperature : 0),
    topK: given.topK ?? file.top_k ?? TRANSFORMERS_SAMPLING.topK,
    topP: given.topP ?? file.top_p ?? TRANSFORMERS_SAMPLING.topP,
    repetitionPenalty: given.repetitionPenalty ?? generation.repetition_penalty ??
      TRANSFORMERS_SAMPLING.repetitionPenalty,
  };
  checkSamplingOptions(s);
  return s;
}

/** Where `resolveSampling`'s defaults came from, in words (for `--verbose` and notes). */
export function samplingSource(ckpt: Pick<LoadedCheckpoint, "generation" | "source">): string {
  const g = ckpt.generation;
  if (g.do_sample === true) {
    return `sampling as ${ckpt.source}'s generation_config.json asks (do_sample: true)`;
  }
  if (g.do_sample === false) {
    return `greedy: ${ckpt.source}'s generation_config.json says do_sample: false`;
  }
  return `greedy: ${ckpt.source} has no generation_config.json saying do_sample: true (Transformers' default)`;
}

/** The reply budget: `given`, else `generation_config.json`'s `max_new_tokens`, else the default. */
export function resolveMaxNewTokens(
  generation: LoadedCheckpoint["generation"],
  given?: number,
): number {
  return given ?? generation.max_new_tokens ?? DEFAULT_MAX_NEW_TOKENS;
}

/**
 * Ids that end a reply: the tokenizer's eos, every eos of the generation
 * config (as Transformers stops on them), and `<|im_end|>` in chat.
 */
export function stopIds(model: GenerationModel, chat: boolean): number[] {
  const ids = new Set(model.ckpt.generation.eosIds ?? [model.ckpt.special.eos]);
  ids.add(model.tokenizer.eosId);
  if (chat) {
    const imEnd = model.tokenizer.tokenToId("<|im_end|>");
    if (imEnd !== undefined) ids.add(imEnd);
  }
  return [...ids];
}

/** The prompt ids of a chat: `messages` rendered with the chat template and the generation prompt. */
export function chatPromptIds(tokenizer: TextTokenizer, messages: ChatMessage[]): number[] {
  return tokenizer.encode(tokenizer.applyChatTemplate(messages, { addGenerationPrompt: true }));
}

/**
 * The prompt ids of a base-model continuation: the tokenizer's bos, then the
 * text's tokens. Bos and eos are the tokenizer's in every command (documents
 * in training and `eval` are `bos, tokens..., eos` with the same ids), as a
 * Transformers tokenizer puts them into text; the model's configs add only
 * stop ids (`stopIds`).
 */
export function textPromptIds(tokenizer: TextTokenizer, text: string): number[] {
  return [tokenizer.bosId, ...tokenizer.encode(text)];
}

/**
 * The conversation's prompt ids with as many of the latest `history` turns as
 * fit `budget` tokens; older turns are dropped first. Undefined when not even
 * the new message alone fits.
 */
export function fitConversation(
  tokenizer: TextTokenizer,
  system: string | undefined,
  history: ChatMessage[][],
  message: string,
  budget: number,
): { ids: number[]; kept: number } | undefined {
  for (let keep = history.length; keep >= 0; keep--) {
    const messages: ChatMessage[] = [];
    if (system) messages.push({ role: "system", content: system });
    for (const turn of history.slice(history.length - keep)) messages.push(...turn);
    messages.push({ role: "user", content: message });
    const ids = chatPromptIds(tokenizer, messages);
    if (ids.length <= budget) return { ids, kept: keep };
  }
  return undefined;
}

/**
 * Streams ids as they come: each id's text once it is whole (a multi-byte
 * character split over tokens is written when its last byte arrives). Stop
 * ids are not written.
 */
export class TokenStreamer {
  #decoder: StreamingDecoder;
  #stop: Set<number>;
  #write: (text: string) => Promise<void> | void;

  /**
   * Decodes with `tokenizer` and hands each piece of text to `write`; ids in
   * `stop` are not written; `opts.skipSpecialTokens` leaves out special tokens.
   */
  constructor(
    tokenizer: TextTokenizer,
    stop: Iterable<number>,
    write: (text: string) => Promise<void> | void,
    opts: { skipSpecialTokens: boolean },
  ) {
    this.#decoder = new StreamingDecoder(tokenizer, opts);
    this.#stop = new Set(stop);
    this.#write = write;
  }

  /** Adds one generated id. */
  async push(id: number): Promise<void> {
    if (this.#stop.has(id)) return;
    const text = this.#decoder.push(id);
    if (text) await this.#write(text);
  }

  /** Writes what is left (an incomplete character as the replacement character). */
  async flush(): Promise<void> {
    const text = this.#decoder.flush();
    if (text) await this.#write(text);
  }
}
