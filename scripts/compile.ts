/**
 * `deno task compile`: builds the single executable `./trainer` with
 * `deno compile`, and says plainly what to do when Deno's runtime (`denort`)
 * cannot be had.
 *
 *   deno task compile                                   # ./trainer for this machine
 *   deno task compile --target aarch64-apple-darwin     # ./trainer-aarch64-apple-darwin
 *   deno task compile --all                             # every target in TARGETS
 *   deno task compile --output /usr/local/bin/trainer
 *
 * What goes in: the module graph of `main.ts` — the code, the WGSL kernels
 * (strings in the kernel modules), the npm packages, the embedded corpus
 * generator and the default tokenizer (JSON modules imported by
 * `data/corpus.ts`) — plus `data/tokenize_worker.ts`, the module that
 * `trainer data prepare --workers N` starts as a Worker by URL (`--include`
 * makes sure a worker's main module is embedded however the graph changes).
 *
 * Permissions baked in (`PERMISSIONS`): read and write (data, tokenizers,
 * checkpoints, metrics; and the private XDG_RUNTIME_DIR the GPU runtime makes
 * to keep Mesa quiet), env (that variable, DENO_WEBGPU_BACKEND, NO_COLOR, the
 * MPI launchers' variables), net (`trainer serve`: it listens on 127.0.0.1
 * unless told otherwise), ffi (data-parallel training: libmpi is loaded only
 * when the process was launched by mpirun or srun) and WebGPU
 * (`--unstable-webgpu`; deno.json's `"unstable"` says the same, given again so
 * the binary does not depend on config discovery), plus
 * `--unstable-no-legacy-abort` for the server (deno.json has it too). Nothing
 * runs subprocesses, so no `--allow-run`, and never `-A`.
 *
 * `deno compile` downloads `denort` (Deno's runtime without the tooling) from
 * dl.deno.land on first use, unless `DENORT_BIN` names one. Where neither
 * works, Deno prints an error chain and a backtrace; this script recognises
 * that failure and prints what to do instead (exit 1).
 */
import { parseArgs } from "node:util";
import { fileURLToPath } from "node:url";
import { isAbsolute, join } from "node:path";

/** The targets `deno compile --target` accepts, and the output file each gets by default. */
export const TARGETS: Record<string, string> = {
  "x86_64-unknown-linux-gnu": "trainer-x86_64-unknown-linux-gnu",
  "aarch64-unknown-linux-gnu": "trainer-aarch64-unknown-linux-gnu",
  "x86_64-apple-darwin": "trainer-x86_64-apple-darwin",
  "aarch64-apple-darwin": "trainer-aarch64-apple-darwin",
  "x86_64-pc-windows-msvc": "trainer-x86_64-pc-windows-msvc.exe",
};

/**
 * Permissions baked into the binary: the narrowest set under which every
 * command runs (see the module comment for why each is needed).
 */
export const PERMISSIONS: readonly string[] = [
  "--allow-read",
  "--allow-write",
  "--allow-env",
  "--allow-net",
  "--allow-ffi",
  "--unstable-webgpu",
  "--unstable-no-legacy-abort",
];

/** Modules embedded beyond `main.ts`'s static graph: Worker entry points. */
export const INCLUDES: readonly string[] = ["data/tokenize_worker.ts"];

/** The project root (this file lives in `scripts/`). */
export const PROJECT_ROOT: string = fileURLToPath(new URL("..", import.meta.url));

/** The command line of one `deno compile`, relative to the project root. */
export function compileArgs(opts: { output: string; target?: string }): string[] {
  if (opts.target !== undefined && !(opts.target in TARGETS)) {
    throw new Error(
      `unknown --target '${opts.target}'; targets: ${Object.keys(TARGETS).join(", ")}`,
    );
  }
  return [
    "compile",
    ...PERMISSIONS,
    ...INCLUDES.flatMap((f) => ["--include", f]),
    ...(opts.target ? ["--target", opts.target] : []),
    "--output",
    opts.output,
    "main.ts",
  ];
}

/** The target triple of the machine running this script, as `deno compile --target` spells it. */
export function hostTarget(): string {
  return Deno.build.target;
}

// Deno's error chain when it cannot set up the base binary: the download
// ("error sending request for url (https://dl.deno.land/.../denort-...zip)")
// or a DENORT_BIN that does not exist ("Could not find denort at '...'").
const DOWNLOAD_FAILURE = /error sending request for url \((https:\/\/[^)\s]*denort[^)\s]*)\)/;
const DOWNLOAD_BAD_STATUS = /(https:\/\/[^\s'"]*denort[^\s'"]*\.zip)/;
const MISSING_DENORT_BIN = /Could not find denort at '([^']*)'/;

/** Last line of Deno's error chain ("4: Connection refused (os error 111)" -> the cause). */
function rootCause(stderr: string): string | undefined {
  const chain = stderr.split("Caused by:")[1]?.split("Stack backtrace:")[0] ?? "";
  const causes = [...chain.matchAll(/^\s*\d+: (.+)$/gm)].map((m) => m[1].trim());
  return causes.at(-1);
}

/**
 * When `stderr` of a failed `deno compile` says that `denort` could not be
 * had, the message to print instead (what failed and how to fix it);
 * otherwise `undefined` (a type error, say: then Deno's own output is the
 * right thing to show).
 */
export function explainDenortFailure(
  stderr: string,
  opts: { target: string; denoVersion: string },
): string | undefined {
  // deno colours its output when stderr is a terminal; ours is a pipe, but a
  // user may force colour (DENO_FORCE_COLOR / CLICOLOR_FORCE).
  // deno-lint-ignore no-control-regex
  const text = stderr.replace(/\x1b\[[0-9;]*m/g, "");
  const v = opts.denoVersion;
  const zip = `denort-${opts.target}.zip`;
  const fix = [
    "Fix it in one of two ways:",
    `  - let this machine download it (https://dl.deno.land/release/v${v}/${zip}) and run the task again; or`,
    `  - get ${zip} of the Deno ${v} release (https://github.com/denoland/deno/releases/tag/v${v}),`,
    "    unzip it, and point DENORT_BIN at the binary:",
    "      DENORT_BIN=/path/to/denort deno task compile" +
    (opts.target === hostTarget() ? "" : ` --target ${opts.target}`),
    `denort must be the same version as the deno that compiles (${v}) and built for the target.`,
  ].join("\n");
  const missing = text.match(MISSING_DENORT_BIN);
  if (missing) {
    return `deno compile: DENORT_BIN names '${missing[1]}', which does not exist.\n${fix}`;
  }
  // Only the base-binary step: a later failure (say, writing --output) also
  // shows the download URL in Deno's progress line, but is not ours to explain.
  if (!/Setting up base binary/.test(text)) return undefined;
  const url = text.match(DOWNLOAD_FAILURE)?.[1] ?? text.match(DOWNLOAD_BAD_STATUS)?.[1];
  if (!url) return undefined;
  const cause = rootCause(text);
  return [
    `deno compile could not get Deno's runtime (denort ${v} for ${opts.target}): ` +
    `downloading ${url} failed${cause ? ` (${cause})` : ""}, and DENORT_BIN is not set.`,
    fix,
  ].join("\n");
}

/** Runs one `deno compile`; resolves to its exit status after printing what the user needs. */
async function compileOne(output: string, target: string | undefined): Promise<number> {
  const args = compileArgs({ output, target });
  const child = new Deno.Command(Deno.execPath(), {
    args,
    cwd: PROJECT_ROOT,
    stdin: "null",
    stdout: "inherit",
    stderr: "piped",
  }).spawn();
  const { code, stderr } = await child.output();
  const text = new TextDecoder().decode(stderr);
  if (code === 0) {
    // Deno's summary of what was embedded (files, npm packages, sizes).
    await Deno.stderr.write(stderr);
    return 0;
  }
  const explained = explainDenortFailure(text, {
    target: target ?? hostTarget(),
    denoVersion: Deno.version.deno,
  });
  if (explained) {
    console.error(explained);
  } else {
    await Deno.stderr.write(stderr);
    console.error(`deno compile failed (exit ${code}): ${["deno", ...args].join(" ")}`);
  }
  return 1;
}

/** Parses the task's arguments and builds; resolves to the process exit status. */
export async function runCompile(argv: string[]): Promise<number> {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        target: { type: "string" },
        all: { type: "boolean" },
        output: { type: "string", short: "o" },
        help: { type: "boolean", short: "h" },
      },
    }));
  } catch (e) {
    console.error(`compile: ${(e as Error).message}`);
    return 2;
  }
  if (values.help) {
    console.log(
      "Usage: deno task compile [--target TRIPLE | --all] [--output FILE]\n\n" +
        "Builds ./trainer (or ./trainer-<TRIPLE>[.exe] for --target) with deno compile.\n" +
        `Targets: ${Object.keys(TARGETS).join(", ")}\n` +
        "Set DENORT_BIN to a denort binary of the same Deno version where it cannot be downloaded.",
    );
    return 0;
  }
  if (values.target !== undefined && !(values.target in TARGETS)) {
    console.error(
      `compile: unknown --target '${values.target}'; targets: ${Object.keys(TARGETS).join(", ")}`,
    );
    return 2;
  }
  if (values.all && (values.target !== undefined || values.output !== undefined)) {
    console.error("compile: --all builds every target under its own name; drop --target/--output");
    return 2;
  }
  const jobs: { output: string; target?: string }[] = values.all
    ? Object.entries(TARGETS).map(([target, output]) => ({ target, output }))
    : [{
      target: values.target,
      output: values.output ??
        (values.target
          ? TARGETS[values.target]
          : Deno.build.os === "windows"
          ? "trainer.exe"
          : "trainer"),
    }];
  for (const job of jobs) {
    // A relative --output is relative to where the user ran the task (deno task
    // runs scripts in the project root and passes the user's directory as INIT_CWD).
    const base = Deno.env.get("INIT_CWD") ?? Deno.cwd();
    const output = isAbsolute(job.output) ? job.output : join(base, job.output);
    const code = await compileOne(output, job.target);
    if (code !== 0) return code;
  }
  return 0;
}

if (import.meta.main) {
  Deno.exit(await runCompile(Deno.args));
}
