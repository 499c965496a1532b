"""Instance datasets: write / read round trip, local and on S3, and the refusal to overwrite."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import encode, random_image

from hqlabel.platform.instances import (
    ImageInstances,
    Instance,
    is_instance_dataset,
    iter_instances,
    open_instances,
    read_manifest,
    write_instances,
)
from hqlabel.platform.rle import encode_mask
from hqlabel.platform.storage import StorageOptions

pytestmark = pytest.mark.timeout(60)


def _images(n: int = 3) -> list[ImageInstances]:
    out = []
    for k in range(n):
        mask = np.zeros((48, 64), dtype=bool)
        mask[5 + k : 20, 10 : 30 + k] = True
        inst = [Instance(0, "cat", encode_mask(mask)), Instance(1, "dog", encode_mask(~mask), score=0.5)]
        out.append(ImageInstances(f"img_{k}.png", encode(random_image(k)), 48, 64, inst))
    return out


def _check_equal(got: list[ImageInstances], want: list[ImageInstances]) -> None:
    assert [g.image_id for g in got] == [w.image_id for w in want]
    for g, w in zip(got, want, strict=True):
        assert g.image == w.image and (g.height, g.width) == (w.height, w.width)
        np.testing.assert_array_equal(g.masks(), w.masks())
        assert [(i.label, i.area, i.box, i.origin) for i in g.instances] == [
            (i.label, i.area, pytest.approx(i.box), i.origin) for i in w.instances
        ]
        assert g.instances[1].score == pytest.approx(0.5) and g.instances[0].score is None


def test_round_trip_in_parts_and_refuses_to_overwrite(tmp_path):
    images = _images(5)
    out = str(tmp_path / "ds")
    manifest = write_instances(images, out, kind="test", source="here", provenance={"a": 1}, part_size=2)
    assert manifest["num_parts"] == 3 and manifest["num_images"] == 5 and manifest["num_instances"] == 10
    assert manifest["labels"] == {"cat": 5, "dog": 5}
    assert is_instance_dataset(out) and read_manifest(out)["provenance"] == {"a": 1}
    _check_equal(list(iter_instances(out)), images)
    _check_equal(list(open_instances(out)), images)
    with pytest.raises(ValueError, match="already holds an instance dataset"):
        write_instances(images, out, kind="test", source="here")


def test_unfinished_write_is_replaced_and_ids_must_be_unique(tmp_path):
    out = str(tmp_path / "ds")
    write_instances(_images(5), out, kind="test", source="x", part_size=1)
    (tmp_path / "ds" / "dataset.json").unlink()  # as if the first write had died before finishing
    write_instances(_images(2), out, kind="test", source="x", part_size=1)
    assert len(list(iter_instances(out))) == 2
    twice = _images(1) * 2
    with pytest.raises(ValueError, match="appears twice"):
        write_instances(twice, str(tmp_path / "dup"), kind="test", source="x")
    bad = _images(1)[0]
    bad.height = 10
    with pytest.raises(ValueError, match="masks must have the image's size"):
        write_instances([bad], str(tmp_path / "bad"), kind="test", source="x")


def test_missing_dataset_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="hqlabel curate"):
        read_manifest(str(tmp_path))


def test_round_trip_on_s3(s3_endpoint, s3_bucket):
    options = StorageOptions(s3_endpoint=s3_endpoint)
    out = f"s3://{s3_bucket}/ds"
    images = _images(3)
    write_instances(images, out, kind="test", source="s3", options=options, part_size=2)
    _check_equal(list(iter_instances(out, options)), images)
    with pytest.raises(ValueError, match="already holds"):
        write_instances(images, out, kind="test", source="s3", options=options)
