"""A run killed in any stage and run again writes the same results, CSV and report as one that never stopped.

Each case starts ``illusion-probe reproduce`` in a subprocess, kills it (SIGKILL) as soon as it logs the
stage, reruns it to the end, and compares every artefact with an uninterrupted run byte for byte, timing
fields aside.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ARGS = ["reproduce", "dyck", "--preset", "tiny", "--device", "cpu", "--threads", "1"]
TIMING = re.compile(r'((?:"|&quot;)(?:clean_s|baselines_s|proxies_s|scoring_s|train_seconds|evaluate_seconds)'
                    r'(?:"|&quot;): )[0-9.e+-]+')  # in results.json and, HTML-escaped, in the report


def _cli(out: Path, kill_at: str | None = None) -> int:
    """Run the CLI into ``out``; with ``kill_at``, SIGKILL it when a log line contains that text."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "illusion_probe", *ARGS, "--out", str(out)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    for line in process.stderr:
        if kill_at is not None and kill_at in line:
            process.send_signal(signal.SIGKILL)
            break
    process.stderr.close()
    return process.wait(timeout=600)


def _without_timings(path: Path) -> str:
    return TIMING.sub(r"\g<1>0", path.read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole")
    assert _cli(out) == 0
    return out


@pytest.mark.parametrize("stage", ["training", "fitting proxies", "evaluating"])
def test_killed_run_resumes_to_the_same_files(uninterrupted: Path, tmp_path: Path, stage: str) -> None:
    assert _cli(tmp_path, kill_at=stage) == -signal.SIGKILL
    assert not (tmp_path / "results.json").exists()
    assert _cli(tmp_path) == 0
    for name in ("results.json", "results.csv", "projection.json", "report.html"):
        assert _without_timings(tmp_path / name) == _without_timings(uninterrupted / name), name
    assert json.loads((tmp_path / "proxies" / "manifest.json").read_text())["proxies"] == \
        json.loads((uninterrupted / "proxies" / "manifest.json").read_text())["proxies"]
