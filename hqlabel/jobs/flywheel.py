"""``hqlabel flywheel run|status FLYWHEEL.yaml``: label, curate (review), retrain, gate, relabel, compare.

One turn of the loop, as stages that each leave a completion marker in the flywheel's folder::

    DIR/flywheel.json              the resolved spec
    DIR/stages/STAGE.json          the marker: status done / skipped, when, what it wrote (outputs)
    DIR/events.jsonl               one line per stage start / finish / skip, with the process id (an audit)
    DIR/labels/v1/                 label: the dataset labeled with the registry's current weights
    DIR/curate/curated/, train/, validation/     curate: kept masks; the train / held-out validation split
    DIR/train/                     train: the Ray Train run (checkpoints, best/)
    DIR/gate/eval.json, gate.json  gate: current vs candidate weights on the validation set, the verdict
    DIR/labels/v2/                 relabel (after a promotion): the new labels version, beside v1
    DIR/compare/report.json, report.md, gallery/index.html     compare: what the new weights changed
    DIR/registry/                  the model registry (``hqlabel.training.registry``), unless set elsewhere

A stage whose marker exists is skipped, so ``run`` after a crash (of the driver or of a stage) resumes at the
stage that did not finish; a stage that crashed half-way starts over cleanly (a labeling job resumes its own
finished shards). Every labels version records the weights version it was labeled with
(``labels/vN/weights_version.json``).

Where stages run: ``--address`` unset (or ``local``) runs them in this process on a local Ray, as the other
commands do. ``--address http://HEAD:8265`` (a cluster's Jobs API) submits the driver itself as a Ray Job,
which submits each stage that has work to do as a Ray Job of its own (``hqlabel flywheel stage FLYWHEEL.yaml
STAGE``) and waits for it (a skipped stage's marker it writes itself): the submitting machine may disconnect
(``--no-wait``). The flywheel's folder, input and file must
then be on storage the cluster's nodes see.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hqlabel.jobs.flywheel_relabel import assemble, selection_input, shard_quality
from hqlabel.jobs.flywheel_spec import FlywheelSpec, load_flywheel
from hqlabel.training.registry import Registry, now

logger = logging.getLogger(__name__)

__all__ = ["STAGES", "flywheel_status", "load_flywheel", "run_flywheel", "run_stage"]

STAGES = ("label", "curate", "train", "gate", "relabel", "compare")
# The first stage that uses each setting (num_cpus changes no result: never refused).
FIELD_STAGE = {
    **dict.fromkeys(("dir", "input", "classes", "models", "label", "registry"), "label"),
    **dict.fromkeys(("curate", "validation"), "curate"),
    **dict.fromkeys(("train", "candidate"), "train"),
    "gate": "gate",
    "relabel": "relabel",
    "compare_limit": "compare",
}
CRASH_ENV = "HQLABEL_FLYWHEEL_CRASH_AFTER"  # a test hook: the driver dies right after this stage's marker
IN_CLUSTER_ENV = "HQLABEL_FLYWHEEL_DRIVER"  # set on the driver job that a cluster run submits
RANDOM_WARNING = (
    "hqlabel: warning: models.preset tiny-random: random weights; every score, gate verdict and change in "
    "this flywheel means NOTHING about real models (it only exercises the loop)"
)


class Flywheel:
    """The folders of one flywheel (``spec.dir``) and its markers."""

    def __init__(self, spec: FlywheelSpec) -> None:
        self.spec = spec
        self.dir = Path(spec.dir)
        self.registry = Registry(spec.registry)

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    def labels(self, version: int) -> Path:
        return self.path("labels", f"v{version}")

    def marker(self, stage: str) -> dict[str, Any] | None:
        file = self.path("stages", f"{stage}.json")
        return json.loads(file.read_text()) if file.is_file() else None

    def outputs(self, stage: str) -> dict[str, Any]:
        marker = self.marker(stage)
        if marker is None:
            raise RuntimeError(f"stage {stage} has not finished in {self.dir}; run the flywheel first")
        return marker["outputs"]

    def write_json(self, path: Path, data: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        aside = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        aside.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
        os.replace(aside, path)

    def event(self, stage: str, event: str, **extra: Any) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        line = {"stage": stage, "event": event, "at": now(), "pid": os.getpid(), **extra}
        with open(self.path("events.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def events(self) -> list[dict[str, Any]]:
        file = self.path("events.jsonl")
        return [json.loads(x) for x in file.read_text().splitlines() if x] if file.is_file() else []

    def save_spec(self) -> None:
        """Write ``flywheel.json``. A setting may change between runs only while the first stage that uses it
        has not finished (e.g. fix the gate after a failed train); otherwise the markers would lie, and the
        change is refused."""
        file = self.path("flywheel.json")
        spec = self.spec.model_dump(mode="json")
        before = json.loads(file.read_text()) if file.is_file() else spec
        changed = sorted(k for k in set(before) | set(spec) if before.get(k) != spec.get(k))
        done = sorted(
            {k for k in changed if FIELD_STAGE.get(k) and self.marker(FIELD_STAGE[k]) is not None},
        )
        if done:
            stages = sorted({FIELD_STAGE[k] for k in done}, key=STAGES.index)
            raise ValueError(
                f"{self.dir}: {', '.join(done)} changed since stage {', '.join(stages)} finished with the "
                "old settings; use a new dir for the changed flywheel, or delete that folder to start over"
            )
        if changed or not file.is_file():
            self.write_json(file, spec)


# ---- the stages --------------------------------------------------------------------------------------------
def _storage_options(spec: FlywheelSpec) -> dict[str, Any]:
    return {k: spec.label[k] for k in ("s3_endpoint", "s3_region") if k in spec.label}


def _label_into(fw: Flywheel, out: Path, input: str, weights_version: str, **extra: Any) -> dict[str, Any]:
    """Label ``input`` into ``out`` with the registry's ``weights_version``; the sidecar first, so a labels
    folder never exists without it."""
    from hqlabel.jobs.functions import label

    spec = fw.spec
    weights = fw.registry.weights(weights_version)
    out.mkdir(parents=True, exist_ok=True)
    fw.write_json(
        out / "weights_version.json",
        {"weights_version": weights_version, "weights": weights, "registry": str(fw.registry.root)},
    )
    options = {"num_cpus": spec.num_cpus, **spec.label, **extra}
    summary = label(
        input,
        out=str(out),
        classes=spec.classes,
        detector=spec.models.detector,
        segmenter=spec.models.segmenter,
        preset=spec.models.preset,
        hq_weights=weights,
        **options,
    )
    return {"labels": str(out), "weights_version": weights_version, "summary": summary.__dict__}


def _stage_label(fw: Flywheel) -> dict[str, Any]:
    spec, registry = fw.spec, fw.registry
    base_model = spec.models.preset or spec.models.segmenter
    if registry.current() is None:
        registry.register(
            spec.models.hq_weights,
            kind="base",
            lineage={"base_model": base_model, "source": spec.models.hq_weights or "the base model's own"},
        )
    version = registry.current()
    assert version is not None
    recorded = registry.get(version)["lineage"].get("base_model")
    if recorded != base_model:
        raise ValueError(
            f"registry {registry.root}: current weights {version} are for {recorded}, not {base_model}; give "
            "this flywheel its own registry"
        )
    return _label_into(fw, fw.labels(1), spec.input, version)


def _merge_decisions(source: str, into: Path) -> tuple[str, list[str]]:
    """A decisions file, or every decisions file of a folder merged into one JSON lines file ``into``
    (a mask decided twice the same way is kept once; both ways is an error naming the files)."""
    from hqlabel.jobs.curate import read_decisions

    folder = Path(source)
    if not folder.is_dir():
        return source, [source]
    files = sorted(
        str(p) for p in folder.rglob("*") if p.suffix in (".csv", ".json", ".jsonl") and p.is_file()
    )
    if not files:
        raise ValueError(f"curate.decisions {source}: no .csv / .json / .jsonl decisions files in the folder")
    merged: dict[tuple[str, int], tuple[str, str]] = {}
    for file in files:
        for key, decision in read_decisions(file).items():
            earlier = merged.get(key)
            if earlier is not None and earlier[0] != decision:
                raise ValueError(
                    f"image {key[0]!r} instance {key[1]}: {earlier[0]} in {earlier[1]}, {decision} in "
                    f"{file}; keep one"
                )
            merged[key] = (decision, file)
    into.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"image_id": k[0], "instance_id": k[1], "decision": d})
        for k, (d, _) in sorted(merged.items())
    ]
    into.write_text("\n".join(lines) + "\n")
    return str(into), files


def _split(curated: Path, train: Path, validation: Path, holdout: float) -> dict[str, int]:
    """Hold out ``holdout`` of the curated images (at least one, and at least one left to train), chosen by
    a hash of the image id: the same images for the same ids."""
    import hashlib

    from hqlabel.platform.instances import iter_instances, read_manifest, write_instances

    ids = [item.image_id for item in iter_instances(str(curated))]
    if len(ids) < 2:
        raise ValueError(
            f"curate kept masks on {len(ids)} image(s): too few to hold out validation; loosen the curate "
            "rules, or give validation.data"
        )
    ranked = sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())
    held = set(ranked[: min(len(ids) - 1, max(1, round(holdout * len(ids))))])
    provenance = read_manifest(str(curated)).get("provenance", {})
    for out, keep in ((train, False), (validation, True)):
        write_instances(
            (item for item in iter_instances(str(curated)) if (item.image_id in held) == keep),
            str(out),
            kind="curated",
            source=str(curated),
            provenance={**provenance, "split": "validation" if keep else "train", "holdout": holdout},
        )
    return {"train_images": len(ids) - len(held), "validation_images": len(held)}


def _stage_curate(fw: Flywheel) -> dict[str, Any]:
    from hqlabel.jobs.functions import curate

    spec = fw.spec
    folder = fw.path("curate")
    shutil.rmtree(folder, ignore_errors=True)  # a half-written earlier attempt
    rules = spec.curate
    decisions, decision_files = None, []
    if rules.decisions is not None:
        decisions, decision_files = _merge_decisions(rules.decisions, folder / "decisions.jsonl")
    manifest = curate(
        str(fw.labels(1)),
        out=str(folder / "curated"),
        min_pred_iou=rules.min_pred_iou,
        min_score=rules.min_score,
        min_area=rules.min_area,
        classes=spec.classes,
        decisions=decisions,
        **_storage_options(spec),
    )
    outputs: dict[str, Any] = {
        "curated": str(folder / "curated"),
        "decisions": decisions,
        "decision_files": decision_files,
        "counts": manifest["provenance"]["counts"],
        "decided": manifest["provenance"]["decisions"],
    }
    if manifest["num_instances"] == 0:
        raise ValueError(
            f"curate kept no masks of {fw.labels(1)}: nothing to train on; loosen curate's rules"
        )
    if spec.validation.holdout is not None:
        outputs.update(
            _split(folder / "curated", folder / "train", folder / "validation", spec.validation.holdout)
        )
        outputs.update(train_data=str(folder / "train"), validation=str(folder / "validation"))
    else:
        outputs.update(train_data=str(folder / "curated"), validation=spec.validation.data)
    return outputs


def _stage_train(fw: Flywheel) -> dict[str, Any]:
    from hqlabel.jobs.functions import RUN_OPTIONS, train

    spec, registry = fw.spec, fw.registry
    labeled, curated = fw.outputs("label"), fw.outputs("curate")
    run = fw.path("train")
    lineage = {"flywheel": str(fw.dir), "train_run": str(run)}
    existing = registry.find(**lineage)  # registered before a crash that came before the marker
    if existing is None:
        shutil.rmtree(run, ignore_errors=True)  # a half-finished earlier attempt starts over
        init = registry.weights(labeled["weights_version"])
        options = {"num_cpus": spec.num_cpus, **spec.train}
        summary = train(
            curated["train_data"],
            out=str(run),
            preset=spec.models.preset,
            base=spec.models.segmenter,
            init_weights=init,
            val_data=curated["validation"],
            images_root=spec.validation.images,
            **_storage_options(spec),
            **options,
        )
        config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
        best = summary["best"]
        weights = run / "best"
        if spec.candidate == "last":
            latest = json.loads((run / "checkpoints" / "latest.json").read_text())
            weights = run / "checkpoints" / Path(latest["path"]).name
        existing = registry.register(
            str(weights),
            kind="trained",
            lineage={
                **lineage,
                "base_model": spec.models.preset or spec.models.segmenter,
                "init_weights_version": labeled["weights_version"],
                "labels": labeled["labels"],
                "labels_weights_version": labeled["weights_version"],
                "curated": curated["curated"],
                "train_data": curated["train_data"],
                "decisions": curated["decisions"],
                "decision_files": curated["decision_files"],
                "curate_rules": spec.curate.model_dump(),
                "validation": curated["validation"],
                "training_config": config,
                "run_options": {k: v for k, v in options.items() if k in RUN_OPTIONS},
                "candidate": spec.candidate,
                "weights_from": str(weights),
                "random_weights": spec.models.preset is not None,
            },
            scores={"train_best": best},
        )
    return {"train_run": str(run), "candidate": existing["version"]}


def _scores(row: dict[str, Any]) -> dict[str, float]:
    return {"miou": row["miou"], "mbiou": row["mbiou"], "count": row["count"]}


def _stage_gate(fw: Flywheel) -> dict[str, Any]:
    import math

    from hqlabel.jobs.functions import evaluate

    spec, registry = fw.spec, fw.registry
    current = fw.outputs("label")["weights_version"]
    candidate = fw.outputs("train")["candidate"]
    validation = fw.outputs("curate")["validation"]
    current_weights, candidate_weights = registry.weights(current), registry.weights(candidate)
    weights = [w for w in (current_weights, candidate_weights) if w is not None]
    report = evaluate(
        validation,
        base=spec.models.segmenter,
        preset=spec.models.preset,
        weights=weights,
        out=str(fw.path("gate")),
        images=spec.validation.images,
        **_storage_options(spec),
    )
    rows = report["rows"]
    before = _scores(rows[2] if current_weights is not None else rows[1])
    after = _scores(rows[-1])
    if any(math.isnan(s[m]) for s in (before, after) for m in ("miou", "mbiou")):
        raise ValueError(
            f"validation set {validation} left no instance to score (all empty); give other data"
        )
    delta = {m: 100 * (after[m] - before[m]) for m in ("miou", "mbiou")}
    passed = delta["mbiou"] >= spec.gate.min_mbiou_delta and delta["miou"] >= spec.gate.min_miou_delta
    gate = {
        "gate": f"flywheel {fw.dir}",
        "validation": validation,
        "current": current,
        "candidate": candidate,
        "before": before,
        "after": after,
        "delta_points": delta,
        "thresholds": spec.gate.model_dump(),
        "passed": passed,
        "random_weights": spec.models.preset is not None,
    }
    fw.write_json(fw.path("gate", "gate.json"), gate)
    record = registry.get(candidate)
    if not any(g.get("gate") == gate["gate"] for g in record["gates"]):  # once, also after a crash
        registry.record_gate(candidate, gate, scores=after)
    if passed and registry.current() != candidate:
        registry.promote(candidate, by=gate["gate"])
    return gate


def _stage_relabel(fw: Flywheel) -> dict[str, Any] | None:
    """None (skipped) unless the gate promoted the candidate."""
    spec = fw.spec
    gate = fw.outputs("gate")
    if not gate["passed"]:
        return None
    old, new = fw.labels(1), fw.labels(2)
    version = gate["candidate"]
    if spec.relabel.shards == "all":
        outputs = _label_into(fw, new, spec.input, version)
        return {**outputs, "shards": "all", "previous": str(old)}
    quality = shard_quality(old)
    limit = spec.relabel.max_mean_pred_iou
    shards = [s for s, q in quality.items() if q is None or q < limit]
    outputs = {"labels": str(new), "weights_version": version, "previous": str(old), "quality": quality}
    if not shards:
        return {**outputs, "labels": None, "shards": [], "note": f"no shard under mean pred IoU {limit}"}
    work = fw.path("relabel")
    if not (work / "job" / "job.json").is_file():  # the selection stays while its labeling job resumes
        shutil.rmtree(work, ignore_errors=True)
        selection_input(old, shards, work / "input")
    _label_into(
        fw,
        work / "job",
        str(work / "input"),
        version,
        shard_size=None,
        id_column="image_id",
        image_column="image",
    )
    assemble(old, work / "job", new, shards)
    return {**outputs, "shards": shards}


def _stage_compare(fw: Flywheel) -> dict[str, Any] | None:
    from hqlabel.jobs.flywheel_compare import compare_labels

    relabel = fw.outputs("relabel")
    if relabel.get("labels") is None:
        return None
    gate = fw.outputs("gate")
    report = compare_labels(
        relabel["previous"],
        relabel["labels"],
        str(fw.path("compare")),
        validation={"before": gate["before"], "after": gate["after"], "data": gate["validation"]},
        limit=fw.spec.compare_limit,
        random_weights=fw.spec.models.preset is not None,
    )
    return {"report": str(fw.path("compare", "report.json")), "totals": report["totals"]}


_RUNNERS: dict[str, Callable[[Flywheel], dict[str, Any] | None]] = {
    "label": _stage_label,
    "curate": _stage_curate,
    "train": _stage_train,
    "gate": _stage_gate,
    "relabel": _stage_relabel,
    "compare": _stage_compare,
}
SKIP_REASONS = {"relabel": "the gate did not promote the candidate", "compare": "nothing was relabeled"}


def run_stage(spec: FlywheelSpec, stage: str) -> dict[str, Any]:
    """Run one stage (unless its marker exists) and write its marker; returns the marker."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; the stages are: {', '.join(STAGES)}")
    fw = Flywheel(spec)
    fw.save_spec()
    done = fw.marker(stage)
    if done is not None:
        fw.event(stage, "already-done")
        return done
    for earlier in STAGES[: STAGES.index(stage)]:
        if fw.marker(earlier) is None:
            raise RuntimeError(f"stage {stage} needs stage {earlier}, which has not finished in {fw.dir}")
    fw.event(stage, "start")
    started = time.monotonic()
    outputs = _RUNNERS[stage](fw)
    marker = {
        "stage": stage,
        "status": "done" if outputs is not None else "skipped",
        "finished_at": now(),
        "seconds": round(time.monotonic() - started, 1),
        "outputs": outputs if outputs is not None else {"reason": SKIP_REASONS[stage]},
    }
    fw.write_json(fw.path("stages", f"{stage}.json"), marker)
    fw.event(stage, marker["status"])
    return marker


def _skips(fw: Flywheel, stage: str) -> bool:
    """Whether ``stage`` has nothing to do: relabel after a failed gate, compare after no relabel."""
    if stage == "relabel":
        return not fw.outputs("gate")["passed"]
    if stage == "compare":
        return fw.outputs("relabel").get("labels") is None
    return False


def _is_jobs_api(address: str | None) -> bool:
    return address is not None and address.startswith(("http://", "https://"))


def _run_stage_job(client: Any, flywheel_file: str, stage: str) -> None:
    """Submit ``hqlabel flywheel stage FILE STAGE`` as a Ray Job and wait for it; its logs go to stdout."""
    from hqlabel.jobs.submit import TERMINAL, _status, entrypoint

    command = entrypoint(["flywheel", "stage", flywheel_file, stage])
    submission = client.submit_job(entrypoint=command, metadata={"hqlabel_flywheel_stage": stage})
    print(f"stage {stage}: submitted Ray Job {submission}", flush=True)
    status = _status(client.get_job_status(submission))
    while status not in TERMINAL:
        time.sleep(1.0)
        status = _status(client.get_job_status(submission))
    logs = client.get_job_logs(submission)
    sys.stdout.write(logs if logs.endswith("\n") or not logs else logs + "\n")
    if status != "SUCCEEDED":
        message = (client.get_job_info(submission).message or "").strip().splitlines()
        raise RuntimeError(
            f"stage {stage}: Ray Job {submission} {status}{': ' + message[-1] if message else ''}; fix the "
            "cause and run the flywheel again to resume at this stage"
        )


def run_flywheel(
    flywheel_file: str, *, address: str | None = None, wait: bool = True, echo: Callable[[str], None] = print
) -> dict[str, Any] | str:
    """Run the flywheel's stages in order, skipping those already done. Returns ``flywheel_status``, or
    with ``address`` a Jobs API URL from outside the cluster the driver job's final status."""
    spec = load_flywheel(flywheel_file)
    flywheel_file = str(Path(flywheel_file).resolve())
    if spec.models.preset is not None:
        echo(RANDOM_WARNING)
    if _is_jobs_api(address) and not os.environ.get(IN_CLUSTER_ENV):
        return _submit_driver(flywheel_file, address, wait)
    fw = Flywheel(spec)
    fw.save_spec()
    client = None
    if _is_jobs_api(address):
        from hqlabel.jobs.submit import _client

        client = _client(address)
    crash_after = os.environ.get(CRASH_ENV)
    for stage in STAGES:
        if fw.marker(stage) is not None:
            echo(f"stage {stage}: done earlier, skipped")
            fw.event(stage, "skip-done")
        else:
            echo(f"stage {stage}: running")
            if client is None or _skips(fw, stage):  # a skipped stage only writes its marker: no job
                run_stage(spec, stage)
            else:
                _run_stage_job(client, flywheel_file, stage)
            marker = fw.marker(stage)
            if marker is None:
                raise RuntimeError(f"stage {stage} finished without its marker in {fw.dir}/stages")
            echo(f"stage {stage}: {marker['status']}")
        if crash_after == stage:
            os._exit(3)  # the test hook: the driver dies, as a killed one would
    status = flywheel_status(spec)
    echo(status["text"])
    return status


def _submit_driver(flywheel_file: str, address: str, wait: bool) -> str:
    """Submit the driver (``hqlabel flywheel run FILE --address ADDRESS``) as a Ray Job of its own."""
    from hqlabel.jobs.submit import submit

    env = {IN_CLUSTER_ENV: "1"} | ({CRASH_ENV: os.environ[CRASH_ENV]} if CRASH_ENV in os.environ else {})
    return submit(address, ["flywheel", "run", flywheel_file, "--address", address], wait=wait, env_vars=env)


def flywheel_status(spec: FlywheelSpec) -> dict[str, Any]:
    """Each stage's marker (or pending), the registry's current version, the gate's verdict, as a dict with
    a ``text`` rendering."""
    fw = Flywheel(spec)
    stages = {stage: fw.marker(stage) for stage in STAGES}
    lines = [f"flywheel {fw.dir}"]
    if spec.models.preset is not None:
        lines.append("RANDOM WEIGHTS (models.preset tiny-random): the numbers below mean nothing")
    for stage, marker in stages.items():
        if marker is None:
            lines.append(f"  {stage:8s} pending")
            continue
        out = marker["outputs"]
        detail = {
            "label": lambda o: f"{o['labels']} with weights {o['weights_version']}",
            "curate": lambda o: f"kept {o['counts']['kept']} masks -> {o['train_data']}",
            "train": lambda o: f"candidate weights {o['candidate']} ({o['train_run']})",
            "gate": lambda o: (
                f"{'PASSED' if o['passed'] else 'FAILED'}: mBIoU {o['delta_points']['mbiou']:+.2f} "
                f"(>= {o['thresholds']['min_mbiou_delta']:+g}), mIoU {o['delta_points']['miou']:+.2f} "
                f"(>= {o['thresholds']['min_miou_delta']:+g}) points, {o['current']} -> {o['candidate']}"
            ),
            "relabel": lambda o: o.get("note") or f"{o['labels']} with weights {o['weights_version']}",
            "compare": lambda o: f"{o['report']}",
        }[stage]
        text = out["reason"] if marker["status"] == "skipped" else detail(out)
        lines.append(f"  {stage:8s} {marker['status']} {marker['finished_at']}: {text}")
    current = fw.registry.current()
    lines.append(f"registry {fw.registry.root}: current weights {current or '-'}")
    return {"dir": str(fw.dir), "stages": stages, "current": current, "text": "\n".join(lines)}
