/**
 * Random access to the bytes of a file or an in-memory buffer: what the
 * checkpoint readers (`io/safetensors.ts`, `io/pth.ts`) parse from, so that a
 * multi-gigabyte file is read tensor by tensor, never whole.
 *
 * @module
 */
import { UserError } from "../util/errors.ts";

/** Random access to `size` bytes. */
export interface ByteSource {
  readonly size: number;
  /** `length` bytes at `offset` (a fresh array); the caller has checked the range against `size`. */
  readAt(offset: number, length: number): Promise<Uint8Array>;
  /** Releases the file; later reads fail. Closing twice is harmless. */
  close(): void;
}

/** The bytes of `bytes` (each read is a copy, so callers may keep or align it freely). */
export function bufferSource(bytes: Uint8Array): ByteSource {
  return {
    size: bytes.length,
    readAt: (offset, length) => Promise.resolve(bytes.slice(offset, offset + length)),
    close: () => {},
  };
}

/**
 * The file at `path`, opened for reading. A missing, unreadable or non-regular
 * file is a `UserError` naming it; so is a file that ends early (truncated or
 * changed while open). Reads are serialized: a seek and a read on one handle
 * must not interleave with another's.
 */
export async function fileSource(path: string): Promise<ByteSource> {
  let file: Deno.FsFile;
  try {
    file = await Deno.open(path, { read: true });
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new UserError(`${path}: no such file`);
    throw new UserError(`${path}: cannot open: ${(e as Error).message}`);
  }
  const info = await file.stat();
  if (!info.isFile) {
    file.close();
    throw new UserError(`${path}: not a regular file`);
  }
  let queue: Promise<unknown> = Promise.resolve();
  let closed = false;
  const readAt = (offset: number, length: number): Promise<Uint8Array> => {
    const run = async () => {
      if (closed) throw new Error(`${path}: read after close`);
      const out = new Uint8Array(length);
      await file.seek(offset, Deno.SeekMode.Start);
      let filled = 0;
      while (filled < length) {
        const n = await file.read(out.subarray(filled));
        if (n === null) {
          throw new UserError(
            `${path}: the file ended at byte ${
              offset + filled
            } while reading ${length} bytes at ${offset}: it was truncated or changed while open`,
          );
        }
        filled += n;
      }
      return out;
    };
    const p = queue.then(run, run);
    queue = p.catch(() => {});
    return p;
  };
  return {
    size: info.size,
    readAt,
    close: () => {
      if (!closed) {
        closed = true;
        file.close();
      }
    },
  };
}
