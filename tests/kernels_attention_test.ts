/**
 * Attention kernels (kernels/attention/) against the float64 reference
 * (model/reference.ts), with both kernel designs ("tiled" for GPUs, "rows" for CPU drivers)
 * on whatever adapter runs the tests, at shapes that are multiples of no tile.
 *
 * Inputs are N(0, 1), so the scaled scores s = q.k / sqrt(hd) are ~N(0, 1)
 * (softmax neither flat nor one-hot) and |out|, |v|, |dO| are O(1).
 * Tolerances (|a - e| <= atol + rtol |e|):
 *  - out, lse: atol 1e-5, rtol 1e-5. A score is a dot product of hd <= 128
 *    float32 products of O(1) terms: its error is ~sqrt(hd) 2^-24 ~ 1e-6 before
 *    scaling by 1/sqrt(hd); exp turns an absolute score error e into a relative
 *    p error e, the online rescaling adds a few roundings per key step, and out
 *    is a convex combination of v rows (|v| < 5): errors ~1e-6 (measured on
 *    lavapipe, both designs: <= 1.2e-6 with |out| <= 3.6, |lse| <= 6).
 *  - dq, dk, dv: atol 5e-5, rtol 5e-5. They sum up to T nH/nKV = 520 terms
 *    (dk, dv over all queries of 4 heads) of O(1) products, and ds = p (dp - D)
 *    subtracts two O(1)..O(sqrt(hd)) numbers: errors ~sqrt(520) 2^-24 * 10 ~ 1e-5
 *    at worst (measured: <= 4e-6 with |dv| <= 8.3).
 * Any real mistake (a wrong index, mask, scale or missing head) gives errors of
 * O(0.1..1), four orders above these bounds.
 */
import { assert, assertClose, assertEquals } from "./assert.ts";
import { GPU_TEST, randomF32, submitPass } from "./helpers.ts";
import { Gpu } from "../kernels/runtime.ts";
import {
  attentionBackward,
  type AttentionDesign,
  attentionForward,
  attentionTiles,
} from "../kernels/attention/mod.ts";
import * as ref from "../model/reference.ts";
import { Rng } from "../util/random.ts";

const gpu = await Gpu.request();
const FWD_TOL = { atol: 1e-5, rtol: 1e-5 };
const BWD_TOL = { atol: 5e-5, rtol: 5e-5 };

interface Case {
  B: number;
  T: number;
  nH: number;
  nKV: number;
  hd: number;
}

const cases: Case[] = [
  { B: 1, T: 1, nH: 1, nKV: 1, hd: 16 },
  { B: 2, T: 7, nH: 4, nKV: 1, hd: 32 },
  { B: 1, T: 33, nH: 2, nKV: 2, hd: 64 },
  { B: 2, T: 33, nH: 4, nKV: 1, hd: 96 },
  { B: 1, T: 130, nH: 8, nKV: 2, hd: 64 },
  { B: 1, T: 40, nH: 2, nKV: 2, hd: 128 },
  { B: 2, T: 70, nH: 4, nKV: 4, hd: 16 },
  // hd % 4 != 0: "rows" (vec4 loads) falls back to "tiled", with TC = 2.
  { B: 1, T: 20, nH: 2, nKV: 1, hd: 18 },
];

// "rows" runs its subgroup path where the device has subgroups (lavapipe
// does), "rows-plain" the path every device has.
const variants = [
  { name: "tiled", design: "tiled" as AttentionDesign, subgroups: true },
  { name: "rows", design: "rows" as AttentionDesign, subgroups: true },
  { name: "rows-plain", design: "rows" as AttentionDesign, subgroups: false },
];

for (const { name: variant, design, subgroups } of variants) {
  // The plain path is the same loops for every hd: hd <= 64 covers it, and
  // compiling it for hd 96/128 on a fresh Mesa shader cache costs ~20 s.
  for (const c of cases.filter((c) => variant !== "rows-plain" || c.hd <= 64)) {
    const name = `${variant}: B=${c.B} T=${c.T} nH=${c.nH} nKV=${c.nKV} hd=${c.hd}`;
    // One device for the whole file: its async ops and resources outlive each test.
    Deno.test({
      name: `attention forward and backward match the reference: ${name}`,
      ...GPU_TEST,
      fn: async () => {
        const { B, T, nH, nKV, hd } = c;
        const rng = new Rng(99 + T * 13 + hd + nH);
        const q = randomF32(rng, B * T * nH * hd);
        const k = randomF32(rng, B * T * nKV * hd);
        const v = randomF32(rng, B * T * nKV * hd);
        const dOut = randomF32(rng, B * T * nH * hd);
        const buf = (a: Float32Array | number, label: string) => gpu.createBuffer(a, label);
        const qB = buf(q, "q"); // [B, T, nH, hd]
        const kB = buf(k, "k"); // [B, T, nKV, hd]
        const vB = buf(v, "v"); // [B, T, nKV, hd]
        const outB = buf(q.length * 4, "out"); // [B, T, nH, hd]
        const lseB = buf(B * nH * T * 4, "lse"); // [B, nH, T]
        const dOutB = buf(dOut, "dOut"); // [B, T, nH, hd]
        // Gradient buffers start as garbage: the kernels must overwrite them.
        const dqB = buf(randomF32(rng, q.length), "dq");
        const dkB = buf(randomF32(rng, k.length), "dk");
        const dvB = buf(randomF32(rng, v.length), "dv");
        const fwd = await attentionForward(gpu, {
          q: qB,
          k: kB,
          v: vB,
          out: outB,
          lse: lseB,
          ...c,
          design,
          subgroups,
        });
        const bwd = await attentionBackward(gpu, {
          q: qB,
          k: kB,
          v: vB,
          out: outB,
          lse: lseB,
          dOut: dOutB,
          dq: dqB,
          dk: dkB,
          dv: dvB,
          ...c,
          design,
          subgroups,
        });
        submitPass(gpu, [fwd, ...bwd]);
        const [out, lse, dq, dk, dv] = await Promise.all(
          [outB, lseB, dqB, dkB, dvB].map((b) => gpu.readF32(b)),
        );
        const f = ref.attentionForward(
          Float64Array.from(q),
          Float64Array.from(k),
          Float64Array.from(v),
          B,
          T,
          nH,
          nKV,
          hd,
        );
        assertClose(out, f.out, FWD_TOL, "out");
        assertClose(lse, f.lse, FWD_TOL, "lse");
        // The reference backward takes the GPU's out and lse, as the GPU model
        // does, so the check isolates the backward kernels.
        const g = ref.attentionBackward(
          Float64Array.from(dOut),
          Float64Array.from(q),
          Float64Array.from(k),
          Float64Array.from(v),
          Float64Array.from(out),
          Float64Array.from(lse),
          B,
          T,
          nH,
          nKV,
          hd,
        );
        assertClose(dq, g.dq, BWD_TOL, "dq");
        assertClose(dk, g.dk, BWD_TOL, "dk");
        assertClose(dv, g.dv, BWD_TOL, "dv");

        // Re-recording the same dispatches gives bitwise the same results (no
        // atomics, every output element has one owner).
        submitPass(gpu, [fwd, ...bwd]);
        assertEquals(await gpu.readF32(outB), out, "out rerun");
        assertEquals(await gpu.readF32(dkB), dk, "dk rerun");
        for (const b of [qB, kB, vB, outB, lseB, dOutB, dqB, dkB, dvB]) b.destroy();
      },
    });
  }
}

Deno.test({
  name: "attention forward with a KV cache: Tq queries at qPos0 over a cache of capacity kvStride",
  ...GPU_TEST,
  fn: async () => {
    // The cache holds Tk = qPos0 + Tq valid rows of kvStride; the result must
    // equal the last Tq rows of full causal attention over Tk tokens.
    const B = 2, nH = 4, nKV = 2, hd = 32, qPos0 = 37, Tq = 5, kvStride = 64;
    const Tk = qPos0 + Tq;
    const rng = new Rng(5);
    const qFull = randomF32(rng, B * Tk * nH * hd);
    const kFull = randomF32(rng, B * Tk * nKV * hd);
    const vFull = randomF32(rng, B * Tk * nKV * hd);
    const f = ref.attentionForward(
      Float64Array.from(qFull),
      Float64Array.from(kFull),
      Float64Array.from(vFull),
      B,
      Tk,
      nH,
      nKV,
      hd,
    );
    const q = new Float32Array(B * Tq * nH * hd);
    const kCache = randomF32(rng, B * kvStride * nKV * hd); // rows >= Tk are junk: never read
    const vCache = randomF32(rng, B * kvStride * nKV * hd);
    const outExp = new Float64Array(q.length);
    const lseExp = new Float64Array(B * nH * Tq);
    const rowQ = nH * hd, rowKV = nKV * hd;
    for (let b = 0; b < B; b++) {
      for (let t = 0; t < Tq; t++) {
        const src = (b * Tk + qPos0 + t) * rowQ;
        q.set(qFull.subarray(src, src + rowQ), (b * Tq + t) * rowQ);
        outExp.set(f.out.subarray(src, src + rowQ), (b * Tq + t) * rowQ);
        for (let h = 0; h < nH; h++) {
          lseExp[(b * nH + h) * Tq + t] = f.lse[(b * nH + h) * Tk + qPos0 + t];
        }
      }
      for (let j = 0; j < Tk; j++) {
        const src = (b * Tk + j) * rowKV;
        kCache.set(kFull.subarray(src, src + rowKV), (b * kvStride + j) * rowKV);
        vCache.set(vFull.subarray(src, src + rowKV), (b * kvStride + j) * rowKV);
      }
    }
    for (const design of ["tiled", "rows"] as AttentionDesign[]) {
      const qB = gpu.createBuffer(q, "q");
      const kB = gpu.createBuffer(kCache, "k cache");
      const vB = gpu.createBuffer(vCache, "v cache");
      const outB = gpu.createBuffer(q.length * 4, "out");
      const lseB = gpu.createBuffer(lseExp.length * 4, "lse");
      const fwd = await attentionForward(gpu, {
        q: qB,
        k: kB,
        v: vB,
        out: outB,
        lse: lseB,
        B,
        T: Tq,
        nH,
        nKV,
        hd,
        Tq,
        Tk,
        qPos0,
        kvStride,
        design,
      });
      submitPass(gpu, fwd);
      assertClose(await gpu.readF32(outB), outExp, FWD_TOL, `${design} out`);
      assertClose(await gpu.readF32(lseB), lseExp, FWD_TOL, `${design} lse`);
      for (const b of [qB, kB, vB, outB, lseB]) b.destroy();
    }
  },
});

Deno.test("attention tiles fit 16 KiB and 32 KiB of workgroup memory for head_dim 16..128", () => {
  for (const maxBytes of [16384, 32768]) {
    for (let hd = 16; hd <= 128; hd += 16) {
      for (const kind of ["forward", "dkv", "dq"] as const) {
        const t = attentionTiles(kind, hd, maxBytes);
        const what = `${kind} hd=${hd} ${maxBytes} bytes: ${JSON.stringify(t)}`;
        assert(t.BR % t.TR === 0 && t.BC % t.TC === 0 && hd % t.TC === 0, what);
        assert(t.BR >= 8 && t.BC >= 4, `tiles too small: ${what}`);
      }
    }
  }
});

Deno.test({
  name: "attention: destroy the shared device",
  ...GPU_TEST,
  fn: () => gpu.destroy(),
});
