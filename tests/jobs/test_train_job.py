"""``hqlabel train`` as a Ray Train job (2 CPU workers over gloo) and ``hqlabel eval`` side by side."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hqlabel.jobs.cli import main
from hqlabel.jobs.evaluate import run_eval
from hqlabel.jobs.train import run_train_job
from hqlabel.platform.instances import iter_instances
from hqlabel.segmenters import build_segmenter
from hqlabel.training.config import TrainConfig
from hqlabel.training.data import data_revision
from hqlabel.training.evaluate import evaluate_segmenter
from hqlabel.training.recipe import FAULT_ENV
from hqlabel.training.synthetic import write_fine_structure_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("synthetic") / "data")
    write_fine_structure_dataset(out, 8, size=96, seed=5)
    return out


def test_ray_train_job_with_two_cpu_workers(ray_session, dataset, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", dataset, "--out", str(out), "--preset", "tiny-random", "--epochs", "2"]
    assert main([*args, "--batch-size", "2", "--val-fraction", "0.25", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "trained 2 epoch(s) on 2 worker(s)" in printed and f"--hq-weights {out}/best" in printed
    config = TrainConfig.model_validate_json((out / "config.json").read_text())
    assert (config.batch_size, config.val_fraction, config.epochs) == (2, 0.25, 2)
    assert config.data_revision == data_revision(config)  # pinned by the driver, resumed below with it
    history = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]
    # Each of the 2 workers takes half the images per epoch; the logged mask count sums both.
    assert all(h["train_masks"] > 0 and h["train_loss"] > 0 for h in history[1:])
    weights = load_file(out / "checkpoints" / "epoch-0002" / "hq_weights.safetensors")
    base = build_segmenter("unused", preset="tiny-random").model.state_dict()
    assert any(not torch.equal(weights[k], base[k]) for k in weights)  # it trained
    # Resuming through Ray Train continues from the checkpoint.
    more = run_train_job(config.model_copy(update={"epochs": 3}), workers=2, resume=True)
    assert [h["epoch"] for h in more["history"]] == [0, 1, 2, 3]
    assert more["history"][:3] == history
    with pytest.raises(ValueError, match="--resume"):
        run_train_job(config, workers=2)


def test_a_killed_worker_restarts_from_the_last_checkpoint(ray_session, dataset, tmp_path, monkeypatch):
    """Rank 1 kills its own process (SIGKILL) before the first step of epoch 2; Ray Train restarts both
    workers (``--max-failures 1``), which resume from epoch 1's checkpoint, and the run finishes."""
    out, marker = tmp_path / "run", tmp_path / "killed.json"
    monkeypatch.setenv(FAULT_ENV, f"1:2:0:{marker}")
    config = TrainConfig(
        data=dataset, out=str(out), preset="tiny-random", epochs=2, batch_size=2, val_fraction=0.25,
        num_points=256,
    )  # fmt: skip
    result = run_train_job(config, workers=2, max_failures=1)
    assert json.loads(marker.read_text()) == {"rank": 1, "epoch": 2, "step": 0}  # the kill happened, once
    killed = marker.stat().st_mtime_ns
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2]
    files = ("hq_weights.safetensors", "trainer.pt", "state.json")
    first, last = out / "checkpoints" / "epoch-0001", out / "checkpoints" / "epoch-0002"
    # Resumed, not restarted from scratch: epoch 1's checkpoint was written once, before the kill.
    assert all((first / f).stat().st_mtime_ns < killed for f in files)
    assert all((last / f).stat().st_mtime_ns > killed for f in files)
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["epoch"] == 2
    state = json.loads((last / "state.json").read_text())
    assert state["epoch"] == 2 and state["history"] == result["history"]
    assert state["config"]["world"]["workers"] == 2
    assert set(load_file(last / "hq_weights.safetensors")) == set(load_file(first / "hq_weights.safetensors"))
    assert torch.load(last / "trainer.pt")["scheduler"]["last_epoch"] == 2  # complete: the second step


def test_eval_compares_sam_base_and_retrained(dataset, tmp_path, capsys):
    from hqlabel.training.recipe import run_training

    run = tmp_path / "run"
    run_training(
        TrainConfig(data=dataset, out=str(run), preset="tiny-random", epochs=1, batch_size=2, num_points=256)
    )
    report_dir = tmp_path / "report"
    code = main(
        [
            "eval",
            "--data",
            dataset,
            "--preset",
            "tiny-random",
            "--weights",
            str(run),
            "--out",
            str(report_dir),
        ]
    )
    assert code == 0
    report = json.loads((report_dir / "eval.json").read_text())
    names = [row["model"] for row in report["rows"]]
    assert names[0].startswith("SAM") and names[1] == "HQ-SAM tiny-random" and str(run) in names[2]
    count = sum(len(i.instances) for i in iter_instances(dataset))
    assert all(row["count"] == count for row in report["rows"])
    # The retrained row is what evaluating the relabeling segmenter gives.
    tuned = build_segmenter("unused", preset="tiny-random", hq_weights=str(run), multimask="off")
    assert report["rows"][2]["mbiou"] == pytest.approx(
        evaluate_segmenter(tuned, iter_instances(dataset)).summary()["mbiou"]
    )
    markdown = (report_dir / "eval.md").read_text()
    assert "Random weights" in markdown and "| mIoU | mBIoU |" in markdown
    assert "HQ-SAM tiny-random" in capsys.readouterr().out


def test_eval_and_train_refuse_bad_input(dataset, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="instance dataset"):
        run_eval(str(tmp_path / "missing"), preset="tiny-random")
    code = main(["train", "--data", dataset, "--out", str(tmp_path / "r"), "--preset", "tiny-random",
                 "--val-fraction", "1.5"])  # fmt: skip
    assert code == 2
    assert "val_fraction" in capsys.readouterr().err
