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

let drawn = { days: [], width: 0 };

/** A bar per day, drawn as SVG at the box's own width so its labels stay at 12 px on any screen
 * (no chart library, nothing from a CDN). */
function drawChart(days) {
  const box = $("chart");
  const width = Math.max(200, Math.floor(box.clientWidth - 16)); // the box's 0.5rem padding each side
  drawn = { days, width };
  const height = width < 500 ? 170 : 220, bottom = 24, top = 12;
  const most = Math.max(...days.map((d) => d.cost), 0);
  const left = 12 + 7 * usd(most).length; // room for the longest money label at 12 px
  const step = (width - left) / Math.max(days.length, 1);
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, class: "bars", "aria-hidden": "true" });
  chart.append(
    svg("line", { x1: left, x2: width, y1: height - bottom, y2: height - bottom, class: "axis" }),
    svg("text", { x: left - 6, y: height - bottom + 4, "text-anchor": "end", class: "tick" }, "$0"),
  );
  if (most) {
    chart.append(
      svg("line", { x1: left, x2: width, y1: top, y2: top, class: "grid" }),
      svg("text", { x: left - 6, y: top + 4, "text-anchor": "end", class: "tick" }, usd(most)),
    );
  }
  days.forEach((day, i) => {
    const h = most ? ((height - bottom - top) * day.cost) / most : 0;
    const bar = svg("rect", {
      x: left + i * step + step * 0.15, y: height - bottom - h, width: step * 0.7, height: Math.max(h, day.cost ? 1 : 0),
      class: "bar", "data-date": day.date,
    });
    bar.append(svg("title", {}, `${day.date}: ${usd(day.cost)}`));
    chart.append(bar);
  });
  // as many month-day labels as fit 60 px apart, always the first and the last day
  const every = Math.max(1, Math.ceil(days.length / Math.max(1, Math.floor((width - left) / 60))));
  days.forEach((day, i) => {
    if (i % every && i !== days.length - 1) return;
    if (i !== days.length - 1 && days.length - 1 - i < every) return; // too close to the last label
    const x = Math.min(Math.max(left + (i + 0.5) * step, left + 18), width - 18);
    chart.append(svg("text", { x, y: height - 6, "text-anchor": "middle", class: "tick" }, day.date.slice(5)));
  });
  box.replaceChildren(chart);
  box.setAttribute("aria-label", describeChart(days, most));
}

/** The chart in words, for screen readers. */
function describeChart(days, most) {
  if (!days.length) return "Spend per day: no days to show";
  const total = days.reduce((sum, d) => sum + d.cost, 0);
  const top = days.find((d) => d.cost === most);
  const peak = most ? `, most on ${top.date} (${usd(most)})` : "";
  return `Spend per day from ${days[0].date} to ${days[days.length - 1].date}: ${usd(total)} in all${peak}`;
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
  $("models-box").classList.toggle("hidden", rows.length === 0);
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
new ResizeObserver(() => {
  if (drawn.days.length && Math.floor($("chart").clientWidth - 16) !== drawn.width) drawChart(drawn.days);
}).observe($("chart"));
