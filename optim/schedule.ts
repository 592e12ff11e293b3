/**
 * The learning-rate schedule: optional linear warmup, then cosine decay from
 * `lr` to `lr * minLrRatio` at the last step (MiniMind's schedule is warmup 0,
 * ratio 0.1; ratio 1 gives a constant rate).
 */

/** Schedule settings. */
export interface Schedule {
  /** Peak learning rate, reached at the end of warmup. */
  lr: number;
  /** Total optimizer steps of the run. */
  steps: number;
  /** Steps of linear warmup from 0 to `lr`; 0 = none. */
  warmupSteps: number;
  /** The floor as a fraction of `lr`. */
  minLrRatio: number;
}

/**
 * The learning rate for optimizer step `step` (1-based, as AdamW counts):
 * `lr * step / warmup` during warmup, then
 * `min + (lr - min) * (1 + cos(pi * progress)) / 2` with progress running from
 * 0 at the first step after warmup to 1 at the last step.
 */
export function cosineWithWarmup(s: Schedule, step: number): number {
  const min = s.lr * s.minLrRatio;
  if (s.warmupSteps > 0 && step <= s.warmupSteps) return (s.lr * step) / s.warmupSteps;
  const decaySteps = s.steps - s.warmupSteps;
  if (decaySteps <= 1) return s.lr;
  const progress = Math.min(1, Math.max(0, (step - s.warmupSteps - 1) / (decaySteps - 1)));
  return min + ((s.lr - min) * (1 + Math.cos(Math.PI * progress))) / 2;
}
