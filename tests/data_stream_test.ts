/**
 * The training batch stream: packing through the whole reader, SFT rows and
 * mask alignment, epochs, seeded shuffling, saved positions that resume with
 * exactly the next batch (JSONL, .jsonl.gz and token shards), and its errors.
 */
import { assert, assertEquals, assertNotEquals, assertRejects } from "./assert.ts";
import { TextTokenizer } from "../data/tokenizer.ts";
import { defaultTokenizer } from "../data/corpus.ts";
import {
  type DataPosition,
  DataStream,
  type DataStreamOptions,
  trainedRowLength,
} from "../data/stream.ts";
import type { Batch } from "../data/batch.ts";
import { documentTokens, packDocuments } from "../data/pretrain.ts";
import { assistantMask } from "../data/sft.ts";
import { prepareShards } from "../data/shards.ts";
import { UserError } from "../util/errors.ts";
import { MINIMIND_SYSTEM_PROMPTS } from "../data/sft_augment.ts";
import { Rng } from "../util/random.ts";

const tok = await TextTokenizer.load("../shared/fixtures/minimind-tokenizer");

const WORDS = ["alpha", "beta", "gamma", "delta", "数据", "模型", "训练", "the", "quick", "fox"];

function pretrainDocs(n: number, seed: number): string[] {
  const rng = new Rng(seed);
  return Array.from({ length: n }, (_, i) => {
    const len = 1 + rng.nextInt(30);
    return `doc ${seed}-${i}: ` +
      Array.from({ length: len }, () => WORDS[rng.nextInt(WORDS.length)]).join(" ");
  });
}

function conversations(n: number, seed: number): { role: string; content: string }[][] {
  const rng = new Rng(seed);
  return Array.from({ length: n }, (_, i) => {
    const turns: { role: string; content: string }[] = [];
    if (i % 3 === 0) turns.push({ role: "system", content: "你是助手。" });
    const rounds = 1 + rng.nextInt(2);
    for (let r = 0; r < rounds; r++) {
      turns.push({ role: "user", content: `question ${seed}-${i}-${r} ${WORDS[rng.nextInt(10)]}` });
      turns.push({ role: "assistant", content: `answer ${i} ${WORDS[rng.nextInt(10)]}` });
    }
    return turns;
  });
}

async function gzipText(text: string): Promise<Uint8Array> {
  const s = ReadableStream.from([new TextEncoder().encode(text)]).pipeThrough(
    new CompressionStream("gzip") as unknown as ReadableWritablePair<Uint8Array, Uint8Array>,
  );
  return new Uint8Array(await new Response(s).arrayBuffer());
}

interface Corpus {
  dir: string;
  pretrain: string[]; // file paths
  pretrainTexts: string[][]; // per file
  sft: string[];
}

/** Three pretrain files (one gzipped) and two SFT files with some bad lines. */
async function makeCorpus(): Promise<Corpus> {
  const dir = await Deno.makeTempDir({ prefix: "data_stream_test_" });
  const pretrainTexts = [pretrainDocs(40, 1), pretrainDocs(25, 2), pretrainDocs(30, 3)];
  const lines = pretrainTexts.map((docs) =>
    docs.map((text) => JSON.stringify({ text })).join("\n")
  );
  await Deno.writeTextFile(`${dir}/p0.jsonl`, lines[0] + "\n");
  await Deno.writeFile(`${dir}/p1.jsonl.gz`, await gzipText(lines[1] + "\n"));
  await Deno.writeTextFile(`${dir}/p2.jsonl`, "\uFEFF" + lines[2].replaceAll("\n", "\r\n\r\n"));
  const c0 = conversations(30, 4).map((c) => JSON.stringify({ conversations: c }));
  const c1 = conversations(20, 5).map((c) => JSON.stringify({ conversations: c }));
  c1.splice(
    5,
    0,
    '{"conversations": [{"role": "user"',
    '{"conversations": [{"role": "user", "content": "no answer"}]}',
  );
  await Deno.writeTextFile(`${dir}/s0.jsonl`, c0.join("\n") + "\n");
  await Deno.writeTextFile(`${dir}/s1.jsonl`, c1.join("\n") + "\n");
  return {
    dir,
    pretrain: [`${dir}/p0.jsonl`, `${dir}/p1.jsonl.gz`, `${dir}/p2.jsonl`],
    pretrainTexts,
    sft: [`${dir}/s0.jsonl`, `${dir}/s1.jsonl`],
  };
}

async function take(stream: DataStream, n: number): Promise<Batch[]> {
  const out: Batch[] = [];
  for (let i = 0; i < n; i++) {
    const b = await stream.next();
    if (!b) break;
    out.push(b);
  }
  return out;
}

async function drain(stream: DataStream): Promise<Batch[]> {
  return await take(stream, Number.MAX_SAFE_INTEGER);
}

/** k batches, save, n more; then a fresh stream from the saved position gives the same n. */
async function checkResume(opts: DataStreamOptions, k: number, n: number): Promise<void> {
  const a = await DataStream.open(opts);
  await take(a, k);
  const saved: DataPosition = JSON.parse(JSON.stringify(a.position()));
  const expected = await take(a, n);
  const statsA = a.stats;
  a.close();
  const b = await DataStream.open(opts, saved);
  const got = await take(b, n);
  assertEquals(got.length, expected.length, `resume after ${k}: batch count`);
  for (let i = 0; i < got.length; i++) {
    assertEquals(got[i], expected[i], `resume after ${k} batches: batch ${i}`);
  }
  assertEquals(b.stats, statsA, `resume after ${k}: stats`);
  assertEquals(b.position(), a.position(), `resume after ${k}: position`);
  b.close();
}

const corpus = await makeCorpus();
addEventListener("unload", () => Deno.removeSync(corpus.dir, { recursive: true }));

Deno.test("pretrain stream, no shuffle: batches are the packed windows in file order, targets shifted by one", async () => {
  const T = 16;
  const B = 3;
  const stream = await DataStream.open({
    data: [corpus.dir + "/p*"],
    kind: "pretrain",
    tokenizer: tok,
    batchSize: B,
    seqLen: T,
    maxEpochs: 1,
  });
  const batches = await drain(stream);
  const windows = packDocuments(corpus.pretrainTexts.flat().map((t) => documentTokens(tok, t)), T);
  assert(windows.length > 20);
  assertEquals(batches.length, Math.ceil(windows.length / B));
  for (let w = 0; w < windows.length; w++) {
    const b = batches[Math.floor(w / B)];
    const o = (w % B) * T;
    assertEquals(Array.from(b.ids.subarray(o, o + T)), Array.from(windows[w].subarray(0, T)));
    assertEquals(Array.from(b.targets.subarray(o, o + T)), Array.from(windows[w].subarray(1)));
    assertEquals(Array.from(b.mask.subarray(o, o + T)), new Array(T).fill(1));
  }
  // The last batch is filled up with rows of pad at mask 0.
  const last = batches[batches.length - 1];
  const rows = windows.length % B || B;
  assertEquals(Array.from(last.mask.subarray(rows * T)), new Array((B - rows) * T).fill(0));
  assertEquals(Array.from(last.ids.subarray(rows * T)), new Array((B - rows) * T).fill(tok.padId));
  assertEquals(await stream.next(), undefined);
  assertEquals(stream.stats.records, 95);
  assertEquals(stream.stats.epoch, 1);
});

Deno.test("epochs: the stream loops with the token stream continuing across the epoch boundary", async () => {
  const T = 16;
  const opts = (maxEpochs?: number): DataStreamOptions => ({
    data: corpus.pretrain,
    kind: "pretrain",
    tokenizer: tok,
    batchSize: 1,
    seqLen: T,
    maxEpochs,
  });
  const docs = corpus.pretrainTexts.flat().map((t) => documentTokens(tok, t));
  const twoEpochs = packDocuments([...docs, ...docs], T);
  const s2 = await DataStream.open(opts(2));
  const got = await drain(s2);
  assertEquals(got.length, twoEpochs.length);
  assertEquals(
    got.map((b) => Array.from(b.ids)),
    twoEpochs.map((w) => Array.from(w.subarray(0, T))),
  );
  // Without maxEpochs it does not stop, and the epoch counter moves on.
  const forever = await DataStream.open(opts());
  await take(forever, twoEpochs.length * 2);
  assert(forever.stats.epoch >= 3, `epoch ${forever.stats.epoch}`);
  forever.close();
});

Deno.test("SFT stream: one conversation per row, targets and mask shifted together; bad lines and no-target conversations counted", async () => {
  const T = 64;
  const stream = await DataStream.open({
    data: corpus.sft,
    kind: "sft",
    tokenizer: tok,
    batchSize: 4,
    seqLen: T,
    maxEpochs: 1,
    skipBadLines: true,
  });
  const first = (await stream.next())!;
  const conv = conversations(30, 4)[0] as Parameters<typeof assistantMask>[1];
  const { ids, mask } = assistantMask(tok, conv);
  const n = Math.min(ids.length, T + 1);
  const row = (a: ArrayLike<number>) => Array.from(a).slice(0, T);
  const padTo = (a: number[], v: number) => [...a, ...new Array(T + 1 - a.length).fill(v)];
  const fullIds = padTo(ids.slice(0, n), tok.padId);
  const fullMask = padTo(mask.slice(0, n), 0);
  assertEquals(row(first.ids), fullIds.slice(0, T));
  assertEquals(row(first.targets), fullIds.slice(1));
  assertEquals(row(first.mask), fullMask.slice(1));
  const rest = await drain(stream);
  assertEquals(1 + rest.length, Math.ceil(50 / 4));
  assertEquals(stream.stats.skippedLines, 1);
  assertEquals(stream.stats.skippedConversations, 1);
  assertEquals(stream.stats.records, 51);
});

Deno.test("trainedRowLength: up to the last trained token of the longest conversation, in steps of 16, at most seqLen", async () => {
  const convs = conversations(30, 4);
  // A conversation whose last turn is the user's: its tail trains nothing, so
  // it needs only the tokens up to the end of its assistant turn.
  convs.push([
    { role: "user", content: "hi" },
    { role: "assistant", content: "ok" },
    { role: "user", content: Array.from({ length: 200 }, (_, i) => WORDS[i % 10]).join(" ") },
  ]);
  const file = `${corpus.dir}/fit.jsonl`;
  await Deno.writeTextFile(
    file,
    convs.map((c) => JSON.stringify({ conversations: c })).join("\n") + "\n",
  );
  // The expectation from the masks themselves: target t is token t + 1, so a
  // conversation whose last trained token is token j needs rows of j tokens.
  let need = 0;
  for (const c of convs) {
    const { mask } = assistantMask(tok, c as Parameters<typeof assistantMask>[1]);
    need = Math.max(need, mask.lastIndexOf(1));
  }
  assert(need > 16 && need < 200, `the longest conversation needs ${need} tokens`);
  const opts: DataStreamOptions = {
    data: [file],
    kind: "sft",
    tokenizer: tok,
    batchSize: 4,
    seqLen: 512,
  };
  assertEquals(await trainedRowLength(opts), Math.ceil(need / 16) * 16);
  assertEquals(await trainedRowLength(opts, 1), need);
  // Cut rows need all of seqLen; random augmentations cannot be bounded by a pass.
  assertEquals(await trainedRowLength({ ...opts, seqLen: 16 }), 16);
  const augment = { systemRatio: 0.5, systemPrompts: MINIMIND_SYSTEM_PROMPTS, emptyThinkKeep: 0 };
  assertEquals(await trainedRowLength({ ...opts, augment }), 512);
});

Deno.test("without skipBadLines a bad line stops the stream with file:line", async () => {
  const stream = await DataStream.open({
    data: corpus.sft,
    kind: "sft",
    tokenizer: tok,
    batchSize: 8,
    seqLen: 64,
  });
  await assertRejects(() => drain(stream), UserError, `${corpus.dir}/s1.jsonl:6: not valid JSON`);
});

Deno.test("shuffle: the same seed gives the same batches, another seed others; SFT rows are a permutation", async () => {
  const opts = (seed: number): DataStreamOptions => ({
    data: corpus.sft,
    kind: "sft",
    tokenizer: tok,
    batchSize: 5,
    seqLen: 48,
    seed,
    shuffleBuffer: 16,
    maxEpochs: 1,
    skipBadLines: true,
  });
  const a = await drain(await DataStream.open(opts(7)));
  const b = await drain(await DataStream.open(opts(7)));
  const c = await drain(await DataStream.open(opts(8)));
  const plain = await drain(await DataStream.open({ ...opts(7), shuffleBuffer: 0 }));
  assertEquals(a, b);
  assertNotEquals(a.map((x) => x.ids), c.map((x) => x.ids));
  assertNotEquals(a.map((x) => x.ids), plain.map((x) => x.ids));
  const rowsOf = (bs: Batch[]) =>
    bs.flatMap((x) =>
      Array.from(
        { length: x.B },
        (_, r) => Array.from(x.ids.subarray(r * x.T, (r + 1) * x.T)).join(","),
      )
    ).filter((r) => !/^(0,)*0$/.test(r)).sort();
  assertEquals(rowsOf(a), rowsOf(plain));
  assertEquals(rowsOf(c), rowsOf(plain));
});

Deno.test("resume: pretrain JSONL (.jsonl, .jsonl.gz, BOM/CRLF) with file shuffle and a shuffle buffer, across epochs", async () => {
  const opts: DataStreamOptions = {
    data: corpus.pretrain,
    kind: "pretrain",
    tokenizer: tok,
    batchSize: 2,
    seqLen: 24,
    seed: 3,
    shuffleBuffer: 8,
  };
  // One epoch is about 60 batches here; k reaches into the second and third.
  for (const k of [0, 1, 7, 33, 61, 130]) await checkResume(opts, k, 12);
});

Deno.test("resume: pretrain with no shuffle (mid-document positions), and with maxEpochs near the end", async () => {
  const opts: DataStreamOptions = {
    data: corpus.pretrain,
    kind: "pretrain",
    tokenizer: tok,
    batchSize: 3,
    seqLen: 40,
    maxEpochs: 1,
  };
  for (const k of [2, 5, 11]) await checkResume(opts, k, 50);
});

Deno.test("resume: SFT JSONL with skipped bad lines and conversations; counters continue", async () => {
  const opts: DataStreamOptions = {
    data: corpus.sft,
    kind: "sft",
    tokenizer: tok,
    batchSize: 3,
    seqLen: 40,
    seed: 11,
    shuffleBuffer: 6,
    skipBadLines: true,
  };
  for (const k of [0, 4, 9, 20]) await checkResume(opts, k, 10);
});

Deno.test("token shards: same batches as the JSONL they came from, and resume", async () => {
  const pre = `${corpus.dir}/shards_pretrain`;
  await prepareShards({
    tokenizer: tok,
    files: corpus.pretrain,
    out: pre,
    kind: "pretrain",
    shardTokens: 300,
  });
  const sft = `${corpus.dir}/shards_sft`;
  await prepareShards({
    tokenizer: tok,
    files: corpus.sft,
    out: sft,
    kind: "sft",
    shardTokens: 500,
    skipBadLines: true,
  });
  const base = { tokenizer: tok, batchSize: 2, seqLen: 32, maxEpochs: 2 };
  const fromJsonl = await drain(
    await DataStream.open({ ...base, data: corpus.pretrain, kind: "pretrain" }),
  );
  const shardStream = await DataStream.open({ ...base, data: [pre], kind: "pretrain" });
  assert(shardStream.manifests[0].shards.length > 3, "several shards");
  assertEquals(await drain(shardStream), fromJsonl);
  const sftJsonl = await drain(
    await DataStream.open({ ...base, data: corpus.sft, kind: "sft", skipBadLines: true }),
  );
  assertEquals(await drain(await DataStream.open({ ...base, data: [sft], kind: "sft" })), sftJsonl);

  const shuffled = { ...base, seed: 5, shuffleBuffer: 8, maxEpochs: undefined };
  for (const k of [0, 3, 17, 40]) {
    await checkResume({ ...shuffled, data: [pre], kind: "pretrain" }, k, 15);
    await checkResume({ ...shuffled, data: [sft], kind: "sft" }, k, 15);
  }
  // Without a tokenizer (the shards carry the ids) it reads the same.
  const noTok = await DataStream.open({
    ...base,
    tokenizer: undefined,
    data: [pre],
    kind: "pretrain",
  });
  assertEquals(await drain(noTok), fromJsonl);
});

Deno.test("token shards: wrong kind or another tokenizer is a UserError", async () => {
  const out = `${corpus.dir}/shards_kind`;
  await prepareShards({ tokenizer: tok, files: [corpus.pretrain[0]], out, kind: "pretrain" });
  const base = { batchSize: 1, seqLen: 8, data: [out] };
  await assertRejects(
    () => DataStream.open({ ...base, kind: "sft", tokenizer: tok }),
    UserError,
    "holds pretrain shards, but this run trains sft",
  );
  await assertRejects(
    () => DataStream.open({ ...base, kind: "pretrain", tokenizer: defaultTokenizer() }),
    UserError,
    "was prepared with a different tokenizer",
  );
});

Deno.test("resume: a position from other settings or changed data is refused with the reason", async () => {
  const dir = await Deno.makeTempDir({ prefix: "data_stream_test_pos_" });
  await Deno.copyFile(corpus.pretrain[0], `${dir}/a.jsonl`);
  const opts: DataStreamOptions = {
    data: [`${dir}/a.jsonl`],
    kind: "pretrain",
    tokenizer: tok,
    batchSize: 2,
    seqLen: 16,
    seed: 1,
    shuffleBuffer: 4,
  };
  const s = await DataStream.open(opts);
  await take(s, 3);
  const pos = s.position();
  s.close();
  await assertRejects(
    () => DataStream.open({ ...opts, seed: 2 }, pos),
    UserError,
    "seed was 1 when it was saved and is 2 now",
  );
  await assertRejects(
    () => DataStream.open({ ...opts, seqLen: 32 }, pos),
    UserError,
    "seqLen was 16",
  );
  await Deno.writeTextFile(`${dir}/a.jsonl`, '{"text": "more"}\n', { append: true });
  await assertRejects(
    () => DataStream.open(opts, pos),
    UserError,
    "resume with the same, unchanged data",
  );
  await Deno.remove(dir, { recursive: true });
});

Deno.test("empty or too-small data is a UserError that says so", async () => {
  const dir = await Deno.makeTempDir({ prefix: "data_stream_test_empty_" });
  await Deno.writeTextFile(`${dir}/empty.jsonl`, "\n\n");
  await Deno.writeTextFile(`${dir}/bad.jsonl`, "{oops\n[1]\n");
  await Deno.writeTextFile(`${dir}/tiny.jsonl`, '{"text": "hi"}\n');
  await Deno.writeTextFile(
    `${dir}/noanswer.jsonl`,
    '{"conversations": [{"role": "user", "content": "hello?"}]}\n',
  );
  const base = { tokenizer: tok, batchSize: 2, seqLen: 16 };
  await assertRejects(
    async () =>
      await (await DataStream.open({ ...base, kind: "pretrain", data: [`${dir}/empty.jsonl`] }))
        .next(),
    UserError,
    `no records in ${dir}/empty.jsonl: the training data is empty`,
  );
  await Deno.writeTextFile(`${dir}/zero.jsonl`, "");
  await assertRejects(
    async () =>
      await (await DataStream.open({ ...base, kind: "sft", data: [`${dir}/zero.jsonl`] })).next(),
    UserError,
    `no records in ${dir}/zero.jsonl: the training data is empty`,
  );
  await assertRejects(
    async () =>
      await (await DataStream.open({
        ...base,
        kind: "pretrain",
        data: [`${dir}/bad.jsonl`],
        skipBadLines: true,
      })).next(),
    UserError,
    "every line was bad and skipped (2)",
  );
  await assertRejects(
    async () =>
      await (await DataStream.open({ ...base, kind: "pretrain", data: [`${dir}/tiny.jsonl`] }))
        .next(),
    UserError,
    "fewer than one window of seq_len + 1 = 17",
  );
  await assertRejects(
    async () =>
      await (await DataStream.open({ ...base, kind: "sft", data: [`${dir}/noanswer.jsonl`] }))
        .next(),
    UserError,
    "no conversation has an assistant token",
  );
  await assertRejects(
    () =>
      DataStream.open({
        ...base,
        tokenizer: undefined,
        kind: "pretrain",
        data: [`${dir}/tiny.jsonl`],
      }),
    UserError,
    "JSONL training data needs a tokenizer",
  );
  await Deno.remove(dir, { recursive: true });
});

Deno.test("packing pad: one document per row (MiniMind's PretrainDataset), JSONL and shards alike, resume exact", async () => {
  const T = 12;
  const docs = corpus.pretrainTexts.flat().map((t) => documentTokens(tok, t));
  const stream = await DataStream.open({
    data: corpus.pretrain,
    kind: "pretrain",
    tokenizer: tok,
    batchSize: 1,
    seqLen: T,
    maxEpochs: 1,
    packing: "pad",
  });
  const rows = await drain(stream);
  assertEquals(rows.length, docs.length, "one row per document");
  let cut = 0;
  for (const [i, b] of rows.entries()) {
    const d = docs[i];
    // MiniMind: text cut to max_length - 2 = T - 1 tokens, bos ... eos, then pads.
    const row = d.length > T + 1 ? [...d.slice(0, T), d[d.length - 1]] : d;
    if (d.length > T + 1) cut++;
    const padded = [...row, ...new Array(T + 1 - row.length).fill(tok.padId)];
    assertEquals([...b.ids], padded.slice(0, T), `row ${i}: inputs`);
    assertEquals([...b.targets], padded.slice(1), `row ${i}: targets`);
    // Targets are the document's tokens after bos, eos included; pads are never targets.
    assertEquals([...b.mask], padded.slice(1).map((_, j) => (j + 1 < row.length ? 1 : 0)));
    assertEquals(row[0], tok.bosId);
    assertEquals(row[row.length - 1], tok.eosId);
  }
  assert(cut > 0 && cut < docs.length, "some documents cut, some padded");

  const pre = `${corpus.dir}/shards_pad`;
  await prepareShards({
    tokenizer: tok,
    files: corpus.pretrain,
    out: pre,
    kind: "pretrain",
    shardTokens: 200,
  });
  const opts = { tokenizer: tok, batchSize: 3, seqLen: T, maxEpochs: 1, packing: "pad" } as const;
  const fromJsonl = await drain(
    await DataStream.open({ ...opts, data: corpus.pretrain, kind: "pretrain" }),
  );
  assertEquals(
    await drain(await DataStream.open({ ...opts, data: [pre], kind: "pretrain" })),
    fromJsonl,
  );
  const shuffled = { ...opts, seed: 3, shuffleBuffer: 7, maxEpochs: undefined };
  for (const k of [0, 5, 31, 70]) {
    await checkResume({ ...shuffled, data: corpus.pretrain, kind: "pretrain" }, k, 12);
    await checkResume({ ...shuffled, data: [pre], kind: "pretrain" }, k, 12);
  }
  // A position saved with packing is refused by a stream that pads, and the other way round.
  const packed = await DataStream.open({
    ...shuffled,
    data: corpus.pretrain,
    kind: "pretrain",
    packing: "pack",
  });
  await take(packed, 2);
  const saved = packed.position();
  packed.close();
  await assertRejects(
    () => DataStream.open({ ...shuffled, data: corpus.pretrain, kind: "pretrain" }, saved),
    UserError,
    'packing was "pack" when it was saved and is "pad" now',
  );
});

Deno.test("skipBadLines counts each bad line once however often the data is re-read, and names the first", async () => {
  // The reported case: 8 lines, one bad, a shuffle buffer far larger than the data
  // (filling it reads the file again and again) used to report "skipped 243".
  const path = `${corpus.dir}/eight.jsonl`;
  const lines = pretrainDocs(8, 9).map((text) => JSON.stringify({ text }));
  lines[4] = '{"text": 5}';
  await Deno.writeTextFile(path, lines.join("\n") + "\n");
  const opts: DataStreamOptions = {
    data: [path],
    kind: "pretrain",
    tokenizer: tok,
    batchSize: 4,
    seqLen: 8,
    seed: 1,
    shuffleBuffer: 1000,
    skipBadLines: true,
  };
  const stream = await DataStream.open(opts);
  await take(stream, 3);
  assert(stream.stats.epoch > 5, "the buffer was filled over many epochs");
  assertEquals(stream.stats.skippedLines, 1);
  assertEquals(stream.stats.badLines, [`${path}:5`]);
  stream.close();
  await checkResume(opts, 2, 4);

  // Many bad lines: all counted, the first five named, in file order.
  const many = `${corpus.dir}/many_bad.jsonl`;
  const text = Array.from(
    { length: 20 },
    (_, i) => i % 3 === 1 ? "{bad" : JSON.stringify({ text: `doc ${i} alpha beta gamma` }),
  );
  await Deno.writeTextFile(many, text.join("\n") + "\n");
  const s2 = await DataStream.open({ ...opts, data: [many] });
  await take(s2, 2);
  assertEquals(s2.stats.skippedLines, 7);
  assertEquals(s2.stats.badLines, [2, 5, 8, 11, 14].map((n) => `${many}:${n}`));
  s2.close();
});

/** Batches and the position after each, for the workers comparison. */
async function walk(opts: DataStreamOptions, n: number, from?: DataPosition) {
  const stream = await DataStream.open(opts, from);
  const out: { batch: Batch; position: DataPosition }[] = [];
  try {
    for (let i = 0; i < n; i++) {
      const batch = await stream.next();
      if (!batch) break;
      out.push({ batch, position: JSON.parse(JSON.stringify(stream.position())) });
    }
    return { out, stats: stream.stats };
  } finally {
    stream.close();
  }
}

Deno.test("tokenizer workers: the same batches, positions and counts as tokenizing here; positions resume either way", async () => {
  const cases: DataStreamOptions[] = [
    {
      data: corpus.pretrain,
      kind: "pretrain",
      tokenizer: tok,
      batchSize: 2,
      seqLen: 24,
      seed: 3,
      shuffleBuffer: 8,
    },
    {
      data: corpus.sft,
      kind: "sft",
      tokenizer: tok,
      batchSize: 3,
      seqLen: 40,
      seed: 11,
      shuffleBuffer: 6,
      skipBadLines: true,
      augment: { systemRatio: 0.5, systemPrompts: MINIMIND_SYSTEM_PROMPTS, emptyThinkKeep: 0.5 },
    },
  ];
  for (const opts of cases) {
    // Past the first epoch (about 60 pretrain / 17 SFT batches), so file ends and epochs are crossed.
    const here = await walk(opts, 140);
    const workers = await walk({ ...opts, tokenizeWorkers: 2 }, 140);
    assertEquals(workers.out.length, here.out.length, `${opts.kind}: batch count`);
    for (let i = 0; i < here.out.length; i++) {
      assertEquals(
        workers.out[i],
        here.out[i],
        `${opts.kind}: batch ${i} and the position after it`,
      );
    }
    assertEquals(workers.stats, here.stats, `${opts.kind}: counts`);
    for (const k of [0, 5, 37]) {
      // A position saved with workers, resumed without, and the other way round.
      const a = await walk(opts, 10, workers.out[k].position);
      const b = await walk({ ...opts, tokenizeWorkers: 1 }, 10, here.out[k].position);
      for (let i = 0; i < 10; i++) {
        assertEquals(a.out[i].batch, here.out[k + 1 + i].batch, `${opts.kind}: resume at ${k}`);
        assertEquals(b.out[i].batch, here.out[k + 1 + i].batch, `${opts.kind}: resume at ${k}`);
      }
    }
    // Saved and resumed with workers: batches, counts and positions (checkResume).
    for (const k of [3, 20]) await checkResume({ ...opts, tokenizeWorkers: 2 }, k, 10);
  }
});

Deno.test("tokenizer workers: a bad line met while reading ahead stops the stream with file:line", async () => {
  const stream = await DataStream.open({
    data: corpus.sft,
    kind: "sft",
    tokenizer: tok,
    batchSize: 8,
    seqLen: 64,
    tokenizeWorkers: 2,
  });
  try {
    // s0 (30 good records) comes first: its rows are handed out before the error.
    let rows = 0;
    await assertRejects(
      async () => {
        while (await stream.next()) rows += 8;
      },
      UserError,
      `${corpus.dir}/s1.jsonl:6: not valid JSON`,
    );
    assert(rows >= 32, `rows before the error: ${rows}`);
  } finally {
    stream.close();
  }
});
