// Header: who is signed in, and signing out.
import { clearProfile, getProfile } from "/aipipe.js";
import { showWho } from "/static/app.js";

showWho(getProfile().email);
document.getElementById("signout").addEventListener("click", () => {
  clearProfile();
  location.href = "/";
});
