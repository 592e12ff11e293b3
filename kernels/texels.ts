/**
 * Kernel inputs read through textures on CPU drivers.
 *
 * On Mesa's llvmpipe (lavapipe, and GL) a storage-buffer load costs about
 * 23 ns per invocation, vec4 or scalar, whatever the address pattern: a loop
 * over the SIMD lanes with a bounds check each; a `textureLoad` of an rgba32f
 * texel about 4.5 ns (bench/load_path_bench.ts, docs/benchmarks.md). Copying a
 * buffer into a texture costs about 0.2 ms per MiB there. So on those drivers
 * a kernel's read-only inputs are copied into rgba32float textures right
 * before it runs (`Dispatch.copies`, outside the compute pass) and read from
 * there, where that pays: every kernel of a training step reads its inputs
 * at least once, most several times.
 *
 * Kernels are written once, against storage buffers; `texelReads` rewrites a
 * kernel's WGSL for the inputs that go through textures: the declaration
 * `@group(0) @binding(i) var<storage, read> x: array<vec4f>;` becomes a
 * `texture_2d<f32>` at the same binding and every read `x[e]` a call
 * `x_at(e)`. A texture holds the binding's range as it is, TEXEL_ROW texels
 * to a row: element 4t..4t+3 is texel t at (t mod TEXEL_ROW, t div TEXEL_ROW),
 * so `x_at(t)` of a vec4 array is texel t, of a vec2 array half e mod 2 of
 * texel e div 2, and of an f32 array component e mod 4 of texel e div 4. Every index form carries over unchanged and the kernel's
 * arithmetic is the same: the results are bitwise those of the storage form.
 *
 * Textures are pooled per device by the read's position within its dispatch
 * and by height: every dispatch that reads (say) its first input from a
 * texture of 128 rows shares one texture. That is safe because a dispatch's
 * copies are recorded right before it and nothing else is recorded between
 * (see `PassRecorder`); a model's many kernels then cost a handful of
 * textures. The texture goes when the last lease on it is released. Their
 * memory belongs to no one owner: `inputTextureBytes` says what they hold.
 *
 * @module
 */
import {
  type Binding,
  bindingResource,
  type Dispatch,
  type Gpu,
  type Owned,
  type TextureCopy,
} from "./runtime.ts";

/**
 * Width in texels of an input texture: a power of two (a texel's column and
 * row are a mask and a shift of its index) whose rows are a multiple of 256
 * bytes (as `copyBufferToTexture` needs), within WebGPU's minimum
 * `maxTextureDimension2D` of 8192.
 */
export const TEXEL_ROW = 2048;
const TEXEL_ROW_LOG2 = Math.log2(TEXEL_ROW);

/**
 * Where a kernel reads its read-only inputs: `auto` (textures on CPU drivers
 * where the inputs qualify and the kernel reads at least `TEXEL_READ_MIN`
 * texels; buffers elsewhere), `storage` (always buffers) or `textures` (forced;
 * an input that cannot go into a texture is an error). For tests and
 * benchmarks: the results are the same either way.
 */
export type ReadPath = "auto" | "storage" | "textures";

/**
 * Below this many texels (64 KiB) read in all, `auto` keeps a kernel on its
 * buffers: a copy and the compute pass it splits have a fixed cost that a
 * small read does not win back (decoding one token, a bias-sized input).
 */
export const TEXEL_READ_MIN = 4096;

/** An input to read through a texture: its WGSL name, binding index, floats per element. */
interface ReadDecl {
  name: string;
  binding: number;
  width: 1 | 2 | 4;
}

const WIDTHS: Record<string, 1 | 2 | 4> = {
  "f32": 1,
  "vec2f": 2,
  "vec2<f32>": 2,
  "vec4f": 4,
  "vec4<f32>": 4,
};

/** The element type `array<...>` names, through one `alias X = ...;` if need be. */
function elementType(wgsl: string, type: string): string {
  const alias = new RegExp(`\\balias\\s+${type}\\s*=\\s*([^;]+);`).exec(wgsl);
  return (alias ? alias[1] : type).replace(/\s+/g, "");
}

/** The read-only storage declaration of `name` in `wgsl`, or why it cannot be read from a texture. */
function readDecl(wgsl: string, name: string): ReadDecl | string {
  const decl = new RegExp(
    `@group\\(0\\)\\s*@binding\\((\\d+)\\)\\s*var<storage,\\s*read>\\s+${name}\\s*:\\s*array<([^>]+(?:<f32>)?)>\\s*;`,
  ).exec(wgsl);
  if (!decl) return `${name} is not a read-only storage array of group 0`;
  const type = elementType(wgsl, decl[2]);
  const width = WIDTHS[type];
  if (!width) return `${name} holds ${type}, not f32, vec2<f32> or vec4<f32>`;
  return { name, binding: Number(decl[1]), width };
}

/** Where `name` appears as an identifier (not inside a longer one, not a member). */
function identifierAt(wgsl: string, name: string, from: number): number {
  const re = new RegExp(`(?<![\\w.])${name}(?!\\w)`, "g");
  re.lastIndex = from;
  const m = re.exec(wgsl);
  return m ? m.index : -1;
}

/**
 * `text` with every `name[e]` replaced by `name_at(e)`, index expressions
 * included (a read of `name` may index another). Any other use of `name`
 * throws.
 */
function rewriteIndexing(text: string, name: string): string {
  let out = "";
  let at = 0;
  for (let i = identifierAt(text, name, 0); i >= 0; i = identifierAt(text, name, at)) {
    let j = i + name.length;
    while (/\s/.test(text[j] ?? "")) j++;
    if (text[j] !== "[") {
      throw new Error(
        `texelReads: ${name} is used other than by indexing, at "${
          text.slice(Math.max(0, i - 20), i + name.length + 20)
        }"`,
      );
    }
    let depth = 0;
    let k = j;
    for (; k < text.length; k++) {
      if (text[k] === "[") depth++;
      else if (text[k] === "]" && --depth === 0) break;
    }
    if (k >= text.length) throw new Error(`texelReads: unbalanced index of ${name}`);
    out += `${text.slice(at, i)}${name}_at(${rewriteIndexing(text.slice(j + 1, k), name)})`;
    at = k + 1;
  }
  return out + text.slice(at);
}

/**
 * `wgsl` with the read-only storage arrays `names` read from textures (see the
 * module comment): each declaration replaced by a `texture_2d<f32>` named
 * `<name>_tex` at the same binding plus a fetch function `<name>_at`, and every
 * `<name>[e]` by `<name>_at(e)` (line comments are dropped). Throws where a name is not a read-only
 * `array<f32>`, `array<vec2<f32>>` or `array<vec4<f32>>` of group 0, is used other than by
 * indexing (`arrayLength(&x)`, a pointer), or where `<name>_tex` / `<name>_at`
 * already exist.
 */
export function texelReads(wgsl: string, names: readonly string[]): string {
  // Line comments go first: a name mentioned in one is not a use.
  let out = wgsl.replace(/\/\/[^\n]*/g, "");
  for (const name of names) {
    const decl = readDecl(out, name);
    if (typeof decl === "string") throw new Error(`texelReads: ${decl}`);
    for (const taken of [`${name}_tex`, `${name}_at`]) {
      if (identifierAt(out, taken, 0) >= 0) throw new Error(`texelReads: ${taken} exists already`);
    }
    // Locals start with "_" so that they cannot be a later name's array.
    const fetch = `textureLoad(${name}_tex, vec2u(_t & ${
      TEXEL_ROW - 1
    }u, _t >> ${TEXEL_ROW_LOG2}u), 0)`;
    const fetchFn = {
      1: `fn ${name}_at(_e: u32) -> f32 { let _t = _e >> 2u; return ${fetch}[_e & 3u]; }`,
      2: `fn ${name}_at(_e: u32) -> vec2f {
  let _t = _e >> 1u;
  let _x = ${fetch};
  return select(_x.xy, _x.zw, (_e & 1u) == 1u);
}`,
      4: `fn ${name}_at(_t: u32) -> vec4f { return ${fetch}; }`,
    }[decl.width];
    const replacement =
      `@group(0) @binding(${decl.binding}) var ${name}_tex: texture_2d<f32>;\n${fetchFn}`;
    const declRe = new RegExp(
      `@group\\(0\\)\\s*@binding\\(${decl.binding}\\)\\s*var<storage,\\s*read>\\s+${name}\\s*:[^;]*;`,
    );
    out = out.replace(declRe, "\u0000DECL\u0000");
    out = rewriteIndexing(out, name).replace("\u0000DECL\u0000", replacement);
  }
  return out;
}

/** An input texture of one height at one read position, shared by the dispatches that lease it. */
interface PooledTexture {
  texture: GPUTexture;
  leases: number;
}

/** Each device's input textures, by read position and height. */
const pools = new WeakMap<Gpu, Map<string, PooledTexture>>();

/**
 * Bytes of the input textures `gpu` holds now: shared by every dispatch that
 * leases them, so counted here and by no owner (`Owned.size` of a lease is 0).
 */
export function inputTextureBytes(gpu: Gpu): number {
  let bytes = 0;
  for (const entry of pools.get(gpu)?.values() ?? []) {
    const { width, height } = entry.texture;
    bytes += width * height * 16;
  }
  return bytes;
}

/**
 * A lease on the device's input texture for read position `slot` of `height`
 * rows, created on first use (see the module comment). A lease's size is 0:
 * the texture is shared, and `inputTextureBytes` counts it.
 */
function leaseTexture(gpu: Gpu, slot: number, height: number): [GPUTexture, Owned] {
  let pool = pools.get(gpu);
  if (!pool) pools.set(gpu, pool = new Map());
  const key = `${slot}:${height}`;
  let entry = pool.get(key);
  if (!entry) {
    entry = {
      texture: gpu.device.createTexture({
        label: `input texture ${slot} [${height}, ${TEXEL_ROW}] rgba32f`,
        size: [TEXEL_ROW, height],
        format: "rgba32float",
        usage: GPUTextureUsage.TEXTURE_BINDING | GPUTextureUsage.COPY_DST,
      }),
      leases: 0,
    };
    pool.set(key, entry);
  }
  entry.leases++;
  const held = entry;
  let released = false;
  return [held.texture, {
    size: 0,
    destroy() {
      if (released) return;
      released = true;
      if (--held.leases === 0) {
        held.texture.destroy();
        if (pool.get(key) === held) pool.delete(key);
      }
    },
  }];
}

/** A binding's buffer, offset and byte length. */
function rangeOf(b: Binding): { buffer: GPUBuffer; offset: number; bytes: number } {
  if (b instanceof GPUBuffer) return { buffer: b, offset: 0, bytes: b.size };
  const offset = b.offset ?? 0;
  return { buffer: b.buffer, offset, bytes: b.size ?? b.buffer.size - offset };
}

/**
 * Why the first `elements` floats of binding `b` cannot be copied into an
 * input texture on this device, or null when they can: the range is empty,
 * its buffer lacks COPY_SRC, it does not start on a texel (16 bytes), its
 * whole texels run past the buffer, or it needs more rows than
 * `maxTextureDimension2D`.
 */
export function texelObstacle(gpu: Gpu, name: string, b: Binding, elements: number): string | null {
  const { buffer, offset } = rangeOf(b);
  const texels = Math.ceil(elements / 4);
  const height = Math.ceil(texels / TEXEL_ROW);
  const max = gpu.limits.maxTextureDimension2D;
  if (elements <= 0) return `${name} is empty`;
  if (!(buffer.usage & GPUBufferUsage.COPY_SRC)) return `${name}'s buffer cannot be copied from`;
  if (offset % 16 !== 0) return `${name} starts at byte ${offset}, not a multiple of 16`;
  if (offset + texels * 16 > buffer.size) {
    return `${name}'s ${elements} floats end inside a texel at the end of its buffer`;
  }
  if (TEXEL_ROW > max || height > max) {
    return `${name} needs a ${TEXEL_ROW} x ${height} texture (this device: at most ${max})`;
  }
  return null;
}

/** An input's texture, the copy that fills it, and the lease that keeps it. */
interface TexelSource {
  texture: GPUTexture;
  copy: TextureCopy;
  lease: Owned;
}

/**
 * Textures for the inputs `reads` (read position i takes slot i of the
 * pool), with their copies: the first `elements` floats of each binding.
 * Call only where `texelObstacle` found none.
 */
function texelSources(
  gpu: Gpu,
  reads: readonly { binding: Binding; elements: number }[],
): TexelSource[] {
  return reads.map(({ binding, elements }, slot) => {
    const texels = Math.ceil(elements / 4);
    const [texture, lease] = leaseTexture(gpu, slot, Math.ceil(texels / TEXEL_ROW));
    const { buffer, offset } = rangeOf(binding);
    return { texture, lease, copy: { buffer, offset, texels, texture } };
  });
}

/** A kernel as `kernelDispatch` builds it (see there). */
export interface KernelSource {
  /** The dispatch's label, also in error messages. */
  label: string;
  /** Pipeline cache key of the storage form (the texture form adds its inputs to it). */
  key: string;
  /** The kernel, reading every input from storage buffers. */
  wgsl: string;
  /** Bound at group 0, binding i = bindings[i]. */
  bindings: Binding[];
  /** As `Dispatch.workgroups`. */
  workgroups: Dispatch["workgroups"];
  /** As `Dispatch.owned` (the texture leases are added). */
  owned?: Owned[];
  /**
   * The read-only storage arrays that may come from textures, by WGSL name,
   * with the floats read from the start of each (default: its binding's whole
   * range).
   */
  textureReads: Record<string, number | undefined>;
  /** Default `auto` (see `ReadPath`). */
  reads?: ReadPath;
}

/**
 * One dispatch of a kernel, reading the inputs `k.textureReads` from textures
 * where `k.reads` says so (see `ReadPath`): with `auto`, on CPU drivers, each
 * input that can go into a texture does, when they hold `TEXEL_READ_MIN`
 * texels or more in all; the rest stay on their buffers. Forced `textures`
 * throws, saying why, for an input that cannot.
 */
export async function kernelDispatch(gpu: Gpu, k: KernelSource): Promise<Dispatch> {
  const path = k.reads ?? "auto";
  const chosen: { decl: ReadDecl; binding: Binding; elements: number }[] = [];
  if (path === "textures" || (path === "auto" && gpu.adapterSummary.isFallback)) {
    for (const [name, count] of Object.entries(k.textureReads)) {
      const decl = readDecl(k.wgsl, name);
      if (typeof decl === "string") throw new Error(`${k.label}: ${decl}`);
      const binding = k.bindings[decl.binding];
      const elements = count ?? rangeOf(binding).bytes / 4;
      const why = texelObstacle(gpu, name, binding, elements);
      if (why === null) chosen.push({ decl, binding, elements });
      else if (path === "textures") throw new Error(`${k.label}: inputs from textures: ${why}`);
    }
    const texels = chosen.reduce((s, c) => s + Math.ceil(c.elements / 4), 0);
    if (path === "auto" && texels < TEXEL_READ_MIN) chosen.length = 0;
  }
  const writes = writtenBuffers(k.wgsl, k.bindings);
  if (chosen.length === 0) {
    const pipeline = await gpu.pipeline(k.key, k.wgsl);
    return {
      label: k.label,
      pipeline,
      bindGroup: gpu.bindGroup(pipeline, k.bindings, k.label),
      workgroups: k.workgroups,
      owned: k.owned ?? [],
      writes,
    };
  }
  const names = chosen.map((c) => c.decl.name);
  const pipeline = await gpu.pipeline(`${k.key}|tex:${names}`, texelReads(k.wgsl, names));
  const sources = texelSources(gpu, chosen);
  const textureAt = new Map(chosen.map((c, i) => [c.decl.binding, sources[i].texture]));
  return {
    label: `${k.label}, ${names.join(", ")} from textures`,
    pipeline,
    bindGroup: gpu.device.createBindGroup({
      label: k.label,
      layout: pipeline.getBindGroupLayout(0),
      entries: k.bindings.map((b, i) => {
        const texture = textureAt.get(i);
        return { binding: i, resource: texture ? texture.createView() : bindingResource(b) };
      }),
    }),
    workgroups: k.workgroups,
    owned: [...k.owned ?? [], ...sources.map((s) => s.lease)],
    copies: sources.map((s) => s.copy),
    writes,
  };
}

/** The buffers bound to the kernel's `read_write` storage declarations (what it may write). */
function writtenBuffers(wgsl: string, bindings: Binding[]): GPUBuffer[] {
  const re = /@group\(0\)\s*@binding\((\d+)\)\s*var<storage,\s*read_write>/g;
  return [...wgsl.matchAll(re)].map((m) => rangeOf(bindings[Number(m[1])]).buffer);
}
