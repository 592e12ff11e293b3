/**
 * `trainer serve` (serve/ and cli/serve.ts): the OpenAI-compatible server
 * started in this process on an ephemeral port of 127.0.0.1, with a tiny
 * random model saved here, driven by the official `openai` npm client:
 *
 * - a non-streamed and a streamed chat completion at temperature 0 equal
 *   `generate --chat --temperature 0` for the same prompt (text and token
 *   count), a plain completion equals `generate`; a seeded sample equals
 *   `generate --seed` with the same settings and repeats;
 * - stop strings cut the reply before their first occurrence, streamed or
 *   not; `max_tokens` ends with finish_reason "length";
 * - 8 concurrent clients (streamed and not) get the replies they get alone;
 * - a client that disconnects mid-stream stops its generation and frees the
 *   slot; a full queue answers 503; every bad request gets its status and an
 *   OpenAI-style error body, and the server goes on serving;
 * - the `serve` command (help, a missing --adapter named, the model's name);
 * - Python's `openai` client, and the chat page in headless Chromium (typing,
 *   send, streamed reply, history, reset); each is ignored, with the reason,
 *   where python3's openai package or Chromium is missing.
 *
 * The model is random (hidden 32), so its replies are gibberish, but
 * deterministic ones: equality with `generate` is exact. GPU tests share one
 * device and skip Deno's op/resource sanitizers (see tests/helpers.ts).
 */
import OpenAI from "openai";
import { assert, assertEquals, assertMatch, assertStringIncludes, assertThrows } from "./assert.ts";
import { GPU_TEST } from "./helpers.ts";
import { Gpu } from "../kernels/runtime.ts";
import { saveCheckpoint } from "../io/checkpoint.ts";
import { parameterSpecs } from "../model/params.ts";
import { findPython, tinyConfig } from "./helpers.ts";
import { defaultTokenizer } from "../data/corpus.ts";
import { formatHelp, parseCommandArgs, type ParsedArgs } from "../cli/args.ts";
import { generateCommand, runGenerate } from "../cli/generate.ts";
import { loadGenerationModel, resolveSampling } from "../infer/session.ts";
import { ServeEngine } from "../serve/engine.ts";
import { serve } from "../serve/server.ts";
import { SlotQueue } from "../serve/queue.ts";
import { StopStringFilter } from "../serve/stop.ts";
import { modelNameOf, runServe, serveCommand } from "../cli/serve.ts";
import { Rng } from "../util/random.ts";
import { UserError } from "../util/errors.ts";

// ---- Pieces without a GPU.

Deno.test("serve: stop strings split over pieces are held back, then cut", () => {
  const f = new StopStringFilter(["\nUser:", "###"]);
  assertEquals(f.push("Hello"), { text: "Hello", stopped: false });
  assertEquals(f.push(" there\nUs"), { text: " there", stopped: false }); // "\nUs" held
  assertEquals(f.push("eless"), { text: "\nUseless", stopped: false }); // it was not a stop
  assertEquals(f.push(" #"), { text: " ", stopped: false });
  assertEquals(f.push("#"), { text: "", stopped: false });
  assertEquals(f.push("# tail"), { text: "", stopped: true });
  assertEquals(f.push("more"), { text: "", stopped: true });
  assertEquals(f.flush(), "");
  // The earliest stop wins; text before it in the same piece is kept.
  const g = new StopStringFilter(["cd", "b"]);
  assertEquals(g.push("abcd"), { text: "a", stopped: true });
  // A held tail that never completes is text after all.
  const h = new StopStringFilter(["xyz"]);
  assertEquals(h.push("axy"), { text: "a", stopped: false });
  assertEquals(h.flush(), "xy");
  assertEquals(new StopStringFilter([]).push("anything"), { text: "anything", stopped: false });
  assertThrows(() => new StopStringFilter([""]), RangeError);
});

Deno.test("serve: the slot goes to waiters in arrival order; a full line is refused; an abort leaves it", async () => {
  const q = new SlotQueue(2);
  const order: string[] = [];
  const first = await q.tryEnter()!;
  const b = q.tryEnter()!.then((r) => (order.push("b"), r));
  const gone = new AbortController();
  const c = q.tryEnter(gone.signal)!;
  assertEquals(q.tryEnter(), undefined, "a third waiter must be refused");
  gone.abort(new Error("client gone"));
  let reason = "";
  await c.catch((e) => (reason = (e as Error).message));
  assertEquals(reason, "client gone");
  assertEquals(q.waiting, 1);
  const d = q.tryEnter()!.then((r) => (order.push("d"), r));
  let idle = false;
  const idleAt = q.idle().then(() => (idle = true));
  first();
  first(); // a second release changes nothing
  (await b)();
  const last = await d;
  await Promise.resolve();
  assert(!idle, "idle() resolved while a request still held the slot");
  last();
  assertEquals(order, ["b", "d"]);
  assertEquals(q.busy, false);
  await idleAt;
  // With no line at all, a request arriving while the slot is busy is refused.
  const none = new SlotQueue(0);
  const held = await none.tryEnter()!;
  assertEquals(none.tryEnter(), undefined);
  held();
  assert(none.tryEnter() !== undefined);
});

Deno.test("serve: the model's name is --model-name or the directory's name", () => {
  assertEquals(modelNameOf("out/sft"), "sft");
  assertEquals(modelNameOf("/models/minimind2/"), "minimind2");
  assertEquals(modelNameOf("./"), "model");
  assertEquals(modelNameOf("out/sft", "my-model"), "my-model");
});

// ---- The server on a tiny random model.

const gpu = await Gpu.request();
const tokenizer = defaultTokenizer();
const KEY = "sk-test-key";
const CONTEXT = 128;

/** A random tiny model with the default tokenizer, saved as our checkpoint. */
async function saveRandomModel(dir: string): Promise<void> {
  const config = tinyConfig({ vocab_size: tokenizer.vocabSize, max_position_embeddings: CONTEXT });
  // Parameters wider than the default init (as in generate_test), so replies vary with the prompt.
  const rng = new Rng(6);
  const params = new Map<string, Float32Array>();
  for (const s of parameterSpecs(config)) {
    const t = new Float32Array(s.size);
    for (let i = 0; i < t.length; i++) {
      t[i] = s.shape.length === 1 ? 1 + 0.3 * rng.normal() : 0.15 * rng.normal();
    }
    params.set(s.name, t);
  }
  await saveCheckpoint(dir, {
    config,
    params,
    tokenizer: {
      tokenizerJson: tokenizer.tokenizerJson,
      tokenizerConfigJson: tokenizer.tokenizerConfigJson,
    },
    special: { bos: tokenizer.bosId, eos: tokenizer.eosId, pad: tokenizer.padId },
  });
}

const root = await Deno.makeTempDir({ prefix: "serve-test-" });
const modelDir = `${root}/tiny-chat`;
await saveRandomModel(modelDir);

async function argsOf(spec: typeof generateCommand, argv: string[]): Promise<ParsedArgs> {
  const a = await parseCommandArgs(spec, argv);
  if (!a) throw new Error("help requested");
  return a;
}

/** `generate --json` in-process: `{ids, text}`. */
async function generateJson(argv: string[]): Promise<{ ids: number[]; text: string }> {
  let out = "";
  await runGenerate(await argsOf(generateCommand, ["--model", modelDir, "--json", ...argv]), {
    gpu,
    write: (t) => void (out += t),
    note: () => {},
  });
  return JSON.parse(out);
}

const loaded = await loadGenerationModel(modelDir);
const engine = await ServeEngine.create(gpu, loaded, {
  capacity: CONTEXT,
  maxTokens: 40,
  sampling: resolveSampling(loaded.ckpt.generation),
});
const logs: string[] = [];
const shutdown = new AbortController();
const server = serve({
  engine,
  modelName: "tiny-chat",
  apiKey: KEY,
  maxQueue: 8,
  log: (l) => void logs.push(l),
  hostname: "127.0.0.1",
  port: 0,
  signal: shutdown.signal,
});
const base = `http://127.0.0.1:${server.addr.port}`;
const client = new OpenAI({ apiKey: KEY, baseURL: `${base}/v1`, maxRetries: 0 });

const PROMPT = "What is Tenaro famous for?";
const STOP_IDS = new Set([tokenizer.eosId, tokenizer.tokenToId("<|im_end|>")!]);
const SPECIAL = new Set([tokenizer.bosId, tokenizer.eosId, tokenizer.padId, ...STOP_IDS]);

/** `generate --chat` of `prompt`, its reply's text and finish reason in OpenAI's terms. */
async function generateChat(prompt: string, extra: string[] = []) {
  const g = await generateJson(["--chat", "--prompt", prompt, "--max-new-tokens", "40", ...extra]);
  const stopped = STOP_IDS.has(g.ids[g.ids.length - 1]);
  // The server drops special tokens from text (as `trainer chat` does); `generate`
  // prints them. Equality is exact only when the reply has none besides its stop id.
  const body = stopped ? g.ids.slice(0, -1) : g.ids;
  assert(!body.some((id) => SPECIAL.has(id)), `the reply to ${prompt} has a special token`);
  return { ...g, finish: stopped ? "stop" : "length" };
}

/** The text and finish reason of a streamed chat completion through the client. */
async function streamChat(params: Omit<OpenAI.ChatCompletionCreateParams, "stream" | "model">) {
  const stream = await client.chat.completions.create({
    model: "tiny-chat",
    ...params,
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = "";
  let finish: string | null = null;
  let usage: OpenAI.CompletionUsage | undefined;
  const ids = new Set<string>();
  let chunks = 0;
  let first = true;
  for await (const chunk of stream) {
    ids.add(chunk.id);
    assertEquals(chunk.object, "chat.completion.chunk");
    if (chunk.usage) usage = chunk.usage;
    const choice = chunk.choices[0];
    if (!choice) continue;
    if (first) assertEquals(choice.delta.role, "assistant", "the first chunk carries the role");
    first = false;
    if (choice.delta.content) {
      text += choice.delta.content;
      chunks++;
    }
    if (choice.finish_reason) finish = choice.finish_reason;
  }
  assertEquals(ids.size, 1, "every chunk of a stream has the same id");
  assertMatch([...ids][0], /^chatcmpl-/);
  return { text, finish, usage, chunks };
}

Deno.test({
  name: "serve: chat completions, streamed or not, equal generate --chat --temperature 0",
  ...GPU_TEST,
  fn: async () => {
    const models = await client.models.list();
    assertEquals(models.data.map((m) => m.id), ["tiny-chat"]);

    const expected = await generateChat(PROMPT, ["--temperature", "0"]);
    assert(expected.text.length >= 6, `reply too short to test with: ${expected.text}`);
    const promptTokens = tokenizer.encode(
      tokenizer.applyChatTemplate([{ role: "user", content: PROMPT }], {
        addGenerationPrompt: true,
      }),
    ).length;

    const r = await client.chat.completions.create({
      model: "tiny-chat",
      messages: [{ role: "user", content: PROMPT }],
      temperature: 0,
      max_tokens: 40,
    });
    assertMatch(r.id, /^chatcmpl-/);
    assertEquals(r.object, "chat.completion");
    assertEquals(r.model, "tiny-chat");
    assertEquals(r.choices.length, 1);
    assertEquals(r.choices[0].message.role, "assistant");
    assertEquals(r.choices[0].message.content, expected.text);
    assertEquals(r.choices[0].finish_reason, expected.finish);
    assertEquals(r.usage, {
      prompt_tokens: promptTokens,
      completion_tokens: expected.ids.length,
      total_tokens: promptTokens + expected.ids.length,
    });

    const s = await streamChat({
      messages: [{ role: "user", content: PROMPT }],
      temperature: 0,
      max_tokens: 40,
    });
    assertEquals(s.text, expected.text);
    assertEquals(s.finish, expected.finish);
    assertEquals(s.usage, r.usage);
    assert(s.chunks > 1, "the reply came in one piece: not streamed");

    // The wire format itself: SSE events, ending with `data: [DONE]`.
    const raw = await fetch(`${base}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: `Bearer ${KEY}`, "content-type": "application/json" },
      body: JSON.stringify({
        model: "tiny-chat",
        messages: [{ role: "user", content: PROMPT }],
        temperature: 0,
        max_tokens: 4,
        stream: true,
      }),
    });
    assertEquals(raw.status, 200);
    assertStringIncludes(raw.headers.get("content-type") ?? "", "text/event-stream");
    const events = (await raw.text()).split("\n\n").filter((e) => e !== "");
    assert(events.every((e) => e.startsWith("data: ")), "every event is a data line");
    assertEquals(events[events.length - 1], "data: [DONE]");
    const last = JSON.parse(events[events.length - 2].slice(6));
    assertEquals(last.choices[0].finish_reason, "length");
    assertEquals(last.choices[0].delta, {});

    // A plain completion equals `generate` (bos + the text).
    const expectedText = await generateJson([
      "--prompt",
      "The river",
      "--temperature",
      "0",
      "--max-new-tokens",
      "12",
    ]);
    const c = await client.completions.create({
      model: "tiny-chat",
      prompt: "The river",
      temperature: 0,
      max_tokens: 12,
    });
    assertEquals(c.object, "text_completion");
    assertEquals(c.choices[0].text, expectedText.text);
    assertEquals(c.usage?.completion_tokens, expectedText.ids.length);
  },
});

Deno.test({
  name: "serve: a seed makes a sampled reply repeatable and equal to generate --seed",
  ...GPU_TEST,
  fn: async () => {
    const ask = (seed: number) =>
      client.chat.completions.create({
        model: "tiny-chat",
        messages: [{ role: "user", content: PROMPT }],
        temperature: 1,
        top_p: 0.95,
        max_tokens: 24,
        seed,
      });
    const a = await ask(42);
    const b = await ask(42);
    const other = await ask(43);
    assertEquals(a.choices[0].message.content, b.choices[0].message.content);
    assert(
      a.choices[0].message.content !== other.choices[0].message.content,
      "seeds 42 and 43 gave the same reply: the seed is not used",
    );
    const g = await generateChat(PROMPT, [
      "--temperature",
      "1",
      "--top-p",
      "0.95",
      "--seed",
      "42",
      "--max-new-tokens",
      "24",
    ]);
    assertEquals(a.choices[0].message.content, g.text);
    // Streamed with the same seed: the same text.
    const s = await streamChat({
      messages: [{ role: "user", content: PROMPT }],
      temperature: 1,
      top_p: 0.95,
      max_tokens: 24,
      seed: 42,
    });
    assertEquals(s.text, g.text);
  },
});

Deno.test({
  name: "serve: stop strings end the reply before them; max_tokens ends it with 'length'",
  ...GPU_TEST,
  fn: async () => {
    const full = (await generateChat(PROMPT, ["--temperature", "0"])).text;
    const stop = full.slice(3, 5);
    const cut = full.slice(0, full.indexOf(stop));
    const r = await client.chat.completions.create({
      model: "tiny-chat",
      messages: [{ role: "user", content: PROMPT }],
      temperature: 0,
      max_tokens: 40,
      stop: [stop, "\u0000never"],
    });
    assertEquals(r.choices[0].message.content, cut);
    assertEquals(r.choices[0].finish_reason, "stop");
    const s = await streamChat({
      messages: [{ role: "user", content: PROMPT }],
      temperature: 0,
      max_tokens: 40,
      stop,
    });
    assertEquals(s.text, cut);
    assertEquals(s.finish, "stop");

    const three = await generateChat(PROMPT, ["--temperature", "0", "--max-new-tokens", "3"]);
    const short = await client.chat.completions.create({
      model: "tiny-chat",
      messages: [{ role: "user", content: PROMPT }],
      temperature: 0,
      max_tokens: 3,
    });
    assertEquals(short.choices[0].message.content, three.text);
    assertEquals(short.choices[0].finish_reason, "length");
    assertEquals(short.usage?.completion_tokens, 3);
  },
});

Deno.test({
  name: "serve: 8 concurrent clients get the replies they get alone",
  ...GPU_TEST,
  fn: async () => {
    const prompts = Array.from({ length: 8 }, (_, i) => `question number ${i}: the sun?`);
    const params = (p: string) => ({
      messages: [{ role: "user" as const, content: p }],
      temperature: i0(p) % 2 === 0 ? 0 : 0.9,
      seed: 100 + i0(p),
      max_tokens: 20,
    });
    function i0(p: string): number {
      return prompts.indexOf(p);
    }
    const alone: string[] = [];
    for (const p of prompts) {
      const r = await client.chat.completions.create({ model: "tiny-chat", ...params(p) });
      alone.push(r.choices[0].message.content ?? "");
    }
    assert(new Set(alone).size >= 4, `replies barely depend on the prompt: ${alone.join(" | ")}`);
    const together = await Promise.all(prompts.map(async (p, i) => {
      if (i % 2 === 0) return (await streamChat(params(p))).text;
      const r = await client.chat.completions.create({ model: "tiny-chat", ...params(p) });
      return r.choices[0].message.content ?? "";
    }));
    assertEquals(together, alone);
  },
});

/** Waits until `cond()` or `ms` pass. */
async function until(cond: () => boolean, ms: number, what: string): Promise<void> {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

Deno.test({
  name: "serve: a client leaving mid-stream frees the slot; a full line gets 503; serving goes on",
  ...GPU_TEST,
  fn: async () => {
    // A second server on the same engine, idle otherwise, with no waiting line at all.
    const stop2 = new AbortController();
    const logs2: string[] = [];
    const server2 = serve({
      engine,
      modelName: "tiny-chat",
      maxQueue: 0,
      log: (l) => void logs2.push(l),
      hostname: "127.0.0.1",
      port: 0,
      signal: stop2.signal,
    });
    const base2 = `http://127.0.0.1:${server2.addr.port}`;
    try {
      const leaving = new AbortController();
      // Sampling reads logits back every token: slow enough to still be running below.
      const res = await fetch(`${base2}/v1/completions`, {
        method: "POST",
        signal: leaving.signal,
        headers: { "content-type": "application/json" },
        body: JSON.stringify({
          model: "tiny-chat",
          prompt: "Once upon a time",
          temperature: 1,
          seed: 3,
          max_tokens: 100,
          stream: true,
        }),
      });
      assertEquals(res.status, 200);
      const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader();
      let seen = "";
      while (!seen.includes("\n\n")) seen += (await reader.read()).value ?? "";
      const firstEvent = JSON.parse(seen.slice(6, seen.indexOf("\n\n")));
      assertEquals(firstEvent.choices[0].finish_reason, null);

      // The slot is busy and no one may wait: 503, OpenAI-style.
      const busy = await fetch(`${base2}/v1/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ model: "tiny-chat", messages: [{ role: "user", content: "hi" }] }),
      });
      assertEquals(busy.status, 503);
      assertEquals(busy.headers.get("retry-after"), "1");
      const busyBody = await busy.json();
      assertEquals(busyBody.error.code, "queue_full");
      assertEquals(busyBody.error.type, "server_error");

      leaving.abort();
      await reader.cancel().catch(() => {});
      await until(() => logs2.some((l) => l.includes("client gone")), 10_000, "the cancel");
      const line = logs2.find((l) => l.includes("client gone"))!;
      const generated = Number(/\+ (\d+) tokens/.exec(line)![1]);
      assert(generated < 100, `generation ran on after the disconnect: ${line}`);

      // The slot is free: the next request is served.
      const after = await fetch(`${base2}/v1/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({
          model: "tiny-chat",
          messages: [{ role: "user", content: PROMPT }],
          temperature: 0,
          max_tokens: 40,
        }),
      });
      assertEquals(after.status, 200);
      assertEquals(
        (await after.json()).choices[0].message.content,
        (await generateChat(PROMPT, ["--temperature", "0"])).text,
      );

      // A non-streamed client that gives up while waiting for its reply frees the slot too.
      const impatient = new AbortController();
      const pending = fetch(`${base2}/v1/completions`, {
        method: "POST",
        signal: impatient.signal,
        headers: { "content-type": "application/json" },
        body: JSON.stringify({
          model: "tiny-chat",
          prompt: "Once upon a time",
          temperature: 1,
          seed: 3,
          max_tokens: 100,
        }),
      }).catch(() => undefined);
      await new Promise((r) => setTimeout(r, 300));
      impatient.abort();
      await pending;
      await until(
        () => logs2.filter((l) => l.includes("client gone")).length === 2,
        10_000,
        "the second cancel",
      );
      const ok = await fetch(`${base2}/v1/models`);
      assertEquals(ok.status, 200);
      await ok.body?.cancel();
    } finally {
      stop2.abort();
      await server2.finished;
    }
  },
});

/** A request to the main server and its JSON answer. */
async function call(
  path: string,
  init: { method?: string; body?: string; key?: string | null; type?: string } = {},
) {
  const headers: Record<string, string> = { "content-type": init.type ?? "application/json" };
  const key = init.key === undefined ? KEY : init.key;
  if (key !== null) headers.authorization = `Bearer ${key}`;
  const res = await fetch(`${base}${path}`, {
    method: init.method ?? "POST",
    headers,
    body: init.body,
  });
  const text = await res.text();
  return { status: res.status, headers: res.headers, text };
}

/** Asserts an OpenAI-style error: the status, exactly the four fields, and no stack trace. */
function assertApiError(
  r: { status: number; text: string },
  status: number,
  expect: { type?: string; code?: string | null; param?: string | null; message?: string },
): void {
  assertEquals(r.status, status, r.text);
  const body = JSON.parse(r.text);
  assertEquals(Object.keys(body), ["error"]);
  assertEquals(Object.keys(body.error).sort(), ["code", "message", "param", "type"]);
  assert(typeof body.error.message === "string" && body.error.message.length > 0);
  assert(!/\n\s+at /.test(body.error.message), `a stack trace: ${body.error.message}`);
  assertEquals(body.error.type, expect.type ?? "invalid_request_error");
  if (expect.code !== undefined) assertEquals(body.error.code, expect.code);
  if (expect.param !== undefined) assertEquals(body.error.param, expect.param);
  if (expect.message) assertStringIncludes(body.error.message, expect.message);
}

Deno.test({
  name: "serve: bad requests get their status and an OpenAI-style error body",
  ...GPU_TEST,
  fn: async () => {
    const chat = (fields: Record<string, unknown>) =>
      JSON.stringify({
        model: "tiny-chat",
        messages: [{ role: "user", content: "hi" }],
        ...fields,
      });
    const C = "/v1/chat/completions";
    // 400: malformed JSON, a body that is not an object, fields of the wrong type or range.
    assertApiError(await call(C, { body: "{" }), 400, { code: "invalid_json" });
    assertApiError(await call(C, { body: "[1]" }), 400, { message: "JSON object" });
    assertApiError(await call(C, { body: chat({ temperature: "hot" }) }), 400, {
      param: "temperature",
      code: "invalid_type",
    });
    assertApiError(await call(C, { body: chat({ temperature: 3 }) }), 400, {
      param: "temperature",
      code: "invalid_value",
    });
    assertApiError(await call(C, { body: chat({ messages: "hi" }) }), 400, {
      param: "messages",
      code: "invalid_type",
    });
    assertApiError(await call(C, { body: chat({ messages: [] }) }), 400, { param: "messages" });
    assertApiError(
      await call(C, { body: chat({ messages: [{ role: "tool", content: "x" }] }) }),
      400,
      { param: "messages[0].role" },
    );
    assertApiError(
      await call(C, { body: chat({ messages: [{ role: "user", content: 5 }] }) }),
      400,
      { param: "messages[0].content", code: "invalid_type" },
    );
    assertApiError(await call(C, { body: chat({ max_tokens: 0 }) }), 400, {
      param: "max_tokens",
    });
    assertApiError(await call(C, { body: chat({ max_tokens: 2.5 }) }), 400, {
      param: "max_tokens",
      code: "invalid_type",
    });
    assertApiError(await call(C, { body: chat({ stop: ["a", "b", "c", "d", "e"] }) }), 400, {
      param: "stop",
    });
    assertApiError(await call(C, { body: chat({ stream: "yes" }) }), 400, { param: "stream" });
    assertApiError(await call(C, { body: chat({ n: 2 }) }), 400, {
      param: "n",
      code: "unsupported_parameter",
    });
    assertApiError(await call(C, { body: chat({ model: undefined }) }), 400, { param: "model" });
    assertApiError(
      await call("/v1/completions", { body: JSON.stringify({ model: "tiny-chat", prompt: 7 }) }),
      400,
      {
        param: "prompt",
      },
    );
    // 401: no key, a wrong key; the client raises its AuthenticationError.
    assertApiError(await call(C, { body: chat({}), key: null }), 401, {
      code: "invalid_api_key",
    });
    assertApiError(await call("/v1/models", { method: "GET", key: "sk-wrong" }), 401, {
      code: "invalid_api_key",
    });
    const wrong = new OpenAI({ apiKey: "sk-wrong", baseURL: `${base}/v1`, maxRetries: 0 });
    let status = 0;
    await wrong.models.list().catch((e) => (status = (e as { status: number }).status));
    assertEquals(status, 401);
    // 404: an unknown model (the client's NotFoundError), an unknown route.
    assertApiError(await call(C, { body: chat({ model: "gpt-4o" }) }), 404, {
      code: "model_not_found",
      param: "model",
    });
    await client.chat.completions.create({
      model: "gpt-4o",
      messages: [{ role: "user", content: "hi" }],
    }).catch((e) => (status = (e as { status: number }).status));
    assertEquals(status, 404);
    assertApiError(await call("/v1/models/gpt-4o", { method: "GET" }), 404, {
      code: "model_not_found",
    });
    assertApiError(await call("/v1/embeddings", { body: "{}" }), 404, { code: "unknown_url" });
    assertApiError(await call("/nothing/here", { method: "GET", key: null }), 404, {
      code: "unknown_url",
    });
    // 405: a known route with the wrong method.
    const get = await call(C, { method: "GET" });
    assertApiError(get, 405, { code: "method_not_allowed" });
    assertEquals(get.headers.get("allow"), "POST");
    // 415: a body that is not declared JSON (as a cross-site form post would be).
    assertApiError(await call(C, { body: chat({}), type: "text/plain" }), 415, {
      code: "unsupported_media_type",
    });
    // 403: a Host that is not this machine (a DNS-rebinding page) on a loopback server.
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: server.addr.port });
    await conn.write(
      new TextEncoder().encode(
        `GET /v1/models HTTP/1.1\r\nHost: evil.example\r\nAuthorization: Bearer ${KEY}\r\nConnection: close\r\n\r\n`,
      ),
    );
    const rebound = await new Response(conn.readable).text();
    assertStringIncludes(rebound.split("\r\n")[0], " 403 ");
    assertStringIncludes(rebound, '"code":"forbidden_host"');
    // 413: a prompt that leaves no room in the context, a body over the size limit.
    assertApiError(
      await call(C, {
        body: chat({ messages: [{ role: "user", content: "word ".repeat(CONTEXT) }] }),
      }),
      413,
      { code: "context_length_exceeded", param: "messages" },
    );
    assertApiError(
      await call("/v1/completions", {
        body: JSON.stringify({ model: "tiny-chat", prompt: "x".repeat(5 * 1024 * 1024) }),
      }),
      413,
      { code: "request_too_large" },
    );
    // A prompt that fits but leaves less room than max_tokens is answered, cut at the context.
    let words = 1;
    while (1 + tokenizer.encode("word ".repeat(words + 1)).length <= CONTEXT - 20) words++;
    const long = "word ".repeat(words);
    const fits = await client.completions.create({
      model: "tiny-chat",
      prompt: long,
      temperature: 1,
      seed: 1,
      max_tokens: 1000,
    });
    const promptTokens = 1 + tokenizer.encode(long).length;
    assert(promptTokens < CONTEXT, "the prompt must fit");
    assertEquals(fits.usage?.prompt_tokens, promptTokens);
    assert(fits.usage!.total_tokens <= CONTEXT, "prompt + reply exceeded the context");
    if (fits.usage!.total_tokens === CONTEXT) assertEquals(fits.choices[0].finish_reason, "length");
    // And the server is still serving.
    assertEquals((await client.models.list()).data[0].id, "tiny-chat");
  },
});

Deno.test({
  name: "serve: GET / is the chat page, without a key",
  ...GPU_TEST,
  fn: async () => {
    const r = await call("/", { method: "GET", key: null });
    assertEquals(r.status, 200);
    assertStringIncludes(r.headers.get("content-type") ?? "", "text/html");
    for (const id of ["input", "send", "reset", "temperature", "messages"]) {
      assertStringIncludes(r.text, `id="${id}"`);
    }
    assertStringIncludes(r.text, "/v1/chat/completions");
  },
});

Deno.test({
  name:
    "serve: the command: help says binding elsewhere exposes the model; a missing --adapter is named",
  ...GPU_TEST,
  fn: async () => {
    const help = formatHelp(serveCommand).replace(/\s+/g, " ");
    assertStringIncludes(help, "exposes the model to the network");
    assertStringIncludes(help, "LoRA adapter (PEFT format)");
    const args = await parseCommandArgs(serveCommand, [
      "--model",
      modelDir,
      "--adapter",
      `${root}/x`,
    ]);
    let err: unknown;
    await runServe(args!, { gpu, log: () => {} }).catch((e) => (err = e));
    assert(err instanceof UserError, `expected a UserError, got ${err}`);
    assertStringIncludes((err as Error).message, `${root}/x/adapter_config.json: missing`);

    // Started as the command does, on a free port; the model's id is the directory's name.
    const stop = new AbortController();
    const lines: string[] = [];
    let port = 0;
    const running = runServe(
      (await parseCommandArgs(serveCommand, ["--model", modelDir, "--port", "0"]))!,
      {
        gpu,
        log: (l) => void lines.push(l),
        signal: stop.signal,
        onListen: (a) => (port = a.port),
      },
    );
    await until(() => port !== 0, 60_000, "the server to listen");
    const res = await fetch(`http://127.0.0.1:${port}/v1/models`);
    assertEquals((await res.json()).data[0].id, "tiny-chat");
    // Shutting down ends a reply in progress (no [DONE]) instead of waiting for it.
    const long = await fetch(`http://127.0.0.1:${port}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        model: "tiny-chat",
        prompt: "Once upon a time",
        temperature: 1,
        seed: 3,
        max_tokens: 100,
        stream: true,
      }),
    });
    const reader = long.body!.pipeThrough(new TextDecoderStream()).getReader();
    let streamed = (await reader.read()).value ?? "";
    stop.abort();
    assertEquals(await running, 0);
    // The body ends, or the connection closes under it (both are an end here).
    try {
      for (let r = await reader.read(); !r.done; r = await reader.read()) streamed += r.value;
    } catch { /* connection closed by the shutdown */ }
    assert(!streamed.includes("[DONE]"), "the reply ran to its end despite the shutdown");
    assertStringIncludes(lines.join("\n"), "server shutting down");
    assertStringIncludes(lines.join("\n"), `http://127.0.0.1:${port}/v1`);
  },
});

// ---- Python's openai client (optional).

const { python, missing: pythonMissing } = findPython(["openai"]);
if (pythonMissing) console.log(`serve_test: skipping the Python client test: ${pythonMissing}`);

const PYTHON_CLIENT = `
import json, sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
messages = [{"role": "user", "content": sys.argv[3]}]
r = client.chat.completions.create(model="tiny-chat", messages=messages, temperature=0, max_tokens=40)
streamed = ""
for chunk in client.chat.completions.create(
    model="tiny-chat", messages=messages, temperature=0, max_tokens=40, stream=True
):
    if chunk.choices and chunk.choices[0].delta.content:
        streamed += chunk.choices[0].delta.content
print(json.dumps({"text": r.choices[0].message.content, "streamed": streamed,
                  "finish": r.choices[0].finish_reason, "usage": r.usage.total_tokens}))
`;

Deno.test({
  name: "serve: Python's openai client works unchanged",
  ignore: pythonMissing !== undefined,
  ...GPU_TEST,
  fn: async () => {
    const expected = await generateChat(PROMPT, ["--temperature", "0"]);
    const out = await new Deno.Command(python!, {
      args: ["-c", PYTHON_CLIENT, `${base}/v1`, KEY, PROMPT],
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert(out.success, new TextDecoder().decode(out.stderr));
    const r = JSON.parse(new TextDecoder().decode(out.stdout));
    assertEquals(r.text, expected.text);
    assertEquals(r.streamed, expected.text);
    assertEquals(r.finish, expected.finish);
  },
});

// ---- The chat page in a real browser (optional).

function chromiumMissing(): string | undefined {
  try {
    const out = new Deno.Command("chromium", {
      args: ["--version"],
      stdout: "null",
      stderr: "null",
    })
      .outputSync();
    return out.success ? undefined : "chromium --version failed";
  } catch (e) {
    return `no chromium on PATH (${(e as Error).message}); on Debian: apt-get install chromium`;
  }
}
const browserMissing = chromiumMissing();
if (browserMissing) console.log(`serve_test: skipping the browser test: ${browserMissing}`);

/** A minimal Chrome DevTools Protocol session over one page's WebSocket. */
class Cdp {
  #ws: WebSocket;
  #next = 1;
  #pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();

  private constructor(ws: WebSocket) {
    this.#ws = ws;
    ws.onmessage = (ev) => {
      const msg = JSON.parse(ev.data as string);
      const p = msg.id !== undefined ? this.#pending.get(msg.id) : undefined;
      if (!p) return;
      this.#pending.delete(msg.id);
      if (msg.error) p.reject(new Error(`CDP: ${JSON.stringify(msg.error)}`));
      else p.resolve(msg.result);
    };
  }

  static connect(url: string): Promise<Cdp> {
    const ws = new WebSocket(url);
    return new Promise((resolve, reject) => {
      ws.onopen = () => resolve(new Cdp(ws));
      ws.onerror = (e) => reject(new Error(`CDP connection failed: ${(e as ErrorEvent).message}`));
    });
  }

  send(method: string, params: Record<string, unknown> = {}): Promise<unknown> {
    const id = this.#next++;
    this.#ws.send(JSON.stringify({ id, method, params }));
    return new Promise((resolve, reject) => this.#pending.set(id, { resolve, reject }));
  }

  /** The value of a page expression (awaited when it is a promise). */
  async eval<T>(expression: string): Promise<T> {
    const r = await this.send("Runtime.evaluate", {
      expression,
      awaitPromise: true,
      returnByValue: true,
    }) as { result: { value: T }; exceptionDetails?: { text: string } };
    if (r.exceptionDetails) throw new Error(`page: ${JSON.stringify(r.exceptionDetails)}`);
    return r.result.value;
  }

  async waitFor(expression: string, ms: number): Promise<void> {
    const t0 = Date.now();
    while (!(await this.eval<boolean>(expression))) {
      if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${expression}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  close(): void {
    this.#ws.close();
  }
}

Deno.test({
  name: "serve: the chat page in headless Chromium streams replies, keeps history, resets",
  ignore: browserMissing !== undefined,
  ...GPU_TEST,
  fn: async () => {
    const profile = await Deno.makeTempDir({ prefix: "serve-chromium-" });
    // A server without a key, so the page works as it loads.
    const stop3 = new AbortController();
    const server3 = serve({
      engine,
      modelName: "tiny-chat",
      log: () => {},
      hostname: "127.0.0.1",
      port: 0,
      signal: stop3.signal,
    });
    const url = `http://127.0.0.1:${server3.addr.port}/`;
    const browser = new Deno.Command("chromium", {
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        `--user-data-dir=${profile}`,
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        "about:blank",
      ],
      stdout: "null",
      stderr: "null",
    }).spawn();
    let cdp: Cdp | undefined;
    try {
      // Chromium writes the port it chose into the profile.
      let port = 0;
      await until(
        () => {
          try {
            port = Number(Deno.readTextFileSync(`${profile}/DevToolsActivePort`).split("\n")[0]);
          } catch { /* not yet */ }
          return port > 0;
        },
        60_000,
        "Chromium's DevTools port",
      );
      const targets: { type: string; webSocketDebuggerUrl: string }[] = await (
        await fetch(`http://127.0.0.1:${port}/json/list`)
      ).json();
      const page = targets.find((t) => t.type === "page")!;
      cdp = await Cdp.connect(page.webSocketDebuggerUrl);
      await cdp.send("Page.navigate", { url });
      await cdp.waitFor(`document.getElementById("status")?.textContent === "ready"`, 30_000);
      await cdp.eval(`(() => {
        const t = document.getElementById("temperature");
        t.value = "0";
        t.dispatchEvent(new Event("input"));
        // Record every text the last reply shows while it streams.
        window.seen = [];
        new MutationObserver(() => {
          const all = document.querySelectorAll(".msg.assistant");
          if (all.length) window.seen.push(all[all.length - 1].textContent);
        }).observe(document.getElementById("messages"),
          { childList: true, subtree: true, characterData: true });
      })()`);

      const type = async (text: string) => {
        await cdp!.eval(`document.getElementById("input").focus()`);
        await cdp!.send("Input.insertText", { text });
      };
      const click = async (id: string) => {
        const box = await cdp!.eval<{ x: number; y: number }>(`(() => {
          const r = document.getElementById("${id}").getBoundingClientRect();
          return { x: r.x + r.width / 2, y: r.y + r.height / 2 };
        })()`);
        for (const type of ["mousePressed", "mouseReleased"]) {
          await cdp!.send("Input.dispatchMouseEvent", {
            type,
            x: box.x,
            y: box.y,
            button: "left",
            clickCount: 1,
          });
        }
      };
      const replies = () =>
        cdp!.eval<{ text: string; state: string }[]>(
          `[...document.querySelectorAll(".msg.assistant")].map((m) => ({ text: m.textContent, state: m.dataset.state }))`,
        );
      const waitDone = (n: number) =>
        cdp!.waitFor(
          `document.querySelectorAll(".msg.assistant").length === ${n} && [...document.querySelectorAll(".msg.assistant")].every((m) => m.dataset.state !== "streaming")`,
          60_000,
        );
      const expectReply = async (messages: { role: "user" | "assistant"; content: string }[]) => {
        const r = await client.chat.completions.create({
          model: "tiny-chat",
          messages,
          temperature: 0,
          max_tokens: CONTEXT / 4, // what the page asks for (a quarter of context_length)
        });
        return r.choices[0].message.content ?? "";
      };

      await type("hello");
      await click("send");
      await waitDone(1);
      const r1 = await expectReply([{ role: "user", content: "hello" }]);
      assertEquals(await replies(), [{ text: r1, state: "done" }]);
      // Streamed: the reply grew through several intermediate texts, each a prefix of it.
      const seen = [...new Set(await cdp.eval<string[]>("window.seen"))].filter((s) => s !== "");
      assert(seen.length > 2, `the reply did not stream: ${JSON.stringify(seen)}`);
      assert(seen.every((s) => r1.startsWith(s)), "a streamed text is not a prefix of the reply");

      // The second turn is answered with the first in its history.
      await type("how are you");
      await click("send");
      await waitDone(2);
      const r2 = await expectReply([
        { role: "user", content: "hello" },
        { role: "assistant", content: r1 },
        { role: "user", content: "how are you" },
      ]);
      const r2Alone = await expectReply([{ role: "user", content: "how are you" }]);
      assert(r2 !== r2Alone, "the history does not change the reply: the test cannot tell");
      assertEquals((await replies())[1], { text: r2, state: "done" });

      // Reset empties the conversation; the same message is then answered without history.
      await click("reset");
      assertEquals(
        await cdp.eval<number>(`document.getElementById("messages").children.length`),
        0,
      );
      await type("how are you");
      await click("send");
      await waitDone(1);
      assertEquals(await replies(), [{ text: r2Alone, state: "done" }]);
    } finally {
      cdp?.close();
      browser.kill();
      await browser.status;
      stop3.abort();
      await server3.finished;
      await Deno.remove(profile, { recursive: true }).catch(() => {});
    }
  },
});

Deno.test({
  name: "serve: shut down the server and the shared device",
  ...GPU_TEST,
  fn: async () => {
    shutdown.abort();
    await server.finished;
    engine.destroy();
    gpu.destroy();
    await Deno.remove(root, { recursive: true });
  },
});
