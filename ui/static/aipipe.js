// AI Pipe client helper, imported by apps on any origin:
//   import { getProfile } from "https://your-aipipe-server/aipipe.js";
const KEY = "aipipe"; // localStorage entry holding {token, email}
const PARAMS = ["aipipe_token", "aipipe_email"];

function readStored() {
  try {
    const { token = null, email = null } = JSON.parse(localStorage.getItem(KEY) || "{}") || {};
    return { token, email };
  } catch {
    return { token: null, email: null }; // storage disabled or corrupted: behave as signed out
  }
}

/** Remember a profile for later getProfile() calls. */
export function saveProfile({ token, email }) {
  try {
    localStorage.setItem(KEY, JSON.stringify({ token, email }));
  } catch {
    // storage can be disabled (privacy modes, sandboxed frames); the caller still has the values
  }
}

/** Forget the stored profile (sign out). */
export function clearProfile() {
  try {
    localStorage.removeItem(KEY);
  } catch {
    // nothing stored anyway
  }
}

function emailFromToken(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(payload)).email ?? null;
  } catch {
    return null;
  }
}

function paramName(part) {
  const name = part.split("=")[0].replace(/\+/g, " ");
  try {
    return decodeURIComponent(name);
  } catch {
    return name; // a stray % in the app's own query: not one of ours
  }
}

// Remove our parameters from the address bar, leaving the app's own query (byte for byte) and hash.
function removeParams() {
  const kept = location.search
    .slice(1)
    .split("&")
    .filter((part) => part && !PARAMS.includes(paramName(part)));
  const url = location.pathname + (kept.length ? "?" + kept.join("&") : "") + location.hash;
  history.replaceState(history.state, "", url);
}

/** The signed-in user: {token, email}, taken from ?aipipe_token=&aipipe_email= after /login, else from storage. */
export function getProfile() {
  const params = new URLSearchParams(location.search); // read everything first, then edit the URL
  const token = params.get("aipipe_token");
  const email = params.get("aipipe_email");
  if (PARAMS.some((name) => params.has(name))) removeParams();
  if (token) {
    const profile = { token, email: email || emailFromToken(token) };
    saveProfile(profile);
    return profile;
  }
  return readStored();
}
