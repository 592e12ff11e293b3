/**
 * `trainer experiment`: flags to `ExperimentOptions` (see `train/experiment.ts`
 * for what the experiment does and how replies are judged).
 *
 * @module
 */
import {
  askCheckpoints,
  EXPERIMENT_DEFAULTS,
  type ExperimentIo,
  type ExperimentResult,
  runExperiment,
} from "../train/experiment.ts";
import { embeddedCorpus } from "../data/corpus.ts";
import { UsageError } from "../util/errors.ts";
import {
  type CommandSpec,
  numberOption,
  type OptionValues,
  type ParsedArgs,
  stringOption,
} from "./args.ts";

/** `--flag value` pairs of the given options, for the report's command line. */
function commandLine(values: OptionValues): string {
  const parts = ["trainer", "experiment"];
  for (const [name, v] of Object.entries(values)) {
    if (v === undefined || v === false) continue;
    if (v === true) parts.push(`--${name}`);
    else for (const one of Array.isArray(v) ? v : [v]) parts.push(`--${name}`, quote(one));
  }
  return parts.join(" ");
}

function quote(s: string): string {
  return /^[\w./:=@%+-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

/**
 * Runs `trainer experiment` from parsed arguments; resolves to the results
 * (undefined with `--ask`, which only asks and prints).
 */
export function runExperimentCommand(
  args: ParsedArgs,
  io: ExperimentIo = {},
): Promise<ExperimentResult | undefined> {
  if (args.positionals.length > 0) {
    throw new UsageError(`unexpected argument '${args.positionals[0]}'`);
  }
  if (args.values["preset"] !== undefined && args.values["model-config"] !== undefined) {
    throw new UsageError("give --preset or --model-config, not both");
  }
  const d = EXPERIMENT_DEFAULTS;
  const int = (name: string, fallback: number, min: number, max?: number) =>
    numberOption(args, name, fallback, { integer: true, min, max });
  const heldOut = embeddedCorpus().heldOut.length;
  const ask = args.values["ask"];
  if (ask !== undefined) {
    const dirs = Array.isArray(ask) ? ask : [String(ask)];
    const training = [
      "preset",
      "model-config",
      "steps-pretrain",
      "steps-sft",
      "batch-size",
      "seq-len",
      "seed",
      "no-augmentation",
      "out",
      "report",
    ]
      .filter((k) => args.values[k] !== undefined && args.values[k] !== false);
    if (training.length > 0) {
      throw new UsageError(`--ask trains nothing; --${training[0]} does not apply to it`);
    }
    return askCheckpoints({
      dirs,
      questions: int("questions", heldOut, 1, heldOut),
      maxNewTokens: int("max-new-tokens", d.maxNewTokens, 1),
      json: stringOption(args, "json"),
    }, io).then(() => undefined);
  }
  return runExperiment({
    preset: stringOption(args, "preset"),
    modelConfig: stringOption(args, "model-config"),
    stepsPretrain: int("steps-pretrain", d.stepsPretrain, 1),
    stepsSft: int("steps-sft", d.stepsSft, 1),
    batchSize: int("batch-size", d.batchSize, 1),
    seqLen: int("seq-len", d.seqLen, 1),
    maxNewTokens: int("max-new-tokens", d.maxNewTokens, 1),
    seed: int("seed", d.seed, 0),
    questions: int("questions", heldOut, 1, heldOut),
    noAugmentation: args.values["no-augmentation"] === true,
    out: stringOption(args, "out"),
    report: stringOption(args, "report"),
    json: stringOption(args, "json"),
    command: commandLine(args.values),
  }, io);
}

/** `trainer experiment`. */
export const experimentCommand: CommandSpec = {
  name: "experiment",
  summary: "Pretrain vs SFT vs both, and paraphrased vs once-stated facts, on held-out questions",
  usage: "[options]",
  description:
    `Trains four arms on the embedded corpus with the same budget per stage: A pretrain only, B SFT only from random weights, C pretrain then SFT (A's checkpoint fine-tuned), and D as C but pretrained on prose that states each fact once instead of in several paraphrases (knowledge augmentation, Allen-Zhu & Li, Physics of Language Models, Part 3.1). Each arm answers the corpus's held-out questions (facts that only the pretraining prose states) greedily from the chat template; prints, per arm, the share of replies in the assistant format (closed with <|im_end|>, no new turn, not a question, not a document) and the share that state the fact, with three sample replies, and writes a Markdown report (to <out>/experiment.md unless --report says where) and, with --json, the numbers as JSON. See docs/experiment.md for the last measured run and its time on a 2-core CPU (Mesa lavapipe).`,
  options: {
    preset: {
      type: "string",
      valueName: "NAME",
      help:
        `model shape: tiny, minimind2-small, minimind-3 (default ${EXPERIMENT_DEFAULTS.preset})`,
    },
    "model-config": {
      type: "string",
      valueName: "FILE",
      help: "model shape from a JSON/JSONC file (as in pretrain), instead of --preset",
    },
    "steps-pretrain": {
      type: "string",
      valueName: "N",
      help:
        `pretraining steps of A and of D's pretraining (default ${EXPERIMENT_DEFAULTS.stepsPretrain})`,
    },
    "steps-sft": {
      type: "string",
      valueName: "N",
      help: `SFT steps of B, C and D (default ${EXPERIMENT_DEFAULTS.stepsSft})`,
    },
    "batch-size": {
      type: "string",
      valueName: "B",
      help: `sequences per step, every stage (default ${EXPERIMENT_DEFAULTS.batchSize})`,
    },
    "seq-len": {
      type: "string",
      valueName: "T",
      help:
        `tokens per row of the pretraining stages (default ${EXPERIMENT_DEFAULTS.seqLen}); the SFT stages' rows are as long as the longest SFT conversation needs, at most T`,
    },
    questions: {
      type: "string",
      valueName: "N",
      help: "ask only the first N held-out questions (default: all)",
    },
    "max-new-tokens": {
      type: "string",
      valueName: "N",
      help: `most tokens per reply (default ${EXPERIMENT_DEFAULTS.maxNewTokens})`,
    },
    seed: {
      type: "string",
      valueName: "N",
      help: `seed of initialization and data order (default ${EXPERIMENT_DEFAULTS.seed})`,
    },
    out: {
      type: "string",
      valueName: "DIR",
      help:
        `directory of the three checkpoints and the corpus (default ${EXPERIMENT_DEFAULTS.out})`,
    },
    ask: {
      type: "string",
      multiple: true,
      valueName: "DIR",
      help:
        "train nothing: ask this checkpoint (repeatable) the held-out questions and print its row of the table, e.g. --ask out/sft after the default pretrain and sft",
    },
    "no-augmentation": {
      type: "boolean",
      help: "skip arm D and its pretraining (the paraphrased vs once-stated comparison)",
    },
    json: {
      type: "string",
      valueName: "FILE",
      help:
        "also write the results as JSON: per arm {format, fact, both, questions} (shares 0 to 1), chance, the augmentation contrast and the run settings",
    },
    report: {
      type: "string",
      valueName: "FILE",
      help:
        `where the Markdown report goes (default <out>/${EXPERIMENT_DEFAULTS.reportName}; the project's docs/experiment.md is written with --report docs/experiment.md)`,
    },
  },
  run: async (args) => {
    await runExperimentCommand(args);
    return 0;
  },
};
