/**
 * The embedded corpus and the default tokenizer: determinism, the held-out
 * facts kept out of every conversation yet present in the prose, both
 * languages, sizes, the written files, and the committed tokenizer equal to
 * what the trainer makes from the corpus now.
 */
import {
  CORPUS_FILES,
  DEFAULT_CORPUS_SEED,
  DEFAULT_TOKENIZER_VOCAB_SIZE,
  defaultTokenizer,
  embeddedCorpus,
  onceDocument,
  writeEmbeddedCorpus,
} from "../data/corpus.ts";
import { generateWorld, WORLD_SIZE } from "../data/corpus_world.ts";
import { Rng } from "../util/random.ts";
import { trainDefaultTokenizer } from "../data/default_tokenizer/regenerate.ts";
import { PRESETS } from "../model/config.ts";
import { assert, assertEquals, assertNotEquals } from "./assert.ts";

const corpus = embeddedCorpus();
const HAN = /\p{Script=Han}/u;
const LATIN = /[A-Za-z]{3}/;

/**
 * Words that every question about an attribute contains (and questions about
 * the entity's other attributes do not): a conversation that names a held-out
 * entity next to one of these asks about the held-out fact, whatever its wording.
 */
const ATTRIBUTE_WORDS: Record<string, { en: string[]; zh: string[] }> = {
  river: { en: ["river"], zh: ["河"] },
  festival: { en: ["festival"], zh: ["节日"] },
  craft: { en: ["famous", "known", "craft"], zh: ["闻名", "手艺"] },
  hometown: { en: ["from", "home town", "born"], zh: ["来自", "家乡", "出生"] },
  profession: { en: ["living", "job"], zh: ["工作", "职业"] },
  colour: { en: ["colour"], zh: ["颜色"] },
  pet: { en: ["pet"], zh: ["宠物"] },
  fur: { en: ["colour", "fur"], zh: ["颜色", "毛"] },
  habitat: { en: ["live", "find"], zh: ["生活", "找到"] },
  food: { en: ["eat", "food"], zh: ["吃"] },
};

Deno.test("corpus: the same seed gives the same corpus, another seed another", () => {
  assertEquals(embeddedCorpus(1234), corpus);
  const other = embeddedCorpus(99);
  assertNotEquals(other.pretrain[0], corpus.pretrain[0]);
  assertNotEquals(other.heldOut, corpus.heldOut);
});

Deno.test("corpus: held-out questions never appear in the SFT data", () => {
  assert(corpus.heldOut.length >= 20, `only ${corpus.heldOut.length} held-out questions`);
  const userTurns = [...corpus.sft, ...corpus.sftEval].flatMap((r) =>
    r.conversations.filter((m) => m.role === "user").map((m) => m.content)
  );
  const allTurns = new Set(
    [...corpus.sft, ...corpus.sftEval].flatMap((r) => r.conversations.map((m) => m.content)),
  );
  for (const h of corpus.heldOut) {
    assert(!allTurns.has(h.question), `held-out question in SFT data: ${h.question}`);
    const words = ATTRIBUTE_WORDS[h.attribute][h.language];
    assert(words.some((w) => h.question.includes(w)), `no attribute word in ${h.question}`);
    // A name only ever appears as itself (no name contains another), so
    // `includes` finds every question about this entity: there is none, in
    // any attribute (facts are held out by whole entity).
    const asked = userTurns.find((q) => q.includes(h.entity));
    assert(asked === undefined, `SFT asks about held-out ${h.entity}: ${asked}`);
  }
  // The check is not vacuous: every other entity is asked about, in both languages.
  const heldEntities = new Set(corpus.heldOut.map((h) => h.entity));
  const world = generateWorld(new Rng(DEFAULT_CORPUS_SEED));
  let others = 0;
  for (const e of [...world.towns, ...world.people, ...world.creatures]) {
    if (heldEntities.has(e.name.en)) continue;
    others++;
    for (const lang of ["en", "zh"] as const) {
      assert(userTurns.some((q) => q.includes(e.name[lang])), `nothing asks about ${e.name[lang]}`);
    }
  }
  assertEquals(
    others + heldEntities.size / 2,
    world.towns.length + world.people.length +
      world.creatures.length,
  );
});

Deno.test("corpus: every held-out answer is stated in the pretraining prose", () => {
  for (const h of corpus.heldOut) {
    const docs = corpus.pretrain.filter((d) =>
      d.text.includes(h.entity) && d.text.includes(h.answer)
    );
    assert(docs.length >= 10, `${h.entity}/${h.attribute} = ${h.answer}: in ${docs.length} docs`);
  }
});

Deno.test("corpus: the once-stated prose states every fact exactly once, held-out ones included", () => {
  // One document per entity and language.
  const world = generateWorld(new Rng(DEFAULT_CORPUS_SEED));
  const entities = [...world.towns, ...world.people, ...world.creatures];
  assertEquals(corpus.pretrainOnce.length, 2 * entities.length);
  assertEquals(
    corpus.pretrainOnce.map((d) => d.text),
    entities.flatMap((e) => [onceDocument(world, e, "en"), onceDocument(world, e, "zh")]),
  );
  for (const h of corpus.heldOut) {
    const docs = corpus.pretrainOnce.filter((d) =>
      d.text.includes(h.entity) && d.text.includes(h.answer)
    );
    assert(docs.length >= 1, `${h.entity}/${h.attribute} = ${h.answer} not in the once prose`);
    // Once: the paraphrased prose states it in many documents, this prose in one or two
    // (a town's name also appears in the documents of the people born there).
    assert(docs.length <= 3, `${h.entity}/${h.attribute}: ${docs.length} documents`);
  }
  // bioS single style: the name in the first sentence (an intro of the paraphrased prose),
  // a pronoun after it.
  const sentences = (t: string) => t.split(/(?<=[.。])\s*/u).filter((x) => x !== "");
  const paraphrased = new Set(corpus.pretrain.flatMap((d) => sentences(d.text)));
  entities.forEach((e, i) => {
    for (const [k, lang] of [[0, "en"], [1, "zh"]] as const) {
      const [intro, ...rest] = sentences(corpus.pretrainOnce[2 * i + k].text);
      assert(paraphrased.has(intro), `once intro not in the paraphrased prose: ${intro}`);
      assertEquals(rest.length, Object.keys(e.values).length);
      for (const r of rest) assert(!r.includes(e.name[lang]), `${r} names ${e.name[lang]}`);
    }
  });
});

Deno.test("corpus: held-out questions know how many values their attribute takes", () => {
  for (const h of corpus.heldOut) {
    assert(h.choices >= 2, `${h.attribute}: ${h.choices} values`);
  }
  const river = corpus.heldOut.find((h) => h.attribute === "river")!;
  assertEquals(river.choices, WORLD_SIZE.rivers);
});

Deno.test("corpus: both languages in every part; eval splits differ from training", () => {
  for (
    const [name, texts] of Object.entries({
      pretrain: corpus.pretrain.map((d) => d.text),
      pretrainEval: corpus.pretrainEval.map((d) => d.text),
      pretrainOnce: corpus.pretrainOnce.map((d) => d.text),
      sft: corpus.sft.flatMap((r) => r.conversations.map((m) => m.content)),
      sftEval: corpus.sftEval.flatMap((r) => r.conversations.map((m) => m.content)),
      heldOut: corpus.heldOut.map((h) => h.question),
    })
  ) {
    const zh = texts.filter((t) => HAN.test(t)).length;
    const en = texts.filter((t) => !HAN.test(t) && LATIN.test(t)).length;
    assert(zh > texts.length / 4 && en > texts.length / 4, `${name}: ${en} en, ${zh} zh`);
  }
  const trainQuestions = new Set(
    corpus.sft.flatMap((r) => r.conversations.filter((m) => m.role === "user")).map((m) =>
      m.content
    ),
  );
  for (const r of corpus.sftEval) {
    for (const m of r.conversations) {
      if (m.role === "user") assert(!trainQuestions.has(m.content), `in both: ${m.content}`);
    }
  }
  const roles = corpus.sft.map((r) => r.conversations.map((m) => m.role).join(","));
  assert(roles.some((r) => r.startsWith("system,user,assistant")));
  assert(roles.some((r) => r === "user,assistant,user,assistant"));
  assert(roles.every((r) => /^(system,)?(user,assistant,?)+$/.test(r)));
});

Deno.test("corpus: sizes suit the tiny preset on a CPU driver", () => {
  const tok = defaultTokenizer();
  let pretrainTokens = 0;
  for (const d of corpus.pretrain) pretrainTokens += tok.encode(d.text).length + 2; // + bos, eos
  assert(
    pretrainTokens >= 100_000 && pretrainTokens <= 300_000,
    `pretrain tokens ${pretrainTokens}`,
  );
  assert(corpus.sft.length >= 2000 && corpus.sft.length <= 5000, `sft ${corpus.sft.length}`);
  assert(corpus.pretrainEval.length >= 100, `pretrainEval ${corpus.pretrainEval.length}`);
  assert(corpus.sftEval.length >= 100, `sftEval ${corpus.sftEval.length}`);
  // Every conversation fits the tiny preset's context.
  const maxLen = Math.max(
    ...corpus.sft.map((r) => tok.encode(tok.applyChatTemplate(r.conversations)).length),
  );
  assert(maxLen <= PRESETS.tiny.max_position_embeddings, `longest conversation ${maxLen}`);
});

Deno.test("default tokenizer: committed files equal what the trainer makes now", async () => {
  const fresh = trainDefaultTokenizer();
  const dir = new URL("../data/default_tokenizer/", import.meta.url);
  assertEquals(
    await Deno.readTextFile(new URL("tokenizer.json", dir)),
    fresh.tokenizerJson,
    "data/default_tokenizer/tokenizer.json is stale: run deno run -A data/default_tokenizer/regenerate.ts",
  );
  assertEquals(
    await Deno.readTextFile(new URL("tokenizer_config.json", dir)),
    fresh.tokenizerConfigJson,
    "data/default_tokenizer/tokenizer_config.json is stale: run the regenerate script",
  );
  const tok = defaultTokenizer();
  assertEquals(tok.vocabSize, DEFAULT_TOKENIZER_VOCAB_SIZE);
  assertEquals(tok.vocabSize, PRESETS.tiny.vocab_size);
  assertEquals([tok.padId, tok.bosId, tok.eosId], [0, 1, 2]);
  // The JSON-module copy serializes back to the committed text.
  assertEquals(tok.tokenizerJson, fresh.tokenizerJson);
  for (const d of corpus.pretrainEval.slice(0, 50)) {
    assertEquals(tok.decode(tok.encode(d.text)), d.text);
  }
  const conv = corpus.sft[0].conversations;
  assertEquals(tok.decode(tok.encode(tok.applyChatTemplate(conv))), tok.applyChatTemplate(conv));
});

Deno.test("writeEmbeddedCorpus: six JSONL files that read back as the corpus", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const { files } = await writeEmbeddedCorpus(`${dir}/corpus`);
    assertEquals(Object.keys(files).sort(), Object.keys(CORPUS_FILES).sort());
    for (const [part, path] of Object.entries(files)) {
      const lines = (await Deno.readTextFile(path)).trimEnd().split("\n");
      assertEquals(lines.map((l) => JSON.parse(l)), corpus[part as keyof typeof corpus], part);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
