"""Text in: documents from files, tokenised with a model's own tokenizer into windows of a split.

Files: a ``.jsonl`` file holds one document per line (the ``text`` field of a JSON object); a
``.txt`` file one document per non-empty line; a directory one document per file below it (sorted
paths, hidden files skipped); any other file is one document. Files are read as strict UTF-8;
undecodable files and lines are skipped and counted, never guessed at.

Each document is tokenised without special tokens and cut into windows of ``window`` tokens; when
the model prepends a BOS token, each window starts with one (so every window reads like the start
of a context, as the model saw in training) and holds ``window - 1`` tokens of text. A document's
last window may be shorter; windows are right-padded, and a window with fewer than two tokens is
dropped, and so are the windows beyond ``max_sequences``. ``split.meta`` records what was used and
what was skipped, and why.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from illusion_probe.backends import Backend
from illusion_probe.errors import require
from illusion_probe.tasks.base import Role, Split


@dataclass(frozen=True)
class Documents:
    """Documents read from a source, with a count of what was skipped per reason."""

    texts: tuple[str, ...]
    source: str
    skipped: dict[str, int] = field(default_factory=dict)


def read_documents(path: str | os.PathLike, text_field: str = "text") -> Documents:
    """The documents in ``path`` (see the module docstring for the formats); a missing path is a one-line error."""
    source = Path(path)
    require(source.exists(), f"text source {source} not found; give a .txt, .jsonl or other text file, or a directory")
    skipped: Counter[str] = Counter()
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(source).parts))
        texts = [text for text in (_read(p, skipped) for p in files) if text is not None]
    elif source.suffix == ".jsonl":
        texts = _jsonl(source, text_field, skipped)
    elif source.suffix == ".txt":
        whole = _read(source, skipped)
        texts = [line for line in (whole or "").splitlines() if line.strip()]
    else:
        whole = _read(source, skipped)
        texts = [] if whole is None else [whole]
    empty = sum(1 for text in texts if not text.strip())
    if empty:
        skipped["empty"] += empty
    return Documents(tuple(text for text in texts if text.strip()), str(source), dict(skipped))


def _read(file: Path, skipped: Counter[str]) -> str | None:
    try:
        return file.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        skipped["not UTF-8"] += 1
        return None
    except OSError:
        skipped["unreadable"] += 1
        return None


def _jsonl(file: Path, text_field: str, skipped: Counter[str]) -> list[str]:
    whole = _read(file, skipped)
    texts = []
    for line in (whole or "").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped["not JSON"] += 1
            continue
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            skipped[f"no {text_field!r} text field"] += 1
            continue
        texts.append(record[text_field])
    return texts


def tokenizer_of(model: torch.nn.Module) -> Any:
    """The model's own tokenizer; a model without a usable one is a one-line error."""
    tokenizer = getattr(model, "tokenizer", None)
    require(tokenizer is not None, f"{type(model).__name__} has no tokenizer; save one next to the model "
            "(tokenizer.save_pretrained) or build splits from token ids with ip.Split.from_tokens")
    require(len(tokenizer) > 2, f"the model's tokenizer knows only {len(tokenizer)} token(s), a placeholder; save "
            "the real tokenizer next to the model or build splits from token ids with ip.Split.from_tokens")
    return tokenizer


def split_from_text(model: torch.nn.Module, texts: Sequence[str] | str | os.PathLike, role: Role = "id",
                    window: int | None = None, name: str = "custom", stride: int | None = None,
                    max_sequences: int | None = None) -> Split:
    """:meth:`Split.from_text`: documents (or a path to them) as a next-token split of windows."""
    backend = Backend.of(model)
    if isinstance(texts, (str, os.PathLike)):
        documents = read_documents(texts)
    else:
        require(isinstance(texts, Sequence) and all(isinstance(t, str) for t in texts),
                "Split.from_text: texts must be a path or a list of strings")
        empty = sum(1 for t in texts if not t.strip())
        documents = Documents(tuple(t for t in texts if t.strip()), "a list of texts", {"empty": empty} if empty else {})
    window = backend.n_ctx if window is None else window
    require(isinstance(window, int) and 2 <= window <= backend.n_ctx,
            f"window of {window} tokens does not fit the model's context of {backend.n_ctx}; choose 2 to {backend.n_ctx}")
    tokenizer = tokenizer_of(model)
    bos = tokenizer.bos_token_id if getattr(backend.cfg, "default_prepend_bos", True) else None
    body = window - (bos is not None)
    stride = body if stride is None else stride
    require(isinstance(stride, int) and stride >= 1, f"stride must be a positive integer, got {stride!r}")
    require(max_sequences is None or (isinstance(max_sequences, int) and max_sequences >= 1),
            f"max_sequences must be a positive integer or None, got {max_sequences!r}")
    windows: list[list[int]] = []
    owners: list[int] = []  # the document each window comes from
    short = 0
    for index, text in enumerate(documents.texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces = [([bos] if bos is not None else []) + ids[start:start + body] for start in range(0, len(ids), stride)]
        pieces = [piece for piece in pieces if len(piece) >= 2]
        short += not pieces
        windows += pieces
        owners += [index] * len(pieces)
    dropped = 0 if max_sequences is None else max(len(windows) - max_sequences, 0)
    windows = windows[:len(windows) - dropped]
    used = len(set(owners[:len(windows)]))
    require(bool(windows), f"split {name!r}: no window of at least two tokens in {documents.source} "
            f"({len(documents.texts)} documents); give more text")
    tokens = torch.zeros(len(windows), max(map(len, windows)), dtype=torch.long)
    real = torch.zeros_like(tokens, dtype=torch.bool)
    for row, piece in enumerate(windows):
        tokens[row, :len(piece)] = torch.tensor(piece)
        real[row, :len(piece)] = True
    require(int(tokens.max()) < backend.d_vocab, f"the tokenizer gives id {int(tokens.max())}, outside the model's "
            f"vocabulary of {backend.d_vocab}; use the tokenizer saved with the model")
    skipped = {**documents.skipped, **({"shorter than two tokens": short} if short else {}),
               **({"windows beyond max_sequences": dropped} if dropped else {})}
    meta = {"source": documents.source, "documents": len(documents.texts) + sum(documents.skipped.values()),
            "documents_used": used, "skipped": skipped, "windows": len(windows), "tokens": int(real.sum()),
            "window": window, "stride": stride, "bos": bos is not None}
    return Split.next_token(tokens, real, role, name, meta=meta)
