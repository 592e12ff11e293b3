/**
 * Column slices of a row-major matrix, for low-rank adapters on fused
 * projections. The model computes q|k|v (and gate|up) with one matmul into one
 * `[N, ld]` buffer; an adapter on q alone owns the columns `[off, off + w)`.
 * The adapter's own products run on the ordinary matmul kernels over a
 * contiguous `[N, w]` buffer, and these two kernels move it in and out:
 *
 *   columnsAddScaled:    y[n, off + j] += s * u[n, j]     (forward: the delta into the slice)
 *   columnsGatherScaled: d[n, j]        = s * y[n, off + j]  (backward: the slice of dY, scaled)
 *
 * for n < N, j < w. One invocation per element, 256 per workgroup; counts
 * beyond 65535 workgroups go over a 2-D grid. Each output element is one
 * multiply-add of values it alone reads: no reduction, so bitwise
 * deterministic. Cost per call: 12 N w bytes (add) or 8 N w (gather), 2 N w
 * FLOP.
 *
 * @module
 */
import { type Binding, type Dispatch, type Gpu, LINEAR_WORKGROUP_WGSL } from "./runtime.ts";

const WG = 256;

/** A column slice `[off, off + width)` of a row-major `[N, ld]` matrix. */
export interface ColumnSlice {
  /** Rows. */
  N: number;
  /** Floats per row of the full matrix. */
  ld: number;
  /** First column of the slice. */
  off: number;
  /** Columns in the slice. */
  width: number;
}

function kernelWgsl(body: string): string {
  return `${LINEAR_WORKGROUP_WGSL}
struct Params { count: u32, width: u32, ld: u32, off: u32, scale: f32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let i = linear_workgroup(wid, nwg) * ${WG}u + lid;
  if (i >= p.count) { return; }
  let n = i / p.width;
  let j = i - n * p.width;
  let wide = n * p.ld + p.off + j;  // element (n, off + j) of the [N, ld] matrix
  ${body}
}`;
}

const ADD_WGSL = kernelWgsl(`dst[wide] = dst[wide] + p.scale * src[i];`);
const GATHER_WGSL = kernelWgsl(`dst[i] = p.scale * src[wide];`);

function checkSlice(s: ColumnSlice, what: string): void {
  const { N, ld, off, width } = s;
  for (const [name, v] of Object.entries({ N, ld, off, width })) {
    if (!Number.isInteger(v) || v < 0) throw new RangeError(`${what}: bad ${name} ${v}`);
  }
  if (s.off + s.width > s.ld) {
    throw new RangeError(
      `${what}: columns [${s.off}, ${s.off + s.width}) exceed the row of ${s.ld}`,
    );
  }
}

async function sliceDispatch(
  gpu: Gpu,
  kind: "add" | "gather",
  s: ColumnSlice,
  scale: number,
  src: Binding,
  dst: Binding,
): Promise<Dispatch> {
  const what = kind === "add" ? "columnsAddScaled" : "columnsGatherScaled";
  checkSlice(s, what);
  const count = s.N * s.width;
  const raw = new ArrayBuffer(32);
  new Uint32Array(raw, 0, 4).set([count, Math.max(1, s.width), s.ld, s.off]);
  new Float32Array(raw, 16, 1)[0] = scale;
  const u = gpu.createUniform(new Uint32Array(raw), `${what} params`);
  const pipeline = await gpu.pipeline(
    `lora-columns-${kind}`,
    kind === "add" ? ADD_WGSL : GATHER_WGSL,
  );
  return {
    label: `${what} N=${s.N} ld=${s.ld} cols ${s.off}+${s.width}`,
    pipeline,
    bindGroup: gpu.bindGroup(pipeline, [u, src, dst], what),
    workgroups: Math.max(1, Math.ceil(count / WG)),
    owned: [u],
  };
}

/**
 * `y[n, off + j] += scale * u[n, j]`: adds `u` `[N, width]` into a column
 * slice of `y` `[N, ld]` (the adapter's delta into its part of a fused
 * projection).
 *
 * @example
 * ```ts ignore
 * // q's columns of the fused q|k|v output get the adapter's delta.
 * const d = await columnsAddScaled(gpu, { u: delta, y: qkv, N, ld: qkvDim, off: 0, width: qDim, scale: 2 });
 * ```
 */
export function columnsAddScaled(
  gpu: Gpu,
  args: ColumnSlice & { u: Binding; y: Binding; scale: number },
): Promise<Dispatch> {
  return sliceDispatch(gpu, "add", args, args.scale, args.u, args.y);
}

/**
 * `d[n, j] = scale * y[n, off + j]`: copies a column slice of `y` `[N, ld]`
 * into the contiguous `d` `[N, width]`, scaled (the adapter's share of a fused
 * projection's output gradient).
 */
export function columnsGatherScaled(
  gpu: Gpu,
  args: ColumnSlice & { y: Binding; d: Binding; scale: number },
): Promise<Dispatch> {
  return sliceDispatch(gpu, "gather", args, args.scale, args.y, args.d);
}

// ---------------------------------------------------------------------------
// Dropout on the adapter's input.

/**
 * The dropout state a step writes (a 16-byte storage buffer): the step's
 * seed, the drop threshold `round(p 2^32)` and the kept values' scale
 * `1 / (1 - p)`; `[0, 0, 1]` turns dropout off (evaluation).
 */
export function dropoutState(seed: number, p: number): Uint32Array {
  const raw = new ArrayBuffer(16);
  const u = new Uint32Array(raw);
  u[0] = seed >>> 0;
  u[1] = p > 0 ? Math.min(0xffffffff, Math.round(p * 2 ** 32)) : 0;
  new Float32Array(raw)[2] = p > 0 ? 1 / (1 - p) : 1;
  return u;
}

/** lowbias32 (Chris Wellons' integer hash): a bijection on u32 with good avalanche. */
function hash32(x: number): number {
  let h = x >>> 0;
  h ^= h >>> 16;
  h = Math.imul(h, 0x7feb352d) >>> 0;
  h ^= h >>> 15;
  h = Math.imul(h, 0x846ca68b) >>> 0;
  h ^= h >>> 16;
  return h >>> 0;
}

/**
 * Whether element `i` of dropout stream `stream` survives under `state`
 * (the CPU twin of the kernel's test): `hash(i ^ hash(seed + stream *
 * 0x9e3779b9)) >= threshold`. Streams keep the sites' masks independent.
 */
export function dropoutKeeps(state: Uint32Array, stream: number, i: number): boolean {
  const key = hash32((state[0] + Math.imul(stream, 0x9e3779b9)) >>> 0);
  return hash32((i ^ key) >>> 0) >= state[1];
}

function dropoutWgsl(accumulate: boolean): string {
  return `${LINEAR_WORKGROUP_WGSL}
struct Params { count: u32, stream: u32 }
struct State { seed: u32, threshold: u32, scale: f32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> state: State;
@group(0) @binding(2) var<storage, read> src: array<f32>;
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;
fn hash32(x: u32) -> u32 {
  var h = x;
  h ^= h >> 16u; h *= 0x7feb352du; h ^= h >> 15u; h *= 0x846ca68bu; h ^= h >> 16u;
  return h;
}
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let i = linear_workgroup(wid, nwg) * ${WG}u + lid;
  if (i >= p.count) { return; }
  let key = hash32(state.seed + p.stream * 0x9e3779b9u);
  var v = 0.0;
  if (hash32(i ^ key) >= state.threshold) { v = src[i] * state.scale; }
  ${accumulate ? "dst[i] = dst[i] + v;" : "dst[i] = v;"}
}`;
}

/**
 * Inverted dropout with a mask from `state` (see `dropoutState`):
 * `dst[i] (+)= keep(i) ? src[i] / (1 - p) : 0` for i < count. The mask is a
 * hash of (seed, stream, i), so the backward recomputes the forward's mask
 * instead of storing it (same seed and stream: same mask, bit for bit).
 */
export async function dropoutApply(
  gpu: Gpu,
  args: {
    src: Binding;
    dst: Binding;
    state: Binding;
    count: number;
    stream: number;
    accumulate: boolean;
  },
): Promise<Dispatch> {
  const { count, stream } = args;
  if (!Number.isInteger(count) || count < 0) {
    throw new RangeError(`dropoutApply: bad count ${count}`);
  }
  const u = gpu.createUniform(new Uint32Array([count, stream >>> 0]), "dropout params");
  const pipeline = await gpu.pipeline(
    `lora-dropout-${args.accumulate ? "acc" : "set"}`,
    dropoutWgsl(args.accumulate),
  );
  return {
    label: `dropout n=${count} stream ${stream}`,
    pipeline,
    bindGroup: gpu.bindGroup(pipeline, [u, args.state, args.src, args.dst], "dropout"),
    workgroups: Math.max(1, Math.ceil(count / WG)),
    owned: [u],
  };
}
