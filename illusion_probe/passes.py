"""Forward passes for evaluation: the clean pass once per batch, then each proxy.

The clean pass keeps the residual stream entering each hooked layer; a proxy's pass
restarts there, by whichever way of resuming the backend supports and that is verified
against the clean logits, and proxies that edit the same hooks can share one stacked pass.
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
    """Runs a model from a cached clean prefix, falling back to full passes where that fails.

    Two ways to resume at block ``L`` from the residual entering it are tried, once per layer,
    and the first that reproduces the clean logits *and* skips blocks ``0..L-1`` is kept:
    ``model(resid, start_at_layer=L)`` (HookedTransformer), then calling blocks ``L..``, the
    final norm and the unembedding directly (TransformerBridge, whose ``start_at_layer`` still
    runs the earlier blocks). Hooks fire either way: they sit on the modules that run.
    """

    def __init__(self, model: torch.nn.Module, reuse_prefix: bool = True):
        self.model = model
        self.reuse_prefix = reuse_prefix
        self.resume: dict[int, str | None] = {}  # layer -> name of the verified way to resume, or None

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
            if layer not in self.resume:
                self.resume[layer] = self._verified_resume(resid[layer], layer, logits)
        return logits, resid, pattern

    @staticmethod
    def _store(sink: dict[int, Tensor], layer: int):
        def hook(act: Tensor, hook) -> None:  # noqa: ARG001 - TransformerLens calls hook(act, hook=...)
            sink[layer] = act.detach()
        return hook

    def _verified_resume(self, resid: Tensor, layer: int, logits: Tensor) -> str | None:
        """The first way to resume at ``layer`` that skips the earlier blocks and reproduces ``logits``."""
        skipped_ran: list[int] = []
        for name, resume in RESUME_WAYS.items():
            skipped_ran.clear()
            handles = [block.register_forward_pre_hook(lambda *_: skipped_ran.append(1))
                       for block in list(self.model.blocks)[:layer]]
            try:
                rerun = resume(self.model, resid, layer)
            except (NotImplementedError, TypeError, ValueError, RuntimeError, AttributeError):
                continue
            finally:
                for handle in handles:
                    handle.remove()
            if not skipped_ran and rerun.shape == logits.shape and torch.allclose(rerun, logits, atol=1e-4, rtol=1e-4):
                return name
        return None

    def run(self, tokens: Tensor, resid: dict[int, Tensor], start: int | None, hooks: list) -> Tensor:
        """Logits with ``hooks`` attached, from the cached residual at ``start`` where that is verified."""
        way = self.resume.get(start) if start is not None else None
        with self.model.hooks(fwd_hooks=hooks):
            if way is not None:
                return RESUME_WAYS[way](self.model, resid[start], start)
            return self.model(tokens)


def _start_at_layer(model: torch.nn.Module, resid: Tensor, layer: int) -> Tensor:
    return model(resid, start_at_layer=layer)


def _blocks_from(model: torch.nn.Module, resid: Tensor, layer: int) -> Tensor:
    """Blocks ``layer..``, the final norm and the unembedding, called directly (HF-style block calls)."""
    x = resid
    position_ids = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    for block in list(model.blocks)[layer:]:
        out = block(x, attention_mask=None, position_ids=position_ids)
        x = out[0] if isinstance(out, tuple) else out
    return model.unembed(model.ln_final(x))


RESUME_WAYS = {"start_at_layer": _start_at_layer, "blocks": _blocks_from}


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
    start = start_layer(list(group[0].hook_names))
    if len(group) == 1:  # nothing to stack: no copies of the batch, no slicing in the hooks
        patterns: dict[int, Tensor] = {}
        logits = runner.run(tokens, resid, start, [*per_proxy[0].items(), *capture_patterns(attn_layers, patterns)])
        recorders[0].patterns.update(patterns)
        return [(logits, recorders[0])]
    hooks = [(hook, stacked([fns[hook] for fns in per_proxy])) for hook in group[0].hook_names]
    stacked_patterns: dict[int, Tensor] = {}
    hooks += capture_patterns(attn_layers, stacked_patterns)
    copies = len(group)
    stacked_resid = {layer: r.repeat(copies, *([1] * (r.ndim - 1))) for layer, r in resid.items() if layer == start}
    logits = runner.run(tokens.repeat(copies, 1), stacked_resid, start, hooks).chunk(copies, dim=0)
    for layer, pattern in stacked_patterns.items():
        for recorder, part in zip(recorders, pattern.chunk(copies, dim=0), strict=True):
            recorder.patterns[layer] = part
    return list(zip(logits, recorders, strict=True))
