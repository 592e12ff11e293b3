/**
 * The embedded default corpus: generated from a seed by this code, nothing
 * downloaded. A small invented valley (towns, people, animals; see
 * `corpus_world.ts`) described in English and Chinese:
 *
 * - pretrain: short encyclopedic documents, one entity each. Every document
 *   states all of its entity's facts, each in a paraphrase drawn at random
 *   (five or six per attribute and language) and in a random order, so every
 *   fact is written many times in varied phrasings: the "knowledge
 *   augmentation" that Allen-Zhu & Li (Physics of Language Models, Part 3.1,
 *   arXiv:2309.14316) found makes stored facts extractable by questions.
 * - pretrainOnce: the same facts stated once each: one document per entity
 *   and language, one fixed phrasing, one fixed order. The experiment trains
 *   on it with the same budget to show what augmentation buys.
 * - sft: question/answer conversations (some with a system prompt, some
 *   multi-turn) about three quarters of the towns, people and animals.
 * - heldOut: questions about the other quarter: facts that the pretraining
 *   prose states and that no conversation asks about (nor anything else about
 *   those entities), for the experiment "does a model answer questions it was
 *   never fine-tuned on": pretrain-only vs SFT-only vs pretrain + SFT.
 * - pretrainEval / sftEval: fresh documents and conversations for eval loss;
 *   the eval conversations use (fact, language, question) combinations that
 *   the training conversations never use.
 *
 * Sized for the `tiny` preset on a CPU driver: about 200k pretraining tokens
 * with the default tokenizer, a few thousand conversations.
 *
 * The default tokenizer (`defaultTokenizer()`) is a BPE of vocabulary 1558
 * trained on this corpus by `data/bpe.ts`; its files are committed under
 * `data/default_tokenizer/` and imported as JSON modules, so a compiled binary
 * embeds them. `deno run -A data/default_tokenizer/regenerate.ts` remakes them.
 */
import { Rng } from "../util/random.ts";
import { writeJsonlIfChanged } from "../util/fs.ts";
import { TextTokenizer } from "./tokenizer.ts";
import type { ChatMessage } from "./tokenizer.ts";
import {
  ANSWERS,
  type Attribute,
  ATTRIBUTES,
  type Entity,
  type Fact,
  fill,
  generateWorld,
  INTROS,
  type Language,
  pick,
  pronoun,
  PRONOUN_STATEMENTS,
  QUESTIONS,
  STATEMENTS,
  systemPrompt,
  type World,
} from "./corpus_world.ts";
import defaultTokenizerJson from "./default_tokenizer/tokenizer.json" with { type: "json" };
import defaultTokenizerConfigJson from "./default_tokenizer/tokenizer_config.json" with {
  type: "json",
};

/** One SFT record, MiniMind's format. */
export interface SftRecord {
  /** The turns in order: optional system, then alternating user and assistant. */
  conversations: ChatMessage[];
}

/** A question whose fact is in the pretraining prose; the SFT data asks nothing about its entity. */
export interface HeldOutFact {
  /** The question as a user would ask it, in `language`. */
  question: string;
  /** The short answer (a name or a word), as it appears in the prose. */
  answer: string;
  /** Language of the question and answer. */
  language: "en" | "zh";
  /** The entity asked about, in the question's language. */
  entity: string;
  /** The attribute asked about (`hometown`, `river`, ...). */
  attribute: string;
  /**
   * How many distinct values the attribute takes in the world: a guess of the
   * right kind, uniform over them, is right `1 / choices` of the time.
   */
  choices: number;
}

/** The five parts of the embedded corpus. */
export interface EmbeddedCorpus {
  /** Pretraining documents (MiniMind's `{"text"}` records). */
  pretrain: { text: string }[];
  /** Fresh documents (other phrasings and orders) for pretraining eval loss. */
  pretrainEval: { text: string }[];
  /** The same facts stated once: one document per entity and language, one phrasing, one order. */
  pretrainOnce: { text: string }[];
  /** SFT conversations about a subset of the facts. */
  sft: SftRecord[];
  /** Eval conversations with (fact, language, question) combinations `sft` never uses. */
  sftEval: SftRecord[];
  /** Questions (English and Chinese) on the facts of the entities `sft` never asks about. */
  heldOut: HeldOutFact[];
}

/** Sizes of the corpus parts. */
export const CORPUS_SIZE = {
  /** Documents per entity and language in `pretrain`. */
  docsPerEntity: 80,
  /** Size of `pretrainEval` relative to `pretrain`. */
  evalFraction: 0.05,
  sft: 3000,
  sftEval: 200,
  /** Fraction of the towns, people and animals whose facts SFT never asks about. */
  heldOutFraction: 0.25,
  /** Fraction of (fact, language, question) combinations kept for `sftEval` only. */
  sftEvalFraction: 0.1,
} as const;

/**
 * The vocabulary size of the default tokenizer (the `tiny` preset's): where
 * BPE on the embedded corpus runs out of pairs seen twice whose token would fit
 * `DEFAULT_TOKENIZER_MAX_TOKEN_BYTES`.
 */
export const DEFAULT_TOKENIZER_VOCAB_SIZE = 1558;
/** The longest token, in UTF-8 bytes, of the default tokenizer. */
export const DEFAULT_TOKENIZER_MAX_TOKEN_BYTES = 6;
/** The seed the default corpus (and so the default tokenizer) is made from. */
export const DEFAULT_CORPUS_SEED = 1234;

/**
 * Generates the corpus. The same seed gives the same corpus, record for record.
 * Separate random streams (world, prose, eval prose, conversations) keep one
 * part from shifting when another changes size.
 *
 * @example
 * ```ts
 * import { embeddedCorpus } from "./corpus.ts";
 * const { pretrain, sft, heldOut } = embeddedCorpus();
 * const doc: string = pretrain[0].text; // "Luroda works as a librarian. ..."
 * const turns = sft[0].conversations; // [{ role: "user", ... }, { role: "assistant", ... }]
 * const { question, answer } = heldOut[0]; // never asked in `sft`, stated in `pretrain`
 * ```
 */
export function embeddedCorpus(seed = DEFAULT_CORPUS_SEED): EmbeddedCorpus {
  const world = generateWorld(new Rng(seed));
  const split = splitFacts(world, new Rng(seed + 1));
  const entities = [...world.towns, ...world.people, ...world.creatures];

  const pretrain = writeDocuments(world, entities, CORPUS_SIZE.docsPerEntity, new Rng(seed + 2));
  // Fresh documents from another random stream: other phrasings and orders.
  const pretrainEval = writeDocuments(
    world,
    entities,
    Math.ceil(CORPUS_SIZE.docsPerEntity * CORPUS_SIZE.evalFraction),
    new Rng(seed + 3),
  );
  const pretrainOnce = entities.flatMap((e) =>
    (["en", "zh"] as const).map((lang) => onceDocument(world, e, lang))
  );
  const sft = writeConversations(world, split.sftTrain, CORPUS_SIZE.sft, new Rng(seed + 5));
  const sftEval = writeConversations(world, split.sftEval, CORPUS_SIZE.sftEval, new Rng(seed + 6));

  const heldOut: HeldOutFact[] = [];
  for (const f of split.heldOut) {
    for (const lang of ["en", "zh"] as const) {
      heldOut.push({
        question: fill(QUESTIONS[f.attribute][lang][0], f.entity.name, f.value, lang, world.valley),
        answer: f.value[lang],
        language: lang,
        entity: f.entity.name[lang],
        attribute: f.attribute,
        choices: new Set(
          world.facts.filter((g) => g.attribute === f.attribute).map((g) => g.value.en),
        ).size,
      });
    }
  }
  return {
    pretrain: pretrain.map((text) => ({ text })),
    pretrainEval: pretrainEval.map((text) => ({ text })),
    pretrainOnce: pretrainOnce.map((text) => ({ text })),
    sft,
    sftEval,
    heldOut,
  };
}

/** A question form: one fact asked in one language with one template. */
interface Asked {
  fact: Fact;
  lang: Language;
  template: number;
}

/**
 * Splits the facts by entity: `heldOutFraction` of the towns, of the people
 * and of the animals are held out, and no conversation asks about any of
 * their facts; the (fact, language, template) combinations of the other
 * entities' facts are divided between SFT training and SFT eval.
 *
 * Whole entities, not single facts: when some of an entity's facts are asked
 * in SFT and others held out, a small model learns to answer a question about
 * that entity with the fact it was fine-tuned on, whatever the question asks
 * (measured: replies naming the town's craft when asked its festival). A
 * held-out entity has no such shortcut; only what pretraining stored answers.
 */
function splitFacts(
  world: World,
  rng: Rng,
): { heldOut: Fact[]; sftTrain: Asked[]; sftEval: Asked[] } {
  const heldOut: Fact[] = [];
  const asked: Asked[] = [];
  for (const group of [world.towns, world.people, world.creatures]) {
    const shuffled = [...group];
    rng.shuffle(shuffled);
    const n = Math.max(1, Math.round(group.length * CORPUS_SIZE.heldOutFraction));
    const out = new Set(shuffled.slice(0, n));
    for (const fact of world.facts) {
      if (!group.includes(fact.entity)) continue;
      if (out.has(fact.entity)) {
        heldOut.push(fact);
        continue;
      }
      for (const lang of ["en", "zh"] as const) {
        QUESTIONS[fact.attribute][lang].forEach((_, template) =>
          asked.push({ fact, lang, template })
        );
      }
    }
  }
  rng.shuffle(asked);
  const nEval = Math.round(asked.length * CORPUS_SIZE.sftEvalFraction);
  // Keep the original fact order in held-out lists: readable heldout.jsonl.
  heldOut.sort((a, b) => world.facts.indexOf(a) - world.facts.indexOf(b));
  return { heldOut, sftEval: asked.slice(0, nEval), sftTrain: asked.slice(nEval) };
}

function statement(
  rng: Rng,
  world: World,
  e: Entity,
  attribute: Attribute,
  lang: Language,
): string {
  return fill(
    pick(rng, STATEMENTS[attribute][lang]),
    e.name,
    e.values[attribute]!,
    lang,
    world.valley,
  );
}

/** Joins sentences: with spaces in English, directly in Chinese. */
function join(sentences: string[], lang: Language): string {
  return sentences.join(lang === "en" ? " " : "");
}

/**
 * `perEntity` documents per entity and language, shuffled: each an intro and
 * every fact of the entity in a random phrasing and order.
 */
function writeDocuments(world: World, entities: Entity[], perEntity: number, rng: Rng): string[] {
  const docs: string[] = [];
  for (let round = 0; round < perEntity; round++) {
    for (const e of entities) {
      for (const lang of ["en", "zh"] as const) docs.push(entityDocument(world, e, lang, rng));
    }
  }
  rng.shuffle(docs);
  return docs;
}

function entityDocument(world: World, e: Entity, lang: Language, rng: Rng): string {
  const intro = fill(pick(rng, INTROS[e.kind][lang]), e.name, e.name, lang, world.valley);
  const facts = [...ATTRIBUTES[e.kind]];
  rng.shuffle(facts);
  return join([intro, ...facts.map((a) => statement(rng, world, e, a, lang))], lang);
}

/**
 * The entity's one "stated once" document in `lang`: the first intro, then
 * every fact once in the fixed order of `ATTRIBUTES`. `style` "names": each
 * fact in its first phrasing, which names the entity; "pronouns": the entity
 * referred to by a pronoun after the intro (`PRONOUN_STATEMENTS`), as in
 * Allen-Zhu & Li's bioS single.
 */
export function onceDocument(
  world: World,
  e: Entity,
  lang: Language,
  style: "names" | "pronouns" = ONCE_STYLE,
): string {
  const intro = fill(INTROS[e.kind][lang][0], e.name, e.name, lang, world.valley);
  const p = pronoun(e);
  const facts = ATTRIBUTES[e.kind].map((a) =>
    style === "names"
      ? fill(STATEMENTS[a][lang][0], e.name, e.values[a]!, lang, world.valley)
      : fill(
        PRONOUN_STATEMENTS[a][lang].replaceAll("{Pp}", p.enPossessive).replaceAll(
          "{P}",
          lang === "en" ? p.en : p.zh,
        ),
        e.name,
        e.values[a]!,
        lang,
        world.valley,
      )
  );
  return join([intro, ...facts], lang);
}

/** How `pretrainOnce` refers to the entity after its intro (`onceDocument`). */
export const ONCE_STYLE: "names" | "pronouns" = "pronouns";

/**
 * `count` conversations drawn from the allowed question forms: 60% one
 * question, 20% one question after a system prompt, 20% two or three
 * questions in a row. A conversation keeps one language.
 */
function writeConversations(world: World, asked: Asked[], count: number, rng: Rng): SftRecord[] {
  const byLang: Record<Language, Asked[]> = {
    en: asked.filter((a) => a.lang === "en"),
    zh: asked.filter((a) => a.lang === "zh"),
  };
  const turn = (a: Asked): ChatMessage[] => {
    const { entity, attribute, value } = a.fact;
    return [
      {
        role: "user",
        content: fill(
          QUESTIONS[attribute][a.lang][a.template],
          entity.name,
          value,
          a.lang,
          world.valley,
        ),
      },
      {
        role: "assistant",
        content: fill(
          pick(rng, ANSWERS[attribute][a.lang]),
          entity.name,
          value,
          a.lang,
          world.valley,
        ),
      },
    ];
  };
  const out: SftRecord[] = [];
  for (let i = 0; i < count; i++) {
    const lang: Language = rng.nextInt(2) === 0 ? "en" : "zh";
    const pool = byLang[lang];
    const kind = rng.nextFloat();
    const conversations: ChatMessage[] = [];
    if (kind >= 0.6 && kind < 0.8) {
      conversations.push({
        role: "system",
        content: systemPrompt(rng, lang, world.valley),
      });
    }
    const turns = kind >= 0.8 ? 2 + rng.nextInt(2) : 1;
    for (let t = 0; t < turns; t++) conversations.push(...turn(pick(rng, pool)));
    out.push({ conversations });
  }
  return out;
}

/** File names `writeEmbeddedCorpus` writes, by part. */
export const CORPUS_FILES = {
  pretrain: "pretrain.jsonl",
  pretrainEval: "pretrain_eval.jsonl",
  pretrainOnce: "pretrain_once.jsonl",
  sft: "sft.jsonl",
  sftEval: "sft_eval.jsonl",
  heldOut: "heldout.jsonl",
} as const;

/**
 * Writes the corpus as JSONL files into `dir` (created if needed), one record
 * per line, so it can be read, edited and trained on like any other data.
 * Files that already hold exactly this content are not rewritten
 * (`writeJsonlIfChanged`). Returns the paths by part.
 */
export async function writeEmbeddedCorpus(
  dir: string,
  seed = DEFAULT_CORPUS_SEED,
): Promise<{ files: Record<string, string> }> {
  const corpus = embeddedCorpus(seed);
  await Deno.mkdir(dir, { recursive: true });
  const files: Record<string, string> = {};
  for (const [part, name] of Object.entries(CORPUS_FILES)) {
    const records = corpus[part as keyof EmbeddedCorpus] as unknown[];
    const path = `${dir.replace(/\/+$/, "")}/${name}`;
    await writeJsonlIfChanged(path, records);
    files[part] = path;
  }
  return { files };
}

/** Every text of the corpus's training parts (prose and conversation turns): what the default tokenizer is trained on. */
export function corpusTrainingTexts(corpus: EmbeddedCorpus): string[] {
  const texts = corpus.pretrain.map((d) => d.text);
  for (const r of corpus.sft) for (const m of r.conversations) texts.push(m.content);
  return texts;
}

/**
 * The default tokenizer: byte-level BPE, vocabulary 1558, ChatML template,
 * trained on the embedded corpus. Read from the committed JSON, embedded in
 * compiled binaries; works from any working directory.
 */
export function defaultTokenizer(): TextTokenizer {
  return TextTokenizer.fromJson(
    JSON.stringify(defaultTokenizerJson, null, 2) + "\n",
    JSON.stringify(defaultTokenizerConfigJson, null, 2) + "\n",
    "<default tokenizer>",
  );
}
