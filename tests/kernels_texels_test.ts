/**
 * Inputs read through textures (kernels/texels.ts): the WGSL rewrite, the
 * choice `auto` makes, the refusals of a forced `textures`, and for every
 * kernel that takes the path, its outputs with inputs from textures against
 * the same kernel reading storage buffers, bit for bit, on shapes that are
 * not multiples of any tile or of the texture's row (the texture form only
 * changes where a value is fetched from, never the arithmetic, so equality is
 * exact; the storage form is checked against the float64 reference in each
 * kernel's own test file). Input buffers are sized to whole texels (16 bytes)
 * so that odd lengths can be forced through textures too.
 */
import {
  assert,
  assertEquals,
  assertRejects,
  assertStringIncludes,
  assertThrows,
} from "./assert.ts";
import { GPU_TEST, gpuTest, randomF32, submitPass } from "./helpers.ts";
import {
  type Binding,
  type Dispatch,
  Gpu,
  ownedBytes,
  PassRecorder,
  releaseDispatches,
} from "../kernels/runtime.ts";
import {
  inputTextureBytes,
  kernelDispatch,
  type ReadPath,
  TEXEL_READ_MIN,
  TEXEL_ROW,
  texelReads,
} from "../kernels/texels.ts";
import { swigluBackward, swigluForward } from "../kernels/swiglu.ts";
import { addRmsnormForward, rmsnormBackward, rmsnormForward } from "../kernels/rmsnorm.ts";
import { mergeQkv, splitQkv } from "../kernels/qkv.ts";
import { crossEntropy } from "../kernels/cross_entropy.ts";
import { adamw, adamwHyper } from "../kernels/adamw.ts";
import { gradNormPartialsSize, gradNormSquared } from "../kernels/grad_norm.ts";
import {
  attentionBackward,
  type AttentionDesign,
  attentionForward,
} from "../kernels/attention/mod.ts";
import { Rng } from "../util/random.ts";

const gpu = await Gpu.request();

Deno.test("texelReads: declarations become textures and reads become fetches", () => {
  const wgsl = `alias T = vec4<f32>;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read> s: array<f32>;
@group(0) @binding(3) var<storage, read> t2: array<vec2f>;
@group(0) @binding(4) var<storage, read_write> y: array<T>; // y = x, with s and t2
fn f(i: u32) -> T { return x[i + u32(s[u32(x[i].x)])] + vec4f(t2[i], sx[0], 0.0); }`;
  // "sx" is another identifier; s's read nests a read of x.
  const out = texelReads(wgsl.replace("sx[0]", "y[0].x"), ["t2", "s", "x"]);
  assertStringIncludes(out, "@group(0) @binding(1) var x_tex: texture_2d<f32>;");
  assertStringIncludes(out, "@group(0) @binding(2) var s_tex: texture_2d<f32>;");
  assertStringIncludes(out, "@group(0) @binding(3) var t2_tex: texture_2d<f32>;");
  assertStringIncludes(out, "fn x_at(_t: u32) -> vec4f");
  assertStringIncludes(out, "fn s_at(_e: u32) -> f32");
  assertStringIncludes(out, "fn t2_at(_e: u32) -> vec2f");
  assertStringIncludes(out, `_t & ${TEXEL_ROW - 1}u`);
  assertStringIncludes(out, "x_at(i + u32(s_at(u32(x_at(i).x))))");
  assertStringIncludes(out, "t2_at(i)");
  assertStringIncludes(out, "var<storage, read_write> y: array<T>;");
  assertStringIncludes(out, "y[0].x");
  assert(!/\bx\[|\bs\[/.test(out), "every read of x and s rewritten");
});

Deno.test("texelReads: refuses what it cannot rewrite", () => {
  const decl = "@group(0) @binding(0) var<storage, read> a: array<f32>;\n";
  assertThrows(
    () => texelReads("@group(0) @binding(0) var<storage, read_write> a: array<f32>;", ["a"]),
    Error,
    "not a read-only storage array",
  );
  assertThrows(
    () => texelReads("@group(0) @binding(0) var<storage, read> a: array<u32>;", ["a"]),
    Error,
    "holds u32",
  );
  assertThrows(
    () => texelReads(`${decl}fn f() -> u32 { return arrayLength(&a); }`, ["a"]),
    Error,
    "other than by indexing",
  );
  assertThrows(() => texelReads(`${decl}fn a_at() {}`, ["a"]), Error, "a_at exists");
  assertThrows(
    () => texelReads(`${decl}fn f() -> f32 { return a[0; }`, ["a"]),
    Error,
    "unbalanced",
  );
});

/** A storage buffer holding `data`, sized to whole texels (16 bytes). */
function texelBuffer(data: Float32Array | number, label: string): GPUBuffer {
  const n = typeof data === "number" ? data : data.length;
  const padded = new Float32Array(Math.ceil(n / 4) * 4);
  if (typeof data !== "number") padded.set(data);
  return gpu.createBuffer(padded, label);
}

const copyKernel = (vec: boolean) => `
@group(0) @binding(0) var<storage, read> x: array<${vec ? "vec4f" : "f32"}>;
@group(0) @binding(1) var<storage, read_write> y: array<${vec ? "vec4f" : "f32"}>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3u) {
  if (g.x < arrayLength(&y)) { y[g.x] = x[g.x]; }
}`;

gpuTest(
  "kernelDispatch: auto, storage and forced textures; refusals; shared textures",
  async () => {
    const n = TEXEL_READ_MIN * 4 + 2 * TEXEL_ROW * 4 + 12; // past two texture rows, odd tail
    const x = randomF32(new Rng(4), n);
    const xb = texelBuffer(x, "x");
    const run = async (
      reads: ReadPath,
      vec: boolean,
      count = n,
    ): Promise<[Dispatch, Float32Array]> => {
      const yb = gpu.createBuffer(count * 4, "y");
      const d = await kernelDispatch(gpu, {
        label: "copy",
        key: `texels test copy vec=${vec}`,
        wgsl: copyKernel(vec),
        bindings: [xb, yb],
        workgroups: Math.ceil(count / (vec ? 4 : 1) / 64),
        textureReads: { x: count },
        reads,
      });
      submitPass(gpu, d);
      const y = await gpu.readF32(yb);
      yb.destroy();
      return [d, y];
    };
    for (const vec of [false, true]) {
      const [stored, y0] = await run("storage", vec);
      assertEquals(stored.copies, undefined, "storage: no copies");
      assertEquals(y0, x.subarray(0, n));
      const [forced, y1] = await run("textures", vec);
      assertEquals(forced.copies?.length, 1, "textures: one copy");
      assertEquals(y1, x.subarray(0, n), `vec=${vec}: every element through the texture`);
      const [auto] = await run("auto", vec);
      assertEquals(auto.copies?.length ?? 0, gpu.adapterSummary.isFallback ? 1 : 0, "auto");
      // Below the minimum, auto keeps the buffer.
      const [small] = await run("auto", vec, 64);
      assertEquals(small.copies, undefined, "auto: a small read stays in storage");
      // Dispatches reading the same height at the same position share one
      // texture, owned by none of them: the device's pool counts it once,
      // until the last lease on it is released.
      const height = Math.ceil(n / 4 / TEXEL_ROW);
      const before = inputTextureBytes(gpu);
      assertEquals(ownedBytes([forced, auto]), 0, "leases own no bytes");
      assert(before >= TEXEL_ROW * height * 16, "the pool counts the texture");
      releaseDispatches([forced]);
      if (gpu.adapterSummary.isFallback) {
        assertEquals(inputTextureBytes(gpu), before, "auto still holds it");
      }
      releaseDispatches([stored, auto, small]);
      assertEquals(
        inputTextureBytes(gpu),
        before - TEXEL_ROW * height * 16,
        "released with the last",
      );
    }
    // Forced textures where they cannot go: a range that does not start on a texel,
    // a buffer without COPY_SRC.
    const yb = gpu.createBuffer(64, "y");
    const noCopy = gpu.device.createBuffer({ size: 64, usage: GPUBufferUsage.STORAGE });
    const refused: [Binding, string][] = [
      [{ buffer: xb, offset: 4, size: 64 }, "not a multiple of 16"],
      [noCopy, "cannot be copied from"],
    ];
    for (const [x, why] of refused) {
      await assertRejects(
        () =>
          kernelDispatch(gpu, {
            label: "copy",
            key: "texels test copy vec=false",
            wgsl: copyKernel(false),
            bindings: [x, yb],
            workgroups: 1,
            textureReads: { x: 16 },
            reads: "textures",
          }),
        Error,
        why,
      );
    }
    for (const b of [xb, yb, noCopy]) b.destroy();
  },
);

gpuTest(
  "PassRecorder leaves out a copy whose texture holds the range, until its buffer is written",
  async () => {
    const n = 3000;
    const x0 = randomF32(new Rng(5), n);
    const xb = texelBuffer(x0, "x");
    const ys = [0, 1, 2, 3].map((i) => gpu.createBuffer(n * 4, `y${i}`));
    const copy = (y: GPUBuffer) =>
      kernelDispatch(gpu, {
        label: "copy",
        key: "texels test copy vec=false",
        wgsl: copyKernel(false),
        bindings: [xb, y],
        workgroups: Math.ceil(n / 64),
        textureReads: { x: n },
        reads: "textures",
      });
    // x += 1 in place: a dispatch that says it writes x (kernelDispatch reads its
    // read_write bindings from the WGSL).
    const bump = await kernelDispatch(gpu, {
      label: "bump",
      key: "texels test bump",
      wgsl: `@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3u) {
  if (g.x < ${n}u) { x[g.x] = x[g.x] + 1.0; }
}`,
      bindings: [xb],
      workgroups: Math.ceil(n / 64),
      textureReads: {},
    });
    assertEquals(bump.writes, [xb], "its writes");
    const [c0, c1, c2, c3] = await Promise.all(ys.map(copy));
    const unknown = { ...c2, writes: undefined }; // writes not stated: anything
    let recorder: PassRecorder | undefined;
    gpu.submit((enc) => {
      recorder = new PassRecorder(gpu, enc);
      // c0 copies x in; c1 finds it there; bump writes x, so c2 copies again;
      // `unknown` (c2 again) finds it there, but does not say what it writes,
      // so c3 copies again.
      recorder.record([c0, c1, bump, c2, unknown, c3]);
      recorder.end();
    });
    assertEquals([recorder!.copiesRecorded, recorder!.copiesSkipped], [3, 2]);
    const plus1 = x0.map((v) => v + 1);
    assertEquals(await gpu.readF32(ys[0]), x0, "y0");
    assertEquals(await gpu.readF32(ys[1]), x0, "y1 from the texture c0 filled");
    assertEquals(await gpu.readF32(ys[2]), plus1, "y2 after the bump");
    assertEquals(await gpu.readF32(ys[3]), plus1, "y3 after the bump");
    releaseDispatches([c0, c1, c2, c3, bump]);
    for (const b of [xb, ...ys]) b.destroy();
  },
);

/**
 * Runs `build` once reading storage and once reading textures, on fresh
 * buffers from the same data each time, and asserts that every output is
 * bitwise the same; also that the textures run did copy its inputs.
 */
async function sameBothWays(
  what: string,
  build: (reads: ReadPath) => Promise<{ dispatches: Dispatch[]; outputs: GPUBuffer[] }>,
): Promise<void> {
  const results: Float32Array[][] = [];
  for (const reads of ["storage", "textures"] as const) {
    const { dispatches, outputs } = await build(reads);
    const copies = dispatches.reduce((n, d) => n + (d.copies?.length ?? 0), 0);
    assertEquals(copies > 0, reads === "textures", `${what} ${reads}: copies`);
    submitPass(gpu, dispatches);
    results.push(await Promise.all(outputs.map((b) => gpu.readF32(b))));
    releaseDispatches(dispatches);
    for (const b of outputs) b.destroy();
  }
  results[0].forEach((a, i) => assertEquals(results[1][i], a, `${what}: output ${i}`));
}

gpuTest("swiglu reads textures: the same bits as storage", async () => {
  for (const [N, I] of [[3, 910], [37, 96], [5, 2051]]) {
    const rng = new Rng(N * I);
    const gu = randomF32(rng, 2 * N * I, 3);
    const dh = randomF32(rng, N * I);
    await sameBothWays(`swiglu N=${N} I=${I}`, async (reads) => {
      const gateUp = texelBuffer(gu, "gate|up");
      const dhB = texelBuffer(dh, "dh");
      const h = gpu.createBuffer(N * I * 4, "h");
      const dGateUp = gpu.createBuffer(2 * N * I * 4, "d gate|up");
      const options = { reads };
      return {
        dispatches: [
          await swigluForward(gpu, { gateUp, h, N, I, options }),
          await swigluBackward(gpu, { dh: dhB, gateUp, dGateUp, N, I, options }),
        ],
        outputs: [h, dGateUp, gateUp, dhB],
      };
    });
  }
});

gpuTest("rmsnorm reads textures: forward, fused add and backward give the same bits", async () => {
  for (const [N, H] of [[33, 128], [7, 130], [65, 36]]) {
    const rng = new Rng(N + H);
    const x = randomF32(rng, N * H, 2);
    const w = randomF32(rng, H, 1, 1);
    const delta = randomF32(rng, N * H);
    const dy = randomF32(rng, N * H);
    const dx0 = randomF32(rng, N * H);
    await sameBothWays(`rmsnorm N=${N} H=${H}`, async (reads) => {
      const options = { reads };
      const xb = texelBuffer(x, "x");
      const x2 = texelBuffer(x, "x (fused add)");
      const wb = texelBuffer(w, "w");
      const db = texelBuffer(delta, "delta");
      const dyb = texelBuffer(dy, "dy");
      const y = gpu.createBuffer(N * H * 4, "y");
      const y2 = gpu.createBuffer(N * H * 4, "y (fused add)");
      const rstd = texelBuffer(N, "rstd");
      const rstd2 = gpu.createBuffer(N * 4, "rstd (fused add)");
      const dx = gpu.createBuffer(dx0, "dx (accumulated into)");
      const dw = gpu.createBuffer(w, "dw (accumulated into)");
      const args = { w: wb, N, H, eps: 1e-5, options };
      return {
        dispatches: [
          await rmsnormForward(gpu, { ...args, x: xb, y, rstd }),
          await addRmsnormForward(gpu, { ...args, x: x2, delta: db, y: y2, rstd: rstd2 }),
          ...await rmsnormBackward(gpu, {
            dy: dyb,
            x: xb,
            w: wb,
            rstd,
            dx,
            dw,
            N,
            H,
            accumulateDx: true,
            options,
          }),
        ],
        outputs: [y, rstd, x2, y2, rstd2, dx, dw, xb, wb, db, dyb],
      };
    });
  }
});

gpuTest("q|k|v split and merge read textures: the same bits, with and without RoPE", async () => {
  const B = 3, T = 11, nH = 4, nKV = 2;
  const N = B * T;
  const turn = { T, theta: 1e4 };
  // hd 18: scalar lanes (hd/2 odd); 16: vec4 lanes.
  for (const [hd, rope] of [[18, undefined], [18, turn], [16, turn]] as const) {
    const rng = new Rng(7 + hd);
    const qkv = randomF32(rng, N * (nH + 2 * nKV) * hd);
    const dq = randomF32(rng, N * nH * hd);
    const dk = randomF32(rng, N * nKV * hd);
    const dv = randomF32(rng, N * nKV * hd);
    await sameBothWays(`qkv hd=${hd} rope=${!!rope}`, async (reads) => {
      const shape = { N, nH, nKV, hd, rope, reads };
      const qkvB = texelBuffer(qkv, "qkv");
      const [q, k, v] = [nH, nKV, nKV].map((h) => gpu.createBuffer(N * h * hd * 4, "q/k/v"));
      const [dqB, dkB, dvB] = [dq, dk, dv].map((a) => texelBuffer(a, "dq/dk/dv"));
      const dqkv = gpu.createBuffer(qkv.length * 4, "d qkv");
      return {
        dispatches: [
          await splitQkv(gpu, { ...shape, qkv: qkvB, q, k, v }),
          await mergeQkv(gpu, { ...shape, dqkv, dq: dqB, dk: dkB, dv: dvB }),
        ],
        outputs: [q, k, v, dqkv, qkvB, dqB, dkB, dvB],
      };
    });
  }
});

gpuTest(
  "cross-entropy reads textures: the same bits, scalar and vec4 lanes, padded rows",
  async () => {
    for (const [N, V, stride] of [[9, 1558, 1560], [5, 2055, 2055], [6, 400, 400]]) {
      const rng = new Rng(N * V);
      const logits = randomF32(rng, N * V, 2);
      const targets = new Uint32Array(N).map(() => rng.nextInt(V));
      const mask = new Float32Array(N).map((_, i) => (i % 3 === 1 ? 0 : 0.5 + i / N));
      await sameBothWays(`cross-entropy N=${N} V=${V}`, async (reads) => {
        const lg = texelBuffer(logits, "logits");
        const dlogits = gpu.createBuffer(N * stride * 4, "d logits");
        const rowLoss = gpu.createBuffer(N * 4, "row loss");
        const loss = gpu.createBuffer(4, "loss");
        return {
          dispatches: await crossEntropy(gpu, {
            logits: lg,
            targets: gpu.createBuffer(targets, "targets"),
            mask: texelBuffer(mask, "mask"),
            scale: gpu.createBuffer(new Float32Array([1 / N]), "scale"),
            dlogits,
            dlogitsStride: stride,
            rowLoss,
            loss,
            N,
            V,
            options: { reads },
          }),
          outputs: [dlogits, rowLoss, loss, lg],
        };
      });
    }
  },
);

gpuTest("attention reads textures: the same bits, both designs, forward and backward", async () => {
  const cases: {
    B: number;
    T: number;
    nH: number;
    nKV: number;
    hd: number;
    design: AttentionDesign;
  }[] = [
    { B: 2, T: 33, nH: 4, nKV: 2, hd: 32, design: "rows" },
    { B: 1, T: 70, nH: 2, nKV: 1, hd: 64, design: "rows" },
    { B: 2, T: 19, nH: 2, nKV: 2, hd: 18, design: "tiled" },
    // B T nH = 7 rows: the internal D buffer must still fill whole texels.
    { B: 1, T: 7, nH: 1, nKV: 1, hd: 32, design: "rows" },
  ];
  for (const c of cases) {
    const { B, T, nH, nKV, hd } = c;
    const rng = new Rng(T * hd);
    const [q, k, v, dOut] = [nH, nKV, nKV, nH].map((h) => randomF32(rng, B * T * h * hd));
    await sameBothWays(`attention ${JSON.stringify(c)}`, async (reads) => {
      const [qb, kb, vb, dOb] = [q, k, v, dOut].map((a) => texelBuffer(a, "q/k/v/dOut"));
      const out = texelBuffer(q.length, "out");
      const lse = texelBuffer(B * nH * T, "lse");
      const [dq, dk, dv] = [q, k, v].map((a) => gpu.createBuffer(a.length * 4, "dq/dk/dv"));
      const shape = { ...c, reads };
      return {
        dispatches: [
          await attentionForward(gpu, { ...shape, q: qb, k: kb, v: vb, out, lse }),
          ...await attentionBackward(gpu, {
            ...shape,
            q: qb,
            k: kb,
            v: vb,
            out,
            lse,
            dOut: dOb,
            dq,
            dk,
            dv,
          }),
        ],
        outputs: [out, lse, dq, dk, dv, qb, kb, vb, dOb],
      };
    });
  }
});

gpuTest("adamw reads grad and its settings from textures: the same bits", async () => {
  for (const [n, decay] of [[4099, true], [33 * 130, false]] as const) {
    const rng = new Rng(n);
    const [p, g, m, v] = [1, 1, 0.1, 0.01].map((scale) => randomF32(rng, n, scale));
    for (let i = 0; i < n; i++) v[i] = Math.abs(v[i]);
    const hyper = adamwHyper({
      lr: 1e-3,
      beta1: 0.9,
      beta2: 0.95,
      eps: 1e-8,
      weightDecay: 0.1,
      step: 3,
    });
    await sameBothWays(`adamw n=${n}`, async (reads) => {
      const [pb, mb, vb] = [p, m, v].map((a) => gpu.createBuffer(a, "param/m/v"));
      const gb = texelBuffer(g, "grad");
      return {
        dispatches: [
          await adamw(gpu, {
            param: pb,
            grad: gb,
            m: mb,
            v: vb,
            n,
            decay,
            hyper: gpu.createBuffer(hyper, "hyper"),
            gradScale: texelBuffer(new Float32Array([0.75]), "grad scale"),
            options: { reads },
          }),
        ],
        outputs: [pb, mb, vb, gb],
      };
    });
  }
});

gpuTest("grad norm reads the gradients from textures: the same bits", async () => {
  const sizes = [4100 * 4, 776, 20001]; // tensors start 32-byte aligned, as bindings must
  const g = randomF32(new Rng(11), sizes.reduce((a, b) => a + b, 0));
  await sameBothWays("grad norm", async (reads) => {
    const buffer = texelBuffer(g, "grads");
    let offset = 0;
    const tensors = sizes.map((n) => {
      const t = { buffer, offset, n };
      offset += n;
      return t;
    });
    const partials = gpu.createBuffer(gradNormPartialsSize(tensors) * 4, "partials");
    const total = gpu.createBuffer(4, "total");
    return {
      dispatches: await gradNormSquared(gpu, { tensors, partials, total, reads }),
      outputs: [total, partials, buffer],
    };
  });
});

Deno.test({
  name: "texels: destroy the shared device",
  ...GPU_TEST,
  fn: () => gpu.destroy(),
});
