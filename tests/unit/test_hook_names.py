"""Hook-name resolution: legacy and canonical names, and typos with suggestions."""

from __future__ import annotations

import pytest

import illusion_probe as ip
from illusion_probe.errors import IllusionProbeError
from illusion_probe.hook_names import is_attention_pattern, is_per_head, layer_of

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
