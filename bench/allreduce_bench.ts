/**
 * The gradient all-reduce of data-parallel training (dist/comm.ts), timed at
 * the flat gradient size of each preset (parameters plus alignment gaps, plus
 * the loss that rides along). Meaningful only under an MPI launcher:
 *
 *   mpirun -np 2 deno run -A bench/main.ts --only allreduce
 *
 * Alone it reports that nothing crosses.
 */
import { openCommunicator } from "../dist/comm.ts";
import { allreduceBandwidth } from "../dist/bandwidth.ts";
import { PRESETS } from "../model/config.ts";
import { paramLayout } from "../model/layout.ts";
import type { ThroughputRow } from "./harness.ts";

/** Rows of MB/s per preset's gradient size, and the communicator's description. */
export async function benchAllreduce(
  quick: boolean,
): Promise<{ rows: ThroughputRow[]; ranks: number; description: string; rank: number }> {
  const comm = openCommunicator();
  try {
    const rows: ThroughputRow[] = [];
    const presets = quick ? ["tiny"] : Object.keys(PRESETS);
    for (const name of presets) {
      const floats = paramLayout(PRESETS[name as keyof typeof PRESETS]).floats + 1;
      const r = await allreduceBandwidth(comm, floats * 4, quick ? 2 : 5);
      if (!r) break;
      const mib = (r.bytes / 2 ** 20).toFixed(1);
      rows.push({
        name: `all-reduce ${name} gradients (${mib} MiB), ms`,
        value: r.seconds * 1e3,
        unit: "ms",
      });
      rows.push({
        name: `all-reduce ${name} gradients (${mib} MiB)`,
        value: r.mbPerSecond,
        unit: "MB/s",
      });
      rows.push({
        name: `all-reduce ${name} gradients, per-link (busbw)`,
        value: r.busMbPerSecond,
        unit: "MB/s",
      });
    }
    return { rows, ranks: comm.size, description: comm.description, rank: comm.rank };
  } finally {
    await comm.finalize();
  }
}
