import pytest

from hqlabel.jobs.resources import MIN_OBJECT_STORE_BYTES, object_store_limit, plan_resources, plan_training


@pytest.mark.parametrize("cpus", [2, 3, 4, 8, 16, 64])
def test_cpu_plans_leave_room_for_io_tasks(cpus):
    plan = plan_resources(cpus, 0)
    assert plan.num_actors >= 1 and plan.actor_gpus == 0
    assert cpus - plan.num_actors * plan.actor_cpus >= 1, "read/decode/write tasks need a free CPU"
    assert plan.task_cpus != plan.actor_cpus  # keeps decoding out of the model actors


def test_two_cpus_give_one_actor_that_also_uses_the_io_cpu_for_torch():
    plan = plan_resources(2, 0)
    assert (plan.num_actors, plan.actor_cpus, plan.actor_threads) == (1, 1.0, 2)


@pytest.mark.parametrize("cpus", [8, 16, 64])
def test_larger_machines_keep_their_io_cpus(cpus):
    plan = plan_resources(cpus, 0)
    assert plan.actor_threads == int(plan.actor_cpus)
    assert plan_resources(4, 0, num_workers=3).actor_threads == 1  # several actors: no oversubscription


def test_gpu_actors_use_one_thread():
    assert plan_resources(16, 4).actor_threads == 1


def test_requested_workers_are_capped_by_cpus():
    assert plan_resources(4, 0, num_workers=10).num_actors == 3
    assert plan_resources(16, 0, num_workers=2).num_actors == 2


def test_gpu_plan_is_one_actor_per_gpu():
    plan = plan_resources(16, 4)
    assert (plan.num_actors, plan.actor_gpus) == (4, 1.0)
    assert plan_resources(16, 4, num_workers=2).num_actors == 2
    with pytest.raises(ValueError, match="GPU"):
        plan_resources(16, 2, num_workers=3)


def test_one_cpu_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="--num-cpus"):
        plan_resources(1, 0)


def test_plan_training():
    plan = plan_training(2, 0, 2, None)
    assert (plan.workers, plan.cpus, plan.gpus) == (2, 1.0, 0.0)
    plan = plan_training(16, 4, None, None)
    assert (plan.workers, plan.cpus, plan.gpus) == (4, 4.0, 1.0)
    assert plan_training(8, 0, None, None).workers == 1
    with pytest.raises(ValueError, match="GPUs"):
        plan_training(16, 2, 3, 1)
    with pytest.raises(ValueError, match="--workers"):
        plan_training(2, 0, 3, None)


def test_object_store_limit_is_a_few_batches_per_actor():
    one_gpu, four_gpus = plan_resources(8, 1), plan_resources(32, 4)
    batch = 8 * 1333 * 1333 * 3  # 8 images at the largest working size
    assert object_store_limit(one_gpu, 8, 1333) == 4 * batch
    assert object_store_limit(four_gpus, 8, 1333) == 4 * object_store_limit(one_gpu, 8, 1333)
    assert object_store_limit(one_gpu, 1, 64) == MIN_OBJECT_STORE_BYTES  # never below the floor


def test_fixed_pools_are_one_size():
    plan = plan_resources(16, 4, num_workers=2)
    assert (plan.min_actors, plan.num_actors, plan.max_actors) == (2, 2, 2)
    assert plan.actor_pool() == {"size": 2}
    assert plan_resources(4, 0).actor_pool() == {"size": 1}


def test_gpu_pool_starts_with_the_gpus_there_and_grows_to_max_workers():
    plan = plan_resources(16, 2, max_workers=8)
    assert (plan.min_actors, plan.num_actors, plan.max_actors, plan.actor_gpus) == (1, 2, 8, 1.0)
    assert plan.actor_pool() == {"min_size": 1, "max_size": 8, "initial_size": 2}
    plan = plan_resources(16, 2, min_workers=4, max_workers=8)  # waits for 2 more GPUs to join
    assert (plan.min_actors, plan.num_actors, plan.max_actors) == (4, 4, 8)
    assert plan_resources(32, 16, max_workers=8).num_actors == 8  # never starts above the maximum


def test_gpu_pool_can_wait_for_the_first_gpu_node():
    """A head with no CPUs or GPUs while the GPU workers still join: ``--device cuda --max-workers 4``."""
    plan = plan_resources(0, 0, max_workers=4, use_gpus=True)
    assert (plan.min_actors, plan.num_actors, plan.max_actors, plan.actor_gpus) == (1, 1, 4, 1.0)
    assert plan.actor_cpus == plan.task_cpus == 0.5
    with pytest.raises(ValueError, match="--max-workers"):
        plan_resources(0, 0, use_gpus=True)  # a fixed pool of GPU actors needs the GPUs now


def test_a_fixed_gpu_pool_larger_than_the_gpus_points_to_max_workers():
    with pytest.raises(ValueError, match=r"--num-workers 3 .* 2 GPUs.*--max-workers 3"):
        plan_resources(16, 2, num_workers=3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_workers": 2, "max_workers": 4}, "--num-workers 2 sets a fixed pool"),
        ({"min_workers": 2}, "--min-workers 2 needs --max-workers"),
        ({"min_workers": 5, "max_workers": 4}, "--min-workers 5 is more than --max-workers 4"),
    ],
)
def test_conflicting_pool_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_resources(16, 4, **kwargs)


def test_cpu_pools_stay_fixed_within_the_bounds():
    assert plan_resources(16, 0, max_workers=2).actor_pool() == {"size": 2}
    assert plan_resources(16, 0, min_workers=4, max_workers=6).actor_pool() == {"size": 4}
    assert plan_resources(4, 0, min_workers=5, max_workers=6).num_actors == 3  # as many as the CPUs allow


def test_device_cpu_plans_cpu_actors_on_a_gpu_cluster():
    plan = plan_resources(8, 2, use_gpus=False)
    assert plan.actor_gpus == 0 and plan == plan_resources(8, 0)


@pytest.mark.parametrize(("cpus", "node_cpus"), [(4, 2), (16, 2), (16, 4), (8, 1), (2, 1)])
def test_an_actor_fits_on_one_node(cpus, node_cpus):
    """Worker nodes of ``node_cpus`` each (a head with ``--num-cpus 0`` adds none)."""
    plan = plan_resources(cpus, 0, node_cpus=node_cpus)
    assert plan.actor_cpus <= node_cpus
    assert cpus - plan.num_actors * plan.actor_cpus >= 1, "read/decode/write tasks need a free CPU"
    assert plan.actor_threads <= node_cpus  # no extra thread on a CPU of another node


def test_thin_nodes_get_more_actors_not_an_unschedulable_fat_one():
    assert (plan_resources(4, 0, node_cpus=2).num_actors, plan_resources(4, 0, node_cpus=2).actor_cpus) == (
        1,
        2,
    )
    plan = plan_resources(16, 0, node_cpus=2)
    assert (plan.num_actors, plan.actor_cpus, plan.actor_threads) == (6, 2.0, 2)
    # two 1-CPU workers: the actor on one, the I/O tasks on the other; no torch thread on the other node
    plan = plan_resources(2, 0, node_cpus=1)
    assert (plan.num_actors, plan.actor_cpus, plan.actor_threads) == (1, 1.0, 1)
    assert plan_resources(4, 0, node_cpus=4) == plan_resources(4, 0)  # one machine: as before


def test_object_store_limit_is_sized_for_the_largest_pool():
    fixed, growing = plan_resources(8, 1), plan_resources(8, 1, max_workers=4)
    assert growing.num_actors == 1
    assert object_store_limit(growing, 8, 1333) == 4 * object_store_limit(fixed, 8, 1333)


def test_plan_label_job_reads_the_cluster_and_the_device(ray_session, tmp_path):
    from hqlabel.jobs.resources import cluster_capacity, plan_label_job
    from hqlabel.jobs.spec import LabelJobSpec
    from hqlabel.platform.config import LabelerConfig

    capacity = cluster_capacity()
    assert (capacity.cpus, capacity.gpus, capacity.node_cpus) == (2, 0, 2)  # the session's 2-CPU Ray

    def spec(device: str, **kwargs) -> LabelJobSpec:
        labeler = LabelerConfig(classes=["cat"], preset="tiny-random", device=device)
        return LabelJobSpec(input=str(tmp_path), out=str(tmp_path / "out"), labeler=labeler, **kwargs)

    assert plan_label_job(spec("auto")) == plan_resources(2, 0)
    with pytest.raises(ValueError, match="no GPUs"):
        plan_label_job(spec("cuda"))
    plan = plan_label_job(spec("cuda", max_workers=2))
    assert (plan.actor_gpus, plan.actor_pool()) == (1.0, {"min_size": 1, "max_size": 2, "initial_size": 1})


# Ray's ``Resources`` of three nodes: a CPU head, two GPU node types told apart by a custom resource.
NODES = (
    {"CPU": 4.0, "node:__internal_head__": 1.0},
    {"CPU": 8.0, "GPU": 1.0, "a100": 1.0, "accelerator_type:A100": 1.0},
    {"CPU": 8.0, "GPU": 2.0, "l4": 2.0, "accelerator_type:L4": 1.0},
)


def test_resource_slots_count_whole_units_per_node():
    from hqlabel.jobs.resources import resource_slots

    assert resource_slots({"l4": 1}, NODES, "--actor-resource") == 2
    assert resource_slots({"l4": 0.5}, NODES, "--actor-resource") == 4
    assert resource_slots({"accelerator_type:A100": 1}, NODES, "--actor-resource") == 1
    assert resource_slots({"l4": 1, "accelerator_type:L4": 1}, NODES, "--actor-resource") == 1
    expected = (
        "--actor-resource h100=1: no node of the Ray cluster offers 1 h100 (custom resources offered: a100, "
        "accelerator_type:A100, accelerator_type:L4, l4); start the nodes meant for it with "
        """`ray start --resources '{"h100": N}'`, or drop --actor-resource"""
    )
    with pytest.raises(ValueError) as refused:
        resource_slots({"h100": 1}, NODES, "--actor-resource")
    assert str(refused.value) == expected
    with pytest.raises(ValueError, match="offers 2 a100"):  # a node offers 1, no node 2: an actor needs 2
        resource_slots({"a100": 2}, NODES, "--worker-resource")
    with pytest.raises(
        ValueError, match="a100=1, l4=1: no node of the Ray cluster offers all of them together"
    ):
        resource_slots({"a100": 1, "l4": 1}, NODES, "--actor-resource")  # each offered, never on one node


def test_actor_resources_fit_the_pool_to_the_nodes_that_offer_them():
    from hqlabel.jobs.resources import fit_actor_resources

    cpu_pool = plan_resources(24, 0)  # 4 actors of 4 CPUs by default
    assert cpu_pool.num_actors == 4
    fitted = fit_actor_resources(cpu_pool, {"l4": 1}, NODES, sized_by_user=False)  # shrinks to the 2 l4s
    assert (fitted.num_actors, fitted.actor_pool(), fitted.actor_resources) == (2, {"size": 2}, {"l4": 1})
    assert fit_actor_resources(plan_resources(3, 0), {"l4": 1}, NODES, sized_by_user=True).num_actors == 1
    with pytest.raises(ValueError, match=r"3 labeling actors with --actor-resource l4=1 need more than the "
                       r"nodes offer now \(room for 2\); ask for at most 2"):  # fmt: skip
        fit_actor_resources(plan_resources(24, 0, num_workers=3), {"l4": 1}, NODES, sized_by_user=True)
    growing = plan_resources(8, 0, max_workers=4, use_gpus=True)  # GPU pool: starts with what fits, grows
    fitted = fit_actor_resources(growing, {"a100": 1}, NODES, sized_by_user=True)
    assert fitted.actor_pool() == {"min_size": 1, "max_size": 4, "initial_size": 1}


def test_custom_resource_options_are_parsed_and_checked():
    import argparse

    from hqlabel.jobs.args import resource_amount
    from hqlabel.jobs.spec import LabelJobSpec
    from hqlabel.platform.config import LabelerConfig

    assert resource_amount("accelerator_type:A100=0.5") == ("accelerator_type:A100", 0.5)
    assert resource_amount("a100") == ("a100", 1.0)
    for bad in ("a100=0", "a100=x", "=1"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME=AMOUNT"):
            resource_amount(bad)
    labeler = LabelerConfig(classes=["cat"], preset="tiny-random")
    with pytest.raises(ValueError, match="--actor-resource GPU: Ray's own resource"):
        LabelJobSpec(input="in", out="out", labeler=labeler, actor_resources={"GPU": 1})


def test_train_refuses_worker_resources_the_cluster_lacks(ray_session, tmp_path):
    from hqlabel.jobs.train import run_train_job
    from hqlabel.training.config import TrainConfig
    from hqlabel.training.synthetic import write_fine_structure_dataset

    write_fine_structure_dataset(str(tmp_path / "data"), 2, size=64, seed=1)
    config = TrainConfig(
        data=str(tmp_path / "data"), out=str(tmp_path / "run"), preset="tiny-random", epochs=1
    )
    with pytest.raises(
        ValueError, match="--worker-resource a100=1: no node of the Ray cluster offers 1 a100"
    ):
        run_train_job(config, workers=1, worker_resources={"a100": 1})
    with pytest.raises(ValueError, match="--worker-resource GPU: Ray's own resource"):
        run_train_job(config, workers=1, worker_resources={"GPU": 1})
    assert not (tmp_path / "run" / "config.json").exists()  # refused before training started
