"""`illusion-probe audit` end to end on a locally saved tiny GPT-2 and two small text files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from illusion_probe.cli import main
from tests.hf_models import save_tiny

IN_DISTRIBUTION = "the cat sat on the mat and the dog sat on the mat"
SHIFTED = "def x return self if else for while class import print y"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("audit")
    model = save_tiny("gpt2", root / "model", tokenizer=True)
    (root / "fit.txt").write_text("\n".join(f"{IN_DISTRIBUTION} {i % 3 * 'a '}" for i in range(40)))
    (root / "test.txt").write_text("\n".join(f"the dog sat on {i % 2 * 'the '}mat" for i in range(20)))
    (root / "code.jsonl").write_text("\n".join(json.dumps({"text": f"{SHIFTED} {i % 4 * 'x '}"}) for i in range(20)))
    return {"model": model, "fit": root / "fit.txt", "test": root / "test.txt", "code": root / "code.jsonl"}


def _argv(files, out, *extra) -> list[str]:
    return ["audit", "--model", str(files["model"]), "--fit", str(files["fit"]), "--split", f"test={files['test']}",
            "--split", f"ood_code={files['code']}", "--out", str(out), "--device", "cpu", "--window", "12",
            "--set", "evaluation.n_boot=50", *extra]


def test_audit_writes_results_csv_and_report(files, tmp_path, capsys) -> None:
    argv = _argv(files, tmp_path / "out", "--proxy", "pca:2,4@blocks.1.hook_resid_pre",
                 "--proxy", "kmeans:4@blocks.1.attn.hook_k+blocks.1.attn.hook_q", "--proxy", "onehot@1")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "@blocks.1.hook_resid_pre" in out and "ood_code" in out and "wrote:" in out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["split"] for r in results["records"]} == {"train", "test", "ood_code"}
    assert {r["role"] for r in results["records"] if r["split"] == "ood_code"} == {"ood"}
    assert {r["proxy"] for r in results["records"]} == {
        "pca(2)@blocks.1.hook_resid_pre", "pca(4)@blocks.1.hook_resid_pre",
        "kmeans(4)@blocks.1.attn.hook_k+hook_q", "onehot_attention@blocks.1.attn.hook_pattern"}
    assert results["meta"]["text"]["ood_code"]["documents"] == 20
    assert (tmp_path / "out" / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert (tmp_path / "out" / "results.csv").is_file()


def test_audit_from_a_config_file(files, tmp_path) -> None:
    config = tmp_path / "audit.toml"
    config.write_text(f'[audit]\nmodel = "{files["model"]}"\nfit = "{files["fit"]}"\nwindow = 12\n'
                      f'proxies = ["svd:2@blocks.0.hook_resid_post"]\n\n[audit.splits]\nood_code = "{files["code"]}"\n\n'
                      '[evaluation]\nn_boot = 0\n')
    assert main(["audit", "--config", str(config), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "o" / "results.json").read_text())["meta"]["audit"]["proxies"] == [
        "svd:2@blocks.0.hook_resid_post"]
