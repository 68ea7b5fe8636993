// /admin: everyone's usage (sortable, filterable), setting a day's cost, minting tokens.
import { api, clearError, copyButton, requireProfile, showError, usd } from "/static/app.js";

const $ = (id) => document.getElementById(id);
let rows = [];
let sort = { key: "date", dir: -1 };

function render() {
  const needle = $("filter").value.trim().toLowerCase();
  const shown = rows
    .filter((r) => r.email.toLowerCase().includes(needle))
    .sort((a, b) => {
      const x = a[sort.key], y = b[sort.key];
      return (x < y ? -1 : x > y ? 1 : 0) * sort.dir || a.email.localeCompare(b.email);
    });
  const body = shown.map((r) => {
    const tr = document.createElement("tr");
    for (const [text, cls] of [[r.email, ""], [r.date, ""], [usd(r.cost), "num"]]) {
      const td = document.createElement("td");
      td.textContent = text;
      td.className = cls;
      tr.append(td);
    }
    return tr;
  });
  $("usage-table").querySelector("tbody").replaceChildren(...body);
  $("usage-count").textContent = `${shown.length} of ${rows.length} rows`;
  for (const button of document.querySelectorAll("[data-sort]")) {
    const th = button.parentElement;
    if (button.dataset.sort === sort.key) th.setAttribute("aria-sort", sort.dir > 0 ? "ascending" : "descending");
    else th.removeAttribute("aria-sort");
  }
}

async function load(token) {
  try {
    rows = (await api("/admin/usage?limit=10000", { token })).data;
    $("admin").classList.remove("hidden");
    render();
  } catch (error) {
    $("admin").classList.add("hidden");
    showError(error);
  }
}

function setUp(token) {
  $("cost-date").value = new Date().toISOString().slice(0, 10);
  for (const button of document.querySelectorAll("[data-sort]")) {
    button.addEventListener("click", () => {
      const key = button.dataset.sort;
      sort = { key, dir: sort.key === key ? -sort.dir : 1 };
      render();
    });
  }
  $("filter").addEventListener("input", render);
  $("reload").addEventListener("click", () => load(token));
  $("cost-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    clearError();
    try {
      const body = { email: $("cost-email").value.trim(), date: $("cost-date").value, cost: Number($("cost-value").value) };
      const { message } = await api("/admin/cost", { token, method: "POST", body });
      $("cost-result").textContent = message;
      await load(token);
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
    } catch (error) {
      showError(error);
    }
  });
  copyButton($("copy-minted"), () => $("minted-token").value);
}

const profile = requireProfile();
if (profile) {
  setUp(profile.token);
  load(profile.token);
}
