/**
 * Where the training stream's pieces come from: epochs over the files in a
 * seeded order, and within a file the records of JSONL (parsed, rendered,
 * tokenized; bad lines counted once) or the tokens and conversations of token
 * shards. Each piece carries its origin, the reader position a resumed stream
 * re-reads from. `data/stream.ts` turns pieces into samples and batches.
 */
import { UserError } from "../util/errors.ts";
import type { Line } from "./lines.ts";
import { documentTokens } from "./pretrain.ts";
import { epochFileOrder } from "./shuffle.ts";
import { ShardFile } from "./shards.ts";
import { maskRendered, renderConversation, type SftConversation } from "./sft.ts";
import {
  augmentationActive,
  renderAugmented,
  sampleRng,
  type SftAugmentation,
} from "./sft_augment.ts";
import {
  type DataKind,
  type DpoRecord,
  parseDpoRecord,
  parsePretrainRecord,
  parseSftRecord,
  readJsonlLines,
  type StreamKind,
} from "./sources.ts";
import type { TextTokenizer } from "./tokenizer.ts";
import { type EncodedChunk, type EncodeRecords, TokenizerPool } from "./tokenize_worker.ts";

/** Where the reader is: the next record to read. */
export interface ReaderPosition {
  /** Passes over the data completed before this one. */
  epoch: number;
  /** Index into this epoch's file order. */
  file: number;
  /**
   * JSONL: byte offset (decompressed); pretrain shards: token index (document
   * index with pad packing); SFT shards: conversation index.
   */
  offset: number;
  /** JSONL: line number at `offset` (1-based); shards: 0. */
  line: number;
}

/** What the reader counted. */
export interface DataCounters {
  /** Records read: JSONL lines, or conversations from SFT shards (every epoch counts). */
  records: number;
  /**
   * Distinct lines that were not valid records, skipped (with skipBadLines):
   * counted in the first pass over the data only, since later epochs (and the
   * re-reads that fill a shuffle buffer larger than the data) meet the same lines.
   */
  skippedLines: number;
  /** The first few skipped lines as `file:line` (at most `BAD_LINES_NAMED`). */
  badLines?: string[];
  /** SFT conversations with no assistant token left after truncation, skipped (first pass only). */
  skippedConversations: number;
}

/** Where a sample starts: a reader position, tokens of that record to drop, and the counts there. */
export interface SampleOrigin {
  /** The record the sample starts in. */
  at: ReaderPosition;
  /** Tokens of that record that belong to earlier samples. */
  skip: number;
  /** The counts before that record was read. */
  counters: DataCounters;
}

/** A run of tokens (a document, a conversation, a chunk of a shard) and where it starts. */
export interface Piece {
  tokens: ArrayLike<number>;
  mask?: ArrayLike<number>;
  /** DPO: the rejected answer's tokens and mask (`tokens`/`mask` are the chosen one's). */
  rejected?: { tokens: ArrayLike<number>; mask: ArrayLike<number> };
  origin: SampleOrigin;
}

/** What the sample maker reads pieces from. */
export interface PieceSource {
  next(): Promise<Piece | undefined>;
  /** Origin of the next piece. */
  here(): SampleOrigin;
  /** Called when an epoch ends, before the next starts. */
  onEpochEnd?: (epoch: number, fromStart: boolean) => void;
  close(): void;
}

/** The settings every source walks the epochs with. */
export interface SourceConfig {
  seed: number;
  shuffleFiles: boolean;
  maxEpochs: number;
}

/** Walks epochs and files; subclasses read records within a file. */
export abstract class EpochSource implements PieceSource {
  onEpochEnd?: (epoch: number, fromStart: boolean) => void;
  protected pos: ReaderPosition;
  protected order: number[];
  protected counters: DataCounters;
  protected readonly fileCount: number;
  #cfg: SourceConfig;
  #fromStart: boolean;
  #recordsThisEpoch = 0;

  constructor(fileCount: number, cfg: SourceConfig, start: SampleOrigin, counters: DataCounters) {
    this.fileCount = fileCount;
    this.#cfg = cfg;
    this.pos = { ...start.at };
    this.counters = counters;
    this.order = epochFileOrder(fileCount, cfg.seed, this.pos.epoch, cfg.shuffleFiles);
    this.#fromStart = start.at.file === 0 && start.at.offset === 0;
  }

  here(): SampleOrigin {
    const counters = { ...this.counters };
    if (counters.badLines) counters.badLines = [...counters.badLines];
    return { at: { ...this.pos }, skip: 0, counters };
  }

  async next(): Promise<Piece | undefined> {
    while (this.pos.epoch < this.#cfg.maxEpochs) {
      if (this.pos.file >= this.fileCount) {
        this.#endEpoch();
        continue;
      }
      const piece = await this.readInFile();
      if (piece) {
        this.#recordsThisEpoch++;
        return piece;
      }
      this.closeFile();
      this.pos = { epoch: this.pos.epoch, file: this.pos.file + 1, offset: 0, line: this.lineBase };
    }
    return undefined;
  }

  #endEpoch(): void {
    if (this.#fromStart && this.#recordsThisEpoch === 0) this.emptyEpoch();
    this.onEpochEnd?.(this.pos.epoch, this.#fromStart);
    this.pos = { epoch: this.pos.epoch + 1, file: 0, offset: 0, line: this.lineBase };
    this.order = epochFileOrder(
      this.fileCount,
      this.#cfg.seed,
      this.pos.epoch,
      this.#cfg.shuffleFiles,
    );
    this.#fromStart = true;
    this.#recordsThisEpoch = 0;
  }

  /** Line number at offset 0 (1 for JSONL, 0 where lines do not apply). */
  protected abstract readonly lineBase: number;
  /** The next piece of the current file, advancing `pos`; undefined at its end. */
  protected abstract readInFile(): Promise<Piece | undefined>;
  protected abstract closeFile(): void;
  /** Throws the error for an epoch with no records. */
  protected abstract emptyEpoch(): never;

  close(): void {
    this.closeFile();
  }
}

/** Records per chunk sent to a tokenizer worker. */
const WORKER_CHUNK_RECORDS = 64;

/** How many skipped lines are named in the report. */
export const BAD_LINES_NAMED = 5;

/** Records of JSONL files, rendered and tokenized. */
export class JsonlSource extends EpochSource {
  protected readonly lineBase = 1;
  #files: string[];
  #kind: StreamKind;
  #tok: TextTokenizer;
  #skipBadLines: boolean;
  #augment: SftAugmentation | undefined;
  #seed: number;
  #lines: AsyncGenerator<Line> | undefined;
  /** Tokenizer workers (`workers > 0`): records are read ahead and tokenized there. */
  #pool: TokenizerPool | undefined;
  /** Chunks sent to the workers, oldest first, with each record's origin. */
  #ahead: { origins: SampleOrigin[]; result: Promise<EncodedChunk> }[] = [];
  /** The stream's counts (with workers, `counters` is the reader's own, ahead of them). */
  #shared: DataCounters;
  /** Origins of the records of the chunk being read (not yet sent). */
  #pending: SampleOrigin[] = [];
  /** The read ahead in progress. */
  #filling: Promise<void> | undefined;
  /** A data error met while reading ahead. */
  #failed: Error | undefined;
  /** The chunk pieces are taken from now. */
  #current: { origins: SampleOrigin[]; chunk: EncodedChunk; next: number; at: number } | undefined;

  constructor(
    files: string[],
    kind: StreamKind,
    tok: TextTokenizer,
    skipBadLines: boolean,
    augment: SftAugmentation | undefined,
    cfg: SourceConfig,
    start: SampleOrigin,
    counters: DataCounters,
    workers = 0,
  ) {
    super(files.length, cfg, start, counters);
    this.#files = files;
    this.#kind = kind;
    this.#tok = tok;
    this.#skipBadLines = skipBadLines;
    this.#augment = augment && augmentationActive(augment) ? augment : undefined;
    this.#seed = cfg.seed;
    this.#shared = counters;
    if (workers > 0 && kind !== "dpo") {
      this.#pool = new TokenizerPool(tok, workers);
      // Reading ahead counts into the reader's own copy; the stream's counts
      // follow the records handed out (see #handOut).
      this.counters = { ...counters, badLines: counters.badLines && [...counters.badLines] };
    }
  }

  /**
   * With workers, an origin taken while reading ahead, as it would have been
   * taken on this thread when the record is handed out: the SFT
   * skipped-conversation count is the sample maker's, current then.
   */
  #asNow(origin: SampleOrigin): SampleOrigin {
    const skippedConversations = this.#shared.skippedConversations;
    return { ...origin, counters: { ...origin.counters, skippedConversations } };
  }

  /** With workers: the stream's counts as of handing out the record read at `origin`. */
  #handOut(origin: SampleOrigin): void {
    this.#shared.records = origin.counters.records + 1;
    this.#syncSkips(origin.counters);
  }

  #syncSkips(from: DataCounters): void {
    this.#shared.skippedLines = from.skippedLines;
    if (from.badLines) this.#shared.badLines = [...from.badLines];
  }

  /**
   * The next record not yet handed out: with workers, records read ahead are
   * still to come, so the position is that of the oldest of them.
   */
  override here(): SampleOrigin {
    const c = this.#current;
    if (c && c.next < c.origins.length) return this.#asNow(c.origins[c.next]);
    if (this.#ahead.length > 0) return this.#asNow(this.#ahead[0].origins[0]);
    if (this.#pending.length > 0) return this.#asNow(this.#pending[0]);
    return this.#pool ? this.#asNow(super.here()) : super.here();
  }

  protected readInFile(): Promise<Piece | undefined> {
    return this.#pool ? this.#readFromWorkers(this.#pool) : this.#readHere();
  }

  /** The next valid record of the file with its origin, counted; undefined at its end. */
  async #nextRecord(): Promise<
    { record: string | SftConversation | DpoRecord; origin: SampleOrigin; line: number } | undefined
  > {
    const file = this.#files[this.order[this.pos.file]];
    this.#lines ??= readJsonlLines(file, { byte: this.pos.offset, line: this.pos.line });
    while (true) {
      const r = await this.#lines.next();
      if (r.done) return undefined;
      const line = r.value;
      const origin = super.here();
      this.pos.offset = line.nextByteOffset;
      this.pos.line = line.number + 1;
      if (line.text.trim() === "") continue;
      const where = { file, line: line.number };
      let record: string | SftConversation | DpoRecord;
      try {
        record = this.#kind === "pretrain"
          ? parsePretrainRecord(line.text, where)
          : this.#kind === "dpo"
          ? parseDpoRecord(line.text, where)
          : parseSftRecord(line.text, where);
      } catch (e) {
        if (this.#skipBadLines && e instanceof UserError) {
          if (this.pos.epoch === 0) this.#countBadLine(`${file}:${line.number}`);
          continue;
        }
        throw e;
      }
      this.counters.records++;
      return { record, origin, line: line.number };
    }
  }

  /**
   * With workers: keeps `2 x workers` chunks of `WORKER_CHUNK_RECORDS` records
   * of this file in flight, and hands out their pieces in reading order (the
   * same pieces, origins and counts as tokenizing here). A data error met while
   * reading ahead is thrown once the records before it are handed out.
   */
  async #readFromWorkers(pool: TokenizerPool): Promise<Piece | undefined> {
    let c = this.#current;
    if (!c || c.next >= c.origins.length) {
      this.#current = undefined;
      await this.#fillAhead(pool);
      const head = this.#ahead.shift();
      if (!head) {
        if (this.#failed) throw this.#failed;
        this.#syncSkips(this.counters); // bad lines at the end of the file
        return undefined;
      }
      c = this.#current = { origins: head.origins, chunk: await head.result, next: 0, at: 0 };
      void this.#fillAhead(pool);
    }
    const n = c.chunk.lengths[c.next];
    const tokens = c.chunk.ids.subarray(c.at, c.at + n);
    const mask = c.chunk.mask?.subarray(c.at, c.at + n);
    const origin = this.#asNow(c.origins[c.next]);
    this.#handOut(origin);
    c.next++;
    c.at += n;
    return mask ? { tokens, mask, origin } : { tokens, origin };
  }

  /** Reads records and sends chunks until `2 x workers` are in flight, the file ends or fails. */
  #fillAhead(pool: TokenizerPool): Promise<void> {
    this.#filling ??= (async () => {
      let ended = false;
      while (!ended && !this.#failed && this.#ahead.length < 2 * pool.size) {
        const fileIndex = this.order[this.pos.file];
        const texts: string[] = [];
        const conversations: SftConversation[] = [];
        const seeds: [number, number, number, number][] = [];
        this.#pending = [];
        try {
          while (this.#pending.length < WORKER_CHUNK_RECORDS) {
            const r = await this.#nextRecord();
            if (!r) {
              ended = true;
              break;
            }
            this.#pending.push(r.origin);
            if (typeof r.record === "string") texts.push(r.record);
            else if ("chosen" in r.record) {
              throw new Error("DPO pairs are tokenized here, not in workers");
            } else {
              conversations.push(r.record);
              seeds.push([this.#seed, this.pos.epoch, fileIndex, r.line]);
            }
          }
        } catch (e) {
          this.#failed = e as Error;
        }
        const origins = this.#pending;
        this.#pending = [];
        if (origins.length === 0) break;
        const records: EncodeRecords = this.#kind === "pretrain"
          ? { texts }
          : this.#augment
          ? { conversations, augment: { settings: this.#augment, seeds } }
          : { conversations };
        const result = pool.encode(records);
        result.catch(() => {}); // rejected results are thrown when their chunk is reached
        this.#ahead.push({ origins, result });
      }
    })().finally(() => this.#filling = undefined);
    return this.#filling;
  }

  /** Without workers: read, render and tokenize the next record here. */
  async #readHere(): Promise<Piece | undefined> {
    const fileIndex = this.order[this.pos.file];
    const next = await this.#nextRecord();
    if (!next) return undefined;
    const { record, origin, line } = next;
    if (typeof record === "string") return { tokens: documentTokens(this.#tok, record), origin };
    if ("chosen" in record) {
      const chosen = maskRendered(this.#tok, renderConversation(this.#tok, record.chosen));
      const rejected = maskRendered(this.#tok, renderConversation(this.#tok, record.rejected));
      return {
        tokens: chosen.ids,
        mask: chosen.mask,
        rejected: { tokens: rejected.ids, mask: rejected.mask },
        origin,
      };
    }
    const text = this.#augment
      ? renderAugmented(
        this.#tok,
        record,
        this.#augment,
        sampleRng(this.#seed, this.pos.epoch, fileIndex, line),
      )
      : renderConversation(this.#tok, record.messages, record.tools);
    const { ids, mask } = maskRendered(this.#tok, text);
    return { tokens: ids, mask, origin };
  }

  #countBadLine(where: string): void {
    this.counters.skippedLines++;
    const named = this.counters.badLines ??= [];
    if (named.length < BAD_LINES_NAMED) named.push(where);
  }

  protected closeFile(): void {
    // Ending the generator cancels its stream, which closes the file.
    void this.#lines?.return(undefined);
    this.#lines = undefined;
    this.#ahead = [];
    this.#pending = [];
    this.#current = undefined;
  }

  override close(): void {
    super.close();
    this.#pool?.close();
    this.#pool = undefined;
  }

  protected emptyEpoch(): never {
    const what = this.#files.length === 1 ? this.#files[0] : `${this.#files.length} files`;
    throw new UserError(
      this.counters.skippedLines > 0
        ? `no valid records in ${what}: every line was bad and skipped (${this.counters.skippedLines})`
        : `no records in ${what}: the training data is empty`,
    );
  }
}

/** Tokens per read from a pretrain shard (128 KiB as uint16). */
const SHARD_CHUNK_TOKENS = 1 << 16;
/** Most tokens read at once for a block of SFT conversations. */
const SHARD_SFT_BLOCK_TOKENS = 1 << 18;

/** Token chunks, documents or conversations of token shards. */
export class ShardSource extends EpochSource {
  protected readonly lineBase = 0;
  #paths: string[];
  #kind: DataKind;
  /** Read whole documents (SFT, and pretrain with pad packing) rather than token chunks. */
  #byDocument: boolean;
  #shard: ShardFile | undefined;
  /** A block of consecutive documents (or conversations) read at once. */
  #block:
    | {
      first: number;
      offsets: Float64Array;
      count: number;
      ids: Int32Array;
      mask: Uint8Array | undefined;
    }
    | undefined;

  constructor(
    paths: string[],
    kind: DataKind,
    byDocument: boolean,
    cfg: SourceConfig,
    start: SampleOrigin,
    counters: DataCounters,
  ) {
    super(paths.length, cfg, start, counters);
    this.#paths = paths;
    this.#kind = kind;
    this.#byDocument = byDocument;
  }

  protected async readInFile(): Promise<Piece | undefined> {
    this.#shard ??= await ShardFile.open(this.#paths[this.order[this.pos.file]]);
    const h = this.#shard.header;
    const origin = this.here();
    if (!this.#byDocument) {
      if (this.pos.offset >= h.tokens) return undefined;
      const n = Math.min(SHARD_CHUNK_TOKENS, h.tokens - this.pos.offset);
      const tokens = await this.#shard.readTokens(this.pos.offset, n);
      this.pos.offset += n;
      return { tokens, origin };
    }
    const doc = this.pos.offset;
    if (doc >= h.documents) return undefined;
    let b = this.#block;
    if (!b || doc < b.first || doc >= b.first + b.count) {
      const want = Math.min(4096, h.documents - doc);
      const offsets = await this.#shard.readDocumentOffsets(doc, want);
      let count = 1;
      while (count < want && offsets[count + 1] - offsets[0] <= SHARD_SFT_BLOCK_TOKENS) count++;
      const n = offsets[count] - offsets[0];
      b = this.#block = {
        first: doc,
        offsets,
        count,
        ids: await this.#shard.readTokens(offsets[0], n),
        mask: h.hasMask ? await this.#shard.readMask(offsets[0], n) : undefined,
      };
    }
    const s = b.offsets[doc - b.first] - b.offsets[0];
    const e = b.offsets[doc - b.first + 1] - b.offsets[0];
    this.pos.offset++;
    this.counters.records++;
    return { tokens: b.ids.subarray(s, e), mask: b.mask?.subarray(s, e), origin };
  }

  protected closeFile(): void {
    this.#shard?.close();
    this.#shard = undefined;
    this.#block = undefined;
  }

  protected emptyEpoch(): never {
    throw new UserError(
      `the token shards hold no ${this.#kind === "sft" ? "conversations" : "tokens"}`,
    );
  }
}
