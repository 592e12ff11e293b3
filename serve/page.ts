/**
 * The chat page `trainer serve` answers at `GET /`: one self-contained HTML
 * document (inline CSS and script, no framework, no build step, nothing
 * loaded from elsewhere) that talks to the same server's
 * `/v1/chat/completions` with `stream: true`, reading the Server-Sent Events
 * through `fetch` and a stream reader.
 *
 * It keeps the conversation (the history sent with every message), streams
 * each reply into the page as it comes, and has a reset button, a
 * temperature slider, a stop button and a field for the API key when the
 * server has one (kept in this page only, never stored).
 *
 * Element ids (`input`, `send`, `stop`, `reset`, `temperature`, `key`,
 * `messages`, `status`) and each reply's `data-state` (`streaming`, `done`,
 * `stopped`, `error`) are what the browser test drives and reads.
 *
 * @module
 */

/** The chat page's HTML. */
export const CHAT_PAGE_HTML: string = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>trainer chat</title>
<style>
  :root { color-scheme: light dark; --accent: #2563eb; --muted: #888; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.5 system-ui, sans-serif; display: flex; flex-direction: column;
    height: 100vh; }
  header { display: flex; flex-wrap: wrap; gap: 0.5rem 1rem; align-items: center;
    padding: 0.5rem 1rem; border-bottom: 1px solid #8884; }
  header h1 { font-size: 1rem; margin: 0; }
  header label { display: flex; gap: 0.4rem; align-items: center; color: var(--muted); }
  #status { color: var(--muted); margin-left: auto; }
  #messages { flex: 1; overflow-y: auto; padding: 1rem; display: flex; flex-direction: column;
    gap: 0.75rem; }
  .msg { max-width: 48rem; padding: 0.5rem 0.75rem; border-radius: 0.6rem;
    white-space: pre-wrap; overflow-wrap: anywhere; }
  .msg.user { align-self: flex-end; background: var(--accent); color: white; }
  .msg.assistant { align-self: flex-start; background: #8882; }
  .msg.assistant[data-state="streaming"]::after { content: "\\25CD"; color: var(--muted);
    margin-left: 0.2rem; }
  .msg.assistant[data-state="error"] { color: #dc2626; }
  .msg.assistant[data-state="stopped"]::after { content: " (stopped)"; color: var(--muted); }
  form { display: flex; gap: 0.5rem; padding: 0.75rem 1rem; border-top: 1px solid #8884; }
  textarea { flex: 1; resize: none; font: inherit; padding: 0.5rem; border-radius: 0.4rem; }
  button { font: inherit; padding: 0.4rem 0.9rem; border-radius: 0.4rem; cursor: pointer; }
  button[hidden] { display: none; }
</style>
</head>
<body>
<header>
  <h1>trainer chat <span id="model"></span></h1>
  <label>temperature
    <input id="temperature" type="range" min="0" max="2" step="0.05" value="0.7">
    <output id="temperature-value">0.70</output>
  </label>
  <label>API key <input id="key" type="password" autocomplete="off" size="12"
    placeholder="if the server has one"></label>
  <button id="reset" type="button">Reset</button>
  <span id="status" role="status"></span>
</header>
<main id="messages" aria-live="polite"></main>
<form id="form">
  <textarea id="input" rows="2" placeholder="Message (Enter sends, Shift+Enter for a new line)"
    aria-label="Message"></textarea>
  <button id="send" type="submit">Send</button>
  <button id="stop" type="button" hidden>Stop</button>
</form>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const messages = $("messages"), input = $("input"), temperature = $("temperature");
const history = [];
let model = null;
let contextLength = 0; // prompt + reply positions, from /v1/models (0: unknown)
let controller = null;
// Bumped by Reset, so a reply cut by it does not land in the new conversation.
let epoch = 0;

function headers() {
  const h = { "content-type": "application/json" };
  const key = $("key").value.trim();
  if (key) h.authorization = "Bearer " + key;
  return h;
}

function status(text) { $("status").textContent = text; }

async function errorMessage(res) {
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return "HTTP " + res.status;
}

async function loadModel() {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (!res.ok) { status(await errorMessage(res)); return; }
    const entry = (await res.json()).data[0];
    model = entry.id;
    contextLength = entry.context_length || 0;
    $("model").textContent = "\\u00b7 " + model;
    status("ready");
  } catch (e) { status("cannot reach the server: " + e.message); }
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  messages.append(div);
  messages.scrollTop = messages.scrollHeight;
  return div;
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
}

/** Yields the data field of each Server-Sent Event in the response body. */
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf = (buf + value).replace(/\\r\\n?/g, "\\n");
    let end;
    while ((end = buf.indexOf("\\n\\n")) >= 0) {
      const event = buf.slice(0, end);
      buf = buf.slice(end + 2);
      const data = event.split("\\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\\n");
      if (data) yield data;
    }
  }
}

async function send() {
  const text = input.value.trim();
  if (!text || controller) return;
  if (!model) await loadModel();
  if (!model) return;
  input.value = "";
  bubble("user", text);
  history.push({ role: "user", content: text });
  const out = bubble("assistant", "");
  out.dataset.state = "streaming";
  controller = new AbortController();
  const mine = epoch;
  busy(true);
  status("generating");
  let reply = "";
  try {
    // A reply may take a quarter of the context; when the conversation outgrows
    // the rest, the oldest turns are left out of the prompt (they stay on screen).
    let res;
    let first = 0;
    while (true) {
      res = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers(),
        signal: controller.signal,
        body: JSON.stringify({
          model, messages: history.slice(first), stream: true,
          temperature: Number(temperature.value),
          ...(contextLength ? { max_tokens: Math.max(1, Math.floor(contextLength / 4)) } : {}),
        }),
      });
      if (res.status === 413 && first + 2 < history.length) {
        await res.body?.cancel();
        first += 2; // one user turn and its reply
        status("generating (oldest turns left out to fit the context)");
        continue;
      }
      break;
    }
    if (!res.ok) throw new Error(await errorMessage(res));
    let finished = false;
    for await (const data of events(res.body)) {
      if (data === "[DONE]") { finished = true; break; }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        reply += delta.content;
        out.textContent = reply;
        messages.scrollTop = messages.scrollHeight;
      }
    }
    if (!finished) throw new Error("the reply ended early (server gone?)");
    history.push({ role: "assistant", content: reply });
    out.dataset.state = "done";
    status("ready");
  } catch (e) {
    if (controller.signal.aborted) {
      if (mine === epoch) history.push({ role: "assistant", content: reply });
      out.dataset.state = "stopped";
      status("stopped");
    } else {
      if (mine === epoch) history.pop();
      out.textContent = reply + (reply ? "\\n" : "") + "error: " + e.message;
      out.dataset.state = "error";
      status("error");
    }
  } finally {
    controller = null;
    busy(false);
    input.focus();
  }
}

$("form").addEventListener("submit", (e) => { e.preventDefault(); send(); });
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("reset").addEventListener("click", () => {
  epoch++;
  if (controller) controller.abort();
  history.length = 0;
  messages.replaceChildren();
  status("history cleared");
  input.focus();
});
temperature.addEventListener("input", () => {
  $("temperature-value").textContent = Number(temperature.value).toFixed(2);
});
$("key").addEventListener("change", loadModel);
loadModel();
input.focus();
</script>
</body>
</html>
`;
