/**
 * The single executable (issue 8): the compile task's command line and its
 * message where `denort` cannot be had, the embedded assets when the working
 * directory is elsewhere (`deno run` path), and — where `DENORT_BIN` names a
 * runtime — the compiled binary itself, run from a directory with nothing
 * beside it.
 */
import { assert, assertEquals, assertStringIncludes } from "./assert.ts";
import {
  compileArgs,
  explainDenortFailure,
  INCLUDES,
  PERMISSIONS,
  TARGETS,
} from "../scripts/compile.ts";
import { defaultTokenizer } from "../data/corpus.ts";

const root = new URL("..", import.meta.url).pathname;
const mainTs = `${root}main.ts`;
const compileTs = `${root}scripts/compile.ts`;
const dec = new TextDecoder();

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

async function exec(
  cmd: string,
  args: string[],
  opts: { cwd: string; env?: Record<string, string>; clearEnv?: boolean },
): Promise<Run> {
  const out = await new Deno.Command(cmd, {
    args,
    cwd: opts.cwd,
    env: { NO_COLOR: "1", ...opts.env },
    clearEnv: opts.clearEnv,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

/** `deno run` with the permissions the tasks (and the binary) use, from `cwd`. */
function runTrainer(args: string[], cwd: string): Promise<Run> {
  return exec(
    Deno.execPath(),
    ["run", "--allow-read", "--allow-write", "--allow-env", mainTs, ...args],
    { cwd },
  );
}

const HELLO_IDS = defaultTokenizer().encode("hello");

// --- The compile command line ---------------------------------------------------

Deno.test("compile bakes in read, write, env, net (serve), ffi (MPI) and WebGPU, and embeds the tokenizer worker", () => {
  const args = compileArgs({ output: "/tmp/x/trainer" });
  for (const p of PERMISSIONS) assert(args.includes(p), `missing ${p} in ${args.join(" ")}`);
  assertEquals(
    [...PERMISSIONS].sort(),
    [
      "--allow-env",
      "--allow-ffi",
      "--allow-net",
      "--allow-read",
      "--allow-write",
      "--unstable-no-legacy-abort",
      "--unstable-webgpu",
    ],
  );
  for (const broad of ["-A", "--allow-all", "--allow-run"]) {
    assert(!args.some((a) => a.startsWith(broad)), `${broad} must not be baked in`);
  }
  assertEquals(INCLUDES, ["data/tokenize_worker.ts"]);
  const i = args.indexOf("--include");
  assertEquals(args[i + 1], "data/tokenize_worker.ts");
  assertEquals(args.at(-1), "main.ts");
  assertEquals(args[args.indexOf("--output") + 1], "/tmp/x/trainer");
  assert(!args.includes("--target"));
});

Deno.test("compile --target: every documented triple has its own output name", () => {
  assertEquals(Object.keys(TARGETS), [
    "x86_64-unknown-linux-gnu",
    "aarch64-unknown-linux-gnu",
    "x86_64-apple-darwin",
    "aarch64-apple-darwin",
    "x86_64-pc-windows-msvc",
  ]);
  assertEquals(new Set(Object.values(TARGETS)).size, 5);
  assert(TARGETS["x86_64-pc-windows-msvc"].endsWith(".exe"));
  const args = compileArgs({ output: "o", target: "aarch64-apple-darwin" });
  assertEquals(args[args.indexOf("--target") + 1], "aarch64-apple-darwin");
  let threw = false;
  try {
    compileArgs({ output: "o", target: "sparc-sun-solaris" });
  } catch (e) {
    threw = true;
    assertStringIncludes((e as Error).message, "unknown --target 'sparc-sun-solaris'");
  }
  assert(threw, "an unknown target must be refused");
});

// --- Recognising the denort failure --------------------------------------------------

// What Deno 2.9.6 printed here (no DNS), and with a proxy that refuses connections.
const DNS_FAILURE = `Check main.ts
Compile main.ts to trainer
Download https://dl.deno.land/release/v2.9.6/denort-x86_64-unknown-linux-gnu.zip
error: Writing deno compile executable to temporary file '/tmp/ctest/trainer.tmp-78bcb2c873666190'

Caused by:
    0: Setting up base binary.
    1: error sending request for url (https://dl.deno.land/release/v2.9.6/denort-x86_64-unknown-linux-gnu.zip): client error (Connect): dns error: failed to lookup address information: Name or service not known
    2: client error (Connect)
    3: dns error
    4: failed to lookup address information: Name or service not known

Stack backtrace:
   0: <unknown>
`;
const MISSING_BIN = `Compile main.ts to trainer
error: Writing deno compile executable to temporary file '/tmp/ctest/trainer.tmp-8fe1d6a57d2fa89a'

Caused by:
    0: Could not find denort at '/opt/denort'
    1: No such file or directory (os error 2)

Stack backtrace:
   0: <unknown>
`;
const TYPE_ERROR = `Check main.ts
TS2322 [ERROR]: Type 'string' is not assignable to type 'number'.
const x: number = "a";
      ^
    at file:///work/main/main.ts:3:7

error: Type checking failed.
`;

Deno.test("the denort download failure becomes a short message that says how to fix it", () => {
  const opts = { target: "x86_64-unknown-linux-gnu", denoVersion: "2.9.6" };
  const msg = explainDenortFailure(DNS_FAILURE, opts);
  assert(msg !== undefined, "the download failure must be recognised");
  assertStringIncludes(msg, "denort 2.9.6 for x86_64-unknown-linux-gnu");
  assertStringIncludes(msg, "failed to lookup address information");
  assertStringIncludes(msg, "DENORT_BIN=/path/to/denort deno task compile");
  assertStringIncludes(msg, "same version as the deno that compiles (2.9.6)");
  assert(!msg.includes("Stack backtrace") && !msg.includes("Caused by"), msg);

  const cross = explainDenortFailure(DNS_FAILURE, { ...opts, target: "aarch64-apple-darwin" })!;
  assertStringIncludes(cross, "denort-aarch64-apple-darwin.zip");
  assertStringIncludes(cross, "deno task compile --target aarch64-apple-darwin");

  const missing = explainDenortFailure(MISSING_BIN, opts);
  assert(missing !== undefined);
  assertStringIncludes(missing, "DENORT_BIN names '/opt/denort', which does not exist");

  // Any other failure is Deno's to report: a type error must be shown as it is.
  assertEquals(explainDenortFailure(TYPE_ERROR, opts), undefined);
  assertEquals(
    explainDenortFailure(
      "Download https://dl.deno.land/release/v2.9.6/denort-x86_64-unknown-linux-gnu.zip\n" +
        "error: Permission denied (os error 13): writing /readonly/trainer\n",
      opts,
    ),
    undefined,
  );
});

/** The denort zip that `deno compile` caches in DENO_DIR, if a download ever succeeded. */
async function cachedDenort(): Promise<string | undefined> {
  const info = await exec(Deno.execPath(), ["info", "--json"], { cwd: root });
  const denoDir = (JSON.parse(info.stdout) as { denoDir?: string }).denoDir;
  if (!denoDir) return undefined;
  const zip = `${denoDir}/dl/release/v${Deno.version.deno}/denort-${Deno.build.target}.zip`;
  try {
    await Deno.stat(zip);
    return zip;
  } catch {
    return undefined;
  }
}

const denortBin = Deno.env.get("DENORT_BIN");
const cached = denortBin ? undefined : await cachedDenort();
const failureSkip = denortBin
  ? "DENORT_BIN is set, so deno compile does not download"
  : cached
  ? `a denort is cached at ${cached}, so deno compile does not download`
  : undefined;
if (failureSkip) console.log(`skipped: the compile-failure test: ${failureSkip}`);

Deno.test({
  name: "deno task compile without denort ends with our message and exit 1, not a backtrace",
  ignore: failureSkip !== undefined,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "trainer_compile_" });
    try {
      // A proxy that refuses connections makes the download fail on any machine
      // (with network or without), as it does on an offline one.
      const env: Record<string, string> = {};
      for (const [k, v] of Object.entries(Deno.env.toObject())) {
        if (!/^(DENORT_BIN|https?_proxy|all_proxy|no_proxy)$/i.test(k)) env[k] = v;
      }
      const proxy = "http://127.0.0.1:9";
      Object.assign(env, { HTTPS_PROXY: proxy, https_proxy: proxy, NO_COLOR: "1" });
      const r = await exec(
        Deno.execPath(),
        [
          "run",
          "--allow-read",
          "--allow-write",
          "--allow-env",
          "--allow-run",
          compileTs,
          "--output",
          `${dir}/trainer`,
        ],
        { cwd: root, env, clearEnv: true },
      );
      assertEquals(r.code, 1, `stdout: ${r.stdout}\nstderr: ${r.stderr}`);
      assertStringIncludes(r.stderr, "deno compile could not get Deno's runtime (denort");
      assertStringIncludes(r.stderr, "DENORT_BIN=/path/to/denort deno task compile");
      assert(!/Stack backtrace|Caused by|<unknown>/.test(r.stderr), r.stderr);
      assert(r.stderr.trim().split("\n").length <= 8, `not short:\n${r.stderr}`);
      const left = [...Deno.readDirSync(dir)].map((e) => e.name);
      assertEquals(left, [], "a failed build leaves nothing behind");
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

// --- Embedded assets with the working directory elsewhere (deno run) ---------------------------

Deno.test("from another working directory: tokenizer, info, pretrain and workers need no files beside them", async () => {
  const cwd = await Deno.makeTempDir({ prefix: "trainer_cwd_" });
  try {
    const tok = await runTrainer(["tokenize", "--json", "hello"], cwd);
    assertEquals(tok.code, 0, tok.stderr);
    assertEquals(JSON.parse(tok.stdout).ids, [...HELLO_IDS]);

    const info = await runTrainer(["info", "--json"], cwd);
    assertEquals(info.code, 0, info.stderr);
    assert(JSON.parse(info.stdout).adapter.name.length > 0);

    const pre = await runTrainer(["pretrain", "--steps", "0", "--out", "run"], cwd);
    assertEquals(pre.code, 0, pre.stderr);
    for (const f of ["config.json", "model.safetensors", "tokenizer.json", "trainer_state.json"]) {
      await Deno.stat(`${cwd}/run/${f}`);
    }
    // The embedded tokenizer went into the checkpoint unchanged.
    const saved = JSON.parse(await Deno.readTextFile(`${cwd}/run/tokenizer.json`));
    const embedded = JSON.parse(
      await Deno.readTextFile(`${root}data/default_tokenizer/tokenizer.json`),
    );
    assertEquals(saved.model.vocab, embedded.model.vocab);

    // Workers are started by URL relative to their module, not to the cwd.
    await Deno.writeTextFile(
      `${cwd}/a.jsonl`,
      '{"text": "hello valley"}\n{"text": "the river"}\n{"text": "a town"}\n',
    );
    const prep = await runTrainer(
      ["data", "prepare", "--data", "a.jsonl", "--out", "shards", "--workers", "2"],
      cwd,
    );
    assertEquals(prep.code, 0, prep.stderr);
    await Deno.stat(`${cwd}/shards/manifest.json`);
  } finally {
    await Deno.remove(cwd, { recursive: true });
  }
});

// --- The compiled binary (needs a denort) ---------------------------------------------------

const binarySkip = denortBin
  ? undefined
  : "DENORT_BIN is not set and deno compile cannot download denort here; set DENORT_BIN to a denort " +
    `${Deno.version.deno} binary to run it`;
if (binarySkip) console.log(`skipped: the compiled-binary test: ${binarySkip}`);

Deno.test({
  name:
    "the compiled ./trainer runs info, tokenize, data prepare --workers and a 2-step pretrain alone",
  ignore: binarySkip !== undefined,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "trainer_bin_" });
    try {
      const exe = `${dir}/trainer${Deno.build.os === "windows" ? ".exe" : ""}`;
      const build = await exec(
        Deno.execPath(),
        [
          "run",
          "--allow-read",
          "--allow-write",
          "--allow-env",
          "--allow-run",
          compileTs,
          "--output",
          exe,
        ],
        { cwd: root },
      );
      assertEquals(build.code, 0, build.stderr);
      assertEquals([...Deno.readDirSync(dir)].map((e) => e.name), [exe.split("/").at(-1)]);

      const info = await exec(exe, ["info"], { cwd: dir });
      assertEquals(info.code, 0, info.stderr);
      assertStringIncludes(info.stdout, "Adapter");

      const tok = await exec(exe, ["tokenize", "--json", "hello"], { cwd: dir });
      assertEquals(tok.code, 0, tok.stderr);
      assertEquals(JSON.parse(tok.stdout).ids, [...HELLO_IDS]);

      await Deno.writeTextFile(`${dir}/a.jsonl`, '{"text": "hello valley"}\n{"text": "a town"}\n');
      const prep = await exec(
        exe,
        ["data", "prepare", "--data", "a.jsonl", "--out", "shards", "--workers", "2"],
        { cwd: dir },
      );
      assertEquals(prep.code, 0, prep.stderr);

      const pre = await exec(
        exe,
        ["pretrain", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--out", "run"],
        { cwd: dir },
      );
      assertEquals(pre.code, 0, pre.stderr);
      const state = JSON.parse(await Deno.readTextFile(`${dir}/run/trainer_state.json`));
      assertEquals(state.step, 2);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
