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
  DEFAULT_TOKENIZER_VOCAB_SIZE,
  embeddedCorpus,
} from "../corpus.ts";

/** The default tokenizer's files as the trainer makes them now. */
export function trainDefaultTokenizer(): TokenizerFiles {
  const texts = corpusTrainingTexts(embeddedCorpus(DEFAULT_CORPUS_SEED));
  // A 16-byte cap (5 Chinese characters): on this small, repetitive corpus an
  // uncapped BPE fuses whole template clauses, values included, into tokens.
  return trainTokenizerOnTexts(texts, {
    vocabSize: DEFAULT_TOKENIZER_VOCAB_SIZE,
    minFrequency: 2,
    maxTokenLength: 16,
  });
}

/** The directory of the committed files (this file's directory). */
export const DEFAULT_TOKENIZER_DIR = new URL(".", import.meta.url);

if (import.meta.main) {
  const dir = decodeURIComponent(DEFAULT_TOKENIZER_DIR.pathname);
  await writeTokenizerFiles(dir, trainDefaultTokenizer());
  console.log(`wrote ${dir}tokenizer.json and ${dir}tokenizer_config.json`);
}
