/**
 * Data pipeline throughput, on the CPU (no GPU involved):
 * - JSONL -> lines -> JSON -> MiniMind tokenizer -> packed batches: MB/s of JSONL;
 * - `data prepare` (JSONL -> token shards), on one thread and on worker threads: MB/s;
 * - the same corpus from token shards: tokens/s of batches.
 *
 * Run alone: `deno run -A bench/data_bench.ts [MB]` (default 4 MB of JSONL).
 */
import type { ThroughputRow } from "./harness.ts";
import { TextTokenizer } from "../data/tokenizer.ts";
import { DataStream } from "../data/stream.ts";
import { prepareShards } from "../data/shards.ts";
import { Rng } from "../util/random.ts";

const FIXTURE = new URL("../../shared/fixtures/minimind-tokenizer", import.meta.url).pathname;

const SYLLABLES = [
  "ta",
  "ken",
  "mo",
  "del",
  "lan",
  "gu",
  "age",
  "ing",
  "tion",
  "re",
  "con",
  "pro",
  "ex",
  "er",
  "in",
  "com",
  "de",
  "ver",
  "sa",
  "li",
  "ty",
  "num",
  "ber",
  "ra",
  "pi",
  "dly",
  "un",
  "der",
];
const HANZI = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动" +
  "同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实" +
  "加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重";

/** A sentence of made-up words: English-like syllable words, or Chinese characters with punctuation. */
function sentence(rng: Rng): string {
  const n = 4 + rng.nextInt(14);
  const words: string[] = [];
  if (rng.nextInt(2) === 0) {
    for (let i = 0; i < n; i++) {
      let w = "";
      for (let k = 1 + rng.nextInt(3); k > 0; k--) w += SYLLABLES[rng.nextInt(SYLLABLES.length)];
      words.push(w);
    }
    return words.join(" ") + ". ";
  }
  for (let i = 0; i < n; i++) {
    for (let k = 1 + rng.nextInt(2); k > 0; k--) words.push(HANZI[rng.nextInt(HANZI.length)]);
    if (rng.nextInt(6) === 0) words.push("，");
  }
  return words.join("") + "。";
}

/** Writes about `bytes` of pretrain JSONL (mixed English-like and Chinese text); returns its size. */
async function writeCorpus(path: string, bytes: number, seed: number): Promise<number> {
  const rng = new Rng(seed);
  const file = await Deno.open(path, { write: true, create: true, truncate: true });
  const enc = new TextEncoder();
  let written = 0;
  while (written < bytes) {
    const lines: string[] = [];
    for (let i = 0; i < 100; i++) {
      let text = "";
      for (let k = 2 + rng.nextInt(30); k > 0; k--) text += sentence(rng);
      lines.push(JSON.stringify({ text }));
    }
    const chunk = enc.encode(lines.join("\n") + "\n");
    let o = 0;
    while (o < chunk.length) o += await file.write(chunk.subarray(o));
    written += chunk.length;
  }
  file.close();
  return written;
}

/** Throughput of the JSONL reader + tokenizer + packer, and of token-shard streaming. */
export async function benchData(opts: { megabytes?: number } = {}): Promise<ThroughputRow[]> {
  const dir = await Deno.makeTempDir({ prefix: "data_bench_" });
  try {
    const tok = await TextTokenizer.load(FIXTURE);
    const size = (opts.megabytes ?? 4) * 1e6;
    const bytes = await writeCorpus(`${dir}/corpus.jsonl`, size, 1);
    // A second corpus for `data prepare`, so that it does not profit from the
    // tokenizer's word cache warmed by the first.
    await writeCorpus(`${dir}/corpus2.jsonl`, size, 2);
    const T = 512;
    const B = 16;

    /** JSONL -> batches through the training stream, tokenizing in `workers` threads (0: here). */
    const timeStream = async (file: string, workers: number) => {
      // A fresh tokenizer each time: no run profits from another's warm word cache.
      const fresh = await TextTokenizer.load(FIXTURE);
      const t0 = performance.now();
      const stream = await DataStream.open({
        data: [file],
        kind: "pretrain",
        tokenizer: fresh,
        batchSize: B,
        seqLen: T,
        maxEpochs: 1,
        tokenizeWorkers: workers,
      });
      let n = 0;
      while (await stream.next()) n++;
      stream.close();
      return { batches: n, seconds: (performance.now() - t0) / 1000 };
    };
    const { batches, seconds: jsonlSeconds } = await timeStream(`${dir}/corpus.jsonl`, 0);
    const streamWorkers: ThroughputRow[] = [];
    for (const w of [1, 2]) {
      const file = `${dir}/corpus_w${w}.jsonl`;
      const wBytes = await writeCorpus(file, size, 2 + w);
      const r = await timeStream(file, w);
      streamWorkers.push({
        name: `JSONL -> batches, ${w} tokenizer worker${w > 1 ? "s" : ""} (--data-workers)`,
        value: wBytes / 1e6 / r.seconds,
        unit: "MB/s",
      });
    }
    let t0 = performance.now();
    const prep = await prepareShards({
      tokenizer: tok,
      files: [`${dir}/corpus2.jsonl`],
      out: `${dir}/shards`,
      kind: "pretrain",
    });
    const prepSeconds = (performance.now() - t0) / 1000;

    // The same on worker threads (each with a cold tokenizer cache, like the run above).
    const workers = Math.min(8, navigator.hardwareConcurrency);
    t0 = performance.now();
    await prepareShards({
      tokenizer: tok,
      files: [`${dir}/corpus2.jsonl`],
      out: `${dir}/shards_parallel`,
      kind: "pretrain",
      workers,
    });
    const parallelSeconds = (performance.now() - t0) / 1000;

    // Several epochs so the read is long enough to time.
    const epochs = 5;
    t0 = performance.now();
    const shards = await DataStream.open({
      data: [`${dir}/shards`],
      kind: "pretrain",
      batchSize: B,
      seqLen: T,
      maxEpochs: epochs,
    });
    let shardBatches = 0;
    while (await shards.next()) shardBatches++;
    const shardSeconds = (performance.now() - t0) / 1000;

    return [
      {
        name: "JSONL -> MiniMind tokens -> batches",
        value: bytes / 1e6 / jsonlSeconds,
        unit: "MB/s",
      },
      {
        name: "JSONL -> MiniMind tokens -> batches",
        value: (batches * B * T) / jsonlSeconds,
        unit: "tokens/s",
      },
      ...streamWorkers,
      {
        name: "data prepare (JSONL -> token shards)",
        value: prep.bytes / 1e6 / prepSeconds,
        unit: "MB/s",
      },
      {
        name: `data prepare, ${workers} workers`,
        value: prep.bytes / 1e6 / parallelSeconds,
        unit: "MB/s",
      },
      {
        name: "token shards -> batches",
        value: (shardBatches * B * T) / shardSeconds,
        unit: "tokens/s",
      },
    ];
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

if (import.meta.main) {
  const mb = Deno.args[0] ? Number(Deno.args[0]) : undefined;
  for (const r of await benchData({ megabytes: mb })) {
    console.log(
      `${r.name.padEnd(40)} ${r.value.toFixed(r.value >= 100 ? 0 : 2).padStart(12)} ${r.unit}`,
    );
  }
}
