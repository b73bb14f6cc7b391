"""The quick Dyck study's fit stage against one forward pass over its fit data, and streamed PCA against its passes.

1. Fit stage. A trained quick-preset checkpoint (``--run``), the study's 21 proxies on its first 1,000
   training sequences, fitted as the pipeline fits them (:func:`ip.fit_proxies`: one pass, shared
   accumulators) and, for comparison, one :func:`ip.fit_proxy` call per proxy (a pass each, as
   sweeps fitted before). The reference is the plain forward passes (``model(tokens)``) over the same
   batches. Every time is the fastest of ``--repeats``. Goal: the fit stage at most 10x the reference.
2. Streamed PCA. ``PCA(16)`` on the residual stream of a 4-layer, 512-wide random model, fed batch
   by batch from its hooks: the forward passes that capture the activations, against accumulating
   the captured batches and solving. Goal: at most 0.5x the passes.

One thread (torch and BLAS). Run: ``python benchmarks/bench_fit.py --run RUN_DIR`` where ``RUN_DIR``
holds ``checkpoint/`` from ``illusion-probe reproduce dyck --preset quick --out RUN_DIR``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import illusion_probe as ip
from illusion_probe.pipeline import layer_hooks, prepare, study_proxies
from illusion_probe.simplify.collect import collect_activations
from illusion_probe.study import load_study


def best_of(repeats: int, work: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeats):
        tick = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - tick)
    return best


def forward_passes(model: torch.nn.Module, split: ip.Split, n: int, batch_size: int = 64) -> None:
    """The plain passes a fit runs: the first ``n`` sequences in batches, each cut to its longest sequence."""
    with torch.no_grad():
        for start in range(0, n, batch_size):
            rows = slice(start, min(start + batch_size, n))
            width = int(split.real_mask[rows].sum(1).max())
            model(split.tokens[rows, :width])


def fit_stage(run_dir: Path, repeats: int) -> None:
    model, _ = ip.load_checkpoint(run_dir / "checkpoint")
    with tempfile.TemporaryDirectory() as out:
        run = prepare(load_study("dyck", "quick"), out, device="cpu")
    train, n = run.splits["train"], run.study.proxies.n_fit_sequences
    reference = best_of(repeats, lambda: forward_passes(model, train, n))
    proxies: dict[str, ip.Proxy] = {}
    stage = best_of(repeats, lambda: proxies.update(study_proxies(model, run)))
    # the proxies the goal was set on, before the study swept sparse dictionaries (trained for epochs)
    no_dictionaries = {name: p.simplifiers for name, p in proxies.items() if not name.startswith(("sae", "transcoder"))}
    without = best_of(repeats, lambda: ip.fit_proxies(model, no_dictionaries, train, n))
    one_by_one = best_of(1, lambda: [ip.fit_proxy(model, p.simplifiers, train, n_sequences=n) for p in proxies.values()])
    hooks = [h for layer in run.layers for group in ("kq", "resid") for h in layer_hooks(layer)[group]]
    capture = best_of(repeats, lambda: list(collect_activations(model, train, hooks, n_sequences=n)))
    print(f"quick study fit stage: {len(proxies)} proxies on {n} sequences "
          f"({int(train.real_mask[:n].sum())} tokens), {torch.get_num_threads()} thread")
    print("| step | seconds | / forward passes |")
    print("|---|---:|---:|")
    for label, seconds in (("plain forward passes over the fit data (reference)", reference),
                           ("capture of the fitted hooks (one pass)", capture),
                           ("fit stage, one pass (`fit_proxies`, the pipeline)", stage),
                           (f"the same without the sparse dictionaries ({len(no_dictionaries)} proxies)", without),
                           ("one `fit_proxy` per proxy (a pass each)", one_by_one)):
        print(f"| {label} | {seconds:.3f} | {seconds / reference:.1f}x |", flush=True)
    by_family: dict[str, list[str]] = {}
    for name in proxies:
        by_family.setdefault(name.split("(")[0].split("@")[0] + "@" + name.split("@")[1], []).append(name)
    print("\n| family (one pass each) | proxies | seconds |")
    print("|---|---:|---:|")
    for family, names in by_family.items():
        wanted = {name: proxies[name].simplifiers for name in names}
        seconds = best_of(repeats, lambda wanted=wanted: ip.fit_proxies(model, wanted, train, n))
        print(f"| {family} | {len(names)} | {seconds:.3f} |", flush=True)


def streamed_pca(repeats: int, n_sequences: int = 64) -> None:
    """PCA(16) fed from a 512-wide model's hooks: the passes (with capture) against the accumulation and solve."""
    sizes = ip.ModelSizes(d_vocab=1000, n_ctx=256)
    model = ip.build_model(sizes, ip.ModelConfig(n_layers=4, d_model=512, n_heads=8, seed=0))
    tokens = torch.randint(1000, (n_sequences, 256), generator=torch.Generator().manual_seed(0))
    split = ip.Split.from_tokens(tokens, "train", name="train")
    hook = "blocks.3.hook_resid_post"

    def capture() -> list[dict[str, torch.Tensor]]:
        return list(collect_activations(model, split, [hook], n_sequences=n_sequences, batch_size=8))

    passes = best_of(repeats, capture)
    batches = capture()

    def fit() -> None:
        pca = ip.PCA(16)
        for batch in batches:
            pca.partial_fit(batch[hook])
        pca.finalize()

    seconds = best_of(repeats, fit)
    print(f"\nstreamed PCA(16) at {hook} of a 4-layer, 512-wide model, {len(batches)} batches, "
          f"{n_sequences * 256} tokens: passes {passes:.2f} s, fit beyond them {seconds:.3f} s = "
          f"{seconds / passes:.3f}x the passes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="folder with a trained quick-preset checkpoint/")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    fit_stage(args.run, args.repeats)
    streamed_pca(args.repeats)


if __name__ == "__main__":
    main()
