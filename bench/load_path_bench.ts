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
import { Gpu } from "../kernels/runtime.ts";
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
function matrixTexture(
  data: Float32Array<ArrayBuffer>,
  rows: number,
  cols4: number,
  extra = 0,
): GPUTexture {
  const t = device.createTexture({
    size: [cols4, rows],
    format: "rgba32float",
    usage: GPUTextureUsage.TEXTURE_BINDING | GPUTextureUsage.COPY_DST | extra,
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

// 2. One X W^T kernel, operands from storage buffers or from textures.
const RM = 8, CN = 4;
function xwtKernel(M: number, K: number, N: number, textures: boolean): string {
  const K4 = K / 4;
  const decl = textures
    ? "@group(0) @binding(1) var x: texture_2d<f32>;\n@group(0) @binding(2) var w: texture_2d<f32>;"
    : "@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;\n@group(0) @binding(2) var<storage, read> w: array<vec4<f32>>;";
  const ld = (m: string, row: string) =>
    textures ? `textureLoad(${m}, vec2<u32>(l, ${row}), 0)` : `${m}[(${row}) * K4 + l]`;
  const lines: string[] = [];
  for (let i = 0; i < RM; i++) lines.push(`    let x${i} = ${ld("x", `min(r0 + ${i}u, M - 1u)`)};`);
  for (let j = 0; j < CN; j++) lines.push(`    let w${j} = ${ld("w", `min(c0 + ${j}u, N - 1u)`)};`);
  for (let i = 0; i < RM; i++) {
    for (let j = 0; j < CN; j++) lines.push(`    a${i}_${j} += dot(x${i}, w${j});`);
  }
  const accs = [];
  const stores = [];
  for (let i = 0; i < RM; i++) {
    for (let j = 0; j < CN; j++) {
      accs.push(`a${i}_${j}`);
      stores.push(
        `  if (r0 + ${i}u < M && c0 + ${j}u < N) { y[(r0 + ${i}u) * N + c0 + ${j}u] = a${i}_${j}; }`,
      );
    }
  }
  return `
@group(0) @binding(0) var<storage, read_write> y: array<f32>;
${decl}
const M = ${M}u; const N = ${N}u; const K4 = ${K4}u;
const NCB = ${Math.ceil(N / CN)}u; const MRB = ${Math.ceil(M / RM)}u;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let cb = gid.x % NCB;
  let rb = gid.x / NCB;
  if (rb >= MRB) { return; }
  let r0 = rb * ${RM}u;
  let c0 = cb * ${CN}u;
  var ${accs.join(" = 0.0;\n  var ")} = 0.0;
  for (var l = 0u; l < K4; l++) {
${lines.join("\n")}
  }
${stores.join("\n")}
}`;
}

const shapes: [string, number, number, number][] = [
  ["tiny q/o", 2048, 128, 128],
  ["tiny gate|up", 2048, 128, 768],
  ["tiny lm_head (V 1558)", 2048, 128, 1558],
  ["minimind2-small q/o", 1024, 512, 512],
];
console.log(
  `\nX W^T, ${RM}x${CN} outputs per invocation; GFLOP/s (ms), the kernel checked against a CPU reference:`,
);
console.log(
  "  shape                        storage kernel    texture kernel    production matmulXWt   copy x to texture",
);
for (const [name, M, K, N] of shapes) {
  const x = fill(M * K, 3), w = fill(N * K, 5);
  const ref = new Float32Array(M * N);
  for (let m = 0; m < M; m++) {
    for (let n = 0; n < N; n++) {
      let s = 0;
      for (let k = 0; k < K; k++) s += x[m * K + k] * w[n * K + k];
      ref[m * N + n] = s;
    }
  }
  const xs = storageBuffer(x), ws = storageBuffer(w);
  const xt = matrixTexture(x, M, K / 4, GPUTextureUsage.COPY_DST), wt = matrixTexture(w, N, K / 4);
  const y = device.createBuffer({ size: M * N * 4, usage: STORAGE });
  const groups = Math.ceil((Math.ceil(M / RM) * Math.ceil(N / CN)) / 64);
  const flop = 2 * M * N * K;
  const cells: string[] = [];
  for (const textures of [false, true]) {
    const [pipe, bind] = pipeline(
      xwtKernel(M, K, N, textures),
      textures ? [y, xt, wt] : [y, xs, ws],
    );
    const ms = await timePipe(pipe, bind, groups, 4);
    const got = new Float32Array(await gpu.read(y, 0, M * N * 4));
    let err = 0;
    for (let i = 0; i < M * N; i++) err = Math.max(err, Math.abs(got[i] - ref[i]));
    // f32 sums of K products of values in [-0.5, 0.5]: well under 1e-4 here.
    if (!(err < 1e-4)) {
      throw new Error(`${name} ${textures ? "texture" : "storage"}: max error ${err}`);
    }
    cells.push(`${(flop / ms / 1e6).toFixed(1).padStart(5)} (${ms.toFixed(2)} ms)`);
    device.queue.writeBuffer(y, 0, new Float32Array(M * N));
  }
  const prod = await matmulXWt(gpu, { x: xs, w: ws, y, M, K, N });
  const prodMs = await timeGpu(gpu, prod, { warmup: 1, iterations: rounds, repeat: 4 });
  cells.push(`${(flop / prodMs / 1e6).toFixed(1).padStart(5)} (${prodMs.toFixed(2)} ms)`);
  // What a texture design pays per call to get the activations into a texture.
  const copy = async () => {
    const enc = device.createCommandEncoder();
    for (let i = 0; i < 4; i++) {
      enc.copyBufferToTexture({ buffer: xs, bytesPerRow: K * 4 }, { texture: xt }, [K / 4, M]);
    }
    const t0 = performance.now();
    device.queue.submit([enc.finish()]);
    await device.queue.onSubmittedWorkDone();
    return (performance.now() - t0) / 4;
  };
  await copy();
  let copyMs = Infinity;
  for (let r = 0; r < rounds; r++) copyMs = Math.min(copyMs, await copy());
  cells.push(`${copyMs.toFixed(2)} ms`);
  console.log(
    `  ${(name + ` M=${M} K=${K} N=${N}`).padEnd(29)}${cells.map((c) => c.padEnd(18)).join(" ")}`,
  );
  for (const b of [xs, ws, y]) b.destroy();
  xt.destroy();
  wt.destroy();
  for (const b of prod.owned ?? []) b.destroy();
}

// 3. The production CPU design's shape (one subgroup per workgroup; each lane
//    owns TN columns of B; the TM rows of A, shared by all lanes, are loaded
//    once per subgroup and handed round with subgroupBroadcast), with A and B
//    read from storage buffers or from textures.
if (gpu.features.subgroups) {
  const S = await gpu.subgroupSize();
  const TM = 32, TN = 8;
  const subgroupKernel = (
    M: number,
    K: number,
    N: number,
    texA: boolean,
    texB: boolean,
  ): string => {
    const decl = (name: string, binding: number, tex: boolean) =>
      tex
        ? `@group(0) @binding(${binding}) var ${name}: texture_2d<f32>;`
        : `@group(0) @binding(${binding}) var<storage, read> ${name}: array<vec4<f32>>;`;
    const ld = (m: string, tex: boolean, row: string) =>
      tex ? `textureLoad(${m}, vec2<u32>(l, ${row}), 0)` : `${m}[(${row}) * K4 + l]`;
    const body: string[] = [];
    const chunks = TM / S;
    for (let c = 0; c < chunks; c++) {
      body.push(`let ca${c} = ${ld("x", texA, `min(r0 + lane + ${S * c}u, M - 1u)`)};`);
    }
    for (let j = 0; j < TN; j++) {
      body.push(`let b${j} = ${ld("w", texB, `min(cb + ${j}u, N - 1u)`)};`);
    }
    for (let i = 0; i < TM; i++) {
      body.push(`let a${i} = subgroupBroadcast(ca${Math.floor(i / S)}, ${i % S}u);`);
      for (let j = 0; j < TN; j++) body.push(`acc${i}_${j} += dot(a${i}, b${j});`);
    }
    const decls: string[] = [];
    const stores: string[] = [];
    for (let i = 0; i < TM; i++) {
      for (let j = 0; j < TN; j++) {
        decls.push(`var acc${i}_${j} = 0.0;`);
        stores.push(
          `if (r0 + ${i}u < M && cb + ${j}u < N) { y[(r0 + ${i}u) * N + cb + ${j}u] = acc${i}_${j}; }`,
        );
      }
    }
    return `
@group(0) @binding(0) var<storage, read_write> y: array<f32>;
${decl("x", 1, texA)}
${decl("w", 2, texB)}
const M = ${M}u; const N = ${N}u; const K4 = ${K / 4}u;
const COLT = ${Math.ceil(N / (S * TN))}u;
@compute @workgroup_size(${S})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
  let r0 = (wid.x / COLT) * ${TM}u;
  let cb = (wid.x % COLT) * ${S * TN}u + lane * ${TN}u;
  ${decls.join("\n  ")}
  for (var l = 0u; l < K4; l++) {
    ${body.join("\n    ")}
  }
  ${stores.join("\n  ")}
}`;
  };
  console.log(
    `\nX W^T in the production CPU design's shape (subgroup ${S}, ${TM} x ${TN} outputs per lane); GFLOP/s (ms):`,
  );
  console.log(
    "  shape                        A, B storage      A storage, B texture  A, B texture",
  );
  for (const [name, M, K, N] of shapes) {
    const x = fill(M * K, 3), w = fill(N * K, 5);
    const ref = new Float32Array(M * N);
    for (let m = 0; m < M; m++) {
      for (let n = 0; n < N; n++) {
        let t = 0;
        for (let k = 0; k < K; k++) t += x[m * K + k] * w[n * K + k];
        ref[m * N + n] = t;
      }
    }
    const xs = storageBuffer(x), ws = storageBuffer(w);
    const xt = matrixTexture(x, M, K / 4), wt = matrixTexture(w, N, K / 4);
    const y = device.createBuffer({ size: M * N * 4, usage: STORAGE });
    const groups = Math.ceil(M / TM) * Math.ceil(N / (S * TN));
    const flop = 2 * M * N * K;
    const cells: string[] = [];
    for (const [texA, texB] of [[false, false], [false, true], [true, true]]) {
      const [pipe, bind] = pipeline(subgroupKernel(M, K, N, texA, texB), [
        y,
        texA ? xt : xs,
        texB ? wt : ws,
      ]);
      const ms = await timePipe(pipe, bind, groups, 4);
      const got = new Float32Array(await gpu.read(y, 0, M * N * 4));
      let err = 0;
      for (let i = 0; i < M * N; i++) err = Math.max(err, Math.abs(got[i] - ref[i]));
      if (!(err < 1e-4)) throw new Error(`${name} subgroup A ${texA} B ${texB}: max error ${err}`);
      cells.push(`${(flop / ms / 1e6).toFixed(1).padStart(5)} (${ms.toFixed(2)} ms)`);
      device.queue.writeBuffer(y, 0, new Float32Array(M * N));
    }
    console.log(
      `  ${(name + ` M=${M} K=${K} N=${N}`).padEnd(29)}${cells.map((c) => c.padEnd(18)).join(" ")}`,
    );
    for (const b of [xs, ws, y]) b.destroy();
    xt.destroy();
    wt.destroy();
  }
}

// 4. The input-gradient form dX = dY W (W [N, K] is read across its rows: for
//    one reduction index n a lane's 8 columns k are 2 consecutive vec4s) in
//    the same subgroup design, from storage buffers or from textures.
if (gpu.features.subgroups) {
  const S = await gpu.subgroupSize();
  const TM = 32, TN = 8;
  const dywKernel = (M: number, N: number, K: number, tex: boolean): string => {
    const decl = (name: string, binding: number) =>
      tex
        ? `@group(0) @binding(${binding}) var ${name}: texture_2d<f32>;`
        : `@group(0) @binding(${binding}) var<storage, read> ${name}: array<vec4<f32>>;`;
    // dy [M, N] read along n (a vec4 = 4 reduction steps); w [N, K] read along k.
    const ldDy = (row: string) =>
      tex ? `textureLoad(dy, vec2<u32>(l4, ${row}), 0)` : `dy[(${row}) * N4 + l4]`;
    const ldW = (n: string, k4: string) =>
      tex ? `textureLoad(w, vec2<u32>(${k4}, ${n}), 0)` : `w[(${n}) * K4 + ${k4}]`;
    const body: string[] = [];
    for (let c = 0; c < TM / S; c++) {
      body.push(`let ca${c} = ${ldDy(`min(r0 + lane + ${S * c}u, M - 1u)`)};`);
    }
    for (let q = 0; q < 4; q++) {
      for (let g = 0; g < TN / 4; g++) {
        body.push(`let b${q}_${g} = ${ldW(`l4 * 4u + ${q}u`, `min(cb / 4u + ${g}u, K4 - 1u)`)};`);
      }
    }
    for (let i = 0; i < TM; i++) {
      body.push(`let a${i} = subgroupBroadcast(ca${Math.floor(i / S)}, ${i % S}u);`);
      for (let q = 0; q < 4; q++) {
        for (let g = 0; g < TN / 4; g++) body.push(`acc${i}_${g} += a${i}[${q}] * b${q}_${g};`);
      }
    }
    const decls: string[] = [];
    const stores: string[] = [];
    for (let i = 0; i < TM; i++) {
      for (let g = 0; g < TN / 4; g++) {
        decls.push(`var acc${i}_${g} = vec4<f32>(0.0);`);
        for (let p = 0; p < 4; p++) {
          stores.push(
            `if (r0 + ${i}u < M && cb + ${4 * g + p}u < K) { dx[(r0 + ${i}u) * K + cb + ${
              4 * g + p
            }u] = acc${i}_${g}[${p}]; }`,
          );
        }
      }
    }
    return `
@group(0) @binding(0) var<storage, read_write> dx: array<f32>;
${decl("dy", 1)}
${decl("w", 2)}
const M = ${M}u; const N4 = ${N / 4}u; const K = ${K}u; const K4 = ${K / 4}u;
const COLT = ${Math.ceil(K / (S * TN))}u;
@compute @workgroup_size(${S})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
  let r0 = (wid.x / COLT) * ${TM}u;
  let cb = (wid.x % COLT) * ${S * TN}u + lane * ${TN}u;
  ${decls.join("\n  ")}
  for (var l4 = 0u; l4 < N4; l4++) {
    ${body.join("\n    ")}
  }
  ${stores.join("\n  ")}
}`;
  };
  console.log(`\ndX = dY W in the same design; GFLOP/s (ms):`);
  console.log(
    "  shape                        storage           textures          production matmulDyW",
  );
  const dywShapes: [string, number, number, number][] = [
    ["tiny o (dY [M, 128])", 2048, 128, 128],
    ["tiny gate|up (dY [M, 768])", 2048, 768, 128],
    ["tiny lm_head (dY [M, 1560])", 2048, 1560, 128],
    ["minimind2-small q/o", 1024, 512, 512],
  ];
  for (const [name, M, N, K] of dywShapes) {
    const dyv = fill(M * N, 7), w = fill(N * K, 5);
    const ref = new Float32Array(M * K);
    for (let m = 0; m < M; m++) {
      for (let k = 0; k < K; k++) {
        let t = 0;
        for (let n = 0; n < N; n++) t += dyv[m * N + n] * w[n * K + k];
        ref[m * K + k] = t;
      }
    }
    const dys = storageBuffer(dyv), ws = storageBuffer(w);
    const dyt = matrixTexture(dyv, M, N / 4), wt = matrixTexture(w, N, K / 4);
    const dx = device.createBuffer({ size: M * K * 4, usage: STORAGE });
    const groups = Math.ceil(M / TM) * Math.ceil(K / (S * TN));
    const flop = 2 * M * N * K;
    const cells: string[] = [];
    for (const tex of [false, true]) {
      const [pipe, bind] = pipeline(dywKernel(M, N, K, tex), [dx, tex ? dyt : dys, tex ? wt : ws]);
      const ms = await timePipe(pipe, bind, groups, 4);
      const got = new Float32Array(await gpu.read(dx, 0, M * K * 4));
      let err = 0;
      for (let i = 0; i < M * K; i++) err = Math.max(err, Math.abs(got[i] - ref[i]));
      // Sums of up to 1560 products of values in [-0.5, 0.5]: f32 rounding stays well under 1e-3.
      if (!(err < 1e-3)) {
        throw new Error(`${name} dY W ${tex ? "texture" : "storage"}: max error ${err}`);
      }
      cells.push(`${(flop / ms / 1e6).toFixed(1).padStart(5)} (${ms.toFixed(2)} ms)`);
      device.queue.writeBuffer(dx, 0, new Float32Array(M * K));
    }
    const prod = await matmulDyW(gpu, { dy: dys, w: ws, dx, M, N, K });
    const prodMs = await timeGpu(gpu, prod, { warmup: 1, iterations: rounds, repeat: 4 });
    cells.push(`${(flop / prodMs / 1e6).toFixed(1).padStart(5)} (${prodMs.toFixed(2)} ms)`);
    console.log(
      `  ${(name + ` M=${M} N=${N} K=${K}`).padEnd(29)}${cells.map((c) => c.padEnd(18)).join(" ")}`,
    );
    for (const b of [dys, ws, dx]) b.destroy();
    dyt.destroy();
    wt.destroy();
    for (const b of prod.owned ?? []) b.destroy();
  }
}

// 5. The weight-gradient form dW = dY^T X (both operands read across rows:
//    for one reduction index m, a lane's texel of dY holds 4 consecutive rows
//    n, and its two texels of X its 8 columns k) in that design, from storage
//    or textures, beside the production `matmulDyTXSplitK`.
if (gpu.features.subgroups) {
  const S = await gpu.subgroupSize();
  const TM = 4 * S, TN = 8;
  const dytxKernel = (M: number, N: number, K: number, tex: boolean): string => {
    const decl = (name: string, binding: number) =>
      tex
        ? `@group(0) @binding(${binding}) var ${name}: texture_2d<f32>;`
        : `@group(0) @binding(${binding}) var<storage, read> ${name}: array<vec4<f32>>;`;
    const ld = (m: string, width4: string, col4: string, row: string) =>
      tex
        ? `textureLoad(${m}, vec2<u32>(${col4}, ${row}), 0)`
        : `${m}[(${row}) * ${width4} + ${col4}]`;
    const body: string[] = [];
    for (let q = 0; q < 4; q++) {
      body.push(
        `let ca${q} = ${ld("dy", "N4", "min(n0 / 4u + lane, N4 - 1u)", `m4 * 4u + ${q}u`)};`,
      );
      for (let g = 0; g < TN / 4; g++) {
        body.push(
          `let b${q}_${g} = ${ld("x", "K4", `min(cb / 4u + ${g}u, K4 - 1u)`, `m4 * 4u + ${q}u`)};`,
        );
      }
    }
    for (let q = 0; q < 4; q++) {
      for (let src = 0; src < S; src++) {
        body.push(`let a${q}_${src} = subgroupBroadcast(ca${q}, ${src}u);`);
        for (let p = 0; p < 4; p++) {
          for (let g = 0; g < TN / 4; g++) {
            body.push(`acc${4 * src + p}_${g} += a${q}_${src}[${p}] * b${q}_${g};`);
          }
        }
      }
    }
    const decls: string[] = [];
    const stores: string[] = [];
    for (let i = 0; i < TM; i++) {
      for (let g = 0; g < TN / 4; g++) {
        decls.push(`var acc${i}_${g} = vec4<f32>(0.0);`);
        for (let p = 0; p < 4; p++) {
          stores.push(
            `if (n0 + ${i}u < N && cb + ${4 * g + p}u < K) { dw[(n0 + ${i}u) * K + cb + ${
              4 * g + p
            }u] = acc${i}_${g}[${p}]; }`,
          );
        }
      }
    }
    return `
@group(0) @binding(0) var<storage, read_write> dw: array<f32>;
${decl("dy", 1)}
${decl("x", 2)}
const M4 = ${M / 4}u; const N = ${N}u; const N4 = ${N / 4}u; const K = ${K}u; const K4 = ${K / 4}u;
const COLT = ${Math.ceil(K / (S * TN))}u;
@compute @workgroup_size(${S})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
  let n0 = (wid.x / COLT) * ${TM}u;
  let cb = (wid.x % COLT) * ${S * TN}u + lane * ${TN}u;
  ${decls.join("\n  ")}
  for (var m4 = 0u; m4 < M4; m4++) {
    ${body.join("\n    ")}
  }
  ${stores.join("\n  ")}
}`;
  };
  console.log(`\ndW = dY^T X in the same design (${TM} x ${TN} outputs per lane); GFLOP/s (ms):`);
  console.log(
    "  shape                        storage           textures          production matmulDyTX",
  );
  const dytxShapes: [string, number, number, number][] = [
    ["tiny q/o", 2048, 128, 128],
    ["tiny gate|up", 2048, 768, 128],
    ["tiny lm_head (N 1560)", 2048, 1560, 128],
    ["minimind2-small q/o", 1024, 512, 512],
  ];
  for (const [name, M, N, K] of dytxShapes) {
    const dyv = fill(M * N, 7), x = fill(M * K, 3);
    const ref = new Float32Array(N * K);
    for (let m = 0; m < M; m++) {
      for (let n = 0; n < N; n++) {
        const d = dyv[m * N + n];
        for (let k = 0; k < K; k++) ref[n * K + k] += d * x[m * K + k];
      }
    }
    const dys = storageBuffer(dyv), xs = storageBuffer(x);
    const dyt = matrixTexture(dyv, M, N / 4), xt = matrixTexture(x, M, K / 4);
    const dw = device.createBuffer({ size: N * K * 4, usage: STORAGE });
    const groups = Math.ceil(N / TM) * Math.ceil(K / (S * TN));
    const flop = 2 * M * N * K;
    const cells: string[] = [];
    for (const tex of [false, true]) {
      const [pipe, bind] = pipeline(dytxKernel(M, N, K, tex), [dw, tex ? dyt : dys, tex ? xt : xs]);
      const ms = await timePipe(pipe, bind, groups, 4);
      const got = new Float32Array(await gpu.read(dw, 0, N * K * 4));
      let err = 0;
      for (let i = 0; i < N * K; i++) err = Math.max(err, Math.abs(got[i] - ref[i]));
      // Sums of 1024-2048 products of values in [-0.5, 0.5], in another order than the reference's float32 sums.
      if (!(err < 1e-3)) {
        throw new Error(`${name} dY^T X ${tex ? "texture" : "storage"}: max error ${err}`);
      }
      cells.push(`${(flop / ms / 1e6).toFixed(1).padStart(5)} (${ms.toFixed(2)} ms)`);
      device.queue.writeBuffer(dw, 0, new Float32Array(N * K));
    }
    const prod = await matmulDyTXSplitK(gpu, { dy: dys, x: xs, dw, M, N, K });
    const prodMs = await timeGpu(gpu, prod, { warmup: 1, iterations: rounds, repeat: 4 });
    cells.push(`${(flop / prodMs / 1e6).toFixed(1).padStart(5)} (${prodMs.toFixed(2)} ms)`);
    console.log(
      `  ${(name + ` M=${M} N=${N} K=${K}`).padEnd(29)}${cells.map((c) => c.padEnd(18)).join(" ")}`,
    );
    for (const b of [dys, xs, dw]) b.destroy();
    dyt.destroy();
    xt.destroy();
    for (const d of prod) for (const b of d.owned ?? []) b.destroy();
  }
}
