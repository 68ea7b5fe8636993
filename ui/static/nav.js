// Header: who is signed in, signing out, and the Admin link for admins only.
import { clearProfile, getProfile } from "/aipipe.js";
import { api, showAdminLink, showWho } from "/static/app.js";

const { token, email } = getProfile();
showWho(email);
document.getElementById("signout").addEventListener("click", () => {
  clearProfile();
  location.href = "/";
});
if (token) {
  // The page itself reports a refused token; the header just leaves the link hidden
  api("/usage?days=1", { token }).then(
    (u) => showAdminLink(u.admin),
    () => {},
  );
}
