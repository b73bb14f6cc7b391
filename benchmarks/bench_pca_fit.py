"""PCA fit time and peak memory: ``ip.PCA`` against every scikit-learn PCA solver and IncrementalPCA.

Each (method, n) runs in a fresh subprocess with one thread (torch and BLAS), so peak RSS is that
method's own; the fit time is the fastest of ``--repeats`` fits in that process. The activations
(seeded, rank 64 plus noise, float32) are generated in chunks into one preallocated matrix before the
clock starts; "extra peak" is the peak RSS above that point. Ours is given the whole matrix
(``PCA.fit``), which it multiplies in chunks of 2**22 elements, so its extra memory does not grow with n.
``--mean M`` adds M to every activation: with M above the spread (about 0.8 per feature here) ours
shifts each chunk by an early mean first (a copy), the path large-mean activations take.
Goal: no slower than scikit-learn's fastest solver (``covariance_eigh``).

    python benchmarks/bench_pca_fit.py --sizes 200000 --d 512 --rank 16 [--mean 10]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

METHODS = ("illusion_probe", "sklearn_covariance_eigh", "sklearn_randomized", "sklearn_arpack", "sklearn_full",
           "sklearn_incremental")


def _activations(n: int, d: int, mean: float):
    import torch

    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(64, d, generator=generator)
    out = torch.empty(n, d)
    for start in range(0, n, 8192):
        rows = min(8192, n - start)
        out[start:start + rows] = torch.randn(rows, 64, generator=generator) @ basis
        out[start:start + rows] += 0.1 * torch.randn(rows, d, generator=generator) + mean
    return out


def _worker(method: str, n: int, d: int, rank: int, repeats: int, mean: float) -> dict[str, float]:
    import torch
    from sklearn.decomposition import PCA as SkPCA
    from sklearn.decomposition import IncrementalPCA
    from threadpoolctl import threadpool_limits

    from illusion_probe.simplify.pca import PCA

    torch.set_num_threads(1)
    threadpool_limits(1)
    x = _activations(n, d, mean)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    best = float("inf")
    for _ in range(repeats if method != "sklearn_incremental" else 1):
        start = time.perf_counter()
        if method == "illusion_probe":
            PCA(rank).fit(x)
        elif method == "sklearn_incremental":
            IncrementalPCA(n_components=rank).fit(x.numpy())
        else:
            SkPCA(n_components=rank, svd_solver=method.removeprefix("sklearn_"), random_state=0).fit(x.numpy())
        best = min(best, time.perf_counter() - start)
    extra_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # Linux: KiB
    return {"seconds": best, "extra_peak_mb": extra_mb, "data_mb": x.numel() * 4 / 2**20}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--mean", type=float, default=0.0, help="added to every activation")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "N"))
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker[0], int(args.worker[1]), args.d, args.rank, args.repeats, args.mean)))
        return
    print(f"mean added: {args.mean}")
    print("| n x d | method | fit s (best of repeats) | extra peak MiB (data MiB) | its time / ours |")
    print("|---|---|---|---|---|")
    for n in args.sizes:
        rows = {}
        for method in args.methods:
            out = subprocess.run([sys.executable, __file__, "--worker", method, str(n), "--d", str(args.d),
                                  "--rank", str(args.rank), "--repeats", str(args.repeats),
                                  "--mean", str(args.mean)], capture_output=True, text=True, check=True)
            rows[method] = json.loads(out.stdout.strip().splitlines()[-1])
        for method, r in rows.items():
            ratio = r["seconds"] / rows["illusion_probe"]["seconds"]
            print(f"| {n} x {args.d} | {method} | {r['seconds']:.2f} | {r['extra_peak_mb']:.0f} ({r['data_mb']:.0f}) "
                  f"| {ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
