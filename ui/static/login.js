// /login: sign in with Google (or a pasted token), then show the token or hand it to ?redirect=.
import { clearProfile, getProfile, saveProfile } from "/aipipe.js";
import { api, clearError, copyButton, showAdminLink, showError, showMessage, showWho, usageLine } from "/static/app.js";

const $ = (id) => document.getElementById(id);
const show = (id, on = true) => $(id)?.classList.toggle("hidden", !on);
// The server checked the redirect and decided whether to ask; this page only carries out that decision.
const { clientId, redirect, consent } = $("login").dataset;
const OURS = ["aipipe_token", "aipipe_email"];

/** The app URL with the token and email added, keeping the app's own query and fragment. */
function destination({ token, email }) {
  let target = redirect;
  // Apps that follow the README pass their URL unencoded, so their #fragment arrives on this page instead
  if (!target.includes("#") && location.hash) target += location.hash;
  const cut = target.indexOf("#");
  const hash = cut < 0 ? "" : target.slice(cut);
  const base = cut < 0 ? target : target.slice(0, cut);
  const q = base.indexOf("?");
  const path = q < 0 ? base : base.slice(0, q);
  const kept = (q < 0 ? "" : base.slice(q + 1)).split("&").filter((p) => p && !OURS.includes(p.split("=")[0]));
  kept.push(`aipipe_token=${encodeURIComponent(token)}`, `aipipe_email=${encodeURIComponent(email)}`);
  return `${path}?${kept.join("&")}${hash}`;
}

async function showProfile({ token, email }) {
  document.querySelector("h1").textContent = "Your AI Pipe token";
  $("profile-email").textContent = email;
  $("profile-token").value = token;
  show("profile-section");
  try {
    const usage = await api("/usage", { token });
    $("profile-usage").textContent = usageLine(usage);
    showAdminLink(usage.admin);
  } catch (error) {
    showError(error);
  }
}

function proceed(profile) {
  clearError();
  showWho(profile.email);
  show("signin-section", false);
  if (!redirect) return showProfile(profile);
  if (consent !== "1") return location.replace(destination(profile));
  show("consent");
  $("consent-allow").addEventListener("click", () => location.replace(destination(profile)));
  $("consent-deny").addEventListener("click", () => {
    show("consent", false);
    showProfile(profile);
  });
}

async function onCredential({ credential }) {
  try {
    const profile = await api("/token", { method: "POST", body: { credential } });
    saveProfile(profile);
    proceed(profile);
  } catch (error) {
    showMessage(`Sign-in failed: ${error.reason || error.message}`);
  }
}

function startGoogle() {
  const id = window.google.accounts.id;
  id.initialize({ client_id: clientId, callback: onCredential, auto_select: false });
  id.renderButton($("google-button"), { type: "standard", theme: "outline", size: "large", text: "signin_with" });
}

function startSignIn() {
  show("profile-section", false);
  show("signin-section");
  if (!clientId) return;
  if (window.google?.accounts?.id) return startGoogle();
  $("gis").addEventListener("load", startGoogle);
  $("gis").addEventListener("error", () => showMessage("Could not load Google Sign-In. Check your connection and reload."));
}

$("paste-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = $("paste-token").value.trim();
  try {
    const { email } = await api("/usage", { token });
    saveProfile({ token, email });
    proceed({ token, email });
  } catch (error) {
    showMessage(error.status === 401 ? `That token was not accepted: ${error.reason}` : error.message);
  }
});
$("switch-account").addEventListener("click", () => {
  clearProfile();
  showWho(null);
  window.google?.accounts?.id?.disableAutoSelect?.();
  startSignIn();
});
copyButton($("copy-token"), () => $("profile-token").value);

const stored = getProfile();
if (!stored.token) startSignIn();
else {
  // A stored token skips Google, but only while the server still accepts it
  api("/usage", { token: stored.token }).then(
    () => proceed(stored),
    (error) => {
      if (error.status !== 401) return proceed(stored);
      clearProfile();
      startSignIn();
    },
  );
}
