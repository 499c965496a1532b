"""``hqlabel label`` without ``--address`` starts a Ray of its own: it never joins the cluster that
``RAY_TMPDIR/ray/ray_current_cluster`` names (Ray's ``ray.init()`` default), which hangs when that cluster is
dead."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from local_ray import clean_env

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
