"""Any sparse dictionary trained elsewhere, as a simplifier: a SAELens SAE, a dictionary_learning one, your module.

:class:`ExternalSAE` wraps an object with ``encode`` (activation ``[..., d_in]`` to latents
``[..., d_sae]``) and ``decode`` (latents back to ``[..., d_in]``) and replaces the activation by
``decode(encode(x))``. It is frozen: fitting leaves it as it is. A ``torch.nn.Module`` is saved with
a proxy as its state dict (safetensors) plus its class and configuration (JSON); loading rebuilds it
from the class, which must already be imported (``import sae_lens`` first), with ``cls.from_dict(config)``
when the class has that method (SAELens), else ``cls(**config)``, and loads the state dict strictly.
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from illusion_probe.errors import IllusionProbeError, require
from illusion_probe.registry import register_simplifier
from illusion_probe.simplify.base import Simplifier


@register_simplifier
class ExternalSAE(Simplifier):
    """Replace an activation by ``sae.decode(sae.encode(x))``.

    Args:
        sae: any object with ``encode`` and ``decode``.
        config: JSON-serialisable arguments that rebuild ``sae``'s class when a saved proxy is
            loaded; by default ``sae.cfg.to_dict()`` where it exists (SAELens), else none.
    """

    method: ClassVar[str] = "external_sae"
    has_latents: ClassVar[bool] = True

    def __init__(self, sae: Any, config: dict[str, Any] | None = None):
        for name in ("encode", "decode"):
            require(callable(getattr(sae, name, None)), f"ExternalSAE: a {type(sae).__name__} has no {name}() method; "
                    "wrap an object with encode(x) -> latents and decode(latents) -> x")
        require(config is None or isinstance(config, dict), f"ExternalSAE: config must be a dict, got {config!r}")
        self.sae = sae
        cfg = getattr(sae, "cfg", None)
        self._config = config if config is not None else (cfg.to_dict() if callable(getattr(cfg, "to_dict", None))
                                                          else None)

    def describe(self) -> str:
        return f"{self.method}({type(self.sae).__name__})"

    def options(self) -> dict[str, Any]:
        cls = type(self.sae)
        return {"class": f"{cls.__module__}:{cls.__qualname__}", "config": _jsonable(self._config)}

    def unfitted(self, size: int | None = None, **changes: Any) -> Simplifier:
        require(size is None and not changes, f"{self.describe()} is trained elsewhere and has no size or options")
        return self

    # -- application ------------------------------------------------------------------
    def check_feature_shape(self, shape: tuple[int, ...]) -> None:
        probe = torch.zeros(2, *shape, device=self._device())
        try:
            with torch.no_grad():
                out = self.sae.decode(self.sae.encode(probe))
        except Exception as err:  # the wrapped object's own failure, reported in one line
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise IllusionProbeError(f"{self.describe()}: encode/decode fail on activations of shape "
                                     f"[..., {', '.join(map(str, shape))}] ({first}); wrap a dictionary of this "
                                     "hook's width") from None
        require(tuple(out.shape) == tuple(probe.shape), f"{self.describe()}: decode(encode(x)) has shape "
                f"{list(out.shape)} for x of shape {list(probe.shape)}; wrap a dictionary of this hook's width")

    def latents(self, source: Float[Tensor, "batch pos *feature"]) -> Float[Tensor, "batch pos group d_sae"]:
        """The latents per position; the heads of a per-head hook are groups (one group otherwise)."""
        with torch.no_grad():
            codes = self.sae.encode(source)
        return codes.reshape(*source.shape[:2], -1, codes.shape[-1])

    def __call__(self, act: Float[Tensor, "*samples d_in"], hook: Any = None) -> Float[Tensor, "*samples d_in"]:
        with torch.no_grad():
            return self.sae.decode(self.sae.encode(act)).to(act.dtype)

    def _device(self) -> torch.device:
        parameters = self.sae.parameters() if isinstance(self.sae, torch.nn.Module) else iter(())
        first = next(parameters, None)
        return first.device if first is not None else torch.device("cpu")

    # -- persistence ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        require(isinstance(self.sae, torch.nn.Module), f"{self.describe()}: only a torch.nn.Module can be saved "
                f"(its state dict); a {type(self.sae).__name__} can be evaluated, not saved")
        return {name: t.detach().cpu().contiguous() for name, t in self.sae.state_dict().items()}

    @classmethod
    def rebuild(cls, config: dict[str, Any], state: dict[str, Tensor]) -> Simplifier:
        module, _, qualname = str(config["options"]["class"]).partition(":")
        if module not in sys.modules:
            raise ValueError(f"its dictionary class {qualname} lives in {module}, which is not imported; "
                             f"import {module.split('.')[0]} first")
        target: Any = sys.modules[module]
        for part in qualname.split("."):
            target = getattr(target, part)
        options = config["options"]["config"]
        if options is None:
            sae = target()
        elif callable(getattr(target, "from_dict", None)):
            sae = target.from_dict(options)
        else:
            sae = target(**options)
        try:
            sae.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(str(err).splitlines()[0]) from None
        return cls(sae, config=options)


def _jsonable(value: Any) -> Any:
    """``value`` with anything JSON cannot hold (a dtype, a device) as its string."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
