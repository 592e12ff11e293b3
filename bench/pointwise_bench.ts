/**
 * Bandwidth of the memory-bound kernels (embedding, RMSNorm, SwiGLU,
 * cross-entropy, gradient norm, AdamW) at the presets' shapes. The byte count
 * of a row is what must cross memory at least once per call (each input read
 * once, each output written once; cross-entropy's second read of a row and
 * the tiny reduction partials are not credited), so GB/s compares directly
 * with the adapter's memory bandwidth.
 *
 * Run alone: `deno run -A bench/pointwise_bench.ts [--quick]`.
 */
import { type BenchRow, rates, timeGpu } from "./harness.ts";
import { type Dispatch, Gpu } from "../kernels/runtime.ts";
import { embeddingBackward, embeddingForward, groupByToken } from "../kernels/embedding.ts";
import { addRmsnormForward, rmsnormBackward, rmsnormForward } from "../kernels/rmsnorm.ts";
import { swigluBackward, swigluForward } from "../kernels/swiglu.ts";
import { crossEntropy } from "../kernels/cross_entropy.ts";
import { gradNormPartialsSize, gradNormSquared } from "../kernels/grad_norm.ts";
import { adamw, adamwHyper } from "../kernels/adamw.ts";
import { presetConfig } from "../model/config.ts";
import { parameterSpecs } from "../model/params.ts";
import { Rng } from "../util/random.ts";

interface Shape {
  preset: string;
  B: number;
  T: number;
}

function randomBuffer(gpu: Gpu, rng: Rng, n: number, label: string, scale = 1): GPUBuffer {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = scale * rng.normal();
  return gpu.createBuffer(a, label);
}

/**
 * Times each kernel at minimind2-small (B=8, T=512: N=4096 rows, H=512,
 * intermediate 1408, vocab 6400, AdamW and the gradient norm over all 25.8M
 * parameters) and tiny (B=8, T=256, H=128, 384, 2048, 0.6M parameters). Quick
 * mode uses B=1 and half the sequence length, the optimizer over tiny's
 * parameters only, and one timed run.
 */
export async function benchPointwise(gpu: Gpu, opts: { quick: boolean }): Promise<BenchRow[]> {
  const shapes: Shape[] = opts.quick
    ? [{ preset: "minimind2-small", B: 1, T: 256 }, { preset: "tiny", B: 1, T: 128 }]
    : [{ preset: "minimind2-small", B: 8, T: 512 }, { preset: "tiny", B: 8, T: 256 }];
  const timing = opts.quick ? { warmup: 1, iterations: 1 } : { warmup: 1, iterations: 5 };
  const rows: BenchRow[] = [];
  const rng = new Rng(7);
  for (const s of shapes) {
    const config = presetConfig(s.preset);
    const H = config.hidden_size;
    const I = config.intermediate_size;
    const V = config.vocab_size;
    const N = s.B * s.T;
    const tag = `${s.preset}: `;
    const created: GPUBuffer[] = [];
    const buf = (n: number, label: string, scale = 1) => {
      const b = randomBuffer(gpu, rng, n, label, scale);
      created.push(b);
      return b;
    };
    const time = async (name: string, shape: string, bytes: number, d: Dispatch | Dispatch[]) => {
      // A submit-and-wait costs ~10 ms on Mesa whatever the work: record the
      // op enough times per submit that one run takes >= ~100 ms (and 1x on a
      // GPU, where one call is long enough only at the larger shapes).
      const once = await timeGpu(gpu, d, { warmup: 1, iterations: 1 });
      const repeat = Math.min(50, Math.max(1, Math.ceil(100 / Math.max(once, 1e-3))));
      const ms = await timeGpu(gpu, d, { ...timing, warmup: 0, repeat });
      rows.push({ name, shape: tag + shape, ms, bytes });
    };

    // Embedding.
    const ids = new Uint32Array(N).map(() => rng.nextInt(V));
    const idsBuf = gpu.createBuffer(ids, "ids"); // [N]
    created.push(idsBuf);
    const weight = buf(V * H, "embedding"); // [V, H]
    const x = buf(N * H, "x"); // [N, H]
    await time(
      "embedding forward",
      `N=${N} H=${H}`,
      4 * (2 * N * H + N),
      await embeddingForward(gpu, { weight, ids: idsBuf, out: x, N, H }),
    );
    const groups = groupByToken(ids, V);
    const eb = await embeddingBackward(gpu, { dOut: x, dWeight: weight, N, H });
    eb.upload(groups);
    await time(
      "embedding backward",
      `N=${N} H=${H} tokens=${groups.segments}`,
      4 * (N * H + 2 * groups.segments * H + 2 * N + 2 * groups.segments),
      eb.dispatch,
    );

    // RMSNorm.
    const w = buf(H, "norm weight");
    const y = buf(N * H, "y");
    const delta = buf(N * H, "delta");
    const rstd = buf(N, "rstd");
    const dy = buf(N * H, "dy");
    const dx = buf(N * H, "dx");
    const dw = buf(H, "dw");
    const eps = config.rms_norm_eps;
    await time(
      "rmsnorm forward",
      `N=${N} H=${H}`,
      4 * (2 * N * H + H + N),
      await rmsnormForward(gpu, { x, w, y, rstd, N, H, eps }),
    );
    await time(
      "add+rmsnorm forward",
      `N=${N} H=${H}`,
      4 * (4 * N * H + H + N),
      await addRmsnormForward(gpu, { x, delta, w, y, rstd, N, H, eps }),
    );
    await time(
      "rmsnorm backward",
      `N=${N} H=${H}`,
      4 * (3 * N * H + 3 * H + N),
      await rmsnormBackward(gpu, { dy, x, w, rstd, dx, dw, N, H, accumulateDx: false }),
    );

    // SwiGLU.
    const n = N * I;
    const gateUp = buf(2 * n, "gate|up");
    const h = buf(n, "h");
    const dGateUp = buf(2 * n, "d gate|up");
    await time(
      "swiglu forward",
      `n=${N}x${I}`,
      4 * 3 * n,
      await swigluForward(gpu, { gateUp, h, N, I }),
    );
    await time(
      "swiglu backward",
      `n=${N}x${I}`,
      4 * 5 * n,
      await swigluBackward(gpu, { dh: h, gateUp, dGateUp, N, I }),
    );
    for (const b of [gateUp, h, dGateUp]) b.destroy();

    // Cross-entropy, in place as the model runs it.
    const logits = buf(N * V, "logits", 3); // [N, V]
    const targets = gpu.createBuffer(new Uint32Array(N).map(() => rng.nextInt(V)), "targets");
    const mask = gpu.createBuffer(new Float32Array(N).fill(1), "mask");
    const scale = gpu.createBuffer(new Float32Array([1 / N]), "scale");
    const rowLoss = buf(N, "rowLoss");
    const loss = buf(1, "loss");
    created.push(targets, mask, scale);
    // Re-running in place feeds the previous gradients back as logits: the
    // kernel's work does not depend on the values, so the timing is still fair.
    await time(
      "cross-entropy fused (in place)",
      `N=${N} V=${V}`,
      4 * (2 * N * V + 3 * N),
      await crossEntropy(gpu, {
        logits,
        targets,
        mask,
        scale,
        dlogits: logits,
        rowLoss,
        loss,
        N,
        V,
      }),
    );
    for (const b of created) b.destroy();

    // Gradient norm and AdamW over the preset's parameter tensors (tiny's in quick mode).
    if (opts.quick && s.preset !== "tiny") continue;
    const specs = parameterSpecs(config);
    const P = specs.reduce((a, t) => a + t.size, 0);
    const params = specs.map((t) => ({
      spec: t,
      param: randomBuffer(gpu, rng, t.size, t.name, 0.02),
      grad: randomBuffer(gpu, rng, t.size, `grad ${t.name}`, 1e-3),
      m: gpu.createBuffer(t.size * 4, `m ${t.name}`),
      v: gpu.createBuffer(t.size * 4, `v ${t.name}`),
    }));
    const tensors = params.map((p) => ({ buffer: p.grad, n: p.spec.size }));
    const partials = gpu.createBuffer(gradNormPartialsSize(tensors) * 4, "grad-norm partials");
    const total = gpu.createBuffer(4, "grad-norm total");
    await time(
      "grad norm (squared)",
      `${specs.length} tensors, ${(P / 1e6).toFixed(1)}M params`,
      4 * P,
      await gradNormSquared(gpu, { tensors, partials, total }),
    );
    const hyper = gpu.createBuffer(
      adamwHyper({ lr: 5e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1, step: 1 }),
      "adamw hyper",
    );
    const gradScale = gpu.createBuffer(new Float32Array([1]), "grad scale");
    const steps: Dispatch[] = [];
    for (const p of params) {
      steps.push(
        await adamw(gpu, { ...p, n: p.spec.size, decay: p.spec.decay, hyper, gradScale }),
      );
    }
    await time(
      "adamw",
      `${specs.length} tensors, ${(P / 1e6).toFixed(1)}M params`,
      4 * 7 * P,
      steps,
    );
    for (const p of params) for (const b of [p.param, p.grad, p.m, p.v]) b.destroy();
    for (const b of [partials, total, hyper, gradScale]) b.destroy();
  }
  return rows;
}

if (import.meta.main) {
  const quick = Deno.args.includes("--quick");
  const gpu = await Gpu.request();
  console.log(`adapter: ${gpu.adapterSummary.name} (${gpu.adapterSummary.backend})`);
  const rows = await benchPointwise(gpu, { quick });
  for (const row of rows) {
    const r = rates(row);
    console.log(
      `${row.name.padEnd(31)} ${row.shape.padEnd(52)} ${row.ms.toFixed(3).padStart(9)} ms` +
        `  ${(r.gbps ?? 0).toFixed(2).padStart(8)} GB/s`,
    );
  }
  gpu.destroy();
}
