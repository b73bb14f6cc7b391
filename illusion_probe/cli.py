"""The ``illusion-probe`` command line: a thin layer over :mod:`illusion_probe.pipeline`."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from illusion_probe.errors import IllusionProbeError, require

Command = Callable[[argparse.Namespace], int]


def _info(args: argparse.Namespace) -> int:
    from illusion_probe.models import available_backends
    from illusion_probe.provenance import versions

    for name, version in versions().items():
        print(f"{name:>18}: {version}")
    print(f"{'backends':>18}: {', '.join(available_backends())}")
    return 0


def _runs(args: argparse.Namespace) -> list:
    """A prepared run for every requested seed; each seed gets ``OUT/seed_N`` when there are several. Under
    ``torchrun`` every process prepares them, and a problem any process finds stops them all."""
    from illusion_probe.distributed import checked_together
    from illusion_probe.pipeline import prepare, require_checkpoint
    from illusion_probe.study import load_study

    runs = []
    with checked_together():
        require(args.seeds >= 1, f"--seeds must be at least 1, got {args.seeds}")
        require(args.out.strip() != "", "--out is empty; give a run directory, e.g. --out runs/dyck")
        _set_threads(args.threads)
        study = load_study(args.task, args.preset, args.config, args.set)
        out = Path(args.out)
        runs = [prepare(study, out if args.seeds == 1 else out / f"seed_{seed}", args.device, seed, force=args.force)
                for seed in range(args.seeds)]
        if args.command == "evaluate":
            for run in runs:
                require_checkpoint(run)
    return runs


THREADS_HELP = ("CPU threads for torch: these models are small, and more threads than idle cores slow a shared "
                "machine down severalfold; raise it on an idle machine or for a large model. Float results depend "
                "on it, so it is recorded in every artefact and a checkpoint is reused only at the same count")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"illusion-probe: error: {self.prog.removeprefix('illusion-probe').strip() or 'usage'}: "
                     f"{message}; see {self.prog} --help\n")


def _set_threads(threads: int) -> None:
    import torch

    require(threads >= 1, f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)


def _fmt(value: float | None) -> str:
    return "   –  " if value is None or not math.isfinite(value) else f"{value:6.4f}"


def print_summary(results, files: Sequence[Path]) -> None:
    """The headline table: per swept family, the smallest size at 99% agreement on the selection split (``val``
    when there is one), and its agreement on every evaluation split; then size-free proxies and the model's accuracy."""
    splits = [*results.splits_with_role("val"), *results.splits_with_role("id"), *results.splits_with_role("ood")]
    id_split = results.splits_with_role("id")[0] if results.splits_with_role("id") else "test"
    width = max(len(s) for s in splits)
    header = f"{'proxy (agreement with the model)':<48} " + " ".join(f"{s:>{width}}" for s in splits)
    print(header)
    print("-" * len(header))
    headline = results.headline(id_split=id_split)
    rows = [(row["proxy"] + ("" if row["reached"] else " (<99%)"), row["proxy"]) for row in headline]
    rows += [(p, p) for p in dict.fromkeys(r.proxy for r in results.records if r.size is None)]

    def cell(split: str, proxy: str, metric: str) -> str:
        found = results.select(split=split, proxy=proxy, metric=metric, category="all")
        return _fmt(found[0].value if found else None)

    for label, proxy in rows:
        print(f"{label[:48]:<48} " + " ".join(f"{cell(s, proxy, 'agreement'):>{width}}" for s in splits))
    if rows:
        print(f"{'model accuracy':<48} " + " ".join(f"{cell(s, rows[0][1], 'acc_model'):>{width}}" for s in splits))
    selected_on = headline[0]["selected_on"] if headline else id_split
    print(f"headline: smallest size per family reaching 99% agreement on {selected_on}")
    print("wrote: " + ", ".join(str(f) for f in files))


def _reproduce(args: argparse.Namespace) -> int:
    from illusion_probe.distributed import world
    from illusion_probe.pipeline import analyse_stage, evaluate_stage, fit_stage, report_stage, train_stage

    by_seed = {}
    for run in _runs(args):
        model, info = train_stage(run, allow_training=args.command != "evaluate")
        proxies = fit_stage(run, model)
        results = evaluate_stage(run, model, proxies, info)
        if world().is_main:  # the other processes are done
            print_summary(results, report_stage(run, results, analyse_stage(run, model)))
        by_seed[run.seed] = results
    if len(by_seed) > 1 and world().is_main:
        print_seed_agreement(by_seed, Path(args.out) / "seeds.json")
    return 0


def print_seed_agreement(by_seed: dict, path: Path) -> None:
    """How many seeds find each featured family less faithful out of distribution (plain gap, after Holm within
    each seed), printed and written with every seed's gaps and adjusted p-values to ``path``."""
    from illusion_probe.analysis.verdicts import ALPHA, seed_agreement
    from illusion_probe.artifacts import write_json
    from illusion_probe.provenance import provenance

    rows = seed_agreement(by_seed)
    write_json(path, {"seeds": sorted(by_seed), "alpha": ALPHA, "correction": "holm within each seed", "rows": rows,
                      **provenance()})
    plain = [row for row in rows if row["category"] == "all"]
    print(f"\nagreement gap (test - OOD) across {len(by_seed)} seeds: seeds where the proxy is less / more faithful "
          f"out of distribution (significant at {ALPHA:g} after Holm), and the gaps")
    for row in plain:
        gaps = " ".join(f"{v:+.4f}" for v in row["gaps"].values())
        print(f"{row['family'][:48]:<48} {row['ood_split']:<22} worse {row['worse']}/{row['seeds']}  "
              f"better {row['better']}/{row['seeds']}  {gaps}")
    print(f"wrote: {path}")


def _train(args: argparse.Namespace) -> int:
    from illusion_probe.distributed import world
    from illusion_probe.pipeline import train_stage

    for run in _runs(args):
        _, info = train_stage(run)
        if world().is_main:
            print(f"wrote: {run.out / 'checkpoint'} (trained in {info.get('train_seconds', 0)} s)")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from illusion_probe.auditing import audit, audit_config
    from illusion_probe.distributed import checked_together, world

    with checked_together():  # under torchrun, a problem is printed once
        _set_threads(args.threads)
        splits = {}
        for item in args.split:
            name, sep, path = item.partition("=")
            require(bool(sep and name and path), f"--split {item!r}: write NAME=FILE, e.g. --split ood_prose=prose.txt")
            splits[name] = path
        config = audit_config({"model": args.model, "fit": args.fit, "splits": splits, "proxies": args.proxy,
                               "window": args.window, "max_sequences": args.max_sequences}, args.config, args.set)
    results = audit(config, args.out, args.device)
    out = Path(args.out)
    if world().is_main:
        print_summary(results, [out / "results.json", out / "results.csv", out / "report.html"])
    return 0


def _report(args: argparse.Namespace) -> int:
    from illusion_probe.analysis.projection import Projection
    from illusion_probe.report.html import write_report
    from illusion_probe.results import Results

    results = Results.from_json(args.results)
    beside = Path(args.results).with_name("projection.json")
    projection = Projection.from_json(beside) if beside.is_file() else None
    require(args.out is None or args.out.strip() != "", "--out is empty; give the path of the HTML file to write")
    out = Path(args.out) if args.out is not None else Path(args.results).with_name("report.html")
    require(not out.is_dir(), f"--out {out} is a directory; give the path of the HTML file to write")
    write_report(results, out, projection=projection)
    print(f"wrote: {out}")
    return 0


def _add_run_options(parser: argparse.ArgumentParser, tasks: list[str]) -> None:
    parser.add_argument("task", choices=tasks, help="which study to run")
    parser.add_argument("--preset", default="quick", help="shipped preset: tiny (smoke test), quick (CPU minutes), medium (code: 2,000 windows a split), paper")
    parser.add_argument("--config", default=None, metavar="PATH",
                        help="a TOML file whose tables ([task], [model], [train], [proxies], [evaluation], "
                             "[projection]) replace the preset's settings")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set train.lr=1e-3 (repeatable; applied last)")
    parser.add_argument("--out", default="runs/latest", help="run directory (finished stages in it are reused)")
    parser.add_argument("--force", action="store_true",
                        help="redo a stage whose artefact in --out is damaged or of another format version, "
                             "replacing it (without it, that is an error)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seeds", type=int, default=1, help="repeat with seeds 0..N-1, each in OUT/seed_N")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one sub-parser per command; task choices come from the task registry."""
    from illusion_probe.registry import TASKS

    tasks = TASKS.names()
    formatter = argparse.ArgumentDefaultsHelpFormatter
    from illusion_probe import __version__

    parser = _Parser(
        prog="illusion-probe", formatter_class=formatter,
        description="Measure how faithful simplified proxies of a transformer stay off the training distribution.",
    )
    parser.add_argument("--version", action="version", version=f"illusion-probe {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, run, text, aliases in [
        ("reproduce", _reproduce, "train, fit proxies, evaluate every split and write the report", []),
        ("train", _train, "train (or reuse) the model only", []),
        ("evaluate", _reproduce, "fit proxies and evaluate a model that `train` trained", ["probe"]),
    ]:
        sub = commands.add_parser(name, help=text, description=text, aliases=aliases, formatter_class=formatter)
        _add_run_options(sub, tasks)
        sub.set_defaults(run=run, command=name)
    text = "audit any model on your own text: fit proxies on one file, evaluate them on others"
    audit = commands.add_parser("audit", help=text, description=text, formatter_class=formatter)
    audit.add_argument("--model", default=None, help="a checkpoint, a save_pretrained folder, or a hub name")
    audit.add_argument("--fit", default=None, metavar="FILE",
                       help="in-distribution text the proxies are fitted on (.txt: a document per line; .jsonl: "
                            "a 'text' field per line; a folder: a document per file; other: one document)")
    audit.add_argument("--split", action="append", default=[], metavar="NAME=FILE",
                       help="text to evaluate on (repeatable); names starting with 'ood' are out of distribution")
    audit.add_argument("--proxy", action="append", default=[], metavar="METHOD[:SIZES]@HOOKS",
                       help="e.g. pca:4,8,16@blocks.6.hook_resid_pre, kmeans:64@blocks.6.attn.hook_k, onehot@6 "
                            "(repeatable)")
    audit.add_argument("--window", type=int, default=None, help="tokens per sequence (default: the model's context)")
    audit.add_argument("--max-sequences", type=int, default=None, help="windows per split at most (default 2000)")
    audit.add_argument("--config", default=None, metavar="PATH", help="a TOML file with [audit] and [evaluation] tables")
    audit.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one setting of the config, e.g. --set evaluation.n_boot=200")
    audit.add_argument("--out", default="runs/audit", help="where results.json, results.csv and report.html go")
    audit.add_argument("--device", default="auto", help="auto, cpu or cuda")
    audit.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    audit.set_defaults(run=_audit)
    report = commands.add_parser("report", help="rebuild report.html from a results.json", formatter_class=formatter)
    report.add_argument("results", help="path to results.json (a projection.json beside it is included)")
    report.add_argument("--out", default=None, help="where to write the HTML (default: beside results.json)")
    report.set_defaults(run=_report)
    info = commands.add_parser("info", help="print package, TransformerLens and torch versions and usable backends")
    info.set_defaults(run=_info)
    return parser


@contextmanager
def _no_empty_output(out: str | None) -> Iterator[None]:
    """On failure, remove the output folder again if this command created it and left it empty."""
    folder = Path(out) if out and out.strip() else None
    existed = folder is None or folder.exists()
    try:
        yield
    except BaseException:
        if not existed:
            for path in sorted([folder, *folder.rglob("*")], key=lambda p: len(p.parts), reverse=True):
                if path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
        raise


def _process() -> str:
    """`` (process R of N)`` when running under torchrun, else nothing."""
    import torch.distributed as dist

    from illusion_probe.distributed import world

    if not (dist.is_available() and dist.is_initialized()):
        return ""
    here = world()
    return f" (process {here.rank} of {here.size})"


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code (tests call ``main([...])`` directly).

    Under ``torchrun`` every process runs the command (:mod:`illusion_probe.distributed`); a process that
    stops because another failed exits without repeating its error (the main process says it stopped)."""
    from illusion_probe import distributed

    args = build_parser().parse_args(argv)
    run: Command = args.run
    try:
        with _no_empty_output(getattr(args, "out", None) if args.command != "report" else None):
            distributed.world()  # joins the process group under torchrun, before any work
            return run(args)
    except distributed.PeerFailed as err:  # the process that failed says why; the main process adds one line
        if distributed.world().is_main:
            print(f"illusion-probe: error{_process()}: {err}", file=sys.stderr)
        return 1
    except IllusionProbeError as err:
        print(f"illusion-probe: error{_process()}: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the environment, not the input: a file that cannot be read, a full disk
        where = f"{err.filename}: " if err.filename else ""
        print(f"illusion-probe: error{_process()}: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"illusion-probe: error{_process()}: out of memory; use smaller batches (--set evaluation.batch_size=16) or "
              "fewer sequences", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("illusion-probe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
