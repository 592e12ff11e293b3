/**
 * Pretrain packing: each document becomes `bos, tokens..., eos`; documents are
 * concatenated into one token stream, and the stream is cut into consecutive,
 * non-overlapping windows of `seq_len + 1` tokens. A window's first `seq_len`
 * tokens are the inputs and its last `seq_len` the targets (the same tokens
 * shifted by one), so every position of every window is trained and no padding
 * is wasted.
 *
 * Window convention. Windows advance by `seq_len + 1` (nanoGPT's and llm.c's
 * data loaders take `T + 1` tokens per row the same way). The token pair that
 * straddles two windows, last token of window k -> first token of window k+1,
 * is never a target: one target in `T + 1` is lost (0.2% at T = 512). We accept
 * that because each window is then a self-contained slice
 * `[k (T+1), (k+1) (T+1))` of the stream: a window can be shuffled, saved as a
 * position and rebuilt on resume without its neighbour. Advancing by T instead
 * would reuse the last token as the next window's first input and train every
 * pair, but makes windows overlap, which DESIGN.md's "consecutive windows of
 * seq_len + 1 tokens" rules out.
 */

/**
 * How pretrain documents become rows: `pack` concatenates them and cuts full
 * windows (above); `pad` is MiniMind's `PretrainDataset`: one row per document.
 */
export type Packing = "pack" | "pad";

/**
 * One document as a padded row of `seqLen + 1` tokens, MiniMind's
 * `PretrainDataset`: the text's tokens cut to `seqLen - 1` (MiniMind's
 * `max_length - 2`, its max_length being our row of `seqLen + 1` tokens),
 * wrapped in bos ... eos, then padded with `padId`. `doc` is the document as
 * `documentTokens` makes it (`bos, tokens..., eos`). The mask is 1 on the
 * document's tokens and 0 on the padding, so pads are never targets.
 *
 * MiniMind masks by value (`labels[input_ids == pad_token_id] = -100`); the
 * mask here goes by position. They agree unless the pad token occurs inside
 * the text (or the tokenizer pads with its eos token, where masking by value
 * would also drop every document's eos target).
 *
 * @example
 * ```ts
 * import { padDocument } from "./pretrain.ts";
 * // seq_len 4: rows of 5 tokens, room for 3 text tokens between bos and eos
 * const cut = padDocument([1, 10, 11, 12, 13, 2], 4, 0);
 * if (cut.ids.join() !== "1,10,11,12,2" || cut.mask.join() !== "1,1,1,1,1") throw new Error();
 * const padded = padDocument([1, 10, 2], 4, 0);
 * if (padded.ids.join() !== "1,10,2,0,0" || padded.mask.join() !== "1,1,1,0,0") throw new Error();
 * ```
 */
export function padDocument(
  doc: ArrayLike<number>,
  seqLen: number,
  padId: number,
): { ids: Int32Array; mask: Uint8Array; length: number } {
  const n = seqLen + 1;
  const ids = new Int32Array(n).fill(padId);
  const mask = new Uint8Array(n);
  let length = doc.length;
  if (length > n) {
    // bos + the first n - 2 text tokens + eos (the document's last token).
    for (let j = 0; j < n - 1; j++) ids[j] = doc[j];
    ids[n - 1] = doc[doc.length - 1];
    length = n;
  } else {
    for (let j = 0; j < length; j++) ids[j] = doc[j];
  }
  mask.fill(1, 0, length);
  return { ids, mask, length };
}

/** What pretrain packing needs of a tokenizer (a `TextTokenizer` has it). */
export interface DocumentTokenizer {
  /** Id that starts each document. */
  readonly bosId: number;
  /** Id that ends each document. */
  readonly eosId: number;
  /** Ids of a text, no special tokens added. */
  encode(text: string): number[];
}

/** The token ids of one pretrain document: `bos, encode(text)..., eos`. */
export function documentTokens(tok: DocumentTokenizer, text: string): number[] {
  const ids = tok.encode(text);
  ids.unshift(tok.bosId);
  ids.push(tok.eosId);
  return ids;
}

/** A window cut by `TokenPacker`, with where its first token came from. */
export interface PackedWindow<O> {
  /** `[seq_len + 1]` token ids. */
  tokens: Int32Array;
  /** Origin of the piece that holds the window's first token. */
  origin: O;
  /** Index of the window's first token within that piece. */
  offset: number;
}

interface Piece<O> {
  tokens: ArrayLike<number>;
  origin: O;
  /** Tokens before this index have been cut into windows already. */
  pos: number;
}

/**
 * Concatenates pieces of a token stream (documents, or chunks of a token shard)
 * and cuts them into consecutive windows of `windowLength` tokens. Each piece
 * carries an origin (where it was read from), so the start of every window, and
 * of the tokens still pending, can be named as (origin, offset) and rebuilt on
 * resume by re-reading from that origin and dropping `offset` tokens.
 *
 * @example
 * ```ts
 * const packer = new TokenPacker<string>(4);
 * packer.push([1, 10, 11, 2], "doc0");
 * packer.push([1, 12, 2], "doc1");
 * packer.take(); // { tokens: [1, 10, 11, 2], origin: "doc0", offset: 0 }
 * packer.take(); // undefined: 3 tokens pending, from { origin: "doc1", offset: 0 }
 * ```
 */
export class TokenPacker<O> {
  /** Tokens per window: seq_len + 1. */
  readonly windowLength: number;
  #pieces: Piece<O>[] = [];
  #pending = 0;

  /** A packer cutting windows of `windowLength` (= seq_len + 1) tokens. */
  constructor(windowLength: number) {
    if (!Number.isInteger(windowLength) || windowLength < 2) {
      throw new RangeError(`window length must be an integer >= 2, got ${windowLength}`);
    }
    this.windowLength = windowLength;
  }

  /** Number of tokens pushed but not yet cut into a window. */
  get pendingTokens(): number {
    return this.#pending;
  }

  /** Appends a piece; its first `skip` tokens are dropped (used when resuming mid-piece). */
  push(tokens: ArrayLike<number>, origin: O, skip = 0): void {
    if (skip >= tokens.length) return;
    this.#pieces.push({ tokens, origin, pos: skip });
    this.#pending += tokens.length - skip;
  }

  /** Where the pending tokens start, or undefined when none are pending. */
  pendingStart(): { origin: O; offset: number } | undefined {
    const p = this.#pieces[0];
    return p ? { origin: p.origin, offset: p.pos } : undefined;
  }

  /** The next full window, or undefined when fewer than `windowLength` tokens are pending. */
  take(): PackedWindow<O> | undefined {
    const n = this.windowLength;
    if (this.#pending < n) return undefined;
    const first = this.#pieces[0];
    const window: PackedWindow<O> = {
      tokens: new Int32Array(n),
      origin: first.origin,
      offset: first.pos,
    };
    let filled = 0;
    while (filled < n) {
      const p = this.#pieces[0];
      const m = Math.min(n - filled, p.tokens.length - p.pos);
      for (let i = 0; i < m; i++) window.tokens[filled + i] = p.tokens[p.pos + i];
      filled += m;
      p.pos += m;
      if (p.pos === p.tokens.length) this.#pieces.shift();
    }
    this.#pending -= n;
    return window;
  }

  /** Drops everything pending (the tail of the corpus that does not fill a window). */
  clear(): void {
    this.#pieces = [];
    this.#pending = 0;
  }
}

/**
 * Packs whole documents (already `bos ... eos`) into windows of `seqLen + 1`
 * tokens; the tail that does not fill a window is dropped. For small inputs and
 * tests; training streams through `TokenPacker`.
 */
export function packDocuments(docs: Iterable<ArrayLike<number>>, seqLen: number): Int32Array[] {
  const packer = new TokenPacker<null>(seqLen + 1);
  const out: Int32Array[] = [];
  for (const d of docs) {
    packer.push(d, null);
    for (let w = packer.take(); w; w = packer.take()) out.push(w.tokens);
  }
  return out;
}
