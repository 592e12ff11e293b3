/**
 * Token embedding: lookup and a deterministic backward without float atomics.
 *
 * Forward: out[n, :] = weight[ids[n], :] for weight `[V, H]`, ids `[N]`.
 * Backward: dWeight[v, :] += sum over n with ids[n] = v of dOut[n, :].
 *
 * Several positions share a token, so a scatter-add per position would need
 * float atomics, whose summation order (and so the bits of the result) varies
 * run to run. Instead the CPU, which has the ids anyway, groups the positions
 * by token (`groupByToken`: a stable counting sort, O(N + V)), and the GPU gives
 * each token present in the batch one workgroup that owns its row: it sums
 * the dOut rows of that token's positions in increasing n (the reference's
 * order) and adds the sum into dWeight. Rows of tokens absent from the batch
 * are not touched. The grouping goes up in one small buffer per step (`upload`)
 * sized for N positions, and the dispatch is fixed: N workgroups, of which
 * those past the step's segment count return at once.
 *
 * Rows are read and written as vec4 when H % 4 == 0 (else scalars), with the
 * threads of a workgroup striding over a row: coalesced.
 * Cost per call (f32): forward reads 4NH bytes of weight rows and writes 4NH;
 * backward reads 4NH of dOut and reads and writes 4SH of dWeight for S
 * distinct tokens (NH adds).
 *
 * @module
 */
import { type Binding, type Dispatch, type Gpu, LINEAR_WORKGROUP_WGSL } from "./runtime.ts";

/** Positions grouped by token: the CPU side of the deterministic embedding backward. */
export interface EmbeddingGroups {
  /** Positions sorted by token, stably (increasing n within a token). `[N]` */
  order: Uint32Array;
  /** Where each token's positions start in `order`; `segments + 1` entries, the last is N. */
  segmentStarts: Uint32Array;
  /** The distinct tokens of the batch, increasing. `[segments]` */
  tokens: Uint32Array;
  /** The number of distinct tokens. */
  segments: number;
}

/**
 * Groups positions by token with a stable counting sort (O(N + V)). Throws a
 * RangeError for an id outside [0, V).
 *
 * @example
 * ```ts
 * import { groupByToken } from "./embedding.ts";
 * const g = groupByToken([5, 2, 5, 7], 10);
 * // tokens 2, 5, 7; token 5 at positions 0 and 2
 * console.assert(g.segments === 3 && g.order.join() === "1,0,2,3");
 * console.assert(g.segmentStarts.join() === "0,1,3,4" && g.tokens.join() === "2,5,7");
 * ```
 */
export function groupByToken(ids: ArrayLike<number>, V: number): EmbeddingGroups {
  const N = ids.length;
  const counts = new Uint32Array(V + 1);
  for (let n = 0; n < N; n++) {
    const id = ids[n];
    if (!(Number.isInteger(id) && id >= 0 && id < V)) {
      throw new RangeError(`embedding: token id ${id} at position ${n} is outside [0, ${V})`);
    }
    counts[id + 1]++;
  }
  let segments = 0;
  for (let v = 1; v <= V; v++) {
    if (counts[v] > 0) segments++;
    counts[v] += counts[v - 1]; // now counts[v] = first slot of token v
  }
  const order = new Uint32Array(N);
  const segmentStarts = new Uint32Array(segments + 1);
  const tokens = new Uint32Array(segments);
  let s = 0;
  for (let v = 0; v < V; v++) {
    if (counts[v + 1] > counts[v]) {
      tokens[s] = v;
      segmentStarts[s] = counts[v];
      s++;
    }
  }
  segmentStarts[segments] = N;
  for (let n = 0; n < N; n++) order[counts[ids[n]]++] = n;
  return { order, segmentStarts, tokens, segments };
}

const FWD_WG = 256;
const BWD_WG = 64;

function rowType(H: number): { vec: 1 | 4; T: string; lanes: number } {
  if (!Number.isInteger(H) || H < 1) throw new RangeError(`embedding: bad H ${H}`);
  const vec = H % 4 === 0 ? 4 : 1;
  return { vec, T: vec === 4 ? "vec4<f32>" : "f32", lanes: H / vec };
}

function forwardWgsl(T: string, lanes: number): string {
  return `${LINEAR_WORKGROUP_WGSL}
alias T = ${T};
const LANES: u32 = ${lanes}u;
struct Params { n: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> weight: array<T>;   // [V, H]
@group(0) @binding(2) var<storage, read> ids: array<u32>;    // [N]
@group(0) @binding(3) var<storage, read_write> out: array<T>; // [N, H]
@compute @workgroup_size(${FWD_WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let i = linear_workgroup(wid, nwg) * ${FWD_WG}u + lid;
  if (i >= p.n * LANES) { return; }
  let row = i / LANES;
  let id = ids[row];
  // Ids are validated on the CPU (data pipeline, groupByToken); one out of
  // range still gives a defined all-zero row instead of a clamped read.
  if (id >= arrayLength(&weight) / LANES) { out[i] = T(0.0); return; }
  out[i] = weight[id * LANES + i % LANES];
}`;
}

function backwardWgsl(T: string, lanes: number): string {
  // groups = [segments, segmentStarts[0..N], tokens[0..N), order[0..N)] as u32.
  return `${LINEAR_WORKGROUP_WGSL}
alias T = ${T};
const LANES: u32 = ${lanes}u;
struct Params { n: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> groups: array<u32>;
@group(0) @binding(2) var<storage, read> dOut: array<T>;          // [N, H]
@group(0) @binding(3) var<storage, read_write> dWeight: array<T>; // [V, H]
@compute @workgroup_size(${BWD_WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let s = linear_workgroup(wid, nwg);
  if (s >= groups[0]) { return; }
  let start = groups[1u + s];
  let end = groups[2u + s];
  let tok = groups[p.n + 2u + s];
  let orderBase = 2u * p.n + 2u;
  for (var c = lid; c < LANES; c += ${BWD_WG}u) {
    var acc = T(0.0);
    for (var k = start; k < end; k++) {
      acc += dOut[groups[orderBase + k] * LANES + c];
    }
    dWeight[tok * LANES + c] = dWeight[tok * LANES + c] + acc;
  }
}`;
}

/**
 * Embedding lookup: out `[N, H]` = weight `[V, H]` rows at ids `[N]` (u32 or
 * non-negative i32).
 *
 * @example
 * ```ts ignore
 * const d = await embeddingForward(gpu, { weight, ids, out, N: 4096, H: 512 });
 * ```
 */
export async function embeddingForward(
  gpu: Gpu,
  args: { weight: Binding; ids: Binding; out: Binding; N: number; H: number },
): Promise<Dispatch> {
  const { N, H } = args;
  if (!Number.isInteger(N) || N < 0) throw new RangeError(`embedding: bad N ${N}`);
  const { vec, T, lanes } = rowType(H);
  const pipeline = await gpu.pipeline(`embedding-fwd-H${H}`, forwardWgsl(T, lanes));
  const u = gpu.createUniform(new Uint32Array([N]), "embedding params");
  return {
    label: `embedding forward N=${N} H=${H} vec${vec}`,
    pipeline,
    bindGroup: gpu.bindGroup(pipeline, [u, args.weight, args.ids, args.out], "embedding forward"),
    workgroups: Math.ceil((N * lanes) / FWD_WG),
    owned: [u],
  };
}

/**
 * Embedding backward: dWeight[tok] += the sum of the dOut rows of its
 * positions (in increasing position), one workgroup per distinct token; rows
 * of absent tokens are untouched. Call `upload(groupByToken(ids, V))` each
 * step before submitting the dispatch (the write is queued ahead of it).
 */
export async function embeddingBackward(
  gpu: Gpu,
  args: { dOut: Binding; dWeight: Binding; N: number; H: number },
): Promise<{ dispatch: Dispatch; upload(groups: EmbeddingGroups): void }> {
  const { N, H } = args;
  if (!Number.isInteger(N) || N < 1) throw new RangeError(`embedding: bad N ${N}`);
  const { vec, T, lanes } = rowType(H);
  const pipeline = await gpu.pipeline(`embedding-bwd-H${H}`, backwardWgsl(T, lanes));
  const u = gpu.createUniform(new Uint32Array([N]), "embedding params");
  // [segments, segmentStarts (N + 1), tokens (N), order (N)]; segments = 0 until upload.
  const groups = gpu.createBuffer((3 * N + 2) * 4, "embedding groups");
  const dispatch: Dispatch = {
    label: `embedding backward N=${N} H=${H} vec${vec}`,
    pipeline,
    bindGroup: gpu.bindGroup(pipeline, [u, groups, args.dOut, args.dWeight], "embedding backward"),
    workgroups: N,
    owned: [u, groups],
  };
  const upload = (g: EmbeddingGroups): void => {
    if (g.order.length > N) {
      throw new RangeError(`embedding: ${g.order.length} positions, but built for at most ${N}`);
    }
    const head = new Uint32Array(g.segments + 2);
    head[0] = g.segments;
    head.set(g.segmentStarts.subarray(0, g.segments + 1), 1);
    gpu.write(groups, head, 0);
    if (g.segments > 0) {
      gpu.write(groups, g.tokens.subarray(0, g.segments), (N + 2) * 4);
      gpu.write(groups, g.order, (2 * N + 2) * 4);
    }
  };
  return { dispatch, upload };
}
