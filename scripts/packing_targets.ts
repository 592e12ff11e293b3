/**
 * How many of a pretraining run's targets are real text under each packing:
 * reads the batches a run would read (same data, seed, shuffle buffer, batch
 * shape and step count as `trainer pretrain`'s defaults unless given) and
 * counts the targets at mask 1. Multiply a run's tokens/s by the share printed
 * here to get its useful targets per second (docs/guide.md, section 2).
 *
 *   deno run -A scripts/packing_targets.ts --data out/data/pretrain.jsonl --steps 150
 *   deno run -A scripts/packing_targets.ts --data F --seq-len 128 --batch-size 16 --tokenizer DIR
 */
import { parseArgs } from "node:util";
import { DataStream } from "../data/stream.ts";
import type { Packing } from "../data/pretrain.ts";
import { defaultTokenizer } from "../data/corpus.ts";
import { TextTokenizer } from "../data/tokenizer.ts";
import { TRAIN_DEFAULTS } from "../train/setup.ts";

const { values } = parseArgs({
  options: {
    data: { type: "string", multiple: true },
    tokenizer: { type: "string" },
    steps: { type: "string", default: String(TRAIN_DEFAULTS.pretrain.steps) },
    "batch-size": { type: "string", default: String(TRAIN_DEFAULTS.pretrain.batchSize) },
    "seq-len": { type: "string", default: String(TRAIN_DEFAULTS.pretrain.seqLen) },
    seed: { type: "string", default: String(TRAIN_DEFAULTS.seed) },
    "shuffle-buffer": { type: "string", default: String(TRAIN_DEFAULTS.shuffleBuffer) },
  },
});
if (!values.data?.length) throw new Error("--data FILE is required (pretrain JSONL)");
const tokenizer = values.tokenizer
  ? await TextTokenizer.load(values.tokenizer)
  : await defaultTokenizer();
const steps = Number(values.steps);
for (const packing of ["pack", "pad"] as Packing[]) {
  const stream = await DataStream.open({
    data: values.data,
    kind: "pretrain",
    tokenizer,
    batchSize: Number(values["batch-size"]),
    seqLen: Number(values["seq-len"]),
    seed: Number(values.seed),
    shuffleBuffer: Number(values["shuffle-buffer"]),
    packing,
  });
  let useful = 0;
  let all = 0;
  for (let s = 0; s < steps; s++) {
    const b = await stream.next();
    if (!b) break;
    all += b.mask.length;
    for (const m of b.mask) useful += m;
  }
  stream.close();
  console.log(
    `${packing}: ${steps} batches of ${values["batch-size"]} x ${values["seq-len"]}: ` +
      `${useful} of ${all} targets are text (${(100 * useful / all).toFixed(1)}%)`,
  );
}
