/**
 * `trainer eval`: mean next-token loss and perplexity of a model on JSONL
 * data, each line its own sequence (see `train/eval.ts`).
 *
 * @module
 */
import { Gpu } from "../kernels/runtime.ts";
import { loadGenerationModel } from "../infer/session.ts";
import { modelFrom, STATE_DICT_OPTIONS } from "./generate.ts";
import { TrainingModel } from "../model/train_model.ts";
import { resolveDataPaths } from "../data/sources.ts";
import { evaluateLines } from "../train/eval.ts";
import {
  type CommandSpec,
  flagOption,
  listOption,
  numberOption,
  type ParsedArgs,
  stringOption,
} from "./args.ts";
import { UsageError, UserError } from "../util/errors.ts";
import { loadAdapter } from "../io/peft.ts";

async function runEval(args: ParsedArgs): Promise<number> {
  if (!stringOption(args, "model")) throw new UsageError("--model PATH is required");
  const data = listOption(args, "data");
  if (data.length === 0) throw new UsageError("--data PATH is required");
  const resolved = await resolveDataPaths(data);
  if (resolved.format !== "jsonl") {
    throw new UserError(
      "trainer eval reads JSONL files (each line its own sequence), not token shards",
    );
  }
  const { path, opts } = modelFrom(args);
  // The adapter is not folded in here: eval runs it unmerged (below).
  const { ckpt, tokenizer } = await loadGenerationModel(path, { ...opts, adapter: undefined });
  for (const line of ckpt.notes) console.error(`${ckpt.source}: ${line}`);
  const seqLen = numberOption(args, "seq-len", Math.min(512, ckpt.config.max_position_embeddings), {
    integer: true,
    min: 1,
    max: ckpt.config.max_position_embeddings,
  });
  const batchSize = numberOption(args, "batch-size", 8, { integer: true, min: 1 });
  // An adapter runs unmerged: the model adds its low-rank delta on the GPU.
  const adapterDir = stringOption(args, "adapter");
  const adapter = adapterDir ? await loadAdapter(adapterDir, ckpt.config) : undefined;
  const kindFlag = flagOption(args, "sft") ? "sft" : undefined;
  const gpu = await Gpu.request();
  try {
    const model = await TrainingModel.create(gpu, ckpt.config, {
      batchSize,
      seqLen,
      params: ckpt.params,
      ...(adapter ? { lora: adapter.lora, adapter: adapter.tensors } : {}),
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
          }  (${r.tokens} tokens in ${r.sequences} sequences, seq-len ${seqLen}, ${ckpt.source}${
            adapterDir ? ` + adapter ${adapterDir}` : ""
          })`,
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
  usage: "--model PATH --data PATH... [options]",
  description:
    'Each line is its own sequence: a {"text"} line is bos, tokens..., eos, truncated to its first seq-len + 1 tokens, and every target counts; a {"conversations"} line is rendered with the chat template and only assistant tokens count. The kind is detected per file from its first line. Bos, eos and the chat template come from the tokenizer, as in training. (The eval loss printed during training is measured on packed windows of the same kind of data, so the two figures differ slightly.)',
  options: {
    model: {
      type: "string",
      valueName: "PATH",
      help:
        "checkpoint or Hugging Face model directory, or a PyTorch .pth state dict as MiniMind saves",
    },
    ...STATE_DICT_OPTIONS,
    adapter: {
      type: "string",
      valueName: "DIR",
      help: "a LoRA adapter (PEFT format) trained on --model, run unmerged",
    },
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
