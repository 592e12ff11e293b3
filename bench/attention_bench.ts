/**
 * Attention forward and backward at the presets' shapes. FLOP are the usual
 * causal counts: forward 2 * 2 * B * nH * (T^2 / 2) * hd (QK^T and PV over the
 * visible half), backward 2.5x that (S recompute, dP, dV, dK, dQ); the kernels
 * execute 3.5x in backward (S and dP are computed in both the dK/dV and the dQ
 * kernel), which the GFLOP/s figure does not credit.
 *
 * Run alone: `deno run -A bench/attention_bench.ts [--quick] [--design=tiled|rows]`.
 */
import { type BenchRow, rates, timeGpu } from "./harness.ts";
import { Gpu } from "../kernels/runtime.ts";
import {
  attentionBackward,
  type AttentionDesign,
  attentionForward,
} from "../kernels/attention/mod.ts";
import { Rng } from "../util/random.ts";

interface Shape {
  name: string;
  B: number;
  T: number;
  nH: number;
  nKV: number;
  hd: number;
}

function randomBuffer(gpu: Gpu, rng: Rng, n: number, label: string): GPUBuffer {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = rng.normal();
  return gpu.createBuffer(a, label);
}

/**
 * Times attention forward and backward at minimind2-small's shape (B=8, T=512,
 * 8/2 heads, hd 64) and tiny's (B=8, T=256, 4/2 heads, hd 32); quick mode
 * uses B=2 and half the sequence length, one timed run each.
 */
export async function benchAttention(
  gpu: Gpu,
  opts: { quick: boolean; design?: AttentionDesign },
): Promise<BenchRow[]> {
  const shapes: Shape[] = opts.quick
    ? [
      { name: "minimind2-small", B: 2, T: 256, nH: 8, nKV: 2, hd: 64 },
      { name: "tiny", B: 2, T: 128, nH: 4, nKV: 2, hd: 32 },
    ]
    : [
      { name: "minimind2-small", B: 8, T: 512, nH: 8, nKV: 2, hd: 64 },
      { name: "tiny", B: 8, T: 256, nH: 4, nKV: 2, hd: 32 },
    ];
  const timing = opts.quick ? { warmup: 1, iterations: 1 } : { warmup: 1, iterations: 3 };
  const rows: BenchRow[] = [];
  const rng = new Rng(1);
  for (const s of shapes) {
    const { B, T, nH, nKV, hd } = s;
    const nq = B * T * nH * hd;
    const nkv = B * T * nKV * hd;
    const q = randomBuffer(gpu, rng, nq, "q"); // [B, T, nH, hd]
    const k = randomBuffer(gpu, rng, nkv, "k"); // [B, T, nKV, hd]
    const v = randomBuffer(gpu, rng, nkv, "v"); // [B, T, nKV, hd]
    const dOut = randomBuffer(gpu, rng, nq, "dOut"); // [B, T, nH, hd]
    const out = gpu.createBuffer(nq * 4, "out"); // [B, T, nH, hd]
    const lse = gpu.createBuffer(B * nH * T * 4, "lse"); // [B, nH, T]
    const dq = gpu.createBuffer(nq * 4, "dq");
    const dk = gpu.createBuffer(nkv * 4, "dk");
    const dv = gpu.createBuffer(nkv * 4, "dv");
    const shapeArgs = { B, T, nH, nKV, hd, design: opts.design };
    const fwd = await attentionForward(gpu, { q, k, v, out, lse, ...shapeArgs });
    const bwd = await attentionBackward(gpu, {
      q,
      k,
      v,
      out,
      lse,
      dOut,
      dq,
      dk,
      dv,
      ...shapeArgs,
    });
    const forwardFlop = 2 * 2 * B * nH * (T * T / 2) * hd;
    const shape = `${s.name}: B=${B} T=${T} nH=${nH} nKV=${nKV} hd=${hd}`;
    const fwdMs = await timeGpu(gpu, fwd, timing);
    rows.push({
      name: "attention forward",
      shape,
      ms: fwdMs,
      flop: forwardFlop,
      bytes: 4 * (2 * nq + 2 * nkv + B * nH * T),
    });
    const bwdMs = await timeGpu(gpu, bwd, timing);
    rows.push({
      name: "attention backward",
      shape,
      ms: bwdMs,
      flop: 2.5 * forwardFlop,
      bytes: 4 * (4 * nq + 4 * nkv + 3 * B * nH * T),
    });
    for (const b of [q, k, v, dOut, out, lse, dq, dk, dv]) b.destroy();
  }
  return rows;
}

if (import.meta.main) {
  const quick = Deno.args.includes("--quick");
  const designArg = Deno.args.find((a) => a.startsWith("--design="))?.slice("--design=".length);
  if (designArg !== undefined && designArg !== "tiled" && designArg !== "rows") {
    console.error(`unknown --design=${designArg} (use tiled or rows)`);
    Deno.exit(2);
  }
  const gpu = await Gpu.request();
  console.log(`adapter: ${gpu.adapterSummary.name} (${gpu.adapterSummary.backend})`);
  const rows = await benchAttention(gpu, {
    quick,
    design: designArg as AttentionDesign | undefined,
  });
  for (const row of rows) {
    const r = rates(row);
    console.log(
      `${row.name.padEnd(20)} ${row.shape.padEnd(48)} ${row.ms.toFixed(2).padStart(9)} ms` +
        `  ${(r.gflops ?? 0).toFixed(2).padStart(8)} GFLOP/s`,
    );
  }
  gpu.destroy();
}
