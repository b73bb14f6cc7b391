"""Study configs: shipped presets, a user's TOML file, --set overrides, and one-line errors for mistakes."""

from __future__ import annotations

import pytest

import illusion_probe as ip
from illusion_probe.config import apply_overrides, parse_value, preset_names
from illusion_probe.study import load_study


def test_presets_live_once_as_toml() -> None:
    assert preset_names("dyck") == ["paper", "quick", "quick_long", "tiny"] and preset_names("code") == ["medium", "paper", "quick", "tiny"]
    study = load_study("dyck", "quick")
    assert study.task == ip.DyckConfig.preset("quick") and study.task_kind == "dyck"
    assert isinstance(study.build_task(), ip.DyckTask)
    assert study.train.target_acc == 0.995 and study.proxies.kq_pca_sizes == (1, 2, 4, 8, 16)


def test_a_user_file_then_set_overrides_replace_single_settings(tmp_path) -> None:
    config = tmp_path / "mine.toml"
    config.write_text('[train]\nlr = 5e-4\n\n[proxies]\nkmeans_sizes = [4, 8]\n\n[task]\nn_train = 500\n')
    study = load_study("dyck", "tiny", config, ["train.lr=1e-3", "model.act_fn=gelu", "evaluation.ablation=\"zero\""])
    assert study.train.lr == 1e-3  # --set comes last
    assert study.proxies.kmeans_sizes == (4, 8) and study.task.n_train == 500
    assert study.model.act_fn == "gelu" and study.evaluation.ablation == "zero"
    assert study.train.max_steps == 20  # untouched settings keep the preset's values
    assert str(config) in study.name and "--set" in study.name


@pytest.mark.parametrize(
    ("file_text", "overrides", "message"),
    [
        ("", ["train.lr=fast"], "TrainConfig.lr must be a number, got 'fast'"),
        ("", ["train.lrr=1e-3"], "unknown setting 'lrr'; did you mean 'lr'?"),
        ("", ["trian.lr=1e-3"], "unknown section 'trian'; did you mean 'train'?"),
        ("", ["train.lr"], "write section.key=value"),
        ("[probe]\nn_boot = 5\n", [], "unknown table(s) ['probe']"),
        ("[task]\nkind = \"code\"\n", [], "[task] kind is 'code' but the command runs 'dyck'"),
        ("[train\nlr = 1\n", [], "is not valid TOML"),
        ("lr = 1\n", [], "'lr' must be a table"),
        ("", ["proxies.kq_pca_sizes=[-1, 2]"], "proxies.kq_pca_sizes must be distinct positive integers"),
        ("", ["proxies.kmeans_sizes=[0, 4]"], "proxies.kmeans_sizes must be distinct positive integers"),
        ("", ["proxies.sae_sizes=[8, 8]"], "proxies.sae_sizes must be distinct positive integers"),
        ("", ["proxies.dictionary_k=16"], "proxies.dictionary_k=16 exceeds the narrowest dictionary (d_sae=8)"),
        ("", ["proxies.dictionary_epochs=0"], "proxies.dictionary_epochs must be >= 1"),
        ("", ["evaluation.ablation=median"], "evaluation.ablation must be one of"),
        ("", ["evaluation.difficulty_bins=-1"], "evaluation.difficulty_bins must be >= 0"),
        ("", ["evaluation.n_boot=-5"], "evaluation.n_boot must be >= 0"),
        ("", ["evaluation.batch_size=0"], "evaluation.batch_size must be >= 1"),
        ("", ["evaluation.max_sequences=0"], "evaluation.max_sequences must be >= 1"),
        ("", ["proxies.n_fit_sequences=0"], "proxies.n_fit_sequences must be >= 1"),
        ("", ["projection.points=-1"], "projection.points must be >= 1"),
        ("", ["model.n_heads=3"], "not divisible"),
        ("", ["task.k=0"], "DyckConfig.k must be >= 1"),
    ],
)
def test_mistakes_are_one_line_errors(tmp_path, file_text: str, overrides: list[str], message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(file_text)
    with pytest.raises(ip.IllusionProbeError) as err:
        load_study("dyck", "tiny", config, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_config_file_and_unknown_task(tmp_path) -> None:
    with pytest.raises(ip.IllusionProbeError, match="config file .* not found"):
        load_study("dyck", "tiny", tmp_path / "nope.toml")
    with pytest.raises(ip.IllusionProbeError, match="unknown task 'dick'; did you mean 'dyck'"):
        load_study("dick", "tiny")


def test_set_values_are_toml_or_plain_strings() -> None:
    assert parse_value("1e-3") == 1e-3 and parse_value("[1, 2]") == [1, 2] and parse_value("true") is True
    assert parse_value("gelu") == "gelu" and parse_value('"x y"') == "x y"
    assert apply_overrides({"train": {"lr": 1}}, ["train.lr=2"], ["train"]) == {"train": {"lr": 2}}


def test_cross_field_checks_need_only_the_model_shape(tmp_path) -> None:
    study = load_study("dyck", "tiny", None, ["proxies.resid_pca_sizes=[1, 99]"])
    with pytest.raises(ip.IllusionProbeError, match="rank 99 above the residual stream's dimension d_model=16"):
        ip.pipeline.prepare(study, tmp_path / "o", device="cpu")
    study = load_study("dyck", "tiny", None, ["proxies.layers=[5]"])
    with pytest.raises(ip.IllusionProbeError, match="proxies.layers has 5, outside a 2-layer model"):
        ip.pipeline.prepare(study, tmp_path / "o", device="cpu")
    study = load_study("dyck", "tiny", None, ["model.attn_only=true"])
    with pytest.raises(ip.IllusionProbeError, match="model.attn_only = true leaves no MLP to replace"):
        ip.pipeline.prepare(study, tmp_path / "o", device="cpu")
