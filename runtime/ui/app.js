// glmx playground: fill, score and chat through the server's own API (runtime/playground.py serves this file).
// Safe by construction: every text from the user, the model or the server enters the page through textContent or
// an attribute, never as markup; the API key lives in this tab's memory only (nothing is stored by the page).
"use strict";

const $ = (id) => document.getElementById(id);
const BLANK = /\[(?:MASK|sMASK|gMASK)\]/g;
const state = { key: "", fill: null, chat: null, history: [], model: null };

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---------------------------------------------------------------- the API

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, body, signal) {
  const headers = { "Content-Type": "application/json" };
  if (state.key) headers.Authorization = "Bearer " + state.key;
  const init = body === undefined ? { headers, signal } : { method: "POST", headers, body: JSON.stringify(body), signal };
  const response = await fetch(path, init);
  if (!response.ok) {
    let message = "HTTP " + response.status;
    try {
      const answer = await response.json();
      if (answer && answer.error && answer.error.message) message = answer.error.message;
    } catch (e) { /* not JSON: the status says it */ }
    if (response.status === 401) $("key-box").hidden = false;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response;
}

// The server-sent events of a streamed answer, each parsed; an {"error": ...} event is thrown as its one line.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of chunk.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message);
        yield event;
      }
    }
  }
}

function failed(error, output) {
  if (error.name === "AbortError") {
    if (output) output.dataset.state = "stopped";
    return;
  }
  if (output) output.dataset.state = "error";
  showError(error.message);
}

// ---------------------------------------------------------------- the model and the server's load

async function loadModel() {
  try {
    const answer = await (await api("/v1/models")).json();
    const model = answer.data[0];
    const facts = model.glmx || {};
    state.model = facts;
    $("model-id").textContent = model.id;
    $("model-arch").textContent = facts.architecture || "?";
    $("model-precision").textContent = facts.precision || "?";
    $("model-backend").textContent = facts.backend || "?";
    document.querySelector('.tab[data-tab="chat"]').hidden = !facts.chat;
    showError("");
  } catch (error) {
    showError(error.message);
    if (error.status === 503) setTimeout(loadModel, 1000); // still loading
  }
}

async function pollHealth() {
  try {
    const health = await (await fetch("/health")).json();
    $("rows").textContent = health.status === "ok" ? `${health.running} / ${health.rows}` : health.status;
    $("queue").textContent = health.status === "ok" ? String(health.waiting) : "–";
  } catch (e) {
    $("rows").textContent = "unreachable";
  }
  setTimeout(pollHealth, 1500);
}

// ---------------------------------------------------------------- fill

function fillSettings(prompt) {
  const strategy = $("strategy").value;
  const number = (id) => Number($(id).value);
  const body = { prompt, strategy, max_new_tokens: number("max_new_tokens"), stream: true };
  if (strategy === "sample") {
    Object.assign(body, { temperature: number("temperature"), top_k: number("top_k"), top_p: number("top_p") });
    if ($("seed").value !== "") body.seed = number("seed");
  } else if (strategy === "beam") {
    Object.assign(body, { num_beams: number("num_beams"), length_penalty: number("length_penalty") });
  }
  if (!prompt.match(BLANK)) body.append_gmask = true; // no blank: the model continues the text at its end
  return body;
}

// The prompt as text with one empty <mark> per blank, in order: the spans fill them in place.
function layOut(prompt, output) {
  output.replaceChildren();
  const marks = [];
  let at = 0;
  const add = (blank) => {
    const mark = el("mark", "span open");
    mark.dataset.blank = blank;
    mark.title = blank;
    output.append(mark);
    marks.push(mark);
  };
  for (const found of prompt.matchAll(BLANK)) {
    output.append(document.createTextNode(prompt.slice(at, found.index)));
    add(found[0]);
    at = found.index + found[0].length;
  }
  output.append(document.createTextNode(prompt.slice(at)));
  if (!marks.length) add("[gMASK]");
  return marks;
}

function closeSpan(mark, span) {
  mark.textContent = span.text;
  mark.classList.remove("open");
  mark.dataset.tokenIds = JSON.stringify(span.token_ids);
  mark.dataset.stop = span.stop;
  mark.title = `${span.blank} · token ids ${JSON.stringify(span.token_ids)} · stop: ${span.stop}`;
}

async function runFill() {
  const prompt = $("fill-prompt").value;
  const output = $("fill-output");
  const marks = layOut(prompt, output);
  const stats = $("fill-stats");
  const controller = new AbortController();
  state.fill = controller;
  busy("fill", true);
  showError("");
  stats.textContent = "";
  output.dataset.state = "running";
  const started = performance.now();
  let first = null;
  try {
    const response = await api("/v1/fill", fillSettings(prompt), controller.signal);
    for await (const event of events(response)) {
      const mark = marks[event.blank];
      if (event.kind === "token") {
        if (first === null) first = performance.now() - started;
        if (mark) mark.textContent += event.text;
      } else if (event.kind === "span" && mark) {
        closeSpan(mark, event.span);
      } else if (event.kind === "result") {
        event.spans.forEach((span, i) => {
          if (!marks[i]) { // a blank the text did not show (the model's own prompt rules added it): at the end
            marks[i] = el("mark", "span");
            output.append(marks[i]);
          }
          closeSpan(marks[i], span);
        });
        const t = event.timings || {};
        const ttft = first === null ? "–" : `${first.toFixed(0)} ms`;
        stats.textContent =
          `first token ${ttft} · ${t.new_tokens} tokens · ${(t.tokens_per_s || 0).toFixed(1)} tokens/s`;
        output.dataset.state = "done";
      }
    }
  } catch (error) {
    failed(error, output);
  } finally {
    busy("fill", false);
    state.fill = null;
  }
}

function busy(which, on) {
  $(which === "fill" ? "fill-run" : "chat-send").disabled = on;
  $(which + "-stop").disabled = !on;
}

function insertBlank(blank) {
  const box = $("fill-prompt");
  const start = box.selectionStart, end = box.selectionEnd;
  box.value = box.value.slice(0, start) + blank + box.value.slice(end);
  box.selectionStart = box.selectionEnd = start + blank.length;
  box.focus();
}

function showStrategy() {
  const strategy = $("strategy").value;
  for (const label of document.querySelectorAll("[data-strategy]")) label.hidden = label.dataset.strategy !== strategy;
}

// ---------------------------------------------------------------- score

async function runScore() {
  const prompt = $("score-prompt").value;
  const candidates = [...document.querySelectorAll(".candidate")].map((box) => box.value).filter((c) => c !== "");
  const output = $("score-output");
  output.replaceChildren();
  output.dataset.state = "running";
  showError("");
  $("score-run").disabled = true;
  try {
    const answer = await (await api("/v1/score", { prompt, candidates })).json();
    const best = Math.max(...answer.candidates.map((c) => c.score));
    const winner = answer.candidates.findIndex((c) => c.score === best); // the first best, as glmx score says
    answer.candidates.forEach((c, i) => {
      const row = el("li", i === winner ? "winner" : "");
      const bar = el("div", "bar");
      const fillBar = el("div");
      fillBar.style.width = (100 * c.probability).toFixed(1) + "%";
      bar.append(fillBar);
      row.append(el("span", "cand-text", c.text), bar, el("span", "figure",
        `p ${c.probability.toFixed(3)} · score ${c.score.toFixed(3)}`));
      row.title = `token ids ${JSON.stringify(c.token_ids)} · log-probs ${c.logprobs.map((v) => v.toFixed(3)).join(", ")}`;
      output.append(row);
    });
    output.dataset.winner = answer.winner;
    output.dataset.state = "done";
  } catch (error) {
    failed(error, output);
  } finally {
    $("score-run").disabled = false;
  }
}

// ---------------------------------------------------------------- chat

async function sendChat() {
  const question = $("chat-input").value.trim();
  if (!question) return;
  const list = $("conversation");
  const asked = el("li", "user", question);
  const answer = el("li", "assistant", "");
  list.append(asked, answer);
  $("chat-input").value = "";
  const messages = [...state.history, { role: "user", content: question }];
  const controller = new AbortController();
  state.chat = controller;
  busy("chat", true);
  showError("");
  const body = {
    messages, stream: true, max_tokens: Number($("chat-max-tokens").value),
    temperature: Number($("chat-temperature").value),
  };
  const started = performance.now();
  let first = null, chunks = 0;
  try {
    const response = await api("/v1/chat/completions", body, controller.signal);
    for await (const event of events(response)) {
      const delta = event.choices[0].delta.content;
      if (delta) {
        if (first === null) first = performance.now() - started;
        chunks += 1;
        answer.textContent += delta;
      }
    }
    state.history = [...messages, { role: "assistant", content: answer.textContent }];
    const seconds = (performance.now() - started) / 1000;
    $("chat-stats").textContent = `first token ${first === null ? "–" : first.toFixed(0) + " ms"} · ` +
      `${chunks} pieces in ${seconds.toFixed(2)} s`;
  } catch (error) {
    if (error.name === "AbortError" && answer.textContent) {
      state.history = [...messages, { role: "assistant", content: answer.textContent }];
    } else {
      asked.remove();
      answer.remove();
      failed(error, null);
    }
  } finally {
    busy("chat", false);
    state.chat = null;
  }
}

// ---------------------------------------------------------------- wiring

function selectTab(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.setAttribute("aria-selected", String(tab.dataset.tab === name));
  for (const panel of document.querySelectorAll(".panel")) panel.hidden = panel.id !== "tab-" + name;
}

document.addEventListener("DOMContentLoaded", () => {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => selectTab(tab.dataset.tab));
  for (const button of document.querySelectorAll(".insert")) {
    button.addEventListener("click", () => insertBlank(button.dataset.blank));
  }
  $("strategy").addEventListener("change", showStrategy);
  $("fill-run").addEventListener("click", runFill);
  $("fill-stop").addEventListener("click", () => state.fill && state.fill.abort());
  $("score-run").addEventListener("click", runScore);
  $("add-candidate").addEventListener("click", () => {
    const box = el("input", "candidate");
    box.type = "text";
    box.spellcheck = false;
    $("candidates").append(box);
    box.focus();
  });
  $("chat-send").addEventListener("click", sendChat);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      sendChat();
    }
  });
  $("chat-stop").addEventListener("click", () => state.chat && state.chat.abort());
  $("chat-clear").addEventListener("click", () => {
    state.history = [];
    $("conversation").replaceChildren();
  });
  $("api-key").addEventListener("change", () => {
    state.key = $("api-key").value.trim();
    loadModel();
  });
  showStrategy();
  loadModel();
  pollHealth();
});
