"""The labeling job's inputs: COCO JSON and Parquet with given boxes (``--prompts boxes``), Parquet rows that
reference image files, and how a folder is cut into shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import encode, random_image

from hqlabel.jobs.cli import main
from hqlabel.jobs.label import LabelSummary, run_label_job
from hqlabel.jobs.spec import LabelJobSpec
from hqlabel.platform.config import LabelerConfig
from hqlabel.platform.readers import InputColumns, list_input, read_parquet_shards
from hqlabel.platform.references import ReferencePolicy
from hqlabel.platform.rle import decode_mask
from hqlabel.platform.sources import ImageSource
from hqlabel.platform.storage import StorageOptions
from hqlabel.workers.decode import decode_batch

pytestmark = pytest.mark.timeout(180)

BOXES = LabelerConfig(prompts="boxes", preset="tiny-random")


def _tables(out: Path) -> dict[str, list[dict]]:
    keys = {"masks": ["image_id", "instance_id"], "errors": ["image_id"], "images": ["image_id"]}
    return {
        name: pq.read_table(out / name).sort_by([(k, "ascending") for k in by]).to_pylist()
        for name, by in keys.items()
    }


def _write_images(folder: Path, sizes: dict[str, tuple[int, int]]) -> None:
    for i, (name, size) in enumerate(sizes.items()):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(random_image(i, size), "JPEG" if name.endswith(".jpg") else "PNG"))


# file_name -> (height, width); "big.png" is larger than the jobs' --max-side 64, so it is labeled downscaled.
COCO_SIZES = {"a.png": (48, 64), "sub/b.jpg": (64, 48), "empty.png": (40, 40), "big.png": (80, 120)}
COCO_CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 7, "name": "traffic light"}]
COCO_ANNOTATIONS = [  # (file_name, category id, [x, y, w, h], iscrowd)
    ("a.png", 1, [5, 6, 20, 10], 0),
    ("a.png", 7, [30.5, 10.25, 15, 20], 0),
    ("sub/b.jpg", 7, [0, 0, 48, 64], 0),
    ("sub/b.jpg", 1, [2, 3, 10, 10], 1),  # crowd: not an instance to segment
    ("big.png", 1, [10, 20, 60, 40], 0),
]


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    """Images and their COCO instances JSON, side by side; ``empty.png`` has no annotations."""
    root = tmp_path_factory.mktemp("coco")
    _write_images(root, COCO_SIZES)
    ids = {name: 100 + i for i, name in enumerate(COCO_SIZES)}
    doc = {
        "images": [
            {"id": ids[name], "file_name": name, "height": h, "width": w}
            for name, (h, w) in COCO_SIZES.items()
        ],
        "annotations": [
            {"id": k, "image_id": ids[name], "category_id": cat, "bbox": bbox, "iscrowd": crowd, "area": 1.0}
            for k, (name, cat, bbox, crowd) in enumerate(COCO_ANNOTATIONS)
        ],
        "categories": COCO_CATEGORIES,
    }
    (root / "ann.json").write_text(json.dumps(doc))
    return root / "ann.json"


@pytest.fixture(scope="module")
def coco_job(ray_session, coco, tmp_path_factory) -> tuple[Path, LabelSummary]:
    out = tmp_path_factory.mktemp("coco_job") / "out"
    spec = LabelJobSpec(input=str(coco), out=str(out), labeler=BOXES, batch_size=2, max_side=64)
    return out, run_label_job(spec, progress=False)


def test_coco_boxes_become_one_mask_each(coco_job):
    out, summary = coco_job
    tables = _tables(out)
    names = {c["id"]: c["name"] for c in COCO_CATEGORIES}
    expected = {name: [] for name in COCO_SIZES}
    for name, cat, (x, y, w, h), crowd in COCO_ANNOTATIONS:
        if not crowd:
            expected[name].append((names[cat], [x, y, x + w, y + h]))
    masks = tables["masks"]
    assert len(masks) == summary.instances == sum(map(len, expected.values())) == 4
    for name, instances in expected.items():
        rows = [m for m in masks if m["image_id"] == name]  # in instance_id order: the annotations' order
        assert [r["instance_id"] for r in rows] == list(range(len(instances)))
        assert [r["label"] for r in rows] == [label for label, _ in instances]
        for row, (_, box) in zip(rows, instances, strict=True):
            assert row["score"] == 1.0
            np.testing.assert_allclose(row["box"], box, rtol=1e-5, atol=1e-3)
            mask = decode_mask(row["mask"])
            assert mask.shape == COCO_SIZES[name] and row["area"] == int(mask.sum())
    assert tables["errors"] == []
    images = {r["image_id"]: r for r in tables["images"]}
    assert set(images) == set(COCO_SIZES)
    assert images["empty.png"] == {
        "image_id": "empty.png", "height": 40, "width": 40, "num_instances": 0, "error_stage": None
    }  # fmt: skip
    assert images["sub/b.jpg"]["num_instances"] == 1  # its crowd box is not one
    job = json.loads((out / "job.json").read_text())
    assert job["models"]["detector"] is None and job["spec"]["labeler"]["prompts"] == "boxes"


def test_cli_labels_coco_boxes_without_classes_from_the_data_folder(
    ray_session, coco, coco_job, tmp_path, monkeypatch, capsys
):
    """Run where the data is, as users do (``hqlabel label ann.json``): the images are found next to it."""
    monkeypatch.chdir(coco.parent)
    out = tmp_path / "cli"
    args = ["label", "ann.json", "--prompts", "boxes", "--preset", "tiny-random", "--out", str(out)]
    assert main([*args, "--batch-size", "2", "--max-side", "64", "--no-progress"]) == 0
    assert "labeled 4 images: 4 instances, 0 errors" in capsys.readouterr().out
    assert _tables(out) == _tables(coco_job[0])  # the same as the job given the absolute path


@pytest.fixture
def referenced(tmp_path: Path) -> Path:
    """``data/index.parquet`` whose ``uri`` column references images by a path relative to ``data/``, by
    ``file://`` URI, and by absolute path."""
    data = tmp_path / "data"
    sizes = {"images/rel.png": (48, 64), "images/sub/uri.png": (40, 56), "elsewhere.png": (36, 30)}
    _write_images(data, sizes)
    (data / "elsewhere.png").rename(tmp_path / "elsewhere.png")
    table = pa.table(
        {
            "image_id": ["rel", "uri", "abs"],
            "uri": [
                "images/rel.png",
                (data / "images/sub/uri.png").as_uri(),
                str(tmp_path / "elsewhere.png"),
            ],
        }
    )
    pq.write_table(table, data / "index.parquet")
    return data / "index.parquet"


def test_parquet_uri_column_relative_file_uri_and_absolute(ray_session, referenced, tmp_path):
    sizes = {"rel": (48, 64), "uri": (40, 56), "abs": (36, 30)}
    out = tmp_path / "out"
    labeler = LabelerConfig(classes="cat, dog", preset="tiny-random", box_threshold=0.3)
    allow = [str(tmp_path / "elsewhere.png")]  # the absolute reference is outside the dataset
    spec = LabelJobSpec(input=str(referenced), out=str(out), labeler=labeler, allow_prefix=allow)
    summary = run_label_job(spec, progress=False)
    tables = _tables(out)
    assert tables["errors"] == [] and summary.errors == 0
    assert {r["image_id"]: (r["height"], r["width"]) for r in tables["images"]} == sizes
    assert {m["image_id"] for m in tables["masks"]} == set(sizes)
    for m in tables["masks"]:
        assert decode_mask(m["mask"]).shape == sizes[m["image_id"]]


def _decoded(referenced: Path, tmp_path: Path, allow: tuple[str, ...] = ()) -> dict[str, str | None]:
    """``{image id: error}`` of the ``referenced`` rows read and decoded as the job does, in one task."""
    source = list_input(str(referenced), listing=str(tmp_path / "listing"))
    batch = pa.Table.from_pylist([{"shard": s.shard_id, "source": s.source} for s in source.shards])
    (rows,) = read_parquet_shards(batch, root=source.root, columns=InputColumns(), options=StorageOptions())
    decoded = decode_batch(rows, references=ReferencePolicy(source.root, allow))
    return dict(zip(decoded["image_id"].to_pylist(), decoded["error"].to_pylist(), strict=True))


def test_parquet_uri_outside_the_dataset_is_refused_unread(referenced, tmp_path):
    assert _decoded(referenced, tmp_path) == {
        "rel": None,
        "uri": None,
        "abs": f"RefusedReference: {str(tmp_path / 'elsewhere.png')!r} is outside the dataset root "
        f"{str(referenced.parent)!r}; references must stay inside the dataset, or pass --allow-prefix to "
        "allow another place",
    }


def test_parquet_uri_outside_under_allow_prefix_is_read(referenced, tmp_path):
    assert _decoded(referenced, tmp_path, (str(tmp_path / "elsewhere.png"),))["abs"] is None


def test_show_and_curate_refuse_a_reference_outside_the_dataset(referenced, tmp_path):
    """``ImageSource`` (``hqlabel show``, ``hqlabel curate``) reads with the job's policy too."""
    source = list_input(str(referenced), listing=str(tmp_path / "listing"))
    reader = ImageSource(source, StorageOptions(), InputColumns())
    found = {image_id: problem for image_id, _, problem in reader.read("00000", {"rel", "abs"})}
    assert (found["rel"], found["abs"].startswith("refused: ")) == ("", True)


def test_show_and_curate_refuse_an_image_file_over_the_jobs_max_bytes_unread(referenced, tmp_path):
    source = list_input(str(referenced), listing=str(tmp_path / "listing"))
    reader = ImageSource(source, StorageOptions(), InputColumns(), max_bytes=10)
    found = {image_id: (data, problem) for image_id, data, problem in reader.read("00000", {"rel"})}
    assert found["rel"][0] is None and "over the cap of 10 bytes; raise --max-bytes" in found["rel"][1]


@pytest.mark.parametrize("given", ["index.parquet", ".", "./index.parquet"])
def test_parquet_relative_references_resolve_from_any_working_directory(
    given, referenced, tmp_path, monkeypatch
):
    """``hqlabel label index.parquet`` (or ``.``) run from the data folder: ``uri``s resolve against it."""
    monkeypatch.chdir(referenced.parent)
    source = list_input(given, listing=str(tmp_path / "listing"))
    monkeypatch.chdir(tmp_path)  # the Ray workers that read the shards may run anywhere
    (shard,) = source.shards
    batch = pa.Table.from_pylist([{"shard": shard.shard_id, "source": shard.source}])
    (rows,) = read_parquet_shards(batch, root=source.root, columns=InputColumns(), options=StorageOptions())
    assert rows["image_id"].to_pylist() == ["rel", "uri", "abs"]
    for uri in rows["uri"].to_pylist():
        assert Path(uri.removeprefix("file://")).is_file(), uri


def test_parquet_boxes_and_labels_columns(ray_session, tmp_path):
    ids = ["two", "none", "unnamed"]
    sizes = {"two": (48, 64), "none": (40, 40), "unnamed": (50, 30)}
    table = pa.table(
        {
            "image_id": ids,
            "image": [encode(random_image(i, sizes[k])) for i, k in enumerate(ids)],
            "boxes": [[[1, 2, 30, 40], [10.5, 5, 60, 47]], [], [[0, 0, 30, 50]]],  # list<list<double>>: cast
            "labels": [["cat", "dog"], [], None],
        }
    )
    path = tmp_path / "boxes.parquet"
    pq.write_table(table, path)
    out = tmp_path / "out"
    run_label_job(LabelJobSpec(input=str(path), out=str(out), labeler=BOXES, batch_size=2), progress=False)

    tables = _tables(out)
    assert tables["errors"] == []
    assert {r["image_id"]: r["num_instances"] for r in tables["images"]} == {
        "two": 2,
        "none": 0,
        "unnamed": 1,
    }
    got = [(m["image_id"], m["instance_id"], m["label"], m["score"]) for m in tables["masks"]]
    assert got == [("two", 0, "cat", 1.0), ("two", 1, "dog", 1.0), ("unnamed", 0, "object", 1.0)]
    given = [box for boxes in table["boxes"].to_pylist() for box in boxes]
    for m, box in zip(tables["masks"], given, strict=True):
        np.testing.assert_allclose(m["box"], box, rtol=1e-6)
        assert decode_mask(m["mask"]).shape == sizes[m["image_id"]]


def test_boxes_prompts_need_boxes_and_the_detector_needs_classes(image_folder, tmp_path):
    spec = LabelJobSpec(input=str(image_folder), out=str(tmp_path / "out"), labeler=BOXES)
    with pytest.raises(ValueError, match=r"COCO JSON or Parquet with a boxes column"):
        run_label_job(spec, progress=False)
    # nothing is written when the job cannot start (the output's lease, taken before the input is listed,
    # is released again)
    assert not any(p.is_file() for p in (tmp_path / "out").rglob("*"))
    with pytest.raises(ValueError, match="--classes"):
        LabelerConfig(prompts="detector", preset="tiny-random")


def test_a_folder_is_cut_into_shards_of_shard_size(ray_session, tmp_path):
    folder = tmp_path / "images"
    _write_images(folder, {f"{'sub/' if i % 2 else ''}img_{i:02d}.png": (32, 40) for i in range(10)})
    source = list_input(str(folder), listing=str(tmp_path / "listing"), shard_size=3)
    assert [(s.shard_id, s.num_images) for s in source.shards] == [
        ("00000", 3), ("00001", 3), ("00002", 3), ("00003", 1)
    ]  # fmt: skip

    out = tmp_path / "out"
    labeler = LabelerConfig(classes="cat", preset="tiny-random")
    run_label_job(
        LabelJobSpec(input=str(folder), out=str(out), labeler=labeler, shard_size=3), progress=False
    )
    per_shard = {p.name: pq.read_table(p)["image_id"].to_pylist() for p in sorted((out / "images").iterdir())}
    assert list(per_shard) == [f"part-0000{i}.parquet" for i in range(4)]
    assert [len(ids) for ids in per_shard.values()] == [3, 3, 3, 1]
    every = [i for ids in per_shard.values() for i in ids]
    assert len(set(every)) == len(every) == 10
    assert sorted(p.name for p in (out / "_done").iterdir()) == [f"0000{i}.json" for i in range(4)]
