"""The code study end to end on its tiny preset."""

from __future__ import annotations

import json

from illusion_probe.cli import main


def test_cli_reproduce_code_tiny(tmp_path):
    assert main(["reproduce", "code", "--preset", "tiny", "--out", str(tmp_path), "--device", "cpu"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    categories = {r["category"] for r in results["records"]}
    assert {"all", "closing_bracket", "copying", "deep_nesting", "first_occurrence"} <= categories
    assert {r["split"] for r in results["records"]} == {"train", "test", "ood_cpp"}
