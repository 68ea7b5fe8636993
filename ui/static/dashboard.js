// /dashboard: spend per day over the budget window, totals, per-model breakdown and the token.
import { api, copyButton, requireProfile, showError, usd } from "/static/app.js";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

function svg(name, attrs, text) {
  const el = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, value);
  if (text !== undefined) el.textContent = text;
  return el;
}

/** A bar per day, drawn as SVG (no chart library, nothing from a CDN). */
function drawChart(days) {
  const width = 720, height = 220, left = 70, bottom = 24, top = 10;
  const most = Math.max(...days.map((d) => d.cost), 0);
  const step = (width - left) / Math.max(days.length, 1);
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "bars" });
  chart.append(
    svg("line", { x1: left, x2: width, y1: height - bottom, y2: height - bottom, class: "axis" }),
    svg("text", { x: left - 6, y: top + 10, "text-anchor": "end", class: "tick" }, usd(most)),
    svg("text", { x: left - 6, y: height - bottom, "text-anchor": "end", class: "tick" }, "$0"),
  );
  days.forEach((day, i) => {
    const h = most ? ((height - bottom - top) * day.cost) / most : 0;
    const bar = svg("rect", {
      x: left + i * step + step * 0.15, y: height - bottom - h, width: step * 0.7, height: Math.max(h, day.cost ? 1 : 0),
      class: "bar", "data-date": day.date,
    });
    bar.append(svg("title", {}, `${day.date}: ${usd(day.cost)}`));
    chart.append(bar);
  });
  for (const i of new Set([0, days.length - 1])) {
    if (days[i]) chart.append(svg("text", { x: left + (i + 0.5) * step, y: height - 6, "text-anchor": "middle", class: "tick" }, days[i].date));
  }
  $("chart").replaceChildren(chart);
}

function cell(text, numeric = false) {
  const td = document.createElement("td");
  td.textContent = text;
  if (numeric) td.className = "num";
  return td;
}

function drawModels(models = []) {
  const rows = models.map((m) => {
    const tr = document.createElement("tr");
    tr.append(cell(m.provider), cell(m.model), cell(m.requests, true), cell(m.input_tokens, true), cell(m.output_tokens, true), cell(usd(m.cost), true));
    return tr;
  });
  $("models").querySelector("tbody").replaceChildren(...rows);
  $("no-models").classList.toggle("hidden", rows.length > 0);
}

function describeWindow(u) {
  const w = u.window || {};
  if (w.period) return `Your budget resets every ${w.period} (next reset ${w.resets}).`;
  return `Your budget covers the last ${w.days} days (since ${w.start}).`;
}

async function load({ token, email }) {
  $("email").textContent = email;
  $("token").value = token;
  copyButton($("copy-token"), () => token);
  try {
    const u = await api("/usage?by=model", { token });
    $("spent").textContent = usd(u.spent);
    $("limit").textContent = usd(u.limit);
    $("left").textContent = usd(u.remaining);
    $("held").textContent = usd(u.held);
    $("window").textContent = describeWindow(u);
    drawChart(u.usage);
    drawModels(u.models);
  } catch (error) {
    showError(error);
  }
}

const profile = requireProfile();
if (profile) load(profile);
