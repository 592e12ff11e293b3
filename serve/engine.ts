/**
 * The model behind `trainer serve`: one GPU inference model with its KV cache
 * and the tokenizer, turning a checked request into a reply.
 *
 * Prompts are rendered exactly as `trainer generate` renders them (the same
 * functions of infer/session.ts): a chat is the messages in the chat
 * template plus the generation prompt, a plain completion is bos + the text.
 * A reply ends at the same stop ids (every eos of generation_config.json and
 * `<|im_end|>` in chat), at a stop string, after the token budget, or when the
 * client goes away. Text is decoded as it is generated with special tokens
 * dropped (as `trainer chat` shows replies), whole UTF-8 characters only.
 *
 * One request generates at a time: `InferenceModel` is a batch-1 model with
 * one cache, and a prefill clears it, so two interleaved requests would
 * overwrite each other's keys and values. The server's queue serializes
 * requests; `run` refuses to be entered twice as a second guard.
 *
 * Every import of the model layer is in this file, so the server follows the
 * model code wherever it moves.
 *
 * @module
 */
import type { Gpu } from "../kernels/runtime.ts";
import { InferenceModel } from "../model/inference.ts";
import { generate } from "../model/generate.ts";
import { checkSamplingOptions, type SamplingOptions } from "../model/sampling.ts";
import { type ChatMessage, StreamingDecoder } from "../data/tokenizer.ts";
import { chatPromptIds, type GenerationModel, stopIds, textPromptIds } from "../infer/session.ts";
import { Rng } from "../util/random.ts";
import type { FinishReason, GenerationParams } from "./openai.ts";
import { StopStringFilter } from "./stop.ts";

/** Settings of a `ServeEngine`. */
export interface EngineOptions {
  /** Positions the KV cache holds: prompt + reply (at most `max_position_embeddings`). */
  capacity: number;
  /** Reply budget of a request that sets none. */
  maxTokens: number;
  /** Sampling of a request that sets none (a request may override each field). */
  sampling: SamplingOptions;
}

/** A request ready to run: prompt ids and settings resolved against the defaults. */
export interface Job {
  /** The prompt's token ids. */
  prompt: number[];
  /** Chat replies also end at `<|im_end|>`. */
  chat: boolean;
  /** Most tokens to generate: the request's or the default, capped by the cache's room. */
  maxTokens: number;
  /** The request's sampling fields over the defaults. */
  sampling: SamplingOptions;
  /** uint32 seed of the sampling draws (the request's, else random). */
  seed: number;
  /** Stop strings: the reply ends before the first one that appears. */
  stop: string[];
}

/** What `ServeEngine.run` returns. */
export interface RunResult {
  /** The reply (without a stop string or what followed it). */
  text: string;
  /** `stop`: a stop id or string ended it (or it was cancelled); `length`: the token budget or a full cache. */
  finish: FinishReason;
  /** Tokens in the prompt. */
  promptTokens: number;
  /** Tokens generated, a stop id included (they were computed and count as the reply's). */
  completionTokens: number;
  /** True when the signal aborted generation: `text` is then what came before. */
  cancelled: boolean;
  /** Wall time from the request's start to its last token. */
  elapsedMs: number;
  /** Decode speed: tokens after the first per second (0 with fewer than 2 tokens). */
  tokensPerSecond: number;
}

/** Thrown by `Job` planning when the prompt leaves no room to generate. */
export class ContextOverflowError extends Error {
  /** Tokens of the prompt. */
  readonly promptTokens: number;
  /** Positions of the cache. */
  readonly capacity: number;
  /** The prompt of `promptTokens` leaves no room in `capacity` positions. */
  constructor(promptTokens: number, capacity: number) {
    super(
      `the prompt is ${promptTokens} tokens; this server's context holds ${capacity} (prompt + reply), which leaves no room for a reply: shorten the messages`,
    );
    this.name = "ContextOverflowError";
    this.promptTokens = promptTokens;
    this.capacity = capacity;
  }
}

/** Ends `generate` from inside its `onToken` (a stop string, or the client left). */
class Halt extends Error {
  constructor(readonly why: "stop" | "cancelled") {
    super(why);
  }
}

/** A uint32 seed from any safe integer (OpenAI's `seed` is 64-bit; two's complement below 2^32). */
function seed32(seed: number): number {
  return ((seed % 4294967296) + 4294967296) % 4294967296;
}

/**
 * The served model: renders prompts, plans requests against the context,
 * and runs them one at a time on the GPU.
 */
export class ServeEngine {
  /** Positions the KV cache holds. */
  readonly capacity: number;
  /** Defaults of requests. */
  readonly defaults: Readonly<EngineOptions>;
  readonly #loaded: GenerationModel;
  readonly #model: InferenceModel;
  #running = false;

  private constructor(loaded: GenerationModel, model: InferenceModel, opts: EngineOptions) {
    this.#loaded = loaded;
    this.#model = model;
    this.capacity = model.capacity;
    this.defaults = { ...opts, sampling: { ...opts.sampling } };
  }

  /** Uploads the model to `gpu` with a cache of `opts.capacity` positions. */
  static async create(
    gpu: Gpu,
    loaded: GenerationModel,
    opts: EngineOptions,
  ): Promise<ServeEngine> {
    checkSamplingOptions(opts.sampling);
    const model = await InferenceModel.create(gpu, loaded.ckpt.config, loaded.ckpt.params, {
      capacity: opts.capacity,
    });
    return new ServeEngine(loaded, model, opts);
  }

  /** Whether the tokenizer has a chat template (chat completions need one). */
  get hasChatTemplate(): boolean {
    return this.#loaded.tokenizer.hasChatTemplate;
  }

  /** The prompt ids of a conversation, as `generate --chat` renders one. */
  chatPrompt(messages: ChatMessage[]): number[] {
    return chatPromptIds(this.#loaded.tokenizer, messages);
  }

  /** The prompt ids of a plain continuation: bos + the text, as `generate` does. */
  textPrompt(text: string): number[] {
    return textPromptIds(this.#loaded.tokenizer, text);
  }

  /**
   * Resolves a request's settings against the defaults. The reply budget is
   * capped by the room the prompt leaves; a prompt that leaves none throws
   * `ContextOverflowError`.
   */
  plan(prompt: number[], params: GenerationParams, chat: boolean): Job {
    const room = this.capacity - prompt.length;
    if (room < 1) throw new ContextOverflowError(prompt.length, this.capacity);
    const d = this.defaults.sampling;
    const sampling: SamplingOptions = {
      temperature: params.temperature ?? d.temperature,
      topK: params.topK ?? d.topK,
      topP: params.topP ?? d.topP,
      repetitionPenalty: params.repetitionPenalty ?? d.repetitionPenalty,
    };
    checkSamplingOptions(sampling);
    return {
      prompt,
      chat,
      maxTokens: Math.min(params.maxTokens ?? this.defaults.maxTokens, room),
      sampling,
      seed: params.seed !== undefined
        ? seed32(params.seed)
        : crypto.getRandomValues(new Uint32Array(1))[0],
      stop: params.stop,
    };
  }

  /**
   * Generates the reply of `job`, calling `onText` with each piece of text as
   * it becomes final. Resolves (never rejects) when `signal` aborts, with
   * `cancelled` set, within one token of the abort (at most one greedy batch
   * of GPU steps, see `generate`'s `gpuGreedySteps`).
   */
  async run(
    job: Job,
    opts: { signal?: AbortSignal; onText?: (text: string) => void } = {},
  ): Promise<RunResult> {
    if (this.#running) {
      throw new Error("ServeEngine.run: a request is already generating on this KV cache");
    }
    this.#running = true;
    try {
      return await this.#run(job, opts);
    } finally {
      this.#running = false;
    }
  }

  async #run(
    job: Job,
    opts: { signal?: AbortSignal; onText?: (text: string) => void },
  ): Promise<RunResult> {
    const t0 = performance.now();
    const { tokenizer } = this.#loaded;
    const stops = stopIds(this.#loaded, job.chat);
    const stopSet = new Set(stops);
    const decoder = new StreamingDecoder(tokenizer, { skipSpecialTokens: true });
    const filter = new StopStringFilter(job.stop);
    let text = "";
    let generated = 0;
    let firstAt = 0;
    let lastAt = 0;
    const emit = (piece: string) => {
      if (!piece) return;
      text += piece;
      opts.onText?.(piece);
    };
    const result = (finish: FinishReason, cancelled: boolean): RunResult => ({
      text,
      finish,
      promptTokens: job.prompt.length,
      completionTokens: generated,
      cancelled,
      elapsedMs: lastAt > 0 ? lastAt - t0 : performance.now() - t0,
      tokensPerSecond: generated > 1 ? (generated - 1) / ((lastAt - firstAt) / 1000) : 0,
    });
    if (opts.signal?.aborted) return result("stop", true);
    try {
      const r = await generate(this.#model, job.prompt, {
        maxNewTokens: job.maxTokens,
        sampling: job.sampling,
        rng: new Rng(job.seed),
        stopIds: stops,
        onToken: (id) => {
          lastAt = performance.now();
          if (generated++ === 0) firstAt = lastAt;
          if (opts.signal?.aborted) throw new Halt("cancelled");
          if (stopSet.has(id)) return;
          const piece = filter.push(decoder.push(id));
          emit(piece.text);
          if (piece.stopped) throw new Halt("stop");
        },
      });
      emit(filter.push(decoder.flush()).text);
      emit(filter.flush());
      // "capacity" (the cache is full) is a length limit to the client.
      return result(r.finish === "stop" || filter.stopped ? "stop" : "length", false);
    } catch (e) {
      if (!(e instanceof Halt)) throw e;
      return result("stop", e.why === "cancelled");
    }
  }

  /** Releases the model's GPU buffers. */
  destroy(): void {
    this.#model.destroy();
  }
}
