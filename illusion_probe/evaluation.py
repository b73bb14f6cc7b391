"""Faithfulness of simplified proxies to the original model, split by split.

Sequences are batched longest first (little padding). For each batch the clean
model runs once; its logits, the residual stream entering the earliest hooked
layer, and the attention patterns that ``attn_agreement`` needs are kept. Each
proxy then reruns only the layers from its first hooked block on
(:class:`~illusion_probe.passes.Runner`; a full pass where no way to resume is
verified). Per-sequence sums of every metric feed one sequence-level bootstrap
per split (:mod:`illusion_probe.stats`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from illusion_probe import stats
from illusion_probe.errors import IllusionProbeError, require
from illusion_probe.hook_names import is_attention_pattern, is_per_head, layer_of
from illusion_probe.memory import HeapTrimmer
from illusion_probe.models import model_backend
from illusion_probe.passes import Recorder, Runner, run_group, start_layer
from illusion_probe.provenance import provenance
from illusion_probe.results import Gap, Record, Results
from illusion_probe.simplify.ablation import MeanAblation, ZeroAblation
from illusion_probe.simplify.proxy import Proxy, fit_proxy
from illusion_probe.tasks.base import Split, SplitSet, Task
from illusion_probe.training import predict

ABLATIONS = ("mean", "zero")
POSITION_METRICS = ("acc_model", "acc_proxy", "agreement", "kl")


@dataclass
class _Sums:
    """Per-sequence sums of one table (a proxy, the model, or an ablation baseline) on one split:
    lists of per-batch arrays, concatenated at the end."""

    by_category: dict[str, dict[str, list[np.ndarray]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    by_hook: dict[str, dict[str, list[np.ndarray]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))

    def add(self, scored: _Scored, names: tuple[str, ...], terms: Tensor) -> None:
        """Add one batch of position terms ``[term, n]`` (named ``names``), summed per sequence and category."""
        per_sequence = scored.per_sequence(terms)
        for c, category in enumerate(scored.names):
            for t, name in enumerate(names):
                self.by_category[category][name].append(per_sequence[c, t])

    @staticmethod
    def _concat(table: dict[str, dict[str, list[np.ndarray]]]) -> dict[str, dict[str, np.ndarray]]:
        return {key: {name: np.concatenate(parts) for name, parts in inner.items()} for key, inner in table.items()}

    def categories(self) -> dict[str, dict[str, np.ndarray]]:
        return self._concat(self.by_category)

    def hooks(self) -> dict[str, dict[str, np.ndarray]]:
        return self._concat(self.by_hook)


def _to_numpy(x: Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy()


@dataclass(frozen=True)
class _Scored:
    """The scored positions of one batch, flattened: metrics are computed on these ``n`` alone.

    Attributes:
        index: ``[n]`` flat indices (``seq * pos + p``) of the positions ``eval_mask`` scores.
        sequence: ``[n]`` which sequence of the batch each belongs to.
        targets: ``[n]`` their target tokens.
        names: position categories: ``all`` plus every boolean label of the split.
        masks: ``[category, n]`` float64, which scored positions each category keeps.
        n_sequences: sequences in the batch.
    """

    index: Tensor
    sequence: Tensor
    targets: Tensor
    names: list[str]
    masks: Tensor
    n_sequences: int

    @classmethod
    def of(cls, split: Split) -> _Scored:
        n_seq, n_pos = split.eval_mask.shape
        index = split.eval_mask.reshape(-1).nonzero().squeeze(1)
        categories = {"all": split.eval_mask}
        for name, label in split.labels.items():
            if label.dtype == torch.bool:
                categories[name] = split.eval_mask & label
        full = torch.stack(list(categories.values())).reshape(len(categories), -1)
        return cls(index, index // n_pos, split.targets.reshape(-1)[index], list(categories), full[:, index].double(),
                   n_seq)

    def take(self, logits: Tensor) -> Tensor:
        """``[batch, pos, d_vocab] -> [n, d_vocab]``: the logits at the scored positions."""
        return logits.reshape(-1, logits.shape[-1]).index_select(0, self.index)

    def per_sequence(self, terms: Tensor) -> np.ndarray:
        """``[term, n] -> [category, term, batch]``: each term summed per sequence within each category."""
        out = torch.zeros(len(self.names), len(terms), self.n_sequences, dtype=torch.float64, device=terms.device)
        return _to_numpy(out.index_add_(2, self.sequence, self.masks[:, None, :] * terms.double()[None]))


def _proxy_method(proxy: Proxy) -> tuple[str, int | None]:
    methods = {s.method for s in proxy.simplifiers.values()}
    sizes = {s.size for s in proxy.simplifiers.values()}
    return (methods.pop() if len(methods) == 1 else "mixed"), (sizes.pop() if len(sizes) == 1 else None)


def _attention_layers(hooks: list[str]) -> list[int]:
    """Layers whose attention pattern a proxy changes directly (q, k or pattern hooks)."""
    layers = set()
    for hook in hooks:
        if is_attention_pattern(hook) or (is_per_head(hook) and any(t in hook for t in ("hook_q", "hook_k", ".q.", ".k."))):
            layers.add(layer_of(hook))
    return sorted(layer for layer in layers if layer is not None)


@dataclass(frozen=True)
class _Reference:
    """The clean model's log-probabilities and predictions at the scored positions of a batch
    (``[n, d_vocab]`` and ``[n]`` as in :class:`_Scored`), which every proxy is compared with."""

    logp_model: Tensor
    pred_model: Tensor

    @classmethod
    def of(cls, scored: _Scored, clean: Tensor, answer_ids: Tensor) -> _Reference:
        logits = scored.take(clean)
        return cls(F.log_softmax(logits.float(), dim=-1), predict(logits, answer_ids))


def _cross_entropy(logp: Tensor, targets: Tensor) -> Tensor:
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


#: Per-sequence sums of each table: the model's own (``count`` is the number of scored positions),
#: each proxy's, and each ablation baseline's (a baseline's ``ce_ablated`` is read from a proxy's
#: ``ce_proxy`` where a proxy makes the very same edit, see :meth:`Proxy.same_edit`).
MODEL_TERMS = ("count", "acc_model", "ce_model")
PROXY_TERMS = ("acc_proxy", "agreement", "kl", "ce_proxy")
BASELINE_TERMS = ("ce_ablated",)
MODEL = ("model",)  # key of the model's table; proxies' tables are keyed by their (string) names


def _model_terms(ref: _Reference, scored: _Scored) -> Tensor:
    """``[term, n]``: each of :data:`MODEL_TERMS` at the scored positions."""
    return torch.stack([torch.ones_like(ref.logp_model[:, 0]), (ref.pred_model == scored.targets).float(),
                        _cross_entropy(ref.logp_model, scored.targets)])


def _proxy_terms(ref: _Reference, scored: _Scored, proxied: Tensor, answer_ids: Tensor) -> Tensor:
    """``[term, n]``: each of :data:`PROXY_TERMS` of one proxy's logits at the scored positions."""
    logits = scored.take(proxied)
    logp_proxy = F.log_softmax(logits.float(), dim=-1)
    pred_proxy = predict(logits, answer_ids)
    return torch.stack([
        (pred_proxy == scored.targets).float(),
        (pred_proxy == ref.pred_model).float(),
        (ref.logp_model.exp() * (ref.logp_model - logp_proxy)).sum(-1),
        _cross_entropy(logp_proxy, scored.targets),
    ])


def _ev_terms(act: Tensor, out: Tensor, real: Tensor) -> dict[str, np.ndarray]:
    """Per-sequence sums of ||x - x_hat||^2, ||x||^2, x and the token count over real positions.

    Sums within one sequence run in float32 (or the activations' dtype if wider); the sums
    across sequences that the metric needs are taken in float64 afterwards.
    """
    dtype = torch.promote_types(act.dtype, torch.float32)
    x, x_hat, mask = act.to(dtype), out.to(dtype), real.to(dtype)
    features = tuple(range(2, x.ndim))  # no flatten: a per-head hook's activations need not be contiguous
    return {
        "err": _to_numpy(((x - x_hat).square().sum(features) * mask).sum(1)),
        "sq": _to_numpy((x.square().sum(features) * mask).sum(1)),
        "total": _to_numpy(torch.einsum("bp,bp...->b...", mask, x).reshape(len(x), -1)),
        "count": _to_numpy(real.sum(dim=1)),
    }


def _attn_terms(clean_argmax: Tensor, proxied: Tensor, real: Tensor) -> dict[str, np.ndarray]:
    """Per-sequence sums of argmax agreement of attention rows at real queries.

    ``clean_argmax`` is ``[batch, head, query]`` (computed once per batch), ``proxied`` the proxy's
    pattern ``[batch, head, query, key]``.
    """
    same = (clean_argmax == proxied.argmax(-1)) & real[:, None, :]
    return {"num": _to_numpy(same.sum(dim=(1, 2))), "den": _to_numpy(real.sum(dim=1) * clean_argmax.shape[1])}


def _ablation_proxies(
    model: torch.nn.Module, proxies: Mapping[str, Proxy], splits: SplitSet, ablation: str, n_sequences: int
) -> dict[frozenset[str], Proxy]:
    """One ablation proxy per distinct hook set: mean (fit on train) or zero; patterns are zero-ablated."""
    out: dict[frozenset[str], Proxy] = {}
    train = splits.by_role("train")
    for proxy in proxies.values():
        hooks = frozenset(proxy.hook_names)
        if hooks in out:
            continue
        simplifiers = {
            h: ZeroAblation() if ablation == "zero" or is_attention_pattern(h) or not train else MeanAblation()
            for h in sorted(hooks)
        }
        split = train[0] if train else next(iter(splits.values()))
        out[hooks] = fit_proxy(model, simplifiers, split, n_sequences=n_sequences, allow_non_train=not train)
    return out


def evaluate(
    model: torch.nn.Module,
    proxies: Mapping[str, Proxy],
    splits: SplitSet | Mapping[str, Split],
    task: Task | None = None,
    *,
    batch_size: int = 128,
    n_boot: int = 1000,
    seed: int = 0,
    ablation: str = "mean",
    ablation_sequences: int = 1000,
    reuse_prefix: bool = True,
    proxy_batch: int = 1,
    progress: bool = True,
) -> Results:
    """Score every proxy against the model on every split.

    Args:
        model: a hooked model ``[batch, pos] -> [batch, pos, d_vocab]``.
        proxies: name -> fitted :class:`Proxy`.
        splits: split name -> :class:`Split` (a :class:`SplitSet` from a task, or user splits).
        task: gives ``answer_ids`` (argmax is taken over them); ``None`` scores over the full vocabulary.
        batch_size: sequences per forward pass.
        n_boot: bootstrap resamples of sequences for the 95% intervals (0 disables them).
        seed: seed of the bootstrap resamples.
        ablation: ``"mean"`` (fit on the train split) or ``"zero"``: the baseline of ``ce_score``.
        ablation_sequences: train sequences the mean ablation is fit on.
        reuse_prefix: rerun each proxy only from its first hooked layer, starting from the clean
            residual stream cached there: ``start_at_layer`` on HookedTransformer, the blocks called
            directly on TransformerBridge. Checked once per layer against the clean logits (and that
            the earlier blocks really did not run); a full pass wherever that check fails. The way
            used per layer is in ``results.meta["evaluation"]["prefix_reuse"]``.
        proxy_batch: run up to this many proxies that edit the same hooks together in one forward
            pass, each on its own copy of the batch. Saves per-call overhead (small models on an
            accelerator); on CPU it measured slower (benchmarks/bench_evaluate.py), hence 1.
        progress: show a progress bar.

    Returns:
        :class:`Results` with ``acc_model``, ``acc_proxy``, ``acc_delta`` (proxy minus model accuracy,
        bootstrapped paired), ``agreement``, ``kl``, ``ce_score``,
        ``explained_variance`` (per hook) and ``attn_agreement`` (when keys, queries or patterns
        are simplified), per split, proxy and position category, plus ID-vs-OOD gaps.
    """
    splits = splits if isinstance(splits, SplitSet) else SplitSet(dict(splits))
    require(len(proxies) > 0, "evaluate needs at least one proxy; fit one with ip.fit_proxy")
    require(ablation in ABLATIONS, f"unknown ablation {ablation!r}; choose one of {ABLATIONS}")
    require(batch_size > 0 and proxy_batch > 0 and n_boot >= 0,
            "batch_size and proxy_batch must be positive and n_boot non-negative")
    for name, proxy in proxies.items():
        if not isinstance(proxy, Proxy):
            raise IllusionProbeError(f"proxy {name!r} is a {type(proxy).__name__}, not an ip.Proxy; build it with ip.fit_proxy")
        proxy.check_compatible(model)
    n_ctx = int(model.cfg.n_ctx)
    for split in splits.values():
        require(split.tokens.shape[1] <= n_ctx,
                f"split {split.name!r} has sequences of {split.tokens.shape[1]} tokens but the model's n_ctx is {n_ctx}")
    device = next(model.parameters()).device
    answer_ids = (task.answer_ids if task is not None else torch.arange(model.cfg.d_vocab)).to(device)
    ablations = _ablation_proxies(model, proxies, splits, ablation, ablation_sequences)
    baselines = _baseline_columns(proxies, ablations)
    runner = Runner(model, reuse_prefix)
    trim_heap = HeapTrimmer()
    sums: dict[str, dict[Hashable, _Sums]] = {}
    timings = {"clean_s": 0.0, "proxies_s": 0.0, "ablations_s": 0.0}
    was_training = model.training
    model.eval()
    bar = tqdm(total=sum(len(s) for s in splits.values()), desc="evaluate", unit="seq", disable=not progress)
    try:
        with torch.no_grad():
            for split in splits.values():
                sums[split.name] = _evaluate_split(runner, proxies, ablations, baselines, split, answer_ids,
                                                   batch_size, proxy_batch, timings, bar, device, trim_heap)
    finally:
        bar.close()
        model.train(was_training)
    return _summarise(proxies, splits, sums, baselines, n_boot, seed, meta={
        "evaluation": {"batch_size": batch_size, "proxy_batch": proxy_batch, "n_boot": n_boot, "seed": seed, "ablation": ablation,
                       "ablation_sequences": ablation_sequences, "prefix_reuse": dict(runner.resume),
                       "baseline_shared_with": {"+".join(sorted(hooks)): table for hooks, (table, _) in baselines.items()
                                                if table in proxies},
                       "heap_trims": trim_heap.trims},
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "backend": model_backend(model),
        "task": task.to_dict() if task is not None else None,
        "splits": {s.name: {"role": s.role, "n_sequences": len(s), "n_scored": s.n_scored} for s in splits.values()},
        **provenance(),
    })


def _baseline_columns(proxies: Mapping[str, Proxy], ablations: dict[frozenset[str], Proxy]
                      ) -> dict[frozenset[str], tuple[Hashable, str]]:
    """Per hook set, the (table, column) holding its ablation baseline's cross-entropy: the
    ``ce_proxy`` of a proxy that makes the very same edit (no extra pass), else its own table."""
    out: dict[frozenset[str], tuple[Hashable, str]] = {}
    for hooks, baseline in ablations.items():
        twin = next((name for name, proxy in proxies.items() if proxy.same_edit(baseline)), None)
        out[hooks] = (twin, "ce_proxy") if twin is not None else (("ablated", hooks), "ce_ablated")
    return out


def _evaluate_split(runner, proxies, ablations, baselines, split, answer_ids, batch_size, proxy_batch, timings,
                    bar, device, trim_heap: HeapTrimmer) -> dict[Hashable, _Sums]:
    """Per-sequence sums of every table on ``split``; sequences are visited longest first (less padding
    to run), in the same order for every table, which is all the paired bootstrap needs."""
    attn_layers = {name: _attention_layers(p.hook_names) for name, p in proxies.items()}
    start_layers = {s for s in (start_layer(list(h)) for h in ablations) if s is not None}
    pattern_layers = {layer for layers in attn_layers.values() for layer in layers}
    groups: dict[tuple[str, ...], list[str]] = defaultdict(list)  # same hooks -> one stacked pass
    for name, proxy in proxies.items():
        groups[proxy.hook_names].append(name)
    own_baselines = {hooks: ablations[hooks] for hooks, (table, _) in baselines.items() if table not in proxies}
    tables: dict[Hashable, _Sums] = defaultdict(_Sums)
    for batch in split.batches(batch_size, longest_first=True):
        batch = batch.to(device)
        tick = time.perf_counter()
        clean, resid, clean_patterns = runner.clean(batch.tokens, start_layers, pattern_layers)
        clean_argmax = {layer: pattern.argmax(-1) for layer, pattern in clean_patterns.items()}
        timings["clean_s"] += time.perf_counter() - tick
        scored = _Scored.of(batch)
        ref = _Reference.of(scored, clean, answer_ids)
        tables[MODEL].add(scored, MODEL_TERMS, _model_terms(ref, scored))
        tick = time.perf_counter()
        for hooks, baseline in own_baselines.items():
            ablated = runner.run(batch.tokens, resid, start_layer(list(hooks)), baseline.fwd_hooks())
            tables[("ablated", hooks)].add(scored, BASELINE_TERMS,
                                           _cross_entropy(F.log_softmax(scored.take(ablated).float(), dim=-1),
                                                          scored.targets)[None])
        timings["ablations_s"] += time.perf_counter() - tick
        tick = time.perf_counter()
        for names in groups.values():
            for first in range(0, len(names), proxy_batch):
                chunk = names[first:first + proxy_batch]
                runs = run_group(runner, batch.tokens, resid, [proxies[n] for n in chunk], attn_layers[chunk[0]])
                for name, (logits, recorder) in zip(chunk, runs, strict=True):
                    tables[name].add(scored, PROXY_TERMS, _proxy_terms(ref, scored, logits, answer_ids))
                    _accumulate_hooks(tables[name], recorder, clean_argmax, batch.real_mask)
        del ref, runs, clean, resid, clean_patterns, clean_argmax
        trim_heap()  # a loop of large, differently sized temporaries fragments the heap
        timings["proxies_s"] += time.perf_counter() - tick
        bar.update(len(batch))
    return tables


def _accumulate_hooks(sums: _Sums, recorder: Recorder, clean_argmax: dict[int, Tensor], real: Tensor) -> None:
    """Add one batch's per-sequence explained-variance and attention-agreement sums for one proxy."""
    for hook, (act, hat) in recorder.acts.items():
        if not is_attention_pattern(hook):
            for term, values in _ev_terms(act, hat, real).items():
                sums.by_hook[hook][term].append(values)
    for layer, pattern in recorder.patterns.items():
        for term, values in _attn_terms(clean_argmax[layer], pattern, real).items():
            sums.by_hook[f"attn{layer}"][term].append(values)


def _summarise(proxies, splits: SplitSet, sums, baselines, n_boot: int, seed: int, meta: dict) -> Results:
    records: list[Record] = []
    samples: dict[tuple[str, str, str, str], np.ndarray] = {}
    for index, split in enumerate(splits.values()):
        weights = stats.bootstrap_weights(len(split), n_boot, seed + index)
        tables = {key: (table.categories(), table.hooks()) for key, table in sums[split.name].items()}
        # Every per-sequence column of the split, resampled with one matrix product.
        resampled = stats.Resampled.of({(key, part_key, column): values for key, parts in tables.items()
                                        for part in parts for part_key, table in part.items()
                                        for column, values in table.items()}, weights)
        model_table = tables[MODEL][0]
        for name, proxy in proxies.items():
            method, size = _proxy_method(proxy)
            base = dict(split=split.name, role=split.role, proxy=name, method=method, size=size,
                        n_sequences=len(split), hooks="+".join(proxy.hook_names))
            per_category, per_hook = tables[name]
            baseline_table, baseline_column = baselines[frozenset(proxy.hook_names)]
            for category in per_category:
                n_positions = int(model_table[category]["count"].sum())
                col = {**{term: (MODEL, category, term) for term in MODEL_TERMS},
                       **{term: (name, category, term) for term in PROXY_TERMS},
                       "ce_ablated": (baseline_table, category, baseline_column)}
                for metric in (*POSITION_METRICS, "acc_delta", "ce_score"):
                    if metric == "ce_score":
                        est, boot = resampled.estimate(stats.ce_score, ce_ablated=col["ce_ablated"],
                                                       ce_proxy=col["ce_proxy"], ce_model=col["ce_model"])
                    elif metric == "acc_delta":  # paired: both accuracies from the same resampled sequences
                        est, boot = resampled.estimate(stats.ratio_difference, a=col["acc_proxy"], b=col["acc_model"],
                                                       den=col["count"])
                    else:
                        est, boot = resampled.estimate(stats.ratio, num=col[metric], den=col["count"])
                    samples[(split.name, name, category, metric)] = boot
                    records.append(Record(**base, category=category, metric=metric, value=est.value,
                                          ci_low=est.ci_low, ci_high=est.ci_high, n_positions=n_positions))
            for hook, table in per_hook.items():
                columns = {column: (name, hook, column) for column in table}
                if hook.startswith("attn") and "num" in table:
                    est, _ = resampled.estimate(stats.ratio, **columns)
                    metric, hook_name = "attn_agreement", f"blocks.{hook[4:]}.attn.hook_pattern"
                else:
                    est, _ = resampled.estimate(stats.explained_variance, **columns)
                    metric, hook_name = "explained_variance", hook
                records.append(Record(**base, category="all", metric=metric, value=est.value, ci_low=est.ci_low,
                                      ci_high=est.ci_high, n_positions=int(table.get("count", table.get("den")).sum()),
                                      hook=hook_name))
    return Results(records=records, gaps=_gaps(records, samples), meta=meta)


def _gaps(records: list[Record], samples: dict[tuple[str, str, str, str], np.ndarray]) -> list[Gap]:
    """metric(id) - metric(ood) per proxy; splits are resampled independently, so samples subtract."""
    cells = {(r.split, r.proxy, r.category, r.metric): r for r in records if not r.hook}
    id_splits = list(dict.fromkeys(r.split for r in records if r.role == "id"))
    ood_splits = list(dict.fromkeys(r.split for r in records if r.role == "ood"))
    gaps = []
    for (split, proxy, category, metric), rec in cells.items():
        if split not in id_splits:
            continue
        for ood in ood_splits:
            other = cells.get((ood, proxy, category, metric))
            if other is None:
                continue
            diff = samples[(split, proxy, category, metric)] - samples[(ood, proxy, category, metric)]
            low, high = stats.interval(diff)
            gaps.append(Gap(proxy=proxy, method=rec.method, size=rec.size, category=category, metric=metric,
                            id_split=split, ood_split=ood, value=rec.value - other.value, ci_low=low, ci_high=high))
    return gaps
