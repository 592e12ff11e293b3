/**
 * `trainer pretrain` and `trainer sft`: their options and defaults (MiniMind's
 * where it has one), flags turned into typed `TrainOptions`, Ctrl-C handling.
 * The run itself is set up by `train/setup.ts` and run by `train/run.ts`.
 *
 * @module
 */
import { Gpu } from "../kernels/runtime.ts";
import {
  prepareRun,
  TINY_LR,
  TRAIN_DEFAULTS,
  type TrainKind,
  type TrainOptions,
} from "../train/setup.ts";
import { runPrepared } from "../train/run.ts";
import { DataParallel } from "../train/distributed.ts";
import { detectLaunch, openCommunicator } from "../dist/comm.ts";
import { applyGpuForRank } from "../dist/gpu.ts";
import { UsageError, UserError } from "../util/errors.ts";
import type { Packing } from "../data/pretrain.ts";
import {
  type CommandSpec,
  flagOption,
  listOption,
  numberOption,
  type OptionSpec,
  type ParsedArgs,
  stringOption,
} from "./args.ts";

type Kind = TrainKind;

/** The options of `pretrain` / `sft` (also the base of `lora`'s). */
export function trainOptions(kind: Kind): Record<string, OptionSpec> {
  const d = TRAIN_DEFAULTS[kind];
  return {
    data: {
      type: "string",
      multiple: true,
      valueName: "PATH",
      help: kind === "pretrain"
        ? 'JSONL shards ({"text"} lines), dirs, globs or token-shard dirs (default: the embedded corpus)'
        : kind === "dpo"
        ? 'JSONL of preference pairs ({"chosen": [turns], "rejected": [turns]} lines, MiniMind\'s dpo.jsonl), dirs or globs (default: the embedded pairs)'
        : 'JSONL shards ({"conversations"} lines), dirs, globs or token-shard dirs (default: the embedded corpus)',
    },
    ...(kind === "dpo"
      ? {
        beta: {
          type: "string",
          valueName: "B",
          help:
            `DPO beta: how strongly the policy is held to the reference (default ${TRAIN_DEFAULTS.beta}; MiniMind's current script uses 0.15)`,
        } satisfies OptionSpec,
      }
      : {}),
    tokenizer: {
      type: "string",
      valueName: "DIR",
      help: kind === "pretrain"
        ? "Hugging Face tokenizer dir (default: the embedded tokenizer, or --init's; a .pth has none: give it unless tokenizer.json and tokenizer_config.json lie beside the .pth)"
        : "Hugging Face tokenizer dir (default: the --init checkpoint's; a .pth has none: give it unless tokenizer.json and tokenizer_config.json lie beside the .pth)",
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
      help: `samples held for shuffling; 0 = file order (default ${TRAIN_DEFAULTS.shuffleBuffer})`,
    },
    "skip-bad-lines": {
      type: "boolean",
      help: "count and skip malformed lines instead of stopping at the first",
    },
    "data-workers": {
      type: "string",
      valueName: "N",
      help: "JSONL: tokenize in N worker threads that read ahead, so tokenizing overlaps " +
        `the GPU; 0 = on the main thread; the batches are the same (default ${TRAIN_DEFAULTS.dataWorkers})`,
    },
    ...(kind === "pretrain"
      ? {
        packing: {
          type: "string",
          valueName: "MODE",
          help: "pack: documents concatenated into full windows (default); " +
            "pad: one document per row, cut to seq_len - 1 tokens + bos/eos and padded (MiniMind's)",
        },
      } satisfies Record<string, OptionSpec>
      : {
        "sft-system-ratio": {
          type: "string",
          valueName: "R",
          help: "give a share R of conversations with no system message and no tools a random " +
            "system prompt (MiniMind: 0.2; default 0 = off); seeded per sample",
        },
        "sft-system-prompts": {
          type: "string",
          valueName: "FILE",
          help: "prompts for --sft-system-ratio: one per line, or a JSON list in a .json file " +
            "(default: MiniMind's ten)",
        },
        "sft-empty-think-keep": {
          type: "string",
          valueName: "R",
          help: "keep the empty <think> block in a share R of samples, strip it from the rest " +
            "(MiniMind: 0.2; default 1 = keep all); seeded per sample",
        },
      } satisfies Record<string, OptionSpec>),
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
      valueName: "PATH",
      help: kind === "dpo"
        ? "start from this checkpoint, which is also the frozen reference (default out/sft)"
        : (kind === "pretrain"
          ? "start from this checkpoint's weights (fresh optimizer, step 0)"
          : "start from this checkpoint's weights (default out/pretrain; 'none' = random weights)") +
          ": a checkpoint directory, or a PyTorch .pth state dict as MiniMind saves (shape read from the tensors, or --preset / --model-config; needed without q_norm)",
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
      help: kind === "dpo"
        ? `preference pairs per micro-batch, 2 sequences each (default ${d.batchSize})`
        : `sequences per micro-batch (default ${d.batchSize})`,
    },
    "seq-len": {
      type: "string",
      valueName: "T",
      help: `tokens per sequence (default ${d.seqLen})`,
    },
    accum: {
      type: "string",
      valueName: "N",
      help: `micro-batches per optimizer step (default ${TRAIN_DEFAULTS.accum})`,
    },
    lr: {
      type: "string",
      valueName: "LR",
      help: kind === "pretrain"
        ? `peak learning rate (default ${d.lr}, MiniMind's pretrain rate; ${TINY_LR.pretrain} for a model of the tiny preset's shape)`
        : kind === "dpo"
        ? `peak learning rate (default ${d.lr}, for the embedded pairs; MiniMind uses 4e-8 on its large set)`
        : `peak learning rate (default ${d.lr}, for short runs on small models, ${TINY_LR.sft} for the tiny preset's shape; MiniMind's full SFT uses 1e-5)`,
    },
    "min-lr-ratio": {
      type: "string",
      valueName: "R",
      help:
        `cosine decays to lr x R; 1 = constant (default ${TRAIN_DEFAULTS.minLrRatio}, MiniMind)`,
    },
    "warmup-steps": {
      type: "string",
      valueName: "N",
      help: `linear warmup steps (default ${TRAIN_DEFAULTS.warmupSteps}, MiniMind)`,
    },
    "weight-decay": {
      type: "string",
      valueName: "WD",
      help: `AdamW decoupled weight decay on matrices (default ${TRAIN_DEFAULTS.weightDecay})`,
    },
    beta1: {
      type: "string",
      valueName: "B1",
      help: `AdamW beta1 (default ${TRAIN_DEFAULTS.beta1})`,
    },
    beta2: {
      type: "string",
      valueName: "B2",
      help: `AdamW beta2 (default ${TRAIN_DEFAULTS.beta2})`,
    },
    "adam-eps": {
      type: "string",
      valueName: "EPS",
      help: `AdamW epsilon (default ${TRAIN_DEFAULTS.adamEps})`,
    },
    "grad-clip": {
      type: "string",
      valueName: "C",
      help:
        `clip the global gradient norm to C; 0 = off (default ${TRAIN_DEFAULTS.gradClip}, MiniMind)`,
    },
    seed: {
      type: "string",
      valueName: "N",
      help: `seed of initialization and data order (default ${TRAIN_DEFAULTS.seed})`,
    },
    out: {
      type: "string",
      valueName: "DIR",
      help: `checkpoint directory, with metrics.jsonl and loss.svg (default ${d.out})`,
    },
    "log-every": {
      type: "string",
      valueName: "N",
      help: `log every N steps (default ${TRAIN_DEFAULTS.logEvery})`,
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

function packingOption(args: ParsedArgs): Packing | undefined {
  const v = stringOption(args, "packing");
  if (v === undefined || v === "pack" || v === "pad") return v;
  throw new UsageError(`--packing must be pack or pad, got ${JSON.stringify(v)}`);
}

/** The typed options of parsed `pretrain` / `sft` arguments: absent flags stay undefined. */
export function trainOptionsFrom(kind: Kind, args: ParsedArgs): TrainOptions {
  const has = (name: string) => args.values[name] !== undefined;
  const int = (name: string, min = 0) =>
    has(name) ? numberOption(args, name, 0, { integer: true, min }) : undefined;
  const num = (name: string, min = 0) =>
    has(name) ? numberOption(args, name, 0, { min }) : undefined;
  const list = (name: string) => has(name) ? listOption(args, name) : undefined;
  const init = stringOption(args, "init");
  return {
    kind,
    out: stringOption(args, "out"),
    resume: flagOption(args, "resume"),
    init: init === "none" ? null : init,
    tokenizer: stringOption(args, "tokenizer"),
    preset: stringOption(args, "preset"),
    modelConfig: stringOption(args, "model-config"),
    data: list("data"),
    evalData: list("eval-data"),
    shuffleBuffer: int("shuffle-buffer"),
    skipBadLines: flagOption(args, "skip-bad-lines"),
    dataWorkers: int("data-workers", 0),
    packing: packingOption(args),
    sftSystemRatio: kind === "sft" ? num("sft-system-ratio") : undefined,
    sftSystemPrompts: kind === "sft" ? stringOption(args, "sft-system-prompts") : undefined,
    sftEmptyThinkKeep: kind === "sft" ? num("sft-empty-think-keep") : undefined,
    steps: int("steps"),
    epochs: num("epochs"),
    batchSize: int("batch-size", 1),
    seqLen: int("seq-len", 1),
    accum: int("accum"),
    lr: num("lr"),
    minLrRatio: num("min-lr-ratio"),
    warmupSteps: int("warmup-steps"),
    weightDecay: num("weight-decay"),
    beta1: num("beta1"),
    beta2: num("beta2"),
    adamEps: num("adam-eps"),
    gradClip: num("grad-clip"),
    seed: int("seed"),
    logEvery: int("log-every"),
    evalEvery: int("eval-every"),
    saveEvery: int("save-every"),
    peakTflops: num("peak-tflops"),
    ...(kind === "dpo" ? { beta: num("beta") } : {}),
  };
}

/** Runs pretrain or sft with parsed arguments. Exported for tests. */
export async function runTraining(
  kind: Kind,
  args: ParsedArgs,
  io: {
    print?: (line: string) => void;
    gpu?: Gpu;
    /** Tests: behave as if Ctrl-C came during this step. */
    interruptAtStep?: number;
  } = {},
  /** Options that other commands add (`lora`). */
  extra: Partial<TrainOptions> = {},
): Promise<number> {
  const opts = { ...trainOptionsFrom(kind, args), ...extra };
  // Under mpirun/srun every rank joins (libmpi through FFI); alone, nothing is loaded.
  // Each rank's GPU is chosen before any adapter is requested (TRAINER_GPUS).
  const gpuPick = applyGpuForRank(detectLaunch(Deno.env));
  const comm = openCommunicator();
  const parallel = comm.size > 1 ? new DataParallel(comm) : undefined;
  const print = comm.rank === 0 ? (io.print ?? ((line: string) => console.log(line))) : () => {}; // rank 0 speaks for the run
  try {
    return await trainOnDevice(kind, opts, { ...io, print, parallel, gpuPick });
  } catch (e) {
    // One rank's error ends every rank at once, rather than leaving them waiting.
    if (parallel && e instanceof UserError) {
      comm.abort(
        `trainer ${extra.lora ? "lora" : kind} (rank ${comm.rank} of ${comm.size}): ${e.message}`,
        e.exitCode,
      );
    }
    throw e;
  } finally {
    await comm.finalize();
  }
}

async function trainOnDevice(
  kind: Kind,
  opts: TrainOptions,
  io: {
    print: (line: string) => void;
    gpu?: Gpu;
    interruptAtStep?: number;
    parallel?: DataParallel;
    /** The DRI_PRIME value this rank selected its GPU with, if any. */
    gpuPick?: string;
  },
): Promise<number> {
  const { print, parallel } = io;
  const gpu = io.gpu ?? await Gpu.request();
  if (parallel) {
    // Every rank names its adapter once (stderr for ranks > 0), so two ranks sharing a GPU show.
    const line = `rank ${parallel.comm.rank} of ${parallel.comm.size} (local rank ${
      parallel.comm.localRank ?? "?"
    }) on ${gpu.adapterSummary.name}${io.gpuPick ? ` (DRI_PRIME=${io.gpuPick})` : ""}`;
    if (parallel.comm.rank === 0) print(line);
    else console.error(`trainer ${kind}: ${line}`);
  }
  try {
    const prepared = await prepareRun(opts, {
      gpu,
      print,
      worldSize: parallel?.comm.size ?? 1,
    });
    let interrupted = false;
    const onSignal = () => {
      if (interrupted) Deno.exit(130); // a second Ctrl-C: stop now
      interrupted = true;
      print("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to stop at once)");
    };
    // Ctrl-C on mpirun reaches the ranks as SIGTERM (Open MPI does not forward
    // SIGINT), and `kill -USR2 <mpirun>` is forwarded as it is: all three mean
    // "stop after this step" under MPI (docs/distributed.md).
    const signals: Deno.Signal[] = parallel ? ["SIGINT", "SIGTERM", "SIGUSR2"] : ["SIGINT"];
    const listening: Deno.Signal[] = [];
    try {
      for (const signal of signals) {
        try {
          Deno.addSignalListener(signal, onSignal);
          listening.push(signal);
        } catch { /* no such signal here (Windows): it just ends the process */ }
      }
      const { status } = await runPrepared(prepared, {
        gpu,
        print,
        interrupted: () => interrupted,
        interruptAtStep: io.interruptAtStep,
        parallel,
      });
      return status;
    } finally {
      for (const signal of listening) Deno.removeSignalListener(signal, onSignal);
    }
  } finally {
    if (!io.gpu) gpu.destroy();
  }
}

function trainCommand(kind: Kind): CommandSpec {
  return {
    name: kind,
    summary: kind === "pretrain"
      ? "Pretrain a model by next-token prediction on plain text"
      : kind === "dpo"
      ? "Preference-tune a model with DPO on chosen/rejected answer pairs"
      : "Fine-tune a model on conversations, with the loss on assistant tokens only",
    usage: "[options]",
    description: kind === "pretrain"
      ? `With no options, trains the tiny preset on the embedded corpus with the embedded tokenizer into ${TRAIN_DEFAULTS.pretrain.out}. --steps 0 writes the initialized model and exits. Documents are packed into full windows (--packing pad: one padded document per row, as MiniMind does). Ctrl-C saves a checkpoint and exits 130; --resume continues it.`
      : kind === "dpo"
      ? `Direct Preference Optimization, as MiniMind's train_dpo.py: with no options, starts from ${TRAIN_DEFAULTS.sft.out}, keeps a frozen copy of it as the reference, and trains on the embedded preference pairs (about the embedded corpus's valley: short correct answers chosen over wrong or rambling ones) into ${TRAIN_DEFAULTS.dpo.out}. Both answers of a pair are rendered with the chat template; only assistant tokens count. The loss is -log sigmoid(beta ((log p - log p_ref)(chosen) - (log p - log p_ref)(rejected))), log p summed over a sequence's assistant tokens; the log line shows the reward margin and the share of pairs whose chosen reward is higher. Ctrl-C saves a checkpoint and exits 130; --resume continues it (the reference checkpoint must be unchanged). Not yet: data-parallel DPO over MPI, token shards as DPO data.`
      : `With no options, starts from ${TRAIN_DEFAULTS.pretrain.out} and trains on the embedded conversations into ${TRAIN_DEFAULTS.sft.out}. Each conversation is rendered with the tokenizer's chat template; only assistant turns (through <|im_end|>) are trained. MiniMind's tool-call and reasoning records (tools on the system message, tool_calls, reasoning_content, tool turns) are rendered as MiniMind's SFTDataset renders them: an assistant's tool calls are trained, tool results are not. MiniMind's random augmentations are off unless --sft-system-ratio / --sft-empty-think-keep are given. Ctrl-C saves a checkpoint and exits 130; --resume continues it.`,
    options: trainOptions(kind),
    config: true,
    run: (args) => runTraining(kind, args),
  };
}

/** `trainer pretrain`. */
export const pretrainCommand: CommandSpec = trainCommand("pretrain");
/** `trainer sft`. */
export const sftCommand: CommandSpec = trainCommand("sft");
/** `trainer dpo`. */
export const dpoCommand: CommandSpec = trainCommand("dpo");
