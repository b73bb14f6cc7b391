"""Two processes under ``torchrun`` (CPU, gloo): the same answers as one process, and faults that end the run.

Each test launches ``torchrun --standalone --nproc_per_node 2``. The reference is one process on the same
checkpoint. Tolerances are for floating-point reduction order, measured on the tiny preset: PCA's moments
are summed across processes, so its projectors differ by up to about 5e-7 and the evaluation values by up
to 3e-5 (CE score, a ratio, on a confidence bin); k-means, sparse dictionaries and transcoders are fitted on
the very same sample and come out bit-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import illusion_probe as ip
from illusion_probe.cli import main

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TINY = ["reproduce", "dyck", "--preset", "tiny", "--device", "cpu"]
#: Largest absolute difference allowed between one and two processes, per metric (reduction order only); a
#: relative difference of 1e-4 is allowed too (CE score is a ratio, and on a confidence bin it can be 40).
TOLERANCE = {"ce_score": 1e-3}
DEFAULT_TOLERANCE = 1e-4


def torchrun(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([*TORCHRUN, *args], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    assert main([*TINY, "--out", str(out)]) == 0
    return out


def same_checkpoint(one_process: Path, folder: Path) -> Path:
    folder.mkdir()
    shutil.copytree(one_process / "checkpoint", folder / "checkpoint")
    return folder


def assert_same_results(one: ip.Results, two: ip.Results, skip: tuple[str, ...] = ()) -> None:
    """Every record of ``one`` in ``two`` within the tolerance, but the metrics ``skip``."""
    def by_key(results: ip.Results) -> dict:
        return {(r.split, r.proxy, r.metric, r.category, r.hook): r for r in [*results.records, *results.control_records]
                if r.metric not in skip}

    expected, found = by_key(one), by_key(two)
    assert expected.keys() == found.keys()
    for key, record in expected.items():
        tolerance = TOLERANCE.get(record.metric, DEFAULT_TOLERANCE)
        for field in ("value", "ci_low", "ci_high"):
            a, b = getattr(record, field), getattr(found[key], field)
            assert (a is None) == (b is None), (key, field)
            if a is not None:
                assert a == pytest.approx(b, rel=1e-4, abs=tolerance, nan_ok=True), (key, field, a, b)


def assert_same_proxies(one: Path, two: Path) -> None:
    manifest = json.loads((one / "manifest.json").read_text())["proxies"]
    assert json.loads((two / "manifest.json").read_text())["proxies"] == manifest
    for name, folder in manifest:
        expected, found = ip.Proxy.load(one / folder), ip.Proxy.load(two / folder)
        for hook, simplifier in expected.simplifiers.items():
            state, other = simplifier.state_dict(), found.simplifiers[hook].state_dict()
            if "components" in state:  # PCA: the same subspace, up to the order of the summed moments
                def projector(s: dict) -> torch.Tensor:
                    return s["components"] @ s["components"].transpose(-1, -2)
                assert torch.allclose(projector(state), projector(other), atol=1e-5), name
            else:  # fitted on the same gathered sample, or a sum of the same numbers
                for tensor_name, tensor in state.items():
                    assert torch.allclose(tensor, other[tensor_name], rtol=0, atol=1e-7), (name, tensor_name)


def test_reproduce_on_two_processes_matches_one(one_process, tmp_path):
    out = same_checkpoint(one_process, tmp_path / "two")
    done = torchrun(["-m", "illusion_probe", *TINY, "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reusing trained model" in done.stderr
    assert done.stdout.count("headline:") == 1  # the summary is printed once, by the main process
    assert done.stderr.count("[illusion-probe] fitting proxies") == 1
    one, two = ip.Results.from_json(one_process / "results.json"), ip.Results.from_json(out / "results.json")
    assert two.meta["processes"] == 2 and one.meta["processes"] == 1
    assert_same_results(one, two)
    assert_same_proxies(one_process / "proxies", out / "proxies")
    assert (out / "report.html").is_file() and (out / "projection.json").is_file()


def test_train_on_two_processes_writes_one_checkpoint(tmp_path):
    from illusion_probe.checkpoint import read_checkpoint_metadata

    done = torchrun(["-m", "illusion_probe", "train", "dyck", "--preset", "tiny", "--device", "cpu",
                     "--out", str(tmp_path / "run")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote:") == 1
    assert read_checkpoint_metadata(tmp_path / "run" / "checkpoint")["extra"]["processes"] == 2
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint"]


def test_python_api_in_a_users_script(tmp_path):
    """A user's script creates the process group; training is reproducible and keeps every process in step, and
    fitting and evaluating agree with one process up to the reduction order (the weights differ by it too)."""
    from tests.integration.torchrun_api import run

    run(tmp_path / "one")
    done = torchrun([str(ROOT / "tests" / "integration" / "torchrun_api.py"), str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    # The key bias is left out: its exact gradient is zero (softmax ignores a shift shared by every key), so its
    # gradient is rounding noise, which Adam scales up to steps of the learning rate (measured: 1.5e-4 apart).
    assert all(torch.allclose(one[name], two[name], rtol=0, atol=1e-6) for name in one
               if not name.endswith(("attn.k.bias", "attn.b_K")))
    # CE score left out: a ratio whose denominator nears 0 on some confidence bins (values up to 600), where
    # the weights' rounding differences move its interval by 4e-4 of itself.
    assert_same_results(ip.Results.from_json(tmp_path / "one" / "results.json"),
                        ip.Results.from_json(tmp_path / "two" / "results.json"), skip=("ce_score",))


def test_audit_of_a_hugging_face_model_on_two_processes_matches_one(tmp_path):
    from tests.hf_models import save_tiny

    model = save_tiny("gpt2", tmp_path / "model", tokenizer=True)
    (tmp_path / "fit.txt").write_text("\n".join(f"the cat sat on the mat {i % 3 * 'a '}" for i in range(40)))
    (tmp_path / "code.txt").write_text("\n".join(f"def x return self if else {i % 4 * 'x '}" for i in range(20)))
    argv = ["audit", "--model", str(model), "--fit", str(tmp_path / "fit.txt"), "--split", f"test={tmp_path / 'fit.txt'}",
            "--split", f"ood_code={tmp_path / 'code.txt'}", "--device", "cpu", "--window", "12",
            "--set", "evaluation.n_boot=50", "--proxy", "pca:2,4@blocks.1.hook_resid_pre",
            "--proxy", "kmeans:4@blocks.1.attn.hook_k+blocks.1.attn.hook_q", "--proxy", "onehot@1"]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    done = torchrun(["-m", "illusion_probe", *argv, "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_results(ip.Results.from_json(tmp_path / "one" / "results.json"),
                        ip.Results.from_json(tmp_path / "two" / "results.json"))


def test_a_bad_input_is_printed_once(tmp_path):
    done = torchrun(["-m", "illusion_probe", *TINY, "--out", str(tmp_path / "run"), "--set", "train.lr=-1"])
    assert done.returncode != 0  # torchrun exits 1 whatever its processes' status (here 2)
    assert done.stderr.count("illusion-probe: error") == 1 and "TrainConfig.lr must be positive" in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fault", ["raise", "kill", "hang"])
def test_a_failing_process_ends_the_run(one_process, tmp_path, fault):
    """Process 1 raises, is killed, or hangs as evaluation starts: the run fails within seconds (a hang after
    ILLUSION_PROBE_TIMEOUT_S), the cause is printed once, no results.json or staging folder is left, and a
    rerun reuses the stages that finished."""
    out = same_checkpoint(one_process, tmp_path / "run")
    worker = ROOT / "tests" / "integration" / "torchrun_faults.py"
    tick = time.perf_counter()
    done = torchrun([str(worker), *TINY, "--out", str(out)], FAULT=fault, ILLUSION_PROBE_TIMEOUT_S="5")
    assert done.returncode != 0
    assert time.perf_counter() - tick < 120
    if fault == "raise":
        assert done.stderr.count("injected failure on process 1") == 1
    if fault == "hang":
        assert done.stderr.count("did not answer within ILLUSION_PROBE_TIMEOUT_S=5 s") == 1
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "proxies"]
    if fault == "kill":  # a rerun in one process finishes from the complete stages
        assert main([*TINY, "--out", str(out)]) == 0
        assert_same_results(ip.Results.from_json(one_process / "results.json"),
                            ip.Results.from_json(out / "results.json"))
