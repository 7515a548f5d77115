// llmctl serve: the page. Plain JavaScript, no dependencies, nothing fetched from elsewhere.
// Model text is only ever put on the page as text nodes (never innerHTML), so a reply cannot inject markup.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const SVG_NS = "http://www.w3.org/2000/svg";
const ACTIVE_STATES = new Set(["running", "stalled"]);
const RUN_POLL_MS = 2000;
const LIST_POLL_MS = 5000;

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children.flat().filter((child) => child !== null && child !== undefined));
  return node;
}

function svg(tag, attributes = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  return node;
}

// ------------------------------------------------------------------ formatting

function fmt(value, digits = 3) {
  if (value === null || value === undefined || value === "" || Number.isNaN(Number(value))) return "–";
  const number = Number(value);
  if (!Number.isFinite(number)) return String(value);
  if (Math.abs(number) >= 1e6) return (number / 1e6).toFixed(1) + "M";
  if (Math.abs(number) >= 1e4) return (number / 1e3).toFixed(1) + "k";
  if (Number.isInteger(number)) return number.toLocaleString("en-US");
  if (Math.abs(number) < 1e-3) return number.toExponential(2);
  return String(Number(number.toPrecision(digits)));
}

function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

function plural(count, noun) {
  return `${count} ${noun}${count === 1 ? "" : "s"}`;
}

function ago(timestamp) {
  return timestamp ? fmtDuration(Date.now() / 1000 - timestamp) + " ago" : "–";
}

// ------------------------------------------------------------------ the API

const apiKey = {
  get: () => localStorage.getItem("llmctl-api-key") || "",
  set: (value) => localStorage.setItem("llmctl-api-key", value),
};

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (apiKey.get()) headers.Authorization = `Bearer ${apiKey.get()}`;
  if (options.body) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try {
      message = (await response.json()).error.message;
    } catch (_) { /* not our JSON error: keep the status */ }
    if (response.status === 401) askForKey();
    throw new ApiError(response.status, message);
  }
  return response;
}

const getJson = async (path) => (await api(path)).json();

// Server-sent events from a fetch response: each `data:` line parsed, until `data: [DONE]`.
async function* serverEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new ApiError(500, event.error.message);
        yield event;
      }
    }
  }
}

// One streamed reply (choice 0): calls onText with the text so far, returns the whole of it.
async function streamReply(endpoint, body, onText, signal) {
  const started = performance.now();
  const response = await api(endpoint, {
    method: "POST",
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  let text = "";
  let finish = null;
  let usage = null;
  for await (const event of serverEvents(response)) {
    if (event.usage) usage = event.usage;
    for (const choice of event.choices) {
      const piece = choice.delta ? choice.delta.content : choice.text;
      if (piece) {
        text += piece;
        onText(text);
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  }
  return { text, finish, usage, seconds: (performance.now() - started) / 1000 };
}

function replyMeta(result) {
  const tokens = result.usage ? result.usage.completion_tokens : null;
  const parts = [];
  if (tokens !== null) parts.push(`${tokens} tokens`, `${fmt(tokens / Math.max(result.seconds, 1e-3))} tok/s`);
  parts.push(`${result.seconds.toFixed(2)} s`);
  if (result.finish === "length") parts.push("cut at max tokens");
  return parts.join(" · ");
}

// ------------------------------------------------------------------ text and code

const KEYWORDS = new Set((
  "and as assert async await break class continue def del elif else except finally for from global if " +
  "import in is lambda nonlocal not or pass raise return try while with yield None True False const let " +
  "var function new this typeof instanceof switch case default do catch throw extends static of null " +
  "undefined true false fn pub impl struct enum match use mut loop where trait mod self type interface " +
  "package func go defer chan map range select void public private protected int float char bool"
).split(" "));
const BUILTINS = new Set((
  "print len list dict set tuple str open enumerate zip filter sorted sum min max abs isinstance super " +
  "range reversed any all repr hash iter next object console Math Object Array JSON Promise"
).split(" "));
const DEFINERS = new Set(["def", "class", "function", "fn", "func", "struct", "enum", "trait", "interface"]);
// comments | strings | numbers | decorators | identifiers | operators
const CODE_TOKEN = new RegExp([
  /(#[^\n]*|\/\/[^\n]*)/.source,
  /("""[\s\S]*?(?:"""|$)|'''[\s\S]*?(?:'''|$)|"(?:\\.|[^"\\\n])*"?|'(?:\\.|[^'\\\n])*'?|`(?:\\.|[^`\\])*`?)/.source,
  /(\b(?:0x[\da-fA-F]+|\d[\d_]*(?:\.\d+)?(?:[eE][+-]?\d+)?)\b)/.source,
  /(@[\w.]+)/.source,
  /([A-Za-z_]\w*)/.source,
  /([-+*/%=<>!&|^~:]+)/.source,
].join("|"), "g");

// A tiny highlighter: good enough for Python, JavaScript and their cousins, never wrong enough to hide code.
function highlight(code) {
  const fragment = document.createDocumentFragment();
  let last = 0;
  let previousWord = "";
  for (const match of code.matchAll(CODE_TOKEN)) {
    if (match.index > last) fragment.append(code.slice(last, match.index));
    const [token, comment, string, number, decorator, word] = match;
    let kind = "op";
    if (comment) kind = "com";
    else if (string) kind = "str";
    else if (number) kind = "num";
    else if (decorator) kind = "dec";
    else if (word) {
      const next = code.slice(match.index + token.length).match(/^\s*\(/);
      if (KEYWORDS.has(word)) kind = "kw";
      else if (DEFINERS.has(previousWord) || (next && !BUILTINS.has(word))) kind = "fn";
      else if (BUILTINS.has(word)) kind = "bi";
      else kind = null;
      previousWord = word;
    }
    fragment.append(kind ? el("span", { class: `tok-${kind}`, text: token }) : token);
    last = match.index + token.length;
  }
  fragment.append(code.slice(last));
  return fragment;
}

function codeBlock(code, language) {
  const copy = el("button", { type: "button", text: "copy" });
  copy.addEventListener("click", () => {
    navigator.clipboard?.writeText(code).then(() => { copy.textContent = "copied"; });
  });
  return el("div", { class: "codeblock" },
    el("div", { class: "codeblock-head" }, el("span", { text: language || "code" }), copy),
    el("pre", {}, el("code", {}, highlight(code))));
}

// What a reply shows: its text, or a note when the model produced only whitespace.
function replyView(text) {
  return text.trim() ? renderRich(text) : el("p", { class: "muted", text: text ? "(only whitespace)" : "" });
}

function inline(text) {
  const fragment = document.createDocumentFragment();
  text.split(/(`[^`\n]+`)/).forEach((part, index) => {
    fragment.append(index % 2 ? el("code", { text: part.slice(1, -1) }) : part);
  });
  return fragment;
}

// Paragraphs, `inline code` and fenced code blocks; a fence still open while streaming shows as code.
function renderRich(text) {
  const fragment = document.createDocumentFragment();
  const fence = /```([^\n`]*)\n([\s\S]*?)(?:```|$)/g;
  let last = 0;
  const prose = (chunk) => {
    for (const paragraph of chunk.split(/\n{2,}/)) {
      if (paragraph.trim()) fragment.append(el("p", {}, inline(paragraph.replace(/^\n+|\n+$/g, ""))));
    }
  };
  for (const match of text.matchAll(fence)) {
    prose(text.slice(last, match.index));
    fragment.append(codeBlock(match[2].replace(/\n$/, ""), match[1].trim()));
    last = match.index + match[0].length;
  }
  prose(text.slice(last));
  return fragment;
}

// ------------------------------------------------------------------ models

const models = { list: [], details: new Map() };

async function loadModels() {
  models.list = (await getJson("/v1/models")).data;
  fillModelPicker();
  fillCompareChips();
}

// "best (step 20)" for a run's name, "step 10" for one of its checkpoints, the id for a directory
function checkpointLabel(model) {
  if (model.step === null) return model.id;
  return model.id.includes(":") ? `step ${model.step}` : `best (step ${model.step})`;
}

function modelLabel(model) {
  return checkpointLabel(model) + (model.val_loss === null ? "" : ` · val ${fmt(model.val_loss)}`);
}

function fillModelPicker() {
  const picker = $("#chat-model");
  const previous = picker.value;
  picker.replaceChildren();
  const runs = new Map();
  for (const model of models.list) {
    const run = model.run || model.id;
    if (!runs.has(run)) runs.set(run, []);
    runs.get(run).push(model);
  }
  for (const [run, entries] of runs) {
    const group = el("optgroup", { label: run });
    for (const model of entries) {
      group.append(el("option", { value: model.id, text: model.run ? `${run} · ${checkpointLabel(model)}` : model.id }));
    }
    picker.append(group);
  }
  if (!models.list.length) {
    picker.append(el("option", { value: "", text: "no models yet: train one first" }));
  } else if (models.list.some((model) => model.id === previous)) {
    picker.value = previous;
  }
  if (picker.value !== previous) selectModel(picker.value);
}

async function modelDetail(id) {
  if (!models.details.has(id)) models.details.set(id, await getJson(`/api/models/${encodeURIComponent(id)}`));
  return models.details.get(id);
}

async function selectModel(id) {
  const card = $("#chat-model-info");
  card.replaceChildren();
  if (!id) return;
  let detail;
  try {
    detail = await modelDetail(id);
  } catch (error) {
    detail = { error: error.message };
  }
  if ($("#chat-model").value !== id) return;  // another model was picked meanwhile
  card.replaceChildren();
  if (detail.error) {
    card.append(el("div", { class: "error-note", text: detail.error }));
    return;
  }
  const row = (label, value) => el("div", { class: "row" }, el("span", { text: label }), el("b", { text: value }));
  card.append(
    el("div", { class: "row" },
      el("span", { class: `badge ${detail.chat ? "chat" : "base"}`, text: detail.chat ? "chat model" : "base model" }),
      el("span", { text: detail.loaded ? "in memory" : "loads on first use" })),
    row("checkpoint", detail.step === null ? "–" : `step ${fmt(detail.step)}`),
    row("val loss", fmt(detail.val_loss)),
    row("context", `${fmt(detail.context_length)} tokens`),
    row("shape", `${plural(detail.n_layer, "layer")} × ${detail.d_model}`),
    row("weights", detail.dtype),
  );
  if (detail.batch) {
    const { active, waiting, max_batch: limit } = detail.batch;
    card.append(row("batch", `${active} of ${limit} decoding${waiting ? `, ${waiting} waiting` : ""}`));
  }
  if (!detail.chat) {
    card.append(el("div", { class: "note", text: "No chat template: it continues the conversation as plain text." }));
  }
  const defaults = detail.generation;
  setSlider("#chat-temperature", defaults.temperature);
  setSlider("#chat-top-p", defaults.top_p);
  $("#chat-top-k").value = defaults.top_k ?? "";
  $("#chat-max-tokens").max = detail.max_tokens_limit;
  $("#chat-max-tokens").value = Math.min(defaults.max_new_tokens, detail.max_tokens_limit);
  $("#chat-repetition").value = defaults.repetition_penalty;
}

function setSlider(selector, value) {
  const slider = $(selector);
  slider.value = value;
  slider.dispatchEvent(new Event("input"));
}

// ------------------------------------------------------------------ chat

const chat = { history: [], controller: null };

function sampling() {
  const number = (selector) => ($(selector).value === "" ? undefined : Number($(selector).value));
  const settings = {
    temperature: number("#chat-temperature"),
    top_p: number("#chat-top-p"),
    top_k: number("#chat-top-k"),
    max_tokens: number("#chat-max-tokens"),
    repetition_penalty: number("#chat-repetition"),
    seed: number("#chat-seed"),
  };
  return Object.fromEntries(Object.entries(settings).filter(([, value]) => value !== undefined));
}

function messageView(role, text) {
  const content = el("div", { class: "content" });
  if (role === "user") content.textContent = text;
  else content.append(renderRich(text));
  const view = el("div", { class: `message ${role}` },
    el("div", { class: "avatar", text: role === "user" ? "you" : "AI" }),
    el("div", { class: "bubble" }, el("div", { class: "who", text: role === "user" ? "You" : $("#chat-model").value }), content));
  $("#chat-log").append(view);
  view.scrollIntoView({ block: "end" });
  return view;
}

function showChatWelcome() {
  $("#chat-log").replaceChildren(el("div", { class: "empty" },
    el("h2", { text: "Talk to your models" }),
    el("p", { text: "Pick a checkpoint on the left, set how it samples, and say something. Replies stream in as they are generated." })));
}

async function sendMessage(event) {
  event.preventDefault();
  if (chat.controller) {
    chat.controller.abort();
    return;
  }
  const input = $("#chat-input");
  const text = input.value.trim();
  const model = $("#chat-model").value;
  if (!text || !model) return;
  if (!chat.history.length) $("#chat-log").replaceChildren();
  input.value = "";
  autosize(input);
  messageView("user", text);
  const reply = messageView("assistant", "");
  const content = $(".content", reply);
  content.classList.add("cursor");
  const system = $("#chat-system").value.trim();
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...chat.history, { role: "user", content: text }];
  chat.controller = new AbortController();
  setSending(true);
  let latest = "";
  let frame = 0;
  const draw = () => {
    frame = 0;
    content.replaceChildren(renderRich(latest));
    reply.scrollIntoView({ block: "end" });
  };
  try {
    const result = await streamReply("/v1/chat/completions", { model, messages, ...sampling() }, (soFar) => {
      latest = soFar;
      frame = frame || requestAnimationFrame(draw);
    }, chat.controller.signal);
    latest = result.text;
    draw();
    if (!latest.trim()) content.replaceChildren(replyView(latest));
    chat.history.push({ role: "user", content: text }, { role: "assistant", content: result.text });
    $(".bubble", reply).append(el("div", { class: "meta", text: replyMeta(result) }));
  } catch (error) {
    draw();
    if (error.name === "AbortError") {
      chat.history.push({ role: "user", content: text }, { role: "assistant", content: latest });
      $(".bubble", reply).append(el("div", { class: "meta", text: "stopped" }));
    } else {
      $(".bubble", reply).append(el("div", { class: "error-note", text: error.message }));
    }
  } finally {
    cancelAnimationFrame(frame);
    content.classList.remove("cursor");
    chat.controller = null;
    setSending(false);
  }
}

function setSending(sending) {
  const button = $("#chat-send");
  button.textContent = sending ? "Stop" : "Send";
  button.classList.toggle("stop", sending);
}

function autosize(textarea) {
  textarea.style.height = "auto";
  textarea.style.height = `${Math.min(textarea.scrollHeight, 200)}px`;
}

// ------------------------------------------------------------------ compare

function fillCompareChips() {
  const chips = $("#compare-models");
  const chosen = new Set([...chips.querySelectorAll("input:checked")].map((box) => box.value));
  if (!chosen.size) models.list.filter((model) => !model.id.includes(":")).slice(0, 3).forEach((model) => chosen.add(model.id));
  chips.replaceChildren(...models.list.map((model) => {
    const box = el("input", { type: "checkbox", value: model.id });
    box.checked = chosen.has(model.id);
    const chip = el("label", { class: `chip${box.checked ? " on" : ""}`, title: modelLabel(model) }, box, model.id);
    box.addEventListener("change", () => chip.classList.toggle("on", box.checked));
    return chip;
  }));
}

async function runCompare() {
  const prompt = $("#compare-prompt").value;
  const chosen = [...$("#compare-models").querySelectorAll("input:checked")].map((box) => box.value);
  const columns = $("#compare-columns");
  if (!prompt.trim() || !chosen.length) {
    columns.replaceChildren(el("div", { class: "empty" }, el("h2", { text: "Nothing to compare yet" }),
      el("p", { text: "Write a prompt and pick at least one model." })));
    return;
  }
  const button = $("#compare-run");
  button.disabled = true;
  const asChat = $("#compare-mode").value === "chat";
  const settings = {
    temperature: Number($("#compare-temperature").value),
    max_tokens: Number($("#compare-max-tokens").value),
    seed: $("#compare-seed").value === "" ? undefined : Number($("#compare-seed").value),
  };
  columns.replaceChildren();
  const runs = chosen.map(async (id) => {
    const model = models.list.find((entry) => entry.id === id);
    const body = el("div", { class: "column-body content cursor" });
    const foot = el("div", { class: "column-foot meta", text: "waiting for the model…" });
    columns.append(el("div", { class: "panel column", "data-model": id },
      el("div", { class: "column-head" }, el("span", { class: "name", text: id }),
        el("span", { class: "muted", text: model && model.val_loss !== null ? `val ${fmt(model.val_loss)}` : "" })),
      body, foot));
    const request = asChat
      ? ["/v1/chat/completions", { model: id, messages: [{ role: "user", content: prompt }], ...settings }]
      : ["/v1/completions", { model: id, prompt, ...settings }];
    try {
      const result = await streamReply(...request, (text) => {
        body.replaceChildren(renderRich(asChat ? text : prompt + text));
        foot.textContent = "generating…";
      });
      body.replaceChildren(replyView(asChat ? result.text : prompt + result.text));
      foot.textContent = replyMeta(result);
    } catch (error) {
      body.replaceChildren(el("div", { class: "error-note", text: error.message }));
      foot.textContent = "";
    } finally {
      body.classList.remove("cursor");
    }
  });
  await Promise.allSettled(runs);
  button.disabled = false;
}

// ------------------------------------------------------------------ the line chart

function niceTicks(min, max, count) {
  const span = max - min || Math.abs(max) || 1;
  const raw = span / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  const ticks = [];
  for (let tick = Math.ceil(min / step) * step; tick <= max + step * 1e-9; tick += step) ticks.push(Number(tick.toPrecision(12)));
  return ticks;
}

// series: [{ name, cls, points: [[step, value], ...], dots }]. Draws into `container` (an SVG sized to it),
// with a crosshair tooltip; path elements carry data-points (how many points they draw).
function lineChart(container, series, { height = 260, formatY = fmt, empty = "no points yet" } = {}) {
  container.replaceChildren();
  const width = Math.max(container.clientWidth, 320);
  const margin = { left: 56, right: 14, top: 12, bottom: 28 };
  const plot = { w: width - margin.left - margin.right, h: height - margin.top - margin.bottom };
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img" });
  container.append(root);
  const all = series.flatMap((s) => s.points);
  if (!all.length) {
    const text = svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty-chart" });
    text.textContent = empty;
    root.append(text);
    return;
  }
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => p[1]);
  let [xMin, xMax, yMin, yMax] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (xMin === xMax) xMax = xMin + 1;
  const pad = (yMax - yMin) * 0.08 || Math.abs(yMax) * 0.1 || 1;
  yMin -= pad;
  yMax += pad;
  const x = (v) => margin.left + ((v - xMin) / (xMax - xMin)) * plot.w;
  const y = (v) => margin.top + (1 - (v - yMin) / (yMax - yMin)) * plot.h;

  const defs = svg("defs");
  const gradientId = `fill-${Math.random().toString(36).slice(2)}`;
  const gradient = svg("linearGradient", { id: gradientId, x1: 0, y1: 0, x2: 0, y2: 1 });
  gradient.append(svg("stop", { offset: "0%", "stop-color": "#8b7bff", "stop-opacity": 0.28 }),
    svg("stop", { offset: "100%", "stop-color": "#8b7bff", "stop-opacity": 0 }));
  defs.append(gradient);
  root.append(defs);

  const grid = svg("g", { class: "grid" });
  const axis = svg("g", { class: "axis" });
  for (const tick of niceTicks(yMin, yMax, 5)) {
    if (tick < yMin || tick > yMax) continue;
    grid.append(svg("line", { x1: margin.left, x2: width - margin.right, y1: y(tick), y2: y(tick) }));
    const label = svg("text", { x: margin.left - 8, y: y(tick) + 4, "text-anchor": "end" });
    label.textContent = formatY(tick);
    axis.append(label);
  }
  for (const tick of niceTicks(xMin, xMax, Math.max(2, Math.floor(plot.w / 90)))) {
    if (tick < xMin || tick > xMax) continue;
    const label = svg("text", { x: x(tick), y: height - 8, "text-anchor": "middle" });
    label.textContent = fmt(tick);
    axis.append(label);
  }
  root.append(grid, axis);

  for (const s of series) {
    if (!s.points.length) continue;
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join("");
    if (s.fill) {
      const last = s.points[s.points.length - 1];
      const area = `${d}L${x(last[0]).toFixed(1)},${margin.top + plot.h}L${x(s.points[0][0]).toFixed(1)},${margin.top + plot.h}Z`;
      root.append(svg("path", { d: area, fill: `url(#${gradientId})`, stroke: "none" }));
    }
    root.append(svg("path", { d, class: `series ${s.cls}`, "data-points": s.points.length }));
    if (s.dots) {
      const best = Math.min(...s.points.map((p) => p[1]));
      for (const [px, py] of s.points) {
        root.append(svg("circle", { cx: x(px), cy: y(py), r: 3.5, class: `dot${py === best ? " best" : ""}` }));
      }
    }
  }

  const cross = svg("line", { class: "cross", y1: margin.top, y2: margin.top + plot.h, visibility: "hidden" });
  const overlay = svg("rect", { x: margin.left, y: margin.top, width: plot.w, height: plot.h, fill: "transparent" });
  root.append(cross, overlay);
  const tooltip = el("div", { class: "tooltip" });
  container.append(tooltip);
  const nearest = (points, step) => points.reduce((best, p) => (Math.abs(p[0] - step) < Math.abs(best[0] - step) ? p : best));
  overlay.addEventListener("mousemove", (event) => {
    const box = root.getBoundingClientRect();
    const step = xMin + ((event.clientX - box.left) * (width / box.width) - margin.left) / plot.w * (xMax - xMin);
    const lines = series.filter((s) => s.points.length).map((s) => {
      const p = nearest(s.points, step);
      return `${s.name} ${formatY(p[1])} @ ${fmt(Math.round(p[0]))}`;
    });
    const px = x(nearest(series.find((s) => s.points.length).points, step)[0]);
    cross.setAttribute("x1", px);
    cross.setAttribute("x2", px);
    cross.setAttribute("visibility", "visible");
    tooltip.textContent = lines.join("   ");
    tooltip.classList.add("on");
    tooltip.style.left = `${Math.min(px * (box.width / width) + 12, box.width - tooltip.offsetWidth - 4)}px`;
    tooltip.style.top = "8px";
  });
  overlay.addEventListener("mouseleave", () => {
    cross.setAttribute("visibility", "hidden");
    tooltip.classList.remove("on");
  });
}

// ------------------------------------------------------------------ runs

const runs = { overview: null, open: null, detail: null, curves: null, runTimer: 0, listTimer: 0 };

async function loadRuns() {
  runs.overview = await getJson("/api/runs");
  $("#workspace-path").textContent = runs.overview.workspace;
  renderRunList();
  const wanted = decodeURIComponent(location.hash.split("/")[1] || "");
  const names = runs.overview.runs.map((run) => run.name);
  if (!runs.open && names.length && location.hash.startsWith("#runs")) {
    const active = runs.overview.runs.find((run) => ACTIVE_STATES.has(run.state));
    openRun(names.includes(wanted) ? wanted : (active || runs.overview.runs[names.length - 1]).name);
  }
}

function renderRunList() {
  const list = $("#run-list");
  if (!runs.overview.runs.length) {
    list.replaceChildren(el("div", { class: "empty" }, el("p", { text: "No runs yet." })));
    $("#run-detail").replaceChildren(el("div", { class: "empty" }, el("h2", { text: "Nothing has trained here yet" }),
      el("p", {}, "Start a run with ", el("code", { text: "llmctl pretrain" }), " and watch its curves grow here.")));
    return;
  }
  list.replaceChildren(...runs.overview.runs.map((run) => {
    const best = run.best_eval && run.best_eval.val_loss;
    const progress = el("div", { class: "progress" }, el("span"));
    progress.firstChild.style.width = `${Math.round((run.progress ?? 0) * 100)}%`;
    return el("button", { class: `run-item${run.name === runs.open ? " active" : ""}`, "data-run": run.name, onclick: () => openRun(run.name) },
      el("div", { class: "top" }, el("span", { class: "name", text: run.name }), el("span", { class: `state ${run.state}`, text: run.state })),
      progress,
      el("div", { class: "sub" },
        el("span", { text: `${run.stage || "run"} · step ${fmt(run.step || (run.latest_checkpoint ? run.latest_checkpoint.step : 0))}` +
          (run.max_steps ? ` / ${fmt(run.max_steps)}` : "") }),
        el("span", { text: best ? `val ${fmt(best)}` : "" })));
  }));
}

async function openRun(name) {
  runs.open = name;
  clearTimeout(runs.runTimer);
  history.replaceState(null, "", `#runs/${encodeURIComponent(name)}`);
  renderRunList();
  let detail, curves;
  try {
    [detail, curves] = await Promise.all([
      getJson(`/api/runs/${encodeURIComponent(name)}`),
      getJson(`/api/runs/${encodeURIComponent(name)}/curves`),
    ]);
  } catch (error) {
    if (runs.open === name) $("#run-detail").replaceChildren(el("div", { class: "error-note", text: error.message }));
    return;
  }
  // another run may have been opened while these answers travelled: they must not replace its data
  if (runs.open !== name) return;
  Object.assign(runs, { detail, curves });
  renderRunDetail();
  scheduleRunPoll(name);
}

function scheduleRunPoll(name) {
  clearTimeout(runs.runTimer);
  if (!ACTIVE_STATES.has(runs.curves.state)) return;
  runs.runTimer = setTimeout(async () => {
    if (runs.open !== name || !$("#view-runs").classList.contains("active")) return;
    try {
      const curves = await getJson(`/api/runs/${encodeURIComponent(name)}/curves`);
      const changed = curves.checkpoints !== runs.curves.checkpoints || curves.state !== runs.curves.state;
      const detail = changed ? await getJson(`/api/runs/${encodeURIComponent(name)}`) : runs.detail;
      if (runs.open !== name) return;
      Object.assign(runs, { detail, curves });
      renderRunDetail();
    } catch (_) {
      // the server may be restarting: the next poll tries again
    } finally {
      if (runs.open === name) scheduleRunPoll(name);  // a newly opened run keeps its own poll
    }
  }, RUN_POLL_MS);
}

function tile(label, value, hint) {
  return el("div", { class: "tile" }, el("div", { class: "label", text: label }), el("div", { class: "value", text: value }),
    el("div", { class: "hint", text: hint || "" }));
}

function card(title, ...body) {
  return el("section", { class: "panel card" }, el("h3", {}, ...[title].flat()), ...body);
}

function renderRunDetail() {
  const { detail, curves } = runs;
  const run = detail.run;
  // a run registered without a log (an import, a merge) has only its registry row to go by
  const state = curves.state === "waiting" ? run.state : curves.state;
  const step = curves.step || (run.latest_checkpoint ? run.latest_checkpoint.step : 0);
  const best = curves.best_eval || run.best_eval || {};
  const train = curves.train || {};
  const progress = el("div", { class: "progress" }, el("span"));
  progress.firstChild.style.width = `${Math.round((curves.progress ?? 0) * 100)}%`;
  const head = el("section", { class: "panel run-head" },
    el("div", {},
      el("h2", { text: run.name }),
      el("div", { class: "sub" },
        el("span", { class: `state ${state}`, text: state }),
        el("span", { class: "badge", text: run.stage || "run" }),
        run.preset ? el("span", { text: `preset ${run.preset}` }) : null,
        run.device ? el("span", { text: run.device }) : null)),
    el("div", { class: "muted" },
      el("div", { text: `step ${fmt(step)}${curves.max_steps ? ` of ${fmt(curves.max_steps)}` : ""}` +
        (curves.eta_s ? ` · ETA ${fmtDuration(curves.eta_s)}` : "") }),
      progress));
  // a preference stage (dpo): how often the chosen reply wins, in place of its loss's meaningless exp
  const lastEval = curves.last_eval || {};
  const preference = train.preference_accuracy != null || lastEval.val_preference_accuracy != null;
  const percent = (value) => (value == null ? "–" : `${(100 * value).toFixed(1)}%`);
  const tiles = el("div", { class: "tiles" },
    tile("best val loss", fmt(best.val_loss, 4), best.step !== undefined ? `step ${fmt(best.step)}` : ""),
    preference ? tile("preference acc", percent(lastEval.val_preference_accuracy ?? train.preference_accuracy),
      lastEval.val_preference_accuracy != null ? "validation" : "train")
      : tile("perplexity", fmt(best.val_ppl, 4)),
    preference ? tile("reward margin", fmt(train.reward_margin, 3),
      `chosen ${fmt(train.rewards_chosen, 3)} · rejected ${fmt(train.rewards_rejected, 3)}`)
      : tile("bits / byte", fmt(best.val_bpb, 3)),
    tile("train loss", fmt(train.loss, 4), "latest"),
    tile("tokens / s", fmt(train.tokens_per_s_avg), "average"),
    tile("elapsed", fmtDuration(run.elapsed_s)));

  const lossChart = el("div", { class: "chart", id: "loss-chart" });
  const lrChart = el("div", { class: "chart", id: "lr-chart" });
  const charts = el("div", { class: "grid-2" },
    card(["Loss", el("span", { class: "legend" }, el("span", { class: "train", text: "train" }), el("span", { class: "val", text: "validation" }))], lossChart),
    el("div", { class: "stack" },
      ...[card(["Learning rate", el("span", { class: "legend" }, el("span", { class: "lr", text: "lr" }))], lrChart),
        configCard(detail.config)].filter(Boolean)));

  const sections = [head, tiles, charts, checkpointsCard(detail), evalsCard(detail), lineageCard(detail), alertsCard(detail)];
  $("#run-detail").replaceChildren(...sections.filter(Boolean));
  const empty = curves.state === "waiting" ? "no training log (events.jsonl) for this run" : "no points yet";
  lineChart(lossChart, [
    { name: "train", cls: "train", points: curves.train_loss, fill: true },
    { name: "val", cls: "val", points: curves.val_loss, dots: true },
  ], { height: 320, empty });
  lineChart(lrChart, [{ name: "lr", cls: "lr", points: curves.lr }], { height: 130, empty, formatY: (v) => Number(v.toPrecision(3)).toExponential() });
}

function configCard(config) {
  if (!config) return null;
  const model = config.model || {};
  const trainCfg = config.train || {};
  const rows = [
    ["model", `${plural(model.n_layer, "layer")} × ${model.d_model}, ${plural(model.n_head, "head")}`],
    ["context", `${fmt(model.context_length)} tokens`],
    ["vocab", fmt(model.vocab_size)],
    ["batch", `${trainCfg.micro_batch_size} × ${trainCfg.grad_accum_steps} accum`],
    ["lr", `${trainCfg.lr} → ${trainCfg.min_lr}`],
    ["data", `${config.data?.corpus ?? "–"} / ${config.data?.tokenizer ?? "–"}`],
  ];
  return card("Config", el("table", { class: "data" }, el("tbody", {}, rows.map(([label, value]) =>
    el("tr", {}, el("td", { class: "muted", text: label }), el("td", { text: value }))))));
}

function evalFigures(evaluation) {
  const skip = new Set(["checkpoint_step", "kind", "created", "eval_id", "k"]);
  return Object.entries(evaluation)
    .filter(([key, value]) => !skip.has(key) && typeof value === "number")
    .slice(0, 5)
    .map(([key, value]) => `${key} ${fmt(value)}`)
    .join(" · ");
}

function checkpointsCard(detail) {
  const checkpoints = detail.checkpoints || [];
  if (!checkpoints.length) return card("Checkpoints", el("p", { class: "muted", text: "No checkpoint yet." }));
  const scored = checkpoints.filter((c) => typeof c.val_loss === "number");
  const bestStep = scored.length ? scored.reduce((a, b) => (b.val_loss < a.val_loss ? b : a)).step : null;
  const evalsAt = (step) => (detail.evals || []).filter((e) => e.checkpoint_step === step);
  const chatButton = (id) => el("button", { class: "ghost small", text: "chat", onclick: () => chatWith(id) });
  return card("Checkpoints", el("table", { class: "data" },
    el("thead", {}, el("tr", {}, ["step", "val loss", "ppl", "bpb", "tokens", "saved", "evals", ""].map((h, i) =>
      el("th", { class: i >= 1 && i <= 4 ? "num" : "", text: h })))),
    el("tbody", {}, checkpoints.map((c) => el("tr", { class: c.step === bestStep ? "best" : "" },
      el("td", { text: fmt(c.step) }), el("td", { class: "num", text: fmt(c.val_loss, 4) }),
      el("td", { class: "num", text: fmt(c.val_ppl, 4) }), el("td", { class: "num", text: fmt(c.val_bpb) }),
      el("td", { class: "num", text: fmt(c.tokens) }), el("td", { text: ago(c.created) }),
      el("td", { text: evalsAt(c.step).map((e) => e.kind).join(", ") || "–" }),
      el("td", {}, chatButton(`${detail.run.name}:step-${c.step}`)))))));
}

function evalsCard(detail) {
  const evals = detail.evals || [];
  if (!evals.length) return null;
  return card("Evaluations", el("table", { class: "data" },
    el("thead", {}, el("tr", {}, ["checkpoint", "kind", "results", "when"].map((h) => el("th", { text: h })))),
    el("tbody", {}, evals.map((e) => el("tr", {},
      el("td", { text: `step ${fmt(e.checkpoint_step)}` }), el("td", { text: e.kind }),
      el("td", { text: evalFigures(e) || "–" }), el("td", { text: ago(e.created) }))))));
}

// The chain a run comes from: corpus → tokenizer, or the base checkpoint's own chain, then the run.
function lineageNodes(node, self) {
  const nodes = [];
  const base = node.base_checkpoint;
  if (base && base.lineage) {
    nodes.push(...lineageNodes(base.lineage, false));
    nodes.push(["checkpoint", `${base.run}:step-${base.step}`, base.val_loss !== undefined ? `val ${fmt(base.val_loss)}` : ""]);
  } else {
    if (node.corpus) nodes.push(["corpus", node.corpus.name, node.corpus.documents ? `${fmt(node.corpus.documents)} docs` : ""]);
    if (node.tokenizer) nodes.push(["tokenizer", node.tokenizer.name, node.tokenizer.vocab_size ? `vocab ${fmt(node.tokenizer.vocab_size)}` : ""]);
    if (base && base.path) nodes.push(["base", base.path, ""]);
  }
  if (node.adapter) nodes.push(["adapter", `LoRA r=${node.adapter.r}`, node.adapter.quantize ? "quantized base" : ""]);
  nodes.push([node.stage || "run", node.run, self ? "this run" : "", self]);
  return nodes;
}

function lineageNode([kind, name, hint, self]) {
  return el("div", { class: `node${self ? " self" : ""}` }, el("span", { class: "kind", text: kind }), el("b", { text: name }),
    hint ? el("span", { class: "muted", text: ` ${hint}` }) : null);
}

// Where the run comes from, then what it made: its checkpoints and the runs that started from one of them.
function lineageCard(detail) {
  const nodes = lineageNodes(detail.lineage, true);
  const count = (detail.checkpoints || []).length;
  if (count) nodes.push(["checkpoints", `${count} saved`, "below"]);
  const chain = [];
  nodes.forEach((node, index) => {
    if (index) chain.push(el("span", { class: "arrow", text: "→" }));
    chain.push(lineageNode(node));
  });
  const derived = (detail.derived || []).map((run) => {
    const open = el("button", { class: "node-link", onclick: () => openRun(run.run) },
      lineageNode([run.stage || "run", run.run, `from step ${fmt(run.step)}`]));
    return [el("span", { class: "arrow", text: "→" }), open];
  });
  return card("Lineage", el("div", { class: "lineage" }, chain, derived.flat()));
}

function alertsCard(detail) {
  const alerts = detail.alerts || [];
  if (!alerts.length) return null;
  return card("Alerts", el("ul", { class: "alerts" }, alerts.map((a) => el("li", { class: a.level, text: a.message }))));
}

function chatWith(id) {
  const picker = $("#chat-model");
  if (![...picker.options].some((option) => option.value === id)) return;
  picker.value = id;
  selectModel(id);
  showView("chat");
}

// ------------------------------------------------------------------ views, key, start

function showView(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === name);
  for (const view of document.querySelectorAll(".view")) view.classList.toggle("active", view.id === `view-${name}`);
  if (name !== "runs") history.replaceState(null, "", `#${name}`);
  clearInterval(runs.listTimer);
  if (name === "runs") {
    if (!location.hash.startsWith("#runs")) history.replaceState(null, "", "#runs");
    loadRuns().catch(showLoadError);
    if (runs.open) openRun(runs.open);
    runs.listTimer = setInterval(() => loadRuns().catch(() => {}), LIST_POLL_MS);
  }
}

function showLoadError(error) {
  if (error.status === 401) return;
  $("#run-detail").replaceChildren(el("div", { class: "error-note", text: error.message }));
}

function askForKey() {
  const dialog = $("#key-dialog");
  if (!dialog.open) dialog.showModal();
}

function start() {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showView(tab.dataset.view));
  for (const [slider, output] of [["#chat-temperature", "#chat-temperature-value"], ["#chat-top-p", "#chat-top-p-value"]]) {
    $(slider).addEventListener("input", () => { $(output).textContent = Number($(slider).value).toFixed(2); });
    $(slider).dispatchEvent(new Event("input"));
  }
  $("#chat-model").addEventListener("change", (event) => selectModel(event.target.value));
  $("#chat-form").addEventListener("submit", sendMessage);
  $("#chat-input").addEventListener("input", (event) => autosize(event.target));
  $("#chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("#chat-form").requestSubmit();
    }
  });
  $("#chat-clear").addEventListener("click", () => {
    chat.controller?.abort();
    chat.history = [];
    showChatWelcome();
  });
  $("#compare-run").addEventListener("click", runCompare);
  $("#key-button").addEventListener("click", askForKey);
  $("#key-dialog").addEventListener("close", () => {
    if ($("#key-dialog").returnValue !== "save") return;
    apiKey.set($("#key-input").value.trim());
    models.details.clear();
    loadModels().catch(() => {});
    loadRuns().catch(() => {});
  });
  window.addEventListener("resize", () => { if (runs.detail && runs.open) renderRunDetail(); });
  showChatWelcome();
  loadModels().catch(() => {});
  if (!location.hash.startsWith("#runs")) loadRuns().catch(() => {});  // the header shows the workspace
  const view = location.hash.slice(1).split("/")[0];
  showView(["chat", "compare", "runs"].includes(view) ? view : "chat");
}

document.addEventListener("DOMContentLoaded", start);
