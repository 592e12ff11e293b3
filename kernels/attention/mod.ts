/**
 * Causal grouped-query attention, flash-style (FlashAttention-2 schedule), forward and backward.
 *
 * Shapes: q, out, dq `[B, T, nH, hd]`; k, v, dk, dv `[B, T, nKV, hd]`; lse `[B, nH, T]`.
 * Query head h reads kv head `floor(h / (nH / nKV))` by indexing (never copied).
 * With `s_tj = scale * q_t . k_j` (scale = 1/sqrt(hd)) for keys j <= t:
 *
 *   lse_t = log sum_j exp(s_tj),  p_tj = exp(s_tj - lse_t),  out_t = sum_j p_tj v_j
 *
 * Forward (online softmax, FlashAttention-2): the queries of a block walk the
 * keys up to the block's causal limit, keeping per query the running max m,
 * sum l and accumulator acc in registers: for a step of keys,
 * m' = max(m, max_j s_tj), l' = l e^(m - m') + sum_j e^(s_tj - m'),
 * acc' = acc e^(m - m') + sum_j e^(s_tj - m') v_j; at the end out = acc / l and
 * lse = m + log l. No T x T matrix exists in memory.
 *
 * Backward (dO = dL/dout): D_t = dO_t . out_t (= sum_j p_tj dp_tj, the softmax
 * Jacobian term), dp_tj = dO_t . v_j, ds_tj = p_tj (dp_tj - D_t), then
 *   dv_j = sum_t p_tj dO_t,  dk_j = scale sum_t ds_tj q_t,  dq_t = scale sum_j ds_tj k_j,
 * where dk/dv of a kv head also sum over the nH/nKV query heads that read it.
 * Three kernels, every output element with exactly one owner (no atomics, so
 * results are bitwise reproducible run to run):
 *   1. D = rowsum(dO * out), one invocation per (b, t, h) row.
 *   2. dK/dV: a workgroup owns a block of keys of one (b, kv head) and loops
 *      over ALL query heads of its group and the queries at or after its keys,
 *      recomputing p = exp(s - lse) from the stored lse.
 *   3. dQ: a workgroup owns a block of queries of one (b, h) and loops over keys.
 *
 * Two designs of the three tiled kernels (`AttentionDesign`):
 * - "tiled" (GPUs): a workgroup owns BR rows (queries; keys in dK/dV) and steps
 *   through BC columns at a time with the column operands' tiles in workgroup
 *   memory; TR x TC invocations each compute a (BR/TR) x (BC/TC) block of
 *   scores and a (BR/TR) x (hd/TC) block of the output in registers; the
 *   online-softmax row max is combined across the TC invocations of a row
 *   through workgroup memory (4 barriers per step forward, 3 backward).
 *   Tiles start at 32 x 32 with 8 x 8 invocations and are halved until they fit
 *   the device's `maxComputeWorkgroupStorageSize` (WebGPU guarantees 16 KiB;
 *   32 KiB here and on most GPUs): e.g. at 32 KiB, hd 64 runs forward 32x32
 *   (30 KiB) and backward 32x16; hd 128 forward 16x16, backward 16x8. Rows of
 *   [*, hd] tiles are padded to hd + 1 floats so that invocations reading
 *   different rows at one column hit different banks. Any hd works (TC is
 *   reduced to divide it).
 * - "rows" (CPU drivers, the default where `isFallback`; needs hd % 4 == 0):
 *   one invocation per owned row with no workgroup memory; see the comment at
 *   the design's code below for why (llvmpipe's cost model), and the subgroup
 *   broadcast path that makes it ~7x faster than "tiled" there.
 *
 * FLOP per call (causal, counting only the T(T+1)/2 visible pairs, P = B nH T(T+1)/2):
 *   forward 4 P hd (QK^T and PV); backward 14 P hd as executed (dK/dV kernel:
 *   S, dP, dV, dK; dQ kernel: S, dP, dQ: 7 matmuls) of which 10 P hd are the
 *   usual "2.5x forward" (S recompute, dP, dV, dK, dQ).
 * Bytes (minimum traffic; column operands are re-read from cache ~T/BC times on top):
 *   forward reads q, k, v and writes out, lse: 4 (2 B T nH hd + 2 B T nKV hd + B nH T);
 *   backward reads q, k, v, out, dO, lse and writes dq, dk, dv, D:
 *   4 (4 B T nH hd + 4 B T nKV hd + 3 B nH T).
 *
 * KV-cache decode: the forward also takes `{ Tq, Tk, qPos0, kvStride }`:
 * queries t < Tq sit at positions qPos0 + t and attend to keys 0..min(Tk, qPos0 + t + 1) - 1
 * read from k/v buffers laid out `[B, kvStride, nKV, hd]` (a cache of capacity kvStride).
 *
 * Files: `tiled.ts` and `rows.ts` generate the two designs' WGSL, `decode.ts`
 * holds the KV-cache append (RoPE on the way in) and the one-query decode
 * kernel; this file the shared D kernel and the dispatch wrappers.
 *
 * @module
 */
import { type Dispatch, type Gpu, LINEAR_WORKGROUP_WGSL } from "../runtime.ts";
import { kernelDispatch, type ReadPath } from "../texels.ts";
import { attentionTiles, tiledDkvWgsl, tiledDqWgsl, tiledForwardWgsl, tileKey } from "./tiled.ts";
import { ROWS, rowsDkvWgsl, rowsDqWgsl, rowsForwardWgsl, rowsLanes } from "./rows.ts";

export { type AttentionKernel, type AttentionTiles, attentionTiles } from "./tiled.ts";

/**
 * Which kernel design runs (default: "rows" when `gpu.adapterSummary.isFallback`,
 * else "tiled"; see the file comment).
 */
export type AttentionDesign = "tiled" | "rows";

/** Arguments of `attentionForward`. */
export interface AttentionForwardArgs {
  /** `[B, Tq, nH, hd]` */
  q: GPUBuffer;
  /** `[B, kvStride, nKV, hd]` (kvStride = T unless given) */
  k: GPUBuffer;
  /** `[B, kvStride, nKV, hd]` */
  v: GPUBuffer;
  /** `[B, Tq, nH, hd]`, overwritten */
  out: GPUBuffer;
  /** `[B, nH, Tq]`, overwritten: log-sum-exp of each query's scaled scores */
  lse: GPUBuffer;
  /** Batch size. */
  B: number;
  /** Sequence length: the default of Tq, Tk and kvStride (training: all equal). */
  T: number;
  /** Query heads. */
  nH: number;
  /** Key/value heads (nH % nKV == 0). */
  nKV: number;
  /** Head dimension. */
  hd: number;
  /** Number of queries (default T). */
  Tq?: number;
  /** Number of valid keys (default T). */
  Tk?: number;
  /** Position of query 0 (default 0); query t attends keys j <= qPos0 + t. */
  qPos0?: number;
  /** Rows per batch entry of the k/v buffers (default T; a KV cache's capacity). */
  kvStride?: number;
  /** Force a kernel design (tests run both on any adapter). */
  design?: AttentionDesign;
  /** "rows" design: false leaves out the subgroup path (tests of the plain path). Default true. */
  subgroups?: boolean;
  /** Where q, k and v are read (kernels/texels.ts); default `auto`: textures on CPU drivers. */
  reads?: ReadPath;
}

/** Arguments of `attentionBackward`: gradients dq `[B,T,nH,hd]`, dk, dv `[B,T,nKV,hd]` are overwritten. */
export interface AttentionBackwardArgs {
  /** `[B, T, nH, hd]` (as in the forward) */
  q: GPUBuffer;
  /** `[B, T, nKV, hd]` */
  k: GPUBuffer;
  /** `[B, T, nKV, hd]` */
  v: GPUBuffer;
  /** `[B, T, nH, hd]`: the forward's output */
  out: GPUBuffer;
  /** `[B, nH, T]`: the forward's log-sum-exp */
  lse: GPUBuffer;
  /** `[B, T, nH, hd]`: dL/dout */
  dOut: GPUBuffer;
  /** `[B, T, nH, hd]`, overwritten */
  dq: GPUBuffer;
  /** `[B, T, nKV, hd]`, overwritten */
  dk: GPUBuffer;
  /** `[B, T, nKV, hd]`, overwritten */
  dv: GPUBuffer;
  /** Batch size. */
  B: number;
  /** Sequence length. */
  T: number;
  /** Query heads. */
  nH: number;
  /** Key/value heads (nH % nKV == 0). */
  nKV: number;
  /** Head dimension. */
  hd: number;
  /** Force a kernel design. */
  design?: AttentionDesign;
  /** "rows" design: false leaves out the subgroup path. Default true. */
  subgroups?: boolean;
  /** Where q, k, v, dOut, out, lse and D are read (kernels/texels.ts); default `auto`. */
  reads?: ReadPath;
}

/**
 * The design that runs: "rows" on CPU drivers (when hd % 4 == 0, for its vec4
 * loads), "tiled" elsewhere; an explicit choice of "rows" with another hd
 * falls back to "tiled".
 */
function designOf(gpu: Gpu, hd: number, design?: AttentionDesign): AttentionDesign {
  const wanted = design ?? (gpu.adapterSummary.isFallback ? "rows" : "tiled");
  return wanted === "rows" && hd % 4 === 0 ? "rows" : "tiled";
}

const D_WORKGROUP = 64;

/**
 * D[b, h, t] = dO_t . out_t, one invocation per (b, t, h) row of hd values,
 * read as vec4 when hd % 4 == 0 (VEC = 4; a quarter of the load instructions,
 * which is what counts on CPU drivers), else as scalars (VEC = 1).
 */
function dWgsl(vec: 1 | 4): string {
  const type = vec === 4 ? "vec4f" : "f32";
  return `${LINEAR_WORKGROUP_WGSL}
struct Params { T: u32, nH: u32, hd: u32, rows: u32 }
@group(0) @binding(0) var<storage, read> dOut: array<${type}>;
@group(0) @binding(1) var<storage, read> out: array<${type}>;
@group(0) @binding(2) var<storage, read_write> D: array<f32>;
@group(0) @binding(3) var<uniform> params: Params;

@compute @workgroup_size(${D_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let row = linear_workgroup(wid, nwg) * ${D_WORKGROUP}u + lid; // (b * T + t) * nH + h
  if (row >= params.rows) { return; }
  let h = row % params.nH;
  let bt = row / params.nH;
  let t = bt % params.T;
  let b = bt / params.T;
  let n = params.hd / ${vec}u;
  var sum = ${type}();
  for (var d = 0u; d < n; d++) {
    sum = fma(dOut[row * n + d], out[row * n + d], sum);
  }
  D[(b * params.nH + h) * params.T + t] = ${
    vec === 4 ? "(sum.x + sum.y) + (sum.z + sum.w)" : "sum"
  };
}`;
}

function checkShape(
  name: string,
  a: { B: number; T: number; nH: number; nKV: number; hd: number },
) {
  for (const [key, value] of Object.entries(a)) {
    if (!Number.isInteger(value) || value < 1) {
      throw new RangeError(`${name}: ${key} = ${value} must be a positive integer`);
    }
  }
  if (a.nH % a.nKV !== 0) {
    throw new RangeError(`${name}: nH = ${a.nH} is not a multiple of nKV = ${a.nKV}`);
  }
}

/**
 * Causal GQA attention forward (flash-style, see the file comment): out and lse
 * overwritten. One dispatch of B * nH * ceil(Tq / BR) workgroups.
 */
export async function attentionForward(gpu: Gpu, args: AttentionForwardArgs): Promise<Dispatch> {
  const { B, T, nH, nKV, hd } = args;
  checkShape("attentionForward", { B, T, nH, nKV, hd });
  const Tq = args.Tq ?? T;
  const Tk = args.Tk ?? T;
  const qPos0 = args.qPos0 ?? 0;
  const kvStride = args.kvStride ?? T;
  if (!(Tq >= 1 && Tk >= 1 && Tk <= kvStride && qPos0 >= 0)) {
    throw new RangeError(
      `attentionForward: need 1 <= Tq, 1 <= Tk <= kvStride, 0 <= qPos0 (Tq=${Tq} Tk=${Tk} kvStride=${kvStride} qPos0=${qPos0})`,
    );
  }
  let key: string;
  let wgsl: string;
  let rowsPerWorkgroup: number;
  if (designOf(gpu, hd, args.design) === "rows") {
    const S = await rowsLanes(gpu, args.subgroups ?? true);
    key = `attention forward rows hd=${hd} S=${S}`;
    wgsl = rowsForwardWgsl(hd, S);
    rowsPerWorkgroup = S || ROWS;
  } else {
    const tiles = attentionTiles("forward", hd, gpu.limits.maxComputeWorkgroupStorageSize);
    key = `attention forward tiled hd=${hd} ${tileKey(tiles)}`;
    wgsl = tiledForwardWgsl(tiles, hd);
    rowsPerWorkgroup = tiles.BR;
  }
  const nqb = Math.ceil(Tq / rowsPerWorkgroup);
  const count = B * nH * nqb;
  const params = gpu.createUniform(
    new Uint32Array([Tq, Tk, qPos0, kvStride, nH, nKV, nH / nKV, nqb, count]),
    "attention forward params",
  );
  const kvElements = B * kvStride * nKV * hd;
  return kernelDispatch(gpu, {
    label: "attention forward",
    key,
    wgsl,
    bindings: [args.q, args.k, args.v, args.out, args.lse, params],
    workgroups: count,
    owned: [params],
    textureReads: { q: B * Tq * nH * hd, k: kvElements, v: kvElements },
    reads: args.reads,
  });
}

/**
 * Causal GQA attention backward: D = rowsum(dOut * out), then dK/dV (one owner
 * per kv head and key block, summing its query heads), then dQ. dq, dk, dv are
 * overwritten. Allocates the D buffer `[B, nH, T]` once, here (owned by the first dispatch).
 */
export async function attentionBackward(
  gpu: Gpu,
  args: AttentionBackwardArgs,
): Promise<Dispatch[]> {
  const { B, T, nH, nKV, hd } = args;
  checkShape("attentionBackward", { B, T, nH, nKV, hd });
  let dkv: { key: string; wgsl: string; rows: number };
  let dq: { key: string; wgsl: string; rows: number };
  if (designOf(gpu, hd, args.design) === "rows") {
    const S = await rowsLanes(gpu, args.subgroups ?? true);
    const rows = S || ROWS;
    dkv = { key: `attention backward dkv rows hd=${hd} S=${S}`, wgsl: rowsDkvWgsl(hd, S), rows };
    dq = { key: `attention backward dq rows hd=${hd} S=${S}`, wgsl: rowsDqWgsl(hd, S), rows };
  } else {
    const maxBytes = gpu.limits.maxComputeWorkgroupStorageSize;
    const dkvTiles = attentionTiles("dkv", hd, maxBytes);
    const dqTiles = attentionTiles("dq", hd, maxBytes);
    dkv = {
      key: `attention backward dkv tiled hd=${hd} ${tileKey(dkvTiles)}`,
      wgsl: tiledDkvWgsl(dkvTiles, hd),
      rows: dkvTiles.BR,
    };
    dq = {
      key: `attention backward dq tiled hd=${hd} ${tileKey(dqTiles)}`,
      wgsl: tiledDqWgsl(dqTiles, hd),
      rows: dqTiles.BR,
    };
  }
  const vec = hd % 4 === 0 ? 4 : 1;
  const rows = B * T * nH;
  // Whole texels (16 bytes), so that the backward kernels can read D from a texture.
  const D = gpu.createBuffer(Math.ceil(rows / 4) * 16, "attention D [B, nH, T]");
  const dParams = gpu.createUniform(new Uint32Array([T, nH, hd, rows]), "attention D params");
  const group = nH / nKV;
  const nkb = Math.ceil(T / dkv.rows);
  const dkvCount = B * nKV * nkb;
  const dkvParams = gpu.createUniform(
    new Uint32Array([T, nH, nKV, group, nkb, dkvCount]),
    "attention dkv params",
  );
  const nqb = Math.ceil(T / dq.rows);
  const dqCount = B * nH * nqb;
  const dqParams = gpu.createUniform(
    new Uint32Array([T, nH, nKV, group, nqb, dqCount]),
    "attention dq params",
  );
  const inputs = [args.q, args.k, args.v, args.dOut, args.lse, D];
  const qElements = B * T * nH * hd;
  const kvElements = B * T * nKV * hd;
  // Every input of the dK/dV and dQ kernels.
  const backwardReads = {
    q: qElements,
    k: kvElements,
    v: kvElements,
    dOut: qElements,
    lse: rows,
    Dg: rows,
  };
  return [
    await kernelDispatch(gpu, {
      label: "attention backward D",
      key: `attention backward D vec${vec}`,
      wgsl: dWgsl(vec),
      bindings: [args.dOut, args.out, D, dParams],
      workgroups: Math.ceil(rows / D_WORKGROUP),
      owned: [D, dParams],
      textureReads: { dOut: qElements, out: qElements },
      reads: args.reads,
    }),
    await kernelDispatch(gpu, {
      label: "attention backward dK dV",
      key: dkv.key,
      wgsl: dkv.wgsl,
      bindings: [...inputs, dkvParams, args.dk, args.dv],
      workgroups: dkvCount,
      owned: [dkvParams],
      textureReads: backwardReads,
      reads: args.reads,
    }),
    await kernelDispatch(gpu, {
      label: "attention backward dQ",
      key: dq.key,
      wgsl: dq.wgsl,
      bindings: [...inputs, dqParams, args.dq],
      workgroups: dqCount,
      owned: [dqParams],
      textureReads: backwardReads,
      reads: args.reads,
    }),
  ];
}
