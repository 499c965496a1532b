"""``hqlabel label``: read -> decode (CPU tasks) -> detect + segment (actor pool) -> write, on Ray Data.

Streaming end to end: the driver holds one small record per shard (id, count, where its rows are) and
per-batch counts; listing, reading, labeling, writing and the per-shard merges all run in Ray tasks and
actors, so the driver's memory grows with the number of shards, not of images, and no image or mask byte
passes through it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from hqlabel import __version__
from hqlabel.jobs.checks import (
    check_compile,
    check_device,
    check_hq_weights,
    check_pretrained,
    hq_weights_pin,
    model_pins,
    model_roles,
)
from hqlabel.jobs.cluster import describe_nodes, is_local, ray_init
from hqlabel.jobs.resources import ResourcePlan, object_store_limit, plan_label_job
from hqlabel.jobs.shared_paths import check_shared_paths
from hqlabel.jobs.spec import LabelJobSpec, absolute_path
from hqlabel.platform import storage
from hqlabel.platform.config import DEFAULT_DETECTOR, DEFAULT_SEGMENTER, LabelerConfig
from hqlabel.platform.hub import is_hub_revision
from hqlabel.platform.lease import OutputLease
from hqlabel.platform.readers import (
    DatasetInput,
    Shard,
    check_input_exists,
    list_input,
    read_parquet_shards,
)
from hqlabel.platform.references import ReferencePolicy
from hqlabel.workers.faults import ATTEMPTS, FAILPOINTS_ENV, AttemptLog, Failpoints
from hqlabel.workers.writer import (
    BOOKKEEPING_THREADS,
    carry_over,
    done_shards,
    finalize_shard,
    read_markers,
    reset_shards,
    retryable_error_ids,
    write_parts,
)

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS_WARNING = (
    "WARNING: --preset tiny-random builds tiny randomly initialised models: the boxes and masks it writes "
    "are meaningless. Use it to test the pipeline, never as labels."
)


@dataclass
class LabelSummary:
    """What a labeling job did (``hqlabel.label``'s result; also ``OUT/job.json`` ``summary``).

    Attributes:
        images: all images of the job, including shards finished by an earlier run; ``instances``, ``errors``
            likewise; ``images_this_run``: those labeled by this run, in ``seconds``; ``out``: the folder.
    """

    images: int  # all images of the job, including shards finished by an earlier run
    instances: int
    errors: int
    seconds: float
    out: str
    images_this_run: int = 0
    retryable_errors: int = 0  # of ``errors``: those ``--retry-errors`` relabels

    def __str__(self) -> str:
        rate = self.images_this_run / self.seconds if self.seconds > 0 else 0.0
        resumed = self.images - self.images_this_run
        earlier = f" ({resumed} from an earlier run)" if resumed else ""
        retry = (
            f" ({self.retryable_errors} retryable: rerun with --retry-errors)"
            if self.retryable_errors
            else ""
        )
        return (
            f"labeled {self.images} images{earlier}: {self.instances} instances, {self.errors} errors"
            f"{retry}; {self.images_this_run} images in {self.seconds:.1f} s ({rate:.2f} images/s) -> "
            f"{self.out}"
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


LISTING = "_listing"  # OUT/_listing/SHARD.parquet: the images of each shard of a folder or COCO input
OUTPUT_NAMES = ("masks", "errors", "images", "_tmp", "_done", LISTING, "_manifest.json", "job.json")


def _list(spec: LabelJobSpec, *, write: bool, earlier: list[Shard] | None = None) -> DatasetInput:
    return list_input(
        spec.input,
        listing=storage.join(spec.out, LISTING),
        write_listing=write,
        columns=spec.columns,
        options=spec.storage,
        shard_size=spec.shard_size,
        coco_images=spec.coco_images,
        need_boxes=spec.labeler.prompts == "boxes",
        earlier=earlier,
        allow=tuple(spec.allow_prefix),
        max_json_bytes=spec.max_json_bytes,
    )


def _changed_shards(before: dict, now: dict) -> list[str]:
    """Ids of the shards whose manifest entries differ (added, removed or changed)."""
    old = {e["id"]: e for e in before.get("shards", [])}
    new = {e["id"]: e for e in now["shards"]}
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def changed_settings(before: dict, now: dict, prefix: str = "") -> list[str]:
    """``"name: EARLIER -> NOW"`` for each setting that differs, nested ones dotted (``labeler.detector``).
    A relative input path of an older ``job.json`` counts as the same as its absolute path from here."""
    changed = []
    for name in sorted(before.keys() | now.keys()):
        old, new = before.get(name), now.get(name)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += changed_settings(old, new, f"{prefix}{name}.")
        elif name in ("input", "coco_images") and isinstance(old, str) and old != new:
            if absolute_path(old) != new:
                changed.append(f"{prefix}{name}: {old!r} -> {new!r}")
        elif old != new:
            changed.append(f"{prefix}{name}: {old!r} -> {new!r}")
    return changed


def prepare_output(spec: LabelJobSpec) -> tuple[DatasetInput, list[Shard]]:
    """Start a fresh run or resume an earlier one in ``spec.out``; returns the input and the shards to do.

    A fresh run lists the input into ``OUT/_listing`` (streaming; see ``list_input``) and records its shards
    in ``OUT/_manifest.json``. A rerun with the same spec resumes: the input is listed again without writing,
    and must give the same shards with the same fingerprints; shards with a completion marker are kept, the
    leftovers of the others are deleted and they are redone. A different spec or input needs ``--overwrite``
    (which deletes the earlier outputs). Storage requests: a constant number plus one per leftover to delete
    (in a thread pool), whatever the number of shards.
    """
    out, options = spec.out, spec.storage
    earlier = _read_json(storage.join(out, "job.json"), spec)
    if earlier is None or spec.overwrite:
        for name in OUTPUT_NAMES:
            storage.delete(storage.join(out, name), options)
        source = _list(spec, write=True)
        _write_json(storage.join(out, "_manifest.json"), source.manifest(), spec)
        return source, list(source.shards)
    before = {k: earlier["spec"].get(k) for k in LabelJobSpec.OUTPUT_FIELDS}
    if isinstance(before["labeler"], dict):  # fields added since (at their defaults) are no change
        pins = ("detector_revision", "segmenter_revision", "hq_weights_revision")
        unpinned = {k: getattr(spec.labeler, k) for k in pins}
        before["labeler"] = {**_labeler_defaults(), **unpinned, **before["labeler"]}  # older runs pinned none
    for name in LabelJobSpec.OUTPUT_FIELDS:  # a job.json from before the field existed: its default then
        if name not in earlier["spec"]:
            before[name] = LabelJobSpec.model_fields[name].get_default(call_default_factory=True)
    now = spec.model_dump(mode="json", include=set(LabelJobSpec.OUTPUT_FIELDS))
    changed = changed_settings(before, now)
    if changed:
        raise ValueError(
            f"{out} holds an earlier run with different settings ({'; '.join(changed)}); pass "
            "--overwrite to replace it, or choose another --out"
        )
    manifest = _read_json(storage.join(out, "_manifest.json"), spec) or {}
    known = [Shard.from_manifest(entry) for entry in manifest.get("shards", [])]
    source = _list(spec, write=False, earlier=known)
    differ = _changed_shards(manifest, source.manifest())
    if differ:
        shown = ", ".join(differ[:10]) + (f" and {len(differ) - 10} more" if len(differ) > 10 else "")
        raise ValueError(
            f"the input has changed since the earlier run in {out}: shard(s) {shown} differ (images added, "
            "removed, renamed or replaced); pass --overwrite to start over"
        )
    done = done_shards(out, options)
    pending = [shard for shard in source.shards if shard.shard_id not in done]
    reset_shards(out, [shard.shard_id for shard in pending], options)
    return source, pending


def prepare_retry(
    spec: LabelJobSpec, source: DatasetInput, pending: list[Shard]
) -> tuple[dict[str, list[str]], dict[str, int]]:
    """``--retry-errors``: reopen the finished shards that have retryable error rows (``carry_over``: their
    other rows become a temporary part, their marker goes), after ``prepare_output``.

    Only the shards whose markers count retryable errors are read (markers of older versions count none).

    Returns:
        ``(ids, todo)``: per reopened shard, the image ids to relabel, and how many of its input rows that is
        (rows with those ids: an id may repeat within a shard).
    """
    waiting = {shard.shard_id for shard in pending}
    finished = [shard for shard in source.shards if shard.shard_id not in waiting]
    markers = read_markers(spec.out, [shard.shard_id for shard in finished], spec.storage)
    reopen = [shard for shard in finished if markers.get(shard.shard_id, {}).get("retryable_errors")]
    if not reopen:
        return {}, {}
    with ThreadPoolExecutor(min(BOOKKEEPING_THREADS, len(reopen))) as pool:
        found = list(pool.map(lambda s: retryable_error_ids(spec.out, s.shard_id, spec.storage), reopen))
        reopen = [(shard, ids) for shard, ids in zip(reopen, found, strict=True) if ids]
        carried = list(
            pool.map(lambda item: carry_over(spec.out, item[0].shard_id, item[1], spec.storage), reopen)
        )
    ids = {shard.shard_id: sorted(found) for shard, found in reopen}
    todo = {shard.shard_id: shard.num_images - kept for (shard, _), kept in zip(reopen, carried, strict=True)}
    return ids, todo


def check_models(spec: LabelJobSpec) -> LabelJobSpec:
    """Fail fast in the driver, with an actionable message, when a model cannot be loaded
    (``check_pretrained``: the options the user set first; offline from the cache at once); returns ``spec``
    with its models pinned (``LabelerConfig.detector_revision`` / ``segmenter_revision``).

    A hub model is pinned to a commit hash (``hub.model_revision``): the revision the spec names, else the
    one an earlier run in ``spec.out`` recorded for the same model (a resumed run loads the same commit even
    when the hub's default branch has moved since), else the default branch's commit now. A local directory
    or ``.pth`` file gets a fingerprint of its files instead: a resumed run whose files changed is refused
    as a changed setting (``prepare_output``). A preset has none. ``--hq-weights`` gets a digest of its file
    (``hq_weights_revision``), presets too: a resumed run whose weights were replaced is refused the same way.
    """
    hq = hq_weights_pin(spec.labeler.hq_weights, spec.labeler.hq_weights_revision)
    spec = spec.model_copy(update={"labeler": spec.labeler.model_copy(update={"hq_weights_revision": hq})})
    if spec.labeler.preset is not None:
        return spec
    earlier = None if spec.overwrite else _read_json(storage.join(spec.out, "job.json"), spec)
    recorded = ((earlier or {}).get("spec") or {}).get("labeler") or {}
    defaults = {"detector": DEFAULT_DETECTOR, "segmenter": DEFAULT_SEGMENTER}
    revisions: dict[str, str | None] = {}
    models = []  # (name, what, option, default) of the models with a config to load
    for role in model_roles(spec.labeler):
        name = getattr(spec.labeler, role)
        revision = getattr(spec.labeler, f"{role}_revision")
        if (
            revision is None
            and recorded.get(role) == name
            and is_hub_revision(recorded.get(f"{role}_revision"))
        ):
            revision = recorded[f"{role}_revision"]
        revisions[f"--{role}"] = revision
        if not Path(name).expanduser().is_file():  # an original .pth checkpoint has no config
            models.append((name, role, f"--{role}", defaults[role]))
    check_pretrained(models, revisions=revisions)
    pinned = model_pins(spec.labeler, revisions)
    return spec.model_copy(update={"labeler": spec.labeler.model_copy(update=pinned)})


def only_images(batch, *, only: dict[str, list[str]]):
    """Ray Data UDF: the ``SOURCE_SCHEMA`` rows of ``batch`` to label, for ``--retry-errors``: of a shard in
    ``only``, the rows whose image id it lists; of any other shard, all. Positions (``row``) stay as read."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keep = pa.array([True] * batch.num_rows, pa.bool_())
    for shard, ids in only.items():
        in_shard = pc.equal(batch["shard"], shard)
        wanted = pc.is_in(batch["image_id"], pa.array(ids, pa.string()))
        keep = pc.and_(keep, pc.or_(pc.invert(in_shard), pc.fill_null(wanted, False)))
    return batch.filter(keep)


def input_dataset(
    shards: list[Shard], source: DatasetInput, spec: LabelJobSpec, only: dict[str, list[str]] | None = None
):
    """``SOURCE_SCHEMA`` rows of ``shards``, read in tasks from their Parquet sources (the dataset's own
    files, or the listing files of a folder or COCO input): the driver hands out one small row per shard.
    ``only``: per shard, the image ids to keep (``only_images``); other shards' rows are all kept."""
    import ray

    ds = ray.data.from_items([{"shard": s.shard_id, "source": s.source} for s in shards])
    ds = ds.map_batches(
        read_parquet_shards,
        batch_format="pyarrow",
        batch_size=1,
        num_cpus=0.25,  # I/O bound; the distinct request also keeps it a stage of its own
        fn_kwargs={
            "root": source.root,
            "columns": source.columns_override or spec.columns,
            "options": spec.storage,
        },
    )
    if only:
        ds = ds.map_batches(only_images, batch_format="pyarrow", num_cpus=0.25, fn_kwargs={"only": only})
    return ds


def init_ray(spec: LabelJobSpec) -> None:
    """Start or join Ray unless the caller already did (tests share one session-scoped instance)."""
    import ray

    if ray.is_initialized():
        return
    if spec.service:  # the service's cluster (hqlabel.jobs.service)
        from hqlabel.jobs.service import connect

        connect(spec.ray_address)
        return
    kwargs = {"address": spec.ray_address, "logging_level": logging.WARNING, "log_to_driver": True}
    if is_local(spec.ray_address):  # never a stray cluster: see cluster.ray_address
        kwargs.update(num_cpus=spec.num_cpus, include_dashboard=False)
    ray_init(**kwargs)  # joining a cluster: with its token


def build_pipeline(
    ds,
    spec: LabelJobSpec,
    plan: ResourcePlan,
    root: str,
    run_id: str | None = None,
    service: list | None = None,
):
    """Chain the steps after ``ds`` (from ``input_dataset``); placement and resources are set here alone.
    ``root``: the dataset root (``DatasetInput.root``), inside which image references must stay (with
    ``spec.allow_prefix``). ``run_id``: this run's (its lease's), which keys the labeling actors' attempt
    records. ``service``: the warm labeling actors of ``--service`` (``service.attach``), which label in
    place of a pool of the job's own."""

    from hqlabel.workers import decode_batch

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
            "references": ReferencePolicy(root, tuple(spec.allow_prefix)),
            "tile": spec.labeler.tile,  # tiled images keep their full resolution
        },
    )
    # Crashes are bounded (Ray Data's default is to restart actors and retry their tasks forever): a batch
    # that kills its actor is retried until its attempt record (hqlabel.workers.faults) isolates the image
    # at fault, within max_attempts(batch_size) attempts. Ray retries an actor's task only after the actor
    # died, so task retries get the restart cap: a task holding several batches may need the deaths of more
    # than one of them, and the restarts (spec.max_actor_restarts per actor, then the job stops) bind first.
    attempts = AttemptLog(storage.join(spec.out, "_tmp", ATTEMPTS), spec.batch_size, spec.storage, run_id)
    failpoints = os.environ.get(FAILPOINTS_ENV)  # a test hook (faults.Failpoints); normally unset
    Failpoints(failpoints)  # a malformed value fails here, in the driver, not in every actor
    if service is not None:
        from hqlabel.jobs.service import service_stage

        ds = service_stage(ds, spec, service, run_id or "", attempts, failpoints)
    else:
        ds = _labeling_pool(ds, spec, plan, attempts, failpoints)
    return ds.map_batches(
        write_parts,
        batch_format="pyarrow",
        batch_size=max(spec.batch_size, 32),
        num_cpus=plan.task_cpus,
        fn_kwargs={"out": spec.out, "options": spec.storage},
    )


def _labeling_pool(ds, spec: LabelJobSpec, plan: ResourcePlan, attempts: AttemptLog, failpoints: str | None):
    """The job's own pool of labeling actors (``LabelWorker``) after the decode step."""
    import ray

    from hqlabel.workers import LabelWorker

    # Bounded restarts (Ray Data's own default is unbounded) have no named parameter in Ray 2.60: they go as
    # ray_remote_args, which Ray deprecates for 2.64 (pyproject pins ray < 2.64); its warning would print on
    # every job. The actors spread over the nodes: DataContext's default scheduling strategy is SPREAD.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(
            LabelWorker,
            batch_format="pyarrow",
            batch_size=spec.batch_size,
            compute=ray.data.ActorPoolStrategy(**plan.actor_pool()),
            num_cpus=plan.actor_cpus,
            num_gpus=plan.actor_gpus,
            **({"resources": plan.actor_resources} if plan.actor_resources else {}),  # --actor-resource
            max_restarts=spec.max_actor_restarts,
            max_task_retries=spec.max_actor_restarts,
            fn_constructor_kwargs={
                "config": spec.labeler,
                "num_threads": plan.actor_threads,
                "attempts": attempts,
                "failpoints": failpoints,
            },
        )


def check_label_spec(spec: LabelJobSpec, *, warn: bool = True) -> LabelJobSpec:
    """The checks a job passes before anything starts or is written (the random-weights warning first, with
    ``warn``); returns ``spec`` with absolute paths and, without ``service``, its models pinned
    (``check_models``)."""
    if warn and spec.labeler.preset == "tiny-random":
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    # Workers on other machines or folders read and write the same places; job.json records them absolute.
    spec = spec.with_absolute_paths()
    check_input_exists(spec.input, spec.storage)  # the cheap checks first, before anything is written
    local = is_local(spec.ray_address) and not spec.service  # a service's cluster outlives this command
    check_device(spec.labeler.device, spec.labeler.precision, local=local)
    check_compile(spec.labeler.compile, spec.labeler.device, local=local)
    check_hq_weights(spec.labeler.hq_weights)
    if not spec.service:  # the service loaded its models: the job takes their revisions (service.attach)
        spec = check_models(spec)  # hub models pinned to commits (an earlier run's, when resuming)
    return spec


def run_label_job(
    spec: LabelJobSpec,
    *,
    progress: bool = True,
    warn: bool = True,
    on_progress: Callable[[int, int, int, int], None] | None = None,
) -> LabelSummary:
    """Run (or resume) a labeling job to completion; the summary is also saved in ``OUT/job.json``.
    ``warn``: print the random-weights warning (``check_label_spec``). ``on_progress(images done, images
    to do, shards merged, shards to do)``: called as the progress bar moves (the service's job runner
    polls it; an exception it raises stops the job, whose output stays resumable).

    Raises:
        RuntimeError: some shards could not be completed (rerun the same command to resume them).
    """
    spec = check_label_spec(spec, warn=warn)
    # One run writes to an output at a time: a second one is refused while this one holds the lease.
    new_folder = not storage.is_s3(spec.out) and not Path(spec.out).exists()
    try:
        with OutputLease(
            spec.out, spec.storage, ttl=spec.lease_ttl, what=f"hqlabel label {spec.input}"
        ) as lease:
            fresh = spec.overwrite or _read_json(storage.join(spec.out, "job.json"), spec) is None
            try:
                return _label(spec, lease, progress, on_progress)
            except BaseException:
                if fresh:  # a new run that failed before any shard completed leaves nothing to resume
                    with contextlib.suppress(OSError):
                        _discard_unstarted(spec)
                raise
    finally:
        if new_folder:  # the folder this run made, if nothing is left in it
            with contextlib.suppress(OSError):
                os.rmdir(spec.out)


def _discard_unstarted(spec: LabelJobSpec) -> None:
    """Delete what a new run wrote to ``spec.out`` when it failed before completing any shard (its
    ``job.json`` would refuse the corrected rerun's settings without ``--overwrite``); a run that completed
    shards is kept, to resume."""
    if done_shards(spec.out, spec.storage):
        return
    for name in OUTPUT_NAMES:
        storage.delete(storage.join(spec.out, name), spec.storage)


def check_shared_storage(spec: LabelJobSpec) -> None:
    """On a cluster of several nodes, refuse local paths that not every node sees (``check_shared_paths``):
    the input and model files the tasks and actors read, the output folder they write."""
    reads = {
        "INPUT": spec.input,
        "--coco-images": spec.coco_images,
        "--segmenter": spec.labeler.segmenter,
        "--hq-weights": spec.labeler.hq_weights,
        **{f"--allow-prefix {prefix}": prefix for prefix in spec.allow_prefix},
    }
    if spec.labeler.prompts == "detector":
        reads["--detector"] = spec.labeler.detector
    check_shared_paths(reads, {"--out": spec.out})


def _label(
    spec: LabelJobSpec, lease: OutputLease, progress: bool, on_progress: Callable | None = None
) -> LabelSummary:
    """``run_label_job`` once its checks passed and it holds the output's lease."""
    import ray

    # Ray and its checks come first: a refused plan or path leaves the output as it was.
    init_ray(spec)
    service = None
    if spec.service:  # the warm actors and their plan; refused when none runs or the models differ
        from hqlabel.jobs.service import attach

        spec, service, plan = attach(spec)
    else:
        plan = plan_label_job(spec)
    check_shared_storage(spec)
    source, pending = prepare_output(spec)
    retry, retry_todo = prepare_retry(spec, source, pending) if spec.retry_errors else ({}, {})
    record = {
        "job": "label",
        "spec": spec.model_dump(mode="json"),
        "models": {
            "detector": None
            if spec.labeler.prompts == "boxes"
            else spec.labeler.preset or spec.labeler.detector,
            "segmenter": spec.labeler.preset or spec.labeler.segmenter,
            "detector_revision": None if spec.labeler.prompts == "boxes" else spec.labeler.detector_revision,
            "segmenter_revision": spec.labeler.segmenter_revision,
            "hq_weights": spec.labeler.hq_weights,
            "random_weights": spec.labeler.preset == "tiny-random",
        },
        "resources": asdict(plan),
        "versions": _versions(),
        "started_at": datetime.now(timezone.utc).isoformat(),
        "shards": {
            "total": len(source.shards),
            "resumed_done": len(source.shards) - len(pending) - len(retry),
            "retried": len(retry),  # finished shards reopened by --retry-errors
        },
        "retried_images": sum(retry_todo.values()),
    }
    _write_json(storage.join(spec.out, "job.json"), record, spec)

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    limits = context.execution_options.resource_limits  # restored below: the context outlives the job
    context.execution_options.resource_limits = limits.copy(
        object_store_memory=object_store_limit(plan, spec.batch_size, spec.max_side)
    )
    try:
        return _run_pipeline(
            spec,
            source,
            pending,
            plan,
            record,
            progress,
            lease,
            retry,
            retry_todo,
            service=service,
            on_progress=on_progress,
        )
    finally:
        context.execution_options.resource_limits = limits


MERGES_IN_FLIGHT = 8  # shard merges running at once (at least; 2 per labeling actor on large clusters)


def _run_pipeline(
    spec: LabelJobSpec,
    source: DatasetInput,
    pending: list[Shard],
    plan: ResourcePlan,
    record: dict,
    progress: bool,
    lease: OutputLease,
    retry: dict[str, list[str]],
    retry_todo: dict[str, int],
    *,
    service: list | None = None,
    on_progress: Callable[[int, int, int, int], None] | None = None,
) -> LabelSummary:
    """The labeling itself: ``run_label_job`` after its checks and set-up. ``retry`` / ``retry_todo``: the
    finished shards reopened by ``--retry-errors`` (``prepare_retry``), whose listed images are labeled too.

    The driver only counts: each stats row says how many images of a shard were written. Once a shard's
    images have all arrived its merge (``finalize_shard``) runs as a Ray task, next to the stream, so no mask
    byte passes through the driver and the stream keeps being pulled while shards merge.
    """
    import ray
    from tqdm import tqdm

    merge = ray.remote(finalize_shard).options(num_cpus=plan.task_cpus, max_retries=3)
    start = time.perf_counter()
    reopened = [shard for shard in source.shards if shard.shard_id in retry]
    totals = {shard.shard_id: shard.num_images for shard in [*pending, *reopened]}  # images once merged
    expected = {shard.shard_id: shard.num_images for shard in pending} | retry_todo  # to arrive this run
    arrived = dict.fromkeys(expected, 0)
    running: dict[ray.ObjectRef, str] = {}
    finished: dict[str, dict] = {}
    tried: set[str] = set()

    def collect(wait_for: int) -> None:
        """Take the results of finished merges (waiting until at most ``wait_for`` still run)."""
        while running:
            done, _ = ray.wait(list(running), num_returns=1, timeout=0 if len(running) <= wait_for else None)
            if not done:
                return
            shard = running.pop(done[0])
            marker = ray.get(done[0])
            if marker is not None:
                finished[shard] = marker
                bar.set_postfix(shards=f"{len(finished)}/{len(expected)}")
                if on_progress is not None:
                    on_progress(sum(arrived.values()), todo_images, len(finished), len(expected))

    nodes: Counter[str | None] = Counter()  # images labeled per Ray node
    todo_images = sum(expected.values())
    with tqdm(total=todo_images, unit="img", desc="labeling", disable=not progress, file=sys.stderr) as bar:
        if on_progress is not None:
            on_progress(0, todo_images, 0, len(expected))
        if pending or reopened:
            ds = input_dataset([*pending, *reopened], source, spec, only=retry)
            ds = build_pipeline(ds, spec, plan, source.root, lease.run_id, service)
            try:
                for stats in ds.iter_rows():
                    lease.check()  # stop writing at once if another run has taken the output over
                    shard = stats["shard"]
                    arrived[shard] += stats["images"]
                    nodes[stats["node_id"]] += stats["images"]
                    bar.update(stats["images"])
                    if on_progress is not None:
                        on_progress(sum(arrived.values()), todo_images, len(finished), len(expected))
                    if shard not in tried and arrived[shard] >= expected[shard]:
                        tried.add(shard)
                        running[merge.remote(spec.out, shard, totals[shard], spec.storage)] = shard
                    collect(
                        wait_for=max(MERGES_IN_FLIGHT, 2 * plan.max_actors) - 1
                    )  # beyond: the stream waits
            except ray.exceptions.ActorDiedError as e:  # restarts spent (a task error would be a bug: raised)
                collect(wait_for=0)  # the shards merged so far stay finished
                raise RuntimeError(
                    f"a labeling actor died more often than --max-actor-restarts ({spec.max_actor_restarts}) "
                    f"allows ({len(finished)} shard(s) finished); rerun the same command to resume, with a "
                    "higher --max-actor-restarts if the crashes are frequent"
                ) from e
        collect(wait_for=0)
        # Shards whose count was off (retried batches counted twice, or a merge that found images missing):
        # everything has been written now, so one more merge each decides.
        for shard in expected:
            if shard not in finished:
                running[merge.remote(spec.out, shard, totals[shard], spec.storage)] = shard
        collect(wait_for=0)
    earlier = read_markers(
        spec.out, [s.shard_id for s in source.shards if s.shard_id not in finished], spec.storage
    )
    markers = {**earlier, **finished}
    incomplete = [s.shard_id for s in source.shards if s.shard_id not in markers]
    done = list(markers.values())
    summary = LabelSummary(
        images=sum(m["images"] for m in done),
        instances=sum(m["instances"] for m in done),
        errors=sum(m["errors"] for m in done),
        seconds=time.perf_counter() - start,
        out=spec.out,
        images_this_run=sum(expected[shard] for shard in finished),
        retryable_errors=sum(m.get("retryable_errors", 0) for m in done),
    )
    if not incomplete:
        storage.delete(storage.join(spec.out, "_tmp"), spec.storage)
    record.update(summary=asdict(summary), finished_at=datetime.now(timezone.utc).isoformat())
    record["shards"]["incomplete"] = incomplete
    record["nodes"] = describe_nodes(nodes)
    _write_json(storage.join(spec.out, "job.json"), record, spec)
    if incomplete:
        raise RuntimeError(
            f"{len(incomplete)} shard(s) did not complete ({', '.join(incomplete[:10])}); rerun the same "
            "command to resume them"
        )
    return summary
