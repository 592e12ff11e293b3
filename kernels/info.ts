/**
 * `trainer info`: the adapter, its limits and features, and the Deno version —
 * the first thing a user runs when something is wrong.
 */
import {
  type AdapterSummary,
  formatBytes,
  type Gpu,
  type GpuFeatures,
  limitsOf,
} from "./runtime.ts";

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
