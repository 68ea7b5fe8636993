"""The `aipipe` command's logging: the same lines as the standard formatter, fewer writes, the access
log's shortcut taken only when nothing else would see its records, UTC times, and JSON lines that parse one by one."""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import signal
import socket
import time
from datetime import datetime, timezone

import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.iostream import IOStream
from tornado.log import access_log, app_log, gen_log

from aipipe import logs

from .conftest import base_config, token
from .helpers import chat
from .server_process import ServerProcess

UTC_STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


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


class StandardUTC(logging.Formatter):
    """logging's own Formatter, told to stamp UTC ISO 8601 times (what logs.Formatter makes faster)."""

    converter = time.gmtime
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"


def standard_line(level: int, name: str, message: str, created: float) -> str:
    """What logging's own Formatter makes of such a record."""
    record = logging.LogRecord(name, level, __file__, 1, message, None, None)
    record.created, record.msecs = created, (created - int(created)) * 1000
    return StandardUTC(logs.FORMAT).format(record) + "\n"


@pytest.mark.parametrize("created", [1764470400.0, 1764470400.999, 1764473999.0405])
def test_shortcut_writes_the_line_the_standard_formatter_would(installed, created):
    handler, stream = installed
    handler.write_line(logging.WARNING, "aipipe.access", "404 GET /nosuch 0.3ms", now=created)
    assert stream.getvalue() == standard_line(logging.WARNING, "aipipe.access", "404 GET /nosuch 0.3ms", created)


def test_formatted_records_match_the_standard_formatter():
    record = logging.LogRecord("aipipe", logging.INFO, __file__, 1, "listening on %s", ("x",), None)
    for created in (1764470400.25, 1764470400.5, 1764470401.0):  # the cached second changes in between
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert logs.Formatter(logs.FORMAT).format(record) == StandardUTC(logs.FORMAT).format(record)


def test_times_are_utc_iso_8601_with_zone_whatever_the_local_zone(monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        record = logging.LogRecord("aipipe", logging.INFO, __file__, 1, "hello", None, None)
        record.created, record.msecs = 1796523700.302, 302.0  # 2026-12-06T02:21:40.302Z
        line = logs.Formatter(logs.FORMAT).format(record)
        assert line == "2026-12-06T02:21:40.302Z INFO aipipe: hello"
        stamp = orjson.loads(logs.JsonFormatter(logs.FORMAT).format(record))["time"]
        assert datetime.fromisoformat(stamp.replace("Z", "+00:00")) == datetime.fromtimestamp(1796523700.302, timezone.utc)
    finally:
        monkeypatch.undo()
        time.tzset()


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
    assert [line.split(" ", 1)[1] for line in lines] == [
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


def json_installed(monkeypatch) -> tuple[logs.TurnHandler, CountingStream]:
    stream = CountingStream()
    handler = logs.TurnHandler(stream)
    handler.setFormatter(logs.JsonFormatter(logs.FORMAT))
    monkeypatch.setattr(logs, "_installed", handler)
    return handler, stream


def test_json_records_are_one_object_per_line_with_their_fields_and_traceback(monkeypatch):
    handler, stream = json_installed(monkeypatch)
    log = logging.getLogger("aipipe.test.json")
    with sole_root_handler(handler):
        log.info("listening on %s", "http://127.0.0.1:8787", extra={"port": 8787, "email": "pat@example.com"})
        try:
            raise ValueError("two\nlines")
        except ValueError:
            log.error("it failed:\nbadly", exc_info=True)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert UTC_STAMP.fullmatch(first["time"]) and first["level"] == "INFO" and first["logger"] == "aipipe.test.json"
    assert first["message"] == "listening on http://127.0.0.1:8787"
    assert first["port"] == 8787 and first["email"] == "pat@example.com"
    assert second["message"] == "it failed:\nbadly" and "ValueError: two\nlines" in second["exception"]


def test_json_access_lines_take_the_shortcut_with_their_fields(monkeypatch):
    handler, stream = json_installed(monkeypatch)
    made = []
    factory = logging.getLogRecordFactory()
    with sole_root_handler(handler):
        write = logs.line_writer(logging.getLogger("aipipe.access"))
        logging.setLogRecordFactory(lambda *a, **k: made.append(a) or factory(*a, **k))
        try:
            write(logging.WARNING, "429 POST /openai/v1/chat/completions 0.5ms 127.0.0.1",
                  {"status": 429, "path": "/openai/v1/chat/completions", "cost": 0.0})
        finally:
            logging.setLogRecordFactory(factory)
    assert write.wants_fields and made == []
    entry = json.loads(stream.getvalue())
    assert entry["level"] == "WARNING" and entry["logger"] == "aipipe.access" and UTC_STAMP.fullmatch(entry["time"])
    assert entry["status"] == 429 and entry["path"] == "/openai/v1/chat/completions" and entry["cost"] == 0.0


def test_text_shortcut_needs_no_fields_and_other_listeners_get_them_as_record_attributes(installed):
    handler, _ = installed
    with sole_root_handler(handler):
        assert logs.line_writer(logging.getLogger("aipipe.access")).wants_fields is False
    records = []
    listener = logging.Handler()
    listener.emit = records.append
    with sole_root_handler(handler, [listener]):
        write = logs.line_writer(logging.getLogger("aipipe.access"))
        write(logging.INFO, "200 GET /usage 0.4ms 127.0.0.1", {"status": 200, "client": "127.0.0.1"})
    assert write.wants_fields and records[0].status == 200 and records[0].client == "127.0.0.1"


def test_a_value_from_the_request_cannot_forge_a_line():
    assert logs.one_line("gpt-4o\n2026-12-06T02:21:40.302Z INFO aipipe: forged") == \
        "gpt-4o\\n2026-12-06T02:21:40.302Z INFO aipipe: forged"
    assert logs.one_line("x" * 500) == "x" * 200
    assert logs.usd(0.0000123) == "$0.0000123" and logs.usd(0.0) == "$0" and logs.usd(2.5) == "$2.5"


@pytest.mark.gen_test
async def test_access_record_names_caller_provider_model_and_cost(call, caplog):
    caplog.set_level(logging.INFO, logger="aipipe.access")
    r = await call("/openai/v1/chat/completions", "POST", json=chat(), token=token("alice@example.com"))
    assert r.code == 200
    access = [rec for rec in caplog.records if rec.name == "aipipe.access"]
    assert len(access) == 1
    rec = access[0]
    assert re.fullmatch(r"200 POST /openai/v1/chat/completions \d+\.\dms 127\.0\.0\.1 alice@example\.com openai "
                        r"gpt-4o-mini \$0\.\d+", rec.getMessage())
    assert (rec.status, rec.method, rec.client, rec.email, rec.provider, rec.model) == (
        200, "POST", "127.0.0.1", "alice@example.com", "openai", "gpt-4o-mini")
    assert rec.cost > 0


@pytest.mark.gen_test(timeout=120)
async def test_json_log_of_a_real_server_parses_line_by_line_and_never_holds_a_token(tmp_path, upstream):
    data = base_config(upstream.url, f"sqlite:///{tmp_path}/aipipe.db")
    data["server"] = {"log_format": "json"}
    server = ServerProcess(str(tmp_path), data)
    secret = token("alice@example.com")
    try:
        server.start()
        await server.ready()
        client = AsyncHTTPClient(force_instance=True)
        chat_call = HTTPRequest(server.url + "/openai/v1/chat/completions", method="POST", body=orjson.dumps(chat()),
                                headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"})
        assert (await client.fetch(chat_call, raise_error=False)).code == 200
        usage = HTTPRequest(f"{server.url}/usage?token={secret}&key={secret}", headers={"Authorization": f"Bearer {secret}"})
        assert (await client.fetch(usage, raise_error=False)).code == 200
        server.signal(signal.SIGTERM)
        assert await server.exited() == 0
    finally:
        server.kill()
    text = server.log()
    assert secret not in text and secret.split(".")[1] not in text
    entries = [json.loads(line) for line in text.splitlines()]  # every line on its own
    for entry in entries:
        assert UTC_STAMP.fullmatch(entry["time"]) and {"level", "logger", "message"} <= entry.keys()
    access = {e["path"]: e for e in entries if e["logger"] == "aipipe.access"}
    called = access["/openai/v1/chat/completions"]
    assert (called["status"], called["method"], called["client"], called["email"], called["provider"], called["model"]) == (
        200, "POST", "127.0.0.1", "alice@example.com", "openai", "gpt-4o-mini")
    assert called["cost"] > 0 and called["duration_ms"] >= 0
    assert access["/usage"]["status"] == 200 and access["/usage"]["level"] == "INFO"
    assert any(e["message"] == "stopped" or "shutting down" in e["message"] for e in entries)
