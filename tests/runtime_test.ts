import { assertEquals, assertRejects } from "./assert.ts";
import { Gpu, LINEAR_WORKGROUP_WGSL, splitWorkgroups } from "../kernels/runtime.ts";

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
