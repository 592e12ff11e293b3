/**
 * AdamW with global-norm clipping, on the GPU: the optimizer owns the first
 * and second moments of every tensor it updates, the global gradient norm and
 * the clip factor. A step is, for the gradients the model's backward left:
 *
 *   total = sum_k |g_k|^2                        (kernels/grad_norm.ts, fixed order)
 *   c     = gradClip > 0 ? min(1, gradClip / (sqrt(total) + 1e-6)) : 1
 *   for each tensor: AdamW(p, c g, m, v)         (kernels/adamw.ts; decay on matrices)
 *
 * All three run on the GPU from buffers prepared once: the step's settings
 * (lr, betas, eps, weight decay, the bias corrections of step t, the clip
 * threshold) travel in one small buffer written before the submit, so nothing
 * model-sized crosses to the CPU and no step creates anything.
 *
 * @module
 */
import {
  type Dispatch,
  type Gpu,
  recordDispatches,
  releaseDispatches,
} from "../kernels/runtime.ts";
import { adamw, ADAMW_HYPER_FLOATS, adamwHyper } from "../kernels/adamw.ts";
import { clipScale, gradNormPartialsSize, gradNormSquared } from "../kernels/grad_norm.ts";
import { UserError } from "../util/errors.ts";

/** AdamW's settings for a run; the learning rate comes with each step (from the schedule). */
export interface AdamWHyperparameters {
  /** First-moment decay rate (e.g. 0.9). */
  beta1: number;
  /** Second-moment decay rate (e.g. 0.95 or 0.999). */
  beta2: number;
  /** Added to `sqrt(v_hat)` in the update's denominator. */
  eps: number;
  /** Decoupled weight decay (`p -= lr * weightDecay * p`), on tensors with `decay`. */
  weightDecay: number;
  /** Global-norm clipping threshold; 0 = off. */
  gradClip: number;
}

/** A tensor the optimizer updates: its parameter and gradient buffers. */
export interface OptimizedTensor {
  /** Name (the moments are saved under it). */
  name: string;
  /** Updated in place. */
  param: GPUBuffer;
  /** Read (scaled by the clip factor); left unchanged. */
  grad: GPUBuffer;
  /** Number of elements. */
  size: number;
  /** Whether weight decay applies. */
  decay: boolean;
}

/** AdamW's moments by tensor name (what `optimizer.safetensors` holds). */
export interface AdamWState {
  m: Map<string, Float32Array>;
  v: Map<string, Float32Array>;
}

function checkHyperparameters(h: AdamWHyperparameters): void {
  if (!(h.beta1 >= 0 && h.beta1 < 1 && h.beta2 >= 0 && h.beta2 < 1)) {
    throw new UserError(`AdamW betas must be in [0, 1), got ${h.beta1} and ${h.beta2}`);
  }
  if (!(h.eps >= 0 && h.weightDecay >= 0)) {
    throw new UserError(`AdamW eps and weight decay must be >= 0, got ${h.eps}, ${h.weightDecay}`);
  }
  if (!(Number.isFinite(h.gradClip) && h.gradClip >= 0)) {
    throw new UserError(`gradient clipping threshold must be >= 0 (0 = off), got ${h.gradClip}`);
  }
}

/**
 * The optimizer. `step(lr)` applies one update to every tensor from the
 * gradients now in their buffers, after everything submitted before it.
 *
 * @example
 * ```ts ignore
 * const adamw = await AdamW.create(gpu, model.trainable(), {
 *   beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1, gradClip: 1,
 * });
 * model.forwardBackward([batch]);
 * adamw.step(1e-3);
 * console.log(await adamw.readGradNorm());
 * ```
 */
export class AdamW {
  #gpu: Gpu;
  #tensors: OptimizedTensor[];
  #hyperparameters: AdamWHyperparameters;
  #steps: number;
  #m = new Map<string, GPUBuffer>();
  #v = new Map<string, GPUBuffer>();
  #owned: GPUBuffer[] = [];
  #hyper!: GPUBuffer; // adamwHyper(...): the step's settings
  #normSq!: GPUBuffer; // [1] sum of squares of all gradients
  #clip!: GPUBuffer; // [1] the clip factor the update multiplies gradients by
  #dispatches: Dispatch[] = [];

  private constructor(
    gpu: Gpu,
    tensors: OptimizedTensor[],
    hyperparameters: AdamWHyperparameters,
    steps: number,
  ) {
    this.#gpu = gpu;
    this.#tensors = tensors;
    this.#hyperparameters = { ...hyperparameters };
    this.#steps = steps;
  }

  /**
   * Allocates zero moments for `tensors` and prepares the norm, clip and
   * update dispatches. `steps` is the number of updates already applied (a
   * resumed run: the next update's bias correction uses `steps + 1`).
   */
  static async create(
    gpu: Gpu,
    tensors: OptimizedTensor[],
    hyperparameters: AdamWHyperparameters,
    opts: { steps?: number } = {},
  ): Promise<AdamW> {
    checkHyperparameters(hyperparameters);
    const steps = opts.steps ?? 0;
    if (!Number.isInteger(steps) || steps < 0) {
      throw new UserError(`AdamW: steps already taken must be a whole number, got ${steps}`);
    }
    const opt = new AdamW(gpu, tensors, hyperparameters, steps);
    try {
      await opt.#build();
    } catch (e) {
      opt.destroy();
      throw e;
    }
    return opt;
  }

  #buffer(data: Float32Array | number, label: string): GPUBuffer {
    const b = this.#gpu.createBuffer(data, label);
    this.#owned.push(b);
    return b;
  }

  async #build(): Promise<void> {
    const gpu = this.#gpu;
    for (const t of this.#tensors) {
      this.#m.set(t.name, this.#buffer(t.size * 4, `adam m ${t.name}`));
      this.#v.set(t.name, this.#buffer(t.size * 4, `adam v ${t.name}`));
    }
    this.#hyper = this.#buffer(ADAMW_HYPER_FLOATS * 4, "adamw hyper");
    this.#normSq = this.#buffer(4, "grad norm squared");
    this.#clip = this.#buffer(4, "grad clip scale");
    const grads = this.#tensors.map((t) => ({ buffer: t.grad, n: t.size }));
    const partials = this.#buffer(gradNormPartialsSize(grads) * 4, "grad norm partials");
    this.#dispatches.push(
      ...await gradNormSquared(gpu, { tensors: grads, partials, total: this.#normSq }),
      await clipScale(gpu, { total: this.#normSq, hyper: this.#hyper, scale: this.#clip }),
    );
    for (const t of this.#tensors) {
      this.#dispatches.push(
        await adamw(gpu, {
          param: t.param,
          grad: t.grad,
          m: this.#m.get(t.name)!,
          v: this.#v.get(t.name)!,
          n: t.size,
          decay: t.decay,
          hyper: this.#hyper,
          gradScale: this.#clip,
        }),
      );
    }
  }

  /** Updates applied so far. */
  get steps(): number {
    return this.#steps;
  }

  /** The run's settings (a copy). */
  get hyperparameters(): AdamWHyperparameters {
    return { ...this.#hyperparameters };
  }

  /** Changes settings for the steps to come (the moments stay). */
  setHyperparameters(changes: Partial<AdamWHyperparameters>): void {
    const next = { ...this.#hyperparameters, ...changes };
    checkHyperparameters(next);
    this.#hyperparameters = next;
  }

  /**
   * One update at learning rate `lr`: the global norm of the gradients, the
   * clip factor and AdamW on every tensor, submitted without waiting (after
   * the model's backward, which was submitted before).
   */
  step(lr: number): void {
    if (!Number.isFinite(lr) || lr < 0) {
      throw new UserError(`learning rate must be >= 0, got ${lr}`);
    }
    const h = this.#hyperparameters;
    this.#steps++;
    const gpu = this.#gpu;
    gpu.write(this.#hyper, adamwHyper({ ...h, lr, step: this.#steps }));
    gpu.submit((enc) => {
      const pass = enc.beginComputePass();
      recordDispatches(gpu, pass, this.#dispatches);
      pass.end();
    });
  }

  /** The global gradient norm of the last step submitted before this call, before clipping. */
  async readGradNorm(): Promise<number> {
    return Math.sqrt((await this.#gpu.readF32(this.#normSq, 0, 1))[0]);
  }

  /** The moments, by tensor name (copies). */
  async getState(): Promise<AdamWState> {
    const read = async (buffers: Map<string, GPUBuffer>) => {
      const out = new Map<string, Float32Array>();
      for (const t of this.#tensors) {
        out.set(t.name, await this.#gpu.readF32(buffers.get(t.name)!, 0, t.size));
      }
      return out;
    };
    return { m: await read(this.#m), v: await read(this.#v) };
  }

  /** Replaces the moments (resuming) and the count of updates they come from. */
  setState(state: AdamWState, steps: number): void {
    if (!Number.isInteger(steps) || steps < 0) {
      throw new UserError(`AdamW: steps already taken must be a whole number, got ${steps}`);
    }
    for (const [what, map] of [["m", state.m], ["v", state.v]] as const) {
      for (const t of this.#tensors) {
        const values = map.get(t.name);
        if (!values) throw new UserError(`optimizer state ${what}: missing tensor ${t.name}`);
        if (values.length !== t.size) {
          throw new UserError(
            `optimizer state ${what}: tensor ${t.name} has ${values.length} values, expected ${t.size}`,
          );
        }
      }
    }
    for (const t of this.#tensors) {
      this.#gpu.write(this.#m.get(t.name)!, state.m.get(t.name)!);
      this.#gpu.write(this.#v.get(t.name)!, state.v.get(t.name)!);
    }
    this.#steps = steps;
  }

  /** Releases the moments and every buffer the optimizer's dispatches own. */
  destroy(): void {
    releaseDispatches(this.#dispatches);
    for (const b of this.#owned) b.destroy();
    this.#owned = [];
  }
}
