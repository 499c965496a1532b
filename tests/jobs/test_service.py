"""The warm labeling service (``hqlabel serve`` / ``label --service``) on a real local Ray cluster.

One driver process (a subprocess: the test session's own Ray stays apart) runs the commands in order on a
2-CPU head: status with none, start, a second start refused, two jobs on the service, segment --service
(twice, and with another segmenter: refused), a review --service click fix over HTTP (and a job with another
segmenter: refused), a job from a fresh CLI process, one failing at run time and one cancelled by Ctrl-C (all
in the service's job runner), a job with the runner gone, a job whose models differ refused, stop, status and
a service job with none, then the same job without the service.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import encode, random_image
from local_ray import LocalRayCluster
from PIL import Image

from hqlabel.jobs.cli import main
from hqlabel.platform.config import (
    MODEL_FIELDS,
    PER_JOB_FIELDS,
    SEGMENTER_FIELDS,
    LabelerConfig,
    model_differences,
    segmenter_differences,
)
from hqlabel.platform.rle import decode_mask

# One driver does the whole sequence (two model loads, a warm-up, seven jobs, three segment and one review
# command): about two minutes on a quiet 2-core machine.
pytestmark = pytest.mark.timeout(600)

DRIVER = r"""
import contextlib, io, json, os, shutil, signal, subprocess, sys, time, urllib.request
import ray
from hqlabel.jobs import service, service_runner
from hqlabel.jobs.cli import main

address, images, tmp = sys.argv[1:4]
job = ["label", images, "--classes", "circle, square", "--preset", "tiny-random", "--device", "cpu",
       "--no-progress", "--address", address]
model = ["--preset", "tiny-random", "--device", "cpu", "--address", address]
out = {"address": address}

def run(name, argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        out[name] = {"rc": main(argv), "stderr": err.getvalue()}

run("status_none", ["serve", "status", "--address", address])
run("start", ["serve", "start", *model])
out["state"] = service.read_state()
run("start_again", ["serve", "start", *model])
run("job1", [*job, "--out", f"{tmp}/service1", "--service"])
out["info1"] = service.service_status(address)["workers"]
run("job2", [*job, "--out", f"{tmp}/service2", "--service", "--box-threshold", "0.3"])
out["info2"] = service.service_status(address)["workers"]

# segment --service: the CLI in a process of its own (no model, no transformers), then here (the same image:
# its embeddings are cached), then with other segmenter settings (refused)
seg = ["segment", f"{tmp}/photo.png", "--box", "10,20,60,70", "--box", "50,5,110,80",
       "--preset", "tiny-random", "--service", "--address", address]
code = ("import json, sys\nfrom hqlabel.jobs.cli import main\nrc = main(sys.argv[1:])\n"
        "heavy = sorted({'transformers', 'hqlabel.segmenters'} & set(sys.modules))\n"
        "print('SEGMENT ' + json.dumps([rc, heavy]))")
done = subprocess.run([sys.executable, "-c", code, *seg, "--out", f"{tmp}/seg_service"], capture_output=True,
                      text=True)
lines = [l for l in done.stdout.splitlines() if l.startswith("SEGMENT ")]
out["segment_cli"] = json.loads(lines[-1].removeprefix("SEGMENT ")) if lines else done.stderr[-3000:]
run("segment_again", [*seg, "--out", f"{tmp}/seg_again"])
run("segment_mismatch", [*seg, "--multimask", "best", "--out", f"{tmp}/seg_mismatch"])

# review --service: the CLI's HTTP API, one click fix on the service; a job with another segmenter refused
labels = f"{tmp}/service2"
review = subprocess.Popen([sys.executable, "-m", "hqlabel", "review", labels, "--port", "0",
                           "--reviewer", "t", "--service", "--address", address],
                          stdout=subprocess.PIPE, text=True)
try:
    first = review.stdout.readline()
    base = first.split(" at ")[1].split("/;")[0]
    item = json.loads(urllib.request.urlopen(base + "/api/items?limit=1", timeout=60).read())["items"][0]
    points = [[item["width"] / 2, item["height"] / 2, 1], [1.0, 1.0, 0]]
    body = {"image_id": item["image_id"], "instance_id": item["instance_id"], "points": points}
    request = urllib.request.Request(base + "/api/fix", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    out["review"] = {"item": item, "points": points,
                     "fix": json.loads(urllib.request.urlopen(request, timeout=120).read())}
finally:
    review.terminate()
    review.wait(timeout=30)
other = f"{tmp}/other_labels"
shutil.copytree(labels, other, ignore=shutil.ignore_patterns("review"))
job_json = json.loads(open(f"{other}/job.json").read())
job_json["spec"]["labeler"]["hq_token_only"] = True
open(f"{other}/job.json", "w").write(json.dumps(job_json))
run("review_mismatch", ["review", other, "--port", "0", "--service", "--address", address])
out["info3"] = service.service_status(address)["workers"]
out["runner1"] = service.service_status(address)["runner"]

# the job runner (hqlabel.jobs.service_runner): a fresh CLI process (light imports) whose job runs there, a
# job failing there at run time (a malformed fault point, forwarded from this environment), then without it
code = ("import json, sys\nfrom hqlabel.jobs.cli import main\nrc = main(sys.argv[1:])\n"
        "print('CLI ' + json.dumps([rc, sorted({'torch', 'transformers'} & set(sys.modules))]))")
done = subprocess.run([sys.executable, "-c", code, *job, "--out", f"{tmp}/service3", "--service",
                       "--box-threshold", "0.3"], capture_output=True, text=True)
lines = [l for l in done.stdout.splitlines() if l.startswith("CLI ")]
out["cli"] = json.loads(lines[-1].removeprefix("CLI ")) if lines else done.stderr[-3000:]
os.environ["HQLABEL_FAILPOINTS"] = "bogus"
run("fail", [*job, "--out", f"{tmp}/fail", "--service"])
del os.environ["HQLABEL_FAILPOINTS"]
# Ctrl-C while the job runs in the runner (its first batch stalls in the warm actor): cancelled there
cancel = subprocess.Popen([sys.executable, "-m", "hqlabel", *job, "--out", f"{tmp}/cancel", "--service"],
                          env=os.environ | {"HQLABEL_FAILPOINTS": "stall:demo_00000.jpg"},
                          stderr=subprocess.PIPE, text=True)
for _ in range(300):
    jobs = service_runner.runner_info()["jobs"]
    if len(jobs) == 6 and jobs[-1]["state"] == "running":
        break
    time.sleep(0.2)
cancel.send_signal(signal.SIGINT)
out["cancel"] = {"rc": cancel.wait(timeout=120), "stderr": cancel.stderr.read()}
out["runner2"] = service.service_status(address)["runner"]
ray.kill(service_runner.find_runner())  # as when its keeper exits: the job's driver runs here
run("fallback", [*job, "--out", f"{tmp}/fallback", "--service", "--box-threshold", "0.3"])
out["runner3"] = service.service_status(address)["runner"]
run("mismatch", [*job, "--out", f"{tmp}/mismatch", "--service", "--precision", "bf16"])
run("hq_mismatch", [*job, "--out", f"{tmp}/hq_mismatch", "--service", "--hq-weights", f"{tmp}/w.safetensors"])
run("stop", ["serve", "stop", "--address", address])
gone = [out["state"]["keeper_pid"], out["runner2"]["pid"], *out["runner2"]["jobs"][-1]["workers_after"]]
for _ in range(150):  # Ray ends the task workers of the keeper's job once it has ended
    out["alive_after_stop"] = [pid for pid in gone if os.path.exists(f"/proc/{pid}")]
    if not out["alive_after_stop"]:
        break
    time.sleep(0.2)
if not ray.is_initialized():  # serve stop keeps a driver's earlier connection
    ray.init(address=address, logging_level="ERROR")
named = ray.util.list_named_actors(all_namespaces=True)  # Ray Data's own actors live elsewhere
out["named_after_stop"] = [a["name"] for a in named if a["namespace"] == service.NAMESPACE]
run("status_after", ["serve", "status", "--address", address])
run("no_service", [*job, "--out", f"{tmp}/none", "--service"])
run("plain", [*job, "--out", f"{tmp}/plain", "--box-threshold", "0.3"])
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def service_run(tmp_path_factory):
    """The driver's results and its folder, run once for the module on a 2-CPU head."""
    from hqlabel.platform.demo import make_demo_images

    tmp = tmp_path_factory.mktemp("service")
    make_demo_images(tmp / "images", 12, size=(96, 128))
    (tmp / "photo.png").write_bytes(encode(random_image(4, (90, 120))))
    from hqlabel.segmenters import tiny_random_sam_hq
    from hqlabel.segmenters.hq_weights import save_hq_weights

    save_hq_weights(tiny_random_sam_hq().model, tmp / "w.safetensors", base_model="tiny-random")
    cluster = LocalRayCluster()
    try:
        address = cluster.start_head(num_cpus=2)
        env = cluster.env | {"HQLABEL_SERVICE_FILE": str(tmp / "service.json")}
        done = subprocess.run(
            [sys.executable, "-c", DRIVER, address, str(tmp / "images"), str(tmp)],
            env=env,
            capture_output=True,
            text=True,
            timeout=540,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        assert lines, f"driver failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        yield json.loads(lines[-1].removeprefix("RESULT ")), tmp
    finally:
        assert cluster.stop() == []


def test_lifecycle_start_status_stop(service_run):
    result, _ = service_run
    assert result["status_none"]["rc"] == 1
    assert result["start"]["rc"] == 0
    assert result["start_again"]["rc"] == 2
    assert "already running" in result["start_again"]["stderr"]
    assert result["stop"]["rc"] == 0
    assert result["named_after_stop"] == []  # the service actor and its labeling actors are gone
    assert result["status_after"]["rc"] == 1
    assert result["no_service"]["rc"] == 2
    assert "no labeling service is running" in result["no_service"]["stderr"]
    for info in result["info2"]:  # the actors' processes ended with the service
        with pytest.raises(ProcessLookupError):
            os.kill(info["pid"], 0)
    assert result["alive_after_stop"] == []  # the keeper, its runner and the runner's task workers ended


def test_cli_jobs_run_in_the_warm_runner(service_run):
    """``label --service`` jobs run their driver in the runner that ``serve start``'s keeper created and
    warmed up; each job finds the idle task workers the jobs before it left (a finished driver's would be
    gone)."""
    result, _ = service_run
    assert result["state"]["keeper_pid"] and result["state"]["keeper_dir"]
    assert result["cli"] == [0, []], result["cli"]  # a fresh CLI process: no torch, no transformers
    first, later = result["runner1"], result["runner2"]
    assert later["pid"] == first["pid"] and later["job_id"] == first["job_id"]
    jobs = later["jobs"]
    assert [job["id"] for job in jobs[:3]] == [job["id"] for job in first["jobs"]]
    states = [job["state"] for job in jobs]
    assert jobs[0]["id"] == "warm-up" and states == ["done"] * 4 + ["failed", "cancelled"]
    for before, job in itertools.pairwise(jobs[:4]):  # reused, not started again
        assert set(job["workers_before"]) & set(before["workers_after"]), (before, job)
    assert jobs[3]["done"] == jobs[3]["total"] == 12


def test_runner_error_reaches_the_cli_as_one_line(service_run):
    result, tmp = service_run
    assert result["fail"]["rc"] == 2
    errors = [line for line in result["fail"]["stderr"].splitlines() if line.startswith("hqlabel: error:")]
    assert errors == [
        "hqlabel: error: HQLABEL_FAILPOINTS: 'bogus' is not ACTION:IMAGE_ID with ACTION one of ('exit', "
        "'device', 'stall')"
    ]
    assert "Traceback" not in result["fail"]["stderr"]
    assert not (tmp / "fail").exists()  # a new run that failed leaves nothing behind


def test_ctrl_c_cancels_the_job_in_the_runner(service_run):
    result, tmp = service_run
    assert result["cancel"]["rc"] == 130
    assert result["cancel"]["stderr"].rstrip().endswith("hqlabel: interrupted")
    assert not (tmp / "cancel").exists()  # a new run stopped before any shard completed leaves nothing


def test_job_without_runner_runs_its_driver_in_the_cli(service_run):
    result, _ = service_run
    assert result["fallback"]["rc"] == 0
    assert "has no job runner" in result["fallback"]["stderr"]
    assert result["runner3"] is None


def test_two_jobs_reuse_the_warm_actor(service_run):
    result, _ = service_run
    assert result["job1"]["rc"] == 0 and result["job2"]["rc"] == 0
    (first,), (second,) = result["info1"], result["info2"]
    assert first["pid"] == second["pid"]
    assert first["loads"] == second["loads"] == 1  # models loaded once, for both jobs
    assert second["batches"] > first["batches"] > 0
    assert len(second["first_batch"]) == len(first["first_batch"]) + 1  # one entry per job run


def test_model_mismatch_is_refused(service_run):
    result, tmp = service_run
    assert result["mismatch"]["rc"] == 2
    assert "precision: service 'auto', job 'bf16'" in result["mismatch"]["stderr"]
    assert not (tmp / "mismatch" / "masks").exists()
    # HQ weights the service did not load: named by path and by the file's digest (service.attach pins it)
    from hqlabel.segmenters.hq_weights import hq_weights_revision

    stderr = result["hq_mismatch"]["stderr"]
    assert result["hq_mismatch"]["rc"] == 2 and not (tmp / "hq_mismatch" / "masks").exists()
    revision = hq_weights_revision(tmp / "w.safetensors")
    assert f"hq_weights_revision: service None, job {revision!r}" in stderr


def test_service_output_matches_a_plain_job(service_run):
    result, tmp = service_run
    assert result["plain"]["rc"] == 0

    def rows(out):
        table = pq.read_table(tmp / out / "masks")
        return table.sort_by([("image_id", "ascending"), ("instance_id", "ascending")]).to_pylist()

    plain = rows("plain")
    assert plain, "expected instances"
    assert rows("service2") == plain  # same models and thresholds: the same rows, none lost or repeated
    assert rows("service3") == plain  # the same job from a fresh CLI process, in the runner
    assert rows("fallback") == plain  # the same job with its driver in the CLI (no runner)
    assert rows("service1") != plain  # another box threshold, applied by the same warm actor
    job = json.loads((tmp / "service2" / "job.json").read_text())
    assert job["summary"]["images"] == 12 and job["spec"]["service"] is True


def test_model_fields_and_differences():
    assert set(MODEL_FIELDS) | set(PER_JOB_FIELDS) == set(LabelerConfig.model_fields)
    service = LabelerConfig(classes=["object"], preset="tiny-random", device="cpu")
    job = LabelerConfig(classes=["cat"], preset="tiny-random", device="cpu", box_threshold=0.1)
    assert model_differences(service, job) == []
    other = job.model_copy(update={"segmenter": "other/sam"})
    assert model_differences(service, other) == [f"segmenter: service {service.segmenter!r}, job 'other/sam'"]
    boxes = service.model_copy(update={"prompts": "boxes"})
    assert "no detector" in model_differences(boxes, job)[0]
    assert set(SEGMENTER_FIELDS) < set(MODEL_FIELDS)
    assert segmenter_differences(boxes, job) == []  # a boxes-only service still segments for the job
    pinned = service.model_copy(update={"segmenter_revision": "abc"})
    assert segmenter_differences(pinned, job) == []  # no revision asked for: the service's
    assert segmenter_differences(pinned, {"segmenter_revision": "def", "multimask": "best"}) == [
        "segmenter_revision: service 'abc', caller 'def'",
        "multimask: service 'off', caller 'best'",
    ]
    tuned = service.model_copy(update={"hq_weights": "w.safetensors", "hq_weights_revision": "sha256:a"})
    retrained = tuned.model_copy(update={"hq_weights_revision": "sha256:b"})
    assert model_differences(tuned, retrained) == ["hq_weights_revision: service 'sha256:a', job 'sha256:b'"]
    assert segmenter_differences(tuned, retrained) == [
        "hq_weights_revision: service 'sha256:a', caller 'sha256:b'"
    ]
    assert segmenter_differences(tuned, {"hq_weights": "w.safetensors", "hq_weights_revision": None}) == []


def test_service_job_without_a_service_is_refused(tmp_path, monkeypatch, capsys, image_folder):
    monkeypatch.setenv("HQLABEL_SERVICE_FILE", str(tmp_path / "none.json"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv = ["label", str(image_folder), "--classes", "a", "--preset", "tiny-random", "--service"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "no labeling service is running" in capsys.readouterr().err


def test_segment_on_the_service_matches_a_local_segment(service_run):
    """``segment --service`` writes what the local command writes (same masks, same predicted IoU), loads no
    model, and records the service; other segmenter settings are refused in one line."""
    result, tmp = service_run
    assert result["segment_cli"] == [0, []], result["segment_cli"]  # no segmenter module, no transformers
    assert result["segment_again"]["rc"] == 0
    local = tmp / "seg_local"
    argv = ["segment", str(tmp / "photo.png"), "--box", "10,20,60,70", "--box", "50,5,110,80"]
    assert main([*argv, "--preset", "tiny-random", "--device", "cpu", "--out", str(local)]) == 0
    expected = json.loads((local / "photo_masks.json").read_text())
    assert expected["service"] is None
    for out in ("seg_service", "seg_again"):
        record = json.loads((tmp / out / "photo_masks.json").read_text())
        assert record["masks"] == expected["masks"] == ["photo_mask_0.png", "photo_mask_1.png"]
        assert record["pred_iou"] == expected["pred_iou"]
        assert record["service"]["address"] == result["address"] and record["random_weights"] is True
        assert record["service"]["models"]["preset"] == "tiny-random"
        for name in record["masks"]:
            mine, theirs = (np.asarray(Image.open(folder / name)) for folder in (tmp / out, local))
            assert np.array_equal(mine, theirs) and 0 < mine.sum() < mine.size * 255
        assert (tmp / out / "photo_overlay.png").is_file()
    mismatch = result["segment_mismatch"]
    assert mismatch["rc"] == 2 and "multimask: service 'off', caller 'best'" in mismatch["stderr"]
    assert "segment without --service" in mismatch["stderr"]
    assert not (tmp / "seg_mismatch").exists()


def test_review_click_fix_on_the_service_matches_the_local_fixer(service_run):
    result, tmp = service_run
    from hqlabel.review.fix import Fixer
    from hqlabel.review.items import ReviewItems
    from hqlabel.review.store import read_review

    review = result["review"]
    item, points = review["item"], review["points"]
    key = (item["image_id"], item["instance_id"])
    saved = read_review(str(tmp / "service2" / "review"))[key]
    assert saved.corrected and saved.points == points and saved.area == review["fix"]["area"]
    items = ReviewItems(str(tmp / "service2"))
    fixer = Fixer(items.spec["labeler"], "cpu")
    rle, area, iou = fixer.fix(item["image_id"], items.image(item["image_id"]), item["box"], points)
    assert np.array_equal(decode_mask(saved.mask), decode_mask(rle))
    assert (area, iou) == (review["fix"]["area"], review["fix"]["pred_iou"])
    mismatch = result["review_mismatch"]
    assert mismatch["rc"] == 2 and "hq_token_only: service False, caller True" in mismatch["stderr"]
    assert "review without --service" in mismatch["stderr"]


def test_one_model_load_serves_jobs_segments_and_fixes(service_run):
    result, _ = service_run
    (before,), (after,) = result["info2"], result["info3"]
    assert after["pid"] == before["pid"] and after["loads"] == 1
    assert after["batches"] == before["batches"] > 0
    assert (before["segments"], after["segments"]) == (0, 3)  # two segment commands, one click fix
    assert after["encodes"] == 2  # the second segment of the same image found its embeddings
    assert after["images"] == 2  # ... and was sent without its pixels (the fix's image was sent once)
