"""Controls that explain a gap: the refit ceiling and the random baseline of chosen proxies.

For a proxy ``p`` and each OOD split ``s``, the sequences of ``s`` are divided at random (seeded)
into a fit half ``A_s`` and a held-out half ``B_s``. With ``m`` a metric and ``id`` the first
in-distribution split, evaluation adds gaps of ``p`` in these categories (each ``ood_split`` names
``s``; every difference has a bootstrap interval and p-value):

- ``heldout``: ``m(id; p) - m(B_s; p)``, the gap measured on the held-out half;
- ``refit_ceiling``: ``m(id; p) - m(B_s; R)``, with ``R`` the same simplifiers refitted on ``A_s``:
  what is left when the proxy is fitted on ``s`` itself, the part that cannot be captured at this size;
- ``refit_closes``: ``m(B_s; R) - m(B_s; p)``, what refitting recovers, the part due to fitting on the
  wrong data (paired: both on the same resamples of ``B_s``), so ``heldout = refit_ceiling + refit_closes``;
- ``random``: ``m(id; rand) - m(s; rand)``, the gap of the random baseline ``rand``: ``p``'s form with
  its learned structure drawn at random (``Simplifier.random_baseline()``: a random subspace for
  PCA/SVD, random centroids for k-means), fitted on the same train split. Families without one
  (one-hot attention, ablations, sparse dictionaries) get no ``random`` gap.

The refits see half of an OOD split, usually fewer sequences than ``p`` was fitted on. What the
controls evaluate (the refitted and random proxies, the held-out halves) goes to
``Results.control_records``, apart from the proxies' own records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from illusion_probe import stats
from illusion_probe.backends import Backend
from illusion_probe.errors import require
from illusion_probe.results import Gap, Record
from illusion_probe.simplify.fitting import fit_proxies_with
from illusion_probe.simplify.proxy import Proxy
from illusion_probe.tasks.base import Split, SplitSet

CATEGORIES = ("heldout", "refit_ceiling", "refit_closes", "random")


@dataclass(frozen=True)
class ControlPlan:
    """The proxies and splits the controls add, and which proxy is scored on which split.

    Attributes:
        proxies: refitted (``"<p> | refit on <s>"``) and random (``"<p> | random"``) proxies.
        splits: the held-out halves (``"<s>:heldout"``).
        scored_on: every proxy name, the controlled ones included, -> the split names it is scored on.
        refits: ``(p, s)`` -> its refitted proxy's name.
        randoms: ``p`` -> its random baseline's name.
        heldout: ``s`` -> the name of its held-out half.
    """

    proxies: dict[str, Proxy]
    splits: list[Split]
    scored_on: dict[str, frozenset[str]]
    refits: dict[tuple[str, str], str]
    randoms: dict[str, str]
    heldout: dict[str, str]

    def is_control(self, record: Record | Gap) -> bool:
        """Whether a record (or a plain gap) concerns a control proxy or a held-out half."""
        split = record.split if isinstance(record, Record) else record.ood_split
        return record.proxy in self.proxies or split in self.heldout.values()


def halves(split: Split, seed: int) -> tuple[Split, Split]:
    """``split`` divided at random into a fit half and a held-out half (the extra sequence goes to the fit half)."""
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    cut = (len(split) + 1) // 2
    fit, held = order[:cut].sort().values, order[cut:].sort().values
    return split.select(fit), split.select(held)


def plan_controls(backend: Backend, proxies: Mapping[str, Proxy], splits: SplitSet, names: Sequence[str],
                  seed: int) -> ControlPlan:
    """Fit the refitted and random proxies of ``names`` (a subset of ``proxies``) and halve every OOD split."""
    unknown = [name for name in names if name not in proxies]
    require(not unknown, f"evaluate: controls names {unknown}, which are not among the proxies")
    ood = splits.by_role("ood")
    require(bool(ood) and bool(splits.by_role("id")), "evaluate: controls compare an in-distribution split with "
            "the OOD splits; give splits with roles 'id' and 'ood'")
    train = splits.by_role("train")
    originals = list(splits)
    scored_on = {name: frozenset(originals) for name in proxies}
    added: dict[str, Proxy] = {}
    refits, randoms, heldout, held_splits = {}, {}, {}, []
    for index, split in enumerate(ood):
        require(len(split) >= 2, f"evaluate: split {split.name!r} has {len(split)} sequence(s); the refit control "
                "needs at least two (one to fit, one held out)")
        fit_half, held = halves(split, seed + index)
        held = _renamed(held, f"{split.name}:heldout")
        heldout[split.name] = held.name
        held_splits.append(held)
        wanted = {f"{name} | refit on {split.name}": proxies[name].simplifiers for name in names}
        fitted = fit_proxies_with(backend, wanted, fit_half, _fit_sequences(proxies, names), allow_non_train=True)
        for name, refit_name in zip(names, wanted, strict=True):
            refits[(name, split.name)] = refit_name
            scored_on[refit_name] = frozenset({held.name})
        added.update(fitted)
    for name in names:
        scored_on[name] = scored_on[name] | set(heldout.values())
    baselines = {f"{name} | random": {hook: s.random_baseline() for hook, s in proxies[name].simplifiers.items()}
                 for name in names}
    baselines = {name: simplifiers for name, simplifiers in baselines.items() if None not in simplifiers.values()}
    if baselines:
        require(bool(train), "evaluate: the random-baseline control is fitted on the 'train' split, and there is none")
        added.update(fit_proxies_with(backend, baselines, train[0], _fit_sequences(proxies, names)))  # type: ignore[arg-type]
        for name in names:
            if f"{name} | random" in baselines:
                randoms[name] = f"{name} | random"
                scored_on[f"{name} | random"] = frozenset(originals)
    return ControlPlan(added, held_splits, scored_on, refits, randoms, heldout)


def control_gaps(plan: ControlPlan, records: Sequence[Record], samples: Mapping[tuple[str, str, str, str, str], np.ndarray],
                 reference: str, metrics: Sequence[str]) -> list[Gap]:
    """The gaps of every category in :data:`CATEGORIES`, from the records and bootstrap samples of one evaluation."""
    cells = {(r.split, r.proxy, r.metric): r for r in records if r.category == "all" and not r.hook}
    gaps = []
    for (name, split), refit in plan.refits.items():
        held = plan.heldout[split]
        random = plan.randoms.get(name)
        for metric in metrics:
            terms = {"heldout": ((reference, name), (held, name)), "refit_ceiling": ((reference, name), (held, refit)),
                     "refit_closes": ((held, refit), (held, name))}
            if random is not None:
                terms["random"] = ((reference, random), (split, random))
            base = cells.get((reference, name, metric))
            for category, (first, second) in terms.items():
                a, b = cells.get((*first, metric)), cells.get((*second, metric))
                if base is None or a is None or b is None:
                    continue
                difference = samples[(*first, "all", metric, "")] - samples[(*second, "all", metric, "")]
                low, high = stats.interval(difference)
                gaps.append(Gap(proxy=name, method=base.method, size=base.size, category=category, metric=metric,
                                id_split=reference, ood_split=split, value=a.value - b.value, ci_low=low, ci_high=high,
                                p_value=stats.bootstrap_p_value(a.value - b.value, difference)))
    return gaps


def _fit_sequences(proxies: Mapping[str, Proxy], names: Sequence[str]) -> int:
    """The most sequences any controlled proxy was fitted on (a refit uses at most its half of the split)."""
    return max(int(proxies[name].fit_info.get("n_sequences", 1000)) for name in names)


def _renamed(split: Split, name: str) -> Split:
    return dataclasses.replace(split, name=name)
