/**
 * `trainer pretrain` and `trainer sft`: options, defaults (MiniMind's where it
 * has one), the run's setup (tokenizer, model config, data, start point or
 * resume), Ctrl-C handling, and what the user is told at the end.
 */
import { dirname, join } from "node:path";
import { Gpu } from "../kernels/runtime.ts";
import {
  MODEL_CONFIG_FIELDS,
  type ModelConfig,
  parameterCount,
  presetConfig,
  validateConfig,
} from "../model/config.ts";
import { initParameters } from "../model/params.ts";
import { checkDeviceLimits } from "../model/gpu_model.ts";
import { loadCheckpoint, resolveCheckpointDir } from "../model/checkpoint.ts";
import { fromHfConfig } from "../model/hf_config.ts";
import { CORPUS_FILES, defaultTokenizer, writeEmbeddedCorpus } from "../data/corpus.ts";
import { DataStream } from "../data/stream.ts";
import { TextTokenizer } from "../data/tokenizer.ts";
import {
  type CommandSpec,
  flagOption,
  listOption,
  numberOption,
  type OptionSpec,
  type ParsedArgs,
  stringOption,
} from "../util/cli.ts";
import { UsageError, UserError } from "../util/errors.ts";
import { parse as parseJsonc, type ParseError } from "jsonc-parser";
import { type RunConfig, type RunStart, type TrainerState, trainLoop } from "./loop.ts";
import { peakFlopsFor } from "./peak.ts";
import { formatDuration } from "./progress.ts";

type Kind = "pretrain" | "sft";

/** Defaults per kind. MiniMind: AdamW 0.9/0.999, eps 1e-8, cosine to 0.1 x lr, clip 1.0. */
export const DEFAULTS = {
  pretrain: { lr: 5e-4, out: "out/pretrain", steps: 600, batchSize: 16, seqLen: 128 },
  sft: { lr: 2e-4, out: "out/sft", steps: 300, batchSize: 16, seqLen: 128 },
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
  logEvery: 10,
} as const;

function trainOptions(kind: Kind): Record<string, OptionSpec> {
  const d = DEFAULTS[kind];
  return {
    data: {
      type: "string",
      multiple: true,
      valueName: "PATH",
      help: kind === "pretrain"
        ? 'JSONL shards ({"text"} lines), dirs, globs or token-shard dirs (default: the embedded corpus)'
        : 'JSONL shards ({"conversations"} lines), dirs, globs or token-shard dirs (default: the embedded corpus)',
    },
    tokenizer: {
      type: "string",
      valueName: "DIR",
      help: kind === "pretrain"
        ? "Hugging Face tokenizer dir (default: the embedded tokenizer, or --init's)"
        : "Hugging Face tokenizer dir (default: the --init checkpoint's)",
    },
    "eval-data": {
      type: "string",
      multiple: true,
      valueName: "PATH",
      help: "held-out data evaluated every --eval-every steps (default: the embedded eval split)",
    },
    "shuffle-buffer": {
      type: "string",
      valueName: "N",
      help: `samples held for shuffling; 0 = file order (default ${DEFAULTS.shuffleBuffer})`,
    },
    "skip-bad-lines": {
      type: "boolean",
      help: "count and skip malformed lines instead of stopping at the first",
    },
    preset: {
      type: "string",
      valueName: "NAME",
      help: "model shape: tiny, minimind2-small, minimind-3 (default tiny)",
    },
    "model-config": {
      type: "string",
      valueName: "FILE",
      help: "model shape from a JSON/JSONC file with Hugging Face config field names (+ qk_norm)",
    },
    init: {
      type: "string",
      valueName: "DIR",
      help: kind === "pretrain"
        ? "start from this checkpoint's weights (fresh optimizer, step 0)"
        : "start from this checkpoint's weights (default out/pretrain; 'none' = random weights)",
    },
    steps: { type: "string", valueName: "N", help: `optimizer steps (default ${d.steps})` },
    epochs: {
      type: "string",
      valueName: "N",
      help: "passes over the data instead of --steps (counts the data once first)",
    },
    "batch-size": {
      type: "string",
      valueName: "B",
      help: `sequences per micro-batch (default ${d.batchSize})`,
    },
    "seq-len": {
      type: "string",
      valueName: "T",
      help: `tokens per sequence (default ${d.seqLen})`,
    },
    accum: {
      type: "string",
      valueName: "N",
      help: `micro-batches per optimizer step (default ${DEFAULTS.accum})`,
    },
    lr: {
      type: "string",
      valueName: "LR",
      help: kind === "pretrain"
        ? `peak learning rate (default ${d.lr}, MiniMind's pretrain rate)`
        : `peak learning rate (default ${d.lr}; lower than pretraining, as MiniMind does)`,
    },
    "min-lr-ratio": {
      type: "string",
      valueName: "R",
      help: `cosine decays to lr x R; 1 = constant (default ${DEFAULTS.minLrRatio}, MiniMind)`,
    },
    "warmup-steps": {
      type: "string",
      valueName: "N",
      help: `linear warmup steps (default ${DEFAULTS.warmupSteps}, MiniMind)`,
    },
    "weight-decay": {
      type: "string",
      valueName: "WD",
      help: `AdamW decoupled weight decay on matrices (default ${DEFAULTS.weightDecay})`,
    },
    beta1: { type: "string", valueName: "B1", help: `AdamW beta1 (default ${DEFAULTS.beta1})` },
    beta2: { type: "string", valueName: "B2", help: `AdamW beta2 (default ${DEFAULTS.beta2})` },
    "adam-eps": {
      type: "string",
      valueName: "EPS",
      help: `AdamW epsilon (default ${DEFAULTS.adamEps})`,
    },
    "grad-clip": {
      type: "string",
      valueName: "C",
      help: `clip the global gradient norm to C; 0 = off (default ${DEFAULTS.gradClip}, MiniMind)`,
    },
    seed: {
      type: "string",
      valueName: "N",
      help: `seed of initialization and data order (default ${DEFAULTS.seed})`,
    },
    out: {
      type: "string",
      valueName: "DIR",
      help: `checkpoint directory, with metrics.jsonl and loss.svg (default ${d.out})`,
    },
    "log-every": {
      type: "string",
      valueName: "N",
      help: `log every N steps (default ${DEFAULTS.logEvery})`,
    },
    "eval-every": {
      type: "string",
      valueName: "N",
      help: "evaluate every N steps (default: 4 times per run, and at the end)",
    },
    "save-every": {
      type: "string",
      valueName: "N",
      help: "save a checkpoint every N steps (default: 4 times per run, and at the end)",
    },
    resume: {
      type: "boolean",
      help:
        "continue the run in --out from its last checkpoint up to --steps (the same --steps resumes exactly)",
    },
    "peak-tflops": {
      type: "string",
      valueName: "X",
      help: "the adapter's FP32 peak in TFLOP/s, for MFU (known GPUs are recognised)",
    },
  };
}

const MODEL_FIELDS = new Set<string>(MODEL_CONFIG_FIELDS);

/** Reads `--model-config FILE`: a preset's fields overridden by the file's (HF names). */
async function readModelConfigFile(
  path: string,
): Promise<{ config: ModelConfig; setsVocab: boolean }> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    throw new UserError(`cannot read --model-config ${path}: ${(e as Error).message}`);
  }
  const errors: ParseError[] = [];
  const data = parseJsonc(text, errors, { allowTrailingComma: true });
  if (errors.length > 0 || typeof data !== "object" || data === null || Array.isArray(data)) {
    throw new UserError(`${path}: not a JSON object of model config fields`);
  }
  const obj = data as Record<string, unknown>;
  if (typeof obj["architectures"] !== "undefined" || typeof obj["model_type"] !== "undefined") {
    // A Hugging Face config.json: read it with the same rules as checkpoints.
    const parsed = fromHfConfig(obj, path);
    return { config: parsed.config, setsVocab: true };
  }
  const base = presetConfig(typeof obj["preset"] === "string" ? obj["preset"] as string : "tiny");
  for (const [k, v] of Object.entries(obj)) {
    if (k === "preset") continue;
    if (!MODEL_FIELDS.has(k)) {
      throw new UserError(
        `${path}: unknown model config field "${k}"; fields: ${[...MODEL_FIELDS].join(", ")}`,
      );
    }
    (base as unknown as Record<string, unknown>)[k] = v;
  }
  validateConfig(base, path);
  return { config: base, setsVocab: "vocab_size" in obj };
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch {
    return false;
  }
}

function describe(config: ModelConfig): string {
  return `hidden ${config.hidden_size}, ${config.num_hidden_layers} layers, ${config.num_attention_heads}/${config.num_key_value_heads} heads, MLP ${config.intermediate_size}, vocab ${config.vocab_size}${
    config.qk_norm ? ", QK-norm" : ""
  }${config.tie_word_embeddings ? ", tied head" : ""}`;
}

/**
 * The model `--preset` or `--model-config` asks for (default `tiny`), with
 * `vocab_size` following the tokenizer unless the file sets it, in which case
 * the two must agree.
 */
async function requestedModel(args: ParsedArgs, vocabSize: number): Promise<ModelConfig> {
  const file = stringOption(args, "model-config");
  const { config, setsVocab } = file
    ? await readModelConfigFile(file)
    : { config: presetConfig(stringOption(args, "preset", "tiny")), setsVocab: false };
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
 * With `--resume` or `--init` the model comes from the checkpoint; a
 * `--preset` / `--model-config` given too must describe the same model, or
 * the run is refused naming the first field that differs.
 */
async function checkSameModel(args: ParsedArgs, have: ModelConfig, where: string): Promise<void> {
  if (args.values["preset"] === undefined && args.values["model-config"] === undefined) return;
  const asked = await requestedModel(args, have.vocab_size);
  for (const field of MODEL_CONFIG_FIELDS) {
    if (asked[field] !== have[field]) {
      const flag = args.values["preset"] !== undefined ? "--preset" : "--model-config";
      throw new UserError(
        `${flag} asks for ${field} = ${asked[field]}, but ${where} has ${field} = ${
          have[field]
        }; drop ${flag} to use the checkpoint's model`,
      );
    }
  }
}

/** Runs pretrain or sft with parsed arguments. Exported for tests and the experiment. */
export async function runTraining(
  kind: Kind,
  args: ParsedArgs,
  io: {
    print?: (line: string) => void;
    gpu?: Gpu;
    /** Tests: behave as if Ctrl-C came during this step. */
    interruptAtStep?: number;
  } = {},
): Promise<number> {
  const print = io.print ?? ((line: string) => console.log(line));
  if (args.values["steps"] !== undefined && args.values["epochs"] !== undefined) {
    throw new UsageError("give --steps or --epochs, not both");
  }
  if (args.values["preset"] !== undefined && args.values["model-config"] !== undefined) {
    throw new UsageError("give --preset or --model-config, not both");
  }

  const gpu = io.gpu ?? await Gpu.request();
  try {
    return await setUpAndTrain(kind, args, gpu, print, io.interruptAtStep);
  } finally {
    if (!io.gpu) gpu.destroy();
  }
}

async function setUpAndTrain(
  kind: Kind,
  args: ParsedArgs,
  gpu: Gpu,
  print: (line: string) => void,
  interruptAtStep: number | undefined,
): Promise<number> {
  const d = DEFAULTS[kind];
  const int = (name: string, fallback: number, min = 0) =>
    numberOption(args, name, fallback, { integer: true, min });
  const num = (name: string, fallback: number, min = 0) =>
    numberOption(args, name, fallback, { min });
  const out = stringOption(args, "out", d.out).replace(/\/+$/, "");
  const resume = flagOption(args, "resume");

  // --- Where the run starts: resume, --init, or fresh weights. -----------------
  let state: TrainerState | undefined;
  let start: RunStart;
  let model: ModelConfig;
  let tokenizer: TextTokenizer;
  let initDir = stringOption(args, "init");
  if (kind === "sft" && initDir === undefined && !resume) initDir = "out/pretrain";
  if (initDir === "none") initDir = undefined;
  const explicitTokenizer = stringOption(args, "tokenizer");

  if (resume) {
    // After a crash mid-save the checkpoint may survive as `<out>.old-*`.
    const source = await resolveCheckpointDir(out).catch(() => out);
    if (!(await exists(join(source, "trainer_state.json")))) {
      throw new UserError(
        `--resume: ${out} holds no checkpoint to resume (no trainer_state.json); run without --resume first`,
      );
    }
    const ckpt = await loadCheckpoint(source, { optimizer: true });
    state = ckpt.state as unknown as TrainerState;
    if (state?.version !== 1 || state.run?.kind !== kind) {
      throw new UserError(
        `--resume: ${out}/trainer_state.json is not a ${kind} run of this trainer`,
      );
    }
    model = ckpt.config;
    tokenizer = TextTokenizer.fromJson(
      ckpt.tokenizer.tokenizerJson,
      ckpt.tokenizer.tokenizerConfigJson,
      out,
    );
    await checkSameModel(args, model, `the run in ${out} (--resume)`);
    start = {
      params: ckpt.params,
      optimizer: ckpt.optimizer,
      step: state.step,
      tokens: state.tokens,
      elapsed_s: state.elapsed_s,
    };
  } else if (initDir !== undefined) {
    if (!(await exists(initDir))) {
      throw new UserError(
        kind === "sft" && initDir === "out/pretrain"
          ? "sft starts from out/pretrain, which does not exist yet: run `deno task pretrain` first, or pass --init DIR (a checkpoint) or --init none (random weights)"
          : `--init ${initDir}: no such checkpoint directory`,
      );
    }
    const ckpt = await loadCheckpoint(initDir);
    model = ckpt.config;
    await checkSameModel(args, model, `the --init checkpoint ${initDir}`);
    tokenizer = explicitTokenizer
      ? await TextTokenizer.load(explicitTokenizer)
      : TextTokenizer.fromJson(
        ckpt.tokenizer.tokenizerJson,
        ckpt.tokenizer.tokenizerConfigJson,
        initDir,
      );
    start = { params: ckpt.params, step: 0, tokens: 0, elapsed_s: 0 };
  } else {
    tokenizer = explicitTokenizer
      ? await TextTokenizer.load(explicitTokenizer)
      : defaultTokenizer();
    model = await requestedModel(args, tokenizer.vocabSize);
    // Refuse a model the device cannot hold before spending time on weights.
    checkDeviceLimits(
      gpu.limits,
      model,
      int("batch-size", d.batchSize, 1),
      int("seq-len", d.seqLen, 1),
    );
    start = {
      params: initParameters(model, int("seed", DEFAULTS.seed)),
      step: 0,
      tokens: 0,
      elapsed_s: 0,
    };
  }
  if (tokenizer.vocabSize > model.vocab_size) {
    throw new UserError(
      `the tokenizer has ${tokenizer.vocabSize} tokens but the model's vocab_size is ${model.vocab_size}`,
    );
  }

  // --- The run's settings (a resume keeps the saved ones, --steps may extend). -
  const saved = state?.run;
  const pick = (name: string, savedValue: number | undefined, fallback: number, integer = false) =>
    saved && args.values[name] === undefined
      ? savedValue!
      : integer
      ? int(name, fallback)
      : num(name, fallback);
  const batchSize = pick("batch-size", saved?.batchSize, d.batchSize, true);
  const seqLen = pick("seq-len", saved?.seqLen, d.seqLen, true);
  const accum = pick("accum", saved?.accum, DEFAULTS.accum, true);
  if (batchSize < 1 || seqLen < 1 || accum < 1) {
    throw new UsageError("--batch-size, --seq-len and --accum must be at least 1");
  }
  if (seqLen > model.max_position_embeddings) {
    throw new UserError(
      `--seq-len ${seqLen} exceeds the model's max_position_embeddings (${model.max_position_embeddings})`,
    );
  }
  const seed = pick("seed", saved?.seed, DEFAULTS.seed, true);
  if (saved) {
    for (const name of ["batch-size", "seq-len", "accum", "seed"]) {
      if (args.values[name] !== undefined) {
        const now = { "batch-size": batchSize, "seq-len": seqLen, accum, seed }[name];
        const was = {
          "batch-size": saved.batchSize,
          "seq-len": saved.seqLen,
          accum: saved.accum,
          seed: saved.seed,
        }[name];
        if (now !== was) {
          throw new UserError(
            `--resume: --${name} ${now} differs from the run's ${was}; a resumed run keeps its batch shape and data order`,
          );
        }
      }
    }
  }

  // --- Data: given paths, or the embedded corpus written beside --out. --------
  const shuffleBuffer = saved
    ? (state!.data.shuffleBuffer)
    : int("shuffle-buffer", DEFAULTS.shuffleBuffer);
  const skipBadLines = flagOption(args, "skip-bad-lines");
  let data = listOption(args, "data");
  let evalData = listOption(args, "eval-data");
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
    data = [files[kind === "pretrain" ? "pretrain" : "sft"]];
    if (evalData.length === 0) evalData = [files[kind === "pretrain" ? "pretrainEval" : "sftEval"]];
    print(`data: the embedded corpus, written to ${corpusDir}/ (${CORPUS_FILES[kind]})`);
  }
  const streamOptions = {
    data,
    kind,
    tokenizer,
    batchSize,
    seqLen,
    seed,
    shuffleBuffer,
    skipBadLines,
  };

  let steps = pick("steps", saved?.steps, d.steps, true);
  if (args.values["epochs"] !== undefined) {
    const epochs = numberOption(args, "epochs", 1, { min: 0 });
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
    lr: pick("lr", saved?.lr, d.lr),
    minLrRatio: pick("min-lr-ratio", saved?.minLrRatio, DEFAULTS.minLrRatio),
    warmupSteps: pick("warmup-steps", saved?.warmupSteps, DEFAULTS.warmupSteps, true),
    weightDecay: pick("weight-decay", saved?.weightDecay, DEFAULTS.weightDecay),
    beta1: pick("beta1", saved?.beta1, DEFAULTS.beta1),
    beta2: pick("beta2", saved?.beta2, DEFAULTS.beta2),
    adamEps: pick("adam-eps", saved?.adamEps, DEFAULTS.adamEps),
    gradClip: pick("grad-clip", saved?.gradClip, DEFAULTS.gradClip),
    seed,
    logEvery: Math.max(1, pick("log-every", saved?.logEvery, DEFAULTS.logEvery, true)),
    evalEvery: Math.max(1, pick("eval-every", saved?.evalEvery, four, true)),
    saveEvery: Math.max(1, pick("save-every", saved?.saveEvery, four, true)),
    out,
  };
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
    const isCheckpoint = names.includes("config.json");
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
  let interrupted = false;
  const onSigint = () => {
    if (interrupted) Deno.exit(130); // a second Ctrl-C: stop now
    interrupted = true;
    print("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to stop at once)");
  };
  let listening = false;
  try {
    try {
      Deno.addSignalListener("SIGINT", onSigint);
      listening = true;
    } catch { /* no signals here (Windows without a console): Ctrl-C just ends the process */ }
    await Deno.mkdir(out, { recursive: true }).catch((e) => {
      throw new UserError(`cannot create --out ${out}: ${(e as Error).message}`);
    });
    const evalOpen = evalData.length > 0
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
    const adapter = gpu.adapterSummary;
    const peakTflops = stringOption(args, "peak-tflops");
    const peakFlops = peakTflops !== undefined
      ? numberOption(args, "peak-tflops", 0, { min: 0 }) * 1e12
      : peakFlopsFor(adapter.name);
    print(
      `${kind}: ${describe(model)} (${
        (parameterCount(model).total / 1e6).toFixed(2)
      }M parameters) on ${adapter.name}${adapter.isFallback ? " (CPU fallback)" : ""}`,
    );
    print(
      `${
        resume ? `resuming at step ${start.step} of ${steps}` : `${steps} steps`
      }, batch ${batchSize} x ${seqLen} x accum ${accum}, lr ${run.lr} (cosine to x${run.minLrRatio}), into ${out}`,
    );
    const result = await trainLoop(run, {
      gpu,
      tokenizer,
      train,
      openEval: evalOpen,
      start,
      peakFlops,
      print,
      interrupted: () => interrupted,
      interruptAtStep,
    });
    const stats = train.stats;
    if (stats.skippedLines > 0) {
      print(`skipped ${stats.skippedLines} malformed lines (--skip-bad-lines)`);
    }
    if (stats.skippedConversations > 0) {
      print(
        `skipped ${stats.skippedConversations} conversations with no assistant token left after truncation to ${seqLen}`,
      );
    }
    const lossLine = result.firstLoss !== undefined
      ? `loss ${result.firstLoss.toFixed(4)} -> ${result.lastLoss!.toFixed(4)}` +
        (result.evalLoss !== undefined ? `, eval loss ${result.evalLoss.toFixed(4)}` : "")
      : "";
    print(
      `${result.interrupted ? "stopped" : "done"} at step ${result.steps}${
        lossLine ? `: ${lossLine}` : ""
      } in ${formatDuration(result.elapsed_s - start.elapsed_s)} (${
        Math.round(result.tokensPerSecond)
      } tokens/s)`,
    );
    print(
      `checkpoint: ${out}/ (Transformers-loadable), metrics: ${out}/metrics.jsonl, plot: ${out}/loss.svg`,
    );
    if (result.interrupted) {
      print(`continue with: deno task ${kind} --out ${out} --resume`);
      return 130;
    }
    print(
      kind === "pretrain"
        ? `next: deno task sft --init ${out}`
        : `next: deno task chat --model ${out}   (or: deno task generate --model ${out} --chat --prompt "...")`,
    );
    return 0;
  } finally {
    train.close();
    if (listening) Deno.removeSignalListener("SIGINT", onSigint);
  }
}

function trainCommand(kind: Kind): CommandSpec {
  return {
    name: kind,
    summary: kind === "pretrain"
      ? "Pretrain a model by next-token prediction on plain text"
      : "Fine-tune a model on conversations, with the loss on assistant tokens only",
    usage: "[options]",
    description: kind === "pretrain"
      ? `With no options, trains the tiny preset on the embedded corpus with the embedded tokenizer into ${DEFAULTS.pretrain.out}. --steps 0 writes the initialized model and exits. Ctrl-C saves a checkpoint and exits 130; --resume continues it.`
      : `With no options, starts from ${DEFAULTS.pretrain.out} and trains on the embedded conversations into ${DEFAULTS.sft.out}. Each conversation is rendered with the tokenizer's chat template; only assistant turns (through <|im_end|>) are trained. Ctrl-C saves a checkpoint and exits 130; --resume continues it.`,
    options: trainOptions(kind),
    config: true,
    run: (args) => runTraining(kind, args),
  };
}

/** `trainer pretrain`. */
export const pretrainCommand: CommandSpec = trainCommand("pretrain");
/** `trainer sft`. */
export const sftCommand: CommandSpec = trainCommand("sft");
