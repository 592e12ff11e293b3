/**
 * Sampling rules (`model/sampling.ts`): greedy = argmax without a draw, top-k
 * and top-p keep exactly the tokens they should, the HF repetition penalty,
 * seeded reproducibility and the empirical distribution of the draws.
 */
import { assert, assertClose, assertEquals, assertStringIncludes, assertThrows } from "./assert.ts";
import {
  applyRepetitionPenalty,
  argmax,
  checkSamplingOptions,
  GREEDY,
  sampleToken,
  samplingDistribution,
  type SamplingOptions,
} from "../model/sampling.ts";
import { Rng } from "../util/random.ts";
import { samplingFrom } from "../cli/generate.ts";
import { resolveSampling, samplingSource } from "../infer/session.ts";
import { UserError } from "../util/errors.ts";

const opts = (o: Partial<SamplingOptions>): SamplingOptions => ({
  temperature: 1,
  topK: 0,
  topP: 1,
  repetitionPenalty: 1,
  ...o,
});

/** Logits whose softmax is exactly-ish `probs` (log p; softmax renormalizes). */
const logitsOf = (probs: number[]) => Float32Array.from(probs, Math.log);

Deno.test("sampling: temperature 0 is the argmax, lowest id on ties, no random draw", () => {
  const logits = Float32Array.from([0.5, 3, -1, 3, 2.9]);
  const rng = new Rng(7);
  const before = JSON.stringify(rng.state());
  for (let i = 0; i < 5; i++) assertEquals(sampleToken(logits, GREEDY, rng), 1);
  assertEquals(JSON.stringify(rng.state()), before, "greedy must not consume random numbers");
  assertEquals(argmax([-Infinity, NaN, -5]), 2);
  // Top-k / top-p do not change the argmax.
  assertEquals(sampleToken(logits, { ...GREEDY, topK: 2, topP: 0.1 }, rng), 1);
});

Deno.test("sampling: repetition penalty as in HF (divide positive, multiply negative, once per token)", () => {
  const z = Float32Array.from([2, -2, 1, 0.5]);
  applyRepetitionPenalty(z, [0, 1, 1, 0, 3], 2);
  assertEquals(Array.from(z), [1, -4, 1, 0.25]);
  // Greedy with a penalty: token 0 (logit 3, seen) drops below token 2 (logit 2).
  const logits = Float32Array.from([3, -1, 2]);
  assertEquals(sampleToken(logits, { ...GREEDY, repetitionPenalty: 2 }, new Rng(0), [0]), 2);
  assertEquals(sampleToken(logits, GREEDY, new Rng(0), [0]), 0);
});

Deno.test("sampling: top-k keeps the k highest logits, renormalized and temperature-scaled", () => {
  const logits = Float32Array.from([1, 4, 2, 4, -3, 3]);
  const d = samplingDistribution(logits, opts({ topK: 3, temperature: 0.5 }));
  // Descending logits, ties by id: 1 and 3 (4), then 5 (3).
  assertEquals(d.ids, [1, 3, 5]);
  const e = [4, 4, 3].map((z) => Math.exp(z / 0.5));
  const s = e[0] + e[1] + e[2];
  // Float64 throughout: only rounding of a few exp/divisions separates the two.
  assertClose(d.probs, e.map((x) => x / s), { atol: 1e-12, rtol: 0 });
  const rng = new Rng(1);
  for (let i = 0; i < 500; i++) {
    assert([1, 3, 5].includes(sampleToken(logits, opts({ topK: 3 }), rng)), "top-k leak");
  }
});

Deno.test("sampling: top-p keeps the shortest prefix whose mass reaches p", () => {
  const logits = logitsOf([0.05, 0.5, 0.15, 0.3]);
  const keep = (p: number) => samplingDistribution(logits, opts({ topP: p })).ids;
  assertEquals(keep(0.4), [1]); // 0.5 >= 0.4
  assertEquals(keep(0.75), [1, 3]); // 0.5 < 0.75, 0.8 >= 0.75
  assertEquals(keep(0.9), [1, 3, 2]); // 0.95 >= 0.9
  assertEquals(keep(0.99), [1, 3, 2, 0]);
  assertEquals(keep(1), [1, 3, 2, 0]);
  const d = samplingDistribution(logits, opts({ topP: 0.75 }));
  // Renormalized over the kept two: 0.5/0.8 and 0.3/0.8 (up to log/exp rounding in f32 logits).
  assertClose(d.probs, [0.625, 0.375], { atol: 1e-6, rtol: 0 });
  // Top-k first, then top-p over what top-k kept.
  assertEquals(samplingDistribution(logits, opts({ topK: 2, topP: 0.7 })).ids, [1, 3]);
  assertEquals(samplingDistribution(logits, opts({ topK: 2, topP: 0.6 })).ids, [1]);
});

Deno.test("sampling: same seed gives the same tokens; draws follow the distribution", () => {
  const rng0 = new Rng(99);
  const logits = Float32Array.from({ length: 50 }, () => rng0.normal() * 2);
  const o = opts({ temperature: 0.8, topK: 20, topP: 0.95, repetitionPenalty: 1.3 });
  const run = (seed: number) => {
    const rng = new Rng(seed);
    const ctx: number[] = [3, 4];
    for (let i = 0; i < 40; i++) ctx.push(sampleToken(logits, o, rng, ctx));
    return ctx;
  };
  assertEquals(run(5), run(5));
  assert(JSON.stringify(run(5)) !== JSON.stringify(run(6)), "different seeds, same 40 draws");

  const d = samplingDistribution(logits, o, [3, 4]);
  const n = 20000;
  const counts = new Map<number, number>();
  const rng = new Rng(11);
  for (let i = 0; i < n; i++) {
    const t = sampleToken(logits, o, rng, [3, 4]);
    counts.set(t, (counts.get(t) ?? 0) + 1);
  }
  for (const t of counts.keys()) assert(d.ids.includes(t), `token ${t} outside the kept set`);
  // Each frequency has standard deviation sqrt(p(1-p)/n) <= 0.0036; 0.02 is
  // over 5 of them, while a wrong order or normalization is off by more.
  d.ids.forEach((t, i) => {
    const f = (counts.get(t) ?? 0) / n;
    assert(Math.abs(f - d.probs[i]) < 0.02, `token ${t}: frequency ${f} vs p ${d.probs[i]}`);
  });
});

Deno.test("sampling: settings out of range are user errors naming the setting", () => {
  assertThrows(() => checkSamplingOptions(opts({ temperature: -1 })), UserError, "temperature");
  assertThrows(() => checkSamplingOptions(opts({ topK: 1.5 })), UserError, "top-k");
  assertThrows(() => checkSamplingOptions(opts({ topP: 0 })), UserError, "top-p");
  assertThrows(() => checkSamplingOptions(opts({ topP: 1.2 })), UserError, "top-p");
  assertThrows(
    () => checkSamplingOptions(opts({ repetitionPenalty: 0 })),
    UserError,
    "repetition penalty",
  );
});

Deno.test("generation_config.json: do_sample false means greedy unless --temperature is given", () => {
  const none = { values: {}, positionals: [] };
  const greedy = samplingFrom(none, { generation: { do_sample: false, temperature: 0.9 } });
  assertEquals(greedy.temperature, 0);
  const sampled = samplingFrom(none, { generation: { do_sample: true, temperature: 0.9 } });
  assertEquals(sampled.temperature, 0.9);
  const flag = samplingFrom({ values: { temperature: "0.5" }, positionals: [] }, {
    generation: { do_sample: false },
  });
  assertEquals(flag.temperature, 0.5);
});

Deno.test("generation_config.json as Transformers reads it: no do_sample (or no file) is greedy", () => {
  // Temperature and top-p without do_sample: true are not used, as in Transformers.
  const noFlag = resolveSampling({ temperature: 0.9, top_p: 0.8 });
  assertEquals(noFlag.temperature, 0);
  assertEquals(resolveSampling({}).temperature, 0);
  // do_sample: true takes the file's settings, and Transformers' defaults for the rest.
  assertEquals(resolveSampling({ do_sample: true, top_p: 0.8 }), {
    temperature: 1,
    topK: 50,
    topP: 0.8,
    repetitionPenalty: 1,
  });
  assertEquals(resolveSampling({ do_sample: true, top_k: 0, temperature: 0.7 }).topK, 0);
  // The repetition penalty applies to greedy decoding too (a logits processor there).
  assertEquals(resolveSampling({ repetition_penalty: 1.2 }).repetitionPenalty, 1.2);
  // A given temperature samples whatever the file says.
  assertEquals(resolveSampling({}, { temperature: 0.5 }).temperature, 0.5);
  assertStringIncludes(
    samplingSource({ generation: {}, source: "m.pth" }),
    "greedy: m.pth has no generation_config.json",
  );
  assertStringIncludes(
    samplingSource({ generation: { do_sample: true }, source: "out/sft" }),
    "do_sample: true",
  );
});
