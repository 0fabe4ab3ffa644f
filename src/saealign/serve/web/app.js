// The saealign page: score a topic, then stream unsteered and steered continuations side by side.
// Plain browser JavaScript (no build step); talks to the same server's /v1 API.
"use strict";

const $ = (id) => document.getElementById(id);
let topic = null; // {id, texts}: the last scored topic and the text it was scored from
let running = null; // AbortController of the generation in progress

// A server started with --api-key answers 401 without it: ask once, keep it for this tab, send it as
// OpenAI clients do (Authorization: Bearer KEY).
function withKey(init) {
  const key = sessionStorage.getItem("saealign-key");
  return key ? {...init, headers: {...(init.headers || {}), Authorization: `Bearer ${key}`}} : init;
}

async function send(path, init) {
  let response = await fetch(path, withKey(init));
  if (response.status === 401) {
    const key = window.prompt("This server needs an API key:");
    if (key && key.trim()) {
      sessionStorage.setItem("saealign-key", key.trim());
      response = await fetch(path, withKey(init));
    }
  }
  return response;
}

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  };
  const response = await send(path, init);
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

async function errorText(response) {
  try {
    const body = await response.json();
    return typeof body.error === "string" ? body.error : (body.error && body.error.message) || response.statusText;
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

function say(id, text, isError = false) {
  $(id).textContent = text;
  $(id).classList.toggle("error", isError);
}

async function loadInfo() {
  try {
    const health = await api("/health");
    $("model-info").textContent = `${health.model}, SAE ${health.sae} (${health.d_sae} latents) at layer ${health.layer}`;
    fillSelect("method", health.methods.filter((m) => m !== "none"), health.default_method); // the library's vocabulary
    fillSelect("mode", health.modes, "error");
  } catch (e) { say("model-info", e.message, true); }
  try {
    const {examples} = await api("/v1/examples");
    for (const ex of examples) {
      const option = document.createElement("option");
      option.value = ex.name;
      option.textContent = `${ex.name} (${ex.texts.length} texts)`;
      option.dataset.texts = ex.texts.join("\n");
      $("example-select").appendChild(option);
    }
  } catch (e) { say("topic-status", e.message, true); }
}

function fillSelect(id, values, selected) {
  $(id).replaceChildren(...values.map((v) => {
    const option = document.createElement("option");
    option.value = option.textContent = v;
    option.selected = v === selected;
    return option;
  }));
}

function topicTexts() {
  return $("topic-texts").value.split("\n").map((t) => t.trim()).filter((t) => t);
}

async function scoreTopic() {
  const texts = topicTexts();
  if (!texts.length) { say("topic-status", "write some topic texts, one a line, or pick an example", true); return null; }
  $("score-btn").disabled = true;
  say("topic-status", "scoring...");
  try {
    const started = performance.now();
    const result = await api("/v1/topics", {texts, top: 10, examples: 2});
    topic = {id: result.id, key: texts.join("\n")};
    renderLatents(result);
    const ms = Math.round(performance.now() - started);
    say("topic-status", `topic ${result.id}: ${result.texts} texts, ${result.scored} latents scored (${ms} ms)` +
        (result.note ? ` (${result.note})` : ""));
    return topic;
  } catch (e) {
    say("topic-status", e.message, true);
    return null;
  } finally {
    $("score-btn").disabled = false;
  }
}

function renderLatents(result) {
  const table = document.createElement("table");
  table.innerHTML = "<thead><tr><th>latent</th><th>score</th><th>g</th><th>prompts</th>" +
                    "<th>reference texts it fires on most</th></tr></thead>";
  const body = document.createElement("tbody");
  for (const row of result.top_latents) {
    const tr = document.createElement("tr");
    tr.className = "latent";
    tr.dataset.latent = row.latent;
    for (const value of [row.latent, row.score.toFixed(3), row.g === null ? "" : row.g.toFixed(3), row.prompts]) {
      const td = document.createElement("td");
      td.textContent = value;
      tr.appendChild(td);
    }
    const td = document.createElement("td");
    const list = document.createElement("ul");
    for (const text of row.examples) {
      const item = document.createElement("li");
      item.textContent = text.length > 160 ? text.slice(0, 160) + "..." : text;
      list.appendChild(item);
    }
    td.appendChild(list);
    tr.appendChild(td);
    body.appendChild(tr);
  }
  table.appendChild(body);
  $("latents").replaceChildren(table);
}

function colour(c) {
  return `hsl(${Math.round(120 * (1 - Math.min(1, Math.max(0, c))))}, 70%, 82%)`; // green 0 -> red 1
}

function addToken(output, event) {
  const span = document.createElement("span");
  span.className = "token";
  span.textContent = event.text;
  if (event.contamination === null || event.contamination === undefined) {
    span.classList.add("unmeasured");
  } else {
    span.dataset.contamination = event.contamination.toFixed(4);
    span.style.background = colour(event.contamination);
    span.title = `contamination ${event.contamination.toFixed(3)}`;
  }
  output.appendChild(span);
}

// Reads a Server-Sent Events body: calls onEvent(name, data) for each event.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

function strengthValue() {
  // empty: the method's default (null); "auto": the server searches the strongest fluent strength per topic
  const v = $("strength").value.trim();
  if (v === "") return null;
  return v === "auto" ? "auto" : Number(v);
}

async function streamInto(outputId, summaryId, request, signal) {
  const output = $(outputId);
  output.replaceChildren();
  say(summaryId, "");
  const response = await send("/v1/generate", {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(request), signal,
  });
  if (!response.ok) throw new Error(await errorText(response));
  await readEvents(response, (name, data) => {
    if (name === "message") addToken(output, data);
    else if (name === "done") {
      const c = data.contamination === null ? "" : `, mean contamination ${data.contamination.toFixed(3)}`;
      const s = request.method === "none" ? "" : `, strength ${data.strength}`;
      say(summaryId, `(${data.token_ids.length} tokens${c}${s})`);
      output.dataset.done = "true";
    } else if (name === "error") throw new Error(data.error);
  });
}

async function generate() {
  const prompt = $("prompt").value.trim();
  if (!prompt) { say("status", "write a prompt to continue", true); return; }
  if (running) running.abort();
  running = new AbortController();
  const signal = running.signal;
  $("generate-btn").disabled = true;
  try {
    if (!topic || topic.key !== topicTexts().join("\n")) {
      say("status", "scoring the topic first...");
      if (!(await scoreTopic())) { say("status", "score a topic first", true); return; }
    }
    say("status", "generating...");
    const common = {
      prompt, topic: topic.id, mode: $("mode").value, strength: strengthValue(),
      max_new_tokens: Number($("max-new-tokens").value), seed: Number($("seed").value), stream: true,
    };
    for (const id of ["plain-output", "steered-output"]) delete $(id).dataset.done;
    await Promise.all([
      streamInto("plain-output", "plain-summary", {...common, method: "none"}, signal),
      streamInto("steered-output", "steered-summary", {...common, method: $("method").value}, signal),
    ]);
    say("status", "done");
  } catch (e) {
    if (e.name !== "AbortError") say("status", e.message, true);
  } finally {
    $("generate-btn").disabled = false;
  }
}

$("example-select").addEventListener("change", (e) => {
  const option = e.target.selectedOptions[0];
  if (option && option.dataset.texts) $("topic-texts").value = option.dataset.texts;
});
$("score-btn").addEventListener("click", scoreTopic);
$("generate-btn").addEventListener("click", generate);
loadInfo();
