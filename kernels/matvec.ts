/**
 * Matrix-vector product for decoding one token: `y[N] = W[N, K] x[K]`
 * (the forward of a linear layer with a Hugging Face `[out, in]` weight, for
 * one row: `matmulXWt` with M = 1).
 *
 * Why not `matmulXWt` at M = 1: its tiles cover many rows of x (32 on the
 * CPU driver, 64 on GPUs), so at M = 1 almost all of each tile's work is
 * wasted and there are only N / tile workgroups; decoding is a pass over the
 * weights, bound by their loads, so the kernel that wins is the one that
 * reads each weight once with coalesced loads and spreads the rows over
 * many workgroups.
 *
 * Two designs, both reading each weight once and summing in a fixed order
 * (no atomics: the same inputs give bitwise the same outputs):
 *
 * - "split" (GPUs): a workgroup of 64 invocations owns 4 consecutive output
 *   rows; the invocations stride over k together (invocation i reads element
 *   i of each 64-element step of vec4s), so each row is read with coalesced
 *   loads and each x chunk serves all 4 rows; the 64 partial sums of each
 *   row are added by a fixed tree in workgroup memory.
 * - "rows" (Mesa's CPU driver, where barriers are costly and SIMD lanes are
 *   invocations): each invocation owns 4 rows and walks k alone, one x load
 *   per 4 weight loads, no workgroup memory. Measured on lavapipe at
 *   K=512, N=6400: 3.6 ms (3.7 GB/s) against 13.5 ms for "split" and
 *   12.6 ms for `matmulXWt` at M = 1.
 *
 * FLOP per call 2 N K; bytes 4 (N K + K + N) (the weights dominate).
 *
 * @module
 */
import { type Binding, type Dispatch, type Gpu, LINEAR_WORKGROUP_WGSL } from "./runtime.ts";

/** Which kernel design runs (default: "rows" on fallback adapters, else "split"). */
export type MatvecDesign = "split" | "rows";

const WG = 64;
const ROWS = 4;

/** What both designs bind: x `[K]` and W `[N, K]` as arrays of `T`, y `[N]`. */
function bindingsWgsl(T: string): string {
  return `${LINEAR_WORKGROUP_WGSL}
struct Params { K: u32, N: u32 }
@group(0) @binding(0) var<storage, read> x: array<${T}>;
@group(0) @binding(1) var<storage, read> w: array<${T}>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> params: Params;`;
}

function splitWgsl(vec: 1 | 4): string {
  const T = vec === 4 ? "vec4<f32>" : "f32";
  const dot = vec === 4 ? "dot(a, b)" : "a * b";
  return `${bindingsWgsl(T)}

var<workgroup> partial: array<vec4<f32>, ${WG}>;

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let row0 = linear_workgroup(wid, nwg) * ${ROWS}u;
  let Kv = params.K / ${vec}u; // K in units of ${T}
  var acc = vec4<f32>(0.0);
  for (var k = lid; k < Kv; k += ${WG}u) {
    let a = x[k];
    for (var r = 0u; r < ${ROWS}u; r++) {
      let n = row0 + r;
      if (n < params.N) {
        let b = w[n * Kv + k];
        acc[r] += ${dot};
      }
    }
  }
  partial[lid] = acc;
  workgroupBarrier();
  for (var half = ${WG / 2}u; half > 0u; half = half / 2u) {
    if (lid < half) { partial[lid] += partial[lid + half]; }
    workgroupBarrier();
  }
  if (lid < ${ROWS}u && row0 + lid < params.N) { y[row0 + lid] = partial[0][lid]; }
}`;
}

function rowsWgsl(vec: 1 | 4): string {
  const T = vec === 4 ? "vec4<f32>" : "f32";
  const sum = vec === 4 ? "(v.x + v.y) + (v.z + v.w)" : "v";
  return `${bindingsWgsl(T)}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let row0 = (linear_workgroup(wid, nwg) * ${WG}u + lid) * ${ROWS}u;
  if (row0 >= params.N) { return; }
  let Kv = params.K / ${vec}u;
  // Rows past N re-read the last row (no branch in the inner loop) and are not stored.
  let last = min(row0 + ${ROWS}u, params.N) - 1u;
  var acc: array<${T}, ${ROWS}>;
  for (var k = 0u; k < Kv; k++) {
    let a = x[k];
    for (var r = 0u; r < ${ROWS}u; r++) {
      acc[r] += a * w[min(row0 + r, last) * Kv + k];
    }
  }
  for (var r = 0u; r < ${ROWS}u; r++) {
    if (row0 + r < params.N) {
      let v = acc[r];
      y[row0 + r] = ${sum};
    }
  }
}`;
}

/**
 * `y[N] = W[N, K] x[K]`: `matmulXWt` for one row of x, reading each weight
 * once. `y` must not alias `x` or `w`.
 */
export async function matvecXWt(
  gpu: Gpu,
  args: {
    x: Binding;
    w: Binding;
    y: Binding;
    K: number;
    N: number;
    /** Force a design (tests run both on any adapter). */
    design?: MatvecDesign;
    /** Force scalar loads (1) where vec4 (the default when K % 4 == 0) would do. */
    vec?: 1 | 4;
  },
): Promise<Dispatch> {
  const { K, N } = args;
  for (const [name, v] of Object.entries({ K, N })) {
    if (!Number.isInteger(v) || v < 1) throw new RangeError(`matvec: ${name} = ${v} is not >= 1`);
  }
  const vec = args.vec ?? (K % 4 === 0 ? 4 : 1);
  if (vec === 4 && K % 4 !== 0) throw new RangeError(`matvec: vec4 loads need K % 4 == 0 (K=${K})`);
  const design = args.design ?? (gpu.adapterSummary.isFallback ? "rows" : "split");
  const pipeline = await gpu.pipeline(
    `matvec ${design} vec${vec}`,
    design === "rows" ? rowsWgsl(vec) : splitWgsl(vec),
  );
  const params = gpu.createUniform(new Uint32Array([K, N]), "matvec params");
  return {
    label: `matvec ${design} K=${K} N=${N} vec${vec}`,
    pipeline,
    bindGroup: gpu.bindGroup(pipeline, [args.x, args.w, args.y, params]),
    workgroups: design === "rows" ? Math.ceil(N / ROWS / WG) : Math.ceil(N / ROWS),
    owned: [params],
  };
}
