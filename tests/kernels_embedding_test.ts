/**
 * Embedding kernels (kernels/embedding.ts) against the float64 reference.
 *
 * Tolerances: the forward is a copy, so it must be exact. The backward sums,
 * per token, the dOut rows of its positions in increasing position and adds
 * that sum to the old row; WGSL's f32 addition is correctly rounded, so the
 * result must equal, bit for bit, the same sums done with Math.fround in that
 * order (which checks the documented order, not just closeness). Against the
 * float64 reference it is within k * 2^-24 * |partial sums| for k terms:
 * atol 2e-6, rtol 1e-6 for the O(1) values and k <= ~20 used here.
 */
import { assertClose, assertEquals, assertThrows } from "./assert.ts";
import { GPU_TEST, gpuTest, randomF32, submitPass } from "./helpers.ts";
import { Gpu } from "../kernels/runtime.ts";
import { embeddingBackward, embeddingForward, groupByToken } from "../kernels/embedding.ts";
import * as ref from "../model/reference.ts";
import { Rng } from "../util/random.ts";

const gpu = await Gpu.request();
const TOL = { atol: 2e-6, rtol: 1e-6 };

/** old + (sum of rows in increasing n), each addition rounded to f32: the kernel's order. */
function f32Accumulate(
  old: Float32Array,
  dOut: Float32Array,
  ids: ArrayLike<number>,
  H: number,
): Float32Array {
  const V = old.length / H;
  const sums = new Float32Array(V * H);
  for (let n = 0; n < ids.length; n++) {
    for (let j = 0; j < H; j++) {
      sums[ids[n] * H + j] = Math.fround(sums[ids[n] * H + j] + dOut[n * H + j]);
    }
  }
  return old.map((v, i) => Math.fround(v + sums[i]));
}

Deno.test("groupByToken sorts positions by token, stably, and rejects bad ids", () => {
  const g = groupByToken([3, 1, 3, 3, 0, 1], 5);
  assertEquals(g.segments, 3);
  assertEquals(Array.from(g.tokens), [0, 1, 3]);
  assertEquals(Array.from(g.segmentStarts), [0, 1, 3, 6]);
  assertEquals(Array.from(g.order), [4, 1, 5, 0, 2, 3]);
  const empty = groupByToken([], 5);
  assertEquals(empty.segments, 0);
  assertEquals(Array.from(empty.segmentStarts), [0]);
  assertThrows(() => groupByToken([1, 5], 5), RangeError, "token id 5 at position 1");
  assertThrows(() => groupByToken([-1], 5), RangeError, "outside [0, 5)");
});

for (const [N, H, V] of [[1, 16, 3], [7, 130, 50], [33, 64, 40], [300, 20, 7]]) {
  gpuTest(`embedding forward and backward: N=${N} H=${H} V=${V}`, async () => {
    const rng = new Rng(N * 31 + H);
    // Ids from the lower half of the vocabulary, with repeats: the upper half
    // never occurs, so its rows of dWeight must stay as they were.
    const ids = new Uint32Array(N).map(() => rng.nextInt(Math.max(1, V >> 1)));
    const weight = randomF32(rng, V * H); // [V, H]
    const dOut = randomF32(rng, N * H); // [N, H]
    const dW0 = randomF32(rng, V * H); // gradient from an earlier micro-batch
    const weightBuf = gpu.createBuffer(weight, "weight");
    const idsBuf = gpu.createBuffer(ids, "ids");
    const outBuf = gpu.createBuffer(N * H * 4, "out");
    const dOutBuf = gpu.createBuffer(dOut, "dOut");
    const dWBuf = gpu.createBuffer(dW0, "dWeight");
    const fwd = await embeddingForward(gpu, { weight: weightBuf, ids: idsBuf, out: outBuf, N, H });
    const bwd = await embeddingBackward(gpu, { dOut: dOutBuf, dWeight: dWBuf, N, H });
    bwd.upload(groupByToken(ids, V));
    submitPass(gpu, [fwd, bwd.dispatch]);

    const out = await gpu.readF32(outBuf);
    assertEquals(Float64Array.from(out), ref.embeddingForward(Float64Array.from(weight), ids, H));
    const dW = await gpu.readF32(dWBuf);
    const grad = ref.embeddingBackward(Float64Array.from(dOut), ids, V, H);
    assertClose(dW, grad.map((g, i) => g + dW0[i]), TOL, "dWeight adds the token sums");
    assertEquals(dW, f32Accumulate(dW0, dOut, ids, H), "summation order");
    for (let v = V >> 1; v < V; v++) {
      assertEquals(dW.subarray(v * H, (v + 1) * H), dW0.subarray(v * H, (v + 1) * H), `row ${v}`);
    }

    // A second micro-batch with other ids re-uses the dispatch; fewer distinct
    // tokens than before, so stale segments in the buffer must be ignored.
    const ids2 = new Uint32Array(N).fill(V - 1);
    bwd.upload(groupByToken(ids2, V));
    submitPass(gpu, bwd.dispatch);
    const dW2 = await gpu.readF32(dWBuf);
    assertEquals(dW2, f32Accumulate(dW, dOut, ids2, H), "accumulates into the same rows");
  });
}

gpuTest(
  "embedding backward is bitwise deterministic and handles fewer positions than N",
  async () => {
    const N = 64, H = 32, V = 10;
    const rng = new Rng(77);
    // Skewed ids: token 0 takes about half the positions.
    const ids = new Uint32Array(N - 5).map(() => (rng.nextFloat() < 0.5 ? 0 : rng.nextInt(V)));
    const dOut = randomF32(rng, N * H);
    const dOutBuf = gpu.createBuffer(dOut, "dOut");
    const dWBuf = gpu.createBuffer(V * H * 4, "dWeight");
    const bwd = await embeddingBackward(gpu, { dOut: dOutBuf, dWeight: dWBuf, N, H });
    bwd.upload(groupByToken(ids, V));
    submitPass(gpu, bwd.dispatch);
    const first = await gpu.readF32(dWBuf);
    gpu.write(dWBuf, new Float32Array(V * H));
    submitPass(gpu, bwd.dispatch);
    const second = await gpu.readF32(dWBuf);
    assertEquals(second, first, "bits");
    // Only the first N - 5 rows of dOut count.
    const expected = ref.embeddingBackward(
      Float64Array.from(dOut.subarray(0, ids.length * H)),
      ids,
      V,
      H,
    );
    assertClose(first, expected, TOL);
    // More positions than the dispatch was built for is an error.
    assertThrows(
      () => bwd.upload(groupByToken(new Uint32Array(N + 1), V)),
      RangeError,
      "at most 64",
    );
  },
);

Deno.test({
  name: "embedding: destroy the shared device",
  ...GPU_TEST,
  fn: () => gpu.destroy(),
});
