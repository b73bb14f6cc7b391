"""Where the code task's text comes from: file discovery, a seeded file split, budgeted reading.

Sources need no download: the running interpreter's standard library (Python, in distribution),
the C/C++ headers shipped inside the installed torch package (a new language) and, where the
system image ships them, Perl modules, npm's JavaScript and shell scripts (:data:`SYSTEM_SOURCES`).
Users add ``language=directory`` sources and, with network access, a Hugging Face dataset.

Everything here is deterministic and machine-independent: files are listed as sorted POSIX paths
relative to their source root, and every seeded choice hashes ``(seed, tag, relative path)`` with
BLAKE2b (never Python's per-process randomised ``hash``). Files are read as bytes and decoded as
strict UTF-8 without newline translation, so ``"\\r\\n"`` and tabs survive; a file holding a NUL
byte (binary) or invalid UTF-8 is skipped and counted.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from illusion_probe.errors import IllusionProbeError

#: Directories never entered when listing the standard library.
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
#: Test directories, entered only when ``CodeConfig.include_tests`` is set.
TEST_DIRS = frozenset({"test", "tests", "idle_test"})


def stdlib_dir() -> Path:
    """The running interpreter's standard library (``sysconfig.get_paths()["stdlib"]``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def torch_include_dir() -> Path:
    """The C/C++ headers shipped inside the installed torch package."""
    import torch

    return Path(torch.__file__).parent / "include"


@dataclass(frozen=True)
class SystemSource:
    """Files of one language that a Debian-based system image ships.

    Attributes:
        pattern: the directory, as a glob; the last match in sorted order is used (the newest version).
        suffixes: keep files with these endings (``None``: every file).
        interpreters: keep files whose first line is a ``#!`` line naming one of these programs
            (``#!/bin/sh``, ``#!/usr/bin/env bash``); ``None``: no such filter.
        package: what installs it, for the error when it is missing.
    """

    pattern: str
    suffixes: tuple[str, ...] | None = None
    interpreters: tuple[str, ...] | None = None
    package: str = ""

    def directory(self, language: str) -> Path:
        """The directory this machine has for the source.

        Raises:
            IllusionProbeError: no directory matches (the package is not installed).
        """
        matches = sorted(glob.glob(self.pattern))
        if not matches:
            raise IllusionProbeError(f"code source {language!r}: this machine has no {self.pattern} (from "
                                     f"{self.package}); install it, or drop {language!r} from system_languages")
        return Path(matches[-1])


#: ``CodeConfig.system_languages``: new languages read from files the system image ships.
SYSTEM_SOURCES: dict[str, SystemSource] = {
    "perl": SystemSource("/usr/share/perl/5.*", suffixes=(".pm",), package="perl-modules"),
    "javascript": SystemSource("/usr/lib/node_modules/npm", suffixes=(".js",), package="npm"),
    "shell": SystemSource("/usr/bin", interpreters=("sh", "bash", "dash"), package="the base system"),
}


def stable_unit(seed: int, *parts: str) -> float:
    """A number in ``[0, 1)`` fixed by ``seed`` and ``parts``, the same on every machine and process."""
    digest = hashlib.blake2b("\0".join([str(seed), *parts]).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def stable_seed(seed: int, *parts: str) -> int:
    """A 63-bit generator seed fixed by ``seed`` and ``parts``."""
    return int(stable_unit(seed, "generator", *parts) * 2**63)


def list_files(root: str | os.PathLike, language: str, suffixes: tuple[str, ...] | None = None,
               skip_dirs: frozenset[str] = frozenset(), interpreters: tuple[str, ...] | None = None) -> list[str]:
    """Sorted POSIX paths, relative to ``root``, of the files a source offers.

    Hidden files and directories (leading ``.``) and directories named in ``skip_dirs`` are left
    out; ``suffixes`` keeps only files with those endings and ``interpreters`` only scripts whose
    ``#!`` line names one of those programs (``None`` keeps every file).

    Raises:
        IllusionProbeError: ``root`` is missing, not a directory, or holds no matching file.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise IllusionProbeError(f"code source {language!r}: directory {str(base)!r} does not exist or is not a directory")
    found = []
    for folder, dirs, files in os.walk(base):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in skip_dirs]
        for name in files:
            if name.startswith(".") or (suffixes is not None and not name.endswith(suffixes)):
                continue
            path = Path(folder, name)
            if path.is_file() and (interpreters is None or _interpreter(path) in interpreters):
                found.append(path.relative_to(base).as_posix())
    if not found:
        wanted = "" if suffixes is None else f" ending in {', '.join(suffixes)}"
        raise IllusionProbeError(f"code source {language!r}: directory {str(base)!r} holds no files{wanted}")
    return sorted(found)


def _interpreter(path: Path) -> str | None:
    """The program a ``#!`` line names (``sh`` for ``#!/bin/sh -e``, ``bash`` for ``#!/usr/bin/env bash``)."""
    try:
        with path.open("rb") as file:
            first = file.readline(256)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode("utf-8", "replace").split()
    if words and words[0].endswith("/env") and len(words) > 1:
        words = words[1:]
    return words[0].rsplit("/", 1)[-1] if words else None


def split_files(files: list[str], seed: int, test_fraction: float,
                val_fraction: float = 0.0) -> dict[str, list[str]]:
    """``{"train", "val", "test"}`` file lists: with ``u = stable_unit(seed, "holdout", path)``, a file is in
    ``test`` when ``u < test_fraction``, in ``val`` when ``u < test_fraction + val_fraction``, else in ``train``."""
    units = {f: stable_unit(seed, "holdout", f) for f in files}
    return {"train": [f for f in files if units[f] >= test_fraction + val_fraction],
            "val": [f for f in files if test_fraction <= units[f] < test_fraction + val_fraction],
            "test": [f for f in files if units[f] < test_fraction]}


def decode(data: bytes) -> tuple[str | None, str | None]:
    """``(text, None)`` for strict UTF-8 text, else ``(None, reason)`` with reason ``binary`` or ``undecodable``."""
    if b"\0" in data:
        return None, "binary"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, "undecodable"


@dataclass
class SourceText:
    """Text read for one split: the files used, in reading order, and what was skipped.

    Attributes:
        language: the split's language (``python`` for ``train``/``test``).
        source: the directory, or ``hf:<dataset>``.
        files_listed: files (or dataset rows looked at) available to the split.
        names: relative paths (or ``row:<i>``) of the files whose text is used.
        texts: their text; the last one may be cut to fit the character budget.
        skipped: reason (``binary``, ``undecodable``, ``not_text``) -> number of files skipped.
        budget: the character budget the split was read under.
        chars: characters used (the sum of ``len(text)`` over ``texts``).
    """

    language: str
    source: str
    files_listed: int
    budget: int
    names: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    chars: int = 0

    def add(self, name: str, text: str | None, reason: str | None) -> bool:
        """Use ``text`` (cut to the remaining budget) or count it as skipped; False once the budget is spent."""
        if text is None:
            self.skipped[reason or "undecodable"] = self.skipped.get(reason or "undecodable", 0) + 1
        elif text:
            self.names.append(name)
            self.texts.append(text[: self.budget - self.chars])
            self.chars += len(self.texts[-1])
        return self.chars < self.budget

    def meta(self) -> dict[str, Any]:
        """Corpus size facts for ``Split.meta``."""
        return {"language": self.language, "source": self.source, "files_listed": self.files_listed,
                "files_used": len(self.names), "chars": self.chars, "char_budget": self.budget,
                "skipped_files": sum(self.skipped.values()), "skipped_by_reason": dict(sorted(self.skipped.items())),
                "files": list(self.names)}


def read_files(root: str | os.PathLike, files: list[str], *, language: str, seed: int, budget: int,
               files_listed: int | None = None) -> SourceText:
    """Read ``files`` in a seeded order until ``budget`` characters are used.

    The order sorts files by ``stable_unit(seed, "order", language, path)``, so which files fit a
    budget is random but fixed by the seed. Skipped files are counted in ``SourceText.skipped``.
    """
    order = sorted(files, key=lambda f: (stable_unit(seed, "order", language, f), f))
    out = SourceText(language=language, source=str(root), budget=budget,
                     files_listed=len(files) if files_listed is None else files_listed)
    for name in order:
        try:
            data = Path(root, name).read_bytes()
        except OSError:
            out.add(name, None, "unreadable")
            continue
        if not out.add(name, *decode(data)):
            break
    return out


def read_hf_dataset(name: str, *, config: str | None, split: str, text_field: str, language: str,
                    budget: int) -> SourceText:
    """Stream rows of a Hugging Face dataset, in the dataset's order, until ``budget`` characters are used.

    Raises:
        IllusionProbeError: ``datasets`` is not installed, the Hub cannot be reached (offline, or
            ``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` set without a local copy), or ``text_field`` is missing.
    """
    try:
        import datasets
    except ImportError:
        raise IllusionProbeError(f"hf_dataset={name!r} needs the `datasets` package: pip install datasets") from None
    out = SourceText(language=language, source=f"hf:{name}", files_listed=0, budget=budget)
    try:
        rows = datasets.load_dataset(name, config, split=split, streaming=True)
        for index, row in enumerate(rows):
            out.files_listed += 1
            if text_field not in row:
                raise IllusionProbeError(f"hf_dataset {name!r} has no field {text_field!r}; its fields are "
                                         f"{sorted(row)}; set hf_text_field")
            value = row[text_field]
            if isinstance(value, bytes):
                value, reason = decode(value)
            else:
                value, reason = (value, None) if isinstance(value, str) else (None, "not_text")
            if not out.add(f"row:{index}", value, reason):
                break
    except IllusionProbeError:
        raise
    except (ConnectionError, OSError) as err:
        raise IllusionProbeError(f"cannot load Hugging Face dataset {name!r}: {_first_line(err)}; it needs network "
                                 "access or a local cache (is HF_DATASETS_OFFLINE or HF_HUB_OFFLINE set?)") from None
    except (ValueError, KeyError) as err:
        raise IllusionProbeError(f"cannot load Hugging Face dataset {name!r} (config={config!r}, split={split!r}): "
                                 f"{_first_line(err)}") from None
    if not out.texts:
        raise IllusionProbeError(f"hf_dataset {name!r} split {split!r} yielded no text in field {text_field!r}")
    return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
