"""Peak resident memory of evaluating the paper Dyck study: every proxy on every split, as ``reproduce`` runs it.

Goal: at most 1 GB, with no heap trimming anywhere in the package. The model has the paper
preset's architecture with untrained weights (memory does not depend on the weights). Phase one
(a subprocess) fits and saves the study's proxies; phase two, a fresh process, loads them, draws
the splits and evaluates, and reports its resident memory before evaluating and its peak
(``ru_maxrss``, the kernel's high-water mark for the process). Run:
``OMP_NUM_THREADS=1 python benchmarks/bench_memory.py``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mib() -> float:
    with open("/proc/self/statm", "rb") as statm:
        import os

        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _run(folder: Path, phase: str) -> None:
    import torch

    import illusion_probe as ip
    from illusion_probe.pipeline import fit_stage, prepare

    study = ip.load_study("dyck", "paper")
    run = prepare(study, folder, device="cpu", seed=0)
    if phase == "fit":
        ip.save_checkpoint(folder / "checkpoint", run.model, run.task)
        fit_stage(run, run.model)
        return
    model, _ = ip.load_checkpoint(folder / "checkpoint")
    proxies = fit_stage(run, model)  # reused from phase one
    splits = ip.SplitSet([s.head(study.evaluation.max_sequences) for s in run.splits.values()])
    before = _rss_mib()
    tick = time.perf_counter()
    results = ip.evaluate(model, proxies, splits, run.task, batch_size=study.evaluation.batch_size,
                          batch_tokens=study.evaluation.batch_tokens, n_boot=study.evaluation.n_boot, seed=0, ablation=study.evaluation.ablation, progress=False)
    seconds = time.perf_counter() - tick
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"proxies": len(proxies), "splits": {s.name: len(s) for s in splits.values()},
                      "records": len(results.records), "rss_before_evaluate_mib": round(before, 1),
                      "peak_rss_mib": round(peak, 1), "evaluate_s": round(seconds, 1),
                      "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=["fit", "evaluate"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase is not None:
        _run(Path(args.folder), args.phase)
        return
    with tempfile.TemporaryDirectory() as folder:
        for phase in ("fit", "evaluate"):
            subprocess.run([sys.executable, __file__, "--phase", phase, "--folder", folder], check=True)


if __name__ == "__main__":
    main()
