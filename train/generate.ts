/**
 * `trainer generate` and `trainer chat`: sampling from a checkpoint (ours or a
 * Hugging Face Llama / Qwen3 directory) with the KV-cache model of
 * `model/generate.ts`, text streamed as it is generated.
 *
 * Context limits: the KV cache holds at most `max_position_embeddings`
 * positions (chat: `--context`, default min(2048, that)). `generate` refuses a
 * prompt that does not fit and stops early, saying so, when the prompt plus
 * `--max-new-tokens` would not; `chat` drops the oldest turns of the history
 * until the conversation plus the reply budget fits.
 *
 * @module
 */
import { Gpu } from "../kernels/runtime.ts";
import { loadCheckpoint, type LoadedCheckpoint } from "../model/checkpoint.ts";
import { generate, type GenerateResult, InferenceModel } from "../model/generate.ts";
import { checkSamplingOptions, type SamplingOptions } from "../model/sampling.ts";
import { type ChatMessage, StreamingDecoder, TextTokenizer } from "../data/tokenizer.ts";
import { LineSplitStream } from "../data/lines.ts";
import {
  type CommandSpec,
  flagOption,
  numberOption,
  type OptionSpec,
  type ParsedArgs,
  stringOption,
} from "../util/cli.ts";
import { UsageError, UserError } from "../util/errors.ts";
import { Rng } from "../util/random.ts";

/** Where `generate` and `chat` look for a model by default: the result of `deno task sft`. */
export const DEFAULT_MODEL_DIR = "out/sft";

/** Sampling defaults when neither the command line nor `generation_config.json` sets them. */
export const DEFAULT_SAMPLING: Readonly<SamplingOptions> = {
  temperature: 0.7,
  topK: 0,
  topP: 0.9,
  repetitionPenalty: 1,
};

/** Default `--max-new-tokens`. */
export const DEFAULT_MAX_NEW_TOKENS = 256;

/** Default cap of the chat context (`--context`), below `max_position_embeddings`. */
export const DEFAULT_CHAT_CONTEXT = 2048;

/** Where the commands write and read; tests replace these. */
export interface GenerationIo {
  /** Streamed text and results (default: stdout). */
  write?: (text: string) => Promise<void> | void;
  /** Notices and `--verbose` figures (default: stderr). */
  note?: (line: string) => void;
  /** Chat input (default: stdin). */
  input?: ReadableStream<Uint8Array>;
  /** Whether the input is a terminal (echoes typed lines when not; default: ask stdin). */
  interactive?: boolean;
  /** A device to use (default: `Gpu.request()`, released at the end). */
  gpu?: Gpu;
}

async function writeStdout(text: string): Promise<void> {
  const bytes = new TextEncoder().encode(text);
  let off = 0;
  while (off < bytes.length) off += await Deno.stdout.write(bytes.subarray(off));
}

function resolveIo(io: GenerationIo) {
  return {
    write: io.write ?? writeStdout,
    note: io.note ?? ((line: string) => console.error(line)),
  };
}

const MODEL_OPTION: OptionSpec = {
  type: "string",
  valueName: "DIR",
  help: `checkpoint or Hugging Face model directory (default ${DEFAULT_MODEL_DIR})`,
};

const SAMPLING_OPTIONS: Record<string, OptionSpec> = {
  "max-new-tokens": {
    type: "string",
    valueName: "N",
    help:
      `most tokens to generate (default: generation_config.json, else ${DEFAULT_MAX_NEW_TOKENS})`,
  },
  temperature: {
    type: "string",
    valueName: "T",
    help:
      `softmax temperature; 0 = greedy, deterministic (default: generation_config.json, greedy when it says do_sample: false, else ${DEFAULT_SAMPLING.temperature})`,
  },
  "top-k": {
    type: "string",
    valueName: "K",
    help:
      `sample among the K most likely tokens only; 0 = off (default: generation_config.json, else ${DEFAULT_SAMPLING.topK})`,
  },
  "top-p": {
    type: "string",
    valueName: "P",
    help:
      `nucleus sampling: the smallest set of likely tokens with mass >= P; 1 = off (default: generation_config.json, else ${DEFAULT_SAMPLING.topP})`,
  },
  "repetition-penalty": {
    type: "string",
    valueName: "R",
    help: "divide (multiply, when negative) the logits of tokens already seen by R; 1 = off",
  },
  seed: { type: "string", valueName: "N", help: "seed of the sampling draws (default: random)" },
  verbose: { type: "boolean", help: "print prefill time and decode speed on stderr" },
};

/** A loaded model and its tokenizer, ready to generate. */
export interface Loaded {
  ckpt: LoadedCheckpoint;
  tokenizer: TextTokenizer;
  dir: string;
}

/**
 * The model of `--model DIR` (default `out/sft`, with a hint how to make it
 * when missing) and its tokenizer, checked against each other.
 */
export async function loadModel(args: ParsedArgs): Promise<Loaded> {
  const given = stringOption(args, "model");
  const dir = given ?? DEFAULT_MODEL_DIR;
  if (given === undefined) {
    try {
      await Deno.stat(dir);
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
      throw new UserError(
        `no model at ${DEFAULT_MODEL_DIR} (the default): make one with \`deno task pretrain\` then \`deno task sft\`, or pass --model DIR (a checkpoint or Hugging Face model directory)`,
      );
    }
  }
  const ckpt = await loadCheckpoint(dir);
  const tokenizer = TextTokenizer.fromJson(
    ckpt.tokenizer.tokenizerJson,
    ckpt.tokenizer.tokenizerConfigJson,
    ckpt.source,
  );
  if (tokenizer.vocabSize > ckpt.config.vocab_size) {
    throw new UserError(
      `${ckpt.source}: the tokenizer has ${tokenizer.vocabSize} tokens but the model's vocab_size is ${ckpt.config.vocab_size}`,
    );
  }
  return { ckpt, tokenizer, dir };
}

/** Sampling settings: command line, else `generation_config.json`, else the defaults. */
export function samplingFrom(
  args: ParsedArgs,
  ckpt: Pick<LoadedCheckpoint, "generation">,
): SamplingOptions {
  const g = ckpt.generation;
  const s: SamplingOptions = {
    // `do_sample: false` means greedy decoding in Transformers; follow it.
    temperature: numberOption(
      args,
      "temperature",
      g.do_sample === false ? 0 : g.temperature ?? DEFAULT_SAMPLING.temperature,
      { min: 0 },
    ),
    topK: numberOption(args, "top-k", g.top_k ?? DEFAULT_SAMPLING.topK, { integer: true, min: 0 }),
    topP: numberOption(args, "top-p", g.top_p ?? DEFAULT_SAMPLING.topP, { max: 1 }),
    repetitionPenalty: numberOption(
      args,
      "repetition-penalty",
      g.repetition_penalty ?? DEFAULT_SAMPLING.repetitionPenalty,
    ),
  };
  try {
    checkSamplingOptions(s);
  } catch (e) {
    if (e instanceof UserError) throw new UsageError(e.message);
    throw e;
  }
  return s;
}

function rngFrom(args: ParsedArgs): { rng: Rng; seed: number } {
  const seed = numberOption(
    args,
    "seed",
    crypto.getRandomValues(new Uint32Array(1))[0],
    { integer: true, min: 0, max: 4294967295 },
  );
  return { rng: new Rng(seed), seed };
}

function maxNewTokensFrom(args: ParsedArgs, ckpt: LoadedCheckpoint): number {
  return numberOption(
    args,
    "max-new-tokens",
    ckpt.generation.max_new_tokens ?? DEFAULT_MAX_NEW_TOKENS,
    { integer: true, min: 1 },
  );
}

/** Ids that end a reply: every eos of the generation config, and `<|im_end|>` in chat. */
export function stopIds(loaded: Loaded, chat: boolean): number[] {
  const ids = new Set(loaded.ckpt.generation.eosIds ?? [loaded.ckpt.special.eos]);
  ids.add(loaded.tokenizer.eosId);
  if (chat) {
    const imEnd = loaded.tokenizer.tokenToId("<|im_end|>");
    if (imEnd !== undefined) ids.add(imEnd);
  }
  return [...ids];
}

/** The prompt of a chat: the messages rendered with the chat template and the generation prompt. */
export function chatPromptIds(tokenizer: TextTokenizer, messages: ChatMessage[]): number[] {
  return tokenizer.encode(tokenizer.applyChatTemplate(messages, { addGenerationPrompt: true }));
}

/** The prompt of a base-model continuation: bos, then the text's tokens. */
export function textPromptIds(tokenizer: TextTokenizer, bos: number, text: string): number[] {
  return [bos, ...tokenizer.encode(text)];
}

function speedLine(r: GenerateResult, gpu: Gpu): string {
  const decoded = Math.max(0, r.ids.length - 1);
  return `prefill: ${r.promptTokens} tokens in ${
    r.prefillMs.toFixed(1)
  } ms; decode: ${decoded} tokens in ${r.decodeMs.toFixed(1)} ms, ${
    r.tokensPerSecond.toFixed(1)
  } tokens/s (${gpu.adapterSummary.name})`;
}

/**
 * Streams `ids` as they come: each id's text once it is whole (a multi-byte
 * character split over tokens prints when its last byte arrives). Stop ids
 * are not printed.
 */
function streamer(
  tokenizer: TextTokenizer,
  stop: Set<number>,
  write: (text: string) => Promise<void> | void,
  skipSpecialTokens: boolean,
) {
  const decoder = new StreamingDecoder(tokenizer, { skipSpecialTokens });
  return {
    async push(id: number) {
      if (stop.has(id)) return;
      const text = decoder.push(id);
      if (text) await write(text);
    },
    async flush() {
      const text = decoder.flush();
      if (text) await write(text);
    },
  };
}

/** Runs `trainer generate` with injectable I/O; resolves to the exit status. */
export async function runGenerate(args: ParsedArgs, io: GenerationIo = {}): Promise<number> {
  const { write, note } = resolveIo(io);
  if (args.positionals.length > 0) {
    throw new UsageError(`unexpected argument '${args.positionals[0]}'; the text goes in --prompt`);
  }
  const prompt = stringOption(args, "prompt", "");
  const chat = flagOption(args, "chat");
  const json = flagOption(args, "json");
  const verbose = flagOption(args, "verbose");
  const loaded = await loadModel(args);
  const { ckpt, tokenizer } = loaded;
  const sampling = samplingFrom(args, ckpt);
  const { rng, seed } = rngFrom(args);
  const maxNew = maxNewTokensFrom(args, ckpt);

  // Base models continue bos + the text; chat models answer a user turn.
  const promptIds = chat
    ? chatPromptIds(tokenizer, [{ role: "user", content: prompt }])
    : textPromptIds(tokenizer, ckpt.special.bos, prompt);
  const maxPos = ckpt.config.max_position_embeddings;
  if (promptIds.length >= maxPos) {
    throw new UserError(
      `the prompt is ${promptIds.length} tokens; the model's context (max_position_embeddings) is ${maxPos}, which leaves no room to generate: shorten the prompt`,
    );
  }
  const capacity = Math.min(maxPos, promptIds.length + maxNew);
  const stop = stopIds(loaded, chat);

  const gpu = io.gpu ?? await Gpu.request();
  try {
    const model = await InferenceModel.create(gpu, ckpt.config, ckpt.params, { capacity });
    try {
      const out = streamer(tokenizer, new Set(stop), write, false);
      const result = await generate(model, promptIds, {
        maxNewTokens: maxNew,
        sampling,
        rng,
        stopIds: stop,
        onToken: json ? undefined : (id) => out.push(id),
      });
      const shown = result.finish === "stop" ? result.ids.slice(0, -1) : result.ids;
      if (json) {
        await write(
          JSON.stringify({
            ids: result.ids,
            text: tokenizer.decode(shown),
            tokens_per_s: result.tokensPerSecond,
          }) + "\n",
        );
      } else {
        await out.flush();
        await write("\n");
      }
      if (result.finish === "capacity") {
        note(
          `(stopped after ${result.ids.length} tokens: the model's context of ${maxPos} positions is full)`,
        );
      }
      if (verbose) {
        note(`seed ${seed}; ${speedLine(result, gpu)}`);
      }
      return 0;
    } finally {
      model.destroy();
    }
  } finally {
    if (!io.gpu) gpu.destroy();
  }
}

/** `trainer generate`. */
export const generateCommand: CommandSpec = {
  name: "generate",
  summary: "Generate text from a model (streams as it goes)",
  usage: "[--model DIR] [--prompt TEXT] [options]",
  description:
    `Without --chat the model continues bos + the prompt's tokens, as a base model does; with --chat the prompt is a user turn rendered with the model's chat template and the generation prompt, and the reply ends at <|im_end|> or eos. Text streams to stdout as it is generated (whole UTF-8 characters only). The prompt plus --max-new-tokens must fit the model's context (max_position_embeddings): a longer prompt is an error, and generation stops early, with a note on stderr, when the context fills up.`,
  options: {
    model: MODEL_OPTION,
    prompt: { type: "string", valueName: "TEXT", help: "the text to continue (default empty)" },
    chat: { type: "boolean", help: "answer the prompt as a user turn of a chat" },
    json: {
      type: "boolean",
      help: 'print {"ids", "text", "tokens_per_s"} as one JSON object instead of streaming',
    },
    ...SAMPLING_OPTIONS,
  },
  run: (args) => runGenerate(args),
};

/** Reads lines from a byte stream (the last one may lack its newline). */
async function* inputLines(input: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  const lines = input.pipeThrough(new TextDecoderStream()).pipeThrough(new LineSplitStream());
  for await (const line of lines) yield line.text;
}

/**
 * The conversation's prompt ids with as many of the latest `history` turns as
 * fit `budget` tokens; older turns are dropped first. Undefined when not even
 * the new message alone fits.
 */
function fitConversation(
  tokenizer: TextTokenizer,
  system: string | undefined,
  history: ChatMessage[][],
  message: string,
  budget: number,
): { ids: number[]; kept: number } | undefined {
  for (let keep = history.length; keep >= 0; keep--) {
    const messages: ChatMessage[] = [];
    if (system) messages.push({ role: "system", content: system });
    for (const turn of history.slice(history.length - keep)) messages.push(...turn);
    messages.push({ role: "user", content: message });
    const ids = chatPromptIds(tokenizer, messages);
    if (ids.length <= budget) return { ids, kept: keep };
  }
  return undefined;
}

/** Runs `trainer chat` with injectable I/O; resolves to the exit status. */
export async function runChat(args: ParsedArgs, io: GenerationIo = {}): Promise<number> {
  const { write, note } = resolveIo(io);
  if (args.positionals.length > 0) {
    throw new UsageError(`unexpected argument '${args.positionals[0]}'`);
  }
  const verbose = flagOption(args, "verbose");
  const historyTurns = numberOption(args, "history", 8, { integer: true, min: 0 });
  const system = stringOption(args, "system");
  const loaded = await loadModel(args);
  const { ckpt, tokenizer } = loaded;
  if (!tokenizer.hasChatTemplate) {
    throw new UserError(
      `${ckpt.source}: the tokenizer has no chat_template, so there is no chat format; use 'trainer generate' to continue text`,
    );
  }
  const sampling = samplingFrom(args, ckpt);
  const { rng, seed } = rngFrom(args);
  const maxNew = maxNewTokensFrom(args, ckpt);
  const maxPos = ckpt.config.max_position_embeddings;
  const context = numberOption(args, "context", Math.min(DEFAULT_CHAT_CONTEXT, maxPos), {
    integer: true,
    min: 2,
    max: maxPos,
  });
  // The reply budget: a message may use the context up to this reserve.
  const reserve = Math.min(maxNew, Math.floor(context / 2));
  const stop = stopIds(loaded, true);
  const interactive = io.interactive ?? Deno.stdin.isTerminal();
  const input = io.input ?? Deno.stdin.readable;

  const gpu = io.gpu ?? await Gpu.request();
  try {
    const model = await InferenceModel.create(gpu, ckpt.config, ckpt.params, {
      capacity: context,
    });
    try {
      note(
        `chat with ${ckpt.source} (context ${context} tokens, history ${historyTurns} turns). ` +
          `/reset clears the history; /exit or Ctrl-D quits.` + (verbose ? ` seed ${seed}` : ""),
      );
      let history: ChatMessage[][] = [];
      const prompt = async () => {
        if (interactive) await write("> ");
      };
      await prompt();
      for await (const raw of inputLines(input)) {
        const line = raw.trim();
        // Piped input is not echoed by a terminal: echo it so stdout reads as a transcript.
        if (!interactive) await write(`> ${raw}\n`);
        if (line === "") {
          await prompt();
          continue;
        }
        if (line === "/exit" || line === "/quit") return 0;
        if (line === "/reset") {
          history = [];
          await write("(history cleared)\n");
          await prompt();
          continue;
        }
        if (line.startsWith("/")) {
          await write(`(unknown command ${line}; /reset clears the history, /exit quits)\n`);
          await prompt();
          continue;
        }
        const fit = fitConversation(tokenizer, system, history, raw, context - reserve);
        if (!fit) {
          await write(
            `(that message is too long for the context of ${context} tokens with room for a reply; shorten it)\n`,
          );
          await prompt();
          continue;
        }
        if (fit.kept < history.length) {
          note(
            `(dropped the ${
              history.length - fit.kept
            } oldest turn(s) to fit the context of ${context} tokens)`,
          );
          history = history.slice(history.length - fit.kept);
        }
        const out = streamer(tokenizer, new Set(stop), write, true);
        const result = await generate(model, fit.ids, {
          maxNewTokens: Math.min(maxNew, context - fit.ids.length),
          sampling,
          rng,
          stopIds: stop,
          onToken: (id) => out.push(id),
        });
        await out.flush();
        await write("\n");
        if (result.finish === "capacity") note(`(reply cut: the context of ${context} is full)`);
        if (verbose) note(speedLine(result, gpu));
        const replyIds = result.finish === "stop" ? result.ids.slice(0, -1) : result.ids;
        const reply = tokenizer.decode(replyIds, { skipSpecialTokens: true });
        history.push([{ role: "user", content: raw }, { role: "assistant", content: reply }]);
        if (history.length > historyTurns) history = history.slice(history.length - historyTurns);
        await prompt();
      }
      if (interactive) await write("\n");
      return 0;
    } finally {
      model.destroy();
    }
  } finally {
    if (!io.gpu) gpu.destroy();
  }
}

/** `trainer chat`. */
export const chatCommand: CommandSpec = {
  name: "chat",
  summary: "Chat with a model in the terminal (history, streaming replies)",
  usage: "[--model DIR] [options]",
  description:
    `Each line you type is a user turn; the reply streams back. The prompt is the conversation rendered with the model's chat template (the last --history turns, plus --system), and a reply ends at <|im_end|> or eos. /reset clears the history, /exit or Ctrl-D (end of input) quits. When the conversation plus the reply budget outgrows the context (--context), the oldest turns are dropped. Works with piped input: typed lines are then echoed after '> ', so stdout reads as a transcript.`,
  options: {
    model: MODEL_OPTION,
    history: {
      type: "string",
      valueName: "N",
      help: "turns (user + reply) of history kept in the prompt (default 8)",
    },
    system: { type: "string", valueName: "TEXT", help: "a system message opening the chat" },
    context: {
      type: "string",
      valueName: "N",
      help:
        `tokens the KV cache holds: prompt + reply (default min(${DEFAULT_CHAT_CONTEXT}, max_position_embeddings))`,
    },
    ...SAMPLING_OPTIONS,
  },
  run: (args) => runChat(args),
};
