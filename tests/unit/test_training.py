"""Training loop: masked loss, schedule, per-split evaluation, validation, both backends."""

from __future__ import annotations

import json

import pytest
import torch

from illusion_probe.errors import IllusionProbeError
from illusion_probe.models import ModelConfig, ModelSizes, available_backends, build_model
from illusion_probe.tasks.base import Split, SplitSet
from illusion_probe.tasks.dyck import DyckConfig, DyckTask
from illusion_probe.training import TrainConfig, accuracy, predict, train

TASK = DyckTask(DyckConfig(k=2, m=3, max_len=16, min_len=5, n_train=200, n_test=40, n_ood=30, ood_max_len=20,
                           ood_max_depth=4))
TINY = ModelConfig(n_layers=1, d_model=32, n_heads=2, d_mlp=64, seed=0)
FAST = TrainConfig(lr=3e-3, batch_size=16, max_steps=30, warmup_steps=3, eval_every=10, eval_batch_size=64,
                   eval_sequences=40, progress=False)


@pytest.fixture(scope="module")
def splits() -> SplitSet:
    return TASK.make_splits(seed=0)


@pytest.mark.parametrize("backend", available_backends())
def test_a_few_steps_lower_the_loss_and_record_every_split(splits, backend: str) -> None:
    model = build_model(TASK, TINY, backend=backend)
    before = torch.random.get_rng_state()
    history = train(model, splits, FAST, task=TASK)
    assert torch.equal(before, torch.random.get_rng_state())
    assert [r["step"] for r in history] == [10, 20, 30]
    assert set(history[0]) == {"step", "loss", "lr", "train_time_s", "wall_time_s", "acc"}
    assert set(history[0]["acc"]) == set(splits)
    assert all(0 <= v <= 1 for r in history for v in r["acc"].values())
    assert history[-1]["loss"] < history[0]["loss"]
    assert not model.training
    json.dumps(history)


def test_same_seed_same_history(splits) -> None:
    runs = [train(build_model(TASK, TINY), splits, FAST, task=TASK) for _ in range(2)]
    assert [r["loss"] for r in runs[0]] == [r["loss"] for r in runs[1]]


def test_early_stop_at_target_accuracy(splits) -> None:
    cfg = TrainConfig(**{**FAST.__dict__, "target_acc": 0.01})
    assert [r["step"] for r in train(build_model(TASK, TINY), splits, cfg, task=TASK)] == [10]


@pytest.mark.parametrize("stop_split", ["val", "test"])
def test_early_stop_watches_its_split(splits, stop_split: str) -> None:
    full = train(build_model(TASK, TINY), splits, FAST, task=TASK)
    target = max(record["acc"][stop_split] for record in full[:-1])
    cfg = TrainConfig(**{**FAST.__dict__, "target_acc": target, "stop_split": stop_split})
    first = next(r["step"] for r in full if r["acc"][stop_split] >= target)
    assert [r["step"] for r in train(build_model(TASK, TINY), splits, cfg, task=TASK)][-1] == first


def test_plain_token_split_scores_the_whole_vocabulary() -> None:
    tokens = torch.randint(0, 6, (20, 8), generator=torch.Generator().manual_seed(0))
    plain = SplitSet([Split.from_tokens(tokens, "train", name="train")])
    model = build_model(ModelSizes(d_vocab=6, n_ctx=8), TINY)
    history = train(model, plain, TrainConfig(**{**FAST.__dict__, "max_steps": 5, "eval_every": 5}))
    assert set(history[-1]["acc"]) == {"train"}


def test_predict_takes_the_argmax_over_answer_ids() -> None:
    logits = torch.tensor([[[0.0, 9.0, 1.0, 2.0]]])
    assert predict(logits).tolist() == [[1]]
    assert predict(logits, torch.tensor([2, 3])).tolist() == [[3]]


def test_accuracy_counts_only_scored_positions(splits) -> None:
    model = build_model(TASK, TINY)
    split = splits["ood_longer"]  # ragged lengths: padding must not count
    with torch.no_grad():
        hits = predict(model(split.tokens), TASK.answer_ids) == split.targets
    expected = hits[split.eval_mask].double().mean().item()
    assert accuracy(model, split, TASK.answer_ids, batch_size=7) == pytest.approx(expected, abs=1e-12)
    assert 0.0 < split.eval_mask.float().mean() < split.real_mask.float().mean()


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    for schedule in ("cosine", "linear"):
        cfg = TrainConfig(lr=1.0, max_steps=101, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1)
        assert cfg.lr_at(0) == pytest.approx(0.1)
        assert cfg.lr_at(9) == pytest.approx(1.0)
        assert cfg.lr_at(100) == pytest.approx(0.1)
        assert all(cfg.lr_at(s) >= cfg.lr_at(s + 1) for s in range(10, 100))


def test_model_context_shorter_than_the_splits_is_refused(splits) -> None:
    short = build_model(ModelSizes(d_vocab=TASK.d_vocab, n_ctx=8), TINY)
    with pytest.raises(IllusionProbeError, match="n_ctx=8 is shorter"):
        train(short, splits, FAST, task=TASK)


@pytest.mark.parametrize(
    ("make_splits", "cfg", "message"),
    [
        (lambda s: SplitSet([s["test"]]), FAST, "needs a 'train' split"),
        (lambda s: SplitSet([s["train"], s["test"]]), TrainConfig(target_acc=0.9, progress=False),
         "watches the split 'val', which the splits lack"),
    ],
)
def test_bad_splits_are_refused(splits, make_splits, cfg, message: str) -> None:
    with pytest.raises(IllusionProbeError, match=message):
        train(build_model(TASK, TINY), make_splits(splits), cfg, task=TASK)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(splits) -> None:
    with pytest.raises(IllusionProbeError, match="no CUDA GPU"):
        build_model(TASK, ModelConfig(**{**TINY.to_dict(), "device": "cuda"}))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"warmup_steps": 10, "max_steps": 10}, "warmup_steps must be in"),
        ({"schedule": "step"}, "schedule 'step' is unknown"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"target_acc": 1.5}, "target_acc must be in"),
        ({"min_lr_ratio": 2.0}, "min_lr_ratio must be in"),
    ],
)
def test_bad_train_config_is_one_line_error(change: dict, message: str) -> None:
    with pytest.raises(IllusionProbeError, match=message) as info:
        TrainConfig(**change)
    assert "\n" not in str(info.value)
