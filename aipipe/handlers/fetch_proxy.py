"""/proxy/<URL>: fetch a public http(s) URL for a browser app and stream it back with CORS headers.

Credentials never travel on, private networks stay out of reach (each redirect hop is checked the
same way) and the answer is relayed as it arrives, up to [proxy] max_bytes.
"""
from __future__ import annotations

import logging
from typing import NoReturn
from urllib.parse import quote_from_bytes, unquote_to_bytes, urljoin, urlsplit

from tornado.httpclient import HTTPRequest, HTTPResponse
from tornado.httputil import HTTPHeaders, HTTPInputError
from tornado.iostream import StreamClosedError
from tornado.simple_httpclient import HTTPTimeoutError, SimpleAsyncHTTPClient

from .. import netguard
from ..errors import ApiError
from ..providers import TOKEN_HEADERS
from .base import ApiHandler, copy_upstream_headers

log = logging.getLogger("aipipe.fetch_proxy")
MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                        "te", "trailer", "trailers", "transfer-encoding", "upgrade"})
# The caller's AI Pipe token (in whichever header any provider takes it) and cookies are for AI Pipe, never for the
# target.
DROP_REQUEST = HOP_BY_HOP | {"host", "content-length", "expect", "cookie"} | {h.lower() for h in TOKEN_HEADERS}
# The answer is served from AI Pipe's origin, so the target must not set what applies to that origin: cookies,
# site data, transport and reporting policy, or a CSP of its own in place of ours (CORS is dropped separately).
ORIGIN_WIDE = frozenset({
    "set-cookie", "set-cookie2", "clear-site-data", "content-security-policy", "content-security-policy-report-only",
    "x-content-type-options", "strict-transport-security", "alt-svc", "nel", "report-to", "reporting-endpoints",
    "service-worker-allowed", "refresh", "accept-ch", "critical-ch", "origin-agent-cluster", "permissions-policy",
    "feature-policy", "document-policy", "speculation-rules", "origin-trial", "cross-origin-opener-policy",
    "cross-origin-embedder-policy", "x-frame-options", "x-xss-protection", "public-key-pins", "expect-ct"})
DROP_RESPONSE = HOP_BY_HOP | ORIGIN_WIDE | {"content-length"}
# Whatever the target sends runs as an opaque origin with nothing allowed, so its script can never read AI Pipe's
# localStorage (where /login keeps the token). A CSP on a fetched answer does not bind the page that fetched it,
# so fetch() callers still read the body.
SANDBOX_HEADERS = (("Content-Security-Policy", "sandbox; default-src 'none'; base-uri 'none'; form-action 'none'"),
                   ("X-Content-Type-Options", "nosniff"))
URL_CHARACTERS = bytes(range(0x21, 0x7F)).decode()  # printable ASCII: left as it is in the target URL


class TooLarge(Exception):
    """The target's answer went past [proxy] max_bytes."""


class StopReading(HTTPInputError):
    """Raised from our callbacks to drop the target's connection (Tornado closes it without a traceback)."""


def sendable_url(url: bytes) -> str | None:
    """url as ASCII, non-ASCII bytes percent-encoded; None when it holds a space or control character, which
    would end the request line or a header sent on to the target."""
    if any(byte <= 0x20 or byte == 0x7F for byte in url):
        return None
    return quote_from_bytes(url, safe=URL_CHARACTERS)


def target_of(uri: str) -> str:
    """Everything after /proxy/ (query string included), also when the caller percent-encoded it, as ASCII."""
    raw = uri.split("/proxy/", 1)[1]
    # Tornado decodes the request line as Latin-1, so encoding it back gives the bytes the caller sent
    for candidate in (raw.encode("latin-1"), unquote_to_bytes(raw)):
        if candidate[:8].lower().startswith((b"http://", b"https://")):
            url = sendable_url(candidate)
            if url is None:
                raise ApiError(400, "URL must not contain spaces or control characters")
            return url
    raise ApiError(400, "URL must begin with http")


def forward_headers(headers: HTTPHeaders) -> HTTPHeaders:
    """The caller's headers minus hop-by-hop ones (incl. those named in Connection) and credentials."""
    named = {h.strip().lower() for h in headers.get("Connection", "").split(",")}
    out = HTTPHeaders()
    for name, value in headers.get_all():
        lower = name.lower()
        if lower not in DROP_REQUEST and lower not in named:
            out.add(name, value)
    return out


class ProxyClient:
    """The HTTP client /proxy fetches with; built on first use, on the running loop."""

    def __init__(self, allow_private: bool):
        self.allow_private = allow_private
        self._client: SimpleAsyncHTTPClient | None = None

    def get(self) -> SimpleAsyncHTTPClient:
        """The client; unless private targets are allowed, its resolver refuses non-public addresses."""
        if self._client is None:
            resolver = netguard.system_resolver()
            if not self.allow_private:
                resolver = netguard.GuardedResolver(resolver=resolver)
            self._client = SimpleAsyncHTTPClient(force_instance=True, resolver=resolver, max_clients=1000,
                                                 max_body_size=1 << 40)  # our own max_bytes check applies
        return self._client


def proxy_routes(gateway) -> list:
    """The /proxy route with its own HTTP client."""
    client = ProxyClient(gateway.config.get("proxy.allow_private"))
    return [(r"/proxy/(.*)", FetchProxyHandler, {"gateway": gateway, "client": client})]


class FetchProxyHandler(ApiHandler):
    """Relays any method to the target URL and streams the answer back."""

    route_class = "proxy"  # for metrics

    def initialize(self, gateway, client: ProxyClient) -> None:
        super().initialize(gateway)
        self.client = client

    def set_default_headers(self) -> None:
        super().set_default_headers()  # also what an error answer starts from (send_error clears the rest)
        for name, value in SANDBOX_HEADERS:
            self.set_header(name, value)

    def prepare(self) -> None:
        if not self.gw.config.get("proxy.enabled"):
            raise ApiError(404, "/proxy is turned off on this server")

    async def get(self, _path: str) -> None:
        if self.gw.config.get("proxy.require_token"):
            self.gw.identify(self.request.headers, allow_native=False)
        target = target_of(self.request.uri)
        self.max_bytes = self.gw.config.get("proxy.max_bytes")
        self.received, self.client_gone, self.stopped = 0, False, None
        self.set_header("X-Proxy-URL", target)
        method, headers = self.request.method, forward_headers(self.request.headers)
        body = self.request.body if method in ("POST", "PUT", "PATCH") or self.request.body else None
        url = target
        for _hop in range(MAX_REDIRECTS + 1):
            try:
                response = await self._fetch_once(url, method, headers, body)
            except ApiError:
                raise
            except Exception as error:  # refused address, too large, timeout, network or protocol error
                return self._fail(error, url)
            if not self.redirect_to:
                return self.finish() if not self.client_gone else None
            url = sendable_url(urljoin(url, self.redirect_to).encode("latin-1"))  # header values are Latin-1 too
            if url is None:
                raise ApiError(502, "Target redirected to a URL with spaces or control characters")
            if not url.lower().startswith(("http://", "https://")):
                raise ApiError(502, "Target redirected to a URL that is not http(s)")
            if response.code == 303 or (response.code in (301, 302) and method == "POST"):
                method, body = "GET", None  # what browsers do; 307/308 keep method and body
                headers.pop("Content-Type", None)
        raise ApiError(502, f"Too many redirects (more than {MAX_REDIRECTS})")

    post = put = patch = delete = head = get

    async def _fetch_once(self, url: str, method: str, headers: HTTPHeaders, body: bytes | None) -> HTTPResponse:
        try:
            parts = urlsplit(url)
        except ValueError:  # an unclosed [IPv6 literal
            raise ApiError(400, "URL has an invalid host") from None
        try:
            parts.port
        except ValueError:
            raise ApiError(400, "URL has an invalid port") from None
        if not parts.hostname:
            raise ApiError(400, "URL has no host")
        try:
            parts.hostname.encode("idna")  # what the resolver does with it: an empty or over-long label fails
        except UnicodeError:
            raise ApiError(400, "URL has an invalid host") from None
        self.redirect_to = ""
        timeout = self.gw.config.get("proxy.timeout")
        request = HTTPRequest(url, method=method, headers=headers, body=body, follow_redirects=False,
                              allow_nonstandard_methods=True, decompress_response=False,
                              connect_timeout=timeout, request_timeout=timeout,
                              header_callback=self._header_parser(), streaming_callback=self._on_chunk)
        return await self.client.get().fetch(request, raise_error=False)

    def _header_parser(self):
        """A header_callback: follow redirects ourselves, relay anything else."""
        lines: list[str] = []

        def on_line(line: str) -> None:
            if line != "\r\n":
                lines.append(line)
                return
            code = int(lines[0].split(" ", 2)[1])
            headers = HTTPHeaders.parse("".join(lines[1:]))
            lines.clear()
            if code in REDIRECTS and headers.get("Location"):
                self.redirect_to = headers["Location"]  # followed (and checked) by us, body discarded
            elif code >= 200:
                self._start_relay(code, headers)
        return on_line

    def _start_relay(self, code: int, headers: HTTPHeaders) -> None:
        length = headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.max_bytes and self.request.method != "HEAD":
            self._stop(TooLarge())
        self.set_status(code)
        if "Content-Type" not in headers:
            self.clear_header("Content-Type")  # not Tornado's default text/html: an untyped answer stays untyped
        copy_upstream_headers(self, headers, DROP_RESPONSE)

    async def _on_chunk(self, chunk: bytes) -> None:
        if self.redirect_to:
            return
        if self.client_gone:
            self._stop(StreamClosedError())
        self.received += len(chunk)
        if self.received > self.max_bytes:
            self._stop(TooLarge())
        self.write(chunk)
        try:
            await self.flush()  # a slow caller slows the target read instead of growing memory
        except StreamClosedError:
            self.client_gone = True

    def _stop(self, why: Exception) -> NoReturn:
        self.stopped = why
        raise StopReading(type(why).__name__)

    def on_connection_close(self) -> None:
        self.client_gone = True

    def _fail(self, error: Exception, url: str) -> None:
        error = self.stopped or error  # Tornado reports our own stop as a closed connection
        if self._headers_written or self.client_gone:
            # too late for an error status: cut the connection so the caller sees a truncated answer
            log.warning("proxied answer from %s cut short: %s", urlsplit(url).hostname, type(error).__name__)
            self.request.connection.close()
            return
        raise self._error_for(error, url)

    def _error_for(self, error, url: str) -> ApiError:
        host = urlsplit(url).hostname
        if isinstance(error, netguard.BlockedAddress):
            return ApiError(403, str(error))
        if isinstance(error, TooLarge):
            return ApiError(502, f"Response larger than {self.max_bytes} bytes")
        if isinstance(error, HTTPTimeoutError):
            return ApiError(504, f"{host} did not answer within {self.gw.config.get('proxy.timeout'):g} s")
        return ApiError(502, f"Could not reach {host}: {error or 'no answer'}")
