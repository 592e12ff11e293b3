/**
 * MiniMind's SFT augmentations (data/sft_augment.ts): where they apply, at
 * what rates, seeded per sample so the training stream resumes exactly, and
 * the settings a resume must keep.
 */
import { assert, assertEquals, assertNotEquals, assertRejects } from "./assert.ts";
import { TextTokenizer } from "../data/tokenizer.ts";
import { renderConversation, type SftConversation } from "../data/sft.ts";
import {
  augmentationKey,
  EMPTY_THINK,
  MINIMIND_SYSTEM_PROMPTS,
  NO_AUGMENTATION,
  readSystemPrompts,
  renderAugmented,
  sampleRng,
  type SftAugmentation,
} from "../data/sft_augment.ts";
import { type DataPosition, DataStream, type DataStreamOptions } from "../data/stream.ts";
import type { Batch } from "../data/batch.ts";
import { prepareShards } from "../data/shards.ts";
import { UserError } from "../util/errors.ts";

const tok = await TextTokenizer.load("../shared/fixtures/minimind-tokenizer");

const plain: SftConversation = {
  messages: [
    { role: "user", content: "你好" },
    { role: "assistant", content: "你好！" },
    { role: "user", content: "再见" },
    { role: "assistant", content: "再见！" },
  ],
};
const withSystem: SftConversation = {
  messages: [{ role: "system", content: "Be brief." }, ...plain.messages],
};
const withTools: SftConversation = {
  messages: [
    { role: "user", content: "Time?" },
    { role: "assistant", content: "", tool_calls: [{ name: "now", arguments: {} }] },
    { role: "tool", content: "12:00" },
    { role: "assistant", content: "Noon." },
  ],
  tools: [{ name: "now", description: "the time", parameters: { type: "object" } }],
};
const reasoning: SftConversation = {
  messages: [
    { role: "user", content: "1+1?" },
    { role: "assistant", content: "2", reasoning_content: "one and one" },
  ],
};

const MINIMIND: SftAugmentation = {
  systemRatio: 0.2,
  systemPrompts: MINIMIND_SYSTEM_PROMPTS,
  emptyThinkKeep: 0.2,
};

Deno.test("augment: a system prompt only where there is none and no tools; the empty think stripped everywhere", () => {
  const always: SftAugmentation = { ...MINIMIND, systemRatio: 1, emptyThinkKeep: 0 };
  for (let line = 1; line <= 20; line++) {
    const rng = () => sampleRng(42, 0, 0, line);
    const text = renderAugmented(tok, plain, always, rng());
    const prompt = MINIMIND_SYSTEM_PROMPTS.find((p) =>
      text.startsWith(`<|im_start|>system\n${p}<|im_end|>\n`)
    );
    assert(prompt !== undefined, `line ${line}: one of MiniMind's prompts opens the text`);
    assert(!text.includes(EMPTY_THINK), "every empty think block is gone");
    assertEquals(
      text,
      renderConversation(tok, [{ role: "system", content: prompt }, ...plain.messages])
        .replaceAll(EMPTY_THINK, ""),
    );
    // A system message already there, or tools: no prompt added.
    assertEquals(
      renderAugmented(tok, withSystem, always, rng()),
      renderConversation(tok, withSystem.messages).replaceAll(EMPTY_THINK, ""),
    );
    assertEquals(
      renderAugmented(tok, withTools, always, rng()),
      renderConversation(tok, withTools.messages, withTools.tools).replaceAll(EMPTY_THINK, ""),
    );
    // A real think block is never stripped.
    const stripOnly: SftAugmentation = { ...always, systemRatio: 0 };
    assertEquals(
      renderAugmented(tok, reasoning, stripOnly, rng()),
      renderConversation(tok, reasoning.messages),
    );
  }
  // Off: the text is the plain rendering.
  assertEquals(
    renderAugmented(tok, plain, NO_AUGMENTATION, sampleRng(1, 2, 3, 4)),
    renderConversation(tok, plain.messages),
  );
});

Deno.test("augment: MiniMind's rates over many samples, the same per (seed, epoch, file, line), each draw independent", () => {
  let added = 0;
  let kept = 0;
  const used = new Set<string>();
  const n = 4000;
  for (let line = 1; line <= n; line++) {
    const text = renderAugmented(tok, plain, MINIMIND, sampleRng(42, 0, 0, line));
    if (text.startsWith("<|im_start|>system\n")) {
      added++;
      used.add(text.split("\n")[1].replace("<|im_end|>", ""));
    }
    if (text.includes(EMPTY_THINK)) kept++;
    // Seeded per sample: the same key gives the same text.
    assertEquals(renderAugmented(tok, plain, MINIMIND, sampleRng(42, 0, 0, line)), text);
  }
  // Binomial(4000, 0.2): sd = 25.3; 5 sd either side (a test that fails by chance 1 in 10^6).
  for (const [what, count] of [["system added", added], ["empty think kept", kept]] as const) {
    assert(
      Math.abs(count - 0.2 * n) < 5 * 25.3,
      `${what}: ${count} of ${n}, expected about ${0.2 * n}`,
    );
  }
  assertEquals(used.size, MINIMIND_SYSTEM_PROMPTS.length, "every prompt is drawn");
  // Another epoch, seed, file or line draws afresh.
  const texts = (key: [number, number, number]) =>
    Array.from(
      { length: 50 },
      (_, i) => renderAugmented(tok, plain, MINIMIND, sampleRng(key[0], key[1], key[2], i + 1)),
    );
  const base = texts([42, 0, 0]);
  for (const other of [[42, 1, 0], [43, 0, 0], [42, 0, 1]] as [number, number, number][]) {
    assertNotEquals(texts(other), base, `key ${other}`);
  }
  // Turning the think option on does not move which samples get a system prompt.
  for (let line = 1; line <= 200; line++) {
    const onlySystem = renderAugmented(
      tok,
      plain,
      { ...MINIMIND, emptyThinkKeep: 1 },
      sampleRng(5, 0, 0, line),
    );
    const both = renderAugmented(tok, plain, MINIMIND, sampleRng(5, 0, 0, line));
    assertEquals(
      onlySystem.startsWith("<|im_start|>system"),
      both.startsWith("<|im_start|>system"),
    );
  }
});

Deno.test("augment: own prompts from a file (lines or a JSON list), and the settings' fingerprint", async () => {
  const dir = await Deno.makeTempDir({ prefix: "sft_augment_test_" });
  try {
    await Deno.writeTextFile(`${dir}/p.txt`, "First prompt.\r\n\n  \nSecond prompt.\n");
    assertEquals(await readSystemPrompts(`${dir}/p.txt`), ["First prompt.", "Second prompt."]);
    await Deno.writeTextFile(`${dir}/p.json`, '["Line one\\nline two", "B"]');
    assertEquals(await readSystemPrompts(`${dir}/p.json`), ["Line one\nline two", "B"]);
    await Deno.writeTextFile(`${dir}/bad.json`, '{"a": 1}');
    await assertRejects(
      () => readSystemPrompts(`${dir}/bad.json`),
      UserError,
      "a JSON list of strings",
    );
    await Deno.writeTextFile(`${dir}/empty.txt`, "\n\n");
    await assertRejects(
      () => readSystemPrompts(`${dir}/empty.txt`),
      UserError,
      "holds no system prompts",
    );
    await assertRejects(
      () => readSystemPrompts(`${dir}/nope.txt`),
      UserError,
      "cannot read --sft-system-prompts",
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
  assertEquals(augmentationKey(NO_AUGMENTATION), "none");
  assertNotEquals(
    augmentationKey(MINIMIND),
    augmentationKey({ ...MINIMIND, systemPrompts: ["x"] }),
  );
  assertNotEquals(augmentationKey(MINIMIND), augmentationKey({ ...MINIMIND, emptyThinkKeep: 0.3 }));
});

async function take(stream: DataStream, n: number): Promise<Batch[]> {
  const out: Batch[] = [];
  for (let i = 0; i < n; i++) {
    const b = await stream.next();
    if (!b) break;
    out.push(b);
  }
  return out;
}

Deno.test("augment in the stream: resume is exact, epochs differ, other settings refuse the position, shards refuse", async () => {
  const dir = await Deno.makeTempDir({ prefix: "sft_augment_stream_" });
  try {
    const lines: string[] = [];
    for (let i = 0; i < 30; i++) {
      const conv = i % 5 === 0 ? withSystem : i % 7 === 0 ? withTools : plain;
      const messages: Record<string, unknown>[] = conv.messages.map((m) => ({
        ...m,
        content: m.role === "user" ? `${m.content} ${i}` : m.content,
      }));
      // MiniMind's layout: the tools ride on a system message, as a JSON string.
      if (conv.tools) {
        messages.unshift({ role: "system", content: "", tools: JSON.stringify(conv.tools) });
      }
      lines.push(JSON.stringify({ conversations: messages }));
    }
    const path = `${dir}/sft.jsonl`;
    await Deno.writeTextFile(path, lines.join("\n") + "\n");
    const opts: DataStreamOptions = {
      data: [path],
      kind: "sft",
      tokenizer: tok,
      batchSize: 4,
      seqLen: 48,
      seed: 3,
      shuffleBuffer: 9,
      augment: MINIMIND,
    };
    for (const k of [0, 3, 8, 17]) {
      const a = await DataStream.open(opts);
      await take(a, k);
      const saved: DataPosition = JSON.parse(JSON.stringify(a.position()));
      const expected = await take(a, 12);
      a.close();
      const b = await DataStream.open(opts, saved);
      assertEquals(await take(b, 12), expected, `resume after ${k} batches`);
      b.close();
    }
    // Augmented differs from plain; and one epoch's rows differ from the next's (no shuffle).
    const once = { ...opts, shuffleBuffer: 0, batchSize: 30, seqLen: 400, maxEpochs: 2 };
    const aug = await take(await DataStream.open(once), 2);
    const none = await take(await DataStream.open({ ...once, augment: undefined }), 2);
    assertNotEquals(aug[0].ids, none[0].ids);
    assertNotEquals(aug[0].ids, aug[1].ids);
    assertEquals(none[0].ids, none[1].ids);

    const a = await DataStream.open(opts);
    await take(a, 2);
    const saved = a.position();
    a.close();
    await assertRejects(
      () => DataStream.open({ ...opts, augment: { ...MINIMIND, systemRatio: 0.5 } }, saved),
      UserError,
      "cannot resume the data stream: augment was",
    );
    await assertRejects(
      () => DataStream.open({ ...opts, augment: undefined }, saved),
      UserError,
      'and is "none" now',
    );
    await prepareShards({ tokenizer: tok, files: [path], out: `${dir}/shards`, kind: "sft" });
    await assertRejects(
      () => DataStream.open({ ...opts, data: [`${dir}/shards`] }),
      UserError,
      "apply when training reads JSONL",
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
