/**
 * The invented world behind the embedded corpus: towns, people and animals of
 * a valley, each with a few attributes, named from syllables so that no name
 * means anything in real knowledge. Every name and value has an English and a
 * Chinese form (a syllable always becomes the same character), so a fact reads
 * the same in both languages.
 *
 * A fact is (entity, attribute, value). The corpus writes every fact as prose
 * in many phrasings, and asks about some of them in conversations; the
 * phrasings live here beside the attributes they describe.
 */
import type { Rng } from "../util/random.ts";

/** A word or phrase in both languages. */
export interface Bilingual {
  en: string;
  zh: string;
}

/** The corpus's two languages. */
export type Language = "en" | "zh";

const SYLLABLES: [string, string][] = [
  ["ba", "巴"],
  ["be", "贝"],
  ["bo", "博"],
  ["da", "达"],
  ["de", "德"],
  ["di", "迪"],
  ["do", "多"],
  ["ga", "加"],
  ["go", "戈"],
  ["ka", "卡"],
  ["ke", "克"],
  ["ki", "基"],
  ["ko", "科"],
  ["la", "拉"],
  ["le", "勒"],
  ["li", "利"],
  ["lo", "洛"],
  ["lu", "卢"],
  ["me", "梅"],
  ["mi", "米"],
  ["mo", "莫"],
  ["na", "纳"],
  ["ne", "内"],
  ["ni", "尼"],
  ["no", "诺"],
  ["pa", "帕"],
  ["pe", "佩"],
  ["ri", "里"],
  ["ro", "罗"],
  ["ru", "鲁"],
  ["sa", "萨"],
  ["se", "塞"],
  ["si", "西"],
  ["so", "索"],
  ["ta", "塔"],
  ["te", "特"],
  ["ti", "蒂"],
  ["to", "托"],
  ["va", "瓦"],
  ["ve", "维"],
  ["vo", "沃"],
  ["za", "扎"],
  ["ze", "泽"],
  ["zo", "佐"],
];

/** Months from March: "一月" and "二月" hide inside "十一月" and "十二月", so they are left out. */
const MONTHS: Bilingual[] = [
  ["March", "三月"],
  ["April", "四月"],
  ["May", "五月"],
  ["June", "六月"],
  ["July", "七月"],
  ["August", "八月"],
  ["September", "九月"],
  ["October", "十月"],
  ["November", "十一月"],
  ["December", "十二月"],
].map(([en, zh]) => ({ en, zh }));

const CRAFTS: Bilingual[] = [
  ["weaving", "织布"],
  ["pottery", "制陶"],
  ["glassblowing", "吹玻璃"],
  ["woodcarving", "木雕"],
  ["bell casting", "铸钟"],
  ["paper making", "造纸"],
  ["rope making", "制绳"],
  ["cheese making", "做奶酪"],
  ["boat building", "造船"],
  ["candle making", "做蜡烛"],
  ["lantern making", "做灯笼"],
  ["embroidery", "刺绣"],
].map(([en, zh]) => ({ en, zh }));

const PROFESSIONS: Bilingual[] = [
  ["baker", "面包师"],
  ["fisher", "渔夫"],
  ["teacher", "教师"],
  ["doctor", "医生"],
  ["potter", "陶匠"],
  ["carpenter", "木匠"],
  ["singer", "歌手"],
  ["farmer", "农夫"],
  ["painter", "画家"],
  ["sailor", "水手"],
  ["gardener", "园丁"],
  ["blacksmith", "铁匠"],
  ["librarian", "图书管理员"],
  ["astronomer", "天文学家"],
].map(([en, zh]) => ({ en, zh }));

const COLOURS: Bilingual[] = [
  ["red", "红色"],
  ["blue", "蓝色"],
  ["green", "绿色"],
  ["yellow", "黄色"],
  ["purple", "紫色"],
  ["orange", "橙色"],
  ["white", "白色"],
  ["black", "黑色"],
  ["grey", "灰色"],
  ["pink", "粉色"],
  ["silver", "银色"],
  ["gold", "金色"],
].map(([en, zh]) => ({ en, zh }));

const PETS: Bilingual[] = [
  ["cat", "猫"],
  ["dog", "狗"],
  ["parrot", "鹦鹉"],
  ["goat", "山羊"],
  ["tortoise", "乌龟"],
  ["rabbit", "兔子"],
  ["owl", "猫头鹰"],
  ["hedgehog", "刺猬"],
  ["squirrel", "松鼠"],
  ["duck", "鸭子"],
].map(([en, zh]) => ({ en, zh }));

const HABITATS: Bilingual[] = [
  ["forest", "森林"],
  ["marsh", "沼泽"],
  ["mountains", "高山"],
  ["desert", "沙漠"],
  ["lakes", "湖泊"],
  ["caves", "洞穴"],
  ["meadows", "草地"],
  ["coast", "海岸"],
].map(([en, zh]) => ({ en, zh }));

const FOODS: Bilingual[] = [
  ["berries", "浆果"],
  ["fish", "小鱼"],
  ["mushrooms", "蘑菇"],
  ["seeds", "种子"],
  ["moss", "苔藓"],
  ["honey", "蜂蜜"],
  ["leaves", "树叶"],
  ["insects", "昆虫"],
].map(([en, zh]) => ({ en, zh }));

const VALUE_WORDS = [MONTHS, CRAFTS, PROFESSIONS, COLOURS, PETS, HABITATS, FOODS].flat().map((v) =>
  v.en.toLowerCase()
);

/** Real words and places the syllables can spell (final-"e" words are excluded by rule). */
const REAL_WORDS = new Set([
  "bali",
  "banana",
  "bonito",
  "dakota",
  "data",
  "diva",
  "domino",
  "kilo",
  "kimono",
  "kobe",
  "lava",
  "logo",
  "lolita",
  "memo",
  "nagano",
  "peru",
  "pita",
  "salami",
  "sago",
  "samosa",
  "sari",
  "soda",
  "solo",
  "taro",
  "tiki",
  "toga",
  "togo",
  "toledo",
  "veto",
  "zero",
  "gala",
  "sega",
  "mimosa",
  "lasagna",
  "sonata",
  "zorro",
  "malta",
  "roma",
  "rio",
  "tokyo",
  "nazi",
  "dodo",
  "gogo",
  "momo",
  "tutu",
  "lulu",
  "mono",
  "dino",
  "sumo",
  "kino",
  "bingo",
  "demo",
  "rita",
  "bola",
  "velo",
  "meso",
  "nisi",
  "sela",
  "taco",
  "tobago",
  "lego",
  "kiwi",
  "pesos",
]);

/** What kind of thing an entity is. */
export type EntityKind = "town" | "person" | "creature";

/** The attributes, by kind. */
export type Attribute =
  | "river"
  | "festival"
  | "craft"
  | "hometown"
  | "profession"
  | "colour"
  | "pet"
  | "fur"
  | "habitat"
  | "food";

/** Which attributes each kind of entity has. */
export const ATTRIBUTES: Readonly<Record<EntityKind, readonly Attribute[]>> = {
  town: ["river", "festival", "craft"],
  person: ["hometown", "profession", "colour", "pet"],
  creature: ["fur", "habitat", "food"],
};

/** A town, person or animal with its attribute values. */
export interface Entity {
  kind: EntityKind;
  name: Bilingual;
  values: Partial<Record<Attribute, Bilingual>>;
}

/** One fact: entity, attribute, value. */
export interface Fact {
  entity: Entity;
  attribute: Attribute;
  value: Bilingual;
}

/** The generated world. */
export interface World {
  /** The valley's name. */
  valley: Bilingual;
  towns: Entity[];
  people: Entity[];
  creatures: Entity[];
  rivers: Bilingual[];
  facts: Fact[];
}

/** How many of each thing the world has. */
export const WORLD_SIZE = { towns: 8, rivers: 4, people: 14, creatures: 6 } as const;

/**
 * Builds the world from `rng`: names are 2-3 syllables, distinct, and no name
 * (in either language) contains another, so finding a name in text is exact.
 */
export function generateWorld(rng: Rng): World {
  const names: Bilingual[] = [];
  const newName = (minSyl: number, maxSyl: number): Bilingual => {
    for (;;) {
      const n = minSyl + rng.nextInt(maxSyl - minSyl + 1);
      let en = "", zh = "";
      for (let i = 0; i < n; i++) {
        const [s, c] = SYLLABLES[rng.nextInt(SYLLABLES.length)];
        en += s;
        zh += c;
      }
      en = en[0].toUpperCase() + en.slice(1);
      const lower = en.toLowerCase();
      const clash = names.some((o) =>
        o.en.toLowerCase().includes(lower) || lower.includes(o.en.toLowerCase()) ||
        o.zh.includes(zh) || zh.includes(o.zh)
      );
      // Nor may a name hide a value word ("Dogo" holds "dog"): an answer found
      // in a text must be the answer, not part of a name.
      if (clash || VALUE_WORDS.some((w) => lower.includes(w))) continue;
      // Invented means not a word: a final "e" makes English words (Bone,
      // Gone, Kite), and a few other syllable pairs are real words or places.
      if (lower.endsWith("e") || REAL_WORDS.has(lower)) continue;
      const name = { en, zh };
      names.push(name);
      return name;
    }
  };
  const pick = <T>(list: readonly T[]): T => list[rng.nextInt(list.length)];

  const valley = newName(3, 3);
  const rivers = Array.from({ length: WORLD_SIZE.rivers }, () => newName(2, 2));
  const towns: Entity[] = [];
  for (let i = 0; i < WORLD_SIZE.towns; i++) {
    towns.push({
      kind: "town",
      name: newName(3, 3),
      values: {
        // Every river flows through two towns: relations to write about.
        river: rivers[i % rivers.length],
        festival: pick(MONTHS),
        craft: CRAFTS[i % CRAFTS.length],
      },
    });
  }
  rng.shuffle(towns);
  const people: Entity[] = [];
  for (let i = 0; i < WORLD_SIZE.people; i++) {
    people.push({
      kind: "person",
      name: newName(2, 3),
      values: {
        hometown: towns[i % towns.length].name,
        profession: pick(PROFESSIONS),
        colour: pick(COLOURS),
        pet: pick(PETS),
      },
    });
  }
  rng.shuffle(people);
  const creatures: Entity[] = [];
  for (let i = 0; i < WORLD_SIZE.creatures; i++) {
    creatures.push({
      kind: "creature",
      name: { en: "", zh: "" },
      values: { fur: pick(COLOURS), habitat: HABITATS[i % HABITATS.length], food: pick(FOODS) },
    });
    // Animal names are common nouns: lower case in English.
    const n = newName(2, 2);
    creatures[i].name = { en: n.en.toLowerCase(), zh: n.zh };
  }
  const facts: Fact[] = [];
  for (const e of [...towns, ...people, ...creatures]) {
    for (const attribute of ATTRIBUTES[e.kind]) {
      facts.push({ entity: e, attribute, value: e.values[attribute]! });
    }
  }
  return { valley, towns, people, creatures, rivers, facts };
}

/** English indefinite article for a noun. */
export function article(noun: string): string {
  return /^[aeiou]/i.test(noun) ? "an" : "a";
}

/**
 * Fills `{E}` (entity), `{V}` (value), `{a V}` (value with its article) and `{W}`
 * (the valley) in a template.
 */
export function fill(
  template: string,
  entity: Bilingual,
  value: Bilingual,
  lang: Language,
  valley: Bilingual,
): string {
  return template
    .replaceAll("{E}", entity[lang])
    .replaceAll("{a V}", `${article(value.en)} ${value.en}`)
    .replaceAll("{V}", value[lang])
    .replaceAll("{W}", valley[lang]);
}

/**
 * Statements of a fact, by attribute and language: the paraphrases that the
 * pretraining prose draws from. `{E}` is the entity, `{V}` the value. The
 * animals are named with "the" in English ("the dorabi"). The first template
 * of every list names the entity before the value: it is the one phrasing of
 * the "stated once" prose (`onceDocument` in corpus.ts), and a fact stated
 * value-first only could not be recalled from the name (the reversal curse).
 */
export const STATEMENTS: Readonly<Record<Attribute, Record<Language, readonly string[]>>> = {
  river: {
    en: [
      "{E} lies on the river {V}.",
      "The river {V} flows through {E}.",
      "{E} was built on the banks of the {V}.",
      "The town of {E} stands beside the river {V}.",
      "In {E} you can walk along the river {V}.",
      "{E} gets its water from the river {V}.",
    ],
    zh: [
      "{E}坐落在{V}河边。",
      "{V}河从{E}流过。",
      "{E}建在{V}河的岸边。",
      "{E}镇位于{V}河旁。",
      "在{E}可以沿着{V}河散步。",
      "{E}的水来自{V}河。",
    ],
  },
  festival: {
    en: [
      "The festival of {E} takes place in {V}.",
      "Every year in {V}, {E} holds its festival.",
      "The people of {E} celebrate their festival in {V}.",
      "In {V} the streets of {E} fill with music for the festival.",
      "{E} holds its great festival in {V}.",
      "If you visit {E} in {V}, you will see its festival.",
    ],
    zh: [
      "{E}的节日在{V}举行。",
      "每年{V}，{E}都会举行节日。",
      "{E}的人们在{V}庆祝他们的节日。",
      "到了{V}，{E}的街上满是节日的音乐。",
      "{E}在{V}举行盛大的节日。",
      "如果你在{V}去{E}，就能看到那里的节日。",
    ],
  },
  craft: {
    en: [
      "{E} is famous for {V}.",
      "The most famous craft of {E} is {V}.",
      "Travellers come to {E} to see its {V}.",
      "For many years the people of {E} have been known for {V}.",
      "The craft that {E} is best known for is {V}.",
      "Ask anyone about {E} and they will mention its {V}.",
    ],
    zh: [
      "{E}以{V}闻名。",
      "{E}最有名的手艺是{V}。",
      "旅人们来到{E}，是为了看那里的{V}。",
      "多年来，{E}的人们一直以{V}著称。",
      "说起{E}，人们就会想到{V}。",
      "{E}的{V}远近闻名。",
    ],
  },
  hometown: {
    en: [
      "{E} comes from {V}.",
      "{E} was born in {V}.",
      "{E}'s home town is {V}.",
      "{E} grew up in {V}.",
      "The home town of {E} is {V}.",
      "{E} spent a childhood in {V}.",
    ],
    zh: [
      "{E}来自{V}。",
      "{E}出生在{V}。",
      "{E}的家乡是{V}。",
      "{E}在{V}长大。",
      "{E}的老家在{V}。",
      "{E}的童年是在{V}度过的。",
    ],
  },
  profession: {
    en: [
      "{E} works as {a V}.",
      "{E} is {a V}.",
      "By trade, {E} is {a V}.",
      "{E} earns a living as {a V}.",
      "{E} has worked as {a V} for many years.",
      "The job of {E} is to be {a V}.",
    ],
    zh: [
      "{E}是一名{V}。",
      "{E}的职业是{V}。",
      "{E}靠做{V}谋生。",
      "{E}是一位{V}。",
      "{E}做{V}已经很多年了。",
      "{E}的工作是当{V}。",
    ],
  },
  colour: {
    en: [
      "{E}'s favourite colour is {V}.",
      "{E} likes {V} more than any other colour.",
      "Of all colours, {E} loves {V} the most.",
      "{E} often wears {V} because it is the favourite colour.",
      "The colour that {E} likes best is {V}.",
    ],
    zh: [
      "{E}最喜欢的颜色是{V}。",
      "{E}最喜欢{V}。",
      "在所有颜色里，{E}最爱{V}。",
      "{E}常穿{V}的衣服，因为那是最喜欢的颜色。",
      "{E}喜欢的颜色是{V}。",
    ],
  },
  pet: {
    en: [
      "{E} has a pet {V}.",
      "{E} keeps {a V} at home.",
      "{E} lives with {a V} as a pet.",
      "The pet of {E} is {a V}.",
      "Every morning {E} feeds a pet {V}.",
    ],
    zh: [
      "{E}养了一只{V}。",
      "{E}的宠物是一只{V}。",
      "{E}家里有一只{V}。",
      "{E}和一只{V}住在一起。",
      "每天早上{E}都会喂自己的{V}。",
    ],
  },
  fur: {
    en: [
      "The {E} has {V} fur.",
      "The fur of the {E} is {V}.",
      "You can tell the {E} by its {V} fur.",
      "The {E} is covered in {V} fur.",
      "The coat of the {E} is {V}.",
    ],
    zh: [
      "{E}长着{V}的毛。",
      "{E}的毛是{V}的。",
      "看到{V}的毛，就知道是{E}。",
      "{E}全身都是{V}的毛。",
      "{E}身上的毛是{V}。",
    ],
  },
  habitat: {
    en: [
      "The {E} lives in the {V}.",
      "The {E} makes its home in the {V}.",
      "You find the {E} in the {V}.",
      "The home of the {E} is the {V}.",
      "The {E} is seldom seen outside the {V}.",
    ],
    zh: [
      "{E}生活在{V}里。",
      "{E}把家安在{V}中。",
      "在{V}里可以找到{E}。",
      "{E}的家在{V}。",
      "{E}很少离开{V}。",
    ],
  },
  food: {
    en: [
      "The {E} eats {V}.",
      "The {E} feeds on {V}.",
      "The favourite food of the {E} is {V}.",
      "The {E} spends the day looking for {V}.",
      "What the {E} likes to eat most is {V}.",
    ],
    zh: [
      "{E}吃{V}。",
      "{E}以{V}为食。",
      "{E}最爱吃的是{V}。",
      "{E}整天都在找{V}吃。",
      "{E}最喜欢的食物是{V}。",
    ],
  },
};

/**
 * Each fact once, after the entity has been named: the entity is referred to
 * by a pronoun (`{P}`: "It" for towns and animals, "He" or "She" for people;
 * `{Pp}`: "Its", "His", "Her"), as in Allen-Zhu & Li's "bioS single"
 * biographies. Used by the "stated once" prose only.
 */
export const PRONOUN_STATEMENTS: Readonly<Record<Attribute, Record<Language, string>>> = {
  river: { en: "{P} lies on the river {V}.", zh: "{P}坐落在{V}河边。" },
  festival: { en: "{Pp} festival takes place in {V}.", zh: "{P}的节日在{V}举行。" },
  craft: { en: "{P} is famous for {V}.", zh: "{P}以{V}闻名。" },
  hometown: { en: "{P} comes from {V}.", zh: "{P}来自{V}。" },
  profession: { en: "{P} works as {a V}.", zh: "{P}是一名{V}。" },
  colour: { en: "{Pp} favourite colour is {V}.", zh: "{P}最喜欢的颜色是{V}。" },
  pet: { en: "{P} has a pet {V}.", zh: "{P}养了一只{V}。" },
  fur: { en: "{P} has {V} fur.", zh: "{P}长着{V}的毛。" },
  habitat: { en: "{P} lives in the {V}.", zh: "{P}生活在{V}里。" },
  food: { en: "{P} eats {V}.", zh: "{P}吃{V}。" },
};

/**
 * The pronoun of an entity: "it" (它) for towns and animals; for a person
 * "he" (他) or "she" (她), fixed by the name's letters (no random draw, so the
 * world does not change).
 */
export function pronoun(e: Entity): { en: string; enPossessive: string; zh: string } {
  if (e.kind !== "person") return { en: "It", enPossessive: "Its", zh: "它" };
  let sum = 0;
  for (const ch of e.name.en) sum += ch.charCodeAt(0);
  return sum % 2 === 0
    ? { en: "He", enPossessive: "His", zh: "他" }
    : { en: "She", enPossessive: "Her", zh: "她" };
}

/** Questions about a fact; the held-out questions are made from the first of each list. */
export const QUESTIONS: Readonly<Record<Attribute, Record<Language, readonly string[]>>> = {
  river: {
    en: ["Which river flows through {E}?", "What river is {E} on?"],
    zh: ["哪条河流经{E}？", "{E}在哪条河边？"],
  },
  festival: {
    en: ["In which month is the festival of {E}?", "When does {E} hold its festival?"],
    zh: ["{E}的节日在几月？", "{E}在什么时候举行节日？"],
  },
  craft: {
    en: ["What is {E} famous for?", "What craft is {E} known for?"],
    zh: ["{E}以什么闻名？", "{E}最有名的手艺是什么？"],
  },
  hometown: {
    en: ["Where is {E} from?", "What is {E}'s home town?", "In which town was {E} born?"],
    zh: ["{E}来自哪里？", "{E}的家乡是哪里？", "{E}出生在哪个小镇？"],
  },
  profession: {
    en: ["What does {E} do for a living?", "What is {E}'s job?"],
    zh: ["{E}是做什么工作的？", "{E}的职业是什么？"],
  },
  colour: {
    en: ["What is {E}'s favourite colour?", "Which colour does {E} like best?"],
    zh: ["{E}最喜欢什么颜色？", "{E}最喜欢的颜色是什么？"],
  },
  pet: {
    en: ["What pet does {E} have?", "What animal does {E} keep as a pet?"],
    zh: ["{E}养了什么宠物？", "{E}的宠物是什么？"],
  },
  fur: {
    en: ["What colour is the fur of the {E}?", "What colour is the {E}?"],
    zh: ["{E}的毛是什么颜色的？", "{E}是什么颜色的？"],
  },
  habitat: {
    en: ["Where does the {E} live?", "Where can you find the {E}?"],
    zh: ["{E}生活在哪里？", "在哪里可以找到{E}？"],
  },
  food: {
    en: ["What does the {E} eat?", "What food does the {E} like?"],
    zh: ["{E}吃什么？", "{E}喜欢吃什么？"],
  },
};

/**
 * Answers: a sentence that holds the value, the entity named first (as the
 * question named it) so the answer recalls the value from the name.
 */
export const ANSWERS: Readonly<Record<Attribute, Record<Language, readonly string[]>>> = {
  river: {
    en: ["{E} lies on the river {V}.", "{E} is on the river {V}."],
    zh: ["{E}坐落在{V}河边。", "{E}在{V}河边。"],
  },
  festival: {
    en: ["The festival of {E} is in {V}.", "{E} holds its festival in {V}."],
    zh: ["{E}的节日在{V}。", "{E}在{V}举行节日。"],
  },
  craft: {
    en: ["{E} is famous for {V}.", "{E} is known for {V}."],
    zh: ["{E}以{V}闻名。", "{E}最有名的手艺是{V}。"],
  },
  hometown: {
    en: ["{E} is from {V}.", "{E}'s home town is {V}."],
    zh: ["{E}来自{V}。", "{E}的家乡是{V}。"],
  },
  profession: {
    en: ["{E} works as {a V}.", "{E} is {a V}."],
    zh: ["{E}是一名{V}。", "{E}的职业是{V}。"],
  },
  colour: {
    en: ["{E}'s favourite colour is {V}.", "{E} likes {V} best."],
    zh: ["{E}最喜欢{V}。", "{E}最喜欢的颜色是{V}。"],
  },
  pet: {
    en: ["{E} has a pet {V}.", "{E} keeps {a V} as a pet."],
    zh: ["{E}养了一只{V}。", "{E}的宠物是一只{V}。"],
  },
  fur: {
    en: ["The {E} has {V} fur.", "The fur of the {E} is {V}."],
    zh: ["{E}长着{V}的毛。", "{E}的毛是{V}的。"],
  },
  habitat: {
    en: ["The {E} lives in the {V}.", "The {E} is found in the {V}."],
    zh: ["{E}生活在{V}里。", "{E}住在{V}里。"],
  },
  food: {
    en: ["The {E} eats {V}.", "The {E} likes to eat {V}."],
    zh: ["{E}吃{V}。", "{E}喜欢吃{V}。"],
  },
};

/** How a document about an entity opens, by kind and language. */
export const INTROS: Readonly<Record<EntityKind, Record<Language, readonly string[]>>> = {
  town: {
    en: [
      "{E} is a small town in the valley of {W}.",
      "{E} is one of the old towns of {W}.",
      "Among the towns of {W}, {E} is well known.",
    ],
    zh: ["{E}是{W}山谷里的一座小镇。", "{E}是{W}的一座古老小镇。", "在{W}的小镇中，{E}很有名。"],
  },
  person: {
    en: [
      "{E} is a person who lives in the valley of {W}.",
      "This is about {E}.",
      "Many people in {W} know {E}.",
    ],
    zh: ["{E}是住在{W}山谷的一个人。", "这是关于{E}的介绍。", "{W}的很多人都认识{E}。"],
  },
  creature: {
    en: [
      "The {E} is a small animal of the valley of {W}.",
      "The {E} is an animal found only in {W}.",
      "People in {W} often talk about the {E}.",
    ],
    zh: ["{E}是{W}山谷里的一种小动物。", "{E}是一种只生活在{W}的动物。", "{W}的人们常常谈起{E}。"],
  },
};

/** System prompts of some SFT conversations. */
export const SYSTEM_PROMPTS: Readonly<Record<Language, readonly string[]>> = {
  en: [
    "You are a helpful assistant who knows the valley of {W}.",
    "You answer questions about the towns, people and animals of {W} in one short sentence.",
    "You are a friendly guide to the valley of {W}.",
  ],
  zh: [
    "你是一个了解{W}山谷的助手。",
    "你用一句简短的话回答关于{W}的小镇、人物和动物的问题。",
    "你是{W}山谷的友好向导。",
  ],
};

/** One element of `list`, drawn with `rng`. */
export function pick<T>(rng: Rng, list: readonly T[]): T {
  return list[rng.nextInt(list.length)];
}

/** A system prompt of the world in `lang`, drawn with `rng`, naming the valley. */
export function systemPrompt(rng: Rng, lang: Language, valley: Bilingual): string {
  return fill(pick(rng, SYSTEM_PROMPTS[lang]), valley, valley, lang, valley);
}
