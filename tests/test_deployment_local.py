"""The deployment checks (tests/test_deployment.py), run against a real local server as an operator would."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from .conftest import base_config, token
from .server_process import REPO, ServerProcess


@pytest.mark.gen_test(timeout=180)
async def test_the_deployment_checks_pass_against_a_running_server(tmp_path, upstream):
    data = base_config(upstream.url, f"sqlite:///{tmp_path}/aipipe.db")
    proc = ServerProcess(str(tmp_path), data)
    proc.start()
    try:
        await proc.ready()
        env = {**os.environ, "AIPIPE_BASE_URL": proc.url, "AIPIPE_ADMIN_TOKEN": token("admin@example.com"),
               "AIPIPE_CHECK_MODEL": "gpt-4o-mini"}
        run = subprocess.Popen([sys.executable, "-m", "pytest", "-m", "deployment", "-q", "-p", "no:cacheprovider",
                                os.path.join(REPO, "tests", "test_deployment.py")], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(1500):  # the fake provider answers from this test's loop: keep it turning (bounded)
            if run.poll() is not None:
                break
            await asyncio.sleep(0.1)
        out = run.communicate(timeout=30)[0]
        assert run.returncode == 0, out
        assert "8 passed" in out, out
        proc.signal(signal.SIGTERM)
        assert await proc.exited() == 0
        emails = {row["email"] for row in proc.ledger()}
        assert emails == {"aipipe-deployment-check@example.invalid"}  # no one else's data touched
    finally:
        proc.kill()
