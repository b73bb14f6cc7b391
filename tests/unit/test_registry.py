"""Open extension points: a simplifier, a metric and a task defined here join like built-ins."""

from __future__ import annotations

import csv
import dataclasses
import io
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from torch import Tensor

import illusion_probe as ip
from illusion_probe.registry import METRICS, SIMPLIFIERS, TASKS, Registry
from illusion_probe.report.html import render_report
from illusion_probe.sweeps import sweep_proxies

SIZES = ip.ModelSizes(d_vocab=13, n_ctx=12)


@pytest.fixture(scope="module")
def model():
    return ip.build_model(SIZES, ip.ModelConfig(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=0))


@pytest.fixture(scope="module")
def splits():
    def tokens(n: int, high: int, seed: int) -> Tensor:
        return torch.randint(0, high, (n, SIZES.n_ctx), generator=torch.Generator().manual_seed(seed))

    return ip.SplitSet([ip.Split.from_tokens(tokens(40, 13, 0), "train", name="train"),
                        ip.Split.from_tokens(tokens(30, 13, 1), "id", name="test"),
                        ip.Split.from_tokens(tokens(30, 5, 2), "ood", name="ood_small")])


class Shrink(ip.FittedSimplifier):
    """Scale each activation's deviation from the fitted mean by ``factor`` (a user's simplifier)."""

    method: ClassVar[str] = "test_shrink"
    size_option: ClassVar[str | None] = "factor"

    def __init__(self, factor: int = 2, per_head: bool | None = None):
        super().__init__(per_head)
        self.factor = factor

    def options(self) -> dict[str, Any]:
        return {**super().options(), "factor": self.factor}

    def start(self, shape: tuple[int, int], device: torch.device) -> None:
        self._sum = torch.zeros(shape, dtype=torch.float64, device=device)

    def accumulate(self, x: Tensor) -> None:
        self._sum += x.double().sum(0)

    def finish(self) -> None:
        self.mean = (self._sum / self.n_samples).float()
        del self._sum

    def apply(self, x: Tensor) -> Tensor:
        mean = self.derived(x)["mean"]
        return mean + (x - mean) / self.factor

    def tensors(self) -> dict[str, Tensor]:
        return {"mean": self.mean}

    def set_tensors(self, state: dict[str, Tensor]) -> None:
        self.mean = state["mean"]


class TopTwo(ip.Metric):
    """The docs' example metric: the model's prediction is among the proxy's top two."""

    name = "test_top2_agreement"
    title = "model prediction in the proxy's top 2"
    higher_is_better = True

    def terms(self, scored: ip.Scored) -> dict[str, Tensor]:
        top2 = scored.proxy.logits.index_select(-1, scored.proxy.answer_ids).topk(2, dim=-1).indices
        return {"hits": (scored.proxy.answer_ids[top2] == scored.model.pred[:, None]).any(-1).float()}

    def reduce(self, totals: dict[str, np.ndarray]) -> np.ndarray:
        return totals["hits"] / totals["count"]


@pytest.fixture
def registered():
    SIMPLIFIERS.register(Shrink)
    METRICS.register(TopTwo)
    yield
    SIMPLIFIERS.unregister(Shrink.method)
    METRICS.unregister(TopTwo.name)


def test_a_user_simplifier_is_swept_saved_loaded_and_compared(registered, model, splits, tmp_path) -> None:
    hook = "blocks.1.hook_resid_pre"
    proxies = sweep_proxies(model, splits["train"], [hook], "test_shrink", (2, 4))
    assert list(proxies) == [f"test_shrink(2)@{hook}", f"test_shrink(4)@{hook}"]
    proxy = proxies[f"test_shrink(4)@{hook}"]
    proxy.save(tmp_path / "p")
    loaded = ip.Proxy.load(tmp_path / "p")
    assert loaded.same_edit(proxy) and not loaded.same_edit(proxies[f"test_shrink(2)@{hook}"])
    results = ip.sweep(model, splits, hooks=[hook], method="test_shrink", sizes=[2, 4], n_boot=0, progress=False)
    (row,) = results.headline()
    assert row["method"] == "test_shrink" and row["size"] in (2, 4)
    tokens = splits["test"].tokens[:3]
    with torch.no_grad():
        with loaded.applied(model):
            again = model(tokens)
        with proxy.applied(model):
            assert torch.equal(again, model(tokens))


def test_loading_an_unregistered_simplifier_names_the_fix(model, splits, tmp_path) -> None:
    SIMPLIFIERS.register(Shrink)
    try:
        ip.fit_proxy(model, {"blocks.1.hook_resid_pre": Shrink(3)}, splits["train"]).save(tmp_path / "p")
    finally:
        SIMPLIFIERS.unregister(Shrink.method)
    with pytest.raises(ip.ArtifactError) as err:
        ip.Proxy.load(tmp_path / "p")
    message = str(err.value)
    assert "unknown simplifier 'test_shrink'" in message and f"import {__name__}" in message
    assert "malformed" not in message and "\n" not in message


def test_a_user_metric_reaches_results_csv_and_report(registered, model, splits) -> None:
    proxy = ip.fit_proxy(model, {"blocks.1.attn.hook_k": ip.PCA(rank=1)}, splits["train"])
    results = ip.evaluate(model, {"r1": proxy}, splits, n_boot=30, progress=False)
    records = results.select(metric="test_top2_agreement", category="all")
    assert {r.split for r in records} == {"train", "test", "ood_small"}
    # The definition, computed by hand on the test split.
    split = splits["test"]
    with torch.no_grad():
        clean = model(split.tokens)
        with proxy.applied(model):
            top2 = model(split.tokens).topk(2, dim=-1).indices
    expected = (top2 == clean.argmax(-1, keepdim=True)).any(-1)[split.eval_mask].double().mean().item()
    assert results.value("test", "r1", "test_top2_agreement") == pytest.approx(expected, abs=1e-12)
    assert results.metric_info("test_top2_agreement").higher_is_better is True
    assert results.gap("test_top2_agreement", "test", "ood_small")
    rows = list(csv.DictReader(io.StringIO(results.to_csv())))
    assert any(row["metric"] == "test_top2_agreement" for row in rows)
    assert "model prediction in the proxy&#x27;s top 2" in render_report(results)


def test_evaluate_computes_a_chosen_subset_of_metrics(model, splits) -> None:
    proxy = ip.fit_proxy(model, {"blocks.1.attn.hook_k": ip.PCA(rank=1)}, splits["train"])
    results = ip.evaluate(model, {"r1": proxy}, splits, metrics=["agreement", "kl"], n_boot=0, progress=False)
    assert {r.metric for r in results.records} == {"agreement", "kl"}
    with pytest.raises(ip.IllusionProbeError, match="unknown metric 'agrement'; did you mean 'agreement'"):
        ip.evaluate(model, {"r1": proxy}, splits, metrics=["agrement"], progress=False)
    with pytest.raises(ip.IllusionProbeError, match="given twice"):
        ip.evaluate(model, {"r1": proxy}, splits, metrics=["kl", "kl"], progress=False)


@dataclasses.dataclass(frozen=True)
class RepeatConfig:
    """A user's task config: sequences of a token repeated."""

    n: int = 8
    length: int = 6


class RepeatTask(ip.Task):
    """A user's task: predict that the token repeats."""

    kind = "test_repeat"
    config_class = RepeatConfig
    pad_id = 0
    bos_id = 0

    def __init__(self, config: RepeatConfig | None = None):
        self.config = config or RepeatConfig()

    vocab = property(lambda self: ["a", "b", "c"])
    n_ctx = property(lambda self: self.config.length)
    answer_ids = property(lambda self: torch.arange(3))

    def encode(self, text: str) -> Tensor:
        return torch.tensor(["abc".index(c) for c in text])

    def decode(self, ids) -> str:
        return "".join("abc"[i] for i in ids)

    def make_splits(self, seed: int = 0) -> ip.SplitSet:
        tokens = torch.arange(self.config.n)[:, None].expand(-1, self.config.length) % 3
        return ip.SplitSet([ip.Split.from_tokens(tokens, "train", name="train")])


def test_a_user_task_is_a_cli_choice(capsys) -> None:
    from illusion_probe.cli import build_parser

    TASKS.register(RepeatTask)
    try:
        help_text = build_parser()._subparsers._group_actions[0].choices["reproduce"].format_help()
        assert "test_repeat" in help_text
        task = ip.tasks.task_from_dict({"kind": "test_repeat", "config": {"n": 3}})
        assert isinstance(task, RepeatTask) and task.config.n == 3
    finally:
        TASKS.unregister(RepeatTask.kind)
    assert "test_repeat" not in TASKS.names()


def test_a_taken_name_is_a_one_line_error() -> None:
    class Other(ip.PCA):
        method: ClassVar[str] = "pca"

    with pytest.raises(ip.IllusionProbeError, match="the name 'pca' is taken by illusion_probe.simplify.pca.PCA") as err:
        ip.register_simplifier(Other)
    assert "\n" not in str(err.value)
    ip.register_simplifier(ip.PCA)  # the same class again is fine (a module imported twice)


def test_registry_needs_a_name_and_lists_builtins_first() -> None:
    registry = Registry("thing", "tag", "illusion_probe.errors")

    class Nameless:
        pass

    with pytest.raises(ip.IllusionProbeError, match="needs a non-empty string class attribute 'tag'"):
        registry.register(Nameless)
    assert {"pca", "svd", "kmeans", "onehot_attention", "zero_ablation", "mean_ablation"} <= set(SIMPLIFIERS.names())
    assert METRICS.names()[:6] == ["acc_model", "acc_proxy", "acc_delta", "agreement", "kl", "ce_score"]
