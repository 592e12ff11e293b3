/**
 * `trainer serve`: the OpenAI-compatible API and the chat page for a model
 * (serve/server.ts), with flags turned into typed settings.
 *
 * @module
 */
import { Gpu } from "../kernels/runtime.ts";
import {
  DEFAULT_CHAT_CONTEXT,
  DEFAULT_MAX_NEW_TOKENS,
  DEFAULT_MODEL_DIR,
  loadGenerationModel,
  resolveMaxNewTokens,
  resolveSampling,
} from "../infer/session.ts";
import { ServeEngine } from "../serve/engine.ts";
import {
  DEFAULT_MAX_QUEUE,
  isLoopbackAddress,
  type RunningServer,
  serve,
} from "../serve/server.ts";
import { type CommandSpec, numberOption, type ParsedArgs, stringOption } from "./args.ts";
import { UsageError, UserError } from "../util/errors.ts";

/** Default `--host`: this machine only. */
export const DEFAULT_HOST = "127.0.0.1";

/** Default `--port`. */
export const DEFAULT_PORT = 8000;

/** The environment variable `--api-key` falls back to (keeps the key out of `ps`). */
export const API_KEY_ENV = "TRAINER_API_KEY";

/** Where `runServe` writes and what it listens with; tests replace these. */
export interface ServeIo {
  /** Startup lines and one line per request (default: stderr). */
  log?: (line: string) => void;
  /** A device to use (default: `Gpu.request()`, released at shutdown). */
  gpu?: Gpu;
  /** Aborting it shuts the server down (default: Ctrl-C / SIGTERM). */
  signal?: AbortSignal;
  /** Called once listening. */
  onListen?: (addr: Deno.NetAddr) => void;
}

/** The served model's id: `--model-name`, else the model directory's last path segment. */
export function modelNameOf(dir: string, given?: string): string {
  if (given !== undefined) {
    if (given.trim() === "") throw new UsageError("--model-name must not be empty");
    return given;
  }
  const parts = dir.replaceAll("\\", "/").split("/").filter((p) => p !== "" && p !== ".");
  return parts.length > 0 ? parts[parts.length - 1] : "model";
}

/** Runs `trainer serve` until `io.signal` aborts (or Ctrl-C); resolves to the exit status. */
export async function runServe(args: ParsedArgs, io: ServeIo = {}): Promise<number> {
  const log = io.log ?? ((line: string) => console.error(line));
  const host = stringOption(args, "host", DEFAULT_HOST);
  const port = numberOption(args, "port", DEFAULT_PORT, { integer: true, min: 0, max: 65535 });
  const maxQueue = numberOption(args, "max-queue", DEFAULT_MAX_QUEUE, { integer: true, min: 0 });
  const apiKey = stringOption(args, "api-key") ?? Deno.env.get(API_KEY_ENV);
  if (apiKey !== undefined && apiKey.trim() === "") {
    throw new UsageError(`the API key (--api-key or ${API_KEY_ENV}) must not be empty`);
  }
  const loaded = await loadGenerationModel(stringOption(args, "model"), {
    adapter: stringOption(args, "adapter"),
  });
  const { ckpt } = loaded;
  const modelName = modelNameOf(
    stringOption(args, "model", DEFAULT_MODEL_DIR),
    stringOption(args, "model-name"),
  );
  const maxPos = ckpt.config.max_position_embeddings;
  const context = numberOption(args, "context", Math.min(DEFAULT_CHAT_CONTEXT, maxPos), {
    integer: true,
    min: 2,
    max: maxPos,
  });
  const maxTokens = numberOption(args, "max-tokens", resolveMaxNewTokens(ckpt.generation), {
    integer: true,
    min: 1,
  });
  // Sampling defaults as `generate` takes them when no flag is given.
  const sampling = resolveSampling(ckpt.generation);

  const gpu = io.gpu ?? await Gpu.request();
  try {
    const engine = await ServeEngine.create(gpu, loaded, {
      capacity: context,
      maxTokens,
      sampling,
    });
    try {
      const stop = new AbortController();
      const listeners: [Deno.Signal, () => void][] = [];
      if (io.signal) {
        io.signal.addEventListener("abort", () => stop.abort(), { once: true });
      } else {
        const signals: Deno.Signal[] = Deno.build.os === "windows"
          ? ["SIGINT"]
          : ["SIGINT", "SIGTERM"];
        for (const s of signals) {
          const f = () => stop.abort();
          Deno.addSignalListener(s, f);
          listeners.push([s, f]);
        }
      }
      let server: RunningServer;
      try {
        server = serve({
          engine,
          modelName,
          apiKey,
          maxQueue,
          log,
          hostname: host,
          port,
          signal: stop.signal,
          onListen: (addr) => {
            const shown = addr.hostname.includes(":") ? `[${addr.hostname}]` : addr.hostname;
            const base = `http://${shown}:${addr.port}`;
            log(
              `serving '${modelName}' (${ckpt.source}${
                loaded.adapter ? ` + adapter ${loaded.adapter}` : ""
              }, context ${context} tokens, ${gpu.adapterSummary.name})`,
            );
            log(`  chat page:  ${base}/`);
            log(`  OpenAI API: ${base}/v1  (model '${modelName}'${apiKey ? ", API key set" : ""})`);
            if (!isLoopbackAddress(host)) {
              log(
                `  listening on ${host}: anyone who can reach this machine can use the model${
                  apiKey ? " with the key" : "; consider --api-key"
                }`,
              );
            }
            log("  Ctrl-C stops the server.");
            io.onListen?.(addr);
          },
        });
      } catch (e) {
        if (e instanceof Deno.errors.AddrInUse) {
          throw new UserError(`port ${port} on ${host} is in use: pick another with --port`);
        }
        if (e instanceof Deno.errors.PermissionDenied) {
          throw new UserError(
            `no permission to listen on ${host}:${port}: ${(e as Error).message}`,
          );
        }
        throw e;
      }
      // Generations in progress end at the abort; the engine is destroyed after them.
      await server.finished;
      for (const [s, f] of listeners) Deno.removeSignalListener(s, f);
      return 0;
    } finally {
      engine.destroy();
    }
  } finally {
    if (!io.gpu) gpu.destroy();
  }
}

/** `trainer serve`. */
export const serveCommand: CommandSpec = {
  name: "serve",
  summary: "Serve a model over an OpenAI-compatible API, with a chat page",
  usage: "[--model DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [options]",
  description:
    `Starts an HTTP server with the OpenAI API (GET /v1/models, POST /v1/chat/completions, POST /v1/completions, streaming as Server-Sent Events), so the openai client libraries, Open-WebUI, FastGPT and other chat UIs can use the model: base URL http://HOST:PORT/v1. GET / is a chat page. Prompts are rendered as 'trainer generate' renders them; requests that set no temperature, top_p, top_k or max_tokens get the model's generation_config.json values, else those of 'generate'.

One request generates at a time (one KV cache); the others wait in arrival order, up to --max-queue, and more are answered 503. A client that disconnects stops its generation.

The server listens on 127.0.0.1, this machine only, unless --host says otherwise: binding another address (0.0.0.0, a LAN address) exposes the model to the network, to anyone who can reach that address; set an API key then.`,
  options: {
    model: {
      type: "string",
      valueName: "DIR",
      help: `checkpoint or Hugging Face model directory (default ${DEFAULT_MODEL_DIR})`,
    },
    "model-name": {
      type: "string",
      valueName: "NAME",
      help: "the model id clients use (default: the model directory's name)",
    },
    host: {
      type: "string",
      valueName: "ADDR",
      help:
        `address to listen on (default ${DEFAULT_HOST}, this machine only; anything else exposes the model to the network)`,
    },
    port: {
      type: "string",
      valueName: "N",
      help: `port to listen on (default ${DEFAULT_PORT}; 0 picks a free one)`,
    },
    "api-key": {
      type: "string",
      valueName: "KEY",
      help: `require 'Authorization: Bearer KEY' on /v1 (default: env ${API_KEY_ENV}, else no key)`,
    },
    "max-queue": {
      type: "string",
      valueName: "N",
      help:
        `requests that may wait while one generates; more get 503 (default ${DEFAULT_MAX_QUEUE})`,
    },
    "max-tokens": {
      type: "string",
      valueName: "N",
      help:
        `reply budget of a request without max_tokens (default: generation_config.json, else ${DEFAULT_MAX_NEW_TOKENS})`,
    },
    context: {
      type: "string",
      valueName: "N",
      help:
        `tokens the KV cache holds, prompt + reply; longer prompts get 413 (default min(${DEFAULT_CHAT_CONTEXT}, max_position_embeddings))`,
    },
    adapter: {
      type: "string",
      valueName: "DIR",
      help: "a LoRA adapter (PEFT format) trained on --model, applied in memory on load",
    },
  },
  run: (args) => runServe(args),
};
