"""Smoke test of the benchmark runner's cheapest sections (Ray-free): it runs and writes the expected JSON.
No timing assertions: numbers on a shared CI machine mean nothing."""

from __future__ import annotations

import json

import pytest

from benchmarks.run import main

STAGES = ("decode", "detector", "encoder", "decoder", "upsample_rle", "write")


@pytest.mark.timeout(60)
def test_quick_stages_and_per_box(tmp_path):
    out = tmp_path / "bench.json"
    main(["--quick", "--images", "4", "--only", "stages", "per_box", "--out", str(out)])

    report = json.loads(out.read_text())
    assert {"cpu_count", "torch", "ray", "transformers", "date", "device"} <= set(report["machine"])
    stages = report["results"]["stages"]
    assert stages["images"]["value"] == 4
    for name in STAGES:
        assert stages[f"{name}_s"]["value"] > 0
        assert stages[f"{name}_s"]["unit"] == "s"
        assert 0 < stages[f"{name}_fraction"]["value"] < 1
    assert sum(stages[f"{name}_fraction"]["value"] for name in STAGES) == pytest.approx(1.0)
    per_box = report["results"]["per_box"]["tiny"]
    assert per_box["encoder_s"]["value"] > 0
    for n in (1, 10, 100):
        assert per_box[f"boxes_{n}"]["decoder_s"]["value"] > 0
        assert per_box[f"boxes_{n}"]["encoder_calls"]["value"] == 1  # embed once, decode many
