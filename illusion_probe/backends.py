"""Everything that differs between HookedTransformer, a native TransformerBridge and a bridge around
a Hugging Face model, decided once, by type, in one adapter per model.

The rest of the package asks the adapter (:meth:`Backend.of`) rather than the model:

- :meth:`Backend.logits`: a forward pass that padding cannot change. Bridges get an attention mask
  whenever a batch is padded (TransformerLens 3.x reports some bidirectional Hugging Face models as
  causal, so the mask is not left to that flag; on causal models it changes nothing). A causal
  HookedTransformer needs none (right padding never reaches a real position); a bidirectional one
  ignores masks, so a padded batch is refused.
- :meth:`Backend.run`: a pass for what hooks see, run no further than they need (stopped before a
  block, or at the final residual), so that collecting activations never computes full-vocabulary
  logits for hooks in the blocks.
- :meth:`Backend.final_residual` and :meth:`Backend.head`: the residual stream after the last block
  ``[batch, pos, d_model]``, and the logits of chosen rows of it, so that evaluation never holds
  full-vocabulary logits for more than a chunk of positions. A pass may resume at a block from a
  cached residual where the backend allows it: ``start_at_layer`` on HookedTransformer; calling the
  blocks directly on native bridges (whose blocks own their positions). Bridges around Hugging Face
  models always run whole: their blocks need arguments (rotary tables, masks) that only the
  model's own forward builds.
- :meth:`Backend.feature_shapes` and :meth:`Backend.pattern_edits_take_effect`: facts learnt from a
  tiny forward pass the first time they are asked, then cached on the adapter. The adapter itself
  is kept on the model, so each fact is established once per model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from illusion_probe.errors import IllusionProbeError, require
from illusion_probe.hook_names import (
    attn_pattern,
    attn_z,
    blocks_needed,
    final_norm_in,
    is_attention_pattern,
    resolve_hook_name,
)
from illusion_probe.provenance import package_version

Hooks = Sequence[tuple[str, Callable[..., Any]]]
_ATTRIBUTE = "_illusion_probe_backend"


def transformer_lens_major() -> int:
    """Major version of the installed TransformerLens; an unreadable version is an error."""
    version = package_version("transformer-lens")
    head = (version or "").split(".")[0]
    if not head.isdigit():
        raise IllusionProbeError(f"cannot read the installed TransformerLens version ({version!r}); "
                                 "reinstall transformer-lens (3.4 or later)")
    return int(head)


def _hooked_transformer_class() -> type | None:
    if transformer_lens_major() >= 4:
        return None
    from transformer_lens import HookedTransformer

    return HookedTransformer


class Backend:
    """The adapter for one model. Use :meth:`Backend.of`, not the constructor."""

    kind: ClassVar[str]

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._pattern_edits: dict[int, bool] = {}

    @staticmethod
    def of(model: torch.nn.Module) -> Backend:
        """The adapter of ``model`` (made on first use and kept on the model)."""
        adapter = model.__dict__.get(_ATTRIBUTE) if isinstance(model, torch.nn.Module) else None
        if adapter is None or adapter.model is not model:
            adapter = _detect(model)(model)
            model.__dict__[_ATTRIBUTE] = adapter
        return adapter

    # -- facts ------------------------------------------------------------------------
    @property
    def cfg(self) -> Any:
        return self.model.cfg

    @property
    def n_layers(self) -> int:
        return int(self.cfg.n_layers)

    @property
    def n_ctx(self) -> int:
        return int(self.cfg.n_ctx)

    @property
    def d_vocab(self) -> int:
        """Input vocabulary size."""
        return int(self.cfg.d_vocab)

    @property
    def d_vocab_out(self) -> int:
        """Output vocabulary size (differs from ``d_vocab`` for, e.g., models compiled by tracr)."""
        out = int(getattr(self.cfg, "d_vocab_out", -1) or -1)
        return out if out > 0 else self.d_vocab

    @property
    def causal(self) -> bool:
        """Whether the model's config says attention is causal."""
        return getattr(self.cfg, "attention_dir", "causal") == "causal"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- forward passes -----------------------------------------------------------------
    def _mask(self, real: Bool[Tensor, "batch pos"] | None) -> dict[str, Tensor]:
        """Forward kwargs that keep padding (``real`` is False there; always on the right) away from real positions."""
        if real is None or bool(real.all()):
            return {}
        return {"attention_mask": real.long()}

    def logits(self, tokens: Int[Tensor, "batch pos"], real: Bool[Tensor, "batch pos"] | None = None,
               hooks: Hooks = ()) -> Float[Tensor, "batch pos vocab_out"]:
        """Logits of a whole forward pass with ``hooks`` attached."""
        with self.model.hooks(fwd_hooks=list(hooks)):
            return self.model(tokens, **self._mask(real))

    def run(self, tokens: Int[Tensor, "batch pos"], real: Bool[Tensor, "batch pos"] | None, hooks: Hooks,
            stop_at_layer: int | None = None) -> None:
        """A forward pass for what ``hooks`` see, stopped before block ``stop_at_layer`` (by default the first
        block no hook needs). Hooks in the last block or entering the final norm stop it at the final
        residual: the unembedding runs only for hooks on the final norm's output or the unembedding."""
        stop = blocks_needed([name for name, _ in hooks], self.n_layers) if stop_at_layer is None else stop_at_layer
        if stop == self.n_layers:
            self.final_residual(tokens, real, hooks)
            return
        with self.model.hooks(fwd_hooks=list(hooks)):
            self.model(tokens, **self._mask(real), **({} if stop is None else {"stop_at_layer": stop}))

    def can_resume(self, layer: int) -> bool:
        """Whether a pass can start at block ``layer`` from the residual entering it."""
        return False

    def final_residual(self, tokens: Int[Tensor, "batch pos"], real: Bool[Tensor, "batch pos"] | None,
                       hooks: Hooks = (), resume: tuple[int, Tensor] | None = None
                       ) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream after the last block, with ``hooks`` attached.

        Args:
            resume: ``(layer, residual entering it)`` to skip the blocks before ``layer`` (only where
                :meth:`can_resume`); hooks on skipped blocks do not fire.
        """
        raise NotImplementedError

    def head(self, rows: Float[Tensor, "n d_model"]) -> Float[Tensor, "n vocab_out"]:
        """Logits of final-residual rows: the final norm, the unembedding and any logit soft cap."""
        x = rows.unsqueeze(0)
        if getattr(self.model, "ln_final", None) is not None and self.cfg.normalization_type is not None:
            x = self.model.ln_final(x)
        logits = self.model.unembed(x)[0]
        cap = float(getattr(self.cfg, "output_logits_soft_cap", 0.0) or 0.0)
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    # -- facts learnt from the model ------------------------------------------------------
    def feature_shapes(self, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
        """Per hook, the activation shape beyond ``[batch, pos]`` (``(head,)`` for attention patterns).

        Hooks not seen before are measured together in one forward pass of two tokens.
        """
        for name in names:
            resolve_hook_name(self.model, name)
        missing = [name for name in dict.fromkeys(names) if name not in self._shapes]
        if missing:
            seen: dict[str, tuple[int, ...]] = {}

            def shape_of(name: str) -> Callable[..., None]:
                def hook(act: Tensor, hook: Any) -> None:
                    seen[name] = (act.shape[1],) if is_attention_pattern(name) else tuple(act.shape[2:])
                return hook

            tokens = (torch.arange(2) % self.d_vocab).unsqueeze(0).to(self.device)
            with torch.no_grad():
                self.run(tokens, None, [(name, shape_of(name)) for name in missing])
            silent = [name for name in missing if name not in seen]
            require(not silent, f"hook(s) {silent} never fire during a forward pass of this model; "
                    "choose hooks the forward pass runs through")
            self._shapes.update(seen)
        return {name: self._shapes[name] for name in names}

    def pattern_edits_take_effect(self, layer: int) -> bool:
        """Whether replacing block ``layer``'s attention pattern changes its output (cached per layer).

        Measured once: the pattern is zeroed on a tiny input and ``hook_z`` (pattern @ values) must vanish.
        """
        if layer not in self._pattern_edits:
            seen: list[Tensor] = []
            hooks = [(attn_pattern(layer), lambda pattern, hook: torch.zeros_like(pattern)),
                     (attn_z(layer), lambda z, hook: seen.append(z.detach()))]
            tokens = (torch.arange(3) % self.d_vocab).unsqueeze(0).to(self.device)
            with torch.no_grad():
                self.run(tokens, None, hooks)
            self._pattern_edits[layer] = len(seen) == 1 and not bool(seen[0].any())
        return self._pattern_edits[layer]

    def describe(self) -> str:
        return f"{self.kind} on TransformerLens {package_version('transformer-lens')}"


class HookedBackend(Backend):
    """``HookedTransformer`` (TransformerLens 3.x): ``stop_at_layer`` and ``start_at_layer`` built in."""

    kind = "hooked"

    def _mask(self, real: Bool[Tensor, "batch pos"] | None) -> dict[str, Tensor]:
        if self.causal or real is None or bool(real.all()):
            return {}  # right padding cannot reach a real position of a causal model
        raise IllusionProbeError("this HookedTransformer attends bidirectionally and ignores attention masks, so "
                                 "padding would change its outputs; give sequences of equal length or use a "
                                 "TransformerBridge")

    def can_resume(self, layer: int) -> bool:
        return 0 < layer < self.n_layers

    def final_residual(self, tokens, real, hooks=(), resume=None):
        with self.model.hooks(fwd_hooks=list(hooks)):
            if resume is not None:
                layer, residual = resume
                return self.model(residual, start_at_layer=layer, stop_at_layer=self.n_layers, **self._mask(real))
            return self.model(tokens, stop_at_layer=self.n_layers, **self._mask(real))


class BridgeBackend(Backend):
    """A ``TransformerBridge`` around a Hugging Face model: whole passes, stopped before the final norm."""

    kind = "bridge_hf"

    def final_residual(self, tokens, real, hooks=(), resume=None):
        require(resume is None, f"{self.kind} cannot resume a pass from a block")
        from transformer_lens.model_bridge.exceptions import StopAtLayerException

        def stop(residual: Tensor, hook: Any) -> None:
            raise StopAtLayerException(residual)  # the bridge's own early exit: caught by its forward

        with self.model.hooks(fwd_hooks=[*hooks, (final_norm_in(), stop)]):
            return self.model(tokens, **self._mask(real))


class NativeBridgeBackend(BridgeBackend):
    """``TransformerBridge.boot_native``: blocks own their positions, so a pass can resume at any block."""

    kind = "bridge"

    def can_resume(self, layer: int) -> bool:
        return self.causal and 0 < layer < self.n_layers

    def final_residual(self, tokens, real, hooks=(), resume=None):
        if resume is None:
            return super().final_residual(tokens, real, hooks)
        layer, x = resume
        positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        with self.model.hooks(fwd_hooks=list(hooks)):
            for block in list(self.model.blocks)[layer:]:
                out = block(x, attention_mask=None, position_ids=positions)
                x = out[0] if isinstance(out, tuple) else out
        return x


def _detect(model: Any) -> type[Backend]:
    """The adapter class for ``model``, by type."""
    from transformer_lens.model_bridge import TransformerBridge

    hooked = _hooked_transformer_class()
    if hooked is not None and isinstance(model, hooked):
        return HookedBackend
    if isinstance(model, TransformerBridge):
        from transformer_lens.model_bridge.sources.native.model import NativeModel

        return NativeBridgeBackend if isinstance(getattr(model, "original_model", None), NativeModel) else BridgeBackend
    raise IllusionProbeError(f"{type(model).__name__} is not a TransformerLens HookedTransformer or TransformerBridge; "
                             "pass a hooked model")

