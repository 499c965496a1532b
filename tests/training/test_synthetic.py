"""The synthetic fine-structure dataset: deterministic, exact and really thin."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from hqlabel.jobs.synthetic import add_synthetic_parser
from hqlabel.platform.instances import iter_instances
from hqlabel.training.synthetic import make_fine_structure_dataset

pytestmark = pytest.mark.timeout(60)


def _boundary_fraction(mask: np.ndarray) -> float:
    """Share of foreground pixels with a 4-neighbour in the background."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return float((mask & ~inner).sum() / mask.sum())


def test_deterministic_and_exact():
    first = make_fine_structure_dataset(9, size=96, seed=3)
    again = make_fine_structure_dataset(9, size=96, seed=3)
    other = make_fine_structure_dataset(9, size=96, seed=4)
    assert [a.image for a in first] == [b.image for b in again]
    assert [a.image for a in first] != [b.image for b in other]
    labels = {i.label for image in first for i in image.instances}
    assert labels == {"lines", "ring", "lattice"}
    for image in first:
        pixels = np.asarray(Image.open(io.BytesIO(image.image)))
        assert pixels.shape == (96, 96, 3)
        masks = image.masks()
        assert len(masks) >= 1 and all(m.any() for m in masks)
        assert not (masks.sum(axis=0) > 1).any(), "objects occlude, masks do not overlap"
        fg = masks.any(axis=0)
        # objects differ from the background in colour
        assert np.abs(pixels[fg].mean(0) - pixels[~fg].mean(0)).max() > 5 or fg.mean() > 0.3


def test_structures_are_thin():
    for image in make_fine_structure_dataset(12, size=128, seed=0):
        for inst, mask in zip(image.instances, image.masks(), strict=True):
            x0, y0, x1, y1 = inst.box
            fill = inst.area / max(1.0, (x1 - x0) * (y1 - y0))
            if inst.label in ("lines", "lattice"):
                assert fill < 0.5, (image.image_id, inst.label, fill)
                assert _boundary_fraction(mask) > 0.6
            else:
                assert _boundary_fraction(mask) > 0.1  # rings and holed shapes: much edge too


def test_synth_data_command_writes_an_instance_dataset(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_synthetic_parser(parser.add_subparsers())
    args = parser.parse_args(["synth-data", str(tmp_path / "syn"), "--count", "4", "--size", "64"])
    assert args.func(args) == 0
    assert "wrote 4 synthetic images" in capsys.readouterr().out
    images = list(iter_instances(str(tmp_path / "syn")))
    assert [i.image_id for i in images] == [f"synthetic-{k:05d}.png" for k in range(4)]
    assert images[0].image == make_fine_structure_dataset(1, size=64)[0].image
