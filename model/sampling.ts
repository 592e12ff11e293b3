/**
 * Choosing the next token from a row of logits, as Hugging Face Transformers'
 * `generate` does, in its order: the repetition penalty (a logits processor),
 * then temperature, top-k and top-p (the warpers), then a draw.
 *
 * - Repetition penalty r (CTRL, Keskar et al. 2019; HF
 *   `RepetitionPenaltyLogitsProcessor`): for every distinct token already in
 *   the context, a logit z becomes z / r when z > 0 and z * r otherwise, so
 *   r > 1 always makes a seen token less likely.
 * - Temperature T: z / T. T = 0 means greedy: the argmax (the lowest id on a
 *   tie), with no random draw, so the result does not depend on the seed.
 * - Top-k: keep the k highest logits (ties at the k-th value broken by id).
 * - Top-p (nucleus): sort the kept tokens by probability, keep the shortest
 *   prefix whose probability mass reaches p (at least one token).
 * - The draw: one uniform u from `Rng.nextFloat()` against the cumulative
 *   renormalized probabilities in that sorted order; float64 throughout, so
 *   the same seed gives the same tokens everywhere.
 *
 * @module
 */
import type { Rng } from "../util/random.ts";
import { UserError } from "../util/errors.ts";

/** How the next token is chosen. */
export interface SamplingOptions {
  /** 0 = greedy (argmax); otherwise logits are divided by it. */
  temperature: number;
  /** Keep only the k most likely tokens (0 = off). */
  topK: number;
  /** Keep the smallest set of most likely tokens with mass >= topP (1 = off). */
  topP: number;
  /** HF repetition penalty for tokens already in the context (1 = off). */
  repetitionPenalty: number;
}

/** Greedy decoding: temperature 0, no truncation, no penalty. */
export const GREEDY: Readonly<SamplingOptions> = {
  temperature: 0,
  topK: 0,
  topP: 1,
  repetitionPenalty: 1,
};

/**
 * Sampling defaults when neither the caller nor the model's
 * `generation_config.json` sets them (our checkpoints record these, so
 * Transformers samples the same way).
 */
export const DEFAULT_SAMPLING: Readonly<SamplingOptions> = {
  temperature: 0.7,
  topK: 0,
  topP: 0.9,
  repetitionPenalty: 1,
};

/** Throws a `UserError` naming the first out-of-range setting. */
export function checkSamplingOptions(o: SamplingOptions): void {
  if (!(Number.isFinite(o.temperature) && o.temperature >= 0)) {
    throw new UserError(`temperature must be >= 0 (0 = greedy), got ${o.temperature}`);
  }
  if (!(Number.isInteger(o.topK) && o.topK >= 0)) {
    throw new UserError(`top-k must be a whole number >= 0 (0 = off), got ${o.topK}`);
  }
  if (!(o.topP > 0 && o.topP <= 1)) {
    throw new UserError(`top-p must be in (0, 1] (1 = off), got ${o.topP}`);
  }
  if (!(Number.isFinite(o.repetitionPenalty) && o.repetitionPenalty > 0)) {
    throw new UserError(
      `repetition penalty must be > 0 (1 = off), got ${o.repetitionPenalty}`,
    );
  }
}

/**
 * The HF repetition penalty, in place: each distinct token of `context`
 * has its logit divided by `penalty` when positive, multiplied when not.
 */
export function applyRepetitionPenalty(
  logits: Float32Array | Float64Array,
  context: ArrayLike<number>,
  penalty: number,
): void {
  if (penalty === 1) return;
  const seen = new Set<number>();
  for (let i = 0; i < context.length; i++) {
    const id = context[i];
    if (seen.has(id) || id < 0 || id >= logits.length) continue;
    seen.add(id);
    const z = logits[id];
    logits[id] = z > 0 ? z / penalty : z * penalty;
  }
}

/** The index of the largest value (the lowest index on a tie). NaN never wins. */
export function argmax(values: ArrayLike<number>): number {
  let best = 0;
  let bestValue = -Infinity;
  for (let i = 0; i < values.length; i++) {
    if (values[i] > bestValue) {
      bestValue = values[i];
      best = i;
    }
  }
  return best;
}

/**
 * The distribution the draw is made from, after penalty, temperature, top-k
 * and top-p (not for temperature 0, which is the argmax): token ids by
 * decreasing probability and their renormalized probabilities (float64).
 */
export function samplingDistribution(
  logits: ArrayLike<number>,
  opts: SamplingOptions,
  context: ArrayLike<number> = [],
): { ids: number[]; probs: Float64Array } {
  checkSamplingOptions(opts);
  if (opts.temperature === 0) {
    throw new RangeError("samplingDistribution: temperature 0 is greedy (argmax), not a draw");
  }
  const z = Float64Array.from(logits);
  applyRepetitionPenalty(z, context, opts.repetitionPenalty);
  for (let i = 0; i < z.length; i++) z[i] /= opts.temperature;
  // Descending by logit, ascending id on ties: a total order, so top-k and
  // top-p are deterministic.
  const order = Array.from({ length: z.length }, (_, i) => i).filter((i) => !Number.isNaN(z[i]));
  order.sort((a, b) => z[b] - z[a] || a - b);
  let kept = opts.topK > 0 ? order.slice(0, opts.topK) : order;
  // Softmax over the kept tokens (a softmax over all, renormalized, is the same).
  const max = z[kept[0]];
  let probs = new Float64Array(kept.length);
  let sum = 0;
  for (let i = 0; i < kept.length; i++) sum += probs[i] = Math.exp(z[kept[i]] - max);
  for (let i = 0; i < probs.length; i++) probs[i] /= sum;
  if (opts.topP < 1) {
    // The shortest prefix whose mass reaches topP: token i stays when the mass
    // before it is still below topP (HF removes tokens whose ascending
    // cumulative mass is <= 1 - topP, the same set).
    let mass = 0;
    let n = 0;
    while (n < probs.length && mass < opts.topP) mass += probs[n++];
    n = Math.max(1, n);
    kept = kept.slice(0, n);
    probs = probs.slice(0, n);
    let s = 0;
    for (const p of probs) s += p;
    for (let i = 0; i < n; i++) probs[i] /= s;
  }
  return { ids: kept, probs };
}

/**
 * The next token: the argmax at temperature 0 (after the repetition penalty),
 * else a draw from `samplingDistribution` with one `rng.nextFloat()`.
 */
export function sampleToken(
  logits: ArrayLike<number>,
  opts: SamplingOptions,
  rng: Rng,
  context: ArrayLike<number> = [],
): number {
  if (opts.temperature === 0) {
    checkSamplingOptions(opts);
    if (opts.repetitionPenalty === 1) return argmax(logits);
    const z = Float64Array.from(logits);
    applyRepetitionPenalty(z, context, opts.repetitionPenalty);
    return argmax(z);
  }
  const { ids, probs } = samplingDistribution(logits, opts, context);
  const u = rng.nextFloat();
  let c = 0;
  for (let i = 0; i < ids.length; i++) {
    c += probs[i];
    if (u < c) return ids[i];
  }
  return ids[ids.length - 1]; // u within rounding of 1
}
