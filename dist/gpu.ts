/**
 * One GPU per rank on a multi-GPU host. WebGPU picks one adapter and cannot
 * list them, so the choice is made below it, before the first
 * `requestAdapter()`: Mesa's Vulkan device-select layer (installed with
 * `mesa-vulkan-drivers`, active above every Vulkan driver) honours
 * `DRI_PRIME=pci-DDDD_BB_DD_F!`, which exposes only that PCI device to Vulkan.
 *
 * `TRAINER_GPUS` lists one `DRI_PRIME` value per local rank (comma-separated,
 * e.g. `pci-0000_41_00_0,pci-0000_42_00_0`; `lspci -D` gives the addresses,
 * with `:` and `.` written as `_`); rank with local rank i takes entry
 * i mod length. Without it every rank on a host gets the adapter WebGPU
 * prefers. See docs/distributed.md for what is and is not verified.
 *
 * @module
 */
import type { EnvReader, LaunchInfo } from "./comm.ts";

/** The variable listing one GPU (a `DRI_PRIME` value) per local rank. */
export const GPUS_ENV = "TRAINER_GPUS";

/**
 * The `DRI_PRIME` value this rank should run with, or undefined when
 * `TRAINER_GPUS` is unset or the launcher gave no local rank.
 */
export function gpuForRank(env: EnvReader, launch: LaunchInfo | undefined): string | undefined {
  const list = env.get(GPUS_ENV)?.split(",").map((s) => s.trim()).filter((s) => s !== "");
  if (!launch || !list || list.length === 0 || launch.localRank === undefined) return undefined;
  const pick = list[launch.localRank % list.length];
  return pick.endsWith("!") ? pick : `${pick}!`;
}

/** Sets `DRI_PRIME` for this rank (before any adapter is requested); returns what it set. */
export function applyGpuForRank(launch: LaunchInfo | undefined): string | undefined {
  const value = gpuForRank(Deno.env, launch);
  if (value !== undefined) Deno.env.set("DRI_PRIME", value);
  return value;
}
