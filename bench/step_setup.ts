/**
 * What the whole-step benchmarks share: their command-line shape (a preset,
 * batch, sequence length and round count), random batches and the AdamW
 * settings they train with.
 *
 * @module
 */
import { parseArgs } from "node:util";
import type { Batch } from "../data/batch.ts";
import type { Gpu } from "../kernels/runtime.ts";
import { type ModelConfig, presetConfig } from "../model/config.ts";
import { TrainingModel, type TrainingModelOptions } from "../model/train_model.ts";
import { AdamW, type AdamWHyperparameters } from "../optim/adamw.ts";
import type { Rng } from "../util/random.ts";

/** The AdamW settings of every step benchmark (the trainer's defaults). */
export const BENCH_ADAMW: AdamWHyperparameters = {
  beta1: 0.9,
  beta2: 0.95,
  eps: 1e-8,
  weightDecay: 0.1,
  gradClip: 1,
};

/** A batch of `B` rows of `T` random ids and targets below `V`, every target counted. */
export function randomBatch(rng: Rng, B: number, T: number, V: number): Batch {
  const N = B * T;
  const ids = new Int32Array(N);
  const targets = new Int32Array(N);
  for (let i = 0; i < N; i++) {
    ids[i] = rng.nextInt(V);
    targets[i] = rng.nextInt(V);
  }
  return { ids, targets, mask: new Float32Array(N).fill(1), B, T };
}

/** The shape a step benchmark runs: from `--preset`, `--batch`, `--seq` and `--rounds`. */
export interface StepShape {
  preset: string;
  config: ModelConfig;
  B: number;
  T: number;
  rounds: number;
  /** Every other string option asked for in `extra`, by name. */
  values: Record<string, string>;
}

/**
 * Parses a step benchmark's command line: `--preset` (default tiny),
 * `--batch` (16), `--seq` (128), `--rounds` (`rounds`) and the string
 * options of `extra` (name -> default).
 */
export function parseStepShape(rounds: number, extra: Record<string, string> = {}): StepShape {
  const options: Record<string, { type: "string"; default: string }> = {
    preset: { type: "string", default: "tiny" },
    batch: { type: "string", default: "16" },
    seq: { type: "string", default: "128" },
    rounds: { type: "string", default: String(rounds) },
  };
  for (const [name, value] of Object.entries(extra)) {
    options[name] = { type: "string", default: value };
  }
  const values = parseArgs({ options }).values as Record<string, string>;
  return {
    preset: values.preset,
    config: presetConfig(values.preset),
    B: Number(values.batch),
    T: Number(values.seq),
    rounds: Number(values.rounds),
    values,
  };
}

/**
 * A training model of `config` for `B` x `T` batches (seed 1, the default
 * initialization; `options` adds to that) and its AdamW optimizer.
 */
export async function stepModel(
  gpu: Gpu,
  config: ModelConfig,
  B: number,
  T: number,
  options: Partial<TrainingModelOptions> = {},
): Promise<{ model: TrainingModel; optimizer: AdamW }> {
  const model = await TrainingModel.create(gpu, config, {
    batchSize: B,
    seqLen: T,
    seed: 1,
    ...options,
  });
  // The optimizer reads as the model does (operands_bench compares the two paths).
  const optimizer = await AdamW.create(gpu, model.trainable(), BENCH_ADAMW, {
    reads: options.reads,
  });
  return { model, optimizer };
}
