"""A new user's mistakes, each through the real ``hqlabel`` command line: exit code 2, one error line
naming the option and the fix, no traceback, nothing left in ``--out``; all of them before Ray starts
(starting Ray here fails the test)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import hqlabel.jobs.label as label_job
import hqlabel.jobs.train as train_job
from hqlabel.jobs.checks import offline_hub
from hqlabel.jobs.cli import main
from hqlabel.jobs.label import changed_settings


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """These mistakes must be refused before Ray starts."""

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(label_job, "ray_init", refuse)
    monkeypatch.setattr(train_job, "ray_init", refuse)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local Ray: the hardware checks apply


def _error(capsys, argv: list[str], out: Path) -> str:
    """Run ``hqlabel ARGV``; its one error line, after checking the exit code, stderr and ``out``."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("hqlabel: error:")]
    assert code == 2 and len(lines) == 1, err
    assert "Traceback" not in err
    others = [
        line for line in err.splitlines() if line not in lines and not line.startswith("WARNING: --preset")
    ]
    assert not others, err  # nothing but the error (and the random-weights warning)
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))
    return lines[0]


def _label(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["label", str(folder), "--classes", "circle", "--out", str(out), "--no-progress", *extra]


def test_missing_hq_weights(capsys, image_folder, tmp_path):
    out = tmp_path / "out"
    line = _error(
        capsys, _label(image_folder, out, "--preset", "tiny-random", "--hq-weights", "runs/nope"), out
    )
    assert line.startswith("hqlabel: error: --hq-weights: ") and "runs/nope does not exist; pass" in line


def test_unreadable_hq_weights(capsys, image_folder, tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"not safetensors")
    out = tmp_path / "out"
    argv = _label(
        image_folder, out, "--preset", "tiny-random", "--hq-weights", str(tmp_path / "w.safetensors")
    )
    assert "not a readable safetensors file" in _error(capsys, argv, out)


@pytest.mark.parametrize("device", ["gpu", "cuda:x"])
def test_unknown_device(capsys, image_folder, tmp_path, device):
    out = tmp_path / "out"
    line = _error(capsys, _label(image_folder, out, "--preset", "tiny-random", "--device", device), out)
    assert f"--device {device!r}" in line and "use auto, cpu, cuda or cuda:N" in line


def test_cuda_on_a_machine_without_gpu(capsys, image_folder, tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    line = _error(capsys, _label(image_folder, out, "--preset", "tiny-random", "--device", "cuda"), out)
    assert "no CUDA GPU" in line and "--device cpu" in line


def test_fp16_on_the_cpu(capsys, image_folder, tmp_path):
    out = tmp_path / "out"
    argv = _label(image_folder, out, "--preset", "tiny-random", "--device", "cpu", "--precision", "fp16")
    line = _error(capsys, argv, out)
    assert "--precision fp16 on the CPU" in line and "use --precision bf16 or fp32" in line


def test_fp16_with_device_auto_on_a_cpu_machine(capsys, image_folder, tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    line = _error(capsys, _label(image_folder, out, "--preset", "tiny-random", "--precision", "fp16"), out)
    assert "--precision fp16 on the CPU" in line


def test_compile_on_the_cpu_without_a_compiler(capsys, image_folder, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    monkeypatch.delenv("CXX", raising=False)
    out = tmp_path / "out"
    argv = _label(image_folder, out, "--preset", "tiny-random", "--device", "cpu", "--compile")
    assert "--compile on the CPU needs a C++ compiler" in _error(capsys, argv, out)


def test_unknown_segmenter_is_named_before_the_default_detector(capsys, image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)  # restored after the test
    out = tmp_path / "out"
    line = _error(capsys, _label(image_folder, out, "--segmenter", "nobody/no-such-sam"), out)
    assert "cannot load the segmenter 'nobody/no-such-sam'" in line and "--segmenter" in line


def test_model_path_that_does_not_exist(capsys, image_folder, tmp_path):
    out = tmp_path / "out"
    line = _error(capsys, _label(image_folder, out, "--detector", "./models/gdino"), out)
    assert "the path ./models/gdino does not exist" in line and "--detector" in line


def test_missing_input(capsys, tmp_path):
    out = tmp_path / "out"
    line = _error(capsys, _label(tmp_path / "nope", out, "--preset", "tiny-random"), out)
    assert "does not exist" in line


def test_no_network_is_offline(monkeypatch):
    """No answer from the hub: offline mode for this process and the Ray it starts (no retries)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")  # nothing listens there
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)  # restored after the test
    try:
        assert offline_hub()
        assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True
    finally:
        os.environ.pop("HF_HUB_OFFLINE", None)


def test_a_run_that_fails_before_any_shard_completes_leaves_nothing(image_folder, tmp_path, monkeypatch):
    """job.json and listings of a failed new run are removed, so the corrected rerun is not refused; an out
    folder with a completed shard is kept, to resume."""
    out = tmp_path / "out"

    def fail(spec, lease, progress, on_progress=None, *, done: bool = False):
        label_job.prepare_output(spec)
        (out / "job.json").write_text(json.dumps({"spec": spec.model_dump(mode="json")}))
        if done:
            (out / "_done").mkdir()
            (out / "_done" / "00000.json").write_text("{}")
        raise RuntimeError("an actor failed")

    monkeypatch.setattr(label_job, "_label", fail)
    argv = _label(image_folder, out, "--preset", "tiny-random")
    with pytest.raises(RuntimeError, match="an actor failed"):
        main(argv)
    assert not out.exists()

    monkeypatch.setattr(label_job, "_label", lambda *a: fail(*a, done=True))
    with pytest.raises(RuntimeError, match="an actor failed"):
        main(argv)
    assert {p.name for p in out.iterdir()} >= {"job.json", "_done", "_listing", "_manifest.json"}


def test_changed_settings_names_the_nested_setting():
    before = {"input": "imgs", "labeler": {"detector": "a", "box_threshold": 0.3}, "batch_size": 8}
    now = {
        "input": str(Path("imgs").absolute()),
        "labeler": {"detector": "b", "box_threshold": 0.3},
        "batch_size": 8,
    }
    assert changed_settings(before, now) == ["labeler.detector: 'a' -> 'b'"]


def test_train_without_the_train_extra(capsys, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboardX" else find_spec(name, *a)
    )
    out = tmp_path / "run"
    line = _error(
        capsys, ["train", "--data", str(tmp_path / "nope"), "--out", str(out), "--preset", "tiny-random"], out
    )
    assert "needs the train extra (tensorboardX missing): pip install 'hqlabel[train]'" in line


def test_train_base_that_does_not_exist(capsys, tmp_path, monkeypatch):
    from conftest import encode, random_image

    from hqlabel.jobs.import_gt import run_import_gt

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    (tmp_path / "dis" / "im").mkdir(parents=True)
    (tmp_path / "dis" / "gt").mkdir()
    (tmp_path / "dis" / "im" / "a.jpg").write_bytes(encode(random_image(0, (32, 32)), "JPEG"))
    mask = random_image(1, (32, 32))[:, :, 0] > 128
    (tmp_path / "dis" / "gt" / "a.png").write_bytes(encode(np.stack([mask * 255] * 3, -1).astype(np.uint8)))
    run_import_gt(str(tmp_path / "dis"), str(tmp_path / "ds"))
    out = tmp_path / "run"
    line = _error(
        capsys, ["train", "--data", str(tmp_path / "ds"), "--out", str(out), "--base", "nobody/no-sam"], out
    )
    assert "cannot load the segmenter 'nobody/no-sam'" in line and "--base" in line
