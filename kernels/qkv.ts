/**
 * The fused q/k/v projection's split and its backward merge. One matmul with
 * the stacked weight `[Wq; Wk; Wv]` gives `qkv [N, (nH + 2 nKV) hd]`: per row,
 * nH query heads, then nKV key heads, then nKV value heads, hd floats each.
 * Attention wants q `[N, nH, hd]`, k and v `[N, nKV, hd]` apart, so:
 *
 *   splitQkv:  q, k, v <- qkv, with RoPE applied to q and k on the way
 *              (optional: QK-norm models norm first and rotate after, and the
 *              KV-cache append rotates at generation time)
 *   mergeQkv:  dqkv <- dq, dk, dv, with RoPE's backward applied to dq and dk
 *              on the way (optional, likewise)
 *
 * RoPE is the rotate-half of `kernels/rope.ts` with its table (float64
 * angles rounded once): row n of a `[B, T]` batch sits at position n mod T;
 * pair i of a head (i < hd/2, partner i + hd/2) turns by angle a:
 *   forward  y_i = x_i cos a - x_{i+h} sin a,  y_{i+h} = x_{i+h} cos a + x_i sin a
 *   backward the transpose, R(-a).
 *
 * One invocation per (row, head, pair), or per 4 pairs as vec4s when
 * hd/2 % 4 == 0: it reads and writes two floats (vec4s), so each call moves
 * every element of qkv once each way: 8 N (nH + 2 nKV) hd bytes, 3 FLOP per
 * rotated element.
 *
 * @module
 */
import { type Binding, type Dispatch, type Gpu, LINEAR_WORKGROUP_WGSL } from "./runtime.ts";
import { ropeTable } from "./rope.ts";
import { kernelDispatch, type ReadPath } from "./texels.ts";

/** Shape of a split or merge: N rows, head counts, head dimension, optional RoPE. */
export interface QkvShape {
  /** Rows (B*T tokens). */
  N: number;
  /** Query heads. */
  nH: number;
  /** Key/value heads. */
  nKV: number;
  /** Head dimension (even when RoPE is applied). */
  hd: number;
  /** Rotate q and k: rows are `[B, T]`, row n at position n mod T. */
  rope?: { T: number; theta: number };
  /** Where the inputs are read (kernels/texels.ts); default `auto`: textures on CPU drivers. */
  reads?: ReadPath;
}

const WG = 64;

/**
 * One invocation per (row, head, group of G pairs): G = 4 with vec4 lanes
 * (half % 4 == 0: pairs i..i+3 and their partners are one vec4 each, and
 * their table entries two), else 1. The arithmetic per element is the same.
 */
function wgsl(direction: "split" | "merge", rope: boolean, vec: 1 | 4): string {
  const T = vec === 4 ? "vec4f" : "f32";
  const io = direction === "split"
    ? `@group(0) @binding(1) var<storage, read> qkv: array<${T}>;
@group(0) @binding(2) var<storage, read_write> q: array<${T}>;
@group(0) @binding(3) var<storage, read_write> k: array<${T}>;
@group(0) @binding(4) var<storage, read_write> v: array<${T}>;`
    : `@group(0) @binding(1) var<storage, read_write> qkv: array<${T}>;
@group(0) @binding(2) var<storage, read> q: array<${T}>;
@group(0) @binding(3) var<storage, read> k: array<${T}>;
@group(0) @binding(4) var<storage, read> v: array<${T}>;`;
  // [T, half] (cos, sin) pairs; as vec4s, two pairs each.
  const table = rope
    ? `@group(0) @binding(5) var<storage, read> table: array<${vec === 4 ? "vec4f" : "vec2f"}>;`
    : "";
  // The angles of this invocation's pairs: cos in c, sin in sn.
  const angles = vec === 4
    ? `let at = ((n % p.T) * p.half + i * 4u) / 2u;
    let t0 = table[at];
    let t1 = table[at + 1u];
    let c = vec4f(t0.x, t0.z, t1.x, t1.z);
    let sn = vec4f(t0.y, t0.w, t1.y, t1.w);`
    : `let cs = table[(n % p.T) * p.half + i];
    let c = cs.x;
    let sn = cs.y;`;
  // The rotation: forward R(a) on the way out of qkv, R(-a) on the way back.
  const sign = direction === "split" ? "1.0" : "-1.0";
  const turn = rope
    ? `if (slot < p.nH + p.nKV) {
    ${angles}
    let s = sn * ${sign};
    let a = x1 * c - x2 * s;
    let b = x2 * c + x1 * s;
    x1 = a;
    x2 = b;
  }`
    : "";
  // In units of the lane type: hd, the partner offset.
  const move = direction === "split"
    ? `var x1 = qkv[src];
  var x2 = qkv[src + hh];
  ${turn}
  if (slot < p.nH) {
    let d = (n * p.nH + slot) * hd + i;
    q[d] = x1;
    q[d + hh] = x2;
  } else if (slot < p.nH + p.nKV) {
    let d = (n * p.nKV + slot - p.nH) * hd + i;
    k[d] = x1;
    k[d + hh] = x2;
  } else {
    let d = (n * p.nKV + slot - p.nH - p.nKV) * hd + i;
    v[d] = x1;
    v[d + hh] = x2;
  }`
    : `var x1: ${T};
  var x2: ${T};
  if (slot < p.nH) {
    let d = (n * p.nH + slot) * hd + i;
    x1 = q[d];
    x2 = q[d + hh];
  } else if (slot < p.nH + p.nKV) {
    let d = (n * p.nKV + slot - p.nH) * hd + i;
    x1 = k[d];
    x2 = k[d + hh];
  } else {
    let d = (n * p.nKV + slot - p.nH - p.nKV) * hd + i;
    x1 = v[d];
    x2 = v[d + hh];
  }
  ${turn}
  qkv[src] = x1;
  qkv[src + hh] = x2;`;
  return `${LINEAR_WORKGROUP_WGSL}
struct Params { nH: u32, nKV: u32, half: u32, T: u32, count: u32 }
@group(0) @binding(0) var<uniform> p: Params;
${io}
${table}
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let e = linear_workgroup(wid, nwg) * ${WG}u + lid;
  if (e >= p.count) { return; }
  let heads = p.nH + 2u * p.nKV;
  let hh = p.half / ${vec}u;
  let hd = 2u * hh;
  let i = e % hh;
  let slot = (e / hh) % heads;
  let n = e / (hh * heads);
  let src = (n * heads + slot) * hd + i;
  ${move}
}`;
}

function qkvDispatch(
  gpu: Gpu,
  direction: "split" | "merge",
  buffers: { qkv: Binding; q: Binding; k: Binding; v: Binding },
  s: QkvShape,
): Promise<Dispatch> {
  for (const [name, v] of Object.entries({ N: s.N, nH: s.nH, nKV: s.nKV, hd: s.hd })) {
    if (!Number.isInteger(v) || v < 1) throw new RangeError(`${direction}Qkv: ${name} = ${v}`);
  }
  if (s.hd % 2 !== 0) throw new RangeError(`${direction}Qkv: head_dim ${s.hd} must be even`);
  const half = s.hd / 2;
  const vec = half % 4 === 0 ? 4 : 1;
  const count = s.N * (s.nH + 2 * s.nKV) * half / vec;
  const rope = s.rope !== undefined;
  const T = s.rope?.T ?? 1;
  if (rope && (!Number.isInteger(T) || T < 1 || s.N % T !== 0)) {
    throw new RangeError(`${direction}Qkv: rows ${s.N} are not whole sequences of T = ${T}`);
  }
  const params = gpu.createUniform(
    new Uint32Array([s.nH, s.nKV, half, T, count]),
    `qkv ${direction} params`,
  );
  const bindings = [params, buffers.qkv, buffers.q, buffers.k, buffers.v];
  if (s.rope) bindings.push(ropeTable(gpu, T, s.hd, s.rope.theta));
  const qFloats = s.N * s.nH * s.hd;
  const kvFloats = s.N * s.nKV * s.hd;
  const table = rope ? { table: T * s.hd } : {};
  return kernelDispatch(gpu, {
    label: `qkv ${direction}${rope ? " + rope" : ""} N=${s.N}`,
    key: `qkv ${direction} rope=${rope} vec${vec}`,
    wgsl: wgsl(direction, rope, vec),
    bindings,
    workgroups: Math.ceil(count / WG),
    owned: [params],
    textureReads: direction === "split"
      ? { qkv: qFloats + 2 * kvFloats, ...table }
      : { q: qFloats, k: kvFloats, v: kvFloats, ...table },
    reads: s.reads,
  });
}

/** q, k, v (overwritten) from the fused projection `qkv`, RoPE on q and k when `rope` is given. */
export function splitQkv(
  gpu: Gpu,
  args: QkvShape & { qkv: Binding; q: Binding; k: Binding; v: Binding },
): Promise<Dispatch> {
  return qkvDispatch(gpu, "split", args, args);
}

/**
 * The gradient of the fused projection, `dqkv` (overwritten), from dq, dk, dv;
 * with `rope`, dq and dk are gradients w.r.t. the rotated q and k and go
 * through RoPE's backward on the way.
 */
export function mergeQkv(
  gpu: Gpu,
  args: QkvShape & { dqkv: Binding; dq: Binding; dk: Binding; dv: Binding },
): Promise<Dispatch> {
  return qkvDispatch(gpu, "merge", { qkv: args.dqkv, q: args.dq, k: args.dk, v: args.dv }, args);
}
