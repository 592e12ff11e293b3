/**
 * Rotary position embedding (RoPE), rotate-half convention of Hugging Face
 * Llama and MiniMind: in each head, dimension i < hd/2 is paired with
 * i + hd/2 and the pair is rotated by the angle a = p * theta^(-2i/hd), where
 * p = pos0 + t is the token's position:
 *
 *   forward:  y[i] = x[i] cos a - x[i + hd/2] sin a,   y[i + hd/2] = x[i + hd/2] cos a + x[i] sin a
 *   backward: the rotation is orthogonal, so dx = R(a)^T dy = R(-a) dy (same kernel, sin negated).
 *
 * Both run in place on x `[B, T, nHeads, hd]`. The angles come from a table of
 * cos/sin `[T, hd/2, 2]` computed in float64 on the CPU and rounded once to
 * float32: computing them in f32 on the GPU would be wrong at large positions
 * (f32 `pow(theta, -2i/hd)` carries a relative error of ~1e-7, times
 * p = 32767 gives ~3e-3 rad, and an f32 angle near 32767 is itself only
 * representable to half an ulp, 2^-10 ~ 1e-3 rad, before sin/cos see it).
 * The table depends only on (theta, hd, pos0, T), so all layers and q/k share
 * one buffer (cached per device).
 *
 * Cost per call: reads and writes every element once plus one table entry
 * per (t, i): 8 * B*T*nHeads*hd + 4 * T*hd bytes; 3 FLOP per element.
 */
import { type Dispatch, type Gpu, LINEAR_WORKGROUP_WGSL } from "./runtime.ts";

/** Shape and positions of a RoPE call, the same for the forward and its backward. */
export interface RopeShape {
  /** Batch size. */
  B: number;
  /** Sequence length. */
  T: number;
  /** Heads in the tensor (query or key/value heads). */
  nHeads: number;
  /** Head dimension (even). */
  hd: number;
  /** RoPE base (`rope_theta`: 1e4 Llama, 1e6 MiniMind). */
  theta: number;
  /** Position of token t = 0 (default 0); token t sits at pos0 + t. */
  pos0?: number;
}

/** Arguments of `ropeForward`: x `[B, T, nHeads, hd]` is rotated in place. */
export interface RopeArgs extends RopeShape {
  /** `[B, T, nHeads, hd]`, rotated in place. */
  x: GPUBuffer;
}

/** Arguments of `ropeBackward`: dx `[B, T, nHeads, hd]` (the gradient w.r.t. the output) in place. */
export interface RopeBackwardArgs extends RopeShape {
  /** `[B, T, nHeads, hd]`: dL/d(rotated x) in, dL/dx out (in place). */
  dx: GPUBuffer;
}

const WORKGROUP = 64;

const ROPE_WGSL = `${LINEAR_WORKGROUP_WGSL}
struct Params { nHeads: u32, half: u32, count: u32, T: u32 }
@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read> table: array<vec2f>; // [T, half] (cos, sin)
@group(0) @binding(2) var<uniform> params: Params;
override SIGN: f32 = 1.0; // +1 forward, -1 backward (rotation by -a)

@compute @workgroup_size(${WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  // One invocation per rotated pair (row, i); row = (b, t, h).
  let e = linear_workgroup(wid, nwg) * ${WORKGROUP}u + lid;
  if (e >= params.count) { return; }
  let half = params.half;
  let row = e / half;
  let i = e - row * half;
  let t = (row / params.nHeads) % params.T;
  let cs = table[t * half + i];
  let s = SIGN * cs.y;
  let base = row * 2u * half + i;
  let x1 = x[base];
  let x2 = x[base + half];
  x[base] = x1 * cs.x - x2 * s;
  x[base + half] = x2 * cs.x + x1 * s;
}`;

const tables = new WeakMap<Gpu, Map<string, GPUBuffer>>();

/**
 * The cos/sin table `[T, hd/2]` of (cos a, sin a) for positions pos0..pos0+T-1,
 * computed in float64 (`a = p * theta^(-2i/hd)`, as the reference does) and
 * cached per device.
 */
export function ropeTable(gpu: Gpu, T: number, hd: number, theta: number, pos0 = 0): GPUBuffer {
  let perGpu = tables.get(gpu);
  if (!perGpu) tables.set(gpu, perGpu = new Map());
  const key = `${T}/${hd}/${theta}/${pos0}`;
  let buf = perGpu.get(key);
  if (!buf) {
    const half = hd / 2;
    // Whole texels (16 bytes), so that kernels can read it from a texture (kernels/texels.ts).
    const data = new Float32Array(Math.ceil((T * half * 2) / 4) * 4);
    for (let t = 0; t < T; t++) {
      const p = pos0 + t;
      for (let i = 0; i < half; i++) {
        const a = p * Math.pow(theta, -2 * i / hd);
        data[(t * half + i) * 2] = Math.cos(a);
        data[(t * half + i) * 2 + 1] = Math.sin(a);
      }
    }
    buf = gpu.createBuffer(data, `rope table T=${T} hd=${hd} theta=${theta} pos0=${pos0}`);
    perGpu.set(key, buf);
  }
  return buf;
}

function check(B: number, T: number, nHeads: number, hd: number, theta: number, pos0: number) {
  for (const [name, v] of Object.entries({ B, T, nHeads, hd, pos0 })) {
    if (!Number.isInteger(v) || v < 0) throw new RangeError(`rope: ${name} = ${v} is not a count`);
  }
  if (hd % 2 !== 0) throw new RangeError(`rope: head_dim ${hd} must be even`);
  if (!(theta > 0)) throw new RangeError(`rope: theta ${theta} must be positive`);
}

async function rope(
  gpu: Gpu,
  x: GPUBuffer,
  a: RopeShape,
  sign: 1 | -1,
): Promise<Dispatch> {
  const pos0 = a.pos0 ?? 0;
  check(a.B, a.T, a.nHeads, a.hd, a.theta, pos0);
  const half = a.hd / 2;
  const count = a.B * a.T * a.nHeads * half;
  const pipeline = await gpu.pipeline("rope", ROPE_WGSL, "main", { SIGN: sign });
  const params = gpu.createUniform(
    new Uint32Array([a.nHeads, half, count, Math.max(1, a.T)]),
    "rope params",
  );
  const table = ropeTable(gpu, Math.max(1, a.T), a.hd, a.theta, pos0);
  return {
    label: sign > 0 ? "rope forward" : "rope backward",
    pipeline,
    bindGroup: gpu.bindGroup(pipeline, [x, table, params]),
    workgroups: Math.ceil(count / WORKGROUP),
    // The table is shared (cached per device, freed with it); the uniform is this dispatch's.
    owned: [params],
  };
}

/** RoPE forward, in place on x `[B, T, nHeads, hd]` (rotate-half; token t at position pos0 + t). */
export function ropeForward(gpu: Gpu, args: RopeArgs): Promise<Dispatch> {
  return rope(gpu, args.x, args, 1);
}

/** RoPE backward, in place on dx `[B, T, nHeads, hd]`: rotation of the gradient by -angle. */
export function ropeBackward(gpu: Gpu, args: RopeBackwardArgs): Promise<Dispatch> {
  return rope(gpu, args.dx, args, -1);
}
