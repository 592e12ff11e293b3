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
 */
import {
  type Dispatch,
  type Gpu,
  isBroadcastSubgroupSize,
  LINEAR_WORKGROUP_WGSL,
} from "./runtime.ts";

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
}

/** Tile parameters of one kernel: BR owned rows, BC columns per step, TR x TC invocations. */
export interface AttentionTiles {
  /** Rows (queries; keys in dK/dV) a workgroup owns. */
  BR: number;
  /** Columns (keys; queries in dK/dV) per step. */
  BC: number;
  /** Invocations along the rows. */
  TR: number;
  /** Invocations along the columns (and the head dimension). */
  TC: number;
}

/** The three tiled kernels, for `attentionTiles`. */
export type AttentionKernel = "forward" | "dkv" | "dq";

/** Workgroup memory in floats of a kernel with these tiles (see the `var<workgroup>`s below). */
function workgroupFloats(kind: AttentionKernel, t: AttentionTiles, hd: number): number {
  const hdp = hd + 1;
  switch (kind) {
    case "forward": // Qs, Ks, Vs, Ps, Mx
      return t.BR * hdp + 2 * t.BC * hdp + t.BR * t.BC + t.BR * t.TC;
    case "dkv": // Ks, Vs, Qs, dOs, Ls, Ds, Ps, dSs
      return 2 * t.BR * hdp + 2 * t.BC * hdp + 2 * t.BC + 2 * t.BR * t.BC;
    case "dq": // Qs, dOs, Ks, Vs, dSs
      return 2 * t.BR * hdp + 2 * t.BC * hdp + t.BR * t.BC;
  }
}

/**
 * Preferred tiles before fitting to the workgroup memory: 64 invocations, each
 * with a 4x4 block of scores and a 4 x hd/8 block of the output.
 */
const PREFERRED: AttentionTiles = { BR: 32, BC: 32, TR: 8, TC: 8 };

/**
 * The tiles the tiled design uses for head_dim `hd` within `maxBytes` of
 * workgroup memory: the preferred ones, halving the larger of BC/BR (BC first)
 * until they fit, with TC dividing both BC and hd and TR dividing BR.
 */
export function attentionTiles(
  kind: AttentionKernel,
  hd: number,
  maxBytes: number,
): AttentionTiles {
  let { BR, BC, TR, TC } = PREFERRED;
  for (;;) {
    TR = Math.min(TR, BR);
    TC = Math.min(TC, BC);
    while (hd % TC !== 0) TC /= 2;
    const t = { BR, BC, TR, TC };
    if (workgroupFloats(kind, t, hd) * 4 <= maxBytes) return t;
    if (BR === 1 && BC === 1) break;
    if (BC >= BR && BC > 1) BC /= 2;
    else BR /= 2;
  }
  throw new RangeError(
    `attention: head_dim ${hd} does not fit this device's ${maxBytes} bytes of workgroup memory`,
  );
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

/** WGSL constants shared by the three tiled kernels. */
function constants(t: AttentionTiles, hd: number): string {
  return `
const BR = ${t.BR}u; const BC = ${t.BC}u; const TR = ${t.TR}u; const TC = ${t.TC}u;
const RR = ${t.BR / t.TR}u; const RC = ${t.BC / t.TC}u; const RD = ${hd / t.TC}u;
const HD = ${hd}u; const HDP = ${hd + 1}u; const NT = ${t.TR * t.TC}u;
const SCALE: f32 = ${Math.fround(1 / Math.sqrt(hd))};
const NEG: f32 = -3.0e38; // "minus infinity" that keeps exp(NEG - m) = 0 and NEG - NEG finite
`;
}

/**
 * Loads `rows` rows of hd floats, row r from `src[base(r)...]`, into a padded
 * workgroup tile (zeros for rows with `valid` false). Threads stride over the
 * rows*HD elements so that consecutive invocations read consecutive addresses.
 */
function tileLoad(
  dst: string,
  src: string,
  rows: string,
  valid: (r: string) => string,
  base: (r: string) => string,
): string {
  return `
  for (var e = lid; e < ${rows} * HD; e += NT) {
    let r = e / HD;
    let d = e - r * HD;
    var val = 0.0;
    if (${valid("r")}) { val = ${src}[${base("r")} + d]; }
    ${dst}[r * HDP + d] = val;
  }`;
}

function forwardWgsl(t: AttentionTiles, hd: number): string {
  return `${LINEAR_WORKGROUP_WGSL}
${constants(t, hd)}
struct Params { Tq: u32, Tk: u32, qPos0: u32, kvStride: u32, nH: u32, nKV: u32, group: u32, nqb: u32, count: u32 }
@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;
@group(0) @binding(5) var<uniform> params: Params;

var<workgroup> Qs: array<f32, BR * HDP>;
var<workgroup> Ks: array<f32, BC * HDP>;
var<workgroup> Vs: array<f32, BC * HDP>;
var<workgroup> Ps: array<f32, BR * BC>; // probabilities of this block, [query][key]
var<workgroup> Mx: array<f32, BR * TC>; // per-invocation partial row maxima

@compute @workgroup_size(NT)
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let w = linear_workgroup(wid, nwg);
  if (w >= params.count) { return; }
  let qb = w % params.nqb;
  let bh = w / params.nqb;
  let h = bh % params.nH;
  let b = bh / params.nH;
  let kvh = h / params.group;
  let tr = lid / TC;
  let tc = lid % TC;
  let q0 = qb * BR;
  let Tq = params.Tq;
  let Tk = params.Tk;
  ${
    tileLoad("Qs", "q", "BR", (r) =>
      `q0 + ${r} < Tq`, (r) =>
      `((b * Tq + q0 + ${r}) * params.nH + h) * HD`)
  }
  // Keys [0, kEnd) are visible to some query of this block.
  let kEnd = min(Tk, params.qPos0 + min(q0 + BR, Tq));
  let nkb = (kEnd + BC - 1u) / BC;

  var m: array<f32, RR>;
  var l: array<f32, RR>;
  var acc: array<array<f32, RD>, RR>;
  for (var i = 0u; i < RR; i++) { m[i] = NEG; }
  for (var kb = 0u; kb < nkb; kb++) {
    let k0 = kb * BC;
    workgroupBarrier(); // the previous block's reads of Ks, Vs, Ps, Mx are done
    ${
    tileLoad("Ks", "k", "BC", (r) =>
      `k0 + ${r} < Tk`, (r) =>
      `((b * params.kvStride + k0 + ${r}) * params.nKV + kvh) * HD`)
  }
    ${
    tileLoad("Vs", "v", "BC", (r) =>
      `k0 + ${r} < Tk`, (r) =>
      `((b * params.kvStride + k0 + ${r}) * params.nKV + kvh) * HD`)
  }
    workgroupBarrier();

    // s = Q K^T for rows tr + TR i and keys tc + TC c.
    // Initialized explicitly: seen with Deno 2.9.6 (Naga -> Vulkan), a \`var\`
    // declared in a loop WITHOUT an initializer keeps the previous iteration's
    // value instead of being zeroed as WGSL says; with an initializer it is reset.
    var s = array<array<f32, RC>, RR>();
    for (var d = 0u; d < HD; d++) {
      var qv: array<f32, RR>;
      var kv: array<f32, RC>;
      for (var i = 0u; i < RR; i++) { qv[i] = Qs[(tr + TR * i) * HDP + d]; }
      for (var c = 0u; c < RC; c++) { kv[c] = Ks[(tc + TC * c) * HDP + d]; }
      for (var i = 0u; i < RR; i++) {
        for (var c = 0u; c < RC; c++) { s[i][c] = fma(qv[i], kv[c], s[i][c]); }
      }
    }
    for (var i = 0u; i < RR; i++) {
      let r = tr + TR * i;
      let pos = params.qPos0 + q0 + r;
      var mx = NEG;
      for (var c = 0u; c < RC; c++) {
        let j = k0 + tc + TC * c;
        var sv = s[i][c] * SCALE;
        if (j > pos || j >= Tk) { sv = NEG; }
        s[i][c] = sv;
        mx = max(mx, sv);
      }
      Mx[r * TC + tc] = mx;
    }
    workgroupBarrier();
    var alpha: array<f32, RR>;
    for (var i = 0u; i < RR; i++) {
      let r = tr + TR * i;
      var mx = m[i];
      for (var u = 0u; u < TC; u++) { mx = max(mx, Mx[r * TC + u]); }
      alpha[i] = exp(m[i] - mx);
      m[i] = mx;
      for (var c = 0u; c < RC; c++) { Ps[r * BC + tc + TC * c] = exp(s[i][c] - mx); }
    }
    workgroupBarrier();
    for (var i = 0u; i < RR; i++) {
      l[i] *= alpha[i];
      for (var x = 0u; x < RD; x++) { acc[i][x] *= alpha[i]; }
    }
    // acc += P V for dims tc + TC x; every invocation of a row sums l in the same order.
    for (var j = 0u; j < BC; j++) {
      var pv: array<f32, RR>;
      var vv: array<f32, RD>;
      for (var i = 0u; i < RR; i++) { pv[i] = Ps[(tr + TR * i) * BC + j]; l[i] += pv[i]; }
      for (var x = 0u; x < RD; x++) { vv[x] = Vs[j * HDP + tc + TC * x]; }
      for (var i = 0u; i < RR; i++) {
        for (var x = 0u; x < RD; x++) { acc[i][x] = fma(pv[i], vv[x], acc[i][x]); }
      }
    }
  }
  for (var i = 0u; i < RR; i++) {
    let t = q0 + tr + TR * i;
    if (t < Tq) {
      let inv = 1.0 / l[i];
      let o = ((b * Tq + t) * params.nH + h) * HD;
      for (var x = 0u; x < RD; x++) { out[o + tc + TC * x] = acc[i][x] * inv; }
      if (tc == 0u) { lse[(b * params.nH + h) * Tq + t] = m[i] + log(l[i]); }
    }
  }
}`;
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

/** Shared by both backward kernels: the T / head counts in a uniform. */
const BACKWARD_PARAMS = `
struct Params { T: u32, nH: u32, nKV: u32, group: u32, nb: u32, count: u32 }
@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read> dOut: array<f32>;
@group(0) @binding(4) var<storage, read> lse: array<f32>;
@group(0) @binding(5) var<storage, read> Dg: array<f32>;
@group(0) @binding(6) var<uniform> params: Params;`;

/**
 * s (scores) and dp = dO V^T for an RR x RC block: rows `rowTile` rows
 * (rt + RT i), columns `colTile` rows (ct + CT c), fused in one pass over hd.
 */
function scoresAndDp(a: {
  rowA: string;
  rowB: string;
  colA: string;
  colB: string;
  row: (i: string) => string;
  col: (c: string) => string;
}): string {
  return `
    // Explicit initializers: see the forward kernel (Naga loop-variable hazard).
    var s = array<array<f32, RC>, RR>();
    var dp = array<array<f32, RC>, RR>();
    for (var d = 0u; d < HD; d++) {
      var ra: array<f32, RR>;
      var rb: array<f32, RR>;
      var ca: array<f32, RC>;
      var cb: array<f32, RC>;
      for (var i = 0u; i < RR; i++) {
        ra[i] = ${a.rowA}[(${a.row("i")}) * HDP + d];
        rb[i] = ${a.rowB}[(${a.row("i")}) * HDP + d];
      }
      for (var c = 0u; c < RC; c++) {
        ca[c] = ${a.colA}[(${a.col("c")}) * HDP + d];
        cb[c] = ${a.colB}[(${a.col("c")}) * HDP + d];
      }
      for (var i = 0u; i < RR; i++) {
        for (var c = 0u; c < RC; c++) {
          s[i][c] = fma(ra[i], ca[c], s[i][c]);
          dp[i][c] = fma(rb[i], cb[c], dp[i][c]);
        }
      }
    }`;
}

function dkvWgsl(t: AttentionTiles, hd: number): string {
  return `${LINEAR_WORKGROUP_WGSL}
${constants(t, hd)}
${BACKWARD_PARAMS}
@group(0) @binding(7) var<storage, read_write> dk: array<f32>;
@group(0) @binding(8) var<storage, read_write> dv: array<f32>;

var<workgroup> Ks: array<f32, BR * HDP>;
var<workgroup> Vs: array<f32, BR * HDP>;
var<workgroup> Qs: array<f32, BC * HDP>;
var<workgroup> dOs: array<f32, BC * HDP>;
var<workgroup> Ls: array<f32, BC>;
var<workgroup> Ds: array<f32, BC>;
var<workgroup> Ps: array<f32, BR * BC>;  // [key][query]
var<workgroup> dSs: array<f32, BR * BC>; // [key][query]

@compute @workgroup_size(NT)
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let w = linear_workgroup(wid, nwg);
  if (w >= params.count) { return; }
  // w = (b * nKV + kvh) * nb + kb: this workgroup owns keys k0 .. k0 + BR - 1.
  let kb = w % params.nb;
  let bk = w / params.nb;
  let kvh = bk % params.nKV;
  let b = bk / params.nKV;
  let tr = lid / TC;
  let tc = lid % TC;
  let T = params.T;
  let nH = params.nH;
  let k0 = kb * BR;
  ${
    tileLoad("Ks", "k", "BR", (r) =>
      `k0 + ${r} < T`, (r) =>
      `((b * T + k0 + ${r}) * params.nKV + kvh) * HD`)
  }
  ${
    tileLoad("Vs", "v", "BR", (r) =>
      `k0 + ${r} < T`, (r) =>
      `((b * T + k0 + ${r}) * params.nKV + kvh) * HD`)
  }
  var dK: array<array<f32, RD>, RR>;
  var dV: array<array<f32, RD>, RR>;
  let nqb = (T + BC - 1u) / BC;
  for (var g = 0u; g < params.group; g++) {
    let h = kvh * params.group + g;
    // Query blocks that end before k0 see none of these keys.
    for (var qb = k0 / BC; qb < nqb; qb++) {
      let q0 = qb * BC;
      workgroupBarrier(); // the previous block's reads of Qs, dOs, Ps, dSs are done
      ${
    tileLoad("Qs", "q", "BC", (r) => `q0 + ${r} < T`, (r) => `((b * T + q0 + ${r}) * nH + h) * HD`)
  }
      ${
    tileLoad("dOs", "dOut", "BC", (r) =>
      `q0 + ${r} < T`, (r) =>
      `((b * T + q0 + ${r}) * nH + h) * HD`)
  }
      for (var e = lid; e < BC; e += NT) {
        var lv = 0.0;
        var dv0 = 0.0;
        if (q0 + e < T) {
          lv = lse[(b * nH + h) * T + q0 + e];
          dv0 = Dg[(b * nH + h) * T + q0 + e];
        }
        Ls[e] = lv;
        Ds[e] = dv0;
      }
      workgroupBarrier();
      ${
    scoresAndDp({
      rowA: "Ks",
      rowB: "Vs",
      colA: "Qs",
      colB: "dOs",
      row: (i) => `tr + TR * ${i}`,
      col: (c) => `tc + TC * ${c}`,
    })
  }
      for (var i = 0u; i < RR; i++) {
        let r = tr + TR * i;
        let j = k0 + r;
        for (var c = 0u; c < RC; c++) {
          let cq = tc + TC * c;
          let tq = q0 + cq;
          var p = 0.0;
          if (tq < T && j <= tq) { p = exp(s[i][c] * SCALE - Ls[cq]); }
          Ps[r * BC + cq] = p;
          dSs[r * BC + cq] = p * (dp[i][c] - Ds[cq]);
        }
      }
      workgroupBarrier();
      // dV += P^T dO, dK += dS^T Q for dims tc + TC x.
      for (var c = 0u; c < BC; c++) {
        var pv: array<f32, RR>;
        var sv: array<f32, RR>;
        var ov: array<f32, RD>;
        var qv: array<f32, RD>;
        for (var i = 0u; i < RR; i++) {
          pv[i] = Ps[(tr + TR * i) * BC + c];
          sv[i] = dSs[(tr + TR * i) * BC + c];
        }
        for (var x = 0u; x < RD; x++) {
          ov[x] = dOs[c * HDP + tc + TC * x];
          qv[x] = Qs[c * HDP + tc + TC * x];
        }
        for (var i = 0u; i < RR; i++) {
          for (var x = 0u; x < RD; x++) {
            dV[i][x] = fma(pv[i], ov[x], dV[i][x]);
            dK[i][x] = fma(sv[i], qv[x], dK[i][x]);
          }
        }
      }
    }
  }
  for (var i = 0u; i < RR; i++) {
    let j = k0 + tr + TR * i;
    if (j < T) {
      let o = ((b * T + j) * params.nKV + kvh) * HD;
      for (var x = 0u; x < RD; x++) {
        dk[o + tc + TC * x] = dK[i][x] * SCALE;
        dv[o + tc + TC * x] = dV[i][x];
      }
    }
  }
}`;
}

function dqWgsl(t: AttentionTiles, hd: number): string {
  return `${LINEAR_WORKGROUP_WGSL}
${constants(t, hd)}
${BACKWARD_PARAMS}
@group(0) @binding(7) var<storage, read_write> dq: array<f32>;

var<workgroup> Qs: array<f32, BR * HDP>;
var<workgroup> dOs: array<f32, BR * HDP>;
var<workgroup> Ks: array<f32, BC * HDP>;
var<workgroup> Vs: array<f32, BC * HDP>;
var<workgroup> dSs: array<f32, BR * BC>; // [query][key]

@compute @workgroup_size(NT)
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let w = linear_workgroup(wid, nwg);
  if (w >= params.count) { return; }
  // w = (b * nH + h) * nb + qb: this workgroup owns queries q0 .. q0 + BR - 1.
  let qb = w % params.nb;
  let bh = w / params.nb;
  let h = bh % params.nH;
  let b = bh / params.nH;
  let kvh = h / params.group;
  let tr = lid / TC;
  let tc = lid % TC;
  let T = params.T;
  let nH = params.nH;
  let q0 = qb * BR;
  ${tileLoad("Qs", "q", "BR", (r) => `q0 + ${r} < T`, (r) => `((b * T + q0 + ${r}) * nH + h) * HD`)}
  ${
    tileLoad("dOs", "dOut", "BR", (r) =>
      `q0 + ${r} < T`, (r) =>
      `((b * T + q0 + ${r}) * nH + h) * HD`)
  }
  var Lr: array<f32, RR>;
  var Dr: array<f32, RR>;
  for (var i = 0u; i < RR; i++) {
    let t = q0 + tr + TR * i;
    if (t < T) {
      Lr[i] = lse[(b * nH + h) * T + t];
      Dr[i] = Dg[(b * nH + h) * T + t];
    }
  }
  var dQ: array<array<f32, RD>, RR>;
  let kEnd = min(T, q0 + BR);
  let nkb = (kEnd + BC - 1u) / BC;
  for (var kb = 0u; kb < nkb; kb++) {
    let k0 = kb * BC;
    workgroupBarrier(); // the previous block's reads of Ks, dSs are done
    ${
    tileLoad("Ks", "k", "BC", (r) =>
      `k0 + ${r} < T`, (r) =>
      `((b * T + k0 + ${r}) * params.nKV + kvh) * HD`)
  }
    ${
    tileLoad("Vs", "v", "BC", (r) =>
      `k0 + ${r} < T`, (r) =>
      `((b * T + k0 + ${r}) * params.nKV + kvh) * HD`)
  }
    workgroupBarrier();
    ${
    scoresAndDp({
      rowA: "Qs",
      rowB: "dOs",
      colA: "Ks",
      colB: "Vs",
      row: (i) => `tr + TR * ${i}`,
      col: (c) => `tc + TC * ${c}`,
    })
  }
    for (var i = 0u; i < RR; i++) {
      let r = tr + TR * i;
      let tq = q0 + r;
      for (var c = 0u; c < RC; c++) {
        let ck = tc + TC * c;
        var ds = 0.0;
        if (k0 + ck <= tq && tq < T) {
          ds = exp(s[i][c] * SCALE - Lr[i]) * (dp[i][c] - Dr[i]);
        }
        dSs[r * BC + ck] = ds;
      }
    }
    workgroupBarrier();
    // dQ += dS K for dims tc + TC x.
    for (var j = 0u; j < BC; j++) {
      var sv: array<f32, RR>;
      var kv: array<f32, RD>;
      for (var i = 0u; i < RR; i++) { sv[i] = dSs[(tr + TR * i) * BC + j]; }
      for (var x = 0u; x < RD; x++) { kv[x] = Ks[j * HDP + tc + TC * x]; }
      for (var i = 0u; i < RR; i++) {
        for (var x = 0u; x < RD; x++) { dQ[i][x] = fma(sv[i], kv[x], dQ[i][x]); }
      }
    }
  }
  for (var i = 0u; i < RR; i++) {
    let t = q0 + tr + TR * i;
    if (t < T) {
      let o = ((b * T + t) * nH + h) * HD;
      for (var x = 0u; x < RD; x++) { dq[o + tc + TC * x] = dQ[i][x] * SCALE; }
    }
  }
}`;
}

// ---------------------------------------------------------------------------
// The "rows" design, for CPU drivers (Mesa llvmpipe/lavapipe).
//
// llvmpipe runs the invocations of a workgroup as the lanes of SIMD vectors;
// arithmetic is nearly free, but every load instruction (storage or
// workgroup memory, vec4 or scalar, same address in all lanes or not) is a
// loop over the lanes: measured here, ~45 ns per vec4 load per 8 lanes, and
// dynamically indexed private arrays cost as much. So each invocation owns one
// row (a query, or a key in dK/dV) and keeps it in named registers (the code
// is generated fully unrolled), and the other operand streams through in a
// workgroup-uniform loop, 4 rows at a time (one online-softmax rescale per 4
// keys, and independent multiply-add chains). With subgroups of exactly S
// lanes (S = the workgroup size, measured once per device), a streamed row of
// hd/4 vec4s is loaded spread over the lanes, ceil(hd / 4S) loads instead of
// hd/4, and handed round with subgroupBroadcast (an extract and splat). The
// kernel checks `subgroup_size == S` at run time and takes the plain loop
// otherwise, so no subgroup size is assumed for correctness.

/** Invocations (rows: queries, or keys in dK/dV) per workgroup without subgroups. */
const ROWS = 8;

/** `f(i)` for i = 0..n-1, joined. */
function each(n: number, f: (i: number) => string, sep = "\n"): string {
  return Array.from({ length: n }, (_, i) => f(i)).join(sep);
}

/**
 * Statements binding `${name}${u}_${x}` (u < 4 streamed rows, x < H vec4s) to
 * the rows at vec4 offsets `off(u)` of `buf`: plain loads, or (S > 0) chunk
 * loads by lane `sl` and broadcasts.
 */
function streamRows(
  name: string,
  buf: string,
  off: (u: number) => string,
  H: number,
  S: number,
  indent: string,
): string {
  const out: string[] = [];
  for (let u = 0; u < 4; u++) {
    if (S === 0) {
      for (let x = 0; x < H; x++) out.push(`let ${name}${u}_${x} = ${buf}[${off(u)} + ${x}u];`);
      continue;
    }
    const chunks = Math.ceil(H / S);
    for (let c = 0; c < chunks; c++) {
      out.push(`let ${name}c${u}_${c} = ${buf}[${off(u)} + min(${c * S}u + sl, ${H - 1}u)];`);
    }
    for (let x = 0; x < H; x++) {
      out.push(
        `let ${name}${u}_${x} = subgroupBroadcast(${name}c${u}_${Math.floor(x / S)}, ${x % S}u);`,
      );
    }
  }
  return out.join(`\n${indent}`);
}

/** `var target = sum_x a(x) * b(x)` over H vec4 pairs as one fma chain (4 rows give 4 independent chains). */
function dotChain(target: string, a: (x: number) => string, b: (x: number) => string, H: number) {
  const lines = [`var ${target} = ${a(0)} * ${b(0)};`];
  for (let x = 1; x < H; x++) lines.push(`${target} = fma(${a(x)}, ${b(x)}, ${target});`);
  return lines;
}

/**
 * `dotChain` for each of the 4 streamed rows u: `var ${t}${u} = sum_x a(x) * ${row}${u}_${x}`,
 * joined with `sep`.
 */
function dotChains4(
  t: string,
  a: (x: number) => string,
  row: string,
  H: number,
  sep: string,
): string {
  return each(4, (u) => dotChain(`${t}${u}`, a, (x) => `${row}${u}_${x}`, H).join(sep), sep);
}

/**
 * `init + sum_u w[u] * ${row}${u}_${x}` over the 4 streamed rows as nested fmas,
 * row 0 innermost (added first).
 */
function fmaRows4(w: string, row: string, x: number, init: string): string {
  return `fma(vec4f(${w}.w), ${row}3_${x}, fma(vec4f(${w}.z), ${row}2_${x}, ` +
    `fma(vec4f(${w}.y), ${row}1_${x}, fma(vec4f(${w}.x), ${row}0_${x}, ${init}))))`;
}

function rowsHeader(hd: number, S: number): string {
  return `${LINEAR_WORKGROUP_WGSL}
const WG = ${S || ROWS}u;
const SCALE: f32 = ${Math.fround(1 / Math.sqrt(hd))};
const NEG: f32 = -3.0e38;
fn hsum(a: vec4f) -> f32 { return (a.x + a.y) + (a.z + a.w); }`;
}

/**
 * The kernel body: the unrolled subgroup path when S > 0, guarded by a run-time
 * check of the subgroup size, with the compact rolled plain path as its
 * fallback; the plain path alone when S = 0.
 */
function rowsEntry(
  S: number,
  fast: () => string,
  plain: string,
): { builtins: string; body: string } {
  if (S === 0) return { builtins: "", body: plain };
  return {
    builtins:
      `,\n        @builtin(subgroup_size) sgSize: u32, @builtin(subgroup_invocation_id) sl: u32`,
    body: `if (sgSize == WG) {${fast()}\n  } else {${plain}\n  }`,
  };
}

/** "rows" forward: one invocation per query of one (b, h). */
function rowsForwardWgsl(hd: number, S: number): string {
  const H = hd / 4;
  // Subgroup path: keys stream 4 at a time, one online-softmax rescale per 4.
  const fast = () => `
    ${each(H, (x) => `let qr${x} = q[qo + ${x}u] * SCALE;`, "\n    ")}
    ${each(H, (x) => `var acc${x} = vec4f();`, "\n    ")}
    var m = NEG;
    var l = 0.0;
    for (var j0 = 0u; j0 < kEnd; j0 += 4u) {
      // Keys j0 + u; indices past kEnd are clamped (in bounds) and masked.
      let js = vec4u(j0, j0 + 1u, j0 + 2u, j0 + 3u);
      let visible = (js <= vec4u(pos)) & (js < vec4u(kEnd));
      ${each(4, (u) => `let ko${u} = kvBase + min(js[${u}], kEnd - 1u) * kvRow;`, "\n      ")}
      ${streamRows("K", "k", (u) => `ko${u}`, H, S, "      ")}
      ${dotChains4("a", (x) => `qr${x}`, "K", H, "\n      ")}
      let sc = select(vec4f(NEG), vec4f(hsum(a0), hsum(a1), hsum(a2), hsum(a3)), visible);
      // Key 0 is visible to every query, so m is finite after the first block
      // and exp(NEG - m) = 0; a block with no visible key keeps m: alpha = 1.
      let mNew = max(m, max(max(sc.x, sc.y), max(sc.z, sc.w)));
      let alpha = exp(m - mNew);
      let p = select(vec4f(), exp(sc - vec4f(mNew)), visible);
      l = l * alpha + hsum(p);
      m = mNew;
      ${streamRows("V", "v", (u) => `ko${u}`, H, S, "      ")}
      ${
    each(
      H,
      (x) => `acc${x} = ${fmaRows4("p", "V", x, `acc${x} * alpha`)};`,
      "\n      ",
    )
  }
    }
    if (q0 + lid < Tq) {
      let inv = 1.0 / l;
      ${each(H, (x) => `out[qo + ${x}u] = acc${x} * inv;`, "\n      ")}
      lse[(b * params.nH + h) * Tq + t] = m + log(l);
    }`;
  // Plain path: compact loops, one key at a time.
  const plain = `
    var qr = array<vec4f, ${H}>();
    for (var x = 0u; x < ${H}u; x++) { qr[x] = q[qo + x] * SCALE; }
    var acc = array<vec4f, ${H}>();
    var m = NEG;
    var l = 0.0;
    for (var j = 0u; j < kEnd; j++) {
      let ko = kvBase + j * kvRow;
      var s = 0.0;
      for (var x = 0u; x < ${H}u; x++) { s += dot(qr[x], k[ko + x]); }
      let visible = j <= pos;
      let mNew = select(m, max(m, s), visible);
      let alpha = exp(m - mNew);
      let p = select(0.0, exp(s - mNew), visible);
      l = l * alpha + p;
      for (var x = 0u; x < ${H}u; x++) { acc[x] = acc[x] * alpha + p * v[ko + x]; }
      m = mNew;
    }
    if (q0 + lid < Tq) {
      let inv = 1.0 / l;
      for (var x = 0u; x < ${H}u; x++) { out[qo + x] = acc[x] * inv; }
      lse[(b * params.nH + h) * Tq + t] = m + log(l);
    }`;
  const entry = rowsEntry(S, fast, plain);
  return `${rowsHeader(hd, S)}
struct Params { Tq: u32, Tk: u32, qPos0: u32, kvStride: u32, nH: u32, nKV: u32, group: u32, nqb: u32, count: u32 }
@group(0) @binding(0) var<storage, read> q: array<vec4f>;
@group(0) @binding(1) var<storage, read> k: array<vec4f>;
@group(0) @binding(2) var<storage, read> v: array<vec4f>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4f>;
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;
@group(0) @binding(5) var<uniform> params: Params;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32${entry.builtins}) {
  let w = linear_workgroup(wid, nwg);
  if (w >= params.count) { return; }
  let qb = w % params.nqb;
  let bh = w / params.nqb;
  let h = bh % params.nH;
  let b = bh / params.nH;
  let kvh = h / params.group;
  let Tq = params.Tq;
  let q0 = qb * WG;
  let t = min(q0 + lid, Tq - 1u); // surplus lanes redo the last row and write nothing
  let pos = params.qPos0 + t;
  let qo = ((b * Tq + t) * params.nH + h) * ${H}u;
  // Keys [0, kEnd) are visible to some query of the block: a workgroup-uniform bound.
  let kEnd = min(params.Tk, params.qPos0 + min(q0 + WG, Tq));
  let kvRow = params.nKV * ${H}u;
  let kvBase = (b * params.kvStride * params.nKV + kvh) * ${H}u;
  ${entry.body}
}`;
}

/** Bindings of both "rows" backward kernels (vec4 views of the [*, hd] tensors). */
const ROWS_BACKWARD_PARAMS = `
struct Params { T: u32, nH: u32, nKV: u32, group: u32, nb: u32, count: u32 }
@group(0) @binding(0) var<storage, read> q: array<vec4f>;
@group(0) @binding(1) var<storage, read> k: array<vec4f>;
@group(0) @binding(2) var<storage, read> v: array<vec4f>;
@group(0) @binding(3) var<storage, read> dOut: array<vec4f>;
@group(0) @binding(4) var<storage, read> lse: array<f32>;
@group(0) @binding(5) var<storage, read> Dg: array<f32>;
@group(0) @binding(6) var<uniform> params: Params;`;

/**
 * "rows" dK/dV: one invocation per key of one (b, kv head); it walks the
 * group's query heads and the queries from the block's first key on.
 */
function rowsDkvWgsl(hd: number, S: number): string {
  const H = hd / 4;
  // Subgroup path: queries stream 4 at a time; lse and D of the 4 come from
  // one load spread over the lanes too.
  const fast = () => `
    ${each(H, (x) => `let kr${x} = k[ko + ${x}u] * SCALE;`, "\n    ")}
    ${each(H, (x) => `let vr${x} = v[ko + ${x}u];`, "\n    ")}
    ${each(H, (x) => `var dK${x} = vec4f();`, "\n    ")}
    ${each(H, (x) => `var dV${x} = vec4f();`, "\n    ")}
    for (var g = 0u; g < params.group; g++) {
      let h = kvh * params.group + g;
      let lb = (b * nH + h) * T;
      for (var t0 = k0; t0 < T; t0 += 4u) {
        let ts = vec4u(t0, t0 + 1u, t0 + 2u, t0 + 3u);
        let seen = (ts >= vec4u(j)) & (ts < vec4u(T));
        ${
    each(4, (u) => `let qo${u} = ((b * T + min(ts[${u}], T - 1u)) * nH + h) * ${H}u;`, "\n        ")
  }
        ${streamRows("Q", "q", (u) => `qo${u}`, H, S, "        ")}
        ${streamRows("O", "dOut", (u) => `qo${u}`, H, S, "        ")}
        ${dotChains4("a", (x) => `kr${x}`, "Q", H, "\n        ")}
        ${dotChains4("e", (x) => `vr${x}`, "O", H, "\n        ")}
        let li = lb + min(t0 + min(sl, 3u), T - 1u);
        let Lc = lse[li];
        let Dc = Dg[li];
        let L = vec4f(${each(4, (u) => `subgroupBroadcast(Lc, ${u}u)`, ", ")});
        let Dv = vec4f(${each(4, (u) => `subgroupBroadcast(Dc, ${u}u)`, ", ")});
        let sc = vec4f(hsum(a0), hsum(a1), hsum(a2), hsum(a3));
        let dp = vec4f(hsum(e0), hsum(e1), hsum(e2), hsum(e3));
        let p = select(vec4f(), exp(sc - L), seen);
        let ds = p * (dp - Dv);
        ${
    each(
      H,
      (x) =>
        `dV${x} = ${fmaRows4("p", "O", x, `dV${x}`)};\n        ` +
        `dK${x} = ${fmaRows4("ds", "Q", x, `dK${x}`)};`,
      "\n        ",
    )
  }
      }
    }
    if (k0 + lid < T) {
      ${each(H, (x) => `dk[ko + ${x}u] = dK${x} * SCALE;`, "\n      ")}
      ${each(H, (x) => `dv[ko + ${x}u] = dV${x};`, "\n      ")}
    }`;
  const plain = `
    var kr = array<vec4f, ${H}>();
    var vr = array<vec4f, ${H}>();
    for (var x = 0u; x < ${H}u; x++) {
      kr[x] = k[ko + x] * SCALE;
      vr[x] = v[ko + x];
    }
    var dK = array<vec4f, ${H}>();
    var dV = array<vec4f, ${H}>();
    for (var g = 0u; g < params.group; g++) {
      let h = kvh * params.group + g;
      for (var t = k0; t < T; t++) {
        let qo = ((b * T + t) * nH + h) * ${H}u;
        var s = 0.0;
        var dp = 0.0;
        for (var x = 0u; x < ${H}u; x++) {
          s += dot(kr[x], q[qo + x]);
          dp += dot(vr[x], dOut[qo + x]);
        }
        let li = (b * nH + h) * T + t;
        let p = select(0.0, exp(s - lse[li]), t >= j);
        let ds = p * (dp - Dg[li]);
        for (var x = 0u; x < ${H}u; x++) {
          dV[x] += p * dOut[qo + x];
          dK[x] += ds * q[qo + x];
        }
      }
    }
    if (k0 + lid < T) {
      for (var x = 0u; x < ${H}u; x++) {
        dk[ko + x] = dK[x] * SCALE;
        dv[ko + x] = dV[x];
      }
    }`;
  const entry = rowsEntry(S, fast, plain);
  return `${rowsHeader(hd, S)}
${ROWS_BACKWARD_PARAMS}
@group(0) @binding(7) var<storage, read_write> dk: array<vec4f>;
@group(0) @binding(8) var<storage, read_write> dv: array<vec4f>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32${entry.builtins}) {
  let w = linear_workgroup(wid, nwg);
  if (w >= params.count) { return; }
  let kb = w % params.nb;
  let bk = w / params.nb;
  let kvh = bk % params.nKV;
  let b = bk / params.nKV;
  let T = params.T;
  let nH = params.nH;
  let k0 = kb * WG;
  let j = min(k0 + lid, T - 1u); // surplus lanes redo the last key and write nothing
  let ko = ((b * T + j) * params.nKV + kvh) * ${H}u;
  ${entry.body}
}`;
}

/** "rows" dQ: one invocation per query of one (b, h); keys stream through. */
function rowsDqWgsl(hd: number, S: number): string {
  const H = hd / 4;
  const fast = () => `
    ${each(H, (x) => `let qr${x} = q[qo + ${x}u] * SCALE;`, "\n    ")}
    ${each(H, (x) => `let dor${x} = dOut[qo + ${x}u];`, "\n    ")}
    ${each(H, (x) => `var dQ${x} = vec4f();`, "\n    ")}
    for (var j0 = 0u; j0 < kEnd; j0 += 4u) {
      let js = vec4u(j0, j0 + 1u, j0 + 2u, j0 + 3u);
      let visible = (js <= vec4u(t)) & (js < vec4u(kEnd));
      ${
    each(4, (u) =>
      `let ko${u} = ((b * T + min(js[${u}], kEnd - 1u)) * params.nKV + kvh) * ${H}u;`, "\n      ")
  }
      ${streamRows("K", "k", (u) => `ko${u}`, H, S, "      ")}
      ${streamRows("V", "v", (u) => `ko${u}`, H, S, "      ")}
      ${dotChains4("a", (x) => `qr${x}`, "K", H, "\n      ")}
      ${dotChains4("e", (x) => `dor${x}`, "V", H, "\n      ")}
      let sc = vec4f(hsum(a0), hsum(a1), hsum(a2), hsum(a3));
      let dp = vec4f(hsum(e0), hsum(e1), hsum(e2), hsum(e3));
      let ds = select(vec4f(), exp(sc - vec4f(L)) * (dp - vec4f(Dt)), visible);
      ${
    each(
      H,
      (x) => `dQ${x} = ${fmaRows4("ds", "K", x, `dQ${x}`)};`,
      "\n      ",
    )
  }
    }
    if (q0 + lid < T) {
      ${each(H, (x) => `dq[qo + ${x}u] = dQ${x} * SCALE;`, "\n      ")}
    }`;
  const plain = `
    var qr = array<vec4f, ${H}>();
    var dor = array<vec4f, ${H}>();
    for (var x = 0u; x < ${H}u; x++) {
      qr[x] = q[qo + x] * SCALE;
      dor[x] = dOut[qo + x];
    }
    var dQ = array<vec4f, ${H}>();
    for (var j = 0u; j < kEnd; j++) {
      let ko = ((b * T + j) * params.nKV + kvh) * ${H}u;
      var s = 0.0;
      var dp = 0.0;
      for (var x = 0u; x < ${H}u; x++) {
        s += dot(qr[x], k[ko + x]);
        dp += dot(dor[x], v[ko + x]);
      }
      let ds = select(0.0, exp(s - L) * (dp - Dt), j <= t);
      for (var x = 0u; x < ${H}u; x++) { dQ[x] += ds * k[ko + x]; }
    }
    if (q0 + lid < T) {
      for (var x = 0u; x < ${H}u; x++) { dq[qo + x] = dQ[x] * SCALE; }
    }`;
  const entry = rowsEntry(S, fast, plain);
  return `${rowsHeader(hd, S)}
${ROWS_BACKWARD_PARAMS}
@group(0) @binding(7) var<storage, read_write> dq: array<vec4f>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32${entry.builtins}) {
  let w = linear_workgroup(wid, nwg);
  if (w >= params.count) { return; }
  let qb = w % params.nb;
  let bh = w / params.nb;
  let h = bh % params.nH;
  let b = bh / params.nH;
  let kvh = h / params.group;
  let T = params.T;
  let q0 = qb * WG;
  let t = min(q0 + lid, T - 1u); // surplus lanes redo the last row and write nothing
  let qo = ((b * T + t) * params.nH + h) * ${H}u;
  let L = lse[(b * params.nH + h) * T + t];
  let Dt = Dg[(b * params.nH + h) * T + t];
  let kEnd = min(T, q0 + WG);
  ${entry.body}
}`;
}

/**
 * Rows per workgroup of the "rows" design: the subgroup size S when subgroups
 * of 4..32 lanes are there and wanted (then kernels carry the broadcast path),
 * else ROWS with no subgroup path.
 */
async function rowsLanes(gpu: Gpu, useSubgroups: boolean): Promise<number> {
  if (!useSubgroups) return 0;
  const s = await gpu.subgroupSize();
  return isBroadcastSubgroupSize(s) ? s : 0;
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

function tileKey(t: AttentionTiles): string {
  return `${t.BR}x${t.BC}/${t.TR}x${t.TC}`;
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
  let pipeline: GPUComputePipeline;
  let rowsPerWorkgroup: number;
  if (designOf(gpu, hd, args.design) === "rows") {
    const S = await rowsLanes(gpu, args.subgroups ?? true);
    pipeline = await gpu.pipeline(`attention forward rows hd=${hd} S=${S}`, rowsForwardWgsl(hd, S));
    rowsPerWorkgroup = S || ROWS;
  } else {
    const tiles = attentionTiles("forward", hd, gpu.limits.maxComputeWorkgroupStorageSize);
    pipeline = await gpu.pipeline(
      `attention forward tiled hd=${hd} ${tileKey(tiles)}`,
      forwardWgsl(tiles, hd),
    );
    rowsPerWorkgroup = tiles.BR;
  }
  const nqb = Math.ceil(Tq / rowsPerWorkgroup);
  const count = B * nH * nqb;
  const params = gpu.createUniform(
    new Uint32Array([Tq, Tk, qPos0, kvStride, nH, nKV, nH / nKV, nqb, count]),
    "attention forward params",
  );
  return {
    label: "attention forward",
    pipeline,
    bindGroup: gpu.bindGroup(pipeline, [args.q, args.k, args.v, args.out, args.lse, params]),
    workgroups: count,
  };
}

/**
 * Causal GQA attention backward: D = rowsum(dOut * out), then dK/dV (one owner
 * per kv head and key block, summing its query heads), then dQ. dq, dk, dv are
 * overwritten. Allocates the D buffer `[B, nH, T]` once, here.
 */
export async function attentionBackward(
  gpu: Gpu,
  args: AttentionBackwardArgs,
): Promise<Dispatch[]> {
  const { B, T, nH, nKV, hd } = args;
  checkShape("attentionBackward", { B, T, nH, nKV, hd });
  let dkvPipe: GPUComputePipeline;
  let dqPipe: GPUComputePipeline;
  let dkvRows: number;
  let dqRows: number;
  if (designOf(gpu, hd, args.design) === "rows") {
    const S = await rowsLanes(gpu, args.subgroups ?? true);
    [dkvPipe, dqPipe] = await Promise.all([
      gpu.pipeline(`attention backward dkv rows hd=${hd} S=${S}`, rowsDkvWgsl(hd, S)),
      gpu.pipeline(`attention backward dq rows hd=${hd} S=${S}`, rowsDqWgsl(hd, S)),
    ]);
    dkvRows = dqRows = S || ROWS;
  } else {
    const maxBytes = gpu.limits.maxComputeWorkgroupStorageSize;
    const dkvTiles = attentionTiles("dkv", hd, maxBytes);
    const dqTiles = attentionTiles("dq", hd, maxBytes);
    [dkvPipe, dqPipe] = await Promise.all([
      gpu.pipeline(
        `attention backward dkv tiled hd=${hd} ${tileKey(dkvTiles)}`,
        dkvWgsl(dkvTiles, hd),
      ),
      gpu.pipeline(`attention backward dq tiled hd=${hd} ${tileKey(dqTiles)}`, dqWgsl(dqTiles, hd)),
    ]);
    dkvRows = dkvTiles.BR;
    dqRows = dqTiles.BR;
  }
  const vec = hd % 4 === 0 ? 4 : 1;
  const dPipe = await gpu.pipeline(`attention backward D vec${vec}`, dWgsl(vec));
  const rows = B * T * nH;
  const D = gpu.createBuffer(rows * 4, "attention D [B, nH, T]");
  const dParams = gpu.createUniform(new Uint32Array([T, nH, hd, rows]), "attention D params");
  const group = nH / nKV;
  const nkb = Math.ceil(T / dkvRows);
  const dkvCount = B * nKV * nkb;
  const dkvParams = gpu.createUniform(
    new Uint32Array([T, nH, nKV, group, nkb, dkvCount]),
    "attention dkv params",
  );
  const nqb = Math.ceil(T / dqRows);
  const dqCount = B * nH * nqb;
  const dqParams = gpu.createUniform(
    new Uint32Array([T, nH, nKV, group, nqb, dqCount]),
    "attention dq params",
  );
  const inputs = [args.q, args.k, args.v, args.dOut, args.lse, D];
  return [
    {
      label: "attention backward D",
      pipeline: dPipe,
      bindGroup: gpu.bindGroup(dPipe, [args.dOut, args.out, D, dParams]),
      workgroups: Math.ceil(rows / D_WORKGROUP),
    },
    {
      label: "attention backward dK dV",
      pipeline: dkvPipe,
      bindGroup: gpu.bindGroup(dkvPipe, [...inputs, dkvParams, args.dk, args.dv]),
      workgroups: dkvCount,
    },
    {
      label: "attention backward dQ",
      pipeline: dqPipe,
      bindGroup: gpu.bindGroup(dqPipe, [...inputs, dqParams, args.dq]),
      workgroups: dqCount,
    },
  ];
}
