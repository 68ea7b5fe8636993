"""What a request may send before it is served, judged on its headers: body size, and a token where one is needed.

Tornado reads a request's whole body before a handler runs. A client without a token could otherwise make
the server hold a large upload in memory only to be told 401. So the size (Content-Length, or the bytes of a
chunked body as they arrive) and, on routes whose handler class sets `token_before_body`, the token are
checked as soon as the headers are in; a refusal is answered at once through the route's own error path
(ApiHandler.write_error) and the rest of the body is read into nothing until the connection closes.
"""
from __future__ import annotations

import functools
from typing import Any

import tornado.web
from tornado import httputil

from ..errors import ApiError

TOO_LARGE = "Request body is larger than this server accepts ({limit} bytes)"


def size_error(headers: httputil.HTTPHeaders, limit: int) -> ApiError | None:
    """413 when the declared Content-Length is over limit, else None (Tornado refuses one that is not a number)."""
    declared = headers.get("Content-Length")
    if declared is None or not declared.isdigit():
        return None
    return ApiError(413, TOO_LARGE.format(limit=limit)) if int(declared) > limit else None


def answer_error(application: tornado.web.Application, request: httputil.HTTPServerRequest,
                 handler_class: type[tornado.web.RequestHandler], kwargs: dict, path_args: list,
                 error: BaseException, early: bool = False) -> None:
    """Answer request with error through an instance of handler_class (its write_error and access log);
    `early`: before its body was read, which is then neither waited for nor parsed."""
    delegate = application.get_handler_delegate(request, failing(handler_class, early), {**kwargs, "error": error},
                                                path_args)
    if early:
        delegate.headers_received(None, request.headers)  # a streaming handler runs on its headers alone
    elif request.body:  # handed on as the connection would (the handler parses a form body as before)
        delegate.data_received(request.body)
    delegate.finish()


@functools.cache
def failing(handler_class: type[tornado.web.RequestHandler], early: bool = False) -> type[tornado.web.RequestHandler]:
    """handler_class, made to fail with a given error: RequestHandler's own error path (log_exception,
    send_error, write_error, the access log) then answers. An `early` one takes its body as a stream, so that
    Tornado does not wait for the body or parse it."""

    class Failing(handler_class):
        lean_call = None
        guarded = False  # its request was already judged

        def initialize(self, error: BaseException, **kwargs: Any) -> None:
            self.lean_error = error
            super().initialize(**kwargs)

        def prepare(self) -> None:
            error, self.lean_error = self.lean_error, None  # not kept: its traceback would hold this handler
            raise error

    Failing.__name__ = Failing.__qualname__ = handler_class.__name__
    return tornado.web.stream_request_body(Failing) if early else Failing


class Intake:
    """The size and token checks of one request, shared by the lean and the RequestHandler delegates."""

    __slots__ = ("application", "request", "handler_class", "kwargs", "path_args", "limit", "received", "refused")

    def __init__(self, application, request, handler_class, kwargs: dict, path_args: list, limit: int) -> None:
        self.application, self.request, self.handler_class = application, request, handler_class
        self.kwargs, self.path_args, self.limit = kwargs, path_args, limit
        self.received = 0
        self.refused = False

    def check_headers(self, token_needed: bool) -> None:
        """Refuse now an over-size body, or a missing or bad token where the route needs one."""
        error = size_error(self.request.headers, self.limit)
        if error is None and token_needed and ("Content-Length" in self.request.headers
                                               or "Transfer-Encoding" in self.request.headers):
            try:
                self.kwargs["gateway"].identify(self.request.headers)  # the handler itself says who else may not
            except ApiError as e:
                error = e
        if error is not None:
            self.refuse(error)

    def count(self, data: bytes) -> bool:
        """Whether data may be kept: False once the body passed the limit (and the refusal is under way)."""
        if self.refused:
            return False
        self.received += len(data)
        if self.received > self.limit:
            self.refuse(ApiError(413, TOO_LARGE.format(limit=self.limit)))
            return False
        return True

    def refuse(self, error: ApiError) -> None:
        """Answer with error now; the connection closes once it is sent (Tornado does not read on)."""
        self.refused = True
        answer_error(self.application, self.request, self.handler_class, self.kwargs, self.path_args, error, early=True)


class Guarded(httputil.HTTPMessageDelegate):
    """A RequestHandler route's delegate, behind the size limit and (where the handler asks) the token check."""

    def __init__(self, inner: httputil.HTTPMessageDelegate, intake: Intake, token_needed: bool) -> None:
        self.inner, self.intake, self.token_needed = inner, intake, token_needed

    def headers_received(self, start_line, headers):
        self.intake.check_headers(self.token_needed)
        return None if self.intake.refused else self.inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes):
        return self.inner.data_received(chunk) if self.intake.count(chunk) else None

    def finish(self) -> None:
        self.intake.application.body_in(self.intake.request.connection)
        if not self.intake.refused:
            self.inner.finish()

    def on_connection_close(self) -> None:
        self.inner.on_connection_close()
