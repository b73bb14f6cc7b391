"""Build small hooked transformers on whichever TransformerLens is installed.

TransformerLens 3.x offers ``HookedTransformer`` and, from 3.4, a native
``TransformerBridge``; 4.x has only the bridge. :func:`build_model` picks one
(``backend="auto"``) or the one asked for, derives ``d_vocab`` and ``n_ctx``
from the task, and initialises from ``cfg.seed`` without touching global RNGs.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from illusion_probe.backends import transformer_lens_major
from illusion_probe.config import check_types
from illusion_probe.distributed import local_cuda_device
from illusion_probe.errors import IllusionProbeError, require
from illusion_probe.provenance import package_version

Backend = Literal["hooked", "bridge"]
BACKENDS: tuple[str, ...] = ("auto", "hooked", "bridge")
ACT_FNS: tuple[str, ...] = ("relu", "gelu", "gelu_new", "silu")
NORMALIZATIONS: tuple[str | None, ...] = ("LN", "LNPre", "RMS", "RMSPre", None)
POSITIONAL_EMBEDDINGS: tuple[str, ...] = ("standard", "rotary")


@runtime_checkable
class HasSizes(Protocol):
    """Anything that knows the vocabulary size and context length (a task, or :class:`ModelSizes`)."""

    @property
    def d_vocab(self) -> int: ...

    @property
    def n_ctx(self) -> int: ...


@dataclass(frozen=True)
class ModelSizes:
    """Vocabulary size and context length, for building a model without a task."""

    d_vocab: int
    n_ctx: int


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a small transformer. ``d_vocab`` and ``n_ctx`` come from the task.

    Attributes:
        n_layers: number of transformer blocks.
        d_model: residual stream width.
        n_heads: attention heads per layer; must divide ``d_model``.
        d_head: width of each head; ``None`` means ``d_model // n_heads``.
        d_mlp: MLP hidden width; ``None`` means ``4 * d_model``. Ignored when ``attn_only``.
        act_fn: MLP activation, one of ``ACT_FNS``.
        normalization: ``"LN"``, ``"LNPre"``, ``"RMS"``, ``"RMSPre"`` or ``None``.
        positional_embedding_type: ``"standard"`` (learned absolute) or ``"rotary"`` (TransformerLens's names).
        attn_only: drop the MLPs.
        seed: initialisation seed (global RNGs are left untouched).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when available); training and
            evaluation run where the model is.
    """

    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_head: int | None = None
    d_mlp: int | None = None
    act_fn: str = "relu"
    normalization: str | None = "LN"
    positional_embedding_type: str = "standard"
    attn_only: bool = False
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("n_layers", "d_model", "n_heads"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name in ("d_head", "d_mlp"):
            value = getattr(self, name)
            require(value is None or (isinstance(value, int) and value > 0),
                    f"ModelConfig.{name} must be a positive integer or None, got {value!r}")
        require(self.d_model % self.n_heads == 0,
                f"ModelConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "pick n_heads that divides d_model")
        require(self.act_fn in ACT_FNS, f"ModelConfig.act_fn {self.act_fn!r} is unknown; choose one of {ACT_FNS}")
        require(self.normalization in NORMALIZATIONS,
                f"ModelConfig.normalization {self.normalization!r} is unknown; choose one of {NORMALIZATIONS}")
        require(self.positional_embedding_type in POSITIONAL_EMBEDDINGS,
                f"ModelConfig.positional_embedding_type {self.positional_embedding_type!r} is unknown; "
                f"choose one of {POSITIONAL_EMBEDDINGS}")
        require(self.device in ("auto", "cpu") or self.device.startswith("cuda"),
                f"ModelConfig.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")

    @property
    def resolved_d_head(self) -> int:
        """``d_head``, defaulting to ``d_model // n_heads``."""
        return self.d_head if self.d_head is not None else self.d_model // self.n_heads

    @property
    def resolved_d_mlp(self) -> int:
        """``d_mlp``, defaulting to ``4 * d_model``."""
        return self.d_mlp if self.d_mlp is not None else 4 * self.d_model

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        require(not unknown, f"ModelConfig: unknown field(s) {sorted(unknown)}")
        return cls(**data)


def available_backends() -> tuple[str, ...]:
    """Backends this environment can build: ``"hooked"`` needs TransformerLens < 4."""
    return ("hooked", "bridge") if transformer_lens_major() < 4 else ("bridge",)


def resolve_backend(backend: str) -> Backend:
    """Turn ``"auto"`` into a concrete backend and refuse ones this environment lacks."""
    require(backend in BACKENDS, f"unknown backend {backend!r}; choose one of {BACKENDS}")
    available = available_backends()
    if backend == "auto":
        return available[0]  # type: ignore[return-value]
    if backend not in available:
        raise IllusionProbeError(
            f"backend {backend!r} needs HookedTransformer, which TransformerLens "
            f"{package_version('transformer-lens')} removed; use backend='bridge' or install 'transformer-lens<4'"
        )
    return backend  # type: ignore[return-value]


def resolve_device(device: str) -> str:
    """``"auto"`` becomes ``cuda`` when available else ``cpu``; ``cuda`` without a GPU is an error. Under
    ``torchrun``, ``cuda`` is the process's own GPU, ``cuda:LOCAL_RANK``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise IllusionProbeError(f"device {device!r} asked for, but no CUDA GPU is available; use --device cpu")
    require(device == "cpu" or device.startswith("cuda"), f"unknown device {device!r}; use auto, cpu or cuda")
    return local_cuda_device() if device == "cuda" else device


def _sizes(task_or_sizes: HasSizes | dict[str, int]) -> ModelSizes:
    if isinstance(task_or_sizes, dict):
        task_or_sizes = ModelSizes(**task_or_sizes)
    try:
        sizes = ModelSizes(int(task_or_sizes.d_vocab), int(task_or_sizes.n_ctx))
    except AttributeError:
        raise IllusionProbeError(
            "build_model needs a task or ModelSizes(d_vocab=..., n_ctx=...), "
            f"got {type(task_or_sizes).__name__}"
        ) from None
    require(sizes.d_vocab > 0 and sizes.n_ctx > 0, f"d_vocab and n_ctx must be positive, got {sizes}")
    return sizes


def _tl_config_kwargs(sizes: ModelSizes, cfg: ModelConfig, device: str) -> dict[str, Any]:
    return dict(
        n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.resolved_d_head,
        d_mlp=None if cfg.attn_only else cfg.resolved_d_mlp, d_vocab=sizes.d_vocab, n_ctx=sizes.n_ctx,
        act_fn=cfg.act_fn, normalization_type=cfg.normalization,
        positional_embedding_type=cfg.positional_embedding_type, attn_only=cfg.attn_only, device=device,
    )


def build_model(
    task_or_sizes: HasSizes | dict[str, int], cfg: ModelConfig | None = None, backend: str = "auto"
) -> torch.nn.Module:
    """A freshly initialised hooked transformer sized for a task.

    Args:
        task_or_sizes: a task, or anything with ``d_vocab`` and ``n_ctx`` (e.g. :class:`ModelSizes`).
        cfg: architecture; defaults to ``ModelConfig()``.
        backend: ``"auto"`` (HookedTransformer on TransformerLens < 4, else the native bridge),
            ``"hooked"`` or ``"bridge"``.

    Returns:
        A ``HookedTransformer`` or ``TransformerBridge`` mapping ``[batch, pos]`` tokens
        to ``[batch, pos, d_vocab]`` logits.
    """
    cfg = cfg or ModelConfig()
    sizes = _sizes(task_or_sizes)
    chosen = resolve_backend(backend)
    device = resolve_device(cfg.device)
    kwargs = _tl_config_kwargs(sizes, cfg, device)
    if chosen == "hooked":
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        # HookedTransformerConfig(seed=...) would seed every global RNG; fork instead. TransformerLens 3.x
        # deprecates the class it still ships; "auto" chooses it there on purpose (DESIGN.md), so its
        # deprecation notice is not the user's to act on.
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
            torch.manual_seed(cfg.seed)
            model = HookedTransformer(HookedTransformerConfig(**kwargs, init_weights=True), move_to_device=True)
    else:
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge

        bridge_kwargs = {k: v for k, v in kwargs.items() if k != "device"}
        model = TransformerBridge.boot_native(TransformerBridgeConfig(**bridge_kwargs, seed=cfg.seed), device=device)
    model.illusion_probe_config = cfg  # lets save_checkpoint rebuild the exact architecture
    model.eval()
    return model
