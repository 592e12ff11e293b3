/**
 * Inference on the GPU with a KV cache: the prompt in one pass (prefill),
 * then one token per step that reuses the cached keys and values.
 *
 * Per layer the cache holds k (after QK-norm and RoPE) and v for positions
 * 0 .. capacity-1, `[capacity, nKV, hd]` each: 8 L capacity nKV hd bytes
 * (minimind2-small: 8 KiB per position). Everything is prepared once:
 *
 * - prefill dispatches per length bucket (powers of two from 16 up to the
 *   capacity, built on first use): a prompt of n tokens runs padded to its
 *   bucket Tb. Padding sits after the prompt, so under causal attention no
 *   prompt position sees it; its keys land in cache rows >= n, which decoding
 *   overwrites (step p writes row p before it reads rows 0..p). Attention is
 *   the flash-style training kernel reading the cache (`kvStride` = capacity).
 *   Only the last prompt row's final-norm output is copied out and put
 *   through the head.
 * - one decode dispatch list for a single token: the token id and its
 *   position go into two tiny storage buffers before each submit
 *   (`kvCacheAppend` and `attentionDecode` read the position there), so no
 *   step creates anything.
 *
 * Each step reads back only the logits of its one position `[V]`.
 * Per layer (rows N = Tb or 1):
 *
 *   h1 = rmsnorm(x) w_in;  q, k, v = h1 Wq^T, h1 Wk^T, h1 Wv^T  (QK-norm: per-head rmsnorm of q, k)
 *   q, k = rope(q), rope(k) at positions pos..;  cache[pos..] = k, v
 *   a = attention(q, cache);  m = x + a Wo^T;  h2 = rmsnorm(m) w_post
 *   x' = m + (silu(h2 Wg^T) * h2 Wu^T) Wd^T
 *
 * @module
 */
import { type Binding, type Dispatch, type Gpu, recordDispatches } from "../kernels/runtime.ts";
import { matmulXWt } from "../kernels/matmul.ts";
import { matvecXWt } from "../kernels/matvec.ts";
import { attentionForward } from "../kernels/attention.ts";
import { attentionDecode, greedyAdvance, kvCacheAppend } from "../kernels/attention_decode.ts";
import { embeddingForward } from "../kernels/embedding.ts";
import { addRmsnormForward, rmsnormForward } from "../kernels/rmsnorm.ts";
import { swigluForward } from "../kernels/swiglu.ts";
import { headDim, type ModelConfig } from "./config.ts";
import { parameterSpecs } from "./params.ts";
import { sampleToken, type SamplingOptions } from "./sampling.ts";
import { Rng } from "../util/random.ts";
import { UserError } from "../util/errors.ts";

/** Options of `InferenceModel.create`. */
export interface InferenceModelOptions {
  /**
   * Positions the KV cache holds (prompt + generated tokens); default and
   * maximum `max_position_embeddings`.
   */
  capacity?: number;
  /** Smallest prefill bucket (default 16); buckets double up to the capacity. */
  minBucket?: number;
}

/** The smallest prefill bucket by default. */
export const MIN_PREFILL_BUCKET = 16;

/** Prefill length buckets: minBucket, 2 minBucket, ... and finally the capacity itself. */
export function prefillBuckets(capacity: number, minBucket = MIN_PREFILL_BUCKET): number[] {
  const out: number[] = [];
  for (let b = minBucket; b < capacity; b *= 2) out.push(b);
  out.push(capacity);
  return out;
}

/** The activation buffers, sized for the largest prefill bucket; decode uses row 0. */
interface Scratch {
  ids: GPUBuffer; // [Tmax] u32
  pos: GPUBuffer; // [1] u32: position of row 0
  x: GPUBuffer; // [Tmax, H] residual stream entering a layer
  xMid: GPUBuffer; // [Tmax, H] residual stream after attention
  h: GPUBuffer; // [Tmax, H] normed input of a projection
  rstd: GPUBuffer; // [Tmax] (also QK-norm: [Tmax * nH])
  qProj?: GPUBuffer; // [Tmax, nH, hd] before QK-norm
  kProj?: GPUBuffer; // [Tmax, nKV, hd] before QK-norm
  q: GPUBuffer; // [Tmax, nH, hd]
  k: GPUBuffer; // [Tmax, nKV, hd] new keys before RoPE
  v: GPUBuffer; // [Tmax, nKV, hd]
  attn: GPUBuffer; // [Tmax, nH, hd]
  lse: GPUBuffer; // [nH, Tmax]
  gate: GPUBuffer; // [Tmax, I]
  up: GPUBuffer; // [Tmax, I]
  act: GPUBuffer; // [Tmax, I]
  xFinal: GPUBuffer; // [Tmax, H] final norm output (prefill)
  xLast: GPUBuffer; // [1, H] final norm output of the position the head reads
  logits: GPUBuffer; // [V]
  tokens: GPUBuffer; // [capacity] u32: greedy tokens chosen on the GPU, by position
}

/**
 * A model on the GPU for generation (batch 1) with its KV cache.
 *
 * @example
 * ```ts ignore
 * const model = await InferenceModel.create(gpu, config, params, { capacity: 256 });
 * let logits = await model.prefill([bos, ...promptIds]);
 * const next = argmax(logits);
 * logits = await model.decode(next);
 * model.destroy();
 * ```
 */
export class InferenceModel {
  /** The model's shape. */
  readonly config: ModelConfig;
  /** Positions the cache holds. */
  readonly capacity: number;
  readonly #buckets: number[];
  #gpu: Gpu;
  #owned: GPUBuffer[] = [];
  #params = new Map<string, GPUBuffer>();
  #cacheK: GPUBuffer[] = [];
  #cacheV: GPUBuffer[] = [];
  #s!: Scratch;
  #prefill = new Map<number, Promise<Dispatch[]>>();
  #decode: Dispatch[] = [];
  #head!: Dispatch;
  #greedy!: Dispatch;
  #length = 0;

  private constructor(gpu: Gpu, config: ModelConfig, capacity: number, minBucket: number) {
    this.#gpu = gpu;
    this.config = { ...config };
    this.capacity = capacity;
    this.#buckets = prefillBuckets(capacity, minBucket);
  }

  /**
   * Uploads `params` (every tensor of `parameterSpecs(config)`), allocates the
   * cache and the activations and prepares the decode dispatches.
   */
  static async create(
    gpu: Gpu,
    config: ModelConfig,
    params: Map<string, Float32Array>,
    opts: InferenceModelOptions = {},
  ): Promise<InferenceModel> {
    const maxPos = config.max_position_embeddings;
    const capacity = opts.capacity ?? maxPos;
    if (!Number.isInteger(capacity) || capacity < 1 || capacity > maxPos) {
      throw new UserError(
        `KV cache capacity must be a whole number in [1, max_position_embeddings = ${maxPos}], got ${capacity}`,
      );
    }
    const minBucket = Math.min(opts.minBucket ?? MIN_PREFILL_BUCKET, capacity);
    const model = new InferenceModel(gpu, config, capacity, minBucket);
    try {
      model.#allocate(params);
      await model.#buildDecode();
    } catch (e) {
      model.destroy();
      throw e;
    }
    return model;
  }

  /** Tokens now in the cache (the position the next decoded token takes). */
  get length(): number {
    return this.#length;
  }

  #buffer(data: Float32Array | number, label: string): GPUBuffer {
    const b = this.#gpu.createBuffer(data, label);
    this.#owned.push(b);
    return b;
  }

  #allocate(params: Map<string, Float32Array>): void {
    const c = this.config;
    for (const s of parameterSpecs(c)) {
      const t = params.get(s.name);
      if (!t) throw new UserError(`parameters: missing tensor ${s.name}`);
      if (t.length !== s.size) {
        throw new UserError(
          `parameters: tensor ${s.name} has ${t.length} values, expected ${s.size} ([${
            s.shape.join(", ")
          }])`,
        );
      }
      this.#params.set(s.name, this.#buffer(t, s.name));
    }
    const H = c.hidden_size;
    const hd = headDim(c);
    const nH = c.num_attention_heads;
    const nKV = c.num_key_value_heads;
    const I = c.intermediate_size;
    const T = this.#buckets[this.#buckets.length - 1];
    const cap = this.capacity;
    for (let l = 0; l < c.num_hidden_layers; l++) {
      this.#cacheK.push(this.#buffer(cap * nKV * hd * 4, `layer ${l} k cache [${cap}, nKV, hd]`));
      this.#cacheV.push(this.#buffer(cap * nKV * hd * 4, `layer ${l} v cache [${cap}, nKV, hd]`));
    }
    const a = (n: number, what: string) => this.#buffer(n * 4, what);
    this.#s = {
      ids: a(T, "ids [T]"),
      pos: a(1, "position of row 0"),
      x: a(T * H, "x [T, H]"),
      xMid: a(T * H, "x mid [T, H]"),
      h: a(T * H, "normed [T, H]"),
      rstd: a(T * Math.max(nH, 1), "rstd [T * nH]"),
      qProj: c.qk_norm ? a(T * nH * hd, "q proj [T, nH, hd]") : undefined,
      kProj: c.qk_norm ? a(T * nKV * hd, "k proj [T, nKV, hd]") : undefined,
      q: a(T * nH * hd, "q [T, nH, hd]"),
      k: a(T * nKV * hd, "k new [T, nKV, hd]"),
      v: a(T * nKV * hd, "v new [T, nKV, hd]"),
      attn: a(T * nH * hd, "attention out [T, nH, hd]"),
      lse: a(nH * T, "attention lse [nH, T]"),
      gate: a(T * I, "gate [T, I]"),
      up: a(T * I, "up [T, I]"),
      act: a(T * I, "act [T, I]"),
      xFinal: a(T * H, "final norm out [T, H]"),
      xLast: a(H, "last row final norm out [H]"),
      logits: a(c.vocab_size, "logits [V]"),
      tokens: a(cap, "greedy tokens [capacity]"),
    };
  }

  /**
   * The forward of N rows starting at the position in `pos`, up to the final
   * norm (into `xFinal` for prefill, `xLast` for a decode step).
   */
  async #forward(N: number, prefill: boolean): Promise<Dispatch[]> {
    const gpu = this.#gpu;
    const c = this.config;
    const s = this.#s;
    const H = c.hidden_size;
    const hd = headDim(c);
    const nH = c.num_attention_heads;
    const nKV = c.num_key_value_heads;
    const qDim = nH * hd;
    const kvDim = nKV * hd;
    const I = c.intermediate_size;
    const L = c.num_hidden_layers;
    const eps = c.rms_norm_eps;
    const P = (name: string) => this.#params.get(name)!;
    const lp = (l: number, name: string) => P(`model.layers.${l}.${name}`);
    const rows = (buffer: GPUBuffer, width: number): Binding => ({
      buffer,
      offset: 0,
      size: N * width * 4,
    });
    // One row (decode) is a pass over the weights: the matrix-vector kernel.
    const linear = (x: GPUBuffer, w: GPUBuffer, y: GPUBuffer, K: number, out: number) =>
      N === 1
        ? matvecXWt(gpu, { x: rows(x, K), w, y: rows(y, out), K, N: out })
        : matmulXWt(gpu, { x: rows(x, K), w, y: rows(y, out), M: N, K, N: out });

    const out: Dispatch[] = [
      await embeddingForward(gpu, {
        weight: P("model.embed_tokens.weight"),
        ids: rows(s.ids, 1),
        out: rows(s.x, H),
        N,
        H,
      }),
      await rmsnormForward(gpu, {
        x: rows(s.x, H),
        w: lp(0, "input_layernorm.weight"),
        y: rows(s.h, H),
        rstd: rows(s.rstd, 1),
        N,
        H,
        eps,
      }),
    ];
    for (let l = 0; l < L; l++) {
      const W = (name: string) => lp(l, name);
      out.push(
        await linear(s.h, W("self_attn.q_proj.weight"), s.qProj ?? s.q, H, qDim),
        await linear(s.h, W("self_attn.k_proj.weight"), s.kProj ?? s.k, H, kvDim),
        await linear(s.h, W("self_attn.v_proj.weight"), s.v, H, kvDim),
      );
      if (c.qk_norm) {
        // Per-head RMSNorm over hd: each (row, head) vector is one norm row.
        out.push(
          await rmsnormForward(gpu, {
            x: rows(s.qProj!, qDim),
            w: W("self_attn.q_norm.weight"),
            y: rows(s.q, qDim),
            rstd: rows(s.rstd, nH),
            N: N * nH,
            H: hd,
            eps,
          }),
          await rmsnormForward(gpu, {
            x: rows(s.kProj!, kvDim),
            w: W("self_attn.k_norm.weight"),
            y: rows(s.k, kvDim),
            rstd: rows(s.rstd, nKV),
            N: N * nKV,
            H: hd,
            eps,
          }),
        );
      }
      out.push(
        await kvCacheAppend(gpu, {
          q: s.q,
          k: s.k,
          v: s.v,
          cacheK: this.#cacheK[l],
          cacheV: this.#cacheV[l],
          pos: s.pos,
          Tq: N,
          nH,
          nKV,
          hd,
          capacity: this.capacity,
          theta: c.rope_theta,
        }),
        prefill
          ? await attentionForward(gpu, {
            q: s.q,
            k: this.#cacheK[l],
            v: this.#cacheV[l],
            out: s.attn,
            lse: s.lse,
            B: 1,
            T: N,
            nH,
            nKV,
            hd,
            kvStride: this.capacity,
          })
          : await attentionDecode(gpu, {
            q: s.q,
            k: this.#cacheK[l],
            v: this.#cacheV[l],
            out: s.attn,
            pos: s.pos,
            Tq: N,
            nH,
            nKV,
            hd,
            kvStride: this.capacity,
          }),
        // xMid = a Wo^T, then += x with the post-attention norm fused.
        await linear(s.attn, W("self_attn.o_proj.weight"), s.xMid, qDim, H),
        await addRmsnormForward(gpu, {
          x: rows(s.xMid, H),
          delta: rows(s.x, H),
          w: W("post_attention_layernorm.weight"),
          y: rows(s.h, H),
          rstd: rows(s.rstd, 1),
          N,
          H,
          eps,
        }),
        await linear(s.h, W("mlp.gate_proj.weight"), s.gate, H, I),
        await linear(s.h, W("mlp.up_proj.weight"), s.up, H, I),
        await swigluForward(gpu, {
          gate: rows(s.gate, I),
          up: rows(s.up, I),
          h: rows(s.act, I),
          n: N * I,
        }),
        // x' = act Wd^T (x is no longer needed: xMid holds the stream), then += xMid.
        await linear(s.act, W("mlp.down_proj.weight"), s.x, I, H),
      );
      const last = l === L - 1;
      out.push(
        await addRmsnormForward(gpu, {
          x: rows(s.x, H),
          delta: rows(s.xMid, H),
          w: last ? P("model.norm.weight") : lp(l + 1, "input_layernorm.weight"),
          y: last ? (prefill ? rows(s.xFinal, H) : s.xLast) : rows(s.h, H),
          rstd: rows(s.rstd, 1),
          N,
          H,
          eps,
        }),
      );
    }
    return out;
  }

  async #buildDecode(): Promise<void> {
    const c = this.config;
    const head = this.#params.get(
      c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight",
    )!;
    this.#head = await matvecXWt(this.#gpu, {
      x: this.#s.xLast,
      w: head,
      y: this.#s.logits,
      K: c.hidden_size,
      N: c.vocab_size,
    });
    this.#decode = await this.#forward(1, false);
    this.#greedy = await greedyAdvance(this.#gpu, {
      logits: this.#s.logits,
      ids: this.#s.ids,
      pos: this.#s.pos,
      tokens: this.#s.tokens,
      V: c.vocab_size,
      capacity: this.capacity,
    });
  }

  #prefillDispatches(bucket: number): Promise<Dispatch[]> {
    let d = this.#prefill.get(bucket);
    if (!d) {
      d = this.#forward(bucket, true);
      this.#prefill.set(bucket, d);
      d.catch(() => this.#prefill.delete(bucket));
    }
    return d;
  }

  #checkIds(ids: ArrayLike<number>): void {
    const V = this.config.vocab_size;
    for (let i = 0; i < ids.length; i++) {
      const t = ids[i];
      if (!Number.isInteger(t) || t < 0 || t >= V) {
        throw new UserError(
          `token ${t} at position ${i} is outside the model's vocabulary [0, ${V}); the tokenizer and the model's vocab_size disagree`,
        );
      }
    }
  }

  /**
   * Clears the cache and runs `ids` (positions 0 .. n-1) in one pass; returns
   * the logits `[V]` that predict position n. Afterwards `length` = n.
   */
  async prefill(ids: ArrayLike<number>): Promise<Float32Array> {
    const n = ids.length;
    if (n < 1) throw new UserError("prefill needs at least one token");
    if (n > this.capacity) {
      throw new UserError(
        `the prompt has ${n} tokens, more than the KV cache holds (${this.capacity} positions)`,
      );
    }
    this.#checkIds(ids);
    const bucket = this.#buckets.find((b) => b >= n)!;
    const dispatches = await this.#prefillDispatches(bucket);
    const gpu = this.#gpu;
    const s = this.#s;
    const padded = new Uint32Array(bucket);
    padded.set(Array.from(ids));
    gpu.write(s.ids, padded);
    gpu.write(s.pos, new Uint32Array([0]));
    const H = this.config.hidden_size;
    gpu.submit((enc) => {
      let pass = enc.beginComputePass();
      recordDispatches(gpu, pass, dispatches);
      pass.end();
      enc.copyBufferToBuffer(s.xFinal, (n - 1) * H * 4, s.xLast, 0, H * 4);
      pass = enc.beginComputePass();
      recordDispatches(gpu, pass, this.#head);
      pass.end();
    });
    this.#length = n;
    return await gpu.readF32(s.logits, 0, this.config.vocab_size);
  }

  /**
   * Appends one token at position `length` and returns the logits `[V]` that
   * predict the next position.
   */
  async decode(id: number): Promise<Float32Array> {
    if (this.#length >= this.capacity) {
      throw new UserError(`the KV cache is full (${this.capacity} positions)`);
    }
    this.#checkIds([id]);
    const gpu = this.#gpu;
    const s = this.#s;
    gpu.write(s.ids, new Uint32Array([id]));
    gpu.write(s.pos, new Uint32Array([this.#length]));
    gpu.submit((enc) => {
      const pass = enc.beginComputePass();
      recordDispatches(gpu, pass, this.#decode);
      recordDispatches(gpu, pass, this.#head);
      pass.end();
    });
    this.#length++;
    return await gpu.readF32(s.logits, 0, this.config.vocab_size);
  }

  /**
   * Greedy decoding of `steps` tokens in one submit, with the argmax on the
   * GPU: `first` goes in at position `length`, each step's argmax is the
   * next step's input, and the `steps` chosen tokens come back together
   * (one readback instead of one per token). The last returned token is not
   * yet in the cache: `length` grows by `steps`, as after `steps` `decode` calls.
   */
  async decodeGreedy(first: number, steps: number): Promise<number[]> {
    if (!Number.isInteger(steps) || steps < 1) {
      throw new RangeError(`decodeGreedy: steps ${steps} must be a positive integer`);
    }
    const p0 = this.#length;
    if (p0 + steps > this.capacity) {
      throw new UserError(
        `the KV cache holds ${this.capacity} positions; ${steps} steps from position ${p0} do not fit`,
      );
    }
    this.#checkIds([first]);
    const gpu = this.#gpu;
    const s = this.#s;
    gpu.write(s.ids, new Uint32Array([first]));
    gpu.write(s.pos, new Uint32Array([p0]));
    gpu.submit((enc) => {
      const pass = enc.beginComputePass();
      for (let i = 0; i < steps; i++) {
        recordDispatches(gpu, pass, this.#decode);
        recordDispatches(gpu, pass, this.#head);
        recordDispatches(gpu, pass, this.#greedy);
      }
      pass.end();
    });
    // Step i (at position p0 + i) writes tokens[p0 + i + 1]; the last one may
    // be at index capacity, which the kernel drops: read it from ids[0].
    const inside = Math.min(steps, this.capacity - 1 - p0);
    const out = inside > 0 ? Array.from(await gpu.readU32(s.tokens, p0 + 1, inside)) : [];
    if (out.length < steps) out.push((await gpu.readU32(s.ids, 0, 1))[0]);
    this.#length = p0 + steps;
    return out;
  }

  /** Releases every buffer the model allocated. */
  destroy(): void {
    for (const b of this.#owned) b.destroy();
    this.#owned = [];
  }
}

/** Options of `generate`. */
export interface GenerateOptions {
  /** Most tokens to generate. */
  maxNewTokens: number;
  sampling: SamplingOptions;
  /** The random draws (unused at temperature 0). */
  rng?: Rng;
  /** Generation ends after any of these ids (it is included in `ids`). */
  stopIds?: number[];
  /** Called with each new id as soon as it is chosen (for streaming). */
  onToken?: (id: number) => void | Promise<void>;
  /**
   * Greedy decoding without a repetition penalty chooses tokens on the GPU,
   * `gpuGreedySteps` per submit (default 16; 0 = one readback of the logits
   * per token, as sampling does). Same tokens either way.
   */
  gpuGreedySteps?: number;
}

/** What `generate` returns. */
export interface GenerateResult {
  /** The generated ids (the stop id included when one ended generation). */
  ids: number[];
  /**
   * "stop": a stop id came; "length": maxNewTokens reached; "capacity": prompt
   * and generated tokens fill the cache.
   */
  finish: "stop" | "length" | "capacity";
  /** Prompt tokens and the prefill's wall time. */
  promptTokens: number;
  prefillMs: number;
  /** Wall time of the decode steps (every token after the first). */
  decodeMs: number;
  /** Decode steps per second (0 when no step ran). */
  tokensPerSecond: number;
}

/**
 * Generates from `prompt` (ids; the model is prefilled with them): the first
 * token from the prefill's logits, each next one from a decode step. The
 * repetition penalty sees the prompt and everything generated. Stops at a
 * stop id, after `maxNewTokens`, or when the cache is full.
 */
export async function generate(
  model: InferenceModel,
  prompt: ArrayLike<number>,
  opts: GenerateOptions,
): Promise<GenerateResult> {
  const rng = opts.rng ?? new Rng(0);
  const stop = new Set(opts.stopIds ?? []);
  const context = Array.from(prompt);
  const ids: number[] = [];
  const t0 = performance.now();
  let logits = await model.prefill(prompt);
  const prefillMs = performance.now() - t0;
  let finish: GenerateResult["finish"] = "length";
  let steps = 0;
  const t1 = performance.now();
  const o = opts.sampling;
  const chunk = o.temperature === 0 && o.repetitionPenalty === 1
    ? Math.max(0, Math.floor(opts.gpuGreedySteps ?? 16))
    : 0;
  // Returns true when generation must end after `id`.
  const accept = async (id: number): Promise<boolean> => {
    ids.push(id);
    context.push(id);
    await opts.onToken?.(id);
    if (stop.has(id)) {
      finish = "stop";
      return true;
    }
    if (ids.length >= opts.maxNewTokens) return true;
    // The sequence (prompt + generated) may fill the cache but not pass it.
    if (prompt.length + ids.length >= model.capacity) {
      finish = "capacity";
      return true;
    }
    return false;
  };
  let next = sampleToken(logits, o, rng, context);
  while (!(await accept(next))) {
    if (chunk > 0) {
      // Several greedy steps per submit; tokens after a stop are discarded.
      // The first chunks are short so that streaming starts promptly.
      const n = Math.min(
        Math.min(chunk, 2 ** (steps === 0 ? 1 : Math.ceil(Math.log2(steps + 1)))),
        opts.maxNewTokens - ids.length,
        model.capacity - 1 - model.length,
      );
      const got = await model.decodeGreedy(next, n);
      steps += n;
      for (let i = 0; i < got.length - 1; i++) {
        if (await accept(got[i])) {
          return result(performance.now() - t1);
        }
      }
      next = got[got.length - 1];
      continue;
    }
    logits = await model.decode(next);
    steps++;
    next = sampleToken(logits, o, rng, context);
  }
  return result(performance.now() - t1);

  function result(elapsedMs: number): GenerateResult {
    const decodeMs = steps > 0 ? elapsedMs : 0;
    return {
      ids,
      finish,
      promptTokens: prompt.length,
      prefillMs,
      decodeMs,
      tokensPerSecond: steps > 0 ? steps / (decodeMs / 1000) : 0,
    };
  }
}
