/**
 * `deno task bench`: kernel GFLOP/s and GB/s, the end-to-end training step
 * (tokens/s, and MFU where the adapter's FP32 peak is known), decode speed, and
 * the data pipeline's throughput, with the adapter named in the header.
 *
 *   deno task bench            # the full set (minutes on a CPU driver)
 *   deno task bench --quick    # smaller shapes, one timed run each
 *   deno task bench --only matmul,train --markdown
 *   deno task bench --json results.json
 *   deno task bench --only train --vs-pytorch
 *
 * `--markdown` prints the tables as Markdown for docs/benchmarks.md; `--json
 * FILE` also writes every row as `{date, adapter, peakFlops, suites}` (what
 * `bench/pytorch_compare.py --ours` reads). `--vs-pytorch` runs that script on
 * the training-step shapes in the same sitting, on the same device kind (the
 * CPU when the adapter is a CPU driver, the GPU otherwise), where Python with
 * torch is found (`PYTHON`, else `python3`), and prints both and the ratio.
 */
import { parseArgs } from "node:util";
import { Gpu } from "../kernels/runtime.ts";
import { type BenchRow, rates, type ThroughputRow } from "./harness.ts";
import { benchMatmul } from "./matmul_bench.ts";
import { benchAttention } from "./attention_bench.ts";
import { benchPointwise } from "./pointwise_bench.ts";
import { benchTrainStep } from "./train_step_bench.ts";
import { benchDecode } from "./decode_bench.ts";
import { benchData } from "./data_bench.ts";
import { benchTokenizer } from "./tokenizer_bench.ts";
import { peakFlopsFor } from "../train/peak.ts";
import { PRESETS } from "../model/config.ts";
import { usesTimestamps } from "./harness.ts";
import { benchAllreduce } from "./allreduce_bench.ts";
import { detectLaunch } from "../dist/comm.ts";

const GPU_SUITES = {
  matmul: benchMatmul,
  attention: benchAttention,
  pointwise: benchPointwise,
  train: benchTrainStep,
  decode: benchDecode,
} as const;
const CPU_SUITES = { data: () => benchData(), tokenizer: () => benchTokenizer() } as const;
/** Suites that run under an MPI launcher (every rank joins; rank 0 prints). */
const MPI_SUITES = ["allreduce"] as const;

function fmt(v: number | undefined, digits = 2): string {
  if (v === undefined || !Number.isFinite(v)) return "";
  return v >= 100 || Number.isInteger(v) ? v.toFixed(0) : v.toFixed(digits);
}

function gpuTable(rows: BenchRow[], markdown: boolean): string {
  const header = ["op", "shape", "ms", "GFLOP/s", "GB/s", "other"];
  const body = rows.map((r) => {
    const { gflops, gbps } = rates(r);
    const other = Object.entries(r.extra ?? {}).map(([k, v]) => `${k} ${fmt(v)}`).join(", ");
    return [r.name, r.shape, fmt(r.ms, 3), fmt(gflops), fmt(gbps), other];
  });
  return table(header, body, markdown);
}

function table(header: string[], body: string[][], markdown: boolean): string {
  if (markdown) {
    return [
      `| ${header.join(" | ")} |`,
      `| ${header.map(() => "---").join(" | ")} |`,
      ...body.map((r) => `| ${r.join(" | ")} |`),
    ].join("\n");
  }
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((r) => r[i].length)));
  const line = (r: string[]) => r.map((c, i) => c.padEnd(widths[i])).join("  ").trimEnd();
  return [line(header), ...body.map(line)].join("\n");
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      quick: { type: "boolean" },
      markdown: { type: "boolean" },
      only: { type: "string" },
      "peak-tflops": { type: "string" },
      json: { type: "string" },
      "vs-pytorch": { type: "boolean" },
    },
  });
  const vsPytorch = values["vs-pytorch"] ?? false;
  const only = values.only?.split(",").map((s) => s.trim());
  const unknown = only?.filter((s) =>
    !(s in GPU_SUITES) && !(s in CPU_SUITES) && !MPI_SUITES.includes(s as "allreduce")
  ) ?? [];
  if (unknown.length > 0) {
    console.error(
      `unknown suite ${unknown.join(", ")}; suites: ${
        [...Object.keys(GPU_SUITES), ...Object.keys(CPU_SUITES), ...MPI_SUITES].join(", ")
      }`,
    );
    Deno.exit(2);
  }
  // Under mpirun every rank runs this program: only the all-reduce suite
  // makes sense there (the others would run N times over on shared devices).
  const launch = detectLaunch(Deno.env);
  if (launch || only?.includes("allreduce")) {
    if (launch && (only?.length !== 1 || only[0] !== "allreduce")) {
      console.error("under an MPI launcher, run only the all-reduce suite: --only allreduce");
      Deno.exit(2);
    }
    const r = await benchAllreduce(values.quick ?? false);
    if (r.rank === 0) {
      console.log(`# all-reduce of gradients — ${r.ranks} rank(s), ${r.description}\n`);
      if (r.rows.length === 0) {
        console.log("one process: nothing crosses; run under mpirun -np N to measure");
      } else {
        console.log(
          table(
            ["what", "value", "unit"],
            r.rows.map((x) => [x.name, fmt(x.value), x.unit]),
            values.markdown ?? false,
          ),
        );
      }
    }
    Deno.exit(0);
  }
  const want = (name: string) =>
    !only || only.includes(name) || (vsPytorch && name === "train");
  const quick = values.quick ?? false;
  const gpu = await Gpu.request();
  const a = gpu.adapterSummary;
  const peakFlops = values["peak-tflops"]
    ? Number(values["peak-tflops"]) * 1e12
    : peakFlopsFor(a.name);
  console.log(
    `# trainer benchmarks — ${new Date().toISOString().slice(0, 10)}\n` +
      `adapter: ${a.name} (${a.vendor || "?"}), backend ${a.backend}${
        a.isFallback ? ", CPU fallback" : ""
      }; subgroups ${gpu.features.subgroups ? "yes" : "no"}, shader-f16 ${
        gpu.features.shaderF16 ? "yes" : "no"
      }\n` +
      `Deno ${Deno.version.deno}, ${Deno.build.os} ${Deno.build.arch}; ${
        quick ? "quick mode" : "full mode"
      }; FP32 peak ${
        peakFlops ? `${(peakFlops / 1e12).toFixed(1)} TFLOP/s` : "unknown (no MFU)"
      }; kernels timed by ${usesTimestamps(gpu) ? "GPU timestamps" : "wall clock, submit to done"}`,
  );
  const suites: Record<string, BenchRow[] | ThroughputRow[]> = {};
  for (const [name, suite] of Object.entries(GPU_SUITES)) {
    if (!want(name)) continue;
    const t0 = performance.now();
    const rows = await suite(gpu, { quick, peakFlops });
    suites[name] = rows;
    console.log(`\n## ${name} (${((performance.now() - t0) / 1000).toFixed(0)} s)\n`);
    console.log(gpuTable(rows, values.markdown ?? false));
  }
  for (const [name, suite] of Object.entries(CPU_SUITES)) {
    if (!want(name)) continue;
    const rows: ThroughputRow[] = await suite();
    suites[name] = rows;
    console.log(`\n## ${name} (CPU)\n`);
    console.log(
      table(
        ["what", "value", "unit"],
        rows.map((r) => [r.name, fmt(r.value), r.unit]),
        values.markdown ?? false,
      ),
    );
  }
  const report: Record<string, unknown> = {
    date: new Date().toISOString(),
    adapter: a,
    features: gpu.features,
    deno: Deno.version.deno,
    quick,
    peakFlops: peakFlops ?? null,
    suites,
  };
  gpu.destroy();
  if (vsPytorch) {
    console.log(`\n## PyTorch on the same shapes, this sitting\n`);
    const torch = await comparePytorch(report, a.isFallback);
    if (torch.ok) {
      console.log(torch.table);
      report["pytorch"] = torch.results;
    } else {
      console.log(`not run: ${torch.reason}`);
    }
  }
  if (values.json) {
    await Deno.writeTextFile(values.json, JSON.stringify(report, null, 2) + "\n");
  }
}

/**
 * Runs bench/pytorch_compare.py on our training-step rows (the same presets, B
 * and T): PyTorch eager FP32 on the CPU for a CPU driver (same arithmetic,
 * same cores), FP32 and bf16 autocast on the GPU otherwise.
 */
async function comparePytorch(
  report: Record<string, unknown>,
  onCpu: boolean,
): Promise<{ ok: true; table: string; results: unknown } | { ok: false; reason: string }> {
  const python = Deno.env.get("PYTHON") ?? "python3";
  const dir = await Deno.makeTempDir({ prefix: "trainer-bench-" });
  try {
    const ours = `${dir}/ours.json`;
    const presets = `${dir}/presets.json`;
    const out = `${dir}/pytorch.json`;
    await Deno.writeTextFile(ours, JSON.stringify(report));
    await Deno.writeTextFile(presets, JSON.stringify(PRESETS));
    const script = new URL("./pytorch_compare.py", import.meta.url).pathname;
    const args = [script, "--ours", ours, "--presets", presets, "--json", out];
    args.push(...(onCpu ? ["--device", "cpu", "--modes", "fp32"] : ["--modes", "fp32,bf16"]));
    let result: Deno.CommandOutput;
    try {
      result = await new Deno.Command(python, { args, stdout: "piped", stderr: "piped" }).output();
    } catch (e) {
      return { ok: false, reason: `${python} could not be started (${(e as Error).message})` };
    }
    const text = new TextDecoder().decode(result.stdout);
    if (!result.success) {
      const err = new TextDecoder().decode(result.stderr).trim().split("\n").slice(-3).join(" ");
      return {
        ok: false,
        reason: /No module named 'torch'/.test(err)
          ? `${python} has no torch (pip install torch; or set PYTHON to one that has)`
          : `${python} bench/pytorch_compare.py failed: ${err}`,
      };
    }
    return { ok: true, table: text.trim(), results: JSON.parse(await Deno.readTextFile(out)) };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}
