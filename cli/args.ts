/**
 * The command-line machinery shared by every command: option specs, parsing
 * with `parseArgs` from `node:util`, JSONC run configs (`--config FILE`, flags
 * override the file), typed accessors and help text.
 *
 * Each folder describes its own commands as `CommandSpec`s; `main.ts` only
 * collects and dispatches them.
 */
import { parseArgs } from "node:util";
import { parse as parseJsonc, type ParseError, printParseErrorCode } from "jsonc-parser";
import { UsageError, UserError } from "../util/errors.ts";

/** One `--flag` of a command. */
export interface OptionSpec {
  /** `boolean` flags take no value. */
  type: "string" | "boolean";
  /** May be given several times (or as several values after one flag). */
  multiple?: boolean;
  /** One-letter alias, as in `-h`. */
  short?: string;
  /** Value shown in help, e.g. `N` or `DIR`. */
  valueName?: string;
  /** One line of help; defaults belong here, in words. */
  help: string;
}

/** Values after parsing: strings, booleans or string lists, keyed by the long flag name. */
export type OptionValues = Record<string, string | boolean | string[] | undefined>;

/** What a command's `run` receives. */
export interface ParsedArgs {
  values: OptionValues;
  positionals: string[];
}

/** A subcommand: `trainer <name> [options]`. */
export interface CommandSpec {
  /** One or two words: `info`, `tokenizer train`. */
  name: string;
  /** One line for the command table. */
  summary: string;
  /** Usage line after `trainer <name>`, e.g. `[options] TEXT`. */
  usage?: string;
  /** Paragraphs printed by `--help` after the usage line. */
  description?: string;
  options: Record<string, OptionSpec>;
  /** Whether positional arguments are accepted. */
  positionals?: boolean;
  /** Whether `--config FILE` (JSONC, keys are long flag names) is accepted. */
  config?: boolean;
  /** Runs the command; resolves to the exit status (0 when void). */
  run(args: ParsedArgs): Promise<number | void> | number | void;
}

/** Help text of one command. */
export function formatHelp(spec: CommandSpec): string {
  const lines = [`Usage: trainer ${spec.name} ${spec.usage ?? "[options]"}`, "", spec.summary];
  if (spec.description) {
    for (const paragraph of spec.description.trim().split(/\n\s*\n/)) {
      lines.push("", wrap(paragraph.replace(/\s+/g, " "), 80));
    }
  }
  const rows: [string, string][] = [];
  const all: Record<string, OptionSpec> = { ...spec.options };
  if (spec.config) {
    all["config"] = {
      type: "string",
      valueName: "FILE",
      help: "JSONC run config: keys are the long option names; flags given here override it",
    };
  }
  all["help"] = { type: "boolean", short: "h", help: "show this help" };
  for (const [name, o] of Object.entries(all)) {
    const flag = (o.short ? `-${o.short}, ` : "    ") + `--${name}` +
      (o.type === "string" ? ` ${o.valueName ?? "VALUE"}${o.multiple ? "..." : ""}` : "");
    rows.push([flag, o.help]);
  }
  const width = Math.min(34, Math.max(...rows.map(([f]) => f.length)) + 2);
  lines.push("", "Options:");
  for (const [flag, help] of rows) {
    lines.push(
      flag.length + 2 > width
        ? `  ${flag}\n  ${" ".repeat(width)}${help}`
        : `  ${flag.padEnd(width)}${help}`,
    );
  }
  return lines.join("\n");
}

function wrap(text: string, width: number): string {
  const out: string[] = [];
  let line = "";
  for (const word of text.split(" ")) {
    if (line && line.length + 1 + word.length > width) {
      out.push(line);
      line = word;
    } else line = line ? `${line} ${word}` : word;
  }
  if (line) out.push(line);
  return out.join("\n");
}

/**
 * Parses `argv` against a command's options. Unknown options, missing values and
 * stray positionals throw `UsageError`. With `--config FILE`, the file's values
 * come first and flags override them. Returns `undefined` when `--help` was asked.
 */
export async function parseCommandArgs(
  spec: CommandSpec,
  argv: string[],
): Promise<ParsedArgs | undefined> {
  const options: Record<
    string,
    { type: "string" | "boolean"; multiple?: boolean; short?: string }
  > = {};
  for (const [name, o] of Object.entries(spec.options)) {
    options[name] = { type: o.type };
    if (o.multiple) options[name].multiple = true;
    if (o.short) options[name].short = o.short;
  }
  options["help"] = { type: "boolean", short: "h" };
  if (spec.config) options["config"] = { type: "string" };

  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      options,
      allowPositionals: true,
      strict: true,
    });
  } catch (e) {
    throw new UsageError(cleanParseArgsMessage((e as Error).message));
  }
  const values = parsed.values as OptionValues;
  if (values["help"]) return undefined;
  // Options that take several values also accept the values that follow them
  // (`--data a.jsonl b.jsonl`), as shells expand globs that way.
  const positionals = regroupMultiple(spec, argv, values, parsed.positionals);
  if (!spec.positionals && positionals.length > 0) {
    throw new UsageError(`unexpected argument '${positionals[0]}'`);
  }
  if (spec.config && typeof values["config"] === "string") {
    const fromFile = await readRunConfig(spec, values["config"]);
    for (const [k, v] of Object.entries(fromFile)) {
      if (values[k] === undefined) values[k] = v;
    }
  }
  delete values["help"];
  delete values["config"];
  return { values, positionals };
}

function cleanParseArgsMessage(message: string): string {
  // node:util's messages carry a code prefix and a hint about `--`; keep the substance.
  return message.replace(/^\[?ERR_[A-Z_]+\]?:?\s*/, "").replace(
    /\. To specify a positional argument.*$/s,
    "",
  ).replace(/^Unknown option/, "unknown option");
}

function regroupMultiple(
  spec: CommandSpec,
  argv: string[],
  values: OptionValues,
  positionals: string[],
): string[] {
  const multi = Object.entries(spec.options).filter(([, o]) => o.multiple && o.type === "string");
  if (multi.length === 0) return positionals;
  const rest: string[] = [];
  let current: string | undefined;
  let afterDashDash = false;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (afterDashDash) {
      rest.push(a);
      continue;
    }
    if (a === "--") {
      afterDashDash = true;
      continue;
    }
    if (a.startsWith("-")) {
      const name = a.replace(/^--?/, "").split("=")[0];
      const o = spec.options[name] ??
        Object.values(spec.options).find((x) => x.short === name);
      current = o?.multiple && o.type === "string" && !a.includes("=") ? name : undefined;
      if (o?.type === "string" && !a.includes("=")) i++; // skip its first value
      else if (!o && (name === "config")) i++;
      continue;
    }
    if (current) (values[current] as string[]).push(a);
    else rest.push(a);
  }
  return rest;
}

async function readRunConfig(spec: CommandSpec, path: string): Promise<OptionValues> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    throw new UserError(`cannot read config file ${path}: ${(e as Error).message}`);
  }
  const errors: ParseError[] = [];
  const data = parseJsonc(text, errors, { allowTrailingComma: true });
  if (errors.length > 0) {
    const { line, col } = lineCol(text, errors[0].offset);
    throw new UserError(
      `${path}:${line}:${col}: invalid JSONC (${printParseErrorCode(errors[0].error)})`,
    );
  }
  if (typeof data !== "object" || data === null || Array.isArray(data)) {
    throw new UserError(`${path}: a run config must be a JSON object of option names to values`);
  }
  const out: OptionValues = {};
  for (const [key, value] of Object.entries(data as Record<string, unknown>)) {
    const name = key.replaceAll("_", "-");
    const o = spec.options[name];
    if (!o) {
      throw new UserError(`${path}: unknown option "${key}" for 'trainer ${spec.name}'`);
    }
    if (o.type === "boolean") {
      if (typeof value !== "boolean") {
        throw new UserError(`${path}: "${key}" must be true or false`);
      }
      out[name] = value;
    } else if (o.multiple) {
      const list = Array.isArray(value) ? value : [value];
      if (!list.every((v) => typeof v === "string" || typeof v === "number")) {
        throw new UserError(`${path}: "${key}" must be a string or a list of strings`);
      }
      out[name] = list.map(String);
    } else {
      if (typeof value !== "string" && typeof value !== "number") {
        throw new UserError(`${path}: "${key}" must be a string or a number`);
      }
      out[name] = String(value);
    }
  }
  return out;
}

function lineCol(text: string, offset: number): { line: number; col: number } {
  const before = text.slice(0, offset).split("\n");
  return { line: before.length, col: before[before.length - 1].length + 1 };
}

/** A string option's value, or `fallback`. */
export function stringOption(args: ParsedArgs, name: string): string | undefined;
export function stringOption(args: ParsedArgs, name: string, fallback: string): string;
export function stringOption(
  args: ParsedArgs,
  name: string,
  fallback?: string,
): string | undefined {
  const v = args.values[name];
  return typeof v === "string" ? v : fallback;
}

/** A repeatable option's values (empty when absent). */
export function listOption(args: ParsedArgs, name: string): string[] {
  const v = args.values[name];
  return Array.isArray(v) ? v : typeof v === "string" ? [v] : [];
}

/** A boolean flag's value. */
export function flagOption(args: ParsedArgs, name: string): boolean {
  return args.values[name] === true;
}

/** A numeric option's value, checked: `--lr abc` is a usage error that names the flag. */
export function numberOption(
  args: ParsedArgs,
  name: string,
  fallback: number,
  check: { integer?: boolean; min?: number; max?: number } = {},
): number {
  const v = args.values[name];
  if (v === undefined) return fallback;
  const n = Number(v);
  if (typeof v !== "string" || v.trim() === "" || !Number.isFinite(n)) {
    throw new UsageError(`--${name} expects a number, got '${v}'`);
  }
  if (check.integer && !Number.isInteger(n)) {
    throw new UsageError(`--${name} expects a whole number, got '${v}'`);
  }
  if (check.min !== undefined && n < check.min) {
    throw new UsageError(`--${name} must be at least ${check.min}, got ${v}`);
  }
  if (check.max !== undefined && n > check.max) {
    throw new UsageError(`--${name} must be at most ${check.max}, got ${v}`);
  }
  return n;
}
