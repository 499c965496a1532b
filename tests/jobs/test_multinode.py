"""Labeling and training on a real multi-node Ray cluster on this machine, one for the whole module: a head
with no CPUs (the KubeRay / cluster launcher set-up: it runs the control plane, the dashboard and the jobs'
drivers), a worker node with 2 CPUs and one with 1 CPU, each offering one unit of the custom resource
``SLOT``. Jobs join it through the real CLI (``--address``) and through the Jobs API (``hqlabel submit``).

- ``hqlabel submit -- label``, the default plan (one 2-CPU actor): it labels on the 2-CPU node alone.
- ``hqlabel label --address ... --actor-resource SLOT=1`` with two actors: each node holds one unit, so the
  actors must sit on different nodes, and both label; a resource no node offers is refused before anything
  is written.
- ``hqlabel train --address`` with ``--worker-resource SLOT=1``: one worker per node; ``hqlabel submit --
  train --resume`` continues from the checkpoint the first run's rank 0 wrote.
- Last, a third node that sees another filesystem (a private mount namespace hides the test's folders):
  local paths it does not see are refused in one line, for label and train.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import encode, random_image
from local_ray import LocalRayCluster, clean_env, private_mounts

from hqlabel.jobs.cli import main
from hqlabel.training.synthetic import write_fine_structure_dataset

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
NUM_IMAGES = 6
SHARD_SIZE = 4  # two shards: 4 + 2 images
SLOT = "hqlabel_test_slot"  # one unit on each worker node
# The nodes and the CLI import this checkout (hqlabel is installed editable from another one).
ENV = {"RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def cluster():
    """A head with ``--num-cpus 0``, worker nodes with 2 and 1 CPUs and one ``SLOT`` each; killed at the
    end."""
    pytest.importorskip("aiohttp", reason="the Ray Jobs API needs ray[default] (the dev extra)")
    nodes = LocalRayCluster(clean_env(**ENV))
    try:
        nodes.start_head(0, dashboard=True)
        nodes.add_node(2, {SLOT: 1})
        nodes.add_node(1, {SLOT: 1})
        yield nodes
    finally:
        leftover = nodes.stop()
        assert not leftover, f"Ray processes left behind: {leftover}"


@pytest.fixture(scope="module")
def workers(cluster) -> dict[int, str]:
    """The worker nodes' ids by their CPUs: ``{2: id, 1: id}``."""
    found = {int(n["Resources"]["CPU"]): n["NodeID"] for n in cluster.ray_nodes() if SLOT in n["Resources"]}
    assert sorted(found) == [1, 2], found
    return found


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i in range(NUM_IMAGES):
        (folder / f"img_{i}.png").write_bytes(encode(random_image(i, (40 + 4 * i, 56))))
    return folder


@pytest.fixture(scope="module")
def instances(tmp_path_factory) -> Path:
    """A tiny instance dataset to train on."""
    folder = tmp_path_factory.mktemp("instances") / "data"
    write_fine_structure_dataset(str(folder), 4, size=96, seed=5)
    return folder


def _hqlabel(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hqlabel", *args],
        env=env or clean_env(**ENV),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _label_args(images: Path, out: Path, batch_size: int = 2) -> list[str]:
    return [
        *["label", str(images), "--classes", "cat, dog", "--preset", "tiny-random", "--box-threshold", "0.3"],
        *["--out", str(out), "--batch-size", str(batch_size), "--shard-size", str(SHARD_SIZE)],
        "--no-progress",
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
    status = _hqlabel("status", str(out))
    assert status.returncode == 0, status.stderr[-2000:]
    assert "shards:    2/2 done, 0 pending" in status.stdout
    assert f"images:    {NUM_IMAGES}/{NUM_IMAGES} labeled" in status.stdout
    assert f"instances: {masks.num_rows}" in status.stdout


def _check_ran_on(out: Path, node: str) -> None:
    job = json.loads((out / "job.json").read_text())
    assert set(job["nodes"]) == {node}, job["nodes"]  # the head has no CPUs: nothing ran there
    assert job["nodes"][node]["images"] == NUM_IMAGES and job["nodes"][node]["head"] is False
    # one 2-CPU actor: only the 2-CPU node can host it
    assert job["resources"]["num_actors"] == 1 and job["resources"]["actor_cpus"] == 2
    assert job["resources"]["actor_gpus"] == 0
    assert job["shards"]["incomplete"] == []


def test_submit_runs_on_the_worker_node(cluster, workers, images, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["submit", "--address", cluster.dashboard, "--", *_label_args(images, out)])
    captured = capsys.readouterr()
    assert code == 0, captured.out[-4000:] + captured.err[-2000:]
    assert "SUCCEEDED" in captured.out and f"labeled {NUM_IMAGES} images" in captured.out
    _check_written_once(out, images)
    _check_ran_on(out, workers[2])


def test_label_address_with_actor_resource_labels_on_both_worker_nodes(cluster, workers, images, tmp_path):
    """``hqlabel label --address``, two actors that each ask for one ``SLOT`` on nodes that hold one each: one
    actor per node, placed by Ray's resource accounting (not best effort); both label, the output is exactly
    once."""
    out = tmp_path / "out"
    args = [*_label_args(images, out, batch_size=1), "--address", cluster.address]
    args += ["--min-workers", "2", "--max-workers", "2", "--actor-resource", f"{SLOT}=1"]
    # Ray Data hands batches to the actors that are up, preferring the one beside the data (decoding runs on
    # the 2-CPU node), and a tiny model may finish each batch before the next is decoded. So here it waits
    # for both actors, gives each one batch at a time, and the actor that gets the first image stalls on it
    # (a fault point, ``Failpoints.STALL_SECONDS``): the other actor must take the next batches meanwhile.
    env = clean_env(
        **ENV,
        RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S="180",
        RAY_DATA_ACTOR_DEFAULT_MAX_TASKS_IN_FLIGHT_TO_MAX_CONCURRENCY_FACTOR="1",
        HQLABEL_FAILPOINTS="stall:img_0.png",
    )
    result = _hqlabel(*args, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"labeled {NUM_IMAGES} images" in result.stdout
    _check_written_once(out, images)
    job = json.loads((out / "job.json").read_text())
    assert job["spec"]["actor_resources"] == {SLOT: 1.0}
    plan = job["resources"]
    assert (plan["num_actors"], plan["actor_cpus"], plan["actor_resources"]) == (2, 1, {SLOT: 1.0})
    assert set(job["nodes"]) == {workers[2], workers[1]}, job["nodes"]
    assert sum(node["images"] for node in job["nodes"].values()) >= NUM_IMAGES


def test_actor_resource_no_node_offers_is_refused(cluster, images, tmp_path):
    out = tmp_path / "out"
    result = _hqlabel(
        *_label_args(images, out), "--address", cluster.address, "--actor-resource", "hqlabel_test_none=1"
    )
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(
        "hqlabel: error: --actor-resource hqlabel_test_none=1: no node of the Ray cluster"
    )
    assert f"offered: {SLOT}" in error and "ray start --resources" in error
    assert not (out / "job.json").exists() and not (out / "_listing").exists()  # nothing started


def test_train_on_both_nodes_then_resume_as_a_ray_job(cluster, workers, instances, tmp_path, capsys):
    """1 epoch with one worker per worker node (``--worker-resource``), then ``hqlabel submit -- train
    --resume`` to 2 epochs: the workers on both nodes load the checkpoint rank 0 wrote, and the run continues
    where it stopped."""
    out = tmp_path / "run"
    args = ["train", "--data", str(instances), "--out", str(out), "--preset", "tiny-random"]
    args += [
        "--batch-size",
        "2",
        "--val-fraction",
        "0.25",
        "--workers",
        "2",
        "--worker-resource",
        f"{SLOT}=1",
    ]
    first = _hqlabel(*args, "--epochs", "1", "--address", cluster.address)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "trained 1 epoch(s) on 2 worker(s) (2 node(s))" in first.stdout
    ranks = {json.loads(p.read_text())["node_id"] for p in (out / "workers").iterdir()}
    assert ranks == {workers[2], workers[1]}
    history = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1]

    code = main(["submit", "--address", cluster.dashboard, "--", *args, "--epochs", "2", "--resume"])
    captured = capsys.readouterr()
    assert code == 0, captured.out[-4000:] + captured.err[-2000:]
    assert "SUCCEEDED" in captured.out and "trained 2 epoch(s) on 2 worker(s) (2 node(s))" in captured.out
    resumed = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in resumed] == [0, 1, 2]
    assert resumed[:2] == history  # continued from the checkpoint, epoch 1 not redone
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "epoch-0001",
        "epoch-0002",
        "latest.json",
    ]
    assert {json.loads(p.read_text())["node_id"] for p in (out / "workers").iterdir()} == ranks


def test_local_paths_a_node_does_not_see_are_refused(cluster, images, instances, tmp_path_factory):
    """A node that sees another filesystem (here: this machine's, with the test's folders hidden by a private
    mount namespace) joins; a job with local paths it does not see is refused in one line that names the path
    and the node, before anything is written. Runs last: the node leaves at the end."""
    hidden = tmp_path_factory.getbasetemp()  # the images, the instances and every output are under it
    prefix = private_mounts(hidden)
    if prefix is None:
        pytest.skip(
            "needs `unshare --mount` (a private mount namespace) to start a node that sees other files"
        )
    blind = cluster.add_node(0, {"hqlabel_test_blind": 1}, wrap=prefix)
    try:
        (node,) = [n for n in cluster.ray_nodes() if n["Alive"] and "hqlabel_test_blind" in n["Resources"]]
        folder = tmp_path_factory.mktemp("refused")
        out, run = folder / "out", folder / "run"
        label = _label_args(images, out)
        train = [
            "train",
            "--data",
            str(instances),
            "--out",
            str(run),
            "--preset",
            "tiny-random",
            "--epochs",
            "1",
        ]
        # Both commands in one driver (the second reuses the first's connection): one process start less.
        code = (
            "import sys\n"
            "from hqlabel.jobs.cli import main\n"
            f"codes = main({[*label, '--address', cluster.address]!r}), main({train!r})\n"
            "print('codes', *codes)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], env=clean_env(**ENV), capture_output=True, text=True, timeout=300
        )
        assert "codes 2 2" in result.stdout, result.stderr[-4000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("hqlabel: error:")]
        assert len(errors) == 2, result.stderr[-4000:]
        assert errors[0].startswith(
            f"hqlabel: error: INPUT {images} is a local path that 1 of the 4 Ray nodes"
        )
        assert node["NodeID"][:12] in errors[0] and "NFS" in errors[0] and "s3://" in errors[0]
        assert not (out / "job.json").exists() and not (out / "_listing").exists()
        assert not out.exists()  # the marker gone, and the folder the refused run made too
        assert errors[1].startswith(f"hqlabel: error: --data {instances} is a local path that 1 of the 4 Ray")
        assert not (run / "config.json").exists()
    finally:
        assert not cluster.stop_node(blind), "the blind node's processes left behind"
