import { assertEquals, assertRejects, assertThrows } from "./assert.ts";
import { Gpu, LINEAR_WORKGROUP_WGSL, PassRecorder, splitWorkgroups } from "../kernels/runtime.ts";

Deno.test("splitWorkgroups keeps every dimension within 65535", () => {
  assertEquals(splitWorkgroups(0), [0, 1, 1]);
  assertEquals(splitWorkgroups(65535), [65535, 1, 1]);
  assertEquals(splitWorkgroups(65536), [65535, 2, 1]);
  assertEquals(splitWorkgroups(65535 * 65535 + 1), [65535, 65535, 2]);
});

Deno.test("WebGPU smoke: a kernel's round trip, split over two grid dimensions", async () => {
  const gpu = await Gpu.request();
  try {
    // 70000 workgroups of 1 invocation: more than one dimension allows, so the
    // dispatch helper splits it and the kernel rebuilds the linear index.
    const n = 70000;
    const input = new Float32Array(n).map((_, i) => i * 0.5);
    const src = gpu.createBuffer(input, "in");
    const dst = gpu.createBuffer(n * 4, "out");
    const pipeline = await gpu.pipeline(
      "smoke-double",
      `${LINEAR_WORKGROUP_WGSL}
      @group(0) @binding(0) var<storage, read> src: array<f32>;
      @group(0) @binding(1) var<storage, read_write> dst: array<f32>;
      @compute @workgroup_size(1)
      fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
        let i = linear_workgroup(wid, nwg);
        if (i >= arrayLength(&src)) { return; }
        dst[i] = src[i] * 2.0 + 1.0;
      }`,
    );
    const bind = gpu.bindGroup(pipeline, [src, dst]);
    gpu.submit((enc) => {
      const pass = enc.beginComputePass();
      gpu.dispatch(pass, pipeline, bind, n);
      pass.end();
    });
    const out = await gpu.readF32(dst);
    let bad = -1;
    for (let i = 0; i < n; i++) if (out[i] !== input[i] * 2 + 1) bad = i;
    assertEquals(bad, -1, `element ${bad} wrong`);
  } finally {
    gpu.destroy();
  }
});

Deno.test("a WGSL compile error is thrown, not left as a silent no-op", async () => {
  const gpu = await Gpu.request();
  try {
    await assertRejects(
      () => gpu.pipeline("broken", "@compute @workgroup_size(1) fn main() { let x: u32 = 1.5; }"),
      Error,
      "WGSL pipeline 'broken'",
    );
  } finally {
    gpu.destroy();
  }
});

Deno.test("PassRecorder: texture copies between passes, each before its dispatch; timestamps around all", async () => {
  const gpu = await Gpu.request();
  try {
    // One texture shared by two dispatches that each copy their own source
    // into it first: the copies must land between passes, in order.
    const width = 16, texels = 20; // one full texture row and a partial one
    const texture = gpu.device.createTexture({
      size: [width, 2],
      format: "rgba32float",
      usage: GPUTextureUsage.TEXTURE_BINDING | GPUTextureUsage.COPY_DST,
    });
    const pipeline = await gpu.pipeline(
      "recorder-texture-read",
      `@group(0) @binding(0) var t: texture_2d<f32>;
      @group(0) @binding(1) var<storage, read_write> out: array<vec4f>;
      @compute @workgroup_size(1)
      fn main(@builtin(workgroup_id) wid: vec3u) {
        out[wid.x] = textureLoad(t, vec2u(wid.x % ${width}u, wid.x / ${width}u), 0);
      }`,
    );
    const sources = [1, 2].map((k) =>
      gpu.createBuffer(new Float32Array(texels * 4).map((_, i) => k * 1000 + i))
    );
    const outs = [0, 1].map(() => gpu.createBuffer(texels * 16));
    const dispatches = [0, 1].map((k) => ({
      label: `read ${k}`,
      pipeline,
      bindGroup: gpu.device.createBindGroup({
        layout: pipeline.getBindGroupLayout(0),
        entries: [
          { binding: 0, resource: texture.createView() },
          { binding: 1, resource: { buffer: outs[k] } },
        ],
      }),
      workgroups: texels,
      copies: [{ buffer: sources[k], offset: 0, texels, texture }],
    }));
    const stamps = gpu.features.timestampQuery
      ? gpu.device.createQuerySet({ type: "timestamp", count: 2 })
      : undefined;
    const resolved = gpu.device.createBuffer({
      size: 16,
      usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
    });
    let recorder: PassRecorder | undefined;
    gpu.submit((enc) => {
      recorder = new PassRecorder(
        gpu,
        enc,
        stamps ? { querySet: stamps, beginIndex: 0, endIndex: 1 } : undefined,
      );
      recorder.record(dispatches);
      recorder.end();
      if (stamps) enc.resolveQuerySet(stamps, 0, 2, resolved, 0);
    });
    for (const k of [0, 1]) {
      const got = await gpu.readF32(outs[k]);
      let bad = -1;
      for (let i = 0; i < texels * 4; i++) if (got[i] !== (k + 1) * 1000 + i) bad = i;
      assertEquals(bad, -1, `dispatch ${k} read element ${bad} wrong`);
    }
    if (stamps) {
      const [begin, end] = new BigUint64Array(await gpu.read(resolved));
      assertEquals(end >= begin && begin > 0n, true, `timestamps ${begin}..${end}`);
    }
    assertThrows(() => recorder!.record(dispatches), Error, "record after end");
  } finally {
    gpu.destroy();
  }
});
