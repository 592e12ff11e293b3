/**
 * `metrics.jsonl`: one JSON object per logged step (`split: "train"`) and per
 * evaluation (`split: "eval"`), appended as the run goes, so a crash loses
 * nothing already logged and a resumed run continues the same file.
 */

/** A logged training step. */
export interface TrainMetrics {
  step: number;
  split: "train";
  loss: number;
  lr: number;
  grad_norm: number;
  /** Tokens consumed so far in the run (inputs, masked or not). */
  tokens: number;
  tokens_per_s: number;
  elapsed_s: number;
  /** Data parallel: milliseconds of the step's gradient all-reduce (absent for one process). */
  allreduce_ms?: number;
  /** DPO: the step's mean rewards β (π - ρ), their difference, and the share of pairs won. */
  reward_chosen?: number;
  reward_rejected?: number;
  reward_margin?: number;
  reward_accuracy?: number;
}

/** A held-out evaluation. */
export interface EvalMetrics {
  step: number;
  split: "eval";
  loss: number;
  /** exp(loss), for the next-token losses (absent for DPO, whose loss is not one). */
  perplexity?: number;
  tokens: number;
  elapsed_s: number;
  /** DPO: mean rewards, margin and accuracy over the held-out pairs. */
  reward_chosen?: number;
  reward_rejected?: number;
  reward_margin?: number;
  reward_accuracy?: number;
}

/** One line of `metrics.jsonl`. */
export type MetricsRecord = TrainMetrics | EvalMetrics;

/**
 * Appends records to a metrics file. Each write opens, appends and closes, so
 * the writer follows the file when a checkpoint save swaps the directory.
 */
export class MetricsWriter {
  readonly path: string;

  private constructor(path: string) {
    this.path = path;
  }

  /**
   * Opens `path`. A fresh run truncates it; a resumed run keeps the lines up to
   * and including `keepThroughStep` and drops later ones (they belong to steps
   * that will be run again).
   */
  static async open(path: string, opts: { keepThroughStep?: number } = {}): Promise<MetricsWriter> {
    let kept = "";
    if (opts.keepThroughStep !== undefined) {
      const old = await readMetrics(path);
      kept = old.filter((r) => r.step <= opts.keepThroughStep!).map((r) => JSON.stringify(r) + "\n")
        .join("");
    }
    await Deno.writeTextFile(path, kept);
    return new MetricsWriter(path);
  }

  /** Appends one record. */
  async write(record: MetricsRecord): Promise<void> {
    await Deno.writeTextFile(this.path, JSON.stringify(record) + "\n", { append: true });
  }
}

/** The records of a metrics file (empty when it does not exist). */
export async function readMetrics(path: string): Promise<MetricsRecord[]> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return [];
    throw e;
  }
  const out: MetricsRecord[] = [];
  for (const line of text.split("\n")) {
    if (line.trim() === "") continue;
    try {
      out.push(JSON.parse(line));
    } catch {
      // A line cut by a crash mid-write: the records before it stand.
      break;
    }
  }
  return out;
}
