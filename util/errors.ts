/**
 * Errors that the CLI prints as one clear message, without a stack trace.
 *
 * Every folder may throw these; this file depends on nothing, so it does not
 * bend the one-way dependency `main.ts -> train -> model -> kernels`.
 */

/** A problem with what the user gave us (a file, a config, a flag value). Exit status 1. */
export class UserError extends Error {
  /** Process exit status the CLI uses for this error. */
  readonly exitCode: number;
  /** `message` is printed as it is; `exitCode` defaults to 1. */
  constructor(message: string, exitCode = 1) {
    super(message);
    this.name = "UserError";
    this.exitCode = exitCode;
  }
}

/** A malformed command line: printed with the command's usage. Exit status 2. */
export class UsageError extends UserError {
  /** `message` says what was wrong with the command line; the exit status is 2. */
  constructor(message: string) {
    super(message, 2);
    this.name = "UsageError";
  }
}
