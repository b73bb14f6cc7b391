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
import statistics
import time

import torch

from illusion_probe.tasks.dyck_sampler import SamplerSpec, iter_batches, reference_sample, sample_batch


def python_round(spec: SamplerSpec, rng: random.Random, seconds: float) -> float:
    """Accepted sequences per second of the per-token Python sampler over one timed round."""
    accepted, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        accepted += sum(reference_sample(spec, rng) is not None for _ in range(1000))
    return accepted / (time.perf_counter() - start)


def vector_round(spec: SamplerSpec, batch_size: int, generator: torch.Generator, seconds: float) -> float:
    """Accepted sequences per second of :func:`sample_batch` over one timed round."""
    accepted, start = 0, time.perf_counter()
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
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds per sampler")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one round")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: core for core with Python)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = SamplerSpec(args.k, args.m, args.min_len, args.max_len)
    # Memory first, so the peak it reports is not one left over from the timing runs.
    seconds, peak_mib = million(spec, args.batch_size, args.n)
    # Alternate the two samplers so that a change in machine load hits both; report medians.
    rng, generator, py_rounds, vec_rounds = random.Random(0), torch.Generator().manual_seed(0), [], []
    for _ in range(args.rounds):
        py_rounds.append(python_round(spec, rng, args.seconds))
        vec_rounds.append(vector_round(spec, args.batch_size, generator, args.seconds))
    py, vec = statistics.median(py_rounds), statistics.median(vec_rounds)
    ratios = sorted(v / p for v, p in zip(vec_rounds, py_rounds, strict=True))
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    print(f"process: {spec}, batch {args.batch_size}")
    print(f"| sampler | accepted sequences / s (median of {args.rounds} rounds) |")
    print("| --- | ---: |")
    print(f"| per-token Python | {py:,.0f} |")
    print(f"| vectorised | {vec:,.0f} |")
    print(f"speed-up: {vec / py:.1f}x (per round: {', '.join(f'{r:.1f}' for r in ratios)})")
    print(f"{args.n:,} sequences batch by batch: {seconds:.1f} s, peak RSS added {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
