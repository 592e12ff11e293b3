/**
 * Tokenization on other CPU cores, for `trainer data prepare --workers N` and
 * for training that reads JSONL (`--data-workers N`, `data/stream_sources.ts`):
 * `TokenizerPool` sends chunks of records to N Web Workers (this file is also
 * the worker's module) and hands the results back in the order the chunks were
 * sent, so the shards are byte for byte those of a single-threaded run.
 *
 * Tokenization is the slow step of preparing data (the JSONL reader runs at
 * tens of MB/s, a BPE tokenizer in JavaScript at about 1 MB/s per core), and
 * records are independent, so it parallelizes across cores.
 */
import { documentTokens } from "./pretrain.ts";
import { assistantMask, maskRendered, type SftConversation } from "./sft.ts";
import { renderAugmented, sampleRng, type SftAugmentation } from "./sft_augment.ts";
import { TextTokenizer } from "./tokenizer.ts";
import { UserError } from "../util/errors.ts";

/** One chunk of records, tokenized to ids (and masks for SFT) of each record. */
export interface EncodedChunk {
  /** All records' ids, one after another. */
  ids: Int32Array<ArrayBuffer>;
  /** Number of ids of each record. */
  lengths: Int32Array<ArrayBuffer>;
  /** SFT: the assistant mask, aligned with `ids`. */
  mask?: Uint8Array<ArrayBuffer>;
}

/**
 * Records to tokenize: pretrain texts, or SFT conversations (with, for the
 * training stream's seeded augmentations, the settings and each record's
 * `[seed, epoch, file, line]` that `sampleRng` seeds its draws from).
 */
export type EncodeRecords =
  | { texts: string[] }
  | {
    conversations: SftConversation[];
    augment?: { settings: SftAugmentation; seeds: [number, number, number, number][] };
  };

type Job = { seq: number } & EncodeRecords;

interface InitMessage {
  type: "init";
  tokenizerJson: string;
  tokenizerConfigJson: string;
  source: string;
}

type Reply = { seq: number; chunk: EncodedChunk } | { seq: number; error: string };

/**
 * Tokenizes records the way `prepareShards` stores them: pretrain texts as
 * `bos, ids..., eos`, conversations as their rendered ids with the assistant mask.
 */
export function encodeChunk(tok: TextTokenizer, records: EncodeRecords): EncodedChunk {
  const parts: ArrayLike<number>[] = [];
  const masks: number[][] = [];
  if ("texts" in records) {
    for (const t of records.texts) parts.push(documentTokens(tok, t));
  } else {
    const aug = records.augment;
    records.conversations.forEach((c, i) => {
      const r = aug
        ? maskRendered(tok, renderAugmented(tok, c, aug.settings, sampleRng(...aug.seeds[i])))
        : assistantMask(tok, c.messages, c.tools);
      parts.push(r.ids);
      masks.push(r.mask);
    });
  }
  const lengths = Int32Array.from(parts, (p) => p.length);
  const total = lengths.reduce((a, b) => a + b, 0);
  const ids = new Int32Array(total);
  const mask = "texts" in records ? undefined : new Uint8Array(total);
  let o = 0;
  parts.forEach((p, i) => {
    ids.set(p, o);
    mask?.set(masks[i], o);
    o += p.length;
  });
  return { ids, lengths, mask };
}

/** A pool of tokenizer workers that returns results in submission order. */
export class TokenizerPool {
  /** Number of workers. */
  readonly size: number;
  #workers: Worker[] = [];
  /** Per worker, the callbacks of its jobs in the order they were sent (a worker answers in order). */
  #waiting: { resolve: (c: EncodedChunk) => void; reject: (e: Error) => void }[][] = [];
  #seq = 0;
  #failed: Error | undefined;

  /** Starts `size` workers, each with its own copy of `tok`. */
  constructor(tok: TextTokenizer, size: number) {
    this.size = size;
    const init: InitMessage = {
      type: "init",
      tokenizerJson: tok.tokenizerJson,
      tokenizerConfigJson: tok.tokenizerConfigJson,
      source: tok.source,
    };
    for (let i = 0; i < size; i++) {
      const w = new Worker(new URL("./tokenize_worker.ts", import.meta.url).href, {
        type: "module",
      });
      const queue: { resolve: (c: EncodedChunk) => void; reject: (e: Error) => void }[] = [];
      w.onmessage = (e: MessageEvent<Reply>) => {
        const job = queue.shift();
        if (!job) return;
        if ("error" in e.data) job.reject(new UserError(e.data.error));
        else job.resolve(e.data.chunk);
      };
      w.onerror = (e: ErrorEvent) => {
        e.preventDefault();
        this.#failed = new Error(`a tokenizer worker failed: ${e.message}`);
        for (const job of queue.splice(0)) job.reject(this.#failed);
      };
      w.postMessage(init);
      this.#workers.push(w);
      this.#waiting.push(queue);
    }
  }

  /** Tokenizes a chunk of records on the next worker (round robin). */
  encode(records: EncodeRecords): Promise<EncodedChunk> {
    if (this.#failed) return Promise.reject(this.#failed);
    const seq = this.#seq++;
    const k = seq % this.size;
    return new Promise((resolve, reject) => {
      this.#waiting[k].push({ resolve, reject });
      this.#workers[k].postMessage({ seq, ...records } as Job);
    });
  }

  /** Stops the workers. */
  close(): void {
    for (const w of this.#workers) w.terminate();
    this.#workers = [];
  }
}

// The worker side: this module, loaded in a Worker, answers jobs in order.
if (typeof (globalThis as { WorkerGlobalScope?: unknown }).WorkerGlobalScope !== "undefined") {
  let tok: TextTokenizer | undefined;
  const scope = globalThis as unknown as {
    onmessage: ((e: MessageEvent<InitMessage | Job>) => void) | null;
    postMessage(message: Reply, transfer?: Transferable[]): void;
  };
  scope.onmessage = (e) => {
    const msg = e.data;
    if ("type" in msg) {
      tok = TextTokenizer.fromJson(msg.tokenizerJson, msg.tokenizerConfigJson, msg.source);
      return;
    }
    try {
      const chunk = encodeChunk(tok!, msg);
      const transfer: Transferable[] = [chunk.ids.buffer, chunk.lengths.buffer];
      if (chunk.mask) transfer.push(chunk.mask.buffer);
      scope.postMessage({ seq: msg.seq, chunk }, transfer);
    } catch (err) {
      scope.postMessage({ seq: msg.seq, error: (err as Error).message });
    }
  };
}
