/**
 * What a load costs on this adapter, by the path it takes, and what that does
 * to a matmul: the measurement behind the next CPU matmul design (issue 14).
 *
 * 1. One vec4 load per invocation per loop iteration, by path: a storage
 *    buffer at a per-lane address (what our matmuls do), a storage buffer at
 *    an address the same for every lane, a uniform buffer at such an address,
 *    and `textureLoad` from an rgba32f texture at a per-lane texel.
 * 2. The same register-tiled X W^T kernel (each invocation 8 rows x 4
 *    columns, vec4 along K, no workgroup memory, no subgroups) reading its
 *    operands from storage buffers or from rgba32f textures (the only
 *    difference between the two), checked against a CPU reference, beside
 *    the production `matmulXWt` at the same shape; and the cost of copying the
 *    activations into a texture (copyBufferToTexture), which a texture design
 *    would pay per call.
 * 3. X W^T in the production CPU design's shape (a subgroup per workgroup,
 *    32 x 8 outputs per lane, the shared rows of A handed round with
 *    subgroupBroadcast), operands from storage or textures.
 * 4. dX = dY W in that design (W read across its rows), storage or textures,
 *    beside the production `matmulDyW`.
 * 5. dW = dY^T X in that design (both read across their rows), storage or
 *    textures, beside the production `matmulDyTXSplitK`.
 *
 *   deno run -A bench/load_path_bench.ts [--rounds 5]
 *
 * Kernels are timed by submit-to-done wall time (minimum over rounds of a few
 * dispatches each), so this is for CPU drivers; on a GPU use `deno task bench`.
 */
import { parseArgs } from "node:util";
import { type Dispatch, Gpu } from "../kernels/runtime.ts";
import { matmulDyTXSplitK, matmulDyW, matmulXWt } from "../kernels/matmul.ts";
import { timeGpu } from "./harness.ts";

const { values } = parseArgs({ options: { rounds: { type: "string", default: "5" } } });
const rounds = Number(values.rounds);
const gpu = await Gpu.request();
const device = gpu.device;
const STORAGE = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC;

function fill(n: number, seed: number): Float32Array<ArrayBuffer> {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = (((i + seed) * 2654435761) % 1000) / 1000 - 0.5;
  return a;
}
function storageBuffer(data: Float32Array<ArrayBuffer>): GPUBuffer {
  const b = device.createBuffer({ size: data.byteLength, usage: STORAGE });
  device.queue.writeBuffer(b, 0, data);
  return b;
}
/** An rgba32f texture of `rows` x `cols4` texels holding a row-major [rows, 4 * cols4] matrix. */
function matrixTexture(data: Float32Array<ArrayBuffer>, rows: number, cols4: number): GPUTexture {
  const t = device.createTexture({
    size: [cols4, rows],
    format: "rgba32float",
    usage: GPUTextureUsage.TEXTURE_BINDING | GPUTextureUsage.COPY_DST,
  });
  device.queue.writeTexture({ texture: t }, data, { bytesPerRow: cols4 * 16 }, [cols4, rows]);
  return t;
}
/** Minimum wall milliseconds of `passes` dispatches of `pipe`, over `rounds` rounds (after one warm-up). */
async function timePipe(
  pipe: GPUComputePipeline,
  bind: GPUBindGroup,
  groups: number,
  passes: number,
): Promise<number> {
  const once = async () => {
    const enc = device.createCommandEncoder();
    const pass = enc.beginComputePass();
    pass.setPipeline(pipe);
    pass.setBindGroup(0, bind);
    for (let i = 0; i < passes; i++) pass.dispatchWorkgroups(groups);
    pass.end();
    const t0 = performance.now();
    device.queue.submit([enc.finish()]);
    await device.queue.onSubmittedWorkDone();
    return (performance.now() - t0) / passes;
  };
  await once();
  let best = Infinity;
  for (let r = 0; r < rounds; r++) best = Math.min(best, await once());
  return best;
}
function pipeline(
  code: string,
  entries: (GPUBuffer | GPUTexture)[],
): [GPUComputePipeline, GPUBindGroup] {
  const pipe = device.createComputePipeline({
    layout: "auto",
    compute: { module: device.createShaderModule({ code }), entryPoint: "main" },
  });
  const bind = device.createBindGroup({
    layout: pipe.getBindGroupLayout(0),
    entries: entries.map((e, binding) => ({
      binding,
      resource: e instanceof GPUBuffer ? { buffer: e } : e.createView(),
    })),
  });
  return [pipe, bind];
}

console.log(`adapter: ${gpu.adapterSummary.name}; minimum of ${rounds} rounds, wall clock`);

// 1. Loads by path.
{
  const ROWS = 256, L4 = 256, INV = 8192, ITERS = 256;
  const data = fill(ROWS * L4 * 4, 1);
  const sbuf = storageBuffer(data);
  const ubuf = device.createBuffer({
    size: 65536,
    usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
  });
  device.queue.writeBuffer(ubuf, 0, data, 0, 16384);
  const tex = matrixTexture(data, ROWS, L4);
  const out = device.createBuffer({ size: INV * 16, usage: GPUBufferUsage.STORAGE });
  const paths: [string, string, string, GPUBuffer | GPUTexture][] = [
    [
      "storage buffer, per-lane address",
      "var<storage, read> b: array<vec4<f32>>;",
      "b[row * L4 + l % L4]",
      sbuf,
    ],
    [
      "storage buffer, same address in all lanes",
      "var<storage, read> b: array<vec4<f32>>;",
      "b[(wg * 7u + l) % (ROWS * L4)]",
      sbuf,
    ],
    [
      "uniform buffer, same address in all lanes",
      "var<uniform> b: array<vec4<f32>, 4096>;",
      "b[(wg * 7u + l) % 4096u]",
      ubuf,
    ],
    [
      "texture (textureLoad), per-lane texel",
      "var b: texture_2d<f32>;",
      "textureLoad(b, vec2<u32>(l % L4, row), 0)",
      tex,
    ],
  ];
  console.log(`\nvec4 loads, ${INV} invocations x ${ITERS} loads per dispatch:`);
  for (const [name, decl, load, res] of paths) {
    const code = `
@group(0) @binding(0) var<storage, read_write> o: array<vec4<f32>>;
@group(0) @binding(1) ${decl}
const L4 = ${L4}u; const ROWS = ${ROWS}u;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
  let row = gid.x % ROWS;
  let wg = wid.x;
  var acc = vec4<f32>(0.0);
  for (var l = 0u; l < ${ITERS}u; l++) { acc += ${load}; }
  o[gid.x] = acc;
}`;
    const [pipe, bind] = pipeline(code, [out, res]);
    const ms = await timePipe(pipe, bind, INV / 64, 4);
    const ns = (ms * 1e6) / (INV * ITERS);
    console.log(
      `  ${name.padEnd(44)} ${ms.toFixed(1).padStart(7)} ms  ${
        ns.toFixed(2).padStart(6)
      } ns per invocation-load`,
    );
  }
}

// 2-5. Matmul kernels, each reading its two operands from storage buffers
// (vec4 arrays) or from rgba32f textures, as `tex` says.

/** The declaration of matrix operand `name` at `binding`: an rgba32f texture or a vec4 storage array. */
function operandDecl(name: string, binding: number, tex: boolean): string {
  return tex
    ? `@group(0) @binding(${binding}) var ${name}: texture_2d<f32>;`
    : `@group(0) @binding(${binding}) var<storage, read> ${name}: array<vec4<f32>>;`;
}
/** The vec4 at texel column `col4` of row `row` of operand `name` (`width4` vec4s per row). */
function operandLoad(
  name: string,
  tex: boolean,
  width4: string,
  col4: string,
  row: string,
): string {
  return tex
    ? `textureLoad(${name}, vec2<u32>(${col4}, ${row}), 0)`
    : `${name}[(${row}) * ${width4} + ${col4}]`;
}

/** 2. X W^T with 8 rows x 4 columns per invocation, no subgroups. */
const RM = 8, CN = 4;
function plainXwt(M: number, K: number, N: number, tex: [boolean, boolean]): string {
  const lines: string[] = [];
  for (let i = 0; i < RM; i++) {
    lines.push(`let x${i} = ${operandLoad("x", tex[0], "K4", "l", `min(r0 + ${i}u, M - 1u)`)};`);
  }
  for (let j = 0; j < CN; j++) {
    lines.push(`let w${j} = ${operandLoad("w", tex[1], "K4", "l", `min(c0 + ${j}u, N - 1u)`)};`);
  }
  const decls: string[] = [];
  const stores: string[] = [];
  for (let i = 0; i < RM; i++) {
    for (let j = 0; j < CN; j++) {
      lines.push(`a${i}_${j} += dot(x${i}, w${j});`);
      decls.push(`var a${i}_${j} = 0.0;`);
      stores.push(
        `if (r0 + ${i}u < M && c0 + ${j}u < N) { y[(r0 + ${i}u) * N + c0 + ${j}u] = a${i}_${j}; }`,
      );
    }
  }
  return `
@group(0) @binding(0) var<storage, read_write> y: array<f32>;
${operandDecl("x", 1, tex[0])}
${operandDecl("w", 2, tex[1])}
const M = ${M}u; const N = ${N}u; const K4 = ${K / 4}u;
const NCB = ${Math.ceil(N / CN)}u; const MRB = ${Math.ceil(M / RM)}u;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let cb = gid.x % NCB;
  let rb = gid.x / NCB;
  if (rb >= MRB) { return; }
  let r0 = rb * ${RM}u;
  let c0 = cb * ${CN}u;
  ${decls.join("\n  ")}
  for (var l = 0u; l < K4; l++) {
    ${lines.join("\n    ")}
  }
  ${stores.join("\n  ")}
}`;
}

/**
 * 3-5. The production CPU design's shape: one subgroup of S lanes per
 * workgroup, each lane owning TN = 8 columns; the rows shared by all lanes
 * are loaded once per subgroup (a texel per lane) and handed round with
 * subgroupBroadcast. `loads` are a loop iteration's loads, `fmas` its
 * multiply-adds into vec4 accumulators acc{i}_{g} (row i, columns 4g..4g+3);
 * `rows` x `cols` is the output, `iterations` the loop's trip count.
 */
function subgroupKernel(opts: {
  S: number;
  tm: number;
  rows: number;
  cols: number;
  iterations: number;
  decls: string;
  loads: string[];
  fmas: string[];
}): string {
  const { S, tm, rows, cols } = opts;
  const TN = 8;
  const accs: string[] = [];
  const stores: string[] = [];
  for (let i = 0; i < tm; i++) {
    for (let g = 0; g < TN / 4; g++) {
      accs.push(`var acc${i}_${g} = vec4<f32>(0.0);`);
      for (let p = 0; p < 4; p++) {
        const c = `cb + ${4 * g + p}u`;
        stores.push(
          `if (r0 + ${i}u < ${rows}u && ${c} < ${cols}u) { out[(r0 + ${i}u) * ${cols}u + ${c}] = acc${i}_${g}[${p}]; }`,
        );
      }
    }
  }
  const colTiles = Math.ceil(cols / (S * TN));
  return `
@group(0) @binding(0) var<storage, read_write> out: array<f32>;
${opts.decls}
@compute @workgroup_size(${S})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
  let r0 = (wid.x / ${colTiles}u) * ${tm}u;
  let cb = (wid.x % ${colTiles}u) * ${S * TN}u + lane * ${TN}u;
  ${accs.join("\n  ")}
  for (var it = 0u; it < ${opts.iterations}u; it++) {
    ${opts.loads.join("\n    ")}
    ${opts.fmas.join("\n    ")}
  }
  ${stores.join("\n  ")}
}`;
}
const subgroupGroups = (S: number, tm: number, rows: number, cols: number) =>
  Math.ceil(rows / tm) * Math.ceil(cols / (S * 8));

/**
 * Loads `ca{c}` of the `tm` rows one workgroup shares (row r0 + lane + S*c of
 * operand `name`, `width4` texels per row, `rows` rows, clamped): one texel
 * along the reduction per lane and chunk.
 */
function sharedRows(
  S: number,
  tm: number,
  name: string,
  tex: boolean,
  width4: number,
  rows: number,
): string[] {
  const loads: string[] = [];
  for (let c = 0; c < tm / S; c++) {
    const row = `min(r0 + lane + ${S * c}u, ${rows - 1}u)`;
    loads.push(`let ca${c} = ${operandLoad(name, tex, `${width4}u`, "it", row)};`);
  }
  return loads;
}
/** Row i of those, handed round from the lane that loaded it. */
const broadcastRow = (S: number, i: number) =>
  `let a${i} = subgroupBroadcast(ca${Math.floor(i / S)}, ${i % S}u);`;

/** X W^T: y [M, N] = x [M, K] w [N, K]^T; lanes broadcast 32 rows of x, each reads 8 rows of w. */
function subgroupXwt(S: number, M: number, K: number, N: number, tex: [boolean, boolean]): string {
  const TM = 32;
  const fmas: string[] = [];
  const loads = sharedRows(S, TM, "x", tex[0], K / 4, M);
  for (let j = 0; j < 8; j++) {
    loads.push(
      `let b${j} = ${operandLoad("w", tex[1], `${K / 4}u`, "it", `min(cb + ${j}u, ${N - 1}u)`)};`,
    );
  }
  for (let i = 0; i < TM; i++) {
    fmas.push(broadcastRow(S, i));
    for (let g = 0; g < 2; g++) {
      fmas.push(
        `acc${i}_${g} += vec4<f32>(${
          [0, 1, 2, 3].map((p) => `dot(a${i}, b${4 * g + p})`).join(", ")
        });`,
      );
    }
  }
  const decls = `${operandDecl("x", 1, tex[0])}\n${operandDecl("w", 2, tex[1])}`;
  return subgroupKernel({ S, tm: TM, rows: M, cols: N, iterations: K / 4, decls, loads, fmas });
}

/** dX = dY W: dx [M, K] from dy [M, N] (rows broadcast, 4 n per texel) and w [N, K] read across its rows. */
function subgroupDyw(S: number, M: number, N: number, K: number, tex: [boolean, boolean]): string {
  const TM = 32;
  const fmas: string[] = [];
  const loads = sharedRows(S, TM, "dy", tex[0], N / 4, M);
  for (let q = 0; q < 4; q++) {
    for (let g = 0; g < 2; g++) {
      loads.push(
        `let b${q}_${g} = ${
          operandLoad(
            "w",
            tex[1],
            `${K / 4}u`,
            `min(cb / 4u + ${g}u, ${K / 4 - 1}u)`,
            `it * 4u + ${q}u`,
          )
        };`,
      );
    }
  }
  for (let i = 0; i < TM; i++) {
    fmas.push(broadcastRow(S, i));
    for (let q = 0; q < 4; q++) {
      for (let g = 0; g < 2; g++) fmas.push(`acc${i}_${g} += a${i}[${q}] * b${q}_${g};`);
    }
  }
  const decls = `${operandDecl("dy", 1, tex[0])}\n${operandDecl("w", 2, tex[1])}`;
  return subgroupKernel({ S, tm: TM, rows: M, cols: K, iterations: N / 4, decls, loads, fmas });
}

/**
 * dW = dY^T X: dw [N, K] from dy [M, N] and x [M, K], both read across their
 * rows: for one m a lane's texel of dy holds 4 consecutive rows n (4S rows per
 * workgroup), its two texels of x its 8 columns k.
 */
function subgroupDytx(S: number, M: number, N: number, K: number, tex: [boolean, boolean]): string {
  const loads: string[] = [];
  const fmas: string[] = [];
  for (let q = 0; q < 4; q++) {
    const m = `it * 4u + ${q}u`;
    loads.push(
      `let ca${q} = ${
        operandLoad("dy", tex[0], `${N / 4}u`, `min(r0 / 4u + lane, ${N / 4 - 1}u)`, m)
      };`,
    );
    for (let g = 0; g < 2; g++) {
      loads.push(
        `let b${q}_${g} = ${
          operandLoad("x", tex[1], `${K / 4}u`, `min(cb / 4u + ${g}u, ${K / 4 - 1}u)`, m)
        };`,
      );
    }
  }
  for (let q = 0; q < 4; q++) {
    for (let src = 0; src < S; src++) {
      fmas.push(`let a${q}_${src} = subgroupBroadcast(ca${q}, ${src}u);`);
      for (let p = 0; p < 4; p++) {
        for (let g = 0; g < 2; g++) {
          fmas.push(`acc${4 * src + p}_${g} += a${q}_${src}[${p}] * b${q}_${g};`);
        }
      }
    }
  }
  const decls = `${operandDecl("dy", 1, tex[0])}\n${operandDecl("x", 2, tex[1])}`;
  return subgroupKernel({ S, tm: 4 * S, rows: N, cols: K, iterations: M / 4, decls, loads, fmas });
}

/** A row-major matrix operand of `rows` x `cols` values (`cols` a multiple of 4). */
interface Matrix {
  data: Float32Array<ArrayBuffer>;
  rows: number;
  cols: number;
}
/**
 * out[r * C + c] = sum over l < L of a[r * aStride[0] + l * aStride[1]] *
 * b[c * bStride[0] + l * bStride[1]], summed in float64: the CPU reference
 * every kernel here is checked against.
 */
function reference(
  R: number,
  C: number,
  L: number,
  a: Float32Array,
  aStride: [number, number],
  b: Float32Array,
  bStride: [number, number],
): Float64Array {
  const out = new Float64Array(R * C);
  for (let r = 0; r < R; r++) {
    for (let c = 0; c < C; c++) {
      let t = 0;
      for (let l = 0; l < L; l++) {
        t += a[r * aStride[0] + l * aStride[1]] * b[c * bStride[0] + l * bStride[1]];
      }
      out[r * C + c] = t;
    }
  }
  return out;
}
/** What a table row's extra cells may use. */
interface RowResources {
  buffers: [GPUBuffer, GPUBuffer];
  textures: [GPUTexture, GPUTexture];
  out: GPUBuffer;
}
const rate = (flop: number, ms: number) =>
  `${(flop / ms / 1e6).toFixed(1).padStart(5)} (${ms.toFixed(2)} ms)`;

/**
 * One table row: each variant (a kernel and which operands it reads from
 * textures) timed and its output checked against `ref` to within `tol`
 * (absolute: the sums are of at most 2048 products of values in [-0.5, 0.5],
 * whose float32 rounding stays far below it), then the `more` cells.
 */
async function benchRow(
  name: string,
  operands: [Matrix, Matrix],
  ref: Float64Array,
  flop: number,
  variants: { code: string; tex: [boolean, boolean]; groups: number }[],
  more?: (r: RowResources) => Promise<string[]>,
): Promise<void> {
  const tol = 1e-3;
  const buffers = operands.map((m) => storageBuffer(m.data)) as [GPUBuffer, GPUBuffer];
  const textures = operands.map((m) => matrixTexture(m.data, m.rows, m.cols / 4)) as [
    GPUTexture,
    GPUTexture,
  ];
  const out = device.createBuffer({ size: ref.length * 4, usage: STORAGE });
  const cells: string[] = [];
  for (const v of variants) {
    const [pipe, bind] = pipeline(v.code, [
      out,
      ...v.tex.map((t, i) => (t ? textures[i] : buffers[i])),
    ]);
    const ms = await timePipe(pipe, bind, v.groups, 4);
    const got = new Float32Array(await gpu.read(out, 0, ref.length * 4));
    let err = 0;
    for (let i = 0; i < ref.length; i++) err = Math.max(err, Math.abs(got[i] - ref[i]));
    if (!(err < tol)) throw new Error(`${name}, textures ${v.tex}: max error ${err}`);
    cells.push(rate(flop, ms));
    device.queue.writeBuffer(out, 0, new Float32Array(ref.length));
  }
  if (more) cells.push(...(await more({ buffers, textures, out })));
  console.log(`  ${name.padEnd(44)}${cells.map((c) => c.padEnd(18)).join(" ")}`);
  for (const b of [...buffers, out]) b.destroy();
  for (const t of textures) t.destroy();
}
/** The production dispatches' GFLOP/s (ms), then their scratch freed. */
async function production(flop: number, dispatches: Dispatch | Dispatch[]): Promise<string> {
  const ms = await timeGpu(gpu, dispatches, { warmup: 1, iterations: rounds, repeat: 4 });
  for (const d of [dispatches].flat()) for (const b of d.owned ?? []) b.destroy();
  return rate(flop, ms);
}

const shapes: [string, number, number, number][] = [
  ["tiny q/o", 2048, 128, 128],
  ["tiny gate|up", 2048, 128, 768],
  ["tiny lm_head (V 1558, 1560 for dY)", 2048, 128, 1558],
  ["minimind2-small q/o", 1024, 512, 512],
];
// X W^T's references, shared by parts 2 and 3: x [M, K], w [N, K].
const xwt = shapes.map(([name, M, K, N]) => {
  const x = { data: fill(M * K, 3), rows: M, cols: K },
    w = { data: fill(N * K, 5), rows: N, cols: K };
  const ref = reference(M, N, K, x.data, [K, 1], w.data, [K, 1]);
  return {
    label: `${name} M=${M} K=${K} N=${N}`,
    M,
    K,
    N,
    operands: [x, w] as [Matrix, Matrix],
    ref,
  };
});

console.log(
  `\nX W^T, ${RM}x${CN} outputs per invocation; GFLOP/s (ms), each checked against a CPU reference:`,
);
console.log(
  `  ${
    "shape".padEnd(44)
  }storage           textures          production matmulXWt copy x to texture`,
);
for (const { label, M, K, N, operands, ref } of xwt) {
  const groups = Math.ceil((Math.ceil(M / RM) * Math.ceil(N / CN)) / 64);
  const variants = [false, true].map((t) => ({
    code: plainXwt(M, K, N, [t, t]),
    tex: [t, t] as [boolean, boolean],
    groups,
  }));
  await benchRow(
    label,
    operands,
    ref,
    2 * M * N * K,
    variants,
    async ({ buffers, textures, out }) => {
      const prod = await production(
        2 * M * N * K,
        await matmulXWt(gpu, { x: buffers[0], w: buffers[1], y: out, M, K, N }),
      );
      // What a texture design pays per call to get the activations into a texture.
      const copy = async () => {
        const enc = device.createCommandEncoder();
        for (let i = 0; i < 4; i++) {
          enc.copyBufferToTexture({ buffer: buffers[0], bytesPerRow: K * 4 }, {
            texture: textures[0],
          }, [K / 4, M]);
        }
        const t0 = performance.now();
        device.queue.submit([enc.finish()]);
        await device.queue.onSubmittedWorkDone();
        return (performance.now() - t0) / 4;
      };
      await copy();
      let copyMs = Infinity;
      for (let r = 0; r < rounds; r++) copyMs = Math.min(copyMs, await copy());
      return [prod, `${copyMs.toFixed(2)} ms`];
    },
  );
}

if (gpu.features.subgroups) {
  const S = await gpu.subgroupSize();
  const both: [boolean, boolean][] = [[false, false], [false, true], [true, true]];
  console.log(
    `\nX W^T in the production CPU design's shape (subgroup ${S}, 32 x 8 outputs per lane); GFLOP/s (ms):`,
  );
  console.log(`  ${"shape".padEnd(44)}A, B storage      A storage, B tex  A, B textures`);
  for (const { label, M, K, N, operands, ref } of xwt) {
    const variants = both.map((tex) => ({
      code: subgroupXwt(S, M, K, N, tex),
      tex,
      groups: subgroupGroups(S, 32, M, N),
    }));
    await benchRow(label, operands, ref, 2 * M * N * K, variants);
  }

  // The two gradient forms, both from dY [M, N] (N the texel-aligned width)
  // and a second operand B: dX = dY W (B = w [N, K]) and dW = dY^T X
  // (B = x [M, K]).
  const plain: [boolean, boolean][] = [[false, false], [true, true]];
  const gradients = [
    {
      title: "dX = dY W in the same design",
      prodName: "matmulDyW",
      b: (_M: number, N: number, K: number) => ({ data: fill(N * K, 5), rows: N, cols: K }),
      ref: (M: number, N: number, K: number, dy: Float32Array, b: Float32Array) =>
        reference(M, K, N, dy, [N, 1], b, [1, K]),
      kernel: subgroupDyw,
      groups: (M: number, _N: number, K: number) => subgroupGroups(S, 32, M, K),
      prod: (dy: GPUBuffer, b: GPUBuffer, out: GPUBuffer, M: number, N: number, K: number) =>
        matmulDyW(gpu, { dy, w: b, dx: out, M, N, K }),
    },
    {
      title: `dW = dY^T X in the same design (${4 * S} x 8 outputs per lane)`,
      prodName: "matmulDyTX",
      b: (M: number, _N: number, K: number) => ({ data: fill(M * K, 3), rows: M, cols: K }),
      ref: (M: number, N: number, K: number, dy: Float32Array, b: Float32Array) =>
        reference(N, K, M, dy, [1, N], b, [1, K]),
      kernel: subgroupDytx,
      groups: (_M: number, N: number, K: number) => subgroupGroups(S, 4 * S, N, K),
      prod: (dy: GPUBuffer, b: GPUBuffer, out: GPUBuffer, M: number, N: number, K: number) =>
        matmulDyTXSplitK(gpu, { dy, x: b, dw: out, M, N, K }),
    },
  ];
  for (const form of gradients) {
    console.log(`\n${form.title}; GFLOP/s (ms):`);
    console.log(
      `  ${"shape".padEnd(44)}storage           textures          production ${form.prodName}`,
    );
    for (const [name, M, K, V] of shapes) {
      const N = Math.ceil(V / 4) * 4; // dY's rows are texel rows: a multiple of 4
      const dy = { data: fill(M * N, 7), rows: M, cols: N }, b = form.b(M, N, K);
      const variants = plain.map((tex) => ({
        code: form.kernel(S, M, N, K, tex),
        tex,
        groups: form.groups(M, N, K),
      }));
      const flop = 2 * M * N * K;
      await benchRow(
        `${name} M=${M} N=${N} K=${K}`,
        [dy, b],
        form.ref(M, N, K, dy.data, b.data),
        flop,
        variants,
        async (
          r,
        ) => [await production(flop, await form.prod(r.buffers[0], r.buffers[1], r.out, M, N, K))],
      );
    }
  }
}
