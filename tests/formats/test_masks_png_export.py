"""masks-png export: one PNG per instance, equal to its mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hqlabel.formats import export_labels
from hqlabel.formats.common import stem_path
from tests.formats.labels_folder import write_labels_folder


@pytest.fixture
def labels(tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "labels"
    return out, write_labels_folder(str(out))


def test_masks_png_files_equal_the_masks(labels, tmp_path):
    folder, source = labels
    out = tmp_path / "png"
    summary = export_labels(str(folder), str(out), "masks-png")
    assert (summary.images, summary.instances) == (4, 6)
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    expected = []
    for image_id, item in source.items():
        for k, (label, mask) in enumerate(item["instances"]):
            path = out / stem_path(image_id) / f"{k}_{label}.png"
            expected.append(str(path.relative_to(out)))
            png = np.asarray(Image.open(path))
            assert png.dtype == np.uint8 and set(np.unique(png)) <= {0, 255}
            assert np.array_equal(png == 255, mask)
    assert written == sorted(expected)
