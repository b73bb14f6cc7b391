"""The ``illusion-probe`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from illusion_probe.errors import IllusionProbeError

Command = Callable[[argparse.Namespace], int]


def _info(args: argparse.Namespace) -> int:
    from illusion_probe.models import available_backends
    from illusion_probe.provenance import versions

    for name, version in versions().items():
        print(f"{name:>18}: {version}")
    print(f"{'backends':>18}: {', '.join(available_backends())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="illusion-probe",
        description="Measure how faithful simplified proxies of a transformer stay off the training distribution.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
