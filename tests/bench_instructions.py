"""`python -m tests.bench_instructions [--kind json|sse] [--requests 400] [--alt-tree DIR]`: instructions per call.

Runs each server under valgrind's callgrind, which counts the instructions it executes (all threads,
user space) instead of timing them: the count for the same code and load repeats to about 0.1% however
busy the machine is, so changes of a percent or two can be told apart where req/s and CPU time, which
drift by tens of percent on a shared machine, cannot. Counting starts after a warm-up and stops after
`--requests` calls from 8 clients (tokens in rotation), each server in turn: the gateway (SQLite in a
temp folder), the bench passthrough, and with `--alt-tree` a gateway importing `aipipe` from DIR.

What the count leaves out: time in the kernel (system calls, the network), and cache misses. One
artefact: valgrind counts each byte of a `rep stosb` as an instruction, so the 64 KB buffer Tornado
zeroes before each socket read shows up as about 65,000 "instructions" per read in every server.
Needs valgrind (`apt-get install valgrind`); a run takes about half a minute per server.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

from . import bench_client as load
from .bench import CHAT, STREAM
from .bench_procs import counted_server, free_port, spawn, start_fake_upstream, stop_all, tokens, wait_http

CLIENTS = 8


def count(arm: str, kind: str, requests: int, work: str, upstream_port: int, alt_tree: str | None = None) -> dict:
    """Instructions per answered call for one server under callgrind."""
    folder = tempfile.mkdtemp(dir=work, prefix=arm + "-")
    port = free_port()
    argv, path, cwd, env = counted_server("passthrough" if arm == "passthrough" else "gateway", folder, port, upstream_port)
    cmd = ["-m", *argv]
    if alt_tree:
        env["PYTHONPATH"] = alt_tree
    out, log = os.path.join(folder, "callgrind.out"), os.path.join(folder, "server.log")
    proc = spawn(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, *cmd], log, None,
                 env=env, cwd=cwd)
    try:
        wait_http(port, "/", proc, 300, log)
        body, toks = (CHAT if kind == "json" else STREAM), tokens()
        # warm-up, not counted: every token verified once (client i uses tokens i, i+1, ...), connections open
        load.run_load(port, path, body, toks, CLIENTS, 120.0, max_requests=len(toks))
        subprocess.run(["callgrind_control", "--zero", str(proc.pid)], capture_output=True, timeout=60, check=True)
        result = load.run_load(port, path, body, toks, CLIENTS, 600.0, max_requests=max(1, requests // CLIENTS))
        subprocess.run(["callgrind_control", "--dump", str(proc.pid)], capture_output=True, timeout=60, check=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    dump = next((d for d in sorted(glob.glob(out + ".*")) if d.endswith(".1")), None)
    if dump is None:
        raise RuntimeError(f"callgrind wrote no dump for {arm}")
    with open(dump) as f:
        total = int(re.search(r"^(?:summary|totals): (\d+)", f.read(), re.MULTILINE).group(1))
    return {"arm": arm, "ok": result["ok"], "errors": result["errors"], "per_call": total / max(1, result["ok"])}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m tests.bench_instructions", description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=["json", "sse"], default="json")
    p.add_argument("--requests", type=int, default=400, help="calls counted per server (8 clients)")
    p.add_argument("--alt-tree", metavar="DIR", help="also count a gateway importing aipipe from DIR (an edited copy)")
    args = p.parse_args(argv)
    if not shutil.which("valgrind"):
        raise SystemExit("bench_instructions: valgrind is not installed (apt-get install valgrind)")
    args.requests = max(CLIENTS, min(args.requests, 5000))
    work = tempfile.mkdtemp(prefix="aipipe-instructions-")
    try:
        upstream_port = start_fake_upstream(work)
        arms = ["gateway", "passthrough"] + (["gateway-alt"] if args.alt_tree else [])
        rows = [count(arm, args.kind, args.requests, work, upstream_port, args.alt_tree if arm == "gateway-alt" else None)
                for arm in arms]
    finally:
        stop_all()
        shutil.rmtree(work, ignore_errors=True)
    base = next(r for r in rows if r["arm"] == "passthrough")["per_call"]
    print(f"| arm ({args.kind}) | calls | errors | instructions per call | x passthrough |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['ok']} | {r['errors']} | {r['per_call']:,.0f} | {base / r['per_call']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
