/**
 * Fused AdamW step, in place on a parameter tensor and its two moments, in
 * PyTorch's order (decoupled weight decay first):
 *
 *   g  = grad * gradScale[0]                 (the global-norm clip factor)
 *   p -= lr * wd * p                         (only for tensors with decay)
 *   m  = b1 m + (1 - b1) g
 *   v  = b2 v + (1 - b2) g^2
 *   p -= lr * (m / bc1) / (sqrt(v / bc2) + eps),   bc1 = 1 - b1^t, bc2 = 1 - b2^t
 *
 * The per-step scalars are read from a small storage buffer (`hyper`, written
 * by the caller each step with `adamwHyper`) and the clip factor from another
 * (`gradScale`, written on the GPU by `clipScale`), so the dispatch is built
 * once and nothing crosses to the CPU. The bias corrections and 1 - beta are
 * computed in float64 on the CPU and rounded once: in f32, 1 - b2 with
 * b2 = f32(0.999) is 1.2e-5 off relative to 0.001, and 1 - 0.999^t would lose
 * most of its digits early on.
 *
 * One invocation per vec4 when n % 4 == 0 (else per element).
 * Cost per call (f32, n entries): reads p, g, m, v and writes p, m, v: 28n
 * bytes, ~15n FLOP and n sqrts.
 *
 * @module
 */
import { type Binding, type Dispatch, type Gpu, LINEAR_WORKGROUP_WGSL } from "./runtime.ts";
import { kernelDispatch, type ReadPath } from "./texels.ts";

const WG = 256;

/**
 * The float count of the buffer `adamwHyper` fills (`hyper` must hold at
 * least this): ten settings, padded to whole vec4s (the kernel reads them as
 * three vec4 loads).
 */
export const ADAMW_HYPER_FLOATS = 12;

/** The hyper-parameters of one AdamW step; `step` counts from 1. */
export interface AdamWHyperParams {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  step: number;
  /** Global-norm clipping threshold read by `clipScale` (0 = off; default 0). */
  gradClip?: number;
}

/**
 * The contents of the `hyper` buffer for one step: `[lr, beta1, beta2, eps,
 * weightDecay, 1 - beta1^step, 1 - beta2^step, 1 - beta1, 1 - beta2, gradClip]`
 * as f32, everything derived computed in float64 and rounded once. The clip
 * threshold rides along for `clipScale` (kernels/grad_norm.ts), so one buffer
 * carries all of an optimizer step's settings.
 *
 * @example
 * ```ts
 * import { adamwHyper } from "./adamw.ts";
 * const h = adamwHyper({
 *   lr: 1e-3,
 *   beta1: 0.9,
 *   beta2: 0.999,
 *   eps: 1e-8,
 *   weightDecay: 0.1,
 *   step: 1,
 * });
 * console.assert(Math.abs(h[6] - 0.001) < 1e-9);
 * ```
 */
export function adamwHyper(o: AdamWHyperParams): Float32Array {
  if (!(Number.isInteger(o.step) && o.step >= 1)) {
    throw new RangeError(`adamwHyper: step must be an integer >= 1, got ${o.step}`);
  }
  if (!((o.gradClip ?? 0) >= 0)) {
    throw new RangeError(`adamwHyper: gradClip must be >= 0 (0 = off), got ${o.gradClip}`);
  }
  return new Float32Array([
    o.lr,
    o.beta1,
    o.beta2,
    o.eps,
    o.weightDecay,
    1 - Math.pow(o.beta1, o.step),
    1 - Math.pow(o.beta2, o.step),
    1 - o.beta1,
    1 - o.beta2,
    o.gradClip ?? 0,
    0,
    0,
  ]);
}

function adamwWgsl(vec: 1 | 4, decay: boolean): string {
  const T = vec === 4 ? "vec4<f32>" : "f32";
  return `${LINEAR_WORKGROUP_WGSL}
struct Params { count: u32 }  // lanes (vec4 or scalars)
@group(0) @binding(0) var<uniform> u: Params;
@group(0) @binding(1) var<storage, read_write> param: array<${T}>;
@group(0) @binding(2) var<storage, read> grad: array<${T}>;
@group(0) @binding(3) var<storage, read_write> m: array<${T}>;
@group(0) @binding(4) var<storage, read_write> v: array<${T}>;
// [lr, beta1, beta2, eps, weightDecay, 1 - beta1^t, 1 - beta2^t, 1 - beta1, 1 - beta2, gradClip]
// as vec4s (three loads, not ten; padded to whole vec4s).
@group(0) @binding(5) var<storage, read> hyper: array<vec4f>;
@group(0) @binding(6) var<storage, read> gradScale: array<f32>;
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let i = linear_workgroup(wid, nwg) * ${WG}u + lid;
  if (i >= u.count) { return; }
  let h0 = hyper[0];
  let h1 = hyper[1];
  let h2 = hyper[2];
  let lr = h0.x;
  let b1 = h0.y;
  let b2 = h0.z;
  let g = grad[i] * gradScale[0];
  var p = param[i];
  ${decay ? "p -= lr * h1.x * p;" : ""}
  let mi = b1 * m[i] + h1.w * g;
  let vi = b2 * v[i] + h2.x * g * g;
  m[i] = mi;
  v[i] = vi;
  param[i] = p - lr * (mi / h1.y) / (sqrt(vi / h1.z) + h0.w);
}`;
}

/** Tuning overrides, for tests of both load paths. */
export interface AdamWOptions {
  /** Force scalar (1) or vec4 (4) lanes; vec4 needs n % 4 == 0. Default: vec4 when it can. */
  vec?: 1 | 4;
  /**
   * Where grad, hyper and gradScale are read (kernels/texels.ts); default
   * `auto`: textures on CPU drivers. param, m and v are updated in place and
   * read from their buffers.
   */
  reads?: ReadPath;
}

/**
 * One fused AdamW step over n entries of param, grad, m, v (each its own
 * buffer). `decay` selects decoupled weight decay (matrices) or none (norm
 * weights). `hyper` holds `adamwHyper(...)` (written by the caller each step),
 * `gradScale` one float (the clip factor, 1 without clipping).
 *
 * @example
 * ```ts ignore
 * const d = await adamw(gpu, { param, grad, m, v, n, decay: true, hyper, gradScale });
 * gpu.write(hyper, adamwHyper({ lr, beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1, step }));
 * ```
 */
export function adamw(
  gpu: Gpu,
  args: {
    param: Binding;
    grad: Binding;
    m: Binding;
    v: Binding;
    n: number;
    decay: boolean;
    hyper: Binding;
    gradScale: Binding;
    options?: AdamWOptions;
  },
): Promise<Dispatch> {
  const { n } = args;
  if (!Number.isInteger(n) || n < 0) throw new RangeError(`adamw: bad n ${n}`);
  let vec: 1 | 4 = n % 4 === 0 ? 4 : 1;
  if (args.options?.vec !== undefined) {
    if (args.options.vec === 4 && n % 4 !== 0) throw new RangeError("adamw: vec4 needs n % 4 == 0");
    vec = args.options.vec;
  }
  const count = n / vec;
  const u = gpu.createUniform(new Uint32Array([count]), "adamw params");
  const hyper: Binding = args.hyper instanceof GPUBuffer
    ? { buffer: args.hyper, size: ADAMW_HYPER_FLOATS * 4 }
    : { ...args.hyper, size: ADAMW_HYPER_FLOATS * 4 };
  return kernelDispatch(gpu, {
    label: `adamw n=${n}${args.decay ? " decay" : ""}`,
    key: `adamw-v${vec}-${args.decay ? "decay" : "nodecay"}`,
    wgsl: adamwWgsl(vec, args.decay),
    bindings: [u, args.param, args.grad, args.m, args.v, hyper, args.gradScale],
    workgroups: Math.ceil(count / WG),
    owned: [u],
    textureReads: { grad: n, hyper: ADAMW_HYPER_FLOATS, gradScale: 1 },
    reads: args.options?.reads,
  });
}
