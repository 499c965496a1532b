"""Smoke test of the learning-check benchmark: it trains through Ray Train, evaluates, writes its JSON.
Whether training helps is the benchmark's finding (benchmarks/RESULTS.md), not asserted here."""

from __future__ import annotations

import json

from benchmarks.learning_check import main


def test_learning_check_runs_end_to_end(ray_session, tmp_path):
    result = main(
        ["--train-images", "4", "--val-images", "2", "--epochs", "1", "--out", str(tmp_path), "--work",
         str(tmp_path / "work")]
    )  # fmt: skip
    saved = json.loads((tmp_path / f"{result['date']}-learning-check.json").read_text())
    assert [h["epoch"] for h in saved["history"]] == [0, 1]
    assert [row["model"].split()[0] for row in saved["eval"]] == ["SAM", "HQ-SAM", "HQ-SAM"]
    assert all(row["count"] == saved["eval"][0]["count"] > 0 for row in saved["eval"])
