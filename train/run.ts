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

/** How the user is told and asked. */
export interface RunIo {
  gpu: Gpu;
  /** Lines for the user (progress, summaries). */
  print: (line: string) => void;
  /** Set by Ctrl-C; the loop saves and stops after the current step. */
  interrupted?: () => boolean;
  /** Tests: behave as if Ctrl-C came during this step. */
  interruptAtStep?: number;
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
      `${kind}: ${describeModel(run.model)} (${
        (parameterCount(run.model).total / 1e6).toFixed(2)
      }M parameters) on ${adapter.name}${adapter.isFallback ? " (CPU fallback)" : ""}`,
    );
    print(
      `${
        prepared.resumed ? `resuming at step ${start.step} of ${run.steps}` : `${run.steps} steps`
      }, batch ${run.batchSize} x ${run.seqLen} x accum ${run.accum}, lr ${run.lr} (cosine to x${run.minLrRatio}), into ${out}`,
    );
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
    });
    const stats = train.stats;
    if (stats.skippedLines > 0) {
      print(`skipped ${stats.skippedLines} malformed lines (--skip-bad-lines)`);
    }
    if (stats.skippedConversations > 0) {
      print(
        `skipped ${stats.skippedConversations} conversations with no assistant token left after truncation to ${run.seqLen}`,
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
