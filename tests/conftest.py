"""Shared fixtures: one tiny random model per family, built in milliseconds with no network.

Families: ``hooked_transformer`` (TransformerLens 3.x only), ``native_bridge``
(``TransformerBridge.boot_native``) and ``hf_gpt2_bridge`` (a bridge wrapping a
random Hugging Face GPT-2 saved to a temp dir). All three share the same sizes
(``TINY_SIZES``, ``TINY_CONFIG``), so a proxy fit on one has the hook shapes of
the others. ``model_family`` is parametrised over the three.
"""

from __future__ import annotations

import pytest
import torch

from illusion_probe.models import ModelConfig, ModelSizes, available_backends, build_model
from illusion_probe.tasks.base import Split

_TIERS = {"integration": pytest.mark.integration, "slow": pytest.mark.slow}


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread, as the CLI's default: the models are tiny, and a busy machine is not slowed down."""
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests under ``tests/integration`` and ``tests/slow`` carry that tier's marker (``-m "not slow"`` works)."""
    for item in items:
        tier = item.path.parent.name
        if tier in _TIERS:
            item.add_marker(_TIERS[tier])


TINY_SIZES = ModelSizes(d_vocab=50, n_ctx=32)
TINY_CONFIG = ModelConfig(n_layers=2, d_model=32, n_heads=4, d_mlp=128, act_fn="gelu_new", seed=0)
MODEL_FAMILIES = ("hooked", "bridge", "bridge_hf")


@pytest.fixture(scope="session")
def hooked_transformer() -> torch.nn.Module:
    """A HookedTransformer; skipped where TransformerLens >= 4 removed it."""
    if "hooked" not in available_backends():
        pytest.skip("HookedTransformer needs TransformerLens < 4")
    return build_model(TINY_SIZES, TINY_CONFIG, backend="hooked")


@pytest.fixture(scope="session")
def native_bridge() -> torch.nn.Module:
    """A ``TransformerBridge.boot_native`` model."""
    return build_model(TINY_SIZES, TINY_CONFIG, backend="bridge")


@pytest.fixture(scope="session")
def hf_gpt2_bridge(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    """A bridge over a random HF GPT-2 saved locally; booted offline (no tokenizer needed)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.hf_models import boot

    folder = tmp_path_factory.mktemp("tiny_gpt2")
    config = GPT2Config(n_layer=TINY_CONFIG.n_layers, n_embd=TINY_CONFIG.d_model, n_head=TINY_CONFIG.n_heads,
                        vocab_size=TINY_SIZES.d_vocab, n_positions=TINY_SIZES.n_ctx)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        GPT2LMHeadModel(config).save_pretrained(folder)
    return boot(folder)


@pytest.fixture(params=MODEL_FAMILIES)
def model_family(request: pytest.FixtureRequest) -> torch.nn.Module:
    """Each model family in turn: ``hooked`` (skipped on TL 4), ``bridge``, ``bridge_hf``."""
    fixture = {"hooked": "hooked_transformer", "bridge": "native_bridge", "bridge_hf": "hf_gpt2_bridge"}
    return request.getfixturevalue(fixture[request.param])


@pytest.fixture(scope="session")
def editable_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    """A model whose attention patterns can be edited: HookedTransformer on TL 3.x, the native bridge on TL 4.x."""
    return request.getfixturevalue("hooked_transformer" if "hooked" in available_backends() else "native_bridge")


@pytest.fixture(scope="session")
def random_train_split() -> Split:
    """24 random sequences of 12 tokens with ragged right padding (pad id 0 never occurs as a real token)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, TINY_SIZES.d_vocab, (24, 12), generator=generator)
    lengths = torch.randint(4, 13, (24,), generator=generator)
    tokens[torch.arange(12) >= lengths[:, None]] = 0
    return Split.from_tokens(tokens, "train", name="train", pad_id=0)
