"""k-means solvers side by side: scikit-learn KMeans and MiniBatchKMeans, faiss, a batched torch Lloyd, and ip.KMeans.

Two cases, every solver with 3 restarts (best inertia kept), seed 0 (one row seed 1), one thread:

- ``quick``: the quick Dyck study's real key and query activations (block 1, 4 heads of 16 dims, the
  first 1,000 training sequences), every k-means size of the study (2-64): 48 fits per solver.
- ``gpt2``: a GPT-2-sized case, 12 heads of 64 dims and 200,000 tokens, drawn from a seeded mixture of
  256 Gaussians per head (so the inertia has a meaningful optimum), 64 clusters.

Inertia is computed the same way for every solver (float64 sum of float32 squared distances to the
nearest returned centroid) and reported relative to scikit-learn ``KMeans``'s on the same data. faiss
runs 50 iterations (it has no tolerance-based stop) on every sample. Run:
``python benchmarks/bench_kmeans.py --run RUN_DIR`` where ``RUN_DIR`` holds a trained quick-preset
checkpoint (``illusion-probe reproduce dyck --preset quick --out RUN_DIR``).
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from kmeans_torch import assign, kmeans

import illusion_probe as ip
from illusion_probe.hook_names import attn_k, attn_q
from illusion_probe.simplify.collect import collect_activations

SEED, N_INIT = 0, 3
#: One solver: ``[group, n, feature]`` float32 samples and a cluster count -> ``[group, k, feature]`` centroids.
Solver = Callable[[torch.Tensor, int], torch.Tensor]


def _per_group(fit_one: Callable[[np.ndarray, int], np.ndarray]) -> Solver:
    def solve(x: torch.Tensor, k: int) -> torch.Tensor:
        return torch.stack([torch.from_numpy(np.asarray(fit_one(np.ascontiguousarray(g.numpy()), k), dtype=np.float32))
                            for g in x])
    return solve


def _sklearn(minibatch: bool, seed: int = SEED) -> Solver:
    from sklearn.cluster import KMeans, MiniBatchKMeans

    solver = MiniBatchKMeans if minibatch else KMeans

    def fit_one(data: np.ndarray, k: int) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return solver(k, init="k-means++", n_init=N_INIT, random_state=seed).fit(data).cluster_centers_
    return _per_group(fit_one)


def _ours(x: torch.Tensor, k: int) -> torch.Tensor:
    """``ip.KMeans`` as the study fits it, every head at once: ``[group, n, feature]`` -> ``[group, k, feature]``."""
    kmeans = ip.KMeans(k, seed=SEED, n_init=N_INIT, max_samples=x.shape[1], per_head=True)
    return kmeans.fit(x.transpose(0, 1).unsqueeze(0)).centroids


def _faiss() -> Solver | None:
    try:
        import faiss
    except ImportError:
        return None

    def fit_one(data: np.ndarray, k: int) -> np.ndarray:
        means = faiss.Kmeans(data.shape[1], k, niter=50, nredo=N_INIT, seed=SEED + 1, verbose=False,
                             max_points_per_centroid=data.shape[0])
        means.train(data)
        return means.centroids
    return _per_group(fit_one)


def _torch_lloyd(x: torch.Tensor, k: int) -> torch.Tensor:
    return kmeans(x, k, seed=SEED, n_init=N_INIT)[0]


def quick_case(run: Path) -> torch.Tensor:
    """``[8, n, 16]``: keys then queries of every head of block 1 on the first 1,000 training sequences."""
    model, task = ip.load_checkpoint(run / "checkpoint")
    assert task is not None
    split = task.make_splits(seed=0)["train"]
    hooks = [attn_k(1), attn_q(1)]
    batches = list(collect_activations(model, split, hooks, n_sequences=1000))
    return torch.cat([torch.cat([b[h] for b in batches]).transpose(0, 1) for h in hooks]).contiguous()


def gpt2_case(n: int = 200_000, heads: int = 12, d: int = 64, modes: int = 256) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED)
    centres = 3 * torch.randn(heads, modes, d, generator=generator)
    which = torch.randint(modes, (heads, n), generator=generator)
    return centres.gather(1, which.unsqueeze(-1).expand(-1, -1, d)) + torch.randn(heads, n, d, generator=generator)


def measure(name: str, x: torch.Tensor, sizes: list[int], solvers: dict[str, Solver | None]) -> None:
    print(f"\n{name}: {x.shape[0]} groups x {x.shape[1]} samples x {x.shape[2]} dims, sizes {sizes}")
    print("| solver | seconds | inertia / KMeans inertia: total (worst size) |")
    print("|---|---:|---:|")
    reference: dict[int, torch.Tensor] = {}
    for label, solver in solvers.items():
        if solver is None:
            print(f"| {label} | not installed | |")
            continue
        seconds, ratios, total, total_ref = 0.0, [], 0.0, 0.0
        for k in sizes:
            tick = time.perf_counter()
            centroids = solver(x, k)
            seconds += time.perf_counter() - tick
            inertia = assign(x, centroids)[1]
            reference.setdefault(k, inertia)
            ratios.append(float((inertia / reference[k]).max()))
            total, total_ref = total + float(inertia.sum()), total_ref + float(reference[k].sum())
        print(f"| {label} | {seconds:.2f} | {total / total_ref:.4f} ({max(ratios):.4f}) |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="folder with a trained quick-preset checkpoint/")
    parser.add_argument("--cases", nargs="+", default=["quick", "gpt2"], choices=["quick", "gpt2"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    solvers = {"scikit-learn KMeans": _sklearn(False),
               "scikit-learn KMeans, another seed (the seed's own noise)": _sklearn(False, seed=SEED + 1),
               "scikit-learn MiniBatchKMeans": _sklearn(True), "faiss Kmeans (50 iterations)": _faiss(),
               "torch batched Lloyd": _torch_lloyd,
               "ip.KMeans (restarts on 1,024 samples, refined on all)": _ours}
    if "quick" in args.cases:
        measure("quick study keys and queries", quick_case(args.run), [2, 4, 8, 16, 32, 64], solvers)
    if "gpt2" in args.cases:
        measure("GPT-2-sized mixture", gpt2_case(), [64], solvers)


if __name__ == "__main__":
    main()
