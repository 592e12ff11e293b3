/**
 * `data/bpe.ts`: the GPT-2 alphabet and pre-tokenizer, merges against a naive
 * trainer that recounts every pair each step, a hand example, round trips
 * through our loader, determinism, exact vocabulary size, JSONL input, the
 * `tokenizer train` command, and (where Python `tokenizers` is installed) a
 * cross-check that the Rust library loads and agrees with our files.
 */
import {
  byteToUnicode,
  preTokenize,
  SPECIAL_TOKENS,
  trainBpe,
  trainTokenizerOnJsonl,
  trainTokenizerOnTexts,
  WordCounter,
} from "../data/bpe.ts";
import { tokenizerTrainCommand } from "../cli/tokenizer.ts";
import { TextTokenizer } from "../data/tokenizer.ts";
import { parseCommandArgs } from "../cli/args.ts";
import { UserError } from "../util/errors.ts";
import { Rng } from "../util/random.ts";
import { assert, assertEquals, assertRejects, assertThrows } from "./assert.ts";
import { findPython } from "./helpers.ts";

/** Mixed text: English, Chinese, digits, punctuation, whitespace runs. */
function sampleTexts(n: number, seed: number): string[] {
  const rng = new Rng(seed);
  const en = ["the", "river", "flows", "through", "town", "lower", "newest", "widest", "a", "of"];
  const zh = ["你好", "世界", "河流", "小镇", "节日", "木雕", "我们", "的"];
  const out: string[] = [];
  for (let i = 0; i < n; i++) {
    const parts: string[] = [];
    const len = 5 + rng.nextInt(20);
    for (let j = 0; j < len; j++) {
      const r = rng.nextInt(10);
      if (r < 5) parts.push(" " + en[rng.nextInt(en.length)]);
      else if (r < 8) parts.push(zh[rng.nextInt(zh.length)]);
      else if (r < 9) parts.push(` ${rng.nextInt(1000)}`);
      else parts.push([",", ".", "，", "。", "\n", "  ", "\t"][rng.nextInt(7)]);
    }
    out.push(parts.join(""));
  }
  return out;
}

/**
 * The textbook trainer: recount every adjacent pair of every word after each
 * merge, take the most frequent (ties: smallest (left id, right id)).
 */
function naiveMerges(counts: Map<string, number>, vocabSize: number): [string, string][] {
  const alphabet = byteToUnicode();
  const vocab = [...SPECIAL_TOKENS, ...[...alphabet].sort()];
  const id = new Map(vocab.map((t, i) => [t, i]));
  const words = [...counts].map(([w, c]) => ({
    syms: [...new TextEncoder().encode(w)].map((b) => id.get(alphabet[b])!),
    c,
  }));
  const merges: [string, string][] = [];
  while (vocab.length < vocabSize) {
    const pairs = new Map<string, number>();
    for (const { syms, c } of words) {
      for (let i = 0; i + 1 < syms.length; i++) {
        const k = `${syms[i]},${syms[i + 1]}`;
        pairs.set(k, (pairs.get(k) ?? 0) + c);
      }
    }
    let best: [number, number] | undefined, bestCount = 0;
    for (const [k, c] of pairs) {
      const [a, b] = k.split(",").map(Number);
      if (
        c > bestCount ||
        (c === bestCount && best && (a < best[0] || (a === best[0] && b < best[1])))
      ) {
        best = [a, b];
        bestCount = c;
      }
    }
    if (!best || bestCount < 2) break;
    const [a, b] = best;
    const merged = vocab[a] + vocab[b];
    let x = id.get(merged);
    if (x === undefined) {
      x = vocab.length;
      vocab.push(merged);
      id.set(merged, x);
    }
    merges.push([vocab[a], vocab[b]]);
    for (const w of words) {
      const out: number[] = [];
      for (let i = 0; i < w.syms.length;) {
        if (i + 1 < w.syms.length && w.syms[i] === a && w.syms[i + 1] === b) {
          out.push(x);
          i += 2;
        } else out.push(w.syms[i++]);
      }
      w.syms = out;
    }
  }
  return merges;
}

Deno.test("byte alphabet: 256 distinct printable symbols, GPT-2's mapping", () => {
  const a = byteToUnicode();
  assertEquals(new Set(a).size, 256);
  assertEquals([a[0x20], a[0x0a], a[0x41], a[0xff], a[0x00], a[0x7f]], [
    "Ġ",
    "Ċ",
    "A",
    "ÿ",
    "Ā",
    "ġ",
  ]);
});

Deno.test("pre-tokenizer: the GPT-2 split of the ByteLevel pre-tokenizer", () => {
  assertEquals(preTokenize("Hello  world's 123 你好，世界！\n\n  x"), [
    "Hello",
    " ",
    " world",
    "'s",
    " 123",
    " 你好",
    "，",
    "世界",
    "！",
    "\n\n ",
    " x",
  ]);
  // Oniguruma's \s (Unicode White_Space) includes U+0085 and excludes U+FEFF.
  assertEquals(preTokenize("a\u0085b"), ["a", "\u0085", "b"]);
  assertEquals(preTokenize("a\ufeffb"), ["a", "\ufeff", "b"]);
  const counter = new WordCounter();
  counter.add("x<|im_start|>y<|im_end|> x");
  assertEquals([...counter.counts], [["x", 1], ["y", 1], [" x", 1]]);
});

Deno.test("hand example: the first merges follow the counts and the tie rule", () => {
  // Sennrich et al.'s example: low x5, lower x2, newest x6, widest x3.
  const counts = new Map([["low", 5], ["lower", 2], ["newest", 6], ["widest", 3]]);
  const model = trainBpe(counts, { vocabSize: 259 + 7 });
  // es = st = 9 (tie: e < s), est = 9, lo = ow = 7 (l < o), low = 7,
  // then ne = ew = w·est = 6: ids order e < n < w, so ew, then n·ew, then new·est.
  assertEquals(model.merges, [
    ["e", "s"],
    ["es", "t"],
    ["l", "o"],
    ["lo", "w"],
    ["e", "w"],
    ["n", "ew"],
    ["new", "est"],
  ]);
  assertEquals(model.vocab.slice(0, 3), ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]);
  assertEquals(model.vocab.slice(3, 6), ["!", '"', "#"]); // byte symbols by code point
  assertEquals(model.vocab.slice(259), ["es", "est", "lo", "low", "ew", "new", "newest"]);
});

Deno.test("incremental merges equal the naive recount", () => {
  const counter = new WordCounter();
  for (const t of sampleTexts(300, 5)) counter.add(t);
  // Overlapping runs stress the pair bookkeeping: "aaaa" has (a,a) three times.
  for (const t of ["aaaa aaa abab ababab", "aaaaaa bbbb", "xyxyxy yxyx"]) counter.add(t);
  const fast = trainBpe(counter.counts, { vocabSize: 500 });
  const slow = naiveMerges(counter.counts, 500);
  assert(fast.merges.length > 150, `only ${fast.merges.length} merges`);
  assertEquals(fast.merges, slow);
});

Deno.test("round trip through TextTokenizer: scripts, emoji, whitespace", () => {
  const files = trainTokenizerOnTexts(sampleTexts(400, 1), { vocabSize: 600 });
  const tok = TextTokenizer.fromJson(files.tokenizerJson, files.tokenizerConfigJson);
  const texts = [
    "你好，世界！河流流过小镇。",
    "emoji 😀 and a family 👨‍👩‍👧‍👦, a flag 🇯🇵, skin tone 👋🏽",
    "mixed: English, 中文, Ελληνικά, русский, العربية, हिन्दी, 日本語のテキスト",
    "   spaces   runs    ",
    "tabs\t\tand\nnewlines\n\n\r\n end\n",
    "",
    "<|im_start|>user\nhi<|im_end|>\n",
    "\u0000 control \u0085 chars \ufeff",
  ];
  for (const t of texts) assertEquals(tok.decode(tok.encode(t)), t, JSON.stringify(t));
  assertEquals(tok.encode("<|endoftext|><|im_start|><|im_end|>"), [0, 1, 2]);
  assertEquals([tok.padId, tok.bosId, tok.eosId], [0, 1, 2]);
  assertEquals(
    tok.applyChatTemplate([
      { role: "system", content: "S" },
      { role: "user", content: "Q" },
      { role: "assistant", content: "A" },
    ]),
    "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n",
  );
  assertEquals(
    tok.applyChatTemplate([{ role: "user", content: "Q" }], { addGenerationPrompt: true }),
    "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n",
  );
  // Frequent words are single tokens: the merges are used by the encoder.
  assertEquals(tok.encode(" river").length, 1);
});

Deno.test("determinism, exact vocabulary size, token length cap", () => {
  const texts = sampleTexts(300, 2);
  const a = trainTokenizerOnTexts(texts, { vocabSize: 512 });
  const b = trainTokenizerOnTexts(texts, { vocabSize: 512 });
  assertEquals(a, b);
  const tok = TextTokenizer.fromJson(a.tokenizerJson, a.tokenizerConfigJson);
  assertEquals(tok.vocabSize, 512);
  assertEquals(Object.keys(JSON.parse(a.tokenizerJson).model.vocab).length, 512);
  const capped = trainTokenizerOnTexts(texts, { vocabSize: 400, maxTokenLength: 3 });
  const vocab: string[] = Object.keys(JSON.parse(capped.tokenizerJson).model.vocab);
  assert(vocab.filter((t) => !t.startsWith("<|")).every((t) => t.length <= 3));
  assertThrows(() => trainTokenizerOnTexts(texts, { vocabSize: 100 }), UserError, "too small");
});

Deno.test("JSONL input: text and conversations lines, gzip, same result as in memory", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const texts = sampleTexts(200, 3);
    const pre = texts.slice(0, 150).map((text) => JSON.stringify({ text })).join("\n") + "\n";
    const convs = [];
    for (let i = 150; i < 200; i += 2) {
      convs.push(JSON.stringify({
        conversations: [
          { role: "user", content: texts[i] },
          { role: "assistant", content: texts[i + 1] },
        ],
      }));
    }
    await Deno.writeTextFile(`${dir}/a.jsonl`, pre);
    const gz = new Blob([convs.join("\r\n")]).stream().pipeThrough(new CompressionStream("gzip"));
    await Deno.writeFile(`${dir}/b.jsonl.gz`, gz);
    const fromFiles = await trainTokenizerOnJsonl([dir], { vocabSize: 450 });
    const inMemory = trainTokenizerOnTexts(texts, { vocabSize: 450 });
    assertEquals(fromFiles.tokenizerJson, inMemory.tokenizerJson);
    assertEquals(fromFiles.texts, 200);
    assertEquals(fromFiles.bytesRead, new TextEncoder().encode(pre + convs.join("\r\n")).length);

    await Deno.writeTextFile(`${dir}/bad.jsonl`, '{"text": "ok"}\n\n{"txt": "no"}\n');
    await assertRejects(
      () => trainTokenizerOnJsonl([`${dir}/bad.jsonl`], { vocabSize: 300 }),
      UserError,
      `${dir}/bad.jsonl:3: expected {"text"`,
    );
    await Deno.writeTextFile(`${dir}/bad.jsonl`, '{"text": "ok"}\n{"text": "unterminated\n');
    await assertRejects(
      () => trainTokenizerOnJsonl([`${dir}/bad.jsonl`], { vocabSize: 300 }),
      UserError,
      `${dir}/bad.jsonl:2: invalid JSON`,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("tokenizer train command writes a loadable tokenizer directory", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const lines = sampleTexts(100, 4).map((text) => JSON.stringify({ text }));
    await Deno.writeTextFile(`${dir}/data.jsonl`, lines.join("\n"));
    const args = await parseCommandArgs(tokenizerTrainCommand, [
      "--data",
      `${dir}/data.jsonl`,
      "--vocab-size",
      "300",
      "--out",
      `${dir}/tok`,
      "--max-token-length",
      "4",
      "--quiet",
    ]);
    assert(args);
    assertEquals(await tokenizerTrainCommand.run(args), 0);
    const tok = await TextTokenizer.load(`${dir}/tok`);
    assertEquals(tok.vocabSize, 300);
    const longest = Math.max(
      ...Array.from({ length: 300 }, (_, i) => tok.idToToken(i)!).filter((t) => !t.startsWith("<|"))
        .map((t) => t.length),
    );
    assertEquals(longest, 4);
    const noOut = await parseCommandArgs(tokenizerTrainCommand, ["--data", `${dir}/data.jsonl`]);
    await assertRejects(async () => await tokenizerTrainCommand.run(noOut!), UserError, "--out");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

const { python: PYTHON, missing: tokenizersMissing } = findPython(["tokenizers"]);
if (tokenizersMissing) {
  console.log(`skipped: the Python tokenizers cross-check: ${tokenizersMissing}`);
}

Deno.test({
  name: "python tokenizers loads our files and encodes as we do",
  ignore: tokenizersMissing !== undefined,
}, async () => {
  const dir = await Deno.makeTempDir();
  try {
    const files = trainTokenizerOnTexts(sampleTexts(300, 6), { vocabSize: 500 });
    await Deno.writeTextFile(`${dir}/tokenizer.json`, files.tokenizerJson);
    const text = "你好，世界！ the river flows 123\n\t emoji 👨‍👩‍👧";
    const ours = TextTokenizer.fromJson(files.tokenizerJson, files.tokenizerConfigJson).encode(
      text,
    );
    const script = "import sys, json, tokenizers\n" +
      "t = tokenizers.Tokenizer.from_file(sys.argv[1])\n" +
      "print(json.dumps(t.encode(sys.argv[2], add_special_tokens=False).ids))";
    const out = await new Deno.Command(PYTHON!, {
      args: ["-c", script, `${dir}/tokenizer.json`, text],
    }).output();
    assert(out.success, new TextDecoder().decode(out.stderr));
    assertEquals(JSON.parse(new TextDecoder().decode(out.stdout)), ours);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
