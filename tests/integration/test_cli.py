"""The CLI end to end on the tiny preset, and its one-line errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from illusion_probe.analysis.projection import Projection
from illusion_probe.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["reproduce", "dyck", "--preset", "tiny", "--out", str(out), "--device", "cpu"]) == 0
    return out


def test_reproduce_writes_every_artefact(run_dir, capsys) -> None:
    for name in ("results.json", "results.csv", "report.html", "checkpoint/model.safetensors", "proxies/manifest.json"):
        assert (run_dir / name).is_file(), name
    results = json.loads((run_dir / "results.json").read_text())
    splits = {r["split"] for r in results["records"]}
    assert {"train", "test", "ood_unseen_structure", "ood_longer", "ood_deeper"} <= splits
    methods = {r["method"] for r in results["records"]}
    assert {"pca", "kmeans", "onehot_attention", "mean_ablation", "sae", "transcoder"} <= methods
    assert "Plotly.newPlot" in (run_dir / "report.html").read_text()
    assert not [p for p in os.listdir(run_dir) if p.startswith(".")]  # no staging leftovers


def test_rerun_reuses_finished_stages(run_dir, capsys) -> None:
    before = (run_dir / "results.json").stat().st_mtime_ns
    assert main(["reproduce", "dyck", "--preset", "tiny", "--out", str(run_dir), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "reusing trained model" in err and "reusing fitted proxies" in err and "reusing results" in err
    assert (run_dir / "results.json").stat().st_mtime_ns == before


def test_last_line_names_every_artefact(run_dir, capsys) -> None:
    assert main(["reproduce", "dyck", "--preset", "tiny", "--out", str(run_dir), "--device", "cpu"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("wrote: ")
    assert sorted(last.removeprefix("wrote: ").split(", ")) == sorted(str(p) for p in run_dir.iterdir())


def test_projection_records_provenance(run_dir) -> None:
    meta = json.loads((run_dir / "projection.json").read_text())["meta"]
    assert meta["threads"] == 1 and meta["versions"]["torch"] and {"fingerprint", "n_points", "seed"} <= set(meta)
    assert Projection.from_json(run_dir / "projection.json").meta == meta


def test_another_thread_count_retrains(run_dir, tmp_path, capsys) -> None:
    shutil.copytree(run_dir / "checkpoint", tmp_path / "checkpoint")
    try:
        assert main(["train", "dyck", "--preset", "tiny", "--out", str(tmp_path), "--device", "cpu", "--threads", "2"]) == 0
    finally:
        torch.set_num_threads(1)  # as the test session runs
    err = capsys.readouterr().err
    assert "redoing the train stage" in err and "[illusion-probe] training" in err
    assert json.loads((tmp_path / "checkpoint" / "metadata.json").read_text())["threads"] == 2


def test_report_subcommand_rebuilds_html(run_dir, tmp_path) -> None:
    assert main(["report", str(run_dir / "results.json"), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")


def _fails(argv: list[str], capsys, fragment: str) -> None:
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and fragment in err[-1] and err[-1].startswith("illusion-probe: error:")


def test_cuda_without_gpu(tmp_path, capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present, so --device cuda is valid here")
    _fails(["reproduce", "dyck", "--preset", "tiny", "--out", str(tmp_path / "o"), "--device", "cuda"], capsys,
           "no CUDA GPU")
    assert not (tmp_path / "o").exists()


def test_seeds_get_their_own_directories(tmp_path) -> None:
    assert main(["reproduce", "dyck", "--preset", "tiny", "--out", str(tmp_path), "--device", "cpu", "--seeds", "2"]) == 0
    first, second = (json.loads((tmp_path / f"seed_{s}" / "results.json").read_text()) for s in (0, 1))
    assert first["meta"]["seed"] == 0 and second["meta"]["seed"] == 1
    assert first["records"] != second["records"]  # different splits, initialisation and batch order
    summary = json.loads((tmp_path / "seeds.json").read_text())  # the cross-seed verdict counts
    assert summary["seeds"] == [0, 1] and summary["rows"]
    assert summary["threads"] == 1 and summary["versions"]["torch"]
    assert all(r["worse"] + r["better"] + r["not_significant"] == r["seeds"] == len(r["gaps"]) for r in summary["rows"])
