/**
 * Tests of `model/config.ts`: presets, parameter counts, validation messages;
 * and the default learning rate per model shape (`train/setup.ts`).
 */
import {
  headDim,
  type ModelConfig,
  parameterCount,
  presetConfig,
  PRESETS,
  validateConfig,
} from "../model/config.ts";
import { parameterSpecs, totalParameters } from "../model/params.ts";
import { UserError } from "../util/errors.ts";
import { assert, assertEquals, assertStringIncludes, assertThrows } from "./assert.ts";
import { defaultLr, isTinyShape, TINY_LR, TRAIN_DEFAULTS } from "../train/setup.ts";

/** `f` throws a `UserError` whose message contains every one of `parts`. */
function assertUserError(f: () => unknown, parts: string[]): void {
  const err = assertThrows(f, UserError);
  for (const p of parts) assertStringIncludes(err.message, p);
}

Deno.test("presets: MiniMind's published parameter counts", () => {
  // minimind2-small: 6400*512 + 8 * (2*512*512 + 2*512*128 + 3*512*1408 + 2*512) + 512
  const small = parameterCount(presetConfig("minimind2-small"));
  assert(small.total === 25_829_888, `minimind2-small total ${small.total}`);
  assert((small.total / 1e6).toFixed(1) === "25.8", "rounds to 25.8M");
  assert(small.perLayer === 2 * 512 * 512 + 2 * 512 * 128 + 3 * 512 * 1408 + 2 * 512, "per layer");
  // minimind-3: 6400*768 + 8 * (2*768*768 + 2*768*384 + 3*768*2432 + 2*768 + 2*96) + 768
  const m3 = parameterCount(presetConfig("minimind-3"));
  assert(m3.total === 63_912_192, `minimind-3 total ${m3.total}`);
  assert((m3.total / 1e6).toFixed(1) === "63.9", "rounds to 63.9M");
  assert(headDim(PRESETS["minimind-3"]) === 96, "minimind-3 head_dim");
  for (const name of Object.keys(PRESETS)) {
    const c = presetConfig(name);
    validateConfig(c, name);
    assert(totalParameters(parameterSpecs(c)) === parameterCount(c).total, `${name}: layout`);
  }
});

Deno.test("presets: untied head counts the head once more", () => {
  const c = { ...presetConfig("minimind2-small"), tie_word_embeddings: false };
  const n = parameterCount(c);
  assert(n.head === 6400 * 512 && n.total === 25_829_888 + 6400 * 512, `untied ${n.total}`);
});

Deno.test("presetConfig: a fresh copy, unknown names list the presets", () => {
  const a = presetConfig("tiny");
  a.hidden_size = 7;
  assert(PRESETS.tiny.hidden_size === 128, "presets are not changed through a copy");
  assertUserError(() => presetConfig("huge"), ["huge", "tiny", "minimind2-small", "minimind-3"]);
});

Deno.test("validateConfig: each message names the field and the source", () => {
  const base = presetConfig("tiny");
  const bad = (patch: Record<string, unknown>) => ({ ...base, ...patch }) as ModelConfig;
  const cases: [Record<string, unknown>, string[]][] = [
    [{ hidden_size: 0 }, ["hidden_size", "positive integer", "0"]],
    [{ num_hidden_layers: 2.5 }, ["num_hidden_layers", "2.5"]],
    [{ num_attention_heads: "4" }, ["num_attention_heads", '"4"']],
    [{ num_key_value_heads: -1 }, ["num_key_value_heads"]],
    [{ intermediate_size: undefined }, ["intermediate_size"]],
    [{ vocab_size: null }, ["vocab_size", "null"]],
    [{ max_position_embeddings: 0 }, ["max_position_embeddings"]],
    [{ rope_theta: 0 }, ["rope_theta", "positive number"]],
    [{ rms_norm_eps: Infinity }, ["rms_norm_eps"]],
    [{ tie_word_embeddings: "yes" }, ["tie_word_embeddings", "true or false"]],
    [{ qk_norm: 1 }, ["qk_norm", "true or false"]],
    [{ hidden_size: 130 }, ["hidden_size (130)", "num_attention_heads (4)"]],
    [{ num_key_value_heads: 3 }, ["num_attention_heads (4)", "num_key_value_heads (3)"]],
    [{ hidden_size: 12 }, ["head_dim", "3", "even"]],
  ];
  for (const [patch, parts] of cases) {
    assertUserError(() => validateConfig(bad(patch), "cfg.json"), ["cfg.json: ", ...parts]);
  }
  validateConfig(base); // the preset itself is valid
});

Deno.test("defaultLr: the tiny shape's own rates, MiniMind's for every other model", () => {
  assertEquals(defaultLr("pretrain", PRESETS.tiny), TINY_LR.pretrain);
  assertEquals(defaultLr("sft", PRESETS.tiny), TINY_LR.sft);
  assertEquals(defaultLr("dpo", PRESETS.tiny), TRAIN_DEFAULTS.dpo.lr);
  for (const name of ["minimind2-small", "minimind-3"] as const) {
    assertEquals(defaultLr("pretrain", PRESETS[name]), TRAIN_DEFAULTS.pretrain.lr);
    assertEquals(defaultLr("sft", PRESETS[name]), TRAIN_DEFAULTS.sft.lr);
  }
  // Any change of shape (here the vocabulary of another tokenizer) is not the tiny model.
  assert(!isTinyShape({ ...PRESETS.tiny, vocab_size: 6400 }));
  assert(isTinyShape({ ...PRESETS.tiny }));
});
