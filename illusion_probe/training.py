"""Train a hooked transformer on a task's ``train`` split, evaluating every split as it goes.

Masked next-token cross-entropy on real positions (:attr:`Split.lm_mask`), AdamW with linear
warm-up then cosine or linear decay to a floor, batch order from an explicit generator (global
RNGs are never touched). Works for ``HookedTransformer`` and ``TransformerBridge`` alike: the
model maps ``[batch, pos]`` tokens to ``[batch, pos, d_vocab]`` logits.

Under ``torchrun`` training is data-parallel: every process draws the same batch order, computes
the loss of every ``size``-th sequence of each batch as its share of the batch's mean, and the
gradients are summed across processes before clipping and the optimiser step, so every process
keeps the same weights. It is reproducible for a seed and a number of processes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from illusion_probe.backends import Backend
from illusion_probe.config import check_types
from illusion_probe.distributed import all_reduce, broadcast, sum_gradients, world
from illusion_probe.errors import require
from illusion_probe.tasks.base import Split, SplitSet, Task, as_split_set, check_tokens

SCHEDULES: tuple[str, ...] = ("cosine", "linear")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and evaluation settings for :func:`train`.

    Attributes:
        lr: peak learning rate, reached after warm-up.
        weight_decay: AdamW weight decay.
        batch_size: training sequences per step.
        max_steps: optimiser steps unless stopped early.
        warmup_steps: steps of linear warm-up from 0 to ``lr``.
        schedule: ``"cosine"`` or ``"linear"`` decay from ``lr`` to ``lr * min_lr_ratio`` at ``max_steps``.
        min_lr_ratio: the learning-rate floor as a fraction of ``lr``.
        grad_clip: clip the gradient norm to this; 0 disables clipping.
        eval_every: evaluate every split every this many steps (and after the last step).
        eval_batch_size: sequences per forward pass when evaluating.
        eval_sequences: sequences of each split used by evaluation during training (the first ones).
        target_acc: stop once accuracy on ``stop_split`` reaches this; ``None`` trains all ``max_steps``
            (a fixed budget, e.g. to train past the in-distribution plateau).
        stop_split: the split early stopping watches: ``"val"`` by default, so ``test`` is never used
            for a decision.
        seed: seeds the batch order.
        progress: show a progress bar.

    Training runs on the model's device (``ModelConfig.device``).
    """

    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 64
    max_steps: int = 3_000
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_batch_size: int = 500
    eval_sequences: int = 1_000
    target_acc: float | None = None
    stop_split: str = "val"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("batch_size", "max_steps", "eval_every", "eval_batch_size", "eval_sequences"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, f"TrainConfig.{name} must be a positive integer, got {value!r}")
        require(isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps < self.max_steps,
                f"TrainConfig.warmup_steps must be in [0, max_steps={self.max_steps}), got {self.warmup_steps!r}")
        require(self.lr > 0, f"TrainConfig.lr must be positive, got {self.lr}")
        require(self.weight_decay >= 0, f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        require(self.schedule in SCHEDULES, f"TrainConfig.schedule {self.schedule!r} is unknown; choose one of {SCHEDULES}")
        require(0 <= self.min_lr_ratio <= 1, f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        require(self.grad_clip >= 0, f"TrainConfig.grad_clip must be >= 0, got {self.grad_clip}")
        require(self.target_acc is None or 0 < self.target_acc <= 1,
                f"TrainConfig.target_acc must be in (0, 1] or None, got {self.target_acc}")

    def lr_at(self, step: int) -> float:
        """Learning rate for optimiser step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - 1 - self.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.schedule == "cosine" else 1 - progress
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * shape)


def predict(
    logits: Float[Tensor, "batch pos d_vocab"], answer_ids: Int[Tensor, " n_answers"] | None = None
) -> Int[Tensor, "batch pos"]:
    """Predicted token ids: argmax over ``answer_ids`` (over the whole vocabulary when ``None``)."""
    if answer_ids is None:
        return logits.argmax(dim=-1)
    answer_ids = answer_ids.to(logits.device)
    return answer_ids[logits[..., answer_ids].argmax(dim=-1)]


@torch.no_grad()
def accuracy(
    model: torch.nn.Module, split: Split, answer_ids: Tensor | None = None, batch_size: int = 500,
    max_sequences: int | None = None,
) -> float:
    """Share of scored positions (``split.eval_mask``) where :func:`predict` equals the target."""
    backend = Backend.of(model)
    subset = split if max_sequences is None else split.head(max_sequences)
    here = world()
    if here.is_distributed:  # each process scores every size-th sequence
        subset = subset.select(here.interleaved(len(subset)))
    counts = torch.zeros(2, dtype=torch.float64)  # correct, scored
    for batch in subset.batches(batch_size):
        batch = batch.to(backend.device)
        hit = predict(backend.logits(batch.tokens, batch.real_mask), answer_ids) == batch.targets
        counts += torch.tensor([int((hit & batch.eval_mask).sum()), int(batch.eval_mask.sum())])
    correct, total = all_reduce(counts).tolist()
    return correct / max(total, 1)


def lm_loss(backend: Backend, batch: Split, n_predicted: int | None = None) -> Tensor:
    """Next-token cross-entropy over ``batch.lm_mask``: the mean, or the sum divided by ``n_predicted`` (the
    predicted tokens of the whole batch, of which this process holds a share)."""
    logits = backend.logits(batch.tokens, batch.real_mask)
    mask = batch.lm_mask[:, :-1]
    predicted, targets = logits[:, :-1][mask], batch.tokens[:, 1:][mask]
    if n_predicted is None:
        return F.cross_entropy(predicted, targets)
    return F.cross_entropy(predicted, targets, reduction="sum") / n_predicted


def check_splits(splits: SplitSet, cfg: TrainConfig) -> None:
    """Raise unless ``splits`` hold the ``train`` split and the split early stopping watches (no model needed)."""
    require("train" in splits, f"train needs a 'train' split; got {', '.join(splits)}")
    require(cfg.target_acc is None or cfg.stop_split in splits,
            f"TrainConfig.target_acc watches the split {cfg.stop_split!r}, which the splits lack "
            f"({', '.join(splits)}); set stop_split to one of them")


def _check(model: torch.nn.Module, splits: SplitSet, cfg: TrainConfig, task: Task | None) -> None:
    check_splits(splits, cfg)
    backend = Backend.of(model)
    require(splits.max_len <= backend.n_ctx,
            f"the model's n_ctx={backend.n_ctx} is shorter than the longest sequence in the splits "
            f"({splits.max_len}); build the model from the task so n_ctx fits")
    for split in splits.values():
        check_tokens(split.tokens, backend.d_vocab, backend.n_ctx, f"split {split.name!r}")
    if task is not None:
        require(int(task.answer_ids.max()) < backend.d_vocab_out,
                f"the task's answer ids exceed the model's output vocabulary ({backend.d_vocab_out})")


def train(model: torch.nn.Module, splits: SplitSet, cfg: TrainConfig | None = None,
          task: Task | None = None) -> list[dict[str, Any]]:
    """Train ``model`` in place on ``splits["train"]``.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge``; trained where it is.
        splits: must hold ``train``; every split is evaluated every ``cfg.eval_every`` steps.
        cfg: settings; defaults to ``TrainConfig()``.
        task: when given, accuracy is the argmax over ``task.answer_ids`` at scored positions;
            otherwise over the whole vocabulary.

    Returns:
        One JSON-serialisable record per evaluation: ``step``, ``loss`` (mean training loss since
        the previous record), ``lr``, ``train_time_s`` (optimisation time so far, evaluation
        excluded), ``wall_time_s`` and ``acc`` (split name -> accuracy).
    """
    cfg = cfg or TrainConfig()
    require(isinstance(cfg, TrainConfig), f"train: cfg must be an ip.TrainConfig, got {type(cfg).__name__}")
    splits = as_split_set(splits, "train")
    _check(model, splits, cfg, task)
    here = world()
    require(cfg.batch_size >= here.size, f"train: {here.size} processes share batches of {cfg.batch_size} sequences; "
            "raise train.batch_size to at least the number of processes")
    parameters = [p for p in model.parameters() if p.requires_grad]
    for parameter in parameters:  # every process starts from the main process's weights, as DDP does
        with torch.no_grad():
            broadcast(parameter.data)
    backend = Backend.of(model)
    device = backend.device
    answer_ids = None if task is None else task.answer_ids
    train_split = splits["train"]
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: list[dict[str, Any]] = []
    order = torch.empty(0, dtype=torch.long)
    losses: list[float] = []
    train_time = 0.0
    start = time.perf_counter()
    bar = tqdm(total=cfg.max_steps, desc="train", disable=not (cfg.progress and here.is_main), unit="step")
    try:
        for step in range(cfg.max_steps):
            tick = time.perf_counter()
            if len(order) < cfg.batch_size:
                order = torch.cat([order, torch.randperm(len(train_split), generator=generator)])
            index, order = order[: cfg.batch_size], order[cfg.batch_size:]
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr_at(step)
            model.train()
            if here.is_distributed:  # each process takes every size-th sequence of the batch
                n_predicted = int(train_split.lm_mask[index][:, :-1].sum())
                loss = lm_loss(backend, train_split.select(index[here.interleaved(len(index))]).to(device), n_predicted)
            else:
                loss = lm_loss(backend, train_split.select(index).to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            losses.append(float(sum_gradients(parameters, loss)) if here.is_distributed else loss.item())
            require(math.isfinite(losses[-1]), f"train: the loss became {losses[-1]} at step {step + 1}: training "
                    f"diverged; lower train.lr (now {cfg.lr:g}) and rerun")
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            train_time += time.perf_counter() - tick
            bar.update(1)
            if (step + 1) % cfg.eval_every and step + 1 != cfg.max_steps:
                continue
            model.eval()
            acc = {name: accuracy(model, split, answer_ids, cfg.eval_batch_size, cfg.eval_sequences)
                   for name, split in splits.items()}
            history.append({"step": step + 1, "loss": sum(losses) / len(losses), "lr": cfg.lr_at(step),
                            "train_time_s": round(train_time, 3),
                            "wall_time_s": round(time.perf_counter() - start, 3), "acc": acc})
            losses = []
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}",
                            **{k: f"{v:.3f}" for k, v in acc.items() if k == cfg.stop_split})
            if cfg.target_acc is not None and acc[cfg.stop_split] >= cfg.target_acc:
                break
    finally:
        bar.close()
        model.eval()
    return history
