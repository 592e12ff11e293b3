/** `trainer tokenize` and `trainer data prepare`, run through their CommandSpecs with captured output. */
import { assert, assertEquals, assertRejects, assertStringIncludes } from "./assert.ts";
import {
  type CommandOutput,
  dataPrepareCommand,
  runDataPrepare,
  runTokenize,
  tokenizeCommand,
} from "../cli/data.ts";
import { parseCommandArgs } from "../cli/args.ts";
import type { CommandSpec } from "../cli/args.ts";
import { TextTokenizer } from "../data/tokenizer.ts";
import { assistantMask } from "../data/sft.ts";
import { readShardManifest } from "../data/shards.ts";
import { DataStream } from "../data/stream.ts";
import { UsageError, UserError } from "../util/errors.ts";

const FIXTURE = "../shared/fixtures/minimind-tokenizer";
const tok = await TextTokenizer.load(FIXTURE);

function capture(terminal = false): CommandOutput & { out: string; err: string } {
  const c = {
    out: "",
    err: "",
    stdoutIsTerminal: terminal,
    stderrIsTerminal: terminal,
    stdout: (t: string) => {
      c.out += t;
      return Promise.resolve();
    },
    stderr: (t: string) => {
      c.err += t;
      return Promise.resolve();
    },
  };
  return c;
}

type Runner = (args: Parameters<typeof runTokenize>[0], out: CommandOutput) => Promise<number>;

async function run(
  spec: CommandSpec,
  runner: Runner,
  argv: string[],
  terminal = false,
): Promise<{ out: string; err: string; code: number }> {
  const args = await parseCommandArgs(spec, argv);
  assert(args, "not --help");
  const c = capture(terminal);
  const code = await runner(args, c);
  return { out: c.out, err: c.err, code };
}

const tokenize = (argv: string[], terminal = false) =>
  run(tokenizeCommand, runTokenize, argv, terminal);
const prepare = (argv: string[]) => run(dataPrepareCommand, runDataPrepare, argv);

const dir = await Deno.makeTempDir({ prefix: "data_commands_test_" });
addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));
const conv = [
  { role: "system" as const, content: "你是助手" },
  { role: "user" as const, content: "1+1等于几？" },
  { role: "assistant" as const, content: "等于2。" },
];
await Deno.writeTextFile(
  `${dir}/p.jsonl`,
  '{"text": "你好，世界！Hello world."}\n\n{"text": "第二行"}\n',
);
await Deno.writeTextFile(`${dir}/s.jsonl`, JSON.stringify({ conversations: conv }) + "\n");

Deno.test("tokenize TEXT --json: ids and tokens, no special tokens added (fixture README ids)", async () => {
  const r = await tokenize(["--tokenizer", FIXTURE, "--json", "你好，世界！Hello world."]);
  assertEquals(r.code, 0);
  assertEquals(JSON.parse(r.out), {
    ids: [1968, 294, 1950, 1364, 1602, 1707, 49],
    tokens: ["ä½łå¥½", "ï¼Į", "ä¸ĸçķĮ", "ï¼ģ", "Hello", "Ġworld", "."],
  });
});

Deno.test("tokenize TEXT: a readable listing of index, id, token and text", async () => {
  const r = await tokenize(["--tokenizer", FIXTURE, "Hello", "world."]);
  const lines = r.out.trimEnd().split("\n");
  assertEquals(lines[0], "3 tokens (no special tokens added)");
  assertEquals(lines.slice(2).map((l) => l.trim().split(/\s+/)), [
    ["0", "1602", "Hello", '"Hello"'],
    ["1", "1707", "Ġworld", '"', 'world"'],
    ["2", "49", ".", '"."'],
  ]);
  // Special-token strings in the text map to their ids.
  const s = await tokenize(["--tokenizer", FIXTURE, "--json", "<|im_start|>user"]);
  assertEquals(JSON.parse(s.out).ids[0], 1);
});

Deno.test("tokenize --data FILE: one output line per input line, blank lines kept", async () => {
  const j = await tokenize(["--tokenizer", FIXTURE, "--json", "--data", `${dir}/p.jsonl`]);
  const lines = j.out.trimEnd().split("\n");
  assertEquals(lines.length, 3);
  assertEquals(JSON.parse(lines[0]).ids, [1968, 294, 1950, 1364, 1602, 1707, 49]);
  assertEquals(lines[1], "null");
  assertEquals(JSON.parse(lines[2]).ids, tok.encode("第二行"));
  const r = await tokenize(["--tokenizer", FIXTURE, "--data", `${dir}/p.jsonl`]);
  assertEquals(r.out.split("\n").slice(0, 3), [
    "7 tokens: 你好|，|世界|！|Hello| world|.",
    "",
    `${tok.encode("第二行").length} tokens: ${
      tok.encode("第二行").map((id) => tok.decode([id])).join("|")
    }`,
  ]);
});

Deno.test("tokenize --data FILE --sft: ids and mask, and a view that marks the trained spans", async () => {
  const want = assistantMask(tok, conv);
  const j = await tokenize(["--tokenizer", FIXTURE, "--json", "--sft", "--data", `${dir}/s.jsonl`]);
  assertEquals(JSON.parse(j.out), { ...want, text: tok.applyChatTemplate(conv) });
  const r = await tokenize(["--tokenizer", FIXTURE, "--sft", "--data", `${dir}/s.jsonl`]);
  const trained = want.mask.reduce((a, b) => a + b, 0);
  assertEquals(
    r.out,
    `${trained}/${want.ids.length} trained: <|im_start|>system\\n你是助手<|im_end|>\\n` +
      "<|im_start|>user\\n1+1等于几？<|im_end|>\\n<|im_start|>assistant\\n" +
      "[<think>\\n\\n</think>\\n\\n等于2。<|im_end|>\\n]\n",
  );
  const t = await tokenize(["--tokenizer", FIXTURE, "--sft", "--data", `${dir}/s.jsonl`], true);
  assertStringIncludes(t.out, "\x1b[32m<think>\\n\\n</think>\\n\\n等于2。<|im_end|>\\n\x1b[0m");
});

Deno.test("tokenize --sft --json: MiniMind's tool and reasoning records, with their masks", async () => {
  const records = "tests/fixtures/sft/minimind_records.jsonl";
  const expected = JSON.parse(
    await Deno.readTextFile("tests/fixtures/sft/minimind_expected.json"),
  ) as { text: string; rows: { ids: number[]; labels: number[] }[] }[];
  const j = await tokenize(["--tokenizer", FIXTURE, "--json", "--sft", "--data", records]);
  const lines = j.out.trimEnd().split("\n").map((l) => JSON.parse(l));
  assertEquals(lines.length, expected.length);
  for (const [i, line] of lines.entries()) {
    // The full rows (max_length 4096) of scripts/make_sft_fixtures.py, without their padding.
    const full = expected[i].rows[0];
    const n = line.ids.length;
    assertEquals(line.text, expected[i].text);
    assertEquals(line.ids, full.ids.slice(0, n));
    assertEquals(line.mask, full.labels.slice(0, n).map((l: number) => (l === -100 ? 0 : 1)));
    assert(full.ids.slice(n).every((id) => id === tok.padId), "only padding after the ids");
  }
  // The readable view brackets the tool call (trained), not the tool result.
  const r = await tokenize(["--tokenizer", FIXTURE, "--sft", "--data", records]);
  const third = r.out.split("\n")[2];
  assertStringIncludes(
    third,
    '[<think>\\n\\n</think>\\n\\n<tool_call>\\n{"name": "calculate_math"',
  );
  assertStringIncludes(
    third,
    '<|im_start|>user\\n<tool_response>\\n{"result":"9472"}\\n</tool_response><|im_end|>\\n<|im_start|>assistant\\n[',
  );
  // A malformed record stops with file:line.
  await Deno.writeTextFile(
    `${dir}/bad_tool.jsonl`,
    '{"conversations": [{"role": "assistant", "content": "", "tool_calls": "[{"}]}\n',
  );
  await assertRejects(
    () => tokenize(["--tokenizer", FIXTURE, "--sft", "--data", `${dir}/bad_tool.jsonl`]),
    UserError,
    `${dir}/bad_tool.jsonl:1: conversations[0].tool_calls is a string but not valid JSON`,
  );
});

Deno.test("tokenize: the built-in tokenizer when --tokenizer is not given", async () => {
  const r = await tokenize(["--json", "hello world"]);
  const { ids, tokens } = JSON.parse(r.out);
  assert(ids.length > 0 && ids.length === tokens.length);
});

Deno.test("tokenize: usage errors", async () => {
  await assertRejects(() => tokenize([]), UsageError, "give a TEXT to tokenize, or --data FILE");
  await assertRejects(
    () => tokenize(["x", "--data", `${dir}/p.jsonl`]),
    UsageError,
    "either a TEXT or --data FILE",
  );
  await assertRejects(() => tokenize(["--sft", "x"]), UsageError, "--sft applies to --data");
  await assertRejects(
    () => tokenize(["--tokenizer", FIXTURE, "--sft", "--data", `${dir}/p.jsonl`]),
    UserError,
    `${dir}/p.jsonl:1: expected a "conversations" field`,
  );
});

Deno.test("data prepare: shards + manifest, a summary on stdout, and training reads the directory", async () => {
  const out = `${dir}/shards`;
  const r = await prepare([
    "--tokenizer",
    FIXTURE,
    "--data",
    `${dir}/p.jsonl`,
    `${dir}/p.jsonl`,
    "--out",
    out,
  ]);
  assertEquals(r.code, 0);
  assertStringIncludes(r.out, `prepared pretrain token shards in ${out}: 1 shard, 2 documents, `);
  assertStringIncludes(r.out, ", 0 bad lines skipped, ");
  const m = await readShardManifest(out);
  assertEquals([m.documents, m.sources], [2, [`${dir}/p.jsonl`]]);
  const s = await DataStream.open({
    data: [out],
    kind: "pretrain",
    batchSize: 1,
    seqLen: 4,
    maxEpochs: 1,
  });
  assertEquals(Array.from((await s.next())!.ids), [1, 1968, 294, 1950]);

  const sftOut = `${dir}/sft_shards`;
  const q = await prepare([
    "--tokenizer",
    FIXTURE,
    "--sft",
    "--seq-len",
    "64",
    "--data",
    `${dir}/s.jsonl`,
    "--out",
    sftOut,
  ]);
  assertStringIncludes(q.out, "prepared SFT token shards");
  assertEquals((await readShardManifest(sftOut)).seqLen, 64);
});

Deno.test("data prepare: usage errors", async () => {
  await assertRejects(() => prepare(["--out", `${dir}/x`]), UsageError, "--data is required");
  await assertRejects(
    () => prepare(["--data", `${dir}/p.jsonl`]),
    UsageError,
    "--out DIR is required",
  );
  await assertRejects(
    () => prepare(["--data", `${dir}/p.jsonl`, "--out", `${dir}/y`, "--seq-len", "8"]),
    UsageError,
    "--seq-len applies to --sft",
  );
  await assertRejects(
    () => prepare(["--data", `${dir}/p.jsonl`, "--out", `${dir}/y`, "--shard-tokens", "many"]),
    UsageError,
    "--shard-tokens expects a number",
  );
  await assertRejects(
    () => prepare(["--data", `${dir}/missing.jsonl`, "--out", `${dir}/y`]),
    UserError,
    `${dir}/missing.jsonl: no such file or directory`,
  );
});
