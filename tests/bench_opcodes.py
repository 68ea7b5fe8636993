"""`python -m tests.bench_opcodes [--kind json|sse] [--requests 1600] [--top 40]`: Python bytecodes per call, per function.

Runs the gateway (SQLite in a temp folder) and the bench passthrough in turn with a tracer that counts
every bytecode each function executes (`sys.settrace` opcode events), loads each with `--requests`
calls from 8 clients after a warm-up, and prints the functions whose count per call differs most
between the two, and the totals. Instruction counts (`tests.bench_instructions`) say how much the
gateway adds; this says where, down to the function, which sampling profilers cannot at a few
microseconds per call. Counts repeat exactly for the same code and load. Tracing makes the servers some
fifty times slower, so the load is small; C functions (Tornado's and aiohttp's C parts, orjson, SQLite)
are not counted, only the Python code that calls them.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
import tempfile
import time

from . import bench_client as load
from .bench import CHAT, STREAM
from .bench_procs import ROOT, counted_server, free_port, spawn, start_fake_upstream, stop_all, tokens, wait_http

CLIENTS = 8


def serve_traced(out: str, argv: list[str]) -> None:
    """In the server process: count opcodes per function while running `python -m <argv>`.

    SIGUSR1 zeroes the counts (after the warm-up); SIGUSR2 writes them to `out` as JSON and stops counting.
    """
    import runpy
    import threading

    counts: collections.Counter = collections.Counter()

    def tracer(frame, event, arg):
        if event == "opcode":
            code = frame.f_code
            counts[(code.co_filename, code.co_firstlineno, code.co_name)] += 1
        elif event == "call":
            frame.f_trace_opcodes, frame.f_trace_lines = True, False
        return tracer

    def dump(*_) -> None:
        sys.settrace(None)
        threading.settrace(None)
        with open(out, "w") as f:
            json.dump([[*key, n] for key, n in counts.items()], f)

    signal.signal(signal.SIGUSR1, lambda *_: counts.clear())
    signal.signal(signal.SIGUSR2, dump)
    sys.argv = argv
    threading.settrace(tracer)
    sys.settrace(tracer)
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


def count(arm: str, kind: str, requests: int, work: str, upstream_port: int) -> dict[str, float]:
    """Opcodes per answered call, by "file:line:function", for one server."""
    folder = tempfile.mkdtemp(dir=work, prefix=arm + "-")
    port, out = free_port(), os.path.join(folder, "opcodes.json")
    argv, path, cwd, env = counted_server(arm, folder, port, upstream_port)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")  # for `-c "from tests.bench_opcodes ..."`
    code = f"from tests.bench_opcodes import serve_traced; serve_traced({out!r}, {argv!r})"
    log = os.path.join(folder, "server.log")
    proc = spawn([sys.executable, "-c", code], log, None, env=env, cwd=cwd)
    try:
        wait_http(port, "/", proc, 120, log)
        body, toks = (CHAT if kind == "json" else STREAM), tokens()
        # warm-up: every token verified once (client i uses tokens i, i+1, ...), connections open
        load.run_load(port, path, body, toks, CLIENTS, 300.0, max_requests=len(toks))
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        result = load.run_load(port, path, body, toks, CLIENTS, 900.0, max_requests=max(1, requests // CLIENTS))
        proc.send_signal(signal.SIGUSR2)
        for _ in range(300):  # bounded: 30 s
            if os.path.exists(out) and os.path.getsize(out) > 0:
                break
            time.sleep(0.1)
        time.sleep(0.5)  # let the dump finish
        with open(out) as f:
            rows = json.load(f)
    finally:
        stop_all()
    calls = max(1, result["ok"])
    per_call: dict[str, float] = collections.defaultdict(float)
    for filename, line, name, n in rows:
        short = filename.split("site-packages/")[-1].removeprefix(ROOT + os.sep)
        per_call[f"{short}:{line}:{name}"] += n / calls
    return per_call


def main(argv=None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(prog="python -m tests.bench_opcodes", description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=["json", "sse"], default="json")
    p.add_argument("--requests", type=int, default=1600, help="calls counted per server (8 clients)")
    p.add_argument("--top", type=int, default=40, help="functions shown")
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="aipipe-opcodes-")
    results = {}
    for arm in ("gateway", "passthrough"):  # one server at a time, each with a fresh fake upstream
        upstream_port = start_fake_upstream(work, f"upstream-{arm}")
        results[arm] = count(arm, args.kind, max(CLIENTS, min(args.requests, 20000)), work, upstream_port)
    gateway, passthrough = results["gateway"], results["passthrough"]
    print(f"opcodes per call ({args.kind}): gateway {sum(gateway.values()):,.0f}, passthrough {sum(passthrough.values()):,.0f}")
    print("| gateway - passthrough | gateway | passthrough | function |\n|---|---|---|---|")
    diff = sorted(set(gateway) | set(passthrough), key=lambda k: passthrough.get(k, 0) - gateway.get(k, 0))
    for key in diff[:args.top]:
        g, b = gateway.get(key, 0.0), passthrough.get(key, 0.0)
        print(f"| {g - b:+,.1f} | {g:,.1f} | {b:,.1f} | {key} |")
    return results


if __name__ == "__main__":
    main()
