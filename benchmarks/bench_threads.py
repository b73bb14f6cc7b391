"""The README's main command at several torch thread counts, on an idle machine and next to another job.

Why the command line defaults to one thread. Each run is ``illusion-probe reproduce dyck --preset
quick`` into a fresh folder; "busy" runs start a competing CPU-bound process first (a float32 matrix
product in a loop, with as many torch threads as the machine has cores, as another user's job
would). A run longer than ``--limit`` seconds is stopped and reported as such. Run:
``python benchmarks/bench_threads.py``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

BUSY = ("import torch\ntorch.set_num_threads({cores})\na = torch.randn(1500, 1500)\n"
        "while True:\n    a = (a @ a).clamp_(-1, 1)\n")


def _run(threads: int, busy: bool, limit: float) -> float | None:
    """Wall seconds of one run, or ``None`` past ``limit``."""
    competitor = None
    if busy:
        competitor = subprocess.Popen([sys.executable, "-c", BUSY.format(cores=os.cpu_count())])
        time.sleep(2)  # let it reach full speed
    try:
        with tempfile.TemporaryDirectory() as out:
            tick = time.perf_counter()
            try:
                subprocess.run([sys.executable, "-m", "illusion_probe", "reproduce", "dyck", "--preset", "quick",
                                "--out", out, "--threads", str(threads)], check=True, timeout=limit,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                return None
            return time.perf_counter() - tick
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to measure")
    parser.add_argument("--limit", type=float, default=600, help="seconds before a run is stopped")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores; load average before: {os.getloadavg()[0]:.2f}")
    print("| threads | idle machine s | next to a CPU-bound job s |")
    print("|---:|---:|---:|")
    for threads in args.threads:
        cells = []
        for busy in (False, True):
            seconds = _run(threads, busy, args.limit)
            cells.append(f"> {args.limit:.0f} (stopped)" if seconds is None else f"{seconds:.0f}")
        print(f"| {threads} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
