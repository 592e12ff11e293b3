/**
 * Matmul benchmarks: the three forms of a linear layer at 1024³ and 2048³ and
 * at the linear layers of minimind2-small (B=8, T=512: M = 4096 rows) and tiny
 * (B=8, T=256: M = 2048 rows). Each row is one call as the model makes it
 * (dY^T X through `matmulDyTXSplitK`: with split-K, its two dispatches); FLOP =
 * 2·M·N·K, bytes = the operands and the output once (4·(MK + NK + MN)).
 *
 * Run alone: `deno run -A --unstable-webgpu bench/matmul_bench.ts [--quick] [--variant=NAME]`.
 */
import { type BenchRow, rates, timeGpu } from "./harness.ts";
import { type Dispatch, Gpu } from "../kernels/runtime.ts";
import {
  matmulDyTXSplitK,
  matmulDyW,
  type MatmulOptions,
  type MatmulVariant,
  matmulXWt,
} from "../kernels/matmul.ts";

/** One linear layer: `[N, K]` weight applied to M rows. */
interface LinearShape {
  name: string;
  M: number;
  K: number;
  N: number;
}

function linearShapes(quick: boolean): LinearShape[] {
  const shapes: LinearShape[] = [{ name: "square", M: 1024, K: 1024, N: 1024 }];
  if (!quick) shapes.push({ name: "square", M: 2048, K: 2048, N: 2048 });
  // minimind2-small: hidden 512, 8 heads / 2 kv heads of 64, intermediate 1408, vocab 6400.
  const small = 8 * 512;
  shapes.push(
    { name: "minimind2-small q/o", M: small, K: 512, N: 512 },
    { name: "minimind2-small k/v", M: small, K: 512, N: 128 },
    { name: "minimind2-small gate/up", M: small, K: 512, N: 1408 },
    { name: "minimind2-small down", M: small, K: 1408, N: 512 },
    { name: "minimind2-small lm_head", M: small, K: 512, N: 6400 },
  );
  // tiny: hidden 128, 4 heads / 2 kv heads of 32, intermediate 384, vocab 2048.
  const tiny = 8 * 256;
  shapes.push(
    { name: "tiny q/o", M: tiny, K: 128, N: 128 },
    { name: "tiny k/v", M: tiny, K: 128, N: 64 },
    { name: "tiny gate/up", M: tiny, K: 128, N: 384 },
    { name: "tiny down", M: tiny, K: 384, N: 128 },
    { name: "tiny lm_head", M: tiny, K: 128, N: 2048 },
  );
  return shapes;
}

/**
 * Times `matmulXWt`, `matmulDyW` and `matmulDyTX` at model shapes (median of
 * the timed runs). Quick mode skips 2048³ and times fewer runs. `options`
 * forces a kernel design (`--variant=NAME` on the command line).
 */
export async function benchMatmul(
  gpu: Gpu,
  opts: { quick: boolean; options?: MatmulOptions },
): Promise<BenchRow[]> {
  const rows: BenchRow[] = [];
  for (const s of linearShapes(opts.quick)) {
    const { M, K, N } = s;
    // Random operands: timings do not depend on values, but NaN-free inputs
    // keep denormal or NaN paths out of the picture.
    const fill = (n: number) => {
      const a = new Float32Array(n);
      for (let i = 0; i < n; i++) a[i] = ((i * 2654435761) % 1000) / 1000 - 0.5;
      return a;
    };
    const x = gpu.createBuffer(fill(M * K), "x [M, K]");
    const w = gpu.createBuffer(fill(N * K), "w [N, K]");
    const y = gpu.createBuffer(M * N * 4, "y [M, N]");
    const dx = gpu.createBuffer(M * K * 4, "dx [M, K]");
    const dw = gpu.createBuffer(N * K * 4, "dw [N, K]");
    const options = opts.options;
    const forms: [string, Dispatch[]][] = [
      ["matmul X W^T", [await matmulXWt(gpu, { x, w, y, M, K, N, options })]],
      ["matmul dY W", [await matmulDyW(gpu, { dy: y, w, dx, M, N, K, options })]],
      ["matmul dY^T X", await matmulDyTXSplitK(gpu, { dy: y, x, dw, M, N, K, options })],
    ];
    const flop = 2 * M * N * K;
    // Small shapes are recorded several times per submit, as in a training
    // step, so the submit-and-wait latency (~10 ms on lavapipe) does not
    // swamp them: about 2^30 FLOP per timed run, 16 calls at most.
    const repeat = Math.min(16, Math.max(1, Math.round(2 ** 30 / flop)));
    for (const [name, d] of forms) {
      const ms = await timeGpu(gpu, d, { warmup: 1, iterations: opts.quick ? 3 : 5, repeat });
      rows.push({
        name: `${name} (${s.name})`,
        shape: `M=${M} K=${K} N=${N}`,
        ms,
        flop,
        bytes: 4 * (M * K + N * K + M * N),
      });
    }
    for (const b of [x, w, y, dx, dw]) b.destroy();
    for (const [, ds] of forms) for (const d of ds) for (const b of d.owned ?? []) b.destroy();
  }
  return rows;
}

if (import.meta.main) {
  const quick = Deno.args.includes("--quick");
  const variantArg = Deno.args.find((a) => a.startsWith("--variant="));
  const variant = variantArg?.slice("--variant=".length) as MatmulVariant | undefined;
  const gpu = await Gpu.request();
  console.log(`adapter: ${gpu.adapterSummary.name} (${gpu.adapterSummary.backend})`);
  const rows = await benchMatmul(gpu, { quick, options: variant ? { variant } : undefined });
  for (const row of rows) {
    const r = rates(row);
    console.log(
      `${row.name.padEnd(40)} ${row.shape.padEnd(22)} ${row.ms.toFixed(2).padStart(9)} ms ` +
        `${(r.gflops ?? 0).toFixed(2).padStart(8)} GFLOP/s`,
    );
  }
  gpu.destroy();
}
