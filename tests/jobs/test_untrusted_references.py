"""Image references that leave their dataset, through the real labeling job: one Parquet shard whose ``uri``
column holds every case, one run with ``--allow-prefix``, one assertion per case."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import encode, random_image

from hqlabel.jobs.cli import main

pytestmark = pytest.mark.timeout(240)

SECRET = b"TOP-SECRET-TRAILER"  # appended to the outside image (PNG readers ignore bytes after IEND)


@pytest.fixture(scope="module")
def errors(ray_session, tmp_path_factory) -> dict[str, dict]:
    """``{image id: error row}`` (stage, error; ``None`` when labeled) of the job over ``root/dataset``."""
    root = tmp_path_factory.mktemp("references")
    dataset, outside, allowed = root / "dataset", root / "outside", root / "allowed"
    for folder in (dataset / "images", outside, allowed, root / "datasetX"):
        folder.mkdir(parents=True)
    image = encode(random_image(0, (32, 40)))
    (dataset / "images" / "in.png").write_bytes(image)
    (outside / "secret.png").write_bytes(image + SECRET)
    (allowed / "ok.png").write_bytes(image)
    (root / "datasetX" / "lookalike.png").write_bytes(image)
    (dataset / "images" / "link-out.png").symlink_to(outside / "secret.png")
    (dataset / "images" / "link-in.png").symlink_to(dataset / "images" / "in.png")
    cases = {
        "inside": "images/in.png",
        "climbs-out": "../outside/secret.png",
        "absolute-outside": str(outside / "secret.png"),
        "file-uri-outside": (outside / "secret.png").as_uri(),
        "lookalike": str(root / "datasetX" / "lookalike.png"),
        "symlink-out": "images/link-out.png",
        "symlink-in": "images/link-in.png",
        "allowed": str(allowed / "ok.png"),
    }
    table = pa.table({"image_id": list(cases), "uri": list(cases.values())})
    pq.write_table(table, dataset / "index.parquet")
    out = root / "labels"
    args = ["label", str(dataset), "--out", str(out), "--preset", "tiny-random", "--classes", "cat"]
    assert main([*args, "--allow-prefix", str(allowed), "--max-side", "64", "--no-progress"]) == 0
    found = {image_id: None for image_id in cases}
    found.update({e["image_id"]: e for e in pq.read_table(out / "errors").to_pylist()})
    return found


@pytest.mark.parametrize("image_id", ["inside", "symlink-in", "allowed"])
def test_references_inside_the_dataset_or_allowed_are_labeled(errors, image_id):
    assert errors[image_id] is None


@pytest.mark.parametrize("image_id", ["climbs-out", "absolute-outside", "file-uri-outside", "lookalike"])
def test_references_outside_the_dataset_are_read_errors_naming_the_reason(errors, image_id):
    error = errors[image_id]
    assert (error["stage"], "outside the dataset root" in error["error"]) == ("read", True)


def test_symlink_leading_out_is_a_read_error_naming_the_symlink(errors):
    error = errors["symlink-out"]
    assert (error["stage"], "through a symlink" in error["error"]) == ("read", True)


def test_refused_rows_hold_no_file_bytes(errors):
    refused = [e["error"] for e in errors.values() if e is not None]
    assert not any(SECRET.decode() in text or "PNG" in text for text in refused)
