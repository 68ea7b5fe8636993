"""A storage URL that cannot be used at start-up: `aipipe serve` and `aipipe migrate` print one error
line naming the URL with its password masked, and exit non-zero (no traceback, no password)."""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from .conftest import ENV

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "s3cret-pw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _refuse_password(conn: socket.socket) -> None:
    """Speak just enough of the protocol to ask for a password and reject it, as a real server does."""
    while True:  # SSLRequest / GSSENCRequest are answered "N", then the StartupMessage follows
        length, code = struct.unpack("!ii", _read(conn, 8))
        _read(conn, length - 8)
        if code in (80877103, 80877104):
            conn.sendall(b"N")
            continue
        break
    conn.sendall(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
    kind, length = struct.unpack("!ci", _read(conn, 5))
    _read(conn, length - 4)
    fields = b"".join(k + v.encode() + b"\0" for k, v in (
        (b"S", "FATAL"), (b"V", "FATAL"), (b"C", "28P01"), (b"M", 'password authentication failed for user "aipipe"')))
    body = fields + b"\0"
    conn.sendall(b"E" + struct.pack("!i", len(body) + 4) + body)


@pytest.fixture
def password_server():
    """A loopback server that wants a password and refuses every one (our cluster trusts everyone)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                try:
                    _refuse_password(conn)
                except (OSError, ConnectionError, struct.error):
                    pass
    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()


def cases(password_port: int) -> dict[str, tuple[str, str]]:
    """name -> (URL, what the error must mention)."""
    refused = free_port()
    return {
        "wrong password": (f"postgresql://aipipe:{PASSWORD}@127.0.0.1:{password_port}/test", "password authentication failed"),
        "unknown role": (f"postgresql://nosuchrole:{PASSWORD}@127.0.0.1:5432/test", 'role "nosuchrole" does not exist'),
        "unknown database": (f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/nosuchdb_aipipe", "nosuchdb_aipipe"),
        "nothing listening": (f"postgresql://aipipe:{PASSWORD}@127.0.0.1:{refused}/test", "refused"),
        "unknown host": (f"postgresql://aipipe:{PASSWORD}@no-such-host.invalid:5432/test", "gaierror"),
        "malformed port": (f"postgresql://aipipe:{PASSWORD}@127.0.0.1:notaport/test", "notaport"),
        "malformed parameter": (f"postgresql://aipipe:{PASSWORD}@127.0.0.1:5432/test?connect_timeout=soon", "malformed"),
        "unknown scheme": (f"mysql://aipipe:{PASSWORD}@127.0.0.1/test", "must start with"),
    }


NAMES = ["wrong password", "unknown role", "unknown database", "nothing listening", "unknown host",
         "malformed port", "malformed parameter", "unknown scheme"]


def run_cli(tmp_path: Path, command: str, url: str) -> subprocess.CompletedProcess:
    config = tmp_path / "aipipe.toml"
    config.write_text(f'[storage]\nurl = "{url}"\n')
    args = [sys.executable, "-m", "aipipe", command, "--config", str(config), "--env-file", str(tmp_path / ".env")]
    if command == "serve":
        args += ["--host", "127.0.0.1", "--port", str(free_port())]
    return subprocess.run(args, cwd=tmp_path, env={**os.environ, **ENV, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", ["serve", "migrate"])
@pytest.mark.parametrize("name", NAMES)
def test_bad_storage_url_is_one_line_with_the_password_masked(tmp_path, request, password_server, command, name):
    if name.startswith("unknown r") or name == "unknown database":
        if request.config.getoption("--sqlite-only"):
            pytest.skip("needs the test cluster; skipped by --sqlite-only (never in CI)")
    url, mentions = cases(password_server)[name]
    done = run_cli(tmp_path, command, url)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert PASSWORD not in out
    assert "Traceback" not in out, out
    errors = [line for line in done.stderr.splitlines() if "storage" in line and ("ERROR" in line or line.startswith("aipipe:"))]
    assert len(errors) == 1, out
    (line,) = errors
    masked = url.replace(PASSWORD, "***")
    assert masked in line, line
    assert mentions.lower() in line.lower(), line
    others = [line for line in done.stderr.splitlines() if line not in errors and " INFO " not in line]
    assert others == [], out  # nothing else but informational lines


def test_migrate_from_several_processes_at_once_applies_each_migration_once(tmp_path, request):
    import uuid

    import asyncpg

    from aipipe.storage.postgres import MIGRATIONS

    from .pg import _run, fresh_postgres_url

    url = fresh_postgres_url(request, f"t_{uuid.uuid4().hex[:12]}")
    config = tmp_path / "aipipe.toml"
    config.write_text(f'[storage]\nurl = "{url}"\n')
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "aipipe", "migrate", "--config", str(config),
                               "--env-file", str(tmp_path / ".env")], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    assert all("schema is current" in out for out, _ in outs)
    schema = url.rsplit("schema=", 1)[1]

    async def versions():
        conn = await asyncpg.connect(url.split("?")[0])
        try:
            return [r[0] for r in await conn.fetch(f"SELECT version FROM {schema}.schema_version ORDER BY version")]
        finally:
            await conn.close()
    assert _run(versions()) == list(range(1, len(MIGRATIONS) + 1))
