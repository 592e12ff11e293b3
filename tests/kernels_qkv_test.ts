/**
 * The fused q|k|v split and merge (kernels/qkv.ts) against the float64
 * reference's RoPE, and the flat parameter layout they rely on
 * (model/layout.ts).
 *
 * Tolerance: without RoPE both kernels only move floats: exact. With RoPE each
 * output is x1 cos - x2 sin (two products and a sum of f32 values with the
 * table's f32 cos/sin, rounded once from float64): a few ulp, atol 1e-6 and
 * rtol 1e-6 on unit-scale data. A wrong head, row or position shows as O(1).
 */
import { assert, assertClose, assertEquals } from "./assert.ts";
import { gpuTest, randomF32, submitPass } from "./helpers.ts";
import { Gpu } from "../kernels/runtime.ts";
import { mergeQkv, splitQkv } from "../kernels/qkv.ts";
import * as ref from "../model/reference.ts";
import { LAYOUT_ALIGN, paramLayout } from "../model/layout.ts";
import { parameterSpecs, tensorNames } from "../model/params.ts";
import { presetConfig } from "../model/config.ts";
import { tinyConfig } from "./helpers.ts";
import { Rng } from "../util/random.ts";

const gpu = await Gpu.request();
const TOL = { atol: 1e-6, rtol: 1e-6 };

/** Columns [from, from + width) of each row of a `[rows, stride]` array. */
function columns(a: Float32Array, rows: number, stride: number, from: number, width: number) {
  const out = new Float32Array(rows * width);
  for (let r = 0; r < rows; r++) {
    out.set(a.subarray(r * stride + from, r * stride + from + width), r * width);
  }
  return out;
}

// B=2, T=5 (rows not a multiple of any workgroup), 3 query and 1 kv head of
// hd 6 (scalar lanes: hd/2 is odd), 8 and 40 (vec4 lanes: hd/2 % 4 == 0).
for (const [rope, hd] of [[false, 6], [true, 6], [false, 8], [true, 8], [true, 40]] as const) {
  gpuTest(`split and merge q|k|v (rope=${rope}, hd=${hd})`, async () => {
    const [B, T, nH, nKV, theta] = [2, 5, 3, 1, 1e4];
    const N = B * T;
    const qDim = nH * hd;
    const kvDim = nKV * hd;
    const W = qDim + 2 * kvDim;
    const rng = new Rng((rope ? 1 : 2) + hd);
    const qkv = randomF32(rng, N * W);
    const shape = { N, nH, nKV, hd, rope: rope ? { T, theta } : undefined };
    const [qkvBuf, q, k, v] = [
      gpu.createBuffer(qkv),
      gpu.createBuffer(N * qDim * 4),
      gpu.createBuffer(N * kvDim * 4),
      gpu.createBuffer(N * kvDim * 4),
    ];
    submitPass(gpu, await splitQkv(gpu, { ...shape, qkv: qkvBuf, q, k, v }));
    const f64 = (a: Float32Array) => Float64Array.from(a);
    const qRef = f64(columns(qkv, N, W, 0, qDim));
    const kRef = f64(columns(qkv, N, W, qDim, kvDim));
    const vRef = f64(columns(qkv, N, W, qDim + kvDim, kvDim));
    const tol = rope ? TOL : { atol: 0, rtol: 0 };
    assertClose(
      await gpu.readF32(q),
      rope ? ref.ropeForward(qRef, B, T, nH, hd, theta) : qRef,
      tol,
      "q",
    );
    assertClose(
      await gpu.readF32(k),
      rope ? ref.ropeForward(kRef, B, T, nKV, hd, theta) : kRef,
      tol,
      "k",
    );
    assertClose(await gpu.readF32(v), vRef, { atol: 0, rtol: 0 }, "v");

    // Merge: gradients w.r.t. the (rotated) q and k and v back into the fused layout.
    const [dq, dk, dv] = [
      randomF32(rng, N * qDim),
      randomF32(rng, N * kvDim),
      randomF32(rng, N * kvDim),
    ];
    const dqkv = gpu.createBuffer(N * W * 4);
    submitPass(
      gpu,
      await mergeQkv(gpu, {
        ...shape,
        dqkv,
        dq: gpu.createBuffer(dq),
        dk: gpu.createBuffer(dk),
        dv: gpu.createBuffer(dv),
      }),
    );
    const got = await gpu.readF32(dqkv);
    const dqRef = rope ? ref.ropeBackward(f64(dq), B, T, nH, hd, theta) : f64(dq);
    const dkRef = rope ? ref.ropeBackward(f64(dk), B, T, nKV, hd, theta) : f64(dk);
    assertClose(columns(got, N, W, 0, qDim), dqRef, tol, "dq");
    assertClose(columns(got, N, W, qDim, kvDim), dkRef, tol, "dk");
    assertClose(columns(got, N, W, qDim + kvDim, kvDim), f64(dv), { atol: 0, rtol: 0 }, "dv");
  });
}

Deno.test("layout: fused groups adjacent, groups aligned, decayed tensors first, no overlap", () => {
  for (const config of [presetConfig("minimind-3"), tinyConfig({ tie_word_embeddings: false })]) {
    const layout = paramLayout(config);
    const names = tensorNames(config);
    const slot = new Map(layout.tensors.map((t) => [t.name, t]));
    for (const [l, L] of names.layers.entries()) {
      const [q, k, v, gate, up] = [L.q, L.k, L.v, L.gate, L.up].map((n) => slot.get(n)!);
      assertEquals(k.offset, q.offset + q.size);
      assertEquals(v.offset, k.offset + k.size);
      assertEquals(up.offset, gate.offset + gate.size);
      assertEquals(layout.layers[l].qkv, { offset: q.offset, size: q.size + k.size + v.size });
      assertEquals(layout.layers[l].gateUp, { offset: gate.offset, size: gate.size + up.size });
      assertEquals(q.offset % LAYOUT_ALIGN, 0);
      assertEquals(gate.offset % LAYOUT_ALIGN, 0);
    }
    // Every spec has a slot with its size and decay; slots do not overlap.
    const specs = parameterSpecs(config);
    assertEquals(layout.tensors.map((t) => t.name), specs.map((s) => s.name));
    const sorted = [...layout.tensors].sort((a, b) => a.offset - b.offset);
    for (let i = 1; i < sorted.length; i++) {
      assert(sorted[i].offset >= sorted[i - 1].offset + sorted[i - 1].size, "overlap");
    }
    // The decay run covers exactly the matrices.
    const [decay, plain] = layout.runs;
    assertEquals([decay.decay, plain.decay], [true, false]);
    for (const t of layout.tensors) {
      const inDecay = t.offset >= decay.offset && t.offset + t.size <= decay.offset + decay.size;
      assertEquals(inDecay, t.decay, t.name);
    }
    assertEquals(plain.offset + plain.size, layout.floats);
    assertEquals(
      layout.head,
      config.tie_word_embeddings ? layout.embed : {
        offset: slot.get("lm_head.weight")!.offset,
        size: slot.get("lm_head.weight")!.size,
      },
    );
  }
});

Deno.test({
  name: "qkv: destroy the shared device",
  sanitizeOps: false,
  sanitizeResources: false,
  fn: () => gpu.destroy(),
});
