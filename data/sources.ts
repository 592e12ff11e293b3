/**
 * Where training text comes from: `--data` paths (files, directories, globs)
 * expanded to a list of JSONL shards or token-shard directories, each JSONL file
 * read as a stream of lines (`.jsonl.gz` through `DecompressionStream`), and each
 * line parsed and checked against MiniMind's record formats:
 *
 * - pretrain: `{"text": "..."}`
 * - SFT: `{"conversations": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}]}`,
 *   messages optionally with `reasoning_content`, `tool_calls` and (system) `tools`
 *
 * Other fields are ignored. Every error names the file and line and says what
 * was expected there.
 */
import { UserError } from "../util/errors.ts";
import { type Line, LineSplitStream } from "./lines.ts";
import type { SftConversation, SftMessage } from "./sft.ts";
import type { JsonValue } from "./tokenizer.ts";

/** What a run trains on: plain documents or conversations with assistant-only loss. */
export type DataKind = "pretrain" | "sft";

/**
 * What a training stream yields: pretrain windows, SFT rows, or DPO pairs
 * (JSONL only: a batch of B pairs is 2B rows, the chosen answers then the
 * rejected ones).
 */
export type StreamKind = DataKind | "dpo";

/** The `--data` paths, resolved. */
export type ResolvedData =
  | { format: "jsonl"; files: string[] }
  | { format: "shards"; dirs: string[] };

/** The file a token-shard directory is recognised by. */
export const SHARD_MANIFEST = "manifest.json";

/**
 * Expands `--data` paths: a file is itself; a directory is its `*.jsonl` and
 * `*.jsonl.gz` files (not recursive, sorted by name, hidden files left out), or a token-shard directory
 * when it holds `manifest.json`; a pattern with `*`, `?` or `**` is globbed.
 * Files keep the order the paths were given in; duplicates are dropped.
 * JSONL and token shards cannot be mixed in one run.
 */
export async function resolveDataPaths(paths: string[]): Promise<ResolvedData> {
  if (paths.length === 0) {
    throw new UserError(
      "no training data given: pass --data with JSONL files, a directory or a glob",
    );
  }
  const files: string[] = [];
  const dirs: string[] = [];
  for (const p of paths) {
    if (hasGlob(p)) {
      const matches = await glob(p);
      if (matches.length === 0) throw new UserError(`no files match the pattern ${p}`);
      files.push(...matches);
      continue;
    }
    let info: Deno.FileInfo;
    try {
      info = await Deno.stat(p);
    } catch (e) {
      if (e instanceof Deno.errors.NotFound) {
        throw new UserError(`${p}: no such file or directory (given as training data)`);
      }
      throw new UserError(`cannot read ${p}: ${(e as Error).message}`);
    }
    if (info.isDirectory) {
      if (await isFile(joinPath(p, SHARD_MANIFEST))) {
        dirs.push(p);
        continue;
      }
      const found: string[] = [];
      for await (const entry of Deno.readDir(p)) {
        if (entry.name.startsWith(".") || !/\.jsonl(\.gz)?$/.test(entry.name)) continue;
        const full = joinPath(p, entry.name);
        if (entry.isFile || (entry.isSymlink && await isFile(full))) found.push(full);
      }
      if (found.length === 0) {
        throw new UserError(
          `${p}: the directory holds no .jsonl or .jsonl.gz files and no token shards ` +
            `(${SHARD_MANIFEST} from 'trainer data prepare')`,
        );
      }
      files.push(...found.sort(compareNames));
    } else {
      files.push(p);
    }
  }
  if (files.length > 0 && dirs.length > 0) {
    throw new UserError(
      `cannot mix JSONL files (${files[0]}) and token-shard directories (${dirs[0]}) in one run: ` +
        `prepare the JSONL with 'trainer data prepare' too, or train on the JSONL alone`,
    );
  }
  if (dirs.length > 0) return { format: "shards", dirs: [...new Set(dirs)] };
  return { format: "jsonl", files: [...new Set(files)] };
}

/** Whether `p` holds a glob metacharacter (`*` or `?`). */
export function hasGlob(p: string): boolean {
  return /[*?]/.test(p);
}

/**
 * Files matching a glob pattern, sorted. `*` matches any run of characters within
 * one path segment, `?` one character, and a `**` segment any number of
 * directories (zero included). As in a shell, wildcards do not match a leading
 * `.` of a name, so hidden files and directories are left out.
 */
export async function glob(pattern: string): Promise<string[]> {
  const absolute = pattern.startsWith("/");
  const segments = pattern.split("/").filter((s) => s.length > 0 && s !== ".");
  let i = 0;
  const fixed: string[] = [];
  while (i < segments.length - 1 && !hasGlob(segments[i])) fixed.push(segments[i++]);
  const base = (absolute ? "/" : "") + fixed.join("/");
  const out = new Set<string>();
  await walkGlob(base, segments.slice(i), out);
  return [...out].sort(compareNames);
}

async function walkGlob(dir: string, rest: string[], out: Set<string>): Promise<void> {
  const [segment, ...tail] = rest;
  if (segment === "**") {
    // Zero directories, then one more level with `**` still in force.
    if (tail.length > 0) await walkGlob(dir, tail, out);
    for (const entry of await listDir(dir)) {
      if (entry.name.startsWith(".")) continue;
      const full = joinPath(dir, entry.name);
      if (await isDirEntryDir(entry, full)) await walkGlob(full, rest, out);
      else if (tail.length === 0) out.add(full);
    }
    return;
  }
  if (!hasGlob(segment)) {
    const full = joinPath(dir, segment);
    if (tail.length === 0) {
      if (await isFile(full)) out.add(full);
    } else await walkGlob(full, tail, out);
    return;
  }
  const re = segmentRegExp(segment);
  for (const entry of await listDir(dir)) {
    if (!re.test(entry.name)) continue;
    const full = joinPath(dir, entry.name);
    const isDir = await isDirEntryDir(entry, full);
    if (tail.length === 0) {
      if (!isDir) out.add(full);
    } else if (isDir) await walkGlob(full, tail, out);
  }
}

function segmentRegExp(segment: string): RegExp {
  let re = "";
  for (const ch of segment) {
    if (ch === "*") re += "[^/]*";
    else if (ch === "?") re += "[^/]";
    else re += ch.replace(/[.+^${}()|[\]\\]/g, "\\$&");
  }
  // Shell convention: a wildcard never matches a leading dot.
  return new RegExp(segment.startsWith(".") ? `^${re}$` : `^(?!\\.)${re}$`);
}

async function listDir(dir: string): Promise<Deno.DirEntry[]> {
  const entries: Deno.DirEntry[] = [];
  try {
    for await (const e of Deno.readDir(dir === "" ? "." : dir)) entries.push(e);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound || e instanceof Deno.errors.NotADirectory) return [];
    throw new UserError(`cannot list ${dir}: ${(e as Error).message}`);
  }
  return entries;
}

async function isDirEntryDir(entry: Deno.DirEntry, full: string): Promise<boolean> {
  if (entry.isDirectory) return true;
  if (!entry.isSymlink) return false;
  try {
    return (await Deno.stat(full)).isDirectory;
  } catch {
    return false;
  }
}

async function isFile(path: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isFile;
  } catch {
    return false;
  }
}

function joinPath(dir: string, name: string): string {
  if (dir === "") return name;
  return dir.endsWith("/") ? dir + name : `${dir}/${name}`;
}

function compareNames(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** Where `readJsonlLines` starts: a line boundary saved from an earlier `Line`. */
export interface LineStart {
  /** Byte offset in the (decompressed) file. */
  byte: number;
  /** Line number of the line that starts there. */
  line: number;
}

/** A failure of the byte source (the file or gzip), told apart from a UTF-8 error. */
class ByteSourceError extends Error {
  constructor(readonly inner: unknown) {
    super(inner instanceof Error ? inner.message : String(inner));
  }
}

/**
 * The lines of a `.jsonl` or `.jsonl.gz` file as a stream: file -> (gunzip) ->
 * `TextDecoderStream` (fatal: invalid UTF-8 is an error) -> `LineSplitStream`.
 * Memory stays at a few chunks however large the file. Starting mid-file seeks
 * (plain files) or skips decompressed bytes (gzip, which cannot seek).
 * Errors are `UserError`s naming the file (and line, for invalid UTF-8).
 */
export async function* readJsonlLines(
  path: string,
  start: LineStart = { byte: 0, line: 1 },
): AsyncGenerator<Line> {
  const gz = path.endsWith(".gz");
  const bytes = await openBytes(path, gz, start.byte);
  const lines = bytes
    .pipeThrough(new TextDecoderStream("utf-8", { fatal: true, ignoreBOM: true }))
    .pipeThrough(new LineSplitStream({ firstLine: start.line, firstByte: start.byte }));
  const reader = lines.getReader();
  let last = start.line - 1;
  try {
    while (true) {
      let r: ReadableStreamReadResult<Line>;
      try {
        r = await reader.read();
      } catch (e) {
        if (e instanceof ByteSourceError) {
          throw new UserError(
            gz
              ? `${path}: not a valid gzip file (${e.message}); after line ${last}`
              : `${path}: read failed after line ${last}: ${e.message}`,
          );
        }
        if (e instanceof TypeError) {
          const bad = await findInvalidUtf8Line(path, gz, start);
          throw new UserError(
            `${path}:${bad ?? last + 1}: invalid UTF-8; JSONL files must be UTF-8 text`,
          );
        }
        throw e;
      }
      if (r.done) return;
      last = r.value.number;
      yield r.value;
    }
  } finally {
    await reader.cancel().catch(() => {});
  }
}

async function openBytes(
  path: string,
  gz: boolean,
  startByte: number,
): Promise<ReadableStream<Uint8Array>> {
  let file: Deno.FsFile;
  try {
    file = await Deno.open(path, { read: true });
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new UserError(`${path}: no such file`);
    throw new UserError(`cannot open ${path}: ${(e as Error).message}`);
  }
  let raw: ReadableStream<Uint8Array> = file.readable;
  let skip = 0;
  if (gz) {
    raw = raw.pipeThrough<Uint8Array>(
      new DecompressionStream("gzip") as unknown as ReadableWritablePair<Uint8Array, Uint8Array>,
    );
    skip = startByte;
  } else if (startByte > 0) {
    await file.seek(startByte, Deno.SeekMode.Start);
  }
  const reader = raw.getReader();
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      while (true) {
        let r: ReadableStreamReadResult<Uint8Array>;
        try {
          r = await reader.read();
        } catch (e) {
          controller.error(new ByteSourceError(e));
          return;
        }
        if (r.done) {
          controller.close();
          return;
        }
        let chunk = r.value;
        if (skip > 0) {
          const n = Math.min(skip, chunk.length);
          skip -= n;
          chunk = chunk.subarray(n);
          if (chunk.length === 0) continue;
        }
        controller.enqueue(chunk);
        return;
      }
    },
    async cancel(reason) {
      await reader.cancel(reason).catch(() => {});
    },
  });
}

/** Re-reads the bytes to find the line number of the first invalid UTF-8 sequence. */
async function findInvalidUtf8Line(
  path: string,
  gz: boolean,
  start: LineStart,
): Promise<number | undefined> {
  const bytes = await openBytes(path, gz, start.byte);
  const decoder = new TextDecoder("utf-8", { fatal: true });
  let line = start.line;
  let pending: Uint8Array[] = [];
  const check = (parts: Uint8Array[]): boolean => {
    let n = 0;
    for (const p of parts) n += p.length;
    const all = new Uint8Array(n);
    let o = 0;
    for (const p of parts) {
      all.set(p, o);
      o += p.length;
    }
    try {
      decoder.decode(all);
      return true;
    } catch {
      return false;
    }
  };
  try {
    for await (const chunk of bytes) {
      let s = 0;
      let nl = chunk.indexOf(10);
      while (nl >= 0) {
        if (!check([...pending, chunk.subarray(s, nl)])) return line;
        pending = [];
        line++;
        s = nl + 1;
        nl = chunk.indexOf(10, s);
      }
      if (s < chunk.length) pending.push(chunk.slice(s));
    }
  } catch {
    return undefined;
  }
  return pending.length > 0 && !check(pending) ? line : undefined;
}

/** Where a record came from, for messages: `file:line`. */
export interface RecordWhere {
  /** The file's path. */
  file: string;
  /** 1-based line number. */
  line: number;
}

/**
 * Parses one JSONL line as a pretrain record and returns its text.
 * Throws `UserError` (naming `file:line`) when the line is not one.
 */
export function parsePretrainRecord(text: string, where: RecordWhere): string {
  const obj = parseObject(text, where, `{"text": "..."}`);
  const value = obj["text"];
  if (value === undefined) {
    throw recordError(where, `expected a "text" field (a string), as in {"text": "..."}`);
  }
  if (typeof value !== "string") {
    throw recordError(where, `"text" must be a string, got ${typeName(value)}`);
  }
  return value;
}

const SFT_ROLES = ["system", "user", "assistant", "tool"] as const;

/**
 * Parses one JSONL line as an SFT record: its messages, and the tool
 * definitions of its system message. Throws `UserError` (naming `file:line`)
 * when the line is not one.
 *
 * The record is MiniMind's (`dataset/lm_dataset.py`, `SFTDataset`): a message
 * has `role` (system, user, assistant, tool) and `content`, and may carry
 * `reasoning_content` (a string), `tool_calls` (a list, or a JSON string of
 * one) and, on a system message, `tools` (the same). JSON strings are parsed
 * here, as MiniMind's `create_chat_prompt` does, so the template sees lists.
 * Empty values (`null`, `""`) of `tools` and `tool_calls` count as absent, as
 * MiniMind's falsy tests do (its loader fills every absent field with `None`,
 * so files it wrote carry them); `reasoning_content` null is absent, `""` is
 * kept (its template tests `is string`). An assistant turn that only calls tools may have `content` null. Other
 * fields are ignored.
 */
export function parseSftRecord(text: string, where: RecordWhere): SftConversation {
  const example = `{"conversations": [{"role": "user", "content": "..."}, ` +
    `{"role": "assistant", "content": "..."}]}`;
  const obj = parseObject(text, where, example);
  return parseTurns(obj["conversations"], "conversations", where, example);
}

/** A list of turns named `field` (`conversations`, `chosen`, `rejected`), with its tools. */
function parseTurns(
  conv: unknown,
  field: string,
  where: RecordWhere,
  example: string,
): SftConversation {
  if (conv === undefined) {
    throw recordError(
      where,
      `expected a "${field}" field (a list of {"role", "content"} turns), as in ${example}`,
    );
  }
  if (!Array.isArray(conv)) {
    throw recordError(where, `"${field}" must be a list of turns, got ${typeName(conv)}`);
  }
  if (conv.length === 0) throw recordError(where, `"${field}" is an empty list`);
  const out: SftMessage[] = [];
  let tools: JsonValue[] | undefined;
  for (let i = 0; i < conv.length; i++) {
    const turn = conv[i];
    const at = `${field}[${i}]`;
    if (typeof turn !== "object" || turn === null || Array.isArray(turn)) {
      throw recordError(
        where,
        `${at} must be an object {"role", "content"}, got ${typeName(turn)}`,
      );
    }
    const t = turn as Record<string, JsonValue | undefined>;
    const role = t.role;
    if (!SFT_ROLES.includes(role as SftMessage["role"])) {
      throw recordError(
        where,
        `${at}.role must be "system", "user", "assistant" or "tool", got ${
          role === undefined ? "nothing" : JSON.stringify(role)
        }`,
      );
    }
    const message: SftMessage = { role: role as SftMessage["role"], content: "" };
    const toolCalls = jsonListField(t.tool_calls, `${at}.tool_calls`, where);
    if (toolCalls !== undefined) {
      toolCalls.forEach((call, k) => checkToolCall(call, `${at}.tool_calls[${k}]`, where));
      message.tool_calls = toolCalls;
    }
    const content = t.content;
    if (typeof content === "string") message.content = content;
    else if (!((content === null || content === undefined) && toolCalls !== undefined)) {
      throw recordError(
        where,
        `${at}.content must be a string${
          role === "assistant" ? " (or null when the turn has tool_calls)" : ""
        }, got ${content === undefined ? "nothing" : typeName(content)}`,
      );
    }
    const reasoning = t.reasoning_content;
    // "" is kept: MiniMind's template tests `reasoning_content is string`, and an empty
    // string stops it from splitting a <think> block out of the content.
    if (typeof reasoning === "string") message.reasoning_content = reasoning;
    else if (reasoning !== null && reasoning !== undefined) {
      throw recordError(
        where,
        `${at}.reasoning_content must be a string, got ${typeName(reasoning)}`,
      );
    }
    const given = t.tools;
    if (given !== undefined && given !== null && given !== "") {
      if (role !== "system") {
        throw recordError(
          where,
          `${at}.tools is on a ${JSON.stringify(role)} message; tool definitions belong on the ` +
            `system message (MiniMind reads them only there)`,
        );
      }
      // Later system messages win, as in MiniMind's create_chat_prompt.
      tools = jsonListField(given, `${at}.tools`, where);
    }
    out.push(message);
  }
  return tools === undefined ? { messages: out } : { messages: out, tools };
}

/** A preference pair: the same prompt answered well (`chosen`) and badly (`rejected`). */
export interface DpoRecord {
  /** The conversation ending in the preferred answer. */
  chosen: SftMessage[];
  /** The same conversation ending in the worse answer. */
  rejected: SftMessage[];
}

/**
 * Parses one JSONL line as a DPO record, MiniMind's `dpo.jsonl` format:
 * `{"chosen": [turns], "rejected": [turns]}`, each a conversation that ends
 * in the answer being judged (turns as in SFT records; tool definitions are
 * not taken here). Each side needs an assistant turn, and no assistant turn
 * may be empty (an empty answer has nothing to prefer). Throws `UserError`
 * (naming `file:line`) when the line is not one.
 */
export function parseDpoRecord(text: string, where: RecordWhere): DpoRecord {
  const example = `{"chosen": [{"role": "user", "content": "..."}, ` +
    `{"role": "assistant", "content": "..."}], "rejected": [{"role": "user", ...}, ` +
    `{"role": "assistant", ...}]}`;
  const obj = parseObject(text, where, example);
  const side = (field: "chosen" | "rejected"): SftMessage[] => {
    const conv = parseTurns(obj[field], field, where, example);
    if (conv.tools !== undefined) {
      throw recordError(where, `"${field}" carries tools: DPO records take no tool definitions`);
    }
    const turns = conv.messages;
    if (!turns.some((t) => t.role === "assistant")) {
      throw recordError(where, `"${field}" has no assistant turn: nothing to prefer`);
    }
    turns.forEach((t, i) => {
      if (t.role === "assistant" && t.content.trim() === "" && t.tool_calls === undefined) {
        throw recordError(where, `${field}[${i}] is an empty assistant turn`);
      }
    });
    return turns;
  };
  return { chosen: side("chosen"), rejected: side("rejected") };
}

/** A field that holds a list, or a JSON string of one; undefined when empty (null or ""). */
function jsonListField(
  value: JsonValue | undefined,
  name: string,
  where: RecordWhere,
): JsonValue[] | undefined {
  if (value === undefined || value === null || value === "") return undefined;
  let v: JsonValue = value;
  if (typeof v === "string") {
    try {
      v = JSON.parse(v) as JsonValue;
    } catch (e) {
      throw recordError(where, `${name} is a string but not valid JSON (${(e as Error).message})`);
    }
  }
  if (!Array.isArray(v)) {
    throw recordError(
      where,
      `${name} must be a list (or a JSON string of one), got ${typeName(v)}`,
    );
  }
  return v;
}

/** A tool call is `{"name", "arguments"}` or OpenAI's `{"type": "function", "function": {...}}`. */
function checkToolCall(call: JsonValue, name: string, where: RecordWhere): void {
  const inner = typeof call === "object" && call !== null && !Array.isArray(call) &&
      typeof call.function === "object" && call.function !== null && !Array.isArray(call.function)
    ? call.function
    : call;
  if (
    typeof inner !== "object" || inner === null || Array.isArray(inner) ||
    typeof inner.name !== "string"
  ) {
    throw recordError(
      where,
      `${name} must be an object with a "name" (and "arguments"), got ${typeName(call)}`,
    );
  }
}

function parseObject(text: string, where: RecordWhere, example: string): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw recordError(
      where,
      `not valid JSON (${(e as Error).message}); each line must be one JSON object like ${example}`,
    );
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw recordError(where, `expected a JSON object like ${example}, got ${typeName(value)}`);
  }
  return value as Record<string, unknown>;
}

function recordError(where: RecordWhere, what: string): UserError {
  return new UserError(`${where.file}:${where.line}: ${what}`);
}

function typeName(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "a list";
  if (typeof v === "object") return "an object";
  if (typeof v === "string") return "a string";
  return `a ${typeof v}`;
}

/** Counts of what a reader left out, reported at the end of a run. */
export interface ReadCounters {
  /** Lines that were not valid records (only with `skipBadLines`). */
  skippedLines: number;
  /** Records read. */
  records: number;
}

/** One parsed record and where it starts. */
export type ParsedRecord =
  & { line: Line; file: string }
  & ({ kind: "pretrain"; text: string } | ({ kind: "sft" } & SftConversation));

/**
 * The records of one JSONL file, in order, from `start`. Blank lines are passed
 * over. A bad line throws, or with `skipBadLines` is counted in
 * `counters.skippedLines` and passed over.
 */
export async function* readRecords(
  file: string,
  kind: DataKind,
  opts: { skipBadLines?: boolean; counters?: ReadCounters; start?: LineStart } = {},
): AsyncGenerator<ParsedRecord> {
  const counters = opts.counters ?? { skippedLines: 0, records: 0 };
  for await (const line of readJsonlLines(file, opts.start)) {
    if (line.text.trim() === "") continue;
    const where = { file, line: line.number };
    let rec: ParsedRecord;
    try {
      rec = kind === "pretrain"
        ? { kind, line, file, text: parsePretrainRecord(line.text, where) }
        : { kind, line, file, ...parseSftRecord(line.text, where) };
    } catch (e) {
      if (opts.skipBadLines && e instanceof UserError) {
        counters.skippedLines++;
        continue;
      }
      throw e;
    }
    counters.records++;
    yield rec;
  }
}
