"""Model checkpoints: safetensors weights plus JSON metadata, written atomically.

A checkpoint is a directory::

    path/
      model.safetensors   the model's state dict
      metadata.json       format version, model config, sizes, task, backend, versions

Loading rebuilds the model with :func:`~illusion_probe.models.build_model` on
the recorded backend and loads the weights strictly. Nothing is unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from illusion_probe.artifacts import (
    METADATA_FILE,
    atomic_directory,
    check_format,
    field,
    read_json,
    read_tensors,
    write_json,
    write_tensors,
)
from illusion_probe.backends import Backend
from illusion_probe.errors import ArtifactError, IllusionProbeError
from illusion_probe.models import ModelConfig, ModelSizes, available_backends, build_model
from illusion_probe.provenance import provenance
from illusion_probe.tasks import Task, task_from_dict

WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def _model_config(model: torch.nn.Module) -> ModelConfig:
    recorded = getattr(model, "illusion_probe_config", None)
    if isinstance(recorded, ModelConfig):
        return recorded
    raise IllusionProbeError(
        f"{type(model).__name__} was not built by illusion_probe.build_model; "
        "save_checkpoint needs its ModelConfig to rebuild it"
    )


def save_checkpoint(
    path: str | os.PathLike, model: torch.nn.Module, task: Task | None = None, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` (built by :func:`build_model`), its task and ``extra`` JSON to directory ``path``.

    Returns the checkpoint directory. An existing checkpoint at ``path`` is replaced atomically.
    """
    cfg = _model_config(model)
    metadata = {
        "kind": "checkpoint",
        "format_version": FORMAT_VERSION,
        "model_config": cfg.to_dict(),
        "sizes": {"d_vocab": int(model.cfg.d_vocab), "n_ctx": int(model.cfg.n_ctx)},
        "backend": Backend.of(model).kind,
        "task": task.to_dict() if task is not None else None,
        "extra": extra or {},
        **provenance(),
    }
    with atomic_directory(path) as staging:
        write_tensors(staging / WEIGHTS_FILE, model.state_dict())
        write_json(staging / METADATA_FILE, metadata)
    return Path(path)


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The validated metadata of the checkpoint at ``path``."""
    directory = Path(path)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no checkpoint directory here")
    file = directory / METADATA_FILE
    metadata = read_json(file)
    check_format(metadata, file, "checkpoint", FORMAT_VERSION)
    return metadata


def load_checkpoint(path: str | os.PathLike, device: str | None = None) -> tuple[torch.nn.Module, Task | None]:
    """Rebuild the model and task saved at ``path``.

    Args:
        path: checkpoint directory written by :func:`save_checkpoint`.
        device: where to put the model; defaults to the device it was saved from (``cpu`` if absent).

    Returns:
        ``(model, task)``; ``task`` is ``None`` if none was saved.
    """
    directory = Path(path)
    metadata = read_checkpoint_metadata(directory)
    file = directory / METADATA_FILE
    cfg = field(metadata, "model_config", file, ModelConfig.from_dict)
    sizes = field(metadata, "sizes", file, lambda s: ModelSizes(int(s["d_vocab"]), int(s["n_ctx"])))
    backend = field(metadata, "backend", file, str)
    if backend not in available_backends():
        raise ArtifactError(
            f"{file}: saved with backend {backend!r}, which this TransformerLens cannot build "
            f"(available: {', '.join(available_backends())}); load it where transformer-lens<4 is installed"
        )
    task_data = metadata.get("task")
    task = field(metadata, "task", file, task_from_dict) if task_data else None
    if device is not None:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "device": device})
    weights = read_tensors(directory / WEIGHTS_FILE, device="cpu")
    model = build_model(sizes, cfg, backend=backend)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ArtifactError(f"{directory / WEIGHTS_FILE}: weights do not match the recorded model config ({first})") from None
    model.eval()
    return model, task
