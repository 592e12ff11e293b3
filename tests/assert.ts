/**
 * Assertions for the test suites. `@std/assert` lives on JSR, which this
 * project's build machines cannot reach, so the few we need are here; deep
 * equality comes from `node:util`'s `isDeepStrictEqual`.
 */
import { inspect, isDeepStrictEqual } from "node:util";

/** Thrown by every assertion. */
export class AssertionError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "AssertionError";
  }
}

function show(v: unknown): string {
  return inspect(v, { depth: 6, maxArrayLength: 40, breakLength: 120 });
}

/** Fails unless `cond` is truthy. */
export function assert(cond: unknown, msg = "assertion failed"): asserts cond {
  if (!cond) throw new AssertionError(msg);
}

/** Deep strict equality (typed arrays compare element-wise). */
export function assertEquals<T>(actual: T, expected: T, msg?: string): void {
  if (!isDeepStrictEqual(actual, expected)) {
    throw new AssertionError(
      `${msg ? msg + ": " : ""}values differ\n  actual:   ${show(actual)}\n  expected: ${
        show(expected)
      }`,
    );
  }
}

/** Deep strict inequality. */
export function assertNotEquals<T>(actual: T, expected: T, msg?: string): void {
  if (isDeepStrictEqual(actual, expected)) {
    throw new AssertionError(`${msg ? msg + ": " : ""}values are equal: ${show(actual)}`);
  }
}

/** |actual - expected| <= tolerance. */
export function assertAlmostEquals(
  actual: number,
  expected: number,
  tolerance: number,
  msg?: string,
): void {
  if (!(Math.abs(actual - expected) <= tolerance)) {
    throw new AssertionError(
      `${msg ? msg + ": " : ""}${actual} is not within ${tolerance} of ${expected} (diff ${
        Math.abs(actual - expected)
      })`,
    );
  }
}

/** `text` contains `part`. */
export function assertStringIncludes(text: string, part: string, msg?: string): void {
  if (!text.includes(part)) {
    throw new AssertionError(
      `${msg ? msg + ": " : ""}expected ${show(text)} to include ${show(part)}`,
    );
  }
}

/** `text` matches `re`. */
export function assertMatch(text: string, re: RegExp, msg?: string): void {
  if (!re.test(text)) {
    throw new AssertionError(`${msg ? msg + ": " : ""}expected ${show(text)} to match ${re}`);
  }
}

type ErrorClass = new (...args: never[]) => Error;

function checkError(e: unknown, cls?: ErrorClass, includes?: string): Error {
  if (!(e instanceof Error)) throw new AssertionError(`expected an Error, got ${show(e)}`);
  const err: Error = e;
  const isClass = cls ? err instanceof cls : true;
  if (cls && !isClass) {
    throw new AssertionError(`expected ${cls.name}, got ${err.name}: ${err.message}`);
  }
  if (includes !== undefined && !e.message.includes(includes)) {
    throw new AssertionError(
      `expected the error message to include ${show(includes)}, got ${show(e.message)}`,
    );
  }
  return e;
}

/** `fn` throws (an instance of `cls`, whose message includes `includes`); returns the error. */
export function assertThrows(fn: () => unknown, cls?: ErrorClass, includes?: string): Error {
  try {
    fn();
  } catch (e) {
    return checkError(e, cls, includes);
  }
  throw new AssertionError("expected the function to throw");
}

/** The promise from `fn` rejects (as `assertThrows`); returns the error. */
export async function assertRejects(
  fn: () => Promise<unknown>,
  cls?: ErrorClass,
  includes?: string,
): Promise<Error> {
  try {
    await fn();
  } catch (e) {
    return checkError(e, cls, includes);
  }
  throw new AssertionError("expected the promise to reject");
}

/**
 * Element-wise closeness of a float32 GPU result to a float64 reference:
 * |a - e| <= atol + rtol * |e| for every element. Reports the worst element.
 */
export function assertClose(
  actual: ArrayLike<number>,
  expected: ArrayLike<number>,
  tol: { atol: number; rtol: number },
  msg?: string,
): void {
  if (actual.length !== expected.length) {
    throw new AssertionError(
      `${msg ? msg + ": " : ""}length ${actual.length} != expected ${expected.length}`,
    );
  }
  let worst = -1;
  let worstExcess = 0;
  for (let i = 0; i < actual.length; i++) {
    const a = actual[i];
    const e = expected[i];
    const excess = Math.abs(a - e) - (tol.atol + tol.rtol * Math.abs(e));
    if (!(excess <= 0) && (worst < 0 || !(excess <= worstExcess))) {
      worst = i;
      worstExcess = excess;
    }
  }
  if (worst >= 0) {
    throw new AssertionError(
      `${msg ? msg + ": " : ""}element ${worst}: ${actual[worst]} vs expected ${
        expected[worst]
      } (atol ${tol.atol}, rtol ${tol.rtol})`,
    );
  }
}
