/**
 * `trainer tokenizer train`: a byte-level BPE tokenizer from JSONL data,
 * written as a Hugging Face tokenizer directory.
 */
import {
  type CommandSpec,
  flagOption,
  listOption,
  numberOption,
  type ParsedArgs,
  stringOption,
} from "./args.ts";
import { UsageError } from "../util/errors.ts";
import { trainTokenizerOnJsonl, writeTokenizerFiles } from "../data/bpe.ts";

/** The `tokenizer train` command. */
export const tokenizerTrainCommand: CommandSpec = {
  name: "tokenizer train",
  summary: "Train a byte-level BPE tokenizer on JSONL text",
  usage: "--data PATH... --vocab-size N --out DIR [options]",
  description: `
Reads {"text": ...} lines (pretraining data) and {"conversations": [...]} lines
(SFT data: every turn's content is used), streamed line by line, and learns
byte-level BPE merges as Hugging Face tokenizers and MiniMind do. Writes
tokenizer.json and tokenizer_config.json into DIR: special tokens
<|endoftext|> (0, pad), <|im_start|> (1, bos), <|im_end|> (2, eos), a ChatML
chat template; loadable by this trainer, transformers and tokenizers.`,
  options: {
    "data": {
      type: "string",
      multiple: true,
      valueName: "PATH",
      help: "JSONL file(s) (.jsonl or .jsonl.gz) or directories of them",
    },
    "vocab-size": {
      type: "string",
      valueName: "N",
      help: "vocabulary size, special tokens and 256 byte symbols included (default 6400)",
    },
    "min-frequency": {
      type: "string",
      valueName: "N",
      help: "never merge a pair seen fewer times (default 2)",
    },
    "max-token-length": {
      type: "string",
      valueName: "BYTES",
      help: "never make a token longer than this many UTF-8 bytes (default: no limit)",
    },
    "max-length": {
      type: "string",
      valueName: "N",
      help: "model_max_length written to tokenizer_config.json (default 32768)",
    },
    "out": { type: "string", valueName: "DIR", help: "output directory (created if needed)" },
    "quiet": { type: "boolean", short: "q", help: "no progress lines on stderr" },
  },
  config: true,
  async run(args: ParsedArgs): Promise<number> {
    const data = listOption(args, "data");
    if (data.length === 0) throw new UsageError("--data is required (one or more JSONL files)");
    const out = stringOption(args, "out");
    if (out === undefined) throw new UsageError("--out DIR is required");
    const vocabSize = numberOption(args, "vocab-size", 6400, { integer: true, min: 259 });
    const minFrequency = numberOption(args, "min-frequency", 2, { integer: true, min: 1 });
    const maxTokenLength = numberOption(args, "max-token-length", Infinity, {
      integer: true,
      min: 2,
    });
    const modelMaxLength = numberOption(args, "max-length", 32768, { integer: true, min: 1 });
    const quiet = flagOption(args, "quiet");
    const log = quiet ? undefined : (line: string) => console.error(line);
    const t0 = performance.now();
    const result = await trainTokenizerOnJsonl(data, {
      vocabSize,
      minFrequency,
      maxTokenLength,
      modelMaxLength,
      log,
    });
    await writeTokenizerFiles(out, result);
    const seconds = (performance.now() - t0) / 1000;
    if (!quiet) {
      if (result.vocabSize < vocabSize) {
        console.error(
          `tokenizer: the data ran out of pairs seen ${minFrequency}+ times: vocabulary is ` +
            `${result.vocabSize}, not ${vocabSize} (give more text or lower --min-frequency)`,
        );
      }
      console.error(
        `tokenizer: ${result.vocabSize} tokens (${result.merges} merges) from ` +
          `${(result.bytesRead / 1e6).toFixed(1)} MB in ${seconds.toFixed(1)} s -> ${out}`,
      );
    }
    return 0;
  },
};
