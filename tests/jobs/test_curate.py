"""``hqlabel curate``: filters, decisions and provenance on a real (tiny, random-weight) labeling job."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import encode, random_image

from hqlabel.jobs.cli import main
from hqlabel.jobs.curate import add_parser, read_decisions, run_curate
from hqlabel.jobs.label import run_label_job
from hqlabel.jobs.spec import LabelJobSpec
from hqlabel.platform.config import LabelerConfig
from hqlabel.platform.instances import iter_instances
from hqlabel.platform.rle import decode_mask, encode_mask, rle_to_bbox
from hqlabel.review.store import ReviewStore

pytestmark = pytest.mark.timeout(240)

SIZES = {"a.png": (48, 64), "b.png": (64, 48), "sub/c.png": (40, 40), "sub/d.png": (30, 70)}


@pytest.fixture(scope="module")
def labels(ray_session, tmp_path_factory) -> Path:
    """4 images in 2 shards labeled with the tiny random models (classes cat, dog)."""
    root = tmp_path_factory.mktemp("curate")
    images = root / "images"
    for k, (name, size) in enumerate(SIZES.items()):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(encode(random_image(k, size)))
    labeler = LabelerConfig(classes=["cat", "dog"], preset="tiny-random", box_threshold=0.3)
    spec = LabelJobSpec(
        input=str(images), out=str(root / "labels"), labeler=labeler, shard_size=2, batch_size=2
    )
    run_label_job(spec, progress=False)
    return root / "labels"


def _masks(labels: Path) -> list[dict]:
    return pq.read_table(labels / "masks").to_pylist()


def _kept(out: Path) -> dict[tuple[str, int], dict]:
    kept = {}
    for image in iter_instances(str(out)):
        for inst in image.instances:
            kept[(image.image_id, inst.instance_id)] = {"image": image, "inst": inst}
    return kept


def test_no_filters_keeps_everything_with_source_images(labels, tmp_path):
    rows = _masks(labels)
    assert rows, "the random models should fire"
    manifest = run_curate(str(labels), str(tmp_path / "all"))
    kept = _kept(tmp_path / "all")
    assert set(kept) == {(r["image_id"], r["instance_id"]) for r in rows}
    images_root = labels.parent / "images"
    for row in rows:
        entry = kept[(row["image_id"], row["instance_id"])]
        assert entry["image"].image == (images_root / row["image_id"]).read_bytes()
        assert (entry["image"].height, entry["image"].width) == SIZES[row["image_id"]]
        assert (decode_mask(entry["inst"].mask) == decode_mask(row["mask"])).all()
        assert entry["inst"].score == pytest.approx(row["score"])
        assert entry["inst"].pred_iou == pytest.approx(row["pred_iou"])
        assert entry["inst"].origin == f"labels:{labels}"
    assert manifest["kind"] == "curated" and manifest["num_instances"] == len(rows)
    prov = manifest["provenance"]
    assert prov["random_weights"] is True and prov["labeler"]["classes"] == ["cat", "dog"]
    assert prov["labels"] == str(labels) and prov["counts"]["kept"] == len(rows)
    assert prov["filters"] == {"min_pred_iou": None, "min_score": None, "labels": None, "min_area": None}
    assert json.loads((tmp_path / "all" / "dataset.json").read_text())["provenance"] == prov


def test_thresholds_labels_and_decisions(labels, tmp_path, caplog):
    rows = _masks(labels)
    ious = sorted(r["pred_iou"] for r in rows)
    cut = ious[len(ious) // 2]
    below = [r for r in rows if r["pred_iou"] < cut]
    above = [r for r in rows if r["pred_iou"] >= cut]
    assert below and above
    accepted, rejected = below[0], above[0]
    decisions = tmp_path / "decisions.csv"
    decisions.write_text(
        "image_id,instance_id,decision\n"
        f"{accepted['image_id']},{accepted['instance_id']},accept\n"
        f"{rejected['image_id']},{rejected['instance_id']},reject\n"
        "nope.png,0,accept\n"
    )
    with caplog.at_level(logging.WARNING):
        manifest = run_curate(
            str(labels), str(tmp_path / "cur"), min_pred_iou=float(cut), decisions=str(decisions)
        )
    want = {(r["image_id"], r["instance_id"]) for r in above} - {
        (rejected["image_id"], rejected["instance_id"])
    }
    want.add((accepted["image_id"], accepted["instance_id"]))
    assert set(_kept(tmp_path / "cur")) == want
    prov = manifest["provenance"]
    assert prov["decisions"] == {
        "file": str(decisions),
        "kind": "file",
        "accepted": 1,
        "rejected": 1,
        "relabelled": 0,
        "corrected": 0,
        "overridden": 1,
        "unknown": 1,
        "reviewers": [],
    }
    assert prov["counts"]["dropped"]["pred_iou"] == len(below) - 1
    assert prov["counts"]["dropped"]["rejected"] == 1 and prov["counts"]["kept"] == len(want)
    assert "1 decision(s) name masks" in caplog.text

    label = rows[0]["label"]
    manifest = run_curate(str(labels), str(tmp_path / "one"), classes=[label], min_area=1)
    assert set(manifest["labels"]) == {label}
    assert manifest["num_instances"] == sum(r["label"] == label and r["area"] >= 1 for r in rows)


def test_review_folder_decisions_relabel_and_corrected_masks(labels, tmp_path, capsys):
    """``--decisions LABELS/review`` (what ``hqlabel review`` writes): accept, relabel or a fix keep
    a mask whatever the thresholds, reject drops it, the latest decision wins, corrected masks replace the
    labeler's, and the rows and the provenance say so."""
    rows = sorted(_masks(labels), key=lambda r: (r["score"], r["image_id"], r["instance_id"]))
    cut = rows[len(rows) // 2]["score"]
    below, above = [r for r in rows if r["score"] < cut], [r for r in rows if r["score"] >= cut]
    assert len(below) >= 3 and len(above) >= 3
    key = lambda r: (r["image_id"], int(r["instance_id"]))  # noqa: E731
    other = {"cat": "dog", "dog": "cat"}
    height, width = SIZES[above[1]["image_id"]]
    drawn = np.zeros((height, width), bool)
    drawn[2:9, 3:7] = True
    height2, width2 = SIZES[below[2]["image_id"]]
    drawn2 = np.zeros((height2, width2), bool)
    drawn2[1:4, 1:5] = True
    review = tmp_path / "labels-review"
    store = ReviewStore(str(review))

    def event(row, action, reviewer="ann", **extra):
        return {
            "image_id": row["image_id"],
            "instance_id": row["instance_id"],
            "action": action,
            "reviewer": reviewer,
        } | extra

    def fix(row, mask):
        return event(
            row,
            "fix",
            "bo",
            mask=encode_mask(mask),
            area=int(mask.sum()),
            pred_iou=0.5,
            points=[[4.0, 5.0, 1.0]],
        )

    store.append([event(below[0], "accept"), event(above[0], "reject"), event(above[2], "reject")])
    store.append([event(below[1], "relabel", label=other[below[1]["label"]]), fix(above[1], drawn)])
    store.append([event(below[2], "relabel", label=other[below[2]["label"]]), fix(below[2], drawn2)])
    store.append(
        [
            event(above[2], "accept", "bo"),
            {"image_id": "nope.png", "instance_id": 0, "action": "accept", "reviewer": "bo"},
        ]
    )

    out = tmp_path / "cur"
    assert (
        main(["curate", str(labels), "--out", str(out), "--min-score", str(cut), "--decisions", str(review)])
        == 0
    )
    assert "curated" in capsys.readouterr().out
    kept = _kept(out)
    want = ({key(r) for r in above} - {key(above[0])}) | {key(below[0]), key(below[1]), key(below[2])}
    assert set(kept) == want
    inst = {k: v["inst"] for k, v in kept.items()}
    assert (inst[key(below[0])].review, inst[key(below[0])].corrected) == ("accept", False)
    assert inst[key(below[1])].label == other[below[1]["label"]] and inst[key(below[1])].review == "relabel"
    assert inst[key(above[2])].review == "accept"  # reject, then accept: the latest wins
    fixed = inst[key(above[1])]
    assert (fixed.review, fixed.corrected, fixed.label) == ("fix", True, above[1]["label"])
    assert (decode_mask(fixed.mask) == drawn).all() and fixed.area == int(drawn.sum()) == 28
    assert tuple(fixed.box) == pytest.approx(
        rle_to_bbox(encode_mask(drawn))
    ) and fixed.pred_iou == pytest.approx(0.5)
    both = inst[key(below[2])]
    assert (both.review, both.corrected, both.label) == ("relabel", True, other[below[2]["label"]])
    assert (decode_mask(both.mask) == drawn2).all()
    untouched = [
        i
        for k, i in inst.items()
        if k not in {key(below[0]), key(below[1]), key(below[2]), key(above[1]), key(above[2])}
    ]
    assert untouched and all(i.review is None and i.corrected is None for i in untouched)
    prov = json.loads((out / "dataset.json").read_text())["provenance"]
    assert prov["decisions"] == {
        "file": str(review),
        "kind": "review",
        "accepted": 3,  # below[0], above[2], and above[1] (corrected without a decision)
        "rejected": 1,
        "relabelled": 2,
        "corrected": 2,
        "overridden": 3,
        "unknown": 1,
        "reviewers": ["ann", "bo"],
    }
    assert prov["counts"]["dropped"]["rejected"] == 1 and prov["counts"]["dropped"]["score"] == len(below) - 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no review files"):
        run_curate(str(labels), str(tmp_path / "x"), decisions=str(tmp_path / "empty"))


def test_decision_files_and_bad_input(labels, tmp_path, capsys):
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"image_id": "a.png", "instance_id": 0, "decision": "reject"}\n\n')
    assert read_decisions(str(jl)) == {("a.png", 0): "reject"}
    js = tmp_path / "d.json"
    js.write_text('[{"image_id": "a.png", "instance_id": "1", "decision": "Accept"}]')
    assert read_decisions(str(js)) == {("a.png", 1): "accept"}
    bad = tmp_path / "bad.csv"
    bad.write_text("image_id,instance_id,decision\na.png,0,accept\na.png,1,maybe\n")
    with pytest.raises(ValueError, match=r"bad.csv line 3: decision 'maybe'"):
        read_decisions(str(bad))
    with pytest.raises(FileNotFoundError, match=r"no job\.json"):
        run_curate(str(tmp_path), str(tmp_path / "x"))
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["curate", str(labels), "--out", str(tmp_path / "cli"), "--min-score", "0"])
    assert args.func(args) == 0
    assert "curated" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already holds"):
        args.func(args)


def test_keeping_nothing_or_an_unknown_class_warns(labels, tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(labels.parent)
    with caplog.at_level(logging.WARNING):
        manifest = run_curate("labels", "none", classes=["cat", "horse"], min_pred_iou=1.0, min_score=1.0)
    assert manifest["num_instances"] == 0
    assert "--labels horse: not a class of" in caplog.text and "its classes: cat, dog" in caplog.text
    assert "curate kept 0 masks" in caplog.text and "loosen the filters" in caplog.text
    assert manifest["source"] == str(labels)  # recorded absolute: a relative name means nothing elsewhere
