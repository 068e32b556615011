// StarChat Playground: chat with history, StarChat's system prompts and sampling defaults, a
// reply streamed from our own /v1/chat/completions, Stop / Regenerate / Clear / Export.
import { errorFromResponse, streamChatCompletion, toPlaygroundError } from "./playground-api.js";
import { copyText, renderMarkdownInto } from "./playground-markdown.js";
import { authHeaders, readParameters, setUpSettingsPanel, storeApiKey, storedApiKey, systemPrompt } from "./playground-settings.js";

const MIN_RATE_SECONDS = 0.02;
const EXAMPLE_PROMPTS = [
  "How can I write a Python function to generate the nth Fibonacci number?",
  "How do I get the current date using shell commands? Explain how it works.",
  "Write a function in JavaScript to reverse the words in a given string.",
  "Create a regex to extract dates from log lines, and show it in a Python example.",
];
const state = {
  config: null,
  model: null,
  messages: [], // {role, content, stats, error, finishReason, element}
  generation: null, // {controller, entry}
};

const byId = (id) => document.getElementById(id);

// ---------- API key dialog ----------

function askForApiKey(reason) {
  const dialog = byId("api-key-dialog");
  byId("api-key-reason").textContent = reason;
  byId("api-key-input").value = "";
  if (!dialog.open) dialog.showModal();
  byId("api-key-input").focus();
}

// ---------- conversation view ----------

function setStatus(text, kind = "") {
  const status = byId("status");
  status.textContent = text;
  status.dataset.kind = kind;
}

function nearBottom(container) {
  return container.scrollHeight - container.scrollTop - container.clientHeight < 80;
}

function scrollToEnd() {
  const container = byId("messages");
  container.scrollTop = container.scrollHeight;
}

function addMessage(role, content) {
  const entry = { role, content, stats: null, error: null, finishReason: null, element: null, renderQueued: false };
  const element = document.createElement("div");
  element.className = `message ${role}`;
  const avatar = document.createElement("div");
  avatar.className = "avatar";
  avatar.textContent = role === "user" ? "You" : "★";
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  const body = document.createElement("div");
  body.className = role === "user" ? "content user-text" : "content markdown";
  bubble.append(body);
  if (role === "assistant") {
    const stats = document.createElement("div");
    stats.className = "reply-stats";
    bubble.append(stats);
  }
  element.append(avatar, bubble);
  entry.element = element;
  state.messages.push(entry);
  byId("welcome").hidden = true;
  byId("messages").append(element);
  renderEntry(entry);
  scrollToEnd();
  return entry;
}

function formatStats(stats, streaming) {
  const parts = [];
  if (stats.time_to_first_token_ms !== null) parts.push(`first token ${stats.time_to_first_token_ms} ms`);
  if (stats.tokens_per_second !== null) parts.push(`${stats.tokens_per_second.toFixed(1)} tokens/s`);
  parts.push(`${stats.completion_tokens} tokens`);
  if (!streaming) parts.push(`${stats.total_seconds.toFixed(2)} s`);
  return parts.join(" · ");
}

function renderEntry(entry) {
  entry.renderQueued = false;
  const body = entry.element.querySelector(".content");
  entry.element.dataset.contentLength = entry.content.length;
  if (entry.role === "user") {
    body.textContent = entry.content;
    return;
  }
  const follow = nearBottom(byId("messages"));
  const streaming = state.generation !== null && state.generation.entry === entry;
  renderMarkdownInto(body, entry.content);
  entry.element.classList.toggle("streaming", streaming);
  entry.element.dataset.state = streaming ? "streaming" : entry.error ? "error" : entry.finishReason === "stopped" ? "stopped" : "done";
  if (!entry.content && !entry.error) {
    const placeholder = document.createElement("span");
    placeholder.className = "thinking";
    placeholder.textContent = streaming ? "Waiting for the first token…" : "(empty reply)";
    body.replaceChildren(placeholder);
  }
  const statsLine = entry.element.querySelector(".reply-stats");
  const stats = streaming ? entry.liveStats && entry.liveStats() : entry.stats;
  let text = stats && stats.completion_tokens > 0 ? formatStats(stats, streaming) : "";
  if (!streaming && entry.finishReason === "stopped") text = text ? `${text} · stopped` : "stopped";
  else if (!streaming && entry.finishReason === "length") text = `${text} · hit max new tokens`;
  statsLine.textContent = text;
  if (stats) {
    statsLine.dataset.ttftMs = stats.time_to_first_token_ms ?? "";
    statsLine.dataset.tokensPerSecond = stats.tokens_per_second ?? "";
  }
  entry.element.querySelector(".error-card")?.remove();
  if (entry.error) {
    const card = document.createElement("div");
    card.className = "error-card";
    card.setAttribute("role", "alert");
    const title = document.createElement("strong");
    title.textContent = entry.error.title;
    const detail = document.createElement("div");
    detail.className = "error-detail";
    detail.textContent = entry.error.detail;
    card.append(title, detail);
    if (entry.error.hint) {
      const hint = document.createElement("div");
      hint.className = "error-hint";
      hint.textContent = entry.error.hint;
      card.append(hint);
    }
    statsLine.before(card);
  }
  if (follow) scrollToEnd();
}

function queueRender(entry) {
  if (entry.renderQueued) return;
  entry.renderQueued = true;
  requestAnimationFrame(() => renderEntry(entry));
}

function updateControls() {
  const generating = state.generation !== null;
  byId("send").hidden = generating;
  byId("stop").hidden = !generating;
  const last = state.messages[state.messages.length - 1];
  byId("regenerate").disabled = generating || !last;
  byId("prompt").placeholder = generating
    ? "Generating… press Stop to end the reply"
    : "Ask StarChat about code…  (Enter to send, Shift+Enter for a new line)";
}

// ---------- generation ----------

function requestMessages() {
  // Failed or empty replies are not part of the dialogue the model sees.
  const turns = state.messages
    .filter((m) => m.role === "user" || (m.content && !m.error))
    .map((m) => ({ role: m.role, content: m.content }));
  return [{ role: "system", content: systemPrompt() }, ...turns];
}

function requestBody() {
  const parameters = readParameters(state.config.generation_defaults);
  const body = {
    messages: requestMessages(),
    stream: true,
    stream_options: { include_usage: true },
    temperature: parameters.temperature,
    top_p: parameters.top_p,
    top_k: parameters.top_k,
    max_tokens: parameters.max_tokens,
    repetition_penalty: parameters.repetition_penalty,
  };
  if (state.model) body.model = state.model; // else the server's only model
  if (parameters.seed !== null) body.seed = parameters.seed;
  return body;
}

async function generateReply() {
  const controller = new AbortController();
  const entry = addMessage("assistant", "");
  state.generation = { controller, entry };
  renderEntry(entry); // now as the streaming reply
  updateControls();
  setStatus("Waiting for the first token…", "busy");

  const started = performance.now();
  let firstTokenAt = null;
  let lastTokenAt = null;
  let contentChunks = 0;
  let usageTokens = null;
  const measure = () => {
    const tokens = usageTokens ?? contentChunks;
    const decodeSeconds = firstTokenAt !== null && lastTokenAt > firstTokenAt ? (lastTokenAt - firstTokenAt) / 1000 : 0;
    return {
      time_to_first_token_ms: firstTokenAt === null ? null : Math.round(firstTokenAt - started),
      // Decode speed: tokens after the first over the time between first and last; a rate
      // measured over a few milliseconds (a reply that arrived in one piece) means nothing.
      tokens_per_second: tokens > 1 && decodeSeconds >= MIN_RATE_SECONDS ? (tokens - 1) / decodeSeconds : null,
      completion_tokens: tokens,
      total_seconds: (performance.now() - started) / 1000,
    };
  };
  entry.liveStats = measure;

  try {
    for await (const delta of streamChatCompletion(requestBody(), authHeaders(), controller.signal)) {
      if (delta.completionTokens !== null) usageTokens = delta.completionTokens;
      if (delta.finishReason) entry.finishReason = delta.finishReason;
      if (!delta.content) continue;
      const now = performance.now();
      if (firstTokenAt === null) {
        firstTokenAt = now;
        setStatus("Generating…", "busy");
      }
      lastTokenAt = now;
      contentChunks += 1;
      entry.content += delta.content;
      queueRender(entry);
    }
    setStatus("Ready");
  } catch (error) {
    if (controller.signal.aborted) {
      entry.finishReason = "stopped";
      setStatus("Stopped");
    } else {
      entry.error = toPlaygroundError(error);
      setStatus("Error", "error");
      if (entry.error.status === 401) {
        storeApiKey("", false);
        askForApiKey(`The server rejected the API key (401): ${entry.error.detail}`);
      }
    }
  } finally {
    entry.stats = measure();
    entry.liveStats = null;
    if (state.generation && state.generation.entry === entry) state.generation = null;
    renderEntry(entry);
    updateControls();
  }
}

function send(text) {
  const message = text.trim();
  if (!message || state.generation) return;
  addMessage("user", message);
  byId("prompt").value = "";
  generateReply();
}

function stop() {
  if (state.generation) state.generation.controller.abort();
}

function regenerate() {
  if (state.generation) return;
  while (state.messages.length && state.messages[state.messages.length - 1].role === "assistant") {
    state.messages.pop().element.remove();
  }
  if (state.messages.length) generateReply();
  updateControls();
}

function clearConversation() {
  stop(); // the aborted reply finishes on its own, out of view
  for (const entry of state.messages) entry.element.remove();
  state.messages = [];
  byId("welcome").hidden = false;
  setStatus("Ready");
  updateControls();
}

function exportConversation() {
  const preset = byId("system-preset").value;
  const conversation = {
    format: "starchat-playground-conversation",
    version: 1,
    exported_at: new Date().toISOString(),
    model: state.model,
    system_prompt: { name: preset, content: systemPrompt() },
    parameters: readParameters(state.config.generation_defaults),
    messages: [
      { role: "system", content: systemPrompt() },
      ...state.messages.map((m) => {
        const exported = { role: m.role, content: m.content };
        if (m.role === "assistant") {
          exported.finish_reason = m.finishReason;
          exported.stats = m.stats;
          if (m.error) exported.error = { title: m.error.title, detail: m.error.detail, status: m.error.status };
        }
        return exported;
      }),
    ],
  };
  const blob = new Blob([JSON.stringify(conversation, null, 2)], { type: "application/json" });
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = `starchat-conversation-${conversation.exported_at.replace(/[:.]/g, "-")}.json`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// ---------- start ----------

async function loadModelName() {
  try {
    const response = await fetch("v1/models", { headers: authHeaders() });
    if (response.status === 401) {
      const problem = await errorFromResponse(response);
      storeApiKey("", false);
      askForApiKey(`The server rejected this API key (401): ${problem.detail}`);
      return;
    }
    if (!response.ok) return;
    const body = await response.json();
    const id = body && body.data && body.data[0] && body.data[0].id;
    if (id) {
      state.model = id;
      byId("model-name").textContent = id;
    }
  } catch (error) {
    // The name is cosmetic: chat requests still work and report their own errors.
  }
}

function setUpApiKeyDialog() {
  const dialog = byId("api-key-dialog");
  byId("api-key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = byId("api-key-input").value.trim();
    if (!key) return;
    storeApiKey(key, byId("api-key-remember").checked);
    dialog.close();
    loadModelName();
    byId("prompt").focus();
  });
  byId("api-key-cancel").addEventListener("click", () => dialog.close());
  byId("change-key").hidden = !state.config.auth_required;
  byId("change-key").addEventListener("click", () => askForApiKey("Enter the API key for this server."));
}

function setUpComposer() {
  byId("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send(byId("prompt").value);
  });
  byId("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send(byId("prompt").value);
    }
  });
  byId("stop").addEventListener("click", stop);
  byId("regenerate").addEventListener("click", regenerate);
  byId("clear").addEventListener("click", clearConversation);
  byId("export").addEventListener("click", exportConversation);
  byId("messages").addEventListener("click", async (event) => {
    const button = event.target.closest(".copy-button");
    if (!button) return;
    const code = button.closest(".code-block").querySelector("code").textContent;
    const copied = await copyText(code);
    button.textContent = copied ? "Copied!" : "Copy failed";
    button.classList.toggle("copied", copied);
    setTimeout(() => {
      button.textContent = "Copy";
      button.classList.remove("copied");
    }, 1500);
  });
  const examples = byId("examples");
  for (const prompt of EXAMPLE_PROMPTS) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "example";
    button.textContent = prompt;
    button.addEventListener("click", () => send(prompt));
    examples.append(button);
  }
}

async function start() {
  try {
    const response = await fetch("playground/config.json");
    if (!response.ok) throw await errorFromResponse(response);
    state.config = await response.json();
  } catch (error) {
    const problem = toPlaygroundError(error);
    setStatus(`Cannot load the playground settings: ${problem.title}`, "error");
    return;
  }
  setUpSettingsPanel(state.config);
  setUpApiKeyDialog();
  setUpComposer();
  updateControls();
  if (state.config.auth_required && !storedApiKey()) {
    askForApiKey("This server requires an API key. It is sent as an Authorization: Bearer header and kept in this browser only.");
  } else {
    loadModelName();
  }
  document.body.dataset.ready = "true";
  byId("prompt").focus();
}

start();
