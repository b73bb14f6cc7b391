"""A bounded, seeded, uniform sample of a stream: for simplifiers that must see their samples together.

Each sample draws a random key from the reservoir's own generator as it arrives; the
``capacity`` smallest keys survive. The result is a uniform subsample that depends only
on the seed and the order of the stream, never on how the stream was batched, nor on how
many processes streamed it: a process whose shard starts at row ``offset`` first skips
``offset`` keys, and :meth:`Reservoir.combine` keeps the smallest keys of every shard.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Hashable

import torch
from jaxtyping import Float
from torch import Tensor

from illusion_probe.distributed import all_gather
from illusion_probe.simplify.base import FittedSimplifier

#: Keys drawn at once when a process skips the keys of the rows before its shard.
SKIP_CHUNK = 2**20


class Reservoir:
    """Keep a uniform random subsample of at most ``capacity`` rows, on the CPU in float32.

    Args:
        capacity: rows kept at most.
        seed: seeds the keys.
    """

    def __init__(self, capacity: int, seed: int, offset: int = 0):
        self.capacity = capacity
        self._generator = torch.Generator().manual_seed(seed)
        for start in range(0, offset, SKIP_CHUNK):  # the keys of the rows before this process's shard
            torch.rand(min(SKIP_CHUNK, offset - start), generator=self._generator)
        self._rows: list[Tensor] = []
        self._keys: list[Tensor] = []
        self._held = 0

    def add(self, rows: Float[Tensor, "n ..."]) -> None:
        """Offer ``rows``; the reservoir shrinks back to ``capacity`` once it holds twice that."""
        self._rows.append(rows.detach().to("cpu", torch.float32))
        self._keys.append(torch.rand(rows.shape[0], generator=self._generator))
        self._held += rows.shape[0]
        if self._held >= 2 * self.capacity:
            self._shrink()

    def _shrink(self) -> None:
        rows, keys = torch.cat(self._rows), torch.cat(self._keys)
        if rows.shape[0] > self.capacity:
            keep = keys.topk(self.capacity, largest=False).indices.sort().values
            rows, keys = rows[keep], keys[keep]
        self._rows, self._keys, self._held = [rows], [keys], rows.shape[0]

    def combine(self) -> None:
        """Hold the sample of the whole stream: every process's kept rows, gathered in stream order."""
        self._shrink()
        shards = all_gather({"rows": self._rows[0], "keys": self._keys[0]})
        self._rows, self._keys = [s["rows"] for s, _ in shards], [s["keys"] for s, _ in shards]
        self._shrink()

    def samples(self) -> Float[Tensor, "m ..."]:
        """The kept rows, in stream order."""
        self._shrink()
        return self._rows[0]


class SampledSimplifier(FittedSimplifier):
    """A fitted simplifier trained on a seeded, bounded sample of its stream (k-means, sparse dictionaries).

    Subclasses set ``seed`` and ``max_samples`` and implement :meth:`fit_sample`. Every size with the
    same ``(seed, max_samples)`` at one hook shares one :class:`Reservoir` in a sweep.
    """

    seed: int
    max_samples: int
    _stream_offset: int = 0  # rows of the whole stream before this process's shard

    def sharing_key(self) -> Hashable:
        return (self.seed, self.max_samples)

    def adopt(self, leader: FittedSimplifier) -> None:
        assert isinstance(leader, SampledSimplifier)
        self._reservoir = leader._reservoir

    def stream_from(self, offset: int) -> None:
        self._stream_offset = offset

    def start(self, shape: tuple[int, int], device: torch.device) -> None:
        self._reservoir = Reservoir(self.max_samples, self.seed, offset=self._stream_offset)

    def combine_accumulators(self) -> None:
        self._reservoir.combine()

    def drop_accumulators(self) -> None:
        vars(self).pop("_reservoir", None)

    def accumulate(self, x: Tensor) -> None:
        self._reservoir.add(x)

    def finish(self) -> None:
        samples = self._reservoir.samples()
        del self._reservoir
        self.fit_sample(samples)

    @abstractmethod
    def fit_sample(self, samples: Float[Tensor, "m group feature"]) -> None:
        """Set the frozen state from the kept samples (float32, on the CPU; read-only, other sizes share them)."""
