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
 * model-sized crosses to the CPU and no step creates anything. Parameters,
 * gradients and the two moments are flat buffers with one layout
 * (`model/layout.ts`), so the norm and the update are a few dispatches over
 * ranges: one range with weight decay (matrices), one without (norm weights),
 * each cut where the device's binding limit requires.
 *
 * @module
 */
import {
  type Dispatch,
  type Gpu,
  ownedBytes,
  PassRecorder,
  releaseDispatches,
} from "../kernels/runtime.ts";
import { adamw, ADAMW_HYPER_FLOATS, adamwHyper } from "../kernels/adamw.ts";
import { clipScale, gradNormPartialsSize, gradNormSquared } from "../kernels/grad_norm.ts";
import type { ReadPath } from "../kernels/texels.ts";
import { UserError } from "../util/errors.ts";

/** Pieces of a run start at multiples of this many floats (256 bytes: any device's offset alignment). */
const PIECE_ALIGN = 64;

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

/** What the optimizer updates: flat parameter and gradient buffers and their layout. */
export interface OptimizedParameters {
  /** Updated in place. */
  params: GPUBuffer;
  /** Read (scaled by the clip factor); left unchanged. */
  grads: GPUBuffer;
  /** Floats in each buffer. */
  floats: number;
  /** Named ranges: the moments are saved and restored by these names. */
  tensors: readonly { name: string; offset: number; size: number }[];
  /** The ranges to update, with or without weight decay (gaps between tensors hold zeros). */
  runs: readonly { offset: number; size: number; decay: boolean }[];
}

/** AdamW's moments by tensor name (what `optimizer.safetensors` holds). */
export interface AdamWState {
  /** First moments (running means of the gradients), shaped like each tensor. */
  m: Map<string, Float32Array>;
  /** Second moments (running means of the squared gradients), shaped like each tensor. */
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
  #target: OptimizedParameters;
  #hyperparameters: AdamWHyperparameters;
  #steps: number;
  #m!: GPUBuffer; // first moments, at the parameters' offsets
  #v!: GPUBuffer; // second moments
  #owned: GPUBuffer[] = [];
  #hyper!: GPUBuffer; // adamwHyper(...): the step's settings
  #normSq!: GPUBuffer; // [1] sum of squares of all gradients
  #clip!: GPUBuffer; // [1] the clip factor the update multiplies gradients by
  #dispatches: Dispatch[] = [];
  #reads: ReadPath | undefined;

  private constructor(
    gpu: Gpu,
    target: OptimizedParameters,
    hyperparameters: AdamWHyperparameters,
    steps: number,
    reads: ReadPath | undefined,
  ) {
    this.#gpu = gpu;
    this.#target = target;
    this.#hyperparameters = { ...hyperparameters };
    this.#steps = steps;
    this.#reads = reads;
  }

  /**
   * Allocates zero moments for `target` and prepares the norm, clip and
   * update dispatches. `steps` is the number of updates already applied (a
   * resumed run: the next update's bias correction uses `steps + 1`).
   */
  static async create(
    gpu: Gpu,
    target: OptimizedParameters,
    hyperparameters: AdamWHyperparameters,
    opts: {
      steps?: number;
      /** Where AdamW and the grad norm read the gradients (kernels/texels.ts); default `auto`. */
      reads?: ReadPath;
    } = {},
  ): Promise<AdamW> {
    checkHyperparameters(hyperparameters);
    const steps = opts.steps ?? 0;
    if (!Number.isInteger(steps) || steps < 0) {
      throw new UserError(`AdamW: steps already taken must be a whole number, got ${steps}`);
    }
    const opt = new AdamW(gpu, target, hyperparameters, steps, opts.reads);
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
    const t = this.#target;
    this.#m = this.#buffer(t.floats * 4, `adam m [${t.floats}]`);
    this.#v = this.#buffer(t.floats * 4, `adam v [${t.floats}]`);
    this.#hyper = this.#buffer(ADAMW_HYPER_FLOATS * 4, "adamw hyper");
    this.#normSq = this.#buffer(4, "grad norm squared");
    // One whole texel (16 bytes), so that AdamW can read it from a texture on CPU drivers.
    this.#clip = this.#buffer(16, "grad clip scale");
    // Pieces of the runs that one binding can hold (aligned, so any device binds them).
    const limits = gpu.limits;
    const most = Math.floor(
      Math.min(limits.maxStorageBufferBindingSize, limits.maxBufferSize) / 4 / PIECE_ALIGN,
    ) * PIECE_ALIGN;
    const pieces: { offset: number; size: number; decay: boolean }[] = [];
    for (const run of t.runs) {
      for (let o = 0; o < run.size; o += most) {
        pieces.push({
          offset: run.offset + o,
          size: Math.min(most, run.size - o),
          decay: run.decay,
        });
      }
    }
    const grads = pieces.map((p) => ({ buffer: t.grads, offset: p.offset, n: p.size }));
    const partials = this.#buffer(gradNormPartialsSize(grads) * 4, "grad norm partials");
    this.#dispatches.push(
      ...await gradNormSquared(gpu, {
        tensors: grads,
        partials,
        total: this.#normSq,
        reads: this.#reads,
      }),
      await clipScale(gpu, { total: this.#normSq, hyper: this.#hyper, scale: this.#clip }),
    );
    const range = (buffer: GPUBuffer, p: { offset: number; size: number }) => ({
      buffer,
      offset: p.offset * 4,
      size: p.size * 4,
    });
    for (const p of pieces) {
      this.#dispatches.push(
        await adamw(gpu, {
          param: range(t.params, p),
          grad: range(t.grads, p),
          m: range(this.#m, p),
          v: range(this.#v, p),
          n: p.size,
          decay: p.decay,
          hyper: this.#hyper,
          gradScale: this.#clip,
          options: { reads: this.#reads },
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
      const pass = new PassRecorder(gpu, enc);
      pass.record(this.#dispatches);
      pass.end();
    });
  }

  /**
   * Bytes of GPU memory the optimizer holds (moments, partials, settings);
   * not the shared input textures its kernels read on CPU drivers
   * (`inputTextureBytes`).
   */
  get gpuBytes(): number {
    let bytes = 0;
    for (const b of this.#owned) bytes += b.size;
    bytes += ownedBytes(this.#dispatches);
    return bytes;
  }

  /** Every dispatch of one update, in order (for profiling and counting). */
  stepDispatches(): Dispatch[] {
    return [...this.#dispatches];
  }

  /** The one-float buffer holding the last step's squared gradient norm (for `Gpu.readScalars`). */
  get gradNormSquaredCell(): GPUBuffer {
    return this.#normSq;
  }

  /** The global gradient norm of the last step submitted before this call, before clipping. */
  async readGradNorm(): Promise<number> {
    return Math.sqrt((await this.#gpu.readF32(this.#normSq, 0, 1))[0]);
  }

  /** The moments, by tensor name (copies). */
  async getState(): Promise<AdamWState> {
    const t = this.#target;
    const byName = async (buffer: GPUBuffer) => {
      const flat = await this.#gpu.readF32(buffer, 0, t.floats);
      return new Map(t.tensors.map((x) => [x.name, flat.slice(x.offset, x.offset + x.size)]));
    };
    return { m: await byName(this.#m), v: await byName(this.#v) };
  }

  /** Replaces the moments (resuming) and the count of updates they come from. */
  setState(state: AdamWState, steps: number): void {
    if (!Number.isInteger(steps) || steps < 0) {
      throw new UserError(`AdamW: steps already taken must be a whole number, got ${steps}`);
    }
    const t = this.#target;
    const flats = { m: new Float32Array(t.floats), v: new Float32Array(t.floats) };
    for (const [what, map] of [["m", state.m], ["v", state.v]] as const) {
      for (const x of t.tensors) {
        const values = map.get(x.name);
        if (!values) throw new UserError(`optimizer state ${what}: missing tensor ${x.name}`);
        if (values.length !== x.size) {
          throw new UserError(
            `optimizer state ${what}: tensor ${x.name} has ${values.length} values, expected ${x.size}`,
          );
        }
        flats[what].set(values, x.offset);
      }
    }
    this.#gpu.write(this.#m, flats.m);
    this.#gpu.write(this.#v, flats.v);
    this.#steps = steps;
  }

  /** Releases the moments and every buffer the optimizer's dispatches own. */
  destroy(): void {
    releaseDispatches(this.#dispatches);
    for (const b of this.#owned) b.destroy();
    this.#owned = [];
  }
}
