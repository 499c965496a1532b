"""The labeling job end to end on the session's 2-CPU Ray, with tiny random models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import encode, random_image

from hqlabel.jobs.cli import main
from hqlabel.jobs.label import run_label_job
from hqlabel.jobs.spec import LabelJobSpec
from hqlabel.platform.config import LabelerConfig
from hqlabel.platform.rle import decode_mask
from hqlabel.platform.schema import ERRORS_SCHEMA, MASKS_SCHEMA

pytestmark = pytest.mark.timeout(240)

CLASSES = ["cat", "dog"]


def _spec(input_path, out, **kwargs) -> LabelJobSpec:
    labeler = LabelerConfig(classes=CLASSES, preset="tiny-random", box_threshold=0.3)
    kwargs.setdefault("batch_size", 2)
    return LabelJobSpec(input=str(input_path), out=str(out), labeler=labeler, **kwargs)


def _image_sizes(folder: Path) -> dict[str, tuple[int, int]]:
    from PIL import Image

    return {
        p.relative_to(folder).as_posix(): Image.open(p).size[::-1]
        for p in folder.rglob("*")
        if p.is_file() and p.suffix != ".txt"
    }


def test_folder_job_writes_the_contract(ray_session, image_folder, tmp_path):
    good = set(_image_sizes(image_folder))
    sizes = _image_sizes(image_folder)
    (image_folder / "sub" / "broken.jpg").write_bytes(encode(random_image(9), "JPEG")[:200])  # truncated
    (image_folder / "notes.txt").write_text("not an image, not listed")
    out = tmp_path / "labels"

    summary = run_label_job(_spec(image_folder, out), progress=False)

    masks = pq.read_table(out / "masks")
    errors = pq.read_table(out / "errors")
    images = pq.read_table(out / "images")
    assert sorted(images["image_id"].to_pylist()) == sorted([*good, "sub/broken.jpg"])
    assert masks.schema.remove_metadata() == MASKS_SCHEMA
    assert errors.schema.remove_metadata() == ERRORS_SCHEMA
    assert errors.select(["image_id", "stage"]).to_pylist() == [
        {"image_id": "sub/broken.jpg", "stage": "decode"}
    ]
    assert set(masks["image_id"].to_pylist()) == good  # every good image labeled (random models fire)
    assert (summary.images, summary.errors, summary.instances) == (len(good) + 1, 1, masks.num_rows)

    for row in masks.to_pylist():
        mask = decode_mask(row["mask"])
        assert mask.shape == sizes[row["image_id"]]
        assert row["area"] == int(mask.sum())
        assert row["label"] in CLASSES
    pairs = list(zip(masks["image_id"].to_pylist(), masks["instance_id"].to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs)), "no instance written twice"
    for image_id in good:
        ids = sorted(k for i, k in pairs if i == image_id)
        assert ids == list(range(len(ids)))

    job = json.loads((out / "job.json").read_text())
    assert job["models"]["random_weights"] is True
    assert job["summary"]["images"] == len(good) + 1
    assert job["spec"]["labeler"]["classes"] == CLASSES
    assert {"torch", "transformers", "ray", "pyarrow"} <= set(job["versions"])
    node = ray_session.get_runtime_context().get_node_id()  # the one node of the session's Ray
    assert job["nodes"] == {
        node: {"images": len(good) + 1, "address": job["nodes"][node]["address"], "head": True}
    }


def test_parquet_input_matches_the_folder_input(ray_session, image_folder, tmp_path):
    sizes = _image_sizes(image_folder)
    ids = sorted(sizes)
    table = pa.table({"image_id": ids, "image": [(image_folder / i).read_bytes() for i in ids]})
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(table.slice(0, 2), shards / "part-0.parquet")
    pq.write_table(table.slice(2), shards / "part-1.parquet")

    # batch_size=1: Grounding DINO pads a batch to its largest image, so batch composition shifts boxes a
    # little; one image per batch makes both runs see exactly the same model inputs.
    run_label_job(_spec(shards, tmp_path / "from_parquet", batch_size=1), progress=False)
    run_label_job(_spec(image_folder, tmp_path / "from_folder", batch_size=1), progress=False)

    def rows(out):
        t = pq.read_table(out / "masks").sort_by([("image_id", "ascending"), ("instance_id", "ascending")])
        return t.to_pylist()

    from_parquet = rows(tmp_path / "from_parquet")
    assert from_parquet, "expected instances"
    assert from_parquet == rows(tmp_path / "from_folder")


def test_parquet_input_with_wrong_columns_is_rejected(ray_session, tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"id": ["a"], "bytes": [b"x"]}), path)
    with pytest.raises(ValueError, match="--image-column"):
        run_label_job(_spec(path, tmp_path / "out"), progress=False)


def test_rerun_resumes_and_other_settings_need_overwrite(ray_session, image_folder, tmp_path):
    import ray

    out = tmp_path / "out"
    limits = ray.data.DataContext.get_current().execution_options.resource_limits
    first = run_label_job(_spec(image_folder, out, shard_size=2), progress=False)
    # the job's object-store budget applies to its own pipeline only
    assert ray.data.DataContext.get_current().execution_options.resource_limits == limits
    masks_before = pq.read_table(out / "masks")
    again = run_label_job(_spec(image_folder, out, shard_size=2), progress=False)
    assert again.images_this_run == 0 and again.instances == first.instances  # every shard was done
    assert pq.read_table(out / "masks").equals(masks_before)

    # A job.json from an older HQLabel, without labeler fields added since (at their defaults), resumes too.
    job = json.loads((out / "job.json").read_text())
    for field in ("precision", "compile", "preprocess"):
        del job["spec"]["labeler"][field]
    (out / "job.json").write_text(json.dumps(job))
    assert run_label_job(_spec(image_folder, out, shard_size=2), progress=False).images_this_run == 0

    other = _spec(image_folder, out, shard_size=2)
    other = other.model_copy(update={"labeler": other.labeler.model_copy(update={"box_threshold": 0.9})})
    with pytest.raises(ValueError, match="--overwrite"):
        run_label_job(other, progress=False)
    replaced = run_label_job(other.model_copy(update={"overwrite": True}), progress=False)
    assert replaced.images_this_run == first.images
    assert pq.read_table(out / "masks").num_rows == replaced.instances


def test_cli_label_runs_and_summarises(ray_session, image_folder, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(
        [
            *[
                "label",
                str(image_folder),
                "--classes",
                "cat, dog",
                "--out",
                str(out),
                "--preset",
                "tiny-random",
            ],
            *["--box-threshold", "0.3", "--hq-token-only", "--batch-size", "3", "--no-progress"],
            *["--max-bytes", "1000000"],  # every image is far smaller
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert "labeled 5 images" in captured.out and str(out) in captured.out
    assert "meaningless" in captured.err  # the random-weights warning
    job = json.loads((out / "job.json").read_text())
    assert job["spec"]["labeler"]["hq_token_only"] is True
    assert job["spec"]["max_bytes"] == 1_000_000
    assert pq.read_table(out / "masks").num_rows == job["summary"]["instances"]


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    code = main(["label", str(tmp_path / "missing"), "--classes", "cat", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("hqlabel: error:") and "missing" in err and "Traceback" not in err


def test_cli_names_the_missing_model_and_the_fix(image_folder, tmp_path):
    """The real command, offline, with a model that is neither local nor cached: one actionable line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "hqlabel", "label", str(image_folder), "--classes", "cat"]
    cmd += ["--out", str(tmp_path / "o"), "--detector", "no-such-org/no-such-detector"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no-such-org/no-such-detector" in result.stderr and "--detector" in result.stderr
    assert "tiny-random" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists(), "nothing is written when the job cannot start"


def test_hq_weights_relabel_with_the_same_boxes_and_new_masks(ray_session, image_folder, tmp_path):
    import torch

    from hqlabel.segmenters import tiny_random_sam_hq
    from hqlabel.segmenters.hq_weights import hq_weights_revision, is_hq_parameter, save_hq_weights

    model = tiny_random_sam_hq().model
    with torch.no_grad():
        torch.manual_seed(123)
        for name, param in model.named_parameters():
            if is_hq_parameter(name):
                param.normal_(0, 0.2)
    weights = save_hq_weights(model, tmp_path / "hq.safetensors", base_model="tiny-random")

    base = _spec(image_folder, tmp_path / "base")
    tuned = base.model_copy(
        update={
            "out": str(tmp_path / "tuned"),
            "labeler": base.labeler.model_copy(update={"hq_weights": str(weights)}),
        }
    )
    run_label_job(base, progress=False)
    run_label_job(tuned, progress=False)

    def table(out):
        return pq.read_table(out / "masks").sort_by([("image_id", "ascending"), ("instance_id", "ascending")])

    before, after = table(tmp_path / "base"), table(tmp_path / "tuned")
    detector_columns = ["image_id", "instance_id", "label", "score", "box"]
    assert before.select(detector_columns).equals(after.select(detector_columns))
    assert before["mask"].to_pylist() != after["mask"].to_pylist()
    job = json.loads((tmp_path / "tuned" / "job.json").read_text())
    assert job["spec"]["labeler"]["hq_weights"] == str(weights)
    recorded = job["spec"]["labeler"]["hq_weights_revision"]
    assert recorded == hq_weights_revision(weights) and recorded.startswith("sha256:")

    # The same path, retrained since: resuming would mix two models' masks in one output.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_hq_parameter(name):
                param.add_(0.01)
    save_hq_weights(model, weights, base_model="tiny-random")
    with pytest.raises(ValueError, match=r"different settings.*hq_weights_revision.*--overwrite"):
        run_label_job(tuned, progress=False)
    pinned = tuned.labeler.model_copy(update={"hq_weights_revision": recorded})
    with pytest.raises(ValueError, match=r"--hq-weights: .* has changed"):
        run_label_job(tuned.model_copy(update={"labeler": pinned, "overwrite": True}), progress=False)
    assert json.loads((tmp_path / "tuned" / "job.json").read_text()) == job  # nothing was touched
