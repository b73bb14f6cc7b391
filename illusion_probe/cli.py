"""The ``illusion-probe`` command line: a thin layer over :mod:`illusion_probe.pipeline`."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from illusion_probe.errors import IllusionProbeError, require

Command = Callable[[argparse.Namespace], int]
TASKS = ("dyck", "code")


def _info(args: argparse.Namespace) -> int:
    from illusion_probe.models import available_backends
    from illusion_probe.provenance import versions

    for name, version in versions().items():
        print(f"{name:>18}: {version}")
    print(f"{'backends':>18}: {', '.join(available_backends())}")
    return 0


def _runs(args: argparse.Namespace):
    """``(prepared run, seed)`` for every requested seed; each seed gets ``OUT/seed_N`` when there are several."""
    from illusion_probe.pipeline import load_preset, prepare

    require(args.seeds >= 1, f"--seeds must be at least 1, got {args.seeds}")
    if args.threads is not None:
        import torch

        require(args.threads >= 1, f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    run = load_preset(args.task, args.preset)
    out = Path(args.out)
    return [prepare(run, out if args.seeds == 1 else out / f"seed_{seed}", args.device, seed)
            for seed in range(args.seeds)]


def _fmt(value: float | None) -> str:
    return "   –  " if value is None or not math.isfinite(value) else f"{value:6.4f}"


def print_summary(results, out: Path) -> None:
    """The headline table: per swept family, the smallest size at 99% test agreement and its OOD agreement."""
    ood = [s for s in results.splits if results.select(split=s, role="ood")]
    width = max(len(s) for s in ["test", *ood])
    header = f"{'proxy (agreement with the model)':<48} " + " ".join(f"{s:>{width}}" for s in ["test", *ood])
    print(header)
    print("-" * len(header))
    headline = results.headline()
    rows = [(row["proxy"] + ("" if row["reached"] else " (<99%)"), row["proxy"]) for row in headline]
    rows += [(p, p) for p in dict.fromkeys(r.proxy for r in results.records if r.size is None)]
    for label, proxy in rows:
        values = [results.value(s, proxy, "agreement") for s in ["test", *ood]]
        print(f"{label[:48]:<48} " + " ".join(f"{_fmt(v):>{width}}" for v in values))
    if rows:
        accuracy = [results.value(s, rows[0][1], "acc_model") for s in ["test", *ood]]
        print(f"{'model accuracy':<48} " + " ".join(f"{_fmt(v):>{width}}" for v in accuracy))
    print(f"headline: smallest size per family reaching 99% test agreement; report: {out / 'report.html'}")


def _reproduce(args: argparse.Namespace) -> int:
    from illusion_probe.pipeline import probe, trained_model

    for prep in _runs(args):
        model, info = trained_model(prep)
        print_summary(probe(prep, model, info), prep.out)
    return 0


def _train(args: argparse.Namespace) -> int:
    from illusion_probe.pipeline import trained_model

    for prep in _runs(args):
        _, info = trained_model(prep)
        print(f"checkpoint: {prep.out / 'checkpoint'} (trained in {info.get('train_seconds', 0)} s)")
    return 0


def _probe(args: argparse.Namespace) -> int:
    from illusion_probe.pipeline import probe, trained_model

    for prep in _runs(args):
        model, info = trained_model(prep, allow_training=False)
        print_summary(probe(prep, model, info), prep.out)
    return 0


def _report(args: argparse.Namespace) -> int:
    from illusion_probe.report.html import write_report
    from illusion_probe.results import Results

    results = Results.from_json(args.results)
    out = Path(args.out) if args.out else Path(args.results).with_name("report.html")
    write_report(results, out)
    print(f"report: {out}")
    return 0


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=TASKS, help="which study to run")
    parser.add_argument("--preset", default="quick", help="named preset: quick (CPU minutes), paper, tiny (smoke test)")
    parser.add_argument("--out", default="runs/latest", help="run directory (finished stages in it are reused)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seeds", type=int, default=1, help="repeat with seeds 0..N-1, each in OUT/seed_N")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy machine)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="illusion-probe",
        description="Measure how faithful simplified proxies of a transformer stay off the training distribution.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, run, text in [
        ("reproduce", _reproduce, "train, fit proxies, evaluate every split and write the report"),
        ("train", _train, "train (or reuse) the model only"),
        ("probe", _probe, "fit proxies and evaluate a model trained by `train`"),
    ]:
        sub = commands.add_parser(name, help=text, description=text)
        _add_run_options(sub)
        sub.set_defaults(run=run)
    report = commands.add_parser("report", help="rebuild report.html from a results.json")
    report.add_argument("results", help="path to results.json")
    report.add_argument("--out", default=None, help="where to write the HTML (default: beside results.json)")
    report.set_defaults(run=_report)
    info = commands.add_parser("info", help="print package, TransformerLens and torch versions and usable backends")
    info.set_defaults(run=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code (tests call ``main([...])`` directly)."""
    args = build_parser().parse_args(argv)
    run: Command = args.run
    try:
        return run(args)
    except IllusionProbeError as err:
        print(f"illusion-probe: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("illusion-probe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
