/**
 * Checkpoints: a directory that Hugging Face Transformers loads as it is,
 * plus what resuming a run needs.
 *
 * ```
 * <dir>/config.json              LlamaForCausalLM, or Qwen3ForCausalLM with QK-norm
 * <dir>/generation_config.json   bos / eos / pad ids
 * <dir>/model.safetensors        F32, HF tensor names (tied head: no lm_head.weight)
 * <dir>/tokenizer.json           as given
 * <dir>/tokenizer_config.json    as given
 * <dir>/optimizer.safetensors    AdamW moments `<param>.exp_avg`, `<param>.exp_avg_sq` (optional)
 * <dir>/trainer_state.json       the training loop's JSON object (optional)
 * ```
 *
 * Saving is atomic; the protocol (single writer per directory):
 *
 * 1. Write every file into a sibling `<dir>.tmp-<random>` and fsync each file
 *    and the directory. Files of the old checkpoint that we do not manage
 *    (a README, a loss curve, ...) are hard-linked (or copied) into it too.
 * 2. If `<dir>` exists, rename it to `<dir>.old-<random>`.
 * 3. Rename `<dir>.tmp-<random>` to `<dir>`; fsync the parent.
 * 4. Remove `<dir>.old-<random>` and any other `.tmp-` / `.old-` sibling.
 *
 * A crash before step 3 leaves `<dir>` (before step 2) or `<dir>.old-*`
 * (between 2 and 3) whole; a `.tmp-` sibling is never complete-by-contract and
 * is never loaded. So: `<dir>` present means it is the checkpoint, whatever
 * siblings exist; `<dir>` missing with one `<dir>.old-*` means a crash between
 * steps 2 and 3, and loading reads the `.old-` directory (saving then
 * completes the protocol). A thrown error (a full disk) removes the temp
 * directory and leaves `<dir>` untouched.
 *
 * Loading accepts models trained elsewhere: F32/F16/BF16 weights, one
 * `model.safetensors` or a sharded `model.safetensors.index.json`, tied or
 * untied heads; every tensor's presence and shape is checked against the
 * config, with errors that name the tensor and the config field.
 *
 * @module
 */

import { type ModelConfig, validateConfig } from "../model/config.ts";
import {
  fromHfConfig,
  type ParsedGenerationConfig,
  parseGenerationConfig,
  type SamplingDefaults,
  specialIdsFromTokenizerFiles,
  type SpecialTokenIds,
  toGenerationConfig,
  toHfConfig,
} from "./hf_config.ts";
import { parameterSpecs } from "../model/params.ts";
import {
  openSafetensors,
  type SafetensorsFile,
  type TensorInfo,
  type TensorToWrite,
  writeSafetensors,
} from "./safetensors.ts";
import { UserError } from "../util/errors.ts";

/** Everything a checkpoint holds. */
export interface CheckpointContents {
  /** The model's shape (`config.json`). */
  config: ModelConfig;
  /** Every tensor of `parameterSpecs(config)`, by HF name. */
  params: Map<string, Float32Array>;
  /** The tokenizer files' contents. */
  tokenizer: { tokenizerJson: string; tokenizerConfigJson: string };
  /** bos / eos / pad ids, written to `config.json` and `generation_config.json`. */
  special: SpecialTokenIds;
  /** AdamW first (`m`) and second (`v`) moments, by parameter name. */
  optimizer?: { m: Map<string, Float32Array>; v: Map<string, Float32Array> };
  /** The training loop's state (step, schedule, data position, RNG state, run config). */
  state?: Record<string, unknown>;
  /** Sampling defaults for `generation_config.json` (then `do_sample: true`); none: greedy. */
  sampling?: SamplingDefaults;
}

/** The steps of the save protocol, for `SaveCheckpointOptions.onStep`. */
export type SaveStep = "written" | "old-moved-aside" | "new-in-place";

/** Options of `saveCheckpoint`. */
export interface SaveCheckpointOptions {
  /**
   * Called after each chunk written to a file in the temp directory (file name,
   * bytes of that file so far). Throwing simulates a full disk.
   */
  onWrite?: (file: string, bytesWritten: number) => void;
  /**
   * Called after each step of the protocol. Throwing simulates a crash at that
   * point: nothing is cleaned up, as after a killed process.
   */
  onStep?: (step: SaveStep) => void;
}

/** Files a training run keeps in its checkpoint directory beside the checkpoint itself. */
const RUN_FILES = new Set(["metrics.jsonl", "loss.svg"]);

/** File names a checkpoint consists of. */
const FILES = {
  config: "config.json",
  generation: "generation_config.json",
  model: "model.safetensors",
  modelIndex: "model.safetensors.index.json",
  tokenizer: "tokenizer.json",
  tokenizerConfig: "tokenizer_config.json",
  optimizer: "optimizer.safetensors",
  state: "trainer_state.json",
} as const;

/**
 * Files of an old checkpoint that a save replaces or drops rather than carries
 * over: ours, and the other weight layouts (stale weights beside new ones
 * would be loaded by some tools instead of ours).
 */
function isManagedFile(name: string): boolean {
  return (Object.values(FILES) as string[]).includes(name) ||
    /^model-\d+-of-\d+\.safetensors$/.test(name) ||
    /^pytorch_model.*\.bin(\.index\.json)?$/.test(name);
}

/** `dir` without trailing separators; its parent and base name. */
function splitDir(dir: string): { dir: string; parent: string; base: string } {
  const clean = dir.replace(/[\\/]+$/, "") || dir;
  const cut = Math.max(clean.lastIndexOf("/"), clean.lastIndexOf("\\"));
  const parent = cut < 0 ? "." : cut === 0 ? clean[0] : clean.slice(0, cut);
  return { dir: clean, parent, base: clean.slice(cut + 1) };
}

function join(a: string, b: string): string {
  return a.endsWith("/") || a.endsWith("\\") ? a + b : `${a}/${b}`;
}

function randomSuffix(): string {
  const b = crypto.getRandomValues(new Uint8Array(6));
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

async function exists(path: string): Promise<Deno.FileInfo | undefined> {
  try {
    return await Deno.stat(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return undefined;
    throw e;
  }
}

/** Siblings `<base>.tmp-*` and `<base>.old-*` of a checkpoint directory. */
async function leftovers(parent: string, base: string): Promise<{ tmp: string[]; old: string[] }> {
  const tmp: string[] = [];
  const old: string[] = [];
  try {
    for await (const e of Deno.readDir(parent)) {
      if (!e.isDirectory) continue;
      if (e.name.startsWith(`${base}.tmp-`)) tmp.push(join(parent, e.name));
      if (e.name.startsWith(`${base}.old-`)) old.push(join(parent, e.name));
    }
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  return { tmp: tmp.sort(), old: old.sort() };
}

/**
 * The directory a checkpoint is read from: `dir` itself, or, when it is
 * missing after a crash mid-swap, its one `.old-` sibling.
 */
export async function resolveCheckpointDir(dir: string): Promise<string> {
  const p = splitDir(dir);
  const st = await exists(p.dir);
  if (st) {
    if (!st.isDirectory) throw new UserError(`${p.dir}: not a directory (expected a checkpoint)`);
    return p.dir;
  }
  const { old } = await leftovers(p.parent, p.base);
  if (old.length === 1) return old[0];
  if (old.length > 1) {
    throw new UserError(
      `${p.dir} is missing and several interrupted saves left ${
        old.join(", ")
      }; keep the newest as ${p.dir} and remove the others`,
    );
  }
  throw new UserError(`${p.dir}: no such checkpoint directory`);
}

/** Best-effort fsync of a directory (its entries' renames); not possible on every platform. */
async function syncDir(path: string): Promise<void> {
  let f: Deno.FsFile | undefined;
  try {
    f = await Deno.open(path, { read: true });
    await f.sync();
  } catch {
    // Windows cannot open directories; there the rename itself is the barrier we get.
  } finally {
    f?.close();
  }
}

async function writeFileSynced(
  path: string,
  bytes: Uint8Array,
  onWrite?: (bytesWritten: number) => void,
): Promise<void> {
  const file = await Deno.open(path, { write: true, create: true, truncate: true });
  try {
    const CHUNK = 1 << 20;
    for (let done = 0; done < bytes.length;) {
      done += await file.write(bytes.subarray(done, Math.min(done + CHUNK, bytes.length)));
      onWrite?.(done);
    }
    await file.sync();
  } finally {
    file.close();
  }
}

/** `value` as pretty-printed JSON bytes with a final newline (how every JSON file of ours is written). */
export function jsonBytes(value: unknown): Uint8Array {
  return new TextEncoder().encode(JSON.stringify(value, null, 2) + "\n");
}

/**
 * JSON of the trainer state. A value JSON cannot hold (NaN, a BigInt) is an
 * error rather than a silent null; numbers round-trip exactly (shortest
 * round-trip decimal), except that -0 reads back as 0.
 */
export function stateJson(state: Record<string, unknown>): Uint8Array {
  return jsonBytes(JSON.parse(JSON.stringify(state, (key, v) => {
    if (typeof v === "number" && !Number.isFinite(v)) {
      throw new Error(`trainer state: ${key} = ${v} cannot be stored in JSON`);
    }
    if (typeof v === "bigint" || typeof v === "function" || typeof v === "symbol") {
      throw new Error(`trainer state: ${key} is a ${typeof v}, which JSON cannot store`);
    }
    return v;
  })));
}

/** Hard-links (or copies, across devices) `src` into `dst`, recursively for directories. */
async function linkTree(src: string, dst: string): Promise<void> {
  const st = await Deno.lstat(src);
  if (st.isDirectory) {
    await Deno.mkdir(dst);
    for await (const e of Deno.readDir(src)) await linkTree(join(src, e.name), join(dst, e.name));
  } else if (st.isSymlink) {
    await Deno.symlink(await Deno.readLink(src), dst);
  } else {
    try {
      await Deno.link(src, dst);
    } catch {
      await Deno.copyFile(src, dst);
    }
  }
}

function checkTensors(
  what: string,
  config: ModelConfig,
  tensors: Map<string, Float32Array>,
): void {
  const specs = parameterSpecs(config);
  for (const s of specs) {
    const t = tensors.get(s.name);
    if (!t) throw new Error(`saveCheckpoint: ${what} lack ${s.name}`);
    if (t.length !== s.size) {
      throw new Error(
        `saveCheckpoint: ${what} ${s.name} has ${t.length} elements, shape [${s.shape}] needs ${s.size}`,
      );
    }
  }
  if (tensors.size !== specs.length) {
    const known = new Set(specs.map((s) => s.name));
    const extra = [...tensors.keys()].filter((n) => !known.has(n));
    throw new Error(
      `saveCheckpoint: ${what} have tensors the config does not: ${extra.join(", ")}`,
    );
  }
}

/**
 * Saves a checkpoint atomically (see the module comment for the protocol).
 * `dir` must be new, empty, or a previous checkpoint (it has `config.json`):
 * any other existing directory is refused rather than replaced.
 *
 * @example
 * ```ts
 * import { loadCheckpoint, saveCheckpoint } from "./checkpoint.ts";
 * import { presetConfig } from "../model/config.ts";
 * import { initParameters } from "../model/params.ts";
 * const config = presetConfig("tiny");
 * const tmp = await Deno.makeTempDir();
 * const dir = `${tmp}/ckpt`;
 * await saveCheckpoint(dir, {
 *   config,
 *   params: initParameters(config, 1),
 *   tokenizer: { tokenizerJson: "{}", tokenizerConfigJson: "{}" },
 *   special: { bos: 1, eos: 2, pad: 0 },
 *   state: { step: 0 },
 * });
 * const back = await loadCheckpoint(dir);
 * await Deno.remove(tmp, { recursive: true });
 * if (back.params.size !== 20 || back.state?.step !== 0) throw new Error("round trip");
 * ```
 */
export async function saveCheckpoint(
  dir: string,
  c: CheckpointContents,
  opts: SaveCheckpointOptions = {},
): Promise<void> {
  validateConfig(c.config);
  checkTensors("params", c.config, c.params);
  if (c.optimizer) {
    checkTensors("optimizer moments m", c.config, c.optimizer.m);
    checkTensors("optimizer moments v", c.config, c.optimizer.v);
  }
  for (const [k, id] of Object.entries(c.special)) {
    if (!Number.isInteger(id) || id < 0 || id >= c.config.vocab_size) {
      throw new Error(`saveCheckpoint: special.${k} = ${id} is not a token id below vocab_size`);
    }
  }
  const stateBytes = c.state ? stateJson(c.state) : undefined;
  await replaceDirectory(dir, {
    ...opts,
    markers: [FILES.config],
    isManaged: isManagedFile,
    write: async (put, tmp, hook) => {
      await put(FILES.config, jsonBytes(toHfConfig(c.config, c.special)));
      await put(FILES.generation, jsonBytes(toGenerationConfig(c.special, c.sampling)));
      const specs = parameterSpecs(c.config);
      const tensorsOf = (m: Map<string, Float32Array>, suffix = "") =>
        new Map<string, TensorToWrite>(
          specs.map((s) => [s.name + suffix, { shape: s.shape, data: m.get(s.name)! }]),
        );
      // `format: pt` is required: Transformers refuses safetensors files whose
      // metadata names another framework.
      await writeSafetensors(join(tmp, FILES.model), tensorsOf(c.params), {
        metadata: { format: "pt" },
        onProgress: hook(FILES.model),
      });
      await put(FILES.tokenizer, new TextEncoder().encode(c.tokenizer.tokenizerJson));
      await put(FILES.tokenizerConfig, new TextEncoder().encode(c.tokenizer.tokenizerConfigJson));
      if (c.optimizer) {
        const moments = new Map([
          ...tensorsOf(c.optimizer.m, ".exp_avg"),
          ...tensorsOf(c.optimizer.v, ".exp_avg_sq"),
        ]);
        await writeSafetensors(join(tmp, FILES.optimizer), moments, {
          metadata: { format: "pt", content: "AdamW exp_avg (m) and exp_avg_sq (v) per parameter" },
          onProgress: hook(FILES.optimizer),
        });
      }
      if (stateBytes) await put(FILES.state, stateBytes);
    },
  });
}

/** What `replaceDirectory` writes and how it recognises a directory it may replace. */
export interface ReplaceDirectoryOptions extends SaveCheckpointOptions {
  /** A directory holding any of these files is ours to replace (as is one of run files only). */
  markers: string[];
  /** Files of the old directory that the new one replaces or drops (others are carried over). */
  isManaged: (name: string) => boolean;
  /**
   * Writes the new contents into the temp directory `tmp`: `put(name, bytes)`
   * writes and syncs one file; `hook(name)` is the progress callback for
   * writers of their own (safetensors).
   */
  write: (
    put: (name: string, bytes: Uint8Array) => Promise<void>,
    tmp: string,
    hook: (name: string) => (bytesWritten: number) => void,
  ) => Promise<void>;
}

/**
 * Replaces directory `dir` with new contents through the checkpoint's atomic
 * protocol (see the module comment): write a temp sibling, move the old
 * directory aside, move the new one in, remove the old. A crash at any point
 * leaves a whole directory, old or new; files the user kept in the old one
 * are carried over. Refuses a directory that is neither ours (`markers`) nor
 * empty of all but run files.
 */
export async function replaceDirectory(dir: string, o: ReplaceDirectoryOptions): Promise<void> {
  const p = splitDir(dir);
  if (p.base === "" || p.base === "." || p.base === "..") {
    throw new UserError(`${dir}: a checkpoint must be a named directory (say, out/ckpt)`);
  }
  const current = await exists(p.dir);
  if (current) {
    if (!current.isDirectory) throw new UserError(`${p.dir}: exists and is not a directory`);
    // A directory is ours to replace when it is a checkpoint, or holds only
    // what a training run writes before its first save (its metrics so far).
    let foreign = false;
    for await (const e of Deno.readDir(p.dir)) {
      if (!RUN_FILES.has(e.name)) {
        foreign = true;
        break;
      }
    }
    let marked = false;
    for (const m of o.markers) if (await exists(join(p.dir, m))) marked = true;
    if (foreign && !marked) {
      throw new UserError(
        `${p.dir}: exists and is not a checkpoint (no ${
          o.markers.join(" or ")
        }); refusing to replace it: choose a new or empty directory`,
      );
    }
  }
  await Deno.mkdir(p.parent, { recursive: true });
  const stale = await leftovers(p.parent, p.base);
  for (const t of stale.tmp) await Deno.remove(t, { recursive: true });

  const tmp = join(p.parent, `${p.base}.tmp-${randomSuffix()}`);
  await Deno.mkdir(tmp);
  try {
    const hook = (name: string) => (n: number) => o.onWrite?.(name, n);
    const put = (name: string, bytes: Uint8Array) =>
      writeFileSynced(join(tmp, name), bytes, hook(name));
    await o.write(put, tmp, hook);
    // Carry over what the user keeps beside our files in the old checkpoint.
    const previous = current ? p.dir : stale.old.length === 1 ? stale.old[0] : undefined;
    if (previous) {
      for await (const e of Deno.readDir(previous)) {
        if (!o.isManaged(e.name)) await linkTree(join(previous, e.name), join(tmp, e.name));
      }
    }
    await syncDir(tmp);
  } catch (e) {
    await Deno.remove(tmp, { recursive: true }).catch(() => {});
    throw e;
  }
  o.onStep?.("written");

  if (current) {
    await Deno.rename(p.dir, join(p.parent, `${p.base}.old-${randomSuffix()}`));
    o.onStep?.("old-moved-aside");
  }
  await Deno.rename(tmp, p.dir);
  await syncDir(p.parent);
  o.onStep?.("new-in-place");
  const done = await leftovers(p.parent, p.base);
  for (const d of [...done.old, ...done.tmp]) await Deno.remove(d, { recursive: true });
}

// ---------------------------------------------------------------------------
// Loading.

/** Options of `loadCheckpoint`. */
export interface LoadCheckpointOptions {
  /** Also load the AdamW moments (for resuming); a checkpoint without them is then an error. */
  optimizer?: boolean;
}

async function readText(path: string, hint = ""): Promise<string> {
  try {
    return await Deno.readTextFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new UserError(`${path}: missing${hint}`);
    throw new UserError(`${path}: cannot read: ${(e as Error).message}`);
  }
}

async function readJson(path: string, hint = ""): Promise<unknown> {
  const text = await readText(path, hint);
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new UserError(`${path}: not valid JSON: ${(e as Error).message}`);
  }
}

/** Where each weight tensor lives: one file, or the shards of an index. */
interface WeightSource {
  files: SafetensorsFile[];
  /** Tensor name -> its file and header entry. */
  tensors: Map<string, { file: SafetensorsFile; info: TensorInfo }>;
}

async function openWeights(dir: string): Promise<WeightSource> {
  const single = join(dir, FILES.model);
  if (await exists(single)) {
    const f = await openSafetensors(single);
    return {
      files: [f],
      tensors: new Map([...f.tensors].map(([n, info]) => [n, { file: f, info }])),
    };
  }
  const indexPath = join(dir, FILES.modelIndex);
  if (!(await exists(indexPath))) {
    const pickles: string[] = [];
    for await (const e of Deno.readDir(dir)) {
      if (/\.(bin|pth|pt)$/.test(e.name)) pickles.push(e.name);
    }
    throw new UserError(
      `${dir}: no ${FILES.model} or ${FILES.modelIndex}` +
        (pickles.length === 1
          ? `; it has PyTorch pickle weights (${pickles[0]}): pass the file itself (${
            join(dir, pickles[0])
          }), which is read as a state dict`
          : pickles.length > 1
          ? `; it has PyTorch pickle weights (${
            pickles.join(", ")
          }): pass one .pth/.pt/.bin state dict file, or save the model with safetensors (save_pretrained(..., safe_serialization=True))`
          : ""),
    );
  }
  const index = await readJson(indexPath);
  const map = (index as { weight_map?: unknown })?.weight_map;
  if (typeof map !== "object" || map === null || Array.isArray(map)) {
    throw new UserError(`${indexPath}: expected an object with a "weight_map" object`);
  }
  const files = new Map<string, SafetensorsFile>();
  const tensors = new Map<string, { file: SafetensorsFile; info: TensorInfo }>();
  try {
    for (const [name, shard] of Object.entries(map)) {
      // Untrusted: a shard must be a plain file name inside the checkpoint.
      if (
        typeof shard !== "string" || !/^[^/\\]+$/.test(shard) || shard === "." || shard === ".."
      ) {
        throw new UserError(
          `${indexPath}: weight_map[${JSON.stringify(name)}] = ${
            JSON.stringify(shard)
          } is not a file name in the checkpoint directory`,
        );
      }
      let f = files.get(shard);
      if (!f) {
        f = await openSafetensors(join(dir, shard));
        files.set(shard, f);
      }
      const info = f.tensors.get(name);
      if (!info) {
        throw new UserError(
          `${indexPath}: ${name} is mapped to ${shard}, which has no such tensor`,
        );
      }
      tensors.set(name, { file: f, info });
    }
  } catch (e) {
    for (const f of files.values()) f.close();
    throw e;
  }
  return { files: [...files.values()], tensors };
}

/** The config field behind each dimension of a parameter, by the tensor's name. */
function dimFields(name: string): string[] {
  const attnQ = "num_attention_heads * head_dim";
  const attnKV = "num_key_value_heads * head_dim";
  if (name === "model.embed_tokens.weight" || name === "lm_head.weight") {
    return ["vocab_size", "hidden_size"];
  }
  if (name.endsWith("q_proj.weight")) return [attnQ, "hidden_size"];
  if (name.endsWith("k_proj.weight") || name.endsWith("v_proj.weight")) {
    return [attnKV, "hidden_size"];
  }
  if (name.endsWith("o_proj.weight")) return ["hidden_size", attnQ];
  if (name.endsWith("q_norm.weight") || name.endsWith("k_norm.weight")) {
    return ["head_dim = hidden_size / num_attention_heads"];
  }
  if (name.endsWith("gate_proj.weight") || name.endsWith("up_proj.weight")) {
    return ["intermediate_size", "hidden_size"];
  }
  if (name.endsWith("down_proj.weight")) return ["hidden_size", "intermediate_size"];
  return ["hidden_size"];
}

/**
 * The error for a tensor whose shape differs from what the config implies:
 * names the tensor, both shapes and the config field behind each dimension.
 */
export function shapeMismatch(
  file: string,
  configPath: string,
  name: string,
  found: number[],
  expected: number[],
): UserError {
  const fields = dimFields(name);
  const dims = expected.map((d, i) => `dim ${i}: ${fields[i] ?? "?"} = ${d}`).join(", ");
  return new UserError(
    `${file}: tensor ${name} has shape [${found.join(", ")}] but ${configPath} implies [${
      expected.join(", ")
    }] (${dims}); the weights do not match the config`,
  );
}

const FLOAT_DTYPES = new Set(["F32", "F16", "BF16", "F64"]);

/** Reads the tensors `specs` names (with a name suffix) from a source, checking presence, shape and dtype. */
async function readChecked(
  source: WeightSource,
  describe: string,
  configPath: string,
  specs: { name: string; shape: number[] }[],
  suffix: string,
  ignore: (name: string) => boolean,
): Promise<Map<string, Float32Array>> {
  const expected = new Set(specs.map((s) => s.name + suffix));
  const missing = specs.filter((s) => !source.tensors.has(s.name + suffix)).map((s) =>
    s.name + suffix
  );
  if (missing.length > 0) {
    throw new UserError(
      `${describe}: missing tensor${missing.length > 1 ? "s" : ""} ${
        missing.slice(0, 5).join(", ")
      }${missing.length > 5 ? ` and ${missing.length - 5} more` : ""} that ${configPath} implies`,
    );
  }
  const unexpected = [...source.tensors.keys()].filter((n) => !expected.has(n) && !ignore(n));
  if (unexpected.length > 0) {
    throw new UserError(
      `${describe}: unexpected tensor${unexpected.length > 1 ? "s" : ""} ${
        unexpected.slice(0, 5).join(", ")
      }${
        unexpected.length > 5 ? ` and ${unexpected.length - 5} more` : ""
      }, which ${configPath} does not imply`,
    );
  }
  for (const s of specs) {
    const { file, info } = source.tensors.get(s.name + suffix)!;
    if (!FLOAT_DTYPES.has(info.dtype)) {
      throw new UserError(
        `${file.path}: tensor ${info.name} has dtype ${info.dtype}; expected F32, F16 or BF16`,
      );
    }
    if (info.shape.length !== s.shape.length || info.shape.some((d, i) => d !== s.shape[i])) {
      throw shapeMismatch(file.path, configPath, info.name, info.shape, s.shape);
    }
  }
  const out = new Map<string, Float32Array>();
  for (const s of specs) {
    const { file } = source.tensors.get(s.name + suffix)!;
    out.set(s.name, (await file.read(s.name + suffix)).data);
  }
  return out;
}

/** Whether two arrays hold the same bits (a tied head saved twice). */
export function bitwiseEqual(a: Float32Array, b: Float32Array): boolean {
  if (a.length !== b.length) return false;
  const x = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const y = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return false;
  return true;
}

/**
 * The special ids the tokenizer files name (see `specialIdsFromTokenizerFiles`),
 * which must lie inside the model's vocabulary.
 */
export function checkedTokenizerIds(
  tokenizer: CheckpointContents["tokenizer"],
  source: string,
  vocabSize: number,
): SpecialTokenIds {
  const ids = specialIdsFromTokenizerFiles(
    tokenizer.tokenizerJson,
    tokenizer.tokenizerConfigJson,
    source,
  );
  for (const [k, id] of Object.entries(ids)) {
    if (id >= vocabSize) {
      throw new UserError(
        `${source}/tokenizer_config.json: the ${k} token is id ${id}, outside the model's vocabulary (vocab_size = ${vocabSize}): the tokenizer does not belong to this model`,
      );
    }
  }
  return ids;
}

/** What `loadCheckpoint` returns beside the contents. */
export interface LoadedCheckpoint extends CheckpointContents {
  /** The directory actually read: `dir`, or its `.old-` sibling after a crash mid-save. */
  source: string;
  /** `generation_config.json` as read (every eos id, sampling defaults); `{}` when absent. */
  generation: ParsedGenerationConfig;
}

/**
 * Loads a checkpoint directory (ours, or a Transformers model directory of a
 * supported architecture).
 */
export async function loadCheckpoint(
  dir: string,
  opts: LoadCheckpointOptions = {},
): Promise<LoadedCheckpoint> {
  const source = await resolveCheckpointDir(dir);
  const configPath = join(source, FILES.config);
  const configJson = await readJson(
    configPath,
    " (not a checkpoint: a checkpoint directory has config.json, model.safetensors and the tokenizer files)",
  );
  const weights = await openWeights(source);
  try {
    const describe = weights.files.length === 1
      ? weights.files[0].path
      : `${join(source, FILES.modelIndex)} (${weights.files.length} shards)`;
    const weightsHaveQkNorm = weights.tensors.has("model.layers.0.self_attn.q_norm.weight");
    const { config, special: fromConfig } = fromHfConfig(configJson, configPath, {
      weightsHaveQkNorm,
    });

    // The head: tied means no lm_head.weight, or one equal to the embedding
    // (some exporters write both); untied needs it.
    const head = weights.tensors.get("lm_head.weight");
    let ignoreHead = false;
    if (config.tie_word_embeddings && head) {
      const emb = weights.tensors.get("model.embed_tokens.weight");
      const [V, H] = [config.vocab_size, config.hidden_size];
      if (head.info.shape.length !== 2 || head.info.shape[0] !== V || head.info.shape[1] !== H) {
        throw shapeMismatch(head.file.path, configPath, "lm_head.weight", head.info.shape, [V, H]);
      }
      if (
        emb &&
        !bitwiseEqual(
          (await head.file.read(head.info.name)).data,
          (await emb.file.read(emb.info.name)).data,
        )
      ) {
        throw new UserError(
          `${describe}: ${configPath} says tie_word_embeddings = true, but lm_head.weight differs from model.embed_tokens.weight; set tie_word_embeddings to false if the head is separate`,
        );
      }
      ignoreHead = true;
    }
    if (!config.tie_word_embeddings && !head) {
      throw new UserError(
        `${describe}: ${configPath} says tie_word_embeddings = false but there is no lm_head.weight; set tie_word_embeddings to true if the head is the embedding`,
      );
    }
    // Older Transformers versions saved RoPE's inverse frequencies as a buffer;
    // they follow from rope_theta and head_dim, so they are not weights.
    const ignore = (n: string) =>
      (ignoreHead && n === "lm_head.weight") || n.endsWith(".rotary_emb.inv_freq");
    const specs = parameterSpecs(config);
    const params = await readChecked(weights, describe, configPath, specs, "", ignore);

    const tokHint =
      ": a checkpoint needs the tokenizer files (tokenizer.json, tokenizer_config.json)";
    const tokenizer = {
      tokenizerJson: await readText(join(source, FILES.tokenizer), tokHint),
      tokenizerConfigJson: await readText(join(source, FILES.tokenizerConfig), tokHint),
    };

    // Special ids: generation_config.json first (what generation uses), then
    // config.json, then the tokenizer's (Transformers loads directories whose
    // configs leave them out; its tokenizer names them).
    const genPath = join(source, FILES.generation);
    const gen: ParsedGenerationConfig = (await exists(genPath))
      ? parseGenerationConfig(await readJson(genPath), genPath, config.vocab_size)
      : {};
    let fromTokenizer: SpecialTokenIds | undefined;
    const tokenizerIds = () =>
      fromTokenizer ??= checkedTokenizerIds(tokenizer, source, config.vocab_size);
    const bos = gen.bos ?? fromConfig.bos ?? tokenizerIds().bos;
    const eos = gen.eos ?? fromConfig.eos ?? tokenizerIds().eos;
    // No pad id is common (Llama); padding is never attended to, so eos serves.
    const special: SpecialTokenIds = { bos, eos, pad: gen.pad ?? fromConfig.pad ?? eos };

    const result: LoadedCheckpoint = {
      config,
      params,
      tokenizer,
      special,
      source,
      generation: gen,
    };

    const statePath = join(source, FILES.state);
    if (await exists(statePath)) {
      const state = await readJson(statePath);
      if (typeof state !== "object" || state === null || Array.isArray(state)) {
        throw new UserError(`${statePath}: expected a JSON object`);
      }
      result.state = state as Record<string, unknown>;
    }

    if (opts.optimizer) {
      const optPath = join(source, FILES.optimizer);
      if (!(await exists(optPath))) {
        throw new UserError(
          `${optPath}: missing: this checkpoint has no optimizer state to resume from (it can still initialize a new run)`,
        );
      }
      const f = await openSafetensors(optPath);
      try {
        const src: WeightSource = {
          files: [f],
          tensors: new Map([...f.tensors].map(([n, info]) => [n, { file: f, info }])),
        };
        const both = [
          ...specs.map((s) => ({ name: s.name + ".exp_avg", shape: s.shape })),
          ...specs.map((s) => ({ name: s.name + ".exp_avg_sq", shape: s.shape })),
        ];
        // One pass checks both sets (no unexpected names), then split by suffix.
        const all = await readChecked(src, optPath, configPath, both, "", () => false);
        const m = new Map<string, Float32Array>();
        const v = new Map<string, Float32Array>();
        for (const s of specs) {
          m.set(s.name, all.get(s.name + ".exp_avg")!);
          v.set(s.name, all.get(s.name + ".exp_avg_sq")!);
        }
        result.optimizer = { m, v };
      } finally {
        f.close();
      }
    }
    return result;
  } finally {
    for (const f of weights.files) f.close();
  }
}
