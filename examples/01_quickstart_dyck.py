"""Quick start: the paper's Dyck experiment through the Python API, top to bottom.

Task -> splits -> model -> train -> fit proxies -> evaluate -> report. The full
setting (Dyck-(4, 4), the ``quick`` preset's sizes) trains for a few CPU
minutes; ``--tiny`` runs the same code on a toy setting in seconds (the model
barely trains, so its numbers mean nothing).

    python examples/01_quickstart_dyck.py --out runs/example_01
    python examples/01_quickstart_dyck.py --tiny

Writes into ``--out`` only: ``checkpoint/``, ``results.json``, ``results.csv``,
``report.html``, ``onehot_results.json``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import illusion_probe as ip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/example_01", help="output directory (everything is written here)")
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("ILLUSION_PROBE_TINY") == "1",
                        help="toy sizes that run in seconds (also: ILLUSION_PROBE_TINY=1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. The task owns its data: vocabulary, context length, scored positions, disjoint splits.
    task = ip.DyckTask(ip.DyckConfig.preset("tiny" if args.tiny else "quick"))
    splits = task.make_splits(seed=0)
    print(splits)  # train, test (in distribution), ood_unseen_structure, ood_longer, ood_deeper

    # 2. A small hooked transformer sized from the task (HookedTransformer on TL 3.x, TransformerBridge on 4.x).
    model_cfg = ip.ModelConfig(n_layers=2, d_model=64, n_heads=4, device=args.device)
    train_cfg = ip.TrainConfig(lr=3e-3, max_steps=3000, warmup_steps=200, target_acc=0.995)
    if args.tiny:
        model_cfg = ip.ModelConfig(n_layers=2, d_model=16, n_heads=2, d_mlp=32, device=args.device)
        train_cfg = ip.TrainConfig(max_steps=20, warmup_steps=2, batch_size=32, eval_every=10, eval_sequences=60,
                                   progress=False)
    model = ip.build_model(task, model_cfg)

    # 3. Train with a masked next-token loss; every split is evaluated along the way.
    history = ip.train(model, splits, train_cfg, task=task)
    print("accuracy after training:", {name: round(acc, 3) for name, acc in history[-1]["acc"].items()})
    ip.save_checkpoint(out / "checkpoint", model, task)

    n_fit = 100 if args.tiny else 1000  # train sequences each simplifier is fit on (the paper: about 1,000)
    n_boot = 50 if args.tiny else 1000  # bootstrap resamples of sequences for the 95% intervals

    # 4. One proxy by hand: one-hot attention in the last layer (data-free), scored on every split.
    onehot = ip.fit_proxy(model, {"blocks.1.attn.hook_pattern": ip.OneHotAttention()}, splits["train"])
    onehot_results = ip.evaluate(model, {"onehot": onehot}, splits, task, n_boot=n_boot, progress=False)
    for split in onehot_results.splits:
        print(f"one-hot attention, {split}: agreement {onehot_results.value(split, 'onehot', 'agreement'):.3f}")
    onehot_results.to_json(out / "onehot_results.json")

    # 5. A sweep: PCA of every rank on the last layer's keys and queries, fit on the train split
    #    only, each proxy scored against the model on every split.
    hooks = ["blocks.1.attn.hook_k", "blocks.1.attn.hook_q"]
    sizes = [1, 2, 4] if args.tiny else [1, 2, 4, 8, 16]
    results = ip.sweep(model, splits, task, hooks=hooks, method="pca", sizes=sizes, n_sequences=n_fit,
                       n_boot=n_boot, progress=False)

    # 6. The headline: the smallest rank with >= 99% test agreement, and its agreement out of distribution.
    for row in results.headline():
        ood = ", ".join(f"{split} {value:.3f}" for split, value in row["ood_agreement"].items())
        print(f"{row['proxy']}: test agreement {row['id_agreement']:.3f} (reached 99%: {row['reached']}); {ood}")
    for gap in results.gap("agreement", "test", "ood_deeper"):
        print(f"gap test - ood_deeper, {gap.proxy}: {gap.value:+.3f} [{gap.ci_low:+.3f}, {gap.ci_high:+.3f}]")

    results.to_json(out / "results.json")
    results.to_csv(out / "results.csv")
    ip.write_report(results, out / "report.html", title="Dyck: PCA of keys and queries")
    print(f"report: {out / 'report.html'}")


if __name__ == "__main__":
    main()
