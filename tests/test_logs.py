"""The `aipipe` command's logging: the same lines as the standard formatter, fewer writes, and the access
log's shortcut taken only when nothing else would see its records."""
from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import socket

import pytest
from tornado.iostream import IOStream
from tornado.log import access_log, app_log, gen_log

from aipipe import logs

from .conftest import token


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


@pytest.fixture
def installed(monkeypatch):
    """The handler setup_logging installs, writing to a CountingStream."""
    stream = CountingStream()
    handler = logs.TurnHandler(stream)
    handler.setFormatter(logs.Formatter(logs.FORMAT))
    monkeypatch.setattr(logs, "_installed", handler)
    return handler, stream


@contextlib.contextmanager
def sole_root_handler(handler, extra=()):
    """The root logger with only `handler` (and `extra`) for a while: pytest's own capture handlers step aside."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = [handler, *extra]
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.handlers, root.level = saved


def standard_line(level: int, name: str, message: str, created: float) -> str:
    """What logging's own Formatter makes of such a record."""
    record = logging.LogRecord(name, level, __file__, 1, message, None, None)
    record.created, record.msecs = created, (created - int(created)) * 1000
    return logging.Formatter(logs.FORMAT).format(record) + "\n"


@pytest.mark.parametrize("created", [1764470400.0, 1764470400.999, 1764473999.0405])
def test_shortcut_writes_the_line_the_standard_formatter_would(installed, created):
    handler, stream = installed
    handler.write_line(logging.WARNING, "aipipe.access", "404 GET /nosuch 0.3ms", now=created)
    assert stream.getvalue() == standard_line(logging.WARNING, "aipipe.access", "404 GET /nosuch 0.3ms", created)


def test_formatted_records_match_the_standard_formatter():
    record = logging.LogRecord("aipipe", logging.INFO, __file__, 1, "listening on %s", ("x",), None)
    for created in (1764470400.25, 1764470400.5, 1764470401.0):  # the cached second changes in between
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert logs.Formatter(logs.FORMAT).format(record) == logging.Formatter(logs.FORMAT).format(record)


def test_lines_of_one_loop_turn_leave_in_one_flush(installed):
    handler, stream = installed
    log = logging.getLogger("aipipe.test.turns")

    async def main():
        for i in range(5):
            log.info("line %d", i)
        within = stream.flushes
        await asyncio.sleep(0)  # the end of the turn
        return within

    with sole_root_handler(handler):
        assert asyncio.run(main()) == 0
        assert stream.flushes == 1 and stream.getvalue().count("\n") == 5
        log.info("outside a loop")  # written at once
        assert stream.flushes == 2 and stream.getvalue().endswith("aipipe.test.turns: outside a loop\n")


def test_shortcut_lines_of_one_turn_leave_together_and_a_dead_loop_holds_none_back(installed):
    handler, stream = installed

    async def main():
        handler.flush()  # a record's flush: the loop's end-of-turn flush is now due
        for i in range(3):
            handler.write_line(logging.INFO, "aipipe.access", f"200 GET /usage {i}.0ms")
        within = stream.flushes
        await asyncio.sleep(0)
        return within

    assert asyncio.run(main()) == 0 and stream.flushes == 1 and stream.getvalue().count("\n") == 3
    ended = asyncio.new_event_loop()  # a loop that closed before the flush it was due to run
    ended.call_soon(handler._flush_now)
    handler._due = ended
    ended.close()
    handler.write_line(logging.INFO, "aipipe.access", "200 GET /usage 9.0ms")
    assert stream.flushes == 2 and stream.getvalue().endswith("200 GET /usage 9.0ms\n")


def test_access_lines_take_the_shortcut_and_respect_levels(installed, monkeypatch):
    handler, stream = installed
    made = []
    factory = logging.getLogRecordFactory()
    access = logging.getLogger("aipipe.access")
    with sole_root_handler(handler):
        write = logs.line_writer(access)
        logging.setLogRecordFactory(lambda *a, **k: made.append(a) or factory(*a, **k))
        try:
            write(logging.INFO, "200 POST /openai/v1/chat/completions 1.2ms")
            access.setLevel(logging.WARNING)
            write(logging.INFO, "200 GET /usage 0.4ms")
            write(logging.WARNING, "429 POST /openai/v1/chat/completions 0.5ms")
        finally:
            logging.setLogRecordFactory(factory)
            access.setLevel(logging.NOTSET)
    lines = stream.getvalue().splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == [
        "INFO aipipe.access: 200 POST /openai/v1/chat/completions 1.2ms",
        "WARNING aipipe.access: 429 POST /openai/v1/chat/completions 0.5ms"]
    assert made == []  # no LogRecord was made


def test_access_lines_go_through_logging_when_other_handlers_listen(installed):
    handler, stream = installed
    records = []
    listener = logging.Handler()
    listener.emit = records.append  # another handler on the root: the shortcut would bypass it
    with sole_root_handler(handler, [listener]):
        write = logs.line_writer(logging.getLogger("aipipe.access"))
        write(logging.INFO, "200 GET /usage 0.4ms")
    assert [r.getMessage() for r in records] == ["200 GET /usage 0.4ms"]
    assert stream.getvalue().endswith(" INFO aipipe.access: 200 GET /usage 0.4ms\n")


class BrokenStream(io.StringIO):
    """Standard error whose reader went away: every flush fails."""

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_failing_stderr_is_reported_once_and_never_fails_the_loop_or_a_request(monkeypatch):
    handler = logs.TurnHandler(BrokenStream())
    handler.setFormatter(logs.Formatter(logs.FORMAT))
    reports = []
    monkeypatch.setattr(handler, "handleError", reports.append)
    log = logging.getLogger("aipipe.test.broken")

    async def main():
        loop = asyncio.get_running_loop()
        errors = []
        loop.set_exception_handler(lambda loop, context: errors.append(context))
        with sole_root_handler(handler):
            for i in range(3):
                handler.write_line(logging.INFO, "aipipe.access", f"200 GET /usage {i}ms")  # does not raise
                log.warning("something %d", i)
                await asyncio.sleep(0)
            flushes_before = handler._due
            await asyncio.sleep(0.05)  # idle: nothing keeps flushing (and failing) turn after turn
        return errors, flushes_before

    errors, due = asyncio.run(main())
    assert errors == [] and due is None
    assert len(reports) == 1  # said once, not once per line or per turn


def test_workers_sharing_stderr_write_each_line_at_once(installed):
    handler, stream = installed
    handler.per_turn = False  # what `--processes N` sets before forking

    async def main():
        handler.write_line(logging.INFO, "aipipe.access", "200 GET /usage 0.4ms")
        return stream.flushes

    assert asyncio.run(main()) == 1


SECRET_TOKEN = token("leak@example.com")


@pytest.mark.gen_test
@pytest.mark.parametrize("header, secret", [
    (b"Authorization: Bearer %s\x01", SECRET_TOKEN),  # a control character after the token
    (b"Authorization: Bearer %s\rX-After: 1", SECRET_TOKEN),  # a bare CR
    (b"X-Goog-Api-Key: %s\x7f", b"plainsecret42"),  # no credential shape: only the rule broken is named
    (b"Authorization Bearer %s: x", b"plainsecret42"),  # an invalid header name quoting it
    (b"Host: %s\x01", b"plainsecret42"),
])
async def test_malformed_request_never_logs_its_credential(http_server, http_port, caplog, header, secret):
    secret = secret.encode() if isinstance(secret, str) else secret
    caplog.set_level(logging.DEBUG)
    stream = IOStream(socket.socket())
    await stream.connect(("127.0.0.1", http_port))
    await stream.write(b"GET /usage HTTP/1.1\r\nHost: x\r\n" + header % secret + b"\r\n\r\n")
    answer = await stream.read_until_close()
    assert answer.startswith(b"HTTP/1.1 400")
    lines = [r.getMessage() for r in caplog.records] + [caplog.text]
    assert any(line.startswith("Malformed HTTP message from ") for line in lines)
    assert not any(secret.decode() in line for line in lines)
    assert not any(SECRET_TOKEN[:20] in line for line in lines)


def test_tornado_loggers_lose_credentials_in_messages_and_tracebacks(caplog):
    caplog.set_level(logging.DEBUG)
    try:
        raise ValueError(f"Unsafe header value 'Bearer {SECRET_TOKEN}'")
    except ValueError:
        app_log.error("Uncaught exception GET /gemini/v1?key=AIzaSyTest0123456789 (%s)", "127.0.0.1", exc_info=True)
    access_log.info("%d %s", 200, "GET /token?credential=google.jwt.credential&x=1")
    gen_log.warning("%d %s: %s", 400, "GET /x", "sk-or-test-operator")
    text = caplog.text
    for secret in (SECRET_TOKEN, "AIzaSyTest0123456789", "google.jwt.credential", "sk-or-test-operator"):
        assert secret not in text
    assert "Bearer [redacted]" in text and "key=[redacted]" in text and "credential=[redacted]&x=1" in text
    assert "ValueError: Unsafe header value" in text  # the traceback itself is kept
