"""`python -m tests.bench_profile [--kind json|sse] [--concurrency 32]`: where the gateway's time goes under load.

Starts the fake upstream and the gateway as the benchmark does, loads it, and samples it with py-spy
(`pip install py-spy`), then prints the functions with the most samples, by self time and by total time.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading

from . import bench_client as load
from .bench import CHAT, STREAM
from .bench_procs import Gateway, free_port, spawn, stop_all, tokens, wait_http

LINE = re.compile(r":\d+\)$")  # "f (file.py:12)" -> "f (file.py)": count functions, not lines


def collapse(path: str, thread_filter: str = "") -> tuple[collections.Counter, collections.Counter, int]:
    """Self and total sample counts per function from py-spy's collapsed (raw) output."""
    self_count, total_count, samples = collections.Counter(), collections.Counter(), 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if thread_filter and thread_filter not in stack.split(";", 1)[0]:
                continue
            n, frames = int(count), [LINE.sub(")", f) for f in stack.split(";")[1:]]
            samples += n
            if frames:
                self_count[frames[-1]] += n
            for frame in set(frames):
                total_count[frame] += n
    return self_count, total_count, samples


def report(path: str, top: int) -> str:
    self_count, total_count, samples = collapse(path)
    lines = [f"{samples} samples (all threads)"]
    for title, counter in (("self", self_count), ("total", total_count)):
        lines.append(f"-- top {top} by {title} time")
        for frame, n in counter.most_common(top):
            lines.append(f"{100 * n / max(samples, 1):5.1f}%  {frame}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=["json", "sse"], default="json")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", help="keep py-spy's collapsed stacks here (for flamegraph.pl or speedscope)")
    args = p.parse_args(argv)
    if not shutil.which("py-spy"):
        raise SystemExit("bench_profile: py-spy is not installed (pip install py-spy)")
    work = tempfile.mkdtemp(prefix="aipipe-profile-")
    two = (os.cpu_count() or 1) >= 2
    if two:
        os.sched_setaffinity(0, {1})
    try:
        fake_port = free_port()
        log = os.path.join(work, "upstream.log")
        fake = spawn([sys.executable, "-m", "tests.bench_upstream", "--port", str(fake_port)], log, "1" if two else None)
        wait_http(fake_port, "/", fake, 20, log)
        gw = Gateway(work, fake_port, "0" if two else None)
        toks, path = tokens(), "/openai/v1/chat/completions"
        load.run_load(gw.port, path, CHAT, toks, 16, 2.0, max_requests=8)
        raw = args.out or os.path.join(work, "profile.txt")
        spy = subprocess.Popen(["py-spy", "record", "-p", str(gw.proc.pid), "-d", str(int(args.seconds)), "-r", "250",
                                "-f", "raw", "-o", raw, "--threads"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(
            load.run_wrk(gw.port, path, CHAT, toks, args.concurrency, args.seconds + 1, work) if args.kind == "json"
            and load.have_wrk() else
            load.run_load(gw.port, path, STREAM if args.kind == "sse" else CHAT, toks, args.concurrency, args.seconds + 1)))
        runner.start()
        spy.wait(args.seconds + 30)
        runner.join(args.seconds + 60)
        print(f"load: {result.get('rps', 0):.1f} req/s, p50 {result.get('p50', 0):.2f} ms, errors {result.get('errors')}")
        print(report(raw, args.top))
    finally:
        stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
