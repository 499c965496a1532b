"""``hqlabel label``: read -> decode (CPU tasks) -> detect + segment (actor pool) -> write, on Ray Data.

Streaming end to end: the driver holds only per-batch counts, so memory does not grow with the dataset.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from hqlabel import __version__
from hqlabel.jobs.resources import ResourcePlan, plan_resources
from hqlabel.jobs.spec import LabelJobSpec
from hqlabel.platform.hub import load_pretrained
from hqlabel.platform.readers import DatasetInput, list_input, read_row_groups

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS_WARNING = (
    "WARNING: --preset tiny-random builds tiny randomly initialised models: the boxes and masks it writes "
    "are meaningless. Use it to test the pipeline, never as labels."
)


@dataclass
class LabelSummary:
    images: int
    instances: int
    errors: int
    seconds: float
    out: str

    def __str__(self) -> str:
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        return (
            f"labeled {self.images} images ({rate:.2f} images/s): {self.instances} instances, "
            f"{self.errors} errors, {self.seconds:.1f} s -> {self.out}"
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


def prepare_output(spec: LabelJobSpec) -> Path:
    """Create the output folder; refuse to mix with an earlier run's results unless ``overwrite``."""
    out = Path(spec.out).expanduser().resolve()
    earlier = [out / "masks", out / "errors", out / "job.json"]
    if any(p.exists() for p in earlier):
        if not spec.overwrite:
            raise ValueError(
                f"{out} already holds the results of an earlier run; pass --overwrite to replace them "
                "or choose another --out"
            )
        for p in earlier:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    for sub in ("masks", "errors"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    return out


def check_models(spec: LabelJobSpec) -> None:
    """Fail fast in the driver, with an actionable message, when a model cannot be loaded."""
    if spec.labeler.preset is not None:
        return
    from transformers import AutoConfig

    load_pretrained(AutoConfig.from_pretrained, spec.labeler.detector, what="detector", option="--detector")
    load_pretrained(
        AutoConfig.from_pretrained, spec.labeler.segmenter, what="segmenter", option="--segmenter"
    )


def input_dataset(source: DatasetInput, spec: LabelJobSpec):
    """Rows with ``image_id`` plus ``path`` (folders) or ``image`` bytes (Parquet: a row group a task)."""
    import ray

    ds = ray.data.from_items(source.items)
    if source.kind == "parquet":
        ds = ds.map_batches(
            read_row_groups,
            batch_format="pyarrow",
            batch_size=1,
            num_cpus=0.25,  # I/O bound; the distinct request also keeps it a stage of its own
            fn_kwargs={"id_column": spec.id_column, "image_column": spec.image_column},
        )
    return ds


def init_ray(spec: LabelJobSpec) -> None:
    """Start or join Ray unless the caller already did (tests share one session-scoped instance)."""
    import ray

    if ray.is_initialized():
        return
    kwargs = {"address": spec.ray_address, "logging_level": logging.WARNING, "log_to_driver": True}
    if spec.ray_address is None:
        kwargs.update(num_cpus=spec.num_cpus, include_dashboard=False)
    ray.init(**kwargs)


def build_pipeline(ds, spec: LabelJobSpec, plan: ResourcePlan, out: Path):
    """Chain the steps after ``ds`` (from ``input_dataset``); placement and resources are set here alone."""
    import ray

    from hqlabel.workers import LabelWorker, decode_batch, write_results

    ds = ds.map_batches(
        decode_batch,
        batch_format="pyarrow",
        batch_size=spec.batch_size,
        num_cpus=plan.task_cpus,
        fn_kwargs={
            "max_pixels": spec.max_pixels,
            "max_side": spec.max_side,
        },
    )
    ds = ds.map_batches(
        LabelWorker,
        batch_format="pyarrow",
        batch_size=spec.batch_size,
        compute=ray.data.ActorPoolStrategy(size=plan.num_actors),
        num_cpus=plan.actor_cpus,
        num_gpus=plan.actor_gpus,
        fn_constructor_kwargs={"config": spec.labeler, "num_threads": max(1, int(plan.actor_cpus))},
    )
    return ds.map_batches(
        write_results,
        batch_format="pyarrow",
        batch_size=max(spec.batch_size, 32),
        num_cpus=plan.task_cpus,
        fn_kwargs={"out_dir": str(out)},
    )


def run_label_job(spec: LabelJobSpec, *, progress: bool = True) -> LabelSummary:
    """Run a labeling job to completion and return its summary (also saved in ``OUT/job.json``)."""
    import ray
    from tqdm import tqdm

    if spec.labeler.preset == "tiny-random":
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    source = list_input(spec.input, id_column=spec.id_column, image_column=spec.image_column)
    check_models(spec)
    out = prepare_output(spec)
    init_ray(spec)
    resources = ray.cluster_resources()
    plan = plan_resources(resources.get("CPU", 0), resources.get("GPU", 0), spec.num_workers)
    record = {
        "job": "label",
        "spec": spec.model_dump(mode="json"),
        "models": {
            "detector": spec.labeler.preset or spec.labeler.detector,
            "segmenter": spec.labeler.preset or spec.labeler.segmenter,
            "random_weights": spec.labeler.preset == "tiny-random",
        },
        "resources": asdict(plan),
        "versions": _versions(),
        "started_at": datetime.now(timezone.utc).isoformat(),
    }
    (out / "job.json").write_text(json.dumps(record, indent=2))

    ray.data.DataContext.get_current().enable_progress_bars = False
    start = time.perf_counter()
    ds = build_pipeline(input_dataset(source, spec), spec, plan, out)
    total = source.num_images
    images = instances = errors = 0
    with tqdm(total=total, unit="img", desc="labeling", disable=not progress, file=sys.stderr) as bar:
        for stats in ds.iter_rows():
            images += stats["images"]
            instances += stats["instances"]
            errors += stats["errors"]
            bar.update(stats["images"])
            bar.set_postfix(instances=instances, errors=errors)
    summary = LabelSummary(images, instances, errors, time.perf_counter() - start, str(out))
    if images != total:
        raise RuntimeError(
            f"the pipeline accounted for {images} images of {total}; the outputs are incomplete"
        )
    record.update(summary=asdict(summary), finished_at=datetime.now(timezone.utc).isoformat())
    (out / "job.json").write_text(json.dumps(record, indent=2))
    return summary
