/**
 * Reader of PyTorch `.pth` checkpoints (what `torch.save` writes since 1.6),
 * built for untrusted files: it never runs anything a file asks for.
 *
 * A `.pth` file is a ZIP archive (entries stored, not compressed; 64-byte
 * aligned data; ZIP64 end records) of `<archive>/data.pkl`, a Python pickle
 * of the saved object, and `<archive>/data/<key>`, one record per tensor
 * storage in little-endian bytes. In the pickle, each tensor is
 * `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
 * requires_grad, backward_hooks)`, and each storage a persistent id
 * `("storage", torch.HalfStorage, key, location, numel)`.
 *
 * `torch.load` runs pickles with Python's unpickler, which calls whatever
 * global a file names (`os.system`, `subprocess.check_output`, ...). Here a
 * small pickle machine interprets only the opcodes a state dict needs and
 * resolves only these globals: `collections.OrderedDict`,
 * `torch._utils._rebuild_tensor_v2`, and `torch.FloatStorage`,
 * `torch.HalfStorage`, `torch.BFloat16Storage` as dtype tags. Nothing is
 * called: REDUCE on an allowed global builds a plain record (a dict, a tensor
 * reference). Anything else is refused with a `UserError` that names the
 * global or opcode and its byte offset in `data.pkl`.
 *
 * What is read: a dict of tensors (MiniMind's `out/*.pth`,
 * `torch.save(model.state_dict())`), or such a dict under the key `"model"`
 * (MiniMind's `checkpoints/*_resume.pth`, which also holds the optimizer's
 * state; only the model's storages are read). Tensors may be views (offsets,
 * any strides) of shared storages; they are materialized row-major. Mixture-
 * of-experts state dicts (MiniMind's `_moe` models) are refused.
 *
 * Sizes are checked before anything is allocated: every record lies inside the
 * file, each storage's record holds exactly `numel * element size` bytes, each
 * tensor's elements lie inside its storage and are no more than its storage's,
 * and all tensors together are at most twice the storages they view.
 *
 * @module
 */

import { UserError } from "../util/errors.ts";
import { bytesToFloat32 } from "./safetensors.ts";
import { bufferSource, type ByteSource, fileSource } from "./byte_source.ts";

/** Element types a `.pth` state dict may hold here. */
export type PthDtype = "F32" | "F16" | "BF16";

/** One tensor of a `.pth` state dict, converted to float32. */
export interface PthTensor {
  /** Element type of its storage in the file, before conversion. */
  dtype: PthDtype;
  /** Row-major shape; `[]` for a scalar. */
  shape: number[];
  /**
   * The values, row-major, `product(shape)` elements. Tensors that were the
   * same view of the same storage in the file (a tied embedding and head
   * saved from half weights) share one array, as they shared memory in
   * PyTorch.
   */
  data: Float32Array;
}

/** The largest `data.pkl` accepted: a state dict's pickle is about 100 bytes per tensor. */
export const MAX_PICKLE_BYTES = 256 * 1024 * 1024;

// ---------------------------------------------------------------------------
// CRC-32 (the ZIP polynomial 0xEDB88320, reflected), slice-by-8: eight table
// look-ups per 8 input bytes, so checking a 100 MB checkpoint costs well under
// a second.

let crcTables: Uint32Array[] | undefined;

function crc32(data: Uint8Array): number {
  if (!crcTables) {
    const t0 = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      t0[n] = c;
    }
    crcTables = [t0];
    for (let k = 1; k < 8; k++) {
      const prev = crcTables[k - 1];
      const t = new Uint32Array(256);
      for (let n = 0; n < 256; n++) t[n] = (prev[n] >>> 8) ^ t0[prev[n] & 0xff];
      crcTables.push(t);
    }
  }
  const [t0, t1, t2, t3, t4, t5, t6, t7] = crcTables;
  let c = 0xffffffff;
  let i = 0;
  const end8 = data.length - (data.length % 8);
  for (; i < end8; i += 8) {
    const a = c ^ (data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24));
    c = t7[a & 0xff] ^ t6[(a >>> 8) & 0xff] ^ t5[(a >>> 16) & 0xff] ^ t4[a >>> 24] ^
      t3[data[i + 4]] ^ t2[data[i + 5]] ^ t1[data[i + 6]] ^ t0[data[i + 7]];
  }
  for (; i < data.length; i++) c = t0[(c ^ data[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

// ---------------------------------------------------------------------------
// ZIP: the central directory, then entries on demand.

interface ZipEntry {
  name: string;
  /** 0 stored, 8 deflate. */
  method: number;
  crc32: number;
  compressedSize: number;
  size: number;
  localHeaderOffset: number;
}

const SIG_LOCAL = 0x04034b50;
const SIG_CENTRAL = 0x02014b50;
const SIG_EOCD = 0x06054b50;
const SIG_ZIP64_EOCD = 0x06064b50;
const SIG_ZIP64_LOCATOR = 0x07064b50;
const EOCD_BYTES = 22;
const MAX_COMMENT_BYTES = 0xffff;
/** Deflate cannot expand data more than 1032:1 (258-byte matches of 2-bit codes). */
const MAX_DEFLATE_RATIO = 1032;

/**
 * A name from the file as it goes into a message: printable ASCII of at most
 * 120 characters as it is, anything else quoted, escaped and cut, so that a
 * hostile name cannot flood or garble the terminal.
 */
function show(name: string): string {
  if (/^[\x20-\x7e]{1,120}$/.test(name)) return name;
  return JSON.stringify(name.length > 120 ? `${name.slice(0, 120)}...` : name);
}

/** A byte offset or size from a 64-bit field, checked to lie within `limit`. */
function checkedSize(v: bigint, limit: number, what: string, fail: (m: string) => never): number {
  if (v > BigInt(limit)) fail(`${what} (${v}) is out of range (at most ${Math.max(limit, 0)})`);
  return Number(v);
}

/** The pickle stream of a pre-1.6 `torch.save`: PROTO 2, then LONG1 of its magic number. */
const LEGACY_MAGIC = [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8];

class ZipArchive {
  readonly entries = new Map<string, ZipEntry>();
  /** Where the central directory starts: entry data must lie before it. */
  private dataEnd = 0;

  private constructor(
    private readonly src: ByteSource,
    private readonly fail: (m: string) => never,
  ) {}

  static async open(src: ByteSource, fail: (m: string) => never): Promise<ZipArchive> {
    const zip = new ZipArchive(src, fail);
    await zip.readDirectory();
    return zip;
  }

  private async readDirectory(): Promise<void> {
    const { src, fail } = this;
    const head = await src.readAt(0, Math.min(src.size, LEGACY_MAGIC.length));
    if (head.length === LEGACY_MAGIC.length && LEGACY_MAGIC.every((b, i) => head[i] === b)) {
      fail(
        "it is in PyTorch's legacy format (torch.save before 1.6, or " +
          "_use_new_zipfile_serialization=False), which is not supported; re-save it with a " +
          "current PyTorch: torch.save(torch.load(path, weights_only=True), path)",
      );
    }
    if (src.size < EOCD_BYTES) fail(`it is ${src.size} bytes, too short for a ZIP archive`);
    // The end-of-central-directory record is the last 22 bytes plus a comment
    // of at most 65535 bytes; search backwards for its signature.
    const tailStart = Math.max(0, src.size - EOCD_BYTES - MAX_COMMENT_BYTES);
    const tail = await src.readAt(tailStart, src.size - tailStart);
    const tv = new DataView(tail.buffer, tail.byteOffset, tail.byteLength);
    let at = -1;
    for (let i = tail.length - EOCD_BYTES; i >= 0; i--) {
      if (
        tv.getUint32(i, true) === SIG_EOCD &&
        i + EOCD_BYTES + tv.getUint16(i + 20, true) <= tail.length
      ) {
        at = i;
        break;
      }
    }
    if (at < 0) {
      fail(
        "it is not a ZIP archive (no end-of-central-directory record), so not a torch.save file " +
          "(it may be truncated)",
      );
    }
    const eocdOffset = tailStart + at;
    if (tv.getUint16(at + 4, true) !== 0 || tv.getUint16(at + 6, true) !== 0) {
      fail("it is a multi-disk ZIP archive, which torch.save never writes");
    }
    let count: bigint = BigInt(tv.getUint16(at + 10, true));
    let cdSize: bigint = BigInt(tv.getUint32(at + 12, true));
    let cdOffset: bigint = BigInt(tv.getUint32(at + 16, true));
    let cdLimit = eocdOffset;
    // torch.save always writes ZIP64 end records (the locator sits just before
    // the classic record); their 64-bit fields are the ones to trust.
    if (eocdOffset >= 20) {
      const loc = await src.readAt(eocdOffset - 20, 20);
      const lv = new DataView(loc.buffer, loc.byteOffset, 20);
      if (lv.getUint32(0, true) === SIG_ZIP64_LOCATOR) {
        const recOffset = checkedSize(
          lv.getBigUint64(8, true),
          eocdOffset - 20 - 56,
          "the ZIP64 end record's offset",
          fail,
        );
        const rec = await src.readAt(recOffset, 56);
        const rv = new DataView(rec.buffer, rec.byteOffset, 56);
        if (rv.getUint32(0, true) !== SIG_ZIP64_EOCD) {
          fail(`no ZIP64 end-of-central-directory record at byte ${recOffset}`);
        }
        if (rv.getUint32(16, true) !== 0 || rv.getUint32(20, true) !== 0) {
          fail("it is a multi-disk ZIP archive, which torch.save never writes");
        }
        count = rv.getBigUint64(32, true);
        cdSize = rv.getBigUint64(40, true);
        cdOffset = rv.getBigUint64(48, true);
        cdLimit = recOffset;
      }
    }
    const cdStart = checkedSize(cdOffset, cdLimit, "the central directory's offset", fail);
    const cdBytes = checkedSize(cdSize, cdLimit - cdStart, "the central directory's size", fail);
    const CENTRAL_BYTES = 46;
    if (count > BigInt(Math.floor(cdBytes / CENTRAL_BYTES))) {
      fail(`the archive claims ${count} entries, more than its ${cdBytes}-byte directory can hold`);
    }
    this.dataEnd = cdStart;
    const cd = await src.readAt(cdStart, cdBytes);
    const v = new DataView(cd.buffer, cd.byteOffset, cd.byteLength);
    const names = new TextDecoder("utf-8", { fatal: false });
    let p = 0;
    for (let k = 0; k < Number(count); k++) {
      if (p + CENTRAL_BYTES > cd.length || v.getUint32(p, true) !== SIG_CENTRAL) {
        fail(`central directory entry ${k} at byte ${cdStart + p} is malformed`);
      }
      const flags = v.getUint16(p + 8, true);
      const method = v.getUint16(p + 10, true);
      const crc = v.getUint32(p + 16, true);
      let compressedSize = BigInt(v.getUint32(p + 20, true));
      let size = BigInt(v.getUint32(p + 24, true));
      const nameLen = v.getUint16(p + 28, true);
      const extraLen = v.getUint16(p + 30, true);
      const commentLen = v.getUint16(p + 32, true);
      const diskStart = v.getUint16(p + 34, true);
      let localHeaderOffset = BigInt(v.getUint32(p + 42, true));
      const end = p + CENTRAL_BYTES + nameLen + extraLen + commentLen;
      if (end > cd.length) fail(`central directory entry ${k} runs past the directory's end`);
      const name = names.decode(cd.subarray(p + CENTRAL_BYTES, p + CENTRAL_BYTES + nameLen));
      if (flags & 1) fail(`entry ${show(name)} is encrypted`);
      // ZIP64 extended information (header id 1): the 64-bit values of the
      // fields whose 32-bit slots hold 0xFFFFFFFF, in this order.
      let e = p + CENTRAL_BYTES + nameLen;
      const extraEnd = e + extraLen;
      while (e + 4 <= extraEnd) {
        const id = v.getUint16(e, true);
        const len = v.getUint16(e + 2, true);
        if (e + 4 + len > extraEnd) fail(`entry ${show(name)} has a malformed extra field`);
        if (id === 1) {
          let q = e + 4;
          const next = (): bigint => {
            if (q + 8 > e + 4 + len) fail(`entry ${show(name)} has a short ZIP64 extra field`);
            q += 8;
            return v.getBigUint64(q - 8, true);
          };
          if (size === 0xffffffffn) size = next();
          if (compressedSize === 0xffffffffn) compressedSize = next();
          if (localHeaderOffset === 0xffffffffn) localHeaderOffset = next();
        }
        e += 4 + len;
      }
      if (diskStart !== 0 && diskStart !== 0xffff) fail(`entry ${show(name)} is on another disk`);
      if (this.entries.has(name)) fail(`the archive holds two entries named ${show(name)}`);
      const entry: ZipEntry = {
        name,
        method,
        crc32: crc,
        compressedSize: checkedSize(
          compressedSize,
          cdStart,
          `entry ${show(name)}'s compressed size`,
          fail,
        ),
        size: 0,
        localHeaderOffset: checkedSize(
          localHeaderOffset,
          cdStart,
          `entry ${show(name)}'s offset`,
          fail,
        ),
      };
      if (method === 0) {
        if (size !== compressedSize) {
          fail(`stored entry ${show(name)} has size ${size} but compressed size ${compressedSize}`);
        }
      } else if (method === 8) {
        if (size > BigInt(entry.compressedSize) * BigInt(MAX_DEFLATE_RATIO) + 64n) {
          fail(
            `deflated entry ${show(name)} claims ${size} bytes from ${entry.compressedSize}, ` +
              `more than deflate can expand to`,
          );
        }
      }
      entry.size = Number(size);
      this.entries.set(name, entry);
      p = end;
    }
  }

  /** The entry's bytes, inflated if needed, with its size and CRC-32 checked. */
  async read(entry: ZipEntry): Promise<Uint8Array> {
    const { src, fail } = this;
    const LOCAL_BYTES = 30;
    if (entry.localHeaderOffset + LOCAL_BYTES > this.dataEnd) {
      fail(
        `entry ${
          show(entry.name)
        }'s local header at byte ${entry.localHeaderOffset} is out of range`,
      );
    }
    const h = await src.readAt(entry.localHeaderOffset, LOCAL_BYTES);
    const hv = new DataView(h.buffer, h.byteOffset, LOCAL_BYTES);
    if (hv.getUint32(0, true) !== SIG_LOCAL) {
      fail(`no local header for entry ${show(entry.name)} at byte ${entry.localHeaderOffset}`);
    }
    const dataOffset = entry.localHeaderOffset + LOCAL_BYTES + hv.getUint16(26, true) +
      hv.getUint16(28, true);
    if (dataOffset + entry.compressedSize > this.dataEnd) {
      fail(
        `entry ${
          show(entry.name)
        } (${entry.compressedSize} bytes at byte ${dataOffset}) runs past ` +
          `the archive's data: the file is truncated or corrupt`,
      );
    }
    const raw = await src.readAt(dataOffset, entry.compressedSize);
    let data: Uint8Array;
    if (entry.method === 0) {
      data = raw;
    } else if (entry.method === 8) {
      data = await inflateRaw(raw, entry.size, (m) => fail(`entry ${show(entry.name)}: ${m}`));
    } else {
      return fail(
        `entry ${show(entry.name)} uses ZIP compression method ${entry.method}; ` +
          `only stored (0) and deflate (8) are supported`,
      );
    }
    if (crc32(data) !== entry.crc32) {
      fail(`entry ${show(entry.name)} fails its CRC-32 check: the file is corrupt`);
    }
    return data;
  }
}

/** Inflates raw deflate data that must give exactly `size` bytes. */
async function inflateRaw(
  data: Uint8Array,
  size: number,
  fail: (m: string) => never,
): Promise<Uint8Array> {
  // Chunks are kept until the end, so memory follows what really inflates,
  // not what a forged size field claims.
  const chunks: Uint8Array[] = [];
  let filled = 0;
  const input = new ReadableStream<Uint8Array<ArrayBuffer>>({
    start(controller) {
      controller.enqueue(data.slice());
      controller.close();
    },
  });
  const reader = input.pipeThrough(new DecompressionStream("deflate-raw")).getReader();
  try {
    for (;;) {
      let chunk: ReadableStreamReadResult<Uint8Array>;
      try {
        chunk = await reader.read();
      } catch (e) {
        return fail(`corrupt deflate data (${(e as Error).message})`);
      }
      if (chunk.done) break;
      if (filled + chunk.value.length > size) fail(`inflates to more than its ${size} bytes`);
      chunks.push(chunk.value);
      filled += chunk.value.length;
    }
  } finally {
    reader.cancel().catch(() => {});
  }
  if (filled !== size) fail(`inflates to ${filled} bytes, not its ${size}`);
  const out = new Uint8Array(size);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

// ---------------------------------------------------------------------------
// The restricted pickle machine.

/** A Python tuple (lists and tuples differ in what a state dict may contain). */
class PyTuple {
  constructor(readonly items: PyValue[]) {}
}

/** A Python list. */
class PyList {
  constructor(readonly items: PyValue[]) {}
}

type DictKey = string | number | bigint | boolean | null;

/** A Python dict or OrderedDict (insertion order kept). */
class PyDict {
  readonly entries = new Map<DictKey, PyValue>();
}

/** One of the allowed globals, as a tag: nothing is ever called. */
class PyGlobal {
  constructor(readonly qualified: AllowedGlobal) {}
}

/** A storage record named by a persistent id. */
interface StorageRef {
  kind: "storage";
  key: string;
  dtype: PthDtype;
  /** Storage type's name, for messages. */
  typeName: string;
  numel: number;
}

/** A tensor: a view of a storage, not yet read. */
interface TensorRef {
  kind: "tensor";
  storage: StorageRef;
  offset: number;
  shape: number[];
  stride: number[];
}

type PyValue =
  | null
  | boolean
  | number
  | bigint
  | string
  | PyTuple
  | PyList
  | PyDict
  | PyGlobal
  | StorageRef
  | TensorRef;

const STORAGE_DTYPES = {
  "torch.FloatStorage": { dtype: "F32", bytes: 4 },
  "torch.HalfStorage": { dtype: "F16", bytes: 2 },
  "torch.BFloat16Storage": { dtype: "BF16", bytes: 2 },
} as const;

type AllowedGlobal =
  | "collections.OrderedDict"
  | "torch._utils._rebuild_tensor_v2"
  | keyof typeof STORAGE_DTYPES;

const ALLOWED_GLOBALS: ReadonlySet<string> = new Set<AllowedGlobal>([
  "collections.OrderedDict",
  "torch._utils._rebuild_tensor_v2",
  ...Object.keys(STORAGE_DTYPES) as (keyof typeof STORAGE_DTYPES)[],
]);

/** Storage types of other dtypes: harmless, but their tensors cannot be loaded. */
const OTHER_STORAGES: Readonly<Record<string, string>> = {
  "torch.DoubleStorage": "float64",
  "torch.LongStorage": "int64",
  "torch.IntStorage": "int32",
  "torch.ShortStorage": "int16",
  "torch.CharStorage": "int8",
  "torch.ByteStorage": "uint8",
  "torch.BoolStorage": "bool",
  "torch.ComplexFloatStorage": "complex64",
  "torch.ComplexDoubleStorage": "complex128",
  "torch.QInt8Storage": "qint8",
  "torch.QUInt8Storage": "quint8",
  "torch.QInt32Storage": "qint32",
  "torch.Float8_e4m3fnStorage": "float8_e4m3fn",
  "torch.Float8_e5m2Storage": "float8_e5m2",
  "torch.UntypedStorage": "untyped",
};

/** Names of every pickle opcode, for messages about the ones refused. */
const OPCODE_NAMES: Readonly<Record<number, string>> = {
  0x28: "MARK",
  0x2e: "STOP",
  0x30: "POP",
  0x31: "POP_MARK",
  0x32: "DUP",
  0x46: "FLOAT",
  0x49: "INT",
  0x4a: "BININT",
  0x4b: "BININT1",
  0x4c: "LONG",
  0x4d: "BININT2",
  0x4e: "NONE",
  0x50: "PERSID",
  0x51: "BINPERSID",
  0x52: "REDUCE",
  0x53: "STRING",
  0x54: "BINSTRING",
  0x55: "SHORT_BINSTRING",
  0x56: "UNICODE",
  0x58: "BINUNICODE",
  0x61: "APPEND",
  0x62: "BUILD",
  0x63: "GLOBAL",
  0x64: "DICT",
  0x7d: "EMPTY_DICT",
  0x65: "APPENDS",
  0x67: "GET",
  0x68: "BINGET",
  0x69: "INST",
  0x6a: "LONG_BINGET",
  0x6c: "LIST",
  0x5d: "EMPTY_LIST",
  0x6f: "OBJ",
  0x70: "PUT",
  0x71: "BINPUT",
  0x72: "LONG_BINPUT",
  0x73: "SETITEM",
  0x74: "TUPLE",
  0x29: "EMPTY_TUPLE",
  0x75: "SETITEMS",
  0x47: "BINFLOAT",
  0x80: "PROTO",
  0x81: "NEWOBJ",
  0x82: "EXT1",
  0x83: "EXT2",
  0x84: "EXT4",
  0x85: "TUPLE1",
  0x86: "TUPLE2",
  0x87: "TUPLE3",
  0x88: "NEWTRUE",
  0x89: "NEWFALSE",
  0x8a: "LONG1",
  0x8b: "LONG4",
  0x42: "BINBYTES",
  0x43: "SHORT_BINBYTES",
  0x8c: "SHORT_BINUNICODE",
  0x8d: "BINUNICODE8",
  0x8e: "BINBYTES8",
  0x8f: "EMPTY_SET",
  0x90: "ADDITEMS",
  0x91: "FROZENSET",
  0x92: "NEWOBJ_EX",
  0x93: "STACK_GLOBAL",
  0x94: "MEMOIZE",
  0x95: "FRAME",
  0x96: "BYTEARRAY8",
  0x97: "NEXT_BUFFER",
  0x98: "READONLY_BUFFER",
};

/** The largest integer a LONG opcode may spell here (bytes); sizes need at most 8. */
const MAX_LONG_BYTES = 32;

function describe(v: PyValue): string {
  if (v === null) return "None";
  if (typeof v === "boolean") return "a bool";
  if (typeof v === "number" || typeof v === "bigint") return "a number";
  if (typeof v === "string") return "a string";
  if (v instanceof PyTuple) return "a tuple";
  if (v instanceof PyList) return "a list";
  if (v instanceof PyDict) return "a dict";
  if (v instanceof PyGlobal) return v.qualified;
  return v.kind === "storage" ? "a storage" : "a tensor";
}

function isTensor(v: PyValue | undefined): v is TensorRef {
  return typeof v === "object" && v !== null && "kind" in v && v.kind === "tensor";
}

/**
 * Runs the pickle `data` with the restricted machine and returns the object it
 * builds; tensors come back as references into storage records.
 */
function unpickle(data: Uint8Array, source: string): PyValue {
  const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const text = new TextDecoder("utf-8", { fatal: true });
  const stack: PyValue[] = [];
  const marks: number[] = [];
  const memo = new Map<number, PyValue>();
  const storages = new Map<string, StorageRef>();
  let pos = 0;
  let opAt = 0;
  let op = 0;

  const corrupt = (msg: string): never => {
    throw new UserError(
      `${source}: not a valid PyTorch checkpoint: data.pkl byte ${opAt} (${
        OPCODE_NAMES[op] ?? `opcode 0x${op.toString(16)}`
      }): ${msg}`,
    );
  };
  const refuse = (what: string): never => {
    throw new UserError(
      `refusing to load ${source}: it asks for ${what} (data.pkl byte ${opAt}), which a state ` +
        `dict of tensors never needs; nothing in the file was run. Only PyTorch state dicts of ` +
        `float32, float16 and bfloat16 tensors can be loaded`,
    );
  };
  const need = (n: number) => {
    if (n > data.length - pos) {
      corrupt(`needs ${n} bytes but the pickle ends at byte ${data.length}`);
    }
  };
  const u8 = () => {
    need(1);
    return data[pos++];
  };
  const u16 = () => {
    need(2);
    pos += 2;
    return dv.getUint16(pos - 2, true);
  };
  const u32 = () => {
    need(4);
    pos += 4;
    return dv.getUint32(pos - 4, true);
  };
  const u64 = (): number => {
    need(8);
    const v = dv.getBigUint64(pos, true);
    pos += 8;
    if (v > BigInt(data.length)) corrupt(`a length of ${v} bytes, beyond the pickle's end`);
    return Number(v);
  };
  const str = (n: number): string => {
    need(n);
    pos += n;
    try {
      return text.decode(data.subarray(pos - n, pos));
    } catch {
      return corrupt("a string that is not valid UTF-8");
    }
  };
  const line = (): string => {
    const end = data.indexOf(0x0a, pos);
    if (end < 0) corrupt("a line without its newline");
    return str(end - pos + 1).slice(0, -1);
  };
  const pop = (): PyValue => {
    const floor = marks.length ? marks[marks.length - 1] : 0;
    if (stack.length <= floor) corrupt("pops an empty stack");
    return stack.pop() as PyValue;
  };
  const top = (): PyValue => {
    const floor = marks.length ? marks[marks.length - 1] : 0;
    if (stack.length <= floor) corrupt("reads an empty stack");
    return stack[stack.length - 1];
  };
  const popMark = (): PyValue[] => {
    const m = marks.pop();
    if (m === undefined) corrupt("no MARK to pop");
    return stack.splice(m as number);
  };
  const littleInt = (n: number): number | bigint => {
    if (n > MAX_LONG_BYTES) corrupt(`an integer of ${n} bytes`);
    need(n);
    let v = 0n;
    for (let i = n - 1; i >= 0; i--) v = (v << 8n) | BigInt(data[pos + i]);
    if (n > 0 && data[pos + n - 1] & 0x80) v -= 1n << BigInt(8 * n);
    pos += n;
    return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER)
      ? Number(v)
      : v;
  };
  const global = (module: string, name: string): PyGlobal => {
    const qualified = `${module}.${name}`;
    if (ALLOWED_GLOBALS.has(qualified)) return new PyGlobal(qualified as AllowedGlobal);
    const other = OTHER_STORAGES[qualified];
    if (other) {
      throw new UserError(
        `${source}: holds a ${other} tensor (${qualified}, data.pkl byte ${opAt}); only ` +
          `float32, float16 and bfloat16 tensors can be loaded`,
      );
    }
    return refuse(show(qualified));
  };
  const setItems = (dict: PyValue, items: PyValue[]) => {
    if (!(dict instanceof PyDict)) return corrupt(`sets items on ${describe(dict)}, not a dict`);
    if (items.length % 2) corrupt("an odd number of items for a dict");
    for (let i = 0; i < items.length; i += 2) {
      const k = items[i];
      if (typeof k === "object" && k !== null) {
        return refuse(`a dict key that is ${describe(k)}`);
      }
      dict.entries.set(k, items[i + 1]);
    }
  };
  const append = (list: PyValue, items: PyValue[]) => {
    if (!(list instanceof PyList)) return corrupt(`appends to ${describe(list)}, not a list`);
    for (const item of items) list.items.push(item);
  };
  const persistentLoad = (pid: PyValue): StorageRef => {
    const items = pid instanceof PyTuple ? pid.items : [];
    const [tag, type, key, , numel] = items;
    if (items.length !== 5 || tag !== "storage") {
      return refuse(
        typeof tag === "string" && tag.length <= 100
          ? `a persistent object of kind ${JSON.stringify(tag)}, not a tensor storage`
          : `a persistent object that is ${describe(pid)}, not a tensor storage`,
      );
    }
    if (!(type instanceof PyGlobal) || !(type.qualified in STORAGE_DTYPES)) {
      return corrupt(`a storage whose type is ${describe(type)}`);
    }
    if (typeof key !== "string" || typeof items[3] !== "string") {
      return corrupt("a storage whose key or location is not a string");
    }
    if (typeof numel === "bigint" && numel > 0n) {
      return corrupt(`a storage of ${numel} elements, more than any file holds`);
    }
    if (typeof numel !== "number" || !Number.isSafeInteger(numel) || numel < 0) {
      return corrupt(`a storage whose element count is ${describe(numel ?? null)}`);
    }
    const info = STORAGE_DTYPES[type.qualified as keyof typeof STORAGE_DTYPES];
    const seen = storages.get(key);
    if (seen) {
      if (seen.dtype !== info.dtype || seen.numel !== numel) {
        corrupt(`storage ${show(key)} appears as two different storages`);
      }
      return seen;
    }
    const ref: StorageRef = {
      kind: "storage",
      key,
      dtype: info.dtype,
      typeName: type.qualified,
      numel,
    };
    storages.set(key, ref);
    return ref;
  };
  const sizes = (v: PyValue, what: string): number[] => {
    if (!(v instanceof PyTuple) || v.items.length > 64) {
      return corrupt(`a tensor ${what} that is ${describe(v)}, not a tuple of sizes`);
    }
    return v.items.map((d) => {
      if (typeof d !== "number" || !Number.isSafeInteger(d) || d < 0) {
        return corrupt(
          `a tensor ${what} entry ${typeof d === "bigint" ? String(d) : describe(d)}`,
        );
      }
      return d;
    });
  };
  const rebuildTensor = (args: PyValue[]): TensorRef => {
    const [storage, offset, size, stride, requiresGrad, hooks, metadata] = args;
    if (args.length !== 6 && args.length !== 7) {
      corrupt(`_rebuild_tensor_v2 with ${args.length} arguments`);
    }
    if (
      typeof storage !== "object" || storage === null || !("kind" in storage) ||
      storage.kind !== "storage"
    ) {
      return corrupt(`_rebuild_tensor_v2 of ${describe(storage)}, not a storage`);
    }
    if (typeof offset !== "number" || !Number.isSafeInteger(offset) || offset < 0) {
      return corrupt(`a tensor storage offset that is ${describe(offset ?? null)}`);
    }
    const shape = sizes(size, "size");
    const strides = sizes(stride, "stride");
    if (shape.length !== strides.length) corrupt("a tensor whose size and stride differ in length");
    if (typeof requiresGrad !== "boolean") corrupt("a tensor whose requires_grad is not a bool");
    if (!(hooks instanceof PyDict) || hooks.entries.size) {
      return refuse("a tensor with backward hooks");
    }
    if (
      metadata !== undefined && metadata !== null &&
      !(metadata instanceof PyDict && !metadata.entries.size)
    ) {
      refuse("a tensor with extra metadata");
    }
    return { kind: "tensor", storage, offset, shape, stride: strides };
  };

  for (;;) {
    opAt = pos;
    op = u8();
    switch (op) {
      case 0x80: { // PROTO
        const v = u8();
        if (v > 5) corrupt(`pickle protocol ${v}`);
        break;
      }
      case 0x95: // FRAME: an 8-byte length prefix that readers may ignore
        u64();
        break;
      case 0x2e: { // STOP
        if (marks.length) corrupt("STOP inside an open MARK");
        if (stack.length !== 1) corrupt(`STOP with ${stack.length} values on the stack`);
        return stack[0];
      }
      case 0x28: // MARK
        marks.push(stack.length);
        break;
      case 0x29: // EMPTY_TUPLE
        stack.push(new PyTuple([]));
        break;
      case 0x74: // TUPLE
        stack.push(new PyTuple(popMark()));
        break;
      case 0x85: // TUPLE1
      case 0x86: // TUPLE2
      case 0x87: { // TUPLE3
        const n = op - 0x84;
        const items: PyValue[] = [];
        for (let i = 0; i < n; i++) items.unshift(pop());
        stack.push(new PyTuple(items));
        break;
      }
      case 0x5d: // EMPTY_LIST
        stack.push(new PyList([]));
        break;
      case 0x61: { // APPEND
        const item = pop();
        append(top(), [item]);
        break;
      }
      case 0x65: { // APPENDS
        const items = popMark();
        append(top(), items);
        break;
      }
      case 0x7d: // EMPTY_DICT
        stack.push(new PyDict());
        break;
      case 0x73: { // SETITEM
        const v = pop();
        const k = pop();
        setItems(top(), [k, v]);
        break;
      }
      case 0x75: { // SETITEMS
        const items = popMark();
        setItems(top(), items);
        break;
      }
      case 0x4e: // NONE
        stack.push(null);
        break;
      case 0x88: // NEWTRUE
        stack.push(true);
        break;
      case 0x89: // NEWFALSE
        stack.push(false);
        break;
      case 0x4b: // BININT1
        stack.push(u8());
        break;
      case 0x4d: // BININT2
        stack.push(u16());
        break;
      case 0x4a: // BININT
        stack.push(u32() | 0);
        break;
      case 0x8a: // LONG1
        stack.push(littleInt(u8()));
        break;
      case 0x8b: // LONG4
        stack.push(littleInt(u32()));
        break;
      case 0x47: { // BINFLOAT: big-endian float64
        need(8);
        stack.push(dv.getFloat64(pos, false));
        pos += 8;
        break;
      }
      case 0x58: // BINUNICODE
        stack.push(str(u32()));
        break;
      case 0x8c: // SHORT_BINUNICODE
        stack.push(str(u8()));
        break;
      case 0x8d: // BINUNICODE8
        stack.push(str(u64()));
        break;
      case 0x71: // BINPUT
        memo.set(u8(), top());
        break;
      case 0x72: // LONG_BINPUT
        memo.set(u32(), top());
        break;
      case 0x94: // MEMOIZE
        memo.set(memo.size, top());
        break;
      case 0x68: // BINGET
      case 0x6a: { // LONG_BINGET
        const i = op === 0x68 ? u8() : u32();
        if (!memo.has(i)) corrupt(`memo entry ${i} is not set`);
        stack.push(memo.get(i) as PyValue);
        break;
      }
      case 0x63: { // GLOBAL: "module\nname\n"
        const module = line();
        stack.push(global(module, line()));
        break;
      }
      case 0x93: { // STACK_GLOBAL
        const name = pop();
        const module = pop();
        if (typeof module !== "string" || typeof name !== "string") {
          return corrupt("STACK_GLOBAL of values that are not strings");
        }
        stack.push(global(module, name));
        break;
      }
      case 0x51: // BINPERSID
        stack.push(persistentLoad(pop()));
        break;
      case 0x52: { // REDUCE: callable(*args), here only for the allowed globals
        const args = pop();
        const fn = pop();
        if (!(fn instanceof PyGlobal)) return refuse(`a call of ${describe(fn)}`);
        if (!(args instanceof PyTuple)) return corrupt(`arguments that are ${describe(args)}`);
        if (fn.qualified === "collections.OrderedDict") {
          if (args.items.length) refuse("OrderedDict called with arguments");
          stack.push(new PyDict());
        } else if (fn.qualified === "torch._utils._rebuild_tensor_v2") {
          stack.push(rebuildTensor(args.items));
        } else {
          refuse(`a call of ${fn.qualified}`);
        }
        break;
      }
      case 0x62: { // BUILD: obj.__setstate__(state)
        // torch.save(model.state_dict()) sets the OrderedDict's `_metadata`
        // (module versions) this way; it is not needed and is dropped.
        const state = pop();
        const obj = top();
        if (!(obj instanceof PyDict) || !(state === null || state instanceof PyDict)) {
          refuse(`setting the state of ${describe(obj)}`);
        }
        break;
      }
      default: {
        const name = OPCODE_NAMES[op];
        if (name) refuse(`the pickle opcode ${name}`);
        corrupt("an unknown opcode");
      }
    }
  }
}

// ---------------------------------------------------------------------------
// From the unpickled object to tensors.

/** MiniMind's MoE layers: `mlp.gate.weight` (router) and `mlp.experts.E.*` / `mlp.shared_experts.E.*`. */
const MOE_NAME = /(^|\.)mlp\.(gate\.weight$|experts\.|shared_experts\.)/;

function showKey(k: DictKey): string {
  return typeof k === "string"
    ? JSON.stringify(k.length > 120 ? `${k.slice(0, 120)}...` : k)
    : String(k);
}

function stateDictOf(root: PyValue, source: string): Map<string, TensorRef> {
  const fail = (msg: string): never => {
    throw new UserError(`${source}: not a PyTorch state dict: ${msg}`);
  };
  const allTensors = (d: PyDict) => d.entries.size > 0 && [...d.entries.values()].every(isTensor);
  if (!(root instanceof PyDict)) return fail(`it holds ${describe(root)}, not a dict of tensors`);
  let dict = root;
  if (!allTensors(root)) {
    // MiniMind's resume files: {"model": state dict, "optimizer": ..., "epoch": ...}.
    const model = root.entries.get("model");
    if (model instanceof PyDict && allTensors(model)) {
      dict = model;
    } else {
      const keys = [...root.entries.keys()].slice(0, 8).map(showKey);
      const bad = [...root.entries].find(([, v]) => !isTensor(v));
      return fail(
        root.entries.size === 0
          ? "it is an empty dict"
          : `its keys (${keys.join(", ")}${
            root.entries.size > 8 ? ", ..." : ""
          }) are not all tensors (${showKey(bad?.[0] ?? null)} is ${
            describe(bad?.[1] ?? null)
          }), and it has no "model" dict of tensors`,
      );
    }
  }
  const out = new Map<string, TensorRef>();
  for (const [k, v] of dict.entries) {
    if (typeof k !== "string") return fail(`a key ${showKey(k)} that is not a string`);
    out.set(k, v as TensorRef);
  }
  const moe = [...out.keys()].find((k) => MOE_NAME.test(k));
  if (moe) {
    throw new UserError(
      `${source}: holds a mixture-of-experts model (tensor ${
        show(moe)
      }), such as MiniMind's _moe ` +
        `models; only dense models are supported`,
    );
  }
  return out;
}

function product(dims: number[]): bigint {
  return dims.reduce((a, d) => a * BigInt(d), 1n);
}

/** Row-major strides of `shape`: the strides of a contiguous tensor. */
function contiguousStrides(shape: number[]): number[] {
  const s = new Array<number>(shape.length);
  let acc = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    s[i] = acc;
    acc *= shape[i];
  }
  return s;
}

/** Whether the view is row-major contiguous (strides of size-1 dimensions do not matter). */
function isContiguous(t: TensorRef): boolean {
  const want = contiguousStrides(t.shape);
  return t.shape.every((d, i) => d <= 1 || t.stride[i] === want[i]);
}

/**
 * The view's elements in row-major order; `numel` and every index were checked
 * by the caller. A contiguous view that is the whole of a freshly decoded
 * storage is returned as it is (`fresh`: not a view of the file's bytes).
 */
function gather(src: Float32Array, fresh: boolean, t: TensorRef, numel: number): Float32Array {
  if (isContiguous(t)) {
    if (fresh && t.offset === 0 && numel === src.length) return src;
    return src.slice(t.offset, t.offset + numel);
  }
  const out = new Float32Array(numel);
  if (numel === 0) return out;
  // Size-1 dimensions move nothing (and their strides may be anything, even
  // too large to add exactly), so they are dropped; the rest is an odometer
  // over all but the last dimension, which is the inner loop.
  const shape: number[] = [];
  const stride: number[] = [];
  t.shape.forEach((d, i) => {
    if (d !== 1) {
      shape.push(d);
      stride.push(t.stride[i]);
    }
  });
  const nd = shape.length;
  const inner = shape[nd - 1];
  const innerStride = stride[nd - 1];
  const idx = new Array<number>(nd).fill(0);
  let base = t.offset;
  let o = 0;
  for (;;) {
    for (let j = 0; j < inner; j++) out[o++] = src[base + j * innerStride];
    let d = nd - 2;
    for (; d >= 0; d--) {
      idx[d]++;
      base += stride[d];
      if (idx[d] < shape[d]) break;
      base -= stride[d] * shape[d];
      idx[d] = 0;
    }
    if (d < 0) return out;
  }
}

async function readFromSource(src: ByteSource, source: string): Promise<Map<string, PthTensor>> {
  const fail = (msg: string): never => {
    throw new UserError(`${source}: not a valid PyTorch checkpoint: ${msg}`);
  };
  const zip = await ZipArchive.open(src, fail);
  const pickles = [...zip.entries.keys()].filter((n) => /^[^/]+\/data\.pkl$/.test(n));
  if (pickles.length !== 1) {
    fail(
      pickles.length
        ? `it holds ${pickles.length} archives (${pickles.join(", ")})`
        : "the archive has no <name>/data.pkl, so it was not written by torch.save",
    );
  }
  const prefix = pickles[0].slice(0, -"data.pkl".length);
  const byteorder = zip.entries.get(`${prefix}byteorder`);
  if (byteorder) {
    const order = new TextDecoder().decode(await zip.read(byteorder));
    if (order !== "little") {
      fail(`its byte order is ${JSON.stringify(order)}; only little-endian files are supported`);
    }
  }
  const pklEntry = zip.entries.get(pickles[0]) as ZipEntry;
  if (pklEntry.size > MAX_PICKLE_BYTES) {
    fail(`its data.pkl is ${pklEntry.size} bytes, beyond the ${MAX_PICKLE_BYTES}-byte limit`);
  }
  const tensors = stateDictOf(unpickle(await zip.read(pklEntry), source), source);

  // Every size check before any tensor memory is allocated.
  const storageNumel = new Map<StorageRef, number>();
  let viewed = 0n;
  const views = new Map<string, TensorRef>();
  for (const [name, t] of tensors) {
    const s = t.storage;
    const where = `tensor ${show(name)}`;
    if (!storageNumel.has(s)) {
      const entry = zip.entries.get(`${prefix}data/${show(s.key)}`);
      if (!entry) {
        fail(`${where} refers to storage record data/${show(s.key)}, which the archive lacks`);
      }
      const elemBytes = STORAGE_DTYPES[s.typeName as keyof typeof STORAGE_DTYPES].bytes;
      if (BigInt(s.numel) * BigInt(elemBytes) !== BigInt((entry as ZipEntry).size)) {
        fail(
          `${where}'s storage data/${show(s.key)} is a ${s.typeName} of ${s.numel} elements ` +
            `(${BigInt(s.numel) * BigInt(elemBytes)} bytes), but its record holds ${
              (entry as ZipEntry).size
            } bytes`,
        );
      }
      storageNumel.set(s, s.numel);
    }
    const numel = product(t.shape);
    if (numel > BigInt(s.numel)) {
      // Distinct elements of a view that does not overlap itself are distinct
      // storage elements; more means a broadcast (`expand`) or a corrupt file.
      throw new UserError(
        `${source}: cannot read ${where}: its shape [${t.shape.join(", ")}] has ${numel} ` +
          `elements, but its storage holds only ${s.numel} (a broadcast view, as expand() ` +
          `makes, or a corrupt file); save it with .contiguous()`,
      );
    }
    if (numel > 0n) {
      const last = t.shape.reduce(
        (a, d, i) => a + BigInt(d - 1) * BigInt(t.stride[i]),
        BigInt(t.offset),
      );
      if (last >= BigInt(s.numel)) {
        fail(
          `${where} (offset ${t.offset}, shape [${t.shape.join(", ")}], stride [${
            t.stride.join(", ")
          }]) reaches element ${last} of its storage, which holds ${s.numel}`,
        );
      }
    }
    const viewKey = `${s.key}:${t.offset}:${t.shape.join(",")}:${t.stride.join(",")}`;
    if (!views.has(viewKey)) {
      views.set(viewKey, t);
      viewed += numel;
    }
  }
  const stored = [...storageNumel.values()].reduce((a, n) => a + BigInt(n), 0n);
  if (viewed > 2n * stored) {
    fail(
      `its tensors view ${viewed} elements of storages that hold ${stored}: more than ` +
        `a state dict's overlapping views (a tied head) ever need`,
    );
  }

  // Read each storage once, in first-use order, and cut its tensors from it.
  const byStorage = new Map<StorageRef, string[]>();
  for (const [name, t] of tensors) {
    const names = byStorage.get(t.storage) ?? [];
    names.push(name);
    byStorage.set(t.storage, names);
  }
  const arrays = new Map<string, Float32Array>();
  const out = new Map<string, PthTensor>();
  for (const [s, names] of byStorage) {
    const bytes = await zip.read(zip.entries.get(`${prefix}data/${show(s.key)}`) as ZipEntry);
    // For F32, bytesToFloat32 may return a view of `bytes` (the caller's
    // buffer); gather then copies out of it.
    const values = bytesToFloat32(s.dtype, bytes);
    const fresh = values.buffer !== bytes.buffer;
    for (const name of names) {
      const t = tensors.get(name) as TensorRef;
      const viewKey = `${s.key}:${t.offset}:${t.shape.join(",")}:${t.stride.join(",")}`;
      let data = arrays.get(viewKey);
      if (!data) {
        data = gather(values, fresh, t, Number(product(t.shape)));
        arrays.set(viewKey, data);
      }
      out.set(name, { dtype: s.dtype, shape: t.shape.slice(), data });
    }
  }
  // Back in the state dict's order.
  return new Map([...tensors.keys()].map((name) => [name, out.get(name) as PthTensor]));
}

/**
 * Reads the state dict of a `.pth` file already in memory (see `loadPth`);
 * `source` names the file in messages. Resolves to the tensors in the state
 * dict's order, converted to float32; rejects with a `UserError` for a corrupt
 * file, anything but a state dict of float32/float16/bfloat16 tensors, or a
 * pickle that asks for any code.
 *
 * @example
 * ```ts
 * import { readPthStateDict } from "./pth.ts";
 * const bytes = await Deno.readFile("tests/fixtures/pth/views.pth");
 * const tensors = await readPthStateDict(bytes, "views.pth");
 * const t = tensors.get("transposed")!; // base.t() of a [4, 6] base
 * if (t.shape.join() !== "6,4" || t.data[1] !== 0) throw new Error("read back");
 * ```
 */
export async function readPthStateDict(
  bytes: Uint8Array,
  source: string,
): Promise<Map<string, PthTensor>> {
  return await readFromSource(bufferSource(bytes), source);
}

/**
 * Reads the state dict of a `.pth` file written by `torch.save`: MiniMind's
 * `out/<stage>_<hidden>.pth` (a dict of half tensors with Hugging Face
 * names), its `checkpoints/*_resume.pth` (the same under `"model"`), or
 * `torch.save(model.state_dict())`. Reads only the central directory, the
 * pickle and the state dict's storages.
 *
 * @example
 * ```ts
 * import { loadPth } from "./pth.ts";
 * const tensors = await loadPth("tests/fixtures/pth/minimind_f16.pth");
 * const emb = tensors.get("model.embed_tokens.weight")!;
 * if (emb.dtype !== "F16" || emb.shape.join() !== "72,32") throw new Error("read back");
 * ```
 */
export async function loadPth(path: string): Promise<Map<string, PthTensor>> {
  const src = await fileSource(path);
  try {
    return await readFromSource(src, path);
  } finally {
    src.close();
  }
}
