"""SIGHUP (and `aipipe reload`) re-read the config without a restart; systemd hears READY, RELOADING, STOPPING."""
from __future__ import annotations

import asyncio
import os
import signal
import socket

import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from .conftest import base_config, token
from .helpers import chat
from .server_process import ServerProcess, write_config


@pytest.fixture
def notify_socket(tmp_path):
    """A datagram socket standing in for systemd's NOTIFY_SOCKET: (path, messages received so far)."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    received: list[str] = []

    def read() -> list[str]:
        while True:
            try:
                received.append(sock.recv(4096).decode())
            except BlockingIOError:
                return received
    yield path, read
    sock.close()


async def post(url: str, email: str, **body) -> tuple[int, bytes]:
    request = HTTPRequest(url + "/openai/v1/chat/completions", method="POST", body=orjson.dumps(chat(**body)),
                          headers={"Authorization": f"Bearer {token(email)}", "Content-Type": "application/json"},
                          request_timeout=60)
    r = await AsyncHTTPClient(force_instance=True).fetch(request, raise_error=False)
    return r.code, r.body


async def until(predicate, seconds: float = 30.0):
    for _ in range(int(seconds / 0.05)):
        found = predicate()
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


@pytest.mark.gen_test(timeout=120)
async def test_sighup_applies_a_new_budget_to_the_next_request_and_leaves_open_streams_alone(
        tmp_path, upstream, notify_socket):
    path, received = notify_socket
    os.environ["NOTIFY_SOCKET"] = path
    try:
        data = base_config(upstream.url, f"sqlite:///{tmp_path}/aipipe.db")
        proc = ServerProcess(str(tmp_path), data)
        proc.start()
    finally:
        del os.environ["NOTIFY_SOCKET"]
    try:
        await proc.ready()
        await until(lambda: "READY=1" in received())
        assert (await post(proc.url, "student@example.com"))[0] == 200
        pid_file = tmp_path / "aipipe.db.pid"
        assert pid_file.read_text().strip() == str(proc.proc.pid)

        upstream.state.event_delay = 0.4  # a stream that is open while the config changes
        open_stream = asyncio.ensure_future(post(proc.url, "streamer@example.com", stream=True))
        await until(lambda: len(upstream.state.requests) == 2)
        data["budget"]["*"] = {"limit": 0, "days": 7}  # nobody may spend any more
        write_config(proc.config_path, data)
        proc.signal(signal.SIGHUP)
        await until(lambda: "config reloaded" in proc.log())
        code, body = await post(proc.url, "student@example.com")
        assert code == 429 and orjson.loads(body)["message"].startswith("Usage $")
        code, body = await open_stream
        assert code == 200 and body.rstrip().endswith(b"data: [DONE]")  # untouched by the reload
        assert any(m.startswith("RELOADING=1\nMONOTONIC_USEC=") for m in received())

        with open(proc.config_path, "w") as f:
            f.write("[budget\nbroken")  # a file that does not load changes nothing
        proc.signal(signal.SIGHUP)
        await until(lambda: "config not reloaded" in proc.log())
        assert (await post(proc.url, "student@example.com"))[0] == 429  # still the reloaded budget

        data["budget"]["*"] = {"limit": 1.0, "days": 7}
        data["server"] = {"port": proc.port + 1}
        write_config(proc.config_path, data)
        proc.signal(signal.SIGHUP)
        await until(lambda: "take effect only after a restart: server.port" in proc.log())
        assert (await post(proc.url, "student@example.com"))[0] == 200  # served on the old port, new budget

        proc.signal(signal.SIGTERM)
        assert await proc.exited() == 0
        assert "STOPPING=1" in received()
        assert not pid_file.exists()
        assert "Traceback" not in proc.log()
    finally:
        proc.kill()


@pytest.mark.gen_test(timeout=120)
async def test_aipipe_reload_signals_the_running_server(tmp_path, upstream):
    import subprocess
    import sys

    data = base_config(upstream.url, f"sqlite:///{tmp_path}/aipipe.db")
    proc = ServerProcess(str(tmp_path), data)
    proc.start()
    try:
        await proc.ready()
        await until(lambda: (tmp_path / "aipipe.db.pid").exists())
        data["budget"]["*"] = {"limit": 0, "days": 7}
        write_config(proc.config_path, data)
        done = subprocess.run([sys.executable, "-m", "aipipe", "reload", "--config", proc.config_path], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        await until(lambda: "config reloaded" in proc.log())
        assert (await post(proc.url, "anyone@example.com"))[0] == 429
    finally:
        proc.kill()


@pytest.mark.gen_test(timeout=120)
async def test_a_key_changed_in_the_env_file_applies_on_reload_though_the_environment_holds_the_old_one(
        tmp_path, upstream):
    data = base_config(upstream.url, f"sqlite:///{tmp_path}/aipipe.db")
    proc = ServerProcess(str(tmp_path), data)  # the environment holds the operator's key, as systemd's EnvironmentFile
    proc.start()                               # would have put it there at start
    try:
        await proc.ready()
        assert (await post(proc.url, "keys@example.com"))[0] == 200
        with open(tmp_path / ".env", "a") as f:
            f.write("OPENAI_API_KEY=sk-rotated-but-wrong\n")
        proc.signal(signal.SIGHUP)
        await until(lambda: "config reloaded" in proc.log())
        code, body = await post(proc.url, "keys@example.com")
        assert code == 502 and orjson.loads(body)["message"] == "provider credentials misconfigured"
        assert upstream.state.last["headers"]["Authorization"] == "Bearer sk-rotated-but-wrong"
        assert "sk-rotated-but-wrong" not in proc.log()
    finally:
        proc.kill()


@pytest.mark.gen_test(timeout=120)
async def test_a_reload_that_would_empty_the_secret_is_refused_and_tokens_keep_working(tmp_path, upstream):
    data = base_config(upstream.url, f"sqlite:///{tmp_path}/aipipe.db")
    proc = ServerProcess(str(tmp_path), data)
    proc.start()
    try:
        await proc.ready()
        with open(tmp_path / ".env", "a") as f:
            f.write("AIPIPE_SECRET=\n")
        proc.signal(signal.SIGHUP)
        await until(lambda: "config not reloaded" in proc.log())
        assert "AIPIPE_SECRET is missing or shorter than" in proc.log()
        assert (await post(proc.url, "secret@example.com"))[0] == 200
    finally:
        proc.kill()
