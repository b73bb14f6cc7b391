"""The code study end to end on its tiny preset, and the dataset path offline in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from illusion_probe.cli import main


def test_cli_reproduce_code_tiny(tmp_path):
    assert main(["reproduce", "code", "--preset", "tiny", "--out", str(tmp_path), "--device", "cpu"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    categories = {r["category"] for r in results["records"]}
    assert {"all", "closing_bracket", "copying", "deep_nesting", "first_occurrence"} <= categories
    assert {r["split"] for r in results["records"]} == {"train", "val", "test", "ood_cpp"}


def test_dataset_while_offline_is_a_one_line_error(tmp_path):
    """Run in a fresh process: ``datasets`` reads the offline switches when it is imported."""
    for i in range(20):  # enough files that some are held out for test
        (tmp_path / f"mod_{i}.py").write_text(f"def f_{i}(x):\n    return [x, (x, {i})]\n" * 40)
    script = (
        "from illusion_probe.errors import IllusionProbeError\n"
        "from illusion_probe.tasks.code import CodeConfig, CodeTask\n"
        f"cfg = CodeConfig(window=16, n_train=20, n_test=5, n_ood=5, python_dir={str(tmp_path)!r}, "
        "include_cpp=False, min_char_count=1, hf_dataset='bigcode/the-stack-smol')\n"
        "try:\n    CodeTask(cfg).make_splits()\nexcept IllusionProbeError as err:\n    print('ERROR:', err)\n"
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    lines = [line for line in done.stdout.splitlines() if line.startswith("ERROR:")]
    assert len(lines) == 1, done.stdout + done.stderr
    assert "cannot load Hugging Face dataset 'bigcode/the-stack-smol'" in lines[0]
    assert "HF_DATASETS_OFFLINE" in lines[0]
