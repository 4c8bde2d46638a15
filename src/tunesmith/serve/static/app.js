// tunesmith chat page: talks to the same server's OpenAI API (/v1/models, /v1/chat/completions with SSE).
// Model and user text only ever reach the page through textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), health: $("health"), clear: $("clear"), settings: $("settings"), system: $("system"),
  temperature: $("temperature"), maxTokens: $("max-tokens"), apiKey: $("api-key"), error: $("error"),
  log: $("log"), empty: $("empty"), composer: $("composer"), input: $("input"), send: $("send"), stop: $("stop"),
};

let history = [];        // the conversation sent with every request: [{role, content}]
let controller = null;   // AbortController of the answer being streamed

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = ui.apiKey.value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `${res.status} ${res.statusText}`;
}

function showError(message) {
  ui.error.textContent = message || "";
  ui.error.hidden = !message;
}

function setHealth(text, state) {
  ui.health.textContent = text;
  ui.health.dataset.state = state;
}

async function waitUntilReady() {
  for (;;) {
    try {
      const res = await fetch("/health");
      if (res.ok) { setHealth("ready", "ok"); return true; }
      const body = await res.json().catch(() => ({}));
      if (body.status === "failed") {
        setHealth("failed", "bad");
        showError(`The model could not be loaded: ${body.error}`);
        return false;
      }
      setHealth("loading model…", "wait");
    } catch (_) {
      setHealth("server offline", "bad");
    }
    await sleep(1000);
  }
}

async function loadModels() {
  const res = await fetch("/v1/models", { headers: headers() });
  if (!res.ok) {
    showError(await errorMessage(res));
    if (res.status === 401) { ui.settings.open = true; ui.apiKey.focus(); }
    return;
  }
  showError("");
  const { data } = await res.json();
  const previous = ui.model.value;
  ui.model.replaceChildren();
  for (const m of data) {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.parent ? `${m.id}  ·  adapter on ${m.parent}` : `${m.id}  ·  base model`;
    ui.model.append(option);
  }
  // Like `tunesmith infer`: an adapter first, since that is what was trained.
  const adapter = data.find((m) => m.parent);
  ui.model.value = data.some((m) => m.id === previous) ? previous : (adapter || data[0] || {}).id || "";
  ui.model.disabled = data.length === 0;
}

function scrollToEnd() {
  ui.log.scrollTop = ui.log.scrollHeight;
}

function addMessage(role, text, label) {
  ui.empty.hidden = true;
  const wrap = document.createElement("div");
  wrap.className = `msg ${role}`;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = label;
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = text;
  wrap.append(who, body);
  ui.log.append(wrap);
  scrollToEnd();
  return { wrap, who, body };
}

// Server-sent events from a fetch body: yields each `data:` JSON object, stops at `data: [DONE]`.
async function* sseEvents(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer = (buffer + value).replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).trimStart()).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.input.focus();
}

function numberOr(input, fallback) {
  const v = Number(input.value);
  return input.value.trim() === "" || Number.isNaN(v) ? fallback : v;
}

async function send(text) {
  showError("");
  const model = ui.model.value;
  const userTurn = { role: "user", content: text };
  history.push(userTurn);
  addMessage("user", text, "You");
  const answer = addMessage("assistant", "", model);
  answer.wrap.classList.add("streaming");

  const messages = [];
  const system = ui.system.value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);

  controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let reply = "", finish = null, usage = null, failure = null, stopped = false;
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify({
        model, messages, stream: true, stream_options: { include_usage: true },
        temperature: numberOr(ui.temperature, 0), max_tokens: numberOr(ui.maxTokens, 512),
      }),
    });
    if (!res.ok) throw new Error(await errorMessage(res));
    for await (const event of sseEvents(res.body)) {
      if (event.error) throw new Error(event.error.message);
      for (const choice of event.choices) {
        if (choice.delta && choice.delta.content) {
          reply += choice.delta.content;
          answer.body.textContent = reply;
          scrollToEnd();
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      if (event.usage) usage = event.usage;
    }
  } catch (e) {
    if (e.name === "AbortError") stopped = true;
    else failure = e.message || String(e);
  } finally {
    controller = null;
    answer.wrap.classList.remove("streaming");
    setBusy(false);
  }

  if (failure) {
    history.splice(history.indexOf(userTurn), 1);  // keep failed turns out of the conversation
    answer.wrap.classList.add("failed");
    answer.body.textContent = failure;
    answer.who.textContent = `${model} · error`;
    return;
  }
  if (reply) history.push({ role: "assistant", content: reply });
  else history.splice(history.indexOf(userTurn), 1);
  const seconds = (performance.now() - started) / 1000;
  const notes = [model];
  if (stopped) notes.push("stopped");
  else if (finish === "length") notes.push("cut at max tokens");
  if (usage && usage.completion_tokens) {
    notes.push(`${usage.completion_tokens} tokens`, `${(usage.completion_tokens / seconds).toFixed(1)} tok/s`);
  }
  answer.who.textContent = notes.join(" · ");
  if (!reply) {
    answer.wrap.classList.add("note");
    answer.body.textContent = stopped ? "(stopped before any text)" : "(empty answer)";
  }
}

function clearConversation() {
  if (controller) controller.abort();
  history = [];
  for (const el of [...ui.log.querySelectorAll(".msg")]) el.remove();
  ui.empty.hidden = false;
  showError("");
  ui.input.focus();
}

function autoGrow() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 220)}px`;
}

ui.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = ui.input.value;
  if (!text.trim() || controller) return;
  if (ui.model.disabled || !ui.model.value) {
    showError("No model to talk to yet: the server is still loading (or the model list could not be read).");
    return;
  }
  ui.input.value = "";
  autoGrow();
  send(text);
});
ui.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    ui.composer.requestSubmit();
  }
});
ui.input.addEventListener("input", autoGrow);
ui.stop.addEventListener("click", () => { if (controller) controller.abort(); });
ui.clear.addEventListener("click", clearConversation);
ui.apiKey.addEventListener("change", loadModels);

(async () => {
  if (await waitUntilReady()) await loadModels();
  ui.input.focus();
})();
