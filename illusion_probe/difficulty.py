"""Difficulty-matched metrics: every split reweighted to the in-distribution mix of the model's confidence.

Out-of-distribution positions are often harder for the model itself, and a proxy disagrees more
where the model is unsure, so part of a gap can be difficulty rather than unfaithfulness. The
model's *confidence* at a scored position is the probability it gives its own prediction (the
argmax over the answer ids, normalised over the whole output vocabulary). Its quantiles on the
reference split (the first in-distribution split) cut ``n_bins`` bins of equal mass there, and each
split gets one boolean label per bin (``confidence_1`` the least confident fifth, ...), so
evaluation reports every metric per bin like any other position category.

A metric that is a mean over positions (agreement, KL, accuracies) then has a difficulty-matched
value on each split, the category ``difficulty_matched``::

    matched(split) = sum_b pi_b * value_b(split) / sum_b pi_b      (bins the split has)

with ``pi_b`` the reference split's share of scored positions in bin ``b``. On the reference split
itself it is the plain value (the ``all`` record, copied), so the matched gap is
``value(reference) - matched(OOD split)``. Its interval resamples the split's sequences with the
weights ``pi`` held at the reference's point estimate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from illusion_probe import stats
from illusion_probe.backends import Backend
from illusion_probe.distributed import gather_interleaved, world
from illusion_probe.metrics import Predictions
from illusion_probe.results import MATCHED, Record
from illusion_probe.tasks.base import Split, SplitSet

BIN_PREFIX = "confidence_"


def bin_label(index: int) -> str:
    """The category of confidence bin ``index`` (0-based): ``confidence_1`` is the least confident."""
    return f"{BIN_PREFIX}{index + 1}"


def model_confidence(backend: Backend, split: Split, answer_ids: Tensor, batch_size: int, chunk: int) -> Tensor:
    """``[n, pos]`` the clean model's probability of its own prediction at each scored position (NaN elsewhere).

    Under many processes each computes every ``size``-th sequence, and the rows are gathered.
    """
    here = world()
    if not here.is_distributed:
        return _confidence(backend, split, answer_ids, batch_size, chunk)
    mine = _confidence(backend, split.select(here.interleaved(len(split))), answer_ids, batch_size, chunk)
    padded = torch.full((len(mine), split.tokens.shape[1]), float("nan"), dtype=torch.float32)
    padded[:, : mine.shape[1]] = mine
    return gather_interleaved({"confidence": padded}, len(split))["confidence"]


def _confidence(backend: Backend, split: Split, answer_ids: Tensor, batch_size: int, chunk: int) -> Tensor:
    confidence = torch.full(split.tokens.shape, float("nan"), dtype=torch.float32)
    for start in range(0, len(split), batch_size):
        rows = slice(start, min(start + batch_size, len(split)))
        width = int(split.real_mask[rows].sum(1).max())
        tokens, real = split.tokens[rows, :width].to(backend.device), split.real_mask[rows, :width].to(backend.device)
        scored = split.eval_mask[rows, :width].to(backend.device)
        residual = backend.final_residual(tokens, real, [])[scored]
        values = []
        for part in residual.split(chunk):
            predictions = Predictions(backend.head(part), answer_ids)
            values.append(predictions.logp.gather(-1, predictions.pred.unsqueeze(-1)).squeeze(-1).exp())
        block = confidence[rows, :width]
        block[scored.cpu()] = torch.cat(values).float().cpu() if values else torch.zeros(0)
    return confidence


def with_confidence_bins(splits: SplitSet, confidences: dict[str, Tensor], reference: str, n_bins: int) -> SplitSet:
    """``splits`` with one boolean label per confidence bin, the bins being quantiles of ``reference``'s confidence."""
    known = confidences[reference][~torch.isnan(confidences[reference])].double()
    edges = torch.quantile(known, torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)[1:-1])
    labelled = []
    for split in splits.values():
        confidence = confidences[split.name].double()
        index = torch.bucketize(confidence, edges, right=True)
        scored = ~torch.isnan(confidence)
        bins = {bin_label(b): scored & (index == b) for b in range(n_bins)}
        labelled.append(dataclasses.replace(split, labels={**split.labels, **bins}))
    return SplitSet(labelled)


def matched_records(records: Sequence[Record], samples: dict[tuple[str, str, str, str, str], np.ndarray],
                    reference: str, metrics: Sequence[str]) -> list[Record]:
    """A ``difficulty_matched`` record of each of ``metrics`` per split and proxy (its bootstrap samples go into
    ``samples``, for the gaps); on ``reference`` it copies the ``all`` record."""
    cells = {(r.split, r.proxy, r.category, r.metric): r for r in records if not r.hook}
    added = []
    for (split, proxy, category, metric), plain in cells.items():
        if category != "all" or metric not in metrics:
            continue
        if split == reference:
            value, low, high = plain.value, plain.ci_low, plain.ci_high
            samples[(split, proxy, MATCHED, metric, "")] = samples[(split, proxy, "all", metric, "")]
        else:
            value, boot = _reweighted(cells, samples, split, reference, proxy, metric)
            samples[(split, proxy, MATCHED, metric, "")] = boot
            low, high = stats.interval(boot)
        added.append(dataclasses.replace(plain, category=MATCHED, value=value, ci_low=low, ci_high=high))
    return added


def _reweighted(cells: dict, samples: dict, split: str, reference: str, proxy: str,
                metric: str) -> tuple[float, np.ndarray]:
    """``sum_b pi_b value_b / sum_b pi_b`` over the bins ``split`` has, and its bootstrap samples."""
    value, boot, mass = 0.0, 0.0, 0.0
    b = 0
    while (reference, proxy, bin_label(b), metric) in cells:
        share = cells[(reference, proxy, bin_label(b), metric)].n_positions
        here = cells.get((split, proxy, bin_label(b), metric))
        if share > 0 and here is not None and here.n_positions > 0:
            value += share * here.value
            boot = boot + share * samples[(split, proxy, bin_label(b), metric, "")]
            mass += share
        b += 1
    if mass == 0:
        return float("nan"), np.full(np.shape(samples[(split, proxy, "all", metric, "")]), np.nan)
    return value / mass, np.asarray(boot, dtype=np.float64) / mass
