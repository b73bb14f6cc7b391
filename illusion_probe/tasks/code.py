"""Character-level code completion on windows of source files, with new-language OOD splits.

Corpus (:mod:`illusion_probe.tasks.code_corpus`): ``*.py`` files of the running interpreter's
standard library (test directories excluded unless ``include_tests``), split by file into
``train``, held-out ``val`` (for choosing: early stopping, headline proxies) and held-out ``test``
files with a seeded hash of each relative path; ``ood_cpp`` from the ``*.h`` headers inside the
installed torch package; ``ood_perl``, ``ood_javascript``, ``ood_shell`` from files the system
image ships (``system_languages``); ``ood_<language>`` for every user directory and for a Hugging
Face dataset. Each split reads files in a seeded order up to a
character budget and records what it used in ``split.meta``.

Tokens: ``<PAD>``, ``<BOS>``, ``<UNK>`` then one token per character seen at least
``min_char_count`` times in the training text, in code-point order; any other character is
``<UNK>``. A sequence is ``<BOS>`` followed by ``window`` characters cut from one file (windows
start at multiples of ``stride``); no window text appears twice, within or across splits.

Position ``p`` predicts token ``p + 1`` (character ``p`` of the window). It is scored when that
token is a character other than ``<UNK>``. Labels at ``p`` describe that next character:

- ``closing_bracket``: it is one of ``)]}``.
- ``copying``: it is a non-initial character of a word (``[A-Za-z_][A-Za-z0-9_]*`` not preceded by
  a letter, digit or ``_``) whose exact text already occurred earlier in the window: a prediction
  copying can make (what induction heads do).
- ``first_occurrence``: a non-initial character of a word whose first occurrence in the window this is
  (with ``copying`` it partitions non-initial word characters).
- ``depth`` (int): brackets ``([{`` open before it, counted from the window start, never below 0
  (a closer at depth 0 is ignored). Brackets inside strings and comments count too.
- ``deep_nesting``: ``depth > deep_depth``, by default the median depth over every position of
  every candidate training window.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from illusion_probe.config import check_types, task_preset
from illusion_probe.errors import IllusionProbeError, require
from illusion_probe.registry import register_task
from illusion_probe.tasks.base import Role, Split, SplitSet, Task
from illusion_probe.tasks.code_corpus import (
    STDLIB_SKIP_DIRS,
    SYSTEM_SOURCES,
    TEST_DIRS,
    SourceText,
    list_files,
    read_files,
    read_hf_dataset,
    split_files,
    stable_seed,
    stdlib_dir,
    torch_include_dir,
)

SPECIALS = ("<PAD>", "<BOS>", "<UNK>")
PAD_ID, BOS_ID, UNK_ID = 0, 1, 2
OPENING, CLOSING = "([{", ")]}"
CATEGORIES = ("closing_bracket", "copying", "deep_nesting", "first_occurrence")
UNK_TEXT = "\ufffd"
_WORD = re.compile(r"(?<![A-Za-z0-9_])[A-Za-z_][A-Za-z0-9_]*")
_LANGUAGE = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class CodeConfig:
    """The code task: sources, budgets, windows and vocabulary.

    Attributes:
        window: characters per sequence (the model sees ``<BOS>`` plus these, so ``n_ctx = window + 1``).
        stride: characters between window starts within a file; ``None`` means ``window`` (no overlap).
        n_train: windows in ``train``.
        n_test: windows in ``test`` (held-out Python files), and in ``val`` (other held-out files).
        n_ood: windows in each ``ood_*`` split.
        max_train_chars: character budget of the training files (files read in a seeded order).
        max_eval_chars: character budget of ``val``, ``test`` and of each ``ood_*`` split.
        test_fraction: share of Python files held out for ``test``, in (0, 1).
        val_fraction: share of Python files held out for ``val``, in [0, 1 - test_fraction); 0 makes no
            ``val`` split (headline proxies are then chosen on ``test``).
        include_tests: also use the standard library's test directories (``test``, ``tests``, ``idle_test``).
        python_dir: directory of the in-distribution ``*.py`` files; ``None`` is the interpreter's stdlib.
        include_cpp: add ``ood_cpp`` from the C/C++ headers (``*.h``) inside the installed torch package.
        system_languages: add ``ood_<language>`` for each of ``"perl"`` (``*.pm`` in /usr/share/perl/5.*),
            ``"javascript"`` (``*.js`` of npm, /usr/lib/node_modules/npm) and ``"shell"`` (``sh``/``bash``/``dash``
            scripts in /usr/bin), read from this machine's system image; a missing one is refused.
        extra_sources: ``(language, directory)`` pairs; each adds ``ood_<language>`` from every
            non-hidden file below ``directory``.
        hf_dataset: a Hugging Face dataset name adding ``ood_<hf_language>`` (needs network or a cache).
        hf_config: the dataset's configuration name, if it has several.
        hf_split: the dataset split streamed.
        hf_text_field: the row field holding the text.
        hf_language: language name of the dataset's split (``ood_<hf_language>``).
        min_char_count: characters seen fewer times in the training text become ``<UNK>``.
        vocab: the characters of the vocabulary (specials excluded); ``None`` builds it from the
            training text. ``to_dict`` stores the built one, so a checkpoint keeps its vocabulary.
        deep_depth: ``deep_nesting`` is ``depth > deep_depth``; ``None`` uses the median training depth
            (also stored by ``to_dict``).
        seed: chooses the held-out files and the reading order (part of the task);
            ``make_splits(seed)`` draws the windows.
    """

    window: int = 128
    stride: int | None = None
    n_train: int = 20_000
    n_test: int = 1_000
    n_ood: int = 1_000
    max_train_chars: int = 4_000_000
    max_eval_chars: int = 1_000_000
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    include_tests: bool = False
    python_dir: str | None = None
    include_cpp: bool = True
    system_languages: tuple[str, ...] = ()
    extra_sources: tuple[tuple[str, str], ...] = ()
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    hf_text_field: str = "content"
    hf_language: str = "hf"
    min_char_count: int = 5
    vocab: tuple[str, ...] | None = None
    deep_depth: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        require(self.window >= 2, f"CodeConfig.window must be >= 2 characters, got {self.window}")
        require(self.stride is None or self.stride >= 1,
                f"CodeConfig.stride must be a positive integer or None, got {self.stride!r}")
        for name in ("n_train", "n_test", "n_ood", "min_char_count"):
            require(getattr(self, name) >= 1, f"CodeConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_train_chars", "max_eval_chars"):
            require(getattr(self, name) >= self.window,
                    f"CodeConfig.{name}={getattr(self, name)} cannot hold one window of {self.window} characters")
        require(0 < self.test_fraction < 1,
                f"CodeConfig.test_fraction must be in (0, 1), got {self.test_fraction!r}")
        require(0 <= self.val_fraction < 1 - self.test_fraction,
                f"CodeConfig.val_fraction must be in [0, 1 - test_fraction) = [0, {1 - self.test_fraction:g}), "
                f"got {self.val_fraction!r}")
        for language in self.system_languages:
            require(language in SYSTEM_SOURCES, f"CodeConfig.system_languages: {language!r} is not one of "
                                                f"{sorted(SYSTEM_SOURCES)}; add other languages with extra_sources")
        require(self.deep_depth is None or self.deep_depth >= 0,
                f"CodeConfig.deep_depth must be a non-negative integer or None, got {self.deep_depth!r}")
        for pair in self.extra_sources:
            require(isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(x, str) and x for x in pair),
                    f"CodeConfig.extra_sources entries must be (language, directory) pairs, got {pair!r}")
        require(self.hf_dataset is None or (isinstance(self.hf_dataset, str) and self.hf_dataset.strip() != ""),
                f"CodeConfig.hf_dataset must be a dataset name or None, got {self.hf_dataset!r}")
        seen = {"python"}
        for language in self.ood_languages:
            require(bool(_LANGUAGE.fullmatch(language)),
                    f"CodeConfig: language {language!r} must be lower-case letters, digits and '_' (it names ood_{language})")
            require(language not in seen, f"CodeConfig: language {language!r} is given twice (python, and cpp when "
                                          "include_cpp, are taken); name each source once")
            seen.add(language)
        if self.vocab is not None:
            require(all(isinstance(c, str) and len(c) == 1 for c in self.vocab) and len(set(self.vocab)) == len(self.vocab)
                    and len(self.vocab) > 0, "CodeConfig.vocab must be distinct single characters")

    @property
    def ood_languages(self) -> list[str]:
        """Languages of the ``ood_*`` splits, in split order."""
        return ((["cpp"] if self.include_cpp else []) + list(self.system_languages)
                + [lang for lang, _ in self.extra_sources]
                + ([self.hf_language] if self.hf_dataset is not None else []))

    @property
    def effective_stride(self) -> int:
        """Characters between window starts."""
        return self.window if self.stride is None else self.stride

    @classmethod
    def preset(cls, name: str) -> CodeConfig:
        """The ``[task]`` table of a shipped preset (``illusion_probe/presets/code_<name>.toml``): ``"tiny"``
        (seconds, CI), ``"quick"`` (CPU minutes) or ``"paper"`` (larger; a GPU is advised)."""
        return task_preset(cls, "code", name)

@register_task
class CodeTask(Task):
    """Character-level next-token prediction on windows of Python files, with new-language OOD splits."""

    kind: ClassVar[str] = "code"
    config_class: ClassVar[type] = CodeConfig
    pad_id: ClassVar[int] = PAD_ID
    bos_id: ClassVar[int] = BOS_ID

    def __init__(self, config: CodeConfig | None = None):
        self.config = config or CodeConfig()
        self._train_text: SourceText | None = None
        self._chars: tuple[str, ...] | None = self.config.vocab
        self._deep_depth: int | None = self.config.deep_depth

    def __repr__(self) -> str:
        held_out = ["val", "test"] if self.config.val_fraction > 0 else ["test"]
        return f"CodeTask(window={self.config.window}, splits={', '.join(['train', *held_out, *self.ood_splits])})"

    @property
    def ood_splits(self) -> list[str]:
        """Names of the OOD splits this config makes."""
        return [f"ood_{language}" for language in self.config.ood_languages]

    @property
    def vocab(self) -> list[str]:
        """Specials then characters; built from the training text on first use unless the config gives it."""
        return [*SPECIALS, *self._characters()]

    @property
    def n_ctx(self) -> int:
        return self.config.window + 1

    @property
    def answer_ids(self) -> Int[Tensor, " d_vocab"]:
        """The whole vocabulary."""
        return torch.arange(self.d_vocab)

    @property
    def unk_id(self) -> int:
        """Id of ``<UNK>``, which every character outside the vocabulary maps to."""
        return UNK_ID

    @property
    def deep_depth(self) -> int:
        """Positions deeper than this are ``deep_nesting``."""
        if self._deep_depth is None:
            cfg = self.config
            text = self._training_text()
            depth = bracket_depth(_codepoints(_all_windows(text, cfg.window, cfg.effective_stride)))[:, :-1]
            require(depth.size > 0, f"no training window of {cfg.window} characters; lower window or raise max_train_chars")
            flat = depth.ravel()
            self._deep_depth = int(np.partition(flat, (flat.size - 1) // 2)[(flat.size - 1) // 2])
        return self._deep_depth

    def encode(self, text: str) -> Int[Tensor, " pos"]:
        """Character ids of ``text`` (no ``<BOS>`` added); characters outside the vocabulary are ``<UNK>``."""
        if not text:
            return torch.zeros(0, dtype=torch.long)
        return torch.from_numpy(self._ids(_codepoints([text]))[0])

    def decode(self, ids: Tensor | list[int]) -> str:
        """Text of ``ids``: ``<PAD>`` and ``<BOS>`` dropped, ``<UNK>`` shown as U+FFFD."""
        vocab = self.vocab
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return "".join(UNK_TEXT if i == UNK_ID else vocab[i] for i in ids if i not in (PAD_ID, BOS_ID))

    def file_split(self) -> dict[str, list[str]]:
        """``{"train": [...], "val": [...], "test": [...]}``: every Python file (relative path) assigned to each split."""
        return split_files(self._python_files(), self.config.seed, self.config.test_fraction, self.config.val_fraction)

    def resolved_config(self) -> CodeConfig:
        """The config with ``vocab`` and ``deep_depth`` filled in (reads the training text if needed)."""
        return dataclasses.replace(self.config, vocab=self._characters(), deep_depth=self.deep_depth)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config, so a rebuilt task has this vocabulary on any machine."""
        return {"kind": self.kind, "config": dataclasses.asdict(self.resolved_config())}

    def make_splits(self, seed: int = 0) -> SplitSet:
        """``train``, ``val`` (unless ``val_fraction`` is 0), ``test`` and one ``ood_<language>`` per other source;
        see the module docstring.

        Every directory is listed (and a missing or empty one refused) before any text is read.
        Each split samples its windows with a generator seeded by ``seed`` and the split name,
        skipping window texts an earlier split (or itself) already holds.
        """
        cfg = self.config
        held_out = self.file_split()
        directories = ([("cpp", str(torch_include_dir()), (".h",), None)] if cfg.include_cpp else [])
        directories += [(language, str(SYSTEM_SOURCES[language].directory(language)), SYSTEM_SOURCES[language].suffixes,
                         SYSTEM_SOURCES[language].interpreters) for language in cfg.system_languages]
        directories += [(language, folder, None, None) for language, folder in cfg.extra_sources]
        listed = {language: list_files(folder, language, suffixes, interpreters=interpreters)
                  for language, folder, suffixes, interpreters in directories}
        for name, fraction in (("val", cfg.val_fraction), ("test", cfg.test_fraction)):
            require(fraction == 0 or len(held_out[name]) > 0,
                    f"no Python file is held out for {name} in {self._python_root()}; raise {name}_fraction")
        texts: list[tuple[str, Role, SourceText]] = [("train", "train", self._training_text())]
        for name, role in (("val", "val"), ("test", "id")):
            if held_out[name]:
                texts.append((name, role, read_files(self._python_root(), held_out[name], language="python",
                                                     seed=cfg.seed, budget=cfg.max_eval_chars)))
        for language, folder, _, _ in directories:
            texts.append((f"ood_{language}", "ood", read_files(folder, listed[language], language=language,
                                                                seed=cfg.seed, budget=cfg.max_eval_chars)))
        if cfg.hf_dataset is not None:
            texts.append((f"ood_{cfg.hf_language}", "ood", read_hf_dataset(
                cfg.hf_dataset, config=cfg.hf_config, split=cfg.hf_split, text_field=cfg.hf_text_field,
                language=cfg.hf_language, budget=cfg.max_eval_chars)))
        seen: set[str] = set()
        splits = []
        for name, role, text in texts:
            n = {"train": cfg.n_train, "val": cfg.n_test, "id": cfg.n_test}.get(role, cfg.n_ood)
            generator = torch.Generator().manual_seed(stable_seed(seed, name))
            windows, n_candidates = sample_windows(text, n, cfg.window, cfg.effective_stride, generator, seen, name)
            splits.append(self._build_split(name, role, windows, {**text.meta(), "candidate_windows": n_candidates,
                                                                  "seed": seed}))
        return SplitSet(splits)

    def labels(self, windows: list[str]) -> dict[str, Tensor]:
        """Category masks and ``depth`` ``[n, window + 1]`` for equal-length window texts (see the module docstring)."""
        codepoints = _codepoints(windows)
        depth = bracket_depth(codepoints)
        copying, first = word_masks(windows)
        pad = np.zeros((len(windows), 1), dtype=bool)
        closing = np.isin(codepoints, [ord(c) for c in CLOSING])
        return {
            "closing_bracket": torch.from_numpy(np.concatenate([closing, pad], axis=1)),
            "copying": torch.from_numpy(np.concatenate([copying, pad], axis=1)),
            "deep_nesting": torch.from_numpy(depth > self.deep_depth),
            "first_occurrence": torch.from_numpy(np.concatenate([first, pad], axis=1)),
            "depth": torch.from_numpy(depth),
        }

    # -- internals ---------------------------------------------------------------------------

    def _build_split(self, name: str, role: Role, windows: list[str], meta: dict[str, Any]) -> Split:
        chars = torch.from_numpy(self._ids(_codepoints(windows)))
        tokens = torch.cat([torch.full((len(windows), 1), BOS_ID, dtype=torch.long), chars], dim=1)
        eval_mask = torch.zeros_like(tokens, dtype=torch.bool)
        eval_mask[:, :-1] = chars != UNK_ID
        targets = torch.full_like(tokens, PAD_ID)
        targets[:, :-1] = torch.where(eval_mask[:, :-1], chars, PAD_ID)
        meta = {"task": "code", "window": self.config.window, "stride": self.config.effective_stride, "n": len(windows),
                "n_scored": int(eval_mask.sum()), "unk_fraction": round(float((chars == UNK_ID).float().mean()), 6),
                "vocab_size": self.d_vocab, "deep_depth": self.deep_depth, **meta}
        return Split(name=name, role=role, tokens=tokens, eval_mask=eval_mask, targets=targets,
                     real_mask=torch.ones_like(tokens, dtype=torch.bool), labels=self.labels(windows), meta=meta)

    def _python_root(self) -> str:
        return self.config.python_dir if self.config.python_dir is not None else str(stdlib_dir())

    def _python_files(self) -> list[str]:
        skip = STDLIB_SKIP_DIRS | (frozenset() if self.config.include_tests else TEST_DIRS)
        return list_files(self._python_root(), "python", (".py",), skip)

    def _training_text(self) -> SourceText:
        if self._train_text is None:
            train = self.file_split()["train"]
            require(len(train) > 0, f"every Python file in {self._python_root()} is held out; lower test_fraction")
            self._train_text = read_files(self._python_root(), train, language="python", seed=self.config.seed,
                                          budget=self.config.max_train_chars)
        return self._train_text

    def _characters(self) -> tuple[str, ...]:
        if self._chars is None:
            text = "".join(self._training_text().texts)
            require(len(text) > 0, f"the training files in {self._python_root()} hold no readable text")
            points, counts = np.unique(_codepoints([text]), return_counts=True)
            self._chars = tuple(chr(p) for p in points[counts >= self.config.min_char_count].tolist())
            require(len(self._chars) > 0, f"no character occurs {self.config.min_char_count}+ times in the training "
                                          "text; lower min_char_count")
        return self._chars

    def _ids(self, codepoints: np.ndarray) -> np.ndarray:
        """Token ids (int64) of a code-point array of any shape."""
        chars = np.array([ord(c) for c in self._characters()], dtype=np.uint32)
        order = np.argsort(chars)
        known = chars[order]
        where = np.minimum(np.searchsorted(known, codepoints), len(known) - 1)
        found = known[where] == codepoints
        return np.where(found, order[where] + len(SPECIALS), UNK_ID).astype(np.int64)


def _codepoints(texts: list[str]) -> np.ndarray:
    """``[len(texts), len(texts[0])]`` uint32 code points of equal-length strings."""
    width = len(texts[0]) if texts else 0
    require(all(len(t) == width for t in texts), "window texts must all have the same length")
    flat = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype="<u4")
    return flat.reshape(len(texts), width).astype(np.uint32)


def bracket_depth(codepoints: np.ndarray) -> np.ndarray:
    """``[n, w + 1]`` int64: brackets open before each character, from the window start and never below 0.

    Column ``p`` is the depth after the first ``p`` characters (column 0 is 0, the ``<BOS>`` position).
    A random walk floored at 0 is ``S_p - min(0, min_{u <= p} S_u)`` for the unfloored cumulative sum ``S``.
    """
    step = (np.isin(codepoints, [ord(c) for c in OPENING]).astype(np.int64)
            - np.isin(codepoints, [ord(c) for c in CLOSING]).astype(np.int64))
    total = np.concatenate([np.zeros((len(step), 1), dtype=np.int64), np.cumsum(step, axis=1)], axis=1)
    return total - np.minimum.accumulate(np.minimum(total, 0), axis=1)


def word_masks(windows: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(copying, first_occurrence)`` ``[n, w]`` over characters: non-initial word characters whose
    word did / did not occur earlier in the same window."""
    width = len(windows[0]) if windows else 0
    copying = np.zeros((len(windows), width), dtype=bool)
    first = np.zeros((len(windows), width), dtype=bool)
    for row, text in enumerate(windows):
        seen: set[str] = set()
        for match in _WORD.finditer(text):
            word = match.group()
            start, end = match.span()
            (copying if word in seen else first)[row, start + 1:end] = True
            seen.add(word)
    return copying, first


def _all_windows(text: SourceText, window: int, stride: int) -> list[str]:
    return [t[o:o + window] for t in text.texts for o in range(0, len(t) - window + 1, stride)]


def sample_windows(text: SourceText, n: int, window: int, stride: int, generator: torch.Generator,
                   seen: set[str], name: str) -> tuple[list[str], int]:
    """``n`` window texts drawn without replacement from ``text``, skipping texts in ``seen`` (then added to it).

    Returns the windows and the number of candidate windows. Raises if fewer than ``n`` distinct new ones exist.
    """
    starts = [(f, o) for f, t in enumerate(text.texts) for o in range(0, len(t) - window + 1, stride)]
    chosen: list[str] = []
    for index in torch.randperm(len(starts), generator=generator).tolist():
        f, o = starts[index]
        candidate = text.texts[f][o:o + window]
        if candidate not in seen:
            seen.add(candidate)
            chosen.append(candidate)
            if len(chosen) == n:
                return chosen, len(starts)
    raise IllusionProbeError(
        f"code split {name!r}: only {len(chosen)} distinct new windows of {window} characters in {len(text.texts)} "
        f"files ({text.chars:,} characters) but {n} asked; raise the character budget, lower n_* or the window")
