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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from illusion_probe.analysis.projection import Projection, key_query_projection
from illusion_probe.analysis.verdicts import featured_proxies
from illusion_probe.artifacts import atomic_directory, read_json, write_json
from illusion_probe.checkpoint import load_checkpoint, read_checkpoint_metadata, save_checkpoint
from illusion_probe.controls import CATEGORIES
from illusion_probe.distributed import log, world
from illusion_probe.errors import ArtifactError, IllusionProbeError, require
from illusion_probe.evaluation import evaluate
from illusion_probe.hook_names import attn_k, attn_pattern, attn_q, mlp_out, resid_pre
from illusion_probe.models import build_model, resolve_device
from illusion_probe.report.html import write_report
from illusion_probe.results import Results
from illusion_probe.simplify.base import Simplifier
from illusion_probe.simplify.fitting import fit_proxies
from illusion_probe.simplify.proxy import Proxy
from illusion_probe.study import StudyConfig
from illusion_probe.sweeps import sweep_simplifiers
from illusion_probe.tasks.base import SplitSet, Task
from illusion_probe.training import TrainConfig, check_splits, train


def fingerprint(*parts: Any) -> str:
    """Stable short hash of JSON-serialisable parts: a stage is reused only if its inputs match."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_output_dir(where: str | os.PathLike) -> Path:
    """Create directory ``where`` if needed and prove it is writable, before any work."""
    require(str(where).strip() != "", "--out is empty; give a run directory, e.g. --out runs/dyck")
    out = Path(where)
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
    ``model.seed + seed``, batches are ordered by ``train.seed + seed``, and sparse dictionaries, the
    bootstrap and the projection's sample use ``seed``.
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
    force: bool = False


def prepare(study: StudyConfig, out: str | os.PathLike, device: str = "auto", seed: int = 0,
            force: bool = False) -> Run:
    """Check everything that needs no work, draw the splits and build the untrained model.

    With ``force``, a stage whose artefact is damaged or of a format this version cannot read is redone
    (and the artefact replaced); without it, that is an error naming the artefact and the fix.
    """
    require(isinstance(seed, int) and seed >= 0, f"the seed must be a non-negative integer, got {seed!r}")
    device = resolve_device(device)
    model_config = dataclasses.replace(study.model, device=device, seed=study.model.seed + seed)
    train_config = dataclasses.replace(study.train, seed=study.train.seed + seed)
    study.check_against_model(model_config.d_model, model_config.resolved_d_head, model_config.n_layers,
                              model_config.n_heads)
    task = study.build_task()
    splits = task.make_splits(seed=seed)
    require(splits.max_len <= task.n_ctx, f"splits hold {splits.max_len} tokens but the task's n_ctx is {task.n_ctx}")
    check_splits(splits, train_config)
    study.check_against_data(int(splits["train"].real_mask[: study.proxies.n_fit_sequences].sum()))
    out_dir = check_output_dir(out)
    model = build_model(task, model_config)
    layers = tuple(dict.fromkeys(layer % model_config.n_layers for layer in study.proxies.layers))
    # Training is reproducible for a seed *and* a thread count, so the count is part of the checkpoint's identity.
    train_stamp = fingerprint(task.to_dict(), model_config.to_dict(), dataclasses.asdict(train_config), seed,
                              {"threads": torch.get_num_threads()})
    fit_stamp = fingerprint(train_stamp, dataclasses.asdict(study.proxies))
    evaluate_stamp = fingerprint(fit_stamp, dataclasses.asdict(study.evaluation))
    analyse_stamp = fingerprint(train_stamp, dataclasses.asdict(study.evaluation), dataclasses.asdict(study.projection))
    stamps = {"train": train_stamp, "fit": fit_stamp, "evaluate": evaluate_stamp, "analyse": analyse_stamp}
    run = Run(study, out_dir, seed, task, splits, model, train_config, layers, stamps, force)
    check_artefacts(run)
    return run


@dataclass(frozen=True)
class _Artefact:
    """Where a stage's artefact lives, how it is read, which stamp it carries, and what it is called."""

    path: Path
    read: Callable[[Path], Any]
    stamp_of: Callable[[Any], Any]
    what: str


def _artefact(run: Run, stage: str) -> _Artefact:
    device = str(next(run.model.parameters()).device)
    return {
        "train": lambda: _Artefact(run.out / "checkpoint",
                                   lambda path: (read_checkpoint_metadata(path), load_checkpoint(path, device)),
                                   lambda found: found[0].get("extra", {}).get("fingerprint"), "trained model"),
        "fit": lambda: _Artefact(run.out / "proxies", _read_proxies, lambda found: found[0], "fitted proxies"),
        "evaluate": lambda: _Artefact(run.out / "results.json", Results.from_json,
                                      lambda found: found.meta.get("fingerprint"), "results"),
        "analyse": lambda: _Artefact(run.out / "projection.json", Projection.from_json,
                                     lambda found: found.meta.get("fingerprint"), "key/query projection"),
    }[stage]()


def _read(run: Run, stage: str) -> Any | None:
    """The stage's artefact as read, ``None`` when absent. One that cannot be read (damaged, or another
    format version) is an error naming it and the fix, unless the run forces its stages (then ``None``)."""
    artefact = _artefact(run, stage)
    if not artefact.path.exists():
        return None
    try:
        return artefact.read(artefact.path)
    except ArtifactError as err:
        if run.force:
            log(f"redoing the {stage} stage (--force): {err}")
            return None
        raise ArtifactError(f"{err}; delete {artefact.path} or rerun with --force to redo the {stage} stage") from None


def check_artefacts(run: Run) -> None:
    """Read every artefact already in the run directory, so that a damaged one stops the run before any work."""
    if not run.force:
        for stage in run.stamps:
            _read(run, stage)


def _reuse(run: Run, stage: str) -> Any | None:
    """The stage's artefact when it carries the stage's stamp; ``None`` when it is absent, unreadable under
    ``--force``, or made from other inputs (the stage reruns and replaces it)."""
    found = _read(run, stage)
    if found is None:
        return None
    artefact = _artefact(run, stage)
    if artefact.stamp_of(found) != run.stamps[stage]:
        log(f"redoing the {stage} stage: {artefact.path} was made from other inputs")
        return None
    log(f"reusing {artefact.what} in {artefact.path}")
    return found


def require_checkpoint(run: Run) -> None:
    """Raise unless ``out/checkpoint`` holds a finished checkpoint of this study and seed (for ``evaluate``)."""
    found = _read(run, "train")
    require(found is not None and _artefact(run, "train").stamp_of(found) == run.stamps["train"],
            f"no finished checkpoint for this study and seed in {run.out / 'checkpoint'}; run `illusion-probe train` first")


def train_stage(run: Run, allow_training: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained model: the checkpoint in ``out/checkpoint`` when its fingerprint matches, else trained now."""
    path = run.out / "checkpoint"
    saved = _reuse(run, "train")
    if saved is not None:
        metadata, (model, _) = saved
        return model, metadata["extra"]
    if not allow_training:
        require_checkpoint(run)
    log("training")
    tick = time.perf_counter()
    history = train(run.model, run.splits, run.train_config, task=run.task)
    info = {"fingerprint": run.stamps["train"], "train_seconds": round(time.perf_counter() - tick, 2),
            "processes": world().size, "history": history}
    if world().is_main:
        save_checkpoint(path, run.model, run.task, extra=info)
    return run.model, info


def layer_hooks(layer: int) -> dict[str, list[str]]:
    """The hook groups studied in one layer: keys+queries, the residual stream entering it, its attention
    pattern, its MLP output."""
    return {"kq": [attn_k(layer), attn_q(layer)], "resid": [resid_pre(layer)], "pattern": [attn_pattern(layer)],
            "mlp": [mlp_out(layer)]}


def study_proxies(model: torch.nn.Module, run: Run) -> dict[str, Proxy]:
    """Every proxy of the study, for every analysed layer: PCA on keys/queries and on the residual
    stream, k-means on keys/queries, TopK SAEs on the residual stream and transcoders of the MLP (where
    the preset asks for them), one-hot attention, and the mean-ablation baseline."""
    config = run.study.proxies
    dictionary = {"k": config.dictionary_k, "epochs": config.dictionary_epochs, "seed": run.seed}
    wanted: dict[str, dict[str, Simplifier]] = {}
    for layer in run.layers:
        groups = layer_hooks(layer)
        wanted.update({
            **sweep_simplifiers(groups["kq"], "pca", config.kq_pca_sizes),
            **sweep_simplifiers(groups["resid"], "pca", config.resid_pca_sizes),
            **sweep_simplifiers(groups["kq"], "kmeans", config.kmeans_sizes),
            **(sweep_simplifiers(groups["resid"], "sae", config.sae_sizes, **dictionary) if config.sae_sizes else {}),
            **(sweep_simplifiers(groups["mlp"], "transcoder", config.transcoder_sizes, **dictionary)
               if config.transcoder_sizes else {}),
            **sweep_simplifiers(groups["pattern"], "onehot_attention"),
            # One ablation baseline: mean- and zero-ablating keys and queries are the same edit in effect (every
            # key equal, so every query attends uniformly), and gave identical numbers on every metric.
            **sweep_simplifiers(groups["kq"], "mean_ablation"),
        })
    return fit_proxies(model, wanted, run.splits["train"], config.n_fit_sequences, progress=True)


def _read_proxies(path: Path) -> tuple[Any, dict[str, Proxy]]:
    """The fingerprint in ``path/manifest.json`` and every proxy it lists, in the manifest's order."""
    manifest = read_json(path / "manifest.json")
    entries = manifest.get("proxies")
    if not (isinstance(entries, list) and all(isinstance(e, list) and len(e) == 2 and all(isinstance(x, str) for x in e)
                                              for e in entries)):
        raise ArtifactError(f"{path / 'manifest.json'}: 'proxies' should be a list of [name, folder] pairs")
    return manifest.get("fingerprint"), {name: Proxy.load(path / folder) for name, folder in entries}


def fit_stage(run: Run, model: torch.nn.Module) -> dict[str, Proxy]:
    """Every proxy of the study: the set saved in ``out/proxies`` when its fingerprint matches, else fitted now.

    The manifest lists the proxies in the order they were fitted, so a reused set is in the same order.
    """
    path = run.out / "proxies"
    saved = _reuse(run, "fit")
    if saved is not None:
        return saved[1]
    log("fitting proxies")
    proxies = study_proxies(model, run)
    if not world().is_main:
        return proxies
    with atomic_directory(path) as staging:
        folders = [(name, f"proxy_{i:03d}") for i, name in enumerate(proxies)]
        for name, folder in folders:
            proxies[name].save(staging / folder)
        write_json(staging / "manifest.json", {"fingerprint": run.stamps["fit"], "proxies": folders})
    return proxies


def evaluate_stage(run: Run, model: torch.nn.Module, proxies: dict[str, Proxy], train_info: dict[str, Any]) -> Results:
    """Every proxy on every split: ``out/results.json`` when its fingerprint matches, else evaluated now."""
    path = run.out / "results.json"
    saved = _reuse(run, "evaluate")
    if saved is not None:
        return saved
    log("evaluating")
    config = run.study.evaluation
    tick = time.perf_counter()
    options = dict(batch_size=config.batch_size, batch_tokens=config.batch_tokens, n_boot=config.n_boot,
                   seed=run.seed, ablation=config.ablation, difficulty_bins=config.difficulty_bins)
    results = evaluate(model, proxies, _evaluation_splits(run), run.task, **options)
    log("controls: refit ceiling and random baseline of the featured proxies")
    featured = featured_proxies(results)
    controlled = evaluate(model, {name: proxies[name] for name in featured}, _evaluation_splits(run), run.task,
                          controls=featured, **{**options, "difficulty_bins": 0})  # the controls read category all
    results = dataclasses.replace(results, control_records=controlled.control_records,
                                  gaps=[*results.gaps, *(g for g in controlled.gaps if g.category in CATEGORIES)])
    results = results.with_meta(fingerprint=run.stamps["evaluate"], study=run.study.to_dict(), seed=run.seed,
                                train_seconds=train_info.get("train_seconds"),
                                training_history=_accuracy_history(train_info),
                                evaluate_seconds=round(time.perf_counter() - tick, 2), processes=world().size)
    if world().is_main:
        results.to_csv(run.out / "results.csv")
        results.to_json(path)  # last: a results.json that exists is a finished stage
    return results


def _accuracy_history(train_info: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The training history without its timings, so that results stay the same from run to run."""
    history = train_info.get("history")
    return None if history is None else [{k: r[k] for k in ("step", "loss", "acc")} for r in history]


def _evaluation_splits(run: Run) -> SplitSet:
    return SplitSet([s.head(run.study.evaluation.max_sequences) for s in run.splits.values()])


def analyse_stage(run: Run, model: torch.nn.Module) -> Projection:
    """Keys and queries of the analysed head on the train split's top two components (``out/projection.json``).

    Under many processes, the main process alone runs this stage and the report (the others have finished)."""
    path = run.out / "projection.json"
    saved = _reuse(run, "analyse")
    if saved is not None:
        return saved
    config = run.study.projection
    projection = key_query_projection(model, _evaluation_splits(run), run.layers[-1], config.head, config.points,
                                      seed=run.seed)
    projection = dataclasses.replace(projection, meta={**projection.meta, "fingerprint": run.stamps["analyse"]})
    projection.to_json(path)
    return projection


def report_stage(run: Run, results: Results, projection: Projection) -> list[Path]:
    """Write ``report.html``; returns every artefact of the run (its folders and files)."""
    report = write_report(results, run.out / "report.html", title=f"illusion-probe: {run.study.name}, seed {run.seed}",
                          projection=projection)
    log(f"report: {report} ({report.stat().st_size / 1e6:.1f} MB, opens offline)")
    return [run.out / name for name in ("checkpoint", "proxies", "results.json", "results.csv", "projection.json")] + [report]


def reproduce(study: StudyConfig, out: str | os.PathLike, device: str = "auto", seed: int = 0) -> Results:
    """The whole study: train (or reuse), fit every proxy, evaluate every split, analyse, and write into ``out``.

    Writes ``checkpoint/``, ``proxies/``, ``results.json``, ``results.csv``, ``projection.json`` and ``report.html``.
    Under ``torchrun`` the processes share every stage, each returns the same results, and the main
    process alone writes.
    """
    run = prepare(study, out, device, seed)
    model, train_info = train_stage(run)
    proxies = fit_stage(run, model)
    results = evaluate_stage(run, model, proxies, train_info)
    if world().is_main:
        report_stage(run, results, analyse_stage(run, model))
    return results
