"""Tidy evaluation results: one record per (split, proxy, category, hook, metric).

Plain data only (no torch), so reports can be rebuilt from a saved file.
``to_json`` / ``from_json`` use a versioned schema; ``to_csv`` writes the
records table.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from illusion_probe.artifacts import atomic_write_text, read_json, write_json
from illusion_probe.errors import ArtifactError, IllusionProbeError

SCHEMA = "illusion-probe/results"
SCHEMA_VERSION = 1
AGREEMENT_TARGET = 0.99


@dataclass(frozen=True)
class Record:
    """One metric value with its 95% bootstrap interval.

    Attributes:
        split: split name (``test``, ``ood_deeper``, ...).
        role: the split's role: ``train``, ``id`` or ``ood``.
        proxy: proxy name (e.g. ``pca@blocks.1.attn.hook_k+hook_q/r4``).
        method: simplifier family (``pca``, ``kmeans``, ``onehot_attention``, ...).
        size: rank or cluster count, ``None`` for size-free methods.
        category: position category (``all`` or a task's category label).
        metric: metric name (``agreement``, ``kl``, ...).
        value: point estimate.
        ci_low, ci_high: bootstrap interval (NaN when not computed).
        n_positions: scored positions behind the value.
        n_sequences: sequences behind the value.
        hook: hook the metric refers to (``explained_variance``, ``attn_agreement``), else empty.
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
    """metric(id_split) - metric(ood_split) for one proxy, with a bootstrap interval."""

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


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _restore(value: Any) -> float:
    return float("nan") if value is None else float(value)


@dataclass
class Results:
    """Records, gaps, run metadata and figure data from one evaluation."""

    records: list[Record] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def select(self, **criteria: Any) -> list[Record]:
        """Records whose fields equal every given criterion, e.g. ``select(metric="kl", split="test")``."""
        names = {f.name for f in fields(Record)}
        unknown = set(criteria) - names
        if unknown:
            raise IllusionProbeError(f"Results.select: unknown field(s) {sorted(unknown)}; fields are {sorted(names)}")
        return [r for r in self.records if all(getattr(r, k) == v for k, v in criteria.items())]

    @property
    def splits(self) -> list[str]:
        """Split names in first-seen order."""
        return list(dict.fromkeys(r.split for r in self.records))

    @property
    def proxies(self) -> list[str]:
        """Proxy names in first-seen order."""
        return list(dict.fromkeys(r.proxy for r in self.records))

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

    def headline(self, target: float = AGREEMENT_TARGET, id_split: str = "test") -> list[dict[str, Any]]:
        """Per swept family (method and hooks): the smallest size reaching ``target`` agreement on
        ``id_split``, its agreement there and on every OOD split. A family that never reaches the
        target reports its best size with ``reached=False``."""
        rows = []
        id_records = [r for r in self.select(metric="agreement", split=id_split, category="all") if r.size is not None]
        for method, hooks in dict.fromkeys((r.method, r.hooks) for r in id_records):
            family = sorted((r for r in id_records if (r.method, r.hooks) == (method, hooks)), key=lambda r: r.size)
            reaching = [r for r in family if r.value >= target]
            chosen = reaching[0] if reaching else max(family, key=lambda r: r.value)
            ood = {r.split: r.value for r in self.select(metric="agreement", proxy=chosen.proxy, category="all")
                   if r.role == "ood"}
            rows.append({"method": method, "hooks": hooks, "proxy": chosen.proxy, "size": chosen.size,
                         "reached": bool(reaching), "id_agreement": chosen.value, "ood_agreement": ood})
        return rows

    def to_dict(self) -> dict[str, Any]:
        """The versioned JSON document (NaN stored as null)."""
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "records": [{k: _clean(v) for k, v in asdict(r).items()} for r in self.records],
            "gaps": [{k: _clean(v) for k, v in asdict(g).items()} for g in self.gaps],
            "meta": self.meta,
            "extras": self.extras,
        }

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the JSON document atomically; returns the path."""
        if not self.records:
            raise IllusionProbeError("refusing to write an empty results set; evaluate at least one split and proxy")
        write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "results") -> Results:
        """Inverse of :meth:`to_dict`; refuses other schemas and versions."""
        if data.get("schema") != SCHEMA:
            raise ArtifactError(f"{source}: not an illusion-probe results file (schema {data.get('schema')!r})")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ArtifactError(
                f"{source}: results schema version {data.get('schema_version')!r} is not supported "
                f"(this illusion-probe reads {SCHEMA_VERSION}); re-run the evaluation with this version"
            )
        floats = ("value", "ci_low", "ci_high")
        try:
            records = [Record(**{k: _restore(v) if k in floats else v for k, v in r.items()})
                       for r in data.get("records", [])]
            gaps = [Gap(**{k: _restore(v) if k in floats else v for k, v in g.items()}) for g in data.get("gaps", [])]
        except TypeError as err:
            raise ArtifactError(f"{source}: malformed record ({err})") from None
        if not records:
            raise ArtifactError(f"{source}: the results set is empty; nothing to report")
        return cls(records=records, gaps=gaps, meta=dict(data.get("meta", {})), extras=dict(data.get("extras", {})))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Results:
        """Load results written by :meth:`to_json`."""
        return cls.from_dict(read_json(path), source=str(path))

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        """The records as CSV text; also written atomically to ``path`` when given."""
        if not self.records:
            raise IllusionProbeError("refusing to write an empty results set; evaluate at least one split and proxy")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=[f.name for f in fields(Record)], lineterminator="\n")
        writer.writeheader()
        writer.writerows(asdict(r) for r in self.records)
        if path is not None:
            atomic_write_text(path, buffer.getvalue())
        return buffer.getvalue()
