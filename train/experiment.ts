/**
 * `trainer experiment`: why LLMs are trained in two stages, measured.
 *
 * Four arms on the embedded corpus, each training stage with the same budget
 * (steps, batch, sequence length):
 *
 * - A: pretrain only (next-token prediction on the prose);
 * - B: SFT only, from random weights (`sft --init none`);
 * - C: pretrain, then SFT: A's checkpoint fine-tuned with B's SFT budget, so
 *   C = A + one SFT stage and A's pretraining is not paid for twice;
 * - D: as C, but pretrained on prose that states each fact once (one
 *   document per entity and language, one phrasing, one order) instead of
 *   the paraphrased prose, for the same number of steps: what knowledge
 *   augmentation (Allen-Zhu & Li, Physics of Language Models, Part 3.1,
 *   arXiv:2309.14316) does for answering questions.
 *
 * Every arm then answers the held-out questions of the corpus (the facts of
 * the towns, people and animals that no SFT conversation asks about, stated
 * only in the pretraining prose), greedily, from
 * the chat template with the generation prompt. Per arm: the share of replies
 * in the assistant format (`replyFormat`) and the share that state the fact
 * (`statesFact`). The table, three sample replies per arm and the settings go
 * to the terminal and to a Markdown report, and on request to a JSON file
 * (`experimentJson`).
 *
 * The evaluation functions are pure (text in, verdict out), live in
 * `experiment_score.ts` and are re-exported here.
 *
 * @module
 */
import { dirname, join } from "node:path";
import { Gpu } from "../kernels/runtime.ts";
import { loadCheckpoint } from "../io/checkpoint.ts";
import { InferenceModel } from "../model/inference.ts";
import { generate } from "../model/generate.ts";
import { GREEDY } from "../model/sampling.ts";
import {
  DEFAULT_CORPUS_SEED,
  DEFAULT_TOKENIZER_VOCAB_SIZE,
  defaultTokenizer,
  embeddedCorpus,
  type HeldOutFact,
  writeEmbeddedCorpus,
} from "../data/corpus.ts";
import {
  type ArmResult,
  type ArmSummary,
  augmentationLine,
  chanceShare,
  CHATML_SPECIAL_TOKENS,
  type ExperimentJson,
  experimentJson,
  type ExperimentSettings,
  formatTable,
  MAX_ANSWER_SENTENCES,
  percent,
  replyFormat,
  sampleIndices,
  showReply,
  type StageLosses,
  statesFact,
  summarizeArm,
} from "./experiment_score.ts";
import { TextTokenizer } from "../data/tokenizer.ts";
import { trainedRowLength } from "../data/stream.ts";
import { UsageError, UserError } from "../util/errors.ts";
import { defaultLr, prepareRun, TRAIN_DEFAULTS, type TrainOptions } from "./setup.ts";
import { readModelConfigFile } from "../io/model_config.ts";
import { runPrepared } from "./run.ts";
import { formatDuration } from "./progress.ts";
import { readMetrics } from "./metrics.ts";
import { parameterCount, presetConfig } from "../model/config.ts";

export * from "./experiment_score.ts";

// ---------------------------------------------------------------------------
// The command.
// ---------------------------------------------------------------------------

/** Defaults of `trainer experiment`. */
export const EXPERIMENT_DEFAULTS = {
  out: "out/experiment",
  /** Report file name inside `--out` when `--report` is not given. */
  reportName: "experiment.md",
  preset: "tiny",
  // The default commands' budgets: arm C is `deno task pretrain` then `deno task sft`
  // (with SFT rows as long as the longest conversation needs, `trainedRowLength`).
  stepsPretrain: TRAIN_DEFAULTS.pretrain.steps,
  stepsSft: TRAIN_DEFAULTS.sft.steps,
  batchSize: TRAIN_DEFAULTS.pretrain.batchSize,
  seqLen: TRAIN_DEFAULTS.pretrain.seqLen,
  maxNewTokens: 48,
  seed: TRAIN_DEFAULTS.seed,
} as const;

/** What the experiment runs; absent fields take `EXPERIMENT_DEFAULTS`. */
export interface ExperimentOptions {
  /** Model shape by preset name, or ... */
  preset?: string;
  /** ... from a model config file (as `pretrain --model-config`). */
  modelConfig?: string;
  /** Pretraining steps of A and of D's pretraining (and so of C and D). */
  stepsPretrain?: number;
  /** SFT steps of B, C and D. */
  stepsSft?: number;
  batchSize?: number;
  seqLen?: number;
  /** Ask only the first N held-out questions (default all). */
  questions?: number;
  maxNewTokens?: number;
  seed?: number;
  /** Skip arm D and its pretraining (the augmentation comparison). */
  noAugmentation?: boolean;
  /** Directory of the checkpoints and the corpus. */
  out?: string;
  /** Where the Markdown report goes (default `<out>/experiment.md`). */
  report?: string;
  /** Where the JSON record goes (`experimentJson`); none when absent. */
  json?: string;
  /** The command line, as the report shows it (default: `trainer experiment`). */
  command?: string;
}

/** Where the commands print; tests replace it. */
export interface ExperimentIo {
  /** Lines of progress and results (default: stdout). */
  print?: (line: string) => void;
  /** A device to use for every arm and for generation (default: one `Gpu.request()`). */
  gpu?: Gpu;
}

/** What `runExperiment` measured. */
export interface ExperimentResult {
  summaries: ArmSummary[];
  arms: ArmResult[];
  /** The Markdown report as written. */
  report: string;
  reportPath: string;
  /** The JSON record (also written to `json` when asked). */
  json: ExperimentJson;
  /** Wall time of the whole experiment (training, generation, report). */
  seconds: number;
}

/**
 * The 1-minute load average (`Deno.loadavg`, which needs `--allow-sys=loadavg`;
 * `deno task experiment` grants it), else undefined.
 */
function loadAverage(): number | undefined {
  try {
    // Query first: never prompt for the permission in a terminal.
    if (Deno.permissions.querySync({ name: "sys", kind: "loadavg" }).state !== "granted") {
      return undefined;
    }
    const first = Deno.loadavg()[0];
    return Number.isFinite(first) ? first : undefined;
  } catch {
    return undefined;
  }
}

async function stageLosses(path: string): Promise<StageLosses | undefined> {
  const records = await readMetrics(path);
  const train = records.filter((r) => r.split === "train");
  const evals = records.filter((r) => r.split === "eval");
  if (train.length === 0) return undefined;
  return {
    firstStep: train[0].step,
    first: train[0].loss,
    last: train[train.length - 1].loss,
    eval: evals.length > 0 ? evals[evals.length - 1].loss : undefined,
  };
}

/** Each reply beside its question, with its format and fact verdicts. */
function judgeReplies(
  facts: readonly HeldOutFact[],
  replies: readonly string[],
  specialTokens: readonly string[],
): ArmResult["replies"] {
  return replies.map((reply, i) => ({
    fact: facts[i],
    reply,
    format: replyFormat(reply, specialTokens),
    correct: statesFact(reply, facts[i].answer, specialTokens),
  }));
}

/** Asks `facts` of the checkpoint in `dir` greedily; returns each reply with special tokens kept. */
async function askAll(
  gpu: Gpu,
  dir: string,
  facts: readonly HeldOutFact[],
  maxNewTokens: number,
): Promise<{ replies: string[]; specialTokens: string[] }> {
  const ckpt = await loadCheckpoint(dir);
  const tokenizer = TextTokenizer.fromJson(
    ckpt.tokenizer.tokenizerJson,
    ckpt.tokenizer.tokenizerConfigJson,
    ckpt.source,
  );
  const specialTokens = CHATML_SPECIAL_TOKENS.filter((t) => tokenizer.tokenToId(t) !== undefined);
  // Any special token ends the reply: after `<|im_end|>` the turn is over, and
  // after `<|im_start|>` / `<|endoftext|>` the verdict is already "new-turn".
  const stopIds = specialTokens.map((t) => tokenizer.tokenToId(t)!);
  for (const id of ckpt.generation.eosIds ?? [ckpt.special.eos]) {
    if (!stopIds.includes(id)) stopIds.push(id);
  }
  const prompts = facts.map((f) =>
    tokenizer.encode(
      tokenizer.applyChatTemplate([{ role: "user", content: f.question }], {
        addGenerationPrompt: true,
      }),
    )
  );
  const maxPos = ckpt.config.max_position_embeddings;
  const longest = Math.max(...prompts.map((p) => p.length));
  if (longest + maxNewTokens > maxPos) {
    throw new UserError(
      `a held-out question is ${longest} tokens; with --max-new-tokens ${maxNewTokens} that exceeds the model's context of ${maxPos} (max_position_embeddings)`,
    );
  }
  const model = await InferenceModel.create(gpu, ckpt.config, ckpt.params, {
    capacity: longest + maxNewTokens,
  });
  try {
    const replies: string[] = [];
    for (const prompt of prompts) {
      const r = await generate(model, prompt, { maxNewTokens, sampling: GREEDY, stopIds });
      replies.push(tokenizer.decode(r.ids, { skipSpecialTokens: false }));
    }
    return { replies, specialTokens };
  } finally {
    model.destroy();
  }
}

/** One training stage of the experiment. */
interface Stage {
  /** The arm it ends (and is asked), or undefined for D's pretraining. */
  arm?: string;
  /** Name in the progress output. */
  name: string;
  label: string;
  options: TrainOptions;
}

/** The first `count` held-out questions (default: all), checked. */
function heldOutQuestions(count: number | undefined): HeldOutFact[] {
  const all = embeddedCorpus().heldOut;
  const n = count ?? all.length;
  if (!Number.isInteger(n) || n < 1 || n > all.length) {
    throw new UsageError(`--questions must be a whole number from 1 to ${all.length}, got ${n}`);
  }
  return all.slice(0, n);
}

/** Runs the experiment with injectable output; resolves to the results. */
export async function runExperiment(
  opts: ExperimentOptions,
  io: ExperimentIo = {},
): Promise<ExperimentResult> {
  const print = io.print ?? ((line: string) => console.log(line));
  if (opts.preset !== undefined && opts.modelConfig !== undefined) {
    throw new UsageError("give --preset or --model-config, not both");
  }
  const d = EXPERIMENT_DEFAULTS;
  const stepsPretrain = opts.stepsPretrain ?? d.stepsPretrain;
  const stepsSft = opts.stepsSft ?? d.stepsSft;
  const batchSize = opts.batchSize ?? d.batchSize;
  const seqLen = opts.seqLen ?? d.seqLen;
  const maxNewTokens = opts.maxNewTokens ?? d.maxNewTokens;
  const seed = opts.seed ?? d.seed;
  for (
    const [name, v] of Object.entries({ stepsPretrain, stepsSft, batchSize, seqLen, maxNewTokens })
  ) {
    if (!Number.isInteger(v) || v < 1) {
      throw new UsageError(`experiment: ${name} must be a whole number >= 1, got ${v}`);
    }
  }
  const out = (opts.out ?? d.out).replace(/\/+$/, "");
  const reportPath = opts.report ?? join(out, d.reportName);
  const modelConfig = opts.modelConfig;
  const preset = opts.preset ?? d.preset;

  const facts = heldOutQuestions(opts.questions);

  const started = performance.now();
  const date = new Date();
  const loadAtStart = loadAverage();
  const gpu = io.gpu ?? await Gpu.request();
  try {
    const adapter = gpu.adapterSummary;
    const adapterName = `${adapter.name}${adapter.isFallback ? " (CPU fallback)" : ""}${
      adapter.backend ? `, ${adapter.backend}` : ""
    }`;
    const shape: Pick<TrainOptions, "preset" | "modelConfig"> = modelConfig !== undefined
      ? { modelConfig }
      : { preset };
    // Every stage names its data: the embedded corpus, written once here.
    const corpusDir = join(out, "data");
    const { files } = await writeEmbeddedCorpus(corpusDir).catch((e) => {
      throw new UserError(
        `cannot write the embedded corpus to ${corpusDir}: ${(e as Error).message}`,
      );
    });
    const pretrainData = { data: [files.pretrain], evalData: [files.pretrainEval] };
    const onceData = { data: [files.pretrainOnce], evalData: [files.pretrainEval] };
    const sftData = { data: [files.sft], evalData: [files.sftEval] };
    // SFT rows only as long as the longest conversation needs: past its last
    // trained token a row is padding that a causal model never looks back at,
    // so shorter rows give the same losses and gradients (up to the order of
    // sums over rows) in less time.
    const sftSeqLen = await trainedRowLength({
      data: [files.sft, files.sftEval],
      kind: "sft",
      tokenizer: defaultTokenizer(),
      batchSize: 64,
      seqLen,
    });
    // One held-out evaluation and one save per stage, at its end: the report
    // reads the last evaluation, and the stages are rerun, not resumed.
    const common = (steps: number, out: string, lr: number, rows = seqLen) => ({
      steps,
      batchSize,
      seqLen: rows,
      seed,
      lr,
      out,
      evalEvery: steps,
      saveEvery: steps,
    });
    const dirs = {
      A: join(out, "A-pretrain"),
      B: join(out, "B-sft-only"),
      C: join(out, "C-pretrain-sft"),
      onceA: join(out, "D-pretrain-once"),
      D: join(out, "D-pretrain-once-sft"),
    };
    // Learning rates: the commands' defaults for what each stage is. A and B
    // both start from random weights, so both train at the from-scratch
    // (pretraining) rate; C's SFT fine-tunes a trained model at the lower SFT
    // rate, as MiniMind does. A fine-tuning rate would handicap B, which has
    // everything (language and format) to learn from its budget.
    // A model of the tiny preset's shape takes its own rates (`TINY_LR`).
    const config = modelConfig !== undefined
      ? (await readModelConfigFile(modelConfig)).config
      : presetConfig(preset);
    config.vocab_size = DEFAULT_TOKENIZER_VOCAB_SIZE;
    const lrScratch = defaultLr("pretrain", config);
    const lrFinetune = defaultLr("sft", config);
    const stages: Stage[] = [
      {
        arm: "A",
        name: "arm A",
        label: "pretrain only",
        options: {
          kind: "pretrain",
          ...shape,
          ...pretrainData,
          ...common(stepsPretrain, dirs.A, lrScratch),
        },
      },
      {
        arm: "B",
        name: "arm B",
        label: "SFT only, random init",
        options: {
          kind: "sft",
          ...shape,
          ...sftData,
          ...common(stepsSft, dirs.B, lrScratch, sftSeqLen),
          init: null,
        },
      },
      {
        arm: "C",
        name: "arm C",
        label: "pretrain + SFT",
        // The shape comes from A's checkpoint.
        options: {
          kind: "sft",
          ...sftData,
          ...common(stepsSft, dirs.C, lrFinetune, sftSeqLen),
          init: dirs.A,
        },
      },
    ];
    if (!opts.noAugmentation) {
      stages.push(
        {
          name: "arm D, pretraining",
          label: "pretrain on facts stated once",
          options: {
            kind: "pretrain",
            ...shape,
            ...onceData,
            ...common(stepsPretrain, dirs.onceA, lrScratch),
          },
        },
        {
          arm: "D",
          name: "arm D",
          label: "pretrain (each fact stated once) + SFT",
          options: {
            kind: "sft",
            ...sftData,
            ...common(stepsSft, dirs.D, lrFinetune, sftSeqLen),
            init: dirs.onceA,
          },
        },
      );
    }

    const trainSeconds: Record<string, number> = {};
    const losses: Record<string, StageLosses | undefined> = {};
    let parameters = 0;
    for (const stage of stages) {
      const data = stage.options.data!.map((f) => f.split("/").pop()).join(", ");
      print(`\n== ${stage.name}: ${stage.label} (${stage.options.kind} on ${data}) ==`);
      const t0 = performance.now();
      const tag = stage.arm ?? "D0";
      const armIo = { gpu, print: (line: string) => print(`  [${tag}] ${line}`) };
      const prepared = await prepareRun(stage.options, armIo);
      parameters = parameterCount(prepared.run.model).total;
      const { status } = await runPrepared(prepared, armIo);
      if (status !== 0) {
        throw new UserError(`${stage.name} stopped before its last step (exit ${status})`);
      }
      trainSeconds[tag] = (performance.now() - t0) / 1000;
      losses[tag] = await stageLosses(join(stage.options.out!, "metrics.jsonl"));
    }

    print(
      `\n== asking ${facts.length} held-out questions (greedy, at most ${maxNewTokens} new tokens) ==`,
    );
    const arms: ArmResult[] = [];
    for (const stage of stages) {
      if (stage.arm === undefined) continue;
      const dir = stage.options.out!;
      const t0 = performance.now();
      const { replies, specialTokens } = await askAll(gpu, dir, facts, maxNewTokens);
      arms.push({
        arm: stage.arm,
        label: stage.label,
        dir,
        trainSeconds: trainSeconds[stage.arm],
        losses: losses[stage.arm],
        replies: judgeReplies(facts, replies, specialTokens),
      });
      print(
        `  [${stage.arm}] ${facts.length} replies in ${
          formatDuration((performance.now() - t0) / 1000)
        }`,
      );
    }

    const summaries = arms.map(summarizeArm);
    const table = formatTable(summaries);
    const chance = chanceShare(facts);
    const samples = sampleIndices(facts);
    print("\n" + table + "\n");
    print(`a uniform guess of the right kind would state the fact in ${percent(chance)}`);
    const augmentation = augmentationLine(summaries);
    if (augmentation) print(augmentation);
    for (const i of samples) {
      print(`Q (${facts[i].language}): ${facts[i].question}   [answer: ${facts[i].answer}]`);
      for (const a of arms) {
        const r = a.replies[i];
        print(`  ${a.arm}: ${showReply(r.reply)}   (${r.format}${r.correct ? ", correct" : ""})`);
      }
    }

    const seconds = (performance.now() - started) / 1000;
    const loadAtEnd = loadAverage();
    const command = opts.command ?? "trainer experiment";
    const settings: ExperimentSettings = {
      model: { ...(modelConfig !== undefined ? { modelConfig } : { preset }), parameters },
      stepsPretrain,
      stepsSft,
      batchSize,
      seqLen,
      sftSeqLen,
      seed,
      corpusSeed: DEFAULT_CORPUS_SEED,
      lrScratch,
      lrFinetune,
      maxNewTokens,
      questions: facts.length,
      heldOutTotal: embeddedCorpus().heldOut.length,
    };
    const json = experimentJson({
      command,
      date,
      adapter: adapterName,
      seconds,
      loadAtStart,
      loadAtEnd,
      settings,
      facts,
      arms,
    });
    const report = renderReport({
      command,
      date,
      seconds,
      adapterName,
      shape: modelConfig !== undefined ? `--model-config ${modelConfig}` : `--preset ${preset}`,
      parameters,
      stepsPretrain,
      stepsSft,
      batchSize,
      seqLen,
      sftSeqLen,
      seed,
      lrScratch,
      lrFinetune,
      maxNewTokens,
      questions: facts.length,
      heldOutTotal: embeddedCorpus().heldOut.length,
      out,
      arms,
      summaries,
      table,
      chance,
      augmentation,
      samples,
      onceSeconds: trainSeconds["D0"],
      loadAtStart,
      loadAtEnd,
    });
    await Deno.mkdir(dirname(reportPath), { recursive: true });
    await Deno.writeTextFile(reportPath, report);
    if (opts.json !== undefined) {
      await Deno.mkdir(dirname(opts.json), { recursive: true });
      await Deno.writeTextFile(opts.json, JSON.stringify(json, null, 2) + "\n");
    }
    print(
      `\nexperiment done in ${formatDuration(seconds)}; report: ${reportPath}${
        opts.json !== undefined ? `; JSON: ${opts.json}` : ""
      }`,
    );
    return { summaries, arms, report, reportPath, json, seconds };
  } finally {
    if (!io.gpu) gpu.destroy();
  }
}

/** What `askCheckpoints` asks. */
export interface AskOptions {
  /** Checkpoint directories, each asked every question. */
  dirs: string[];
  /** Ask only the first N held-out questions (default all). */
  questions?: number;
  maxNewTokens?: number;
  /** Where the JSON record goes; none when absent. */
  json?: string;
}

/**
 * Asks trained checkpoints the held-out questions, with no training: the
 * scoring of the experiment applied to any model (e.g. `out/sft` after the
 * default `deno task pretrain` and `deno task sft`). Prints the table; the
 * JSON record, when asked, has one entry per directory under `arms`.
 */
export async function askCheckpoints(
  opts: AskOptions,
  io: ExperimentIo = {},
): Promise<{ summaries: ArmSummary[]; arms: ArmResult[] }> {
  const print = io.print ?? ((line: string) => console.log(line));
  if (opts.dirs.length === 0) throw new UsageError("--ask needs a checkpoint directory");
  const maxNewTokens = opts.maxNewTokens ?? EXPERIMENT_DEFAULTS.maxNewTokens;
  const facts = heldOutQuestions(opts.questions);
  const started = performance.now();
  const gpu = io.gpu ?? await Gpu.request();
  try {
    const arms: ArmResult[] = [];
    for (const dir of opts.dirs) {
      const t0 = performance.now();
      const { replies, specialTokens } = await askAll(gpu, dir, facts, maxNewTokens);
      arms.push({
        arm: dir,
        label: "asked only",
        dir,
        trainSeconds: 0,
        replies: judgeReplies(facts, replies, specialTokens),
      });
      print(
        `[${dir}] ${facts.length} replies in ${formatDuration((performance.now() - t0) / 1000)}`,
      );
    }
    const summaries = arms.map(summarizeArm);
    print("\n" + formatTable(summaries) + "\n");
    print(
      `a uniform guess of the right kind would state the fact in ${percent(chanceShare(facts))}`,
    );
    if (opts.json !== undefined) {
      const adapter = gpu.adapterSummary;
      const json = {
        command: `trainer experiment --ask ${opts.dirs.join(" --ask ")}`,
        date: new Date().toISOString().replace(/\.\d+Z$/, "Z"),
        adapter: adapter.name,
        seconds: Math.round((performance.now() - started) / 100) / 10,
        maxNewTokens,
        questions: facts.length,
        heldOutTotal: embeddedCorpus().heldOut.length,
        chance: chanceShare(facts),
        arms: Object.fromEntries(
          summaries.map((s) => [s.arm, {
            format: s.formatShare,
            fact: s.factShare,
            both: s.bothShare,
            questions: s.questions,
            verdicts: s.verdicts,
          }]),
        ),
      };
      await Deno.mkdir(dirname(opts.json), { recursive: true });
      await Deno.writeTextFile(opts.json, JSON.stringify(json, null, 2) + "\n");
    }
    return { summaries, arms };
  } finally {
    if (!io.gpu) gpu.destroy();
  }
}

interface ReportInput {
  command: string;
  date: Date;
  seconds: number;
  adapterName: string;
  shape: string;
  parameters: number;
  stepsPretrain: number;
  stepsSft: number;
  batchSize: number;
  seqLen: number;
  sftSeqLen: number;
  seed: number;
  lrScratch: number;
  lrFinetune: number;
  maxNewTokens: number;
  questions: number;
  heldOutTotal: number;
  out: string;
  arms: ArmResult[];
  summaries: ArmSummary[];
  table: string;
  chance: number;
  augmentation?: string;
  samples: number[];
  /** Seconds of D's pretraining, when it ran. */
  onceSeconds?: number;
  loadAtStart?: number;
  loadAtEnd?: number;
}

const STAGE_OF: Record<string, string> = {
  A: "pretrain",
  B: "SFT from random weights",
  C: "SFT from A",
  D: "SFT from D's pretraining",
};

function renderReport(r: ReportInput): string {
  const lines: string[] = [];
  const load = r.loadAtStart !== undefined
    ? ` The machine's 1-minute load average was ${r.loadAtStart.toFixed(2)} at the start and ${
      r.loadAtEnd?.toFixed(2) ?? "?"
    } at the end (other processes on the same CPU slow the run down).`
    : "";
  const hasD = r.arms.some((a) => a.arm === "D");
  const times = r.arms.map((a) =>
    `${
      a.arm === "A" ? "training A" : a.arm === "C" ? "C's SFT" : a.arm === "D" ? "D's SFT" : a.arm
    } ${formatDuration(a.trainSeconds)}`
  );
  if (r.onceSeconds !== undefined) times.push(`D's pretraining ${formatDuration(r.onceSeconds)}`);
  lines.push(
    "# Pretraining vs SFT: the experiment",
    "",
    "Written by `trainer experiment` from the run described below; the numbers are what the run",
    "measured. Rerun it to reproduce (same seed, same device: same numbers).",
    "",
    "## Setup",
    "",
    `${
      hasD ? "Four" : "Three"
    } arms, each training stage with the same budget, on the embedded corpus:`,
    "",
    "- **A**: pretrain only (next-token prediction on the prose).",
    "- **B**: SFT only, from random weights (`trainer sft --init none`).",
    "- **C**: pretrain, then SFT: A's checkpoint fine-tuned with the same SFT budget as B.",
    ...(hasD
      ? [
        "- **D**: as C, but pretrained (same steps) on prose that states each fact once: one",
        "  document per entity and language, every fact in one fixed phrasing and order",
        "  (`pretrain_once.jsonl`). A's prose states every fact in every document, each time in a",
        "  phrasing drawn from five or six and in a shuffled order: the knowledge augmentation",
        "  of Allen-Zhu & Li, *Physics of Language Models, Part 3.1* (arXiv:2309.14316).",
      ]
      : []),
    "",
    `Each arm is then asked ${r.questions} held-out questions${
      r.questions < r.heldOutTotal ? ` (the first ${r.questions} of ${r.heldOutTotal})` : ""
    }: facts stated in the pretraining prose`,
    "and never asked in the SFT data, in English and Chinese. The prompt is the question as a user",
    "turn rendered with the chat template plus the generation prompt (`<|im_start|>assistant\\n`);",
    `replies are greedy, at most ${r.maxNewTokens} new tokens, and end at any special token.`,
    "",
    "- **assistant format**: the reply ends with `<|im_end|>` within the budget, has no other",
    "  special token inside (no new `<|im_start|>` turn or document), says something (a letter or digit), does not open",
    "  with a role name line (`user`, `assistant`, `system`), is not a question (the user's side",
    `  continued) and has at most ${MAX_ANSWER_SENTENCES} sentences (longer is a document continued: the SFT replies`,
    "  are one sentence, the pretraining documents three or more). `replyFormat` in",
    "  [train/experiment.ts](../train/experiment.ts) is the exact rule; the last column counts",
    "  each verdict.",
    "- **states the fact**: the expected answer appears in the reply's text before its first",
    "  special token, compared after NFKC, lower-casing and punctuation removal: as whole words",
    "  in English, as a substring in Chinese (`statesFact`).",
    "- **both**: a correct answer in the assistant format.",
    "",
    "## Results",
    "",
    r.table,
    "",
    `Chance: a uniform guess among the distinct values that the asked attribute takes in the world's`,
    `facts would state the fact in ${percent(r.chance)} of these questions.`,
    ...(r.augmentation
      ? ["", `Knowledge augmentation: ${r.augmentation.replace(/^knowledge augmentation: /, "")}.`]
      : []),
    "",
    "Training (cross-entropy per target token; SFT counts assistant tokens only):",
    "",
    "| arm | last stage | steps | train loss | held-out loss | time |",
    "|---|---|---:|---|---:|---:|",
    ...r.arms.map((a) => {
      const l = a.losses;
      const steps = a.arm === "A" ? r.stepsPretrain : r.stepsSft;
      const train = l ? `${l.first.toFixed(2)} (step ${l.firstStep}) -> ${l.last.toFixed(2)}` : "-";
      const held = l?.eval !== undefined ? l.eval.toFixed(2) : "-";
      return `| ${a.arm} | ${STAGE_OF[a.arm] ?? a.arm} | ${steps} | ${train} | ${held} | ${
        formatDuration(a.trainSeconds)
      } |`;
    }),
    "",
    "A's held-out loss is on fresh prose (`pretrain_eval.jsonl`), B's, C's and D's on",
    "conversations never trained on (`sft_eval.jsonl`): compare B, C and D, not with A.",
    "",
    "## Sample replies",
    "",
    "The same questions for every arm; replies as generated, special tokens shown, newlines as `\\n`.",
    "",
  );
  for (const i of r.samples) {
    const fact = r.arms[0].replies[i].fact;
    lines.push(
      `**Q (${fact.language}): ${fact.question}** (expected: ${fact.answer})`,
      "",
    );
    for (const a of r.arms) {
      const rep = a.replies[i];
      lines.push(
        `- **${a.arm}**, ${a.label}: \`${
          showReply(rep.reply).replace(/`/g, "'")
        }\` — ${rep.format}${rep.correct ? ", states the fact" : ""}`,
      );
    }
    lines.push("");
  }
  lines.push(
    "## Run",
    "",
    "```",
    r.command,
    "```",
    "",
    `- date: ${r.date.toISOString().replace(/\.\d+Z$/, "Z")}`,
    `- adapter: ${r.adapterName}`,
    `- run time: ${formatDuration(r.seconds)} in all (${
      times.join(", ")
    }; the rest is generation).${load}`,
    `- model: ${r.shape} (${(r.parameters / 1e6).toFixed(2)}M parameters); seed ${r.seed}`,
    `- budget per stage: pretraining ${r.stepsPretrain} steps of ${r.batchSize} x ${r.seqLen} tokens, SFT ${r.stepsSft} steps of ${r.batchSize} x ${r.sftSeqLen}${
      r.sftSeqLen < r.seqLen
        ? ` (rows as long as the longest SFT conversation needs, ${r.sftSeqLen} of at most ${r.seqLen}: the rest of a row would be padding after its last trained token, which changes the losses and gradients only in the rounding of sums)`
        : ""
    }; held-out loss evaluated once, at the end of each stage`,
    `- learning rates (peak, cosine to x${TRAIN_DEFAULTS.minLrRatio}): pretraining and B's SFT ${r.lrScratch} (from random weights), C's${
      hasD ? " and D's" : ""
    } SFT ${r.lrFinetune} (fine-tuning at a lower rate; MiniMind's full SFT uses 1e-5)`,
    `- checkpoints: ${r.arms.map((a) => a.dir).join(", ")}${
      hasD ? `, ${r.out}/D-pretrain-once` : ""
    } (each with metrics.jsonl and loss.svg); the corpus in ${r.out}/data`,
    "",
  );
  return lines.join("\n");
}
