"""The Python API (``import hqlabel``) against the command line on the same inputs: the job functions write
the CLI's rows, the in-memory ``Labeler`` gives an image the job's rows, ``read_labels`` streams them back,
supervision interop, and the README's examples run as written."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import encode, random_image
from PIL import Image

import hqlabel
from hqlabel.api import results as results_module
from hqlabel.jobs.cli import main

pytestmark = pytest.mark.timeout(300)

CLASSES = "cat, dog"
OPTIONS = ["--preset", "tiny-random", "--box-threshold", "0.3", "--batch-size", "1", "--no-progress"]
SIZES = {"a.png": (48, 64), "b.png": (64, 40), "sub/c.png": (30, 70)}
REPO = Path(__file__).resolve().parents[1]


def _masks(out: Path) -> list[dict]:
    table = pq.read_table(out / "masks").sort_by([("image_id", "ascending"), ("instance_id", "ascending")])
    return table.to_pylist()


def _table(out: Path, name: str) -> list[dict]:
    return sorted(pq.read_table(out / name).to_pylist(), key=lambda r: r["image_id"])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Three images of different sizes and a broken one (an error row)."""
    root = tmp_path_factory.mktemp("api") / "images"
    (root / "sub").mkdir(parents=True)
    for i, (name, size) in enumerate(SIZES.items()):
        (root / name).write_bytes(encode(random_image(i, size)))
    (root / "broken.png").write_bytes(encode(random_image(7))[:100])
    return root


@pytest.fixture(scope="module")
def cli_out(ray_session, folder) -> Path:
    out = folder.parent / "cli"
    assert main(["label", str(folder), "--out", str(out), "--classes", CLASSES, *OPTIONS]) == 0
    return out


@pytest.fixture(scope="module")
def api_out(ray_session, folder) -> tuple[Path, object]:
    out = folder.parent / "api"
    summary = hqlabel.label(
        str(folder), out=str(out), classes=CLASSES, preset="tiny-random", box_threshold=0.3, batch_size=1
    )
    return out, summary


@pytest.fixture(scope="module")
def labeler():
    return hqlabel.Labeler.from_pretrained(
        classes=CLASSES, preset="tiny-random", box_threshold=0.3, batch_size=1
    )


def test_import_is_light_and_exports_documented_names():
    code = (
        "import sys, hqlabel; print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    loaded = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
    for name in hqlabel.__all__:
        value = getattr(hqlabel, name)
        assert name == "__version__" or value.__doc__, f"{name} has no docstring"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hqlabel.nope  # noqa: B018


def test_label_writes_the_cli_rows(cli_out, api_out):
    out, summary = api_out
    for name in ("images", "errors"):
        assert _table(out, name) == _table(cli_out, name)
    masks = _masks(out)
    assert masks == _masks(cli_out) and masks
    assert (summary.images, summary.instances, summary.errors) == (len(SIZES) + 1, len(masks), 1)
    spec, cli_spec = (json.loads((o / "job.json").read_text())["spec"] for o in (out, cli_out))
    assert spec["out"] != cli_spec["out"]
    assert {**spec, "out": None} == {**cli_spec, "out": None}


@pytest.mark.parametrize(
    ("options", "flags", "message"),
    [
        ({"box_threshold": 2.0}, ["--box-threshold", "2"], "box_threshold"),
        ({"classes": ""}, [], "the detector needs --classes"),
        ({"batch_size": 0}, ["--batch-size", "0"], "batch_size"),
        ({"allow_prefix": [""]}, ["--allow-prefix", ""], "--allow-prefix ''"),
    ],
)
def test_label_refuses_what_the_cli_refuses(folder, tmp_path, capsys, options, flags, message):
    from hqlabel.jobs.cli import _one_line

    kwargs = {"classes": CLASSES, "preset": "tiny-random", **options}
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        hqlabel.label(str(folder), out=str(tmp_path / "a"), **kwargs)
    classes = ["--classes", kwargs["classes"]]
    args = ["label", str(folder), "--out", str(tmp_path / "b"), *classes, "--preset", "tiny-random", *flags]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == f"hqlabel: error: {_one_line(caught.value)}"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_unknown_options_are_named(folder, tmp_path):
    with pytest.raises(TypeError, match="'box_treshold'"):
        hqlabel.label(str(folder), out=str(tmp_path), classes=CLASSES, box_treshold=0.3)
    with pytest.raises(TypeError, match="'epoch'"):
        hqlabel.train(str(folder), out=str(tmp_path), epoch=3)
    with pytest.raises(TypeError, match="'treshold'"):
        hqlabel.Labeler.from_pretrained(classes=CLASSES, preset="tiny-random", treshold=0.3)


def test_train_refuses_what_the_cli_refuses(tmp_path, capsys):
    from hqlabel.jobs.cli import _one_line

    with pytest.raises(ValueError, match="jitter") as caught:
        hqlabel.train(str(tmp_path), out=str(tmp_path / "run"), jitter=(2.0, 1.0))
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--jitter", "2,1"]) == 2
    assert capsys.readouterr().err.strip() == f"hqlabel: error: {_one_line(caught.value)}"


def test_in_memory_labeler_gives_the_job_rows(cli_out, folder, labeler):
    rows = _masks(cli_out)
    for name, size in SIZES.items():
        expected = [r for r in rows if r["image_id"] == name]
        pil = Image.open(folder / name)
        array = np.asarray(Image.open(folder / name).convert("RGB"))
        for image in (pil, array):
            result = labeler(image)
            result.image_id = name
            assert result.rows() == expected
            assert (result.height, result.width) == size
            assert result.masks.shape == (len(expected), *size) and result.masks.dtype == bool
            assert [int(m.sum()) for m in result.masks] == [r["area"] for r in expected]
            assert result.boxes.shape == (len(expected), 4) and result.pred_iou.shape == (len(expected),)
    batch = labeler([Image.open(folder / n) for n in SIZES])  # a list in, a list out, in order
    assert [len(r) for r in batch] == [len([r for r in rows if r["image_id"] == n]) for n in SIZES]


def test_in_memory_labeler_records_its_hq_weights_digest(tmp_path):
    from hqlabel.segmenters import tiny_random_sam_hq
    from hqlabel.segmenters.hq_weights import hq_weights_revision, save_hq_weights

    model = tiny_random_sam_hq().model
    weights = save_hq_weights(model, tmp_path / "hq.safetensors", base_model="tiny-random")
    loaded = hqlabel.Labeler.from_pretrained(preset="tiny-random", hq_weights=str(weights))
    assert loaded.config.hq_weights_revision == hq_weights_revision(weights)
    with pytest.raises(ValueError, match="has changed"):
        hqlabel.Labeler.from_pretrained(
            preset="tiny-random", hq_weights=str(weights), hq_weights_revision="sha256:0"
        )


def test_in_memory_labeler_refuses_bad_images(labeler):
    with pytest.raises(ValueError, match="uint8"):
        labeler(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="H x W x 3"):
        labeler(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(TypeError, match="PIL images or numpy arrays"):
        labeler("a.png")
    boxes_only = hqlabel.Labeler.from_pretrained(preset="tiny-random")
    with pytest.raises(RuntimeError, match="without classes"):
        boxes_only(np.zeros((8, 8, 3), np.uint8))


def test_read_labels_streams_the_job_rows(cli_out, monkeypatch):
    monkeypatch.setattr(results_module, "READ_BATCH_ROWS", 3)  # images' rows span record batches
    read = dict(hqlabel.read_labels(str(cli_out)))
    labeled = {r["image_id"]: r for r in _table(cli_out, "images") if r["error_stage"] is None}
    assert set(read) == set(labeled) == set(SIZES)  # broken.png (errors/) left out
    rows = _masks(cli_out)
    for image_id, result in read.items():
        assert result.image_id == image_id
        assert (result.height, result.width) == SIZES[image_id]
        assert result.rows() == [r for r in rows if r["image_id"] == image_id]
        assert result.classes == ["cat", "dog"]


def test_read_labels_keeps_images_without_instances(cli_out, tmp_path):
    copy = tmp_path / "labels"
    shutil.copytree(cli_out, copy)
    table = pq.read_table(copy / "masks")
    masks = sorted((copy / "masks").glob("*.parquet"))
    pq.write_table(table.filter(np.array([i != "a.png" for i in table["image_id"].to_pylist()])), masks[0])
    read = dict(hqlabel.read_labels(str(copy)))
    assert set(read) == set(SIZES) and len(read["a.png"]) == 0
    assert read["a.png"].masks.shape == (0, *SIZES["a.png"])


def test_read_labels_on_s3(cli_out, s3_client, s3_bucket, s3_endpoint):
    for path in cli_out.rglob("*"):
        if path.is_file():
            key = "labels/" + path.relative_to(cli_out).as_posix()
            s3_client.put_object(Bucket=s3_bucket, Key=key, Body=path.read_bytes())
    read = list(hqlabel.read_labels(f"s3://{s3_bucket}/labels", s3_endpoint=s3_endpoint))
    local = list(hqlabel.read_labels(str(cli_out)))
    assert [(i, r.rows()) for i, r in read] == [(i, r.rows()) for i, r in local]


def test_export_curate_evaluate_match_the_cli(cli_out, tmp_path):
    hqlabel.export(str(cli_out), out=str(tmp_path / "api.json"), format="coco")
    assert main(["export", str(cli_out), "--format", "coco", "--out", str(tmp_path / "cli.json")]) == 0
    assert (tmp_path / "api.json").read_bytes() == (tmp_path / "cli.json").read_bytes()
    with pytest.raises(ValueError, match="--min-part-area"):
        hqlabel.export(str(cli_out), out=str(tmp_path / "x"), format="yolo-seg", min_part_area=-1)

    manifest = hqlabel.curate(str(cli_out), out=str(tmp_path / "api"), classes="cat", min_score=0.5)
    args = ["curate", str(cli_out), "--out", str(tmp_path / "cli"), "--labels", "cat", "--min-score", "0.5"]
    assert main(args) == 0
    parts = sorted(p.relative_to(tmp_path / "api") for p in (tmp_path / "api").rglob("*.parquet"))
    assert parts and parts == sorted(
        p.relative_to(tmp_path / "cli") for p in (tmp_path / "cli").rglob("*.parquet")
    )
    for part in parts:
        assert pq.read_table(tmp_path / "api" / part) == pq.read_table(tmp_path / "cli" / part)
    assert (
        manifest["provenance"]["counts"]
        == json.loads((tmp_path / "cli/dataset.json").read_text())["provenance"]["counts"]
    )

    report = hqlabel.evaluate(str(tmp_path / "api"), preset="tiny-random", out=str(tmp_path / "eval_api"))
    args = ["eval", "--data", str(tmp_path / "api"), "--preset", "tiny-random", "--out", str(tmp_path / "e")]
    assert main(args) == 0
    assert report["rows"] == json.loads((tmp_path / "e/eval.json").read_text())["rows"]


def test_supervision_round_trip(folder, labeler):
    sv = pytest.importorskip("supervision")
    image = Image.open(folder / "a.png")
    result = labeler(image)
    detections = result.to_supervision()
    assert isinstance(detections, sv.Detections) and len(detections) == len(result) > 0
    np.testing.assert_array_equal(detections.xyxy, result.boxes)
    np.testing.assert_array_equal(detections.mask, result.masks)
    np.testing.assert_array_equal(detections.confidence, result.scores)
    assert list(detections.data["class_name"]) == result.labels
    assert [["cat", "dog"][i] for i in detections.class_id] == result.labels

    pixels = np.asarray(image.convert("RGB")).copy()
    for annotator in (sv.MaskAnnotator(), sv.BoxAnnotator(), sv.LabelAnnotator()):
        drawn = annotator.annotate(pixels.copy(), detections)
        assert drawn.shape == pixels.shape and (drawn != pixels).any()

    prompted = labeler(image, boxes=detections[:3])  # a Detections as box prompts: the detector is skipped
    np.testing.assert_allclose(prompted.boxes, result.boxes[:3], rtol=0, atol=1e-4)
    assert prompted.labels == result.labels[:3] and (prompted.scores == 1.0).all()
    from_ids = sv.Detections(xyxy=result.boxes[:2], class_id=np.array([1, 0]))
    assert labeler(image, boxes=from_ids).labels == ["dog", "cat"]
    arrays = labeler([image, image], boxes=[result.boxes[:1], np.zeros((0, 4))], labels=[["x"], []])
    assert [r.labels for r in arrays] == [["x"], []]
    with pytest.raises(ValueError, match="N x 4"):
        labeler(image, boxes=np.zeros((2, 3)))


def test_read_detections(cli_out):
    pytest.importorskip("supervision")
    pairs = list(hqlabel.read_detections(str(cli_out)))
    assert [i for i, _ in pairs] == [i for i, _ in hqlabel.read_labels(str(cli_out))]
    for image_id, detections in pairs:
        assert detections.mask.shape[1:] == SIZES[image_id]


def _readme_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_examples_run(ray_session, tmp_path, monkeypatch):
    pytest.importorskip("supervision")
    from hqlabel.platform.demo import make_demo_images

    blocks = _readme_blocks()
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    make_demo_images("demo_images", 2, size=(96, 128))
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["masks"].shape[1:] == (96, 128)
    assert namespace["annotated"].shape == (96, 128, 3)
    assert namespace["summary"].images == 2
    assert (tmp_path / "labels.coco.json").is_file() and (tmp_path / "curated").is_dir()


def test_in_memory_labeler_downscales_as_the_job_steps():
    """With ``max_side`` below the image size, the in-memory labeler works on the downscaled copy and reports
    at the original size exactly as the job's own steps (``decode_batch`` -> ``LabelWorker``) do."""
    import pyarrow as pa

    from hqlabel.platform.config import LabelerConfig
    from hqlabel.platform.schema import SOURCE_SCHEMA, results_to_tables
    from hqlabel.workers import LabelWorker, decode_batch

    data = encode(random_image(5, (96, 128)))
    source = pa.Table.from_pylist(
        [{"shard": "s", "row": 0, "image_id": "big.png", "image": data}], schema=SOURCE_SCHEMA
    )
    config = LabelerConfig(classes=CLASSES, preset="tiny-random", box_threshold=0.3)
    decoded = decode_batch(source, max_side=64)
    assert decoded["width"].to_pylist() == [64]  # 96 x 128 worked on at 48 x 64
    masks, _, _ = results_to_tables(LabelWorker(config)(decoded))
    labeler = hqlabel.Labeler.from_pretrained(
        classes=CLASSES, preset="tiny-random", box_threshold=0.3, max_side=64
    )
    result = labeler(Image.open(io.BytesIO(data)))
    result.image_id = "big.png"
    assert result.rows() == masks.to_pylist() and len(result)
    assert result.masks.shape[1:] == (96, 128)
