"""Metrics as objects: each knows its name, what it sums per sequence, how it reduces, and its direction.

Two kinds:

- A :class:`Metric` compares the proxy's predictions with the model's at the scored positions of a
  split. :meth:`Metric.terms` returns per-position terms for a chunk of scored positions
  (:class:`Scored`); evaluation sums each term per sequence and per position category; and
  :meth:`Metric.reduce` turns the totals (plain, or bootstrap-resampled with a leading axis) into
  the value. ``count``, the number of scored positions, is always among the totals.
- A :class:`HookMetric` compares activations at hooks over every real token: the proxy's output at
  a hook with what the simplifier received (``reference = "input"``) or with the clean model's
  activation there (``reference = "clean"``), or reads a sparse dictionary's latents
  (``reference = "latents"``).

Register a metric with ``@ip.register_metric`` and :func:`ip.evaluate` computes it by default; the
results table, the CSV, the gaps, the headline and the report show it with no other change.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from illusion_probe.hook_names import attn_pattern, is_attention_pattern, is_query_or_key, layer_of
from illusion_probe.registry import METRICS, register_metric


class Predictions:
    """One model's (or proxy's) outputs at a chunk of scored positions, with derived values computed once.

    Args:
        logits: ``[n, d_vocab_out]``.
        answer_ids: ``[n_answers]`` output ids a prediction is chosen among.
    """

    def __init__(self, logits: Float[Tensor, "n vocab"], answer_ids: Int[Tensor, " answers"]):
        self.logits = logits
        self.answer_ids = answer_ids

    @functools.cached_property
    def logp(self) -> Float[Tensor, "n vocab"]:
        """Log-probabilities over the full output vocabulary (float32 or wider)."""
        return F.log_softmax(self.logits.float(), dim=-1)

    @functools.cached_property
    def probs(self) -> Float[Tensor, "n vocab"]:
        """Probabilities over the full output vocabulary: ``exp(logp)``, computed once for every proxy compared."""
        return self.logp.exp()

    @functools.cached_property
    def pred(self) -> Int[Tensor, " n"]:
        """The predicted output id: the argmax over ``answer_ids``."""
        ids, n = self.answer_ids, self.logits.shape[-1]
        if len(ids) == n and bool((ids == torch.arange(n, device=ids.device)).all()):
            return self.logits.argmax(-1)  # every output id in order: no copy of the logits
        return ids[self.logits.index_select(-1, ids).argmax(-1)]


@dataclass(frozen=True)
class Scored:
    """What a :class:`Metric` sees for one chunk of ``n`` scored positions.

    Attributes:
        targets: ``[n]`` the correct output ids.
        model: the clean model's :class:`Predictions`.
        proxy: the proxied model's.
        baseline: the ablated model's (only for metrics with ``uses_baseline``).
    """

    targets: Int[Tensor, " n"]
    model: Predictions
    proxy: Predictions
    baseline: Predictions | None = None


def cross_entropy(logp: Float[Tensor, "n vocab"], targets: Int[Tensor, " n"]) -> Float[Tensor, " n"]:
    """``-log p(target)`` per position."""
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


class Metric(ABC):
    """A metric over scored positions. Subclass, set the class attributes, implement :meth:`terms` and :meth:`reduce`.

    Attributes:
        name: unique name (the ``metric`` column of results).
        title: a readable label for tables and figure axes.
        higher_is_better: ``True`` if a higher value means a more faithful proxy, ``False`` if lower
            does, ``None`` if the metric does not measure faithfulness (the model's own accuracy).
        uses_baseline: needs the ablated model's predictions (an extra forward pass per hook set).
    """

    name: ClassVar[str]
    title: ClassVar[str] = ""
    higher_is_better: ClassVar[bool | None] = True
    uses_baseline: ClassVar[bool] = False

    @abstractmethod
    def terms(self, scored: Scored) -> dict[str, Float[Tensor, " n"]]:
        """Per-position terms, summed per sequence by evaluation (``count`` is added for you)."""

    @abstractmethod
    def reduce(self, totals: Mapping[str, np.ndarray]) -> np.ndarray:
        """The value from term totals; each total may carry a leading resample axis, so use elementwise ops."""

    @property
    def label(self) -> str:
        """``title`` if set, else ``name``."""
        return self.title or self.name


class HookMetric(ABC):
    """A metric over the activations at hooks, on every real token.

    Attributes:
        name, title, higher_is_better: as for :class:`Metric`.
        reference: ``"input"`` compares a simplifier's output with its input (watched hooks must be
            hooks the proxy simplifies); ``"clean"`` compares the activation in the proxied run with
            the clean model's at the same hook; ``"latents"`` reads the latents of the sparse
            dictionaries a proxy applies: :meth:`watched` is given only their hooks, and
            :meth:`terms` receives ``(latents [batch, pos, group, d_sae], train_frequency [group, d_sae]
            or None, real)``, ``train_frequency`` being each latent's firing rate on the fit sample.
    """

    name: ClassVar[str]
    title: ClassVar[str] = ""
    higher_is_better: ClassVar[bool | None] = True
    reference: ClassVar[Literal["input", "clean", "latents"]] = "input"

    @abstractmethod
    def watched(self, simplified: list[str]) -> list[str]:
        """The hooks to compare at, given the hooks a proxy simplifies (may be empty: not applicable)."""

    def prepare(self, reference: Tensor) -> Tensor:
        """What to keep of a reference activation until the proxied one arrives (default: all of it)."""
        return reference

    @abstractmethod
    def terms(self, reference: Tensor, proxied: Tensor,
              real: Bool[Tensor, "batch pos"]) -> dict[str, Tensor]:
        """Per-sequence sums ``[batch, ...]`` over the real positions of one batch."""

    @abstractmethod
    def reduce(self, totals: Mapping[str, np.ndarray]) -> np.ndarray:
        """As :meth:`Metric.reduce`."""

    @property
    def label(self) -> str:
        """``title`` if set, else ``name``."""
        return self.title or self.name


AnyMetric = Metric | HookMetric


def default_metrics() -> list[AnyMetric]:
    """One instance of every registered metric, built-ins first."""
    return [METRICS.get(name)() for name in METRICS.names()]


def resolve_metrics(metrics: list[str | AnyMetric] | None) -> list[AnyMetric]:
    """Metric objects from names or instances (``None``: every registered metric); names must be unique."""
    chosen = default_metrics() if metrics is None else [
        m if isinstance(m, (Metric, HookMetric)) else METRICS.get(m)() for m in metrics]
    names = [m.name for m in chosen]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        from illusion_probe.errors import IllusionProbeError

        raise IllusionProbeError(f"evaluate: metric(s) {duplicated} given twice; name each metric once")
    return chosen


# -- built-in metrics over scored positions ---------------------------------------------------------


class PositionMean(Metric):
    """A metric that is the mean of one value per scored position: implement :meth:`value` only."""

    @abstractmethod
    def value(self, scored: Scored) -> Float[Tensor, " n"]:
        """The value at each scored position of the chunk."""

    def terms(self, scored: Scored) -> dict[str, Tensor]:
        return {"sum": self.value(scored)}

    def reduce(self, totals: Mapping[str, np.ndarray]) -> np.ndarray:
        return totals["sum"] / totals["count"]


@register_metric
class ModelAccuracy(PositionMean):
    """``acc_model``: share of scored positions the model predicts correctly."""

    name = "acc_model"
    title = "model accuracy"
    higher_is_better = None

    def value(self, scored: Scored) -> Tensor:
        return (scored.model.pred == scored.targets).float()


@register_metric
class ProxyAccuracy(PositionMean):
    """``acc_proxy``: share of scored positions the proxy predicts correctly."""

    name = "acc_proxy"
    title = "proxy accuracy"
    higher_is_better = None

    def value(self, scored: Scored) -> Tensor:
        return (scored.proxy.pred == scored.targets).float()


@register_metric
class AccuracyDelta(PositionMean):
    """``acc_delta``: proxy accuracy minus model accuracy, paired over the same positions."""

    name = "acc_delta"
    title = "proxy − model accuracy"
    higher_is_better = None

    def value(self, scored: Scored) -> Tensor:
        return (scored.proxy.pred == scored.targets).float() - (scored.model.pred == scored.targets).float()


@register_metric
class Agreement(PositionMean):
    """``agreement``: share of scored positions where the proxy predicts what the model predicts."""

    name = "agreement"
    title = "agreement with the model"

    def value(self, scored: Scored) -> Tensor:
        return (scored.proxy.pred == scored.model.pred).float()


@register_metric
class KLDivergence(PositionMean):
    """``kl``: mean KL(model ‖ proxy) over the full output vocabulary, in nats."""

    name = "kl"
    title = "KL(model ‖ proxy), nats"
    higher_is_better = False

    def value(self, scored: Scored) -> Tensor:
        return (scored.model.probs * (scored.model.logp - scored.proxy.logp)).sum(-1)


@register_metric
class CEScore(Metric):
    """``ce_score``: (CE_ablated − CE_proxy) / (CE_ablated − CE_model), as SAELens scores loss recovered."""

    name = "ce_score"
    title = "CE loss score"
    uses_baseline = True

    def terms(self, scored: Scored) -> dict[str, Tensor]:
        assert scored.baseline is not None  # evaluation provides it: uses_baseline
        return {"ce_model": cross_entropy(scored.model.logp, scored.targets),
                "ce_proxy": cross_entropy(scored.proxy.logp, scored.targets),
                "ce_ablated": cross_entropy(scored.baseline.logp, scored.targets)}

    def reduce(self, totals: Mapping[str, np.ndarray]) -> np.ndarray:
        return (totals["ce_ablated"] - totals["ce_proxy"]) / (totals["ce_ablated"] - totals["ce_model"])


# -- built-in metrics over hook activations ----------------------------------------------------------


@register_metric
class ExplainedVariance(HookMetric):
    """``explained_variance`` at each simplified hook: 1 − E‖x − x̂‖² / (E‖x‖² − ‖E x‖²), pooled over real tokens.

    ``x`` is what the simplifier receives, ``x̂`` what it returns; per-head activations count as one
    ``head * d_head`` vector. Sums within a sequence run in float32 (or wider), across sequences in float64.
    """

    name = "explained_variance"
    title = "explained variance"
    reference = "input"

    def watched(self, simplified: list[str]) -> list[str]:
        return [hook for hook in simplified if not is_attention_pattern(hook)]

    def terms(self, reference: Tensor, proxied: Tensor, real: Bool[Tensor, "batch pos"]) -> dict[str, Tensor]:
        dtype = torch.promote_types(reference.dtype, torch.float32)
        x, x_hat, mask = reference.to(dtype), proxied.to(dtype), real.to(dtype)
        features = tuple(range(2, x.ndim))
        return {"err": ((x - x_hat).square().sum(features) * mask).sum(1),
                "sq": (x.square().sum(features) * mask).sum(1),
                "total": torch.einsum("bp,bp...->b...", mask, x).reshape(len(x), -1),
                "count": mask.sum(1)}

    def reduce(self, totals: Mapping[str, np.ndarray]) -> np.ndarray:
        count = totals["count"]
        mean = totals["total"] / count[..., None]
        variance = totals["sq"] / count - (mean**2).sum(axis=-1)
        return 1.0 - (totals["err"] / count) / variance


@register_metric
class AttentionAgreement(HookMetric):
    """``attn_agreement``: share of attention rows (every head, real queries) whose argmax key is unchanged.

    Watched at the pattern of each layer whose queries or keys the proxy simplifies. A proxy that sets
    the pattern itself (one-hot attention) is not scored: its argmax agrees by construction.
    """

    name = "attn_agreement"
    title = "attention argmax agreement"
    reference = "clean"

    def watched(self, simplified: list[str]) -> list[str]:
        patterned = {layer_of(h) for h in simplified if is_attention_pattern(h)}
        layers = {layer_of(h) for h in simplified if is_query_or_key(h)} - patterned - {None}
        return [attn_pattern(layer) for layer in sorted(layers)]  # type: ignore[type-var]

    def prepare(self, reference: Tensor) -> Tensor:
        return reference.argmax(-1)  # [batch, head, query]: all that is compared

    def terms(self, reference: Tensor, proxied: Tensor, real: Bool[Tensor, "batch pos"]) -> dict[str, Tensor]:
        same = (reference == proxied.argmax(-1)) & real[:, None, :]
        return {"same": same.sum(dim=(1, 2)).double(), "rows": real.sum(dim=1).double() * reference.shape[1]}

    def reduce(self, totals: Mapping[str, np.ndarray]) -> np.ndarray:
        return totals["same"] / totals["rows"]


# -- built-in metrics over sparse-dictionary latents ---------------------------------------------------


class LatentMetric(HookMetric):
    """A metric over the latents of every sparse dictionary a proxy applies (every real token)."""

    reference = "latents"

    def watched(self, simplified: list[str]) -> list[str]:
        return simplified  # evaluation passes the dictionary hooks only

    @staticmethod
    def fired(latents: Tensor, real: Bool[Tensor, "batch pos"]) -> Float[Tensor, "batch latents"]:
        """Per sequence, how many real tokens each latent (each head's, flattened) fires on."""
        return ((latents > 0) & real[:, :, None, None]).sum(1).flatten(1).double()


@register_metric
class L0(LatentMetric):
    """``l0``: mean number of active latents per token (per dictionary, for per-head dictionaries)."""

    name = "l0"
    title = "L0 (active latents per token)"
    higher_is_better = None

    def terms(self, reference: Tensor, proxied: Tensor | None, real: Tensor) -> dict[str, Tensor]:
        groups = reference.shape[2]
        return {"active": self.fired(reference, real).sum(1), "count": real.sum(1).double() * groups}

    def reduce(self, totals: Mapping[str, np.ndarray]) -> np.ndarray:
        return totals["active"] / totals["count"]


@register_metric
class DeadFraction(LatentMetric):
    """``dead_fraction``: the share of latents that fire on no real token of the split."""

    name = "dead_fraction"
    title = "dead latents (share)"
    higher_is_better = None

    def terms(self, reference: Tensor, proxied: Tensor | None, real: Tensor) -> dict[str, Tensor]:
        return {"fired": self.fired(reference, real)}

    def reduce(self, totals: Mapping[str, np.ndarray]) -> np.ndarray:
        return (totals["fired"] == 0).mean(axis=-1)


class AgainstTraining(LatentMetric):
    """A latent metric compared with the firing rates on the fit sample.

    The fit-sample rates are a constant of the dictionary; to reach :meth:`reduce` through the
    per-sequence sums (and their resamples) they are carried as ``tokens * rate`` per sequence, so
    ``totals["train_rate"] / totals["tokens"]`` gives them back exactly.
    """

    def terms(self, reference: Tensor, proxied: Tensor | None, real: Tensor) -> dict[str, Tensor]:
        if proxied is None:  # a dictionary without fit-sample rates (an external one): not applicable
            return {}
        tokens = real.sum(1).double()
        return {"fired": self.fired(reference, real), "tokens": tokens,
                "train_rate": tokens[:, None] * proxied.flatten().to(tokens.device, torch.float64)}

    @staticmethod
    def train_rate(totals: Mapping[str, np.ndarray]) -> np.ndarray:
        return totals["train_rate"] / totals["tokens"][..., None]


@register_metric
class FrequencyShift(AgainstTraining):
    """``frequency_shift``: total variation between which latents fire on the split and on the fit sample.

    ``0.5 * sum_i |p_i - q_i|``, with ``p_i`` the share of the split's firings that are latent ``i``'s
    and ``q_i`` the same share on the fit sample: 0 when the latents fire in the same proportions,
    1 when the split uses only latents that never fire in training.
    """

    name = "frequency_shift"
    title = "latent frequency shift (total variation)"
    higher_is_better = False

    def reduce(self, totals: Mapping[str, np.ndarray]) -> np.ndarray:
        fired, train = totals["fired"], self.train_rate(totals)
        p = fired / np.maximum(fired.sum(axis=-1, keepdims=True), 1e-300)
        q = train / np.maximum(train.sum(axis=-1, keepdims=True), 1e-300)
        return 0.5 * np.abs(p - q).sum(axis=-1)


@register_metric
class OODOnlyLatents(AgainstTraining):
    """``ood_only_latents``: how many latents fire on the split but never on the fit sample."""

    name = "ood_only_latents"
    title = "latents firing only off the fit sample"
    higher_is_better = False

    def reduce(self, totals: Mapping[str, np.ndarray]) -> np.ndarray:
        return ((totals["fired"] > 0) & (self.train_rate(totals) == 0)).sum(axis=-1).astype(np.float64)
