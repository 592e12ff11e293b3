/**
 * The scoring of `trainer experiment`: pure functions from reply text to
 * verdicts, shares, the table and the JSON record. No device, no files.
 *
 * @module
 */
import type { HeldOutFact } from "../data/corpus.ts";

// ---------------------------------------------------------------------------
// Evaluation: pure functions on reply text.
// ---------------------------------------------------------------------------

/** The ChatML special tokens: a reply that contains one began a new turn or document. */
export const CHATML_SPECIAL_TOKENS: readonly string[] = [
  "<|im_start|>",
  "<|im_end|>",
  "<|endoftext|>",
];

/** The token that closes an assistant turn in ChatML. */
export const END_OF_TURN = "<|im_end|>";

/**
 * The most sentences an answer may have. The SFT data's replies are one
 * sentence each and the pretraining documents run to three or more, so a
 * reply of three or more sentences is prose continuing a document, not an
 * answer. Two leaves room for an answer plus one remark.
 */
export const MAX_ANSWER_SENTENCES = 2;

/** Why a reply is, or is not, in the assistant format. */
export type FormatVerdict =
  /** An answer: the turn closed with `<|im_end|>`, nothing else wrong. */
  | "ok"
  /** No `<|im_end|>` within the token budget (or the reply stopped at another special token first). */
  | "no-end"
  /** Nothing said before `<|im_end|>`: no letter or digit, only spaces, newlines or punctuation. */
  | "empty"
  /** A special token inside the reply: a new turn (`<|im_start|>`) or document began. */
  | "new-turn"
  /** The reply opens with a role name on its own line (`user`, `assistant`, `system`): the template spoken as text. */
  | "role-header"
  /** The reply is a question: the user's side of the conversation, continued. */
  | "question"
  /** More than `MAX_ANSWER_SENTENCES` sentences: a document continued. */
  | "document";

/** Sentences of `text`: runs ending in `.`, `!`, `?` (ASCII or full-width `。！？`), or the text's end. */
export function countSentences(text: string): number {
  const parts = text.split(/(?<=[.!?。！？])/u).map((s) => s.trim());
  // A closing mark alone (e.g. the second "." of "..") is no sentence of its own.
  return parts.filter((s) => /[\p{L}\p{N}]/u.test(s)).length;
}

/**
 * Whether a generated reply is in the assistant format, and if not, why.
 *
 * `reply` is the decoded text of the generated tokens with special tokens
 * kept (`decode(ids, { skipSpecialTokens: false })`), including the stop
 * token when one ended generation. The rules, in order:
 *
 * 1. it ends with `<|im_end|>` (the model closed its turn within the budget),
 *    else `no-end`;
 * 2. the text before that (the body) contains no special token, else
 *    `new-turn` (an `<|im_start|>` inside means a new turn was opened);
 * 3. the body has a letter or digit, else `empty` (blank lines and a lone
 *    `。` say nothing);
 * 4. its first line is not a bare role name, else `role-header`;
 * 5. its last sentence does not end in `?` / `？`, else `question`;
 * 6. it has at most `MAX_ANSWER_SENTENCES` sentences, else `document`.
 *
 * `specialTokens` is the tokenizer's set (default: ChatML's).
 */
export function replyFormat(
  reply: string,
  specialTokens: readonly string[] = CHATML_SPECIAL_TOKENS,
): FormatVerdict {
  if (!reply.endsWith(END_OF_TURN)) return "no-end";
  const body = reply.slice(0, reply.length - END_OF_TURN.length);
  if (specialTokens.some((t) => body.includes(t))) return "new-turn";
  const text = body.trim();
  if (!/[\p{L}\p{N}]/u.test(text)) return "empty";
  const firstLine = text.split("\n", 1)[0].trim().toLowerCase();
  if (["user", "assistant", "system"].includes(firstLine)) return "role-header";
  if (/[?？]$/u.test(text)) return "question";
  if (countSentences(text) > MAX_ANSWER_SENTENCES) return "document";
  return "ok";
}

/**
 * The reply's text before its first special token: what the model said in
 * this turn (a new turn or document that it began is not part of its answer).
 */
export function replyBody(
  reply: string,
  specialTokens: readonly string[] = CHATML_SPECIAL_TOKENS,
): string {
  let end = reply.length;
  for (const t of specialTokens) {
    const at = reply.indexOf(t);
    if (at >= 0 && at < end) end = at;
  }
  return reply.slice(0, end);
}

/**
 * Text for matching: Unicode NFKC (full-width forms to their plain ones),
 * lower case, every run of punctuation, symbols and whitespace to one space.
 */
export function normalizeForMatch(text: string): string {
  return text.normalize("NFKC").toLowerCase().replace(/[\p{P}\p{S}\s]+/gu, " ").trim();
}

const HAN = /\p{Script=Han}/u;

/**
 * Whether `reply` states `answer`: the answer appears in the reply's body
 * (`replyBody`), both normalised with `normalizeForMatch`. An answer with
 * Chinese characters matches as a substring with all spaces removed (Chinese
 * has no word boundaries); any other answer must match whole words, so
 * "red" is not found in "reduced" nor "Sipa" in "Sipanu".
 */
export function statesFact(
  reply: string,
  answer: string,
  specialTokens: readonly string[] = CHATML_SPECIAL_TOKENS,
): boolean {
  const body = normalizeForMatch(replyBody(reply, specialTokens));
  const want = normalizeForMatch(answer);
  if (want === "") throw new RangeError("statesFact: the answer is empty after normalisation");
  if (HAN.test(want)) return body.replace(/ /g, "").includes(want.replace(/ /g, ""));
  return ` ${body} `.includes(` ${want} `);
}

/** One arm's replies, judged. */
export interface ArmResult {
  /** `A`, `B`, `C` or `D`. */
  arm: string;
  /** What the arm is, in words. */
  label: string;
  /** The checkpoint directory the replies came from. */
  dir: string;
  /** Per held-out question, in order: the reply (special tokens kept) and its verdicts. */
  replies: { fact: HeldOutFact; reply: string; format: FormatVerdict; correct: boolean }[];
  /** Seconds spent training this arm's last stage. */
  trainSeconds: number;
  /** Losses of the arm's last stage, from its metrics.jsonl (undefined when none was logged). */
  losses?: StageLosses;
}

/** A training stage's losses as logged. */
export interface StageLosses {
  /** Step and loss of the first logged training step. */
  firstStep: number;
  first: number;
  /** The last logged training loss (the stage's last step). */
  last: number;
  /** The last held-out loss (pretrain eval prose for A, eval conversations for B and C). */
  eval?: number;
}

/** Per-arm shares of the table. */
export interface ArmSummary {
  arm: string;
  label: string;
  questions: number;
  /** Share of replies whose format verdict is `ok`. */
  formatShare: number;
  /** Share of replies that state the fact. */
  factShare: number;
  /** Share that are both: a correct answer in the assistant format. */
  bothShare: number;
  /** Count of each format verdict. */
  verdicts: Partial<Record<FormatVerdict, number>>;
}

/** Shares of one arm's judged replies. */
export function summarizeArm(result: ArmResult): ArmSummary {
  const n = result.replies.length;
  const share = (k: number) => (n === 0 ? 0 : k / n);
  const verdicts: Partial<Record<FormatVerdict, number>> = {};
  for (const r of result.replies) verdicts[r.format] = (verdicts[r.format] ?? 0) + 1;
  return {
    arm: result.arm,
    label: result.label,
    questions: n,
    formatShare: share(result.replies.filter((r) => r.format === "ok").length),
    factShare: share(result.replies.filter((r) => r.correct).length),
    bothShare: share(result.replies.filter((r) => r.format === "ok" && r.correct).length),
    verdicts,
  };
}

/**
 * The share a uniform guess of the right kind would get right: the mean over
 * the questions of `1 / choices` (the distinct values of the attribute asked).
 */
export function chanceShare(facts: readonly HeldOutFact[]): number {
  if (facts.length === 0) return 0;
  return facts.reduce((sum, f) => sum + 1 / f.choices, 0) / facts.length;
}

/** The settings of a run, as the JSON file records them. */
export interface ExperimentSettings {
  /** `preset NAME` or `model-config FILE`, and the model's shape. */
  model: { preset?: string; modelConfig?: string; parameters: number };
  stepsPretrain: number;
  stepsSft: number;
  batchSize: number;
  /** Tokens per row of the pretraining stages (and the cap of the SFT stages'). */
  seqLen: number;
  /** Tokens per row of the SFT stages: what the longest SFT conversation needs (`trainedRowLength`). */
  sftSeqLen: number;
  seed: number;
  corpusSeed: number;
  lrScratch: number;
  lrFinetune: number;
  maxNewTokens: number;
  /** Questions asked, of `heldOutTotal`. */
  questions: number;
  heldOutTotal: number;
}

/** What `--json` writes: per-arm shares (0 to 1), the augmentation contrast and the settings. */
export interface ExperimentJson {
  command: string;
  date: string;
  adapter: string;
  seconds: number;
  /** 1-minute load average at the start and end (Linux), or null. */
  load: { start: number | null; end: number | null };
  settings: ExperimentSettings;
  /** A uniform guess of the right kind (`chanceShare`). */
  chance: number;
  arms: Record<string, {
    label: string;
    format: number;
    fact: number;
    both: number;
    questions: number;
    verdicts: Partial<Record<FormatVerdict, number>>;
    trainSeconds: number;
  }>;
  /** C's and D's fact shares: paraphrased prose vs each fact stated once; difference in points. */
  augmentation: { paraphrased: number; once: number; differencePoints: number } | null;
}

/** The JSON record of a run (`trainer experiment --json FILE`). */
export function experimentJson(r: {
  command: string;
  date: Date;
  adapter: string;
  seconds: number;
  loadAtStart?: number;
  loadAtEnd?: number;
  settings: ExperimentSettings;
  facts: readonly HeldOutFact[];
  arms: readonly ArmResult[];
}): ExperimentJson {
  const arms: ExperimentJson["arms"] = {};
  for (const a of r.arms) {
    const s = summarizeArm(a);
    arms[a.arm] = {
      label: a.label,
      format: s.formatShare,
      fact: s.factShare,
      both: s.bothShare,
      questions: s.questions,
      verdicts: s.verdicts,
      trainSeconds: Math.round(a.trainSeconds * 10) / 10,
    };
  }
  const c = arms["C"], d = arms["D"];
  return {
    command: r.command,
    date: r.date.toISOString().replace(/\.\d+Z$/, "Z"),
    adapter: r.adapter,
    seconds: Math.round(r.seconds * 10) / 10,
    load: { start: r.loadAtStart ?? null, end: r.loadAtEnd ?? null },
    settings: r.settings,
    chance: chanceShare(r.facts),
    arms,
    augmentation: c && d
      ? {
        paraphrased: c.fact,
        once: d.fact,
        differencePoints: Math.round(1000 * (c.fact - d.fact)) / 10,
      }
      : null,
  };
}

/** A share as a whole percentage ("42%"). */
export function percent(x: number): string {
  return `${(100 * x).toFixed(0)}%`;
}

const VERDICT_ORDER: FormatVerdict[] = [
  "ok",
  "no-end",
  "empty",
  "new-turn",
  "role-header",
  "question",
  "document",
];

/** The results table as Markdown (also readable as plain text). */
export function formatTable(summaries: ArmSummary[]): string {
  const rows = [
    "| arm | training | questions | assistant format | states the fact | both | format verdicts |",
    "|---|---|---:|---:|---:|---:|---|",
  ];
  for (const s of summaries) {
    const verdicts = VERDICT_ORDER.filter((v) => s.verdicts[v]).map((v) => `${v} ${s.verdicts[v]}`)
      .join(", ");
    rows.push(
      `| ${s.arm} | ${s.label} | ${s.questions} | ${percent(s.formatShare)} | ${
        percent(s.factShare)
      } | ${percent(s.bothShare)} | ${verdicts} |`,
    );
  }
  return rows.join("\n");
}

/**
 * The sample questions: the first held-out question in each language, then
 * the next ones in corpus order, `n` in all.
 */
export function sampleIndices(facts: readonly HeldOutFact[], n = 3): number[] {
  const picked: number[] = [];
  for (const lang of ["en", "zh"]) {
    const i = facts.findIndex((f) => f.language === lang);
    if (i >= 0 && picked.length < n) picked.push(i);
  }
  for (let i = 0; i < facts.length && picked.length < n; i++) {
    if (!picked.includes(i)) picked.push(i);
  }
  return picked.sort((a, b) => a - b);
}

/** A reply shown on one line: newlines as `\n`, special tokens as they are. */
export function showReply(reply: string): string {
  return JSON.stringify(reply).slice(1, -1);
}

/** The augmentation contrast in one sentence (C against D), or undefined without D. */
export function augmentationLine(summaries: readonly ArmSummary[]): string | undefined {
  const c = summaries.find((s) => s.arm === "C");
  const d = summaries.find((s) => s.arm === "D");
  if (!c || !d) return undefined;
  const diff = Math.round(100 * (c.factShare - d.factShare));
  return `knowledge augmentation: pretrained on paraphrased prose (C) the model states the fact in ${
    percent(c.factShare)
  } of held-out questions, on prose that states each fact once (D) in ${percent(d.factShare)}: ${
    diff >= 0 ? "+" : ""
  }${diff} points`;
}
