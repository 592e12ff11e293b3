import { assertAlmostEquals, assertEquals } from "./assert.ts";
import { cosineWithWarmup } from "../optim/schedule.ts";

Deno.test("cosine schedule: lr at the first step, lr*ratio at the last, monotone between", () => {
  const s = { lr: 5e-4, steps: 100, warmupSteps: 0, minLrRatio: 0.1 };
  assertEquals(cosineWithWarmup(s, 1), 5e-4);
  assertAlmostEquals(cosineWithWarmup(s, 100), 5e-5, 1e-15);
  // Halfway through the decay the cosine is at its midpoint.
  assertAlmostEquals(cosineWithWarmup({ ...s, steps: 101 }, 51), (5e-4 + 5e-5) / 2, 1e-15);
  for (let i = 2; i <= 100; i++) {
    if (!(cosineWithWarmup(s, i) <= cosineWithWarmup(s, i - 1))) {
      throw new Error(`not monotone at ${i}`);
    }
  }
});

Deno.test("warmup rises linearly to lr, then decay starts from lr", () => {
  const s = { lr: 1e-3, steps: 50, warmupSteps: 10, minLrRatio: 0.1 };
  assertAlmostEquals(cosineWithWarmup(s, 1), 1e-4, 1e-15);
  assertAlmostEquals(cosineWithWarmup(s, 5), 5e-4, 1e-15);
  assertEquals(cosineWithWarmup(s, 10), 1e-3);
  assertEquals(cosineWithWarmup(s, 11), 1e-3);
  assertAlmostEquals(cosineWithWarmup(s, 50), 1e-4, 1e-15);
});

Deno.test("ratio 1 is constant; a one-step run uses lr", () => {
  const s = { lr: 2e-4, steps: 10, warmupSteps: 0, minLrRatio: 1 };
  for (let i = 1; i <= 10; i++) assertAlmostEquals(cosineWithWarmup(s, i), 2e-4, 1e-18);
  assertEquals(cosineWithWarmup({ ...s, steps: 1, minLrRatio: 0.1 }, 1), 2e-4);
});
