/**
 * Cross-entropy over the vocabulary fused with its gradient, with a per-token
 * loss mask and a step-wide scale; probabilities are never stored.
 *
 * Per row i of logits `[N, V]` with target t_i, mask weight m_i and the scale
 * c = scale[0] (1 / the number of masked-in targets of the whole step):
 *
 *   lse_i       = log sum_v exp(z_iv)
 *   rowLoss[i]  = m_i (lse_i - z_{i,t_i})
 *   dlogits[i,v] = c m_i (exp(z_iv - lse_i) - [v = t_i])     (d loss / d z_iv)
 *   loss[0]    += c sum_i rowLoss[i]
 *
 * One workgroup per row (256 threads; 8 on CPU drivers). Sweep one keeps a
 * running (max, sum) per thread, the online-softmax trick: on a new max M',
 * sum' = sum exp(M - M') + exp(z - M'), so the row is read once for both and
 * no exp overflows; the per-thread pairs are merged by a fixed-shape tree in
 * workgroup memory (the same merge rule), giving lse = M + log(sum). Sweep two writes dlogits; the row is read a
 * second time (from cache on a GPU: 25 KiB at V = 6400). dlogits may be the
 * logits buffer itself (in place, which the model uses to save a [N, V]
 * buffer): each thread overwrites only the elements it read itself, after
 * the tree, and the target logit is read before the first barrier.
 * Rows with m_i = 0 skip the softmax and write zeros (SFT prompts are free).
 * A second, one-workgroup dispatch sums rowLoss in a fixed order (strided per
 * thread, then a tree) and ADDS c times it to loss[0]: the caller clears loss
 * at the start of a step, and micro-batches of gradient accumulation add up.
 * A target outside [0, V) on a masked-in row gives a NaN loss, so the
 * trainer's non-finite-loss check stops the run rather than training on a
 * wrong gradient (the data pipeline checks ids first).
 *
 * vec4 lanes when V % 4 == 0 (6400 is), else scalars. dlogits may be
 * written in rows padded beyond V (`dlogitsStride`, zeros after V): the
 * training model does so on CPU drivers for an odd V, so that the head's
 * backward matmuls can read d logits as vec4s from textures.
 * With scalar lanes into such padded rows, sweep two writes 4 elements of d
 * logits with one vec4 store, each computed as the scalar sweep would
 * (llvmpipe runs each store as a loop over the lanes; the tiny step's
 * cross-entropy went from 38 to 35 ms).
 * Cost per call (f32): reads logits twice and writes dlogits: 12NV bytes
 * (8NV when the second read hits cache), about 6NV FLOP and 2NV exps (one
 * per element per sweep) plus one per lane in sweep one for the rescale.
 *
 * @module
 */
import { type Binding, type Dispatch, type Gpu, LINEAR_WORKGROUP_WGSL } from "./runtime.ts";
import { kernelDispatch, type ReadPath } from "./texels.ts";

/**
 * Work layout: "gpu" (256 threads per row) or "fallback" for CPU drivers
 * (Mesa lavapipe), where each workgroup barrier costs about as much as the
 * loads of a short row: 8 threads per row (its SIMD width).
 */
export type CrossEntropyTuning = "gpu" | "fallback";

/** Tuning overrides, for tests of every path. */
export interface CrossEntropyOptions {
  /** Force scalar (1) or vec4 (4) lanes; vec4 needs V % 4 == 0. Default: vec4 when it can. */
  vec?: 1 | 4;
  /** Default: "fallback" when `gpu.adapterSummary.isFallback`, else "gpu". */
  tuning?: CrossEntropyTuning;
  /**
   * Scalar lanes into d logits rows a multiple of 4 wide (out of place): write
   * 4 elements a store (default true; the same values either way).
   */
  store4?: boolean;
  /**
   * Where logits and the mask are read (kernels/texels.ts); default `auto`:
   * textures on CPU drivers. In place, logits stay in their buffer.
   */
  reads?: ReadPath;
}

/** Threads of the one-workgroup loss sum (a fixed shape: part of the summation order). */
const LOSS_WG = 256;

function bufferOf(b: Binding): { buffer: GPUBuffer; offset: number } {
  return b instanceof GPUBuffer
    ? { buffer: b, offset: 0 }
    : { buffer: b.buffer, offset: b.offset ?? 0 };
}

/**
 * Sweep two with scalar lanes into rows of vec4s (`store4`): each thread
 * writes 4 consecutive elements of d logits with one store (on llvmpipe
 * every store is a loop over the SIMD lanes, so this does a quarter of
 * them), each computed exactly as the scalar sweep computes it; padding
 * columns are zeros.
 */
function vec4Sweep(): string {
  const parts = [0, 1, 2, 3].map((k) => `
    var d${k} = 0.0;
    let e${k} = c * 4u + ${k}u;
    if (e${k} < V) {
      d${k} = exp(logits[base + e${k}] - lse) * coef;
      if (tgt == e${k}) { d${k} -= coef; }
    }`);
  return `for (var c = t; c < D_LANES / 4u; c += WG) {${parts.join("")}
    dlogits[dbase / 4u + c] = vec4<f32>(d0, d1, d2, d3);
  }`;
}

function rowWgsl(
  V: number,
  vec: 1 | 4,
  inPlace: boolean,
  WG: number,
  dStride: number,
  store4: boolean,
): string {
  const T = vec === 4 ? "vec4<f32>" : "f32";
  const lanes = V / vec;
  // dlogits rows are dStride elements apart; the lanes past V are padding, written as zeros.
  const dLanes = dStride / vec;
  // Where dlogits go (the logits array itself in place).
  const D = inPlace ? "logits" : "dlogits";
  const pad = dLanes > lanes && !store4
    ? `for (var c = LANES + t; c < D_LANES; c += WG) { ${D}[dbase + c] = T(0.0); }`
    : "";
  const zeros = store4
    ? `for (var c = t; c < D_LANES / 4u; c += WG) { dlogits[dbase / 4u + c] = vec4<f32>(0.0); }`
    : `for (var c = t; c < D_LANES; c += WG) { ${D}[dbase + c] = T(0.0); }`;
  const sweepTwo = store4 ? vec4Sweep() : `for (var c = t; c < LANES; c += WG) {
    var d = exp(logits[base + c] - lse) * coef;
    ${vec === 4 ? "if (tgt / 4u == c) { d[tgt % 4u] -= coef; }" : "if (tgt == c) { d -= coef; }"}
    ${D}[dbase + c] = d;
  }`;
  return `${LINEAR_WORKGROUP_WGSL}
alias T = ${T};
const V: u32 = ${V}u;
const LANES: u32 = ${lanes}u;
const D_LANES: u32 = ${dLanes}u;
const WG: u32 = ${WG}u;
const LOWEST: f32 = -3.0e38;  // finite, so exp(LOWEST - m) is 0, never NaN
struct Params { n: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, ${inPlace ? "read_write" : "read"}> logits: array<T>; // [N, V]
@group(0) @binding(2) var<storage, read> targets: array<u32>; // [N]
@group(0) @binding(3) var<storage, read> mask: array<f32>;    // [N]
@group(0) @binding(4) var<storage, read> scale: array<f32>;   // [1]
@group(0) @binding(5) var<storage, read_write> rowLoss: array<f32>; // [N]
${
    inPlace
      ? ""
      : `@group(0) @binding(6) var<storage, read_write> dlogits: array<${
        store4 ? "vec4<f32>" : "T"
      }>; // [N, dStride]`
  }

var<workgroup> red_m: array<f32, ${WG}>;
var<workgroup> red_s: array<f32, ${WG}>;
var<workgroup> row_mask: f32;

fn lane_max(v: T) -> f32 { return ${vec === 4 ? "max(max(v.x, v.y), max(v.z, v.w))" : "v"}; }
fn lane_sum(v: T) -> f32 { return ${vec === 4 ? "(v.x + v.y) + (v.z + v.w)" : "v"}; }

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) t: u32) {
  let row = linear_workgroup(wid, nwg);
  if (row >= p.n) { return; }
  let base = row * LANES;
  let dbase = row * D_LANES;
  if (t == 0u) { row_mask = mask[row]; }
  let mk = workgroupUniformLoad(&row_mask);
  if (mk == 0.0) {
    ${zeros}
    if (t == 0u) { rowLoss[row] = 0.0; }
    return;
  }
  let tgt = targets[row];
  var target_logit = 0.0;
  if (t == 0u) {
    if (tgt < V) {
      target_logit = ${vec === 4 ? "logits[base + tgt / 4u][tgt % 4u]" : "logits[base + tgt]"};
    } else {
      target_logit = bitcast<f32>(0x7fc00000u + min(tgt, 0u)); // NaN, built at run time
    }
  }
  var m = LOWEST;
  var s = 0.0;
  for (var c = t; c < LANES; c += WG) {
    let v = logits[base + c];
    let mn = max(m, lane_max(v));
    s = s * exp(m - mn) + lane_sum(exp(v - mn));
    m = mn;
  }
  red_m[t] = m;
  red_s[t] = s;
  workgroupBarrier();
  for (var k = WG / 2u; k > 0u; k = k >> 1u) {
    if (t < k) {
      let m1 = red_m[t];
      let m2 = red_m[t + k];
      let mn = max(m1, m2);
      red_s[t] = red_s[t] * exp(m1 - mn) + red_s[t + k] * exp(m2 - mn);
      red_m[t] = mn;
    }
    workgroupBarrier();
  }
  let lse = red_m[0] + log(red_s[0]);
  let coef = scale[0] * mk;
  if (t == 0u) { rowLoss[row] = mk * (lse - target_logit); }
  ${sweepTwo}
  ${pad}
}`;
}

const lossWgsl = `
struct Params { n: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> rowLoss: array<f32>;
@group(0) @binding(2) var<storage, read> scale: array<f32>;
@group(0) @binding(3) var<storage, read_write> loss: array<f32>;
var<workgroup> red: array<f32, ${LOSS_WG}>;
@compute @workgroup_size(${LOSS_WG})
fn main(@builtin(local_invocation_index) t: u32) {
  var s = 0.0;
  for (var i = t; i < p.n; i += ${LOSS_WG}u) { s += rowLoss[i]; }
  red[t] = s;
  workgroupBarrier();
  for (var k = ${LOSS_WG / 2}u; k > 0u; k = k >> 1u) {
    if (t < k) { red[t] = red[t] + red[t + k]; }
    workgroupBarrier();
  }
  if (t == 0u) { loss[0] = loss[0] + scale[0] * red[0]; }
}`;

/**
 * Fused masked cross-entropy and its gradient: rowLoss `[N]` (mask-weighted),
 * dlogits `[N, V]` (may be `logits` itself: in place), then loss[0] +=
 * scale[0] * sum(rowLoss). targets `[N]` u32 (or non-negative i32), mask `[N]`
 * f32 weights, scale a 1-float buffer the caller writes each step.
 *
 * @example
 * ```ts ignore
 * const ds = await crossEntropy(gpu, {
 *   logits, targets, mask, scale, dlogits: logits, rowLoss, loss, N: 4096, V: 6400,
 * });
 * ```
 */
export async function crossEntropy(
  gpu: Gpu,
  args: {
    logits: Binding;
    targets: Binding;
    mask: Binding;
    scale: Binding;
    dlogits: Binding;
    rowLoss: Binding;
    loss: Binding;
    N: number;
    V: number;
    /**
     * Elements between rows of dlogits (default V; not in place): padded
     * rows, their columns V.. written as zeros (the head's backward matmuls
     * read rows a multiple of 4 wide).
     */
    dlogitsStride?: number;
    options?: CrossEntropyOptions;
  },
): Promise<Dispatch[]> {
  const { N, V } = args;
  const dStride = args.dlogitsStride ?? V;
  if (!Number.isInteger(N) || N < 0) throw new RangeError(`crossEntropy: bad N ${N}`);
  if (!Number.isInteger(V) || V < 1) throw new RangeError(`crossEntropy: bad V ${V}`);
  let vec: 1 | 4 = V % 4 === 0 ? 4 : 1;
  if (args.options?.vec !== undefined) {
    if (args.options.vec === 4 && V % 4 !== 0) {
      throw new RangeError("crossEntropy: vec4 needs V % 4 == 0");
    }
    vec = args.options.vec;
  }
  const a = bufferOf(args.logits);
  const d = bufferOf(args.dlogits);
  const inPlace = a.buffer === d.buffer;
  if (inPlace && a.offset !== d.offset) {
    throw new RangeError("crossEntropy: dlogits overlaps logits at another offset");
  }
  if (!Number.isInteger(dStride) || dStride < V || (inPlace && dStride !== V)) {
    throw new RangeError(
      `crossEntropy: dlogitsStride ${dStride} must be an integer >= V (${V}), and V in place`,
    );
  }
  if (vec === 4 && dStride % 4 !== 0) {
    if (args.options?.vec === 4) {
      throw new RangeError(`crossEntropy: vec4 needs dlogitsStride % 4 == 0 (got ${dStride})`);
    }
    vec = 1;
  }
  const tuning = args.options?.tuning ?? (gpu.adapterSummary.isFallback ? "fallback" : "gpu");
  // Scalar lanes into padded rows: d logits written 4 elements a store.
  const store4 = vec === 1 && !inPlace && dStride % 4 === 0 && args.options?.store4 !== false;
  const wg = tuning === "gpu" ? 256 : 8;
  const u = gpu.createUniform(new Uint32Array([N]), "cross-entropy params");
  const rowBindings: Binding[] = [
    u,
    args.logits,
    args.targets,
    args.mask,
    args.scale,
    args.rowLoss,
  ];
  if (!inPlace) rowBindings.push(args.dlogits);
  const lossPipeline = await gpu.pipeline("cross-entropy-loss-sum", lossWgsl);
  return [
    await kernelDispatch(gpu, {
      label: `cross-entropy rows N=${N} V=${V}`,
      key: `cross-entropy-V${V}-v${vec}-wg${wg}-${inPlace ? "inplace" : "out"}-d${dStride}${
        store4 ? "-s4" : ""
      }`,
      wgsl: rowWgsl(V, vec, inPlace, wg, dStride, store4),
      bindings: rowBindings,
      workgroups: N,
      owned: [u],
      textureReads: inPlace ? { mask: N } : { logits: N * V, mask: N },
      reads: args.options?.reads,
    }),
    {
      label: `cross-entropy loss sum N=${N}`,
      pipeline: lossPipeline,
      bindGroup: gpu.bindGroup(
        lossPipeline,
        [u, args.rowLoss, args.scale, args.loss],
        "cross-entropy loss sum",
      ),
      workgroups: N > 0 ? 1 : 0,
    },
  ];
}
