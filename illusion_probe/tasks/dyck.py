"""Dyck-(k, m): balanced sequences of k bracket types nested at most m deep, with OOD splits.

Vocabulary ``["BOS", "PAD", "(0", ..., "(k-1", ")0", ..., ")k-1"]``; text is space-separated
tokens. A prediction is scored where the next token is a closing bracket (which bracket is
fully determined by the prefix) and is the argmax over the closing tokens.

Splits (every sequence unique within and across splits; lengths count the BOS token):

- ``train``: ``min_len <= length <= max_len``, depth ``<= m``, no held-out skeleton (at the top level;
  at any depth with ``holdout_nested``).
- ``val`` / ``test``: as ``train``, and every top-level skeleton also occurs in ``train`` (seen structures
  only, as in Murty et al.). ``val`` (role ``val``) is for decisions: early stopping and the headline
  proxies; ``test`` (role ``id``) is the in-distribution side of every gap.
- ``ood_unseen_structure``: same bounds, at least one top-level block with a held-out skeleton (so one
  never seen in ``train``), length-matched to ``test``: as many sequences of each length as ``test``
  has, scaled, over the lengths that can hold a held-out skeleton (when a length runs out of unique
  sequences, the rest come from any length; ``meta["off_quota"]`` counts them).
- ``ood_longer``: the same process with ``min_len = max_len + 1`` and length ``<= ood_max_len``.
- ``ood_deeper``: the process with depth bound ``ood_max_depth``, length ``<= max_len``,
  keeping only sequences deeper than ``m``.

Neither OOD length nor depth split contains a held-out skeleton, so each shifts one factor. Every
split's ``meta`` states its length distribution (``length_counts``); ``ood_unseen_structure``'s also
the sizes of its held-out skeleton occurrences (``held_out_pairs``) and the share of the most frequent one.

Per-position labels: ``depth`` and ``match_pos`` (integers), and the position categories
``deeper_than_trained`` (the bracket closed next is nested deeper than ``m``) and
``beyond_trained_length`` (at or past the longest ``train`` sequence).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from illusion_probe.config import check_types, task_preset
from illusion_probe.errors import IllusionProbeError, require
from illusion_probe.registry import register_task
from illusion_probe.tasks.base import Role, Split, SplitSet, Task
from illusion_probe.tasks.dyck_sampler import (
    BOS_ID,
    FIRST_OPEN_ID,
    PAD_ID,
    SampleBatch,
    SamplerSpec,
    SkeletonHoldout,
    bracket_labels,
    sample_batch,
)

_SAMPLE_BATCH = 8192
_CANDIDATE_BUDGET = 20_000_000  # candidates drawn for one split before giving up
_STALL_BUDGET = 1_000_000  # give up earlier once this many draws in a row add no new sequence
_QUOTA_PATIENCE = 100_000  # draws in a row without a new sequence before a length quota is given up


@dataclass(frozen=True)
class DyckConfig:
    """The Dyck-(k, m) task and its splits. Lengths count the BOS token.

    Attributes:
        k: number of bracket types.
        m: training depth bound (deepest nesting in ``train``/``test``).
        max_len: longest training sequence.
        min_len: the process may stop only once a sequence has this many tokens.
        holdout_fraction: share of eligible top-level block skeletons held out of training, in (0, 1).
        holdout_min_pairs: skeletons with fewer bracket pairs are never held out (``"()"``, ``"(())"``).
        holdout_nested: also keep held-out skeletons out of every in-distribution, longer and deeper
            sequence where they occur nested inside another block, so they never occur in ``train`` at all.
        n_train: sequences in ``train``.
        n_test: sequences in ``test``, and in ``val`` (in distribution like ``test``; headline proxies are
            chosen on it, so that ``test``, the in-distribution side of every gap, is not also the selection split).
        n_ood: sequences in each ``ood_*`` split.
        ood_max_len: longest sequence in ``ood_longer`` (whose sequences are all longer than ``max_len``).
        ood_max_depth: depth bound of ``ood_deeper`` (whose sequences are all deeper than ``m``).
        seed: chooses the held-out skeletons (part of the task); ``make_splits(seed)`` draws the sequences.
    """

    k: int = 4
    m: int = 4
    max_len: int = 32
    min_len: int = 8
    holdout_fraction: float = 0.25
    holdout_min_pairs: int = 3
    holdout_nested: bool = False
    n_train: int = 20_000
    n_test: int = 1_000
    n_ood: int = 1_000
    ood_max_len: int = 48
    ood_max_depth: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        require(self.k >= 1, f"DyckConfig.k must be >= 1 bracket type, got {self.k}")
        require(self.m >= 1, f"DyckConfig.m (depth bound) must be >= 1, got {self.m}")
        for name in ("n_train", "n_test", "n_ood"):
            require(getattr(self, name) >= 1, f"DyckConfig.{name} must be >= 1, got {getattr(self, name)}")
        require(self.min_len >= 3, f"DyckConfig.min_len must be >= 3 (BOS and one bracket pair), got {self.min_len}")
        require(_shortest(self.min_len) <= self.max_len,
                f"DyckConfig: no sequence fits max_len={self.max_len} with min_len={self.min_len} "
                "(lengths are BOS plus an even number of brackets); raise max_len")
        require(self.holdout_min_pairs >= 2,
                f"DyckConfig.holdout_min_pairs must be >= 2 so '()' is never held out, got {self.holdout_min_pairs}")
        require(0 < self.holdout_fraction < 1,
                f"DyckConfig.holdout_fraction must be in (0, 1): 0 holds nothing out, 1 leaves no trainable "
                f"skeleton of {self.holdout_min_pairs}+ pairs; got {self.holdout_fraction!r}")
        require(self.m >= 2 and self.max_len - 1 >= 2 * self.holdout_min_pairs,
                f"DyckConfig: no skeleton of {self.holdout_min_pairs}+ pairs fits m={self.m}, max_len={self.max_len}, "
                "so none can be held out; use m >= 2 and max_len >= 2 * holdout_min_pairs + 1")
        require(self.ood_max_depth > self.m,
                f"DyckConfig.ood_max_depth={self.ood_max_depth} must exceed m={self.m} for ood_deeper")
        require(self.max_len >= 2 * self.m + 3,
                f"DyckConfig: ood_deeper needs depth {self.m + 1} within max_len={self.max_len}; "
                f"use max_len >= {2 * self.m + 3}")
        require(self.ood_max_len < 2**15, f"DyckConfig.ood_max_len={self.ood_max_len} is beyond the 32,767 tokens "
                "a Dyck split holds (positions are stored as int16); use shorter sequences")
        require(self.ood_max_len >= _shortest(self.max_len + 1),
                f"DyckConfig.ood_max_len={self.ood_max_len} leaves no room for ood_longer sequences longer than "
                f"max_len={self.max_len}; use ood_max_len >= {_shortest(self.max_len + 1)}")

    @classmethod
    def preset(cls, name: str) -> DyckConfig:
        """The ``[task]`` table of a shipped preset (``illusion_probe/presets/dyck_<name>.toml``): ``"tiny"``,
        ``"quick"`` or ``"paper"`` (the paper's Dyck-(20, 10))."""
        return task_preset(cls, "dyck", name)

    @property
    def holdout(self) -> SkeletonHoldout:
        """The skeleton hold-out rule this config defines."""
        return SkeletonHoldout(float(self.holdout_fraction), self.holdout_min_pairs, self.seed)


def _shortest(min_len: int) -> int:
    """Shortest possible sequence length (BOS plus an even count) that is at least ``min_len``."""
    return min_len if min_len % 2 == 1 else min_len + 1


@dataclass(frozen=True)
class _SplitRecipe:
    name: str
    role: Role
    n: int
    spec: SamplerSpec
    keep: Callable[[SampleBatch], Tensor]
    quota: dict[int, int] = field(default_factory=dict)  # sequences per length; empty: any lengths


@register_task
class DyckTask(Task):
    """Dyck-(k, m) bracket sequences with unseen-structure, longer and deeper OOD splits."""

    kind: ClassVar[str] = "dyck"
    config_class: ClassVar[type] = DyckConfig
    pad_id: ClassVar[int] = PAD_ID
    bos_id: ClassVar[int] = BOS_ID

    def __init__(self, config: DyckConfig | None = None):
        self.config = config or DyckConfig()
        k = self.config.k
        self._vocab = ["BOS", "PAD", *(f"({i}" for i in range(k)), *(f"){i}" for i in range(k))]
        self._ids = {token: i for i, token in enumerate(self._vocab)}

    def __repr__(self) -> str:
        return f"DyckTask({self.config})"

    @property
    def vocab(self) -> list[str]:
        return list(self._vocab)

    @property
    def n_ctx(self) -> int:
        return max(self.config.max_len, self.config.ood_max_len)

    @property
    def answer_ids(self) -> Int[Tensor, " k"]:
        """The closing-bracket ids."""
        return torch.arange(FIRST_OPEN_ID + self.config.k, FIRST_OPEN_ID + 2 * self.config.k)

    def encode(self, text: str) -> Int[Tensor, " pos"]:
        """Ids of space-separated tokens, e.g. ``"BOS (0 (1 )1 )0"``."""
        try:
            return torch.tensor([self._ids[token] for token in text.split()], dtype=torch.long)
        except KeyError as err:
            raise IllusionProbeError(f"unknown Dyck token {err.args[0]!r}; tokens are BOS, PAD, (i and )i "
                                     f"for i < {self.config.k}") from None

    def decode(self, ids: Tensor | list[int]) -> str:
        """Space-separated tokens; PAD is dropped."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return " ".join(self._vocab[i] for i in ids if i != PAD_ID)

    def is_held_out(self, skeleton: str) -> bool:
        """Whether a top-level block skeleton such as ``"(()())"`` is held out of training."""
        return self.config.holdout.is_held_out(skeleton)

    def make_splits(self, seed: int = 0) -> SplitSet:
        """``train``, ``val``, ``test``, ``ood_unseen_structure``, ``ood_longer``, ``ood_deeper``; see the
        module docstring.

        Each split draws from its own generator seeded by ``seed`` and its index (``train``, ``test``,
        ``ood_unseen_structure``, ``ood_longer``, ``ood_deeper``, ``val``: the order they are drawn in),
        skipping any sequence an earlier split (or itself) already holds.
        """
        cfg = self.config
        in_distribution = SamplerSpec(cfg.k, cfg.m, cfg.min_len, cfg.max_len)

        def allowed(batch: SampleBatch) -> Tensor:
            return ~(batch.held_out_anywhere if cfg.holdout_nested else batch.has_held_out)

        def seen_only(batch: SampleBatch) -> Tensor:
            return allowed(batch) & _only_skeletons(batch.tokens, cfg.k, trained)

        sequences: set[bytes] = set()
        drawn: dict[str, Split] = {}

        def draw(recipe: _SplitRecipe) -> Split:
            generator = torch.Generator().manual_seed(_split_seed(seed, len(drawn)))
            drawn[recipe.name] = self._build_split(recipe, self._draw(recipe, generator, sequences))
            return drawn[recipe.name]

        train = draw(_SplitRecipe("train", "train", cfg.n_train, in_distribution, allowed))
        trained = {s for row in train.tokens.tolist() for s in _skeletons(row, cfg.k)}
        test = draw(_SplitRecipe("test", "id", cfg.n_test, in_distribution, seen_only))
        draw(_SplitRecipe("ood_unseen_structure", "ood", cfg.n_ood, in_distribution, lambda b: b.has_held_out,
                          quota=_length_quota(test.lengths, cfg.n_ood, shortest=2 * cfg.holdout_min_pairs + 1)))
        draw(_SplitRecipe("ood_longer", "ood", cfg.n_ood, SamplerSpec(cfg.k, cfg.m, cfg.max_len + 1, cfg.ood_max_len),
                          allowed))
        draw(_SplitRecipe("ood_deeper", "ood", cfg.n_ood,
                          SamplerSpec(cfg.k, cfg.ood_max_depth, cfg.min_len, cfg.max_len),
                          lambda b: allowed(b) & (b.max_depth > cfg.m)))
        # Drawn last, so that adding it left every other split of a seed as it was.
        draw(_SplitRecipe("val", "val", cfg.n_test, in_distribution, seen_only))
        order = ["train", "val", "test", "ood_unseen_structure", "ood_longer", "ood_deeper"]
        return SplitSet([drawn[name] for name in order]).with_trained_length_label("train")

    def _draw(self, recipe: _SplitRecipe, generator: torch.Generator, seen: set[bytes]) -> Tensor:
        """``[n, max_len]`` unique sequences meeting ``recipe.keep`` (and its length quota); adds them to ``seen``."""
        kept: list[Tensor] = []
        per_length: Counter[int] = Counter()
        quota = recipe.quota
        n_kept = drawn = stalled = 0
        while n_kept < recipe.n:
            if quota and stalled >= _QUOTA_PATIENCE:  # some length ran out of sequences: fill up with any length
                quota = {}
            if drawn >= _CANDIDATE_BUDGET or stalled >= _STALL_BUDGET:
                raise IllusionProbeError(
                    f"Dyck split {recipe.name!r}: only {n_kept} of {recipe.n} unique sequences in {drawn:,} draws; "
                    "loosen the bounds, raise holdout_fraction, or ask for fewer sequences"
                )
            batch = sample_batch(recipe.spec, _SAMPLE_BATCH, generator, self.config.holdout)
            drawn += _SAMPLE_BATCH
            rows = batch.tokens[recipe.keep(batch)]
            fresh = []
            for i, (key, length) in enumerate(zip(_row_keys(rows), (rows != PAD_ID).sum(1).tolist(), strict=True)):
                room = (per_length[length] < quota.get(length, 0) if quota else n_kept + len(fresh) < recipe.n)
                if room and key not in seen:
                    seen.add(key)
                    per_length[length] += 1
                    fresh.append(i)
            kept.append(rows[fresh])
            n_kept += len(fresh)
            stalled = 0 if fresh else stalled + _SAMPLE_BATCH
        return torch.cat(kept)

    def _build_split(self, recipe: _SplitRecipe, tokens: Tensor) -> Split:
        k = self.config.k
        depth, eval_mask, match_pos = bracket_labels(tokens, k)
        targets = torch.full_like(tokens, PAD_ID)
        targets[:, :-1] = torch.where(eval_mask[:, :-1], tokens[:, 1:], PAD_ID)
        real = tokens != PAD_ID
        lengths = real.sum(dim=1)
        spec = recipe.spec
        meta = {
            "task": "dyck", "k": k, "n": len(tokens), "n_scored": int(eval_mask.sum()),
            "min_len": spec.min_len, "max_len": spec.max_len, "max_depth": spec.max_depth,
            "observed_len": [int(lengths.min()), int(lengths.max())],
            "observed_max_depth": int(depth.max()),
            "holdout_fraction": self.config.holdout_fraction, "holdout_min_pairs": self.config.holdout_min_pairs,
        }
        meta["length_counts"] = {str(n): c for n, c in sorted(Counter(lengths.tolist()).items())}
        if recipe.name == "ood_unseen_structure":
            held = Counter(s for row in tokens.tolist() for s in _skeletons(row, k) if self.is_held_out(s))
            meta["held_out_skeletons_seen"] = len(held)
            meta["held_out_pairs"] = {str(n): c for n, c in sorted(Counter(len(s) // 2 for s in held.elements()).items())}
            meta["most_frequent_held_out_share"] = round(held.most_common(1)[0][1] / held.total(), 4)
            meta["length_matched_to"] = "test"
            counts = Counter(lengths.tolist())
            meta["off_quota"] = sum(max(0, c - recipe.quota.get(n, 0)) for n, c in counts.items())
        split = Split(name=recipe.name, role=recipe.role, tokens=tokens, eval_mask=eval_mask, targets=targets,
                      real_mask=real, labels={"depth": depth.to(torch.int16), "match_pos": match_pos.to(torch.int16),
                                              "deeper_than_trained": depth > self.config.m},
                      meta=meta)
        return split.select(slice(None))  # trim all-pad columns


def _split_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7_919 + 12_345) % (2**63)


def _row_keys(rows: Tensor) -> list[bytes]:
    """One key per sequence: its unpadded token ids as bytes."""
    array = rows.numpy().astype(np.int16)
    lengths = (rows != PAD_ID).sum(dim=1).tolist()
    return [row[:n].tobytes() for row, n in zip(array, lengths, strict=True)]


def _only_skeletons(tokens: Int[Tensor, "n pos"], k: int, allowed: set[str]) -> Tensor:
    """``[n]`` True where every top-level skeleton of the sequence is in ``allowed``."""
    return torch.tensor([all(s in allowed for s in _skeletons(row, k)) for row in tokens.tolist()], dtype=torch.bool)


def _length_quota(lengths: Int[Tensor, " n"], n: int, shortest: int) -> dict[int, int]:
    """``n`` sequences spread over lengths as ``lengths`` are, restricted to lengths ``>= shortest``
    (largest remainders round the shares)."""
    counts = Counter(length for length in lengths.tolist() if length >= shortest)
    require(bool(counts), f"Dyck split 'ood_unseen_structure': no test sequence is long enough ({shortest} tokens) "
                          "to hold a held-out skeleton, so none can be length-matched; lower holdout_min_pairs, "
                          "raise min_len or n_test")
    total = sum(counts.values())
    shares = {length: n * c / total for length, c in counts.items()}
    quota = {length: int(share) for length, share in shares.items()}
    by_remainder = sorted(shares, key=lambda length: (quota[length] - shares[length], length))
    for length in by_remainder[: n - sum(quota.values())]:
        quota[length] += 1
    return quota


def _skeletons(ids: list[int], k: int) -> list[str]:
    """Type-erased skeletons of the top-level blocks of one sequence."""
    blocks, current, depth = [], [], 0
    for i in ids:
        if FIRST_OPEN_ID <= i < FIRST_OPEN_ID + 2 * k:
            opening = i < FIRST_OPEN_ID + k
            current.append("(" if opening else ")")
            depth += 1 if opening else -1
            if depth == 0:
                blocks.append("".join(current))
                current = []
    return blocks
