/**
 * The HTTP side of `trainer serve`: a `Deno.serve` handler speaking the
 * OpenAI API (`GET /v1/models`, `POST /v1/chat/completions`,
 * `POST /v1/completions`, streamed as Server-Sent Events) and serving the
 * chat page at `GET /`.
 *
 * Scheduling: one request generates at a time on the engine's single KV cache
 * (batch-1 kernels; interleaving two requests would overwrite each other's
 * cache rows). Requests wait in a bounded first-come, first-served line
 * (`SlotQueue`); a full line is answered 503 at once. Everything that can be
 * refused (malformed JSON, unknown model, a prompt too long for the context)
 * is decided before a request joins the line, so a bad request never waits
 * and never holds the slot.
 *
 * Disconnects: a streamed reply's body is cancelled when its client goes
 * away, and `request.signal` aborts when a client waiting for a
 * non-streamed reply does; either stops generation within a token (or
 * frees the request's place in the line), so the next request starts.
 * (`request.signal` aborts only on a disconnect with Deno's
 * `no-legacy-abort` behaviour, which deno.json enables; without it Deno also
 * aborts it after every successful response, harmless here since generation
 * has ended by then.)
 *
 * Errors are OpenAI-style JSON with the right status, never a stack trace;
 * an unexpected failure is a 500 and is logged, and the server goes on.
 *
 * @module
 */
import {
  ApiError,
  chatCompletion,
  chatCompletionChunk,
  type ChatCompletionRequest,
  completionId,
  type CompletionMeta,
  type CompletionRequest,
  errorBody,
  modelList,
  modelObject,
  parseChatCompletionRequest,
  parseCompletionRequest,
  sseEvent,
  textCompletion,
  textCompletionChunk,
  usage,
} from "./openai.ts";
import { ContextOverflowError, type Job, type RunResult, type ServeEngine } from "./engine.ts";
import { type Release, SlotQueue } from "./queue.ts";
import { CHAT_PAGE_HTML } from "./page.ts";
import { UserError } from "../util/errors.ts";

/** Default bound of the line of waiting requests (`--max-queue`). */
export const DEFAULT_MAX_QUEUE = 16;

/** Largest request body read (a full context of text is a few hundred KiB at most). */
export const MAX_BODY_BYTES = 4 * 1024 * 1024;

/** Settings of the request handler. */
export interface ServerOptions {
  /** The served model: plans and runs each request. */
  engine: ServeEngine;
  /** The id `GET /v1/models` lists and requests must name. */
  modelName: string;
  /** When set, `/v1/*` requires `Authorization: Bearer <apiKey>`. */
  apiKey?: string;
  /** Requests that may wait while one generates; more get 503. */
  maxQueue?: number;
  /** One line per request (default: stderr); tests pass a no-op. */
  log?: (line: string) => void;
  /**
   * Answer only requests whose Host header names this machine (localhost,
   * 127.x.x.x, [::1]): with the server on a loopback address, this stops a web
   * page the user visits from reaching it through DNS rebinding. `serve` sets
   * it when it binds a loopback address.
   */
  loopbackHostsOnly?: boolean;
  /** Aborting it stops every generation in progress (shutdown). */
  signal?: AbortSignal;
}

/** The handler and the state behind it. */
export interface Handler {
  /** The `Deno.serve` handler. */
  (req: Request): Promise<Response>;
  /** The line of requests (for tests and logs). */
  readonly queue: SlotQueue;
}

const JSON_HEADERS = { "content-type": "application/json" };

function json(body: unknown, status = 200, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body), { status, headers: { ...JSON_HEADERS, ...headers } });
}

function errorResponse(e: ApiError): Response {
  return json(errorBody(e), e.status, e.headers);
}

/** The SHA-256 of `text`: comparing digests takes the same time whatever the key's length. */
async function digest(text: string): Promise<Uint8Array> {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text)));
}

async function keyMatches(given: string, expected: Uint8Array): Promise<boolean> {
  const d = await digest(given);
  let diff = 0;
  for (let i = 0; i < d.length; i++) diff |= d[i] ^ expected[i];
  return diff === 0;
}

/** Whether an address or host name is this machine: localhost, 127.x.x.x, ::1. */
export function isLoopbackAddress(name: string): boolean {
  return name === "localhost" || name === "::1" || name === "[::1]" ||
    /^127\.\d+\.\d+\.\d+$/.test(name);
}

/** Whether a Host header (a name and an optional port) names this machine. */
export function isLoopbackHost(host: string): boolean {
  return isLoopbackAddress(
    host.startsWith("[") ? host.slice(0, host.indexOf("]") + 1) : host.split(":")[0],
  );
}

async function readJsonBody(req: Request): Promise<unknown> {
  // A JSON media type, as every OpenAI client sends: a cross-site form or
  // text/plain post (which browsers send without asking) cannot start a generation.
  const type = (req.headers.get("content-type") ?? "").split(";")[0].trim().toLowerCase();
  if (type !== "application/json") {
    throw new ApiError(
      415,
      `the request body must be JSON with 'Content-Type: application/json', got '${
        type || "none"
      }'`,
      { code: "unsupported_media_type" },
    );
  }
  const tooLarge = () =>
    new ApiError(413, `the request body is larger than ${MAX_BODY_BYTES} bytes`, {
      code: "request_too_large",
    });
  const declared = Number(req.headers.get("content-length"));
  if (declared > MAX_BODY_BYTES) throw tooLarge();
  const chunks: Uint8Array[] = [];
  let size = 0;
  if (req.body) {
    for await (const chunk of req.body) {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) throw tooLarge();
      chunks.push(chunk);
    }
  }
  const bytes = new Uint8Array(size);
  let off = 0;
  for (const c of chunks) {
    bytes.set(c, off);
    off += c.length;
  }
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    throw new ApiError(400, "the request body is not valid UTF-8");
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new ApiError(
      400,
      `We could not parse the JSON body of your request: ${(e as Error).message}`,
      { code: "invalid_json" },
    );
  }
}

/** The `Deno.serve` handler of a server for `opts.engine`. */
export function createHandler(opts: ServerOptions): Handler {
  const { engine, modelName } = opts;
  const queue = new SlotQueue(opts.maxQueue ?? DEFAULT_MAX_QUEUE);
  const log = opts.log ?? ((line: string) => console.error(line));
  const created = Math.floor(Date.now() / 1000);
  const keyDigest = opts.apiKey !== undefined ? digest(opts.apiKey) : undefined;

  async function authorize(req: Request): Promise<void> {
    if (!keyDigest) return;
    const header = req.headers.get("authorization") ?? "";
    const m = /^Bearer\s+(.+)$/i.exec(header.trim());
    if (!m || !(await keyMatches(m[1], await keyDigest))) {
      throw new ApiError(
        401,
        m
          ? "Incorrect API key provided."
          : "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
        { type: "invalid_request_error", code: "invalid_api_key" },
      );
    }
  }

  function checkModel(model: string): void {
    if (model !== modelName) {
      throw new ApiError(
        404,
        `The model '${model}' does not exist; this server serves '${modelName}'.`,
        { param: "model", code: "model_not_found" },
      );
    }
  }

  function planJob(r: ChatCompletionRequest | CompletionRequest): Job {
    checkModel(r.model);
    let prompt: number[];
    if (r.kind === "chat") {
      if (!engine.hasChatTemplate) {
        throw new ApiError(
          400,
          `the model '${modelName}' has no chat template (tokenizer_config.json), so it cannot chat; use /v1/completions`,
          { code: "no_chat_template" },
        );
      }
      try {
        prompt = engine.chatPrompt(r.messages);
      } catch (e) {
        // The template's own refusal (`raise_exception`), e.g. roles out of order.
        if (!(e instanceof UserError)) throw e;
        throw new ApiError(400, e.message, { param: "messages", code: "invalid_value" });
      }
    } else {
      prompt = engine.textPrompt(r.prompt);
    }
    try {
      return engine.plan(prompt, r.params, r.kind === "chat");
    } catch (e) {
      if (e instanceof ContextOverflowError) {
        throw new ApiError(413, e.message, {
          param: r.kind === "chat" ? "messages" : "prompt",
          code: "context_length_exceeded",
        });
      }
      throw e;
    }
  }

  /** The log line of a finished request: its tokens and speed, or how it ended early. */
  function describe(
    path: string,
    job: Job,
    r: RunResult | undefined,
    failed: boolean,
    queuedAt: number,
    startedAt: number,
  ): string {
    const gone = opts.signal?.aborted ? "server shutting down" : "client gone";
    const what = r
      ? `${r.promptTokens} + ${r.completionTokens} tokens, ${
        r.tokensPerSecond.toFixed(1)
      } tokens/s${r.cancelled ? `, ${gone}` : ""}`
      : `${job.prompt.length} prompt tokens, ${failed ? "failed" : `${gone} while waiting`}`;
    const now = performance.now();
    const waited = ((startedAt || now) - queuedAt) / 1000;
    const took = startedAt ? `, generated in ${((now - startedAt) / 1000).toFixed(2)} s` : "";
    return `POST ${path}: ${what}, waited ${waited.toFixed(2)} s${took}`;
  }

  async function complete(
    req: Request,
    path: string,
    r: ChatCompletionRequest | CompletionRequest,
  ): Promise<Response> {
    const job = planJob(r);
    const abort = new AbortController();
    const onDisconnect = () => abort.abort(new DOMException("client disconnected", "AbortError"));
    if (opts.signal?.aborted) throw new ApiError(503, "the server is shutting down");
    req.signal.addEventListener("abort", onDisconnect, { once: true });
    opts.signal?.addEventListener("abort", onDisconnect, { once: true });
    const entry = queue.tryEnter(abort.signal);
    if (!entry) {
      req.signal.removeEventListener("abort", onDisconnect);
      throw new ApiError(
        503,
        `The server is busy: one request is generating and ${queue.maxWaiting} are waiting (--max-queue). Retry later.`,
        { code: "queue_full", headers: { "retry-after": "1" } },
      );
    }
    const meta: CompletionMeta = {
      id: completionId(r.kind === "chat" ? "chatcmpl" : "cmpl"),
      created: Math.floor(Date.now() / 1000),
      model: modelName,
    };
    const queuedAt = performance.now();
    const done = () => {
      req.signal.removeEventListener("abort", onDisconnect);
      opts.signal?.removeEventListener("abort", onDisconnect);
    };

    if (!r.stream) {
      let release: Release | undefined;
      let result: RunResult | undefined;
      let failed = false;
      let startedAt = 0;
      try {
        release = await entry;
        startedAt = performance.now();
        result = await engine.run(job, { signal: abort.signal });
      } catch (e) {
        // Nobody reads a reply to a client that left.
        if (abort.signal.aborted) return new Response(null, { status: 499 });
        failed = true;
        throw e;
      } finally {
        release?.();
        done();
        log(describe(path, job, result, failed, queuedAt, startedAt));
      }
      const u = usage(result.promptTokens, result.completionTokens);
      return json(
        r.kind === "chat"
          ? chatCompletion(meta, result.text, result.finish, u)
          : textCompletion(meta, result.text, result.finish, u),
      );
    }

    const encoder = new TextEncoder();
    let closed = false;
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        const send = (event: Parameters<typeof sseEvent>[0]) => {
          if (!closed) controller.enqueue(encoder.encode(sseEvent(event)));
        };
        const piece = (text: string) =>
          r.kind === "chat"
            ? chatCompletionChunk(meta, { content: text }, null)
            : textCompletionChunk(meta, text, null);
        void (async () => {
          let release: Release | undefined;
          let result: RunResult | undefined;
          let failed = false;
          let startedAt = 0;
          try {
            release = await entry;
            startedAt = performance.now();
            if (r.kind === "chat") send(chatCompletionChunk(meta, { role: "assistant" }, null));
            result = await engine.run(job, { signal: abort.signal, onText: (t) => send(piece(t)) });
            if (result.cancelled) return;
            send(
              r.kind === "chat"
                ? chatCompletionChunk(meta, {}, result.finish)
                : textCompletionChunk(meta, "", result.finish),
            );
            if (r.includeUsage) {
              const u = usage(result.promptTokens, result.completionTokens);
              send(
                r.kind === "chat"
                  ? chatCompletionChunk(meta, {}, null, u)
                  : textCompletionChunk(meta, "", null, u),
              );
            }
            send("[DONE]");
          } catch (e) {
            if (abort.signal.aborted) return;
            failed = true;
            // The status line has gone out: report the failure in the stream, as OpenAI does.
            log(`POST ${path}: failed while streaming: ${(e as Error).stack ?? e}`);
            send(errorBody(new ApiError(500, `generation failed: ${(e as Error).message}`)));
          } finally {
            release?.();
            done();
            log(describe(path, job, result, failed, queuedAt, startedAt));
            if (!closed) {
              closed = true;
              controller.close();
            }
          }
        })();
      },
      cancel() {
        closed = true;
        abort.abort(new DOMException("client disconnected", "AbortError"));
      },
    });
    return new Response(body, {
      headers: {
        "content-type": "text/event-stream; charset=utf-8",
        "cache-control": "no-cache",
        "x-accel-buffering": "no",
      },
    });
  }

  async function route(req: Request): Promise<Response> {
    const url = new URL(req.url);
    if (opts.loopbackHostsOnly && !isLoopbackHost(req.headers.get("host") ?? "")) {
      throw new ApiError(
        403,
        "this server answers only requests addressed to this machine (localhost, 127.0.0.1, [::1]); start it with --host to serve other names",
        { type: "permission_error", code: "forbidden_host" },
      );
    }
    const path = url.pathname.replace(/\/+$/, "") || "/";
    const method = req.method;
    const allow = (methods: string) => {
      if (!methods.split(", ").includes(method)) {
        throw new ApiError(405, `Method ${method} is not allowed on ${path}; use ${methods}.`, {
          code: "method_not_allowed",
          headers: { allow: methods },
        });
      }
    };
    if (path === "/") {
      allow("GET, HEAD");
      return new Response(method === "HEAD" ? null : CHAT_PAGE_HTML, {
        headers: {
          "content-type": "text/html; charset=utf-8",
          "content-security-policy":
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
        },
      });
    }
    if (path === "/v1" || path.startsWith("/v1/")) await authorize(req);
    if (path === "/v1/models") {
      allow("GET");
      return json(modelList(modelName, created, opts.engine.capacity));
    }
    if (path.startsWith("/v1/models/")) {
      allow("GET");
      const id = decodeURIComponent(path.slice("/v1/models/".length));
      checkModel(id);
      return json(modelObject(modelName, created, opts.engine.capacity));
    }
    if (path === "/v1/chat/completions") {
      allow("POST");
      return await complete(req, path, parseChatCompletionRequest(await readJsonBody(req)));
    }
    if (path === "/v1/completions") {
      allow("POST");
      return await complete(req, path, parseCompletionRequest(await readJsonBody(req)));
    }
    throw new ApiError(404, `Unknown request URL: ${method} ${url.pathname}.`, {
      code: "unknown_url",
    });
  }

  const handler = async (req: Request): Promise<Response> => {
    try {
      return await route(req);
    } catch (e) {
      if (e instanceof ApiError) return errorResponse(e);
      log(`${req.method} ${new URL(req.url).pathname}: internal error: ${(e as Error).stack ?? e}`);
      return errorResponse(new ApiError(500, `internal error: ${(e as Error).message}`));
    }
  };
  return Object.assign(handler, { queue });
}

/** Where and how `serve` listens. */
export interface ListenOptions extends ServerOptions {
  /** Interface to bind; 127.0.0.1 keeps the model on this machine. */
  hostname: string;
  /** Port; 0 picks a free one (see the returned server's `addr`). */
  port: number;
  /** Aborting it shuts the server down, stopping generations in progress. */
  signal?: AbortSignal;
  /** Called once listening, with the address. */
  onListen?: (addr: Deno.NetAddr) => void;
}

/** A running server. */
export interface RunningServer {
  /** Where it listens (the port chosen when 0 was asked). */
  readonly addr: Deno.NetAddr;
  /**
   * Resolves after a shutdown (`signal` aborted) once the HTTP server has
   * closed and no generation is running, so the engine may be destroyed.
   */
  readonly finished: Promise<void>;
}

/** Starts an HTTP server for `opts.engine`. */
export function serve(opts: ListenOptions): RunningServer {
  const handler = createHandler({
    loopbackHostsOnly: isLoopbackAddress(opts.hostname),
    ...opts,
  });
  const server = Deno.serve({
    hostname: opts.hostname,
    port: opts.port,
    signal: opts.signal,
    onListen: (addr) => opts.onListen?.(addr),
    onError: (e) => {
      (opts.log ?? console.error)(`internal error: ${(e as Error).stack ?? e}`);
      return errorResponse(new ApiError(500, "internal error"));
    },
  }, handler);
  return { addr: server.addr, finished: server.finished.then(() => handler.queue.idle()) };
}
