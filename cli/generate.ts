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
import type { LoadedCheckpoint } from "../io/checkpoint.ts";
import { InferenceModel } from "../model/inference.ts";
import { generate, type GenerateResult } from "../model/generate.ts";
import { DEFAULT_SAMPLING, type SamplingOptions } from "../model/sampling.ts";
import type { ChatMessage } from "../data/tokenizer.ts";
import { LineSplitStream } from "../data/lines.ts";
import {
  chatPromptIds,
  DEFAULT_CHAT_CONTEXT,
  DEFAULT_MAX_NEW_TOKENS,
  DEFAULT_MODEL_DIR,
  fitConversation,
  type GenerationModelOptions,
  loadGenerationModel,
  resolveMaxNewTokens,
  resolveSampling,
  samplingSource,
  stopIds,
  textPromptIds,
  TokenStreamer,
  TRANSFORMERS_SAMPLING,
} from "../infer/session.ts";
import {
  type CommandSpec,
  flagOption,
  numberOption,
  type OptionSpec,
  type ParsedArgs,
  stringOption,
} from "./args.ts";
import { UsageError, UserError } from "../util/errors.ts";
import { Rng } from "../util/random.ts";

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
  valueName: "PATH",
  help:
    `checkpoint or Hugging Face model directory, or a PyTorch .pth state dict as MiniMind saves (default ${DEFAULT_MODEL_DIR})`,
};

/** What a `.pth` state dict does not carry: its tokenizer and, without QK-norm, its head count. */
export const STATE_DICT_OPTIONS: Record<string, OptionSpec> = {
  tokenizer: {
    type: "string",
    valueName: "DIR",
    help:
      "tokenizer directory (tokenizer.json + tokenizer_config.json) instead of the model's; a .pth has none, so it is needed there unless those files lie beside the .pth (MiniMind's: model/ in its repository)",
  },
  preset: {
    type: "string",
    valueName: "NAME",
    help:
      "shape of a .pth: tiny, minimind2-small, minimind-3; default: read from the tensors (heads from q_norm; rope_theta 1e6, rms_norm_eps 1e-6 as MiniMind) — a .pth without q_norm needs it",
  },
  "model-config": {
    type: "string",
    valueName: "FILE",
    help: "shape of a .pth from a JSON/JSONC file of Hugging Face config fields (+ qk_norm)",
  },
};

/** Model path and the state-dict options, as `loadGenerationModel` takes them. */
export function modelFrom(args: ParsedArgs): { path?: string; opts: GenerationModelOptions } {
  return {
    path: stringOption(args, "model"),
    opts: {
      tokenizer: stringOption(args, "tokenizer"),
      preset: stringOption(args, "preset"),
      modelConfig: stringOption(args, "model-config"),
      adapter: stringOption(args, "adapter"),
    },
  };
}

const SAMPLING_FROM =
  "generation_config.json as Transformers reads it: greedy unless it says do_sample: true";

const ADAPTER_OPTION: OptionSpec = {
  type: "string",
  valueName: "DIR",
  help: "a LoRA adapter (PEFT format) trained on --model, applied in memory on load",
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
      `softmax temperature; 0 = greedy, deterministic, > 0 samples (default: the model's ${SAMPLING_FROM}, then its temperature, else ${TRANSFORMERS_SAMPLING.temperature}; checkpoints trained here say do_sample: true, temperature ${DEFAULT_SAMPLING.temperature}, top_p ${DEFAULT_SAMPLING.topP}; a .pth has no such file: greedy)`,
  },
  "top-k": {
    type: "string",
    valueName: "K",
    help:
      `sample among the K most likely tokens only; 0 = off (default: generation_config.json, else Transformers' ${TRANSFORMERS_SAMPLING.topK})`,
  },
  "top-p": {
    type: "string",
    valueName: "P",
    help:
      `nucleus sampling: the smallest set of likely tokens with mass >= P; 1 = off (default: generation_config.json, else ${TRANSFORMERS_SAMPLING.topP})`,
  },
  "repetition-penalty": {
    type: "string",
    valueName: "R",
    help:
      "divide (multiply, when negative) the logits of tokens already seen by R; 1 = off (default: generation_config.json, else 1)",
  },
  seed: { type: "string", valueName: "N", help: "seed of the sampling draws (default: random)" },
  verbose: {
    type: "boolean",
    help:
      "print the sampling settings and where they came from, prefill time and decode speed on stderr",
  },
};

/** Sampling settings: command line, else `generation_config.json`, else the defaults. */
export function samplingFrom(
  args: ParsedArgs,
  ckpt: Pick<LoadedCheckpoint, "generation">,
): SamplingOptions {
  const given = (name: string, o: { integer?: boolean; min?: number; max?: number }) =>
    args.values[name] === undefined ? undefined : numberOption(args, name, 0, o);
  try {
    return resolveSampling(ckpt.generation, {
      temperature: given("temperature", { min: 0 }),
      topK: given("top-k", { integer: true, min: 0 }),
      topP: given("top-p", { max: 1 }),
      repetitionPenalty: given("repetition-penalty", {}),
    });
  } catch (e) {
    if (e instanceof UserError && !(e instanceof UsageError)) throw new UsageError(e.message);
    throw e;
  }
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
  return args.values["max-new-tokens"] === undefined
    ? resolveMaxNewTokens(ckpt.generation)
    : numberOption(args, "max-new-tokens", 0, { integer: true, min: 1 });
}

/** The sampling settings in use and where their defaults came from. */
function settingsLine(
  s: SamplingOptions,
  ckpt: Pick<LoadedCheckpoint, "generation" | "source">,
  args: ParsedArgs,
): string {
  const flags = ["temperature", "top-k", "top-p", "repetition-penalty"].filter((f) =>
    args.values[f] !== undefined
  );
  return `sampling: temperature ${s.temperature}, top_k ${s.topK}, top_p ${s.topP}, repetition_penalty ${s.repetitionPenalty} (defaults: ${
    samplingSource(ckpt)
  }${flags.length > 0 ? `; given: --${flags.join(", --")}` : ""})`;
}

function speedLine(r: GenerateResult, gpu: Gpu): string {
  const decoded = Math.max(0, r.ids.length - 1);
  return `prefill: ${r.promptTokens} tokens in ${
    r.prefillMs.toFixed(1)
  } ms; decode: ${decoded} tokens in ${r.decodeMs.toFixed(1)} ms, ${
    r.tokensPerSecond.toFixed(1)
  } tokens/s (${gpu.adapterSummary.name})`;
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
  const { path, opts } = modelFrom(args);
  const loaded = await loadGenerationModel(path, opts);
  const { ckpt, tokenizer } = loaded;
  for (const line of ckpt.notes) note(`${ckpt.source}: ${line}`);
  const sampling = samplingFrom(args, ckpt);
  const { rng, seed } = rngFrom(args);
  const maxNew = maxNewTokensFrom(args, ckpt);
  if (verbose) note(settingsLine(sampling, ckpt, args));

  // Base models continue bos + the text; chat models answer a user turn.
  const promptIds = chat
    ? chatPromptIds(tokenizer, [{ role: "user", content: prompt }])
    : textPromptIds(tokenizer, prompt);
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
      const out = new TokenStreamer(tokenizer, stop, write, { skipSpecialTokens: false });
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
  usage: "[--model PATH] [--prompt TEXT] [options]",
  description:
    `Without --chat the model continues bos + the prompt's tokens (bos and eos are the tokenizer's, as for training and eval; generation also stops at every eos id of generation_config.json), as a base model does; with --chat the prompt is a user turn rendered with the model's chat template and the generation prompt, and the reply ends at <|im_end|> or eos. Text streams to stdout as it is generated (whole UTF-8 characters only). The prompt plus --max-new-tokens must fit the model's context (max_position_embeddings): a longer prompt is an error, and generation stops early, with a note on stderr, when the context fills up. Sampling defaults follow the model's generation_config.json as Transformers reads it: no do_sample: true (or no file, as for a .pth) means greedy; --verbose prints the settings and where they came from. A .pth state dict (MiniMind's out/*.pth) needs its tokenizer (--tokenizer, or the files beside it); its shape is read from the tensors, or given by --preset / --model-config.`,
  options: {
    model: MODEL_OPTION,
    ...STATE_DICT_OPTIONS,
    adapter: ADAPTER_OPTION,
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

/** Runs `trainer chat` with injectable I/O; resolves to the exit status. */
export async function runChat(args: ParsedArgs, io: GenerationIo = {}): Promise<number> {
  const { write, note } = resolveIo(io);
  if (args.positionals.length > 0) {
    throw new UsageError(`unexpected argument '${args.positionals[0]}'`);
  }
  const verbose = flagOption(args, "verbose");
  const historyTurns = numberOption(args, "history", 8, { integer: true, min: 0 });
  const system = stringOption(args, "system");
  const { path, opts } = modelFrom(args);
  const loaded = await loadGenerationModel(path, opts);
  const { ckpt, tokenizer } = loaded;
  for (const line of ckpt.notes) note(`${ckpt.source}: ${line}`);
  if (!tokenizer.hasChatTemplate) {
    throw new UserError(
      `${ckpt.source}: the tokenizer has no chat_template, so there is no chat format; use 'trainer generate' to continue text`,
    );
  }
  const sampling = samplingFrom(args, ckpt);
  const { rng, seed } = rngFrom(args);
  const maxNew = maxNewTokensFrom(args, ckpt);
  if (verbose) note(settingsLine(sampling, ckpt, args));
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
        const out = new TokenStreamer(tokenizer, stop, write, { skipSpecialTokens: true });
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
  usage: "[--model PATH] [options]",
  description:
    `Each line you type is a user turn; the reply streams back. The prompt is the conversation rendered with the model's chat template (the last --history turns, plus --system), and a reply ends at <|im_end|> or eos. /reset clears the history, /exit or Ctrl-D (end of input) quits. When the conversation plus the reply budget outgrows the context (--context), the oldest turns are dropped. Works with piped input: typed lines are then echoed after '> ', so stdout reads as a transcript. Sampling defaults follow the model's generation_config.json as Transformers reads it (no do_sample: true means greedy); --model takes a .pth state dict as generate does.`,
  options: {
    model: MODEL_OPTION,
    ...STATE_DICT_OPTIONS,
    adapter: ADAPTER_OPTION,
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
