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
 * gate and up come fused, `gateUp [N, 2I]` (row n: gate then up), as the one
 * matmul with the stacked `[Wgate; Wup]` writes them; the backward writes
 * their gradients in the same layout for the fused backward matmuls.
 *
 * One invocation per vec4 when I % 4 == 0 (else per element), 256 per
 * workgroup; counts beyond 65535 workgroups go over a 2-D grid.
 * Cost per call (f32, n = N I elements): forward reads 8n bytes, writes 4n
 * (~5n FLOP plus n exp); backward reads 12n, writes 8n (~9n FLOP plus n exp).
 *
 * @module
 */
import { type Binding, type Dispatch, type Gpu, LINEAR_WORKGROUP_WGSL } from "./runtime.ts";
import { kernelDispatch, type ReadPath } from "./texels.ts";

const WG = 256;

function checkShape(N: number, I: number): void {
  for (const [name, v] of Object.entries({ N, I })) {
    if (!Number.isInteger(v) || v < 0) throw new RangeError(`swiglu: bad ${name} ${v}`);
  }
}

/**
 * A kernel with one invocation per lane i < p.count (a vec4 or a scalar) of
 * the `[N, I]` output: \`buffers\` bound from 1 on (after the uniform),
 * \`body\` run with \`g\` and \`u\`, lane i's gate and up, loaded from the
 * fused `gateUp` row (gate at `gu`, up at `gu + p.width`).
 */
function laneKernelWgsl(vec: 1 | 4, buffers: string, body: string): string {
  return `${LINEAR_WORKGROUP_WGSL}
alias T = ${vec === 4 ? "vec4<f32>" : "f32"};
struct Params { count: u32, width: u32 }  // lanes; lanes per row of I
@group(0) @binding(0) var<uniform> p: Params;
fn sigmoid(g: T) -> T { return 1.0 / (1.0 + exp(-g)); }
${buffers}
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let i = linear_workgroup(wid, nwg) * ${WG}u + lid;
  if (i >= p.count) { return; }
  let row = i / p.width;
  let gu = i + row * p.width;  // row * 2 width + (i - row * width)
  let g = gateUp[gu];
  let u = gateUp[gu + p.width];
  ${body}
}`;
}

function forwardWgsl(vec: 1 | 4): string {
  return laneKernelWgsl(
    vec,
    `@group(0) @binding(1) var<storage, read> gateUp: array<T>;
@group(0) @binding(2) var<storage, read_write> h: array<T>;`,
    `h[i] = g * sigmoid(g) * u;`,
  );
}

function backwardWgsl(vec: 1 | 4): string {
  return laneKernelWgsl(
    vec,
    `@group(0) @binding(1) var<storage, read> dh: array<T>;
@group(0) @binding(2) var<storage, read> gateUp: array<T>;
@group(0) @binding(3) var<storage, read_write> dGateUp: array<T>;`,
    `let d = dh[i];
  let s = sigmoid(g);
  dGateUp[gu] = d * u * s * (1.0 + g * (1.0 - s));
  dGateUp[gu + p.width] = d * g * s;`,
  );
}

/** Tuning overrides, for tests of both load paths. */
export interface SwigluOptions {
  /** Force scalar (1) or vec4 (4) lanes; vec4 needs I % 4 == 0. Default: vec4 when it can. */
  vec?: 1 | 4;
  /** Where gate|up and dh are read (kernels/texels.ts); default `auto`: textures on CPU drivers. */
  reads?: ReadPath;
}

/**
 * SwiGLU forward: h `[N, I]` = silu(gate) * up, where row n of `gateUp`
 * `[N, 2I]` is gate (I floats) then up (I floats): the output of the fused
 * `[Wgate; Wup]` projection. h may not alias the input.
 *
 * @example
 * ```ts ignore
 * const d = await swigluForward(gpu, { gateUp, h, N: 4096, I: 1408 });
 * ```
 */
export function swigluForward(
  gpu: Gpu,
  args: { gateUp: Binding; h: Binding; N: number; I: number; options?: SwigluOptions },
): Promise<Dispatch> {
  return laneDispatch(gpu, "forward", args.N, args.I, args.options, [args.gateUp, args.h]);
}

/** SwiGLU backward: `dGateUp` `[N, 2I]` (overwritten, the fused layout) from dh `[N, I]` and gateUp. */
export function swigluBackward(
  gpu: Gpu,
  args: {
    dh: Binding;
    gateUp: Binding;
    dGateUp: Binding;
    N: number;
    I: number;
    options?: SwigluOptions;
  },
): Promise<Dispatch> {
  return laneDispatch(gpu, "backward", args.N, args.I, args.options, [
    args.dh,
    args.gateUp,
    args.dGateUp,
  ]);
}

/** One lane per vec4 when I % 4 == 0 (or as `options.vec` says), else per element. */
function laneDispatch(
  gpu: Gpu,
  direction: "forward" | "backward",
  N: number,
  I: number,
  options: SwigluOptions | undefined,
  buffers: Binding[],
): Promise<Dispatch> {
  checkShape(N, I);
  const force = options?.vec;
  let vec: 1 | 4 = I % 4 === 0 ? 4 : 1;
  if (force !== undefined) {
    if (force === 4 && I % 4 !== 0) throw new RangeError("swiglu: vec4 needs I % 4 == 0");
    vec = force;
  }
  const width = I / vec;
  const count = N * width;
  const u = gpu.createUniform(new Uint32Array([count, Math.max(1, width)]), "swiglu params");
  const forward = direction === "forward";
  return kernelDispatch(gpu, {
    label: `swiglu ${direction} N=${N} I=${I}`,
    key: `swiglu-${forward ? "fwd" : "bwd"}-v${vec}`,
    wgsl: forward ? forwardWgsl(vec) : backwardWgsl(vec),
    bindings: [u, ...buffers],
    workgroups: Math.ceil(count / WG),
    owned: [u],
    // gate|up first: the slot the forward used, so the recomputing forward's copy serves (PassRecorder).
    textureReads: forward ? { gateUp: N * 2 * I } : { gateUp: N * 2 * I, dh: N * I },
    reads: options?.reads,
  });
}
