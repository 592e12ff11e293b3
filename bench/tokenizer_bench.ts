/**
 * Tokenizer throughput: encoding with MiniMind's tokenizer, and BPE training
 * at MiniMind's vocabulary (6400) and at the default tokenizer's (2048), in MB
 * of UTF-8 text per second. CPU only: no adapter involved.
 *
 *     deno run -A bench/tokenizer_bench.ts
 */
import type { ThroughputRow } from "./harness.ts";
import { trainTokenizerOnTexts, WordCounter } from "../data/bpe.ts";
import { corpusTrainingTexts, embeddedCorpus } from "../data/corpus.ts";
import { TextTokenizer } from "../data/tokenizer.ts";
import { Rng } from "../util/random.ts";

const MINIMIND = new URL("../../shared/fixtures/minimind-tokenizer", import.meta.url);

function utf8Bytes(texts: string[]): number {
  const enc = new TextEncoder();
  let n = 0;
  for (const t of texts) n += enc.encode(t).length;
  return n;
}

/**
 * About `bytes` of varied text for BPE training: English-like words from
 * syllables and Chinese runs from a skewed character distribution, so that
 * pair counts have a long tail as in real corpora (the embedded corpus is too
 * repetitive to fill a 6400 vocabulary).
 */
export function generatedText(bytes: number, seed = 7): string[] {
  const rng = new Rng(seed);
  const syl = [
    "ka",
    "lo",
    "mi",
    "ren",
    "tas",
    "vo",
    "qui",
    "zen",
    "dor",
    "fa",
    "li",
    "mu",
    "ne",
    "pra",
    "sto",
    "the",
    "ing",
    "ed",
  ];
  const han =
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单风切打白教速花带安场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且究观越织装影算低持音众书布复容儿须际商非验连断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府称太准精值号率族维划选标写存候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包火住调满县局照参红细引听该铁价严";
  const out: string[] = [];
  let n = 0;
  while (n < bytes) {
    const parts: string[] = [];
    const words = 20 + rng.nextInt(60);
    for (let i = 0; i < words; i++) {
      if (rng.nextFloat() < 0.5) {
        let w = "";
        for (let j = 1 + rng.nextInt(3); j > 0; j--) w += syl[rng.nextInt(syl.length)];
        parts.push(" " + w + (rng.nextFloat() < 0.1 ? "." : ""));
      } else {
        let w = "";
        for (let j = 2 + rng.nextInt(8); j > 0; j--) {
          w += han[Math.floor(han.length * rng.nextFloat() ** 2)];
        }
        parts.push(w + (rng.nextFloat() < 0.3 ? "，" : ""));
      }
    }
    const text = parts.join("");
    n += text.length * 2; // about 2 bytes per UTF-16 unit for this half-Chinese mix
    out.push(text);
  }
  return out;
}

function timed<T>(fn: () => T): { result: T; seconds: number } {
  const t0 = performance.now();
  const result = fn();
  return { result, seconds: (performance.now() - t0) / 1000 };
}

/** Runs the tokenizer benchmarks and returns their rows. */
export async function benchTokenizer(): Promise<ThroughputRow[]> {
  const rows: ThroughputRow[] = [];
  const corpus = embeddedCorpus();
  const texts = corpusTrainingTexts(corpus);
  const corpusMB = utf8Bytes(texts) / 1e6;

  const minimind = await TextTokenizer.load(decodeURIComponent(MINIMIND.pathname));
  minimind.encode(texts[0]); // warm up the JIT and the tokenizer's caches
  const enc = timed(() => {
    let n = 0;
    for (const t of texts) n += minimind.encode(t).length;
    return n;
  });
  rows.push({
    name: "encode, MiniMind tokenizer, embedded corpus",
    value: corpusMB / enc.seconds,
    unit: "MB/s",
  });
  rows.push({
    name: "encode, MiniMind tokenizer, embedded corpus",
    value: enc.result / enc.seconds,
    unit: "tokens/s",
  });

  const count = timed(() => {
    const c = new WordCounter();
    for (const t of texts) c.add(t);
    return c.counts.size;
  });
  rows.push({
    name: "BPE pre-tokenize + count, embedded corpus",
    value: corpusMB / count.seconds,
    unit: "MB/s",
  });

  const small = timed(() => trainTokenizerOnTexts(texts, { vocabSize: 2048, maxTokenLength: 16 }));
  rows.push({
    name: "BPE train, vocab 2048, embedded corpus (default tokenizer)",
    value: corpusMB / small.seconds,
    unit: "MB/s",
  });

  const big = generatedText(8e6);
  const bigMB = utf8Bytes(big) / 1e6;
  const large = timed(() => trainTokenizerOnTexts(big, { vocabSize: 6400 }));
  rows.push({
    name: `BPE train, vocab 6400, ${bigMB.toFixed(1)} MB generated en/zh text`,
    value: bigMB / large.seconds,
    unit: "MB/s",
  });
  rows.push({
    name: `BPE train, vocab 6400, ${bigMB.toFixed(1)} MB generated en/zh text`,
    value: large.seconds,
    unit: "s",
  });
  return rows;
}

if (import.meta.main) {
  for (const r of await benchTokenizer()) {
    console.log(`${r.name.padEnd(68)} ${r.value.toFixed(2).padStart(12)} ${r.unit}`);
  }
}
