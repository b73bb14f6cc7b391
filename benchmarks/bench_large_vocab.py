"""Evaluation at a large vocabulary: a GPT-2-small-shaped model, 64 sequences of 512 tokens, 8 proxies.

Goals: evaluation's peak resident memory at most 1.5x the peak of plain forward passes over the
same batches, and its time at most (1 + proxy and baseline passes) x the clean passes.
The model has GPT-2 small's shape (12 layers, d_model 768, 12 heads, d_mlp 3072, vocabulary
50,257, context 1,024) with untrained weights, which change neither memory nor cost; tokens are
uniform random ids. The 8 proxies sit at block 6: PCA 8, 32 and 128, k-means 64 and zero
ablation on the residual stream, PCA 16 and k-means 16 on keys and queries, and one-hot attention.

Three fresh processes, so that each peak (``ru_maxrss``, the kernel's high-water mark) is its own:
``fit`` fits and saves the proxies on 32 other sequences; ``plain`` runs the model's forward pass
(full logits, as a user would call it) over the evaluation batches; ``evaluate`` loads the proxies
and evaluates, then times the plain passes again in the same process for the time ratio. Run:
``python benchmarks/bench_large_vocab.py --threads 1``.
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

LENGTH, FIT_SEQUENCES, LAYER = 512, 32, 6
BATCH_SIZE, BATCH_TOKENS = 64, 4096  # evaluate's defaults: batches of 8 sequences of 512 tokens


def _rss_mib() -> float:
    import os

    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model_and_split(role: str, n: int, seed: int):
    import torch

    import illusion_probe as ip

    model = ip.build_model(ip.ModelSizes(d_vocab=50257, n_ctx=1024),
                           ip.ModelConfig(n_layers=12, d_model=768, n_heads=12, d_mlp=3072, act_fn="gelu_new"))
    tokens = torch.randint(0, 50257, (n, LENGTH), generator=torch.Generator().manual_seed(seed))
    return model, ip.Split.from_tokens(tokens, role=role, name=role)


def _plain_seconds(model, split) -> float:
    import torch

    tick = time.perf_counter()
    with torch.no_grad():
        for batch in split.batches(BATCH_SIZE, longest_first=True, max_tokens=BATCH_TOKENS):
            model(batch.tokens)
    return time.perf_counter() - tick


def _fit(folder: Path, sequences: int) -> None:
    from illusion_probe.hook_names import attn_k, attn_pattern, attn_q, resid_pre
    from illusion_probe.sweeps import sweep_proxies

    model, fit = _model_and_split("train", FIT_SEQUENCES, seed=1)
    resid, kq = [resid_pre(LAYER)], [attn_k(LAYER), attn_q(LAYER)]
    proxies = {**sweep_proxies(model, fit, resid, "pca", (8, 32, 128)),
               **sweep_proxies(model, fit, resid, "kmeans", (64,)),
               **sweep_proxies(model, fit, resid, "zero_ablation"),
               **sweep_proxies(model, fit, kq, "pca", (16,)),
               **sweep_proxies(model, fit, kq, "kmeans", (16,)),
               **sweep_proxies(model, fit, [attn_pattern(LAYER)], "onehot_attention")}
    assert len(proxies) == 8, sorted(proxies)
    for name, proxy in proxies.items():
        proxy.save(folder / "proxies" / name)
    (folder / "names.json").write_text(json.dumps(sorted(proxies)))


def _plain(folder: Path, sequences: int) -> None:
    import torch

    model, split = _model_and_split("id", sequences, seed=0)
    before = _rss_mib()
    seconds = min(_plain_seconds(model, split) for _ in range(2))
    (folder / "plain.json").write_text(json.dumps({"rss_before_mib": before, "peak_mib": _peak_mib(),
                                                   "seconds": seconds, "threads": torch.get_num_threads()}))


def _evaluate(folder: Path, sequences: int) -> None:
    import torch

    import illusion_probe as ip
    from illusion_probe.backends import Backend

    model, split = _model_and_split("id", sequences, seed=0)
    proxies = {name: ip.Proxy.load(folder / "proxies" / name) for name in json.loads((folder / "names.json").read_text())}
    before = _rss_mib()
    tick = time.perf_counter()
    results = ip.evaluate(model, proxies, ip.SplitSet([split]), batch_size=BATCH_SIZE, batch_tokens=BATCH_TOKENS,
                          ablation="zero", progress=False)
    seconds = time.perf_counter() - tick
    peak = _peak_mib()
    clean = min(_plain_seconds(model, split) for _ in range(2))  # after the peak is read: it cannot raise it
    meta = results.meta["evaluation"]
    hook_sets = {frozenset(p.hook_names) for p in proxies.values()}
    baselines = len(hook_sets) - len(meta["baseline_shared_with"])
    (folder / "evaluate.json").write_text(json.dumps({
        "backend": Backend.of(model).describe(), "rss_before_mib": before, "peak_mib": peak, "seconds": seconds,
        "clean_seconds": clean, "passes": len(proxies) + baselines, "resumed_at": sorted(set(meta["resumed_at"].values()), key=str),
        "chunk_size": meta["chunk_size"], "timings": results.meta["timings"], "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=64, help="evaluation sequences of 512 tokens")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every phase (default: torch's)")
    parser.add_argument("--phase", choices=["fit", "plain", "evaluate"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase is not None:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        {"fit": _fit, "plain": _plain, "evaluate": _evaluate}[args.phase](Path(args.folder), args.sequences)
        return
    with tempfile.TemporaryDirectory() as folder:
        for phase in ("fit", "plain", "evaluate"):
            extra = ["--sequences", str(args.sequences), *(["--threads", str(args.threads)] if args.threads else [])]
            subprocess.run([sys.executable, __file__, "--phase", phase, "--folder", folder, *extra], check=True)
        plain = json.loads(Path(folder, "plain.json").read_text())
        ev = json.loads(Path(folder, "evaluate.json").read_text())
    print(f"{ev['backend']}, threads {ev['threads']}, "
          f"{args.sequences} x {LENGTH} tokens, batches of {BATCH_TOKENS // LENGTH}, head chunk {ev['chunk_size']} positions")
    print("| RSS before (plain / evaluate) MiB | peak plain MiB | peak evaluate MiB | memory ratio | clean s | "
          "evaluate s | passes | time ratio (goal) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    print(f"| {plain['rss_before_mib']:.0f} / {ev['rss_before_mib']:.0f} | {plain['peak_mib']:.0f} | {ev['peak_mib']:.0f} "
          f"| {ev['peak_mib'] / plain['peak_mib']:.2f}x | {ev['clean_seconds']:.1f} | {ev['seconds']:.1f} | {ev['passes']} "
          f"| {ev['seconds'] / ev['clean_seconds']:.2f}x (<= {1 + ev['passes']}x) |")
    print("timings (s):", ev["timings"], "resumed at:", ev["resumed_at"], "plain s (own process):", round(plain["seconds"], 1))


if __name__ == "__main__":
    main()
