/**
 * Reader and writer of the safetensors format (Hugging Face's tensor file).
 *
 * Layout: an unsigned 64-bit little-endian header length `N`; `N` bytes of
 * UTF-8 JSON, `{name: {dtype, shape, data_offsets: [begin, end]}, ...}` with an
 * optional `"__metadata__": {string: string}`; then the data. `data_offsets`
 * are relative to the first data byte, `end` exclusive, row-major, little
 * endian.
 *
 * The reader is built for untrusted files (downloaded from anywhere): every
 * field is checked before it is used, nothing is read outside the file, and
 * every problem is a `UserError` that names the file and the problem. It is
 * lazy: `openSafetensors` reads only the header, `read(name)` only that
 * tensor's bytes, so a multi-GB file need not fit in memory.
 *
 * Tolerated, because other writers produce them: an unpadded header, tensors
 * in any order, gaps between tensors, unused bytes after the last one, unknown
 * keys inside a tensor entry. Rejected: overlapping tensors, duplicate names
 * (at any JSON level), anything out of range.
 *
 * @module
 */

import { UserError } from "../util/errors.ts";
import { bufferSource, type ByteSource, fileSource } from "./byte_source.ts";

/** Every dtype of the safetensors specification. */
export type SafetensorsDtype =
  | "BOOL"
  | "U8"
  | "I8"
  | "F8_E4M3"
  | "F8_E5M2"
  | "I16"
  | "U16"
  | "F16"
  | "BF16"
  | "I32"
  | "U32"
  | "F32"
  | "F64"
  | "I64"
  | "U64";

/** Bytes per element of each dtype. */
export const DTYPE_BYTES: Readonly<Record<SafetensorsDtype, number>> = {
  BOOL: 1,
  U8: 1,
  I8: 1,
  F8_E4M3: 1,
  F8_E5M2: 1,
  I16: 2,
  U16: 2,
  F16: 2,
  BF16: 2,
  I32: 4,
  U32: 4,
  F32: 4,
  F64: 8,
  I64: 8,
  U64: 8,
};

/** The floating-point dtypes this project writes. */
export type WriteDtype = "F32" | "F16" | "BF16";

/** One tensor's header entry, with offsets made absolute. */
export interface TensorInfo {
  /** Tensor name, the header key. */
  name: string;
  /** Element type stored in the file. */
  dtype: SafetensorsDtype;
  /** Row-major shape; `[]` for a scalar. */
  shape: number[];
  /** Number of elements (product of `shape`; 1 for a scalar `[]`). */
  size: number;
  /** `data_offsets` as written in the header (relative to the data section). */
  dataOffsets: [number, number];
  /** Absolute byte offset of the first byte in the file. */
  fileOffset: number;
  /** Bytes of the tensor's data (`dataOffsets[1] - dataOffsets[0]`). */
  byteLength: number;
}

/** A tensor converted to float32. */
export interface Float32Tensor {
  /** Element type the tensor had in the file, before conversion. */
  dtype: SafetensorsDtype;
  /** Row-major shape; `[]` for a scalar. */
  shape: number[];
  /** The values, row-major, `product(shape)` elements. */
  data: Float32Array;
}

/** An opened safetensors file: the parsed header, tensors read on demand. */
export interface SafetensorsFile {
  /** The file's path (or the name given to `parseSafetensorsBytes`), used in messages. */
  readonly path: string;
  /** Total size in bytes. */
  readonly byteLength: number;
  /** The tensors, in header order. */
  readonly tensors: ReadonlyMap<string, TensorInfo>;
  /** `__metadata__` (empty when absent). */
  readonly metadata: Readonly<Record<string, string>>;
  /** Reads one tensor and converts it to float32 (integers and bools become their values). */
  read(name: string): Promise<Float32Tensor>;
  /** Reads one tensor's raw little-endian bytes (exact for any dtype). */
  readBytes(name: string): Promise<Uint8Array>;
  /** Closes the file; further reads fail. */
  close(): void;
}

/**
 * The largest header we accept: 100 MB, the limit of the reference Rust
 * implementation. Real headers are kilobytes (about 100 bytes per tensor); a
 * larger length field means a corrupt or hostile file, and we refuse to
 * allocate for it.
 */
export const MAX_HEADER_BYTES = 100_000_000;

const LITTLE_ENDIAN_HOST = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

// ---------------------------------------------------------------------------
// Float conversions (bit-exact, round-to-nearest-even on narrowing).

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

/** The float32 value of IEEE binary16 bits `h` (exact: every half is a float32). */
export function f16BitsToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24; // zero and subnormals: mant * 2^-24
  if (exp === 0x1f) return mant ? NaN : sign * Infinity;
  return sign * (1024 + mant) * 2 ** (exp - 25); // (1 + mant/1024) * 2^(exp-15)
}

/**
 * IEEE binary16 bits of the float32 nearest to `x`, rounding to nearest even.
 * Overflow (|x| >= 65520) gives infinity, values below half the smallest
 * subnormal (2^-25) give a signed zero, NaN stays a quiet NaN.
 */
export function floatToF16Bits(x: number): number {
  f32Scratch[0] = x;
  const bits = u32Scratch[0];
  const sign = (bits >>> 16) & 0x8000;
  const exp = (bits >>> 23) & 0xff;
  const mant = bits & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 | (mant >>> 13) : 0);
  const he = exp - 127 + 15; // the half's biased exponent
  if (he >= 0x1f) return sign | 0x7c00;
  if (he <= 0) {
    if (he < -10) return sign; // |x| < 2^-25: rounds to zero (2^-25 itself is a tie to even 0)
    // Subnormal half: value = m * 2^(e - 23) with e = he - 15, in units of
    // 2^-24 that is m * 2^(he - 14), i.e. m >> (14 - he), rounded.
    const m = mant | 0x800000;
    const shift = 14 - he;
    let half = m >>> shift;
    const rem = m & ((1 << shift) - 1);
    const halfway = 1 << (shift - 1);
    if (rem > halfway || (rem === halfway && (half & 1))) half++; // a carry into 0x400 is the smallest normal
    return sign | half;
  }
  let half = (he << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (half & 1))) half++; // a carry may step into the next exponent or inf
  return sign | Math.min(half, 0x7c00);
}

/** The float32 value of bfloat16 bits (the top half of a float32). */
export function bf16BitsToFloat(b: number): number {
  u32Scratch[0] = (b & 0xffff) << 16;
  return f32Scratch[0];
}

/** bfloat16 bits of the float32 nearest to `x`, rounding to nearest even; NaN stays a quiet NaN. */
export function floatToBf16Bits(x: number): number {
  f32Scratch[0] = x;
  const bits = u32Scratch[0];
  if ((bits & 0x7fffffff) > 0x7f800000) return (bits >>> 16) | 0x40;
  // Adding 0x7fff plus the lowest kept bit rounds the dropped 16 bits to
  // nearest, ties to even; the sum stays below 2^32 for every non-NaN input.
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) / 65536) >>> 0;
}

let f16Table: Float32Array | undefined;
function f16ToFloatTable(): Float32Array {
  if (!f16Table) {
    f16Table = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) f16Table[h] = f16BitsToFloat(h);
  }
  return f16Table;
}

/** OCP FP8 E4M3 ("fn" variant): bias 7, no infinities, S.1111.111 is NaN. */
function e4m3ToFloat(b: number): number {
  const sign = b & 0x80 ? -1 : 1;
  const exp = (b >>> 3) & 0xf;
  const mant = b & 7;
  if (exp === 0xf && mant === 7) return NaN;
  if (exp === 0) return sign * mant * 2 ** -9;
  return sign * (8 + mant) * 2 ** (exp - 10);
}

// ---------------------------------------------------------------------------
// Byte order and conversion to float32.

/**
 * `bytes` as a host-order view that typed arrays of `elemBytes` can use: copied
 * when unaligned, on a shared buffer, or (big-endian hosts) to swap bytes.
 */
function hostOrder(bytes: Uint8Array, elemBytes: number): Uint8Array<ArrayBuffer> {
  let out: Uint8Array<ArrayBuffer>;
  if (bytes.byteOffset % elemBytes === 0 && bytes.buffer instanceof ArrayBuffer) {
    out = bytes as Uint8Array<ArrayBuffer>;
  } else {
    out = bytes.slice() as Uint8Array<ArrayBuffer>;
  }
  if (!LITTLE_ENDIAN_HOST && elemBytes > 1) {
    if (out === bytes) out = bytes.slice() as Uint8Array<ArrayBuffer>;
    for (let i = 0; i < out.length; i += elemBytes) out.subarray(i, i + elemBytes).reverse();
  }
  return out;
}

/** A typed array of `Ctor` over `bytes` in host order. */
function view<T>(
  Ctor: new (buffer: ArrayBuffer, byteOffset: number, length: number) => T,
  elemBytes: number,
  bytes: Uint8Array,
): T {
  const b = hostOrder(bytes, elemBytes);
  return new Ctor(b.buffer, b.byteOffset, b.length / elemBytes);
}

/**
 * Converts raw little-endian tensor bytes of `dtype` to float32. Integers wider
 * than 24 bits round to the nearest float32; use `readBytes` where exactness
 * matters.
 */
export function bytesToFloat32(dtype: SafetensorsDtype, bytes: Uint8Array): Float32Array {
  const n = bytes.length / DTYPE_BYTES[dtype];
  switch (dtype) {
    case "F32":
      return view(Float32Array, 4, bytes);
    case "F16": {
      const table = f16ToFloatTable();
      const src = view(Uint16Array, 2, bytes);
      const out = new Float32Array(n);
      for (let i = 0; i < n; i++) out[i] = table[src[i]];
      return out;
    }
    case "BF16": {
      const src = view(Uint16Array, 2, bytes);
      const out = new Float32Array(n);
      const bits = new Uint32Array(out.buffer);
      for (let i = 0; i < n; i++) bits[i] = src[i] << 16;
      return out;
    }
    case "F64":
      return Float32Array.from(view(Float64Array, 8, bytes));
    case "I64":
      return Float32Array.from(view(BigInt64Array, 8, bytes), Number);
    case "U64":
      return Float32Array.from(view(BigUint64Array, 8, bytes), Number);
    case "I32":
      return Float32Array.from(view(Int32Array, 4, bytes));
    case "U32":
      return Float32Array.from(view(Uint32Array, 4, bytes));
    case "I16":
      return Float32Array.from(view(Int16Array, 2, bytes));
    case "U16":
      return Float32Array.from(view(Uint16Array, 2, bytes));
    case "I8":
      return Float32Array.from(new Int8Array(bytes.buffer, bytes.byteOffset, n));
    case "U8":
      return Float32Array.from(bytes);
    case "BOOL":
      return Float32Array.from(bytes, (b) => (b ? 1 : 0));
    case "F8_E5M2": {
      // E5M2 is the top byte of a binary16.
      const table = f16ToFloatTable();
      return Float32Array.from(bytes, (b) => table[b << 8]);
    }
    case "F8_E4M3":
      return Float32Array.from(bytes, e4m3ToFloat);
  }
}

/** Little-endian bytes of `data` in `dtype` (a fresh buffer, or a view of `data` for F32 on little-endian hosts). */
export function float32ToBytes(dtype: WriteDtype, data: Float32Array): Uint8Array {
  if (dtype === "F32") {
    if (LITTLE_ENDIAN_HOST) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    const out = new Uint8Array(data.length * 4);
    const view = new DataView(out.buffer);
    for (let i = 0; i < data.length; i++) view.setFloat32(4 * i, data[i], true);
    return out;
  }
  const toBits = dtype === "F16" ? floatToF16Bits : floatToBf16Bits;
  const out = new Uint8Array(data.length * 2);
  for (let i = 0; i < data.length; i++) {
    const b = toBits(data[i]);
    out[2 * i] = b & 0xff;
    out[2 * i + 1] = b >>> 8;
  }
  return out;
}

// ---------------------------------------------------------------------------
// A strict JSON parser. `JSON.parse` silently keeps the last of duplicate keys
// (and treats "__proto__" specially), so a header could name one tensor twice
// and be read differently by different tools; this parser rejects duplicates
// at every level and returns objects as Maps in file order.

type Json = null | boolean | number | string | Json[] | Map<string, Json>;

class JsonSyntaxError extends Error {}

const MAX_JSON_DEPTH = 64;
const NUMBER_RE = /-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?/y;

function parseStrictJson(text: string): Json {
  let i = 0;
  const fail = (what: string): never => {
    const near = JSON.stringify(text.slice(i, i + 20));
    throw new JsonSyntaxError(`${what} at character ${i} (near ${near})`);
  };
  const skipWs = () => {
    while (i < text.length) {
      const c = text.charCodeAt(i);
      if (c !== 0x20 && c !== 0x0a && c !== 0x0d && c !== 0x09) break;
      i++;
    }
  };
  const parseString = (): string => {
    const start = i;
    i++; // opening quote
    for (;;) {
      if (i >= text.length) fail("unterminated string");
      const c = text.charCodeAt(i);
      if (c === 0x22) break;
      if (c < 0x20) fail("control character in string");
      i += c === 0x5c ? 2 : 1;
    }
    i++;
    try {
      return JSON.parse(text.slice(start, i)); // decodes (and validates) the escapes
    } catch {
      i = start;
      return fail("invalid escape in string");
    }
  };
  const parseValue = (depth: number): Json => {
    if (depth > MAX_JSON_DEPTH) fail(`nesting deeper than ${MAX_JSON_DEPTH}`);
    skipWs();
    const c = text[i];
    if (c === "{") {
      i++;
      const obj = new Map<string, Json>();
      skipWs();
      if (text[i] === "}") {
        i++;
        return obj;
      }
      for (;;) {
        skipWs();
        if (text[i] !== '"') fail("expected a string key");
        const keyAt = i;
        const key = parseString();
        if (obj.has(key)) {
          i = keyAt;
          fail(`duplicate key ${JSON.stringify(key)}`);
        }
        skipWs();
        if (text[i] !== ":") fail("expected ':'");
        i++;
        obj.set(key, parseValue(depth + 1));
        skipWs();
        if (text[i] === ",") {
          i++;
          continue;
        }
        if (text[i] === "}") {
          i++;
          return obj;
        }
        fail("expected ',' or '}'");
      }
    }
    if (c === "[") {
      i++;
      const arr: Json[] = [];
      skipWs();
      if (text[i] === "]") {
        i++;
        return arr;
      }
      for (;;) {
        arr.push(parseValue(depth + 1));
        skipWs();
        if (text[i] === ",") {
          i++;
          continue;
        }
        if (text[i] === "]") {
          i++;
          return arr;
        }
        fail("expected ',' or ']'");
      }
    }
    if (c === '"') return parseString();
    for (const [word, value] of [["true", true], ["false", false], ["null", null]] as const) {
      if (text.startsWith(word, i)) {
        i += word.length;
        return value;
      }
    }
    NUMBER_RE.lastIndex = i;
    const m = NUMBER_RE.exec(text);
    if (m) {
      i += m[0].length;
      return Number(m[0]);
    }
    return fail(i >= text.length ? "unexpected end" : "unexpected character");
  };
  const value = parseValue(0);
  skipWs();
  if (i < text.length) fail("unexpected text after the JSON value");
  return value;
}

function describeJson(v: Json): string {
  if (v instanceof Map) return "an object";
  if (Array.isArray(v)) return "a list";
  return JSON.stringify(v);
}

// ---------------------------------------------------------------------------
// Header validation.

interface ParsedHeader {
  tensors: Map<string, TensorInfo>;
  metadata: Record<string, string>;
}

function isDtype(s: string): s is SafetensorsDtype {
  return Object.hasOwn(DTYPE_BYTES, s);
}

/** Validates a parsed header against the file size; throws a `UserError` naming `path` and the problem. */
function validateHeader(
  path: string,
  json: Json,
  dataStart: number,
  fileSize: number,
): ParsedHeader {
  const fail = (msg: string): never => {
    throw new UserError(`${path}: not a valid safetensors file: ${msg}`);
  };
  if (!(json instanceof Map)) return fail(`the header is ${describeJson(json)}, not a JSON object`);
  const dataSize = fileSize - dataStart;
  const tensors = new Map<string, TensorInfo>();
  const metadata: Record<string, string> = {};
  for (const [name, entry] of json) {
    if (name === "__metadata__") {
      if (!(entry instanceof Map)) fail(`__metadata__ is ${describeJson(entry)}, not an object`);
      for (const [k, v] of entry as Map<string, Json>) {
        if (typeof v !== "string") {
          fail(`__metadata__ value of ${JSON.stringify(k)} is ${describeJson(v)}, not a string`);
        }
        // defineProperty: a key "__proto__" must be a plain entry, not a prototype change.
        Object.defineProperty(metadata, k, {
          value: v,
          enumerable: true,
          writable: true,
          configurable: true,
        });
      }
      continue;
    }
    const where = `tensor ${JSON.stringify(name)}`;
    if (!(entry instanceof Map)) return fail(`${where} is ${describeJson(entry)}, not an object`);
    const dtype = entry.get("dtype");
    if (typeof dtype !== "string" || !isDtype(dtype)) {
      return fail(
        `${where} has dtype ${
          dtype === undefined ? "missing" : describeJson(dtype)
        }; known dtypes: ${Object.keys(DTYPE_BYTES).join(", ")}`,
      );
    }
    const shape = entry.get("shape");
    if (
      !Array.isArray(shape) ||
      !shape.every((d) => typeof d === "number" && Number.isSafeInteger(d) && d >= 0)
    ) {
      return fail(
        `${where} has shape ${
          shape === undefined ? "missing" : describeJson(shape)
        }; expected a list of non-negative integers`,
      );
    }
    const offsets = entry.get("data_offsets");
    if (
      !Array.isArray(offsets) || offsets.length !== 2 ||
      !offsets.every((d) => typeof d === "number" && Number.isSafeInteger(d) && d >= 0)
    ) {
      return fail(
        `${where} has data_offsets ${
          offsets === undefined ? "missing" : describeJson(offsets)
        }; expected [begin, end], two non-negative integers`,
      );
    }
    const [begin, end] = offsets as number[];
    if (begin > end) fail(`${where} has data_offsets [${begin}, ${end}] with begin > end`);
    if (end > dataSize) {
      fail(
        `${where} has data_offsets [${begin}, ${end}] beyond the data section (${dataSize} bytes): the file is truncated or corrupt`,
      );
    }
    const dims = shape as number[];
    // BigInt: a hostile shape's product may exceed 2^53.
    const elems = dims.reduce((a, d) => a * BigInt(d), 1n);
    const needed = elems * BigInt(DTYPE_BYTES[dtype]);
    if (needed !== BigInt(end - begin)) {
      fail(
        `${where} is ${dtype} with shape [${
          dims.join(", ")
        }], which needs ${needed} bytes, but data_offsets [${begin}, ${end}] hold ${end - begin}`,
      );
    }
    tensors.set(name, {
      name,
      dtype,
      shape: dims.slice(),
      size: Number(elems),
      dataOffsets: [begin, end],
      fileOffset: dataStart + begin,
      byteLength: end - begin,
    });
  }
  // Overlap: with non-empty ranges sorted by begin, each must start at or after
  // the previous one's end.
  const ranges = [...tensors.values()].filter((t) => t.byteLength > 0)
    .sort((a, b) => a.dataOffsets[0] - b.dataOffsets[0]);
  for (let k = 1; k < ranges.length; k++) {
    const prev = ranges[k - 1];
    const cur = ranges[k];
    if (cur.dataOffsets[0] < prev.dataOffsets[1]) {
      fail(
        `tensors ${JSON.stringify(prev.name)} [${prev.dataOffsets}] and ${
          JSON.stringify(cur.name)
        } [${cur.dataOffsets}] overlap`,
      );
    }
  }
  return { tensors, metadata };
}

// ---------------------------------------------------------------------------
// Opening.

async function openSource(path: string, src: ByteSource): Promise<SafetensorsFile> {
  const fail = (msg: string): never => {
    throw new UserError(`${path}: not a valid safetensors file: ${msg}`);
  };
  let parsed: ParsedHeader;
  try {
    if (src.size < 8) fail(`it is ${src.size} bytes, shorter than the 8-byte header length`);
    const lenBytes = await src.readAt(0, 8);
    const headerLen = new DataView(lenBytes.buffer, lenBytes.byteOffset, 8).getBigUint64(0, true);
    if (headerLen > BigInt(MAX_HEADER_BYTES)) {
      fail(`the header length ${headerLen} exceeds the ${MAX_HEADER_BYTES}-byte limit`);
    }
    if (headerLen > BigInt(src.size - 8)) {
      fail(`the header length field says ${headerLen} bytes but only ${src.size - 8} follow it`);
    }
    const n = Number(headerLen);
    const headerBytes = await src.readAt(8, n);
    let text = "";
    try {
      text = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(headerBytes);
    } catch {
      fail("the header is not valid UTF-8");
    }
    let json: Json = null;
    try {
      json = parseStrictJson(text);
    } catch (e) {
      if (!(e instanceof JsonSyntaxError)) throw e;
      fail(`the header is not valid JSON: ${e.message}`);
    }
    parsed = validateHeader(path, json, 8 + n, src.size);
  } catch (e) {
    src.close();
    throw e;
  }
  const info = (name: string): TensorInfo => {
    const t = parsed.tensors.get(name);
    if (!t) throw new UserError(`${path}: no tensor named ${JSON.stringify(name)}`);
    return t;
  };
  const readBytes = (name: string): Promise<Uint8Array> => {
    const t = info(name);
    return src.readAt(t.fileOffset, t.byteLength);
  };
  return {
    path,
    byteLength: src.size,
    tensors: parsed.tensors,
    metadata: parsed.metadata,
    readBytes,
    read: async (name) => {
      const t = info(name);
      const bytes = await readBytes(name);
      return { dtype: t.dtype, shape: t.shape.slice(), data: bytesToFloat32(t.dtype, bytes) };
    },
    close: () => src.close(),
  };
}

/**
 * Opens a safetensors file and validates its header; tensors are read on
 * demand. Close it when done.
 *
 * @example
 * ```ts
 * import { openSafetensors, writeSafetensors } from "./safetensors.ts";
 * const tmp = await Deno.makeTempDir();
 * const path = `${tmp}/w.safetensors`;
 * const w = { shape: [2, 2], data: Float32Array.of(1, 2, 3, 4) };
 * await writeSafetensors(path, new Map([["w", w]]), { dtype: "BF16", metadata: { format: "pt" } });
 * const f = await openSafetensors(path);
 * try {
 *   const t = await f.read("w"); // only these 8 bytes are read
 *   if (t.dtype !== "BF16" || t.data[3] !== 4) throw new Error("read back");
 * } finally {
 *   f.close();
 *   await Deno.remove(tmp, { recursive: true });
 * }
 * ```
 */
export async function openSafetensors(path: string): Promise<SafetensorsFile> {
  return await openSource(path, await fileSource(path));
}

/**
 * The same as `openSafetensors` over bytes already in memory; `name` stands
 * for the file in error messages.
 */
export function parseSafetensorsBytes(bytes: Uint8Array, name: string): Promise<SafetensorsFile> {
  return openSource(name, bufferSource(bytes));
}

/** Reads every tensor of a file, converted to float32, in header order. */
export async function readSafetensors(path: string): Promise<Map<string, Float32Tensor>> {
  const f = await openSafetensors(path);
  try {
    const out = new Map<string, Float32Tensor>();
    for (const name of f.tensors.keys()) out.set(name, await f.read(name));
    return out;
  } finally {
    f.close();
  }
}

// ---------------------------------------------------------------------------
// Writing.

/** A tensor to write: row-major float32 data of `shape`. */
export interface TensorToWrite {
  /** Row-major shape; `[]` for a scalar. */
  shape: number[];
  /** The values, row-major; must hold exactly `product(shape)` elements. */
  data: Float32Array;
}

/** Options of `writeSafetensors`. */
export interface WriteSafetensorsOptions {
  /** Element type in the file: F32 (default, exact), or F16 / BF16 rounded to nearest even. */
  dtype?: WriteDtype;
  /** `__metadata__` (Transformers expects `{"format": "pt"}` in model files). */
  metadata?: Record<string, string>;
  /**
   * Called after each chunk reaches the file with the bytes written so far;
   * for progress reports, and for tests that simulate a full disk by throwing.
   */
  onProgress?: (bytesWritten: number) => void;
}

/** Elements converted and written per chunk: bounds the extra memory of F16/BF16 writes. */
const WRITE_CHUNK_ELEMENTS = 1 << 22;

/** The header bytes for `tensors` (padded with spaces so that the data starts 8-byte aligned). */
function encodeHeader(
  tensors: Map<string, TensorToWrite>,
  dtype: WriteDtype,
  metadata: Record<string, string> | undefined,
): Uint8Array {
  const header: Record<string, unknown> = {};
  const put = (k: string, v: unknown) =>
    Object.defineProperty(header, k, { value: v, enumerable: true });
  if (metadata && Object.keys(metadata).length > 0) {
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== "string") throw new TypeError(`metadata value of ${k} is not a string`);
    }
    put("__metadata__", metadata);
  }
  let offset = 0;
  for (const [name, t] of tensors) {
    if (name === "__metadata__" || name === "") {
      throw new TypeError(`invalid tensor name ${JSON.stringify(name)}`);
    }
    if (!t.shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new TypeError(
        `tensor ${name}: shape [${t.shape}] is not a list of non-negative integers`,
      );
    }
    const size = t.shape.reduce((a, b) => a * b, 1);
    if (size !== t.data.length) {
      throw new TypeError(
        `tensor ${name}: shape [${t.shape}] has ${size} elements, data has ${t.data.length}`,
      );
    }
    const bytes = size * DTYPE_BYTES[dtype];
    put(name, { dtype, shape: t.shape, data_offsets: [offset, offset + bytes] });
    offset += bytes;
  }
  const json = new TextEncoder().encode(JSON.stringify(header));
  const padded = Math.ceil(json.length / 8) * 8;
  const out = new Uint8Array(8 + padded).fill(0x20, 8);
  new DataView(out.buffer).setBigUint64(0, BigInt(padded), true);
  out.set(json, 8);
  return out;
}

async function writeAll(file: Deno.FsFile, bytes: Uint8Array): Promise<void> {
  let done = 0;
  while (done < bytes.length) done += await file.write(bytes.subarray(done));
}

/**
 * Writes tensors to a safetensors file, in the map's order, and fsyncs it.
 * The header is padded with spaces to a multiple of 8 bytes so that the data
 * (and every F32 tensor) starts 8-byte aligned for readers that map the file.
 *
 * See `openSafetensors` for an example.
 */
export async function writeSafetensors(
  path: string,
  tensors: Map<string, TensorToWrite>,
  opts: WriteSafetensorsOptions = {},
): Promise<void> {
  const dtype = opts.dtype ?? "F32";
  const header = encodeHeader(tensors, dtype, opts.metadata);
  const file = await Deno.open(path, { write: true, create: true, truncate: true });
  try {
    let written = 0;
    const put = async (bytes: Uint8Array) => {
      await writeAll(file, bytes);
      written += bytes.length;
      opts.onProgress?.(written);
    };
    await put(header);
    for (const t of tensors.values()) {
      for (let i = 0; i < t.data.length; i += WRITE_CHUNK_ELEMENTS) {
        await put(float32ToBytes(dtype, t.data.subarray(i, i + WRITE_CHUNK_ELEMENTS)));
      }
    }
    await file.sync();
  } finally {
    file.close();
  }
}
