/**
 * Generation with the KV cache (`model/inference.ts`, `model/generate.ts`, `kernels/attention/decode.ts`)
 * and the `generate` / `chat` commands (`cli/generate.ts`):
 *
 * - the cached model's logits against the float64 reference `modelForward`
 *   at every position (prefill of several lengths, then decode steps),
 *   GQA and plain heads, QK-norm, untied head, head_dim 96 (> one workgroup);
 * - 50 greedy tokens with the cache (argmax on the GPU, several steps per
 *   submit, and argmax on the CPU every step) equal greedy decoding that
 *   recomputes the whole sequence (a fresh prefill) at every step, and each
 *   is the reference's argmax up to float error;
 * - a Hugging Face-style directory (config.json from `toHfConfig`, BF16 and
 *   sharded F16 safetensors written here from known values) whose weights spell
 *   "你好世界" (byte-level tokens, 3 per character) greedily: it loads, generates
 *   exactly that, and streams only whole characters;
 * - context overflow in `generate`; the same seed giving the same text;
 * - a chat transcript through the REPL as a child process on stdin/stdout
 *   (history, /reset, /exit, end of input), and history dropping in a small context.
 *
 * Models are tiny (hidden 32) with parameters spread wider than the default
 * init so that attention is far from uniform and a wrong position, cache row
 * or head index shows as an O(1) error. GPU tests share one device and skip
 * Deno's op/resource sanitizers: WebGPU's mapAsync and the device's internal
 * promises outlive a test body by design (the device is destroyed at the end).
 */
import {
  assert,
  assertClose,
  assertEquals,
  assertRejects,
  assertStringIncludes,
} from "./assert.ts";
import {
  GPU_TEST,
  randomF32,
  referenceLogits,
  submitPassAndWait,
  tinyConfig as sharedTinyConfig,
} from "./helpers.ts";
import { Gpu } from "../kernels/runtime.ts";
import { InferenceModel } from "../model/inference.ts";
import { generate } from "../model/generate.ts";
import { argmax, GREEDY } from "../model/sampling.ts";
import type { ModelConfig } from "../model/config.ts";
import { parameterSpecs } from "../model/params.ts";
import {
  attentionForward as referenceAttention,
  matmulXWt as referenceMatmul,
} from "../model/reference.ts";
import { matvecXWt } from "../kernels/matvec.ts";
import { attentionDecode } from "../kernels/attention/decode.ts";
import { greedyAdvance } from "../kernels/greedy.ts";
import { loadCheckpoint, saveCheckpoint } from "../io/checkpoint.ts";
import { toHfConfig } from "../io/hf_config.ts";
import { writeSafetensors } from "../io/safetensors.ts";
import { defaultTokenizer } from "../data/corpus.ts";
import type { ChatMessage } from "../data/tokenizer.ts";
import type { ParsedArgs } from "../cli/args.ts";
import { parseCommandArgs } from "../cli/args.ts";
import { chatCommand, generateCommand, runChat, runGenerate } from "../cli/generate.ts";
import { Rng } from "../util/random.ts";
import { UserError } from "../util/errors.ts";

const gpu = await Gpu.request();
const tokenizer = defaultTokenizer();

function tinyConfig(o: Partial<ModelConfig> = {}): ModelConfig {
  return sharedTinyConfig({ max_position_embeddings: 160, ...o });
}

/** Parameters with more spread than the default init (see the file comment). */
function spreadParameters(
  config: ModelConfig,
  seed: number,
  std = 0.15,
): Map<string, Float32Array> {
  const rng = new Rng(seed);
  const out = new Map<string, Float32Array>();
  for (const s of parameterSpecs(config)) {
    const t = new Float32Array(s.size);
    for (let i = 0; i < t.length; i++) {
      t[i] = s.shape.length === 1 ? 1 + 0.3 * rng.normal() : std * rng.normal();
    }
    out.set(s.name, t);
  }
  return out;
}

// Float32 GPU vs float64 reference: each logit is a sum of H = 32 products
// after two layers of 32..48-term sums, norms and a softmax; the float32
// rounding of those (~6e-8 relative per operation, growing like sqrt(terms))
// stays near 1e-6 for logits of magnitude ~5 (measured: 1e-6). 2e-5 absolute
// is 20x that, while a wrong cache row, position or head shows as O(0.1..1).
const LOGIT_TOL = { atol: 2e-5, rtol: 2e-5 };

const CONFIGS: [string, ModelConfig][] = [
  ["GQA 4/2 tied", tinyConfig()],
  [
    "QK-norm, 4/4 heads, untied",
    tinyConfig({ qk_norm: true, num_key_value_heads: 4, tie_word_embeddings: false }),
  ],
  [
    "head_dim 96, 2/1 heads, 1 layer",
    tinyConfig({
      hidden_size: 192,
      num_attention_heads: 2,
      num_key_value_heads: 1,
      num_hidden_layers: 1,
    }),
  ],
];

for (const [name, config] of CONFIGS) {
  Deno.test({
    name: `generate: cached logits equal the reference at every position (${name})`,
    ...GPU_TEST,
    fn: async () => {
      const params = spreadParameters(config, 1);
      const rng = new Rng(2);
      // 140 positions: the decode kernel walks keys in chunks of 64, so three chunks.
      const ids = Array.from({ length: 140 }, () => rng.nextInt(config.vocab_size));
      const ref = referenceLogits(config, params, ids);
      const V = config.vocab_size;
      const at = (p: number) => ref.subarray(p * V, (p + 1) * V);
      // Capacity 144: prefill buckets 16, 32, 64, 128, 144 (the last is the capacity).
      const model = await InferenceModel.create(gpu, config, params, { capacity: 144 });
      try {
        // Prefill lengths inside, at and just past a bucket edge.
        for (const n of [1, 7, 16, 17, 45, 140]) {
          assertClose(await model.prefill(ids.slice(0, n)), at(n - 1), LOGIT_TOL, `prefill ${n}`);
          assertEquals(model.length, n);
        }
        // Decode after a prefill of 9: positions 9..139 one at a time.
        await model.prefill(ids.slice(0, 9));
        for (let p = 9; p < ids.length; p++) {
          assertClose(await model.decode(ids[p]), at(p), LOGIT_TOL, `decode position ${p}`);
        }
        assertEquals(model.length, 140);
      } finally {
        model.destroy();
      }
    },
  });
}

Deno.test({
  name: "generate: 50 greedy tokens with the cache equal full recomputation at every step",
  ...GPU_TEST,
  fn: async () => {
    const config = tinyConfig();
    // Std 0.3: small random models fall into loops under greedy decoding;
    // this one keeps choosing new tokens (23 distinct of 50), so a cache
    // error at any position would show.
    const params = spreadParameters(config, 4, 0.3);
    const prompt = [5, 17, 3, 60, 22];
    const model = await InferenceModel.create(gpu, config, params, { capacity: 64 });
    try {
      // Greedy picks tokens on the GPU, several steps per submit...
      const cached = await generate(model, prompt, { maxNewTokens: 50, sampling: GREEDY });
      assertEquals(cached.ids.length, 50);
      assertEquals(cached.finish, "length");
      // ... the same tokens as reading the logits back at every step.
      const perStep = await generate(model, prompt, {
        maxNewTokens: 50,
        sampling: GREEDY,
        gpuGreedySteps: 0,
      });
      assertEquals(perStep.ids, cached.ids);
      assert(new Set(cached.ids).size >= 15, "a degenerate (near-constant) greedy sequence");
      // Without the cache: prefill the whole sequence so far, take the argmax.
      const seq = [...prompt];
      for (let i = 0; i < 50; i++) seq.push(argmax(await model.prefill(seq)));
      assertEquals(cached.ids, seq.slice(prompt.length));
      // And each token is the float64 reference's argmax up to float error:
      // its reference logit is within twice the logit tolerance of the best.
      const V = config.vocab_size;
      const ref = referenceLogits(config, params, seq.slice(0, -1));
      for (let i = 0; i < 50; i++) {
        const p = prompt.length - 1 + i;
        const row = ref.subarray(p * V, (p + 1) * V);
        const best = row[argmax(row)];
        const tol = 2 * (LOGIT_TOL.atol + LOGIT_TOL.rtol * Math.abs(best));
        assert(row[seq[p + 1]] >= best - tol, `token ${i} is not the reference's argmax`);
      }
    } finally {
      model.destroy();
    }
  },
});

// ---- The decode kernels on their own.

Deno.test({
  name: "kernels: matvec (both designs, vec4 and scalar) equals the reference X W^T at M = 1",
  ...GPU_TEST,
  fn: async () => {
    const rng = new Rng(8);
    for (const [K, N] of [[1, 1], [7, 65], [33, 130], [64, 7], [130, 33], [512, 259]]) {
      const x = randomF32(rng, K);
      const w = randomF32(rng, N * K);
      const expected = referenceMatmul(Float64Array.from(x), Float64Array.from(w), 1, K, N);
      const xb = gpu.createBuffer(x, "x");
      const wb = gpu.createBuffer(w, "w");
      const yb = gpu.createBuffer(N * 4, "y");
      for (const design of ["rows", "split"] as const) {
        for (const vec of K % 4 === 0 ? [1, 4] as const : [1] as const) {
          await submitPassAndWait(
            gpu,
            await matvecXWt(gpu, { x: xb, w: wb, y: yb, K, N, design, vec }),
          );
          // A K-term f32 dot product of N(0,1) values: rounding error grows
          // like sqrt(K) 2^-24 |terms|; 1e-5 (1 + |y|) is over 10x that at K = 512.
          assertClose(
            await gpu.readF32(yb, 0, N),
            expected,
            { atol: 1e-5, rtol: 1e-5 },
            `K=${K} N=${N} ${design} vec${vec}`,
          );
        }
      }
      for (const b of [xb, wb, yb]) b.destroy();
    }
  },
});

Deno.test({
  name: "kernels: decode attention of queries at positions pos.. equals causal attention rows",
  ...GPU_TEST,
  fn: async () => {
    const rng = new Rng(9);
    for (const [nH, nKV, hd, T, pos] of [[4, 2, 16, 8, 5], [2, 2, 64, 70, 66], [4, 1, 96, 3, 0]]) {
      const Tq = T - pos;
      const q = randomF32(rng, T * nH * hd);
      const k = randomF32(rng, T * nKV * hd);
      const v = randomF32(rng, T * nKV * hd);
      const ref = referenceAttention(
        Float64Array.from(q),
        Float64Array.from(k),
        Float64Array.from(v),
        1,
        T,
        nH,
        nKV,
        hd,
      ).out;
      // The cache holds T rows of capacity T + 5 (unused rows are garbage).
      const cap = T + 5;
      const kc = new Float32Array(cap * nKV * hd).fill(1e3);
      const vc = new Float32Array(cap * nKV * hd).fill(1e3);
      kc.set(k);
      vc.set(v);
      const qb = gpu.createBuffer(q.subarray(pos * nH * hd), "q");
      const kb = gpu.createBuffer(kc, "k cache");
      const vb = gpu.createBuffer(vc, "v cache");
      const ob = gpu.createBuffer(Tq * nH * hd * 4, "out");
      const pb = gpu.createBuffer(new Uint32Array([pos]), "pos");
      await submitPassAndWait(
        gpu,
        await attentionDecode(gpu, {
          q: qb,
          k: kb,
          v: vb,
          out: ob,
          pos: pb,
          Tq,
          nH,
          nKV,
          hd,
          kvStride: cap,
        }),
      );
      // Softmax-weighted means of N(0,1) values: float32 error ~1e-6.
      assertClose(
        await gpu.readF32(ob, 0, Tq * nH * hd),
        ref.subarray(pos * nH * hd),
        { atol: 2e-5, rtol: 0 },
        `nH=${nH} nKV=${nKV} hd=${hd} T=${T} pos=${pos}`,
      );
      for (const b of [qb, kb, vb, ob, pb]) b.destroy();
    }
  },
});

Deno.test({
  name: "kernels: greedy advance takes the first maximum and steps the position",
  ...GPU_TEST,
  fn: async () => {
    const V = 1000;
    const logits = new Float32Array(V).fill(-1);
    logits[3] = NaN;
    logits[700] = 5;
    logits[401] = 5; // tie: the lower index wins
    const lb = gpu.createBuffer(logits, "logits");
    const ids = gpu.createBuffer(new Uint32Array([0]), "ids");
    const pos = gpu.createBuffer(new Uint32Array([6]), "pos");
    const tokens = gpu.createBuffer(new Uint32Array(10), "tokens");
    await submitPassAndWait(
      gpu,
      await greedyAdvance(gpu, { logits: lb, ids, pos, tokens, V, capacity: 10 }),
    );
    assertEquals(argmax(logits), 401);
    assertEquals((await gpu.readU32(ids, 0, 1))[0], 401);
    assertEquals((await gpu.readU32(pos, 0, 1))[0], 7);
    assertEquals((await gpu.readU32(tokens, 7, 1))[0], 401);
    for (const b of [lb, ids, pos, tokens]) b.destroy();
  },
});

// ---- Models on disk, the commands.

const TEXT = "你好世界";

/**
 * Weights under which greedy decoding from bos spells `TEXT` then eos: no
 * layer writes to the residual stream (o_proj and down_proj are 0), so the
 * final norm sees the current token's embedding e_c (random, rms 1); the
 * untied head row of the token that must follow c is 2 e_c / |e_c|, giving it
 * the logit 2 |e_c| = 2 sqrt(32) ~ 11, the other chain tokens
 * 2 |e_c| cos(e_c, e_c') (random directions in 32 dimensions: |cos| ~ 0.2)
 * and every other token 0. BF16/F16 rounding (< 0.4%) cannot change that.
 */
function chainModel(): { config: ModelConfig; params: Map<string, Float32Array>; chain: number[] } {
  const ids = tokenizer.encode(TEXT);
  assertEquals(new Set(ids).size, ids.length, "the chain needs distinct ids");
  assert(ids.length > [...TEXT].length, "the text must split characters over several tokens");
  const chain = [tokenizer.bosId, ...ids, tokenizer.eosId];
  const config = tinyConfig({
    vocab_size: tokenizer.vocabSize,
    num_hidden_layers: 1,
    tie_word_embeddings: false,
    max_position_embeddings: 64,
  });
  const H = config.hidden_size;
  const params = spreadParameters(config, 4);
  const rng = new Rng(5);
  const emb = params.get("model.embed_tokens.weight")!;
  for (let i = 0; i < emb.length; i++) emb[i] = rng.normal();
  for (const n of ["self_attn.o_proj.weight", "mlp.down_proj.weight"]) {
    params.get(`model.layers.0.${n}`)!.fill(0);
  }
  params.get("model.norm.weight")!.fill(1);
  const head = params.get("lm_head.weight")!;
  head.fill(0);
  for (let i = 0; i + 1 < chain.length; i++) {
    const e = emb.subarray(chain[i] * H, (chain[i] + 1) * H);
    const norm = Math.hypot(...e);
    for (let j = 0; j < H; j++) head[chain[i + 1] * H + j] = (2 * e[j]) / norm;
  }
  return { config, params, chain };
}

/** Writes `params` as a Hugging Face directory: config.json, tokenizer files, safetensors. */
async function writeHfDir(
  dir: string,
  config: ModelConfig,
  params: Map<string, Float32Array>,
  dtype: "BF16" | "F16",
  shards: number,
): Promise<void> {
  const special = { bos: tokenizer.bosId, eos: tokenizer.eosId, pad: tokenizer.padId };
  await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify(toHfConfig(config, special)));
  await Deno.writeTextFile(`${dir}/tokenizer.json`, tokenizer.tokenizerJson);
  await Deno.writeTextFile(`${dir}/tokenizer_config.json`, tokenizer.tokenizerConfigJson);
  const specs = parameterSpecs(config);
  const tensors = (part: typeof specs) =>
    new Map(part.map((s) => [s.name, { shape: s.shape, data: params.get(s.name)! }]));
  const metadata = { format: "pt" };
  if (shards === 1) {
    await writeSafetensors(`${dir}/model.safetensors`, tensors(specs), { dtype, metadata });
    return;
  }
  const weightMap: Record<string, string> = {};
  for (let k = 0; k < shards; k++) {
    const file = `model-${String(k + 1).padStart(5, "0")}-of-${
      String(shards).padStart(5, "0")
    }.safetensors`;
    const part = specs.filter((_, i) => i % shards === k);
    for (const s of part) weightMap[s.name] = file;
    await writeSafetensors(`${dir}/${file}`, tensors(part), { dtype, metadata });
  }
  await Deno.writeTextFile(
    `${dir}/model.safetensors.index.json`,
    JSON.stringify({ metadata: {}, weight_map: weightMap }),
  );
}

async function argsOf(spec: typeof generateCommand, argv: string[]): Promise<ParsedArgs> {
  const a = await parseCommandArgs(spec, argv);
  if (!a) throw new Error("help requested");
  return a;
}

/** Runs `generate` in-process; returns what it wrote (as chunks) and its notes. */
async function runGen(argv: string[]) {
  const chunks: string[] = [];
  const notes: string[] = [];
  const status = await runGenerate(await argsOf(generateCommand, argv), {
    gpu,
    write: (t) => void chunks.push(t),
    note: (l) => void notes.push(l),
  });
  return { status, chunks, out: chunks.join(""), notes };
}

for (const [dtype, shards] of [["BF16", 1], ["F16", 2]] as const) {
  Deno.test({
    name:
      `generate: a Hugging Face dir with ${dtype} weights (${shards} file(s)) generates its known text, streaming whole characters`,
    ...GPU_TEST,
    fn: async () => {
      const dir = await Deno.makeTempDir({ prefix: "generate-hf-" });
      try {
        const { config, params, chain } = chainModel();
        await writeHfDir(dir, config, params, dtype, shards);
        const json = await runGen(["--model", dir, "--json", "--temperature", "0"]);
        assertEquals(json.status, 0);
        const r = JSON.parse(json.out);
        assertEquals(r.ids, chain.slice(1)); // the text's tokens, then eos
        assertEquals(r.text, TEXT);
        assert(typeof r.tokens_per_s === "number" && r.tokens_per_s > 0, "tokens_per_s");

        // Streaming: every chunk is whole characters (no U+FFFD mid-stream) and
        // chunks arrive per character, not per token.
        const streamed = await runGen(["--model", dir, "--temperature", "0", "--verbose"]);
        assertEquals(streamed.out, TEXT + "\n");
        for (const c of streamed.chunks) assert(!c.includes("\uFFFD"), `chunk ${c} has U+FFFD`);
        assertEquals(streamed.chunks.filter((c) => c !== "\n"), [...TEXT]);
        assertStringIncludes(streamed.notes.join("\n"), "tokens/s");
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    },
  });
}

/** A random tiny model with the default tokenizer, saved as our checkpoint. */
async function savedRandomModel(dir: string, maxPos = 128): Promise<ModelConfig> {
  const config = tinyConfig({ vocab_size: tokenizer.vocabSize, max_position_embeddings: maxPos });
  await saveCheckpoint(dir, {
    config,
    params: spreadParameters(config, 6),
    tokenizer: {
      tokenizerJson: tokenizer.tokenizerJson,
      tokenizerConfigJson: tokenizer.tokenizerConfigJson,
    },
    special: { bos: tokenizer.bosId, eos: tokenizer.eosId, pad: tokenizer.padId },
  });
  return config;
}

Deno.test({
  name: "generate: same seed same text; context overflow stops or refuses clearly",
  ...GPU_TEST,
  fn: async () => {
    const dir = await Deno.makeTempDir({ prefix: "generate-seed-" });
    try {
      await savedRandomModel(`${dir}/m`, 32);
      const m = `${dir}/m`;
      const sample = ["--model", m, "--json", "--temperature", "1.2", "--top-k", "50"];
      const a = await runGen([...sample, "--seed", "7", "--max-new-tokens", "12"]);
      const b = await runGen([...sample, "--seed", "7", "--max-new-tokens", "12"]);
      assertEquals(JSON.parse(a.out).ids, JSON.parse(b.out).ids);
      assertEquals(JSON.parse(a.out).text, JSON.parse(b.out).text);

      // bos + 4 tokens of prompt, max_position_embeddings 32: at most 27 new tokens fit.
      const prompt = "the sun";
      const n = 1 + tokenizer.encode(prompt).length;
      const long = await runGen([
        "--model",
        m,
        "--json",
        "--prompt",
        prompt,
        "--max-new-tokens",
        "100",
        "--temperature",
        "1",
        "--repetition-penalty",
        "1.5",
        "--seed",
        "1",
      ]);
      // (This seed never draws eos, so the context, not a stop, ends generation.)
      assertEquals(JSON.parse(long.out).ids.length, 32 - n);
      assertStringIncludes(long.notes.join("\n"), "context of 32 positions is full");
      await assertRejects(
        () => runGen(["--model", m, "--prompt", "word ".repeat(40)]),
        UserError,
        "max_position_embeddings",
      );
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

/** Greedy reply of the model in `dir` to `messages`, in-process (what chat must print). */
async function greedyReply(
  config: ModelConfig,
  dir: string,
  messages: ChatMessage[],
  maxNew: number,
): Promise<string> {
  const ckpt = await loadCheckpoint(dir);
  const model = await InferenceModel.create(gpu, config, ckpt.params, { capacity: 128 });
  try {
    const prompt = tokenizer.encode(
      tokenizer.applyChatTemplate(messages, { addGenerationPrompt: true }),
    );
    const stop = tokenizer.tokenToId("<|im_end|>")!;
    const r = await generate(model, prompt, {
      maxNewTokens: maxNew,
      sampling: GREEDY,
      stopIds: [stop, tokenizer.eosId],
    });
    const ids = r.finish === "stop" ? r.ids.slice(0, -1) : r.ids;
    return tokenizer.decode(ids, { skipSpecialTokens: true });
  } finally {
    model.destroy();
  }
}

async function runChild(args: string[], stdin: string) {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", new URL("../main.ts", import.meta.url).pathname, ...args],
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const writer = child.stdin.getWriter();
  await writer.write(new TextEncoder().encode(stdin));
  await writer.close();
  const out = await child.output();
  return {
    code: out.code,
    stdout: new TextDecoder().decode(out.stdout),
    stderr: new TextDecoder().decode(out.stderr),
  };
}

Deno.test({
  name: "chat: a transcript through the REPL on stdin/stdout (history, /reset, /exit, EOF)",
  ...GPU_TEST,
  fn: async () => {
    const dir = await Deno.makeTempDir({ prefix: "chat-" });
    try {
      const m = `${dir}/m`;
      const config = await savedRandomModel(m);
      const flags = ["chat", "--model", m, "--temperature", "0", "--max-new-tokens", "6"];
      const r = await runChild(flags, "hello\nhow are you\n/reset\nhow are you\n/exit\nignored\n");
      assertEquals(r.code, 0, r.stderr);
      const r1 = await greedyReply(config, m, [{ role: "user", content: "hello" }], 6);
      const r2 = await greedyReply(config, m, [
        { role: "user", content: "hello" },
        { role: "assistant", content: r1 },
        { role: "user", content: "how are you" },
      ], 6);
      const r3 = await greedyReply(config, m, [{ role: "user", content: "how are you" }], 6);
      // The history must matter for this check to mean anything.
      assert(r2 !== r3 && r1 !== "", `replies do not depend on the history: ${r2} / ${r3}`);
      assertEquals(
        r.stdout,
        [
          "> hello",
          r1,
          "> how are you",
          r2,
          "> /reset",
          "(history cleared)",
          "> how are you",
          r3,
          "> /exit",
          "",
        ].join("\n"),
      );
      assertStringIncludes(r.stderr, "/reset clears the history");

      // End of input (Ctrl-D) without /exit, a last line without its newline.
      const eof = await runChild(flags, "hello");
      assertEquals(eof.code, 0, eof.stderr);
      assertEquals(eof.stdout, `> hello\n${r1}\n`);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "chat: the oldest turns are dropped when the conversation outgrows the context",
  ...GPU_TEST,
  fn: async () => {
    const dir = await Deno.makeTempDir({ prefix: "chat-context-" });
    try {
      const m = `${dir}/m`;
      await savedRandomModel(m);
      const chunks: string[] = [];
      const notes: string[] = [];
      const lines = ["the sun is warm", "the river is long", "a cat sat", "/bogus", ""];
      const status = await runChat(
        await argsOf(chatCommand, [
          "--model",
          m,
          "--context",
          "40",
          "--max-new-tokens",
          "8",
          "--temperature",
          "0",
        ]),
        {
          gpu,
          write: (t) => void chunks.push(t),
          note: (l) => void notes.push(l),
          input: ReadableStream.from([new TextEncoder().encode(lines.join("\n"))]),
          interactive: false,
        },
      );
      assertEquals(status, 0);
      const out = chunks.join("");
      assertStringIncludes(notes.join("\n"), "oldest turn(s) to fit the context of 40 tokens");
      assertStringIncludes(out, "> a cat sat\n");
      assertStringIncludes(out, "(unknown command /bogus");
      // A message longer than the context allows is refused, and the REPL goes on.
      const chunks2: string[] = [];
      await runChat(
        await argsOf(chatCommand, ["--model", m, "--context", "40", "--temperature", "0"]),
        {
          gpu,
          write: (t) => void chunks2.push(t),
          note: () => {},
          input: ReadableStream.from([new TextEncoder().encode("word ".repeat(60) + "\nhi\n")]),
          interactive: false,
        },
      );
      assertStringIncludes(chunks2.join(""), "too long for the context of 40 tokens");
      assertStringIncludes(chunks2.join(""), "> hi\n");
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "generate: close the shared device",
  ...GPU_TEST,
  fn: () => gpu.destroy(),
});
