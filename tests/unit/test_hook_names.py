"""Hook-name resolution: legacy and canonical names, and typos with suggestions."""

from __future__ import annotations

import pytest
import torch

import illusion_probe as ip
from illusion_probe.backends import Backend
from illusion_probe.errors import IllusionProbeError
from illusion_probe.hook_names import (
    blocks_needed,
    final_norm_in,
    is_attention_pattern,
    is_per_head,
    layer_of,
    resid_post,
    resid_pre,
)

SIZES = ip.ModelSizes(d_vocab=7, n_ctx=8)


@pytest.fixture(params=ip.available_backends())
def model(request):
    return ip.build_model(SIZES, ip.ModelConfig(n_layers=2, d_model=16, n_heads=2), backend=request.param)


def test_legacy_names_resolve(model) -> None:
    canonical = ip.resolve_hook_name(model, "blocks.1.attn.hook_k")
    assert canonical in model.hook_dict
    assert ip.resolve_hook_name(model, canonical) == canonical


def test_typo_lists_closest_names(model) -> None:
    with pytest.raises(IllusionProbeError, match="did you mean") as err:
        ip.resolve_hook_name(model, "blocks.1.attn.hook_kk")
    assert "blocks.1.attn.hook_k" in str(err.value)
    assert "\n" not in str(err.value)


def test_name_classifiers() -> None:
    assert is_per_head("blocks.1.attn.hook_k") and is_per_head("blocks.0.attn.q.hook_out")
    assert is_per_head("blocks.0.attn.hook_z") and is_per_head("blocks.0.attn.o.hook_in")
    assert not is_per_head("blocks.0.hook_resid_post") and not is_per_head("blocks.0.attn.hook_pattern")
    assert is_attention_pattern("blocks.1.attn.hook_pattern")
    assert layer_of("blocks.3.hook_resid_pre") == 3 and layer_of("hook_embed") is None


def test_blocks_a_pass_needs() -> None:
    assert blocks_needed(["hook_embed", "rotary_emb.hook_cos"], 2) == 0
    assert blocks_needed(["hook_embed", resid_pre(0)], 2) == 1
    assert blocks_needed([resid_post(1)], 2) == blocks_needed([final_norm_in()], 2) == 2  # the final residual
    assert blocks_needed([resid_pre(0), "ln_final.hook_normalized"], 2) is None
    assert blocks_needed(["hook_unembed"], 2) is None and blocks_needed(["unembed.hook_in"], 2) is None


def _fires(model, name: str, stopped: bool) -> bool | None:
    """Whether hook ``name`` fires in the pass ``Backend.run`` stops for it (or a whole pass); ``None`` where the
    model refuses the hook (a bridge leaves hook_mlp_in and a few others off unless enabled)."""
    fired: list[int] = []
    hooks = [(name, lambda act, hook: fired.append(1))]
    tokens = torch.tensor([[1, 2, 3]])
    try:
        with torch.no_grad():
            if stopped:
                Backend.of(model).run(tokens, None, hooks)
            else:
                with model.hooks(fwd_hooks=hooks):
                    model(tokens)
    except ValueError:
        return None
    return bool(fired)


def test_a_pass_stopped_for_a_hook_still_reaches_it(model) -> None:
    for name in model.hook_dict:
        assert _fires(model, name, stopped=True) == _fires(model, name, stopped=False), name
