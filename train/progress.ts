/**
 * The progress display: on a terminal, one live line (step/total, loss, lr,
 * tokens/s, MFU or GFLOP/s, ETA) rewritten in place; otherwise plain log
 * lines, one per logged step, that read well in CI logs and files.
 */

/** One progress update. */
export interface ProgressUpdate {
  step: number;
  loss: number;
  lr: number;
  tokensPerSecond: number;
  /** Model FLOPs utilisation against the adapter's FP32 peak, when the peak is known. */
  mfu?: number;
  /** Achieved model GFLOP/s (shown when MFU cannot be). */
  gflops: number;
  /** Seconds spent in this process's steps, and how many steps that was (for the ETA). */
  elapsed_s: number;
  stepsDone: number;
  /** Figures shown after the loss (DPO: reward margin and accuracy). */
  extra?: string;
}

/** `1h02m`, `3m07s`, `42s`. */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return "?";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

/** Writes progress to the terminal (live line) or as log lines. */
export class Progress {
  #total: number;
  #print: (line: string) => void;
  #live: boolean;
  #shown = false;
  #enc = new TextEncoder();

  constructor(totalSteps: number, print: (line: string) => void, live?: boolean) {
    this.#total = totalSteps;
    this.#print = print;
    this.#live = live ?? Deno.stdout.isTerminal();
  }

  /** The text of one update. */
  format(u: ProgressUpdate): string {
    const width = String(this.#total).length;
    const eta = u.stepsDone > 0 ? (u.elapsed_s / u.stepsDone) * (this.#total - u.step) : NaN;
    const speed = u.mfu !== undefined
      ? `MFU ${(u.mfu * 100).toFixed(1)}%`
      : `${u.gflops.toFixed(u.gflops < 10 ? 2 : 0)} GFLOP/s`;
    return `step ${String(u.step).padStart(width)}/${this.#total}  loss ${u.loss.toFixed(4)}${
      u.extra ? `  ${u.extra}` : ""
    }  lr ${u.lr.toExponential(2)}  ${Math.round(u.tokensPerSecond)} tok/s  ${speed}  ETA ${
      formatDuration(eta)
    }`;
  }

  /** Shows an update. */
  update(u: ProgressUpdate): void {
    const line = this.format(u);
    if (this.#live) {
      Deno.stdout.writeSync(this.#enc.encode(`\r\x1b[2K${line}`));
      this.#shown = true;
    } else this.#print(line);
  }

  /** Prints a line of its own (an eval result) without breaking the live line. */
  note(line: string): void {
    this.clear();
    this.#print(line);
  }

  /** Ends the live line. */
  clear(): void {
    if (this.#live && this.#shown) {
      Deno.stdout.writeSync(this.#enc.encode("\n"));
      this.#shown = false;
    }
  }
}
