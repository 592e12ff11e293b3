/**
 * What every way of talking to a trained model shares (`trainer generate`,
 * `trainer chat`, `trainer serve`): loading a checkpoint with its tokenizer
 * for generation, the sampling settings it asks for, the ids that end a
 * reply, chat prompts that fit the context, and text streamed token by token.
 * Typed options only: the command line lives in `cli/`.
 *
 * @module
 */
import { loadCheckpoint, type LoadedCheckpoint } from "../io/checkpoint.ts";
import { checkSamplingOptions, DEFAULT_SAMPLING, type SamplingOptions } from "../model/sampling.ts";
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
  ckpt: LoadedCheckpoint;
  tokenizer: TextTokenizer;
  /** The directory it was loaded from. */
  dir: string;
  /** The LoRA adapter applied on load, when one was given. */
  adapter?: string;
}

/** Options of `loadGenerationModel`. */
export interface LoadGenerationOptions {
  /**
   * A LoRA adapter directory (PEFT format) trained on this model: its delta
   * `s B A` is added to the adapted weights once, in memory, on load (the
   * files stay as they are; generation then runs at the base model's speed).
   */
  adapter?: string;
}

/**
 * Loads `dir` (a checkpoint or Hugging Face model directory; default
 * `DEFAULT_MODEL_DIR`, with a message that says how to make one when it is
 * missing) with its tokenizer, which must fit the model's vocabulary.
 */
export async function loadGenerationModel(
  dir?: string,
  opts: LoadGenerationOptions = {},
): Promise<GenerationModel> {
  const path = dir ?? DEFAULT_MODEL_DIR;
  if (dir === undefined) {
    try {
      await Deno.stat(path);
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
      throw new UserError(
        `no model at ${DEFAULT_MODEL_DIR} (the default): make one with \`deno task pretrain\` then \`deno task sft\`, or pass --model DIR (a checkpoint or Hugging Face model directory)`,
      );
    }
  }
  const ckpt = await loadCheckpoint(path);
  const tokenizer = TextTokenizer.fromJson(
    ckpt.tokenizer.tokenizerJson,
    ckpt.tokenizer.tokenizerConfigJson,
    ckpt.source,
  );
  if (tokenizer.vocabSize > ckpt.config.vocab_size) {
    throw new UserError(
      `${ckpt.source}: the tokenizer has ${tokenizer.vocabSize} tokens but the model's vocab_size is ${ckpt.config.vocab_size}`,
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
 * Sampling settings: each one from `given`, else `generation_config.json`,
 * else `DEFAULT_SAMPLING`. A config that says `do_sample: false` means greedy
 * decoding, as in Transformers. Throws a `UserError` for an out-of-range one.
 */
export function resolveSampling(
  generation: LoadedCheckpoint["generation"],
  given: Partial<SamplingOptions> = {},
): SamplingOptions {
  const s: SamplingOptions = {
    temperature: given.temperature ??
      (generation.do_sample === false ? 0 : generation.temperature ?? DEFAULT_SAMPLING.temperature),
    topK: given.topK ?? generation.top_k ?? DEFAULT_SAMPLING.topK,
    topP: given.topP ?? generation.top_p ?? DEFAULT_SAMPLING.topP,
    repetitionPenalty: given.repetitionPenalty ?? generation.repetition_penalty ??
      DEFAULT_SAMPLING.repetitionPenalty,
  };
  checkSamplingOptions(s);
  return s;
}

/** The reply budget: `given`, else `generation_config.json`'s `max_new_tokens`, else the default. */
export function resolveMaxNewTokens(
  generation: LoadedCheckpoint["generation"],
  given?: number,
): number {
  return given ?? generation.max_new_tokens ?? DEFAULT_MAX_NEW_TOKENS;
}

/** Ids that end a reply: every eos of the generation config, and `<|im_end|>` in chat. */
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

/** The prompt ids of a base-model continuation: bos, then the text's tokens. */
export function textPromptIds(tokenizer: TextTokenizer, bos: number, text: string): number[] {
  return [bos, ...tokenizer.encode(text)];
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
