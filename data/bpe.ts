/**
 * Byte-level BPE training, the algorithm of GPT-2 and of Hugging Face
 * `tokenizers`' `BpeTrainer` as MiniMind uses it, writing the same
 * `tokenizer.json` + `tokenizer_config.json` pair.
 *
 * 1. Text is cut at special-token strings, then pre-tokenized with the GPT-2
 *    regex of the `ByteLevel` pre-tokenizer (`add_prefix_space: false`), and the
 *    pre-tokens ("words") are counted. Memory grows with distinct words, not
 *    with the corpus.
 * 2. Each word becomes its UTF-8 bytes, each byte a symbol of the 256-symbol
 *    GPT-2 alphabet (printable bytes stand for themselves, the others are moved
 *    to U+0100 and up, so every token is a printable string).
 * 3. Repeatedly, the most frequent adjacent pair of symbols (counted over words
 *    weighted by their frequency) becomes a new symbol, until the vocabulary
 *    has `vocabSize` entries. Ties go to the pair with the smaller
 *    (left id, right id), as in `tokenizers`.
 *
 * The merge loop never recounts: it keeps pair -> count, pair -> words that
 * may contain it, and a max-heap of (count, pair) whose stale entries are
 * corrected when popped (counts of existing pairs only fall; pairs that gain
 * are the new symbol's neighbours, pushed after each merge). A merge costs the
 * length of the words that contain the pair, not the size of the corpus.
 *
 * Vocabulary layout (ids): the special tokens first (`<|endoftext|>` 0 = pad,
 * `<|im_start|>` 1 = bos, `<|im_end|>` 2 = eos), then the 256 byte symbols
 * sorted by code point (as `tokenizers` sorts its initial alphabet), then one
 * id per merge in merge order.
 */
import { UserError } from "../util/errors.ts";
import { readJsonlLines, resolveDataPaths } from "./sources.ts";

/** The special tokens of trained tokenizers, in id order: pad, bos, eos (MiniMind's). */
export const SPECIAL_TOKENS: readonly string[] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/**
 * Plain ChatML: `<|im_start|>{role}\n{content}<|im_end|>\n` per message and,
 * with `add_generation_prompt`, the header `<|im_start|>assistant\n`.
 */
export const CHATML_TEMPLATE = "{%- for message in messages %}" +
  "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}" +
  "{%- endfor %}" +
  "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

/**
 * GPT-2's `bytes_to_unicode`: the character that stands for each byte. Bytes
 * that are printable Latin-1 (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) map to themselves;
 * the other 68 map to U+0100, U+0101, ... in byte order, so a space is `Ġ`.
 */
export function byteToUnicode(): string[] {
  const out: string[] = new Array(256);
  let n = 0;
  for (let b = 0; b < 256; b++) {
    const printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae);
    out[b] = String.fromCodePoint(printable ? b : 256 + n++);
  }
  return out;
}

// `\s` as Oniguruma (which `tokenizers` uses) defines it, Unicode White_Space;
// JavaScript's `\s` differs in U+0085 (absent) and U+FEFF (present).
const WS = "\\t-\\r \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";

/**
 * The GPT-2 pre-tokenization pattern of the `ByteLevel` pre-tokenizer:
 * contractions, letter runs, number runs, other-symbol runs (each with at most
 * one leading space), and whitespace runs that leave their last space to the
 * next word.
 */
export const PRETOKENIZE_PATTERN = new RegExp(
  `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^${WS}\\p{L}\\p{N}]+|[${WS}]+(?![^${WS}])|[${WS}]+`,
  "gu",
);

/** The pre-tokens of `text` (no special-token handling). */
export function preTokenize(text: string): string[] {
  return text.match(PRETOKENIZE_PATTERN) ?? [];
}

/** Options of BPE training. */
export interface BpeOptions {
  /** Final vocabulary size, special tokens and the 256 byte symbols included. */
  vocabSize: number;
  /** Pairs seen fewer times than this are never merged. Default 2. */
  minFrequency?: number;
  /**
   * Longest token, in bytes; longer merges are never made (as `max_token_length`
   * of `tokenizers`' trainer). Default: no limit. On small, repetitive corpora it
   * stops whole phrases from becoming single tokens.
   */
  maxTokenLength?: number;
  /** Called every few seconds with the number of merges done. */
  onProgress?: (mergesDone: number, mergesWanted: number) => void;
}

/** A trained byte-level BPE model. */
export interface BpeModel {
  /** Token strings by id (special tokens, byte symbols, merges). */
  vocab: string[];
  /** Merges in rank order, as pairs of token strings. */
  merges: [string, string][];
}

/**
 * Counts pre-tokens of texts. Special-token strings in a text are cut out (they
 * are single tokens, never merged into words), as `tokenizers` does when training.
 */
export class WordCounter {
  /** Pre-token -> occurrences. */
  readonly counts = new Map<string, number>();
  #special: RegExp | undefined;

  constructor(specialTokens: readonly string[] = SPECIAL_TOKENS) {
    const escaped = specialTokens.map((s) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"));
    this.#special = escaped.length > 0 ? new RegExp(escaped.join("|"), "g") : undefined;
  }

  /** Adds the pre-tokens of one text. */
  add(text: string): void {
    const counts = this.counts;
    const pieces = this.#special ? text.split(this.#special) : [text];
    for (const piece of pieces) {
      if (piece.length === 0) continue;
      for (const m of piece.matchAll(PRETOKENIZE_PATTERN)) {
        const w = m[0];
        counts.set(w, (counts.get(w) ?? 0) + 1);
      }
    }
  }
}

/**
 * Learns merges from word counts until the vocabulary has `vocabSize` tokens
 * (or no pair occurs `minFrequency` times; the vocabulary is then smaller).
 */
export function trainBpe(
  counts: Map<string, number>,
  opts: BpeOptions,
  specialTokens: readonly string[] = SPECIAL_TOKENS,
): BpeModel {
  const minFrequency = opts.minFrequency ?? 2;
  const maxTokenLength = opts.maxTokenLength ?? Infinity;
  const alphabet = byteToUnicode();
  const sorted = [...alphabet].sort((x, y) => x.codePointAt(0)! - y.codePointAt(0)!);
  const vocab: string[] = [...specialTokens, ...sorted];
  if (opts.vocabSize < vocab.length) {
    throw new UserError(
      `vocab size ${opts.vocabSize} is too small: the ${specialTokens.length} special tokens and ` +
        `256 byte symbols alone need ${vocab.length}`,
    );
  }
  const tokenId = new Map<string, number>();
  vocab.forEach((t, i) => tokenId.set(t, i));
  const byteId = new Int32Array(256);
  for (let b = 0; b < 256; b++) byteId[b] = tokenId.get(alphabet[b])!;

  // Words as runs of symbol ids in one flat array (word w is
  // syms[start[w] .. start[w] + len[w])), with their frequencies. Map order is
  // the order of first occurrence: deterministic for a given input.
  const nWords = counts.size;
  const start = new Int32Array(nWords), len = new Int32Array(nWords);
  const freq = new Float64Array(nWords);
  let syms = new Int32Array(1 << 16);
  let total = 0, w0 = 0;
  const encoder = new TextEncoder();
  for (const [word, c] of counts) {
    const bytes = encoder.encode(word);
    if (total + bytes.length > syms.length) {
      const grown = new Int32Array(Math.max(syms.length * 2, total + bytes.length));
      grown.set(syms.subarray(0, total));
      syms = grown;
    }
    start[w0] = total;
    len[w0] = bytes.length;
    freq[w0] = c;
    for (let i = 0; i < bytes.length; i++) syms[total++] = byteId[bytes[i]];
    w0++;
  }

  // A pair (a, b) is the key a * V + b: a small integer (V <= 32768 keeps it a
  // V8 small integer, the fast Map key), and ordering keys orders (a, b).
  const V = opts.vocabSize;
  const pairCount = new Map<number, number>();
  const where = new PairWords();
  const addPair = (key: number, c: number, w: number) => {
    pairCount.set(key, (pairCount.get(key) ?? 0) + c);
    where.add(key, w);
  };
  for (let w = 0; w < nWords; w++) {
    for (let i = start[w], end = start[w] + len[w]; i + 1 < end; i++) {
      addPair(syms[i] * V + syms[i + 1], freq[w], w);
    }
  }

  const heap = new PairHeap();
  for (const [key, c] of pairCount) heap.push(c, key);

  const merges: [string, string][] = [];
  const wanted = opts.vocabSize - vocab.length;
  const seen = new Int32Array(nWords).fill(-1);
  let lastReport = Date.now();
  const dec = (key: number, c: number) => {
    const left = pairCount.get(key)! - c;
    if (left > 0) pairCount.set(key, left);
    else {
      // Gone from every word: its word list is stale, give its nodes back.
      pairCount.delete(key);
      where.drop(key);
    }
  };
  const increased = new Set<number>();
  const affected: number[] = [];

  while (vocab.length < opts.vocabSize && heap.size > 0) {
    const [count, key] = heap.pop();
    const current = pairCount.get(key) ?? 0;
    if (current !== count) {
      if (current > 0) heap.push(current, key);
      continue;
    }
    if (count < minFrequency) break;
    const a = Math.floor(key / V), b = key - a * V;
    // Byte-level symbols are single UTF-16 units: string length = bytes.
    const merged = vocab[a] + vocab[b];
    if (merged.length > maxTokenLength) continue;
    let x = tokenId.get(merged);
    if (x === undefined) {
      x = vocab.length;
      vocab.push(merged);
      tokenId.set(merged, x);
    }
    merges.push([vocab[a], vocab[b]]);
    const stamp = merges.length;
    increased.clear();
    affected.length = 0;
    where.forEach(key, (w) => {
      if (seen[w] !== stamp) {
        seen[w] = stamp;
        affected.push(w);
      }
    });
    pairCount.delete(key);
    where.drop(key);
    for (const w of affected) {
      // Rewrite the word in place: the write index j never passes the read
      // index i, so syms[i + 2] is still the original next symbol.
      const s0 = start[w], end = s0 + len[w], c = freq[w];
      let j = s0;
      for (let i = s0; i < end;) {
        if (i + 1 < end && syms[i] === a && syms[i + 1] === b) {
          // (prev, a) and (b, next) become (prev, X) and (X, next). `prev` is
          // read from the output, so back-to-back occurrences ("abab") chain.
          if (j > s0) {
            const prev = syms[j - 1];
            if (prev * V + a !== key) dec(prev * V + a, c);
            addPair(prev * V + x, c, w);
            increased.add(prev * V + x);
          }
          if (i + 2 < end) {
            const next = syms[i + 2];
            if (b * V + next !== key) dec(b * V + next, c);
            addPair(x * V + next, c, w);
            increased.add(x * V + next);
          }
          syms[j++] = x;
          i += 2;
        } else {
          syms[j++] = syms[i++];
        }
      }
      len[w] = j - s0;
    }
    for (const k of increased) {
      const c = pairCount.get(k);
      if (c !== undefined) heap.push(c, k);
    }
    if (opts.onProgress && Date.now() - lastReport > 3000) {
      lastReport = Date.now();
      opts.onProgress(merges.length, wanted);
    }
  }
  return { vocab, merges };
}

/**
 * Pair key -> the words that may contain it, as singly linked lists in flat
 * Int32Arrays (a node is a word index and the next node; a list header holds
 * its first and last node, so a whole list is freed in O(1)), with freed nodes
 * and headers reused. Far smaller than an array per pair: most pairs occur in
 * few words. Lists may hold words that no longer contain the pair; the merge
 * loop rescans each word anyway.
 */
class PairWords {
  #list = new Map<number, number>();
  #first = new Int32Array(1 << 12);
  #last = new Int32Array(1 << 12);
  #listsUsed = 0;
  #freeLists: number[] = [];
  #word = new Int32Array(1 << 16);
  #next = new Int32Array(1 << 16);
  #nodesUsed = 0;
  #freeNode = -1;

  /** Adds `w` to `key`'s list unless it is already at the front. */
  add(key: number, w: number): void {
    let h = this.#list.get(key);
    if (h !== undefined && this.#word[this.#first[h]] === w) return;
    const node = this.#newNode();
    this.#word[node] = w;
    if (h === undefined) {
      h = this.#newList();
      this.#list.set(key, h);
      this.#next[node] = -1;
      this.#last[h] = node;
    } else {
      this.#next[node] = this.#first[h];
    }
    this.#first[h] = node;
  }

  forEach(key: number, fn: (w: number) => void): void {
    const h = this.#list.get(key);
    if (h === undefined) return;
    for (let n = this.#first[h]; n >= 0; n = this.#next[n]) fn(this.#word[n]);
  }

  /** Forgets `key`'s list and recycles its nodes. */
  drop(key: number): void {
    const h = this.#list.get(key);
    if (h === undefined) return;
    this.#list.delete(key);
    this.#next[this.#last[h]] = this.#freeNode;
    this.#freeNode = this.#first[h];
    this.#freeLists.push(h);
  }

  #newNode(): number {
    if (this.#freeNode >= 0) {
      const n = this.#freeNode;
      this.#freeNode = this.#next[n];
      return n;
    }
    if (this.#nodesUsed === this.#word.length) {
      this.#word = grow(this.#word);
      this.#next = grow(this.#next);
    }
    return this.#nodesUsed++;
  }

  #newList(): number {
    const h = this.#freeLists.pop();
    if (h !== undefined) return h;
    if (this.#listsUsed === this.#first.length) {
      this.#first = grow(this.#first);
      this.#last = grow(this.#last);
    }
    return this.#listsUsed++;
  }
}

function grow(a: Int32Array<ArrayBuffer>): Int32Array<ArrayBuffer> {
  const b = new Int32Array(a.length * 2);
  b.set(a);
  return b;
}

/** Max-heap of (count, pair key); equal counts pop the smaller key first. */
class PairHeap {
  #count: number[] = [];
  #key: number[] = [];

  get size(): number {
    return this.#count.length;
  }

  #above(i: number, j: number): boolean {
    const ci = this.#count[i], cj = this.#count[j];
    return ci > cj || (ci === cj && this.#key[i] < this.#key[j]);
  }

  #swap(i: number, j: number): void {
    const c = this.#count[i], k = this.#key[i];
    this.#count[i] = this.#count[j];
    this.#key[i] = this.#key[j];
    this.#count[j] = c;
    this.#key[j] = k;
  }

  push(count: number, key: number): void {
    this.#count.push(count);
    this.#key.push(key);
    let i = this.#count.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!this.#above(i, p)) break;
      this.#swap(i, p);
      i = p;
    }
  }

  pop(): [number, number] {
    const top: [number, number] = [this.#count[0], this.#key[0]];
    const lastC = this.#count.pop()!, lastK = this.#key.pop()!;
    const n = this.#count.length;
    if (n > 0) {
      this.#count[0] = lastC;
      this.#key[0] = lastK;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1, r = l + 1;
        let m = i;
        if (l < n && this.#above(l, m)) m = l;
        if (r < n && this.#above(r, m)) m = r;
        if (m === i) break;
        this.#swap(i, m);
        i = m;
      }
    }
    return top;
  }
}

/** The two files of a Hugging Face tokenizer directory, as text. */
export interface TokenizerFiles {
  /** Contents of `tokenizer.json`. */
  tokenizerJson: string;
  /** Contents of `tokenizer_config.json`. */
  tokenizerConfigJson: string;
}

/** Options of `tokenizerFiles`. */
export interface TokenizerFileOptions {
  /** `model_max_length` in `tokenizer_config.json`. Default 32768. */
  modelMaxLength?: number;
}

/**
 * Serializes a trained model as `tokenizer.json` (BPE model, ByteLevel
 * pre-tokenizer and decoder, no normalizer, the special tokens as added
 * tokens) and `tokenizer_config.json` (bos `<|im_start|>`, eos `<|im_end|>`,
 * pad/unk `<|endoftext|>`, a ChatML `chat_template`), laid out as MiniMind's.
 */
export function tokenizerFiles(
  model: BpeModel,
  opts: TokenizerFileOptions = {},
  specialTokens: readonly string[] = SPECIAL_TOKENS,
): TokenizerFiles {
  const added = specialTokens.map((content, id) => ({
    id,
    content,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
    special: true,
  }));
  const vocab: Record<string, number> = {};
  model.vocab.forEach((t, i) => vocab[t] = i);
  const byteLevel = { add_prefix_space: false, trim_offsets: true, use_regex: true };
  const json = {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: added,
    normalizer: null,
    pre_tokenizer: { type: "ByteLevel", ...byteLevel },
    post_processor: null,
    decoder: { type: "ByteLevel", ...byteLevel },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges: model.merges,
    },
  };
  const addedDecoder: Record<string, unknown> = {};
  for (const t of added) {
    addedDecoder[String(t.id)] = {
      content: t.content,
      lstrip: false,
      normalized: false,
      rstrip: false,
      single_word: false,
      special: true,
    };
  }
  const config = {
    add_bos_token: false,
    add_eos_token: false,
    add_prefix_space: false,
    added_tokens_decoder: addedDecoder,
    additional_special_tokens: [],
    bos_token: specialTokens[1],
    clean_up_tokenization_spaces: false,
    eos_token: specialTokens[2],
    legacy: true,
    model_max_length: opts.modelMaxLength ?? 32768,
    pad_token: specialTokens[0],
    sp_model_kwargs: {},
    spaces_between_special_tokens: false,
    tokenizer_class: "PreTrainedTokenizerFast",
    unk_token: specialTokens[0],
    chat_template: CHATML_TEMPLATE,
  };
  return {
    tokenizerJson: JSON.stringify(json, null, 2) + "\n",
    tokenizerConfigJson: JSON.stringify(config, null, 2) + "\n",
  };
}

/**
 * Trains on in-memory texts (the embedded corpus, tests) and serializes.
 *
 * @example
 * ```ts
 * import { trainTokenizerOnTexts } from "./bpe.ts";
 * import { TextTokenizer } from "./tokenizer.ts";
 * const files = trainTokenizerOnTexts(["low lower lowest", "new newer newest"], { vocabSize: 270 });
 * const tok = TextTokenizer.fromJson(files.tokenizerJson, files.tokenizerConfigJson);
 * const ids = tok.encode("lowest newest"); // fewer ids than bytes: merges apply
 * ```
 */
export function trainTokenizerOnTexts(
  texts: Iterable<string>,
  opts: BpeOptions & TokenizerFileOptions,
): TokenizerFiles {
  const counter = new WordCounter();
  for (const t of texts) counter.add(t);
  return tokenizerFiles(trainBpe(counter.counts, opts), opts);
}

/** Options of `trainTokenizerOnJsonl`. */
export interface JsonlTrainOptions extends BpeOptions, TokenizerFileOptions {
  /** Progress lines on stderr every few seconds (MB read, merges done). */
  log?: (line: string) => void;
}

/** What `trainTokenizerOnJsonl` read and made. */
export interface JsonlTrainResult extends TokenizerFiles {
  /** JSONL bytes read (after decompressing `.gz` files). */
  bytesRead: number;
  /** Texts counted: one per pretraining line, one per conversation turn. */
  texts: number;
  /** Distinct pre-tokenized words in those texts. */
  distinctWords: number;
  /** Vocabulary size reached: below the requested one when no pair seen `minFrequency` times is left. */
  vocabSize: number;
  /** Merges learned. */
  merges: number;
}

/**
 * Trains on JSONL files: `{"text": ...}` lines (pretraining) and
 * `{"conversations": [{"role", "content"}, ...]}` lines (SFT; every content
 * counts). Files are streamed line by line, `.gz` ones decompressed on the
 * way; directories and globs expand as for training (`resolveDataPaths`).
 */
export async function trainTokenizerOnJsonl(
  paths: string[],
  opts: JsonlTrainOptions,
): Promise<JsonlTrainResult> {
  const resolved = await resolveDataPaths(paths);
  if (resolved.format !== "jsonl") {
    throw new UserError(
      `${
        resolved.dirs[0]
      } holds token shards; a tokenizer is trained on text: pass the JSONL files`,
    );
  }
  const files = resolved.files;
  const counter = new WordCounter();
  let bytesRead = 0, texts = 0;
  const start = Date.now();
  let lastReport = start;
  const report = (final: boolean) => {
    const now = Date.now();
    if (!opts.log || (!final && now - lastReport < 3000)) return;
    lastReport = now;
    const mb = bytesRead / 1e6;
    opts.log(
      `tokenizer: read ${mb.toFixed(1)} MB (${
        (mb / Math.max(1e-3, (now - start) / 1000)).toFixed(1)
      } MB/s), ` +
        `${texts} texts, ${counter.counts.size} distinct words`,
    );
  };
  for (const file of files) {
    let fileBytes = 0;
    for await (const line of readJsonlLines(file)) {
      bytesRead += line.nextByteOffset - fileBytes;
      fileBytes = line.nextByteOffset;
      if (line.text.trim().length === 0) continue;
      for (const text of textsOfRecord(line.text, file, line.number)) {
        counter.add(text);
        texts++;
      }
      report(false);
    }
  }
  report(true);
  if (counter.counts.size === 0) {
    throw new UserError(`no text found in ${files.join(", ")}: nothing to train a tokenizer on`);
  }
  const log = opts.log;
  const model = trainBpe(counter.counts, {
    ...opts,
    onProgress: log ? (done, wanted) => log(`tokenizer: ${done}/${wanted} merges`) : undefined,
  });
  return {
    ...tokenizerFiles(model, opts),
    bytesRead,
    texts,
    distinctWords: counter.counts.size,
    vocabSize: model.vocab.length,
    merges: model.merges.length,
  };
}

/** Writes `tokenizer.json` and `tokenizer_config.json` into `dir` (created if needed). */
export async function writeTokenizerFiles(dir: string, files: TokenizerFiles): Promise<void> {
  await Deno.mkdir(dir, { recursive: true });
  await Deno.writeTextFile(`${dir}/tokenizer.json`, files.tokenizerJson);
  await Deno.writeTextFile(`${dir}/tokenizer_config.json`, files.tokenizerConfigJson);
}

function textsOfRecord(line: string, file: string, lineNo: number): string[] {
  let rec: unknown;
  try {
    rec = JSON.parse(line);
  } catch (e) {
    throw new UserError(`${file}:${lineNo}: invalid JSON (${(e as Error).message})`);
  }
  if (typeof rec === "object" && rec !== null) {
    const r = rec as Record<string, unknown>;
    if (typeof r["text"] === "string") return [r["text"]];
    if (Array.isArray(r["conversations"])) {
      const out: string[] = [];
      for (const m of r["conversations"]) {
        const content = (m as Record<string, unknown> | null)?.["content"];
        if (typeof content !== "string") {
          throw new UserError(`${file}:${lineNo}: a conversation turn has no string "content"`);
        }
        out.push(content);
      }
      return out;
    }
  }
  throw new UserError(
    `${file}:${lineNo}: expected {"text": ...} or {"conversations": [...]}, got ${
      line.length > 60 ? line.slice(0, 60) + "..." : line
    }`,
  );
}
