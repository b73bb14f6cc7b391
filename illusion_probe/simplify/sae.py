"""Sparse autoencoders: an activation replaced by its reconstruction from a few dictionary latents.

Architectures, initialisation and training are those of every sparse dictionary
(:mod:`illusion_probe.simplify.dictionary`); an SAE's input and target are the same activation,
and its encoder reads the input minus the decoder bias.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from illusion_probe.registry import register_simplifier
from illusion_probe.simplify.dictionary import SparseDictionary


@register_simplifier
class SAE(SparseDictionary):
    """Reconstruct each activation from a sparse code over ``d_sae`` learned directions.

    ``x_hat = (b_dec + z W_dec) / s`` with ``z`` the latents of ``(s x - b_dec) W_enc + b_enc``
    (``s`` scales the training inputs to mean squared norm ``d``). The arguments are those of
    :class:`~illusion_probe.simplify.dictionary.SparseDictionary`; sweeps vary ``d_sae``.
    """

    method: ClassVar[str] = "sae"
    centre_input: ClassVar[bool] = True

    def fit_sample(self, samples: Tensor) -> None:
        self.fit_pairs(samples, samples)

    def state_shapes(self, group: int, feature: int) -> dict[str, tuple[int, ...]]:
        return self.dictionary_shapes(group, feature, feature)
