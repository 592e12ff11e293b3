/**
 * Token shards: a corpus tokenized once (`trainer data prepare`) into binary
 * files that training streams at disk speed instead of re-tokenizing JSONL
 * every epoch. The format is in docs/formats.md; in short, each
 * `shard_NNNNN.bin` is a 64-byte little-endian header, the token ids (uint16
 * when the vocabulary fits, else uint32), for SFT a uint8 loss mask per token,
 * and a table of document start offsets; `manifest.json` beside them says what
 * they hold.
 */
import { UserError } from "../util/errors.ts";
import { type DataKind, type ReadCounters, readRecords, SHARD_MANIFEST } from "./sources.ts";
import type { TextTokenizer } from "./tokenizer.ts";
import type { SftConversation } from "./sft.ts";
import { encodeChunk, type EncodedChunk, TokenizerPool } from "./tokenize_worker.ts";

/** The 8 bytes every shard starts with. */
export const SHARD_MAGIC = "TRNTOKS\0";
/** The format version this code writes and reads. */
export const SHARD_VERSION = 1;
/** Bytes before the token array. */
export const SHARD_HEADER_BYTES = 64;

/** What a shard's header says. */
export interface ShardHeader {
  /** Format version (1). */
  version: number;
  /** 2 (uint16 ids) or 4 (uint32 ids). */
  bytesPerToken: 2 | 4;
  /** Whether a uint8 loss mask follows the tokens (SFT shards). */
  hasMask: boolean;
  /** Number of token ids. */
  tokens: number;
  /** Number of documents (pretrain) or conversations (SFT). */
  documents: number;
  /** Vocabulary size of the tokenizer that wrote it. */
  vocabSize: number;
}

/** Byte offsets of a shard's sections. */
export function shardLayout(h: ShardHeader): { tokens: number; mask: number; offsets: number } {
  const tokens = SHARD_HEADER_BYTES;
  const mask = tokens + h.tokens * h.bytesPerToken;
  const offsets = mask + (h.hasMask ? h.tokens : 0);
  return { tokens, mask, offsets };
}

/** Smallest id width for a vocabulary: uint16 up to 65536 ids, else uint32. */
export function bytesPerTokenFor(vocabSize: number): 2 | 4 {
  return vocabSize <= 65536 ? 2 : 4;
}

function encodeHeader(h: ShardHeader): Uint8Array {
  const buf = new Uint8Array(SHARD_HEADER_BYTES);
  const dv = new DataView(buf.buffer);
  for (let i = 0; i < 8; i++) buf[i] = SHARD_MAGIC.charCodeAt(i);
  dv.setUint32(8, h.version, true);
  dv.setUint32(12, SHARD_HEADER_BYTES, true);
  dv.setUint32(16, h.bytesPerToken, true);
  dv.setUint32(20, h.hasMask ? 1 : 0, true);
  dv.setBigUint64(24, BigInt(h.tokens), true);
  dv.setBigUint64(32, BigInt(h.documents), true);
  dv.setUint32(40, h.vocabSize, true);
  return buf;
}

function decodeHeader(buf: Uint8Array, path: string): ShardHeader {
  if (buf.length < SHARD_HEADER_BYTES) {
    throw new UserError(`${path}: too short for a token shard (${buf.length} bytes)`);
  }
  const magic = String.fromCharCode(...buf.subarray(0, 8));
  if (magic !== SHARD_MAGIC) {
    throw new UserError(
      `${path}: not a token shard (bad magic); make shards with 'trainer data prepare'`,
    );
  }
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const version = dv.getUint32(8, true);
  if (version !== SHARD_VERSION) {
    throw new UserError(
      `${path}: token shard version ${version}; this trainer reads version ${SHARD_VERSION}`,
    );
  }
  const bpt = dv.getUint32(16, true);
  if (bpt !== 2 && bpt !== 4) throw new UserError(`${path}: bad token width ${bpt} in the header`);
  return {
    version,
    bytesPerToken: bpt,
    hasMask: (dv.getUint32(20, true) & 1) === 1,
    tokens: Number(dv.getBigUint64(24, true)),
    documents: Number(dv.getBigUint64(32, true)),
    vocabSize: dv.getUint32(40, true),
  };
}

const littleEndianHost = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** Little-endian ids in `bytes` as an Int32Array. */
function decodeIds(bytes: Uint8Array, bytesPerToken: 2 | 4): Int32Array {
  const n = bytes.length / bytesPerToken;
  const out = new Int32Array(n);
  if (littleEndianHost && bytes.byteOffset % bytesPerToken === 0) {
    out.set(
      bytesPerToken === 2
        ? new Uint16Array(bytes.buffer, bytes.byteOffset, n)
        : new Uint32Array(bytes.buffer, bytes.byteOffset, n),
    );
    return out;
  }
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let i = 0; i < n; i++) {
    out[i] = bytesPerToken === 2 ? dv.getUint16(2 * i, true) : dv.getUint32(4 * i, true);
  }
  return out;
}

/** Writes into a file through a fixed buffer (no per-token syscalls). */
class BufferedFileWriter {
  #file: Deno.FsFile;
  #buf = new Uint8Array(1 << 20);
  #used = 0;
  constructor(file: Deno.FsFile) {
    this.#file = file;
  }
  /** Room for `n` bytes, as a view to fill (n must be <= 1 MiB). */
  async reserve(n: number): Promise<Uint8Array> {
    if (this.#used + n > this.#buf.length) await this.flush();
    const view = this.#buf.subarray(this.#used, this.#used + n);
    this.#used += n;
    return view;
  }
  async write(bytes: Uint8Array): Promise<void> {
    for (let o = 0; o < bytes.length; o += this.#buf.length) {
      const part = bytes.subarray(o, Math.min(bytes.length, o + this.#buf.length));
      (await this.reserve(part.length)).set(part);
    }
  }
  async flush(): Promise<void> {
    let o = 0;
    while (o < this.#used) o += await this.#file.write(this.#buf.subarray(o, this.#used));
    this.#used = 0;
  }
}

/** A temporary file written through a buffer and later appended to the shard. */
class SideFile {
  readonly path: string;
  readonly file: Deno.FsFile;
  readonly out: BufferedFileWriter;
  private constructor(path: string, file: Deno.FsFile) {
    this.path = path;
    this.file = file;
    this.out = new BufferedFileWriter(file);
  }
  static async create(path: string): Promise<SideFile> {
    const file = await Deno.open(path, { read: true, write: true, create: true, truncate: true });
    return new SideFile(path, file);
  }
  /** Copies everything written to `dest` and deletes this file. */
  async appendTo(dest: BufferedFileWriter): Promise<void> {
    await this.out.flush();
    await this.file.seek(0, Deno.SeekMode.Start);
    const buf = new Uint8Array(1 << 20);
    while (true) {
      const n = await this.file.read(buf);
      if (n === null || n === 0) break;
      await dest.write(buf.subarray(0, n));
    }
    this.file.close();
    await Deno.remove(this.path);
  }
}

/** Writes `value` (an integer below 2^53) as a little-endian uint64 at `view[0..8)`. */
function setUint64(view: Uint8Array, value: number): void {
  const dv = new DataView(view.buffer, view.byteOffset, 8);
  dv.setUint32(0, value % 4294967296, true);
  dv.setUint32(4, Math.floor(value / 4294967296), true);
}

/**
 * Writes one shard, a document at a time, in memory independent of its size:
 * ids go to `<path>.tmp` after a placeholder header; the mask and the document
 * offsets go to side files (`.mask.tmp`, `.offsets.tmp`) that `close` appends,
 * before it writes the real header and renames the shard into place.
 */
export class ShardWriter {
  /** Where the finished shard goes. */
  readonly path: string;
  /** 2 (uint16 ids) or 4 (uint32 ids). */
  readonly bytesPerToken: 2 | 4;
  /** Whether a loss mask is stored (SFT). */
  readonly hasMask: boolean;
  /** Ids must be below this. */
  readonly vocabSize: number;
  #file: Deno.FsFile;
  #out: BufferedFileWriter;
  #mask: SideFile | undefined;
  #offsets: SideFile;
  #documents = 0;
  #tokens = 0;

  private constructor(
    path: string,
    opts: { vocabSize: number; hasMask: boolean },
    file: Deno.FsFile,
    mask: SideFile | undefined,
    offsets: SideFile,
  ) {
    this.path = path;
    this.vocabSize = opts.vocabSize;
    this.bytesPerToken = bytesPerTokenFor(opts.vocabSize);
    this.hasMask = opts.hasMask;
    this.#file = file;
    this.#out = new BufferedFileWriter(file);
    this.#mask = mask;
    this.#offsets = offsets;
  }

  /** Starts a shard at `path` for ids below `vocabSize`, with a mask when `hasMask`. */
  static async create(
    path: string,
    opts: { vocabSize: number; hasMask: boolean },
  ): Promise<ShardWriter> {
    const file = await Deno.open(`${path}.tmp`, { write: true, create: true, truncate: true });
    const mask = opts.hasMask ? await SideFile.create(`${path}.mask.tmp`) : undefined;
    const offsets = await SideFile.create(`${path}.offsets.tmp`);
    const w = new ShardWriter(path, opts, file, mask, offsets);
    await w.#out.write(new Uint8Array(SHARD_HEADER_BYTES));
    return w;
  }

  /** Tokens written so far. */
  get tokens(): number {
    return this.#tokens;
  }

  /** Documents written so far. */
  get documents(): number {
    return this.#documents;
  }

  /** Appends one document's ids (and its mask, for SFT shards). */
  async add(ids: ArrayLike<number>, mask?: ArrayLike<number>): Promise<void> {
    if (this.hasMask !== (mask !== undefined)) {
      throw new Error(this.hasMask ? "this shard needs a mask per document" : "unexpected mask");
    }
    if (mask && mask.length !== ids.length) throw new Error("ids and mask differ in length");
    setUint64(await this.#offsets.out.reserve(8), this.#tokens);
    const bpt = this.bytesPerToken;
    const chunk = 1 << 16;
    for (let o = 0; o < ids.length; o += chunk) {
      const n = Math.min(chunk, ids.length - o);
      const view = await this.#out.reserve(n * bpt);
      const dv = new DataView(view.buffer, view.byteOffset, view.byteLength);
      for (let i = 0; i < n; i++) {
        const id = ids[o + i];
        if (!(id >= 0 && id < this.vocabSize)) {
          throw new RangeError(`token id ${id} is outside the vocabulary [0, ${this.vocabSize})`);
        }
        if (bpt === 2) dv.setUint16(2 * i, id, true);
        else dv.setUint32(4 * i, id, true);
      }
      if (mask) {
        const mv = await this.#mask!.out.reserve(n);
        for (let i = 0; i < n; i++) mv[i] = mask[o + i] ? 1 : 0;
      }
    }
    this.#tokens += ids.length;
    this.#documents++;
  }

  /** Finishes the shard: mask and offsets appended, header written, file renamed into place. */
  async close(): Promise<ShardHeader> {
    setUint64(await this.#offsets.out.reserve(8), this.#tokens);
    if (this.#mask) await this.#mask.appendTo(this.#out);
    await this.#offsets.appendTo(this.#out);
    await this.#out.flush();
    const header: ShardHeader = {
      version: SHARD_VERSION,
      bytesPerToken: this.bytesPerToken,
      hasMask: this.hasMask,
      tokens: this.#tokens,
      documents: this.#documents,
      vocabSize: this.vocabSize,
    };
    await this.#file.seek(0, Deno.SeekMode.Start);
    const head = encodeHeader(header);
    let o = 0;
    while (o < head.length) o += await this.#file.write(head.subarray(o));
    this.#file.close();
    await Deno.rename(`${this.path}.tmp`, this.path);
    return header;
  }
}

/**
 * A shard opened for reading: header parsed at open, token, mask and offset
 * sections read on demand as ranges (the caller reads in chunks; nothing loads
 * the whole file).
 */
export class ShardFile {
  /** The shard's path. */
  readonly path: string;
  /** Its parsed header. */
  readonly header: ShardHeader;
  #file: Deno.FsFile;
  #layout: { tokens: number; mask: number; offsets: number };

  private constructor(path: string, header: ShardHeader, file: Deno.FsFile) {
    this.path = path;
    this.header = header;
    this.#file = file;
    this.#layout = shardLayout(header);
  }

  /** Opens and checks a shard (magic, version, size against the header). */
  static async open(path: string): Promise<ShardFile> {
    let file: Deno.FsFile;
    try {
      file = await Deno.open(path, { read: true });
    } catch (e) {
      if (e instanceof Deno.errors.NotFound) {
        throw new UserError(`${path}: shard file missing (listed in ${SHARD_MANIFEST})`);
      }
      throw new UserError(`cannot open ${path}: ${(e as Error).message}`);
    }
    try {
      const head = new Uint8Array(SHARD_HEADER_BYTES);
      const n = await readFully(file, head);
      const header = decodeHeader(head.subarray(0, n), path);
      const size = (await file.stat()).size;
      const want = shardLayout(header).offsets + 8 * (header.documents + 1);
      if (size !== want) {
        throw new UserError(
          `${path}: ${size} bytes, but its header describes ${want}; the shard is truncated or ` +
            `damaged (prepare it again)`,
        );
      }
      return new ShardFile(path, header, file);
    } catch (e) {
      file.close();
      throw e;
    }
  }

  async #readAt(offset: number, bytes: Uint8Array): Promise<void> {
    await this.#file.seek(offset, Deno.SeekMode.Start);
    const n = await readFully(this.#file, bytes);
    if (n !== bytes.length) throw new UserError(`${this.path}: unexpected end of file`);
  }

  /** Token ids `[start, start + count)`. */
  async readTokens(start: number, count: number): Promise<Int32Array> {
    const bpt = this.header.bytesPerToken;
    const bytes = new Uint8Array(count * bpt);
    await this.#readAt(this.#layout.tokens + start * bpt, bytes);
    return decodeIds(bytes, bpt);
  }

  /** Mask bytes `[start, start + count)` (SFT shards). */
  async readMask(start: number, count: number): Promise<Uint8Array> {
    if (!this.header.hasMask) throw new Error(`${this.path} has no mask`);
    const bytes = new Uint8Array(count);
    await this.#readAt(this.#layout.mask + start, bytes);
    return bytes;
  }

  /** Start offsets of documents `[start, start + count]` (count + 1 values; the last is an end). */
  async readDocumentOffsets(start: number, count: number): Promise<Float64Array> {
    const bytes = new Uint8Array(8 * (count + 1));
    await this.#readAt(this.#layout.offsets + 8 * start, bytes);
    const dv = new DataView(bytes.buffer);
    const out = new Float64Array(count + 1);
    for (let i = 0; i <= count; i++) out[i] = Number(dv.getBigUint64(8 * i, true));
    return out;
  }

  /** Closes the file. */
  close(): void {
    this.#file.close();
  }
}

async function readFully(file: Deno.FsFile, buf: Uint8Array): Promise<number> {
  let o = 0;
  while (o < buf.length) {
    const n = await file.read(buf.subarray(o));
    if (n === null || n === 0) break;
    o += n;
  }
  return o;
}

/** `manifest.json` of a shard directory. */
export interface ShardManifest {
  /** Always "trainer-token-shards": what the file is. */
  format: "trainer-token-shards";
  /** Format version (1). */
  version: number;
  /** Pretrain documents, or SFT conversations with a mask. */
  kind: DataKind;
  /** Vocabulary size of the tokenizer. */
  vocabSize: number;
  /** The tokenizer's bos id (starts each pretrain document). */
  bosId: number;
  /** The tokenizer's eos id (ends each pretrain document). */
  eosId: number;
  /** The tokenizer's pad id (fills SFT rows). */
  padId: number;
  /** SHA-256 (hex) of the tokenizer.json the shards were made with. */
  tokenizerSha256: string;
  /** Width of the stored ids. */
  dtype: "uint16" | "uint32";
  /** SFT: conversations were cut to seqLen + 1 tokens; null when not cut. */
  seqLen: number | null;
  /** Documents or conversations stored. */
  documents: number;
  /** Token ids stored. */
  tokens: number;
  /** Bad JSONL lines skipped (with --skip-bad-lines). */
  skippedLines: number;
  /** SFT conversations with no trained token, skipped. */
  skippedConversations: number;
  /** The shard files in order, with their counts. */
  shards: { file: string; tokens: number; documents: number }[];
  /** The JSONL files read. */
  sources: string[];
}

/** Reads and checks a shard directory's manifest. */
export async function readShardManifest(dir: string): Promise<ShardManifest> {
  const path = `${dir.replace(/\/+$/, "")}/${SHARD_MANIFEST}`;
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new UserError(`${dir}: no ${SHARD_MANIFEST}; not a token-shard directory`);
    }
    throw new UserError(`cannot read ${path}: ${(e as Error).message}`);
  }
  let m: ShardManifest;
  try {
    m = JSON.parse(text);
  } catch (e) {
    throw new UserError(`${path}: invalid JSON (${(e as Error).message})`);
  }
  if (typeof m !== "object" || m === null || m.format !== "trainer-token-shards") {
    throw new UserError(
      `${path}: not a token-shard manifest (no "format": "trainer-token-shards")`,
    );
  }
  if (m.version !== SHARD_VERSION) {
    throw new UserError(
      `${path}: manifest version ${m.version}; this trainer reads ${SHARD_VERSION}`,
    );
  }
  if ((m.kind !== "pretrain" && m.kind !== "sft") || !Array.isArray(m.shards)) {
    throw new UserError(`${path}: "kind" must be "pretrain" or "sft" and "shards" a list`);
  }
  return m;
}

/** SHA-256 of a text, as hex. */
export async function sha256Hex(text: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Options of `prepareShards`. */
export interface PrepareOptions {
  /** The tokenizer to encode with (its hash goes into the manifest). */
  tokenizer: TextTokenizer;
  /** JSONL files, in the order to read them. */
  files: string[];
  /** Output directory: created, or empty. */
  out: string;
  /** Pretrain documents or SFT conversations. */
  kind: DataKind;
  /** SFT: cut conversations to seqLen + 1 tokens (what one training row holds). */
  seqLen?: number;
  /** Count and skip lines that are not valid records instead of failing. */
  skipBadLines?: boolean;
  /** Tokens per shard before a new one is started (a document is never split). */
  shardTokens?: number;
  /** Called about once a second and at the end. */
  onProgress?: (p: PrepareProgress) => void;
  /**
   * Tokenize on this many Web Workers (default 1: in this thread). The shards
   * are the same whatever the number.
   */
  workers?: number;
}

/** Progress and final summary of `prepareShards`. */
export interface PrepareProgress {
  /** Documents or conversations written. */
  documents: number;
  /** Token ids written. */
  tokens: number;
  /** Bad lines skipped. */
  skippedLines: number;
  /** SFT conversations with no trained token, skipped. */
  skippedConversations: number;
  /** UTF-8 bytes of JSONL read (decompressed). */
  bytes: number;
  /** Time since the start. */
  seconds: number;
  /** Shards written so far. */
  shards: number;
  /** True for the final summary. */
  done: boolean;
}

/** Default tokens per shard: 100M (200 MB as uint16). */
export const DEFAULT_SHARD_TOKENS = 100_000_000;

/**
 * Tokenizes JSONL files once into token shards in `out`, streaming: memory is
 * a few buffers, whatever the size of the corpus. Pretrain
 * documents are stored as `bos, tokens..., eos` (packing into windows happens
 * at training time, so shards serve any seq_len); SFT conversations as their
 * rendered ids with the assistant mask, skipped (and counted) when no token is
 * trained. `manifest.json` is written last, so an interrupted run leaves no
 * directory that looks complete.
 */
export async function prepareShards(opts: PrepareOptions): Promise<PrepareProgress> {
  const { tokenizer: tok, kind } = opts;
  const shardTokens = opts.shardTokens ?? DEFAULT_SHARD_TOKENS;
  const out = opts.out.replace(/(.)\/+$/, "$1");
  await prepareOutputDir(out);
  const counters: ReadCounters = { skippedLines: 0, records: 0 };
  const t0 = performance.now();
  const p: PrepareProgress = {
    documents: 0,
    tokens: 0,
    skippedLines: 0,
    skippedConversations: 0,
    bytes: 0,
    seconds: 0,
    shards: 0,
    done: false,
  };
  const shards: ShardManifest["shards"] = [];
  let writer: ShardWriter | undefined;
  const finishShard = async () => {
    if (!writer) return;
    const h = await writer.close();
    const file = writer.path.slice(writer.path.lastIndexOf("/") + 1);
    shards.push({ file, tokens: h.tokens, documents: h.documents });
    writer = undefined;
    p.shards = shards.length;
  };
  let lastReport = t0;
  const pool = (opts.workers ?? 1) > 1 ? new TokenizerPool(tok, opts.workers!) : undefined;
  try {
    for await (const doc of encodeRecords(opts, counters, pool)) {
      p.bytes += doc.bytes;
      let ids = doc.ids;
      let mask = doc.mask;
      if (mask) {
        const n = opts.seqLen !== undefined ? Math.min(ids.length, opts.seqLen + 1) : ids.length;
        let trained = false;
        for (let j = 1; j < n && !trained; j++) trained = mask[j] === 1;
        if (!trained) {
          p.skippedConversations++;
          continue;
        }
        ids = ids.subarray(0, n);
        mask = mask.subarray(0, n);
      }
      if (writer && writer.tokens > 0 && writer.tokens + ids.length > shardTokens) {
        await finishShard();
      }
      if (!writer) {
        const name = `shard_${String(shards.length).padStart(5, "0")}.bin`;
        writer = await ShardWriter.create(`${out}/${name}`, {
          vocabSize: tok.vocabSize,
          hasMask: kind === "sft",
        });
      }
      await writer.add(ids, mask);
      p.documents++;
      p.tokens += ids.length;
      const now = performance.now();
      if (opts.onProgress && now - lastReport >= 1000) {
        lastReport = now;
        p.skippedLines = counters.skippedLines;
        p.seconds = (now - t0) / 1000;
        opts.onProgress({ ...p });
      }
    }
  } finally {
    pool?.close();
  }
  await finishShard();
  p.skippedLines = counters.skippedLines;
  if (p.documents === 0) {
    throw new UserError(
      kind === "sft" && p.skippedConversations > 0
        ? `no conversation has an assistant token to train (${p.skippedConversations} skipped)` +
          (opts.seqLen !== undefined ? `; is --seq-len ${opts.seqLen} too short?` : "")
        : `no records in ${opts.files.join(", ")}: the training data is empty`,
    );
  }
  const manifest: ShardManifest = {
    format: "trainer-token-shards",
    version: SHARD_VERSION,
    kind,
    vocabSize: tok.vocabSize,
    bosId: tok.bosId,
    eosId: tok.eosId,
    padId: tok.padId,
    tokenizerSha256: await sha256Hex(tok.tokenizerJson),
    dtype: bytesPerTokenFor(tok.vocabSize) === 2 ? "uint16" : "uint32",
    seqLen: kind === "sft" ? opts.seqLen ?? null : null,
    documents: p.documents,
    tokens: p.tokens,
    skippedLines: p.skippedLines,
    skippedConversations: p.skippedConversations,
    shards,
    sources: opts.files,
  };
  const path = `${out}/${SHARD_MANIFEST}`;
  await Deno.writeTextFile(`${path}.tmp`, JSON.stringify(manifest, null, 2) + "\n");
  await Deno.rename(`${path}.tmp`, path);
  p.seconds = (performance.now() - t0) / 1000;
  p.done = true;
  opts.onProgress?.({ ...p });
  return p;
}

/** Records per tokenization chunk (one message to a worker). */
const CHUNK_RECORDS = 64;

/**
 * The records of `opts.files` in order, tokenized (by `encodeChunk`, on the
 * pool when there is one, with up to two chunks per worker in flight), each
 * with the JSONL bytes it came from.
 */
async function* encodeRecords(
  opts: PrepareOptions,
  counters: ReadCounters,
  pool: TokenizerPool | undefined,
): AsyncGenerator<{ ids: Int32Array; mask?: Uint8Array; bytes: number }> {
  type Records = { texts: string[] } | { conversations: SftConversation[] };
  async function* chunks(): AsyncGenerator<{ records: Records; bytes: number[] }> {
    let texts: string[] = [];
    let conversations: SftConversation[] = [];
    let bytes: number[] = [];
    const take = () => {
      const records = opts.kind === "pretrain" ? { texts } : { conversations };
      const chunk = { records, bytes };
      texts = [];
      conversations = [];
      bytes = [];
      return chunk;
    };
    for (const file of opts.files) {
      const recs = readRecords(file, opts.kind, { skipBadLines: opts.skipBadLines, counters });
      for await (const rec of recs) {
        if (rec.kind === "pretrain") texts.push(rec.text);
        else conversations.push({ messages: rec.messages, tools: rec.tools });
        bytes.push(rec.line.nextByteOffset - rec.line.byteOffset);
        if (bytes.length === CHUNK_RECORDS) yield take();
      }
    }
    if (bytes.length > 0) yield take();
  }
  const split = function* (enc: EncodedChunk, bytes: number[]) {
    let o = 0;
    for (let i = 0; i < enc.lengths.length; i++) {
      const n = enc.lengths[i];
      yield {
        ids: enc.ids.subarray(o, o + n),
        mask: enc.mask?.subarray(o, o + n),
        bytes: bytes[i],
      };
      o += n;
    }
  };
  if (!pool) {
    for await (const c of chunks()) yield* split(encodeChunk(opts.tokenizer, c.records), c.bytes);
    return;
  }
  const source = chunks();
  const inFlight: { result: Promise<EncodedChunk>; bytes: number[] }[] = [];
  let exhausted = false;
  try {
    while (true) {
      while (!exhausted && inFlight.length < 2 * pool.size) {
        const r = await source.next();
        if (r.done) exhausted = true;
        else {
          const result = pool.encode(r.value.records);
          result.catch(() => {}); // awaited in order below; avoid an unhandled rejection meanwhile
          inFlight.push({ result, bytes: r.value.bytes });
        }
      }
      const head = inFlight.shift();
      if (!head) return;
      yield* split(await head.result, head.bytes);
    }
  } finally {
    await source.return(undefined);
  }
}

async function prepareOutputDir(out: string): Promise<void> {
  try {
    const info = await Deno.stat(out);
    if (!info.isDirectory) throw new UserError(`--out ${out} exists and is not a directory`);
    for await (const entry of Deno.readDir(out)) {
      throw new UserError(
        entry.name === SHARD_MANIFEST
          ? `${out} already holds token shards; choose a new --out directory or delete it`
          : `${out} is not empty (it holds ${entry.name}); choose a new or empty --out directory`,
      );
    }
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
    await Deno.mkdir(out, { recursive: true });
  }
}
