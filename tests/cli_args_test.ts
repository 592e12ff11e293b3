import { assertEquals, assertRejects, assertThrows } from "./assert.ts";
import { type CommandSpec, numberOption, parseCommandArgs } from "../cli/args.ts";
import { UsageError, UserError } from "../util/errors.ts";

const spec: CommandSpec = {
  name: "demo",
  summary: "a command for tests",
  config: true,
  positionals: false,
  options: {
    data: { type: "string", multiple: true, help: "shards" },
    lr: { type: "string", help: "learning rate" },
    "batch-size": { type: "string", help: "batch" },
    quiet: { type: "boolean", help: "quiet" },
  },
  run() {},
};

Deno.test("flags parse; a multiple option takes the values that follow it", async () => {
  const a = await parseCommandArgs(spec, ["--data", "a.jsonl", "b.jsonl", "--lr", "1e-3"]);
  assertEquals(a?.values["data"], ["a.jsonl", "b.jsonl"]);
  assertEquals(a?.values["lr"], "1e-3");
  assertEquals(a?.positionals, []);
});

Deno.test("--help returns undefined; unknown options and stray arguments are usage errors", async () => {
  assertEquals(await parseCommandArgs(spec, ["-h"]), undefined);
  await assertRejects(() => parseCommandArgs(spec, ["--nope"]), UsageError, "unknown option");
  await assertRejects(() => parseCommandArgs(spec, ["stray"]), UsageError, "unexpected argument");
  await assertRejects(() => parseCommandArgs(spec, ["--lr"]), UsageError);
});

Deno.test("a JSONC config supplies values and flags override it", async () => {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/run.jsonc`;
  await Deno.writeTextFile(
    path,
    `{
      // comments are fine
      "lr": 0.0005,
      "batch_size": 16, // snake_case keys map to --batch-size
      "data": ["x.jsonl"],
      "quiet": true,
    }`,
  );
  const a = await parseCommandArgs(spec, ["--config", path, "--lr", "1e-4"]);
  assertEquals(a?.values["lr"], "1e-4");
  assertEquals(a?.values["batch-size"], "16");
  assertEquals(a?.values["data"], ["x.jsonl"]);
  assertEquals(a?.values["quiet"], true);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("bad configs name the file and the problem", async () => {
  const dir = await Deno.makeTempDir();
  const bad = `${dir}/bad.jsonc`;
  await Deno.writeTextFile(bad, `{\n  "lr": 0.1,\n  "oops" 3\n}`);
  await assertRejects(() => parseCommandArgs(spec, ["--config", bad]), UserError, `${bad}:3:`);
  await Deno.writeTextFile(bad, `{"nope": 1}`);
  await assertRejects(
    () => parseCommandArgs(spec, ["--config", bad]),
    UserError,
    `unknown option "nope"`,
  );
  await Deno.writeTextFile(bad, `{"quiet": "yes"}`);
  await assertRejects(() => parseCommandArgs(spec, ["--config", bad]), UserError, "true or false");
  await assertRejects(
    () => parseCommandArgs(spec, ["--config", `${dir}/missing.jsonc`]),
    UserError,
    "cannot read config file",
  );
  await Deno.remove(dir, { recursive: true });
});

Deno.test("numberOption checks type, integrality and range, naming the flag", () => {
  const args = { values: { lr: "abc", "batch-size": "2.5" }, positionals: [] };
  assertThrows(() => numberOption(args, "lr", 1), UsageError, "--lr expects a number, got 'abc'");
  assertThrows(
    () => numberOption(args, "batch-size", 1, { integer: true }),
    UsageError,
    "--batch-size expects a whole number",
  );
  assertEquals(numberOption({ values: { lr: "5e-4" }, positionals: [] }, "lr", 1), 5e-4);
  assertEquals(numberOption({ values: {}, positionals: [] }, "lr", 7), 7);
  assertThrows(
    () => numberOption({ values: { lr: "-1" }, positionals: [] }, "lr", 1, { min: 0 }),
    UsageError,
    "at least 0",
  );
});
