"""The whole study as one short function: task -> splits -> train -> fit -> evaluate -> report.

:func:`reproduce` validates everything it can (preset, device, output
directory, hook names, head index, context length) before the first training
step, then runs each stage, reusing a stage's saved output in the run
directory when its fingerprint (the configs that produced it) matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from illusion_probe.artifacts import atomic_directory, read_json, write_json
from illusion_probe.checkpoint import load_checkpoint, read_checkpoint_metadata, save_checkpoint
from illusion_probe.errors import ArtifactError, IllusionProbeError, require
from illusion_probe.evaluation import evaluate
from illusion_probe.hook_names import resolve_hook_name
from illusion_probe.models import ModelConfig, build_model, resolve_device
from illusion_probe.projection import key_query_projection
from illusion_probe.report.html import write_report
from illusion_probe.results import Results
from illusion_probe.simplify.proxy import Proxy
from illusion_probe.sweeps import sweep_proxies
from illusion_probe.tasks import Task, task_from_dict
from illusion_probe.tasks.base import Split, SplitSet
from illusion_probe.training import TrainConfig, train

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


@dataclass(frozen=True)
class ProbeConfig:
    """What to simplify and how to evaluate it.

    Attributes:
        layers: analysed layers (negative counts from the end; ``(-1,)`` is the last layer only).
            Every listed layer gets its own key/query and residual-stream sweeps.
        head: head whose keys and queries the projection figure shows (in the last listed layer).
        n_fit_sequences: train sequences the simplifiers are fit on (the paper uses about 1,000).
        kq_pca_sizes: PCA ranks for the analysed layer's keys and queries (per head).
        resid_pca_sizes: PCA ranks for the residual stream entering the analysed layer.
        kmeans_sizes: cluster counts for k-means on the keys and queries (per head).
        max_eval_sequences: cap on sequences evaluated per split.
        n_boot: bootstrap resamples for the 95% intervals.
        batch_size: sequences per evaluation forward pass.
        ablation: baseline of the CE score: ``mean`` or ``zero``.
        projection_points: points per split in the projection figure.
    """

    layers: tuple[int, ...] = (-1,)
    head: int = 0
    n_fit_sequences: int = 1000
    kq_pca_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    resid_pca_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    kmeans_sizes: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    max_eval_sequences: int = 2000
    n_boot: int = 1000
    batch_size: int = 256
    ablation: str = "mean"
    projection_points: int = 600


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs: the task (as ``Task.to_dict``), model, training and probing configs."""

    name: str
    task: dict[str, Any]
    model: ModelConfig
    train: TrainConfig
    probe: ProbeConfig

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {"name": self.name, "task": self.task, "model": self.model.to_dict(),
                "train": dataclasses.asdict(self.train), "probe": dataclasses.asdict(self.probe)}


def _config(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(known)
    require(not unknown, f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def available_presets(kind: str) -> list[str]:
    """Preset names shipped for task ``kind``."""
    folder = resources.files("illusion_probe") / "presets"
    return sorted(p.name[len(kind) + 1: -5] for p in folder.iterdir() if p.name.startswith(f"{kind}_") and p.name.endswith(".toml"))


def load_preset(kind: str, name: str) -> RunConfig:
    """The shipped preset ``name`` for task ``kind`` (``presets/<kind>_<name>.toml``)."""
    known = available_presets(kind)
    if name not in known:
        raise IllusionProbeError(f"unknown {kind} preset {name!r}; choose one of {', '.join(known) or '(none)'}")
    text = (resources.files("illusion_probe") / "presets" / f"{kind}_{name}.toml").read_text(encoding="utf-8")
    return run_config_from_dict(tomllib.loads(text), f"preset {kind}/{name}")


def run_config_from_dict(data: dict[str, Any], where: str) -> RunConfig:
    """Build a :class:`RunConfig` from preset tables ``task``, ``model``, ``train``, ``probe``."""
    task_table = dict(data.get("task", {}))
    task = task_from_dict({"kind": task_table.pop("kind", None), "preset": task_table.pop("preset", None),
                           "config": task_table})
    return RunConfig(
        name=where,
        task=task.to_dict(),
        model=_config(ModelConfig, data.get("model", {}), f"{where} [model]"),
        train=_config(TrainConfig, data.get("train", {}), f"{where} [train]"),
        probe=_config(ProbeConfig, data.get("probe", {}), f"{where} [probe]"),
    )


def fingerprint(*parts: Any) -> str:
    """Stable short hash of JSON-serialisable parts: a stage is reused only if its inputs match."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_output_dir(out: Path) -> Path:
    """Create ``out`` if needed and prove it is writable, before any work."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise IllusionProbeError(f"output directory {out} is not writable ({err.strerror or err}); choose another --out") from None
    return out


def _log(message: str) -> None:
    print(f"[illusion-probe] {message}", file=sys.stderr, flush=True)


def analysed_layers(model: torch.nn.Module, probe: ProbeConfig) -> list[int]:
    """The probe's layers as non-negative indices, checked (with the head and hook names) against the model."""
    n_layers = int(model.cfg.n_layers)
    require(len(probe.layers) > 0, "probe.layers is empty; list at least one layer, e.g. [-1]")
    for layer in probe.layers:
        require(-n_layers <= layer < n_layers, f"probe.layers has {layer}, outside a {n_layers}-layer model")
    require(0 <= probe.head < int(model.cfg.n_heads), f"probe.head={probe.head} but the model has {model.cfg.n_heads} heads")
    layers = list(dict.fromkeys(layer % n_layers for layer in probe.layers))
    for layer in layers:
        for hooks in layer_hooks(layer).values():
            for hook in hooks:
                resolve_hook_name(model, hook)
    return layers


def layer_hooks(layer: int) -> dict[str, list[str]]:
    """The hook groups studied in one layer: keys+queries, the residual stream entering it, its attention pattern."""
    return {"kq": [f"blocks.{layer}.attn.hook_k", f"blocks.{layer}.attn.hook_q"],
            "resid": [f"blocks.{layer}.hook_resid_pre"], "pattern": [f"blocks.{layer}.attn.hook_pattern"]}


def study_proxies(model: torch.nn.Module, fit: Split, probe: ProbeConfig) -> dict[str, Proxy]:
    """Every proxy of the study, for every analysed layer: PCA on keys/queries and on the residual
    stream, k-means on keys/queries, one-hot attention, and mean/zero ablation baselines."""
    n = probe.n_fit_sequences
    proxies: dict[str, Proxy] = {}
    for layer in analysed_layers(model, probe):
        groups = layer_hooks(layer)
        proxies.update({
            **sweep_proxies(model, fit, groups["kq"], "pca", probe.kq_pca_sizes, n),
            **sweep_proxies(model, fit, groups["resid"], "pca", probe.resid_pca_sizes, n),
            **sweep_proxies(model, fit, groups["kq"], "kmeans", probe.kmeans_sizes, n),
            **sweep_proxies(model, fit, groups["pattern"], "onehot_attention", (None,), n),
            **sweep_proxies(model, fit, groups["kq"], "mean_ablation", (None,), n),
            **sweep_proxies(model, fit, groups["kq"], "zero_ablation", (None,), n),
        })
    return proxies


def fit_or_reuse(path: Path, model: torch.nn.Module, splits: SplitSet, probe: ProbeConfig,
                 stamp: str) -> dict[str, Proxy]:
    """Fit every proxy of the study, or load the set saved at ``path`` with a matching fingerprint."""
    manifest = path / "manifest.json"
    if manifest.exists():
        saved = read_json(manifest)
        if saved.get("fingerprint") == stamp:
            _log(f"reusing fitted proxies in {path}")
            return {name: Proxy.load(path / folder) for name, folder in saved["proxies"].items()}
    _log("fitting proxies")
    proxies = study_proxies(model, splits["train"], probe)
    with atomic_directory(path) as staging:
        folders = {name: f"proxy_{i:03d}" for i, name in enumerate(proxies)}
        for name, proxy in proxies.items():
            proxy.save(staging / folders[name])
        write_json(staging / "manifest.json", {"fingerprint": stamp, "proxies": folders})
    return proxies


@dataclass(frozen=True)
class Prepared:
    """A validated run: task, splits, an untrained model and the fingerprints of each stage."""

    run: RunConfig
    out: Path
    seed: int
    device: str
    task: Task
    splits: SplitSet
    model: torch.nn.Module
    train_cfg: TrainConfig
    train_stamp: str
    probe_stamp: str


def prepare(run: RunConfig, out: str | os.PathLike, device: str = "auto", seed: int = 0) -> Prepared:
    """Check everything (device, output directory, splits, hook names) and build the untrained model."""
    device = resolve_device(device)
    out_dir = check_output_dir(Path(out))
    task = task_from_dict(run.task)
    model_cfg = dataclasses.replace(run.model, device=device, seed=run.model.seed + seed)
    train_cfg = dataclasses.replace(run.train, device=device, seed=run.train.seed + seed)
    splits = task.make_splits(seed=seed)
    require(splits.max_len <= task.n_ctx, f"splits hold {splits.max_len} tokens but the task's n_ctx is {task.n_ctx}")
    model = build_model(task, model_cfg)
    analysed_layers(model, run.probe)  # a bad layer, head or hook fails here, before training
    train_stamp = fingerprint(run.task, model_cfg.to_dict(), dataclasses.asdict(train_cfg), seed)
    probe_stamp = fingerprint(train_stamp, dataclasses.asdict(run.probe))
    return Prepared(run, out_dir, seed, device, task, splits, model, train_cfg, train_stamp, probe_stamp)


def trained_model(prep: Prepared, allow_training: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained model of ``prep``: reused from ``out/checkpoint`` when its fingerprint matches."""
    path = prep.out / "checkpoint"
    try:
        extra = read_checkpoint_metadata(path).get("extra", {}) if path.exists() else {}
    except ArtifactError:
        extra = {}
    if extra.get("fingerprint") == prep.train_stamp:
        _log(f"reusing trained model in {path}")
        model, _ = load_checkpoint(path, device=prep.device)
        return model, extra
    require(allow_training, f"no finished checkpoint for this preset and seed in {path}; run `illusion-probe train` first")
    _log("training")
    tick = time.perf_counter()
    history = train(prep.model, prep.splits, prep.train_cfg, task=prep.task)
    extra = {"fingerprint": prep.train_stamp, "train_seconds": round(time.perf_counter() - tick, 2), "history": history}
    save_checkpoint(path, prep.model, prep.task, extra=extra)
    return prep.model, extra


def probe(prep: Prepared, model: torch.nn.Module, train_info: dict[str, Any]) -> Results:
    """Fit (or reuse) every proxy, evaluate every split, write results and the report."""
    run = prep.run
    proxies = fit_or_reuse(prep.out / "proxies", model, prep.splits, run.probe, prep.probe_stamp)
    results_file = prep.out / "results.json"
    results = _reuse_results(results_file, prep.probe_stamp)
    if results is None:
        _log("evaluating")
        eval_splits = SplitSet([s.head(run.probe.max_eval_sequences) for s in prep.splits.values()])
        tick = time.perf_counter()
        results = evaluate(model, proxies, eval_splits, prep.task, batch_size=run.probe.batch_size,
                           n_boot=run.probe.n_boot, seed=prep.seed, ablation=run.probe.ablation)
        layer = analysed_layers(model, run.probe)[-1]
        results.extras["projection"] = key_query_projection(model, eval_splits, layer, run.probe.head,
                                                            run.probe.projection_points, seed=prep.seed)
        results.meta.update({"fingerprint": prep.probe_stamp, "run": run.to_dict(), "seed": prep.seed,
                             "device": prep.device, "train_seconds": train_info.get("train_seconds"),
                             "evaluate_seconds": round(time.perf_counter() - tick, 2)})
        results.to_json(results_file)
        results.to_csv(prep.out / "results.csv")
    write_report(results, prep.out / "report.html", title=f"illusion-probe: {run.name}, seed {prep.seed}")
    return results


def reproduce(run: RunConfig, out: str | os.PathLike, device: str = "auto", seed: int = 0) -> Results:
    """Train (or reuse), fit every proxy, evaluate every split, and write results and report into ``out``.

    Writes ``checkpoint/``, ``proxies/``, ``results.json``, ``results.csv`` and ``report.html``.
    """
    prep = prepare(run, out, device, seed)
    model, train_info = trained_model(prep)
    return probe(prep, model, train_info)


def _reuse_results(path: Path, stamp: str) -> Results | None:
    if not path.exists():
        return None
    try:
        results = Results.from_json(path)
    except ArtifactError:
        return None
    if results.meta.get("fingerprint") != stamp:
        return None
    _log(f"reusing results in {path}")
    return results
