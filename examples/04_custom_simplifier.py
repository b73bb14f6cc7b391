"""Write your own simplifier and score it with the same evaluation as the built-in ones.

``RandomProjection`` projects an activation onto a fixed, seeded random
rank-``r`` subspace: ``x_hat = x Q Q^T`` with ``Q`` a ``[d, r]`` orthonormal basis
drawn from ``seed``. It needs no data, so it subclasses ``ip.Simplifier`` and
implements only ``__call__`` and ``options``. Registered with
``@ip.register_simplifier``, it is swept, saved and loaded like a built-in.
We compare it with a PCA of the same rank, fit on the train split: a data-fitted
subspace against a random one, in and out of distribution.

A simplifier fitted on activations subclasses ``ip.FittedSimplifier`` instead and
implements its fitting protocol (``start``, ``accumulate``, ``finish``, ``apply``,
``tensors``, ``set_tensors``); see the API reference and ``illusion_probe/simplify/pca.py``.

    python examples/04_custom_simplifier.py --out runs/example_04
    python examples/04_custom_simplifier.py --tiny
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

import illusion_probe as ip


@ip.register_simplifier
class RandomProjection(ip.Simplifier):
    """Project onto a seeded random ``rank``-dimensional subspace of the feature dimension (data-free).

    Args:
        rank: dimension of the subspace kept.
        seed: seeds the subspace; the same seed and feature size always give the same subspace.
    """

    method: ClassVar[str] = "random_projection"  # its registered name, and the label in results (Record.method)
    size_option: ClassVar[str | None] = "rank"  # Simplifier.size reads self.rank: sweeps and headlines use it

    def __init__(self, rank: int, seed: int = 0):
        if not isinstance(rank, int) or rank < 1:
            raise ip.IllusionProbeError(f"RandomProjection: rank must be a positive integer, got {rank!r}")
        self.rank = rank
        self.seed = seed
        self._bases: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}

    def options(self) -> dict[str, Any]:
        """Constructor arguments; they go into Proxy metadata."""
        return {"rank": self.rank, "seed": self.seed}

    def basis(self, d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``[d, rank]`` orthonormal columns, built once per feature size, dtype and device."""
        key = (d, dtype, device)
        if key not in self._bases:
            if self.rank > d:
                raise ip.IllusionProbeError(f"RandomProjection: rank {self.rank} exceeds the feature dimension {d}")
            generator = torch.Generator().manual_seed(self.seed)
            gaussian = torch.randn(d, self.rank, generator=generator, dtype=torch.float64)
            self._bases[key] = torch.linalg.qr(gaussian).Q.to(device=device, dtype=dtype)
        return self._bases[key]

    def __call__(self, act: Tensor, hook: Any = None) -> Tensor:
        """``act @ Q @ Q^T``: same shape, dtype and device as ``act``. The second parameter must be named ``hook``."""
        q = self.basis(act.shape[-1], act.dtype, act.device)
        return (act @ q) @ q.T


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/example_04", help="output directory (everything is written here)")
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("ILLUSION_PROBE_TINY") == "1",
                        help="toy sizes that run in seconds (also: ILLUSION_PROBE_TINY=1)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # A Dyck task and a briefly trained model (see 01_quickstart_dyck.py for the full walk-through).
    task = ip.DyckTask(ip.DyckConfig.preset("tiny" if args.tiny else "quick"))
    splits = task.make_splits(seed=0)
    model_cfg = (ip.ModelConfig(n_layers=2, d_model=16, n_heads=2, d_mlp=32) if args.tiny
                 else ip.ModelConfig(n_layers=2, d_model=64, n_heads=4))
    train_cfg = (ip.TrainConfig(max_steps=20, warmup_steps=2, batch_size=32, eval_every=10, eval_sequences=60,
                                progress=False) if args.tiny
                 else ip.TrainConfig(lr=3e-3, max_steps=3000, warmup_steps=200, target_acc=0.995))
    model = ip.build_model(task, model_cfg)
    ip.train(model, splits, train_cfg, task=task)

    hook = "blocks.1.hook_resid_pre"
    rank = 4 if args.tiny else 8
    n_boot = 50 if args.tiny else 1000

    # A simplifier is a hook function: it works in plain TransformerLens with no glue.
    with torch.no_grad():
        logits = model.run_with_hooks(splits["test"].tokens[:2], fwd_hooks=[(hook, RandomProjection(rank))])
    print(f"run_with_hooks with RandomProjection({rank}): logits {tuple(logits.shape)}")

    # Registered, it sweeps like a built-in (one proxy per rank), next to a PCA sweep of the same ranks.
    ranks = [rank // 2, rank]
    n_fit = 100 if args.tiny else 1000
    proxies = {**ip.sweeps.sweep_proxies(model, splits["train"], [hook], "random_projection", ranks),
               **ip.sweeps.sweep_proxies(model, splits["train"], [hook], "pca", ranks, n_sequences=n_fit)}
    results = ip.evaluate(model, proxies, splits, task, n_boot=n_boot, progress=False)
    for name in proxies:
        cells = ", ".join(f"{split} {results.value(split, name, 'agreement'):.3f}" for split in results.splits)
        (ev,) = results.select(split="test", proxy=name, metric="explained_variance")
        print(f"{name}: explained variance on test {ev.value:.3f}; agreement: {cells}")
    results.to_json(out / "results.json")
    ip.write_report(results, out / "report.html", title=f"Random projection against PCA at {hook}")

    # And it saves and loads like a built-in: Proxy.load finds the class by its registered name.
    name = f"random_projection({rank})@{hook}"
    proxies[name].save(out / "random_projection")
    loaded = ip.Proxy.load(out / "random_projection")
    with torch.no_grad():
        with loaded.applied(model):
            reloaded = model(splits["test"].tokens[:2])
        with proxies[name].applied(model):
            assert torch.equal(reloaded, model(splits["test"].tokens[:2]))
    print(f"results: {out / 'results.json'}; report: {out / 'report.html'}; proxy: {out / 'random_projection'}")

if __name__ == "__main__":
    main()
