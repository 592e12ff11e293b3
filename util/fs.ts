/**
 * Small file-system helpers shared across layers.
 *
 * @module
 */

/** Whether `path` exists (a file, directory or anything `Deno.stat` can see). */
export async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch {
    return false;
  }
}

/**
 * Writes `records` as JSONL (one `JSON.stringify` per line) to `path`, unless
 * the file already holds exactly that text. Another run may be reading the
 * file right now, so a changed file is replaced whole: written aside, then
 * renamed over it.
 */
export async function writeJsonlIfChanged(
  path: string,
  records: readonly unknown[],
): Promise<void> {
  const text = records.map((r) => JSON.stringify(r)).join("\n") + "\n";
  const current = await Deno.readTextFile(path).catch(() => undefined);
  if (current === text) return;
  const tmp = `${path}.tmp-${crypto.randomUUID()}`;
  await Deno.writeTextFile(tmp, text);
  await Deno.rename(tmp, path);
}
