"""Transcoders: an MLP's output replaced by a sparse function of its input.

A transcoder sits at an MLP's output hook (``blocks.L.hook_mlp_out``) and reads the MLP's input
(``blocks.L.ln2.hook_normalized`` unless ``input_hook`` says otherwise). It is fitted on
(input, output) pairs: both hooks are captured in the same pass, each row of the seeded sample
holds the pair, and training maps the input to the output with the architectures of every sparse
dictionary (:mod:`illusion_probe.simplify.dictionary`), the encoder reading the input as it is.

Applied through a :class:`~illusion_probe.simplify.proxy.Proxy` (``proxy.fwd_hooks()``,
``proxy.applied(model)``): one hook keeps the MLP input, the next replaces the MLP output.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from illusion_probe.errors import IllusionProbeError, require
from illusion_probe.hook_names import layer_of, mlp_in
from illusion_probe.registry import register_simplifier
from illusion_probe.simplify.base import FittedSimplifier
from illusion_probe.simplify.dictionary import SparseDictionary

_MLP_OUT = re.compile(r"^blocks\.\d+\.(hook_mlp_out|mlp\.hook_out)$")


@register_simplifier
class Transcoder(SparseDictionary):
    """Replace an MLP's output by ``(b_dec + z W_dec) / s_out``, ``z`` the sparse latents of its input.

    Args:
        d_sae: number of latents; the other sparsity and training arguments are those of
            :class:`~illusion_probe.simplify.dictionary.SparseDictionary`.
        input_hook: the hook it reads (default ``blocks.L.ln2.hook_normalized`` of the MLP's block;
            ``blocks.L.hook_resid_mid`` for a model with no norm before its MLPs).
        **options: ``k``, ``architecture``, ``l1_coefficient``, ``aux_coefficient``, ``epochs``,
            ``batch_size``, ``lr``, ``seed``, ``max_samples``.
    """

    method: ClassVar[str] = "transcoder"
    centre_input: ClassVar[bool] = False

    def __init__(self, d_sae: int, input_hook: str | None = None, per_head: bool | None = None, **options: Any):
        require(not per_head, "Transcoder: per_head must be False or None; an MLP's input and output are not per head")
        require(input_hook is None or isinstance(input_hook, str),
                f"Transcoder: input_hook must be a hook name or None, got {input_hook!r}")
        super().__init__(d_sae, per_head=per_head, **options)
        self.input_hook_name = input_hook

    def options(self) -> dict[str, Any]:
        return {**super().options(), "input_hook": self.input_hook_name}

    def check_hook(self, hook_name: str) -> None:
        require(bool(_MLP_OUT.match(hook_name)), f"{self.describe()} replaces an MLP's output: put it at "
                f"'blocks.L.hook_mlp_out', not {hook_name!r}")

    def input_hook(self, hook_name: str) -> str:
        return self.input_hook_name or mlp_in(layer_of(hook_name))  # type: ignore[arg-type]

    # -- fitting ----------------------------------------------------------------------
    def sharing_key(self) -> Hashable:
        return (*super().sharing_key(), self.input_hook_name)

    def partial_fit(self, acts: Float[Tensor, "*samples d_out"], mask: Bool[Tensor, "*samples"] | None = None, *,
                    inputs: Float[Tensor, "*samples d_in"] | None = None) -> Transcoder:
        """Accumulate one batch of MLP outputs ``acts`` and the MLP ``inputs`` at the same positions."""
        require(inputs is not None, f"{self.describe()}: fitting needs the MLP inputs too: "
                "partial_fit(mlp_out, inputs=mlp_in), or ip.fit_proxy at the MLP output hook")
        self._batch_inputs = self._samples(inputs, mask)
        self._d_in = self._batch_inputs.shape[-1]
        return super().partial_fit(acts, mask)  # type: ignore[return-value]

    def fit(self, acts: Float[Tensor, "*samples d_out"], mask: Bool[Tensor, "*samples"] | None = None, *,
            inputs: Float[Tensor, "*samples d_in"] | None = None) -> Transcoder:
        """Fit on MLP outputs ``acts`` and inputs ``inputs`` in one call. Returns ``self``."""
        return self.partial_fit(acts, mask, inputs=inputs).finalize()  # type: ignore[return-value]

    def accumulate(self, x: Tensor) -> None:
        require(self._batch_inputs.shape[0] == x.shape[0],
                f"{self.describe()}: inputs and outputs hold different numbers of samples")
        super().accumulate(torch.cat([self._batch_inputs, x], dim=-1))  # each sample's pair is sampled together
        del self._batch_inputs

    def adopt(self, leader: FittedSimplifier) -> None:
        super().adopt(leader)
        self._d_in = leader._d_in  # type: ignore[attr-defined]

    def fit_sample(self, samples: Tensor) -> None:
        self.fit_pairs(samples[..., :self._d_in], samples[..., self._d_in:])

    def _fitted_config(self) -> dict[str, Any]:
        config = super()._fitted_config()
        return {**config, "d_in": self._d_in} if config else config

    def _load_state(self, config: dict[str, Any], state: dict[str, Tensor]) -> None:
        self._d_in = int(config["d_in"])
        super()._load_state(config, state)

    def state_shapes(self, group: int, feature: int) -> dict[str, tuple[int, ...]]:
        return self.dictionary_shapes(group, self._d_in, feature)

    # -- application ------------------------------------------------------------------
    def replace(self, source: Tensor, act: Tensor, hook: Any = None) -> Tensor:
        out = self.apply(self.fitted_inputs(source))
        require(out.numel() == act.numel(), f"{self.describe()}: output width {out.shape[-1]} does "
                f"not match the activation {tuple(act.shape)}; apply it at the hook it was fitted on")
        return out.reshape(act.shape)

    def __call__(self, act: Tensor, hook: Any = None) -> Tensor:
        raise IllusionProbeError(f"{self.describe()} reads the MLP input, so it is not a hook on its own; apply it "
                                 "through a proxy: ip.Proxy({hook: transcoder}).fwd_hooks() or proxy.applied(model)")
