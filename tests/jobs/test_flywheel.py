"""``hqlabel flywheel``: one turn of label -> curate -> train -> gate -> relabel -> compare on tiny generated
data with ``--preset tiny-random`` (random weights: the scores mean nothing, so the gates are forced with
thresholds no score can miss or meet: min deltas of -100 points (always passes) and 1000 (always fails)).

* a passing gate, its driver killed after the curate stage (the ``HQLABEL_FLYWHEEL_CRASH_AFTER`` hook, a
  subprocess) and resumed: each stage ran once; registry lineage, relabel and the comparison report;
* the same flywheel through the Jobs API of a real local Ray head, uninterrupted, with a gate that must fail:
  nothing promoted, no new labels version, and up to the gate the same labels, candidate weights and scores
  as the resumed run;
* relabeling one shard only ("below" the quality threshold): the others are copied unchanged.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from local_ray import clean_env, jobs_api_head

from hqlabel.jobs.cli import main
from hqlabel.jobs.flywheel import CRASH_ENV, STAGES, Flywheel, load_flywheel, shard_quality

pytest.importorskip("ray.train", reason="the flywheel trains with Ray Train (the train extra)")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """Six 96 x 128 demo images (shards of 2) and a 3-image ground-truth instance dataset for validation."""
    from hqlabel.platform.demo import make_demo_images
    from hqlabel.training.synthetic import write_fine_structure_dataset

    root = tmp_path_factory.mktemp("flywheel-inputs")
    make_demo_images(root / "images", 6, size=(96, 128))
    write_fine_structure_dataset(str(root / "gt"), 3, 64, 1, max_objects=2)
    return {"root": str(root), "images": str(root / "images"), "gt": str(root / "gt")}


def write_flywheel(folder: Path, inputs: dict[str, str], **overrides) -> Path:
    """A FLYWHEEL.yaml in ``folder`` (relative dir, as a user writes it) with tiny, fast settings."""
    spec = {
        "dir": "fw",
        "input": inputs["images"],
        "classes": "circle, square, triangle",
        "models": {"preset": "tiny-random"},
        "label": {"batch_size": 2, "shard_size": 2, "num_workers": 1, "device": "cpu"},
        "curate": {"min_pred_iou": 0.0},
        "train": {"epochs": 1, "batch_size": 2, "workers": 1, "num_points": 256, "loader_threads": 0},
        "candidate": "last",  # one epoch's weights differ from the start's: the relabel changes masks
        "validation": {"data": inputs["gt"]},
        "gate": {"min_mbiou_delta": -100, "min_miou_delta": -100},
        "relabel": {"shards": "below", "max_mean_pred_iou": 2.0},  # every shard is under 2
        "compare_limit": 3,
        "num_cpus": 2,
        **overrides,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "flywheel.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def masks_of(labels: Path) -> list[dict]:
    table = pq.read_table(labels / "masks", columns=["image_id", "instance_id", "label", "mask"])
    return sorted(table.to_pylist(), key=lambda r: (r["image_id"], r["instance_id"]))


@pytest.fixture(scope="module")
def resumed(inputs, tmp_path_factory, ray_session) -> Flywheel:
    """A passing flywheel whose driver dies right after the curate marker (a subprocess with its own local
    Ray), then resumed in this process."""
    file = write_flywheel(tmp_path_factory.mktemp("resumed"), inputs)
    env = clean_env(PYTHONPATH=str(REPO), **{CRASH_ENV: "curate"})
    crashed = subprocess.run(
        [sys.executable, "-m", "hqlabel", "flywheel", "run", str(file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert crashed.returncode == 3, crashed.stdout + crashed.stderr
    fw = Flywheel(load_flywheel(file))
    assert [s for s in STAGES if fw.marker(s)] == ["label", "curate"]
    assert not fw.path("train").exists()
    assert main(["flywheel", "run", str(file)]) == 0
    return fw


def test_passing_gate_after_a_crash_runs_every_stage_once(resumed, capsys):
    fw = resumed
    events = fw.events()
    for stage in STAGES:
        assert [e["event"] for e in events if e["stage"] == stage and e["event"] in ("start", "done")] == [
            "start",
            "done",
        ], stage
    assert len({e["pid"] for e in events if e["event"] == "start"}) == 2  # the crashed driver and the resume
    assert [e["event"] for e in events if e["stage"] == "label"][-1] == "skip-done"

    registry = fw.registry
    assert registry.current() == "w2"
    base, trained = registry.versions()
    assert base["kind"] == "base" and base["weights"] is None  # the base model's own HQ weights
    lineage = trained["lineage"]
    assert lineage["labels"] == str(fw.labels(1)) and lineage["labels_weights_version"] == "w1"
    assert lineage["init_weights_version"] == "w1" and lineage["base_model"] == "tiny-random"
    assert lineage["curated"] == str(fw.path("curate", "curated"))
    assert lineage["training_config"]["epochs"] == 1 and lineage["random_weights"] is True
    assert trained["promoted"] and trained["promoted_by"] == f"flywheel {fw.dir}"
    (gate,) = trained["gates"]
    assert gate["passed"] and gate["current"] == "w1" and gate["candidate"] == "w2"
    assert Path(registry.weights("w2")).is_file()

    # each labels version names the weights it was labeled with
    for version, weights in ((1, "w1"), (2, "w2")):
        sidecar = json.loads((fw.labels(version) / "weights_version.json").read_text())
        assert sidecar["weights_version"] == weights
    old, new = masks_of(fw.labels(1)), masks_of(fw.labels(2))
    assert [(r["image_id"], r["instance_id"]) for r in old] == [
        (r["image_id"], r["instance_id"]) for r in new
    ]

    report = json.loads(fw.path("compare", "report.json").read_text())
    assert report["random_weights"] and (report["old_weights_version"], report["new_weights_version"]) == (
        "w1",
        "w2",
    )
    totals = report["totals"]
    changed = sum(a["mask"] != b["mask"] for a, b in zip(old, new, strict=True))
    assert totals["old"] == totals["new"] == totals["paired"] == len(old)
    assert totals["changed"] == changed > 0  # one epoch moved the HQ token: some masks changed
    assert report["validation"]["before"] == gate["before"] and report["validation"]["after"] == gate["after"]
    assert report["largest_changes"] and len(report["largest_changes"]) <= 3
    gallery = fw.path("compare", "gallery", "index.html").read_text()
    assert 'id="random-weights"' in gallery and "overlays/" in gallery
    assert "Random weights" in fw.path("compare", "report.md").read_text()

    assert main(["flywheel", "status", str(fw.dir / ".." / "flywheel.yaml")]) == 0
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out and "PASSED" in out and "current weights w2" in out
    assert main(["models", "list", "--registry", str(registry.root)]) == 0
    listing = capsys.readouterr().out
    assert "w2" in listing and "current" in listing


def test_relabel_below_threshold_keeps_the_other_shards(resumed, tmp_path):
    """One shard relabeled, through the same code the stage uses; the others copied unchanged."""
    from hqlabel.jobs import flywheel as fly

    old = resumed.labels(1)
    quality = shard_quality(old)
    assert len(quality) == 3
    chosen = sorted(quality)[1]
    fly.selection_input(old, [chosen], tmp_path / "input")
    fly._label_into(
        resumed, tmp_path / "job", str(tmp_path / "input"), "w2", shard_size=None, id_column="image_id"
    )
    new = tmp_path / "v2"
    fly.assemble(old, tmp_path / "job", new, [chosen])
    for shard in quality:
        before = (old / "masks" / f"part-{shard}.parquet").read_bytes()
        after = (new / "masks" / f"part-{shard}.parquet").read_bytes()
        assert (before == after) == (shard != chosen), shard
    # the relabeled shard holds what relabeling every shard with w2 gave for it
    everything = masks_of(resumed.labels(2))
    one = masks_of(new)
    ids = {r["image_id"] for r in pq.read_table(new / "masks" / f"part-{chosen}.parquet").to_pylist()}
    assert [r for r in one if r["image_id"] in ids] == [r for r in everything if r["image_id"] in ids]
    assert json.loads((new / "weights_version.json").read_text())["shards"] == [chosen]


def test_next_turn_labels_with_the_promoted_weights(resumed, inputs, tmp_path, ray_session):
    """A new dir with the same registry: its label stage uses the promoted w2, as the relabel did."""
    from hqlabel.jobs.flywheel import run_stage

    registry = str(resumed.registry.root)
    spec = load_flywheel(write_flywheel(tmp_path / "next", inputs, registry=registry))
    marker = run_stage(spec, "label")
    assert marker["outputs"]["weights_version"] == "w2"
    assert masks_of(Flywheel(spec).labels(1)) == masks_of(resumed.labels(2))
    other = load_flywheel(write_flywheel(tmp_path / "other", inputs, registry=registry, models={}))
    with pytest.raises(ValueError, match="current weights w2 are for tiny-random, not syscv"):
        run_stage(other, "label")


@pytest.fixture(scope="module")
def ray_head():
    """Jobs API URL of a local Ray head (2 CPUs, loopback, no token authentication), killed at the end."""
    yield from jobs_api_head(clean_env(RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO)))


@pytest.mark.timeout(900)
def test_failing_gate_through_the_jobs_api(resumed, inputs, ray_head, tmp_path, capsys):
    """Driver and stages as Ray Jobs of a real head, uninterrupted, with a gate that must fail: nothing is
    promoted, no new labels version; up to the gate, the same results as the interrupted-and-resumed run."""
    import torch
    from ray.job_submission import JobSubmissionClient

    from hqlabel.segmenters.hq_weights import read_hq_weights

    file = write_flywheel(tmp_path, inputs, gate={"min_mbiou_delta": 1000, "min_miou_delta": 0})
    code = main(["flywheel", "run", str(file), "--address", ray_head])
    captured = capsys.readouterr()
    assert code == 0, captured.out[-3000:] + captured.err[-3000:]
    assert "SUCCEEDED" in captured.out and "FAILED: mBIoU" in captured.out  # the driver's status, streamed
    fw = Flywheel(load_flywheel(file))
    jobs = JobSubmissionClient(ray_head).list_jobs()
    stages = sorted((j.metadata or {}).get("hqlabel_flywheel_stage", "driver") for j in jobs)
    assert stages == sorted(["driver", *STAGES[:4]])  # the driver and one job per stage with work to do
    assert {str(getattr(j.status, "value", j.status)) for j in jobs} == {"SUCCEEDED"}
    for stage in STAGES:  # each stage ran once, in a process (Ray Job) of its own
        done = "skipped" if stage in ("relabel", "compare") else "done"
        assert [e["event"] for e in fw.events() if e["stage"] == stage] == ["start", done], stage
    pids = {stage: {e["pid"] for e in fw.events() if e["stage"] == stage} for stage in STAGES}
    assert len(set().union(*pids.values())) == 5  # 4 stage jobs; the driver job marked the 2 skipped stages
    assert pids["relabel"] == pids["compare"]

    registry = fw.registry
    assert registry.current() == "w1"
    candidate = registry.get("w2")
    assert not candidate["promoted"] and candidate["gates"][0]["passed"] is False
    assert candidate["gates"][0]["thresholds"]["min_mbiou_delta"] == 1000
    for stage in ("relabel", "compare"):
        assert fw.marker(stage)["status"] == "skipped"
    assert not fw.labels(2).exists() and (fw.labels(1) / "job.json").is_file()
    assert not fw.path("compare").exists()

    # the uninterrupted run computed what the resumed one did
    assert masks_of(fw.labels(1)) == masks_of(resumed.labels(1))
    assert fw.outputs("curate")["counts"] == resumed.outputs("curate")["counts"]
    ours, _ = read_hq_weights(registry.weights("w2"))
    theirs, _ = read_hq_weights(resumed.registry.weights("w2"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    gate, resumed_gate = fw.outputs("gate"), resumed.outputs("gate")
    assert (gate["before"], gate["after"]) == (resumed_gate["before"], resumed_gate["after"])


def test_bad_flywheel_file_is_one_line(tmp_path, inputs, capsys):
    file = write_flywheel(tmp_path, inputs, gate={"min_mbiou": 1}, validation={})
    assert main(["flywheel", "run", str(file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gate.min_mbiou" in err and "validation" in err
    file = write_flywheel(tmp_path, inputs, train={"epochs": 0})
    assert main(["flywheel", "status", str(file)]) == 2
    assert "epochs" in capsys.readouterr().err
    file = write_flywheel(tmp_path, inputs, label={"out": "x"})
    assert main(["flywheel", "run", str(file)]) == 2
    assert "set by the flywheel" in capsys.readouterr().err
    assert main(["flywheel", "run", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    file = write_flywheel(tmp_path, inputs)
    assert main(["flywheel", "run", str(file), "--address", "10.0.0.5:6379"]) == 2
    assert "Jobs API (http://HEAD:8265)" in capsys.readouterr().err
    assert main(["flywheel", "run", str(file), "--no-wait"]) == 2
    assert "--no-wait needs" in capsys.readouterr().err


def test_decisions_folder_is_merged_and_conflicts_named(tmp_path):
    from hqlabel.jobs.flywheel import _merge_decisions

    review = tmp_path / "review"
    review.mkdir()
    (review / "alice.csv").write_text("image_id,instance_id,decision\na.jpg,0,accept\na.jpg,1,reject\n")
    (review / "bob.jsonl").write_text('{"image_id": "a.jpg", "instance_id": 1, "decision": "reject"}\n')
    merged, files = _merge_decisions(str(review), tmp_path / "merged.jsonl")
    assert files == [str(review / "alice.csv"), str(review / "bob.jsonl")]
    lines = [json.loads(x) for x in Path(merged).read_text().splitlines()]
    assert [(x["instance_id"], x["decision"]) for x in lines] == [(0, "accept"), (1, "reject")]
    (review / "carol.csv").write_text("image_id,instance_id,decision\na.jpg,0,reject\n")
    with pytest.raises(ValueError, match=r"instance 0: accept in .*alice.csv, reject in .*carol.csv"):
        _merge_decisions(str(review), tmp_path / "merged.jsonl")
    single = str(review / "alice.csv")
    assert _merge_decisions(single, tmp_path / "x") == (single, [single])


def test_holdout_split_is_disjoint_and_stable(tmp_path):
    from hqlabel.jobs.flywheel import _split
    from hqlabel.platform.instances import iter_instances
    from hqlabel.training.synthetic import write_fine_structure_dataset

    write_fine_structure_dataset(str(tmp_path / "all"), 5, 32, 0)
    counts = _split(tmp_path / "all", tmp_path / "t", tmp_path / "v", 0.4)
    assert counts == {"train_images": 3, "validation_images": 2}
    train = {i.image_id for i in iter_instances(str(tmp_path / "t"))}
    val = {i.image_id for i in iter_instances(str(tmp_path / "v"))}
    assert not train & val and len(train | val) == 5
    _split(tmp_path / "all", tmp_path / "t2", tmp_path / "v2", 0.4)
    assert {i.image_id for i in iter_instances(str(tmp_path / "v2"))} == val


def test_settings_change_only_before_the_stage_that_uses_them(tmp_path, inputs):
    fw = Flywheel(load_flywheel(write_flywheel(tmp_path, inputs)))
    fw.save_spec()
    fw.write_json(fw.path("stages", "label.json"), {"stage": "label", "status": "done", "outputs": {}})
    for changed in ({"gate": {"min_mbiou_delta": 2}}, {"num_cpus": 1}, {"train": {"epochs": 2}}):
        Flywheel(load_flywheel(write_flywheel(tmp_path, inputs, **changed))).save_spec()  # not used yet
    assert json.loads(fw.path("flywheel.json").read_text())["train"] == {"epochs": 2}
    with pytest.raises(ValueError, match="classes changed since stage label finished"):
        Flywheel(load_flywheel(write_flywheel(tmp_path, inputs, classes="cat"))).save_spec()
