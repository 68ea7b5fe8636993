"""Serving the provider passthrough without a RequestHandler.

A RequestHandler does a good deal per request that a passthrough has no use for: default headers built
and validated one by one, ETags, output transforms, argument decoding and a layer of futures around the
verb method: on a proxied chat call, a good share of the gateway's own work (docs/performance.md).
`LeanApplication` serves a route whose RequestHandler names a `lean_call` class on Tornado's
HTTPMessageDelegate interface instead, with an instance of that class (a `LeanCall`), which offers the part
of RequestHandler's interface the passthrough uses.

What stays with the RequestHandler: methods the lean class does not serve (CORS preflights, unknown
verbs), and every error. A call that fails before its answer started hands the exception to an instance
of the route's RequestHandler made for the same request, whose write_error formats it, so errors still
leave through the one base handler.
"""
from __future__ import annotations

import asyncio
import re
import time
from asyncio import Future
from typing import Any

import tornado.web
from tornado import httputil
from tornado.log import app_log, gen_log

from ..drain import OpenRequests
from ..errors import ApiError
from .base import CORS_HEADERS, INVALID_URL
from .intake import Guarded, Intake, answer_error

REASON_PHRASE = re.compile(r"[\t\x20-\x7e\x80-\xff]+")  # RFC 9112: HTAB, SP, VCHAR, obs-text
VALID_HEADER_VALUE = re.compile(r"[\x09\x20-\x7e\x80-\xff]*")  # RFC 9110 field values, as Tornado checks them
_date = [0, ""]  # [whole second, its HTTP date]: formatted once a second, not once a call


def http_date(now: float) -> str:
    """The Date header for time `now`."""
    second = int(now)
    if _date[0] != second:
        _date[:] = [second, httputil.format_timestamp(second)]
    return _date[1]


def _checked(value: str) -> str:
    if VALID_HEADER_VALUE.fullmatch(value) is None:
        raise ValueError("Unsafe header value")
    return value


class LeanCall:
    """One request, answered through its HTTP connection: the subset of RequestHandler's response interface
    a passthrough needs (status, headers, write, flush, finish), with the same defaults as the base handler
    (Date and CORS; no Server header)."""

    SUPPORTED_METHODS: tuple[str, ...] = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
    task: asyncio.Task | None = None  # the task serving this call (set by the delegate that starts it)

    def __init__(self, application: tornado.web.Application, request: httputil.HTTPServerRequest,
                 fallback: type[tornado.web.RequestHandler], kwargs: dict[str, Any]) -> None:
        self.application, self.request = application, request
        self._fallback, self._kwargs = fallback, kwargs  # who formats this call's errors, and its arguments
        headers = self._headers = httputil.HTTPHeaders()
        headers["Date"] = http_date(time.time())
        for name, value in CORS_HEADERS:
            headers[name] = value
        self._status_code, self._reason = 200, "OK"
        self._write_buffer: list[bytes] = []
        self._headers_written = self._finished = False
        request.connection.set_close_callback(self.on_connection_close)
        self.initialize(**kwargs)

    def initialize(self, **kwargs: Any) -> None:
        """The route's keyword arguments, as RequestHandler.initialize receives them."""

    @classmethod
    def check_headers(cls, request: httputil.HTTPServerRequest, kwargs: dict) -> Any:
        """Judge the request on its headers, before its body is read: raise ApiError to refuse it. What it
        returns is handed to the call as `self.checked`."""
        return None

    async def call(self, *args: str) -> None:
        """Serve the request; the path's groups are the arguments. Raise ApiError to answer with an error."""
        raise NotImplementedError

    def on_connection_close(self) -> None:
        """The client closed the connection before the answer was finished."""

    def set_status(self, status: int, reason: str | None = None) -> None:
        """Set the status; a reason phrase that could not go in a status line as it is gives way to the standard
        one, as RequestHandler.set_status does (an upstream's reason may hold anything aiohttp could decode)."""
        self._status_code = status
        if reason is None or "<" in reason or REASON_PHRASE.fullmatch(reason) is None:
            reason = httputil.responses.get(status, "Unknown")
        self._reason = reason

    def get_status(self) -> int:
        return self._status_code

    def set_header(self, name: str, value: str) -> None:
        """Set a header; ValueError for a value RFC 9110 does not allow, as RequestHandler.set_header."""
        self._headers[name] = _checked(value)

    def set_own_header(self, name: str, value: str) -> None:
        """set_header for a value made here from numbers, which needs no check."""
        self._headers[name] = value

    def add_header(self, name: str, value: str) -> None:
        self._headers.add(name, _checked(value))

    def write(self, chunk: bytes) -> None:
        self._write_buffer.append(chunk)

    def flush(self) -> Future[None]:
        """Send what was written (with the status line and headers, the first time); done when it is out."""
        buffer = self._write_buffer
        chunk = buffer[0] if len(buffer) == 1 else b"".join(buffer)
        self._write_buffer = []
        connection = self.request.connection
        head = self.request.method == "HEAD"
        if not self._headers_written:
            start_line = httputil.ResponseStartLine("", self._status_code, self._reason)
            # written only if every header line is valid (else ValueError, and an error answer can still go out)
            sent = connection.write_headers(start_line, self._headers, b"" if head else chunk)
            self._headers_written = True
            return sent
        if head:
            done: Future[None] = Future()
            done.set_result(None)
            return done
        return connection.write(chunk)

    def finish(self) -> Future[None]:
        """End the answer (with its Content-Length when nothing was sent yet) and write the access-log line."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        if not self._headers_written:
            status = self._status_code
            if status in (204, 304) or 100 <= status < 200:
                if self._write_buffer:
                    raise RuntimeError(f"Cannot send body with status code HTTP{status}")
                for name in ("Content-Encoding", "Content-Language", "Content-Type"):
                    self._headers.pop(name, None)
            elif "Content-Length" not in self._headers:
                self._headers["Content-Length"] = str(sum(map(len, self._write_buffer)))
        connection = self.request.connection
        connection.set_close_callback(None)
        sent = self.flush()
        connection.finish()
        self._finished = True
        self.application.log_request(self)
        return sent

    async def serve(self, path_args: list[bytes]) -> None:
        """Run call() and finish the answer, or hand what went wrong to the route's RequestHandler."""
        try:
            try:
                args = [None if arg is None else arg.decode("utf-8") for arg in path_args]
            except UnicodeDecodeError:  # as the route's RequestHandler answers it (ApiHandler.decode_argument)
                raise ApiError(400, INVALID_URL) from None
            await self.call(*args)
            if not self._finished:
                self.finish()
        except Exception as e:
            self._fail(e, path_args)
        except asyncio.CancelledError as e:
            task = asyncio.current_task()
            if task is None or not task.cancelling():  # something this call awaited was cancelled: an error
                self._fail(e, path_args)
                return
            if self._headers_written and not self._finished:  # cut by a shutdown mid-answer: the client sees it end
                self._finished = True
                self.request.connection.close()
            elif not self._finished:  # cut by a shutdown before the answer started
                self._fail(ApiError(503, "Server is shutting down, try again"), path_args)
            raise
        finally:
            self.application.open_requests.tasks.discard(self.task)  # (rather than a done callback per call)

    def _fail(self, error: BaseException, path_args: list[bytes]) -> None:
        if not self._headers_written:  # nothing sent yet: the route's RequestHandler answers with the error
            self._finished = True
            answer_error(self.application, self.request, self._fallback, self._kwargs, path_args, error)
            return
        if not isinstance(error, tornado.web.HTTPError):
            app_log.error("Uncaught exception in %s %s", self.request.method, self.request.path,
                          exc_info=(type(error), error, error.__traceback__))
        gen_log.error("Cannot send error response after headers written")
        if not self._finished:  # end what was sent, so the connection is released
            try:
                self.finish()
            except Exception:
                gen_log.error("Failed to flush partial response", exc_info=True)


class _LeanDelegate(httputil.HTTPMessageDelegate):
    """Judges the request on its headers (handlers.intake), gathers the body, then serves it with a LeanCall."""

    def __init__(self, application, request, call_class, fallback, kwargs, path_args, limit: int) -> None:
        self.application, self.request = application, request
        self.call_class, self.fallback, self.kwargs, self.path_args = call_class, fallback, kwargs, path_args
        self.chunks: list[bytes] = []
        self.intake = Intake(application, request, fallback, kwargs, path_args, limit)
        self.checked = None

    def headers_received(self, start_line, headers) -> None:
        intake = self.intake
        intake.check_headers(False)  # the size; the token is the call class's to judge
        if not intake.refused:
            try:
                self.checked = self.call_class.check_headers(self.request, self.kwargs)
            except ApiError as e:
                intake.refuse(e)

    def data_received(self, chunk: bytes) -> None:
        if self.intake.count(chunk):
            self.chunks.append(chunk)

    def finish(self) -> None:
        request = self.request
        self.application.body_in(request.connection)
        if self.intake.refused:
            return
        chunks = self.chunks
        request.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        call = self.call_class(self.application, request, self.fallback, self.kwargs)
        call.checked = self.checked
        # on the connection's own loop, asked for without asyncio.get_running_loop() (a getpid() each time)
        call.task = task = request.connection.stream.io_loop.asyncio_loop.create_task(call.serve(self.path_args))
        self.application.open_requests.tasks.add(task)  # what a shutdown waits for; serve() takes it out

    def on_connection_close(self) -> None:
        self.chunks = []  # the client left before its request was complete: nothing to answer


class LeanApplication(tornado.web.Application):
    """An Application that serves a route without its RequestHandler when the handler class names a LeanCall
    subclass as `lean_call` and that class serves the request's method. Every request's body is held to
    `max_body_bytes` (setting), judged on the headers where it can be (handlers.intake)."""

    def __init__(self, *args, max_body_bytes: int = 32 * 1024 * 1024, **settings) -> None:
        super().__init__(*args, **settings)
        self.max_body_bytes = max_body_bytes
        self.open_requests = OpenRequests()  # what a shutdown waits for (aipipe.drain)

    def headers_in(self, request_connection) -> None:
        """Told when a request's headers are in (the serving GatewayHTTPServer replaces this)."""

    def body_in(self, request_connection) -> None:
        """Told when a request's body is in (the serving GatewayHTTPServer replaces this)."""

    def get_handler_delegate(self, request, target_class, target_kwargs=None, path_args=None, path_kwargs=None):
        judged = not getattr(target_class, "guarded", True)  # an error answer made for a request already judged
        if not judged:  # (its connection may be serving the next request by the time the answer is made)
            self.headers_in(request.connection)
        lean = getattr(target_class, "lean_call", None)
        if lean is not None and request.method in lean.SUPPORTED_METHODS and not path_kwargs:
            return _LeanDelegate(self, request, lean, target_class, target_kwargs or {}, path_args or [],
                                 self.max_body_bytes)
        delegate = super().get_handler_delegate(request, target_class, target_kwargs, path_args, path_kwargs)
        if judged:
            return delegate
        intake = Intake(self, request, target_class, target_kwargs or {}, path_args or [], self.max_body_bytes)
        return Guarded(delegate, intake, getattr(target_class, "token_before_body", False))
