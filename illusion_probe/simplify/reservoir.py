"""A bounded, seeded, uniform sample of a stream: for simplifiers that must see their samples together.

Each sample draws a random key from the reservoir's own generator as it arrives; the
``capacity`` smallest keys survive. The result is a uniform subsample that depends only
on the seed and the order of the stream, never on how the stream was batched.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Hashable

import torch
from jaxtyping import Float
from torch import Tensor

from illusion_probe.simplify.base import FittedSimplifier


class Reservoir:
    """Keep a uniform random subsample of at most ``capacity`` rows, on the CPU in float32.

    Args:
        capacity: rows kept at most.
        seed: seeds the keys.
    """

    def __init__(self, capacity: int, seed: int):
        self.capacity = capacity
        self._generator = torch.Generator().manual_seed(seed)
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

    def sharing_key(self) -> Hashable:
        return (self.seed, self.max_samples)

    def adopt(self, leader: FittedSimplifier) -> None:
        assert isinstance(leader, SampledSimplifier)
        self._reservoir = leader._reservoir

    def start(self, shape: tuple[int, int], device: torch.device) -> None:
        self._reservoir = Reservoir(self.max_samples, self.seed)

    def accumulate(self, x: Tensor) -> None:
        self._reservoir.add(x)

    def finish(self) -> None:
        samples = self._reservoir.samples()
        del self._reservoir
        self.fit_sample(samples)

    @abstractmethod
    def fit_sample(self, samples: Float[Tensor, "m group feature"]) -> None:
        """Set the frozen state from the kept samples (float32, on the CPU; read-only, other sizes share them)."""
