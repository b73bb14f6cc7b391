"""Character-level code completion: where do simplified proxies stop matching the model?

The corpus needs no download: ``train``, ``val`` and ``test`` are windows of the
running interpreter's standard-library ``*.py`` files (split by file), ``ood_cpp``
is windows of the C/C++ headers inside the installed torch package, and the quick
preset adds Perl, JavaScript and shell scripts from the system image. Each scored
position also carries category labels (``closing_bracket``, ``copying``,
``first_occurrence``, ``deep_nesting``); evaluation reports every metric per
category too, which is where the paper found the largest gaps (copying, deep
nesting).

    python examples/03_code_completion.py --out runs/example_03
    python examples/03_code_completion.py --tiny
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import illusion_probe as ip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/example_03", help="output directory (everything is written here)")
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("ILLUSION_PROBE_TINY") == "1",
                        help="toy sizes that run in seconds (also: ILLUSION_PROBE_TINY=1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. The task: character vocabulary from the training files, windows of `window` characters.
    task = ip.CodeTask(ip.CodeConfig.preset("tiny" if args.tiny else "quick"))
    splits = task.make_splits(seed=0)
    print(task)
    print(splits)
    print(f"{task.d_vocab} tokens; first training window: {task.decode(splits['train'].tokens[0])[:60]!r}...")

    # 2. Model and training (the whole vocabulary is the answer set: task.answer_ids).
    if args.tiny:
        model_cfg = ip.ModelConfig(n_layers=2, d_model=32, n_heads=2, d_mlp=64, device=args.device)
        train_cfg = ip.TrainConfig(max_steps=20, warmup_steps=2, batch_size=32, eval_every=10, eval_sequences=60,
                                   progress=False)
    else:
        # The sizes of the `code --preset quick` run (illusion_probe/presets/code_quick.toml).
        model_cfg = ip.ModelConfig(n_layers=2, d_model=64, n_heads=4, d_mlp=256, act_fn="gelu", device=args.device)
        train_cfg = ip.TrainConfig(lr=2e-3, batch_size=32, max_steps=1500, warmup_steps=100, eval_every=500,
                                   eval_sequences=200, eval_batch_size=100)
    model = ip.build_model(task, model_cfg)
    history = ip.train(model, splits, train_cfg, task=task)
    print("accuracy after training:", {name: round(acc, 3) for name, acc in history[-1]["acc"].items()})

    # 3. Proxies fit on the train split: PCA of the last layer's keys and queries at a few ranks,
    #    k-means on them, and one-hot attention.
    kq = ["blocks.1.attn.hook_k", "blocks.1.attn.hook_q"]
    n_fit = 100 if args.tiny else 300
    ranks = [1, 4] if args.tiny else [1, 2, 4, 8, 16]
    proxies = {f"pca({r})": ip.fit_proxy(model, {h: ip.PCA(rank=r) for h in kq}, splits["train"], n_sequences=n_fit)
               for r in ranks}
    clusters = 4 if args.tiny else 32
    proxies[f"kmeans({clusters})"] = ip.fit_proxy(model, {h: ip.KMeans(n_clusters=clusters) for h in kq},
                                                  splits["train"], n_sequences=n_fit)
    proxies["onehot"] = ip.fit_proxy(model, {"blocks.1.attn.hook_pattern": ip.OneHotAttention()}, splits["train"])

    # 4. Evaluate on every split; metrics come per position category as well as for "all".
    results = ip.evaluate(model, proxies, splits, task, n_boot=50 if args.tiny else 1000, progress=False)
    categories = ["all", "copying", "first_occurrence", "closing_bracket", "deep_nesting"]
    ood = [s for s in results.splits if s.startswith("ood_")]
    for name in proxies:
        for category in categories:
            found = results.select(proxy=name, metric="agreement", category=category, split="test")
            if not found:  # a category with no scored position in these windows
                continue
            cells = ", ".join(f"{s} {results.value(s, name, 'agreement', category):.3f}" for s in ["test", *ood])
            print(f"{name:>12} {category:>16}: agreement {cells}")

    # 5. The gap test - ood_cpp on copying positions, with its bootstrap interval over sequences.
    for gap in results.gap("agreement", "test", ood[0] if ood else None, category="copying"):
        print(f"copying gap test - {gap.ood_split}, {gap.proxy}: {gap.value:+.3f} "
              f"[{gap.ci_low:+.3f}, {gap.ci_high:+.3f}]")

    results.to_json(out / "results.json")
    results.to_csv(out / "results.csv")
    ip.write_report(results, out / "report.html", title="Code completion: proxies in and out of distribution")
    print(f"report: {out / 'report.html'}")


if __name__ == "__main__":
    main()
