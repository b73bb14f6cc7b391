"""Sparse dictionaries: an activation rebuilt from a few of ``d_sae`` learned latents.

:class:`SparseDictionary` is what sparse autoencoders (:class:`~illusion_probe.simplify.sae.SAE`)
and transcoders (:class:`~illusion_probe.simplify.transcoder.Transcoder`) share. Fitting keeps a
seeded, bounded sample of the streamed activations (a
:class:`~illusion_probe.simplify.reservoir.Reservoir`, shared by every width of a sweep), then
trains one dictionary per group (head) in torch with Adam, for a fixed number of epochs over it:

- inputs and targets scaled so that their mean squared norm is their dimension (scales saved);
- decoder rows of unit norm (kept so after every step), decoder bias at the target mean, encoder
  bias 0; an SAE's encoder tied to its decoder at initialisation (input and output are one space),
  a transcoder's drawn as independent unit directions (measured: tying it to the decoder starts the
  map near the identity, and after 60 steps its explained variance was -1.2 against -0.18 untied);
- ``architecture="topk"`` (the default): the ``k`` largest pre-activations kept, ReLU on them
  (Gao et al., 2024), plus their auxiliary loss for dead latents: the reconstruction error is
  reconstructed from the ``k_aux = d_sae / 2`` largest pre-activations among latents that did not
  fire during the last epoch (at most the dead count), weighted ``aux_coefficient``;
- ``architecture="relu"``: ReLU latents and an L1 penalty ``l1_coefficient * sum |z|``.

After training, each latent's firing frequency on the training sample is kept with the weights
(``train_frequency``), the in-distribution reference of the dictionary metrics. Every group starts
from ``seed``, so fitting per head equals fitting each head alone, and the result is reproducible on
CPU for a given thread count. Under ``torchrun`` each process trains whole dictionaries, or, with
``data_parallel=True``, every process trains each one: it holds the whole sample and draws the same
batches, computes its share (every ``size``-th row) of each batch's loss, and the gradients and the
firing record are summed across processes before each step.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from illusion_probe.distributed import World, all_reduce, sum_gradients, world
from illusion_probe.errors import require
from illusion_probe.simplify.reservoir import SampledSimplifier

ARCHITECTURES = ("topk", "relu")
#: Rows per chunk when measuring firing frequencies after training (bounds the code tensor).
FREQUENCY_CHUNK = 8192


class SparseDictionary(SampledSimplifier):
    """A sparse code over ``d_sae`` latents, trained on a seeded sample (see the module docstring).

    Sweeps vary ``d_sae`` with the sparsity fixed (``k`` or ``l1_coefficient``).

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
        per_head: one dictionary per head of ``[batch, pos, head, d_head]``.
        data_parallel: under ``torchrun``, train each dictionary on every process at once, each taking a
            share of every batch (for a large dictionary); by default each process trains whole dictionaries
            of the study in turn, which is bit-identical to one process and, for small dictionaries, faster
            (measured: one all-reduce per step cost about 2 ms with gloo on CPU).
    """

    size_option: ClassVar[str | None] = "d_sae"
    has_latents: ClassVar[bool] = True
    #: Whether the encoder reads the input minus the decoder bias (SAEs: input and output are one space).
    centre_input: ClassVar[bool]

    def __init__(self, d_sae: int, k: int = 8, architecture: str = "topk", l1_coefficient: float = 0.3,
                 aux_coefficient: float = 1 / 32, epochs: int = 20, batch_size: int = 256, lr: float = 1e-3,
                 seed: int = 0, max_samples: int = 200_000, per_head: bool | None = None,
                 data_parallel: bool = False):
        super().__init__(per_head)
        name = type(self).__name__
        for option, value in (("d_sae", d_sae), ("k", k), ("epochs", epochs), ("batch_size", batch_size),
                              ("max_samples", max_samples)):
            require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                    f"{name}: {option} must be a positive integer, got {value!r}")
        require(architecture in ARCHITECTURES, f"{name}: architecture must be one of {ARCHITECTURES}, "
                f"got {architecture!r}")
        require(architecture != "topk" or k <= d_sae, f"{name}: k={k} exceeds d_sae={d_sae}; keep at most d_sae latents")
        for option, value in (("l1_coefficient", l1_coefficient), ("aux_coefficient", aux_coefficient), ("lr", lr)):
            require(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
                    f"{name}: {option} must be a number >= 0, got {value!r}")
        require(lr > 0, f"{name}: lr must be positive, got {lr!r}")
        require(isinstance(seed, int) and not isinstance(seed, bool), f"{name}: seed must be an integer, got {seed!r}")
        require(isinstance(data_parallel, bool), f"{name}: data_parallel must be True or False, got {data_parallel!r}")
        self.data_parallel = data_parallel
        self.d_sae, self.k, self.architecture = d_sae, k, architecture
        self.l1_coefficient, self.aux_coefficient = float(l1_coefficient), float(aux_coefficient)
        self.epochs, self.batch_size, self.lr, self.seed, self.max_samples = epochs, batch_size, float(lr), seed, max_samples

    def options(self) -> dict[str, Any]:
        return {**super().options(), "d_sae": self.d_sae, "k": self.k, "architecture": self.architecture,
                "l1_coefficient": self.l1_coefficient, "aux_coefficient": self.aux_coefficient,
                "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "seed": self.seed,
                "max_samples": self.max_samples, "data_parallel": self.data_parallel}

    @property
    def finishes_together(self) -> bool:
        return self.data_parallel

    def describe(self) -> str:
        sparsity = f"k={self.k}" if self.architecture == "topk" else f"l1={self.l1_coefficient:g}"
        return f"{self.method}(d_sae={self.d_sae}, {sparsity})"

    # -- training -----------------------------------------------------------------------
    def fit_pairs(self, inputs: Float[Tensor, "m group d_in"], targets: Float[Tensor, "m group d_out"]) -> None:
        """Train one dictionary per group mapping ``inputs`` to ``targets``; set the frozen state."""
        trained = [self._train(inputs[:, g], targets[:, g]) for g in range(inputs.shape[1])]
        self.set_tensors({name: torch.stack([t[name] for t in trained]) for name in trained[0]})

    def _train(self, x: Float[Tensor, "m d_in"], y: Float[Tensor, "m d_out"]) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        scale_in, scale_out = _unit_scale(x), _unit_scale(y)
        x, y = x * scale_in, y * scale_out
        decoder = _unit_rows(torch.randn(self.d_sae, y.shape[1], generator=generator))
        encoder = decoder.T.clone() if self.centre_input else _unit_rows(
            torch.randn(self.d_sae, x.shape[1], generator=generator)).T.contiguous()
        params = {"W_enc": encoder, "b_enc": torch.zeros(self.d_sae), "W_dec": decoder, "b_dec": y.mean(0)}
        for tensor in params.values():
            tensor.requires_grad_(True)
        optimiser = torch.optim.Adam(params.values(), lr=self.lr)
        last_fired = torch.zeros(self.d_sae, dtype=torch.long)  # epoch in which each latent last fired
        here = world() if self.data_parallel else World()  # data-parallel: every size-th row of each batch
        with torch.enable_grad():
            for epoch in range(1, self.epochs + 1):
                dead = last_fired < epoch - 1  # silent through the whole previous epoch
                for rows in torch.randperm(len(x), generator=generator).split(self.batch_size):
                    share = rows[here.interleaved(len(rows))]
                    pre = self._pre(x[share], params["W_enc"], params["b_enc"], params["b_dec"])
                    codes = self._codes(pre)
                    error = y[share] - (codes @ params["W_dec"] + params["b_dec"])
                    loss = (_batch_mean(error.pow(2).sum(1), len(rows))
                            + self._penalty(codes, pre, error, dead, params["W_dec"], len(rows)))
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    fired = (codes > 0).any(0)
                    if here.is_distributed:
                        fired = sum_gradients(list(params.values()), fired.float()) > 0
                    optimiser.step()
                    with torch.no_grad():
                        params["W_dec"] /= params["W_dec"].norm(dim=1, keepdim=True).clamp_min(1e-12)
                        last_fired[fired] = epoch
        state = {name: t.detach() for name, t in params.items()}
        with torch.no_grad():
            fired = sum((self._codes(self._pre(chunk, state["W_enc"], state["b_enc"], state["b_dec"])) > 0).sum(0)
                        for chunk in x[here.interleaved(len(x))].split(FREQUENCY_CHUNK))
        if here.is_distributed:
            all_reduce(fired)
        return {**state, "scale_in": scale_in.reshape(1), "scale_out": scale_out.reshape(1),
                "train_frequency": fired.double().div(len(x)).float()}

    def _pre(self, x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
        """Pre-activations ``[n, d_sae]`` of scaled inputs ``[n, d_in]``."""
        return (x - b_dec if self.centre_input else x) @ w_enc + b_enc

    def _codes(self, pre: Tensor) -> Tensor:
        """Sparse latents from pre-activations ``[..., d_sae]``."""
        if self.architecture == "relu":
            return torch.relu(pre)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def _penalty(self, codes: Tensor, pre: Tensor, error: Tensor, dead: Tensor, decoder: Tensor, batch: int) -> Tensor:
        """L1 for ReLU dictionaries; for TopK, the auxiliary reconstruction of the error by dead latents (the
        rows' share of the mean over a ``batch`` of rows)."""
        if self.architecture == "relu":
            return self.l1_coefficient * _batch_mean(codes.abs().sum(1), batch)
        n_dead = int(dead.sum())
        if n_dead == 0 or self.aux_coefficient == 0:
            return pre.new_zeros(())
        k_aux = min(n_dead, max(1, pre.shape[1] // 2))
        dead_pre = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1)
        aux_codes = torch.zeros_like(pre).scatter(-1, dead_pre.indices, torch.relu(dead_pre.values))
        aux_error = error.detach() - aux_codes @ decoder
        return self.aux_coefficient * _batch_mean(aux_error.pow(2).sum(1), batch)

    # -- state --------------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        return {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec,
                "scale_in": self.scale_in, "scale_out": self.scale_out, "train_frequency": self.train_frequency}

    def set_tensors(self, state: dict[str, Tensor]) -> None:
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"]
        self.scale_in, self.scale_out, self.train_frequency = state["scale_in"], state["scale_out"], state["train_frequency"]

    def dictionary_shapes(self, group: int, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
        """Each state tensor's shape for ``group`` dictionaries from ``d_in`` to ``d_out`` features."""
        return {"W_enc": (group, d_in, self.d_sae), "b_enc": (group, self.d_sae), "W_dec": (group, self.d_sae, d_out),
                "b_dec": (group, d_out), "scale_in": (group, 1), "scale_out": (group, 1),
                "train_frequency": (group, self.d_sae)}

    # -- application --------------------------------------------------------------------
    def encode(self, x: Float[Tensor, "n group d_in"]) -> Float[Tensor, "n group d_sae"]:
        """The sparse latents of inputs ``x`` (in the fitted layout), in ``x``'s dtype."""
        return self._codes(self._pre_activations(x)).transpose(0, 1)

    def decode(self, codes: Float[Tensor, "n group d_sae"]) -> Float[Tensor, "n group d_out"]:
        """The reconstruction from latents ``codes``, in the targets' units."""
        d = self.derived(codes)
        decoded = torch.baddbmm(d["b_dec"].unsqueeze(1), codes.transpose(0, 1), d["W_dec"])
        return (decoded / d["scale_out"].unsqueeze(1)).transpose(0, 1)

    def apply(self, x: Tensor) -> Tensor:
        """``decode(encode(x))``; a TopK dictionary sums only the ``k`` decoder rows each sample keeps."""
        if self.architecture != "topk":
            return self.decode(self.encode(x))
        d = self.derived(x)
        top = self._pre_activations(x).topk(self.k, dim=-1)  # [group, n, k]
        decoded = torch.stack([F.embedding_bag(top.indices[g], d["W_dec"][g], per_sample_weights=top.values[g].relu(),
                                               mode="sum") for g in range(len(top.indices))])
        return ((decoded + d["b_dec"].unsqueeze(1)) / d["scale_out"].unsqueeze(1)).transpose(0, 1)

    def _pre_activations(self, x: Tensor) -> Tensor:
        """``[group, n, d_sae]`` pre-activations of inputs ``x`` ``[n, group, d_in]``."""
        d = self.derived(x)
        scaled = (x * d["scale_in"]).transpose(0, 1)  # [group, n, d_in]
        if self.centre_input:
            scaled = scaled - d["b_dec"].unsqueeze(1)
        return torch.baddbmm(d["b_enc"].unsqueeze(1), scaled, d["W_enc"])

    def fitted_inputs(self, source: Float[Tensor, "*samples feature"]) -> Float[Tensor, "n group d_in"]:
        """A whole activation the dictionary reads (the hook's own, or a transcoder's MLP input) in the fitted
        ``[n, group, d_in]`` layout; one-line error if its shape does not fit."""
        require(self.is_fitted, f"{self.describe()}: not fitted; call fit() or fit_proxy() first")
        grouped = self._grouped(source)
        fitted = tuple(self.W_enc.shape[:2])
        require(tuple(grouped.shape[-2:]) == fitted, f"{self.describe()}: input has (group, feature) "
                f"{tuple(grouped.shape[-2:])}, fitted on {fitted}; apply it at the hook it was fitted on")
        return grouped.reshape(-1, *fitted)

    def latents(self, source: Float[Tensor, "*samples feature"]) -> Float[Tensor, "*samples group d_sae"]:
        """The latents of a whole activation ``source``: the hook's own (SAE) or the MLP input (transcoder)."""
        codes = self.encode(self.fitted_inputs(source))
        return codes.reshape(*self._grouped(source).shape[:-2], *codes.shape[1:])

def _batch_mean(terms: Tensor, batch: int) -> Tensor:
    """The mean of ``terms`` over a batch of ``batch`` rows, of which ``terms`` hold this process's share (the
    shares of every process sum to the batch's mean); alone, the plain mean."""
    return terms.mean() if len(terms) == batch else terms.sum() / batch


def _unit_scale(x: Tensor) -> Tensor:
    """The factor that makes the mean squared norm of the rows of ``x`` equal to its width."""
    return (x.shape[1] / x.pow(2).sum(1).mean().clamp_min(torch.finfo(torch.float32).tiny)).sqrt()


def _unit_rows(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
