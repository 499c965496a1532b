"""How many labeling actors and training workers, with what resources: decided in one place from what the
cluster has."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ResourcePlan:
    """Placement of the labeling pipeline.

    Attributes:
        num_actors: labeling actors (each holds a detector and a segmenter).
        actor_cpus: CPUs Ray reserves per actor (logical; its torch threads are ``actor_threads``).
        actor_gpus: GPUs per actor (1 on GPU clusters, 0 otherwise).
        task_cpus: CPUs per read/decode/write task.
        actor_threads: torch intra-op threads per actor. ``actor_cpus`` is what Ray reserves; on a small CPU
            machine (one actor, one CPU kept for I/O) the actor also uses that kept CPU for torch, because
            decode and write are light next to the models and the OS interleaves them (measured on 2 cores:
            benchmarks/RESULTS.md, 2026-11-26). Elsewhere it equals ``actor_cpus``.
    """

    num_actors: int
    actor_cpus: float
    actor_gpus: float
    task_cpus: float
    actor_threads: int = 1


BATCHES_IN_FLIGHT = 4  # decoded batches the object store may hold per labeling actor
MIN_OBJECT_STORE_BYTES = 64 * 2**20


def object_store_limit(plan: ResourcePlan, batch_size: int, max_side: int) -> int:
    """Bytes of Ray's object store a labeling job's pipeline may fill: ``BATCHES_IN_FLIGHT`` decoded batches
    per actor at the largest working size (``max_side`` x ``max_side`` RGB), at least 64 MiB.

    Without a limit, Ray Data lets the cheap decode stage run ahead of the model actors until a large share of
    the object store holds decoded pixels, so a job's memory grows with the dataset (measured on 2 CPUs: 2,000
    images peaked 600 MiB above 200 images, benchmarks/RESULTS.md). With it, memory is bounded by the actors
    and the batch size; the budget still keeps each actor a few batches ahead.
    """
    return max(MIN_OBJECT_STORE_BYTES, plan.num_actors * BATCHES_IN_FLIGHT * batch_size * max_side**2 * 3)


def plan_resources(cpus: float, gpus: float, num_workers: int | None = None) -> ResourcePlan:
    """Size the pipeline for a cluster with ``cpus`` CPUs and ``gpus`` GPUs.

    With GPUs: one actor per GPU (or ``num_workers``, at most one per GPU), one CPU each. Without: actors
    share the CPUs, but at least one CPU always stays free (in Ray's bookkeeping) for the read, decode and
    write tasks; otherwise the actors starve them and a small machine hangs. On a small CPU machine the one
    actor still runs a torch thread on that CPU (see ``ResourcePlan.actor_threads``).

    Raises:
        ValueError: fewer than 2 CPUs, or more GPU workers asked for than GPUs exist.
    """
    if cpus < 2:
        raise ValueError(
            f"the Ray cluster has {cpus:g} CPUs; labeling needs at least 2 (one for the model actor, one for "
            "reading and writing). Start Ray with more CPUs (--num-cpus)"
        )
    whole_gpus = int(gpus)
    if whole_gpus >= 1:
        if num_workers is not None and num_workers > whole_gpus:
            raise ValueError(
                f"--num-workers {num_workers} asks for more GPU actors than the {whole_gpus} GPUs available"
            )
        actors = num_workers or whole_gpus
        spare = cpus - actors
        return ResourcePlan(actors, 1.0 if spare >= 1 else 0.5, 1.0, 1.0 if spare >= 1 else 0.5, 1)
    reserve = max(1.0, cpus // 4)  # for read/decode/write tasks
    budget = cpus - reserve
    actors = max(1, min(num_workers or 1, int(budget)))
    if num_workers is None:
        # Few fat actors: one per 4 CPUs keeps torch's intra-op threads busy without oversubscribing.
        actors = max(1, int(budget // 4))
    actor_cpus = max(1.0, float(int(budget // actors)))
    threads = int(actor_cpus)
    if actors == 1 and reserve == 1:
        # Small machine (2-7 CPUs): the one actor's torch threads also use the CPU kept for I/O. Ray's
        # reservation is logical, and decode/write are light next to the models, so that core would idle
        # between tasks. Larger machines keep their I/O CPUs to themselves (several tasks run there at once).
        threads += 1
    # Tasks ask for half a CPU: two decode/write tasks share the spare core, and the differing request keeps
    # Ray Data from fusing decoding into the model actors (decode overlaps model work instead).
    return ResourcePlan(actors, actor_cpus, 0.0, 0.5, threads)


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
