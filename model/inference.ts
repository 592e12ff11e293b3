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
import {
  type Binding,
  type Dispatch,
  type Gpu,
  PassRecorder,
  releaseDispatches,
} from "../kernels/runtime.ts";
import { matmulXWt } from "../kernels/matmul.ts";
import { matvecXWt } from "../kernels/matvec.ts";
import { attentionForward } from "../kernels/attention/mod.ts";
import { attentionDecode, kvCacheAppend } from "../kernels/attention/decode.ts";
import { greedyAdvance } from "../kernels/greedy.ts";
import { headDim, type ModelConfig } from "./config.ts";
import { checkTensorSizes, parameterSpecs } from "./params.ts";
import { flattenTensors, paramLayout } from "./layout.ts";
import { bindLayout, decoderForward, type DecoderWeights, type LayerBuffers } from "./forward.ts";
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
  qkv: GPUBuffer; // [Tmax, (nH + 2 nKV) hd] fused projection
  gateUp: GPUBuffer; // [Tmax, 2I]
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
  #weights!: DecoderWeights;
  #cacheK: GPUBuffer[] = [];
  #cacheV: GPUBuffer[] = [];
  #s!: Scratch;
  #prefill = new Map<number, Promise<Dispatch[]>>();
  /** Every prefill dispatch built so far (their buffers go in `destroy`). */
  #prefillBuilt: Dispatch[] = [];
  #destroyed = false;
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
    checkTensorSizes(parameterSpecs(c), params, "parameters");
    // The training model's flat layout: q|k|v and gate|up are one matrix each.
    const layout = paramLayout(c);
    this.#weights = bindLayout(
      layout,
      this.#buffer(flattenTensors(layout, params), `parameters [${layout.floats}]`),
    );
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
      qkv: a(T * (nH + 2 * nKV) * hd, "q|k|v [T, qkv]"),
      gateUp: a(T * 2 * I, "gate|up [T, 2I]"),
      act: a(T * I, "act [T, I]"),
      xFinal: a(T * H, "final norm out [T, H]"),
      xLast: a(H, "last row final norm out [H]"),
      logits: a(c.vocab_size, "logits [V]"),
      tokens: a(cap, "greedy tokens [capacity]"),
    };
  }

  /**
   * The forward of N rows starting at the position in `pos`, up to the final
   * norm (into `xFinal` for prefill, `xLast` for a decode step). Every layer
   * reuses the one scratch set: `next` is `x` itself (x' = act Wd^T, then
   * += xMid), and `h` serves as both norms' output.
   */
  #forward(N: number, prefill: boolean): Promise<Dispatch[]> {
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
    const rows = (buffer: GPUBuffer, width: number): Binding => ({
      buffer,
      offset: 0,
      size: N * width * 4,
    });
    const layer = (l: number): LayerBuffers => ({
      x: rows(s.x, H),
      h1: rows(s.h, H),
      rstd1: rows(s.rstd, 1),
      qProj: s.qProj && rows(s.qProj, qDim),
      kProj: s.kProj && rows(s.kProj, kvDim),
      rstdQ: rows(s.rstd, nH),
      rstdK: rows(s.rstd, nKV),
      q: rows(s.q, qDim),
      k: rows(s.k, kvDim),
      v: rows(s.v, kvDim),
      attn: rows(s.attn, qDim),
      xMid: rows(s.xMid, H),
      h2: rows(s.h, H),
      rstd2: rows(s.rstd, 1),
      qkv: rows(s.qkv, qDim + 2 * kvDim),
      gateUp: rows(s.gateUp, 2 * I),
      act: rows(s.act, I),
      next: rows(s.x, H),
      nextNorm: l < L - 1 ? rows(s.h, H) : prefill ? rows(s.xFinal, H) : s.xLast,
      nextRstd: rows(s.rstd, 1),
    });
    return decoderForward(gpu, {
      config: c,
      N,
      weights: this.#weights,
      ids: rows(s.ids, 1),
      layer,
      // One row (decode) is a pass over the weights: the matrix-vector kernel.
      linear: (x, w, y, K, out) =>
        N === 1
          ? matvecXWt(gpu, { x, w, y, K, N: out })
          : matmulXWt(gpu, { x, w, y, M: N, K, N: out }),
      // RoPE on the way into the cache, then attention over the cached keys.
      attention: async (l) => [
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
      ],
    });
  }

  async #buildDecode(): Promise<void> {
    const c = this.config;
    this.#head = await matvecXWt(this.#gpu, {
      x: this.#s.xLast,
      w: this.#weights.head,
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
      d.then(
        // A bucket built after destroy() (a prompt in flight) is released at once.
        (built) => this.#destroyed ? releaseDispatches(built) : this.#prefillBuilt.push(...built),
        () => this.#prefill.delete(bucket),
      );
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
      let pass = new PassRecorder(gpu, enc);
      pass.record(dispatches);
      pass.end();
      enc.copyBufferToBuffer(s.xFinal, (n - 1) * H * 4, s.xLast, 0, H * 4);
      pass = new PassRecorder(gpu, enc);
      pass.record(this.#head);
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
      const pass = new PassRecorder(gpu, enc);
      pass.record(this.#decode);
      pass.record(this.#head);
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
      const pass = new PassRecorder(gpu, enc);
      for (let i = 0; i < steps; i++) {
        pass.record(this.#decode);
        pass.record(this.#head);
        pass.record(this.#greedy);
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

  /** Releases every buffer the model and its dispatches allocated. */
  destroy(): void {
    this.#destroyed = true;
    releaseDispatches(this.#prefillBuilt);
    releaseDispatches(this.#decode);
    for (const d of [this.#head, this.#greedy]) if (d) releaseDispatches([d]);
    for (const b of this.#owned) b.destroy();
    this.#owned = [];
  }
}
