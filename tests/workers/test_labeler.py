import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import encode, random_image, upsample_calls

from hqlabel.platform.config import LabelerConfig
from hqlabel.platform.rle import decode_mask
from hqlabel.platform.schema import DECODED_SCHEMA, RESULT_SCHEMA, SOURCE_SCHEMA
from hqlabel.segmenters.hq_sam import resize_plan
from hqlabel.workers import Labeler, LabelWorker, decode_batch, finalize_shard, write_parts

CLASSES = ["cat", "traffic light"]


@pytest.fixture(scope="module")
def config() -> LabelerConfig:
    return LabelerConfig(classes=CLASSES, preset="tiny-random", box_threshold=0.3, device="cpu")


@pytest.fixture(scope="module")
def labeler(config) -> Labeler:
    return Labeler.from_config(config)


def test_label_rows_follow_the_contract(labeler):
    images = [random_image(0, (48, 64)), random_image(1, (70, 30))]
    output_sizes = [(96, 128), (70, 30)]  # first image is a 2x downscaled copy of its original
    results = labeler.label(images, output_sizes)
    assert len(results) == 2
    assert sum(len(r) for r in results) > 0, "the tiny detector is expected to fire on random images"
    for instances, (h, w) in zip(results, output_sizes, strict=True):
        assert [inst["instance_id"] for inst in instances] == list(range(len(instances)))
        for inst in instances:
            assert inst["label"] in CLASSES
            mask = decode_mask(inst["mask"])
            assert mask.shape == (h, w)
            assert inst["area"] == int(mask.sum())
            x0, y0, x1, y1 = inst["box"]
            assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
            assert 0.0 <= inst["score"] <= 1.0


def test_the_resize_budget_changes_the_chunks_not_the_masks(labeler):
    """A budget below one mask's float32 size: each mask is upsampled alone, in strips of rows, and the
    instances (RLE bytes included) are those of the default budget (all of an image's masks at once)."""
    images = [random_image(0, (48, 64)), random_image(1, (70, 30))]
    output_sizes = [(192, 256), (140, 60)]  # 4x and 2x downscaled copies of their originals
    tight = Labeler(labeler.detector, labeler.segmenter, labeler.classes, resize_budget=1)
    with upsample_calls() as default_calls:
        expected = labeler.label(images, output_sizes)
    with upsample_calls() as tight_calls:
        got = tight.label(images, output_sizes)
    assert got == expected
    counts = [len(r) for r in got]
    assert sum(counts) > 2, "the tiny detector is expected to fire on random images"
    # Default: 3 resizes an image. Budget 1: per mask the first resizes, the last axis, then each strip.
    reshaped = labeler.segmenter.embed(images).reshaped_sizes
    strips = [
        math.ceil(size[0] / resize_plan(1, r, size, 1)[1])
        for r, size in zip(reshaped, output_sizes, strict=True)
    ]
    assert min(strips) > 1
    # SAM's own logits take one more first resize per chunk (hq_sam_iou, hqlabel.segmenters.quality)
    extra = sum(n * (3 + s) - 3 for n, s in zip(counts, strips, strict=True) if n)
    assert tight_calls.count - default_calls.count == extra


def test_encoder_runs_once_per_image_whatever_the_box_count(labeler):
    calls = []

    def count(module, args, kwargs, output):
        pixels = args[0] if args else kwargs["pixel_values"]
        calls.append(pixels.shape[0])

    hook = labeler.segmenter.model.vision_encoder.register_forward_hook(count, with_kwargs=True)
    try:
        images = [random_image(i, (40, 56)) for i in range(3)]
        results = labeler.label(images)
    finally:
        hook.remove()
    with_boxes = sum(1 for r in results if r)
    assert sum(len(r) for r in results) > len(images), "need several boxes per image for this test"
    assert calls == [with_boxes]


def test_images_without_boxes_skip_the_segmenter(config):
    strict = Labeler.from_config(config.model_copy(update={"box_threshold": 1.0}))
    calls = []
    hook = strict.segmenter.model.vision_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        assert strict.label([random_image(0)]) == [[]]
    finally:
        hook.remove()
    assert calls == []


def _decoded(
    rows: list[tuple[str | None, bytes | None, str | None]], shard: str = "00000", **kwargs
) -> pa.Table:
    batch = pa.Table.from_pylist(
        [
            {"shard": shard, "image_id": i, "image": b, "uri": u, "boxes": None, "labels": None}
            for i, b, u in rows
        ],
        schema=SOURCE_SCHEMA,
    )
    return decode_batch(batch, max_side=64, **kwargs)


def test_decode_batch_keeps_every_row_and_records_failures(tmp_path):
    good = encode(random_image(3, (80, 120)))
    missing = str(tmp_path / "nope.png")
    out = _decoded(
        [("a", good, None), ("b", b"not an image", None), ("c", None, missing), (None, good, None)]
    )
    assert out.schema == DECODED_SCHEMA
    rows = out.to_pylist()
    assert [r["image_id"] for r in rows] == ["a", "b", "c", ""]
    assert (rows[0]["orig_height"], rows[0]["orig_width"]) == (80, 120)
    assert max(rows[0]["height"], rows[0]["width"]) == 64  # downscaled working copy
    assert len(rows[0]["pixels"]) == rows[0]["height"] * rows[0]["width"] * 3
    assert rows[0]["error"] is None
    assert rows[1]["error_stage"] == "decode"
    assert rows[2]["error_stage"] == "read" and "nope.png" in rows[2]["error"]
    assert rows[3]["error_stage"] == "read" and "image id" in rows[3]["error"]


def test_decode_batch_refuses_images_over_max_bytes_as_read_errors(tmp_path):
    big, small = encode(random_image(3, (80, 120))), encode(random_image(4, (20, 30)))
    assert len(small) < len(big)
    (tmp_path / "big.png").write_bytes(big)
    rows = _decoded(
        [("inline", big, None), ("file", None, str(tmp_path / "big.png")), ("small", small, None)],
        max_bytes=len(big) - 1,
    ).to_pylist()
    for row in rows[:2]:
        assert row["error_stage"] == "read" and row["pixels"] is None
        assert row["error"].startswith("TooLargeError: ") and "--max-bytes" in row["error"]
        assert f"is {len(big)} bytes, over the cap of {len(big) - 1} bytes" in row["error"]
        assert "PNG" not in row["error"] and "IHDR" not in row["error"]  # names sizes, never content
    assert "big.png" in rows[1]["error"]
    assert rows[2]["error"] is None and (rows[2]["orig_height"], rows[2]["orig_width"]) == (20, 30)
    unlimited = _decoded([("inline", big, None)], max_bytes=None).to_pylist()[0]
    assert unlimited["error"] is None and (unlimited["orig_height"], unlimited["orig_width"]) == (80, 120)


def test_label_worker_is_a_plain_callable(config):
    worker = LabelWorker(config, num_threads=1)
    decoded = _decoded([("a", encode(random_image(5, (90, 60))), None), ("bad", b"\x00" * 10, None)])
    out = worker(decoded)
    assert out.schema == RESULT_SCHEMA
    rows = out.to_pylist()
    assert [r["image_id"] for r in rows] == ["a", "bad"]
    assert rows[0]["error"] is None and rows[0]["instances"]
    assert decode_mask(rows[0]["instances"][0]["mask"]).shape == (90, 60)  # original resolution
    assert rows[1]["error_stage"] == "decode" and rows[1]["instances"] is None


def test_label_worker_names_the_ray_node_it_runs_on(config, ray_session):
    worker = LabelWorker(config)  # in this process, which has joined the session's Ray
    assert worker.node_id == ray_session.get_runtime_context().get_node_id()
    out = worker(_decoded([("a", encode(random_image(5, (40, 40))), None)]))
    assert out["node_id"].to_pylist() == [worker.node_id]


def test_label_worker_isolates_an_image_that_fails_in_the_models(config, monkeypatch):
    worker = LabelWorker(config)
    decoded = _decoded([(f"img{i}", encode(random_image(i, (40, 40))), None) for i in range(3)])
    real_detect = worker.labeler.detector.detect

    def detect(images, classes):  # the second image breaks the detector, alone or in a batch
        if any(float(img.mean()) == float(poison.mean()) for img in images):
            raise RuntimeError("boom")
        return real_detect(images, classes)

    poison = np.frombuffer(decoded["pixels"][1].as_py(), np.uint8)
    monkeypatch.setattr(worker.labeler.detector, "detect", detect)
    rows = worker(decoded).to_pylist()
    assert [r["error_stage"] for r in rows] == [None, "label", None]
    assert "boom" in rows[1]["error"]
    assert rows[0]["instances"] and rows[2]["instances"]


def test_written_parts_merge_into_one_shard_file_once(config, tmp_path):
    import pyarrow.parquet as pq

    out = str(tmp_path)
    worker = LabelWorker(config)
    first = worker(_decoded([("a", encode(random_image(7)), None), ("b", b"junk", None)]))
    second = worker(_decoded([("c", encode(random_image(8)), None)]))
    stats = write_parts(first, out=out).to_pylist()
    assert stats == [{"shard": "00000", "node_id": worker.node_id, "images": 2}]  # None outside Ray
    assert finalize_shard(out, "00000", expected_images=3) is None  # "c" has not arrived yet
    write_parts(first, out=out)  # a retried batch rewrites its own part
    write_parts(second, out=out)
    marker = finalize_shard(out, "00000", expected_images=3)

    masks = pq.read_table(tmp_path / "masks")
    images = pq.read_table(tmp_path / "images")
    errors = pq.read_table(tmp_path / "errors")
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["part-00000.parquet"]
    assert images["image_id"].to_pylist() == ["a", "b", "c"]
    assert errors["image_id"].to_pylist() == ["b"]
    pairs = list(zip(masks["image_id"].to_pylist(), masks["instance_id"].to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs)) and {i for i, _ in pairs} == {"a", "c"}
    assert marker["images"] == 3 and marker["instances"] == masks.num_rows and marker["errors"] == 1
    assert marker["errors_by_stage"] == {"decode": 1}
    assert not (tmp_path / "_tmp" / "shard-00000").exists()
    assert torch.tensor(masks["instance_id"].to_pylist()).min() == 0


def test_given_boxes_skip_the_detector(config):
    boxes_config = config.model_copy(update={"prompts": "boxes", "classes": []})
    worker = LabelWorker(boxes_config)
    assert worker.labeler.detector is None
    batch = pa.Table.from_pylist(
        [
            {"shard": "0", "image_id": "a", "image": encode(random_image(1, (80, 100))), "uri": None,
             "boxes": [[10, 10, 50, 40], [0, 0, 100, 80]], "labels": ["cat", "dog"]},
            {"shard": "0", "image_id": "b", "image": encode(random_image(2)), "uri": None,
             "boxes": None, "labels": None},
        ],
        schema=SOURCE_SCHEMA,
    )  # fmt: skip
    rows = worker(decode_batch(batch, max_side=64)).to_pylist()
    instances = rows[0]["instances"]
    assert [i["label"] for i in instances] == ["cat", "dog"] and [i["score"] for i in instances] == [1.0, 1.0]
    assert [round(v, 3) for v in instances[0]["box"]] == [10, 10, 50, 40]  # back in original pixels
    assert decode_mask(instances[1]["mask"]).shape == (80, 100)
    assert rows[1]["error_stage"] == "read" and "no boxes" in rows[1]["error"]
