/**
 * Shuffling for a stream that never holds the corpus: the order of shard files
 * is permuted per epoch, and samples pass through a bounded buffer from which
 * a random one is drawn each time (the scheme of `tf.data`'s and WebDataset's
 * shuffle buffers). Both are functions of the run's seed, so a run is
 * reproducible and a saved state resumes it exactly.
 */
import { Rng, type RngState } from "../util/random.ts";

/**
 * The order in which an epoch reads `count` files: a permutation drawn from
 * (seed, epoch) alone, so it needs no saved state; identity when not shuffling.
 */
export function epochFileOrder(
  count: number,
  seed: number,
  epoch: number,
  shuffle: boolean,
): number[] {
  const order = Array.from({ length: count }, (_, i) => i);
  if (!shuffle || count < 2) return order;
  // A separate generator per epoch: Rng's splitmix32 seeding spreads nearby seeds apart.
  const rng = new Rng((seed ^ Math.imul(epoch + 1, 0x9e3779b1)) >>> 0);
  return rng.shuffle(order);
}

/**
 * A bounded shuffle buffer. Items are added until it holds `capacity`; then
 * each `take` removes a uniformly chosen one (its slot is filled by the last
 * item, so slots stay dense). With capacity 0 or 1 items come out in order.
 *
 * A sample leaves the buffer after a geometric number of draws (mean
 * `capacity`), so the output is a local shuffle over a window of about
 * `capacity` samples: choose it larger than the number of consecutive samples
 * that come from one document or one topic.
 *
 * @example
 * ```ts
 * import { Rng } from "../util/random.ts";
 * const buf = new ShuffleBuffer<number>(3, new Rng(1));
 * for (const x of [0, 1, 2]) buf.add(x);
 * const first = buf.take(); // one of 0, 1, 2
 * ```
 */
export class ShuffleBuffer<T> {
  /** Samples held before drawing starts (0: pass-through in order). */
  readonly capacity: number;
  #items: T[];
  #rng: Rng;

  /** A buffer of `capacity` drawing with `rng`, optionally refilled with saved `items` (slot order). */
  constructor(capacity: number, rng: Rng, items: T[] = []) {
    if (!Number.isInteger(capacity) || capacity < 0) {
      throw new RangeError(`shuffle buffer size must be a whole number >= 0, got ${capacity}`);
    }
    this.capacity = capacity;
    this.#rng = rng;
    this.#items = items;
  }

  /** Number of items held. */
  get size(): number {
    return this.#items.length;
  }

  /** Whether the buffer holds enough items to draw from without starving the shuffle. */
  get full(): boolean {
    return this.#items.length >= Math.max(1, this.capacity);
  }

  /** Adds an item. */
  add(item: T): void {
    this.#items.push(item);
  }

  /** Removes and returns a random item (the oldest when capacity <= 1), or undefined when empty. */
  take(): T | undefined {
    const n = this.#items.length;
    if (n === 0) return undefined;
    if (this.capacity <= 1) return this.#items.shift();
    const j = this.#rng.nextInt(n);
    const out = this.#items[j];
    const last = this.#items.pop()!;
    if (j < n - 1) this.#items[j] = last;
    return out;
  }

  /** The items in slot order (the order that, with the RNG state, determines what comes next). */
  items(): readonly T[] {
    return this.#items;
  }

  /** The generator's state, for saving the buffer. */
  rngState(): RngState {
    return this.#rng.state();
  }
}
