"""``hqlabel eval --choice DETECTOR+SEGMENTER``: several detector + segmenter choices labeled end to end on
one generated ground-truth set (hqlabel.training.synthetic), in one table; the metrics on known answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hqlabel.jobs.cli import main
from hqlabel.jobs.evaluate import RANDOM_WEIGHTS_BANNER, parse_choice
from hqlabel.platform.instances import open_instances
from hqlabel.platform.rle import encode_masks
from hqlabel.training.evaluate import mask_ap, matched_mask_metrics
from hqlabel.training.synthetic import write_fine_structure_dataset

CHOICES = ["grounding-dino+sam-hq", "mm-grounding-dino+sam", "owlv2+sam-hq"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("gt") / "synthetic")
    write_fine_structure_dataset(out, 3, size=64, seed=0, max_objects=2)
    return out


@pytest.fixture(scope="module")
def images(dataset: str) -> list:
    return [i for i in open_instances(dataset) if i.instances]


def test_choices_in_one_table_with_a_random_weights_banner(
    dataset: str, images: list, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "report"
    argv = ["eval", "--data", dataset, "--preset", "tiny-random", "--out", str(out)]
    argv += [a for c in CHOICES for a in ("--choice", c)]
    thresholds = ["--box-threshold", "0", "--text-threshold", "0", "--max-detections", "3"]
    assert main([*argv, *thresholds, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert RANDOM_WEIGHTS_BANNER in printed
    report = json.loads((out / "eval.json").read_text())
    assert report["random_weights"] is True
    assert report["classes"] == sorted({i.label for im in images for i in im.instances})
    assert [r["choice"] for r in report["rows"]] == CHOICES
    gt = sum(len(im.instances) for im in images)
    for row, choice in zip(report["rows"], CHOICES, strict=True):
        assert (row["detector"], row["segmenter"]) == tuple(choice.split("+"))
        assert row["gt_instances"] == gt
        assert 0 < row["predictions"] <= 3 * len(images), f"{choice}: none predicted at box threshold 0"
        for key in ("ap", "ap50", "ap75", "miou", "mbiou"):
            assert 0.0 <= row[key] <= 1.0, (choice, key, row[key])
        assert f"| {choice} |" in printed
    markdown = (out / "eval.md").read_text()
    assert "these numbers mean nothing" in markdown and report["table"] in markdown


def test_the_python_api_takes_the_same_choices(dataset: str) -> None:
    import hqlabel

    report = hqlabel.evaluate(
        dataset,
        choices=["owlv2+sam"],
        preset="tiny-random",
        box_threshold=0.0,
        text_threshold=0.0,
        max_detections=1,
        device="cpu",
    )
    assert [r["choice"] for r in report["rows"]] == ["owlv2+sam"] and report["random_weights"]
    assert 0 < report["rows"][0]["predictions"] <= 3


def _as_predictions(images: list, score: float = 1.0) -> list[list[dict]]:
    return [[{"label": i.label, "score": score, "mask": i.mask} for i in im.instances] for im in images]


def test_ground_truth_as_predictions_scores_one(images: list) -> None:
    classes = sorted({i.label for im in images for i in im.instances})
    predictions = _as_predictions(images)
    assert mask_ap(images, predictions, classes) == {"ap": 1.0, "ap50": 1.0, "ap75": 1.0}
    summary = matched_mask_metrics(images, predictions).summary()
    assert summary["miou"] == pytest.approx(1.0) and summary["mbiou"] == pytest.approx(1.0)


def test_wrong_labels_or_no_predictions_score_zero(images: list) -> None:
    classes = sorted({i.label for im in images for i in im.instances})
    assert mask_ap(images, [[] for _ in images], classes)["ap"] == 0.0
    summary = matched_mask_metrics(images, [[] for _ in images]).summary()
    assert summary["miou"] == 0.0 and summary["count"] == sum(len(im.instances) for im in images)
    # the right masks under another class: not matched, and AP 0
    shifted = [
        [{**p, "label": classes[(classes.index(p["label"]) + 1) % len(classes)]} for p in preds]
        for preds in _as_predictions(images)
    ]
    if len(classes) > 1:
        assert mask_ap(images, shifted, classes)["ap"] == 0.0


def test_half_the_instances_missed_halves_the_miou(images: list) -> None:
    """Each GT instance's score is its best same-class prediction; one empty-mask prediction per image."""
    predictions = []
    for im in images:
        kept = im.instances[: max(1, len(im.instances) // 2)]
        predictions.append([{"label": i.label, "score": 1.0, "mask": i.mask} for i in kept])
    expected = sum(max(1, len(im.instances) // 2) for im in images) / sum(len(im.instances) for im in images)
    assert matched_mask_metrics(images, predictions).summary()["miou"] == pytest.approx(expected)
    empty = encode_masks(np.zeros((1, images[0].height, images[0].width), dtype=bool))[0]
    worse = [[{"label": images[0].instances[0].label, "score": 1.0, "mask": empty}], *predictions[1:]]
    assert matched_mask_metrics(images, worse).summary()["miou"] < expected


def test_parse_choice() -> None:
    assert parse_choice("owlv2+sam") == ("owlv2", "sam")
    assert parse_choice("IDEA-Research/grounding-dino-tiny+syscv-community/sam-hq-vit-base") == (
        "IDEA-Research/grounding-dino-tiny",
        "syscv-community/sam-hq-vit-base",
    )
    for bad in ("owlv2", "a+b+c", "+sam"):
        with pytest.raises(ValueError, match="DETECTOR\\+SEGMENTER"):
            parse_choice(bad)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--choice", "owlv2"], "must be DETECTOR+SEGMENTER"),
        (["--choice", "owlv2+sam-hq-lite"], "--segmenter names an architecture family"),
        (["--choice", "yolo+sam"], "--detector names an architecture family"),
        (["--choice", "owlv2+sam", "--weights", "x"], "belong to the GT-box protocol"),
    ],
)
def test_bad_choices_are_one_line_errors(
    dataset: str, capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    assert main(["eval", "--data", dataset, "--preset", "tiny-random", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
