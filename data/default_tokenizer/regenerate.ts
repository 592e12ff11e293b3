/**
 * Remakes the default tokenizer's committed files from the embedded corpus:
 *
 *     deno run -A data/default_tokenizer/regenerate.ts
 *
 * `tests/corpus_test.ts` checks that the committed files equal what this
 * produces, so run it (and commit the result) whenever the corpus generator or
 * the BPE trainer changes.
 */
import { type TokenizerFiles, trainTokenizerOnTexts, writeTokenizerFiles } from "../bpe.ts";
import {
  corpusTrainingTexts,
  DEFAULT_CORPUS_SEED,
  DEFAULT_TOKENIZER_MAX_TOKEN_BYTES,
  DEFAULT_TOKENIZER_VOCAB_SIZE,
  embeddedCorpus,
} from "../corpus.ts";

/** The default tokenizer's files as the trainer makes them now. */
export function trainDefaultTokenizer(): TokenizerFiles {
  const texts = corpusTrainingTexts(embeddedCorpus(DEFAULT_CORPUS_SEED));
  // A 6-byte cap (2 Chinese characters): on this small, repetitive corpus a
  // longer cap lets BPE fuse a clause with its value into one token (with 16
  // bytes "萨科吃苔藓", "the sako eats moss", was one), and pretraining + SFT
  // answered 25% of the held-out questions against 64% with this cap
  // (docs/guide.md section 5; our reading: a fused fact is learnt as a token
  // of its own instead of on the name).
  // Under the cap, pairs seen at least twice run out at
  // DEFAULT_TOKENIZER_VOCAB_SIZE tokens: asking for more gives the same files.
  return trainTokenizerOnTexts(texts, {
    vocabSize: DEFAULT_TOKENIZER_VOCAB_SIZE,
    minFrequency: 2,
    maxTokenLength: DEFAULT_TOKENIZER_MAX_TOKEN_BYTES,
  });
}

/** The directory of the committed files (this file's directory). */
export const DEFAULT_TOKENIZER_DIR = new URL(".", import.meta.url);

if (import.meta.main) {
  const dir = decodeURIComponent(DEFAULT_TOKENIZER_DIR.pathname);
  await writeTokenizerFiles(dir, trainDefaultTokenizer());
  console.log(`wrote ${dir}tokenizer.json and ${dir}tokenizer_config.json`);
}
