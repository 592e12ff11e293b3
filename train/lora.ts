/**
 * LoRA runs: what `prepareRun` and the loop do differently when the run
 * trains low-rank adapters on a frozen base (`trainer lora`). The data, the
 * schedule, AdamW, logging, evaluation and Ctrl-C are the full run's; here
 * are where the run starts (the base checkpoint, and on resume the adapter
 * with its optimizer moments), how it is saved (a PEFT adapter directory),
 * and what it tells the user.
 *
 * @module
 */
import { join } from "node:path";
import type { ModelConfig } from "../model/config.ts";
import { parameterCount } from "../model/config.ts";
import {
  LORA_DEFAULTS,
  type LoraConfig,
  loraLayout,
  loraParameterCount,
  mergeLora,
  validateLoraConfig,
} from "../model/lora.ts";
import { loadCheckpoint, resolveCheckpointDir, saveCheckpoint } from "../io/checkpoint.ts";
import type { SamplingDefaults } from "../io/hf_config.ts";
import { resolve } from "node:path";
import { ADAPTER_FILES, loadAdapter } from "../io/peft.ts";
import { TextTokenizer } from "../data/tokenizer.ts";
import { formatBytes } from "../kernels/runtime.ts";
import { UserError } from "../util/errors.ts";
import type { RunStart, TrainerState } from "./loop.ts";
import { exists } from "../util/fs.ts";

/** A LoRA run's settings, saved in `trainer_state.json` with the rest of the run. */
export interface LoraRun {
  /** Rank, alpha, targets. */
  config: LoraConfig;
  /** The frozen base checkpoint's directory. */
  base: string;
}

/** Defaults of `trainer lora` that differ from SFT's (MiniMind's train_lora.py starts from full_sft). */
export const LORA_RUN_DEFAULTS = { out: "out/lora", base: "out/sft", lr: 1e-3 } as const;

/** The adapter settings asked for, completed with the defaults. */
export function completeLoraConfig(asked: Partial<LoraConfig>): LoraConfig {
  const c: LoraConfig = {
    rank: asked.rank ?? LORA_DEFAULTS.rank,
    alpha: asked.alpha ?? LORA_DEFAULTS.alpha,
    dropout: asked.dropout ?? LORA_DEFAULTS.dropout,
    targets: asked.targets ?? [...LORA_DEFAULTS.targets],
    ...(asked.rsLora ? { rsLora: true } : {}),
  };
  validateLoraConfig(c, "LoRA settings");
  return c;
}

/** Where a LoRA run starts: the base weights, and the adapter (fresh, or the saved one on resume). */
export async function loraStartingPoint(
  asked: Partial<LoraConfig>,
  opts: { kind: "pretrain" | "sft"; resume: boolean; base?: string; tokenizer?: string },
  out: string,
): Promise<{
  start: RunStart;
  model: ModelConfig;
  tokenizer: TextTokenizer;
  state?: TrainerState;
  lora: LoraRun;
}> {
  if (opts.resume) {
    // After a crash mid-save the adapter may survive as `<out>.old-*`.
    const source = await resolveCheckpointDir(out).catch(() => out);
    if (!(await exists(join(source, ADAPTER_FILES.state)))) {
      throw new UserError(
        `--resume: ${out} holds no LoRA run to resume (no ${ADAPTER_FILES.state}); run without --resume first`,
      );
    }
    const state = JSON.parse(
      await Deno.readTextFile(join(source, ADAPTER_FILES.state)),
    ) as TrainerState;
    const saved = state.run?.lora;
    if (state.version !== 1 || !saved || state.run.kind !== opts.kind) {
      throw new UserError(
        `--resume: ${out}/${ADAPTER_FILES.state} is not a LoRA ${opts.kind} run of this trainer`,
      );
    }
    for (const key of ["rank", "alpha", "targets", "dropout"] as const) {
      const given = asked[key];
      if (given !== undefined && JSON.stringify(given) !== JSON.stringify(saved.config[key])) {
        throw new UserError(
          `--resume: --lora-${key} ${given} differs from the run's ${
            saved.config[key]
          }; a resumed run keeps its adapter`,
        );
      }
    }
    if (opts.base !== undefined && opts.base !== saved.base) {
      throw new UserError(
        `--resume: --init ${opts.base} differs from the run's base ${saved.base}; a resumed run keeps its base model`,
      );
    }
    const base = await loadCheckpoint(saved.base);
    const adapter = await loadAdapter(source, base.config, { resume: true });
    const tok = adapter.tokenizer ?? base.tokenizer;
    return {
      model: base.config,
      tokenizer: TextTokenizer.fromJson(tok.tokenizerJson, tok.tokenizerConfigJson, out),
      state,
      lora: saved,
      start: {
        params: base.params,
        adapter: adapter.tensors,
        optimizer: adapter.optimizer,
        step: state.step,
        tokens: state.tokens,
        elapsed_s: state.elapsed_s,
      },
    };
  }
  const baseDir = opts.base ?? LORA_RUN_DEFAULTS.base;
  if (!(await exists(baseDir))) {
    throw new UserError(
      opts.base === undefined
        ? `lora adapts out/sft, which does not exist yet: run \`deno task sft\` first, or pass --init DIR (the base checkpoint)`
        : `--init ${baseDir}: no such checkpoint directory`,
    );
  }
  const base = await loadCheckpoint(baseDir);
  const tokenizer = opts.tokenizer
    ? await TextTokenizer.load(opts.tokenizer)
    : TextTokenizer.fromJson(
      base.tokenizer.tokenizerJson,
      base.tokenizer.tokenizerConfigJson,
      baseDir,
    );
  const config = completeLoraConfig(asked);
  return {
    model: base.config,
    tokenizer,
    lora: { config, base: baseDir },
    start: { params: base.params, step: 0, tokens: 0, elapsed_s: 0 },
  };
}

/**
 * One line on what a LoRA run trains: the adapter, its parameters against
 * the model's, and the optimizer's memory against what full training holds.
 */
export function describeLoraRun(model: ModelConfig, lora: LoraRun, optimizerBytes: number): string {
  const layout = loraLayout(model, lora.config);
  const trained = loraParameterCount(layout);
  const total = parameterCount(model).total;
  const c = lora.config;
  return `LoRA r ${c.rank}, alpha ${c.alpha}${c.rsLora ? " (rsLoRA)" : ""} on ${
    c.targets.join(",")
  } of base ${lora.base}: ${trained.toLocaleString("en-US")} parameters trained (${
    (100 * trained / total).toFixed(2)
  }% of ${(total / 1e6).toFixed(2)}M, the rest frozen: no gradients, no moments); AdamW state ${
    formatBytes(optimizerBytes)
  } (full training: ${formatBytes(8 * total)} of moments + ${formatBytes(4 * total)} of gradients)`;
}

/**
 * Writes the base checkpoint `baseDir` with the adapter in `adapterDir` folded
 * in (`W + s B A`, `mergeLora`) to `out`: a full checkpoint with the base's
 * tokenizer and generation settings. Refuses to write over either input.
 */
export async function writeMergedCheckpoint(
  baseDir: string,
  adapterDir: string,
  out: string,
): Promise<void> {
  for (const [what, dir] of [["base model", baseDir], ["adapter", adapterDir]]) {
    if (resolve(out) === resolve(dir)) {
      throw new UserError(`--out ${out} is the ${what}'s directory; choose a new one`);
    }
  }
  const base = await loadCheckpoint(baseDir);
  const adapter = await loadAdapter(adapterDir, base.config);
  const g = base.generation;
  const sampling: SamplingDefaults | undefined = g.do_sample
    ? {
      temperature: g.temperature,
      top_p: g.top_p,
      top_k: g.top_k,
      max_new_tokens: g.max_new_tokens,
      repetition_penalty: g.repetition_penalty,
    }
    : undefined;
  await saveCheckpoint(out, {
    config: base.config,
    params: mergeLora(base.params, loraLayout(base.config, adapter.lora), adapter.tensors),
    tokenizer: base.tokenizer,
    special: base.special,
    sampling,
  });
}
