// Header: who is signed in, and signing out.
import { clearProfile, getProfile } from "/aipipe.js";

const { email } = getProfile();
const signout = document.getElementById("signout");
if (email) {
  document.getElementById("who").textContent = email;
  document.getElementById("signin").classList.add("hidden");
  signout.classList.remove("hidden");
}
signout.addEventListener("click", () => {
  clearProfile();
  location.href = "/";
});
