/**
 * The three matmul forms (kernels/matmul.ts) against the float64 reference
 * (model/reference.ts), with and without accumulation, for every kernel design
 * (the CPU-driver designs and the GPU tiled designs, forced here), over shapes
 * that are not multiples of any tile (1x1x1, 7x33x65, 130x65x7, 257x129x33),
 * aligned ones that are (or are not) whole tiles, mixed alignments (vec4 for
 * one operand, scalar for the other), one larger shape, and a grid of more
 * than 65535 workgroups. The tiled design's four tile shapes on shapes that
 * mix interior and edge workgroups and end the reduction in a partial step;
 * split-K dY^T X with forced and chosen slice counts, slices that do not
 * divide the reduction, overwrite and accumulate; determinism. The CPU
 * designs with their operands from textures (forced, and as auto chooses),
 * textures shared by calls recorded together, dy in padded rows (dyStride),
 * and the errors where textures cannot be used.
 *
 * Tolerance. Inputs are exact float32 values (standard normal) that the
 * reference widens to float64, so only the kernel's float32 summation counts.
 * An output is a sequential sum of L products, each O(1); the partial sums grow
 * like sqrt(j), so each of the L roundings is ~2^-24 sqrt(j) and their random
 * walk has a standard deviation of about 0.4 · 2^-24 · L; the worst of ~10^5
 * outputs is ~5 standard deviations. We allow atol = 4 · 2^-24 · L + 1e-6
 * (twice that worst case), and rtol 1e-6 for the rounding of the final add
 * when accumulating into O(1) values. A real mistake (a missing term, a wrong
 * row or column, a stale tile) is off by O(1).
 */
import { assert, assertClose, assertEquals, assertRejects } from "./assert.ts";
import { GPU_TEST, randomF32, submitPassAndWait } from "./helpers.ts";
import { type Dispatch, Gpu, releaseDispatches } from "../kernels/runtime.ts";
import { inputTextureBytes } from "../kernels/texels.ts";
import {
  chooseTiledTile,
  matmulDyTX,
  matmulDyTXSplitK,
  matmulDyW,
  type MatmulOptions,
  type MatmulVariant,
  matmulXWt,
  OPERAND_TEXTURE_WIDTH,
} from "../kernels/matmul.ts";
import * as ref from "../model/reference.ts";
import { Rng } from "../util/random.ts";

const gpu = await Gpu.request();
globalThis.addEventListener("unload", () => gpu.destroy());

const VARIANTS: MatmulVariant[] = [
  "auto",
  "fallback",
  ...(gpu.features.subgroups ? ["fallbackSubgroup" as const] : []),
  "tiled64",
  "tiled128",
];

function tolerance(L: number) {
  return { atol: 4 * 2 ** -24 * L + 1e-6, rtol: 1e-6 };
}

function addInto(a: Float64Array, init: Float32Array): Float64Array {
  const out = new Float64Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = a[i] + init[i];
  return out;
}

/** The three forms, and dY^T X through `matmulDyTXSplitK` (one or two dispatches). */
type Form = "xWt" | "dyW" | "dyTx" | "dyTxSplit";

/**
 * Runs one form at [M, K, N] on the GPU (accumulating into random values when
 * asked), checks it against the reference and returns the dispatches it ran.
 */
async function checkForm(
  form: Form,
  M: number,
  K: number,
  N: number,
  variant: MatmulVariant,
  accumulate: boolean,
  seed: number,
  extra: MatmulOptions = {},
): Promise<Dispatch[]> {
  const rng = new Rng(seed);
  const what = `${form} M=${M} K=${K} N=${N} ${variant}${accumulate ? " accumulate" : ""}`;
  // Operands of the form and the float64 expectation.
  let a: Float32Array, b: Float32Array, outLen: number, L: number;
  let expected: Float64Array;
  if (form === "xWt") {
    a = randomF32(rng, M * K); // x [M, K]
    b = randomF32(rng, N * K); // w [N, K]
    outLen = M * N;
    L = K;
    expected = ref.matmulXWt(Float64Array.from(a), Float64Array.from(b), M, K, N);
  } else if (form === "dyW") {
    a = randomF32(rng, M * N); // dy [M, N]
    b = randomF32(rng, N * K); // w [N, K]
    outLen = M * K;
    L = N;
    expected = ref.matmulDyW(Float64Array.from(a), Float64Array.from(b), M, N, K);
  } else {
    a = randomF32(rng, M * N); // dy [M, N]
    b = randomF32(rng, M * K); // x [M, K]
    outLen = N * K;
    L = M;
    expected = ref.matmulDyTX(Float64Array.from(a), Float64Array.from(b), M, N, K);
  }
  // Without accumulation the output starts as NaN garbage: every element must be written.
  const init = accumulate ? randomF32(rng, outLen) : new Float32Array(outLen).fill(NaN);
  if (accumulate) expected = addInto(expected, init);
  const aBuf = gpu.createBuffer(a, "a");
  const bBuf = gpu.createBuffer(b, "b");
  const outBuf = gpu.createBuffer(init, "out");
  let ds: Dispatch[] = [];
  try {
    const options = { variant, ...extra };
    const dyTx = { dy: aBuf, x: bBuf, dw: outBuf, M, N, K, accumulate, options };
    ds = form === "xWt"
      ? [await matmulXWt(gpu, { x: aBuf, w: bBuf, y: outBuf, M, K, N, accumulate, options })]
      : form === "dyW"
      ? [await matmulDyW(gpu, { dy: aBuf, w: bBuf, dx: outBuf, M, N, K, accumulate, options })]
      : form === "dyTx"
      ? [await matmulDyTX(gpu, dyTx)]
      : await matmulDyTXSplitK(gpu, dyTx);
    await submitPassAndWait(gpu, ds);
    const got = await gpu.readF32(outBuf, 0, outLen);
    assertClose(got, expected, tolerance(L), `${what} [${ds.map((d) => d.label).join(" + ")}]`);
    return ds;
  } finally {
    for (const d of ds) for (const buf of d.owned ?? []) buf.destroy();
    aBuf.destroy();
    bBuf.destroy();
    outBuf.destroy();
  }
}

// [M, K, N]. Unaligned everywhere; aligned whole tiles; aligned partial tiles;
// K % 4 == 0 with N odd and the reverse (vec4 for one operand only); tiny.
// Below SMALL_PROBLEM multiply-adds the CPU designs use a smaller register
// tile, so each alignment case appears on both sides of it.
const SHAPES: [number, number, number][] = [
  [1, 1, 1],
  [7, 33, 65],
  [130, 65, 7],
  [20, 36, 7],
  [9, 7, 12],
  [4, 4, 4],
  [257, 129, 33],
  [128, 64, 128],
  [132, 68, 36],
  [100, 36, 75],
  [75, 35, 100],
];
// Accumulation changes only the stores (scalar or vec4, small or large
// register tile): checked on shapes that cover each of those.
const ACCUMULATE_SHAPES = new Set(["7x33x65", "4x4x4", "257x129x33", "132x68x36"]);

for (const variant of VARIANTS) {
  Deno.test({
    name: `matmul ${variant}: three forms, odd and aligned shapes, overwrite and accumulate`,
    ...GPU_TEST,
    fn: async () => {
      let seed = 1;
      for (const [M, K, N] of SHAPES) {
        const accumulateToo = ACCUMULATE_SHAPES.has(`${M}x${K}x${N}`);
        for (const form of ["xWt", "dyW", "dyTx"] as Form[]) {
          await checkForm(form, M, K, N, variant, false, seed++);
          if (accumulateToo) await checkForm(form, M, K, N, variant, true, seed++);
        }
      }
    },
  });
}

for (const variant of VARIANTS) {
  Deno.test({
    name: `matmul ${variant}: 512x384x1408 (M x K x N), all three forms`,
    ...GPU_TEST,
    fn: async () => {
      // Forms take turns accumulating to keep the file fast.
      await checkForm("xWt", 512, 384, 1408, variant, false, 100);
      await checkForm("dyW", 512, 384, 1408, variant, variant === "auto", 101);
      await checkForm("dyTx", 512, 384, 1408, variant, variant !== "auto", 102);
    },
  });
}

Deno.test({
  name: "matmul fallbackSubgroup: a subgroup size other than the kernel's takes the plain path",
  ignore: !gpu.features.subgroups,
  ...GPU_TEST,
  fn: async () => {
    // Generated for 4 lanes, run where subgroups are wider (llvmpipe: 8) or, on
    // a 4-lane device, for 16: either way subgroup_size differs from the
    // workgroup, and the kernel must not use its broadcasts.
    const probe = await matmulXWt(gpu, {
      x: gpu.createBuffer(4),
      w: gpu.createBuffer(4),
      y: gpu.createBuffer(4),
      M: 1,
      K: 1,
      N: 1,
      options: { variant: "fallbackSubgroup" },
    });
    const lanes = probe.label.includes(" 4 lanes") ? 16 : 4;
    let seed = 200;
    for (const [M, K, N] of [[7, 33, 65], [70, 36, 20]] as [number, number, number][]) {
      for (const form of ["xWt", "dyW", "dyTx"] as Form[]) {
        await checkForm(form, M, K, N, "fallbackSubgroup", seed % 2 === 0, seed++, {
          subgroupLanes: lanes,
        });
      }
    }
  },
});

Deno.test({
  name: "matmul: scalar loads forced on aligned shapes (vec: 1)",
  ...GPU_TEST,
  fn: async () => {
    let seed = 300;
    for (const variant of ["auto", "tiled64"] as MatmulVariant[]) {
      for (const form of ["xWt", "dyW", "dyTx"] as Form[]) {
        await checkForm(form, 12, 20, 16, variant, false, seed++, { vec: 1 });
      }
    }
  },
});

Deno.test({
  name: "matmul: more output tiles than one grid dimension allows (65535) are all computed",
  ...GPU_TEST,
  fn: async () => {
    // x W^T with 64·65536 + 7 rows: 65537 tiles of 64 rows for tiled64, more for
    // the CPU designs; the 1-D count is split into a 2-D grid and the kernel
    // must rebuild the tile index. K = N = 1 keeps it cheap.
    const M = 64 * 65536 + 7;
    for (const variant of ["auto", "tiled64"] as MatmulVariant[]) {
      const rng = new Rng(7);
      const x = randomF32(rng, M);
      const w = new Float32Array([2]);
      const xBuf = gpu.createBuffer(x, "x");
      const wBuf = gpu.createBuffer(w, "w");
      const yBuf = gpu.createBuffer(M * 4, "y");
      try {
        const d = await matmulXWt(gpu, {
          x: xBuf,
          w: wBuf,
          y: yBuf,
          M,
          K: 1,
          N: 1,
          options: { variant },
        });
        assert(typeof d.workgroups === "number" && d.workgroups > 65535, "grid must need a split");
        await submitPassAndWait(gpu, d);
        const got = await gpu.readF32(yBuf, 0, M);
        // One product by 2 per output: exact in float32.
        const expected = ref.matmulXWt(Float64Array.from(x), Float64Array.from(w), M, 1, 1);
        assertClose(got, expected, { atol: 0, rtol: 0 }, `${variant} [${d.label}]`);
      } finally {
        xBuf.destroy();
        wBuf.destroy();
        yBuf.destroy();
      }
    }
  },
});

Deno.test({
  name: "matmul: the same inputs give bitwise the same outputs",
  ...GPU_TEST,
  fn: async () => {
    const rng = new Rng(3);
    const [M, K, N] = [70, 96, 50];
    const x = gpu.createBuffer(randomF32(rng, M * K), "x");
    const w = gpu.createBuffer(randomF32(rng, N * K), "w");
    const y = gpu.createBuffer(M * N * 4, "y");
    try {
      const d = await matmulXWt(gpu, { x, w, y, M, K, N });
      await submitPassAndWait(gpu, d);
      const first = await gpu.readF32(y);
      await submitPassAndWait(gpu, d);
      const second = await gpu.readF32(y);
      assert(first.every((v, i) => Object.is(v, second[i])), "outputs differ between runs");
      releaseDispatches([d]);
    } finally {
      x.destroy();
      w.destroy();
      y.destroy();
    }
  },
});

Deno.test("matmul tiled design: the tile is chosen from the grid and workgroup memory", () => {
  // 4096² gives 1024 tiles of 128x128: enough (>= 256 workgroups).
  assertEquals(chooseTiledTile(4096, 4096, 32768), [128, 128]);
  // 512 x 4096: 128 tiles of 128x128, 256 of 128x64 (and of 64x128: the
  // tie keeps 128x64).
  assertEquals(chooseTiledTile(512, 4096, 32768), [128, 64]);
  // 4096 x 520: 64x128 gives 64 x 5 = 320 tiles, 128x64 gives 32 x 9 = 288.
  assertEquals(chooseTiledTile(4096, 520, 32768), [64, 128]);
  // Too small for any large tile to fill the device: 64x64, split-K's case.
  assertEquals(chooseTiledTile(128, 512, 32768), [64, 64]);
  // WebGPU's default 16 KiB of workgroup memory holds only 64x64.
  assertEquals(chooseTiledTile(4096, 4096, 16384), [64, 64]);
  // 24 KiB holds the skinny tiles but not 128x128.
  assertEquals(chooseTiledTile(4096, 4096, 24576), [128, 64]);
});

const TILED: MatmulVariant[] = ["tiled64", "tiled128", "tiled128x64", "tiled64x128"];

Deno.test({
  name: "matmul tiled designs: interior and edge workgroups, a partial last reduction step",
  ...GPU_TEST,
  fn: async () => {
    // [150, 100, 200] puts, for every form and tile shape, whole tiles inside
    // the output (the unchecked fast path) beside tiles cut by its edges, and
    // reductions of 100, 150 or 200 (6, 9 or 12 whole steps of 16 and a
    // partial one): vec4 loads everywhere. [150, 99, 201]: scalar loads.
    let seed = 400;
    for (const variant of TILED) {
      for (const [M, K, N] of [[150, 100, 200], [150, 99, 201]]) {
        for (const form of ["xWt", "dyW", "dyTx"] as Form[]) {
          await checkForm(form, M, K, N, variant, seed % 2 === 0, seed++);
        }
      }
    }
  },
});

/** The variants split-K runs through: the CPU designs, the GPU tiled design (square and skinny). */
const SPLIT_VARIANTS: MatmulVariant[] = [
  "auto",
  "fallback",
  ...(gpu.features.subgroups ? ["fallbackSubgroup" as const] : []),
  "tiled64",
  "tiled128x64",
];

Deno.test({
  name: "matmul dY^T X split-K: forced slice counts, slices not dividing the reduction",
  ...GPU_TEST,
  fn: async () => {
    // M = 1000 in 3 slices: 336 + 336 + 328 (slices are a multiple of the
    // kernel's step: 4 on the CPU designs, 16 on the tiled one); M = 999 in 4:
    // 250 x 3 + 249 (scalar steps) or 256 x 3 + 231 (tiled). M = 40 asks for
    // 32 slices and gets as many as hold a step each. The partials are summed
    // in slice order, so the error is at most that of one sequential sum:
    // tolerance(M) holds.
    let seed = 500;
    const cases: [number, number, number, number][] = [
      [1000, 36, 20, 3],
      [999, 37, 21, 4],
      [1000, 68, 132, 7],
      [40, 8, 12, 32],
    ];
    for (const variant of SPLIT_VARIANTS) {
      for (const [M, K, N, splitK] of cases) {
        for (const accumulate of [false, true]) {
          const ds = await checkForm("dyTxSplit", M, K, N, variant, accumulate, seed++, {
            splitK,
          });
          assert(ds.length === 2, `${variant} M=${M} splitK=${splitK}: two dispatches`);
          const m = ds[0].label.match(/split-K (\d+) x (\d+)/);
          assert(m, `split-K in the label: ${ds[0].label}`);
          const [slices, sliceLen] = [Number(m[1]), Number(m[2])];
          assert(
            slices > 1 && slices <= splitK && (slices - 1) * sliceLen < M &&
              slices * sliceLen >= M,
            `slices cover the reduction once: ${ds[0].label}`,
          );
          const partials = ds[0].owned?.find((b) => b.size === slices * N * K * 4);
          assert(partials, `the first dispatch owns the [${slices}, N, K] partials`);
        }
      }
    }
  },
});

Deno.test({
  name: "matmul dY^T X split-K: chosen from the grid",
  ...GPU_TEST,
  fn: async () => {
    // The tiled (GPU) design splits a one-tile grid (N = 16, K = 40) with a
    // reduction of 3000 rows to approach its target workgroup count...
    const split = await checkForm("dyTxSplit", 3000, 40, 16, "tiled64", true, 600);
    assert(split.length === 2, `a one-tile grid is split: ${split.map((d) => d.label)}`);
    // ...but not a reduction of 64 rows, shorter than two minimum slices.
    const short = await checkForm("dyTxSplit", 64, 40, 16, "tiled64", false, 601);
    assert(short.length === 1, `a short reduction is not split: ${short[0].label}`);
    // The CPU designs never split unless asked (it measured no faster there).
    const cpu = await checkForm("dyTxSplit", 3000, 40, 16, "fallback", false, 602);
    assert(cpu.length === 1, `the CPU designs do not split by themselves: ${cpu[0].label}`);
    const auto = await checkForm("dyTxSplit", 3000, 40, 16, "auto", false, 603);
    const cpuAdapter = gpu.adapterSummary.isFallback;
    assert(auto.length === (cpuAdapter ? 1 : 2), `auto on this adapter: ${auto[0].label}`);
    // matmulDyTX never splits, even when asked.
    const plain = await checkForm("dyTx", 3000, 40, 16, "tiled64", false, 604, { splitK: 4 });
    assert(!plain[0].label.includes("split-K"), `matmulDyTX never splits: ${plain[0].label}`);
  },
});

Deno.test({
  name: "matmul dY^T X split-K: a bad slice count is a RangeError",
  ...GPU_TEST,
  fn: async () => {
    const b = gpu.createBuffer(64 * 4);
    try {
      for (const splitK of [0, 1.5]) {
        let threw = false;
        try {
          await matmulDyTXSplitK(gpu, {
            dy: b,
            x: b,
            dw: b,
            M: 4,
            N: 4,
            K: 4,
            options: { splitK },
          });
        } catch (e) {
          threw = e instanceof RangeError && /splitK/.test(e.message);
        }
        assert(threw, `splitK ${splitK} must be rejected`);
      }
    } finally {
      b.destroy();
    }
  },
});

Deno.test({
  name: "matmul dY^T X split-K: the same inputs give bitwise the same outputs",
  ...GPU_TEST,
  fn: async () => {
    const rng = new Rng(4);
    const [M, K, N] = [1000, 36, 20];
    const dy = gpu.createBuffer(randomF32(rng, M * N), "dy");
    const x = gpu.createBuffer(randomF32(rng, M * K), "x");
    const dw = gpu.createBuffer(N * K * 4, "dw");
    const runs: Dispatch[][] = [];
    try {
      const read = async (ds: Dispatch[]) => {
        await submitPassAndWait(gpu, ds);
        return await gpu.readF32(dw);
      };
      for (const variant of SPLIT_VARIANTS) {
        const args = { dy, x, dw, M, N, K, options: { variant, splitK: 5 } };
        // The same dispatches twice, and a second, independently prepared set.
        runs.push(await matmulDyTXSplitK(gpu, args), await matmulDyTXSplitK(gpu, args));
        const [first, second] = runs.slice(-2);
        assert(first.length === 2, `${variant}: split`);
        const a = await read(first);
        const b = await read(first);
        const c = await read(second);
        assert(a.every((v, i) => Object.is(v, b[i])), `${variant}: outputs differ between runs`);
        assert(
          a.every((v, i) => Object.is(v, c[i])),
          `${variant}: outputs differ between preparations`,
        );
      }
    } finally {
      for (const ds of runs) for (const d of ds) for (const b of d.owned ?? []) b.destroy();
      dy.destroy();
      x.destroy();
      dw.destroy();
    }
  },
});

/** The CPU-driver designs, whose operands can come from textures. */
const CPU_VARIANTS: MatmulVariant[] = [
  "fallback",
  ...(gpu.features.subgroups ? ["fallbackSubgroup" as const] : []),
];

Deno.test({
  name: "matmul CPU designs: operands from textures, three forms, overwrite, accumulate, split-K",
  ...GPU_TEST,
  fn: async () => {
    // Textures need vec4 loads of both operands, so every contiguous
    // dimension is a multiple of 4 here; the output dimensions are not tile
    // multiples. 132 x 68: 2244 texels, one full texture row of 2048 and a
    // partial one (two copies); 128 x 64: exactly one row; 512 x 384 x 1408
    // takes the large register tiles (for the design auto takes here: their
    // pipelines take seconds each to compile).
    const shapes: [number, number, number][] = [
      [4, 4, 4],
      [132, 68, 36],
      [100, 36, 76],
      [128, 64, 128],
    ];
    let seed = 700;
    for (const variant of CPU_VARIANTS) {
      const large = variant === CPU_VARIANTS.at(-1) ? [[512, 384, 1408]] : [];
      for (const [M, K, N] of [...shapes, ...large] as [number, number, number][]) {
        for (const form of ["xWt", "dyW", "dyTx"] as Form[]) {
          const ds = await checkForm(form, M, K, N, variant, seed % 3 === 0, seed++, {
            reads: "textures",
          });
          assert(ds[0].label.includes("operands from textures"), ds[0].label);
          assert(ds[0].copies?.length === 2, `two operand copies: ${ds[0].label}`);
        }
      }
      for (const accumulate of [false, true]) {
        await checkForm("dyTxSplit", 1000, 36, 20, variant, accumulate, seed++, {
          reads: "textures",
          splitK: 3,
        });
      }
    }
    if (gpu.features.subgroups) {
      // The plain path taken when the subgroup size is not the kernel's.
      for (const form of ["xWt", "dyW", "dyTx"] as Form[]) {
        await checkForm(form, 132, 68, 36, "fallbackSubgroup", false, seed++, {
          reads: "textures",
          subgroupLanes: 4,
        });
      }
    }
  },
});

Deno.test({
  name: "matmul: which operands come from textures, and forced textures where they cannot be",
  ...GPU_TEST,
  fn: async () => {
    const cpu = gpu.adapterSummary.isFallback;
    // Auto on a CPU adapter: every form from textures beyond the small
    // problems, small problems and unaligned operands from the buffers; on a
    // GPU, never.
    for (const form of ["xWt", "dyW", "dyTx"] as Form[]) {
      const [d] = await checkForm(form, 96, 128, 100, "auto", false, 800);
      assertEquals(d.label.includes("operands from textures"), cpu, d.label);
      const [odd] = await checkForm(form, 96, 130, 102, "auto", false, 803);
      assert(!odd.copies, `unaligned operands read the buffers: ${odd.label}`);
    }
    const [small] = await checkForm("xWt", 8, 8, 8, "auto", false, 801);
    assert(!small.copies, `a small problem reads the buffers: ${small.label}`);
    // Storage forced.
    const [plain] = await checkForm("xWt", 96, 128, 100, "auto", false, 802, {
      reads: "storage",
    });
    assert(!plain.copies, plain.label);

    const b = gpu.createBuffer(64 * 64 * 4);
    // A buffer that cannot be copied from: auto reads it, forced textures throw.
    const noCopy = gpu.device.createBuffer({ size: 64 * 64 * 4, usage: GPUBufferUsage.STORAGE });
    try {
      const args = { x: noCopy, w: b, y: b, M: 64, K: 64, N: 64 };
      const d = await matmulXWt(gpu, { ...args, options: { variant: "fallback" } });
      assert(!d.copies, `no COPY_SRC: the buffers are read (${d.label})`);
      await assertRejects(
        () => matmulXWt(gpu, { ...args, options: { variant: "fallback", reads: "textures" } }),
        Error,
        "cannot be copied from",
      );
      await assertRejects(
        () =>
          matmulXWt(gpu, {
            x: b,
            w: b,
            y: b,
            M: 8,
            K: 6,
            N: 8,
            options: { variant: "fallback", reads: "textures" },
          }),
        Error,
        "multiples of 4",
      );
      await assertRejects(
        () => matmulXWt(gpu, { ...args, x: b, options: { variant: "tiled64", reads: "textures" } }),
        Error,
        "CPU-driver designs",
      );
      releaseDispatches([d]);
    } finally {
      b.destroy();
      noCopy.destroy();
    }
  },
});

Deno.test({
  name: "matmul: calls sharing an operand texture, recorded together, each read their own operands",
  ...GPU_TEST,
  fn: async () => {
    // Two X W^T of one shape (so one texture per operand slot) and a dY W
    // whose A operand has the same texture height, in one recording: each
    // must see its own operands, copied in right before it.
    const rng = new Rng(9);
    const [M, K, N] = [40, 64, 24];
    const hosts = [0, 1].map(() => ({ x: randomF32(rng, M * K), w: randomF32(rng, N * K) }));
    const dyHost = randomF32(rng, M * N);
    const bufs = hosts.map((h) => ({
      x: gpu.createBuffer(h.x),
      w: gpu.createBuffer(h.w),
      y: gpu.createBuffer(M * N * 4),
    }));
    const dy = gpu.createBuffer(dyHost);
    const dx = gpu.createBuffer(M * K * 4);
    const ds: Dispatch[] = [];
    try {
      const options: MatmulOptions = { variant: CPU_VARIANTS.at(-1), reads: "textures" };
      for (const b of bufs) ds.push(await matmulXWt(gpu, { ...b, M, K, N, options }));
      ds.push(await matmulDyW(gpu, { dy, w: bufs[0].w, dx, M, N, K, options }));
      assert(
        ds[0].copies![0].texture === ds[1].copies![0].texture,
        "one texture per slot and shape",
      );
      await submitPassAndWait(gpu, ds);
      for (let i = 0; i < 2; i++) {
        const expected = ref.matmulXWt(
          Float64Array.from(hosts[i].x),
          Float64Array.from(hosts[i].w),
          M,
          K,
          N,
        );
        assertClose(await gpu.readF32(bufs[i].y), expected, tolerance(K), `call ${i}`);
      }
      const expectedDx = ref.matmulDyW(
        Float64Array.from(dyHost),
        Float64Array.from(hosts[0].w),
        M,
        N,
        K,
      );
      assertClose(await gpu.readF32(dx), expectedDx, tolerance(N), "dY W");
      // The shared textures belong to no call: two textures (slots A and B)
      // of one row each, leased six times, counted once by the device's pool.
      const leases = ds.flatMap((d) => d.owned ?? []).filter((o) => !(o instanceof GPUBuffer));
      assertEquals(leases.length, 6);
      assertEquals(leases.reduce((sum, o) => sum + o.size, 0), 0);
      const pooled = inputTextureBytes(gpu);
      assert(pooled >= 2 * OPERAND_TEXTURE_WIDTH * 16, `the pool holds them: ${pooled}`);
      releaseDispatches(ds);
      assertEquals(inputTextureBytes(gpu), pooled - 2 * OPERAND_TEXTURE_WIDTH * 16, "released");
    } finally {
      releaseDispatches(ds);
      for (const b of bufs) for (const buf of Object.values(b)) buf.destroy();
      dy.destroy();
      dx.destroy();
    }
  },
});

Deno.test({
  name: "matmul dY W and dY^T X with padded dy rows (dyStride), every design, textures too",
  ...GPU_TEST,
  fn: async () => {
    // dy [M, N] stored in rows of `stride` with zeros after N: an odd N (the
    // logits of an odd vocabulary) padded to a multiple of 4 keeps vec4
    // loads, steps of 4 over a reduction that is not a multiple of 4 (dY W),
    // and operand textures.
    const cases: [number, number, number, number][] = [
      [40, 30, 21, 32], // M, N, K, stride: odd N, odd K
      [96, 130, 36, 132], // N % 4 == 2
      [512, 1558, 128, 1560], // the tiny model's logits chunk, smaller
    ];
    let seed = 900;
    const variants: [MatmulVariant, MatmulOptions][] = [
      ["auto", {}],
      ...CPU_VARIANTS.map((v): [MatmulVariant, MatmulOptions] => [v, { reads: "storage" }]),
      ...CPU_VARIANTS.map((v): [MatmulVariant, MatmulOptions] => [v, { reads: "textures" }]),
      ["tiled64", {}],
    ];
    for (const [M, N, K, stride] of cases) {
      const rng = new Rng(seed++);
      const dy = randomF32(rng, M * N);
      const padded = new Float32Array(M * stride);
      for (let m = 0; m < M; m++) padded.set(dy.subarray(m * N, (m + 1) * N), m * stride);
      const w = randomF32(rng, N * K);
      const x = randomF32(rng, M * K);
      const dy64 = Float64Array.from(dy);
      const expectedDx = ref.matmulDyW(dy64, Float64Array.from(w), M, N, K);
      const expectedDw = ref.matmulDyTX(dy64, Float64Array.from(x), M, N, K);
      const bufs = {
        dy: gpu.createBuffer(padded),
        w: gpu.createBuffer(w),
        x: gpu.createBuffer(x),
        dx: gpu.createBuffer(M * K * 4),
        dw: gpu.createBuffer(N * K * 4),
      };
      try {
        for (const [variant, extra] of variants) {
          if (extra.reads === "textures" && K % 4 !== 0) continue; // textures need K % 4 == 0
          const options = { variant, ...extra };
          const ds = [
            await matmulDyW(gpu, { ...bufs, M, N, K, dyStride: stride, options }),
            ...await matmulDyTXSplitK(gpu, { ...bufs, M, N, K, dyStride: stride, options }),
          ];
          await submitPassAndWait(gpu, ds);
          const what = `M=${M} N=${N} K=${K} stride ${stride} ${variant} ${extra.reads ?? ""}`;
          assertClose(
            await gpu.readF32(bufs.dx, 0, M * K),
            expectedDx,
            tolerance(N),
            `dY W ${what} [${ds[0].label}]`,
          );
          assertClose(
            await gpu.readF32(bufs.dw, 0, N * K),
            expectedDw,
            tolerance(M),
            `dY^T X ${what} [${ds[1].label}]`,
          );
          if (extra.reads === "textures") {
            assert(ds.every((d) => d.copies || d.label.includes("reduce")), "textures used");
          }
          releaseDispatches(ds);
        }
      } finally {
        for (const b of Object.values(bufs)) b.destroy();
      }
    }
    // A stride below the row is refused.
    const b = gpu.createBuffer(64);
    try {
      await assertRejects(
        () => matmulDyW(gpu, { dy: b, w: b, dx: b, M: 2, N: 4, K: 2, dyStride: 3 }),
        RangeError,
        "dyStride must be an integer of at least 4",
      );
    } finally {
      b.destroy();
    }
  },
});
