/**
 * KV-cache kernels for generation: RoPE + append into the cache, and causal
 * GQA attention of a few queries against the cache, both taking the position
 * from a storage buffer so that one prepared dispatch serves every decode step
 * (the training kernels bake their sizes into uniforms at creation).
 *
 * Layouts (batch 1): q `[Tq, nH, hd]`, new k/v `[Tq, nKV, hd]`, caches
 * `[capacity, nKV, hd]`, out `[Tq, nH, hd]`, pos `u32[1]` = position of row 0.
 *
 * `kvCacheAppend`: for rows t < Tq at position p = pos + t, rotate-half RoPE
 * (pair i with i + hd/2 rotated by a = p theta^(-2i/hd), angles from
 * `ropeTable`, computed in float64 on the CPU) applied to q in place and to k,
 * which is written with v into cache row p. Cost: reads and writes every
 * element of q, k, v once: 4 (2 Tq nH hd + 4 Tq nKV hd) bytes.
 *
 * `attentionDecode`: query t (at position p = pos + t) of head h attends to
 * keys 0..p of kv head floor(h / (nH/nKV)), with s_j = q . k_j / sqrt(hd):
 *
 *   out = sum_j exp(s_j - m) v_j / sum_j exp(s_j - m),  m = max_j s_j
 *
 * One workgroup per (t, h) walks the keys in chunks of 64 (one key per
 * invocation for the scores, then every invocation accumulating its own
 * output dimensions over the chunk) with the online-softmax update
 * m' = max(m, max_chunk s), l' = l e^(m - m') + sum e^(s - m'),
 * acc' = acc e^(m - m') + sum e^(s - m') v. FLOP per call 4 hd nH sum_t (p_t + 1);
 * bytes: every visible k and v row once per query head that reads it,
 * 8 hd nH sum_t (p_t + 1) (from cache across the heads of a group on a GPU).
 * Decode is bound by these loads and by the weights' matmuls, not by math.
 *
 * @module
 */
import { type Dispatch, type Gpu, LINEAR_WORKGROUP_WGSL } from "../runtime.ts";
import { ropeTable } from "../rope.ts";

/** Arguments of `kvCacheAppend`. */
export interface KvCacheAppendArgs {
  /** `[Tq, nH, hd]`, rotated in place. */
  q: GPUBuffer;
  /** `[Tq, nKV, hd]`: new keys before RoPE (left unchanged). */
  k: GPUBuffer;
  /** `[Tq, nKV, hd]`: new values. */
  v: GPUBuffer;
  /** `[capacity, nKV, hd]`: rows pos .. pos + Tq - 1 are written. */
  cacheK: GPUBuffer;
  cacheV: GPUBuffer;
  /** `u32[1]`: position of row 0, written by the caller before each submit. */
  pos: GPUBuffer;
  Tq: number;
  nH: number;
  nKV: number;
  hd: number;
  /** Rows of the caches (positions 0 .. capacity - 1; the RoPE table covers them). */
  capacity: number;
  /** `rope_theta`. */
  theta: number;
}

/** Arguments of `attentionDecode`. */
export interface AttentionDecodeArgs {
  /** `[Tq, nH, hd]`, after RoPE. */
  q: GPUBuffer;
  /** Caches `[kvStride, nKV, hd]`, keys after RoPE. */
  k: GPUBuffer;
  v: GPUBuffer;
  /** `[Tq, nH, hd]`, overwritten. */
  out: GPUBuffer;
  /** `u32[1]`: position of query 0; query t attends keys 0 .. pos + t. */
  pos: GPUBuffer;
  Tq: number;
  nH: number;
  nKV: number;
  hd: number;
  /** Rows of the caches. */
  kvStride: number;
}

const APPEND_WG = 64;

const APPEND_WGSL = `${LINEAR_WORKGROUP_WGSL}
struct Params { Tq: u32, nH: u32, nKV: u32, half: u32, capacity: u32, count: u32 }
@group(0) @binding(0) var<storage, read_write> q: array<f32>;
@group(0) @binding(1) var<storage, read> kNew: array<f32>;
@group(0) @binding(2) var<storage, read> vNew: array<f32>;
@group(0) @binding(3) var<storage, read_write> cacheK: array<f32>;
@group(0) @binding(4) var<storage, read_write> cacheV: array<f32>;
@group(0) @binding(5) var<storage, read> pos: array<u32>;
@group(0) @binding(6) var<storage, read> table: array<vec2f>; // [capacity, half] (cos, sin)
@group(0) @binding(7) var<uniform> params: Params;

@compute @workgroup_size(${APPEND_WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  // One invocation per rotated pair (t, slot, i); slots 0..nH-1 are query
  // heads, nH..nH+nKV-1 key heads (which also move the matching v pair).
  let e = linear_workgroup(wid, nwg) * ${APPEND_WG}u + lid;
  if (e >= params.count) { return; }
  let half = params.half;
  let hd = 2u * half;
  let slots = params.nH + params.nKV;
  let i = e % half;
  let slot = (e / half) % slots;
  let t = e / (half * slots);
  let p = pos[0] + t;
  if (p >= params.capacity) { return; }
  let cs = table[p * half + i];
  if (slot < params.nH) {
    let base = (t * params.nH + slot) * hd + i;
    let x1 = q[base];
    let x2 = q[base + half];
    q[base] = x1 * cs.x - x2 * cs.y;
    q[base + half] = x2 * cs.x + x1 * cs.y;
  } else {
    let kh = slot - params.nH;
    let src = (t * params.nKV + kh) * hd + i;
    let dst = (p * params.nKV + kh) * hd + i;
    let x1 = kNew[src];
    let x2 = kNew[src + half];
    cacheK[dst] = x1 * cs.x - x2 * cs.y;
    cacheK[dst + half] = x2 * cs.x + x1 * cs.y;
    cacheV[dst] = vNew[src];
    cacheV[dst + half] = vNew[src + half];
  }
}`;

function checkCounts(what: string, counts: Record<string, number>): void {
  for (const [name, v] of Object.entries(counts)) {
    if (!Number.isInteger(v) || v < 1) throw new RangeError(`${what}: ${name} = ${v} is not >= 1`);
  }
}

/**
 * RoPE on q (in place) and k, and the append of k and v into cache rows
 * pos .. pos + Tq - 1 (rows at or past `capacity` are skipped; the caller
 * keeps positions inside the cache).
 */
export async function kvCacheAppend(gpu: Gpu, args: KvCacheAppendArgs): Promise<Dispatch> {
  const { Tq, nH, nKV, hd, capacity, theta } = args;
  checkCounts("kvCacheAppend", { Tq, nH, nKV, hd, capacity });
  if (hd % 2 !== 0) throw new RangeError(`kvCacheAppend: head_dim ${hd} must be even`);
  const half = hd / 2;
  const count = Tq * (nH + nKV) * half;
  const pipeline = await gpu.pipeline("kv cache append", APPEND_WGSL);
  const params = gpu.createUniform(
    new Uint32Array([Tq, nH, nKV, half, capacity, count]),
    "kv cache append params",
  );
  // The training kernels' table: positions 0 .. capacity - 1, one per device.
  const table = ropeTable(gpu, capacity, hd, theta);
  return {
    label: `kv cache append Tq=${Tq}`,
    pipeline,
    bindGroup: gpu.bindGroup(pipeline, [
      args.q,
      args.k,
      args.v,
      args.cacheK,
      args.cacheV,
      args.pos,
      table,
      params,
    ]),
    workgroups: Math.ceil(count / APPEND_WG),
    owned: [params],
  };
}

const DECODE_WG = 64;

function decodeWgsl(hd: number): string {
  const dims = Math.ceil(hd / DECODE_WG); // output dimensions per invocation
  return `
struct Params { Tq: u32, nH: u32, nKV: u32, group: u32, kvStride: u32, scale: f32 }
@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> pos: array<u32>;
@group(0) @binding(5) var<uniform> params: Params;

const HD: u32 = ${hd}u;
const WG: u32 = ${DECODE_WG}u;
const DIMS: u32 = ${dims}u;
const NEG: f32 = -3.0e38;

var<workgroup> qs: array<f32, HD>;
var<workgroup> ps: array<f32, WG>;
var<workgroup> red: array<f32, WG>;

// Tree reduction over the workgroup (max when take_max, else sum); every
// invocation gets the result.
fn reduce(x: f32, lid: u32, take_max: bool) -> f32 {
  red[lid] = x;
  workgroupBarrier();
  for (var s = WG / 2u; s > 0u; s = s / 2u) {
    if (lid < s) {
      let a = red[lid];
      let b = red[lid + s];
      red[lid] = select(a + b, max(a, b), take_max);
    }
    workgroupBarrier();
  }
  let r = red[0];
  workgroupBarrier();
  return r;
}

@compute @workgroup_size(${DECODE_WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) lid: u32) {
  // wid.x = query head h, wid.y = query row t (both uniform per workgroup).
  let h = wid.x;
  let t = wid.y;
  let kvh = h / params.group;
  let qBase = (t * params.nH + h) * HD;
  for (var d = lid; d < HD; d += WG) { qs[d] = q[qBase + d] * params.scale; }
  workgroupBarrier();
  let nkeys = min(pos[0] + t + 1u, params.kvStride);
  let rowStride = params.nKV * HD;
  var m = NEG;
  var l = 0.0;
  var acc: array<f32, DIMS>;
  for (var r = 0u; r < DIMS; r++) { acc[r] = 0.0; }
  for (var j0 = 0u; j0 < nkeys; j0 += WG) {
    let j = j0 + lid;
    var s = NEG;
    if (j < nkeys) {
      let kb = j * rowStride + kvh * HD;
      var dot = 0.0;
      for (var d = 0u; d < HD; d++) { dot += qs[d] * k[kb + d]; }
      s = dot;
    }
    let mNew = max(m, reduce(s, lid, true));
    let p = select(0.0, exp(s - mNew), j < nkeys);
    ps[lid] = p;
    let alpha = exp(m - mNew);
    l = l * alpha + reduce(p, lid, false); // the reduce's barriers also publish ps
    let n = min(WG, nkeys - j0);
    for (var r = 0u; r < DIMS; r++) {
      let d = lid + r * WG;
      if (d < HD) {
        var a = acc[r] * alpha;
        var vb = j0 * rowStride + kvh * HD + d;
        for (var jj = 0u; jj < n; jj++) {
          a += ps[jj] * v[vb];
          vb += rowStride;
        }
        acc[r] = a;
      }
    }
    m = mNew;
    workgroupBarrier(); // ps is rewritten by the next chunk
  }
  let inv = 1.0 / l;
  for (var r = 0u; r < DIMS; r++) {
    let d = lid + r * WG;
    if (d < HD) { out[qBase + d] = acc[r] * inv; }
  }
}`;
}

/**
 * Causal GQA attention of Tq queries (at positions pos .. pos + Tq - 1) over
 * the KV cache. One workgroup per (query head, query row): Tq x nH workgroups.
 */
export async function attentionDecode(gpu: Gpu, args: AttentionDecodeArgs): Promise<Dispatch> {
  const { Tq, nH, nKV, hd, kvStride } = args;
  checkCounts("attentionDecode", { Tq, nH, nKV, hd, kvStride });
  if (nH % nKV !== 0) {
    throw new RangeError(`attentionDecode: heads ${nH} not a multiple of kv heads ${nKV}`);
  }
  if (Tq > gpu.limits.maxComputeWorkgroupsPerDimension) {
    throw new RangeError(`attentionDecode: Tq = ${Tq} exceeds the workgroup grid`);
  }
  const pipeline = await gpu.pipeline(`attention decode hd=${hd}`, decodeWgsl(hd));
  const u = new ArrayBuffer(24);
  new Uint32Array(u, 0, 5).set([Tq, nH, nKV, nH / nKV, kvStride]);
  new Float32Array(u, 20, 1)[0] = 1 / Math.sqrt(hd);
  const params = gpu.createUniform(new Uint8Array(u), "attention decode params");
  return {
    label: `attention decode Tq=${Tq}`,
    pipeline,
    bindGroup: gpu.bindGroup(pipeline, [args.q, args.k, args.v, args.out, args.pos, params]),
    workgroups: [nH, Tq, 1],
    owned: [params],
  };
}
