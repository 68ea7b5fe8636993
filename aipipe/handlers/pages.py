"""The browser pages: / (home), /login, /playground, /dashboard, /admin, plus /aipipe.js and /static/*."""
from __future__ import annotations

from .page_base import LOGIN_CSP, PageHandler, StaticHandler, static_path
from .redirects import RedirectError, check_redirect, redirect_from_query


class LoginHandler(PageHandler):
    """Google sign-in; hands the token to ?redirect= at once, after consent, or not at all."""

    csp = LOGIN_CSP
    referrer_policy = "no-referrer-when-downgrade"  # what Google's button needs to see our origin on localhost

    def get(self) -> None:
        target = redirect_from_query(self.request.query, self.get_query_argument("redirect", None))
        handoff, error = None, ""
        if target:
            try:
                handoff = check_redirect(target, self.base_url, self.gw.config.get("auth.redirect_origins"))
            except RedirectError as e:
                self.set_status(400)
                error = f"This sign-in link wants your token sent to an address that is not allowed. {e}."
        self.render_template("login.html", client_id=self.gw.config.get("auth.google_client_id"),
                             handoff=handoff, error=error)


def page_routes(gateway) -> list:
    """Routes for the pages and static files; they go before the provider catch-all."""
    deps = {"gateway": gateway}
    static = {"path": static_path()}
    return [
        (r"/", PageHandler, {**deps, "template": "home.html"}),
        (r"/login/?", LoginHandler, deps),
        (r"/playground/?", PageHandler, {**deps, "template": "playground.html"}),
        (r"/dashboard/?", PageHandler, {**deps, "template": "dashboard.html"}),
        (r"/admin/?", PageHandler, {**deps, "template": "admin.html"}),
        (r"/(aipipe\.js)", StaticHandler, static),
        (r"/static/(.*)", StaticHandler, static),
    ]
