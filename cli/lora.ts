/**
 * `trainer lora` (fine-tune low-rank adapters on a frozen base) and
 * `trainer lora merge` (fold an adapter into its base: a full checkpoint).
 * The run is the SFT (or, with `--text`, pretrain) run of `cli/train.ts`
 * with the adapter settings added; `train/lora.ts` holds what differs.
 *
 * @module
 */
import {
  type CommandSpec,
  flagOption,
  listOption,
  numberOption,
  type ParsedArgs,
  stringOption,
} from "./args.ts";
import { runTraining, trainOptions } from "./train.ts";
import { LORA_DEFAULTS, LORA_TARGETS, type LoraConfig, parseLoraTargets } from "../model/lora.ts";
import { LORA_RUN_DEFAULTS, writeMergedCheckpoint } from "../train/lora.ts";
import { UsageError } from "../util/errors.ts";

/** The adapter flags given (absent ones stay absent: defaults, or the saved run's on resume). */
function loraSettings(args: ParsedArgs): Partial<LoraConfig> {
  const has = (name: string) => args.values[name] !== undefined;
  const targets = listOption(args, "lora-targets").flatMap((v) => v.split(","));
  return {
    ...(has("lora-rank")
      ? { rank: numberOption(args, "lora-rank", 0, { integer: true, min: 1 }) }
      : {}),
    ...(has("lora-alpha") ? { alpha: numberOption(args, "lora-alpha", 0, { min: 0 }) } : {}),
    ...(has("lora-dropout")
      ? { dropout: numberOption(args, "lora-dropout", 0, { min: 0, max: 0.999 }) }
      : {}),
    ...(targets.length > 0 ? { targets: parseLoraTargets(targets) } : {}),
    ...(flagOption(args, "rslora") ? { rsLora: true } : {}),
  };
}

/** Runs `trainer lora` with parsed arguments (I/O injectable for tests); resolves to the exit status. */
export async function runLora(
  args: ParsedArgs,
  io: Parameters<typeof runTraining>[2] = {},
): Promise<number> {
  const kind = flagOption(args, "text") ? "pretrain" : "sft";
  const lora = loraSettings(args);
  const status = await runTraining(kind, args, io, { lora });
  const mergeOut = stringOption(args, "merge");
  if (status === 0 && mergeOut) {
    const out = stringOption(args, "out", LORA_RUN_DEFAULTS.out);
    const base = stringOption(args, "init") ?? await savedBase(out);
    await writeMergedCheckpoint(base, out, mergeOut);
    (io.print ?? console.log)(
      `merged: ${mergeOut}/ (base ${base} + adapter ${out}, Transformers-loadable)`,
    );
  }
  return status;
}

/** The base a finished run in `out` was trained on. */
async function savedBase(out: string): Promise<string> {
  const state = JSON.parse(await Deno.readTextFile(`${out}/trainer_state.json`));
  return state.run.lora.base as string;
}

function loraOptions() {
  const base = trainOptions("sft");
  delete base["preset"];
  delete base["model-config"];
  return {
    ...base,
    init: {
      type: "string" as const,
      valueName: "DIR",
      help:
        `the base checkpoint, frozen (default ${LORA_RUN_DEFAULTS.base}, as MiniMind's LoRA starts from its SFT model)`,
    },
    out: {
      type: "string" as const,
      valueName: "DIR",
      help:
        `the adapter directory (PEFT format), with metrics.jsonl and loss.svg (default ${LORA_RUN_DEFAULTS.out})`,
    },
    lr: {
      type: "string" as const,
      valueName: "LR",
      help:
        `peak learning rate (default ${LORA_RUN_DEFAULTS.lr}: adapters start at zero and take larger steps than full fine-tuning)`,
    },
    text: {
      type: "boolean" as const,
      help: 'train on plain text ({"text"} lines, every token) instead of conversations',
    },
    "lora-rank": {
      type: "string" as const,
      valueName: "R",
      help: `rank of each adapter (default ${LORA_DEFAULTS.rank})`,
    },
    "lora-alpha": {
      type: "string" as const,
      valueName: "A",
      help: `the delta is scaled by A / R (default ${LORA_DEFAULTS.alpha}, so scale 1)`,
    },
    "lora-targets": {
      type: "string" as const,
      multiple: true,
      valueName: "LIST",
      help: `projections to adapt, comma-separated, of ${LORA_TARGETS.join(",")} (default ${
        LORA_DEFAULTS.targets.join(",")
      })`,
    },
    "lora-dropout": {
      type: "string" as const,
      valueName: "P",
      help:
        "dropout on the adapters' input while training, as PEFT's lora_dropout (default 0: off)",
    },
    rslora: {
      type: "boolean" as const,
      help: "rsLoRA scaling: A / sqrt(R) instead of A / R",
    },
    merge: {
      type: "string" as const,
      valueName: "DIR",
      help:
        "after training, also write the base with the adapter folded in to DIR (a full checkpoint)",
    },
  };
}

/** `trainer lora`. */
export const loraCommand: CommandSpec = {
  name: "lora",
  summary: "Fine-tune low-rank adapters (LoRA) on a frozen model; writes a PEFT adapter",
  usage: "[options]",
  description:
    `With no options, adapts ${LORA_RUN_DEFAULTS.base} on the embedded conversations into ${LORA_RUN_DEFAULTS.out}: rank-${LORA_DEFAULTS.rank} adapters on ${
      LORA_DEFAULTS.targets.join(",")
    }, every base weight frozen (no gradients, no optimizer moments for them). The adapter is PEFT's format (adapter_config.json + adapter_model.safetensors): Python peft loads it onto the base model, and generate/chat/eval/serve take it with --model BASE --adapter DIR. Ctrl-C saves and exits 130; --resume continues exactly.`,
  options: loraOptions(),
  config: true,
  run: (args) => runLora(args),
};

async function runMerge(args: ParsedArgs): Promise<number> {
  const base = stringOption(args, "model");
  const adapter = stringOption(args, "adapter");
  const out = stringOption(args, "out");
  if (!base || !adapter || !out) {
    throw new UsageError("--model BASE, --adapter DIR and --out DIR are required");
  }
  await writeMergedCheckpoint(base, adapter, out);
  console.log(`merged: ${out}/ (base ${base} + adapter ${adapter}, Transformers-loadable)`);
  return 0;
}

/** `trainer lora merge`. */
export const loraMergeCommand: CommandSpec = {
  name: "lora merge",
  summary: "Fold a LoRA adapter into its base model: a full checkpoint",
  usage: "--model BASE --adapter DIR --out DIR",
  description:
    "Writes BASE with every adapted weight replaced by W + (alpha/r) B A (computed in float64, stored as float32), with BASE's tokenizer and generation settings. Adapters from Python peft load too (plain LoRA on q/k/v/o/gate/up/down).",
  options: {
    model: {
      type: "string",
      valueName: "BASE",
      help: "the base checkpoint the adapter was trained on",
    },
    adapter: { type: "string", valueName: "DIR", help: "the adapter directory (PEFT format)" },
    out: { type: "string", valueName: "DIR", help: "where the merged checkpoint goes" },
  },
  run: runMerge,
};
