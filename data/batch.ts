/**
 * The one batch type: `[B, T]` inputs, next-token targets and the loss mask,
 * and the one place where a token row becomes a training row (the next-token
 * shift). The training stream, `eval` and the experiment all build batches
 * here; the models and the reference take them.
 *
 * @module
 */

/** One batch. Row b, position t is at index `b * T + t`. */
export interface Batch {
  /** `[B, T]` input token ids. */
  ids: Int32Array;
  /** `[B, T]` target ids: the input sequence shifted left by one. */
  targets: Int32Array;
  /** `[B, T]` loss weight per target: 1 trained, 0 not (all 1 for pretrain). */
  mask: Float32Array;
  /** Rows. */
  B: number;
  /** Tokens per row. */
  T: number;
}

/** A token sequence to put in a row: ids, and optionally a per-token mask and a length. */
export interface RowTokens {
  /** Tokens; only the first `length` (default all) count, at most T + 1 of them. */
  ids: ArrayLike<number>;
  /** Per-token training flag (non-zero = trained), aligned with `ids`; default all trained. */
  mask?: ArrayLike<number>;
  /** Tokens of `ids` that are real (the rest is padding); default `ids.length`. */
  length?: number;
}

/** A `[B, T]` batch of padding: ids and targets `padId`, mask 0 everywhere. */
export function emptyBatch(B: number, T: number, padId: number): Batch {
  if (!Number.isInteger(B) || B < 1 || !Number.isInteger(T) || T < 1) {
    throw new RangeError(`emptyBatch: B = ${B} and T = ${T} must be positive integers`);
  }
  return {
    ids: new Int32Array(B * T).fill(padId),
    targets: new Int32Array(B * T).fill(padId),
    mask: new Float32Array(B * T),
    B,
    T,
  };
}

/**
 * Writes `row` into row `b` of `batch` with the next-token shift: with n the
 * real tokens (at most T + 1), position t < T takes input `ids[t]` (padding
 * past n), target `ids[t + 1]` and weight `mask[t + 1]` (1 without a mask)
 * while t + 1 < n; targets past the sequence are padding at weight 0.
 *
 * @example
 * ```ts
 * import { emptyBatch, setRow } from "./batch.ts";
 * const batch = emptyBatch(1, 4, 0);
 * setRow(batch, 0, { ids: [7, 8, 9] }, 0);
 * // inputs 7 8 9 0, targets 8 9 0 0, mask 1 1 0 0
 * if (batch.targets.join() !== "8,9,0,0" || batch.mask.join() !== "1,1,0,0") throw new Error();
 * ```
 */
export function setRow(batch: Batch, b: number, row: RowTokens, padId: number): void {
  const T = batch.T;
  const n = Math.min(row.length ?? row.ids.length, T + 1);
  const o = b * T;
  for (let t = 0; t < T; t++) {
    const hasTarget = t + 1 < n;
    batch.ids[o + t] = t < n ? row.ids[t] : padId;
    batch.targets[o + t] = hasTarget ? row.ids[t + 1] : padId;
    batch.mask[o + t] = hasTarget ? (row.mask ? (row.mask[t + 1] ? 1 : 0) : 1) : 0;
  }
}
