/**
 * Low-rank adapters in Hugging Face PEFT's format, both ways:
 *
 *   adapter_config.json          peft_type LORA, r, lora_alpha, lora_dropout,
 *                                target_modules, use_rslora, base_model_name_or_path, ...
 *   adapter_model.safetensors    base_model.model.<module>.lora_A.weight [r, in]
 *                                base_model.model.<module>.lora_B.weight [out, r]
 *
 * which `peft.PeftModel.from_pretrained(base, dir)` loads onto the base
 * model. A training run's adapter directory holds, beside these, what a
 * resume needs (`optimizer.safetensors` with the adapter's AdamW moments,
 * `trainer_state.json`) and the tokenizer files; it is written with the
 * checkpoint's atomic protocol (`replaceDirectory`).
 *
 * Adapters trained elsewhere load when they are plain LoRA on our
 * projections: the targets are read from the tensors present (so
 * `target_modules` given as a regex or `all-linear` works), every layer must
 * carry each target, and the features PEFT has beyond that (DoRA, biases,
 * per-module rank or alpha patterns, `modules_to_save`, fan-in-fan-out
 * weights) are refused by name.
 *
 * @module
 */
import { join } from "node:path";
import type { ModelConfig } from "../model/config.ts";
import {
  checkLoraTensors,
  LORA_TARGETS,
  type LoraConfig,
  loraLayout,
  type LoraTarget,
  PEFT_MODULES,
  validateLoraConfig,
} from "../model/lora.ts";
import { tensorNames } from "../model/params.ts";
import { readSafetensors, type TensorToWrite, writeSafetensors } from "./safetensors.ts";
import { jsonBytes, replaceDirectory, stateJson } from "./checkpoint.ts";
import { UserError } from "../util/errors.ts";
import { exists } from "../util/fs.ts";

/** File names of an adapter directory. */
export const ADAPTER_FILES = {
  config: "adapter_config.json",
  weights: "adapter_model.safetensors",
  optimizer: "optimizer.safetensors",
  state: "trainer_state.json",
  tokenizer: "tokenizer.json",
  tokenizerConfig: "tokenizer_config.json",
} as const;

/** What an adapter directory holds. */
export interface AdapterContents {
  /** Rank, alpha, targets. */
  lora: LoraConfig;
  /** The adapter's tensors by PEFT name. */
  tensors: Map<string, Float32Array>;
  /** `base_model_name_or_path`: the base checkpoint it was trained on (as given). */
  baseModel: string;
  /** The tokenizer files, written beside the adapter (PEFT does the same). */
  tokenizer?: { tokenizerJson: string; tokenizerConfigJson: string };
  /** AdamW moments by adapter tensor name (resume). */
  optimizer?: { m: Map<string, Float32Array>; v: Map<string, Float32Array> };
  /** The training loop's state (resume). */
  state?: Record<string, unknown>;
}

/** `adapter_config.json` for `lora`, with the fields PEFT 0.x writes for a plain LoRA. */
export function toPeftConfig(lora: LoraConfig, baseModel: string): Record<string, unknown> {
  return {
    peft_type: "LORA",
    task_type: "CAUSAL_LM",
    base_model_name_or_path: baseModel,
    r: lora.rank,
    lora_alpha: lora.alpha,
    lora_dropout: lora.dropout,
    target_modules: lora.targets.map((t) => PEFT_MODULES[t]),
    use_rslora: lora.rsLora ?? false,
    use_dora: false,
    bias: "none",
    fan_in_fan_out: false,
    init_lora_weights: true,
    inference_mode: true,
    modules_to_save: null,
    layers_to_transform: null,
    layers_pattern: null,
    rank_pattern: {},
    alpha_pattern: {},
    revision: null,
  };
}

/**
 * Writes an adapter directory atomically: the PEFT pair, and what `c` adds
 * (tokenizer files, optimizer moments, trainer state). `model` is the base
 * model's shape, against which every tensor is checked.
 */
export async function saveAdapter(
  dir: string,
  model: ModelConfig,
  c: AdapterContents,
): Promise<void> {
  const layout = loraLayout(model, c.lora);
  checkLoraTensors(layout, c.tensors, "saveAdapter");
  if (c.optimizer) {
    checkLoraTensors(layout, c.optimizer.m, "saveAdapter: optimizer moments m");
    checkLoraTensors(layout, c.optimizer.v, "saveAdapter: optimizer moments v");
  }
  const stateBytes = c.state ? stateJson(c.state) : undefined;
  const tensorsOf = (m: Map<string, Float32Array>, suffix = "") =>
    new Map<string, TensorToWrite>(
      layout.tensors.map((t) => [t.name + suffix, { shape: t.shape, data: m.get(t.name)! }]),
    );
  const managed = new Set<string>(Object.values(ADAPTER_FILES));
  await replaceDirectory(dir, {
    markers: [ADAPTER_FILES.config],
    isManaged: (name) => managed.has(name),
    write: async (put, tmp, hook) => {
      await put(ADAPTER_FILES.config, jsonBytes(toPeftConfig(c.lora, c.baseModel)));
      await writeSafetensors(join(tmp, ADAPTER_FILES.weights), tensorsOf(c.tensors), {
        metadata: { format: "pt" },
        onProgress: hook(ADAPTER_FILES.weights),
      });
      if (c.tokenizer) {
        await put(ADAPTER_FILES.tokenizer, new TextEncoder().encode(c.tokenizer.tokenizerJson));
        await put(
          ADAPTER_FILES.tokenizerConfig,
          new TextEncoder().encode(c.tokenizer.tokenizerConfigJson),
        );
      }
      if (c.optimizer) {
        const moments = new Map([
          ...tensorsOf(c.optimizer.m, ".exp_avg"),
          ...tensorsOf(c.optimizer.v, ".exp_avg_sq"),
        ]);
        await writeSafetensors(join(tmp, ADAPTER_FILES.optimizer), moments, {
          metadata: {
            format: "pt",
            content: "AdamW exp_avg (m) and exp_avg_sq (v) per adapter tensor",
          },
          onProgress: hook(ADAPTER_FILES.optimizer),
        });
      }
      if (stateBytes) await put(ADAPTER_FILES.state, stateBytes);
    },
  });
}

async function readJsonObject(path: string, hint: string): Promise<Record<string, unknown>> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new UserError(`${path}: missing${hint}`);
    throw new UserError(`${path}: cannot read: ${(e as Error).message}`);
  }
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch (e) {
    throw new UserError(`${path}: not valid JSON (${(e as Error).message})`);
  }
  if (typeof data !== "object" || data === null || Array.isArray(data)) {
    throw new UserError(`${path}: not a JSON object`);
  }
  return data as Record<string, unknown>;
}

/** Options of `loadAdapter`. */
export interface LoadAdapterOptions {
  /** Also load the AdamW moments and trainer state (resume); their absence is then an error. */
  resume?: boolean;
}

/** An adapter as loaded. */
export interface LoadedAdapter extends AdapterContents {
  /** The directory read. */
  source: string;
}

const isEmpty = (v: unknown) =>
  v === undefined || v === null || (Array.isArray(v) && v.length === 0) ||
  (typeof v === "object" && Object.keys(v as object).length === 0);

/**
 * Reads an adapter directory (ours, or PEFT's) for the base model `model`;
 * every tensor's presence and shape is checked, with errors that name it.
 */
export async function loadAdapter(
  dir: string,
  model: ModelConfig,
  opts: LoadAdapterOptions = {},
): Promise<LoadedAdapter> {
  const configPath = join(dir, ADAPTER_FILES.config);
  const cfg = await readJsonObject(
    configPath,
    " (not an adapter: an adapter directory has adapter_config.json and adapter_model.safetensors)",
  );
  const peftType = cfg["peft_type"] ?? "LORA";
  if (peftType !== "LORA") {
    throw new UserError(`${configPath}: peft_type ${peftType}; only LORA adapters are supported`);
  }
  const refuse = (field: string, why: string) => {
    throw new UserError(`${configPath}: ${field} ${why}; this trainer supports plain LoRA only`);
  };
  if (cfg["use_dora"] === true) refuse("use_dora", "is true (DoRA)");
  if (cfg["fan_in_fan_out"] === true) refuse("fan_in_fan_out", "is true");
  if (cfg["bias"] !== undefined && cfg["bias"] !== "none") refuse("bias", `is "${cfg["bias"]}"`);
  if (cfg["lora_bias"] === true) refuse("lora_bias", "is true");
  for (const f of ["rank_pattern", "alpha_pattern", "modules_to_save"]) {
    if (!isEmpty(cfg[f])) refuse(f, "is set (per-module settings or saved full modules)");
  }
  const rank = cfg["r"];
  const alpha = cfg["lora_alpha"] ?? rank;
  if (typeof rank !== "number" || typeof alpha !== "number") {
    throw new UserError(`${configPath}: r and lora_alpha must be numbers`);
  }
  const weightsPath = join(dir, ADAPTER_FILES.weights);
  if (!(await exists(weightsPath))) {
    const bin = await exists(join(dir, "adapter_model.bin"));
    throw new UserError(
      `${weightsPath}: missing${
        bin ? " (this adapter is in PyTorch .bin format; save it with safe_serialization=True)" : ""
      }`,
    );
  }
  const file = await readSafetensors(weightsPath);

  // The targets are the modules the tensors adapt.
  const names = tensorNames(model);
  const byModule = new Map<string, { layer: number; target: LoraTarget }>();
  for (let l = 0; l < model.num_hidden_layers; l++) {
    for (const t of LORA_TARGETS) {
      byModule.set(names.layers[l][t].replace(/\.weight$/, ""), { layer: l, target: t });
    }
  }
  const seen = new Map<LoraTarget, Set<number>>();
  for (const key of file.keys()) {
    const m = /^base_model\.model\.(.+)\.lora_[AB]\.weight$/.exec(key);
    const site = m ? byModule.get(m[1]) : undefined;
    if (!site) {
      throw new UserError(
        `${weightsPath}: tensor ${key} is not a LoRA A/B weight of a projection this trainer adapts (${
          LORA_TARGETS.map((t) => PEFT_MODULES[t]).join(", ")
        } in layers 0..${model.num_hidden_layers - 1})`,
      );
    }
    if (!seen.has(site.target)) seen.set(site.target, new Set());
    seen.get(site.target)!.add(site.layer);
  }
  const targets = LORA_TARGETS.filter((t) => seen.has(t));
  if (targets.length === 0) throw new UserError(`${weightsPath}: holds no LoRA tensors`);
  for (const t of targets) {
    const layers = seen.get(t)!;
    if (layers.size !== model.num_hidden_layers) {
      throw new UserError(
        `${weightsPath}: ${
          PEFT_MODULES[t]
        } is adapted in ${layers.size} of ${model.num_hidden_layers} layers; adapters on a subset of layers are not supported`,
      );
    }
  }
  const lora: LoraConfig = {
    rank,
    alpha,
    dropout: typeof cfg["lora_dropout"] === "number" ? cfg["lora_dropout"] as number : 0,
    targets,
    ...(cfg["use_rslora"] === true ? { rsLora: true } : {}),
  };
  validateLoraConfig(lora, configPath);
  const layout = loraLayout(model, lora);
  const tensors = new Map<string, Float32Array>();
  for (const t of layout.tensors) {
    const got = file.get(t.name)!;
    if (!got) throw new UserError(`${weightsPath}: missing tensor ${t.name}`);
    if (got.shape.length !== 2 || got.shape[0] !== t.shape[0] || got.shape[1] !== t.shape[1]) {
      throw new UserError(
        `${weightsPath}: tensor ${t.name} has shape [${got.shape.join(", ")}], expected [${
          t.shape.join(", ")
        }] (r = ${rank} in ${configPath}, and the base model's shape)`,
      );
    }
    tensors.set(t.name, got.data);
  }
  const out: LoadedAdapter = {
    source: dir,
    lora,
    tensors,
    baseModel: typeof cfg["base_model_name_or_path"] === "string"
      ? cfg["base_model_name_or_path"] as string
      : "",
  };
  const tokPath = join(dir, ADAPTER_FILES.tokenizer);
  if (await exists(tokPath)) {
    out.tokenizer = {
      tokenizerJson: await Deno.readTextFile(tokPath),
      tokenizerConfigJson: await Deno.readTextFile(join(dir, ADAPTER_FILES.tokenizerConfig)),
    };
  }
  if (opts.resume) {
    const optPath = join(dir, ADAPTER_FILES.optimizer);
    if (!(await exists(optPath))) {
      throw new UserError(`${optPath}: missing (this adapter was not saved by a training run)`);
    }
    const moments = await readSafetensors(optPath);
    const m = new Map<string, Float32Array>();
    const v = new Map<string, Float32Array>();
    for (const t of layout.tensors) {
      const a = moments.get(t.name + ".exp_avg");
      const b = moments.get(t.name + ".exp_avg_sq");
      if (!a || !b) throw new UserError(`${optPath}: missing the moments of ${t.name}`);
      m.set(t.name, a.data);
      v.set(t.name, b.data);
    }
    checkLoraTensors(layout, m, optPath);
    checkLoraTensors(layout, v, optPath);
    out.optimizer = { m, v };
    out.state = await readJsonObject(join(dir, ADAPTER_FILES.state), "");
  }
  return out;
}
