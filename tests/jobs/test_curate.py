"""``hqlabel curate``: filters, decisions and provenance on a real (tiny, random-weight) labeling job."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import encode, random_image

from hqlabel.jobs.curate import add_parser, read_decisions, run_curate
from hqlabel.jobs.label import run_label_job
from hqlabel.jobs.spec import LabelJobSpec
from hqlabel.platform.config import LabelerConfig
from hqlabel.platform.instances import iter_instances
from hqlabel.platform.rle import decode_mask

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
        "accepted": 1,
        "rejected": 1,
        "overridden": 1,
        "unknown": 1,
    }
    assert prov["counts"]["dropped"]["pred_iou"] == len(below) - 1
    assert prov["counts"]["dropped"]["rejected"] == 1 and prov["counts"]["kept"] == len(want)
    assert "1 decision(s) name masks" in caplog.text

    label = rows[0]["label"]
    manifest = run_curate(str(labels), str(tmp_path / "one"), classes=[label], min_area=1)
    assert set(manifest["labels"]) == {label}
    assert manifest["num_instances"] == sum(r["label"] == label and r["area"] >= 1 for r in rows)


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
