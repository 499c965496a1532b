"""``hqlabel serve start|status|stop``: a labeling service that keeps its models loaded across jobs.

The service is a detached named Ray actor (``LabelService``, name ``service`` in the namespace ``hqlabel``)
that owns the labeling actors (``WarmLabeler``, named ``labeler-N``): they load their models once, when the
service starts, and live until ``serve stop`` (or until their cluster ends). A job sent with ``hqlabel label
--service`` reads and decodes its images in Ray Data tasks as any job does, hands each batch to a warm actor
(``label_on_service``) and writes, merges and resumes exactly as without the service; it skips the per-job
actor start (imports, weights, CUDA). The job refuses to run when no service is running, or when the
service's models differ from the ones it asks for (classes, prompts and detector thresholds are the job's
own).

``serve start`` also starts a keeper process on this machine that holds the service's job runner
(``hqlabel.jobs.service_runner``): ``label --service`` runs its job's driver there, so that a job from a new
CLI process finds Ray task workers already started.

The service needs a Ray cluster that outlives the command: ``--address`` names one; without it ``serve
start`` starts a local head (``ray start --head --block`` on 127.0.0.1 in a process session of its own, with
its own temporary folder), which ``serve stop`` ends again. Where the service runs is recorded in a state
file (``~/.hqlabel/service.json``, or ``HQLABEL_SERVICE_FILE``), which ``label --service`` and ``serve
status`` / ``stop`` read when given no ``--address``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hqlabel.jobs.args import add_model_args, model_options, resource_amount
from hqlabel.jobs.cluster import ADDRESS_HELP, ray_init
from hqlabel.jobs.service_runner import find_runner, runner_info, start_keeper, stop_keeper

if TYPE_CHECKING:
    import pyarrow as pa

    from hqlabel.jobs.resources import ResourcePlan
    from hqlabel.jobs.spec import LabelJobSpec
    from hqlabel.platform.config import LabelerConfig
    from hqlabel.workers.faults import AttemptLog

NAMESPACE = "hqlabel"
SERVICE_ACTOR = "service"
WORKER_PREFIX = "labeler-"
STATE_ENV = "HQLABEL_SERVICE_FILE"
HEAD_START_S = 90
NO_SERVICE = (
    "no labeling service is running{where}; start one with `hqlabel serve start` (model options as label's)"
)
SERVICE_CLASSES = ["object"]  # the service's placeholder class list: each job brings its own


def state_path() -> Path:
    """Where ``serve start`` records the service's cluster: ``HQLABEL_SERVICE_FILE`` or
    ``~/.hqlabel/service.json``."""
    return Path(os.environ.get(STATE_ENV) or Path.home() / ".hqlabel" / "service.json").expanduser()


def read_state() -> dict | None:
    try:
        return json.loads(state_path().read_text())
    except FileNotFoundError:
        return None


def _write_state(state: dict) -> None:
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2))


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_head(num_cpus: int | None) -> dict:
    """Start a Ray head on 127.0.0.1 that outlives this process (``ray start --head --block`` in a process
    session of its own, with its own temporary folder); returns its state (``address``, ``head_pid``,
    ``temp_dir``).

    Raises:
        RuntimeError: the head did not start (its log's end in the message).
    """
    temp_dir = tempfile.mkdtemp(prefix="hqlabel-ray-")  # short: Ray's unix socket paths live under it
    port = _free_port()
    ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    cmd = [
        ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
        f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
        f"--metrics-export-port={_free_port()}", "--include-dashboard=false", f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]  # fmt: skip
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log_path = Path(temp_dir) / "head.log"
    state = {"address": f"127.0.0.1:{port}", "temp_dir": temp_dir, "log": str(log_path)}
    try:
        state["head_pid"] = start_detached(cmd, log_path, "Ray runtime started", HEAD_START_S, env=env)
    except RuntimeError as e:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise RuntimeError(f"the local Ray head {e}") from None
    return state


def start_detached(
    cmd: list[str], log_path: Path, ready: str, timeout_s: float, env: dict[str, str] | None = None
) -> int:
    """Start ``cmd`` in a process session of its own (it outlives this process), its output in
    ``log_path``, and wait until the log holds ``ready``; returns its pid.

    Raises:
        RuntimeError: it exited, or was not ready within ``timeout_s`` (then it is ended); the message
            ("did not start in N s:" and the log's end) reads after the process's name.
    """
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout_s
    while ready.encode() not in log_path.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace")[-2000:]
            end_session(process.pid)
            raise RuntimeError(f"did not start in {timeout_s:g} s:\n{tail}")
        time.sleep(0.3)
    return process.pid


def stop_local_head(state: dict) -> None:
    """End the head that ``start_local_head`` started (its whole process session, by its id: SIGTERM, then
    SIGKILL) and delete its temporary folder."""
    end_session(state.get("head_pid"))
    if state.get("temp_dir"):
        shutil.rmtree(state["temp_dir"], ignore_errors=True)


def end_session(pid: int | None) -> None:
    """End the process session led by ``pid`` (started with ``start_new_session``), by its id: SIGTERM, then
    SIGKILL; reaped when it is this process's child."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        if not _alive(pid):
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)  # start_new_session: the group id is the head's pid
        deadline = time.monotonic() + wait_s
        while _alive(pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap it when it is our child
            time.sleep(0.2)


class LabelService:
    """The detached actor that owns the service's labeling actors (they end with it) and knows its models.

    Args:
        config: the models (``LabelerConfig``; its classes are a placeholder).
        plan: how many labeling actors, with what resources (``plan_resources``).
    """

    def __init__(self, config: LabelerConfig, plan: ResourcePlan) -> None:
        import ray

        from hqlabel.workers.warm import WarmLabeler

        self.config, self.plan = config, plan
        actor = ray.remote(WarmLabeler)
        self.labelers = [
            actor.options(
                name=f"{WORKER_PREFIX}{i}",
                namespace=NAMESPACE,
                num_cpus=plan.actor_cpus,
                num_gpus=plan.actor_gpus,
                resources=plan.actor_resources or None,
                scheduling_strategy="SPREAD",
                max_restarts=16,  # a crash or a broken device: Ray starts it again, reloading the models
                max_task_retries=16,
            ).remote(config, plan.actor_threads)
            for i in range(plan.num_actors)
        ]
        self.started = time.time()

    def workers(self) -> list:
        """The labeling actors' handles."""
        return list(self.labelers)

    def describe(self) -> dict:
        """Models, plan and each labeling actor's ``WarmLabeler.info`` (waits for actors still loading)."""
        import ray

        return {
            "config": self.config.model_dump(mode="json"),
            "plan": asdict(self.plan),
            "started": self.started,
            "workers": ray.get([w.info.remote() for w in self.labelers]),
        }


def service_address(address: str | None) -> str:
    """The cluster of the service: ``address``, else ``RAY_ADDRESS``, else the state file's.

    Raises:
        ValueError: none of them (no service started from this machine).
    """
    found = address or os.environ.get("RAY_ADDRESS") or (read_state() or {}).get("address")
    if not found:
        raise ValueError(NO_SERVICE.format(where=" (no --address, and none started from this machine)"))
    return found


def connect(address: str | None) -> str:
    """Join the service's cluster (``service_address``) unless this process already joined one; returns the
    address."""
    import ray

    address = service_address(address)
    if not ray.is_initialized():
        state = read_state() or {}
        if state.get("address") == address and state.get("head_pid") and not _alive(state["head_pid"]):
            raise ValueError(NO_SERVICE.format(where=f" (the local Ray head at {address} has exited)"))
        ray_init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    return address


def find_service():
    """The service actor's handle in the cluster this process joined, or None."""
    import ray

    try:
        return ray.get_actor(SERVICE_ACTOR, namespace=NAMESPACE)
    except ValueError:
        return None


def attach(spec: LabelJobSpec) -> tuple[LabelJobSpec, list, ResourcePlan]:
    """For ``label --service``, in a driver that joined the service's cluster: the spec with the service's
    model revisions where the job pinned none, the labeling actors and the service's plan.

    Raises:
        ValueError: no service runs there, or its models differ from the job's.
    """
    import ray

    from hqlabel.jobs.checks import hq_weights_pin
    from hqlabel.platform.config import LabelerConfig, model_differences

    service = find_service()
    if service is None:
        raise ValueError(NO_SERVICE.format(where=" on this cluster"))
    description = ray.get(service.describe.remote())
    models = LabelerConfig.model_validate(description["config"])
    pinned = {
        name: getattr(models, name)
        for name in ("detector_revision", "segmenter_revision")
        if getattr(spec.labeler, name) is None
    }
    # the job's HQ weights file as it is now: one replaced since the service loaded it differs below
    pinned["hq_weights_revision"] = hq_weights_pin(spec.labeler.hq_weights, spec.labeler.hq_weights_revision)
    spec = spec.model_copy(update={"labeler": spec.labeler.model_copy(update=pinned)})
    differ = model_differences(models, spec.labeler)
    if differ:
        raise ValueError(
            f"the labeling service runs other models than this job asks for ({'; '.join(differ)}); label "
            "without --service, or restart the service with these models (hqlabel serve stop, serve start)"
        )
    from hqlabel.jobs.resources import ResourcePlan

    return spec, ray.get(service.workers.remote()), ResourcePlan(**description["plan"])


def label_on_service(
    batch: pa.Table,
    *,
    workers: list,
    config: LabelerConfig,
    job: str,
    attempts: AttemptLog | None,
    failpoints: str | None,
) -> pa.Table:
    """Ray Data UDF of a ``--service`` job: ``DECODED_SCHEMA`` batch in, ``RESULT_SCHEMA`` out, labeled by
    one of the warm ``workers`` (picked by the batch's first row, so batches spread over them)."""
    import ray

    key = f"{batch['shard'][0].as_py()}/{batch['row'][0].as_py()}" if batch.num_rows else ""
    worker = workers[zlib.crc32(key.encode()) % len(workers)]
    return ray.get(worker.label.remote(batch, config, job=job, attempts=attempts, failpoints=failpoints))


def service_stage(ds, spec: LabelJobSpec, workers: list, job: str, attempts, failpoints):
    """``ds`` (decoded batches) -> labeled batches through the warm ``workers``: two batches in flight per
    actor (one labeled, one waiting), in tasks that ask for no CPU (they wait on the actor)."""
    import ray

    return ds.map_batches(
        label_on_service,
        batch_format="pyarrow",
        batch_size=spec.batch_size,
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=2 * len(workers)),
        fn_kwargs={
            "workers": workers,
            "config": spec.labeler,
            "job": job,
            "attempts": attempts,
            "failpoints": failpoints,
        },
    )


def plan_service(
    config: LabelerConfig, num_workers: int | None, actor_resources: dict[str, float]
) -> ResourcePlan:
    """The service's labeling actors on the joined cluster, as a label job would plan them (CPUs kept for
    the jobs' read, decode and write tasks)."""
    from hqlabel.jobs.resources import (
        check_custom_resources,
        cluster_capacity,
        fit_actor_resources,
        plan_resources,
    )

    device = config.device
    use_gpus = True if device.startswith("cuda") else False if device == "cpu" else None
    capacity = cluster_capacity()
    plan = plan_resources(
        capacity.cpus, capacity.gpus, num_workers, node_cpus=capacity.node_cpus, use_gpus=use_gpus
    )
    if actor_resources:
        check_custom_resources(actor_resources, "--actor-resource")
        plan = fit_actor_resources(
            plan, actor_resources, capacity.nodes, sized_by_user=num_workers is not None
        )
    return plan


def start_service(
    config: LabelerConfig,
    *,
    address: str | None = None,
    num_workers: int | None = None,
    num_cpus: int | None = None,
    actor_resources: dict[str, float] | None = None,
) -> dict:
    """Start the service (``serve start``): on the cluster at ``address``, else on a local head it starts
    (or one an earlier ``serve start`` left running); returns ``LabelService.describe`` with ``address``
    once every labeling actor has loaded its models.

    Raises:
        ValueError: a service already runs there; bad model options (as ``label`` refuses them).
    """
    import ray

    from hqlabel.jobs.checks import check_compile, check_device, check_hq_weights
    from hqlabel.jobs.label import check_models
    from hqlabel.jobs.spec import LabelJobSpec

    state = read_state()
    started = None
    if address is None and not (state and state.get("head_pid") and _alive(state["head_pid"])):
        check_device(config.device, config.precision, local=True)  # the local head is this machine
        check_compile(config.compile, config.device, local=True)
        check_hq_weights(config.hq_weights)
        state = started = start_local_head(num_cpus)
        _write_state(state)
    elif address is not None:
        check_device(config.device, config.precision, local=False)
        check_hq_weights(config.hq_weights)
    try:
        address = connect(address)
        if find_service() is not None:
            raise ValueError(
                f"a labeling service is already running at {address} (hqlabel serve status); stop it first "
                "with hqlabel serve stop"
            )
        # hub models pinned to commits, as a label job pins them (the jobs then compare them)
        config = check_models(LabelJobSpec(input=".", out=".", labeler=config, overwrite=True)).labeler
        plan = plan_service(config, num_workers, dict(actor_resources or {}))
        service = (
            ray.remote(LabelService)
            .options(name=SERVICE_ACTOR, namespace=NAMESPACE, lifetime="detached", num_cpus=0)
            .remote(config, plan)
        )
        try:
            description = ray.get(service.describe.remote())
            _end_stale_runner(address)
            keeper = start_keeper(address)  # the job runner (hqlabel.jobs.service_runner), warmed up
        except Exception:
            ray.kill(service)
            raise
        if started is None and (state or {}).get("address") != address:
            _write_state({"address": address})  # a cluster the service did not start: no head to stop
        _write_state({**(read_state() or {}), **keeper})
        return {"address": address, **description, "runner": runner_info()}
    except BaseException:
        if started is not None:
            ray.shutdown()
            stop_local_head(started)
            state_path().unlink(missing_ok=True)
        raise


def _end_stale_runner(address: str) -> None:
    """End a job runner (and the keeper recorded for ``address``) that outlived its service's actors."""
    import ray

    previous = read_state() or {}
    if previous.get("address") == address and previous.get("keeper_pid"):
        stop_keeper(previous)
    runner = find_runner()
    if runner is not None:
        ray.kill(runner, no_restart=True)
        deadline = time.monotonic() + 30
        while find_runner() is not None and time.monotonic() < deadline:  # its name is free once it ended
            time.sleep(0.2)


def service_status(address: str | None = None) -> dict | None:
    """``LabelService.describe`` with ``address``, or None when no service is running."""
    try:
        address = connect(address)
    except ValueError:
        return None
    service = find_service()
    if service is None:
        return None
    import ray

    return {"address": address, **ray.get(service.describe.remote()), "runner": runner_info()}


def stop_service(address: str | None = None) -> dict:
    """End the service (its job runner and labeling actors first, then the service actor), the keeper
    ``serve start`` started on this machine (``service_runner``) and, when ``serve start`` started the local
    head, that head too. Returns what was stopped: ``actors`` (names), ``keeper`` (its pid), ``head``.

    A no-op (nothing stopped) when no service is running."""
    import ray

    state = read_state()
    stopped: dict[str, Any] = {"actors": [], "keeper": None, "head": None}
    joined = ray.is_initialized()  # a driver that joined before keeps its connection
    try:
        address = connect(address)
    except ValueError:
        address = None
    if address is not None:
        service = find_service()
        if service is not None:
            names = _names()
            runner = find_runner()
            if runner is not None:
                ray.kill(runner, no_restart=True)
            with contextlib.suppress(ray.exceptions.RayActorError):
                for worker in ray.get(service.workers.remote()):
                    ray.kill(worker, no_restart=True)
            ray.kill(service, no_restart=True)
            _wait_gone()
            stopped["actors"] = names
        if not joined or (state and state.get("head_pid") and state.get("address") == address):
            ray.shutdown()
    if state and state.get("keeper_pid") and state.get("address") in (address, None):
        stopped["keeper"] = stop_keeper(state)
    if state and state.get("head_pid") and state.get("address") in (address, None):
        stop_local_head(state)
        stopped["head"] = state["address"]
    if state and (address is None or state.get("address") == address):
        state_path().unlink(missing_ok=True)
    return stopped


def _names() -> list[str]:
    """The named actors alive in the service's namespace."""
    import ray

    return sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE
    )


def _wait_gone(timeout: float = 30.0) -> None:
    """Wait until no named actor is left in the service's namespace.

    Raises:
        RuntimeError: some are still alive after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while _names() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _names()
    if left:
        raise RuntimeError(f"the service's actors {left} are still alive {timeout:g} s after being killed")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="a labeling service that keeps models loaded across jobs (label --service)",
        description="Start, inspect or stop the warm labeling service (detached Ray actors, namespace "
        "'hqlabel'); `hqlabel label --service` sends a job to it.",
    )
    actions = p.add_subparsers(dest="action", required=True)
    start = actions.add_parser("start", help="load the models into labeling actors that outlive jobs")
    add_model_args(start)
    start.add_argument(
        "--prompts",
        choices=("detector", "boxes"),
        default="detector",
        help="detector: load a detector too (serves both kinds of job); boxes: the segmenter alone",
    )
    start.add_argument("--num-workers", type=int, help="labeling actors (default: one per GPU, or by CPUs)")
    start.add_argument(
        "--actor-resource",
        type=resource_amount,
        action="append",
        default=[],
        metavar="NAME=AMOUNT",
        help="a custom Ray resource each labeling actor asks for (as label's); repeatable",
    )
    start.add_argument(
        "--address",
        help=f"{ADDRESS_HELP.split('. Default')[0]}. Default: a local Ray head started for the service "
        "(127.0.0.1, its own temp folder), stopped by `serve stop`",
    )
    start.add_argument("--num-cpus", type=int, help="CPUs of the local head (default: all)")
    start.set_defaults(func=_start)
    for name, func, what in (
        ("status", _status, "the service's models and labeling actors (exit 1 when none runs)"),
        ("stop", _stop, "stop the labeling actors (and the local head serve start started)"),
    ):
        q = actions.add_parser(name, help=what)
        q.add_argument("--address", help="the service's cluster (default: the one serve start recorded)")
        if name == "status":
            q.add_argument("--json", action="store_true", help="print the status as JSON")
        q.set_defaults(func=func)


def _describe(status: dict) -> str:
    config = status["config"]
    models = config["preset"] or f"{config['detector']} + {config['segmenter']}"
    lines = [
        f"labeling service at {status['address']} (namespace {NAMESPACE}): {models}, device "
        f"{config['device']}, precision {config['precision']}, compile {config['compile']}, prompts "
        f"{config['prompts']}"
    ]
    runner = status.get("runner")
    if runner is None:
        lines.append(
            "  job runner: none (its keeper process has exited: label --service drivers run in the CLI)"
        )
    else:
        lines.append(f"  job runner: pid {runner['pid']}, {len(runner['jobs'])} job(s) run")
    for info in status["workers"]:
        lines.append(
            f"  pid {info['pid']}: models loaded {info['loads']} time(s), {info['batches']} batches labeled"
        )
    return "\n".join(lines)


def _start(args: argparse.Namespace) -> int:
    from hqlabel.platform.config import LabelerConfig

    options = model_options(args)
    if args.preset == "tiny-random":
        from hqlabel.jobs.label import RANDOM_WEIGHTS_WARNING

        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    config = LabelerConfig(classes=SERVICE_CLASSES, prompts=args.prompts, **options)
    status = start_service(
        config,
        address=args.address,
        num_workers=args.num_workers,
        num_cpus=args.num_cpus,
        actor_resources=dict(args.actor_resource),
    )
    print(_describe(status))
    return 0


def _status(args: argparse.Namespace) -> int:
    status = service_status(args.address)
    if status is None:
        print(json.dumps(None) if args.json else NO_SERVICE.format(where=""))
        return 1
    print(json.dumps(status, indent=2) if args.json else _describe(status))
    return 0


def _stop(args: argparse.Namespace) -> int:
    stopped = stop_service(args.address)
    if not stopped["actors"] and not stopped["head"] and not stopped["keeper"]:
        print(NO_SERVICE.format(where=""))
        return 0
    parts = [f"stopped the labeling service ({len(stopped['actors'])} actors)"]
    if stopped["keeper"]:
        parts.append(f"keeper process {stopped['keeper']} stopped")
    if stopped["head"]:
        parts.append(f"local Ray head at {stopped['head']} stopped")
    print("; ".join(parts))
    return 0
