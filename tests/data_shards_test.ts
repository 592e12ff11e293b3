/** Token shards: binary round trip (uint16 and uint32), header layout, prepare, and damage. */
import { assert, assertEquals, assertRejects } from "./assert.ts";
import { TextTokenizer } from "../data/tokenizer.ts";
import {
  prepareShards,
  readShardManifest,
  SHARD_HEADER_BYTES,
  ShardFile,
  ShardWriter,
} from "../data/shards.ts";
import { documentTokens } from "../data/pretrain.ts";
import { assistantMask } from "../data/sft.ts";
import { DataStream } from "../data/stream.ts";
import { UserError } from "../util/errors.ts";
import { Rng } from "../util/random.ts";

const tok = await TextTokenizer.load("../shared/fixtures/minimind-tokenizer");

async function withDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "data_shards_test_" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

for (const vocabSize of [6400, 65536, 200_000]) {
  Deno.test(`ShardWriter/ShardFile round trip, vocab ${vocabSize} (${vocabSize <= 65536 ? "uint16" : "uint32"})`, () =>
    withDir(async (dir) => {
      const rng = new Rng(vocabSize);
      const docs = Array.from({ length: 50 }, () => {
        const n = 1 + rng.nextInt(3000); // some documents span the 64K-token write chunks
        return {
          ids: Array.from({ length: n }, () => rng.nextInt(vocabSize)),
          mask: Array.from({ length: n }, () => rng.nextInt(2)),
        };
      });
      docs[0].ids[0] = vocabSize - 1; // the largest id survives the narrow type
      const path = `${dir}/s.bin`;
      const w = await ShardWriter.create(path, { vocabSize, hasMask: true });
      for (const d of docs) await w.add(d.ids, d.mask);
      const header = await w.close();
      const total = docs.reduce((a, d) => a + d.ids.length, 0);
      const bpt = vocabSize <= 65536 ? 2 : 4;
      assertEquals(header, {
        version: 1,
        bytesPerToken: bpt,
        hasMask: true,
        tokens: total,
        documents: 50,
        vocabSize,
      });
      // Size: header, ids, mask, (documents + 1) uint64 offsets.
      assertEquals((await Deno.stat(path)).size, SHARD_HEADER_BYTES + total * (bpt + 1) + 8 * 51);
      // No temporary files are left.
      assertEquals([...Deno.readDirSync(dir)].map((e) => e.name), ["s.bin"]);
      const f = await ShardFile.open(path);
      assertEquals(f.header, header);
      const offsets = await f.readDocumentOffsets(0, 50);
      assertEquals(offsets[50], total);
      for (let i = 0; i < 50; i += 7) {
        const n = offsets[i + 1] - offsets[i];
        assertEquals(Array.from(await f.readTokens(offsets[i], n)), docs[i].ids);
        assertEquals(Array.from(await f.readMask(offsets[i], n)), docs[i].mask);
      }
      f.close();
    }));
}

Deno.test("shard header bytes: magic, version, widths and counts little-endian", () =>
  withDir(async (dir) => {
    const w = await ShardWriter.create(`${dir}/h.bin`, { vocabSize: 6400, hasMask: false });
    await w.add([1, 258, 2]);
    await w.add([1, 2]);
    await w.close();
    const bytes = await Deno.readFile(`${dir}/h.bin`);
    const dv = new DataView(bytes.buffer);
    assertEquals(new TextDecoder().decode(bytes.subarray(0, 8)), "TRNTOKS\0");
    assertEquals(
      [
        dv.getUint32(8, true),
        dv.getUint32(12, true),
        dv.getUint32(16, true),
        dv.getUint32(20, true),
      ],
      [1, 64, 2, 0],
    );
    assertEquals([dv.getBigUint64(24, true), dv.getBigUint64(32, true)], [5n, 2n]);
    assertEquals(dv.getUint32(40, true), 6400);
    // Tokens: 1, 258 (0x0102 -> bytes 02 01), 2, 1, 2; then offsets 0, 3, 5.
    assertEquals(Array.from(bytes.subarray(64, 74)), [1, 0, 2, 1, 2, 0, 1, 0, 2, 0]);
    assertEquals(
      [dv.getBigUint64(74, true), dv.getBigUint64(82, true), dv.getBigUint64(90, true)],
      [
        0n,
        3n,
        5n,
      ],
    );
  }));

Deno.test("a truncated or foreign shard is a UserError", () =>
  withDir(async (dir) => {
    const w = await ShardWriter.create(`${dir}/a.bin`, { vocabSize: 6400, hasMask: false });
    await w.add([1, 2, 3, 4]);
    await w.close();
    const bytes = await Deno.readFile(`${dir}/a.bin`);
    await Deno.writeFile(`${dir}/cut.bin`, bytes.subarray(0, bytes.length - 3));
    await assertRejects(() => ShardFile.open(`${dir}/cut.bin`), UserError, "truncated or damaged");
    await Deno.writeTextFile(
      `${dir}/text.bin`,
      '{"text": "not a shard, but a line long enough to fill a whole 64-byte header"}\n',
    );
    await assertRejects(() => ShardFile.open(`${dir}/text.bin`), UserError, "not a token shard");
  }));

Deno.test("prepareShards pretrain: documents as bos..eos in order, split across shards, manifest", () =>
  withDir(async (dir) => {
    const texts = Array.from({ length: 30 }, (_, i) => `document number ${i}: ` + "词".repeat(i));
    await Deno.writeTextFile(
      `${dir}/a.jsonl`,
      texts.map((text) => JSON.stringify({ text })).join("\n") + '\n{"text": 1}\n',
    );
    const progress = await prepareShards({
      tokenizer: tok,
      files: [`${dir}/a.jsonl`],
      out: `${dir}/out`,
      kind: "pretrain",
      shardTokens: 100,
      skipBadLines: true,
    });
    const docs = texts.map((t) => documentTokens(tok, t));
    const total = docs.reduce((a, d) => a + d.length, 0);
    assertEquals(progress.documents, 30);
    assertEquals(progress.tokens, total);
    assertEquals(progress.skippedLines, 1);
    const m = await readShardManifest(`${dir}/out`);
    assertEquals([m.kind, m.dtype, m.vocabSize, m.documents, m.tokens, m.skippedLines], [
      "pretrain",
      "uint16",
      6400,
      30,
      total,
      1,
    ]);
    assert(m.shards.length > 3, `${m.shards.length} shards`);
    const all: number[][] = [];
    for (const s of m.shards) {
      const f = await ShardFile.open(`${dir}/out/${s.file}`);
      assert(f.header.tokens <= 100 || f.header.documents === 1, "shard size bound");
      const off = await f.readDocumentOffsets(0, f.header.documents);
      for (let i = 0; i < f.header.documents; i++) {
        all.push(Array.from(await f.readTokens(off[i], off[i + 1] - off[i])));
      }
      f.close();
    }
    assertEquals(all, docs);
  }));

Deno.test("prepareShards SFT: ids + mask, cut to seq_len + 1, conversations with no target skipped", () =>
  withDir(async (dir) => {
    const convs = [
      [{ role: "user", content: "hi" }, { role: "assistant", content: "hello there" }],
      [{ role: "user", content: "only a question" }],
      [{ role: "system", content: "long system prompt ".repeat(20) }, {
        role: "user",
        content: "q",
      }, {
        role: "assistant",
        content: "a",
      }],
    ];
    await Deno.writeTextFile(
      `${dir}/s.jsonl`,
      convs.map((c) => JSON.stringify({ conversations: c })).join("\n"),
    );
    const p = await prepareShards({
      tokenizer: tok,
      files: [`${dir}/s.jsonl`],
      out: `${dir}/out`,
      kind: "sft",
      seqLen: 40,
    });
    assertEquals([p.documents, p.skippedConversations], [1, 2]);
    const m = await readShardManifest(`${dir}/out`);
    assertEquals([m.kind, m.seqLen], ["sft", 40]);
    const f = await ShardFile.open(`${dir}/out/${m.shards[0].file}`);
    const want = assistantMask(tok, convs[0] as Parameters<typeof assistantMask>[1]);
    assertEquals(Array.from(await f.readTokens(0, f.header.tokens)), want.ids);
    assertEquals(Array.from(await f.readMask(0, f.header.tokens)), want.mask);
    f.close();
  }));

Deno.test("prepareShards refuses a non-empty output directory and empty input", () =>
  withDir(async (dir) => {
    await Deno.writeTextFile(`${dir}/a.jsonl`, '{"text": "x"}\n');
    await prepareShards({
      tokenizer: tok,
      files: [`${dir}/a.jsonl`],
      out: `${dir}/out`,
      kind: "pretrain",
    });
    await assertRejects(
      () =>
        prepareShards({
          tokenizer: tok,
          files: [`${dir}/a.jsonl`],
          out: `${dir}/out`,
          kind: "pretrain",
        }),
      UserError,
      "already holds token shards",
    );
    await assertRejects(
      () =>
        prepareShards({ tokenizer: tok, files: [`${dir}/a.jsonl`], out: dir, kind: "pretrain" }),
      UserError,
      "is not empty",
    );
    await Deno.writeTextFile(`${dir}/e.jsonl`, "");
    await assertRejects(
      () =>
        prepareShards({
          tokenizer: tok,
          files: [`${dir}/e.jsonl`],
          out: `${dir}/o2`,
          kind: "pretrain",
        }),
      UserError,
      "the training data is empty",
    );
    // The failed run left no manifest, so the directory is not taken for shards.
    assertEquals([...Deno.readDirSync(`${dir}/o2`)].map((e) => e.name), []);
  }));

Deno.test("uint32 shards stream like uint16 ones", () =>
  withDir(async (dir) => {
    // A manifest written by hand around a uint32 shard: ids above 65535 survive the stream.
    const ids = Array.from({ length: 100 }, (_, i) => 70000 + i);
    const w = await ShardWriter.create(`${dir}/shard_00000.bin`, {
      vocabSize: 100000,
      hasMask: false,
    });
    await w.add(ids);
    await w.close();
    await Deno.writeTextFile(
      `${dir}/manifest.json`,
      JSON.stringify({
        format: "trainer-token-shards",
        version: 1,
        kind: "pretrain",
        vocabSize: 100000,
        bosId: 1,
        eosId: 2,
        padId: 0,
        tokenizerSha256: "0",
        dtype: "uint32",
        seqLen: null,
        documents: 1,
        tokens: 100,
        skippedLines: 0,
        skippedConversations: 0,
        shards: [{ file: "shard_00000.bin", tokens: 100, documents: 1 }],
        sources: [],
      }),
    );
    const s = await DataStream.open({
      data: [dir],
      kind: "pretrain",
      batchSize: 1,
      seqLen: 9,
      maxEpochs: 1,
    });
    const b = (await s.next())!;
    assertEquals(Array.from(b.ids), ids.slice(0, 9));
    assertEquals(Array.from(b.targets), ids.slice(1, 10));
  }));

Deno.test("prepareShards on worker threads writes the same shards as one thread", () =>
  withDir(async (dir) => {
    // 300 records: several 64-record chunks per worker, bad lines, SFT rows cut and skipped.
    const rng = new Rng(3);
    const texts = Array.from(
      { length: 300 },
      (_, i) => `文档 ${i} ` + "abc 数据 ".repeat(rng.nextInt(40)),
    );
    const lines = texts.map((text) => JSON.stringify({ text }));
    lines.splice(100, 0, "{broken");
    await Deno.writeTextFile(`${dir}/p.jsonl`, lines.join("\n"));
    const convs = Array.from({ length: 300 }, (_, i) => ({
      conversations: i % 7 === 0
        ? [{ role: "user", content: `q${i}` }]
        : [{ role: "user", content: `问题 ${i} ` + "x".repeat(rng.nextInt(80)) }, {
          role: "assistant",
          content: `回答 ${i}`,
        }],
    }));
    await Deno.writeTextFile(`${dir}/s.jsonl`, convs.map((c) => JSON.stringify(c)).join("\n"));
    for (const kind of ["pretrain", "sft"] as const) {
      const files = [kind === "pretrain" ? `${dir}/p.jsonl` : `${dir}/s.jsonl`];
      const common = { tokenizer: tok, files, kind, shardTokens: 2000, skipBadLines: true };
      const seqLen = kind === "sft" ? 40 : undefined;
      const one = await prepareShards({ ...common, seqLen, out: `${dir}/${kind}1` });
      const three = await prepareShards({ ...common, seqLen, out: `${dir}/${kind}3`, workers: 3 });
      assertEquals({ ...three, seconds: 0 }, { ...one, seconds: 0 });
      const m = await readShardManifest(`${dir}/${kind}1`);
      assert(m.shards.length > 1);
      for (const s of m.shards) {
        assertEquals(
          await Deno.readFile(`${dir}/${kind}3/${s.file}`),
          await Deno.readFile(`${dir}/${kind}1/${s.file}`),
          `${kind} ${s.file}`,
        );
      }
    }
  }));
