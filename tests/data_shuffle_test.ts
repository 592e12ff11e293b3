/** Seeded file order per epoch and the bounded shuffle buffer. */
import { assert, assertEquals, assertNotEquals } from "./assert.ts";
import { epochFileOrder, ShuffleBuffer } from "../data/shuffle.ts";
import { Rng } from "../util/random.ts";

Deno.test("epochFileOrder: a permutation per (seed, epoch), identity without shuffling", () => {
  const n = 12;
  const sorted = Array.from({ length: n }, (_, i) => i);
  const orders = [0, 1, 2, 3].map((e) => epochFileOrder(n, 5, e, true));
  for (const o of orders) assertEquals([...o].sort((a, b) => a - b), sorted);
  assertEquals(epochFileOrder(n, 5, 2, true), orders[2], "deterministic");
  assertEquals(new Set(orders.map((o) => o.join(","))).size, 4, "each epoch its own order");
  assertNotEquals(epochFileOrder(n, 6, 0, true), orders[0], "another seed, another order");
  assertEquals(epochFileOrder(n, 5, 3, false), sorted);
  assertEquals(epochFileOrder(1, 5, 3, true), [0]);
});

/** Streams `items` through a buffer the way DataStream does: fill to capacity, then draw. */
function run(buf: ShuffleBuffer<number>, items: number[]): number[] {
  const out: number[] = [];
  let next = 0;
  while (true) {
    while (!buf.full && next < items.length) buf.add(items[next++]);
    const x = buf.take();
    if (x === undefined) return out;
    out.push(x);
  }
}

Deno.test("ShuffleBuffer: capacity 0 keeps order; otherwise a seeded permutation", () => {
  const items = Array.from({ length: 200 }, (_, i) => i);
  assertEquals(run(new ShuffleBuffer<number>(0, new Rng(1)), items), items);
  const a = run(new ShuffleBuffer<number>(16, new Rng(1)), items);
  assertEquals([...a].sort((x, y) => x - y), items);
  assertNotEquals(a, items);
  assertEquals(run(new ShuffleBuffer<number>(16, new Rng(1)), items), a, "same seed, same order");
  // Bounded: an item cannot come out before the buffer has seen it, so output
  // position k holds an item below k + capacity.
  a.forEach((x, k) => assert(x < k + 16, `item ${x} at ${k}`));
});

Deno.test("ShuffleBuffer: items in slot order + RNG state rebuild the same draws", () => {
  const buf = new ShuffleBuffer<number>(8, new Rng(9));
  for (let i = 0; i < 8; i++) buf.add(i);
  buf.take();
  buf.take();
  const copy = new ShuffleBuffer<number>(8, Rng.fromState(buf.rngState()), [...buf.items()]);
  const rest = Array.from({ length: 20 }, (_, i) => 100 + i);
  assertEquals(run(copy, rest), run(buf, rest));
});
