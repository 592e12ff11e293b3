/**
 * Tests of `io/safetensors.ts`: float16 / bfloat16 conversion against
 * known values and a brute-force rounding reference, write/read round trips,
 * header padding and metadata, files from a "different writer", every
 * validation error, lazy reads, and a fuzz run over random and mutated files.
 */
import {
  bf16BitsToFloat,
  DTYPE_BYTES,
  f16BitsToFloat,
  floatToBf16Bits,
  floatToF16Bits,
  openSafetensors,
  parseSafetensorsBytes,
  readSafetensors,
  type SafetensorsFile,
  type TensorToWrite,
  writeSafetensors,
} from "../io/safetensors.ts";
import { UserError } from "../util/errors.ts";
import { Rng } from "../util/random.ts";
import { assert, assertEquals, assertRejects, assertStringIncludes } from "./assert.ts";

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);
function floatOfBits(bits: number): number {
  u32[0] = bits;
  return f32[0];
}
function bitsOfFloat(x: number): number {
  f32[0] = x;
  return u32[0];
}

// ---------------------------------------------------------------------------
// float16

Deno.test("f16: known encodings, both directions", () => {
  const cases: [number, number][] = [
    [0, 0x0000],
    [-0, 0x8000],
    [1, 0x3c00],
    [-2, 0xc000],
    [0.333251953125, 0x3555], // nearest half to 1/3
    [65504, 0x7bff], // largest finite
    [2 ** -14, 0x0400], // smallest normal
    [2 ** -24, 0x0001], // smallest subnormal
    [1023 * 2 ** -24, 0x03ff], // largest subnormal
    [Infinity, 0x7c00],
    [-Infinity, 0xfc00],
  ];
  for (const [x, h] of cases) {
    assertEquals(floatToF16Bits(x), h, `encode ${x}`);
    assert(Object.is(f16BitsToFloat(h), x), `decode 0x${h.toString(16)} -> ${f16BitsToFloat(h)}`);
  }
  // Rounding: to nearest, ties to even; overflow to infinity; underflow to signed zero.
  assertEquals(floatToF16Bits(1 / 3), 0x3555);
  assertEquals(floatToF16Bits(0.1), 0x2e66);
  assertEquals(floatToF16Bits(1 + 2 ** -11), 0x3c00, "tie rounds to even (down)");
  assertEquals(floatToF16Bits(1 + 3 * 2 ** -11), 0x3c02, "tie rounds to even (up)");
  assertEquals(floatToF16Bits(65519), 0x7bff, "just below the overflow threshold");
  assertEquals(floatToF16Bits(65520), 0x7c00, "65520 is the tie above 65504: rounds to inf");
  assertEquals(floatToF16Bits(1e9), 0x7c00);
  assertEquals(floatToF16Bits(2 ** -25), 0x0000, "half the smallest subnormal ties to 0");
  assertEquals(floatToF16Bits(1.5 * 2 ** -25), 0x0001);
  assertEquals(floatToF16Bits(-(2 ** -26)), 0x8000, "tiny negatives keep their sign");
  assertEquals(floatToF16Bits(1.5 * 2 ** -24), 0x0002, "subnormal tie to even");
  assertEquals(floatToF16Bits(1023.5 * 2 ** -24), 0x0400, "rounds up into the smallest normal");
  const nan = floatToF16Bits(NaN);
  assert((nan & 0x7c00) === 0x7c00 && (nan & 0x3ff) !== 0, "NaN stays NaN");
  assert(Number.isNaN(f16BitsToFloat(0x7e00)) && Number.isNaN(f16BitsToFloat(0xfc01)));
  assert(
    (floatToF16Bits(floatOfBits(0x7f800001)) & 0x3ff) !== 0,
    "a NaN with only low payload bits does not become infinity",
  );
});

Deno.test("f16: every half round-trips; random floats round to the nearest half, ties to even", () => {
  const finite: { v: number; h: number }[] = [];
  for (let h = 0; h < 0x10000; h++) {
    const v = f16BitsToFloat(h);
    if (Number.isNaN(v)) continue;
    assertEquals(floatToF16Bits(v), h, `round trip 0x${h.toString(16)}`);
    if (Number.isFinite(v) && !Object.is(v, -0)) finite.push({ v, h });
  }
  finite.sort((a, b) => a.v - b.v);
  // Reference rounding by search over every finite half.
  const reference = (x: number): number => {
    if (Math.abs(x) >= 65520) return x > 0 ? 0x7c00 : 0xfc00;
    let lo = 0;
    let hi = finite.length - 1;
    while (hi - lo > 1) {
      const mid = (lo + hi) >> 1;
      if (finite[mid].v <= x) lo = mid;
      else hi = mid;
    }
    const a = finite[lo];
    const b = finite[hi];
    const da = Math.abs(x - a.v);
    const db = Math.abs(x - b.v);
    let h = da < db ? a.h : db < da ? b.h : (a.h & 1) === 0 ? a.h : b.h;
    if ((h & 0x7fff) === 0) h = x < 0 || Object.is(x, -0) ? 0x8000 : 0; // zero keeps x's sign
    return h;
  };
  const rng = new Rng(7);
  for (let i = 0; i < 20000; i++) {
    // Float32s spread over the half range and its edges: random exponent, random mantissa.
    const e = rng.nextInt(46) - 30; // 2^-30 .. 2^15
    const x = Math.fround((rng.nextFloat() < 0.5 ? -1 : 1) * (1 + rng.nextFloat()) * 2 ** e);
    assertEquals(floatToF16Bits(x), reference(x), `x = ${x}`);
  }
  // Exact midpoints between neighbouring halves (ties) are float32s too.
  for (let k = 0; k + 1 < finite.length; k += 97) {
    const mid = (finite[k].v + finite[k + 1].v) / 2;
    if (Math.fround(mid) !== mid) continue;
    assertEquals(floatToF16Bits(mid), reference(mid), `tie ${mid}`);
  }
});

// ---------------------------------------------------------------------------
// bfloat16

Deno.test("bf16: known encodings, rounding and specials", () => {
  assertEquals(floatToBf16Bits(1), 0x3f80);
  assertEquals(floatToBf16Bits(-2), 0xc000);
  assertEquals(floatToBf16Bits(-0), 0x8000);
  assert(Object.is(bf16BitsToFloat(0x8000), -0), "-0 decodes to -0");
  assertEquals(floatToBf16Bits(Infinity), 0x7f80);
  assertEquals(floatToBf16Bits(-Infinity), 0xff80);
  assertEquals(floatToBf16Bits(1 / 3), 0x3eab); // 0x3eaaaaab rounds up
  // Ties to even, by bit pattern.
  assertEquals(floatToBf16Bits(floatOfBits(0x3f808000)), 0x3f80, "tie, even below");
  assertEquals(floatToBf16Bits(floatOfBits(0x3f818000)), 0x3f82, "tie, even above");
  assertEquals(floatToBf16Bits(floatOfBits(0x3f808001)), 0x3f81, "above the tie");
  assertEquals(floatToBf16Bits(floatOfBits(0x7f7fffff)), 0x7f80, "max float32 overflows to inf");
  assertEquals(floatToBf16Bits(floatOfBits(0x00008000)), 0x0000, "subnormal tie to even 0");
  assertEquals(floatToBf16Bits(floatOfBits(0x00018000)), 0x0002, "subnormal tie to even 2");
  assertEquals(bf16BitsToFloat(0x0001), 2 ** -133, "smallest bf16 subnormal");
  assertEquals(floatToBf16Bits(NaN) & 0x7fc0, 0x7fc0, "NaN is a quiet NaN");
  assertEquals(
    floatToBf16Bits(floatOfBits(0x7f800001)),
    0x7fc0,
    "signaling NaN does not become inf",
  );
  for (let b = 0; b < 0x10000; b++) {
    const v = bf16BitsToFloat(b);
    // NaN payloads do not survive a JS number (engines canonicalize them).
    if (Number.isNaN(v)) continue;
    assertEquals(bitsOfFloat(v) >>> 16, b, "decode is the top half");
    assertEquals(floatToBf16Bits(v), b, `round trip 0x${b.toString(16)}`);
  }
});

// ---------------------------------------------------------------------------
// Round trips, padding, metadata.

function tensorsOf(entries: [string, number[], number[]][]): Map<string, TensorToWrite> {
  return new Map(entries.map(([n, shape, v]) => [n, { shape, data: Float32Array.from(v) }]));
}

/** Reads the header length and JSON text of a safetensors file's bytes. */
function rawHeader(bytes: Uint8Array): { n: number; text: string } {
  const n = Number(new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true));
  return { n, text: new TextDecoder().decode(bytes.subarray(8, 8 + n)) };
}

Deno.test("write/read: F32 exact, F16/BF16 rounded, header padded, metadata kept", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const values = [0, -0, 1, -1.5, 0.1, 3.14159, 1e-6, -65504, 70000, 1e-8, Infinity, NaN];
    const tensors = tensorsOf([
      ["a.weight", [3, 4], values],
      ["b", [2], [7, -8]],
      ["scalar", [], [42]],
      ["empty", [0, 5], []],
    ]);
    for (const dtype of ["F32", "F16", "BF16"] as const) {
      const path = `${dir}/t-${dtype}.safetensors`;
      await writeSafetensors(path, tensors, { dtype, metadata: { format: "pt", note: "héllo" } });
      const bytes = await Deno.readFile(path);
      const { n, text } = rawHeader(bytes);
      assertEquals((8 + n) % 8, 0, `${dtype}: data starts 8-byte aligned`);
      assert(/^\{.*\} *$/.test(text), `${dtype}: header is JSON padded with spaces`);
      const f = await openSafetensors(path);
      try {
        assertEquals(f.metadata, { format: "pt", note: "héllo" });
        assertEquals([...f.tensors.keys()], ["a.weight", "b", "scalar", "empty"], "order kept");
        const a = await f.read("a.weight");
        assertEquals(a.dtype, dtype);
        assertEquals(a.shape, [3, 4]);
        const round = (x: number) =>
          dtype === "F32"
            ? Math.fround(x)
            : dtype === "F16"
            ? f16BitsToFloat(floatToF16Bits(x))
            : bf16BitsToFloat(floatToBf16Bits(x));
        for (let i = 0; i < values.length; i++) {
          const want = round(values[i]);
          assert(
            Object.is(a.data[i], want) || (Number.isNaN(a.data[i]) && Number.isNaN(want)),
            `${dtype}[${i}]: ${a.data[i]} vs ${want}`,
          );
        }
        assertEquals((await f.read("scalar")).data, Float32Array.of(42));
        const empty = await f.read("empty");
        assertEquals(empty.shape, [0, 5]);
        assertEquals(empty.data.length, 0);
        assertEquals(
          f.tensors.get("b")!.byteLength,
          2 * DTYPE_BYTES[dtype],
          `${dtype}: element size`,
        );
      } finally {
        f.close();
      }
    }
    const all = await readSafetensors(`${dir}/t-F32.safetensors`);
    assertEquals([...all.keys()], ["a.weight", "b", "scalar", "empty"]);
    assertEquals(all.get("b")!.data, Float32Array.of(7, -8));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** A file as another writer might lay it out: the header, then the data, no padding. */
function handcraft(header: unknown, data: Uint8Array): Uint8Array {
  const json = new TextEncoder().encode(JSON.stringify(header));
  const out = new Uint8Array(8 + json.length + data.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
  out.set(json, 8);
  out.set(data, 8 + json.length);
  return out;
}

Deno.test("read: a file from a different writer (unpadded, unsorted, gaps, every dtype)", async () => {
  // Data section, byte by byte, with gaps (0xee) between tensors.
  const data = new Uint8Array(64).fill(0xee);
  const dv = new DataView(data.buffer);
  dv.setUint16(1, 0x3c00, true); // f16 [1, -0]  @ [1, 5)  (odd offset: unaligned)
  dv.setUint16(3, 0x8000, true);
  dv.setUint16(8, 0x3f80, true); // bf16 [1, -2] @ [8, 12)
  dv.setUint16(10, 0xc000, true);
  dv.setInt32(16, -123456, true); // i32 @ [16, 20)
  dv.setBigInt64(24, -(2n ** 40n), true); // i64 @ [24, 32)
  data[33] = 200; // u8 @ [33, 34)
  data.set([0, 1, 1], 36); // bool @ [36, 39)
  dv.setFloat64(40, Math.PI, true); // f64 @ [40, 48)
  data[50] = 0x38; // F8_E4M3 1.0 @ [50, 51)
  data[51] = 0x3c; // F8_E5M2 1.0 @ [51, 52)
  const header = {
    // Deliberately not in offset order, no __metadata__.
    "int64": { dtype: "I64", shape: [1], data_offsets: [24, 32] },
    "half": { dtype: "F16", shape: [2], data_offsets: [1, 5] },
    "bool": { dtype: "BOOL", shape: [3], data_offsets: [36, 39] },
    "brain": { dtype: "BF16", shape: [1, 2], data_offsets: [8, 12] },
    "u8": { dtype: "U8", shape: [], data_offsets: [33, 34] },
    "i32": { dtype: "I32", shape: [1, 1], data_offsets: [16, 20], "extra_key": "ignored" },
    "f64": { dtype: "F64", shape: [1], data_offsets: [40, 48] },
    "e4m3": { dtype: "F8_E4M3", shape: [1], data_offsets: [50, 51] },
    "e5m2": { dtype: "F8_E5M2", shape: [1], data_offsets: [51, 52] },
    "none": { dtype: "F32", shape: [0], data_offsets: [52, 52] },
  };
  const bytes = handcraft(header, data);
  assert((bytes.length - data.length) % 8 !== 0, "the test header is unpadded");
  const f = await parseSafetensorsBytes(bytes, "other.safetensors");
  const got = async (n: string) => Array.from((await f.read(n)).data);
  assertEquals(await got("half"), [1, -0]);
  assert(Object.is((await f.read("half")).data[1], -0), "f16 -0");
  assertEquals(await got("brain"), [1, -2]);
  assertEquals(await got("i32"), [-123456]);
  assertEquals(await got("int64"), [-(2 ** 40)]);
  assertEquals(await got("u8"), [200]);
  assertEquals(await got("bool"), [0, 1, 1]);
  assertEquals(await got("f64"), [Math.fround(Math.PI)]);
  assertEquals(await got("e4m3"), [1]);
  assertEquals(await got("e5m2"), [1]);
  assertEquals(await got("none"), []);
  assertEquals(Array.from(await f.readBytes("int64")), Array.from(data.subarray(24, 32)));
  assertEquals(f.metadata, {});
});

// ---------------------------------------------------------------------------
// Validation errors.

const GOOD_ENTRY = { dtype: "F32", shape: [2], data_offsets: [0, 8] };

/** Header text (raw, so that invalid JSON can be written) plus `dataBytes` zero bytes. */
function rawFile(headerText: string, dataBytes = 8, lengthField?: bigint): Uint8Array {
  const json = new TextEncoder().encode(headerText);
  const out = new Uint8Array(8 + json.length + dataBytes);
  new DataView(out.buffer).setBigUint64(0, lengthField ?? BigInt(json.length), true);
  out.set(json, 8);
  return out;
}

async function assertInvalid(bytes: Uint8Array, part: string): Promise<void> {
  const err = await assertRejects(() => parseSafetensorsBytes(bytes, "bad.safetensors"), UserError);
  assertStringIncludes(err.message, "bad.safetensors");
  assertStringIncludes(err.message, part);
}

Deno.test("read: every malformed header is a UserError naming the file and problem", async () => {
  const h = (obj: unknown, data = 8) => rawFile(JSON.stringify(obj), data);
  await assertInvalid(new Uint8Array(5), "shorter than the 8-byte header length");
  await assertInvalid(rawFile("{}", 0, 1000n), "only 2 follow");
  await assertInvalid(rawFile("{}", 0, 2n ** 63n), "exceeds the 100000000-byte limit");
  await assertInvalid(h({ a: "" }), 'tensor "a" is "", not an object');
  const badUtf8 = rawFile('{"a":1}');
  badUtf8[10] = 0xff;
  await assertInvalid(badUtf8, "not valid UTF-8");
  await assertInvalid(rawFile('{"a": {"dtype": "F32",}}'), "not valid JSON");
  await assertInvalid(rawFile("{"), "not valid JSON");
  await assertInvalid(rawFile('{"a": 1} x'), "unexpected text after");
  await assertInvalid(rawFile("[".repeat(100) + "]".repeat(100)), "nesting deeper");
  await assertInvalid(h([1, 2]), "the header is a list, not a JSON object");
  await assertInvalid(h("x"), "not a JSON object");
  await assertInvalid(h({ a: [1] }), 'tensor "a" is a list, not an object');
  await assertInvalid(h({ a: { ...GOOD_ENTRY, dtype: "F128" } }), 'dtype "F128"');
  await assertInvalid(h({ a: { ...GOOD_ENTRY, dtype: undefined } }), "dtype missing");
  await assertInvalid(h({ a: { ...GOOD_ENTRY, shape: [-2] } }), "list of non-negative integers");
  await assertInvalid(h({ a: { ...GOOD_ENTRY, shape: [1.5] } }), "list of non-negative integers");
  await assertInvalid(h({ a: { ...GOOD_ENTRY, shape: "2" } }), "list of non-negative integers");
  await assertInvalid(h({ a: { ...GOOD_ENTRY, data_offsets: [0] } }), "two non-negative integers");
  await assertInvalid(h({ a: { ...GOOD_ENTRY, data_offsets: [0, "8"] } }), "two non-negative");
  await assertInvalid(h({ a: { ...GOOD_ENTRY, data_offsets: [8, 0] } }), "begin > end");
  await assertInvalid(
    h({ a: { ...GOOD_ENTRY, data_offsets: [4, 12] } }),
    "beyond the data section",
  );
  await assertInvalid(h({ a: { ...GOOD_ENTRY, shape: [3] } }), "needs 12 bytes");
  await assertInvalid(
    h({ a: { ...GOOD_ENTRY, shape: [2 ** 40, 2 ** 40, 2 ** 40] } }),
    "needs 5316911983139663491615228241121378304 bytes", // 2^120 elements x 4 bytes,
  );
  await assertInvalid(
    h({ a: GOOD_ENTRY, b: { dtype: "F32", shape: [1], data_offsets: [4, 8] } }),
    'tensors "a" [0,8] and "b" [4,8] overlap',
  );
  await assertInvalid(
    rawFile('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {}}'),
    'duplicate key "a"',
  );
  await assertInvalid(
    rawFile('{"a": {"dtype": "F32", "dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}'),
    'duplicate key "dtype"',
  );
  await assertInvalid(h({ __metadata__: { format: 1 } }), '__metadata__ value of "format"');
  await assertInvalid(h({ __metadata__: "pt" }), "__metadata__ is");
  // Not errors: zero-size tensors may share an offset; "__proto__" is just a name.
  // (Raw text: an object literal's __proto__ key would set a prototype, not a key.)
  const ok = await parseSafetensorsBytes(
    rawFile(
      '{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},' +
        ' "z1": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},' +
        ' "__proto__": {"dtype": "U8", "shape": [0], "data_offsets": [8, 8]},' +
        ' "__metadata__": {"__proto__": "x"}}',
    ),
    "ok",
  );
  assertEquals([...ok.tensors.keys()].sort(), ["__proto__", "a", "z1"]);
  assertEquals(Object.keys(ok.metadata), ["__proto__"]);
  await assertRejects(() => ok.read("missing"), UserError, 'no tensor named "missing"');
});

Deno.test("read: lazy, one tensor's bytes at a time; a file truncated after opening", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const path = `${dir}/lazy.safetensors`;
    await writeSafetensors(path, tensorsOf([["x", [2], [1, 2]], ["y", [2], [3, 4]]]));
    const f = await openSafetensors(path);
    try {
      // Rewrite y's bytes on disk after the header was read: a lazy reader sees them.
      const y = f.tensors.get("y")!;
      const file = await Deno.open(path, { write: true });
      await file.seek(y.fileOffset, Deno.SeekMode.Start);
      await file.write(new Uint8Array(Float32Array.of(30, 40).buffer));
      file.close();
      assertEquals((await f.read("x")).data, Float32Array.of(1, 2));
      assertEquals((await f.read("y")).data, Float32Array.of(30, 40));
      await Deno.truncate(path, y.fileOffset + 4);
      await assertRejects(() => f.read("y"), UserError, "truncated or changed while open");
    } finally {
      f.close();
    }
    await assertRejects(
      () => openSafetensors(`${dir}/nope.safetensors`),
      UserError,
      "no such file",
    );
    await assertRejects(() => openSafetensors(dir), UserError, "not a regular file");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---------------------------------------------------------------------------
// Fuzz.

/** Parses `bytes`; on success every tensor lies inside the file and reads to its size. */
async function parseOrUserError(
  bytes: Uint8Array,
  open: (b: Uint8Array) => Promise<SafetensorsFile>,
): Promise<"ok" | "error"> {
  let f: SafetensorsFile;
  try {
    f = await open(bytes);
  } catch (e) {
    if (e instanceof UserError) return "error";
    throw new Error(`not a UserError: ${e}`, { cause: e });
  }
  try {
    const dataStart = 8 +
      Number(new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true));
    for (const t of f.tensors.values()) {
      assert(t.fileOffset >= dataStart, `${t.name} starts inside the header`);
      assert(t.fileOffset + t.byteLength <= bytes.length, `${t.name} ends beyond the file`);
      assertEquals(t.size * DTYPE_BYTES[t.dtype], t.byteLength, `${t.name} size`);
      const r = await f.read(t.name);
      assertEquals(r.data.length, t.size, `${t.name} read length`);
    }
  } finally {
    f.close();
  }
  return "ok";
}

function validFileBytes(): Uint8Array {
  const data = new Uint8Array(40);
  for (let i = 0; i < data.length; i++) data[i] = (i * 37) & 0xff;
  return handcraft({
    __metadata__: { format: "pt" },
    "model.w": { dtype: "F32", shape: [2, 2], data_offsets: [0, 16] },
    "model.h": { dtype: "F16", shape: [3], data_offsets: [16, 22] },
    "model.b": { dtype: "BF16", shape: [1, 3], data_offsets: [24, 30] },
    "ids": { dtype: "I64", shape: [1], data_offsets: [32, 40] },
  }, data);
}

function mutate(base: Uint8Array, rng: Rng): Uint8Array {
  const headerEnd = Math.min(base.length, 8 + rawHeader(base).n);
  const kind = rng.nextInt(5);
  if (kind === 0) {
    // Bit flips, mostly in the length field and header where parsing happens.
    const out = base.slice();
    for (let k = 1 + rng.nextInt(4); k > 0; k--) {
      const at = rng.nextFloat() < 0.85 ? rng.nextInt(headerEnd) : rng.nextInt(out.length);
      out[at] ^= 1 << rng.nextInt(8);
    }
    return out;
  }
  if (kind === 1) return base.slice(0, rng.nextInt(base.length)); // truncation
  // Header edits: change text and write a consistent length field (so the
  // edit reaches the JSON checks rather than the length check).
  let text = rawHeader(base).text;
  const data = base.subarray(headerEnd);
  if (kind === 2) {
    // Replace a number with another (offsets, shapes).
    const nums = [...text.matchAll(/\d+/g)];
    const m = nums[rng.nextInt(nums.length)];
    const choices = [
      "0",
      "1",
      "7",
      "8",
      "16",
      "24",
      "40",
      "41",
      "999999999999",
      "-1",
      "1.5",
      "1e3",
    ];
    const rep = choices[rng.nextInt(choices.length)];
    text = text.slice(0, m.index!) + rep + text.slice(m.index! + m[0].length);
  } else if (kind === 3) {
    // Swap a dtype or a key.
    const words = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "XX", "model.w", "shape"];
    const strs = [...text.matchAll(/"[^"]*"/g)];
    const m = strs[rng.nextInt(strs.length)];
    text = text.slice(0, m.index!) + JSON.stringify(words[rng.nextInt(words.length)]) +
      text.slice(m.index! + m[0].length);
  } else {
    // Delete or insert a structural character.
    const at = rng.nextInt(text.length);
    const chars = ["{", "}", "[", "]", ",", ":", '"', " ", "\\", "\u0001"];
    text = rng.nextFloat() < 0.5
      ? text.slice(0, at) + text.slice(at + 1)
      : text.slice(0, at) + chars[rng.nextInt(chars.length)] + text.slice(at);
  }
  const json = new TextEncoder().encode(text);
  const out = new Uint8Array(8 + json.length + data.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
  out.set(json, 8);
  out.set(data, 8 + json.length);
  return out;
}

Deno.test("fuzz: random bytes and mutated files parse in bounds or fail with a UserError", async () => {
  const rng = new Rng(2024);
  const inMemory = (b: Uint8Array) => parseSafetensorsBytes(b, "fuzz.safetensors");
  const counts = { ok: 0, error: 0 };
  // Random bytes; half of them with a small, plausible header length.
  for (let i = 0; i < 300; i++) {
    const b = new Uint8Array(rng.nextInt(120));
    for (let k = 0; k < b.length; k++) b[k] = rng.nextInt(256);
    if (b.length >= 8 && i % 2 === 0) {
      new DataView(b.buffer).setBigUint64(0, BigInt(rng.nextInt(b.length - 7)), true);
    }
    counts[await parseOrUserError(b, inMemory)]++;
  }
  const base = validFileBytes();
  assertEquals(await parseOrUserError(base, inMemory), "ok");
  for (let i = 0; i < 3000; i++) counts[await parseOrUserError(mutate(base, rng), inMemory)]++;
  // Some mutations must survive (e.g. a flipped data byte) and most must not:
  // a fuzzer that only ever hits one outcome tests nothing.
  assert(counts.ok > 50 && counts.error > 1000, `outcomes ${JSON.stringify(counts)}`);
  // The file path (seek + read) on a sample of the same mutations.
  const dir = await Deno.makeTempDir();
  try {
    const path = `${dir}/fuzz.safetensors`;
    const onDisk = async (b: Uint8Array) => {
      await Deno.writeFile(path, b);
      return await openSafetensors(path);
    };
    for (let i = 0; i < 100; i++) await parseOrUserError(mutate(base, rng), onDisk);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
