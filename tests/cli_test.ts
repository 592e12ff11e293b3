import { assert, assertEquals, assertStringIncludes } from "./assert.ts";
import { COMMANDS } from "../main.ts";

const root = new URL("..", import.meta.url).pathname;

/** Runs `deno run main.ts ...args` as a user would and captures everything. */
async function trainer(args: string[], env: Record<string, string> = {}) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-read", "--allow-write", "--allow-env", "main.ts", ...args],
    cwd: root,
    env: { NO_COLOR: "1", ...env },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

Deno.test("trainer --help lists every command and exits 0", async () => {
  const r = await trainer(["--help"]);
  assertEquals(r.code, 0);
  for (const c of COMMANDS) assertStringIncludes(r.stdout, c.name);
});

Deno.test("every command has --help that exits 0 and shows its options", async () => {
  for (const c of COMMANDS) {
    const r = await trainer([...c.name.split(" "), "--help"]);
    assertEquals(r.code, 0, `${c.name} --help: ${r.stderr}`);
    assertStringIncludes(r.stdout, `Usage: trainer ${c.name}`);
    for (const opt of Object.keys(c.options)) assertStringIncludes(r.stdout, `--${opt}`);
  }
});

Deno.test("an unknown command prints usage and exits 2 without a stack trace", async () => {
  const r = await trainer(["frobnicate"]);
  assertEquals(r.code, 2);
  assertStringIncludes(r.stderr, "unknown command 'frobnicate'");
  assertStringIncludes(r.stderr, "Usage: trainer <command>");
  assert(!/\bat .*\.ts:\d+/.test(r.stderr), `stack trace in: ${r.stderr}`);
});

Deno.test("an unknown option prints the command's usage and exits 2", async () => {
  const r = await trainer(["info", "--frobnicate"]);
  assertEquals(r.code, 2);
  assertStringIncludes(r.stderr, "unknown option '--frobnicate'");
  assertStringIncludes(r.stderr, "Usage: trainer info");
  assert(!/\bat .*\.ts:\d+/.test(r.stderr), `stack trace in: ${r.stderr}`);
});

Deno.test("no arguments prints usage and exits 2", async () => {
  const r = await trainer([]);
  assertEquals(r.code, 2);
  assertStringIncludes(r.stdout, "Usage: trainer <command>");
});

Deno.test("trainer info names the adapter and prints limits", async () => {
  const r = await trainer(["info"]);
  assertEquals(r.code, 0, r.stderr);
  assertStringIncludes(r.stdout, "Adapter");
  assertStringIncludes(r.stdout, "maxStorageBufferBindingSize");
  assertStringIncludes(r.stdout, `Deno       ${Deno.version.deno}`);
  // Mesa's "XDG_RUNTIME_DIR is invalid" noise must not reach the user.
  assertEquals(r.stderr, "");
  const j = await trainer(["info", "--json"]);
  const report = JSON.parse(j.stdout);
  assert(report.adapter.name.length > 0);
  assert(report.limits.maxBufferSize > 0);
});

Deno.test("no adapter: exit 1 with a message that says how to get one", async () => {
  // An empty Vulkan driver list and the Vulkan backend forced: no adapter.
  const r = await trainer(["info"], {
    DENO_WEBGPU_BACKEND: "vulkan",
    VK_ICD_FILENAMES: "/nonexistent/icd.json",
    VK_DRIVER_FILES: "/nonexistent/icd.json",
  });
  assertEquals(r.code, 1);
  assertStringIncludes(r.stderr, "no WebGPU adapter found");
  assertStringIncludes(r.stderr, "mesa-vulkan-drivers");
});
