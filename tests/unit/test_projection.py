"""Keys and queries on the train split's top two principal components: a typed, saved artefact."""

from __future__ import annotations

import json

import pytest
import torch

import illusion_probe as ip
from illusion_probe.analysis.projection import Projection, key_query_projection
from illusion_probe.errors import ArtifactError, IllusionProbeError


@pytest.fixture(scope="module")
def model_and_splits():
    sizes = ip.ModelSizes(d_vocab=9, n_ctx=10)
    model = ip.build_model(sizes, ip.ModelConfig(n_layers=2, d_model=16, n_heads=2, seed=0))
    gen = torch.Generator().manual_seed(0)
    train = ip.Split.from_tokens(torch.randint(0, 9, (20, 10), generator=gen), "train", name="train")
    ood = ip.Split.from_tokens(torch.randint(0, 3, (20, 10), generator=gen), "ood", name="ood_x")
    return model, ip.SplitSet([train, ood])


def test_panels_per_split_and_kind_centred_on_train(model_and_splits) -> None:
    model, splits = model_and_splits
    out = key_query_projection(model, splits, layer=1, head=0, n_points=1000)
    kinds = {(p.split, p.kind) for p in out.panels}
    assert kinds == {(s, k) for s in ("train", "ood_x") for k in ("query", "key")}
    train_key = next(p for p in out.panels if p.split == "train" and p.kind == "key")
    assert len(train_key.x) == 200  # every real token, since n_points exceeds them
    # The components are fit on train, so train's projections are centred there.
    assert abs(sum(train_key.x) / 200) < 1e-3 and abs(sum(train_key.y) / 200) < 1e-3


def test_json_round_trip_and_damaged_files(model_and_splits, tmp_path) -> None:
    model, splits = model_and_splits
    out = key_query_projection(model, splits, layer=1, head=1, n_points=5, seed=3)
    assert Projection.from_json(out.to_json(tmp_path / "p.json")) == out
    data = json.loads((tmp_path / "p.json").read_text())
    (tmp_path / "bad.json").write_text(json.dumps({**data, "panels": [{"split": "train"}]}))
    with pytest.raises(ArtifactError, match="malformed projection"):
        Projection.from_json(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({**data, "kind": "proxy"}))
    with pytest.raises(ArtifactError, match="not an illusion-probe projection"):
        Projection.from_json(tmp_path / "other.json")


def test_needs_a_train_split(model_and_splits) -> None:
    model, splits = model_and_splits
    with pytest.raises(IllusionProbeError, match="'train' split"):
        key_query_projection(model, {"ood_x": splits["ood_x"]}, layer=1, head=0)
