"""illusion-probe: does a simplified explanation of a model still hold off the training distribution?

Public API re-exports only. Names load lazily on first access, so
``import illusion_probe`` imports neither torch nor TransformerLens nor plotly,
and has no side effects.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # errors
    "IllusionProbeError": "illusion_probe.errors",
    "ArtifactError": "illusion_probe.errors",
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
    "PCA": "illusion_probe.simplify.pca",
    "SVD": "illusion_probe.simplify.pca",
    "KMeans": "illusion_probe.simplify.kmeans",
    "OneHotAttention": "illusion_probe.simplify.attention",
    "ZeroAblation": "illusion_probe.simplify.ablation",
    "MeanAblation": "illusion_probe.simplify.ablation",
    "collect_activations": "illusion_probe.simplify.collect",
    "Proxy": "illusion_probe.simplify.proxy",
    "fit_proxy": "illusion_probe.simplify.proxy",
    # evaluation and report
    "evaluate": "illusion_probe.evaluation",
    "sweep": "illusion_probe.sweeps",
    "Results": "illusion_probe.results",
    "write_report": "illusion_probe.report.html",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'illusion_probe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

