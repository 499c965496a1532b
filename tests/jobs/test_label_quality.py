"""A labeling job with synonyms (a YAML ontology) and --mask-nms writes the quality signals; an output written
before those columns existed stays readable by every command (tiny random models, local Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import encode, random_image

from hqlabel.api.results import read_labels
from hqlabel.jobs.functions import curate, export, label, label_spec
from hqlabel.jobs.label import run_label_job
from hqlabel.jobs.status import job_status
from hqlabel.platform.rle import decode_mask
from hqlabel.platform.schema import SIGNAL_NAMES
from hqlabel.review.gallery import write_gallery
from hqlabel.training.data import index_instances

pytestmark = pytest.mark.timeout(300)

ONTOLOGY = "person:\n  - man\n  - woman\ncar: [car, truck]\n"
OPTIONS = dict(preset="tiny-random", box_threshold=0.2, shard_size=2, batch_size=2, mask_nms=0.8)


@pytest.fixture(scope="module")
def job(ray_session, tmp_path_factory) -> tuple[Path, Path, Path]:
    """``(images, classes.yaml, out)``: 4 images labeled with the ontology and mask NMS."""
    root = tmp_path_factory.mktemp("quality")
    images = root / "images"
    images.mkdir()
    for k, size in enumerate([(48, 64), (64, 48), (40, 40), (30, 70)]):
        (images / f"{k}.png").write_bytes(encode(random_image(k, size)))
    classes = root / "classes.yaml"
    classes.write_text(ONTOLOGY)
    out = root / "labels"
    label(str(images), out=str(out), classes=str(classes), **OPTIONS)
    return images, classes, out


def test_rows_carry_signals_class_names_and_no_duplicate_masks(job) -> None:
    _, _, out = job
    rows = pq.read_table(out / "masks").to_pylist()
    assert rows
    assert {r["label"] for r in rows} <= {"person", "car"}
    for r in rows:
        assert all(r[name] is not None and 0.0 <= r[name] <= 1.0 for name in SIGNAL_NAMES)
    by_image: dict[str, list[np.ndarray]] = {}
    for r in rows:
        by_image.setdefault(r["image_id"], []).append(decode_mask(r["mask"]))
    for masks in by_image.values():
        for i in range(len(masks)):
            for j in range(i):
                union = (masks[i] | masks[j]).sum()
                assert union == 0 or (masks[i] & masks[j]).sum() / union <= 0.8
    spec = json.loads((out / "job.json").read_text())["spec"]["labeler"]
    assert spec["classes"] == ["person", "car"] and spec["mask_nms"] == 0.8
    assert spec["synonyms"] == {"person": ["man", "woman"], "car": ["car", "truck"]}


def test_a_changed_mapping_or_mask_nms_is_a_changed_setting(job) -> None:
    images, classes, out = job
    again = run_label_job(label_spec(str(images), out=str(out), classes=str(classes), **OPTIONS))
    assert again.images_this_run == 0  # the same ontology: resumed, all done
    for changed, setting in [
        (dict(classes="person: man; car: car, truck"), "labeler.synonyms"),
        (dict(classes=str(classes), mask_nms=0.5), "labeler.mask_nms"),
    ]:
        options = {**OPTIONS, "classes": str(classes), **changed}
        with pytest.raises(ValueError, match=rf"different settings \({setting}"):
            run_label_job(label_spec(str(images), out=str(out), **options))


def to_old_format(dest: Path) -> Path:
    """Rewrite the output ``dest`` as the version before the quality signals wrote it: no signal columns, no
    job.json fields synonyms / mask_nms."""
    for part in (dest / "masks").glob("*.parquet"):
        table = pq.read_table(part)
        pq.write_table(table.drop_columns(list(SIGNAL_NAMES)), part)
    job = json.loads((dest / "job.json").read_text())
    job["spec"]["labeler"]["classes"] = ["person", "car"]
    for field in ("synonyms", "mask_nms"):
        del job["spec"]["labeler"][field]
    (dest / "job.json").write_text(json.dumps(job))
    return dest


def test_an_old_format_output_reads_through_every_command(job, tmp_path) -> None:
    """The module's last test: it rewrites the job's output in place (a copy elsewhere would not resume: the
    manifest names the output's own listing)."""
    images, _, out = job
    rows = pq.read_table(out / "masks").to_pylist()
    old = to_old_format(out)
    assert "stability" not in pq.read_schema(next((old / "masks").glob("*.parquet"))).names

    results = dict(read_labels(str(old)))
    assert sum(len(r) for r in results.values()) == len(rows)
    for result in results.values():
        assert np.isnan(result.stability).all() and np.isnan(result.box_iou).all()
        assert all(row["stability"] is None for row in result.rows())

    status = job_status(str(old))
    assert status.shards_done == status.shards_total and status.instances == len(rows)
    curated = curate(str(old), out=str(tmp_path / "curated"))
    assert curated["num_instances"] == len(rows)
    index, _ = index_instances(str(tmp_path / "curated"))  # the training data reader
    assert sum(len(index[k].instances) for k in range(len(index))) == len(rows)
    summary = export(str(old), out=str(tmp_path / "coco.json"), format="coco")
    assert summary.instances == len(rows)
    assert write_gallery(str(old), str(tmp_path / "gallery")).overlays > 0

    # resuming into it with the same settings (the plain class list it recorded): nothing to redo
    again = label(str(images), out=str(old), classes="person, car", **{**OPTIONS, "mask_nms": None})
    assert again.images_this_run == 0
