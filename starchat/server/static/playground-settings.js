// The settings panel (system prompt, sampling parameters) and the API key kept in this browser.

const PARAMETER_NAMES = ["temperature", "top_p", "top_k", "max_tokens", "repetition_penalty"];
const INTEGER_PARAMETERS = new Set(["top_k", "max_tokens"]);
const API_KEY_STORAGE_NAME = "starchat.playground.apiKey";
const SYSTEM_PROMPT_LABELS = {
  coding: "Coding assistant",
  default: "StarChat default",
  no_system: "None (no_system)",
};

const byId = (id) => document.getElementById(id);

// ---------- API key ----------

export function storedApiKey() {
  return sessionStorage.getItem(API_KEY_STORAGE_NAME) || localStorage.getItem(API_KEY_STORAGE_NAME) || "";
}

export function storeApiKey(key, remember) {
  sessionStorage.removeItem(API_KEY_STORAGE_NAME);
  localStorage.removeItem(API_KEY_STORAGE_NAME);
  if (key) (remember ? localStorage : sessionStorage).setItem(API_KEY_STORAGE_NAME, key);
}

export function authHeaders() {
  const key = storedApiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// ---------- settings ----------

export function readParameters(defaults) {
  const parameters = {};
  for (const name of PARAMETER_NAMES) {
    const raw = byId(name).value.trim();
    const value = INTEGER_PARAMETERS.has(name) ? parseInt(raw, 10) : parseFloat(raw);
    parameters[name] = Number.isFinite(value) ? value : defaults[name];
  }
  const seed = parseInt(byId("seed").value.trim(), 10);
  parameters.seed = Number.isFinite(seed) ? seed : null;
  return parameters;
}

function applyParameters(values) {
  for (const name of PARAMETER_NAMES) {
    byId(name).value = values[name];
    byId(`${name}-range`).value = values[name];
  }
  byId("seed").value = values.seed ?? "";
}

export function systemPrompt() {
  return byId("system-prompt").value;
}

function setUpSystemPrompts(config) {
  const select = byId("system-preset");
  const prompts = config.system_prompts;
  for (const name of Object.keys(prompts)) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = SYSTEM_PROMPT_LABELS[name] || name;
    select.append(option);
  }
  const custom = document.createElement("option");
  custom.value = "custom";
  custom.textContent = "Custom";
  select.append(custom);
  select.value = config.default_system_prompt in prompts ? config.default_system_prompt : Object.keys(prompts)[0];
  byId("system-prompt").value = prompts[select.value] ?? "";
  byId("system-prompt").placeholder = "No system prompt";
  select.addEventListener("change", () => {
    if (select.value !== "custom") byId("system-prompt").value = prompts[select.value];
  });
  byId("system-prompt").addEventListener("input", () => {
    const text = systemPrompt();
    const named = Object.keys(prompts).find((name) => prompts[name] === text);
    select.value = named ?? "custom";
  });
}

function setUpParameters(defaults) {
  for (const name of PARAMETER_NAMES) {
    const number = byId(name);
    const range = byId(`${name}-range`);
    range.addEventListener("input", () => (number.value = range.value));
    number.addEventListener("input", () => (range.value = number.value));
  }
  applyParameters(defaults);
  byId("reset-params").addEventListener("click", () => applyParameters(defaults));
}

/** Fill the panel from the server's config.json: named system prompts and generation defaults. */
export function setUpSettingsPanel(config) {
  setUpSystemPrompts(config);
  setUpParameters(config.generation_defaults);
}
