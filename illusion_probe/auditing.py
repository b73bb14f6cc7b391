"""Audit any model on your own text: model + text files + proxy specs -> results and report.

The audit is the study without a task: the model is loaded (:func:`~illusion_probe.loading.load_model`),
the ``fit`` file becomes the ``train`` split the proxies are fitted on, and every other file an
evaluation split: in distribution, or out of it when its name starts with ``ood``. Everything is
checked before any fitting: the files, the window against the model's context, every hook name
(with a "did you mean") and every proxy's sizes against its hook.

A proxy spec is ``METHOD[:SIZES]@HOOKS``: ``pca:4,8,16@blocks.6.hook_resid_pre`` sweeps PCA over three
ranks, ``kmeans:64@blocks.6.attn.hook_k+blocks.6.attn.hook_q`` simplifies keys and queries together,
and ``onehot@6`` is one-hot attention on block 6's pattern (a bare layer number means the layer's
attention pattern).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from illusion_probe.backends import Backend
from illusion_probe.config import apply_overrides, check_types, from_table, read_toml
from illusion_probe.distributed import checked_together, log, world
from illusion_probe.errors import IllusionProbeError, require
from illusion_probe.evaluation import evaluate
from illusion_probe.hook_names import attn_pattern, resolve_hook_name
from illusion_probe.loading import load_model
from illusion_probe.registry import SIMPLIFIERS
from illusion_probe.report.html import write_report
from illusion_probe.results import Results
from illusion_probe.simplify.base import Simplifier
from illusion_probe.simplify.fitting import fit_proxies
from illusion_probe.simplify.proxy import check_hooks
from illusion_probe.study import EvaluationConfig
from illusion_probe.sweeps import proxy_name
from illusion_probe.tasks.base import Split, SplitSet

#: Short names the command line accepts for registered simplifiers.
ALIASES = {"onehot": "onehot_attention", "zero": "zero_ablation", "mean": "mean_ablation"}
SECTIONS = ("audit", "evaluation")
_SPEC = re.compile(r"^(?P<method>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<sizes>[0-9][0-9,]*))?@(?P<hooks>.+)$")


@dataclass(frozen=True)
class ProxySpec:
    """One ``METHOD[:SIZES]@HOOKS`` spec: a simplifier family, its sizes (``(None,)``: size-free), its hooks."""

    method: str
    sizes: tuple[int | None, ...]
    hooks: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> ProxySpec:
        """Parse a spec; a malformed one or an unknown method is a one-line error."""
        match = _SPEC.match(text.strip()) if isinstance(text, str) else None
        require(match is not None, f"proxy spec {text!r}: write METHOD[:SIZES]@HOOKS, e.g. pca:4,8@blocks.1.hook_resid_pre "
                "or onehot@1")
        method = ALIASES.get(match["method"], match["method"])
        size_option = SIMPLIFIERS.get(method).size_option
        sizes: tuple[int | None, ...] = tuple(int(s) for s in match["sizes"].split(",") if s) if match["sizes"] else ()
        require(bool(sizes) == (size_option is not None),
                f"proxy spec {text!r}: {method} " + (f"needs sizes (its {size_option}), e.g. {method}:4,8@HOOK"
                                                     if size_option else "takes no sizes"))
        try:  # every option but the size from its default: a family that needs more (an external SAE) says so
            Simplifier.create(method, sizes[0] if sizes else None)
        except TypeError as err:
            raise IllusionProbeError(f"proxy spec {text!r}: {method} cannot be built from a spec ({err}); "
                                     "build it in Python and pass it to ip.fit_proxy") from None
        hooks = tuple(attn_pattern(int(h)) if h.isdigit() else h for h in match["hooks"].split("+"))
        return cls(method, sizes or (None,), hooks)

    def simplifiers(self) -> dict[str, dict[str, Simplifier]]:
        """``{proxy name: {hook: unfitted simplifier}}``, one proxy per size."""
        return {proxy_name(self.method, size, self.hooks): {h: Simplifier.create(self.method, size) for h in self.hooks}
                for size in self.sizes}


@dataclass(frozen=True)
class AuditConfig:
    """Everything an audit needs.

    Attributes:
        model: a checkpoint of ours, a ``save_pretrained`` folder, or a hub name.
        fit: the in-distribution text the proxies are fitted on (the ``train`` split).
        splits: ``(name, path)`` pairs of evaluation text; names starting with ``ood`` are out of
            distribution, the others in distribution.
        proxies: proxy specs (``METHOD[:SIZES]@HOOKS``).
        window: tokens per sequence (default: the model's context).
        stride: tokens between window starts in a document (default: windows do not overlap).
        n_fit_sequences: windows of ``fit`` the proxies are fitted on.
        max_sequences: windows per split at most (the first ones, in document order).
    """

    model: str
    fit: str
    splits: tuple[tuple[str, str], ...]
    proxies: tuple[str, ...]
    window: int | None = None
    stride: int | None = None
    n_fit_sequences: int = 1000
    max_sequences: int = 2000
    evaluation: EvaluationConfig = EvaluationConfig()

    def __post_init__(self) -> None:
        if isinstance(self.splits, Mapping):  # a TOML table {name = path}
            object.__setattr__(self, "splits", tuple(self.splits.items()))
        check_types(self)
        require(bool(self.proxies), "audit: give at least one --proxy, e.g. pca:4,8@blocks.1.hook_resid_pre")
        require(bool(self.splits), "audit: give at least one --split NAME=FILE to evaluate on")
        names = [name for name, _ in self.splits]
        require(len(set(names)) == len(names) and "train" not in names,
                f"audit: split names must be distinct and not 'train' (the fit split), got {names}")
        for name in names:
            require(bool(re.fullmatch(r"[A-Za-z0-9_.-]+", name)), f"audit: split name {name!r} must be letters, "
                    "digits, '_', '.' or '-'")
        for key in ("n_fit_sequences", "max_sequences"):
            require(getattr(self, key) >= 1, f"audit.{key} must be >= 1, got {getattr(self, key)}")
        for spec in self.proxies:
            ProxySpec.parse(spec)


def audit_config(overrides: Mapping[str, Any], config: str | os.PathLike | None = None,
                 settings: Sequence[str] = ()) -> AuditConfig:
    """An :class:`AuditConfig`: a TOML file's ``[audit]`` and ``[evaluation]`` tables, then ``--set`` edits,
    then the command line's own flags (``overrides``, ``None`` values left out)."""
    tables: dict[str, Any] = {section: {} for section in SECTIONS}
    if config is not None:
        found = read_toml(config)
        unknown = [key for key in found if key not in SECTIONS]
        require(not unknown, f"config file {config}: unknown table(s) {unknown}; tables are {', '.join(SECTIONS)}")
        tables.update({k: dict(v) for k, v in found.items()})
    tables = apply_overrides(tables, settings, SECTIONS)
    tables["audit"].update({k: v for k, v in overrides.items() if v is not None and v != {} and v != []})
    audit = dict(tables["audit"])
    for key in ("model", "fit", "splits", "proxies"):
        require(key in audit, f"audit needs {key}: give --{key.rstrip('s') if key != 'proxies' else 'proxy'} "
                f"or set it in the [audit] table of --config")
    evaluation = from_table(EvaluationConfig, tables["evaluation"], "[evaluation]")
    return from_table(AuditConfig, {**audit, "evaluation": evaluation}, "[audit]")


def _check_files(config: AuditConfig) -> None:
    for name, path in [("fit", config.fit), *config.splits]:
        require(Path(path).exists(), f"audit: the {name} text {path} does not exist; give an existing file or folder")


def audit(config: AuditConfig, out: str | os.PathLike, device: str = "auto", progress: bool = True) -> Results:
    """Fit every proxy on the ``fit`` text, evaluate every split, and write ``results.json``, ``results.csv``
    and ``report.html`` into ``out``."""
    from illusion_probe.pipeline import check_output_dir

    with checked_together():  # under torchrun, a problem is printed once
        _check_files(config)
        specs = [ProxySpec.parse(spec) for spec in config.proxies]
        out_dir = check_output_dir(out)
        log(f"loading {config.model}")
        model = load_model(config.model, device)
        backend = Backend.of(model)
        wanted = {name: simplifiers for spec in specs for name, simplifiers in spec.simplifiers().items()}
        for simplifiers in wanted.values():  # hook names, kinds and sizes, before any text is tokenised
            for hook in simplifiers:
                resolve_hook_name(model, hook)
            check_hooks(backend, simplifiers)
        splits = _splits(model, config)
    log(f"fitting {len(wanted)} proxies on {len(splits['train'])} windows of {config.fit}")
    proxies = fit_proxies(model, wanted, splits["train"], config.n_fit_sequences, progress=progress)
    log("evaluating")
    tick = time.perf_counter()
    settings = config.evaluation
    evaluated = SplitSet([split.head(config.max_sequences) for split in splits.values()])
    results = evaluate(model, proxies, evaluated, batch_size=settings.batch_size, batch_tokens=settings.batch_tokens,
                       n_boot=settings.n_boot, ablation=settings.ablation, progress=progress,
                       difficulty_bins=settings.difficulty_bins if evaluated.by_role("id") else 0)  # no gaps without id
    results = results.with_meta(audit=dataclasses.asdict(config), model=config.model,
                                evaluate_seconds=round(time.perf_counter() - tick, 2),
                                text={s.name: s.meta for s in splits.values()}, processes=world().size)
    if world().is_main:
        results.to_csv(out_dir / "results.csv")
        results.to_json(out_dir / "results.json")
        write_report(results, out_dir / "report.html", title=f"illusion-probe audit: {config.model}")
    return results


def _splits(model: torch.nn.Module, config: AuditConfig) -> SplitSet:
    """The fit text as ``train`` and every other file as its own split, tokenised with the model's tokenizer."""
    def text_split(name: str, path: str, role: str, cap: int) -> Split:
        split = Split.from_text(model, path, role=role, window=config.window, name=name, stride=config.stride,
                                max_sequences=cap)
        skipped = ", ".join(f"{n} {why}" for why, n in split.meta["skipped"].items())
        log(f"{name}: {split.meta['windows']} windows, {split.meta['tokens']} tokens from "
             f"{split.meta['documents_used']} documents of {path}" + (f" (skipped: {skipped})" if skipped else ""))
        return split

    splits = [text_split("train", config.fit, "train", max(config.n_fit_sequences, config.max_sequences))]  # fit set
    splits += [text_split(name, path, "ood" if name.startswith("ood") else "id", config.max_sequences)
               for name, path in config.splits]
    return SplitSet(splits)
