/**
 * `data/tokenizer.ts` against MiniMind's published tokenizer: the ids and
 * template rendering its README gives, special ids, decode round trips, the
 * streaming decoder, and the errors for broken tokenizer directories.
 */
import { Tokenizer } from "@huggingface/tokenizers";
import { defaultTokenizer, embeddedCorpus } from "../data/corpus.ts";
import { StreamingDecoder, TextTokenizer } from "../data/tokenizer.ts";
import { Rng } from "../util/random.ts";
import { UserError } from "../util/errors.ts";
import { assert, assertEquals, assertRejects, assertThrows } from "./assert.ts";

const MINIMIND = "../shared/fixtures/minimind-tokenizer";

Deno.test("minimind: vocab size, special ids and tokens", async () => {
  const tok = await TextTokenizer.load(MINIMIND);
  assertEquals(tok.vocabSize, 6400);
  assertEquals([tok.padId, tok.bosId, tok.eosId], [0, 1, 2]);
  assertEquals([0, 1, 2].map((i) => tok.idToToken(i)), [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
  ]);
  assertEquals(tok.tokenToId("<think>"), 25);
  assertEquals(tok.tokenToId("no such token at all"), undefined);
  // The raw texts are kept byte for byte (they are copied into checkpoints).
  assertEquals(tok.tokenizerJson, await Deno.readTextFile(`${MINIMIND}/tokenizer.json`));
  assertEquals(
    tok.tokenizerConfigJson,
    await Deno.readTextFile(`${MINIMIND}/tokenizer_config.json`),
  );
});

Deno.test("minimind: encode gives the README's ids and adds no special tokens", async () => {
  const tok = await TextTokenizer.load(MINIMIND);
  assertEquals(tok.encode("你好，世界！Hello world."), [1968, 294, 1950, 1364, 1602, 1707, 49]);
  assertEquals(tok.encode(""), []);
  // Special-token strings in the text become their ids, as in Hugging Face.
  const ids = tok.encode("<|im_start|>user\nhi<|im_end|>");
  assertEquals(ids[0], 1);
  assertEquals(ids[ids.length - 1], 2);
  assertEquals(ids.filter((i) => i <= 2).length, 2);
});

Deno.test("minimind: chat template renders as transformers does", async () => {
  const tok = await TextTokenizer.load(MINIMIND);
  const messages = [
    { role: "user" as const, content: "1+1等于几？" },
    { role: "assistant" as const, content: "等于2。" },
  ];
  assertEquals(
    tok.applyChatTemplate(messages),
    "<|im_start|>user\n1+1等于几？<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n等于2。<|im_end|>\n",
  );
  assertEquals(
    tok.applyChatTemplate(
      [{ role: "system", content: "Be brief." }, { role: "user", content: "Hi" }],
      { addGenerationPrompt: true },
    ),
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" +
      "<|im_start|>assistant\n<think>\n\n</think>\n\n",
  );
});

Deno.test("minimind: decode round trips and skips special tokens on request", async () => {
  const tok = await TextTokenizer.load(MINIMIND);
  const texts = [
    "你好，世界！Hello world.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n",
    "emoji 👨‍👩‍👧‍👦 and flags 🇨🇳🇬🇧, accents é ñ ü, Ελληνικά, русский, العربية, हिन्दी",
    "代码 `x = 1 + 2` 和数字 3.14159",
  ];
  for (const t of texts) assertEquals(tok.decode(tok.encode(t)), t, JSON.stringify(t));
  const ids = [1, ...tok.encode("hello"), 2];
  assertEquals(tok.decode(ids), "<|im_start|>hello<|im_end|>");
  assertEquals(tok.decode(ids, { skipSpecialTokens: true }), "hello");
  assertEquals(tok.decode([]), "");
  assertEquals(tok.decode(new Int32Array(tok.encode("typed arrays"))), "typed arrays");
  assertThrows(() => tok.decode([6400]), RangeError, "outside the vocabulary");
});

Deno.test("StreamingDecoder: multi-byte characters come out whole, never as U+FFFD", async () => {
  const tok = await TextTokenizer.load(MINIMIND);
  // Rare characters are split over several byte-level tokens in a 6400 vocabulary.
  const text = "鑫淼龘𠮷，饕餮犇骉。Mixed 中文 and English 👩‍🔬 end";
  const ids = tok.encode(text);
  const split = ids.filter((id) => tok.decode([id]).includes("\uFFFD")).length;
  assert(split >= 4, `expected tokens holding partial characters, got ${split}`);
  const stream = new StreamingDecoder(tok);
  const chunks = ids.map((id) => stream.push(id));
  chunks.push(stream.flush());
  for (const c of chunks) assert(!c.includes("\uFFFD"), `chunk ${JSON.stringify(c)} has U+FFFD`);
  assertEquals(chunks.join(""), tok.decode(ids));
  assertEquals(chunks.join(""), text);
  // Some pushes had to wait for the rest of a character.
  assert(chunks.some((c) => c === ""));
});

Deno.test("StreamingDecoder: a cut character is flushed at the end; reuse after flush", async () => {
  const tok = await TextTokenizer.load(MINIMIND);
  const ids = tok.encode("鑫");
  assert(ids.length > 1);
  const stream = new StreamingDecoder(tok);
  assertEquals(stream.push(ids[0]), "");
  assertEquals(stream.flush(), tok.decode([ids[0]]));
  const again = tok.encode("ok 好");
  assertEquals(again.map((i) => stream.push(i)).join("") + stream.flush(), "ok 好");
  const skip = new StreamingDecoder(tok, { skipSpecialTokens: true });
  const withSpecial = [1, ...tok.encode("hi"), 2];
  assertEquals(withSpecial.map((i) => skip.push(i)).join("") + skip.flush(), "hi");
});

Deno.test("load: a missing or broken file is a UserError that names it", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await assertRejects(
      () => TextTokenizer.load(dir),
      UserError,
      `${dir}/tokenizer.json not found`,
    );
    await Deno.copyFile(`${MINIMIND}/tokenizer.json`, `${dir}/tokenizer.json`);
    await assertRejects(
      () => TextTokenizer.load(dir),
      UserError,
      "tokenizer_config.json not found",
    );
    await Deno.writeTextFile(`${dir}/tokenizer_config.json`, "{ not json");
    await assertRejects(
      () => TextTokenizer.load(dir),
      UserError,
      "tokenizer_config.json: invalid JSON",
    );
    await Deno.writeTextFile(
      `${dir}/tokenizer_config.json`,
      JSON.stringify({ eos_token: "<nope>" }),
    );
    await assertRejects(
      () => TextTokenizer.load(dir),
      UserError,
      `eos_token "<nope>" is not a token`,
    );
    await Deno.writeTextFile(`${dir}/tokenizer.json`, "[]");
    await assertRejects(
      () => TextTokenizer.load(dir),
      UserError,
      "tokenizer.json: expected a JSON object",
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("load: chat_template.jinja beside the config supplies the template", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.copyFile(`${MINIMIND}/tokenizer.json`, `${dir}/tokenizer.json`);
    const config = JSON.parse(await Deno.readTextFile(`${MINIMIND}/tokenizer_config.json`));
    const template = config.chat_template;
    delete config.chat_template;
    await Deno.writeTextFile(`${dir}/tokenizer_config.json`, JSON.stringify(config));
    assertEquals((await TextTokenizer.load(dir)).hasChatTemplate, false);
    await Deno.writeTextFile(`${dir}/chat_template.jinja`, template);
    const tok = await TextTokenizer.load(dir);
    const fixture = await TextTokenizer.load(MINIMIND);
    const conv = [{ role: "user" as const, content: "hi" }];
    assertEquals(tok.applyChatTemplate(conv), fixture.applyChatTemplate(conv));
    // The folded-in template travels with the config text (into checkpoints).
    assertEquals(JSON.parse(tok.tokenizerConfigJson).chat_template, template);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("config: token objects, fallbacks, template variables, raise_exception, no template", async () => {
  const json = await Deno.readTextFile(`${MINIMIND}/tokenizer.json`);
  const config = {
    bos_token: { content: "<|im_start|>", special: true },
    eos_token: { content: "<|im_end|>" },
    chat_template: "{% for m in messages %}{% if m.role == 'system' %}" +
      "{{ raise_exception('no system turns here') }}{% endif %}" +
      "{{ bos_token + m.role + ':' + m.content + eos_token }}{% endfor %}" +
      "{% if add_generation_prompt %}{{ bos_token }}assistant:{% endif %}",
  };
  const tok = TextTokenizer.fromJson(json, JSON.stringify(config), "test");
  assertEquals([tok.bosId, tok.eosId], [1, 2]);
  assertEquals(tok.padId, tok.eosId); // no pad_token: eos pads
  assertEquals(
    tok.applyChatTemplate([{ role: "user", content: "x" }], { addGenerationPrompt: true }),
    "<|im_start|>user:x<|im_end|><|im_start|>assistant:",
  );
  assertThrows(
    () => tok.applyChatTemplate([{ role: "system", content: "s" }]),
    UserError,
    "no system turns here",
  );
  const bare = TextTokenizer.fromJson(json, JSON.stringify({ eos_token: "<|im_end|>" }), "bare");
  assertEquals(bare.bosId, 2); // no bos_token: documents start after eos
  assertEquals(bare.hasChatTemplate, false);
  assertThrows(
    () => bare.applyChatTemplate([{ role: "user", content: "x" }]),
    UserError,
    'has no "chat_template"',
  );
  assertThrows(
    () => TextTokenizer.fromJson(json, "{}", "noeos"),
    UserError,
    'no "eos_token"',
  );
});

/** Random strings over the characters where tokenizers tend to disagree. */
function trickyTexts(n: number, seed: number): string[] {
  const rng = new Rng(seed);
  const pieces = [
    "a",
    "Z",
    "7",
    "42",
    " ",
    "  ",
    "\n",
    "\t",
    "\r\n",
    "\u0085",
    "\u00a0",
    "\u3000",
    "\ufeff",
    "'s",
    "'ll",
    "'T",
    "’",
    ".",
    ",",
    "!?",
    "—",
    "你",
    "好",
    "，",
    "。",
    "鑫",
    "𠮷",
    "é",
    "e\u0301",
    "😀",
    "👨‍👩‍👧",
    "🇯🇵",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<think>",
    "<|im_sta",
    "<",
    "|",
    ">",
    "Hello",
    " world",
    "数据",
    " 123",
    "٣",
    "Ⅻ",
    "\u0000",
    "\u200d",
  ];
  const out: string[] = [];
  for (let i = 0; i < n; i++) {
    let s = "";
    for (let k = 1 + rng.nextInt(30); k > 0; k--) s += pieces[rng.nextInt(pieces.length)];
    out.push(s);
  }
  return out;
}

Deno.test("fast byte-level encoder gives the library's ids exactly", async () => {
  const corpus = embeddedCorpus();
  const texts = [
    ...trickyTexts(2000, 11),
    ...corpus.pretrain.slice(0, 300).map((d) => d.text),
  ];
  const minimind = await TextTokenizer.load(MINIMIND);
  const dflt = defaultTokenizer();
  for (const tok of [minimind, dflt]) {
    assert(tok.fastEncode, `${tok.source} should take the fast path`);
    const lib = new Tokenizer(JSON.parse(tok.tokenizerJson), JSON.parse(tok.tokenizerConfigJson));
    for (const r of corpus.sft.slice(0, 100)) texts.push(tok.applyChatTemplate(r.conversations));
    for (const t of texts) {
      assertEquals(
        tok.encode(t),
        lib.encode(t, { add_special_tokens: false }).ids,
        `${tok.source}: ${JSON.stringify(t)}`,
      );
      assertEquals(tok.decode(tok.encode(t)), t, JSON.stringify(t));
    }
  }
  // Files the fast path does not handle go through the library.
  const json = JSON.parse(minimind.tokenizerJson);
  json.normalizer = { type: "NFC" };
  const general = TextTokenizer.fromJson(JSON.stringify(json), minimind.tokenizerConfigJson);
  assert(!general.fastEncode);
  assertEquals(general.encode("你好，世界！Hello world."), [1968, 294, 1950, 1364, 1602, 1707, 49]);
});
