/**
 * Data parallelism over the ranks of an MPI launch (`dist/comm.ts`), as
 * llm.c does it: every rank holds the whole model, computes the gradients of
 * its share of the step's rows, and the gradients are summed over the ranks
 * (in rank order, so bitwise the same on every rank and in every run) before
 * the clip and AdamW, which then take the same step everywhere.
 *
 * The data order is the one of a single process with the whole batch: every
 * rank reads the same stream with the GLOBAL batch (ranks x per-rank batch
 * rows) and keeps its slice, rows [rank B, (rank + 1) B). So N ranks at batch
 * B train on exactly the rows of one process at batch N B, step for step, and
 * the saved data position is the same on every rank. (Each rank tokenizes the
 * whole stream: with JSONL that repeats the tokenizer's work on every rank;
 * token shards from `trainer data prepare` make it a cheap read.)
 *
 * The loss of a step is the masked mean over ALL rows: each rank divides its
 * masked sum by the step's total mask (known to every rank, since every rank
 * sees every row), so the ranks' losses and gradients simply add up to the
 * global ones.
 *
 * @module
 */
import type { Communicator } from "../dist/comm.ts";
import type { Batch } from "../data/batch.ts";
import type { TrainingModel } from "../model/train_model.ts";

/** One rank's side of data-parallel training. */
export class DataParallel {
  /** The ranks. */
  readonly comm: Communicator;
  /**
   * The last gradient reduction: bytes summed, milliseconds of the all-reduce
   * itself (`ms`: MPI and the rank-order sums, including any wait for a slower
   * rank) and of the whole exchange with the GPU (`totalMs`: reading the
   * gradients back, which waits for the backward, the all-reduce, writing
   * them back).
   */
  lastReduce = { ms: 0, totalMs: 0, bytes: 0 };

  /** Data parallelism over the ranks of `comm`. */
  constructor(comm: Communicator) {
    this.comm = comm;
  }

  /** This rank's rows of a global batch of `size * B` rows. */
  localBatch(global: Batch): Batch {
    const B = global.B / this.comm.size;
    if (!Number.isInteger(B)) {
      throw new Error(
        `a global batch of ${global.B} rows does not split over ${this.comm.size} ranks`,
      );
    }
    const rows = B * global.T;
    const from = this.comm.rank * rows;
    return {
      ids: global.ids.subarray(from, from + rows),
      targets: global.targets.subarray(from, from + rows),
      mask: global.mask.subarray(from, from + rows),
      B,
      T: global.T,
    };
  }

  /** The step's mask total over every row of every rank (the loss's denominator). */
  static maskTotal(globals: Batch[]): number {
    let total = 0;
    for (const b of globals) for (let i = 0; i < b.mask.length; i++) total += b.mask[i];
    return total;
  }

  /**
   * Sums the model's gradients and loss over the ranks, in place: after
   * `forwardBackward`, before the optimizer's step. One all-reduce of the flat
   * gradients with the loss appended.
   */
  async reduce(model: TrainingModel): Promise<void> {
    const t0 = performance.now();
    const grads = await model.readGradients();
    const loss = await model.readLoss();
    const all = new Float32Array(grads.length + 1);
    all.set(grads);
    all[grads.length] = loss;
    const t1 = performance.now();
    await this.comm.allreduceSum(all);
    const ms = performance.now() - t1;
    model.writeGradients(all.subarray(0, grads.length));
    model.writeLoss(all[grads.length]);
    this.lastReduce = { ms, totalMs: performance.now() - t0, bytes: all.byteLength };
  }
}
