/**
 * The training loop end to end on the CPU adapter: pretrain then SFT on the
 * embedded corpus, exact resume, --steps 0, failure behaviour, `trainer eval`.
 * Models are small (hidden 32) so each run takes seconds on lavapipe.
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
import { pretrainCommand, runTraining } from "../cli/train.ts";
import { evaluateLines } from "../train/eval.ts";
import { readMetrics, type TrainMetrics } from "../train/metrics.ts";
import { loadCheckpoint, saveCheckpoint } from "../io/checkpoint.ts";
import { TrainingModel } from "../model/train_model.ts";
import { initParameters } from "../model/params.ts";
import { modelLossAndGrads, toFloat64Params } from "../model/reference.ts";
import {
  DEFAULT_TOKENIZER_VOCAB_SIZE,
  defaultTokenizer,
  writeEmbeddedCorpus,
} from "../data/corpus.ts";
import { DataStream } from "../data/stream.ts";
import { parseCommandArgs, type ParsedArgs } from "../cli/args.ts";
import { UserError } from "../util/errors.ts";
import { tinyConfig } from "./helpers.ts";

const gpu = await Gpu.request();
const root = await Deno.makeTempDir({ prefix: "trainer-train-test-" });
const corpus = (await writeEmbeddedCorpus(`${root}/data`)).files;
const modelConfig = `${root}/small.jsonc`;
await Deno.writeTextFile(
  modelConfig,
  `{ // small enough for seconds per run on a CPU driver
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64 }`,
);

function args(values: Record<string, string | boolean | string[]>): ParsedArgs {
  return { values, positionals: [] };
}

/** Options shared by the runs below. */
function small(out: string, extra: Record<string, string | boolean | string[]> = {}) {
  return args({
    "model-config": modelConfig,
    data: [corpus.pretrain],
    "eval-data": [corpus.pretrainEval],
    "batch-size": "4",
    "seq-len": "32",
    "shuffle-buffer": "64",
    "log-every": "1",
    lr: "3e-3",
    out,
    ...extra,
  });
}

async function trainLosses(out: string): Promise<number[]> {
  return (await readMetrics(`${out}/metrics.jsonl`))
    .filter((r): r is TrainMetrics => r.split === "train")
    .map((r) => r.loss);
}

const quiet = { print: () => {}, gpu };

Deno.test({
  name: "pretrain on the embedded corpus: the loss falls; then SFT from it trains",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const out = `${root}/pre`;
    const lines: string[] = [];
    const code = await runTraining("pretrain", small(out, { steps: "40", "eval-every": "20" }), {
      print: (l) => lines.push(l),
      gpu,
    });
    assertEquals(code, 0);
    const losses = await trainLosses(out);
    assertEquals(losses.length, 40);
    // Starts near ln(1558) = 7.35 (uniform over the vocabulary) and must fall clearly.
    assert(
      Math.abs(losses[0] - Math.log(DEFAULT_TOKENIZER_VOCAB_SIZE)) < 0.3,
      `first loss ${losses[0]}`,
    );
    const tail = losses.slice(-5).reduce((a, b) => a + b) / 5;
    assert(tail < losses[0] - 1.0, `loss did not fall: ${losses[0]} -> ${tail}`);
    const text = lines.join("\n");
    assertStringIncludes(text, `checkpoint: ${out}/`);
    assertStringIncludes(text, `next: deno task sft --init ${out}`);
    const evals = (await readMetrics(`${out}/metrics.jsonl`)).filter((r) => r.split === "eval");
    assertEquals(evals.map((r) => r.step), [20, 40]);
    const svg = await Deno.readTextFile(`${out}/loss.svg`);
    assertStringIncludes(svg, "optimizer step");

    // SFT from the pretrained checkpoint, on conversations.
    const sftOut = `${root}/sft`;
    const sftCode = await runTraining(
      "sft",
      args({
        init: out,
        data: [corpus.sft],
        "eval-data": [corpus.sftEval],
        "batch-size": "4",
        "seq-len": "64",
        "shuffle-buffer": "16",
        "log-every": "1",
        steps: "6",
        lr: "1e-3",
        out: sftOut,
      }),
      quiet,
    );
    assertEquals(sftCode, 0);
    const sft = await loadCheckpoint(sftOut, { optimizer: true });
    assertEquals(sft.config.hidden_size, 32);
    assertEquals((sft.state as { step: number }).step, 6);
  },
});

Deno.test({
  name: "SFT batches: the GPU loss counts only masked-in targets, as the reference does",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const tok = defaultTokenizer();
    const config = tinyConfig({
      num_hidden_layers: 2,
      intermediate_size: 64,
      vocab_size: tok.vocabSize,
      rope_theta: 1e6,
    });
    const stream = await DataStream.open({
      data: [corpus.sft],
      kind: "sft",
      tokenizer: tok,
      batchSize: 3,
      seqLen: 48,
    });
    const batch = (await stream.next())!;
    stream.close();
    // The mask must cover some targets and leave others out (user turns, headers, padding).
    const ones = batch.mask.reduce((a, b) => a + b, 0);
    assert(ones > 0 && ones < batch.mask.length, `mask has ${ones} of ${batch.mask.length}`);
    const params = initParameters(config, 3);
    const model = await TrainingModel.create(gpu, config, { batchSize: 3, seqLen: 48, params });
    try {
      const gpuEval = await model.evalLoss(batch);
      const ref = modelLossAndGrads(config, toFloat64Params(params), { ...batch, B: 3, T: 48 });
      // float32 forward of a 2-layer model against float64: relative 1e-5 is
      // ~100 ulps of accumulated rounding over the sums of 32-2048 terms.
      assertAlmostEquals(gpuEval.lossSum / gpuEval.count, ref.loss, 1e-5 * ref.loss);
      assertEquals(gpuEval.count, ones);
    } finally {
      model.destroy();
    }
  },
});

Deno.test({
  name: "resume: N steps in one run equal N/2 steps + --resume, bitwise",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const whole = `${root}/whole`;
    const split = `${root}/split`;
    const opts = { steps: "8", "save-every": "100" };
    assertEquals(await runTraining("pretrain", small(whole, opts), quiet), 0);
    // The first half stops as Ctrl-C would stop it: a checkpoint, exit 130.
    assertEquals(
      await runTraining("pretrain", small(split, opts), { ...quiet, interruptAtStep: 4 }),
      130,
    );
    const half = await loadCheckpoint(split);
    assertEquals((half.state as { step: number }).step, 4);
    assertEquals(
      await runTraining("pretrain", args({ out: split, resume: true, "log-every": "1" }), quiet),
      0,
    );
    const a = await trainLosses(whole);
    const b = await trainLosses(split);
    assertEquals(a.length, 8);
    assertEquals(b, a); // bitwise: same floats, not merely close
    // The resumed run evaluates the same held-out data at the same steps.
    const evals = async (out: string) =>
      (await readMetrics(`${out}/metrics.jsonl`)).filter((r) => r.split === "eval")
        .map((r) => [r.step, r.loss]);
    assertEquals((await evals(whole)).length, 4);
    assertEquals(await evals(split), await evals(whole));
    const pa = (await loadCheckpoint(whole)).params;
    const pb = (await loadCheckpoint(split)).params;
    for (const [name, t] of pa) assertEquals(pb.get(name), t, name);
  },
});

Deno.test({
  name: "a JSONC run config, --accum and --epochs: flags override the file; epochs count the data",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const dir = `${root}/epochs`;
    await Deno.mkdir(dir, { recursive: true });
    // 6 documents of a few tokens each: a handful of 9-token windows per epoch.
    const lines = Array.from({ length: 6 }, (_, i) => JSON.stringify({ text: `doc ${i} a b c` }));
    await Deno.writeTextFile(`${dir}/tiny.jsonl`, lines.join("\n") + "\n");
    const config = `${dir}/run.jsonc`;
    await Deno.writeTextFile(
      config,
      `{ "model-config": "${modelConfig}", "data": ["${dir}/tiny.jsonl"], "batch_size": 2,
         "seq-len": 8, "shuffle-buffer": 0, "accum": 2, "lr": 0.001, "log-every": 1 }`,
    );
    const printed: string[] = [];
    const parsed = await parseCommandArgs(pretrainCommand, [
      "--config",
      config,
      "--epochs",
      "2",
      "--out",
      `${dir}/out`,
    ]);
    assertEquals(await runTraining("pretrain", parsed!, { print: (l) => printed.push(l), gpu }), 0);
    // Count the batches of one epoch the way a user would: tokens / (T + 1) windows.
    const tok = defaultTokenizer();
    const tokens = lines.reduce((n, l) => n + tok.encode(JSON.parse(l).text).length + 2, 0);
    const batches = Math.ceil(Math.floor(tokens / 9) / 2);
    const steps = Math.ceil((batches * 2) / 2);
    assertStringIncludes(printed.join("\n"), `${batches} batches per epoch -> ${steps} steps`);
    const c = await loadCheckpoint(`${dir}/out`);
    const state = c.state as { step: number; run: { accum: number; batchSize: number } };
    assertEquals(state.step, steps);
    assertEquals(state.run.accum, 2);
    assertEquals(state.run.batchSize, 2); // from the file (snake_case key)
  },
});

Deno.test({
  name: "--steps 0 writes the initialized model as a checkpoint",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const out = `${root}/init`;
    assertEquals(await runTraining("pretrain", small(out, { steps: "0", seed: "5" }), quiet), 0);
    const c = await loadCheckpoint(out, { optimizer: true });
    const expected = initParameters(c.config, 5);
    for (const [name, t] of expected) assertEquals(c.params.get(name), t, name);
    assertEquals((c.state as { step: number }).step, 0);
    // generation_config.json says what `trainer generate` samples with, for Transformers too.
    const gen = JSON.parse(await Deno.readTextFile(`${out}/generation_config.json`));
    assertEquals([gen.do_sample, gen.temperature, gen.top_p], [true, 0.7, 0.9]);
  },
});

Deno.test({
  name: "a non-finite loss stops the run, names the step and writes no bad checkpoint",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    // A checkpoint whose weights hold a NaN: the first step's loss is NaN.
    const good = `${root}/nan-init`;
    assertEquals(await runTraining("pretrain", small(good, { steps: "0" }), quiet), 0);
    const c = await loadCheckpoint(good);
    c.params.get("model.norm.weight")![0] = NaN;
    const poisoned = `${root}/nan-src`;
    await saveCheckpoint(poisoned, c);
    const out = `${root}/nan-run`;
    const err = await assertRejects(
      () => runTraining("pretrain", small(out, { init: poisoned, steps: "3" }), quiet),
      UserError,
      "loss became NaN at step 1",
    );
    assertStringIncludes(err.message, "No checkpoint was written");
    let wrote = true;
    try {
      await Deno.stat(`${out}/model.safetensors`);
    } catch {
      wrote = false;
    }
    assertEquals(wrote, false);
  },
});

Deno.test({
  name: "a model too large for the device's limits is refused before training, with numbers",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const big = `${root}/big.json`;
    // An embedding table just over this device's per-binding limit: 2048 x hidden x 4 bytes.
    const limit = gpu.limits.maxStorageBufferBindingSize;
    const hidden = 256 * Math.ceil((limit / (2048 * 4) + 1) / 256);
    await Deno.writeTextFile(
      big,
      JSON.stringify({
        hidden_size: hidden,
        num_hidden_layers: 1,
        num_attention_heads: hidden / 64,
        num_key_value_heads: hidden / 64,
        intermediate_size: 64,
      }),
    );
    const err = await assertRejects(
      () => runTraining("pretrain", small(`${root}/big`, { "model-config": big }), quiet),
      UserError,
    );
    // Refused before any weight is made, naming the limit that the tensor exceeds.
    assertMatch(err.message, /maxStorageBufferBindingSize|maxBufferSize/);
  },
});

Deno.test({
  name: "bad settings are refused with the flag named; --out must be ours",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    await assertRejects(
      () => runTraining("pretrain", small(`${root}/x`, { "batch-size": "two" }), quiet),
      Error,
      "--batch-size expects a number",
    );
    const foreign = `${root}/foreign`;
    await Deno.mkdir(foreign);
    await Deno.writeTextFile(`${foreign}/notes.txt`, "mine");
    await assertRejects(
      () => runTraining("pretrain", small(foreign, { steps: "1" }), quiet),
      UserError,
      "not a checkpoint of ours",
    );
    await assertRejects(
      () => runTraining("sft", args({ out: `${root}/s`, init: `${root}/missing` }), quiet),
      UserError,
      "no such checkpoint directory",
    );
    await assertRejects(
      () => runTraining("pretrain", args({ out: `${root}/nothing`, resume: true }), quiet),
      UserError,
      "holds no checkpoint to resume",
    );
    // Resuming (or --init) with a different model config names the field.
    const done = `${root}/resume-other-model`;
    assertEquals(await runTraining("pretrain", small(done, { steps: "0" }), quiet), 0);
    await assertRejects(
      () =>
        runTraining(
          "pretrain",
          args({ out: done, resume: true, steps: "2", preset: "minimind2-small" }),
          quiet,
        ),
      UserError,
      "--preset asks for hidden_size = 512, but the run in",
    );
    await assertRejects(
      () =>
        runTraining(
          "sft",
          args({ init: done, out: `${root}/sft-other`, preset: "tiny", data: [corpus.sft] }),
          quiet,
        ),
      UserError,
      "--preset asks for hidden_size = 128, but the --init checkpoint",
    );
  },
});

Deno.test({
  name:
    "--packing pad and MiniMind's SFT augmentations: --resume keeps them, bitwise; a bad line is named once",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    // Pretrain with pad packing: 6 steps at once equal 3 + --resume (which keeps the packing).
    const whole = `${root}/pad-whole`;
    const split = `${root}/pad-split`;
    const opts = { steps: "6", "save-every": "100", packing: "pad" };
    const lines: string[] = [];
    assertEquals(
      await runTraining("pretrain", small(whole, opts), { gpu, print: (l) => lines.push(l) }),
      0,
    );
    assertStringIncludes(
      lines.join("\n"),
      "packing: pad (one document per row, cut to seq_len - 1 = 31",
    );
    assertEquals(
      await runTraining("pretrain", small(split, opts), { ...quiet, interruptAtStep: 3 }),
      130,
    );
    assertEquals(
      await runTraining("pretrain", args({ out: split, resume: true, "log-every": "1" }), quiet),
      0,
    );
    assertEquals(await trainLosses(split), await trainLosses(whole));
    assertEquals((await trainLosses(whole)).length, 6);
    await assertRejects(
      () =>
        runTraining(
          "pretrain",
          args({ out: split, resume: true, packing: "pack", steps: "8" }),
          quiet,
        ),
      UserError,
      'packing was "pad" when it was saved and is "pack" now',
    );

    // SFT with both augmentations on a file holding one bad line: resume is bitwise too.
    const sftData = `${root}/sft-with-bad-line.jsonl`;
    const good = (await Deno.readTextFile(corpus.sft)).trimEnd().split("\n");
    await Deno.writeTextFile(
      sftData,
      [...good.slice(0, 3), "{not json", ...good.slice(3)].join("\n") + "\n",
    );
    const sftArgs = (out: string) =>
      args({
        init: whole,
        data: [sftData],
        "batch-size": "4",
        "seq-len": "64",
        "shuffle-buffer": "16",
        "log-every": "1",
        steps: "6",
        "save-every": "100",
        lr: "1e-3",
        "sft-system-ratio": "0.5",
        "sft-empty-think-keep": "0.2",
        "skip-bad-lines": true,
        out,
      });
    const sftLines: string[] = [];
    assertEquals(
      await runTraining("sft", sftArgs(`${root}/aug-whole`), {
        gpu,
        print: (l) => sftLines.push(l),
      }),
      0,
    );
    const said = sftLines.join("\n");
    assertStringIncludes(said, "sft augmentation: system 0.5 of 10 prompts");
    assertStringIncludes(said, `skipped 1 malformed line (--skip-bad-lines): ${sftData}:4\n`);
    assertEquals(
      await runTraining("sft", sftArgs(`${root}/aug-split`), { ...quiet, interruptAtStep: 3 }),
      130,
    );
    assertEquals(
      await runTraining(
        "sft",
        args({ out: `${root}/aug-split`, resume: true, "log-every": "1", "skip-bad-lines": true }),
        quiet,
      ),
      0,
    );
    assertEquals(await trainLosses(`${root}/aug-split`), await trainLosses(`${root}/aug-whole`));
    // The flags belong to their kind.
    await assertRejects(
      () => parseCommandArgs(pretrainCommand, ["--sft-system-ratio", "0.2"]),
      Error,
      "sft-system-ratio",
    );
    await assertRejects(
      () =>
        runTraining(
          "sft",
          args({ ...sftArgs(`${root}/aug-bad`).values, "sft-system-ratio": "1.5" }),
          quiet,
        ),
      Error,
      "--sft-system-ratio must be between 0 and 1, got 1.5",
    );
  },
});

Deno.test({
  name: "eval: each line its own sequence; SFT lines count assistant tokens only",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const tok = defaultTokenizer();
    const dir = `${root}/eval`;
    await Deno.mkdir(dir, { recursive: true });
    await Deno.writeTextFile(
      `${dir}/pre.jsonl`,
      ['{"text": "a b c"}', '{"text": "hello"}', ""].join("\n"),
    );
    const config = tinyConfig({
      num_hidden_layers: 1,
      intermediate_size: 64,
      vocab_size: tok.vocabSize,
      rope_theta: 1e6,
    });
    const model = await TrainingModel.create(gpu, config, {
      batchSize: 2,
      seqLen: 16,
      params: initParameters(config, 1),
    });
    try {
      const r = await evaluateLines(model, tok, [`${dir}/pre.jsonl`], { batchSize: 2, seqLen: 16 });
      // Every target of bos, tokens..., eos counts: (n + 2) - 1 per line.
      const expected = tok.encode("a b c").length + 1 + tok.encode("hello").length + 1;
      assertEquals(r.tokens, expected);
      assertEquals(r.sequences, 2);
      assertAlmostEquals(r.perplexity, Math.exp(r.loss), 1e-9 * r.perplexity);
      const s = await evaluateLines(model, tok, [corpus.sftEval], { batchSize: 2, seqLen: 16 });
      assert(s.tokens > 0 && s.sequences > 0);
    } finally {
      model.destroy();
    }
  },
});

Deno.test({
  name: "Ctrl-C (SIGINT) saves a checkpoint and exits 130",
  ignore: Deno.build.os === "windows",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const out = `${root}/sigint`;
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        new URL("../main.ts", import.meta.url).pathname,
        "pretrain",
        "--model-config",
        modelConfig,
        "--data",
        corpus.pretrain,
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--shuffle-buffer",
        "0",
        "--steps",
        "100000",
        "--log-every",
        "1",
        "--out",
        out,
      ],
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    // Wait for the first logged step, then interrupt as a user would.
    const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
    let seen = "";
    while (!/step\s+\d+\/100000/.test(seen)) {
      const { value, done } = await reader.read();
      if (done) break;
      seen += value;
    }
    child.kill("SIGINT");
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      seen += value;
    }
    const status = await child.status;
    await child.stderr.cancel();
    assertEquals(status.code, 130, seen);
    assertStringIncludes(seen, "continue with: deno task pretrain --out");
    const c = await loadCheckpoint(out, { optimizer: true });
    assert((c.state as { step: number }).step >= 1);
  },
});

Deno.test({
  name: "cleanup",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    gpu.destroy();
    await Deno.remove(root, { recursive: true });
  },
});
