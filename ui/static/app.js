// Helpers shared by AI Pipe's own pages: API calls with readable errors, money formatting, copying.
import { clearProfile, getProfile } from "/aipipe.js";

/** An API failure with a message fit to show a person. */
export class ApiProblem extends Error {
  constructor(status, message, retryAfter) {
    super(explain(status, message, retryAfter));
    this.status = status;
    this.reason = message || "";
  }
}

/** A readable sentence for an API error status and its {message}. */
export function explain(status, message, retryAfter) {
  const said = message ? ` (${message})` : "";
  if (status === 0) return "Could not reach AI Pipe. Check your connection and try again.";
  if (status === 401) return `Your sign-in has expired or your token is no longer valid${said}. Please sign in again.`;
  if (status === 403) return `403 Forbidden: ${message || "you are not allowed to do this"}.`;
  if (status === 429) {
    const wait = retryAfter ? ` Try again in ${retryAfter} seconds.` : "";
    return `Limit reached: ${message || "too many requests"}.${wait}`;
  }
  if (status === 502 || status === 503 || status === 504)
    return `The model provider or AI Pipe's store is not answering right now${said}. Try again in a minute.`;
  return `Something went wrong (HTTP ${status})${said}.`;
}

/** fetch() an AI Pipe API path with the user's token; the parsed JSON, or throws ApiProblem. */
export async function api(path, { token, method = "GET", body } = {}) {
  const response = await send(path, { token, method, body });
  return response.json();
}

/** fetch() that turns network failures and error statuses into ApiProblem; returns the Response. */
export async function send(path, { token, method = "GET", body, signal, headers: extra = {} } = {}) {
  const headers = { ...extra };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiProblem(0);
  }
  if (response.ok) return response;
  let message = "";
  try {
    const body = await response.json();
    message = body.message || body.error?.message || ""; // AI Pipe's own errors, or a provider's passed through
  } catch {
    message = response.statusText;
  }
  throw new ApiProblem(response.status, message, response.headers.get("Retry-After"));
}

/** USD to the millionth (more for tinier amounts), so a non-zero amount never reads $0.00. */
export function usd(value) {
  const x = Number(value) || 0;
  if (x === 0) return "$0.00";
  const size = Math.abs(x);
  const decimals = size >= 100 ? 2 : Math.min(12, Math.max(6, Math.ceil(-Math.log10(size)) + 2));
  let text = size.toFixed(decimals);
  if (Number(text) === 0) text = size.toExponential(2);
  else {
    const [whole, fraction] = text.split(".");
    text = `${whole}.${fraction.replace(/0+$/, "").padEnd(2, "0")}`;
  }
  return (x < 0 ? "-$" : "$") + text;
}

/** Show who is signed in (or nobody) in the page header. */
export function showWho(email) {
  const who = document.getElementById("who");
  who.textContent = email || "";
  who.title = email || ""; // a long address is cut short on narrow screens
  document.getElementById("signin").classList.toggle("hidden", Boolean(email));
  document.getElementById("signout").classList.toggle("hidden", !email);
  if (!email) showAdminLink(false);
}

/** Show the header's Admin link, which only admins can use. */
export function showAdminLink(on) {
  document.getElementById("admin-link").classList.toggle("hidden", !on);
}

/** The signed-in profile, or null after sending the visitor to /login (and back here afterwards). */
export function requireProfile() {
  const profile = getProfile();
  if (profile.token) return profile;
  location.replace(`/login?redirect=${encodeURIComponent(location.href)}`);
  return null;
}

/** Show a sentence in the page's alert box. */
export function showMessage(text) {
  const box = document.getElementById("alert");
  box.textContent = text;
  box.classList.remove("hidden");
}

/** Show an error (ApiProblem or anything else) in the page's alert box; 401 also offers to sign in again. */
export function showError(error) {
  const box = document.getElementById("alert");
  box.textContent = error instanceof ApiProblem ? error.message : `Something went wrong: ${error.message || error}`;
  if (error instanceof ApiProblem && error.status === 401) {
    clearProfile();
    showWho(null);
    const link = document.createElement("a");
    link.href = `/login?redirect=${encodeURIComponent(location.href)}`;
    link.textContent = "Sign in again";
    box.append(" ", link);
  }
  box.classList.remove("hidden");
}

/** Clear the page's alert box. */
export function clearError() {
  const box = document.getElementById("alert");
  box.textContent = "";
  box.classList.add("hidden");
}

/** Make button copy text() to the clipboard, saying so on the button. */
export function copyButton(button, text) {
  button.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(text());
      button.textContent = "Copied";
    } catch {
      button.textContent = "Select and copy";
    }
    setTimeout(() => (button.textContent = "Copy"), 1500);
  });
}

/** "spent $X of $Y …, $Z left" for a /usage answer. */
export function usageLine(u) {
  const span = u.window?.period ? `this ${u.window.period}` : `in ${u.window?.days ?? u.days} days`;
  return `Used ${usd(u.spent)} of ${usd(u.limit)} ${span}; ${usd(u.remaining)} left.`;
}
