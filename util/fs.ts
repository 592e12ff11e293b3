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
