"""Evaluation cost: 20 proxies on 4 splits of 2,000 sequences against the clean forward passes alone.

Goal (issue 5): total evaluation time at most 21x the clean passes (one pass per
proxy, nothing recomputed); reusing the clean prefix (``start_at_layer``) should
go well below that. Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_evaluate.py``.
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
from illusion_probe.models import model_backend
from illusion_probe.pipeline import load_preset
from illusion_probe.provenance import package_version
from illusion_probe.sweeps import sweep_proxies
from illusion_probe.tasks import task_from_dict

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
    parser.add_argument("--stacked", action="store_true", help="also time proxies stacked 8 per pass")
    parser.add_argument("--repeats", type=int, default=3, help="evaluate runs per variant")
    args = parser.parse_args()
    run = load_preset("dyck", "quick")
    task = ip.DyckTask(dataclasses.replace(task_from_dict(run.task).config, n_test=args.sequences,
                                           n_ood=args.sequences))
    all_splits = task.make_splits(seed=0)
    model = ip.build_model(task, run.model, backend=args.backend)
    layer = run.model.n_layers - 1
    kq = [f"blocks.{layer}.attn.hook_k", f"blocks.{layer}.attn.hook_q"]
    resid = [f"blocks.{layer}.hook_resid_pre"]
    fit = all_splits["train"]
    proxies = {**sweep_proxies(model, fit, kq, "pca", (1, 2, 4, 8, 16), 500),
               **sweep_proxies(model, fit, resid, "pca", (1, 2, 4, 8, 16, 32, 64), 500),
               **sweep_proxies(model, fit, kq, "kmeans", (2, 4, 8, 16, 32, 64), 500),
               **sweep_proxies(model, fit, [f"blocks.{layer}.attn.hook_pattern"], "onehot_attention", (None,)),
               **sweep_proxies(model, fit, kq, "mean_ablation", (None,), 500)}
    assert len(proxies) == 20, len(proxies)
    splits = ip.SplitSet([all_splits[name].head(args.sequences) for name in
                          ("test", "ood_unseen_structure", "ood_longer", "ood_deeper")])
    clean_seconds(model, splits, args.batch_size, longest_first=True)  # warm-up
    variants = {"one full pass per proxy": dict(reuse_prefix=False),
                "+ rerun from the cached clean prefix (default)": dict(reuse_prefix=True)}
    if args.stacked:
        variants["+ proxies stacked 8 per pass"] = dict(reuse_prefix=True, proxy_batch=8)
    rows = []
    for label, options in variants.items():
        # Measured next to each variant, so that both see the same state of the machine.
        clean = {(size, order): min(clean_seconds(model, splits, size, order == "longest first") for _ in range(3))
                 for size in CLEAN_BATCH_SIZES for order in ("split order", "longest first")}
        best = min(clean, key=clean.get)
        seconds = []
        for _ in range(args.repeats):
            tick = time.perf_counter()
            results = ip.evaluate(model, proxies, splits, task, batch_size=args.batch_size, n_boot=1000,
                                  progress=False, **options)
            seconds.append(time.perf_counter() - tick)
        rows.append((label, best, clean[best], sorted(seconds), results.meta["evaluation"]["prefix_reuse"]))
    print(f"model: quick preset architecture ({run.model.n_layers} layers, d_model {run.model.d_model}), "
          f"{model_backend(model)} on TransformerLens {package_version('transformer-lens')}; "
          f"4 splits x {args.sequences} sequences; 20 proxies; evaluate batch "
          f"{args.batch_size}; threads {torch.get_num_threads()}")
    print(f"| variant | clean passes s (batch, order) | evaluate s, {args.repeats} runs | ratio: best (median) "
          "| resumed by |")
    print("|---|---:|---|---|---|")
    for label, (batch, order), clean, seconds, resumed in rows:
        runs = ", ".join(f"{s:.1f}" for s in seconds)
        median = seconds[len(seconds) // 2]
        print(f"| {label} | {clean:.2f} ({batch}, {order}) | {runs} | {seconds[0] / clean:.1f}x ({median / clean:.1f}x) "
              f"| {resumed or '-'} |")


if __name__ == "__main__":
    main()
