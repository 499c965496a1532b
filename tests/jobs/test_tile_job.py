"""``hqlabel label --tile``: the labeling job with tiled detection end to end (tiny random models, the
session's 2-CPU Ray) on a 3000 x 2000 generated image and a small one, and the in-memory API with tiling."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import encode, random_image
from PIL import Image

import hqlabel
from hqlabel.jobs.cli import main
from hqlabel.jobs.functions import label_spec
from hqlabel.platform.rle import decode_mask

pytestmark = pytest.mark.timeout(300)

CLASSES = "cat, dog"


def large_image(height: int = 2000, width: int = 3000) -> np.ndarray:
    """Small bright objects on a dark gradient, some on the tile borders of a 1024 tiling."""
    rng = np.random.default_rng(7)
    ramp = np.linspace(0, 60, width, dtype=np.float32)[None, :] + np.linspace(0, 40, height)[:, None]
    image = np.repeat(ramp.astype(np.uint8)[:, :, None], 3, axis=2)
    for x0, y0 in [(100, 100), (800, 790), (1620, 400), (2350, 1150), (2960, 1960), (1500, 1500)]:
        image[y0 : y0 + 40, x0 : x0 + 40] = rng.integers(150, 256, size=3, dtype=np.uint8)
    return image


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiled") / "images"
    root.mkdir()
    (root / "large.png").write_bytes(encode(large_image()))
    (root / "small.png").write_bytes(encode(random_image(3, (48, 64))))
    return root


def _cli(folder, out, *options: str) -> int:
    return main(
        [
            *["label", str(folder), "--classes", CLASSES, "--out", str(out), "--preset", "tiny-random"],
            *["--box-threshold", "0.3", "--batch-size", "2", "--no-progress", *options],
        ]
    )


def test_tiled_job_masks_at_the_original_resolution_and_resumes_only_with_the_same_tiling(
    ray_session, folder, tmp_path, capsys
):
    out = tmp_path / "labels"
    # the job function the command line calls (few detections: each mask of the large image is 6 MP)
    options = dict(preset="tiny-random", box_threshold=0.3, batch_size=2, max_detections=3)
    summary = hqlabel.label(
        str(folder), out=str(out), classes=CLASSES, tile=1024, tile_overlap=0.25, **options
    )
    job = json.loads((out / "job.json").read_text())
    labeler = job["spec"]["labeler"]
    assert (labeler["tile"], labeler["tile_overlap"], labeler["tile_full_image"]) == (1024, 0.25, True)

    masks = pq.read_table(out / "masks")
    images = pq.read_table(out / "images")
    assert sorted(images["image_id"].to_pylist()) == ["large.png", "small.png"]  # each image once
    assert pq.read_table(out / "errors").num_rows == 0
    sizes = {"large.png": (2000, 3000), "small.png": (48, 64)}
    assert set(masks["image_id"].to_pylist()) == set(sizes)  # random weights fire on both
    for row in masks.to_pylist():
        assert decode_mask(row["mask"]).shape == sizes[row["image_id"]]  # the original resolution
        x0, y0, x1, y1 = row["box"]
        height, width = sizes[row["image_id"]]
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
    pairs = list(zip(masks["image_id"].to_pylist(), masks["instance_id"].to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs)), "no instance written twice"
    for image_id in sizes:
        ids = sorted(k for i, k in pairs if i == image_id)
        assert ids == list(range(len(ids)))
    assert summary.instances == job["summary"]["instances"] == masks.num_rows

    # the same tiling resumes (nothing to do); another one is a changed setting
    again = hqlabel.label(str(folder), out=str(out), classes=CLASSES, tile=1024, tile_overlap=0.25, **options)
    assert again.images_this_run == 0 and again.instances == summary.instances
    assert pq.read_table(out / "masks").equals(masks)
    for tiling, change in [
        ({"tile": 1024}, "labeler.tile_overlap: 0.25 -> 0.2"),
        ({}, "labeler.tile: 1024 -> None"),
    ]:
        with pytest.raises(ValueError, match=f"different settings.*{change}.*--overwrite"):
            hqlabel.label(str(folder), out=str(out), classes=CLASSES, **tiling, **options)
    # the command line passes --tile on: a refused change, in one line after the random-weights warning
    capsys.readouterr()
    assert _cli(folder, out, "--tile", "768", "--tile-overlap", "0.25") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hqlabel: error:") and "labeler.tile: 1024 -> 768" in err[-1]
    assert pq.read_table(out / "masks").equals(masks)


def test_tiling_options_are_refused_in_one_line(tmp_path, capsys):
    for options, message in [
        (["--tile", "64"], "--tile 64 is too small"),
        (["--tile", "512", "--tile-overlap", "0.95"], "--tile-overlap 0.95 is out of range"),
        (["--tile-overlap", "0.3"], "give --tile SIZE too"),
    ]:
        assert _cli(tmp_path, tmp_path / "out", *options) == 2
        err = capsys.readouterr().err
        assert err.startswith("hqlabel: error:") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_python_api_tiles_as_the_job_steps():
    """``hqlabel.label(..., tile=...)`` builds the CLI's spec; the in-memory ``Labeler`` with ``tile`` gives
    a large image the rows the job's own steps (``decode_batch`` -> ``LabelWorker``) give it."""
    from hqlabel.platform.schema import SOURCE_SCHEMA, results_to_tables
    from hqlabel.workers import LabelWorker, decode_batch

    spec = label_spec("in", out="out", classes=CLASSES, preset="tiny-random", tile=512, tile_overlap=0.3)
    assert (spec.labeler.tile, spec.labeler.tile_overlap, spec.labeler.tile_full_image) == (512, 0.3, True)

    data = encode(large_image(1000, 1500))
    source = pa.Table.from_pylist(
        [{"shard": "s", "row": 0, "image_id": "large.png", "image": data}], schema=SOURCE_SCHEMA
    )
    decoded = decode_batch(source, max_side=1333, tile=512)
    assert decoded["width"].to_pylist() == [1500]  # tiled: kept at full resolution, not downscaled to 1333
    options = dict(box_threshold=0.3, tile=512, max_detections=4)
    config = spec.labeler.model_copy(update={**options, "tile_overlap": 0.2})
    masks, _, _ = results_to_tables(LabelWorker(config)(decoded))
    labeler = hqlabel.Labeler.from_pretrained(classes=CLASSES, preset="tiny-random", **options)
    assert labeler.core.tiling is not None and labeler.core.tiling.size == 512
    result = labeler(Image.open(io.BytesIO(data)))
    result.image_id = "large.png"
    assert result.rows() == masks.to_pylist() and len(result)
    assert result.masks.shape[1:] == (1000, 1500)
