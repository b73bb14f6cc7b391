"""Throughput of the vectorised Dyck sampler against a per-token Python sampler of the same process.

Both run the DESIGN section 5 process with the same bounds and rejection rule; the Python one
draws one token at a time with ``random.Random``. Then one million sequences are generated batch
by batch with the vectorised sampler, recording the peak resident memory (``ru_maxrss``) it adds.

    PYTHONPATH=. python benchmarks/bench_dyck_sampler.py [--k 20 --m 10 --max-len 64 --min-len 16]
"""

from __future__ import annotations

import argparse
import platform
import random
import resource
import time

import torch

from illusion_probe.tasks.dyck_sampler import SamplerSpec, iter_batches, sample_batch


def python_sample(spec: SamplerSpec, rng: random.Random) -> list[int] | None:
    """One draw of the process, token by token; ``None`` when it would exceed ``max_len``."""
    seq, stack = [0], []
    while True:
        if not stack and len(seq) >= spec.min_len and rng.random() < 0.5:
            return seq
        if len(seq) == spec.max_len:
            return None
        if not stack or (len(stack) < spec.max_depth and rng.random() >= 0.5):
            stack.append(rng.randrange(spec.k))
            seq.append(2 + stack[-1])
        else:
            seq.append(2 + spec.k + stack.pop())


def python_rate(spec: SamplerSpec, seconds: float) -> float:
    """Accepted sequences per second of the per-token Python sampler."""
    rng, accepted, start = random.Random(0), 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        accepted += sum(python_sample(spec, rng) is not None for _ in range(1000))
    return accepted / (time.perf_counter() - start)


def vector_rate(spec: SamplerSpec, batch_size: int, seconds: float) -> float:
    """Accepted sequences per second of :func:`sample_batch`."""
    generator, accepted, start = torch.Generator().manual_seed(0), 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        accepted += len(sample_batch(spec, batch_size, generator).lengths)
    return accepted / (time.perf_counter() - start)


def million(spec: SamplerSpec, batch_size: int, n: int) -> tuple[float, float]:
    """Seconds and added peak RSS (MiB) to generate ``n`` sequences batch by batch."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start, count = time.perf_counter(), 0
    for batch in iter_batches(spec, n, batch_size, torch.Generator().manual_seed(1)):
        count += len(batch.lengths)
    assert count == n
    elapsed = time.perf_counter() - start
    return elapsed, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--m", type=int, default=10)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16384)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: core for core with Python)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = SamplerSpec(args.k, args.m, args.min_len, args.max_len)
    # Memory first, so the peak it reports is not one left over from the timing runs.
    seconds, peak_mib = million(spec, args.batch_size, args.n)
    py = python_rate(spec, args.seconds)
    vec = vector_rate(spec, args.batch_size, args.seconds)
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    print(f"process: {spec}, batch {args.batch_size}")
    print("| sampler | accepted sequences / s |")
    print("| --- | ---: |")
    print(f"| per-token Python | {py:,.0f} |")
    print(f"| vectorised torch | {vec:,.0f} |")
    print(f"speed-up: {vec / py:.1f}x")
    print(f"{args.n:,} sequences batch by batch: {seconds:.1f} s, peak RSS added {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
