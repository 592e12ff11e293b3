/**
 * `trainer info`: the adapter, its limits and features, and the Deno version —
 * the first thing a user runs when something is wrong.
 */
import type { CommandSpec } from "../util/cli.ts";
import { flagOption } from "../util/cli.ts";
import { type AdapterSummary, formatBytes, Gpu, type GpuFeatures, limitsOf } from "./runtime.ts";

/** What `trainer info --json` prints. */
export interface GpuReport {
  deno: string;
  v8: string;
  os: string;
  arch: string;
  adapter: AdapterSummary;
  features: string[];
  deviceFeatures: GpuFeatures;
  limits: Record<string, number>;
}

/** Collects the report from a device. */
export function gpuReport(gpu: Gpu): GpuReport {
  return {
    deno: Deno.version.deno,
    v8: Deno.version.v8,
    os: Deno.build.os,
    arch: Deno.build.arch,
    adapter: { ...gpu.adapterSummary },
    features: [...gpu.adapter.features].sort(),
    deviceFeatures: { ...gpu.features },
    limits: limitsOf(gpu.limits),
  };
}

const BYTE_LIMITS = /Size$|BufferBindingSize$/;

/** Human-readable form of the report. */
export function formatGpuReport(r: GpuReport): string {
  const a = r.adapter;
  const yes = (b: boolean) => (b ? "yes" : "no");
  const lines = [
    `Deno       ${r.deno} (V8 ${r.v8}), ${r.os} ${r.arch}`,
    `Adapter    ${a.name}`,
    `  vendor ${a.vendor || "?"}, architecture ${a.architecture || "?"}`,
    `  backend  ${a.backend}`,
    `  CPU fallback: ${yes(a.isFallback)}${
      a.isFallback ? " (a software driver: everything runs, slowly)" : ""
    }`,
    `Device features  shader-f16: ${yes(r.deviceFeatures.shaderF16)}, timestamp-query: ${
      yes(r.deviceFeatures.timestampQuery)
    }, subgroups: ${yes(r.deviceFeatures.subgroups)}`,
    `Adapter features ${r.features.join(", ") || "(none)"}`,
    "Limits",
  ];
  const width = Math.max(...Object.keys(r.limits).map((k) => k.length));
  for (const [k, v] of Object.entries(r.limits)) {
    const pretty = BYTE_LIMITS.test(k) && v >= 1024 ? `  (${formatBytes(v)})` : "";
    lines.push(`  ${k.padEnd(width)}  ${v}${pretty}`);
  }
  return lines.join("\n");
}

/** The `info` command. */
export const infoCommand: CommandSpec = {
  name: "info",
  summary: "Show the GPU adapter, its limits and features, and the Deno version",
  description:
    "Run this first when something is wrong: it names the adapter WebGPU picked, whether it is a CPU fallback (Mesa lavapipe/llvmpipe), the backend, the limits that bound model and batch sizes, and the optional features (shader-f16, timestamp-query, subgroups).",
  options: {
    json: { type: "boolean", help: "print one JSON object instead of text" },
  },
  async run(args) {
    const gpu = await Gpu.request();
    try {
      const report = gpuReport(gpu);
      console.log(
        flagOption(args, "json") ? JSON.stringify(report, null, 2) : formatGpuReport(report),
      );
    } finally {
      gpu.destroy();
    }
  },
};
