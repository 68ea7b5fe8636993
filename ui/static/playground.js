// /playground: pick a model, send a prompt, watch the answer stream in, then see what it cost.
import { api, clearError, requireProfile, send, showError, usageLine, usd } from "/static/app.js";

const $ = (id) => document.getElementById(id);
const PREFERRED = ["openai/gpt-4o-mini", "gpt-4o-mini", "gpt-4.1-nano"];
const NOT_CHAT = /embedding|tts|whisper|dall-e|moderation|image|audio|realtime|transcribe|search/;

function option(value, label = value) {
  const el = document.createElement("option");
  el.value = value;
  el.textContent = label;
  return el;
}

async function loadModels(token, provider) {
  const select = $("model");
  select.replaceChildren(option("", "Loading models…"));
  try {
    const { data } = await api(`/${provider}/v1/models`, { token });
    const ids = data.map((m) => m.id).filter((id) => provider !== "openai" || !NOT_CHAT.test(id)).sort();
    select.replaceChildren(...ids.map((id) => option(id)));
    select.value = PREFERRED.find((id) => ids.includes(id)) ?? ids[0] ?? "";
  } catch (error) {
    select.replaceChildren(option("", "No models available"));
    if (provider === "openrouter") {
      $("provider").value = "openai"; // OpenRouter may not be configured here: offer OpenAI's list instead
      return loadModels(token, "openai");
    }
    showError(error);
  }
}

/** Read an OpenAI-style server-sent event stream, calling onText with each piece of content. */
async function readStream(response, onText) {
  if (!(response.headers.get("Content-Type") || "").includes("event-stream")) {
    const body = await response.json();
    return onText(body.choices?.[0]?.message?.content ?? "");
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer = (buffer + value).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer
        .slice(0, cut)
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trim())
        .join("\n");
      buffer = buffer.slice(cut + 2);
      if (!data || data === "[DONE]") continue;
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message || "the provider broke off the answer");
      const text = event.choices?.[0]?.delta?.content;
      if (text) onText(text);
    }
  }
}

/** Wait until this request's hold is settled, then report what it cost and the running usage. */
async function reportCost(token, before) {
  let after;
  for (let i = 0; i < 30; i++) {
    after = await api("/usage", { token });
    if (after.held <= before.held + 1e-12) break;
    await new Promise((resolve) => setTimeout(resolve, 150));
  }
  $("cost").textContent = `This request cost ${usd(Math.max(0, after.spent - before.spent))}.`;
  $("usage").textContent = usageLine(after);
}

async function ask(token) {
  clearError();
  const answer = $("answer");
  answer.textContent = "";
  $("cost").textContent = "";
  $("send").disabled = true;
  try {
    const before = await api("/usage", { token });
    $("usage").textContent = usageLine(before);
    const provider = $("provider").value;
    const response = await send(`/${provider}/v1/chat/completions`, {
      token,
      method: "POST",
      body: { model: $("model").value, stream: true, messages: [{ role: "user", content: $("prompt").value }] },
    });
    await readStream(response, (text) => answer.append(text));
    await reportCost(token, before);
  } catch (error) {
    showError(error);
  } finally {
    $("send").disabled = false;
  }
}

const profile = requireProfile();
if (profile) {
  loadModels(profile.token, $("provider").value);
  $("provider").addEventListener("change", () => loadModels(profile.token, $("provider").value));
  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    ask(profile.token);
  });
}
