"""Sparse autoencoders and transcoders as proxies: the error-term control, dictionary metrics, matched fidelity.

We train a Dyck model, then fit a width sweep of TopK SAEs and a PCA rank sweep at the residual
stream entering the last block, and a transcoder that replaces the last MLP's output with a sparse
function of its input. First the plumbing check: every proxy with its reconstruction error added
back (``proxy.with_error_term()``) must give the model's own logits exactly. Then each proxy is
evaluated on every split, with the dictionary metrics (``l0``, ``dead_fraction``,
``frequency_shift``, ``ood_only_latents``) beside agreement and explained variance, and each SAE's
generalization gap is compared with PCA's gap at the same in-distribution explained variance
(``illusion_probe.analysis.matched.matched_gaps``). A dictionary trained elsewhere (a SAELens SAE,
your own module with ``encode``/``decode``) enters the same way through ``ip.ExternalSAE(obj)``.

    python examples/06_sparse_dictionaries.py --out runs/example_06
    python examples/06_sparse_dictionaries.py --tiny
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import illusion_probe as ip
from illusion_probe.analysis.matched import matched_gaps
from illusion_probe.pipeline import prepare, train_stage


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/example_06", help="output directory (everything is written here)")
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("ILLUSION_PROBE_TINY") == "1",
                        help="toy sizes that run in seconds (also: ILLUSION_PROBE_TINY=1)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # The Dyck study's task, splits and trained model, as `illusion-probe reproduce dyck` makes them (stage by
    # stage: see 01_quickstart_dyck.py for a walk-through with the building blocks).
    run = prepare(ip.load_study("dyck", "tiny" if args.tiny else "quick"), out / "run", device="cpu")
    model, _ = train_stage(run)
    task, splits = run.task, run.splits

    resid, mlp = "blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out"
    widths, ranks = ([8, 16], [2, 4, 8]) if args.tiny else ([8, 16, 64], [4, 8, 16, 32])
    epochs, n_boot = (2, 50) if args.tiny else (20, 1000)
    wanted = {
        **ip.sweeps.sweep_simplifiers([resid], "sae", widths, k=4, epochs=epochs),
        **ip.sweeps.sweep_simplifiers([resid], "pca", ranks),
        "transcoder": {mlp: ip.Transcoder(widths[-1], k=4, epochs=epochs)},  # reads blocks.1.ln2.hook_normalized
    }
    proxies = ip.fit_proxies(model, wanted, splits["train"])

    # The plumbing check: with the reconstruction error added back, every proxy is the identity.
    tokens = splits["test"].tokens[:8]
    with torch.no_grad():
        clean = model(tokens)
        for name, proxy in proxies.items():
            with proxy.with_error_term().applied(model):
                assert torch.equal(model(tokens), clean), name
    print(f"error-term control: all {len(proxies)} proxies give the clean logits exactly")

    results = ip.evaluate(model, proxies, splits, task, n_boot=n_boot, progress=False)
    for name in proxies:
        agreement = ", ".join(f"{s} {results.value(s, name, 'agreement'):.3f}" for s in results.splits)
        shift = results.select(split=results.splits[-1], proxy=name, metric="frequency_shift")
        extra = f"; frequency shift on {results.splits[-1]} {shift[0].value:.3f}" if shift else ""
        print(f"{name}: agreement {agreement}{extra}")
    for row in matched_gaps(results, ("sae", resid), ("pca", resid)):
        print(f"{row.proxy} at EV {row.fidelity:.3f}, gap to {row.ood_split}: {row.gap:+.4f} "
              f"(PCA at the same EV: {row.reference_gap:+.4f})")
    results.to_json(out / "results.json")
    ip.write_report(results, out / "report.html", title="Sparse dictionaries against PCA")
    proxies["transcoder"].save(out / "transcoder")
    print(f"results: {out / 'results.json'}; report: {out / 'report.html'}; transcoder: {out / 'transcoder'}")


if __name__ == "__main__":
    main()
