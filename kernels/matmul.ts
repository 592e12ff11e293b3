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
 * - `tiled64`, `tiled128`, `tiled128x64`, `tiled64x128` (real GPUs): a
 *   workgroup of 16x16 threads owns a BM x BN output tile (BM, BN in {64, 128};
 *   a thread owns BM/16 x BN/16 outputs in registers). Per step of BK = 16
 *   reduction indices the A and B tiles pass through workgroup memory, double
 *   buffered: the next step's tiles are loaded into registers before this
 *   step's multiply-adds (their latency hides behind the arithmetic) and stored
 *   into the other buffer after them, so one barrier per step suffices.
 *   Operands are stored without transposition, as vec4s where aligned: an
 *   operand contiguous in l as [row][l/4] (the vec4 index XOR-swizzled by
 *   (row >> 1) & 3: stores and reads spread over all banks with no padding),
 *   one contiguous in its row as [l][row/4]; the inner loop reads one vec4 per
 *   row (4 reduction indices) or per 4 rows (one index). Workgroups wholly
 *   inside the output and steps wholly inside the reduction (decided per
 *   workgroup and step, so uniformly) skip every bounds check. The tile comes
 *   from the grid (`chooseTiledTile`): the largest of 128x128, 128x64 / 64x128,
 *   64x64 that still gives 256 workgroups (about two per SM of a 132-SM H100)
 *   and fits workgroup memory (32, 24, 16 KiB). No subgroup size is assumed.
 *   Not yet timed on a GPU: tested for correctness on lavapipe only.
 * - `fallback` (CPU drivers: Mesa lavapipe/llvmpipe, SwiftShader): llvmpipe runs
 *   8 invocations as the lanes of one AVX2 vector; arithmetic is nearly free,
 *   and every load whose address differs across lanes is a scalar loop over
 *   the lanes (workgroup memory included: it is ordinary memory there, and
 *   barriers cost coroutine switches). So no workgroup memory: each invocation
 *   loads straight from the buffers (the CPU caches do the tiling) for a
 *   32 x 8 register tile, and the design maximizes multiply-adds per load
 *   component: vec4 loads along the contiguous dimension (4 components per
 *   lane loop), 4 reduction steps per iteration, all of an iteration's loads
 *   issued before its arithmetic.
 * - `fallbackSubgroup` (CPU drivers with subgroups): as `fallback`, but the A
 *   values (the same for every lane of a workgroup) are loaded once, spread
 *   over the lanes, and handed round with `subgroupBroadcast` (an extract and a
 *   splat on llvmpipe), so one load serves all S lanes; B values are each
 *   lane's own. Register tile: 64 x 8 for every form;
 *   problems of at most `SMALL_PROBLEM` multiply-adds use one row chunk x 4
 *   columns (8 x 4 without subgroups) since there compile time dominates. The
 *   subgroup size S is measured once per device by a probe kernel and is the
 *   workgroup size; the kernel still checks `subgroup_size == S` at run time
 *   and otherwise takes a plain dot-product loop, so correctness never rests
 *   on an assumed subgroup size.
 *
 * Operands from textures (both CPU-driver designs, `MatmulOptions.reads`).
 * On llvmpipe a storage-buffer load costs about 23 ns per invocation whether
 * or not its address is the same in every lane (a loop over the lanes with
 * bounds checks), a `textureLoad` of an rgba32f texel about 4.5 ns
 * (bench/load_path_bench.ts). So where the rows of both operands are a
 * multiple of 4 wide, each operand is copied into an rgba32float texture
 * right before the kernel (`Dispatch.copies`: copyBufferToTexture, about 0.2
 * ms per MiB there, outside the compute pass) and the kernel reads texel t
 * where it would read vec4 t of the buffer (kernels/texels.ts rewrites the
 * kernel): the texture holds the buffer range as it is, so every index form
 * carries over and the sums run in the same order (bitwise the same
 * results). Textures are shared per operand slot and height by all calls on
 * a device (each refills its own before it runs). An odd-width dY may come in
 * rows padded with zeros (`dyStride`; the training model pads d logits for a
 * vocabulary of 1558), which also lets dY W step 4 at a time over an odd
 * reduction (W's row index clamped). Measured in whole training steps
 * (bench/operands_bench.ts, docs/benchmarks.md, 2026-12-03): tiny 44% and
 * minimind2-small 53% less time than with every operand read from storage.
 * GPUs always read buffers.
 *
 * Split-K for the weight gradient (`matmulDyTXSplitK`): its reduction runs
 * over M = B·T rows (2048-8192), while its output [N, K] can be a handful of
 * tiles (tiny k/v: 1 x 2 tiles of 64x64). Where the tiled design's grid is
 * below 256 workgroups, the reduction is cut into S <= 32 slices of at least
 * 128 rows (a multiple of BK; the last may be shorter); slice s writes its
 * partial sums to a scratch buffer [S, N, K] that the dispatch owns, and a
 * second dispatch adds slices 0..S-1 in that order (into dw, or onto it when
 * accumulating). S depends only on the shape and the device, so results stay
 * bitwise reproducible. The CPU designs do not split unless `options.splitK`
 * asks: on lavapipe it measured no faster (below).
 *
 * Measured on Mesa lavapipe (llvmpipe, LLVM 15, 256-bit; Mesa 22.3.6; 2 cores
 * shared with other jobs, so figures move by up to 2x between runs; the
 * figures below are minima over interleaved, order-shuffled rounds), dY^T X:
 * - 2026-12-02, 15 rounds per run: tiny lm_head (M=2048 K=128 N=2048)
 *   previous design / this one: at a load average of 0.5, 44.6 / 44.9 ms; in
 *   four runs at 1.1-1.4, 58-67 / 46-50 ms (minima; medians 65-100 / 49-80).
 *   minimind2-small q/o (M=4096 N=K=512) at 1.1-1.4: 100-102 / 88-96 ms.
 *   X W^T and dY W at the tiny lm_head: unchanged within noise (44 / 44, 37
 *   / 38 ms). So dY^T X is no slower than the other forms here. Why the
 *   current code holds up better under load is not established: a variant
 *   with the old load order measured the same as the current one, which
 *   leaves the slice-bounded loop and its prologue. Tuning experiments
 *   (8 or 16 reduction steps per iteration, prefetching the next iteration's
 *   loads, 128 x 4 and 32 x 16 register tiles) measured within the noise and
 *   were dropped.
 * - split-K forced on the CPU design, S = 1 / 2 / 4 (ms): tiny k/v (M=2048
 *   N=64 K=128) 2.5 / 3.4 / 3.4; tiny q/o (N=K=128) 3.9 / 4.0 / 4.2;
 *   minimind2-small k/v (M=4096 N=128 K=512) 30.3 / 29.3 / 29.0; at M=1024
 *   7.6 / 8.2 / 8.7. Each extra dispatch costs ~0.5-1 ms on lavapipe, and the
 *   2 cores are busy at these grids already.
 * - 1024³ and earlier designs: a naive kernel ~0.2 GFLOP/s; register tiles
 *   with scalar loads 1-4; `fallback` X W^T 20-35; `fallbackSubgroup` X W^T
 *   30-58, dY W and dY^T X 15-35. See bench/matmul_bench.ts.
 *
 * Work grid: the output tiles (times the slices) are numbered slice-major, then
 * row-major, and dispatched as a 1-D count (`Gpu.dispatch` splits beyond 65535
 * into 2-D), so no shape can exceed a grid dimension limit; surplus workgroups
 * of the split return early (workgroup-uniform, before any barrier).
 *
 * Sums run in a fixed order per output element (no atomics; split-K partials
 * are added in slice order): the same inputs give bitwise the same outputs on
 * the same device and variant.
 *
 * @module
 */
import {
  type Binding,
  bindingResource,
  type Dispatch,
  type Gpu,
  isBroadcastSubgroupSize,
  LINEAR_WORKGROUP_WGSL,
  type Owned,
} from "./runtime.ts";
import { kernelDispatch, type ReadPath, texelObstacle } from "./texels.ts";

/** Width in texels of the operand textures (see kernels/texels.ts). */
export { TEXEL_ROW as OPERAND_TEXTURE_WIDTH } from "./texels.ts";
/** Which kernel design runs; `auto` picks by adapter and grid (see the module comment). */
export type MatmulVariant =
  | "auto"
  | "tiled64"
  | "tiled128"
  | "tiled128x64"
  | "tiled64x128"
  | "fallback"
  | "fallbackSubgroup";

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
  /**
   * `matmulDyTXSplitK`: split the reduction into this many slices (1: none)
   * instead of choosing from the grid. Clamped to what the reduction length
   * allows (every slice holds at least one reduction step).
   */
  splitK?: number;
  /**
   * CPU-driver designs: where the kernel reads A and B. `textures` copies
   * them into rgba32float textures before each dispatch (`Dispatch.copies`)
   * and reads them with `textureLoad`; `storage` reads the buffers. The
   * default (`auto`) takes textures where they qualify: the contiguous
   * dimensions of both operands and the reduction are multiples of 4, the
   * problem is not small (`SMALL_PROBLEM`), the buffers can be copied from
   * and the textures fit the device. Forcing `textures` where they do not
   * qualify throws.
   */
  reads?: ReadPath;
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
  /**
   * Elements between consecutive rows of A (its contiguous dimension's
   * extent in memory): L ("red") or R ("out") unless the rows are padded;
   * padding must hold zeros (vec4 loads and whole reduction steps may read
   * it).
   */
  lda: number;
}

/** Everything a generated kernel depends on (its pipeline cache key). */
interface KernelSpec {
  design: "tiled" | "fallback" | "fallbackSubgroup";
  a: Contig;
  b: Contig;
  /** Elements per load of A and B along their contiguous dimension. */
  va: 1 | 4;
  vb: 1 | 4;
  /** Elements per store of the output (4 when C % 4 == 0 and the design groups columns by 4). */
  vo: 1 | 4;
  accumulate: boolean;
  /** tiled: output tile rows and columns (64 or 128 each). */
  bm: number;
  bn: number;
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
  /** CPU-driver designs: A and B read from textures (vec4 loads only; `texelReads` rewrites the kernel). */
  tex: boolean;
  /**
   * CPU-driver designs: steps of 4 over a reduction that is not a multiple
   * of 4 (A's padded rows supply zeros past L; B, read across its rows, has
   * its row index clamped to L - 1).
   */
  clampL: boolean;
}

function key(s: KernelSpec): string {
  const acc = s.accumulate ? "acc" : "set";
  return `matmul-${s.design}-a${s.a}${s.va}-b${s.b}${s.vb}-o${s.vo}-${acc}-t${s.bm}x${s.bn}-` +
    `${s.tm}x${s.tn}x${s.lanes}-s${s.step}${s.tex ? "-tex" : ""}${s.clampL ? "-clampL" : ""}`;
}

// ---------------------------------------------------------------------------
// WGSL generation.

/**
 * Bindings: 0 dims (uniform), 1 A, 2 B, 3 out. `tiles` counts the output
 * tiles of one slice of the reduction; slice s covers l in
 * [s·sliceLen, min(L, (s+1)·sliceLen)) and writes out[s, R, C] (one slice:
 * the output itself).
 */
function header(s: KernelSpec): string {
  const ta = s.va === 4 ? "vec4f" : "f32";
  const tb = s.vb === 4 ? "vec4f" : "f32";
  const operands = `@group(0) @binding(1) var<storage, read> A: array<${ta}>;
@group(0) @binding(2) var<storage, read> B: array<${tb}>;`;
  return `${LINEAR_WORKGROUP_WGSL}
struct Dims {
  R: u32, C: u32, L: u32, colTiles: u32, tiles: u32, sliceLen: u32, slices: u32, lda: u32,
}
@group(0) @binding(0) var<uniform> dims: Dims;
${operands}
@group(0) @binding(3) var<storage, read_write> O: array<${s.vo === 4 ? "vec4f" : "f32"}>;
`;
}

/**
 * The start of every kernel: this workgroup's slice and tile, its reduction
 * range [lBegin, lEnd) and the output offset oBase of its slice. Surplus
 * workgroups of a split grid return (workgroup-uniform, before any barrier).
 */
const SLICE_PROLOGUE = `let t = linear_workgroup(wid, nwg);
  if (t >= dims.tiles * dims.slices) { return; }
  let slice = t / dims.tiles;
  let tile = t - slice * dims.tiles;
  let lBegin = slice * dims.sliceLen;
  let lEnd = min(dims.L, lBegin + dims.sliceLen);
  let oBase = slice * dims.R * dims.C;`;

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

/** Reduction indices per step of the tiled design. */
const BK = 16;

/** Workgroup memory of the tiled design for a `bm` x `bn` tile: two buffers of both operand tiles. */
function tiledWorkgroupBytes(bm: number, bn: number): number {
  return 2 * (bm + bn) * BK * 4;
}

/** One operand of the tiled design, as its generator sees it. */
interface TiledOperand {
  /** Buffer and workgroup array names. */
  X: "A" | "B";
  sh: "As" | "Bs";
  contig: Contig;
  v: 1 | 4;
  /** Tile rows of this operand (BM for A, BN for B) and the matrix bound. */
  D: number;
  dim: string;
  /** Elements between its rows in memory. */
  stride: string;
  base: string;
  /** This thread's coordinate along the operand's tile rows (ty for A, tx for B). */
  t: string;
}

/**
 * Global -> register loads of one operand tile (BK reduction indices by D
 * rows) and register -> workgroup-memory stores, with no transposition:
 *
 * - contiguous in l ("red"): workgroup layout [row][l/4] (4 vec4 per row), the
 *   vec4 index XOR-swizzled by (row >> 1) & 3 so that both the stores (4
 *   threads per row) and the reads (16 rows at once, one vec4 each) spread
 *   over all banks without padding;
 * - contiguous in the row ("out"): layout [l][row/4], vec4s of 4 rows, stored
 *   and read as consecutive vec4s.
 *
 * Loads are coalesced (consecutive threads walk the contiguous dimension).
 * `load(true, l)` bounds-checks rows and the reduction (out-of-range reads give
 * 0, which adds nothing); `load(false, l)` is the interior fast path.
 */
function tiledOperandIO(o: TiledOperand): {
  setup: string[];
  decl: string[];
  load: (checked: boolean, l: string) => string[];
  store: (offset: string) => string[];
} {
  const { X, sh, D, dim, base } = o;
  const x = X.toLowerCase();
  const n = (D * BK) / o.v / 256; // loads per thread per tile
  const setup: string[] = [];
  const decl: string[] = [];
  const loads: { idx: string; ok: string; reg: string }[] = [];
  const stores: string[] = [];
  const zero = o.v === 4 ? "vec4f(0.0)" : "0.0";
  for (let p = 0; p < n; p++) {
    const reg = `p${x}${p}`;
    decl.push(`var ${reg} = ${zero};`);
    if (o.contig === "red") {
      // Row `row`, reduction offset `lo` (a multiple of 4 for vec4 loads).
      const perRow = BK / o.v;
      setup.push(`let ${x}row${p} = (lid + ${p * 256}u) / ${perRow}u;`);
      if (p === 0) setup.push(`let ${x}lo = (lid % ${perRow}u) * ${o.v}u;`);
      const row = `${x}row${p}`;
      const g = `(${base} + ${row}) * ${o.stride} + LL + ${x}lo`;
      loads.push({
        idx: o.v === 4 ? `(${g}) / 4u` : g,
        ok: `${base} + ${row} < ${dim} && LL + ${x}lo < lEnd`,
        reg,
      });
      const slot = `${row} * 4u + ((${x}lo / 4u) ^ ((${row} >> 1u) & 3u))`;
      stores.push(
        o.v === 4
          ? `${sh}[OFF + ${slot}] = ${reg};`
          : `${sh}[OFF + ${slot}][${x}lo % 4u] = ${reg};`,
      );
    } else {
      // Reduction offset `lk`, row `rr` (a multiple of 4 for vec4 loads).
      const perL = D / o.v;
      setup.push(`let ${x}lk${p} = (lid + ${p * 256}u) / ${perL}u;`);
      if (p === 0) setup.push(`let ${x}rr = (lid % ${perL}u) * ${o.v}u;`);
      const lk = `${x}lk${p}`;
      const g = `(LL + ${lk}) * ${o.stride} + ${base} + ${x}rr`;
      loads.push({
        idx: o.v === 4 ? `(${g}) / 4u` : g,
        ok: `LL + ${lk} < lEnd && ${base} + ${x}rr < ${dim}`,
        reg,
      });
      const slot = `${lk} * ${D / 4}u + ${x}rr / 4u`;
      stores.push(
        o.v === 4
          ? `${sh}[OFF + ${slot}] = ${reg};`
          : `${sh}[OFF + ${slot}][${x}rr % 4u] = ${reg};`,
      );
    }
  }
  const load = (checked: boolean, l: string) =>
    loads.map(({ idx, ok, reg }) => {
      const i = idx.replaceAll("LL", l);
      if (!checked) return `${reg} = ${X}[${i}];`;
      return `if (${ok.replaceAll("LL", l)}) { ${reg} = ${X}[${i}]; } else { ${reg} = ${zero}; }`;
    });
  const store = (offset: string) => stores.map((st) => st.replace("OFF", offset));
  return { setup, decl, load, store };
}

/**
 * Reads of one operand's values for reduction indices 4kq..4kq+3 from
 * workgroup memory at `offset`, for the T = D/16 tile rows this thread owns:
 * `value(e, q)` is the element for row e and index 4kq + q.
 *
 * - "red": rows t + 16e, one vec4 (4 reduction indices) per row;
 * - "out": rows 4(t + 16g) + p, one vec4 (4 rows) per group and index.
 */
function tiledReads(o: TiledOperand): {
  reads: (offset: string, e: number) => string[];
  value: (e: number, q: number) => string;
  row: (e: number) => string;
  /** Elements covered by the reads of element e (1 for "red", 4 for "out"). */
  span: number;
} {
  const x = o.X.toLowerCase();
  if (o.contig === "red") {
    return {
      reads: (offset, e) => [
        `let x${x}${e} = ${o.sh}[${offset} + (${o.t} + ${16 * e}u) * 4u + (kq ^ sw${x})];`,
      ],
      value: (e, q) => `x${x}${e}[${q}]`,
      row: (e) => `${o.base} + ${o.t} + ${16 * e}u`,
      span: 1,
    };
  }
  return {
    reads: (offset, e) => {
      const g = e >> 2;
      return [0, 1, 2, 3].map((q) =>
        `let x${x}${g}_${q} = ${o.sh}[${offset} + (kq * 4u + ${q}u) * ${o.D / 4}u + ${o.t} + ${
          16 * g
        }u];`
      );
    },
    value: (e, q) => `x${x}${e >> 2}_${q}[${e & 3}]`,
    row: (e) => `${o.base} + (${o.t} + ${16 * (e >> 2)}u) * 4u + ${e & 3}u`,
    span: 4,
  };
}

/**
 * The GPU design: 16x16 threads own a BM x BN output tile (BM, BN in {64,
 * 128}), TM = BM/16 rows by TN = BN/16 columns each. Per step of BK = 16
 * reduction indices the operand tiles pass through workgroup memory, double
 * buffered: the next step's tiles are loaded into registers before this step's
 * multiply-adds (their latency hides behind the arithmetic) and stored into the
 * other buffer after them, so one barrier per step suffices (a buffer is
 * rewritten only after the barrier that ends its last reads). Workgroups wholly
 * inside the output (decided per workgroup, so uniformly) and steps wholly
 * inside the reduction load and store without bounds checks.
 */
function tiledWgsl(s: KernelSpec): string {
  const { bm: BM, bn: BN } = s;
  const TM = BM / 16;
  const TN = BN / 16;
  const opA: TiledOperand = {
    X: "A",
    sh: "As",
    contig: s.a,
    v: s.va,
    D: BM,
    dim: "dims.R",
    stride: "dims.lda",
    base: "r0",
    t: "ty",
  };
  const opB: TiledOperand = {
    X: "B",
    sh: "Bs",
    contig: s.b,
    v: s.vb,
    D: BN,
    dim: "dims.C",
    stride: s.b === "red" ? "dims.L" : "dims.C",
    base: "c0",
    t: "tx",
  };
  const ioA = tiledOperandIO(opA);
  const ioB = tiledOperandIO(opB);
  const rdA = tiledReads(opA);
  const rdB = tiledReads(opB);
  const SA = (BM * BK) / 4; // vec4s of one A buffer
  const SB = (BN * BK) / 4;

  const accDecl: string[] = [];
  for (let i = 0; i < TM; i++) {
    for (let j = 0; j < TN; j++) accDecl.push(`var acc${i}_${j} = 0.0;`);
  }
  // One kq step (4 reduction indices): all of B's values for this thread
  // first, then A's a row (or group of 4 rows) at a time with its
  // multiply-adds, which keeps few A values live.
  const inner: string[] = [];
  for (let j = 0; j < TN; j += rdB.span) inner.push(...rdB.reads("ob", j));
  for (let i = 0; i < TM; i += rdA.span) {
    inner.push(...rdA.reads("oa", i));
    for (let ii = i; ii < i + rdA.span; ii++) {
      for (let q = 0; q < 4; q++) {
        for (let j = 0; j < TN; j++) {
          inner.push(
            `acc${ii}_${j} = fma(${rdA.value(ii, q)}, ${rdB.value(j, q)}, acc${ii}_${j});`,
          );
        }
      }
    }
  }

  // Stores: vec4s of 4 columns where B's layout groups this thread's columns
  // by 4 (and C % 4 == 0), else scalars (consecutive threads, consecutive
  // columns: coalesced either way).
  const stores = (checked: boolean): string[] => {
    const out: string[] = [];
    for (let i = 0; i < TM; i++) {
      out.push(`{ let r = ${rdA.row(i)};`);
      if (s.vo === 4) {
        for (let j = 0; j < TN; j += 4) {
          const v = `vec4f(acc${i}_${j}, acc${i}_${j + 1}, acc${i}_${j + 2}, acc${i}_${j + 3})`;
          const st = storeVec4Statement(s, `oBase + r * dims.C + c`, v);
          out.push(
            `  { let c = ${rdB.row(j)}; ${
              checked ? `if (r < dims.R && c < dims.C) { ${st} }` : st
            } }`,
          );
        }
      } else {
        for (let j = 0; j < TN; j++) {
          const st = storeStatement(s, `oBase + r * dims.C + c`, `acc${i}_${j}`);
          out.push(
            `  { let c = ${rdB.row(j)}; ${
              checked ? `if (r < dims.R && c < dims.C) { ${st} }` : st
            } }`,
          );
        }
      }
      out.push(`}`);
    }
    return out;
  };

  const loadBoth = (l: string) =>
    `if (interior && ${l} + ${BK}u <= lEnd) {
      ${[...ioA.load(false, l), ...ioB.load(false, l)].join("\n      ")}
    } else {
      ${[...ioA.load(true, l), ...ioB.load(true, l)].join("\n      ")}
    }`;

  // Iteration i loads tile i (reduction indices l..l+BK-1) into registers,
  // multiplies tile i-1 out of buffer (i-1) % 2, then stores tile i into
  // buffer i % 2. One barrier per iteration suffices: buffer i % 2 was last
  // read in iteration i-1, before its barrier, and is next read in iteration
  // i+1, after this one. Each load site exists once (checked and unchecked),
  // which keeps the kernel small.
  return `${header(s)}
var<workgroup> As: array<vec4f, ${2 * SA}>;
var<workgroup> Bs: array<vec4f, ${2 * SB}>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  ${SLICE_PROLOGUE}
  let r0 = (tile / dims.colTiles) * ${BM}u;
  let c0 = (tile % dims.colTiles) * ${BN}u;
  let interior = r0 + ${BM}u <= dims.R && c0 + ${BN}u <= dims.C;
  let tx = lid % 16u;
  let ty = lid / 16u;
  let swa = (ty >> 1u) & 3u;
  let swb = (tx >> 1u) & 3u;
  ${[...ioA.setup, ...ioB.setup].join("\n  ")}
  ${[...ioA.decl, ...ioB.decl].join("\n  ")}
  ${accDecl.join("\n  ")}
  var cur = 0u;
  for (var l = lBegin; l < lEnd + ${BK}u; l += ${BK}u) {
    if (l < lEnd) {
      ${loadBoth("l")}
    }
    if (l > lBegin) {
      let oa = (1u - cur) * ${SA}u;
      let ob = (1u - cur) * ${SB}u;
      for (var kq = 0u; kq < ${BK / 4}u; kq++) {
        ${inner.join("\n        ")}
      }
    }
    if (l < lEnd) {
      ${[...ioA.store(`cur * ${SA}u`), ...ioB.store(`cur * ${SB}u`)].join("\n      ")}
    }
    workgroupBarrier();
    cur = 1u - cur;
  }
  if (interior) {
    ${stores(false).join("\n    ")}
  } else {
    ${stores(true).join("\n    ")}
  }
}`;
}

/**
 * The loads of one loop iteration of the CPU-driver designs: `raw` are the
 * buffer reads (`[name, expression]`, the expression indexing the reduction
 * at `L_` + offset; the caller substitutes the iteration's index), `unpack`
 * the statements that name their components.
 */
interface IterationLoads {
  raw: [string, string][];
  unpack: string[];
}

/**
 * Loads by one invocation of its `n` rows of A (from r0, bounded by R) or
 * columns of B (from cb, bounded by C) for reduction offsets l + q, q < step,
 * as `a{i}_{q}` / `b{j}_{q}`. A vec4 along l covers 4 consecutive q of one row;
 * a vec4 across rows covers 4 rows (their start is a multiple of 4 and the
 * dimension too, so it is wholly in or out); out-of-range rows load a clamped
 * index.
 */
function directLoads(
  operand: "A" | "B",
  contig: Contig,
  vec: 1 | 4,
  n: number,
  step: 1 | 4,
  clampL: boolean,
): IterationLoads {
  const [name, first, dim] = operand === "A" ? ["a", "r0", "R"] : ["b", "cb", "C"];
  const stride = operand === "A" ? "dims.lda" : contig === "red" ? "dims.L" : `dims.${dim}`;
  // The row of reduction offset q: clamped into the matrix where a step may pass L.
  const lrow = (q: number) => clampL ? `min(L_ + ${q}u, dims.L - 1u)` : `(L_ + ${q}u)`;
  const raw: [string, string][] = [];
  const unpack: string[] = [];
  if (contig === "red") {
    for (let i = 0; i < n; i++) {
      const r = `min(${first} + ${i}u, dims.${dim} - 1u)`;
      if (vec === 4) {
        raw.push([`v${name}${i}`, `${operand}[(${r} * ${stride} + L_) / 4u]`]);
        for (let q = 0; q < 4; q++) unpack.push(`let ${name}${i}_${q} = v${name}${i}[${q}];`);
      } else {
        raw.push([`${name}${i}_0`, `${operand}[${r} * ${stride} + L_]`]);
      }
    }
    return { raw, unpack };
  }
  for (let q = 0; q < step; q++) {
    if (vec === 4) {
      for (let g = 0; g < n / 4; g++) {
        const r = `min(${first} + ${4 * g}u, ${stride} - 4u)`;
        raw.push([
          `v${name}${g}_${q}`,
          `${operand}[(${lrow(q)} * ${stride} + ${r}) / 4u]`,
        ]);
        for (let p = 0; p < 4; p++) {
          unpack.push(`let ${name}${4 * g + p}_${q} = v${name}${g}_${q}[${p}];`);
        }
      }
    } else {
      for (let i = 0; i < n; i++) {
        raw.push([
          `${name}${i}_${q}`,
          `${operand}[${lrow(q)} * ${stride} + min(${first} + ${i}u, dims.${dim} - 1u)]`,
        ]);
      }
    }
  }
  return { raw, unpack };
}

/**
 * The CPU-driver designs: each invocation owns TM rows x TN columns and reads
 * the buffers directly. The reduction advances `step` = 4 at a time when
 * L % 4 == 0 (an operand contiguous in l is then read as vec4), else 1. A
 * values are named a{i}_{q} (row i, reduction offset q), B values b{j}_{q};
 * out-of-range rows and columns load a clamped (valid) index and are never
 * stored.
 */
function fallbackWgsl(s: KernelSpec): string {
  const { tm: TM, tn: TN, lanes: S, step } = s;
  const sub = s.design === "fallbackSubgroup";
  // Rows of A one subgroup chunk covers: a lane loads 4 consecutive rows when
  // A is row-contiguous and loaded as vec4, else one row.
  const chunkRows = s.a === "out" && s.va === 4 ? 4 : 1;

  // Loads of B for this invocation's columns c0 + lane*TN + j.
  const loadB = directLoads("B", s.b, s.vb, TN, step, s.clampL);

  // Loads of A: either every row by every lane (plain), or one chunk per lane
  // handed round the subgroup.
  const loadA = (broadcast: boolean): IterationLoads => {
    if (!broadcast) return directLoads("A", s.a, s.va, TM, step, false);
    const raw: [string, string][] = [];
    const unpack: string[] = [];
    // Chunk c of this lane covers rows r0 + (lane + S*c)*chunkRows ..+chunkRows.
    const chunks = TM / (S * chunkRows);
    for (let c = 0; c < chunks; c++) {
      const row = `r0 + (lane + ${S * c}u) * ${chunkRows}u`;
      if (s.a === "red") {
        const r = `min(${row}, dims.R - 1u)`;
        raw.push([
          `ca${c}`,
          s.va === 4 ? `A[(${r} * dims.lda + L_) / 4u]` : `A[${r} * dims.lda + L_]`,
        ]);
      } else {
        for (let q = 0; q < step; q++) {
          raw.push([
            `ca${c}_${q}`,
            s.va === 4
              ? `A[((L_ + ${q}u) * dims.lda + min(${row}, dims.lda - 4u)) / 4u]`
              : `A[(L_ + ${q}u) * dims.lda + min(${row}, dims.R - 1u)]`,
          ]);
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
        unpack.push(`let a${i}_${q} = subgroupBroadcast(${value}, ${src}u);`);
      }
    }
    return { raw, unpack };
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
    const index = `oBase + (r0 + ${i}u) * dims.C + cb + g * ${per}u`;
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
  // The reduction loop: every buffer read of an iteration first, then the
  // broadcasts and multiply-adds (the reads are independent, so their cache
  // misses overlap).
  const tiled = (broadcast: boolean) => {
    const a = loadA(broadcast);
    const reads = [...a.raw, ...loadB.raw].map(([n, e]) =>
      `let ${n} = ${e.replaceAll("L_", "l")};`
    );
    return `let cb = c0 + lane * ${TN}u;
    ${accDecl.join("\n    ")}
    for (var l = lBegin; l < lEnd; l += ${step}u) {
      ${reads.join("\n      ")}
      ${a.unpack.join("\n      ")}
      ${loadB.unpack.join("\n      ")}
      ${fmas.join("\n      ")}
    }
    ${stores.join("\n    ")}`;
  };

  // Index of A(r, l) and B(c, l) in their scalar views, for the slow path.
  const aIndex = s.a === "red" ? "r * dims.lda + l" : "l * dims.lda + r";
  const bIndex = s.b === "red" ? "c * dims.L + l" : "l * dims.C + c";
  const aLoad = s.va === 4 ? `A[(${aIndex}) / 4u][(${aIndex}) % 4u]` : `A[${aIndex}]`;
  const bLoad = s.vb === 4 ? `B[(${bIndex}) / 4u][(${bIndex}) % 4u]` : `B[${bIndex}]`;

  if (!sub) {
    return `${header(s)}
@compute @workgroup_size(${S})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  ${SLICE_PROLOGUE}
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
  ${SLICE_PROLOGUE}
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
          for (var l = lBegin; l < lEnd; l++) { acc = fma(${aLoad}, ${bLoad}, acc); }
          ${storeStatement(s, "oBase + r * dims.C + c", "acc")}
        }
      }
    }
  }
}`;
}

/**
 * Fixed-order sum of split-K partials: out[i] (+)= sum over s = 0..S-1, in
 * that order, of partials[s, i]. One element (vec4 or scalar) per invocation;
 * bindings 0 params (uniform), 1 partials, 2 out.
 */
function splitReduceWgsl(vec: 1 | 4, accumulate: boolean): string {
  const t = vec === 4 ? "vec4f" : "f32";
  return `${LINEAR_WORKGROUP_WGSL}
struct Params { n: u32, slices: u32, stride: u32, p0: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> partials: array<${t}>;
@group(0) @binding(2) var<storage, read_write> O: array<${t}>;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let i = linear_workgroup(wid, nwg) * 256u + lid;
  if (i >= p.n) { return; }
  var s = partials[i];
  for (var k = 1u; k < p.slices; k++) { s = s + partials[k * p.stride + i]; }
  ${accumulate ? "O[i] = O[i] + s;" : "O[i] = s;"}
}`;
}

// ---------------------------------------------------------------------------
// Choosing a design.

/** Multiply-adds up to which the CPU-driver designs use their small register tile. */
export const SMALL_PROBLEM = 2 ** 18;

/**
 * Workgroups that keep a GPU busy: about two per SM (or CU) of a large card
 * (an H100 has 132 SMs). WebGPU does not expose the SM count, so this is the
 * proxy; smaller GPUs are then fuller still.
 */
const GPU_TARGET_WORKGROUPS = 256;

/** Split-K on GPUs: the shortest slice of the reduction worth a workgroup (8 steps of BK). */
const GPU_MIN_SLICE = 8 * BK;

/**
 * The tiled (GPU) design's tile `[rows, columns]` for an R x C output: the
 * largest tile (fewest loads per multiply-add) that still gives
 * `GPU_TARGET_WORKGROUPS` workgroups and fits `workgroupStorageBytes` (the
 * device's `maxComputeWorkgroupStorageSize`): 128x128 (32 KiB), then the skinny
 * 128x64 / 64x128 (24 KiB; the one with more tiles first), else 64x64 (16 KiB,
 * WebGPU's default limit).
 *
 * @example
 * ```ts
 * import { chooseTiledTile } from "./matmul.ts";
 * chooseTiledTile(4096, 4096, 32768); // [128, 128]
 * chooseTiledTile(512, 4096, 32768); // [128, 64]: 256 tiles where 128x128 gives 128
 * ```
 */
export function chooseTiledTile(
  R: number,
  C: number,
  workgroupStorageBytes: number,
): [number, number] {
  const tiles = ([bm, bn]: [number, number]) => Math.ceil(R / bm) * Math.ceil(C / bn);
  const skinny: [number, number][] = [[128, 64], [64, 128]];
  skinny.sort((x, y) => tiles(y) - tiles(x));
  for (const t of [[128, 128] as [number, number], ...skinny]) {
    if (
      tiledWorkgroupBytes(t[0], t[1]) <= workgroupStorageBytes && tiles(t) >= GPU_TARGET_WORKGROUPS
    ) {
      return t;
    }
  }
  return [64, 64];
}

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
      const [bm, bn] = chooseTiledTile(pr.R, pr.C, gpu.limits.maxComputeWorkgroupStorageSize);
      variant = bm === bn
        ? (bm === 64 ? "tiled64" : "tiled128")
        : `tiled${bm}x${bn}` as MatmulVariant;
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
  // A's rows are lda apart (its contiguous extent, or padded); B's are not padded.
  const va: 1 | 4 = opts?.vec !== 1 && pr.lda % 4 === 0 ? 4 : 1;
  const vb: 1 | 4 = opts?.vec !== 1 && (pr.b === "red" ? pr.L : pr.C) % 4 === 0 ? 4 : 1;
  // Steps of 4 over the reduction where L % 4 == 0, or where A is read along
  // it with padded rows (zeros past L) and B across its rows (clamped).
  const clampStep = pr.L % 4 !== 0 && pr.a === "red" && va === 4 && pr.b === "out";
  const step: 1 | 4 = opts?.vec !== 1 && (pr.L % 4 === 0 || clampStep) ? 4 : 1;
  const vo: 1 | 4 = opts?.vec !== 1 && pr.C % 4 === 0 ? 4 : 1;
  // Below 2^18 multiply-adds a call takes well under a millisecond whatever
  // the tile; what counts there is the pipeline's compile time (model tests).
  const small = pr.R * pr.C * pr.L <= SMALL_PROBLEM;
  const base = {
    a: pr.a,
    b: pr.b,
    va,
    vb,
    vo,
    accumulate,
    step,
    bm: 0,
    bn: 0,
    tex: false,
    clampL: false,
  };
  // Operands from textures (CPU-driver designs): only with vec4 loads of both
  // (texels hold 4 consecutive elements of the contiguous dimension). Auto:
  // every form beyond the small problems, where compile time dominates (see
  // the module comment for what it measured).
  const operands = opts?.reads ?? "auto";
  const texOk = va === 4 && vb === 4 && step === 4;
  const fallbackTex = operands === "textures" || (operands === "auto" && texOk && !small);
  // The CPU designs' operand path and reduction stepping.
  const cpuBase = { ...base, tex: fallbackTex, clampL: step === 4 && pr.L % 4 !== 0 };
  if (operands === "textures" && !texOk) {
    throw new Error(
      `matmul: operands from textures need the contiguous dimensions of both operands and ` +
        `the reduction to be multiples of 4 (R=${pr.R} C=${pr.C} L=${pr.L})`,
    );
  }
  switch (variant) {
    case "tiled64":
    case "tiled128":
    case "tiled128x64":
    case "tiled64x128": {
      const [bm, bn] = variant === "tiled64"
        ? [64, 64]
        : variant === "tiled128"
        ? [128, 128]
        : variant === "tiled128x64"
        ? [128, 64]
        : [64, 128];
      if (operands === "textures") {
        throw new Error(
          `matmul: operands from textures are for the CPU-driver designs, not ${variant}`,
        );
      }
      const bytes = tiledWorkgroupBytes(bm, bn);
      if (bytes > gpu.limits.maxComputeWorkgroupStorageSize) {
        throw new Error(
          `matmul: variant ${variant} needs ${bytes} bytes of workgroup memory ` +
            `(this device: ${gpu.limits.maxComputeWorkgroupStorageSize})`,
        );
      }
      // Columns go out as vec4s only where B's layout gives a thread 4
      // consecutive columns ("out"); `step` does not apply.
      return {
        ...base,
        vo: pr.b === "out" ? vo : 1,
        step: 1,
        design: "tiled",
        bm,
        bn,
        tm: 0,
        tn: 0,
        lanes: 256,
      };
    }
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
      return { ...cpuBase, vo: tn % 4 ? 1 : vo, design: "fallback", tm, tn, lanes: 8 };
    }
    case "fallbackSubgroup": {
      const lanes = opts?.subgroupLanes ?? sgSize;
      const chunkRows = pr.a === "out" && va === 4 ? 4 : 1;
      // Measured on llvmpipe: 64 x 8 for every form. With operands from
      // textures (loads ~5x cheaper than storage), X W^T and dY W went from
      // 32 x 8 to 64 x 8: 10-20% faster at the tiny and minimind2-small
      // shapes (2026-12-03, docs/benchmarks.md). Larger tiles gain a little
      // more but compile for tens of seconds cold (three 128 x 8 kernels: 53
      // s, against 15 s at 64 x 8 and 5.5 s at 32 x 8). Small problems: one
      // chunk of rows by 4 columns (fast to compile).
      const [tm0, tn0] = small ? [0, 4] : [64, 8];
      const tm = opts?.registerTile?.rows ?? Math.max(tm0, lanes * chunkRows);
      const tn = opts?.registerTile?.cols ?? tn0;
      checkRegisterTile(tm, tn, lanes * chunkRows, base);
      return { ...cpuBase, vo: tn % 4 ? 1 : vo, design: "fallbackSubgroup", tm, tn, lanes };
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

/** Elements A spans in memory: its rows of `lda` (the last one whole, padding included). */
function aElements(pr: Problem): number {
  return (pr.a === "red" ? pr.R : pr.L) * pr.lda;
}

/** A's row stride: `stride` when given (at least the contiguous extent `natural`), else that. */
function strideOf(op: string, stride: number | undefined, natural: number): number {
  if (stride === undefined) return natural;
  if (!Number.isInteger(stride) || stride < natural) {
    throw new RangeError(
      `${op}: dyStride must be an integer of at least ${natural}, got ${stride}`,
    );
  }
  return stride;
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

/** Output rows and columns of one workgroup's tile. */
function tileShape(spec: KernelSpec): [number, number] {
  return spec.design === "tiled" ? [spec.bm, spec.bn] : [spec.tm, spec.tn * spec.lanes];
}

/** At most this many split-K slices. */
const MAX_SLICES = 32;

/** At most this many bytes of split-K partials per call (beyond the device's binding limit). */
const MAX_PARTIALS_BYTES = 256 * 2 ** 20;

/**
 * How many slices the reduction of a call with `tiles` output tiles is cut
 * into, and their length (a multiple of the kernel's reduction step, so vec4
 * loads along l stay aligned; the last slice may be shorter). One slice unless
 * `allow`; then `options.splitK` when given; else, for the tiled (GPU) design,
 * enough slices to reach `GPU_TARGET_WORKGROUPS`, each at least
 * `GPU_MIN_SLICE` long, and one for the CPU designs. Always within
 * `MAX_SLICES`, `MAX_PARTIALS_BYTES` and the device's binding limit.
 */
function chooseSlices(
  gpu: Gpu,
  pr: Problem,
  spec: KernelSpec,
  tiles: number,
  opts: MatmulOptions | undefined,
  allow: boolean,
): { slices: number; sliceLen: number } {
  const one = { slices: 1, sliceLen: pr.L };
  if (!allow) return one;
  const quantum = spec.design === "tiled" ? BK : spec.step;
  let S: number;
  if (opts?.splitK !== undefined) {
    if (!Number.isInteger(opts.splitK) || opts.splitK < 1) {
      throw new RangeError(`matmul: splitK must be a positive integer, got ${opts.splitK}`);
    }
    S = opts.splitK;
  } else if (spec.design !== "tiled") {
    // CPU drivers: measured on lavapipe (2 cores), slices gained nothing
    // beyond noise at M = 4096 and lost 7-30% at M = 1024-2048 (the extra
    // dispatch costs ~0.5-1 ms there); see the module comment.
    S = 1;
  } else {
    S = tiles >= GPU_TARGET_WORKGROUPS ? 1 : Math.min(
      Math.ceil(GPU_TARGET_WORKGROUPS / Math.max(1, tiles)),
      Math.floor(pr.L / GPU_MIN_SLICE),
      MAX_SLICES,
    );
  }
  const bytesCap = Math.min(
    MAX_PARTIALS_BYTES,
    gpu.limits.maxStorageBufferBindingSize,
    gpu.limits.maxBufferSize,
  );
  S = Math.min(S, Math.floor(bytesCap / (4 * Math.max(1, pr.R * pr.C))));
  S = Math.min(S, Math.ceil(pr.L / quantum));
  if (S <= 1) return one;
  const sliceLen = Math.ceil(pr.L / S / quantum) * quantum;
  S = Math.ceil(pr.L / sliceLen);
  return S <= 1 ? one : { slices: S, sliceLen };
}

/**
 * Whether both operands of a call can be read from textures (see
 * `texelObstacle`); where one cannot, the call reads the buffers, or with
 * `forced` throws, saying why.
 */
function operandsFitTextures(
  gpu: Gpu,
  label: string,
  pr: Problem,
  bufs: { a: Binding; b: Binding; names: [string, string, string] },
  forced: boolean,
): boolean {
  const operands: [Binding, string, number][] = [
    [bufs.a, bufs.names[0], aElements(pr)],
    [bufs.b, bufs.names[1], pr.C * pr.L],
  ];
  for (const [binding, name, elements] of operands) {
    const why = texelObstacle(gpu, name, binding, elements);
    if (why === null) continue;
    if (forced) throw new Error(`${label}: operands from textures: ${why}`);
    return false;
  }
  return true;
}

/**
 * The dispatches of one matmul: one kernel, or with split-K (`allowSplit` and
 * more than one slice) the kernel writing partials `[S, R, C]` into a scratch
 * buffer the dispatch owns, then their fixed-order sum into the output.
 */
async function matmulDispatches(
  gpu: Gpu,
  label: string,
  pr: Problem,
  bufs: { a: Binding; b: Binding; out: Binding; names: [string, string, string] },
  accumulate: boolean,
  opts: MatmulOptions | undefined,
  allowSplit: boolean,
  sharedPartials?: GPUBuffer,
): Promise<Dispatch[]> {
  checkDims(label, { R: pr.R, C: pr.C, L: pr.L });
  if (aElements(pr) >= 2 ** 32) {
    throw new RangeError(`${label}: an operand has 2^32 elements or more (u32 indexing)`);
  }
  checkBinding(label, bufs.names[0], bufs.a, aElements(pr));
  checkBinding(label, bufs.names[1], bufs.b, pr.C * pr.L);
  checkBinding(label, bufs.names[2], bufs.out, pr.R * pr.C);
  let spec = await chooseSpec(gpu, pr, accumulate, opts);
  if (spec.tex && !operandsFitTextures(gpu, label, pr, bufs, opts?.reads === "textures")) {
    spec = { ...spec, tex: false };
  }
  const [rowsPerTile, colsPerTile] = tileShape(spec);
  const colTiles = Math.ceil(pr.C / colsPerTile);
  const tiles = Math.ceil(pr.R / rowsPerTile) * colTiles;
  const { slices, sliceLen } = chooseSlices(gpu, pr, spec, tiles, opts, allowSplit);
  // Slices write their partials; the reduction does the accumulating.
  if (slices > 1) spec = { ...spec, accumulate: false };
  const dims = gpu.createUniform(
    new Uint32Array([pr.R, pr.C, pr.L, colTiles, tiles, sliceLen, slices, pr.lda]),
    `${label} dims`,
  );
  const design = spec.design === "tiled"
    ? `tiled${spec.bm}x${spec.bn}`
    : `${spec.design} ${spec.tm}x${spec.tn} per lane, ${spec.lanes} lanes, step ${spec.step}`;
  const split = slices > 1 ? `, split-K ${slices} x ${sliceLen}` : "";
  const kernelLabel = `${label} (${design}${split}, vec ${spec.va}/${spec.vb}/${spec.vo})`;
  // The kernel, with A and B from textures where `spec.tex` (kernels/texels.ts).
  const kernel = async (out: Binding, own: Owned[]): Promise<Dispatch> => {
    const d = await kernelDispatch(gpu, {
      label: kernelLabel,
      key: key(spec),
      wgsl: spec.design === "tiled" ? tiledWgsl(spec) : fallbackWgsl(spec),
      bindings: [dims, bufs.a, bufs.b, out],
      workgroups: tiles * slices,
      owned: own,
      textureReads: { A: aElements(pr), B: pr.C * pr.L },
      reads: spec.tex ? "textures" : "storage",
    });
    return spec.tex ? { ...d, label: `${kernelLabel}, operands from textures` } : d;
  };
  if (slices === 1) return [await kernel(bufs.out, [dims])];
  const n = pr.R * pr.C;
  const ownPartials = !sharedPartials || sharedPartials.size < slices * n * 4;
  const partials = ownPartials
    ? gpu.createBuffer(slices * n * 4, `${label} split-K partials [${slices}, ${pr.R}, ${pr.C}]`)
    : sharedPartials;
  const vec: 1 | 4 = n % 4 === 0 && opts?.vec !== 1 ? 4 : 1;
  const reduce = await gpu.pipeline(
    `matmul-splitk-reduce-v${vec}-${accumulate ? "acc" : "set"}`,
    splitReduceWgsl(vec, accumulate),
  );
  const params = gpu.createUniform(
    new Uint32Array([n / vec, slices, n / vec, 0]),
    `${label} split-K reduce params`,
  );
  return [
    await kernel(partials, ownPartials ? [dims, partials] : [dims]),
    {
      label: `${label} split-K reduce (${slices} slices, vec ${vec})`,
      pipeline: reduce,
      bindGroup: gpu.bindGroup(reduce, [params, partials, bufs.out], `${label} split-K reduce`),
      workgroups: Math.ceil(n / vec / 256),
      owned: [params],
      writes: [bindingResource(bufs.out).buffer],
    },
  ];
}

/**
 * `y[M, N] (+)= x[M, K] · w[N, K]^T` (the forward of a linear layer with a
 * Hugging Face `[out, in]` weight). `y` must not alias `x` or `w`.
 *
 * @example
 * ```ts ignore
 * const d = await matmulXWt(gpu, { x, w, y, M: 4096, K: 512, N: 1408 });
 * gpu.submit((enc) => recordDispatches(gpu, enc, d));
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
  const [d] = await matmulDispatches(
    gpu,
    `matmul xWt M=${M} K=${K} N=${N}`,
    { R: M, C: N, L: K, a: "red", b: "red", lda: K },
    { a: args.x, b: args.w, out: args.y, names: ["x", "w", "y"] },
    args.accumulate ?? false,
    args.options,
    false,
  );
  return d;
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
    /** Elements between rows of dy (default N); the padding must hold zeros. */
    dyStride?: number;
  },
): Promise<Dispatch> {
  const { M, N, K } = args;
  const [d] = await matmulDispatches(
    gpu,
    `matmul dyW M=${M} N=${N} K=${K}${
      args.dyStride === undefined ? "" : ` dyStride=${args.dyStride}`
    }`,
    { R: M, C: K, L: N, a: "red", b: "out", lda: strideOf("matmulDyW", args.dyStride, N) },
    { a: args.dy, b: args.w, out: args.dx, names: ["dy", "w", "dx"] },
    args.accumulate ?? false,
    args.options,
    false,
  );
  return d;
}

/** Arguments of `matmulDyTX` and `matmulDyTXSplitK`. */
export interface MatmulDyTXArgs {
  /** `[M, N]`, the gradient of the layer's output. */
  dy: Binding;
  /**
   * Elements between rows of dy (default N): a padded row (a multiple of 4
   * wide) keeps vec4 loads and operand textures for an odd N. The padding
   * must hold zeros.
   */
  dyStride?: number;
  /** `[M, K]`, the layer's input. */
  x: Binding;
  /** `[N, K]`, the weight gradient (overwritten, or added to with `accumulate`). */
  dw: Binding;
  M: number;
  N: number;
  K: number;
  /** Add into dw (gradient accumulation, tied embeddings) instead of overwriting it. */
  accumulate?: boolean;
  options?: MatmulOptions;
  /**
   * Split-K scratch shared by the caller among dispatches that run one after
   * another (a model's backward): used when it holds `splitKPartialsBytes`,
   * else the dispatch makes and owns its own.
   */
  partials?: GPUBuffer;
}

/**
 * `dw[N, K] (+)= dy[M, N]^T · x[M, K]` (the weight gradient of `y = x W^T`;
 * `accumulate` adds into dw: gradient accumulation, tied embeddings) as ONE
 * dispatch: the whole reduction over M in each workgroup, no scratch memory.
 * `matmulDyTXSplitK` is the faster form where the output grid is small.
 * `dw` must not alias `dy` or `x`.
 */
export async function matmulDyTX(gpu: Gpu, args: MatmulDyTXArgs): Promise<Dispatch> {
  const [d] = await dyTXDispatches(gpu, args, false);
  return d;
}

/**
 * The weight gradient `dw[N, K] (+)= dy[M, N]^T · x[M, K]`, as `matmulDyTX`,
 * with the reduction over M split into slices where the output grid alone
 * would leave the device idle (see the module comment; `options.splitK`
 * forces a count): then two dispatches, the slices writing partials
 * `[S, N, K]` into a scratch buffer (in the first dispatch's `owned`), and
 * their sum in slice order into dw, so results stay deterministic. Otherwise
 * one dispatch. Record all of them, in order.
 *
 * @example
 * ```ts ignore
 * const ds = await matmulDyTXSplitK(gpu, { dy, x, dw, M: 8192, N: 128, K: 512, accumulate: true });
 * gpu.submit((enc) => recordDispatches(gpu, enc, ds));
 * // when done with them: for (const d of ds) for (const b of d.owned ?? []) b.destroy();
 * ```
 */
export async function matmulDyTXSplitK(gpu: Gpu, args: MatmulDyTXArgs): Promise<Dispatch[]> {
  return await dyTXDispatches(gpu, args, true);
}

/**
 * Bytes of split-K partials `matmulDyTXSplitK` needs for these arguments on
 * this device (0 when it would not split): what a shared `partials` scratch
 * must hold.
 */
export async function splitKPartialsBytes(gpu: Gpu, args: MatmulDyTXArgs): Promise<number> {
  const pr: Problem = {
    R: args.N,
    C: args.K,
    L: args.M,
    a: "out",
    b: "out",
    lda: strideOf("matmulDyTX", args.dyStride, args.N),
  };
  const spec = await chooseSpec(gpu, pr, args.accumulate ?? false, args.options);
  const [rowsPerTile, colsPerTile] = tileShape(spec);
  const tiles = Math.ceil(pr.R / rowsPerTile) * Math.ceil(pr.C / colsPerTile);
  const { slices } = chooseSlices(gpu, pr, spec, tiles, args.options, true);
  return slices > 1 ? slices * pr.R * pr.C * 4 : 0;
}

function dyTXDispatches(gpu: Gpu, args: MatmulDyTXArgs, allowSplit: boolean): Promise<Dispatch[]> {
  const { M, N, K } = args;
  return matmulDispatches(
    gpu,
    `matmul dyTx M=${M} N=${N} K=${K}${
      args.dyStride === undefined ? "" : ` dyStride=${args.dyStride}`
    }`,
    { R: N, C: K, L: M, a: "out", b: "out", lda: strideOf(`matmul dyTx`, args.dyStride, N) },
    { a: args.dy, b: args.x, out: args.dw, names: ["dy", "x", "dw"] },
    args.accumulate ?? false,
    args.options,
    allowSplit,
    args.partials,
  );
}
