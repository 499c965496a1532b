"""Crashes in the middle of a labeling job: a model actor killed by the OS; the whole command killed, rerun.

Every run here uses ``batch_size=1``, so an image's result does not depend on which images share its batch
and an interrupted job can be compared row for row with an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import pyarrow.parquet as pq
import pytest
from conftest import encode, random_image

from hqlabel.jobs.cli import main
from hqlabel.jobs.label import LabelSummary, run_label_job
from hqlabel.jobs.spec import LabelJobSpec
from hqlabel.platform.config import LabelerConfig

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads processes from /proc"),
]

NUM_IMAGES = (
    48  # the label step's output is written 32 images at a time: two writes, so a job can stop between
)
CLASSES = "cat, dog"
BOX_THRESHOLD = 0.3


def _spec(input_path: Path, out: Path, shard_size: int) -> LabelJobSpec:
    """What ``hqlabel label INPUT --classes 'cat, dog' --preset tiny-random --box-threshold 0.3
    --shard-size N --batch-size 1`` runs."""
    labeler = LabelerConfig(classes=CLASSES, preset="tiny-random", box_threshold=BOX_THRESHOLD)
    return LabelJobSpec(
        input=str(input_path), out=str(out), labeler=labeler, shard_size=shard_size, batch_size=1
    )


def _results(out: Path) -> dict[str, list[dict]]:
    """The job's three tables as rows, in a canonical order (independent of shards and arrival order)."""
    keys = {"masks": ["image_id", "instance_id"], "errors": ["image_id"], "images": ["image_id"]}
    return {
        name: pq.read_table(out / name).sort_by([(k, "ascending") for k in by]).to_pylist()
        for name, by in keys.items()
    }


class Process(NamedTuple):
    name: str
    ppid: int
    session: int
    state: str  # "Z": a zombie, already dead


def _processes() -> dict[int, Process]:
    """Every process, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid, _pgrp, session = stat[stat.rindex(")") + 2 :].split()[:4]
        found[int(entry.name)] = Process(name, int(ppid), int(session), state)
    return found


def _raylets(**where: int) -> set[int]:
    """Live raylets whose ``ppid`` / ``session`` are as given."""
    return {
        pid
        for pid, p in _processes().items()
        if p.name == "raylet" and p.state != "Z" and all(getattr(p, k) == v for k, v in where.items())
    }


def _alive_label_workers() -> list[dict]:
    """GCS records of the live labeling actors (Ray Data's pool actors are unnamed; the state API needs the
    dashboard, which the test session does not start, so this reads the GCS actor table directly)."""
    from ray._private.state import actors

    return [a for a in actors().values() if "LabelWorker" in a["ActorClassName"] and a["State"] == "ALIVE"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults") / "images"
    root.mkdir()
    for i in range(NUM_IMAGES):
        (root / f"img_{i:03d}.png").write_bytes(encode(random_image(i)))
    return root


@pytest.fixture(scope="module")
def reference(ray_session, dataset) -> dict[str, list[dict]]:
    """The tables an uninterrupted run writes."""
    out = dataset.parent / "reference"
    run_label_job(_spec(dataset, out, shard_size=6), progress=False)
    results = _results(out)
    assert len(results["images"]) == NUM_IMAGES and results["masks"], "the random models find instances"
    assert not results["errors"]
    return results


def _assert_every_image_once(out: Path) -> None:
    images = pq.read_table(out / "images")["image_id"].to_pylist()
    assert sorted(images) == [f"img_{i:03d}.png" for i in range(NUM_IMAGES)]
    masks = pq.read_table(out / "masks", columns=["image_id", "instance_id"]).to_pylist()
    pairs = [(m["image_id"], m["instance_id"]) for m in masks]
    assert len(pairs) == len(set(pairs)), "an instance was written twice"


def test_a_killed_label_worker_is_replaced_and_nothing_is_lost_or_doubled(
    ray_session, dataset, reference, tmp_path
):
    out = tmp_path / "out"
    outcome: dict[str, LabelSummary | BaseException] = {}

    def job() -> None:
        try:
            outcome["summary"] = run_label_job(_spec(dataset, out, shard_size=6), progress=False)
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    victim = None
    deadline = time.monotonic() + 90
    while victim is None and thread.is_alive() and time.monotonic() < deadline:
        # A first batch of results is on disk: the actor is loaded and busy with the images after it.
        if (out / "_tmp").exists() or (out / "_done").exists():
            workers = _alive_label_workers()
            if workers:
                victim = workers[0]
                os.kill(victim["Pid"], signal.SIGKILL)  # as the OOM killer or a segfault would
        time.sleep(0.02)
    if victim is None:
        thread.join(60)
        pytest.fail(f"the job ended before its labeling actor could be killed: {outcome}")
    thread.join(120)
    assert not thread.is_alive(), "the job hung after its actor was killed"
    assert "error" not in outcome, f"the job failed after its actor was killed: {outcome.get('error')!r}"

    from ray._private.state import actors

    assert actors(victim["ActorID"])["NumRestarts"] >= 1, "Ray restarted the killed actor"
    summary = outcome["summary"]
    assert (summary.images, summary.images_this_run, summary.errors) == (NUM_IMAGES, NUM_IMAGES, 0)
    _assert_every_image_once(out)
    assert _results(out) == reference
    assert not (out / "_tmp").exists()


CLI_SHARD_SIZE = 4
CLI_SHARDS = [f"{i:05d}" for i in range(NUM_IMAGES // CLI_SHARD_SIZE)]


def _cli_command(dataset: Path, out: Path) -> list[str]:
    return [
        *[sys.executable, "-m", "hqlabel", "label", str(dataset), "--classes", CLASSES, "--out", str(out)],
        *["--preset", "tiny-random", "--box-threshold", str(BOX_THRESHOLD), "--num-cpus", "2"],
        *["--shard-size", str(CLI_SHARD_SIZE), "--batch-size", "1", "--no-progress"],
    ]


def _session_processes(session: int) -> dict[int, Process]:
    return {pid: p for pid, p in _processes().items() if p.session == session and p.state != "Z"}


def _kill_session(session: int) -> None:
    """SIGKILL every process of ``session``: the command's process group (its Ray head: GCS, raylet, ...)
    and the Ray workers, which each lead a process group of their own within the session."""
    with contextlib.suppress(ProcessLookupError):  # the group is gone already
        os.killpg(session, signal.SIGKILL)
    for pid in _session_processes(session):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def interrupted(ray_session, dataset) -> dict:
    """``hqlabel label`` in a subprocess, SIGKILLed (with the Ray it started) after some shards finished.

    Returns ``out`` (to resume), ``snapshot`` (a copy of ``out`` as the crash left it) and ``markers``
    (name -> (content, mtime_ns) of the completion markers then).
    """
    root = dataset.parent / "interrupted"
    root.mkdir()
    out = root / "out"
    session_raylets = _raylets(ppid=os.getpid())  # the test session's Ray (ray.init starts it as a child)
    assert session_raylets
    env = {**os.environ, "RAY_ADDRESS": "local"}  # its own local Ray, even if a `ray start` cluster exists
    with open(root / "cli.log", "wb") as log:
        proc = subprocess.Popen(
            _cli_command(dataset, out), stdout=log, stderr=log, env=env, start_new_session=True
        )
    own_raylets: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if not own_raylets:
                own_raylets = _raylets(session=proc.pid)
            if list(out.glob("_done/*.json")):
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            _kill_session(proc.pid)
        proc.wait(30)
    log_text = (root / "cli.log").read_text(errors="replace")[-3000:]
    assert proc.returncode == -signal.SIGKILL, f"the command ended before it was killed:\n{log_text}"
    markers = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted((out / "_done").glob("*.json"))}
    assert 0 < len(markers) < len(CLI_SHARDS), f"not a partial run: {sorted(markers)}"

    # The command ran a Ray of its own (not the test session's), and nothing of it outlives the kill.
    assert own_raylets, "the command started its own raylet"
    deadline = time.monotonic() + 30
    while (left := _session_processes(proc.pid)) and time.monotonic() < deadline:
        _kill_session(proc.pid)
        time.sleep(0.2)
    assert not left, f"processes of the killed command are still running: {left}"
    assert _raylets(ppid=os.getpid()) == session_raylets, "the test session's Ray is untouched"

    snapshot = root / "snapshot"
    shutil.copytree(out, snapshot)
    return {"out": out, "snapshot": snapshot, "markers": markers}


def test_b_rerun_after_a_crash_finishes_only_the_unfinished_shards(
    ray_session, dataset, reference, interrupted
):
    out, markers = interrupted["out"], interrupted["markers"]
    finished = [name.removesuffix(".json") for name in markers]
    parts = {
        (table, shard): (out / table / f"part-{shard}.parquet").stat().st_mtime_ns
        for table in ("masks", "errors", "images")
        for shard in finished
    }
    images_before = sum(pq.read_table(out / "images" / f"part-{s}.parquet").num_rows for s in finished)

    # The same command as the killed one, in process: `hqlabel label` resumes when given the same settings.
    summary = run_label_job(_spec(dataset, out, shard_size=CLI_SHARD_SIZE), progress=False)

    assert (summary.images, summary.errors) == (NUM_IMAGES, 0)
    assert summary.images_this_run == NUM_IMAGES - images_before, "finished shards were not redone"
    for name, (content, mtime) in markers.items():
        marker = out / "_done" / name
        assert (marker.read_bytes(), marker.stat().st_mtime_ns) == (content, mtime), f"{name} was rewritten"
    for (table, shard), mtime in parts.items():
        assert (out / table / f"part-{shard}.parquet").stat().st_mtime_ns == mtime, f"{table} {shard} redone"
    assert sorted(p.stem for p in (out / "_done").glob("*.json")) == CLI_SHARDS
    assert not (out / "_tmp").exists()
    _assert_every_image_once(out)
    assert _results(out) == reference


def test_c_status_of_an_interrupted_job_lists_the_pending_shards(interrupted, capsys):
    done = sorted(name.removesuffix(".json") for name in interrupted["markers"])
    pending = [s for s in CLI_SHARDS if s not in done]

    assert main(["status", str(interrupted["snapshot"])]) == 0
    text = capsys.readouterr().out
    assert f"{len(done)}/{len(CLI_SHARDS)} done, {len(pending)} pending" in text
    assert f"images:    {len(done) * CLI_SHARD_SIZE}/{NUM_IMAGES} labeled" in text
    pending_line = next(line for line in text.splitlines() if line.strip().startswith("pending:"))
    assert all(s in pending_line for s in pending[:10]) and not any(s in pending_line for s in done)
    assert "rerun" in pending_line


def test_c_status_of_a_folder_without_a_job_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("not a job")
    assert main(["status", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert err.startswith("hqlabel: error:") and "\n" not in err and str(tmp_path) in err
    assert "Traceback" not in err


# Faults inside the labeling actor, made for real by fault points (HQLABEL_FAILPOINTS, read by the driver and
# handed to the actors: hqlabel.workers.faults.Failpoints): a process that kills itself on one image, and a
# sticky CUDA error. A small dataset of its own: 8 images, 2 shards, batch size 1 (results comparable).

FAULT_IMAGES = 8
FAULT_SHARD_SIZE = 4
POISON = "img_002.png"  # in shard 00000


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("actor-faults") / "images"
    root.mkdir()
    for i in range(FAULT_IMAGES):
        (root / f"img_{i:03d}.png").write_bytes(encode(random_image(100 + i)))
    return root


@pytest.fixture(scope="module")
def small_reference(ray_session, small_dataset) -> dict[str, list[dict]]:
    """The tables a fault-free run writes."""
    out = small_dataset.parent / "reference"
    run_label_job(_spec(small_dataset, out, shard_size=FAULT_SHARD_SIZE), progress=False)
    results = _results(out)
    assert len(results["images"]) == FAULT_IMAGES and not results["errors"]
    assert any(m["image_id"] == POISON for m in results["masks"]), "the random models find instances"
    return results


def _without(results: dict[str, list[dict]], image_id: str) -> dict[str, list[dict]]:
    return {name: [r for r in rows if r["image_id"] != image_id] for name, rows in results.items()}


def _label_workers() -> dict[str, dict]:
    """GCS records of every labeling actor of the session, alive or dead, by actor id."""
    from ray._private.state import actors

    return {k: a for k, a in actors().items() if "LabelWorker" in a["ActorClassName"]}


def test_d_an_image_that_kills_its_actor_ends_as_a_retryable_error_row_then_retry_errors_labels_it(
    ray_session, small_dataset, small_reference, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    monkeypatch.setenv("HQLABEL_FAILPOINTS", f"exit:{POISON}")  # SIGKILL whenever the models see it
    summary = run_label_job(_spec(small_dataset, out, shard_size=FAULT_SHARD_SIZE), progress=False)

    # The job ended: the image is an error row marked retryable, every other image is labeled as in a
    # fault-free run, and both shards are finished.
    assert (summary.images, summary.errors, summary.retryable_errors) == (FAULT_IMAGES, 1, 1)
    results = _results(out)
    [error] = results["errors"]
    assert (error["image_id"], error["stage"], error["retryable"]) == (POISON, "label", True)
    assert "the labeling actor died" in error["error"]
    assert _without(results, POISON) == _without(small_reference, POISON)
    markers = {p.stem: json.loads(p.read_text()) for p in (out / "_done").glob("*.json")}
    assert sorted(markers) == ["00000", "00001"]
    assert markers["00000"]["retryable_errors"] == 1 and markers["00001"]["retryable_errors"] == 0
    assert main(["status", str(out)]) == 0
    assert "retryable: 1 (rerun the same `hqlabel label` with --retry-errors)" in capsys.readouterr().out
    untouched = {p: p.stat().st_mtime_ns for p in out.glob("*/part-00001.parquet")}
    assert len(untouched) == 3

    # The same command with --retry-errors, without the fault: only that image is labeled again.
    monkeypatch.delenv("HQLABEL_FAILPOINTS")
    argv = [
        *["label", str(small_dataset), "--classes", CLASSES, "--out", str(out), "--preset", "tiny-random"],
        *["--box-threshold", str(BOX_THRESHOLD), "--shard-size", str(FAULT_SHARD_SIZE), "--batch-size", "1"],
        *["--no-progress", "--retry-errors"],
    ]
    assert main(argv) == 0
    assert f"labeled {FAULT_IMAGES} images" in capsys.readouterr().out

    assert _results(out) == small_reference, "every image once, as in a fault-free run"
    _assert_every_image_once_of(out, FAULT_IMAGES)
    job = json.loads((out / "job.json").read_text())
    assert job["shards"]["retried"] == 1 and job["retried_images"] == 1
    assert job["summary"]["images_this_run"] == 1 and job["summary"]["errors"] == 0
    marker = json.loads((out / "_done" / "00000.json").read_text())
    assert (marker["images"], marker["errors"], marker["retryable_errors"]) == (FAULT_SHARD_SIZE, 0, 0)
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched, "a shard without retryable errors stays"
    assert not (out / "_tmp").exists()


def _assert_every_image_once_of(out: Path, count: int) -> None:
    images = pq.read_table(out / "images")["image_id"].to_pylist()
    assert sorted(images) == [f"img_{i:03d}.png" for i in range(count)]
    masks = pq.read_table(out / "masks", columns=["image_id", "instance_id"]).to_pylist()
    pairs = [(m["image_id"], m["instance_id"]) for m in masks]
    assert len(pairs) == len(set(pairs)), "an instance was written twice"


def test_e_an_actor_with_a_broken_device_is_replaced_and_the_new_one_labels_its_images(
    ray_session, small_dataset, small_reference, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    before = set(_label_workers())
    # The first actor raises torch.AcceleratorError (CUDA illegal memory access) on img_001, and every call
    # after it too, as a sticky CUDA error does; a restarted actor does not.
    monkeypatch.setenv("HQLABEL_FAILPOINTS", "device:img_001.png")
    summary = run_label_job(_spec(small_dataset, out, shard_size=FAULT_SHARD_SIZE), progress=False)

    assert (summary.images, summary.errors) == (FAULT_IMAGES, 0), "no error rows for the rest of its images"
    assert _results(out) == small_reference
    new = [a for k, a in _label_workers().items() if k not in before]
    assert new and max(a["NumRestarts"] for a in new) >= 1, "Ray replaced the actor"


def test_e_actor_restarts_are_capped_then_the_job_stops_and_a_rerun_resumes(
    ray_session, small_dataset, small_reference, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    spec = _spec(small_dataset, out, shard_size=FAULT_SHARD_SIZE)
    monkeypatch.setenv("HQLABEL_FAILPOINTS", f"exit:{POISON}")
    with pytest.raises(RuntimeError, match=r"--max-actor-restarts \(0\)"):  # no restart: stop, never hang
        run_label_job(spec.model_copy(update={"max_actor_restarts": 0}), progress=False)
    assert not (out / "_done" / "00000.json").exists()

    monkeypatch.delenv("HQLABEL_FAILPOINTS")
    run_label_job(spec, progress=False)
    assert _results(out) == small_reference


def test_f_retry_errors_with_overwrite_is_a_one_line_error(tmp_path, capsys):
    argv = ["label", str(tmp_path), "--classes", CLASSES, "--out", str(tmp_path / "out")]
    assert main([*argv, "--retry-errors", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--retry-errors" in err and "--overwrite" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
