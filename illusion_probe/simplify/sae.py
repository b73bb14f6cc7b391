"""Sparse autoencoders: an activation replaced by its reconstruction from a few dictionary latents.

Fitting keeps a seeded, bounded sample of the streamed activations (the k-means
:class:`~illusion_probe.simplify.reservoir.Reservoir`, shared by every width of a sweep), then
trains one SAE per group (head) in torch with Adam, for a fixed number of epochs over that sample:

- inputs scaled so that their mean squared norm is the feature dimension (the scale is saved);
- decoder rows of unit norm (kept so after every step), encoder tied to the decoder at
  initialisation, decoder bias at the sample mean, encoder bias zero;
- ``architecture="topk"`` (the default): the ``k`` largest pre-activations kept, ReLU on them
  (Gao et al., 2024), plus their auxiliary loss for dead latents: the reconstruction error is
  reconstructed from the ``k_aux`` largest pre-activations among latents that did not fire during
  the last epoch, weighted ``aux_coefficient``;
- ``architecture="relu"``: ReLU latents and an L1 penalty ``l1_coefficient * sum |z|``.

Every group starts from ``seed``, so fitting per head equals fitting each head alone, and the
result is reproducible on CPU for a given thread count.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from illusion_probe.errors import require
from illusion_probe.registry import register_simplifier
from illusion_probe.simplify.reservoir import SampledSimplifier

ARCHITECTURES = ("topk", "relu")


@register_simplifier
class SAE(SampledSimplifier):
    """Reconstruct each activation from a sparse code over ``d_sae`` learned directions.

    Sweeps vary ``d_sae`` (the dictionary width) with the sparsity fixed (``k`` or ``l1_coefficient``).

    Args:
        d_sae: number of latents.
        k: latents kept per sample (``architecture="topk"``; at most ``d_sae``).
        architecture: ``"topk"`` or ``"relu"`` (ReLU with an L1 penalty).
        l1_coefficient: weight of the L1 penalty on the latents of the scaled inputs (``"relu"`` only).
        aux_coefficient: weight of the dead-latent auxiliary loss (``"topk"`` only; 0 turns it off).
        epochs: passes over the fitted sample.
        batch_size: samples per optimiser step.
        lr: Adam learning rate.
        seed: seeds the sample, the initialisation and the batch order.
        max_samples: cap on samples kept for training (seeded uniform subsample beyond it).
        per_head: one SAE per head of ``[batch, pos, head, d_head]``.
    """

    method: ClassVar[str] = "sae"
    size_option: ClassVar[str | None] = "d_sae"

    def __init__(self, d_sae: int, k: int = 8, architecture: str = "topk", l1_coefficient: float = 0.3,
                 aux_coefficient: float = 1 / 32, epochs: int = 20, batch_size: int = 256, lr: float = 1e-3,
                 seed: int = 0, max_samples: int = 200_000, per_head: bool | None = None):
        super().__init__(per_head)
        for name, value in (("d_sae", d_sae), ("k", k), ("epochs", epochs), ("batch_size", batch_size),
                            ("max_samples", max_samples)):
            require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                    f"SAE: {name} must be a positive integer, got {value!r}")
        require(architecture in ARCHITECTURES, f"SAE: architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        require(architecture != "topk" or k <= d_sae, f"SAE: k={k} exceeds d_sae={d_sae}; keep at most d_sae latents")
        for name, value in (("l1_coefficient", l1_coefficient), ("aux_coefficient", aux_coefficient), ("lr", lr)):
            require(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
                    f"SAE: {name} must be a number >= 0, got {value!r}")
        require(lr > 0, f"SAE: lr must be positive, got {lr!r}")
        require(isinstance(seed, int), f"SAE: seed must be an integer, got {seed!r}")
        self.d_sae, self.k, self.architecture = d_sae, k, architecture
        self.l1_coefficient, self.aux_coefficient = float(l1_coefficient), float(aux_coefficient)
        self.epochs, self.batch_size, self.lr, self.seed, self.max_samples = epochs, batch_size, float(lr), seed, max_samples

    def options(self) -> dict[str, Any]:
        return {**super().options(), "d_sae": self.d_sae, "k": self.k, "architecture": self.architecture,
                "l1_coefficient": self.l1_coefficient, "aux_coefficient": self.aux_coefficient,
                "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "seed": self.seed,
                "max_samples": self.max_samples}

    def describe(self) -> str:
        sparsity = f"k={self.k}" if self.architecture == "topk" else f"l1={self.l1_coefficient:g}"
        return f"sae(d_sae={self.d_sae}, {sparsity})"

    # -- fitting ----------------------------------------------------------------------
    def fit_sample(self, samples: Tensor) -> None:
        trained = [self._train(samples[:, g]) for g in range(samples.shape[1])]
        self.set_tensors({name: torch.stack([t[name] for t in trained]) for name in trained[0]})

    def _train(self, x: Float[Tensor, "m feature"]) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        feature = x.shape[1]
        scale = (feature / x.pow(2).sum(1).mean().clamp_min(torch.finfo(torch.float32).tiny)).sqrt()
        x = x * scale
        decoder = torch.randn(self.d_sae, feature, generator=generator)
        decoder /= decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
        params = {"W_enc": decoder.T.clone(), "b_enc": torch.zeros(self.d_sae), "W_dec": decoder,
                  "b_dec": x.mean(0)}
        for tensor in params.values():
            tensor.requires_grad_(True)
        optimiser = torch.optim.Adam(params.values(), lr=self.lr)
        last_fired = torch.zeros(self.d_sae, dtype=torch.long)  # epoch in which each latent last fired
        with torch.enable_grad():
            for epoch in range(1, self.epochs + 1):
                dead = last_fired < epoch - 1  # silent through the whole previous epoch
                for rows in torch.randperm(len(x), generator=generator).split(self.batch_size):
                    batch = x[rows]
                    pre = (batch - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
                    codes = self._codes(pre)
                    error = batch - (codes @ params["W_dec"] + params["b_dec"])
                    loss = error.pow(2).sum(1).mean() + self._penalty(codes, pre, error, dead, params["W_dec"])
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    with torch.no_grad():
                        params["W_dec"] /= params["W_dec"].norm(dim=1, keepdim=True).clamp_min(1e-12)
                        last_fired[(codes > 0).any(0)] = epoch
        return {**{name: t.detach() for name, t in params.items()}, "scale": scale.reshape(1)}

    def _codes(self, pre: Tensor) -> Tensor:
        """Sparse latents from pre-activations ``[n, d_sae]``."""
        if self.architecture == "relu":
            return torch.relu(pre)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def _penalty(self, codes: Tensor, pre: Tensor, error: Tensor, dead: Tensor, decoder: Tensor) -> Tensor:
        """L1 for ReLU SAEs; for TopK, the auxiliary reconstruction of the error by dead latents."""
        if self.architecture == "relu":
            return self.l1_coefficient * codes.abs().sum(1).mean()
        n_dead = int(dead.sum())
        if n_dead == 0 or self.aux_coefficient == 0:
            return pre.new_zeros(())
        k_aux = min(n_dead, max(1, pre.shape[1] // 2))
        dead_pre = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1)
        aux_codes = torch.zeros_like(pre).scatter(-1, dead_pre.indices, torch.relu(dead_pre.values))
        aux_error = error.detach() - aux_codes @ decoder
        return self.aux_coefficient * aux_error.pow(2).sum(1).mean()

    def tensors(self) -> dict[str, Tensor]:
        return {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec, "scale": self.scale}

    def state_shapes(self, group: int, feature: int) -> dict[str, tuple[int, ...]]:
        return {"W_enc": (group, feature, self.d_sae), "b_enc": (group, self.d_sae),
                "W_dec": (group, self.d_sae, feature), "b_dec": (group, feature), "scale": (group, 1)}

    def set_tensors(self, state: dict[str, Tensor]) -> None:
        self.W_enc, self.b_enc, self.W_dec = state["W_enc"], state["b_enc"], state["W_dec"]
        self.b_dec, self.scale = state["b_dec"], state["scale"]

    # -- application ------------------------------------------------------------------
    def encode(self, x: Float[Tensor, "n group feature"]) -> Float[Tensor, "n group d_sae"]:
        """The sparse latents of ``x`` (in the fitted layout), in ``x``'s dtype."""
        d = self.derived(x)
        scaled = (x * d["scale"]).transpose(0, 1) - d["b_dec"].unsqueeze(1)  # [group, n, feature]
        pre = torch.baddbmm(d["b_enc"].unsqueeze(1), scaled, d["W_enc"])
        return self._codes(pre).transpose(0, 1)

    def apply(self, x: Tensor) -> Tensor:
        d = self.derived(x)
        codes = self.encode(x).transpose(0, 1)  # [group, n, d_sae]
        decoded = torch.baddbmm(d["b_dec"].unsqueeze(1), codes, d["W_dec"])
        return (decoded / d["scale"].unsqueeze(1)).transpose(0, 1)
