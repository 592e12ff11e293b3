/**
 * The device plan of the training model: what must fit the device's limits
 * (every tensor is bound whole by some kernel) and how the head's logits are
 * cut into row chunks that do. Checked before anything is allocated, so a
 * model or batch too large for the GPU is refused with a message that names
 * the tensor, its size, the limit and what to lower.
 *
 * @module
 */
import { formatBytes } from "../kernels/runtime.ts";
import { headDim, type ModelConfig } from "./config.ts";
import { parameterSpecs } from "./params.ts";
import { paramLayout } from "./layout.ts";
import { UserError } from "../util/errors.ts";

/**
 * Bytes one chunk of logits may take by default on a GPU. Beyond a few
 * thousand rows a bigger chunk buys nothing (the head matmul is already large)
 * but memory.
 */
export const LOGITS_CHUNK_BYTES = 64 * 1024 * 1024;

/**
 * The budget on CPU drivers (Mesa lavapipe/llvmpipe): a chunk's logits are
 * written by the head matmul, read and rewritten by the cross-entropy, then
 * read by both backward matmuls, so a small chunk could stay in the CPU's
 * caches through those passes, at the cost of more dispatches. Measured on a
 * 2-core Zen 1 (bench/logits_chunk_bench.ts, docs/benchmarks.md): from 2 MiB
 * up to one whole chunk the step time is the same within noise, 1 MiB is
 * 3-10% slower; 4 MiB keeps the memory small at no cost.
 */
export const LOGITS_CHUNK_BYTES_CPU = 4 * 1024 * 1024;

/** The logits chunk budget for an adapter: smaller on CPU drivers. */
export function logitsChunkBudget(isFallback: boolean): number {
  return isFallback ? LOGITS_CHUNK_BYTES_CPU : LOGITS_CHUNK_BYTES;
}

/** A tensor the model allocates, for the up-front limit check. */
interface TensorPlan {
  name: string;
  shape: string;
  bytes: number;
  /** What the user can lower to shrink it. */
  lower: string;
}

const LOWER_BATCH = "lower --batch-size or --seq-len";
const LOWER_MODEL = "use a smaller model (hidden_size, intermediate_size, vocab_size)";

/** Byte alignment of storage binding offsets, as a row count of f32 rows of any width. */
function rowAlignment(limits: GPUSupportedLimits): number {
  return Math.max(1, Math.ceil(limits.minStorageBufferOffsetAlignment / 4));
}

/**
 * Rows per head chunk (logits `[rows, V]`) for `rows` = B*T: all of them when
 * they fit the byte budget (`budgetBytes`, or `requested` rows) and the
 * binding limits; otherwise a multiple of the storage offset alignment (chunk
 * c binds `xf[r0 .. r0 + chunk)` and `targets[r0 ..]`, and `r0 * 4` bytes must
 * be aligned) that fits. 0 when not even one aligned group of rows fits.
 */
export function logitsChunkRows(
  limits: GPUSupportedLimits,
  V: number,
  rows: number,
  requested?: number,
  budgetBytes: number = LOGITS_CHUNK_BYTES,
): number {
  const align = rowAlignment(limits);
  const bindLimit = Math.min(limits.maxStorageBufferBindingSize, limits.maxBufferSize);
  const fit = Math.floor(bindLimit / (V * 4));
  const wanted = requested ?? Math.floor(budgetBytes / (V * 4));
  if (rows <= fit && rows <= wanted) return rows;
  // Requested rows round up to the alignment; the byte budget, a cap, rounds
  // down. Either way no more than fits the binding.
  let r = requested !== undefined
    ? Math.ceil(requested / align) * align
    : Math.floor(wanted / align) * align;
  r = Math.min(Math.max(r, align), Math.floor(fit / align) * align);
  return r >= rows ? rows : r;
}

function planTensors(config: ModelConfig, B: number, T: number): TensorPlan[] {
  const N = B * T;
  const H = config.hidden_size;
  const hd = headDim(config);
  const nH = config.num_attention_heads;
  const nKV = config.num_key_value_heads;
  const I = config.intermediate_size;
  const plans: TensorPlan[] = [];
  for (const s of parameterSpecs(config)) {
    plans.push({
      name: `parameter ${s.name}`,
      shape: `[${s.shape.join(", ")}]`,
      bytes: s.size * 4,
      lower: LOWER_MODEL,
    });
  }
  // The fused projections are bound as one matrix each (model/layout.ts).
  const qkv = (nH + 2 * nKV) * hd;
  plans.push({
    name: "parameter q|k|v (one layer's fused projection)",
    shape: `[heads*head_dim + 2*kv_heads*head_dim=${qkv}, hidden_size=${H}]`,
    bytes: qkv * H * 4,
    lower: LOWER_MODEL,
  });
  plans.push({
    name: "parameter gate|up (one layer's fused projection)",
    shape: `[2*intermediate_size=${2 * I}, hidden_size=${H}]`,
    bytes: 2 * I * H * 4,
    lower: LOWER_MODEL,
  });
  const act = (name: string, dims: [string, number][]) =>
    plans.push({
      name,
      shape: `[${dims.map(([d, v]) => `${d}=${v}`).join(", ")}]`,
      bytes: dims.reduce((a, [, v]) => a * v, 4),
      lower: LOWER_BATCH,
    });
  act("residual stream / hidden activations", [["B*T", N], ["hidden_size", H]]);
  act("query activations", [["B*T", N], ["heads*head_dim", nH * hd]]);
  act("key/value activations", [["B*T", N], ["kv_heads*head_dim", nKV * hd]]);
  act("fused q|k|v activations", [["B*T", N], ["(heads+2*kv_heads)*head_dim", qkv]]);
  act("MLP activations (gate|up)", [["B*T", N], ["2*intermediate_size", 2 * I]]);
  act("attention log-sum-exp", [["B", B], ["heads", nH], ["T", T]]);
  return plans;
}

/**
 * Refuses, before anything is allocated, a model and batch that this device
 * cannot hold: every tensor is bound whole by some kernel, so each must fit
 * both `maxBufferSize` and `maxStorageBufferBindingSize`, except the logits,
 * which are computed in row chunks sized to fit (refused only when not even
 * one aligned group of rows fits). Throws a `UserError` naming the tensor, its
 * shape and size, the limit and what to lower.
 */
export function checkDeviceLimits(
  limits: GPUSupportedLimits,
  config: ModelConfig,
  batchSize: number,
  seqLen: number,
): void {
  const bindingIsSmaller = limits.maxStorageBufferBindingSize <= limits.maxBufferSize;
  const limit = bindingIsSmaller ? limits.maxStorageBufferBindingSize : limits.maxBufferSize;
  const limitName = bindingIsSmaller ? "maxStorageBufferBindingSize" : "maxBufferSize";
  for (const t of planTensors(config, batchSize, seqLen)) {
    if (t.bytes > limit) {
      throw new UserError(
        `this GPU cannot hold the model at batch ${batchSize} x ${seqLen}: tensor ${t.name} ` +
          `${t.shape} needs ${formatBytes(t.bytes)}, over the device's ${limitName} of ` +
          `${formatBytes(limit)}; ${t.lower}.`,
      );
    }
  }
  const V = config.vocab_size;
  if (logitsChunkRows(limits, V, batchSize * seqLen) < 1) {
    const align = rowAlignment(limits);
    throw new UserError(
      `this GPU cannot hold the model: one chunk of logits [${align} rows, vocab_size=${V}] ` +
        `needs ${formatBytes(align * V * 4)}, over the device's ${limitName} of ` +
        `${formatBytes(limit)}; use a smaller vocab_size.`,
    );
  }
  // Parameters, gradients and AdamW moments are flat buffers of every
  // parameter (bound in ranges, so only maxBufferSize applies to them).
  const flatBytes = paramLayout(config).floats * 4;
  if (flatBytes > limits.maxBufferSize) {
    throw new UserError(
      `this GPU cannot hold the model: its parameters need one buffer of ${
        formatBytes(flatBytes)
      }, over the device's maxBufferSize of ${formatBytes(limits.maxBufferSize)}; ${LOWER_MODEL}.`,
    );
  }
}
