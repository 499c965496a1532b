"""``hqlabel label`` without ``--address`` starts a Ray of its own: it never joins the cluster that
``RAY_TMPDIR/ray/ray_current_cluster`` names (Ray's ``ray.init()`` default), which hangs when that cluster is
dead."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from local_ray import clean_env, session_pids

from hqlabel.jobs.cluster import is_local, ray_address
from hqlabel.platform.demo import make_demo_images

REPO = Path(__file__).resolve().parents[2]


def test_the_default_address_is_a_new_local_ray(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(None) == "local" and is_local(None)
    assert ray_address("auto") == "auto" and not is_local("auto")  # Ray's own discovery, asked for
    assert ray_address("10.0.0.5:6379") == "10.0.0.5:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # what Ray Jobs sets for a submitted driver
    assert ray_address(None) == "10.0.0.5:6379" and not is_local(None)


@pytest.mark.timeout(300)
def test_label_ignores_a_stale_current_cluster_file(tmp_path):
    ray_tmp = Path(tempfile.mkdtemp(prefix="hqrt"))  # short: Ray's unix socket paths live under it
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")  # a dead cluster
        make_demo_images(tmp_path / "images", 2)
        out = tmp_path / "out"
        env = clean_env(RAY_AUTH_MODE="disabled", RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(REPO))
        command = [sys.executable, "-m", "hqlabel", "label", "images", "--classes", "circle"]  # relative
        command += ["--preset", "tiny-random", "--out", "out", "--num-cpus", "2", "--no-progress"]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "labeled 2 images" in result.stdout
        assert "Token authentication" not in result.stderr
        job = json.loads((out / "job.json").read_text())
        assert job["summary"]["images"] == 2
        assert job["spec"]["input"] == str(tmp_path / "images")  # absolute: show / curate from anywhere
        sessions = [p for p in (ray_tmp / "ray").iterdir() if p.name.startswith("session_2")]
        assert sessions, "the local Ray ran under RAY_TMPDIR"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.timeout(300)
def test_ctrl_c_ends_in_one_line_and_leaves_nothing(tmp_path):
    """Ctrl-C once the run has listed its input (Ray starting): exit 130, one line, no traceback; a run that
    completed no shard leaves no output behind."""
    make_demo_images(tmp_path / "images", 2)
    out = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="hqrt")
    env = clean_env(RAY_AUTH_MODE="disabled", RAY_TMPDIR=ray_tmp, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "hqlabel", "label", str(tmp_path / "images"), "--classes", "circle"]
    command += ["--preset", "tiny-random", "--out", str(out), "--num-cpus", "2", "--no-progress"]
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its Ray too: killed below whatever happens
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal
    )
    try:
        deadline = time.monotonic() + 200
        while proc.poll() is None and not (out / "_manifest.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        for pid in session_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(30)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and stderr.count("hqlabel: interrupted") == 1, stderr[-3000:]
    assert not out.exists(), sorted(out.rglob("*"))
