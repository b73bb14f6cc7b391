"""Training to convergence (minutes): the quick Dyck preset reaches 99% test accuracy."""

from __future__ import annotations

from illusion_probe.models import ModelConfig, build_model
from illusion_probe.tasks.dyck import DyckConfig, DyckTask
from illusion_probe.training import TrainConfig, accuracy, train


def test_quick_preset_trains_to_99_percent() -> None:
    task = DyckTask(DyckConfig.preset("quick"))
    splits = task.make_splits(seed=0)
    model = build_model(task, ModelConfig(n_layers=2, d_model=64, n_heads=4))
    cfg = TrainConfig(lr=3e-3, max_steps=3000, warmup_steps=200, target_acc=0.99, progress=False)
    history = train(model, splits, cfg, task=task)
    assert accuracy(model, splits["test"], task.answer_ids) >= 0.99, history[-1]
