"""The whole study as its stages: task -> splits -> train -> fit -> evaluate -> analyse -> report.

:func:`prepare` checks everything that can be checked without work (the config, the device, the
output directory, the splits against the model, layers, heads and ranks against the model's
shape), then each stage runs in turn and writes its own artefact atomically. A stage whose artefact
is already in the run directory with the same fingerprint (a hash of every input that shapes it)
is reused instead of redone, and says so on the terminal.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from illusion_probe.analysis.projection import Projection, key_query_projection
from illusion_probe.artifacts import atomic_directory, read_json, write_json
from illusion_probe.checkpoint import load_checkpoint, read_checkpoint_metadata, save_checkpoint
from illusion_probe.errors import ArtifactError, IllusionProbeError, require
from illusion_probe.evaluation import evaluate
from illusion_probe.hook_names import attn_k, attn_pattern, attn_q, resid_pre
from illusion_probe.models import build_model, resolve_device
from illusion_probe.report.html import write_report
from illusion_probe.results import Results
from illusion_probe.simplify.proxy import Proxy
from illusion_probe.study import StudyConfig
from illusion_probe.sweeps import sweep_proxies
from illusion_probe.tasks.base import SplitSet, Task
from illusion_probe.training import TrainConfig, train

T = TypeVar("T")


def fingerprint(*parts: Any) -> str:
    """Stable short hash of JSON-serialisable parts: a stage is reused only if its inputs match."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _log(message: str) -> None:
    print(f"[illusion-probe] {message}", file=sys.stderr, flush=True)


def check_output_dir(out: Path) -> Path:
    """Create ``out`` if needed and prove it is writable, before any work."""
    require(str(out).strip() != "", "--out is empty; give a run directory, e.g. --out runs/dyck")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise IllusionProbeError(f"output directory {out} is not writable ({err.strerror or err}); choose another --out") from None
    return out


@dataclass(frozen=True)
class Run:
    """A validated run of a study: where it writes, its task and splits, its untrained model, its stage stamps.

    The run seed is the one source of every seed: splits are drawn with ``seed``, the model starts from
    ``model.seed + seed``, batches are ordered by ``train.seed + seed``, and the bootstrap and the
    projection's sample use ``seed``.
    """

    study: StudyConfig
    out: Path
    seed: int
    task: Task
    splits: SplitSet
    model: torch.nn.Module
    train_config: TrainConfig
    layers: tuple[int, ...]
    stamps: dict[str, str]


def prepare(study: StudyConfig, out: str | os.PathLike, device: str = "auto", seed: int = 0) -> Run:
    """Check everything that needs no work, draw the splits and build the untrained model."""
    require(isinstance(seed, int) and seed >= 0, f"the seed must be a non-negative integer, got {seed!r}")
    device = resolve_device(device)
    model_config = dataclasses.replace(study.model, device=device, seed=study.model.seed + seed)
    train_config = dataclasses.replace(study.train, seed=study.train.seed + seed)
    study.check_against_model(model_config.d_model, model_config.resolved_d_head, model_config.n_layers,
                              model_config.n_heads)
    out_dir = check_output_dir(Path(out))
    task = study.build_task()
    splits = task.make_splits(seed=seed)
    require(splits.max_len <= task.n_ctx, f"splits hold {splits.max_len} tokens but the task's n_ctx is {task.n_ctx}")
    model = build_model(task, model_config)
    layers = tuple(dict.fromkeys(layer % model_config.n_layers for layer in study.proxies.layers))
    # Training is reproducible for a seed *and* a thread count, so the count is part of the checkpoint's identity.
    train_stamp = fingerprint(task.to_dict(), model_config.to_dict(), dataclasses.asdict(train_config), seed,
                              {"threads": torch.get_num_threads()})
    fit_stamp = fingerprint(train_stamp, dataclasses.asdict(study.proxies))
    evaluate_stamp = fingerprint(fit_stamp, dataclasses.asdict(study.evaluation))
    analyse_stamp = fingerprint(train_stamp, dataclasses.asdict(study.evaluation), dataclasses.asdict(study.projection))
    stamps = {"train": train_stamp, "fit": fit_stamp, "evaluate": evaluate_stamp, "analyse": analyse_stamp}
    return Run(study, out_dir, seed, task, splits, model, train_config, layers, stamps)


def _reuse(path: Path, stamp: str, read: Callable[[Path], T], stamp_of: Callable[[T], Any], what: str) -> T | None:
    """The artefact at ``path`` when it exists, reads, and carries ``stamp``; else ``None`` (the stage reruns)."""
    if not path.exists():
        return None
    try:
        found = read(path)
    except ArtifactError:
        return None
    if stamp_of(found) != stamp:
        return None
    _log(f"reusing {what} in {path}")
    return found


def train_stage(run: Run, allow_training: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained model: the checkpoint in ``out/checkpoint`` when its fingerprint matches, else trained now."""
    path = run.out / "checkpoint"
    saved = _reuse(path, run.stamps["train"], read_checkpoint_metadata,
                   lambda meta: meta.get("extra", {}).get("fingerprint"), "trained model")
    if saved is not None:
        model, _ = load_checkpoint(path, device=str(next(run.model.parameters()).device))
        return model, saved["extra"]
    require(allow_training, f"no finished checkpoint for this study and seed in {path}; run `illusion-probe train` first")
    _log("training")
    tick = time.perf_counter()
    history = train(run.model, run.splits, run.train_config, task=run.task)
    info = {"fingerprint": run.stamps["train"], "train_seconds": round(time.perf_counter() - tick, 2),
            "threads": torch.get_num_threads(), "history": history}
    save_checkpoint(path, run.model, run.task, extra=info)
    return run.model, info


def layer_hooks(layer: int) -> dict[str, list[str]]:
    """The hook groups studied in one layer: keys+queries, the residual stream entering it, its attention pattern."""
    return {"kq": [attn_k(layer), attn_q(layer)], "resid": [resid_pre(layer)], "pattern": [attn_pattern(layer)]}


def study_proxies(model: torch.nn.Module, run: Run) -> dict[str, Proxy]:
    """Every proxy of the study, for every analysed layer: PCA on keys/queries and on the residual
    stream, k-means on keys/queries, one-hot attention, and mean/zero ablation baselines."""
    config = run.study.proxies
    fit, n = run.splits["train"], config.n_fit_sequences
    proxies: dict[str, Proxy] = {}
    for layer in run.layers:
        groups = layer_hooks(layer)
        proxies.update({
            **sweep_proxies(model, fit, groups["kq"], "pca", config.kq_pca_sizes, n),
            **sweep_proxies(model, fit, groups["resid"], "pca", config.resid_pca_sizes, n),
            **sweep_proxies(model, fit, groups["kq"], "kmeans", config.kmeans_sizes, n),
            **sweep_proxies(model, fit, groups["pattern"], "onehot_attention", (None,), n),
            **sweep_proxies(model, fit, groups["kq"], "mean_ablation", (None,), n),
            **sweep_proxies(model, fit, groups["kq"], "zero_ablation", (None,), n),
        })
    return proxies


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest = read_json(path / "manifest.json")
    entries = manifest.get("proxies")
    if not (isinstance(entries, list) and all(isinstance(e, list) and len(e) == 2 for e in entries)):
        raise ArtifactError(f"{path / 'manifest.json'}: 'proxies' should be a list of [name, folder] pairs")
    return manifest


def fit_stage(run: Run, model: torch.nn.Module) -> dict[str, Proxy]:
    """Every proxy of the study: the set saved in ``out/proxies`` when its fingerprint matches, else fitted now.

    The manifest lists the proxies in the order they were fitted, so a reused set is in the same order.
    """
    path = run.out / "proxies"
    manifest = _reuse(path, run.stamps["fit"], _read_manifest, lambda m: m.get("fingerprint"), "fitted proxies")
    if manifest is not None:
        return {name: Proxy.load(path / folder) for name, folder in manifest["proxies"]}
    _log("fitting proxies")
    proxies = study_proxies(model, run)
    with atomic_directory(path) as staging:
        folders = [(name, f"proxy_{i:03d}") for i, name in enumerate(proxies)]
        for name, folder in folders:
            proxies[name].save(staging / folder)
        write_json(staging / "manifest.json", {"fingerprint": run.stamps["fit"], "proxies": folders})
    return proxies


def evaluate_stage(run: Run, model: torch.nn.Module, proxies: dict[str, Proxy], train_info: dict[str, Any]) -> Results:
    """Every proxy on every split: ``out/results.json`` when its fingerprint matches, else evaluated now."""
    path = run.out / "results.json"
    saved = _reuse(path, run.stamps["evaluate"], Results.from_json, lambda r: r.meta.get("fingerprint"), "results")
    if saved is not None:
        return saved
    _log("evaluating")
    config = run.study.evaluation
    tick = time.perf_counter()
    results = evaluate(model, proxies, _evaluation_splits(run), run.task, batch_size=config.batch_size,
                       batch_tokens=config.batch_tokens, n_boot=config.n_boot, seed=run.seed, ablation=config.ablation)
    results = results.with_meta(fingerprint=run.stamps["evaluate"], study=run.study.to_dict(), seed=run.seed,
                                train_seconds=train_info.get("train_seconds"),
                                evaluate_seconds=round(time.perf_counter() - tick, 2))
    results.to_csv(run.out / "results.csv")
    results.to_json(path)  # last: a results.json that exists is a finished stage
    return results


def _evaluation_splits(run: Run) -> SplitSet:
    return SplitSet([s.head(run.study.evaluation.max_sequences) for s in run.splits.values()])


def analyse_stage(run: Run, model: torch.nn.Module) -> Projection:
    """Keys and queries of the analysed head on the train split's top two components (``out/projection.json``)."""
    path = run.out / "projection.json"
    saved = _reuse(path, run.stamps["analyse"], Projection.from_json, lambda p: p.meta.get("fingerprint"),
                   "key/query projection")
    if saved is not None:
        return saved
    config = run.study.projection
    projection = key_query_projection(model, _evaluation_splits(run), run.layers[-1], config.head, config.points,
                                      seed=run.seed)
    projection = dataclasses.replace(projection, meta={**projection.meta, "fingerprint": run.stamps["analyse"]})
    projection.to_json(path)
    return projection


def report_stage(run: Run, results: Results, projection: Projection) -> list[Path]:
    """Write ``report.html``; returns every file the run's results are in."""
    report = write_report(results, run.out / "report.html", title=f"illusion-probe: {run.study.name}, seed {run.seed}",
                          projection=projection)
    return [run.out / "results.json", run.out / "results.csv", run.out / "projection.json", report]


def reproduce(study: StudyConfig, out: str | os.PathLike, device: str = "auto", seed: int = 0) -> Results:
    """The whole study: train (or reuse), fit every proxy, evaluate every split, analyse, and write into ``out``.

    Writes ``checkpoint/``, ``proxies/``, ``results.json``, ``results.csv``, ``projection.json`` and ``report.html``.
    """
    run = prepare(study, out, device, seed)
    model, train_info = train_stage(run)
    proxies = fit_stage(run, model)
    results = evaluate_stage(run, model, proxies, train_info)
    report_stage(run, results, analyse_stage(run, model))
    return results
