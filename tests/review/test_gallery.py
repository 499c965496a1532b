"""``hqlabel show``: overlays, contact sheets and the HTML gallery of a real (tiny, random-weight) job."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import encode, random_image
from PIL import Image
from reviewing import SIZES, make_labels

from hqlabel.jobs.cli import main
from hqlabel.platform import storage
from hqlabel.platform.rle import encode_mask
from hqlabel.platform.schema import IMAGES_SCHEMA, MASKS_SCHEMA
from hqlabel.review.gallery import safe_name, write_gallery
from tests.platform.test_rle import huge_rle

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def labels(ray_session, tmp_path_factory) -> Path:
    return make_labels(tmp_path_factory.mktemp("gallery"))


def test_show_writes_overlays_sheets_and_index(labels, tmp_path, capsys):
    out = tmp_path / "show"
    assert main(["show", str(labels), "--out", str(out)]) == 0
    assert "wrote 4 overlays, 2 contact sheets" in capsys.readouterr().out
    names = {"a.png": "a.png", "b.png": "b.png", "sub/c.png": "sub__c.png", "sub/d.png": "sub__d.png"}
    for image_id, size in SIZES.items():
        overlay = Image.open(out / "overlays" / f"{names[image_id]}.png")
        assert overlay.size == size[::-1] and overlay.mode == "RGB"
    assert sorted(p.name for p in (out / "sheets").iterdir()) == ["sheet-00000.png", "sheet-00001.png"]
    page = (out / "index.html").read_text()
    for name in names.values():
        assert f'src="overlays/{name}.png"' in page
    assert 'class="warning" id="random-weights"' in page
    assert "broken.png</td><td>decode</td>" in page  # the failed image, with its stage
    assert "<td>tiny-random</td>" in page and "<td>cat</td>" in page  # models and classes
    assert "&quot;" not in page and "<th>random_weights</th><td>yes</td>" in page  # plain values, no JSON
    assert "<th>summary</th><td>images " in page and ", instances " in page


def test_limit_caps_the_overlays(labels, tmp_path):
    summary = write_gallery(str(labels), str(tmp_path / "show"), limit=2)
    assert summary.overlays == 2 and len(list((tmp_path / "show" / "overlays").iterdir())) == 2
    assert len(summary.sheets) == 1  # the first shard holds both
    assert (tmp_path / "show" / "index.html").read_text().count("<img ") == 2


def test_text_is_html_escaped(labels, tmp_path):
    evil = tmp_path / "labels"
    shutil.copytree(labels, evil)
    for part in (evil / "masks").glob("*.parquet"):
        table = pq.read_table(part)
        evil_label = pa.array(["<b>cat</b>"] * len(table), pa.string())
        pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", evil_label), part)
    summary = write_gallery(str(evil), str(tmp_path / "show"))
    page = (tmp_path / "show" / "index.html").read_text()
    assert summary.overlays == 4
    assert "<b>cat</b>" not in page and "&lt;b&gt;cat&lt;/b&gt;" in page
    assert pc.sum(pq.read_table(evil / "masks")["area"]).as_py() > 0  # masks there to be drawn


def test_moved_input_needs_images_and_missing_files_are_listed(labels, tmp_path, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(Path(labels).parent / "images", moved)
    (moved / "b.png").unlink()
    out = tmp_path / "show"
    summary = write_gallery(str(labels), str(out), images=str(moved))
    assert summary.overlays == 3
    assert "b.png</td><td>show</td><td>not found in the job&#x27;s input" in (out / "index.html").read_text()
    assert main(["show", str(labels), "--out", str(out), "--limit", "0"]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err


def test_safe_names_are_flat_and_unique():
    taken: set[str] = set()
    assert safe_name("sub/a b.jpg", taken) == "sub__a_b.jpg"
    assert safe_name("sub/a?b.jpg", taken) == "sub__a_b.jpg-1"
    assert safe_name("../x", taken) == "__x"


def hand_made_labels(root: Path, rles: list[dict], size: tuple[int, int]) -> Path:
    """A labels folder (no job run) of one image, ``big.png`` in ``root/images``, with these mask RLEs."""
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    (images / "big.png").write_bytes(encode(random_image(0, size)))
    rows = [
        {"image_id": "big.png", "instance_id": k, "label": "blob", "score": 0.9, "box": [10, 10, 90, 90],
         "mask": rle, "area": 0, "pred_iou": 0.8}
        for k, rle in enumerate(rles)
    ]  # fmt: skip
    storage.write_parquet(
        pa.Table.from_pylist(rows, schema=MASKS_SCHEMA), str(labels / "masks" / "part-00000.parquet")
    )
    image_row = {"image_id": "big.png", "height": size[0], "width": size[1], "num_instances": len(rles)}
    storage.write_parquet(
        pa.Table.from_pylist([image_row], schema=IMAGES_SCHEMA), str(labels / "images" / "part-00000.parquet")
    )
    job = {"job": "label", "spec": {"input": str(images), "labeler": {"classes": ["blob"]}}, "summary": {}}
    (labels / "job.json").write_text(json.dumps(job))
    return labels


def test_masks_are_decoded_one_at_a_time(tmp_path):
    """40 masks of one image cost no more memory than 2: each is decoded when drawn, then let go
    (tracemalloc sees numpy's allocations; decoding all at once would hold 38 x 240 kB more)."""
    height, width = 400, 600
    mask = np.zeros((height, width), bool)
    mask[50:350, 100:500] = True
    peaks = {}
    warm_up = hand_made_labels(tmp_path / "warm-up", [encode_mask(mask)], (height, width))
    write_gallery(str(warm_up), str(tmp_path / "show-warm-up"))  # first-call caches (fonts, imports)
    for count in (2, 40):
        labels = hand_made_labels(tmp_path / str(count), [encode_mask(mask)] * count, (height, width))
        tracemalloc.start()
        try:
            summary = write_gallery(str(labels), str(tmp_path / f"show-{count}"))
            peaks[count] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert (summary.overlays, summary.errors) == (1, 0)
    assert peaks[40] - peaks[2] < 2 * height * width  # under two masks' worth of bool pixels


def test_a_mask_declaring_a_huge_size_is_listed_not_decoded(tmp_path):
    """A few bytes of RLE declaring 50000 x 50000 pixels (5 GB to decode): the image is listed as failed."""
    labels = hand_made_labels(tmp_path, [huge_rle(50_000, 50_000)], (40, 60))
    summary = write_gallery(str(labels), str(tmp_path / "show"))
    assert (summary.overlays, summary.errors) == (0, 1)
    page = (tmp_path / "show" / "index.html").read_text()
    assert "big.png</td><td>show</td>" in page
    assert "declares 2500000000 pixels, over the cap of 100000000 pixels" in page
