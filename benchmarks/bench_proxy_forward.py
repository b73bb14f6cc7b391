"""Forward-pass cost of a proxy: proxy forward time / clean forward time.

A random 4-layer, d_model 512 model (HookedTransformer on TransformerLens 3.x,
else the native bridge), batch 32 x 256 on CPU, one simplifier at
``blocks.2.hook_resid_pre`` fitted on 64 random sequences (the TopK SAE, d_sae 4 x d_model and
k 32, for one epoch: its weights' quality does not change the cost). Clean and proxy
forwards are interleaved and the median of ``--repeats`` is reported. A second
table times the PCA hook's two apply paths on their own (square projector vs
two thin matmuls) to justify the switch at ``2 * rank < d``.

    python benchmarks/bench_proxy_forward.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import illusion_probe as ip
from illusion_probe.backends import Backend

HOOK = "blocks.2.hook_resid_pre"


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pos", type=int, default=256)
    args = parser.parse_args(argv)
    sizes = ip.ModelSizes(d_vocab=64, n_ctx=args.pos)
    model = ip.build_model(sizes, ip.ModelConfig(n_layers=4, d_model=512, n_heads=8, seed=0))
    generator = torch.Generator().manual_seed(0)
    train = ip.Split.from_tokens(torch.randint(0, 64, (64, args.pos), generator=generator), "train", name="train")
    tokens = torch.randint(0, 64, (args.batch, args.pos), generator=generator)
    proxies = {s.describe(): ip.fit_proxy(model, {HOOK: s}, train, batch_size=16)
               for s in (ip.PCA(16), ip.PCA(256), ip.PCA(512), ip.KMeans(64), ip.SAE(4 * 512, k=32, epochs=1))}
    print(f"backend {Backend.of(model).describe()}, "
          f"batch {args.batch} x {args.pos}, threads {torch.get_num_threads()}")
    print("| proxy at " + HOOK + " | clean s | proxy s | ratio |")
    print("|---|---|---|---|")
    with torch.no_grad():
        model(tokens)  # warm-up
        for label, proxy in proxies.items():
            with proxy.applied(model):
                model(tokens)  # warm-up: builds the apply-time tensors
            clean, hooked = [], []
            for _ in range(args.repeats):
                clean.append(_median_seconds(lambda: model(tokens), 1))
                with proxy.applied(model):
                    hooked.append(_median_seconds(lambda: model(tokens), 1))
            c, h = statistics.median(clean), statistics.median(hooked)
            print(f"| {label} | {c:.3f} | {h:.3f} | {h / c:.3f} |", flush=True)

    x, bias = torch.randn(args.batch * args.pos, 512, generator=generator), torch.zeros(512)
    print("\n| rank | projector V V^T ms | two thin matmuls ms |")
    print("|---|---|---|")
    for rank in (8, 64, 128, 256, 384, 512):
        v = torch.linalg.qr(torch.randn(512, rank, generator=generator)).Q
        p, vt = v @ v.T, v.T.contiguous()
        square = _median_seconds(lambda p=p: torch.addmm(bias, x, p), 7 * args.repeats)
        thin = _median_seconds(lambda v=v, vt=vt: torch.addmm(bias, x @ v, vt), 7 * args.repeats)
        print(f"| {rank} | {square * 1e3:.2f} | {thin * 1e3:.2f} |", flush=True)


if __name__ == "__main__":
    main()
