"""A real `aipipe serve` process for tests that need one (signals, exit codes, what reaches its log)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys

from .conftest import ENV

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toml_value(value) -> str:
    """A TOML literal for a str, bool, number, list of those, or a dict (as an inline table)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def write_config(path: str, data: dict) -> None:
    """data (sections of scalars, or of tables such as [budget]) as a TOML file."""
    lines = []
    for section, body in data.items():
        if section == "providers":
            for name, values in body.items():
                lines.append(f"[providers.{name}]")
                lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
            continue
        lines.append(f"[{section}]")
        lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in body.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`aipipe serve` on a free loopback port, in folder, with config data; its output goes to a log file."""

    def __init__(self, folder: str, data: dict) -> None:
        self.folder, self.port = folder, free_port()
        self.config_path = os.path.join(folder, "aipipe.toml")
        write_config(self.config_path, data)
        self.log_path = os.path.join(folder, "server.log")
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, **ENV, "PYTHONPATH": REPO}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "aipipe", "serve", "--config", self.config_path, "--host", "127.0.0.1",
                 "--port", str(self.port), "--env-file", os.path.join(self.folder, ".env")],
                cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT)

    async def ready(self, seconds: float = 30.0) -> None:
        """Wait until the server answers a request (bounded)."""
        for _ in range(int(seconds / 0.05)):
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answered = await reader.read(12)
                writer.close()
                if answered.startswith(b"HTTP/1.1"):
                    return
            except OSError:
                pass
            await asyncio.sleep(0.05)
        raise AssertionError(f"server did not come up:\n{self.log()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    async def exited(self, seconds: float = 60.0) -> int:
        """Its exit code, waiting for it without blocking the loop (bounded)."""
        for _ in range(int(seconds / 0.05)):
            if self.proc.poll() is not None:
                return self.proc.returncode
            await asyncio.sleep(0.05)
        raise AssertionError(f"server still running after {seconds} s:\n{self.log()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def ledger(self, db: str = "aipipe.db") -> list[dict]:
        """The ledger rows of its SQLite file (read after it stopped)."""
        con = sqlite3.connect(os.path.join(self.folder, db))
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute("SELECT * FROM ledger ORDER BY ts")]
        finally:
            con.close()
