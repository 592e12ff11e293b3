/**
 * `trainer info`: the adapter WebGPU picked, its limits and features.
 *
 * @module
 */
import { Gpu } from "../kernels/runtime.ts";
import { formatGpuReport, gpuReport } from "../kernels/info.ts";
import { type CommandSpec, flagOption } from "./args.ts";

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
