"""A proxy: fitted simplifiers spliced into a model at named hooks.

A :class:`Proxy` is frozen data: its simplifiers' tensors, the feature shape of
each hook, what it was fit on (:mod:`illusion_probe.simplify.fitting` fits
them) and provenance. ``with proxy.applied(model): ...`` attaches it through
``model.hooks`` so nothing is left behind, even when the forward pass raises.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

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
from illusion_probe.errors import ArtifactError, IllusionProbeError, require
from illusion_probe.hook_names import hook_points, is_attention_pattern, layer_of, resolve_hook_name
from illusion_probe.provenance import provenance
from illusion_probe.registry import UnknownNameError
from illusion_probe.simplify.base import Simplifier

FORMAT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"

#: ``on_apply(hook_name, act_in, act_out)``: called after each application of a simplifier.
OnApply = Callable[[str, Tensor, Tensor], None]
#: ``on_latents(hook_name, latents)``: called after each application of a sparse dictionary.
OnLatents = Callable[[str, Tensor], None]


class Proxy:
    """Fitted simplifiers keyed by the hook names the user gave.

    Args:
        simplifiers: ``{hook name: fitted simplifier}``.
        name: label used in results; defaults to ``"hook:method(size)"`` joined by ``" + "``.
        feature_shapes: per hook, the activation shape beyond ``[batch, pos]`` on the fit model
            (``(head,)`` for attention patterns); used by :meth:`check_compatible`.
        fit_info: what it was fit on (``split``, ``role``, ``n_sequences``, ``n_tokens``).
        backend: the kind of model it was fit on (``hooked``, ``bridge`` or ``bridge_hf``).
        error_term: the identity control (see :meth:`with_error_term`).
    """

    def __init__(
        self,
        simplifiers: Mapping[str, Simplifier],
        name: str | None = None,
        feature_shapes: Mapping[str, tuple[int, ...]] | None = None,
        fit_info: Mapping[str, Any] | None = None,
        backend: str | None = None,
        error_term: bool = False,
    ):
        require(len(simplifiers) > 0, "Proxy needs at least one {hook name: simplifier}")
        for hook, simplifier in simplifiers.items():
            require(isinstance(simplifier, Simplifier),
                    f"Proxy: the value for {hook!r} is a {type(simplifier).__name__}, not a Simplifier")
            require(simplifier.is_fitted, f"Proxy: {simplifier.describe()} at {hook!r} is not fitted; use fit_proxy()")
            simplifier.check_hook(hook)
        self._simplifiers = dict(simplifiers)
        self.name = name or default_name(self._simplifiers)
        self.feature_shapes = {k: tuple(v) for k, v in (feature_shapes or {}).items()}
        self.fit_info = dict(fit_info or {})
        self.backend = backend
        self.error_term = bool(error_term)

    @property
    def simplifiers(self) -> dict[str, Simplifier]:
        """``{hook name (as the user gave it): fitted simplifier}``."""
        return dict(self._simplifiers)

    @property
    def hook_names(self) -> tuple[str, ...]:
        """The hooks this proxy edits, in the order given."""
        return tuple(self._simplifiers)

    @property
    def read_hooks(self) -> tuple[str, ...]:
        """Every hook the proxy touches: those it edits and those its simplifiers read (a transcoder's MLP input)."""
        sources = (s.input_hook(hook) for hook, s in self._simplifiers.items())
        return tuple(dict.fromkeys([*self._simplifiers, *(h for h in sources if h is not None)]))

    def with_error_term(self) -> Proxy:
        """The identity control: this proxy with every reconstruction error added back, ``x_hat + (x - x_hat)``
        (summed in float64, so the clean activation comes back exactly), as SAELens's ``use_error_term``.

        Its outputs must equal the clean model's: anything else is a fault in the plumbing, not the proxy.
        """
        return Proxy(self._simplifiers, name=f"{self.name} + error", feature_shapes=self.feature_shapes,
                     fit_info=self.fit_info, backend=self.backend, error_term=True)

    def describe(self) -> str:
        """The proxy's label (same as ``name``)."""
        return self.name

    def __repr__(self) -> str:
        return f"<Proxy {self.name!r}>"

    def same_edit(self, other: Proxy) -> bool:
        """Whether ``other`` edits the model identically: the same hooks (in any order), each with a
        simplifier of the same method and options and equal fitted tensors."""
        require(isinstance(other, Proxy), f"same_edit compares two proxies, got a {type(other).__name__}")
        if set(self._simplifiers) != set(other._simplifiers):
            return False
        for hook, mine in self._simplifiers.items():
            theirs = other._simplifiers[hook]
            if type(mine) is not type(theirs) or mine.options() != theirs.options() or self.error_term != other.error_term:
                return False
            a, b = mine.state_dict(), theirs.state_dict()
            if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
                return False
        return True

    # -- running ----------------------------------------------------------------------
    def fwd_hooks(self, on_apply: OnApply | None = None,
                  on_latents: OnLatents | None = None) -> list[tuple[str, Callable[..., Tensor | None]]]:
        """``[(hook name, hook fn)]`` for ``model.run_with_hooks`` / ``model.hooks``.

        A simplifier that reads another hook (a transcoder reads its MLP's input) gets a hook there
        that keeps the activation, ahead of the one that replaces its own.

        Args:
            on_apply: optional ``(hook_name, act_in, act_out) -> None`` called at every application,
                e.g. to accumulate the explained variance of each reconstruction.
            on_latents: optional ``(hook_name, latents) -> None`` called at every application of a
                sparse dictionary with its latents ``[batch, pos, group, d_sae]``.
        """
        hooks: list[tuple[str, Callable[..., Tensor | None]]] = []
        for hook, simplifier in self._simplifiers.items():
            source = simplifier.input_hook(hook)
            held: dict[str, Tensor] = {}
            if source is not None:
                hooks.append((source, _keep(held)))
            hooks.append((hook, _replacement(hook, simplifier, held if source is not None else None, on_apply,
                                             on_latents, self.error_term)))
        return hooks

    @contextmanager
    def applied(self, model: torch.nn.Module, on_apply: OnApply | None = None) -> Iterator[torch.nn.Module]:
        """Run ``model`` with the proxy inside the block; every hook is removed on exit, even on error.

        Checks :meth:`check_compatible` first.
        """
        self.check_compatible(model)
        with model.hooks(fwd_hooks=self.fwd_hooks(on_apply)):
            yield model

    def check_compatible(self, model: torch.nn.Module) -> None:
        """Raise a one-line error unless every hook exists on ``model`` with the fitted shape and edits take effect."""
        backend = Backend.of(model)
        shapes = check_hooks(backend, self._simplifiers)
        for hook, shape in shapes.items():
            fitted = self.feature_shapes.get(hook)
            if fitted is not None and shape != fitted:
                raise IllusionProbeError(
                    f"proxy {self.name!r} was fit where {hook!r} has shape {list(fitted)} beyond [batch, pos]; "
                    f"this model has {list(shape)}; fit a proxy on this model"
                )

    # -- persistence ------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write ``path/`` (``metadata.json`` + ``tensors.safetensors``) atomically."""
        hooks, tensors = [], {}
        for index, (hook, simplifier) in enumerate(self._simplifiers.items()):
            shape = self.feature_shapes.get(hook)
            hooks.append({"name": hook, "simplifier": simplifier.config(),
                          "feature_shape": None if shape is None else list(shape)})
            tensors.update({f"{index}.{key}": t for key, t in simplifier.state_dict().items()})
        metadata = {"kind": "proxy", "format_version": FORMAT_VERSION, "name": self.name, "hooks": hooks,
                    "fit": self.fit_info, "backend": self.backend, "error_term": self.error_term,
                    "provenance": provenance()}
        with atomic_directory(path) as staging:
            write_tensors(staging / TENSORS_FILE, tensors)
            write_json(staging / METADATA_FILE, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Proxy:
        """Read a proxy written by :meth:`save`; a foreign or newer format is a one-line ``ArtifactError``."""
        root = Path(path)
        meta_file = root / METADATA_FILE
        metadata = read_json(meta_file)
        check_format(metadata, meta_file, "proxy", FORMAT_VERSION)
        tensors = read_tensors(root / TENSORS_FILE, device=device)

        hooks = field(metadata, "hooks", meta_file, _hook_entries)
        simplifiers, shapes = {}, {}
        for index, entry in enumerate(hooks):
            prefix = f"{index}."
            state = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
            try:
                simplifiers[entry["name"]] = Simplifier.from_state(entry["simplifier"], state)
            except UnknownNameError as err:
                raise ArtifactError(f"{meta_file}: {err}") from None
            except (TypeError, ValueError, KeyError) as err:
                raise ArtifactError(f"{meta_file}: the simplifier at {entry['name']!r} cannot be rebuilt ({err}); "
                                    "re-fit the proxy") from None
            if entry["feature_shape"] is not None:
                shapes[entry["name"]] = tuple(int(d) for d in entry["feature_shape"])
        return cls(simplifiers, name=field(metadata, "name", meta_file, str), feature_shapes=shapes,
                   fit_info=field(metadata, "fit", meta_file, dict), backend=metadata.get("backend"),
                   error_term=metadata.get("error_term") is True)


def default_name(simplifiers: Mapping[str, Simplifier]) -> str:
    """A proxy's label when none is given: ``"hook:method(size)"`` joined by ``" + "``."""
    return " + ".join(f"{hook}:{s.describe()}" for hook, s in simplifiers.items())


def _hook_entries(hooks: Any) -> list[dict[str, Any]]:
    """The ``hooks`` list of proxy metadata, each entry checked for its fields."""
    if not isinstance(hooks, list) or not hooks:
        raise TypeError("expected a non-empty list")
    for entry in hooks:
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and isinstance(entry.get("simplifier"), dict) and "feature_shape" in entry):
            raise TypeError(f"entry {entry!r} needs 'name', 'simplifier' and 'feature_shape'")
    return hooks


def _keep(held: dict[str, Tensor]) -> Callable[..., None]:
    """A hook keeping the activation it sees in ``held["source"]`` (and leaving it unchanged)."""
    def hook_fn(act: Tensor, hook: Any = None) -> None:
        held["source"] = act
    return hook_fn


def _replacement(hook_name: str, simplifier: Simplifier, held: dict[str, Tensor] | None, on_apply: OnApply | None,
                 on_latents: OnLatents | None, error_term: bool) -> Callable[..., Tensor]:
    """The hook putting ``simplifier`` at ``hook_name``, reading ``held["source"]`` when it reads another hook."""
    def hook_fn(act: Tensor, hook: Any = None) -> Tensor:
        source = act if held is None else held.pop("source")
        out = simplifier.replace(source, act, hook)
        if on_latents is not None and simplifier.has_latents:
            on_latents(hook_name, simplifier.latents(source))
        if on_apply is not None:
            on_apply(hook_name, act, out)
        if error_term:  # x_hat + (x - x_hat), exact in float64
            out = (out.double() + (act.double() - out.double())).to(act.dtype)
        return out
    return hook_fn


def check_hooks(backend: Backend, simplifiers: Mapping[str, Simplifier]) -> dict[str, tuple[int, ...]]:
    """Validate ``{hook: simplifier}`` against a model before any work; returns each hook's feature shape.

    Every hook must exist (a "did you mean" otherwise), name a distinct hook, suit its simplifier (kind and
    shape: a rank above the dimension, a head index beyond the heads), and, for attention patterns,
    be a hook whose edits the model does not silently ignore.
    """
    canonical: dict[str, str] = {}
    for hook, simplifier in simplifiers.items():
        require(isinstance(simplifier, Simplifier),
                f"the value for {hook!r} is a {type(simplifier).__name__}, not an ip.Simplifier")
        simplifier.check_hook(hook)
        source = simplifier.input_hook(hook)
        if source is not None:
            missing = [name for name in (hook, source) if name not in hook_points(backend.model)]
            require(not missing, f"{simplifier.describe()} at {hook!r} reads {source!r}, and this model has no "
                    f"{' or '.join(map(repr, missing))}: a block without an MLP, or (for the input) without a norm "
                    "before it; pick a block with an MLP, or pass input_hook='blocks.L.hook_resid_mid'")
        resolved = resolve_hook_name(backend.model, hook)
        require(resolved not in canonical.values(), f"{hook!r} names the same hook as another entry")
        canonical[hook] = resolved
    shapes = backend.feature_shapes(list(simplifiers))
    for hook, simplifier in simplifiers.items():
        simplifier.check_feature_shape(shapes[hook])
        if is_attention_pattern(hook) and not backend.pattern_edits_take_effect(layer_of(hook)):
            raise IllusionProbeError(
                f"{simplifier.describe()}: edits to {hook!r} are silently ignored by this model "
                f"({backend.describe()}); use HookedTransformer (backend='hooked') or TransformerLens >= 4.3")
    return shapes
