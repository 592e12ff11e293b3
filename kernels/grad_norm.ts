/**
 * Global gradient L2 norm (squared) and the clipping factor, on the GPU and
 * deterministic.
 *
 *   total = sum over tensors k, entries i of g_ki^2
 *   scale = maxNorm > 0 ? min(1, maxNorm / (sqrt(total) + 1e-6)) : 1
 *
 * (PyTorch's `clip_grad_norm_` factor; the optimizer multiplies gradients by
 * `scale` as it reads them, so no pass rewrites them and nothing crosses to
 * the CPU.)
 *
 * Stage one: per tensor, one workgroup per block of 4096 entries writes the
 * block's sum of squares to `partials` (each of 256 threads sums 16 entries
 * strided by the workgroup size, coalesced, then a fixed-shape tree in
 * workgroup memory; 8 threads of 512 entries on CPU drivers).
 * Tensor k's blocks go to a fixed slice of `partials`, in order. Stage two:
 * one workgroup sums all partials in a fixed order (strided, then a tree) and
 * writes total[0]. No atomics, so the bits of the norm depend only on the
 * gradients and the tensor list. vec4 loads when a tensor's size is a multiple
 * of 4 (blocks are 4096 entries either way, so the partial layout is the same).
 * Cost: reads every gradient once (4 bytes per parameter), 2 FLOP per entry.
 *
 * @module
 */
import { type Binding, type Dispatch, type Gpu, LINEAR_WORKGROUP_WGSL } from "./runtime.ts";
import { kernelDispatch, type ReadPath } from "./texels.ts";

/** Entries per stage-one block (and per partial), whatever the tuning. */
const BLOCK = 4096;
/** Threads of the final one-workgroup sum. */
const FINAL_WG = 256;

/**
 * Work layout of stage one: "gpu" (256 threads per block, 16 entries each) or
 * "fallback" for CPU drivers (Mesa lavapipe), where each workgroup barrier
 * costs about as much as hundreds of loads: 8 threads per block (its SIMD
 * width), 512 entries each. The partial layout is the same.
 */
export type GradNormTuning = "gpu" | "fallback";

/** A gradient tensor: its buffer, first entry and entry count. */
export interface GradTensor {
  buffer: GPUBuffer;
  /** First float (default 0); times 4 must suit the device's storage offset alignment. */
  offset?: number;
  n: number;
}

/** The float count of the `partials` buffer `gradNormSquared` needs for `tensors`. */
export function gradNormPartialsSize(tensors: readonly { n: number }[]): number {
  let size = 0;
  for (const t of tensors) size += Math.ceil(t.n / BLOCK);
  return size;
}

/** A fixed-shape tree sum over a workgroup of `wg` threads. */
function treeWgsl(wg: number): string {
  return `
var<workgroup> red: array<f32, ${wg}>;
fn workgroup_sum(t: u32, v: f32) -> f32 {
  red[t] = v;
  workgroupBarrier();
  for (var k = ${wg / 2}u; k > 0u; k = k >> 1u) {
    if (t < k) { red[t] = red[t] + red[t + k]; }
    workgroupBarrier();
  }
  return red[0];
}`;
}

function blockWgsl(vec: 1 | 4, WG: number): string {
  const T = vec === 4 ? "vec4<f32>" : "f32";
  const perThread = BLOCK / vec / WG;
  return `${LINEAR_WORKGROUP_WGSL}
struct Params { n: u32, offset: u32 }  // entries of this tensor, first partial slot
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> g: array<${T}>;
@group(0) @binding(2) var<storage, read_write> partials: array<f32>;
${treeWgsl(WG)}
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) t: u32) {
  let b = linear_workgroup(wid, nwg);
  let lanes = ${vec === 4 ? "p.n / 4u" : "p.n"};
  if (b * ${BLOCK / vec}u >= lanes) { return; }
  var s = 0.0;
  for (var k = 0u; k < ${perThread}u; k++) {
    let i = b * ${BLOCK / vec}u + k * ${WG}u + t;
    if (i < lanes) {
      let v = g[i];
      s += ${vec === 4 ? "dot(v, v)" : "v * v"};
    }
  }
  let total = workgroup_sum(t, s);
  if (t == 0u) { partials[p.offset + b] = total; }
}`;
}

const finalWgsl = `
struct Params { count: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> partials: array<f32>;
@group(0) @binding(2) var<storage, read_write> total: array<f32>;
${treeWgsl(FINAL_WG)}
@compute @workgroup_size(${FINAL_WG})
fn main(@builtin(local_invocation_index) t: u32) {
  var s = 0.0;
  for (var i = t; i < p.count; i += ${FINAL_WG}u) { s += partials[i]; }
  let sum = workgroup_sum(t, s);
  if (t == 0u) { total[0] = sum; }
}`;

/**
 * Sum of squares of all gradient entries into total[0] (overwritten), in two
 * deterministic stages. `partials` holds at least `gradNormPartialsSize(tensors)`
 * floats. Returns one dispatch per tensor, then the final sum.
 *
 * @example
 * ```ts ignore
 * const partials = gpu.createBuffer(gradNormPartialsSize(grads) * 4, "grad-norm partials");
 * const ds = await gradNormSquared(gpu, { tensors: grads, partials, total });
 * ```
 */
export async function gradNormSquared(
  gpu: Gpu,
  args: {
    tensors: GradTensor[];
    partials: Binding;
    total: Binding;
    /** Default: "fallback" when `gpu.adapterSummary.isFallback`, else "gpu". */
    tuning?: GradNormTuning;
    /** Where the gradients are read (kernels/texels.ts); default `auto`. */
    reads?: ReadPath;
  },
): Promise<Dispatch[]> {
  const tuning = args.tuning ?? (gpu.adapterSummary.isFallback ? "fallback" : "gpu");
  const wg = tuning === "gpu" ? 256 : 8;
  const final = await gpu.pipeline("grad-norm-final", finalWgsl);
  const dispatches: Dispatch[] = [];
  let offset = 0;
  for (const [k, t] of args.tensors.entries()) {
    const first = t.offset ?? 0;
    if (!Number.isInteger(t.n) || t.n < 0 || (first + t.n) * 4 > t.buffer.size) {
      throw new RangeError(`gradNormSquared: tensor ${k} has a bad size ${t.n}`);
    }
    if (t.n === 0) continue;
    const vec = t.n % 4 === 0 ? 4 : 1;
    const u = gpu.createUniform(new Uint32Array([t.n, offset]), "grad-norm params");
    const g: Binding = { buffer: t.buffer, offset: first * 4, size: t.n * 4 };
    const blocks = Math.ceil(t.n / BLOCK);
    dispatches.push(
      await kernelDispatch(gpu, {
        label: `grad-norm block sums tensor ${k} n=${t.n}`,
        key: `grad-norm-block-v${vec}-wg${wg}`,
        wgsl: blockWgsl(vec, wg),
        bindings: [u, g, args.partials],
        workgroups: blocks,
        owned: [u],
        // The gradients, from a texture on CPU drivers (kernels/texels.ts).
        textureReads: { g: t.n },
        reads: args.reads,
      }),
    );
    offset += blocks;
  }
  const u = gpu.createUniform(new Uint32Array([offset]), "grad-norm final params");
  dispatches.push({
    label: `grad-norm final sum of ${offset} partials`,
    pipeline: final,
    bindGroup: gpu.bindGroup(final, [u, args.partials, args.total]),
    workgroups: 1,
    owned: [u],
  });
  return dispatches;
}

/** Where the clip threshold sits in the optimizer's hyperparameter buffer (`adamwHyper`). */
export const CLIP_THRESHOLD_INDEX = 9;

const clipWgsl = `
@group(0) @binding(0) var<storage, read> hyper: array<f32>;
@group(0) @binding(1) var<storage, read> total: array<f32>;
@group(0) @binding(2) var<storage, read_write> scale: array<f32>;
@compute @workgroup_size(1)
fn main() {
  let max_norm = hyper[${CLIP_THRESHOLD_INDEX}];
  var s = 1.0;
  if (max_norm > 0.0) { s = min(1.0, max_norm / (sqrt(total[0]) + 1e-6)); }
  scale[0] = s;
}`;

/**
 * The clipping factor on the GPU: scale[0] = maxNorm > 0 ?
 * min(1, maxNorm / (sqrt(total[0]) + 1e-6)) : 1, where total[0] is the sum of
 * squares from `gradNormSquared` and maxNorm is float `CLIP_THRESHOLD_INDEX`
 * of `hyper` (the buffer `adamwHyper` fills: the threshold is written with
 * the step's other settings, so one prepared dispatch serves any threshold).
 * maxNorm 0 turns clipping off.
 */
export async function clipScale(
  gpu: Gpu,
  args: { total: Binding; hyper: Binding; scale: Binding },
): Promise<Dispatch> {
  const pipeline = await gpu.pipeline("grad-norm-clip-scale", clipWgsl);
  return {
    label: "clip scale",
    pipeline,
    bindGroup: gpu.bindGroup(pipeline, [args.hyper, args.total, args.scale]),
    workgroups: 1,
  };
}
