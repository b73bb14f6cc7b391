"""Sparse autoencoders: they learn a sparse dictionary, are reproducible, fit per head as each head alone,
share one sample across a sweep, save and load exactly, and refuse bad settings before any training."""

from __future__ import annotations

import pytest
import torch

import illusion_probe as ip
from illusion_probe.sweeps import sweep_simplifiers


def _sparse_data(n: int = 4000, d: int = 12, atoms: int = 24, active: int = 2, seed: int = 0) -> torch.Tensor:
    """``[n, d]`` samples, each a positive combination of ``active`` of ``atoms`` unit directions."""
    generator = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(atoms, d, generator=generator)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    chosen = torch.rand(n, atoms, generator=generator).topk(active, dim=1).indices
    codes = torch.zeros(n, atoms).scatter(1, chosen, 1 + torch.rand(n, active, generator=generator))
    return codes @ dictionary


def _explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float(1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


@pytest.mark.parametrize(("options", "floor"), [({"k": 2}, 0.9), ({"architecture": "relu", "lr": 3e-3}, 0.9)],
                         ids=["topk", "relu"])
def test_an_sae_recovers_sparse_structure_that_low_rank_projection_misses(options: dict, floor: float) -> None:
    x = _sparse_data()
    sae = ip.SAE(32, epochs=30, **options).fit(x)
    codes = sae.encode(x.unsqueeze(1))[:, 0]
    assert _explained_variance(x, sae(x)) > floor
    assert _explained_variance(x, sae(x)) > _explained_variance(x, ip.PCA(2).fit(x)(x)) + 0.2
    if "k" in options:
        assert int((codes > 0).sum(1).max()) <= 2
    assert torch.allclose(sae.W_dec[0].norm(dim=1), torch.ones(32), atol=1e-5)  # unit decoder rows


def test_fits_are_reproducible_and_per_head_equals_each_head_alone() -> None:
    heads = torch.stack([_sparse_data(1000, 6, seed=s) for s in range(3)], dim=1)  # [n, head, d_head]
    together = ip.SAE(8, k=2, epochs=3, per_head=True).fit(heads)
    again = ip.SAE(8, k=2, epochs=3, per_head=True).fit(heads)
    assert all(torch.equal(a, b) for a, b in zip(together.tensors().values(), again.tensors().values(), strict=True))
    for h in range(3):
        alone = ip.SAE(8, k=2, epochs=3).fit(heads[:, h])
        assert all(torch.equal(together.tensors()[name][h], alone.tensors()[name][0]) for name in alone.tensors())


def test_the_auxiliary_loss_trains_only_dead_latents_on_the_residual_error() -> None:
    generator = torch.Generator().manual_seed(0)
    decoder = torch.randn(6, 4, generator=generator).requires_grad_(True)
    pre = torch.randn(10, 6, generator=generator).requires_grad_(True)
    error = torch.randn(10, 4, generator=generator)
    dead = torch.tensor([False, False, False, False, True, True])
    ip.SAE(6, k=2)._penalty(torch.relu(pre), pre, error, dead, decoder, 10).backward()
    assert decoder.grad is not None and pre.grad is not None
    assert decoder.grad[~dead].abs().sum() == 0 and decoder.grad[dead].abs().sum() > 0  # only dead rows learn
    assert pre.grad[:, ~dead].abs().sum() == 0
    switched_off = ip.SAE(6, k=2, aux_coefficient=0)._penalty(torch.relu(pre), pre, error, dead, decoder, 10)
    assert float(switched_off) == 0 and not switched_off.requires_grad


def test_a_width_sweep_shares_one_sample_and_round_trips(native_bridge, random_train_split, tmp_path) -> None:
    hook = "blocks.0.hook_resid_post"
    wanted = sweep_simplifiers([hook], "sae", (8, 16), k=4, epochs=2)
    together = ip.fit_proxies(native_bridge, wanted, random_train_split)
    for name, simplifiers in wanted.items():
        assert together[name].same_edit(ip.fit_proxy(native_bridge, simplifiers, random_train_split, name=name))
    proxy = together["sae(16)@" + hook]
    proxy.save(tmp_path / "sae")
    loaded = ip.Proxy.load(tmp_path / "sae")
    tokens = random_train_split.tokens[:4]
    with proxy.applied(native_bridge):
        before = native_bridge(tokens)
    with loaded.applied(native_bridge):
        assert torch.equal(native_bridge(tokens), before)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: ip.SAE(4, k=8), "k=8 exceeds d_sae=4"),
    (lambda: ip.SAE(0), "d_sae must be a positive integer"),
    (lambda: ip.SAE(8, architecture="relu", l1_coefficient=-1.0), "l1_coefficient must be a number >= 0"),
    (lambda: ip.SAE(8, architecture="gated"), "architecture must be one of"),
    (lambda: ip.SAE(8).fit(torch.full((10, 4), float("nan"))), "contain NaN or inf"),
])
def test_bad_settings_are_one_line_errors_before_training(make, message: str) -> None:
    with pytest.raises(ip.IllusionProbeError, match=message) as caught:
        make()
    assert "\n" not in str(caught.value)
