"""Provider passthrough: /<provider>/<path> with the user's token swapped for the operator's key.

The call itself is the relay's (aipipe.relay); what is here is the client side: the route, the caller's
identity (judged on the headers, before the body is read), and the answer's status line and headers.
"""
from __future__ import annotations

import asyncio
import time

from tornado.escape import url_unescape

from ..auth import Identity
from ..errors import ApiError
from ..gateway import Gateway
from ..providers import PROVIDERS
from ..providers.base import NO_BODY_METHODS, Call
from ..relay import Relay
from ..request_path import checked_path, checked_query
from ..upstream import Headers
from .base import INVALID_URL, ApiHandler, copy_upstream_headers
from .lean import LeanCall

DROP_RESPONSE_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "content-length", "content-encoding", "set-cookie",
    "openai-organization", "openai-project", "x-consumed-content-encoding",
    # about the provider's own origin, not ours: HTTP/3 endpoints and HSTS for api.openai.com and the like
    "alt-svc", "strict-transport-security",
    # the gateway answers with its own Date and no Server; the provider's CDN and proxy internals stay there
    # (each header relayed is work on every call, for nothing the client uses)
    "date", "server", "cf-ray", "cf-cache-status", "x-envoy-upstream-service-time",
})


def route_of(path: str) -> tuple[str, str]:
    """A provider route's first segment and the rest of its path, as the client wrote them (/openai/v1/x ->
    ("openai", "v1/x")): the text that is priced and sent upstream, not what the route's pattern decoded."""
    route, _, rest = path[1:].partition("/")
    return route, rest


class ProviderCall(LeanCall, Relay):
    """Relays one call to a provider and bills its usage (aipipe.relay), answering the client as it goes."""

    route_class = "provider"  # for metrics

    def initialize(self, gateway: Gateway) -> None:
        self.gw = gateway
        self._client_gone = False  # set by on_connection_close, whenever the client leaves

    @classmethod
    def check_headers(cls, request, kwargs: dict) -> Identity:
        """Who is calling, decided before the body is read: an unknown provider is 404, a bad token 401."""
        route = route_of(request.path)[0]
        if route not in PROVIDERS:
            try:
                name = url_unescape(route, encoding=None).decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(400, INVALID_URL) from None
            raise ApiError(404, f"Unknown provider: {name}")
        provider, headers = PROVIDERS[route], request.headers
        for header in ("Content-Type", *provider.token_headers):  # what prices the call, and who pays for it
            if len(headers.get_list(header)) > 1:  # Tornado would join them; the provider might read either one
                raise ApiError(400, f"{header} may be sent only once")
        return kwargs["gateway"].identify(headers, token_headers=provider.token_headers)

    async def call(self, name: str, path: str) -> None:
        """Relay the call (its caller was identified by check_headers) on the path exactly as the client wrote it."""
        req = self.request
        route, rest = route_of(req.path)
        provider = PROVIDERS[route]
        # the route (/geminiv1beta) may differ from the provider's config, key and ledger name (gemini)
        self.provider_name = provider.name
        if req.body and req.method in NO_BODY_METHODS:
            raise ApiError(400, f"A {req.method} request cannot carry a body")
        call = Call(req.method, checked_path("/" + rest), checked_query(req.query), req.headers, req.body)
        await self.relay(self.checked, provider, call)

    def _answer_started(self, status: int, reason: str, headers: Headers) -> None:
        """Pass the upstream's status and headers on; an event stream or other body opens at once."""
        self.set_status(status, reason or None)
        copy_upstream_headers(self, headers, DROP_RESPONSE_HEADERS)
        if self._mode != "json":
            self._set_overhead()
            # no Nagle delay between small events (Tornado turns it off only when a response finishes)
            if self._mode == "sse":
                self.request.connection.stream.set_nodelay(True)
            # Headers go with the first bytes of the body when those were read with them (one write, one
            # packet), or on their own an event-loop turn later, so clients see the stream open at once.
            asyncio.get_running_loop().call_soon(self._open_answer)

    async def _break_off(self) -> None:
        """The provider broke off an answer already under way: relay what came, then close the connection
        without ending the answer, so the client sees it was cut rather than a complete stream."""
        await self._sent(self._send(b""))
        self._finished = True
        self.application.log_request(self)
        self.request.connection.close()

    def _open_answer(self) -> None:
        if not self._headers_written and not self._finished and not self._client_gone:
            self.flush().add_done_callback(lambda f: f.exception())

    def _set_overhead(self) -> None:
        added = (self._sent_at - self.started) + (time.perf_counter() - self._received_at)
        self.set_own_header("X-AIPipe-Overhead-Ms", f"{added * 1000:.3f}")

    def on_connection_close(self) -> None:
        # Keep reading the upstream to its usage: a client that leaves mid-stream is still billed.
        self._client_gone = True
        if getattr(self, "outcome", None) is not None and not self._finished:
            self.outcome.aborted = True


class ProviderHandler(ApiHandler):
    """The route of provider calls. A call is served by ProviderCall, without this RequestHandler (handlers.lean);
    what stays here is what a RequestHandler does best: CORS preflights, unknown methods (405), formatting errors.
    An unknown provider is answered 404 by ProviderCall, for every method but OPTIONS."""

    lean_call = ProviderCall
    route_class = "provider"

    @property
    def provider_name(self) -> str:
        """The provider of the route (for metrics of the errors this handler answers); "" when unknown."""
        provider = PROVIDERS.get(route_of(self.request.path)[0])
        return provider.name if provider is not None else ""
