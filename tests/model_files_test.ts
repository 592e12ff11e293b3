/**
 * `io/model_files.ts` (`loadModel`, the one loader of every command) and what
 * rides on it, on real `torch.save` output (tests/fixtures/pth, made by
 * scripts/make_pth_fixtures.py with torch 2.13 and transformers 5.18):
 *
 * - each model fixture loads through `loadModel` (shape read from the tensors,
 *   or given), and our float64 reference on what it loaded gives the logits
 *   Transformers computed;
 * - what the tensors cannot say is an error that asks for the flag; a shape
 *   that disagrees names the tensor and both shapes; the tokenizer is given
 *   or found beside the file;
 * - `generate --model X.pth --tokenizer DIR` continues a prompt with the
 *   greedy tokens Transformers chose (the GPU path, default sampling greedy:
 *   a .pth has no generation_config.json);
 * - `pretrain --init X.pth` writes exactly those weights at --steps 0 and
 *   trains a few steps; `eval --model X.pth` equals eval of that checkpoint;
 * - BOS/EOS: a config.json without them takes the tokenizer's;
 * - optional, with Python + transformers (ignored with the reason elsewhere):
 *   tiny random Llama and Qwen3 models saved by `save_pretrained` in f32, bf16
 *   and sharded (index json) generate the same greedy tokens here as in
 *   Transformers.
 */
import {
  assert,
  assertClose,
  assertEquals,
  assertRejects,
  assertStringIncludes,
} from "./assert.ts";
import { findPython, GPU_TEST, referenceLogits } from "./helpers.ts";
import { isStateDictPath, loadModel, type TokenizerFiles } from "../io/model_files.ts";
import type { RequestedShape } from "../io/model_config.ts";
import { loadCheckpoint, saveCheckpoint } from "../io/checkpoint.ts";
import { type ModelConfig, presetConfig } from "../model/config.ts";
import { initParameters } from "../model/params.ts";
import { Gpu } from "../kernels/runtime.ts";
import { parseCommandArgs, type ParsedArgs } from "../cli/args.ts";
import { generateCommand, runGenerate } from "../cli/generate.ts";
import { evalCommand } from "../cli/eval.ts";
import { runTraining } from "../cli/train.ts";
import { readMetrics, type TrainMetrics } from "../train/metrics.ts";
import { writeEmbeddedCorpus } from "../data/corpus.ts";
import { UserError } from "../util/errors.ts";

const DIR = "tests/fixtures/pth";
const TOK = "../shared/fixtures/minimind-tokenizer";
const tokenizer: TokenizerFiles = {
  tokenizerJson: await Deno.readTextFile(`${TOK}/tokenizer.json`),
  tokenizerConfigJson: await Deno.readTextFile(`${TOK}/tokenizer_config.json`),
};

interface ModelFixture {
  config: ModelConfig;
  input_ids: number[];
  logits: number[][];
}

interface GreedyFixture {
  config: ModelConfig;
  prompt: string;
  prompt_ids: number[];
  greedy_ids: number[];
  min_top2_margin: number;
}

async function fixture<T>(name: string): Promise<T> {
  return JSON.parse(await Deno.readTextFile(`${DIR}/${name}.json`)) as T;
}

function shapeOf(config: ModelConfig): RequestedShape {
  return { config, setsVocab: true, flag: "--model-config", value: "fixture.json" };
}

async function withTempDir(f: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "model-files-test-" });
  try {
    await f(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

// ---------------------------------------------------------------------------
// Loading, and the logits Transformers computed.

Deno.test("model files: .pth, .pt and .bin are state dicts; anything else is a directory", () => {
  assert(isStateDictPath("out/full_sft_768.pth"));
  assert(isStateDictPath("a/pytorch_model.bin"));
  assert(isStateDictPath("x.PT"));
  assert(!isStateDictPath("out/sft"));
  assert(!isStateDictPath("model.safetensors"));
});

// [fixture, shape given?]: MiniMind's way (head saved twice), untied f32,
// bf16 without lm_head (tied), QK-norm read from the tensors alone.
const CASES: [string, boolean][] = [
  ["minimind_f16", true],
  ["llama_f32", true],
  ["llama_bf16", true],
  ["minimind3_qk", false],
];

for (const [name, given] of CASES) {
  Deno.test(`model files: ${name}.pth loads${given ? "" : " (shape from the tensors)"} and gives Transformers' logits`, async () => {
    const fx = await fixture<ModelFixture>(name);
    const m = await loadModel(`${DIR}/${name}.pth`, {
      shape: given ? shapeOf(fx.config) : undefined,
      tokenizer,
    });
    if (given) {
      assertEquals(m.config, fx.config);
    } else {
      // max_position_embeddings is not in the tensors: MiniMind's 32768; the
      // fixture's 64 does not change logits.
      assertEquals(m.config, { ...fx.config, max_position_embeddings: 32768 });
      assertStringIncludes(m.notes.join("\n"), "head_dim 8 from q_norm");
      assertStringIncludes(m.notes.join("\n"), "tied head (lm_head.weight equals the embedding)");
    }
    // MiniMind's tokenizer: <|im_start|> = 1, <|im_end|> = 2, <|endoftext|> = 0.
    assertEquals(m.special, { bos: 1, eos: 2, pad: 0 });
    assertEquals(m.generation, {});
    const T = fx.input_ids.length;
    const logits = referenceLogits(m.config, m.params, fx.input_ids);
    assertEquals(logits.length, T * m.config.vocab_size);
    // Transformers computes in float32 (RMSNorm and RoPE tables always), the
    // reference in float64, a few hundred ops deep: seen at most 2.4e-6 off on
    // logits up to ~5 (tests/pth_test.ts). 1e-5 (1 + |logit|) is a few times
    // that and far below what a misplaced tensor or a wrong eps would move.
    assertClose(logits, fx.logits.flat(), { atol: 1e-5, rtol: 1e-5 }, `${name} logits`);
  });
}

Deno.test("model files: what the tensors cannot say needs a flag; a wrong shape names the tensor", async () => {
  // No q_norm: the head count is in no shape.
  await assertRejects(
    () => loadModel(`${DIR}/minimind_f16.pth`, { tokenizer }),
    UserError,
    "pass --preset (minimind2-small is MiniMind2's 26M shape) or --model-config",
  );
  // A preset that is not this model: the first tensor that differs, both shapes, the field.
  const preset: RequestedShape = {
    config: presetConfig("minimind-3"),
    setsVocab: false,
    flag: "--preset",
    value: "minimind-3",
  };
  const e = await assertRejects(
    () => loadModel(`${DIR}/minimind3_v6400.pth`, { shape: preset, tokenizer }),
    UserError,
    "tensor model.embed_tokens.weight has shape [6400, 8] but --preset minimind-3 implies [6400, 768]",
  );
  assertStringIncludes(e.message, "hidden_size = 768");
  // A config that says tied where the file has a separate head.
  const f32 = await fixture<ModelFixture>("llama_f32");
  await assertRejects(
    () =>
      loadModel(`${DIR}/llama_f32.pth`, {
        shape: shapeOf({ ...f32.config, tie_word_embeddings: true }),
        tokenizer,
      }),
    UserError,
    "lm_head.weight differs from model.embed_tokens.weight",
  );
  // One head too many: q_proj's rows no longer match.
  const qk = await fixture<ModelFixture>("minimind3_qk");
  await assertRejects(
    () =>
      loadModel(`${DIR}/minimind3_qk.pth`, {
        shape: shapeOf({ ...qk.config, num_attention_heads: 8, num_key_value_heads: 4 }),
        tokenizer,
      }),
    UserError,
    "q_norm.weight has shape [8] but --model-config fixture.json implies [4]",
  );
  // MoE state dicts are refused by the reader, naming the tensors.
  await assertRejects(() => loadModel(`${DIR}/moe.pth`, { tokenizer }), UserError, "expert");
  // A tokenizer whose bos is outside the model's vocabulary.
  const vocab = JSON.parse(tokenizer.tokenizerJson).model.vocab as Record<string, number>;
  const big = Object.entries(vocab).find(([, id]) => id === 100)![0];
  await assertRejects(
    () =>
      loadModel(`${DIR}/minimind3_qk.pth`, {
        tokenizer: {
          tokenizerJson: tokenizer.tokenizerJson,
          tokenizerConfigJson: JSON.stringify({ eos_token: "<|im_end|>", bos_token: big }),
        },
      }),
    UserError,
    "the bos token is id 100, outside the model's vocabulary (vocab_size = 72)",
  );
});

Deno.test("model files: a .pth's tokenizer is given or lies beside it; else the error says how", async () => {
  await withTempDir(async (dir) => {
    await Deno.copyFile(`${DIR}/minimind3_qk.pth`, `${dir}/m.pth`);
    const e = await assertRejects(() => loadModel(`${dir}/m.pth`), UserError, "--tokenizer DIR");
    assertStringIncludes(e.message, "holds weights only");
    await Deno.copyFile(`${TOK}/tokenizer.json`, `${dir}/tokenizer.json`);
    await Deno.copyFile(`${TOK}/tokenizer_config.json`, `${dir}/tokenizer_config.json`);
    const m = await loadModel(`${dir}/m.pth`);
    assertEquals(m.tokenizer.tokenizerJson, tokenizer.tokenizerJson);
    await assertRejects(() => loadModel(`${dir}/missing.pth`), UserError, "no such file");
    await Deno.writeTextFile(`${dir}/weights.npz`, "x");
    await assertRejects(() => loadModel(`${dir}/weights.npz`), UserError, "state dict file");
    // A directory that holds only a .pth points at the file.
    await Deno.mkdir(`${dir}/only`);
    await Deno.copyFile(`${DIR}/minimind3_qk.pth`, `${dir}/only/full_sft_768.pth`);
    await assertRejects(
      () => loadModel(`${dir}/only`),
      UserError,
      `pass the file itself (${dir}/only/full_sft_768.pth)`,
    );
  });
});

Deno.test("model files: a config.json without bos/eos takes the tokenizer's (as Transformers loads it)", async () => {
  await withTempDir(async (dir) => {
    const config = { ...presetConfig("tiny"), vocab_size: 6400 };
    await saveCheckpoint(`${dir}/m`, {
      config,
      params: initParameters(config, 1),
      tokenizer,
      special: { bos: 5, eos: 6, pad: 7 },
    });
    for (const f of ["config.json", "generation_config.json"]) {
      const j = JSON.parse(await Deno.readTextFile(`${dir}/m/${f}`));
      delete j.bos_token_id;
      delete j.eos_token_id;
      delete j.pad_token_id;
      await Deno.writeTextFile(`${dir}/m/${f}`, JSON.stringify(j));
    }
    const back = await loadModel(`${dir}/m`);
    // <|im_start|>, <|im_end|>; no pad id in the configs: eos serves.
    assertEquals(back.special, { bos: 1, eos: 2, pad: 2 });
  });
});

// ---------------------------------------------------------------------------
// The commands, on the GPU (lavapipe here).

const gpu = await Gpu.request();

async function argsOf(spec: typeof generateCommand, argv: string[]): Promise<ParsedArgs> {
  const a = await parseCommandArgs(spec, argv);
  if (!a) throw new Error("help requested");
  return a;
}

Deno.test({
  name: "model files: generate --model X.pth continues greedily with Transformers' tokens",
  ...GPU_TEST,
  fn: async () => {
    const fx = await fixture<GreedyFixture>("minimind3_v6400");
    // The fixture's smallest top-1/top-2 logit gap; float32 differences here
    // are ~1e-6 on logits of this size, so the same tokens are required.
    assert(fx.min_top2_margin > 1e-3, `fixture margin ${fx.min_top2_margin}`);
    const chunks: string[] = [];
    const notes: string[] = [];
    const argv = [
      "--model",
      `${DIR}/minimind3_v6400.pth`,
      "--tokenizer",
      TOK,
      "--prompt",
      fx.prompt,
      "--json",
      "--max-new-tokens",
      String(fx.greedy_ids.length),
      "--verbose",
    ];
    const status = await runGenerate(await argsOf(generateCommand, argv), {
      gpu,
      write: (t) => void chunks.push(t),
      note: (l) => void notes.push(l),
    });
    assertEquals(status, 0);
    const out = JSON.parse(chunks.join(""));
    // Transformers' continuation never emits eos (2) here, so all of it is compared.
    assert(!fx.greedy_ids.includes(2));
    assertEquals(out.ids, fx.greedy_ids);
    const said = notes.join("\n");
    assertStringIncludes(said, "read from the tensors: vocab_size 6400, hidden_size 8");
    assertStringIncludes(said, "rms_norm_eps 1e-6");
    assertStringIncludes(said, "temperature 0");
    assertStringIncludes(said, "has no generation_config.json saying do_sample: true");
  },
});

Deno.test({
  name:
    "model files: pretrain --init X.pth starts from exactly its weights and trains; eval reads it",
  ...GPU_TEST,
  fn: async () => {
    await withTempDir(async (root) => {
      const corpus = (await writeEmbeddedCorpus(`${root}/data`)).files;
      // A short held-out file keeps the evals to seconds on a CPU driver.
      const evalLines = (await Deno.readTextFile(corpus.pretrainEval)).split("\n").slice(0, 24);
      const evalFile = `${root}/eval.jsonl`;
      await Deno.writeTextFile(evalFile, evalLines.join("\n") + "\n");
      const pth = `${DIR}/minimind3_v6400.pth`;
      const loaded = await loadModel(pth, { tokenizer });
      const base = {
        init: pth,
        tokenizer: TOK,
        data: [corpus.pretrain],
        "eval-data": [evalFile],
        "batch-size": "2",
        "seq-len": "16",
        "log-every": "1",
        lr: "3e-3",
      };
      const lines: string[] = [];
      const quiet = { print: (l: string) => void lines.push(l), gpu };
      const args = (v: Record<string, string | string[]>) => ({ values: v, positionals: [] });

      // --steps 0 writes the initial model: the .pth's weights, bit for bit.
      assertEquals(
        await runTraining("pretrain", args({ ...base, out: `${root}/zero`, steps: "0" }), quiet),
        0,
      );
      assertStringIncludes(lines.join("\n"), `--init ${pth}: read from the tensors`);
      const zero = await loadCheckpoint(`${root}/zero`);
      assertEquals(zero.config, loaded.config);
      for (const [name, t] of loaded.params) {
        assertEquals(zero.params.get(name), t, name);
      }

      const out = `${root}/pre`;
      assertEquals(
        await runTraining("pretrain", args({ ...base, out, steps: "4" }), quiet),
        0,
      );
      const losses = (await readMetrics(`${out}/metrics.jsonl`))
        .filter((r): r is TrainMetrics => r.split === "train")
        .map((r) => r.loss);
      assertEquals(losses.length, 4);
      assert(losses.every(Number.isFinite), `losses ${losses}`);
      const trained = await loadCheckpoint(out);
      assert(
        trained.params.get("model.embed_tokens.weight")!.some((x, i) =>
          x !== loaded.params.get("model.embed_tokens.weight")![i]
        ),
        "training moved the weights",
      );

      // eval of the .pth equals eval of the checkpoint holding the same weights.
      const evalOf = async (model: string[]) => {
        const logged: string[] = [];
        const log = console.log;
        console.log = (s: string) => void logged.push(s);
        try {
          const a = await parseCommandArgs(evalCommand, [
            ...model,
            "--data",
            evalFile,
            "--seq-len",
            "16",
            "--json",
          ]);
          assertEquals(await evalCommand.run(a!), 0);
        } finally {
          console.log = log;
        }
        return JSON.parse(logged.join(""));
      };
      const fromPth = await evalOf(["--model", pth, "--tokenizer", TOK]);
      const fromDir = await evalOf(["--model", `${root}/zero`]);
      assertEquals(fromPth, fromDir);
      assert(fromPth.tokens > 0 && Number.isFinite(fromPth.loss));
    });
  },
});

// ---------------------------------------------------------------------------
// Optional: models saved by Transformers generate the same greedy tokens here.

const { python: PYTHON, missing: transformersMissing } = findPython(["torch", "transformers"]);
if (transformersMissing) {
  console.log(
    `model_files_test: skipping the Transformers greedy cross-check: ${transformersMissing}`,
  );
}

/**
 * argv: root dir, variants (JSON list of [arch, dtype, sharded]: llama | qwen3,
 * f32 | bf16, 0 | 1), prompt ids (JSON), steps. For each variant, saves a tiny
 * random model into <root>/<arch>-<dtype>-<sharded> with save_pretrained and
 * reports Transformers' greedy continuation (full recompute, no stop) of the
 * prompt and its smallest top-1/top-2 logit gap. One process for all: torch's
 * import dominates.
 */
const HF_SCRIPT = `
import json, sys, torch
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM)
root, variants, prompt, steps = sys.argv[1:]
variants, prompt, steps = json.loads(variants), json.loads(prompt), int(steps)
common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=6400, rope_theta=1e6, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, attention_bias=False)
report = {}
for arch, dtype, sharded in variants:
    if arch == "llama":
        cfg = LlamaConfig(**common, rms_norm_eps=1e-5, tie_word_embeddings=False)
        cls = LlamaForCausalLM
    else:
        cfg = Qwen3Config(**common, rms_norm_eps=1e-6, head_dim=8, tie_word_embeddings=True,
                          use_sliding_window=False)
        cls = Qwen3ForCausalLM
    torch.manual_seed(11)
    model = cls(cfg).eval()
    g = torch.Generator().manual_seed(3 if arch == "llama" else 4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    out = f"{root}/{arch}-{dtype}-{sharded}"
    model.save_pretrained(out, max_shard_size="100KB" if sharded == "1" else "1GB")
    ref = cls.from_pretrained(out, dtype=torch.float32).eval()
    ids, margin = list(prompt), float("inf")
    with torch.no_grad():
        for _ in range(steps):
            last = ref(input_ids=torch.tensor([ids])).logits[0, -1]
            top = torch.topk(last, 2).values
            margin = min(margin, float(top[0] - top[1]))
            ids.append(int(torch.argmax(last)))
    report[out] = {"ids": ids[len(prompt):], "margin": margin}
print(json.dumps(report))
`;

Deno.test({
  name:
    "model files: HF-saved Llama and Qwen3 (f32, bf16, sharded) give Transformers' greedy tokens",
  ignore: transformersMissing !== undefined,
  ...GPU_TEST,
  fn: async () => {
    await withTempDir(async (root) => {
      const prompt = "你好，世界";
      const promptIds = [1, 1968, 294, 1950]; // bos + the prompt in MiniMind's tokenizer
      const steps = 10;
      const variants = ["llama", "qwen3"].flatMap((arch) =>
        [["f32", "0"], ["bf16", "0"], ["f32", "1"]].map((
          [dtype, sharded],
        ) => [arch, dtype, sharded])
      );
      const py = await new Deno.Command(PYTHON!, {
        args: [
          "-c",
          HF_SCRIPT,
          root,
          JSON.stringify(variants),
          JSON.stringify(promptIds),
          `${steps}`,
        ],
        stdout: "piped",
        stderr: "piped",
      }).output();
      assert(py.success, new TextDecoder().decode(py.stderr));
      const report: Record<string, { ids: number[]; margin: number }> = JSON.parse(
        new TextDecoder().decode(py.stdout),
      );
      assertEquals(Object.keys(report).length, 6);
      for (const [dir, theirs] of Object.entries(report)) {
        // float32 differences here are ~1e-6 on O(1) logits; the gap must be far above that.
        assert(theirs.margin > 1e-3, `${dir}: top-2 margin ${theirs.margin} too small to compare`);
        const files = [...Deno.readDirSync(dir)].map((e) => e.name);
        if (dir.endsWith("-1")) {
          assert(files.includes("model.safetensors.index.json"), `${dir}: ${files}`);
          assert(files.filter((f) => /^model-\d+-of-\d+\.safetensors$/.test(f)).length > 1, dir);
        }
        for (const f of ["tokenizer.json", "tokenizer_config.json"]) {
          await Deno.copyFile(`${TOK}/${f}`, `${dir}/${f}`);
        }
        const chunks: string[] = [];
        const status = await runGenerate(
          await argsOf(generateCommand, [
            "--model",
            dir,
            "--prompt",
            prompt,
            "--json",
            "--max-new-tokens",
            `${steps}`,
          ]),
          { gpu, write: (t) => void chunks.push(t), note: () => {} },
        );
        assertEquals(status, 0);
        const ours = JSON.parse(chunks.join("")).ids as number[];
        // Ours stops at eos (2); theirs ran on: compare through our stop.
        const stop = theirs.ids.indexOf(2);
        assertEquals(ours, stop < 0 ? theirs.ids : theirs.ids.slice(0, stop + 1), dir);
      }
    });
  },
});

Deno.test("model files: MiniMind's resume file loads its model part, the optimizer left aside", async () => {
  // scripts/make_pth_fixtures.py resume(): LlamaConfig(hidden 8, 1 layer, 2/1 heads, MLP 12,
  // vocab 16, tied), no q_norm, so the shape is given.
  const shape = shapeOf({
    hidden_size: 8,
    num_hidden_layers: 1,
    num_attention_heads: 2,
    num_key_value_heads: 1,
    intermediate_size: 12,
    vocab_size: 16,
    max_position_embeddings: 2048,
    rope_theta: 10000,
    rms_norm_eps: 1e-6,
    tie_word_embeddings: true,
    qk_norm: false,
  });
  const m = await loadModel(`${DIR}/resume.pth`, { shape, tokenizer });
  const records = JSON.parse(await Deno.readTextFile(`${DIR}/resume.tensors.json`));
  // Every tensor of the state dict but the second copy of the tied head.
  assertEquals(
    [...m.params.keys()].sort(),
    Object.keys(records).filter((n) => n !== "lm_head.weight").sort(),
  );
  assertEquals(m.params.get("model.norm.weight")!.length, 8);
});
