"""A bounded, seeded, uniform sample of a stream: for simplifiers that must see their samples together.

Each sample draws a random key from the reservoir's own generator as it arrives; the
``capacity`` smallest keys survive. The result is a uniform subsample that depends only
on the seed and the order of the stream, never on how the stream was batched.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


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
