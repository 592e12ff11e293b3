/**
 * The training loop: one loop for pretrain and SFT; they differ in their data
 * and loss mask. Reads top to bottom like the seed's pseudo-code:
 *
 *   for step in 1..steps:
 *     lr = cosineWithWarmup(step)
 *     batches = accum micro-batches from the data stream
 *     model.forwardBackward(batches)   // loss and gradients on the GPU
 *     optimizer.step(lr)               // global norm, clip, AdamW on the GPU
 *     log / eval / save when due
 *
 * with the data, schedule, logging and checkpointing as small helpers around
 * it. Nothing model-sized crosses to the CPU during a step; the loss is read
 * back only when it is logged.
 */
import type { Packing } from "../data/pretrain.ts";
import type { SftAugmentation } from "../data/sft_augment.ts";
import type { Gpu } from "../kernels/runtime.ts";
import type { ModelConfig } from "../model/config.ts";
import { trainFlopsPerToken } from "../model/config.ts";
import { TrainingModel } from "../model/train_model.ts";
import type { DpoStats } from "../model/preference.ts";
import { DEFAULT_SAMPLING } from "../model/sampling.ts";
import { AdamW, type AdamWState } from "../optim/adamw.ts";
import { cosineWithWarmup } from "../optim/schedule.ts";
import { type CheckpointContents, saveCheckpoint } from "../io/checkpoint.ts";
import type { DataPosition, DataStream } from "../data/stream.ts";
import type { TextTokenizer } from "../data/tokenizer.ts";
import { UserError } from "../util/errors.ts";
import { evaluate, evaluateDpo } from "./eval.ts";
import { type EvalMetrics, MetricsWriter, readMetrics, type TrainMetrics } from "./metrics.ts";
import { lossPlotSvg } from "./plot.ts";
import { Progress } from "./progress.ts";
import { DataParallel } from "./distributed.ts";
import { describeLoraRun, type LoraRun } from "./lora.ts";
import { saveAdapter } from "../io/peft.ts";

/** Every setting of a run; saved in `trainer_state.json` so a resume can check it. */
export interface RunConfig {
  /** Which training this is: pretraining, supervised fine-tuning or preference optimization. */
  kind: "pretrain" | "sft" | "dpo";
  /** The model's shape (Hugging Face config fields). */
  model: ModelConfig;
  /** Optimizer steps the run trains for in all (a resume continues up to it). */
  steps: number;
  /** Rows per micro-batch on each rank (DPO: preference pairs, 2 rows each). */
  batchSize: number;
  /** Tokens per row. */
  seqLen: number;
  /** Micro-batches accumulated into each optimizer step (at least 1). */
  accum: number;
  /** Peak learning rate, reached after the warmup. */
  lr: number;
  /** The cosine schedule's final rate as a share of `lr` (0 to 1; 1: constant). */
  minLrRatio: number;
  /** Steps of linear warmup from 0 to `lr` (0: none). */
  warmupSteps: number;
  /** AdamW's decoupled weight decay. */
  weightDecay: number;
  /** AdamW's first-moment decay rate (below 1). */
  beta1: number;
  /** AdamW's second-moment decay rate (below 1). */
  beta2: number;
  /** AdamW's epsilon, added to the root of the second moment. */
  adamEps: number;
  /** Clip the gradients' global L2 norm to this (0: no clipping). */
  gradClip: number;
  /** Random seed: data order, initial weights, LoRA adapter (default 42). */
  seed: number;
  /** Log the training loss every this many steps (and at the last). */
  logEvery: number;
  /** Evaluate on `evalData` every this many steps (and at the last). */
  evalEvery: number;
  /** Save a checkpoint every this many steps (and at the last, or on interrupt). */
  saveEvery: number;
  /** Output directory: checkpoint (or adapter), `metrics.jsonl`, `loss.svg`. */
  out: string;
  /** Held-out data evaluated during the run (kept so a resume evaluates the same). */
  evalData: string[];
  /**
   * Data-parallel ranks (absent: 1). `batchSize` is per rank; a step trains
   * on `worldSize * batchSize` rows, the global batch the data stream yields.
   */
  worldSize?: number;
  /** Pretrain rows: packed windows or padded documents (absent: pack). */
  packing?: Packing;
  /** SFT: MiniMind's augmentations (absent: none). */
  sftAugment?: SftAugmentation;
  /** Low-rank adapters on a frozen base (`trainer lora`); absent: every weight trains. */
  lora?: LoraRun;
  /** DPO: β of the loss. */
  beta?: number;
  /** DPO: the frozen reference (the starting checkpoint) and its weights' sha256. */
  reference?: { path: string; sha256: string };
}

/** What `trainer_state.json` holds. */
export interface TrainerState {
  /** Format version of the file (1). */
  version: 1;
  /** Optimizer steps completed. */
  step: number;
  /** Tokens consumed (inputs of all micro-batches). */
  tokens: number;
  /** The run's settings, checked on resume. */
  run: RunConfig;
  /** Where the training stream continues. */
  data: DataPosition;
  /** Training seconds so far (for ETA and tokens/s across a resume). */
  elapsed_s: number;
}

/** Where a run starts from. */
export interface RunStart {
  /** The model's parameters by name (the base's, for a LoRA run). */
  params: Map<string, Float32Array>;
  /** A LoRA run's adapter on resume (absent: a fresh adapter from the seed). */
  adapter?: Map<string, Float32Array>;
  /** AdamW's moments after `step` updates (resume); fresh zeros otherwise. */
  optimizer?: AdamWState;
  /** Steps already done (0 for a fresh run). */
  step: number;
  /** Tokens consumed before this start (0 for a fresh run). */
  tokens: number;
  /** Training seconds before this start (0 for a fresh run). */
  elapsed_s: number;
  /** DPO: the frozen reference model's parameters. */
  reference?: Map<string, Float32Array>;
}

/** What the loop needs besides the run config. */
export interface TrainContext {
  /** The device the run trains on. */
  gpu: Gpu;
  /** Encodes the data and is saved into the checkpoints. */
  tokenizer: TextTokenizer;
  /** The training stream, positioned where the run continues. */
  train: DataStream;
  /** Opens a fresh pass over the held-out data, or undefined when there is none. */
  openEval?: () => Promise<DataStream>;
  /** Where the run starts: weights, optimizer state, counters. */
  start: RunStart;
  /** FP32 peak of the adapter in FLOP/s, when known (for MFU). */
  peakFlops?: number;
  /** Lines for the user (progress, summaries). */
  print?: (line: string) => void;
  /** Set by Ctrl-C; the loop saves and stops after the current step. */
  interrupted?: () => boolean;
  /** Tests: behave as if Ctrl-C came during this step. */
  interruptAtStep?: number;
  /**
   * Data parallelism over MPI ranks (train/distributed.ts): the stream yields
   * global batches, this rank trains on its rows, gradients are summed over
   * the ranks; rank 0 alone logs, evaluates and saves. Absent: one process.
   */
  parallel?: DataParallel;
}

/** How a run ended. */
export interface TrainResult {
  /** Optimizer steps completed at the end (including those before a resume). */
  steps: number;
  /** Losses of the logged steps, in order. */
  losses: { step: number; loss: number }[];
  /** Loss of the first logged step (absent when none was logged). */
  firstLoss?: number;
  /** Loss of the last logged step (absent when none was logged). */
  lastLoss?: number;
  /** Held-out loss of the last evaluation (absent when none ran). */
  evalLoss?: number;
  /** Whether the run stopped early on Ctrl-C (or `interruptAtStep`). */
  interrupted: boolean;
  /** Training seconds in all, including those before a resume. */
  elapsed_s: number;
  /** Tokens per second of this session's training (excluding time before a resume). */
  tokensPerSecond: number;
  /** DPO: the figures of the first and last logged steps and of the last evaluation. */
  dpo?: { first?: DpoStats; last?: DpoStats; eval?: DpoStats };
}

/** Runs `run.steps` optimizer steps from `ctx.start`; saves checkpoints into `run.out`. */
export async function trainLoop(run: RunConfig, ctx: TrainContext): Promise<TrainResult> {
  const print = ctx.print ?? ((line: string) => console.log(line));
  const dpo = run.kind === "dpo";
  if (dpo && !ctx.start.reference) throw new Error("a DPO run needs its reference parameters");
  const model = await TrainingModel.create(ctx.gpu, run.model, {
    // DPO: batchSize counts pairs, each a chosen and a rejected row.
    batchSize: dpo ? 2 * run.batchSize : run.batchSize,
    seqLen: run.seqLen,
    params: ctx.start.params,
    ...(run.lora ? { lora: run.lora.config, adapter: ctx.start.adapter, seed: run.seed } : {}),
    ...(dpo ? { reference: ctx.start.reference } : {}),
  });
  let optimizer: AdamW | undefined;
  try {
    optimizer = await AdamW.create(ctx.gpu, model.trainable(), {
      beta1: run.beta1,
      beta2: run.beta2,
      eps: run.adamEps,
      weightDecay: run.weightDecay,
      gradClip: run.gradClip,
    }, { steps: ctx.start.step });
    if (ctx.start.optimizer) optimizer.setState(ctx.start.optimizer, ctx.start.step);
    if (run.lora) print(describeLoraRun(run.model, run.lora, optimizer.gpuBytes));
    return await loop(run, ctx, model, optimizer, print);
  } finally {
    optimizer?.destroy();
    model.destroy();
  }
}

async function loop(
  run: RunConfig,
  ctx: TrainContext,
  model: TrainingModel,
  optimizer: AdamW,
  print: (line: string) => void,
): Promise<TrainResult> {
  const dp = ctx.parallel;
  // Rank 0 alone writes files and evaluates; every rank trains.
  const writer = (dp?.comm.rank ?? 0) === 0;
  const metricsPath = `${run.out}/metrics.jsonl`;
  const metrics = writer
    ? await MetricsWriter.open(metricsPath, {
      keepThroughStep: ctx.start.step > 0 ? ctx.start.step : undefined,
    })
    : undefined;
  const dpo = run.kind === "dpo";
  // DPO: a batch of B pairs is 2B rows.
  const globalRows = run.batchSize * (run.worldSize ?? 1) * (dpo ? 2 : 1);
  const tokensPerStep = globalRows * run.seqLen * run.accum;
  // Only rank 0 shows progress (its live line writes to the terminal itself).
  const progress = new Progress(run.steps, print, writer ? undefined : false);
  const schedule = {
    lr: run.lr,
    steps: run.steps,
    warmupSteps: run.warmupSteps,
    minLrRatio: run.minLrRatio,
  };
  // DPO adds the reference's forward, 2 of the 6 FLOP per parameter and token
  // (and a second head matmul, not counted).
  const flopsPerStep = trainFlopsPerToken(run.model, run.seqLen) * tokensPerStep *
    (dpo ? 4 / 3 : 1);

  let step = ctx.start.step;
  let tokens = ctx.start.tokens;
  const losses: { step: number; loss: number }[] = [];
  let evalLoss: number | undefined;
  const dpoResult: NonNullable<TrainResult["dpo"]> = {};
  let interrupted = false;
  let lastGoodStep = step;
  const t0 = performance.now();
  const elapsed = () => ctx.start.elapsed_s + (performance.now() - t0) / 1000;
  let windowStart = { time: performance.now(), tokens };

  const save = async (): Promise<void> => {
    if (!writer) {
      lastGoodStep = step;
      return;
    }
    const state: TrainerState = {
      version: 1,
      step,
      tokens,
      run,
      data: ctx.train.position(),
      elapsed_s: elapsed(),
    };
    const tokenizerFiles = {
      tokenizerJson: ctx.tokenizer.tokenizerJson,
      tokenizerConfigJson: ctx.tokenizer.tokenizerConfigJson,
    };
    if (run.lora) {
      // A PEFT adapter directory (the base stays where it is).
      await saveAdapter(run.out, run.model, {
        lora: run.lora.config,
        tensors: await model.getAdapter(),
        baseModel: run.lora.base,
        tokenizer: tokenizerFiles,
        optimizer: await optimizer.getState(),
        state: state as unknown as Record<string, unknown>,
      });
      await writePlot(run);
      lastGoodStep = step;
      return;
    }
    const contents: CheckpointContents = {
      config: run.model,
      params: await model.getParameters(),
      tokenizer: tokenizerFiles,
      special: {
        bos: ctx.tokenizer.bosId,
        eos: ctx.tokenizer.eosId,
        pad: ctx.tokenizer.padId,
      },
      optimizer: await optimizer.getState(),
      state: state as unknown as Record<string, unknown>,
      // What `trainer generate` samples with by default, so Transformers does the same.
      sampling: { temperature: DEFAULT_SAMPLING.temperature, top_p: DEFAULT_SAMPLING.topP },
    };
    await saveCheckpoint(run.out, contents);
    await writePlot(run);
    lastGoodStep = step;
  };

  /** Stops the run on a non-finite loss, keeping the last good checkpoint. */
  const checkFinite = (loss: number, where: string, atStep = step) => {
    if (Number.isFinite(loss)) return;
    progress.clear();
    throw new UserError(
      `the ${where} loss became ${loss} at step ${atStep}: training diverged. ` +
        (lastGoodStep > 0 || ctx.start.step > 0
          ? `The last good checkpoint (step ${lastGoodStep}) is kept in ${run.out}. `
          : "No checkpoint was written. ") +
        "Try a lower --lr, a longer --warmup-steps, or --grad-clip 1.",
    );
  };

  /** Records a logged step: metrics line, progress, the loss history. */
  const logStep = async (
    at: { step: number; lr: number; tokens: number },
    loss: number,
    gradNorm: number,
    stats?: DpoStats,
  ): Promise<void> => {
    checkFinite(loss, "training", at.step);
    if (stats) {
      dpoResult.first ??= stats;
      dpoResult.last = stats;
    }
    const now = performance.now();
    const dt = (now - windowStart.time) / 1000;
    const tokensPerSecond = dt > 0 ? (at.tokens - windowStart.tokens) / dt : 0;
    windowStart = { time: now, tokens: at.tokens };
    losses.push({ step: at.step, loss });
    const record: TrainMetrics = {
      step: at.step,
      split: "train",
      loss,
      lr: at.lr,
      grad_norm: gradNorm,
      tokens: at.tokens,
      tokens_per_s: tokensPerSecond,
      elapsed_s: elapsed(),
      ...(dp ? { allreduce_ms: dp.lastReduce.ms } : {}),
      ...(stats ? rewardFields(stats) : {}),
    };
    await metrics?.write(record);
    const flopsPerSecond = (tokensPerSecond / tokensPerStep) * flopsPerStep;
    progress.update({
      step: at.step,
      loss,
      lr: at.lr,
      tokensPerSecond,
      mfu: ctx.peakFlops ? flopsPerSecond / ctx.peakFlops : undefined,
      gflops: flopsPerSecond / 1e9,
      elapsed_s: elapsed() - ctx.start.elapsed_s,
      stepsDone: at.step - ctx.start.step,
      extra: stats ? formatRewards(stats) : undefined,
    });
  };
  let pendingLog: Promise<void> | undefined;
  const flushLog = async (): Promise<void> => {
    const p = pendingLog;
    pendingLog = undefined;
    await p;
  };

  if (run.steps === 0 || step >= run.steps) {
    await save();
    return {
      steps: step,
      losses,
      interrupted: false,
      elapsed_s: elapsed(),
      tokensPerSecond: 0,
    };
  }

  while (step < run.steps) {
    const lr = cosineWithWarmup(schedule, step + 1);
    const micro = [];
    for (let i = 0; i < run.accum; i++) {
      const batch = await ctx.train.next();
      if (!batch) break;
      micro.push(batch);
    }
    if (micro.length === 0) break; // --epochs reached: the data ended
    if (dpo) {
      model.dpoForwardBackward(micro, run.beta!);
    } else if (dp) {
      // This rank's rows, the loss over every rank's; then the sum over ranks.
      const maskTotal = DataParallel.maskTotal(micro);
      model.forwardBackward(micro.map((b) => dp.localBatch(b)), { maskTotal, dropoutStep: step });
      await dp.reduce(model);
    } else {
      model.forwardBackward(micro, { dropoutStep: step });
    }
    optimizer.step(lr);
    step++;
    tokens += micro.length * globalRows * run.seqLen;
    // The previous log step's figures: its GPU work is done or nearly, and
    // this step is queued behind it, so the GPU does not wait for the CPU.
    await flushLog();

    const last = step === run.steps;
    let stop = (ctx.interrupted?.() ?? false) || step === ctx.interruptAtStep;
    // Every rank stops at the same step when any rank was asked to.
    if (dp) stop = await dp.comm.agree(stop);
    const evalDue = writer && ctx.openEval !== undefined && (step % run.evalEvery === 0 || last);
    const saveDue = step % run.saveEvery === 0 || last || stop;
    if (step % run.logEvery === 0 || last || stop) {
      // Loss and gradient norm in one copy, mapped while the next step runs.
      const at = { step, lr, tokens };
      pendingLog = Promise.all([
        ctx.gpu.readScalars([model.lossCell, optimizer.gradNormSquaredCell]),
        dpo ? model.readDpoStats() : undefined,
      ]).then(([[loss, normSquared], stats]) => logStep(at, loss, Math.sqrt(normSquared), stats));
      if (last || stop || evalDue || saveDue) await flushLog();
    }
    if (ctx.openEval && evalDue && dpo) {
      const r = await evaluateDpo(model, await ctx.openEval(), run.beta!);
      evalLoss = r.loss;
      dpoResult.eval = r;
      checkFinite(evalLoss, "eval");
      const record: EvalMetrics = {
        step,
        split: "eval",
        loss: r.loss,
        tokens,
        elapsed_s: elapsed(),
        ...rewardFields(r),
      };
      await metrics?.write(record);
      progress.note(`eval at step ${step}: loss ${r.loss.toFixed(4)}, ${formatRewards(r)}`);
    } else if (ctx.openEval && evalDue) {
      evalLoss = await evaluate(model, await ctx.openEval());
      checkFinite(evalLoss, "eval");
      const record: EvalMetrics = {
        step,
        split: "eval",
        loss: evalLoss,
        perplexity: Math.exp(evalLoss),
        tokens,
        elapsed_s: elapsed(),
      };
      await metrics?.write(record);
      progress.note(
        `eval at step ${step}: loss ${evalLoss.toFixed(4)}, perplexity ${
          Math.exp(evalLoss).toFixed(2)
        }`,
      );
    }
    if (saveDue) {
      // A save writes the weights only after the loss they produced is known
      // to be finite, so the checkpoint on disk is always a good one.
      checkFinite(await model.readLoss(), "training");
      checkFinite(await optimizer.readGradNorm(), "gradient norm of the training");
      await save();
      windowStart = { time: performance.now(), tokens };
    }
    if (stop) {
      interrupted = true;
      break;
    }
  }
  await flushLog();
  progress.clear();
  const totalTime = elapsed() - ctx.start.elapsed_s;
  return {
    steps: step,
    losses,
    firstLoss: losses[0]?.loss,
    lastLoss: losses.at(-1)?.loss,
    evalLoss,
    interrupted,
    elapsed_s: elapsed(),
    tokensPerSecond: totalTime > 0 ? (tokens - ctx.start.tokens) / totalTime : 0,
    ...(dpo ? { dpo: dpoResult } : {}),
  };
}

/** The DPO figures as `metrics.jsonl` fields. */
function rewardFields(s: DpoStats) {
  return {
    reward_chosen: s.chosenReward,
    reward_rejected: s.rejectedReward,
    reward_margin: s.chosenReward - s.rejectedReward,
    reward_accuracy: s.accuracy,
  };
}

/** `margin 0.123  acc 0.75`: the DPO figures of the progress line. */
export function formatRewards(s: DpoStats): string {
  return `margin ${(s.chosenReward - s.rejectedReward).toFixed(4)}  acc ${s.accuracy.toFixed(2)}`;
}

async function writePlot(run: RunConfig): Promise<void> {
  const records = await readMetrics(`${run.out}/metrics.jsonl`);
  const train = records.filter((r) => r.split === "train");
  const evals = records.filter((r) => r.split === "eval");
  const svg = lossPlotSvg(
    train.map((r) => ({ step: r.step, loss: r.loss })),
    evals.map((r) => ({ step: r.step, loss: r.loss })),
    `${run.lora ? "lora " : ""}${run.kind}: ${run.out}`,
  );
  const tmp = `${run.out}/loss.svg.tmp`;
  await Deno.writeTextFile(tmp, svg);
  await Deno.rename(tmp, `${run.out}/loss.svg`);
}
