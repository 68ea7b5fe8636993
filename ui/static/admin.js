// /admin: the users table (sorted, filtered and paged by the server) with each user's history, budget rules set at
// runtime, the audit trail, everyone's daily usage, setting a day's cost and minting tokens.
import { api, clearError, copyButton, requireProfile, showError, usd } from "/static/app.js";

const $ = (id) => document.getElementById(id);
const USERS_PAGE = 25;
const AUDIT_PAGE = 20;
let token = null;
let rows = []; // daily usage, sorted and filtered here
let sort = { key: "date", dir: -1 };
const users = { sort: "spent", order: "desc", q: "", offset: 0, total: 0, asked: 0 };
const audit = { offset: 0 };

/** A table cell with text; `label` names the column when a narrow screen shows rows as cards. */
function cell(text, label, className = "") {
  const td = document.createElement("td");
  td.textContent = text;
  td.dataset.label = label;
  if (className) td.className = className;
  return td;
}

function row(...cells) {
  const tr = document.createElement("tr");
  tr.append(...cells);
  return tr;
}

/** "2026-12-06 14:03" for a Unix time, in UTC like every date the API speaks. */
function when(ts) {
  return ts ? new Date(ts * 1000).toISOString().slice(0, 16).replace("T", " ") : "—";
}

/** "$5 in 7 days", "$2 this month": a rule's terms as the 429 message words them. */
function terms(rule) {
  if (!rule) return "none";
  const span = rule.period ? `this ${rule.period}` : `in ${rule.days} day${rule.days === 1 ? "" : "s"}`;
  return `${usd(rule.limit)} ${span}`;
}

function markSorted(selector, key, ascending) {
  for (const button of document.querySelectorAll(selector)) {
    const th = button.parentElement;
    const on = button.dataset.sort === key || button.dataset.usersSort === key;
    if (on) th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    else th.removeAttribute("aria-sort");
  }
}

// --- users ------------------------------------------------------------------------------------------------

function shareCell(share) {
  const td = cell("", "Used", "share");
  const meter = document.createElement("meter");
  Object.assign(meter, { min: 0, max: 1, low: 0.8, high: 0.99, optimum: 0, value: Math.min(share, 1) });
  const text = document.createElement("span");
  text.textContent = share > 0 && share < 0.005 ? "<1%" : `${Math.round(share * 100)}%`;
  meter.setAttribute("aria-label", `${text.textContent} of the limit used`);
  td.append(meter, text);
  return td;
}

function userRow(u) {
  const open = document.createElement("button");
  open.type = "button";
  open.className = "link user-open";
  open.textContent = u.email;
  open.addEventListener("click", () => openHistory(u.email));
  const email = cell("", "Email", "email");
  email.append(open);
  return row(email, cell(usd(u.spent), "Spent", "num"), cell(usd(u.limit), "Limit", "num"),
    cell(usd(u.remaining), "Left", "num"), shareCell(u.share), cell(String(u.requests), "Requests", "num"),
    cell(when(u.last_call), "Last call"));
}

async function loadUsers() {
  const query = new URLSearchParams({ sort: users.sort, order: users.order, limit: USERS_PAGE, offset: users.offset });
  if (users.q) query.set("q", users.q);
  const asked = ++users.asked;
  const found = await api(`/admin/users?${query}`, { token });
  if (asked !== users.asked) return; // a later page or filter was asked for meanwhile: its answer wins
  users.total = found.total;
  $("users-table").querySelector("tbody").replaceChildren(...found.data.map(userRow));
  const last = users.offset + found.data.length;
  $("users-count").textContent = found.total
    ? `${users.offset + 1}–${last} of ${found.total} user${found.total === 1 ? "" : "s"}`
    : users.q ? "No user matches." : "Nobody has spent anything in their window yet.";
  $("users-prev").disabled = users.offset === 0;
  $("users-next").disabled = last >= found.total;
  markSorted("[data-users-sort]", users.sort, users.order === "asc");
}

async function openHistory(email) {
  clearError();
  const days = $("history-days").value;
  const u = await api(`/usage?email=${encodeURIComponent(email)}&by=model&days=${days}`, { token }).catch(showError);
  if (!u) return;
  $("history").dataset.email = email;
  $("history-email").textContent = email;
  $("history-summary").textContent = `${usd(u.cost)} in the last ${u.days} days. In the budget window: ${usd(u.spent)} of `
    + `${usd(u.limit)} spent, ${usd(u.held)} held by calls in flight, ${usd(u.remaining)} left.`;
  const spent = u.usage.filter((d) => d.cost !== 0).reverse();
  $("history-per-day").querySelector("tbody").replaceChildren(
    ...spent.map((d) => row(cell(d.date, "Date"), cell(usd(d.cost), "Cost", "num"))));
  $("history-no-days").classList.toggle("hidden", spent.length > 0);
  const models = u.models || [];
  $("history-per-model").querySelector("tbody").replaceChildren(...models.map((m) => row(
    cell(m.provider, "Provider"), cell(m.model, "Model"), cell(String(m.requests), "Requests", "num"),
    cell(`${m.input_tokens} / ${m.output_tokens}`, "Tokens in / out", "num"), cell(usd(m.cost), "Cost", "num"))));
  $("history-no-models").classList.toggle("hidden", models.length > 0);
  $("history").classList.remove("hidden");
  $("history").focus();
}

function setUpUsers() {
  for (const button of document.querySelectorAll("[data-users-sort]")) {
    button.addEventListener("click", () => {
      const key = button.dataset.usersSort;
      const order = users.sort === key ? (users.order === "asc" ? "desc" : "asc") : key === "email" ? "asc" : "desc";
      Object.assign(users, { sort: key, order, offset: 0 });
      loadUsers().catch(showError);
    });
  }
  let typing;
  $("users-filter").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => {
      Object.assign(users, { q: $("users-filter").value.trim(), offset: 0 });
      loadUsers().catch(showError);
    }, 250);
  });
  $("users-prev").addEventListener("click", () => {
    users.offset = Math.max(0, users.offset - USERS_PAGE);
    loadUsers().catch(showError);
  });
  $("users-next").addEventListener("click", () => {
    users.offset += USERS_PAGE;
    loadUsers().catch(showError);
  });
  $("history-close").addEventListener("click", () => $("history").classList.add("hidden"));
  $("history-days").addEventListener("change", () => openHistory($("history").dataset.email));
}

// --- budgets --------------------------------------------------------------------------------------------------

function ruleRow(rule) {
  const source = rule.source === "database"
    ? `set by ${rule.updated_by} ${when(rule.updated)}${rule.overrides ? `; file: ${terms(rule.overrides)}` : ""}`
    : "config file";
  const actions = cell("", "Actions", "actions");
  const edit = document.createElement("button");
  edit.type = "button";
  edit.textContent = "Edit";
  edit.addEventListener("click", () => fillBudgetForm(rule));
  actions.append(edit);
  if (rule.source === "database") {
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "Remove";
    remove.dataset.match = rule.match;
    remove.addEventListener("click", () => removeBudget(rule.match));
    actions.append(remove);
  }
  const span = rule.period ? `calendar ${rule.period}` : `${rule.days} day${rule.days === 1 ? "" : "s"}`;
  const tr = row(cell(rule.match, "Match", "match"), cell(usd(rule.limit), "Limit", "num"), cell(span, "Window"),
    cell(rule.models.length ? rule.models.join(", ") : "any priced model", "Models", "wide"),
    cell(source, "Source", "wide"), actions);
  tr.dataset.match = rule.match;
  return tr;
}

async function loadBudgets() {
  const { rules } = await api("/admin/budget", { token });
  $("budgets-table").querySelector("tbody").replaceChildren(...rules.map(ruleRow));
}

function fillBudgetForm(rule) {
  $("budget-match").value = rule.match;
  $("budget-limit").value = rule.limit;
  $("budget-window").value = rule.period || "days";
  $("budget-days").value = rule.days;
  $("budget-models").value = rule.models.join(", ");
  showDays();
  $("budget-limit").focus();
}

function showDays() {
  const rolling = $("budget-window").value === "days";
  $("budget-days-label").classList.toggle("hidden", !rolling);
  $("budget-days").required = rolling;
}

async function setBudget(event) {
  event.preventDefault();
  clearError();
  const body = { match: $("budget-match").value.trim(), limit: Number($("budget-limit").value) };
  const span = $("budget-window").value;
  if (span === "days") body.days = Number($("budget-days").value);
  else body.period = span;
  body.models = $("budget-models").value.split(/[\s,]+/).filter(Boolean);
  try {
    const { message } = await api("/admin/budget", { token, method: "POST", body });
    $("budget-result").textContent = message;
    await refreshAfterChange();
  } catch (error) {
    showError(error);
  }
}

async function removeBudget(match) {
  clearError();
  try {
    const { message } = await api(`/admin/budget?match=${encodeURIComponent(match)}`, { token, method: "DELETE" });
    $("budget-result").textContent = message;
    await refreshAfterChange();
  } catch (error) {
    showError(error);
  }
}

// --- audit ------------------------------------------------------------------------------------------------------

function describe(entry) {
  const d = entry.detail || {};
  if (entry.action === "budget.set") {
    const models = d.models?.length ? `, models ${d.models.join(", ")}` : "";
    return `${terms(d)}${models}${d.previous ? ` (was ${terms(d.previous)})` : " (new)"}`;
  }
  if (entry.action === "budget.remove") return `removed ${terms(d.removed)}`;
  if (entry.action === "cost.set") return `${d.date} set to ${usd(d.cost)}`;
  if (entry.action === "token.mint") return "a token minted";
  return JSON.stringify(d);
}

const ACTIONS = { "budget.set": "budget set", "budget.remove": "budget removed", "cost.set": "cost set", "token.mint": "token minted" };

async function loadAudit() {
  const { data } = await api(`/admin/audit?limit=${AUDIT_PAGE + 1}&offset=${audit.offset}`, { token });
  const shown = data.slice(0, AUDIT_PAGE);
  $("audit-table").querySelector("tbody").replaceChildren(...shown.map((a) => row(
    cell(when(a.ts), "When"), cell(a.admin, "Admin", "wide"), cell(ACTIONS[a.action] || a.action, "Change"),
    cell(a.target, "Of", "wide"), cell(describe(a), "Detail", "wide"))));
  $("audit-table").classList.toggle("hidden", shown.length === 0);
  $("audit-count").textContent = shown.length ? `${audit.offset + 1}–${audit.offset + shown.length}` : "No changes yet.";
  $("audit-newer").disabled = audit.offset === 0;
  $("audit-older").disabled = data.length <= AUDIT_PAGE;
}

// --- daily usage, costs and tokens ------------------------------------------------------------------------------

function renderUsage() {
  const needle = $("filter").value.trim().toLowerCase();
  const shown = rows
    .filter((r) => r.email.toLowerCase().includes(needle))
    .sort((a, b) => {
      const x = a[sort.key], y = b[sort.key];
      return (x < y ? -1 : x > y ? 1 : 0) * sort.dir || a.email.localeCompare(b.email);
    });
  $("usage-table").querySelector("tbody").replaceChildren(
    ...shown.map((r) => row(cell(r.email, "Email"), cell(r.date, "Date"), cell(usd(r.cost), "Cost", "num"))));
  $("usage-count").textContent = `${shown.length} of ${rows.length} rows`;
  markSorted("[data-sort]", sort.key, sort.dir > 0);
}

async function loadUsage() {
  rows = (await api("/admin/usage?limit=10000", { token })).data;
  renderUsage();
}

async function refreshAfterChange() {
  await Promise.all([loadBudgets(), loadAudit(), loadUsers(), loadUsage()]);
}

function setUpForms() {
  $("cost-date").value = new Date().toISOString().slice(0, 10);
  for (const button of document.querySelectorAll("[data-sort]")) {
    button.addEventListener("click", () => {
      const key = button.dataset.sort;
      sort = { key, dir: sort.key === key ? -sort.dir : 1 };
      renderUsage();
    });
  }
  $("filter").addEventListener("input", renderUsage);
  $("reload").addEventListener("click", () => loadUsage().catch(showError));
  $("budget-window").addEventListener("change", showDays);
  $("budget-form").addEventListener("submit", setBudget);
  $("audit-newer").addEventListener("click", () => {
    audit.offset = Math.max(0, audit.offset - AUDIT_PAGE);
    loadAudit().catch(showError);
  });
  $("audit-older").addEventListener("click", () => {
    audit.offset += AUDIT_PAGE;
    loadAudit().catch(showError);
  });
  $("cost-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    clearError();
    try {
      const body = { email: $("cost-email").value.trim(), date: $("cost-date").value, cost: Number($("cost-value").value) };
      const { message } = await api("/admin/cost", { token, method: "POST", body });
      $("cost-result").textContent = message;
      await refreshAfterChange();
    } catch (error) {
      showError(error);
    }
  });
  $("token-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    clearError();
    try {
      const email = $("token-email").value.trim();
      const { token: minted } = await api(`/admin/token?email=${encodeURIComponent(email)}`, { token });
      $("minted-token").value = minted;
      $("minted").classList.remove("hidden");
      await loadAudit();
    } catch (error) {
      showError(error);
    }
  });
  copyButton($("copy-minted"), () => $("minted-token").value);
}

async function start() {
  try {
    await loadBudgets(); // the first call tells whether this is an admin at all
    $("admin").classList.remove("hidden");
    await refreshAfterChange();
  } catch (error) {
    $("admin").classList.add("hidden");
    showError(error);
  }
}

const profile = requireProfile();
if (profile) {
  token = profile.token;
  setUpUsers();
  setUpForms();
  start();
}
