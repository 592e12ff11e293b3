/**
 * Readers: the line splitter, path expansion (files, directories, globs),
 * `.jsonl.gz`, record parsing, and every bad input with its message.
 */
import { assert, assertEquals, assertRejects, assertStringIncludes } from "./assert.ts";
import { LineSplitStream, utf8Length } from "../data/lines.ts";
import {
  glob,
  parsePretrainRecord,
  parseSftRecord,
  type ReadCounters,
  readJsonlLines,
  readRecords,
  resolveDataPaths,
} from "../data/sources.ts";
import { UserError } from "../util/errors.ts";

async function tempDir(): Promise<string> {
  return await Deno.makeTempDir({ prefix: "data_sources_test_" });
}

async function gzip(bytes: Uint8Array): Promise<Uint8Array> {
  const stream = ReadableStream.from([bytes]).pipeThrough(
    new CompressionStream("gzip") as unknown as ReadableWritablePair<Uint8Array, Uint8Array>,
  );
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

async function collect<T>(it: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const x of it) out.push(x);
  return out;
}

async function splitChunks(chunks: string[], opts = {}) {
  return await collect(ReadableStream.from(chunks).pipeThrough(new LineSplitStream(opts)));
}

Deno.test("LineSplitStream: lines across chunk boundaries, CRLF, blank lines, no final newline", async () => {
  const lines = await splitChunks(["ab", "c\r", "\nd\n", "\n", "e\r\nf"]);
  assertEquals(lines.map((l) => l.text), ["abc", "d", "", "e", "f"]);
  assertEquals(lines.map((l) => l.number), [1, 2, 3, 4, 5]);
  // Byte offsets: "abc\r\n" is 5 bytes, "d\n" 2, "\n" 1, "e\r\n" 3.
  assertEquals(lines.map((l) => l.byteOffset), [0, 5, 7, 8, 11]);
  assertEquals(lines[4].nextByteOffset, 12);
});

Deno.test("LineSplitStream: BOM stripped at file start only; byte offsets count UTF-8", async () => {
  const lines = await splitChunks(["\uFEFF你好\n", "😀x\n", "\uFEFFz"]);
  assertEquals(lines.map((l) => l.text), ["你好", "😀x", "\uFEFFz"]);
  // BOM 3 + 你好 6 + \n 1 = 10; 😀 4 + x 1 + \n 1 = 6.
  assertEquals(lines.map((l) => l.byteOffset), [0, 10, 16]);
  const mid = await splitChunks(["\uFEFFq\n"], { firstByte: 7, firstLine: 4 });
  assertEquals(mid[0].text, "\uFEFFq", "not at offset 0: a U+FEFF is content, not a BOM");
  assertEquals(mid[0].number, 4);
  assertEquals(mid[0].nextByteOffset, 7 + 5);
});

Deno.test("utf8Length agrees with TextEncoder", () => {
  for (const s of ["", "abc", "é", "你好", "😀", "a😀b你\u0000\u07ff\u0800\uffff"]) {
    assertEquals(utf8Length(s), new TextEncoder().encode(s).length, s);
  }
});

Deno.test("readJsonlLines: BOM + CRLF + blank lines, and resuming at a saved byte offset", async () => {
  const dir = await tempDir();
  const path = `${dir}/a.jsonl`;
  await Deno.writeTextFile(path, '\uFEFF{"text":"一"}\r\n\r\n{"text":"two"}\r\n{"text":"3"}');
  const lines = await collect(readJsonlLines(path));
  assertEquals(lines.map((l) => l.text), ['{"text":"一"}', "", '{"text":"two"}', '{"text":"3"}']);
  const third = lines[2];
  const rest = await collect(readJsonlLines(path, { byte: third.byteOffset, line: third.number }));
  assertEquals(rest.map((l) => [l.text, l.number]), [['{"text":"two"}', 3], ['{"text":"3"}', 4]]);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("readJsonlLines: .jsonl.gz through DecompressionStream, resumable too", async () => {
  const dir = await tempDir();
  const text = Array.from({ length: 2000 }, (_, i) => JSON.stringify({ text: `第${i}行` })).join(
    "\n",
  );
  await Deno.writeFile(`${dir}/a.jsonl.gz`, await gzip(new TextEncoder().encode(text)));
  const lines = await collect(readJsonlLines(`${dir}/a.jsonl.gz`));
  assertEquals(lines.length, 2000);
  assertEquals(JSON.parse(lines[1234].text).text, "第1234行");
  const l = lines[1500];
  const rest = await collect(
    readJsonlLines(`${dir}/a.jsonl.gz`, { byte: l.byteOffset, line: l.number }),
  );
  assertEquals(rest.length, 500);
  assertEquals(rest[0].text, l.text);
  assertEquals(rest[0].number, 1501);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("readJsonlLines: a damaged .gz is a UserError naming the file", async () => {
  const dir = await tempDir();
  const gz = await gzip(new TextEncoder().encode('{"text":"a"}\n'.repeat(100)));
  await Deno.writeFile(`${dir}/bad.jsonl.gz`, gz.subarray(0, gz.length - 12));
  await assertRejects(
    () => collect(readJsonlLines(`${dir}/bad.jsonl.gz`)),
    UserError,
    `${dir}/bad.jsonl.gz: not a valid gzip file`,
  );
  await Deno.writeTextFile(`${dir}/plain.jsonl.gz`, '{"text":"not compressed"}\n');
  await assertRejects(
    () => collect(readJsonlLines(`${dir}/plain.jsonl.gz`)),
    UserError,
    "not a valid gzip file",
  );
  await Deno.remove(dir, { recursive: true });
});

Deno.test("readJsonlLines: invalid UTF-8 names the file and the line", async () => {
  const dir = await tempDir();
  const good = new TextEncoder().encode('{"text":"ok"}\n'.repeat(3000));
  const bad = new TextEncoder().encode('{"text":"bad \xff"}\n');
  // Replace the U+00FF (2 bytes in UTF-8) with a lone 0xff byte.
  const badBytes = Array.from(bad);
  const i = badBytes.indexOf(0xc3);
  badBytes.splice(i, 2, 0xff);
  const bytes = new Uint8Array([...good, ...badBytes, ...good]);
  await Deno.writeFile(`${dir}/u.jsonl`, bytes);
  await assertRejects(
    () => collect(readJsonlLines(`${dir}/u.jsonl`)),
    UserError,
    `${dir}/u.jsonl:3001: invalid UTF-8`,
  );
  await Deno.writeFile(`${dir}/u.jsonl.gz`, await gzip(bytes));
  await assertRejects(
    () => collect(readJsonlLines(`${dir}/u.jsonl.gz`)),
    UserError,
    `${dir}/u.jsonl.gz:3001: invalid UTF-8`,
  );
  await Deno.remove(dir, { recursive: true });
});

Deno.test("parsePretrainRecord / parseSftRecord: each bad record names file:line and what was expected", () => {
  const where = { file: "d.jsonl", line: 7 };
  assertEquals(parsePretrainRecord('{"text": "hi", "id": 3}', where), "hi");
  const cases: [() => unknown, string][] = [
    [() => parsePretrainRecord('{"text": "cut', where), "d.jsonl:7: not valid JSON"],
    [() => parsePretrainRecord('{"txt": "a"}', where), 'd.jsonl:7: expected a "text" field'],
    [
      () => parsePretrainRecord('{"text": 5}', where),
      'd.jsonl:7: "text" must be a string, got a number',
    ],
    [() => parsePretrainRecord('["text"]', where), "d.jsonl:7: expected a JSON object"],
    [() => parseSftRecord('{"text": "a"}', where), 'd.jsonl:7: expected a "conversations" field'],
    [() => parseSftRecord('{"conversations": {}}', where), '"conversations" must be a list'],
    [() => parseSftRecord('{"conversations": []}', where), '"conversations" is an empty list'],
    [
      () => parseSftRecord('{"conversations": [{"role": "robot", "content": "x"}]}', where),
      'd.jsonl:7: conversations[0].role must be "system", "user", "assistant" or "tool", got "robot"',
    ],
    [
      () =>
        parseSftRecord(
          '{"conversations": [{"role": "user", "content": "a"}, {"role": "assistant"}]}',
          where,
        ),
      "d.jsonl:7: conversations[1].content must be a string (or null when the turn has tool_calls), got nothing",
    ],
    [
      () => parseSftRecord('{"conversations": [{"role": "user", "content": 1}]}', where),
      "conversations[0].content must be a string, got a number",
    ],
    [
      () => parseSftRecord('{"conversations": ["hi"]}', where),
      "conversations[0] must be an object",
    ],
  ];
  for (const [fn, msg] of cases) {
    let err: unknown;
    try {
      fn();
    } catch (e) {
      err = e;
    }
    assert(err instanceof UserError, `expected a UserError for ${msg}`);
    assertStringIncludes(err.message, msg);
  }
  assertEquals(
    parseSftRecord(
      '{"conversations": [{"role": "system", "content": "s", "x": 1}, {"role": "user", "content": "u"}]}',
      where,
    ),
    { messages: [{ role: "system", content: "s" }, { role: "user", content: "u" }] },
  );
});

Deno.test("readRecords: errors stop with file:line; skipBadLines counts and skips", async () => {
  const dir = await tempDir();
  const path = `${dir}/mixed.jsonl`;
  await Deno.writeTextFile(
    path,
    ['{"text":"a"}', '{"text":"b"', "", '{"text":7}', '{"text":"c"}', '{"other":1}'].join("\n") +
      "\n",
  );
  await assertRejects(
    () => collect(readRecords(path, "pretrain")),
    UserError,
    `${path}:2: not valid JSON`,
  );
  const counters: ReadCounters = { skippedLines: 0, records: 0 };
  const recs = await collect(readRecords(path, "pretrain", { skipBadLines: true, counters }));
  assertEquals(recs.map((r) => r.kind === "pretrain" ? r.text : ""), ["a", "c"]);
  assertEquals(recs.map((r) => r.line.number), [1, 5]);
  assertEquals(counters, { skippedLines: 3, records: 2 });
  await Deno.remove(dir, { recursive: true });
});

Deno.test("resolveDataPaths: files, sorted directory listing, globs, and their errors", async () => {
  const dir = await tempDir();
  await Deno.mkdir(`${dir}/sub/deeper`, { recursive: true });
  await Deno.mkdir(`${dir}/empty`);
  for (
    const f of ["b.jsonl", "a.jsonl.gz", "c.txt", "sub/x.jsonl", "sub/deeper/y.jsonl", ".h.jsonl"]
  ) {
    await Deno.writeTextFile(`${dir}/${f}`, "");
  }
  assertEquals(await resolveDataPaths([`${dir}/b.jsonl`]), {
    format: "jsonl",
    files: [`${dir}/b.jsonl`],
  });
  assertEquals(await resolveDataPaths([dir]), {
    format: "jsonl",
    files: [`${dir}/a.jsonl.gz`, `${dir}/b.jsonl`],
  });
  // Order of the paths given is kept; duplicates are dropped.
  assertEquals(await resolveDataPaths([`${dir}/sub/x.jsonl`, dir, `${dir}/b.jsonl`]), {
    format: "jsonl",
    files: [`${dir}/sub/x.jsonl`, `${dir}/a.jsonl.gz`, `${dir}/b.jsonl`],
  });
  assertEquals(await glob(`${dir}/*.jsonl`), [`${dir}/b.jsonl`]);
  assertEquals(await glob(`${dir}/?.jsonl*`), [`${dir}/a.jsonl.gz`, `${dir}/b.jsonl`]);
  assertEquals(await glob(`${dir}/**/*.jsonl`), [
    `${dir}/b.jsonl`,
    `${dir}/sub/deeper/y.jsonl`,
    `${dir}/sub/x.jsonl`,
  ]);
  assertEquals(await glob(`${dir}/sub/**`), [`${dir}/sub/deeper/y.jsonl`, `${dir}/sub/x.jsonl`]);
  assertEquals(await glob(`${dir}/s*/x.jsonl`), [`${dir}/sub/x.jsonl`]);
  await assertRejects(
    () => resolveDataPaths([`${dir}/nope.jsonl`]),
    UserError,
    `${dir}/nope.jsonl: no such file or directory`,
  );
  await assertRejects(
    () => resolveDataPaths([`${dir}/empty`]),
    UserError,
    `${dir}/empty: the directory holds no .jsonl or .jsonl.gz files and no token shards`,
  );
  await assertRejects(() => resolveDataPaths([`${dir}/*.parquet`]), UserError, "no files match");
  await assertRejects(() => resolveDataPaths([]), UserError, "no training data given");
  await Deno.remove(dir, { recursive: true });
});

Deno.test("resolveDataPaths: a directory with manifest.json is a token-shard directory; no mixing", async () => {
  const dir = await tempDir();
  await Deno.mkdir(`${dir}/shards`);
  await Deno.writeTextFile(`${dir}/shards/manifest.json`, "{}");
  await Deno.writeTextFile(`${dir}/a.jsonl`, "");
  assertEquals(await resolveDataPaths([`${dir}/shards`]), {
    format: "shards",
    dirs: [`${dir}/shards`],
  });
  await assertRejects(
    () => resolveDataPaths([`${dir}/a.jsonl`, `${dir}/shards`]),
    UserError,
    "cannot mix JSONL files",
  );
  await Deno.remove(dir, { recursive: true });
});

Deno.test("parseSftRecord: MiniMind's tool and reasoning records, JSON strings parsed, nulls as absent", () => {
  const where = { file: "t.jsonl", line: 3 };
  const tools = [{ name: "f", parameters: { type: "object" } }];
  const line = JSON.stringify({
    conversations: [
      { role: "system", content: "# Tools", tools: JSON.stringify(tools), tool_calls: null },
      { role: "user", content: "go", reasoning_content: null, tools: null, tool_calls: null },
      { role: "assistant", content: "", tool_calls: '[{"name":"f","arguments":{"a":1}}]' },
      { role: "tool", content: '{"ok": true}' },
      {
        role: "assistant",
        content: null,
        tool_calls: [{ type: "function", function: { name: "f", arguments: "{}" } }],
      },
      { role: "assistant", content: "done", reasoning_content: "thought", tools: "" },
    ],
  });
  assertEquals(parseSftRecord(line, where), {
    messages: [
      { role: "system", content: "# Tools" },
      { role: "user", content: "go" },
      { role: "assistant", content: "", tool_calls: [{ name: "f", arguments: { a: 1 } }] },
      { role: "tool", content: '{"ok": true}' },
      {
        role: "assistant",
        content: "",
        tool_calls: [{ type: "function", function: { name: "f", arguments: "{}" } }],
      },
      { role: "assistant", content: "done", reasoning_content: "thought" },
    ],
    tools,
  });
  // An empty tools list still marks the conversation as a tool one (MiniMind tests the raw string).
  assertEquals(
    parseSftRecord(
      '{"conversations": [{"role": "system", "content": "s", "tools": "[]"}, {"role": "user", "content": "u"}]}',
      where,
    ).tools,
    [],
  );
});

Deno.test("parseSftRecord: malformed tool records name file:line and what is wrong", () => {
  const where = { file: "bad.jsonl", line: 12 };
  const conv = (...turns: unknown[]) => JSON.stringify({ conversations: turns });
  const cases: [string, string][] = [
    [
      conv({ role: "user", content: "q" }, { role: "assistant", content: "", tool_calls: "[{bad" }),
      "bad.jsonl:12: conversations[1].tool_calls is a string but not valid JSON",
    ],
    [
      conv({ role: "assistant", content: "", tool_calls: '{"name": "f"}' }),
      "bad.jsonl:12: conversations[0].tool_calls must be a list (or a JSON string of one), got an object",
    ],
    [
      conv({ role: "assistant", content: "", tool_calls: [{ arguments: {} }] }),
      'bad.jsonl:12: conversations[0].tool_calls[0] must be an object with a "name"',
    ],
    [
      conv({ role: "function", content: "x" }),
      'bad.jsonl:12: conversations[0].role must be "system", "user", "assistant" or "tool", got "function"',
    ],
    [
      conv({ role: "user", content: "q", tools: "[]" }),
      'bad.jsonl:12: conversations[0].tools is on a "user" message; tool definitions belong on the system message',
    ],
    [
      conv({ role: "system", content: "s", tools: "not json" }),
      "bad.jsonl:12: conversations[0].tools is a string but not valid JSON",
    ],
    [
      conv({ role: "system", content: "s", tools: { name: "f" } }),
      "bad.jsonl:12: conversations[0].tools must be a list",
    ],
    [
      conv({ role: "assistant", content: "a", reasoning_content: 5 }),
      "bad.jsonl:12: conversations[0].reasoning_content must be a string, got a number",
    ],
    [
      conv({ role: "user", content: null }),
      "bad.jsonl:12: conversations[0].content must be a string, got null",
    ],
  ];
  for (const [text, msg] of cases) {
    let err: unknown;
    try {
      parseSftRecord(text, where);
    } catch (e) {
      err = e;
    }
    assert(err instanceof UserError, `expected a UserError for ${msg}`);
    assertStringIncludes(err.message, msg);
  }
});

Deno.test("readRecords: bad tool records are skipped and counted under skipBadLines", async () => {
  const dir = await Deno.makeTempDir({ prefix: "sources_tool_test_" });
  const path = `${dir}/tools.jsonl`;
  const good =
    '{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}';
  await Deno.writeTextFile(
    path,
    [
      good,
      '{"conversations": [{"role": "assistant", "content": "", "tool_calls": "[{"}]}',
      '{"conversations": [{"role": "robot", "content": "x"}]}',
      '{"conversations": [{"role": "user", "content": "q", "tools": "[{}]"}]}',
      good,
    ].join("\n") + "\n",
  );
  await assertRejects(
    () => collect(readRecords(path, "sft")),
    UserError,
    `${path}:2: conversations[0].tool_calls is a string but not valid JSON`,
  );
  const counters: ReadCounters = { skippedLines: 0, records: 0 };
  const recs = await collect(readRecords(path, "sft", { skipBadLines: true, counters }));
  assertEquals(recs.map((r) => r.line.number), [1, 5]);
  assertEquals(counters, { skippedLines: 3, records: 2 });
  await Deno.remove(dir, { recursive: true });
});
