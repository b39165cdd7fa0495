// The comparison page: one request per chosen model, answers streamed side by side.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "lorafit-serve-api-key";
let baseModel = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : response.statusText;
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModels() {
  const box = $("models");
  const status = $("models-status");
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    status.textContent = `cannot list models: ${await errorText(response)}`;
    return;
  }
  const models = (await response.json()).data;
  baseModel = models.find((m) => !m.parent).id;
  box.querySelectorAll("label").forEach((el) => el.remove());
  const adapters = models.filter((m) => m.parent);
  status.textContent = adapters.length ? "" : "no adapters: only the base model will answer";
  adapters.forEach((m, i) => {
    const label = document.createElement("label");
    const check = document.createElement("input");
    check.type = "checkbox";
    check.name = "adapter";
    check.value = m.id;
    check.checked = i === 0;
    label.append(check, ` ${m.id}`);
    box.append(label);
  });
}

function chosenModels() {
  const adapters = [...document.querySelectorAll('input[name="adapter"]:checked')].map((el) => el.value);
  return [baseModel, ...adapters];
}

function requestBody(model, prompt) {
  const body = {
    model,
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
    stream: true,
    stream_options: { include_usage: true },
  };
  if ($("mode").value === "chat") body.messages = [{ role: "user", content: prompt }];
  else body.prompt = prompt;
  return body;
}

// Calls onEvent with each server-sent event's parsed data until "[DONE]".
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

function newCard(model) {
  const card = $("answer-card").content.firstElementChild.cloneNode(true);
  card.dataset.model = model;
  card.querySelector(".model").textContent = model === baseModel ? `${model} (base)` : model;
  $("answers").append(card);
  return card;
}

async function answer(model, prompt) {
  const card = newCard(model);
  const text = card.querySelector(".text");
  const meta = card.querySelector(".meta");
  const started = performance.now();
  const fail = (message) => {
    card.classList.add("failed");
    text.textContent = message;
  };
  const path = $("mode").value === "chat" ? "/v1/chat/completions" : "/v1/completions";
  try {
    const response = await fetch(path, {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody(model, prompt)),
    });
    if (!response.ok) return fail(await errorText(response));
    let finish = null;
    let usage = null;
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices) {
        text.textContent += choice.delta ? choice.delta.content || "" : choice.text || "";
        finish = choice.finish_reason || finish;
      }
    });
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    const tokens = usage ? `${usage.completion_tokens} tokens, ` : "";
    meta.textContent = `${tokens}${seconds} s, finish: ${finish}`;
    card.dataset.done = "true";
  } catch (err) {
    fail(String(err.message || err));
  }
}

async function ask(event) {
  event.preventDefault();
  showError("");
  const prompt = $("prompt").value;
  if (!prompt.trim()) return showError("Type a prompt first.");
  if (!baseModel) await loadModels();
  if (!baseModel) return showError("The server's models could not be listed.");
  $("answers").replaceChildren();
  $("run").disabled = true;
  try {
    await Promise.all(chosenModels().map((model) => answer(model, prompt)));
  } finally {
    $("run").disabled = false;
  }
}

$("ask").addEventListener("submit", ask);
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && event.ctrlKey) $("ask").requestSubmit();
});
$("api-key").value = localStorage.getItem(KEY_STORE) || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem(KEY_STORE, $("api-key").value.trim());
  loadModels();
});
loadModels().catch((err) => showError(String(err)));
