/**
 * Helpers shared by the GPU tests: random data, submitting dispatches, a
 * `Deno.test` for tests that hold GPU resources, and a tiny model config.
 *
 * @module
 */
import { type Gpu, PassRecorder, type recordDispatches } from "../kernels/runtime.ts";
import type { ModelConfig } from "../model/config.ts";
import { modelForward, toFloat64Params } from "../model/reference.ts";
import type { Rng } from "../util/random.ts";

/**
 * Test options for GPU tests: the device outlives each test (one Gpu per
 * file) and WebGPU resolves its promises outside the test's own ops, so its
 * async ops and resources are not this test's leaks.
 */
export const GPU_TEST = { sanitizeOps: false, sanitizeResources: false };

/** `Deno.test` with `GPU_TEST`. */
export function gpuTest(name: string, fn: () => Promise<void>): void {
  Deno.test({ name, ...GPU_TEST, fn });
}

/** `n` values `offset + scale * N(0, 1)` from `rng`. */
export function randomF32(rng: Rng, n: number, scale = 1, offset = 0): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = offset + scale * rng.normal();
  return a;
}

/** Records `dispatches` into one compute pass and submits it, without waiting. */
export function submitPass(gpu: Gpu, dispatches: Parameters<typeof recordDispatches>[2]): void {
  gpu.submit((enc) => {
    const pass = new PassRecorder(gpu, enc);
    pass.record(dispatches);
    pass.end();
  });
}

/** `submitPass`, then waits until the GPU has finished all submitted work. */
export async function submitPassAndWait(
  gpu: Gpu,
  dispatches: Parameters<typeof recordDispatches>[2],
): Promise<void> {
  submitPass(gpu, dispatches);
  await gpu.finish();
}

/**
 * A 2-layer model with H = 32, 4 query and 2 key/value heads (GQA), I = 48 and
 * an odd vocabulary of 67: small enough for float64 reference checks, with
 * every feature of the real shapes. `over` replaces fields.
 */
export function tinyConfig(over: Partial<ModelConfig> = {}): ModelConfig {
  return {
    hidden_size: 32,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    intermediate_size: 48,
    vocab_size: 67,
    max_position_embeddings: 64,
    rope_theta: 10000,
    rms_norm_eps: 1e-5,
    tie_word_embeddings: true,
    qk_norm: false,
    ...over,
  };
}

/** Float64 reference logits `[T, V]` of the one sequence `ids`. */
export function referenceLogits(
  config: ModelConfig,
  params: Map<string, Float32Array>,
  ids: number[],
): Float64Array {
  return modelForward(config, toFloat64Params(params), {
    ids: Int32Array.from(ids),
    targets: Int32Array.from(ids),
    mask: new Float32Array(ids.length).fill(1),
    B: 1,
    T: ids.length,
  }).logits;
}

/**
 * A Python that can import `modules` for the optional cross-checks: `$PYTHON`
 * (a venv's; `.ci/run` sets it) if set and able, else `python3`; or, when
 * neither can, why (for the test's "ignored" line).
 */
export function findPython(modules: string[]): { python?: string; missing?: string } {
  const why: string[] = [];
  const candidates = [Deno.env.get("PYTHON"), "python3"].filter((p): p is string => !!p);
  for (const python of new Set(candidates)) {
    try {
      const out = new Deno.Command(python, {
        args: ["-c", `import ${modules.join(", ")}`],
        stdout: "null",
        stderr: "piped",
      }).outputSync();
      if (out.success) return { python };
      const last = new TextDecoder().decode(out.stderr).trim().split("\n").pop();
      why.push(`${python} cannot import ${modules.join(", ")} (${last})`);
    } catch (e) {
      why.push(`${python} is not runnable (${(e as Error).message})`);
    }
  }
  return { missing: `${why.join("; ")}; set PYTHON to a Python that has them` };
}
