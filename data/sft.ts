/**
 * SFT samples: a conversation rendered with the tokenizer's chat template,
 * tokenized, and given a loss mask that is 1 on assistant tokens only.
 *
 * The rule is MiniMind's (`SFTDataset.generate_labels` in its
 * `dataset/lm_dataset.py`): find the token ids of the header
 * `<|im_start|>assistant\n` in the token sequence; every token from the one
 * right after the header up to and including the next `<|im_end|>\n` is
 * trained; everything else (system and user turns, the headers themselves,
 * padding) has mask 0. The search runs on token ids, with the header and the
 * terminator each encoded once, as MiniMind does: in a ChatML rendering both
 * sit between special tokens (`<|im_start|>`, `<|im_end|>`, or `<think>`, an
 * added token in MiniMind's vocabulary), so the BPE never merges them with
 * their neighbours and their ids in context equal their ids alone.
 *
 * MiniMind's template writes `<think>\n\n</think>\n\n` (or the reasoning text)
 * right after every assistant header. Those tokens follow the header, so they
 * are inside the span and have mask 1, exactly as in MiniMind's labels: the
 * model learns to emit the (empty) think block that its own chat template
 * prompts with at inference time (`add_generation_prompt` appends the same
 * block). MiniMind's mask is aligned with the token itself (`labels[j] =
 * input_ids[j]`) and the shift happens in the loss; ours is the same: `mask[j]`
 * says whether token j is a target, and the batch takes `mask[1..]` along with
 * `targets = ids[1..]`.
 */
import { UserError } from "../util/errors.ts";
import type { JsonValue, TemplateMessage, TextTokenizer } from "./tokenizer.ts";

/** One turn of an SFT conversation (MiniMind's roles: a `tool` turn is a tool's result). */
export interface SftMessage extends TemplateMessage {
  /** Who speaks this turn. */
  role: "system" | "user" | "assistant" | "tool";
}

/**
 * A conversation as training reads it: its messages, and the tool definitions
 * that MiniMind's records carry on the system message (given to the chat
 * template as `tools`, as MiniMind's `create_chat_prompt` does).
 */
export interface SftConversation {
  /** The turns, in order. */
  messages: SftMessage[];
  /** Tool definitions (JSON schemas), when the system message has them. */
  tools?: JsonValue[];
}

/** The ChatML header that opens an assistant turn. */
export const ASSISTANT_HEADER = "<|im_start|>assistant\n";
/** The ChatML terminator that closes a turn (trained on assistant turns). */
export const TURN_END = "<|im_end|>\n";

/** What SFT rendering needs of a tokenizer (a `TextTokenizer` has it). */
export type ChatTokenizer = Pick<
  TextTokenizer,
  "encode" | "applyChatTemplate" | "padId" | "tokenToId"
>;

const markerCache = new WeakMap<ChatTokenizer, { header: number[]; end: number[] }>();

function markers(tok: ChatTokenizer): { header: number[]; end: number[] } {
  let m = markerCache.get(tok);
  if (!m) {
    for (const special of ["<|im_start|>", "<|im_end|>"]) {
      if (tok.tokenToId(special) === undefined) {
        throw new UserError(
          `the tokenizer has no ${special} token: SFT needs a ChatML tokenizer ` +
            `(MiniMind's, or one from 'trainer tokenizer train')`,
        );
      }
    }
    m = { header: tok.encode(ASSISTANT_HEADER), end: tok.encode(TURN_END) };
    markerCache.set(tok, m);
  }
  return m;
}

/** Whether `ids[at..]` starts with `seq`. */
function startsWithAt(ids: ArrayLike<number>, at: number, seq: number[]): boolean {
  if (at + seq.length > ids.length) return false;
  for (let k = 0; k < seq.length; k++) if (ids[at + k] !== seq[k]) return false;
  return true;
}

/**
 * The loss mask of a token sequence: 1 from the token after each
 * `<|im_start|>assistant\n` through the next `<|im_end|>\n` inclusive (to the end
 * when the turn was cut off), 0 elsewhere.
 */
export function maskAssistantSpans(tok: ChatTokenizer, ids: ArrayLike<number>): number[] {
  const { header, end } = markers(tok);
  const mask = new Array<number>(ids.length).fill(0);
  let i = 0;
  while (i < ids.length) {
    if (!startsWithAt(ids, i, header)) {
      i++;
      continue;
    }
    const start = i + header.length;
    let stop = start;
    while (stop < ids.length && !startsWithAt(ids, stop, end)) stop++;
    const last = Math.min(stop + end.length, ids.length);
    for (let j = start; j < last; j++) mask[j] = 1;
    i = last;
  }
  return mask;
}

/** A conversation rendered by the tokenizer's chat template (no generation prompt), as text. */
export function renderConversation(
  tok: ChatTokenizer,
  messages: readonly SftMessage[],
  tools?: JsonValue[],
): string {
  return tok.applyChatTemplate(messages, { addGenerationPrompt: false, tools });
}

/** A rendered conversation tokenized, with its assistant mask. */
export function maskRendered(tok: ChatTokenizer, text: string): { ids: number[]; mask: number[] } {
  const ids = tok.encode(text);
  return { ids, mask: maskAssistantSpans(tok, ids) };
}

/**
 * Renders `messages` (with `tools`, when given) with the chat template (no
 * generation prompt), tokenizes the text, and masks the assistant spans. A
 * tool call the assistant makes is inside its turn and trained; a tool's
 * result is rendered as a user turn (`<tool_response>`) and is not.
 *
 * @example
 * ```ts ignore
 * const tok = await TextTokenizer.load("../shared/fixtures/minimind-tokenizer");
 * const { ids, mask } = assistantMask(tok, [
 *   { role: "user", content: "1+1等于几？" },
 *   { role: "assistant", content: "等于2。" },
 * ]);
 * // tok.decode(ids.filter((_, j) => mask[j])) === "<think>\n\n</think>\n\n等于2。<|im_end|>\n"
 * ```
 */
export function assistantMask(
  tok: ChatTokenizer,
  messages: readonly SftMessage[],
  tools?: JsonValue[],
): { ids: number[]; mask: number[] } {
  return maskRendered(tok, renderConversation(tok, messages, tools));
}

/** One SFT training row: `[seq_len + 1]` ids and the mask aligned with them. */
export interface SftSample {
  /** `[seq_len + 1]` token ids, padded with the pad id. */
  ids: Int32Array;
  /** `[seq_len + 1]`, 1 where the token is a target. */
  mask: Uint8Array;
  /** Tokens before padding (at most seq_len + 1). */
  length: number;
}

/**
 * Cuts a rendered conversation to `seqLen + 1` tokens and pads it with `padId`
 * (mask 0). Returns undefined when no target is left to train: the mask is
 * zero on every position 1..seqLen (position 0 is never a target).
 */
export function fitSftSample(
  ids: ArrayLike<number>,
  mask: ArrayLike<number>,
  seqLen: number,
  padId: number,
): SftSample | undefined {
  const n = seqLen + 1;
  const length = Math.min(ids.length, n);
  let trained = false;
  for (let j = 1; j < length; j++) {
    if (mask[j]) {
      trained = true;
      break;
    }
  }
  if (!trained) return undefined;
  const out: SftSample = { ids: new Int32Array(n).fill(padId), mask: new Uint8Array(n), length };
  for (let j = 0; j < length; j++) {
    out.ids[j] = ids[j];
    out.mask[j] = mask[j] ? 1 : 0;
  }
  return out;
}

/** A conversation as a training row (see `fitSftSample`), or undefined when nothing is trained. */
export function sftSample(
  tok: ChatTokenizer,
  messages: readonly SftMessage[],
  seqLen: number,
  tools?: JsonValue[],
): SftSample | undefined {
  const { ids, mask } = assistantMask(tok, messages, tools);
  return fitSftSample(ids, mask, seqLen, tok.padId);
}
