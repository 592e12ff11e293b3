/**
 * Hugging Face tokenizers, loaded from a directory's `tokenizer.json` and
 * `tokenizer_config.json` (MiniMind's files work as they are), with the chat
 * template rendered the way `transformers`' `apply_chat_template` renders it,
 * and a streaming detokenizer for generation.
 *
 * Encoding and decoding are `@huggingface/tokenizers` (the tokenizer layer of
 * transformers.js); chat templates are `@huggingface/jinja`, which lexes with
 * `trim_blocks` and `lstrip_blocks` on, as transformers' Jinja environment does.
 */
import { Tokenizer } from "@huggingface/tokenizers";
import { Template } from "@huggingface/jinja";
import { UserError } from "../util/errors.ts";

/** One turn of a conversation, as in MiniMind's SFT data. */
export interface ChatMessage {
  /** Who speaks this turn. */
  role: "system" | "user" | "assistant";
  /** The turn's text. */
  content: string;
}

/** Options of `TextTokenizer.decode`. */
export interface DecodeOptions {
  /** Drop special tokens (`<|im_start|>` etc.) from the text. Default false. */
  skipSpecialTokens?: boolean;
}

/** A JSON value, as parsed from a data record. */
export type JsonValue =
  | string
  | number
  | boolean
  | null
  | JsonValue[]
  | { [key: string]: JsonValue };

/**
 * One message as a chat template sees it: a `ChatMessage`, or one of the turns
 * MiniMind's SFT data holds beyond it (a `tool` result, an assistant turn with
 * `tool_calls` or `reasoning_content`). Field names are the template's.
 */
export interface TemplateMessage {
  /** `system`, `user`, `assistant` or `tool`. */
  role: string;
  /** The turn's text. */
  content: string;
  /** An assistant turn's reasoning, rendered inside `<think>...</think>` by MiniMind's template. */
  reasoning_content?: string;
  /** An assistant turn's calls: `{"name", "arguments"}` or `{"function": {...}}` objects. */
  tool_calls?: JsonValue[];
}

/** Options of `TextTokenizer.applyChatTemplate`. */
export interface ChatTemplateOptions {
  /** Append the header that opens an assistant turn (for generation). Default false. */
  addGenerationPrompt?: boolean;
  /** Tool definitions, given to the template as `tools` (transformers' `tools=`). */
  tools?: JsonValue[];
}

type JsonObject = Record<string, unknown>;

/**
 * A Hugging Face tokenizer plus its config: encode, decode, special ids and the
 * chat template.
 *
 * @example
 * ```ts
 * import { TextTokenizer } from "./tokenizer.ts";
 * const tok = await TextTokenizer.load("../shared/fixtures/minimind-tokenizer");
 * const ids = tok.encode("你好，世界！Hello world."); // [1968, 294, 1950, 1364, 1602, 1707, 49]
 * const text = tok.decode(ids); // "你好，世界！Hello world."
 * const prompt = tok.applyChatTemplate([{ role: "user", content: "Hi" }], {
 *   addGenerationPrompt: true,
 * });
 * ```
 */
export class TextTokenizer {
  /** Number of token ids, added and special tokens included (the embedding's row count). */
  readonly vocabSize: number;
  /** Id of `bos_token` (falls back to `eosId` when the config names no BOS, as Qwen's do). */
  readonly bosId: number;
  /** Id of `eos_token`. */
  readonly eosId: number;
  /** Id of `pad_token` (falls back to `eosId` when the config names none, as Llama's do). */
  readonly padId: number;
  /** The raw `tokenizer.json` text, copied into checkpoints unchanged. */
  readonly tokenizerJson: string;
  /** The raw `tokenizer_config.json` text, copied into checkpoints unchanged. */
  readonly tokenizerConfigJson: string;
  /** Where the files came from, for error messages. */
  readonly source: string;

  #tok: Tokenizer;
  #fast: ByteLevelBpe | undefined;
  #config: JsonObject;
  #template: Template | undefined;
  #templateVariables: JsonObject;

  private constructor(tokenizerJson: string, tokenizerConfigJson: string, source: string) {
    const json = parseJsonObject(tokenizerJson, `${source}/tokenizer.json`);
    const config = parseJsonObject(tokenizerConfigJson, `${source}/tokenizer_config.json`);
    if (typeof json["model"] !== "object" || json["model"] === null) {
      throw new UserError(
        `${source}/tokenizer.json: no "model" section; is this a tokenizer.json?`,
      );
    }
    try {
      this.#tok = new Tokenizer(json, config);
    } catch (e) {
      throw new UserError(
        `${source}/tokenizer.json: cannot build the tokenizer: ${(e as Error).message}`,
      );
    }
    this.#fast = ByteLevelBpe.tryCreate(json, config);
    this.tokenizerJson = tokenizerJson;
    this.tokenizerConfigJson = tokenizerConfigJson;
    this.source = source;
    this.#config = config;

    let maxId = -1;
    for (const id of this.#tok.get_vocab(true).values()) maxId = Math.max(maxId, id);
    for (const id of this.#tok.get_added_tokens_decoder().keys()) maxId = Math.max(maxId, id);
    this.vocabSize = maxId + 1;

    const eos = this.#specialId("eos_token");
    if (eos === undefined) {
      throw new UserError(
        `${source}/tokenizer_config.json: no "eos_token"; the trainer needs one to end documents and turns`,
      );
    }
    this.eosId = eos;
    this.bosId = this.#specialId("bos_token") ?? eos;
    this.padId = this.#specialId("pad_token") ?? eos;

    // transformers passes the special-tokens map to the template as variables.
    this.#templateVariables = {};
    for (const key of ["bos_token", "eos_token", "unk_token", "pad_token"]) {
      const s = tokenString(config[key]);
      if (s !== undefined) this.#templateVariables[key] = s;
    }
    const extra = config["additional_special_tokens"];
    if (Array.isArray(extra)) {
      this.#templateVariables["additional_special_tokens"] = extra.map(tokenString).filter((s) =>
        s !== undefined
      );
    }
    const templateText = pickChatTemplate(config["chat_template"]);
    if (templateText !== undefined) {
      try {
        this.#template = new Template(templateText);
      } catch (e) {
        throw new UserError(
          `${source}/tokenizer_config.json: the chat_template does not parse: ${
            (e as Error).message
          }`,
        );
      }
    }
  }

  /**
   * Loads `tokenizer.json` and `tokenizer_config.json` from a directory (and
   * `chat_template.jinja`, where the config has no `chat_template`, as recent
   * transformers save it). A missing or malformed file is a `UserError` that names it.
   */
  static async load(dir: string): Promise<TextTokenizer> {
    const read = async (name: string): Promise<string> => {
      const path = `${dir.replace(/\/+$/, "")}/${name}`;
      try {
        return await Deno.readTextFile(path);
      } catch (e) {
        if (e instanceof Deno.errors.NotFound) {
          throw new UserError(
            `${path} not found: a tokenizer directory needs tokenizer.json and tokenizer_config.json ` +
              `(as saved by Hugging Face tokenizers, or by 'trainer tokenizer train')`,
          );
        }
        throw new UserError(`cannot read ${path}: ${(e as Error).message}`);
      }
    };
    // One after the other, so that the error names the first missing file.
    const json = await read("tokenizer.json");
    let config = await read("tokenizer_config.json");
    // Recent transformers save the template beside the config, in
    // chat_template.jinja. Fold it into the config text so that whatever copies
    // `tokenizerConfigJson` (checkpoints) carries it too.
    let jinja: string | undefined;
    try {
      jinja = await Deno.readTextFile(`${dir.replace(/\/+$/, "")}/chat_template.jinja`);
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) {
        throw new UserError(`cannot read ${dir}/chat_template.jinja: ${(e as Error).message}`);
      }
    }
    if (jinja !== undefined) {
      const parsed = parseJsonObject(config, `${dir}/tokenizer_config.json`);
      if (parsed["chat_template"] === undefined) {
        parsed["chat_template"] = jinja;
        config = JSON.stringify(parsed, null, 2) + "\n";
      }
    }
    return new TextTokenizer(json, config, dir);
  }

  /** Builds a tokenizer from the two files' texts; `source` names them in errors. */
  static fromJson(
    tokenizerJson: string,
    tokenizerConfigJson: string,
    source = "<tokenizer>",
  ): TextTokenizer {
    return new TextTokenizer(tokenizerJson, tokenizerConfigJson, source);
  }

  /**
   * Token ids of `text`. No BOS/EOS is added; special-token strings inside the
   * text (e.g. `<|im_start|>`) become their ids, as Hugging Face tokenizers do.
   */
  encode(text: string): number[] {
    if (text.length === 0) return [];
    return this.#fast?.encode(text) ?? this.#tok.encode(text, { add_special_tokens: false }).ids;
  }

  /** Text of `ids`; invalid UTF-8 (a cut multi-byte character) decodes to U+FFFD. */
  decode(ids: ArrayLike<number>, opts: DecodeOptions = {}): string {
    if (ids.length === 0) return "";
    const list = Array.from(ids);
    for (const id of list) {
      if (!Number.isInteger(id) || id < 0 || id >= this.vocabSize) {
        throw new RangeError(`token id ${id} is outside the vocabulary [0, ${this.vocabSize})`);
      }
    }
    return this.#tok.decode(list, { skip_special_tokens: opts.skipSpecialTokens ?? false });
  }

  /** The token string of `id` (byte-level tokens show their GPT-2 alphabet form). */
  idToToken(id: number): string | undefined {
    return this.#tok.id_to_token(id);
  }

  /** The id of a token string, or undefined when it is not in the vocabulary. */
  tokenToId(token: string): number | undefined {
    return this.#tok.token_to_id(token);
  }

  /**
   * Whether `encode` takes the cached byte-level BPE path (MiniMind's, GPT-2's
   * and our trained tokenizers) rather than the general library path.
   */
  get fastEncode(): boolean {
    return this.#fast !== undefined;
  }

  /** Whether the config carries a `chat_template`. */
  get hasChatTemplate(): boolean {
    return this.#template !== undefined;
  }

  /**
   * Renders a conversation with the config's `chat_template`, as
   * `apply_chat_template(messages, tokenize=False)` does in transformers: the
   * special-token strings are template variables and `raise_exception` aborts
   * with the template's message (as a `UserError`).
   */
  applyChatTemplate(
    messages: readonly TemplateMessage[],
    opts: ChatTemplateOptions = {},
  ): string {
    if (this.#template === undefined) {
      throw new UserError(
        `${this.source}/tokenizer_config.json has no "chat_template"; SFT and chat need one ` +
          `(add a ChatML template, or train a tokenizer with 'trainer tokenizer train')`,
      );
    }
    try {
      return this.#template.render({
        ...this.#templateVariables,
        messages: messages.map(templateMessage),
        add_generation_prompt: opts.addGenerationPrompt ?? false,
        // Absent, not null: a template tests `tools is defined` as often as `if tools`.
        ...(opts.tools !== undefined ? { tools: opts.tools } : {}),
      });
    } catch (e) {
      throw new UserError(
        `${this.source}: the chat template failed on this conversation: ${(e as Error).message}`,
      );
    }
  }

  #specialId(key: string): number | undefined {
    const value = this.#config[key];
    if (value === undefined || value === null) return undefined;
    const s = tokenString(value);
    if (s === undefined) {
      throw new UserError(
        `${this.source}/tokenizer_config.json: "${key}" must be a string or {"content": ...}`,
      );
    }
    const id = this.#tok.token_to_id(s);
    if (id === undefined) {
      throw new UserError(
        `${this.source}/tokenizer_config.json: ${key} "${s}" is not a token of tokenizer.json`,
      );
    }
    return id;
  }
}

/** A message for the template: only the fields it has, so `is defined` tests see what the data says. */
function templateMessage(m: TemplateMessage): Record<string, unknown> {
  const out: Record<string, unknown> = { role: m.role, content: m.content };
  if (m.reasoning_content !== undefined) out.reasoning_content = m.reasoning_content;
  if (m.tool_calls !== undefined) out.tool_calls = m.tool_calls;
  return out;
}

/**
 * Incremental detokenizer for generation. Pushing ids one at a time returns
 * text that is safe to print: a character spread over several byte-level
 * tokens comes out whole once its last byte arrives, never as U+FFFD. The
 * concatenation of all `push` results and `flush()` equals `decode(allIds)`.
 *
 * It decodes a short window (the ids since the last emitted text plus the
 * ones before them) rather than everything so far, so each push costs O(window),
 * the scheme of Hugging Face text-generation-inference: decoding from a
 * context token keeps decoders that treat the first token specially
 * (Metaspace's leading space) consistent.
 *
 * @example
 * ```ts
 * import { StreamingDecoder, TextTokenizer } from "./tokenizer.ts";
 * const tok = await TextTokenizer.load("../shared/fixtures/minimind-tokenizer");
 * const stream = new StreamingDecoder(tok);
 * let shown = "";
 * for (const id of tok.encode("鑫淼 ok")) shown += stream.push(id); // whole characters only
 * shown += stream.flush(); // "鑫淼 ok"
 * ```
 */
export class StreamingDecoder {
  #tok: TextTokenizer;
  #skip: boolean;
  #ids: number[] = [];
  /** Start of the context window: ids in [prefix, read) were already emitted. */
  #prefix = 0;
  #read = 0;

  /** A decoder over `tok`'s ids; `opts.skipSpecialTokens` as in `TextTokenizer.decode`. */
  constructor(tok: TextTokenizer, opts: DecodeOptions = {}) {
    this.#tok = tok;
    this.#skip = opts.skipSpecialTokens ?? false;
  }

  /** Adds one id; returns the text that became final (possibly ""). */
  push(id: number): string {
    this.#ids.push(id);
    const opts = { skipSpecialTokens: this.#skip };
    const prefixText = this.#tok.decode(this.#ids.slice(this.#prefix, this.#read), opts);
    const newText = this.#tok.decode(this.#ids.slice(this.#prefix), opts);
    // A trailing U+FFFD means the last token ended inside a multi-byte character:
    // wait for the rest of its bytes.
    if (newText.length > prefixText.length && !newText.endsWith("\uFFFD")) {
      this.#prefix = this.#read;
      this.#read = this.#ids.length;
      // Drop ids before the window: the decoded text no longer depends on them.
      if (this.#prefix > 0) {
        this.#ids = this.#ids.slice(this.#prefix);
        this.#read -= this.#prefix;
        this.#prefix = 0;
      }
      return newText.slice(prefixText.length);
    }
    return "";
  }

  /** Returns whatever is still held back (an incomplete character as U+FFFD) and resets. */
  flush(): string {
    const opts = { skipSpecialTokens: this.#skip };
    const prefixText = this.#tok.decode(this.#ids.slice(this.#prefix, this.#read), opts);
    const newText = this.#tok.decode(this.#ids.slice(this.#prefix), opts);
    this.#ids = [];
    this.#prefix = 0;
    this.#read = 0;
    return newText.slice(prefixText.length);
  }
}

/**
 * A faster encoder for the common case of MiniMind's, GPT-2's and our own
 * tokenizers: no normalizer, ByteLevel pre-tokenizer with its regex and no
 * prefix space, plain BPE, added tokens matched as they are. It does what
 * `@huggingface/tokenizers` does for such files (tests compare the two on
 * large texts) but caches whole pre-tokens' ids, so a repeated word costs one
 * Map lookup instead of UTF-8 encoding and a BPE pass: several times faster on
 * real text. Any other configuration goes through the library.
 */
class ByteLevelBpe {
  // The library's pattern, JavaScript `\s` included, so both paths agree exactly.
  static #pattern = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;
  static #maxCache = 200_000;

  #vocab: Map<string, number>;
  #ranks: Map<string, number>;
  #added: Map<string, number>;
  #addedTrie: Map<string, unknown> | undefined;
  #byteChar: string[];
  #cache = new Map<string, number[]>();
  #encoder = new TextEncoder();

  private constructor(
    vocab: Map<string, number>,
    ranks: Map<string, number>,
    added: Map<string, number>,
    byteChar: string[],
  ) {
    this.#vocab = vocab;
    this.#ranks = ranks;
    this.#added = added;
    this.#byteChar = byteChar;
    this.#addedTrie = added.size > 0 ? buildTrie([...added.keys()]) : undefined;
  }

  /** The fast encoder, or undefined when the files ask for anything it does not do. */
  static tryCreate(json: JsonObject, config: JsonObject): ByteLevelBpe | undefined {
    const pre = json["pre_tokenizer"] as JsonObject | null | undefined;
    const model = json["model"] as JsonObject;
    if (json["normalizer"] != null || pre == null || pre["type"] !== "ByteLevel") return undefined;
    if (pre["add_prefix_space"] === true || pre["use_regex"] === false) return undefined;
    if (model["type"] !== "BPE" || model["dropout"] != null || model["ignore_merges"] === true) {
      return undefined;
    }
    if (model["byte_fallback"] === true || model["end_of_word_suffix"] != null) return undefined;
    if (model["continuing_subword_suffix"] != null || model["continuing_subword_prefix"] != null) {
      return undefined;
    }
    if (config["remove_space"] === true || config["do_lowercase_and_remove_accent"] === true) {
      return undefined;
    }
    const rawVocab = model["vocab"];
    const rawMerges = model["merges"];
    if (typeof rawVocab !== "object" || rawVocab === null || !Array.isArray(rawMerges)) {
      return undefined;
    }
    const vocab = new Map<string, number>(Object.entries(rawVocab as Record<string, number>));
    const ranks = new Map<string, number>();
    rawMerges.forEach((m: unknown, rank: number) => {
      const pair = typeof m === "string" ? m.split(" ", 2) : m;
      if (Array.isArray(pair) && pair.length === 2) ranks.set(`${pair[0]}\u0000${pair[1]}`, rank);
    });
    const added = new Map<string, number>();
    for (const t of (json["added_tokens"] ?? []) as JsonObject[]) {
      // Stripping, single-word matching and normalized matching are the library's to do.
      if (t["lstrip"] === true || t["rstrip"] === true || t["single_word"] === true) {
        return undefined;
      }
      if (t["normalized"] === true || (t["normalized"] === undefined && t["special"] !== true)) {
        return undefined;
      }
      added.set(String(t["content"]), Number(t["id"]));
      vocab.set(String(t["content"]), Number(t["id"]));
    }
    const byteChar: string[] = [];
    let n = 0;
    for (let b = 0; b < 256; b++) {
      const printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || b >= 0xae;
      byteChar.push(String.fromCodePoint(printable ? b : 256 + n++));
      if (!vocab.has(byteChar[b])) return undefined; // not a full byte-level alphabet
    }
    return new ByteLevelBpe(vocab, ranks, added, byteChar);
  }

  /** Ids of `text`, or undefined if a merge result is missing from the vocabulary. */
  encode(text: string): number[] | undefined {
    const ids: number[] = [];
    for (const section of this.#splitAdded(text)) {
      const special = this.#added.get(section);
      if (special !== undefined) {
        ids.push(special);
        continue;
      }
      for (const m of section.matchAll(ByteLevelBpe.#pattern)) {
        const word = m[0];
        let wordIds = this.#cache.get(word);
        if (wordIds === undefined) {
          const computed = this.#bpe(word);
          if (computed === undefined) return undefined;
          wordIds = computed;
          if (this.#cache.size >= ByteLevelBpe.#maxCache) this.#cache.clear();
          this.#cache.set(word, wordIds);
        }
        for (const id of wordIds) ids.push(id);
      }
    }
    return ids;
  }

  /** Leftmost-longest split at added-token strings, as the library's DictionarySplitter. */
  #splitAdded(text: string): string[] {
    const trie = this.#addedTrie;
    if (trie === undefined) return [text];
    const out: string[] = [];
    let start = 0;
    for (let i = 0; i < text.length;) {
      let node: Map<string, unknown> | undefined = trie;
      let match: string | undefined;
      for (let j = i; j < text.length; j++) {
        node = node.get(text[j]) as Map<string, unknown> | undefined;
        if (node === undefined) break;
        const end = node.get("");
        if (typeof end === "string") match = end;
      }
      if (match !== undefined) {
        if (i > start) out.push(text.slice(start, i));
        out.push(match);
        i += match.length;
        start = i;
      } else {
        i++;
      }
    }
    if (start < text.length) out.push(text.slice(start));
    return out;
  }

  /** BPE of one pre-token: merge the lowest-ranked adjacent pair (leftmost on ties) until none is left. */
  #bpe(word: string): number[] | undefined {
    const bytes = this.#encoder.encode(word);
    const syms: string[] = new Array(bytes.length);
    for (let i = 0; i < bytes.length; i++) syms[i] = this.#byteChar[bytes[i]];
    while (syms.length > 1) {
      let best = -1, bestRank = Infinity;
      for (let i = 0; i + 1 < syms.length; i++) {
        const r = this.#ranks.get(`${syms[i]}\u0000${syms[i + 1]}`);
        if (r !== undefined && r < bestRank) {
          bestRank = r;
          best = i;
        }
      }
      if (best < 0) break;
      syms.splice(best, 2, syms[best] + syms[best + 1]);
    }
    const ids: number[] = new Array(syms.length);
    for (let i = 0; i < syms.length; i++) {
      const id = this.#vocab.get(syms[i]);
      if (id === undefined) return undefined;
      ids[i] = id;
    }
    return ids;
  }
}

/** A character trie of `words`; the key "" of a node holds the word that ends there. */
function buildTrie(words: string[]): Map<string, unknown> {
  const root = new Map<string, unknown>();
  for (const w of words) {
    let node = root;
    for (const ch of w) {
      // Per UTF-16 unit, as the scan in #splitAdded walks the text.
      for (let k = 0; k < ch.length; k++) {
        let next = node.get(ch[k]) as Map<string, unknown> | undefined;
        if (next === undefined) {
          next = new Map();
          node.set(ch[k], next);
        }
        node = next;
      }
    }
    node.set("", w);
  }
  return root;
}

function parseJsonObject(text: string, path: string): JsonObject {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new UserError(`${path}: invalid JSON (${(e as Error).message})`);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new UserError(`${path}: expected a JSON object`);
  }
  return value as JsonObject;
}

/** A special token given as a string or as an AddedToken object `{ content }`. */
function tokenString(value: unknown): string | undefined {
  if (typeof value === "string") return value;
  if (typeof value === "object" && value !== null && "content" in value) {
    const c = (value as { content: unknown }).content;
    if (typeof c === "string") return c;
  }
  return undefined;
}

/** `chat_template` is a string, or a list of `{name, template}` of which "default" is used. */
function pickChatTemplate(value: unknown): string | undefined {
  if (typeof value === "string") return value;
  if (Array.isArray(value)) {
    const named = value.filter((t): t is { name: string; template: string } =>
      typeof t === "object" && t !== null && typeof t.template === "string"
    );
    return (named.find((t) => t.name === "default") ?? named[0])?.template;
  }
  if (typeof value === "object" && value !== null) {
    const rec = value as Record<string, unknown>;
    const t = rec["default"] ?? Object.values(rec)[0];
    return typeof t === "string" ? t : undefined;
  }
  return undefined;
}
