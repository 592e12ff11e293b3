/**
 * The GPU runtime: adapter and device acquisition, buffers, asynchronous
 * readback, a pipeline cache that fails loudly, and dispatch helpers.
 *
 * Deno's WebGPU does not throw on shader or pipeline errors: they surface only
 * through error scopes or the device's `uncapturederror` event, and a silently
 * failed pipeline just leaves zeros. So every pipeline is created inside a
 * validation scope and checked, and uncaptured errors and device loss end the
 * program with a clear message (or go to a handler the caller provides).
 */
import { UserError } from "../util/errors.ts";

/** What `trainer info` and the benchmarks print about the adapter. */
export interface AdapterSummary {
  /** Best human name: the description, or vendor + architecture. */
  name: string;
  /** Vendor name (PCI ids mapped to names where known), or "" when the driver gives none. */
  vendor: string;
  /** GPU architecture as the driver reports it, or "". */
  architecture: string;
  /** Driver's adapter description, or "". */
  description: string;
  /** The native API under WebGPU, when it can be told (Vulkan, Metal, D3D12, GL). */
  backend: string;
  /** A software adapter (Mesa llvmpipe/lavapipe, SwiftShader, WARP): correct but slow. */
  isFallback: boolean;
}

/** Optional features this device was created with. */
export interface GpuFeatures {
  /** `shader-f16`: WGSL `f16` types are usable. */
  shaderF16: boolean;
  /** `timestamp-query`: GPU timestamps can be written for profiling. */
  timestampQuery: boolean;
  /** Subgroup builtins usable in WGSL (requested explicitly: Deno does not list it on the adapter). */
  subgroups: boolean;
}

/** How a fatal device event is reported. The default prints and exits with status 1. */
export type FatalHandler = (message: string) => void;

/** Options of `Gpu.request`. */
export interface GpuRequestOptions {
  /** Called on device loss or an uncaptured error instead of printing and exiting. */
  onFatal?: FatalHandler;
  /** Do not request the `subgroups` feature even when it would work (tests of the fallback path). */
  disableSubgroups?: boolean;
}

/** A buffer slice to bind: whole buffers or a byte range. */
export type Binding = GPUBuffer | { buffer: GPUBuffer; offset?: number; size?: number };

/** The bind-group resource of a `Binding`. */
export function bindingResource(b: Binding): GPUBufferBinding {
  return b instanceof GPUBuffer
    ? { buffer: b }
    : { buffer: b.buffer, offset: b.offset ?? 0, size: b.size };
}

/** Any typed array we upload. */
export type TypedArray = Float32Array | Uint32Array | Int32Array | Uint16Array | Uint8Array;

const STORAGE_USAGE = 0x80 /* STORAGE */ | 0x04 /* COPY_SRC */ | 0x08; /* COPY_DST */

/** The largest workgroup count per dimension every WebGPU device accepts. */
export const MAX_WORKGROUPS_PER_DIM = 65535;

/**
 * WGSL helper for kernels dispatched through `Gpu.dispatch` with a 1-D count
 * that may be split over two dimensions: the linear workgroup index.
 */
export const LINEAR_WORKGROUP_WGSL = `
fn linear_workgroup(wid: vec3u, nwg: vec3u) -> u32 {
  return wid.x + wid.y * nwg.x + wid.z * nwg.x * nwg.y;
}`;

let runtimeDirSet = false;

/**
 * Mesa's Vulkan driver prints "error: XDG_RUNTIME_DIR is invalid or not set"
 * on stderr when the variable is unset (CI, containers). A private temporary
 * directory silences it; users should see only our output.
 */
function ensureRuntimeDir(): void {
  if (runtimeDirSet) return;
  runtimeDirSet = true;
  try {
    const current = Deno.env.get("XDG_RUNTIME_DIR");
    if (current) {
      try {
        if (Deno.statSync(current).isDirectory) return;
      } catch { /* invalid: replace it */ }
    }
    const dir = Deno.makeTempDirSync({ prefix: "trainer-xdg-" });
    Deno.chmodSync(dir, 0o700);
    Deno.env.set("XDG_RUNTIME_DIR", dir);
  } catch {
    // Without env/write permission we only lose the silencing, not correctness.
  }
}

/** The message a user sees when there is no WebGPU adapter. */
export const NO_ADAPTER_MESSAGE = [
  "no WebGPU adapter found.",
  "  - On a machine with a GPU: install or update its driver (NVIDIA, AMD, Intel: a Vulkan driver; macOS: Metal is built in).",
  "  - On a CPU-only Linux machine: install Mesa's software Vulkan driver, e.g.",
  "      sudo apt-get install -y mesa-vulkan-drivers",
  "    (slow, but it runs everything).",
  "  - Deno needs WebGPU enabled: run through `deno task ...`, or pass --unstable-webgpu.",
].join("\n");

/** PCI vendor ids (decimal, as some drivers report them) to names. */
const VENDOR_NAMES: Record<string, string> = {
  "4318": "NVIDIA (0x10de)",
  "4098": "AMD (0x1002)",
  "32902": "Intel (0x8086)",
  "4203": "Apple (0x106b)",
  "20803": "Qualcomm (0x5143)",
  "5045": "ARM (0x13b5)",
  "65541": "Mesa (0x10005)",
};

function summarize(adapter: GPUAdapter): AdapterSummary {
  const info = adapter.info;
  const vendor = VENDOR_NAMES[info.vendor ?? ""] ?? info.vendor ?? "";
  const architecture = info.architecture ?? "";
  const description = info.description ?? "";
  const name = description || [vendor, architecture].filter((s) => s).join(" ") || "unknown";
  // WebGPU does not expose the backend. Deno (wgpu) takes DENO_WEBGPU_BACKEND
  // when set, and otherwise prefers Vulkan on Linux and Windows, Metal on macOS.
  const forced = Deno.env.get("DENO_WEBGPU_BACKEND");
  let backend = forced ? `${forced} (DENO_WEBGPU_BACKEND)` : "unknown";
  if (!forced) {
    if (Deno.build.os === "darwin") backend = "Metal";
    else if (Deno.build.os === "linux") backend = "Vulkan";
    else if (Deno.build.os === "windows") backend = "Vulkan or D3D12";
    if (/llvmpipe|lavapipe/i.test(description) && backend === "Vulkan") {
      backend = "Vulkan (Mesa lavapipe)";
    }
  }
  const fallbackFlag = (info as GPUAdapterInfo & { isFallbackAdapter?: boolean }).isFallbackAdapter;
  const isFallback = fallbackFlag === true ||
    /llvmpipe|lavapipe|swiftshader|softpipe|warp|basic render/i.test(description);
  return { name, vendor, architecture, description, backend, isFallback };
}

/** The numeric limits of an adapter as a plain object. */
export function limitsOf(limits: GPUSupportedLimits): Record<string, number> {
  const out: Record<string, number> = {};
  // GPUSupportedLimits exposes its fields as getters on the prototype.
  for (const key in limits) {
    const v = (limits as unknown as Record<string, unknown>)[key];
    if (typeof v === "number") out[key] = v;
  }
  return out;
}

/** A WebGPU device with the runtime around it. Create one with `Gpu.request()`. */
export class Gpu {
  /** The adapter the device was requested from. */
  readonly adapter: GPUAdapter;
  /** The device every buffer, pipeline and dispatch of this runtime uses. */
  readonly device: GPUDevice;
  /** Printable description of the adapter. */
  readonly adapterSummary: AdapterSummary;
  /** The optional features the device was created with. */
  readonly features: GpuFeatures;
  /** The device's limits (raised to what the adapter offers). */
  readonly limits: GPUSupportedLimits;
  #pipelines = new Map<string, Promise<GPUComputePipeline>>();
  #subgroupSize: Promise<number> | undefined;
  #destroyed = false;

  private constructor(adapter: GPUAdapter, device: GPUDevice, features: GpuFeatures) {
    this.adapter = adapter;
    this.device = device;
    this.features = features;
    this.limits = device.limits;
    this.adapterSummary = summarize(adapter);
  }

  /**
   * Acquires the high-performance adapter and a device with every limit raised
   * to the adapter's (the defaults — 128 MiB per storage binding, 256 MiB per
   * buffer — are far too small for real models) and the optional features
   * `shader-f16`, `timestamp-query` and `subgroups` when they work.
   * No adapter: a `UserError` that says how to get one.
   */
  static async request(options: GpuRequestOptions = {}): Promise<Gpu> {
    ensureRuntimeDir();
    if (!("gpu" in navigator) || !navigator.gpu) throw new UserError(NO_ADAPTER_MESSAGE);
    const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
    if (!adapter) throw new UserError(NO_ADAPTER_MESSAGE);

    const requiredLimits: Record<string, number> = {};
    const adapterLimits = limitsOf(adapter.limits);
    for (const [key, value] of Object.entries(adapterLimits)) requiredLimits[key] = value;

    const optional: GPUFeatureName[] = [];
    if (adapter.features.has("shader-f16")) optional.push("shader-f16");
    if (adapter.features.has("timestamp-query")) optional.push("timestamp-query");

    let device: GPUDevice | undefined;
    let subgroups = false;
    if (!options.disableSubgroups) {
      // Deno does not list "subgroups" on the adapter, but a request for it
      // succeeds where the driver supports it; fall back quietly when not.
      try {
        device = await adapter.requestDevice({
          requiredFeatures: [...optional, "subgroups" as GPUFeatureName],
          requiredLimits,
        });
        subgroups = device.features.has("subgroups");
      } catch {
        device = undefined;
      }
    }
    if (!device) {
      device = await adapter.requestDevice({ requiredFeatures: optional, requiredLimits });
    }
    const gpu = new Gpu(adapter, device, {
      shaderF16: device.features.has("shader-f16"),
      timestampQuery: device.features.has("timestamp-query"),
      subgroups,
    });
    gpu.#watch(options.onFatal ?? defaultFatal);
    return gpu;
  }

  #watch(onFatal: FatalHandler): void {
    this.device.addEventListener("uncapturederror", (event) => {
      const error = (event as GPUUncapturedErrorEvent).error;
      onFatal(`GPU error: ${error.message.trim()}`);
    });
    this.device.lost.then((info) => {
      if (this.#destroyed) return;
      onFatal(
        `the GPU device was lost (${info.reason}): ${info.message.trim() || "no details"}. ` +
          "This happens when the driver resets (a kernel ran too long, or the GPU ran out of memory).",
      );
    });
  }

  /**
   * A storage buffer (also usable as copy source and destination), filled from
   * `data` or zeroed with `data` bytes. Sizes are padded to 4 bytes.
   */
  createBuffer(data: TypedArray | number, label?: string, usage = STORAGE_USAGE): GPUBuffer {
    const bytes = typeof data === "number" ? data : data.byteLength;
    const size = Math.max(4, Math.ceil(bytes / 4) * 4);
    if (size > this.limits.maxBufferSize) {
      throw new UserError(
        `buffer ${label ?? ""} of ${formatBytes(size)} exceeds this device's maxBufferSize ` +
          `(${formatBytes(this.limits.maxBufferSize)})`,
      );
    }
    const buffer = this.device.createBuffer({
      size,
      usage,
      label,
      mappedAtCreation: typeof data !== "number",
    });
    if (typeof data !== "number") {
      new Uint8Array(buffer.getMappedRange()).set(
        new Uint8Array(data.buffer, data.byteOffset, data.byteLength),
      );
      buffer.unmap();
    }
    return buffer;
  }

  /** A uniform buffer (copy destination too), for small per-dispatch parameters. */
  createUniform(data: TypedArray, label?: string): GPUBuffer {
    return this.createBuffer(data, label, 0x40 /* UNIFORM */ | 0x08 /* COPY_DST */);
  }

  /** Queues a write of `data` into `buffer` at `byteOffset` (ordered before later submits). */
  write(buffer: GPUBuffer, data: TypedArray, byteOffset = 0): void {
    this.device.queue.writeBuffer(
      buffer,
      byteOffset,
      data.buffer as ArrayBuffer,
      data.byteOffset,
      data.byteLength,
    );
  }

  /**
   * Copies `byteLength` bytes of `buffer` from `byteOffset` back to the CPU.
   * Resolves when the GPU has finished all work submitted before the call.
   */
  async read(buffer: GPUBuffer, byteOffset = 0, byteLength?: number): Promise<ArrayBuffer> {
    const length = byteLength ?? buffer.size - byteOffset;
    const padded = Math.ceil(length / 4) * 4;
    const staging = this.device.createBuffer({
      size: Math.max(4, padded),
      usage: 0x01 /* MAP_READ */ | 0x08, /* COPY_DST */
    });
    const encoder = this.device.createCommandEncoder();
    encoder.copyBufferToBuffer(buffer, byteOffset, staging, 0, padded);
    this.device.queue.submit([encoder.finish()]);
    await staging.mapAsync(0x01 /* READ */);
    const out = staging.getMappedRange().slice(0, length);
    staging.unmap();
    staging.destroy();
    return out;
  }

  /**
   * The first float of each of `cells`, in one copy and one map: the copies
   * are submitted now (after all work submitted before), and the promise
   * resolves when the GPU has reached them. Work submitted after this call
   * keeps the GPU busy while the caller waits.
   */
  readScalars(cells: GPUBuffer[]): Promise<Float32Array> {
    const staging = this.device.createBuffer({
      size: Math.max(4, cells.length * 4),
      usage: 0x01 /* MAP_READ */ | 0x08, /* COPY_DST */
    });
    const encoder = this.device.createCommandEncoder();
    cells.forEach((c, i) => encoder.copyBufferToBuffer(c, 0, staging, i * 4, 4));
    this.device.queue.submit([encoder.finish()]);
    return staging.mapAsync(0x01 /* READ */).then(() => {
      const out = new Float32Array(staging.getMappedRange().slice(0, cells.length * 4));
      staging.unmap();
      staging.destroy();
      return out;
    });
  }

  /** `read` as float32 values (`count` elements from element `offset`). */
  async readF32(buffer: GPUBuffer, offset = 0, count?: number): Promise<Float32Array> {
    const n = count ?? buffer.size / 4 - offset;
    return new Float32Array(await this.read(buffer, offset * 4, n * 4));
  }

  /** `read` as uint32 values. */
  async readU32(buffer: GPUBuffer, offset = 0, count?: number): Promise<Uint32Array> {
    const n = count ?? buffer.size / 4 - offset;
    return new Uint32Array(await this.read(buffer, offset * 4, n * 4));
  }

  /**
   * A compute pipeline, cached by `key` (which must identify the WGSL and its
   * constants). Shader compile and pipeline validation errors are thrown with
   * the compiler's message and the key; they are never left as a silent no-op.
   */
  pipeline(
    key: string,
    code: string,
    entryPoint = "main",
    constants?: Record<string, number>,
  ): Promise<GPUComputePipeline> {
    const cacheKey = `${key}#${entryPoint}#${JSON.stringify(constants ?? {})}`;
    let p = this.#pipelines.get(cacheKey);
    if (!p) {
      p = this.#createPipeline(key, code, entryPoint, constants);
      this.#pipelines.set(cacheKey, p);
      p.catch(() => this.#pipelines.delete(cacheKey));
    }
    return p;
  }

  async #createPipeline(
    key: string,
    code: string,
    entryPoint: string,
    constants?: Record<string, number>,
  ): Promise<GPUComputePipeline> {
    const device = this.device;
    device.pushErrorScope("validation");
    const module = device.createShaderModule({ code, label: key });
    const info = await module.getCompilationInfo();
    const compileErrors = info.messages.filter((m) => m.type === "error");
    let pipeline: GPUComputePipeline | undefined;
    let thrown: unknown;
    if (compileErrors.length === 0) {
      try {
        pipeline = await device.createComputePipelineAsync({
          layout: "auto",
          label: key,
          compute: { module, entryPoint, constants },
        });
      } catch (e) {
        thrown = e;
      }
    }
    const scoped = await device.popErrorScope();
    if (compileErrors.length > 0 || scoped || thrown || !pipeline) {
      const detail = compileErrors.map((m) => m.message.trim()).join("\n") ||
        scoped?.message.trim() || String((thrown as Error)?.message ?? thrown);
      throw new Error(`WGSL pipeline '${key}' (entry ${entryPoint}) failed:\n${detail}`);
    }
    return pipeline;
  }

  /**
   * The subgroup size of this device's compute kernels (0 without the
   * `subgroups` feature), measured once by a probe kernel and cached. WebGPU
   * only bounds it (`subgroupMinSize..subgroupMaxSize`), so kernels that are
   * generated for one size ask the device what it actually runs.
   */
  subgroupSize(): Promise<number> {
    if (!this.features.subgroups) return Promise.resolve(0);
    this.#subgroupSize ??= (async () => {
      const pipeline = await this.pipeline(
        "subgroup-size-probe",
        `@group(0) @binding(0) var<storage, read_write> out: array<u32>;
        @compute @workgroup_size(64)
        fn main(@builtin(local_invocation_index) i: u32, @builtin(subgroup_size) s: u32) {
          if (i == 0u) { out[0] = s; }
        }`,
      );
      const buf = this.createBuffer(4, "subgroup size probe");
      this.submit((enc) => {
        const pass = enc.beginComputePass();
        this.dispatch(pass, pipeline, this.bindGroup(pipeline, [buf]), 1);
        pass.end();
      });
      const [size] = await this.readU32(buf, 0, 1);
      buf.destroy();
      return size;
    })();
    return this.#subgroupSize;
  }

  /** A bind group for group 0 of `pipeline`, binding `bindings[i]` at binding `i`. */
  bindGroup(pipeline: GPUComputePipeline, bindings: Binding[], label?: string): GPUBindGroup {
    return this.device.createBindGroup({
      label,
      layout: pipeline.getBindGroupLayout(0),
      entries: bindings.map((b, i) => ({ binding: i, resource: bindingResource(b) })),
    });
  }

  /**
   * Records a dispatch of `workgroups` workgroups. A 1-D count beyond 65535 is
   * split into a 2-D grid; kernels then compute their index with
   * `linear_workgroup` (see `LINEAR_WORKGROUP_WGSL`) and bounds-check it, since
   * the grid may hold a few more workgroups than asked.
   */
  dispatch(
    pass: GPUComputePassEncoder,
    pipeline: GPUComputePipeline,
    bindGroup: GPUBindGroup,
    workgroups: number | [number, number?, number?],
  ): void {
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, bindGroup);
    const [x, y, z] = typeof workgroups === "number"
      ? splitWorkgroups(workgroups)
      : [workgroups[0], workgroups[1] ?? 1, workgroups[2] ?? 1];
    if (x === 0 || y === 0 || z === 0) return;
    pass.dispatchWorkgroups(x, y, z);
  }

  /** Records work with `record` into one command encoder and submits it without waiting. */
  submit(record: (encoder: GPUCommandEncoder) => void): void {
    const encoder = this.device.createCommandEncoder();
    record(encoder);
    this.device.queue.submit([encoder.finish()]);
  }

  /** Resolves when all submitted work has finished. */
  async finish(): Promise<void> {
    await this.device.queue.onSubmittedWorkDone();
  }

  /** Releases the device; later device loss is not reported as an error. */
  destroy(): void {
    this.#destroyed = true;
    this.device.destroy();
  }
}

/**
 * Whether kernels that hand values round a subgroup with `subgroupBroadcast`
 * can be generated for `size` lanes: a power of two in 4..32 (fewer lanes do
 * not pay for the broadcasts; more would need more rows than a tile holds).
 */
export function isBroadcastSubgroupSize(size: number): boolean {
  return size >= 4 && size <= 32 && (size & (size - 1)) === 0;
}

/**
 * Splits a 1-D workgroup count into a grid within the per-dimension limit:
 * `[min(n, 65535), ceil(n / 65535), 1]` (and a third dimension past 65535²).
 */
export function splitWorkgroups(n: number): [number, number, number] {
  if (!Number.isInteger(n) || n < 0) throw new RangeError(`bad workgroup count ${n}`);
  if (n <= MAX_WORKGROUPS_PER_DIM) return [n, 1, 1];
  const y = Math.ceil(n / MAX_WORKGROUPS_PER_DIM);
  if (y <= MAX_WORKGROUPS_PER_DIM) return [MAX_WORKGROUPS_PER_DIM, y, 1];
  const perPlane = MAX_WORKGROUPS_PER_DIM * MAX_WORKGROUPS_PER_DIM;
  return [MAX_WORKGROUPS_PER_DIM, MAX_WORKGROUPS_PER_DIM, Math.ceil(n / perPlane)];
}

function defaultFatal(message: string): void {
  console.error(`trainer: ${message}`);
  Deno.exit(1);
}

/** `1.5 GiB`-style byte counts for messages. */
export function formatBytes(bytes: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${Number.isInteger(v) ? v : v.toFixed(1)} ${units[i]}`;
}

/**
 * Something a dispatch holds for its lifetime and releases with
 * `releaseDispatches`: a buffer, or a lease on a shared texture. `size` is
 * the bytes it adds to the device's memory (0 for a lease on a texture that
 * another lease already counts).
 */
export interface Owned {
  /** Bytes of device memory it accounts for. */
  readonly size: number;
  /** Releases it (a lease: the texture goes when its last lease does). */
  destroy(): void;
}

/**
 * A copy of a packed buffer range into an rgba32float texture, recorded
 * (outside any compute pass) right before the dispatch that reads the
 * texture. The range holds `texels` vec4s from `offset` (a multiple of 16);
 * texel t lands at (t mod width, t div width), `width` being the texture's
 * width, a multiple of 16 texels (so its rows are 256-byte multiples, as
 * `copyBufferToTexture` requires).
 */
export interface TextureCopy {
  /** The buffer the operand lives in. */
  buffer: GPUBuffer;
  /** Byte offset of its first element (a multiple of 16). */
  offset: number;
  /** vec4 texels to copy (the operand's elements / 4). */
  texels: number;
  /** The destination, rgba32float, as wide as a multiple of 16 texels. */
  texture: GPUTexture;
}

/**
 * A kernel invocation prepared once (pipeline, bind group, workgroup count) and
 * recorded as often as needed: training steps re-record the same dispatches,
 * so nothing is created inside a step.
 */
export interface Dispatch {
  /** For error messages and profiling. */
  label: string;
  /** The compute pipeline to run. */
  pipeline: GPUComputePipeline;
  /** Bound as group 0 of `pipeline`. */
  bindGroup: GPUBindGroup;
  /** A 1-D count (split by `Gpu.dispatch` when beyond 65535) or an explicit grid. */
  workgroups: number | [number, number?, number?];
  /**
   * Buffers created for this dispatch alone (its uniforms, scratch such as
   * split-K partials) and leases on shared textures: released by
   * `releaseDispatches` when the model that holds the dispatch is destroyed.
   */
  owned?: Owned[];
  /**
   * Copies of its operands into the textures it reads, recorded immediately
   * before it every time it is recorded (the CPU-driver matmul, whose loads
   * are cheaper from textures). A texture may be shared by dispatches that
   * refill it each time, since nothing is recorded between a copy and its
   * dispatch.
   */
  copies?: TextureCopy[];
  /**
   * The buffers it may write (absent: unknown, anything). `PassRecorder`
   * skips a copy into a texture that already holds the same range, from a
   * copy recorded earlier with no write to its buffer since; only dispatches
   * that say what they write let such a copy survive them.
   */
  writes?: GPUBuffer[];
}

/** Destroys what `dispatches` own (see `Dispatch.owned`); the dispatches are dead after. */
export function releaseDispatches(dispatches: Iterable<Dispatch>): void {
  for (const d of dispatches) {
    for (const b of d.owned ?? []) b.destroy();
    d.owned = [];
  }
}

/**
 * Bytes of device memory `dispatches` own. Shared input textures are not
 * theirs (kernels/texels.ts `inputTextureBytes` counts those).
 */
export function ownedBytes(dispatches: Iterable<Dispatch>): number {
  let bytes = 0;
  for (const d of dispatches) for (const b of d.owned ?? []) bytes += b.size;
  return bytes;
}

/** The GPU time of one dispatch, from timestamp queries. */
export interface DispatchTiming {
  label: string;
  /** Milliseconds between the start and end timestamps of its compute pass. */
  ms: number;
}

/**
 * Runs `dispatches` once, each in its own compute pass bracketed by GPU
 * timestamps (the `timestamp-query` feature; undefined without it), and
 * resolves to each one's GPU time. For profiling only: one pass per dispatch
 * adds pass overhead that a training step, which records them into as few
 * passes as its texture copies allow, does not pay; texture copies and host
 * round trips are not in the figures.
 */
export async function profileDispatches(
  gpu: Gpu,
  dispatches: Dispatch[],
): Promise<DispatchTiming[] | undefined> {
  if (!gpu.features.timestampQuery || dispatches.length === 0) return undefined;
  const count = dispatches.length * 2;
  const querySet = gpu.device.createQuerySet({ type: "timestamp", count });
  const resolve = gpu.device.createBuffer({
    size: count * 8,
    usage: 0x200 /* QUERY_RESOLVE */ | 0x04, /* COPY_SRC */
  });
  try {
    gpu.submit((enc) => {
      dispatches.forEach((d, i) => {
        recordCopies(enc, d.copies);
        const pass = enc.beginComputePass({
          timestampWrites: {
            querySet,
            beginningOfPassWriteIndex: 2 * i,
            endOfPassWriteIndex: 2 * i + 1,
          },
        });
        gpu.dispatch(pass, d.pipeline, d.bindGroup, d.workgroups);
        pass.end();
      });
      enc.resolveQuerySet(querySet, 0, count, resolve, 0);
    });
    const ticks = new BigUint64Array(await gpu.read(resolve, 0, count * 8));
    // Timestamps are in nanoseconds (WebGPU converts the device's ticks).
    return dispatches.map((d, i) => ({
      label: d.label,
      ms: Number(ticks[2 * i + 1] - ticks[2 * i]) / 1e6,
    }));
  } finally {
    querySet.destroy();
    resolve.destroy();
  }
}

/** Records `copies` (see `TextureCopy`) into `encoder`, outside any pass. */
function recordCopies(encoder: GPUCommandEncoder, copies: TextureCopy[] | undefined): void {
  for (const c of copies ?? []) {
    const width = c.texture.width;
    const rows = Math.floor(c.texels / width);
    const rest = c.texels - rows * width;
    const bytesPerRow = width * 16;
    if (rows > 0) {
      encoder.copyBufferToTexture(
        { buffer: c.buffer, offset: c.offset, bytesPerRow },
        { texture: c.texture },
        [width, rows],
      );
    }
    if (rest > 0) {
      encoder.copyBufferToTexture(
        { buffer: c.buffer, offset: c.offset + rows * bytesPerRow, bytesPerRow },
        { texture: c.texture, origin: [0, rows] },
        [rest, 1],
      );
    }
  }
}

/** GPU timestamps a `PassRecorder` writes: at the start of its first pass and the end of its last. */
export interface PassTimestamps {
  querySet: GPUQuerySet;
  beginIndex: number;
  endIndex: number;
}

/**
 * Records dispatches into compute passes of one command encoder, as few as
 * possible: a pass is ended only where a dispatch needs texture copies first
 * (copies cannot be recorded inside a pass) and a new one begun after them.
 * Call `end` when done.
 */
export class PassRecorder {
  readonly #gpu: Gpu;
  readonly #encoder: GPUCommandEncoder;
  readonly #timestamps?: PassTimestamps;
  #pass: GPUComputePassEncoder | undefined;
  /** Copies recorded so far that the texture still holds, by texture. */
  #filled = new Map<GPUTexture, TextureCopy>();
  #began = false;
  #ended = false;
  /** Texture copies recorded so far. */
  copiesRecorded = 0;
  /** Texture copies left out so far: their texture held the range already. */
  copiesSkipped = 0;

  constructor(gpu: Gpu, encoder: GPUCommandEncoder, timestamps?: PassTimestamps) {
    this.#gpu = gpu;
    this.#encoder = encoder;
    this.#timestamps = timestamps;
  }

  /**
   * Records `dispatches` in order, each preceded by the texture copies it
   * needs: those whose texture does not already hold the same buffer range
   * from an earlier copy of this recorder with no write to that buffer since
   * (`Dispatch.writes`).
   */
  record(dispatches: Dispatch | Dispatch[]): void {
    if (this.#ended) throw new Error("PassRecorder: record after end");
    for (const d of Array.isArray(dispatches) ? dispatches : [dispatches]) {
      const needed = (d.copies ?? []).filter((c) => !this.#holds(c));
      this.copiesSkipped += (d.copies?.length ?? 0) - needed.length;
      this.copiesRecorded += needed.length;
      if (needed.length) {
        this.#pass?.end();
        this.#pass = undefined;
        recordCopies(this.#encoder, needed);
        for (const c of needed) this.#filled.set(c.texture, c);
      }
      this.#gpu.dispatch(this.#open(), d.pipeline, d.bindGroup, d.workgroups);
      if (!d.writes) this.#filled.clear();
      else {
        for (const [texture, c] of this.#filled) {
          if (d.writes.includes(c.buffer)) this.#filled.delete(texture);
        }
      }
    }
  }

  /** Whether `c`'s texture holds its range already (see `record`). */
  #holds(c: TextureCopy): boolean {
    const f = this.#filled.get(c.texture);
    return f !== undefined && f.buffer === c.buffer && f.offset === c.offset &&
      f.texels === c.texels;
  }

  #open(): GPUComputePassEncoder {
    if (this.#pass) return this.#pass;
    const t = this.#timestamps;
    this.#pass = this.#encoder.beginComputePass(
      t && !this.#began
        ? { timestampWrites: { querySet: t.querySet, beginningOfPassWriteIndex: t.beginIndex } }
        : {},
    );
    this.#began = true;
    return this.#pass;
  }

  /** Ends the open pass (with timestamps: an empty last pass writes the end stamp). */
  end(): void {
    if (this.#ended) return;
    const t = this.#timestamps;
    if (t) {
      this.#open();
      this.#pass?.end();
      this.#pass = this.#encoder.beginComputePass({
        timestampWrites: { querySet: t.querySet, endOfPassWriteIndex: t.endIndex },
      });
    }
    this.#pass?.end();
    this.#pass = undefined;
    this.#ended = true;
  }
}

/** Records `dispatches` in order into `encoder` (see `PassRecorder`). */
export function recordDispatches(
  gpu: Gpu,
  encoder: GPUCommandEncoder,
  dispatches: Dispatch | Dispatch[],
): void {
  const recorder = new PassRecorder(gpu, encoder);
  recorder.record(dispatches);
  recorder.end();
}
