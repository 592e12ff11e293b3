/**
 * The embedded preference set for `trainer dpo`: pairs of answers to questions
 * about the invented valley of the embedded corpus (`corpus_world.ts`), in
 * MiniMind's `dpo.jsonl` format. Everything is derived from the world
 * generator and its phrasings (questions, answers, statements), so the pairs
 * follow the world when it changes.
 *
 * Each pair asks one question (sometimes after a system prompt) and answers
 * it twice. The chosen answer is the short, correct sentence an SFT model was
 * taught. The rejected one is either
 *
 * - wrong: the same sentence with another value of the same attribute (a
 *   different town, colour, month...), or
 * - rambling: the correct sentence followed by two statements about other
 *   entities of the valley that nobody asked about.
 *
 * So DPO after SFT pushes the model toward the facts of the prose and toward
 * short answers. The facts are split: `dpoEval` asks about facts that `dpo`
 * never does, so its reward accuracy measures a preference that generalizes
 * rather than a memorized pair.
 *
 * @module
 */
import { Rng } from "../util/random.ts";
import { writeJsonlIfChanged } from "../util/fs.ts";
import {
  ANSWERS,
  type Attribute,
  type Fact,
  fill,
  generateWorld,
  type Language,
  pick,
  QUESTIONS,
  STATEMENTS,
  systemPrompt,
  type World,
} from "./corpus_world.ts";
import type { ChatMessage } from "./tokenizer.ts";
import { DEFAULT_CORPUS_SEED } from "./corpus.ts";

/** One DPO record, MiniMind's format: the same prompt answered well and badly. */
export interface PreferenceRecord {
  /** The conversation ending in the preferred answer. */
  chosen: ChatMessage[];
  /** The same conversation ending in the worse answer. */
  rejected: ChatMessage[];
}

/** The two parts of the embedded preference set. */
export interface PreferenceSet {
  /** Training pairs. */
  dpo: PreferenceRecord[];
  /** Held-out pairs about facts `dpo` never asks about. */
  dpoEval: PreferenceRecord[];
}

/** Sizes of the preference set. */
export const PREFERENCE_SIZE = {
  dpo: 2000,
  dpoEval: 128,
  /** Fraction of the facts kept for `dpoEval` only. */
  evalFraction: 0.15,
  /** Fraction of pairs whose rejected answer is wrong (the rest ramble). */
  wrongFraction: 0.5,
  /** Fraction of pairs that open with a system prompt. */
  systemFraction: 0.2,
} as const;

/** File names `writePreferenceSet` writes, by part. */
export const PREFERENCE_FILES = { dpo: "dpo.jsonl", dpoEval: "dpo_eval.jsonl" } as const;

/**
 * Generates the preference set from the world of `seed` (the embedded
 * corpus's seed by default, so the pairs talk about the same valley). The
 * same seed gives the same pairs, record for record.
 *
 * @example
 * ```ts
 * import { embeddedPreferences } from "./preferences.ts";
 * const { dpo } = embeddedPreferences();
 * const { chosen, rejected } = dpo[0];
 * // chosen.at(-1)?.role === "assistant", and rejected asks the same question
 * if (chosen.at(-2)?.content !== rejected.at(-2)?.content) throw new Error();
 * ```
 */
export function embeddedPreferences(seed = DEFAULT_CORPUS_SEED): PreferenceSet {
  const world = generateWorld(new Rng(seed));
  // A stream of its own (seed + 7): the corpus's streams use seed .. seed + 6.
  const rng = new Rng(seed + 7);
  const facts = [...world.facts];
  rng.shuffle(facts);
  const nEval = Math.max(1, Math.round(facts.length * PREFERENCE_SIZE.evalFraction));
  return {
    dpoEval: writePairs(world, facts.slice(0, nEval), PREFERENCE_SIZE.dpoEval, rng),
    dpo: writePairs(world, facts.slice(nEval), PREFERENCE_SIZE.dpo, rng),
  };
}

/** Pairs about `facts`, each fact drawn at random with a random language and phrasing. */
function writePairs(world: World, facts: Fact[], count: number, rng: Rng): PreferenceRecord[] {
  // Every value an attribute takes in this world: the wrong answers come from here.
  const values = new Map<Attribute, Fact["value"][]>();
  for (const f of world.facts) {
    const list = values.get(f.attribute) ?? [];
    if (!list.some((v) => v.en === f.value.en)) list.push(f.value);
    values.set(f.attribute, list);
  }
  const entities = [...world.towns, ...world.people, ...world.creatures];
  const out: PreferenceRecord[] = [];
  for (let i = 0; i < count; i++) {
    const fact = pick(rng, facts);
    const lang: Language = rng.nextInt(2) === 0 ? "en" : "zh";
    const { entity, attribute, value } = fact;
    const say = (template: string, v = value) => fill(template, entity.name, v, lang, world.valley);
    const prompt: ChatMessage[] = [];
    if (rng.nextFloat() < PREFERENCE_SIZE.systemFraction) {
      prompt.push({
        role: "system",
        content: systemPrompt(rng, lang, world.valley),
      });
    }
    prompt.push({ role: "user", content: say(pick(rng, QUESTIONS[attribute][lang])) });
    const template = pick(rng, ANSWERS[attribute][lang]);
    const good = say(template);
    let bad: string;
    const others = values.get(attribute)!.filter((v) => v.en !== value.en);
    if (others.length > 0 && rng.nextFloat() < PREFERENCE_SIZE.wrongFraction) {
      bad = say(template, pick(rng, others));
    } else {
      // Two statements about other entities: true, but not what was asked.
      const extra: string[] = [];
      while (extra.length < 2) {
        const e = pick(rng, entities);
        if (e === entity) continue;
        const a = pick(rng, Object.keys(e.values) as Attribute[]);
        extra.push(fill(pick(rng, STATEMENTS[a][lang]), e.name, e.values[a]!, lang, world.valley));
      }
      bad = [good, ...extra].join(lang === "en" ? " " : "");
    }
    out.push({
      chosen: [...prompt, { role: "assistant", content: good }],
      rejected: [...prompt, { role: "assistant", content: bad }],
    });
  }
  return out;
}

/**
 * Writes the preference set as JSONL into `dir` (created if needed), leaving
 * files that already hold exactly this content alone (`writeJsonlIfChanged`).
 * Returns the paths by part.
 */
export async function writePreferenceSet(
  dir: string,
  seed?: number,
): Promise<Record<keyof PreferenceSet, string>> {
  const set = embeddedPreferences(seed);
  await Deno.mkdir(dir, { recursive: true });
  const paths = {} as Record<keyof PreferenceSet, string>;
  for (const part of Object.keys(PREFERENCE_FILES) as (keyof PreferenceSet)[]) {
    const path = `${dir.replace(/\/+$/, "")}/${PREFERENCE_FILES[part]}`;
    await writeJsonlIfChanged(path, set[part]);
    paths[part] = path;
  }
  return paths;
}
