"""``hqlabel train``: retrain the HQ token on curated or ground-truth masks, as a Ray Train job.

Same command on a laptop (local Ray, CPU workers over gloo) and on a GPU cluster (one worker per GPU,
NCCL); checkpoints go to ``--out``, local or s3://.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hqlabel.jobs.args import add_storage_args, resource_amount
from hqlabel.jobs.checks import check_pretrained, check_train_extra
from hqlabel.jobs.cluster import ADDRESS_HELP, is_local, ray_init
from hqlabel.jobs.resources import check_custom_resources, cluster_capacity, plan_training, resource_slots
from hqlabel.jobs.shared_paths import check_shared_paths
from hqlabel.platform import storage
from hqlabel.platform.config import DEFAULT_SEGMENTER, PRESETS
from hqlabel.training.config import TrainConfig

logger = logging.getLogger(__name__)


def check_inputs(config: TrainConfig) -> None:
    """Fail in the driver, in one line, before Ray Train starts: the train extra missing, unreadable data, a
    base that cannot load."""
    check_train_extra()
    from hqlabel.platform.instances import open_instances

    for what, uri in (("--data", config.data), ("--val-data", config.val_data)):
        if uri is None:
            continue
        images = open_instances(uri, config.storage, images_root=config.images_root)
        if next(images, None) is None:
            raise ValueError(f"{what} {uri} holds no images with masks")
    if config.preset is None and not Path(config.base).is_file():  # an original .pth has no config
        check_pretrained([(config.base, "segmenter", "--base", DEFAULT_SEGMENTER)])  # offline: in seconds


def pin_data(config: TrainConfig) -> TrainConfig:
    """``config`` with ``data_revision`` set from its data's files (``training.data.data_revision``), so that
    checkpoints record it and ``--resume`` refuses data that changed since.

    Raises:
        ValueError: a ``data_revision`` given by hand that the files do not match, with the fix.
    """
    from hqlabel.training.data import data_revision

    found = data_revision(config)
    if config.data_revision is not None and config.data_revision != found:
        raise ValueError(
            f"--data: the files of {config.data}{f' and {config.val_data}' if config.val_data else ''} have "
            f"changed (their digest is {found}, {config.data_revision} is expected); pass the data that "
            "revision names, or drop data_revision"
        )
    return config.model_copy(update={"data_revision": found})


WORKERS = "workers"  # RUN/workers/rank-N.json: where each worker of the latest run (or resume) ran


def _train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: records where this worker runs (``RUN/workers/rank-N.json``: rank,
    Ray node id, host), then ``recipe.train_worker``."""
    import ray
    import ray.train

    from hqlabel.training.recipe import train_worker

    config = TrainConfig(**loop_config["train"])
    rank = ray.train.get_context().get_world_rank()
    record = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname()}
    uri = storage.join(config.out, WORKERS, f"rank-{rank:04d}.json")
    storage.write_bytes(uri, json.dumps(record).encode(), config.storage)
    train_worker(loop_config)


def worker_nodes(out: str, workers: int, options: storage.StorageOptions) -> dict[str, list[int]]:
    """Ray node id -> the ranks that ran there, from ``RUN/workers/`` (written by ``_train_loop``)."""
    nodes: dict[str, list[int]] = {}
    for rank in range(workers):
        record = json.loads(storage.read_bytes(storage.join(out, WORKERS, f"rank-{rank:04d}.json"), options))
        nodes.setdefault(record["node_id"], []).append(rank)
    return nodes


def check_shared_storage(config: TrainConfig) -> None:
    """On a cluster of several nodes, refuse local paths that not every node sees (``check_shared_paths``):
    every worker reads the data, base and initial weights; checkpoints written by rank 0 are read by every
    worker on ``--resume``, and Ray Train keeps its run folder in ``--out``."""
    reads = {
        "--data": config.data,
        "--val-data": config.val_data,
        "--images": config.images_root,
        "--init-weights": config.init_weights,
        "--base": None if config.preset else config.base,
    }
    check_shared_paths(reads, {"--out": config.out})


def run_train_job(
    config: TrainConfig,
    *,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    worker_resources: Mapping[str, float] | None = None,
    resume: bool = False,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    max_failures: int = 0,
) -> dict[str, Any]:
    """Run the training with Ray Train's ``TorchTrainer``; returns ``{"history", "best", "out", "workers",
    "nodes"}`` (``nodes``: Ray node id -> the ranks that ran there).

    ``worker_resources``: custom Ray resources each worker asks for (``--worker-resource``), to place the
    workers on the nodes that offer them; refused when the nodes offer room for fewer workers.
    ``max_failures``: worker failures (a killed or lost worker, an error) after which Ray Train restarts
    every worker, which resume from the run's latest checkpoint; one more fails the run.
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from hqlabel.training.checkpoint import check_resume, check_run_folder
    from hqlabel.training.recipe import FAULT_ENV

    if max_failures < 0:
        raise ValueError(f"--max-failures must be >= 0 (failures to recover from), got {max_failures}")
    worker_resources = check_custom_resources(dict(worker_resources or {}), "--worker-resource")
    config = config.with_absolute_paths()
    options = config.storage
    check_inputs(config)
    config = pin_data(config)  # recorded with every checkpoint; compared on --resume
    check_run_folder(config.out, resume=resume, options=options)
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"address": ray_address, "logging_level": logging.WARNING}
        if is_local(ray_address):  # never a stray cluster: see cluster.ray_address
            # The dashboard (with ray[default]) serves the state API that Ray Train's clean-up watcher polls;
            # without it that watcher logs a warning every few seconds.
            kwargs.update(num_cpus=num_cpus)
        ray_init(**kwargs)  # joining a cluster: with its token
    resources = ray.cluster_resources()
    plan = plan_training(resources.get("CPU", 0), resources.get("GPU", 0), workers, gpus_per_worker)
    if worker_resources:
        slots = resource_slots(worker_resources, cluster_capacity().nodes, "--worker-resource")
        if plan.workers > slots:
            raise ValueError(
                f"{plan.workers} training workers with --worker-resource need more than the nodes offer now "
                f"(room for {slots}); lower --workers, or add nodes that offer it"
            )
    if resume:  # before Ray Train starts its workers
        check_resume(config.out, config, plan.workers, options)
    check_shared_storage(config)
    per_worker = {"CPU": plan.cpus} | ({"GPU": plan.gpus} if plan.gpus else {}) | worker_resources
    # Ray Train's own run folder (logs, no checkpoints: HQLabel writes those to --out itself).
    ray_storage = None if storage.is_s3(config.out) else os.path.abspath(storage.join(config.out, "ray"))
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"train": config.model_dump(), "resume": resume},
        scaling_config=ScalingConfig(
            num_workers=plan.workers, use_gpu=plan.gpus > 0, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=f"hqlabel-train-{uuid.uuid4().hex[:8]}",
            storage_path=ray_storage,
            failure_config=FailureConfig(max_failures=max_failures),
            # the worker-failure tests' fault injection (recipe._fault_point) reaches the workers
            worker_runtime_env={"env_vars": {FAULT_ENV: os.environ[FAULT_ENV]}}
            if FAULT_ENV in os.environ
            else None,
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # re-raised: a worker's input error becomes the CLI's one line
        cause = _worker_input_error(e)
        if cause is None:
            raise
        raise cause from e
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    history = json.loads(storage.read_bytes(storage.join(config.out, "metrics.json"), options))
    best = json.loads(storage.read_bytes(storage.join(config.out, "best", "metrics.json"), options))
    nodes = worker_nodes(config.out, plan.workers, options)
    return {"history": history, "best": best, "out": config.out, "workers": plan.workers, "nodes": nodes}


def _worker_input_error(error: Exception) -> Exception | None:
    """The first worker's ValueError / OSError inside Ray Train's ``WorkerGroupError``, re-created in its
    own type (so the CLI shows it in one line), or None for any other failure."""
    for failure in getattr(error, "worker_failures", {}).values():
        cause = getattr(failure, "cause", failure)  # a RayTaskError wraps the worker's exception
        if isinstance(cause, (ValueError, OSError)):
            try:
                return type(cause)(str(cause))
            except TypeError:
                return ValueError(str(cause))
    return None


def _range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (e.g. 0.1,2.0), got {text!r}") from e
    return low, high


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="retrain the HQ token on curated or ground-truth masks (Ray Train)",
        description="Train HQ-SAM's HQ modules (SAM frozen) on --data; checkpoints, metrics, best/ in --out.",
    )
    p.add_argument(
        "--data", required=True, help="instance dataset (curate/import-gt), COCO JSON or mask folder"
    )
    p.add_argument("--out", required=True, help="run folder, local or s3://")
    p.add_argument("--val-data", help="validation masks (default: hold out --val-fraction of --data)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of --data (0.1)")
    p.add_argument("--images", help="COCO input: image folder (default: the JSON's folder)")
    p.add_argument("--base", default=DEFAULT_SEGMENTER, help="frozen SAM-HQ: hub id, local dir or .pth")
    p.add_argument("--preset", choices=PRESETS, help="tiny random SAM-HQ base (offline smoke runs)")
    p.add_argument("--init-weights", help="HQ weights to start from (default: the base model's)")
    p.add_argument("--epochs", type=int, default=12, help="epochs (12)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (1e-3)")
    p.add_argument("--lr-drop-epoch", type=int, default=10, help="lr x 0.1 after this epoch (10)")
    p.add_argument("--batch-size", type=int, default=4, help="images per step per worker (4)")
    p.add_argument(
        "--instances-per-image",
        "--max-instances",
        type=int,
        default=8,
        help="objects of an image trained per step, at most; drawn anew each epoch (8; sam-hq: 1)",
    )
    p.add_argument("--jitter", type=_range, default=(0.1, 2.0), help="large-scale jitter range (0.1,2.0)")
    p.add_argument(
        "--val-mask",
        choices=["hq", "sam+hq"],
        default="hq",
        help="mask that validation scores to pick the best epoch: the HQ token's alone, as sam-hq (hq), "
        "or SAM + HQ logits, as labeling (sam+hq)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--workers", type=int, help="Ray Train workers (default: one per GPU, else 1)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (default 1 with GPUs, else 0)")
    p.add_argument(
        "--worker-resource",
        type=resource_amount,
        action="append",
        default=[],
        metavar="NAME=AMOUNT",
        help="a custom Ray resource each worker asks for, placing the workers on the nodes that offer it "
        "(e.g. accelerator_type:A100); repeatable; refused when the nodes offer too little",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    p.add_argument(
        "--max-failures",
        type=int,
        default=0,
        help="worker failures to recover from: Ray Train restarts the workers, which resume from the last "
        "checkpoint (0)",
    )
    p.add_argument(
        "--loader-threads", type=int, default=2, help="threads per worker decoding and augmenting batches (2)"
    )
    add_storage_args(p)
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from hqlabel.training.evaluate import format_percent

    if args.preset:
        print(
            f"hqlabel: warning: --preset {args.preset} trains a randomly initialised model; "
            "its numbers mean nothing"
        )
    from hqlabel.jobs.functions import train

    summary = train(
        args.data,
        out=args.out,
        preset=args.preset,
        max_failures=args.max_failures,
        val_data=args.val_data,
        val_fraction=args.val_fraction,
        images_root=args.images,
        base=args.base,
        init_weights=args.init_weights,
        epochs=args.epochs,
        lr=args.lr,
        lr_drop_epoch=args.lr_drop_epoch,
        batch_size=args.batch_size,
        instances_per_image=args.instances_per_image,
        jitter=args.jitter,
        val_mask=args.val_mask,
        seed=args.seed,
        loader_threads=args.loader_threads,
        s3_endpoint=args.s3_endpoint,
        s3_region=args.s3_region,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        worker_resources=dict(args.worker_resource),
        resume=args.resume,
        ray_address=args.address,
        num_cpus=args.num_cpus,
    )
    first, best = summary["history"][0], summary["best"]

    def scores(record: dict) -> str:
        return f"{format_percent(record.get('val_miou'))} / {format_percent(record.get('val_mbiou'))}"

    print(
        f"trained {len(summary['history']) - 1} epoch(s) on {summary['workers']} worker(s) "
        f"({len(summary['nodes'])} node(s)) -> {summary['out']}\n"
        f"validation mIoU / mBIoU: untrained {scores(first)}, "
        + (
            f"best (epoch {best['epoch']}) {scores(best)}\n"
            if best["epoch"]
            else "no epoch beat the untrained HQ token: best/ holds the base's HQ weights\n"
        )
        + (
            f"validation left out {first['val_empty']} empty prediction(s) of empty ground truth\n"
            if first.get("val_empty")
            else ""
        )
        + f"relabel with: hqlabel label ... --hq-weights {storage.join(summary['out'], 'best')}"
    )
    return 0
