"""Safe, atomic artefacts: a directory of safetensors tensors plus JSON metadata.

Writers build the whole directory under a temporary name beside the target and
rename it into place, so a crash never leaves a half-written artefact. Readers
turn every failure of ``json`` or ``safetensors`` into a one-line
:class:`~illusion_probe.errors.ArtifactError` that names the file. Nothing is
ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from illusion_probe.errors import ArtifactError

if TYPE_CHECKING:
    import torch

METADATA_FILE = "metadata.json"


def _umask_mode(full: int) -> int:
    """``full`` permissions less the process umask: what a plain ``open``/``mkdir`` would give."""
    mask = os.umask(0)
    os.umask(mask)
    return full & ~mask


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``path`` on clean exit.

    On error the temporary directory is removed and ``path`` is left as it was.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        staging.chmod(_umask_mode(0o777))  # mkdtemp makes it private; the artefact should not be
    except OSError as err:
        raise ArtifactError(f"{target}: cannot write here ({err.strerror or err}); choose a writable path") from None
    try:
        yield staging
        _replace_directory(staging, target)
    except OSError as err:  # a full disk, a quota, a directory gone read-only: nothing half-written stays
        raise ArtifactError(f"{target}: could not be written ({err.strerror or err}); free space or choose "
                            "another path, then rerun") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_directory(staging: Path, target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise ArtifactError(f"{target}: exists and is not a directory; remove it or choose another path")
    backup = None
    if target.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        backup.rmdir()
        os.replace(target, backup)
    os.replace(staging, target)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as err:
        raise ArtifactError(f"{target}: cannot write here ({err.strerror or err}); choose a writable path") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, _umask_mode(0o666))  # mkstemp makes it private; the artefact should not be
        os.replace(tmp, target)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise ArtifactError(f"{target}: could not be written ({err.strerror or err}); free space or choose "
                            "another path, then rerun") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    """Atomically write ``data`` as indented, key-sorted JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON object, or raise a one-line :class:`ArtifactError` naming the file."""
    file = Path(path)
    if file.is_dir():
        raise ArtifactError(f"{file}: is a directory; give the path of a JSON file")
    if not file.is_file():
        raise ArtifactError(f"{file}: missing; was the artefact written completely?")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{file}: expected a JSON object, found {type(data).__name__}")
    return data


def write_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> None:
    """Save tensors with safetensors (contiguous CPU copies; shared storage is fine)."""
    from safetensors.torch import save

    # Serialised here and written by Python, so a full disk raises OSError like every other write here.
    data = save({name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()})
    with open(path, "wb") as handle:
        handle.write(data)


def read_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file, or raise a one-line :class:`ArtifactError` naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path)
    if not file.is_file():
        raise ArtifactError(f"{file}: missing; was the artefact written completely?")
    try:
        return load_file(str(file), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ArtifactError(f"{file}: corrupted or truncated safetensors file ({reason})") from None


def check_format(
    metadata: Mapping[str, Any], file: Path, kind: str, supported: int, upgrade_hint: str = ""
) -> None:
    """Refuse metadata whose ``kind`` or ``format_version`` this package cannot read."""
    found_kind = metadata.get("kind")
    if found_kind != kind:
        raise ArtifactError(f"{file}: is a {found_kind!r} artefact, not a {kind!r} one")
    version = metadata.get("format_version")
    if version != supported:
        hint = upgrade_hint or "use the illusion-probe version that wrote it"
        raise ArtifactError(
            f"{file}: unknown {kind} format version {version!r} (this illusion-probe reads {supported}); {hint}"
        )


def field(metadata: Mapping[str, Any], key: str, file: Path, convert: Callable[[Any], Any] = lambda v: v) -> Any:
    """``metadata[key]`` converted, or a one-line :class:`ArtifactError` if absent or malformed."""
    if key not in metadata:
        raise ArtifactError(f"{file}: metadata has no {key!r} field")
    try:
        return convert(metadata[key])
    except (TypeError, ValueError, KeyError) as err:
        raise ArtifactError(f"{file}: malformed {key!r} field ({err})") from None
