/** Pretrain packing: document framing, window boundaries, origins for resuming. */
import { assertEquals, assertThrows } from "./assert.ts";
import { TextTokenizer } from "../data/tokenizer.ts";
import { documentTokens, packDocuments, padDocument, TokenPacker } from "../data/pretrain.ts";

const minimind = await TextTokenizer.load("../shared/fixtures/minimind-tokenizer");

Deno.test("documentTokens: bos, the text's ids, eos (MiniMind: 1 ... 2)", () => {
  assertEquals(documentTokens(minimind, "你好，世界！Hello world."), [
    1,
    1968,
    294,
    1950,
    1364,
    1602,
    1707,
    49,
    2,
  ]);
  assertEquals(documentTokens(minimind, ""), [1, 2]);
});

Deno.test("packDocuments: consecutive non-overlapping windows of T+1 over the concatenation; tail dropped", () => {
  const docs = [[1, 10, 11, 12, 2], [1, 20, 2], [1, 30, 31, 32, 33, 34, 2], [1, 40, 2]];
  const stream = docs.flat(); // 18 tokens
  const T = 4;
  const windows = packDocuments(docs, T);
  assertEquals(windows.length, Math.floor(stream.length / (T + 1)));
  windows.forEach((w, k) => {
    assertEquals(Array.from(w), stream.slice(k * (T + 1), (k + 1) * (T + 1)), `window ${k}`);
  });
  // Inputs are w[0..T), targets w[1..T]: the pair (last of window k, first of
  // window k+1) is never trained, as documented in data/pretrain.ts.
  assertEquals(Array.from(windows[0]), [1, 10, 11, 12, 2]);
  assertEquals(Array.from(windows[1]), [1, 20, 2, 1, 30]);
});

Deno.test("TokenPacker: windows name where their first token came from", () => {
  const p = new TokenPacker<string>(4);
  p.push([1, 10, 2], "a");
  assertEquals(p.take(), undefined);
  assertEquals(p.pendingStart(), { origin: "a", offset: 0 });
  p.push([1, 20, 21, 22, 23, 24, 25, 2], "b");
  const w1 = p.take()!;
  assertEquals([Array.from(w1.tokens), w1.origin, w1.offset], [[1, 10, 2, 1], "a", 0]);
  const w2 = p.take()!;
  assertEquals([Array.from(w2.tokens), w2.origin, w2.offset], [[20, 21, 22, 23], "b", 1]);
  assertEquals(p.take(), undefined);
  assertEquals(p.pendingStart(), { origin: "b", offset: 5 });
  assertEquals(p.pendingTokens, 3);
  // A document that ends exactly at a window end: the next window starts at the next one.
  p.push([1, 2], "c");
  const w3 = p.take()!;
  assertEquals([Array.from(w3.tokens), w3.origin, w3.offset], [[24, 25, 2, 1], "b", 5]);
  assertEquals(p.pendingStart(), { origin: "c", offset: 1 });
});

Deno.test("TokenPacker: resuming from (origin, offset) with skip gives the same windows", () => {
  const docs = [[1, 10, 11, 12, 13, 14, 15, 2], [1, 20, 21, 2], [1, 30, 31, 32, 33, 34, 35, 36, 2]];
  const full = new TokenPacker<number>(3);
  const windows: { tokens: number[]; origin: number; offset: number }[] = [];
  for (let d = 0; d < docs.length; d++) {
    full.push(docs[d], d);
    for (let w = full.take(); w; w = full.take()) {
      windows.push({ tokens: Array.from(w.tokens), origin: w.origin, offset: w.offset });
    }
  }
  for (let k = 0; k < windows.length; k++) {
    const resumed = new TokenPacker<number>(3);
    const { origin, offset } = windows[k];
    const got: number[][] = [];
    for (let d = origin; d < docs.length; d++) {
      resumed.push(docs[d], d, d === origin ? offset : 0);
      for (let w = resumed.take(); w; w = resumed.take()) got.push(Array.from(w.tokens));
    }
    assertEquals(got, windows.slice(k).map((w) => w.tokens), `resumed at window ${k}`);
  }
});

Deno.test("TokenPacker: a window needs at least 2 tokens (one input, one target)", () => {
  assertThrows(() => new TokenPacker(1), RangeError, "window length");
});

Deno.test("padDocument: MiniMind's PretrainDataset row: cut to seq_len - 1 text tokens, bos/eos kept, pads masked", () => {
  // seq_len 5: rows of 6 tokens, room for 4 text tokens.
  const long = [1, 10, 11, 12, 13, 14, 15, 2];
  const cut = padDocument(long, 5, 0);
  assertEquals([...cut.ids], [1, 10, 11, 12, 13, 2]);
  assertEquals([...cut.mask], [1, 1, 1, 1, 1, 1]);
  assertEquals(cut.length, 6);
  const exact = padDocument([1, 10, 11, 12, 13, 2], 5, 0);
  assertEquals([...exact.ids], [1, 10, 11, 12, 13, 2]);
  const short = padDocument([1, 10, 2], 5, 9);
  assertEquals([...short.ids], [1, 10, 2, 9, 9, 9]);
  assertEquals([...short.mask], [1, 1, 1, 0, 0, 0]);
  assertEquals(short.length, 3);
  // An empty document is bos, eos: one target.
  assertEquals([...padDocument([1, 2], 3, 0).mask], [1, 1, 0, 0]);
});
