"""Two processes against one, side by side in one run (``torchrun``, gloo, one thread per process).

1. Evaluation of the quick Dyck preset (goal: at least 1.7x faster on 2 processes, identical results).
   The checkpoint and proxies of a finished quick run are copied into fresh run directories, so that
   ``illusion-probe evaluate`` runs the evaluate stage only; the time is the stage's own
   (``evaluate_seconds`` in ``results.json``: process start-up and the report are left out), and the
   runs alternate, one process then two, ``--repeats`` times.
2. PCA at d_model 512 (goal: combining the moments of 2 processes adds at most 5% to the fit time).
   200,000 rows (mean 3, standard deviation 1 per feature), fitted at rank 16 in one process, and in two
   processes of 100,000 rows each; the combine step (``combine_shards``: a broadcast of the main
   process's shift, then one all-reduce of the count, sum and Gram matrix) is timed on its own, after
   a barrier (the wait for the slower process is reported apart).

Run: ``python benchmarks/bench_torchrun.py --run runs/quick`` (a finished ``reproduce dyck --preset quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import illusion_probe as ip

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ROWS, FEATURES, RANK = 200_000, 512, 16


def evaluate_once(run: Path, processes: int, scratch: Path) -> tuple[float, ip.Results]:
    out = Path(tempfile.mkdtemp(dir=scratch))
    for stage in ("checkpoint", "proxies"):
        shutil.copytree(run / stage, out / stage)
    command = ["-m", "illusion_probe", "evaluate", "dyck", "--preset", "quick", "--device", "cpu", "--out", str(out)]
    launcher = TORCHRUN if processes == 2 else [sys.executable]
    done = subprocess.run([*launcher, *command], capture_output=True, text=True)
    if done.returncode != 0 or "reusing fitted proxies" not in done.stderr:
        sys.exit(f"the {processes}-process evaluation failed or refitted:\n{done.stderr[-3000:]}")
    results = ip.Results.from_json(out / "results.json")
    return results.meta["evaluate_seconds"], results


def largest_difference(one: ip.Results, two: ip.Results) -> dict[str, float]:
    """The largest |difference| of value and interval ends, per metric, over every record."""
    def key(r):
        return (r.split, r.proxy, r.metric, r.category, r.hook)

    found = {key(r): r for r in [*two.records, *two.control_records]}
    worst: dict[str, float] = {}
    for record in [*one.records, *one.control_records]:
        other = found[key(record)]
        for field in ("value", "ci_low", "ci_high"):
            a, b = getattr(record, field), getattr(other, field)
            if a is not None and b is not None and a == a and b == b:
                worst[record.metric] = max(worst.get(record.metric, 0.0), abs(a - b))
    return worst


def bench_evaluation(run: Path, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        times: dict[int, list[float]] = {1: [], 2: []}
        results: dict[int, ip.Results] = {}
        for _ in range(repeats):
            for processes in (1, 2):
                seconds, results[processes] = evaluate_once(run, processes, Path(scratch))
                times[processes].append(seconds)
                print(f"  evaluate stage, {processes} process(es): {seconds:.1f} s", flush=True)
    one, two = min(times[1]), min(times[2])
    print(f"evaluation: 1 process {one:.1f} s, 2 processes {two:.1f} s (fastest of {repeats}): {one / two:.2f}x "
          "(goal >= 1.7x)")
    worst = largest_difference(results[1], results[2])
    print("largest difference per metric: " + ", ".join(f"{m} {d:.2g}" for m, d in sorted(worst.items())))


def pca_rows(block: slice) -> torch.Tensor:
    """Rows ``block`` of the benchmark's activations, the same whichever process makes them."""
    generator = torch.Generator().manual_seed(block.start)
    return torch.randn(block.stop - block.start, FEATURES, generator=generator).add_(3.0)


def pca_worker() -> None:
    """One process of the two (under torchrun): fit on its block, combine, finish; the main process prints JSON."""
    torch.set_num_threads(1)
    here = ip.distributed.world()
    halves = [slice(0, ROWS // 2), slice(ROWS // 2, ROWS)]
    data = pca_rows(halves[here.rank])
    ip.distributed.barrier()
    timings = {}
    pca = ip.PCA(RANK)
    tick = time.perf_counter()
    pca.partial_fit(data)
    timings["accumulate_s"] = time.perf_counter() - tick
    tick = time.perf_counter()
    ip.distributed.barrier()  # the other process's accumulation, apart from the combine's own cost
    timings["wait_s"] = time.perf_counter() - tick
    tick = time.perf_counter()
    pca.combine_shards()
    timings["combine_s"] = time.perf_counter() - tick
    tick = time.perf_counter()
    pca.finalize()
    timings["finish_s"] = time.perf_counter() - tick
    if here.is_main:
        print(json.dumps({**timings, "components": pca.components.flatten().tolist()[:FEATURES * RANK]}))


def bench_pca(repeats: int) -> None:
    torch.set_num_threads(1)
    data = torch.cat([pca_rows(slice(0, ROWS // 2)), pca_rows(slice(ROWS // 2, ROWS))])
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(repeats):
        pca = ip.PCA(RANK)
        tick = time.perf_counter()
        pca.partial_fit(data).finalize()
        alone = time.perf_counter() - tick
        done = subprocess.run([*TORCHRUN, __file__, "--pca-worker"], capture_output=True, text=True, env=environment)
        if done.returncode != 0:
            sys.exit(done.stderr[-3000:])
        two = json.loads(done.stdout.strip().splitlines()[-1])
        both = torch.tensor(two.pop("components")).reshape(FEATURES, RANK)
        projector_gap = (both @ both.T - pca.components[0] @ pca.components[0].T).abs().max().item()
        total = sum(two.values())
        print(f"PCA {ROWS:,} x {FEATURES}, rank {RANK}: 1 process {alone:.3f} s; 2 processes {total:.3f} s "
              f"(accumulate {two['accumulate_s']:.3f}, wait {two['wait_s']:.3f}, combine {two['combine_s']:.4f}, "
              f"finish {two['finish_s']:.3f}); "
              f"combine = {100 * two['combine_s'] / alone:.2f}% of the one-process fit (goal <= 5%); "
              f"projectors differ by {projector_gap:.1e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished quick Dyck run (its checkpoint and proxies are reused)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pca-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pca_worker:
        pca_worker()
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, one thread per process")
    bench_pca(args.repeats)
    if args.run is not None:
        bench_evaluation(args.run, args.repeats)


if __name__ == "__main__":
    main()
