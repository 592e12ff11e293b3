/**
 * The generation loop over an `InferenceModel`: the prompt in one prefill,
 * then one token per decode step, chosen by `sampleToken` (or several greedy
 * steps per submit on the GPU), until a stop id, the token budget or a full
 * cache.
 *
 * @module
 */
import type { InferenceModel } from "./inference.ts";
import { sampleToken, type SamplingOptions } from "./sampling.ts";
import { Rng } from "../util/random.ts";

/** Options of `generate`. */
export interface GenerateOptions {
  /** Most tokens to generate. */
  maxNewTokens: number;
  /** How each token is chosen: temperature, top-k, top-p, repetition penalty. */
  sampling: SamplingOptions;
  /** The random draws (unused at temperature 0). */
  rng?: Rng;
  /** Generation ends after any of these ids (it is included in `ids`). */
  stopIds?: number[];
  /** Called with each new id as soon as it is chosen (for streaming). */
  onToken?: (id: number) => void | Promise<void>;
  /**
   * Greedy decoding without a repetition penalty chooses tokens on the GPU,
   * `gpuGreedySteps` per submit (default 16; 0 = one readback of the logits
   * per token, as sampling does). Same tokens either way.
   */
  gpuGreedySteps?: number;
}

/** What `generate` returns. */
export interface GenerateResult {
  /** The generated ids (the stop id included when one ended generation). */
  ids: number[];
  /**
   * "stop": a stop id came; "length": maxNewTokens reached; "capacity": prompt
   * and generated tokens fill the cache.
   */
  finish: "stop" | "length" | "capacity";
  /** Number of prompt tokens prefilled. */
  promptTokens: number;
  /** Wall time of the prefill in milliseconds, until its logits are read. */
  prefillMs: number;
  /** Wall time of the decode steps (every token after the first). */
  decodeMs: number;
  /** Decode steps per second (0 when no step ran). */
  tokensPerSecond: number;
}

/**
 * Generates from `prompt` (ids; the model is prefilled with them): the first
 * token from the prefill's logits, each next one from a decode step. The
 * repetition penalty sees the prompt and everything generated. Stops at a
 * stop id, after `maxNewTokens`, or when the cache is full.
 */
export async function generate(
  model: InferenceModel,
  prompt: ArrayLike<number>,
  opts: GenerateOptions,
): Promise<GenerateResult> {
  const rng = opts.rng ?? new Rng(0);
  const stop = new Set(opts.stopIds ?? []);
  const context = Array.from(prompt);
  const ids: number[] = [];
  const t0 = performance.now();
  let logits = await model.prefill(prompt);
  const prefillMs = performance.now() - t0;
  let finish: GenerateResult["finish"] = "length";
  let steps = 0;
  const t1 = performance.now();
  const o = opts.sampling;
  const chunk = o.temperature === 0 && o.repetitionPenalty === 1
    ? Math.max(0, Math.floor(opts.gpuGreedySteps ?? 16))
    : 0;
  // Returns true when generation must end after `id`.
  const accept = async (id: number): Promise<boolean> => {
    ids.push(id);
    context.push(id);
    await opts.onToken?.(id);
    if (stop.has(id)) {
      finish = "stop";
      return true;
    }
    if (ids.length >= opts.maxNewTokens) return true;
    // The sequence (prompt + generated) may fill the cache but not pass it.
    if (prompt.length + ids.length >= model.capacity) {
      finish = "capacity";
      return true;
    }
    return false;
  };
  let next = sampleToken(logits, o, rng, context);
  while (!(await accept(next))) {
    if (chunk > 0) {
      // Several greedy steps per submit; tokens after a stop are discarded.
      // The first chunks are short so that streaming starts promptly.
      const n = Math.min(
        Math.min(chunk, 2 ** (steps === 0 ? 1 : Math.ceil(Math.log2(steps + 1)))),
        opts.maxNewTokens - ids.length,
        model.capacity - 1 - model.length,
      );
      const got = await model.decodeGreedy(next, n);
      steps += n;
      for (let i = 0; i < got.length - 1; i++) {
        if (await accept(got[i])) {
          return result(performance.now() - t1);
        }
      }
      next = got[got.length - 1];
      continue;
    }
    logits = await model.decode(next);
    steps++;
    next = sampleToken(logits, o, rng, context);
  }
  return result(performance.now() - t1);

  function result(elapsedMs: number): GenerateResult {
    const decodeMs = steps > 0 ? elapsedMs : 0;
    return {
      ids,
      finish,
      promptTokens: prompt.length,
      prefillMs,
      decodeMs,
      tokensPerSecond: steps > 0 ? steps / (decodeMs / 1000) : 0,
    };
  }
}
