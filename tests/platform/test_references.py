"""``ReferencePolicy``: image references must stay inside their dataset's root or an allowed prefix."""

from __future__ import annotations

from pathlib import Path

import pytest

from hqlabel.platform.coco import read_coco
from hqlabel.platform.readers import _resolve_uri
from hqlabel.platform.references import ReferencePolicy, RefusedReference

S3 = ReferencePolicy("s3://bucket/dataset")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """``tmp/data/set`` holding ``a.png``; ``tmp/outside.png`` next to it, outside."""
    root = tmp_path / "data" / "set"
    root.mkdir(parents=True)
    (root / "a.png").write_bytes(b"inside")
    (tmp_path / "outside.png").write_bytes(b"outside")
    return root


def test_relative_reference_inside_is_normalised(root):
    assert ReferencePolicy(str(root)).check(_resolve_uri("sub/../a.png", str(root))) == str(root / "a.png")


def test_dot_dot_climbing_out_of_a_folder_root_is_refused(root):
    with pytest.raises(RefusedReference, match="outside the dataset root"):
        ReferencePolicy(str(root)).check(_resolve_uri("../../outside.png", str(root)))


def test_coco_file_name_climbing_out_is_refused(root):
    coco = {"images": [{"id": 1, "file_name": "../../outside.png"}], "annotations": [], "categories": []}
    (image,), _ = read_coco(coco, str(root))
    with pytest.raises(RefusedReference, match="outside the dataset root"):
        ReferencePolicy(str(root)).check(image.uri)


def test_absolute_local_path_outside_is_refused(root, tmp_path):
    with pytest.raises(RefusedReference, match="--allow-prefix"):
        ReferencePolicy(str(root)).check(str(tmp_path / "outside.png"))


def test_file_uri_outside_is_refused(root, tmp_path):
    with pytest.raises(RefusedReference, match="outside the dataset root"):
        ReferencePolicy(str(root)).check((tmp_path / "outside.png").as_uri())


def test_file_uri_inside_is_allowed(root):
    assert ReferencePolicy(str(root)).check((root / "a.png").as_uri()) == str(root / "a.png")


def test_allowed_prefix_admits_an_absolute_path(root, tmp_path):
    assert ReferencePolicy(str(root), (str(tmp_path),)).check(str(tmp_path / "outside.png")) == str(
        tmp_path / "outside.png"
    )


def test_prefix_lookalike_is_refused(root):
    with pytest.raises(RefusedReference, match="outside the dataset root"):
        ReferencePolicy(str(root)).check(f"{root}X/a.png")  # /data/setX is not under /data/set


def test_symlink_inside_the_root_leading_out_is_refused(root, tmp_path):
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    with pytest.raises(RefusedReference, match="through a symlink"):
        ReferencePolicy(str(root)).check(str(root / "link.png"))


def test_symlinked_folder_leading_out_is_refused(root, tmp_path):
    (root / "linked").symlink_to(tmp_path)
    with pytest.raises(RefusedReference, match="through a symlink"):
        ReferencePolicy(str(root)).check(str(root / "linked" / "outside.png"))


def test_symlink_inside_the_root_leading_inside_is_allowed(root):
    (root / "link.png").symlink_to(root / "a.png")
    assert ReferencePolicy(str(root)).check(str(root / "link.png")) == str(root / "link.png")


def test_root_reached_through_a_symlink_is_allowed(root, tmp_path):
    (tmp_path / "alias").symlink_to(root)
    policy = ReferencePolicy(str(tmp_path / "alias"))
    assert policy.check(str(tmp_path / "alias" / "a.png")) == str(tmp_path / "alias" / "a.png")


def test_s3_reference_inside_is_normalised():
    assert S3.check("s3://bucket/dataset/x/./../images//a.png") == "s3://bucket/dataset/images/a.png"


def test_s3_other_bucket_is_refused():
    with pytest.raises(RefusedReference, match="outside the dataset root"):
        S3.check("s3://other/dataset/a.png")


def test_s3_same_bucket_outside_the_prefix_is_refused():
    with pytest.raises(RefusedReference, match="outside the dataset root"):
        S3.check("s3://bucket/elsewhere/a.png")


def test_s3_dot_dot_out_of_the_prefix_is_refused():
    with pytest.raises(RefusedReference, match="outside the dataset root"):
        S3.check("s3://bucket/dataset/../other/a.png")


def test_s3_dot_dot_above_the_bucket_is_refused():
    with pytest.raises(RefusedReference, match="above its bucket"):
        S3.check("s3://bucket/../other/a.png")


def test_s3_prefix_lookalike_is_refused():
    with pytest.raises(RefusedReference, match="outside the dataset root"):
        S3.check("s3://bucket/datasetX/a.png")


def test_s3_allowed_prefix_admits_its_objects():
    policy = ReferencePolicy("s3://bucket/dataset", ("s3://bucket/elsewhere/",))
    assert policy.check("s3://bucket/elsewhere/a.png") == "s3://bucket/elsewhere/a.png"


def test_local_path_under_an_s3_root_is_refused(tmp_path):
    with pytest.raises(RefusedReference, match="outside the dataset root"):
        S3.check(str(tmp_path / "outside.png"))


def test_other_schemes_are_refused():
    with pytest.raises(RefusedReference, match="only s3://, file://"):
        S3.check("http://example.com/a.png")


def test_empty_allowed_prefix_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        ReferencePolicy("/data/set", ("",))
