/**
 * `trainer experiment`: the evaluation rules on hand-made replies, and a
 * shortened experiment end to end (three arms of a few steps on a small model)
 * that must produce the table and the report with every arm.
 */
import {
  assert,
  assertAlmostEquals,
  assertEquals,
  assertMatch,
  assertRejects,
  assertStringIncludes,
} from "./assert.ts";
import { Gpu } from "../kernels/runtime.ts";
import { runExperimentCommand } from "../cli/experiment.ts";
import {
  type ArmResult,
  augmentationLine,
  chanceShare,
  countSentences,
  experimentJson,
  type ExperimentSettings,
  formatTable,
  normalizeForMatch,
  replyBody,
  replyFormat,
  sampleIndices,
  statesFact,
  summarizeArm,
} from "../train/experiment.ts";
import { defaultTokenizer, type HeldOutFact } from "../data/corpus.ts";
import { trainedRowLength } from "../data/stream.ts";
import { UsageError } from "../util/errors.ts";

Deno.test("replyFormat: a closed one-sentence answer is in the assistant format", () => {
  assertEquals(replyFormat("Medemo is famous for woodcarving.<|im_end|>"), "ok");
  assertEquals(replyFormat("梅德莫以木雕闻名。<|im_end|>"), "ok");
  // Two sentences are still an answer; no final full stop is fine.
  assertEquals(replyFormat("It is Sipa. The river is long<|im_end|>"), "ok");
  // A leading newline (the header's) and trailing spaces do not matter.
  assertEquals(replyFormat("\nDecember \n<|im_end|>"), "ok");
});

Deno.test("replyFormat: no <|im_end|> within the budget is no-end", () => {
  assertEquals(replyFormat("Medemo is famous for woodcarving. Medemo lies on"), "no-end");
  assertEquals(replyFormat(""), "no-end");
  // The document eos of a tokenizer whose eos differs from <|im_end|> is no end of turn.
  assertEquals(replyFormat("Medemo is famous for woodcarving.<|endoftext|>"), "no-end");
  // Ending at a new turn's opener is not closing this one.
  assertEquals(replyFormat("Sipa.<|im_start|>"), "no-end");
  // <|im_end|> then more text: the reply did not end with it.
  assertEquals(replyFormat("Sipa.<|im_end|>\n"), "no-end");
});

Deno.test("replyFormat: a special token inside the reply is a new turn", () => {
  assertEquals(
    replyFormat("Sipa.<|im_end|>\n<|im_start|>user\nAnd the festival?<|im_end|>"),
    "new-turn",
  );
  assertEquals(replyFormat("<|im_start|>assistant\nSipa.<|im_end|>"), "new-turn");
  assertEquals(replyFormat("Sipa<|endoftext|>.<|im_end|>"), "new-turn");
  // A tokenizer's own special tokens can be given.
  assertEquals(replyFormat("Sipa <think>.<|im_end|>", ["<think>", "<|im_end|>"]), "new-turn");
  assertEquals(replyFormat("Sipa <think>.<|im_end|>"), "ok");
});

Deno.test("replyFormat: nothing said is empty", () => {
  assertEquals(replyFormat("<|im_end|>"), "empty");
  assertEquals(replyFormat("\n\n  \n<|im_end|>"), "empty");
  // Punctuation alone says nothing: seen from undertrained models.
  assertEquals(replyFormat("\n\n\n。<|im_end|>"), "empty");
  assertEquals(replyFormat("...<|im_end|>"), "empty");
  // A digit is content.
  assertEquals(replyFormat("12<|im_end|>"), "ok");
});

Deno.test("replyFormat: the template spoken as text is a role header", () => {
  assertEquals(replyFormat("user\nWhat is Medemo famous for?<|im_end|>"), "role-header");
  assertEquals(replyFormat("Assistant\nSipa.<|im_end|>"), "role-header");
  assertEquals(replyFormat("system<|im_end|>"), "role-header");
  // A role word inside a sentence is just a word.
  assertEquals(replyFormat("The user asked about Sipa.<|im_end|>"), "ok");
});

Deno.test("replyFormat: a question continues the user's side", () => {
  assertEquals(replyFormat("Which river flows through Netava?<|im_end|>"), "question");
  assertEquals(replyFormat("哪条河流经内塔瓦？<|im_end|>"), "question");
  assertEquals(replyFormat("Sipa. What about Medemo? <|im_end|>"), "question");
  // A question mark inside, not at the end, does not make a question.
  assertEquals(replyFormat("Is it Sipa? Yes, it is Sipa.<|im_end|>"), "ok");
});

Deno.test("replyFormat: three or more sentences are a document continued", () => {
  assertEquals(
    replyFormat(
      "Medemo is a town. Medemo is famous for woodcarving. The river Sipa flows through it.<|im_end|>",
    ),
    "document",
  );
  assertEquals(
    replyFormat("梅德莫是一个小镇。梅德莫以木雕闻名。西帕河流经梅德莫。<|im_end|>"),
    "document",
  );
  assertEquals(replyFormat("A. B.<|im_end|>"), "ok");
});

Deno.test("countSentences counts runs ending in . ! ? and their full-width forms", () => {
  assertEquals(countSentences(""), 0);
  assertEquals(countSentences("Sipa"), 1);
  assertEquals(countSentences("Sipa. Medemo! Why? Then"), 4);
  assertEquals(countSentences("西帕。梅德莫！为什么？"), 3);
  // Runs of marks and marks alone add no sentence.
  assertEquals(countSentences("Well... so. !"), 2);
});

Deno.test("normalizeForMatch folds case, width, punctuation and spaces", () => {
  assertEquals(normalizeForMatch("  The River,  SIPA!\n"), "the river sipa");
  assertEquals(normalizeForMatch("ＳＩＰＡ"), "sipa"); // full-width letters (NFKC)
  assertEquals(normalizeForMatch("西帕河流经内塔瓦。"), "西帕河流经内塔瓦");
  assertEquals(normalizeForMatch("Tikemo's"), "tikemo s");
});

Deno.test("statesFact (English): whole words, any case and punctuation", () => {
  assert(statesFact("Medemo is famous for woodcarving.<|im_end|>", "woodcarving"));
  assert(statesFact("WOODCARVING!<|im_end|>", "woodcarving"));
  assert(statesFact("It is held in December<|im_end|>", "december"));
  assert(statesFact("The river is Sipa,", "Sipa")); // no end of turn: still states it
  assert(statesFact("Tikemo works as a doctor.", "a doctor"));
  assert(statesFact("a   doctor", "a doctor"));
  assert(!statesFact("Medemo is famous for pottery.<|im_end|>", "woodcarving"));
  // Whole words: a longer word containing the answer is not the answer.
  assert(!statesFact("The river Sipanu flows there.", "Sipa"));
  assert(!statesFact("It reduced.", "red"));
  assert(!statesFact("<|im_end|>", "Sipa"));
});

Deno.test("statesFact (Chinese): substring after normalisation", () => {
  assert(statesFact("梅德莫以木雕闻名。<|im_end|>", "木雕"));
  assert(statesFact("基基博的节日在十二月。", "十二月"));
  // Spaces and punctuation between the characters do not hide the answer.
  assert(statesFact("西 帕，河", "西帕"));
  assert(!statesFact("梅德莫以陶器闻名。<|im_end|>", "木雕"));
  // A partial answer is not the answer.
  assert(!statesFact("基基博的节日在二月。", "十二月"));
});

Deno.test("statesFact counts only the text before the first special token", () => {
  assert(!statesFact("Pottery.<|im_end|>\n<|im_start|>assistant\nWoodcarving.", "woodcarving"));
  assert(!statesFact("<|im_start|>user\nIs it woodcarving?", "woodcarving"));
  assertEquals(replyBody("Sipa.<|im_end|>more"), "Sipa.");
  assertEquals(replyBody("no special token"), "no special token");
});

const facts: HeldOutFact[] = [
  {
    question: "Q1?",
    answer: "Sipa",
    language: "en",
    entity: "Netava",
    attribute: "river",
    choices: 4,
  },
  {
    question: "Q2?",
    answer: "Tova",
    language: "en",
    entity: "Medemo",
    attribute: "river",
    choices: 4,
  },
  {
    question: "问题？",
    answer: "西帕",
    language: "zh",
    entity: "内塔瓦",
    attribute: "river",
    choices: 4,
  },
  {
    question: "Q4?",
    answer: "May",
    language: "en",
    entity: "Kikibo",
    attribute: "festival",
    choices: 10,
  },
];

/** An arm judged by the rules from hand-made replies, one per fact of `facts`. */
function judged(arm: string, label: string, replies: string[]): ArmResult {
  return {
    arm,
    label,
    dir: `out/${arm}`,
    trainSeconds: 12.34,
    replies: replies.map((reply, i) => ({
      fact: facts[i],
      reply,
      format: replyFormat(reply),
      correct: statesFact(reply, facts[i].answer),
    })),
  };
}

Deno.test("sampleIndices mixes languages, in corpus order", () => {
  assertEquals(sampleIndices(facts), [0, 1, 2]);
  assertEquals(sampleIndices([facts[0], facts[1], facts[3], facts[2]]), [0, 1, 3]);
  assertEquals(sampleIndices(facts.slice(0, 2)), [0, 1]);
  assertEquals(sampleIndices(facts, 2), [0, 2]);
});

Deno.test("summarizeArm and formatTable: shares and verdict counts", () => {
  const replies = [
    "The river Sipa flows through Netava.<|im_end|>", // ok, correct
    "Sipa.<|im_end|>", // ok, wrong (answer Tova)
    "西帕河流经内塔瓦。西帕。西帕。西帕。", // no-end, correct
    "<|im_end|>", // empty, wrong
  ];
  const arm: ArmResult = {
    arm: "C",
    label: "pretrain + SFT",
    dir: "x",
    trainSeconds: 1,
    replies: replies.map((reply, i) => ({
      fact: facts[i],
      reply,
      format: replyFormat(reply),
      correct: statesFact(reply, facts[i].answer),
    })),
  };
  const s = summarizeArm(arm);
  assertEquals(s.questions, 4);
  assertEquals(s.formatShare, 0.5);
  assertEquals(s.factShare, 0.5);
  assertEquals(s.bothShare, 0.25);
  assertEquals(s.verdicts, { ok: 2, "no-end": 1, empty: 1 });
  const table = formatTable([s]);
  assertStringIncludes(
    table,
    "| C | pretrain + SFT | 4 | 50% | 50% | 25% | ok 2, no-end 1, empty 1 |",
  );
});

Deno.test("chanceShare: the mean of 1 / choices over the questions", () => {
  assertEquals(chanceShare([]), 0);
  assertEquals(chanceShare(facts.slice(0, 3)), 0.25);
  assertAlmostEquals(chanceShare(facts), (3 * 0.25 + 0.1) / 4, 1e-12);
});

Deno.test("experimentJson: per-arm shares, chance, the augmentation contrast and the settings", () => {
  const settings: ExperimentSettings = {
    model: { preset: "tiny", parameters: 123 },
    stepsPretrain: 10,
    stepsSft: 5,
    batchSize: 4,
    seqLen: 32,
    sftSeqLen: 32,
    seed: 1,
    corpusSeed: 1234,
    lrScratch: 5e-4,
    lrFinetune: 2e-4,
    maxNewTokens: 8,
    questions: 4,
    heldOutTotal: 56,
  };
  const c = judged("C", "pretrain + SFT", [
    "Netava lies on the river Sipa.<|im_end|>", // ok, correct
    "Medemo lies on the river Tova.<|im_end|>", // ok, correct
    "内塔瓦坐落在西帕河边。<|im_end|>", // ok, correct
    "It is in June.<|im_end|>", // ok, wrong
  ]);
  const d = judged("D", "once", [
    "Netava lies on the river Tova.<|im_end|>", // ok, wrong
    "Medemo lies on the river Tova.<|im_end|>", // ok, correct
    "西帕", // no-end, correct
    "It is in June.<|im_end|>", // ok, wrong
  ]);
  const json = experimentJson({
    command: "trainer experiment --json x.json",
    date: new Date("2026-12-03T07:00:00.123Z"),
    adapter: "llvmpipe",
    seconds: 61.26,
    loadAtStart: 2.5,
    settings,
    facts,
    arms: [c, d],
  });
  assertEquals(json.arms["C"], {
    label: "pretrain + SFT",
    format: 1,
    fact: 0.75,
    both: 0.75,
    questions: 4,
    verdicts: { ok: 4 },
    trainSeconds: 12.3,
  });
  assertEquals(json.arms["D"].format, 0.75);
  assertEquals(json.arms["D"].fact, 0.5);
  assertEquals(json.arms["D"].both, 0.25);
  assertEquals(json.augmentation, { paraphrased: 0.75, once: 0.5, differencePoints: 25 });
  assertEquals(json.date, "2026-12-03T07:00:00Z");
  assertEquals(json.load, { start: 2.5, end: null });
  assertEquals(json.seconds, 61.3);
  assertEquals(json.settings, settings);
  assertAlmostEquals(json.chance, chanceShare(facts), 1e-12);
  // Without arm D there is no contrast.
  assertEquals(
    experimentJson({
      ...{ command: "", date: new Date(), adapter: "", seconds: 0 },
      settings,
      facts,
      arms: [c],
    }).augmentation,
    null,
  );
  // Round-trips through JSON text (no undefined, no NaN).
  assertEquals(JSON.parse(JSON.stringify(json)), json);
});

Deno.test("augmentationLine: C against D in points, only when both ran", () => {
  const c = summarizeArm(
    judged("C", "c", ["Sipa.<|im_end|>", "Tova.<|im_end|>", "西帕。<|im_end|>", "May.<|im_end|>"]),
  );
  const d = summarizeArm(
    judged("D", "d", ["Sipa.<|im_end|>", "x<|im_end|>", "x<|im_end|>", "x<|im_end|>"]),
  );
  assertStringIncludes(augmentationLine([c, d])!, "(C) the model states the fact in 100%");
  assertStringIncludes(augmentationLine([c, d])!, "(D) in 25%: +75 points");
  assertStringIncludes(
    augmentationLine([d, c].map((s) => ({ ...s, arm: s.arm === "C" ? "D" : "C" })))!,
    "-75 points",
  );
  assertEquals(augmentationLine([c]), undefined);
});

Deno.test("trainer experiment: a shortened run trains four arms and writes the report and JSON", async () => {
  const root = await Deno.makeTempDir({ prefix: "trainer-experiment-test-" });
  const gpu = await Gpu.request();
  try {
    const modelConfig = `${root}/small.jsonc`;
    await Deno.writeTextFile(
      modelConfig,
      `{ // small enough for seconds per stage on a CPU driver; 128 positions hold a question + reply
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "intermediate_size": 64, "max_position_embeddings": 128 }`,
    );
    const lines: string[] = [];
    const report = `${root}/docs/experiment.md`;
    const values = {
      "model-config": modelConfig,
      "steps-pretrain": "3",
      "steps-sft": "3",
      "batch-size": "4",
      "seq-len": "112",
      questions: "4",
      "max-new-tokens": "6",
      out: `${root}/out`,
      report,
      json: `${root}/results/experiment.json`,
    };
    const ran = await runExperimentCommand({ values, positionals: [] }, {
      gpu,
      print: (l) => lines.push(l),
    });
    assert(ran !== undefined, "a training run returns its results");
    const result = ran;
    const printed = lines.join("\n");

    assertEquals(result.arms.map((a) => a.arm), ["A", "B", "C", "D"]);
    for (const arm of result.arms) {
      assertEquals(arm.replies.length, 4);
      await Deno.stat(`${arm.dir}/model.safetensors`);
      for (const r of arm.replies) {
        // The stored verdicts are the rules applied to the stored replies.
        assertEquals(r.format, replyFormat(r.reply));
        assertEquals(r.correct, statesFact(r.reply, r.fact.answer));
      }
    }
    // The SFT stages' rows are as long as the corpus's longest conversation
    // needs (below --seq-len 112), the pretraining rows --seq-len.
    const data = `${root}/out/data`;
    const sftRows = await trainedRowLength({
      data: [`${data}/sft.jsonl`, `${data}/sft_eval.jsonl`],
      kind: "sft",
      tokenizer: defaultTokenizer(),
      batchSize: 4,
      seqLen: 112,
    });
    assert(sftRows < 112, `SFT rows ${sftRows}`);
    assertEquals(result.json.settings.sftSeqLen, sftRows);
    assertStringIncludes(printed, "[A] 3 steps, batch 4 x 112");
    // C fine-tuned A's checkpoint: its run started from A's weights, at SFT's rate.
    assertStringIncludes(printed, `[C] 3 steps, batch 4 x ${sftRows}`);
    assertStringIncludes(printed, "lr 0.0002");
    assertStringIncludes(printed, `[B] 3 steps, batch 4 x ${sftRows}`);
    // D pretrained on the once-stated prose, then fine-tuned from that checkpoint.
    const onceMetrics = await Deno.readTextFile(`${root}/out/D-pretrain-once/metrics.jsonl`);
    assert(onceMetrics.length > 0);
    assertStringIncludes(printed, "pretrain_once.jsonl");
    assertStringIncludes(printed, `[D] 3 steps, batch 4 x ${sftRows}`);

    // The JSON record: what the run measured, as written.
    const json = JSON.parse(await Deno.readTextFile(`${root}/results/experiment.json`));
    assertEquals(json, JSON.parse(JSON.stringify(result.json)));
    assertEquals(Object.keys(json.arms), ["A", "B", "C", "D"]);
    for (const s of result.summaries) {
      assertEquals(json.arms[s.arm].format, s.formatShare);
      assertEquals(json.arms[s.arm].fact, s.factShare);
      assertEquals(json.arms[s.arm].both, s.bothShare);
      assertEquals(json.arms[s.arm].questions, 4);
    }
    assertEquals(json.settings.stepsPretrain, 3);
    assertEquals(json.settings.questions, 4);
    assertEquals(json.settings.model.modelConfig, modelConfig);
    assertEquals(json.augmentation.paraphrased, json.arms.C.fact);
    assertEquals(json.augmentation.once, json.arms.D.fact);

    // The table, printed and in the report, with every arm.
    for (const row of ["| A | pretrain only | 4 |", "| B | SFT only, random init | 4 |"]) {
      assertStringIncludes(printed, row);
      assertStringIncludes(result.report, row);
    }
    assertStringIncludes(result.report, "| C | pretrain + SFT | 4 |");
    assertStringIncludes(result.report, "| D | pretrain (each fact stated once) + SFT | 4 |");
    assertStringIncludes(result.report, "Knowledge augmentation: ");
    // The training table: each arm's last stage with its logged losses.
    assertMatch(result.report, /\| A \| pretrain \| 3 \| \d+\.\d\d \(step \d+\) -> \d+\.\d\d \|/);
    assertMatch(result.report, /\| B \| SFT from random weights \| 3 \| \d/);
    assertMatch(result.report, /\| C \| SFT from A \| 3 \| \d/);
    const written = await Deno.readTextFile(report);
    assertEquals(written, result.report);
    assertEquals(result.reportPath, report);
    // Samples: three questions, each answered by every arm; the run's facts.
    const samples = written.split("## Sample replies")[1].split("## Run")[0];
    assertEquals(samples.match(/\*\*Q \(/g)?.length, 3);
    assertEquals(samples.match(/^- \*\*[ABCD]\*\*, /gm)?.length, 12);
    assertStringIncludes(samples, "**Q (zh):");
    assertStringIncludes(written, "trainer experiment --model-config");
    assertStringIncludes(written, "--steps-pretrain 3 --steps-sft 3");
    assertStringIncludes(written, `- adapter: ${gpu.adapterSummary.name}`);
    assertStringIncludes(written, "- run time: ");
    assertStringIncludes(written, "- date: 20");

    // --ask: the same checkpoint asked again, with no training, gives the same replies.
    const asked: string[] = [];
    const askJson = `${root}/results/ask.json`;
    await runExperimentCommand({
      values: {
        ask: [result.arms[2].dir],
        questions: "4",
        "max-new-tokens": "6",
        json: askJson,
      },
      positionals: [],
    }, { gpu, print: (l) => asked.push(l) });
    const c = result.summaries[2];
    const again = JSON.parse(await Deno.readTextFile(askJson)).arms[result.arms[2].dir];
    assertEquals([again.format, again.fact, again.both, again.questions], [
      c.formatShare,
      c.factShare,
      c.bothShare,
      4,
    ]);
    assertStringIncludes(asked.join("\n"), `| ${result.arms[2].dir} | asked only | 4 |`);
  } finally {
    gpu.destroy();
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("trainer experiment: bad options are usage errors before any training", async () => {
  await assertRejects(
    () =>
      runExperimentCommand({
        values: { preset: "tiny", "model-config": "x.json" },
        positionals: [],
      }),
    UsageError,
    "--preset or --model-config",
  );
  await assertRejects(
    () => runExperimentCommand({ values: { "steps-sft": "0" }, positionals: [] }),
    UsageError,
  );
  await assertRejects(
    () => runExperimentCommand({ values: { ask: ["out/sft"], "steps-sft": "3" }, positionals: [] }),
    UsageError,
    "--ask trains nothing",
  );
  await assertRejects(
    () => runExperimentCommand({ values: {}, positionals: ["extra"] }),
    UsageError,
    "unexpected argument",
  );
});
