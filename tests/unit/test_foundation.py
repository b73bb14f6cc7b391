"""Foundation: model factory on every backend, checkpoints, config validation, import hygiene."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import illusion_probe as ip
from illusion_probe.backends import Backend
from illusion_probe.checkpoint import FORMAT_VERSION
from illusion_probe.errors import ArtifactError, IllusionProbeError

SIZES = ip.ModelSizes(d_vocab=11, n_ctx=16)
TINY = ip.ModelConfig(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=7)
BACKENDS = ip.available_backends()


def tokens(batch: int = 3) -> torch.Tensor:
    return torch.randint(0, SIZES.d_vocab, (batch, SIZES.n_ctx), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_shape_and_seeded_weights(backend: str) -> None:
    model = ip.build_model(SIZES, TINY, backend=backend)
    assert model(tokens()).shape == (3, SIZES.n_ctx, SIZES.d_vocab)
    same = ip.build_model(SIZES, TINY, backend=backend).state_dict()
    other = ip.build_model(SIZES, ip.ModelConfig(**{**TINY.to_dict(), "seed": 8}), backend=backend).state_dict()
    weights = model.state_dict()
    assert all(torch.equal(weights[k], same[k]) for k in weights)
    assert any(not torch.equal(weights[k], other[k]) for k in weights if weights[k].is_floating_point())


@pytest.mark.parametrize("backend", BACKENDS)
def test_build_model_leaves_global_rng_alone(backend: str) -> None:
    before = torch.random.get_rng_state()
    ip.build_model(SIZES, TINY, backend=backend)
    assert torch.equal(before, torch.random.get_rng_state())


def test_auto_backend_follows_transformer_lens_major() -> None:
    model = ip.build_model(SIZES, TINY)
    assert Backend.of(model).kind == BACKENDS[0]


def test_sizes_come_from_the_task_object() -> None:
    class FakeTask:
        d_vocab = 5
        n_ctx = 9

    model = ip.build_model(FakeTask(), TINY)
    assert (model.cfg.d_vocab, model.cfg.n_ctx) == (5, 9)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"d_model": 30, "n_heads": 4}, "not divisible"),
        ({"n_layers": 0}, "n_layers must be a positive"),
        ({"d_model": -8}, "d_model must be a positive"),
        ({"d_mlp": 0}, "d_mlp must be a positive"),
        ({"act_fn": "swish2"}, "act_fn"),
        ({"normalization": "batch"}, "normalization"),
        ({"positional_embedding_type": "alibi9"}, "positional_embedding_type"),
        ({"n_layers": 2.5}, "n_layers must be an integer"),
    ],
)
def test_bad_model_config_is_one_line_error(change: dict, message: str) -> None:
    with pytest.raises(IllusionProbeError, match=message) as err:
        ip.ModelConfig(**change)
    assert "\n" not in str(err.value)


def test_unknown_backend_is_one_line_error() -> None:
    with pytest.raises(IllusionProbeError, match="unknown backend"):
        ip.build_model(SIZES, TINY, backend="jax")


@pytest.mark.skipif("hooked" in BACKENDS, reason="HookedTransformer exists in this TransformerLens")
def test_hooked_backend_refused_on_transformer_lens_4() -> None:
    with pytest.raises(IllusionProbeError, match="backend='bridge'"):
        ip.build_model(SIZES, TINY, backend="hooked")


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_round_trip_is_bit_identical(backend: str, tmp_path) -> None:
    model = ip.build_model(SIZES, TINY, backend=backend)
    with torch.no_grad():  # move weights off their initial values so a fresh build would differ
        for param in model.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    path = ip.save_checkpoint(tmp_path / "ckpt", model, extra={"note": "hello"})
    loaded, task = ip.load_checkpoint(path)
    assert task is None
    assert Backend.of(loaded).kind == backend
    with torch.no_grad():
        assert torch.equal(model(tokens()), loaded(tokens()))
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["backend"] == backend
    assert meta["model_config"] == TINY.to_dict()
    assert meta["sizes"] == {"d_vocab": SIZES.d_vocab, "n_ctx": SIZES.n_ctx}
    assert meta["extra"] == {"note": "hello"}
    assert meta["versions"]["transformer_lens"] and meta["versions"]["torch"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging directory left behind


@pytest.fixture
def checkpoint(tmp_path):
    return ip.save_checkpoint(tmp_path / "ckpt", ip.build_model(SIZES, TINY))


def _assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    text = str(err.value)
    assert "\n" not in text
    for fragment in fragments:
        assert fragment in text


def test_truncated_weights(checkpoint) -> None:
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ArtifactError) as err:
        ip.load_checkpoint(checkpoint)
    _assert_one_line(err, "model.safetensors", "corrupted or truncated")


def test_corrupted_weights(checkpoint) -> None:
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(ArtifactError) as err:
        ip.load_checkpoint(checkpoint)
    _assert_one_line(err, "model.safetensors")


def test_missing_metadata(checkpoint) -> None:
    (checkpoint / "metadata.json").unlink()
    with pytest.raises(ArtifactError) as err:
        ip.load_checkpoint(checkpoint)
    _assert_one_line(err, "metadata.json", "missing")


def test_malformed_metadata(checkpoint) -> None:
    (checkpoint / "metadata.json").write_text("{not json")
    with pytest.raises(ArtifactError) as err:
        ip.load_checkpoint(checkpoint)
    _assert_one_line(err, "metadata.json", "not valid JSON")


def _edit_metadata(checkpoint, **changes) -> None:
    file = checkpoint / "metadata.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def test_unknown_format_version(checkpoint) -> None:
    _edit_metadata(checkpoint, format_version=99)
    with pytest.raises(ArtifactError) as err:
        ip.load_checkpoint(checkpoint)
    _assert_one_line(err, "metadata.json", "unknown checkpoint format version 99")


def test_unavailable_backend(checkpoint) -> None:
    missing = "hooked" if "hooked" not in BACKENDS else "imaginary"
    _edit_metadata(checkpoint, backend=missing)
    with pytest.raises(ArtifactError) as err:
        ip.load_checkpoint(checkpoint)
    _assert_one_line(err, "metadata.json", missing)


def test_missing_directory(tmp_path) -> None:
    with pytest.raises(ArtifactError, match="no checkpoint directory"):
        ip.load_checkpoint(tmp_path / "nope")


def test_save_refuses_models_not_built_here() -> None:
    class Plain(torch.nn.Linear):
        pass

    with pytest.raises(IllusionProbeError, match="build_model"):
        ip.save_checkpoint("unused", Plain(2, 2))


def test_import_is_light_and_side_effect_free() -> None:
    code = (
        "import sys, random; random.seed(1); a = random.random(); random.seed(1);"
        "import illusion_probe;"
        "assert random.random() == a, 'global RNG touched';"
        "heavy = [m for m in ('torch', 'transformer_lens', 'plotly', 'numpy', 'sklearn') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


def test_lazy_exports_match_the_imports_type_checkers_see() -> None:
    """``_EXPORTS`` (what ``ip.X`` loads) and the ``TYPE_CHECKING`` imports (what editors see) name the same
    objects from the same modules, and every export resolves to an object its module defines."""
    import ast

    tree = ast.parse(Path(ip.__file__).read_text())
    guarded = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    seen = {alias.name: node.module for node in guarded.body if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert seen == ip._EXPORTS
    for name, module in ip._EXPORTS.items():
        assert getattr(ip, name) is getattr(importlib.import_module(module), name)


def test_public_names_resolve() -> None:
    foundation = ["ModelConfig", "ModelSizes", "build_model", "save_checkpoint", "load_checkpoint", "Split", "SplitSet"]
    for name in foundation:
        assert getattr(ip, name).__doc__
    with pytest.raises(AttributeError):
        ip.not_a_name  # noqa: B018


def test_exported_functions_are_not_shadowed_by_submodules() -> None:
    import illusion_probe.pipeline  # noqa: F401 - imports every submodule the package has

    for name in ("evaluate", "sweep", "train", "build_model", "fit_proxy", "write_report"):
        assert callable(getattr(ip, name)) and not isinstance(getattr(ip, name), type(ip)), name


def test_cli_info_runs(capsys) -> None:
    from illusion_probe.cli import main

    assert main(["info"]) == 0
    assert "transformer_lens" in capsys.readouterr().out


def test_artefacts_get_ordinary_permissions(tmp_path) -> None:
    from illusion_probe.artifacts import atomic_directory, write_json, write_tensors

    with atomic_directory(tmp_path / "dir") as staging:
        write_json(staging / "meta.json", {"a": 1})
        write_tensors(staging / "t.safetensors", {"x": torch.zeros(2)})
    ip.save_checkpoint(tmp_path / "checkpoint", ip.build_model(SIZES, TINY))
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "dir").stat().st_mode & 0o777 == 0o777 & ~mask
    for file in ("dir/meta.json", "dir/t.safetensors", "checkpoint/model.safetensors"):
        assert (tmp_path / file).stat().st_mode & 0o777 == 0o666 & ~mask, file  # 0644 under the usual umask 022
