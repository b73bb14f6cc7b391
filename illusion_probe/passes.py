"""Forward passes for evaluation: the clean pass once per batch, then each proxy.

The clean pass keeps the residual stream entering each hooked layer; a proxy's pass
restarts there (``start_at_layer``) where the backend really skips the earlier blocks,
and proxies that edit the same hooks can share one stacked pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from illusion_probe.hook_names import layer_of
from illusion_probe.simplify.proxy import Proxy


def start_layer(hooks: list[str]) -> int | None:
    """The first block any of ``hooks`` sits in; ``None`` if one sits before the blocks (embeddings)."""
    layers = [layer_of(h) for h in hooks]
    return None if any(layer is None for layer in layers) else min(layers)  # type: ignore[type-var]


class Runner:
    """Runs a model from a cached clean prefix, falling back to full passes where unsupported."""

    def __init__(self, model: torch.nn.Module, reuse_prefix: bool = True):
        self.model = model
        self.reuse_prefix = reuse_prefix
        self.prefix_ok: dict[int, bool] = {}

    def clean(self, tokens: Tensor, layers: set[int], patterns: set[int]
              ) -> tuple[Tensor, dict[int, Tensor], dict[int, Tensor]]:
        """Clean logits, the residual entering each of ``layers`` and the patterns of ``patterns``."""
        resid: dict[int, Tensor] = {}
        pattern: dict[int, Tensor] = {}
        layers = layers if self.reuse_prefix else set()
        hooks = [(f"blocks.{L}.hook_resid_pre", self._store(resid, L)) for L in sorted(layers)]
        hooks += [(f"blocks.{L}.attn.hook_pattern", self._store(pattern, L)) for L in sorted(patterns)]
        with self.model.hooks(fwd_hooks=hooks):
            logits = self.model(tokens)
        for layer in layers:
            if layer not in self.prefix_ok:
                self.prefix_ok[layer] = self._prefix_matches(resid[layer], layer, logits)
        return logits, resid, pattern

    @staticmethod
    def _store(sink: dict[int, Tensor], layer: int):
        def hook(act: Tensor, hook) -> None:  # noqa: ARG001 - TransformerLens calls hook(act, hook=...)
            sink[layer] = act.detach()
        return hook

    def _prefix_matches(self, resid: Tensor, layer: int, logits: Tensor) -> bool:
        """Whether ``start_at_layer`` reproduces the clean logits *and* skips the earlier blocks.

        TransformerBridge on TransformerLens 4.x accepts ``start_at_layer`` but still runs every
        block (it swaps the cached residual in at block ``layer``), so there it saves nothing.
        """
        skipped_ran: list[int] = []
        handles = [block.register_forward_pre_hook(lambda *_: skipped_ran.append(1))
                   for block in list(self.model.blocks)[:layer]]
        try:
            rerun = self.model(resid, start_at_layer=layer)
        except (NotImplementedError, TypeError, ValueError, RuntimeError):
            return False
        finally:
            for handle in handles:
                handle.remove()
        return not skipped_ran and rerun.shape == logits.shape and torch.allclose(rerun, logits, atol=1e-4, rtol=1e-4)

    def run(self, tokens: Tensor, resid: dict[int, Tensor], start: int | None, hooks: list) -> Tensor:
        """Logits with ``hooks`` attached, from the cached residual at ``start`` where that is verified."""
        with self.model.hooks(fwd_hooks=hooks):
            if start is not None and self.prefix_ok.get(start):
                return self.model(resid[start], start_at_layer=start)
            return self.model(tokens)


def capture_patterns(layers: list[int], sink: dict[int, Tensor]) -> list:
    """Hooks that keep each layer's attention pattern ``[batch, head, query, key]`` in ``sink``."""
    return [(f"blocks.{L}.attn.hook_pattern", Runner._store(sink, L)) for L in layers]


def stacked(fns: list) -> object:
    """One hook applying ``fns[j]`` to the ``j``-th of ``len(fns)`` equal slices of the batch."""
    def hook(act: Tensor, hook):
        parts = act.chunk(len(fns), dim=0)
        return torch.cat([fn(part, hook=hook) for fn, part in zip(fns, parts, strict=True)], dim=0)
    return hook


class Recorder:
    """Per-proxy sinks for one stacked pass: hook input/output (explained variance) and patterns."""

    def __init__(self) -> None:
        self.acts: dict[str, tuple[Tensor, Tensor]] = {}
        self.patterns: dict[int, Tensor] = {}

    def __call__(self, hook: str, act: Tensor, reconstruction: Tensor) -> None:
        self.acts[hook] = (act, reconstruction)


def run_group(runner: Runner, tokens: Tensor, resid: dict[int, Tensor], group: list[Proxy],
              attn_layers: list[int]) -> list[tuple[Tensor, Recorder]]:
    """Run proxies that edit the same hooks in one forward pass, each on its own copy of the batch."""
    recorders = [Recorder() for _ in group]
    per_proxy = [dict(proxy.fwd_hooks(on_apply=rec)) for proxy, rec in zip(group, recorders, strict=True)]
    hooks = [(hook, stacked([fns[hook] for fns in per_proxy])) for hook in group[0].hook_names]
    stacked_patterns: dict[int, Tensor] = {}
    hooks += capture_patterns(attn_layers, stacked_patterns)
    copies = len(group)
    start = start_layer(list(group[0].hook_names))
    stacked_resid = {layer: r.repeat(copies, *([1] * (r.ndim - 1))) for layer, r in resid.items() if layer == start}
    logits = runner.run(tokens.repeat(copies, 1), stacked_resid, start, hooks).chunk(copies, dim=0)
    for layer, pattern in stacked_patterns.items():
        for recorder, part in zip(recorders, pattern.chunk(copies, dim=0), strict=True):
            recorder.patterns[layer] = part
    return list(zip(logits, recorders, strict=True))
