"""The HQ-token training recipe: one function per worker, read top to bottom.

``run_training`` is plain torch and runs in any process; ``train_worker`` is the Ray Train entry
(``TorchTrainer(train_worker, ...)``) that passes it the worker's rank, world size and device. With several
workers, each takes an equal share of every epoch's images and the step runs under
``DistributedDataParallel``, which averages the HQ parameters' gradients across workers. Rank 0 writes every
file.

Per step and worker: ``batch_size`` images, each with up to ``instances_per_image`` of its objects, flipped
and large-scale jittered to the encoder's square input by background threads ahead of the step
(``training/data.py``: each worker reads only its share's rows); the frozen encoder runs without
gradients; per image one prompt kind is drawn (GT box, positive points, or a noisy low-res mask); the HQ
logits alone (``hq_token_only``) are scored with BCE + dice on uncertain points against the jittered GT masks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hqlabel.platform import storage
from hqlabel.platform.instances import ImageInstances
from hqlabel.segmenters import HQSamSegmenter, Prompts, build_segmenter
from hqlabel.training import checkpoint
from hqlabel.training.config import TrainConfig
from hqlabel.training.data import Example, ExampleLoader, load_splits
from hqlabel.training.evaluate import evaluate_segmenter, shard
from hqlabel.training.losses import mask_loss
from hqlabel.training.metrics import MaskMetrics
from hqlabel.training.model import encode, freeze_all_but_hq
from hqlabel.training.prompts import masks_to_boxes, noisy_masks, sample_points, sample_prompt_type
from hqlabel.workers.labeler import resolve_device

logger = logging.getLogger(__name__)

Report = Callable[[dict[str, Any]], None]


def train_step(
    segmenter: HQSamSegmenter, examples: list[Example], config: TrainConfig, generator: torch.Generator
) -> tuple[torch.Tensor, int]:
    """The loss of one step (BCE + dice on uncertain points of the HQ logits) and its number of masks."""
    images = np.stack([e.image for e in examples])
    embeddings = encode(segmenter, images, [e.valid for e in examples])
    side = 4 * embeddings.image_embeddings.shape[-1]  # the decoder's low-res mask size
    logits, targets = [], []
    for i, example in enumerate(examples):
        if len(example.masks) == 0:
            continue
        masks = torch.from_numpy(example.masks)
        kind = sample_prompt_type(generator, config.prompt_types)
        if kind == "box":
            prompts = Prompts(boxes=masks_to_boxes(masks))
        elif kind == "point":
            prompts = Prompts(points=sample_points(masks, config.num_prompt_points, generator=generator))
        else:
            low = F.interpolate(masks[:, None].float(), (side, side), mode="bilinear", align_corners=False)
            prompts = Prompts(masks=noisy_masks(low[:, 0], generator=generator))
        image_logits, _ = segmenter.decode_logits(embeddings[i], prompts)
        logits.append(image_logits[:, :1])
        targets.append(masks[:, None].float().to(segmenter.device))
    if not logits:  # every object cropped away: a zero loss still joins the gradient all-reduce
        zero = sum(p.sum() for p in segmenter.model.parameters() if p.requires_grad) * 0.0
        return zero, 0
    bce, dice = mask_loss(
        torch.cat(logits), torch.cat(targets), num_points=config.num_points, generator=generator
    )
    return bce + dice, int(sum(len(t) for t in targets))


class TrainStep(torch.nn.Module):
    """``train_step`` as a module, so that ``DistributedDataParallel`` can wrap it: one forward (all the
    decoder calls of a step) and one backward per step, whose gradients DDP averages across workers."""

    def __init__(self, segmenter: HQSamSegmenter, config: TrainConfig) -> None:
        super().__init__()
        self.model = segmenter.model  # registered, so DDP sees (and syncs) its parameters
        self.segmenter, self.config = segmenter, config

    def forward(self, examples: list[Example], generator: torch.Generator) -> tuple[torch.Tensor, int]:
        return train_step(self.segmenter, examples, self.config, generator)


def _distributed(step: TrainStep, device: torch.device) -> torch.nn.Module:
    """DDP over the HQ parameters (the frozen ones have no gradients to sync). A worker's step may use no
    HQ parameter at all (every object cropped away), hence ``find_unused_parameters``."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
    return DistributedDataParallel(step, device_ids=device_ids, find_unused_parameters=True)


def _all_sum(values: list[float], world_size: int, device: torch.device) -> list[float]:
    """Element-wise sums of ``values`` across the workers. The tensor lives on the worker's ``device`` (the
    model's): NCCL, the process group of GPU workers, rejects CPU tensors."""
    if world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _barrier(device: torch.device) -> None:
    """Wait for every worker. On GPU workers NCCL's barrier is an all-reduce on a GPU: name the worker's."""
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index if device.index is not None else torch.cuda.current_device()])
    else:
        dist.barrier()


def validate(
    segmenter: HQSamSegmenter,
    val: Sequence[ImageInstances],
    config: TrainConfig,
    rank: int,
    world_size: int,
) -> dict[str, Any]:
    """mIoU / mBIoU with GT-box prompts on the validation images, each worker a share, summed across.

    The masks scored are ``config.val_mask``'s: the HQ logits alone ("hq", sam-hq's validation) or SAM + HQ
    logits ("sam+hq"). Returns ``MaskMetrics.summary()``: ``empty`` counts the empty/empty pairs left out.
    """
    hq_token_only = segmenter.hq_token_only
    segmenter.hq_token_only = config.val_mask == "hq"
    try:
        metrics = evaluate_segmenter(segmenter, shard(val, rank, world_size))
    finally:
        segmenter.hq_token_only = hq_token_only
    state = metrics.state()
    keys = sorted(state)
    summed = _all_sum([float(state[k]) for k in keys], world_size, segmenter.device)
    return MaskMetrics.from_state(dict(zip(keys, summed, strict=True))).summary()


def run_training(
    config: TrainConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
    resume: bool = False,
    report: Report | None = None,
) -> dict[str, Any]:
    """Train the HQ modules of ``config.base`` on ``config.data``; write checkpoints to ``config.out``.

    Args:
        rank, world_size: this worker's place (torch.distributed must be initialised when world_size > 1).
        device: default ``config.device``.
        resume: continue from the run's latest checkpoint (refused when its config differs in anything but
            ``TrainConfig.RESUMABLE_CHANGES``, or was trained with another ``world_size``); without it, a
            run folder that has checkpoints is refused.
        report: called on every worker with each epoch's metrics (Ray Train's ``ray.train.report``).

    Returns:
        ``{"history": [...], "best": {...}, "out": ...}``; history entry 0 is the untrained HQ token's.
    """
    options = config.storage
    checkpoint.check_run_folder(config.out, resume=resume, options=options)
    device = torch.device(device) if device is not None else resolve_device(config.device)
    segmenter = build_segmenter(
        config.base, preset=config.preset, hq_weights=config.init_weights, hq_token_only=True, device=device
    )
    params = freeze_all_but_hq(segmenter.model)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=config.lr_drop_epoch, gamma=config.lr_gamma
    )
    train, val = load_splits(config)
    size = segmenter.pad_size[0]
    start, history, best = 1, [], None
    if resume:
        checkpoint.check_workers(config.out, world_size, options)
        state, saved = checkpoint.load_checkpoint(config.out, segmenter.model, options)
        error = config.resume_error(saved)
        if error:
            raise ValueError(error)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        start, history, best = state.epoch + 1, state.history, state.best
    if rank == 0:
        logger.info(
            "training %d HQ parameters on %d images (%d validation), %d worker(s)",
            sum(p.numel() for p in params), len(train), len(val), world_size,
        )  # fmt: skip
        storage.write_bytes(
            storage.join(config.out, "config.json"), config.model_dump_json(indent=2).encode(), options
        )
    if not history:  # the untrained HQ token: the baseline, and the best until an epoch beats it
        history.append({"epoch": 0, **_prefixed("val_", validate(segmenter, val, config, rank, world_size))})
        if len(val):
            best = history[0]
            if rank == 0:
                checkpoint.save_best(
                    config.out, segmenter.model, best, base=config.base_name, options=options
                )

    step_module = TrainStep(segmenter, config)
    if world_size > 1:
        step_module = _distributed(step_module, device)
    world = checkpoint.world_layout(world_size, config.batch_size, len(train))
    steps = world["steps_per_epoch"]
    fault = _fault_point()
    for epoch in range(start, config.epochs + 1):
        # Reseeded every epoch: resuming after epoch k replays epoch k+1 exactly.
        order = np.random.default_rng([config.seed, epoch]).permutation(len(train))
        padded = np.resize(order, world["images_per_worker"] * world_size)  # equal shares
        mine = np.arange(rank, len(padded), world_size)  # this worker's slots of the epoch's order
        batches = [mine[s * config.batch_size : (s + 1) * config.batch_size] for s in range(steps)]
        loader = ExampleLoader(
            train, padded, batches, size, config, epoch,
            threads=config.loader_threads, prefetch=config.prefetch_batches,
        )  # fmt: skip
        seed = np.random.default_rng([config.seed, epoch, 0, rank]).integers(2**62)
        generator = torch.Generator().manual_seed(int(seed))
        loss_sum, mask_count = 0.0, 0
        for step, examples in enumerate(loader):
            if fault is not None:
                fault(rank, epoch, step)
            optimizer.zero_grad(set_to_none=True)
            loss, count = step_module(examples, generator)
            loss.backward()  # under DDP, gradients arrive averaged across workers
            optimizer.step()
            loss_sum += loss.item() * count
            mask_count += count
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        loss_sum, mask_count = _all_sum([loss_sum, float(mask_count)], world_size, device)
        record = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": loss_sum / max(mask_count, 1.0),
            "train_masks": int(mask_count),
            **_prefixed("val_", validate(segmenter, val, config, rank, world_size)),
        }
        history.append(record)
        improved = best is None or not len(val) or _better(record, best)
        if improved:
            best = record
        if rank == 0:
            if improved:
                checkpoint.save_best(
                    config.out, segmenter.model, record, base=config.base_name, options=options
                )
            checkpoint.save_checkpoint(
                config.out, epoch, segmenter.model, optimizer, scheduler,
                history=history, best=best, config=config.result_fields(), world=world, base=config.base_name,
                options=options,
            )  # fmt: skip
            logger.info("epoch %d: %s", epoch, record)
        if report is not None:
            report(record)
        if world_size > 1:
            _barrier(device)  # the checkpoint is written before any worker goes on
    return {"history": history, "best": best, "out": config.out}


def _better(record: dict[str, Any], best: dict[str, Any]) -> bool:
    mbiou, best_mbiou = record.get("val_mbiou"), best.get("val_mbiou")
    if best_mbiou is None or math.isnan(best_mbiou):
        return True
    return mbiou is not None and not math.isnan(mbiou) and mbiou > best_mbiou


def _prefixed(prefix: str, summary: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}{k}": v for k, v in summary.items()}


FAULT_ENV = "HQLABEL_TRAIN_FAULT"


def _fault_point() -> Callable[[int, int, int], None] | None:
    """Fault injection for the worker-failure tests: ``HQLABEL_TRAIN_FAULT=RANK:EPOCH:STEP:MARKER`` makes
    worker RANK kill its own process (SIGKILL, as the OOM killer or a lost node would) before step STEP
    (0-based) of epoch EPOCH, once: it first creates the file MARKER, and does nothing if it exists."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    rank_s, epoch_s, step_s, marker = spec.split(":", 3)
    where = (int(rank_s), int(epoch_s), int(step_s))

    def fault(rank: int, epoch: int, step: int) -> None:
        if (rank, epoch, step) == where and not os.path.exists(marker):
            Path(marker).write_text(json.dumps({"rank": rank, "epoch": epoch, "step": step}))
            os.kill(os.getpid(), signal.SIGKILL)

    return fault


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: ``config`` = ``{"train": TrainConfig dump, "resume": bool}``.

    Ray Train calls it again on every worker after a worker failure (``FailureConfig(max_failures)``); the
    driver refused to start a new run over a run folder with checkpoints, so a checkpoint found here was
    written by this run: the restarted workers resume from it.
    """
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    train = TrainConfig(**config["train"])
    resume = config["resume"]
    restarted = not resume and checkpoint.latest_epoch(train.out, train.storage) is not None
    if restarted and context.get_world_rank() == 0:
        logger.warning(
            "restarted after a worker failure: resuming from epoch %d",
            checkpoint.latest_epoch(train.out, train.storage),
        )
    run_training(
        train,
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=ray.train.torch.get_device(),
        resume=resume or restarted,
        report=lambda metrics: ray.train.report(metrics),
    )
