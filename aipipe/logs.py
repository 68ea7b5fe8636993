"""Logging for the `aipipe` command: one line per record on standard error, cheap enough for a line per request.

Three costs of the standard set-up are per line and avoidable: formatting the time with strftime, a
write() system call for every line (Python's stderr is line-buffered), and, for the access log, making a
LogRecord and passing it down the handler chain. Here the time text is made once a second; inside the
server's event loop the lines of one loop turn leave in one write at the end of that turn (outside a
running loop, each line is written at once); and `line_writer` formats access-log lines straight into the
handler when nothing else would see their records (that step alone saved 38,000 of the 1.76 million
instructions of a proxied chat call; README, Performance).
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
from collections.abc import Callable

import tornado.web
from tornado.log import app_log, gen_log

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Formatter(logging.Formatter):
    """The standard formatter with the date and time text made once per second."""

    _second = -1
    _text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.stamp(record.created)

    def stamp(self, now: float) -> str:
        """formatTime of a record made at `now` (record.msecs is (created - int(created)) * 1000)."""
        second = int(now)
        if second != self._second:
            self._text, self._second = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second)), second
        return f"{self._text},{int((now - second) * 1000):03d}"


class TurnHandler(logging.StreamHandler):
    """A StreamHandler on a block-buffered stream that is flushed once per event-loop turn.

    `per_turn = False` flushes after every line instead, as a StreamHandler does: for worker processes
    sharing one standard error, where only a write of whole lines of at most 4 KB (PIPE_BUF) is sure not
    to be interleaved with another process's write.
    """

    per_turn = True

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._due: asyncio.AbstractEventLoop | None = None  # the loop a flush is scheduled on
        self._failing = False  # the last write failed (reported once, then dropped until one succeeds)

    def flush(self) -> None:  # StreamHandler.emit calls this after every record
        try:
            loop = asyncio.get_running_loop() if self.per_turn else None
        except RuntimeError:  # not in the loop's thread, or no loop: write now
            loop = None
        if loop is None:
            super().flush()
        elif self._due is not loop:  # (a loop that ended before its flush ran leaves no claim behind)
            self._due = loop
            loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._due = None
        try:
            super().flush()
            self._failing = False
        except Exception:  # stderr closed or disk full: say so once, never fail the loop (or log about it each turn)
            self._report_failure("log lines could not be written")

    def _report_failure(self, what: str) -> None:
        if not self._failing:
            self._failing = True
            self.handleError(logging.makeLogRecord({"msg": what}))

    def write_line(self, level: int, name: str, message: str, now: float | None = None) -> None:
        """Write what a record of logger `name` made at `now` would become, without making the record."""
        with self.lock:
            try:
                stamp = self.formatter.stamp(time.time() if now is None else now)
                self.stream.write(f"{stamp} {logging.getLevelName(level)} {name}: {message}{self.terminator}")
                due = self._due
                if due is None or not due.is_running():  # else the flush due at the end of its turn takes this line
                    self.flush()
            except Exception:  # as StreamHandler.emit: a failed log line never fails the request
                self._report_failure(message)


_installed: TurnHandler | None = None  # the handler setup_logging put on the root logger


def write_each_line() -> None:
    """Flush the installed handler after every line (see TurnHandler.per_turn)."""
    if _installed is not None:
        _installed.per_turn = False


def line_writer(logger: logging.Logger) -> Callable[[int, str], None]:
    """A function that logs `message` at `level` on `logger`, for a line per request.

    When the only place the logger's records would go is the handler setup_logging installed (no other
    handlers or filters on the way, records propagating), lines are formatted straight into that handler;
    otherwise (tests, a program with its own logging set-up) this is logger.log. Decided when called.
    """
    chain, node = [], logger
    while node is not None:
        chain.append(node)
        node = node.parent if node.propagate else None
    root = chain[-1]
    direct = (_installed is not None and root is logging.getLogger() and root.handlers == [_installed]
              and not any(n.filters or (n.handlers and n is not root) for n in chain)
              and not _installed.filters and type(_installed.formatter) is Formatter)
    if not direct:
        return lambda level, message: logger.log(level, "%s", message)
    handler, name = _installed, logger.name

    def write(level: int, message: str) -> None:
        if logger.isEnabledFor(level) and level >= handler.level:
            handler.write_line(level, name, message)
    return write


def log_handler_exception(request, typ, value, tb) -> None:
    """RequestHandler.log_exception for `request`, naming its path without the query string.

    Tornado's own names the whole URI, twice on an uncaught exception; a query can carry an AI Pipe
    token, a provider key (Gemini's ?key=) or a Google sign-in credential (/token?credential=).
    """
    summary = f"{request.method} {request.path} ({request.remote_ip})"
    if isinstance(value, tornado.web.HTTPError):
        if value.log_message:
            gen_log.warning("%d %s: " + value.log_message, value.status_code, summary, *value.args)
    else:
        app_log.error("Uncaught exception %s", summary, exc_info=(typ, value, tb))


# Tornado's "Malformed HTTP message" line quotes the offending header line, and with it a token or key
MALFORMED = "Malformed HTTP message from %s: %s"
# What a credential looks like wherever a library may quote one: a Bearer/Basic value, a JWT (AI Pipe tokens,
# Google credentials), an OpenAI/OpenRouter or Gemini key, or a query argument that carries one.
CREDENTIAL = re.compile(
    r"(?i:\b(?P<keep>(?:bearer|basic)\s+|(?:key|token|credential|aipipe_token|access_token|api_key)=))[^\s'\"&]+"
    r"|eyJ[\w-]+\.[\w-]+\.[\w-]*|\bsk-[\w-]{6,}|\bAIza[\w-]{10,}")
REDACTED = "[redacted]"
# Loggers of code AI Pipe does not write (its own loggers never carry a credential, and the access log's
# shortcut must keep working: see line_writer)
FOREIGN_LOGGERS = ("tornado.general", "tornado.application", "tornado.access", "asyncio")


def redact(text: str) -> str:
    """text with anything shaped like a credential replaced by [redacted]."""
    return CREDENTIAL.sub(lambda m: (m.group("keep") or "") + REDACTED, text)


def malformed_kind(error: object) -> str:
    """Which rule a malformed request broke, without the text it quoted ("Invalid header value")."""
    kind = re.split(r"[:'\"]", str(error), maxsplit=1)[0].strip()
    return kind or type(error).__name__


class RedactCredentials(logging.Filter):
    """Takes tokens and keys out of other libraries' log lines before any handler sees them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == MALFORMED and isinstance(record.args, tuple) and len(record.args) == 2:
            record.args = (record.args[0], malformed_kind(record.args[1]))
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:  # formatters reuse exc_text once it is set
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


REDACTOR = RedactCredentials()


def redact_foreign_loggers() -> None:
    """Put the credential filter on FOREIGN_LOGGERS (once; done when this module is imported, so it holds
    for the server, the tests and any program embedding aipipe, whatever logging set-up they use)."""
    for name in FOREIGN_LOGGERS:
        logging.getLogger(name).addFilter(REDACTOR)


redact_foreign_loggers()


def setup_logging(level: int = logging.INFO) -> None:
    """Send log records to standard error as `time LEVEL logger: message` lines."""
    root = logging.getLogger()
    if root.handlers:  # configured already (a test, or a program embedding aipipe)
        return
    try:
        stream = open(os.dup(sys.stderr.fileno()), "w", buffering=65536, encoding="utf-8",  # noqa: SIM115 (lives as long as the process)
                      errors="backslashreplace")
    except (AttributeError, OSError, ValueError):  # stderr without a file descriptor
        stream = sys.stderr
    global _installed
    handler = _installed = TurnHandler(stream)
    handler.setFormatter(Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    # Skip gathering what the format never shows (source file and line, thread and process), as the
    # logging HOWTO's "Optimization" section describes.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
