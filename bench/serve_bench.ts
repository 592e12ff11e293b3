/**
 * `trainer serve` as a client sees it: a server started in this process on
 * 127.0.0.1 with random weights at the `tiny` (embedded tokenizer) and
 * `minimind2-small` (MiniMind's tokenizer) shapes, and streamed chat
 * completions over HTTP:
 *
 * - one client, greedy (temperature 0: argmax on the GPU, several steps per
 *   submit) and sampled (temperature 0.7, top_p 0.9: the logits read back
 *   every token); time to the first content chunk (prefill included) and
 *   decode tokens/s from the first to the last chunk;
 * - 4 clients at once (sampled): the queue serves them one after another,
 *   so the aggregate tokens/s is the single-client rate less the switches.
 *
 * Random weights give gibberish and rarely a stop token, so replies run to
 * max_tokens: the figure is the speed, not the quality.
 *
 * Run: `deno run -A bench/serve_bench.ts [--quick]`.
 */
import { Gpu } from "../kernels/runtime.ts";
import { presetConfig } from "../model/config.ts";
import { initParameters } from "../model/params.ts";
import { saveCheckpoint } from "../io/checkpoint.ts";
import { defaultTokenizer } from "../data/corpus.ts";
import { TextTokenizer } from "../data/tokenizer.ts";
import { loadGenerationModel, resolveSampling } from "../infer/session.ts";
import { ServeEngine } from "../serve/engine.ts";
import { serve } from "../serve/server.ts";

const quick = Deno.args.includes("--quick");
const MAX_TOKENS = quick ? 32 : 128;
const PROMPT = "Tell me a story about a river and a cat.";

interface Timing {
  tokens: number;
  firstMs: number;
  totalMs: number;
}

/** One streamed chat completion; times from the request to the first and last content chunk. */
async function streamOnce(base: string, body: Record<string, unknown>): Promise<Timing> {
  const t0 = performance.now();
  const res = await fetch(`${base}/v1/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({
      model: "bench",
      messages: [{ role: "user", content: PROMPT }],
      max_tokens: MAX_TOKENS,
      stream: true,
      stream_options: { include_usage: true },
      ...body,
    }),
  });
  if (!res.ok) throw new Error(`HTTP ${res.status}: ${await res.text()}`);
  let first = 0;
  let last = 0;
  let tokens = 0;
  let buf = "";
  for await (const text of res.body!.pipeThrough(new TextDecoderStream())) {
    buf += text;
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const data = buf.slice(6, end);
      buf = buf.slice(end + 2);
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      if (chunk.choices[0]?.delta?.content) {
        last = performance.now();
        if (first === 0) first = last;
      }
    }
  }
  return { tokens, firstMs: first - t0, totalMs: last - t0 };
}

const gpu = await Gpu.request();
const root = await Deno.makeTempDir({ prefix: "serve-bench-" });
const lines = [
  `adapter: ${gpu.adapterSummary.name}; max_tokens ${MAX_TOKENS}; server and client in one process`,
  "",
  "| model | mode | clients | first token (ms) | decode tokens/s per client | aggregate tokens/s |",
  "| --- | --- | --- | --- | --- | --- |",
];
try {
  for (const preset of ["tiny", "minimind2-small"]) {
    const config = presetConfig(preset);
    const tokenizer = preset === "tiny" ? defaultTokenizer() : await TextTokenizer.load(
      new URL("../../shared/fixtures/minimind-tokenizer", import.meta.url).pathname,
    );
    const dir = `${root}/${preset}`;
    await saveCheckpoint(dir, {
      config,
      params: initParameters(config, 1),
      tokenizer: {
        tokenizerJson: tokenizer.tokenizerJson,
        tokenizerConfigJson: tokenizer.tokenizerConfigJson,
      },
      special: { bos: tokenizer.bosId, eos: tokenizer.eosId, pad: tokenizer.padId },
    });
    const loaded = await loadGenerationModel(dir);
    const engine = await ServeEngine.create(gpu, loaded, {
      capacity: Math.min(512, config.max_position_embeddings),
      maxTokens: MAX_TOKENS,
      sampling: resolveSampling(loaded.ckpt.generation),
    });
    const stop = new AbortController();
    const server = serve({
      engine,
      modelName: "bench",
      log: () => {},
      hostname: "127.0.0.1",
      port: 0,
      signal: stop.signal,
    });
    const base = `http://127.0.0.1:${server.addr.port}`;
    try {
      await streamOnce(base, { temperature: 0, max_tokens: 8 }); // warm-up: pipelines, buckets
      const modes: [string, Record<string, unknown>][] = [
        ["greedy", { temperature: 0 }],
        ["sampled", { temperature: 0.7, top_p: 0.9, seed: 1 }],
      ];
      for (const [mode, body] of modes) {
        const t = await streamOnce(base, body);
        const rate = (t.tokens - 1) / ((t.totalMs - t.firstMs) / 1000);
        lines.push(
          `| ${preset} | ${mode} | 1 | ${t.firstMs.toFixed(0)} | ${rate.toFixed(1)} | ${
            rate.toFixed(1)
          } |`,
        );
      }
      const t0 = performance.now();
      const all = await Promise.all(
        [1, 2, 3, 4].map((seed) => streamOnce(base, { temperature: 0.7, top_p: 0.9, seed })),
      );
      const wall = (performance.now() - t0) / 1000;
      const total = all.reduce((s, t) => s + t.tokens, 0);
      const each = all.map((t) => (t.tokens - 1) / ((t.totalMs - t.firstMs) / 1000));
      lines.push(
        `| ${preset} | sampled | 4 | ${Math.min(...all.map((t) => t.firstMs)).toFixed(0)}-${
          Math.max(...all.map((t) => t.firstMs)).toFixed(0)
        } | ${Math.min(...each).toFixed(1)}-${Math.max(...each).toFixed(1)} | ${
          (total / wall).toFixed(1)
        } |`,
      );
    } finally {
      stop.abort();
      await server.finished;
      engine.destroy();
    }
  }
} finally {
  gpu.destroy();
  await Deno.remove(root, { recursive: true });
}
console.log(lines.join("\n"));
