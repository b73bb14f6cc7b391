"""PCA fit time and peak memory: illusion-probe vs scikit-learn PCA(full) and IncrementalPCA.

Each (method, n) runs in a fresh subprocess so peak RSS is that method's own.
The activations (seeded, low-rank plus noise, float32) are generated in chunks
into one preallocated matrix before the clock starts; "extra peak" is the peak
RSS above that point. Ours streams the matrix in batches of 8192 rows into
float64 mean + Gram accumulators, so its extra memory must not grow with n.

    python benchmarks/bench_pca_fit.py --sizes 100000 400000 --d 512 --rank 16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

METHODS = ("illusion_probe", "sklearn_full", "sklearn_incremental")


def _activations(n: int, d: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(64, d, generator=generator)
    out = torch.empty(n, d)
    for start in range(0, n, 8192):
        rows = min(8192, n - start)
        out[start:start + rows] = torch.randn(rows, 64, generator=generator) @ basis
        out[start:start + rows] += 0.1 * torch.randn(rows, d, generator=generator)
    return out


def _worker(method: str, n: int, d: int, rank: int) -> dict[str, float]:
    from sklearn.decomposition import PCA as SkPCA
    from sklearn.decomposition import IncrementalPCA

    from illusion_probe.simplify.pca import PCA

    x = _activations(n, d)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if method == "illusion_probe":
        pca = PCA(rank)
        for chunk in x.split(8192):
            pca.partial_fit(chunk)
        pca.finalize()
    elif method == "sklearn_full":
        SkPCA(n_components=rank, svd_solver="full").fit(x.numpy())
    else:
        IncrementalPCA(n_components=rank).fit(x.numpy())
    seconds = time.perf_counter() - start
    extra_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # Linux: KiB
    return {"seconds": seconds, "extra_peak_mb": extra_mb, "data_mb": x.numel() * 4 / 2**20}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000])
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "N"))
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker[0], int(args.worker[1]), args.d, args.rank)))
        return
    print("| n x d | method | fit s | extra peak MiB (data MiB) | speed-up of ours |")
    print("|---|---|---|---|---|")
    for n in args.sizes:
        rows = {}
        for method in METHODS:
            out = subprocess.run([sys.executable, __file__, "--worker", method, str(n), "--d", str(args.d),
                                  "--rank", str(args.rank)], capture_output=True, text=True, check=True)
            rows[method] = json.loads(out.stdout.strip().splitlines()[-1])
        for method, r in rows.items():
            ratio = r["seconds"] / rows["illusion_probe"]["seconds"]
            print(f"| {n} x {args.d} | {method} | {r['seconds']:.2f} | {r['extra_peak_mb']:.0f} ({r['data_mb']:.0f}) "
                  f"| {ratio:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
