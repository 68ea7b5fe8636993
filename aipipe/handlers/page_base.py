"""Server-rendered pages: the one Jinja2 environment, a base handler with CSP, and static files with CORS."""
from __future__ import annotations

import importlib.resources
from typing import Any

import jinja2
import tornado.web

from ..errors import ApiError
from ..gateway import Gateway
from ..logs import log_handler_exception
from .base import decode_utf8

# Pages run only their own scripts; frames, plugins and <base> tricks are refused everywhere.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
# What Google Identity Services needs (developers.google.com/identity/gsi/web/guides/get-google-api-clientid#content_security_policy)
GIS = "https://accounts.google.com/gsi/"
LOGIN_CSP = ("default-src 'self'; "
             f"script-src 'self' {GIS}client; style-src 'self' {GIS}style; frame-src {GIS}; connect-src 'self' {GIS}; "
             "img-src 'self' data: https://*.googleusercontent.com; "
             "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def template_environment() -> jinja2.Environment:
    """The Jinja2 environment for ui/templates (installed as aipipe.ui), autoescaping everything."""
    return jinja2.Environment(loader=jinja2.PackageLoader("aipipe.ui", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def static_path() -> str:
    """Folder of ui/static on disk."""
    return str(importlib.resources.files("aipipe.ui") / "static")


class PageHandler(tornado.web.RequestHandler):
    """A server-rendered HTML page; errors render as HTML too."""

    route_class = "page"  # for metrics

    SUPPORTED_METHODS = ("GET", "HEAD")
    csp = CSP
    # GIS needs the page's origin as referrer on http://localhost, so /login relaxes this
    referrer_policy = "same-origin"

    def initialize(self, gateway: Gateway, template: str | None = None) -> None:
        self.gw = gateway
        self.template = template

    def set_default_headers(self) -> None:
        self.clear_header("Server")
        self.set_header("Content-Security-Policy", self.csp)
        self.set_header("X-Frame-Options", "DENY")  # the consent screen must never be framed (clickjacking)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", self.referrer_policy)
        self.set_header("Cache-Control", "no-store")

    @property
    def base_url(self) -> str:
        """This server's own origin as the browser sees it."""
        return f"{self.request.protocol}://{self.request.host}"

    def render_template(self, name: str, **ns: Any) -> None:
        """Finish with a template from ui/templates rendered with ns."""
        env: jinja2.Environment = self.settings["jinja"]
        html = env.get_template(name).render(base_url=self.base_url, path=self.request.path, **ns)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(html)

    def get(self, *args: Any) -> None:
        self.render_template(self.template)

    def head(self, *args: Any) -> Any:
        return self.get(*args)  # whatever get a subclass defines (a coroutine, when it is async)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Errors on pages are pages, with the same safe message an API error would carry."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = exc.message if isinstance(exc, ApiError) else self._reason if status_code < 500 else "Internal server error"
        self.render_template("error.html", status=status_code, message=message)

    def log_exception(self, typ, value, tb) -> None:
        log_handler_exception(self.request, typ, value, tb)

    def decode_argument(self, value: bytes, name: str | None = None) -> str:
        return decode_utf8(value, name)


class StaticHandler(tornado.web.StaticFileHandler):
    route_class = "static"  # for metrics
    """ui/static, importable from any origin: apps load /aipipe.js cross-origin as an ES module."""

    def set_default_headers(self) -> None:
        self.clear_header("Server")
        self.set_header("Access-Control-Allow-Origin", "*")
        self.set_header("X-Content-Type-Options", "nosniff")

    def get_content_type(self) -> str:
        # module scripts are refused unless served with a JavaScript MIME type, whatever mimetypes says
        if self.absolute_path.endswith((".js", ".mjs")):
            return "text/javascript; charset=utf-8"
        return super().get_content_type()

    def log_exception(self, typ, value, tb) -> None:
        log_handler_exception(self.request, typ, value, tb)
