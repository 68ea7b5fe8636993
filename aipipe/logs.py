"""Logging for the `aipipe` command: one line per record on standard error, cheap enough for a line per request.

Two formats, both stamped in UTC (ISO 8601, milliseconds, `Z`) so lines from boxes in other zones sort and
compare: "text", `TIME LEVEL LOGGER: MESSAGE`, and "json", one object per line with `time`, `level`,
`logger`, `message` and whatever structured fields the record carries (the access log's status, path, ...).

Three costs of the standard set-up are per line and avoidable: formatting the time with strftime, a
write() system call for every line (Python's stderr is line-buffered), and, for the access log, making a
LogRecord and passing it down the handler chain. Here the time text is made once a second; inside the
server's event loop the lines of one loop turn leave in one write at the end of that turn (outside a
running loop, each line is written at once); and `line_writer` formats access-log lines straight into the
handler when nothing else would see their records (that step alone saved 38,000 of the 1.76 million
instructions of a proxied chat call; docs/performance.md).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable

import orjson
import tornado.web
from tornado.log import app_log, gen_log

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")


class Formatter(logging.Formatter):
    """The standard formatter stamping UTC ISO 8601 times (2026-12-06T02:21:40.302Z), made once per second."""

    converter = time.gmtime
    # what logging.Formatter.formatTime would make with these, and what stamp() makes faster
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"
    _second = -1
    _text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.stamp(record.created)

    def stamp(self, now: float) -> str:
        """formatTime of a record made at `now` (record.msecs is (created - int(created)) * 1000)."""
        second = int(now)
        if second != self._second:
            self._text, self._second = time.strftime(self.default_time_format, self.converter(second)), second
        return f"{self._text}.{int((now - second) * 1000):03d}Z"

    def line(self, level: int, name: str, message: str, now: float, fields: dict | None) -> str:
        """The line a record of logger `name` made at `now` would become (fields are in the message already)."""
        return f"{self.stamp(now)} {logging.getLevelName(level)} {name}: {message}"


# What every LogRecord has; anything else on a record came from `extra=` and is a structured field.
RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def _dumps(entry: dict) -> str:
    try:
        return orjson.dumps(entry, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError):  # an integer beyond 64 bits, say: the standard library takes it
        return json.dumps(entry, default=str, ensure_ascii=False)


class JsonFormatter(Formatter):
    """One JSON object per record, on one line: a traceback is a field, not more lines."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.stamp(record.created), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        for key, value in record.__dict__.items():
            if key not in RECORD_ATTRIBUTES:
                entry.setdefault(key, value)
        if record.exc_info:
            if not record.exc_text:  # RedactCredentials may have set it, cleaned
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return _dumps(entry)

    def line(self, level: int, name: str, message: str, now: float, fields: dict | None) -> str:
        entry = {"time": self.stamp(now), "level": logging.getLevelName(level), "logger": name, "message": message}
        if fields:
            entry.update(fields)
        return _dumps(entry)


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

    def write_line(self, level: int, name: str, message: str, now: float | None = None,
                   fields: dict | None = None) -> None:
        """Write what a record of logger `name` made at `now` (with `fields` as its extra) would become,
        without making the record."""
        with self.lock:
            try:
                line = self.formatter.line(level, name, message, time.time() if now is None else now, fields)
                self.stream.write(line + self.terminator)
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


def json_lines() -> bool:
    """Whether the handler setup_logging installed writes JSON (see set_format)."""
    return _installed is not None and type(_installed.formatter) is JsonFormatter


def set_format(name: str) -> None:
    """Write "text" or "json" lines from now on (the installed handler only; others keep their formatter)."""
    if name not in FORMATS:
        raise ValueError(f'log format must be one of {", ".join(FORMATS)}, not "{name}"')
    if _installed is not None:
        _installed.setFormatter(JsonFormatter(FORMAT) if name == "json" else Formatter(FORMAT))


def line_writer(logger: logging.Logger) -> Callable[..., None]:
    """A function write(level, message, fields=None) that logs `message` at `level` on `logger`, for a line
    per request; `fields` are its structured form, for JSON lines and for records' `extra`.

    When the only place the logger's records would go is the handler setup_logging installed (no other
    handlers or filters on the way, records propagating), lines are formatted straight into that handler;
    otherwise (tests, a program with its own logging set-up) this is logger.log. Decided when called.
    The function's `wants_fields` says whether fields are used at all: not by text lines written directly,
    whose message says it all, so a caller can skip building them.
    """
    chain, node = [], logger
    while node is not None:
        chain.append(node)
        node = node.parent if node.propagate else None
    root = chain[-1]
    direct = (_installed is not None and root is logging.getLogger() and root.handlers == [_installed]
              and not any(n.filters or (n.handlers and n is not root) for n in chain)
              and not _installed.filters and type(_installed.formatter) in (Formatter, JsonFormatter))
    if not direct:
        def log(level: int, message: str, fields: dict | None = None) -> None:
            logger.log(level, "%s", message, extra=fields)
        log.wants_fields = True
        return log
    handler, name = _installed, logger.name

    def write(level: int, message: str, fields: dict | None = None) -> None:
        if logger.isEnabledFor(level) and level >= handler.level:
            handler.write_line(level, name, message, None, fields)
    write.wants_fields = type(handler.formatter) is JsonFormatter
    return write


def one_line(text) -> str:
    """text as it may stand in a log line: control characters (a newline would forge a line of its own)
    escaped, and at most 200 characters."""
    text = text if isinstance(text, str) else str(text)
    return (text if text.isprintable() else text.encode("unicode_escape").decode("ascii"))[:200]


def usd(cost: float) -> str:
    """A cost as `$0.0000123`: to the nano-dollar, without trailing zeros."""
    return "$" + f"{cost:.9f}".rstrip("0").rstrip(".")


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


def setup_logging(level: int = logging.INFO, log_format: str = "text") -> None:
    """Send log records to standard error as `time LEVEL logger: message` lines, or JSON lines."""
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
    set_format(log_format)
    root.addHandler(handler)
    root.setLevel(level)
    # Skip gathering what the format never shows (source file and line, thread and process), as the
    # logging HOWTO's "Optimization" section describes.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
