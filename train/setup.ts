/**
 * A training run's setup, done once before the loop: where it starts (resume,
 * `init` weights, or a fresh model), the tokenizer, the model shape, the run's
 * settings (a resume keeps the saved ones), the data and held-out streams, and
 * the output directory. Every check that can fail fails here, before anything
 * is written. Options are typed values: flags are parsed in `cli/`, and the
 * experiment builds these options directly.
 *
 * @module
 */
import { dirname, join } from "node:path";
import type { Gpu } from "../kernels/runtime.ts";
import {
  MODEL_CONFIG_FIELDS,
  type ModelConfig,
  presetConfig,
  PRESETS,
  validateConfig,
} from "../model/config.ts";
import { initParameters } from "../model/params.ts";
import { checkDeviceLimits } from "../model/plan.ts";
import { loadCheckpoint, resolveCheckpointDir } from "../io/checkpoint.ts";
import { readModelConfigFile, requestedShape } from "../io/model_config.ts";
import { loadModel } from "../io/model_files.ts";
import { CORPUS_FILES, defaultTokenizer, writeEmbeddedCorpus } from "../data/corpus.ts";
import { PREFERENCE_FILES, writePreferenceSet } from "../data/preferences.ts";
import { DataStream, type DataStreamOptions } from "../data/stream.ts";
import type { Packing } from "../data/pretrain.ts";
import {
  augmentationActive,
  augmentationKey,
  checkAugmentation,
  NO_AUGMENTATION,
  readSystemPrompts,
  type SftAugmentation,
} from "../data/sft_augment.ts";
import { TextTokenizer } from "../data/tokenizer.ts";
import { UsageError, UserError } from "../util/errors.ts";
import type { RunConfig, RunStart, TrainerState } from "./loop.ts";
import { peakFlopsFor } from "./peak.ts";
import type { LoraConfig } from "../model/lora.ts";
import { LORA_RUN_DEFAULTS, type LoraRun, loraStartingPoint } from "./lora.ts";
import { exists } from "../util/fs.ts";

/**
 * What a run trains on: plain text, conversations with the assistant-only
 * mask, or preference pairs (DPO against a frozen copy of the starting model).
 */
export type TrainKind = "pretrain" | "sft" | "dpo";

/** Defaults per kind. MiniMind: AdamW 0.9/0.999, eps 1e-8, cosine to 0.1 x lr, clip 1.0. */
export const TRAIN_DEFAULTS = {
  pretrain: { lr: 5e-4, out: "out/pretrain", steps: 500, batchSize: 16, seqLen: 128 },
  sft: { lr: 2e-4, out: "out/sft", steps: 200, batchSize: 16, seqLen: 128 },
  /**
   * batchSize counts pairs (2 rows each). MiniMind's DPO rate, 4e-8, is for
   * its 100M-token preference set on a large model; the embedded set and the
   * tiny model need a larger one to move in a few minutes (docs/guide.md).
   */
  dpo: { lr: 5e-5, out: "out/dpo", steps: 100, batchSize: 8, seqLen: 80 },
  /** DPO's β (MiniMind's default until 2026-03; its current script uses 0.15). */
  beta: 0.1,
  minLrRatio: 0.1,
  warmupSteps: 0,
  weightDecay: 0.01,
  beta1: 0.9,
  beta2: 0.999,
  adamEps: 1e-8,
  gradClip: 1.0,
  accum: 1,
  seed: 42,
  shuffleBuffer: 1000,
  /** Tokenizer worker threads when training reads JSONL (0: tokenize on the main thread). */
  dataWorkers: 1,
  logEvery: 10,
} as const;

/**
 * Peak learning rates for a model of the `tiny` preset's shape (the embedded
 * default), in place of the MiniMind-scale rates that `TRAIN_DEFAULTS` keeps
 * for every other model. A 0.6M-parameter model takes larger steps: at 5e-4
 * its 500 default pretraining steps left the embedded corpus's facts half
 * learnt (loss 1.04 with the earlier 16-byte tokenizer), at 2e-3 they came
 * near the floor that the corpus's random phrasing sets (0.55 with that
 * tokenizer; 0.42 with today's); docs/guide.md section 5 has the
 * measurements behind both rates.
 */
export const TINY_LR = { pretrain: 2e-3, sft: 5e-4 } as const;

/** Whether `config` has the `tiny` preset's shape (width, depth, heads, MLP, vocabulary). */
export function isTinyShape(config: ModelConfig): boolean {
  const t = PRESETS.tiny;
  return config.hidden_size === t.hidden_size &&
    config.num_hidden_layers === t.num_hidden_layers &&
    config.num_attention_heads === t.num_attention_heads &&
    config.num_key_value_heads === t.num_key_value_heads &&
    config.intermediate_size === t.intermediate_size &&
    config.vocab_size === t.vocab_size;
}

/** The default peak learning rate of a `kind` run of `model` (without LoRA). */
export function defaultLr(kind: TrainKind, model: ModelConfig): number {
  if (kind !== "dpo" && isTinyShape(model)) return TINY_LR[kind];
  return TRAIN_DEFAULTS[kind].lr;
}

/**
 * A run as asked for. Every field but `kind` is optional: absent means the
 * default, or on `resume` the value the run was saved with.
 */
export interface TrainOptions {
  /** Which training: `pretrain`, `sft` or `dpo`. */
  kind: TrainKind;
  /** Checkpoint directory (default per kind: out/pretrain, out/sft). */
  out?: string;
  /** Continue the run in `out` from its last checkpoint. */
  resume?: boolean;
  /**
   * Start from this checkpoint's weights (fresh optimizer, step 0); `null`
   * means random weights. Absent: random for pretrain, `out/pretrain` for sft.
   */
  init?: string | null;
  /** Hugging Face tokenizer directory (default: the embedded one, or the init checkpoint's). */
  tokenizer?: string;
  /** Model shape by preset name (default `tiny`), or ... */
  preset?: string;
  /** ... from a JSON/JSONC file of Hugging Face config fields (+ qk_norm). */
  modelConfig?: string;
  /** Training data paths (default: the embedded corpus, written beside `out`). */
  data?: string[];
  /** Held-out data evaluated during the run. */
  evalData?: string[];
  /** Samples held for shuffling (default 1000; 0 keeps file order). */
  shuffleBuffer?: number;
  /** Count and skip data lines that are not valid records instead of failing. */
  skipBadLines?: boolean;
  /** JSONL: tokenizer worker threads reading ahead (default 1; 0 = on the main thread). */
  dataWorkers?: number;
  /** Pretrain: `pack` documents into full windows (default) or `pad` each to its own row (MiniMind's). */
  packing?: Packing;
  /** SFT: share of conversations without system message and tools that get a system prompt (default 0). */
  sftSystemRatio?: number;
  /** SFT: a file of system prompts for `sftSystemRatio` (default MiniMind's ten). */
  sftSystemPrompts?: string;
  /** SFT: share of samples that keep their empty think blocks (default 1: all). */
  sftEmptyThinkKeep?: number;
  /** Optimizer steps; or ... */
  steps?: number;
  /** ... passes over the data (the data is counted once first). */
  epochs?: number;
  /** Rows per micro-batch on each rank (default per kind; DPO: pairs). */
  batchSize?: number;
  /** Tokens per row (default per kind). */
  seqLen?: number;
  /** Micro-batches accumulated per optimizer step (default 1). */
  accum?: number;
  /** Peak learning rate (default per kind). */
  lr?: number;
  /** Final learning rate as a share of `lr` (default 0.1). */
  minLrRatio?: number;
  /** Steps of linear warmup (default 0). */
  warmupSteps?: number;
  /** AdamW's decoupled weight decay (default 0.01). */
  weightDecay?: number;
  /** AdamW's first-moment decay rate (default 0.9). */
  beta1?: number;
  /** AdamW's second-moment decay rate (default 0.999). */
  beta2?: number;
  /** AdamW's epsilon (default 1e-8). */
  adamEps?: number;
  /** Gradient global-norm clipping threshold (default 1; 0 = off). */
  gradClip?: number;
  /** Random seed (default 42). */
  seed?: number;
  /** Log every this many steps (default 10). */
  logEvery?: number;
  /** Evaluate every this many steps (default: a quarter of the steps). */
  evalEvery?: number;
  /** Save a checkpoint every this many steps (default: a quarter of the steps). */
  saveEvery?: number;
  /** The adapter's FP32 peak in TFLOP/s, for MFU (default: known GPUs are recognised). */
  peakTflops?: number;
  /**
   * Train low-rank adapters on the frozen `init` checkpoint (default out/sft)
   * instead of every weight; the fields given (others default, or on resume
   * must match the saved run). Output: a PEFT adapter directory (default out/lora).
   */
  lora?: Partial<LoraConfig>;
  /** DPO: β, the strength of the pull toward the reference (default 0.1). */
  beta?: number;
}

/**
 * The run's packing and SFT augmentation: the given flags, else (on resume)
 * the saved run's, else the defaults (pack; no augmentation).
 */
async function dataShaping(
  opts: TrainOptions,
  saved: RunConfig | undefined,
): Promise<{ packing: Packing; sftAugment: SftAugmentation }> {
  if (opts.kind === "sft" && opts.packing !== undefined) {
    throw new UsageError("--packing applies to pretraining; SFT pads each conversation to its row");
  }
  const sftFlags = opts.sftSystemRatio !== undefined || opts.sftSystemPrompts !== undefined ||
    opts.sftEmptyThinkKeep !== undefined;
  if (opts.kind === "pretrain" && sftFlags) {
    throw new UsageError(
      "--sft-system-ratio, --sft-system-prompts and --sft-empty-think-keep apply to sft",
    );
  }
  const packing = opts.packing ?? saved?.packing ?? "pack";
  const was = saved?.sftAugment ?? NO_AUGMENTATION;
  const sftAugment: SftAugmentation = {
    systemRatio: opts.sftSystemRatio ?? was.systemRatio,
    systemPrompts: opts.sftSystemPrompts !== undefined
      ? await readSystemPrompts(opts.sftSystemPrompts)
      : was.systemPrompts,
    emptyThinkKeep: opts.sftEmptyThinkKeep ?? was.emptyThinkKeep,
  };
  try {
    checkAugmentation(sftAugment);
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  if (opts.sftSystemPrompts !== undefined && sftAugment.systemRatio === 0) {
    throw new UsageError("--sft-system-prompts needs --sft-system-ratio R (R > 0) to be used");
  }
  return { packing, sftAugment };
}

/** A run ready for `trainLoop`. */
export interface PreparedRun {
  /** The run's settings, resolved from the options, the saved run and the defaults. */
  run: RunConfig;
  /** Where the run starts: weights, optimizer state and counters. */
  start: RunStart;
  /** The tokenizer the data is encoded with and the checkpoints carry. */
  tokenizer: TextTokenizer;
  /** The training stream, positioned where the run continues. */
  train: DataStream;
  /** Opens a fresh pass over the held-out data, or undefined when there is none. */
  openEval?: () => Promise<DataStream>;
  /** FP32 peak of the adapter in FLOP/s, when known (for MFU). */
  peakFlops?: number;
  /** Whether this continues a saved run. */
  resumed: boolean;
}

/**
 * The model `preset` or `modelConfig` asks for (default `tiny`), with
 * `vocab_size` following the tokenizer unless the file sets it, in which case
 * the two must agree.
 */
async function requestedModel(opts: TrainOptions, vocabSize: number): Promise<ModelConfig> {
  const file = opts.modelConfig;
  const { config, setsVocab } = file
    ? await readModelConfigFile(file)
    : { config: presetConfig(opts.preset ?? "tiny"), setsVocab: false };
  if (setsVocab && config.vocab_size !== vocabSize) {
    throw new UserError(
      `vocab_size ${config.vocab_size} in ${file} does not match the tokenizer's ${vocabSize} tokens; remove vocab_size from the config to follow the tokenizer`,
    );
  }
  config.vocab_size = vocabSize;
  validateConfig(config);
  return config;
}

/**
 * With `resume` or `init` the model comes from the checkpoint; a `preset` /
 * `modelConfig` given too must describe the same model, or the run is refused
 * naming the first field that differs.
 */
async function checkSameModel(opts: TrainOptions, have: ModelConfig, where: string): Promise<void> {
  if (opts.preset === undefined && opts.modelConfig === undefined) return;
  const asked = await requestedModel(opts, have.vocab_size);
  for (const field of MODEL_CONFIG_FIELDS) {
    if (asked[field] !== have[field]) {
      const flag = opts.preset !== undefined ? "--preset" : "--model-config";
      throw new UserError(
        `${flag} asks for ${field} = ${asked[field]}, but ${where} has ${field} = ${
          have[field]
        }; drop ${flag} to use the checkpoint's model`,
      );
    }
  }
}

/** Where the run starts: a resumed checkpoint, `init` weights, or fresh ones. */
async function startingPoint(
  opts: TrainOptions,
  out: string,
  gpu: Gpu,
  print: (line: string) => void,
): Promise<{
  start: RunStart;
  model: ModelConfig;
  tokenizer: TextTokenizer;
  state?: TrainerState;
  lora?: LoraRun;
}> {
  const { kind } = opts;
  if (opts.lora) {
    if (kind === "dpo") throw new UsageError("DPO with LoRA adapters is not supported yet");
    if (opts.init === null) {
      throw new UsageError(
        "lora adapts a trained model: --init DIR names it (--init none has no weights to adapt)",
      );
    }
    if (opts.preset !== undefined || opts.modelConfig !== undefined) {
      throw new UsageError(
        "lora takes the model's shape from its base (--init); drop --preset / --model-config",
      );
    }
    return await loraStartingPoint(opts.lora, {
      kind,
      resume: opts.resume ?? false,
      base: opts.init ?? undefined,
      tokenizer: opts.tokenizer,
    }, out);
  }
  const d = TRAIN_DEFAULTS[kind];
  let initDir = opts.init === null ? undefined : opts.init;
  if (kind === "sft" && opts.init === undefined && !opts.resume) initDir = "out/pretrain";
  if (kind === "dpo" && opts.init === undefined && !opts.resume) initDir = "out/sft";
  if (kind === "dpo" && opts.init === null) {
    throw new UsageError(
      "dpo starts from a trained checkpoint, which is also its frozen reference; --init none is not possible",
    );
  }
  if (opts.resume) {
    // After a crash mid-save the checkpoint may survive as `<out>.old-*`.
    const source = await resolveCheckpointDir(out).catch(() => out);
    if (!(await exists(join(source, "trainer_state.json")))) {
      throw new UserError(
        `--resume: ${out} holds no checkpoint to resume (no trainer_state.json); run without --resume first`,
      );
    }
    const ckpt = await loadCheckpoint(source, { optimizer: true });
    const state = ckpt.state as unknown as TrainerState;
    if (state?.version !== 1 || state.run?.kind !== kind) {
      throw new UserError(
        `--resume: ${out}/trainer_state.json is not a ${kind} run of this trainer`,
      );
    }
    const tokenizer = TextTokenizer.fromJson(
      ckpt.tokenizer.tokenizerJson,
      ckpt.tokenizer.tokenizerConfigJson,
      out,
    );
    await checkSameModel(opts, ckpt.config, `the run in ${out} (--resume)`);
    return {
      model: ckpt.config,
      tokenizer,
      state,
      start: {
        params: ckpt.params,
        optimizer: ckpt.optimizer,
        step: state.step,
        tokens: state.tokens,
        elapsed_s: state.elapsed_s,
        ...(kind === "dpo" ? { reference: await loadReference(state, ckpt.config) } : {}),
      },
    };
  }
  if (initDir !== undefined) {
    if (!(await exists(initDir))) {
      throw new UserError(
        kind === "sft" && initDir === "out/pretrain"
          ? "sft starts from out/pretrain, which does not exist yet: run `deno task pretrain` first, or pass --init DIR (a checkpoint), --init FILE.pth (a PyTorch state dict) or --init none (random weights)"
          : kind === "dpo" && initDir === "out/sft"
          ? "dpo starts from out/sft, which does not exist yet: run `deno task pretrain` and `deno task sft` first, or pass --init DIR (a checkpoint)"
          : `--init ${initDir}: no such checkpoint directory (or PyTorch .pth file)`,
      );
    }
    const given = opts.tokenizer ? await TextTokenizer.load(opts.tokenizer) : undefined;
    const ckpt = await loadModel(initDir, {
      shape: await requestedShape(opts),
      tokenizer: given,
      describe: `the --init checkpoint ${initDir}`,
    });
    for (const note of ckpt.notes) print(`--init ${initDir}: ${note}`);
    const tokenizer = given ?? TextTokenizer.fromJson(
      ckpt.tokenizer.tokenizerJson,
      ckpt.tokenizer.tokenizerConfigJson,
      initDir,
    );
    return {
      model: ckpt.config,
      tokenizer,
      start: {
        params: ckpt.params,
        step: 0,
        tokens: 0,
        elapsed_s: 0,
        // DPO's frozen reference is the starting model itself.
        ...(kind === "dpo" ? { reference: ckpt.params } : {}),
      },
    };
  }
  const tokenizer = opts.tokenizer ? await TextTokenizer.load(opts.tokenizer) : defaultTokenizer();
  const model = await requestedModel(opts, tokenizer.vocabSize);
  // Refuse a model the device cannot hold before spending time on weights.
  checkDeviceLimits(gpu.limits, model, opts.batchSize ?? d.batchSize, opts.seqLen ?? d.seqLen);
  return {
    model,
    tokenizer,
    start: {
      params: initParameters(model, opts.seed ?? TRAIN_DEFAULTS.seed),
      step: 0,
      tokens: 0,
      elapsed_s: 0,
    },
  };
}

/** The sha256 of a checkpoint's weights file: what a DPO run records of its reference. */
async function weightsSha256(dir: string): Promise<string> {
  const bytes = await Deno.readFile(join(dir, "model.safetensors"));
  const digest = await crypto.subtle.digest("SHA-256", bytes);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * A resumed DPO run's reference: the checkpoint it started from, which must
 * still hold the same weights (their sha256 is in the run's state).
 */
async function loadReference(
  state: TrainerState,
  config: ModelConfig,
): Promise<Map<string, Float32Array>> {
  const ref = state.run.reference;
  if (!ref) {
    throw new UserError("--resume: the DPO run's state does not name its reference checkpoint");
  }
  const sha = await weightsSha256(ref.path).catch((e) => {
    throw new UserError(
      `--resume: the DPO reference ${ref.path} cannot be read (${(e as Error).message}); ` +
        "a DPO run needs the checkpoint it started from",
    );
  });
  if (sha !== ref.sha256) {
    throw new UserError(
      `--resume: the DPO reference ${ref.path} has changed since the run started ` +
        `(model.safetensors sha256 ${sha.slice(0, 12)}... vs ${ref.sha256.slice(0, 12)}...); ` +
        "the run cannot continue against another reference",
    );
  }
  const ckpt = await loadCheckpoint(ref.path);
  for (const field of MODEL_CONFIG_FIELDS) {
    if (ckpt.config[field] !== config[field]) {
      throw new UserError(`--resume: the DPO reference ${ref.path} is another model (${field})`);
    }
  }
  return ckpt.params;
}

/**
 * Sets a run up: starting point, settings, data, output directory. Prints
 * notes (the embedded corpus written, epochs counted, a changed schedule, a
 * replaced run) through `print`. The training stream is open on return; the
 * caller closes it (`prepared.train.close()`).
 */
export async function prepareRun(
  opts: TrainOptions,
  io: {
    gpu: Gpu;
    print: (line: string) => void;
    /** Data-parallel ranks (default 1): the stream yields `worldSize * batchSize` rows. */
    worldSize?: number;
  },
): Promise<PreparedRun> {
  const worldSize = io.worldSize ?? 1;
  const { kind } = opts;
  if (kind === "dpo" && worldSize > 1) {
    throw new UserError("dpo runs in one process; data-parallel DPO over MPI is not supported yet");
  }
  const print = io.print;
  if (opts.steps !== undefined && opts.epochs !== undefined) {
    throw new UsageError("give --steps or --epochs, not both");
  }
  if (opts.preset !== undefined && opts.modelConfig !== undefined) {
    throw new UsageError("give --preset or --model-config, not both");
  }
  const d = TRAIN_DEFAULTS[kind];
  const out = (opts.out ?? (opts.lora ? LORA_RUN_DEFAULTS.out : d.out)).replace(/\/+$/, "");
  const resume = opts.resume ?? false;

  // --- Where the run starts: resume, --init, or fresh weights. -----------------
  const { start, model, tokenizer, state, lora } = await startingPoint(opts, out, io.gpu, print);
  if (tokenizer.vocabSize > model.vocab_size) {
    throw new UserError(
      `the tokenizer has ${tokenizer.vocabSize} tokens but the model's vocab_size is ${model.vocab_size}`,
    );
  }

  // --- The run's settings (a resume keeps the saved ones, --steps may extend). -
  const saved = state?.run;
  const pick = <K extends keyof TrainOptions & keyof RunConfig>(
    key: K,
    fallback: number,
  ): number => {
    const given = opts[key] as number | undefined;
    return given !== undefined ? given : saved ? saved[key] as number : fallback;
  };
  // The per-rank batch: the given one, else the saved run's global batch over
  // this run's ranks (a resume with another rank count keeps the global batch).
  const savedGlobal = saved ? saved.batchSize * (saved.worldSize ?? 1) : undefined;
  let batchSize = opts.batchSize ??
    (savedGlobal !== undefined ? savedGlobal / worldSize : d.batchSize);
  if (
    saved && opts.batchSize !== undefined && (saved.worldSize ?? 1) === worldSize &&
    opts.batchSize !== saved.batchSize
  ) {
    throw new UserError(
      `--resume: --batch-size ${opts.batchSize} differs from the run's ${saved.batchSize}; a resumed run keeps its batch shape and data order`,
    );
  }
  if (savedGlobal !== undefined && batchSize * worldSize !== savedGlobal) {
    throw new UserError(
      `--resume: the run trained on ${savedGlobal} rows per step (${saved!.batchSize} on each of ${
        saved!.worldSize ?? 1
      } ranks); ${worldSize} ranks cannot split that evenly${
        opts.batchSize !== undefined ? ` with --batch-size ${opts.batchSize}` : ""
      }. Resume with a rank count that divides it, so each step sees the same rows.`,
    );
  }
  batchSize = Math.round(batchSize);
  const seqLen = pick("seqLen", d.seqLen);
  const accum = pick("accum", TRAIN_DEFAULTS.accum);
  if (batchSize < 1 || seqLen < 1 || accum < 1) {
    throw new UsageError("--batch-size, --seq-len and --accum must be at least 1");
  }
  if (seqLen > model.max_position_embeddings) {
    throw new UserError(
      `--seq-len ${seqLen} exceeds the model's max_position_embeddings (${model.max_position_embeddings})`,
    );
  }
  const seed = pick("seed", TRAIN_DEFAULTS.seed);
  if (saved) {
    const kept = [
      ["seq-len", opts.seqLen, seqLen, saved.seqLen],
      ["accum", opts.accum, accum, saved.accum],
      ["seed", opts.seed, seed, saved.seed],
    ] as const;
    for (const [flag, given, now, was] of kept) {
      if (given !== undefined && now !== was) {
        throw new UserError(
          `--resume: --${flag} ${now} differs from the run's ${was}; a resumed run keeps its batch shape and data order`,
        );
      }
    }
  }

  // --- Data: given paths, or the embedded corpus written beside --out. --------
  const shuffleBuffer = saved
    ? state!.data.shuffleBuffer
    : opts.shuffleBuffer ?? TRAIN_DEFAULTS.shuffleBuffer;
  const skipBadLines = opts.skipBadLines ?? false;
  const { packing, sftAugment } = await dataShaping(opts, saved);
  let data = opts.data ?? [];
  let evalData = opts.evalData ?? [];
  if (data.length === 0 && saved) data = state!.data.files.map((f) => f.path);
  if (evalData.length === 0 && saved) evalData = saved.evalData ?? [];
  if (data.length === 0) {
    // Beside --out (out/pretrain -> out/data); a bare --out name puts it in
    // out/data rather than next to the user's own files.
    const parent = dirname(out);
    const corpusDir = parent === "." ? join("out", "data") : join(parent, "data");
    const { files } = await writeEmbeddedCorpus(corpusDir).catch((e) => {
      throw new UserError(
        `cannot write the embedded corpus to ${corpusDir}: ${(e as Error).message}`,
      );
    });
    if (kind === "dpo") {
      const pairs = await writePreferenceSet(corpusDir).catch((e) => {
        throw new UserError(
          `cannot write the embedded preference set to ${corpusDir}: ${(e as Error).message}`,
        );
      });
      data = [pairs.dpo];
      if (evalData.length === 0) evalData = [pairs.dpoEval];
      print(
        `data: the embedded preference pairs, written to ${corpusDir}/ (${PREFERENCE_FILES.dpo})`,
      );
    } else {
      data = [files[kind === "pretrain" ? "pretrain" : "sft"]];
      if (evalData.length === 0) {
        evalData = [files[kind === "pretrain" ? "pretrainEval" : "sftEval"]];
      }
      print(`data: the embedded corpus, written to ${corpusDir}/ (${CORPUS_FILES[kind]})`);
    }
  }
  if (kind === "pretrain" && packing === "pad") {
    print(
      `packing: pad (one document per row, cut to seq_len - 1 = ${
        seqLen - 1
      } tokens + bos/eos, padding masked)`,
    );
  }
  if (kind === "sft" && augmentationActive(sftAugment)) {
    print(`sft augmentation: ${augmentationKey(sftAugment)}`);
  }
  const streamOptions: DataStreamOptions = {
    data,
    kind,
    tokenizer,
    // Every rank reads the global batch and keeps its rows (train/distributed.ts).
    batchSize: batchSize * worldSize,
    seqLen,
    seed,
    shuffleBuffer,
    skipBadLines,
    packing,
    augment: sftAugment,
    tokenizeWorkers: opts.dataWorkers ?? TRAIN_DEFAULTS.dataWorkers,
  };

  let steps = pick("steps", d.steps);
  if (opts.epochs !== undefined) {
    const epochs = opts.epochs;
    const counter = await DataStream.open({ ...streamOptions, shuffleBuffer: 0, maxEpochs: 1 });
    let batches = 0;
    try {
      while (await counter.next()) batches++;
    } finally {
      counter.close();
    }
    steps = Math.ceil((batches * epochs) / accum);
    print(`--epochs ${epochs}: ${batches} batches per epoch -> ${steps} steps`);
  }
  const four = Math.max(1, Math.ceil(steps / 4));
  const run: RunConfig = {
    kind,
    model,
    evalData,
    steps,
    batchSize,
    seqLen,
    accum,
    lr: pick("lr", opts.lora ? LORA_RUN_DEFAULTS.lr : defaultLr(kind, model)),
    minLrRatio: pick("minLrRatio", TRAIN_DEFAULTS.minLrRatio),
    warmupSteps: pick("warmupSteps", TRAIN_DEFAULTS.warmupSteps),
    weightDecay: pick("weightDecay", TRAIN_DEFAULTS.weightDecay),
    beta1: pick("beta1", TRAIN_DEFAULTS.beta1),
    beta2: pick("beta2", TRAIN_DEFAULTS.beta2),
    adamEps: pick("adamEps", TRAIN_DEFAULTS.adamEps),
    gradClip: pick("gradClip", TRAIN_DEFAULTS.gradClip),
    seed,
    logEvery: Math.max(1, pick("logEvery", TRAIN_DEFAULTS.logEvery)),
    evalEvery: Math.max(1, pick("evalEvery", four)),
    saveEvery: Math.max(1, pick("saveEvery", four)),
    out,
    ...(worldSize > 1 ? { worldSize } : {}),
    ...(kind === "pretrain" && packing !== "pack" ? { packing } : {}),
    ...(kind === "sft" && augmentationActive(sftAugment) ? { sftAugment } : {}),
    ...(lora ? { lora } : {}),
    ...(kind === "dpo"
      ? {
        beta: pick("beta", TRAIN_DEFAULTS.beta),
        reference: saved?.reference ?? {
          path: opts.init ?? "out/sft",
          sha256: await weightsSha256(opts.init ?? "out/sft"),
        },
      }
      : {}),
  };
  if (kind === "dpo" && !(run.beta! > 0)) throw new UsageError("--beta must be above 0");
  if (run.beta1 >= 1 || run.beta2 >= 1) throw new UsageError("--beta1 and --beta2 must be below 1");
  if (run.minLrRatio > 1) throw new UsageError("--min-lr-ratio must be between 0 and 1");
  if (saved && steps < state!.step) {
    throw new UserError(
      `--resume: the run in ${out} is already at step ${state!.step}, past --steps ${steps}`,
    );
  }
  if (saved && steps !== saved.steps) {
    // The cosine schedule is a function of the total: a new total moves the
    // learning rate of the remaining steps (exact resume needs the same --steps).
    print(
      `note: --steps ${steps} differs from the run's ${saved.steps}; the cosine schedule now spans ${steps} steps, so the learning rate continues from the new curve`,
    );
  }

  // --- The output directory: ours to replace, or refuse. ----------------------
  if (!resume && await exists(out)) {
    const names: string[] = [];
    for await (const e of Deno.readDir(out)) names.push(e.name);
    const ours = new Set(["metrics.jsonl", "loss.svg"]);
    const isCheckpoint = names.includes("config.json") || names.includes("adapter_config.json");
    if (!isCheckpoint && names.some((n) => !ours.has(n))) {
      throw new UserError(
        `--out ${out} exists and is not a checkpoint of ours; choose a new or empty directory`,
      );
    }
    if (isCheckpoint) {
      print(`note: replacing the previous run in ${out} (use --resume to continue it)`);
    }
  }

  // Open the data before creating --out, so bad data leaves nothing behind.
  const train = await DataStream.open(streamOptions, state?.data);
  try {
    await Deno.mkdir(out, { recursive: true }).catch((e) => {
      throw new UserError(`cannot create --out ${out}: ${(e as Error).message}`);
    });
  } catch (e) {
    train.close();
    throw e;
  }
  const openEval = evalData.length > 0
    ? () =>
      DataStream.open({
        data: evalData,
        kind,
        tokenizer,
        batchSize,
        seqLen,
        seed: 0,
        shuffleBuffer: 0,
        maxEpochs: 1,
        skipBadLines,
      })
    : undefined;
  const peakFlops = opts.peakTflops !== undefined
    ? opts.peakTflops * 1e12
    : peakFlopsFor(io.gpu.adapterSummary.name);
  return { run, start, tokenizer, train, openEval, peakFlops, resumed: resume };
}
