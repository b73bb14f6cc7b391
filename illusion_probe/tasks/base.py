"""What every task hands the rest of the pipeline: splits of scored token sequences.

A :class:`Split` is a padded batch of token sequences plus which positions are
scored (``eval_mask``), the correct next token there (``targets``), and
whatever per-position labels the task offers (Dyck ``depth``, code category
masks). A :class:`SplitSet` maps split names to splits; a :class:`Task` owns
the vocabulary, the sizes a model needs, and deterministic split generation.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from illusion_probe.config import from_table
from illusion_probe.errors import IllusionProbeError, require

Role = Literal["train", "val", "id", "ood"]
ROLES: tuple[str, ...] = ("train", "val", "id", "ood")


@dataclass(frozen=True, eq=False)
class Split:
    """A named batch of padded sequences and the positions on which it is scored.

    Attributes:
        name: split name (``"train"``, ``"test"``, ``"ood_*"``, or the user's own).
        role: ``"train"`` (fit and train here), ``"val"`` (held out in distribution, for choosing proxies:
            scored, never gapped), ``"id"`` (held out in distribution, the side gaps are taken from) or ``"ood"``.
        tokens: ``[n, pos]`` token ids, right-padded with ``pad_id``.
        eval_mask: ``[n, pos]`` True where the prediction of the *next* token is scored.
        targets: ``[n, pos]`` the correct next token where ``eval_mask`` (``pad_id`` or 0 elsewhere).
        real_mask: ``[n, pos]`` True on real (non-pad) tokens.
        labels: per-position label tensors, each ``[n, pos]`` (e.g. ``depth``).
        meta: JSON-serialisable facts about how the split was made.
    """

    name: str
    role: Role
    tokens: Int[Tensor, "n pos"]
    eval_mask: Bool[Tensor, "n pos"]
    targets: Int[Tensor, "n pos"]
    real_mask: Bool[Tensor, "n pos"]
    labels: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(self.role in ROLES, f"split {self.name!r}: role must be one of {ROLES}, got {self.role!r}")
        require(self.tokens.ndim == 2, f"split {self.name!r}: tokens must be [n, pos], got shape {tuple(self.tokens.shape)}")
        for label, tensor in {"eval_mask": self.eval_mask, "targets": self.targets, "real_mask": self.real_mask,
                              **self.labels}.items():
            require(
                tuple(tensor.shape) == tuple(self.tokens.shape),
                f"split {self.name!r}: {label} has shape {tuple(tensor.shape)}, tokens {tuple(self.tokens.shape)}",
            )
        for mask in ("eval_mask", "real_mask"):
            require(getattr(self, mask).dtype == torch.bool, f"split {self.name!r}: {mask} must be a bool tensor")
        require(not bool((self.real_mask[:, 1:] & ~self.real_mask[:, :-1]).any()),
                f"split {self.name!r}: padding must be on the right (real tokens first, then padding); "
                "a sequence has a pad before a real token")
        require(not bool((self.eval_mask & ~self.real_mask).any()),
                f"split {self.name!r}: eval_mask scores a padded position; score real positions only")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def lengths(self) -> Int[Tensor, " n"]:
        """Number of real tokens in each sequence."""
        return self.real_mask.sum(dim=1)

    @property
    def lm_mask(self) -> Bool[Tensor, "n pos"]:
        """Positions whose next token is real: where a language-model loss applies."""
        mask = torch.zeros_like(self.real_mask)
        mask[:, :-1] = self.real_mask[:, :-1] & self.real_mask[:, 1:]
        return mask

    @property
    def n_scored(self) -> int:
        """Number of scored positions."""
        return int(self.eval_mask.sum())

    def select(self, index: Tensor | slice) -> Split:
        """The sequences at ``index`` (a slice, index tensor or boolean mask), trimmed of all-pad columns."""
        width = int(self.real_mask[index].sum(dim=1).max()) if len(self.tokens[index]) else 0
        cut = slice(None, max(width, 1))
        return dataclasses.replace(
            self,
            tokens=self.tokens[index][:, cut],
            eval_mask=self.eval_mask[index][:, cut],
            targets=self.targets[index][:, cut],
            real_mask=self.real_mask[index][:, cut],
            labels={k: v[index][:, cut] for k, v in self.labels.items()},
        )

    def head(self, n: int) -> Split:
        """The first ``n`` sequences (all of them if there are fewer)."""
        return self.select(slice(0, n))

    def batches(self, batch_size: int, longest_first: bool = False, max_tokens: int | None = None) -> Iterator[Split]:
        """Sub-splits of at most ``batch_size`` sequences, each trimmed to its longest sequence.

        Consecutive by default; with ``longest_first`` the sequences are taken in order of
        decreasing length (stable), so that a batch holds sequences of similar length and a
        model run on it computes little padding. With ``max_tokens``, a batch also holds at most
        that many positions (sequences times the longest), so long sequences come in smaller
        batches; a sequence longer than ``max_tokens`` gets a batch of its own.
        """
        require(batch_size > 0, f"batch_size must be positive, got {batch_size}")
        require(max_tokens is None or max_tokens > 0, f"max_tokens must be positive, got {max_tokens}")
        order = torch.sort(self.lengths, descending=True, stable=True).indices if longest_first else torch.arange(len(self))
        lengths = self.lengths[order].tolist()
        start = 0
        while start < len(lengths):
            end, width = start + 1, lengths[start]
            while end < len(lengths) and end - start < batch_size:
                wider = max(width, lengths[end])
                if max_tokens is not None and wider * (end - start + 1) > max_tokens:
                    break
                end, width = end + 1, wider
            yield self.select(order[start:end] if longest_first else slice(start, end))
            start = end

    def to(self, device: str | torch.device) -> Split:
        """The same split with every tensor on ``device``."""
        return dataclasses.replace(
            self,
            tokens=self.tokens.to(device),
            eval_mask=self.eval_mask.to(device),
            targets=self.targets.to(device),
            real_mask=self.real_mask.to(device),
            labels={k: v.to(device) for k, v in self.labels.items()},
        )

    @classmethod
    def from_tokens(
        cls, tokens: Int[Tensor, "n pos"], role: Role, name: str = "custom", pad_id: int | None = None
    ) -> Split:
        """A plain next-token split: every real position followed by a real token is scored.

        Args:
            tokens: ``[n, pos]`` integer token ids, right-padded with ``pad_id`` if given.
            role: ``"train"``, ``"id"`` or ``"ood"``.
            name: split name used in results.
            pad_id: padding id, or ``None`` when every token is real.
        """
        tokens = _integer_tokens(tokens, "Split.from_tokens")
        real = torch.ones_like(tokens, dtype=torch.bool) if pad_id is None else tokens != pad_id
        return cls.next_token(tokens, real, role, name)

    @classmethod
    def next_token(cls, tokens: Int[Tensor, "n pos"], real_mask: Bool[Tensor, "n pos"], role: Role,
                   name: str = "custom", meta: dict[str, Any] | None = None) -> Split:
        """A next-token split whose real positions are given: position ``p`` is scored when ``p + 1`` is real."""
        eval_mask = torch.zeros_like(real_mask)
        eval_mask[:, :-1] = real_mask[:, :-1] & real_mask[:, 1:]
        targets = torch.zeros_like(tokens)
        targets[:, :-1] = torch.where(eval_mask[:, :-1], tokens[:, 1:], 0)
        require(bool(eval_mask.any()), f"split {name!r} has no scored positions (every sequence needs two real tokens)")
        return cls(name=name, role=role, tokens=tokens, eval_mask=eval_mask, targets=targets, real_mask=real_mask,
                   meta=dict(meta or {}))

    @classmethod
    def from_scored(
        cls, tokens: Int[Tensor, "n pos"], eval_mask: Bool[Tensor, "n pos"], targets: Int[Tensor, "n pos"],
        role: Role = "id", name: str = "custom", pad_id: int | None = None,
    ) -> Split:
        """A split whose targets are not the next token (a per-position classifier, a model whose output
        vocabulary differs from its input): the output id at ``targets`` is scored where ``eval_mask``.

        Args:
            tokens: ``[n, pos]`` input ids, right-padded with ``pad_id`` if given.
            eval_mask: ``[n, pos]`` True where the model's output at that position is scored.
            targets: ``[n, pos]`` the correct output id where ``eval_mask`` (anything elsewhere).
            role: ``"train"``, ``"id"`` or ``"ood"``.
            name: split name used in results.
            pad_id: padding id; positions holding it are not real (default: every position is real).
        """
        tokens = _integer_tokens(tokens, "Split.from_scored")
        require(isinstance(eval_mask, Tensor) and eval_mask.dtype == torch.bool and eval_mask.shape == tokens.shape,
                f"Split.from_scored: eval_mask must be a bool tensor of shape {tuple(tokens.shape)}")
        require(isinstance(targets, Tensor) and targets.shape == tokens.shape and not targets.dtype.is_floating_point
                and targets.dtype != torch.bool, f"Split.from_scored: targets must be integer ids of shape {tuple(tokens.shape)}")
        require(bool(eval_mask.any()), f"Split.from_scored: split {name!r} has no scored position")
        real = torch.ones_like(eval_mask) if pad_id is None else tokens != pad_id
        return cls(name=name, role=role, tokens=tokens, eval_mask=eval_mask.clone(),
                   targets=torch.where(eval_mask, targets.long(), 0), real_mask=real)

    @classmethod
    def from_text(cls, model: Any, texts: Any, role: Role = "id", window: int | None = None, name: str = "custom",
                  stride: int | None = None, max_sequences: int | None = None) -> Split:
        """A next-token split of text, tokenised with the model's own tokenizer into windows of ``window`` tokens.

        Args:
            model: a HookedTransformer or TransformerBridge with a tokenizer.
            texts: a list of documents, or a path: a ``.jsonl`` file (the ``text`` field of each line), a
                ``.txt`` file (one document per non-empty line), a directory (one document per file) or any
                other file (one document).
            role: ``"train"``, ``"id"`` or ``"ood"``.
            window: tokens per sequence, the BOS token included when the model prepends one (at most its
                context; default: its context).
            name: split name used in results.
            stride: tokens between window starts within a document (default: windows do not overlap).
            max_sequences: keep only the first windows, in document order.

        Returns:
            A split whose ``meta`` records the documents used and skipped (and why), windows and tokens.
        """
        from illusion_probe.tasks.text import split_from_text

        return split_from_text(model, texts, role, window, name, stride, max_sequences)


def _integer_tokens(tokens: Any, where: str) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise IllusionProbeError(f"{where}: tokens must be an integer tensor of shape [n, pos]")
    require(tokens.ndim == 2 and tokens.shape[1] >= 2,
            f"{where}: tokens must be [n, pos] with pos >= 2, got shape {tuple(tokens.shape)}")
    require(tokens.numel() == 0 or int(tokens.min()) >= 0,
            f"{where}: token ids must be >= 0, found {int(tokens.min()) if tokens.numel() else 0}")
    return tokens.long()


def check_tokens(tokens: Tensor, d_vocab: int, n_ctx: int, where: str) -> None:
    """Raise a one-line error unless ``tokens`` are integer ids in ``[0, d_vocab)`` at most ``n_ctx`` long."""
    require(isinstance(tokens, Tensor) and tokens.ndim == 2 and not tokens.dtype.is_floating_point
            and tokens.dtype != torch.bool, f"{where}: tokens must be an integer tensor [n, pos]")
    require(tokens.shape[1] <= n_ctx, f"{where}: sequences of {tokens.shape[1]} tokens are longer than the model's "
            f"context (n_ctx={n_ctx}); cut them to at most {n_ctx} tokens")
    if tokens.numel():
        low, high = int(tokens.min()), int(tokens.max())
        require(low >= 0 and high < d_vocab, f"{where}: token ids span [{low}, {high}] but the model's vocabulary is "
                f"[0, {d_vocab}); encode the text with this model's tokenizer")


class MissingSplitError(IllusionProbeError, KeyError):
    """A split name that is not in the set: a one-line error that ``Mapping.get`` and ``in`` understand."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class SplitSet(Mapping[str, Split]):
    """Named splits in a fixed order: ``train`` first, then ``test``, then the ``ood_*`` splits."""

    def __init__(self, splits: Mapping[str, Split] | list[Split]):
        items = list(splits.values()) if isinstance(splits, Mapping) else list(splits)
        require(len(items) > 0, "SplitSet needs at least one split")
        self._splits: dict[str, Split] = {}
        for split in items:
            require(split.name not in self._splits, f"SplitSet: split name {split.name!r} given twice")
            self._splits[split.name] = split

    def __getitem__(self, name: str) -> Split:
        if name not in self._splits:
            raise MissingSplitError(f"no split named {name!r}; available: {', '.join(self._splits)}")
        return self._splits[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._splits)

    def __len__(self) -> int:
        return len(self._splits)

    def __repr__(self) -> str:
        inner = ", ".join(f"{s.name}[{s.role}]: {len(s)}x{s.tokens.shape[1]}" for s in self._splits.values())
        return f"SplitSet({inner})"

    def by_role(self, role: Role) -> list[Split]:
        """Splits whose role is ``role``, in order."""
        return [s for s in self._splits.values() if s.role == role]

    @property
    def max_len(self) -> int:
        """The longest sequence in any split."""
        return max(int(s.lengths.max()) for s in self._splits.values())

    def with_trained_length_label(self, train: str = "train") -> SplitSet:
        """Every split with a boolean label ``beyond_trained_length``: positions at or past the longest sequence
        of split ``train``. A model with learned absolute positions never got a gradient for their embeddings."""
        longest = int(self[train].lengths.max())
        labelled = []
        for split in self._splits.values():
            beyond = (torch.arange(split.tokens.shape[1]) >= longest).expand_as(split.tokens)
            labelled.append(dataclasses.replace(split, labels={**split.labels, "beyond_trained_length": beyond.clone()}))
        return SplitSet(labelled)


def check_split(split: Any, who: str) -> Split:
    """``split`` when it is one :class:`Split`; anything else is a one-line error naming ``who``'s argument."""
    require(isinstance(split, Split), f"{who}: split must be an ip.Split, got {type(split).__name__}"
            + ("; pick one, e.g. splits['train']" if isinstance(split, Mapping) else ""))
    return split


def as_split_set(splits: Any, who: str) -> SplitSet:
    """``splits`` (a :class:`SplitSet` or ``{name: Split}``) as a :class:`SplitSet`; anything else, one
    :class:`Split` included, is a one-line error naming ``who``'s argument."""
    if isinstance(splits, Split):
        raise IllusionProbeError(f"{who}: splits must be a SplitSet or {{name: Split}}, got one Split; "
                                 "wrap it: ip.SplitSet([split])")
    require(isinstance(splits, Mapping), f"{who}: splits must be a SplitSet or {{name: Split}}, got {type(splits).__name__}")
    for name, split in splits.items():
        require(isinstance(split, Split), f"{who}: splits[{name!r}] is a {type(split).__name__}, not an ip.Split")
    return splits if isinstance(splits, SplitSet) else SplitSet(dict(splits))


class Task(ABC):
    """A sequence task: vocabulary, model sizes, scored positions and split generation.

    Subclasses set ``kind`` (the name used in checkpoints), ``config_class`` (a frozen dataclass)
    and ``config`` (an instance of it), and take the config as their one constructor argument.
    """

    kind: ClassVar[str]
    config_class: ClassVar[type]
    config: Any
    pad_id: ClassVar[int]
    """Padding token id."""
    bos_id: ClassVar[int]
    """Id of the token every sequence starts with."""

    @property
    @abstractmethod
    def vocab(self) -> list[str]:
        """Token strings, indexed by token id."""

    @property
    @abstractmethod
    def n_ctx(self) -> int:
        """The longest sequence any split of this task can hold: the model's context length."""

    @property
    @abstractmethod
    def answer_ids(self) -> Int[Tensor, " n_answers"]:
        """Token ids among which a prediction is scored (argmax is taken over these)."""

    @abstractmethod
    def encode(self, text: str) -> Int[Tensor, " pos"]:
        """Token ids of ``text``."""

    @abstractmethod
    def decode(self, ids: Tensor | list[int]) -> str:
        """Text of token ids."""

    @abstractmethod
    def make_splits(self, seed: int = 0) -> SplitSet:
        """Deterministic, disjoint ``train``, ``test`` and ``ood_*`` splits for ``seed``."""

    @property
    def d_vocab(self) -> int:
        """Vocabulary size, including special tokens."""
        return len(self.vocab)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description from which :func:`task_from_dict` rebuilds the task."""
        return {"kind": self.kind, "config": dataclasses.asdict(self.config)}

    @classmethod
    def from_config_dict(cls, config: dict[str, Any]) -> Task:
        """Rebuild the task from the ``config`` part of :meth:`to_dict`; unknown fields are refused."""
        return cls(from_table(cls.config_class, config, f"{cls.kind} task config"))  # type: ignore[call-arg]
