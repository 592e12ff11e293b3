/**
 * The data commands: `trainer tokenize` (look at what the tokenizer and the SFT
 * mask make of a text or a file) and `trainer data prepare` (tokenize JSONL once
 * into token shards).
 */
import {
  type CommandSpec,
  flagOption,
  listOption,
  numberOption,
  type ParsedArgs,
  stringOption,
} from "./args.ts";
import { UsageError, UserError } from "../util/errors.ts";
import { defaultTokenizer } from "../data/corpus.ts";
import { DEFAULT_SHARD_TOKENS, type PrepareProgress, prepareShards } from "../data/shards.ts";
import { maskRendered, renderConversation } from "../data/sft.ts";
import {
  parsePretrainRecord,
  parseSftRecord,
  readJsonlLines,
  resolveDataPaths,
} from "../data/sources.ts";
import { TextTokenizer } from "../data/tokenizer.ts";

/** Where a command writes: stdout, stderr, and whether stdout is a terminal (for colour). */
export interface CommandOutput {
  /** Writes to standard output. */
  stdout(text: string): Promise<void>;
  /** Writes to standard error (progress, notes). */
  stderr(text: string): Promise<void>;
  /** stdout is a terminal: ANSI colour allowed. */
  stdoutIsTerminal: boolean;
  /** stderr is a terminal: progress may redraw one line with `\r`. */
  stderrIsTerminal: boolean;
}

const encoder = new TextEncoder();

async function writeAll(w: { write(p: Uint8Array): Promise<number> }, text: string): Promise<void> {
  const bytes = encoder.encode(text);
  let o = 0;
  while (o < bytes.length) o += await w.write(bytes.subarray(o));
}

/** The process's own stdout and stderr. */
export function processOutput(): CommandOutput {
  return {
    stdout: (t) => writeAll(Deno.stdout, t),
    stderr: (t) => writeAll(Deno.stderr, t),
    stdoutIsTerminal: Deno.stdout.isTerminal(),
    stderrIsTerminal: Deno.stderr.isTerminal(),
  };
}

async function loadTokenizer(args: ParsedArgs): Promise<TextTokenizer> {
  const dir = stringOption(args, "tokenizer");
  return dir === undefined ? defaultTokenizer() : await TextTokenizer.load(dir);
}

/** Text with control characters shown as escapes, so one token or line stays on one line. */
function visible(s: string): string {
  // deno-lint-ignore no-control-regex -- matching control characters is the point
  return s.replace(/[\x00-\x1f\x7f]/g, (c) => {
    if (c === "\n") return "\\n";
    if (c === "\t") return "\\t";
    if (c === "\r") return "\\r";
    return `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}`;
  });
}

/** Readable view of a token sequence: the decoded pieces separated by `|`. */
function piecesView(tok: TextTokenizer, ids: number[]): string {
  return ids.map((id) => visible(tok.decode([id]))).join("|");
}

/**
 * Readable view of an SFT row: the rendered text with each trained span in
 * brackets, or (on a terminal) in green.
 */
function maskView(tok: TextTokenizer, ids: number[], mask: number[], color: boolean): string {
  let out = "";
  let j = 0;
  while (j < ids.length) {
    let k = j;
    while (k < ids.length && mask[k] === mask[j]) k++;
    const text = visible(tok.decode(ids.slice(j, k)));
    if (mask[j]) out += color ? `\x1b[32m${text}\x1b[0m` : `[${text}]`;
    else out += text;
    j = k;
  }
  return out;
}

/** `trainer tokenize`, writing to `out` (tests capture it). */
export async function runTokenize(args: ParsedArgs, out: CommandOutput): Promise<number> {
  const file = stringOption(args, "data");
  const json = flagOption(args, "json");
  const sft = flagOption(args, "sft");
  if (file !== undefined && args.positionals.length > 0) {
    throw new UsageError("give either a TEXT or --data FILE, not both");
  }
  if (file === undefined && args.positionals.length === 0) {
    throw new UsageError("give a TEXT to tokenize, or --data FILE");
  }
  if (sft && file === undefined) {
    throw new UsageError("--sft applies to --data FILE (conversations in JSONL)");
  }
  const tok = await loadTokenizer(args);

  if (file === undefined) {
    const text = args.positionals.join(" ");
    const ids = tok.encode(text);
    const tokens = ids.map((id) => tok.idToToken(id) ?? "");
    if (json) {
      await out.stdout(JSON.stringify({ ids, tokens }) + "\n");
      return 0;
    }
    const rows = [`${ids.length} tokens (no special tokens added)`];
    const idWidth = Math.max(2, ...ids.map((id) => String(id).length));
    const tokWidth = Math.min(24, Math.max(5, ...tokens.map((t) => t.length)));
    rows.push(`${"#".padStart(5)}  ${"id".padStart(idWidth)}  ${"token".padEnd(tokWidth)}  text`);
    ids.forEach((id, i) => {
      rows.push(
        `${String(i).padStart(5)}  ${String(id).padStart(idWidth)}  ${
          tokens[i].padEnd(tokWidth)
        }  ${JSON.stringify(tok.decode([id]))}`,
      );
    });
    await out.stdout(rows.join("\n") + "\n");
    return 0;
  }

  const resolved = await resolveDataPaths([file]);
  if (resolved.format !== "jsonl") {
    throw new UserError(`${file} is a token-shard directory; 'trainer tokenize' reads JSONL`);
  }
  for (const path of resolved.files) {
    let lines: string[] = [];
    const flush = async () => {
      if (lines.length > 0) await out.stdout(lines.join("\n") + "\n");
      lines = [];
    };
    for await (const line of readJsonlLines(path)) {
      if (line.text.trim() === "") {
        // Keep output lines aligned with input lines.
        lines.push(json ? "null" : "");
      } else if (sft) {
        const conv = parseSftRecord(line.text, { file: path, line: line.number });
        const text = renderConversation(tok, conv.messages, conv.tools);
        const { ids, mask } = maskRendered(tok, text);
        if (json) lines.push(JSON.stringify({ ids, mask, text }));
        else {
          const trained = mask.reduce((a, b) => a + b, 0);
          lines.push(
            `${trained}/${ids.length} trained: ${maskView(tok, ids, mask, out.stdoutIsTerminal)}`,
          );
        }
      } else {
        const text = parsePretrainRecord(line.text, { file: path, line: line.number });
        const ids = tok.encode(text);
        if (json) {
          lines.push(JSON.stringify({ ids, tokens: ids.map((id) => tok.idToToken(id) ?? "") }));
        } else lines.push(`${ids.length} tokens: ${piecesView(tok, ids)}`);
      }
      if (lines.length >= 256) await flush();
    }
    await flush();
  }
  return 0;
}

/** `trainer tokenize`. */
export const tokenizeCommand: CommandSpec = {
  name: "tokenize",
  summary: "Show the token ids of a text, or of each record of a JSONL file",
  usage: "[options] (TEXT | --data FILE)",
  description: `
Prints the ids and tokens of TEXT (no special tokens added; special-token strings
such as <|im_start|> in the text become their ids). With --data FILE, prints one
line per input line, in order: pretrain records ({"text": ...}) as their tokens,
and with --sft conversations ({"conversations": [...]}) rendered with the chat
template, as ids with the loss mask: the trained (assistant) spans are shown in
[brackets], or in green on a terminal. Conversations may hold MiniMind's tool
and reasoning records (tools on the system message, tool_calls and
reasoning_content on assistant turns, tool turns): an assistant's tool calls are
trained, tool results are not.`,
  options: {
    tokenizer: {
      type: "string",
      valueName: "DIR",
      help:
        "tokenizer directory (tokenizer.json + tokenizer_config.json); default: the built-in one",
    },
    json: {
      type: "boolean",
      help:
        'print JSON: {"ids", "tokens"}, or {"ids", "mask", "text"} with --sft (text: the rendered conversation); one object per line',
    },
    data: { type: "string", valueName: "FILE", help: "a JSONL file to tokenize line by line" },
    sft: { type: "boolean", help: "with --data: records are conversations; show the loss mask" },
  },
  positionals: true,
  run: (args) => runTokenize(args, processOutput()),
};

function formatCount(n: number): string {
  return n.toLocaleString("en-US");
}

/** `1 document`, `2 documents`. */
function plural(n: number, word: string): string {
  return `${formatCount(n)} ${word}${n === 1 ? "" : "s"}`;
}

function progressLine(p: PrepareProgress): string {
  const mb = p.bytes / 1e6;
  const rate = p.seconds > 0 ? mb / p.seconds : 0;
  return `${plural(p.documents, "document")}, ${plural(p.tokens, "token")}, ` +
    `${mb.toFixed(1)} MB read (${rate.toFixed(2)} MB/s)` +
    (p.skippedLines > 0 || p.done ? `, ${plural(p.skippedLines, "bad line")} skipped` : "") +
    (p.skippedConversations > 0
      ? `, ${plural(p.skippedConversations, "conversation")} without a trained token skipped`
      : "");
}

/** `trainer data prepare`, writing to `out` (tests capture it). */
export async function runDataPrepare(args: ParsedArgs, out: CommandOutput): Promise<number> {
  const data = listOption(args, "data");
  const dir = stringOption(args, "out");
  if (data.length === 0) {
    throw new UsageError("--data is required (JSONL files, directories or globs)");
  }
  if (dir === undefined) throw new UsageError("--out DIR is required (where the shards go)");
  const sft = flagOption(args, "sft");
  const seqLenGiven = args.values["seq-len"] !== undefined;
  if (seqLenGiven && !sft) {
    throw new UsageError(
      "--seq-len applies to --sft (pretrain shards are cut into windows at training time, for any seq_len)",
    );
  }
  const seqLen = seqLenGiven
    ? numberOption(args, "seq-len", 0, { integer: true, min: 1 })
    : undefined;
  const shardTokens = numberOption(args, "shard-tokens", DEFAULT_SHARD_TOKENS, {
    integer: true,
    min: 1,
  });
  const workers = numberOption(args, "workers", 1, { integer: true, min: 1, max: 256 });
  const resolved = await resolveDataPaths(data);
  if (resolved.format !== "jsonl") {
    throw new UserError(`${resolved.dirs[0]} already holds token shards; --data takes JSONL here`);
  }
  const tok = await loadTokenizer(args);
  let lastLog = 0;
  const summary = await prepareShards({
    tokenizer: tok,
    files: resolved.files,
    out: dir,
    kind: sft ? "sft" : "pretrain",
    seqLen,
    skipBadLines: flagOption(args, "skip-bad-lines"),
    shardTokens,
    workers,
    onProgress: (p) => {
      if (p.done) {
        if (out.stderrIsTerminal) void out.stderr("\r\x1b[K");
        return;
      }
      // A terminal gets one line redrawn each second; a log a line every 10 s.
      if (out.stderrIsTerminal) void out.stderr(`\r\x1b[Kpreparing: ${progressLine(p)}`);
      else if (p.seconds - lastLog >= 10) {
        lastLog = p.seconds;
        void out.stderr(`preparing: ${progressLine(p)}\n`);
      }
    },
  });
  await out.stdout(
    `prepared ${sft ? "SFT" : "pretrain"} token shards in ${dir}: ` +
      `${plural(summary.shards, "shard")}, ${progressLine(summary)}, ${
        summary.seconds.toFixed(1)
      } s\n`,
  );
  return 0;
}

/** `trainer data prepare`. */
export const dataPrepareCommand: CommandSpec = {
  name: "data prepare",
  summary: "Tokenize JSONL once into binary token shards that training streams at disk speed",
  usage: "--data PATH... --out DIR [options]",
  description: `
Reads pretrain ({"text": ...}) or, with --sft, conversation records from JSONL
files, directories (their *.jsonl and *.jsonl.gz) or globs, tokenizes them once
and writes shard_NNNNN.bin files plus manifest.json to --out (a new or empty
directory). Pass the directory to --data of a training run in place of the JSONL.
The format is described in docs/formats.md.`,
  options: {
    tokenizer: {
      type: "string",
      valueName: "DIR",
      help: "tokenizer directory; default: the built-in one",
    },
    data: {
      type: "string",
      multiple: true,
      valueName: "PATH",
      help: "JSONL files, directories or globs (.jsonl, .jsonl.gz)",
    },
    out: { type: "string", valueName: "DIR", help: "output directory (new or empty)" },
    sft: {
      type: "boolean",
      help: "records are conversations: store ids and the assistant loss mask",
    },
    "seq-len": {
      type: "string",
      valueName: "N",
      help:
        "with --sft: cut each conversation to N + 1 tokens (one training row); default: keep all",
    },
    "skip-bad-lines": {
      type: "boolean",
      help: "count and skip lines that are not valid records instead of stopping",
    },
    "shard-tokens": {
      type: "string",
      valueName: "N",
      help: `tokens per shard file (default ${DEFAULT_SHARD_TOKENS.toLocaleString("en-US")})`,
    },
    workers: {
      type: "string",
      valueName: "N",
      help: `tokenize on N threads (this machine has ${navigator.hardwareConcurrency} cores); ` +
        "default 1; the shards are the same for any N",
    },
  },
  config: true,
  run: (args) => runDataPrepare(args, processOutput()),
};
