/**
 * `trainer info`: the adapter WebGPU picked, its limits and features.
 *
 * @module
 */
import { Gpu } from "../kernels/runtime.ts";
import { formatGpuReport, gpuReport } from "../kernels/info.ts";
import { type CommandSpec, flagOption } from "./args.ts";
import { detectLaunch } from "../dist/comm.ts";
import { applyGpuForRank } from "../dist/gpu.ts";

/** The `info` command. */
export const infoCommand: CommandSpec = {
  name: "info",
  summary: "Show the GPU adapter, its limits and features, and the Deno version",
  description:
    "Run this first when something is wrong: it names the adapter WebGPU picked, whether it is a CPU fallback (Mesa lavapipe/llvmpipe), the backend, the limits that bound model and batch sizes, and the optional features (shader-f16, timestamp-query, subgroups). Under mpirun or srun each rank prints its rank and local rank first (docs/distributed.md: which GPU each rank gets).",
  options: {
    json: { type: "boolean", help: "print one JSON object instead of text" },
  },
  async run(args) {
    // Under mpirun/srun each rank reports what it sees (without loading libmpi),
    // with the GPU TRAINER_GPUS gives its local rank.
    const launch = detectLaunch(Deno.env);
    const gpuPick = applyGpuForRank(launch);
    const gpu = await Gpu.request();
    try {
      const report = { ...gpuReport(gpu), ...(launch ? { mpi: launch } : {}) };
      const rankLine = launch
        ? `MPI rank ${launch.rank}${launch.size ? ` of ${launch.size}` : ""} (local rank ${
          launch.localRank ?? "?"
        }, ${launch.launcher}${gpuPick ? `, DRI_PRIME=${gpuPick}` : ""})\n`
        : "";
      console.log(
        flagOption(args, "json")
          ? JSON.stringify(report, null, 2)
          : rankLine + formatGpuReport(report),
      );
    } finally {
      gpu.destroy();
    }
  },
};
