/**
 * The OpenAI API's wire format, as far as `trainer serve` speaks it: request
 * bodies parsed and checked into typed requests, and the response, stream
 * chunk and error objects built the way OpenAI's own API shapes them, so the
 * official clients (npm `openai`, Python `openai`) and the chat UIs built on
 * them (Open-WebUI, FastGPT, ...) work unchanged.
 *
 * Leniency where clients differ: fields this server does not know are
 * ignored (clients send `user`, `store`, `metadata`, ... freely), `null`
 * counts as absent (as in OpenAI's API), but a known field of the wrong type
 * or range is a 400 naming it, and a feature the server cannot honour
 * (`n` > 1, logprobs, tools, penalties other than 0, ...) is a 400 saying so
 * rather than being silently dropped.
 *
 * @module
 */
import type { ChatMessage } from "../data/tokenizer.ts";

/** An error answered as OpenAI answers errors: a status and `{"error": {...}}`. */
export class ApiError extends Error {
  /** HTTP status. */
  readonly status: number;
  /** OpenAI's error `type`: `invalid_request_error`, `authentication_error`, `server_error`. */
  readonly type: string;
  /** The request field at fault, or null. */
  readonly param: string | null;
  /** A machine-readable code (`model_not_found`, `context_length_exceeded`, ...), or null. */
  readonly code: string | null;
  /** Response headers that go with the status (`Allow`, `Retry-After`). */
  readonly headers: Readonly<Record<string, string>>;

  /** `message` is shown to the client as it is. */
  constructor(
    status: number,
    message: string,
    opts: {
      type?: string;
      param?: string | null;
      code?: string | null;
      headers?: Record<string, string>;
    } = {},
  ) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.type = opts.type ?? (status >= 500 ? "server_error" : "invalid_request_error");
    this.param = opts.param ?? null;
    this.code = opts.code ?? null;
    this.headers = { ...opts.headers };
  }
}

/** The body of an error response. */
export interface ErrorBody {
  error: { message: string; type: string; param: string | null; code: string | null };
}

/** `{"error": {"message", "type", "param", "code"}}` of an `ApiError`. */
export function errorBody(e: ApiError): ErrorBody {
  return { error: { message: e.message, type: e.type, param: e.param, code: e.code } };
}

/** Generation settings a request may set; absent ones take the server's defaults. */
export interface GenerationParams {
  /** Most tokens to generate (`max_completion_tokens` or `max_tokens`). */
  maxTokens?: number;
  /** 0 = greedy. */
  temperature?: number;
  /** Nucleus mass in (0, 1]; a request's 0 arrives here as temperature 0 (greedy). */
  topP?: number;
  /** Keep the k most likely tokens; 0 = off (`top_k`, an extension vLLM also takes). */
  topK?: number;
  /** Transformers' repetition penalty (`repetition_penalty`, as in vLLM); 1 = off. */
  repetitionPenalty?: number;
  /** Seed of the draws: the same seed and settings give the same reply. */
  seed?: number;
  /** Generation ends before the first of these strings appears; it is not returned. */
  stop: string[];
}

/** A checked `POST /v1/chat/completions`. */
export interface ChatCompletionRequest {
  kind: "chat";
  model: string;
  messages: ChatMessage[];
  params: GenerationParams;
  stream: boolean;
  /** `stream_options.include_usage`: a last chunk carries `usage`. */
  includeUsage: boolean;
}

/** A checked `POST /v1/completions` (plain text continuation). */
export interface CompletionRequest {
  kind: "completion";
  model: string;
  prompt: string;
  params: GenerationParams;
  stream: boolean;
  includeUsage: boolean;
}

/** OpenAI's reasons a choice ended: a stop (token or string), or the token budget. */
export type FinishReason = "stop" | "length";

/** Token counts of one request. */
export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

/** OpenAI allows at most 4 stop sequences. */
export const MAX_STOP_SEQUENCES = 4;

/** A JSON object as parsed or about to be serialized. */
export type Json = Record<string, unknown>;

function invalid(param: string, message: string, code: string | null = null): ApiError {
  return new ApiError(400, message, { param, code });
}

function typeName(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  return typeof v === "object" ? "an object" : `a ${typeof v}`;
}

/** The field's value, null counting as absent. */
function field(body: Json, name: string): unknown {
  const v = body[name];
  return v === null ? undefined : v;
}

function optionalNumber(
  body: Json,
  name: string,
  range: { min?: number; max?: number; integer?: boolean; minExclusive?: boolean },
): number | undefined {
  const v = field(body, name);
  if (v === undefined) return undefined;
  if (typeof v !== "number" || !Number.isFinite(v)) {
    throw invalid(name, `'${name}' must be a number, got ${typeName(v)}`, "invalid_type");
  }
  if (range.integer && !Number.isSafeInteger(v)) {
    throw invalid(name, `'${name}' must be an integer, got ${v}`, "invalid_type");
  }
  const low = range.min !== undefined &&
    (range.minExclusive ? v <= range.min : v < range.min);
  if (low || (range.max !== undefined && v > range.max)) {
    const lo = range.min === undefined ? "" : `${range.minExclusive ? ">" : ">="} ${range.min}`;
    const hi = range.max === undefined ? "" : `<= ${range.max}`;
    throw invalid(
      name,
      `'${name}' must be ${[lo, hi].filter((s) => s).join(" and ")}, got ${v}`,
      "invalid_value",
    );
  }
  return v;
}

function optionalBoolean(body: Json, name: string): boolean | undefined {
  const v = field(body, name);
  if (v === undefined) return undefined;
  if (typeof v !== "boolean") {
    throw invalid(name, `'${name}' must be a boolean, got ${typeName(v)}`, "invalid_type");
  }
  return v;
}

function unsupported(param: string, message: string): ApiError {
  return invalid(param, message, "unsupported_parameter");
}

/** Features whose absence (or neutral value) is the only thing this server can honour. */
function rejectUnsupported(body: Json, kind: "chat" | "completion"): void {
  const n = optionalNumber(body, "n", { min: 1, integer: true });
  if (n !== undefined && n !== 1) {
    throw unsupported("n", "'n' must be 1: this server generates one choice per request");
  }
  for (const p of ["frequency_penalty", "presence_penalty"]) {
    const v = optionalNumber(body, p, { min: -2, max: 2 });
    if (v !== undefined && v !== 0) {
      throw unsupported(
        p,
        `'${p}' is not supported (only 0); 'repetition_penalty' (Transformers' rule, > 1 discourages repeats) is`,
      );
    }
  }
  const logprobs = field(body, "logprobs");
  if (logprobs !== undefined && logprobs !== false && logprobs !== 0) {
    throw unsupported("logprobs", "'logprobs' is not supported");
  }
  if (field(body, "top_logprobs") !== undefined) {
    throw unsupported("top_logprobs", "'top_logprobs' is not supported");
  }
  const bias = field(body, "logit_bias");
  if (bias !== undefined) {
    if (typeof bias !== "object" || Array.isArray(bias)) {
      throw invalid("logit_bias", "'logit_bias' must be an object", "invalid_type");
    }
    if (Object.keys(bias as Json).length > 0) {
      throw unsupported("logit_bias", "'logit_bias' is not supported");
    }
  }
  if (kind === "chat") {
    for (const p of ["tools", "functions"]) {
      const v = field(body, p);
      if (v !== undefined && !(Array.isArray(v) && v.length === 0)) {
        throw unsupported(p, `'${p}' (tool calling) is not supported by this model server`);
      }
    }
    const format = field(body, "response_format");
    if (format !== undefined) {
      const type = typeof format === "object" && !Array.isArray(format)
        ? (format as Json)["type"]
        : undefined;
      if (type !== "text") {
        throw unsupported(
          "response_format",
          '\'response_format\' supports only {"type": "text"}',
        );
      }
    }
  } else {
    if (optionalBoolean(body, "echo")) {
      throw unsupported("echo", "'echo' is not supported");
    }
    const bestOf = optionalNumber(body, "best_of", { min: 1, integer: true });
    if (bestOf !== undefined && bestOf !== 1) {
      throw unsupported("best_of", "'best_of' must be 1");
    }
    const suffix = field(body, "suffix");
    if (suffix !== undefined && suffix !== "") {
      throw unsupported("suffix", "'suffix' (insertion) is not supported");
    }
  }
}

function parseStop(body: Json): string[] {
  const v = field(body, "stop");
  if (v === undefined) return [];
  const list = typeof v === "string" ? [v] : v;
  if (!Array.isArray(list) || !list.every((s) => typeof s === "string")) {
    throw invalid(
      "stop",
      `'stop' must be a string or an array of strings, got ${typeName(v)}`,
      "invalid_type",
    );
  }
  if (list.length > MAX_STOP_SEQUENCES) {
    throw invalid(
      "stop",
      `'stop' takes at most ${MAX_STOP_SEQUENCES} sequences, got ${list.length}`,
      "invalid_value",
    );
  }
  if (list.some((s) => s === "")) {
    throw invalid("stop", "'stop' sequences must not be empty", "invalid_value");
  }
  return list as string[];
}

function parseParams(body: Json): GenerationParams {
  const maxCompletion = optionalNumber(body, "max_completion_tokens", { min: 1, integer: true });
  const maxTokens = optionalNumber(body, "max_tokens", { min: 1, integer: true });
  if (maxCompletion !== undefined && maxTokens !== undefined && maxCompletion !== maxTokens) {
    throw invalid(
      "max_tokens",
      "'max_tokens' and 'max_completion_tokens' differ; send one of them",
      "invalid_value",
    );
  }
  let temperature = optionalNumber(body, "temperature", { min: 0, max: 2 });
  const topP = optionalNumber(body, "top_p", { min: 0, max: 1 });
  // top_p 0 keeps only the most likely token: greedy decoding.
  if (topP === 0) temperature = 0;
  let topK = optionalNumber(body, "top_k", { min: -1, integer: true });
  if (topK === -1) topK = 0; // vLLM's "off"
  const repetitionPenalty = optionalNumber(body, "repetition_penalty", {
    min: 0,
    minExclusive: true,
    max: 100,
  });
  const seed = optionalNumber(body, "seed", { integer: true });
  return {
    maxTokens: maxCompletion ?? maxTokens,
    temperature,
    topP: topP === 0 ? undefined : topP,
    topK,
    repetitionPenalty,
    seed,
    stop: parseStop(body),
  };
}

function parseStreamFlags(body: Json): { stream: boolean; includeUsage: boolean } {
  const stream = optionalBoolean(body, "stream") ?? false;
  const opts = field(body, "stream_options");
  let includeUsage = false;
  if (opts !== undefined) {
    if (typeof opts !== "object" || Array.isArray(opts)) {
      throw invalid("stream_options", "'stream_options' must be an object", "invalid_type");
    }
    includeUsage = optionalBoolean(opts as Json, "include_usage") ?? false;
    if (!stream) {
      throw invalid(
        "stream_options",
        "'stream_options' is only allowed when 'stream' is true",
        "invalid_value",
      );
    }
  }
  return { stream, includeUsage };
}

function requireObject(body: unknown): Json {
  if (typeof body !== "object" || body === null || Array.isArray(body)) {
    throw new ApiError(400, `the request body must be a JSON object, got ${typeName(body)}`);
  }
  return body as Json;
}

function parseModel(body: Json): string {
  const model = body["model"];
  if (model === undefined || model === null) {
    throw invalid("model", "'model' is required (GET /v1/models lists it)", "missing_required");
  }
  if (typeof model !== "string") {
    throw invalid("model", `'model' must be a string, got ${typeName(model)}`, "invalid_type");
  }
  return model;
}

/** A message's text: a string, or an array of `{"type": "text", "text"}` parts joined. */
function messageText(content: unknown, param: string, role: string): string {
  if (content === undefined || content === null) {
    if (role === "assistant") return "";
    throw invalid(param, `'${param}' is required`, "missing_required");
  }
  if (typeof content === "string") return content;
  if (Array.isArray(content)) {
    let text = "";
    content.forEach((part, j) => {
      const p = `${param}[${j}]`;
      if (typeof part !== "object" || part === null || Array.isArray(part)) {
        throw invalid(p, `'${p}' must be an object`, "invalid_type");
      }
      const type = (part as Json)["type"];
      if (type !== "text") {
        throw unsupported(
          `${p}.type`,
          `content parts of type ${
            JSON.stringify(type)
          } are not supported; this model reads text only`,
        );
      }
      const t = (part as Json)["text"];
      if (typeof t !== "string") {
        throw invalid(`${p}.text`, `'${p}.text' must be a string`, "invalid_type");
      }
      text += t;
    });
    return text;
  }
  throw invalid(
    param,
    `'${param}' must be a string or an array of text parts, got ${typeName(content)}`,
    "invalid_type",
  );
}

function parseMessages(body: Json): ChatMessage[] {
  const list = body["messages"];
  if (list === undefined || list === null) {
    throw invalid("messages", "'messages' is required", "missing_required");
  }
  if (!Array.isArray(list)) {
    throw invalid(
      "messages",
      `'messages' must be an array, got ${typeName(list)}`,
      "invalid_type",
    );
  }
  if (list.length === 0) {
    throw invalid("messages", "'messages' must not be empty", "invalid_value");
  }
  return list.map((m, i): ChatMessage => {
    const p = `messages[${i}]`;
    if (typeof m !== "object" || m === null || Array.isArray(m)) {
      throw invalid(p, `'${p}' must be an object, got ${typeName(m)}`, "invalid_type");
    }
    const role = (m as Json)["role"];
    if (typeof role !== "string") {
      throw invalid(`${p}.role`, `'${p}.role' must be a string`, "invalid_type");
    }
    // OpenAI's newer name for the system turn.
    const r = role === "developer" ? "system" : role;
    if (r !== "system" && r !== "user" && r !== "assistant") {
      throw invalid(
        `${p}.role`,
        `'${p}.role' ${
          JSON.stringify(role)
        } is not supported: use system, developer, user or assistant (no tool calling)`,
        "invalid_value",
      );
    }
    if (r === "assistant" && field(m as Json, "tool_calls") !== undefined) {
      throw unsupported(`${p}.tool_calls`, "tool calls are not supported");
    }
    return { role: r, content: messageText((m as Json)["content"], `${p}.content`, r) };
  });
}

/** Checks a chat completion body (already JSON-parsed); throws `ApiError` 400 naming the field. */
export function parseChatCompletionRequest(body: unknown): ChatCompletionRequest {
  const b = requireObject(body);
  const model = parseModel(b);
  const messages = parseMessages(b);
  rejectUnsupported(b, "chat");
  return { kind: "chat", model, messages, params: parseParams(b), ...parseStreamFlags(b) };
}

/** Checks a (legacy) completion body: `prompt` is a string or an array of one string. */
export function parseCompletionRequest(body: unknown): CompletionRequest {
  const b = requireObject(body);
  const model = parseModel(b);
  let prompt = field(b, "prompt") ?? "";
  if (Array.isArray(prompt) && prompt.length === 1 && typeof prompt[0] === "string") {
    prompt = prompt[0];
  }
  if (typeof prompt !== "string") {
    throw invalid(
      "prompt",
      Array.isArray(prompt)
        ? "'prompt' must be one string: batches of prompts and token-id prompts are not supported"
        : `'prompt' must be a string, got ${typeName(prompt)}`,
      Array.isArray(prompt) ? "unsupported_parameter" : "invalid_type",
    );
  }
  rejectUnsupported(b, "completion");
  return { kind: "completion", model, prompt, params: parseParams(b), ...parseStreamFlags(b) };
}

/** Common fields of every completion object and chunk. */
export interface CompletionMeta {
  /** `chatcmpl-...` or `cmpl-...`, the same for every chunk of a stream. */
  id: string;
  /** Unix seconds. */
  created: number;
  model: string;
}

/** A fresh id: `prefix-` and 24 random hex digits. */
export function completionId(prefix: "chatcmpl" | "cmpl"): string {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return `${prefix}-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

/** `{prompt_tokens, completion_tokens, total_tokens}`. */
export function usage(promptTokens: number, completionTokens: number): Usage {
  return {
    prompt_tokens: promptTokens,
    completion_tokens: completionTokens,
    total_tokens: promptTokens + completionTokens,
  };
}

/** A non-streamed `chat.completion`. */
export function chatCompletion(
  meta: CompletionMeta,
  text: string,
  finish: FinishReason,
  u: Usage,
): Json {
  return {
    id: meta.id,
    object: "chat.completion",
    created: meta.created,
    model: meta.model,
    choices: [{
      index: 0,
      message: { role: "assistant", content: text, refusal: null },
      logprobs: null,
      finish_reason: finish,
    }],
    usage: u,
  };
}

/**
 * One `chat.completion.chunk`: the first carries `{role}`, the next ones
 * `{content}`, the last an empty delta and the finish reason; with
 * `include_usage` a final chunk has no choices and the usage (as OpenAI does).
 */
export function chatCompletionChunk(
  meta: CompletionMeta,
  delta: { role?: "assistant"; content?: string },
  finish: FinishReason | null,
  u?: Usage,
): Json {
  const chunk: Json = {
    id: meta.id,
    object: "chat.completion.chunk",
    created: meta.created,
    model: meta.model,
    choices: u ? [] : [{ index: 0, delta, logprobs: null, finish_reason: finish }],
  };
  if (u) chunk["usage"] = u;
  return chunk;
}

/** A non-streamed `text_completion`. */
export function textCompletion(
  meta: CompletionMeta,
  text: string,
  finish: FinishReason,
  u: Usage,
): Json {
  return {
    id: meta.id,
    object: "text_completion",
    created: meta.created,
    model: meta.model,
    choices: [{ index: 0, text, logprobs: null, finish_reason: finish }],
    usage: u,
  };
}

/** One streamed `text_completion` chunk (the usage-only one when `u` is given). */
export function textCompletionChunk(
  meta: CompletionMeta,
  text: string,
  finish: FinishReason | null,
  u?: Usage,
): Json {
  const chunk: Json = {
    id: meta.id,
    object: "text_completion",
    created: meta.created,
    model: meta.model,
    choices: u ? [] : [{ index: 0, text, logprobs: null, finish_reason: finish }],
  };
  if (u) chunk["usage"] = u;
  return chunk;
}

/** One entry of `GET /v1/models`. */
export function modelObject(id: string, created: number, contextLength?: number): Json {
  // context_length (as vLLM's max_model_len, under the name other servers use):
  // prompt + reply positions, so a client can size max_tokens and its history.
  return {
    id,
    object: "model",
    created,
    owned_by: "trainer",
    ...(contextLength ? { context_length: contextLength } : {}),
  };
}

/** `GET /v1/models`. */
export function modelList(id: string, created: number, contextLength?: number): Json {
  return { object: "list", data: [modelObject(id, created, contextLength)] };
}

/** One Server-Sent Event carrying `data` as JSON (or the literal `[DONE]`). */
export function sseEvent(data: Json | ErrorBody | "[DONE]"): string {
  return `data: ${data === "[DONE]" ? data : JSON.stringify(data)}\n\n`;
}
