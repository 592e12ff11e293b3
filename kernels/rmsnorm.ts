/**
 * RMSNorm over rows of H: forward, forward fused with the residual add, and
 * backward with a deterministic two-stage reduction of the weight gradient.
 *
 * Forward, per row x of H values and weight w `[H]`:
 *
 *   r = 1 / sqrt(mean_j x_j^2 + eps),   y_j = x_j r w_j          (rstd[n] = r is kept)
 *
 * Backward. With xhat = x r and g = dy * w (elementwise), y = xhat * w, so
 * dw_j = sum_n dy[n,j] xhat[n,j]. For dx: r = (m + eps)^(-1/2) with
 * m = sum_k x_k^2 / H, so dr/dx_k = -r^3 x_k / H and
 *
 *   dx_k = g_k r + sum_j g_j x_j dr/dx_k = r (g_k - x_k r^2 mean_j(x_j g_j))
 *        = r (g_k - xhat_k * dot / H),   dot = sum_j g_j xhat_j.
 *
 * Layout of the work (GPU first): one workgroup per row for the forward (a
 * strided, coalesced sweep of the row, a fixed-shape tree sum in workgroup
 * memory, then the write sweep); the backward gives each workgroup a chunk of R
 * consecutive rows: per row it computes `dot` with the same tree sum, writes dx,
 * and adds dy * xhat into per-thread registers for its columns, so dy and x
 * are read once for both dx and dw. The chunk's dw partial goes to
 * `partials[j, chunk]` (column-major, so stage two reads it coalesced), and a
 * second kernel sums the chunks of column j in a fixed order (strided per
 * thread, then a tree) and adds the sum into dw[j]. No atomics: the same inputs
 * give bitwise the same outputs on the same device.
 *
 * vec4 loads when H % 4 == 0 and H >= 256 (below that, scalar lanes keep more
 * threads busy per row); the workgroup is the next power of two >= the lanes a
 * row needs, clamped to [32, 256]. On CPU drivers (the "fallback" tuning, see
 * `RmsnormTuning`) barriers dominate: 8 threads per row, vec4 whenever
 * H % 4 == 0, and 64 row chunks in the backward; measured on Mesa lavapipe,
 * 4-5x faster than the GPU layout at H = 128 and 512.
 *
 * Cost per call (f32, N rows): forward reads x (4NH bytes) and w, writes y
 * (4NH) and rstd (4N): ~8NH bytes, ~4NH FLOP. Fused add: reads x and delta,
 * writes x and y: ~16NH bytes. Backward reads dy, x (8NH), writes dx (4NH, or
 * reads and writes it when accumulating), partials 4H*chunks twice: ~12NH
 * bytes, ~10NH FLOP.
 *
 * @module
 */
import { type Binding, type Dispatch, type Gpu, LINEAR_WORKGROUP_WGSL } from "./runtime.ts";
import { kernelDispatch, type ReadPath } from "./texels.ts";

/** How a row of H is spread over a workgroup. */
interface RowShape {
  /** Elements per lane: 4 (vec4 loads) or 1. */
  vec: 1 | 4;
  /** Lanes per row: H / vec. */
  lanes: number;
  /** Workgroup size (power of two, 32..256). */
  wg: number;
  /** Lanes handled by each thread: ceil(lanes / wg). */
  per: number;
}

/**
 * Work layout: "gpu" (workgroups of 32..256 threads, ~1024 row chunks in the
 * backward) or "fallback" for CPU drivers (Mesa lavapipe), where each
 * workgroup barrier costs about as much as the loads of a short row: 8
 * threads per row (its SIMD width), vec4 whenever H allows, and 64 chunks
 * (a few per core). Same math, different summation shape.
 */
export type RmsnormTuning = "gpu" | "fallback";

/** Tuning overrides, for tests of every path. */
export interface RmsnormOptions {
  /** Force scalar (1) or vec4 (4) lanes; vec4 needs H % 4 == 0. Default: automatic. */
  vec?: 1 | 4;
  /** Default: "fallback" when `gpu.adapterSummary.isFallback`, else "gpu". */
  tuning?: RmsnormTuning;
  /** Where the read-only inputs are read (kernels/texels.ts); default `auto`: textures on CPU drivers. */
  reads?: ReadPath;
}

function tuningOf(gpu: Gpu, opts?: RmsnormOptions): RmsnormTuning {
  return opts?.tuning ?? (gpu.adapterSummary.isFallback ? "fallback" : "gpu");
}

function rowShape(H: number, tuning: RmsnormTuning, opts?: RmsnormOptions): RowShape {
  if (!Number.isInteger(H) || H < 1) throw new RangeError(`rmsnorm: bad H ${H}`);
  let vec: 1 | 4 = H % 4 === 0 && (H >= 256 || tuning === "fallback") ? 4 : 1;
  if (opts?.vec !== undefined) {
    if (opts.vec === 4 && H % 4 !== 0) throw new RangeError(`rmsnorm: vec4 needs H % 4 == 0`);
    vec = opts.vec;
  }
  const lanes = H / vec;
  let wg = tuning === "fallback" ? 8 : 32;
  while (tuning === "gpu" && wg < lanes && wg < 256) wg *= 2;
  return { vec, lanes, wg, per: Math.ceil(lanes / wg) };
}

/** A fixed-shape tree sum over the workgroup: bitwise reproducible for a given size. */
function workgroupSumWgsl(wg: number): string {
  return `
var<workgroup> red: array<f32, ${wg}>;
fn workgroup_sum(t: u32, v: f32) -> f32 {
  red[t] = v;
  workgroupBarrier();
  for (var s = ${wg / 2}u; s > 0u; s = s >> 1u) {
    if (t < s) { red[t] = red[t] + red[t + s]; }
    workgroupBarrier();
  }
  let total = red[0];
  workgroupBarrier();
  return total;
}`;
}

function header(s: RowShape, H: number): string {
  const T = s.vec === 4 ? "vec4<f32>" : "f32";
  return `${LINEAR_WORKGROUP_WGSL}
alias T = ${T};
const H: u32 = ${H}u;
const LANES: u32 = ${s.lanes}u;
const WG: u32 = ${s.wg}u;
const PER: u32 = ${s.per}u;
fn sq(v: T) -> f32 { return ${s.vec === 4 ? "dot(v, v)" : "v * v"}; }
fn hsum(v: T) -> f32 { return ${s.vec === 4 ? "dot(v, vec4<f32>(1.0))" : "v"}; }
struct Params { n: u32, eps: f32, chunks: u32, rows_per_chunk: u32 }
@group(0) @binding(0) var<uniform> p: Params;
${workgroupSumWgsl(s.wg)}`;
}

/** `f(k)` for each of a thread's lanes k < PER, joined: the kernels' unrolled per-lane code. */
function perLane(s: RowShape, f: (k: number) => string, sep = "\n  "): string {
  return Array.from({ length: s.per }, (_, k) => f(k)).join(sep);
}

function forwardWgsl(s: RowShape, H: number, fusedAdd: boolean): string {
  const xAccess = fusedAdd ? "read_write" : "read";
  return `${header(s, H)}
@group(0) @binding(1) var<storage, ${xAccess}> x: array<T>;
@group(0) @binding(2) var<storage, read> w: array<T>;
@group(0) @binding(3) var<storage, read_write> y: array<T>;
@group(0) @binding(4) var<storage, read_write> rstd: array<f32>;
${fusedAdd ? "@group(0) @binding(5) var<storage, read> delta: array<T>;" : ""}

@compute @workgroup_size(${s.wg})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) t: u32) {
  let row = linear_workgroup(wid, nwg);
  if (row >= p.n) { return; }
  let base = row * LANES;
  // Each thread's lanes c = t + k WG (k < PER), kept in registers between
  // the two sweeps (unrolled: constant indices), so x is read once.
  var ss = 0.0;
  ${
    perLane(s, (k) =>
      `let c${k} = t + ${k * s.wg}u;
  var v${k} = T(0.0);
  if (c${k} < LANES) {
    ${
        fusedAdd
          ? `v${k} = x[base + c${k}] + delta[base + c${k}];
    x[base + c${k}] = v${k};`
          : `v${k} = x[base + c${k}];`
      }
    ss += sq(v${k});
  }`)
  }
  let r = 1.0 / sqrt(workgroup_sum(t, ss) / f32(H) + p.eps);
  if (t == 0u) { rstd[row] = r; }
  ${perLane(s, (k) => `if (c${k} < LANES) { y[base + c${k}] = v${k} * r * w[c${k}]; }`)}
}`;
}

function backwardWgsl(s: RowShape, H: number, accumulateDx: boolean): string {
  // Per-thread dw accumulators for the lanes c = t + k * WG, k < PER.
  return `${header(s, H)}
@group(0) @binding(1) var<storage, read> dy: array<T>;
@group(0) @binding(2) var<storage, read> x: array<T>;
@group(0) @binding(3) var<storage, read> w: array<T>;
@group(0) @binding(4) var<storage, read> rstd: array<f32>;
@group(0) @binding(5) var<storage, read_write> dx: array<T>;
@group(0) @binding(6) var<storage, read_write> partials: array<f32>; // [H, chunks]

@compute @workgroup_size(${s.wg})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) t: u32) {
  let chunk = linear_workgroup(wid, nwg);
  if (chunk >= p.chunks) { return; }
  let row0 = chunk * p.rows_per_chunk;
  let row1 = min(row0 + p.rows_per_chunk, p.n);
  // Unrolled over k (constant indices: registers, not a private array);
  // w is the same for every row, so it is loaded once.
  ${
    perLane(s, (k) =>
      `let c${k} = t + ${k * s.wg}u;
  let in${k} = c${k} < LANES;
  let w${k} = w[min(c${k}, LANES - 1u)];
  var acc${k} = T(0.0);`)
  }
  for (var row = row0; row < row1; row++) {
    let r = rstd[row];
    let base = row * LANES;
    var d = 0.0;
    ${
    perLane(s, (k) =>
      `var g${k} = T(0.0);
    var xh${k} = T(0.0);
    if (in${k}) {
      let dyv = dy[base + c${k}];
      xh${k} = x[base + c${k}] * r;
      g${k} = dyv * w${k};
      d += hsum(g${k} * xh${k});
      acc${k} += dyv * xh${k};
    }`, "\n    ")
  }
    let dmean = workgroup_sum(t, d) / f32(H);
    ${
    perLane(s, (k) =>
      `if (in${k}) {
      let v = r * (g${k} - xh${k} * dmean);
      dx[base + c${k}] = ${accumulateDx ? `dx[base + c${k}] + v` : "v"};
    }`, "\n    ")
  }
  }
  ${
    perLane(s, (k) =>
      `if (in${k}) {
    let a = acc${k};
    ${
        s.vec === 4
          ? `for (var i = 0u; i < 4u; i++) { partials[(c${k} * 4u + i) * p.chunks + chunk] = a[i]; }`
          : `partials[c${k} * p.chunks + chunk] = a;`
      }
  }`)
  }
}`;
}

/** Stage two: dw[j] += sum over chunks of partials[j, chunk], one workgroup per column. */
const DW_WG = 64;
const dwReduceWgsl = `${LINEAR_WORKGROUP_WGSL}
struct Params { n: u32, eps: f32, chunks: u32, rows_per_chunk: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> partials: array<f32>;
@group(0) @binding(2) var<storage, read_write> dw: array<f32>;
${workgroupSumWgsl(DW_WG)}
@compute @workgroup_size(${DW_WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) t: u32) {
  let j = linear_workgroup(wid, nwg);
  if (j >= arrayLength(&dw)) { return; }
  var s = 0.0;
  for (var c = t; c < p.chunks; c += ${DW_WG}u) { s += partials[j * p.chunks + c]; }
  let total = workgroup_sum(t, s);
  if (t == 0u) { dw[j] = dw[j] + total; }
}`;

function params(gpu: Gpu, N: number, eps: number, chunks = 0, rowsPerChunk = 0): GPUBuffer {
  const data = new ArrayBuffer(16);
  new Uint32Array(data).set([N, 0, chunks, rowsPerChunk]);
  new Float32Array(data)[1] = eps;
  return gpu.createUniform(new Uint32Array(data), "rmsnorm params");
}

function checkRows(N: number, H: number): void {
  if (!Number.isInteger(N) || N < 0) throw new RangeError(`rmsnorm: bad N ${N}`);
  if (!Number.isInteger(H) || H < 1) throw new RangeError(`rmsnorm: bad H ${H}`);
}

/** Arguments of `rmsnormForward` (and, with `delta`, of `addRmsnormForward`). */
export interface RmsnormForwardArgs {
  /** `[N, H]` input rows (the residual stream; updated in place by the fused add). */
  x: Binding;
  /** `[H]` weight. */
  w: Binding;
  /** `[N, H]` output, overwritten. */
  y: Binding;
  /** `[N]` 1 / rms of each row, kept for the backward. */
  rstd: Binding;
  /** Rows. */
  N: number;
  /** Row length (hidden size). */
  H: number;
  /** Added to mean(x^2) under the square root. */
  eps: number;
  /** Tuning overrides (tests of both designs). */
  options?: RmsnormOptions;
}

/**
 * RMSNorm forward: y `[N, H]` = x * rstd * w, rstd `[N]` = 1 / sqrt(mean(x^2) + eps).
 *
 * @example
 * ```ts ignore
 * const d = await rmsnormForward(gpu, { x, w, y, rstd, N: 4096, H: 512, eps: 1e-5 });
 * gpu.submit((enc) => recordDispatches(gpu, enc, d));
 * ```
 */
export function rmsnormForward(gpu: Gpu, args: RmsnormForwardArgs): Promise<Dispatch> {
  return forward(gpu, args, undefined);
}

/**
 * Residual add fused with RMSNorm: x += delta (in place, x is the residual
 * stream), then y = rmsnorm(x) with rstd as in `rmsnormForward`.
 */
export function addRmsnormForward(
  gpu: Gpu,
  args: RmsnormForwardArgs & { delta: Binding },
): Promise<Dispatch> {
  return forward(gpu, args, args.delta);
}

/** Both forwards: the fused residual add when `delta` is given (bound last). */
function forward(
  gpu: Gpu,
  args: RmsnormForwardArgs,
  delta: Binding | undefined,
): Promise<Dispatch> {
  const { N, H } = args;
  checkRows(N, H);
  const s = rowShape(H, tuningOf(gpu, args.options), args.options);
  const fused = delta !== undefined;
  const name = fused ? "add+rmsnorm forward" : "rmsnorm forward";
  const u = params(gpu, N, args.eps);
  const bindings = [u, args.x, args.w, args.y, args.rstd];
  return kernelDispatch(gpu, {
    label: `${name} N=${N} H=${H}`,
    key: `rmsnorm-${fused ? "add-" : ""}fwd-H${H}-v${s.vec}-wg${s.wg}`,
    wgsl: forwardWgsl(s, H, fused),
    bindings: fused ? [...bindings, delta] : bindings,
    workgroups: N,
    owned: [u],
    // The fused add writes x back: only delta and w can come from textures.
    textureReads: fused ? { delta: N * H, w: H } : { x: N * H, w: H },
    reads: args.options?.reads,
  });
}

/**
 * Rows per chunk of the backward's dw reduction: about 1024 chunks keep a GPU
 * busy in stage one while stage two stays small; 64 on a CPU driver. Fixed by
 * N and the tuning, so the summation order (and the bits of dw) depend only on
 * the shape and the device.
 */
function rowsPerChunk(N: number, tuning: RmsnormTuning): number {
  return Math.max(1, Math.ceil(N / (tuning === "gpu" ? 1024 : 64)));
}

/**
 * RMSNorm backward: dx `[N, H]` (overwritten, or added to when `accumulateDx`)
 * and dw `[H]` (always ADDED to, so gradients accumulate across calls), from
 * dy, x, w and the forward's rstd. Two dispatches: dx with per-chunk dw
 * partials, then the fixed-order sum of the partials into dw.
 */
export async function rmsnormBackward(
  gpu: Gpu,
  args: {
    dy: Binding;
    x: Binding;
    w: Binding;
    rstd: Binding;
    dx: Binding;
    dw: Binding;
    N: number;
    H: number;
    accumulateDx: boolean;
    options?: RmsnormOptions;
  },
): Promise<Dispatch[]> {
  const { N, H } = args;
  checkRows(N, H);
  const tuning = tuningOf(gpu, args.options);
  const s = rowShape(H, tuning, args.options);
  const rpc = rowsPerChunk(N, tuning);
  const chunks = Math.ceil(N / rpc);
  const partials = gpu.createBuffer(Math.max(1, chunks) * H * 4, "rmsnorm dw partials [H, chunks]");
  const u = params(gpu, N, 0, chunks, rpc);
  const p2 = await gpu.pipeline("rmsnorm-dw-reduce", dwReduceWgsl);
  const dwBinding: Binding = args.dw instanceof GPUBuffer
    ? { buffer: args.dw, size: H * 4 }
    : { ...args.dw, size: H * 4 };
  return [
    await kernelDispatch(gpu, {
      label: `rmsnorm backward dx N=${N} H=${H}`,
      key: `rmsnorm-bwd-H${H}-v${s.vec}-wg${s.wg}-acc${args.accumulateDx ? 1 : 0}`,
      wgsl: backwardWgsl(s, H, args.accumulateDx),
      bindings: [u, args.dy, args.x, args.w, args.rstd, args.dx, partials],
      workgroups: chunks,
      owned: [u, partials],
      textureReads: { dy: N * H, x: N * H, w: H, rstd: N },
      reads: args.options?.reads,
    }),
    {
      label: `rmsnorm backward dw H=${H}`,
      pipeline: p2,
      bindGroup: gpu.bindGroup(p2, [u, partials, dwBinding]),
      workgroups: chunks > 0 ? H : 0,
    },
  ];
}
