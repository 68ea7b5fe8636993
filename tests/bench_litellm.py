"""`--vs litellm`: LiteLLM's proxy from PyPI in its own venv (.bench/litellm-venv), one worker, no database.

Installed on first use with `pip install 'litellm[proxy]'`; started against the same fake upstream.
"""
from __future__ import annotations

import os
import subprocess
import sys

from .bench_procs import LITELLM_KEY, OPERATOR_KEY, ROOT, free_port, spawn, wait_http

VENV = os.path.join(ROOT, ".bench", "litellm-venv")
CONFIG = """model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: http://127.0.0.1:{upstream}/v1
      api_key: {key}
general_settings:
  master_key: {master}
litellm_settings:
  telemetry: false
"""


class LiteLLMUnavailable(RuntimeError):
    """LiteLLM could not be installed or started; the message says why."""


def litellm_bin() -> str:
    """The venv's `litellm`, installing it first if needed."""
    exe = os.path.join(VENV, "bin", "litellm")
    if os.path.exists(exe):
        return exe
    print(f"bench: installing litellm[proxy] into {VENV} (once)", file=sys.stderr)
    try:
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True, timeout=300)
        subprocess.run([os.path.join(VENV, "bin", "pip"), "install", "-q", "litellm[proxy]"], check=True, timeout=1200)
    except (subprocess.SubprocessError, OSError) as e:
        raise LiteLLMUnavailable(f"could not install litellm[proxy] from PyPI into {VENV}: {e}") from None
    if not os.path.exists(exe):
        raise LiteLLMUnavailable(f"pip finished but {exe} is missing")
    return exe


class LiteLLM:
    """A running LiteLLM proxy: `litellm --port P --config cfg.yaml --num_workers 1`."""

    def __init__(self, workdir: str, upstream_port: int, cpus: str | None):
        exe = litellm_bin()
        self.dir = os.path.join(workdir, "litellm")
        os.makedirs(self.dir, exist_ok=True)
        config = os.path.join(self.dir, "config.yaml")
        with open(config, "w") as f:
            f.write(CONFIG.format(upstream=upstream_port, key=OPERATOR_KEY, master=LITELLM_KEY))
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "VIRTUAL_ENV", "PYTHONPATH")}
        env.update(LITELLM_LOG="ERROR", LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_MASTER_KEY=LITELLM_KEY,
                   NO_DOCS="True", DISABLE_ADMIN_UI="True", LITELLM_TELEMETRY="False")
        self.log = os.path.join(self.dir, "server.log")
        self.proc = spawn([exe, "--host", "127.0.0.1", "--port", str(self.port), "--config", config, "--num_workers", "1"],
                          self.log, cpus, env=env, cwd=self.dir)
        try:
            wait_http(self.port, "/health/liveliness", self.proc, 120, self.log)
        except RuntimeError as e:
            raise LiteLLMUnavailable(str(e)) from None
