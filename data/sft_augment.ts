/**
 * MiniMind's two random augmentations of SFT samples, as options that are off
 * by default. MiniMind's `SFTDataset` (its `dataset/lm_dataset.py`) applies
 * both to every sample it loads:
 *
 * - `pre_processing_chat`: a conversation with no tools whose first message is
 *   not a system message gets one, with probability 0.2, drawn uniformly from
 *   ten fixed prompts (five Chinese, five English);
 * - `post_processing_chat`: when the rendered text holds the empty think block
 *   `<think>\n\n</think>\n\n` (MiniMind's template writes one into every
 *   assistant turn without reasoning), every such block is removed from the
 *   text with probability 0.8, i.e. kept in 20% of samples.
 *
 * MiniMind draws from Python's global `random`, so which samples change
 * depends on the order its data-loader workers happen to run in. Here each
 * sample draws from its own generator, seeded by the run's seed, the epoch and
 * where the record is (file, line): the same sample in the same epoch always
 * gets the same augmentation, a resumed run sees exactly what the original
 * would have seen, and each epoch draws afresh (as MiniMind's does). Every
 * sample draws the same three numbers in the same order whether or not an
 * augmentation applies, so turning one on never changes the other's draws.
 */
import { UserError } from "../util/errors.ts";
import { Rng } from "../util/random.ts";
import { type ChatTokenizer, renderConversation, type SftConversation } from "./sft.ts";

/** MiniMind's system prompts (`SYSTEM_PROMPTS` in `pre_processing_chat`), in its order. */
export const MINIMIND_SYSTEM_PROMPTS: readonly string[] = Object.freeze([
  "你是一个知识丰富的AI，尽力为用户提供准确的信息。",
  "你是minimind，一个小巧但有用的语言模型。",
  "你是一个专业的AI助手，请提供有价值的回答。",
  "你是minimind，请尽力帮助用户解决问题。",
  "你是一个可靠的AI，请给出准确的回答。",
  "You are a helpful AI assistant.",
  "You are minimind, a lightweight intelligent assistant.",
  "You are a friendly chatbot. Please answer the user's questions carefully.",
  "You are a knowledgeable AI. Try your best to provide accurate information.",
  "You are minimind, a small but useful language model.",
]);

/** The empty think block MiniMind's template writes into assistant turns without reasoning. */
export const EMPTY_THINK = "<think>\n\n</think>\n\n";

/** The augmentation settings of an SFT run. */
export interface SftAugmentation {
  /** Share of conversations with no system message and no tools that get one (0 = off; MiniMind 0.2). */
  systemRatio: number;
  /** The prompts a system message is drawn from (default `MINIMIND_SYSTEM_PROMPTS`). */
  systemPrompts: readonly string[];
  /** Share of samples whose empty think blocks are kept (1 = off; MiniMind 0.2). */
  emptyThinkKeep: number;
}

/** No augmentation: every conversation rendered as it is. */
export const NO_AUGMENTATION: SftAugmentation = Object.freeze({
  systemRatio: 0,
  systemPrompts: MINIMIND_SYSTEM_PROMPTS,
  emptyThinkKeep: 1,
});

/**
 * Reads system prompts from a file: a JSON list of strings when the name ends
 * in `.json` (prompts may then span lines), else one prompt per line (blank
 * lines skipped, a trailing `\r` dropped).
 */
export async function readSystemPrompts(path: string): Promise<string[]> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    throw new UserError(`cannot read --sft-system-prompts ${path}: ${(e as Error).message}`);
  }
  let prompts: string[];
  if (path.toLowerCase().endsWith(".json")) {
    let value: unknown;
    try {
      value = JSON.parse(text);
    } catch (e) {
      throw new UserError(`${path}: not valid JSON (${(e as Error).message})`);
    }
    if (!Array.isArray(value) || !value.every((p) => typeof p === "string")) {
      throw new UserError(
        `${path}: expected a JSON list of strings, such as ["You are ...", "..."]`,
      );
    }
    prompts = value.filter((p) => p.trim() !== "");
  } else {
    prompts = text.split("\n").map((l) => l.replace(/\r$/, "")).filter((l) => l.trim() !== "");
  }
  if (prompts.length === 0) throw new UserError(`${path}: holds no system prompts`);
  return prompts;
}

/** Whether `a` changes any sample. */
export function augmentationActive(a: SftAugmentation): boolean {
  return a.systemRatio > 0 || a.emptyThinkKeep < 1;
}

/** Checks the settings, with the flag names in the message. */
export function checkAugmentation(a: SftAugmentation): void {
  const share = (name: string, v: number) => {
    if (!(v >= 0 && v <= 1)) throw new RangeError(`${name} must be between 0 and 1, got ${v}`);
  };
  share("--sft-system-ratio", a.systemRatio);
  share("--sft-empty-think-keep", a.emptyThinkKeep);
  if (a.systemRatio > 0 && a.systemPrompts.length === 0) {
    throw new RangeError("--sft-system-ratio needs at least one system prompt");
  }
}

/**
 * A short fingerprint of the settings (the prompts hashed), saved with the
 * data position: a resume must augment as the run did.
 */
export function augmentationKey(a: SftAugmentation): string {
  if (!augmentationActive(a)) return "none";
  // FNV-1a over the prompts: a fingerprint, not a security boundary.
  let h = 0x811c9dc5;
  for (const p of a.systemPrompts) {
    for (let i = 0; i < p.length; i++) h = Math.imul(h ^ p.charCodeAt(i), 0x01000193) >>> 0;
    h = Math.imul(h ^ 0x0a, 0x01000193) >>> 0;
  }
  return `system ${a.systemRatio} of ${a.systemPrompts.length} prompts ` +
    `(fnv ${h.toString(16).padStart(8, "0")}), empty think kept ${a.emptyThinkKeep}`;
}

/** The generator of one sample: a function of the seed, the epoch, the file's index and the line. */
export function sampleRng(seed: number, epoch: number, file: number, line: number): Rng {
  let h = seed >>> 0;
  for (const v of [epoch, file, line]) {
    // murmur3's finalizer over each word folded in: nearby lines get unrelated seeds.
    h = Math.imul(h ^ (v >>> 0), 0x9e3779b1) >>> 0;
    h ^= h >>> 16;
    h = Math.imul(h, 0x85ebca6b) >>> 0;
    h ^= h >>> 13;
    h = Math.imul(h, 0xc2b2ae35) >>> 0;
    h ^= h >>> 16;
  }
  return new Rng(h);
}

/**
 * Renders a conversation through the chat template with MiniMind's
 * augmentations drawn from `rng`: maybe a system prompt first (only when the
 * conversation has no tools and does not start with a system message), then
 * maybe every empty think block removed from the text.
 *
 * @example
 * ```ts ignore
 * const text = renderAugmented(tok, conv, {
 *   systemRatio: 0.2, systemPrompts: MINIMIND_SYSTEM_PROMPTS, emptyThinkKeep: 0.2,
 * }, sampleRng(42, 0, 0, 17));
 * ```
 */
export function renderAugmented(
  tok: ChatTokenizer,
  conv: SftConversation,
  aug: SftAugmentation,
  rng: Rng,
): string {
  const addSystem = rng.nextFloat();
  const prompt = rng.nextInt(Math.max(1, aug.systemPrompts.length));
  const keepThink = rng.nextFloat();
  let messages = conv.messages;
  if (
    addSystem < aug.systemRatio && conv.tools === undefined && messages[0]?.role !== "system"
  ) {
    messages = [{ role: "system", content: aug.systemPrompts[prompt] }, ...messages];
  }
  let text = renderConversation(tok, messages, conv.tools);
  // MiniMind strips when random() > keep; >= here makes keep = 0 strip always.
  if (keepThink >= aug.emptyThinkKeep && text.includes(EMPTY_THINK)) {
    text = text.replaceAll(EMPTY_THINK, "");
  }
  return text;
}
