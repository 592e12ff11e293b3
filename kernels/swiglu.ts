/**
 * SwiGLU, the MLP's gate: h = silu(gate) * up, elementwise over `[N, I]`.
 *
 * With s = sigmoid(g) = 1 / (1 + e^-g) and silu(g) = g s:
 *
 *   silu'(g) = s + g s (1 - s) = s (1 + g (1 - s))
 *   dgate = dh * up * silu'(g),   dup = dh * silu(g)
 *
 * 1 / (1 + exp(-g)) is safe at both ends in f32: exp(-g) overflows to +inf for
 * g < -88, giving s = 0 (not NaN), and underflows to 0 for large g, giving 1.
 *
 * One invocation per vec4 when n % 4 == 0 (else per element), 256 per
 * workgroup; counts beyond 65535 workgroups go over a 2-D grid.
 * Cost per call (f32, n elements): forward reads 8n bytes, writes 4n (~5n FLOP
 * plus n exp); backward reads 12n, writes 8n (~9n FLOP plus n exp).
 *
 * @module
 */
import { type Binding, type Dispatch, type Gpu, LINEAR_WORKGROUP_WGSL } from "./runtime.ts";

const WG = 256;

function checkN(n: number): void {
  if (!Number.isInteger(n) || n < 0) throw new RangeError(`swiglu: bad element count ${n}`);
}

/**
 * A kernel with one invocation per lane i < p.count (a vec4 or a scalar):
 * \`buffers\` bound from 1 on (after the uniform), \`body\` run for lane i with
 * \`g = gate[i]\` loaded.
 */
function laneKernelWgsl(vec: 1 | 4, buffers: string, body: string): string {
  return `${LINEAR_WORKGROUP_WGSL}
alias T = ${vec === 4 ? "vec4<f32>" : "f32"};
struct Params { count: u32 }  // lanes (vec4 or scalars)
@group(0) @binding(0) var<uniform> p: Params;
fn sigmoid(g: T) -> T { return 1.0 / (1.0 + exp(-g)); }
fn lane(wid: vec3u, nwg: vec3u, lid: u32) -> u32 {
  return linear_workgroup(wid, nwg) * ${WG}u + lid;
}
${buffers}
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let i = lane(wid, nwg, lid);
  if (i >= p.count) { return; }
  let g = gate[i];
  ${body}
}`;
}

function forwardWgsl(vec: 1 | 4): string {
  return laneKernelWgsl(
    vec,
    `@group(0) @binding(1) var<storage, read> gate: array<T>;
@group(0) @binding(2) var<storage, read> up: array<T>;
@group(0) @binding(3) var<storage, read_write> h: array<T>;`,
    `h[i] = g * sigmoid(g) * up[i];`,
  );
}

function backwardWgsl(vec: 1 | 4): string {
  return laneKernelWgsl(
    vec,
    `@group(0) @binding(1) var<storage, read> dh: array<T>;
@group(0) @binding(2) var<storage, read> gate: array<T>;
@group(0) @binding(3) var<storage, read> up: array<T>;
@group(0) @binding(4) var<storage, read_write> dgate: array<T>;
@group(0) @binding(5) var<storage, read_write> dup: array<T>;`,
    `let d = dh[i];
  let s = sigmoid(g);
  dgate[i] = d * up[i] * s * (1.0 + g * (1.0 - s));
  dup[i] = d * g * s;`,
  );
}

/** Tuning overrides, for tests of both load paths. */
export interface SwigluOptions {
  /** Force scalar (1) or vec4 (4) lanes; vec4 needs n % 4 == 0. Default: vec4 when it can. */
  vec?: 1 | 4;
}

/**
 * SwiGLU forward: h = silu(gate) * up over n elements (h may not alias the inputs).
 *
 * @example
 * ```ts ignore
 * const d = await swigluForward(gpu, { gate, up, h, n: 4096 * 1408 });
 * ```
 */
export function swigluForward(
  gpu: Gpu,
  args: { gate: Binding; up: Binding; h: Binding; n: number; options?: SwigluOptions },
): Promise<Dispatch> {
  return laneDispatch(gpu, "forward", args.n, args.options?.vec, [args.gate, args.up, args.h]);
}

/** SwiGLU backward: dgate and dup (overwritten) from dh, gate and up. */
export function swigluBackward(
  gpu: Gpu,
  args: {
    dh: Binding;
    gate: Binding;
    up: Binding;
    dgate: Binding;
    dup: Binding;
    n: number;
    options?: SwigluOptions;
  },
): Promise<Dispatch> {
  return laneDispatch(gpu, "backward", args.n, args.options?.vec, [
    args.dh,
    args.gate,
    args.up,
    args.dgate,
    args.dup,
  ]);
}

/** One lane per vec4 when n % 4 == 0 (or as `force` says), else per element. */
async function laneDispatch(
  gpu: Gpu,
  direction: "forward" | "backward",
  n: number,
  force: 1 | 4 | undefined,
  buffers: Binding[],
): Promise<Dispatch> {
  checkN(n);
  let vec: 1 | 4 = n % 4 === 0 ? 4 : 1;
  if (force !== undefined) {
    if (force === 4 && n % 4 !== 0) throw new RangeError("swiglu: vec4 needs n % 4 == 0");
    vec = force;
  }
  const count = n / vec;
  const u = gpu.createUniform(new Uint32Array([count]), "swiglu params");
  const pipeline = direction === "forward"
    ? await gpu.pipeline(`swiglu-fwd-v${vec}`, forwardWgsl(vec))
    : await gpu.pipeline(`swiglu-bwd-v${vec}`, backwardWgsl(vec));
  return {
    label: `swiglu ${direction} n=${n}`,
    pipeline,
    bindGroup: gpu.bindGroup(pipeline, [u, ...buffers], `swiglu ${direction}`),
    workgroups: Math.ceil(count / WG),
    owned: [u],
  };
}
