"""The recipe across 2 workers under a real gloo process group (2 processes): every collective's tensors on
the worker's device, and a checkpoint that remembers how many workers wrote it.

How the devices are checked: every ``torch.distributed`` collective (all_reduce, barrier, broadcast, ...)
reaches torch's dispatcher as a ``c10d.*`` op, which a ``TorchDispatchMode`` sees with its tensors; nothing in
the code under test is patched or wrapped. On this CPU-only machine the worker's device is the CPU, so the
2-process run proves the sums and records no stray device; the ``meta`` test stands in for a GPU worker (NCCL
refuses the CPU tensors that the old ``_all_sum`` built): its collective must receive a meta tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from hqlabel.training import checkpoint
from hqlabel.training.config import TrainConfig
from hqlabel.training.recipe import _all_sum, _barrier, run_training
from hqlabel.training.synthetic import write_fine_structure_dataset


class CollectiveDevices(TorchDispatchMode):
    """Records ``(op name, devices of its tensor arguments)`` for every ``c10d`` op dispatched under it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, set[str]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            devices: set[str] = set()

            def visit(value) -> None:
                if isinstance(value, torch.Tensor):
                    devices.add(value.device.type)
                elif isinstance(value, (list, tuple)):
                    for item in value:
                        visit(item)

            visit(args)
            visit(list((kwargs or {}).values()))
            self.calls.append((func.name(), devices))
        return func(*args, **(kwargs or {}))


def _config(data: str, out: str, **kwargs) -> TrainConfig:
    defaults = dict(
        data=data, out=out, preset="tiny-random", epochs=1, batch_size=2, val_fraction=0.25, num_points=256
    )
    return TrainConfig(**(defaults | kwargs))


def _worker(rank: int, store: str, config: dict, resume: bool, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        sums = _all_sum([float(rank), 1.0], 2, torch.device("cpu"))
        with CollectiveDevices() as recorder:
            run_training(TrainConfig(**config), rank=rank, world_size=2, device="cpu", resume=resume)
            _barrier(torch.device("cpu"))
        calls = [(name, sorted(devices)) for name, devices in recorder.calls]
        Path(results, f"{rank}.json").write_text(json.dumps({"sums": sums, "calls": calls}))
    finally:
        dist.destroy_process_group()


def _run_two_workers(tmp_path: Path, config: TrainConfig, *, resume: bool, name: str) -> list[dict]:
    results = tmp_path / name
    results.mkdir()
    store = tmp_path / f"{name}.store"
    mp.spawn(_worker, args=(str(store), config.model_dump(), resume, str(results)), nprocs=2, join=True)
    return [json.loads((results / f"{rank}.json").read_text()) for rank in range(2)]


def test_two_workers_sum_on_their_device_and_resume_only_with_two(tmp_path):
    data = str(tmp_path / "data")
    write_fine_structure_dataset(data, 8, size=96, seed=3)
    out = str(tmp_path / "run")
    for worker in _run_two_workers(tmp_path, _config(data, out), resume=False, name="first"):
        assert worker["sums"] == [1.0, 2.0]
        names = [name for name, _ in worker["calls"]]
        assert "c10d::allreduce_" in names and "c10d::barrier" in names
        assert all(devices in ([], ["cpu"]) for _, devices in worker["calls"]), worker["calls"]

    state = json.loads((Path(out) / "checkpoints" / "epoch-0001" / "state.json").read_text())
    assert state["config"]["world"] == {
        "workers": 2,
        "batch_size_per_worker": 2,
        "images_per_worker": 3,
        "steps_per_epoch": 2,
    }  # 6 training images of 8: 3 per worker

    refused = r"trained with 2 worker\(s\), this run has 1; rerun with --workers 2"
    with pytest.raises(ValueError, match=refused):
        run_training(_config(data, out, epochs=2), resume=True)
    checkpoint.check_workers(out, 2)  # the same count is accepted ...
    resumed = _run_two_workers(tmp_path, _config(data, out, epochs=2), resume=True, name="resumed")
    assert resumed[0]["calls"]  # ... and the 2-worker resume runs its second epoch
    assert json.loads((Path(out) / "checkpoints" / "latest.json").read_text())["epoch"] == 2


def test_the_sum_is_built_on_the_workers_device(tmp_path):
    """A ``meta`` worker device stands in for a GPU: the all-reduce must get a meta tensor, not a CPU one
    (a meta all-reduce is a no-op; reading a meta sum back is impossible, hence the expected error)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        unreadable = pytest.raises((NotImplementedError, RuntimeError), match="meta")
        with CollectiveDevices() as recorder, unreadable:
            _all_sum([1.0, 2.0], 2, torch.device("meta"))
    finally:
        dist.destroy_process_group()
    assert recorder.calls == [("c10d::allreduce_", {"meta"})]
