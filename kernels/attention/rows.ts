/**
 * The "rows" design of the attention kernels (CPU drivers): one invocation per
 * owned row, no workgroup memory; see `mod.ts` for the math and the choice
 * between designs.
 *
 * @module
 */
import { type Gpu, isBroadcastSubgroupSize, LINEAR_WORKGROUP_WGSL } from "../runtime.ts";

// ---------------------------------------------------------------------------
// The "rows" design, for CPU drivers (Mesa llvmpipe/lavapipe).
//
// llvmpipe runs the invocations of a workgroup as the lanes of SIMD vectors;
// arithmetic is nearly free, but every load instruction (storage or
// workgroup memory, vec4 or scalar, same address in all lanes or not) is a
// loop over the lanes: measured here, ~45 ns per vec4 load per 8 lanes, and
// dynamically indexed private arrays cost as much. So each invocation owns one
// row (a query, or a key in dK/dV) and keeps it in named registers (the code
// is generated fully unrolled), and the other operand streams through in a
// workgroup-uniform loop, 4 rows at a time (one online-softmax rescale per 4
// keys, and independent multiply-add chains). With subgroups of exactly S
// lanes (S = the workgroup size, measured once per device), a streamed row of
// hd/4 vec4s is loaded spread over the lanes, ceil(hd / 4S) loads instead of
// hd/4, and handed round with subgroupBroadcast (an extract and splat). The
// kernel checks `subgroup_size == S` at run time and takes the plain loop
// otherwise, so no subgroup size is assumed for correctness.

/** Invocations (rows: queries, or keys in dK/dV) per workgroup without subgroups. */
export const ROWS = 8;

/** `f(i)` for i = 0..n-1, joined. */
function each(n: number, f: (i: number) => string, sep = "\n"): string {
  return Array.from({ length: n }, (_, i) => f(i)).join(sep);
}

/**
 * Statements binding `${name}${u}_${x}` (u < 4 streamed rows, x < H vec4s) to
 * the rows at vec4 offsets `off(u)` of `buf`: plain loads, or (S > 0) chunk
 * loads by lane `sl` and broadcasts.
 */
function streamRows(
  name: string,
  buf: string,
  off: (u: number) => string,
  H: number,
  S: number,
  indent: string,
): string {
  const out: string[] = [];
  for (let u = 0; u < 4; u++) {
    if (S === 0) {
      for (let x = 0; x < H; x++) out.push(`let ${name}${u}_${x} = ${buf}[${off(u)} + ${x}u];`);
      continue;
    }
    const chunks = Math.ceil(H / S);
    for (let c = 0; c < chunks; c++) {
      out.push(`let ${name}c${u}_${c} = ${buf}[${off(u)} + min(${c * S}u + sl, ${H - 1}u)];`);
    }
    for (let x = 0; x < H; x++) {
      out.push(
        `let ${name}${u}_${x} = subgroupBroadcast(${name}c${u}_${Math.floor(x / S)}, ${x % S}u);`,
      );
    }
  }
  return out.join(`\n${indent}`);
}

/** `var target = sum_x a(x) * b(x)` over H vec4 pairs as one fma chain (4 rows give 4 independent chains). */
function dotChain(target: string, a: (x: number) => string, b: (x: number) => string, H: number) {
  const lines = [`var ${target} = ${a(0)} * ${b(0)};`];
  for (let x = 1; x < H; x++) lines.push(`${target} = fma(${a(x)}, ${b(x)}, ${target});`);
  return lines;
}

/**
 * `dotChain` for each of the 4 streamed rows u: `var ${t}${u} = sum_x a(x) * ${row}${u}_${x}`,
 * joined with `sep`.
 */
function dotChains4(
  t: string,
  a: (x: number) => string,
  row: string,
  H: number,
  sep: string,
): string {
  return each(4, (u) => dotChain(`${t}${u}`, a, (x) => `${row}${u}_${x}`, H).join(sep), sep);
}

/**
 * `init + sum_u w[u] * ${row}${u}_${x}` over the 4 streamed rows as nested fmas,
 * row 0 innermost (added first).
 */
function fmaRows4(w: string, row: string, x: number, init: string): string {
  return `fma(vec4f(${w}.w), ${row}3_${x}, fma(vec4f(${w}.z), ${row}2_${x}, ` +
    `fma(vec4f(${w}.y), ${row}1_${x}, fma(vec4f(${w}.x), ${row}0_${x}, ${init}))))`;
}

function rowsHeader(hd: number, S: number): string {
  return `${LINEAR_WORKGROUP_WGSL}
const WG = ${S || ROWS}u;
const SCALE: f32 = ${Math.fround(1 / Math.sqrt(hd))};
const NEG: f32 = -3.0e38;
fn hsum(a: vec4f) -> f32 { return (a.x + a.y) + (a.z + a.w); }`;
}

/**
 * The kernel body: the unrolled subgroup path when S > 0, guarded by a run-time
 * check of the subgroup size, with the compact rolled plain path as its
 * fallback; the plain path alone when S = 0.
 */
function rowsEntry(
  S: number,
  fast: () => string,
  plain: string,
): { builtins: string; body: string } {
  if (S === 0) return { builtins: "", body: plain };
  return {
    builtins:
      `,\n        @builtin(subgroup_size) sgSize: u32, @builtin(subgroup_invocation_id) sl: u32`,
    body: `if (sgSize == WG) {${fast()}\n  } else {${plain}\n  }`,
  };
}

/** "rows" forward: one invocation per query of one (b, h). */
export function rowsForwardWgsl(hd: number, S: number): string {
  const H = hd / 4;
  // Subgroup path: keys stream 4 at a time, one online-softmax rescale per 4.
  const fast = () => `
    ${each(H, (x) => `let qr${x} = q[qo + ${x}u] * SCALE;`, "\n    ")}
    ${each(H, (x) => `var acc${x} = vec4f();`, "\n    ")}
    var m = NEG;
    var l = 0.0;
    for (var j0 = 0u; j0 < kEnd; j0 += 4u) {
      // Keys j0 + u; indices past kEnd are clamped (in bounds) and masked.
      let js = vec4u(j0, j0 + 1u, j0 + 2u, j0 + 3u);
      let visible = (js <= vec4u(pos)) & (js < vec4u(kEnd));
      ${each(4, (u) => `let ko${u} = kvBase + min(js[${u}], kEnd - 1u) * kvRow;`, "\n      ")}
      ${streamRows("K", "k", (u) => `ko${u}`, H, S, "      ")}
      ${dotChains4("a", (x) => `qr${x}`, "K", H, "\n      ")}
      let sc = select(vec4f(NEG), vec4f(hsum(a0), hsum(a1), hsum(a2), hsum(a3)), visible);
      // Key 0 is visible to every query, so m is finite after the first block
      // and exp(NEG - m) = 0; a block with no visible key keeps m: alpha = 1.
      let mNew = max(m, max(max(sc.x, sc.y), max(sc.z, sc.w)));
      let alpha = exp(m - mNew);
      let p = select(vec4f(), exp(sc - vec4f(mNew)), visible);
      l = l * alpha + hsum(p);
      m = mNew;
      ${streamRows("V", "v", (u) => `ko${u}`, H, S, "      ")}
      ${
    each(
      H,
      (x) => `acc${x} = ${fmaRows4("p", "V", x, `acc${x} * alpha`)};`,
      "\n      ",
    )
  }
    }
    if (q0 + lid < Tq) {
      let inv = 1.0 / l;
      ${each(H, (x) => `out[qo + ${x}u] = acc${x} * inv;`, "\n      ")}
      lse[(b * params.nH + h) * Tq + t] = m + log(l);
    }`;
  // Plain path: compact loops, one key at a time.
  const plain = `
    var qr = array<vec4f, ${H}>();
    for (var x = 0u; x < ${H}u; x++) { qr[x] = q[qo + x] * SCALE; }
    var acc = array<vec4f, ${H}>();
    var m = NEG;
    var l = 0.0;
    for (var j = 0u; j < kEnd; j++) {
      let ko = kvBase + j * kvRow;
      var s = 0.0;
      for (var x = 0u; x < ${H}u; x++) { s += dot(qr[x], k[ko + x]); }
      let visible = j <= pos;
      let mNew = select(m, max(m, s), visible);
      let alpha = exp(m - mNew);
      let p = select(0.0, exp(s - mNew), visible);
      l = l * alpha + p;
      for (var x = 0u; x < ${H}u; x++) { acc[x] = acc[x] * alpha + p * v[ko + x]; }
      m = mNew;
    }
    if (q0 + lid < Tq) {
      let inv = 1.0 / l;
      for (var x = 0u; x < ${H}u; x++) { out[qo + x] = acc[x] * inv; }
      lse[(b * params.nH + h) * Tq + t] = m + log(l);
    }`;
  const entry = rowsEntry(S, fast, plain);
  return `${rowsHeader(hd, S)}
struct Params { Tq: u32, Tk: u32, qPos0: u32, kvStride: u32, nH: u32, nKV: u32, group: u32, nqb: u32, count: u32 }
@group(0) @binding(0) var<storage, read> q: array<vec4f>;
@group(0) @binding(1) var<storage, read> k: array<vec4f>;
@group(0) @binding(2) var<storage, read> v: array<vec4f>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4f>;
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;
@group(0) @binding(5) var<uniform> params: Params;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32${entry.builtins}) {
  let w = linear_workgroup(wid, nwg);
  if (w >= params.count) { return; }
  let qb = w % params.nqb;
  let bh = w / params.nqb;
  let h = bh % params.nH;
  let b = bh / params.nH;
  let kvh = h / params.group;
  let Tq = params.Tq;
  let q0 = qb * WG;
  let t = min(q0 + lid, Tq - 1u); // surplus lanes redo the last row and write nothing
  let pos = params.qPos0 + t;
  let qo = ((b * Tq + t) * params.nH + h) * ${H}u;
  // Keys [0, kEnd) are visible to some query of the block: a workgroup-uniform bound.
  let kEnd = min(params.Tk, params.qPos0 + min(q0 + WG, Tq));
  let kvRow = params.nKV * ${H}u;
  let kvBase = (b * params.kvStride * params.nKV + kvh) * ${H}u;
  ${entry.body}
}`;
}

/** Bindings of both "rows" backward kernels (vec4 views of the [*, hd] tensors). */
const ROWS_BACKWARD_PARAMS = `
struct Params { T: u32, nH: u32, nKV: u32, group: u32, nb: u32, count: u32 }
@group(0) @binding(0) var<storage, read> q: array<vec4f>;
@group(0) @binding(1) var<storage, read> k: array<vec4f>;
@group(0) @binding(2) var<storage, read> v: array<vec4f>;
@group(0) @binding(3) var<storage, read> dOut: array<vec4f>;
@group(0) @binding(4) var<storage, read> lse: array<f32>;
@group(0) @binding(5) var<storage, read> Dg: array<f32>;
@group(0) @binding(6) var<uniform> params: Params;`;

/**
 * "rows" dK/dV: one invocation per key of one (b, kv head); it walks the
 * group's query heads and the queries from the block's first key on.
 */
export function rowsDkvWgsl(hd: number, S: number): string {
  const H = hd / 4;
  // Subgroup path: queries stream 4 at a time; lse and D of the 4 come from
  // one load spread over the lanes too.
  const fast = () => `
    ${each(H, (x) => `let kr${x} = k[ko + ${x}u] * SCALE;`, "\n    ")}
    ${each(H, (x) => `let vr${x} = v[ko + ${x}u];`, "\n    ")}
    ${each(H, (x) => `var dK${x} = vec4f();`, "\n    ")}
    ${each(H, (x) => `var dV${x} = vec4f();`, "\n    ")}
    for (var g = 0u; g < params.group; g++) {
      let h = kvh * params.group + g;
      let lb = (b * nH + h) * T;
      for (var t0 = k0; t0 < T; t0 += 4u) {
        let ts = vec4u(t0, t0 + 1u, t0 + 2u, t0 + 3u);
        let seen = (ts >= vec4u(j)) & (ts < vec4u(T));
        ${
    each(4, (u) => `let qo${u} = ((b * T + min(ts[${u}], T - 1u)) * nH + h) * ${H}u;`, "\n        ")
  }
        ${streamRows("Q", "q", (u) => `qo${u}`, H, S, "        ")}
        ${streamRows("O", "dOut", (u) => `qo${u}`, H, S, "        ")}
        ${dotChains4("a", (x) => `kr${x}`, "Q", H, "\n        ")}
        ${dotChains4("e", (x) => `vr${x}`, "O", H, "\n        ")}
        let li = lb + min(t0 + min(sl, 3u), T - 1u);
        let Lc = lse[li];
        let Dc = Dg[li];
        let L = vec4f(${each(4, (u) => `subgroupBroadcast(Lc, ${u}u)`, ", ")});
        let Dv = vec4f(${each(4, (u) => `subgroupBroadcast(Dc, ${u}u)`, ", ")});
        let sc = vec4f(hsum(a0), hsum(a1), hsum(a2), hsum(a3));
        let dp = vec4f(hsum(e0), hsum(e1), hsum(e2), hsum(e3));
        let p = select(vec4f(), exp(sc - L), seen);
        let ds = p * (dp - Dv);
        ${
    each(
      H,
      (x) =>
        `dV${x} = ${fmaRows4("p", "O", x, `dV${x}`)};\n        ` +
        `dK${x} = ${fmaRows4("ds", "Q", x, `dK${x}`)};`,
      "\n        ",
    )
  }
      }
    }
    if (k0 + lid < T) {
      ${each(H, (x) => `dk[ko + ${x}u] = dK${x} * SCALE;`, "\n      ")}
      ${each(H, (x) => `dv[ko + ${x}u] = dV${x};`, "\n      ")}
    }`;
  const plain = `
    var kr = array<vec4f, ${H}>();
    var vr = array<vec4f, ${H}>();
    for (var x = 0u; x < ${H}u; x++) {
      kr[x] = k[ko + x] * SCALE;
      vr[x] = v[ko + x];
    }
    var dK = array<vec4f, ${H}>();
    var dV = array<vec4f, ${H}>();
    for (var g = 0u; g < params.group; g++) {
      let h = kvh * params.group + g;
      for (var t = k0; t < T; t++) {
        let qo = ((b * T + t) * nH + h) * ${H}u;
        var s = 0.0;
        var dp = 0.0;
        for (var x = 0u; x < ${H}u; x++) {
          s += dot(kr[x], q[qo + x]);
          dp += dot(vr[x], dOut[qo + x]);
        }
        let li = (b * nH + h) * T + t;
        let p = select(0.0, exp(s - lse[li]), t >= j);
        let ds = p * (dp - Dg[li]);
        for (var x = 0u; x < ${H}u; x++) {
          dV[x] += p * dOut[qo + x];
          dK[x] += ds * q[qo + x];
        }
      }
    }
    if (k0 + lid < T) {
      for (var x = 0u; x < ${H}u; x++) {
        dk[ko + x] = dK[x] * SCALE;
        dv[ko + x] = dV[x];
      }
    }`;
  const entry = rowsEntry(S, fast, plain);
  return `${rowsHeader(hd, S)}
${ROWS_BACKWARD_PARAMS}
@group(0) @binding(7) var<storage, read_write> dk: array<vec4f>;
@group(0) @binding(8) var<storage, read_write> dv: array<vec4f>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32${entry.builtins}) {
  let w = linear_workgroup(wid, nwg);
  if (w >= params.count) { return; }
  let kb = w % params.nb;
  let bk = w / params.nb;
  let kvh = bk % params.nKV;
  let b = bk / params.nKV;
  let T = params.T;
  let nH = params.nH;
  let k0 = kb * WG;
  let j = min(k0 + lid, T - 1u); // surplus lanes redo the last key and write nothing
  let ko = ((b * T + j) * params.nKV + kvh) * ${H}u;
  ${entry.body}
}`;
}

/** "rows" dQ: one invocation per query of one (b, h); keys stream through. */
export function rowsDqWgsl(hd: number, S: number): string {
  const H = hd / 4;
  const fast = () => `
    ${each(H, (x) => `let qr${x} = q[qo + ${x}u] * SCALE;`, "\n    ")}
    ${each(H, (x) => `let dor${x} = dOut[qo + ${x}u];`, "\n    ")}
    ${each(H, (x) => `var dQ${x} = vec4f();`, "\n    ")}
    for (var j0 = 0u; j0 < kEnd; j0 += 4u) {
      let js = vec4u(j0, j0 + 1u, j0 + 2u, j0 + 3u);
      let visible = (js <= vec4u(t)) & (js < vec4u(kEnd));
      ${
    each(4, (u) =>
      `let ko${u} = ((b * T + min(js[${u}], kEnd - 1u)) * params.nKV + kvh) * ${H}u;`, "\n      ")
  }
      ${streamRows("K", "k", (u) => `ko${u}`, H, S, "      ")}
      ${streamRows("V", "v", (u) => `ko${u}`, H, S, "      ")}
      ${dotChains4("a", (x) => `qr${x}`, "K", H, "\n      ")}
      ${dotChains4("e", (x) => `dor${x}`, "V", H, "\n      ")}
      let sc = vec4f(hsum(a0), hsum(a1), hsum(a2), hsum(a3));
      let dp = vec4f(hsum(e0), hsum(e1), hsum(e2), hsum(e3));
      let ds = select(vec4f(), exp(sc - vec4f(L)) * (dp - vec4f(Dt)), visible);
      ${
    each(
      H,
      (x) => `dQ${x} = ${fmaRows4("ds", "K", x, `dQ${x}`)};`,
      "\n      ",
    )
  }
    }
    if (q0 + lid < T) {
      ${each(H, (x) => `dq[qo + ${x}u] = dQ${x} * SCALE;`, "\n      ")}
    }`;
  const plain = `
    var qr = array<vec4f, ${H}>();
    var dor = array<vec4f, ${H}>();
    for (var x = 0u; x < ${H}u; x++) {
      qr[x] = q[qo + x] * SCALE;
      dor[x] = dOut[qo + x];
    }
    var dQ = array<vec4f, ${H}>();
    for (var j = 0u; j < kEnd; j++) {
      let ko = ((b * T + j) * params.nKV + kvh) * ${H}u;
      var s = 0.0;
      var dp = 0.0;
      for (var x = 0u; x < ${H}u; x++) {
        s += dot(qr[x], k[ko + x]);
        dp += dot(dor[x], v[ko + x]);
      }
      let ds = select(0.0, exp(s - L) * (dp - Dt), j <= t);
      for (var x = 0u; x < ${H}u; x++) { dQ[x] += ds * k[ko + x]; }
    }
    if (q0 + lid < T) {
      for (var x = 0u; x < ${H}u; x++) { dq[qo + x] = dQ[x] * SCALE; }
    }`;
  const entry = rowsEntry(S, fast, plain);
  return `${rowsHeader(hd, S)}
${ROWS_BACKWARD_PARAMS}
@group(0) @binding(7) var<storage, read_write> dq: array<vec4f>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32${entry.builtins}) {
  let w = linear_workgroup(wid, nwg);
  if (w >= params.count) { return; }
  let qb = w % params.nb;
  let bh = w / params.nb;
  let h = bh % params.nH;
  let b = bh / params.nH;
  let kvh = h / params.group;
  let T = params.T;
  let q0 = qb * WG;
  let t = min(q0 + lid, T - 1u); // surplus lanes redo the last row and write nothing
  let qo = ((b * T + t) * params.nH + h) * ${H}u;
  let L = lse[(b * params.nH + h) * T + t];
  let Dt = Dg[(b * params.nH + h) * T + t];
  let kEnd = min(T, q0 + WG);
  ${entry.body}
}`;
}

/**
 * Rows per workgroup of the "rows" design: the subgroup size S when subgroups
 * of 4..32 lanes are there and wanted (then kernels carry the broadcast path),
 * else ROWS with no subgroup path.
 */
export async function rowsLanes(gpu: Gpu, useSubgroups: boolean): Promise<number> {
  if (!useSubgroups) return 0;
  const s = await gpu.subgroupSize();
  return isBroadcastSubgroupSize(s) ? s : 0;
}
