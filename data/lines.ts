/**
 * A line-splitting `TransformStream` for text streams (the part of `@std/streams`
 * we need; JSR is unreachable from our build machines).
 *
 * It sits after a `TextDecoderStream` and emits one `Line` per `\n`-terminated
 * line (and one for a last line without `\n`). Each line carries its 1-based
 * line number and the byte offset where it starts in the underlying UTF-8
 * bytes, so a reader can save its position as a byte offset and seek back to it
 * on resume. The byte length of a line is recomputed from its decoded text: a
 * fatal `TextDecoder` only lets valid UTF-8 through, and valid UTF-8 decodes to
 * text that re-encodes to exactly the same bytes.
 */

/** One line of text. */
export interface Line {
  /** The line without its `\n` or `\r\n` terminator (and without a leading BOM). */
  text: string;
  /** 1-based line number. */
  number: number;
  /** Byte offset of the line's first byte in the UTF-8 input. */
  byteOffset: number;
  /** Byte offset just past the line's terminator: where the next line starts. */
  nextByteOffset: number;
}

/** Where a `LineSplitStream` starts counting, for a stream opened mid-file. */
export interface LineSplitOptions {
  /** Line number of the first line (default 1). */
  firstLine?: number;
  /** Byte offset of the first byte (default 0). A BOM is only stripped at offset 0. */
  firstByte?: number;
}

/**
 * Splits decoded text into `Line`s on `\n`, dropping a `\r` before it (CRLF files)
 * and a byte-order mark at the start of the file. Blank lines are emitted (with
 * empty text) so that line numbers stay right; skipping them is the reader's choice.
 *
 * Give the `TextDecoderStream` `ignoreBOM: true`: the BOM then reaches this
 * stream as U+FEFF, is counted as its 3 bytes, and is stripped here.
 *
 * @example
 * ```ts
 * const lines = ReadableStream.from(["a\r\nb", "c\n\nd"]).pipeThrough(new LineSplitStream());
 * const texts: string[] = [];
 * for await (const line of lines) texts.push(line.text);
 * // texts: ["a", "bc", "", "d"]
 * ```
 */
export class LineSplitStream extends TransformStream<string, Line> {
  /** A splitter whose first line has number `firstLine` and starts at byte `firstByte`. */
  constructor(opts: LineSplitOptions = {}) {
    let partial = "";
    let number = opts.firstLine ?? 1;
    let offset = opts.firstByte ?? 0;
    let atFileStart = offset === 0;
    const emit = (
      raw: string,
      terminated: boolean,
      out: TransformStreamDefaultController<Line>,
    ) => {
      const bytes = utf8Length(raw) + (terminated ? 1 : 0);
      let text = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
      if (atFileStart) {
        if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
        atFileStart = false;
      }
      out.enqueue({ text, number, byteOffset: offset, nextByteOffset: offset + bytes });
      number++;
      offset += bytes;
    };
    super({
      transform(chunk, out) {
        let start = 0;
        let nl = chunk.indexOf("\n");
        if (nl >= 0 && partial.length > 0) {
          emit(partial + chunk.slice(0, nl), true, out);
          partial = "";
          start = nl + 1;
          nl = chunk.indexOf("\n", start);
        }
        while (nl >= 0) {
          emit(chunk.slice(start, nl), true, out);
          start = nl + 1;
          nl = chunk.indexOf("\n", start);
        }
        partial += chunk.slice(start);
      },
      flush(out) {
        if (partial.length > 0) emit(partial, false, out);
        partial = "";
      },
    });
  }
}

/** Number of bytes of `s` in UTF-8 (a surrogate pair is one 4-byte code point). */
export function utf8Length(s: string): number {
  let n = s.length;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x80) continue;
    if (c < 0x800) n += 1;
    else if (c >= 0xd800 && c <= 0xdbff) {
      // High surrogate: with its low half (2 UTF-16 units) it is 4 bytes.
      n += 2;
      i++;
    } else n += 2;
  }
  return n;
}
