"""``hqlabel label``: read -> decode (CPU tasks) -> detect + segment (actor pool) -> write, on Ray Data.

Streaming end to end: the driver holds only per-batch counts, so memory does not grow with the dataset.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from hqlabel import __version__
from hqlabel.jobs.resources import ResourcePlan, object_store_limit, plan_resources
from hqlabel.jobs.spec import LabelJobSpec
from hqlabel.platform import storage
from hqlabel.platform.config import LabelerConfig
from hqlabel.platform.hub import load_pretrained
from hqlabel.platform.readers import DatasetInput, Shard, list_input, read_parquet_shards
from hqlabel.workers.writer import finalize_shard, read_marker, reset_shard, write_parts

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS_WARNING = (
    "WARNING: --preset tiny-random builds tiny randomly initialised models: the boxes and masks it writes "
    "are meaningless. Use it to test the pipeline, never as labels."
)


@dataclass
class LabelSummary:
    images: int  # all images of the job, including shards finished by an earlier run
    instances: int
    errors: int
    seconds: float
    out: str
    images_this_run: int = 0

    def __str__(self) -> str:
        rate = self.images_this_run / self.seconds if self.seconds > 0 else 0.0
        resumed = self.images - self.images_this_run
        earlier = f" ({resumed} from an earlier run)" if resumed else ""
        return (
            f"labeled {self.images} images{earlier}: {self.instances} instances, {self.errors} errors; "
            f"{self.images_this_run} images in {self.seconds:.1f} s ({rate:.2f} images/s) -> {self.out}"
        )


def _versions() -> dict[str, str]:
    import pyarrow
    import ray
    import torch
    import transformers

    return {
        "hqlabel": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
    }


def _read_json(uri: str, spec: LabelJobSpec) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri, spec.storage))
    except FileNotFoundError:
        return None


def _write_json(uri: str, data: dict, spec: LabelJobSpec) -> None:
    storage.write_bytes(uri, json.dumps(data, indent=2).encode(), spec.storage)


def _labeler_defaults() -> dict:
    """``LabelerConfig``'s defaults, as JSON values: what a ``job.json`` of an older version implies."""
    return {
        name: field.get_default(call_default_factory=True)
        for name, field in LabelerConfig.model_fields.items()
        if not field.is_required()
    }


def prepare_output(spec: LabelJobSpec, source: DatasetInput) -> list[Shard]:
    """Start a fresh run or resume an earlier one in ``spec.out``; returns the shards still to do.

    A rerun with the same spec resumes: shards with a completion marker are kept, the others are reset and
    redone. A different spec or input needs ``--overwrite`` (which deletes the earlier outputs).
    """
    out, options = spec.out, spec.storage
    manifest = {"shards": [shard.manifest() for shard in source.shards]}
    earlier = _read_json(storage.join(out, "job.json"), spec)
    if earlier is not None and not spec.overwrite:
        before = {k: earlier["spec"].get(k) for k in LabelJobSpec.OUTPUT_FIELDS}
        if isinstance(before["labeler"], dict):  # fields added since (at their defaults) are no change
            before["labeler"] = {**_labeler_defaults(), **before["labeler"]}
        now = spec.model_dump(mode="json", include=set(LabelJobSpec.OUTPUT_FIELDS))
        changed = sorted(k for k in LabelJobSpec.OUTPUT_FIELDS if before[k] != now[k])
        if changed:
            raise ValueError(
                f"{out} holds an earlier run with different settings ({', '.join(changed)}); pass "
                "--overwrite to replace it, or choose another --out"
            )
        if _read_json(storage.join(out, "_manifest.json"), spec) != manifest:
            raise ValueError(
                f"the input has changed since the earlier run in {out} (its shards differ); pass --overwrite "
                "to start over"
            )
    else:
        for name in ("masks", "errors", "images", "_tmp", "_done", "_manifest.json", "job.json"):
            storage.delete(storage.join(out, name), options)
        _write_json(storage.join(out, "_manifest.json"), manifest, spec)
    pending = []
    for shard in source.shards:
        if read_marker(out, shard.shard_id, options) is None:
            reset_shard(out, shard.shard_id, options)
            pending.append(shard)
    return pending


def check_models(spec: LabelJobSpec) -> None:
    """Fail fast in the driver, with an actionable message, when a model cannot be loaded."""
    if spec.labeler.preset is not None:
        return
    from transformers import AutoConfig

    if spec.labeler.prompts == "detector":
        load_pretrained(
            AutoConfig.from_pretrained, spec.labeler.detector, what="detector", option="--detector"
        )
    if not Path(spec.labeler.segmenter).expanduser().is_file():  # an original .pth checkpoint has no config
        load_pretrained(
            AutoConfig.from_pretrained, spec.labeler.segmenter, what="segmenter", option="--segmenter"
        )


def input_dataset(shards: list[Shard], source: DatasetInput, spec: LabelJobSpec):
    """``SOURCE_SCHEMA`` rows of ``shards``: listed rows (folders, COCO), or Parquet files read in tasks."""
    import ray

    if source.kind != "parquet":
        return ray.data.from_items([row for shard in shards for row in shard.rows])
    ds = ray.data.from_items([{"shard": s.shard_id, "source": s.source} for s in shards])
    return ds.map_batches(
        read_parquet_shards,
        batch_format="pyarrow",
        batch_size=1,
        num_cpus=0.25,  # I/O bound; the distinct request also keeps it a stage of its own
        fn_kwargs={"root": source.root, "columns": spec.columns, "options": spec.storage},
    )


def init_ray(spec: LabelJobSpec) -> None:
    """Start or join Ray unless the caller already did (tests share one session-scoped instance)."""
    import ray

    if ray.is_initialized():
        return
    kwargs = {"address": spec.ray_address, "logging_level": logging.WARNING, "log_to_driver": True}
    if spec.ray_address is None:
        kwargs.update(num_cpus=spec.num_cpus, include_dashboard=False)
    ray.init(**kwargs)


def build_pipeline(ds, spec: LabelJobSpec, plan: ResourcePlan):
    """Chain the steps after ``ds`` (from ``input_dataset``); placement and resources are set here alone."""
    import ray

    from hqlabel.workers import LabelWorker, decode_batch

    ds = ds.map_batches(
        decode_batch,
        batch_format="pyarrow",
        batch_size=spec.batch_size,
        num_cpus=plan.task_cpus,
        fn_kwargs={
            "max_pixels": spec.max_pixels,
            "max_bytes": spec.max_bytes,
            "max_side": spec.max_side,
            "options": spec.storage,
        },
    )
    ds = ds.map_batches(
        LabelWorker,
        batch_format="pyarrow",
        batch_size=spec.batch_size,
        compute=ray.data.ActorPoolStrategy(size=plan.num_actors),
        num_cpus=plan.actor_cpus,
        num_gpus=plan.actor_gpus,
        fn_constructor_kwargs={"config": spec.labeler, "num_threads": plan.actor_threads},
    )
    return ds.map_batches(
        write_parts,
        batch_format="pyarrow",
        batch_size=max(spec.batch_size, 32),
        num_cpus=plan.task_cpus,
        fn_kwargs={"out": spec.out, "options": spec.storage},
    )


def run_label_job(spec: LabelJobSpec, *, progress: bool = True) -> LabelSummary:
    """Run (or resume) a labeling job to completion; the summary is also saved in ``OUT/job.json``.

    Raises:
        RuntimeError: some shards could not be completed (rerun the same command to resume them).
    """
    import ray

    if spec.labeler.preset == "tiny-random":
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    if not storage.is_s3(spec.out):  # workers on other machines or folders must write to the same place
        spec = spec.model_copy(update={"out": storage.resolve(spec.out)[1]})
    source = list_input(
        spec.input,
        columns=spec.columns,
        options=spec.storage,
        shard_size=spec.shard_size,
        coco_images=spec.coco_images,
        need_boxes=spec.labeler.prompts == "boxes",
    )
    check_models(spec)
    pending = prepare_output(spec, source)
    init_ray(spec)
    resources = ray.cluster_resources()
    plan = plan_resources(resources.get("CPU", 0), resources.get("GPU", 0), spec.num_workers)
    record = {
        "job": "label",
        "spec": spec.model_dump(mode="json"),
        "models": {
            "detector": None
            if spec.labeler.prompts == "boxes"
            else spec.labeler.preset or spec.labeler.detector,
            "segmenter": spec.labeler.preset or spec.labeler.segmenter,
            "hq_weights": spec.labeler.hq_weights,
            "random_weights": spec.labeler.preset == "tiny-random",
        },
        "resources": asdict(plan),
        "versions": _versions(),
        "started_at": datetime.now(timezone.utc).isoformat(),
        "shards": {"total": len(source.shards), "resumed_done": len(source.shards) - len(pending)},
    }
    _write_json(storage.join(spec.out, "job.json"), record, spec)

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    limits = context.execution_options.resource_limits  # restored below: the context outlives the job
    context.execution_options.resource_limits = limits.copy(
        object_store_memory=object_store_limit(plan, spec.batch_size, spec.max_side)
    )
    try:
        return _run_pipeline(spec, source, pending, plan, record, progress)
    finally:
        context.execution_options.resource_limits = limits


def _run_pipeline(
    spec: LabelJobSpec,
    source: DatasetInput,
    pending: list[Shard],
    plan: ResourcePlan,
    record: dict,
    progress: bool,
) -> LabelSummary:
    """The labeling itself: ``run_label_job`` after its checks and set-up."""
    from tqdm import tqdm

    start = time.perf_counter()
    expected = {shard.shard_id: shard.num_images for shard in pending}
    arrived = dict.fromkeys(expected, 0)
    finished: dict[str, dict] = {}
    todo_images = sum(expected.values())
    with tqdm(total=todo_images, unit="img", desc="labeling", disable=not progress, file=sys.stderr) as bar:
        if pending:
            ds = build_pipeline(input_dataset(pending, source, spec), spec, plan)
            for stats in ds.iter_rows():
                shard = stats["shard"]
                arrived[shard] += stats["images"]
                bar.update(stats["images"])
                if shard not in finished and arrived[shard] >= expected[shard]:
                    marker = finalize_shard(spec.out, shard, expected[shard], spec.storage)
                    if marker is not None:
                        finished[shard] = marker
                        bar.set_postfix(shards=f"{len(finished)}/{len(pending)}")
        for shard in expected:  # shards whose count was off (retried batches): try once more
            if shard not in finished:
                marker = finalize_shard(spec.out, shard, expected[shard], spec.storage)
                if marker is not None:
                    finished[shard] = marker
    markers = [read_marker(spec.out, s.shard_id, spec.storage) for s in source.shards]
    incomplete = [s.shard_id for s, m in zip(source.shards, markers, strict=True) if m is None]
    done = [m for m in markers if m is not None]
    summary = LabelSummary(
        images=sum(m["images"] for m in done),
        instances=sum(m["instances"] for m in done),
        errors=sum(m["errors"] for m in done),
        seconds=time.perf_counter() - start,
        out=spec.out,
        images_this_run=sum(m["images"] for m in finished.values()),
    )
    if not incomplete:
        storage.delete(storage.join(spec.out, "_tmp"), spec.storage)
    record.update(summary=asdict(summary), finished_at=datetime.now(timezone.utc).isoformat())
    record["shards"]["incomplete"] = incomplete
    _write_json(storage.join(spec.out, "job.json"), record, spec)
    if incomplete:
        raise RuntimeError(
            f"{len(incomplete)} shard(s) did not complete ({', '.join(incomplete[:10])}); rerun the same "
            "command to resume them"
        )
    return summary
