"""Any model in: a checkpoint of ours, a local Hugging Face model directory, or a hub name.

A local directory written by ``save_pretrained`` is wrapped with ``TransformerBridge.boot_transformers``
(TransformerLens 3.4+ and 4.x), offline. A hub name is fetched by ``TransformerBridge.boot_transformers``
on TransformerLens 4.x and ``HookedTransformer.from_pretrained`` on 3.x; without network (or with
``HF_HUB_OFFLINE=1``) that is a one-line error naming the fix: save the model locally and pass the folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from illusion_probe.artifacts import METADATA_FILE, read_json
from illusion_probe.backends import transformer_lens_major
from illusion_probe.checkpoint import load_checkpoint
from illusion_probe.errors import IllusionProbeError
from illusion_probe.models import resolve_device


def load_model(source: str | os.PathLike, device: str = "auto") -> torch.nn.Module:
    """A hooked model from ``source``: a checkpoint of ours, a local Hugging Face directory, or a hub name.

    Args:
        source: a directory written by :func:`~illusion_probe.save_checkpoint` or by ``save_pretrained``
            (a tokenizer saved beside the weights is loaded with them), or a Hugging Face hub name.
        device: ``auto``, ``cpu`` or ``cuda``.
    """
    device = resolve_device(device)
    path = Path(source)
    if path.is_dir():
        if (path / METADATA_FILE).is_file() and read_json(path / METADATA_FILE).get("kind") == "checkpoint":
            model, _ = load_checkpoint(path, device=device)
            return model
        if not (path / "config.json").is_file():
            raise IllusionProbeError(f"{path} is neither an illusion-probe checkpoint nor a Hugging Face model "
                                     "directory (no config.json); give a folder written by save_pretrained")
        from transformer_lens.model_bridge import TransformerBridge

        return TransformerBridge.boot_transformers(str(path), device=device).eval()
    if path.exists() or str(source).startswith((".", "/", "~")):  # a path, not a hub name ("org/model")
        raise IllusionProbeError(f"model {source}: no such directory; give a checkpoint or a save_pretrained folder")
    return _from_hub(str(source), device)


def _from_hub(name: str, device: str) -> torch.nn.Module:
    fix = "save it with save_pretrained on a machine with network and pass that folder"
    if os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0"):
        raise IllusionProbeError(f"model {name!r} is a hub name, but HF_HUB_OFFLINE is set, so nothing is downloaded; "
                                 f"{fix}")
    try:
        if transformer_lens_major() >= 4:
            from transformer_lens.model_bridge import TransformerBridge

            return TransformerBridge.boot_transformers(name, device=device).eval()
        from transformer_lens import HookedTransformer

        return HookedTransformer.from_pretrained(name, device=device).eval()
    except OSError as err:  # what huggingface_hub raises offline or for an unknown repository
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise IllusionProbeError(f"cannot load hub model {name!r} ({first}); {fix}") from None
