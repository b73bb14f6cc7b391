"""Where a saved object came from: package versions and the git commit."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path


def package_version(distribution: str) -> str | None:
    """Installed version of ``distribution``, or ``None`` when it is absent."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def git_hash(start: Path | None = None) -> str | None:
    """The commit of the git checkout holding this package, if there is one."""
    here = start or Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def _own_version() -> str:
    from illusion_probe import __version__

    return __version__


def versions() -> dict[str, str | None]:
    """Versions that decide whether a saved object reproduces: ours, TransformerLens, torch."""
    return {
        "illusion_probe": package_version("illusion-probe") or _own_version(),
        "transformer_lens": package_version("transformer-lens"),
        "torch": package_version("torch"),
        "python": platform.python_version(),
    }


def provenance() -> dict[str, object]:
    """Versions, the git commit and torch's CPU thread count (it changes float results), for every JSON file
    the package writes."""
    import torch

    return {"versions": versions(), "git_hash": git_hash(), "threads": torch.get_num_threads()}
