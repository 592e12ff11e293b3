/**
 * The model shape a user asks for: a preset name (`--preset`) or a JSON/JSONC
 * file (`--model-config`), either our fields (a preset's, overridden) or a
 * Hugging Face `config.json`. Training reads it for a fresh model; loading a
 * `.pth` (which holds tensors, not a config) reads it for the shape.
 *
 * @module
 */
import {
  MODEL_CONFIG_FIELDS,
  type ModelConfig,
  presetConfig,
  validateConfig,
} from "../model/config.ts";
import { fromHfConfig } from "./hf_config.ts";
import { UserError } from "../util/errors.ts";
import { parse as parseJsonc, type ParseError } from "jsonc-parser";

/** A requested shape and where it came from. */
export interface RequestedShape {
  /** The model shape asked for. */
  config: ModelConfig;
  /** Whether the request names the vocabulary (a preset's does not count: it follows the data). */
  setsVocab: boolean;
  /** How the user asked, for messages: the flag ... */
  flag: "--preset" | "--model-config";
  /** ... and its value (a preset name, a file). */
  value: string;
}

const MODEL_FIELDS = new Set<string>(MODEL_CONFIG_FIELDS);

/** Reads a model config file: a preset's fields overridden by the file's (HF names), or a `config.json`. */
export async function readModelConfigFile(path: string): Promise<RequestedShape> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    throw new UserError(`cannot read --model-config ${path}: ${(e as Error).message}`);
  }
  const errors: ParseError[] = [];
  const data = parseJsonc(text, errors, { allowTrailingComma: true });
  if (errors.length > 0 || typeof data !== "object" || data === null || Array.isArray(data)) {
    throw new UserError(`${path}: not a JSON object of model config fields`);
  }
  const flag = "--model-config" as const;
  const obj = data as Record<string, unknown>;
  if (typeof obj["architectures"] !== "undefined" || typeof obj["model_type"] !== "undefined") {
    // A Hugging Face config.json: read it with the same rules as checkpoints.
    const parsed = fromHfConfig(obj, path);
    return { config: parsed.config, setsVocab: true, flag, value: path };
  }
  const base = presetConfig(typeof obj["preset"] === "string" ? obj["preset"] as string : "tiny");
  for (const [k, v] of Object.entries(obj)) {
    if (k === "preset") continue;
    if (!MODEL_FIELDS.has(k)) {
      throw new UserError(
        `${path}: unknown model config field "${k}"; fields: ${[...MODEL_FIELDS].join(", ")}`,
      );
    }
    (base as unknown as Record<string, unknown>)[k] = v;
  }
  validateConfig(base, path);
  return { config: base, setsVocab: "vocab_size" in obj, flag, value: path };
}

/**
 * The shape `preset` or `modelConfig` asks for; undefined when neither is
 * given. Both given is an error.
 */
export async function requestedShape(
  req: { preset?: string; modelConfig?: string },
): Promise<RequestedShape | undefined> {
  if (req.preset !== undefined && req.modelConfig !== undefined) {
    throw new UserError("give --preset or --model-config, not both");
  }
  if (req.modelConfig !== undefined) return await readModelConfigFile(req.modelConfig);
  if (req.preset !== undefined) {
    return {
      config: presetConfig(req.preset),
      setsVocab: false,
      flag: "--preset",
      value: req.preset,
    };
  }
  return undefined;
}
