"""Labeling on a real 2-node Ray cluster on this machine: a head with no CPUs (the KubeRay / cluster launcher
set-up: it runs the control plane, the dashboard and the job's driver) and one worker node with 2 CPUs and a
custom resource that tells it apart. The job joins it through the real CLI (``hqlabel label --address``) and
through the Jobs API (``hqlabel submit``); each run must write every image exactly once and label on the
worker node alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import encode, random_image
from local_ray import LocalRayCluster, clean_env

from hqlabel.jobs.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
NUM_IMAGES = 6
SHARD_SIZE = 4  # two shards: 4 + 2 images
WORKER_RESOURCE = "hqlabel_test_worker"
# The nodes and the CLI import this checkout (hqlabel is installed editable from another one).
ENV = {"RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def cluster():
    """A head with ``--num-cpus 0``, a worker node with 2 CPUs and ``WORKER_RESOURCE``; killed at the end."""
    pytest.importorskip("aiohttp", reason="the Ray Jobs API needs ray[default] (the dev extra)")
    nodes = LocalRayCluster(clean_env(**ENV))
    try:
        nodes.start_head(0, dashboard=True)
        nodes.add_node(2, {WORKER_RESOURCE: 1})
        yield nodes
    finally:
        leftover = nodes.stop()
        assert not leftover, f"Ray processes left behind: {leftover}"


@pytest.fixture(scope="module")
def worker_node(cluster) -> str:
    """The node id of the worker node (the one with ``WORKER_RESOURCE``)."""
    (node,) = [n["NodeID"] for n in cluster.ray_nodes() if n["Alive"] and WORKER_RESOURCE in n["Resources"]]
    return node


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i in range(NUM_IMAGES):
        (folder / f"img_{i}.png").write_bytes(encode(random_image(i, (40 + 4 * i, 56))))
    return folder


def _label_args(images: Path, out: Path) -> list[str]:
    return [
        *["label", str(images), "--classes", "cat, dog", "--preset", "tiny-random", "--box-threshold", "0.3"],
        *["--out", str(out), "--batch-size", "2", "--shard-size", str(SHARD_SIZE), "--no-progress"],
    ]


def _check_written_once(out: Path, images: Path) -> None:
    """Every image once in ``images/``, every instance once in ``masks/``, every shard done."""
    expected = sorted(p.name for p in images.iterdir())
    assert sorted(pq.read_table(out / "images")["image_id"].to_pylist()) == expected
    masks = pq.read_table(out / "masks")
    keys = list(zip(masks["image_id"].to_pylist(), masks["instance_id"].to_pylist(), strict=True))
    assert keys and len(keys) == len(set(keys)), "no instance written twice"
    assert {image for image, _ in keys} <= set(expected)
    assert sorted(p.name for p in (out / "_done").iterdir()) == ["00000.json", "00001.json"]
    assert not (out / "_tmp").exists()
    status = subprocess.run(
        [sys.executable, "-m", "hqlabel", "status", str(out)],
        env=clean_env(**ENV),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "shards:    2/2 done, 0 pending" in status
    assert f"images:    {NUM_IMAGES}/{NUM_IMAGES} labeled" in status
    assert f"instances: {masks.num_rows}" in status


def _check_ran_on(out: Path, node: str) -> None:
    job = json.loads((out / "job.json").read_text())
    assert set(job["nodes"]) == {node}, job["nodes"]  # the head has no CPUs: nothing ran there
    assert job["nodes"][node]["images"] == NUM_IMAGES and job["nodes"][node]["head"] is False
    assert job["resources"]["num_actors"] == 1 and job["resources"]["actor_gpus"] == 0  # 2 CPUs: one actor
    assert job["shards"]["incomplete"] == []


def test_label_address_runs_on_the_worker_node(cluster, worker_node, images, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "hqlabel", *_label_args(images, out), "--address", cluster.address],
        env=clean_env(**ENV),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"labeled {NUM_IMAGES} images" in result.stdout
    _check_written_once(out, images)
    _check_ran_on(out, worker_node)


def test_submit_runs_on_the_worker_node(cluster, worker_node, images, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["submit", "--address", cluster.dashboard, "--", *_label_args(images, out)])
    captured = capsys.readouterr()
    assert code == 0, captured.out[-4000:] + captured.err[-2000:]
    assert "SUCCEEDED" in captured.out and f"labeled {NUM_IMAGES} images" in captured.out
    _check_written_once(out, images)
    _check_ran_on(out, worker_node)
