"""Faithfulness of simplified proxies to the original model, split by split.

For each batch of sequences (longest first, so little padding is run):

1. the clean model runs once and keeps its residual stream after the last block at the scored
   positions, the residual entering each layer a proxy resumes at, and the clean activations a
   hook metric compares with;
2. each ablation baseline (for ``ce_score``) and each proxy runs once, resuming at its first hooked
   block where the backend allows it, and keeps its own final residual at the scored positions;
   hook metrics are summed as the activations stream past;
3. the scored positions are taken in chunks: the logits of each chunk (model, baselines, proxies)
   come from the final residual through the model's head, and every position metric sums its
   terms per sequence and position category. Full-vocabulary log-probabilities never exist for
   more than one chunk.

Per-sequence sums then feed one sequence-level bootstrap per split (:mod:`illusion_probe.stats`).
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from illusion_probe import difficulty, stats
from illusion_probe.backends import Backend
from illusion_probe.controls import control_gaps, plan_controls
from illusion_probe.distributed import World, all_gather, gather_interleaved, world
from illusion_probe.errors import IllusionProbeError, require
from illusion_probe.hook_names import first_layer, is_after_blocks, is_attention_pattern, resid_pre
from illusion_probe.metrics import AnyMetric, HookMetric, Metric, PositionMean, Predictions, Scored, resolve_metrics
from illusion_probe.provenance import provenance
from illusion_probe.results import DISAGREEMENT_RATIO, Gap, MetricInfo, Record, Results
from illusion_probe.simplify.ablation import MeanAblation, ZeroAblation
from illusion_probe.simplify.fitting import fit_proxies_with
from illusion_probe.simplify.proxy import Proxy, default_name
from illusion_probe.tasks.base import Split, SplitSet, Task, as_split_set, check_tokens

ABLATIONS = ("mean", "zero")
#: Bytes one chunk of full-vocabulary float32 logits may take (the default chunk size follows from it).
CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class ScoredPositions:
    """The scored positions of one batch, flattened.

    Attributes:
        index: ``[n]`` flat indices (``seq * pos + p``) of the positions ``eval_mask`` scores.
        sequence: ``[n]`` which sequence of the batch each belongs to.
        targets: ``[n]`` their target ids.
        categories: position categories: ``all`` plus every boolean label of the split.
        masks: ``[category, n]`` float64, which positions each category keeps.
        n_sequences: sequences in the batch.
    """

    index: Tensor
    sequence: Tensor
    targets: Tensor
    categories: list[str]
    masks: Tensor
    n_sequences: int

    @classmethod
    def of(cls, batch: Split) -> ScoredPositions:
        n_pos = batch.eval_mask.shape[1]
        index = batch.eval_mask.reshape(-1).nonzero().squeeze(1)
        categories = {"all": batch.eval_mask}
        categories.update({name: batch.eval_mask & label for name, label in batch.labels.items()
                           if label.dtype == torch.bool})
        masks = torch.stack(list(categories.values())).reshape(len(categories), -1)[:, index].double()
        return cls(index, index // n_pos, batch.targets.reshape(-1)[index], list(categories), masks, len(batch))

    def rows(self, x: Tensor) -> Tensor:
        """``[batch, pos, ...] -> [n, ...]``: the rows at the scored positions."""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.index)

    def chunks(self, size: int) -> Iterator[slice]:
        for start in range(0, len(self.index), size):
            yield slice(start, start + size)

    def per_sequence(self, terms: Tensor, chunk: slice) -> Tensor:
        """``[term, m] -> [category, term, batch]``: a chunk's terms summed per sequence and category."""
        out = torch.zeros(len(self.categories), len(terms), self.n_sequences, dtype=torch.float64,
                          device=terms.device)
        return out.index_add_(2, self.sequence[chunk], self.masks[:, None, chunk] * terms.double()[None])


class _Sums:
    """Per-sequence sums, keyed ``(proxy, category or hook, metric, term)``, one split at a time.

    Each key's array is allocated once per evaluation, with a row for every sequence of the largest
    split, and is zeroed and reused for the next split; each batch adds into its own rows (``start``
    is the batch's first row). Allocating nothing that outlives a batch inside the loop keeps the
    heap from fragmenting between the passes' large, differently sized temporaries (measured: the
    paper Dyck preset grew by hundreds of MB per split when these arrays were made per split).
    """

    def __init__(self, n_rows: int) -> None:
        self.n_rows = n_rows
        self.start = 0
        self.arrays: dict[Hashable, np.ndarray] = {}

    def add(self, key: tuple[str, str, str, str], values: Tensor) -> None:
        """Add ``values`` ``[batch, ...]`` to the rows of the current batch, kept in their own precision (at least
        float32): a row holds one sequence's sum, and sums across sequences are taken in float64 (:mod:`stats`)."""
        found = values.detach().to("cpu", torch.promote_types(values.dtype, torch.float32)).numpy()
        if key not in self.arrays:
            self.arrays[key] = np.zeros((self.n_rows, *found.shape[1:]), dtype=found.dtype)
        self.arrays[key][self.start:self.start + len(found)] += found

    def table(self, n_sequences: int) -> dict[Hashable, np.ndarray]:
        """The sums of the first ``n_sequences`` rows (the split just evaluated)."""
        return {key: array[:n_sequences] for key, array in self.arrays.items()}

    def reset(self) -> None:
        """Zero every array for the next split."""
        for array in self.arrays.values():
            array.fill(0.0)
        self.start = 0


@dataclass(frozen=True)
class _Plan:
    """What one evaluation runs: metrics, baselines, where each pass resumes, what it watches."""

    position_metrics: list[Metric]
    hook_metrics: list[HookMetric]
    proxies: Mapping[str, Proxy]
    baselines: dict[frozenset[str], Proxy]
    baseline_twin: dict[frozenset[str], str | None]  # a proxy making the very same edit serves as the baseline
    watched: dict[str, dict[str, list[str]]]  # proxy -> hook metric -> hooks
    resume: dict[str, int | None]  # proxy -> the block its pass starts at (None: a whole pass)
    baseline_resume: dict[frozenset[str], int | None]
    answer_ids: Tensor
    scored_on: Mapping[str, frozenset[str]]  # proxy -> the splits it is scored on (absent: every split)

    def scores(self, proxy: str, split: str) -> bool:
        """Whether ``proxy`` is scored on ``split``."""
        return split in self.scored_on.get(proxy, (split,))

    def clean_watched(self) -> set[tuple[str, str]]:
        """``(metric, hook)`` pairs whose clean activation some proxy compares with."""
        return {(m.name, hook) for m in self.hook_metrics if m.reference == "clean"
                for per_metric in self.watched.values() for hook in per_metric.get(m.name, [])}


def evaluate(
    model: torch.nn.Module,
    proxies: Mapping[str, Proxy],
    splits: SplitSet | Mapping[str, Split],
    task: Task | None = None,
    *,
    metrics: Sequence[str | AnyMetric] | None = None,
    answer_ids: Int[Tensor, " answers"] | Sequence[int] | None = None,
    batch_size: int = 128,
    batch_tokens: int | None = 4096,
    chunk_size: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    ablation: str = "mean",
    ablation_sequences: int = 1000,
    difficulty_bins: int = 0,
    controls: Sequence[str] = (),
    progress: bool = True,
) -> Results:
    """Score every proxy against the model on every split.

    Args:
        model: a hooked model ``[batch, pos] -> [batch, pos, d_vocab_out]``.
        proxies: name -> fitted :class:`Proxy`.
        splits: split name -> :class:`Split` (a :class:`SplitSet` from a task, or user splits).
        task: gives ``answer_ids`` (the argmax is taken over them).
        metrics: metric names or objects; ``None`` computes every registered metric.
        answer_ids: output ids a prediction is chosen among when there is no task; ``None`` means the
            model's whole output vocabulary (``d_vocab_out``).
        batch_size: sequences per forward pass at most (128 measured fastest on CPU, ``benchmarks/bench_evaluate.py``).
        batch_tokens: positions per forward pass at most (sequences times the longest), so that long
            sequences come in smaller batches; the passes' temporaries, and so peak memory, grow with
            it. ``None``: no limit.
        chunk_size: scored positions whose logits are held at once; ``None`` keeps one chunk of
            full-vocabulary float32 logits near 64 MiB.
        n_boot: bootstrap resamples of sequences for the 95% intervals (0 disables them).
        seed: seed of the bootstrap resamples (split ``i`` uses ``seed + i``).
        ablation: ``"mean"`` (fit on the train split) or ``"zero"``: the baseline of ``ce_score``.
        ablation_sequences: train sequences the mean ablation is fit on.
        difficulty_bins: when positive, bin scored positions by the clean model's confidence (quantiles on
            the first ``id`` split) and add each mean-over-positions metric's ``difficulty_matched`` value
            per split (see :mod:`illusion_probe.difficulty`); costs one clean pass per split.
        controls: names of proxies to explain with the refit ceiling and the random baseline (see
            :mod:`illusion_probe.controls`): their simplifiers are refitted on half of each OOD split and
            drawn at random, and their gaps gain the categories ``heldout``, ``refit_ceiling``,
            ``refit_closes`` and ``random``; what the controls evaluate is in ``Results.control_records``.
        progress: show a progress bar.

    Returns:
        :class:`Results`: every metric per split, proxy and position category (hook metrics per
        hook), and ID-vs-OOD gaps. Under ``torchrun`` each process scores its share of every split
        and every process returns the same results (:mod:`illusion_probe.distributed`).
    """
    splits = as_split_set(splits, "evaluate")
    backend = Backend.of(model)
    require(isinstance(batch_size, int) and batch_size > 0, f"evaluate: batch_size must be a positive integer, got {batch_size!r}")
    require(batch_tokens is None or (isinstance(batch_tokens, int) and batch_tokens > 0),
            f"evaluate: batch_tokens must be a positive integer or None, got {batch_tokens!r}")
    require(isinstance(n_boot, int) and n_boot >= 0, f"evaluate: n_boot must be a non-negative integer, got {n_boot!r}")
    require(isinstance(ablation_sequences, int) and ablation_sequences > 0,
            f"evaluate: ablation_sequences must be a positive integer, got {ablation_sequences!r}")
    require(chunk_size is None or (isinstance(chunk_size, int) and chunk_size > 0),
            f"evaluate: chunk_size must be a positive integer or None, got {chunk_size!r}")
    chunk = chunk_size or max(1, CHUNK_BYTES // (4 * backend.d_vocab_out))
    require(isinstance(difficulty_bins, int) and not isinstance(difficulty_bins, bool) and difficulty_bins >= 0,
            f"evaluate: difficulty_bins must be a non-negative integer, got {difficulty_bins!r}")
    reference = next((s.name for s in splits.values() if s.role == "id"), None)
    require(not difficulty_bins or reference is not None, "evaluate: difficulty_bins matches every split to the "
            "confidence on an in-distribution split, and there is none; give a split with role 'id' or pass 0")
    require(isinstance(controls, Sequence) and not isinstance(controls, str),
            f"evaluate: controls must be a list of proxy names, got {controls!r}")
    ids, chosen = _checked(backend, proxies, splits, task, metrics, answer_ids, ablation)
    control_plan = None
    if controls:  # after every check: the controls fit proxies
        control_plan = plan_controls(backend, proxies, splits, list(dict.fromkeys(controls)), seed)
        proxies = {**proxies, **control_plan.proxies}
        splits = SplitSet([*splits.values(), *control_plan.splits])
    plan = _plan(backend, proxies, splits, ids, chosen, ablation, ablation_sequences,
                 control_plan.scored_on if control_plan else {})
    records: list[Record] = []
    samples: dict[tuple[str, str, str, str, str], np.ndarray] = {}
    timings = defaultdict(float)
    was_training = model.training
    model.eval()
    here = world()
    bar = tqdm(total=sum(len(range(len(s))[here.interleaved(len(s))]) for s in splits.values()), desc="evaluate",
               unit="seq", disable=not (progress and here.is_main))
    try:
        with torch.no_grad():
            if difficulty_bins:
                confidences = {s.name: difficulty.model_confidence(backend, s, plan.answer_ids, batch_size, chunk)
                               for s in splits.values()}
                splits = difficulty.with_confidence_bins(splits, confidences, reference, difficulty_bins)
            sums = _Sums(max(len(split) for split in splits.values()))
            mine: dict[int, list[Record]] = {}  # each split's records, from one process

            def bootstrap(index: int, split: Split, table: dict[Hashable, np.ndarray]) -> None:
                weights = stats.bootstrap_weights(len(split), n_boot, seed + index)
                mine[index] = _split_records(plan, split, table, weights, samples)

            # Under torchrun every split is evaluated before any is combined: no process waits for another
            # until the end. Split i's table then goes whole to every process, and process i % size bootstraps it.
            shards: dict[int, dict[Hashable, np.ndarray]] = {}
            for index, split in enumerate(splits.values()):
                sums.reset()
                shard = _shard(split, here)
                _evaluate_split(backend, plan, shard, sums, batch_size, batch_tokens, chunk, timings, bar)
                if here.is_distributed:
                    shards[index] = {key: rows.copy() for key, rows in sums.table(len(shard)).items()}
                else:
                    bootstrap(index, split, sums.table(len(split)))
            owned = []
            for index, split in enumerate(splits.values()):
                if index in shards:
                    table = _gathered(shards.pop(index), len(split))
                    if index % here.size == here.rank:
                        owned.append((index, split, table))
            for job in owned:
                bootstrap(*job)
            records = _exchanged(mine, samples)
    finally:
        bar.close()
        model.train(was_training)
    if difficulty_bins:
        means = [m.name for m in plan.position_metrics if isinstance(m, PositionMean)]
        records += difficulty.matched_records(records, samples, reference, means)
    gaps = _gaps(records, samples)
    control_records: list[Record] = []
    if control_plan is not None:
        control_records = [r for r in records if control_plan.is_control(r)]
        records = [r for r in records if not control_plan.is_control(r)]
        gaps = [g for g in gaps if not control_plan.is_control(g)]
        gaps += control_gaps(control_plan, [*records, *control_records], samples, reference or "",
                             [m.name for m in plan.position_metrics])
    infos = [MetricInfo(m.name, m.label, m.higher_is_better, "positions" if isinstance(m, Metric) else "hooks")
             for m in [*plan.position_metrics, *plan.hook_metrics]]
    return Results(records=records, gaps=gaps, control_records=control_records, metrics=infos, meta={
        "evaluation": {"batch_size": batch_size, "batch_tokens": batch_tokens, "chunk_size": chunk, "n_boot": n_boot, "seed": seed,
                       "ablation": ablation, "ablation_sequences": ablation_sequences,
                       "difficulty_bins": difficulty_bins, "difficulty_reference": reference if difficulty_bins else None,
                       "resumed_at": dict(plan.resume),
                       "baseline_shared_with": {"+".join(sorted(h)): twin for h, twin in plan.baseline_twin.items()
                                                if twin is not None}},
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "backend": backend.kind,
        "size_options": {s.method: s.size_option for proxy in proxies.values() for s in proxy.simplifiers.values()
                         if s.size_option is not None},
        "task": task.to_dict() if task is not None else None,
        "splits": {s.name: {"role": s.role, "n_sequences": len(s), "n_scored": s.n_scored} for s in splits.values()},
        "controls": {"proxies": list(dict.fromkeys(controls)), "reference": reference} if controls else None,
        **provenance(),
    })


def _checked(backend: Backend, proxies: Mapping[str, Proxy], splits: SplitSet, task: Task | None,
             metrics: Sequence[str | AnyMetric] | None, answer_ids: Any, ablation: str) -> tuple[Tensor, list[AnyMetric]]:
    """Check the proxies, splits, answer ids and metrics before any work (one-line errors); returns the answer ids
    and the metric objects."""
    require(isinstance(proxies, Mapping) and len(proxies) > 0, "evaluate needs at least one proxy: {name: ip.Proxy}; "
            "fit one with ip.fit_proxy")
    for name, proxy in proxies.items():
        if not isinstance(proxy, Proxy):
            raise IllusionProbeError(f"evaluate: proxy {name!r} is a {type(proxy).__name__}, not an ip.Proxy; "
                                     "build it with ip.fit_proxy")
        proxy.check_compatible(backend.model)
        late = [h for h in proxy.hook_names if is_after_blocks(h)]
        require(not late, f"evaluate: proxy {name!r} edits {late}, after the last block; evaluation scores the "
                "final residual through the model's head, so simplify the blocks or the embeddings instead")
    require(ablation in ABLATIONS, f"evaluate: unknown ablation {ablation!r}; choose one of {ABLATIONS}")
    for split in splits.values():
        check_tokens(split.tokens, backend.d_vocab, backend.n_ctx, f"split {split.name!r}")
        require(len(split) > 0 and split.n_scored > 0, f"evaluate: split {split.name!r} has no scored position; "
                "give it sequences with eval_mask set, or leave it out")
    ids = _answer_ids(backend, task, answer_ids)
    for split in splits.values():
        targets = split.targets[split.eval_mask]
        require(bool(((targets >= 0) & (targets < backend.d_vocab_out)).all()),
                f"evaluate: split {split.name!r} has targets outside the model's output vocabulary "
                f"(d_vocab_out={backend.d_vocab_out})")
    return ids, resolve_metrics(None if metrics is None else list(metrics))


def _plan(backend: Backend, proxies: Mapping[str, Proxy], splits: SplitSet, ids: Tensor, chosen: list[AnyMetric],
          ablation: str, ablation_sequences: int, scored_on: Mapping[str, frozenset[str]]) -> _Plan:
    """Fit the ablation baselines and decide what every pass runs and watches."""
    position = [m for m in chosen if isinstance(m, Metric)]
    hook_metrics = [m for m in chosen if isinstance(m, HookMetric)]
    watched = {name: {m.name: m.watched(_dictionary_hooks(p) if m.reference == "latents" else list(p.hook_names))
                      for m in hook_metrics} for name, p in proxies.items()}
    for name, per_metric in watched.items():
        for metric in hook_metrics:
            outside = [h for h in per_metric[metric.name] if metric.reference == "input" and h not in proxies[name].hook_names]
            require(not outside, f"metric {metric.name!r} watches {outside} with reference 'input', but proxy "
                    f"{name!r} does not simplify them")
    baselines: dict[frozenset[str], Proxy] = {}
    if any(m.uses_baseline for m in position):
        baselines = _ablation_proxies(backend, proxies, splits, ablation, ablation_sequences)
    everywhere = {n: p for n, p in proxies.items() if set(splits) <= scored_on.get(n, set(splits))}  # on every split
    twins = {hooks: next((n for n, p in everywhere.items() if p.same_edit(b)), None) for hooks, b in baselines.items()}
    resume: dict[str, int | None] = {}
    for name, proxy in proxies.items():
        hooks = [*proxy.read_hooks, *(h for hs in watched[name].values() for h in hs)]
        resume[name] = _resume_layer(backend, hooks)
    baseline_resume = {hooks: _resume_layer(backend, sorted(hooks)) for hooks in baselines}
    return _Plan(position, hook_metrics, proxies, baselines, twins, watched, resume, baseline_resume, ids, scored_on)


def _answer_ids(backend: Backend, task: Task | None, answer_ids: Any) -> Tensor:
    if task is not None:
        require(answer_ids is None, "evaluate: give answer_ids or a task (whose answer_ids are used), not both")
        ids = task.answer_ids
    elif answer_ids is None:
        ids = torch.arange(backend.d_vocab_out)
    else:
        ids = torch.as_tensor(answer_ids)
    require(ids.ndim == 1 and len(ids) > 0 and not ids.dtype.is_floating_point,
            "evaluate: answer_ids must be a non-empty 1-D list of integer output ids")
    require(bool(((ids >= 0) & (ids < backend.d_vocab_out)).all()),
            f"evaluate: answer_ids must lie in the model's output vocabulary [0, {backend.d_vocab_out})")
    return ids.long().to(backend.device)


def _resume_layer(backend: Backend, hooks: Sequence[str]) -> int | None:
    layer = first_layer(list(hooks))
    return layer if layer is not None and backend.can_resume(layer) else None


def _ablation_proxies(backend: Backend, proxies: Mapping[str, Proxy], splits: SplitSet, ablation: str,
                      n_sequences: int) -> dict[frozenset[str], Proxy]:
    """One ablation proxy per distinct hook set: mean (fit on train) or zero; patterns are zero-ablated."""
    train = splits.by_role("train")
    require(ablation == "zero" or bool(train),
            "evaluate: the mean-ablation baseline of ce_score is fit on a 'train' split, and there is none; "
            "add the train split or pass ablation='zero'")
    hook_sets = list(dict.fromkeys(frozenset(proxy.hook_names) for proxy in proxies.values()))
    wanted = {}
    for hooks in hook_sets:
        simplifiers = {h: ZeroAblation() if ablation == "zero" or is_attention_pattern(h) else MeanAblation()
                       for h in sorted(hooks)}
        wanted[default_name(simplifiers)] = simplifiers
    fitted = fit_proxies_with(backend, wanted, train[0] if train else next(iter(splits.values())),
                              n_sequences=n_sequences, allow_non_train=True)
    return dict(zip(hook_sets, fitted.values(), strict=True))


def _evaluate_split(backend: Backend, plan: _Plan, split: Split, sums: _Sums, batch_size: int,
                    batch_tokens: int | None, chunk: int, timings: dict[str, float], bar: Any) -> None:
    """Add the per-sequence sums of every metric on ``split`` to ``sums``, in longest-first order."""
    resume_layers = {layer for layer in [*plan.resume.values(), *plan.baseline_resume.values()] if layer is not None}
    clean_watched = plan.clean_watched()
    for batch in split.batches(batch_size, longest_first=True, max_tokens=batch_tokens):
        batch = batch.to(backend.device)
        scored = ScoredPositions.of(batch)
        tick = time.perf_counter()
        entering: dict[int, Tensor] = {}
        references: dict[tuple[str, str], Tensor] = {}
        metrics_by_name = {m.name: m for m in plan.hook_metrics}
        hooks = [(resid_pre(layer), _store(entering, layer)) for layer in sorted(resume_layers)]
        hooks += [(hook, _store(references, (metric, hook), metrics_by_name[metric].prepare))
                  for metric, hook in sorted(clean_watched)]
        clean = scored.rows(backend.final_residual(batch.tokens, batch.real_mask, hooks))
        timings["clean_s"] += time.perf_counter() - tick

        tick = time.perf_counter()
        baseline_rows = {}
        for hooks_key, baseline in plan.baselines.items():
            if plan.baseline_twin[hooks_key] is None:
                baseline_rows[hooks_key] = scored.rows(_run(backend, batch, baseline.fwd_hooks(),
                                                            plan.baseline_resume[hooks_key], entering))
        timings["baselines_s"] += time.perf_counter() - tick

        tick = time.perf_counter()
        proxy_rows = {}
        for name, proxy in plan.proxies.items():
            if not plan.scores(name, split.name):
                continue
            hooks = _observed_hooks(plan, name, proxy, batch.real_mask, references, sums)
            proxy_rows[name] = scored.rows(_run(backend, batch, hooks, plan.resume[name], entering))
        for hooks_key, twin in plan.baseline_twin.items():
            if twin is not None:
                baseline_rows[hooks_key] = proxy_rows[twin]
        timings["proxies_s"] += time.perf_counter() - tick

        tick = time.perf_counter()
        _score(backend, plan, scored, clean, baseline_rows, proxy_rows, chunk, sums)
        timings["scoring_s"] += time.perf_counter() - tick
        sums.start += len(batch)
        bar.update(len(batch))


def _shard(split: Split, here: World) -> Split:
    """This process's sequences of ``split``: every ``here.size``-th in longest-first order, so that the shards of
    all processes cost alike and their per-sequence rows interleave into the order one process would use."""
    if not here.is_distributed:
        return split
    order = torch.sort(split.lengths, descending=True, stable=True).indices
    return split.select(order[here.interleaved(len(split))])


def _gathered(table: dict[Hashable, np.ndarray], n_sequences: int) -> dict[Hashable, np.ndarray]:
    """The per-sequence sums of the whole split from every process's shard (:func:`_shard`); alone, ``table``.

    The arrays travel as one ``[sequences, columns]`` block per dtype (thousands of small arrays cost more to
    send than their bytes), laid out by the union of every process's keys (a key a process lacks is zero).
    """
    if not world().is_distributed:
        return table
    found = [meta for _, meta in all_gather({}, [[list(k), a.dtype.str, list(a.shape[1:])] for k, a in table.items()])]
    layout = list(dict.fromkeys((tuple(k), dtype, tuple(shape)) for keys in found for k, dtype, shape in keys))
    rows = len(next(iter(table.values()))) if table else 0
    blocks = {dtype: torch.from_numpy(np.concatenate(
        [table[k].reshape(rows, -1) if k in table else np.zeros((rows, int(np.prod(shape))), dtype)
         for k, d, shape in layout if d == dtype], axis=1)) for dtype in dict.fromkeys(d for _, d, _ in layout)}
    whole = {dtype: block.numpy() for dtype, block in gather_interleaved(blocks, n_sequences).items()}
    start = dict.fromkeys(whole, 0)
    out = {}
    for key, dtype, shape in layout:
        width = int(np.prod(shape))
        out[key] = whole[dtype][:, start[dtype]:start[dtype] + width].reshape(n_sequences, *shape)
        start[dtype] += width
    return out


def _exchanged(mine: dict[int, list[Record]], samples: dict[tuple[str, str, str, str, str], np.ndarray]
               ) -> list[Record]:
    """Every split's records in split order, from the process that computed them (``mine``: split index ->
    records), with their bootstrap samples added to ``samples``; alone, ``mine``'s records."""
    if world().is_distributed:
        sent = {"records": {index: [dataclasses.asdict(r) for r in records] for index, records in mine.items()},
                "samples": [list(key) for key in samples]}  # their rows, in one array: fewer, larger messages
        stacked = {"samples": torch.from_numpy(np.stack(list(samples.values())))} if samples else {}
        for tensors, found in all_gather(stacked, sent):
            mine.update({int(index): [Record(**r) for r in records] for index, records in found["records"].items()})
            samples.update({tuple(key): boot.numpy() for key, boot in zip(found["samples"], tensors.get("samples", []),
                                                                         strict=True)})
    return [record for index in sorted(mine) for record in mine[index]]


def _store(sink: dict, key: Any, transform: Any = None) -> Any:
    """A capture hook keeping ``transform(activation)`` (the activation itself by default) in ``sink[key]``."""
    def hook(act: Tensor, hook: Any) -> None:
        sink[key] = act.detach() if transform is None else transform(act.detach())
    return hook


def _run(backend: Backend, batch: Split, hooks: list, layer: int | None, entering: dict[int, Tensor]) -> Tensor:
    return backend.final_residual(batch.tokens, batch.real_mask, hooks,
                                  resume=None if layer is None else (layer, entering[layer]))


def _dictionary_hooks(proxy: Proxy) -> list[str]:
    return [hook for hook, simplifier in proxy.simplifiers.items() if simplifier.has_latents]


def _observed_hooks(plan: _Plan, name: str, proxy: Proxy, real: Tensor, references: dict[tuple[str, str], Tensor],
                    sums: _Sums) -> list:
    """The proxy's hooks, wrapped to feed its hook metrics (``input`` and ``latents`` references), then observers
    that compare with the clean activations (``clean`` references)."""
    inputs = [m for m in plan.hook_metrics if m.reference == "input"]
    latent_metrics = [m for m in plan.hook_metrics if m.reference == "latents"]
    watched = plan.watched[name]
    simplifiers = proxy.simplifiers

    def on_apply(hook: str, act: Tensor, out: Tensor) -> None:
        for metric in inputs:
            if hook in watched[metric.name]:
                for term, values in metric.terms(act, out, real).items():
                    sums.add((name, hook, metric.name, term), values)

    def on_latents(hook: str, latents: Tensor) -> None:
        frequency = getattr(simplifiers[hook], "train_frequency", None)
        for metric in latent_metrics:
            if hook in watched[metric.name]:
                for term, values in metric.terms(latents, frequency, real).items():
                    sums.add((name, hook, metric.name, term), values)

    hooks = proxy.fwd_hooks(on_apply=on_apply if inputs else None,
                            on_latents=on_latents if latent_metrics else None)
    for metric in plan.hook_metrics:
        if metric.reference == "clean":
            hooks += [(hook, _compare(metric, name, hook, references, real, sums)) for hook in watched[metric.name]]
    return hooks


def _compare(metric: HookMetric, proxy: str, name: str, references: dict, real: Tensor, sums: _Sums) -> Any:
    """An observer hook comparing the activation at ``name`` with the clean one kept for ``metric``."""
    def observe(act: Tensor, hook: Any) -> None:
        for term, values in metric.terms(references[(metric.name, name)], act.detach(), real).items():
            sums.add((proxy, name, metric.name, term), values)
    return observe


def _score(backend: Backend, plan: _Plan, scored: ScoredPositions, clean: Tensor, baseline_rows: dict,
           proxy_rows: dict[str, Tensor], chunk: int, sums: _Sums) -> None:
    """Sum every position metric's terms per sequence and category, one chunk of scored positions at a time."""
    totals: dict[str, Tensor] = {}
    names: dict[str, list[tuple[str, str]]] = {}
    for part in scored.chunks(chunk):
        model = Predictions(backend.head(clean[part]), plan.answer_ids)
        baselines = {hooks: Predictions(backend.head(rows[part]), plan.answer_ids)
                     for hooks, rows in baseline_rows.items()}
        for name, rows in proxy_rows.items():
            context = Scored(scored.targets[part], model, Predictions(backend.head(rows[part]), plan.answer_ids),
                             baselines.get(frozenset(plan.proxies[name].hook_names)))
            terms = {("", "count"): torch.ones_like(scored.targets[part], dtype=torch.float64)}
            for metric in plan.position_metrics:
                terms.update({(metric.name, term): values for term, values in metric.terms(context).items()})
            names[name] = list(terms)
            summed = scored.per_sequence(torch.stack([t.double() for t in terms.values()]), part)
            totals[name] = summed if name not in totals else totals[name] + summed
    for name, summed in totals.items():
        for c, category in enumerate(scored.categories):
            for t, (metric, term) in enumerate(names[name]):
                sums.add((name, category, metric, term), summed[c, t])


def _proxy_method(proxy: Proxy) -> tuple[str, int | None]:
    methods = {s.method for s in proxy.simplifiers.values()}
    sizes = {s.size for s in proxy.simplifiers.values()}
    return (methods.pop() if len(methods) == 1 else "mixed"), (sizes.pop() if len(sizes) == 1 else None)


def _split_records(plan: _Plan, split: Split, table: dict[Hashable, np.ndarray], weights: np.ndarray,
                   samples: dict[tuple[str, str, str, str, str], np.ndarray]) -> list[Record]:
    """One record per (proxy, category or hook, metric) of ``split`` from its per-sequence sums ``table``;
    each record's ``[n_boot]`` bootstrap samples go into ``samples`` (for the gaps)."""
    grouped: dict[tuple[str, str, str], dict[str, Hashable]] = defaultdict(dict)
    for key in table:
        grouped[key[:3]][key[3]] = key  # (proxy, category or hook, metric) -> {term: column}
    records = []
    for name, proxy in plan.proxies.items():
        if not plan.scores(name, split.name):
            continue
        # One matrix product per proxy: every column of the split at once would be a large temporary.
        resampled = stats.Resampled.of({k: v for k, v in table.items() if k[0] == name}, weights)
        method, size = _proxy_method(proxy)
        base = dict(split=split.name, role=split.role, proxy=name, method=method, size=size,
                    n_sequences=len(split), hooks="+".join(proxy.hook_names))
        categories = [key[1] for key in grouped if key[0] == name and key[2] == ""]
        for category in categories:
            count = (name, category, "", "count")
            for metric in plan.position_metrics:
                est, boot = resampled.estimate(metric.reduce, {**grouped[(name, category, metric.name)],
                                                               "count": count})
                samples[(split.name, name, category, metric.name, "")] = boot
                records.append(Record(**base, category=category, metric=metric.name, value=est.value,
                                      ci_low=est.ci_low, ci_high=est.ci_high,
                                      n_positions=int(resampled.totals[count])))
        for metric in plan.hook_metrics:
            for hook in plan.watched[name][metric.name]:
                if (name, hook, metric.name) not in grouped:
                    continue  # the hook never fired (no real token)
                est, boot = resampled.estimate(metric.reduce, grouped[(name, hook, metric.name)])
                samples[(split.name, name, "all", metric.name, hook)] = boot
                records.append(Record(**base, category="all", metric=metric.name, value=est.value,
                                      ci_low=est.ci_low, ci_high=est.ci_high, hook=hook,
                                      n_positions=int(split.real_mask.sum())))
    return records


def _gaps(records: list[Record], samples: dict[tuple[str, str, str, str, str], np.ndarray]) -> list[Gap]:
    """metric(id) - metric(ood) per proxy, category and hook; splits are resampled independently, so samples subtract."""
    cells = {(r.split, r.proxy, r.category, r.metric, r.hook): r for r in records}
    id_splits = list(dict.fromkeys(r.split for r in records if r.role == "id"))
    ood_splits = list(dict.fromkeys(r.split for r in records if r.role == "ood"))
    gaps = []
    for (split, proxy, category, metric, hook), rec in cells.items():
        if split not in id_splits:
            continue
        for ood in ood_splits:
            other = cells.get((ood, proxy, category, metric, hook))
            if other is None:
                continue
            diff = samples[(split, proxy, category, metric, hook)] - samples[(ood, proxy, category, metric, hook)]
            low, high = stats.interval(diff)
            gaps.append(Gap(proxy=proxy, method=rec.method, size=rec.size, category=category, metric=metric,
                            id_split=split, ood_split=ood, value=rec.value - other.value, ci_low=low, ci_high=high,
                            hook=hook, p_value=stats.bootstrap_p_value(rec.value - other.value, diff)))
            if metric == "agreement":  # near 1, a ratio of disagreement rates says more than a difference
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = (1 - samples[(ood, proxy, category, metric, hook)]) / (1 - samples[(split, proxy, category, metric, hook)])
                    value = (1 - other.value) / (1 - rec.value) if rec.value != 1 else float("nan")
                low, high = stats.interval(np.where(np.isfinite(ratio), ratio, np.nan))
                gaps.append(Gap(proxy=proxy, method=rec.method, size=rec.size, category=category,
                                metric=DISAGREEMENT_RATIO, id_split=split, ood_split=ood, value=value, ci_low=low,
                                ci_high=high, hook=hook))
    return gaps
