"""Dyck task: splits checked against an independent plain-Python stack reference."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from illusion_probe.errors import IllusionProbeError
from illusion_probe.tasks import task_from_dict
from illusion_probe.tasks.dyck import DyckConfig, DyckTask
from illusion_probe.tasks.dyck_sampler import SamplerSpec, bracket_labels, iter_batches, reference_sample, sample_batch

SMALL = DyckConfig(k=3, m=3, max_len=20, min_len=5, n_train=300, n_test=80, n_ood=60, ood_max_len=28,
                   ood_max_depth=5, holdout_fraction=0.4)


def reference(ids: list[int], k: int) -> dict:
    """Parse one sequence with a plain stack: labels, skeletons and validity."""
    bos, pad, first_close = 0, 1, 2 + k
    real = [i for i in ids if i != pad]
    assert real[0] == bos and bos not in real[1:], "BOS only at the start"
    assert ids[len(real):] == [pad] * (len(ids) - len(real)), "padding only on the right"
    stack: list[tuple[int, int]] = []  # (type, where its "(" is in `chars`)
    depth, skeletons, blocks, chars, deepest = [], [], [], "", 0
    for pos, tok in enumerate(real):
        if pos > 0 and tok < first_close:
            stack.append((tok - 2, len(chars)))
            chars += "("
        elif pos > 0:
            assert stack and stack[-1][0] == tok - first_close, "close must match the top of the stack"
            chars += ")"
            blocks.append(chars[stack.pop()[1]:])
            if not stack:
                skeletons.append(blocks[-1])
        depth.append(len(stack))
        deepest = max(deepest, len(stack))
    assert not stack, "sequence must be balanced"
    n = len(ids)
    next_closes = [pos + 1 < len(real) and real[pos + 1] >= first_close for pos in range(n)]
    targets = [real[pos + 1] if next_closes[pos] else None for pos in range(n)]
    match_pos = [-1] * n
    for pos in range(n):
        if next_closes[pos]:  # the open at the same depth most recently
            match_pos[pos] = max(j for j in range(1, pos + 1) if real[j] < first_close and depth[j] == depth[pos])
    return {"len": len(real), "depth": depth + [0] * (n - len(real)), "next_closes": next_closes,
            "targets": targets, "match_pos": match_pos, "skeletons": skeletons, "blocks": blocks,
            "deepest": deepest}


def check_splits(task: DyckTask, splits) -> None:
    """Every property the splits promise, against :func:`reference`."""
    cfg = task.config
    assert list(splits) == ["train", "val", "test", "ood_unseen_structure", "ood_longer", "ood_deeper"]
    assert [s.role for s in splits.values()] == ["train", "val", "id", "ood", "ood", "ood"]
    sizes = {"train": cfg.n_train, "val": cfg.n_test, "test": cfg.n_test}
    all_keys: set[tuple[int, ...]] = set()
    parsed = {}
    for name, split in splits.items():
        assert len(split) == sizes.get(name, cfg.n_ood)
        assert split.tokens.shape[1] <= task.n_ctx
        json.dumps(split.meta)
        keys = {tuple(row[row != task.pad_id].tolist()) for row in split.tokens}
        assert len(keys) == len(split), f"{name}: duplicate sequences"
        assert not keys & all_keys, f"{name}: shares a sequence with an earlier split"
        all_keys |= keys
        parsed[name] = []
        for i, row in enumerate(split.tokens.tolist()):
            ref = reference(row, cfg.k)
            parsed[name].append(ref)
            assert split.labels["depth"][i].tolist() == ref["depth"]
            assert split.eval_mask[i].tolist() == ref["next_closes"]
            assert split.labels["match_pos"][i].tolist() == ref["match_pos"]
            assert split.real_mask[i].tolist() == [j < ref["len"] for j in range(len(row))]
            targets = split.targets[i].tolist()
            assert all(t == targets[j] for j, t in enumerate(ref["targets"]) if t is not None)
            held = [task.is_held_out(s) for s in ref["skeletons"]]
            assert any(held) == (name == "ood_unseen_structure"), f"{name}: held-out skeletons {ref['skeletons']}"
            deep_bound = cfg.ood_max_depth if name == "ood_deeper" else cfg.m
            assert ref["deepest"] <= deep_bound
            long_bound = cfg.ood_max_len if name == "ood_longer" else cfg.max_len
            assert ref["len"] <= long_bound
            if name not in ("ood_longer",):
                assert ref["len"] >= cfg.min_len
    trained = {s for r in parsed["train"] for s in r["skeletons"]}
    for name in ("val", "test"):
        unseen = [s for r in parsed[name] for s in r["skeletons"] if s not in trained]
        assert not unseen, f"{name}: top-level skeletons never seen in train: {unseen[:5]}"
    if cfg.holdout_nested:
        for name in ("train", "val", "test", "ood_longer", "ood_deeper"):
            nested = [b for r in parsed[name] for b in r["blocks"] if task.is_held_out(b)]
            assert not nested, f"{name}: held-out skeletons nested inside blocks: {nested[:5]}"
    check_length_matching(splits, [r["len"] for r in parsed["test"]], [r["len"] for r in parsed["ood_unseen_structure"]],
                          shortest=2 * cfg.holdout_min_pairs + 1)
    longest_train = max(r["len"] for r in parsed["train"])
    assert all(r["len"] > longest_train for r in parsed["ood_longer"])
    assert all(r["len"] > cfg.max_len for r in parsed["ood_longer"])
    assert all(r["deepest"] > cfg.m for r in parsed["ood_deeper"])


def check_length_matching(splits, test_lengths: list[int], unseen_lengths: list[int], shortest: int) -> None:
    """``ood_unseen_structure`` has ``test``'s share of each length long enough for a held-out skeleton,
    to within rounding, unless its meta counts sequences placed off quota."""
    meta = splits["ood_unseen_structure"].meta
    feasible = [n for n in test_lengths if n >= shortest]
    assert meta["length_counts"] == {str(n): unseen_lengths.count(n) for n in sorted(set(unseen_lengths))}
    if meta["off_quota"] == 0:
        for length in set(feasible) | set(unseen_lengths):
            expected = len(unseen_lengths) * feasible.count(length) / len(feasible)
            assert abs(unseen_lengths.count(length) - expected) < 1, f"length {length}"


@pytest.fixture(scope="module")
def small_splits():
    task = DyckTask(SMALL)
    return task, task.make_splits(seed=0)


def test_splits_match_the_stack_reference(small_splits) -> None:
    check_splits(*small_splits)


def test_position_categories_mark_untrained_depths_and_positions(small_splits) -> None:
    task, splits = small_splits
    longest = int(splits["train"].lengths.max())
    for split in splits.values():
        deeper, beyond = split.labels["deeper_than_trained"], split.labels["beyond_trained_length"]
        assert deeper.dtype == torch.bool and beyond.dtype == torch.bool
        assert torch.equal(deeper, split.labels["depth"] > task.config.m)
        assert torch.equal(beyond[0], torch.arange(split.tokens.shape[1]) >= longest)
        scored_deeper = (deeper & split.eval_mask).any()
        assert bool(scored_deeper) == (split.name == "ood_deeper")
        assert bool((beyond & split.eval_mask).any()) == (split.name == "ood_longer")


def test_labels_follow_the_documented_conventions() -> None:
    task = DyckTask(SMALL)
    tokens = task.encode("BOS (0 (1 )1 (2 )2 )0 (1 )1 PAD").unsqueeze(0)
    depth, next_closes, match_pos = bracket_labels(tokens, SMALL.k)
    assert depth[0].tolist() == [0, 1, 2, 1, 2, 1, 0, 1, 0, 0]
    assert next_closes[0].tolist() == [False, False, True, False, True, True, False, True, False, False]
    assert match_pos[0].tolist() == [-1, -1, 2, -1, 4, 1, -1, 7, -1, -1]


def test_same_seed_same_splits_other_seed_other_splits(small_splits) -> None:
    task, splits = small_splits
    again = task.make_splits(seed=0)
    other = task.make_splits(seed=1)
    for name, split in splits.items():
        assert torch.equal(split.tokens, again[name].tokens)
        assert not torch.equal(split.tokens, other[name].tokens)


def test_make_splits_leaves_global_rng_alone() -> None:
    before = torch.random.get_rng_state()
    DyckTask(SMALL).make_splits(seed=3)
    assert torch.equal(before, torch.random.get_rng_state())


@settings(max_examples=12, deadline=None)
@given(
    k=st.integers(2, 3), m=st.integers(3, 4), extra_len=st.integers(0, 8), min_len=st.integers(3, 9),
    fraction=st.floats(0.3, 0.7), holdout_seed=st.integers(0, 2**31), split_seed=st.integers(0, 2**31),
)
def test_random_small_configs(k, m, extra_len, min_len, fraction, holdout_seed, split_seed) -> None:
    max_len = 2 * m + 9 + extra_len
    cfg = DyckConfig(k=k, m=m, max_len=max_len, min_len=min(min_len, max_len), holdout_fraction=fraction,
                     n_train=60, n_test=20, n_ood=15, ood_max_len=max_len + 8, ood_max_depth=m + 2, seed=holdout_seed)
    task = DyckTask(cfg)
    check_splits(task, task.make_splits(seed=split_seed))


def test_vectorised_hold_out_flag_equals_the_python_definition() -> None:
    task = DyckTask(SMALL)
    batch = sample_batch(SamplerSpec(3, 3, 3, 20), 4000, torch.Generator().manual_seed(0), SMALL.holdout)
    flags = [any(task.is_held_out(s) for s in reference(row, 3)["skeletons"]) for row in batch.tokens.tolist()]
    assert flags == batch.has_held_out.tolist()
    assert 0 < sum(flags) < len(flags)


def test_vectorised_nested_hold_out_flag_equals_the_python_definition() -> None:
    task = DyckTask(SMALL)
    batch = sample_batch(SamplerSpec(3, 3, 3, 20), 4000, torch.Generator().manual_seed(1), SMALL.holdout)
    flags = [any(task.is_held_out(b) for b in reference(row, 3)["blocks"]) for row in batch.tokens.tolist()]
    assert flags == batch.held_out_anywhere.tolist()
    assert sum(batch.has_held_out.tolist()) < sum(flags) < len(flags)


def test_nested_hold_out_keeps_held_out_skeletons_out_of_every_block() -> None:
    task = DyckTask(dataclasses.replace(SMALL, holdout_nested=True))
    check_splits(task, task.make_splits(seed=0))


def test_unseen_structure_split_states_its_distributions(small_splits) -> None:
    _, splits = small_splits
    meta = splits["ood_unseen_structure"].meta
    assert sum(meta["held_out_pairs"].values()) >= len(splits["ood_unseen_structure"])
    assert min(int(p) for p in meta["held_out_pairs"]) >= SMALL.holdout_min_pairs
    assert 0 < meta["most_frequent_held_out_share"] <= 1
    assert all(sum(split.meta["length_counts"].values()) == len(split) for split in splits.values())


def test_tiny_skeletons_are_never_held_out() -> None:
    for seed in range(50):
        holdout = dataclasses.replace(SMALL, holdout_fraction=0.99, seed=seed).holdout
        assert not holdout.is_held_out("()") and not holdout.is_held_out("(())")


def total_variation(a: list[int], b: list[int]) -> float:
    """Total variation distance between the empirical distributions of two samples."""
    support = set(a) | set(b)
    return sum(abs(a.count(v) / len(a) - b.count(v) / len(b)) for v in support) / 2


def test_sampler_matches_a_per_token_python_process_in_distribution() -> None:
    spec = SamplerSpec(k=2, max_depth=3, min_len=5, max_len=21)
    rng = random.Random(0)
    python = [s for s in (reference_sample(spec, rng) for _ in range(20000)) if s is not None]
    batch = sample_batch(spec, 20000, torch.Generator().manual_seed(0))
    accept_python, accept_vector = len(python) / 20000, len(batch.lengths) / 20000
    assert abs(accept_python - accept_vector) < 0.02
    # Two independent samples of this size differ by about 0.01 in total variation.
    assert total_variation(list(map(len, python)), batch.lengths.tolist()) < 0.03
    python_depths = [reference(s, spec.k)["deepest"] for s in python]
    assert total_variation(python_depths, batch.max_depth.tolist()) < 0.03


def test_sampler_with_a_depth_bound_beyond_int8() -> None:
    spec = SamplerSpec(k=2, max_depth=200, min_len=3, max_len=300)
    batch = sample_batch(spec, 500, torch.Generator().manual_seed(0))
    parsed = [reference(row, spec.k) for row in batch.tokens.tolist()]
    assert [p["len"] for p in parsed] == batch.lengths.tolist()
    assert [p["deepest"] for p in parsed] == batch.max_depth.tolist()
    assert max(batch.lengths.tolist()) > 100


def test_iter_batches_yields_exactly_n() -> None:
    spec = SamplerSpec(k=2, max_depth=3, min_len=3, max_len=15)
    total = sum(len(b.lengths) for b in iter_batches(spec, 1234, 500, torch.Generator().manual_seed(0)))
    assert total == 1234


def test_vocab_encode_decode_and_sizes() -> None:
    task = DyckTask(SMALL)
    assert task.vocab[:2] == ["BOS", "PAD"] and len(task.vocab) == 2 + 2 * SMALL.k
    text = "BOS (0 (2 )2 )0"
    assert task.decode(task.encode(text)) == text
    assert [task.vocab[i] for i in task.answer_ids] == [")0", ")1", ")2"]
    assert task.n_ctx == max(SMALL.max_len, SMALL.ood_max_len)
    with pytest.raises(IllusionProbeError, match="unknown Dyck token"):
        task.encode("BOS (7")


def test_config_round_trip_and_presets() -> None:
    task = DyckTask(SMALL)
    data = json.loads(json.dumps(task.to_dict()))
    again = task_from_dict(data)
    assert isinstance(again, DyckTask) and again.config == SMALL
    paper = DyckConfig.preset("paper")
    assert (paper.k, paper.m) == (20, 10)
    assert DyckConfig.preset("quick") == DyckConfig()
    with pytest.raises(IllusionProbeError, match="unknown dyck preset 'huge'"):
        DyckConfig.preset("huge")
    with pytest.raises(IllusionProbeError, match="unknown setting 'depth'"):
        DyckTask.from_config_dict({**data["config"], "depth": 3})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"k": 0}, "k must be >= 1"),
        ({"m": 0}, "m \\(depth bound\\) must be >= 1"),
        ({"m": 1}, "none can be held out"),
        ({"min_len": 2}, "min_len must be >= 3"),
        ({"max_len": 8, "min_len": 9, "m": 2}, "no sequence fits"),
        ({"holdout_fraction": 1.0}, "leaves no trainable"),
        ({"holdout_fraction": 0.0}, "holdout_fraction must be in"),
        ({"holdout_min_pairs": 1}, "never held out"),
        ({"ood_max_depth": 3}, "must exceed m"),
        ({"max_len": 8}, "ood_deeper needs depth"),
        ({"ood_max_len": 20}, "leaves no room for ood_longer"),
        ({"n_ood": 0}, "n_ood must be >= 1"),
        ({"k": 2.5}, "k must be an integer"),
    ],
)
def test_bad_config_is_one_line_error(change: dict, message: str) -> None:
    with pytest.raises(IllusionProbeError, match=message) as info:
        dataclasses.replace(SMALL, **change)
    assert "\n" not in str(info.value)


def test_unreachable_split_fails_with_a_clear_error() -> None:
    # Depth 2 within 7 tokens allows one 3-pair skeleton; this seed keeps it, so nothing is held out.
    cfg = DyckConfig(k=1, m=2, max_len=7, min_len=3, holdout_fraction=0.01, n_train=1, n_test=1, n_ood=1,
                     ood_max_len=9, ood_max_depth=3, seed=0)
    assert not DyckTask(cfg).is_held_out("(()())")
    with pytest.raises(IllusionProbeError, match="ood_unseen_structure"):
        DyckTask(cfg).make_splits()
