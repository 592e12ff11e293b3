/**
 * A prepared run from start to end, as the user sees it: what is trained on
 * what, the loop, and the summary (where the checkpoint is, what to run
 * next). `trainer pretrain` / `sft` and the experiment both run here.
 *
 * @module
 */
import type { Gpu } from "../kernels/runtime.ts";
import { type ModelConfig, parameterCount } from "../model/config.ts";
import { trainLoop, type TrainResult } from "./loop.ts";
import type { PreparedRun } from "./setup.ts";
import { formatDuration } from "./progress.ts";
import { formatRewards } from "./loop.ts";
import type { DataParallel } from "./distributed.ts";

/** How the user is told and asked. */
export interface RunIo {
  /** The device the run trains on. */
  gpu: Gpu;
  /** Lines for the user (progress, summaries). */
  print: (line: string) => void;
  /** Set by Ctrl-C; the loop saves and stops after the current step. */
  interrupted?: () => boolean;
  /** Tests: behave as if Ctrl-C came during this step. */
  interruptAtStep?: number;
  /** Data parallelism over MPI ranks; absent for one process. */
  parallel?: DataParallel;
}

/** The model's shape in one line. */
export function describeModel(config: ModelConfig): string {
  return `hidden ${config.hidden_size}, ${config.num_hidden_layers} layers, ${config.num_attention_heads}/${config.num_key_value_heads} heads, MLP ${config.intermediate_size}, vocab ${config.vocab_size}${
    config.qk_norm ? ", QK-norm" : ""
  }${config.tie_word_embeddings ? ", tied head" : ""}`;
}

/**
 * Trains a prepared run to its end (or Ctrl-C) and prints the summary;
 * closes its data stream. Resolves to the exit status (0 done, 130
 * interrupted) and the loop's result.
 */
export async function runPrepared(
  prepared: PreparedRun,
  io: RunIo,
): Promise<{ status: number; result: TrainResult }> {
  const { run, start, train } = prepared;
  const { print } = io;
  const { kind, out } = run;
  try {
    const adapter = io.gpu.adapterSummary;
    print(
      `${run.lora ? `lora (${kind})` : kind}: ${describeModel(run.model)} (${
        (parameterCount(run.model).total / 1e6).toFixed(2)
      }M parameters) on ${adapter.name}${adapter.isFallback ? " (CPU fallback)" : ""}`,
    );
    const ranks = io.parallel ? `${io.parallel.comm.size} ranks x ` : "";
    print(
      `${
        prepared.resumed ? `resuming at step ${start.step} of ${run.steps}` : `${run.steps} steps`
      }, batch ${ranks}${run.batchSize}${
        kind === "dpo" ? " pairs" : ""
      } x ${run.seqLen} x accum ${run.accum}, lr ${run.lr} (cosine to x${run.minLrRatio}), into ${out}`,
    );
    if (kind === "dpo") {
      print(
        `dpo: beta ${run.beta}, frozen reference ${run.reference?.path} (its log-probs computed on the GPU for every batch)`,
      );
    }
    if (io.parallel) {
      print(
        `data parallel: ${io.parallel.comm.size} ranks (${io.parallel.comm.description}); each trains on its ${run.batchSize} of the step's ${
          run.batchSize * io.parallel.comm.size
        } rows, gradients summed in rank order; rank 0 writes`,
      );
    }
    const result = await trainLoop(run, {
      gpu: io.gpu,
      tokenizer: prepared.tokenizer,
      train,
      openEval: prepared.openEval,
      start,
      peakFlops: prepared.peakFlops,
      print,
      interrupted: io.interrupted,
      interruptAtStep: io.interruptAtStep,
      parallel: io.parallel,
    });
    const stats = train.stats;
    if (stats.skippedLines > 0) {
      const named = stats.badLines ?? [];
      const more = stats.skippedLines > named.length ? ", ..." : "";
      print(
        `skipped ${stats.skippedLines} malformed line${stats.skippedLines === 1 ? "" : "s"} ` +
          `(--skip-bad-lines)${named.length > 0 ? `: ${named.join(", ")}${more}` : ""}`,
      );
    }
    if (stats.skippedConversations > 0) {
      print(
        `skipped ${stats.skippedConversations} ${
          kind === "dpo" ? "pairs" : "conversations"
        } with no assistant token left after truncation to ${run.seqLen}`,
      );
    }
    const lossLine = result.firstLoss !== undefined
      ? `loss ${result.firstLoss.toFixed(4)} -> ${result.lastLoss!.toFixed(4)}` +
        (result.evalLoss !== undefined ? `, eval loss ${result.evalLoss.toFixed(4)}` : "")
      : "";
    if (io.parallel) {
      const r = io.parallel.lastReduce;
      print(
        `all-reduce of the gradients: ${
          (r.bytes / 2 ** 20).toFixed(1)
        } MiB per step; on the last step ${r.ms.toFixed(1)} ms in MPI (${
          (r.bytes / 1e6 / (r.ms / 1000)).toFixed(0)
        } MB/s, waits for the slowest rank included), ${
          r.totalMs.toFixed(1)
        } ms with the GPU read-back and upload`,
      );
    }
    const d = result.dpo;
    if (d?.first && d.last) {
      print(
        `rewards (beta (log p - log p_ref)) on the logged training steps: ${
          formatRewards(d.first)
        } -> ${formatRewards(d.last)}${d.eval ? `; held-out pairs: ${formatRewards(d.eval)}` : ""}`,
      );
    }
    print(
      `${result.interrupted ? "stopped" : "done"} at step ${result.steps}${
        lossLine ? `: ${lossLine}` : ""
      } in ${formatDuration(result.elapsed_s - start.elapsed_s)} (${
        Math.round(result.tokensPerSecond)
      } tokens/s)`,
    );
    if (run.lora) {
      print(
        `adapter: ${out}/ (PEFT: adapter_config.json + adapter_model.safetensors on base ${run.lora.base}), metrics: ${out}/metrics.jsonl, plot: ${out}/loss.svg`,
      );
      if (result.interrupted) {
        print(`continue with: deno task lora --out ${out} --resume`);
        return { status: 130, result };
      }
      print(
        `next: deno task chat --model ${run.lora.base} --adapter ${out}   (or: deno task lora merge --model ${run.lora.base} --adapter ${out} --out DIR)`,
      );
      return { status: 0, result };
    }
    print(
      `checkpoint: ${out}/ (Transformers-loadable), metrics: ${out}/metrics.jsonl, plot: ${out}/loss.svg`,
    );
    if (result.interrupted) {
      print(`continue with: deno task ${kind} --out ${out} --resume`);
      return { status: 130, result };
    }
    print(
      kind === "pretrain"
        ? `next: deno task sft --init ${out}`
        : `next: deno task chat --model ${out}   (or: deno task generate --model ${out} --chat --prompt "...")`,
    );
    return { status: 0, result };
  } finally {
    train.close();
  }
}
