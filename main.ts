/**
 * `trainer`: the command line. Parses arguments, dispatches subcommands,
 * nothing else — every command lives in `cli/` as a `CommandSpec`.
 */
import { type CommandSpec, formatHelp, parseCommandArgs } from "./cli/args.ts";
import { UsageError, UserError } from "./util/errors.ts";
import { infoCommand } from "./cli/info.ts";
import { dpoCommand, pretrainCommand, sftCommand } from "./cli/train.ts";
import { loraCommand, loraMergeCommand } from "./cli/lora.ts";
import { evalCommand } from "./cli/eval.ts";
import { experimentCommand } from "./cli/experiment.ts";
import { chatCommand, generateCommand } from "./cli/generate.ts";
import { serveCommand } from "./cli/serve.ts";
import { dataPrepareCommand, tokenizeCommand } from "./cli/data.ts";
import { tokenizerTrainCommand } from "./cli/tokenizer.ts";

/** Every command, in the order `trainer --help` lists them. */
export const COMMANDS: CommandSpec[] = [
  pretrainCommand,
  sftCommand,
  loraCommand,
  loraMergeCommand,
  dpoCommand,
  generateCommand,
  chatCommand,
  serveCommand,
  evalCommand,
  experimentCommand,
  tokenizeCommand,
  dataPrepareCommand,
  tokenizerTrainCommand,
  infoCommand,
];

const VERSION = "0.1.0";

function usage(): string {
  const width = Math.max(...COMMANDS.map((c) => c.name.length)) + 2;
  return [
    "trainer: pretrain, fine-tune and sample small Llama-style language models on WebGPU",
    "",
    "Usage: trainer <command> [options]",
    "",
    "Commands:",
    ...COMMANDS.map((c) => `  ${c.name.padEnd(width)}${c.summary}`),
    "",
    "Run 'trainer <command> --help' for a command's options.",
  ].join("\n");
}

function findCommand(argv: string[]): { spec: CommandSpec; rest: string[] } | undefined {
  // Two-word commands ("tokenizer train") first, then one-word ones.
  const two = argv.slice(0, 2).join(" ");
  const spec2 = COMMANDS.find((c) => c.name === two);
  if (spec2) return { spec: spec2, rest: argv.slice(2) };
  const spec1 = COMMANDS.find((c) => c.name === argv[0]);
  if (spec1) return { spec: spec1, rest: argv.slice(1) };
  return undefined;
}

/** Runs the CLI on `argv` and resolves to the exit status. */
export async function main(argv: string[]): Promise<number> {
  const first = argv[0];
  if (first === undefined || first === "--help" || first === "-h" || first === "help") {
    const target = first === "help" && argv[1] ? findCommand(argv.slice(1)) : undefined;
    console.log(target ? formatHelp(target.spec) : usage());
    return first === undefined ? 2 : 0;
  }
  if (first === "--version" || first === "-V") {
    console.log(`trainer ${VERSION} (Deno ${Deno.version.deno})`);
    return 0;
  }
  const found = findCommand(argv);
  if (!found) {
    const group = COMMANDS.filter((c) => c.name.startsWith(`${first} `));
    const what = group.length > 0
      ? `'${first}' needs a subcommand: ${group.map((c) => c.name).join(", ")}`
      : `unknown command '${first}'`;
    console.error(`trainer: ${what}\n\n${usage()}`);
    return 2;
  }
  const { spec, rest } = found;
  try {
    const args = await parseCommandArgs(spec, rest);
    if (!args) {
      console.log(formatHelp(spec));
      return 0;
    }
    return (await spec.run(args)) ?? 0;
  } catch (e) {
    if (e instanceof UsageError) {
      console.error(`trainer ${spec.name}: ${e.message}\n\n${formatHelp(spec)}`);
      return e.exitCode;
    }
    if (e instanceof UserError) {
      console.error(`trainer ${spec.name}: ${e.message}`);
      return e.exitCode;
    }
    throw e;
  }
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
