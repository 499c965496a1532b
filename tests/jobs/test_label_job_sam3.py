"""The labeling job with ``--detector sam3`` on the session's 2-CPU Ray (tiny random models): SAM 3's boxes
prompt HQ-SAM (``mask``) and SAM 3's own masks land in ``sam3_mask``, both at the original resolution."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from hqlabel.jobs.label import run_label_job
from hqlabel.jobs.spec import LabelJobSpec
from hqlabel.platform.config import LabelerConfig
from hqlabel.platform.rle import decode_mask
from hqlabel.platform.schema import MASKS_SCHEMA

pytestmark = pytest.mark.timeout(240)


def test_sam3_job_writes_both_masks(ray_session, image_folder: Path, tmp_path: Path) -> None:
    sizes = {
        p.relative_to(image_folder).as_posix(): Image.open(p).size[::-1]
        for p in image_folder.rglob("*")
        if p.is_file()
    }
    labeler = LabelerConfig(
        classes=["cat", "dog"],
        preset="tiny-random",
        detector="sam3",
        box_threshold=0.0,
        text_threshold=0.0,
        max_detections=2,
    )
    out = tmp_path / "labels"
    spec = LabelJobSpec(input=str(image_folder), out=str(out), labeler=labeler, batch_size=2)
    summary = run_label_job(spec, progress=False)
    masks = pq.read_table(out / "masks")
    assert masks.schema.remove_metadata() == MASKS_SCHEMA
    assert set(masks["image_id"].to_pylist()) == set(sizes) and summary.errors == 0
    assert masks.num_rows == 2 * len(sizes)
    for row in masks.to_pylist():
        hq, sam3 = decode_mask(row["mask"]), decode_mask(row["sam3_mask"])
        assert hq.shape == sam3.shape == sizes[row["image_id"]]
