/**
 * Stop strings over streamed text: generation must end where the decoded
 * text first contains one of them, and neither the stop string nor anything
 * after it may reach the client. A stop string can be split over several
 * tokens ("\n\nUser:" may arrive as "\n", "\nUser", ":"), so text that could
 * still turn out to be the start of one is held back until it cannot.
 *
 * @module
 */

/**
 * Filters streamed text against stop strings.
 *
 * Each `push` returns the text that is now safe to emit: everything except
 * the longest tail that is a proper prefix of some stop string. When a stop
 * string is complete, the text before its first occurrence is returned with
 * `stopped` and the rest is dropped.
 *
 * @example
 * ```ts
 * import { StopStringFilter } from "./stop.ts";
 * const f = new StopStringFilter(["\nUser:"]);
 * f.push("Hi there\nUs"); // { text: "Hi there", stopped: false }: "\nUs" may start "\nUser:"
 * f.push("er: next"); // { text: "", stopped: true }
 * ```
 */
export class StopStringFilter {
  readonly #stops: string[];
  #held = "";
  #stopped = false;

  /** `stops`: non-empty strings; none means every push passes through. */
  constructor(stops: readonly string[]) {
    if (stops.some((s) => s === "")) throw new RangeError("StopStringFilter: empty stop string");
    this.#stops = [...stops];
  }

  /** Whether a stop string has been seen (later pushes return nothing). */
  get stopped(): boolean {
    return this.#stopped;
  }

  /** Adds decoded text; returns what may be emitted now and whether a stop string completed. */
  push(text: string): { text: string; stopped: boolean } {
    if (this.#stopped) return { text: "", stopped: true };
    const pending = this.#held + text;
    // Earlier text held no complete stop string, so the first match in
    // `pending` is the first in the whole reply.
    let first = -1;
    for (const s of this.#stops) {
      const i = pending.indexOf(s);
      if (i >= 0 && (first < 0 || i < first)) first = i;
    }
    if (first >= 0) {
      this.#stopped = true;
      this.#held = "";
      return { text: pending.slice(0, first), stopped: true };
    }
    let hold = 0;
    for (const s of this.#stops) {
      for (let k = Math.min(s.length - 1, pending.length); k > hold; k--) {
        if (pending.endsWith(s.slice(0, k))) {
          hold = k;
          break;
        }
      }
    }
    this.#held = pending.slice(pending.length - hold);
    return { text: pending.slice(0, pending.length - hold), stopped: false };
  }

  /** Generation ended without a stop string: the held-back tail is text after all. */
  flush(): string {
    const tail = this.#stopped ? "" : this.#held;
    this.#held = "";
    return tail;
  }
}
