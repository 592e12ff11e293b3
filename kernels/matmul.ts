/**
 * The three matmuls of a linear layer `y = x W^T` (x `[M, K]`, W `[N, K]`, y `[M, N]`):
 *
 *   matmulXWt:  y[m, n]  (+)= sum_k x[m, k]  w[n, k]     forward
 *   matmulDyW:  dx[m, k] (+)= sum_n dy[m, n] w[n, k]     input gradient
 *   matmulDyTX: dw[n, k] (+)= sum_m dy[m, n] x[m, k]     weight gradient
 *
 * All three are one problem, C[R, C] (+)= sum_l A(r, l) B(c, l), that differ
 * only in which dimension of each operand is contiguous in memory:
 *
 *   form   R  C  L   A(r, l)               B(c, l)
 *   XWt    M  N  K   x[r*K + l]  (l contig) w[c*K + l]  (l contig)
 *   DyW    M  K  N   dy[r*N + l] (l contig) w[l*K + c]  (c contig)
 *   DyTX   N  K  M   dy[l*N + r] (r contig) x[l*K + c]  (c contig)
 *
 * so one generator writes every kernel, and the transposition lives entirely in
 * how operand tiles are loaded: each load walks the operand's contiguous
 * dimension with consecutive threads (coalesced), as vec4 when that dimension
 * is a multiple of 4 (then a vec4 never straddles an edge), as scalars otherwise.
 *
 * Cost per call: 2·R·C·L FLOP; at least 4·(R·L + C·L + R·C) bytes (plus R·C
 * more read when accumulating).
 *
 * Three kernel designs (`MatmulVariant`):
 *
 * - `tiled64` / `tiled128` (real GPUs): the classic design. A workgroup of
 *   16x16 threads owns a 64x64 or 128x128 output tile; per step of BK = 16 it
 *   stages A and B tiles in workgroup memory, transposed to [l][row] so the
 *   inner loop reads vec4s of 4 consecutive rows (a thread's rows are
 *   4·(ty + 16i)..+3: 2 distinct addresses per 32 threads for A, 16 consecutive
 *   vec4s for B: no bank conflicts), and each thread accumulates a 4x4 or 8x8
 *   register tile. Row strides in workgroup memory are padded by one vec4 so
 *   the transposing stores spread over banks. No subgroup size is assumed.
 *   128x128 is used when it still gives at least 256 workgroups; else 64x64
 *   (k/v projections and small batches would leave most SMs idle).
 * - `fallback` (CPU drivers: Mesa lavapipe/llvmpipe, SwiftShader): llvmpipe runs
 *   8 invocations as the lanes of one AVX2 vector; arithmetic is nearly free,
 *   and every load whose address differs across lanes is a scalar loop over
 *   the lanes (workgroup memory included: it is ordinary memory there, and
 *   barriers cost coroutine switches). So no workgroup memory: each invocation
 *   loads straight from the buffers (the CPU caches do the tiling) for a
 *   32 x 8 register tile, and the design maximizes multiply-adds per load
 *   component: vec4 loads along the contiguous dimension (4 components per
 *   lane loop), 4 reduction steps per iteration.
 * - `fallbackSubgroup` (CPU drivers with subgroups): as `fallback`, but the A
 *   values (the same for every lane of a workgroup) are loaded once, spread
 *   over the lanes, and handed round with `subgroupBroadcast` (an extract and a
 *   splat on llvmpipe), so one load serves all S lanes; B values are each
 *   lane's own. Register tiles: 32 x 8 (X W^T, dY W), 64 x 8 (dY^T X);
 *   problems of at most `SMALL_PROBLEM` multiply-adds use one row chunk x 4
 *   columns (8 x 4 without subgroups) since there compile time dominates. The
 *   subgroup size S is measured once per device by a probe kernel and is the
 *   workgroup size; the kernel still checks `subgroup_size == S` at run time
 *   and otherwise takes a plain dot-product loop, so correctness never rests
 *   on an assumed subgroup size.
 *
 * Measured (Mesa lavapipe, llvmpipe LLVM 15 256-bit, 2 cores shared with other
 * jobs, so timings vary 2x between runs), 1024³: a naive kernel ~0.2 GFLOP/s;
 * register tiles with scalar loads 1-4; `fallback` X W^T 20-35;
 * `fallbackSubgroup` X W^T 30-58, dY W and dY^T X 15-35 (they read rows
 * that change every reduction step). See bench/matmul_bench.ts.
 *
 * Work grid: the output tiles are numbered row-major and dispatched as a 1-D
 * count (`Gpu.dispatch` splits beyond 65535 into 2-D), so no shape can exceed a
 * grid dimension limit; surplus workgroups of the split return early
 * (workgroup-uniform, before any barrier).
 *
 * Sums run in a fixed order per output element (no atomics, no split-K): the
 * same inputs give bitwise the same outputs on the same device and variant.
 *
 * @module
 */
import {
  type Binding,
  type Dispatch,
  type Gpu,
  isBroadcastSubgroupSize,
  LINEAR_WORKGROUP_WGSL,
} from "./runtime.ts";

/** Which kernel design runs; `auto` picks by adapter (see the module comment). */
export type MatmulVariant = "auto" | "tiled64" | "tiled128" | "fallback" | "fallbackSubgroup";

/** Tuning overrides, for tests of every kernel design on any adapter. */
export interface MatmulOptions {
  /** Force a kernel design. `fallbackSubgroup` needs `gpu.features.subgroups`. */
  variant?: MatmulVariant;
  /** Force scalar loads (1) even where vec4 (4, the default when aligned) would do. */
  vec?: 1 | 4;
  /**
   * Fallback designs: rows and columns per invocation, for tuning. Rows: a
   * multiple of the lanes a row chunk spans (fallbackSubgroup: the subgroup
   * size, x4 for dY^T X with vec4 loads); columns: a multiple of 4 where the
   * B operand is read as vec4 across columns.
   */
  registerTile?: { rows: number; cols: number };
  /**
   * fallbackSubgroup: generate for this many lanes instead of the measured
   * subgroup size. Tests use it to run the kernel's subgroup-size-mismatch path.
   */
  subgroupLanes?: number;
}

/** Layout of one operand: is its reduction index (`l`) the contiguous one? */
type Contig = "red" | "out";

/** One matmul problem C[R, C] (+)= sum_l A(r, l) B(c, l), as seen by the generator. */
interface Problem {
  R: number;
  C: number;
  L: number;
  a: Contig;
  b: Contig;
}

/** Everything a generated kernel depends on (its pipeline cache key). */
interface KernelSpec {
  design: "tiled" | "fallback" | "fallbackSubgroup";
  a: Contig;
  b: Contig;
  /** Elements per load of A and B along their contiguous dimension. */
  va: 1 | 4;
  vb: 1 | 4;
  /** Elements per store of the output (4 when C % 4 == 0). */
  vo: 1 | 4;
  accumulate: boolean;
  /** tiled: output tile edge (64 or 128). */
  tile: number;
  /**
   * fallback designs: reduction indices per loop iteration (4 when L % 4 == 0:
   * an operand contiguous in l is then read as vec4, and an operand contiguous
   * in its output dimension issues 4 independent row loads per iteration).
   */
  step: 1 | 4;
  /** fallback designs: rows and columns per invocation, lanes per workgroup. */
  tm: number;
  tn: number;
  lanes: number;
}

function key(s: KernelSpec): string {
  const acc = s.accumulate ? "acc" : "set";
  return `matmul-${s.design}-a${s.a}${s.va}-b${s.b}${s.vb}-o${s.vo}-${acc}-t${s.tile}-` +
    `${s.tm}x${s.tn}x${s.lanes}-s${s.step}`;
}

// ---------------------------------------------------------------------------
// WGSL generation.

/** Bindings: 0 dims (uniform), 1 A, 2 B, 3 out. */
function header(s: KernelSpec): string {
  const ta = s.va === 4 ? "vec4f" : "f32";
  const tb = s.vb === 4 ? "vec4f" : "f32";
  return `${LINEAR_WORKGROUP_WGSL}
struct Dims { R: u32, C: u32, L: u32, colTiles: u32, tiles: u32, p0: u32, p1: u32, p2: u32 }
@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> A: array<${ta}>;
@group(0) @binding(2) var<storage, read> B: array<${tb}>;
@group(0) @binding(3) var<storage, read_write> O: array<${s.vo === 4 ? "vec4f" : "f32"}>;
`;
}

/** Writes (or adds) `value` to output element `index` (a scalar index, whatever O's view). */
function storeStatement(s: KernelSpec, index: string, value: string): string {
  const ref = s.vo === 4 ? `O[(${index}) / 4u][(${index}) % 4u]` : `O[${index}]`;
  return s.accumulate ? `${ref} = ${ref} + ${value};` : `${ref} = ${value};`;
}

/** Writes (or adds) the vec4 `value` at output element `index` (a multiple of 4; needs vo = 4). */
function storeVec4Statement(s: KernelSpec, index: string, value: string): string {
  const ref = `O[(${index}) / 4u]`;
  return s.accumulate ? `${ref} = ${ref} + ${value};` : `${ref} = ${value};`;
}

/** Workgroup memory of the tiled design with a `tile` x `tile` output tile. */
function tiledWorkgroupBytes(tile: number): number {
  return 2 * 16 * (tile / 4 + 1) * 16;
}

/**
 * The GPU design: 16x16 threads, a tile x tile output tile, BK = 16, operands
 * staged in workgroup memory as [l][row] vec4s with a padded row stride.
 */
function tiledWgsl(s: KernelSpec): string {
  const BM = s.tile;
  const BK = 16;
  const T = BM / 16; // rows (and columns) per thread
  const G = T / 4; // vec4 groups per thread per side
  const P = BM / 4 + 1; // padded vec4 stride of one l-row in workgroup memory
  const lines: string[] = [];
  lines.push(header(s));
  lines.push(`var<workgroup> As: array<vec4f, ${BK * P}>;`);
  lines.push(`var<workgroup> Bs: array<vec4f, ${BK * P}>;`);

  // Loads one operand tile into workgroup memory; `rows` is R or C.
  const loadTile = (name: "A" | "B", sh: string, contig: Contig, v: 1 | 4, rows: string) => {
    const out: string[] = [];
    const base = name === "A" ? "r0" : "c0";
    if (contig === "red") {
      // Consecutive threads walk l (the contiguous index) within a row.
      const perRow = BK / v;
      const count = BM * perRow;
      for (let p = 0; p < count / 256; p++) {
        out.push(`{
    let idx = lid + ${p * 256}u;
    let row = idx / ${perRow}u;
    let lq = idx % ${perRow}u;
    let g = ${base} + row;
    let l = l0 + lq * ${v}u;
    var v = ${v === 4 ? "vec4f(0.0)" : "0.0"};
    if (g < ${rows} && l < dims.L) { v = ${name}[(g * dims.L + l)${v === 4 ? " / 4u" : ""}]; }`);
        if (v === 4) {
          for (let q = 0; q < 4; q++) {
            out.push(`    ${sh}[(lq * 4u + ${q}u) * ${P}u + row / 4u][row % 4u] = v[${q}];`);
          }
        } else {
          out.push(`    ${sh}[lq * ${P}u + row / 4u][row % 4u] = v;`);
        }
        out.push(`  }`);
      }
    } else {
      // Consecutive threads walk the row index (contiguous) within one l.
      const perL = BM / v;
      const count = BK * perL;
      for (let p = 0; p < count / 256; p++) {
        out.push(`{
    let idx = lid + ${p * 256}u;
    let lk = idx / ${perL}u;
    let rq = idx % ${perL}u;
    let g = ${base} + rq * ${v}u;
    let l = l0 + lk;
    var v = ${v === 4 ? "vec4f(0.0)" : "0.0"};
    if (g < ${rows} && l < dims.L) { v = ${name}[(l * ${rows} + g)${v === 4 ? " / 4u" : ""}]; }`);
        if (v === 4) out.push(`    ${sh}[lk * ${P}u + rq] = v;`);
        else out.push(`    ${sh}[lk * ${P}u + rq / 4u][rq % 4u] = v;`);
        out.push(`  }`);
      }
    }
    return out.join("\n  ");
  };

  const accDecl: string[] = [];
  for (let i = 0; i < T; i++) {
    for (let j = 0; j < G; j++) accDecl.push(`var acc${i}_${j} = vec4f(0.0);`);
  }
  const inner: string[] = [];
  for (let g = 0; g < G; g++) inner.push(`let a${g} = As[k * ${P}u + ty + ${16 * g}u];`);
  for (let j = 0; j < G; j++) inner.push(`let b${j} = Bs[k * ${P}u + tx + ${16 * j}u];`);
  for (let i = 0; i < T; i++) {
    for (let j = 0; j < G; j++) {
      inner.push(`acc${i}_${j} = fma(vec4f(a${i >> 2}[${i & 3}]), b${j}, acc${i}_${j});`);
    }
  }
  const stores: string[] = [];
  for (let i = 0; i < T; i++) {
    stores.push(`{ let r = r0 + (ty + ${16 * (i >> 2)}u) * 4u + ${i & 3}u;
    if (r < dims.R) {`);
    for (let j = 0; j < G; j++) {
      if (s.vo === 4) {
        // C % 4 == 0: the thread's 4 columns are wholly in or out.
        stores.push(
          `      { let c = c0 + (tx + ${16 * j}u) * 4u; if (c < dims.C) { ${
            storeVec4Statement(s, "r * dims.C + c", `acc${i}_${j}`)
          } } }`,
        );
        continue;
      }
      for (let q = 0; q < 4; q++) {
        const c = `c0 + (tx + ${16 * j}u) * 4u + ${q}u`;
        stores.push(
          `      { let c = ${c}; if (c < dims.C) { ${
            storeStatement(s, "r * dims.C + c", `acc${i}_${j}[${q}]`)
          } } }`,
        );
      }
    }
    stores.push(`    } }`);
  }

  lines.push(`
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let tile = linear_workgroup(wid, nwg);
  if (tile >= dims.tiles) { return; }
  let r0 = (tile / dims.colTiles) * ${BM}u;
  let c0 = (tile % dims.colTiles) * ${BM}u;
  let tx = lid % 16u;
  let ty = lid / 16u;
  ${accDecl.join("\n  ")}
  for (var l0 = 0u; l0 < dims.L; l0 += ${BK}u) {
  ${loadTile("A", "As", s.a, s.va, "dims.R")}
  ${loadTile("B", "Bs", s.b, s.vb, "dims.C")}
    workgroupBarrier();
    for (var k = 0u; k < ${BK}u; k++) {
      ${inner.join("\n      ")}
    }
    workgroupBarrier();
  }
  ${stores.join("\n  ")}
}`);
  return lines.join("\n");
}

/**
 * Loads by one invocation of its `n` rows of A (from r0, bounded by R) or
 * columns of B (from cb, bounded by C) for reduction offsets l + q, q < step,
 * as `a{i}_{q}` / `b{j}_{q}`. A vec4 along l covers q = 0..3 of one row; a
 * vec4 across rows covers 4 rows (their start is a multiple of 4 and the
 * dimension too, so it is wholly in or out); out-of-range rows load a clamped
 * index.
 */
function directLoads(
  operand: "A" | "B",
  contig: Contig,
  vec: 1 | 4,
  n: number,
  step: 1 | 4,
): string[] {
  const [name, first, dim] = operand === "A" ? ["a", "r0", "R"] : ["b", "cb", "C"];
  const out: string[] = [];
  if (contig === "red") {
    for (let i = 0; i < n; i++) {
      const r = `min(${first} + ${i}u, dims.${dim} - 1u)`;
      if (vec === 4) {
        out.push(`let v${name}${i} = ${operand}[(${r} * dims.L + l) / 4u];`);
        for (let q = 0; q < 4; q++) out.push(`let ${name}${i}_${q} = v${name}${i}[${q}];`);
      } else {
        out.push(`let ${name}${i}_0 = ${operand}[${r} * dims.L + l];`);
      }
    }
    return out;
  }
  for (let q = 0; q < step; q++) {
    if (vec === 4) {
      for (let g = 0; g < n / 4; g++) {
        const r = `min(${first} + ${4 * g}u, dims.${dim} - 4u)`;
        out.push(`let v${name}${g}_${q} = ${operand}[((l + ${q}u) * dims.${dim} + ${r}) / 4u];`);
        for (let p = 0; p < 4; p++) {
          out.push(`let ${name}${4 * g + p}_${q} = v${name}${g}_${q}[${p}];`);
        }
      }
    } else {
      for (let i = 0; i < n; i++) {
        out.push(
          `let ${name}${i}_${q} = ${operand}[(l + ${q}u) * dims.${dim} + ` +
            `min(${first} + ${i}u, dims.${dim} - 1u)];`,
        );
      }
    }
  }
  return out;
}

/**
 * The CPU-driver designs: each invocation owns TM rows x TN columns and reads
 * the buffers directly. The reduction advances `step` = 4 at a time when
 * L % 4 == 0 (an operand contiguous in l is then read as vec4), else 1. A values
 * are named a{i}_{q} (row i, reduction offset q), B values b{j}_{q}; out-of-range
 * rows and columns load a clamped (valid) index and are never stored.
 */
function fallbackWgsl(s: KernelSpec): string {
  const { tm: TM, tn: TN, lanes: S, step } = s;
  const sub = s.design === "fallbackSubgroup";
  // Rows of A one subgroup chunk covers: a lane loads 4 consecutive rows when
  // A is row-contiguous and loaded as vec4, else one row.
  const chunkRows = s.a === "out" && s.va === 4 ? 4 : 1;

  // Loads of B for this invocation's columns c0 + lane*TN + j.
  const loadB = directLoads("B", s.b, s.vb, TN, step);

  // Loads of A: either every row by every lane (plain), or one chunk per lane.
  const loadA = (broadcast: boolean): string[] => {
    if (!broadcast) return directLoads("A", s.a, s.va, TM, step);
    const out: string[] = [];
    // Chunk c of this lane covers rows r0 + (lane + S*c)*chunkRows ..+chunkRows.
    const chunks = TM / (S * chunkRows);
    for (let c = 0; c < chunks; c++) {
      const row = `r0 + (lane + ${S * c}u) * ${chunkRows}u`;
      if (s.a === "red") {
        const r = `min(${row}, dims.R - 1u)`;
        if (s.va === 4) out.push(`let ca${c} = A[(${r} * dims.L + l) / 4u];`);
        else out.push(`let ca${c} = A[${r} * dims.L + l];`);
      } else {
        for (let q = 0; q < step; q++) {
          if (s.va === 4) {
            out.push(
              `let ca${c}_${q} = A[((l + ${q}u) * dims.R + min(${row}, dims.R - 4u)) / 4u];`,
            );
          } else {
            out.push(`let ca${c}_${q} = A[(l + ${q}u) * dims.R + min(${row}, dims.R - 1u)];`);
          }
        }
      }
    }
    for (let i = 0; i < TM; i++) {
      const c = Math.floor(i / (S * chunkRows));
      const src = Math.floor(i / chunkRows) % S;
      const p = i % chunkRows;
      for (let q = 0; q < step; q++) {
        let value: string;
        if (s.a === "red") value = s.va === 4 ? `ca${c}[${q}]` : `ca${c}`;
        else value = s.va === 4 ? `ca${c}_${q}[${p}]` : `ca${c}_${q}`;
        out.push(`let a${i}_${q} = subgroupBroadcast(${value}, ${src}u);`);
      }
    }
    return out;
  };

  const fmas: string[] = [];
  for (let i = 0; i < TM; i++) {
    for (let j = 0; j < TN; j++) {
      for (let q = 0; q < step; q++) {
        fmas.push(`acc${i}_${j} = fma(a${i}_${q}, b${j}_${q}, acc${i}_${j});`);
      }
    }
  }
  const accDecl: string[] = [];
  for (let i = 0; i < TM; i++) for (let j = 0; j < TN; j++) accDecl.push(`var acc${i}_${j} = 0.0;`);
  // Stores: per row, a run-time loop over the row's vec4s (or scalars) that
  // picks its value with a select chain. Unrolled stores would each be one of
  // llvmpipe's per-lane loops (two when accumulating), and hundreds of them
  // make the pipeline take seconds to compile; the selects cost (TN/4)² or TN²
  // operations per row, nothing next to the reduction.
  const stores: string[] = [];
  const per = s.vo === 4 ? 4 : 1;
  for (let i = 0; i < TM; i++) {
    const values: string[] = [];
    for (let j = 0; j < TN; j += per) {
      values.push(
        per === 4
          ? `vec4f(acc${i}_${j}, acc${i}_${j + 1}, acc${i}_${j + 2}, acc${i}_${j + 3})`
          : `acc${i}_${j}`,
      );
    }
    const pick = values.slice(1).map((v, g) => `v = select(v, ${v}, g == ${g + 1}u);`);
    const index = `(r0 + ${i}u) * dims.C + cb + g * ${per}u`;
    stores.push(`if (r0 + ${i}u < dims.R) {
      for (var g = 0u; g < ${values.length}u; g++) {
        if (cb + g * ${per}u < dims.C) {
          var v = ${values[0]};
          ${pick.join("\n          ")}
          ${per === 4 ? storeVec4Statement(s, index, "v") : storeStatement(s, index, "v")}
        }
      }
    }`);
  }
  const tiled = (broadcast: boolean) =>
    `let cb = c0 + lane * ${TN}u;
    ${accDecl.join("\n    ")}
    for (var l = 0u; l < dims.L; l += ${step}u) {
      ${loadA(broadcast).join("\n      ")}
      ${loadB.join("\n      ")}
      ${fmas.join("\n      ")}
    }
    ${stores.join("\n    ")}`;

  // Index of A(r, l) and B(c, l) in their scalar views, for the slow path.
  const aIndex = s.a === "red" ? "r * dims.L + l" : "l * dims.R + r";
  const bIndex = s.b === "red" ? "c * dims.L + l" : "l * dims.C + c";
  const aLoad = s.va === 4 ? `A[(${aIndex}) / 4u][(${aIndex}) % 4u]` : `A[${aIndex}]`;
  const bLoad = s.vb === 4 ? `B[(${bIndex}) / 4u][(${bIndex}) % 4u]` : `B[${bIndex}]`;

  if (!sub) {
    return `${header(s)}
@compute @workgroup_size(${S})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let tile = linear_workgroup(wid, nwg);
  if (tile >= dims.tiles) { return; }
  let r0 = (tile / dims.colTiles) * ${TM}u;
  let c0 = (tile % dims.colTiles) * ${S * TN}u;
  let lane = lid;
  ${tiled(false)}
}`;
  }
  // With a subgroup of exactly the workgroup, lanes are numbered by their
  // subgroup id so that broadcast sources and column owners agree. Any other
  // subgroup size takes a plain dot-product loop per output: slow but correct,
  // and small, so the pipeline compiles about as fast as without it.
  return `${header(s)}
@compute @workgroup_size(${S})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32,
        @builtin(subgroup_size) sgSize: u32, @builtin(subgroup_invocation_id) sgId: u32) {
  let tile = linear_workgroup(wid, nwg);
  if (tile >= dims.tiles) { return; }
  let r0 = (tile / dims.colTiles) * ${TM}u;
  let c0 = (tile % dims.colTiles) * ${S * TN}u;
  if (sgSize == ${S}u) {
    let lane = sgId;
    ${tiled(true)}
  } else {
    let cb = c0 + lid * ${TN}u;
    for (var i = 0u; i < ${TM}u; i++) {
      for (var j = 0u; j < ${TN}u; j++) {
        let r = r0 + i;
        let c = cb + j;
        if (r < dims.R && c < dims.C) {
          var acc = 0.0;
          for (var l = 0u; l < dims.L; l++) { acc = fma(${aLoad}, ${bLoad}, acc); }
          ${storeStatement(s, "r * dims.C + c", "acc")}
        }
      }
    }
  }
}`;
}

// ---------------------------------------------------------------------------
// Choosing a design.

/** Multiply-adds up to which the CPU-driver designs use their small register tile. */
export const SMALL_PROBLEM = 2 ** 18;

async function chooseSpec(
  gpu: Gpu,
  pr: Problem,
  accumulate: boolean,
  opts: MatmulOptions | undefined,
): Promise<KernelSpec> {
  let variant = opts?.variant ?? "auto";
  const sgSize = (variant === "auto" && gpu.adapterSummary.isFallback) ||
      variant === "fallbackSubgroup"
    ? await gpu.subgroupSize()
    : 0;
  // A subgroup of 4..32 lanes in one workgroup of that size; beyond that the
  // chunked broadcast would need more rows than a tile holds.
  const sgUsable = isBroadcastSubgroupSize(sgSize);
  if (variant === "auto") {
    if (gpu.adapterSummary.isFallback) variant = sgUsable ? "fallbackSubgroup" : "fallback";
    else {
      // 128x128 stages 2 x 16 x 33 vec4s (16.5 KiB) in workgroup memory: more
      // than WebGPU's default 16 KiB, so only where the device allows it.
      const tiles128 = Math.ceil(pr.R / 128) * Math.ceil(pr.C / 128);
      const fits128 = gpu.limits.maxComputeWorkgroupStorageSize >= tiledWorkgroupBytes(128);
      variant = tiles128 >= 256 && fits128 ? "tiled128" : "tiled64";
    }
  }
  if (variant === "fallbackSubgroup" && !sgUsable) {
    throw new Error(
      `matmul: variant fallbackSubgroup needs subgroups of 4..32 lanes ` +
        `(this device: ${gpu.features.subgroups ? sgSize : "no subgroups"})`,
    );
  }
  // vec4 loads along an operand's contiguous dimension need that dimension to
  // be a multiple of 4 (so rows start 16-byte aligned and no vec4 straddles an
  // edge).
  const contigLen = (c: Contig, outLen: number) => c === "red" ? pr.L : outLen;
  const vecOk = (c: Contig, outLen: number) => opts?.vec !== 1 && contigLen(c, outLen) % 4 === 0;
  const va: 1 | 4 = vecOk(pr.a, pr.R) ? 4 : 1;
  const vb: 1 | 4 = vecOk(pr.b, pr.C) ? 4 : 1;
  const step: 1 | 4 = opts?.vec !== 1 && pr.L % 4 === 0 ? 4 : 1;
  const vo: 1 | 4 = opts?.vec !== 1 && pr.C % 4 === 0 ? 4 : 1;
  // Below 2^18 multiply-adds a call takes well under a millisecond whatever
  // the tile; what counts there is the pipeline's compile time (model tests).
  const small = pr.R * pr.C * pr.L <= SMALL_PROBLEM;
  const base = { a: pr.a, b: pr.b, va, vb, vo, accumulate, step };
  switch (variant) {
    case "tiled64":
    case "tiled128":
      return {
        ...base,
        design: "tiled",
        tile: variant === "tiled64" ? 64 : 128,
        tm: 0,
        tn: 0,
        lanes: 256,
      };
    case "fallback": {
      // 32 x 8 per invocation: 40 vec4 loads for 1024 multiply-adds per 4
      // reduction steps. (32 x 16 runs ~1.5x faster at large shapes but takes
      // ~3 s per pipeline to compile, cold; this path only serves CPU drivers
      // without subgroups.) Small problems take 8 x 4, which compiles in a
      // fraction of the time and loses nothing measurable at that size.
      const [tm0, tn0] = small ? [8, 4] : [32, 8];
      const tm = opts?.registerTile?.rows ?? tm0;
      const tn = opts?.registerTile?.cols ?? tn0;
      checkRegisterTile(tm, tn, 1, base);
      return { ...base, vo: tn % 4 ? 1 : vo, design: "fallback", tile: 0, tm, tn, lanes: 8 };
    }
    case "fallbackSubgroup": {
      const lanes = opts?.subgroupLanes ?? sgSize;
      const chunkRows = pr.a === "out" && va === 4 ? 4 : 1;
      // Measured on llvmpipe: 32 x 8 when A is read along l (X W^T, dY W);
      // 64 x 8 for dY^T X, where more reuse per load makes up for rows that
      // change every reduction step (64 x 16 is ~15% faster still but takes
      // ~9 s to compile with accumulation, cold). Small problems: one chunk
      // of rows by 4 columns (fast to compile).
      const [tm0, tn0] = small ? [0, 4] : pr.a === "out" ? [64, 8] : [32, 8];
      const tm = opts?.registerTile?.rows ?? Math.max(tm0, lanes * chunkRows);
      const tn = opts?.registerTile?.cols ?? tn0;
      checkRegisterTile(tm, tn, lanes * chunkRows, base);
      return { ...base, vo: tn % 4 ? 1 : vo, design: "fallbackSubgroup", tile: 0, tm, tn, lanes };
    }
    default:
      throw new Error(`matmul: unknown variant ${variant}`);
  }
}

function checkRegisterTile(
  tm: number,
  tn: number,
  rowQuantum: number,
  base: { a: Contig; b: Contig; va: 1 | 4; vb: 1 | 4 },
): void {
  const rowStep = base.a === "out" && base.va === 4 ? Math.max(4, rowQuantum) : rowQuantum;
  const colStep = base.b === "out" && base.vb === 4 ? 4 : 1;
  if (!(tm > 0 && tm % rowStep === 0 && tn > 0 && tn % colStep === 0 && tm * tn <= 4096)) {
    throw new RangeError(
      `matmul: register tile ${tm}x${tn} must be a multiple of ${rowStep}x${colStep}, ` +
        `at most 4096 outputs`,
    );
  }
}

function checkDims(op: string, dims: Record<string, number>): void {
  for (const [name, v] of Object.entries(dims)) {
    if (!Number.isInteger(v) || v < 0 || v >= 2 ** 31) {
      throw new RangeError(`${op}: ${name} must be a non-negative integer below 2^31, got ${v}`);
    }
  }
  const { R, C, L } = dims;
  if (R * L >= 2 ** 32 || C * L >= 2 ** 32 || R * C >= 2 ** 32) {
    throw new RangeError(`${op}: an operand has 2^32 elements or more (u32 indexing)`);
  }
}

/** Bytes a binding exposes to the kernel. */
function bindingBytes(b: Binding): number {
  if (b instanceof GPUBuffer) return b.size;
  return b.size ?? b.buffer.size - (b.offset ?? 0);
}

function checkBinding(op: string, name: string, b: Binding, elements: number): void {
  const bytes = bindingBytes(b);
  if (bytes < elements * 4) {
    throw new RangeError(
      `${op}: ${name} holds ${bytes} bytes, needs ${elements * 4} (${elements} f32)`,
    );
  }
}

async function matmulDispatch(
  gpu: Gpu,
  label: string,
  pr: Problem,
  bufs: { a: Binding; b: Binding; out: Binding; names: [string, string, string] },
  accumulate: boolean,
  opts: MatmulOptions | undefined,
): Promise<Dispatch> {
  checkDims(label, { R: pr.R, C: pr.C, L: pr.L });
  checkBinding(label, bufs.names[0], bufs.a, pr.R * pr.L);
  checkBinding(label, bufs.names[1], bufs.b, pr.C * pr.L);
  checkBinding(label, bufs.names[2], bufs.out, pr.R * pr.C);
  const spec = await chooseSpec(gpu, pr, accumulate, opts);
  const wgsl = spec.design === "tiled" ? tiledWgsl(spec) : fallbackWgsl(spec);
  const pipeline = await gpu.pipeline(key(spec), wgsl);
  const rowsPerTile = spec.design === "tiled" ? spec.tile : spec.tm;
  const colsPerTile = spec.design === "tiled" ? spec.tile : spec.tn * spec.lanes;
  const colTiles = Math.ceil(pr.C / colsPerTile);
  const tiles = Math.ceil(pr.R / rowsPerTile) * colTiles;
  const dims = gpu.createUniform(
    new Uint32Array([pr.R, pr.C, pr.L, colTiles, tiles, 0, 0, 0]),
    `${label} dims`,
  );
  const bindGroup = gpu.bindGroup(pipeline, [dims, bufs.a, bufs.b, bufs.out], label);
  return {
    label: `${label} (${
      spec.design === "tiled"
        ? `tiled${spec.tile}`
        : `${spec.design} ${spec.tm}x${spec.tn} per lane, ${spec.lanes} lanes, step ${spec.step}`
    }, vec ${spec.va}/${spec.vb}/${spec.vo})`,
    pipeline,
    bindGroup,
    workgroups: tiles,
    owned: [dims],
  };
}

/**
 * `y[M, N] (+)= x[M, K] · w[N, K]^T` (the forward of a linear layer with a
 * Hugging Face `[out, in]` weight). `y` must not alias `x` or `w`.
 *
 * @example
 * ```ts ignore
 * const d = await matmulXWt(gpu, { x, w, y, M: 4096, K: 512, N: 1408 });
 * gpu.submit((enc) => { const pass = enc.beginComputePass(); recordDispatches(gpu, pass, d); pass.end(); });
 * ```
 */
export async function matmulXWt(
  gpu: Gpu,
  args: {
    x: Binding;
    w: Binding;
    y: Binding;
    M: number;
    K: number;
    N: number;
    accumulate?: boolean;
    options?: MatmulOptions;
  },
): Promise<Dispatch> {
  const { M, K, N } = args;
  return await matmulDispatch(
    gpu,
    `matmul xWt M=${M} K=${K} N=${N}`,
    { R: M, C: N, L: K, a: "red", b: "red" },
    { a: args.x, b: args.w, out: args.y, names: ["x", "w", "y"] },
    args.accumulate ?? false,
    args.options,
  );
}

/**
 * `dx[M, K] (+)= dy[M, N] · w[N, K]` (the input gradient of `y = x W^T`).
 * `dx` must not alias `dy` or `w`.
 */
export async function matmulDyW(
  gpu: Gpu,
  args: {
    dy: Binding;
    w: Binding;
    dx: Binding;
    M: number;
    N: number;
    K: number;
    accumulate?: boolean;
    options?: MatmulOptions;
  },
): Promise<Dispatch> {
  const { M, N, K } = args;
  return await matmulDispatch(
    gpu,
    `matmul dyW M=${M} N=${N} K=${K}`,
    { R: M, C: K, L: N, a: "red", b: "out" },
    { a: args.dy, b: args.w, out: args.dx, names: ["dy", "w", "dx"] },
    args.accumulate ?? false,
    args.options,
  );
}

/**
 * `dw[N, K] (+)= dy[M, N]^T · x[M, K]` (the weight gradient of `y = x W^T`;
 * `accumulate` adds into dw: gradient accumulation, tied embeddings).
 * `dw` must not alias `dy` or `x`.
 */
export async function matmulDyTX(
  gpu: Gpu,
  args: {
    dy: Binding;
    x: Binding;
    dw: Binding;
    M: number;
    N: number;
    K: number;
    accumulate?: boolean;
    options?: MatmulOptions;
  },
): Promise<Dispatch> {
  const { M, N, K } = args;
  return await matmulDispatch(
    gpu,
    `matmul dyTx M=${M} N=${N} K=${K}`,
    { R: N, C: K, L: M, a: "out", b: "out" },
    { a: args.dy, b: args.x, out: args.dw, names: ["dy", "x", "dw"] },
    args.accumulate ?? false,
    args.options,
  );
}
