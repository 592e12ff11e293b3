/**
 * `trainer lora` end to end (cli/lora.ts, train/lora.ts, io/peft.ts) on a
 * tiny random base with the embedded tokenizer and corpus: the adapter
 * directory and its PEFT files, the base left untouched, exact resume after
 * Ctrl-C, `lora merge` against `--adapter` (generate folds it on load, eval
 * runs it unmerged on the GPU, serve answers as generate), bad adapters named; and, where Python with
 * torch, transformers and peft is present, PEFT loading our adapter onto the
 * base with the reference's logits, and our loading of an adapter PEFT made.
 */
import { assert, assertClose, assertEquals, assertStringIncludes } from "./assert.ts";
import { findPython, GPU_TEST, referenceLogits, tinyConfig } from "./helpers.ts";
import { Gpu } from "../kernels/runtime.ts";
import { parseCommandArgs } from "../cli/args.ts";
import { loraCommand, loraMergeCommand } from "../cli/lora.ts";
import { evalCommand } from "../cli/eval.ts";
import { generateCommand, runGenerate } from "../cli/generate.ts";
import { runServe, serveCommand } from "../cli/serve.ts";
import { loadCheckpoint, saveCheckpoint } from "../io/checkpoint.ts";
import { loadAdapter, saveAdapter } from "../io/peft.ts";
import { initLora, loraLayout, mergeLora } from "../model/lora.ts";
import { parameterSpecs } from "../model/params.ts";
import { defaultTokenizer, writeEmbeddedCorpus } from "../data/corpus.ts";
import { readMetrics } from "../train/metrics.ts";
import { Rng } from "../util/random.ts";
import { UserError } from "../util/errors.ts";
import { runLora } from "../cli/lora.ts";

const gpu = await Gpu.request();
const tokenizer = defaultTokenizer();
const config = tinyConfig({ vocab_size: tokenizer.vocabSize, max_position_embeddings: 64 });
const root = await Deno.makeTempDir({ prefix: "lora-cli-test-" });
const baseDir = `${root}/base`;

/** A random base model with the default tokenizer (parameters wide enough that outputs vary). */
async function saveBase(): Promise<Map<string, Float32Array>> {
  const rng = new Rng(6);
  const params = new Map<string, Float32Array>();
  for (const s of parameterSpecs(config)) {
    const t = new Float32Array(s.size);
    for (let i = 0; i < t.length; i++) {
      t[i] = s.shape.length === 1 ? 1 + 0.3 * rng.normal() : 0.15 * rng.normal();
    }
    params.set(s.name, t);
  }
  await saveCheckpoint(baseDir, {
    config,
    params,
    tokenizer: {
      tokenizerJson: tokenizer.tokenizerJson,
      tokenizerConfigJson: tokenizer.tokenizerConfigJson,
    },
    special: { bos: tokenizer.bosId, eos: tokenizer.eosId, pad: tokenizer.padId },
  });
  return params;
}
const baseParams = await saveBase();
const baseBytes = await Deno.readFile(`${baseDir}/model.safetensors`);

const { files: corpus } = await writeEmbeddedCorpus(`${root}/data`);
const COMMON = [
  "--init",
  baseDir,
  "--steps",
  "4",
  "--batch-size",
  "2",
  "--seq-len",
  "32",
  "--lora-rank",
  "3",
  "--lora-alpha",
  "6",
  "--lora-targets",
  "q,v,o",
  "--lora-targets",
  "up,down",
  "--lora-dropout",
  "0.1",
  "--log-every",
  "1",
  "--save-every",
  "2",
  "--lr",
  "5e-3",
  "--data",
  corpus.sft,
  "--eval-data",
  corpus.sftEval,
];

async function lora(
  argv: string[],
  interruptAtStep?: number,
): Promise<{ status: number; lines: string[] }> {
  const lines: string[] = [];
  const args = await parseCommandArgs(loraCommand, argv);
  const status = await runLora(args!, { gpu, print: (l) => void lines.push(l), interruptAtStep });
  return { status, lines };
}

/** The 4-step run into `${root}/a` that later tests read (run once, by whichever test comes first). */
let straightRun: Promise<{ status: number; lines: string[] }> | undefined;
function trainedAdapter(): Promise<{ status: number; lines: string[] }> {
  straightRun ??= lora([...COMMON, "--out", `${root}/a`]);
  return straightRun;
}

Deno.test({
  name:
    "lora: a run writes a PEFT adapter, trains only it, and resumes exactly after Ctrl-C (dropout on)",
  ...GPU_TEST,
  fn: async () => {
    const straight = await trainedAdapter();
    assertEquals(straight.status, 0);
    const said = straight.lines.join("\n");
    assertStringIncludes(said, "LoRA r 3, alpha 6 on q,v,o,up,down");
    assertStringIncludes(said, "parameters trained");
    assertStringIncludes(said, "AdamW state");
    for (
      const f of [
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
        "tokenizer.json",
        "metrics.jsonl",
        "loss.svg",
      ]
    ) {
      await Deno.stat(`${root}/a/${f}`);
    }
    const cfg = JSON.parse(await Deno.readTextFile(`${root}/a/adapter_config.json`));
    assertEquals(cfg.peft_type, "LORA");
    assertEquals(cfg.r, 3);
    assertEquals(cfg.lora_alpha, 6);
    assertEquals(cfg.target_modules, ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]);
    assertEquals(cfg.base_model_name_or_path, baseDir);
    assertEquals(cfg.lora_dropout, 0.1);
    // The base is frozen: its files are untouched.
    assertEquals(await Deno.readFile(`${baseDir}/model.safetensors`), baseBytes);
    const adapter = await loadAdapter(`${root}/a`, config);
    assertEquals(adapter.lora.targets, ["q", "v", "o", "up", "down"]);
    // B starts at zero and moved; the loss fell.
    const bNorm = [...adapter.tensors].filter(([n]) => n.includes("lora_B"))
      .reduce((a, [, t]) => a + t.reduce((x, v) => x + v * v, 0), 0);
    assert(bNorm > 0, "lora_B did not move");

    // Interrupted at step 2 (saved there), then resumed to 4: the same adapter, bit for bit.
    const cut = await lora([...COMMON, "--out", `${root}/b`], 2);
    assertEquals(cut.status, 130);
    assertStringIncludes(cut.lines.join("\n"), "deno task lora --out");
    const resumed = await lora([...COMMON, "--out", `${root}/b`, "--resume"]);
    assertEquals(resumed.status, 0);
    assertStringIncludes(resumed.lines.join("\n"), "resuming at step 2 of 4");
    assertEquals(
      await Deno.readFile(`${root}/b/adapter_model.safetensors`),
      await Deno.readFile(`${root}/a/adapter_model.safetensors`),
    );
    assertEquals(
      await Deno.readFile(`${root}/b/optimizer.safetensors`),
      await Deno.readFile(`${root}/a/optimizer.safetensors`),
    );
    const lossesOf = async (d: string) =>
      (await readMetrics(`${d}/metrics.jsonl`)).filter((r) => r.split === "train").map((r) =>
        r.loss
      );
    assertEquals(await lossesOf(`${root}/b`), await lossesOf(`${root}/a`));

    // A resume that changes the adapter is refused.
    let err: unknown;
    await lora([...COMMON.map((a) => (a === "3" ? "5" : a)), "--out", `${root}/b`, "--resume"])
      .catch((e) => (err = e));
    assert(err instanceof UserError && err.message.includes("--lora-rank"), `${err}`);
  },
});

Deno.test({
  name:
    "lora merge equals --adapter: generate and serve (folded on load), eval (unmerged on the GPU)",
  ...GPU_TEST,
  fn: async () => {
    assertEquals((await trainedAdapter()).status, 0);
    const adapterDir = `${root}/a`;
    const merged = `${root}/merged`;
    const margs = await parseCommandArgs(loraMergeCommand, [
      "--model",
      baseDir,
      "--adapter",
      adapterDir,
      "--out",
      merged,
    ]);
    assertEquals(await loraMergeCommand.run(margs!), 0);
    const ckpt = await loadCheckpoint(merged);
    const adapter = await loadAdapter(adapterDir, config);
    const want = mergeLora(baseParams, loraLayout(config, adapter.lora), adapter.tensors);
    for (const [name, t] of want) assertEquals(ckpt.params.get(name), t, name);
    // Untouched projections are the base's.
    assertEquals(
      ckpt.params.get("model.layers.0.self_attn.k_proj.weight"),
      baseParams.get("model.layers.0.self_attn.k_proj.weight"),
    );

    const gen = async (argv: string[]) => {
      let out = "";
      const a = await parseCommandArgs(generateCommand, [
        ...argv,
        "--json",
        "--prompt",
        "Medemo",
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
      ]);
      await runGenerate(a!, { gpu, write: (t) => void (out += t), note: () => {} });
      return JSON.parse(out).ids as number[];
    };
    const viaAdapter = await gen(["--model", baseDir, "--adapter", adapterDir]);
    assertEquals(viaAdapter, await gen(["--model", merged]));
    assert(viaAdapter.length > 0, "nothing generated");

    // serve --adapter answers as generate --adapter does.
    const stop = new AbortController();
    const logs: string[] = [];
    let port = 0;
    const serving = runServe(
      (await parseCommandArgs(serveCommand, [
        "--model",
        baseDir,
        "--adapter",
        adapterDir,
        "--port",
        "0",
      ]))!,
      { gpu, log: (l) => void logs.push(l), signal: stop.signal, onListen: (a) => (port = a.port) },
    );
    try {
      for (let i = 0; i < 600 && port === 0; i++) await new Promise((r) => setTimeout(r, 100));
      assert(port !== 0, "the server did not listen");
      assertStringIncludes(logs.join("\n"), `+ adapter ${adapterDir}`);
      const res = await fetch(`http://127.0.0.1:${port}/v1/completions`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ model: "base", prompt: "Medemo", max_tokens: 12, temperature: 0 }),
      });
      const body = await res.json();
      const served = body.choices[0].text as string;
      const want = tokenizer.decode(
        viaAdapter.filter((id) => id !== tokenizer.eosId),
        { skipSpecialTokens: true },
      );
      assertEquals(served, want);
    } finally {
      stop.abort();
      await serving;
    }

    const evalLoss = async (argv: string[]) => {
      const lines: string[] = [];
      const orig = console.log;
      console.log = (l: string) => void lines.push(l);
      try {
        const a = await parseCommandArgs(evalCommand, [
          ...argv,
          "--data",
          corpus.sftEval,
          "--json",
          "--seq-len",
          "32",
        ]);
        await evalCommand.run(a!);
      } finally {
        console.log = orig;
      }
      return JSON.parse(lines[0]).loss as number;
    };
    const unmerged = await evalLoss(["--model", baseDir, "--adapter", adapterDir]);
    const folded = await evalLoss(["--model", merged]);
    const base = await evalLoss(["--model", baseDir]);
    // x W^T + s (x A^T) B^T against x (W + s B A)^T in f32: ~1e-7 relative per
    // projection, so the mean losses agree to ~1e-6; 1e-5 relative leaves 10x.
    // The adapter itself moves the loss by far more (checked against the base).
    assert(Math.abs(unmerged - folded) < 1e-5 * folded, `unmerged ${unmerged} vs merged ${folded}`);
    assert(Math.abs(unmerged - base) > 1e-3, `the adapter changed nothing: ${unmerged} vs ${base}`);
  },
});

Deno.test({
  name: "lora --text: plain text, every token (the pretrain objective) on a frozen base",
  ...GPU_TEST,
  fn: async () => {
    const out = `${root}/text`;
    const run = await lora([
      "--init",
      baseDir,
      "--text",
      "--steps",
      "2",
      "--batch-size",
      "2",
      "--seq-len",
      "32",
      "--data",
      corpus.pretrain,
      "--eval-data",
      corpus.pretrainEval,
      "--out",
      out,
    ]);
    assertEquals(run.status, 0);
    assertStringIncludes(run.lines.join("\n"), "lora (pretrain)");
    const state = JSON.parse(await Deno.readTextFile(`${out}/trainer_state.json`));
    assertEquals(state.run.kind, "pretrain");
    assertEquals(state.run.lora.config.targets, ["q", "v"]);
    // A resume as SFT is refused: the run's objective is part of it.
    let err: unknown;
    await lora(["--init", baseDir, "--out", out, "--resume", "--steps", "3"]).catch((
      e,
    ) => (err = e));
    assert(err instanceof UserError && err.message.includes("not a LoRA sft run"), `${err}`);
  },
});

Deno.test("lora: bad adapters are refused with the file and the reason", async () => {
  const layout = loraLayout(config, { rank: 2, alpha: 2, dropout: 0, targets: ["q"] });
  const dir = `${root}/bad`;
  await saveAdapter(dir, config, {
    lora: layout.config,
    tensors: initLora(layout, 1),
    baseModel: baseDir,
  });
  const refusedWith = async (edit: (c: Record<string, unknown>) => void, includes: string) => {
    const path = `${dir}/adapter_config.json`;
    const original = await Deno.readTextFile(path);
    const c = JSON.parse(original);
    edit(c);
    await Deno.writeTextFile(path, JSON.stringify(c));
    let err: unknown;
    await loadAdapter(dir, config).catch((e) => (err = e));
    await Deno.writeTextFile(path, original);
    assert(err instanceof UserError, `${includes}: expected a UserError, got ${err}`);
    assertStringIncludes((err as Error).message, includes);
  };
  await refusedWith((c) => (c.use_dora = true), "use_dora");
  await refusedWith((c) => (c.bias = "all"), "bias");
  await refusedWith((c) => (c.rank_pattern = { q_proj: 4 }), "rank_pattern");
  await refusedWith((c) => (c.r = 4), "has shape [2, 32], expected [4, 32]");
  // A model of another width.
  let err: unknown;
  await loadAdapter(dir, { ...config, hidden_size: 48 }).catch((e) => (err = e));
  assert(err instanceof UserError && err.message.includes("expected"), `${err}`);
  err = undefined;
  await loadAdapter(`${root}/nowhere`, config).catch((e) => (err = e));
  assert(
    err instanceof UserError && err.message.includes("adapter_config.json: missing"),
    `${err}`,
  );
});

// ---------------------------------------------------------------------------
// Optional: Python peft loads ours, and we load peft's.

const { python: PYTHON, missing: peftMissing } = findPython(["torch", "transformers", "peft"]);
if (peftMissing) console.log(`lora_cli_test: skipping the PEFT cross-check: ${peftMissing}`);

const PEFT_SCRIPT = `
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel, LoraConfig, get_peft_model
base_dir, ours_dir, made_dir, ids = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
x = torch.tensor([ids])
model = PeftModel.from_pretrained(
    AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32), ours_dir)
model.eval()
with torch.no_grad():
    ours = model(input_ids=x).logits[0]
torch.manual_seed(0)
cfg = LoraConfig(r=3, lora_alpha=7, use_rslora=True, init_lora_weights=False, lora_dropout=0.0,
                 target_modules=["k_proj", "gate_proj", "down_proj"], task_type="CAUSAL_LM")
made = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32), cfg)
made.eval()
with torch.no_grad():
    theirs = made(input_ids=x).logits[0]
made.save_pretrained(made_dir)
print(json.dumps({"ours": ours.reshape(-1).tolist(), "made": theirs.reshape(-1).tolist()}))
`;

Deno.test({
  name: "lora: peft loads our adapter with the reference's logits, and we load one peft made",
  ignore: peftMissing !== undefined,
  fn: async () => {
    assertEquals((await trainedAdapter()).status, 0);
    const ids = [tokenizer.bosId, 5, 9, 300, 17, 2, 40, 8, 77];
    const made = `${root}/peft-made`;
    const out = await new Deno.Command(PYTHON!, {
      args: ["-c", PEFT_SCRIPT, baseDir, `${root}/a`, made, JSON.stringify(ids)],
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert(out.success, new TextDecoder().decode(out.stderr));
    const result = JSON.parse(new TextDecoder().decode(out.stdout));
    const adapter = await loadAdapter(`${root}/a`, config);
    const ref = referenceLogits(
      config,
      mergeLora(baseParams, loraLayout(config, adapter.lora), adapter.tensors),
      ids,
    );
    // As in checkpoint_test: PyTorch in float32 against the float64 reference,
    // logits O(0.1-1): 1e-5 is ~100x the rounding and far below what a wrong
    // slice, scale or transposed A/B would change (O(0.01) or more).
    assertClose(result.ours, ref, { atol: 1e-5, rtol: 1e-5 }, "peft on our adapter");
    // The adapter peft made (rsLoRA, other targets, random B): we read it and
    // fold it in the same way.
    const theirs = await loadAdapter(made, config);
    assertEquals(theirs.lora.targets, ["k", "gate", "down"]);
    assertEquals(theirs.lora.rsLora, true);
    const refMade = referenceLogits(
      config,
      mergeLora(baseParams, loraLayout(config, theirs.lora), theirs.tensors),
      ids,
    );
    assertClose(result.made, refMade, { atol: 1e-5, rtol: 1e-5 }, "our load of peft's adapter");
    // And the merge really moved them: not the base's logits.
    const baseRef = referenceLogits(config, baseParams, ids);
    let diff = 0;
    for (let i = 0; i < baseRef.length; i++) {
      diff = Math.max(diff, Math.abs(baseRef[i] - refMade[i]));
    }
    assert(diff > 1e-3, `peft's adapter changes nothing (${diff})`);
  },
});

Deno.test({
  name: "lora cli: cleanup",
  ...GPU_TEST,
  fn: async () => {
    gpu.destroy();
    await Deno.remove(root, { recursive: true });
  },
});
