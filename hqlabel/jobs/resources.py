"""How many labeling actors and training workers, with what resources: decided in one place from what the
cluster has."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hqlabel.jobs.spec import LabelJobSpec


@dataclass(frozen=True)
class ResourcePlan:
    """Placement of the labeling pipeline.

    Attributes:
        num_actors: labeling actors the pool starts with (each holds a detector and a segmenter).
        min_actors: the fewest actors the pool keeps (Ray Data removes idle ones down to this).
        max_actors: the most actors the pool grows to while they stay busy and the cluster has room for more,
            e.g. as GPU nodes join. ``min_actors == num_actors == max_actors`` is a fixed pool.
        actor_cpus: CPUs Ray reserves per actor (logical; its torch threads are ``actor_threads``).
        actor_gpus: GPUs per actor (1 on GPU clusters, 0 otherwise).
        task_cpus: CPUs per read/decode/write task.
        actor_threads: torch intra-op threads per actor. ``actor_cpus`` is what Ray reserves; on a small CPU
            machine (one actor, one CPU kept for I/O) the actor also uses that kept CPU for torch, because
            decode and write are light next to the models and the OS interleaves them (measured on 2 cores:
            benchmarks/RESULTS.md, 2026-11-26). Elsewhere it equals ``actor_cpus``.
        actor_resources: custom Ray resources per actor (``--actor-resource``), e.g. ``{"a100": 1}`` to place
            the actors on the nodes that offer it.
    """

    num_actors: int
    min_actors: int
    max_actors: int
    actor_cpus: float
    actor_gpus: float
    task_cpus: float
    actor_threads: int = 1
    actor_resources: dict[str, float] = field(default_factory=dict)

    def actor_pool(self) -> dict[str, int]:
        """Keyword arguments of ``ray.data.ActorPoolStrategy``: a fixed ``size``, or autoscaling bounds."""
        if self.min_actors == self.max_actors:
            return {"size": self.num_actors}
        return {"min_size": self.min_actors, "max_size": self.max_actors, "initial_size": self.num_actors}


BATCHES_IN_FLIGHT = 4  # decoded batches the object store may hold per labeling actor
MIN_OBJECT_STORE_BYTES = 64 * 2**20
# Ray's own resources: set by --num-workers / --device, never by --actor-resource / --worker-resource.
BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def check_custom_resources(resources: dict[str, float], option: str) -> dict[str, float]:
    """Refuse Ray's own resources and amounts <= 0 in ``--actor-resource`` / ``--worker-resource``."""
    for name, amount in resources.items():
        if name in BUILTIN_RESOURCES:
            raise ValueError(
                f"{option} {name}: Ray's own resource; CPUs and GPUs per actor or worker follow from "
                "--num-workers/--workers and --device/--gpus-per-worker. Name a custom resource"
            )
        if not amount > 0:
            raise ValueError(f"{option} {name}={amount:g}: the amount must be > 0")
    return resources


def object_store_limit(plan: ResourcePlan, batch_size: int, max_side: int) -> int:
    """Bytes of Ray's object store a labeling job's pipeline may fill: ``BATCHES_IN_FLIGHT`` decoded batches
    per actor of the largest pool (``plan.max_actors``) at the largest working size (``max_side`` x
    ``max_side`` RGB), at least 64 MiB. Ray Data caps it at its own default share of the object store the
    cluster has at the time, so a budget for actors that have not joined yet takes no memory.

    Without a limit, Ray Data lets the cheap decode stage run ahead of the model actors until a large share of
    the object store holds decoded pixels, so a job's memory grows with the dataset (measured on 2 CPUs: 2,000
    images peaked 600 MiB above 200 images, benchmarks/RESULTS.md). With it, memory is bounded by the actors
    and the batch size; the budget still keeps each actor a few batches ahead.
    """
    return max(MIN_OBJECT_STORE_BYTES, plan.max_actors * BATCHES_IN_FLIGHT * batch_size * max_side**2 * 3)


def _check_pool_options(num_workers: int | None, min_workers: int | None, max_workers: int | None) -> None:
    if num_workers is not None and (min_workers is not None or max_workers is not None):
        raise ValueError(
            f"--num-workers {num_workers} sets a fixed pool; pass either it or --min-workers/--max-workers"
        )
    if min_workers is not None and max_workers is None:
        raise ValueError(
            f"--min-workers {min_workers} needs --max-workers (the most actors the pool may grow to)"
        )
    if min_workers is not None and max_workers is not None and min_workers > max_workers:
        raise ValueError(f"--min-workers {min_workers} is more than --max-workers {max_workers}")


def plan_resources(
    cpus: float,
    gpus: float,
    num_workers: int | None = None,
    *,
    min_workers: int | None = None,
    max_workers: int | None = None,
    node_cpus: float | None = None,
    use_gpus: bool | None = None,
) -> ResourcePlan:
    """Size the pipeline for a cluster that has ``cpus`` CPUs and ``gpus`` GPUs now (nodes may join later).

    With GPUs: one actor per GPU (or ``num_workers``, at most one per GPU present), one CPU each. With
    ``max_workers`` the pool autoscales instead: it starts with one actor per GPU present (at least
    ``min_workers``, default 1, at most ``max_workers``) and Ray Data adds actors up to ``max_workers`` as GPU
    nodes join a running cluster (an autoscaler's), removing idle ones down to ``min_workers``.

    Without GPUs: actors share the CPUs, but at least one CPU always stays free (in Ray's bookkeeping) for the
    read, decode and write tasks; otherwise the actors starve them and a small machine hangs. On a small CPU
    machine the one actor still runs a torch thread on that CPU (see ``ResourcePlan.actor_threads``). The
    pool is fixed: ``min_workers`` / ``max_workers`` only bound its size (a CPU pool that grew would take the
    CPUs the tasks need). No actor asks for more CPUs than the largest node has (``node_cpus``).

    CPUs are counted over the nodes that run work: a head started with ``--num-cpus 0`` (the usual cluster
    set-up) adds none, and the job runs on the worker nodes.

    Args:
        num_workers: a fixed pool of this many actors.
        min_workers, max_workers: the bounds of an autoscaling pool (``max_workers`` needed; not with
            ``num_workers``).
        node_cpus: CPUs of the largest node (default ``cpus``: one machine).
        use_gpus: True: GPU actors even while no GPU has joined yet (``--device cuda``); False: CPU actors
            even on a GPU cluster (``--device cpu``); None: GPU actors when the cluster has GPUs.

    Raises:
        ValueError: conflicting pool options; a CPU pool with fewer than 2 CPUs; a fixed GPU pool larger than
            the GPUs present (or none present).
    """
    _check_pool_options(num_workers, min_workers, max_workers)
    whole_gpus = int(gpus)
    if use_gpus is None:
        use_gpus = whole_gpus >= 1
    if use_gpus:
        if max_workers is not None:
            low = min_workers or 1
            actors = min(max(whole_gpus, low), max_workers)
            high = max_workers
        elif whole_gpus == 0:
            raise ValueError(
                "the Ray cluster has no GPUs (yet) for --device cuda; pass --max-workers N to start as GPU "
                "nodes join and grow to N actors, or --device auto to label on the CPUs"
            )
        elif num_workers is not None and num_workers > whole_gpus:
            raise ValueError(
                f"--num-workers {num_workers} asks for more GPU actors than the {whole_gpus} GPUs available; "
                f"pass --max-workers {num_workers} instead to start with these and grow as GPU nodes join"
            )
        else:
            actors = low = high = num_workers or whole_gpus
        cpu = 1.0 if cpus - actors >= 1 else 0.5  # a GPU node that joins later brings CPUs of its own
        return ResourcePlan(actors, low, high, actor_cpus=cpu, actor_gpus=1.0, task_cpus=cpu, actor_threads=1)
    if cpus < 2:
        raise ValueError(
            f"the Ray cluster has {cpus:g} CPUs; labeling needs at least 2 (one for the model actor, one for "
            "reading and writing). Start Ray with more CPUs (--num-cpus), or add worker nodes"
        )
    node_cpus = cpus if node_cpus is None else node_cpus
    reserve = max(1.0, cpus // 4)  # for read/decode/write tasks
    budget = cpus - reserve
    if num_workers is not None:
        actors = max(1, min(num_workers, int(budget)))
    else:
        # Few fat actors: one per 4 CPUs keeps torch's intra-op threads busy without oversubscribing.
        actors = max(1, int(budget // 4))
        if max_workers is not None:
            actors = max(1, min(max(actors, min_workers or 1), max_workers, int(budget)))
    actor_cpus = max(1.0, float(int(budget // actors)))
    if actor_cpus > node_cpus >= 1:  # an actor must fit on one node: more, thinner actors instead
        actor_cpus = float(int(node_cpus))
        if num_workers is None and max_workers is None:
            actors = max(1, int(budget // actor_cpus))
    threads = int(actor_cpus)
    if actors == 1 and reserve == 1 and actor_cpus + 1 <= node_cpus:
        # Small machine (2-7 CPUs): the one actor's torch threads also use the CPU kept for I/O. Ray's
        # reservation is logical, and decode/write are light next to the models, so that core would idle
        # between tasks. Larger machines keep their I/O CPUs to themselves (several tasks run there at once),
        # and an actor on a node of its own has no I/O CPU beside it.
        threads += 1
    # Tasks ask for half a CPU: two decode/write tasks share the spare core, and the differing request keeps
    # Ray Data from fusing decoding into the model actors (decode overlaps model work instead).
    return ResourcePlan(
        actors, actors, actors, actor_cpus=actor_cpus, actor_gpus=0.0, task_cpus=0.5, actor_threads=threads
    )


@dataclass(frozen=True)
class ClusterCapacity:
    """What the alive nodes of a Ray cluster have: CPUs and GPUs in all, the most CPUs on one node, and each
    node's resources (Ray's ``Resources``: ``CPU``, ``GPU``, custom ones)."""

    cpus: float
    gpus: float
    node_cpus: float
    nodes: tuple[Mapping[str, float], ...] = ()


def cluster_capacity() -> ClusterCapacity:
    """The capacity of the Ray cluster this process has joined, now (an autoscaler may add nodes later)."""
    import ray

    nodes = tuple(node["Resources"] for node in ray.nodes() if node["Alive"])
    cpus = [node.get("CPU", 0.0) for node in nodes]
    return ClusterCapacity(
        sum(cpus), sum(node.get("GPU", 0.0) for node in nodes), max(cpus, default=0.0), nodes
    )


def resource_slots(wanted: Mapping[str, float], nodes: tuple[Mapping[str, float], ...], option: str) -> int:
    """How many actors (or workers) asking for the custom resources ``wanted`` fit on ``nodes`` at once: per
    node, how many times it holds all of them, summed (an actor sits on one node).

    Raises:
        ValueError: no node offers one of them (as much as one actor asks), or none offers all together: one
            line naming the resource, what the nodes offer and the fix (``option``: the CLI option).
    """
    if not wanted:
        return 0
    slots = sum(min(math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in wanted.items()) for node in nodes)
    if slots:
        return slots
    offered = sorted({k for node in nodes for k in node if k not in BUILTIN_RESOURCES and ":__" not in k})
    shown = f"custom resources offered: {', '.join(offered) or 'none'}"
    for name, amount in sorted(wanted.items()):
        if not any(node.get(name, 0.0) >= amount for node in nodes):
            raise ValueError(
                f"{option} {name}={amount:g}: no node of the Ray cluster offers {amount:g} {name} ({shown}); "
                f"start the nodes meant for it with `ray start --resources '{{\"{name}\": N}}'`, or drop "
                f"{option}"
            )
    asked = ", ".join(f"{k}={v:g}" for k, v in sorted(wanted.items()))
    raise ValueError(f"{option} {asked}: no node of the Ray cluster offers all of them together ({shown})")


def plan_label_job(spec: LabelJobSpec) -> ResourcePlan:
    """``plan_resources`` for ``spec`` on the Ray cluster this process has joined.

    ``--device cuda`` plans GPU actors even before any GPU node has joined; ``--device cpu`` plans CPU actors
    even where there are GPUs.
    """
    device = spec.labeler.device
    use_gpus = True if device.startswith("cuda") else False if device == "cpu" else None
    capacity = cluster_capacity()
    plan = plan_resources(
        capacity.cpus,
        capacity.gpus,
        spec.num_workers,
        min_workers=spec.min_workers,
        max_workers=spec.max_workers,
        node_cpus=capacity.node_cpus,
        use_gpus=use_gpus,
    )
    if not spec.actor_resources:
        return plan
    sized = spec.num_workers is not None or spec.max_workers is not None
    return fit_actor_resources(plan, spec.actor_resources, capacity.nodes, sized_by_user=sized)


def fit_actor_resources(
    plan: ResourcePlan,
    wanted: Mapping[str, float],
    nodes: tuple[Mapping[str, float], ...],
    *,
    sized_by_user: bool,
) -> ResourcePlan:
    """``plan`` with actors that also ask for the custom resources ``wanted`` (``--actor-resource``).

    A fixed pool must fit on the nodes that offer them now: a default-sized one shrinks to fit, one the user
    sized (``--num-workers``, or ``--min-workers`` = ``--max-workers``) larger than that is refused. An
    autoscaling pool starts with what fits (at least its minimum) and grows as nodes that offer them join.

    Raises:
        ValueError: no node offers a resource; a fixed pool larger than the nodes that offer it hold.
    """
    slots = resource_slots(wanted, nodes, "--actor-resource")
    resources = dict(wanted)
    if plan.min_actors == plan.max_actors:
        if plan.num_actors <= slots:
            return replace(plan, actor_resources=resources)
        if sized_by_user:
            shown = ", ".join(f"{k}={v:g}" for k, v in sorted(wanted.items()))
            raise ValueError(
                f"{plan.num_actors} labeling actors with --actor-resource {shown} need more than the nodes "
                f"offer now (room for {slots}); ask for at most {slots}, or add nodes that offer it"
            )
        return replace(plan, num_actors=slots, min_actors=slots, max_actors=slots, actor_resources=resources)
    start = max(plan.min_actors, min(plan.num_actors, slots))
    return replace(plan, num_actors=start, actor_resources=resources)


@dataclass(frozen=True)
class TrainPlan:
    """Ray Train's placement: ``workers`` processes, each with ``cpus`` CPUs and ``gpus`` GPUs."""

    workers: int
    cpus: float
    gpus: float


def plan_training(cpus: float, gpus: float, workers: int | None, gpus_per_worker: float | None) -> TrainPlan:
    """Size the training job for a cluster with ``cpus`` CPUs and ``gpus`` GPUs.

    Default: one worker per GPU with one GPU each; without GPUs one worker; CPUs split evenly between the
    workers (at least one each; Ray Train's controller takes none).

    Raises:
        ValueError: more workers or GPUs asked for than the cluster has.
    """
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus >= 1 else 0.0
    if workers is None:
        workers = max(1, int(gpus // gpus_per_worker)) if gpus_per_worker > 0 else 1
    if gpus_per_worker > 0 and workers * gpus_per_worker > gpus:
        raise ValueError(
            f"{workers} worker(s) x {gpus_per_worker:g} GPU(s) need {workers * gpus_per_worker:g} GPUs, the "
            f"cluster has {gpus:g}; lower --workers or --gpus-per-worker (0 trains on CPU)"
        )
    if workers > cpus:
        raise ValueError(
            f"{workers} training workers need a CPU each, the cluster has {cpus:g}; lower --workers"
        )
    return TrainPlan(workers, max(1.0, float(int(cpus // workers))), float(gpus_per_worker))
