// /playground: a conversation with any configured provider, streamed and stoppable, each answer with its cost,
// and the request it makes as code to paste.
import { api, clearError, copyButton, requireProfile, send, showError, usageLine, usd } from "/static/app.js";
import { FORMATS, readAnswer } from "/static/chat_formats.js";
import { WRITERS } from "/static/show_code.js";

const $ = (id) => document.getElementById(id);
const SAVED = "aipipe-playground"; // localStorage: the last provider, each provider's model, system prompt, settings
const SETTLE_TRIES = 20; // /usage polls (about 15 s in all) while a call's charge is still being written
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

let history = []; // the finished turns, [{role, content}], sent again with each new message
let running = null; // the AbortController of the answer streaming now
let settling = Promise.resolve(); // the last answer's cost report: the next one measures from where it ends
let chat = 0; // counts "New chat"s, so an answer stopped by one does not bring its conversation back

function settings() {
  const option = $("provider").selectedOptions[0];
  const temperature = $("temperature").value.trim();
  return {
    route: option?.value ?? "", format: option?.dataset.format ?? "openai", model: $("model").value.trim(),
    system: $("system").value.trim(), temperature: temperature === "" ? null : Number(temperature),
    maxTokens: Math.max(1, Math.round(Number($("max-tokens").value))) || 1024,
  };
}

function loadSaved() {
  try {
    return JSON.parse(localStorage.getItem(SAVED) || "{}") || {};
  } catch {
    return {};
  }
}

function save(s) {
  const saved = loadSaved();
  const models = { ...(saved.models || {}), [s.route]: s.model };
  try {
    localStorage.setItem(SAVED, JSON.stringify({ route: s.route, models, system: s.system, temperature: s.temperature, maxTokens: s.maxTokens }));
  } catch {
    // storage disabled: the page still works, it just starts afresh next time
  }
}

/** Point the model box at the chosen provider's list, with its last-used (or starter) model in it. */
function useProvider(saved = loadSaved()) {
  const option = $("provider").selectedOptions[0];
  if (!option) return;
  $("model").setAttribute("list", `models-${option.value}`);
  $("model").value = saved.models?.[option.value] ?? option.dataset.start;
}

function restore() {
  const saved = loadSaved();
  if ([...$("provider").options].some((o) => o.value === saved.route)) $("provider").value = saved.route;
  useProvider(saved);
  if (saved.system) $("system").value = saved.system;
  if (saved.temperature !== null && saved.temperature !== undefined) $("temperature").value = saved.temperature;
  if (saved.maxTokens) $("max-tokens").value = saved.maxTokens;
}

function addTurn(kind, speaker, text = "") {
  const turn = document.createElement("div");
  turn.className = `turn ${kind}`;
  const who = document.createElement("p");
  who.className = "speaker";
  who.textContent = speaker;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  turn.append(who, body);
  $("conversation").append(turn);
  return { turn, body };
}

function setCost(turn, text) {
  let line = turn.querySelector(".cost");
  if (!line) {
    line = document.createElement("p");
    line.className = "cost";
    turn.append(line);
  }
  line.textContent = text;
}

/** What the call cost: its X-AIPipe-Cost when it has one, else the growth in spend once its hold is released
 * (the server writes a stream's charge when the provider's answer ends, even after the page stopped reading). */
async function costOf(token, before, response) {
  const header = response?.headers.get("X-AIPipe-Cost");
  for (let i = 0; i < SETTLE_TRIES; i++) {
    const after = await api("/usage", { token });
    if (header || after.held <= before.held + 1e-12) {
      $("usage").textContent = usageLine(after);
      return header ? Number(header) : Math.max(0, after.spent - before.spent);
    }
    await sleep(Math.min(1000, 100 * (i + 1)));
  }
  return null;
}

function setRunning(controller) {
  running = controller;
  $("send").disabled = Boolean(controller);
  $("stop").classList.toggle("hidden", !controller);
  $("conversation").setAttribute("aria-busy", String(Boolean(controller))); // read the answer out once it is whole
}

async function ask(token) {
  clearError();
  const s = settings();
  const format = FORMATS[s.format];
  const prompt = $("prompt").value;
  const messages = [...history, { role: "user", content: prompt }];
  const asked = addTurn("user", "You", prompt);
  const answer = addTurn("assistant", s.model);
  answer.turn.classList.add("streaming");
  $("prompt").value = "";
  const controller = new AbortController();
  const thisChat = chat;
  setRunning(controller);
  save(s);
  let text = "", response = null, before = null, sent = false, outcome = "done";
  try {
    await settling;
    before = await api("/usage", { token });
    if (controller.signal.aborted) throw new DOMException("Stopped before sending", "AbortError");
    sent = true;
    response = await send(format.path(s, true), {
      token, method: "POST", signal: controller.signal, headers: format.headers, body: format.body(s, messages, true),
    });
    await readAnswer(response, format, (piece) => {
      text += piece;
      answer.body.append(piece);
    });
  } catch (error) {
    outcome = error.name === "AbortError" ? "stopped" : "failed";
    if (outcome === "failed") showError(error);
  } finally {
    answer.turn.classList.remove("streaming");
    setRunning(null);
  }
  if (!response && !(sent && outcome === "stopped")) {
    // not sent, refused before it went upstream, or the server could not be reached: nothing billed, try again
    asked.turn.remove();
    answer.turn.remove();
    $("prompt").value = prompt;
    return;
  }
  if (text && thisChat === chat) history = [...messages, { role: "assistant", content: text }];
  else answer.body.textContent = outcome === "stopped" ? "(stopped before any text)" : "(no text)";
  settling = reportCost(token, before, response, answer.turn, outcome);
  refreshCode();
}

async function reportCost(token, before, response, turn, outcome) {
  const said = outcome === "stopped" ? "Stopped. " : "";
  setCost(turn, `${said}Working out the cost…`);
  try {
    const cost = await costOf(token, before, response);
    setCost(turn, cost === null ? `${said}The cost is not written yet: see your dashboard.` : `${said}Cost ${usd(cost)}`);
  } catch (error) {
    setCost(turn, `${said}Could not read the cost.`);
    showError(error);
  }
}

function newChat() {
  chat += 1;
  running?.abort();
  history = [];
  $("conversation").replaceChildren();
  clearError();
  refreshCode();
  $("prompt").focus();
}

// "Show code": the next request (or the last one sent), as curl, Python or JavaScript.
let language = "curl";

function refreshCode() {
  if (!$("code-box").open) return;
  const s = settings();
  const format = FORMATS[s.format];
  const prompt = $("prompt").value.trim();
  let messages = prompt ? [...history, { role: "user", content: prompt }] : history.slice(0, -1);
  if (!messages.length) messages = [{ role: "user", content: "Hello!" }];
  const body = format.body(s, messages, false);
  const { token } = profile;
  $("code").textContent = WRITERS[language](s, format, body, token);
}

function setUp() {
  $("more-settings").open = matchMedia("(min-width: 900px)").matches;
  restore();
  $("provider").addEventListener("change", () => {
    useProvider();
    refreshCode();
  });
  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (!running) ask(profile.token);
  });
  $("chat-form").addEventListener("input", refreshCode);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("chat-form").requestSubmit();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && running) running.abort();
  });
  $("stop").addEventListener("click", () => running?.abort());
  $("new-chat").addEventListener("click", newChat);
  $("code-box").addEventListener("toggle", refreshCode);
  for (const button of document.querySelectorAll("[data-lang]")) {
    button.addEventListener("click", () => {
      language = button.dataset.lang;
      for (const other of document.querySelectorAll("[data-lang]")) other.setAttribute("aria-pressed", String(other === button));
      refreshCode();
    });
  }
  copyButton($("copy-code"), () => $("code").textContent);
  api("/usage", { token: profile.token }).then((u) => ($("usage").textContent = usageLine(u)), showError);
}

const profile = requireProfile();
if (profile) setUp();
