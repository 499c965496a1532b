"""Training checkpoints on local disk or S3: everything ``--resume`` needs to continue exactly.

    RUN/config.json                             the resolved TrainConfig
    RUN/checkpoints/epoch-0003/hq_weights.safetensors   HQ modules only (``save_hq_weights`` format)
    RUN/checkpoints/epoch-0003/trainer.pt       optimizer + lr scheduler state
    RUN/checkpoints/epoch-0003/state.json       epoch, metrics history, best so far, config (+ "world")
    RUN/checkpoints/latest.json                 {"epoch": 3, "path": ...}, written after the epoch folder
    RUN/best/hq_weights.safetensors             the best validation mBIoU so far (``--hq-weights RUN/best``)
    RUN/best/metrics.json
    RUN/metrics.json                            per-epoch history

Randomness is reseeded at every epoch start (each example's from (seed, epoch, its place in the epoch), the
prompts' and loss points' from (seed, epoch, rank)), so resuming from the end of epoch k reproduces the
uninterrupted run; no RNG state needs saving. That holds for the same number of workers only (each worker's
share of an epoch, its seed and the gradient average depend on it), so the checkpoint's config
records the world (``config["world"]``: workers, per-worker batch and share) and ``--resume`` with another
``--workers`` is refused.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import SamHQModel

from hqlabel.platform import storage
from hqlabel.platform.storage import StorageOptions
from hqlabel.segmenters.hq_weights import HQ_WEIGHTS_FILE, hq_weights_bytes, load_hq_weights
from hqlabel.training.config import TrainConfig


@dataclass
class TrainerState:
    """Where a run stands after ``epoch`` (0-based) finished."""

    epoch: int
    history: list[dict[str, Any]]
    best: dict[str, Any] | None
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]


def epoch_dir(out: str, epoch: int) -> str:
    return storage.join(out, "checkpoints", f"epoch-{epoch:04d}")


def _write_json(uri: str, doc: Any, options: StorageOptions) -> None:
    storage.write_bytes(uri, json.dumps(doc, indent=2, default=str).encode(), options)


def _write_weights(model: SamHQModel, uri: str, base: str, extra: dict, options: StorageOptions) -> None:
    storage.write_bytes(uri, hq_weights_bytes(model, base_model=base, extra=extra), options)


def save_checkpoint(
    out: str,
    epoch: int,
    model: SamHQModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    history: list[dict[str, Any]],
    best: dict[str, Any] | None,
    config: dict[str, Any],
    world: dict[str, int],
    base: str,
    options: StorageOptions = StorageOptions(),
) -> str:
    """Write the checkpoint of a finished ``epoch``, then point ``latest.json`` at it. Returns its folder.

    ``world``: ``{"workers": N, ...}`` (``world_layout``), saved as the config's ``"world"``.
    """
    if "workers" not in world:
        raise ValueError(f"world must name the number of workers, got {world}; build it with world_layout()")
    folder = epoch_dir(out, epoch)
    _write_weights(model, storage.join(folder, HQ_WEIGHTS_FILE), base, {"epoch": epoch}, options)
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    storage.write_bytes(storage.join(folder, "trainer.pt"), buffer.getvalue(), options)
    state = {"epoch": epoch, "history": history, "best": best, "config": {**config, "world": world}}
    _write_json(storage.join(folder, "state.json"), state, options)
    _write_json(storage.join(out, "checkpoints", "latest.json"), {"epoch": epoch, "path": folder}, options)
    _write_json(storage.join(out, "metrics.json"), history, options)
    return folder


def save_best(
    out: str, model: SamHQModel, metrics: dict[str, Any], *, base: str, options: StorageOptions
) -> str:
    """Write ``RUN/best/`` (weights + metrics). Returns the weights' URI."""
    uri = storage.join(out, "best", HQ_WEIGHTS_FILE)
    _write_weights(model, uri, base, {"metrics": metrics}, options)
    _write_json(storage.join(out, "best", "metrics.json"), metrics, options)
    return uri


def latest_epoch(out: str, options: StorageOptions = StorageOptions()) -> int | None:
    """The last finished epoch of the run at ``out``, or None when it has no checkpoint."""
    uri = storage.join(out, "checkpoints", "latest.json")
    if not storage.exists(uri, options):
        return None
    return int(json.loads(storage.read_bytes(uri, options))["epoch"])


def check_run_folder(out: str, *, resume: bool, options: StorageOptions = StorageOptions()) -> None:
    """Refuse to start over a run that has checkpoints, or to resume one that has none.

    Raises:
        FileNotFoundError: ``resume`` but ``out`` has no checkpoint.
        ValueError: not ``resume`` but ``out`` already holds a run.
    """
    has_run = latest_epoch(out, options) is not None
    if resume and not has_run:
        raise FileNotFoundError(
            f"--resume: {out} has no checkpoint (checkpoints/latest.json) to resume; drop --resume to start"
        )
    if not resume and has_run:
        raise ValueError(f"{out} already holds a training run; pass --resume, or choose a new --out")


def world_layout(workers: int, batch_size: int, images: int) -> dict[str, int]:
    """How an epoch of ``images`` training images is split: ``workers``, each taking ``images_per_worker``
    (padded to equal shares) in ``steps_per_epoch`` steps of ``batch_size_per_worker`` images."""
    per_worker = math.ceil(images / workers)
    return {
        "workers": workers,
        "batch_size_per_worker": batch_size,
        "images_per_worker": per_worker,
        "steps_per_epoch": math.ceil(per_worker / batch_size),
    }


def _latest_state(out: str, options: StorageOptions) -> dict[str, Any] | None:
    """The latest checkpoint's ``state.json``, or None for a run without checkpoints."""
    epoch = latest_epoch(out, options)
    if epoch is None:
        return None
    return json.loads(storage.read_bytes(storage.join(epoch_dir(out, epoch), "state.json"), options))


def _refuse_other_workers(out: str, state: dict[str, Any], workers: int) -> None:
    saved = state["config"].get("world", {}).get("workers")
    if saved is not None and saved != workers:
        raise ValueError(
            f"--resume: {out} was trained with {saved} worker(s), this run has {workers}; rerun with "
            f"--workers {saved}, or start a new run (a new --out)"
        )


def check_workers(out: str, workers: int, options: StorageOptions = StorageOptions()) -> None:
    """Refuse to resume the run at ``out`` with another number of workers than its latest checkpoint's.

    A checkpoint without ``"world"`` (written before it was recorded) is accepted.

    Raises:
        ValueError: the counts differ; the message names both and the fix.
    """
    state = _latest_state(out, options)
    if state is not None:
        _refuse_other_workers(out, state, workers)


def check_resume(
    out: str, config: TrainConfig, workers: int, options: StorageOptions = StorageOptions()
) -> None:
    """In the driver, before any worker starts: ``config`` with ``workers`` may resume the run at ``out``
    (its latest checkpoint's worker count, as ``check_workers``, then its settings,
    ``TrainConfig.resume_error``), from one read of that checkpoint's state. A run without checkpoints passes
    (``check_run_folder`` reports it).

    Raises:
        ValueError: the workers, the settings or the data differ, with the fix.
    """
    state = _latest_state(out, options)
    if state is None:
        return
    _refuse_other_workers(out, state, workers)
    error = config.resume_error(state["config"])
    if error:
        raise ValueError(error)


def load_checkpoint(
    out: str, model: SamHQModel, options: StorageOptions = StorageOptions()
) -> tuple[TrainerState, dict[str, Any]]:
    """Load the latest checkpoint's HQ weights into ``model``; return the trainer state and saved config."""
    epoch = latest_epoch(out, options)
    if epoch is None:
        raise FileNotFoundError(f"{out} has no checkpoint (checkpoints/latest.json); drop --resume to start")
    folder = epoch_dir(out, epoch)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / HQ_WEIGHTS_FILE
        local.write_bytes(storage.read_bytes(storage.join(folder, HQ_WEIGHTS_FILE), options))
        load_hq_weights(model, local)
    trainer = torch.load(
        io.BytesIO(storage.read_bytes(storage.join(folder, "trainer.pt"), options)), weights_only=True
    )
    state = json.loads(storage.read_bytes(storage.join(folder, "state.json"), options))
    return (
        TrainerState(epoch, state["history"], state["best"], trainer["optimizer"], trainer["scheduler"]),
        state["config"],
    )
