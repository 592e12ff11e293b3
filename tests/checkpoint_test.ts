/**
 * Tests of `io/hf_config.ts` and `io/checkpoint.ts`: config.json both
 * ways (and what is refused), the Hugging Face directory layout, bitwise
 * round trips, shape and name errors, the atomic save protocol under injected
 * failures, sharded F16/BF16 checkpoints from elsewhere, and (when PyTorch and
 * Transformers are installed) Transformers' logits on a saved checkpoint.
 */
import { type ModelConfig, presetConfig } from "../model/config.ts";
import {
  type CheckpointContents,
  loadCheckpoint,
  resolveCheckpointDir,
  saveCheckpoint,
} from "../io/checkpoint.ts";
import {
  fromHfConfig,
  parseGenerationConfig,
  toGenerationConfig,
  toHfConfig,
} from "../io/hf_config.ts";
import { initParameters, parameterSpecs } from "../model/params.ts";
import {
  bf16BitsToFloat,
  f16BitsToFloat,
  floatToBf16Bits,
  floatToF16Bits,
  openSafetensors,
  type TensorToWrite,
  writeSafetensors,
} from "../io/safetensors.ts";
import { UserError } from "../util/errors.ts";
import { Rng } from "../util/random.ts";
import {
  assert,
  assertClose,
  assertEquals,
  assertRejects,
  assertStringIncludes,
  assertThrows,
} from "./assert.ts";
import { findPython, referenceLogits } from "./helpers.ts";

const FIXTURE = "../shared/fixtures/minimind-tokenizer";

/** A model small enough that a checkpoint is a few kilobytes. */
function smallConfig(over: Partial<ModelConfig> = {}): ModelConfig {
  return {
    hidden_size: 16,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    intermediate_size: 24,
    vocab_size: 40,
    max_position_embeddings: 64,
    rope_theta: 1e4,
    rms_norm_eps: 1e-5,
    tie_word_embeddings: true,
    qk_norm: false,
    ...over,
  };
}

function randomMap(config: ModelConfig, rng: Rng, scale: number): Map<string, Float32Array> {
  const out = new Map<string, Float32Array>();
  for (const s of parameterSpecs(config)) {
    out.set(s.name, Float32Array.from({ length: s.size }, () => rng.normal() * scale));
  }
  return out;
}

function contents(config: ModelConfig, seed: number, withOptimizer = true): CheckpointContents {
  const rng = new Rng(seed + 1000);
  const c: CheckpointContents = {
    config,
    params: initParameters(config, seed),
    tokenizer: {
      tokenizerJson: `{"version": "1.0", "seed": ${seed}}`,
      tokenizerConfigJson: '{"chat_template": "{{ messages }}", "note": "中文"}',
    },
    special: { bos: 1, eos: 2, pad: 0 },
    state: {
      step: 100 + seed,
      lr: 0.1 + 0.2, // not exactly representable in decimal: must survive exactly
      tiny: 1e-300,
      rng: new Rng(seed).state(),
      data: { epoch: 1, shard: 3, offset: 12345, files: ["a.jsonl", "b.jsonl"] },
      run: { preset: "tiny", seq_len: 256, nested: [{ a: null, b: true }] },
    },
  };
  if (withOptimizer) {
    c.optimizer = { m: randomMap(config, rng, 1e-3), v: randomMap(config, rng, 1e-6) };
  }
  return c;
}

function bitsEqual(a: Float32Array, b: Float32Array): boolean {
  if (a.length !== b.length) return false;
  const x = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const y = new Uint32Array(b.buffer, b.byteOffset, b.length);
  return x.every((v, i) => v === y[i]);
}

function assertSameTensors(
  got: Map<string, Float32Array>,
  want: Map<string, Float32Array>,
  what: string,
): void {
  assertEquals([...got.keys()], [...want.keys()], `${what}: names in canonical order`);
  for (const [name, t] of want) assert(bitsEqual(got.get(name)!, t), `${what}: ${name} differs`);
}

async function withTempDir(f: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "ckpt-test-" });
  try {
    await f(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function readJsonFile(path: string): Promise<Record<string, unknown>> {
  return JSON.parse(await Deno.readTextFile(path));
}

async function siblings(parent: string): Promise<string[]> {
  const names: string[] = [];
  for await (const e of Deno.readDir(parent)) names.push(e.name);
  return names.sort();
}

// ---------------------------------------------------------------------------
// config.json

Deno.test("hf_config: presets round-trip through config.json", () => {
  for (const name of ["tiny", "minimind2-small", "minimind-3"]) {
    for (const tie of [true, false]) {
      const config = { ...presetConfig(name), tie_word_embeddings: tie };
      const json = JSON.parse(JSON.stringify(toHfConfig(config, { bos: 1, eos: 2, pad: 0 })));
      const back = fromHfConfig(json, "config.json");
      assertEquals(back.config, config, name);
      assertEquals(back.special, { bos: 1, eos: 2, pad: 0 });
      assertEquals(back.architecture, config.qk_norm ? "Qwen3ForCausalLM" : "LlamaForCausalLM");
    }
  }
});

Deno.test("hf_config: Llama and Qwen3 fields as Transformers expects them", () => {
  const llama = toHfConfig(presetConfig("minimind2-small"), { bos: 1, eos: 2, pad: 0 });
  const common = {
    attention_bias: false,
    attention_dropout: 0,
    bos_token_id: 1,
    eos_token_id: 2,
    pad_token_id: 0,
    hidden_act: "silu",
    hidden_size: 512,
    initializer_range: 0.02,
    intermediate_size: 1408,
    max_position_embeddings: 32768,
    num_attention_heads: 8,
    num_hidden_layers: 8,
    num_key_value_heads: 2,
    rms_norm_eps: 1e-5,
    rope_scaling: null,
    rope_theta: 1e6,
    rope_parameters: { rope_type: "default", rope_theta: 1e6 },
    tie_word_embeddings: true,
    torch_dtype: "float32",
    use_cache: true,
    vocab_size: 6400,
  };
  assertEquals(llama, {
    ...common,
    architectures: ["LlamaForCausalLM"],
    model_type: "llama",
    head_dim: 64,
    mlp_bias: false,
    pretraining_tp: 1,
  });
  assertEquals(Object.keys(llama), Object.keys(llama).sort(), "keys sorted like save_pretrained");
  const qwen = toHfConfig(presetConfig("minimind-3"), { bos: 1, eos: 2, pad: 0 });
  assertEquals(qwen.architectures, ["Qwen3ForCausalLM"]);
  assertEquals(qwen.model_type, "qwen3");
  assertEquals(qwen.head_dim, 96);
  assertEquals(qwen.use_sliding_window, false);
  assertEquals(qwen.sliding_window, null);
  assertEquals(qwen.max_window_layers, 8);
  assertEquals(qwen.layer_types, Array(8).fill("full_attention"));
  assert(!("mlp_bias" in qwen), "Qwen3 has no mlp_bias field");
});

/** A config as `LlamaConfig.save_pretrained` writes it (MiniMind2 converted to Llama, bf16). */
const MINIMIND_AS_LLAMA = {
  architectures: ["LlamaForCausalLM"],
  attention_bias: false,
  attention_dropout: 0.0,
  bos_token_id: 1,
  eos_token_id: 2,
  head_dim: 64,
  hidden_act: "silu",
  hidden_size: 512,
  initializer_range: 0.02,
  intermediate_size: 1408,
  max_position_embeddings: 32768,
  mlp_bias: false,
  model_type: "llama",
  num_attention_heads: 8,
  num_hidden_layers: 8,
  num_key_value_heads: 2,
  pretraining_tp: 1,
  rms_norm_eps: 1e-05,
  rope_scaling: null,
  rope_theta: 1000000.0,
  tie_word_embeddings: true,
  torch_dtype: "bfloat16",
  transformers_version: "4.48.0",
  use_cache: true,
  vocab_size: 6400,
};

/** Qwen3-1.7B's shape (hidden 2048 / 16 heads = head_dim 128), trimmed vocabulary. */
const QWEN3_LIKE = {
  architectures: ["Qwen3ForCausalLM"],
  attention_bias: false,
  attention_dropout: 0.0,
  bos_token_id: 151643,
  eos_token_id: 151645,
  head_dim: 128,
  hidden_act: "silu",
  hidden_size: 2048,
  initializer_range: 0.02,
  intermediate_size: 6144,
  max_position_embeddings: 40960,
  max_window_layers: 28,
  model_type: "qwen3",
  num_attention_heads: 16,
  num_hidden_layers: 28,
  num_key_value_heads: 8,
  rms_norm_eps: 1e-06,
  rope_scaling: null,
  rope_theta: 1000000,
  sliding_window: null,
  tie_word_embeddings: true,
  torch_dtype: "bfloat16",
  use_cache: true,
  use_sliding_window: false,
  vocab_size: 151936,
};

Deno.test("hf_config: reads configs written by Transformers and MiniMind", () => {
  const m = fromHfConfig(MINIMIND_AS_LLAMA, "config.json");
  assertEquals(m.config, presetConfig("minimind2-small"));
  const q = fromHfConfig(QWEN3_LIKE, "config.json");
  assertEquals(q.config.qk_norm, true);
  assertEquals(q.config.num_key_value_heads, 8);
  assertEquals(q.special, { bos: 151643, eos: 151645 });
  // Transformers 5 puts rope_theta inside rope_parameters.
  const v5 = {
    ...MINIMIND_AS_LLAMA,
    rope_theta: undefined,
    rope_parameters: { rope_type: "default", rope_theta: 5e5 },
  };
  assertEquals(fromHfConfig(v5, "c").config.rope_theta, 5e5);
  // Absent optional fields take LlamaConfig's defaults.
  const minimal = {
    model_type: "llama",
    hidden_size: 64,
    intermediate_size: 128,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    vocab_size: 100,
  };
  const d = fromHfConfig(minimal, "c").config;
  assertEquals(
    [
      d.num_key_value_heads,
      d.rope_theta,
      d.rms_norm_eps,
      d.tie_word_embeddings,
      d.max_position_embeddings,
    ],
    [4, 10000, 1e-6, false, 2048],
  );
  // MiniMind's own config: no MoE; QK-norm decided by the weights.
  const native = {
    architectures: ["MiniMindForCausalLM"],
    model_type: "minimind",
    hidden_size: 768,
    num_hidden_layers: 8,
    num_attention_heads: 8,
    num_key_value_heads: 4,
    head_dim: 96,
    intermediate_size: 2432,
    vocab_size: 6400,
    rms_norm_eps: 1e-6, // MiniMindConfig's default, as MiniMind-3 saves it
    rope_theta: 1e6,
    max_position_embeddings: 32768,
    use_moe: false,
    num_experts: 4,
    flash_attn: true,
    dropout: 0.0,
    inference_rope_scaling: false,
    rope_scaling: null,
    bos_token_id: 1,
    eos_token_id: 2,
  };
  assertEquals(
    fromHfConfig(native, "c", { weightsHaveQkNorm: true }).config,
    presetConfig("minimind-3"),
  );
  assertEquals(fromHfConfig(native, "c", { weightsHaveQkNorm: false }).config.qk_norm, false);
});

Deno.test("hf_config: what we do not implement is a UserError naming the field", () => {
  const bad = (over: Record<string, unknown>, ...parts: string[]) => {
    const err = assertThrows(
      () => fromHfConfig({ ...MINIMIND_AS_LLAMA, ...over }, "dl/config.json"),
      UserError,
    );
    for (const p of ["dl/config.json", ...parts]) assertStringIncludes(err.message, p);
  };
  bad({ architectures: ["MistralForCausalLM"] }, "architectures", "MistralForCausalLM");
  bad({ architectures: undefined, model_type: "gpt2" }, "model_type", "gpt2");
  bad({ model_type: "qwen3" }, "model_type", "does not match");
  bad({ rope_scaling: { type: "linear", factor: 2 } }, "rope_scaling", "linear");
  bad({ rope_parameters: { rope_type: "yarn", factor: 4 } }, "rope_parameters");
  bad({ attention_bias: true }, "attention_bias", "no biases");
  bad({ mlp_bias: true }, "mlp_bias");
  bad({ hidden_act: "gelu" }, "hidden_act", "gelu");
  bad({ head_dim: 128 }, "head_dim = 128", "hidden_size / num_attention_heads");
  bad({ sliding_window: 4096 }, "sliding_window");
  bad({ use_sliding_window: true }, "use_sliding_window");
  bad({ layer_types: ["sliding_attention"] }, "layer_types");
  bad({ num_local_experts: 8 }, "num_local_experts", "mixture-of-experts");
  bad({ quantization_config: { quant_method: "gptq" } }, "quantization_config");
  bad({ hidden_size: undefined }, "hidden_size is missing");
  bad({ num_hidden_layers: 2.5 }, "num_hidden_layers must be a positive integer");
  bad({ rms_norm_eps: -1 }, "rms_norm_eps must be a positive number");
  bad(
    { num_key_value_heads: 3 },
    "num_attention_heads (8) must be divisible by num_key_value_heads (3)",
  );
  bad({ eos_token_id: 6400 }, "eos_token_id = 6400 is outside the vocabulary");
  bad({ rope_theta: 1, rope_parameters: { rope_type: "default", rope_theta: 2 } }, "disagrees");
  // Qwen3 without head_dim means Transformers' default 128, which must then fit.
  const err = assertThrows(
    () => fromHfConfig({ ...QWEN3_LIKE, head_dim: undefined, hidden_size: 1024 }, "q.json"),
    UserError,
  );
  assertStringIncludes(err.message, "head_dim = 128 (the Qwen3ForCausalLM default)");
  assertThrows(
    () => fromHfConfig({ model_type: "minimind", use_moe: true, hidden_size: 8 }, "m.json"),
    UserError,
    "use_moe",
  );
  assertThrows(() => fromHfConfig([], "x.json"), UserError, "x.json: expected a JSON object");
});

Deno.test("generation_config: written and read", () => {
  const g = toGenerationConfig({ bos: 1, eos: 2, pad: 0 });
  assertEquals(g, { bos_token_id: 1, eos_token_id: 2, pad_token_id: 0, do_sample: false });
  const s = toGenerationConfig({ bos: 1, eos: 2, pad: 0 }, { temperature: 0.85, top_p: 0.85 });
  assertEquals(s.do_sample, true);
  assertEquals(parseGenerationConfig(s, "g.json"), {
    bos: 1,
    eos: 2,
    eosIds: [2],
    pad: 0,
    do_sample: true,
    temperature: 0.85,
    top_p: 0.85,
  });
  assertEquals(parseGenerationConfig({ eos_token_id: [7, 3], pad_token_id: null }, "g").eosIds, [
    7,
    3,
  ]);
  assertThrows(() => parseGenerationConfig({ top_p: 2 }, "g.json"), UserError, "top_p must be");
  assertThrows(() => parseGenerationConfig({ do_sample: "yes" }, "g.json"), UserError, "do_sample");
  assertThrows(() => parseGenerationConfig({ eos_token_id: 9 }, "g.json", 5), UserError, "outside");
});

// ---------------------------------------------------------------------------
// Checkpoints.

Deno.test("checkpoint: round trip is bitwise (params, moments, state, tokenizer) for each variant", async () => {
  await withTempDir(async (root) => {
    const variants = [
      smallConfig(),
      smallConfig({ tie_word_embeddings: false }),
      smallConfig({ qk_norm: true }),
      smallConfig({ qk_norm: true, tie_word_embeddings: false }),
    ];
    for (const [i, config] of variants.entries()) {
      const dir = `${root}/ckpt-${i}`;
      const c = contents(config, i);
      await saveCheckpoint(dir, c);
      const back = await loadCheckpoint(dir, { optimizer: true });
      assertEquals(back.source, dir);
      assertEquals(back.config, config);
      assertSameTensors(back.params, c.params, "params");
      assertSameTensors(back.optimizer!.m, c.optimizer!.m, "exp_avg");
      assertSameTensors(back.optimizer!.v, c.optimizer!.v, "exp_avg_sq");
      assertEquals(back.state, c.state);
      assertEquals(back.tokenizer, c.tokenizer);
      assertEquals(back.special, c.special);
      assertEquals(back.generation, { bos: 1, eos: 2, eosIds: [2], pad: 0, do_sample: false });
      // Without asking for the optimizer, it is not read.
      assertEquals((await loadCheckpoint(dir)).optimizer, undefined);
    }
    // A trailing slash names the same checkpoint.
    assertEquals((await loadCheckpoint(`${root}/ckpt-0/`)).source, `${root}/ckpt-0`);
  });
});

Deno.test("checkpoint: the directory is a Hugging Face model directory", async () => {
  await withTempDir(async (root) => {
    for (
      const [config, arch] of [
        [smallConfig(), "LlamaForCausalLM"],
        [smallConfig({ qk_norm: true, tie_word_embeddings: false }), "Qwen3ForCausalLM"],
      ] as const
    ) {
      const dir = `${root}/${arch}`;
      await saveCheckpoint(dir, contents(config, 3));
      assertEquals(await siblings(dir), [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "trainer_state.json",
      ]);
      const cfg = await readJsonFile(`${dir}/config.json`);
      assertEquals(cfg.architectures, [arch]);
      assertEquals(cfg.tie_word_embeddings, config.tie_word_embeddings);
      assertEquals(cfg.head_dim, 4);
      assertEquals(await readJsonFile(`${dir}/generation_config.json`), {
        bos_token_id: 1,
        eos_token_id: 2,
        pad_token_id: 0,
        do_sample: false,
      });
      const f = await openSafetensors(`${dir}/model.safetensors`);
      try {
        assertEquals(f.metadata, { format: "pt" });
        const specs = parameterSpecs(config);
        assertEquals(
          [...f.tensors.values()].map((t) => [t.name, t.dtype, t.shape]),
          specs.map((s) => [s.name, "F32", s.shape]),
        );
        assertEquals(f.tensors.has("lm_head.weight"), !config.tie_word_embeddings);
        assertEquals(f.tensors.has("model.layers.1.self_attn.k_norm.weight"), config.qk_norm);
        assertEquals(f.tensors.get("model.layers.0.self_attn.k_proj.weight")!.shape, [8, 16]);
        assertEquals(f.tensors.get("model.layers.1.mlp.down_proj.weight")!.shape, [16, 24]);
      } finally {
        f.close();
      }
      const opt = await openSafetensors(`${dir}/optimizer.safetensors`);
      try {
        const names = [...opt.tensors.keys()];
        assert(names.includes("model.embed_tokens.weight.exp_avg"));
        assert(names.includes("model.norm.weight.exp_avg_sq"));
        assertEquals(names.length, 2 * parameterSpecs(config).length);
      } finally {
        opt.close();
      }
    }
  });
});

/** Rewrites a checkpoint's config.json with `over` applied. */
async function editConfig(dir: string, over: Record<string, unknown>): Promise<void> {
  const cfg = await readJsonFile(`${dir}/config.json`);
  await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify({ ...cfg, ...over }));
}

/** Rewrites model.safetensors with `edit` applied to its tensors. */
async function editWeights(
  dir: string,
  edit: (m: Map<string, TensorToWrite>) => void,
): Promise<void> {
  const f = await openSafetensors(`${dir}/model.safetensors`);
  const m = new Map<string, TensorToWrite>();
  for (const [name, t] of f.tensors) {
    m.set(name, { shape: t.shape, data: (await f.read(name)).data });
  }
  f.close();
  edit(m);
  await writeSafetensors(`${dir}/model.safetensors`, m);
}

Deno.test("checkpoint: shape, missing and unexpected tensors are named", async () => {
  await withTempDir(async (root) => {
    const dir = `${root}/c`;
    const config = smallConfig();
    const fresh = () => saveCheckpoint(dir, contents(config, 1, false));
    await fresh();
    await editConfig(dir, { intermediate_size: 32 });
    let err = await assertRejects(() => loadCheckpoint(dir), UserError);
    for (
      const part of [
        "model.layers.0.mlp.gate_proj.weight",
        "has shape [24, 16]",
        "implies [32, 16]",
        "intermediate_size = 32",
        "config.json",
      ]
    ) assertStringIncludes(err.message, part);

    await fresh();
    await editConfig(dir, { num_key_value_heads: 4 });
    err = await assertRejects(() => loadCheckpoint(dir), UserError);
    assertStringIncludes(err.message, "k_proj.weight has shape [8, 16]");
    assertStringIncludes(err.message, "num_key_value_heads * head_dim = 16");

    await fresh();
    await editWeights(dir, (m) => m.delete("model.layers.1.mlp.up_proj.weight"));
    await assertRejects(
      () => loadCheckpoint(dir),
      UserError,
      "missing tensor model.layers.1.mlp.up_proj.weight",
    );

    await fresh();
    await editWeights(
      dir,
      (m) => m.set("model.layers.2.mlp.up_proj.weight", { shape: [1], data: new Float32Array(1) }),
    );
    await assertRejects(
      () => loadCheckpoint(dir),
      UserError,
      "unexpected tensor model.layers.2.mlp.up_proj.weight",
    );

    // Old Transformers saved RoPE buffers: ignored.
    await fresh();
    await editWeights(
      dir,
      (m) =>
        m.set("model.layers.0.self_attn.rotary_emb.inv_freq", {
          shape: [2],
          data: new Float32Array(2),
        }),
    );
    await loadCheckpoint(dir);

    // Untied config without a head; tied with an equal head (accepted) or a different one.
    await fresh();
    await editConfig(dir, { tie_word_embeddings: false });
    err = await assertRejects(() => loadCheckpoint(dir), UserError, "no lm_head.weight");
    assertStringIncludes(err.message, "tie_word_embeddings = false");
    await editConfig(dir, { tie_word_embeddings: true });
    await editWeights(
      dir,
      (m) => m.set("lm_head.weight", { ...m.get("model.embed_tokens.weight")! }),
    );
    const ok = await loadCheckpoint(dir);
    assert(!ok.params.has("lm_head.weight"), "the duplicate head is dropped");
    await editWeights(dir, (m) => {
      const head = m.get("lm_head.weight")!;
      const data = head.data.slice();
      data[5] += 1;
      m.set("lm_head.weight", { shape: head.shape, data });
    });
    await assertRejects(
      () => loadCheckpoint(dir),
      UserError,
      "lm_head.weight differs from model.embed_tokens.weight",
    );

    // Integer weights, missing files, bad JSON, no optimizer.
    await fresh();
    await editWeights(dir, () => {});
    const raw = await Deno.readFile(`${dir}/model.safetensors`);
    const text = new TextDecoder().decode(raw.subarray(8, 200));
    const at = text.indexOf('"F32"');
    raw.set(new TextEncoder().encode('"I32"'), 8 + at);
    await Deno.writeFile(`${dir}/model.safetensors`, raw);
    await assertRejects(() => loadCheckpoint(dir), UserError, "has dtype I32");
    await fresh();
    await Deno.remove(`${dir}/tokenizer.json`);
    await assertRejects(() => loadCheckpoint(dir), UserError, "tokenizer.json: missing");
    await fresh();
    await Deno.writeTextFile(`${dir}/trainer_state.json`, "[1, 2]");
    await assertRejects(
      () => loadCheckpoint(dir),
      UserError,
      "trainer_state.json: expected a JSON object",
    );
    await Deno.writeTextFile(`${dir}/config.json`, "{oops");
    await assertRejects(() => loadCheckpoint(dir), UserError, "config.json: not valid JSON");
    await fresh();
    await assertRejects(
      () => loadCheckpoint(dir, { optimizer: true }),
      UserError,
      "no optimizer state",
    );
    await Deno.remove(`${dir}/model.safetensors`);
    await Deno.writeFile(`${dir}/pytorch_model.bin`, new Uint8Array(4));
    await assertRejects(() => loadCheckpoint(dir), UserError, "PyTorch pickle weights");
    await assertRejects(
      () => loadCheckpoint(`${root}/nothing`),
      UserError,
      "no such checkpoint directory",
    );
  });
});

Deno.test("checkpoint: a failed or interrupted save leaves the previous checkpoint loadable", async () => {
  await withTempDir(async (root) => {
    const dir = `${root}/run/ckpt`;
    const parent = `${root}/run`;
    const config = smallConfig({ tie_word_embeddings: false });
    const v1 = contents(config, 1);
    const v2 = contents(config, 2);
    await saveCheckpoint(dir, v1);
    const expectV1 = async (where = dir) => {
      const back = await loadCheckpoint(dir, { optimizer: true });
      assertEquals(back.source, where);
      assertSameTensors(back.params, v1.params, "params after a failed save");
      assertSameTensors(back.optimizer!.v, v1.optimizer!.v, "moments after a failed save");
      assertEquals(back.state, v1.state);
    };

    // A full disk midway through model.safetensors: the error propagates, the
    // temp directory is removed, the old checkpoint is untouched.
    let seen = 0;
    const diskFull = await assertRejects(
      () =>
        saveCheckpoint(dir, v2, {
          onWrite: (file, n) => {
            if (file === "model.safetensors" && n > 1000) {
              seen = n;
              throw new Error("ENOSPC: no space left on device (simulated)");
            }
          },
        }),
      Error,
      "ENOSPC",
    );
    assert(seen > 0 && diskFull.message.includes("simulated"), "the hook fired midway");
    assertEquals(await siblings(parent), ["ckpt"]);
    await expectV1();

    // The same in the optimizer file, and in the last small file.
    for (const target of ["optimizer.safetensors", "trainer_state.json"]) {
      await assertRejects(() =>
        saveCheckpoint(dir, v2, {
          onWrite: (file) => {
            if (file === target) throw new Error("crash");
          },
        })
      );
      await expectV1();
    }

    // A crash after everything is written but before the swap: a .tmp- is
    // left behind (no cleanup runs in a crash) and must not be mistaken for
    // the checkpoint.
    await assertRejects(() =>
      saveCheckpoint(dir, v2, {
        onStep: (s) => {
          if (s === "written") throw new Error("killed");
        },
      })
    );
    const afterTmpCrash = await siblings(parent);
    assertEquals(afterTmpCrash.length, 2);
    assert(afterTmpCrash[1].startsWith("ckpt.tmp-"), `leftover ${afterTmpCrash}`);
    await expectV1();

    // A crash between moving the old checkpoint aside and moving the new one
    // in: <dir> is missing; loading recovers from <dir>.old-*.
    await assertRejects(() =>
      saveCheckpoint(dir, v2, {
        onStep: (s) => {
          if (s === "old-moved-aside") throw new Error("killed");
        },
      })
    );
    const names = await siblings(parent);
    assert(!names.includes("ckpt"), `ckpt should be missing: ${names}`);
    const old = names.find((n) => n.startsWith("ckpt.old-"))!;
    assert(old && names.some((n) => n.startsWith("ckpt.tmp-")), `${names}`);
    assertEquals(await resolveCheckpointDir(dir), `${parent}/${old}`);
    await expectV1(`${parent}/${old}`);

    // The next save completes the protocol and removes every leftover.
    const v3 = contents(config, 3);
    await saveCheckpoint(dir, v3);
    assertEquals(await siblings(parent), ["ckpt"]);
    const back = await loadCheckpoint(dir, { optimizer: true });
    assertSameTensors(back.params, v3.params, "params after recovery");
    assertEquals(back.state, v3.state);
  });
});

Deno.test("checkpoint: saving keeps the user's other files and refuses foreign directories", async () => {
  await withTempDir(async (root) => {
    const config = smallConfig();
    const dir = `${root}/ckpt`;
    await saveCheckpoint(dir, contents(config, 1));
    await Deno.writeTextFile(`${dir}/README.md`, "my notes");
    await Deno.mkdir(`${dir}/samples`);
    await Deno.writeTextFile(`${dir}/samples/a.txt`, "sample");
    await Deno.writeTextFile(`${dir}/model-00001-of-00002.safetensors`, "stale shard");
    // A save without optimizer state drops the old moments rather than keeping stale ones.
    await saveCheckpoint(dir, contents(config, 2, false));
    assertEquals(await Deno.readTextFile(`${dir}/README.md`), "my notes");
    assertEquals(await Deno.readTextFile(`${dir}/samples/a.txt`), "sample");
    const names = await siblings(dir);
    assert(!names.includes("optimizer.safetensors"), "stale optimizer state dropped");
    assert(!names.includes("model-00001-of-00002.safetensors"), "stale shard dropped");
    assertEquals((await loadCheckpoint(dir)).state?.step, 102);

    const foreign = `${root}/home`;
    await Deno.mkdir(foreign);
    await Deno.writeTextFile(`${foreign}/precious.txt`, "keep");
    await assertRejects(
      () => saveCheckpoint(foreign, contents(config, 1)),
      UserError,
      "not a checkpoint (no config.json); refusing to replace it",
    );
    assertEquals(await siblings(foreign), ["precious.txt"]);
    await Deno.writeTextFile(`${root}/file`, "x");
    await assertRejects(
      () => saveCheckpoint(`${root}/file`, contents(config, 1)),
      UserError,
      "not a directory",
    );
    // An empty directory is fine.
    await Deno.mkdir(`${root}/empty`);
    await saveCheckpoint(`${root}/empty`, contents(config, 1));
    // Wrong tensors are a programming error, caught before anything is written.
    const c = contents(config, 1);
    c.params.delete("model.norm.weight");
    await assertRejects(() => saveCheckpoint(`${root}/x`, c), Error, "lack model.norm.weight");
    const d = contents(config, 1);
    d.state = { loss: NaN };
    await assertRejects(() => saveCheckpoint(`${root}/x`, d), Error, "loss = NaN cannot be stored");
    assert(!(await siblings(root)).some((n) => n.startsWith("x")), "nothing written for x");
  });
});

Deno.test("checkpoint: a sharded F16 + BF16 checkpoint from elsewhere", async () => {
  await withTempDir(async (dir) => {
    const config = smallConfig({ vocab_size: 6400, tie_word_embeddings: false });
    const specs = parameterSpecs(config);
    const rng = new Rng(99);
    // Shard 1 (F16) holds the embedding and layer 0; shard 2 (BF16) the rest.
    // Expected values are the rounded ones, so the load must be exact.
    const shardOf = (name: string) =>
      name.startsWith("model.embed_tokens") || name.startsWith("model.layers.0.") ? 1 : 2;
    const expected = new Map<string, Float32Array>();
    const shards = [new Map<string, TensorToWrite>(), new Map<string, TensorToWrite>()];
    for (const s of specs) {
      const shard = shardOf(s.name);
      const round = shard === 1
        ? (x: number) => f16BitsToFloat(floatToF16Bits(x))
        : (x: number) => bf16BitsToFloat(floatToBf16Bits(x));
      const data = Float32Array.from({ length: s.size }, () => round(rng.normal() * 0.05));
      expected.set(s.name, data);
      shards[shard - 1].set(s.name, { shape: s.shape, data });
    }
    // Write the BF16 shard in reverse order, as another tool might.
    shards[1] = new Map([...shards[1]].reverse());
    const files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
    await writeSafetensors(`${dir}/${files[0]}`, shards[0], {
      dtype: "F16",
      metadata: { format: "pt" },
    });
    await writeSafetensors(`${dir}/${files[1]}`, shards[1], { dtype: "BF16" });
    const weightMap = Object.fromEntries(specs.map((s) => [s.name, files[shardOf(s.name) - 1]]));
    await Deno.writeTextFile(
      `${dir}/model.safetensors.index.json`,
      JSON.stringify({ metadata: { total_size: 0 }, weight_map: weightMap }),
    );
    await Deno.writeTextFile(
      `${dir}/config.json`,
      JSON.stringify({
        ...toHfConfig(config, { bos: 1, eos: 2, pad: 0 }),
        torch_dtype: "bfloat16",
      }),
    );
    await Deno.copyFile(`${FIXTURE}/tokenizer.json`, `${dir}/tokenizer.json`);
    await Deno.copyFile(`${FIXTURE}/tokenizer_config.json`, `${dir}/tokenizer_config.json`);
    // No generation_config.json and no pad id: pad falls back to eos.
    await editConfig(dir, { pad_token_id: null });
    const back = await loadCheckpoint(dir);
    assertEquals(back.config, config);
    assertSameTensors(back.params, expected, "sharded params");
    assertEquals(back.special, { bos: 1, eos: 2, pad: 2 });
    assertEquals(
      back.tokenizer.tokenizerJson,
      await Deno.readTextFile(`${FIXTURE}/tokenizer.json`),
    );

    assertEquals(back.generation, {});

    // The same weights as one BF16 model.safetensors beside the index: it wins.
    const all = new Map(
      specs.map((s) => [s.name, { shape: s.shape, data: expected.get(s.name)! }]),
    );
    await writeSafetensors(`${dir}/model.safetensors`, all, { dtype: "BF16" });
    const single = await loadCheckpoint(dir);
    for (const s of specs) {
      const want = expected.get(s.name)!.map((x) => bf16BitsToFloat(floatToBf16Bits(x)));
      assert(bitsEqual(single.params.get(s.name)!, want), `single BF16 file: ${s.name}`);
    }
    await Deno.remove(`${dir}/model.safetensors`);

    // An index that points outside the directory, or at a shard without the tensor.
    const index = `${dir}/model.safetensors.index.json`;
    await Deno.writeTextFile(
      index,
      JSON.stringify({ weight_map: { ...weightMap, "model.norm.weight": "../evil.safetensors" } }),
    );
    await assertRejects(
      () => loadCheckpoint(dir),
      UserError,
      "is not a file name in the checkpoint directory",
    );
    await Deno.writeTextFile(
      index,
      JSON.stringify({ weight_map: { ...weightMap, "model.norm.weight": files[0] } }),
    );
    await assertRejects(
      () => loadCheckpoint(dir),
      UserError,
      `model.norm.weight is mapped to ${files[0]}, which has no such tensor`,
    );
    await Deno.writeTextFile(index, JSON.stringify({ weights: {} }));
    await assertRejects(() => loadCheckpoint(dir), UserError, '"weight_map"');
  });
});

// ---------------------------------------------------------------------------
// Optional: Transformers loads our checkpoint and computes the same logits.

const { python: PYTHON, missing: transformersMissing } = findPython(["torch", "transformers"]);
if (transformersMissing) {
  console.log(`checkpoint_test: skipping the Transformers cross-check: ${transformersMissing}`);
}

const LOGITS_SCRIPT = `
import json, sys, torch
from transformers import AutoModelForCausalLM
model, info = AutoModelForCausalLM.from_pretrained(
    sys.argv[1], torch_dtype=torch.float32, output_loading_info=True)
model.eval()
ids = torch.tensor([json.loads(sys.argv[2])])
with torch.no_grad():
    logits = model(input_ids=ids).logits[0]
keys = {k: sorted(str(x) for x in v) for k, v in info.items()}
print(json.dumps({"logits": logits.reshape(-1).tolist(), "info": keys,
                  "arch": type(model).__name__}))
`;

Deno.test({
  name: "checkpoint: Transformers loads it with no missing or unexpected keys, same logits",
  ignore: transformersMissing !== undefined,
  fn: async () => {
    await withTempDir(async (root) => {
      const variants = [
        smallConfig({ hidden_size: 32, vocab_size: 64 }),
        smallConfig({ hidden_size: 32, vocab_size: 64, qk_norm: true, tie_word_embeddings: false }),
      ];
      for (const [i, config] of variants.entries()) {
        const dir = `${root}/m${i}`;
        const c = contents(config, 10 + i, false);
        // Norm weights away from 1, so that a norm loaded wrongly shows.
        const rng = new Rng(5);
        for (const [name, t] of c.params) {
          if (name.endsWith("norm.weight")) t.forEach((_, k) => (t[k] = 1 + 0.2 * rng.normal()));
        }
        await saveCheckpoint(dir, c);
        const ids = [1, 5, 9, 3, 17, 2, 40, 8];
        const out = await new Deno.Command(PYTHON!, {
          args: ["-c", LOGITS_SCRIPT, dir, JSON.stringify(ids)],
          stdout: "piped",
          stderr: "piped",
        }).output();
        assert(out.success, new TextDecoder().decode(out.stderr));
        const result = JSON.parse(new TextDecoder().decode(out.stdout));
        // Every tensor found its place, none was left over or reshaped.
        for (const field of ["missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"]) {
          assertEquals(result.info[field] ?? [], [], `variant ${i}: ${field}`);
        }
        assertEquals(result.arch, config.qk_norm ? "Qwen3ForCausalLM" : "LlamaForCausalLM");
        const theirs: number[] = result.logits;
        const ours = referenceLogits(config, c.params, ids);
        // PyTorch computes in float32 (rounding ~6e-8 relative per op, a few
        // hundred ops deep), the reference in float64; logits are O(0.1-1).
        // 1e-5 absolute is ~100x that error and far below the O(0.1) change any
        // misplaced tensor, transposed weight or wrong RoPE/eps would cause.
        assertClose(theirs, ours, { atol: 1e-5, rtol: 1e-5 }, `variant ${i} logits`);
      }
    });
  },
});
