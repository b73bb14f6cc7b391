"""Tidy evaluation results: one record per (split, proxy, category, hook, metric), immutable once built.

Plain data only (no torch), so reports can be rebuilt from a saved file.
``to_json`` / ``from_json`` use a versioned schema; ``to_csv`` writes the
records table. Each metric's description (title, direction) travels with the
results, so a report knows how to read a metric it has never heard of.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from illusion_probe.artifacts import atomic_write_text, read_json, write_json
from illusion_probe.errors import ArtifactError, IllusionProbeError

SCHEMA = "illusion-probe/results"
SCHEMA_VERSION = 3
AGREEMENT_TARGET = 0.99

#: The category of difficulty-matched records (:mod:`illusion_probe.difficulty`).
MATCHED = "difficulty_matched"
#: The gap ``metric`` of ``(1 - agreement(ood)) / (1 - agreement(id))``: how many times more often the proxy
#: disagrees with the model out of distribution (NaN where the in-distribution agreement is 1).
DISAGREEMENT_RATIO = "disagreement_ratio"

@dataclass(frozen=True)
class Record:
    """One metric value with its 95% bootstrap interval.

    Attributes:
        split: split name (``test``, ``ood_deeper``, ...).
        role: the split's role: ``train``, ``id`` or ``ood``.
        proxy: proxy name (e.g. ``pca(4)@blocks.1.attn.hook_k+hook_q``).
        method: simplifier family (``pca``, ``kmeans``, ``onehot_attention``, ...).
        size: rank or cluster count, ``None`` for size-free methods.
        category: position category (``all`` or a task's category label).
        metric: metric name (``agreement``, ``kl``, ...).
        value: point estimate (NaN where undefined).
        ci_low, ci_high: bootstrap interval (NaN when not computed).
        n_positions: scored positions (or real tokens, for hook metrics) behind the value.
        n_sequences: sequences behind the value.
        hook: hook a hook metric refers to (``explained_variance``, ``attn_agreement``), else empty.
        hooks: every hook the proxy simplifies, joined by ``+``.
    """

    split: str
    role: str
    proxy: str
    method: str
    size: int | None
    category: str
    metric: str
    value: float
    ci_low: float
    ci_high: float
    n_positions: int
    n_sequences: int
    hook: str = ""
    hooks: str = ""


@dataclass(frozen=True)
class Gap:
    """metric(id_split) - metric(ood_split) for one proxy (and hook, for hook metrics), with a bootstrap interval
    and a two-sided bootstrap p-value for "no gap" (``p_value``, uncorrected; see ``stats.bootstrap_p_value``)."""

    proxy: str
    method: str
    size: int | None
    category: str
    metric: str
    id_split: str
    ood_split: str
    value: float
    ci_low: float
    ci_high: float
    hook: str = ""
    p_value: float = float("nan")


@dataclass(frozen=True)
class MetricInfo:
    """How to read a metric: its title, whether higher is more faithful (``None``: not a faithfulness
    measure), and whether it is scored at positions (``"positions"``) or at hooks (``"hooks"``)."""

    name: str
    title: str
    higher_is_better: bool | None
    scope: str


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _restore(value: Any) -> float:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise TypeError(f"expected a number or null, got {value!r}")
    return float("nan") if value is None else float(value)


_TYPES = {"str": str, "int": int, "int | None": (int, type(None)), "float": float}


def _row(cls: type, data: Any) -> Any:
    """A frozen record of ``cls`` from a JSON object, checking every field's type."""
    if not isinstance(data, dict):
        raise TypeError(f"expected an object, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise TypeError(f"unknown field(s) {sorted(unknown)}")
    values = {}
    for name, value in data.items():
        kind = known[name].type
        if kind == "float":
            values[name] = _restore(value)
        elif kind in _TYPES and (not isinstance(value, _TYPES[kind]) or isinstance(value, bool)):
            raise TypeError(f"field {name!r} should be {kind}, got {value!r}")
        else:
            values[name] = value
    return cls(**values)


@dataclass(frozen=True)
class Results:
    """Records, gaps, metric descriptions and run metadata from one evaluation. Immutable: derive new ones
    with :meth:`with_meta`.

    ``control_records`` hold what the controls evaluated (refitted proxies, random baselines and the held-out
    halves of the OOD splits; see :mod:`illusion_probe.controls`), apart from ``records`` so that tables and
    figures of the proxies themselves never mix them in; the controls' conclusions are gaps (their categories
    are listed in ``illusion_probe.controls``).
    """

    records: tuple[Record, ...] = ()
    gaps: tuple[Gap, ...] = ()
    metrics: tuple[MetricInfo, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)
    control_records: tuple[Record, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "records", tuple(self.records))
        object.__setattr__(self, "gaps", tuple(self.gaps))
        object.__setattr__(self, "metrics", tuple(self.metrics))
        object.__setattr__(self, "control_records", tuple(self.control_records))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))  # read-only: derive with with_meta
        object.__setattr__(self, "_positions", {})  # field -> value -> record indices, built by select on demand

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return (f"<Results: {len(self.records)} records, {len(self.gaps)} gaps; splits {', '.join(self.splits)}; "
                f"{len(self.proxies)} proxies; metrics {', '.join(self.metric_names)}>")

    def with_meta(self, **entries: Any) -> Results:
        """A copy whose metadata also holds ``entries``."""
        return dataclasses.replace(self, meta={**self.meta, **entries})

    def select(self, **criteria: Any) -> list[Record]:
        """Records whose fields equal every given criterion, e.g. ``select(metric="kl", split="test")``."""
        names = {f.name for f in fields(Record)}
        unknown = set(criteria) - names
        if unknown:
            raise IllusionProbeError(f"Results.select: unknown field(s) {sorted(unknown)}; fields are {sorted(names)}")
        if not criteria:
            return list(self.records)
        try:
            narrowest = min((self._index(name).get(value, ()) for name, value in criteria.items()), key=len)
        except TypeError:  # an unhashable criterion
            raise IllusionProbeError(f"Results.select: every criterion must be one value (a str, number or None), "
                                     f"got {criteria}") from None
        found = (self.records[i] for i in narrowest)
        return [r for r in found if all(getattr(r, k) == v for k, v in criteria.items())]

    def _index(self, name: str) -> dict[Any, list[int]]:
        """Indices of the records holding each value of field ``name`` (a report selects thousands of times)."""
        positions: dict[str, dict[Any, list[int]]] = self._positions  # type: ignore[attr-defined]
        if name not in positions:
            index: dict[Any, list[int]] = {}
            for i, record in enumerate(self.records):
                index.setdefault(getattr(record, name), []).append(i)
            positions[name] = index
        return positions[name]

    @property
    def splits(self) -> list[str]:
        """Split names in first-seen order."""
        return list(dict.fromkeys(r.split for r in self.records))

    @property
    def proxies(self) -> list[str]:
        """Proxy names in first-seen order."""
        return list(dict.fromkeys(r.proxy for r in self.records))

    @property
    def metric_names(self) -> list[str]:
        """Metric names: described ones first, then any other found in the records."""
        return list(dict.fromkeys([m.name for m in self.metrics] + [r.metric for r in self.records]))

    def metric_info(self, name: str) -> MetricInfo:
        """The description of metric ``name`` (a plain one when the results carry none)."""
        for info in self.metrics:
            if info.name == name:
                return info
        return MetricInfo(name, name, None, "positions")

    def value(self, split: str, proxy: str, metric: str, category: str = "all") -> float:
        """The point estimate for one cell."""
        found = self.select(split=split, proxy=proxy, metric=metric, category=category)
        if not found:
            raise IllusionProbeError(f"no {metric!r} result for proxy {proxy!r} on split {split!r} ({category})")
        return found[0].value

    def gap(self, metric: str, id_split: str = "test", ood_split: str | None = None,
            category: str = "all") -> list[Gap]:
        """Generalization gaps ``metric(id_split) - metric(ood_split)``, one per proxy (every OOD split if None)."""
        found = [g for g in self.gaps if g.metric == metric and g.id_split == id_split and g.category == category
                 and (ood_split is None or g.ood_split == ood_split)]
        if not found:
            raise IllusionProbeError(
                f"no {metric!r} gap between {id_split!r} and {ood_split or 'any OOD split'!r}; "
                f"evaluated splits: {', '.join(self.splits)}"
            )
        return found

    def headline(self, target: float = AGREEMENT_TARGET, id_split: str = "test",
                 select_on: str | None = None) -> list[dict[str, Any]]:
        """Per swept family (method and hooks): the smallest size reaching ``target`` agreement on the
        selection split, with every position metric of that proxy on every split (``values[metric][split]``).

        The selection split is ``select_on``, by default the first split with role ``val`` if there is one
        and ``id_split`` otherwise: choosing on ``id_split`` selects on the very number the gaps start from.
        Each row says where it was chosen (``selected_on``); ``id_agreement`` is its agreement on ``id_split``.
        A family that never reaches the target reports its best size with ``reached=False``.
        """
        selection = select_on or next(iter(self.splits_with_role("val")), id_split)
        rows = []
        chosen_from = [r for r in self.select(metric="agreement", split=selection, category="all") if r.size is not None]
        for method, hooks in dict.fromkeys((r.method, r.hooks) for r in chosen_from):
            family = sorted((r for r in chosen_from if (r.method, r.hooks) == (method, hooks)), key=lambda r: r.size)
            reaching = [r for r in family if r.value >= target]
            chosen = reaching[0] if reaching else max(family, key=lambda r: r.value)
            values: dict[str, dict[str, float]] = {}
            for r in self.select(proxy=chosen.proxy, category="all", hook=""):
                values.setdefault(r.metric, {})[r.split] = r.value
            rows.append({"method": method, "hooks": hooks, "proxy": chosen.proxy, "size": chosen.size,
                         "reached": bool(reaching), "selected_on": selection, "selection_agreement": chosen.value,
                         "id_agreement": values["agreement"].get(id_split, float("nan")),
                         "ood_agreement": {s: v for s, v in values["agreement"].items()
                                           if s in self.splits_with_role("ood")},
                         "values": values})
        return rows

    def splits_with_role(self, role: str) -> list[str]:
        """Split names whose role is ``role``, in first-seen order."""
        return list(dict.fromkeys(r.split for r in self.records if r.role == role))

    # -- files -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The versioned JSON document (NaN stored as null)."""
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "records": [{k: _clean(v) for k, v in asdict(r).items()} for r in self.records],
            "gaps": [{k: _clean(v) for k, v in asdict(g).items()} for g in self.gaps],
            "metrics": [asdict(m) for m in self.metrics],
            "meta": dict(self.meta),
            "control_records": [{k: _clean(v) for k, v in asdict(r).items()} for r in self.control_records],
        }

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the JSON document atomically; returns the path."""
        _require_records(self.records)
        write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def from_dict(cls, data: Any, source: str = "results") -> Results:
        """Inverse of :meth:`to_dict`; refuses other schemas, versions and malformed entries in one line."""
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ArtifactError(f"{source}: not an illusion-probe results file (schema {found!r})")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ArtifactError(
                f"{source}: results schema version {data.get('schema_version')!r} is not supported "
                f"(this illusion-probe reads {SCHEMA_VERSION}); re-run the evaluation with this version"
            )
        parts: dict[str, list[Any]] = {}
        for key, kind in (("records", Record), ("gaps", Gap), ("metrics", MetricInfo), ("control_records", Record)):
            entries = data.get(key, [])
            if not isinstance(entries, list):
                raise ArtifactError(f"{source}: {key!r} should be a list, got {type(entries).__name__}")
            try:
                parts[key] = [_row(kind, entry) for entry in entries]
            except TypeError as err:
                raise ArtifactError(f"{source}: malformed entry in {key!r} ({err})") from None
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise ArtifactError(f"{source}: 'meta' should be an object, got {type(meta).__name__}")
        if not parts["records"]:
            raise ArtifactError(f"{source}: the results set is empty; nothing to report")
        return cls(records=parts["records"], gaps=parts["gaps"], metrics=parts["metrics"], meta=meta,
                   control_records=parts["control_records"])

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Results:
        """Load results written by :meth:`to_json`."""
        return cls.from_dict(read_json(path), source=str(path))

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        """The records as CSV text; also written atomically to ``path`` when given."""
        _require_records(self.records)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=[f.name for f in fields(Record)], lineterminator="\n")
        writer.writeheader()
        writer.writerows(asdict(r) for r in self.records)
        if path is not None:
            atomic_write_text(path, buffer.getvalue())
        return buffer.getvalue()


def _require_records(records: Iterable[Record]) -> None:
    if not records:
        raise IllusionProbeError("refusing to write an empty results set; evaluate at least one split and proxy")
