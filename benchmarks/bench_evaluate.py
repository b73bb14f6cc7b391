"""Evaluation cost: 20 proxies on 4 splits of 2,000 sequences against the clean forward passes alone.

Goal: total evaluation time at most 21x the clean passes (one pass per proxy and
baseline, nothing recomputed), with the plainest code. Run:
``OMP_NUM_THREADS=1 python benchmarks/bench_evaluate.py``.
The model has the quick preset's architecture; its weights are untrained, which
does not change the cost of a forward pass.

The clean time is the fastest of 3 runs at each of several batch sizes, with the sequences
taken in split order and longest first (as ``evaluate`` takes them: less padding): with
glibc's default heap settings, large batches can spend a third of their time faulting freed
pages back in, and a slow reference would flatter the ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

import illusion_probe as ip
from illusion_probe.backends import Backend
from illusion_probe.hook_names import attn_k, attn_pattern, attn_q, resid_pre
from illusion_probe.study import load_study
from illusion_probe.sweeps import sweep_proxies

CLEAN_BATCH_SIZES = (32, 64, 128, 256)


def clean_seconds(model, splits, batch_size: int, longest_first: bool) -> float:
    tick = time.perf_counter()
    with torch.no_grad():
        for split in splits.values():
            for batch in split.batches(batch_size, longest_first=longest_first):
                model(batch.tokens)
    return time.perf_counter() - tick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=2000, help="sequences per split")
    parser.add_argument("--batch-size", type=int, default=128, help="evaluate batch size (its default)")
    parser.add_argument("--backend", default="auto", help="auto, hooked (TransformerLens < 4) or bridge")
    parser.add_argument("--repeats", type=int, default=3, help="evaluate runs per variant")
    args = parser.parse_args()
    study = load_study("dyck", "quick")
    task = ip.DyckTask(dataclasses.replace(study.task, n_test=args.sequences, n_ood=args.sequences))
    all_splits = task.make_splits(seed=0)
    model = ip.build_model(task, study.model, backend=args.backend)
    layer = study.model.n_layers - 1
    kq, resid = [attn_k(layer), attn_q(layer)], [resid_pre(layer)]
    fit = all_splits["train"]
    proxies = {**sweep_proxies(model, fit, kq, "pca", (1, 2, 4, 8, 16), 500),
               **sweep_proxies(model, fit, resid, "pca", (1, 2, 4, 8, 16, 32, 64), 500),
               **sweep_proxies(model, fit, kq, "kmeans", (2, 4, 8, 16, 32, 64), 500),
               **sweep_proxies(model, fit, [attn_pattern(layer)], "onehot_attention", (None,)),
               **sweep_proxies(model, fit, kq, "mean_ablation", (None,), 500)}
    assert len(proxies) == 20, len(proxies)
    splits = ip.SplitSet([all_splits[name].head(args.sequences) for name in
                          ("test", "ood_unseen_structure", "ood_longer", "ood_deeper")])
    clean_seconds(model, splits, args.batch_size, longest_first=True)  # warm-up
    # Measured next to evaluate, so that both see the same state of the machine.
    clean = {(size, order): min(clean_seconds(model, splits, size, order == "longest first") for _ in range(3))
             for size in CLEAN_BATCH_SIZES for order in ("split order", "longest first")}
    best = min(clean, key=clean.get)
    seconds = []
    for _ in range(args.repeats):
        tick = time.perf_counter()
        # No train split here, so the ce_score baseline zero-ablates each hook set (three extra passes).
        results = ip.evaluate(model, proxies, splits, task, batch_size=args.batch_size, n_boot=1000, ablation="zero",
                              progress=False)
        seconds.append(time.perf_counter() - tick)
    seconds.sort()
    print(f"model: quick preset architecture ({study.model.n_layers} layers, d_model {study.model.d_model}), "
          f"{Backend.of(model).describe()}; 4 splits x {args.sequences} sequences; 20 proxies; evaluate batch "
          f"{args.batch_size}; threads {torch.get_num_threads()}")
    print(f"| clean passes s (batch, order) | evaluate s, {args.repeats} runs | ratio: best (median) | resumed at |")
    print("|---|---|---|---|")
    runs = ", ".join(f"{s:.1f}" for s in seconds)
    resumed = sorted(set(results.meta["evaluation"]["resumed_at"].values()), key=str)
    print(f"| {clean[best]:.2f} ({best[0]}, {best[1]}) | {runs} | {seconds[0] / clean[best]:.1f}x "
          f"({seconds[len(seconds) // 2] / clean[best]:.1f}x) | {resumed} |")
    print("timings of the last run (s):", results.meta["timings"])

if __name__ == "__main__":
    main()
