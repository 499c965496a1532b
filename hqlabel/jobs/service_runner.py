"""The service's job runner: ``label --service`` jobs run their driver in a long-lived actor, not in the CLI.

A new driver is a new Ray job, whose tasks need new worker processes (about 10 s before the first batch
reaches a warm labeling actor, on a 2-core machine), and Ray ends a job's idle workers once the job has
finished. So ``serve start`` also starts a keeper: a small driver process on this machine (``python -m
hqlabel.jobs.service_runner``, in a process session of its own, its id in the state file) that creates the
job runner (``JobRunner``, named ``runner`` in the namespace ``hqlabel``, on the keeper's node), warms it up
with a tiny job and then waits. The runner and the task workers of its jobs belong to the keeper's Ray job,
which stays alive: later jobs reuse those workers.

``hqlabel label --service`` (and ``hqlabel.label(..., service=True)``) checks the job here as ever, joins
the cluster, hands the spec to the runner (``run_on_service``) and polls its progress; the runner runs
``run_label_job`` (jobs one at a time: Ray Data's context is per process) and returns the summary, or the
error, which is raised here again with its type and message. Ctrl-C cancels the job in the runner at its next
batch (the output stays resumable). When the runner is gone (its keeper exited), the job's driver runs in
the calling process as before. ``serve stop`` ends the runner, then the keeper (by its process group).
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hqlabel.jobs.label import LabelSummary
    from hqlabel.jobs.spec import LabelJobSpec

RUNNER_ACTOR = "runner"
KEEPER_START_S = 300  # imports, the runner's start and its warm-up job (a first job's cold start)
READY = "KEEPER READY "
POLL_S = 0.25
CANCEL_WAIT_S = 120  # how long an interrupted CLI waits for the runner to stop the job
WARM_UP_IMAGES = 2
MAX_RECORDS = 1000  # jobs the runner remembers (JobRunner.info)


class JobCancelled(Exception):
    """The job was cancelled (``JobRunner.cancel``): raised in its driver at the next batch."""


def job_workers(job_id: str) -> list[int]:
    """Process ids of the idle Ray task workers of the Ray job ``job_id`` (hex) on this node: processes
    titled ``ray::IDLE`` whose environment's ``RAY_JOB_ID`` (set by the raylet) is ``job_id``. Linux only
    (``/proc``); elsewhere an empty list."""
    wanted = f"RAY_JOB_ID={job_id}".encode()
    pids = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                if not Path(entry.path, "cmdline").read_bytes().startswith(b"ray::IDLE"):
                    continue
                environ = Path(entry.path, "environ").read_bytes().split(b"\0")
            except OSError:  # ended meanwhile, or not ours
                continue
            if wanted in environ:
                pids.append(int(entry.name))
    return sorted(pids)


class JobRunner:
    """The actor that runs ``label --service`` jobs' drivers (``run_label_job``), one at a time in the order
    they came; threaded, so ``progress``, ``cancel`` and ``info`` answer while a job runs."""

    def __init__(self) -> None:
        import ray

        self.job_id = ray.get_runtime_context().get_job_id()
        self.started = time.time()
        self.turn = threading.Condition()
        self.queue: deque[str] = deque()  # job ids waiting or running, in order
        self.jobs: dict[str, dict] = {}  # per job id: state, progress, worker pids

    def _record(self, job: str) -> dict:
        return self.jobs.setdefault(job, {"id": job, "state": "queued", "cancel": False})

    def run(self, job: str, spec_json: str, failpoints: str | None = None) -> dict:
        """Run the job (``LabelJobSpec`` as JSON; ``check_label_spec`` first, at once) once the jobs before
        it are done, with the caller's ``HQLABEL_FAILPOINTS`` (``failpoints``). Returns ``{"summary":
        LabelSummary as a dict}``, ``{"cancelled": True}`` or ``{"error": {"type", "module", "message"}}``."""
        from hqlabel.jobs.label import check_label_spec, run_label_job
        from hqlabel.jobs.spec import LabelJobSpec
        from hqlabel.workers.faults import FAILPOINTS_ENV

        record = self._record(job)
        try:  # the checks that need torch (device, precision, HQ weights), before the job waits its turn
            spec = check_label_spec(LabelJobSpec.model_validate_json(spec_json), warn=False)
        except Exception as e:
            record["state"] = "failed"
            return _failure(e)
        with self.turn:
            self.queue.append(job)
            self.turn.wait_for(lambda: self.queue[0] == job)
        try:
            if record["cancel"]:
                record["state"] = "cancelled"
                return {"cancelled": True}
            record.update(state="running", started=time.time(), workers_before=job_workers(self.job_id))
            if failpoints is None:  # build_pipeline reads it in the driver: this process, now
                os.environ.pop(FAILPOINTS_ENV, None)
            else:
                os.environ[FAILPOINTS_ENV] = failpoints

            def progress(done: int, total: int, shards_done: int, shards: int) -> None:
                record.update(done=done, total=total, shards_done=shards_done, shards=shards)
                if record["cancel"]:
                    raise JobCancelled(f"job {job} cancelled")

            try:
                summary = run_label_job(spec, progress=False, warn=False, on_progress=progress)
            except JobCancelled:
                record["state"] = "cancelled"
                return {"cancelled": True}
            except Exception as e:
                record["state"] = "failed"
                logging.getLogger(__name__).warning("job %s failed", job, exc_info=True)
                return _failure(e)
            record["state"] = "done"
            return {"summary": asdict(summary)}
        finally:
            os.environ.pop(FAILPOINTS_ENV, None)
            record.update(finished=time.time(), workers_after=job_workers(self.job_id))
            with self.turn:
                self.queue.remove(job)
                self.turn.notify_all()
            for old in list(self.jobs)[: max(0, len(self.jobs) - MAX_RECORDS)]:  # the oldest go
                if old not in self.queue:
                    del self.jobs[old]

    def progress(self, job: str) -> dict:
        """The job's state (``queued``, ``running``, ``done``, ``failed``, ``cancelled``) and, once its
        pipeline started, ``done`` / ``total`` images and ``shards_done`` / ``shards``."""
        return {k: v for k, v in self._record(job).items() if not k.startswith("workers")}

    def cancel(self, job: str) -> None:
        """Cancel the job: a queued one does not start, a running one stops at its next batch."""
        self._record(job)["cancel"] = True

    def info(self) -> dict:
        """Process id, Ray job id, start time, and per job run (in order): id, state, and the idle task
        workers of the runner's Ray job on its node when the job started and when it ended
        (``workers_before`` / ``workers_after``, ``job_workers``)."""
        return {
            "pid": os.getpid(),
            "job_id": self.job_id,
            "started": self.started,
            "jobs": [dict(r) for r in list(self.jobs.values())],
        }

    def warm_up(self) -> dict:
        """Import what a job's driver needs and run a tiny job on the service (``WARM_UP_IMAGES`` demo
        images, in a temporary folder), so that the first real job finds task workers with their imports
        done. Returns ``info``; a warm-up job that fails is logged, not raised (a real job would say why)."""
        import ray

        from hqlabel.jobs.label import _versions
        from hqlabel.jobs.service import NAMESPACE, SERVICE_ACTOR
        from hqlabel.jobs.spec import LabelJobSpec
        from hqlabel.platform.config import LabelerConfig
        from hqlabel.platform.demo import make_demo_images

        _versions()  # torch, transformers: imported once, here, not in the first job
        service = ray.get_actor(SERVICE_ACTOR, namespace=NAMESPACE)
        config = LabelerConfig.model_validate(ray.get(service.describe.remote())["config"])
        folder = Path(tempfile.mkdtemp(prefix="hqlabel-warm-up-"))
        try:
            make_demo_images(folder / "images", WARM_UP_IMAGES, size=(64, 64))
            spec = LabelJobSpec(
                input=str(folder / "images"), out=str(folder / "out"), labeler=config, service=True
            )
            result = self.run("warm-up", spec.model_dump_json())
            if "error" in result:
                logging.getLogger(__name__).warning("the warm-up job failed: %s", result["error"])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return self.info()


def find_runner():
    """The job runner's handle in the cluster this process joined, or None."""
    import ray

    from hqlabel.jobs.service import NAMESPACE

    try:
        return ray.get_actor(RUNNER_ACTOR, namespace=NAMESPACE)
    except ValueError:
        return None


def runner_info() -> dict | None:
    """``JobRunner.info`` of the cluster this process joined, or None when no runner is alive."""
    import ray

    runner = find_runner()
    if runner is None:
        return None
    try:
        return ray.get(runner.info.remote())
    except ray.exceptions.RayActorError:
        return None


def _failure(error: Exception) -> dict:
    """``JobRunner.run``'s result for a job that raised ``error`` (``_error`` raises it again in the CLI)."""
    return {"error": {"type": type(error).__name__, "module": type(error).__module__, "message": str(error)}}


def _error(error: dict) -> Exception:
    """The runner's error as an exception of the same type here: a built-in or an ``hqlabel`` exception
    taking its message, else a ``RuntimeError`` naming the type."""
    kind = None
    if error["module"] == "builtins":
        kind = getattr(builtins, error["type"], None)
    elif error["module"].startswith("hqlabel."):
        import importlib

        with contextlib.suppress(ImportError):
            kind = getattr(importlib.import_module(error["module"]), error["type"], None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        with contextlib.suppress(Exception):
            return kind(error["message"])
    return RuntimeError(f"{error['type']}: {error['message']}")


def run_on_service(spec: LabelJobSpec, *, progress: bool = False) -> LabelSummary:
    """``label --service``: join the service's cluster and run the job's driver in the service's job runner,
    with a progress bar on stderr (``progress``) fed by polling it; paths are made absolute and the input
    checked here, the other checks of ``check_label_spec`` (they import torch) run in the runner as the job
    arrives. Without a runner (its keeper exited), the driver runs here (``run_label_job``).

    Raises:
        ValueError, FileNotFoundError, ...: as ``run_label_job`` (raised in the runner: same type, same
            message).
        KeyboardInterrupt: after the runner stopped the job (Ctrl-C: cancelled at its next batch).
    """
    import ray

    from hqlabel.jobs.label import RANDOM_WEIGHTS_WARNING, LabelSummary, run_label_job
    from hqlabel.jobs.service import connect
    from hqlabel.platform.readers import check_input_exists
    from hqlabel.workers.faults import FAILPOINTS_ENV

    if spec.labeler.preset == "tiny-random":  # the runner's would go to its log
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    spec = spec.with_absolute_paths()  # the runner's working folder is not this one
    # The checks that need torch (check_label_spec) run in the runner, before the job waits its turn.
    check_input_exists(spec.input, spec.storage)
    connect(spec.ray_address)
    runner = find_runner()
    if runner is None:
        print(
            "hqlabel: the labeling service has no job runner (its keeper process has exited): this job's "
            "driver runs here (restart the service for fast starts: hqlabel serve stop, serve start)",
            file=sys.stderr,
        )
        return run_label_job(spec, progress=progress, warn=False)
    job = uuid.uuid4().hex[:12]
    result_ref = runner.run.remote(job, spec.model_dump_json(), os.environ.get(FAILPOINTS_ENV))
    bar = None
    try:
        while not ray.wait([result_ref], timeout=POLL_S)[0]:
            if progress:
                bar = _show(ray.get(runner.progress.remote(job)), bar)
        result = ray.get(result_ref)
        if progress and "summary" in result:
            bar = _show(ray.get(runner.progress.remote(job)), bar)
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            runner.cancel.remote(job)
            ray.wait([result_ref], timeout=CANCEL_WAIT_S)
        raise
    except ray.exceptions.RayActorError as e:
        raise RuntimeError(
            "the labeling service's job runner ended during the job (serve stop, or its keeper exited); "
            "rerun the same command to resume"
        ) from e
    finally:
        if bar is not None:
            bar.close()
    if "error" in result:
        raise _error(result["error"])
    if result.get("cancelled"):
        raise KeyboardInterrupt
    return LabelSummary(**result["summary"])


def _show(state: dict, bar):
    """The progress bar ``_run_pipeline`` shows, drawn here from the runner's ``progress``."""
    if "total" not in state:
        return bar
    if bar is None:
        from tqdm import tqdm

        bar = tqdm(total=state["total"], unit="img", desc="labeling", file=sys.stderr)
    bar.update(state["done"] - bar.n)
    bar.set_postfix(shards=f"{state['shards_done']}/{state['shards']}")
    return bar


def start_keeper(address: str) -> dict:
    """Start the keeper for the service at ``address`` (``python -m hqlabel.jobs.service_runner`` in a
    process session of its own, logging to a temporary folder) and wait until its runner is warm; returns
    ``keeper_pid``, ``keeper_dir`` for the state file.

    Raises:
        RuntimeError: the keeper exited or was not ready within ``KEEPER_START_S`` (its log's end in the
            message).
    """
    from hqlabel.jobs.service import start_detached

    folder = tempfile.mkdtemp(prefix="hqlabel-keeper-")
    cmd = [sys.executable, "-m", "hqlabel.jobs.service_runner", "--address", address]
    try:
        pid = start_detached(cmd, Path(folder) / "keeper.log", READY, KEEPER_START_S)
    except RuntimeError as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"the service's keeper process {e}") from None
    return {"keeper_pid": pid, "keeper_dir": folder}


def stop_keeper(state: dict) -> int | None:
    """End the keeper of ``state`` (its process session: SIGTERM, then SIGKILL) and delete its folder; its
    runner ends with it. Returns its pid, or None when it was not running."""
    from hqlabel.jobs.service import _alive, end_session

    pid = state.get("keeper_pid")
    if not _alive(pid):
        pid = None
    end_session(pid)
    if state.get("keeper_dir"):
        shutil.rmtree(state["keeper_dir"], ignore_errors=True)
    return pid


def main(argv: list[str] | None = None) -> None:
    """The keeper: join the cluster, create the job runner on this node, warm it up, say so (``READY`` on
    stdout), then wait until ended (``serve stop``)."""
    parser = argparse.ArgumentParser(prog="python -m hqlabel.jobs.service_runner", description=__doc__)
    parser.add_argument("--address", required=True, help="the service's cluster")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from hqlabel.jobs.cluster import ray_init
    from hqlabel.jobs.service import NAMESPACE

    ray_init(address=args.address, logging_level=logging.WARNING, log_to_driver=False)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    runner = (
        ray.remote(JobRunner)
        .options(
            name=RUNNER_ACTOR,
            namespace=NAMESPACE,
            num_cpus=0,
            max_concurrency=32,  # waiting jobs each hold a thread; progress and info calls need some
            scheduling_strategy=here,  # jobs' local paths are this machine's, as the CLI's were
        )
        .remote()
    )
    info = ray.get(runner.warm_up.remote())
    print(READY + json.dumps({"runner_pid": info["pid"], "job_id": info["job_id"]}), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
