"""Fitting ``ip.SAE`` against SAELens's ``SAETrainer`` on the same real activations, side by side.

Activations: ``blocks.1.hook_resid_pre`` (d_model 64) of a trained quick-preset Dyck checkpoint
(``--run``), at the real tokens of the first ``--n-sequences`` training sequences (fit) and of the
whole ``test`` split (held out), with the splits the task draws for seed 0.

Both sides train a TopK SAE with the same ``d_sae``, ``k``, Adam at lr 1e-3, batch 256 and the same
number of training tokens (``--epochs`` passes over the fit activations), float32, one thread:

- ours: ``ip.SAE(d_sae, k=k, epochs=epochs, seed=seed, max_samples>=n).fit(acts)`` (its defaults
  otherwise: ``aux_coefficient=1/32``, inputs scaled to mean squared norm ``d``), timed whole;
- SAELens: ``TopKTrainingSAE`` with ``normalize_activations="expected_average_only_in"`` and
  ``SAETrainer`` with a constant lr, no warm-up, no wandb, no checkpoints; every other setting is
  SAELens's default. Its data provider yields the same activations in seeded shuffled batches of 256,
  epoch after epoch. Only ``trainer.fit()`` is timed (it includes SAELens's norm estimate, which
  reads ``n_batches_for_norm_estimate`` = 1000 batches from the provider, and folding the scale into
  the weights); building the SAE and the trainer (weight init, Adam, config) is not.

Quality, from each SAE's own full forward in the activations' units: the fraction of variance
unexplained ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` on the fit and the test activations, and
on the fit activations the mean L0 and the fraction of latents that never fire.

Each repeat fits both (seed = repeat index, the order alternating between repeats); every number
reported is the median over repeats. Goals: SAELens time / ours >= 1, our FVU / SAELens's <= 1.05.

    illusion-probe train dyck --preset quick --out RUN_DIR --threads 1
    python benchmarks/bench_sae_fit.py --run RUN_DIR
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch

import illusion_probe as ip

HOOK = "blocks.1.hook_resid_pre"
BATCH = 256
LR = 1e-3


def activations(run: Path, n_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fit, test)`` activations ``[tokens, d_model]`` at :data:`HOOK`, real tokens only."""
    model, task = ip.load_checkpoint(run / "checkpoint", device="cpu")
    assert task is not None, f"{run}/checkpoint has no task"
    splits = task.make_splits(seed=0)

    def collect(split: ip.Split, n: int | None) -> torch.Tensor:
        return torch.cat([batch[HOOK] for batch in ip.collect_activations(model, split, [HOOK], n_sequences=n,
                                                                           batch_size=64)]).float().contiguous()

    return collect(splits["train"], n_sequences), collect(splits["test"], None)


# -- the two fits ---------------------------------------------------------------------------
def fit_ours(acts: torch.Tensor, d_sae: int, k: int, epochs: int, seed: int) -> tuple[ip.SAE, float]:
    tick = time.perf_counter()
    sae = ip.SAE(d_sae, k=k, architecture="topk", epochs=epochs, batch_size=BATCH, lr=LR, seed=seed,
                 max_samples=max(len(acts), 1)).fit(acts)
    return sae, time.perf_counter() - tick


def shuffled_batches(acts: torch.Tensor, seed: int) -> Iterator[torch.Tensor]:
    """The activations in seeded shuffled batches of :data:`BATCH` (the last of an epoch shorter), forever."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        for rows in torch.randperm(len(acts), generator=generator).split(BATCH):
            yield acts[rows]


def fit_saelens(acts: torch.Tensor, d_sae: int, k: int, epochs: int, seed: int) -> tuple[torch.nn.Module, float]:
    from sae_lens import LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(seed)  # SAELens initialises from the global generator
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=acts.shape[1], d_sae=d_sae, k=k, dtype="float32", device="cpu",
                                                normalize_activations="expected_average_only_in"))
    cfg = SAETrainerConfig(total_training_samples=epochs * len(acts), train_batch_size_samples=BATCH, lr=LR,
                           lr_end=LR / 10,  # SAELens's runner default; the constant schedule ignores it
                           lr_scheduler_name="constant", lr_warm_up_steps=0, lr_decay_steps=0, device="cpu",
                           n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False,
                           logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(cfg, sae, shuffled_batches(acts, seed))
    tick = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - tick
    sae.eval()
    return sae, seconds


# -- quality ----------------------------------------------------------------------------------
def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x64 = x.double()
    return float((x64 - x_hat.double()).pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum())


@torch.no_grad()
def quality(ours: bool, sae, fit_acts: torch.Tensor, test_acts: torch.Tensor) -> dict[str, float]:
    if ours:
        recon, codes = sae(fit_acts), sae.encode(fit_acts.unsqueeze(1))[:, 0]
        recon_test = sae(test_acts)
    else:
        recon, codes = sae(fit_acts), sae.encode(fit_acts)
        recon_test = sae(test_acts)
    fired = (codes != 0)
    return {"fvu_fit": fvu(fit_acts, recon), "fvu_test": fvu(test_acts, recon_test),
            "l0": float(fired.sum(1).double().mean()), "dead": float((~fired.any(0)).double().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/latest"),
                        help="run folder holding checkpoint/ of a trained quick Dyck model")
    parser.add_argument("--n-sequences", type=int, default=5000, help="training sequences whose tokens are fitted")
    parser.add_argument("--cases", nargs="+", default=["256:4", "64:4"], help="D_SAE:K pairs")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the fit activations (both sides)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    fit_acts, test_acts = activations(args.run, args.n_sequences)
    print(f"{HOOK}: fit {tuple(fit_acts.shape)} ({args.n_sequences} train sequences), test {tuple(test_acts.shape)}; "
          f"epochs {args.epochs}, batch {BATCH}, lr {LR}, repeats {args.repeats}")
    import sae_lens
    print(f"torch {torch.__version__}, sae-lens {sae_lens.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"load average before {', '.join(f'{x:.2f}' for x in load_before)}", flush=True)

    rows = []
    for case in args.cases:
        d_sae, k = (int(part) for part in case.split(":"))
        runs: dict[str, list[dict[str, float]]] = {"ours": [], "saelens": []}
        for repeat in range(args.repeats):
            order = ("ours", "saelens") if repeat % 2 == 0 else ("saelens", "ours")
            for side in order:
                fit = fit_ours if side == "ours" else fit_saelens
                sae, seconds = fit(fit_acts, d_sae, k, args.epochs, seed=repeat)
                runs[side].append({"seconds": seconds, **quality(side == "ours", sae, fit_acts, test_acts)})
                print(f"  d_sae={d_sae} k={k} repeat {repeat} {side}: "
                      + ", ".join(f"{key} {value:.4f}" for key, value in runs[side][-1].items()), flush=True)
        median = {side: {key: statistics.median(r[key] for r in results) for key in results[0]}
                  for side, results in runs.items()}
        rows.append((d_sae, k, median, runs))

    load_after = os.getloadavg()
    print(f"\nload average after {', '.join(f'{x:.2f}' for x in load_after)}\n")
    print("| d_sae, k | fitter | fit s | FVU fit | FVU test | L0 | dead | SAELens s / ours | our FVU test / SAELens |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for d_sae, k, median, _ in rows:
        ours, theirs = median["ours"], median["saelens"]
        for side, label in (("ours", "illusion_probe `SAE`"), ("saelens", "SAELens `SAETrainer`")):
            m = median[side]
            speed = f"**{theirs['seconds'] / ours['seconds']:.2f}x**" if side == "ours" else ""
            ratio = f"**{ours['fvu_test'] / theirs['fvu_test']:.3f}**" if side == "ours" else ""
            print(f"| {d_sae}, {k} | {label} | {m['seconds']:.2f} | {m['fvu_fit']:.4f} | {m['fvu_test']:.4f} | "
                  f"{m['l0']:.2f} | {m['dead']:.1%} | {speed} | {ratio} |")
    print("\nper-repeat spread (min-max): seconds; FVU test")
    for d_sae, k, _, runs in rows:
        for side, results in runs.items():
            seconds = [r["seconds"] for r in results]
            test = [r["fvu_test"] for r in results]
            print(f"  d_sae={d_sae} k={k} {side}: {min(seconds):.2f}-{max(seconds):.2f} s; "
                  f"{min(test):.4f}-{max(test):.4f}")


if __name__ == "__main__":
    main()
