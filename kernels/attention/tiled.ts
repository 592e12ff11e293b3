/**
 * The "tiled" design of the attention kernels (GPUs): a workgroup owns BR rows
 * (queries; keys in dK/dV) and steps through BC columns with the column
 * operands' tiles in workgroup memory; see `mod.ts` for the math and the
 * choice between designs.
 *
 * @module
 */
import { LINEAR_WORKGROUP_WGSL } from "../runtime.ts";

/** Tile parameters of one kernel: BR owned rows, BC columns per step, TR x TC invocations. */
export interface AttentionTiles {
  /** Rows (queries; keys in dK/dV) a workgroup owns. */
  BR: number;
  /** Columns (keys; queries in dK/dV) per step. */
  BC: number;
  /** Invocations along the rows. */
  TR: number;
  /** Invocations along the columns (and the head dimension). */
  TC: number;
}

/** The three tiled kernels, for `attentionTiles`. */
export type AttentionKernel = "forward" | "dkv" | "dq";

/** Workgroup memory in floats of a kernel with these tiles (see the `var<workgroup>`s below). */
function workgroupFloats(kind: AttentionKernel, t: AttentionTiles, hd: number): number {
  const hdp = hd + 1;
  switch (kind) {
    case "forward": // Qs, Ks, Vs, Ps, Mx
      return t.BR * hdp + 2 * t.BC * hdp + t.BR * t.BC + t.BR * t.TC;
    case "dkv": // Ks, Vs, Qs, dOs, Ls, Ds, Ps, dSs
      return 2 * t.BR * hdp + 2 * t.BC * hdp + 2 * t.BC + 2 * t.BR * t.BC;
    case "dq": // Qs, dOs, Ks, Vs, dSs
      return 2 * t.BR * hdp + 2 * t.BC * hdp + t.BR * t.BC;
  }
}

/**
 * Preferred tiles before fitting to the workgroup memory: 64 invocations, each
 * with a 4x4 block of scores and a 4 x hd/8 block of the output.
 */
const PREFERRED: AttentionTiles = { BR: 32, BC: 32, TR: 8, TC: 8 };

/**
 * The tiles the tiled design uses for head_dim `hd` within `maxBytes` of
 * workgroup memory: the preferred ones, halving the larger of BC/BR (BC first)
 * until they fit, with TC dividing both BC and hd and TR dividing BR.
 */
export function attentionTiles(
  kind: AttentionKernel,
  hd: number,
  maxBytes: number,
): AttentionTiles {
  let { BR, BC, TR, TC } = PREFERRED;
  for (;;) {
    TR = Math.min(TR, BR);
    TC = Math.min(TC, BC);
    while (hd % TC !== 0) TC /= 2;
    const t = { BR, BC, TR, TC };
    if (workgroupFloats(kind, t, hd) * 4 <= maxBytes) return t;
    if (BR === 1 && BC === 1) break;
    if (BC >= BR && BC > 1) BC /= 2;
    else BR /= 2;
  }
  throw new RangeError(
    `attention: head_dim ${hd} does not fit this device's ${maxBytes} bytes of workgroup memory`,
  );
}

/** WGSL constants shared by the three tiled kernels. */
function constants(t: AttentionTiles, hd: number): string {
  return `
const BR = ${t.BR}u; const BC = ${t.BC}u; const TR = ${t.TR}u; const TC = ${t.TC}u;
const RR = ${t.BR / t.TR}u; const RC = ${t.BC / t.TC}u; const RD = ${hd / t.TC}u;
const HD = ${hd}u; const HDP = ${hd + 1}u; const NT = ${t.TR * t.TC}u;
const SCALE: f32 = ${Math.fround(1 / Math.sqrt(hd))};
const NEG: f32 = -3.0e38; // "minus infinity" that keeps exp(NEG - m) = 0 and NEG - NEG finite
`;
}

/**
 * Loads `rows` rows of hd floats, row r from `src[base(r)...]`, into a padded
 * workgroup tile (zeros for rows with `valid` false). Threads stride over the
 * rows*HD elements so that consecutive invocations read consecutive addresses.
 */
function tileLoad(
  dst: string,
  src: string,
  rows: string,
  valid: (r: string) => string,
  base: (r: string) => string,
): string {
  return `
  for (var e = lid; e < ${rows} * HD; e += NT) {
    let r = e / HD;
    let d = e - r * HD;
    var val = 0.0;
    if (${valid("r")}) { val = ${src}[${base("r")} + d]; }
    ${dst}[r * HDP + d] = val;
  }`;
}

export function tiledForwardWgsl(t: AttentionTiles, hd: number): string {
  return `${LINEAR_WORKGROUP_WGSL}
${constants(t, hd)}
struct Params { Tq: u32, Tk: u32, qPos0: u32, kvStride: u32, nH: u32, nKV: u32, group: u32, nqb: u32, count: u32 }
@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;
@group(0) @binding(5) var<uniform> params: Params;

var<workgroup> Qs: array<f32, BR * HDP>;
var<workgroup> Ks: array<f32, BC * HDP>;
var<workgroup> Vs: array<f32, BC * HDP>;
var<workgroup> Ps: array<f32, BR * BC>; // probabilities of this block, [query][key]
var<workgroup> Mx: array<f32, BR * TC>; // per-invocation partial row maxima

@compute @workgroup_size(NT)
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let w = linear_workgroup(wid, nwg);
  if (w >= params.count) { return; }
  let qb = w % params.nqb;
  let bh = w / params.nqb;
  let h = bh % params.nH;
  let b = bh / params.nH;
  let kvh = h / params.group;
  let tr = lid / TC;
  let tc = lid % TC;
  let q0 = qb * BR;
  let Tq = params.Tq;
  let Tk = params.Tk;
  ${
    tileLoad("Qs", "q", "BR", (r) =>
      `q0 + ${r} < Tq`, (r) =>
      `((b * Tq + q0 + ${r}) * params.nH + h) * HD`)
  }
  // Keys [0, kEnd) are visible to some query of this block.
  let kEnd = min(Tk, params.qPos0 + min(q0 + BR, Tq));
  let nkb = (kEnd + BC - 1u) / BC;

  var m: array<f32, RR>;
  var l: array<f32, RR>;
  var acc: array<array<f32, RD>, RR>;
  for (var i = 0u; i < RR; i++) { m[i] = NEG; }
  for (var kb = 0u; kb < nkb; kb++) {
    let k0 = kb * BC;
    workgroupBarrier(); // the previous block's reads of Ks, Vs, Ps, Mx are done
    ${
    tileLoad("Ks", "k", "BC", (r) =>
      `k0 + ${r} < Tk`, (r) =>
      `((b * params.kvStride + k0 + ${r}) * params.nKV + kvh) * HD`)
  }
    ${
    tileLoad("Vs", "v", "BC", (r) =>
      `k0 + ${r} < Tk`, (r) =>
      `((b * params.kvStride + k0 + ${r}) * params.nKV + kvh) * HD`)
  }
    workgroupBarrier();

    // s = Q K^T for rows tr + TR i and keys tc + TC c.
    // Initialized explicitly: seen with Deno 2.9.6 (Naga -> Vulkan), a \`var\`
    // declared in a loop WITHOUT an initializer keeps the previous iteration's
    // value instead of being zeroed as WGSL says; with an initializer it is reset.
    var s = array<array<f32, RC>, RR>();
    for (var d = 0u; d < HD; d++) {
      var qv: array<f32, RR>;
      var kv: array<f32, RC>;
      for (var i = 0u; i < RR; i++) { qv[i] = Qs[(tr + TR * i) * HDP + d]; }
      for (var c = 0u; c < RC; c++) { kv[c] = Ks[(tc + TC * c) * HDP + d]; }
      for (var i = 0u; i < RR; i++) {
        for (var c = 0u; c < RC; c++) { s[i][c] = fma(qv[i], kv[c], s[i][c]); }
      }
    }
    for (var i = 0u; i < RR; i++) {
      let r = tr + TR * i;
      let pos = params.qPos0 + q0 + r;
      var mx = NEG;
      for (var c = 0u; c < RC; c++) {
        let j = k0 + tc + TC * c;
        var sv = s[i][c] * SCALE;
        if (j > pos || j >= Tk) { sv = NEG; }
        s[i][c] = sv;
        mx = max(mx, sv);
      }
      Mx[r * TC + tc] = mx;
    }
    workgroupBarrier();
    var alpha: array<f32, RR>;
    for (var i = 0u; i < RR; i++) {
      let r = tr + TR * i;
      var mx = m[i];
      for (var u = 0u; u < TC; u++) { mx = max(mx, Mx[r * TC + u]); }
      alpha[i] = exp(m[i] - mx);
      m[i] = mx;
      for (var c = 0u; c < RC; c++) { Ps[r * BC + tc + TC * c] = exp(s[i][c] - mx); }
    }
    workgroupBarrier();
    for (var i = 0u; i < RR; i++) {
      l[i] *= alpha[i];
      for (var x = 0u; x < RD; x++) { acc[i][x] *= alpha[i]; }
    }
    // acc += P V for dims tc + TC x; every invocation of a row sums l in the same order.
    for (var j = 0u; j < BC; j++) {
      var pv: array<f32, RR>;
      var vv: array<f32, RD>;
      for (var i = 0u; i < RR; i++) { pv[i] = Ps[(tr + TR * i) * BC + j]; l[i] += pv[i]; }
      for (var x = 0u; x < RD; x++) { vv[x] = Vs[j * HDP + tc + TC * x]; }
      for (var i = 0u; i < RR; i++) {
        for (var x = 0u; x < RD; x++) { acc[i][x] = fma(pv[i], vv[x], acc[i][x]); }
      }
    }
  }
  for (var i = 0u; i < RR; i++) {
    let t = q0 + tr + TR * i;
    if (t < Tq) {
      let inv = 1.0 / l[i];
      let o = ((b * Tq + t) * params.nH + h) * HD;
      for (var x = 0u; x < RD; x++) { out[o + tc + TC * x] = acc[i][x] * inv; }
      if (tc == 0u) { lse[(b * params.nH + h) * Tq + t] = m[i] + log(l[i]); }
    }
  }
}`;
}

/** Shared by both backward kernels: the T / head counts in a uniform. */
const BACKWARD_PARAMS = `
struct Params { T: u32, nH: u32, nKV: u32, group: u32, nb: u32, count: u32 }
@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read> dOut: array<f32>;
@group(0) @binding(4) var<storage, read> lse: array<f32>;
@group(0) @binding(5) var<storage, read> Dg: array<f32>;
@group(0) @binding(6) var<uniform> params: Params;`;

/**
 * s (scores) and dp = dO V^T for an RR x RC block: rows `rowTile` rows
 * (rt + RT i), columns `colTile` rows (ct + CT c), fused in one pass over hd.
 */
function scoresAndDp(a: {
  rowA: string;
  rowB: string;
  colA: string;
  colB: string;
  row: (i: string) => string;
  col: (c: string) => string;
}): string {
  return `
    // Explicit initializers: see the forward kernel (Naga loop-variable hazard).
    var s = array<array<f32, RC>, RR>();
    var dp = array<array<f32, RC>, RR>();
    for (var d = 0u; d < HD; d++) {
      var ra: array<f32, RR>;
      var rb: array<f32, RR>;
      var ca: array<f32, RC>;
      var cb: array<f32, RC>;
      for (var i = 0u; i < RR; i++) {
        ra[i] = ${a.rowA}[(${a.row("i")}) * HDP + d];
        rb[i] = ${a.rowB}[(${a.row("i")}) * HDP + d];
      }
      for (var c = 0u; c < RC; c++) {
        ca[c] = ${a.colA}[(${a.col("c")}) * HDP + d];
        cb[c] = ${a.colB}[(${a.col("c")}) * HDP + d];
      }
      for (var i = 0u; i < RR; i++) {
        for (var c = 0u; c < RC; c++) {
          s[i][c] = fma(ra[i], ca[c], s[i][c]);
          dp[i][c] = fma(rb[i], cb[c], dp[i][c]);
        }
      }
    }`;
}

export function tiledDkvWgsl(t: AttentionTiles, hd: number): string {
  return `${LINEAR_WORKGROUP_WGSL}
${constants(t, hd)}
${BACKWARD_PARAMS}
@group(0) @binding(7) var<storage, read_write> dk: array<f32>;
@group(0) @binding(8) var<storage, read_write> dv: array<f32>;

var<workgroup> Ks: array<f32, BR * HDP>;
var<workgroup> Vs: array<f32, BR * HDP>;
var<workgroup> Qs: array<f32, BC * HDP>;
var<workgroup> dOs: array<f32, BC * HDP>;
var<workgroup> Ls: array<f32, BC>;
var<workgroup> Ds: array<f32, BC>;
var<workgroup> Ps: array<f32, BR * BC>;  // [key][query]
var<workgroup> dSs: array<f32, BR * BC>; // [key][query]

@compute @workgroup_size(NT)
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let w = linear_workgroup(wid, nwg);
  if (w >= params.count) { return; }
  // w = (b * nKV + kvh) * nb + kb: this workgroup owns keys k0 .. k0 + BR - 1.
  let kb = w % params.nb;
  let bk = w / params.nb;
  let kvh = bk % params.nKV;
  let b = bk / params.nKV;
  let tr = lid / TC;
  let tc = lid % TC;
  let T = params.T;
  let nH = params.nH;
  let k0 = kb * BR;
  ${
    tileLoad("Ks", "k", "BR", (r) =>
      `k0 + ${r} < T`, (r) =>
      `((b * T + k0 + ${r}) * params.nKV + kvh) * HD`)
  }
  ${
    tileLoad("Vs", "v", "BR", (r) =>
      `k0 + ${r} < T`, (r) =>
      `((b * T + k0 + ${r}) * params.nKV + kvh) * HD`)
  }
  var dK: array<array<f32, RD>, RR>;
  var dV: array<array<f32, RD>, RR>;
  let nqb = (T + BC - 1u) / BC;
  for (var g = 0u; g < params.group; g++) {
    let h = kvh * params.group + g;
    // Query blocks that end before k0 see none of these keys.
    for (var qb = k0 / BC; qb < nqb; qb++) {
      let q0 = qb * BC;
      workgroupBarrier(); // the previous block's reads of Qs, dOs, Ps, dSs are done
      ${
    tileLoad("Qs", "q", "BC", (r) => `q0 + ${r} < T`, (r) => `((b * T + q0 + ${r}) * nH + h) * HD`)
  }
      ${
    tileLoad("dOs", "dOut", "BC", (r) =>
      `q0 + ${r} < T`, (r) =>
      `((b * T + q0 + ${r}) * nH + h) * HD`)
  }
      for (var e = lid; e < BC; e += NT) {
        var lv = 0.0;
        var dv0 = 0.0;
        if (q0 + e < T) {
          lv = lse[(b * nH + h) * T + q0 + e];
          dv0 = Dg[(b * nH + h) * T + q0 + e];
        }
        Ls[e] = lv;
        Ds[e] = dv0;
      }
      workgroupBarrier();
      ${
    scoresAndDp({
      rowA: "Ks",
      rowB: "Vs",
      colA: "Qs",
      colB: "dOs",
      row: (i) => `tr + TR * ${i}`,
      col: (c) => `tc + TC * ${c}`,
    })
  }
      for (var i = 0u; i < RR; i++) {
        let r = tr + TR * i;
        let j = k0 + r;
        for (var c = 0u; c < RC; c++) {
          let cq = tc + TC * c;
          let tq = q0 + cq;
          var p = 0.0;
          if (tq < T && j <= tq) { p = exp(s[i][c] * SCALE - Ls[cq]); }
          Ps[r * BC + cq] = p;
          dSs[r * BC + cq] = p * (dp[i][c] - Ds[cq]);
        }
      }
      workgroupBarrier();
      // dV += P^T dO, dK += dS^T Q for dims tc + TC x.
      for (var c = 0u; c < BC; c++) {
        var pv: array<f32, RR>;
        var sv: array<f32, RR>;
        var ov: array<f32, RD>;
        var qv: array<f32, RD>;
        for (var i = 0u; i < RR; i++) {
          pv[i] = Ps[(tr + TR * i) * BC + c];
          sv[i] = dSs[(tr + TR * i) * BC + c];
        }
        for (var x = 0u; x < RD; x++) {
          ov[x] = dOs[c * HDP + tc + TC * x];
          qv[x] = Qs[c * HDP + tc + TC * x];
        }
        for (var i = 0u; i < RR; i++) {
          for (var x = 0u; x < RD; x++) {
            dV[i][x] = fma(pv[i], ov[x], dV[i][x]);
            dK[i][x] = fma(sv[i], qv[x], dK[i][x]);
          }
        }
      }
    }
  }
  for (var i = 0u; i < RR; i++) {
    let j = k0 + tr + TR * i;
    if (j < T) {
      let o = ((b * T + j) * params.nKV + kvh) * HD;
      for (var x = 0u; x < RD; x++) {
        dk[o + tc + TC * x] = dK[i][x] * SCALE;
        dv[o + tc + TC * x] = dV[i][x];
      }
    }
  }
}`;
}

export function tiledDqWgsl(t: AttentionTiles, hd: number): string {
  return `${LINEAR_WORKGROUP_WGSL}
${constants(t, hd)}
${BACKWARD_PARAMS}
@group(0) @binding(7) var<storage, read_write> dq: array<f32>;

var<workgroup> Qs: array<f32, BR * HDP>;
var<workgroup> dOs: array<f32, BR * HDP>;
var<workgroup> Ks: array<f32, BC * HDP>;
var<workgroup> Vs: array<f32, BC * HDP>;
var<workgroup> dSs: array<f32, BR * BC>; // [query][key]

@compute @workgroup_size(NT)
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let w = linear_workgroup(wid, nwg);
  if (w >= params.count) { return; }
  // w = (b * nH + h) * nb + qb: this workgroup owns queries q0 .. q0 + BR - 1.
  let qb = w % params.nb;
  let bh = w / params.nb;
  let h = bh % params.nH;
  let b = bh / params.nH;
  let kvh = h / params.group;
  let tr = lid / TC;
  let tc = lid % TC;
  let T = params.T;
  let nH = params.nH;
  let q0 = qb * BR;
  ${tileLoad("Qs", "q", "BR", (r) => `q0 + ${r} < T`, (r) => `((b * T + q0 + ${r}) * nH + h) * HD`)}
  ${
    tileLoad("dOs", "dOut", "BR", (r) =>
      `q0 + ${r} < T`, (r) =>
      `((b * T + q0 + ${r}) * nH + h) * HD`)
  }
  var Lr: array<f32, RR>;
  var Dr: array<f32, RR>;
  for (var i = 0u; i < RR; i++) {
    let t = q0 + tr + TR * i;
    if (t < T) {
      Lr[i] = lse[(b * nH + h) * T + t];
      Dr[i] = Dg[(b * nH + h) * T + t];
    }
  }
  var dQ: array<array<f32, RD>, RR>;
  let kEnd = min(T, q0 + BR);
  let nkb = (kEnd + BC - 1u) / BC;
  for (var kb = 0u; kb < nkb; kb++) {
    let k0 = kb * BC;
    workgroupBarrier(); // the previous block's reads of Ks, dSs are done
    ${
    tileLoad("Ks", "k", "BC", (r) =>
      `k0 + ${r} < T`, (r) =>
      `((b * T + k0 + ${r}) * params.nKV + kvh) * HD`)
  }
    ${
    tileLoad("Vs", "v", "BC", (r) =>
      `k0 + ${r} < T`, (r) =>
      `((b * T + k0 + ${r}) * params.nKV + kvh) * HD`)
  }
    workgroupBarrier();
    ${
    scoresAndDp({
      rowA: "Qs",
      rowB: "dOs",
      colA: "Ks",
      colB: "Vs",
      row: (i) => `tr + TR * ${i}`,
      col: (c) => `tc + TC * ${c}`,
    })
  }
    for (var i = 0u; i < RR; i++) {
      let r = tr + TR * i;
      let tq = q0 + r;
      for (var c = 0u; c < RC; c++) {
        let ck = tc + TC * c;
        var ds = 0.0;
        if (k0 + ck <= tq && tq < T) {
          ds = exp(s[i][c] * SCALE - Lr[i]) * (dp[i][c] - Dr[i]);
        }
        dSs[r * BC + ck] = ds;
      }
    }
    workgroupBarrier();
    // dQ += dS K for dims tc + TC x.
    for (var j = 0u; j < BC; j++) {
      var sv: array<f32, RR>;
      var kv: array<f32, RD>;
      for (var i = 0u; i < RR; i++) { sv[i] = dSs[(tr + TR * i) * BC + j]; }
      for (var x = 0u; x < RD; x++) { kv[x] = Ks[j * HDP + tc + TC * x]; }
      for (var i = 0u; i < RR; i++) {
        for (var x = 0u; x < RD; x++) { dQ[i][x] = fma(sv[i], kv[x], dQ[i][x]); }
      }
    }
  }
  for (var i = 0u; i < RR; i++) {
    let t = q0 + tr + TR * i;
    if (t < T) {
      let o = ((b * T + t) * nH + h) * HD;
      for (var x = 0u; x < RD; x++) { dq[o + tc + TC * x] = dQ[i][x] * SCALE; }
    }
  }
}`;
}

/** The pipeline-cache key part of a tile shape. */
export function tileKey(t: AttentionTiles): string {
  return `${t.BR}x${t.BC}/${t.TR}x${t.TC}`;
}
