/**
 * SFT rendering and assistant-only loss masks, on MiniMind's tokenizer (the
 * fixture) and on the embedded default tokenizer.
 */
import { assert, assertEquals, assertThrows } from "./assert.ts";
import { TextTokenizer } from "../data/tokenizer.ts";
import { defaultTokenizer } from "../data/corpus.ts";
import {
  assistantMask,
  type ChatTokenizer,
  fitSftSample,
  maskAssistantSpans,
  sftSample,
} from "../data/sft.ts";
import type { ChatMessage } from "../data/tokenizer.ts";
import { UserError } from "../util/errors.ts";

const minimind = await TextTokenizer.load("../shared/fixtures/minimind-tokenizer");
const THINK = "<think>\n\n</think>\n\n";

/** The maximal runs of mask 1, as [start, end) index pairs. */
function spans(mask: number[]): [number, number][] {
  const out: [number, number][] = [];
  for (let j = 0; j < mask.length; j++) {
    if (mask[j] && (j === 0 || !mask[j - 1])) out.push([j, j]);
    if (mask[j]) out[out.length - 1][1] = j + 1;
  }
  return out;
}

const multiTurn: ChatMessage[] = [
  { role: "system", content: "你是一个乐于助人的助手。" },
  { role: "user", content: "1+1等于几？" },
  { role: "assistant", content: "等于2。" },
  { role: "user", content: "Say hello in English." },
  { role: "assistant", content: "Hello! How can I help you today?" },
  { role: "user", content: "谢谢" },
  { role: "assistant", content: "不客气。\n有问题随时问我。" },
];

Deno.test("MiniMind: the fixture README's rendering, and its mask spans the think block, answer and <|im_end|>\\n", () => {
  const msgs: ChatMessage[] = [
    { role: "user", content: "1+1等于几？" },
    { role: "assistant", content: "等于2。" },
  ];
  const { ids, mask } = assistantMask(minimind, msgs);
  assertEquals(
    minimind.decode(ids),
    "<|im_start|>user\n1+1等于几？<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n等于2。<|im_end|>\n",
  );
  const s = spans(mask);
  assertEquals(s.length, 1);
  assertEquals(minimind.decode(ids.slice(s[0][0], s[0][1])), `${THINK}等于2。<|im_end|>\n`);
  // MiniMind's rule, written out: the span starts right after the ids of
  // "<|im_start|>assistant\n" and ends after the ids of "<|im_end|>\n".
  const header = minimind.encode("<|im_start|>assistant\n");
  const end = minimind.encode("<|im_end|>\n");
  assertEquals(ids.slice(s[0][0] - header.length, s[0][0]), header);
  assertEquals(ids.slice(s[0][1] - end.length, s[0][1]), end);
  assertEquals(s[0][1], ids.length);
});

Deno.test("MiniMind: multi-turn with a system prompt masks exactly the assistant turns", () => {
  const { ids, mask } = assistantMask(minimind, multiTurn);
  assertEquals(ids.length, mask.length);
  const s = spans(mask);
  const answers = multiTurn.filter((m) => m.role === "assistant").map((m) => m.content);
  assertEquals(
    s.map(([a, b]) => minimind.decode(ids.slice(a, b))),
    answers.map((c) => `${THINK}${c}<|im_end|>\n`),
  );
  // Everything outside the spans is the rendering without the assistant bodies.
  const untrained = minimind.decode(ids.filter((_, j) => !mask[j]));
  assertEquals(
    untrained,
    "<|im_start|>system\n你是一个乐于助人的助手。<|im_end|>\n" +
      "<|im_start|>user\n1+1等于几？<|im_end|>\n<|im_start|>assistant\n" +
      "<|im_start|>user\nSay hello in English.<|im_end|>\n<|im_start|>assistant\n" +
      "<|im_start|>user\n谢谢<|im_end|>\n<|im_start|>assistant\n",
  );
  // The ids are those of the rendered text.
  assertEquals(ids, minimind.encode(minimind.applyChatTemplate(multiTurn)));
});

Deno.test("MiniMind: reasoning inside the assistant content is rendered into the think block and trained", () => {
  const msgs: ChatMessage[] = [
    { role: "user", content: "2+2?" },
    { role: "assistant", content: "<think>\nadd them\n</think>\n\n4" },
  ];
  const { ids, mask } = assistantMask(minimind, msgs);
  const s = spans(mask);
  assertEquals(s.length, 1);
  assertEquals(
    minimind.decode(ids.slice(s[0][0], s[0][1])),
    "<think>\nadd them\n</think>\n\n4<|im_end|>\n",
  );
});

Deno.test("default tokenizer (ChatML): the same rule, spans are answer + <|im_end|>\\n", () => {
  const tok = defaultTokenizer();
  const { ids, mask } = assistantMask(tok, multiTurn);
  const rendered = tok.applyChatTemplate(multiTurn);
  const s = spans(mask);
  const answers = multiTurn.filter((m) => m.role === "assistant").map((m) => m.content);
  assertEquals(s.length, answers.length);
  s.forEach(([a, b], i) => {
    const text = tok.decode(ids.slice(a, b));
    assert(text.endsWith(`${answers[i]}<|im_end|>\n`), `span ${i}: ${JSON.stringify(text)}`);
    assert(rendered.includes(`<|im_start|>assistant\n${text}`), `span ${i} follows its header`);
  });
});

Deno.test("no assistant turn: nothing is trained and the conversation is skipped", () => {
  const msgs: ChatMessage[] = [{ role: "system", content: "s" }, { role: "user", content: "hi" }];
  const { mask } = assistantMask(minimind, msgs);
  assertEquals(mask.every((m) => m === 0), true);
  assertEquals(sftSample(minimind, msgs, 64), undefined);
});

Deno.test("fitSftSample: pads with pad id at mask 0, truncates to seq_len + 1, skips when nothing trainable is left", () => {
  const { ids, mask } = assistantMask(minimind, multiTurn);
  const firstTrained = mask.indexOf(1);
  // Long enough: padded.
  const T = ids.length + 5;
  const padded = fitSftSample(ids, mask, T, minimind.padId)!;
  assertEquals(padded.length, ids.length);
  assertEquals(Array.from(padded.ids.subarray(0, ids.length)), ids);
  assertEquals(Array.from(padded.ids.subarray(ids.length)), new Array(6).fill(minimind.padId));
  assertEquals(Array.from(padded.mask.subarray(ids.length)), new Array(6).fill(0));
  // Cut inside the first answer: its tokens up to the cut stay trained.
  const cut = fitSftSample(ids, mask, firstTrained + 2, minimind.padId)!;
  assertEquals(cut.length, firstTrained + 3);
  assertEquals(Array.from(cut.mask), mask.slice(0, firstTrained + 3));
  // Cut so the first trained token is position seq_len: still one target.
  assert(fitSftSample(ids, mask, firstTrained, minimind.padId) !== undefined);
  // Cut before it: nothing to train.
  assertEquals(fitSftSample(ids, mask, firstTrained - 1, minimind.padId), undefined);
});

Deno.test("maskAssistantSpans: a turn cut off before <|im_end|> is trained to the end", () => {
  const { ids } = assistantMask(minimind, multiTurn);
  const header = minimind.encode("<|im_start|>assistant\n");
  let at = -1;
  for (let j = 0; j + header.length <= ids.length && at < 0; j++) {
    if (header.every((h, k) => ids[j + k] === h)) at = j;
  }
  const cut = ids.slice(0, at + header.length + 3);
  assertEquals(maskAssistantSpans(minimind, cut).slice(-4), [0, 1, 1, 1]);
});

Deno.test("a tokenizer without ChatML special tokens is a UserError", () => {
  const fake: ChatTokenizer = {
    encode: () => [1],
    applyChatTemplate: () => "x",
    padId: 0,
    tokenToId: () => undefined,
  };
  assertThrows(() => maskAssistantSpans(fake, [1, 2]), UserError, "no <|im_start|> token");
});
