"""What every simplifier is: a fitted, frozen TransformerLens hook function.

A :class:`Simplifier` maps an activation to its simplified version of the same
shape, dtype and device, so ``model.run_with_hooks(tokens, fwd_hooks=[(name,
simplifier)])`` works with no glue. Data-free simplifiers (one-hot attention,
zero ablation) subclass :class:`Simplifier` directly; simplifiers fitted on
activations subclass :class:`FittedSimplifier`, which streams batches through
``partial_fit`` and freezes its state in ``finalize``. Register a simplifier
class with ``@ip.register_simplifier`` and it is saved, loaded, swept and
compared like the built-ins.

Sample layout. The last dimension is the feature dimension and every leading
dimension is a sample. Per-head activations ``[batch, pos, head, d_head]``
are fitted head by head with ``per_head=True`` (one state per head, exactly as
fitting each head alone) or jointly with ``per_head=False`` (feature dimension
``head * d_head``). Inside the fitting protocol every input is ``[n, group,
feature]`` with ``group = head`` (per head) or ``1``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from illusion_probe.distributed import all_reduce
from illusion_probe.errors import IllusionProbeError, require
from illusion_probe.hook_names import is_attention_pattern, is_attention_scores
from illusion_probe.registry import SIMPLIFIERS


class Simplifier(ABC):
    """A hook function ``(activation, hook) -> simplified activation`` with a JSON config.

    Subclasses set ``method`` (the registered name) and ``size_option`` (the constructor
    argument that :attr:`size` reports and sweeps vary: ``"rank"``, ``"n_clusters"`` or ``None``),
    and implement :meth:`options` (constructor arguments as JSON) and ``__call__``.
    """

    method: ClassVar[str]
    size_option: ClassVar[str | None] = None
    #: False for data-free simplifiers: ``fit_proxy`` collects no activations for them.
    needs_data: ClassVar[bool] = False
    #: True for sparse dictionaries, whose :meth:`latents` the dictionary metrics read.
    has_latents: ClassVar[bool] = False

    # -- identity -------------------------------------------------------------------
    @property
    def per_head(self) -> bool:
        """Whether each head has its own fitted state (always ``False`` for data-free simplifiers)."""
        return False

    @property
    def size(self) -> int | None:
        """The sweep size (rank, cluster count, ...), ``None`` for size-free simplifiers."""
        return None if self.size_option is None else getattr(self, self.size_option)

    def options(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable) that rebuild an unfitted copy."""
        return {}

    def describe(self) -> str:
        """Short label such as ``"pca(rank=4)"``."""
        inner = f"{self.size_option}={self.size}" if self.size_option else ""
        return f"{self.method}({inner})"

    def __repr__(self) -> str:
        state = "fitted" if self.is_fitted else "unfitted"
        return f"<{type(self).__name__} {self.describe()} per_head={self.per_head} {state}>"

    # -- construction ---------------------------------------------------------------
    @classmethod
    def create(cls, method: str, size: int | None = None, **options: Any) -> Simplifier:
        """A fresh unfitted simplifier of the registered family ``method`` at ``size``."""
        return SIMPLIFIERS.get(method)._with_size(size, options)

    @classmethod
    def _with_size(cls, size: int | None, options: dict[str, Any]) -> Simplifier:
        if size is not None:
            require(cls.size_option is not None, f"simplifier {cls.method!r} has no size; pass size=None")
            options = {**options, cls.size_option: size}
        return cls(**options)

    def unfitted(self, size: int | None = None, **changes: Any) -> Simplifier:
        """A fresh unfitted copy with the same options, optionally at another ``size`` or with ``changes``."""
        return type(self)._with_size(size, {**self.options(), **changes})

    def config(self) -> dict[str, Any]:
        """JSON config: ``method``, the defining ``module``, constructor options and (once fitted) the fitted shape."""
        return {"method": self.method, "module": type(self).__module__, "options": self.options(),
                **self._fitted_config()}

    def _fitted_config(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Tensor]:
        """Fitted tensors (empty for data-free simplifiers)."""
        return {}

    @classmethod
    def from_state(cls, config: dict[str, Any], state: dict[str, Tensor]) -> Simplifier:
        """Rebuild a fitted simplifier from :meth:`config` and :meth:`state_dict`.

        The family must be registered: a user's simplifier is, once the module defining it is imported.
        """
        module = config.get("module") or "the module that defines it"
        target = SIMPLIFIERS.get(config["method"], fix=f"import {module} (which registers it) before loading")
        return target.rebuild(config, state)

    @classmethod
    def rebuild(cls, config: dict[str, Any], state: dict[str, Tensor]) -> Simplifier:
        """This class's simplifier from :meth:`config` and :meth:`state_dict` (``ValueError`` if they do not fit)."""
        simplifier = cls(**config["options"])
        simplifier._load_state(config, state)
        return simplifier

    def _load_state(self, config: dict[str, Any], state: dict[str, Tensor]) -> None:
        return None

    # -- fitting (no-ops for data-free simplifiers) ----------------------------------
    @property
    def is_fitted(self) -> bool:
        """Whether the simplifier can be applied."""
        return True

    def partial_fit(self, acts: Tensor, mask: Tensor | None = None) -> Simplifier:
        """Accumulate one batch of activations (no-op when no data is needed)."""
        return self

    def finalize(self) -> Simplifier:
        """Freeze the fitted state after the last :meth:`partial_fit`."""
        return self

    def fit(self, acts: Float[Tensor, "*samples feature"], mask: Bool[Tensor, "*samples"] | None = None) -> Simplifier:
        """Fit on ``acts`` in one call: :meth:`partial_fit` then :meth:`finalize`. Returns ``self``."""
        return self.partial_fit(acts, mask).finalize()

    # -- application ----------------------------------------------------------------
    def input_hook(self, hook_name: str) -> str | None:
        """The hook whose activation this simplifier reads when it replaces ``hook_name``'s: ``None`` (the
        default) for ``hook_name`` itself; a transcoder reads its MLP's input."""
        return None

    def replace(self, source: Tensor, act: Tensor, hook: Any = None) -> Tensor:
        """The replacement for ``act``, computed from ``source`` (the activation at :meth:`input_hook`, or
        ``act`` itself). The default is ``self(act, hook)``."""
        return self(act, hook)

    def random_baseline(self) -> Simplifier | None:
        """An unfitted simplifier of this one's form and size whose learned structure is drawn at random (the
        random-baseline control; see :mod:`illusion_probe.controls`), or ``None`` for a family without one."""
        return None

    def latents(self, source: Tensor) -> Float[Tensor, "*samples group d_sae"]:
        """A sparse dictionary's latents for the activation ``source`` it reads (``has_latents`` simplifiers only)."""
        raise NotImplementedError(f"{self.describe()} has no latents")

    def check_hook(self, hook_name: str) -> None:
        """Raise unless this simplifier can act at a hook called ``hook_name`` (checked before any forward)."""
        require(not is_attention_pattern(hook_name),
                f"{self.describe()} cannot simplify the attention pattern {hook_name!r}; use OneHotAttention there")
        require(not is_attention_scores(hook_name), f"{self.describe()} cannot simplify {hook_name!r}: attention "
                "scores are [batch, head, query, key], not one activation per position; simplify hook_k or hook_q")

    def check_feature_shape(self, shape: tuple[int, ...]) -> None:
        """Raise unless the simplifier can act on activations with ``shape`` beyond ``[batch, pos]``."""
        return None

    @abstractmethod
    def __call__(self, act: Tensor, hook: Any = None) -> Tensor:
        """The simplified activation, same shape, dtype and device as ``act``."""


class FittedSimplifier(Simplifier):
    """A simplifier with state fitted on activations, streamed batch by batch.

    The fitting protocol. Subclasses implement six methods; ``x`` is always ``[n, group, feature]``
    (float, on the activations' device) and every state tensor has ``group`` as its first dimension:

    - ``start(shape, device)``: set up empty accumulators for samples of ``shape = (group, feature)``.
    - ``accumulate(x)``: add one batch. Streaming statistics (PCA's Gram matrix) update here;
      simplifiers that must see the samples together (k-means) keep a bounded, seeded
      :class:`~illusion_probe.simplify.reservoir.Reservoir` of them here and train in ``finish``.
    - ``finish()``: compute the frozen state from what was accumulated, then drop the accumulators.
    - ``apply(x)``: the simplified samples, same shape and dtype as ``x``.
    - ``tensors()`` / ``set_tensors(state)``: the frozen state as named tensors, for saving and loading.

    ``check_feature_dim(feature)`` may refuse a size that cannot fit (a rank above the dimension)
    before any data is collected; ``state_shapes(group, feature)`` may give each state tensor's shape,
    so that a saved state of the wrong shape is refused when it is loaded, not when it is applied.

    Sharing accumulators across a sweep. A family whose accumulators do not depend on its size
    (PCA's Gram matrix, k-means' sample) returns, from ``sharing_key()``, the options they do depend
    on; simplifiers of one class at one hook with equal keys are then fitted from one stream, the
    others taking the first one's accumulators through ``adopt(leader)``. ``finish`` must then treat
    its accumulators as read-only (other simplifiers finish from them too).

    Fitting across processes (``torchrun``). Each process streams a contiguous shard of the fit
    sequences; ``combine_accumulators()`` then makes every process's accumulators those of the whole
    stream (an all-reduce of PCA's moments, a gather of k-means' sample), and each process finishes
    every ``world.size``-th simplifier and sends its state to the others, which take it through
    ``receive_fitted`` and ``drop_accumulators()`` (a family with ``finishes_together`` instead
    finishes on every process at once, data-parallel). A family without ``combine_accumulators()``
    fits in one process only, and says so.
    """

    needs_data: ClassVar[bool] = True
    #: ``accumulate`` itself refuses a batch holding NaN or inf (adding nothing), which spares
    #: :meth:`partial_fit` a pass over the data to check it.
    checks_finite: ClassVar[bool] = False

    def __init__(self, per_head: bool | None = None):
        require(per_head is None or isinstance(per_head, bool),
                f"{type(self).__name__}: per_head must be True, False or None, got {per_head!r}")
        self._per_head = per_head
        self._shape: tuple[int, int] | None = None  # fitted (group, feature)
        self._pending: tuple[int, int] | None = None  # shape of batches seen since the last reset
        self._n_seen = 0
        self._derived: dict[tuple[torch.dtype, torch.device], Any] = {}

    @property
    def per_head(self) -> bool:
        """Fit each head separately (``None`` at construction reads as ``False`` when called directly)."""
        return bool(self._per_head)

    @property
    def per_head_given(self) -> bool:
        """Whether ``per_head`` was chosen explicitly; ``fit_proxy`` decides it from the hook name otherwise."""
        return self._per_head is not None

    def options(self) -> dict[str, Any]:
        return {"per_head": self._per_head}

    @property
    def is_fitted(self) -> bool:
        return self._shape is not None

    @property
    def n_samples(self) -> int:
        """Number of samples the fitted state saw."""
        return self._n_seen

    @property
    def fitted_shape(self) -> tuple[int, int] | None:
        """``(groups, feature)`` of the fitted state: ``(n_heads, d_head)`` per head, else ``(1, d)``."""
        return self._shape

    def _fitted_config(self) -> dict[str, Any]:
        if self._shape is None:
            return {}
        return {"fitted_shape": list(self._shape), "n_samples": self._n_seen}

    def state_dict(self) -> dict[str, Tensor]:
        require(self.is_fitted, f"{self.describe()}: not fitted; call fit() or fit_proxy() first")
        return dict(self.tensors())

    def _load_state(self, config: dict[str, Any], state: dict[str, Tensor]) -> None:
        self._shape = (int(config["fitted_shape"][0]), int(config["fitted_shape"][1]))
        self._n_seen = int(config["n_samples"])
        for name, shape in self.state_shapes(*self._shape).items():
            if name not in state:
                raise ValueError(f"tensor {name!r} is missing")
            if tuple(state[name].shape) != shape:
                raise ValueError(f"tensor {name!r} has shape {list(state[name].shape)}, but {self.describe()} fitted "
                                 f"on (group, feature) {self._shape} has {list(shape)}")
            if state[name].is_floating_point() and not bool(torch.isfinite(state[name]).all()):
                raise ValueError(f"tensor {name!r} holds NaN or inf")
        self.set_tensors(state)
        self._derived = {}

    def state_shapes(self, group: int, feature: int) -> dict[str, tuple[int, ...]]:
        """The shape of each state tensor after fitting on ``(group, feature)`` samples, checked when a saved
        state is loaded (a family that does not say is not checked)."""
        return {}

    def check_feature_shape(self, shape: tuple[int, ...]) -> None:
        require(not self.per_head or len(shape) == 2,
                f"{self.describe()}: per_head=True needs [batch, pos, head, d_head] activations, "
                f"got [batch, pos, {', '.join(map(str, shape))}]")
        feature = shape[-1]
        if not self.per_head:
            for dim in shape[:-1]:
                feature *= dim
        self.check_feature_dim(feature)

    # -- layout -----------------------------------------------------------------------
    def _grouped(self, act: Tensor) -> Tensor:
        """``act`` viewed as ``[*leading, group, feature]``."""
        if self.per_head:
            require(act.ndim >= 3, f"{self.describe()}: per_head=True needs [..., head, d_head] activations, "
                    f"got shape {tuple(act.shape)}")
            return act
        if act.ndim == 4:  # [batch, pos, head, d_head] fitted jointly over heads
            return act.flatten(-2).unsqueeze(-2)
        require(act.ndim >= 1, f"{self.describe()}: activations need a feature dimension")
        return act.unsqueeze(-2)

    def _samples(self, acts: Tensor, mask: Tensor | None) -> Tensor:
        if not isinstance(acts, Tensor) or not acts.dtype.is_floating_point:
            raise IllusionProbeError(f"{self.describe()}: activations must be a float tensor, got {type(acts).__name__}"
                                     f"{'' if not isinstance(acts, Tensor) else ' of ' + str(acts.dtype)}")
        grouped = self._grouped(acts)
        leading = grouped.shape[:-2]
        if mask is not None:
            require(isinstance(mask, Tensor) and mask.dtype == torch.bool and tuple(mask.shape) == tuple(leading),
                    f"{self.describe()}: mask must be a bool tensor of shape {tuple(leading)}, got "
                    f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
            grouped = grouped[mask.to(grouped.device)]
        require(grouped.shape[-1] > 0, f"{self.describe()}: activations have no features (feature dimension 0); "
                "pass [..., feature] activations with feature >= 1")
        x = grouped.reshape(-1, *grouped.shape[-2:])
        require(x.shape[0] > 0, f"{self.describe()}: no samples to fit (empty activations or an all-False mask)")
        require(self.checks_finite or bool(torch.isfinite(x.sum())), self._not_finite())
        return x

    def _not_finite(self) -> str:
        return f"{self.describe()}: activations contain NaN or inf; check the model and inputs before fitting"

    # -- streaming fit ------------------------------------------------------------------
    def partial_fit(self, acts: Float[Tensor, "*samples feature"],
                    mask: Bool[Tensor, "*samples"] | None = None) -> FittedSimplifier:
        """Accumulate one batch; ``mask`` (over the leading dims) selects samples. Returns ``self``."""
        x = self._samples(acts, mask)
        shape = (x.shape[1], x.shape[2])
        if self._pending is None:
            self.check_feature_dim(shape[1])
            self.start(shape, x.device)
            self._pending, self._n_seen = shape, 0
        require(shape == self._pending, f"{self.describe()}: batch has (group, feature) {shape}, earlier batches "
                f"{self._pending}; every batch must come from the same hook")
        self.accumulate(x)
        self._n_seen += x.shape[0]
        return self

    def finalize(self) -> FittedSimplifier:
        """Freeze the state accumulated since the last :meth:`finalize`. Returns ``self``."""
        require(self._pending is not None, f"{self.describe()}: no samples to fit; call partial_fit() first")
        self.finish()
        # The layout a saved state loads with (size-1 dims can carry any stride, and a matmul's rounding
        # follows the strides), so a fitted simplifier and its reloaded copy give identical outputs.
        self.set_tensors({k: v.clone(memory_format=torch.contiguous_format) for k, v in self.tensors().items()})
        self._shape, self._pending = self._pending, None
        self._derived = {}
        return self

    def sharing_key(self) -> Hashable | None:
        """The options this family's accumulators depend on, if not on its size; ``None`` (the default) never
        shares. Simplifiers of one class at one hook with equal keys are fitted from one accumulation."""
        return None

    def adopt(self, leader: FittedSimplifier) -> None:
        """Take ``leader``'s accumulators (same class and :meth:`sharing_key`) as this simplifier's own."""
        raise NotImplementedError(f"{type(self).__name__} has a sharing_key() but no adopt()")

    def share_accumulated(self, leader: FittedSimplifier) -> FittedSimplifier:
        """Use what ``leader`` accumulated, instead of streaming the same samples again; then :meth:`finalize`
        as usual. Returns ``self``."""
        key = self.sharing_key()
        require(key is not None and type(leader) is type(self) and leader.sharing_key() == key
                and leader.per_head == self.per_head and leader._pending is not None,
                f"{self.describe()}: can only share the accumulators of an unfinished {type(self).__name__} "
                "with the same sharing_key() and per_head")
        self.check_feature_dim(leader._pending[1])
        self._pending, self._n_seen = leader._pending, leader._n_seen
        self.adopt(leader)
        return self

    # -- many processes (illusion_probe.distributed) ------------------------------------
    def stream_from(self, offset: int) -> None:
        """Before streaming: this process's shard of the stream starts after ``offset`` samples of the whole
        stream (families that draw a random key per sample skip the keys of the samples before it)."""
        return None

    def combine_shards(self) -> None:
        """After every process streamed its shard: make the accumulators, and the sample count, those of the
        whole stream on every process. Called on every process, for the same simplifiers, in the same order."""
        self._n_seen = int(all_reduce(torch.tensor(self._n_seen, dtype=torch.float64)))
        self.combine_accumulators()

    def combine_accumulators(self) -> None:
        """Combine this process's accumulators with the other processes' (all-reduce a sum, gather a sample)."""
        raise IllusionProbeError(f"{type(self).__name__} cannot be fitted by several processes: it does not define "
                                 "combine_accumulators(); fit it in one process")

    @property
    def finishes_together(self) -> bool:
        """Whether, under torchrun, every process runs ``finish`` at once (data-parallel inside it); otherwise each
        process finishes its share of the simplifiers and sends their states to the others."""
        return False

    def drop_accumulators(self) -> None:
        """Forget the accumulators without fitting: another process finished from the same ones."""
        return None

    def receive_fitted(self, config: dict[str, Any], state: dict[str, Tensor]) -> FittedSimplifier:
        """Take the state another process finished from the same (combined) accumulators, instead of
        :meth:`finalize`. Returns ``self``."""
        self._load_state(config, state)
        self._pending = None
        self.drop_accumulators()
        return self

    def check_feature_dim(self, feature: int) -> None:
        """Refuse a size that cannot fit ``feature``-dimensional samples (before any accumulation)."""
        return None

    def check_sample_count(self, n: int) -> None:
        """Refuse a size that cannot be fitted on ``n`` samples per group (before any accumulation)."""
        return None

    # -- application ----------------------------------------------------------------
    def derived(self, like: Tensor) -> Any:
        """Apply-time tensors for ``like``'s dtype and device, built once from the frozen state."""
        key = (like.dtype, like.device)
        if key not in self._derived:
            self._derived[key] = self.derive(like.dtype, like.device)
        return self._derived[key]

    def derive(self, dtype: torch.dtype, device: torch.device) -> Any:
        """Apply-time tensors (default: the state cast to ``dtype`` on ``device``); cached by :meth:`derived`."""
        return {k: v.to(device=device, dtype=dtype) for k, v in self.tensors().items()}

    def __call__(self, act: Float[Tensor, "*samples feature"], hook: Any = None) -> Float[Tensor, "*samples feature"]:
        """The simplified activation, same shape, dtype and device as ``act``."""
        require(self._shape is not None, f"{self.describe()}: not fitted; call fit() or fit_proxy() first")
        grouped = self._grouped(act)
        require(tuple(grouped.shape[-2:]) == self._shape,
                f"{self.describe()}: activation {_where(hook)}has (group, feature) {tuple(grouped.shape[-2:])}, "
                f"fitted on {self._shape}; apply it at the hook it was fitted on")
        out = self.apply(grouped.reshape(-1, *self._shape))
        return out.reshape(act.shape)

    # -- the fitting protocol ----------------------------------------------------------
    @abstractmethod
    def start(self, shape: tuple[int, int], device: torch.device) -> None:
        """Set up empty accumulators for samples of ``shape = (group, feature)``."""

    @abstractmethod
    def accumulate(self, x: Float[Tensor, "n group feature"]) -> None:
        """Add one batch of samples."""

    @abstractmethod
    def finish(self) -> None:
        """Compute the frozen state from the accumulated samples; drop the accumulators."""

    @abstractmethod
    def apply(self, x: Float[Tensor, "n group feature"]) -> Float[Tensor, "n group feature"]:
        """The simplified samples (same shape and dtype)."""

    @abstractmethod
    def tensors(self) -> dict[str, Tensor]:
        """The frozen state as named tensors (``group`` first)."""

    @abstractmethod
    def set_tensors(self, state: dict[str, Tensor]) -> None:
        """Restore the frozen state from :meth:`tensors`' output."""


def _where(hook: Any) -> str:
    name = getattr(hook, "name", None)
    return f"at {name!r} " if name else ""
