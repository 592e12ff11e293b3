/**
 * Where every parameter lives in ONE flat GPU buffer (and, at the same
 * offsets, its gradient and its AdamW moments). A flat layout lets the global
 * gradient norm and AdamW run as a few dispatches over ranges instead of one
 * or two per tensor, lets a step clear all gradients with one command, and
 * lets sibling projections that read the same input be one matrix:
 *
 * - q, k, v of a layer are adjacent rows, so `[Wq; Wk; Wv]` is one
 *   `[nH*hd + 2 nKV*hd, H]` matrix and one matmul computes all three;
 * - gate and up likewise form one `[2 I, H]` matrix.
 *
 * Checkpoints keep Hugging Face names and shapes: each tensor is a row-major
 * range of the buffer, read and written by name.
 *
 * Order: every tensor AdamW decays (matrices) first, then every one it does
 * not (norm weights), so the update is one range of each kind. Each group
 * (a fused pair or triple, or a lone tensor) starts at a multiple of
 * `LAYOUT_ALIGN` floats, so every group can be bound with an offset that any
 * device accepts (WebGPU's `minStorageBufferOffsetAlignment` is at most 256
 * bytes). The gaps hold zeros in parameters and gradients alike, which AdamW
 * leaves at zero and the norm does not see.
 *
 * @module
 */
import type { ModelConfig } from "./config.ts";
import { parameterSpecs, type ParamSpec, tensorNames } from "./params.ts";

/** Group alignment in floats: 256 bytes, the largest offset alignment WebGPU allows a device. */
export const LAYOUT_ALIGN = 64;

/** One tensor's place in the flat buffer. */
export interface TensorSlot {
  /** Hugging Face name. */
  name: string;
  /** First float. */
  offset: number;
  /** Number of floats. */
  size: number;
  /** Row-major shape, as in the checkpoint (linear weights `[out, in]`). */
  shape: number[];
  /** Whether AdamW decays it. */
  decay: boolean;
}

/** A range of floats `[offset, offset + size)`. */
export interface FloatRange {
  /** First float of the range. */
  offset: number;
  /** Number of floats in the range. */
  size: number;
}

/** The fused weights of one layer, as ranges of the flat buffer. */
export interface LayerSlots {
  /** RMSNorm weight before attention `[H]`. */
  inputNorm: FloatRange;
  /** `[Wq; Wk; Wv]`: `[nH*hd + 2 nKV*hd, H]`. */
  qkv: FloatRange;
  /** Output projection `[H, nH*hd]`. */
  o: FloatRange;
  /** Per-head RMSNorm weight of the queries `[hd]` (QK-norm models only). */
  qNorm?: FloatRange;
  /** Per-head RMSNorm weight of the keys `[hd]` (QK-norm models only). */
  kNorm?: FloatRange;
  /** RMSNorm weight before the MLP `[H]`. */
  postNorm: FloatRange;
  /** `[Wgate; Wup]`: `[2 I, H]`. */
  gateUp: FloatRange;
  /** MLP down projection `[H, I]`. */
  down: FloatRange;
}

/** The layout of a model's parameters in one flat buffer. */
export interface ParamLayout {
  /** Floats in the buffer (gaps included). */
  floats: number;
  /** Every tensor, in `parameterSpecs` order. */
  tensors: TensorSlot[];
  /** The ranges AdamW updates: `{ decay: true }` (matrices) and `{ decay: false }` (norms). */
  runs: (FloatRange & { decay: boolean })[];
  /** By role: the embedding (= head when tied), per-layer fused weights, final norm, head. */
  embed: FloatRange;
  /** Per-layer fused weights and norms, in layer order. */
  layers: LayerSlots[];
  /** Final RMSNorm weight `[H]`. */
  norm: FloatRange;
  /** The output head `[V, H]`: the same range as `embed` when the head is tied. */
  head: FloatRange;
}

function align(n: number): number {
  return Math.ceil(n / LAYOUT_ALIGN) * LAYOUT_ALIGN;
}

/**
 * The flat layout of `config`'s parameters.
 *
 * @example
 * ```ts
 * import { paramLayout } from "./layout.ts";
 * import { presetConfig } from "./config.ts";
 * const layout = paramLayout(presetConfig("tiny"));
 * const [q, k, v] = layout.tensors.slice(2, 5);
 * if (k.offset !== q.offset + q.size || v.offset !== k.offset + k.size) throw new Error("qkv");
 * ```
 */
export function paramLayout(config: ModelConfig): ParamLayout {
  const specs = parameterSpecs(config);
  const byName = new Map<string, ParamSpec>(specs.map((s) => [s.name, s]));
  const names = tensorNames(config);
  const slots = new Map<string, TensorSlot>();
  let next = 0;
  /** Places `group` (tensors adjacent, in order) at the next aligned offset. */
  const place = (...group: string[]): FloatRange => {
    const offset = align(next);
    let at = offset;
    for (const name of group) {
      const s = byName.get(name)!;
      slots.set(name, { name, offset: at, size: s.size, shape: s.shape, decay: s.decay });
      at += s.size;
    }
    next = at;
    return { offset, size: at - offset };
  };
  // Matrices (decayed): embedding, per layer qkv, o, gate+up, down; untied head.
  const embed = place(names.embed);
  const matrices = names.layers.map((l) => ({
    qkv: place(l.q, l.k, l.v),
    o: place(l.o),
    gateUp: place(l.gate, l.up),
    down: place(l.down),
  }));
  const head = config.tie_word_embeddings ? embed : place(names.head);
  const decayEnd = align(next);
  // Norm weights (not decayed).
  const norms = names.layers.map((l) => ({
    inputNorm: place(l.inputNorm),
    qNorm: l.qNorm ? place(l.qNorm) : undefined,
    kNorm: l.kNorm ? place(l.kNorm) : undefined,
    postNorm: place(l.postNorm),
  }));
  const norm = place(names.norm);
  const floats = align(next);
  const tensors = specs.map((s) => slots.get(s.name)!);
  for (const t of tensors) {
    if (t.decay !== (t.offset < decayEnd)) {
      throw new Error(`paramLayout: ${t.name} is in the wrong update range`);
    }
  }
  return {
    floats,
    tensors,
    runs: [
      { offset: 0, size: decayEnd, decay: true },
      { offset: decayEnd, size: floats - decayEnd, decay: false },
    ].filter((r) => r.size > 0),
    embed,
    layers: matrices.map((m, l) => ({ ...m, ...norms[l] })),
    norm,
    head,
  };
}

/** A parameter map as one flat array in `layout` (zeros in the gaps). */
export function flattenTensors(
  layout: ParamLayout,
  tensors: ReadonlyMap<string, Float32Array>,
): Float32Array {
  const flat = new Float32Array(layout.floats);
  for (const t of layout.tensors) flat.set(tensors.get(t.name)!, t.offset);
  return flat;
}

/** The tensors of a flat array in `layout`, by name (copies). */
export function unflattenTensors(
  layout: ParamLayout,
  flat: Float32Array,
): Map<string, Float32Array> {
  const out = new Map<string, Float32Array>();
  for (const t of layout.tensors) out.set(t.name, flat.slice(t.offset, t.offset + t.size));
  return out;
}
