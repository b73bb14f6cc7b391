"""illusion-probe: does a simplified explanation of a model still hold off the training distribution?

Public API re-exports only. Names load lazily on first access, so
``import illusion_probe`` imports neither torch nor TransformerLens nor plotly,
and has no side effects. Type checkers and editors see the real imports below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # errors
    "IllusionProbeError": "illusion_probe.errors",
    "ArtifactError": "illusion_probe.errors",
    "IllusionProbeWarning": "illusion_probe.errors",
    # registries
    "register_simplifier": "illusion_probe.registry",
    "register_task": "illusion_probe.registry",
    "register_metric": "illusion_probe.registry",
    # tasks
    "Split": "illusion_probe.tasks.base",
    "SplitSet": "illusion_probe.tasks.base",
    "Task": "illusion_probe.tasks.base",
    "DyckConfig": "illusion_probe.tasks.dyck",
    "DyckTask": "illusion_probe.tasks.dyck",
    "CodeConfig": "illusion_probe.tasks.code",
    "CodeTask": "illusion_probe.tasks.code",
    # models, training, checkpoints
    "ModelConfig": "illusion_probe.models",
    "ModelSizes": "illusion_probe.models",
    "build_model": "illusion_probe.models",
    "available_backends": "illusion_probe.models",
    "resolve_hook_name": "illusion_probe.hook_names",
    "TrainConfig": "illusion_probe.training",
    "train": "illusion_probe.training",
    "save_checkpoint": "illusion_probe.checkpoint",
    "load_checkpoint": "illusion_probe.checkpoint",
    # simplifiers and proxies
    "Simplifier": "illusion_probe.simplify.base",
    "FittedSimplifier": "illusion_probe.simplify.base",
    "Reservoir": "illusion_probe.simplify.reservoir",
    "SampledSimplifier": "illusion_probe.simplify.reservoir",
    "PCA": "illusion_probe.simplify.pca",
    "SVD": "illusion_probe.simplify.pca",
    "KMeans": "illusion_probe.simplify.kmeans",
    "OneHotAttention": "illusion_probe.simplify.attention",
    "ZeroAblation": "illusion_probe.simplify.ablation",
    "MeanAblation": "illusion_probe.simplify.ablation",
    "collect_activations": "illusion_probe.simplify.collect",
    "Proxy": "illusion_probe.simplify.proxy",
    "SAE": "illusion_probe.simplify.sae",
    "Transcoder": "illusion_probe.simplify.transcoder",
    "ExternalSAE": "illusion_probe.simplify.external",
    "RandomSubspace": "illusion_probe.simplify.random_baselines",
    "RandomCentroids": "illusion_probe.simplify.random_baselines",
    "SparseDictionary": "illusion_probe.simplify.dictionary",
    "fit_proxy": "illusion_probe.simplify.fitting",
    "fit_proxies": "illusion_probe.simplify.fitting",
    # evaluation and report
    "Metric": "illusion_probe.metrics",
    "PositionMean": "illusion_probe.metrics",
    "HookMetric": "illusion_probe.metrics",
    "Scored": "illusion_probe.metrics",
    "evaluate": "illusion_probe.evaluation",
    "sweep": "illusion_probe.sweeps",
    "Results": "illusion_probe.results",
    "write_report": "illusion_probe.report.html",
    # the study
    "StudyConfig": "illusion_probe.study",
    "load_study": "illusion_probe.study",
    "reproduce": "illusion_probe.pipeline",
    "load_model": "illusion_probe.loading",
    "audit": "illusion_probe.auditing",
    "AuditConfig": "illusion_probe.auditing",
}

#: Submodules reachable as attributes (``ip.models``, ``ip.metrics``, ...).
_SUBMODULES = ("analysis", "auditing", "backends", "checkpoint", "cli", "config", "controls", "difficulty", "distributed",
               "errors", "evaluation", "hook_names", "loading", "metrics", "models", "pipeline", "registry", "report",
               "results", "simplify", "stats", "study", "sweeps", "tasks", "training")

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"illusion_probe.{name}")
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'illusion_probe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, *_SUBMODULES])


if TYPE_CHECKING:
    from illusion_probe.auditing import AuditConfig, audit
    from illusion_probe.checkpoint import load_checkpoint, save_checkpoint
    from illusion_probe.errors import ArtifactError, IllusionProbeError, IllusionProbeWarning
    from illusion_probe.evaluation import evaluate
    from illusion_probe.hook_names import resolve_hook_name
    from illusion_probe.loading import load_model
    from illusion_probe.metrics import HookMetric, Metric, PositionMean, Scored
    from illusion_probe.models import ModelConfig, ModelSizes, available_backends, build_model
    from illusion_probe.pipeline import reproduce
    from illusion_probe.registry import register_metric, register_simplifier, register_task
    from illusion_probe.report.html import write_report
    from illusion_probe.results import Results
    from illusion_probe.simplify.ablation import MeanAblation, ZeroAblation
    from illusion_probe.simplify.attention import OneHotAttention
    from illusion_probe.simplify.base import FittedSimplifier, Simplifier
    from illusion_probe.simplify.collect import collect_activations
    from illusion_probe.simplify.dictionary import SparseDictionary
    from illusion_probe.simplify.external import ExternalSAE
    from illusion_probe.simplify.fitting import fit_proxies, fit_proxy
    from illusion_probe.simplify.kmeans import KMeans
    from illusion_probe.simplify.pca import PCA, SVD
    from illusion_probe.simplify.proxy import Proxy
    from illusion_probe.simplify.random_baselines import RandomCentroids, RandomSubspace
    from illusion_probe.simplify.reservoir import Reservoir, SampledSimplifier
    from illusion_probe.simplify.sae import SAE
    from illusion_probe.simplify.transcoder import Transcoder
    from illusion_probe.study import StudyConfig, load_study
    from illusion_probe.sweeps import sweep
    from illusion_probe.tasks.base import Split, SplitSet, Task
    from illusion_probe.tasks.code import CodeConfig, CodeTask
    from illusion_probe.tasks.dyck import DyckConfig, DyckTask
    from illusion_probe.training import TrainConfig, train
