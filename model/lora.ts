/**
 * Low-rank adapters (LoRA, Hu et al. 2021) on the decoder's projections. A
 * target projection `y = x W^T` (W `[out, in]`, frozen) becomes
 *
 *   y = x W^T + s (x A^T) B^T,     A `[r, in]`, B `[out, r]`, s = alpha / r
 *
 * (s = alpha / sqrt(r) with rsLoRA), so the adapted weight is
 * `W' = W + s B A`. Only A and B train. Since W' is linear in A and B, the
 * gradients follow from the dense one, `dW' = dY^T X`:
 *
 *   dA = s B^T dW',   dB = s dW' A^T
 *
 * which is how the tests check the GPU backward against the dense CPU
 * reference (`loraGradsFromDense`). On the GPU the backward never forms dW';
 * with t = x A^T (kept from the forward) and ds = s dY:
 *
 *   dt = ds B  [N, r];   dB += ds^T t;   dA += dt^T x;   dx += dt A
 *
 * Our model computes q|k|v and gate|up with one fused matmul each
 * (`model/layout.ts`), so an adapter on q owns a column slice of the fused
 * output: the forward adds its delta into those columns and the backward
 * reads its share of dY from them (`kernels/lora.ts`); every product runs on
 * the ordinary matmul kernels.
 *
 * Dropout p (training only) applies to the adapter's input, as PEFT's
 * `lora_dropout`: t = (x * m / (1 - p)) A^T with a mask m hashed from the
 * step's seed (`kernels/lora.ts`); then dA reads the dropped input and
 * dx gets (dt A) * m / (1 - p), the mask recomputed, never stored.
 *
 * Names and init follow Hugging Face PEFT, so adapters move both ways:
 * `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, A drawn
 * uniform in ±1/sqrt(in) (PEFT's kaiming-uniform with a = sqrt(5)), B zeros
 * (the adapted model starts equal to the base).
 *
 * @module
 */
import type { Binding, Dispatch, Gpu } from "../kernels/runtime.ts";
import { matmulDyTX, matmulDyW, matmulXWt } from "../kernels/matmul.ts";
import {
  columnsAddScaled,
  columnsGatherScaled,
  dropoutApply,
  dropoutState,
} from "../kernels/lora.ts";
import { headDim, type ModelConfig } from "./config.ts";
import { type FloatRange, LAYOUT_ALIGN, type TensorSlot } from "./layout.ts";
import { tensorNames } from "./params.ts";
import { Rng } from "../util/random.ts";
import { UserError } from "../util/errors.ts";

/** The projections an adapter can target, in the model's order. */
export const LORA_TARGETS = ["q", "k", "v", "o", "gate", "up", "down"] as const;

/** One projection an adapter can target. */
export type LoraTarget = typeof LORA_TARGETS[number];

/** PEFT's module name of each target (`target_modules` in `adapter_config.json`). */
export const PEFT_MODULES: Readonly<Record<LoraTarget, string>> = {
  q: "q_proj",
  k: "k_proj",
  v: "v_proj",
  o: "o_proj",
  gate: "gate_proj",
  up: "up_proj",
  down: "down_proj",
};

/** An adapter's shape and scale. */
export interface LoraConfig {
  /** Rank r of A `[r, in]` and B `[out, r]`. */
  rank: number;
  /** The delta is scaled by alpha / r (alpha / sqrt(r) with `rsLora`). */
  alpha: number;
  /** Dropout on the adapter's input while training (0: none). */
  dropout: number;
  /** The adapted projections, in `LORA_TARGETS` order, in every layer. */
  targets: LoraTarget[];
  /** rsLoRA scaling (PEFT `use_rslora`): alpha / sqrt(r). */
  rsLora?: boolean;
}

/**
 * Defaults: PEFT's (r 8, alpha 8: scale 1, which is also MiniMind's unscaled
 * `B A x`), on q and v as PEFT picks for Llama models.
 */
export const LORA_DEFAULTS: Readonly<LoraConfig> = {
  rank: 8,
  alpha: 8,
  dropout: 0,
  targets: ["q", "v"],
};

/** The delta's scale s. */
export function loraScale(c: LoraConfig): number {
  return c.rsLora ? c.alpha / Math.sqrt(c.rank) : c.alpha / c.rank;
}

/** Checks an adapter config; throws a `UserError` naming the bad field (`where`: whose). */
export function validateLoraConfig(c: LoraConfig, where = "LoRA config"): void {
  if (!Number.isInteger(c.rank) || c.rank < 1) {
    throw new UserError(`${where}: rank must be a positive integer, got ${c.rank}`);
  }
  if (!(Number.isFinite(c.alpha) && c.alpha > 0)) {
    throw new UserError(`${where}: alpha must be a positive number, got ${c.alpha}`);
  }
  if (!(c.dropout >= 0 && c.dropout < 1)) {
    throw new UserError(`${where}: dropout must be in [0, 1), got ${c.dropout}`);
  }
  if (c.targets.length === 0) throw new UserError(`${where}: no target projections`);
  for (const t of c.targets) {
    if (!LORA_TARGETS.includes(t)) {
      throw new UserError(`${where}: unknown target "${t}"; targets: ${LORA_TARGETS.join(", ")}`);
    }
  }
}

/** Targets in `LORA_TARGETS` order, each once; unknown names are a `UserError` naming them. */
export function parseLoraTargets(names: readonly string[], where = "--lora-targets"): LoraTarget[] {
  const want = new Set<string>();
  for (const n of names) {
    const t = n.trim().replace(/_proj$/, "");
    if (!(LORA_TARGETS as readonly string[]).includes(t)) {
      throw new UserError(
        `${where}: unknown projection "${n}"; choose from ${LORA_TARGETS.join(",")}`,
      );
    }
    want.add(t);
  }
  return LORA_TARGETS.filter((t) => want.has(t));
}

/** Which fused matmul of the forward a target belongs to. */
export type FusedProjection = "qkv" | "o" | "gateUp" | "down";

/** One adapted projection of one layer: its tensors and where its delta goes. */
export interface LoraSite {
  /** Decoder layer index (0-based). */
  layer: number;
  /** The adapted projection, e.g. `q`. */
  target: LoraTarget;
  /** The fused projection whose output holds this target's columns. */
  proj: FusedProjection;
  /** Input features (A's columns). */
  inDim: number;
  /** Output features (B's rows): the width of its column slice. */
  outDim: number;
  /** First column of the slice in the fused output. */
  colOffset: number;
  /** Row length of the fused output (its leading dimension). */
  ld: number;
  /** The base weight's Hugging Face name. */
  baseName: string;
  /** A `[r, in]` in the adapter's flat buffer. */
  a: TensorSlot;
  /** B `[out, r]` in the adapter's flat buffer. */
  b: TensorSlot;
}

/** Every adapter tensor of a model in one flat buffer (the optimizer's view), and its sites. */
export interface LoraLayout {
  /** The adapter's rank, scaling, dropout and targets. */
  config: LoraConfig;
  /** Floats in the buffer (gaps included). */
  floats: number;
  /** Every A and B, per layer per target (A then B). */
  tensors: TensorSlot[];
  /** One range, decayed (A and B are matrices). */
  runs: (FloatRange & { decay: boolean })[];
  /** Every adapted projection, per layer per target. */
  sites: LoraSite[];
}

/** PEFT's name of an adapter tensor for the base weight `baseName` (`model.layers.0...weight`). */
export function peftTensorName(baseName: string, which: "A" | "B"): string {
  return `base_model.model.${baseName.replace(/\.weight$/, "")}.lora_${which}.weight`;
}

/**
 * The layout of `lora`'s tensors for `model`: per layer, per target in
 * `LORA_TARGETS` order, A then B, each at a multiple of `LAYOUT_ALIGN` floats
 * (so each binds at a valid offset).
 *
 * @example
 * ```ts
 * import { loraLayout } from "./lora.ts";
 * import { presetConfig } from "./config.ts";
 * const l = loraLayout(presetConfig("tiny"), { rank: 4, alpha: 8, dropout: 0, targets: ["q", "v"] });
 * if (l.tensors[0].name !== "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") {
 *   throw new Error("name");
 * }
 * ```
 */
export function loraLayout(model: ModelConfig, lora: LoraConfig): LoraLayout {
  validateLoraConfig(lora);
  const H = model.hidden_size;
  const I = model.intermediate_size;
  const hd = headDim(model);
  const qDim = model.num_attention_heads * hd;
  const kvDim = model.num_key_value_heads * hd;
  const qkvDim = qDim + 2 * kvDim;
  const r = lora.rank;
  const geometry: Record<
    LoraTarget,
    { proj: FusedProjection; inDim: number; outDim: number; colOffset: number; ld: number }
  > = {
    q: { proj: "qkv", inDim: H, outDim: qDim, colOffset: 0, ld: qkvDim },
    k: { proj: "qkv", inDim: H, outDim: kvDim, colOffset: qDim, ld: qkvDim },
    v: { proj: "qkv", inDim: H, outDim: kvDim, colOffset: qDim + kvDim, ld: qkvDim },
    o: { proj: "o", inDim: qDim, outDim: H, colOffset: 0, ld: H },
    gate: { proj: "gateUp", inDim: H, outDim: I, colOffset: 0, ld: 2 * I },
    up: { proj: "gateUp", inDim: H, outDim: I, colOffset: I, ld: 2 * I },
    down: { proj: "down", inDim: I, outDim: H, colOffset: 0, ld: H },
  };
  const names = tensorNames(model);
  const tensors: TensorSlot[] = [];
  const sites: LoraSite[] = [];
  let next = 0;
  const place = (name: string, shape: number[]): TensorSlot => {
    const offset = Math.ceil(next / LAYOUT_ALIGN) * LAYOUT_ALIGN;
    const size = shape[0] * shape[1];
    next = offset + size;
    const slot = { name, offset, size, shape, decay: true };
    tensors.push(slot);
    return slot;
  };
  for (let l = 0; l < model.num_hidden_layers; l++) {
    for (const target of lora.targets) {
      const g = geometry[target];
      const baseName = names.layers[l][target];
      const a = place(peftTensorName(baseName, "A"), [r, g.inDim]);
      const b = place(peftTensorName(baseName, "B"), [g.outDim, r]);
      sites.push({ layer: l, target, ...g, baseName, a, b });
    }
  }
  const floats = Math.ceil(next / LAYOUT_ALIGN) * LAYOUT_ALIGN;
  return {
    config: { ...lora },
    floats,
    tensors,
    runs: [{ offset: 0, size: floats, decay: true }],
    sites,
  };
}

/** Floats the adapter trains (A and B of every site, gaps excluded). */
export function loraParameterCount(layout: LoraLayout): number {
  return layout.tensors.reduce((a, t) => a + t.size, 0);
}

/**
 * A fresh adapter: A uniform in ±1/sqrt(in) (PEFT's default init), B zeros.
 * One `Rng(seed)`, tensors in layout order, elements row-major.
 */
export function initLora(layout: LoraLayout, seed: number): Map<string, Float32Array> {
  const rng = new Rng(seed);
  const out = new Map<string, Float32Array>();
  for (const s of layout.sites) {
    const a = new Float32Array(s.a.size);
    const bound = 1 / Math.sqrt(s.inDim);
    for (let i = 0; i < a.length; i++) a[i] = (2 * rng.nextFloat() - 1) * bound;
    out.set(s.a.name, a);
    out.set(s.b.name, new Float32Array(s.b.size));
  }
  return out;
}

/** Checks that `adapter` holds every tensor of `layout` with its size (`where`: whose). */
export function checkLoraTensors(
  layout: LoraLayout,
  adapter: ReadonlyMap<string, ArrayLike<number>>,
  where: string,
): void {
  for (const t of layout.tensors) {
    const v = adapter.get(t.name);
    if (!v) throw new UserError(`${where}: missing tensor ${t.name}`);
    if (v.length !== t.size) {
      throw new UserError(
        `${where}: tensor ${t.name} has ${v.length} values, expected ${t.size} ([${
          t.shape.join(", ")
        }]); the adapter was made for another model shape or rank`,
      );
    }
  }
}

/** The adapter as one flat array in `layout` (zeros in the gaps). */
export function flattenLora(
  layout: LoraLayout,
  adapter: ReadonlyMap<string, Float32Array>,
): Float32Array {
  checkLoraTensors(layout, adapter, "adapter");
  const flat = new Float32Array(layout.floats);
  for (const t of layout.tensors) flat.set(adapter.get(t.name)!, t.offset);
  return flat;
}

/** The adapter tensors of a flat array in `layout`, by PEFT name (copies). */
export function unflattenLora(layout: LoraLayout, flat: Float32Array): Map<string, Float32Array> {
  const out = new Map<string, Float32Array>();
  for (const t of layout.tensors) out.set(t.name, flat.slice(t.offset, t.offset + t.size));
  return out;
}

/**
 * The base parameters with the adapter folded in: `W' = W + s B A` for every
 * site, in float64 then rounded once to float32. Other tensors are shared,
 * not copied.
 */
export function mergeLora(
  params: ReadonlyMap<string, Float32Array>,
  layout: LoraLayout,
  adapter: ReadonlyMap<string, Float32Array>,
): Map<string, Float32Array> {
  checkLoraTensors(layout, adapter, "adapter");
  const s = loraScale(layout.config);
  const r = layout.config.rank;
  const out = new Map(params);
  for (const site of layout.sites) {
    const w = params.get(site.baseName);
    if (!w) throw new UserError(`base model: missing tensor ${site.baseName}`);
    const A = adapter.get(site.a.name)!;
    const B = adapter.get(site.b.name)!;
    const { inDim, outDim } = site;
    const merged = new Float32Array(w.length);
    for (let o = 0; o < outDim; o++) {
      for (let i = 0; i < inDim; i++) {
        let acc = 0;
        for (let k = 0; k < r; k++) acc += B[o * r + k] * A[k * inDim + i];
        merged[o * inDim + i] = w[o * inDim + i] + s * acc;
      }
    }
    out.set(site.baseName, merged);
  }
  return out;
}

/**
 * The adapter's gradients from the gradients of the merged weights (the
 * chain rule through `W' = W + s B A`): `dA = s B^T dW'`, `dB = s dW' A^T`.
 * The reference against which the GPU backward is tested.
 */
export function loraGradsFromDense(
  layout: LoraLayout,
  adapter: ReadonlyMap<string, Float32Array>,
  denseGrads: ReadonlyMap<string, ArrayLike<number>>,
): Map<string, Float64Array> {
  const s = loraScale(layout.config);
  const r = layout.config.rank;
  const out = new Map<string, Float64Array>();
  for (const site of layout.sites) {
    const dW = denseGrads.get(site.baseName)!;
    const A = adapter.get(site.a.name)!;
    const B = adapter.get(site.b.name)!;
    const { inDim, outDim } = site;
    const dA = new Float64Array(r * inDim);
    const dB = new Float64Array(outDim * r);
    for (let o = 0; o < outDim; o++) {
      for (let i = 0; i < inDim; i++) {
        const g = s * dW[o * inDim + i];
        for (let k = 0; k < r; k++) {
          dA[k * inDim + i] += B[o * r + k] * g;
          dB[o * r + k] += g * A[k * inDim + i];
        }
      }
    }
    out.set(site.a.name, dA);
    out.set(site.b.name, dB);
  }
  return out;
}

/** What `LoraDispatches.create` needs from the model. */
export interface LoraBuildSpec {
  layout: LoraLayout;
  /** Rows of every forward (B*T). */
  N: number;
  /** The adapter's flat parameters, and its flat gradients (training only). */
  params: GPUBuffer;
  grads?: GPUBuffer;
  /** Allocates a buffer the model owns (freed with it). */
  buffer(bytes: number, label: string): GPUBuffer;
}

/**
 * The adapter's dispatches for one model: the forward's deltas, and the
 * backward split in two around the base layer's own dX (the input the
 * weight gradients read may be overwritten by dX, as the MLP's `act` is).
 * Each call returns freshly prepared dispatches for one site group.
 */
export class LoraDispatches {
  #gpu: Gpu;
  #spec: LoraBuildSpec;
  /** Per site: t = x A^T `[N, r]`, kept from the forward for the backward. */
  #t = new Map<LoraSite, GPUBuffer>();
  /** Per target: dt `[N, r]`, from the weights part to the input part of the backward. */
  #dt = new Map<LoraTarget, GPUBuffer>();
  /** Scratch `[N, max out]`: the forward's delta, the backward's scaled dY slice. */
  #wide: GPUBuffer;
  /** Dropout (p > 0 only): its state, each site's dropped input `[N, in]`, and `[N, max in]` scratch. */
  #dropout?: { p: number; state: GPUBuffer; xd: Map<LoraSite, GPUBuffer>; u: GPUBuffer };

  private constructor(gpu: Gpu, spec: LoraBuildSpec) {
    this.#gpu = gpu;
    this.#spec = spec;
    const { N, layout } = spec;
    const r = layout.config.rank;
    const maxOut = Math.max(...layout.sites.map((s) => s.outDim));
    this.#wide = spec.buffer(N * maxOut * 4, `lora delta / d slice [N, ${maxOut}]`);
    const p = layout.config.dropout;
    if (p > 0) {
      const maxIn = Math.max(...layout.sites.map((s) => s.inDim));
      this.#dropout = {
        p,
        state: spec.buffer(16, "lora dropout state"),
        xd: new Map(layout.sites.map((s) => [
          s,
          spec.buffer(N * s.inDim * 4, `layer ${s.layer} lora ${s.target} dropped input [N, in]`),
        ])),
        u: spec.buffer(N * maxIn * 4, `lora dt A [N, ${maxIn}]`),
      };
    }
    for (const s of layout.sites) {
      this.#t.set(s, spec.buffer(N * r * 4, `layer ${s.layer} lora ${s.target} t [N, r]`));
      if (spec.grads && !this.#dt.has(s.target)) {
        this.#dt.set(s.target, spec.buffer(N * r * 4, `lora ${s.target} dt [N, r]`));
      }
    }
  }

  /** Allocates the kept activations and scratch of `spec`. */
  static create(gpu: Gpu, spec: LoraBuildSpec): LoraDispatches {
    return new LoraDispatches(gpu, spec);
  }

  #sites(layer: number, proj: FusedProjection): LoraSite[] {
    return this.#spec.layout.sites.filter((s) => s.layer === layer && s.proj === proj);
  }

  #bind(buffer: GPUBuffer, slot: TensorSlot): Binding {
    return { buffer, offset: slot.offset * 4, size: slot.size * 4 };
  }

  /**
   * Dropout for the next submitted forward: a mask from `seed`, or off
   * (`undefined`, evaluation). A no-op without dropout. The write is queued:
   * it applies to work submitted after it.
   */
  setDropout(seed: number | undefined): void {
    const d = this.#dropout;
    if (!d) return;
    this.#gpu.write(d.state, dropoutState(seed ?? 0, seed === undefined ? 0 : d.p));
  }

  #stream(site: LoraSite): number {
    return this.#spec.layout.sites.indexOf(site);
  }

  /** Whether layer `layer`'s projection `proj` carries an adapter. */
  has(layer: number, proj: FusedProjection): boolean {
    return this.#sites(layer, proj).length > 0;
  }

  /** After `y = x W^T` of `proj` in `layer`: `y[:, slice] += s (x A^T) B^T` for its targets. */
  async forward(layer: number, proj: FusedProjection, x: Binding, y: Binding): Promise<Dispatch[]> {
    const gpu = this.#gpu;
    const { N, params, layout } = this.#spec;
    const r = layout.config.rank;
    const s = loraScale(layout.config);
    const out: Dispatch[] = [];
    for (const site of this.#sites(layer, proj)) {
      const t = this.#t.get(site)!;
      let input = x;
      if (this.#dropout) {
        input = this.#dropout.xd.get(site)!;
        out.push(
          await dropoutApply(gpu, {
            src: x,
            dst: input,
            state: this.#dropout.state,
            count: N * site.inDim,
            stream: this.#stream(site),
            accumulate: false,
          }),
        );
      }
      out.push(
        await matmulXWt(gpu, {
          x: input,
          w: this.#bind(params, site.a),
          y: t,
          M: N,
          K: site.inDim,
          N: r,
        }),
        await matmulXWt(gpu, {
          x: t,
          w: this.#bind(params, site.b),
          y: this.#wide,
          M: N,
          K: r,
          N: site.outDim,
        }),
        await columnsAddScaled(gpu, {
          u: this.#wide,
          y,
          N,
          ld: site.ld,
          off: site.colOffset,
          width: site.outDim,
          scale: s,
        }),
      );
    }
    return out;
  }

  /**
   * The weight gradients of `proj`'s adapters in `layer` from its output
   * gradient `dy` `[N, ld]` and input `x`: dt = s dY_slice B, dB += s dY_slice^T t,
   * dA += dt^T x. Runs before the base layer's dX may overwrite `x`.
   */
  async backwardWeights(
    layer: number,
    proj: FusedProjection,
    dy: Binding,
    x: Binding,
  ): Promise<Dispatch[]> {
    const gpu = this.#gpu;
    const { N, params, grads, layout } = this.#spec;
    if (!grads) throw new Error("LoraDispatches: no gradient buffer for a backward");
    const r = layout.config.rank;
    const s = loraScale(layout.config);
    const out: Dispatch[] = [];
    for (const site of this.#sites(layer, proj)) {
      const t = this.#t.get(site)!;
      const dt = this.#dt.get(site.target)!;
      const ds = this.#wide; // [N, out]: s dY's slice
      out.push(
        await columnsGatherScaled(gpu, {
          y: dy,
          d: ds,
          N,
          ld: site.ld,
          off: site.colOffset,
          width: site.outDim,
          scale: s,
        }),
        await matmulDyW(gpu, {
          dy: ds,
          w: this.#bind(params, site.b),
          dx: dt,
          M: N,
          N: site.outDim,
          K: r,
        }),
        await matmulDyTX(gpu, {
          dy: ds,
          x: t,
          dw: this.#bind(grads, site.b),
          M: N,
          N: site.outDim,
          K: r,
          accumulate: true,
        }),
        await matmulDyTX(gpu, {
          dy: dt,
          x: this.#dropout ? this.#dropout.xd.get(site)! : x,
          dw: this.#bind(grads, site.a),
          M: N,
          N: r,
          K: site.inDim,
          accumulate: true,
        }),
      );
    }
    return out;
  }

  /** After the base layer's `dx = dY W`: `dx += dt A` for `proj`'s adapters in `layer`. */
  async backwardInput(layer: number, proj: FusedProjection, dx: Binding): Promise<Dispatch[]> {
    const gpu = this.#gpu;
    const { N, params, layout } = this.#spec;
    const r = layout.config.rank;
    const out: Dispatch[] = [];
    for (const site of this.#sites(layer, proj)) {
      const d = this.#dropout;
      const dt = this.#dt.get(site.target)!;
      const A = this.#bind(params, site.a);
      if (!d) {
        out.push(
          await matmulDyW(gpu, { dy: dt, w: A, dx, M: N, N: r, K: site.inDim, accumulate: true }),
        );
        continue;
      }
      // d(dropped input) = dt A, then through the same mask into dx.
      out.push(
        await matmulDyW(gpu, { dy: dt, w: A, dx: d.u, M: N, N: r, K: site.inDim }),
        await dropoutApply(gpu, {
          src: d.u,
          dst: dx,
          state: d.state,
          count: N * site.inDim,
          stream: this.#stream(site),
          accumulate: true,
        }),
      );
    }
    return out;
  }
}
