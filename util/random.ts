/**
 * The project's one PRNG: xoshiro128** (Blackman & Vigna), seeded through
 * splitmix32 so that any 32-bit seed gives a well-mixed state. Its whole state
 * is four uint32 words, saved in checkpoints so a resumed run continues the
 * same stream. Normals come from the Box-Muller transform, one pair per two
 * uniforms (the second value is cached and is part of the state).
 */

/** The serializable state of an `Rng`. */
export interface RngState {
  /** The four xoshiro128** state words, as uint32. */
  s: [number, number, number, number];
  /** The cached second Box-Muller value, or null. */
  spare: number | null;
}

/** A seeded, reproducible random number generator. */
export class Rng {
  #s = new Uint32Array(4);
  #spare: number | null = null;

  /** A generator whose state is expanded from `seed` (taken as uint32) by splitmix32. */
  constructor(seed: number) {
    let x = seed >>> 0;
    for (let i = 0; i < 4; i++) {
      // splitmix32
      x = (x + 0x9e3779b9) >>> 0;
      let z = x;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
      this.#s[i] = (z ^ (z >>> 16)) >>> 0;
    }
    if ((this.#s[0] | this.#s[1] | this.#s[2] | this.#s[3]) === 0) this.#s[0] = 1;
  }

  /** A generator that continues from a saved state. */
  static fromState(state: RngState): Rng {
    const r = new Rng(0);
    r.#s.set(state.s);
    r.#spare = state.spare;
    return r;
  }

  /** A copy of the state, for checkpoints. */
  state(): RngState {
    const s = this.#s;
    return { s: [s[0], s[1], s[2], s[3]], spare: this.#spare };
  }

  /** A uniform uint32. */
  nextU32(): number {
    const s = this.#s;
    const result = Math.imul(rotl(Math.imul(s[1], 5) >>> 0, 7), 9) >>> 0;
    const t = (s[1] << 9) >>> 0;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return result;
  }

  /** A uniform float in [0, 1) with 32 random bits. */
  nextFloat(): number {
    return this.nextU32() / 4294967296;
  }

  /** A uniform integer in [0, n), without modulo bias. */
  nextInt(n: number): number {
    if (!(n >= 1 && n <= 4294967296)) throw new RangeError(`nextInt: bad bound ${n}`);
    const limit = 4294967296 - (4294967296 % n);
    let x;
    do x = this.nextU32(); while (x >= limit);
    return x % n;
  }

  /** A standard normal sample (Box-Muller). */
  normal(): number {
    if (this.#spare !== null) {
      const v = this.#spare;
      this.#spare = null;
      return v;
    }
    let u = 0;
    while (u === 0) u = this.nextFloat();
    const w = this.nextFloat();
    const r = Math.sqrt(-2 * Math.log(u));
    this.#spare = r * Math.sin(2 * Math.PI * w);
    return r * Math.cos(2 * Math.PI * w);
  }

  /** Shuffles `a` in place (Fisher-Yates). */
  shuffle<T>(a: T[]): T[] {
    for (let i = a.length - 1; i > 0; i--) {
      const j = this.nextInt(i + 1);
      [a[i], a[j]] = [a[j], a[i]];
    }
    return a;
  }
}

function rotl(x: number, k: number): number {
  return ((x << k) | (x >>> (32 - k))) >>> 0;
}
