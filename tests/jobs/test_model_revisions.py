"""Hub models are pinned to commits: resolved once through the real Hugging Face cache (offline), recorded in
``job.json``, and reused by a resumed run although the hub's ``main`` has moved since.

The cache is a real ``HF_HUB_CACHE`` layout, ``models--hqlabel-test--tiny-sam-hq/refs/main`` and
``snapshots/COMMIT/`` holding a tiny random SAM-HQ saved with ``save_pretrained`` (two commits, different
weights), read with ``HF_HUB_OFFLINE=1`` by ``huggingface_hub`` and transformers themselves. Those read their
settings when imported, so everything runs in subprocesses (the jobs with a local Ray of their own).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import encode, random_image

from hqlabel.segmenters import tiny_random_sam_hq

pytestmark = pytest.mark.timeout(300)

REPO = "hqlabel-test/tiny-sam-hq"
COMMIT_A = "a1" * 20
COMMIT_B = "b2" * 20
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """``HF_HUB_CACHE`` with ``REPO`` at two commits (seeds 0 and 1), ``main`` pointing at ``COMMIT_A``."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    for seed, commit in enumerate((COMMIT_A, COMMIT_B)):
        tiny_random_sam_hq(seed=seed).save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT_A)
    return cache


def _env(cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "RAY_ADDRESS": "local",  # a local Ray of its own, not the test session's
        "PYTHONPATH": str(ROOT),
    }


def _python(cache: Path, code: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", code], env=_env(cache), capture_output=True, text=True, timeout=240, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_hub_id_resolves_to_the_commit_of_main_and_loads_each_commit_offline(hub):
    found = _python(
        hub,
        f"""
import json, torch
from hqlabel.platform.hub import model_revision
from hqlabel.segmenters import HQSamSegmenter
a = HQSamSegmenter.from_pretrained("{REPO}", revision="{COMMIT_A}", device="cpu").model.state_dict()
b = HQSamSegmenter.from_pretrained("{REPO}", revision="{COMMIT_B}", device="cpu").model.state_dict()
main = HQSamSegmenter.from_pretrained("{REPO}", device="cpu").model.state_dict()
same = lambda x, y: all(torch.equal(x[k], y[k]) for k in x)
from hqlabel import Labeler  # the Python API records what it loaded, as a job does
api = Labeler.from_pretrained(segmenter="{REPO}", device="cpu").config
print(json.dumps({{"revision": model_revision("{REPO}", what="segmenter", option="--segmenter"),
                  "main_is_a": same(main, a), "a_is_b": same(a, b),
                  "api": [api.segmenter_revision, api.detector_revision, api.hq_weights_revision]}}))
""",
    )
    assert found == {"revision": COMMIT_A, "main_is_a": True, "a_is_b": False, "api": [COMMIT_A, None, None]}


def test_local_directory_is_pinned_by_a_fingerprint_of_its_files(tmp_path):
    from hqlabel.platform.hub import model_revision

    (tmp_path / "config.json").write_text("{}")
    before = model_revision(str(tmp_path), what="segmenter", option="--segmenter")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    after = model_revision(str(tmp_path), what="segmenter", option="--segmenter")
    assert before.startswith("files:") and after.startswith("files:") and before != after


def _dataset(root: Path) -> Path:
    """Two Parquet shards of two images each, with given boxes (``--prompts boxes``: no detector)."""
    root.mkdir()
    for shard in range(2):
        ids = [f"{shard}-{k}" for k in range(2)]
        images = [encode(random_image(10 * shard + k, (40, 48))) for k in range(2)]
        boxes = [[[4.0, 4.0, 30.0, 28.0], [10.0, 2.0, 44.0, 36.0]] for _ in ids]
        labels = [["a", "b"] for _ in ids]
        table = pa.table({"image_id": ids, "image": images, "boxes": boxes, "labels": labels})
        pq.write_table(table, root / f"part-{shard}.parquet")
    return root


def test_job_records_the_commit_and_a_resumed_run_keeps_it_after_main_moved(hub, tmp_path):
    """Three runs into one output in one subprocess (one local Ray): the first; a resumed one after ``main``
    moved to B (other weights) with shard 00001 to redo, which must label it with A; one asking for B."""
    data, out = _dataset(tmp_path / "data"), tmp_path / "out"
    refs = hub / f"models--{REPO.replace('/', '--')}" / "refs" / "main"
    found = _python(
        hub,
        f"""
import json, pathlib, ray
import pyarrow.parquet as pq
from hqlabel.jobs.label import run_label_job
from hqlabel.jobs.spec import LabelJobSpec
from hqlabel.platform.config import LabelerConfig

ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
out = pathlib.Path("{out}")
def run(**labeler):
    config = LabelerConfig(prompts="boxes", segmenter="{REPO}", **labeler)
    run_label_job(LabelJobSpec(input="{data}", out=str(out), labeler=config, batch_size=1), progress=False)
    job = json.loads((out / "job.json").read_text())
    masks = pq.read_table(out / "masks").sort_by([("image_id", "ascending"), ("instance_id", "ascending")])
    return job["spec"]["labeler"]["segmenter_revision"], job["models"]["segmenter_revision"], masks
first = run()
pathlib.Path("{refs}").write_text("{COMMIT_B}")
(out / "_done" / "00001.json").unlink()
resumed = run()
try:
    run(segmenter_revision="{COMMIT_B}")
    refused = ""
except ValueError as e:
    refused = str(e)
print(json.dumps({{"first": first[:2], "resumed": resumed[:2], "same_masks": first[2].equals(resumed[2]),
                  "masks": first[2].num_rows, "refused": refused}}))
""",
    )
    assert (found["first"], found["resumed"]) == ([COMMIT_A] * 2, [COMMIT_A] * 2)
    assert found["same_masks"] and found["masks"] == 8  # 4 images, 2 boxes each
    assert (
        f"different settings (labeler.segmenter_revision: {COMMIT_A!r} -> {COMMIT_B!r})" in found["refused"]
    )


def test_resume_with_changed_local_model_files_is_refused(tmp_path):
    """Ray-free: what ``run_label_job`` does before Ray starts (pin the models, prepare the output)."""
    from hqlabel.jobs.label import check_models, prepare_output
    from hqlabel.jobs.spec import LabelJobSpec
    from hqlabel.platform.config import LabelerConfig

    model = tmp_path / "model"
    tiny_random_sam_hq(seed=0).save_pretrained(model)
    labeler = LabelerConfig(prompts="boxes", segmenter=str(model))
    spec = check_models(
        LabelJobSpec(input=str(_dataset(tmp_path / "data")), out=str(tmp_path / "out"), labeler=labeler)
    )
    prepare_output(spec)
    (tmp_path / "out" / "job.json").write_text(json.dumps({"spec": spec.model_dump(mode="json")}))
    assert check_models(spec.model_copy(update={"labeler": labeler})) == spec  # unchanged: the same pin

    (model / "config.json").write_text((model / "config.json").read_text() + "\n")  # the model changed
    changed = r"different settings \(labeler\.segmenter_revision: .files:\w+. -> .files:\w+.\)"
    with pytest.raises(ValueError, match=changed):
        prepare_output(check_models(spec.model_copy(update={"labeler": labeler})))
