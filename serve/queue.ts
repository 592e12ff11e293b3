/**
 * One generation slot and a bounded first-come, first-served line for it.
 *
 * The server has one KV cache, so one request generates at a time; the
 * others wait in arrival order. When the slot frees it passes straight to the
 * oldest waiter (no newcomer can overtake it), and a waiter whose client gave
 * up leaves the line at once. A full line is refused at arrival (the server
 * answers 503) rather than growing without bound.
 *
 * @module
 */

/** Gives the slot back; calling it again does nothing. */
export type Release = () => void;

interface Waiter {
  grant: (release: Release) => void;
}

/**
 * A single slot with a FIFO line of at most `maxWaiting` waiters.
 *
 * @example
 * ```ts
 * import { SlotQueue } from "./queue.ts";
 * const queue = new SlotQueue(8);
 * const entry = queue.tryEnter(); // undefined when the line is full
 * if (entry) {
 *   const release = await entry;
 *   try {
 *     // ... generate ...
 *   } finally {
 *     release();
 *   }
 * }
 * ```
 */
export class SlotQueue {
  /** Most requests that may wait while the slot is busy. */
  readonly maxWaiting: number;
  #busy = false;
  #line: Waiter[] = [];
  #onIdle: (() => void)[] = [];

  /** `maxWaiting` >= 0: with 0, a request arriving while the slot is busy is refused. */
  constructor(maxWaiting: number) {
    if (!Number.isInteger(maxWaiting) || maxWaiting < 0) {
      throw new RangeError(`SlotQueue: maxWaiting ${maxWaiting} must be a whole number >= 0`);
    }
    this.maxWaiting = maxWaiting;
  }

  /** Whether a request holds the slot. */
  get busy(): boolean {
    return this.#busy;
  }

  /** Requests waiting for the slot. */
  get waiting(): number {
    return this.#line.length;
  }

  /** Resolves once the slot is free and no one waits (at once when already so). */
  idle(): Promise<void> {
    if (!this.#busy) return Promise.resolve();
    return new Promise((resolve) => this.#onIdle.push(resolve));
  }

  /**
   * Joins the line, deciding at once: `undefined` when the slot is busy and
   * `maxWaiting` requests already wait; otherwise a promise of the slot.
   * It rejects with `signal.reason` if `signal` aborts before the slot comes.
   */
  tryEnter(signal?: AbortSignal): Promise<Release> | undefined {
    if (signal?.aborted) return Promise.reject(signal.reason);
    if (!this.#busy) {
      this.#busy = true;
      return Promise.resolve(this.#releaser());
    }
    if (this.#line.length >= this.maxWaiting) return undefined;
    return new Promise<Release>((resolve, reject) => {
      const onAbort = () => {
        const i = this.#line.indexOf(waiter);
        if (i >= 0) this.#line.splice(i, 1);
        reject(signal!.reason);
      };
      const waiter: Waiter = {
        grant: (release) => {
          signal?.removeEventListener("abort", onAbort);
          resolve(release);
        },
      };
      this.#line.push(waiter);
      signal?.addEventListener("abort", onAbort, { once: true });
    });
  }

  #releaser(): Release {
    let done = false;
    return () => {
      if (done) return;
      done = true;
      const next = this.#line.shift();
      if (next) {
        next.grant(this.#releaser());
        return;
      }
      this.#busy = false;
      for (const resolve of this.#onIdle.splice(0)) resolve();
    };
  }
}
