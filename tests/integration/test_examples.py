"""Every script in examples/ runs top to bottom in its tiny setting and writes only into its --out directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("[0-9][0-9]_*.py"))
TIMEOUT_S = 600


def test_every_example_is_listed() -> None:
    assert EXAMPLES == ["01_quickstart_dyck.py", "02_audit_any_hooked_model.py", "03_code_completion.py",
                        "04_custom_simplifier.py", "05_audit_your_model.py", "06_sparse_dictionaries.py"]


@pytest.mark.parametrize("script", EXAMPLES)
def test_example_runs_and_writes_only_into_out(script: str, tmp_path: Path) -> None:
    cwd, home, tmp = tmp_path / "cwd", tmp_path / "home", tmp_path / "tmp"
    for folder in (cwd, home, tmp):
        folder.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PYTHONDONTWRITEBYTECODE": "1",  # no __pycache__ next to the package or the script
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # Tiny models on a few shared cores run ~10x faster single-threaded (thread contention).
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "ILLUSION_PROBE_TINY": "1",
        "HOME": str(home),  # caches (Hugging Face, torch, matplotlib) would land here
        "TMPDIR": str(tmp),
    }
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--tiny", "--out", "out"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert sorted(os.listdir(cwd)) == ["out"], f"{script} wrote outside --out: {sorted(os.listdir(cwd))}"
    for folder in (home, tmp):
        # Files only: importing TransformerLens makes an empty $TMPDIR/torchinductor_$USER directory.
        leftovers = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())
        assert not leftovers, f"{script} wrote outside --out, into {folder.name}: {leftovers[:10]}"
    written = [p for p in (cwd / "out").rglob("*") if p.is_file()]
    assert written, f"{script} wrote nothing into --out"
    assert not [p for p in written if p.name.startswith(".")], "staging leftovers in --out"


def test_api_reference_lists_every_public_name() -> None:
    import illusion_probe as ip

    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    missing = [name for name in ip.__all__ if name != "__version__" and f"heading: ip.{name}\n" not in text]
    assert not missing, f"docs/api.md has no ::: block for {missing}"
    assert "ip.__version__" in text
