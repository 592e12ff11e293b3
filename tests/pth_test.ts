/**
 * Tests of io/pth.ts against real `torch.save` output (tests/fixtures/pth,
 * made by scripts/make_pth_fixtures.py with torch 2.13 and transformers 5.18),
 * hostile and corrupt archives, and a seeded fuzz loop. One optional test
 * calls PyTorch (`$PYTHON`, default `python3`) to save fresh random views and
 * reports itself ignored where torch cannot be imported.
 */
import { loadPth, type PthTensor, readPthStateDict } from "../io/pth.ts";
import { MODEL_CONFIG_FIELDS, type ModelConfig } from "../model/config.ts";
import { parameterSpecs } from "../model/params.ts";
import { modelForward } from "../model/reference.ts";
import { UserError } from "../util/errors.ts";
import { Rng } from "../util/random.ts";
import { findPython } from "./helpers.ts";
import {
  assert,
  assertClose,
  assertEquals,
  assertRejects,
  assertStringIncludes,
} from "./assert.ts";

const DIR = "tests/fixtures/pth";

interface TensorRecord {
  dtype: string;
  shape: number[];
  sha256: string;
  samples: [number, number][];
}

interface ModelFixture {
  config: ModelConfig;
  input_ids: number[];
  logits: number[][];
}

async function readJson<T>(name: string): Promise<T> {
  return JSON.parse(await Deno.readTextFile(`${DIR}/${name}`)) as T;
}

/** SHA-256 of the values as little-endian float32 (every host Deno runs on is little-endian). */
async function sha256(data: Float32Array): Promise<string> {
  const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength).slice();
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return [...digest].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** The tensors equal what the fixture script recorded from torch.load: names, order, dtype, shape, values. */
async function checkRecords(
  what: string,
  tensors: Map<string, PthTensor>,
  records: Record<string, TensorRecord>,
): Promise<void> {
  assertEquals([...tensors.keys()], Object.keys(records), `${what}: names`);
  for (const [name, rec] of Object.entries(records)) {
    const t = tensors.get(name) as PthTensor;
    assertEquals(t.dtype, rec.dtype, `${what} ${name}: dtype`);
    assertEquals(t.shape, rec.shape, `${what} ${name}: shape`);
    assertEquals(t.data.length, rec.shape.reduce((a, b) => a * b, 1), `${what} ${name}: length`);
    // Exact: f16 and bf16 widen to f32 exactly, and the JSON holds each f32 as a double.
    for (const [i, v] of rec.samples) assertEquals(t.data[i], v, `${what} ${name}[${i}]`);
    assertEquals(await sha256(t.data), rec.sha256, `${what} ${name}: values`);
  }
}

// ---------------------------------------------------------------------------
// Real torch.save output.

const MODELS = ["minimind_f16", "llama_f32", "llama_bf16", "minimind3_qk"];

for (const name of MODELS) {
  Deno.test(`pth: ${name}: tensors as torch.load gives them, from a file and from bytes`, async () => {
    const records = await readJson<Record<string, TensorRecord>>(`${name}.tensors.json`);
    await checkRecords(`${name} (file)`, await loadPth(`${DIR}/${name}.pth`), records);
    const bytes = await Deno.readFile(`${DIR}/${name}.pth`);
    await checkRecords(`${name} (bytes)`, await readPthStateDict(bytes, `${name}.pth`), records);
  });

  Deno.test(`pth: ${name}: our reference model on its tensors gives Transformers' logits`, async () => {
    const fx = await readJson<ModelFixture>(`${name}.json`);
    const config = fx.config;
    assertEquals(Object.keys(config).sort(), [...MODEL_CONFIG_FIELDS].sort(), "config fields");
    const tensors = await loadPth(`${DIR}/${name}.pth`);
    const params = new Map<string, Float64Array>();
    const specs = parameterSpecs(config);
    for (const spec of specs) {
      const t = tensors.get(spec.name);
      assert(t, `${name}: no tensor ${spec.name}`);
      assertEquals(t.shape, spec.shape, `${name} ${spec.name}: shape`);
      params.set(spec.name, Float64Array.from(t.data));
    }
    // The only name beyond our layout: MiniMind's tied head, saved twice.
    const extra = [...tensors.keys()].filter((k) => !specs.some((s) => s.name === k));
    assertEquals(extra, name.startsWith("minimind") ? ["lm_head.weight"] : [], `${name}: extra`);
    const ids = fx.input_ids;
    const T = ids.length;
    const { logits } = modelForward(config, params, {
      ids: Int32Array.from(ids),
      targets: Int32Array.from(ids),
      mask: new Float32Array(T).fill(1),
      B: 1,
      T,
    });
    assertEquals(fx.logits.length, T);
    // Transformers computed in float32 (rounding ~6e-8 relative per op, a few
    // hundred ops deep; seen here: at most 2.4e-6 off our float64 reference on
    // logits of magnitude up to ~5). 1e-5 (1 + |logit|) is a few times that and
    // far below the O(0.1) change that a misread tensor, a transposed weight or
    // a wrong eps/theta causes.
    assertClose(logits, fx.logits.flat(), { atol: 1e-5, rtol: 1e-5 }, `${name} logits`);
  });
}

Deno.test("pth: MiniMind's way keeps the tied head twice, as two storages of equal values", async () => {
  const t = await loadPth(`${DIR}/minimind_f16.pth`);
  const emb = t.get("model.embed_tokens.weight") as PthTensor;
  const head = t.get("lm_head.weight") as PthTensor;
  assertEquals(head.data, emb.data);
  assert(head.data !== emb.data, "separate storages give separate arrays");
  assert(!(await loadPth(`${DIR}/llama_bf16.pth`)).has("lm_head.weight"));
  const qk = await loadPth(`${DIR}/minimind3_qk.pth`);
  assertEquals((qk.get("model.layers.1.self_attn.k_norm.weight") as PthTensor).shape, [8]);
});

Deno.test('pth: MiniMind\'s resume file: the state dict under "model", the optimizer left', async () => {
  const records = await readJson<Record<string, TensorRecord>>("resume.tensors.json");
  await checkRecords("resume", await loadPth(`${DIR}/resume.pth`), records);
});

Deno.test("pth: views of shared storages: offsets, transposes, columns, scalars, empty", async () => {
  const records = await readJson<Record<string, TensorRecord>>("views.tensors.json");
  const views = await loadPth(`${DIR}/views.pth`);
  await checkRecords("views", views, records);
  // base[i][j] = (6 i + j) / 2 - 3, a [4, 6] float32 tensor.
  const base = (i: number, j: number) => (6 * i + j) / 2 - 3;
  const get = (k: string) => views.get(k) as PthTensor;
  const tr = get("transposed");
  for (let j = 0; j < 6; j++) {
    for (let i = 0; i < 4; i++) {
      assertEquals(tr.data[4 * j + i], base(i, j), `transposed[${j}][${i}]`);
    }
  }
  assertEquals([...get("column").data], [0, 1, 2, 3].map((i) => base(i, 2)));
  assertEquals([...get("rows").data], Array.from({ length: 12 }, (_, k) => base(1, 0) + k / 2));
  assertEquals(get("scalar").shape, []);
  assertEquals([...get("scalar").data], [base(2, 5)]);
  assertEquals(get("empty").shape, [0, 6]);
  assertEquals(get("empty").data.length, 0);
  assertEquals(get("half_t").dtype, "F16");
});

Deno.test("pth: pickle protocol 4, deflated entries and ZIP64 fields read the same", async () => {
  const views = await loadPth(`${DIR}/views.pth`);
  for (const name of ["views_p4", "deflated", "zip64"]) {
    assertEquals(await loadPth(`${DIR}/${name}.pth`), views, name);
  }
});

// ---------------------------------------------------------------------------
// Refusals: hostile, unsupported and corrupt fixtures.

const REFUSED: [string, string[]][] = [
  ["os_system", [
    "refusing to load",
    "os.system",
    "data.pkl byte 2",
    "nothing in the file was run",
  ]],
  ["posix_system_p4", ["refusing to load", "posix.system"]],
  ["reduce_subprocess", ["refusing to load", "subprocess.check_output"]],
  ["plain_object", ["refusing to load", "__main__.Plain"]],
  ["load_from_bytes", ["refusing to load", "torch.storage._load_from_bytes"]],
  ["bad_persistent_id", ["refusing to load", 'persistent object of kind "module"']],
  ["huge_numel", ["a storage of 1152921504606846976 elements"]],
  ["huge_shape", ["tensor w", "4611686018427387904 elements", "holds only 2"]],
  ["missing_record", ["tensor w", "data/7", "lacks"]],
  ["expanded", ["tensor w", "expand()", ".contiguous()"]],
  ["legacy", ["legacy format", "_use_new_zipfile_serialization"]],
  ["moe", ["mixture-of-experts", "model.layers.0.mlp.gate.weight"]],
];

for (const [name, parts] of REFUSED) {
  Deno.test(`pth: ${name}.pth is refused with a clear message`, async () => {
    const path = `${DIR}/${name}.pth`;
    const e = await assertRejects(() => loadPth(path), UserError);
    for (const part of [path, ...parts]) assertStringIncludes(e.message, part);
    const bytes = await Deno.readFile(path);
    const e2 = await assertRejects(() => readPthStateDict(bytes, "x.pth"), UserError);
    assertEquals(e2.message, e.message.replaceAll(path, "x.pth"));
  });
}

// ---------------------------------------------------------------------------
// Hand-built archives: a ZIP writer (stored entries) and a CRC-32 of our own,
// independent of the reader's.

function crc32(data: Uint8Array): number {
  let c = 0xffffffff;
  for (const b of data) {
    c ^= b;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  }
  return (c ^ 0xffffffff) >>> 0;
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** A ZIP archive of stored entries, with correct sizes and CRCs. */
function zipStored(files: [string, Uint8Array][]): Uint8Array {
  const parts: Uint8Array[] = [];
  const central: Uint8Array[] = [];
  let offset = 0;
  for (const [name, data] of files) {
    const n = new TextEncoder().encode(name);
    const crc = crc32(data);
    const local = new Uint8Array(30 + n.length);
    const lv = new DataView(local.buffer);
    lv.setUint32(0, 0x04034b50, true);
    lv.setUint16(4, 20, true);
    lv.setUint32(14, crc, true);
    lv.setUint32(18, data.length, true);
    lv.setUint32(22, data.length, true);
    lv.setUint16(26, n.length, true);
    local.set(n, 30);
    const c = new Uint8Array(46 + n.length);
    const cv = new DataView(c.buffer);
    cv.setUint32(0, 0x02014b50, true);
    cv.setUint16(4, 20, true);
    cv.setUint16(6, 20, true);
    cv.setUint32(16, crc, true);
    cv.setUint32(20, data.length, true);
    cv.setUint32(24, data.length, true);
    cv.setUint16(28, n.length, true);
    cv.setUint32(42, offset, true);
    c.set(n, 46);
    parts.push(local, data);
    central.push(c);
    offset += local.length + data.length;
  }
  const cd = concat(central);
  const end = new Uint8Array(22);
  const ev = new DataView(end.buffer);
  ev.setUint32(0, 0x06054b50, true);
  ev.setUint16(8, files.length, true);
  ev.setUint16(10, files.length, true);
  ev.setUint32(12, cd.length, true);
  ev.setUint32(16, offset, true);
  return concat([...parts, cd, end]);
}

/** The entries of a known-good torch.save archive (no ZIP64 values, no comment). */
function unzipEntries(file: Uint8Array): [string, Uint8Array][] {
  const v = new DataView(file.buffer, file.byteOffset, file.byteLength);
  const end = file.length - 22;
  assertEquals(v.getUint32(end, true), 0x06054b50);
  const count = v.getUint16(end + 10, true);
  let p = v.getUint32(end + 16, true);
  const out: [string, Uint8Array][] = [];
  for (let k = 0; k < count; k++) {
    const size = v.getUint32(p + 20, true);
    const nameLen = v.getUint16(p + 28, true);
    const name = new TextDecoder().decode(file.subarray(p + 46, p + 46 + nameLen));
    const local = v.getUint32(p + 42, true);
    const data = local + 30 + v.getUint16(local + 26, true) + v.getUint16(local + 28, true);
    out.push([name, file.slice(data, data + size)]);
    p += 46 + nameLen + v.getUint16(p + 30, true) + v.getUint16(p + 32, true);
  }
  return out;
}

const latin1 = (s: string) => Uint8Array.from(s, (c) => c.charCodeAt(0));

/** A torch-like archive holding `pickle` as data.pkl and little-endian storages. */
function torchZip(
  pickle: Uint8Array,
  storages: Uint8Array[] = [],
  extra: [string, Uint8Array][] = [],
) {
  return zipStored([
    ["archive/data.pkl", pickle],
    ["archive/byteorder", latin1("little")],
    ...storages.map((s, i): [string, Uint8Array] => [`archive/data/${i}`, s]),
    ...extra,
  ]);
}

/** Pickle (protocol 2) of `{key: tensor}` for a storage of `type` with key "0". */
function oneTensorPickle(type: string, numel: number, size: number[], key = "w"): Uint8Array {
  const u = (s: string) => `X${String.fromCharCode(s.length, 0, 0, 0)}${s}`;
  const ints = (xs: number[]) => `(${xs.map((x) => `J${latin1Int(x)}`).join("")}t`;
  const stride = size.map((_, i) => size.slice(i + 1).reduce((a, b) => a * b, 1));
  return latin1(
    `\x80\x02}(${u(key)}ctorch._utils\n_rebuild_tensor_v2\n((${u("storage")}ctorch\n${type}\n` +
      `${u("0")}${u("cpu")}J${latin1Int(numel)}tQJ${latin1Int(0)}${ints(size)}${ints(stride)}` +
      `\x89ccollections\nOrderedDict\n)RtRu.`,
  );
}

function latin1Int(x: number): string {
  return String.fromCharCode(x & 0xff, (x >>> 8) & 0xff, (x >>> 16) & 0xff, (x >>> 24) & 0xff);
}

const f32Bytes = (xs: number[]) => new Uint8Array(Float32Array.from(xs).buffer);

Deno.test("pth: hand-built archives: the happy path, then one thing wrong at a time", async () => {
  const read = (bytes: Uint8Array) => readPthStateDict(bytes, "t.pth");
  const ok = await read(torchZip(oneTensorPickle("FloatStorage", 3, [3]), [f32Bytes([1, 2, 3])]));
  assertEquals([...ok], [["w", { dtype: "F32", shape: [3], data: Float32Array.of(1, 2, 3) }]]);

  const cases: [string, Uint8Array, string][] = [
    ["empty file", new Uint8Array(0), "too short for a ZIP archive"],
    ["not a zip", latin1("hello, this is not a checkpoint at all"), "not a ZIP archive"],
    [
      "big-endian",
      zipStored([
        ["archive/data.pkl", oneTensorPickle("FloatStorage", 1, [1])],
        ["archive/byteorder", latin1("big")],
      ]),
      'byte order is "big"',
    ],
    ["no data.pkl", zipStored([["archive/version", latin1("3\n")]]), "no <name>/data.pkl"],
    [
      "two archives",
      zipStored([["a/data.pkl", latin1("\x80\x02}.")], ["b/data.pkl", latin1("\x80\x02}.")]]),
      "2 archives",
    ],
    ["empty dict", torchZip(latin1("\x80\x02}.")), "empty dict"],
    ["a list", torchZip(latin1("\x80\x02].")), "holds a list"],
    ["unknown opcode", torchZip(latin1("\x80\x02\xff.")), "unknown opcode"],
    ["builtins.eval", torchZip(latin1("\x80\x02cbuiltins\neval\n.")), "builtins.eval"],
    ["NEWOBJ", torchZip(latin1("\x80\x02)\x81.")), "pickle opcode NEWOBJ"],
    ["INST", torchZip(latin1("\x80\x02(ios\nsystem\n.")), "pickle opcode INST"],
    ["protocol 6", torchZip(latin1("\x80\x06}.")), "pickle protocol 6"],
    ["no STOP", torchZip(latin1("\x80\x02}")), "the pickle ends"],
    ["stack underflow", torchZip(latin1("\x80\x02s.")), "pops an empty stack"],
    ["int64 tensor", torchZip(oneTensorPickle("LongStorage", 1, [1])), "int64 tensor"],
    [
      "record size",
      torchZip(oneTensorPickle("FloatStorage", 3, [3]), [f32Bytes([1, 2])]),
      "its record holds 8 bytes",
    ],
    [
      "non-tensor value",
      torchZip(latin1("\x80\x02}(X\x02\x00\x00\x00lrG?\xb9\x99\x99\x99\x99\x99\x9au.")),
      '"lr" is a number',
    ],
  ];
  for (const [what, bytes, part] of cases) {
    const e = await assertRejects(() => read(bytes), UserError, part);
    assertStringIncludes(e.message, "t.pth", what);
  }

  // A storage byte changed after the CRC was computed.
  const good = torchZip(oneTensorPickle("FloatStorage", 3, [3]), [f32Bytes([1, 2, 3])]);
  const flipped = good.slice();
  const data = f32Bytes([1, 2, 3]);
  const at = flipped.findIndex((_, k) => data.every((b, j) => flipped[k + j] === b));
  assert(at > 0);
  flipped[at + 7] ^= 1; // the top byte of 2.0f
  await assertRejects(() => read(flipped), UserError, "CRC-32");
});

Deno.test("pth: truncated real files are refused", async () => {
  const bytes = await Deno.readFile(`${DIR}/minimind_f16.pth`);
  for (const n of [0, 1, 21, 22, 100, bytes.length >> 1, bytes.length - 23, bytes.length - 1]) {
    await assertRejects(() => readPthStateDict(bytes.subarray(0, n), "cut.pth"), UserError);
  }
});

// ---------------------------------------------------------------------------
// Fuzzing: a few hundred seeded mutations. Each read must resolve (to tensors
// of consistent sizes) or reject with a UserError, promptly.

type Mutation = (b: Uint8Array, rng: Rng) => Uint8Array;

/** Every pickle opcode byte, so that mutations reach each branch of the pickle machine. */
const OPCODE_BYTES = [
  ...latin1("(.0123FIJKLMNPQRSTUVXabcdeghijlopqrstu}])GBC"),
  ...Array.from({ length: 0x19 }, (_, i) => 0x80 + i), // PROTO (0x80) to READONLY_BUFFER (0x98)
];

const MUTATIONS: Mutation[] = [
  (b, rng) => { // flip a bit
    const c = b.slice();
    if (c.length) c[rng.nextInt(c.length)] ^= 1 << rng.nextInt(8);
    return c;
  },
  (b, rng) => { // an opcode anywhere
    const c = b.slice();
    if (c.length) c[rng.nextInt(c.length)] = OPCODE_BYTES[rng.nextInt(OPCODE_BYTES.length)];
    return c;
  },
  (b, rng) => b.slice(0, rng.nextInt(b.length + 1)), // truncate
  (b, rng) => { // delete a span
    const at = rng.nextInt(b.length + 1);
    return concat([b.subarray(0, at), b.subarray(at + 1 + rng.nextInt(8))]);
  },
  (b, rng) => { // insert random bytes
    const at = rng.nextInt(b.length + 1);
    const ins = Uint8Array.from({ length: 1 + rng.nextInt(8) }, () => rng.nextInt(256));
    return concat([b.subarray(0, at), ins, b.subarray(at)]);
  },
  (b, rng) => { // duplicate a span elsewhere
    const from = rng.nextInt(b.length + 1);
    const span = b.slice(from, from + 1 + rng.nextInt(32));
    const at = rng.nextInt(b.length + 1);
    return concat([b.subarray(0, at), span, b.subarray(at)]);
  },
  (b, rng) => { // an extreme 32-bit value (sizes, offsets, lengths)
    const c = b.slice();
    if (c.length < 4) return c;
    const v = [0, 1, 0x7fffffff, 0x80000000, 0xffffffff, 0xfffffffe][rng.nextInt(6)];
    new DataView(c.buffer).setUint32(rng.nextInt(c.length - 3), v, true);
    return c;
  },
];

async function fuzz(
  label: string,
  seed: number,
  rounds: number,
  input: Uint8Array,
  build: (mutated: Uint8Array) => Uint8Array,
  focus?: (rng: Rng, b: Uint8Array) => Uint8Array,
): Promise<{ loaded: number; refused: number }> {
  const rng = new Rng(seed);
  let loaded = 0;
  let refused = 0;
  for (let round = 0; round < rounds; round++) {
    let b = input;
    const n = 1 + rng.nextInt(3);
    for (let k = 0; k < n; k++) b = MUTATIONS[rng.nextInt(MUTATIONS.length)](b, rng);
    if (focus) b = focus(rng, b);
    const file = build(b);
    const t0 = performance.now();
    try {
      const tensors = await readPthStateDict(file, "fuzz.pth");
      for (const [name, t] of tensors) {
        assertEquals(
          t.data.length,
          t.shape.reduce((a, d) => a * d, 1),
          `${label} ${round} ${name}`,
        );
      }
      loaded++;
    } catch (e) {
      if (!(e instanceof UserError)) {
        throw new Error(`${label}, seed ${seed}, round ${round}: threw ${String(e)}`, { cause: e });
      }
      refused++;
    }
    const ms = performance.now() - t0;
    // A 45 KB file reads in milliseconds; 2 s means something loops.
    assert(ms < 2000, `${label}, seed ${seed}, round ${round}: took ${ms.toFixed(0)} ms`);
  }
  return { loaded, refused };
}

Deno.test("pth fuzz: mutated pickles inside valid archives", async () => {
  const entries = unzipEntries(await Deno.readFile(`${DIR}/minimind_f16.pth`));
  const i = entries.findIndex(([n]) => n.endsWith("/data.pkl"));
  const pickle = entries[i][1];
  // Sanity: the rebuilt archive reads as the original.
  const rebuilt = (p: Uint8Array) => zipStored(entries.map(([n, d], k) => [n, k === i ? p : d]));
  assertEquals(
    await readPthStateDict(rebuilt(pickle), "x"),
    await loadPth(`${DIR}/minimind_f16.pth`),
  );
  const r = await fuzz("pickle", 20240601, 300, pickle, rebuilt);
  // Both outcomes occur: the loop reaches past the first opcode.
  assert(r.refused > 0 && r.loaded > 0, `loaded ${r.loaded}, refused ${r.refused}`);
});

Deno.test("pth fuzz: mutated files (directory, headers, data, deflate)", async () => {
  const files: [string, number][] = [["minimind_f16", 7], ["views", 8], ["deflated", 9], [
    "zip64",
    10,
  ]];
  for (const [name, seed] of files) {
    const bytes = await Deno.readFile(`${DIR}/${name}.pth`);
    // Half the rounds aim at the last 300 bytes, where the central directory
    // and end records are; the rest hit anywhere (mostly tensor data, which
    // the CRC-32 check catches).
    const tailFocus = (rng: Rng, b: Uint8Array) => {
      if (rng.nextInt(2) || b.length < 300) return b;
      const c = b.slice();
      const at = b.length - 1 - rng.nextInt(300);
      c[at] = rng.nextInt(256);
      return c;
    };
    await fuzz(name, seed, 100, bytes, (b) => b, tailFocus);
  }
});

// ---------------------------------------------------------------------------
// Optional: PyTorch saves fresh random views now, and we read what torch.load reads.

const { python: PYTHON, missing } = findPython(["torch"]);
if (missing) console.log(`pth_test: skipping the live torch.save test: ${missing}`);

const VIEWS_SCRIPT = `
import json, sys, torch
g = torch.Generator().manual_seed(int(sys.argv[2]))
state, expected = {}, {}
for i, dtype in enumerate([torch.float32, torch.float16, torch.bfloat16] * 4):
    nd = int(torch.randint(1, 5, (1,), generator=g))
    shape = [int(d) for d in torch.randint(1, 7, (nd,), generator=g)]
    base = torch.randn(shape, generator=g).to(dtype)
    view = base
    if nd > 1:
        view = view.permute(*torch.randperm(nd, generator=g).tolist())
    if view.shape[0] > 2:
        view = view[1::2]
    if view.dim() > 1 and view.shape[-1] > 1:
        view = view[..., 1:]
    state[f"t{i}"] = view
    expected[f"t{i}"] = {"shape": list(view.shape), "values": view.float().reshape(-1).tolist()}
torch.save(state, sys.argv[1])
print(json.dumps(expected))
`;

Deno.test({
  name: "pth: random views torch.save writes now read as torch.load reads them",
  ignore: missing !== undefined,
  fn: async () => {
    const dir = await Deno.makeTempDir();
    try {
      for (const seed of [1, 2, 3]) {
        const path = `${dir}/v${seed}.pth`;
        const out = await new Deno.Command(PYTHON!, {
          args: ["-c", VIEWS_SCRIPT, path, String(seed)],
          stdout: "piped",
          stderr: "piped",
        }).output();
        assert(out.success, new TextDecoder().decode(out.stderr));
        const expected: Record<string, { shape: number[]; values: number[] }> = JSON.parse(
          new TextDecoder().decode(out.stdout),
        );
        const got = await loadPth(path);
        assertEquals([...got.keys()], Object.keys(expected));
        for (const [name, e] of Object.entries(expected)) {
          const t = got.get(name) as PthTensor;
          assertEquals(t.shape, e.shape, `seed ${seed} ${name}: shape`);
          assertEquals([...t.data], e.values, `seed ${seed} ${name}: values`);
        }
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
