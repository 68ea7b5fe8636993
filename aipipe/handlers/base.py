"""The base handler: CORS on every response, every error as JSON {"message": ...}."""
from __future__ import annotations

import logging
from typing import Any

import orjson
import tornado.web

from ..errors import ApiError
from ..gateway import Gateway
from ..logs import log_handler_exception

log = logging.getLogger("aipipe")
ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
EXPOSE_HEADERS = "*, X-AIPipe-Cost, X-AIPipe-Overhead-Ms, X-Proxy-URL, Retry-After, Content-Type"
# On every answer. Browsers read Allow-Methods and Allow-Headers only on a preflight (ApiHandler.options).
CORS_HEADERS = (("Access-Control-Allow-Origin", "*"), ("Access-Control-Expose-Headers", EXPOSE_HEADERS))


def copy_upstream_headers(target, headers, drop: frozenset[str]) -> None:
    """Relay an upstream answer's headers (Tornado's HTTPHeaders or (name, value) lines) to `target` (a handler),
    minus `drop` (lower-case names) and the upstream's own CORS headers. A header the target refuses (a control
    character in its value: ValueError) is left out, so one bad line does not cost the caller the answer."""
    seen = set()
    for name, value in headers.get_all() if hasattr(headers, "get_all") else headers:
        lower = name.lower()
        if lower in drop or lower.startswith("access-control-"):
            continue
        try:
            if lower in seen:
                target.add_header(name, value)
            else:
                target.set_header(name, value)  # replaces the defaults (Content-Type, Date)
                seen.add(lower)
        except ValueError:
            log.warning("left out an upstream header that cannot be relayed: %s", name[:64].encode("ascii", "replace"))


INVALID_URL = "Invalid unicode in url"


def decode_utf8(value: bytes | str, name: str | None) -> str:
    """RequestHandler.decode_argument, except that a value which is not UTF-8 is answered 400 without being
    quoted back in the answer or the log (Tornado quotes its first 40 bytes, and it may be a credential)."""
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, f"Invalid unicode in {name}" if name else INVALID_URL) from None


class ApiHandler(tornado.web.RequestHandler):
    """JSON API handler with CORS and uniform errors; dependencies arrive via initialize()."""

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
    route_class = "api"  # the label of its requests in metrics
    token_before_body = False  # whether a body is refused (401) before it is read when the token is bad

    def __init__(self, application, request, **kwargs: Any) -> None:
        super().__init__(application, request, **kwargs)
        tracked = getattr(application, "open_requests", None)
        if tracked is not None:  # a shutdown waits for this request (aipipe.drain)
            tracked.add_handler(self)

    def initialize(self, gateway: Gateway) -> None:
        self.gw = gateway

    def set_default_headers(self) -> None:
        self.clear_header("Server")  # Tornado's would tell which version answers (docs/api.md)
        for name, value in CORS_HEADERS:
            self.set_header(name, value)

    def decode_argument(self, value: bytes, name: str | None = None) -> str:
        return decode_utf8(value, name)

    def options(self, *args: Any) -> None:
        """CORS preflight: 200, no auth, cached for a day."""
        self.set_header("Access-Control-Allow-Methods", ALLOW_METHODS)
        requested = self.request.headers.get("Access-Control-Request-Headers")
        self.set_header("Access-Control-Allow-Headers", requested or "Authorization, Content-Type")
        self.set_header("Access-Control-Max-Age", "86400")
        self.set_status(200)
        self.finish()

    def send_json(self, obj: Any, status: int = 200) -> None:
        """Finish with obj as JSON."""
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps(obj))

    def json_body(self) -> dict:
        """The request body as a JSON object; 400 otherwise."""
        try:
            data = orjson.loads(self.request.body or b"")
        except orjson.JSONDecodeError:
            raise ApiError(400, "Request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "Request body must be a JSON object")
        return data

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Every error leaves as JSON {"message": ...} with CORS headers."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            message = exc.message
            for name, value in exc.headers.items():
                self.set_header(name, value)
        elif isinstance(exc, tornado.web.HTTPError) and exc.log_message and status_code < 500:
            message = exc.reason or self._reason
        else:
            message = self._reason if status_code < 500 else "Internal server error"
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps({"message": message}))

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, ApiError):
            return  # expected refusals; the access log has the status
        log_handler_exception(self.request, typ, value, tb)


class NotFoundHandler(ApiHandler):
    """Any path no route claims."""

    def prepare(self) -> None:
        if self.request.method != "OPTIONS":
            raise ApiError(404, "Not found")
