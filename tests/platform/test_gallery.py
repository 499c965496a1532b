"""``hqlabel show``: overlays, contact sheets and the HTML gallery of a real (tiny, random-weight) job."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import encode, random_image
from PIL import Image

from hqlabel.jobs.cli import main
from hqlabel.jobs.label import run_label_job
from hqlabel.jobs.spec import LabelJobSpec
from hqlabel.platform.config import LabelerConfig
from hqlabel.platform.gallery import safe_name, write_gallery

pytestmark = pytest.mark.timeout(240)

SIZES = {"a.png": (48, 64), "b.png": (64, 48), "sub/c.png": (40, 40), "sub/d.png": (30, 70)}


def make_labels(root: Path) -> Path:
    """Label 4 generated images in 2 shards with the tiny random models; returns the labels folder."""
    images = root / "images"
    for k, (name, size) in enumerate(SIZES.items()):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(encode(random_image(k, size)))
    (images / "broken.png").write_bytes(encode(random_image(9))[:100])  # a decode error row
    labeler = LabelerConfig(classes=["cat"], preset="tiny-random", box_threshold=0.3)
    spec = LabelJobSpec(
        input=str(images), out=str(root / "labels"), labeler=labeler, shard_size=3, batch_size=2
    )
    run_label_job(spec, progress=False)
    return root / "labels"


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
    assert "tiny-random" in page and "<td>cat</td>" in page  # models and classes


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
