"""Every bad input and fault of the command line that ``docs/reliability.md`` lists, one case each.

A case runs ``main(argv)`` in a temporary folder and checks: the exit code; that stderr ends in one
``illusion-probe: error:`` line holding the expected words; that no stage did any work (no
``training``, ``fitting`` or ``evaluating`` line); and that nothing in the folder was created, changed
or removed (a case that starts from a finished run may only have read it).
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from illusion_probe.cli import main
from tests.hf_models import save_tiny

TINY = ("--preset", "tiny", "--device", "cpu")
RUN = ("reproduce", "dyck", *TINY, "--out", "{tmp}/out")
REPORT = ("report", "{tmp}/run/results.json", "--out", "{tmp}/r.html")
DOC = Path(__file__).parents[2] / "docs" / "reliability.md"


@dataclass(frozen=True)
class Fault:
    """One bad input: ``argv`` (``{tmp}`` is the case's folder), the words of its error, its exit code, and
    ``setup(tmp)``, which prepares the folder (a copy of a finished run is at ``{tmp}/run`` when ``run``)."""

    id: str
    argv: tuple[str, ...]
    message: str
    setup: Callable[[Path], None] | None = None
    code: int = 2
    run: bool = False
    env: dict[str, str] = field(default_factory=dict)


def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).write_text(text)


def _edit_json(name: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        data = json.loads((tmp / "run" / name).read_text())
        edit(data)
        (tmp / "run" / name).write_text(json.dumps(data))
    return setup


def _truncate(name: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        path = tmp / "run" / name
        path.write_bytes(path.read_bytes()[:40])
    return setup


def _read_only(tmp: Path) -> None:
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)


def _newer_checkpoint(tmp: Path) -> None:
    path = tmp / "run" / "checkpoint" / "metadata.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 99}))


def _record(field: str, value) -> Callable[[dict], None]:
    return lambda data: data["records"][0].__setitem__(field, value)


IN_RUN = ("reproduce", "dyck", *TINY, "--out", "{tmp}/run")
AUDIT = ("audit", "--model", "{audit}/model", "--fit", "{audit}/fit.txt", "--split", "test={audit}/test.txt",
         "--window", "12", "--device", "cpu", "--out", "{tmp}/out")
PCA = ("--proxy", "pca:2@blocks.1.hook_resid_pre")
FAULTS = [
    # configs: every field's type and range, unknown keys and tables, cross-field constraints
    Fault("cfg_sizes_negative", (*RUN, "--set", "proxies.kq_pca_sizes=[-1, 2]"), "distinct positive integers, got [-1, 2]"),
    Fault("cfg_sizes_zero", (*RUN, "--set", "proxies.kmeans_sizes=[0, 4]"), "distinct positive integers, got [0, 4]"),
    Fault("cfg_sizes_repeated", (*RUN, "--set", "proxies.kmeans_sizes=[2, 2]"), "distinct positive integers"),
    Fault("cfg_sizes_text", (*RUN, "--set", "proxies.kmeans_sizes=abc"), "must be a list of integers"),
    Fault("cfg_rank_above_d_model", (*RUN, "--set", "proxies.resid_pca_sizes=[1, 999]"), "above the residual stream's dimension d_model=16"),
    Fault("cfg_rank_above_d_head", (*RUN, "--set", "proxies.kq_pca_sizes=[9]"), "dimension d_head=8"),
    Fault("cfg_clusters_above_fit_tokens", (*RUN, "--set", "proxies.kmeans_sizes=[100000]"), "tokens to fit them on"),
    Fault("cfg_layer_outside_model", (*RUN, "--set", "proxies.layers=[5]"), "outside a 2-layer model"),
    Fault("cfg_no_layers", (*RUN, "--set", "proxies.layers=[]"), "proxies.layers is empty"),
    Fault("cfg_head_outside_model", (*RUN, "--set", "projection.head=9"), "the model has 2 heads"),
    Fault("cfg_ablation_unknown", (*RUN, "--set", 'evaluation.ablation="median"'), "evaluation.ablation must be one of"),
    Fault("cfg_n_boot_negative", (*RUN, "--set", "evaluation.n_boot=-5"), "evaluation.n_boot must be >= 0"),
    Fault("cfg_batch_size_zero", (*RUN, "--set", "evaluation.batch_size=0"), "evaluation.batch_size must be >= 1"),
    Fault("cfg_max_sequences_zero", (*RUN, "--set", "evaluation.max_sequences=0"), "evaluation.max_sequences must be >= 1"),
    Fault("cfg_n_fit_sequences_zero", (*RUN, "--set", "proxies.n_fit_sequences=0"), "n_fit_sequences must be >= 1"),
    Fault("cfg_points_negative", (*RUN, "--set", "projection.points=-1"), "projection.points must be >= 1"),
    Fault("cfg_lr_text", (*RUN, "--config", "{tmp}/c.toml"), "TrainConfig.lr must be a number, got 'fast'",
          _write("c.toml", '[train]\nlr = "fast"\n')),
    Fault("cfg_lr_negative", (*RUN, "--set", "train.lr=-1"), "TrainConfig.lr must be positive"),
    Fault("cfg_lr_infinite", (*RUN, "--set", "train.lr=inf"), "TrainConfig.lr must be a finite number, got inf"),
    Fault("cfg_weight_decay_infinite", (*RUN, "--config", "{tmp}/c.toml"), "TrainConfig.weight_decay must be a finite number",
          _write("c.toml", "[train]\nweight_decay = inf\n")),
    Fault("cfg_grad_clip_infinite", (*RUN, "--set", "train.grad_clip=inf"), "TrainConfig.grad_clip must be a finite number"),
    Fault("cfg_stop_split_missing", (*RUN, "--set", "train.target_acc=0.9", "--set", 'train.stop_split="nope"'),
          "watches the split 'nope', which the splits lack"),
    Fault("cfg_steps_zero", (*RUN, "--set", "train.max_steps=0"), "TrainConfig.max_steps must be a positive integer"),
    Fault("cfg_heads_do_not_divide", (*RUN, "--set", "model.d_model=15"), "not divisible by n_heads"),
    Fault("cfg_brackets_zero", (*RUN, "--set", "task.k=0"), "DyckConfig.k must be >= 1"),
    Fault("cfg_malformed_toml", (*RUN, "--config", "{tmp}/c.toml"), "is not valid TOML", _write("c.toml", "[train\n")),
    Fault("cfg_missing_file", (*RUN, "--config", "{tmp}/nope.toml"), "nope.toml not found"),
    Fault("cfg_unknown_table", (*RUN, "--config", "{tmp}/c.toml"), "unknown table(s) ['foo']", _write("c.toml", "[foo]\nx = 1\n")),
    Fault("cfg_unknown_key", (*RUN, "--config", "{tmp}/c.toml"), "unknown setting 'learning_rate'; known: lr,",
          _write("c.toml", "[train]\nlearning_rate = 1e-3\n")),
    Fault("cfg_value_not_table", (*RUN, "--config", "{tmp}/c.toml"), "'train' must be a table", _write("c.toml", "train = 3\n")),
    Fault("cfg_other_task", (*RUN, "--config", "{tmp}/c.toml"), "[task] kind is 'code' but the command runs 'dyck'",
          _write("c.toml", '[task]\nkind = "code"\n')),
    Fault("set_without_equals", (*RUN, "--set", "train.lr"), "write section.key=value"),
    Fault("set_unknown_section", (*RUN, "--set", "trian.lr=1"), "unknown section 'trian'; did you mean 'train'?"),
    # command-line flags
    Fault("preset_unknown", ("reproduce", "dyck", "--preset", "huge", "--out", "{tmp}/out"), "unknown dyck preset 'huge'"),
    Fault("preset_typo", ("reproduce", "dyck", "--preset", "tinyy", "--out", "{tmp}/out"), "did you mean 'tiny'?"),
    Fault("task_unknown", ("reproduce", "dyk", "--out", "{tmp}/out"), "invalid choice: 'dyk'"),
    Fault("seeds_zero", (*RUN, "--seeds", "0"), "--seeds must be at least 1"),
    Fault("seeds_not_a_number", (*RUN, "--seeds", "x"), "invalid int value: 'x'"),
    Fault("threads_zero", (*RUN, "--threads", "0"), "--threads must be at least 1"),
    Fault("device_unknown", (*RUN, "--device", "banana"), "unknown device 'banana'"),
    Fault("out_empty", ("reproduce", "dyck", *TINY, "--out", ""), "--out is empty"),
    Fault("out_is_a_file", ("reproduce", "dyck", *TINY, "--out", "{tmp}/f"), "not writable", _write("f", "")),
    Fault("out_under_a_file", ("reproduce", "dyck", *TINY, "--out", "{tmp}/f/sub"), "not writable", _write("f", "")),
    Fault("no_command", (), "required: COMMAND"),
    Fault("probe_without_checkpoint", ("probe", "dyck", *TINY, "--out", "{tmp}/out"), "run `illusion-probe train` first"),
    # damaged or foreign stages: the exact path and the fix; nothing overwritten
    Fault("stage_truncated_weights", IN_RUN, "checkpoint/model.safetensors: corrupted or truncated", _truncate("checkpoint/model.safetensors"), run=True),
    Fault("stage_newer_checkpoint", IN_RUN, "unknown checkpoint format version 99", _newer_checkpoint, run=True),
    Fault("stage_newer_checkpoint_probe", ("probe", "dyck", *TINY, "--out", "{tmp}/run"), "or rerun with --force", _newer_checkpoint, run=True),
    Fault("stage_truncated_proxy", IN_RUN, "proxy_000/tensors.safetensors: corrupted", _truncate("proxies/proxy_000/tensors.safetensors"), run=True),
    Fault("stage_missing_manifest", IN_RUN, "proxies/manifest.json: missing",
          lambda tmp: (tmp / "run" / "proxies" / "manifest.json").unlink(), run=True),
    Fault("stage_garbled_results", IN_RUN, "results.json: not valid JSON", _write("run/results.json", "{oops"), run=True),
    Fault("stage_garbled_projection", IN_RUN, "projection.json: not valid JSON", _write("run/projection.json", "{"), run=True),
    # report: malformed results, projection and paths
    Fault("report_missing_results", ("report", "{tmp}/nope.json"), "nope.json: missing"),
    Fault("report_results_is_a_folder", ("report", "{tmp}"), "is a directory; give the path of a JSON file"),
    Fault("report_not_json", ("report", "{tmp}/r.json"), "not valid JSON", _write("r.json", "nope")),
    Fault("report_not_an_object", ("report", "{tmp}/r.json"), "expected a JSON object, found list", _write("r.json", "[]")),
    Fault("report_meta_wrong_type", REPORT, "'meta' should be an object", _edit_json("results.json", lambda d: d.__setitem__("meta", [])), run=True),
    Fault("report_records_wrong_type", REPORT, "'records' should be a list", _edit_json("results.json", lambda d: d.__setitem__("records", "x")), run=True),
    Fault("report_value_wrong_type", REPORT, "expected a number or null, got 'abc'", _edit_json("results.json", _record("value", "abc")), run=True),
    Fault("report_field_wrong_type", REPORT, "field 'split' should be str", _edit_json("results.json", _record("split", 5)), run=True),
    Fault("report_newer_schema", REPORT, "schema version 99 is not supported",
          _edit_json("results.json", lambda d: d.__setitem__("schema_version", 99)), run=True),
    Fault("report_no_records", REPORT, "empty", _edit_json("results.json", lambda d: d.__setitem__("records", [])), run=True),
    Fault("report_bad_projection", REPORT, "projection.json: not valid JSON", _write("run/projection.json", "{"), run=True),
    Fault("report_out_is_a_folder", ("report", "{tmp}/run/results.json", "--out", "{tmp}/run/proxies"), "is a directory", run=True),
    Fault("report_out_empty", ("report", "{tmp}/run/results.json", "--out", ""), "--out is empty", run=True),
    # audit: files, hooks, proxy specs, windows
    Fault("audit_missing_model_flag", ("audit", "--fit", "{audit}/fit.txt"), "audit needs model"),
    Fault("audit_missing_fit_file", (*AUDIT[:4], "{audit}/nope.txt", *AUDIT[5:], *PCA), "nope.txt does not exist"),
    Fault("audit_model_folder_missing", ("audit", "--model", "{tmp}/nope", *AUDIT[3:], *PCA), "no such directory"),
    Fault("audit_not_a_model_folder", ("audit", "--model", "{tmp}", *AUDIT[3:], *PCA), "no config.json"),
    Fault("audit_hub_name_offline", ("audit", "--model", "someone/some-model", *AUDIT[3:], *PCA), "HF_HUB_OFFLINE is set",
          env={"HF_HUB_OFFLINE": "1"}),
    Fault("audit_split_without_name", (*AUDIT[:6], "{audit}/test.txt", *AUDIT[7:], *PCA), "write NAME=FILE"),
    Fault("audit_split_named_train", (*AUDIT, "--split", "train={audit}/test.txt", *PCA), "not 'train'"),
    Fault("audit_empty_split", (*AUDIT, "--split", "ood_empty={audit}/empty.txt", *PCA), "no window of at least two tokens"),
    Fault("audit_no_proxy", AUDIT, "audit needs proxies: give --proxy"),
    Fault("audit_unknown_hook", (*AUDIT, "--proxy", "pca:2@blocks.1.hook_resid_pree"), "did you mean 'blocks.1.hook_resid_pre'"),
    Fault("audit_proxy_without_sizes", (*AUDIT, "--proxy", "pca@blocks.1.hook_resid_pre"), "pca needs sizes (its rank)"),
    Fault("audit_rank_above_dimension", (*AUDIT, "--proxy", "pca:99@blocks.1.hook_resid_pre"), "rank 99 exceeds the feature dimension 32"),
    Fault("audit_unknown_method", (*AUDIT, "--proxy", "pcaa:2@blocks.1.hook_resid_pre"), "unknown simplifier 'pcaa'; did you mean 'pca'"),
    Fault("audit_spec_without_hook", (*AUDIT, "--proxy", "pca:2"), "write METHOD[:SIZES]@HOOKS"),
    Fault("audit_external_sae_spec", (*AUDIT, "--proxy", "external_sae@blocks.1.hook_resid_pre"),
          "external_sae cannot be built from a spec"),
    Fault("audit_transcoder_not_at_mlp", (*AUDIT, "--proxy", "transcoder:8@blocks.1.hook_resid_pre"),
          "replaces an MLP's output"),
    Fault("audit_window_above_context", (*AUDIT, *PCA, "--window", "64"), "does not fit the model's context of 32"),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    assert main(["reproduce", "dyck", *TINY, "--out", str(out)]) == 0
    return out


def _snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` with a digest of its bytes (folders: ``dir``), to show nothing changed."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def check_fault(argv: list[str], tmp: Path, message: str, code: int, capsys) -> None:
    before = _snapshot(tmp)
    try:
        returned = main(argv)
    except SystemExit as stop:  # argparse's own errors exit
        returned = stop.code
    err = capsys.readouterr().err.strip().splitlines()
    assert returned == code, err
    assert err and err[-1].startswith("illusion-probe: error:") and message in err[-1], err[-1:]
    assert not [line for line in err if re.match(r"\[illusion-probe\] (training|fitting|evaluating)", line)], err
    assert _snapshot(tmp) == before, "the failed command changed files"


@pytest.fixture(scope="module")
def audit_files(tmp_path_factory) -> Path:
    """A tiny GPT-2 with its tokenizer, and text files for it."""
    root = tmp_path_factory.mktemp("audit")
    save_tiny("gpt2", root / "model", tokenizer=True)
    (root / "fit.txt").write_text("\n".join(f"the cat sat on the mat {i % 3 * 'a '}" for i in range(20)))
    (root / "test.txt").write_text("\n".join(f"the dog sat on {i % 2 * 'the '}mat" for i in range(10)))
    (root / "empty.txt").write_text("\n\n")
    return root


@pytest.mark.parametrize("fault", FAULTS, ids=[f.id for f in FAULTS])
def test_fault_is_one_line_before_any_work(fault: Fault, tmp_path: Path, request: pytest.FixtureRequest,
                                           monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    if fault.run:
        shutil.copytree(request.getfixturevalue("finished_run"), tmp_path / "run")
    if fault.setup is not None:
        fault.setup(tmp_path)
    audit = request.getfixturevalue("audit_files") if any("{audit}" in a for a in fault.argv) else None
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{audit}", str(audit)) for a in fault.argv]
    for key, value in fault.env.items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()  # what the fixtures printed
    check_fault(argv, tmp_path, fault.message, fault.code, capsys)


def test_read_only_output_folder(tmp_path: Path, capsys) -> None:
    # case: out_read_only
    _read_only(tmp_path)
    try:
        (tmp_path / "ro" / "probe").touch()
    except PermissionError:
        pass
    else:
        pytest.skip("this user may write into a read-only folder (root with CAP_DAC_OVERRIDE)")
    check_fault(["reproduce", "dyck", *TINY, "--out", str(tmp_path / "ro" / "run")], tmp_path, "not writable", 2, capsys)


def test_force_redoes_a_damaged_stage(tmp_path: Path, finished_run: Path, capsys) -> None:
    # case: stage_force_repairs
    shutil.copytree(finished_run, tmp_path / "run")
    _truncate("proxies/proxy_000/tensors.safetensors")(tmp_path)
    assert main([*[a.replace("{tmp}", str(tmp_path)) for a in IN_RUN], "--force"]) == 0
    assert "redoing the fit stage (--force)" in capsys.readouterr().err
    assert _snapshot(tmp_path / "run") == _snapshot(finished_run)  # refitted byte for byte


def test_disk_full_while_writing(tmp_path: Path, monkeypatch, capsys) -> None:
    # case: disk_full
    import illusion_probe.artifacts as artifacts

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts.os, "replace", full)
    assert main(["reproduce", "dyck", *TINY, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("illusion-probe: error:") and "No space left on device" in err[-1]
    assert "free space or choose another path" in err[-1]
    assert list(tmp_path.iterdir()) == []  # no half-written artefact or staging folder; the new, empty --out removed


def test_diverged_training_leaves_nothing(tmp_path: Path, capsys) -> None:
    # case: train_loss_not_finite_cli
    assert main(["reproduce", "dyck", *TINY, "--out", str(tmp_path / "out"), "--set", "train.lr=1e30"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("illusion-probe: error: train: the loss became") and "lower train.lr" in err[-1]
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no staging folder; the new, empty --out removed


def test_every_case_is_documented() -> None:
    """``docs/reliability.md`` lists exactly the cases tested here and in ``tests/unit/test_bad_inputs.py``."""
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \|", DOC.read_text(), flags=re.M))
    sources = [Path(__file__), Path(__file__).parents[1] / "unit" / "test_bad_inputs.py"]
    tested = {case for source in sources
              for pair in re.findall(r'(?:Fault|Bad)\(\s*"([a-z0-9_]+)"|# case: ([a-z0-9_]+)', source.read_text())
              for case in pair if case}
    assert documented == tested, (sorted(documented - tested), sorted(tested - documented))
    assert len(tested) >= 60
