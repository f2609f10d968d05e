// The playground: ghost-text completion in the browser, through the public API only
// (GET v1/models, POST v1/completions with stream: true), so it is also a working example of
// what an editor plugin does. No dependencies, no build step.
"use strict";

const DEBOUNCE_MS = 300;         // wait for a pause in typing, as editor plugins do
const KEY_NAME = "codeassist.apiKey";
const INDENT = "    ";

const $ = (id) => document.getElementById(id);
const ui = {
  editor: $("editor"), overlay: $("overlay"), before: $("before"), ghost: $("ghost"), after: $("after"),
  key: $("api-key"), remember: $("remember-key"), temperature: $("temperature"), maxTokens: $("max-tokens"),
  stopBlank: $("stop-blank"), modelId: $("model-id"), modelDot: $("model-dot"), status: $("status"), stats: $("stats"),
};
const state = {
  model: null,       // id from v1/models; completions need it
  ghost: "",         // suggestion shown at ghostAt
  ghostAt: -1,
  controller: null,  // AbortController of the request in flight
  timer: null,       // debounce timer
};

// ------------------------------------------------------------------ API key (browser only)

function loadKey() {
  const remembered = localStorage.getItem(KEY_NAME);
  ui.remember.checked = remembered !== null;
  ui.key.value = remembered ?? sessionStorage.getItem(KEY_NAME) ?? "";
}

// sessionStorage by default (gone with the tab); localStorage only when asked to remember.
function saveKey() {
  localStorage.removeItem(KEY_NAME);
  sessionStorage.removeItem(KEY_NAME);
  if (ui.key.value) (ui.remember.checked ? localStorage : sessionStorage).setItem(KEY_NAME, ui.key.value);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (ui.key.value) h.Authorization = `Bearer ${ui.key.value}`;
  return h;
}

// ------------------------------------------------------------------ API calls

async function errorMessage(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error?.message ?? JSON.stringify(body)}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function loadModel() {
  try {
    const response = await fetch("v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorMessage(response));
    state.model = (await response.json()).data[0].id;
    ui.modelId.textContent = state.model;
    ui.modelDot.className = "dot ok";
    setStatus("idle", "Pause typing for a suggestion · Tab accept · Esc dismiss");
  } catch (err) {
    state.model = null;
    ui.modelId.textContent = "unavailable";
    ui.modelDot.className = "dot bad";
    setStatus("error", `v1/models: ${err.message}${/^401/.test(err.message) ? " (enter the API key above)" : ""}`);
  }
}

function requestBody(prefix, suffix) {
  const body = {
    model: state.model, prompt: prefix, max_tokens: Number(ui.maxTokens.value),
    temperature: Number(ui.temperature.value), stream: true, stream_options: { include_usage: true },
  };
  // Fill-in-the-middle only when there is code after the cursor: a blank suffix says nothing,
  // and plain left-to-right completion is what the model saw most of in training.
  if (suffix.trim()) body.suffix = suffix;
  if (ui.stopBlank.checked) body.stop = ["\n\n"];
  return body;
}

// The JSON payloads of a server-sent-event stream, until [DONE]. Events end with a blank line;
// a chunk boundary may fall anywhere, so unfinished text waits in `buffer`.
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).split("\n")
        .filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trimStart()).join("\n");
      buffer = buffer.slice(end + 2);
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

// ------------------------------------------------------------------ completion

async function complete() {
  const at = ui.editor.selectionStart;
  const text = ui.editor.value;
  if (!state.model || at !== ui.editor.selectionEnd || !text.trim()) return;
  const controller = new AbortController();
  state.controller = controller;
  const run = { started: performance.now(), first: null, tokens: null, finish: null };
  showGhost("", at);
  setStatus("streaming", "generating…");
  try {
    const response = await fetch("v1/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody(text.slice(0, at), text.slice(at))),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const chunk of sseEvents(response)) readChunk(chunk, run, at);
    finish(run);
  } catch (err) {
    if (err.name !== "AbortError") setStatus("error", err.message);
  } finally {
    if (state.controller === controller) state.controller = null;
  }
}

function readChunk(chunk, run, at) {
  if (chunk.error) throw new Error(chunk.error.message);  // an in-band error after the 200
  if (chunk.usage) run.tokens = chunk.usage.completion_tokens;
  const choice = chunk.choices?.[0];
  if (!choice) return;
  if (choice.text) {
    run.first ??= performance.now();
    showGhost(state.ghost + choice.text, at);
  }
  if (choice.finish_reason) run.finish = choice.finish_reason;
}

function finish(run) {
  const total = performance.now() - run.started;
  const parts = [`${Math.round(total)} ms`];
  if (run.first !== null) parts.push(`first token ${Math.round(run.first - run.started)} ms`);
  if (run.tokens !== null) {
    // Decode speed: tokens after the first over the time after the first.
    const decodeS = (performance.now() - (run.first ?? run.started)) / 1000;
    const rate = run.tokens > 1 && decodeS > 0 ? (run.tokens - 1) / decodeS : 0;
    parts.push(`${run.tokens} tokens`, `${rate.toFixed(0)} tok/s`);
  }
  parts.push(run.finish ?? "no finish_reason");
  ui.stats.textContent = `last: ${parts.join(" · ")}`;
  setStatus("done", state.ghost ? "Tab accept · Esc dismiss" : "no suggestion here");
}

// Typing, clicking, Esc: the suggestion no longer fits, so stop paying for it.
function cancel(reason) {
  clearTimeout(state.timer);
  if (state.controller) {
    state.controller.abort();
    state.controller = null;
    setStatus("cancelled", reason);
  }
  showGhost("", -1);
}

function schedule() {
  cancel("cancelled: you kept typing");
  setStatus("waiting", "waiting for a pause…");
  state.timer = setTimeout(complete, DEBOUNCE_MS);
}

function accept() {
  const text = state.ghost;
  cancel("accepted");
  insertText(text);  // fires `input`, which asks for the next suggestion
}

// ------------------------------------------------------------------ editor

// execCommand keeps the browser's undo history; setRangeText is the fallback where it is gone.
function insertText(text) {
  ui.editor.focus();
  if (!document.execCommand("insertText", false, text)) {
    ui.editor.setRangeText(text, ui.editor.selectionStart, ui.editor.selectionEnd, "end");
    ui.editor.dispatchEvent(new Event("input"));
  }
}

function showGhost(text, at) {
  state.ghost = at < 0 ? "" : text;
  state.ghostAt = at;
  render();
}

function render() {
  const text = ui.editor.value;
  const at = state.ghost ? state.ghostAt : text.length;
  ui.before.textContent = text.slice(0, at);
  ui.ghost.textContent = state.ghost;
  ui.after.textContent = text.slice(at) + "\n";  // a <pre> drops one trailing newline; a textarea does not
  syncScroll();
}

function syncScroll() {
  ui.overlay.scrollTop = ui.editor.scrollTop;
  ui.overlay.scrollLeft = ui.editor.scrollLeft;
}

function currentIndent() {
  const text = ui.editor.value.slice(0, ui.editor.selectionStart);
  const line = text.slice(text.lastIndexOf("\n") + 1);
  const indent = line.match(/^[ \t]*/)[0];
  return line.trimEnd().endsWith(":") ? indent + INDENT : indent;
}

function onKeyDown(event) {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.key === "Tab" && !event.shiftKey) {
    event.preventDefault();
    if (state.ghost) accept(); else insertText(INDENT);
  } else if (event.key === "Escape") {
    event.preventDefault();
    cancel("dismissed");
  } else if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    insertText("\n" + currentIndent());
  } else if (/^(Arrow|Home|End|Page)/.test(event.key)) {
    cancel("cursor moved");
  }
}

function setStatus(name, text) {
  ui.status.dataset.state = name;
  ui.status.textContent = text;
}

function showSetting(input) {
  const out = $(`${input.id}-out`);
  out.textContent = input.step.includes(".") ? Number(input.value).toFixed(2) : input.value;
}

function wire() {
  ui.editor.addEventListener("input", () => { render(); schedule(); });
  ui.editor.addEventListener("keydown", onKeyDown);
  ui.editor.addEventListener("scroll", syncScroll);
  ui.editor.addEventListener("mousedown", () => cancel("cursor moved"));
  ui.editor.addEventListener("blur", () => cancel("editor left"));
  for (const input of [ui.temperature, ui.maxTokens]) input.addEventListener("input", () => showSetting(input));
  ui.key.addEventListener("change", () => { saveKey(); loadModel(); });
  ui.remember.addEventListener("change", saveKey);
}

loadKey();
wire();
[ui.temperature, ui.maxTokens].forEach(showSetting);
render();
loadModel();
ui.editor.focus();
ui.editor.setSelectionRange(ui.editor.value.length, ui.editor.value.length);
