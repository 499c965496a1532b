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


@pytest.mark.timeout(120)
def test_gpu_runner_on_the_cpu_with_tiny_models(tmp_path):
    """``benchmarks.gpu_sections`` end to end on the CPU: every section runs, each image gets ``--boxes``
    boxes in both the pipeline and the baseline, and the pipeline writes every image."""
    from benchmarks.gpu_sections import main as gpu_main

    out = tmp_path / "gpu.json"
    args = ["--device", "cpu", "--preset", "tiny-random", "--images", "8", "--baseline-images", "3"]
    gpu_main([*args, "--variant-images", "4", "--boxes", "3", "--batch-size", "4", "--out", str(out)])

    results = json.loads(out.read_text())["results"]
    assert "errors" not in results and "skipped" not in results
    assert results["pipeline"]["instances"]["value"] == 8 * 3
    assert results["baseline"]["boxes"]["value"] == 3 * 3
    for name in ("bf16_processor", "fp32_processor", "fp32_detector"):
        assert results[f"pipeline_{name}"]["instances"]["value"] == 4 * 3
    assert results["per_box"]["boxes_100"]["encoder_calls"]["value"] == 1
    assert results["compute_limit"]["encoder_gflops_per_image"]["value"] > 0
    split = results["detector_split"]
    assert split["detect_s_per_image"]["value"] > 0
    assert split["forward_s_per_image"]["value"] > 0


@pytest.mark.timeout(180)
def test_training_throughput_section(tmp_path):
    """``benchmarks.train``'s throughput section with one worker on 4 images, through the ``--device`` /
    ``--model`` path a GPU run takes (the base saved with ``save_pretrained`` and loaded from that folder):
    it trains and reports, with no GPU fields on the CPU."""
    from benchmarks.train import main as train_main

    out = tmp_path / "train.json"
    args = ["--only", "throughput", "--workers", "1", "--images", "4", "--val-images", "1"]
    train_main([*args, "--device", "cpu", "--model", "tiny", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["model"] == "tiny" and report["machine"]["device"] == "cpu"
    result = report["results"]["throughput"]["workers_1"]
    assert result["images_per_worker_per_epoch"]["value"] == 4
    assert result["samples_per_s_per_worker"]["value"] > 0 and result["epoch_s"]["unit"] == "s"
    assert not any(key.startswith(("gpu_", "peak_memory")) for key in result)


def test_training_throughput_on_cuda_refuses_two_workers(capsys):
    """One GPU cannot host two NCCL ranks: ``--device cuda --workers 1 2`` stops with the fix, before any
    work."""
    from benchmarks.train import main as train_main

    with pytest.raises(SystemExit):
        train_main(["--only", "throughput", "--device", "cuda", "--workers", "1", "2"])
    assert "pass --workers 1" in capsys.readouterr().err
