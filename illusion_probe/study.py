"""The configuration of a whole study, composed from TOML: a shipped preset, a user's file, ``--set`` edits.

A study config has one table per stage: ``[task]`` (``kind`` plus the task's own config),
``[model]`` (:class:`~illusion_probe.models.ModelConfig`), ``[train]``
(:class:`~illusion_probe.training.TrainConfig`), ``[proxies]`` (what is simplified, and at which
sizes), ``[evaluation]`` and ``[projection]``. Shipped presets live in
``illusion_probe/presets/<task>_<name>.toml`` and nowhere else. Everything is checked when the
config is built, before any work: types, ranges, unknown keys and tables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from illusion_probe.config import apply_overrides, check_types, from_table, preset_tables, read_toml
from illusion_probe.errors import IllusionProbeError, require
from illusion_probe.models import ModelConfig
from illusion_probe.registry import TASKS
from illusion_probe.tasks.base import Task
from illusion_probe.training import TrainConfig

SECTIONS = ("task", "model", "train", "proxies", "evaluation", "projection")
ABLATIONS = ("mean", "zero")


def _sizes(name: str, sizes: tuple[int, ...]) -> None:
    require(len(sizes) > 0 and all(s >= 1 for s in sizes) and len(set(sizes)) == len(sizes),
            f"{name} must be distinct positive integers, got {list(sizes)}")


@dataclass(frozen=True)
class ProxyConfig:
    """What the study simplifies and fits, in each analysed layer.

    Attributes:
        layers: analysed layers (negative counts from the end; ``(-1,)`` is the last layer only).
        n_fit_sequences: train sequences the simplifiers are fit on (the paper uses about 1,000).
        kq_pca_sizes: PCA ranks for the layer's keys and queries (per head).
        resid_pca_sizes: PCA ranks for the residual stream entering the layer.
        kmeans_sizes: cluster counts for k-means on the keys and queries (per head).
        sae_sizes: dictionary widths ``d_sae`` of TopK SAEs on the residual stream entering the layer
            (empty: none).
        transcoder_sizes: widths of TopK transcoders replacing the layer's MLP output (empty: none).
        dictionary_k: latents kept per token by those SAEs and transcoders.
        dictionary_epochs: epochs each SAE and transcoder trains over its fit sample.
    """

    layers: tuple[int, ...] = (-1,)
    n_fit_sequences: int = 1000
    kq_pca_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    resid_pca_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    kmeans_sizes: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    sae_sizes: tuple[int, ...] = ()
    transcoder_sizes: tuple[int, ...] = ()
    dictionary_k: int = 4
    dictionary_epochs: int = 20

    def __post_init__(self) -> None:
        check_types(self)
        require(len(self.layers) > 0, "proxies.layers is empty; list at least one layer, e.g. [-1]")
        require(self.n_fit_sequences >= 1, f"proxies.n_fit_sequences must be >= 1, got {self.n_fit_sequences}")
        for name in ("kq_pca_sizes", "resid_pca_sizes", "kmeans_sizes"):
            _sizes(f"proxies.{name}", getattr(self, name))
        for name in ("sae_sizes", "transcoder_sizes"):
            if getattr(self, name):
                _sizes(f"proxies.{name}", getattr(self, name))
        require(self.dictionary_k >= 1, f"proxies.dictionary_k must be >= 1, got {self.dictionary_k}")
        narrowest = min((*self.sae_sizes, *self.transcoder_sizes), default=self.dictionary_k)
        require(self.dictionary_k <= narrowest, f"proxies.dictionary_k={self.dictionary_k} exceeds the narrowest "
                f"dictionary (d_sae={narrowest}); keep at most d_sae latents")
        require(self.dictionary_epochs >= 1, f"proxies.dictionary_epochs must be >= 1, got {self.dictionary_epochs}")


@dataclass(frozen=True)
class EvaluationConfig:
    """How proxies are evaluated.

    Attributes:
        max_sequences: cap on sequences evaluated per split.
        n_boot: bootstrap resamples for the 95% intervals (0: no intervals).
        batch_size: sequences per evaluation forward pass at most.
        batch_tokens: positions per evaluation forward pass at most (long sequences come in smaller batches).
        ablation: baseline of the CE score: ``mean`` or ``zero``.
        difficulty_bins: confidence bins of the difficulty-matched metrics (0: none); see
            :mod:`illusion_probe.difficulty`.
    """

    max_sequences: int = 2000
    n_boot: int = 1000
    batch_size: int = 128
    batch_tokens: int = 4096
    ablation: str = "mean"
    difficulty_bins: int = 5

    def __post_init__(self) -> None:
        check_types(self)
        require(self.max_sequences >= 1, f"evaluation.max_sequences must be >= 1, got {self.max_sequences}")
        require(self.n_boot >= 0, f"evaluation.n_boot must be >= 0, got {self.n_boot}")
        require(self.batch_size >= 1, f"evaluation.batch_size must be >= 1, got {self.batch_size}")
        require(self.batch_tokens >= 1, f"evaluation.batch_tokens must be >= 1, got {self.batch_tokens}")
        require(self.ablation in ABLATIONS, f"evaluation.ablation must be one of {ABLATIONS}, got {self.ablation!r}")
        require(self.difficulty_bins >= 0, f"evaluation.difficulty_bins must be >= 0, got {self.difficulty_bins}")


@dataclass(frozen=True)
class ProjectionConfig:
    """The key/query projection figure.

    Attributes:
        head: head whose keys and queries are shown (in the last analysed layer).
        points: points per split and kind.
    """

    head: int = 0
    points: int = 600

    def __post_init__(self) -> None:
        check_types(self)
        require(self.head >= 0, f"projection.head must be >= 0, got {self.head}")
        require(self.points >= 1, f"projection.points must be >= 1, got {self.points}")


@dataclass(frozen=True)
class StudyConfig:
    """Everything one study needs, one typed config per stage.

    Attributes:
        name: where the config came from (``preset dyck/quick``, a file), for reports.
        task_kind: the registered task (``dyck``, ``code``).
        task: that task's config (``DyckConfig``, ``CodeConfig``).
    """

    name: str
    task_kind: str
    task: Any
    model: ModelConfig
    train: TrainConfig
    proxies: ProxyConfig
    evaluation: EvaluationConfig
    projection: ProjectionConfig

    def build_task(self) -> Task:
        """The task this study runs."""
        return TASKS.get(self.task_kind)(self.task)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (the same tables a TOML file holds)."""
        return {"name": self.name, "task": {"kind": self.task_kind, **dataclasses.asdict(self.task)},
                **{section: dataclasses.asdict(getattr(self, section)) for section in SECTIONS[1:]}}

    def check_against_model(self, d_model: int, d_head: int, n_layers: int, n_heads: int) -> None:
        """Cross-field checks that need only the model's shape: layers, head, ranks against dimensions."""
        for layer in self.proxies.layers:
            require(-n_layers <= layer < n_layers, f"proxies.layers has {layer}, outside a {n_layers}-layer model")
        require(self.projection.head < n_heads, f"projection.head={self.projection.head} but the model has {n_heads} heads")
        require(max(self.proxies.kq_pca_sizes) <= d_head, f"proxies.kq_pca_sizes has rank {max(self.proxies.kq_pca_sizes)}"
                f" above the keys' and queries' dimension d_head={d_head}")
        require(max(self.proxies.resid_pca_sizes) <= d_model, "proxies.resid_pca_sizes has rank "
                f"{max(self.proxies.resid_pca_sizes)} above the residual stream's dimension d_model={d_model}")
        require(not (self.model.attn_only and self.proxies.transcoder_sizes), "proxies.transcoder_sizes asks for "
                "transcoders, but model.attn_only = true leaves no MLP to replace; set proxies.transcoder_sizes = []")

    def check_against_data(self, n_fit_tokens: int) -> None:
        """Cross-field checks that need the drawn train split: clusters against the tokens they are fitted on."""
        require(max(self.proxies.kmeans_sizes) <= n_fit_tokens, f"proxies.kmeans_sizes has "
                f"{max(self.proxies.kmeans_sizes)} clusters, but the first {self.proxies.n_fit_sequences} train "
                f"sequences hold {n_fit_tokens} tokens to fit them on; use fewer clusters or more n_fit_sequences")


def study_from_tables(tables: Mapping[str, Any], name: str, kind: str | None = None) -> StudyConfig:
    """A :class:`StudyConfig` from TOML tables; unknown tables and keys, and a task of another kind, are errors."""
    unknown = [key for key in tables if key not in SECTIONS]
    require(not unknown, f"{name}: unknown table(s) {unknown}; tables are {', '.join(SECTIONS)}")
    task_table = dict(tables.get("task", {}))
    found = task_table.pop("kind", None)
    require(found is not None, f"{name}: [task] needs kind = one of {', '.join(TASKS.names())}")
    require(kind is None or found == kind, f"{name}: [task] kind is {found!r} but the command runs {kind!r}; "
            "use a config for that task")
    task_class = TASKS.get(found)
    return StudyConfig(
        name=name,
        task_kind=found,
        task=from_table(task_class.config_class, task_table, f"{name} [task]"),
        model=from_table(ModelConfig, tables.get("model", {}), f"{name} [model]"),
        train=from_table(TrainConfig, tables.get("train", {}), f"{name} [train]"),
        proxies=from_table(ProxyConfig, tables.get("proxies", {}), f"{name} [proxies]"),
        evaluation=from_table(EvaluationConfig, tables.get("evaluation", {}), f"{name} [evaluation]"),
        projection=from_table(ProjectionConfig, tables.get("projection", {}), f"{name} [projection]"),
    )


def load_study(kind: str, preset: str = "quick", config: str | Path | None = None,
               overrides: Sequence[str] = ()) -> StudyConfig:
    """The study for task ``kind``: the shipped ``preset``, then a user's TOML file, then ``section.key=value`` edits.

    A user's file may hold any subset of the tables; each key it gives replaces the preset's.
    """
    TASKS.get(kind)
    tables = {section: dict(table) for section, table in preset_tables(kind, preset).items()}
    name = f"preset {kind}/{preset}"
    if config is not None:
        for section, table in read_toml(config).items():
            if not isinstance(table, Mapping):
                raise IllusionProbeError(f"config file {config}: {section!r} must be a table ([{section}]), "
                                         f"not a value")
            tables.setdefault(section, {}).update(table)
        name += f" + {config}"
    if overrides:
        tables = apply_overrides(tables, overrides, SECTIONS)
        name += " + --set " + " ".join(overrides)
    return study_from_tables(tables, name, kind)
