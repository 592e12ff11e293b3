/**
 * DPO end to end: the training model's DPO step against the float64
 * reference (model/reference.ts + model/dpo_reference.ts), the loss at step 0
 * (ln 2, policy = reference), the preference records (MiniMind's dpo.jsonl,
 * bad records named by file:line), the pair stream, the embedded preference
 * set, and `trainer dpo` runs: rewards logged, exact resume after Ctrl-C.
 *
 * The model tests use the shared tiny config (hidden 32, vocab 67) with
 * B = 2 pairs (4 rows) and T = 9, sizes that are multiples of no tile, with
 * and without several logits chunks.
 */
import {
  assert,
  assertClose,
  assertEquals,
  assertRejects,
  assertStringIncludes,
  assertThrows,
} from "./assert.ts";
import { GPU_TEST, tinyConfig } from "./helpers.ts";
import { Gpu } from "../kernels/runtime.ts";
import { TrainingModel } from "../model/train_model.ts";
import { initParameters, parameterSpecs } from "../model/params.ts";
import { modelForward, modelLossAndGrads, toFloat64Params } from "../model/reference.ts";
import { dpoLossReference, dpoRowWeightsReference } from "../model/dpo_reference.ts";
import type { Batch } from "../data/batch.ts";
import { parseDpoRecord } from "../data/sources.ts";
import { DataStream } from "../data/stream.ts";
import { defaultTokenizer } from "../data/corpus.ts";
import { embeddedPreferences, writePreferenceSet } from "../data/preferences.ts";
import { generateWorld } from "../data/corpus_world.ts";
import { runTraining } from "../cli/train.ts";
import type { ParsedArgs } from "../cli/args.ts";
import { readMetrics, type TrainMetrics } from "../train/metrics.ts";
import { loadCheckpoint, saveCheckpoint } from "../io/checkpoint.ts";
import { Rng } from "../util/random.ts";
import { UserError } from "../util/errors.ts";

const gpu = await Gpu.request();
const root = await Deno.makeTempDir({ prefix: "trainer-dpo-test-" });

const P = 2;
const T = 9;

/** Pairs of random sequences: a prompt (mask 0) then answers of different lengths. */
function pairBatch(rng: Rng, V: number): Batch {
  const B = 2 * P;
  const N = B * T;
  const ids = new Int32Array(N).map(() => rng.nextInt(V));
  const targets = new Int32Array(N).map(() => rng.nextInt(V));
  const mask = new Float32Array(N);
  // Answer lengths 6, 3 (chosen) and 4, 5 (rejected): the row weights do not sum to 0.
  const lengths = [6, 3, 4, 5];
  for (let b = 0; b < B; b++) mask.fill(1, b * T + 2, b * T + 2 + lengths[b]);
  return { ids, targets, mask, B, T };
}

function maxAbs(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
}

for (const chunks of [1, 2]) {
  Deno.test({
    name: `dpo step: ln 2 at policy = reference, then loss and gradients match the reference (${
      chunks === 1 ? "one logits chunk" : "two logits chunks"
    })`,
    ...GPU_TEST,
    async fn() {
      const config = tinyConfig();
      const params = initParameters(config, 3);
      // A reference nearby: the policy after some training.
      const rng = new Rng(5);
      const reference = new Map<string, Float32Array>();
      for (const [name, t] of params) reference.set(name, t.map((x) => x + 0.02 * rng.normal()));
      const beta = 0.5;
      const batch = pairBatch(new Rng(9), config.vocab_size);

      // Policy = reference: the same bits through the same kernels, so h = 0 and loss = ln 2.
      const same = await TrainingModel.create(gpu, config, {
        batchSize: 2 * P,
        seqLen: T,
        params,
        reference: params,
      });
      try {
        same.dpoForwardBackward([batch], beta);
        const s = await same.readDpoStats();
        assertClose([s.loss], [Math.LN2], { atol: 1e-6, rtol: 0 }, "step-0 loss");
        assertEquals([s.chosenReward, s.rejectedReward, s.accuracy], [0, 0, 0]);
      } finally {
        same.destroy();
      }

      const model = await TrainingModel.create(gpu, config, {
        batchSize: 2 * P,
        seqLen: T,
        params,
        reference,
        logitsChunkRows: chunks === 2 ? 24 : undefined,
      });
      try {
        if (chunks === 2 && gpu.limits.minStorageBufferOffsetAlignment <= 96) {
          assertEquals(model.headChunks, 2, "the sequences span two logits chunks");
        }
        model.dpoForwardBackward([batch], beta);
        const got = await model.readDpoStats();
        const grads = await model.readGradients();

        const V = config.vocab_size;
        const pol64 = toFloat64Params(params);
        const polLogits = modelForward(config, pol64, batch).logits;
        const refLogits = modelForward(config, toFloat64Params(reference), batch).logits;
        const want = dpoLossReference(
          polLogits,
          refLogits,
          batch.targets,
          batch.mask,
          2 * P,
          T,
          V,
          beta,
        );
        assert(Math.abs(want.loss - Math.LN2) > 1e-3, "the reference differs from the policy");
        // The sequence log-probs are sums of ~6 f32 log-softmaxes of a forward
        // whose loss matches the reference to 1e-6 relative (train_model_test):
        // a few 1e-6 absolute each, times β. Measured: loss and rewards within
        // 5.2e-7 (lavapipe); 5e-6 leaves ~10x.
        assertClose([got.loss], [want.loss], { atol: 5e-6, rtol: 0 }, "loss");
        assertClose(
          [got.chosenReward, got.rejectedReward, got.accuracy],
          [want.chosenReward, want.rejectedReward, want.accuracy],
          { atol: 5e-6, rtol: 0 },
          "rewards",
        );
        // d L / d θ = sum_r w_r d nll_r / d θ; the reference's masked mean with
        // mask = w is that divided by sum(w) (non-zero: the answers differ in length).
        const w = dpoRowWeightsReference(
          want.policyLogp,
          want.referenceLogp,
          batch.mask,
          2 * P,
          T,
          beta,
        );
        const wSum = w.reduce((a, b) => a + b, 0);
        assert(Math.abs(wSum) > 1e-3, `sum of row weights ${wSum}`);
        const ref = modelLossAndGrads(config, pol64, { ...batch, mask: Float32Array.from(w) });
        const tensors = model.trainable().tensors;
        for (const s of parameterSpecs(config)) {
          const e = ref.grads.get(s.name)!.map((g) => g * wSum);
          const slot = tensors.find((t) => t.name === s.name)!;
          const g = grads.subarray(slot.offset, slot.offset + slot.size);
          // As train_model_test: the error is absolute at the tensor's scale.
          // The row weights carry the log-probs' error through σ' (relative
          // ~1e-6). Measured worst |g - ref| = 2.0e-6..2.9e-6 x max|ref| per
          // tensor (lavapipe, both chunkings); 2e-5 x max leaves ~7x, and a
          // wrong sign, weight or pair shows as O(1) x max.
          assertClose(g, e, { atol: 2e-5 * maxAbs(e), rtol: 0 }, s.name);
        }
        // Forward-only evaluation gives the same figures as sums, and touches no gradient.
        const ev = await model.dpoEval(batch, beta);
        assertEquals(ev.pairs, P);
        assertClose([ev.loss / P], [got.loss], { atol: 1e-6, rtol: 0 }, "eval loss");
        assertEquals(await model.readGradients(), grads, "eval leaves the gradients");
      } finally {
        model.destroy();
      }
    },
  });
}

Deno.test({
  name: "dpo step: padding pairs do not count; a model without a reference refuses",
  ...GPU_TEST,
  async fn() {
    const config = tinyConfig();
    const params = initParameters(config, 4);
    const batch = pairBatch(new Rng(2), config.vocab_size);
    const model = await TrainingModel.create(gpu, config, {
      batchSize: 2 * P,
      seqLen: T,
      params,
    });
    try {
      assertThrows(() => model.dpoForwardBackward([batch], 0.1), Error, "without reference");
    } finally {
      model.destroy();
    }
    await assertRejects(
      () =>
        TrainingModel.create(gpu, config, { batchSize: 3, seqLen: T, params, reference: params }),
      UserError,
      "even number of rows",
    );
    // Pair 1's rejected row empty: only pair 0 counts.
    const padded = { ...batch, mask: batch.mask.slice() };
    padded.mask.fill(0, 3 * T, 4 * T);
    const reference = new Map([...params].map(([n, t]) => [n, t.map((x) => x * 0.9)]));
    const dpo = await TrainingModel.create(gpu, config, {
      batchSize: 2 * P,
      seqLen: T,
      params,
      reference,
    });
    try {
      const ev = await dpo.dpoEval(padded, 0.1);
      assertEquals(ev.pairs, 1);
      const pol = modelForward(config, toFloat64Params(params), padded).logits;
      const ref = modelForward(config, toFloat64Params(reference), padded).logits;
      const want = dpoLossReference(
        pol,
        ref,
        padded.targets,
        padded.mask,
        2 * P,
        T,
        config.vocab_size,
        0.1,
      );
      assertEquals(want.pairs, 1);
      assertClose([ev.loss], [want.loss], { atol: 1e-5, rtol: 0 });
    } finally {
      dpo.destroy();
    }
  },
});

Deno.test("dpo records: MiniMind's format parses; bad records name file:line", () => {
  const where = { file: "pairs.jsonl", line: 7 };
  const ok = parseDpoRecord(
    JSON.stringify({
      chosen: [{ role: "user", content: "q" }, { role: "assistant", content: "good" }],
      rejected: [{ role: "user", content: "q" }, { role: "assistant", content: "bad" }],
    }),
    where,
  );
  assertEquals(ok.chosen[1].content, "good");
  assertEquals(ok.rejected[1].content, "bad");
  const bad: [unknown, string][] = [
    [{ rejected: [{ role: "assistant", content: "x" }] }, 'expected a "chosen" field'],
    [{ chosen: [{ role: "assistant", content: "x" }] }, 'expected a "rejected" field'],
    [{ chosen: "text", rejected: [] }, '"chosen" must be a list of turns'],
    [
      {
        chosen: [{ role: "user", content: "q" }, { role: "assistant", content: "  " }],
        rejected: [{ role: "user", content: "q" }, { role: "assistant", content: "x" }],
      },
      "chosen[1] is an empty assistant turn",
    ],
    [
      {
        chosen: [{ role: "user", content: "q" }, { role: "assistant", content: "x" }],
        rejected: [{ role: "user", content: "q" }],
      },
      '"rejected" has no assistant turn',
    ],
    [
      { chosen: [{ role: "robot", content: "x" }], rejected: [] },
      'chosen[0].role must be "system", "user", "assistant" or "tool"',
    ],
  ];
  for (const [record, message] of bad) {
    const e = assertThrows(() => parseDpoRecord(JSON.stringify(record), where), UserError);
    assertStringIncludes(e.message, "pairs.jsonl:7: ");
    assertStringIncludes(e.message, message);
  }
  assertThrows(
    () => parseDpoRecord("{not json", where),
    UserError,
    "pairs.jsonl:7: not valid JSON",
  );
});

Deno.test("dpo stream: pairs in chosen-then-rejected rows; a bad line stops at its file:line", async () => {
  const tok = defaultTokenizer();
  const dir = `${root}/stream`;
  await Deno.mkdir(dir);
  const pair = (good: string, bad: string) =>
    JSON.stringify({
      chosen: [{ role: "user", content: "Where is Medemo?" }, {
        role: "assistant",
        content: good,
      }],
      rejected: [{ role: "user", content: "Where is Medemo?" }, {
        role: "assistant",
        content: bad,
      }],
    });
  await Deno.writeTextFile(
    `${dir}/ok.jsonl`,
    [pair("In the valley.", "Far away."), pair("On the river.", "Nowhere at all, I think.")]
      .join("\n") + "\n",
  );
  const stream = await DataStream.open({
    data: [`${dir}/ok.jsonl`],
    kind: "dpo",
    tokenizer: tok,
    batchSize: 2,
    seqLen: 48,
    maxEpochs: 1,
  });
  const batch = (await stream.next())!;
  stream.close();
  assertEquals([batch.B, batch.T], [4, 48]);
  const answer = (row: number) => {
    const ids: number[] = [];
    for (let t = 0; t < batch.T; t++) {
      if (batch.mask[row * batch.T + t]) ids.push(batch.targets[row * batch.T + t]);
    }
    return tok.decode(ids);
  };
  assertStringIncludes(answer(0), "In the valley.");
  assertStringIncludes(answer(1), "On the river.");
  assertStringIncludes(answer(2), "Far away.");
  assertStringIncludes(answer(3), "Nowhere at all, I think.");
  assert(!answer(0).includes("Where is"), "the prompt is not trained");

  await Deno.writeTextFile(
    `${dir}/bad.jsonl`,
    pair("a", "b") + "\n" + JSON.stringify({ rejected: [] }) + "\n",
  );
  const bad = await DataStream.open({
    data: [`${dir}/bad.jsonl`],
    kind: "dpo",
    tokenizer: tok,
    batchSize: 2,
    seqLen: 48,
  });
  await assertRejects(() => bad.next(), UserError, `${dir}/bad.jsonl:2: expected a "chosen" field`);
});

Deno.test("embedded preference set: derived from the world, held-out facts, deterministic", () => {
  const a = embeddedPreferences();
  assertEquals(JSON.stringify(embeddedPreferences()), JSON.stringify(a), "same seed, same pairs");
  assert(a.dpo.length >= 1000 && a.dpoEval.length >= 100, "sizes");
  const world = generateWorld(new Rng(1234));
  const names = [...world.towns, ...world.people, ...world.creatures].map((e) => e.name);
  let wrong = 0, rambling = 0;
  for (const { chosen, rejected } of [...a.dpo, ...a.dpoEval]) {
    // Same prompt, different answers; the chosen answer is the shorter.
    assertEquals(JSON.stringify(chosen.slice(0, -1)), JSON.stringify(rejected.slice(0, -1)));
    const good = chosen.at(-1)!.content, bad = rejected.at(-1)!.content;
    assert(good !== bad && good.trim() !== "", `${good} vs ${bad}`);
    if (bad.startsWith(good)) rambling++;
    else wrong++;
    // Every question names an entity of the generated world.
    const q = chosen.at(-2)!.content;
    assert(names.some((n) => q.includes(n.en) || q.includes(n.zh)), q);
  }
  assert(wrong > 0.3 * (wrong + rambling) && rambling > 0.3 * (wrong + rambling), "both kinds");
  // Eval pairs ask about facts the training pairs never ask about.
  const asked = new Set(a.dpo.map((r) => r.chosen.at(-2)!.content));
  for (const r of a.dpoEval) assert(!asked.has(r.chosen.at(-2)!.content), "held out");
});

function args(values: Record<string, string | boolean | string[]>): ParsedArgs {
  return { values, positionals: [] };
}

Deno.test({
  name:
    "trainer dpo: step 1 at ln 2, rewards logged, margin grows; Ctrl-C + --resume equals one run",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    // A starting checkpoint: a small random model written by sft --steps 0.
    const modelConfig = `${root}/small.jsonc`;
    await Deno.writeTextFile(
      modelConfig,
      `{ "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64 }`,
    );
    const start = `${root}/start`;
    const quiet = { print: () => {}, gpu };
    assertEquals(
      await runTraining(
        "sft",
        args({
          init: "none",
          "model-config": modelConfig,
          "seq-len": "64",
          steps: "0",
          out: start,
        }),
        quiet,
      ),
      0,
    );
    const pairs = await writePreferenceSet(`${root}/data`);
    const common = {
      init: start,
      data: [pairs.dpo],
      "eval-data": [pairs.dpoEval],
      "batch-size": "2",
      "seq-len": "48",
      "shuffle-buffer": "16",
      "log-every": "1",
      "eval-every": "6",
      steps: "6",
      lr: "3e-3",
    };
    const whole = `${root}/whole`;
    const lines: string[] = [];
    assertEquals(
      await runTraining("dpo", args({ ...common, out: whole }), {
        gpu,
        print: (l) => lines.push(l),
      }),
      0,
    );
    const records = await readMetrics(`${whole}/metrics.jsonl`);
    const train = records.filter((r): r is TrainMetrics => r.split === "train");
    assertEquals(train.length, 6);
    assertClose([train[0].loss], [Math.LN2], { atol: 1e-6, rtol: 0 }, "step 1: policy = reference");
    assertEquals(train[0].reward_margin, 0);
    // One step's 2 pairs are noisy; the held-out set (128 pairs) shows the trend.
    const evals = records.filter((r) => r.split === "eval");
    assertEquals(evals.map((r) => r.step), [6]);
    assert(evals[0].reward_margin! > 0, `held-out margin grows: ${evals[0].reward_margin}`);
    assert(evals[0].loss < Math.LN2, `held-out loss falls below ln 2: ${evals[0].loss}`);
    assert(evals[0].reward_accuracy !== undefined && evals[0].perplexity === undefined);
    const text = lines.join("\n");
    assertStringIncludes(text, "dpo: beta 0.1, frozen reference");
    assertStringIncludes(text, "rewards (beta (log p - log p_ref))");

    // Ctrl-C at step 3, then --resume: the same losses and weights, bit for bit.
    const split = `${root}/split`;
    assertEquals(
      await runTraining("dpo", args({ ...common, out: split }), { ...quiet, interruptAtStep: 3 }),
      130,
    );
    assertEquals(
      await runTraining("dpo", args({ out: split, resume: true, "log-every": "1" }), quiet),
      0,
    );
    const resumed = (await readMetrics(`${split}/metrics.jsonl`))
      .filter((r): r is TrainMetrics => r.split === "train");
    assertEquals(resumed.map((r) => r.loss), train.map((r) => r.loss));
    assertEquals(
      resumed.map((r) => r.reward_margin),
      train.map((r) => r.reward_margin),
    );
    const a = await loadCheckpoint(whole);
    const b = await loadCheckpoint(split);
    for (const [name, t] of a.params) assertEquals(b.params.get(name), t, name);

    // The reference must be the same checkpoint to resume.
    const moved = `${root}/moved`;
    await Deno.mkdir(moved);
    assertEquals(
      await runTraining("dpo", args({ ...common, steps: "2", out: moved }), {
        ...quiet,
        interruptAtStep: 1,
      }),
      130,
    );
    const params = (await loadCheckpoint(start)).params;
    const ck = await loadCheckpoint(start);
    params.values().next().value![0] += 1;
    await saveCheckpoint(start, {
      config: ck.config,
      params,
      tokenizer: ck.tokenizer,
      special: { bos: 0, eos: 0, pad: 0 },
    });
    await assertRejects(
      () => runTraining("dpo", args({ out: moved, resume: true }), quiet),
      UserError,
      "has changed since the run started",
    );
    // And --init none is refused: the reference must be a checkpoint.
    await assertRejects(
      () => runTraining("dpo", args({ init: "none", out: `${root}/none` }), quiet),
      Error,
      "--init none is not possible",
    );
  },
});

Deno.test({
  name: "dpo: destroy the shared device",
  ...GPU_TEST,
  fn: async () => {
    gpu.destroy();
    await Deno.remove(root, { recursive: true });
  },
});
