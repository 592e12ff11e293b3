/**
 * The batch stream that training reads: `--data` paths (JSONL, or token-shard
 * directories from `trainer data prepare`, detected) -> records -> tokens ->
 * samples (pretrain windows or SFT rows) -> shuffle buffer -> batches of
 * `[B, T]` inputs, targets and loss mask. It loops over the corpus epoch after
 * epoch (each epoch reads the files in a fresh seeded order) until told to stop
 * after `maxEpochs`. Memory holds the shuffle buffer and a few read chunks,
 * never the corpus.
 *
 * Resuming. `position()` is a small JSON object saved in checkpoints; a stream
 * opened from it yields exactly the batches the original would have yielded
 * next. It stores no tokens: samples are numbered in the order they are made
 * (a deterministic function of the files and the seed), and the position names
 * the oldest sample still waiting in the shuffle buffer, where it came from
 * (reader position: epoch, file, byte offset and line, or token/document index
 * for shards, plus how many tokens of that record to drop), which sample
 * numbers the buffer holds in which slot, and the buffer's RNG state. Opening
 * from it re-reads from that origin, remakes the samples up to the newest one
 * made, keeps those in the buffer, and goes on. The cost is re-reading about
 * `shuffleBuffer * ln(shuffleBuffer)` samples once at resume (a sample stays in
 * the buffer for a geometric number of draws); with no shuffle buffer, nothing.
 */
import { UserError } from "../util/errors.ts";
import { Rng, type RngState } from "../util/random.ts";
import { type Packing, padDocument, TokenPacker } from "./pretrain.ts";
import { ShuffleBuffer } from "./shuffle.ts";
import { readShardManifest, sha256Hex, type ShardManifest } from "./shards.ts";
import { fitSftSample } from "./sft.ts";
import {
  augmentationActive,
  augmentationKey,
  checkAugmentation,
  NO_AUGMENTATION,
  type SftAugmentation,
} from "./sft_augment.ts";
import { type DataKind, resolveDataPaths, type StreamKind } from "./sources.ts";
import type { TextTokenizer } from "./tokenizer.ts";
import { type Batch, emptyBatch, setRow } from "./batch.ts";
import {
  type DataCounters,
  JsonlSource,
  type PieceSource,
  type SampleOrigin,
  ShardSource,
} from "./stream_sources.ts";

export {
  BAD_LINES_NAMED,
  type DataCounters,
  type ReaderPosition,
  type SampleOrigin,
} from "./stream_sources.ts";

export type { StreamKind } from "./sources.ts";

/** How to build a `DataStream`. */
export interface DataStreamOptions {
  /** `--data` paths: JSONL files, directories, globs, or token-shard directories. */
  data: string[];
  /** Pretrain windows, SFT rows or DPO pairs. */
  kind: StreamKind;
  /** Needed for JSONL; for shards, checked against the shards' tokenizer when given. */
  tokenizer?: TextTokenizer;
  /** B: rows per batch. */
  batchSize: number;
  /** T: tokens per row. */
  seqLen: number;
  /** Seed of the file order and the shuffle buffer (default 0). */
  seed?: number;
  /** Samples held for shuffling; 0 (default) keeps file order. */
  shuffleBuffer?: number;
  /** Permute the file order each epoch (default: when shuffleBuffer > 0). */
  shuffleFiles?: boolean;
  /** Stop after this many passes over the data (default: never stop). */
  maxEpochs?: number;
  /** Count and skip lines that are not valid records instead of failing. */
  skipBadLines?: boolean;
  /**
   * Pretrain: `pack` (default) concatenates documents into full windows; `pad`
   * makes one row per document, cut to fit and padded (MiniMind's PretrainDataset).
   */
  packing?: Packing;
  /** SFT: MiniMind's random augmentations, seeded per sample (default none). JSONL only. */
  augment?: SftAugmentation;
  /**
   * JSONL: tokenize in this many worker threads, reading ahead (default 0: on
   * this thread). The batches and positions are the same either way.
   */
  tokenizeWorkers?: number;
}

/** A stream's saved position (JSON-serializable), from `DataStream.position()`. */
export interface DataPosition {
  /** Layout version of this object (1). */
  version: 1;
  /** What the data was: JSONL or token shards. */
  format: "jsonl" | "shards";
  /** Pretrain, SFT or DPO; must match to resume. */
  kind: StreamKind;
  /** T; must match to resume. */
  seqLen: number;
  /** Seed; must match to resume. */
  seed: number;
  /** Shuffle buffer size; must match to resume. */
  shuffleBuffer: number;
  /** File-order shuffling; must match to resume. */
  shuffleFiles: boolean;
  /** Pretrain packing; must match to resume (absent in positions saved before it existed: pack). */
  packing?: Packing;
  /** SFT augmentation fingerprint; must match to resume (absent: none). */
  augment?: string;
  /** The files read, in the order given, with their sizes: a resume checks they are unchanged. */
  files: { path: string; bytes: number }[];
  /** Where the oldest sample still to come (number `firstSample`) starts. */
  origin: SampleOrigin;
  /** Number of that oldest sample. */
  firstSample: number;
  /** Number of the next sample to be made. */
  nextSample: number;
  /** Sample numbers in the shuffle buffer, in slot order. */
  buffer: number[];
  /** The shuffle buffer's RNG. */
  rng: RngState;
  /** Batches yielded so far. */
  batches: number;
}

/** Running figures of a stream. */
export interface DataStats extends DataCounters {
  /** Epoch of the record that will be read next. */
  epoch: number;
  /** Batches yielded. */
  batches: number;
}

interface Sample {
  /** `[T + 1]` ids. */
  ids: Int32Array;
  /** `[T + 1]`, aligned with ids; undefined means all ones. */
  mask: Uint8Array | undefined;
  /** DPO: the rejected row (`ids`/`mask` are the chosen one). */
  rejected?: { ids: Int32Array; mask: Uint8Array };
  origin: SampleOrigin;
}

/** Turns pieces into samples: pretrain windows, padded documents or SFT rows of `[T + 1]` tokens. */
class SampleMaker {
  #kind: StreamKind;
  #packing: Packing;
  #source: PieceSource;
  #seqLen: number;
  #padId: number;
  #counters: DataCounters;
  #packer: TokenPacker<SampleOrigin>;
  #firstSkip: number;
  #samplesThisEpoch = 0;
  #tokensThisEpoch = 0;

  constructor(
    kind: StreamKind,
    packing: Packing,
    source: PieceSource,
    seqLen: number,
    padId: number,
    counters: DataCounters,
    firstSkip: number,
  ) {
    this.#kind = kind;
    this.#packing = packing;
    this.#source = source;
    this.#seqLen = seqLen;
    this.#padId = padId;
    this.#counters = counters;
    this.#packer = new TokenPacker(seqLen + 1);
    this.#firstSkip = firstSkip;
    source.onEpochEnd = (epoch, fromStart) => {
      if (fromStart && this.#samplesThisEpoch === 0) {
        throw new UserError(
          this.#kind === "dpo"
            ? `epoch ${epoch}: no pair has an assistant token in both answers within seq_len + 1 = ${
              seqLen + 1
            } tokens (${this.#counters.skippedConversations} skipped); check the data or raise --seq-len`
            : this.#kind === "sft"
            ? `epoch ${epoch}: no conversation has an assistant token within seq_len + 1 = ${
              seqLen + 1
            } tokens (${this.#counters.skippedConversations} skipped); check the data or raise --seq-len`
            : this.#packing === "pad"
            ? `the corpus holds no documents`
            : `the corpus holds ${this.#tokensThisEpoch} tokens per epoch, fewer than one window of ` +
              `seq_len + 1 = ${seqLen + 1}; use a smaller --seq-len or more data`,
        );
      }
      this.#samplesThisEpoch = 0;
      this.#tokensThisEpoch = 0;
    };
  }

  /** Where the next sample starts. */
  nextOrigin(): SampleOrigin {
    const p = this.#packer.pendingStart();
    if (p) return { ...p.origin, skip: p.offset };
    return { ...this.#source.here(), skip: this.#firstSkip };
  }

  async next(): Promise<Sample | undefined> {
    const s = this.#kind === "sft" || this.#kind === "dpo"
      ? await this.#nextRow()
      : this.#packing === "pad"
      ? await this.#nextPadded()
      : await this.#nextWindow();
    if (s) this.#samplesThisEpoch++;
    return s;
  }

  async #nextWindow(): Promise<Sample | undefined> {
    let w = this.#packer.take();
    while (!w) {
      const piece = await this.#source.next();
      if (!piece) {
        this.#packer.clear(); // the tail that does not fill a window
        return undefined;
      }
      this.#tokensThisEpoch += piece.tokens.length;
      this.#packer.push(piece.tokens, piece.origin, this.#firstSkip);
      this.#firstSkip = 0;
      w = this.#packer.take();
    }
    return { ids: w.tokens, mask: undefined, origin: { ...w.origin, skip: w.offset } };
  }

  async #nextPadded(): Promise<Sample | undefined> {
    const piece = await this.#source.next();
    if (!piece) return undefined;
    this.#tokensThisEpoch += piece.tokens.length;
    const row = padDocument(piece.tokens, this.#seqLen, this.#padId);
    return { ids: row.ids, mask: row.mask, origin: piece.origin };
  }

  async #nextRow(): Promise<Sample | undefined> {
    while (true) {
      const piece = await this.#source.next();
      if (!piece) return undefined;
      this.#tokensThisEpoch += piece.tokens.length;
      const row = fitSftSample(piece.tokens, piece.mask!, this.#seqLen, this.#padId);
      // A DPO pair trains only when both answers keep a target after truncation.
      const rejected = piece.rejected &&
        fitSftSample(piece.rejected.tokens, piece.rejected.mask, this.#seqLen, this.#padId);
      if (!row || (piece.rejected && !rejected)) {
        // Once per conversation: later epochs meet the same ones.
        if (piece.origin.at.epoch === 0) this.#counters.skippedConversations++;
        continue;
      }
      return {
        ids: row.ids,
        mask: row.mask,
        ...(rejected ? { rejected: { ids: rejected.ids, mask: rejected.mask } } : {}),
        origin: piece.origin,
      };
    }
  }
}

interface Entry {
  index: number;
  sample: Sample;
}

/**
 * Batches for training, from JSONL or token shards, shuffled and resumable.
 *
 * @example
 * ```ts ignore
 * const tok = await TextTokenizer.load("../shared/fixtures/minimind-tokenizer");
 * const stream = await DataStream.open({
 *   data: ["data/pretrain.jsonl"], kind: "pretrain", tokenizer: tok,
 *   batchSize: 8, seqLen: 256, seed: 1, shuffleBuffer: 1000,
 * });
 * const batch = await stream.next(); // { ids, targets, mask, B: 8, T: 256 }
 * const saved = stream.position(); // into trainer_state.json
 * const resumed = await DataStream.open(sameOptions, saved); // continues with the next batch
 * ```
 */
export class DataStream {
  /** Pretrain or SFT. */
  readonly kind: StreamKind;
  /** B: rows per batch. */
  readonly batchSize: number;
  /** T: tokens per row. */
  readonly seqLen: number;
  /** The token-shard manifests, when reading shards. */
  readonly manifests: ShardManifest[];
  #format: "jsonl" | "shards";
  #packing: Packing | undefined;
  #augment: string | undefined;
  #files: { path: string; bytes: number }[];
  #seed: number;
  #shuffleFiles: boolean;
  #padId: number;
  #counters: DataCounters;
  #source: PieceSource;
  #maker: SampleMaker;
  #buffer: ShuffleBuffer<Entry>;
  #nextIndex: number;
  #batches: number;
  #exhausted = false;

  private constructor(
    init: {
      opts: DataStreamOptions;
      packing: Packing | undefined;
      augment: string | undefined;
      format: "jsonl" | "shards";
      files: { path: string; bytes: number }[];
      manifests: ShardManifest[];
      padId: number;
      counters: DataCounters;
      source: PieceSource;
      maker: SampleMaker;
      buffer: ShuffleBuffer<Entry>;
      nextIndex: number;
      batches: number;
    },
  ) {
    this.kind = init.opts.kind;
    this.batchSize = init.opts.batchSize;
    this.seqLen = init.opts.seqLen;
    this.manifests = init.manifests;
    this.#format = init.format;
    this.#packing = init.packing;
    this.#augment = init.augment;
    this.#files = init.files;
    this.#seed = init.opts.seed ?? 0;
    this.#shuffleFiles = init.opts.shuffleFiles ?? (init.opts.shuffleBuffer ?? 0) > 0;
    this.#padId = init.padId;
    this.#counters = init.counters;
    this.#source = init.source;
    this.#maker = init.maker;
    this.#buffer = init.buffer;
    this.#nextIndex = init.nextIndex;
    this.#batches = init.batches;
  }

  /**
   * Opens a stream over `opts.data`; from `position` (saved by `position()` of a
   * stream with the same data, kind, seq_len, seed and shuffle settings) it
   * continues exactly where that one was.
   */
  static async open(opts: DataStreamOptions, position?: DataPosition): Promise<DataStream> {
    checkOptions(opts);
    const seed = opts.seed ?? 0;
    const shuffleBuffer = opts.shuffleBuffer ?? 0;
    const shuffleFiles = opts.shuffleFiles ?? shuffleBuffer > 0;
    const packing: Packing = opts.packing ?? "pack";
    const augment = opts.augment ?? NO_AUGMENTATION;
    const resolved = await resolveDataPaths(opts.data);
    if (resolved.format === "shards" && augmentationActive(augment)) {
      throw new UserError(
        `${resolved.dirs[0]} holds token shards, whose conversations were rendered when they ` +
          `were prepared; --sft-system-ratio and --sft-empty-think-keep apply when training reads JSONL`,
      );
    }
    let paths: string[];
    let manifests: ShardManifest[] = [];
    let padId: number;
    if (resolved.format === "jsonl") {
      if (!opts.tokenizer) {
        throw new UserError("JSONL training data needs a tokenizer (--tokenizer DIR)");
      }
      paths = resolved.files;
      padId = opts.tokenizer.padId;
    } else if (opts.kind === "dpo") {
      throw new UserError(
        `${resolved.dirs[0]} holds token shards; DPO reads its pairs from JSONL ` +
          `({"chosen": [...], "rejected": [...]} lines), which \`trainer data prepare\` does not convert`,
      );
    } else {
      manifests = await Promise.all(resolved.dirs.map(readShardManifest));
      paths = [];
      for (let i = 0; i < manifests.length; i++) {
        const m = manifests[i];
        const dir = resolved.dirs[i].replace(/(.)\/+$/, "$1");
        if (m.kind !== opts.kind) {
          throw new UserError(
            `${dir} holds ${m.kind} shards, but this run trains ${opts.kind}; prepare the data ` +
              (opts.kind === "sft" ? "with --sft" : "without --sft"),
          );
        }
        if (m.tokenizerSha256 !== manifests[0].tokenizerSha256) {
          throw new UserError(
            `${dir} and ${resolved.dirs[0]} were prepared with different tokenizers`,
          );
        }
        for (const s of m.shards) paths.push(`${dir}/${s.file}`);
      }
      if (opts.tokenizer) {
        const hash = await sha256Hex(opts.tokenizer.tokenizerJson);
        if (hash !== manifests[0].tokenizerSha256) {
          throw new UserError(
            `${
              resolved.dirs[0]
            } was prepared with a different tokenizer than ${opts.tokenizer.source} ` +
              `(tokenizer.json sha256 ${manifests[0].tokenizerSha256.slice(0, 12)}... vs ${
                hash.slice(0, 12)
              }...); prepare the shards again with this tokenizer`,
          );
        }
      }
      padId = manifests[0].padId;
    }
    const files = await Promise.all(paths.map(async (path) => {
      try {
        return { path, bytes: (await Deno.stat(path)).size };
      } catch (e) {
        throw new UserError(`cannot read ${path}: ${(e as Error).message}`);
      }
    }));
    if (position) {
      checkPosition(position, {
        format: resolved.format,
        kind: opts.kind,
        seqLen: opts.seqLen,
        seed,
        shuffleBuffer,
        shuffleFiles,
        files,
        packing: opts.kind === "pretrain" ? packing : undefined,
        augment: opts.kind === "sft" ? augmentationKey(augment) : undefined,
      });
    }
    const origin: SampleOrigin = position?.origin ?? {
      at: { epoch: 0, file: 0, offset: 0, line: resolved.format === "jsonl" ? 1 : 0 },
      skip: 0,
      counters: { records: 0, skippedLines: 0, skippedConversations: 0 },
    };
    const counters = { ...origin.counters };
    const cfg = { seed, shuffleFiles, maxEpochs: opts.maxEpochs ?? Infinity };
    const source: PieceSource = resolved.format === "jsonl"
      ? new JsonlSource(
        paths,
        opts.kind,
        opts.tokenizer!,
        opts.skipBadLines ?? false,
        opts.kind === "sft" ? augment : undefined,
        cfg,
        origin,
        counters,
        opts.tokenizeWorkers ?? 0,
      )
      : new ShardSource(
        paths,
        opts.kind as DataKind,
        opts.kind === "sft" || packing === "pad",
        cfg,
        origin,
        counters,
      );
    const maker = new SampleMaker(
      opts.kind,
      packing,
      source,
      opts.seqLen,
      padId,
      counters,
      origin.skip,
    );

    let buffer: ShuffleBuffer<Entry>;
    let nextIndex = 0;
    if (!position) {
      buffer = new ShuffleBuffer<Entry>(shuffleBuffer, new Rng(seed));
    } else {
      // Remake samples firstSample .. nextSample-1 and keep the buffered ones.
      const wanted = new Set(position.buffer);
      const made = new Map<number, Entry>();
      for (let index = position.firstSample; index < position.nextSample; index++) {
        const sample = await maker.next();
        if (!sample) {
          source.close();
          throw new UserError(
            "the training data ends before the saved data position: was the data changed, or is " +
              "the epoch limit lower than the saved position's epoch?",
          );
        }
        if (wanted.has(index)) made.set(index, { index, sample });
      }
      nextIndex = position.nextSample;
      if (!position.buffer.every((i) => made.has(i))) {
        source.close();
        throw new UserError(
          "the saved data position is damaged: its shuffle buffer names unknown samples",
        );
      }
      buffer = new ShuffleBuffer<Entry>(
        shuffleBuffer,
        Rng.fromState(position.rng),
        position.buffer.map((i) => made.get(i)!),
      );
    }
    return new DataStream({
      opts,
      packing: opts.kind === "pretrain" ? packing : undefined,
      augment: opts.kind === "sft" ? augmentationKey(augment) : undefined,
      format: resolved.format,
      files,
      manifests,
      padId,
      counters,
      source,
      maker,
      buffer,
      nextIndex,
      batches: position?.batches ?? 0,
    });
  }

  /**
   * The next batch, or undefined after the last epoch (`maxEpochs`). The last
   * batch is filled up with rows of padding at mask 0, so every batch is `[B, T]`
   * (DPO: `[2B, T]`, pair b's chosen answer in row b, its rejected one in row B + b).
   */
  async next(): Promise<Batch | undefined> {
    const B = this.batchSize;
    const dpo = this.kind === "dpo";
    const batch = emptyBatch(dpo ? 2 * B : B, this.seqLen, this.#padId);
    let rows = 0;
    for (; rows < B; rows++) {
      let entry: Entry | undefined;
      try {
        entry = await this.#take();
      } catch (e) {
        this.close(); // a data error ends the stream: release the open file
        throw e;
      }
      if (!entry) break;
      // Samples are T + 1 tokens (SFT rows padded, with mask 0 on the padding).
      setRow(batch, rows, entry.sample, this.#padId);
      if (dpo) setRow(batch, B + rows, entry.sample.rejected!, this.#padId);
    }
    if (rows === 0) return undefined;
    this.#batches++;
    return batch;
  }

  async #take(): Promise<Entry | undefined> {
    while (!this.#exhausted && !this.#buffer.full) {
      const sample = await this.#maker.next();
      if (!sample) {
        this.#exhausted = true;
        break;
      }
      this.#buffer.add({ index: this.#nextIndex++, sample });
    }
    return this.#buffer.take();
  }

  /** The position after the last batch yielded: save it, and `open` from it to resume. */
  position(): DataPosition {
    const items = this.#buffer.items();
    let first = items.length > 0 ? items[0] : undefined;
    for (const e of items) if (e.index < first!.index) first = e;
    return {
      version: 1,
      format: this.#format,
      kind: this.kind,
      seqLen: this.seqLen,
      seed: this.#seed,
      shuffleBuffer: this.#buffer.capacity,
      shuffleFiles: this.#shuffleFiles,
      ...(this.#packing !== undefined ? { packing: this.#packing } : {}),
      ...(this.#augment !== undefined ? { augment: this.#augment } : {}),
      files: this.#files.map((f) => ({ ...f })),
      origin: structuredClone(first ? first.sample.origin : this.#maker.nextOrigin()),
      firstSample: first ? first.index : this.#nextIndex,
      nextSample: this.#nextIndex,
      buffer: items.map((e) => e.index),
      rng: this.#buffer.rngState(),
      batches: this.#batches,
    };
  }

  /** Counts so far (records read include those waiting in the shuffle buffer). */
  get stats(): DataStats {
    return {
      ...this.#counters,
      epoch: this.#maker.nextOrigin().at.epoch,
      batches: this.#batches,
    };
  }

  /** Closes the open file. */
  close(): void {
    this.#source.close();
  }
}

function checkOptions(opts: DataStreamOptions): void {
  const whole = (name: string, v: number | undefined, min: number) => {
    if (v !== undefined && !(Number.isInteger(v) && v >= min)) {
      throw new UserError(`${name} must be a whole number >= ${min}, got ${v}`);
    }
  };
  whole("batch size", opts.batchSize, 1);
  whole("seq_len", opts.seqLen, 1);
  whole("shuffle buffer", opts.shuffleBuffer, 0);
  if (opts.packing !== undefined && opts.packing !== "pack" && opts.packing !== "pad") {
    throw new UserError(`packing must be "pack" or "pad", got ${JSON.stringify(opts.packing)}`);
  }
  if (opts.augment) {
    try {
      checkAugmentation(opts.augment);
    } catch (e) {
      throw new UserError((e as Error).message);
    }
  }
  if (opts.maxEpochs !== undefined && opts.maxEpochs !== Infinity) {
    whole("epochs", opts.maxEpochs, 1);
  }
}

function checkPosition(
  p: DataPosition,
  now: Omit<
    DataPosition,
    "version" | "origin" | "firstSample" | "nextSample" | "buffer" | "rng" | "batches"
  >,
): void {
  if (
    typeof p !== "object" || p === null || p.version !== 1 || !p.origin || !Array.isArray(p.buffer)
  ) {
    throw new UserError("the saved data position is not one this trainer wrote (version 1)");
  }
  // Positions saved before packing and augmentation existed mean the defaults.
  const saved = {
    ...p,
    packing: p.kind === "pretrain" ? p.packing ?? "pack" : undefined,
    augment: p.kind === "sft" ? p.augment ?? "none" : undefined,
  };
  const fields = [
    "format",
    "kind",
    "seqLen",
    "seed",
    "shuffleBuffer",
    "shuffleFiles",
    "packing",
    "augment",
  ] as const;
  for (const f of fields) {
    if (saved[f] !== now[f]) {
      throw new UserError(
        `cannot resume the data stream: ${f} was ${
          JSON.stringify(saved[f])
        } when it was saved and is ` +
          `${JSON.stringify(now[f])} now; resume with the same data settings`,
      );
    }
  }
  if (p.files.length !== now.files.length) {
    throw new UserError(
      `cannot resume the data stream: it was saved over ${p.files.length} files and --data now ` +
        `gives ${now.files.length}; resume with the same --data`,
    );
  }
  for (let i = 0; i < p.files.length; i++) {
    const a = p.files[i];
    const b = now.files[i];
    if (a.path !== b.path || a.bytes !== b.bytes) {
      throw new UserError(
        `cannot resume the data stream: file ${
          i + 1
        } was ${a.path} (${a.bytes} bytes) when it was ` +
          `saved and is ${b.path} (${b.bytes} bytes) now; resume with the same, unchanged data`,
      );
    }
  }
}

/**
 * The shortest row length that keeps every trained target of `opts.data`: one
 * pass over it (in file order, no shuffle) at rows of `opts.seqLen` tokens,
 * taking the position of the last masked-in target of each row. A row longer
 * than that is padding a causal model never looks back at, so training on
 * rows of this length gives the same losses and gradients as at
 * `opts.seqLen` (up to the order of floating-point sums over rows). Rounded
 * up to a multiple of `multiple` (default 16), at most `opts.seqLen`. Rows cut
 * at `opts.seqLen` need all of it, and so does SFT with random augmentations.
 *
 * @example
 * ```ts ignore
 * // The experiment's SFT stages: conversations of at most 95 tokens -> 96.
 * const T = await trainedRowLength({ data: ["sft.jsonl"], kind: "sft", tokenizer, batchSize: 64, seqLen: 128 });
 * ```
 */
export async function trainedRowLength(opts: DataStreamOptions, multiple = 16): Promise<number> {
  // Random augmentations lengthen rows by a draw: no pass can bound them.
  if (opts.augment && augmentationActive(opts.augment)) return opts.seqLen;
  const stream = await DataStream.open({
    ...opts,
    shuffleBuffer: 0,
    shuffleFiles: false,
    maxEpochs: 1,
    augment: undefined,
    tokenizeWorkers: 0,
  });
  let need = 1;
  try {
    for (let batch = await stream.next(); batch; batch = await stream.next()) {
      const { T, B, mask } = batch;
      for (let b = 0; b < B; b++) {
        for (let t = T - 1; t >= need; t--) {
          if (mask[b * T + t] !== 0) {
            need = t + 1;
            break;
          }
        }
      }
    }
  } finally {
    stream.close();
  }
  return Math.min(opts.seqLen, Math.ceil(need / multiple) * multiple);
}
