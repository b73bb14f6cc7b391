"""The code task: corpus discovery and file split, budgets, vocabulary, windows and category masks.

Most tests use a temporary "standard library" of hand-written files (``python_dir``) plus a
hand-written extra language, so they are fast and exact; a few touch the real stdlib and torch
headers with tiny budgets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from illusion_probe.errors import IllusionProbeError
from illusion_probe.tasks import task_from_dict
from illusion_probe.tasks.code import BOS_ID, PAD_ID, UNK_ID, CodeConfig, CodeTask, word_masks
from illusion_probe.tasks.code_corpus import SYSTEM_SOURCES, list_files

PY_FILES = {
    f"pkg/mod_{i:02d}.py": (
        f"def function_{i}(value, other):\n"
        f"    result = [value * {i}, other.get('key_{i}', None)]\n"
        f"    for item in result:\n"
        f"        if item is not None and (item > {i} or item < -{i}):\n"
        f"            return {{'item': item, 'index': {i}}}\n"
        f"    return function_{i}(value + 1, other)\n"
    ) * 3
    for i in range(30)
}
PY_FILES["crlf_tabs.py"] = "class Tabbed:\r\n\tdef method(self):\r\n\t\treturn (self, [1, 2])\r\n" * 20
RUST_FILES = {f"src/lib_{i}.rs": f"fn main_{i}() {{\n    let x = vec![{i}, 2];\n    println!(\"{{:?}}\", x);\n}}\n" * 8
              for i in range(6)}
RUST_FILES["src/euro.rs"] = "let price = \"€\";\n" * 20  # "€" never occurs in the Python files


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Python tree and a Rust tree, each with one binary and one undecodable file and a hidden file."""
    root = tmp_path_factory.mktemp("code_corpus")
    for base, files in (("python", PY_FILES), ("rust", RUST_FILES)):
        for rel, text in files.items():
            path = root / base / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(text.encode("utf-8"))  # bytes: no newline translation on any OS
    for base, suffix in (("python", ".py"), ("rust", ".rs")):
        (root / base / f"binary{suffix}").write_bytes(b"\x7fELF\x00\x01\x02" * 50)
        (root / base / f"latin1{suffix}").write_bytes("caf\xe9 = 1\n".encode("latin-1") * 50)
        (root / base / f".hidden{suffix}").write_text("never read\n" * 50)
    (root / "python" / "test").mkdir()
    (root / "python" / "test" / "test_skipped.py").write_text("assert True\n" * 50)
    (root / "empty").mkdir()
    return {"python": root / "python", "rust": root / "rust", "empty": root / "empty"}


def small_config(corpus: dict[str, Path], **changes) -> CodeConfig:
    base = CodeConfig(window=16, n_train=120, n_test=20, n_ood=20, max_train_chars=1_000_000, max_eval_chars=1_000_000,
                      test_fraction=0.3, python_dir=str(corpus["python"]), include_cpp=False,
                      extra_sources=(("rust", str(corpus["rust"])),), min_char_count=1, seed=0)
    return dataclasses.replace(base, **changes)


# -- corpus and file split ---------------------------------------------------------------------


def test_file_listing_is_sorted_relative_and_skips_hidden_and_test_dirs(corpus):
    task = CodeTask(small_config(corpus))
    files = sorted(sum(task.file_split().values(), []))
    assert files == sorted([*PY_FILES, "binary.py", "latin1.py"])
    with_tests = CodeTask(small_config(corpus, include_tests=True)).file_split()
    assert "test/test_skipped.py" in sum(with_tests.values(), [])


def test_file_split_is_deterministic_disjoint_and_machine_independent(corpus):
    task = CodeTask(small_config(corpus))
    first, again = task.file_split(), CodeTask(small_config(corpus)).file_split()
    assert first == again
    assert first["train"] and first["val"] and first["test"]
    # The rule, written out independently: BLAKE2b of "seed\0holdout\0path" as a fraction u of 2**64; test is
    # u < 0.3 (test_fraction), val 0.3 <= u < 0.4 (val_fraction 0.1), train the rest: three disjoint sets.
    for path in sum(first.values(), []):
        unit = int.from_bytes(hashlib.blake2b(f"0\0holdout\0{path}".encode(), digest_size=8).digest(), "big") / 2**64
        expected = "test" if unit < 0.3 else "val" if unit < 0.4 else "train"
        assert [name for name, files in first.items() if path in files] == [expected]
    # Without val, test keeps the same files and train takes val's.
    no_val = CodeTask(small_config(corpus, val_fraction=0.0)).file_split()
    assert no_val["test"] == first["test"] and not no_val["val"]
    assert sorted(no_val["train"]) == sorted(first["train"] + first["val"])
    other = CodeTask(small_config(corpus, seed=1)).file_split()
    assert other != first


def test_real_stdlib_split_is_disjoint_and_excludes_site_packages():
    task = CodeTask(CodeConfig.preset("tiny"))
    split = task.file_split()
    assert not set(split["train"]) & set(split["test"]) and not set(split["val"]) & (set(split["train"]) | set(split["test"]))
    assert all("site-packages" not in f and not f.startswith("test/") for f in sum(split.values(), []))
    assert split == CodeTask(CodeConfig.preset("tiny")).file_split()


def test_real_corpus_tiny_preset_has_python_and_cpp_splits():
    splits = CodeTask(CodeConfig.preset("tiny")).make_splits(seed=0)
    assert list(splits) == ["train", "val", "test", "ood_cpp"]
    assert splits["val"].role == "val" and splits["test"].role == "id"
    assert splits["ood_cpp"].meta["language"] == "cpp" and splits["ood_cpp"].meta["source"].endswith("include")
    for split in splits.values():
        assert split.meta["chars"] == split.meta["char_budget"]  # the stdlib and headers exceed the tiny budgets
        assert split.tokens.shape == (split.meta["n"], 33)


# -- splits ------------------------------------------------------------------------------------


def test_splits_shapes_roles_and_scoring(corpus):
    task = CodeTask(small_config(corpus))
    splits = task.make_splits(seed=0)
    assert list(splits) == ["train", "val", "test", "ood_rust"]
    assert [s.role for s in splits.values()] == ["train", "val", "id", "ood"]
    assert task.n_ctx == 17
    for split in splits.values():
        assert split.tokens.shape[1] == task.n_ctx
        assert (split.tokens[:, 0] == BOS_ID).all() and not (split.tokens == PAD_ID).any()
        assert not split.eval_mask[:, -1].any()
        nxt = split.tokens[:, 1:]
        assert torch.equal(split.eval_mask[:, :-1], nxt != UNK_ID)
        assert torch.equal(split.targets[:, :-1][split.eval_mask[:, :-1]], nxt[nxt != UNK_ID])
        for name in ("closing_bracket", "copying", "deep_nesting", "first_occurrence"):
            assert split.labels[name].dtype == torch.bool and split.labels[name].shape == split.tokens.shape
        assert split.labels["depth"].dtype == torch.int64
    assert torch.equal(task.answer_ids, torch.arange(task.d_vocab))


def test_same_seed_same_splits_other_seed_other_windows(corpus):
    a = CodeTask(small_config(corpus)).make_splits(seed=0)
    b = CodeTask(small_config(corpus)).make_splits(seed=0)
    c = CodeTask(small_config(corpus)).make_splits(seed=1)
    for name in a:
        assert torch.equal(a[name].tokens, b[name].tokens)
        assert all(torch.equal(a[name].labels[k], b[name].labels[k]) for k in a[name].labels)
    assert not torch.equal(a["train"].tokens, c["train"].tokens)


def test_no_window_is_in_two_splits(corpus):
    splits = CodeTask(small_config(corpus)).make_splits(seed=0)
    rows = [tuple(r) for s in splits.values() for r in s.tokens.tolist()]
    assert len(rows) == len(set(rows))


def test_corpus_size_and_skipped_files_recorded(corpus):
    task = CodeTask(small_config(corpus))
    splits = task.make_splits(seed=0)
    rust = splits["ood_rust"].meta
    assert rust["skipped_files"] == 2 and rust["skipped_by_reason"] == {"binary": 1, "undecodable": 1}
    assert rust["files_listed"] == len(RUST_FILES) + 2
    assert sorted(rust["files"]) == sorted(RUST_FILES)
    assert rust["chars"] == sum(len(t) for t in RUST_FILES.values())
    python = [splits["train"].meta, splits["val"].meta, splits["test"].meta]
    assert sum(m["skipped_files"] for m in python) == 2
    assert sum(m["files_listed"] for m in python) == len(PY_FILES) + 2
    for meta in python:
        assert meta["chars"] == sum(len(PY_FILES[f]) for f in meta["files"])
        assert meta["candidate_windows"] >= meta["n"]


def test_character_budget_caps_each_split_deterministically(corpus):
    cfg = small_config(corpus, max_eval_chars=500, n_test=5, n_ood=5)
    meta = CodeTask(cfg).make_splits(seed=0)["ood_rust"].meta
    assert meta["chars"] == 500 and meta["char_budget"] == 500
    assert meta["files_used"] < len(RUST_FILES)
    assert CodeTask(cfg).make_splits(seed=3)["ood_rust"].meta["files"] == meta["files"]  # files: the task seed


# -- vocabulary --------------------------------------------------------------------------------


def test_unseen_characters_map_to_unk_and_are_not_scored(corpus):
    task = CodeTask(small_config(corpus))
    assert task.vocab[:3] == ["<PAD>", "<BOS>", "<UNK>"]
    assert "€" not in task.vocab and "λ" not in task.vocab
    assert task.encode("a€λ").tolist() == [task.vocab.index("a"), UNK_ID, UNK_ID]
    assert task.decode(task.encode("a€")) == "a\ufffd"
    rust = CodeTask(small_config(corpus, n_ood=60)).make_splits(seed=0)["ood_rust"]
    unk = rust.tokens == UNK_ID
    assert unk.any()
    assert not (rust.eval_mask[:, :-1] & unk[:, 1:]).any()


def test_rare_characters_become_unk(corpus):
    common = CodeTask(small_config(corpus, min_char_count=1)).vocab
    strict = CodeTask(small_config(corpus, min_char_count=200)).vocab
    assert set(strict) < set(common)
    assert " " in strict  # spaces are everywhere


def test_crlf_and_tabs_survive(corpus):
    task = CodeTask(small_config(corpus))
    assert {"\r", "\n", "\t"} <= set(task.vocab)
    assert task.decode(task.encode("x\r\n\ty")) == "x\r\n\ty"
    splits = task.make_splits(seed=0)
    texts = [task.decode(row) for s in splits.values() for row in s.tokens]
    crlf = [t for t in texts if "\r\n\t" in t]
    train_or_test = [s for s in ("train", "test") if "crlf_tabs.py" in splits[s].meta["files"]]
    assert train_or_test and crlf  # the CRLF file was read and its windows keep "\r\n\t"


def test_to_dict_round_trip_keeps_vocab_without_reading_files(corpus, tmp_path):
    task = CodeTask(small_config(corpus))
    data = json.loads(json.dumps(task.to_dict()))  # lists, as a checkpoint gives them back
    data["config"]["python_dir"] = str(tmp_path / "gone")  # rebuilding must not need the corpus
    rebuilt = task_from_dict(data)
    assert isinstance(rebuilt, CodeTask)
    assert rebuilt.vocab == task.vocab and rebuilt.deep_depth == task.deep_depth
    assert rebuilt.config.extra_sources == (("rust", str(corpus["rust"])),)
    assert rebuilt.encode("def f(x):").tolist() == task.encode("def f(x):").tolist()


# -- category masks against a plain reference --------------------------------------------------


def reference_labels(text: str, deep_depth: int) -> dict[str, list]:
    """Labels at each position p = 0..len(text) (p = 0 is BOS) for predicting character p, by hand."""
    n = len(text)
    word_char = [c.isascii() and (c.isalnum() or c == "_") for c in text]
    copying, first = [False] * n, [False] * n
    seen = set()
    i = 0
    while i < n:
        if not word_char[i]:
            i += 1
            continue
        j = i
        while j < n and word_char[j]:
            j += 1
        word = text[i:j]
        if not word[0].isdigit():  # a run starting with a digit (123, 0x1f) is a number, not a word
            for k in range(i + 1, j):
                (copying if word in seen else first)[k] = True
            seen.add(word)
        i = j
    depth, d = [0], 0
    for c in text:
        if c in "([{":
            d += 1
        elif c in ")]}":
            d = max(0, d - 1)
        depth.append(d)
    return {
        "closing_bracket": [c in ")]}" for c in text] + [False],
        "copying": copying + [False],
        "first_occurrence": first + [False],
        "depth": depth,
        "deep_nesting": [x > deep_depth for x in depth],
    }


SNIPPETS = [
    "foo(bar) + foo(baz[0])",
    "x = f(g(h(i[j{k}])))",
    "))] (a(b)c) 0x1f x1f _a _a",
    "self.value = self.value\n",
    "\tif (a and (b or c)):\r\n",
]


@pytest.mark.parametrize("text", SNIPPETS)
def test_labels_match_plain_reference(corpus, text):
    task = CodeTask(small_config(corpus, deep_depth=1))
    labels = task.labels([text])
    expected = reference_labels(text, deep_depth=1)
    for name, values in expected.items():
        assert labels[name][0].tolist() == values, name


def test_labels_on_a_worked_example(corpus):
    task = CodeTask(small_config(corpus, deep_depth=1))
    text = "ab(cd[ab])ab"
    labels = {k: v[0].tolist() for k, v in task.labels([text]).items()}
    # position p predicts text[p]; "ab" first occurs at 0-1, then again at 6-7 and 10-11
    assert [p for p, x in enumerate(labels["copying"]) if x] == [7, 11]
    assert [p for p, x in enumerate(labels["first_occurrence"]) if x] == [1, 4]
    assert [p for p, x in enumerate(labels["closing_bracket"]) if x] == [8, 9]
    assert labels["depth"] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 1, 0, 0, 0]
    assert [p for p, x in enumerate(labels["deep_nesting"]) if x] == [6, 7, 8]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="ab_1 ()[]{}.\n", min_size=12, max_size=12), min_size=1, max_size=4))
def test_labels_match_reference_on_random_text(corpus, windows):
    task = CodeTask(small_config(corpus, deep_depth=0))
    labels = task.labels(windows)
    for row, text in enumerate(windows):
        for name, values in reference_labels(text, deep_depth=0).items():
            assert labels[name][row].tolist() == values


def test_copying_and_first_occurrence_partition_non_initial_word_characters():
    copying, first = word_masks(["alpha beta alpha gamma beta x y"])
    assert not (copying & first).any()
    assert copying.sum() == 4 + 3 and first.sum() == 4 + 3 + 4


def test_deep_depth_defaults_to_training_median(corpus):
    task = CodeTask(small_config(corpus))
    splits = task.make_splits(seed=0)
    assert splits["train"].meta["deep_depth"] == task.deep_depth
    train = splits["train"]
    assert torch.equal(train.labels["deep_nesting"], train.labels["depth"] > task.deep_depth)


# -- bad input ---------------------------------------------------------------------------------


def one_line_error(call) -> str:
    with pytest.raises(IllusionProbeError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_and_empty_source_directories(corpus, tmp_path):
    missing = small_config(corpus, extra_sources=(("go", str(tmp_path / "nope")),))
    assert "does not exist" in one_line_error(lambda: CodeTask(missing).make_splits())
    empty = small_config(corpus, extra_sources=(("go", str(corpus["empty"])),))
    assert "holds no files" in one_line_error(lambda: CodeTask(empty).make_splits())
    no_python = small_config(corpus, python_dir=str(corpus["empty"]))
    assert "holds no files ending in .py" in one_line_error(lambda: CodeTask(no_python).vocab)
    with pytest.raises(IllusionProbeError):
        list_files(corpus["empty"], "x")


def test_language_given_twice_and_bad_values(corpus):
    rust = str(corpus["rust"])
    assert "given twice" in one_line_error(lambda: small_config(corpus, extra_sources=(("rust", rust), ("rust", rust))))
    assert "given twice" in one_line_error(lambda: small_config(corpus, extra_sources=(("python", rust),)))
    assert "given twice" in one_line_error(lambda: small_config(corpus, include_cpp=True, extra_sources=(("cpp", rust),)))
    assert "given twice" in one_line_error(
        lambda: small_config(corpus, hf_dataset="some/dataset", hf_language="rust"))
    one_line_error(lambda: small_config(corpus, extra_sources=(("Bad-Name", rust),)))
    assert "window must be >= 2" in one_line_error(lambda: small_config(corpus, window=1))
    one_line_error(lambda: small_config(corpus, test_fraction=1.0))
    one_line_error(lambda: small_config(corpus, max_eval_chars=8))
    one_line_error(lambda: small_config(corpus, vocab=("a", "a")))
    one_line_error(lambda: CodeConfig.preset("huge"))
    one_line_error(lambda: CodeTask.from_config_dict({"windw": 3}))


def test_too_few_windows_is_refused(corpus):
    cfg = small_config(corpus, n_ood=10_000)
    assert "distinct new windows" in one_line_error(lambda: CodeTask(cfg).make_splits())


def test_model_context_shorter_than_window_is_refused(corpus):
    from illusion_probe.models import ModelConfig, ModelSizes, build_model
    from illusion_probe.training import TrainConfig, train

    task = CodeTask(small_config(corpus))
    splits = task.make_splits()
    model = build_model(ModelSizes(d_vocab=task.d_vocab, n_ctx=task.n_ctx - 1), ModelConfig(n_layers=1, d_model=16, n_heads=2))
    assert "n_ctx" in one_line_error(lambda: train(model, splits, TrainConfig(max_steps=1, warmup_steps=0, progress=False)))


def test_dataset_without_datasets_package(corpus, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    cfg = small_config(corpus, hf_dataset="bigcode/the-stack-smol")
    assert "pip install datasets" in one_line_error(lambda: CodeTask(cfg).make_splits())


# -- presets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "quick", "paper"])
def test_shipped_presets_load(name):
    from illusion_probe.study import load_study

    cfg = CodeConfig.preset(name)
    assert cfg.window >= 2
    study = load_study("code", name)
    assert study.task == cfg and study.task_kind == "code"


# -- sources the system image ships ---------------------------------------------------------


def test_interpreters_keep_only_scripts_whose_hashbang_names_them(tmp_path):
    scripts = {"a": "#!/bin/sh\necho a\n", "b": "#!/usr/bin/env bash\necho b\n", "c": "#! /bin/dash -e\necho c\n",
               "d": "#!/usr/bin/python3\nprint()\n", "e": "echo no hashbang\n", "f": "#!/bin/shell\n"}
    for name, text in scripts.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "g").write_bytes(b"\x7fELF\x00" * 10)
    assert list_files(tmp_path, "shell", interpreters=("sh", "bash", "dash")) == ["a", "b", "c"]


def test_system_languages_are_checked_by_name_and_missing_directories_refused(monkeypatch):
    message = one_line_error(lambda: CodeConfig(system_languages=("cobol",)))
    assert "'cobol' is not one of ['javascript', 'perl', 'shell']" in message and "extra_sources" in message
    monkeypatch.setitem(SYSTEM_SOURCES, "perl", dataclasses.replace(SYSTEM_SOURCES["perl"], pattern="/nonexistent/perl*"))
    task = CodeTask(dataclasses.replace(CodeConfig.preset("tiny"), system_languages=("perl",)))
    assert "this machine has no /nonexistent/perl*" in one_line_error(lambda: task.make_splits(0))


@pytest.mark.skipif(not all(Path(p).parent.is_dir() for p in ("/usr/share/perl/x", "/usr/lib/node_modules/npm/x")),
                    reason="this machine's image lacks Perl modules or npm")
def test_system_languages_read_perl_javascript_and_shell():
    config = dataclasses.replace(CodeConfig.preset("tiny"), system_languages=("perl", "javascript", "shell"))
    splits = CodeTask(config).make_splits(seed=0)
    assert list(splits)[-3:] == ["ood_perl", "ood_javascript", "ood_shell"]
    assert splits["ood_perl"].meta["files"][0].endswith(".pm")
    assert all(name.endswith(".js") for name in splits["ood_javascript"].meta["files"])
    assert all(split.meta["n"] == config.n_ood for split in splits.values() if split.role == "ood")
