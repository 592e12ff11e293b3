/**
 * `trainer eval`: mean next-token loss and perplexity of a model on JSONL data.
 *
 * Unlike training, where documents are packed into windows, every line here is
 * its own sequence, so the figure does not depend on how lines happen to pack:
 * a pretrain line is `bos, tokens..., eos` truncated to its first seq_len + 1
 * tokens (every target counts); an SFT line is its rendered conversation with
 * the assistant mask (only assistant tokens count). Rows are batched B at a
 * time and padded with mask 0.
 */
import { Gpu } from "../kernels/runtime.ts";
import { loadCheckpoint } from "../model/checkpoint.ts";
import { GpuModel } from "../model/gpu_model.ts";
import { documentTokens } from "../data/pretrain.ts";
import { assistantMask, fitSftSample } from "../data/sft.ts";
import { type DataKind, readJsonlLines, readRecords, resolveDataPaths } from "../data/sources.ts";
import { TextTokenizer } from "../data/tokenizer.ts";
import {
  type CommandSpec,
  flagOption,
  listOption,
  numberOption,
  type ParsedArgs,
  stringOption,
} from "../util/cli.ts";
import { UsageError, UserError } from "../util/errors.ts";

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
  model: GpuModel,
  tokenizer: TextTokenizer,
  files: string[],
  opts: { batchSize: number; seqLen: number; kind?: DataKind; skipBadLines?: boolean },
): Promise<EvalReport> {
  const { batchSize: B, seqLen: T } = opts;
  const ids = new Int32Array(B * T);
  const targets = new Int32Array(B * T);
  const mask = new Float32Array(B * T);
  let rows = 0;
  let lossSum = 0;
  let count = 0;
  let sequences = 0;
  const flush = async () => {
    if (rows === 0) return;
    ids.fill(tokenizer.padId, rows * T);
    targets.fill(tokenizer.padId, rows * T);
    mask.fill(0, rows * T);
    const r = await model.evalLoss({ ids, targets, mask });
    lossSum += r.lossSum;
    count += r.count;
    rows = 0;
  };
  for (const file of files) {
    const kind = opts.kind ?? await detectKind(file);
    for await (const rec of readRecords(file, kind, { skipBadLines: opts.skipBadLines })) {
      let row: { ids: ArrayLike<number>; mask?: ArrayLike<number>; length: number };
      if (rec.kind === "pretrain") {
        const doc = documentTokens(tokenizer, rec.text).slice(0, T + 1);
        if (doc.length < 2) continue;
        row = { ids: doc, length: doc.length };
      } else {
        const { ids: all, mask: m } = assistantMask(tokenizer, rec.messages);
        const s = fitSftSample(all, m, T, tokenizer.padId);
        if (!s) continue;
        row = { ids: s.ids, mask: s.mask, length: s.length };
      }
      const o = rows * T;
      for (let t = 0; t < T; t++) {
        const inRange = t + 1 < row.length;
        ids[o + t] = t < row.length ? row.ids[t] : tokenizer.padId;
        targets[o + t] = inRange ? row.ids[t + 1] : tokenizer.padId;
        mask[o + t] = inRange ? (row.mask ? (row.mask[t + 1] ? 1 : 0) : 1) : 0;
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

async function runEval(args: ParsedArgs): Promise<number> {
  const dir = stringOption(args, "model");
  if (!dir) throw new UsageError("--model DIR is required");
  const data = listOption(args, "data");
  if (data.length === 0) throw new UsageError("--data PATH is required");
  const resolved = await resolveDataPaths(data);
  if (resolved.format !== "jsonl") {
    throw new UserError(
      "trainer eval reads JSONL files (each line its own sequence), not token shards",
    );
  }
  const ckpt = await loadCheckpoint(dir);
  const tokenizer = TextTokenizer.fromJson(
    ckpt.tokenizer.tokenizerJson,
    ckpt.tokenizer.tokenizerConfigJson,
    dir,
  );
  const seqLen = numberOption(args, "seq-len", Math.min(512, ckpt.config.max_position_embeddings), {
    integer: true,
    min: 1,
    max: ckpt.config.max_position_embeddings,
  });
  const batchSize = numberOption(args, "batch-size", 8, { integer: true, min: 1 });
  const kindFlag = flagOption(args, "sft") ? "sft" : undefined;
  const gpu = await Gpu.request();
  try {
    const model = await GpuModel.create(gpu, ckpt.config, {
      batchSize,
      seqLen,
      params: ckpt.params,
    });
    try {
      const r = await evaluateLines(model, tokenizer, resolved.files, {
        batchSize,
        seqLen,
        kind: kindFlag,
        skipBadLines: flagOption(args, "skip-bad-lines"),
      });
      if (flagOption(args, "json")) console.log(JSON.stringify(r));
      else {
        console.log(
          `loss ${r.loss.toFixed(4)}  perplexity ${
            r.perplexity.toFixed(2)
          }  (${r.tokens} tokens in ${r.sequences} sequences, seq-len ${seqLen}, ${ckpt.source})`,
        );
      }
      return 0;
    } finally {
      model.destroy();
    }
  } finally {
    gpu.destroy();
  }
}

/** `trainer eval`. */
export const evalCommand: CommandSpec = {
  name: "eval",
  summary: "Mean next-token loss and perplexity of a model on JSONL data",
  usage: "--model DIR --data PATH... [options]",
  description:
    'Each line is its own sequence: a {"text"} line is bos, tokens..., eos, truncated to its first seq-len + 1 tokens, and every target counts; a {"conversations"} line is rendered with the chat template and only assistant tokens count. The kind is detected per file from its first line. (The eval loss printed during training is measured on packed windows of the same kind of data, so the two figures differ slightly.)',
  options: {
    model: { type: "string", valueName: "DIR", help: "checkpoint or Hugging Face model directory" },
    data: { type: "string", multiple: true, valueName: "PATH", help: "JSONL files, dirs or globs" },
    "seq-len": {
      type: "string",
      valueName: "N",
      help: "truncate each line to N + 1 tokens (default min(512, max_position_embeddings))",
    },
    "batch-size": { type: "string", valueName: "B", help: "sequences per batch (default 8)" },
    sft: { type: "boolean", help: "read every file as conversations (default: detect)" },
    "skip-bad-lines": { type: "boolean", help: "count and skip malformed lines" },
    json: {
      type: "boolean",
      help: 'print {"loss", "perplexity", "tokens", "sequences"} as one JSON object',
    },
  },
  run: runEval,
};
