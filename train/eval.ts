/**
 * Evaluation: the mean masked next-token loss of a model, over a training
 * stream's batches (`evaluate`, the in-training eval on packed windows) or
 * over JSONL lines each taken as its own sequence (`evaluateLines`,
 * `trainer eval`).
 *
 * Unlike training, where documents are packed into windows, every line of
 * `evaluateLines` is its own sequence, so the figure does not depend on how
 * lines happen to pack: a pretrain line is `bos, tokens..., eos` truncated to
 * its first seq_len + 1 tokens (every target counts); an SFT line is its
 * rendered conversation with the assistant mask (only assistant tokens
 * count). Rows are batched B at a time and padded with mask 0.
 *
 * @module
 */
import type { TrainingModel } from "../model/train_model.ts";
import type { DpoStats } from "../model/preference.ts";
import { emptyBatch, setRow } from "../data/batch.ts";
import { documentTokens } from "../data/pretrain.ts";
import { assistantMask, fitSftSample } from "../data/sft.ts";
import { type DataKind, readJsonlLines, readRecords } from "../data/sources.ts";
import type { DataStream } from "../data/stream.ts";
import type { TextTokenizer } from "../data/tokenizer.ts";
import { UserError } from "../util/errors.ts";

/** What `trainer eval --json` prints. */
export interface EvalReport {
  /** Mean loss over every counted target (nats). */
  loss: number;
  perplexity: number;
  /** Targets counted. */
  tokens: number;
  /** Lines evaluated (SFT lines with nothing to train are skipped). */
  sequences: number;
}

/** Mean masked loss over one pass of `stream` (closed afterwards). */
export async function evaluate(model: TrainingModel, stream: DataStream): Promise<number> {
  let lossSum = 0;
  let count = 0;
  try {
    for (let batch = await stream.next(); batch; batch = await stream.next()) {
      const r = await model.evalLoss(batch);
      lossSum += r.lossSum;
      count += r.count;
    }
  } finally {
    stream.close();
  }
  if (count === 0) throw new UserError("the eval data has no token to evaluate");
  return lossSum / count;
}

/**
 * DPO figures over one pass of `stream` (pairs; closed afterwards): the mean
 * loss, rewards and accuracy over every counted pair.
 */
export async function evaluateDpo(
  model: TrainingModel,
  stream: DataStream,
  beta: number,
): Promise<DpoStats> {
  const sum = { loss: 0, chosenReward: 0, rejectedReward: 0, accuracy: 0 };
  let pairs = 0;
  try {
    for (let batch = await stream.next(); batch; batch = await stream.next()) {
      const r = await model.dpoEval(batch, beta);
      sum.loss += r.loss;
      sum.chosenReward += r.chosenReward;
      sum.rejectedReward += r.rejectedReward;
      sum.accuracy += r.accuracy;
      pairs += r.pairs;
    }
  } finally {
    stream.close();
  }
  if (pairs === 0) throw new UserError("the eval data has no preference pair to evaluate");
  return {
    loss: sum.loss / pairs,
    chosenReward: sum.chosenReward / pairs,
    rejectedReward: sum.rejectedReward / pairs,
    accuracy: sum.accuracy / pairs,
  };
}

/** Detects a JSONL file's kind from its first non-blank line: `conversations` means SFT. */
async function detectKind(file: string): Promise<DataKind> {
  for await (const line of readJsonlLines(file)) {
    if (line.text.trim() === "") continue;
    try {
      const rec = JSON.parse(line.text);
      return rec && typeof rec === "object" && "conversations" in rec ? "sft" : "pretrain";
    } catch {
      return "pretrain"; // the reader reports the bad line with its number
    }
  }
  return "pretrain";
}

/** Evaluates `model` on `files` (JSONL), `batchSize` rows at a time. */
export async function evaluateLines(
  model: TrainingModel,
  tokenizer: TextTokenizer,
  files: string[],
  opts: { batchSize: number; seqLen: number; kind?: DataKind; skipBadLines?: boolean },
): Promise<EvalReport> {
  const { batchSize: B, seqLen: T } = opts;
  let batch = emptyBatch(B, T, tokenizer.padId);
  let rows = 0;
  let lossSum = 0;
  let count = 0;
  let sequences = 0;
  const flush = async () => {
    if (rows === 0) return;
    const r = await model.evalLoss(batch);
    lossSum += r.lossSum;
    count += r.count;
    batch = emptyBatch(B, T, tokenizer.padId);
    rows = 0;
  };
  for (const file of files) {
    const kind = opts.kind ?? await detectKind(file);
    for await (const rec of readRecords(file, kind, { skipBadLines: opts.skipBadLines })) {
      if (rec.kind === "pretrain") {
        const doc = documentTokens(tokenizer, rec.text).slice(0, T + 1);
        if (doc.length < 2) continue;
        setRow(batch, rows, { ids: doc }, tokenizer.padId);
      } else {
        const { ids: all, mask: m } = assistantMask(tokenizer, rec.messages, rec.tools);
        const s = fitSftSample(all, m, T, tokenizer.padId);
        if (!s) continue;
        setRow(batch, rows, s, tokenizer.padId);
      }
      rows++;
      sequences++;
      if (rows === B) await flush();
    }
  }
  await flush();
  if (count === 0) throw new UserError("the data has no token to evaluate");
  const loss = lossSum / count;
  return { loss, perplexity: Math.exp(loss), tokens: count, sequences };
}
