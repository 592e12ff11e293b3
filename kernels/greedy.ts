/**
 * `greedyAdvance`: the greedy choice on the GPU, so that several decode steps
 * run in one submit (each readback costs a fixed ~11 ms in Deno's WebGPU,
 * which polls mapped buffers every 10 ms). One workgroup finds
 * t = argmax(logits) (lowest index on a tie: the CPU's `argmax`), then
 * writes tokens[p + 1] = t, ids[0] = t and pos[0] = p + 1, so the next
 * step's dispatches embed t at position p + 1. Reads V floats once.
 *
 * @module
 */
import type { Dispatch, Gpu } from "./runtime.ts";

/** Arguments of `greedyAdvance`. */
export interface GreedyAdvanceArgs {
  /** `[V]`: the logits predicting position pos + 1. */
  logits: GPUBuffer;
  /** `u32[>= 1]`: ids[0] becomes the chosen token. */
  ids: GPUBuffer;
  /** `u32[1]`: the position p of the step that made the logits; becomes p + 1. */
  pos: GPUBuffer;
  /** `u32[capacity]`: tokens[p + 1] = the chosen token (ignored past the end). */
  tokens: GPUBuffer;
  V: number;
  capacity: number;
}

const ARGMAX_WG = 256;

const ARGMAX_WGSL = `
struct Params { V: u32, capacity: u32 }
@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read_write> ids: array<u32>;
@group(0) @binding(2) var<storage, read_write> pos: array<u32>;
@group(0) @binding(3) var<storage, read_write> tokens: array<u32>;
@group(0) @binding(4) var<uniform> params: Params;

var<workgroup> bestValue: array<f32, ${ARGMAX_WG}>;
var<workgroup> bestIndex: array<u32, ${ARGMAX_WG}>;

@compute @workgroup_size(${ARGMAX_WG})
fn main(@builtin(local_invocation_index) lid: u32) {
  // Each invocation scans a strided slice; on a tie the lower index wins, in
  // the scan and in the tree, so the result is the first maximum. NaN never
  // compares greater, as in the CPU argmax.
  var bv = -3.4028235e38;
  var bi = 0xffffffffu;
  for (var i = lid; i < params.V; i += ${ARGMAX_WG}u) {
    let v = logits[i];
    if (v > bv || (v == bv && i < bi)) { bv = v; bi = i; }
  }
  bestValue[lid] = bv;
  bestIndex[lid] = bi;
  workgroupBarrier();
  for (var s = ${ARGMAX_WG / 2}u; s > 0u; s = s / 2u) {
    if (lid < s) {
      let v = bestValue[lid + s];
      let i = bestIndex[lid + s];
      if (v > bestValue[lid] || (v == bestValue[lid] && i < bestIndex[lid])) {
        bestValue[lid] = v;
        bestIndex[lid] = i;
      }
    }
    workgroupBarrier();
  }
  if (lid == 0u) {
    let t = select(bestIndex[0], 0u, bestIndex[0] == 0xffffffffu); // all NaN / -inf: token 0
    let p = pos[0] + 1u;
    if (p < params.capacity) { tokens[p] = t; }
    ids[0] = t;
    pos[0] = p;
  }
}`;

/**
 * The greedy token from `logits` into `tokens[pos + 1]` and `ids[0]`, and
 * pos += 1: what chains decode steps on the GPU without a readback.
 */
export async function greedyAdvance(gpu: Gpu, args: GreedyAdvanceArgs): Promise<Dispatch> {
  for (const [name, v] of Object.entries({ V: args.V, capacity: args.capacity })) {
    if (!Number.isInteger(v) || v < 1) {
      throw new RangeError(`greedyAdvance: ${name} = ${v} is not >= 1`);
    }
  }
  const pipeline = await gpu.pipeline("greedy advance", ARGMAX_WGSL);
  const params = gpu.createUniform(
    new Uint32Array([args.V, args.capacity]),
    "greedy advance params",
  );
  return {
    label: `greedy advance V=${args.V}`,
    pipeline,
    bindGroup: gpu.bindGroup(pipeline, [args.logits, args.ids, args.pos, args.tokens, params]),
    workgroups: 1,
    owned: [params],
  };
}
